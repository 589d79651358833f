//! `rdzv bench`: what a rendezvous round costs as the job grows.
//!
//! Every participant is a tokio task of this process with its own handler; by default each has
//! its own etcd connection (`--connections K` shares K connections round-robin). All handlers
//! are created first (64 at a time), then the measured calls start together. Per job size N and
//! scenario, one line (a table row, or a JSON object with `--json`) reports:
//!
//! - `wall_s`: from the first participant's call (`full`), or from the event that starts the
//!   round (the crash, the leave, the newcomer's call) to the moment every participant has its
//!   rank; `last_join_to_ranked_s`: from the last participant's call to then;
//! - `p50_s`, `p99_s`: per-participant latency from its own call to its result;
//! - `requests`, `requests_per_node`, `watch_creates`, `watch_events`, `keep_alives`: what the
//!   participants' clients really sent and received during the round (counted by
//!   [`RequestStats`]; `requests` includes watch creations, not keep-alives);
//! - `cpu_s`: user+system CPU of this process during the round, `etcd_cpu_s` that of the
//!   etcd it started (absent with `--rdzv-endpoint`); `peak_rss_bytes`: this process's peak
//!   resident set during the round (VmHWM, reset before the round where the kernel allows).
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
//! In these three, the event comes 0.5 s after the first round, when the members' membership
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
use etcd_client::GetOptions;
use indicatif::{ProgressBar, ProgressStyle};
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
    /// A member of a complete round leaves gracefully; the others form a new round.
    Leave,
    /// One node joins a complete round of N-1; all N form a new round.
    ScaleUp,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Full => "full",
            Scenario::Kill => "kill",
            Scenario::Leave => "leave",
            Scenario::ScaleUp => "scale-up",
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

    /// Scenario(s): full, kill, leave, scale-up (repeat the flag or separate with commas).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "full")]
    scenario: Vec<Scenario>,

    /// Measure each job size this many times and report the medians.
    #[arg(long, default_value_t = 1)]
    runs: usize,

    /// One JSON object per line (per job size and scenario) instead of a table.
    #[arg(long)]
    json: bool,

    /// The participants' keep_alive_ttl in seconds (how long a crash goes unnoticed).
    #[arg(long, value_name = "SECS", default_value_t = 3)]
    ttl: u64,

    /// The survivors' last_call_timeout in seconds in `kill` and `leave` (0: the new round
    /// completes as soon as all survivors have joined).
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    last_call: f64,

    /// Bound on one measured round (the participants' `timeout`), in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
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
}

/// Runs `rdzv bench`.
///
/// # Errors
/// If etcd cannot be started or reached, or a measurement cannot be set up. A failed
/// measurement (timeout, wrong ranks) is reported on its line and makes the exit code 1.
pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    validate(&args)?;
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
    for &n in &args.nodes {
        ensure!(n >= 1, "job sizes must be at least 1");
        if args.scenario.iter().any(|s| *s != Scenario::Full) {
            ensure!(
                n >= 2,
                "the kill, leave and scale-up scenarios need at least 2 nodes (got {n})"
            );
        }
    }
    ensure!(args.runs >= 1, "--runs must be at least 1");
    ensure!(args.ttl >= 2, "--ttl must be at least 2 seconds");
    ensure!(
        args.last_call.is_finite() && args.last_call >= 0.0,
        "--last-call must be a non-negative number of seconds"
    );
    ensure!(
        args.round_timeout >= 1,
        "--round-timeout must be at least 1"
    );
    ensure!(
        args.setup_concurrency >= 1,
        "--setup-concurrency must be at least 1"
    );
    if let Some(k) = args.connections {
        ensure!(k >= 1, "--connections must be at least 1");
    }
    if let Some(t) = args.threads {
        ensure!(t >= 1, "--threads must be at least 1");
    }
    if args.endpoint.is_some() && !args.etcd_args.is_empty() {
        bail!("--etcd-arg applies only to the etcd this command starts (no --rdzv-endpoint)");
    }
    rdzv::parse_config(&args.conf).context("invalid --rdzv-conf")?;
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
    let result = runtime.block_on(bench(args, profiler));
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
    };
    let mut out = std::io::stdout().lock();
    if !args.json {
        let etcd = match &server {
            Some(s) => format!("own etcd at {} (pid {})", s.endpoint(), s.pid()),
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
        writeln!(
            out,
            "# rdzv bench: {etcd}; connections {}; ttl {} s; kill/leave last call {} s; \
             runs {}; worker threads {threads}; {files}",
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
                        if let Some(p) = &report.phases {
                            writeln!(out, "{}", phases_row(p))?;
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

/// One line of output.
#[derive(Debug, Clone, Serialize)]
struct Report {
    /// The job size N.
    nodes: usize,
    scenario: Scenario,
    /// Participants of the measured round (N, or N-1 after a kill or leave).
    participants: usize,
    /// Participants that got a valid rank (all of them, or the line reports an error).
    ranked: usize,
    /// Measurements whose medians these are.
    runs: usize,
    /// etcd connections (clients) of the participants of the measured round.
    connections: usize,
    ttl_s: u64,
    /// The last_call_timeout of the participants of the measured round.
    last_call_s: f64,
    /// The measured round's number.
    round: u64,
    wall_s: f64,
    last_join_to_ranked_s: f64,
    p50_s: f64,
    p99_s: f64,
    max_s: f64,
    /// From the crash/leave/newcomer to each reacting participant's call (median, max).
    detect_p50_s: Option<f64>,
    detect_max_s: Option<f64>,
    requests: u64,
    requests_per_node: f64,
    watch_creates: u64,
    watch_events: u64,
    keep_alives: u64,
    cpu_s: f64,
    etcd_cpu_s: Option<f64>,
    peak_rss_bytes: u64,
    /// The resident set as the round started (the participants set up, idle).
    rss_start_bytes: u64,
    /// Creating the handlers (and connections) before the round.
    setup_s: f64,
    setup_requests: u64,
    phases: Option<profile::Phases>,
}

fn table_header() -> String {
    format!(
        "{:<9} {:>6} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>8} {:>7} {:>7} {:>7} {:>8} {:>7}",
        "scenario",
        "nodes",
        "wall_s",
        "last→rk_s",
        "p50_s",
        "p99_s",
        "detect_s",
        "requests",
        "req/nd",
        "watch_ev",
        "keepaliv",
        "cpu_s",
        "etcd_s",
        "rss_MiB",
        "setup_s",
        "set_req",
    )
}

fn table_row(r: &Report) -> String {
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
    format!(
        "{:<9} {:>6} {:>8.3} {:>9.3} {:>8.3} {:>8.3} {:>8} {:>8} {:>7.2} {:>8} {:>8} {:>7.2} {:>7} {:>7.1} {:>8.2} {:>7}",
        r.scenario.name(),
        r.nodes,
        r.wall_s,
        r.last_join_to_ranked_s,
        r.p50_s,
        r.p99_s,
        opt(r.detect_p50_s),
        r.requests,
        r.requests_per_node,
        r.watch_events,
        r.keep_alives,
        r.cpu_s,
        r.etcd_cpu_s
            .map_or_else(|| "-".to_string(), |v| format!("{v:.2}")),
        r.peak_rss_bytes as f64 / (1024.0 * 1024.0),
        r.setup_s,
        r.setup_requests,
    )
}

fn phases_row(p: &profile::Phases) -> String {
    format!(
        "  phases: join txn p50 {:.3} s max {:.3} s; all joined at {:.3} s; finalise {:.3} s \
         ({} by the finaliser); finalised at {:.3} s; final → ranked p50 {:.3} s max {:.3} s",
        p.join_p50_s,
        p.join_max_s,
        p.all_joined_s,
        p.finalise_s,
        p.finaliser_requests
            .map_or_else(|| "? requests".to_string(), |r| format!("{r} requests")),
        p.finalised_s,
        p.notify_p50_s,
        p.notify_max_s,
    )
}

fn median_f64(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn median_u64(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values
        .get(values.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(0)
}

/// Per-field medians of several measurements of the same thing.
fn median_report(reports: Vec<Report>) -> Report {
    let mut out = reports[reports.len() / 2].clone();
    if reports.len() == 1 {
        return out;
    }
    let f = |get: fn(&Report) -> f64| median_f64(reports.iter().map(get).collect());
    let u = |get: fn(&Report) -> u64| median_u64(reports.iter().map(get).collect());
    let o = |get: fn(&Report) -> Option<f64>| {
        let v: Vec<f64> = reports.iter().filter_map(get).collect();
        (!v.is_empty()).then(|| median_f64(v))
    };
    out.runs = reports.len();
    out.wall_s = f(|r| r.wall_s);
    out.last_join_to_ranked_s = f(|r| r.last_join_to_ranked_s);
    out.p50_s = f(|r| r.p50_s);
    out.p99_s = f(|r| r.p99_s);
    out.max_s = f(|r| r.max_s);
    out.detect_p50_s = o(|r| r.detect_p50_s);
    out.detect_max_s = o(|r| r.detect_max_s);
    out.requests = u(|r| r.requests);
    out.requests_per_node = f(|r| r.requests_per_node);
    out.watch_creates = u(|r| r.watch_creates);
    out.watch_events = u(|r| r.watch_events);
    out.keep_alives = u(|r| r.keep_alives);
    out.cpu_s = f(|r| r.cpu_s);
    out.etcd_cpu_s = o(|r| r.etcd_cpu_s);
    out.peak_rss_bytes = u(|r| r.peak_rss_bytes);
    out.rss_start_bytes = u(|r| r.rss_start_bytes);
    out.setup_s = f(|r| r.setup_s);
    out.setup_requests = u(|r| r.setup_requests);
    // Phases: those of the run with the median wall time.
    let mut by_wall: Vec<&Report> = reports.iter().collect();
    by_wall.sort_by(|a, b| a.wall_s.total_cmp(&b.wall_s));
    out.phases = by_wall[by_wall.len() / 2].phases.clone();
    out
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// Process resources

/// User plus system CPU time of this process, in seconds.
fn process_cpu_s() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// User plus system CPU time of process `pid` (from /proc), in seconds.
fn pid_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based, of the whole line).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) / ticks as f64)
}

/// This process's peak resident set (VmHWM), in bytes.
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Returns freed heap memory to the system (so that an earlier, larger measurement does not
/// hold the resident set up), then resets VmHWM to the current resident set where the kernel
/// allows (Linux 4.0+).
fn reset_peak_rss() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// This process's current resident set (VmRSS), in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Resource counters at the start of a measured round.
struct Usage {
    stats: StatsSnapshot,
    rss: u64,
    cpu_s: f64,
    etcd_cpu_s: Option<f64>,
    at: Instant,
}

impl Usage {
    fn start(ctx: &Ctx, clients: &[EtcdClient]) -> Self {
        reset_peak_rss();
        Self {
            rss: rss_bytes(),
            stats: sum_stats(clients),
            cpu_s: process_cpu_s(),
            etcd_cpu_s: ctx.etcd_pid.and_then(pid_cpu_s),
            at: Instant::now(),
        }
    }
}

fn sum_stats(clients: &[EtcdClient]) -> StatsSnapshot {
    clients
        .iter()
        .map(|c| c.stats().snapshot())
        .fold(StatsSnapshot::default(), |a, s| StatsSnapshot {
            requests: a.requests + s.requests,
            watch_creates: a.watch_creates + s.watch_creates,
            watch_events: a.watch_events + s.watch_events,
            keep_alives: a.keep_alives + s.keep_alives,
        })
}

/// Waits (bounded) until the clients have opened `expected` watches since `since`: a member
/// opens its membership watch from a task started as its round completes.
async fn settle_watches(clients: &[EtcdClient], since: &StatsSnapshot, expected: u64) {
    let deadline = Instant::now() + SETTLE_LIMIT;
    while sum_stats(clients).since(since).watch_creates < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Participants

fn progress_bar(ctx: &Ctx, len: usize, what: &str) -> ProgressBar {
    if !ctx.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix:>28} [{bar:40}] {pos}/{len} {elapsed_precise}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what.to_string());
    bar
}

/// Participants sharing a set of connections.
struct Group {
    clients: Vec<EtcdClient>,
    handlers: Vec<Arc<EtcdRendezvousHandler>>,
    setup_s: f64,
    setup_requests: u64,
}

impl Group {
    /// Connects `connections` clients and creates `count` handlers on them, round-robin,
    /// `ctx.setup_concurrency` at a time.
    async fn create(
        ctx: &Ctx,
        params: &RendezvousParameters,
        count: usize,
        connections: usize,
        label: &str,
    ) -> anyhow::Result<Self> {
        let started = Instant::now();
        let options = ConnectionOptions::from_parameters(params)?;
        let bar = progress_bar(ctx, connections + count, label);
        let clients = bounded(connections, ctx.setup_concurrency, &bar, |_| {
            let options = options.clone();
            async move {
                let client = options.connect().await?;
                Ok(EtcdClient::with_stats(
                    client,
                    Arc::new(RequestStats::default()),
                ))
            }
        })
        .await
        .context("cannot connect to etcd")?;
        let settings = RendezvousSettings::from_parameters(params)?;
        let handlers = bounded(count, ctx.setup_concurrency, &bar, |i| {
            let client = clients[i % connections].clone();
            let params = params.clone();
            let settings = settings.clone();
            async move {
                let handler = EtcdRendezvousHandler::with_client(client, &params, settings).await?;
                Ok(Arc::new(handler))
            }
        })
        .await
        .context("cannot create the rendezvous handlers")?;
        bar.finish_and_clear();
        let setup_requests = sum_stats(&clients).requests;
        Ok(Self {
            clients,
            handlers,
            setup_s: started.elapsed().as_secs_f64(),
            setup_requests,
        })
    }

    /// Leaves, gracefully (best effort). All at once: each `shutdown()` first stops its own
    /// membership watch, so starting them together keeps the members from watching each
    /// other leave (one by one, N leaves cost O(N²) watch events and membership reads).
    async fn shutdown(self) {
        let mut set = JoinSet::new();
        for h in &self.handlers {
            let h = h.clone();
            set.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(30), h.shutdown()).await;
            });
        }
        while set.join_next().await.is_some() {}
    }
}

/// Runs `make(i)` for `i` in `0..count`, at most `limit` at a time; results in index order.
async fn bounded<T, F, Fut>(
    count: usize,
    limit: usize,
    bar: &ProgressBar,
    mut make: F,
) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let mut set = JoinSet::new();
    let mut out: Vec<Option<T>> = (0..count).map(|_| None).collect();
    let mut next = 0;
    while next < count || !set.is_empty() {
        while next < count && set.len() < limit {
            let fut = make(next);
            let i = next;
            set.spawn(async move { (i, fut.await) });
            next += 1;
        }
        if let Some(joined) = set.join_next().await {
            let (i, result) = joined.context("a setup task panicked")?;
            out[i] = Some(result?);
            bar.inc(1);
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// The outcome of one participant's measured call.
#[derive(Debug, Clone, Copy)]
struct NodeResult {
    /// Index in the measurement (for the profiler).
    node: usize,
    /// When it called `next_rendezvous`.
    start: Instant,
    end: Instant,
    rank: usize,
    world_size: usize,
    round: u64,
}

/// One participant's `next_rendezvous`, timed.
async fn timed_round(
    node: usize,
    handler: Arc<EtcdRendezvousHandler>,
) -> anyhow::Result<NodeResult> {
    let start = Instant::now();
    let info = handler
        .next_rendezvous()
        .instrument(tracing::info_span!("bench_node", idx = node))
        .await
        .with_context(|| format!("participant {node}"))?;
    Ok(NodeResult {
        node,
        start,
        end: Instant::now(),
        rank: info.rank,
        world_size: info.world_size,
        round: info.round,
    })
}

/// Waits for every task of `set` (bounded), ticking `bar`.
async fn collect(
    set: &mut JoinSet<anyhow::Result<NodeResult>>,
    limit: Duration,
    bar: &ProgressBar,
) -> anyhow::Result<Vec<NodeResult>> {
    let mut results = Vec::with_capacity(set.len());
    let all = async {
        while let Some(joined) = set.join_next().await {
            results.push(joined.context("a participant task panicked")??);
            bar.inc(1);
        }
        Ok::<_, anyhow::Error>(())
    };
    let outcome = tokio::time::timeout(limit, all).await;
    bar.finish_and_clear();
    match outcome {
        Ok(Ok(())) => Ok(results),
        Ok(Err(e)) => {
            set.abort_all();
            Err(e)
        }
        Err(_) => {
            let done = results.len();
            set.abort_all();
            bail!("only {done} participants were ranked within {limit:?}")
        }
    }
}

/// Checks that the results form one complete round of `expected` participants.
fn check_ranks(results: &[NodeResult], expected: usize) -> anyhow::Result<u64> {
    ensure!(
        results.len() == expected,
        "{} results for {expected} participants",
        results.len()
    );
    let round = results[0].round;
    let rounds: BTreeSet<u64> = results.iter().map(|r| r.round).collect();
    ensure!(
        rounds.len() == 1,
        "participants ended in different rounds: {rounds:?}"
    );
    let sizes: BTreeSet<usize> = results.iter().map(|r| r.world_size).collect();
    ensure!(
        sizes.len() == 1 && sizes.contains(&expected),
        "round {round}: world sizes {sizes:?}, expected {expected}"
    );
    let ranks: BTreeSet<usize> = results.iter().map(|r| r.rank).collect();
    ensure!(
        ranks.len() == expected && ranks.iter().all(|&r| r < expected),
        "round {round}: ranks are not a permutation of 0..{expected} ({} distinct)",
        ranks.len()
    );
    Ok(round)
}

fn params_for(
    ctx: &Ctx,
    run_id: &str,
    min: usize,
    max: usize,
    last_call: f64,
) -> anyhow::Result<RendezvousParameters> {
    let params = RendezvousParameters::new("etcd", &ctx.endpoint, run_id, min, max)?
        .with_local_addr("127.0.0.1")
        .with_config("last_call_timeout", format!("{last_call}"))
        .with_config("keep_alive_ttl", ctx.ttl.to_string())
        .with_config("timeout", ctx.round_timeout.as_secs().to_string())
        .with_config("connect_timeout", "30")
        .with_config_str(&ctx.conf)?;
    Ok(params)
}

fn fresh_run_id(ctx: &Ctx, scenario: Scenario, n: usize) -> String {
    let seq = ctx.seq.fetch_add(1, Ordering::Relaxed);
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!(
        "bench-{}-{ms}-{}-n{n}-{seq}",
        std::process::id(),
        scenario.name()
    )
}

/// Polls (with an uncounted client) until `prefix` holds at least `target` keys.
async fn wait_for_count(observer: &EtcdClient, prefix: &str, target: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = observer
            .get(
                prefix,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await?;
        if resp.count() >= target as i64 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {} of {target} nodes joined the first round within 60 s",
            resp.count()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Starts `count` tasks that wait for `go`, then call `next_rendezvous`.
fn spawn_at_signal(
    handlers: &[Arc<EtcdRendezvousHandler>],
    go: &watch::Receiver<bool>,
) -> JoinSet<anyhow::Result<NodeResult>> {
    let mut set = JoinSet::new();
    for (i, h) in handlers.iter().enumerate() {
        let h = h.clone();
        let mut go = go.clone();
        set.spawn(async move {
            go.wait_for(|g| *g).await.context("start signal lost")?;
            timed_round(i, h).await
        });
    }
    set
}

// ---------------------------------------------------------------------------------------------
// Measurements

async fn measure(ctx: &Ctx, scenario: Scenario, n: usize) -> anyhow::Result<Report> {
    if let Some(p) = &ctx.profiler {
        p.clear();
    }
    match scenario {
        Scenario::Full => measure_full(ctx, n).await,
        Scenario::Kill => measure_departure(ctx, n, true).await,
        Scenario::Leave => measure_departure(ctx, n, false).await,
        Scenario::ScaleUp => measure_scale_up(ctx, n).await,
    }
}

/// What a measured round produced, before it becomes a [`Report`].
struct Measured<'a> {
    ctx: &'a Ctx,
    scenario: Scenario,
    n: usize,
    group: &'a Group,
    last_call_s: f64,
    usage: Usage,
    /// When the round was triggered (`None`: the first participant's call).
    trigger: Option<Instant>,
    results: Vec<NodeResult>,
    /// Participants that reacted to an event (their call start is the detection time).
    reacting: Vec<usize>,
}

impl Measured<'_> {
    async fn finish(mut self) -> anyhow::Result<Report> {
        let participants = self.results.len();
        let round = check_ranks(&self.results, participants)?;
        // Stable counts: wait for the membership watches the new round opens.
        settle_watches(
            &self.group.clients,
            &self.usage.stats,
            2 * participants as u64,
        )
        .await;
        let used = sum_stats(&self.group.clients).since(&self.usage.stats);
        let cpu_s = process_cpu_s() - self.usage.cpu_s;
        let etcd_cpu_s = match (self.ctx.etcd_pid.and_then(pid_cpu_s), self.usage.etcd_cpu_s) {
            (Some(now), Some(then)) => Some(now - then),
            _ => None,
        };
        let peak_rss = peak_rss_bytes();
        let first_start = self
            .results
            .iter()
            .map(|r| r.start)
            .min()
            .unwrap_or(self.usage.at);
        let origin = self.trigger.unwrap_or(first_start);
        let last_start = self.results.iter().map(|r| r.start).max().unwrap_or(origin);
        let last_end = self.results.iter().map(|r| r.end).max().unwrap_or(origin);
        let mut latencies: Vec<f64> = self
            .results
            .iter()
            .map(|r| (r.end - r.start).as_secs_f64())
            .collect();
        latencies.sort_by(f64::total_cmp);
        let mut detect: Vec<f64> = self
            .reacting
            .iter()
            .filter_map(|&i| self.results.iter().find(|r| r.node == i))
            .map(|r| r.start.saturating_duration_since(origin).as_secs_f64())
            .collect();
        detect.sort_by(f64::total_cmp);
        let phases = self.ctx.profiler.as_ref().and_then(|p| {
            self.results.sort_by_key(|r| r.node);
            p.phases(round, origin, &self.results)
        });
        Ok(Report {
            nodes: self.n,
            scenario: self.scenario,
            participants,
            ranked: participants,
            runs: 1,
            connections: self.group.clients.len(),
            ttl_s: self.ctx.ttl,
            last_call_s: self.last_call_s,
            round,
            wall_s: (last_end - origin).as_secs_f64(),
            last_join_to_ranked_s: last_end.saturating_duration_since(last_start).as_secs_f64(),
            p50_s: percentile(&latencies, 50.0),
            p99_s: percentile(&latencies, 99.0),
            max_s: latencies.last().copied().unwrap_or(f64::NAN),
            detect_p50_s: (!detect.is_empty()).then(|| percentile(&detect, 50.0)),
            detect_max_s: detect.last().copied(),
            requests: used.requests,
            requests_per_node: used.requests as f64 / participants as f64,
            watch_creates: used.watch_creates,
            watch_events: used.watch_events,
            keep_alives: used.keep_alives,
            cpu_s,
            etcd_cpu_s,
            peak_rss_bytes: peak_rss,
            rss_start_bytes: self.usage.rss,
            setup_s: self.group.setup_s,
            setup_requests: self.group.setup_requests,
            phases,
        })
    }
}

async fn measure_full(ctx: &Ctx, n: usize) -> anyhow::Result<Report> {
    let run_id = fresh_run_id(ctx, Scenario::Full, n);
    let params = params_for(ctx, &run_id, n, n, 0.0)?;
    let k = ctx.connections.unwrap_or(n).min(n);
    let group = Group::create(ctx, &params, n, k, &format!("full N={n}: setting up")).await?;
    let result = async {
        let (go_tx, go) = watch::channel(false);
        let mut set = spawn_at_signal(&group.handlers, &go);
        // Let every task reach the barrier.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let usage = Usage::start(ctx, &group.clients);
        go_tx.send(true).context("no participant waits")?;
        let bar = progress_bar(ctx, n, &format!("full N={n}: ranked"));
        let results = collect(&mut set, ctx.round_timeout + Duration::from_secs(5), &bar).await?;
        Measured {
            ctx,
            scenario: Scenario::Full,
            n,
            group: &group,
            last_call_s: 0.0,
            usage,
            trigger: None,
            results,
            reacting: Vec::new(),
        }
        .finish()
        .await
    }
    .await;
    group.shutdown().await;
    result
}

/// Waits for the first event `wanted` accepts, then calls `next_rendezvous`, timed from then.
fn spawn_reaction(
    set: &mut JoinSet<anyhow::Result<NodeResult>>,
    node: usize,
    handler: Arc<EtcdRendezvousHandler>,
    mut events: broadcast::Receiver<MembershipEvent>,
    wanted: fn(&MembershipEvent) -> bool,
) {
    set.spawn(async move {
        loop {
            match events.recv().await {
                Ok(ev) if wanted(&ev) => break,
                Ok(_) => continue,
                // Events were lost (the handler's channel overflowed): something changed.
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => {
                    bail!("participant {node}: the event channel closed")
                }
            }
        }
        timed_round(node, handler).await
    });
}

/// The victim's runtime. Dropping it (even on an error path, inside the participants'
/// runtime) stops all of its tasks at once without waiting for them.
struct VictimRuntime(Option<tokio::runtime::Runtime>);

impl VictimRuntime {
    fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0
            .as_ref()
            .expect("the victim's runtime is running")
            .spawn(fut)
    }

    fn crash(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for VictimRuntime {
    fn drop(&mut self) {
        self.crash();
    }
}

/// `kill` (crash = true) or `leave`.
async fn measure_departure(ctx: &Ctx, n: usize, crash: bool) -> anyhow::Result<Report> {
    let scenario = if crash {
        Scenario::Kill
    } else {
        Scenario::Leave
    };
    let run_id = fresh_run_id(ctx, scenario, n);
    let survivors = n - 1;
    let p_survivor = params_for(ctx, &run_id, survivors, n, ctx.last_call)?;
    let p_victim = params_for(ctx, &run_id, n, n, ctx.last_call)?;
    let k = ctx.connections.unwrap_or(survivors).min(survivors);
    let label = format!("{} N={n}: setting up", scenario.name());
    let group = Group::create(ctx, &p_survivor, survivors, k, &label).await?;
    // The victim lives on a runtime of its own, so that a crash can take down all of it at
    // once: its connection, lease keep-alive and membership watch.
    let victim_rt = VictimRuntime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("rdzv-bench-victim")
            .enable_all()
            .build()
            .context("cannot start the victim's runtime")?,
    ));
    let victim = {
        let options = ConnectionOptions::from_parameters(&p_victim)?;
        let settings = RendezvousSettings::from_parameters(&p_victim)?;
        let params = p_victim.clone();
        victim_rt
            .spawn(async move {
                let client = EtcdClient::new(options.connect().await?);
                anyhow::Ok(Arc::new(
                    EtcdRendezvousHandler::with_client(client, &params, settings).await?,
                ))
            })
            .await
            .context("the victim's setup panicked")?
            .context("cannot create the victim's handler")?
    };
    let result = departure_rounds(ctx, n, crash, &group, &p_survivor, victim, victim_rt).await;
    group.shutdown().await;
    result
}

async fn departure_rounds(
    ctx: &Ctx,
    n: usize,
    crash: bool,
    group: &Group,
    p_survivor: &RendezvousParameters,
    victim: Arc<EtcdRendezvousHandler>,
    mut victim_rt: VictimRuntime,
) -> anyhow::Result<Report> {
    let scenario = if crash {
        Scenario::Kill
    } else {
        Scenario::Leave
    };
    let survivors = n - 1;
    let settings = RendezvousSettings::from_parameters(p_survivor)?;
    let keys = RunKeys::new(&settings.prefix, &p_survivor.run_id);
    let observer = EtcdClient::new(
        ConnectionOptions::from_parameters(p_survivor)?
            .connect()
            .await?,
    );
    let members1 = keys.member_prefix(1);
    // First round, staged so that it always has all N: N-2 survivors join (their min N-1 is
    // not reached), then the victim (whose min is N), then the last survivor (max reached:
    // the round completes at once).
    let before_round1 = sum_stats(&group.clients);
    let (go_tx, go) = watch::channel(false);
    let mut round1 = spawn_at_signal(&group.handlers[..survivors - 1], &go);
    go_tx.send(true).context("no participant waits")?;
    wait_for_count(&observer, &members1, survivors - 1).await?;
    let v = victim.clone();
    let victim_round = victim_rt.spawn(async move { v.next_rendezvous().await });
    wait_for_count(&observer, &members1, survivors).await?;
    let last = group.handlers[survivors - 1].clone();
    round1.spawn(timed_round(survivors - 1, last));
    let bar = progress_bar(
        ctx,
        survivors,
        &format!("{} N={n}: first round", scenario.name()),
    );
    let mut first = collect(
        &mut round1,
        ctx.round_timeout + Duration::from_secs(5),
        &bar,
    )
    .await?;
    let vinfo = tokio::time::timeout(ctx.round_timeout, victim_round)
        .await
        .context("the victim was not ranked in time")?
        .context("the victim's task panicked")?
        .context("the victim's round failed")?;
    first.push(NodeResult {
        node: usize::MAX,
        start: Instant::now(),
        end: Instant::now(),
        rank: vinfo.rank,
        world_size: vinfo.world_size,
        round: vinfo.round,
    });
    check_ranks(&first, n).context("the first round")?;
    // The survivors open their membership watches after their round; count nothing of that.
    settle_watches(&group.clients, &before_round1, 2 * survivors as u64).await;

    let mut set = JoinSet::new();
    for (i, h) in group.handlers.iter().enumerate() {
        let events = h.subscribe().context("the etcd handler pushes no events")?;
        // As a launcher does: a lost peer, or peers already waiting in the next round.
        spawn_reaction(&mut set, i, h.clone(), events, |ev| {
            matches!(
                ev,
                MembershipEvent::PeerLost { .. }
                    | MembershipEvent::NodesWaiting { waiting: 1.., .. }
            )
        });
    }
    // Steady state: etcd catches up watches opened at past revisions every 100 ms.
    tokio::time::sleep(QUIESCE).await;
    if let Some(p) = &ctx.profiler {
        p.clear();
    }
    let usage = Usage::start(ctx, &group.clients);
    let trigger = Instant::now();
    if !crash {
        let v = victim.clone();
        victim_rt
            .spawn(async move { v.shutdown().await })
            .await
            .context("the victim's shutdown panicked")?
            .context("the victim could not leave")?;
    }
    // A crash: everything of the victim stops at once, without a word to etcd.
    victim_rt.crash();
    drop(victim);
    let bar = progress_bar(
        ctx,
        survivors,
        &format!("{} N={n}: ranked", scenario.name()),
    );
    let limit = ctx.round_timeout + Duration::from_secs(ctx.ttl + 10);
    let results = collect(&mut set, limit, &bar).await?;
    Measured {
        ctx,
        scenario,
        n,
        group,
        last_call_s: ctx.last_call,
        usage,
        trigger: Some(trigger),
        results,
        reacting: (0..survivors).collect(),
    }
    .finish()
    .await
}

async fn measure_scale_up(ctx: &Ctx, n: usize) -> anyhow::Result<Report> {
    let run_id = fresh_run_id(ctx, Scenario::ScaleUp, n);
    let members = n - 1;
    let params = params_for(ctx, &run_id, members, n, SCALE_UP_LAST_CALL_S)?;
    let k = ctx.connections.unwrap_or(n).min(n);
    let label = format!("scale-up N={n}: setting up");
    let group = Group::create(ctx, &params, n, k, &label).await?;
    let result = async {
        // First round: the N-1 members (it closes after the last call).
        let before_round1 = sum_stats(&group.clients);
        let (go_tx, go) = watch::channel(false);
        let mut round1 = spawn_at_signal(&group.handlers[..members], &go);
        tokio::time::sleep(Duration::from_millis(20)).await;
        go_tx.send(true).context("no participant waits")?;
        let bar = progress_bar(ctx, members, &format!("scale-up N={n}: first round"));
        let first = collect(
            &mut round1,
            ctx.round_timeout + Duration::from_secs(5),
            &bar,
        )
        .await?;
        check_ranks(&first, members).context("the first round")?;
        settle_watches(&group.clients, &before_round1, 2 * members as u64).await;

        let mut set = JoinSet::new();
        for (i, h) in group.handlers[..members].iter().enumerate() {
            let events = h.subscribe().context("the etcd handler pushes no events")?;
            spawn_reaction(
                &mut set,
                i,
                h.clone(),
                events,
                |ev| matches!(ev, MembershipEvent::NodesWaiting { waiting, .. } if *waiting > 0),
            );
        }
        tokio::time::sleep(QUIESCE).await;
        if let Some(p) = &ctx.profiler {
            p.clear();
        }
        let usage = Usage::start(ctx, &group.clients);
        let trigger = Instant::now();
        set.spawn(timed_round(members, group.handlers[members].clone()));
        let bar = progress_bar(ctx, n, &format!("scale-up N={n}: ranked"));
        let results = collect(&mut set, ctx.round_timeout + Duration::from_secs(5), &bar).await?;
        Measured {
            ctx,
            scenario: Scenario::ScaleUp,
            n,
            group: &group,
            last_call_s: SCALE_UP_LAST_CALL_S,
            usage,
            trigger: Some(trigger),
            results,
            reacting: (0..members).collect(),
        }
        .finish()
        .await
    }
    .await;
    group.shutdown().await;
    result
}

// ---------------------------------------------------------------------------------------------
// Profiling

mod profile {
    //! Phase timing from the library's debug events ("joined round", "finalised the round",
    //! "round complete"), attributed to participants by the `bench_node` span around each
    //! measured call.

    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use serde::Serialize;
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id};
    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::filter::{EnvFilter, Targets};
    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::{Layer, Registry};

    use super::{percentile, NodeResult};

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Mark {
        Joined,
        Finalised,
        Complete,
    }

    #[derive(Debug, Clone)]
    struct Record {
        node: usize,
        mark: Mark,
        round: u64,
        requests: Option<u64>,
        at: Instant,
    }

    /// Where the measured round's time went (seconds from the round's start unless said).
    #[derive(Debug, Clone, Serialize)]
    pub struct Phases {
        /// Own call → join transaction answered, per participant.
        pub join_p50_s: f64,
        pub join_max_s: f64,
        /// When the last join transaction was answered.
        pub all_joined_s: f64,
        /// The finaliser: its join answered → round written (last-call marker, watch, read
        /// of the join records, rank table writes).
        pub finalise_s: f64,
        /// Requests the finaliser sent in its whole call.
        pub finaliser_requests: Option<u64>,
        /// When the round was written.
        pub finalised_s: f64,
        /// Round written → each participant has its rank (watch event, assignment read).
        pub notify_p50_s: f64,
        pub notify_max_s: f64,
    }

    /// Collects the marks; cheap to clone.
    #[derive(Debug, Clone, Default)]
    pub struct Profiler {
        records: Arc<Mutex<Vec<Record>>>,
    }

    struct NodeIdx(usize);

    struct PhaseLayer {
        records: Arc<Mutex<Vec<Record>>>,
    }

    #[derive(Default)]
    struct Fields {
        idx: Option<u64>,
        message: Option<String>,
        round: Option<u64>,
        requests: Option<u64>,
    }

    impl Visit for Fields {
        fn record_u64(&mut self, field: &Field, value: u64) {
            match field.name() {
                "idx" => self.idx = Some(value),
                "round" => self.round = Some(value),
                "requests" => self.requests = Some(value),
                _ => {}
            }
        }

        fn record_i64(&mut self, field: &Field, value: i64) {
            if let Ok(v) = u64::try_from(value) {
                self.record_u64(field, v);
            }
        }

        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.message = Some(format!("{value:?}"));
            }
        }
    }

    impl<S> Layer<S> for PhaseLayer
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
            if attrs.metadata().name() != "bench_node" {
                return;
            }
            let mut fields = Fields::default();
            attrs.record(&mut fields);
            if let (Some(idx), Some(span)) = (fields.idx, ctx.span(id)) {
                span.extensions_mut().insert(NodeIdx(idx as usize));
            }
        }

        fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
            let at = Instant::now();
            let mut fields = Fields::default();
            event.record(&mut fields);
            let mark = match fields.message.as_deref() {
                Some("joined round") => Mark::Joined,
                Some("finalised the round") => Mark::Finalised,
                Some("round complete") => Mark::Complete,
                _ => return,
            };
            let Some(scope) = ctx.event_scope(event) else {
                return;
            };
            let node = scope
                .from_root()
                .find_map(|span| span.extensions().get::<NodeIdx>().map(|n| n.0));
            let (Some(node), Some(round)) = (node, fields.round) else {
                return;
            };
            if let Ok(mut records) = self.records.lock() {
                records.push(Record {
                    node,
                    mark,
                    round,
                    requests: fields.requests,
                    at,
                });
            }
        }
    }

    impl Profiler {
        /// A dispatcher with the phase layer (the library's debug events only) and the usual
        /// log output (`RDZV_LOG`, default `info`) on standard error.
        pub fn dispatch(&self) -> tracing::Dispatch {
            let phases = PhaseLayer {
                records: self.records.clone(),
            }
            .with_filter(Targets::new().with_target("rdzv", Level::DEBUG));
            let filter =
                EnvFilter::try_from_env("RDZV_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
            let log = tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter);
            tracing::Dispatch::new(Registry::default().with(phases).with(log))
        }

        /// Forgets every mark.
        pub fn clear(&self) {
            if let Ok(mut records) = self.records.lock() {
                records.clear();
            }
        }

        /// The phases of `round`, whose participants' calls are `results` (sorted by node).
        pub fn phases(
            &self,
            round: u64,
            origin: Instant,
            results: &[NodeResult],
        ) -> Option<Phases> {
            let records = self.records.lock().ok()?.clone();
            let of = |mark: Mark| {
                records
                    .iter()
                    .filter(move |r| r.mark == mark && r.round == round)
            };
            let since = |t: Instant| t.saturating_duration_since(origin).as_secs_f64();
            let mut joined = std::collections::HashMap::new();
            for r in of(Mark::Joined) {
                joined.entry(r.node).or_insert(r.at);
            }
            let mut join: Vec<f64> = results
                .iter()
                .filter_map(|res| {
                    joined
                        .get(&res.node)
                        .map(|t| t.saturating_duration_since(res.start).as_secs_f64())
                })
                .collect();
            join.sort_by(f64::total_cmp);
            let all_joined = joined.values().max().copied()?;
            let fin = of(Mark::Finalised).min_by_key(|r| r.at)?;
            let fin_joined = joined.get(&fin.node).copied().unwrap_or(all_joined);
            let finaliser_requests = of(Mark::Complete)
                .find(|r| r.node == fin.node)
                .and_then(|r| r.requests);
            let mut notify: Vec<f64> = results
                .iter()
                .map(|res| res.end.saturating_duration_since(fin.at).as_secs_f64())
                .collect();
            notify.sort_by(f64::total_cmp);
            Some(Phases {
                join_p50_s: percentile(&join, 50.0),
                join_max_s: join.last().copied().unwrap_or(f64::NAN),
                all_joined_s: since(all_joined),
                finalise_s: fin.at.saturating_duration_since(fin_joined).as_secs_f64(),
                finaliser_requests,
                finalised_s: since(fin.at),
                notify_p50_s: percentile(&notify, 50.0),
                notify_max_s: notify.last().copied().unwrap_or(f64::NAN),
            })
        }
    }
}

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
