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
            Some("completed the round") => Mark::Finalised,
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
        let filter = EnvFilter::try_from_env("RDZV_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
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
    pub fn phases(&self, round: u64, origin: Instant, results: &[NodeResult]) -> Option<Phases> {
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
