//! The parent's side of `rdzv bench --processes`: starting the child processes, directing
//! them, reading what they say, ending them (see [`super::processes`]).

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use super::etcd_metrics::EtcdCounters;
use super::protocol::{instant_of, ChildMsg, ChildSpec, Command, CHILD_COMMAND};
use super::*;

/// Bound on the children's graceful exit (their handlers' shutdowns are bounded at 30 s).
const EXIT_LIMIT: Duration = Duration::from_secs(40);

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
    /// Stopped with SIGSTOP (killed at the end).
    frozen: bool,
}

/// The running children and what they say.
pub(super) struct Children {
    procs: Vec<ChildProc>,
    events: mpsc::UnboundedReceiver<(usize, Event)>,
}

impl Children {
    /// Starts one child per spec and hands it its spec. Dropped, it kills the children.
    pub(super) async fn spawn(specs: &[ChildSpec]) -> anyhow::Result<Self> {
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
                frozen: false,
            });
            let line = serde_json::to_string(spec)?;
            procs[i].write(&line).await?;
        }
        Ok(Self { procs, events })
    }

    /// How many children there are.
    pub(super) fn len(&self) -> usize {
        self.procs.len()
    }

    /// The participants of child `i`.
    pub(super) fn nodes(&self, i: usize) -> &[usize] {
        &self.procs[i].nodes
    }

    /// Sends `command` to each child of `who`.
    pub(super) async fn send(&mut self, who: &[usize], command: &Command) -> anyhow::Result<()> {
        let line = command.line();
        for &i in who {
            self.procs[i].write(&line).await?;
        }
        Ok(())
    }

    /// The next message of any child; an error if one failed or exited unexpectedly, or at
    /// `deadline`.
    pub(super) async fn next(
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
    pub(super) async fn ask(
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
    pub(super) async fn ranks(
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
    pub(super) async fn setup(&mut self, ctx: &Ctx) -> anyhow::Result<Setup> {
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
    pub(super) async fn mark(&mut self, ctx: &Ctx, who: &[usize]) -> anyhow::Result<Before> {
        self.ask(who, Some(&Command::Mark), SETTLE_LIMIT).await?;
        let etcd_counters = etcd_counters(ctx).await;
        Ok(Before {
            etcd_counters,
            etcd_cpu_s: ctx.etcd_pid.and_then(pid_cpu_s),
            at: Instant::now(),
        })
    }

    /// The sums of the `Stats` of the children of `who`.
    pub(super) async fn stats(&mut self, who: &[usize]) -> anyhow::Result<Used> {
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
    pub(super) fn holder(&self, node: usize) -> anyhow::Result<usize> {
        self.procs
            .iter()
            .position(|p| p.nodes.contains(&node))
            .with_context(|| format!("no child process holds participant {node}"))
    }

    /// Kills child `i` at once (SIGKILL): a crash.
    pub(super) fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        self.procs[i].gone = true;
        self.procs[i]
            .child
            .start_kill()
            .with_context(|| format!("cannot kill child process {i}"))
    }

    /// Stops child `i` (SIGSTOP): a frozen agent, whose sockets stay open; it is killed at
    /// the end.
    pub(super) fn freeze(&mut self, i: usize) -> anyhow::Result<()> {
        self.procs[i].gone = true;
        self.procs[i].frozen = true;
        let pid = self.procs[i]
            .child
            .id()
            .with_context(|| format!("child process {i} is gone"))?;
        // SAFETY: kill(2) with a valid signal on our own child's pid.
        let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
        ensure!(rc == 0, "cannot stop child process {i}");
        Ok(())
    }

    /// Tells child `i` to leave gracefully and exit.
    pub(super) async fn leave(&mut self, i: usize) -> anyhow::Result<()> {
        self.procs[i].gone = true;
        self.procs[i].write(&Command::Exit.line()).await?;
        self.procs[i].stdin = None;
        Ok(())
    }

    /// Tells every child to exit and waits for all (bounded: then kills); their process ids.
    pub(super) async fn end(mut self) -> Vec<u32> {
        for p in &mut self.procs {
            if p.frozen {
                let _ = p.child.start_kill();
            }
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
pub(super) struct Setup {
    pub(super) setup_s: f64,
    pub(super) setup_requests: u64,
}

/// etcd at the start of the measured part.
pub(super) struct Before {
    pub(super) etcd_counters: Option<EtcdCounters>,
    pub(super) etcd_cpu_s: Option<f64>,
    pub(super) at: Instant,
}

/// The children's costs in the measured part (sums).
#[derive(Default)]
pub(super) struct Used {
    pub(super) stats: StatsSnapshot,
    pub(super) cpu_s: f64,
    pub(super) rss_start_bytes: u64,
    pub(super) peak_rss_bytes: u64,
}
