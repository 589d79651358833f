//! [`World`]: one simulated run's etcd, checker and nodes, which the random driver
//! ([`crate::chaos`]) and scripted scenarios (the regression tests) act on.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdzv::etcd::keys::RunKeys;
use rdzv::etcd::RendezvousSettings;
use rdzv::RendezvousParameters;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::agent::{run_agent, AgentControl, AgentEnd, Shared};
use crate::check::Checker;
use crate::model::{Limits, Model};
use crate::server::{FaultRates, NodeLink, SimEtcd};
use crate::SimRng;

/// The run's parameters.
#[derive(Debug, Clone)]
pub struct WorldConfig {
    /// `min_nodes`.
    pub min_nodes: usize,
    /// `max_nodes`.
    pub max_nodes: usize,
    /// The node lease TTL (whole seconds).
    pub ttl_secs: u64,
    /// `last_call_timeout`.
    pub last_call: Duration,
    /// Clients give up on a request after this.
    pub request_timeout: Duration,
    /// `max_txn_ops` of etcd and of the settings.
    pub max_txn_ops: usize,
    /// `timeout` of one `next_rendezvous`.
    pub timeout: Duration,
}

impl Default for WorldConfig {
    fn default() -> Self {
        Self {
            min_nodes: 1,
            max_nodes: 3,
            ttl_secs: 3,
            last_call: Duration::from_secs(1),
            request_timeout: Duration::from_secs(2),
            max_txn_ops: 128,
            timeout: Duration::from_secs(120),
        }
    }
}

/// One node of the run.
struct Node {
    name: String,
    link: Arc<NodeLink>,
    control: Arc<AgentControl>,
    task: JoinHandle<AgentEnd>,
}

/// A simulated run. Create it inside the simulation's runtime.
pub struct World {
    /// The simulated etcd.
    pub etcd: SimEtcd,
    /// The invariant checker (the etcd's observer).
    pub checker: Arc<Mutex<Checker>>,
    shared: Shared,
    rng: SimRng,
    slots: Vec<Option<Node>>,
    incarnations: Vec<u32>,
}

impl World {
    /// A run with `cfg`, its random source `rng`, and no nodes yet.
    pub fn new(cfg: &WorldConfig, rng: SimRng) -> Self {
        let limits = Limits {
            max_txn_ops: cfg.max_txn_ops,
            min_lease_ttl: 2,
        };
        let etcd = SimEtcd::start(
            Model::new(limits),
            rng.clone(),
            FaultRates::none(),
            cfg.request_timeout,
        );
        let run_id = "job";
        let params =
            RendezvousParameters::new("etcd", "sim:2379", run_id, cfg.min_nodes, cfg.max_nodes)
                .expect("valid parameters");
        let settings = RendezvousSettings {
            prefix: "/rdzv".into(),
            timeout: cfg.timeout,
            last_call_timeout: cfg.last_call,
            keep_alive_ttl: Duration::from_secs(cfg.ttl_secs),
            retention: Duration::from_secs(3600),
            store_timeout: Duration::from_secs(60),
            node_rank: None,
            local_world_size: None,
            max_txn_ops: cfg.max_txn_ops,
            peer_probe: true,
            min_nodes: cfg.min_nodes,
            max_nodes: cfg.max_nodes,
        };
        let checker = Arc::new(Mutex::new(Checker::new(
            RunKeys::new(&settings.prefix, run_id),
            cfg.min_nodes,
            cfg.max_nodes,
        )));
        {
            let checker = checker.clone();
            let clock = etcd.clone();
            etcd.set_observer(Box::new(move |model, events, cause| {
                let now = clock.now_ms();
                lock(&checker).observe(model, events, cause, now);
            }));
        }
        let shared = Shared {
            etcd: etcd.clone(),
            checker: checker.clone(),
            params,
            settings,
            probes: Arc::default(),
        };
        Self {
            etcd,
            checker,
            shared,
            rng,
            slots: Vec::new(),
            incarnations: Vec::new(),
        }
    }

    /// Adds an empty slot; returns its index.
    pub fn add_slot(&mut self) -> usize {
        self.slots.push(None);
        self.incarnations.push(0);
        self.slots.len() - 1
    }

    /// Number of slots.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Starts a new node in `slot` (named `n<slot>.<incarnation>`); returns its name.
    pub fn start(&mut self, slot: usize) -> String {
        let skew = self.rng.range_u64(0, 60_000) as i64 - 30_000;
        self.start_skewed(slot, skew)
    }

    /// As [`World::start`], with the node's wall clock `skew_ms` ahead of the others.
    pub fn start_skewed(&mut self, slot: usize, skew_ms: i64) -> String {
        let incarnation = self.incarnations[slot];
        self.incarnations[slot] += 1;
        let name = format!("n{slot}.{incarnation}");
        let link = Arc::new(NodeLink::default());
        let control = Arc::new(AgentControl::default());
        let task = tokio::spawn(
            run_agent(
                self.shared.clone(),
                name.clone(),
                slot,
                link.clone(),
                self.rng.seed(),
                skew_ms,
                control.clone(),
            )
            .instrument(tracing::info_span!("node", name = %name)),
        );
        self.slots[slot] = Some(Node {
            name: name.clone(),
            link,
            control,
            task,
        });
        name
    }

    /// The name of the node in `slot`, if any.
    pub fn name(&self, slot: usize) -> Option<String> {
        self.slots[slot].as_ref().map(|n| n.name.clone())
    }

    /// The connection of the node in `slot`, to inject faults.
    pub fn link(&self, slot: usize) -> Option<Arc<NodeLink>> {
        self.slots[slot].as_ref().map(|n| n.link.clone())
    }

    /// Slots whose node runs.
    pub fn live(&self) -> Vec<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, n)| n.as_ref().is_some_and(|n| !n.task.is_finished()))
            .map(|(i, _)| i)
            .collect()
    }

    /// Names of the nodes that run.
    pub fn live_names(&self) -> BTreeSet<String> {
        self.live()
            .into_iter()
            .filter_map(|s| self.name(s))
            .collect()
    }

    /// A random live slot.
    pub fn pick_live(&self) -> Option<usize> {
        let live = self.live();
        (!live.is_empty()).then(|| live[self.rng.below(live.len())])
    }

    /// Crashes the node in `slot` (nothing it sent later is answered; its tasks stop).
    pub fn crash(&mut self, slot: usize) {
        if let Some(node) = self.slots[slot].take() {
            node.link.crash();
            node.task.abort();
            lock(&self.checker).on_gone(&node.name);
        }
    }

    /// Resets the peer-probe connections to the node in `slot`, which lives on: its watcher
    /// takes it for dead (a false crash report). Returns false if it has no live listener.
    pub fn reset_probe(&self, slot: usize) -> bool {
        self.slots[slot]
            .as_ref()
            .is_some_and(|n| self.shared.probes.reset(&format!("probe:{}", n.name)))
    }

    /// Asks the node in `slot` to leave gracefully.
    pub fn leave(&self, slot: usize) {
        if let Some(n) = &self.slots[slot] {
            n.control.leave.notify_one();
        }
    }

    /// Asks the node in `slot` to close the run.
    pub fn close(&self, slot: usize) {
        if let Some(n) = &self.slots[slot] {
            n.control.close.notify_one();
        }
    }

    /// Starts a node in every empty or ended slot (unless `closed`); returns how many.
    pub fn refill(&mut self, closed: bool) -> usize {
        let mut started = 0;
        for slot in 0..self.slots.len() {
            let ended = self.slots[slot]
                .as_ref()
                .is_none_or(|n| n.task.is_finished());
            if ended && !closed {
                self.start(slot);
                started += 1;
            }
        }
        started
    }

    /// The nodes acting now, with their rounds.
    pub fn acting(&self) -> BTreeMap<String, u64> {
        lock(&self.checker).acting()
    }

    /// The violations found so far.
    pub fn violations(&self) -> Vec<String> {
        lock(&self.checker).violations().to_vec()
    }

    /// Rounds finalised so far.
    pub fn rounds(&self) -> usize {
        lock(&self.checker).finals().len()
    }

    /// Waits (simulated time, checking every 50 ms) until `done` holds; false after `timeout`.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&World) -> bool,
    ) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ends every node (as crashes).
    pub fn stop_all(&mut self) {
        for slot in 0..self.slots.len() {
            self.crash(slot);
        }
    }
}

/// Locks a mutex, ignoring poisoning.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
