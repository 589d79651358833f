//! One simulated run: a configuration drawn from the seed, the nodes, a period of faults, then
//! a quiet period after which the job must have settled ([`run_seed`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::server::FaultRates;
use crate::world::{lock, World, WorldConfig};
use crate::{SimReport, SimRng};

/// A run's configuration, drawn from its seed.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Nodes the job is meant to have (population, spares included).
    pub population: usize,
    /// The run's parameters (a small `max_txn_ops` forces chunked completion).
    pub world: WorldConfig,
    /// How long faults are injected.
    pub chaos: Duration,
    /// Mean time between injected faults.
    pub fault_interval: Duration,
    /// Random request faults in bursts reach these rates.
    pub burst: FaultRates,
    /// Whether some node closes the run during the chaos.
    pub close: bool,
    /// Whether, after the close, nodes keep arriving with the same run id (a Kubernetes pod
    /// restart, a SLURM requeue): the run starts again once the closed job's nodes are gone.
    pub requeue: bool,
}

impl SimConfig {
    /// Draws a configuration.
    pub fn draw(rng: &SimRng) -> Self {
        let max_nodes = rng.range_u64(1, 5) as usize;
        let min_nodes = rng.range_u64(1, max_nodes as u64) as usize;
        // Sometimes spares beyond max_nodes.
        let spares = if rng.chance(0.4) {
            rng.range_u64(1, 2) as usize
        } else {
            0
        };
        let ttl_secs = rng.range_u64(2, 4);
        let p = |hi: f64| rng.fraction() * hi;
        let last_call = if rng.chance(0.3) {
            Duration::ZERO
        } else {
            rng.duration(Duration::from_millis(200), Duration::from_millis(2500))
        };
        let request_timeout = rng.duration(Duration::from_secs(1), Duration::from_secs(5));
        let max_txn_ops = if rng.chance(0.25) { 8 } else { 128 };
        Self {
            population: max_nodes + spares,
            world: WorldConfig {
                min_nodes,
                max_nodes,
                ttl_secs,
                last_call,
                request_timeout,
                max_txn_ops,
                timeout: Duration::from_secs(120),
            },
            chaos: rng.duration(Duration::from_secs(20), Duration::from_secs(60)),
            fault_interval: rng.duration(Duration::from_millis(500), Duration::from_secs(4)),
            burst: FaultRates {
                drop_before: p(0.2),
                overloaded: p(0.1),
                lose_response: p(0.2),
                duplicate: p(0.1),
                watch_break: p(0.1),
                latency_ms: (1, rng.range_u64(3, 40)),
                revision_spread_ms: rng.range_u64(0, 5),
            },
            close: rng.chance(0.1),
            requeue: rng.chance(0.5),
        }
    }

    /// The configuration in words.
    pub fn describe(&self) -> String {
        format!(
            "population {}, nodes {}..{}, ttl {} s, last call {:?}, request timeout {:?}, \
             max_txn_ops {}, chaos {:?}, a fault every ~{:?}{}",
            self.population,
            self.world.min_nodes,
            self.world.max_nodes,
            self.world.ttl_secs,
            self.world.last_call,
            self.world.request_timeout,
            self.world.max_txn_ops,
            self.chaos,
            self.fault_interval,
            match (self.close, self.requeue) {
                (true, true) => ", closed during the run, then requeued",
                (true, false) => ", closed during the run",
                _ => "",
            }
        )
    }
}

/// The wall-clock time a run may take before it is reported as a livelock (a task that never
/// waits stops the simulated clock).
pub const LIVELOCK_AFTER: Duration = Duration::from_secs(60);

/// Runs the simulation for `seed` and checks it. A run whose simulated clock stops (some task
/// spins without waiting) is reported as a violation after [`LIVELOCK_AFTER`] of real time;
/// its thread is then left spinning (exit the process soon).
pub fn run_seed(seed: u64) -> SimReport {
    let sim_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let progress = sim_ms.clone();
    crate::on_sim_thread(format!("sim-{seed}"), move || simulate(seed, progress)).unwrap_or_else(
        || {
            let at = sim_ms.load(std::sync::atomic::Ordering::Relaxed);
            SimReport {
                seed,
                config: SimConfig::draw(&SimRng::new(seed)).describe(),
                rounds: 0,
                reopens: 0,
                views: 0,
                faults: BTreeMap::new(),
                checks: 0,
                violations: vec![format!(
                    "livelock: the simulated clock stopped near {at} ms (a task spins without \
                     waiting); still running after {LIVELOCK_AFTER:?} of real time"
                )],
                trace: 0,
                sim_ms: at,
            }
        },
    )
}

async fn simulate(seed: u64, progress: Arc<std::sync::atomic::AtomicU64>) -> SimReport {
    let rng = SimRng::new(seed);
    let cfg = SimConfig::draw(&rng);
    let mut world = World::new(&cfg.world, rng.clone());
    let etcd = world.etcd.clone();
    let checker = world.checker.clone();
    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut count = |kind: &'static str| *faults.entry(kind).or_default() += 1;
    // The nodes arrive within the first seconds, spares (the last slots) later.
    let started = Instant::now();
    for _ in 0..cfg.population {
        let slot = world.add_slot();
        tokio::time::sleep(rng.duration(Duration::ZERO, Duration::from_millis(1500))).await;
        world.start(slot);
    }
    let ttl = Duration::from_secs(cfg.world.ttl_secs);
    let chaos_end = started + cfg.chaos;
    let mut burst_until = Instant::now();
    let mut closed_by_us = false;
    while Instant::now() < chaos_end {
        progress.store(etcd.now_ms(), std::sync::atomic::Ordering::Relaxed);
        let pause = rng.duration(Duration::ZERO, cfg.fault_interval * 2);
        tokio::time::sleep(pause).await;
        if Instant::now() >= burst_until {
            etcd.set_rates(FaultRates::none());
        }
        let left = chaos_end.saturating_duration_since(Instant::now());
        let closed = lock(&checker).closed();
        // Faults end before the chaos does.
        let span = |lo: Duration, hi: Duration| rng.duration(lo, hi).min(left);
        match rng.below(100) {
            0..=14 => {
                if let Some(slot) = world.pick_live() {
                    tracing::info!(slot, "fault: crash");
                    world.crash(slot);
                    count("crash");
                }
            }
            15..=29 => {
                if let Some(link) = world.pick_live().and_then(|s| world.link(s)) {
                    let d = span(Duration::from_millis(200), ttl * 2);
                    tracing::info!(?d, "fault: stall");
                    link.stall_until(Instant::now() + d);
                    count("stall");
                }
            }
            30..=39 => {
                if let Some(link) = world.pick_live().and_then(|s| world.link(s)) {
                    let d = span(Duration::from_millis(500), ttl * 3);
                    tracing::info!(?d, "fault: partition");
                    link.partition_until(Instant::now() + d);
                    count("partition");
                }
            }
            40..=44 => {
                etcd.leader_change(span(
                    Duration::from_millis(100),
                    Duration::from_millis(1500),
                ));
                count("leader change");
            }
            45..=52 => {
                etcd.compact_now();
                count("compaction");
            }
            53..=62 => {
                if let Some(slot) = world.pick_live() {
                    world.leave(slot);
                    count("leave");
                }
            }
            63..=77 => {
                etcd.set_rates(cfg.burst);
                burst_until =
                    Instant::now() + span(Duration::from_millis(100), Duration::from_secs(3));
                count("request fault burst");
            }
            78..=79 if cfg.close && !closed_by_us => {
                if let Some(slot) = world.pick_live() {
                    world.close(slot);
                    closed_by_us = true;
                    count("close");
                }
            }
            80..=84 => {
                if let Some(slot) = world.pick_live() {
                    if world.reset_probe(slot) {
                        tracing::info!(slot, "fault: false crash report (probe connections reset)");
                        count("false crash report");
                    }
                }
            }
            _ => {
                // Replacements for the nodes that are gone (a newcomer each); after a close
                // only if the job is requeued.
                let n = world.refill((closed || closed_by_us) && !cfg.requeue);
                for _ in 0..n {
                    count("newcomer");
                }
            }
        }
    }
    // Quiet: no more faults; every slot gets a live node; the job must settle.
    etcd.set_rates(FaultRates::none());
    tokio::time::sleep_until(chaos_end).await;
    let closed = lock(&checker).closed() || closed_by_us;
    if closed && cfg.requeue {
        // The requeued job comes once the closed job's leases are surely gone (its nodes
        // ended without leaving, as after a crash).
        tokio::time::sleep(ttl * 2 + cfg.world.request_timeout).await;
    }
    world.refill(closed && !cfg.requeue);
    let stable = ttl * 2 + cfg.world.last_call + Duration::from_secs(5);
    // Long enough for: a lease to expire (TTL), a newcomer's gate, a last call with its
    // backups, a request timeout, and the stable window itself.
    let settle = ttl * 4
        + cfg.world.last_call * 2
        + cfg.world.request_timeout * 2
        + stable
        + Duration::from_secs(10);
    tokio::time::sleep(settle).await;
    let alive = world.live_names();
    let now = etcd.now_ms();
    let mut c = lock(&checker);
    c.check_settled(&alive, now, stable.as_millis() as u64);
    let report = SimReport {
        seed,
        config: cfg.describe(),
        rounds: c.finals().len() as u64,
        reopens: c.reopens(),
        views: c.views(),
        faults,
        checks: c.checks(),
        violations: c.violations().to_vec(),
        trace: c.trace(),
        sim_ms: now,
    };
    drop(c);
    world.stop_all();
    report
}
