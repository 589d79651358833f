//! The Watch service: events on a key range from a revision on.

use async_trait::async_trait;

use super::{ApiError, KeyValue};

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Created or changed.
    Put,
    /// Deleted (by a delete, a lease revocation or expiry).
    Delete,
}

/// One change of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub event_type: EventType,
    /// The key after the change (for a delete: the key and the deletion's revision).
    pub kv: KeyValue,
    /// The key before the change, if the watch asked for it
    /// ([`WatchOptions::with_prev_kv`]) and it existed.
    pub prev_kv: Option<KeyValue>,
}

impl Event {
    /// Put or delete.
    pub fn event_type(&self) -> EventType {
        self.event_type
    }

    /// The key-value (always present; an `Option` as in `etcd-client`).
    pub fn kv(&self) -> Option<&KeyValue> {
        Some(&self.kv)
    }
}

/// Where a watch starts and what it covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchOptions {
    pub(crate) range_end: Option<Vec<u8>>,
    pub(crate) start_revision: i64,
    pub(crate) prev_kv: bool,
}

impl WatchOptions {
    /// The single key, from now on.
    pub fn new() -> Self {
        Self::default()
    }

    /// The keys in `[key, end)`.
    pub fn with_range(mut self, end: impl Into<Vec<u8>>) -> Self {
        self.range_end = Some(end.into());
        self
    }

    /// From `revision` on (0: from the next revision).
    pub fn with_start_revision(mut self, revision: i64) -> Self {
        self.start_revision = revision;
        self
    }

    /// Events carry the key's previous value (a delete's record, for instance).
    pub fn with_prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }

    /// Whether events carry the key's previous value.
    pub fn prev_kv(&self) -> bool {
        self.prev_kv
    }

    /// The end of the range (`None`: the single key).
    pub fn range_end(&self) -> Option<&[u8]> {
        self.range_end.as_deref()
    }

    /// The start revision (0: the next one).
    pub fn start_revision(&self) -> i64 {
        self.start_revision
    }
}

/// A batch of events (or the news that the watch was cancelled).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchResponse {
    /// The store's revision when sent.
    pub revision: i64,
    /// Events in revision order.
    pub events: Vec<Event>,
    /// Non-zero if the start revision was compacted away (the watch is then cancelled).
    pub compact_revision: i64,
    /// True if etcd cancelled the watch.
    pub canceled: bool,
    /// Why it was cancelled.
    pub cancel_reason: String,
}

impl WatchResponse {
    /// Events in revision order.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Non-zero if the start revision was compacted away.
    pub fn compact_revision(&self) -> i64 {
        self.compact_revision
    }

    /// True if etcd cancelled the watch.
    pub fn canceled(&self) -> bool {
        self.canceled
    }
}

/// An open watch.
#[async_trait]
pub trait WatchStream: Send + std::fmt::Debug {
    /// The next batch; `Ok(None)` when the stream ended.
    ///
    /// # Errors
    /// [`ApiError`] when the stream broke.
    ///
    /// # Cancel safety
    /// Cancel safe: a batch is consumed only when returned.
    async fn message(&mut self) -> Result<Option<WatchResponse>, ApiError>;

    /// Adds a watch on `key` (and `options`' range, from its start revision) to this stream:
    /// its events come with the others, told apart by their keys, without a stream of its
    /// own. Sent, not awaited: the watch starts when etcd reads the request, and it ends
    /// with the stream.
    ///
    /// # Errors
    /// [`ApiError`] if the request cannot be sent (the stream is broken).
    ///
    /// # Cancel safety
    /// Cancel safe: the watch is added or not.
    async fn add_watch(&mut self, key: Vec<u8>, options: WatchOptions) -> Result<(), ApiError>;
}
