//! The `etcd-limit` scenario: what this etcd can do at most for the request mix of a round,
//! without the protocol — the floor the `full` scenario is compared with.
//!
//! N clients (one connection each, as N participants; always in this process, also with
//! `--processes`, as they do nothing but send requests) go through four phases, each starting
//! when the previous one has ended on every client:
//!
//! 1. `txn`: each sends one transaction that puts a key of its own (a join's one write; one
//!    refused by etcd's backpressure is sent again after a jittered pause, and counted);
//! 2. `watch`: each opens a watch on one shared key (a waiting node's watch on its round);
//! 3. `notify`: one put of that key reaches every watcher (the round's `final`);
//! 4. `range`: each reads its own key (a member's read of its assignment).
//!
//! A round of the protocol costs each node about these four requests and a few watch events,
//! so the sum of the phases is what a round cannot beat on this etcd and this machine.

use super::*;
use rdzv::etcd::api::{PutOptions, Txn, TxnOp, WatchOptions, WatchStream};
use rdzv::etcd::backoff::Backoff;
use report::{
    etcd_cpu_since, etcd_requests_since, peak_rss_bytes, percentile, process_cpu_s, sum_stats,
    Usage,
};

/// The size of each client's value: about a join record's.
const VALUE_BYTES: usize = 200;

/// Bound on each phase.
const PHASE_LIMIT: Duration = Duration::from_secs(300);

/// The times of the four phases, in seconds, and their rates (requests or events per second).
#[derive(Debug, Clone, Serialize)]
pub(super) struct LimitPhases {
    pub(super) txn_s: f64,
    pub(super) watch_s: f64,
    pub(super) notify_s: f64,
    pub(super) range_s: f64,
    pub(super) txn_per_s: f64,
    pub(super) watch_per_s: f64,
    pub(super) events_per_s: f64,
    pub(super) range_per_s: f64,
}

/// The line below a table row: the phases and their rates.
pub(super) fn limit_row(p: &LimitPhases) -> String {
    format!(
        "  etcd's limit: {:.3} s for the transactions ({:.0}/s), {:.3} s for the watches \
         ({:.0}/s), {:.3} s to notify them all ({:.0} events/s), {:.3} s for the reads ({:.0}/s)",
        p.txn_s,
        p.txn_per_s,
        p.watch_s,
        p.watch_per_s,
        p.notify_s,
        p.events_per_s,
        p.range_s,
        p.range_per_s
    )
}

/// Runs `op(i, client)` on every client at once; the time until all are done, and each
/// client's own latency.
async fn phase<T, F, Fut>(
    what: &str,
    clients: &[EtcdClient],
    op: F,
) -> anyhow::Result<(f64, Vec<f64>, Vec<T>)>
where
    T: Send + 'static,
    F: Fn(usize, EtcdClient) -> Fut,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let started = Instant::now();
    let mut set = JoinSet::new();
    for (i, client) in clients.iter().enumerate() {
        let fut = op(i, client.clone());
        set.spawn(async move {
            let t = Instant::now();
            let out = fut.await;
            (i, t.elapsed().as_secs_f64(), out)
        });
    }
    let mut latencies = vec![0.0; clients.len()];
    let mut outs: Vec<Option<T>> = (0..clients.len()).map(|_| None).collect();
    let all = async {
        while let Some(joined) = set.join_next().await {
            let (i, latency, out) = joined.context("a client task panicked")?;
            latencies[i] = latency;
            outs[i] = Some(out.with_context(|| format!("{what}: client {i}"))?);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(PHASE_LIMIT, all)
        .await
        .with_context(|| format!("{what}: not done within {PHASE_LIMIT:?}"))??;
    Ok((
        started.elapsed().as_secs_f64(),
        latencies,
        outs.into_iter().flatten().collect(),
    ))
}

/// Measures the `etcd-limit` scenario with `n` clients.
pub(super) async fn measure(ctx: &Ctx, n: usize) -> anyhow::Result<Report> {
    let started = Instant::now();
    let options = ConnectionOptions::plain(&ctx.endpoint)?;
    let bar = progress_bar(ctx, n, "etcd-limit: connecting");
    let clients = scenarios::connect_clients(ctx, &options, n, &bar).await?;
    bar.finish_and_clear();
    let setup_s = started.elapsed().as_secs_f64();
    let prefix = format!(
        "/rdzv-bench-limit/{}/{}/",
        std::process::id(),
        ctx.seq.fetch_add(1, Ordering::Relaxed)
    );
    let usage = Usage::start(ctx, &clients).await;
    let key = |i: usize| format!("{prefix}k/{i:08}");
    let (txn_s, mut own, _) = phase("transaction", &clients, |i, c| {
        let txn = Txn::new().and_then([TxnOp::put(key(i), vec![b'x'; VALUE_BYTES], None)]);
        async move {
            // Refused by etcd's backpressure (not applied): sent again after a jittered
            // pause, as the protocol does; the refusals are counted (`overloaded`).
            let mut backoff = Backoff::starting_at(Duration::from_millis(100));
            loop {
                match c.txn(txn.clone()).await {
                    Err(e) if rdzv::etcd::client::is_overloaded(&e) => {
                        let pause = backoff.next_pause((i % 97) as f64 / 97.0);
                        tokio::time::sleep(pause).await;
                    }
                    other => return Ok(other?),
                }
            }
        }
    })
    .await?;
    let go = format!("{prefix}go");
    let (watch_s, lat, streams) = phase("watch", &clients, |_, c| {
        let go = go.clone();
        async move { Ok(c.watch(go, Some(WatchOptions::new())).await?.0) }
    })
    .await?;
    add(&mut own, &lat);
    let notified = Instant::now();
    let waiters: Vec<_> = streams
        .into_iter()
        .map(|mut s: Box<dyn WatchStream>| {
            tokio::spawn(async move {
                loop {
                    match s.message().await {
                        Ok(Some(m)) if !m.events.is_empty() => return Ok(Instant::now()),
                        Ok(Some(_)) => continue,
                        Ok(None) => bail!("the watch stream ended"),
                        Err(e) => bail!("the watch stream broke: {e}"),
                    }
                }
            })
        })
        .collect();
    clients[0]
        .put(go.clone(), b"go".to_vec(), None::<PutOptions>)
        .await?;
    let mut last = notified;
    let all = async {
        for w in waiters {
            last = last.max(w.await.context("a watcher panicked")??);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(PHASE_LIMIT, all)
        .await
        .with_context(|| format!("notify: not done within {PHASE_LIMIT:?}"))??;
    let notify_s = (last - notified).as_secs_f64();
    let (range_s, lat, _) = phase("range", &clients, |i, c| {
        let k = key(i);
        async move { Ok(c.get(k, None).await?) }
    })
    .await?;
    add(&mut own, &lat);
    let wall_s = txn_s + watch_s + notify_s + range_s;
    let used = sum_stats(&clients).since(&usage.stats);
    let cpu_s = process_cpu_s() - usage.cpu_s;
    let etcd_cpu_s = etcd_cpu_since(ctx, usage.etcd_cpu_s);
    let etcd_requests = etcd_requests_since(ctx, usage.etcd_counters.as_ref()).await;
    // Leave nothing behind.
    let _ = clients[0]
        .delete(
            prefix.clone(),
            Some(rdzv::etcd::api::DeleteOptions::new().with_prefix()),
        )
        .await;
    own.sort_by(f64::total_cmp);
    let rate = |secs: f64| n as f64 / secs.max(1e-9);
    Ok(Report {
        nodes: n,
        scenario: Scenario::EtcdLimit,
        participants: n,
        ranked: n,
        runs: 1,
        connections: n,
        ttl_s: ctx.ttl,
        last_call_s: 0.0,
        round: 0,
        wall_s,
        last_join_to_ranked_s: wall_s,
        p50_s: percentile(&own, 50.0),
        p99_s: percentile(&own, 99.0),
        max_s: own.last().copied().unwrap_or(f64::NAN),
        detect_p50_s: None,
        detect_max_s: None,
        requests: used.requests,
        requests_per_node: used.requests as f64 / n as f64,
        watch_creates: used.watch_creates,
        watch_events: n as u64,
        keep_alives: used.keep_alives,
        overloaded: used.overloaded,
        cpu_s,
        etcd_cpu_s,
        peak_rss_bytes: peak_rss_bytes(),
        rss_start_bytes: usage.rss,
        setup_s,
        setup_requests: 0,
        phases: None,
        limit: Some(LimitPhases {
            txn_s,
            watch_s,
            notify_s,
            range_s,
            txn_per_s: rate(txn_s),
            watch_per_s: rate(watch_s),
            events_per_s: rate(notify_s),
            range_per_s: rate(range_s),
        }),
        etcd_requests,
        processes: None,
        child_pids: None,
        cpu_per_node_s: None,
        rss_per_node_bytes: None,
        wall_runs_s: Vec::new(),
    })
}

/// Adds each client's latency of a phase to its total.
fn add(total: &mut [f64], phase: &[f64]) {
    for (t, p) in total.iter_mut().zip(phase) {
        *t += p;
    }
}
