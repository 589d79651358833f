//! The [`RendezvousHandler`] trait, the [`RendezvousInfo`] a completed round returns, and the
//! [`MembershipEvent`]s a launcher can await.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::{RendezvousError, Store};

/// The outcome of a completed round, for this node.
#[derive(Debug, Clone)]
pub struct RendezvousInfo {
    /// This node's rank in the round (the group rank), in `0..world_size`.
    pub rank: usize,
    /// The number of nodes in the round.
    pub world_size: usize,
    /// The round number; every member of the round sees the same one.
    pub round: u64,
    /// A store scoped to this run and round.
    pub store: Arc<dyn Store>,
    /// Where this node's workers sit among all the round's workers, when every member said
    /// how many it runs (a launcher's `local_world_size`): torchrun's layout, each node's
    /// global ranks after those of the nodes before it in rank order.
    pub global_ranks: Option<GlobalRanks>,
}

/// This node's global ranks: `first..first + its local world size`, of `world_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalRanks {
    /// The first global rank of this node's workers.
    pub first: usize,
    /// The number of workers of the round (the sum of the members' local world sizes).
    pub world_size: usize,
}

/// Something that happened to the membership of this node's last completed round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A member of the round left gracefully (`shutdown()`).
    PeerLeft {
        /// The round.
        round: u64,
        /// The member's node id.
        node_id: String,
    },
    /// A member of the round is gone without saying so (its lease expired: it died, hung or
    /// lost etcd).
    PeerLost {
        /// The round.
        round: u64,
        /// The lost member's node id.
        node_id: String,
    },
    /// The number of nodes waiting to join the next round changed (and is now this).
    NodesWaiting {
        /// The round.
        round: u64,
        /// How many nodes wait.
        waiting: usize,
    },
    /// The next round completed without this node: it must re-rendezvous.
    RoundSuperseded {
        /// The round this node is in.
        round: u64,
    },
    /// This node's own lease was lost (e.g. etcd unreachable for longer than its TTL).
    MembershipLost {
        /// The round.
        round: u64,
    },
    /// The run was closed.
    Closed,
}

/// A rendezvous backend, as PyTorch's `RendezvousHandler` (Rust names for its methods).
#[async_trait]
pub trait RendezvousHandler: Send + Sync + std::fmt::Debug {
    /// The backend name, e.g. `"etcd"`.
    fn backend(&self) -> &str;

    /// The run id.
    fn run_id(&self) -> &str;

    /// Joins the next round and waits until it is complete.
    ///
    /// # Errors
    /// [`RendezvousError::Closed`] if the run is or becomes closed, [`RendezvousError::Timeout`]
    /// after the configured timeout, [`RendezvousError::Connection`] or
    /// [`RendezvousError::State`] for backend failures.
    ///
    /// # Cancel safety
    /// Not cancel safe: a cancelled call may leave this node registered in the open round until
    /// its lease expires or the next call replaces it.
    async fn next_rendezvous(&self) -> Result<RendezvousInfo, RendezvousError>;

    /// True if the run is closed.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if the backend cannot be asked.
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn is_closed(&self) -> Result<bool, RendezvousError>;

    /// Closes the run: every pending and later [`RendezvousHandler::next_rendezvous`] fails
    /// with [`RendezvousError::Closed`].
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if the backend fails.
    ///
    /// # Cancel safety
    /// Cancel safe; the run may or may not be closed after a cancelled call.
    async fn set_closed(&self) -> Result<(), RendezvousError>;

    /// How many nodes wait to join the next round (cheap: launchers poll it).
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if the backend had to be asked and failed.
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn num_nodes_waiting(&self) -> Result<usize, RendezvousError>;

    /// Leaves the rendezvous without closing the run for the others; true on success.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if the backend fails.
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn shutdown(&self) -> Result<bool, RendezvousError>;

    /// Membership events of the last completed round, if the backend pushes them.
    fn subscribe(&self) -> Option<broadcast::Receiver<MembershipEvent>> {
        None
    }
}
