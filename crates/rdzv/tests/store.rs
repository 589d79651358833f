//! The round's key-value store against a real etcd.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rdzv::{RendezvousError, Store};

async fn store() -> (rdzv::etcd::EtcdServer, Arc<dyn Store>) {
    let etcd = etcd().await;
    let p = params(&etcd.endpoint(), &run_id(), 1, 1);
    let h = handler(&p).await;
    let info = rdzv::RendezvousHandler::next_rendezvous(&*h).await.unwrap();
    (etcd, info.store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_get_check_delete_num_keys() {
    let (_etcd, s) = store().await;
    assert_eq!(s.num_keys().await.unwrap(), 0);
    s.set("a", b"1").await.unwrap();
    s.set("b", &[0, 255, 7]).await.unwrap();
    assert_eq!(s.get("a").await.unwrap(), b"1");
    assert_eq!(s.get("b").await.unwrap(), vec![0, 255, 7]);
    assert!(s.check(&["a", "b"]).await.unwrap());
    assert!(!s.check(&["a", "c"]).await.unwrap());
    assert_eq!(s.num_keys().await.unwrap(), 2);
    assert!(s.delete_key("a").await.unwrap());
    assert!(!s.delete_key("a").await.unwrap());
    assert_eq!(s.num_keys().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_waits_for_a_later_set() {
    let (_etcd, s) = store().await;
    let waiter = tokio::spawn({
        let s = s.clone();
        async move { s.get_timeout("late", Duration::from_secs(10)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished());
    s.set("late", b"here").await.unwrap();
    let v = bounded(Duration::from_secs(10), "get", waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v, b"here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_times_out_with_a_clear_error() {
    let (_etcd, s) = store().await;
    let err = s
        .get_timeout("never", Duration::from_millis(300))
        .await
        .unwrap_err();
    match err {
        RendezvousError::Timeout(msg) => assert!(msg.contains("never"), "{msg}"),
        other => panic!("expected timeout, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adds_lose_no_increment() {
    let (_etcd, s) = store().await;
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    s.add("counter", 1).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        bounded(Duration::from_secs(60), "adds", t).await.unwrap();
    }
    assert_eq!(s.add("counter", 0).await.unwrap(), 320);
    assert_eq!(s.add("counter", -20).await.unwrap(), 300);
    assert_eq!(s.get("counter").await.unwrap(), b"300");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_on_a_non_counter_is_a_state_error() {
    let (_etcd, s) = store().await;
    s.set("text", b"hello").await.unwrap();
    let err = s.add("text", 1).await.unwrap_err();
    assert!(
        matches!(err, RendezvousError::State(ref m) if m.contains("text")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_set_semantics() {
    let (_etcd, s) = store().await;
    // Missing key, empty expected: set.
    assert_eq!(s.compare_set("k", b"", b"one").await.unwrap(), b"one");
    // Wrong expected: unchanged, returns current.
    assert_eq!(s.compare_set("k", b"zzz", b"two").await.unwrap(), b"one");
    // Right expected: swapped.
    assert_eq!(s.compare_set("k", b"one", b"two").await.unwrap(), b"two");
    assert_eq!(s.get("k").await.unwrap(), b"two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_several_keys() {
    let (_etcd, s) = store().await;
    s.set("x", b"1").await.unwrap();
    let waiter = tokio::spawn({
        let s = s.clone();
        async move { s.wait(&["x", "y", "z"], Duration::from_secs(10)).await }
    });
    s.set("y", b"1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished(), "z is still missing");
    s.set("z", b"1").await.unwrap();
    bounded(Duration::from_secs(10), "wait", waiter)
        .await
        .unwrap()
        .unwrap();
    let err = s
        .wait(&["x", "missing"], Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RendezvousError::Timeout(ref m) if m.contains("missing")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_of_two_rounds_are_separate() {
    let etcd = etcd().await;
    let p = params(&etcd.endpoint(), &run_id(), 1, 1);
    let h = handler(&p).await;
    let r1 = rdzv::RendezvousHandler::next_rendezvous(&*h).await.unwrap();
    r1.store.set("k", b"round1").await.unwrap();
    let r2 = rdzv::RendezvousHandler::next_rendezvous(&*h).await.unwrap();
    assert!(!r2.store.check(&["k"]).await.unwrap());
}

/// Bad input (issue 10): `rdzv run --exit-barrier-timeout 18446744073709551615` panicked in
/// the store (`Instant` overflow computing the deadline). A caller's timeout of any size is a
/// wait without practical end, not a panic: the waits still run when the test stops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_wait_accept_any_timeout_up_to_duration_max() {
    let (_etcd, s) = store().await;
    let still_waiting = Duration::from_millis(300);
    let get = tokio::time::timeout(still_waiting, s.get_timeout("never", Duration::MAX)).await;
    assert!(get.is_err(), "get_timeout(Duration::MAX) returned: {get:?}");
    let wait = tokio::time::timeout(still_waiting, s.wait(&["never"], Duration::MAX)).await;
    assert!(wait.is_err(), "wait(Duration::MAX) returned: {wait:?}");
    // And they still end when the key comes.
    let getter = tokio::spawn({
        let s = s.clone();
        async move { s.get_timeout("late", Duration::MAX).await }
    });
    s.set("late", b"here").await.unwrap();
    let v = bounded(Duration::from_secs(10), "get", getter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v, b"here");
}
