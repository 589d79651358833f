//! Waiting for the membership event that ends a round for this node (shared by `rdzv run` and
//! `rdzv join`).

use rdzv::MembershipEvent;
use tokio::sync::broadcast;

/// What ended the round for this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoundEnd {
    /// The run was closed.
    Closed,
    /// The membership changed: a new round is needed (the reason, for the logs).
    Changed(String),
}

/// Waits for the first event that ends `current` for this node: the run closed, a peer lost or
/// left, a newer round, this node's own lease lost (its workers must stop), events missed, and
/// — if `waiting_counts` — nodes waiting to join.
///
/// # Cancel safety
/// Cancel safe: events before the relevant one are consumed and ignored.
pub async fn round_end(
    events: &mut broadcast::Receiver<MembershipEvent>,
    current: u64,
    waiting_counts: bool,
) -> RoundEnd {
    loop {
        match events.recv().await {
            Ok(MembershipEvent::Closed) | Err(broadcast::error::RecvError::Closed) => {
                return RoundEnd::Closed
            }
            Ok(MembershipEvent::PeerLost { round, node_id }) if round == current => {
                return RoundEnd::Changed(format!("node {node_id} was lost (lease expired)"));
            }
            Ok(MembershipEvent::PeerLeft { round, node_id }) if round == current => {
                return RoundEnd::Changed(format!("node {node_id} left"));
            }
            Ok(MembershipEvent::NodesWaiting { round, waiting })
                if waiting_counts && round == current && waiting > 0 =>
            {
                return RoundEnd::Changed(format!("{waiting} node(s) waiting to join"));
            }
            Ok(MembershipEvent::RoundSuperseded { round }) if round == current => {
                return RoundEnd::Changed("a newer round completed".into());
            }
            Ok(MembershipEvent::MembershipLost { round }) if round == current => {
                return RoundEnd::Changed(
                    "this node's lease was lost (no renewal within its TTL)".into(),
                );
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                // Events were lost: a peer loss may be among them. A new round is safe.
                return RoundEnd::Changed(format!("{n} membership events were missed"));
            }
            Ok(_) => {}
        }
    }
}
