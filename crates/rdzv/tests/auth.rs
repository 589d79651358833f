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
