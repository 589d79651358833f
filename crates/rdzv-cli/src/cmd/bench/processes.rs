//! `--processes P`: the participants of a measured round spread over P child processes.
//!
//! Each child is this binary re-executed as `rdzv bench-child` (a hidden subcommand); its
//! participants are handlers with their own etcd connection and lease, as real agents. The
//! conversation, one line at a time:
//!
//! 1. parent → child: a [`ChildSpec`] (JSON): the endpoint, run id, the child's share of the
//!    participant indices (`first..first + count`, shares differ by at most one) and the
//!    round's parameters;
//! 2. child → parent: [`ChildMsg::Ready`] once all its handlers are created;
//! 3. parent → every child, once all are ready: `go`; every child starts all its calls;
//! 4. child → parent: one [`ChildMsg::Ranked`] per participant as it gets its rank, then, once
//!    all of its own are ranked and their watches settled, [`ChildMsg::Stats`] (its clients'
//!    request counts during the round, its CPU since `go`, its peak resident set since `go`);
//! 5. parent → child: `exit`; the child leaves gracefully and exits. The parent waits for
//!    every child (bounded; a child still there is killed) and reports their process ids.
//!
//! A failing child reports [`ChildMsg::Error`] and exits. A child whose standard input closes
//! before `exit` (its parent died) exits at once, without leaving: no orphans.
//!
//! Timing: the children report their calls' start and end as `CLOCK_MONOTONIC` readings in
//! nanoseconds. On Linux that clock is one for the whole machine (it is what [`Instant`] reads),
//! so the parent compares them with its own, exactly as in one process: no pipe or scheduling
//! latency enters the figures. `wall_s` runs, as without `--processes`, from the first
//! participant's call to the last one's rank.

use std::process::Stdio;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use super::*;

/// The hidden subcommand a child runs.
pub(super) const CHILD_COMMAND: &str = "bench-child";

/// The parent's commands after the spec, one a line.
pub(super) const GO: &str = "go";
pub(super) const EXIT: &str = "exit";

/// Bound on the children's graceful exit (their handlers' shutdowns are bounded at 30 s).
const EXIT_LIMIT: Duration = Duration::from_secs(40);

/// What a child is to do: the first line of its standard input (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ChildSpec {
    pub(super) endpoint: String,
    pub(super) run_id: String,
    /// Its participants are `first..first + count`.
    pub(super) first: usize,
    pub(super) count: usize,
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
    /// All its participants are ranked: its clients' counts during the round, its CPU since
    /// `go`, its resident set at `go` and its peak since.
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

/// Checks `--processes P` against the other flags.
pub(super) fn validate(p: usize, args: &BenchArgs) -> anyhow::Result<()> {
    ensure!(p >= 1, "--processes must be at least 1");
    if let Some(s) = args.scenario.iter().find(|s| **s != Scenario::Full) {
        bail!(
            "--processes supports only the full scenario (got {})",
            s.name()
        );
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
            let mut child = Command::new(&exe)
                .arg(CHILD_COMMAND)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start child process {i}"))?;
            let pid = child.id().context("a child without a process id")?;
            let stdout = child.stdout.take().context("a child without its output")?;
            let mut stdin = child.stdin.take().context("a child without its input")?;
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
            let line = format!("{}\n", serde_json::to_string(spec)?);
            stdin
                .write_all(line.as_bytes())
                .await
                .with_context(|| format!("cannot instruct child process {i} (pid {pid})"))?;
            procs.push(ChildProc {
                child,
                stdin: Some(stdin),
                pid,
            });
        }
        Ok(Self { procs, events })
    }

    /// Sends `line` to every child.
    async fn send_all(&mut self, line: &str) -> anyhow::Result<()> {
        for (i, p) in self.procs.iter_mut().enumerate() {
            let stdin = p.stdin.as_mut().context("a child's input is closed")?;
            stdin
                .write_all(format!("{line}\n").as_bytes())
                .await
                .with_context(|| format!("cannot instruct child process {i} (pid {})", p.pid))?;
        }
        Ok(())
    }

    /// The next message of any child; an error if one failed or exited, or at `deadline`.
    async fn next(
        &mut self,
        deadline: tokio::time::Instant,
        waiting_for: impl FnOnce() -> String,
    ) -> anyhow::Result<(usize, ChildMsg)> {
        let event = tokio::time::timeout_at(deadline, self.events.recv()).await;
        let Ok(Some((i, event))) = event else {
            bail!("timed out waiting for {}", waiting_for());
        };
        let pid = self.procs[i].pid;
        match event {
            Event::Msg(ChildMsg::Error { message }) => {
                bail!("child process {i} (pid {pid}): {message}")
            }
            Event::Msg(msg) => Ok((i, msg)),
            Event::Garbage(line) => bail!("child process {i} (pid {pid}) said {line:?}"),
            Event::Closed => bail!(
                "child process {i} (pid {pid}) exited while waiting for {}",
                waiting_for()
            ),
        }
    }

    /// Tells every child to exit and waits for all (bounded: then kills); their process ids.
    async fn end(mut self) -> Vec<u32> {
        for p in &mut self.procs {
            if let Some(mut stdin) = p.stdin.take() {
                // Read before the end of input, which follows as `stdin` is dropped.
                let _ = stdin.write_all(format!("{EXIT}\n").as_bytes()).await;
            }
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

/// `full` with the participants in `p` child processes.
pub(super) async fn measure_full(ctx: &Ctx, n: usize, p: usize) -> anyhow::Result<Report> {
    let run_id = fresh_run_id(ctx, Scenario::Full, n);
    let specs: Vec<ChildSpec> = shares(n, p)
        .into_iter()
        .map(|(first, count)| ChildSpec {
            endpoint: ctx.endpoint.clone(),
            run_id: run_id.clone(),
            first,
            count,
            min: n,
            max: n,
            last_call: 0.0,
            ttl: ctx.ttl,
            round_timeout_s: ctx.round_timeout.as_secs(),
            conf: ctx.conf.clone(),
            setup_concurrency: ctx.setup_concurrency,
        })
        .collect();
    let mut children = Children::spawn(&specs).await?;
    let result = full_round(ctx, n, &mut children).await;
    let pids = children.end().await;
    let mut report = result?;
    report.child_pids = Some(pids);
    Ok(report)
}

async fn full_round(ctx: &Ctx, n: usize, children: &mut Children) -> anyhow::Result<Report> {
    let p = children.procs.len();
    let bar = progress_bar(ctx, p, &format!("full N={n} P={p}: setting up"));
    let deadline = tokio::time::Instant::now() + ctx.round_timeout;
    let (mut setup_s, mut setup_requests) = (0.0f64, 0);
    for ready in 0..p {
        let waiting = || format!("the children's setup ({ready} of {p} ready)");
        match children.next(deadline, waiting).await? {
            (
                _,
                ChildMsg::Ready {
                    setup_s: s,
                    setup_requests: r,
                },
            ) => {
                setup_s = setup_s.max(s);
                setup_requests += r;
                bar.inc(1);
            }
            (i, msg) => bail!("child process {i}: {msg:?} before the start"),
        }
    }
    bar.finish_and_clear();

    let etcd_before = etcd_counters(ctx).await;
    let etcd_cpu_before = ctx.etcd_pid.and_then(pid_cpu_s);
    let go_at = Instant::now();
    children.send_all(GO).await?;
    let bar = progress_bar(ctx, n, &format!("full N={n} P={p}: ranked"));
    let deadline = tokio::time::Instant::now() + ctx.round_timeout + Duration::from_secs(5);
    let mut results = Vec::with_capacity(n);
    let mut stats = Vec::with_capacity(p);
    while results.len() < n || stats.len() < p {
        let ranked = results.len();
        let waiting = || format!("ranks ({ranked} of {n}) and the children's counts");
        match children.next(deadline, waiting).await? {
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
            (_, msg @ ChildMsg::Stats { .. }) => stats.push(msg),
            (i, msg) => bail!("child process {i}: {msg:?} during the round"),
        }
    }
    bar.finish_and_clear();
    let etcd_cpu_s = match (ctx.etcd_pid.and_then(pid_cpu_s), etcd_cpu_before) {
        (Some(now), Some(then)) => Some(now - then),
        _ => None,
    };
    let etcd_requests = etcd_requests_since(ctx, etcd_before.as_ref()).await;
    let round = check_ranks(&results, n)?;
    let t = Timing::of(&results, None, go_at, &[]);
    let mut used = StatsSnapshot::default();
    let (mut cpu_s, mut rss_start, mut peak_rss) = (0.0, 0, 0);
    for msg in &stats {
        if let ChildMsg::Stats {
            requests,
            watch_creates,
            watch_events,
            keep_alives,
            overloaded,
            cpu_s: c,
            rss_start_bytes,
            peak_rss_bytes,
        } = *msg
        {
            used.requests += requests;
            used.watch_creates += watch_creates;
            used.watch_events += watch_events;
            used.keep_alives += keep_alives;
            used.overloaded += overloaded;
            cpu_s += c;
            rss_start += rss_start_bytes;
            peak_rss += peak_rss_bytes;
        }
    }
    Ok(Report {
        nodes: n,
        scenario: Scenario::Full,
        participants: n,
        ranked: n,
        runs: 1,
        connections: n,
        ttl_s: ctx.ttl,
        last_call_s: 0.0,
        round,
        wall_s: t.wall_s,
        last_join_to_ranked_s: t.last_join_to_ranked_s,
        p50_s: t.p50_s,
        p99_s: t.p99_s,
        max_s: t.max_s,
        detect_p50_s: None,
        detect_max_s: None,
        requests: used.requests,
        requests_per_node: used.requests as f64 / n as f64,
        watch_creates: used.watch_creates,
        watch_events: used.watch_events,
        keep_alives: used.keep_alives,
        overloaded: used.overloaded,
        cpu_s,
        etcd_cpu_s,
        peak_rss_bytes: peak_rss,
        rss_start_bytes: rss_start,
        setup_s,
        setup_requests,
        phases: None,
        etcd_requests,
        processes: Some(p),
        child_pids: None,
        cpu_per_node_s: Some(cpu_s / n as f64),
        rss_per_node_bytes: Some(peak_rss / n as u64),
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
