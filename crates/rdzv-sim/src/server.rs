//! [`SimEtcd`]: the [`Model`] served to simulated nodes on the simulated clock, and [`SimApi`]:
//! one node's connection to it, an [`EtcdApi`] with fault injection.
//!
//! Everything runs on a single-threaded tokio runtime with paused time: latencies, timeouts
//! and lease expiry are timers, so a run takes no wall-clock time to wait, and with the same
//! seed the same interleaving happens again. Faults come from the simulation's seeded random
//! source ([`SimRng`]) or are switched by the harness:
//!
//! - per request: dropped before etcd (not applied), "too many requests" (not applied), the
//!   response lost after etcd applied it, applied twice (a duplicated re-send), latency;
//! - per watch message: the stream breaks, latency;
//! - per node ([`NodeLink`]): crashed (nothing it sends is answered, ever), stalled until a
//!   time (requests are applied when the stall ends, answers after the client gave up are
//!   lost), partitioned until a time (nothing reaches etcd, watches break);
//! - cluster-wide: a leader change (requests fail as unavailable for a moment, some after being
//!   applied; every lease is extended by its TTL, as etcd's new leader does), compaction.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::model::{in_range, Model};
use crate::SimRng;
use rdzv::etcd::api::{
    ApiError, EtcdApi, Event, GetOptions, GetResponse, LeaseGrant, Txn, TxnOp, TxnResponse,
    WatchOptions, WatchResponse, WatchStream,
};

/// Probabilities of the random faults, per request or per watch message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultRates {
    /// A request never reaches etcd.
    pub drop_before: f64,
    /// etcd answers "too many requests" (not applied).
    pub overloaded: f64,
    /// etcd applies the request but its answer is lost.
    pub lose_response: f64,
    /// etcd applies the request twice (a re-send after a lost answer).
    pub duplicate: f64,
    /// A watch stream breaks instead of delivering a message.
    pub watch_break: f64,
    /// One-way latency, uniform in this range (milliseconds).
    pub latency_ms: (u64, u64),
    /// etcd sends a revision's messages to the watches of one stream one after the other:
    /// each after the first arrives up to this much later (milliseconds, uniform; 0: all
    /// together).
    pub revision_spread_ms: u64,
}

impl FaultRates {
    /// No random faults, 1–3 ms latency.
    pub fn none() -> Self {
        Self {
            drop_before: 0.0,
            overloaded: 0.0,
            lose_response: 0.0,
            duplicate: 0.0,
            watch_break: 0.0,
            latency_ms: (1, 3),
            revision_spread_ms: 0,
        }
    }
}

/// What a node's connection to etcd suffers now (switched by the harness).
#[derive(Debug, Default, Clone, Copy)]
struct LinkState {
    crashed: bool,
    stalled_until: Option<Instant>,
    partitioned_until: Option<Instant>,
}

/// A scripted fault of a node's transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The transaction never reaches etcd.
    DropBefore,
    /// etcd applies the transaction, its answer is lost.
    LoseResponse,
    /// etcd refuses the transaction with its backpressure (`too many requests`): not applied.
    Overloaded,
    /// etcd refuses the transaction because the lease it names is gone (expired between the
    /// grant and this request, as on an overloaded etcd): not applied.
    LeaseGone,
    /// The transaction is held on its way for this long, then applied (a slow link, a GC
    /// pause of the sender).
    Hold(Duration),
}

/// Matches the transactions a scripted fault applies to.
pub type TxnMatcher = Box<dyn Fn(&Txn) -> bool + Send + Sync>;

struct Rule {
    fault: Fault,
    remaining: usize,
    matches: TxnMatcher,
}

/// One node's connection to the simulated etcd.
#[derive(Default)]
pub struct NodeLink {
    state: Mutex<LinkState>,
    rules: Mutex<Vec<Rule>>,
    /// Range requests sent on this link.
    ranges: std::sync::atomic::AtomicUsize,
    /// Watch streams opened on this link.
    streams: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for NodeLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeLink")
            .field("state", &self.get())
            .finish()
    }
}

/// True if `txn` (or a nested transaction of it, in either branch) puts or deletes a key for
/// which `pred` holds.
pub fn txn_writes(txn: &Txn, pred: &dyn Fn(&[u8]) -> bool) -> bool {
    txn.success.iter().chain(&txn.failure).any(|op| match op {
        TxnOp::Put { key, .. } | TxnOp::Delete { key, .. } => pred(key),
        TxnOp::Txn(t) => txn_writes(t, pred),
        TxnOp::Get { .. } => false,
    })
}

impl NodeLink {
    /// Injects `fault` into the next `times` transactions of this node that `matches`.
    pub fn inject(
        &self,
        fault: Fault,
        times: usize,
        matches: impl Fn(&Txn) -> bool + Send + Sync + 'static,
    ) {
        lock(&self.rules).push(Rule {
            fault,
            remaining: times,
            matches: Box::new(matches),
        });
    }

    /// Removes every scripted fault.
    /// How many range requests (reads) were sent on this link.
    pub fn ranges(&self) -> usize {
        self.ranges.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many watch streams were opened on this link.
    pub fn watch_streams(&self) -> usize {
        self.streams.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Drops every scripted fault.
    pub fn clear_faults(&self) {
        lock(&self.rules).clear();
    }

    /// The scripted fault for `txn`, if one applies (and counts it).
    fn take_fault(&self, txn: &Txn) -> Option<Fault> {
        let mut rules = lock(&self.rules);
        let rule = rules
            .iter_mut()
            .find(|r| r.remaining > 0 && (r.matches)(txn))?;
        rule.remaining -= 1;
        Some(rule.fault)
    }

    fn get(&self) -> LinkState {
        *lock(&self.state)
    }

    /// Crashes the node: nothing it sends is answered any more.
    pub fn crash(&self) {
        lock(&self.state).crashed = true;
    }

    /// True once crashed.
    pub fn is_crashed(&self) -> bool {
        self.get().crashed
    }

    /// Stalls the connection until `until` (requests are held, then applied).
    pub fn stall_until(&self, until: Instant) {
        lock(&self.state).stalled_until = Some(until);
    }

    /// Cuts the node off from etcd until `until`.
    pub fn partition_until(&self, until: Instant) {
        lock(&self.state).partitioned_until = Some(until);
    }

    /// True while the node can neither reach nor hear etcd.
    pub fn is_cut_off(&self) -> bool {
        let s = self.get();
        let now = Instant::now();
        s.crashed
            || s.partitioned_until.is_some_and(|t| t > now)
            || s.stalled_until.is_some_and(|t| t > now)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What caused a change of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A node's request.
    Request,
    /// A lease expired (its keys were deleted).
    LeaseExpired(i64),
}

/// Called under the model's lock after every change, with the events of that change (one
/// revision) and its cause, before any watcher sees them.
pub type Observer = Box<dyn FnMut(&Model, &[Event], Cause) + Send>;

struct Watcher {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
    /// Whether its events carry the keys' previous values.
    prev_kv: bool,
    tx: mpsc::UnboundedSender<WatchResponse>,
}

/// An event as a watcher gets it: the model's events carry the previous value, which etcd
/// sends only to a watch that asked for it.
fn as_watched(e: &Event, prev_kv: bool) -> Event {
    Event {
        prev_kv: if prev_kv { e.prev_kv.clone() } else { None },
        ..e.clone()
    }
}

struct State {
    model: Model,
    watchers: BTreeMap<u64, Watcher>,
    next_watcher: u64,
    observer: Option<Observer>,
    unavailable_until: Option<Instant>,
}

struct Shared {
    state: Mutex<State>,
    leases_changed: Notify,
    epoch: Instant,
    rng: SimRng,
    rates: Mutex<FaultRates>,
    request_timeout: Duration,
}

/// The simulated etcd cluster. Cheap to clone.
#[derive(Clone)]
pub struct SimEtcd {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SimEtcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimEtcd")
    }
}

impl SimEtcd {
    /// A simulated etcd with `model` (call inside the simulation's runtime: it starts the task
    /// that expires leases). Clients give up on a request after `request_timeout`, as
    /// [`rdzv::etcd::api::GrpcEtcd`] does.
    pub fn start(model: Model, rng: SimRng, rates: FaultRates, request_timeout: Duration) -> Self {
        let sim = Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    model,
                    watchers: BTreeMap::new(),
                    next_watcher: 0,
                    observer: None,
                    unavailable_until: None,
                }),
                leases_changed: Notify::new(),
                epoch: Instant::now(),
                rng,
                rates: Mutex::new(rates),
                request_timeout,
            }),
        };
        tokio::spawn(expire_leases(Arc::downgrade(&sim.shared)));
        sim
    }

    /// Milliseconds since the start, the model's clock.
    pub fn now_ms(&self) -> u64 {
        self.shared.now_ms()
    }

    /// Sets the observer (the invariant checker).
    pub fn set_observer(&self, observer: Observer) {
        lock(&self.shared.state).observer = Some(observer);
    }

    /// Reads the model.
    pub fn with_model<T>(&self, f: impl FnOnce(&Model) -> T) -> T {
        f(&lock(&self.shared.state).model)
    }

    /// Changes the random fault rates.
    pub fn set_rates(&self, rates: FaultRates) {
        *lock(&self.shared.rates) = rates;
    }

    /// The current random fault rates.
    pub fn rates(&self) -> FaultRates {
        *lock(&self.shared.rates)
    }

    /// A leader change: requests fail as unavailable for `window` (some after being applied),
    /// and every lease is extended by its TTL.
    pub fn leader_change(&self, window: Duration) {
        let now = self.now_ms();
        let mut st = lock(&self.shared.state);
        st.model.leader_change(now);
        st.unavailable_until = Some(Instant::now() + window);
        drop(st);
        self.shared.leases_changed.notify_one();
    }

    /// Compacts the history up to the current revision; returns it.
    pub fn compact_now(&self) -> i64 {
        let mut st = lock(&self.shared.state);
        let rev = st.model.revision();
        let _ = st.model.compact(rev);
        rev
    }

    /// A connection for one node.
    pub fn connect(&self, link: Arc<NodeLink>) -> SimApi {
        SimApi {
            etcd: self.clone(),
            link,
        }
    }
}

impl Shared {
    fn rates(&self) -> FaultRates {
        *lock(&self.rates)
    }

    fn now_ms(&self) -> u64 {
        Instant::now().duration_since(self.epoch).as_millis() as u64
    }

    /// Applies a change under the lock, tells the observer, then the watchers.
    fn mutate<T>(
        &self,
        f: impl FnOnce(&mut Model, u64) -> Result<(T, Vec<Event>), ApiError>,
    ) -> Result<T, ApiError> {
        let now = self.now_ms();
        let mut st = lock(&self.state);
        let (value, events) = f(&mut st.model, now)?;
        if !events.is_empty() {
            publish(&mut st, &events, Cause::Request);
        }
        Ok(value)
    }
}

fn publish(st: &mut State, events: &[Event], cause: Cause) {
    let State {
        model,
        observer,
        watchers,
        ..
    } = st;
    if let Some(observe) = observer.as_mut() {
        observe(model, events, cause);
    }
    let revision = model.revision();
    watchers.retain(|_, w| {
        let mine: Vec<Event> = events
            .iter()
            .filter(|e| in_range(&e.kv.key, &w.start, w.end.as_deref()))
            .map(|e| as_watched(e, w.prev_kv))
            .collect();
        mine.is_empty()
            || w.tx
                .send(WatchResponse {
                    revision,
                    events: mine,
                    ..WatchResponse::default()
                })
                .is_ok()
    });
}

/// The task that revokes leases when their time is up (on the simulated clock).
async fn expire_leases(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let next = lock(&s.state).model.next_expiry();
        let epoch = s.epoch;
        let wake = async {
            match next {
                Some(ms) => tokio::time::sleep_until(epoch + Duration::from_millis(ms)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = s.leases_changed.notified() => {}
            _ = wake => {
                let now = s.now_ms();
                let mut st = lock(&s.state);
                let expired = st.model.expire(now);
                for (lease, events) in expired {
                    if !events.is_empty() {
                        publish(&mut st, &events, Cause::LeaseExpired(lease));
                    }
                }
            }
        }
    }
}

/// One node's [`EtcdApi`] on the simulated etcd.
#[derive(Clone)]
pub struct SimApi {
    etcd: SimEtcd,
    link: Arc<NodeLink>,
}

impl std::fmt::Debug for SimApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimApi")
    }
}

impl SimApi {
    fn shared(&self) -> &Shared {
        &self.etcd.shared
    }

    async fn latency(&self) {
        let (lo, hi) = self.shared().rates().latency_ms;
        let ms = self.shared().rng.range_u64(lo, hi.max(lo));
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    async fn hang_if_crashed(&self) {
        if self.link.is_crashed() {
            std::future::pending::<()>().await;
        }
    }

    /// One request: faults, then `apply` (maybe twice), then faults on the way back.
    async fn request<T: Send + 'static>(
        &self,
        duplicable: bool,
        apply: impl Fn(&mut Model, u64) -> Result<(T, Vec<Event>), ApiError> + Send + Sync + 'static,
    ) -> Result<T, ApiError> {
        self.hang_if_crashed().await;
        self.latency().await;
        let sent = Instant::now();
        let timeout = self.shared().request_timeout;
        let link = self.link.get();
        if link.partitioned_until.is_some_and(|t| t > sent) {
            tokio::time::sleep(timeout).await;
            return Err(ApiError::Unavailable("no answer (partitioned)".into()));
        }
        let rng = &self.shared().rng;
        let rates = self.shared().rates();
        if rng.chance(rates.drop_before) {
            return Err(ApiError::NotReached("connection reset (injected)".into()));
        }
        if rng.chance(rates.overloaded) {
            return Err(ApiError::Overloaded(
                "etcdserver: too many requests (injected)".into(),
            ));
        }
        if let Some(until) = link.stalled_until.filter(|t| *t > sent) {
            if until.duration_since(sent) >= timeout {
                // The request sits in a stalled connection and is applied when it resumes,
                // long after the client gave up.
                let shared = self.etcd.shared.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(until).await;
                    let _ = shared.mutate(apply);
                });
                tokio::time::sleep(timeout).await;
                return Err(ApiError::Unavailable("no answer (stalled)".into()));
            }
            tokio::time::sleep_until(until).await;
        }
        let unavailable = lock(&self.shared().state)
            .unavailable_until
            .is_some_and(|t| t > Instant::now());
        if unavailable && rng.chance(0.5) {
            return Err(ApiError::Unavailable(
                "etcdserver: leader changed (injected)".into(),
            ));
        }
        let mut answer = self.shared().mutate(&apply);
        if duplicable && answer.is_ok() && rng.chance(rates.duplicate) {
            answer = self.shared().mutate(&apply);
        }
        if answer.is_ok() && (unavailable || rng.chance(rates.lose_response)) {
            return Err(ApiError::Unavailable(
                "response lost after the request was applied (injected)".into(),
            ));
        }
        self.latency().await;
        self.hang_if_crashed().await;
        answer
    }
}

#[async_trait]
impl EtcdApi for SimApi {
    async fn range(&self, key: Vec<u8>, options: GetOptions) -> Result<GetResponse, ApiError> {
        self.link
            .ranges
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.request(false, move |m, _| {
            Ok((m.range(&key, &options)?, Vec::new()))
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, ApiError> {
        match self.link.take_fault(&txn) {
            Some(Fault::DropBefore) => {
                self.latency().await;
                Err(ApiError::NotReached("connection reset (scripted)".into()))
            }
            Some(Fault::Overloaded) => {
                self.latency().await;
                Err(ApiError::Overloaded(
                    "etcdserver: too many requests (scripted)".into(),
                ))
            }
            Some(Fault::LeaseGone) => {
                self.latency().await;
                Err(ApiError::LeaseNotFound)
            }
            Some(Fault::LoseResponse) => {
                self.request(false, move |m, _| m.txn(&txn)).await?;
                Err(ApiError::Unavailable(
                    "response lost after the request was applied (scripted)".into(),
                ))
            }
            Some(Fault::Hold(d)) => {
                tokio::time::sleep(d).await;
                self.request(true, move |m, _| m.txn(&txn)).await
            }
            None => self.request(true, move |m, _| m.txn(&txn)).await,
        }
    }

    async fn lease_grant(&self, ttl: i64) -> Result<LeaseGrant, ApiError> {
        let grant = self
            .request(false, move |m, now| {
                Ok((m.lease_grant(ttl, now), Vec::new()))
            })
            .await?;
        self.shared().leases_changed.notify_one();
        Ok(grant)
    }

    async fn lease_revoke(&self, id: i64) -> Result<(), ApiError> {
        let r = self
            .request(true, move |m, _| Ok(((), m.lease_revoke(id)?)))
            .await;
        self.shared().leases_changed.notify_one();
        r
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<i64, ApiError> {
        let ttl = self
            .request(true, move |m, now| {
                Ok((m.lease_keep_alive(id, now), Vec::new()))
            })
            .await?;
        self.shared().leases_changed.notify_one();
        Ok(ttl)
    }

    async fn lease_time_to_live(&self, id: i64) -> Result<Option<i64>, ApiError> {
        self.request(false, move |m, now| {
            Ok((m.lease_time_to_live(id, now), Vec::new()))
        })
        .await
    }

    async fn watch(
        &self,
        key: Vec<u8>,
        options: WatchOptions,
    ) -> Result<(Box<dyn WatchStream>, i64), ApiError> {
        self.link
            .streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.hang_if_crashed().await;
        self.latency().await;
        let sent = Instant::now();
        let timeout = self.shared().request_timeout;
        let link = self.link.get();
        let stalled_too_long = link
            .stalled_until
            .is_some_and(|t| t > sent && t.duration_since(sent) >= timeout);
        if link.partitioned_until.is_some_and(|t| t > sent) || stalled_too_long {
            tokio::time::sleep(timeout).await;
            return Err(ApiError::Unavailable("no answer to the watch".into()));
        }
        if let Some(until) = link.stalled_until.filter(|t| *t > sent) {
            tokio::time::sleep_until(until).await;
        }
        if self.shared().rng.chance(self.shared().rates().drop_before) {
            return Err(ApiError::NotReached("connection reset (injected)".into()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let revision = {
            let mut st = lock(&self.shared().state);
            register_watcher(&mut st, key, &options, &tx)
        };
        self.latency().await;
        self.hang_if_crashed().await;
        Ok((
            Box::new(SimWatch {
                api: self.clone(),
                tx: tx.downgrade(),
                rx,
                pending: None,
                last: None,
                broken: false,
            }),
            revision,
        ))
    }

    async fn compact(&self, revision: i64) -> Result<(), ApiError> {
        self.request(false, move |m, _| Ok((m.compact(revision)?, Vec::new())))
            .await
    }
}

/// Registers a watcher of `[key, end)` from the options' start revision (replaying the past
/// events, or telling of their compaction) that sends on `tx`; returns the model's revision.
fn register_watcher(
    st: &mut State,
    key: Vec<u8>,
    options: &WatchOptions,
    tx: &mpsc::UnboundedSender<WatchResponse>,
) -> i64 {
    let start = options.start_revision();
    let end = options.range_end().map(<[u8]>::to_vec);
    let revision = st.model.revision();
    let mut live = true;
    if start > 0 {
        match st.model.events_since(start, &key, end.as_deref()) {
            Ok(events) => {
                // Past events first, one message per revision, as etcd sends them.
                let mut by_rev: BTreeMap<i64, Vec<Event>> = BTreeMap::new();
                for e in events {
                    let e = as_watched(&e, options.prev_kv());
                    by_rev.entry(e.kv.mod_revision).or_default().push(e);
                }
                for (rev, events) in by_rev {
                    let _ = tx.send(WatchResponse {
                        revision: rev,
                        events,
                        ..WatchResponse::default()
                    });
                }
            }
            Err(_) => {
                let _ = tx.send(WatchResponse {
                    revision,
                    compact_revision: st.model.compact_revision(),
                    canceled: true,
                    cancel_reason: "required revision has been compacted".into(),
                    ..WatchResponse::default()
                });
                live = false;
            }
        }
    }
    tracing::trace!(start = %String::from_utf8_lossy(&key), from = start, revision, live, "sim: watch created");
    if live {
        // Registered under the same lock as the history read: nothing falls between.
        let id = st.next_watcher;
        st.next_watcher += 1;
        st.watchers.insert(
            id,
            Watcher {
                start: key,
                end,
                prev_kv: options.prev_kv(),
                tx: tx.clone(),
            },
        );
    }
    revision
}

/// A watch stream of a simulated node.
struct SimWatch {
    api: SimApi,
    /// Where this stream's watchers send (more are added by `add_watch`); weak, so that the
    /// stream ends when its last watcher is gone, as before.
    tx: mpsc::WeakUnboundedSender<WatchResponse>,
    rx: mpsc::UnboundedReceiver<WatchResponse>,
    /// The next message and when it is delivered (kept across cancelled calls: a watch
    /// stream's `message()` is cancel safe).
    pending: Option<(WatchResponse, Instant)>,
    /// The revision and delivery time of the last message.
    last: Option<(i64, Instant)>,
    broken: bool,
}

impl std::fmt::Debug for SimWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimWatch")
    }
}

#[async_trait]
impl WatchStream for SimWatch {
    async fn message(&mut self) -> Result<Option<WatchResponse>, ApiError> {
        self.api.hang_if_crashed().await;
        if self.broken {
            return Err(ApiError::Unavailable("watch stream broken".into()));
        }
        if self.pending.is_none() {
            let Some(msg) = self.rx.recv().await else {
                return Ok(None);
            };
            let now = Instant::now();
            let link = self.api.link.get();
            let rates = self.api.shared().rates();
            if link.partitioned_until.is_some_and(|t| t > now)
                || self.api.shared().rng.chance(rates.watch_break)
            {
                self.broken = true;
                return Err(ApiError::Unavailable(
                    "watch stream broken (injected)".into(),
                ));
            }
            let at = match self.last {
                // etcd sends a revision's messages to the watches of one stream one after
                // the other: they arrive together, or each a little after the one before.
                Some((rev, at)) if rev == msg.revision && at >= now => {
                    let spread = rates.revision_spread_ms;
                    if spread == 0 {
                        at
                    } else {
                        at + Duration::from_millis(self.api.shared().rng.range_u64(0, spread))
                    }
                }
                _ => {
                    let (lo, hi) = rates.latency_ms;
                    let latency =
                        Duration::from_millis(self.api.shared().rng.range_u64(lo, hi.max(lo)));
                    let stalled = link.stalled_until.filter(|t| *t > now).unwrap_or(now);
                    stalled + latency
                }
            };
            self.last = Some((msg.revision, at));
            self.pending = Some((msg, at));
        }
        if let Some((_, at)) = self.pending.as_ref().filter(|(_, at)| *at > Instant::now()) {
            tokio::time::sleep_until(*at).await;
        }
        self.api.hang_if_crashed().await;
        Ok(self.pending.take().map(|(msg, _)| msg))
    }

    async fn add_watch(&mut self, key: Vec<u8>, options: WatchOptions) -> Result<(), ApiError> {
        self.api.hang_if_crashed().await;
        if self.broken {
            return Err(ApiError::Unavailable("watch stream broken".into()));
        }
        // The request travels as a message on the stream: etcd reads it a latency later,
        // after writes that may have happened meanwhile (whose events it then misses).
        let api = self.api.clone();
        let Some(tx) = self.tx.upgrade() else {
            return Err(ApiError::Unavailable("watch stream ended".into()));
        };
        tokio::spawn(async move {
            api.latency().await;
            let mut st = lock(&api.shared().state);
            register_watcher(&mut st, key, &options, &tx);
        });
        Ok(())
    }
}
