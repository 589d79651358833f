//! The child side of `rdzv bench --processes`: the hidden `rdzv bench-child` runs its share of
//! a round's participants as its parent directs (the conversation is in [`super::processes`]).

use tokio::sync::mpsc;

use super::protocol::{mono_ns, ChildMsg, ChildSpec, Command};
use super::*;

/// Exit code of a child whose standard input closed before `exit`: its parent is gone.
const ORPHANED: i32 = 3;

/// Runs `rdzv bench-child`: reads its spec and commands on standard input, reports on
/// standard output (one JSON object a line).
///
/// # Errors
/// None of its own: a failure is reported to the parent as a message, and exit code 1.
pub async fn run_child() -> anyhow::Result<ExitCode> {
    let mut commands = stdin_lines();
    let result = async {
        let line = commands.recv().await.context("no spec on standard input")?;
        let spec: ChildSpec = serde_json::from_str(&line).context("not a bench child's spec")?;
        serve(&spec, &mut commands).await
    }
    .await;
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            say(&ChildMsg::Error {
                message: format!("{e:#}"),
            });
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The lines of standard input, read on a thread of their own. At its end before `exit` (the
/// parent died, or gave up on us) the process exits at once, without leaving, as a crashed
/// agent would.
fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            let exit = matches!(Command::parse(&line), Ok(Command::Exit));
            if tx.send(line).is_err() || exit {
                return;
            }
        }
        std::process::exit(ORPHANED);
    });
    rx
}

/// Writes `msg` as one line on standard output; exits if nobody reads it any more.
fn say(msg: &ChildMsg) {
    let Ok(line) = serde_json::to_string(msg) else {
        return;
    };
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(ORPHANED);
    }
}

/// Counters since the last `mark` or `settle`.
struct Phase {
    stats: StatsSnapshot,
    cpu_s: f64,
    rss_start_bytes: u64,
    /// Participants ranked in it (each opens its watches after its round).
    ranked: usize,
}

impl Phase {
    fn start(clients: &[EtcdClient]) -> Self {
        Self {
            stats: sum_stats(clients),
            cpu_s: process_cpu_s(),
            rss_start_bytes: rss_bytes(),
            ranked: 0,
        }
    }
}

async fn serve(
    spec: &ChildSpec,
    commands: &mut mpsc::UnboundedReceiver<String>,
) -> anyhow::Result<()> {
    raise_nofile_limit();
    let ctx = Ctx {
        endpoint: spec.endpoint.clone(),
        connections: None,
        ttl: spec.ttl,
        last_call: spec.last_call,
        round_timeout: Duration::from_secs(spec.round_timeout_s),
        setup_concurrency: spec.setup_concurrency,
        conf: spec.conf.clone(),
        etcd_pid: None,
        profiler: None,
        progress: false,
        seq: AtomicUsize::new(0),
        metrics_addr: None,
        processes: None,
    };
    let params = params_for(&ctx, &spec.run_id, spec.min, spec.max, spec.last_call)?;
    // One connection (and lease) per participant, as real agents.
    let count = spec.nodes.len();
    let group = Group::create(&ctx, &params, count, count, "").await?;
    let handler = |node: usize| {
        spec.nodes
            .iter()
            .position(|&n| n == node)
            .map(|i| group.handlers[i].clone())
            .with_context(|| format!("participant {node} is not in this process"))
    };
    say(&ChildMsg::Ready {
        setup_s: group.setup_s,
        setup_requests: group.setup_requests,
    });
    let mut phase = Phase::start(&group.clients);
    let mut calls = JoinSet::new();
    loop {
        let line = tokio::select! {
            Some(joined) = calls.join_next(), if !calls.is_empty() => {
                let r: NodeResult = joined.context("a participant task panicked")??;
                phase.ranked += 1;
                say(&ChildMsg::Ranked {
                    node: r.node,
                    start_ns: mono_ns(r.start),
                    end_ns: mono_ns(r.end),
                    rank: r.rank,
                    world_size: r.world_size,
                    round: r.round,
                });
                continue;
            }
            line = commands.recv() => line.context("standard input ended")?,
        };
        match Command::parse(&line)? {
            Command::Call(nodes) => {
                let nodes = if nodes.is_empty() {
                    spec.nodes.clone()
                } else {
                    nodes
                };
                for node in nodes {
                    calls.spawn(timed_round(node, handler(node)?));
                }
            }
            Command::React(kind) => {
                for (&node, h) in spec.nodes.iter().zip(&group.handlers) {
                    let events = h.subscribe().context("the etcd handler pushes no events")?;
                    spawn_reaction(&mut calls, node, h.clone(), events, kind.wanted());
                }
                say(&ChildMsg::Armed);
            }
            Command::Settle => {
                settle_watches(&group.clients, &phase.stats, 2 * phase.ranked as u64).await;
                phase = Phase::start(&group.clients);
                say(&ChildMsg::Settled);
            }
            Command::Mark => {
                reset_peak_rss();
                phase = Phase::start(&group.clients);
                say(&ChildMsg::Marked);
            }
            Command::Stats => {
                settle_watches(&group.clients, &phase.stats, 2 * phase.ranked as u64).await;
                let used = sum_stats(&group.clients).since(&phase.stats);
                say(&ChildMsg::Stats {
                    requests: used.requests,
                    watch_creates: used.watch_creates,
                    watch_events: used.watch_events,
                    keep_alives: used.keep_alives,
                    overloaded: used.overloaded,
                    cpu_s: process_cpu_s() - phase.cpu_s,
                    rss_start_bytes: phase.rss_start_bytes,
                    peak_rss_bytes: peak_rss_bytes(),
                });
            }
            Command::Exit => {
                calls.abort_all();
                group.shutdown().await;
                return Ok(());
            }
        }
    }
}
