//! One attempt at a round: the join transaction, then waiting for the round's outcome while
//! watching its control keys, completing it when it is this node's turn (see
//! [`super::rendezvous`] for the protocol).

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::Instant;

use super::api::{Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp};
use super::backoff::Backoff;
use super::client::is_overloaded;
use super::keys::{prefix_end, RunKeys};
use super::records::{
    decode, encode, Assignment, Claim, ClosedRecord, FinalRecord, LastCall, NodeRecord,
};
use super::rendezvous::{lease_gone_error, parse_round, EtcdRendezvousHandler, RoundState};
use super::watch::{RangeWatch, WatchItem};
use crate::RendezvousError;

/// How long a ranked member waits on its watch for its assignment after `final` before it
/// reads it instead: etcd sends the two at once, so this is only reached when the stream is
/// lost or the member's record was gone before the finaliser's read.
const ASSIGNMENT_IN_FLIGHT: Duration = Duration::from_secs(1);

/// What one attempt at a round ended with.
pub(super) enum Step {
    /// The round completed (with or without this node).
    Done(RoundResult),
    /// The round is not open: this one is.
    Stale(u64),
    /// The run is closed.
    Closed,
}

/// A completed round as seen by this node: its rank, or `None` if it was not selected.
pub(super) struct RoundResult {
    pub(super) record: FinalRecord,
    pub(super) rank: Option<usize>,
    /// This node's global ranks, if the finaliser gave them.
    pub(super) global: Option<crate::GlobalRanks>,
    /// The peer this node watches for a crash, if the finaliser gave one.
    pub(super) watch: Option<super::records::WatchedPeer>,
    /// The round to try next if this node has no rank (the open round, as far as known).
    pub(super) next_round: u64,
    /// The watch this node waited on, whose stream the membership watch reuses.
    pub(super) ctl_watch: Option<Box<RangeWatch>>,
}

/// What the join transaction told.
enum JoinOutcome {
    Joined(Joined),
    /// The round was completed already; this node's assignment in it, if it has one, and the
    /// open round.
    Completed(FinalRecord, Option<Assignment>, u64),
    Stale(u64),
    Closed,
}

/// What a successful join told this node.
struct Joined {
    /// Joins of the round so far, ours included (an upper bound of its members).
    count: i64,
    /// The round's control keys before our join.
    ctl: Vec<KeyValue>,
    /// The revision of our join.
    revision: i64,
    /// Whether our join armed the last call.
    armed: bool,
    /// For a newcomer: the previous round's final record, if there is one.
    prev_final: Option<FinalRecord>,
}

/// What a waiting node knows of its round's control keys.
#[derive(Debug, Default)]
struct CtlView {
    /// The last call, its revision, and when this node saw it.
    lastcall: Option<(LastCall, i64, Instant)>,
    final_record: Option<FinalRecord>,
    claim: Option<Claim>,
    gate: bool,
    keeper: Option<String>,
    waiting: bool,
    closed: bool,
}

impl CtlView {
    /// Rebuilds the view from a snapshot (after the watch lost events to compaction); a last
    /// call seen before keeps the time it was seen.
    fn resync(&mut self, keys: &RunKeys, kvs: &[KeyValue]) -> Result<(), RendezvousError> {
        let lastcall = self.lastcall.take();
        *self = CtlView {
            lastcall,
            ..CtlView::default()
        };
        let mut has_lastcall = false;
        for kv in kvs {
            has_lastcall |= matches!(
                keys.parse_round_key(&String::from_utf8_lossy(kv.key())),
                Some((_, "ctl", "lastcall"))
            );
            self.apply(keys, kv, false)?;
        }
        if !has_lastcall {
            self.lastcall = None;
        }
        Ok(())
    }

    fn apply(
        &mut self,
        keys: &RunKeys,
        kv: &KeyValue,
        deleted: bool,
    ) -> Result<(), RendezvousError> {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let Some((_, "ctl", name)) = keys.parse_round_key(&key) else {
            return Ok(());
        };
        match (name, deleted) {
            ("lastcall", false) => {
                let lc: LastCall = decode(kv.key(), kv.value())?;
                let seen = match &self.lastcall {
                    Some((_, rev, seen)) if *rev == kv.mod_revision() => *seen,
                    _ => Instant::now(),
                };
                self.lastcall = Some((lc, kv.mod_revision(), seen));
            }
            ("lastcall", true) => self.lastcall = None,
            ("final", false) => self.final_record = Some(decode(kv.key(), kv.value())?),
            ("claim", false) => self.claim = Some(decode(kv.key(), kv.value())?),
            ("claim", true) => self.claim = None,
            ("gate", false) => self.gate = true,
            ("keeper", false) => self.keeper = Some(String::from_utf8_lossy(kv.value()).into()),
            ("keeper", true) => self.keeper = None,
            ("waiting", false) => self.waiting = true,
            ("closed", false) => self.closed = true,
            _ => {}
        }
        Ok(())
    }
}

/// The newcomer that watches the previous round dissolve: the live join records of round
/// `r - 1` (not detached), and a watch on them.
struct Keeper {
    alive: BTreeSet<String>,
    watch: RangeWatch,
}

impl Keeper {
    fn apply(
        &mut self,
        keys: &RunKeys,
        round: u64,
        kv: &KeyValue,
        deleted: bool,
    ) -> Result<(), RendezvousError> {
        let prefix = keys.member_prefix(round - 1);
        let Some(node) = kv.key().strip_prefix(prefix.as_bytes()) else {
            return Ok(());
        };
        let node = String::from_utf8_lossy(node).into_owned();
        if deleted || decode::<NodeRecord>(kv.key(), kv.value())?.detached {
            self.alive.remove(&node);
        }
        Ok(())
    }
}

/// A waiting node's state in its round.
struct Wait {
    round: u64,
    /// Our join's revision: events up to it are in the join's snapshot.
    revision: i64,
    count: i64,
    gate_open: bool,
    /// A newcomer beyond a full previous round.
    spare: bool,
    /// Try to complete the round now (our join reached `max_nodes`).
    at_max: bool,
    /// No attempt before this (after one that could not complete the round).
    cooldown: Option<Instant>,
    grace: Duration,
    keeper: Option<Keeper>,
}

impl EtcdRendezvousHandler {
    /// One attempt at `round`: join it and wait for its outcome. `deadline` may move later
    /// (a spare's wait does not count until its gate opens).
    pub(super) async fn attempt_round(
        &self,
        st: &mut RoundState,
        round: u64,
        lease: i64,
        deadline: &mut Instant,
    ) -> Result<Step, RendezvousError> {
        // Watch the round's control keys before joining: a live watch is served at once,
        // and together with the join's snapshot nothing is missed.
        let (mut watch, _) = RangeWatch::open_live(
            &self.client,
            self.keys.ctl_prefix(round),
            prefix_end(&self.keys.ctl_prefix(round)),
        )
        .await?;
        // Its own assignment on the same stream: usually there before `final`, which then
        // needs no read.
        watch
            .watch_key_too(self.keys.assign(round, &self.node.node_id))
            .await;
        // A join refused by etcd's backpressure was not applied: it is sent again on the
        // same watch (a new attempt would open a new stream, more load for an etcd that is
        // behind already), after a jittered pause.
        let mut backoff = Backoff::starting_at(Duration::from_millis(100));
        let outcome = loop {
            match self.join(st, round, lease).await {
                Err(e) if is_overloaded(&e) && Instant::now() + backoff.step() < *deadline => {
                    tracing::debug!(round, error = %e, "join refused as overloaded; retrying");
                    tokio::time::sleep(backoff.next_pause(self.env.fraction())).await;
                }
                other => break other?,
            }
        };
        let joined = match outcome {
            JoinOutcome::Closed => return Ok(Step::Closed),
            JoinOutcome::Stale(open) => return Ok(Step::Stale(open)),
            JoinOutcome::Completed(record, assignment, open) => {
                let ours = assignment.filter(|a| a.token == record.token);
                let rank = ours.as_ref().map(|a| a.rank);
                let global = ours.as_ref().and_then(global_ranks);
                let watch = ours.and_then(|a| a.watch);
                return Ok(Step::Done(RoundResult {
                    record,
                    rank,
                    global,
                    watch,
                    next_round: open.max(round + 1),
                    ctl_watch: None,
                }));
            }
            JoinOutcome::Joined(j) => j,
        };
        let prev_member = st.last.is_some_and(|c| c.round + 1 == round);
        tracing::debug!(
            round,
            joined = joined.count,
            armed = joined.armed,
            revision = joined.revision,
            "joined round"
        );
        let step = self
            .await_round(round, joined, prev_member, deadline, &mut watch)
            .await?;
        Ok(match step {
            Step::Done(result) => Step::Done(RoundResult {
                ctl_watch: Some(Box::new(watch)),
                ..result
            }),
            other => other,
        })
    }

    async fn join(
        &self,
        st: &mut RoundState,
        round: u64,
        lease: i64,
    ) -> Result<JoinOutcome, RendezvousError> {
        let k = &self.keys;
        let me = &self.node.node_id;
        let prev_member = st.last.is_some_and(|c| c.round + 1 == round);
        let record = NodeRecord {
            prev_rank: st.last.filter(|_| prev_member).map(|c| c.rank),
            ..self.node.clone()
        };
        let run_lease = self.run_lease_id().await?;
        let by_run = || Some(PutOptions::new().with_lease(run_lease));
        let absent = |key: String| Compare::create_revision(key, CompareOp::Equal, 0);
        let min = self.settings.min_nodes as i64;
        // Arm the last call if this join brings the joins to `min_nodes` (a newcomer only
        // once the round may start), decided on the state before this join.
        let mut arm_if = vec![
            Compare::version(k.join_seq(round), CompareOp::Greater, min - 2),
            absent(k.lastcall(round)),
        ];
        if !prev_member && round > 1 {
            arm_if.push(Compare::create_revision(
                k.gate(round),
                CompareOp::Greater,
                0,
            ));
        }
        let lastcall = LastCall {
            v: super::records::SCHEMA_VERSION,
            duration_ms: self.settings.last_call_timeout.as_millis() as u64,
            writer: me.clone(),
        };
        let mut ops = vec![
            TxnOp::put(
                k.member(round, me),
                encode(&record),
                Some(PutOptions::new().with_lease(lease)),
            ),
            // Counting joins by the version of one key costs etcd O(1), where counting the
            // join records would cost O(N) per join.
            TxnOp::put(
                k.join_seq(round),
                Vec::new(),
                Some(PutOptions::new().with_lease(run_lease).with_prev_key()),
            ),
            TxnOp::get(k.ctl_prefix(round), Some(GetOptions::new().with_prefix())),
            TxnOp::txn(Txn::new().when(arm_if).and_then([TxnOp::put(
                k.lastcall(round),
                encode(&lastcall),
                by_run(),
            )])),
        ];
        if prev_member {
            // The round may start; the other members must re-rendezvous too.
            for key in [k.gate(round), k.waiting(round)] {
                ops.push(TxnOp::txn(
                    Txn::new().when([absent(key.clone())]).and_then([TxnOp::put(
                        key,
                        me.clone(),
                        by_run(),
                    )]),
                ));
            }
        } else if round > 1 {
            ops.push(TxnOp::get(k.final_key(round - 1), None));
        }
        // A node leaves every round but the one it completed last: its records there go.
        let keep = st.last.map(|c| c.round);
        let stale: Vec<u64> = st
            .joined
            .iter()
            .copied()
            .filter(|r| *r != round && Some(*r) != keep)
            .collect();
        for old in &stale {
            ops.push(TxnOp::delete(k.member(*old, me), None));
        }
        // From now on this node may have a record in `round`, whether or not an answer
        // arrives: if the round completes without it, its next join removes the record.
        st.joined.insert(round);
        let txn = Txn::new()
            .when([
                Compare::value(k.current(), CompareOp::Equal, round.to_string()),
                absent(k.closed()),
            ])
            .and_then(ops)
            .or_else([
                TxnOp::get(k.current(), None),
                TxnOp::get(k.closed(), None),
                TxnOp::get(k.final_key(round), None),
                TxnOp::get(k.assign(round, me), None),
                TxnOp::get(
                    k.member(round, me),
                    Some(GetOptions::new().with_keys_only()),
                ),
            ]);
        let resp = self.client.txn(txn).await?;
        if !resp.succeeded() {
            if let Some(kv) = resp.get(1).and_then(|g| g.kvs().first()) {
                // Foreign data is a state error, not a closed run.
                decode::<ClosedRecord>(kv.key(), kv.value())?;
                return Ok(JoinOutcome::Closed);
            }
            let current = match resp.get(0).and_then(|g| g.kvs().first()) {
                Some(kv) => parse_round(kv)?,
                None => {
                    return Err(RendezvousError::State(format!(
                        "key '{}' is missing: the run's state was removed or damaged",
                        k.current()
                    )))
                }
            };
            if let Some(kv) = resp.get(2).and_then(|g| g.kvs().first()) {
                let record: FinalRecord = decode(kv.key(), kv.value())?;
                // Our rank there counts only if our record there is still ours: bound to the
                // lease we hold now. A record of a lost lease is a lost membership (the peers
                // are told of it); this node then goes on to the open round.
                let still_ours = resp
                    .get(4)
                    .and_then(|g| g.kvs().first())
                    .is_some_and(|kv| kv.lease() == lease);
                let assignment = match resp.get(3).and_then(|g| g.kvs().first()) {
                    Some(kv) if still_ours => Some(decode::<Assignment>(kv.key(), kv.value())?),
                    _ => None,
                };
                return Ok(JoinOutcome::Completed(record, assignment, current));
            }
            if current == round {
                // `current` was `round` but not as a string we wrote (e.g. "007").
                return Err(RendezvousError::State(format!(
                    "key '{}' holds a malformed round number",
                    k.current()
                )));
            }
            return Ok(JoinOutcome::Stale(current));
        }
        for old in stale {
            st.joined.remove(&old);
        }
        let count = resp
            .put(1)
            .and_then(|p| p.prev_key())
            .map_or(0, |kv| kv.version())
            + 1;
        let ctl = resp.get(2).map(|g| g.kvs().to_vec()).unwrap_or_default();
        let armed = resp.txn(3).is_some_and(|t| t.succeeded());
        let prev_final = match resp.get(4).and_then(|g| g.kvs().first()) {
            Some(kv) if !prev_member => Some(decode::<FinalRecord>(kv.key(), kv.value())?),
            _ => None,
        };
        Ok(JoinOutcome::Joined(Joined {
            count,
            ctl,
            revision: resp.revision(),
            armed,
            prev_final,
        }))
    }

    /// Waits, as a joined node, until `round` is complete; completes it when it is this
    /// node's turn.
    async fn await_round(
        &self,
        round: u64,
        joined: Joined,
        prev_member: bool,
        deadline: &mut Instant,
        watch: &mut RangeWatch,
    ) -> Result<Step, RendezvousError> {
        let k = &self.keys;
        let me = self.node.node_id.clone();
        let max = self.settings.max_nodes;
        let mut view = CtlView::default();
        for kv in &joined.ctl {
            view.apply(k, kv, false)?;
        }
        if joined.armed {
            view.lastcall = Some((
                LastCall {
                    v: super::records::SCHEMA_VERSION,
                    duration_ms: self.settings.last_call_timeout.as_millis() as u64,
                    writer: me.clone(),
                },
                joined.revision,
                Instant::now(),
            ));
        }
        let prev_full = joined
            .prev_final
            .as_ref()
            .is_some_and(|f| f.world_size >= max);
        let gate_open = round == 1 || prev_member || view.gate;
        let mut w = Wait {
            round,
            revision: joined.revision,
            count: joined.count,
            gate_open,
            spare: !gate_open && prev_full,
            at_max: gate_open && joined.count >= max as i64,
            cooldown: None,
            grace: Duration::from_secs(2) + jitter(&me, Duration::from_millis(1500)),
            keeper: None,
        };
        if !prev_member && !prev_full && joined.prev_final.is_some() && !view.waiting {
            // Scale-up: the previous round has room, so its members must re-rendezvous.
            let key = k.waiting(round);
            let run_lease = self.run_lease_id().await?;
            self.client
                .txn(
                    Txn::new()
                        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(
                            key,
                            me.clone(),
                            Some(PutOptions::new().with_lease(run_lease)),
                        )]),
                )
                .await?;
        }
        if w.spare {
            tracing::info!(
                round,
                "the job is at max_nodes: waiting as a hot spare until a member leaves or is lost"
            );
        }
        let mut lease_lost = self.node_lease.lock().await.lost_receiver();
        let ttl = self.settings.keep_alive_ttl;
        let mut progress = tokio::time::interval_at(Instant::now() + ttl, ttl);
        loop {
            if w.spare {
                // A spare's wait does not count: `timeout` runs from when its gate opens (also
                // across a retry of the round after an error).
                *deadline = (*deadline).max(Instant::now() + self.settings.timeout);
            }
            if let Some(record) = view.final_record.take() {
                // Ranked, our assignment was written with `final` or before it, on this
                // stream, whose messages of one revision come one after the other: wait for
                // it. Otherwise take what has come.
                let ranked = record.all_ranked && w.revision <= record.members_revision;
                let wait = if ranked {
                    ASSIGNMENT_IN_FLIGHT
                } else {
                    Duration::ZERO
                };
                let token = record.token.as_bytes();
                let ours = |kv: &KeyValue| {
                    decode::<Assignment>(kv.key(), kv.value())
                        .is_ok_and(|a| a.token.as_bytes() == token)
                };
                let key = k.assign(round, &me);
                let side = watch
                    .await_side(key.as_bytes(), Instant::now() + wait, ours)
                    .await;
                return self
                    .read_assignment(record, side.as_ref())
                    .await
                    .map(Step::Done);
            }
            if view.closed {
                return Err(self.closed_error());
            }
            if !w.gate_open && view.gate {
                self.gate_opened(&mut w, deadline);
            }
            let keeper_wanted = view.keeper.as_ref().is_none_or(|kp| *kp == me);
            if !w.gate_open && w.keeper.is_none() && keeper_wanted {
                self.try_keeper(&mut w, &mut view).await?;
                if w.keeper.is_some() {
                    continue;
                }
            }
            if w.keeper.as_ref().is_some_and(|kp| kp.alive.is_empty()) {
                w.keeper = None;
                self.open_gate(&mut w, &mut view).await?;
                self.gate_opened(&mut w, deadline);
                continue;
            }
            let next = self.next_attempt(&w, &view);
            if next.is_some_and(|t| t <= Instant::now()) {
                let due = view
                    .lastcall
                    .as_ref()
                    .is_some_and(|(lc, _, seen)| Instant::now() >= lastcall_due(lc, *seen));
                let lastcall_rev = view.lastcall.as_ref().map(|(_, rev, _)| *rev);
                if let Some(done) = self
                    .try_finalize(round, w.at_max, due, lastcall_rev)
                    .await?
                {
                    return Ok(Step::Done(done));
                }
                w.at_max = false;
                w.cooldown = Some(Instant::now() + w.grace);
                continue;
            }
            let enforce_deadline = !w.spare;
            let wake = match next {
                Some(t) if enforce_deadline => Some(t.min(*deadline)),
                Some(t) => Some(t),
                None => enforce_deadline.then_some(*deadline),
            };
            tokio::select! {
                biased;
                changed = lease_lost.changed() => {
                    if changed.is_err() || *lease_lost.borrow() {
                        return Err(lease_gone_error(
                            "this node's lease was lost while waiting for the round",
                        ));
                    }
                }
                item = watch.next() => match item? {
                    WatchItem::Events(events) => {
                        // Events up to the join are in the join's snapshot already.
                        for ev in events.iter().filter(|e| e.kv.mod_revision > w.revision) {
                            view.apply(k, &ev.kv, ev.event_type() == EventType::Delete)?;
                        }
                    }
                    WatchItem::Resync { kvs, .. } => {
                        view.resync(k, &kvs)?;
                        // Events were lost: if the round was completed and its keys dropped
                        // meanwhile, the snapshot shows nothing; the open round tells.
                        let resp = self.client.get(k.current(), None).await?;
                        if let Some(kv) = resp.kvs().first() {
                            let open = parse_round(kv)?;
                            if open != round && view.final_record.is_none() {
                                return Ok(Step::Stale(open));
                            }
                        }
                    }
                },
                item = keeper_next(&mut w.keeper) => {
                    let round = w.round;
                    if let Some(kp) = w.keeper.as_mut() {
                        match item? {
                            WatchItem::Events(events) => {
                                for ev in &events {
                                    kp.apply(k, round, &ev.kv, ev.event_type() == EventType::Delete)?;
                                }
                            }
                            WatchItem::Resync { kvs, .. } => {
                                kp.alive = live_members(k, round - 1, &me, &kvs)?;
                            }
                        }
                    }
                }
                _ = sleep_until(wake) => {
                    if enforce_deadline && Instant::now() >= *deadline {
                        return Err(RendezvousError::Timeout(format!(
                            "round {round} of run '{}' did not complete within {:?} ({} join(s) of min {} when this node joined)",
                            self.run_id, self.settings.timeout, w.count, self.settings.min_nodes
                        )));
                    }
                }
                _ = progress.tick() => {
                    tracing::info!(
                        round,
                        joined_at_our_join = w.count,
                        min_nodes = self.settings.min_nodes,
                        max_nodes = max,
                        last_call = view.lastcall.is_some(),
                        "waiting for round {round}{}",
                        if w.spare {
                            " as a hot spare"
                        } else if w.gate_open {
                            ""
                        } else {
                            "; the previous round's members have not re-joined yet"
                        }
                    );
                }
            }
        }
    }

    /// The gate opened: the round may start (and a spare's wait now counts).
    fn gate_opened(&self, w: &mut Wait, deadline: &mut Instant) {
        w.gate_open = true;
        w.keeper = None;
        if w.spare {
            w.spare = false;
            *deadline = (*deadline).max(Instant::now() + self.settings.timeout);
            tracing::info!(round = w.round, "the round may start: no longer a spare");
        }
    }

    /// When to try to complete the round, if at all.
    fn next_attempt(&self, w: &Wait, view: &CtlView) -> Option<Instant> {
        if !w.gate_open {
            return None;
        }
        if view
            .claim
            .as_ref()
            .is_some_and(|c| c.node_id != self.node.node_id)
        {
            // Someone completes it; if it dies, its claim goes with its lease.
            return None;
        }
        let mut at = w.at_max.then(Instant::now);
        if let Some((lc, _, seen)) = &view.lastcall {
            let due = lastcall_due(lc, *seen);
            let mine = if lc.writer == self.node.node_id {
                due
            } else {
                due + w.grace
            };
            at = Some(at.map_or(mine, |t| t.min(mine)));
        }
        at.map(|t| w.cooldown.map_or(t, |c| t.max(c)))
    }

    /// Becomes the round's keeper unless another node is (the key may be ours already: an
    /// earlier attempt whose answer was lost), then watches the previous round.
    async fn try_keeper(&self, w: &mut Wait, view: &mut CtlView) -> Result<(), RendezvousError> {
        let k = &self.keys;
        let me = &self.node.node_id;
        if view.keeper.as_ref().is_none_or(|kp| kp != me) {
            let lease = self.node_lease.lock().await.id();
            let txn = Txn::new()
                .when([Compare::create_revision(
                    k.keeper(w.round),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::put(
                    k.keeper(w.round),
                    me.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(k.keeper(w.round), None)]);
            let resp = self.client.txn(txn).await?;
            view.keeper = Some(if resp.succeeded() {
                me.clone()
            } else {
                resp.get(0)
                    .and_then(|g| g.kvs().first())
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                    .unwrap_or_default()
            });
            if view.keeper.as_ref() != Some(me) {
                return Ok(());
            }
        }
        let prev = w.round - 1;
        let resp = self
            .client
            .get(k.member_prefix(prev), Some(GetOptions::new().with_prefix()))
            .await?;
        let alive = live_members(k, prev, me, resp.kvs())?;
        tracing::debug!(
            round = w.round,
            alive = alive.len(),
            "keeper of the round: watching the previous round"
        );
        let watch = RangeWatch::open(
            &self.client,
            k.member_prefix(prev),
            prefix_end(&k.member_prefix(prev)),
            resp.revision() + 1,
        )
        .await?;
        w.keeper = Some(Keeper { alive, watch });
        Ok(())
    }

    /// The previous round dissolved: opens the gate, and arms the last call if enough joined.
    async fn open_gate(&self, w: &mut Wait, view: &mut CtlView) -> Result<(), RendezvousError> {
        let k = &self.keys;
        let me = &self.node.node_id;
        let round = w.round;
        let run_lease = self.run_lease_id().await?;
        let by_run = || Some(PutOptions::new().with_lease(run_lease));
        let absent = |key: String| Compare::create_revision(key, CompareOp::Equal, 0);
        let lastcall = LastCall {
            v: super::records::SCHEMA_VERSION,
            duration_ms: self.settings.last_call_timeout.as_millis() as u64,
            writer: me.clone(),
        };
        let min = self.settings.min_nodes as i64;
        let txn = Txn::new().and_then([
            TxnOp::txn(
                Txn::new()
                    .when([absent(k.gate(round))])
                    .and_then([TxnOp::put(k.gate(round), me.clone(), by_run())]),
            ),
            TxnOp::txn(
                Txn::new()
                    .when([
                        Compare::version(k.join_seq(round), CompareOp::Greater, min - 1),
                        absent(k.lastcall(round)),
                    ])
                    .and_then([TxnOp::put(k.lastcall(round), encode(&lastcall), by_run())]),
            ),
        ]);
        let resp = self.client.txn(txn).await?;
        tracing::info!(round, "the previous round dissolved: the round may start");
        view.gate = true;
        if resp.txn(1).is_some_and(|t| t.succeeded()) {
            view.lastcall = Some((lastcall, resp.revision(), Instant::now()));
        }
        Ok(())
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Waits for the keeper's next watch item (forever if this node is no keeper).
async fn keeper_next(keeper: &mut Option<Keeper>) -> Result<WatchItem, RendezvousError> {
    match keeper {
        Some(kp) => kp.watch.next().await,
        None => std::future::pending().await,
    }
}

/// The live (not detached) members in a snapshot of round `round`'s join records, but `me`.
fn live_members(
    keys: &RunKeys,
    round: u64,
    me: &str,
    kvs: &[KeyValue],
) -> Result<BTreeSet<String>, RendezvousError> {
    let prefix = keys.member_prefix(round);
    let mut alive = BTreeSet::new();
    for kv in kvs {
        let Some(node) = kv.key().strip_prefix(prefix.as_bytes()) else {
            continue;
        };
        let rec: NodeRecord = decode(kv.key(), kv.value())?;
        let node = String::from_utf8_lossy(node).into_owned();
        if !rec.detached && node != me {
            alive.insert(node);
        }
    }
    Ok(alive)
}

/// When a last call seen at `seen` is due.
fn lastcall_due(lc: &LastCall, seen: Instant) -> Instant {
    seen + Duration::from_millis(lc.duration_ms)
}

/// A stable per-node delay in `[0, max)`, so that backups do not all fire at once.
fn jitter(node_id: &str, max: Duration) -> Duration {
    let h = node_id.bytes().fold(0xcbf29ce484222325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    Duration::from_millis(h % (max.as_millis() as u64).max(1))
}

/// The global ranks an assignment gives, if it gives them (and they fit this machine).
pub(super) fn global_ranks(a: &Assignment) -> Option<crate::GlobalRanks> {
    Some(crate::GlobalRanks {
        first: usize::try_from(a.first_global_rank?).ok()?,
        world_size: usize::try_from(a.global_world_size?).ok()?,
    })
}
