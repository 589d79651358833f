//! `--processes P`: the participants of a measured round spread over P child processes; the
//! scenarios' steps (the children are handled in [`super::children`], the child's side is
//! [`super::child`]).
//!
//! Each child is this binary re-executed as `rdzv bench-child` (a hidden subcommand); its
//! participants are handlers with their own etcd connection and lease, as real agents. The
//! parent writes one [`ChildSpec`] (JSON: endpoint, run id, the child's participants, the
//! round's parameters) and then [`Command`]s, one a line, on the child's standard input; the
//! child answers with [`ChildMsg`](super::protocol::ChildMsg)s, one JSON object a line, on its
//! standard output:
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

use super::children::{Before, Children, Setup, Used};
use super::protocol::{ChildSpec, Command, ReactTo};
use super::*;
/// The scenarios `--processes` runs.
const SUPPORTED: [Scenario; 5] = [
    Scenario::Full,
    Scenario::Kill,
    Scenario::Freeze,
    Scenario::Leave,
    Scenario::ScaleUp,
];

/// Checks `--processes P` against the other flags.
pub(super) fn validate(p: usize, args: &BenchArgs) -> anyhow::Result<()> {
    ensure!(p >= 1, "--processes must be at least 1");
    if let Some(s) = args.scenario.iter().find(|s| !SUPPORTED.contains(s)) {
        bail!(
            "--processes supports only the full, kill, freeze, leave and scale-up scenarios (got {})",
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
        let etcd_cpu_s = etcd_cpu_since(ctx, self.before.etcd_cpu_s);
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
            limit: None,
            etcd_requests,
            processes: Some(self.processes),
            child_pids: None,
            cpu_per_node_s: Some(used.cpu_s / participants as f64),
            rss_per_node_bytes: Some(used.peak_rss_bytes / participants as u64),
            wall_runs_s: Vec::new(),
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
        Scenario::Kill | Scenario::Freeze | Scenario::Leave => {
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
        Scenario::LastCall | Scenario::Exit | Scenario::Idle | Scenario::EtcdLimit => {
            bail!("--processes does not run the {} scenario", scenario.name())
        }
    }
    let mut children = Children::spawn(&specs).await?;
    let outcome = match scenario {
        Scenario::Full => full_round(ctx, n, &mut children).await,
        Scenario::Kill | Scenario::Freeze | Scenario::Leave => {
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
    let p = children.len();
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
    let p = children.len();
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
        let nodes: Vec<usize> = children
            .nodes(i)
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
    match scenario {
        Scenario::Kill => children.kill(victim)?,
        Scenario::Freeze => children.freeze(victim)?,
        _ => children.leave(victim).await?,
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
    let p = children.len();
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
}
