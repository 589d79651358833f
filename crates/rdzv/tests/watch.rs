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

/// The keys of a yielded batch.
fn keys_of(item: WatchItem) -> Vec<String> {
    match item {
        WatchItem::Events(evs) => evs
            .iter()
            .map(|e| e.kv().unwrap().key_str().unwrap().to_string())
            .collect(),
        other => panic!("expected events, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_side_key_comes_on_the_watchs_stream_and_is_kept_not_yielded() {
    let etcd = etcd().await;
    let client = EtcdClient::new(etcd.client().await.unwrap());
    let (mut watch, _) = RangeWatch::open_live(&client, "/s/", "/s0").await.unwrap();
    watch.watch_key_too("/side/me").await;
    // The side watch is a message on the stream: it starts when etcd reads it. A put of a
    // key of the range after it has been answered tells that it has.
    client.put("/s/probe", "0", None).await.unwrap();
    let first = bounded(Duration::from_secs(10), "probe event", watch.next()).await;
    assert_eq!(keys_of(first.unwrap()), ["/s/probe"]);
    client.put("/side/me", "mine", None).await.unwrap();
    client
        .put("/side/other", "not watched", None)
        .await
        .unwrap();
    client.put("/s/a", "1", None).await.unwrap();
    let item = bounded(Duration::from_secs(10), "range event", watch.next()).await;
    assert_eq!(
        keys_of(item.unwrap()),
        ["/s/a"],
        "only the range's events are yielded"
    );
    let side = watch.side_value(b"/side/me").expect("the side key's value");
    assert_eq!(side.value(), b"mine");
    assert!(watch.side_value(b"/side/other").is_none());
    client.delete("/side/me", None).await.unwrap();
    client.put("/s/b", "2", None).await.unwrap();
    bounded(Duration::from_secs(10), "range event", watch.next())
        .await
        .unwrap();
    assert!(
        watch.side_value(b"/side/me").is_none(),
        "a deleted side key has no value"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_moved_to_another_range_yields_that_range_from_its_revision_only() {
    let etcd = etcd().await;
    let client = EtcdClient::new(etcd.client().await.unwrap());
    let (mut watch, _) = RangeWatch::open_live(&client, "/old/", "/old0")
        .await
        .unwrap();
    client.put("/old/a", "1", None).await.unwrap();
    let item = bounded(Duration::from_secs(10), "old event", watch.next()).await;
    assert_eq!(keys_of(item.unwrap()), ["/old/a"]);
    // Written before the move, at or after its start revision: delivered.
    let from = client.put("/new/a", "1", None).await.unwrap().revision;
    let mut watch = watch.move_to("/new/", "/new0", from, false).await.unwrap();
    client.put("/old/b", "2", None).await.unwrap();
    client.put("/new/b", "2", None).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let item = bounded(Duration::from_secs(10), "new events", watch.next()).await;
        seen.extend(keys_of(item.unwrap()));
    }
    assert_eq!(
        seen,
        ["/new/a", "/new/b"],
        "the old range's events are dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_asking_for_previous_values_gets_a_deleted_keys_record() {
    let etcd = etcd().await;
    let client = EtcdClient::new(etcd.client().await.unwrap());
    let created = client.put("/p/a", "1", None).await.unwrap().revision;
    let options = rdzv::etcd::api::WatchOptions::new()
        .with_range("/p0")
        .with_prev_kv();
    let (mut stream, _) = client.watch("/p/", Some(options)).await.unwrap();
    client.delete("/p/a", None).await.unwrap();
    let msg = bounded(Duration::from_secs(10), "delete event", stream.message())
        .await
        .unwrap()
        .unwrap();
    let prev = msg.events[0].prev_kv.as_ref().expect("the deleted record");
    assert_eq!(prev.value(), b"1");
    assert_eq!(prev.create_revision(), created);
}
