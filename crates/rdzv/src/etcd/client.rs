//! [`EtcdClient`]: the etcd v3 client used by the backend, wrapped so that every request it
//! really sends is counted ([`RequestStats`]), every error is mapped to a
//! [`RendezvousError`], and a dead cluster member is skipped.
//!
//! # Failover
//! The client holds one connection per endpoint and sends each request to the current one. A
//! request that never reached a server (connection refused or reset) is sent to the next
//! endpoint at once, and that one becomes current; a server-side "unavailable" (no leader,
//! timed out) also moves to the next endpoint, but is returned to the caller, who decides
//! whether the operation is safe to retry. (A single balanced channel over all endpoints keeps
//! routing some requests to a dead member.)

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use etcd_client::{
    Client, DeleteOptions, DeleteResponse, GetOptions, GetResponse, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, PutResponse, Txn, TxnResponse, WatchOptions, WatchStream,
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
                _ if is_transport_message(msg) => {
                    RendezvousError::Connection(format!("{what}: {UNAVAILABLE_MARK}: {msg}"))
                }
                UNAVAILABLE | DEADLINE_EXCEEDED | CANCELLED | ABORTED => {
                    RendezvousError::Connection(format!("{what}: {UNAVAILABLE_MARK}: {msg}"))
                }
                _ => RendezvousError::Connection(format!("{what}: etcd error: {msg}")),
            }
        }
        E::TransportError(_) | E::IoError(_) => {
            RendezvousError::Connection(format!("{what}: {UNAVAILABLE_MARK}: {err}"))
        }
        _ => RendezvousError::Connection(format!("{what}: {err}")),
    }
}

/// Marks the connection errors worth retrying (etcd unavailable for a moment: no leader,
/// a member down, a request timed out).
const UNAVAILABLE_MARK: &str = "etcd unavailable";

/// True for errors that a retry may cure (see [`map_err`]).
pub fn is_transient(err: &RendezvousError) -> bool {
    matches!(err, RendezvousError::Connection(m) if m.contains(UNAVAILABLE_MARK))
}

/// True if the request certainly did not reach an etcd server (refused, reset, no connection):
/// sending it elsewhere cannot apply it twice.
fn not_reached(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            (status.code() as i32 == tonic_code::UNAVAILABLE
                && !status.message().starts_with("etcdserver:"))
                || is_transport_message(status.message())
        }
        _ => false,
    }
}

/// tonic reports a connection that failed under a request as `Unknown: transport error`.
fn is_transport_message(message: &str) -> bool {
    message.starts_with("transport error")
}

/// True if the server answered that it cannot serve now (no leader, request timed out).
fn server_unavailable(err: &etcd_client::Error) -> bool {
    matches!(err, etcd_client::Error::GRpcStatus(status)
        if status.message().starts_with("etcdserver:")
            && (status.code() as i32 == tonic_code::UNAVAILABLE
                || status.message().contains("leader")
                || status.message().contains("timed out")))
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

/// An etcd client that counts what it sends and fails over between endpoints. Cheap to
/// clone; clones share the connections, the current endpoint and the counters.
#[derive(Clone)]
pub struct EtcdClient {
    clients: Arc<Vec<Client>>,
    current: Arc<AtomicUsize>,
    stats: Arc<RequestStats>,
    request_timeout: std::time::Duration,
}

/// The default bound on one request (a member cut off from its leader otherwise holds a
/// request for etcd's own timeout, 5 s plus two election timeouts).
pub const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient")
            .field("endpoints", &self.clients.len())
            .field("current", &self.current.load(Ordering::Relaxed))
            .field("stats", &self.stats.snapshot())
            .finish()
    }
}

impl EtcdClient {
    /// Wraps a connected client (a single connection, no failover of our own).
    pub fn new(inner: Client) -> Self {
        Self::with_stats(inner, Arc::default())
    }

    /// Wraps a connected client, counting into `stats` (which may be shared).
    pub fn with_stats(inner: Client, stats: Arc<RequestStats>) -> Self {
        Self::from_clients(vec![inner], stats)
    }

    /// One client per endpoint, with failover between them (see the module docs).
    ///
    /// # Panics
    /// Never; an empty list is replaced by nothing to fail over to, and every call errors.
    pub fn from_clients(clients: Vec<Client>, stats: Arc<RequestStats>) -> Self {
        Self {
            clients: Arc::new(clients),
            current: Arc::new(AtomicUsize::new(0)),
            stats,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Bounds every request (not the life of a watch or keep-alive stream) by `timeout`; a
    /// request that takes longer fails as "etcd unavailable" and the next endpoint becomes
    /// current.
    pub fn with_request_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<RequestStats> {
        &self.stats
    }

    /// The client of the current endpoint (requests sent through it are not counted).
    pub fn raw(&self) -> &Client {
        &self.clients[self.current.load(Ordering::Relaxed) % self.clients.len()]
    }

    /// Number of endpoints.
    pub fn endpoint_count(&self) -> usize {
        self.clients.len()
    }

    /// Sends one request, failing over to the next endpoint as the module docs say.
    async fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T, RendezvousError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.clients.len();
        if n == 0 {
            return Err(RendezvousError::Connection(format!(
                "{what}: no etcd endpoint"
            )));
        }
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            let answer =
                match tokio::time::timeout(self.request_timeout, op(self.clients[idx].clone()))
                    .await
                {
                    Ok(answer) => answer,
                    Err(_) => {
                        if n > 1 {
                            self.current.store((idx + 1) % n, Ordering::Relaxed);
                        }
                        return Err(RendezvousError::Connection(format!(
                            "{what}: {UNAVAILABLE_MARK}: no answer within {:?}",
                            self.request_timeout
                        )));
                    }
                };
            match answer {
                Ok(v) => {
                    if i > 0 {
                        self.current.store(idx, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Err(e) if not_reached(&e) && n > 1 => {
                    tracing::debug!(endpoint = idx, error = %e, "{what}: endpoint unreachable; trying the next");
                    last = Some(e);
                }
                Err(e) => {
                    if server_unavailable(&e) && n > 1 {
                        self.current.store((idx + 1) % n, Ordering::Relaxed);
                    }
                    return Err(map_err(what, e));
                }
            }
        }
        self.current.store((start + 1) % n, Ordering::Relaxed);
        Err(match last {
            Some(e) => map_err(what, e),
            None => RendezvousError::Connection(format!("{what}: no etcd endpoint answered")),
        })
    }

    /// Opens a lease keep-alive stream.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn lease_keep_alive(
        &self,
        id: i64,
    ) -> Result<(LeaseKeeper, LeaseKeepAliveStream), RendezvousError> {
        self.stats.count_keep_alive();
        self.call("lease keep-alive", |c| async move {
            c.lease_client().keep_alive(id).await
        })
        .await
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
        let key = key.into();
        self.call("get", |c| {
            let (key, options) = (key.clone(), options.clone());
            async move { c.kv_client().get(key, options).await }
        })
        .await
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
        let (key, value) = (key.into(), value.into());
        self.call("put", |c| {
            let (key, value, options) = (key.clone(), value.clone(), options.clone());
            async move { c.kv_client().put(key, value, options).await }
        })
        .await
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
        let key = key.into();
        self.call("delete", |c| {
            let (key, options) = (key.clone(), options.clone());
            async move { c.kv_client().delete(key, options).await }
        })
        .await
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
        self.call("transaction", |c| {
            let txn = txn.clone();
            async move { c.kv_client().txn(txn).await }
        })
        .await
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
        let key = key.into();
        self.call("watch", |c| {
            let (key, options) = (key.clone(), options.clone());
            async move { c.watch_client().watch(key, options).await }
        })
        .await
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
            .call("lease grant", |c| async move {
                c.lease_client().grant(ttl_secs, None).await
            })
            .await?;
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
        match self
            .call("lease revoke", |c| async move {
                c.lease_client().revoke(id).await
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(RendezvousError::Connection(m)) if m.contains("not found") => Ok(()),
            Err(e) => Err(e),
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
            .call("lease time-to-live", |c| async move {
                c.lease_client().time_to_live(id, None).await
            })
            .await?;
        Ok((resp.ttl() > 0).then_some(resp.ttl()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code, msg: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg))
    }

    /// Regression: a request on a connection to a killed cluster member failed with
    /// `Unknown: transport error`, which was neither retried on the next endpoint nor treated
    /// as transient, so `next_rendezvous` failed instead of failing over.
    #[test]
    fn transport_error_on_a_dead_member_is_retried_elsewhere_and_transient() {
        let e = status(tonic::Code::Unknown, "transport error");
        assert!(not_reached(&e));
        assert!(is_transient(&map_err("watch", e)));
    }

    #[test]
    fn connection_refused_is_not_reached_and_transient() {
        let e = status(tonic::Code::Unavailable, "tcp connect error");
        assert!(not_reached(&e));
        assert!(is_transient(&map_err("get", e)));
    }

    #[test]
    fn server_timeout_may_have_applied_so_it_is_not_resent_but_is_transient() {
        let e = status(tonic::Code::Unavailable, "etcdserver: request timed out");
        assert!(!not_reached(&e));
        assert!(server_unavailable(&e));
        assert!(is_transient(&map_err("txn", e)));
    }

    #[test]
    fn permission_denied_is_not_transient_and_says_not_authorised() {
        let e = map_err(
            "get",
            status(
                tonic::Code::PermissionDenied,
                "etcdserver: permission denied",
            ),
        );
        assert!(!is_transient(&e));
        assert!(e.to_string().contains("not authorised"), "{e}");
    }
}
