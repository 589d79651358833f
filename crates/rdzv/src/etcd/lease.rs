//! [`KeptLease`]: an etcd lease kept alive by a background task, with a local **fence**.
//!
//! The task renews the lease every third of its TTL and retries failed renewals at once (with
//! a short backoff), each attempt bounded so that a hung etcd member cannot hold it. The lease
//! is declared lost when etcd says it is gone, or — the fence — when no renewal has succeeded
//! for the TTL minus a tenth, counted on this node's monotonic clock from the moment the last
//! successful renewal was *sent*. etcd extends a lease from the moment it *receives* a renewal,
//! so a node always considers itself out before etcd can expire its lease and its peers can
//! re-form without it: a node cut off from etcd stops acting on its rank in time.
//!
//! The fence matters only while the node **acts** on a rank ([`KeptLease::set_acting`]). A
//! node lease starts out *waiting*: while the node waits for a round, a renewal that gets no
//! answer is retried without a fence, and only etcd's own "the lease is gone" loses it (an
//! overloaded etcd answers late; fencing waiting nodes then made thousands of them re-grant
//! leases at once, which overloaded it more). When the node is given a rank,
//! [`KeptLease::start_acting`] checks the fence at once: a node whose last renewal is older
//! than the fence renews now (retrying for up to a TTL), and takes no rank unless etcd
//! confirms its lease.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use super::client::EtcdClient;
use crate::RendezvousError;

/// What the keep-alive task and the lease's owner share.
#[derive(Debug)]
struct Shared {
    /// The send time of the last renewal etcd answered (or of the grant).
    renewed_at: Mutex<Instant>,
    /// Whether the node acts on a rank (the fence applies).
    acting: AtomicBool,
    acting_changed: Notify,
    lost: watch::Sender<bool>,
}

impl Shared {
    fn renewed_at(&self) -> Instant {
        *self
            .renewed_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A lease and the task that renews it.
#[derive(Debug)]
pub struct KeptLease {
    id: i64,
    ttl: Duration,
    client: EtcdClient,
    shared: Arc<Shared>,
    lost: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl KeptLease {
    /// Grants a node lease of `ttl_secs` and starts keeping it alive; it starts out waiting
    /// (no fence until [`KeptLease::start_acting`]).
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if the grant fails.
    ///
    /// # Cancel safety
    /// Cancel safe; a lease granted by a cancelled call expires by itself.
    pub async fn grant(client: &EtcdClient, ttl_secs: i64) -> Result<Self, RendezvousError> {
        let sent = Instant::now();
        let id = client.lease_grant(ttl_secs).await?;
        Ok(Self::keep_from(client, id, ttl_secs, sent, false))
    }

    /// Keeps an existing lease alive (its fence counts from now, and applies at once).
    pub fn keep(client: &EtcdClient, id: i64, ttl_secs: i64) -> Self {
        Self::keep_from(client, id, ttl_secs, Instant::now(), true)
    }

    fn keep_from(
        client: &EtcdClient,
        id: i64,
        ttl_secs: i64,
        valid_from: Instant,
        acting: bool,
    ) -> Self {
        let ttl = Duration::from_secs(ttl_secs.max(1) as u64);
        let (tx, lost) = watch::channel(false);
        let shared = Arc::new(Shared {
            renewed_at: Mutex::new(valid_from),
            acting: AtomicBool::new(acting),
            acting_changed: Notify::new(),
            lost: tx,
        });
        let task = tokio::spawn(
            keep_alive_loop(client.clone(), id, ttl, shared.clone()).in_current_span(),
        );
        Self {
            id,
            ttl,
            client: client.clone(),
            shared,
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

    /// True once the lease is lost (etcd said so, the fence passed, or it was marked).
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// A receiver that turns `true` when the lease is lost.
    pub fn lost_receiver(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// The node stops acting on a rank: while it waits, renewals that go unanswered do not
    /// fence it (only etcd's "gone" loses the lease).
    pub fn stop_acting(&self) {
        self.shared.acting.store(false, Ordering::SeqCst);
        self.shared.acting_changed.notify_one();
    }

    /// The node is about to act on a rank: from now on the fence applies. Returns false — and
    /// the lease is then lost — unless a renewal succeeded within the fence, or one sent now
    /// does: the node must not act.
    ///
    /// # Cancel safety
    /// Cancel safe: a cancelled call leaves the node waiting.
    pub async fn start_acting(&self) -> bool {
        if self.is_lost() {
            return false;
        }
        let fence = self.shared.renewed_at() + self.ttl - fence_margin(self.ttl);
        if Instant::now() >= fence {
            // The renewals went unanswered while the node waited (an overloaded etcd answers
            // late): ask etcd until it confirms the lease or says it is gone, for at most a
            // TTL. Its peers may already act; this node acts only once it knows.
            let give_up = Instant::now() + self.ttl;
            loop {
                let sent = Instant::now();
                let answer =
                    tokio::time::timeout(self.ttl / 3, self.client.lease_keep_alive(self.id)).await;
                match answer {
                    Ok(Ok(true)) => {
                        *self
                            .shared
                            .renewed_at
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = sent;
                        break;
                    }
                    Ok(Ok(false)) => {}
                    _ if Instant::now() < give_up => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    _ => {}
                }
                tracing::warn!(
                    lease = self.id,
                    "this node's lease went unrenewed for a TTL while it waited and etcd did \
                     not confirm it: its membership may be lost"
                );
                self.mark_lost();
                return false;
            }
        }
        self.shared.acting.store(true, Ordering::SeqCst);
        self.shared.acting_changed.notify_one();
        !self.is_lost()
    }

    /// Marks the lease lost (etcd refused a request with it: it is gone).
    pub fn mark_lost(&self) {
        self.shared.lost.send_replace(true);
        self.task.abort();
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

async fn keep_alive_loop(client: EtcdClient, id: i64, ttl: Duration, shared: Arc<Shared>) {
    let period = ttl / 3;
    let mut renewed_at = shared.renewed_at();
    let mut backoff = Duration::from_millis(50);
    let mut next = renewed_at + period;
    loop {
        // `start_acting` may have renewed it.
        renewed_at = renewed_at.max(shared.renewed_at());
        let acting = shared.acting.load(Ordering::SeqCst);
        let fence = renewed_at + ttl - fence_margin(ttl);
        let wake = if acting { next.min(fence) } else { next };
        // Biased (as every `select!` of the protocol): which branch wins when both are ready
        // must not depend on a random draw, or a simulated run would not replay exactly.
        tokio::select! {
            biased;
            // Acting or not changes the fence: look again.
            () = shared.acting_changed.notified() => continue,
            () = tokio::time::sleep_until(wake) => {}
        }
        let sent = Instant::now();
        let acting = shared.acting.load(Ordering::SeqCst);
        if acting && sent >= fence {
            tracing::warn!(
                lease = id,
                "no lease renewal succeeded within the TTL: this node's membership is lost"
            );
            break;
        }
        // One attempt may take at most a period (and, while acting, never past the fence), so
        // that a hung member is given up in time to try another.
        let bound = if acting {
            (sent + period).min(fence)
        } else {
            sent + period
        };
        let attempt = tokio::select! {
            biased;
            r = tokio::time::timeout_at(bound, client.lease_keep_alive(id)) => r,
            // Starting to act brings the fence in: an attempt bounded for a waiting node
            // must not outlive it.
            () = shared.acting_changed.notified() => {
                next = Instant::now();
                continue;
            }
        };
        match attempt {
            Ok(Ok(true)) => {
                renewed_at = sent;
                *shared
                    .renewed_at
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = sent;
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
    shared.lost.send_replace(true);
}
