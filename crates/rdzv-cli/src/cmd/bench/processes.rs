//! `--processes P`: the participants of a measured round spread over P child processes.
//!
//! Each child is this binary re-executed as `rdzv bench-child` (a hidden subcommand); its
//! participants are handlers with their own etcd connection and lease, as real agents. The
//! parent writes one [`ChildSpec`] (JSON: endpoint, run id, the child's participants, the
//! round's parameters) and then [`Command`]s, one a line, on the child's standard input; the
//! child answers with [`ChildMsg`]s, one JSON object a line, on its standard output:
//! `Ready` once its handlers are created; `Ranked` for each participant as it gets its rank;
//! `Armed`, `Settled`, `Marked`, `Stats` in answer to `react`, `settle`, `mark` and `stats`.
//! `exit` makes it leave gracefully and exit; the parent waits for every child (bounded: a
//! child still there is then killed) and reports their process ids. A failing child reports
//! `Error` and exits. A child whose standard input closes before `exit` (its parent died)
//! exits at once, without leaving: no orphans.
//!
//! - `full`: the N participants are shared over the P children (shares differ by at most
//!   one); once all are `Ready` and `Marked`, every child gets `call` (its start signal).
//! - `kill` and `leave`: the leaving node is alone in one child, the N-1 others are shared
//!   over the other P-1 (so P >= 2). The first round is staged as without `--processes` (the
//!   parent watches the join records), the survivors are `react`-armed, and the leaving node's
//!   process is killed (SIGKILL: a crashed agent) or told to `exit` (a graceful leave).
//! - `scale-up`: the newcomer is alone in one child, the N-1 members shared over the others;
//!   the newcomer's `call` is the event.
//!
//! The CPU and peak memory of the children count from their `mark` (just before the event)
//! until their `stats` (after all are ranked and the new watches settled).
//!
//! Timing: the children report their calls' start and end as `CLOCK_MONOTONIC` readings in
//! nanoseconds. On Linux that clock is one for the whole machine (it is what [`Instant`] reads),
//! so the parent compares them with its own, exactly as in one process: no pipe or scheduling
//! latency enters the figures. `wall_s` runs, as without `--processes`, from the first
//! participant's call (`full`) or from the event (the parent's kill, its `exit` or `call`) to
//! the last participant's rank.

use std::process::Stdio;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use super::etcd_metrics::EtcdCounters;
use super::*;

/// The hidden subcommand a child runs.
pub(super) const CHILD_COMMAND: &str = "bench-child";

/// A command of the parent to a child, one a line after the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Command {
    /// `call [NODE...]`: these participants (all of the child's when none) call
    /// `next_rendezvous`; each reports `Ranked`.
    Call(Vec<usize>),
    /// `react departure|waiting`: every participant waits for such a membership event, then
    /// calls `next_rendezvous` (timed from then); answered `Armed` once all listen.
    React(ReactTo),
    /// `settle`: wait (bounded) for the watches of the participants ranked since the last
    /// `settle` or `mark`; answered `Settled`.
    Settle,
    /// `mark`: the measured part starts (counters, CPU, peak memory); answered `Marked`.
    Mark,
    /// `stats`: settle, then answer `Stats` since `mark`.
    Stats,
    /// `exit`: leave gracefully and exit.
    Exit,
}

/// The membership events a `react` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReactTo {
    /// A peer lost or left, or peers already waiting in the next round (`kill`, `leave`).
    Departure,
    /// Nodes waiting to join (`scale-up`).
    Waiting,
}

impl ReactTo {
    /// The events it accepts.
    pub(super) fn wanted(self) -> fn(&MembershipEvent) -> bool {
        match self {
            ReactTo::Departure => departure_event,
            ReactTo::Waiting => waiting_event,
        }
    }
}

impl Command {
    /// The command on `line`.
    pub(super) fn parse(line: &str) -> anyhow::Result<Self> {
        let mut words = line.split_whitespace();
        let command = match (words.next(), words.next()) {
            (Some("call"), first) => {
                let nodes: Result<Vec<usize>, _> =
                    first.into_iter().chain(words).map(str::parse).collect();
                return Ok(Command::Call(
                    nodes.with_context(|| format!("a bad call: {line:?}"))?,
                ));
            }
            (Some("react"), Some("departure")) => Command::React(ReactTo::Departure),
            (Some("react"), Some("waiting")) => Command::React(ReactTo::Waiting),
            (Some("settle"), None) => Command::Settle,
            (Some("mark"), None) => Command::Mark,
            (Some("stats"), None) => Command::Stats,
            (Some("exit"), None) => Command::Exit,
            _ => bail!("not a bench child's command: {line:?}"),
        };
        ensure!(
            words.next().is_none(),
            "not a bench child's command: {line:?}"
        );
        Ok(command)
    }

    /// The command as a line (without its end).
    pub(super) fn line(&self) -> String {
        match self {
            Command::Call(nodes) => {
                let mut line = "call".to_string();
                for n in nodes {
                    line.push_str(&format!(" {n}"));
                }
                line
            }
            Command::React(ReactTo::Departure) => "react departure".into(),
            Command::React(ReactTo::Waiting) => "react waiting".into(),
            Command::Settle => "settle".into(),
            Command::Mark => "mark".into(),
            Command::Stats => "stats".into(),
            Command::Exit => "exit".into(),
        }
    }
}

/// Bound on the children's graceful exit (their handlers' shutdowns are bounded at 30 s).
const EXIT_LIMIT: Duration = Duration::from_secs(40);

/// What a child is to do: the first line of its standard input (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ChildSpec {
    pub(super) endpoint: String,
    pub(super) run_id: String,
    /// Its participants' indices in the measurement.
    pub(super) nodes: Vec<usize>,
    pub(super) min: usize,
    pub(super) max: usize,
    pub(super) last_call: f64,
    pub(super) ttl: u64,
    pub(super) round_timeout_s: u64,
    pub(super) conf: String,
    pub(super) setup_concurrency: usize,
}

/// What a child reports: one JSON object a line on its standard output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum ChildMsg {
    /// All its handlers are created.
    Ready { setup_s: f64, setup_requests: u64 },
    /// One participant has its rank; times are `CLOCK_MONOTONIC` in nanoseconds.
    Ranked {
        node: usize,
        start_ns: u64,
        end_ns: u64,
        rank: usize,
        world_size: usize,
        round: u64,
    },
    /// Answers `react`.
    Armed,
    /// Answers `settle`.
    Settled,
    /// Answers `mark`.
    Marked,
    /// Answers `stats`: its clients' counts since `mark`, its CPU since then, its resident
    /// set then and its peak since.
    Stats {
        requests: u64,
        watch_creates: u64,
        watch_events: u64,
        keep_alives: u64,
        overloaded: u64,
        cpu_s: f64,
        rss_start_bytes: u64,
        peak_rss_bytes: u64,
    },
    /// It failed (and exits).
    Error { message: String },
}

/// The scenarios `--processes` runs.
const SUPPORTED: [Scenario; 4] = [
    Scenario::Full,
    Scenario::Kill,
    Scenario::Leave,
    Scenario::ScaleUp,
];

/// Checks `--processes P` against the other flags.
pub(super) fn validate(p: usize, args: &BenchArgs) -> anyhow::Result<()> {
    ensure!(p >= 1, "--processes must be at least 1");
    if let Some(s) = args.scenario.iter().find(|s| !SUPPORTED.contains(s)) {
        bail!(
            "--processes supports only the full, kill, leave and scale-up scenarios (got {})",
            s.name()
        );
    }
    if p < 2 {
        if let Some(s) = args.scenario.iter().find(|s| **s != Scenario::Full) {
            bail!(
                "{} with --processes needs at least 2 processes (the leaving or arriving node \
                 has one of its own)",
                s.name()
            );
        }
    }
    if let Some(n) = args.nodes.iter().find(|&&n| n < p) {
        bail!("--processes {p} is more than --nodes {n}: every process needs a participant");
    }
    ensure!(
        args.connections.is_none(),
        "--connections shares connections within one process; with --processes every \
         participant has its own"
    );
    ensure!(
        !args.profile,
        "--profile times participants in this process; it cannot be combined with --processes"
    );
    ensure!(
        args.threads.is_none(),
        "--threads sizes the participants' runtime in this process; with --processes every \
         child has one worker thread per CPU, as `rdzv run`"
    );
    Ok(())
}

/// The shares of `n` participants over `p` processes: `(first, count)`, counts differing by
/// at most one.
pub(super) fn shares(n: usize, p: usize) -> Vec<(usize, usize)> {
    let mut first = 0;
    (0..p)
        .map(|i| {
            let count = n / p + usize::from(i < n % p);
            let share = (first, count);
            first += count;
            share
        })
        .collect()
}

/// `CLOCK_MONOTONIC` now, in nanoseconds.
fn clock_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `at` as a `CLOCK_MONOTONIC` reading, comparable across the machine's processes.
pub(super) fn mono_ns(at: Instant) -> u64 {
    let (now, clock) = (Instant::now(), clock_ns());
    (clock + at.saturating_duration_since(now).as_nanos() as u64)
        .saturating_sub(now.saturating_duration_since(at).as_nanos() as u64)
}

/// The [`Instant`] of a `CLOCK_MONOTONIC` reading.
pub(super) fn instant_of(ns: u64) -> Instant {
    let (now, clock) = (Instant::now(), clock_ns());
    if ns <= clock {
        now.checked_sub(Duration::from_nanos(clock - ns))
            .unwrap_or(now)
    } else {
        now + Duration::from_nanos(ns - clock)
    }
}

/// What a child's output reader passes on.
enum Event {
    Msg(ChildMsg),
    /// A line that is not a [`ChildMsg`].
    Garbage(String),
    /// Its standard output closed: it exited.
    Closed,
}

struct ChildProc {
    child: Child,
    stdin: Option<ChildStdin>,
    pid: u32,
    nodes: Vec<usize>,
    /// It was killed or told to exit: its end is no error.
    gone: bool,
}

/// The running children and what they say.
struct Children {
    procs: Vec<ChildProc>,
    events: mpsc::UnboundedReceiver<(usize, Event)>,
}

impl Children {
    /// Starts one child per spec and hands it its spec. Dropped, it kills the children.
    async fn spawn(specs: &[ChildSpec]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this program to re-execute")?;
        let (tx, events) = mpsc::unbounded_channel();
        let mut procs = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let mut child = tokio::process::Command::new(&exe)
                .arg(CHILD_COMMAND)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start child process {i}"))?;
            let pid = child.id().context("a child without a process id")?;
            let stdout = child.stdout.take().context("a child without its output")?;
            let stdin = child.stdin.take().context("a child without its input")?;
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                loop {
                    let event = match lines.next_line().await {
                        Ok(Some(line)) => match serde_json::from_str(&line) {
                            Ok(msg) => Event::Msg(msg),
                            Err(_) => Event::Garbage(line),
                        },
                        Ok(None) | Err(_) => Event::Closed,
                    };
                    let closed = matches!(event, Event::Closed);
                    if tx.send((i, event)).is_err() || closed {
                        return;
                    }
                }
            });
            procs.push(ChildProc {
                child,
                stdin: Some(stdin),
                pid,
                nodes: spec.nodes.clone(),
                gone: false,
            });
            let line = serde_json::to_string(spec)?;
            procs[i].write(&line).await?;
        }
        Ok(Self { procs, events })
    }

    /// Sends `command` to each child of `who`.
    async fn send(&mut self, who: &[usize], command: &Command) -> anyhow::Result<()> {
        let line = command.line();
        for &i in who {
            self.procs[i].write(&line).await?;
        }
        Ok(())
    }

    /// The next message of any child; an error if one failed or exited unexpectedly, or at
    /// `deadline`.
    async fn next(
        &mut self,
        deadline: tokio::time::Instant,
        waiting_for: impl Fn() -> String,
    ) -> anyhow::Result<(usize, ChildMsg)> {
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv()).await;
            let Ok(Some((i, event))) = event else {
                bail!("timed out waiting for {}", waiting_for());
            };
            let ChildProc { pid, gone, .. } = self.procs[i];
            return match event {
                Event::Msg(ChildMsg::Error { message }) => {
                    bail!("child process {i} (pid {pid}): {message}")
                }
                Event::Msg(msg) => Ok((i, msg)),
                Event::Garbage(line) => bail!("child process {i} (pid {pid}) said {line:?}"),
                Event::Closed if gone => continue,
                Event::Closed => bail!(
                    "child process {i} (pid {pid}) exited while waiting for {}",
                    waiting_for()
                ),
            };
        }
    }

    /// Sends `command` (unless `None`) to each of `who`, then waits for one answer of each
    /// (not a rank), bounded by `limit`.
    async fn ask(
        &mut self,
        who: &[usize],
        command: Option<&Command>,
        limit: Duration,
    ) -> anyhow::Result<Vec<ChildMsg>> {
        if let Some(command) = command {
            self.send(who, command).await?;
        }
        let what = command.map_or_else(|| "ready".to_string(), Command::line);
        let deadline = tokio::time::Instant::now() + limit;
        let mut answers = Vec::with_capacity(who.len());
        while answers.len() < who.len() {
            let have = answers.len();
            let waiting = || format!("answers to {what:?} ({have} of {})", who.len());
            match self.next(deadline, waiting).await? {
                (i, ChildMsg::Ranked { node, .. }) => {
                    bail!("child process {i}: participant {node} ranked while waiting for {what:?}")
                }
                (_, msg) => answers.push(msg),
            }
        }
        Ok(answers)
    }

    /// Waits for `count` ranks, bounded by `limit`.
    async fn ranks(
        &mut self,
        ctx: &Ctx,
        count: usize,
        limit: Duration,
        label: &str,
    ) -> anyhow::Result<Vec<NodeResult>> {
        let bar = progress_bar(ctx, count, label);
        let deadline = tokio::time::Instant::now() + limit;
        let mut results = Vec::with_capacity(count);
        while results.len() < count {
            let have = results.len();
            let waiting = || format!("ranks ({have} of {count} within {limit:?})");
            match self.next(deadline, waiting).await? {
                (
                    _,
                    ChildMsg::Ranked {
                        node,
                        start_ns,
                        end_ns,
                        rank,
                        world_size,
                        round,
                    },
                ) => {
                    results.push(NodeResult {
                        node,
                        start: instant_of(start_ns),
                        end: instant_of(end_ns),
                        rank,
                        world_size,
                        round,
                    });
                    bar.inc(1);
                }
                (i, msg) => bail!("child process {i}: {msg:?} while waiting for ranks"),
            }
        }
        bar.finish_and_clear();
        Ok(results)
    }

    /// Waits until every child has its handlers.
    async fn setup(&mut self, ctx: &Ctx) -> anyhow::Result<Setup> {
        let all: Vec<usize> = (0..self.procs.len()).collect();
        let mut setup = Setup::default();
        for msg in self.ask(&all, None, ctx.round_timeout).await? {
            let ChildMsg::Ready {
                setup_s,
                setup_requests,
            } = msg
            else {
                bail!("a child process said {msg:?} before it was ready");
            };
            setup.setup_s = setup.setup_s.max(setup_s);
            setup.setup_requests += setup_requests;
        }
        Ok(setup)
    }

    /// Marks the start of the measured part in the children of `who`, and etcd's counters.
    async fn mark(&mut self, ctx: &Ctx, who: &[usize]) -> anyhow::Result<Before> {
        self.ask(who, Some(&Command::Mark), SETTLE_LIMIT).await?;
        let etcd_counters = etcd_counters(ctx).await;
        Ok(Before {
            etcd_counters,
            etcd_cpu_s: ctx.etcd_pid.and_then(pid_cpu_s),
            at: Instant::now(),
        })
    }

    /// The sums of the `Stats` of the children of `who`.
    async fn stats(&mut self, who: &[usize]) -> anyhow::Result<Used> {
        let mut used = Used::default();
        let limit = SETTLE_LIMIT + Duration::from_secs(5);
        for msg in self.ask(who, Some(&Command::Stats), limit).await? {
            let ChildMsg::Stats {
                requests,
                watch_creates,
                watch_events,
                keep_alives,
                overloaded,
                cpu_s,
                rss_start_bytes,
                peak_rss_bytes,
            } = msg
            else {
                bail!("a child process answered {msg:?} to stats");
            };
            used.stats.requests += requests;
            used.stats.watch_creates += watch_creates;
            used.stats.watch_events += watch_events;
            used.stats.keep_alives += keep_alives;
            used.stats.overloaded += overloaded;
            used.cpu_s += cpu_s;
            used.rss_start_bytes += rss_start_bytes;
            used.peak_rss_bytes += peak_rss_bytes;
        }
        Ok(used)
    }

    /// The child holding participant `node`.
    fn holder(&self, node: usize) -> anyhow::Result<usize> {
        self.procs
            .iter()
            .position(|p| p.nodes.contains(&node))
            .with_context(|| format!("no child process holds participant {node}"))
    }

    /// Kills child `i` at once (SIGKILL): a crash.
    fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        self.procs[i].gone = true;
        self.procs[i]
            .child
            .start_kill()
            .with_context(|| format!("cannot kill child process {i}"))
    }

    /// Tells child `i` to leave gracefully and exit.
    async fn leave(&mut self, i: usize) -> anyhow::Result<()> {
        self.procs[i].gone = true;
        self.procs[i].write(&Command::Exit.line()).await?;
        self.procs[i].stdin = None;
        Ok(())
    }

    /// Tells every child to exit and waits for all (bounded: then kills); their process ids.
    async fn end(mut self) -> Vec<u32> {
        for p in &mut self.procs {
            // Read before the end of input, which follows as `stdin` is dropped.
            let _ = p.write(&Command::Exit.line()).await;
            p.stdin = None;
        }
        let deadline = tokio::time::Instant::now() + EXIT_LIMIT;
        for p in &mut self.procs {
            if tokio::time::timeout_at(deadline, p.child.wait())
                .await
                .is_err()
            {
                tracing::warn!("child process {} did not exit in time: killed", p.pid);
                let _ = p.child.start_kill();
                let _ = p.child.wait().await;
            }
        }
        self.procs.iter().map(|p| p.pid).collect()
    }
}

impl ChildProc {
    /// Writes `line` and its end to the child's input.
    async fn write(&mut self, line: &str) -> anyhow::Result<()> {
        let pid = self.pid;
        let stdin = self
            .stdin
            .as_mut()
            .with_context(|| format!("the input of child process {pid} is closed"))?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .with_context(|| format!("cannot instruct child process {pid}"))
    }
}

/// The children's setup.
#[derive(Default)]
struct Setup {
    setup_s: f64,
    setup_requests: u64,
}

/// etcd at the start of the measured part.
struct Before {
    etcd_counters: Option<EtcdCounters>,
    etcd_cpu_s: Option<f64>,
    at: Instant,
}

/// The children's costs in the measured part (sums).
#[derive(Default)]
struct Used {
    stats: StatsSnapshot,
    cpu_s: f64,
    rss_start_bytes: u64,
    peak_rss_bytes: u64,
}

/// A measured round with its participants in child processes.
struct Outcome {
    scenario: Scenario,
    n: usize,
    processes: usize,
    last_call_s: f64,
    setup: Setup,
    before: Before,
    used: Used,
    results: Vec<NodeResult>,
    trigger: Option<Instant>,
    reacting: Vec<usize>,
}

impl Outcome {
    async fn report(self, ctx: &Ctx) -> anyhow::Result<Report> {
        let etcd_cpu_s = match (ctx.etcd_pid.and_then(pid_cpu_s), self.before.etcd_cpu_s) {
            (Some(now), Some(then)) => Some(now - then),
            _ => None,
        };
        let etcd_requests = etcd_requests_since(ctx, self.before.etcd_counters.as_ref()).await;
        let participants = self.results.len();
        let round = check_ranks(&self.results, participants)?;
        let t = Timing::of(&self.results, self.trigger, self.before.at, &self.reacting);
        let used = self.used;
        Ok(Report {
            nodes: self.n,
            scenario: self.scenario,
            participants,
            ranked: participants,
            runs: 1,
            connections: participants,
            ttl_s: ctx.ttl,
            last_call_s: self.last_call_s,
            round,
            wall_s: t.wall_s,
            last_join_to_ranked_s: t.last_join_to_ranked_s,
            p50_s: t.p50_s,
            p99_s: t.p99_s,
            max_s: t.max_s,
            detect_p50_s: t.detect_p50_s,
            detect_max_s: t.detect_max_s,
            requests: used.stats.requests,
            requests_per_node: used.stats.requests as f64 / participants as f64,
            watch_creates: used.stats.watch_creates,
            watch_events: used.stats.watch_events,
            keep_alives: used.stats.keep_alives,
            overloaded: used.stats.overloaded,
            cpu_s: used.cpu_s,
            etcd_cpu_s,
            peak_rss_bytes: used.peak_rss_bytes,
            rss_start_bytes: used.rss_start_bytes,
            setup_s: self.setup.setup_s,
            setup_requests: self.setup.setup_requests,
            phases: None,
            etcd_requests,
            processes: Some(self.processes),
            child_pids: None,
            cpu_per_node_s: Some(used.cpu_s / participants as f64),
            rss_per_node_bytes: Some(used.peak_rss_bytes / participants as u64),
        })
    }
}

fn spec(
    ctx: &Ctx,
    run_id: &str,
    nodes: Vec<usize>,
    min: usize,
    max: usize,
    last_call: f64,
) -> ChildSpec {
    ChildSpec {
        endpoint: ctx.endpoint.clone(),
        run_id: run_id.to_string(),
        nodes,
        min,
        max,
        last_call,
        ttl: ctx.ttl,
        round_timeout_s: ctx.round_timeout.as_secs(),
        conf: ctx.conf.clone(),
        setup_concurrency: ctx.setup_concurrency,
    }
}

/// Specs of `count` participants (`0..count`) shared over `p` children.
fn shared_specs(
    ctx: &Ctx,
    run_id: &str,
    count: usize,
    p: usize,
    bounds: (usize, usize, f64),
) -> Vec<ChildSpec> {
    let (min, max, last_call) = bounds;
    shares(count, p)
        .into_iter()
        .map(|(first, c)| {
            spec(
                ctx,
                run_id,
                (first..first + c).collect(),
                min,
                max,
                last_call,
            )
        })
        .collect()
}

/// Measures `scenario` with N participants in `p` child processes, which are all gone when it
/// returns.
pub(super) async fn measure(
    ctx: &Ctx,
    scenario: Scenario,
    n: usize,
    p: usize,
) -> anyhow::Result<Report> {
    let run_id = fresh_run_id(ctx, scenario, n);
    let mut specs;
    match scenario {
        Scenario::Full => specs = shared_specs(ctx, &run_id, n, p, (n, n, 0.0)),
        Scenario::Kill | Scenario::Leave => {
            // The survivors shared over P-1 children, the leaving node alone in the last.
            specs = shared_specs(ctx, &run_id, n - 1, p - 1, (n - 1, n, ctx.last_call));
            specs.push(spec(ctx, &run_id, vec![n - 1], n, n, ctx.last_call));
        }
        Scenario::ScaleUp => {
            // The members shared over P-1 children, the newcomer alone in the last.
            let bounds = (n - 1, n, SCALE_UP_LAST_CALL_S);
            specs = shared_specs(ctx, &run_id, n - 1, p - 1, bounds);
            specs.push(spec(
                ctx,
                &run_id,
                vec![n - 1],
                n - 1,
                n,
                SCALE_UP_LAST_CALL_S,
            ));
        }
        Scenario::LastCall | Scenario::Exit => {
            bail!("--processes does not run the {} scenario", scenario.name())
        }
    }
    let mut children = Children::spawn(&specs).await?;
    let outcome = match scenario {
        Scenario::Full => full_round(ctx, n, &mut children).await,
        Scenario::Kill | Scenario::Leave => {
            departure_rounds(ctx, scenario, n, &run_id, &mut children).await
        }
        _ => scale_up_rounds(ctx, n, &mut children).await,
    };
    let result = match outcome {
        Ok(outcome) => outcome.report(ctx).await,
        Err(e) => Err(e),
    };
    let pids = children.end().await;
    let mut report = result?;
    report.child_pids = Some(pids);
    Ok(report)
}

/// `full`: every child calls at once.
async fn full_round(ctx: &Ctx, n: usize, children: &mut Children) -> anyhow::Result<Outcome> {
    let p = children.procs.len();
    let all: Vec<usize> = (0..p).collect();
    let setup = children.setup(ctx).await?;
    let before = children.mark(ctx, &all).await?;
    children.send(&all, &Command::Call(Vec::new())).await?;
    let limit = ctx.round_timeout + Duration::from_secs(5);
    let results = children
        .ranks(ctx, n, limit, &format!("full N={n} P={p}: ranked"))
        .await?;
    let used = children.stats(&all).await?;
    Ok(Outcome {
        scenario: Scenario::Full,
        n,
        processes: p,
        last_call_s: 0.0,
        setup,
        before,
        used,
        results,
        trigger: None,
        reacting: Vec::new(),
    })
}

/// `kill` or `leave`: the last child holds the leaving node.
async fn departure_rounds(
    ctx: &Ctx,
    scenario: Scenario,
    n: usize,
    run_id: &str,
    children: &mut Children,
) -> anyhow::Result<Outcome> {
    let p = children.procs.len();
    let (victim, others) = (p - 1, (0..p - 1).collect::<Vec<usize>>());
    let setup = children.setup(ctx).await?;
    let survivors = n - 1;
    let params = params_for(ctx, run_id, survivors, n, ctx.last_call)?;
    let settings = RendezvousSettings::from_parameters(&params)?;
    let members1 = RunKeys::new(&settings.prefix, run_id).member_prefix(1);
    let observer = EtcdClient::new(
        ConnectionOptions::from_parameters(&params)?
            .connect()
            .await?,
    );
    // First round, staged as in one process so that it always has all N: the survivors but
    // the last, then the leaving node (whose min is N), then the last survivor.
    let last = survivors - 1;
    for &i in &others {
        let nodes: Vec<usize> = children.procs[i]
            .nodes
            .iter()
            .copied()
            .filter(|&x| x != last)
            .collect();
        if !nodes.is_empty() {
            children.send(&[i], &Command::Call(nodes)).await?;
        }
    }
    wait_for_count(&observer, &members1, survivors - 1).await?;
    children.send(&[victim], &Command::Call(Vec::new())).await?;
    wait_for_count(&observer, &members1, survivors).await?;
    let holder = children.holder(last)?;
    children.send(&[holder], &Command::Call(vec![last])).await?;
    let limit = ctx.round_timeout + Duration::from_secs(5);
    let label = format!("{} N={n} P={p}: first round", scenario.name());
    let first = children.ranks(ctx, n, limit, &label).await?;
    check_ranks(&first, n).context("the first round")?;
    let all: Vec<usize> = (0..p).collect();
    children
        .ask(
            &all,
            Some(&Command::Settle),
            SETTLE_LIMIT + Duration::from_secs(5),
        )
        .await?;
    let react = Command::React(ReactTo::Departure);
    children.ask(&others, Some(&react), SETTLE_LIMIT).await?;
    // Steady state: etcd catches up watches opened at past revisions every 100 ms.
    tokio::time::sleep(QUIESCE).await;
    let before = children.mark(ctx, &others).await?;
    let trigger = Instant::now();
    if scenario == Scenario::Kill {
        children.kill(victim)?;
    } else {
        children.leave(victim).await?;
    }
    let limit = ctx.round_timeout + Duration::from_secs(ctx.ttl + 10);
    let label = format!("{} N={n} P={p}: ranked", scenario.name());
    let results = children.ranks(ctx, survivors, limit, &label).await?;
    let used = children.stats(&others).await?;
    Ok(Outcome {
        scenario,
        n,
        processes: p,
        last_call_s: ctx.last_call,
        setup,
        before,
        used,
        results,
        trigger: Some(trigger),
        reacting: (0..survivors).collect(),
    })
}

/// `scale-up`: the last child holds the newcomer.
async fn scale_up_rounds(ctx: &Ctx, n: usize, children: &mut Children) -> anyhow::Result<Outcome> {
    let p = children.procs.len();
    let (newcomer, members) = (p - 1, (0..p - 1).collect::<Vec<usize>>());
    let setup = children.setup(ctx).await?;
    children.send(&members, &Command::Call(Vec::new())).await?;
    let limit = ctx.round_timeout + Duration::from_secs(5);
    let label = format!("scale-up N={n} P={p}: first round");
    let first = children.ranks(ctx, n - 1, limit, &label).await?;
    check_ranks(&first, n - 1).context("the first round")?;
    children
        .ask(
            &members,
            Some(&Command::Settle),
            SETTLE_LIMIT + Duration::from_secs(5),
        )
        .await?;
    let react = Command::React(ReactTo::Waiting);
    children.ask(&members, Some(&react), SETTLE_LIMIT).await?;
    tokio::time::sleep(QUIESCE).await;
    let all: Vec<usize> = (0..p).collect();
    let before = children.mark(ctx, &all).await?;
    let trigger = Instant::now();
    children
        .send(&[newcomer], &Command::Call(Vec::new()))
        .await?;
    let label = format!("scale-up N={n} P={p}: ranked");
    let results = children.ranks(ctx, n, limit, &label).await?;
    let used = children.stats(&all).await?;
    Ok(Outcome {
        scenario: Scenario::ScaleUp,
        n,
        processes: p,
        last_call_s: SCALE_UP_LAST_CALL_S,
        setup,
        before,
        used,
        results,
        trigger: Some(trigger),
        reacting: (0..n - 1).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_participant_once() {
        assert_eq!(shares(16, 3), vec![(0, 6), (6, 5), (11, 5)]);
        assert_eq!(shares(4, 4), vec![(0, 1), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(shares(5, 1), vec![(0, 5)]);
    }

    #[test]
    fn monotonic_readings_round_trip() {
        let at = Instant::now();
        let back = instant_of(mono_ns(at));
        let skew = if back > at { back - at } else { at - back };
        assert!(skew < Duration::from_millis(1), "{skew:?}");
        let later = at + Duration::from_secs(2);
        let apart = mono_ns(later) - mono_ns(at);
        assert!((1_999_000_000..=2_001_000_000).contains(&apart), "{apart}");
    }

    #[test]
    fn commands_are_lines() {
        for command in [
            Command::Call(Vec::new()),
            Command::Call(vec![3, 14]),
            Command::React(ReactTo::Departure),
            Command::React(ReactTo::Waiting),
            Command::Settle,
            Command::Mark,
            Command::Stats,
            Command::Exit,
        ] {
            assert_eq!(Command::parse(&command.line()).unwrap(), command);
        }
        assert_eq!(
            Command::parse("call 1 2\n").unwrap(),
            Command::Call(vec![1, 2])
        );
        for bad in ["", "go", "call x", "react", "react sometimes", "exit now"] {
            assert!(Command::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn messages_are_one_json_line() {
        let msg = ChildMsg::Ready {
            setup_s: 1.5,
            setup_requests: 3,
        };
        let line = serde_json::to_string(&msg).unwrap();
        assert_eq!(line, r#"{"ready":{"setup_s":1.5,"setup_requests":3}}"#);
        assert!(matches!(
            serde_json::from_str(&line).unwrap(),
            ChildMsg::Ready {
                setup_requests: 3,
                ..
            }
        ));
    }
}
