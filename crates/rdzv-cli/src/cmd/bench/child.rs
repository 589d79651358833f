//! The child side of `rdzv bench --processes`: the hidden `rdzv bench-child` runs its share of
//! a round's participants as its parent directs (the conversation is in [`super::processes`]).

use tokio::sync::mpsc;

use super::processes::{mono_ns, ChildMsg, ChildSpec, EXIT, GO};
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
            let exit = line.trim() == EXIT;
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

/// Waits for the command `word`.
async fn expect(commands: &mut mpsc::UnboundedReceiver<String>, word: &str) -> anyhow::Result<()> {
    let line = commands
        .recv()
        .await
        .with_context(|| format!("standard input ended before {word:?}"))?;
    ensure!(line.trim() == word, "expected {word:?}, got {line:?}");
    Ok(())
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
    let group = Group::create(&ctx, &params, spec.count, spec.count, "").await?;
    say(&ChildMsg::Ready {
        setup_s: group.setup_s,
        setup_requests: group.setup_requests,
    });
    expect(commands, GO).await?;
    let before = sum_stats(&group.clients);
    reset_peak_rss();
    let rss_start_bytes = rss_bytes();
    let cpu_before = process_cpu_s();
    let mut set = JoinSet::new();
    for (i, h) in group.handlers.iter().enumerate() {
        set.spawn(timed_round(spec.first + i, h.clone()));
    }
    let limit = ctx.round_timeout + Duration::from_secs(5);
    tokio::time::timeout(limit, async {
        while let Some(joined) = set.join_next().await {
            let r = joined.context("a participant task panicked")??;
            say(&ChildMsg::Ranked {
                node: r.node,
                start_ns: mono_ns(r.start),
                end_ns: mono_ns(r.end),
                rank: r.rank,
                world_size: r.world_size,
                round: r.round,
            });
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("not all participants were ranked within {limit:?}"))??;
    settle_watches(&group.clients, &before, 2 * spec.count as u64).await;
    let used = sum_stats(&group.clients).since(&before);
    say(&ChildMsg::Stats {
        requests: used.requests,
        watch_creates: used.watch_creates,
        watch_events: used.watch_events,
        keep_alives: used.keep_alives,
        overloaded: used.overloaded,
        cpu_s: process_cpu_s() - cpu_before,
        rss_start_bytes,
        peak_rss_bytes: peak_rss_bytes(),
    });
    expect(commands, EXIT).await?;
    group.shutdown().await;
    Ok(())
}
