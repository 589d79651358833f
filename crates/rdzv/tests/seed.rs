//! PyTorch's `etcd_rendezvous_test.py` (the seed this project was described by), in Rust,
//! against a real etcd started by `EtcdServer`.

mod common;

use common::{etcd, run_id};
use rdzv::{create_handler, RendezvousParameters};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_etcd_rdzv_basic_params() {
    let etcd = etcd().await;
    let params = RendezvousParameters::new("etcd", etcd.endpoint(), run_id(), 1, 1).unwrap();
    let handler = create_handler(params).await;
    assert!(handler.is_ok(), "{:?}", handler.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_etcd_rdzv_additional_params() {
    let etcd = etcd().await;
    let run_id = run_id();
    let params = RendezvousParameters::new("etcd", etcd.endpoint(), &run_id, 1, 1)
        .unwrap()
        .with_config("timeout", "60")
        .with_config("last_call_timeout", "30")
        .with_config("protocol", "http");
    let handler = create_handler(params).await.unwrap();
    assert_eq!(handler.run_id(), run_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_get_backend() {
    let etcd = etcd().await;
    let params = RendezvousParameters::new("etcd", etcd.endpoint(), run_id(), 1, 1)
        .unwrap()
        .with_config("timeout", "60")
        .with_config("last_call_timeout", "30")
        .with_config("protocol", "http");
    let handler = create_handler(params).await.unwrap();
    assert_eq!(handler.backend(), "etcd");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_run_is_open_with_nobody_waiting() {
    let etcd = etcd().await;
    let params = RendezvousParameters::new("etcd", etcd.endpoint(), run_id(), 1, 1).unwrap();
    let handler = create_handler(params).await.unwrap();
    assert!(!handler.is_closed().await.unwrap());
    assert_eq!(handler.num_nodes_waiting().await.unwrap(), 0);
    handler.set_closed().await.unwrap();
    assert!(handler.is_closed().await.unwrap());
}
