//! [`EtcdClient`]: the etcd v3 client used by the backend, wrapped so that every request it
//! really sends is counted ([`RequestStats`]) and every error is mapped to a
//! [`RendezvousError`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use etcd_client::{
    Client, DeleteOptions, DeleteResponse, GetOptions, GetResponse, PutOptions, PutResponse, Txn,
    TxnResponse, WatchOptions, WatchStream,
};

use crate::RendezvousError;

/// Counters of what a client really sent and received.
#[derive(Debug, Default)]
pub struct RequestStats {
    requests: AtomicU64,
    watch_creates: AtomicU64,
    watch_events: AtomicU64,
    keep_alives: AtomicU64,
}

/// A snapshot of [`RequestStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Unary requests (get, put, delete, txn, lease grant/revoke/ttl) plus watch creations.
    pub requests: u64,
    /// Watch creations (included in `requests`).
    pub watch_creates: u64,
    /// Watch events received.
    pub watch_events: u64,
    /// Lease keep-alive messages sent (not included in `requests`).
    pub keep_alives: u64,
}

impl StatsSnapshot {
    /// The difference `self - earlier`.
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.saturating_sub(earlier.requests),
            watch_creates: self.watch_creates.saturating_sub(earlier.watch_creates),
            watch_events: self.watch_events.saturating_sub(earlier.watch_events),
            keep_alives: self.keep_alives.saturating_sub(earlier.keep_alives),
        }
    }
}

impl RequestStats {
    /// The current values.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            watch_creates: self.watch_creates.load(Ordering::Relaxed),
            watch_events: self.watch_events.load(Ordering::Relaxed),
            keep_alives: self.keep_alives.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_watch_events(&self, n: usize) {
        self.watch_events.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn count_keep_alive(&self) {
        self.keep_alives.fetch_add(1, Ordering::Relaxed);
    }
}

/// Maps an etcd client error to a rendezvous error; `what` says what we were doing.
pub fn map_err(what: &str, err: etcd_client::Error) -> RendezvousError {
    use etcd_client::Error as E;
    match &err {
        E::GRpcStatus(status) => {
            use tonic_code::*;
            let code = status.code() as i32;
            let msg = status.message();
            match code {
                UNAUTHENTICATED | PERMISSION_DENIED => RendezvousError::Connection(format!(
                    "{what}: etcd refused the request (not authorised): {msg}"
                )),
                UNAVAILABLE | DEADLINE_EXCEEDED | CANCELLED | ABORTED => {
                    RendezvousError::Connection(format!("{what}: etcd unavailable: {msg}"))
                }
                _ => RendezvousError::Connection(format!("{what}: etcd error: {msg}")),
            }
        }
        _ => RendezvousError::Connection(format!("{what}: {err}")),
    }
}

/// gRPC status codes (stable numbers of the gRPC spec).
mod tonic_code {
    pub const CANCELLED: i32 = 1;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const ABORTED: i32 = 10;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}

/// An etcd client that counts what it sends. Cheap to clone; clones share the counters.
#[derive(Clone)]
pub struct EtcdClient {
    inner: Client,
    stats: Arc<RequestStats>,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient")
            .field("stats", &self.stats.snapshot())
            .finish()
    }
}

impl EtcdClient {
    /// Wraps a connected client.
    pub fn new(inner: Client) -> Self {
        Self::with_stats(inner, Arc::default())
    }

    /// Wraps a connected client, counting into `stats` (which may be shared).
    pub fn with_stats(inner: Client, stats: Arc<RequestStats>) -> Self {
        Self { inner, stats }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<RequestStats> {
        &self.stats
    }

    /// The underlying client (requests sent through it are not counted).
    pub fn raw(&self) -> &Client {
        &self.inner
    }

    /// Range request.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn get(
        &self,
        key: impl Into<Vec<u8>>,
        options: Option<GetOptions>,
    ) -> Result<GetResponse, RendezvousError> {
        self.stats.count_request();
        self.inner
            .kv_client()
            .get(key, options)
            .await
            .map_err(|e| map_err("get", e))
    }

    /// Put request.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`].
    ///
    /// # Cancel safety
    /// Cancel safe; the put may or may not have happened.
    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        options: Option<PutOptions>,
    ) -> Result<PutResponse, RendezvousError> {
        self.stats.count_request();
        self.inner
            .kv_client()
            .put(key, value, options)
            .await
            .map_err(|e| map_err("put", e))
    }

    /// Delete request.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`].
    ///
    /// # Cancel safety
    /// Cancel safe; the delete may or may not have happened.
    pub async fn delete(
        &self,
        key: impl Into<Vec<u8>>,
        options: Option<DeleteOptions>,
    ) -> Result<DeleteResponse, RendezvousError> {
        self.stats.count_request();
        self.inner
            .kv_client()
            .delete(key, options)
            .await
            .map_err(|e| map_err("delete", e))
    }

    /// Transaction.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`].
    ///
    /// # Cancel safety
    /// Cancel safe; the transaction may or may not have been applied.
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse, RendezvousError> {
        self.stats.count_request();
        self.inner
            .kv_client()
            .txn(txn)
            .await
            .map_err(|e| map_err("transaction", e))
    }

    /// Opens a watch stream.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn watch(
        &self,
        key: impl Into<Vec<u8>>,
        options: Option<WatchOptions>,
    ) -> Result<WatchStream, RendezvousError> {
        self.stats.count_request();
        self.stats.watch_creates.fetch_add(1, Ordering::Relaxed);
        self.inner
            .watch_client()
            .watch(key, options)
            .await
            .map_err(|e| map_err("watch", e))
    }

    /// Grants a lease of `ttl_secs` seconds; returns its id.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`].
    ///
    /// # Cancel safety
    /// Cancel safe; a lease granted by a cancelled call expires by itself.
    pub async fn lease_grant(&self, ttl_secs: i64) -> Result<i64, RendezvousError> {
        self.stats.count_request();
        let resp = self
            .inner
            .lease_client()
            .grant(ttl_secs, None)
            .await
            .map_err(|e| map_err("lease grant", e))?;
        Ok(resp.id())
    }

    /// Revokes a lease (deleting every key bound to it).
    ///
    /// # Errors
    /// [`RendezvousError::Connection`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), RendezvousError> {
        self.stats.count_request();
        match self.inner.lease_client().revoke(id).await {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("not found") => Ok(()),
            Err(e) => Err(map_err("lease revoke", e)),
        }
    }

    /// The remaining TTL of a lease in seconds, or `None` if it no longer exists.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn lease_ttl(&self, id: i64) -> Result<Option<i64>, RendezvousError> {
        self.stats.count_request();
        let resp = self
            .inner
            .lease_client()
            .time_to_live(id, None)
            .await
            .map_err(|e| map_err("lease time-to-live", e))?;
        Ok((resp.ttl() > 0).then_some(resp.ttl()))
    }
}
