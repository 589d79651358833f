//! The membership monitor: after a round completes, one watch per member reports lost peers,
//! nodes waiting for the next round, and closing, as [`MembershipEvent`]s.
//!
//! The watch covers the round's join records and the next round's control keys, not the next
//! round's joins: the first joiner of the next round writes a marker, and the monitor then
//! counts the waiting nodes once. A member thus receives a constant number of events per
//! change, however many nodes join.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::api::{EventType, GetOptions, KeyValue};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use super::client::EtcdClient;
use super::keys::RunKeys;
use super::records::{decode, Assignment, NodeRecord};
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
    /// Members whose record was marked `left` before its deletion.
    leaving: BTreeSet<String>,
    waiting_seen: bool,
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

    /// Someone joined the next round: count how many wait (once) and tell.
    async fn nodes_waiting(&self, state: &mut MonitorState) -> Result<(), RendezvousError> {
        if state.waiting_seen {
            return Ok(());
        }
        let resp = self
            .client
            .get(
                self.keys.member_prefix(self.round + 1),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await?;
        state.waiting_seen = true;
        let n = resp.count().max(1) as usize;
        self.waiting.store(n, Ordering::Relaxed);
        self.emit(MembershipEvent::NodesWaiting {
            round: self.round,
            waiting: n,
        });
        Ok(())
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
            let (round, node_id) = (self.round, node_id.to_string());
            self.emit(if state.leaving.contains(&node_id) {
                MembershipEvent::PeerLeft { round, node_id }
            } else {
                MembershipEvent::PeerLost { round, node_id }
            });
        }
        Ok(())
    }

    /// Acts on one key of the watched range, present (`deleted == false`) or gone.
    async fn on_key(
        &self,
        state: &mut MonitorState,
        key: &str,
        value: &[u8],
        deleted: bool,
    ) -> Result<(), RendezvousError> {
        let Some((r, section, name)) = self.keys.parse_round_key(key) else {
            return Ok(());
        };
        let round = self.round;
        match (r == round, section, name, deleted) {
            (true, "member", node, true) => self.peer_gone(state, node).await?,
            (true, "member", node, false)
                if decode::<NodeRecord>(key.as_bytes(), value).is_ok_and(|r| r.left) =>
            {
                state.leaving.insert(node.to_string());
            }
            (false, "ctl", "waiting", false) => self.nodes_waiting(state).await?,
            (false, "ctl", "closed", false) => self.emit(MembershipEvent::Closed),
            (false, "ctl", "final", false) => self.emit(MembershipEvent::RoundSuperseded { round }),
            _ => {}
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
            biased;
            item = watch.next() => match item? {
                WatchItem::Events(events) => {
                    for ev in events {
                        let Some(kv) = ev.kv() else { continue };
                        state.next_revision = kv.mod_revision() + 1;
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        args.on_key(state, &key, kv.value(), ev.event_type() == EventType::Delete).await?;
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
    kvs: &[KeyValue],
) -> Result<(), RendezvousError> {
    let round = args.round;
    let mut present = BTreeSet::new();
    for kv in kvs {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        match args.keys.parse_round_key(&key) {
            Some((r, "member", node)) if r == round => {
                present.insert(node.to_string());
            }
            _ => args.on_key(state, &key, kv.value(), false).await?,
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
    Ok(())
}
