//! # rdzv-sim: deterministic simulation of rdzv's rendezvous
//!
//! The shipped protocol code ([`rdzv::etcd::EtcdRendezvousHandler`]) runs for many nodes in
//! one process, against an in-memory model of etcd v3 ([`model::Model`], served by
//! [`server::SimEtcd`] with fault injection), on a single-threaded tokio runtime whose clock is
//! simulated (paused: time jumps to the next timer when every task waits). Everything random
//! comes from one seeded source, so a seed replays the same interleaving exactly; a run's trace
//! hash says so.
//!
//! A run ([`run_seed`]) draws its configuration from the seed (nodes, spares, bounds, TTL,
//! last call, chunk size, fault rates), starts the nodes ([`agent`]), injects faults for a
//! while ([`chaos`]), then heals everything and checks that the job settles. The [`check`]er
//! verifies the invariants after every change of etcd and at every view a node reports.

#![warn(missing_docs)]

pub mod agent;
pub mod chaos;
pub mod check;
pub mod model;
pub mod probe;
pub mod server;
pub mod world;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use chaos::{run_seed, LIVELOCK_AFTER};

/// Runs `scenario` on a fresh simulation runtime (single thread, simulated clock) seeded with
/// `seed`, and returns its result.
///
/// # Panics
/// If the scenario panics, or if its simulated clock stops for [`LIVELOCK_AFTER`] of real time
/// (a task spins without waiting).
pub fn run_scripted<T, F, Fut>(seed: u64, scenario: F) -> T
where
    T: Send + 'static,
    F: FnOnce(SimRng) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    match on_sim_thread(format!("scenario-{seed}"), move || {
        scenario(SimRng::new(seed))
    }) {
        Some(v) => v,
        None => panic!(
            "livelock: the scenario's simulated clock stopped for {LIVELOCK_AFTER:?} of real time \
             (a task spins without waiting)"
        ),
    }
}

/// Runs the future `make` returns on a new thread, on a single-threaded runtime with a paused
/// clock; `None` if it has not finished after [`LIVELOCK_AFTER`] of real time (its thread is
/// then left running).
///
/// # Panics
/// If the future panics.
pub(crate) fn on_sim_thread<T, F, Fut>(name: String, make: F) -> Option<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .expect("a current-thread runtime");
            let _ = tx.send(runtime.block_on(make()));
        })
        .expect("a simulation thread");
    match rx.recv_timeout(LIVELOCK_AFTER) {
        Ok(v) => Some(v),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            panic!("the simulation panicked (see above)")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
    }
}

/// The simulation's one source of randomness (seeded; shared by everything in a run).
#[derive(Debug, Clone)]
pub struct SimRng(Arc<Mutex<fastrand::Rng>>);

impl SimRng {
    /// A source seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(fastrand::Rng::with_seed(seed))))
    }

    fn with<T>(&self, f: impl FnOnce(&mut fastrand::Rng) -> T) -> T {
        f(&mut self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// A number in `[lo, hi]`.
    pub fn range_u64(&self, lo: u64, hi: u64) -> u64 {
        self.with(|r| r.u64(lo..=hi.max(lo)))
    }

    /// An index below `n` (`n > 0`).
    pub fn below(&self, n: usize) -> usize {
        self.with(|r| r.usize(..n.max(1)))
    }

    /// True with probability `p`.
    pub fn chance(&self, p: f64) -> bool {
        p > 0.0 && self.with(|r| r.f64()) < p
    }

    /// A number in `[0, 1)`.
    pub fn fraction(&self) -> f64 {
        self.with(|r| r.f64())
    }

    /// A fresh 64-bit seed.
    pub fn seed(&self) -> u64 {
        self.with(|r| r.u64(..))
    }

    /// A duration in `[lo, hi]`, to the millisecond.
    pub fn duration(&self, lo: Duration, hi: Duration) -> Duration {
        Duration::from_millis(self.range_u64(lo.as_millis() as u64, hi.as_millis() as u64))
    }
}

/// What one simulated run found.
#[derive(Debug, Clone)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// The configuration the seed chose, in words.
    pub config: String,
    /// Rounds finalised.
    pub rounds: u64,
    /// Times the closed run started again (a requeued job).
    pub reopens: u64,
    /// Views nodes reported (a node completing a round).
    pub views: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Invariant checks run.
    pub checks: u64,
    /// Violations found (empty: the run passed).
    pub violations: Vec<String>,
    /// A hash of everything that happened, in order (equal for equal runs).
    pub trace: u64,
    /// Simulated time, in milliseconds.
    pub sim_ms: u64,
}

impl SimReport {
    /// True if no invariant was violated.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// Total faults injected.
    pub fn fault_count(&self) -> u64 {
        self.faults.values().sum()
    }
}
