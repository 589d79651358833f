//! [`RangeWatch`]: a watch on a key range that survives broken streams and compaction.
//!
//! Events are delivered from a start revision on. If the stream breaks, the watch is re-opened
//! from the revision after the last event seen, so nothing is missed. If etcd has compacted that
//! revision away, the watch re-reads the range instead and yields a [`WatchItem::Resync`]
//! snapshot, from which the caller rebuilds its view (as kube-rs' watcher does).

use std::time::Duration;

use super::api::{Event, GetOptions, KeyValue, WatchOptions, WatchStream};
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
#[derive(Debug)]
pub struct RangeWatch {
    client: EtcdClient,
    start: Vec<u8>,
    end: Vec<u8>,
    next_revision: i64,
    stream: Option<Box<dyn WatchStream>>,
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
        let mut watch = Self {
            client: client.clone(),
            start: start.into(),
            end: end.into(),
            next_revision: from_revision.max(1),
            stream: None,
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
        };
        Ok((watch, revision))
    }

    /// The revision from which the next events will come.
    pub fn next_revision(&self) -> i64 {
        self.next_revision
    }

    async fn reopen(&mut self) -> Result<(), RendezvousError> {
        let options = WatchOptions::new()
            .with_range(self.end.clone())
            .with_start_revision(self.next_revision);
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
            let Some(stream) = self.stream.as_mut() else {
                self.reopen().await?;
                continue;
            };
            match stream.message().await {
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
                    self.client.stats().count_watch_events(resp.events.len());
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
