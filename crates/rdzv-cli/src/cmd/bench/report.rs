//! Results of one measurement: the report line, medians, and the process's CPU and memory.

use std::collections::BTreeMap;

use super::etcd_metrics::EtcdCounters;
use super::*;

/// One line of output.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Report {
    /// The job size N.
    pub(super) nodes: usize,
    pub(super) scenario: Scenario,
    /// Participants of the measured round (N, or N-1 after a kill or leave).
    pub(super) participants: usize,
    /// Participants that got a valid rank (all of them, or the line reports an error).
    pub(super) ranked: usize,
    /// Measurements whose medians these are.
    pub(super) runs: usize,
    /// etcd connections (clients) of the participants of the measured round.
    pub(super) connections: usize,
    pub(super) ttl_s: u64,
    /// The last_call_timeout of the participants of the measured round.
    pub(super) last_call_s: f64,
    /// The measured round's number.
    pub(super) round: u64,
    pub(super) wall_s: f64,
    pub(super) last_join_to_ranked_s: f64,
    pub(super) p50_s: f64,
    pub(super) p99_s: f64,
    pub(super) max_s: f64,
    /// From the crash/leave/newcomer to each reacting participant's call (median, max).
    pub(super) detect_p50_s: Option<f64>,
    pub(super) detect_max_s: Option<f64>,
    pub(super) requests: u64,
    pub(super) requests_per_node: f64,
    pub(super) watch_creates: u64,
    pub(super) watch_events: u64,
    pub(super) keep_alives: u64,
    /// Requests etcd refused as overloaded (its backpressure), all retried.
    pub(super) overloaded: u64,
    pub(super) cpu_s: f64,
    pub(super) etcd_cpu_s: Option<f64>,
    pub(super) peak_rss_bytes: u64,
    /// The resident set as the round started (the participants set up, idle).
    pub(super) rss_start_bytes: u64,
    /// Creating the handlers (and connections) before the round.
    pub(super) setup_s: f64,
    pub(super) setup_requests: u64,
    pub(super) phases: Option<profile::Phases>,
    /// `etcd-limit`: the phases of the request mix and their rates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) limit: Option<limit::LimitPhases>,
    /// What the etcd this command started counted during the round (its `/metrics`; see
    /// [`EtcdCounters::since`]); absent with `--rdzv-endpoint` or when unreadable.
    pub(super) etcd_requests: Option<BTreeMap<String, u64>>,
    /// `--processes`: the child processes the participants ran in (absent: this process).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) processes: Option<usize>,
    /// `--processes`: the children's process ids (all gone when the line is printed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) child_pids: Option<Vec<u32>>,
    /// `--processes`: the children's CPU during the round (`cpu_s`) per node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) cpu_per_node_s: Option<f64>,
    /// `--processes`: the sum of the children's peak resident sets (`peak_rss_bytes`) per node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) rss_per_node_bytes: Option<u64>,
    /// `wall_s` of every run whose median this line is, sorted (filled by [`median_report`]).
    pub(super) wall_runs_s: Vec<f64>,
}

pub(super) fn table_header() -> String {
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

pub(super) fn table_row(r: &Report) -> String {
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
    // Not a number (no latency in `idle`): "-".
    let num = |v: f64| opt(v.is_finite().then_some(v));
    format!(
        "{:<9} {:>6} {:>8.3} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7.2} {:>8} {:>8} {:>7.2} {:>7} {:>7.1} {:>8.2} {:>7}",
        r.scenario.name(),
        r.nodes,
        r.wall_s,
        num(r.last_join_to_ranked_s),
        num(r.p50_s),
        num(r.p99_s),
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

/// The `idle` scenario's rates: per second of the window, and etcd's and the clients' CPU as a
/// share of one core.
pub(super) fn idle_row(r: &Report) -> String {
    let per_s = |v: f64| v / r.wall_s;
    let etcd = r.etcd_cpu_s.map_or_else(
        || "etcd's CPU unknown (not started by this command)".to_string(),
        |s| format!("etcd {:.1}% of a core", per_s(s) * 100.0),
    );
    format!(
        "  idle for {:.1} s: {:.0} lease renewals/s (each node every {:.2} s), {:.0} other \
         requests/s, {} watch events; {etcd}, the participants {:.1}% of a core",
        r.wall_s,
        per_s(r.keep_alives as f64),
        r.wall_s * r.nodes as f64 / r.keep_alives.max(1) as f64,
        per_s(r.requests as f64),
        r.watch_events,
        per_s(r.cpu_s) * 100.0,
    )
}

/// The wall time of each run, sorted: how much the median hides (only with several runs).
pub(super) fn runs_row(r: &Report) -> Option<String> {
    (r.wall_runs_s.len() > 1).then(|| {
        let walls: Vec<String> = r.wall_runs_s.iter().map(|w| format!("{w:.3}")).collect();
        format!("  runs: wall_s {} (sorted)", walls.join(" "))
    })
}

pub(super) fn phases_row(p: &profile::Phases) -> String {
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

/// The line under a row with etcd's counters and, with `--processes`, the per-node costs.
pub(super) fn counters_row(r: &Report) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(p) = r.processes {
        parts.push(format!(
            "{p} processes: per node {:.1} MiB peak RSS, {:.1} ms CPU",
            r.rss_per_node_bytes.unwrap_or(0) as f64 / (1024.0 * 1024.0),
            r.cpu_per_node_s.unwrap_or(f64::NAN) * 1e3,
        ));
    }
    if let Some(e) = &r.etcd_requests {
        let get = |k: &str| e.get(k).copied().unwrap_or(0);
        parts.push(format!(
            "etcd counted {} RPCs (Range {}, Txn {}, Put {}, DeleteRange {}, LeaseGrant {}, \
             LeaseRevoke {}, Watch streams {}), {} watch and {} keep-alive requests, \
             {} proposals committed",
            get("rpcs"),
            get("range"),
            get("txn"),
            get("put"),
            get("delete_range"),
            get("lease_grant"),
            get("lease_revoke"),
            get("watch_streams"),
            get("watch_requests"),
            get("keep_alive_requests"),
            get("proposals_committed"),
        ));
    }
    (!parts.is_empty()).then(|| format!("  {}", parts.join("; ")))
}

pub(super) fn median_f64(mut values: Vec<f64>) -> f64 {
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

pub(super) fn median_u64(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values
        .get(values.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(0)
}

/// Per-field medians of several measurements of the same thing.
pub(super) fn median_report(reports: Vec<Report>) -> Report {
    let mut out = reports[reports.len() / 2].clone();
    out.wall_runs_s = reports.iter().map(|r| r.wall_s).collect();
    out.wall_runs_s.sort_by(f64::total_cmp);
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
    out.overloaded = u(|r| r.overloaded);
    out.cpu_s = f(|r| r.cpu_s);
    out.etcd_cpu_s = o(|r| r.etcd_cpu_s);
    out.peak_rss_bytes = u(|r| r.peak_rss_bytes);
    out.rss_start_bytes = u(|r| r.rss_start_bytes);
    out.setup_s = f(|r| r.setup_s);
    out.setup_requests = u(|r| r.setup_requests);
    out.cpu_per_node_s = o(|r| r.cpu_per_node_s);
    let per_node_rss: Vec<u64> = reports
        .iter()
        .filter_map(|r| r.rss_per_node_bytes)
        .collect();
    out.rss_per_node_bytes = (!per_node_rss.is_empty()).then(|| median_u64(per_node_rss));
    out.etcd_requests = median_counters(reports.iter().filter_map(|r| r.etcd_requests.as_ref()));
    // Phases: those of the run with the median wall time.
    let mut by_wall: Vec<&Report> = reports.iter().collect();
    by_wall.sort_by(|a, b| a.wall_s.total_cmp(&b.wall_s));
    out.phases = by_wall[by_wall.len() / 2].phases.clone();
    out.limit = by_wall[by_wall.len() / 2].limit.clone();
    out
}

/// Per-key medians of counter maps (`None` when there are none).
pub(super) fn median_counters<'a>(
    maps: impl Iterator<Item = &'a BTreeMap<String, u64>>,
) -> Option<BTreeMap<String, u64>> {
    let mut values: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for map in maps {
        for (k, &v) in map {
            values.entry(k.clone()).or_default().push(v);
        }
    }
    (!values.is_empty()).then(|| {
        values
            .into_iter()
            .map(|(k, v)| (k, median_u64(v)))
            .collect()
    })
}

/// Nearest-rank percentile of sorted values.
pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// Process resources

/// User plus system CPU time of this process, in seconds.
pub(super) fn process_cpu_s() -> f64 {
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
pub(super) fn pid_cpu_s(pid: u32) -> Option<f64> {
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

/// The CPU the etcd this command started has used since it had used `then` (absent with
/// `--rdzv-endpoint`, or when unreadable).
pub(super) fn etcd_cpu_since(ctx: &Ctx, then: Option<f64>) -> Option<f64> {
    Some(ctx.etcd_pid.and_then(pid_cpu_s)? - then?)
}

/// This process's peak resident set (VmHWM), in bytes.
pub(super) fn peak_rss_bytes() -> u64 {
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
pub(super) fn reset_peak_rss() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// This process's current resident set (VmRSS), in bytes.
pub(super) fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Resource counters at the start of a measured round.
pub(super) struct Usage {
    pub(super) stats: StatsSnapshot,
    pub(super) rss: u64,
    pub(super) cpu_s: f64,
    pub(super) etcd_cpu_s: Option<f64>,
    pub(super) etcd_counters: Option<EtcdCounters>,
    pub(super) at: Instant,
}

impl Usage {
    pub(super) async fn start(ctx: &Ctx, clients: &[EtcdClient]) -> Self {
        let etcd_counters = etcd_counters(ctx).await;
        reset_peak_rss();
        Self {
            rss: rss_bytes(),
            stats: sum_stats(clients),
            cpu_s: process_cpu_s(),
            etcd_cpu_s: ctx.etcd_pid.and_then(pid_cpu_s),
            etcd_counters,
            at: Instant::now(),
        }
    }
}

/// The counters of the etcd this command started (`None` for another, or when unreadable:
/// then a warning).
pub(super) async fn etcd_counters(ctx: &Ctx) -> Option<EtcdCounters> {
    let addr = ctx.metrics_addr.as_deref()?;
    match EtcdCounters::fetch(addr).await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("cannot read etcd's counters: {e:#}");
            None
        }
    }
}

/// etcd's counts since `before` (both read), as a report field.
pub(super) async fn etcd_requests_since(
    ctx: &Ctx,
    before: Option<&EtcdCounters>,
) -> Option<BTreeMap<String, u64>> {
    let before = before?;
    Some(etcd_counters(ctx).await?.since(before))
}

pub(super) fn sum_stats(clients: &[EtcdClient]) -> StatsSnapshot {
    clients
        .iter()
        .map(|c| c.stats().snapshot())
        .fold(StatsSnapshot::default(), |a, s| StatsSnapshot {
            requests: a.requests + s.requests,
            watch_creates: a.watch_creates + s.watch_creates,
            watch_events: a.watch_events + s.watch_events,
            keep_alives: a.keep_alives + s.keep_alives,
            overloaded: a.overloaded + s.overloaded,
        })
}

/// Waits (bounded) until the clients have opened `expected` watches since `since`: a member
/// opens its membership watch from a task started as its round completes.
pub(super) async fn settle_watches(clients: &[EtcdClient], since: &StatsSnapshot, expected: u64) {
    let deadline = Instant::now() + SETTLE_LIMIT;
    while sum_stats(clients).since(since).watch_creates < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Participants

pub(super) fn progress_bar(ctx: &Ctx, len: usize, what: &str) -> ProgressBar {
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
