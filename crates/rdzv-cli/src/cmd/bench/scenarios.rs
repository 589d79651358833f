//! The scenarios: participants, their rounds, and what each scenario measures.

use super::*;

/// Participants sharing a set of connections.
pub(super) struct Group {
    pub(super) clients: Vec<EtcdClient>,
    pub(super) handlers: Vec<Arc<EtcdRendezvousHandler>>,
    pub(super) setup_s: f64,
    pub(super) setup_requests: u64,
}

impl Group {
    /// Connects `connections` clients and creates `count` handlers on them, round-robin,
    /// `ctx.setup_concurrency` at a time.
    pub(super) async fn create(
        ctx: &Ctx,
        params: &RendezvousParameters,
        count: usize,
        connections: usize,
        label: &str,
    ) -> anyhow::Result<Self> {
        let started = Instant::now();
        let options = ConnectionOptions::from_parameters(params)?;
        let bar = progress_bar(ctx, connections + count, label);
        let clients = connect_clients(ctx, &options, connections, &bar).await?;
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
    pub(super) async fn shutdown(self) {
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

/// Connects `count` clients, each with its own request counters, `ctx.setup_concurrency` at a
/// time.
pub(super) async fn connect_clients(
    ctx: &Ctx,
    options: &ConnectionOptions,
    count: usize,
    bar: &ProgressBar,
) -> anyhow::Result<Vec<EtcdClient>> {
    bounded(count, ctx.setup_concurrency, bar, |_| {
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
    .context("cannot connect to etcd")
}

/// Runs `make(i)` for `i` in `0..count`, at most `limit` at a time; results in index order.
pub(super) async fn bounded<T, F, Fut>(
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
pub(super) struct NodeResult {
    /// Index in the measurement (for the profiler).
    pub(super) node: usize,
    /// When it called `next_rendezvous`.
    pub(super) start: Instant,
    pub(super) end: Instant,
    pub(super) rank: usize,
    pub(super) world_size: usize,
    pub(super) round: u64,
}

/// One participant's `next_rendezvous`, timed.
pub(super) async fn timed_round(
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
pub(super) async fn collect(
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
pub(super) fn check_ranks(results: &[NodeResult], expected: usize) -> anyhow::Result<u64> {
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

pub(super) fn params_for(
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

pub(super) fn fresh_run_id(ctx: &Ctx, scenario: Scenario, n: usize) -> String {
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
pub(super) async fn wait_for_count(
    observer: &EtcdClient,
    prefix: &str,
    target: usize,
) -> anyhow::Result<()> {
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
pub(super) fn spawn_at_signal(
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

pub(super) async fn measure(ctx: &Ctx, scenario: Scenario, n: usize) -> anyhow::Result<Report> {
    if let Some(p) = &ctx.profiler {
        p.clear();
    }
    if scenario == Scenario::EtcdLimit {
        return limit::measure(ctx, n).await;
    }
    if let Some(p) = ctx.processes {
        return processes::measure(ctx, scenario, n, p).await;
    }
    match scenario {
        Scenario::Full => measure_full(ctx, n).await,
        Scenario::Kill => measure_departure(ctx, n, true).await,
        Scenario::Freeze => bail!("the freeze scenario needs --processes (it stops a process)"),
        Scenario::Leave => measure_departure(ctx, n, false).await,
        Scenario::ScaleUp => measure_scale_up(ctx, n).await,
        Scenario::LastCall => {
            let last_call = if ctx.last_call > 0.0 {
                ctx.last_call
            } else {
                DEFAULT_LAST_CALL_S
            };
            measure_one_round(ctx, n, Scenario::LastCall, 1, n + 1, last_call).await
        }
        Scenario::Exit => measure_exit(ctx, n).await,
        Scenario::Idle => measure_idle(ctx, n).await,
        Scenario::EtcdLimit => limit::measure(ctx, n).await,
    }
}

/// What a measured round produced, before it becomes a [`Report`].
pub(super) struct Measured<'a> {
    pub(super) ctx: &'a Ctx,
    pub(super) scenario: Scenario,
    pub(super) n: usize,
    pub(super) group: &'a Group,
    pub(super) last_call_s: f64,
    pub(super) usage: Usage,
    /// When the round was triggered (`None`: the first participant's call).
    pub(super) trigger: Option<Instant>,
    pub(super) results: Vec<NodeResult>,
    /// Participants that reacted to an event (their call start is the detection time).
    pub(super) reacting: Vec<usize>,
}

impl Measured<'_> {
    pub(super) async fn finish(mut self) -> anyhow::Result<Report> {
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
        let etcd_cpu_s = etcd_cpu_since(self.ctx, self.usage.etcd_cpu_s);
        let peak_rss = peak_rss_bytes();
        let etcd_requests = etcd_requests_since(self.ctx, self.usage.etcd_counters.as_ref()).await;
        let t = Timing::of(&self.results, self.trigger, self.usage.at, &self.reacting);
        let phases = self.ctx.profiler.as_ref().and_then(|p| {
            self.results.sort_by_key(|r| r.node);
            p.phases(round, t.origin, &self.results)
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
            wall_s: t.wall_s,
            last_join_to_ranked_s: t.last_join_to_ranked_s,
            p50_s: t.p50_s,
            p99_s: t.p99_s,
            max_s: t.max_s,
            detect_p50_s: t.detect_p50_s,
            detect_max_s: t.detect_max_s,
            requests: used.requests,
            requests_per_node: used.requests as f64 / participants as f64,
            watch_creates: used.watch_creates,
            watch_events: used.watch_events,
            keep_alives: used.keep_alives,
            overloaded: used.overloaded,
            cpu_s,
            etcd_cpu_s,
            peak_rss_bytes: peak_rss,
            rss_start_bytes: self.usage.rss,
            setup_s: self.group.setup_s,
            setup_requests: self.group.setup_requests,
            phases,
            limit: None,
            etcd_requests,
            processes: None,
            child_pids: None,
            cpu_per_node_s: None,
            rss_per_node_bytes: None,
            wall_runs_s: Vec::new(),
        })
    }
}

/// The times of a measured round.
pub(super) struct Timing {
    /// Where `wall_s` starts: the trigger, or the first participant's call.
    pub(super) origin: Instant,
    pub(super) wall_s: f64,
    pub(super) last_join_to_ranked_s: f64,
    pub(super) p50_s: f64,
    pub(super) p99_s: f64,
    pub(super) max_s: f64,
    pub(super) detect_p50_s: Option<f64>,
    pub(super) detect_max_s: Option<f64>,
}

impl Timing {
    /// The times of `results`, from `trigger` (`None`: from the first call; `fallback` when
    /// there is none); `reacting`: the participants whose call is their detection.
    pub(super) fn of(
        results: &[NodeResult],
        trigger: Option<Instant>,
        fallback: Instant,
        reacting: &[usize],
    ) -> Self {
        let first_start = results.iter().map(|r| r.start).min().unwrap_or(fallback);
        let origin = trigger.unwrap_or(first_start);
        let last_start = results.iter().map(|r| r.start).max().unwrap_or(origin);
        let last_end = results.iter().map(|r| r.end).max().unwrap_or(origin);
        let mut latencies: Vec<f64> = results
            .iter()
            .map(|r| (r.end - r.start).as_secs_f64())
            .collect();
        latencies.sort_by(f64::total_cmp);
        let mut detect: Vec<f64> = reacting
            .iter()
            .filter_map(|&i| results.iter().find(|r| r.node == i))
            .map(|r| r.start.saturating_duration_since(origin).as_secs_f64())
            .collect();
        detect.sort_by(f64::total_cmp);
        Self {
            origin,
            wall_s: last_end.saturating_duration_since(origin).as_secs_f64(),
            last_join_to_ranked_s: last_end.saturating_duration_since(last_start).as_secs_f64(),
            p50_s: percentile(&latencies, 50.0),
            p99_s: percentile(&latencies, 99.0),
            max_s: latencies.last().copied().unwrap_or(f64::NAN),
            detect_p50_s: (!detect.is_empty()).then(|| percentile(&detect, 50.0)),
            detect_max_s: detect.last().copied(),
        }
    }
}

/// The last call of the `last-call` scenario when `--last-call` is 0.
pub(super) const DEFAULT_LAST_CALL_S: f64 = 30.0;

pub(super) async fn measure_full(ctx: &Ctx, n: usize) -> anyhow::Result<Report> {
    measure_one_round(ctx, n, Scenario::Full, n, n, 0.0).await
}

/// The handlers of `n` nodes of a new run with these bounds (`--connections` shared, if
/// given).
async fn one_group(
    ctx: &Ctx,
    scenario: Scenario,
    n: usize,
    min: usize,
    max: usize,
    last_call: f64,
) -> anyhow::Result<Group> {
    let run_id = fresh_run_id(ctx, scenario, n);
    let params = params_for(ctx, &run_id, min, max, last_call)?;
    let k = ctx.connections.unwrap_or(n).min(n);
    let label = format!("{} N={n}: setting up", scenario.name());
    Group::create(ctx, &params, n, k, &label).await
}

/// N nodes, all starting together, form one round with these bounds.
pub(super) async fn measure_one_round(
    ctx: &Ctx,
    n: usize,
    scenario: Scenario,
    min: usize,
    max: usize,
    last_call: f64,
) -> anyhow::Result<Report> {
    let name = scenario.name();
    let group = one_group(ctx, scenario, n, min, max, last_call).await?;
    let result = async {
        let (go_tx, go) = watch::channel(false);
        let mut set = spawn_at_signal(&group.handlers, &go);
        // Let every task reach the barrier.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let usage = Usage::start(ctx, &group.clients).await;
        go_tx.send(true).context("no participant waits")?;
        let bar = progress_bar(ctx, n, &format!("{name} N={n}: ranked"));
        let results = collect(&mut set, ctx.round_timeout + Duration::from_secs(5), &bar).await?;
        Measured {
            ctx,
            scenario,
            n,
            group: &group,
            last_call_s: last_call,
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

/// What the survivors of a `kill` or `leave` react to, as a launcher does: a lost peer, or
/// peers already waiting in the next round.
pub(super) fn departure_event(ev: &MembershipEvent) -> bool {
    matches!(
        ev,
        MembershipEvent::PeerLost { .. }
            | MembershipEvent::PeerLeft { .. }
            | MembershipEvent::NodesWaiting { waiting: 1.., .. }
    )
}

/// What the members react to in `scale-up`: nodes waiting to join.
pub(super) fn waiting_event(ev: &MembershipEvent) -> bool {
    matches!(ev, MembershipEvent::NodesWaiting { waiting, .. } if *waiting > 0)
}

/// Waits for the first event `wanted` accepts, then calls `next_rendezvous`, timed from then.
pub(super) fn spawn_reaction(
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
pub(super) struct VictimRuntime(Option<tokio::runtime::Runtime>);

impl VictimRuntime {
    pub(super) fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0
            .as_ref()
            .expect("the victim's runtime is running")
            .spawn(fut)
    }

    pub(super) fn crash(&mut self) {
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
pub(super) async fn measure_departure(ctx: &Ctx, n: usize, crash: bool) -> anyhow::Result<Report> {
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

pub(super) async fn departure_rounds(
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
        spawn_reaction(&mut set, i, h.clone(), events, departure_event);
    }
    // Steady state: etcd catches up watches opened at past revisions every 100 ms.
    tokio::time::sleep(QUIESCE).await;
    if let Some(p) = &ctx.profiler {
        p.clear();
    }
    let usage = Usage::start(ctx, &group.clients).await;
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

pub(super) async fn measure_scale_up(ctx: &Ctx, n: usize) -> anyhow::Result<Report> {
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
            spawn_reaction(&mut set, i, h.clone(), events, waiting_event);
        }
        tokio::time::sleep(QUIESCE).await;
        if let Some(p) = &ctx.profiler {
            p.clear();
        }
        let usage = Usage::start(ctx, &group.clients).await;
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

/// `exit`: a full round, then every node detaches at once; measured: the teardown.
/// The group's `n` participants form a round together, then their membership watches settle
/// (the steady state of a running job): each participant's result, and the round.
async fn steady_round(
    ctx: &Ctx,
    group: &Group,
    n: usize,
    name: &str,
) -> anyhow::Result<(Vec<NodeResult>, u64)> {
    let before_round = sum_stats(&group.clients);
    let (go_tx, go) = watch::channel(false);
    let mut set = spawn_at_signal(&group.handlers, &go);
    tokio::time::sleep(Duration::from_millis(20)).await;
    go_tx.send(true).context("no participant waits")?;
    let bar = progress_bar(ctx, n, &format!("{name} N={n}: round"));
    let results = collect(&mut set, ctx.round_timeout + Duration::from_secs(5), &bar).await?;
    let round = check_ranks(&results, n).context("the round")?;
    settle_watches(&group.clients, &before_round, 2 * n as u64).await;
    tokio::time::sleep(QUIESCE).await;
    Ok((results, round))
}

pub(super) async fn measure_exit(ctx: &Ctx, n: usize) -> anyhow::Result<Report> {
    let group = one_group(ctx, Scenario::Exit, n, n, n, 0.0).await?;
    let result = async {
        let (round, _) = steady_round(ctx, &group, n, "exit").await?;
        let usage = Usage::start(ctx, &group.clients).await;
        let trigger = Instant::now();
        let mut detaching = JoinSet::new();
        for (i, h) in group.handlers.iter().enumerate() {
            let h = h.clone();
            let r = round.iter().find(|r| r.node == i).cloned();
            detaching.spawn(async move {
                let start = Instant::now();
                h.detach().await.context("detach")?;
                let r = r.context("a participant without a round")?;
                anyhow::Ok(NodeResult {
                    node: i,
                    start,
                    end: Instant::now(),
                    ..r
                })
            });
        }
        let bar = progress_bar(ctx, n, &format!("exit N={n}: detached"));
        let results = collect(&mut detaching, ctx.round_timeout, &bar).await?;
        // Let the events of the teardown arrive before counting them.
        tokio::time::sleep(Duration::from_secs(1)).await;
        Measured {
            ctx,
            scenario: Scenario::Exit,
            n,
            group: &group,
            last_call_s: 0.0,
            usage,
            trigger: Some(trigger),
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

/// N nodes form a round, then run for one lease TTL (each lease is renewed about three times):
/// the window's requests, keep-alives, watch events and CPU are the steady cost of a running
/// job. Nothing should happen in it: a watch event or a request other than a renewal would be
/// churn, and the line shows it.
pub(super) async fn measure_idle(ctx: &Ctx, n: usize) -> anyhow::Result<Report> {
    let group = one_group(ctx, Scenario::Idle, n, n, n, 0.0).await?;
    let result = async {
        let (_, round) = steady_round(ctx, &group, n, "idle").await?;
        let usage = Usage::start(ctx, &group.clients).await;
        let window = Duration::from_secs(ctx.ttl);
        tokio::time::sleep(window).await;
        let used = sum_stats(&group.clients).since(&usage.stats);
        let cpu_s = process_cpu_s() - usage.cpu_s;
        let etcd_cpu_s = etcd_cpu_since(ctx, usage.etcd_cpu_s);
        let wall_s = usage.at.elapsed().as_secs_f64();
        let etcd_requests = etcd_requests_since(ctx, usage.etcd_counters.as_ref()).await;
        Ok(Report {
            nodes: n,
            scenario: Scenario::Idle,
            participants: n,
            ranked: n,
            runs: 1,
            connections: group.clients.len(),
            ttl_s: ctx.ttl,
            last_call_s: 0.0,
            round,
            wall_s,
            last_join_to_ranked_s: f64::NAN,
            p50_s: f64::NAN,
            p99_s: f64::NAN,
            max_s: f64::NAN,
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
            peak_rss_bytes: peak_rss_bytes(),
            rss_start_bytes: usage.rss,
            setup_s: group.setup_s,
            setup_requests: group.setup_requests,
            phases: None,
            limit: None,
            etcd_requests,
            processes: None,
            child_pids: None,
            cpu_per_node_s: None,
            rss_per_node_bytes: None,
            wall_runs_s: Vec::new(),
        })
    }
    .await;
    group.shutdown().await;
    result
}
