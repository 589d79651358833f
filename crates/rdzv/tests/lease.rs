//! The keep-alive loop against a real etcd.

mod common;

use std::time::Duration;

use common::*;
use rdzv::etcd::lease::KeptLease;
use rdzv::etcd::EtcdClient;

/// Regression: the loop waited for an answer to a renewal it had not sent (opening the stream
/// consumes the first answer), so a lease expired after one TTL unless the stream was torn
/// down and reopened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_renews_a_lease_over_several_ttls_on_one_stream() {
    let etcd = etcd().await;
    let client = EtcdClient::new(etcd.client().await.unwrap());
    let lease = KeptLease::grant(&client, 2).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!lease.is_lost(), "the lease was reported lost");
    let ttl = client.lease_ttl(lease.id()).await.unwrap();
    assert!(
        ttl.is_some(),
        "the lease expired although it was kept alive"
    );
    let sent = client.stats().snapshot().keep_alives;
    assert!(
        sent >= 5,
        "about one renewal every TTL/3 was expected, {sent} were sent"
    );
    assert_eq!(client.stats().snapshot().watch_creates, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_lease_expires_and_is_reported_by_etcd() {
    let etcd = etcd().await;
    let client = EtcdClient::new(etcd.client().await.unwrap());
    let lease = KeptLease::grant(&client, 2).await.unwrap();
    lease.stop();
    let id = lease.id();
    bounded(Duration::from_secs(6), "lease expiry", async {
        while client.lease_ttl(id).await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}
