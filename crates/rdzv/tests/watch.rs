//! The resilient watch against a real etcd: a start revision lost to compaction gives a
//! snapshot of the range instead of an error or a silent gap.

mod common;

use std::time::Duration;

use common::*;
use rdzv::etcd::watch::{RangeWatch, WatchItem};
use rdzv::etcd::EtcdClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_compacted_revision_resyncs_from_a_snapshot() {
    let etcd = etcd().await;
    let client = EtcdClient::new(etcd.client().await.unwrap());
    let first = client.put("/w/a", "1", None).await.unwrap().revision;
    client.put("/w/a", "2", None).await.unwrap();
    let last = client.put("/w/b", "3", None).await.unwrap().revision;
    client.compact(last).await.unwrap();
    let mut watch = RangeWatch::open(&client, "/w/", "/w0", first)
        .await
        .unwrap();
    let item = bounded(Duration::from_secs(10), "resync", watch.next())
        .await
        .unwrap();
    match item {
        WatchItem::Resync { kvs, revision } => {
            assert!(revision >= last);
            let pairs: Vec<_> = kvs
                .iter()
                .map(|kv| {
                    (
                        kv.key_str().unwrap().to_string(),
                        String::from_utf8(kv.value().to_vec()).unwrap(),
                    )
                })
                .collect();
            assert_eq!(
                pairs,
                vec![
                    ("/w/a".to_string(), "2".to_string()),
                    ("/w/b".to_string(), "3".to_string())
                ]
            );
        }
        other => panic!("expected a resync after compaction, got {other:?}"),
    }
    // And it goes on with live events after the snapshot.
    client.put("/w/c", "4", None).await.unwrap();
    let item = bounded(Duration::from_secs(10), "live event", watch.next())
        .await
        .unwrap();
    match item {
        WatchItem::Events(evs) => assert_eq!(evs[0].kv().unwrap().key_str().unwrap(), "/w/c"),
        other => panic!("expected events, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_delivers_events_from_its_start_revision() {
    let etcd = etcd().await;
    let client = EtcdClient::new(etcd.client().await.unwrap());
    let rev = client.put("/x/a", "1", None).await.unwrap().revision;
    client.put("/x/b", "2", None).await.unwrap();
    let mut watch = RangeWatch::open(&client, "/x/", "/x0", rev).await.unwrap();
    let mut keys = Vec::new();
    while keys.len() < 2 {
        match bounded(Duration::from_secs(10), "events", watch.next())
            .await
            .unwrap()
        {
            WatchItem::Events(evs) => keys.extend(
                evs.iter()
                    .map(|e| e.kv().unwrap().key_str().unwrap().to_string()),
            ),
            WatchItem::Resync { .. } => panic!("no compaction happened"),
        }
    }
    assert_eq!(keys, vec!["/x/a", "/x/b"]);
    assert!(client.stats().snapshot().watch_events >= 2);
}
