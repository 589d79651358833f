//! The simulator's etcd model checked against a real etcd (started by the project's
//! `EtcdServer`): random operation sequences — puts, deletes, ranges (prefix, count only,
//! keys only, limits), transactions with every kind of compare, nested transactions, duplicate
//! keys, too many operations, leases (grant, keep-alive, revoke, a put on a missing one),
//! watches from past revisions and compaction — run on both, and every answer must agree.
//! Revisions are compared relative to where each store started, lease ids through the order
//! they were granted in. Lease expiry is checked by a timed test of its own.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use rdzv::etcd::api::{
    ApiError, Compare, CompareOp, DeleteOptions, EtcdApi, Event, EventType, GetOptions,
    GetResponse, GrpcEtcd, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
    WatchOptions,
};
use rdzv::etcd::EtcdServer;
use rdzv_sim::model::{Limits, Model};

const KEYS: &[&str] = &["a", "b", "c", "d/x", "d/y", "d/z"];

/// One operation, in terms independent of either store.
#[derive(Debug, Clone)]
enum Op {
    Put {
        key: usize,
        value: u8,
        lease: Option<usize>,
        prev: bool,
    },
    Delete {
        key: usize,
        prefix: bool,
        prev: bool,
    },
    Get {
        key: usize,
        prefix: bool,
        count_only: bool,
        keys_only: bool,
        limit: i64,
    },
    Txn(TxnSpec),
    Grant {
        ttl: i64,
    },
    Revoke {
        lease: usize,
    },
    KeepAlive {
        lease: usize,
    },
    WatchFrom {
        key: usize,
        prefix: bool,
        back: i64,
    },
    Compact {
        back: i64,
    },
}

#[derive(Debug, Clone)]
struct TxnSpec {
    compare: Vec<Cmp>,
    success: Vec<Op>,
    failure: Vec<Op>,
    nested: Option<Box<TxnSpec>>,
}

#[derive(Debug, Clone)]
enum Cmp {
    Version(usize, CompareOp, i64),
    CreateRev(usize, CompareOp, i64),
    ModRev(usize, CompareOp, i64),
    Value(usize, CompareOp, u8),
    Lease(usize, CompareOp, Option<usize>),
    /// A compare over every key under `d/` (which may be empty).
    RangeCreateRev(CompareOp, i64),
    RangeValue(CompareOp, u8),
}

fn cmp_op() -> impl Strategy<Value = CompareOp> {
    prop_oneof![
        Just(CompareOp::Equal),
        Just(CompareOp::Greater),
        Just(CompareOp::Less),
        Just(CompareOp::NotEqual)
    ]
}

fn key() -> impl Strategy<Value = usize> {
    0..KEYS.len()
}

fn simple_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (
            key(),
            0u8..4,
            proptest::option::of(0usize..3),
            any::<bool>()
        )
            .prop_map(|(key, value, lease, prev)| Op::Put {
                key,
                value,
                lease,
                prev
            }),
        (key(), any::<bool>(), any::<bool>()).prop_map(|(key, prefix, prev)| Op::Delete {
            key,
            prefix,
            prev
        }),
        (key(), any::<bool>(), any::<bool>(), any::<bool>(), 0i64..3).prop_map(
            |(key, prefix, count_only, keys_only, limit)| Op::Get {
                key,
                prefix,
                count_only,
                keys_only,
                limit
            }
        ),
    ]
}

fn compare() -> impl Strategy<Value = Cmp> {
    prop_oneof![
        (key(), cmp_op(), 0i64..3).prop_map(|(k, o, v)| Cmp::Version(k, o, v)),
        (key(), cmp_op(), 0i64..8).prop_map(|(k, o, v)| Cmp::CreateRev(k, o, v)),
        (key(), cmp_op(), 0i64..8).prop_map(|(k, o, v)| Cmp::ModRev(k, o, v)),
        (key(), cmp_op(), 0u8..4).prop_map(|(k, o, v)| Cmp::Value(k, o, v)),
        (key(), cmp_op(), proptest::option::of(0usize..3))
            .prop_map(|(k, o, v)| Cmp::Lease(k, o, v)),
        (cmp_op(), 0i64..8).prop_map(|(o, v)| Cmp::RangeCreateRev(o, v)),
        (cmp_op(), 0u8..4).prop_map(|(o, v)| Cmp::RangeValue(o, v)),
    ]
}

fn txn_spec(depth: u32) -> BoxedStrategy<TxnSpec> {
    let nested = if depth == 0 {
        Just(None).boxed()
    } else {
        proptest::option::of(txn_spec(depth - 1).prop_map(Box::new)).boxed()
    };
    (
        proptest::collection::vec(compare(), 0..3),
        proptest::collection::vec(simple_op(), 0..4),
        proptest::collection::vec(simple_op(), 0..3),
        nested,
    )
        .prop_map(|(compare, success, failure, nested)| TxnSpec {
            compare,
            success,
            failure,
            nested,
        })
        .boxed()
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => simple_op(),
        4 => txn_spec(1).prop_map(Op::Txn),
        // Long TTLs: no lease expires during a case (expiry has its own timed test).
        1 => (60i64..63).prop_map(|ttl| Op::Grant { ttl }),
        1 => (0usize..3).prop_map(|lease| Op::Revoke { lease }),
        1 => (0usize..3).prop_map(|lease| Op::KeepAlive { lease }),
        1 => (key(), any::<bool>(), 0i64..6).prop_map(|(key, prefix, back)| Op::WatchFrom { key, prefix, back }),
        1 => (0i64..4).prop_map(|back| Op::Compact { back }),
    ]
}

/// One store under test: where its revisions start, and its leases in grant order.
struct Side {
    prefix: String,
    base: i64,
    leases: Vec<i64>,
}

impl Side {
    fn key(&self, k: usize) -> Vec<u8> {
        format!("{}{}", self.prefix, KEYS[k]).into_bytes()
    }

    fn rev(&self, rel: i64) -> i64 {
        if rel == 0 {
            0
        } else {
            rel + self.base
        }
    }

    fn lease(&self, slot: Option<usize>) -> i64 {
        slot.and_then(|s| self.leases.get(s).copied()).unwrap_or(0)
    }

    /// A lease that may not exist (an index past the granted ones names a missing lease).
    fn lease_or_missing(&self, slot: usize) -> i64 {
        self.leases
            .get(slot)
            .copied()
            .unwrap_or(0x7fff_0000 + slot as i64)
    }

    fn get_options(
        &self,
        prefix: bool,
        count_only: bool,
        keys_only: bool,
        limit: i64,
    ) -> GetOptions {
        let mut o = GetOptions::new().with_limit(limit);
        if prefix {
            o = o.with_prefix();
        }
        if count_only {
            o = o.with_count_only();
        }
        if keys_only {
            o = o.with_keys_only();
        }
        o
    }

    fn range_key(&self, key: usize, prefix: bool) -> Vec<u8> {
        if prefix {
            format!("{}d/", self.prefix).into_bytes()
        } else {
            self.key(key)
        }
    }

    fn txn_op(&self, op: &Op) -> TxnOp {
        match op {
            Op::Put {
                key,
                value,
                lease,
                prev,
            } => {
                let mut o = PutOptions::new();
                if let Some(l) = lease {
                    o = o.with_lease(self.lease_or_missing(*l));
                }
                if *prev {
                    o = o.with_prev_key();
                }
                TxnOp::put(self.key(*key), vec![b'0' + value], Some(o))
            }
            Op::Delete { key, prefix, prev } => {
                let mut o = DeleteOptions::new();
                if *prefix {
                    o = o.with_prefix();
                }
                if *prev {
                    o = o.with_prev_key();
                }
                TxnOp::delete(self.range_key(*key, *prefix), Some(o))
            }
            Op::Get {
                key,
                prefix,
                count_only,
                keys_only,
                limit,
            } => TxnOp::get(
                self.range_key(*key, *prefix),
                Some(self.get_options(*prefix, *count_only, *keys_only, *limit)),
            ),
            other => unreachable!("not a transaction operation: {other:?}"),
        }
    }

    fn compare(&self, c: &Cmp) -> Compare {
        match c {
            Cmp::Version(k, o, v) => Compare::version(self.key(*k), *o, *v),
            Cmp::CreateRev(k, o, r) => Compare::create_revision(self.key(*k), *o, self.rev(*r)),
            Cmp::ModRev(k, o, r) => Compare::mod_revision(self.key(*k), *o, self.rev(*r)),
            Cmp::Value(k, o, v) => Compare::value(self.key(*k), *o, vec![b'0' + v]),
            Cmp::Lease(k, o, l) => Compare::lease(self.key(*k), *o, self.lease(*l)),
            Cmp::RangeCreateRev(o, r) => {
                Compare::create_revision(self.range_key(0, true), *o, self.rev(*r)).with_prefix()
            }
            Cmp::RangeValue(o, v) => {
                Compare::value(self.range_key(0, true), *o, vec![b'0' + v]).with_prefix()
            }
        }
    }

    fn txn(&self, spec: &TxnSpec) -> Txn {
        let mut success: Vec<TxnOp> = spec.success.iter().map(|o| self.txn_op(o)).collect();
        if let Some(n) = &spec.nested {
            success.push(TxnOp::txn(self.txn(n)));
        }
        Txn::new()
            .when(spec.compare.iter().map(|c| self.compare(c)))
            .and_then(success)
            .or_else(spec.failure.iter().map(|o| self.txn_op(o)))
    }

    /// A key-value in store-independent terms.
    fn norm_kv(&self, kv: &KeyValue) -> String {
        let key =
            String::from_utf8_lossy(&kv.key[self.prefix.len().min(kv.key.len())..]).into_owned();
        let rel = |r: i64| if r == 0 { 0 } else { r - self.base };
        let lease = match kv.lease {
            0 => "-".to_string(),
            l => self
                .leases
                .iter()
                .position(|x| *x == l)
                .map_or("?".into(), |p| p.to_string()),
        };
        format!(
            "{key}={} c{} m{} v{} l{lease}",
            String::from_utf8_lossy(&kv.value),
            rel(kv.create_revision),
            rel(kv.mod_revision),
            kv.version
        )
    }

    fn norm_get(&self, g: &GetResponse) -> String {
        let kvs: Vec<String> = g.kvs.iter().map(|kv| self.norm_kv(kv)).collect();
        format!("count {} more {} {kvs:?}", g.count, g.more)
    }

    fn norm_txn(&self, t: &TxnResponse) -> String {
        let parts: Vec<String> = t
            .responses
            .iter()
            .map(|r| match r {
                TxnOpResponse::Get(g) => self.norm_get(g),
                TxnOpResponse::Put(p) => format!(
                    "put prev {:?}",
                    p.prev_kv.as_ref().map(|kv| self.norm_kv(kv))
                ),
                TxnOpResponse::Delete(d) => format!(
                    "deleted {} {:?}",
                    d.deleted,
                    d.prev_kvs
                        .iter()
                        .map(|kv| self.norm_kv(kv))
                        .collect::<Vec<_>>()
                ),
                TxnOpResponse::Txn(t) => format!("txn({})", self.norm_txn(t)),
            })
            .collect();
        format!(
            "succeeded {} rev {} [{}]",
            t.succeeded,
            t.revision - self.base,
            parts.join("; ")
        )
    }

    fn norm_events(&self, events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| {
                let event = match e.event_type {
                    EventType::Put => format!("put {}", self.norm_kv(&e.kv)),
                    EventType::Delete => format!(
                        "delete {} m{}",
                        String::from_utf8_lossy(&e.kv.key[self.prefix.len()..]),
                        e.kv.mod_revision - self.base
                    ),
                };
                // The watches ask for the previous values: they must agree too.
                match &e.prev_kv {
                    Some(prev) => format!("{event} (was {})", self.norm_kv(prev)),
                    None => event,
                }
            })
            .collect()
    }
}

fn norm_err(e: &ApiError) -> String {
    match e {
        ApiError::LeaseNotFound => "lease not found".into(),
        ApiError::Compacted => "compacted".into(),
        ApiError::Other(m) if m.contains("duplicate key") => "duplicate key".into(),
        ApiError::Other(m) if m.contains("too many operations") => "too many operations".into(),
        ApiError::Other(m) if m.contains("future revision") => "future revision".into(),
        other => format!("other: {other}"),
    }
}

/// Runs `ops` on the model and on etcd (keys under a fresh prefix); returns the first
/// disagreement. The case's leases are revoked at the end, so that none expires during a later
/// case (which would move etcd's revision under it).
async fn replay(etcd: &GrpcEtcd, case: u64, ops: &[Op]) -> Result<(), String> {
    let mut leases = Vec::new();
    let result = replay_case(etcd, case, ops, &mut leases).await;
    for id in leases {
        let _ = etcd.lease_revoke(id).await;
    }
    result
}

async fn replay_case(
    etcd: &GrpcEtcd,
    case: u64,
    ops: &[Op],
    granted: &mut Vec<i64>,
) -> Result<(), String> {
    let prefix = format!("/diff/{case}/");
    let start = etcd
        .range(b"/".to_vec(), GetOptions::new().with_count_only())
        .await
        .map_err(|e| e.to_string())?;
    let mut real = Side {
        prefix: prefix.clone(),
        base: start.revision,
        leases: Vec::new(),
    };
    let mut model = Model::new(Limits {
        max_txn_ops: 128,
        min_lease_ttl: 1,
    });
    let mut sim = Side {
        prefix,
        base: model.revision(),
        leases: Vec::new(),
    };
    for (i, op) in ops.iter().enumerate() {
        let (m, e): (String, String) = match op {
            Op::Grant { ttl } => {
                let g = model.lease_grant(*ttl, 0);
                sim.leases.push(g.id);
                let r = etcd.lease_grant(*ttl).await.map_err(|e| e.to_string())?;
                real.leases.push(r.id);
                granted.push(r.id);
                (format!("ttl {}", g.ttl), format!("ttl {}", r.ttl))
            }
            Op::Revoke { lease } => {
                // etcd answers a revoke without its events: compare the outcomes.
                let m = match model.lease_revoke(sim.lease_or_missing(*lease)) {
                    Ok(_) => "ok".to_string(),
                    Err(e) => norm_err(&e),
                };
                let e = match etcd.lease_revoke(real.lease_or_missing(*lease)).await {
                    Ok(()) => "ok".to_string(),
                    Err(e) => norm_err(&e),
                };
                (m, e)
            }
            Op::KeepAlive { lease } => {
                let m = model.lease_keep_alive(sim.lease_or_missing(*lease), 0) > 0;
                let e = etcd
                    .lease_keep_alive(real.lease_or_missing(*lease))
                    .await
                    .map_err(|e| e.to_string())?
                    > 0;
                (format!("alive {m}"), format!("alive {e}"))
            }
            Op::Txn(spec) => {
                let m = match model.txn(&sim.txn(spec)) {
                    Ok((t, _)) => sim.norm_txn(&t),
                    Err(e) => norm_err(&e),
                };
                let e = match etcd.txn(real.txn(spec)).await {
                    Ok(t) => real.norm_txn(&t),
                    Err(e) => norm_err(&e),
                };
                (m, e)
            }
            Op::Get {
                key,
                prefix,
                count_only,
                keys_only,
                limit,
            } => {
                let mk = sim.range_key(*key, *prefix);
                let ek = real.range_key(*key, *prefix);
                let m = model
                    .range(
                        &mk,
                        &sim.get_options(*prefix, *count_only, *keys_only, *limit),
                    )
                    .map_err(|e| e.to_string())?;
                let e = etcd
                    .range(
                        ek,
                        real.get_options(*prefix, *count_only, *keys_only, *limit),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                (sim.norm_get(&m), real.norm_get(&e))
            }
            Op::Put { .. } | Op::Delete { .. } => {
                let spec = TxnSpec {
                    compare: vec![],
                    success: vec![op.clone()],
                    failure: vec![],
                    nested: None,
                };
                let m = match model.txn(&sim.txn(&spec)) {
                    Ok((t, _)) => sim.norm_txn(&t),
                    Err(e) => norm_err(&e),
                };
                let e = match etcd.txn(real.txn(&spec)).await {
                    Ok(t) => real.norm_txn(&t),
                    Err(e) => norm_err(&e),
                };
                (m, e)
            }
            Op::WatchFrom { key, prefix, back } => {
                let from_rel = (model.revision() - sim.base - back).max(1);
                let (mk, mend) = range_of(&sim, *key, *prefix);
                let m = match model.events_since(from_rel + sim.base, &mk, mend.as_deref()) {
                    Ok(ev) => format!("{:?}", sim.norm_events(&ev)),
                    Err(e) => norm_err(&e),
                };
                let e = watch_real(
                    etcd,
                    &real,
                    *key,
                    *prefix,
                    from_rel + real.base,
                    count_of(&m),
                )
                .await?;
                (m, e)
            }
            Op::Compact { back } => {
                let rel = (model.revision() - sim.base - back).max(1);
                let m = match model.compact(rel + sim.base) {
                    Ok(()) => "ok".to_string(),
                    Err(e) => norm_err(&e),
                };
                let e = match etcd.compact(rel + real.base).await {
                    Ok(()) => "ok".to_string(),
                    Err(e) => norm_err(&e),
                };
                (m, e)
            }
        };
        let now = etcd
            .range(b"/".to_vec(), GetOptions::new().with_count_only())
            .await
            .map_err(|e| e.to_string())?;
        let (mr, er) = (model.revision() - sim.base, now.revision - real.base);
        let (m, e) = if m == e && mr != er {
            (
                format!("{m} then revision {mr}"),
                format!("{e} then revision {er}"),
            )
        } else {
            (m, e)
        };
        if m != e {
            return Err(format!(
                "op {i} {op:?}:\n  model: {m}\n  etcd:  {e}\n  after: {:#?}",
                &ops[..i]
            ));
        }
    }
    Ok(())
}

fn range_of(side: &Side, key: usize, prefix: bool) -> (Vec<u8>, Option<Vec<u8>>) {
    let k = side.range_key(key, prefix);
    let end = prefix.then(|| rdzv::etcd::api::prefix_end_bytes(&k));
    (k, end)
}

/// The number of events in a normalised event list (`None`: the model said compacted).
fn count_of(model_answer: &str) -> Option<usize> {
    if model_answer == "compacted" {
        return None;
    }
    Some(model_answer.matches("\"").count() / 2)
}

/// Watches etcd from `from` and collects `expect` events (or the compaction notice).
async fn watch_real(
    etcd: &GrpcEtcd,
    side: &Side,
    key: usize,
    prefix: bool,
    from: i64,
    expect: Option<usize>,
) -> Result<String, String> {
    let (k, end) = range_of(side, key, prefix);
    let mut opts = WatchOptions::new().with_start_revision(from).with_prev_kv();
    if let Some(end) = end {
        opts = opts.with_range(end);
    }
    let (mut stream, _) = etcd.watch(k, opts).await.map_err(|e| e.to_string())?;
    let mut events = Vec::new();
    let want = expect.unwrap_or(0);
    loop {
        // Past events come at once; wait a little longer for none to be missing.
        let wait = if events.len() >= want {
            Duration::from_millis(150)
        } else {
            Duration::from_secs(3)
        };
        match tokio::time::timeout(wait, stream.message()).await {
            Err(_) => break,
            Ok(Ok(Some(msg))) => {
                if msg.compact_revision > 0 {
                    return Ok("compacted".into());
                }
                events.extend(msg.events);
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => return Ok(norm_err(&e)),
        }
    }
    Ok(format!("{:?}", side.norm_events(&events)))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn the_model_answers_as_etcd_does() {
    let rt = runtime();
    let (etcd, server) = rt.block_on(async {
        let server = EtcdServer::start().await.expect("start etcd");
        let client = server.client().await.expect("client");
        (Arc::new(GrpcEtcd::new(vec![client])), server)
    });
    let case = std::sync::atomic::AtomicU64::new(0);
    let cases = std::env::var("RDZV_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 1..24), |ops| {
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        rt.block_on(replay(&etcd, n, &ops))
            .map_err(TestCaseError::fail)
    });
    drop(server);
    if let Err(e) = result {
        panic!("the model and etcd disagree: {e}");
    }
}

/// Watches with previous values, on every way a key goes: overwritten, deleted, deleted by
/// prefix, deleted with its lease. The protocol tells a lost member from a late joiner by a
/// deleted record's previous value, and the random cases above reach a delete watched from
/// before it only now and then.
#[test]
fn deleted_keys_carry_their_previous_values_in_the_model_as_in_etcd() {
    let put = |key, value, lease| Op::Put {
        key,
        value,
        lease,
        prev: false,
    };
    let watch = |key, prefix| Op::WatchFrom {
        key,
        prefix,
        back: 64,
    };
    let ops = vec![
        Op::Grant { ttl: 60 },
        put(0, 1, None),
        put(0, 2, Some(0)),
        put(3, 1, None),
        put(4, 2, Some(0)),
        put(1, 3, Some(0)),
        Op::Delete {
            key: 0,
            prefix: false,
            prev: false,
        },
        Op::Delete {
            key: 3,
            prefix: true,
            prev: false,
        },
        put(5, 1, Some(0)),
        Op::Revoke { lease: 0 },
        watch(0, false),
        watch(1, false),
        watch(3, true),
    ];
    let rt = runtime();
    rt.block_on(async {
        let server = EtcdServer::start().await.expect("start etcd");
        let etcd = GrpcEtcd::new(vec![server.client().await.expect("client")]);
        if let Err(e) = replay(&etcd, 0, &ops).await {
            panic!("the model and etcd disagree: {e}");
        }
    });
}

/// Sizes: a transaction over etcd's `--max-txn-ops` (128 by default) is refused by both.
#[test]
fn too_many_operations_are_refused_by_both() {
    let rt = runtime();
    rt.block_on(async {
        let server = EtcdServer::start().await.expect("start etcd");
        let etcd = GrpcEtcd::new(vec![server.client().await.unwrap()]);
        let txn = Txn::new().and_then((0..129).map(|i| TxnOp::put(format!("/big/{i}"), "v", None)));
        let mut model = Model::default();
        let m = model.txn(&txn).map(|_| ()).map_err(|e| norm_err(&e));
        let e = etcd.txn(txn).await.map(|_| ()).map_err(|e| norm_err(&e));
        assert_eq!(m, e);
        assert_eq!(m, Err("too many operations".into()));
    });
}

/// Lease expiry on etcd's clock and on the model's: a lease kept alive keeps its keys, one
/// left alone loses them after its TTL.
#[test]
fn leases_expire_in_the_model_as_in_etcd() {
    let rt = runtime();
    rt.block_on(async {
        let server = EtcdServer::start().await.expect("start etcd");
        let etcd = GrpcEtcd::new(vec![server.client().await.unwrap()]);
        let mut model = Model::new(Limits {
            max_txn_ops: 128,
            min_lease_ttl: 1,
        });
        let started = tokio::time::Instant::now();
        let now = || started.elapsed().as_millis() as u64;
        let mut leases = BTreeMap::new();
        for name in ["kept", "left"] {
            let r = etcd.lease_grant(2).await.unwrap();
            let m = model.lease_grant(2, now());
            leases.insert(name, (r.id, m.id));
            let key = format!("/lease/{name}");
            etcd.txn(Txn::new().and_then([TxnOp::put(
                key.clone(),
                "v",
                Some(PutOptions::new().with_lease(r.id)),
            )]))
            .await
            .unwrap();
            model
                .txn(&Txn::new().and_then([TxnOp::put(
                    key,
                    "v",
                    Some(PutOptions::new().with_lease(m.id)),
                )]))
                .unwrap();
        }
        let (kept_real, kept_model) = leases["kept"];
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(etcd.lease_keep_alive(kept_real).await.unwrap() > 0);
            assert!(model.lease_keep_alive(kept_model, now()) > 0);
            model.expire(now());
        }
        for (name, present) in [("kept", true), ("left", false)] {
            let key = format!("/lease/{name}").into_bytes();
            let r = etcd.range(key.clone(), GetOptions::new()).await.unwrap();
            let m = model.range(&key, &GetOptions::new()).unwrap();
            assert_eq!(r.kvs.is_empty(), !present, "etcd: {name}");
            assert_eq!(m.kvs.is_empty(), !present, "model: {name}");
        }
        let (left_real, left_model) = leases["left"];
        assert_eq!(etcd.lease_time_to_live(left_real).await.unwrap(), None);
        assert_eq!(model.lease_time_to_live(left_model, now()), None);
        assert_eq!(etcd.lease_keep_alive(left_real).await.unwrap(), 0);
        assert_eq!(model.lease_keep_alive(left_model, now()), 0);
    });
}
