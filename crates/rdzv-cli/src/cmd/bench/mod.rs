//! `rdzv bench`: what a rendezvous round costs as the job grows.
//!
//! Every participant is a tokio task of this process with its own handler; by default each has
//! its own etcd connection (`--connections K` shares K connections round-robin). All handlers
//! are created first (64 at a time), then the measured calls start together. With
//! `--processes P` (scenarios `full`, `kill`, `leave`, `scale-up`) the participants are spread
//! over P child processes instead, each participant with its own connection and lease as a real agent, so
//! that the client side is not one process's artefact (see [`processes`] for how the parent
//! directs the children and times their calls). Per job size N and scenario, one line (a table
//! row, or a JSON object with `--json`) reports:
//!
//! - `wall_s`: from the first participant's call (`full`), or from the event that starts the
//!   round (the crash, the leave, the newcomer's call) to the moment every participant has its
//!   rank; `last_join_to_ranked_s`: from the last participant's call to then;
//! - `p50_s`, `p99_s`: per-participant latency from its own call to its result;
//! - `wall_runs_s`: with `--runs`, the line gives medians; this is every run's `wall_s`,
//!   sorted (in the table, on a line below);
//! - `overloaded`: requests etcd refused with its backpressure (`too many requests`), retried;
//! - `requests`, `requests_per_node`, `watch_creates`, `watch_events`, `keep_alives`: what the
//!   participants' clients really sent and received during the round (counted by
//!   [`RequestStats`]; `requests` includes watch creations, not keep-alives);
//! - `cpu_s`: user+system CPU of this process during the round, `etcd_cpu_s` that of the
//!   etcd it started (absent with `--rdzv-endpoint`); `peak_rss_bytes`: this process's peak
//!   resident set during the round (VmHWM, reset before the round where the kernel allows);
//! - `etcd_requests`: what the etcd this command started counted itself during the round, from
//!   its `/metrics` (see [`etcd_metrics`]): `rpcs` (RPCs and streams started, all methods),
//!   `range`, `txn`, `put`, `delete_range`, `lease_grant`, `lease_revoke`, `watch_streams`,
//!   `watch_requests` and `keep_alive_requests` (messages on those streams),
//!   `proposals_committed` (absent with `--rdzv-endpoint`). In the table, on a line below.
//!
//! With `--processes P`, the line also has `processes`, `child_pids` (all exited when the line
//! is printed), and the client side's cost summed over the children of the measured round's
//! participants: `cpu_s` (their CPU from just before the round, or the event, until all their
//! participants are ranked), `peak_rss_bytes` (the sum of their peak resident sets over that
//! time), and per participant `cpu_per_node_s` and `rss_per_node_bytes` (those sums divided by
//! the participants, N or N-1 after a kill or leave, each process's runtime included). In
//! `kill`, `leave` and `scale-up` the leaving or arriving node has a child process of its own
//! (so P >= 2): `kill` kills that process (SIGKILL), `leave` tells it to leave and exit.
//!
//! Scenarios:
//!
//! - `full`: N nodes (min = max = N) form one round.
//! - `kill`: N nodes form a round (survivors have min = N-1, max = N and `--last-call`; the
//!   victim min = max = N, and is made to join before the last survivor, so the first round
//!   always has all N); then one member crashes (its runtime is dropped: no shutdown, its
//!   connection closes, its lease expires after `--ttl`). Measured: from the crash until the
//!   N-1 survivors, which wait for `PeerLost` (or, as a launcher does, for `NodesWaiting`:
//!   peers already waiting in the next round) and then call `next_rendezvous`, are all ranked.
//! - `leave`: the same with a graceful `shutdown()` instead of the crash.
//! - `scale-up`: N-1 nodes (min = N-1, max = N, last call 3 s, which the measured round does
//!   not wait for as it reaches max) form a round; then one more node calls
//!   `next_rendezvous`. Measured: from that call until all N, the members reacting to
//!   `NodesWaiting`, are ranked.
//!
//! - `last-call`: N nodes (min = 1, max = N + 1, so max is never reached) form one round that
//!   waits out its last call (`--last-call`, 30 s when 0): what waiting costs.
//! - `exit`: N nodes form a round, then all detach at once, as `rdzv run` does after its exit
//!   barrier. Measured: from the first detach until all are done (and the watches settled):
//!   what the end of a job costs.
//! - `idle`: N nodes form a round, then run for one `--ttl` (every lease is renewed about three
//!   times): `wall_s` is that window, and what was sent in it (lease renewals, other requests,
//!   watch events) and the CPU used is the steady cost of a running job; a line below gives
//!   them per second. Nothing but renewals is expected: anything else is churn.
//! - `etcd-limit`: no protocol: N clients send a round's request mix — one transaction each,
//!   one watch each, one event to all, one read each — phase by phase (see [`limit`]): the
//!   floor a `full` round cannot beat on this etcd and machine. Always in this process.
//!
//! The header line names the version of the etcd the command started (3.4's reads copy its
//! whole uncommitted write buffer, which makes a round of 4,096 nodes twice as slow as on
//! 3.5).
//!
//! In `kill`, `leave` and `scale-up`, the event comes 0.5 s after the first round, when the members' membership
//! watches are caught up (steady state). A member whose event channel overflowed (`Lagged`)
//! reacts as to an event.
//!
//! Ranks are checked: every participant of the measured round has the same round and world
//! size and a distinct rank in `0..world_size`; otherwise the line reports an error.
//!
//! `--profile` also times the phases of the measured round from the library's debug events
//! (join transaction answered, round finalised, round complete).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use indicatif::{ProgressBar, ProgressStyle};
use rdzv::etcd::api::GetOptions;
use rdzv::etcd::keys::RunKeys;
use rdzv::etcd::{
    ConnectionOptions, EtcdClient, EtcdRendezvousHandler, EtcdServer, EtcdServerOptions,
    RendezvousSettings, RequestStats, StatsSnapshot,
};
use rdzv::{MembershipEvent, RendezvousHandler, RendezvousParameters};
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

/// The members' last-call timeout in the `scale-up` scenario: long enough that the measured
/// round always reaches max_nodes (and so completes at once) rather than closing on min_nodes.
const SCALE_UP_LAST_CALL_S: f64 = 3.0;

/// Bound on waiting for the watches a round opens after it completes (for stable counts).
const SETTLE_LIMIT: Duration = Duration::from_secs(3);

/// Pause between a completed first round and the measured event (crash, leave, newcomer),
/// so that the members' membership watches are in their steady state: a watch opened at a
/// past revision is caught up by etcd's background sync, every 100 ms, 512 watches at a time.
const QUIESCE: Duration = Duration::from_millis(500);

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// N nodes form one round.
    Full,
    /// A member of a complete round crashes; the survivors form a new round.
    Kill,
    /// A member of a complete round freezes (SIGSTOP, with `--processes`): only its lease
    /// expiry can tell; the survivors form a new round.
    Freeze,
    /// A member of a complete round leaves gracefully; the others form a new round.
    Leave,
    /// One node joins a complete round of N-1; all N form a new round.
    ScaleUp,
    /// N nodes (min 1, max N+1) form one round that waits out its whole last call
    /// (`--last-call`, 30 s if 0).
    LastCall,
    /// N nodes form a round, then the whole job ends: all detach at once (as `rdzv run` after
    /// its exit barrier). Measured: the teardown.
    Exit,
    /// N nodes form a round, then run for one lease TTL: what a running job costs etcd
    /// (lease renewals, watches kept open) per second.
    Idle,
    /// No protocol: N clients send a round's request mix (one transaction each, one watch
    /// each, one event to all, one read each), phase by phase: the floor a round cannot beat
    /// on this etcd.
    EtcdLimit,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Full => "full",
            Scenario::Kill => "kill",
            Scenario::Freeze => "freeze",
            Scenario::Leave => "leave",
            Scenario::ScaleUp => "scale-up",
            Scenario::LastCall => "last-call",
            Scenario::Exit => "exit",
            Scenario::Idle => "idle",
            Scenario::EtcdLimit => "etcd-limit",
        }
    }
}

/// Arguments of `rdzv bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Job sizes to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "2,8,32,128")]
    nodes: Vec<usize>,

    /// etcd endpoint(s) to use; by default a throw-away local etcd is started.
    #[arg(long = "rdzv-endpoint", alias = "rdzv_endpoint")]
    endpoint: Option<String>,

    /// Number of etcd connections the participants share round-robin (default: one each).
    #[arg(long, value_name = "K")]
    connections: Option<usize>,

    /// Scenario(s): full, kill, leave, scale-up, last-call, exit, idle, etcd-limit (repeat the
    /// flag or separate with commas).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "full")]
    scenario: Vec<Scenario>,

    /// Measure each job size this many times and report the medians.
    #[arg(long, default_value_t = 1)]
    runs: usize,

    /// One JSON object per line (per job size and scenario) instead of a table.
    #[arg(long)]
    json: bool,

    /// The participants' keep_alive_ttl in seconds (how long a crash goes unnoticed; 2 to
    /// 604800, i.e. 7 days).
    #[arg(long, value_name = "SECS", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(2..=MAX_SECS))]
    ttl: u64,

    /// The survivors' last_call_timeout in seconds in `kill` and `leave` (0: the new round
    /// completes as soon as all survivors have joined; at most 604800).
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    last_call: f64,

    /// Bound on one measured round (the participants' `timeout`), in seconds (1 to 604800).
    #[arg(long, value_name = "SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
    round_timeout: u64,

    /// How many handlers (and connections) are set up at once.
    #[arg(long, value_name = "N", default_value_t = 64)]
    setup_concurrency: usize,

    /// Worker threads of the participants' runtime (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,

    /// Extra rendezvous configuration for every participant, `key=value,...`
    /// (e.g. `max_txn_ops=1024`).
    #[arg(long = "rdzv-conf", alias = "rdzv_conf", default_value = "")]
    conf: String,

    /// Extra argument for the etcd this command starts (repeatable, e.g.
    /// `--etcd-arg=--max-txn-ops=1024`).
    #[arg(long = "etcd-arg", value_name = "ARG", allow_hyphen_values = true)]
    etcd_args: Vec<OsString>,

    /// Also time the phases of the measured round (join, finalise, notification).
    #[arg(long)]
    profile: bool,

    /// Spread the participants over P child processes (this binary, re-executed), each
    /// participant with its own etcd connection and lease, as real agents (scenarios full,
    /// kill, leave, scale-up; the leaving or arriving node of the last three has a process of
    /// its own, and `kill` kills it). Adds per-node CPU and memory of the children. Default:
    /// all participants in this process.
    #[arg(long, value_name = "P")]
    processes: Option<usize>,
}

/// The longest duration a bench flag takes, in seconds ([`rdzv::MAX_TIMEOUT`]).
const MAX_SECS: u64 = rdzv::MAX_TIMEOUT.as_secs();

/// Runs `rdzv bench`.
///
/// # Errors
/// A usage error (exit code 2) for bad flags or configuration, found before etcd is started or
/// reached; another error if etcd cannot be started or reached, or a measurement cannot be set
/// up. A failed measurement (timeout, wrong ranks) is reported on its line and makes the exit
/// code 1.
pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    validate(&args).map_err(|e| crate::usage::usage(format!("{e:#}")))?;
    // The participants get a runtime of their own (its threads can carry the profiler), on a
    // thread of its own (a runtime cannot be started from within another).
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("rdzv-bench".into())
        .spawn(move || {
            let _ = tx.send(run_blocking(args));
        })
        .context("cannot start the benchmark thread")?;
    rx.await.context("the benchmark thread died")?
}

fn validate(args: &BenchArgs) -> anyhow::Result<()> {
    ensure!(
        !args.nodes.is_empty(),
        "--nodes needs at least one job size"
    );
    ensure!(
        !args.scenario.is_empty(),
        "--scenario needs at least one scenario"
    );
    ensure!(
        args.processes.is_some() || !args.scenario.contains(&Scenario::Freeze),
        "the freeze scenario needs --processes (it stops a participant's process)"
    );
    for &n in &args.nodes {
        ensure!(n >= 1, "--nodes: job sizes must be at least 1");
        if args.scenario.iter().any(|s| {
            matches!(
                s,
                Scenario::Kill | Scenario::Freeze | Scenario::Leave | Scenario::ScaleUp
            )
        }) {
            ensure!(
                n >= 2,
                "the kill, freeze, leave and scale-up scenarios need at least 2 nodes (got {n})"
            );
        }
    }
    ensure!(args.runs >= 1, "--runs must be at least 1");
    ensure!(
        args.last_call.is_finite() && (0.0..=MAX_SECS as f64).contains(&args.last_call),
        "--last-call must be a number of seconds from 0 to {MAX_SECS}"
    );
    ensure!(
        args.setup_concurrency >= 1,
        "--setup-concurrency must be at least 1"
    );
    if let Some(k) = args.connections {
        ensure!(k >= 1, "--connections must be at least 1");
    }
    if let Some(p) = args.processes {
        processes::validate(p, args)?;
    }
    if let Some(t) = args.threads {
        ensure!(t >= 1, "--threads must be at least 1");
    }
    if args.endpoint.is_some() && !args.etcd_args.is_empty() {
        bail!("--etcd-arg applies only to the etcd this command starts (no --rdzv-endpoint)");
    }
    // The participants' configuration, checked as the etcd backend will read it.
    let params = RendezvousParameters::new(
        "etcd",
        args.endpoint.as_deref().unwrap_or("127.0.0.1"),
        "bench",
        1,
        1,
    )?
    .with_config("last_call_timeout", format!("{}", args.last_call))
    .with_config("keep_alive_ttl", args.ttl.to_string())
    .with_config("timeout", args.round_timeout.to_string())
    .with_config_str(&args.conf)
    .context("invalid --rdzv-conf")?;
    ConnectionOptions::from_parameters(&params)
        .context("invalid --rdzv-endpoint or --rdzv-conf")?;
    RendezvousSettings::from_parameters(&params).context("invalid --rdzv-conf")?;
    Ok(())
}

fn run_blocking(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let profiler = args.profile.then(profile::Profiler::default);
    let dispatch = profiler.as_ref().map(profile::Profiler::dispatch);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("rdzv-bench-worker");
    if let Some(threads) = args.threads {
        builder.worker_threads(threads);
    }
    if let Some(dispatch) = dispatch.clone() {
        builder.on_thread_start(move || {
            // For the thread's whole life.
            std::mem::forget(tracing::dispatcher::set_default(&dispatch));
        });
    }
    let runtime = builder
        .build()
        .context("cannot start the participants' runtime")?;
    let _default = dispatch.as_ref().map(tracing::dispatcher::set_default);
    // SIGINT, SIGTERM, SIGHUP or SIGQUIT stop the bench cleanly: dropping its future stops
    // the etcd it started (and removes its data directory) and ends the child processes.
    let result = runtime.block_on(async {
        let mut signals = crate::cmd::signals::TerminationSignals::install()
            .context("cannot install the signal handlers")?;
        tokio::select! {
            r = bench(args, profiler) => r,
            sig = signals.recv() => {
                eprintln!("rdzv bench: stopped by signal {}", sig.signo());
                Ok(ExitCode::from(sig.exit_code()))
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

/// Raises the soft limit of open files to the hard limit; returns (before, after).
fn raise_nofile_limit() -> Option<(libc::rlim_t, libc::rlim_t)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one valid rlimit struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Some((before, lim.rlim_max));
        }
    }
    Some((before, before))
}

/// What the measurements share.
struct Ctx {
    endpoint: String,
    connections: Option<usize>,
    ttl: u64,
    last_call: f64,
    round_timeout: Duration,
    setup_concurrency: usize,
    conf: String,
    etcd_pid: Option<u32>,
    profiler: Option<profile::Profiler>,
    progress: bool,
    seq: AtomicUsize,
    /// `host:port` of the etcd this command started, whose `/metrics` it reads.
    metrics_addr: Option<String>,
    /// `--processes`.
    processes: Option<usize>,
}

async fn bench(args: BenchArgs, profiler: Option<profile::Profiler>) -> anyhow::Result<ExitCode> {
    let nofile = raise_nofile_limit();
    let mut server = match &args.endpoint {
        Some(_) => None,
        None => Some(
            EtcdServer::start_with(EtcdServerOptions {
                extra_args: args.etcd_args.clone(),
                ..Default::default()
            })
            .await
            .context("cannot start etcd (or pass --rdzv-endpoint)")?,
        ),
    };
    let endpoint = match (&args.endpoint, &server) {
        (Some(e), _) => e.clone(),
        (None, Some(s)) => s.endpoint(),
        (None, None) => unreachable!("a server is started without --rdzv-endpoint"),
    };
    let ctx = Ctx {
        endpoint,
        connections: args.connections,
        ttl: args.ttl,
        last_call: args.last_call,
        round_timeout: Duration::from_secs(args.round_timeout),
        setup_concurrency: args.setup_concurrency,
        conf: args.conf.clone(),
        etcd_pid: server.as_ref().map(EtcdServer::pid),
        profiler,
        progress: !args.json && std::io::stderr().is_terminal(),
        seq: AtomicUsize::new(0),
        metrics_addr: server.as_ref().map(EtcdServer::endpoint),
        processes: args.processes,
    };
    let mut out = std::io::stdout().lock();
    if !args.json {
        let version = match &ctx.metrics_addr {
            Some(addr) => etcd_metrics::etcd_version(addr).await,
            None => None,
        };
        let version = version.map_or_else(String::new, |v| format!(" {v}"));
        let etcd = match &server {
            Some(s) => format!("own etcd{version} at {} (pid {})", s.endpoint(), s.pid()),
            None => format!("etcd at {}", ctx.endpoint),
        };
        let files = match nofile {
            Some((a, b)) if a != b => format!("open files {a} -> {b}"),
            Some((a, _)) => format!("open files {a}"),
            None => "open files ?".into(),
        };
        let threads = args
            .threads
            .map_or_else(|| "1/CPU".to_string(), |t| t.to_string());
        let placement = match ctx.processes {
            Some(p) => format!("participants in {p} child processes"),
            None => "participants in this process".to_string(),
        };
        writeln!(
            out,
            "# rdzv bench: {etcd}; {placement}; connections {}; ttl {} s; kill/leave last call \
             {} s; runs {}; worker threads {threads}; {files}",
            ctx.connections
                .map_or_else(|| "1 per node".to_string(), |k| k.to_string()),
            ctx.ttl,
            ctx.last_call,
            args.runs,
        )?;
        writeln!(out, "{}", table_header())?;
        out.flush()?;
    }
    let mut failed = false;
    for &scenario in &args.scenario {
        for &n in &args.nodes {
            let mut reports = Vec::new();
            let mut error = None;
            for _ in 0..args.runs {
                match measure(&ctx, scenario, n).await {
                    Ok(r) => reports.push(r),
                    Err(e) => {
                        error = Some(format!("{e:#}"));
                        break;
                    }
                }
            }
            match error {
                None => {
                    let report = median_report(reports);
                    if args.json {
                        writeln!(out, "{}", serde_json::to_string(&report)?)?;
                    } else {
                        writeln!(out, "{}", table_row(&report))?;
                        if let Some(row) = runs_row(&report) {
                            writeln!(out, "{row}")?;
                        }
                        if let Some(p) = &report.phases {
                            writeln!(out, "{}", phases_row(p))?;
                        }
                        if let Some(l) = &report.limit {
                            writeln!(out, "{}", limit::limit_row(l))?;
                        }
                        if report.scenario == Scenario::Idle {
                            writeln!(out, "{}", idle_row(&report))?;
                        }
                        if let Some(row) = counters_row(&report) {
                            writeln!(out, "{row}")?;
                        }
                        if report.overloaded > 0 {
                            writeln!(
                                out,
                                "  etcd refused {} request(s) as overloaded (too many requests); \
                                 all were retried",
                                report.overloaded
                            )?;
                        }
                    }
                }
                Some(e) => {
                    failed = true;
                    if args.json {
                        let line = serde_json::json!({
                            "nodes": n,
                            "scenario": scenario,
                            "error": e,
                        });
                        writeln!(out, "{line}")?;
                    } else {
                        writeln!(out, "{:<9} {n:>6}  error: {e}", scenario.name())?;
                    }
                    eprintln!("rdzv bench: {} with {n} nodes failed: {e}", scenario.name());
                }
            }
            out.flush()?;
        }
    }
    if let Some(server) = server.as_mut() {
        server.stop();
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

// ---------------------------------------------------------------------------------------------
// Reports

mod child;
mod children;
mod etcd_metrics;
mod limit;
mod processes;
mod profile;
mod protocol;
mod report;
mod scenarios;

pub use child::run_child;

use report::*;
use scenarios::*;

#[cfg(test)]
mod tests {
    use super::*;

    fn result(node: usize, rank: usize, world_size: usize, round: u64) -> NodeResult {
        let now = Instant::now();
        NodeResult {
            node,
            start: now,
            end: now,
            rank,
            world_size,
            round,
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert!(percentile(&[], 50.0).is_nan());
        assert_eq!(median_f64(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median_f64(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median_u64(vec![5, 1, 3]), 3);
    }

    #[test]
    fn ranks_must_form_one_complete_round() {
        let ok: Vec<_> = (0..4).map(|i| result(i, 3 - i, 4, 2)).collect();
        assert_eq!(check_ranks(&ok, 4).unwrap(), 2);
        let duplicate = vec![result(0, 0, 2, 1), result(1, 0, 2, 1)];
        assert!(check_ranks(&duplicate, 2).is_err());
        let rounds = vec![result(0, 0, 2, 1), result(1, 1, 2, 2)];
        assert!(check_ranks(&rounds, 2).is_err());
        let size = vec![result(0, 0, 3, 1), result(1, 1, 3, 1)];
        assert!(check_ranks(&size, 2).is_err());
        assert!(check_ranks(&ok[..3], 4).is_err());
    }
}
