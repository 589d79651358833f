//! [`EtcdRendezvousHandler`]: PyTorch's `etcd` rendezvous semantics on the etcd v3 API, at
//! O(N) requests per round.
//!
//! # The round protocol
//! A round `r` is open until its `ctl/final` key exists. To join, a node writes its own
//! leased join record `r/<r>/member/<node>` in one transaction that also checks that the round
//! is still open and the run not closed, and reads the number of joined nodes and the round's
//! control keys. The node then watches only the round's control keys:
//!
//! - the join that brings the count to `min_nodes` writes `ctl/lastcall` with a deadline (now
//!   plus `last_call_timeout`, or now if `max_nodes` is reached) and its writer finalises the
//!   round at that deadline; if it does not (it died), every other node tries after a grace
//!   period;
//! - a join that brings the count to `max_nodes` finalises at once;
//! - finalising reads the join records once, chooses members and ranks (see
//!   [`super::ranks`]), writes each member's `assign/<r>/<node>` and `ctl/final` in one
//!   transaction guarded by "not final yet" (large rounds are written in chunks under a leased
//!   claim), and moves `current` to `r + 1`.
//!
//! Each node thus sends about four requests per round (join, watch, read its assignment, watch
//! its round's membership) and receives a constant number of watch events. After the round,
//! the membership watch reports peers whose join record disappears (lease expired, or left),
//! nodes waiting in round `r + 1`, and closing, as [`MembershipEvent`]s.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::api::{
    Compare, CompareOp, DeleteOptions, Event, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, TxnOpResponse,
};
use async_trait::async_trait;
use tokio::sync::{broadcast, Mutex};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::client::{is_transient, EtcdClient};
use super::keys::{prefix_end, RunKeys};
use super::lease::KeptLease;
use super::monitor::{spawn_monitor, MonitorArgs};
use super::node::{local_node_record, NodeEnv};
use super::options::{ConnectionOptions, RendezvousSettings};
use super::ranks::{assign_ranks, Candidate};
use super::records::{
    decode, encode, Assignment, Claim, ClosedRecord, FinalRecord, LastCall, NodeRecord,
    SCHEMA_VERSION,
};
use super::store::EtcdStore;
use super::watch::{RangeWatch, WatchItem};
use crate::{
    MembershipEvent, RendezvousError, RendezvousHandler, RendezvousInfo, RendezvousParameters,
};

/// What etcd says of a lease that expired; we say it too.
const LEASE_GONE: &str = "requested lease not found";

/// True if the error means that this node's lease (and so its join records) is gone.
fn is_lease_gone(err: &RendezvousError) -> bool {
    matches!(err, RendezvousError::Connection(m) if m.contains(LEASE_GONE))
}

/// Longest wait between retries when etcd is unavailable.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The etcd rendezvous handler. Create it with [`EtcdRendezvousHandler::connect`].
#[derive(Debug)]
pub struct EtcdRendezvousHandler {
    run_id: String,
    settings: RendezvousSettings,
    client: EtcdClient,
    keys: RunKeys,
    node: NodeRecord,
    node_lease: Mutex<KeptLease>,
    run_lease: Mutex<KeptLease>,
    state: Mutex<RoundState>,
    events: broadcast::Sender<MembershipEvent>,
    waiting: Arc<AtomicUsize>,
    env: NodeEnv,
}

#[derive(Debug, Default)]
struct RoundState {
    last: Option<Completed>,
    /// Rounds in which this node may still have a join record.
    joined: BTreeSet<u64>,
    monitor: Option<JoinHandle<()>>,
}

#[derive(Debug, Clone, Copy)]
struct Completed {
    round: u64,
    rank: usize,
}

enum JoinOutcome {
    Joined {
        count: i64,
        ctl: Vec<KeyValue>,
        revision: i64,
    },
    Stale {
        open_round: u64,
    },
    Closed,
}

/// What the join of a round told this node.
struct Joined {
    /// Nodes in the round after our join.
    count: i64,
    /// The round's control keys at our join.
    ctl: Vec<KeyValue>,
    /// The revision of our join.
    revision: i64,
    /// Whether we were a member of the previous round.
    prev_member: bool,
}

/// What one attempt at a round ended with.
enum Step {
    Done(RoundResult),
    Stale(u64),
    Closed,
}

/// A finished round as seen by this node: its rank, or `None` if it was not selected.
struct RoundResult {
    record: FinalRecord,
    rank: Option<usize>,
}

impl EtcdRendezvousHandler {
    /// Connects to etcd as `params` say and registers this node (its lease) for the run.
    ///
    /// # Errors
    /// [`RendezvousError::Parameters`] / [`RendezvousError::InvalidConfig`] for bad parameters,
    /// [`RendezvousError::Connection`] if etcd is unreachable within `connect_timeout` or
    /// refuses us.
    ///
    /// # Cancel safety
    /// Cancel safe; leases granted by a cancelled call expire by themselves.
    pub async fn connect(params: &RendezvousParameters) -> Result<Self, RendezvousError> {
        params.validate()?;
        let connection = ConnectionOptions::from_parameters(params)?;
        let settings = RendezvousSettings::from_parameters(params)?;
        let client = connection.connect_failover(Default::default()).await?;
        Self::with_client(client, params, settings).await
    }

    /// As [`EtcdRendezvousHandler::connect`], on an existing client (whose counters it uses).
    ///
    /// # Errors
    /// As [`EtcdRendezvousHandler::connect`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn with_client(
        client: EtcdClient,
        params: &RendezvousParameters,
        settings: RendezvousSettings,
    ) -> Result<Self, RendezvousError> {
        params.validate()?;
        let node = local_node_record(params.local_addr.as_deref(), settings.node_rank);
        Self::with_identity(client, params, settings, node, NodeEnv::from_machine()).await
    }

    /// As [`EtcdRendezvousHandler::with_client`], with a given node record and environment
    /// (for simulations and tests: a fixed node id, a seeded random source and a given clock).
    ///
    /// # Errors
    /// As [`EtcdRendezvousHandler::connect`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn with_identity(
        client: EtcdClient,
        params: &RendezvousParameters,
        settings: RendezvousSettings,
        node: NodeRecord,
        env: NodeEnv,
    ) -> Result<Self, RendezvousError> {
        params.validate()?;
        let keys = RunKeys::new(&settings.prefix, &params.run_id);
        let run_lease = ensure_run_lease(&client, &keys, settings.retention_secs()).await?;
        let node_lease = KeptLease::grant(&client, settings.keep_alive_ttl_secs()).await?;
        tracing::debug!(run_id = %params.run_id, node_id = %node.node_id, "rendezvous handler ready");
        Ok(Self {
            run_id: params.run_id.clone(),
            settings,
            client,
            keys,
            node,
            node_lease: Mutex::new(node_lease),
            run_lease: Mutex::new(run_lease),
            state: Mutex::new(RoundState::default()),
            events: broadcast::channel(1024).0,
            waiting: Arc::new(AtomicUsize::new(0)),
            env,
        })
    }

    /// This node's id (unique per handler).
    pub fn node_id(&self) -> &str {
        &self.node.node_id
    }

    /// This node's published record.
    pub fn node_record(&self) -> &NodeRecord {
        &self.node
    }

    /// The client, with its request counters.
    pub fn client(&self) -> &EtcdClient {
        &self.client
    }

    /// The key layout of this run.
    pub fn keys(&self) -> &RunKeys {
        &self.keys
    }

    /// The protocol settings.
    pub fn settings(&self) -> &RendezvousSettings {
        &self.settings
    }

    /// The join records of the members of `round` in rank order (one range read of the
    /// round's assignments and one of its join records).
    ///
    /// # Errors
    /// [`RendezvousError::Connection`], or [`RendezvousError::State`] for corrupt records.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn members(&self, round: u64) -> Result<Vec<NodeRecord>, RendezvousError> {
        members_of(&self.client, &self.keys, round).await
    }

    /// Rewrites this node's join record of `round`, bound to `lease`, if it still exists.
    async fn rewrite_own_record(
        &self,
        round: u64,
        record: &NodeRecord,
        lease: i64,
    ) -> Result<(), RendezvousError> {
        let key = self.keys.member(round, &self.node.node_id);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Greater, 0)])
            .and_then([TxnOp::put(
                key,
                encode(record),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        self.client.txn(txn).await?;
        Ok(())
    }

    /// Grants a new node lease after the old one expired (its join records are gone with it).
    async fn replace_node_lease(&self, st: &mut RoundState) -> Result<i64, RendezvousError> {
        let mut lease = self.node_lease.lock().await;
        *lease = KeptLease::grant(&self.client, self.settings.keep_alive_ttl_secs()).await?;
        st.joined.clear();
        // The run lease may be gone too (etcd down for longer than the retention).
        let mut run_lease = self.run_lease.lock().await;
        if self.client.lease_ttl(run_lease.id()).await?.is_none() {
            *run_lease =
                ensure_run_lease(&self.client, &self.keys, self.settings.retention_secs()).await?;
        }
        Ok(lease.id())
    }

    /// The node lease id, and whether it had to be replaced (the old one was lost, and with it
    /// every join record of this node).
    /// Leaves after a completed round *without* looking like a failure to its members: this
    /// node's join record of that round is handed to the run lease (so no peer sees it
    /// disappear), then the node's lease is revoked. For one-shot members such as `rdzv join`.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if etcd fails.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn detach(&self) -> Result<(), RendezvousError> {
        let mut st = self.state.lock().await;
        if let Some(monitor) = st.monitor.take() {
            monitor.abort();
        }
        if let Some(last) = st.last {
            let run_lease = self.run_lease_id().await?;
            let record = NodeRecord {
                prev_rank: None,
                detached: true,
                ..self.node.clone()
            };
            self.rewrite_own_record(last.round, &record, run_lease)
                .await?;
            st.joined.remove(&last.round);
        }
        st.joined.clear();
        let lease = self.node_lease.lock().await;
        lease.stop();
        self.client.lease_revoke(lease.id()).await?;
        self.run_lease.lock().await.stop();
        Ok(())
    }

    async fn node_lease_id(&self) -> Result<(i64, bool), RendezvousError> {
        let mut lease = self.node_lease.lock().await;
        if lease.is_lost() {
            tracing::warn!(node_id = %self.node.node_id, "node lease was lost; granting a new one");
            *lease = KeptLease::grant(&self.client, self.settings.keep_alive_ttl_secs()).await?;
            return Ok((lease.id(), true));
        }
        Ok((lease.id(), false))
    }

    async fn run_lease_id(&self) -> Result<i64, RendezvousError> {
        let mut lease = self.run_lease.lock().await;
        if lease.is_lost() {
            *lease =
                ensure_run_lease(&self.client, &self.keys, self.settings.retention_secs()).await?;
        }
        Ok(lease.id())
    }

    async fn join(
        &self,
        st: &mut RoundState,
        round: u64,
        lease: i64,
    ) -> Result<JoinOutcome, RendezvousError> {
        let k = &self.keys;
        let prev_rank = st.last.filter(|c| c.round + 1 == round).map(|c| c.rank);
        let record = NodeRecord {
            prev_rank,
            ..self.node.clone()
        };
        let run_lease = self.run_lease_id().await?;
        let mut ops = vec![
            TxnOp::put(
                k.member(round, &self.node.node_id),
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
        ];
        if round > 1 {
            // The members of the previous round watch for this marker, not for every join.
            let marker = Txn::new()
                .when([Compare::create_revision(
                    k.waiting(round),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::put(
                    k.waiting(round),
                    self.node.node_id.clone(),
                    Some(PutOptions::new().with_lease(run_lease)),
                )]);
            ops.push(TxnOp::txn(marker));
        }
        let stale: Vec<u64> = st
            .joined
            .iter()
            .copied()
            .filter(|r| r + 1 < round)
            .collect();
        for old in &stale {
            ops.push(TxnOp::delete(k.member(*old, &self.node.node_id), None));
        }
        let txn = Txn::new()
            .when([
                Compare::create_revision(k.final_key(round), CompareOp::Equal, 0),
                Compare::create_revision(k.closed(), CompareOp::Equal, 0),
            ])
            .and_then(ops)
            .or_else([TxnOp::get(k.current(), None), TxnOp::get(k.closed(), None)]);
        let resp = self.client.txn(txn).await?;
        let revision = resp.revision();
        let mut responses = resp.op_responses().iter();
        if resp.succeeded() {
            for old in stale {
                st.joined.remove(&old);
            }
            st.joined.insert(round);
            let _put = responses.next();
            let count = match responses.next() {
                Some(TxnOpResponse::Put(p)) => p.prev_key().map_or(0, |kv| kv.version()) + 1,
                _ => 0,
            };
            let ctl = match responses.next() {
                Some(TxnOpResponse::Get(g)) => g.kvs().to_vec(),
                _ => Vec::new(),
            };
            return Ok(JoinOutcome::Joined {
                count,
                ctl,
                revision,
            });
        }
        let current = match responses.next() {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().map(parse_round).transpose()?,
            _ => None,
        };
        let closed = matches!(responses.next(), Some(TxnOpResponse::Get(g)) if !g.kvs().is_empty());
        if closed {
            return Ok(JoinOutcome::Closed);
        }
        // Round `round` is final, so the open round is later.
        Ok(JoinOutcome::Stale {
            open_round: current.unwrap_or(0).max(round + 1),
        })
    }

    /// Writes the last-call marker unless one exists; returns the marker and whether we wrote it.
    async fn ensure_lastcall(
        &self,
        round: u64,
        deadline_ms: u64,
    ) -> Result<(LastCall, i64, bool), RendezvousError> {
        let key = self.keys.lastcall(round);
        let lc = LastCall {
            v: SCHEMA_VERSION,
            deadline_ms,
            writer: self.node.node_id.clone(),
        };
        let run_lease = self.run_lease_id().await?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                encode(&lc),
                Some(PutOptions::new().with_lease(run_lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = self.client.txn(txn).await?;
        let revision = resp.revision();
        if resp.succeeded() {
            return Ok((lc, revision, true));
        }
        match resp.op_responses().iter().next() {
            Some(TxnOpResponse::Get(g)) => match g.kvs().first() {
                Some(kv) => Ok((decode(kv.key(), kv.value())?, kv.mod_revision(), false)),
                None => Ok((lc, revision, false)),
            },
            _ => Err(RendezvousError::State(format!(
                "unexpected answer writing {key}"
            ))),
        }
    }

    /// True while some member of `round` is still in it: assigned a rank, its join record alive
    /// and not detached.
    async fn round_alive(&self, round: u64) -> Result<bool, RendezvousError> {
        let assigned = self
            .client
            .get(
                self.keys.assign_prefix(round),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        let records = self
            .client
            .get(
                self.keys.member_prefix(round),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let assigned: BTreeSet<String> = assigned
            .kvs()
            .iter()
            .filter_map(|kv| kv.key_str().ok()?.rsplit('/').next().map(str::to_string))
            .collect();
        for kv in records.kvs() {
            let rec: NodeRecord = decode(kv.key(), kv.value())?;
            if !rec.detached && assigned.contains(&rec.node_id) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn count_members(&self, round: u64) -> Result<i64, RendezvousError> {
        let resp = self
            .client
            .get(
                self.keys.member_prefix(round),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await?;
        Ok(resp.count())
    }

    /// Tries to complete `round`. `Ok(None)`: not (yet) possible, or someone else is doing it.
    async fn try_finalize(
        &self,
        round: u64,
        lastcall: Option<&(LastCall, i64)>,
    ) -> Result<Option<RoundResult>, RendezvousError> {
        let k = &self.keys;
        let (min, max) = (self.settings.min_nodes, self.settings.max_nodes);
        let resp = self
            .client
            .get(
                k.member_prefix(round),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let members_revision = resp.revision();
        let mut candidates = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            let rec: NodeRecord = decode(kv.key(), kv.value())?;
            candidates.push(Candidate {
                node_id: rec.node_id,
                hostname: rec.hostname,
                node_rank: rec.node_rank,
                prev_rank: rec.prev_rank,
                joined: kv.create_revision(),
            });
        }
        if candidates.len() < min {
            if let Some((lc, mod_rev)) = lastcall {
                if self.env.now_ms() >= lc.deadline_ms {
                    // Members left during the last call: withdraw it, the next join re-arms it.
                    let txn = Txn::new()
                        .when([Compare::mod_revision(
                            k.lastcall(round),
                            CompareOp::Equal,
                            *mod_rev,
                        )])
                        .and_then([TxnOp::delete(k.lastcall(round), None)]);
                    self.client.txn(txn).await?;
                }
            }
            return Ok(None);
        }
        let table = assign_ranks(candidates, max);
        let world_size = table.ranked.len();
        let token = self.env.token();
        let record = FinalRecord {
            v: SCHEMA_VERSION,
            round,
            world_size,
            token: token.clone(),
            members_revision,
            finalizer: self.node.node_id.clone(),
        };
        let run_lease = self.run_lease_id().await?;
        let leased = || Some(PutOptions::new().with_lease(run_lease));
        let assigns: Vec<TxnOp> = table
            .ranked
            .iter()
            .enumerate()
            .map(|(rank, c)| {
                let a = Assignment {
                    v: SCHEMA_VERSION,
                    rank,
                    world_size,
                    token: token.clone(),
                };
                TxnOp::put(k.assign(round, &c.node_id), encode(&a), leased())
            })
            .collect();
        let mut finish = vec![
            TxnOp::put(k.final_key(round), encode(&record), leased()),
            TxnOp::put(k.current(), (round + 1).to_string(), leased()),
        ];
        if round > 2 {
            // Nobody reads a round two behind the one just completed: drop its keys.
            let old = round - 2;
            let range =
                |prefix: String| TxnOp::delete(prefix, Some(DeleteOptions::new().with_prefix()));
            finish.push(range(k.round_prefix(old)));
            finish.push(range(k.assign_prefix(old)));
            finish.push(range(k.kv_prefix(old)));
        }
        let open = [
            Compare::create_revision(k.final_key(round), CompareOp::Equal, 0),
            Compare::create_revision(k.closed(), CompareOp::Equal, 0),
        ];
        let written = if assigns.len() + finish.len() <= self.settings.max_txn_ops {
            let mut ops = assigns;
            ops.extend(finish);
            self.client
                .txn(Txn::new().when(open).and_then(ops))
                .await?
                .succeeded()
        } else {
            self.finalize_in_chunks(round, &token, assigns, finish, open)
                .await?
        };
        if !written {
            return Ok(None);
        }
        let rank = table
            .ranked
            .iter()
            .position(|c| c.node_id == self.node.node_id);
        tracing::debug!(
            round,
            world_size,
            waiting = table.waiting.len(),
            "finalised the round"
        );
        Ok(Some(RoundResult { record, rank }))
    }

    async fn finalize_in_chunks(
        &self,
        round: u64,
        token: &str,
        assigns: Vec<TxnOp>,
        finish: Vec<TxnOp>,
        open: [Compare; 2],
    ) -> Result<bool, RendezvousError> {
        let k = &self.keys;
        let claim = encode(&Claim {
            v: SCHEMA_VERSION,
            node_id: self.node.node_id.clone(),
            token: token.to_string(),
        });
        let (lease, _) = self.node_lease_id().await?;
        let claimed = Txn::new()
            .when([
                Compare::create_revision(k.claim(round), CompareOp::Equal, 0),
                open[0].clone(),
            ])
            .and_then([TxnOp::put(
                k.claim(round),
                claim.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        if !self.client.txn(claimed).await?.succeeded() {
            return Ok(false);
        }
        let ours = || Compare::value(k.claim(round), CompareOp::Equal, claim.clone());
        let mut assigns = assigns.into_iter().peekable();
        while assigns.peek().is_some() {
            let chunk: Vec<TxnOp> = assigns.by_ref().take(self.settings.max_txn_ops).collect();
            if !self
                .client
                .txn(Txn::new().when([ours()]).and_then(chunk))
                .await?
                .succeeded()
            {
                return Ok(false);
            }
        }
        let mut ops = finish;
        ops.push(TxnOp::delete(k.claim(round), None));
        let mut compares = open.to_vec();
        compares.push(ours());
        Ok(self
            .client
            .txn(Txn::new().when(compares).and_then(ops))
            .await?
            .succeeded())
    }

    /// Reads this node's assignment in a finished round.
    async fn read_assignment(&self, record: FinalRecord) -> Result<RoundResult, RendezvousError> {
        let resp = self
            .client
            .get(self.keys.assign(record.round, &self.node.node_id), None)
            .await?;
        let rank = match resp.kvs().first() {
            Some(kv) => {
                let a: Assignment = decode(kv.key(), kv.value())?;
                (a.token == record.token).then_some(a.rank)
            }
            None => None,
        };
        Ok(RoundResult { record, rank })
    }

    /// Waits, as a joined node, until `round` is finished; finalises it when it is our turn.
    async fn await_round(
        &self,
        round: u64,
        joined: Joined,
        deadline: Instant,
        mut watch: RangeWatch,
    ) -> Result<RoundResult, RendezvousError> {
        let Joined {
            count: joined_count,
            ctl,
            revision: join_revision,
            prev_member,
        } = joined;
        let (min, max) = (
            self.settings.min_nodes as i64,
            self.settings.max_nodes as i64,
        );
        let mut view = CtlView::default();
        view.apply_snapshot(&self.keys, &ctl)?;
        if view.closed {
            return Err(self.closed_error());
        }
        let grace =
            Duration::from_secs(2) + jitter(&self.node.node_id, Duration::from_millis(1500));
        let mut next_attempt: Option<Instant> = None;
        let mut count = joined_count;
        // A newcomer does not start a round while the previous one lives: it waits for a
        // member of that round to join (or arm the last call), or for the round to dissolve.
        let mut gate_open = round == 1 || prev_member || view.lastcall.is_some();
        // `count` counts joins, an upper bound of the members (some may have left): at a
        // threshold, count the members themselves.
        if gate_open && count >= min.min(max) && (view.lastcall.is_none() || count >= max) {
            count = self.count_members(round).await?;
        }
        if gate_open && count >= min && view.lastcall.is_none() {
            let wait = if count >= max {
                0
            } else {
                self.settings.last_call_timeout.as_millis() as u64
            };
            let (lc, rev, mine) = self
                .ensure_lastcall(round, self.env.now_ms() + wait)
                .await?;
            if mine {
                next_attempt = Some(self.env.instant_at(lc.deadline_ms));
            }
            view.lastcall = Some((lc, rev));
        }
        if gate_open && count >= max {
            next_attempt = Some(Instant::now());
        }
        if next_attempt.is_none() {
            next_attempt = view.backup_time(&self.env, grace);
        }
        let mut lease_lost = self.node_lease.lock().await.lost_receiver();
        let mut watchdog = tokio::time::interval_at(
            Instant::now() + self.settings.keep_alive_ttl,
            self.settings.keep_alive_ttl,
        );
        loop {
            if let Some(record) = view.final_record.take() {
                return self.read_assignment(record).await;
            }
            if view.closed {
                return Err(self.closed_error());
            }
            if next_attempt.is_some_and(|t| t <= Instant::now()) && !view.claimed {
                if let Some(done) = self.try_finalize(round, view.lastcall.as_ref()).await? {
                    return Ok(done);
                }
                next_attempt = view.lastcall.as_ref().map(|_| Instant::now() + grace);
                continue;
            }
            let sleep_until = next_attempt.unwrap_or(deadline).min(deadline);
            tokio::select! {
                biased;
                item = watch.next() => match item? {
                    WatchItem::Events(events) => {
                        // Events up to the join are in the join's snapshot already.
                        let fresh = events
                            .iter()
                            .filter(|e| e.kv().is_some_and(|kv| kv.mod_revision() > join_revision));
                        for ev in fresh {
                            view.apply_event(&self.keys, ev)?;
                        }
                        gate_open |= view.lastcall.is_some();
                        if next_attempt.is_none() {
                            next_attempt = view.backup_time(&self.env, grace);
                        }
                    }
                    WatchItem::Resync { kvs, .. } => {
                        view = CtlView::default();
                        view.apply_snapshot(&self.keys, &kvs)?;
                        next_attempt = view.backup_time(&self.env, grace);
                    }
                },
                _ = tokio::time::sleep_until(sleep_until) => {
                    if Instant::now() >= deadline {
                        return Err(RendezvousError::Timeout(format!(
                            "round {round} of run '{}' did not complete within {:?} ({count} of min {min} nodes had joined when last counted)",
                            self.run_id, self.settings.timeout
                        )));
                    }
                }
                _ = watchdog.tick() => {
                    if !gate_open {
                        gate_open = !self.round_alive(round - 1).await?;
                        if gate_open {
                            tracing::info!(round, "the previous round dissolved; starting a new one");
                        }
                    }
                    // Progress for whoever watches the logs, and a safety net: a node that
                    // should have armed the last call may have died first.
                    count = self.count_members(round).await?;
                    let waited = deadline.saturating_duration_since(Instant::now());
                    tracing::info!(
                        round,
                        joined = count,
                        min_nodes = min,
                        max_nodes = max,
                        timeout_in_s = waited.as_secs(),
                        "waiting for the round: {count} node(s) joined (min {min}, max {max}){}",
                        if gate_open { "" } else { "; the previous round's members have not re-joined yet" }
                    );
                    if !gate_open {
                        continue;
                    }
                    if count >= min && view.lastcall.is_none() {
                        let wait = if count >= max { 0 } else { self.settings.last_call_timeout.as_millis() as u64 };
                        let (lc, rev, mine) = self.ensure_lastcall(round, self.env.now_ms() + wait).await?;
                        next_attempt = if mine { Some(self.env.instant_at(lc.deadline_ms)) } else { None };
                        view.lastcall = Some((lc, rev));
                        next_attempt = next_attempt.or_else(|| view.backup_time(&self.env, grace));
                    }
                    if count >= max {
                        next_attempt = Some(Instant::now());
                    }
                }
                changed = lease_lost.changed() => {
                    if changed.is_ok() && *lease_lost.borrow() {
                        return Err(RendezvousError::Connection(
                            format!("{LEASE_GONE}: this node's lease expired while waiting for the round (etcd unreachable for longer than keep_alive_ttl?)"),
                        ));
                    }
                }
            }
        }
    }

    /// One attempt at `round`: join it and wait for its outcome.
    async fn attempt_round(
        &self,
        st: &mut RoundState,
        round: u64,
        lease: i64,
        deadline: Instant,
    ) -> Result<Step, RendezvousError> {
        // Watch the round's control keys before joining: a live watch is served at once,
        // and together with the join's snapshot nothing is missed.
        let (watch, _) = RangeWatch::open_live(
            &self.client,
            self.keys.ctl_prefix(round),
            prefix_end(&self.keys.ctl_prefix(round)),
        )
        .await?;
        let (count, ctl, revision) = match self.join(st, round, lease).await? {
            JoinOutcome::Closed => return Ok(Step::Closed),
            JoinOutcome::Stale { open_round } => return Ok(Step::Stale(open_round)),
            JoinOutcome::Joined {
                count,
                ctl,
                revision,
            } => (count, ctl, revision),
        };
        tracing::debug!(round, joined = count, "joined round");
        let prev_member = st.last.is_some_and(|c| c.round + 1 == round);
        let result = self
            .await_round(
                round,
                Joined {
                    count,
                    ctl,
                    revision,
                    prev_member,
                },
                deadline,
                watch,
            )
            .await?;
        Ok(Step::Done(result))
    }

    fn closed_error(&self) -> RendezvousError {
        RendezvousError::Closed {
            run_id: self.run_id.clone(),
        }
    }

    async fn leave_round(&self, round: u64) {
        let _ = self
            .client
            .delete(self.keys.member(round, &self.node.node_id), None)
            .await;
        self.state.lock().await.joined.remove(&round);
    }
}

/// What a waiting node knows of its round's control keys.
#[derive(Debug, Default)]
struct CtlView {
    lastcall: Option<(LastCall, i64)>,
    final_record: Option<FinalRecord>,
    claimed: bool,
    closed: bool,
}

impl CtlView {
    fn apply_kv(
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
                self.lastcall = Some((decode(kv.key(), kv.value())?, kv.mod_revision()))
            }
            ("lastcall", true) => self.lastcall = None,
            ("final", false) => self.final_record = Some(decode(kv.key(), kv.value())?),
            ("claim", deleted) => self.claimed = !deleted,
            ("closed", false) => self.closed = true,
            _ => {}
        }
        Ok(())
    }

    fn apply_snapshot(&mut self, keys: &RunKeys, kvs: &[KeyValue]) -> Result<(), RendezvousError> {
        kvs.iter().try_for_each(|kv| self.apply_kv(keys, kv, false))
    }

    fn apply_event(&mut self, keys: &RunKeys, ev: &Event) -> Result<(), RendezvousError> {
        match ev.kv() {
            Some(kv) => self.apply_kv(keys, kv, ev.event_type() == EventType::Delete),
            None => Ok(()),
        }
    }

    /// When a node that is not the last call's writer should step in.
    fn backup_time(&self, env: &NodeEnv, grace: Duration) -> Option<Instant> {
        self.lastcall
            .as_ref()
            .map(|(lc, _)| env.instant_at(lc.deadline_ms) + grace)
    }
}

/// A stable per-node delay in `[0, max)`, so that backups do not all fire at once.
fn jitter(node_id: &str, max: Duration) -> Duration {
    let h = node_id.bytes().fold(0xcbf29ce484222325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    Duration::from_millis(h % (max.as_millis() as u64).max(1))
}

fn parse_round(kv: &KeyValue) -> Result<u64, RendezvousError> {
    std::str::from_utf8(kv.value())
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            RendezvousError::State(format!(
                "key '{}' should hold a round number",
                String::from_utf8_lossy(kv.key())
            ))
        })
}

/// The run lease: found under `lease`, or granted and published.
async fn ensure_run_lease(
    client: &EtcdClient,
    keys: &RunKeys,
    ttl_secs: i64,
) -> Result<KeptLease, RendezvousError> {
    let resp = client.get(keys.lease(), None).await?;
    if let Some(kv) = resp.kvs().first() {
        if kv.lease() != 0 {
            return Ok(KeptLease::keep(client, kv.lease(), ttl_secs));
        }
        return Err(RendezvousError::State(format!(
            "key '{}' is not bound to a lease; was it written by something else?",
            keys.lease()
        )));
    }
    let id = client.lease_grant(ttl_secs).await?;
    let txn = Txn::new()
        .when([Compare::create_revision(keys.lease(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            keys.lease(),
            id.to_string(),
            Some(PutOptions::new().with_lease(id)),
        )])
        .or_else([TxnOp::get(keys.lease(), None)]);
    let resp = client.txn(txn).await?;
    if resp.succeeded() {
        return Ok(KeptLease::keep(client, id, ttl_secs));
    }
    client.lease_revoke(id).await?;
    match resp.op_responses().iter().next() {
        Some(TxnOpResponse::Get(g)) => match g.kvs().first() {
            Some(kv) if kv.lease() != 0 => Ok(KeptLease::keep(client, kv.lease(), ttl_secs)),
            _ => Err(RendezvousError::State(format!(
                "key '{}' changed while we read it",
                keys.lease()
            ))),
        },
        _ => Err(RendezvousError::State(
            "unexpected transaction answer".into(),
        )),
    }
}

/// The join records of a round's members, in rank order.
pub(crate) async fn members_of(
    client: &EtcdClient,
    keys: &RunKeys,
    round: u64,
) -> Result<Vec<NodeRecord>, RendezvousError> {
    let assigns = client
        .get(
            keys.assign_prefix(round),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    let records = client
        .get(
            keys.member_prefix(round),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    let mut by_id = std::collections::HashMap::new();
    for kv in records.kvs() {
        let rec: NodeRecord = decode(kv.key(), kv.value())?;
        by_id.insert(rec.node_id.clone(), rec);
    }
    let mut ranked = Vec::new();
    for kv in assigns.kvs() {
        let a: Assignment = decode(kv.key(), kv.value())?;
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let node_id = key.rsplit('/').next().unwrap_or_default().to_string();
        if let Some(rec) = by_id.remove(&node_id) {
            ranked.push((a.rank, rec));
        }
    }
    ranked.sort_by_key(|(r, _)| *r);
    Ok(ranked.into_iter().map(|(_, rec)| rec).collect())
}

impl Drop for EtcdRendezvousHandler {
    fn drop(&mut self) {
        // The leases' keep-alive tasks stop with their `KeptLease`s; the monitor with this.
        if let Some(monitor) = self.state.get_mut().monitor.take() {
            monitor.abort();
        }
    }
}

#[async_trait]
impl RendezvousHandler for EtcdRendezvousHandler {
    fn backend(&self) -> &str {
        "etcd"
    }

    fn run_id(&self) -> &str {
        &self.run_id
    }

    async fn next_rendezvous(&self) -> Result<RendezvousInfo, RendezvousError> {
        let started = Instant::now();
        let deadline = started + self.settings.timeout;
        let before = self.client.stats().snapshot();
        let mut st = self.state.lock().await;
        if let Some(monitor) = st.monitor.take() {
            monitor.abort();
        }
        self.waiting.store(0, Ordering::Relaxed);
        let (mut lease, renewed) = self.node_lease_id().await?;
        if renewed {
            st.joined.clear();
        }
        let mut round = st.last.map(|c| c.round + 1).unwrap_or(1);
        let mut attempts = 0;
        let mut backoff = Duration::from_millis(100);
        loop {
            attempts += 1;
            if Instant::now() >= deadline {
                return Err(RendezvousError::Timeout(format!(
                    "no round of run '{}' completed within {:?}",
                    self.run_id, self.settings.timeout
                )));
            }
            let step = self.attempt_round(&mut st, round, lease, deadline).await;
            let result = match step {
                Ok(Step::Done(result)) => result,
                Ok(Step::Stale(open_round)) => {
                    round = open_round;
                    continue;
                }
                Ok(Step::Closed) => return Err(self.closed_error()),
                Err(e) if Instant::now() < deadline && (is_transient(&e) || is_lease_gone(&e)) => {
                    // Our join record stays (same lease, same join order): join again.
                    tracing::warn!(round, error = %e, "etcd unavailable; retrying");
                    // Jittered, so that a crowd of nodes does not retry in step.
                    let pause = backoff
                        .mul_f64(0.5 + self.env.fraction())
                        .min(deadline.saturating_duration_since(Instant::now()));
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    if is_lease_gone(&e) {
                        match self.replace_node_lease(&mut st).await {
                            Ok(new_lease) => lease = new_lease,
                            Err(e) if is_transient(&e) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    continue;
                }
                Err(e) => {
                    drop(st);
                    self.leave_round(round).await;
                    return Err(e);
                }
            };
            let Some(rank) = result.rank else {
                tracing::info!(
                    round,
                    "round completed without this node (max_nodes reached); waiting for the next"
                );
                round += 1;
                continue;
            };
            let record = result.record;
            st.last = Some(Completed { round, rank });
            let used = self.client.stats().snapshot().since(&before);
            tracing::debug!(
                round,
                rank,
                world_size = record.world_size,
                requests = used.requests,
                watch_events = used.watch_events,
                attempts,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "round complete"
            );
            let run_lease = self.run_lease_id().await?;
            st.monitor = Some(spawn_monitor(MonitorArgs {
                client: self.client.clone(),
                keys: self.keys.clone(),
                round,
                node_id: self.node.node_id.clone(),
                token: record.token.clone(),
                from_revision: record.members_revision + 1,
                events: self.events.clone(),
                waiting: self.waiting.clone(),
                lease_lost: self.node_lease.lock().await.lost_receiver(),
            }));
            let store = EtcdStore::new(
                self.client.clone(),
                self.keys.kv_prefix(round),
                run_lease,
                self.settings.store_timeout,
            );
            return Ok(RendezvousInfo {
                rank,
                world_size: record.world_size,
                round,
                store: Arc::new(store),
            });
        }
    }

    async fn is_closed(&self) -> Result<bool, RendezvousError> {
        let resp = self
            .client
            .get(
                self.keys.closed(),
                Some(GetOptions::new().with_count_only()),
            )
            .await?;
        Ok(resp.count() > 0)
    }

    async fn set_closed(&self) -> Result<(), RendezvousError> {
        let k = &self.keys;
        let record = encode(&ClosedRecord {
            v: SCHEMA_VERSION,
            by: self.node.node_id.clone(),
            at_ms: self.env.now_ms(),
        });
        for _ in 0..32 {
            let run_lease = self.run_lease_id().await?;
            let resp = self.client.get(k.current(), None).await?;
            let (open_round, guard) = match resp.kvs().first() {
                Some(kv) => (
                    parse_round(kv)?,
                    Compare::mod_revision(k.current(), CompareOp::Equal, kv.mod_revision()),
                ),
                None => (
                    1,
                    Compare::create_revision(k.current(), CompareOp::Equal, 0),
                ),
            };
            let leased = || Some(PutOptions::new().with_lease(run_lease));
            let txn = Txn::new().when([guard]).and_then([
                TxnOp::put(k.closed(), record.clone(), leased()),
                TxnOp::put(k.round_closed(open_round), record.clone(), leased()),
            ]);
            if self.client.txn(txn).await?.succeeded() {
                tracing::info!(run_id = %self.run_id, "closed the run");
                let _ = self.events.send(MembershipEvent::Closed);
                return Ok(());
            }
        }
        Err(RendezvousError::State(
            "the open round kept changing while closing the run".into(),
        ))
    }

    async fn num_nodes_waiting(&self) -> Result<usize, RendezvousError> {
        Ok(self.waiting.load(Ordering::Relaxed))
    }

    async fn shutdown(&self) -> Result<bool, RendezvousError> {
        let mut st = self.state.lock().await;
        if let Some(monitor) = st.monitor.take() {
            monitor.abort();
        }
        let lease = self.node_lease.lock().await;
        if let Some(last) = st.last {
            // Mark our record of the last round as left, so that its deletion reads as a
            // leave, not a failure, to the members watching it.
            let record = NodeRecord {
                left: true,
                ..self.node.clone()
            };
            self.rewrite_own_record(last.round, &record, lease.id())
                .await?;
        }
        st.joined.clear();
        lease.stop();
        // Revoking deletes our join records at once: peers are told we left.
        self.client.lease_revoke(lease.id()).await?;
        self.run_lease.lock().await.stop();
        tracing::debug!(node_id = %self.node.node_id, "left the rendezvous");
        Ok(true)
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<MembershipEvent>> {
        Some(self.events.subscribe())
    }
}
