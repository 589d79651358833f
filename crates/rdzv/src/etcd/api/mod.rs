//! The etcd v3 API as the protocol sees it: an [`EtcdApi`] trait over rdzv's own request and
//! response types (one module per etcd service: [`kv`], [`watch`]; leases are a few plain
//! calls), implemented by [`GrpcEtcd`] on a real etcd cluster and by the simulator's in-memory
//! model ([`crate::sim`]). Everything the rendezvous decides goes through this trait, so the
//! code that ships is the code the simulator runs.

pub(crate) mod grpc;
pub mod kv;
pub mod watch;

use async_trait::async_trait;

pub use grpc::{GrpcEtcd, DEFAULT_REQUEST_TIMEOUT};
pub use kv::{
    prefix_end_bytes, Compare, CompareOp, CompareTarget, DeleteOptions, DeleteResponse, GetOptions,
    GetResponse, KeyValue, PutOptions, PutResponse, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
pub use watch::{Event, EventType, WatchOptions, WatchResponse, WatchStream};

/// How an etcd request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The request certainly did not reach a server (connection refused or reset before it was
    /// sent): sending it again, anywhere, cannot apply it twice.
    #[error("etcd unreachable: {0}")]
    NotReached(String),
    /// No answer in time, or the server could not serve it (no leader, timed out): the request
    /// may or may not have been applied.
    #[error("etcd unavailable: {0}")]
    Unavailable(String),
    /// etcd refused the request because it is overloaded ("too many requests"); not applied.
    #[error("etcd overloaded: {0}")]
    Overloaded(String),
    /// Authentication or permission refused.
    #[error("etcd refused the request (not authorised): {0}")]
    Unauthorized(String),
    /// The lease does not exist (expired or revoked).
    #[error("requested lease not found")]
    LeaseNotFound,
    /// The requested revision was compacted away.
    #[error("required revision has been compacted")]
    Compacted,
    /// Anything else etcd answered (a malformed request, a limit exceeded, ...).
    #[error("etcd error: {0}")]
    Other(String),
}

impl ApiError {
    /// True if trying again later may succeed (unreachable, unavailable, overloaded).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::NotReached(_) | Self::Unavailable(_) | Self::Overloaded(_)
        )
    }
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseGrant {
    /// The lease id.
    pub id: i64,
    /// The TTL etcd granted, in seconds (etcd may raise a short one to its minimum).
    pub ttl: i64,
}

/// The subset of etcd's v3 API rdzv uses. Implementations: [`GrpcEtcd`] (a real cluster, with
/// failover between its members) and the simulator's model.
///
/// Every method is one request (a keep-alive is one renewal), cancel safe in the sense that a
/// cancelled call may or may not have been applied, like any request whose answer is lost.
#[async_trait]
pub trait EtcdApi: Send + Sync + std::fmt::Debug {
    /// Reads a key or a range.
    ///
    /// # Errors
    /// [`ApiError`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn range(&self, key: Vec<u8>, options: GetOptions) -> Result<GetResponse, ApiError>;

    /// Runs a transaction (puts and deletes are transactions without compares).
    ///
    /// # Errors
    /// [`ApiError`]; [`ApiError::LeaseNotFound`] if a put of the branch taken names a lease
    /// that does not exist (nothing is applied then).
    ///
    /// # Cancel safety
    /// Cancel safe; the transaction may or may not have been applied.
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, ApiError>;

    /// Grants a lease of `ttl` seconds.
    ///
    /// # Errors
    /// [`ApiError`].
    ///
    /// # Cancel safety
    /// Cancel safe; a lease granted by a cancelled call expires by itself.
    async fn lease_grant(&self, ttl: i64) -> Result<LeaseGrant, ApiError>;

    /// Revokes a lease, deleting its keys.
    ///
    /// # Errors
    /// [`ApiError::LeaseNotFound`] if it does not exist; other [`ApiError`]s.
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn lease_revoke(&self, id: i64) -> Result<(), ApiError>;

    /// Renews a lease once; returns a positive TTL (in seconds, or 1 if unknown) while it exists,
    /// 0 if it no longer does.
    ///
    /// # Errors
    /// [`ApiError`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn lease_keep_alive(&self, id: i64) -> Result<i64, ApiError>;

    /// The remaining TTL of a lease in seconds, or `None` if it no longer exists.
    ///
    /// # Errors
    /// [`ApiError`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn lease_time_to_live(&self, id: i64) -> Result<Option<i64>, ApiError>;

    /// Opens a watch; returns it once etcd has created it, with the revision etcd created it
    /// at (with no start revision, every change after that revision is delivered).
    ///
    /// # Errors
    /// [`ApiError`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn watch(
        &self,
        key: Vec<u8>,
        options: WatchOptions,
    ) -> Result<(Box<dyn WatchStream>, i64), ApiError>;

    /// Compacts the history up to `revision` (for tests and operators).
    ///
    /// # Errors
    /// [`ApiError`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn compact(&self, revision: i64) -> Result<(), ApiError>;
}
