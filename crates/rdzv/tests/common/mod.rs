//! Shared helpers of the integration tests: a real etcd per test, parameters, bounded waits.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rdzv::etcd::{EtcdRendezvousHandler, EtcdServer};
use rdzv::{MembershipEvent, RendezvousHandler, RendezvousParameters};
use tokio::sync::broadcast;

/// Logs to the test's output when `RDZV_TEST_LOG` is set (e.g. `RDZV_TEST_LOG=rdzv=debug`).
pub fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("RDZV_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

/// Starts a fresh etcd for one test.
pub async fn etcd() -> EtcdServer {
    init_logging();
    EtcdServer::start()
        .await
        .expect("start etcd (install etcd-server or set RDZV_ETCD_BINARY)")
}

/// A unique run id.
pub fn run_id() -> String {
    format!("test-{}", uuid::Uuid::new_v4().simple())
}

/// etcd backend parameters with short, test-friendly timings.
pub fn params(endpoint: &str, run_id: &str, min: usize, max: usize) -> RendezvousParameters {
    RendezvousParameters::new("etcd", endpoint, run_id, min, max)
        .expect("valid parameters")
        .with_config("timeout", "60")
        .with_config("last_call_timeout", "1")
        .with_config("keep_alive_ttl", "3")
}

/// Connects a handler.
pub async fn handler(p: &RendezvousParameters) -> Arc<EtcdRendezvousHandler> {
    init_logging();
    Arc::new(
        EtcdRendezvousHandler::connect(p)
            .await
            .expect("connect handler"),
    )
}

/// Runs `fut`, failing the test with `what` if it takes longer than `limit`.
pub async fn bounded<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Waits for the first event matching `pred`, bounded by `limit`.
pub async fn wait_event(
    rx: &mut broadcast::Receiver<MembershipEvent>,
    limit: Duration,
    what: &str,
    pred: impl Fn(&MembershipEvent) -> bool,
) -> MembershipEvent {
    bounded(limit, what, async {
        loop {
            match rx.recv().await {
                Ok(ev) if pred(&ev) => return ev,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => {
                    panic!("event channel closed while waiting for {what}")
                }
            }
        }
    })
    .await
}

/// Asserts that `ranks` is a permutation of `0..n`.
pub fn assert_permutation(mut ranks: Vec<usize>, n: usize) {
    ranks.sort_unstable();
    assert_eq!(
        ranks,
        (0..n).collect::<Vec<_>>(),
        "ranks must be 0..{n}, each once"
    );
}

/// `next_rendezvous` on all handlers concurrently; returns (rank, world_size, round) each.
pub async fn rendezvous_all(handlers: &[Arc<EtcdRendezvousHandler>]) -> Vec<(usize, usize, u64)> {
    let tasks: Vec<_> = handlers
        .iter()
        .cloned()
        .map(|h| tokio::spawn(async move { h.next_rendezvous().await }))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        let info = t.await.expect("task").expect("next_rendezvous");
        out.push((info.rank, info.world_size, info.round));
    }
    out
}
