//! [`KeptLease`]: an etcd lease kept alive by a background task, with a local **fence**.
//!
//! The task renews the lease every third of its TTL and retries failed renewals at once (with
//! a short backoff), each attempt bounded so that a hung etcd member cannot hold it. The lease
//! is declared lost when etcd says it is gone, or — the fence — when no renewal has succeeded
//! for the TTL minus a tenth, counted on this node's monotonic clock from the moment the last
//! successful renewal was *sent*. etcd extends a lease from the moment it *receives* a renewal,
//! so a node always considers itself out before etcd can expire its lease and its peers can
//! re-form without it: a node cut off from etcd stops acting on its rank in time.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use super::client::EtcdClient;
use crate::RendezvousError;

/// A lease and the task that renews it.
#[derive(Debug)]
pub struct KeptLease {
    id: i64,
    ttl: Duration,
    lost: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl KeptLease {
    /// Grants a lease of `ttl_secs` and starts keeping it alive.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if the grant fails.
    ///
    /// # Cancel safety
    /// Cancel safe; a lease granted by a cancelled call expires by itself.
    pub async fn grant(client: &EtcdClient, ttl_secs: i64) -> Result<Self, RendezvousError> {
        let sent = Instant::now();
        let id = client.lease_grant(ttl_secs).await?;
        Ok(Self::keep_from(client, id, ttl_secs, sent))
    }

    /// Keeps an existing lease alive (its fence counts from now).
    pub fn keep(client: &EtcdClient, id: i64, ttl_secs: i64) -> Self {
        Self::keep_from(client, id, ttl_secs, Instant::now())
    }

    fn keep_from(client: &EtcdClient, id: i64, ttl_secs: i64, valid_from: Instant) -> Self {
        let ttl = Duration::from_secs(ttl_secs.max(1) as u64);
        let (tx, lost) = watch::channel(false);
        let task = tokio::spawn(
            keep_alive_loop(client.clone(), id, ttl, valid_from, tx).in_current_span(),
        );
        Self {
            id,
            ttl,
            lost,
            task,
        }
    }

    /// The lease id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// True once the lease is lost (etcd said so, or the fence passed).
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// A receiver that turns `true` when the lease is lost.
    pub fn lost_receiver(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// Stops renewing (the lease then expires after its TTL).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for KeptLease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long before etcd could expire the lease the node fences itself.
pub fn fence_margin(ttl: Duration) -> Duration {
    ttl / 10
}

async fn keep_alive_loop(
    client: EtcdClient,
    id: i64,
    ttl: Duration,
    valid_from: Instant,
    lost: watch::Sender<bool>,
) {
    let period = ttl / 3;
    // The send time of the last renewal etcd answered (or of the grant).
    let mut renewed_at = valid_from;
    let mut backoff = Duration::from_millis(50);
    let mut next = renewed_at + period;
    loop {
        let fence = renewed_at + ttl - fence_margin(ttl);
        tokio::time::sleep_until(next.min(fence)).await;
        let sent = Instant::now();
        if sent >= fence {
            tracing::warn!(
                lease = id,
                "no lease renewal succeeded within the TTL: this node's membership is lost"
            );
            break;
        }
        // One attempt may take at most a period (and never past the fence), so that a hung
        // member is given up in time to try another.
        let bound = (sent + period).min(fence);
        match tokio::time::timeout_at(bound, client.lease_keep_alive(id)).await {
            Ok(Ok(true)) => {
                renewed_at = sent;
                backoff = Duration::from_millis(50);
                next = sent + period;
            }
            Ok(Ok(false)) => {
                tracing::warn!(lease = id, "etcd says the lease is gone");
                break;
            }
            Ok(Err(e)) => {
                tracing::debug!(lease = id, error = %e, "lease renewal failed; retrying");
                next = Instant::now() + backoff;
                backoff = (backoff * 2).min(period / 2);
            }
            Err(_) => {
                tracing::debug!(lease = id, "lease renewal got no answer in time; retrying");
                next = Instant::now();
            }
        }
    }
    let _ = lost.send(true);
}
