//! etcd with authentication enabled: wrong or missing credentials are a clear connection
//! error (never a hang), the right ones work, and the password never shows in debug output.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdzv::etcd::{ConnectionOptions, EtcdRendezvousHandler};
use rdzv::{RendezvousError, RendezvousHandler, RendezvousParameters};

async fn etcd_with_auth() -> rdzv::etcd::EtcdServer {
    let etcd = etcd().await;
    let mut c = etcd.client().await.unwrap();
    c.user_add("root", "s3cret-pw", None).await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.auth_enable().await.unwrap();
    etcd
}

fn params(endpoint: &str, user: Option<(&str, &str)>) -> RendezvousParameters {
    let mut p = RendezvousParameters::new("etcd", endpoint, run_id(), 1, 1)
        .unwrap()
        .with_config("connect_timeout", "3");
    if let Some((u, pw)) = user {
        p = p.with_config("username", u).with_config("password", pw);
    }
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_a_connection_error_within_the_timeout() {
    let etcd = etcd_with_auth().await;
    let started = Instant::now();
    let err = EtcdRendezvousHandler::connect(&params(&etcd.endpoint(), Some(("root", "wrong"))))
        .await
        .unwrap_err();
    assert!(matches!(err, RendezvousError::Connection(_)), "{err}");
    assert!(
        !err.to_string().contains("wrong"),
        "the password must not appear: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_credentials_are_refused_clearly() {
    let etcd = etcd_with_auth().await;
    let err = EtcdRendezvousHandler::connect(&params(&etcd.endpoint(), None))
        .await
        .unwrap_err();
    assert!(matches!(err, RendezvousError::Connection(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_credentials_complete_a_round() {
    let etcd = etcd_with_auth().await;
    let p = params(&etcd.endpoint(), Some(("root", "s3cret-pw")));
    let h = EtcdRendezvousHandler::connect(&p).await.unwrap();
    let info = bounded(Duration::from_secs(20), "round", h.next_rendezvous())
        .await
        .unwrap();
    assert_eq!((info.rank, info.world_size), (0, 1));
    let debug = format!("{:?}", ConnectionOptions::from_parameters(&p).unwrap());
    assert!(!debug.contains("s3cret-pw"), "{debug}");
    assert!(debug.contains("redacted"));
}

// ---- least privilege ---------------------------------------------------------------------

/// etcd with authentication and one user `node` (password `node-pw`) whose only role grants
/// `permission` on the key prefix `prefix` (etcdctl: `role grant-permission rdzv-node
/// --prefix=true <permission> <prefix>`).
async fn etcd_with_node_role(
    permission: etcd_client::PermissionType,
    prefix: &str,
) -> rdzv::etcd::EtcdServer {
    let etcd = etcd().await;
    let mut c = etcd.client().await.unwrap();
    c.user_add("root", "root-pw", None).await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.role_add("rdzv-node").await.unwrap();
    c.role_grant_permission(
        "rdzv-node",
        etcd_client::Permission::new(permission, prefix).with_prefix(),
    )
    .await
    .unwrap();
    c.user_add("node", "node-pw", None).await.unwrap();
    c.user_grant_role("node", "rdzv-node").await.unwrap();
    c.auth_enable().await.unwrap();
    etcd
}

fn node_params(endpoint: &str, run_id: &str, nodes: usize) -> RendezvousParameters {
    RendezvousParameters::new("etcd", endpoint, run_id, nodes, nodes)
        .unwrap()
        .with_config("connect_timeout", "3")
        .with_config("last_call_timeout", "1")
        .with_config("keep_alive_ttl", "3")
        .with_config("username", "node")
        .with_config("password", "node-pw")
}

/// The role the README documents (read-write on the prefix `/rdzv/`, nothing else) is enough
/// for everything a node and an operator do: join rounds, use the store, watch, leave, read
/// the status, close the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readwrite_on_the_prefix_alone_is_enough() {
    let etcd = etcd_with_node_role(etcd_client::PermissionType::Readwrite, "/rdzv/").await;
    let run = run_id();
    let p = node_params(&etcd.endpoint(), &run, 2);
    let (a, b) = (handler(&p).await, handler(&p).await);
    let infos = bounded(
        Duration::from_secs(20),
        "a round with least privilege",
        async {
            let (x, y) = tokio::join!(a.next_rendezvous(), b.next_rendezvous());
            (x.unwrap(), y.unwrap())
        },
    )
    .await;
    infos.0.store.set("k", b"v").await.unwrap();
    assert_eq!(infos.1.store.get("k").await.unwrap(), b"v".to_vec());
    assert_eq!(infos.0.store.add("n", 2).await.unwrap(), 2);
    let mut events = a.subscribe().unwrap();
    assert!(b.shutdown().await.unwrap());
    wait_event(&mut events, Duration::from_secs(10), "b leaving", |e| {
        matches!(e, rdzv::MembershipEvent::PeerLeft { .. })
    })
    .await;
    let settings = rdzv::etcd::RendezvousSettings::from_parameters(&p).unwrap();
    let client = ConnectionOptions::from_parameters(&p)
        .unwrap()
        .connect_failover(Default::default())
        .await
        .expect("an operator with the node role connects");
    let keys = rdzv::etcd::keys::RunKeys::new(&settings.prefix, &run);
    let status = rdzv::etcd::read_status(&client, &keys, &run)
        .await
        .expect("status with the node role");
    assert_eq!(status.members.len(), 2);
    a.set_closed().await.expect("close with the node role");
    assert!(a.is_closed().await.unwrap());
    assert!(a.shutdown().await.unwrap());
}

/// Regression (issue 10): a user granted only rdzv's prefix could not connect: the connect
/// probe read the key `/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_probes_inside_the_prefix() {
    let etcd = etcd_with_node_role(etcd_client::PermissionType::Readwrite, "/rdzv/").await;
    let p = node_params(&etcd.endpoint(), &run_id(), 1);
    EtcdRendezvousHandler::connect(&p)
        .await
        .expect("connect with a role limited to the prefix");
    // A custom prefix is probed too.
    let custom = node_params(&etcd.endpoint(), &run_id(), 1).with_config("etcd_prefix", "/other");
    let err = EtcdRendezvousHandler::connect(&custom).await.unwrap_err();
    assert!(
        err.to_string().contains("not authorised"),
        "a prefix outside the role is refused clearly at connect: {err}"
    );
}

/// Less than the role: read-only on the prefix connects (it can read) but the first write is
/// refused clearly, at once, without a retry loop or a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_on_the_prefix_fails_clearly_at_the_first_write() {
    let etcd = etcd_with_node_role(etcd_client::PermissionType::Read, "/rdzv/").await;
    let p = node_params(&etcd.endpoint(), &run_id(), 1);
    let started = Instant::now();
    let outcome = match EtcdRendezvousHandler::connect(&p).await {
        Err(e) => e,
        Ok(h) => bounded(
            Duration::from_secs(10),
            "a refused round",
            h.next_rendezvous(),
        )
        .await
        .unwrap_err(),
    };
    let text = outcome.to_string();
    assert!(
        text.contains("not authorised") && text.contains("permission denied"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// Less than the role: a role on another prefix cannot connect; the error says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_on_another_prefix_is_refused_at_connect() {
    let etcd = etcd_with_node_role(etcd_client::PermissionType::Readwrite, "/other/").await;
    let err = EtcdRendezvousHandler::connect(&node_params(&etcd.endpoint(), &run_id(), 1))
        .await
        .unwrap_err();
    assert!(matches!(err, RendezvousError::Connection(_)), "{err}");
    assert!(err.to_string().contains("permission denied"), "{err}");
    assert!(!err.to_string().contains("node-pw"), "{err}");
}
