//! End-to-end tests of `rdzv join` against a real etcd: parallel joins, shell output, one-shot
//! members leaving quietly, crashed `--hold` members being noticed, bad flags.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{rdzv, run_id, run_to_end, Etcd, Proc, WAIT};
use rdzv::bootstrap::exchange_master;
use rdzv::etcd::{EtcdRendezvousHandler, EtcdServer};
use rdzv::{MembershipEvent, RendezvousHandler, RendezvousInfo, RendezvousParameters};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::broadcast;

/// `rdzv join` arguments for `endpoint`, `id` and `nnodes`, with fast timings.
fn join_args(endpoint: &str, id: &str, nnodes: &str, conf: &str) -> Vec<String> {
    [
        "join",
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        id,
        "--nnodes",
        nnodes,
        "--rdzv-conf",
        conf,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn parse_json(stdout: &str, context: &str) -> Value {
    let line = stdout
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("no output; {context}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}; {context}"))
}

#[test]
fn three_parallel_joins_get_a_permutation_of_ranks() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let id = run_id("join3");
    let mut procs: Vec<Proc> = (0..3)
        .map(|i| {
            let mut cmd = rdzv();
            cmd.args(join_args(&etcd.endpoint(), &id, "3", common::FAST_CONF))
                .arg("--json");
            Proc::spawn(cmd, dir.path(), &format!("join{i}"))
        })
        .collect();
    let mut outs = Vec::new();
    for p in &mut procs {
        let code = p.exit_code(WAIT);
        assert_eq!(code, 0, "rdzv join failed\n{}", p.describe());
        outs.push(parse_json(&p.stdout(), &p.describe()));
    }
    let ranks: Vec<usize> = outs
        .iter()
        .map(|o| o["rank"].as_u64().expect("rank is a number") as usize)
        .collect();
    common::assert_permutation(ranks, 3, &format!("{outs:?}"));
    for o in &outs {
        assert_eq!(o["world_size"], 3, "{o}");
        assert_eq!(o["run_id"], id.as_str(), "{o}");
        assert_eq!(o["round"], outs[0]["round"], "same round for all: {outs:?}");
        assert_eq!(o["master_addr"], outs[0]["master_addr"], "{outs:?}");
        assert_eq!(o["master_port"], outs[0]["master_port"], "{outs:?}");
        assert!(o["round"].as_u64().is_some(), "{o}");
        let port = o["master_port"].as_u64().expect("master_port is a number");
        assert!(port > 0 && port < 65536, "{o}");
        assert!(
            o["master_addr"].as_str().is_some_and(|a| !a.is_empty()),
            "{o}"
        );
        assert!(o["node_id"].as_str().is_some_and(|n| !n.is_empty()), "{o}");
    }
    let mut node_ids: Vec<&str> = outs
        .iter()
        .map(|o| o["node_id"].as_str().unwrap())
        .collect();
    node_ids.sort_unstable();
    node_ids.dedup();
    assert_eq!(node_ids.len(), 3, "node ids must differ: {outs:?}");
}

#[test]
fn shell_output_can_be_evaluated() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let id = run_id("join-eval");
    let mut cmd = common::command("sh");
    cmd.arg("-c")
        .arg(r#"out="$("$0" join --rdzv-endpoint "$1" --rdzv-id "$2" --nnodes 1)" || exit 9; eval "$out" && echo "$RANK $WORLD_SIZE $ROUND $RUN_ID $MASTER_PORT $MASTER_ADDR""#)
        .arg(common::rdzv_bin())
        .arg(etcd.endpoint())
        .arg(&id)
        .env("NO_COLOR", "1");
    let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "sh", WAIT);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let fields: Vec<&str> = stdout.trim().split(' ').collect();
    assert_eq!(fields.len(), 6, "{stdout:?} / {stderr}");
    assert_eq!(fields[0], "0", "RANK: {stdout:?}");
    assert_eq!(fields[1], "1", "WORLD_SIZE: {stdout:?}");
    assert!(fields[2].parse::<u64>().is_ok(), "ROUND: {stdout:?}");
    assert_eq!(fields[3], id, "RUN_ID: {stdout:?}");
    assert!(
        fields[4].parse::<u16>().is_ok_and(|p| p > 0),
        "MASTER_PORT: {stdout:?}"
    );
    assert!(!fields[5].is_empty(), "MASTER_ADDR: {stdout:?}");
}

/// The run id needs shell quoting; the flags come from torchrun's `PET_*` variables.
#[test]
fn shell_output_quotes_the_run_id_and_reads_pet_variables() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let id = format!("{} it's $HOME `x`", run_id("join-quote"));
    let mut cmd = common::command("sh");
    cmd.arg("-c")
        .arg(r#"out="$("$0" join)" || exit 9; eval "$out" && printf '%s|%s|%s\n' "$RANK" "$WORLD_SIZE" "$RUN_ID""#)
        .arg(common::rdzv_bin())
        .env("PET_RDZV_ENDPOINT", etcd.endpoint())
        .env("PET_RDZV_ID", &id)
        .env("PET_NNODES", "1")
        .env("PET_RDZV_CONF", common::FAST_CONF)
        .env("NO_COLOR", "1");
    let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "sh", WAIT);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(
        stdout.trim_end_matches('\n'),
        format!("0|1|{id}"),
        "{stderr}"
    );
}

/// A member in the test process, joining concurrently with `rdzv join` children.
async fn member(endpoint: &str, id: &str, ttl: &str) -> EtcdRendezvousHandler {
    let params = RendezvousParameters::new("etcd", endpoint, id, 2, 2)
        .expect("parameters")
        .with_config("keep_alive_ttl", ttl)
        .with_config("last_call_timeout", "1")
        .with_config("timeout", "30")
        .with_local_addr("127.0.0.1");
    EtcdRendezvousHandler::connect(&params)
        .await
        .expect("connect the in-process member")
}

/// Joins a round and takes part in the master exchange (so that a `rdzv join` peer with a
/// higher rank does not wait for MASTER_ADDR forever).
async fn join_round(handler: &EtcdRendezvousHandler) -> RendezvousInfo {
    let info = tokio::time::timeout(WAIT, handler.next_rendezvous())
        .await
        .expect("the in-process member's round did not complete in time")
        .expect("next_rendezvous");
    tokio::time::timeout(
        WAIT,
        exchange_master(&*info.store, info.rank, "127.0.0.1", WAIT),
    )
    .await
    .expect("master exchange timed out")
    .expect("master exchange");
    info
}

fn join_child(args: Vec<String>) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::from(rdzv());
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd.spawn().expect("cannot start rdzv join")
}

/// Waits at most `limit` for a `PeerLost` or `PeerLeft` event; returns it, or the other events
/// seen.
async fn peer_lost_within(
    events: &mut broadcast::Receiver<MembershipEvent>,
    limit: Duration,
) -> Result<MembershipEvent, Vec<MembershipEvent>> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => return Err(seen),
            Ok(Ok(ev @ (MembershipEvent::PeerLost { .. } | MembershipEvent::PeerLeft { .. }))) => {
                return Ok(ev)
            }
            Ok(Ok(ev)) => seen.push(ev),
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(broadcast::error::RecvError::Closed)) => return Err(seen),
        }
    }
}

async fn start_etcd() -> EtcdServer {
    EtcdServer::start()
        .await
        .expect("start etcd (install etcd-server or set RDZV_ETCD_BINARY)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_member_leaving_is_not_a_failure() {
    let etcd = start_etcd().await;
    let id = run_id("join-detach");
    let handler = member(&etcd.endpoint(), &id, "2").await;
    let mut events = handler.subscribe().expect("the etcd handler pushes events");

    let mut args = join_args(&etcd.endpoint(), &id, "2", common::FAST_CONF);
    args.push("--json".into());
    let child = join_child(args);
    let (info, output) = tokio::join!(join_round(&handler), async {
        tokio::time::timeout(WAIT, child.wait_with_output())
            .await
            .expect("rdzv join did not exit in time")
            .expect("wait for rdzv join")
    });
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "rdzv join failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let out = parse_json(&stdout, &stderr);
    assert_eq!(out["round"].as_u64(), Some(info.round), "{out}");
    assert_eq!(out["world_size"], 2, "{out}");
    assert_eq!(
        out["rank"].as_u64(),
        Some(1 - info.rank as u64),
        "the two members have ranks 0 and 1: {out}, in-process rank {}",
        info.rank
    );

    // The child's node lease is gone now (revoked when it detached); its join record must not
    // disappear with it, not even after its TTL (2 s) would have expired.
    match peer_lost_within(&mut events, Duration::from_secs(4)).await {
        Ok(ev) => panic!("a detached `rdzv join` looked like a lost peer: {ev:?}"),
        Err(_others) => {}
    }
    handler.shutdown().await.expect("shutdown");
}

/// Starts `rdzv join --hold --json` next to an in-process member; returns the child, the
/// child's JSON line and the in-process member's event receiver.
async fn hold_pair(
    etcd: &EtcdServer,
    id: &str,
    ttl: &str,
    handler: &EtcdRendezvousHandler,
) -> (
    tokio::process::Child,
    Value,
    broadcast::Receiver<MembershipEvent>,
) {
    let events = handler.subscribe().expect("the etcd handler pushes events");
    let conf = format!("last_call_timeout=1,keep_alive_ttl={ttl}");
    let mut args = join_args(&etcd.endpoint(), id, "2", &conf);
    args.extend(["--json".into(), "--hold".into()]);
    let mut child = join_child(args);
    let stdout = child.stdout.take().expect("piped stdout");
    let (info, line) = tokio::join!(join_round(handler), async {
        let mut lines = BufReader::new(stdout).lines();
        tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("rdzv join --hold printed nothing in time")
            .expect("read rdzv join's stdout")
    });
    let line = line.unwrap_or_else(|| panic!("rdzv join --hold exited without output"));
    let out: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert_eq!(out["round"].as_u64(), Some(info.round), "{out}");
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "rdzv join --hold must stay a member"
    );
    (child, out, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_hold_member_is_noticed_as_lost() {
    let etcd = start_etcd().await;
    let id = run_id("join-kill");
    let handler = member(&etcd.endpoint(), &id, "2").await;
    let (mut child, out, mut events) = hold_pair(&etcd, &id, "2", &handler).await;

    child.start_kill().expect("SIGKILL rdzv join --hold");
    let killed_at = Instant::now();
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("the killed child was not reaped in time")
        .expect("wait");
    assert!(!status.success());

    // TTL 2 s, plus slack for etcd's lease expiry checks.
    let limit = Duration::from_secs(2 + 3);
    match peer_lost_within(&mut events, limit).await {
        Ok(MembershipEvent::PeerLost { node_id, .. }) => {
            assert_eq!(
                Some(node_id.as_str()),
                out["node_id"].as_str(),
                "the lost peer is the killed member"
            );
        }
        Ok(other) => unreachable!("{other:?}"),
        Err(seen) => panic!(
            "no PeerLost within {limit:?} of SIGKILL (waited {:?}); other events: {seen:?}",
            killed_at.elapsed()
        ),
    }
    handler.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_hold_member_is_noticed_as_lost_and_exits_cleanly_when_resumed() {
    let etcd = start_etcd().await;
    let id = run_id("join-stop");
    let handler = member(&etcd.endpoint(), &id, "2").await;
    let (mut child, out, mut events) = hold_pair(&etcd, &id, "2", &handler).await;

    // SIGSTOP: the process hangs (as in a stuck collective); its lease is not renewed.
    let pid = child.id().expect("running child has a pid");
    assert!(common::kill(pid, libc::SIGSTOP), "SIGSTOP rdzv join --hold");
    let limit = Duration::from_secs(2 + 3);
    match peer_lost_within(&mut events, limit).await {
        Ok(MembershipEvent::PeerLost { node_id, .. }) => {
            assert_eq!(Some(node_id.as_str()), out["node_id"].as_str());
        }
        Ok(other) => panic!("a hung member must be reported as PeerLost, got {other:?}"),
        Err(seen) => panic!("no PeerLost within {limit:?} of SIGSTOP; other events: {seen:?}"),
    }
    // Resumed, the process still answers signals and exits cleanly.
    assert!(common::kill(pid, libc::SIGCONT), "SIGCONT");
    assert!(common::kill(pid, libc::SIGTERM), "SIGTERM");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("the resumed child did not exit in time")
        .expect("wait");
    assert!(status.success(), "{status}");
    handler.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_hold_member_leaves_at_once() {
    let etcd = start_etcd().await;
    let id = run_id("join-term");
    // A long TTL: the peer must be reported because it left, not because its lease expired.
    let handler = member(&etcd.endpoint(), &id, "10").await;
    let (mut child, out, mut events) = hold_pair(&etcd, &id, "10", &handler).await;

    let pid = child.id().expect("running child has a pid");
    assert!(common::kill(pid, libc::SIGTERM), "SIGTERM rdzv join --hold");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("rdzv join --hold did not exit after SIGTERM in time")
        .expect("wait");
    assert!(
        status.success(),
        "rdzv join --hold should leave cleanly on SIGTERM, got {status}"
    );

    let limit = Duration::from_secs(3);
    match peer_lost_within(&mut events, limit).await {
        Ok(MembershipEvent::PeerLeft { node_id, .. }) => {
            assert_eq!(Some(node_id.as_str()), out["node_id"].as_str());
        }
        Ok(other) => panic!("a graceful leave must be reported as PeerLeft, got {other:?}"),
        Err(seen) => panic!("no PeerLeft within {limit:?} of SIGTERM; other events: {seen:?}"),
    }
    handler.shutdown().await.expect("shutdown");
}

#[test]
fn bad_flags_are_rejected_with_a_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Usage errors (clap): exit 2. No etcd is needed: they fail before connecting.
    for (nnodes, needle) in [
        ("0", "at least 1"),
        ("3:2", "below the minimum"),
        ("x", "x"),
    ] {
        let mut cmd = rdzv();
        cmd.args([
            "join",
            "--rdzv-endpoint",
            "127.0.0.1:1",
            "--rdzv-id",
            "bad",
            "--nnodes",
            nnodes,
        ]);
        let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "join-bad", WAIT);
        assert_eq!(
            code, 2,
            "--nnodes {nnodes}: stdout {stdout:?}, stderr:\n{stderr}"
        );
        assert!(stdout.is_empty(), "--nnodes {nnodes}: {stdout:?}");
        assert!(stderr.contains("--nnodes"), "--nnodes {nnodes}: {stderr}");
        assert!(stderr.contains(needle), "--nnodes {nnodes}: {stderr}");
    }

    // A missing endpoint: a clear error naming the flag and its variable.
    let mut cmd = rdzv();
    cmd.args(["join", "--rdzv-id", "bad", "--nnodes", "1"]);
    let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "join-noendpoint", WAIT);
    assert_ne!(code, 0, "a missing endpoint must fail: {stdout:?}");
    assert!(stdout.is_empty(), "{stdout:?}");
    assert!(
        stderr.contains("--rdzv-endpoint") && stderr.contains("PET_RDZV_ENDPOINT"),
        "{stderr}"
    );

    // A malformed --rdzv-conf and an invalid run id fail before connecting, naming the culprit.
    let mut cmd = rdzv();
    cmd.args([
        "join",
        "--rdzv-endpoint",
        "127.0.0.1:1",
        "--rdzv-id",
        "bad",
        "--rdzv-conf",
        "timeout",
    ]);
    let (code, _, stderr) = run_to_end(cmd, dir.path(), "join-badconf", WAIT);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("rdzv-conf"), "{stderr}");

    let mut cmd = rdzv();
    cmd.args(["join", "--rdzv-endpoint", "127.0.0.1:1", "--rdzv-id", "a/b"]);
    let (code, _, stderr) = run_to_end(cmd, dir.path(), "join-badid", WAIT);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("a/b") || stderr.contains('/'), "{stderr}");
}

/// Bad input (issue 10): a garbage `current` (as `etcdctl put /rdzv/<run>/current garbage`
/// writes it) was overwritten by `rdzv join` while `rdzv status` reported a state error. Now
/// `join`, `status` and `close` all fail (exit 2: bad input) naming the key, and the key is
/// left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_current_fails_join_status_and_close_naming_the_key() {
    let etcd = start_etcd().await;
    let id = run_id("garbage");
    let key = format!("/rdzv/{id}/current");
    let mut raw = etcd.client().await.expect("etcd client");
    raw.put(key.as_str(), "garbage", None).await.expect("put");
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoint = etcd.endpoint();
    for sub in ["join", "status", "close"] {
        let mut cmd = rdzv();
        cmd.args([sub, "--rdzv-endpoint", &endpoint, "--rdzv-id", &id]);
        if sub == "join" {
            cmd.args(["--rdzv-conf", "timeout=10"]);
        }
        let (code, stdout, stderr) =
            tokio::task::block_in_place(|| run_to_end(cmd, dir.path(), sub, WAIT));
        assert_eq!(code, 2, "{sub}: stdout {stdout:?}, stderr:\n{stderr}");
        assert!(stdout.is_empty(), "{sub}: {stdout:?}");
        assert!(
            stderr.contains(&key) && stderr.contains("state"),
            "{sub}: the error must name the key:\n{stderr}"
        );
        let kept = raw.get(key.as_str(), None).await.expect("get");
        assert_eq!(
            kept.kvs().first().map(|kv| kv.value()),
            Some(&b"garbage"[..]),
            "{sub} overwrote the key"
        );
    }
}
