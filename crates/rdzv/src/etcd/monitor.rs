//! The membership monitor: after a round completes, one watch per member reports lost peers,
//! nodes waiting for the next round, and closing, as [`MembershipEvent`]s.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use super::client::EtcdClient;
use super::keys::RunKeys;
use super::records::{decode, Assignment};
use super::watch::{RangeWatch, WatchItem};
use crate::{MembershipEvent, RendezvousError};

/// What the monitor of one round needs.
#[derive(Debug)]
pub(crate) struct MonitorArgs {
    pub client: EtcdClient,
    pub keys: RunKeys,
    pub round: u64,
    pub node_id: String,
    pub token: String,
    pub from_revision: i64,
    pub events: broadcast::Sender<MembershipEvent>,
    pub waiting: Arc<AtomicUsize>,
    pub lease_lost: watch::Receiver<bool>,
}

/// Starts the monitor; abort the handle to stop it.
pub(crate) fn spawn_monitor(args: MonitorArgs) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        let mut state = MonitorState::default();
        let mut args = args;
        loop {
            match run(&mut args, &mut state).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(round = args.round, error = %e, "membership watch failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    })
}

#[derive(Debug, Default)]
struct MonitorState {
    lost: BTreeSet<String>,
    waiting: BTreeSet<String>,
    next_revision: i64,
}

impl MonitorArgs {
    fn emit(&self, event: MembershipEvent) {
        tracing::debug!(?event, "membership event");
        let _ = self.events.send(event);
    }

    async fn is_member(&self, node_id: &str) -> Result<bool, RendezvousError> {
        let resp = self
            .client
            .get(self.keys.assign(self.round, node_id), None)
            .await?;
        Ok(match resp.kvs().first() {
            Some(kv) => decode::<Assignment>(kv.key(), kv.value())?.token == self.token,
            None => false,
        })
    }

    fn set_waiting(&self, state: &MonitorState) {
        let n = state.waiting.len();
        if self.waiting.swap(n, Ordering::Relaxed) != n {
            self.emit(MembershipEvent::NodesWaiting {
                round: self.round,
                waiting: n,
            });
        }
    }

    async fn peer_gone(
        &self,
        state: &mut MonitorState,
        node_id: &str,
    ) -> Result<(), RendezvousError> {
        if node_id != self.node_id
            && !state.lost.contains(node_id)
            && self.is_member(node_id).await?
        {
            state.lost.insert(node_id.to_string());
            self.emit(MembershipEvent::PeerLost {
                round: self.round,
                node_id: node_id.to_string(),
            });
        }
        Ok(())
    }
}

/// Watches until aborted; returns `Err` to be restarted.
async fn run(args: &mut MonitorArgs, state: &mut MonitorState) -> Result<(), RendezvousError> {
    let (start, end) = args.keys.membership_range(args.round);
    let from = if state.next_revision > 0 {
        state.next_revision
    } else {
        args.from_revision
    };
    let mut watch = RangeWatch::open(&args.client, start, end, from).await?;
    let round = args.round;
    loop {
        tokio::select! {
            item = watch.next() => match item? {
                WatchItem::Events(events) => {
                    for ev in events {
                        let Some(kv) = ev.kv() else { continue };
                        state.next_revision = kv.mod_revision() + 1;
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        let Some((r, section, name)) = args.keys.parse_round_key(&key) else { continue };
                        let deleted = ev.event_type() == EventType::Delete;
                        match (r == round, section, name, deleted) {
                            (true, "member", node, true) => args.peer_gone(state, node).await?,
                            (false, "member", node, false) if node != args.node_id => {
                                state.waiting.insert(node.to_string());
                                args.set_waiting(state);
                            }
                            (false, "member", node, true) => {
                                state.waiting.remove(node);
                                args.set_waiting(state);
                            }
                            (false, "ctl", "closed", false) => args.emit(MembershipEvent::Closed),
                            (false, "ctl", "final", false) => args.emit(MembershipEvent::RoundSuperseded { round }),
                            _ => {}
                        }
                    }
                }
                WatchItem::Resync { kvs, revision } => {
                    state.next_revision = revision + 1;
                    resync(args, state, &kvs).await?;
                }
            },
            changed = args.lease_lost.changed() => {
                match changed {
                    Ok(()) if *args.lease_lost.borrow() => {
                        args.emit(MembershipEvent::MembershipLost { round });
                        // Nothing more to report for this round from this node.
                        return Ok(());
                    }
                    Ok(()) => {}
                    Err(_) => return Ok(()),
                }
            }
        }
    }
}

/// Rebuilds the view from a snapshot after the watch lost events.
async fn resync(
    args: &MonitorArgs,
    state: &mut MonitorState,
    kvs: &[etcd_client::KeyValue],
) -> Result<(), RendezvousError> {
    let round = args.round;
    let mut present = BTreeSet::new();
    let mut waiting = BTreeSet::new();
    for kv in kvs {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        match args.keys.parse_round_key(&key) {
            Some((r, "member", node)) if r == round => {
                present.insert(node.to_string());
            }
            Some((_, "member", node)) if node != args.node_id => {
                waiting.insert(node.to_string());
            }
            Some((_, "ctl", "closed")) => args.emit(MembershipEvent::Closed),
            Some((_, "ctl", "final")) => args.emit(MembershipEvent::RoundSuperseded { round }),
            _ => {}
        }
    }
    let assigns = args
        .client
        .get(
            args.keys.assign_prefix(round),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await?;
    for kv in assigns.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let node = key.rsplit('/').next().unwrap_or_default();
        if !present.contains(node) {
            args.peer_gone(state, node).await?;
        }
    }
    state.waiting = waiting;
    args.set_waiting(state);
    Ok(())
}
