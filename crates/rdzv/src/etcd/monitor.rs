//! The membership monitor: after a round completes, one watch per member reports the first
//! change of the round as a [`MembershipEvent`] — a peer lost or left, nodes waiting for the
//! next round, a newer round completed without this node, the run closed, this node's own
//! lease lost. After a change the node must re-rendezvous (which stops the monitor) and
//! nothing else of this round matters to it but closing (a node that does not re-rendezvous,
//! in its exit barrier, must still learn that the run closed): the monitor then reports only
//! that, until the `done` marker of a finished job stops it. The marker also keeps the end of
//! a job cheap: the members leaving one by one cost the others no events.
//!
//! The watch covers the round's join records and the next round's control keys, not the next
//! round's joins: a node that wants the next round to start writes a `waiting` marker once,
//! and the monitor then counts the waiting nodes once. A member thus receives a constant
//! number of events per change, however many nodes join. Nodes beyond a full round (hot
//! spares) write no marker and do not disturb the members.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::api::{EventType, GetOptions, KeyValue};
use super::client::{is_lease_gone, EtcdClient};
use super::keys::RunKeys;
use super::probe::PeerProbe;
use super::records::{decode, Assignment, NodeRecord, WatchedPeer};
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
    /// The round's final record says every join record read got a rank (see
    /// [`super::records::FinalRecord::all_ranked`]): a lost record's creation revision then
    /// tells a member from a node that joined later, without a read.
    pub all_ranked: bool,
    pub events: broadcast::Sender<MembershipEvent>,
    pub waiting: Arc<AtomicUsize>,
    pub lease_lost: watch::Receiver<bool>,
    /// The peer to watch for a crash, and the probe to watch it with.
    pub peer: Option<(WatchedPeer, Arc<dyn PeerProbe>)>,
    /// The watch the node waited for the round on: the membership watch goes on its stream
    /// (one message instead of a stream of its own).
    /// (In a mutex only to make the arguments `Sync`.)
    pub reuse: std::sync::Mutex<Option<RangeWatch>>,
}

/// Starts the monitor; abort the handle to stop it earlier.
pub(crate) fn spawn_monitor(mut args: MonitorArgs) -> JoinHandle<()> {
    let mut lost = args.lease_lost.clone();
    let peer = args.peer.take();
    tokio::spawn(
        async move {
            let round = args.round;
            let events = args.events.clone();
            let peer_watch = watch_peer(args.client.clone(), peer, round);
            // This node's own lease is watched apart from etcd: a node cut off from etcd (whose
            // watch cannot even be re-opened) must still learn that its fence fired.
            tokio::select! {
                biased;
                () = lease_lost(&mut lost) => {
                    tracing::debug!(round, "membership event: this node's lease was lost");
                    let _ = events.send(MembershipEvent::MembershipLost { round });
                }
                () = watch_membership(args) => {}
                () = peer_watch => {}
            }
        }
        .in_current_span(),
    )
}

/// Watches the peer's process (see [`super::probe`]); when it dies, revokes the peer's
/// lease, so that etcd deletes its join record at once and every member's watch reports the
/// loss. Never returns.
async fn watch_peer(
    client: EtcdClient,
    peer: Option<(WatchedPeer, Arc<dyn PeerProbe>)>,
    round: u64,
) {
    if let Some((peer, probe)) = peer {
        tracing::debug!(round, peer = %peer.node_id, addr = %peer.probe, "watching the peer's process");
        probe.watch(&peer.probe, &peer.node_id).await;
        tracing::info!(
            round,
            peer = %peer.node_id,
            "the peer's process closed its probe connection: revoking its lease"
        );
        let mut backoff = Duration::from_millis(50);
        for _ in 0..6 {
            match client.lease_revoke(peer.lease).await {
                Ok(()) => break,
                // Gone already: it left, or its lease expired.
                Err(e) if is_lease_gone(&e) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "revoking the dead peer's lease failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    }
    std::future::pending().await
}

/// Returns once the lease is lost (never, if its keeper is gone without losing it).
async fn lease_lost(lost: &mut watch::Receiver<bool>) {
    loop {
        if *lost.borrow_and_update() {
            return;
        }
        if lost.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Watches the round until closing or the job's end (reporting only the first change),
/// re-opening the watch after errors.
async fn watch_membership(mut args: MonitorArgs) {
    let mut backoff = Duration::from_millis(100);
    let mut state = MonitorState::default();
    loop {
        match run(&mut args, &mut state).await {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(round = args.round, error = %e, "membership watch failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[derive(Debug, Default)]
struct MonitorState {
    /// Members whose record was marked `left` (or `detached`) before it changed.
    leaving: std::collections::BTreeSet<String>,
    detached: std::collections::BTreeSet<String>,
    waiting_seen: bool,
    next_revision: i64,
    /// A change was reported: only closing is watched for now.
    changed: bool,
}

/// What one key change means to the monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Nothing to report.
    Continue,
    /// A change was reported: from now on only closing matters (a node that does not
    /// re-rendezvous, e.g. in its exit barrier, must still learn that the run closed).
    Changed,
    /// Closed, or the job is done: stop watching.
    Stop,
}

impl MonitorArgs {
    fn emit(&self, event: MembershipEvent) {
        tracing::debug!(?event, "membership event");
        let _ = self.events.send(event);
    }

    /// Whether `node_id` is a member of the round: told by its lost record (`prev`, the value
    /// before the delete) when every record read was ranked, else read from its assignment.
    async fn is_member(
        &self,
        node_id: &str,
        prev: Option<&KeyValue>,
    ) -> Result<bool, RendezvousError> {
        if let Some(prev) = prev.filter(|_| self.all_ranked) {
            return Ok(prev.create_revision() < self.from_revision);
        }
        let resp = self
            .client
            .get(self.keys.assign(self.round, node_id), None)
            .await?;
        Ok(match resp.kvs().first() {
            Some(kv) => decode::<Assignment>(kv.key(), kv.value())?.token == self.token,
            None => false,
        })
    }

    /// Someone wants the next round: count how many wait (once) and tell.
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
        prev: Option<&KeyValue>,
    ) -> Result<Verdict, RendezvousError> {
        if node_id == self.node_id
            || state.detached.contains(node_id)
            || !self.is_member(node_id, prev).await?
        {
            return Ok(Verdict::Continue);
        }
        let (round, node_id) = (self.round, node_id.to_string());
        self.emit(if state.leaving.contains(&node_id) {
            MembershipEvent::PeerLeft { round, node_id }
        } else {
            MembershipEvent::PeerLost { round, node_id }
        });
        Ok(Verdict::Changed)
    }

    /// Acts on one key of the watched range, present (`deleted == false`) or gone.
    /// (`prev`: the key's value before a delete, if the watch delivered it.)
    async fn on_key(
        &self,
        state: &mut MonitorState,
        key: &str,
        value: &[u8],
        deleted: bool,
        prev: Option<&KeyValue>,
    ) -> Result<Verdict, RendezvousError> {
        let Some((r, section, name)) = self.keys.parse_round_key(key) else {
            return Ok(Verdict::Continue);
        };
        let round = self.round;
        if state.changed {
            // After the first change only closing, and the job's end, matter.
            return Ok(match (r == round, section, name, deleted) {
                (false, "ctl", "closed", false) => {
                    self.emit(MembershipEvent::Closed);
                    Verdict::Stop
                }
                (false, "ctl", "done", false) => Verdict::Stop,
                _ => Verdict::Continue,
            });
        }
        match (r == round, section, name, deleted) {
            (true, "member", node, true) => return self.peer_gone(state, node, prev).await,
            (true, "member", node, false) => {
                let rec = decode::<NodeRecord>(key.as_bytes(), value)?;
                if rec.left {
                    state.leaving.insert(node.to_string());
                }
                if rec.detached {
                    state.detached.insert(node.to_string());
                }
            }
            (false, "ctl", "waiting", false) => self.nodes_waiting(state).await?,
            (false, "ctl", "closed", false) => {
                self.emit(MembershipEvent::Closed);
                return Ok(Verdict::Stop);
            }
            (false, "ctl", "final", false) => {
                self.emit(MembershipEvent::RoundSuperseded { round });
                return Ok(Verdict::Changed);
            }
            // The job of this round finished (its members detach): nothing more to report.
            (false, "ctl", "done", false) => return Ok(Verdict::Stop),
            _ => {}
        }
        Ok(Verdict::Continue)
    }
}

/// Watches until the first change; returns `Err` to be restarted.
async fn run(args: &mut MonitorArgs, state: &mut MonitorState) -> Result<Verdict, RendezvousError> {
    let (start, end) = args.keys.membership_range(args.round);
    let from = if state.next_revision > 0 {
        state.next_revision
    } else {
        args.from_revision
    };
    let reuse = args
        .reuse
        .get_mut()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    let mut watch = match reuse {
        Some(w) => w.move_to(start, end, from, true).await?,
        None => RangeWatch::open_from(&args.client, start, end, from, true).await?,
    };
    loop {
        match watch.next().await? {
            WatchItem::Events(events) => {
                for ev in events {
                    let kv = &ev.kv;
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let deleted = ev.event_type() == EventType::Delete;
                    // An event counts as seen only once acted on: after an error, the watch
                    // resumes at it.
                    let verdict = args
                        .on_key(state, &key, kv.value(), deleted, ev.prev_kv.as_ref())
                        .await?;
                    state.next_revision = kv.mod_revision() + 1;
                    match verdict {
                        Verdict::Continue => {}
                        Verdict::Changed => state.changed = true,
                        Verdict::Stop => return Ok(verdict),
                    }
                }
            }
            WatchItem::Resync { kvs, revision } => {
                let verdict = resync(args, state, &kvs).await?;
                state.next_revision = revision + 1;
                match verdict {
                    Verdict::Continue => {}
                    Verdict::Changed => state.changed = true,
                    Verdict::Stop => return Ok(verdict),
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
) -> Result<Verdict, RendezvousError> {
    let round = args.round;
    let mut present = std::collections::BTreeSet::new();
    for kv in kvs {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        if let Some((r, "member", node)) = args.keys.parse_round_key(&key) {
            if r == round {
                present.insert(node.to_string());
            }
        }
        match args.on_key(state, &key, kv.value(), false, None).await? {
            Verdict::Continue => {}
            Verdict::Changed => state.changed = true,
            Verdict::Stop => return Ok(Verdict::Stop),
        }
    }
    if state.changed {
        return Ok(Verdict::Continue);
    }
    // Events were lost: the run may have moved on by more than one round, whose keys (this
    // round's among them) are then gone from the snapshot.
    let current = args.client.get(args.keys.current(), None).await?;
    if let Some(kv) = current.kvs().first() {
        if super::rendezvous::parse_round(kv)? > round + 1 {
            args.emit(MembershipEvent::RoundSuperseded { round });
            state.changed = true;
            return Ok(Verdict::Continue);
        }
    }
    let assigns = args
        .client
        .get(
            args.keys.assign_prefix(round),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await?;
    let prefix = args.keys.assign_prefix(round);
    for kv in assigns.kvs() {
        let node = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
        if !present.contains(&node) && args.peer_gone(state, &node, None).await? == Verdict::Changed
        {
            state.changed = true;
            break;
        }
    }
    Ok(Verdict::Continue)
}
