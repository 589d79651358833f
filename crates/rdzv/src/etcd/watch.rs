//! [`RangeWatch`]: a watch on a key range that survives broken streams and compaction.
//!
//! Events are delivered from a start revision on. If the stream breaks, the watch is re-opened
//! from the revision after the last event seen, so nothing is missed. If etcd has compacted that
//! revision away, the watch re-reads the range instead and yields a [`WatchItem::Resync`]
//! snapshot, from which the caller rebuilds its view (as kube-rs' watcher does).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use futures::FutureExt;

use super::api::{
    Event, EventType, GetOptions, KeyValue, WatchOptions, WatchResponse, WatchStream,
};
use super::client::EtcdClient;
use crate::RendezvousError;

/// What a [`RangeWatch`] yields.
#[derive(Debug)]
pub enum WatchItem {
    /// Events, in revision order.
    Events(Vec<Event>),
    /// The events since the last item are lost (compaction): here is the whole range as of
    /// `revision`.
    Resync {
        /// Every key in the range.
        kvs: Vec<KeyValue>,
        /// The revision of the snapshot.
        revision: i64,
    },
}

/// A resilient watch on `[start, end)`.
///
/// Its stream may carry more watches: keys watched on the side ([`RangeWatch::watch_key_too`],
/// best effort: lost with the stream) and, once this watch is done with, another range
/// ([`RangeWatch::move_to`]) — each a message on the stream instead of a stream of its own.
/// Events outside the range are never yielded.
#[derive(Debug)]
pub struct RangeWatch {
    client: EtcdClient,
    start: Vec<u8>,
    end: Vec<u8>,
    next_revision: i64,
    stream: Option<Box<dyn WatchStream>>,
    /// Keys watched on the side, and their last value seen (`None`: none yet, or deleted).
    side: BTreeMap<Vec<u8>, Option<KeyValue>>,
    /// Messages taken in by [`RangeWatch::absorb_ready`], for `next` (side keys sorted out).
    stash: VecDeque<WatchResponse>,
    /// Whether events carry the keys' previous values.
    prev_kv: bool,
}

impl RangeWatch {
    /// Starts watching `[start, end)` from `from_revision` on.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if the watch cannot be created.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn open(
        client: &EtcdClient,
        start: impl Into<Vec<u8>>,
        end: impl Into<Vec<u8>>,
        from_revision: i64,
    ) -> Result<Self, RendezvousError> {
        Self::open_from(client, start, end, from_revision, false).await
    }

    /// As [`RangeWatch::open`]; with `prev_kv`, events carry the keys' previous values (a
    /// deleted key's record, for instance).
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if the watch cannot be created.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn open_from(
        client: &EtcdClient,
        start: impl Into<Vec<u8>>,
        end: impl Into<Vec<u8>>,
        from_revision: i64,
        prev_kv: bool,
    ) -> Result<Self, RendezvousError> {
        let mut watch = Self {
            client: client.clone(),
            start: start.into(),
            end: end.into(),
            next_revision: from_revision.max(1),
            stream: None,
            side: BTreeMap::new(),
            stash: VecDeque::new(),
            prev_kv,
        };
        watch.reopen().await?;
        Ok(watch)
    }

    /// Starts watching `[start, end)` from now on, and returns the revision after which every
    /// event will be delivered. Unlike a watch from a past revision, which etcd serves from a
    /// background loop (100 ms batches), this one is live at once.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if the watch cannot be created.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn open_live(
        client: &EtcdClient,
        start: impl Into<Vec<u8>>,
        end: impl Into<Vec<u8>>,
    ) -> Result<(Self, i64), RendezvousError> {
        let (start, end) = (start.into(), end.into());
        let options = WatchOptions::new().with_range(end.clone());
        let (stream, revision) = client.watch(start.clone(), Some(options)).await?;
        let watch = Self {
            client: client.clone(),
            start,
            end,
            next_revision: revision + 1,
            stream: Some(stream),
            side: BTreeMap::new(),
            stash: VecDeque::new(),
            prev_kv: false,
        };
        Ok((watch, revision))
    }

    /// Also watches `key`, from now on, on this watch's stream (one message, no stream of its
    /// own): its events are kept, not yielded, and [`RangeWatch::side_value`] tells its last
    /// value seen. Best effort, a fast path only: the side watch may start after the key
    /// changed, and it is not re-opened with a broken stream.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn watch_key_too(&mut self, key: impl Into<Vec<u8>>) {
        let key = key.into();
        if let Some(stream) = self.stream.as_mut() {
            self.client.stats().count_request();
            self.client.stats().count_watch_create();
            if let Err(e) = stream.add_watch(key.clone(), WatchOptions::new()).await {
                tracing::debug!(error = %e, "cannot add a watch to the stream");
            }
        }
        self.side.entry(key).or_insert(None);
    }

    /// The last value of a key watched on the side that this watch has seen (`None`: none
    /// seen, or it was deleted).
    pub fn side_value(&self, key: &[u8]) -> Option<&KeyValue> {
        self.side.get(key).and_then(Option::as_ref)
    }

    /// Watches `[start, end)` from `from_revision` on instead, on this watch's stream if it
    /// still has one (one message; the old range's watch goes on on the stream, its events
    /// dropped), else on a new stream.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if a new watch cannot be created.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn move_to(
        self,
        start: impl Into<Vec<u8>>,
        end: impl Into<Vec<u8>>,
        from_revision: i64,
        prev_kv: bool,
    ) -> Result<Self, RendezvousError> {
        let (start, end) = (start.into(), end.into());
        if let Some(mut stream) = self.stream {
            let options = range_options(end.clone(), from_revision.max(1), prev_kv);
            self.client.stats().count_request();
            self.client.stats().count_watch_create();
            if stream.add_watch(start.clone(), options).await.is_ok() {
                return Ok(Self {
                    client: self.client,
                    start,
                    end,
                    next_revision: from_revision.max(1),
                    stream: Some(stream),
                    side: BTreeMap::new(),
                    stash: VecDeque::new(),
                    prev_kv,
                });
            }
        }
        Self::open_from(&self.client, start, end, from_revision, prev_kv).await
    }

    /// Takes in the messages the stream has received already, without waiting: the side keys'
    /// values are then up to date with them (the rest is kept for [`RangeWatch::next`]). etcd
    /// sends the events of one revision to each watch of a stream in no set order: a side
    /// key written with an event of the range may come just after it.
    pub fn absorb_ready(&mut self) {
        while let Some(stream) = self.stream.as_mut() {
            match stream.message().now_or_never() {
                None => return,
                Some(answer) => self.take_in(answer),
            }
        }
    }

    /// Waits, until `until` at the latest, for a value of the side key `key` that `wanted`
    /// accepts, taking in the stream's messages as [`RangeWatch::absorb_ready`] does (the
    /// range's events are kept for [`RangeWatch::next`]). Returns the last value of `key`
    /// seen: not a wanted one if time ran out or the stream broke.
    ///
    /// # Cancel safety
    /// Cancel safe: every message taken in is kept before the next wait.
    pub async fn await_side(
        &mut self,
        key: &[u8],
        until: tokio::time::Instant,
        wanted: impl Fn(&KeyValue) -> bool,
    ) -> Option<KeyValue> {
        loop {
            self.absorb_ready();
            let seen = self.side_value(key).cloned();
            if seen.as_ref().is_some_and(&wanted) {
                return seen;
            }
            let Some(stream) = self.stream.as_mut() else {
                return seen;
            };
            match tokio::time::timeout_at(until, stream.message()).await {
                Ok(answer) => self.take_in(answer),
                Err(_) => return seen,
            }
        }
    }

    /// Takes in one answer of the stream: a message is sorted out (side keys) and its range
    /// events stashed; a broken or ended stream is dropped (`next` re-opens it).
    fn take_in(&mut self, answer: Result<Option<WatchResponse>, super::api::ApiError>) {
        match answer {
            Ok(Some(resp)) => {
                let resp = if resp.compact_revision() > 0 || resp.canceled() {
                    resp
                } else {
                    self.sort_out(resp, true)
                };
                if resp.compact_revision() > 0 || resp.canceled() || !resp.events.is_empty() {
                    self.stash.push_back(resp);
                }
            }
            Ok(None) | Err(_) => self.stream = None,
        }
    }

    /// Counts a message's events (if `count`: not when stashed) and keeps those of the side
    /// keys; returns it with the events of the range only, without those yielded already
    /// (should two ranges overlap, or a re-opened stream deliver them again).
    fn sort_out(&mut self, resp: WatchResponse, count: bool) -> WatchResponse {
        if count {
            self.client.stats().count_watch_events(resp.events.len());
        }
        let mut events = resp.events;
        events.retain(|e| {
            if self.covers(e.kv.key()) {
                return e.kv.mod_revision() >= self.next_revision;
            }
            if let Some(seen) = self.side.get_mut(e.kv.key()) {
                *seen = (e.event_type() == EventType::Put).then(|| e.kv.clone());
            }
            false
        });
        WatchResponse { events, ..resp }
    }

    /// Whether `key` is in this watch's range.
    fn covers(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && key < self.end.as_slice()
    }

    /// The revision from which the next events will come.
    pub fn next_revision(&self) -> i64 {
        self.next_revision
    }

    async fn reopen(&mut self) -> Result<(), RendezvousError> {
        let options = range_options(self.end.clone(), self.next_revision, self.prev_kv);
        self.stream = Some(
            self.client
                .watch(self.start.clone(), Some(options))
                .await?
                .0,
        );
        Ok(())
    }

    /// Reads the range; the stream is re-opened after the snapshot by the next call. Nothing
    /// is awaited between moving past the snapshot and returning it, so a cancelled call
    /// loses nothing: cancelled during the read, the next call meets the compaction again
    /// and reads again.
    async fn resync(&mut self) -> Result<WatchItem, RendezvousError> {
        self.stream = None;
        let resp = self
            .client
            .get(
                self.start.clone(),
                Some(GetOptions::new().with_range(self.end.clone())),
            )
            .await?;
        let revision = resp.revision();
        self.next_revision = revision + 1;
        // The snapshot covers whatever was taken in before it.
        self.stash.clear();
        Ok(WatchItem::Resync {
            kvs: resp.kvs,
            revision,
        })
    }

    /// The next events (or a resync snapshot).
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if etcd is unreachable while re-opening (the caller
    /// may call again: the watch resumes where it was).
    ///
    /// # Cancel safety
    /// Cancel safe: no event is consumed by a cancelled call.
    pub async fn next(&mut self) -> Result<WatchItem, RendezvousError> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let stashed = !self.stash.is_empty();
            let answer = match self.stash.pop_front() {
                Some(resp) => Ok(Some(resp)),
                None => {
                    let Some(stream) = self.stream.as_mut() else {
                        self.reopen().await?;
                        continue;
                    };
                    stream.message().await
                }
            };
            match answer {
                Ok(Some(resp)) => {
                    if resp.compact_revision() > 0 {
                        tracing::debug!(
                            compact_revision = resp.compact_revision(),
                            "watch start revision compacted; re-reading the range"
                        );
                        return self.resync().await;
                    }
                    if resp.canceled() {
                        tracing::debug!(reason = %resp.cancel_reason, "watch cancelled by etcd");
                        self.stream = None;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                    if resp.events.is_empty() {
                        continue;
                    }
                    let resp = self.sort_out(resp, !stashed);
                    if resp.events.is_empty() {
                        continue;
                    }
                    tracing::trace!(
                        start = %String::from_utf8_lossy(&self.start),
                        events = resp.events.len(),
                        revision = resp.events.last().map(|e| e.kv.mod_revision),
                        "watch events"
                    );
                    if let Some(rev) = resp.events.last().map(|e| e.kv.mod_revision) {
                        self.next_revision = rev + 1;
                    }
                    return Ok(WatchItem::Events(resp.events));
                }
                Ok(None) | Err(_) => {
                    tracing::debug!("watch stream ended; re-opening");
                    self.stream = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// The options of a watch on `[start, end)` from `from_revision`, with previous values if
/// `prev_kv`.
fn range_options(end: Vec<u8>, from_revision: i64, prev_kv: bool) -> WatchOptions {
    let options = WatchOptions::new()
        .with_range(end)
        .with_start_revision(from_revision);
    if prev_kv {
        options.with_prev_kv()
    } else {
        options
    }
}
