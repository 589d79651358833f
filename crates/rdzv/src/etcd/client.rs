//! [`EtcdClient`]: the etcd client the backend uses, over any [`EtcdApi`] (a real cluster or
//! the simulator's model), counting every request it really sends ([`RequestStats`]) and
//! mapping every error to a [`RendezvousError`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::api::{
    ApiError, DeleteOptions, DeleteResponse, EtcdApi, GetOptions, GetResponse, GrpcEtcd,
    PutOptions, PutResponse, Txn, TxnOp, TxnResponse, WatchOptions, WatchStream,
};
use crate::RendezvousError;

pub use super::api::DEFAULT_REQUEST_TIMEOUT;

/// Counters of what a client really sent and received.
#[derive(Debug, Default)]
pub struct RequestStats {
    requests: AtomicU64,
    watch_creates: AtomicU64,
    watch_events: AtomicU64,
    keep_alives: AtomicU64,
    overloaded: AtomicU64,
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
    /// Requests etcd refused as overloaded (`too many requests`, its backpressure); they are
    /// retried.
    pub overloaded: u64,
}

impl StatsSnapshot {
    /// The difference `self - earlier`.
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.saturating_sub(earlier.requests),
            watch_creates: self.watch_creates.saturating_sub(earlier.watch_creates),
            watch_events: self.watch_events.saturating_sub(earlier.watch_events),
            keep_alives: self.keep_alives.saturating_sub(earlier.keep_alives),
            overloaded: self.overloaded.saturating_sub(earlier.overloaded),
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
            overloaded: self.overloaded.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_watch_create(&self) {
        self.watch_creates.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_watch_events(&self, n: usize) {
        self.watch_events.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn count_keep_alive(&self) {
        self.keep_alives.fetch_add(1, Ordering::Relaxed);
    }
}

/// Marks the connection errors worth retrying (etcd unavailable for a moment: no leader,
/// a member down, a request timed out, overloaded).
const UNAVAILABLE_MARK: &str = "etcd unavailable";

/// Marks etcd's backpressure ("too many requests": the request was not applied).
const OVERLOADED_MARK: &str = ": overloaded: ";

/// What etcd says of a lease that expired; we say it too.
pub(crate) const LEASE_GONE: &str = "requested lease not found";

/// Maps an API error to a rendezvous error; `what` says what we were doing.
pub fn map_api_err(what: &str, err: ApiError) -> RendezvousError {
    match err {
        ApiError::NotReached(m) | ApiError::Unavailable(m) => {
            RendezvousError::Connection(format!("{what}: {UNAVAILABLE_MARK}: {m}"))
        }
        ApiError::Overloaded(m) => {
            RendezvousError::Connection(format!("{what}: {UNAVAILABLE_MARK}{OVERLOADED_MARK}{m}"))
        }
        ApiError::LeaseNotFound => RendezvousError::Connection(format!("{what}: {LEASE_GONE}")),
        e => RendezvousError::Connection(format!("{what}: {e}")),
    }
}

/// Maps an `etcd-client` error to a rendezvous error; `what` says what we were doing.
pub fn map_grpc_err(what: &str, err: etcd_client::Error) -> RendezvousError {
    map_api_err(what, super::api::grpc::map_error(err))
}

/// True for errors that a retry may cure (see [`map_api_err`]).
pub fn is_transient(err: &RendezvousError) -> bool {
    matches!(err, RendezvousError::Connection(m) if m.contains(UNAVAILABLE_MARK))
}

/// True if etcd refused the request with its backpressure ("too many requests"): it was not
/// applied, and may be sent again as it is.
pub fn is_overloaded(err: &RendezvousError) -> bool {
    matches!(err, RendezvousError::Connection(m) if m.contains(OVERLOADED_MARK))
}

/// True if the error means that a lease (and so the keys bound to it) is gone.
pub fn is_lease_gone(err: &RendezvousError) -> bool {
    matches!(err, RendezvousError::Connection(m) if m.contains(LEASE_GONE))
}

/// An etcd client that counts what it sends. Cheap to clone; clones share the connection(s)
/// and the counters.
#[derive(Clone)]
pub struct EtcdClient {
    api: Arc<dyn EtcdApi>,
    stats: Arc<RequestStats>,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient")
            .field("api", &self.api)
            .field("stats", &self.stats.snapshot())
            .finish()
    }
}

impl EtcdClient {
    /// Wraps a connected `etcd-client` client (a single connection, no failover of our own).
    pub fn new(inner: etcd_client::Client) -> Self {
        Self::from_api(Arc::new(GrpcEtcd::new(vec![inner])), Arc::default())
    }

    /// Wraps a connected client, counting into `stats` (which may be shared).
    pub fn with_stats(inner: etcd_client::Client, stats: Arc<RequestStats>) -> Self {
        Self::from_api(Arc::new(GrpcEtcd::new(vec![inner])), stats)
    }

    /// A client over any implementation of the API, counting into `stats`.
    pub fn from_api(api: Arc<dyn EtcdApi>, stats: Arc<RequestStats>) -> Self {
        Self { api, stats }
    }

    /// The API this client sends to.
    pub fn api(&self) -> &Arc<dyn EtcdApi> {
        &self.api
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<RequestStats> {
        &self.stats
    }

    /// Maps an error of `what`, counting etcd's backpressure.
    fn fail(&self, what: &str, err: ApiError) -> RendezvousError {
        if matches!(err, ApiError::Overloaded(_)) {
            self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
        }
        map_api_err(what, err)
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
        self.api
            .range(key.into(), options.unwrap_or_default())
            .await
            .map_err(|e| self.fail("get", e))
    }

    /// Put request (a transaction without compares).
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
        let resp = self
            .txn_as(
                "put",
                Txn::new().and_then([TxnOp::put(key, value, options)]),
            )
            .await?;
        Ok(resp.put(0).cloned().unwrap_or_default())
    }

    /// Delete request (a transaction without compares).
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
        let resp = self
            .txn_as("delete", Txn::new().and_then([TxnOp::delete(key, options)]))
            .await?;
        Ok(match resp.op_responses().first() {
            Some(super::api::TxnOpResponse::Delete(d)) => d.clone(),
            _ => DeleteResponse::default(),
        })
    }

    /// Transaction.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`].
    ///
    /// # Cancel safety
    /// Cancel safe; the transaction may or may not have been applied.
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse, RendezvousError> {
        self.txn_as("transaction", txn).await
    }

    async fn txn_as(&self, what: &str, txn: Txn) -> Result<TxnResponse, RendezvousError> {
        self.stats.count_request();
        self.api.txn(txn).await.map_err(|e| self.fail(what, e))
    }

    /// Opens a watch; returns it with the revision it was created at.
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
    ) -> Result<(Box<dyn WatchStream>, i64), RendezvousError> {
        self.stats.count_request();
        self.stats.watch_creates.fetch_add(1, Ordering::Relaxed);
        self.api
            .watch(key.into(), options.unwrap_or_default())
            .await
            .map_err(|e| self.fail("watch", e))
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
        let grant = self
            .api
            .lease_grant(ttl_secs)
            .await
            .map_err(|e| self.fail("lease grant", e))?;
        Ok(grant.id)
    }

    /// Revokes a lease (deleting every key bound to it); a lease already gone is no error.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), RendezvousError> {
        self.stats.count_request();
        match self.api.lease_revoke(id).await {
            Ok(()) | Err(ApiError::LeaseNotFound) => Ok(()),
            Err(e) => Err(self.fail("lease revoke", e)),
        }
    }

    /// Renews a lease once; returns false if it no longer exists.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn lease_keep_alive(&self, id: i64) -> Result<bool, RendezvousError> {
        self.stats.count_keep_alive();
        match self.api.lease_keep_alive(id).await {
            Ok(ttl) => Ok(ttl > 0),
            Err(ApiError::LeaseNotFound) => Ok(false),
            Err(e) => Err(self.fail("lease keep-alive", e)),
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
        self.api
            .lease_time_to_live(id)
            .await
            .map_err(|e| self.fail("lease time-to-live", e))
    }

    /// Compacts etcd's history up to `revision`.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn compact(&self, revision: i64) -> Result<(), RendezvousError> {
        self.stats.count_request();
        self.api
            .compact(revision)
            .await
            .map_err(|e| self.fail("compact", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_api_errors_stay_transient() {
        for e in [
            ApiError::NotReached("x".into()),
            ApiError::Unavailable("x".into()),
            ApiError::Overloaded("x".into()),
        ] {
            assert!(is_transient(&map_api_err("get", e)));
        }
        assert!(!is_transient(&map_api_err(
            "get",
            ApiError::Unauthorized("x".into())
        )));
    }

    #[test]
    fn lease_not_found_reads_as_lease_gone() {
        let e = map_api_err("txn", ApiError::LeaseNotFound);
        assert!(is_lease_gone(&e));
        assert!(!is_transient(&e));
    }

    #[test]
    fn unauthorised_says_so() {
        let e = map_api_err("get", ApiError::Unauthorized("permission denied".into()));
        assert!(e.to_string().contains("not authorised"), "{e}");
    }
}
