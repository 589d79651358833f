//! [`EtcdRendezvousHandler`]: PyTorch's `etcd` rendezvous semantics on the etcd v3 API, at
//! O(N) requests per round.
//!
//! # The round protocol
//! The run's `current` key names the one open round. A node joins round `r` with one
//! transaction, guarded by "`current` is `r` and the run is not closed", that writes its own
//! join record (bound to its lease), counts the round's joins (the version of one key), reads
//! the round's control keys, and — in nested transactions decided on the same state — arms the
//! last call when this join brings the count to `min_nodes`, and, for a member of round
//! `r - 1`, opens the round's `gate` and writes its `waiting` marker. When the guard fails, the
//! same transaction tells the node where the run is: the open round, whether it is closed, and,
//! if round `r` was completed meanwhile (maybe by this node, whose answer was lost), the node's
//! own rank in it. A node therefore never joins a round that was completed, and never leaves a
//! round it holds a rank in without learning it.
//!
//! - **Gate.** A newcomer (not a member of round `r - 1`) never starts round `r` by itself
//!   while round `r - 1` lives: it waits for the gate, opened by the first member of `r - 1`
//!   that re-joins, or — when `r - 1` dissolved (its members died, left or detached) — by one
//!   newcomer, the keeper, that watches `r - 1`'s join records. A newcomer beyond a full round
//!   `r - 1` (it had `max_nodes` members) is a **hot spare**: it writes no `waiting` marker, so
//!   the members are not disturbed, and it is admitted at the next round that has room (a
//!   member lost or leaving makes the members re-join, which opens the gate). A spare's wait
//!   does not count against `timeout` until the gate opens.
//! - **Last call.** The join that brings the count of joins to `min_nodes` arms it; its writer
//!   completes the round `last_call_timeout` later by its own monotonic clock; every other node
//!   steps in a grace period after that, counted from when it saw the last call (no wall clocks
//!   are compared). A join that brings the count to `max_nodes` completes the round at once.
//! - **Completing** (see [`super::finalize`]) reads the join records once, chooses members and
//!   ranks ([`super::ranks`]), and writes each member's assignment, `final` and `current =
//!   r + 1` in one transaction guarded by "`final` absent, not closed, `current` is `r`"
//!   (large rounds in chunks under a claim bound to the finaliser's lease; a finaliser that
//!   retries recognises its own claim). Too few members left at the deadline withdraw the last
//!   call; the next join re-arms it.
//!
//! Each node thus sends about four requests per round — the join, and three watches on one
//! stream: its round's control keys, its own assignment (which arrives with or before `final`,
//! so that it is not read; a node that has not seen it by then reads it), and after the round
//! its round's membership — and receives a constant number of watch events. etcd serves one
//! watch stream per node. After the round, the membership watch ([`super::monitor`]) reports
//! the first change — a peer lost or left, nodes waiting, a newer round, closing, this node's
//! own lease lost (its fence) — and stops.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, Mutex};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::api::{Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, PutOptions, Txn, TxnOp};
use super::backoff::Backoff;
use super::client::{is_lease_gone, is_transient, EtcdClient, LEASE_GONE};
use super::keys::RunKeys;
use super::lease::KeptLease;
use super::monitor::{spawn_monitor, MonitorArgs};
use super::node::{local_node_record, NodeEnv};
use super::options::{ConnectionOptions, RendezvousSettings};
use super::records::{decode, encode, Assignment, ClosedRecord, NodeRecord, SCHEMA_VERSION};
use super::round::Step;
use super::store::EtcdStore;
use crate::{
    MembershipEvent, RendezvousError, RendezvousHandler, RendezvousInfo, RendezvousParameters,
};

/// The etcd rendezvous handler. Create it with [`EtcdRendezvousHandler::connect`].
#[derive(Debug)]
pub struct EtcdRendezvousHandler {
    pub(super) run_id: String,
    pub(super) settings: RendezvousSettings,
    pub(super) client: EtcdClient,
    pub(super) keys: RunKeys,
    pub(super) node: NodeRecord,
    pub(super) node_lease: Mutex<KeptLease>,
    pub(super) run_lease: Mutex<KeptLease>,
    pub(super) state: Mutex<RoundState>,
    pub(super) events: broadcast::Sender<MembershipEvent>,
    pub(super) waiting: Arc<AtomicUsize>,
    pub(super) env: NodeEnv,
    /// This node's peer probe listener (peers watch it for a crash), while the handler lives.
    pub(super) probe_listener: Option<super::probe::ProbeListener>,
}

/// What this node remembers between rounds.
#[derive(Debug, Default)]
pub(super) struct RoundState {
    /// The last round this node completed with a rank.
    pub(super) last: Option<Completed>,
    /// Rounds in which this node may still have a join record.
    pub(super) joined: BTreeSet<u64>,
    /// The open round when the handler was created (where a fresh node starts).
    pub(super) open_round: u64,
    pub(super) monitor: Option<JoinHandle<()>>,
}

/// A round this node completed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Completed {
    pub(super) round: u64,
    pub(super) rank: usize,
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
        let node = NodeRecord {
            local_world_size: settings.local_world_size,
            ..local_node_record(params.local_addr.as_deref(), settings.node_rank)
        };
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
        let mut node = node;
        let probe_listener = match env.probe().filter(|_| settings.peer_probe) {
            Some(probe) => {
                let host = node
                    .addrs
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "127.0.0.1".into());
                match probe.listen(&host, &node.node_id) {
                    Ok(listener) => {
                        node.probe = Some(listener.addr.clone());
                        Some(listener)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "no peer probe: a crash of this node is noticed when its lease expires");
                        None
                    }
                }
            }
            None => None,
        };
        let node_lease = KeptLease::grant(&client, settings.keep_alive_ttl_secs()).await?;
        let presence = Presence {
            node_id: &node.node_id,
            lease: node_lease.id(),
        };
        let (run_lease, open_round) =
            ensure_run_lease(&client, &keys, settings.retention_secs(), Some(presence)).await?;
        tracing::debug!(run_id = %params.run_id, node_id = %node.node_id, open_round, "rendezvous handler ready");
        Ok(Self {
            run_id: params.run_id.clone(),
            settings,
            client,
            keys,
            node,
            node_lease: Mutex::new(node_lease),
            run_lease: Mutex::new(run_lease),
            state: Mutex::new(RoundState {
                open_round,
                ..RoundState::default()
            }),
            events: broadcast::channel(1024).0,
            waiting: Arc::new(AtomicUsize::new(0)),
            env,
            probe_listener,
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

    /// The address this node advertises to its peers (MASTER_ADDR if it gets rank 0): its
    /// first address, else loopback.
    pub fn advertised_addr(&self) -> String {
        self.node
            .addrs
            .first()
            .cloned()
            .unwrap_or_else(|| "127.0.0.1".into())
    }

    /// Where this node's peer probe listens, if it has one (see [`super::probe`]).
    pub fn probe_addr(&self) -> Option<&str> {
        self.probe_listener.as_ref().map(|l| l.addr.as_str())
    }

    /// Tells the peers watching this node's process that it leaves gracefully.
    fn say_farewell(&self) {
        if let Some(listener) = &self.probe_listener {
            listener.farewell();
        }
    }

    /// How many peers watch this node's process now (see [`super::probe`]): after a round
    /// of two or more, one (its ring predecessor) once that peer has connected.
    pub fn probe_watchers(&self) -> usize {
        self.probe_listener
            .as_ref()
            .map_or(0, super::probe::ProbeListener::watchers)
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

    /// Leaves after a completed round *without* looking like a failure to its members, and
    /// marks the round's job done: this node's join record is handed to the run lease (marked
    /// detached, so no peer sees it disappear), the next round's `done` marker stops the
    /// members' membership watches (so that the others leaving costs no more events), then
    /// the node's lease is revoked. For one-shot members such as `rdzv join`, and for `rdzv
    /// run` after its exit barrier.
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
            let key = self.keys.member(last.round, &self.node.node_id);
            let done = self.keys.done(last.round + 1);
            let txn = Txn::new().and_then([
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::create_revision(key.clone(), CompareOp::Greater, 0)])
                        .and_then([TxnOp::put(
                            key,
                            encode(&record),
                            Some(PutOptions::new().with_lease(run_lease)),
                        )]),
                ),
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::create_revision(done.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(
                            done,
                            self.node.node_id.clone(),
                            Some(PutOptions::new().with_lease(run_lease)),
                        )]),
                ),
            ]);
            self.retry_leaving("detach", || self.client.txn(txn.clone()))
                .await?;
            st.joined.remove(&last.round);
        }
        st.joined.clear();
        let lease = self.node_lease.lock().await;
        lease.stop();
        self.say_farewell();
        self.client.lease_revoke(lease.id()).await?;
        self.run_lease.lock().await.stop();
        Ok(())
    }

    /// Retries `op` on transient errors (jittered backoff) until the handler's timeout.
    pub(super) async fn retry_transient<T, F, Fut>(
        &self,
        what: &str,
        op: F,
    ) -> Result<T, RendezvousError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, RendezvousError>>,
    {
        self.retry_transient_within(what, self.settings.timeout, op)
            .await
    }

    /// Retries a step of leaving (`what`) on transient errors for at most the node lease's
    /// TTL (and the handler's timeout): past it the lease has expired on its own, so there is
    /// nothing left to undo, and a node whose etcd is gone (a c10d host that exited) must not
    /// wait for the whole rendezvous timeout before it can exit.
    async fn retry_leaving<T, F, Fut>(&self, what: &str, op: F) -> Result<T, RendezvousError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, RendezvousError>>,
    {
        let limit = self.settings.keep_alive_ttl.min(self.settings.timeout);
        self.retry_transient_within(what, limit, op).await
    }

    /// Retries `op` on transient errors (jittered backoff) for at most `limit`.
    async fn retry_transient_within<T, F, Fut>(
        &self,
        what: &str,
        limit: Duration,
        op: F,
    ) -> Result<T, RendezvousError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, RendezvousError>>,
    {
        let deadline = Instant::now() + limit;
        let mut backoff = Backoff::starting_at(Duration::from_millis(50));
        loop {
            match op().await {
                Err(e) if is_transient(&e) && Instant::now() < deadline => {
                    tracing::debug!(error = %e, "{what}: etcd unavailable; retrying");
                    tokio::time::sleep(backoff.next_pause(self.env.fraction())).await;
                }
                other => return other,
            }
        }
    }

    /// The node lease id; a new lease if the old one was lost (and with it every join record
    /// of this node, which `st` then forgets).
    pub(super) async fn node_lease_id(&self, st: &mut RoundState) -> Result<i64, RendezvousError> {
        let mut lease = self.node_lease.lock().await;
        if lease.is_lost() {
            tracing::warn!(node_id = %self.node.node_id, "this node's lease was lost; granting a new one");
            let old = lease.id();
            *lease = KeptLease::grant(&self.client, self.settings.keep_alive_ttl_secs()).await?;
            st.joined.clear();
            // The node's presence went with the old lease: while the node lives, a closed run
            // should not start again. Best effort: a node without it that finds the run
            // reopened joins it as a newcomer, and a lease lost again (an overloaded etcd) is
            // the join's to handle, as before.
            let (key, id) = (self.keys.agent(&self.node.node_id), lease.id());
            let put = Some(PutOptions::new().with_lease(id));
            if let Err(e) = self.client.put(key, Vec::new(), put).await {
                tracing::debug!(error = %e, "cannot renew this node's presence record");
            }
            // The old lease may still live in etcd (the fence is early): revoke it, so that
            // the peers learn at once that this node's records are gone.
            let _ = self.client.lease_revoke(old).await;
        }
        Ok(lease.id())
    }

    pub(super) async fn run_lease_id(&self) -> Result<i64, RendezvousError> {
        let mut lease = self.run_lease.lock().await;
        if lease.is_lost() {
            *lease = ensure_run_lease(
                &self.client,
                &self.keys,
                self.settings.retention_secs(),
                None,
            )
            .await?
            .0;
        }
        Ok(lease.id())
    }

    pub(super) fn closed_error(&self) -> RendezvousError {
        RendezvousError::Closed {
            run_id: self.run_id.clone(),
        }
    }

    /// Closes the run as an operator does (`rdzv close`): unlike a close by the job's own
    /// nodes ([`RendezvousHandler::set_closed`]), it stays closed for the run's retention
    /// even after every node has exited.
    ///
    /// # Errors
    /// As [`RendezvousHandler::set_closed`].
    ///
    /// # Cancel safety
    /// Cancel safe: the run is closed once or not at all.
    pub async fn close_by_operator(&self) -> Result<(), RendezvousError> {
        self.close_run(true).await
    }

    async fn close_run(&self, by_operator: bool) -> Result<(), RendezvousError> {
        let k = &self.keys;
        let record = encode(&ClosedRecord {
            v: SCHEMA_VERSION,
            by: self.node.node_id.clone(),
            at_ms: self.env.now_ms(),
            by_operator,
        });
        for _ in 0..64 {
            let run_lease = self.run_lease_id().await?;
            let resp = self
                .retry_transient("close", || {
                    self.client.txn(
                        Txn::new().and_then([
                            TxnOp::get(k.current(), None),
                            TxnOp::get(k.closed(), None),
                        ]),
                    )
                })
                .await?;
            if let Some(kv) = resp.get(1).and_then(|g| g.kvs().first()) {
                let existing = decode::<ClosedRecord>(kv.key(), kv.value())?;
                if by_operator && !existing.by_operator {
                    // Closed by its nodes: the operator's close makes it stay closed.
                    let txn = Txn::new()
                        .when([Compare::mod_revision(
                            k.closed(),
                            CompareOp::Equal,
                            kv.mod_revision(),
                        )])
                        .and_then([TxnOp::put(
                            k.closed(),
                            record.clone(),
                            Some(PutOptions::new().with_lease(run_lease)),
                        )]);
                    match self.client.txn(txn).await {
                        Ok(r) if r.succeeded() => {}
                        Ok(_) => continue,
                        Err(e) if is_transient(&e) => continue,
                        Err(e) => return Err(e),
                    }
                }
                let _ = self.events.send(MembershipEvent::Closed);
                return Ok(());
            }
            let (open_round, guard) = match resp.get(0).and_then(|g| g.kvs().first()) {
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
            // The open round's watchers and the last two rounds' members hear of it.
            let mut ops = vec![
                TxnOp::put(k.closed(), record.clone(), leased()),
                TxnOp::put(k.round_closed(open_round), record.clone(), leased()),
            ];
            if open_round > 1 {
                ops.push(TxnOp::put(
                    k.round_closed(open_round - 1),
                    record.clone(),
                    leased(),
                ));
            }
            let txn = Txn::new().when([guard]).and_then(ops);
            match self.client.txn(txn).await {
                Ok(r) if r.succeeded() => {
                    tracing::info!(run_id = %self.run_id, "closed the run");
                    let _ = self.events.send(MembershipEvent::Closed);
                    return Ok(());
                }
                Ok(_) => {}
                // The outcome is unknown: the next read tells.
                Err(e) if is_transient(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Err(RendezvousError::State(
            "the open round kept changing while closing the run".into(),
        ))
    }

    /// Removes this node's record (and its claim, if it holds one) of `round` after giving
    /// up on it.
    async fn leave_round(&self, st: &mut RoundState, round: u64) {
        let k = &self.keys;
        let lease = self.node_lease.lock().await.id();
        let claim = k.claim(round);
        let txn = Txn::new().and_then([
            TxnOp::delete(k.member(round, &self.node.node_id), None),
            TxnOp::txn(
                Txn::new()
                    .when([Compare::lease(claim.clone(), CompareOp::Equal, lease)])
                    .and_then([TxnOp::delete(claim, None)]),
            ),
        ]);
        if self.client.txn(txn).await.is_ok() {
            st.joined.remove(&round);
        }
    }
}

/// A node's presence record, written at connect.
#[derive(Debug, Clone, Copy)]
struct Presence<'a> {
    node_id: &'a str,
    lease: i64,
}

/// The run lease (found under `lease`, or granted and published with `current = 1`), and the
/// open round. With `presence`, the node's presence record is written in the same request,
/// and a run closed by its own nodes is started again if they have all exited (see
/// [`reopen_if_abandoned`]).
async fn ensure_run_lease(
    client: &EtcdClient,
    keys: &RunKeys,
    ttl_secs: i64,
    presence: Option<Presence<'_>>,
) -> Result<(KeptLease, u64), RendezvousError> {
    let mut ops = vec![
        TxnOp::get(keys.lease(), None),
        TxnOp::get(keys.current(), None),
        TxnOp::get(keys.closed(), None),
    ];
    if let Some(p) = presence {
        ops.push(TxnOp::put(
            keys.agent(p.node_id),
            Vec::new(),
            Some(PutOptions::new().with_lease(p.lease)),
        ));
    }
    let resp = client.txn(Txn::new().and_then(ops)).await?;
    let lease_kv = resp.get(0).and_then(|g| g.kvs().first()).cloned();
    let current_kv = resp.get(1).and_then(|g| g.kvs().first()).cloned();
    let closed_kv = resp.get(2).and_then(|g| g.kvs().first()).cloned();
    let current = match &current_kv {
        Some(kv) => Some(parse_round(kv)?),
        None => None,
    };
    if let Some(kv) = lease_kv {
        if kv.lease() == 0 {
            return Err(RendezvousError::State(format!(
                "key '{}' is not bound to a lease; was it written by something else?",
                keys.lease()
            )));
        }
        let (Some(open), Some(current_kv)) = (current, current_kv) else {
            return Err(RendezvousError::State(format!(
                "the run exists but '{}' is missing; was it written by an older rdzv?",
                keys.current()
            )));
        };
        let open = match (closed_kv, presence) {
            (Some(closed), Some(_)) => {
                reopen_if_abandoned(client, keys, &closed, &current_kv, kv.lease()).await?
            }
            _ => open,
        };
        return Ok((KeptLease::keep(client, kv.lease(), ttl_secs), open));
    }
    let id = client.lease_grant(ttl_secs).await?;
    let leased = || Some(PutOptions::new().with_lease(id));
    let txn = Txn::new()
        .when([Compare::create_revision(keys.lease(), CompareOp::Equal, 0)])
        .and_then([
            TxnOp::put(keys.lease(), id.to_string(), leased()),
            TxnOp::txn(
                Txn::new()
                    .when([Compare::create_revision(
                        keys.current(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then([TxnOp::put(keys.current(), "1", leased())]),
            ),
            TxnOp::get(keys.current(), None),
        ])
        .or_else([
            TxnOp::get(keys.lease(), None),
            TxnOp::get(keys.current(), None),
        ]);
    let resp = client.txn(txn).await?;
    if resp.succeeded() {
        let open = match resp.get(2).and_then(|g| g.kvs().first()) {
            Some(kv) => parse_round(kv)?,
            None => 1,
        };
        return Ok((KeptLease::keep(client, id, ttl_secs), open));
    }
    client.lease_revoke(id).await?;
    let lease = resp
        .get(0)
        .and_then(|g| g.kvs().first())
        .map(|kv| kv.lease());
    let open = match resp.get(1).and_then(|g| g.kvs().first()) {
        Some(kv) => parse_round(kv)?,
        None => 1,
    };
    match lease {
        Some(l) if l != 0 => Ok((KeptLease::keep(client, l, ttl_secs), open)),
        _ => Err(RendezvousError::State(format!(
            "key '{}' changed while we read it",
            keys.lease()
        ))),
    }
}

/// A run closed by its own nodes (its job failed) starts again, as a Kubernetes pod restart
/// or a SLURM requeue expects, once none of those nodes lives: when every presence record
/// was written after the close (this node's included, so the range is never empty). One
/// transaction, guarded on that and on `closed` and `current` being as read, deletes
/// `closed`, resets the restart budget and opens a fresh round after the closed one (the
/// closed rounds keep their closed markers, so a node of the old job that wakes up still
/// sees them closed). A run closed by an operator (`rdzv close`) stays closed. Returns the
/// open round.
async fn reopen_if_abandoned(
    client: &EtcdClient,
    keys: &RunKeys,
    closed_kv: &KeyValue,
    current_kv: &KeyValue,
    run_lease: i64,
) -> Result<u64, RendezvousError> {
    let closed: ClosedRecord = decode(closed_kv.key(), closed_kv.value())?;
    let open = parse_round(current_kv)?;
    if closed.by_operator {
        tracing::info!(closed_by = %closed.by, "the run was closed by an operator: it stays closed");
        return Ok(open);
    }
    let closed_at = closed_kv.mod_revision();
    let next = open + 1;
    let txn = Txn::new()
        .when([
            Compare::mod_revision(keys.closed(), CompareOp::Equal, closed_at),
            Compare::mod_revision(keys.current(), CompareOp::Equal, current_kv.mod_revision()),
            Compare::create_revision(keys.agent_prefix(), CompareOp::Greater, closed_at)
                .with_prefix(),
        ])
        .and_then([
            TxnOp::delete(keys.closed(), None),
            TxnOp::put(
                keys.current(),
                next.to_string(),
                Some(PutOptions::new().with_lease(run_lease)),
            ),
            TxnOp::delete(keys.restarts(), None),
            TxnOp::delete(
                keys.failed_prefix(),
                Some(DeleteOptions::new().with_prefix()),
            ),
        ])
        .or_else([
            TxnOp::get(keys.closed(), None),
            TxnOp::get(keys.current(), None),
        ]);
    let resp = client.txn(txn).await?;
    if resp.succeeded() {
        tracing::info!(
            closed_by = %closed.by,
            round = next,
            "the run was closed by its nodes, which have all exited: starting it again"
        );
        return Ok(next);
    }
    let open = match resp.get(1).and_then(|g| g.kvs().first()) {
        Some(kv) => parse_round(kv)?,
        None => open,
    };
    if resp.get(0).is_some_and(|g| !g.kvs().is_empty()) {
        tracing::info!(
            closed_by = %closed.by,
            "the run is closed and some of its nodes still run: it stays closed"
        );
    }
    Ok(open)
}

/// The largest round number: round numbers are zero-padded to 12 digits in keys (see
/// [`super::keys`]), and one more round must still fit.
pub const MAX_ROUND: u64 = 999_999_999_998;

/// The round number a key holds: the decimal text rdzv writes (no sign, no leading zeros,
/// no whitespace), from 1 to [`MAX_ROUND`].
///
/// # Errors
/// [`RendezvousError::State`] naming the key for anything else (foreign data).
pub(crate) fn parse_round(kv: &super::api::KeyValue) -> Result<u64, RendezvousError> {
    parse_round_value(kv.key(), kv.value())
}

/// [`parse_round`] on a key and value.
pub(crate) fn parse_round_value(key: &[u8], value: &[u8]) -> Result<u64, RendezvousError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<u64>().ok().filter(|r| r.to_string() == s))
        .filter(|r| (1..=MAX_ROUND).contains(r))
        .ok_or_else(|| {
            RendezvousError::State(format!(
                "key '{}' should hold a round number from 1 to {MAX_ROUND}, not {:?}; was it \
                 written by something else?",
                String::from_utf8_lossy(key),
                String::from_utf8_lossy(&value[..value.len().min(64)])
            ))
        })
}

/// The join records of a round's members, in rank order.
pub(crate) async fn members_of(
    client: &EtcdClient,
    keys: &RunKeys,
    round: u64,
) -> Result<Vec<NodeRecord>, RendezvousError> {
    let resp = client
        .txn(Txn::new().and_then([
            TxnOp::get(
                keys.assign_prefix(round),
                Some(GetOptions::new().with_prefix()),
            ),
            TxnOp::get(
                keys.member_prefix(round),
                Some(GetOptions::new().with_prefix()),
            ),
        ]))
        .await?;
    let mut by_id = std::collections::BTreeMap::new();
    for kv in resp.get(1).map(|g| g.kvs()).unwrap_or_default() {
        let rec: NodeRecord = decode(kv.key(), kv.value())?;
        by_id.insert(rec.node_id.clone(), rec);
    }
    let prefix = keys.assign_prefix(round);
    let mut ranked = Vec::new();
    for kv in resp.get(0).map(|g| g.kvs()).unwrap_or_default() {
        let a: Assignment = decode(kv.key(), kv.value())?;
        let node_id = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
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
        let mut deadline = started + self.settings.timeout;
        let before = self.client.stats().snapshot();
        let mut st = self.state.lock().await;
        if let Some(monitor) = st.monitor.take() {
            monitor.abort();
        }
        // No longer acting on a rank: while it waits, a slow etcd does not fence the node.
        self.node_lease.lock().await.stop_acting();
        self.waiting.store(0, Ordering::Relaxed);
        let mut round = st.last.map_or(st.open_round, |c| c.round + 1).max(1);
        let mut attempts = 0;
        let mut backoff = Backoff::starting_at(Duration::from_millis(100));
        loop {
            attempts += 1;
            if Instant::now() >= deadline {
                drop(st);
                let mut st = self.state.lock().await;
                self.leave_round(&mut st, round).await;
                return Err(RendezvousError::Timeout(format!(
                    "no round of run '{}' completed within {:?}",
                    self.run_id, self.settings.timeout
                )));
            }
            let lease = match self.node_lease_id(&mut st).await {
                Ok(l) => l,
                Err(e) if is_transient(&e) => {
                    tokio::time::sleep(backoff.next_pause(self.env.fraction())).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let step = self
                .attempt_round(&mut st, round, lease, &mut deadline)
                .await;
            let result = match step {
                Ok(Step::Done(result)) => result,
                Ok(Step::Stale(open_round)) => {
                    round = open_round;
                    continue;
                }
                Ok(Step::Closed) => return Err(self.closed_error()),
                Err(e) if is_transient(&e) || is_lease_gone(&e) => {
                    if is_lease_gone(&e) {
                        // etcd refused our lease: the next attempt grants a new one.
                        self.node_lease.lock().await.mark_lost();
                    }
                    // Join again: the join tells whether the round completed meanwhile (and
                    // this node's rank in it), or keeps this node's place in it.
                    tracing::warn!(round, error = %e, "etcd unavailable; retrying");
                    // Jittered, so that a crowd of nodes does not retry in step.
                    let pause = backoff
                        .next_pause(self.env.fraction())
                        .min(deadline.saturating_duration_since(Instant::now()));
                    tokio::time::sleep(pause).await;
                    continue;
                }
                Err(e) => {
                    self.leave_round(&mut st, round).await;
                    return Err(e);
                }
            };
            let Some(rank) = result.rank else {
                tracing::info!(
                    round,
                    world_size = result.record.world_size,
                    "round {round} completed without this node; joining round {}",
                    result.next_round
                );
                round = result.next_round;
                continue;
            };
            if !self.node_lease.lock().await.start_acting().await {
                // Its lease may have expired while it waited: it must not act on this rank.
                // The next attempt grants a new lease and revokes the old one, so the
                // round's members learn at once that this node is not with them.
                tracing::warn!(
                    round,
                    rank,
                    "this node's lease may have expired while it waited: it takes no rank in \
                     round {round}"
                );
                round = result.next_round;
                continue;
            }
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
                all_ranked: record.all_ranked,
                events: self.events.clone(),
                waiting: self.waiting.clone(),
                lease_lost: self.node_lease.lock().await.lost_receiver(),
                peer: result
                    .watch
                    .filter(|_| self.settings.peer_probe)
                    .zip(self.env.probe().cloned()),
                reuse: std::sync::Mutex::new(result.ctl_watch.map(|w| *w)),
            }));
            let store = EtcdStore::new(
                self.client.clone(),
                self.keys.kv_prefix(round),
                run_lease,
                self.settings.store_timeout,
            )
            .with_op_prefix(self.keys.op_prefix(round));
            return Ok(RendezvousInfo {
                rank,
                world_size: record.world_size,
                round,
                store: Arc::new(store),
                global_ranks: result.global,
            });
        }
    }

    async fn is_closed(&self) -> Result<bool, RendezvousError> {
        let resp = self.client.get(self.keys.closed(), None).await?;
        match resp.kvs().first() {
            // Foreign data is a state error, not a closed run.
            Some(kv) => decode::<ClosedRecord>(kv.key(), kv.value()).map(|_| true),
            None => Ok(false),
        }
    }

    async fn set_closed(&self) -> Result<(), RendezvousError> {
        self.close_run(false).await
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
            let key = self.keys.member(last.round, &self.node.node_id);
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Greater, 0)])
                .and_then([TxnOp::put(
                    key,
                    encode(&record),
                    Some(PutOptions::new().with_lease(lease.id())),
                )]);
            // Best effort: without the mark, peers see a loss instead of a leave.
            let _ = self.client.txn(txn).await;
        }
        st.joined.clear();
        lease.stop();
        self.say_farewell();
        // Revoking deletes our join records at once: peers are told we left.
        self.retry_leaving("leave", || self.client.lease_revoke(lease.id()))
            .await?;
        self.run_lease.lock().await.stop();
        tracing::debug!(node_id = %self.node.node_id, "left the rendezvous");
        Ok(true)
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<MembershipEvent>> {
        Some(self.events.subscribe())
    }
}

/// What a lost lease looks like to the retry loop.
pub(super) fn lease_gone_error(what: &str) -> RendezvousError {
    RendezvousError::Connection(format!("{LEASE_GONE}: {what}"))
}
