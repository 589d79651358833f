//! Regression tests of the protocol's defects on a real etcd (the simulator's scripted
//! scenarios in `crates/rdzv-sim/tests/regressions.rs` test the same defects under more
//! interleavings). Lost answers are injected between the client and the real etcd by
//! [`Lossy`], a client that forwards everything to etcd and drops the answer of chosen
//! transactions after etcd applied them.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use rdzv::etcd::api::{
    ApiError, EtcdApi, GetOptions, GetResponse, GrpcEtcd, LeaseGrant, Txn, TxnOp, TxnResponse,
    WatchOptions, WatchStream,
};
use rdzv::etcd::keys::RunKeys;
use rdzv::etcd::records::{encode, NodeRecord, SCHEMA_VERSION};
use rdzv::etcd::{read_status, EtcdClient, EtcdRendezvousHandler, EtcdServer, RendezvousSettings};
use rdzv::{MembershipEvent, RendezvousError, RendezvousHandler, RendezvousParameters, Store};

const LIMIT: Duration = Duration::from_secs(30);

/// A real etcd client that loses the answer of the next `times` transactions writing a key
/// that ends with `suffix` (etcd applies them).
#[derive(Debug)]
struct Lossy {
    inner: GrpcEtcd,
    suffix: &'static str,
    remaining: AtomicUsize,
    lost: Arc<AtomicUsize>,
}

fn writes(txn: &Txn, suffix: &str) -> bool {
    txn.success.iter().chain(&txn.failure).any(|op| match op {
        TxnOp::Put { key, .. } | TxnOp::Delete { key, .. } => key.ends_with(suffix.as_bytes()),
        TxnOp::Txn(t) => writes(t, suffix),
        TxnOp::Get { .. } => false,
    })
}

#[async_trait]
impl EtcdApi for Lossy {
    async fn range(&self, key: Vec<u8>, options: GetOptions) -> Result<GetResponse, ApiError> {
        self.inner.range(key, options).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, ApiError> {
        let lose = writes(&txn, self.suffix)
            && self
                .remaining
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        let answer = self.inner.txn(txn).await?;
        if lose {
            self.lost.fetch_add(1, Ordering::SeqCst);
            return Err(ApiError::Unavailable("answer lost (injected)".into()));
        }
        Ok(answer)
    }
    async fn lease_grant(&self, ttl: i64) -> Result<LeaseGrant, ApiError> {
        self.inner.lease_grant(ttl).await
    }
    async fn lease_revoke(&self, id: i64) -> Result<(), ApiError> {
        self.inner.lease_revoke(id).await
    }
    async fn lease_keep_alive(&self, id: i64) -> Result<i64, ApiError> {
        self.inner.lease_keep_alive(id).await
    }
    async fn lease_time_to_live(&self, id: i64) -> Result<Option<i64>, ApiError> {
        self.inner.lease_time_to_live(id).await
    }
    async fn watch(
        &self,
        key: Vec<u8>,
        options: WatchOptions,
    ) -> Result<(Box<dyn WatchStream>, i64), ApiError> {
        self.inner.watch(key, options).await
    }
    async fn compact(&self, revision: i64) -> Result<(), ApiError> {
        self.inner.compact(revision).await
    }
}

/// A handler whose client loses the answer of its next `times` transactions writing a key
/// ending with `suffix`; the counter counts the answers lost.
async fn lossy_handler(
    etcd: &EtcdServer,
    p: &RendezvousParameters,
    suffix: &'static str,
    times: usize,
    lost: Arc<AtomicUsize>,
) -> Arc<EtcdRendezvousHandler> {
    let api = Lossy {
        inner: GrpcEtcd::new(vec![etcd.client().await.expect("client")]),
        suffix,
        remaining: AtomicUsize::new(times),
        lost,
    };
    let client = EtcdClient::from_api(Arc::new(api), Arc::default());
    let settings = RendezvousSettings::from_parameters(p).expect("settings");
    Arc::new(
        EtcdRendezvousHandler::with_client(client, p, settings)
            .await
            .expect("handler"),
    )
}

/// Defect 1 (ghost round): after a job's third round, a fresh node joined round 1 again
/// (finalising round 3 had deleted round 1's keys) and got `round 1, rank 0` while the job ran
/// round 3; `current` moved backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ghost_round_a_fresh_node_after_old_rounds_were_dropped_joins_the_current_round() {
    let etcd = etcd().await;
    let id = run_id();
    let p = params(&etcd.endpoint(), &id, 1, 1);
    let first = handler(&p).await;
    for round in 1..=4 {
        let info = bounded(LIMIT, "a round", first.next_rendezvous())
            .await
            .unwrap();
        assert_eq!(info.round, round);
    }
    first.shutdown().await.unwrap();
    let fresh = handler(&p).await;
    let info = bounded(LIMIT, "the fresh node's round", fresh.next_rendezvous())
        .await
        .unwrap();
    assert_eq!(
        (info.round, info.rank, info.world_size),
        (5, 0, 1),
        "a fresh node joins the run's current round"
    );
}

/// Defect 1, second form: with `--nnodes 2:2`, a replacement node and the survivor waited in
/// different rounds until both timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ghost_round_a_replacement_meets_the_survivor_after_three_rounds() {
    let etcd = etcd().await;
    let id = run_id();
    let p = params(&etcd.endpoint(), &id, 2, 2);
    let (a, b) = (handler(&p).await, handler(&p).await);
    for round in 1..=3 {
        let got = bounded(
            LIMIT,
            "a round of two",
            rendezvous_all(&[a.clone(), b.clone()]),
        )
        .await;
        assert!(
            got.iter().all(|(_, w, r)| (*w, *r) == (2, round)),
            "{got:?}"
        );
    }
    b.shutdown().await.unwrap();
    let replacement = handler(&p).await;
    let got = bounded(
        LIMIT,
        "the survivor and the replacement",
        rendezvous_all(&[a.clone(), replacement.clone()]),
    )
    .await;
    assert_eq!(got[0].2, got[1].2, "one round: {got:?}");
    assert!(got[0].2 >= 4, "{got:?}");
    assert_permutation(got.iter().map(|g| g.0).collect(), 2);
}

/// Defect 2 (a spare restarts the job forever): the members were told that a node waits, every
/// round, for a node beyond `max_nodes` that was never admitted. A spare waits without
/// disturbing the members, `rdzv status` shows it as a spare, and it is admitted when a member
/// leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spare_beyond_max_nodes_does_not_disturb_the_members_and_is_admitted_later() {
    let etcd = etcd().await;
    let id = run_id();
    let p = params(&etcd.endpoint(), &id, 1, 2);
    let (a, b) = (handler(&p).await, handler(&p).await);
    let mut events = a.subscribe().unwrap();
    let got = bounded(LIMIT, "round 1", rendezvous_all(&[a.clone(), b.clone()])).await;
    assert!(got.iter().all(|(_, w, r)| (*w, *r) == (2, 1)), "{got:?}");
    let spare = handler(&p).await;
    let waiting = tokio::spawn({
        let spare = spare.clone();
        async move { spare.next_rendezvous().await }
    });
    let keys = RunKeys::new("/rdzv", &id);
    let client = EtcdClient::new(etcd.client().await.unwrap());
    let mut spares = Vec::new();
    for _ in 0..100 {
        spares = read_status(&client, &keys, &id).await.unwrap().spares;
        if !spares.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        spares,
        vec![spare.node_id().to_string()],
        "status shows the spare"
    );
    // Longer than a lease TTL and a last call: the members hear nothing.
    match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
        Err(_) => {}
        Ok(ev) => panic!("the members were disturbed by the spare: {ev:?}"),
    }
    b.shutdown().await.unwrap();
    wait_event(&mut events, LIMIT, "b left", |e| {
        matches!(e, MembershipEvent::PeerLeft { .. })
    })
    .await;
    let info_a = bounded(LIMIT, "a's next round", a.next_rendezvous())
        .await
        .unwrap();
    let info_s = bounded(LIMIT, "the spare's round", waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((info_a.round, info_a.world_size), (2, 2));
    assert_eq!((info_s.round, info_s.world_size), (2, 2));
    assert_eq!(info_a.rank + info_s.rank, 1, "ranks 0 and 1");
}

/// Defect 3 (a lost answer makes a node abandon its round): the finaliser's answer to the
/// final transaction was lost; its retry found the round final and moved on to the next round
/// without reading its rank, leaving its record alive, and its peer waited for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_final_answer_leaves_the_finaliser_in_its_round() {
    let etcd = etcd().await;
    let id = run_id();
    let p = params(&etcd.endpoint(), &id, 2, 2);
    let lost = Arc::new(AtomicUsize::new(0));
    let a = lossy_handler(&etcd, &p, "/ctl/final", 1, lost.clone()).await;
    let b = lossy_handler(&etcd, &p, "/ctl/final", 1, lost.clone()).await;
    let got = bounded(LIMIT, "round 1 of two", rendezvous_all(&[a, b])).await;
    assert_eq!(
        lost.load(Ordering::SeqCst),
        1,
        "the finaliser's answer was lost"
    );
    assert!(got.iter().all(|(_, w, r)| (*w, *r) == (2, 1)), "{got:?}");
    assert_permutation(got.iter().map(|g| g.0).collect(), 2);
}

/// Defect 4 (chunked finalisation deadlocked after one lost answer): every node, the claimer
/// too, refused to finalise while the claim existed, until timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_claim_answer_does_not_block_a_chunked_round() {
    let etcd = etcd().await;
    let id = run_id();
    let n = 12;
    let p = params(&etcd.endpoint(), &id, n, n).with_config("max_txn_ops", "8");
    let lost = Arc::new(AtomicUsize::new(0));
    let mut handlers = Vec::new();
    for _ in 0..n {
        handlers.push(lossy_handler(&etcd, &p, "/ctl/claim", 1, lost.clone()).await);
    }
    let got = bounded(LIMIT, "a chunked round of 12", rendezvous_all(&handlers)).await;
    assert!(
        lost.load(Ordering::SeqCst) >= 1,
        "a claim's answer was lost"
    );
    assert!(got.iter().all(|(_, w, r)| (*w, *r) == (n, 1)), "{got:?}");
    assert_permutation(got.iter().map(|g| g.0).collect(), n);
}

/// Defect 7: a store `add` re-sent after a lost answer was applied twice (the exit barrier
/// could release early).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_add_after_a_lost_answer_adds_once() {
    let etcd = etcd().await;
    let id = run_id();
    let lost = Arc::new(AtomicUsize::new(0));
    let keys = RunKeys::new("/rdzv", &id);
    let lossy = Lossy {
        inner: GrpcEtcd::new(vec![etcd.client().await.unwrap()]),
        suffix: "/count",
        remaining: AtomicUsize::new(1),
        lost: lost.clone(),
    };
    let client = EtcdClient::from_api(Arc::new(lossy), Arc::default());
    let store = rdzv::etcd::EtcdStore::new(client, keys.kv_prefix(1), 0, Duration::from_secs(10))
        .with_op_prefix(keys.op_prefix(1));
    assert_eq!(store.add("count", 1).await.unwrap(), 1);
    assert_eq!(lost.load(Ordering::SeqCst), 1, "the first answer was lost");
    assert_eq!(store.get("count").await.unwrap(), b"1", "added once");
    assert_eq!(store.add("count", 1).await.unwrap(), 2);
}

/// Defect 7: a garbage `ctl/claim` was taken at face value; it is a state error naming the key,
/// and nothing is overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_claim_is_a_state_error_naming_the_key() {
    let etcd = etcd().await;
    let id = run_id();
    let p = params(&etcd.endpoint(), &id, 1, 1);
    let node = handler(&p).await;
    let keys = RunKeys::new("/rdzv", &id);
    let mut raw = etcd.client().await.unwrap();
    raw.put(keys.claim(1), "not a claim", None).await.unwrap();
    let err = bounded(LIMIT, "the error", node.next_rendezvous())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RendezvousError::State(m) if m.contains(&keys.claim(1))),
        "{err}"
    );
    let kept = raw.get(keys.claim(1), None).await.unwrap();
    assert_eq!(kept.kvs()[0].value(), b"not a claim");
}

/// Defect 7: a join record without a lease was taken at face value; it is a state error naming
/// the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_record_without_a_lease_is_a_state_error_naming_the_key() {
    let etcd = etcd().await;
    let id = run_id();
    let p = params(&etcd.endpoint(), &id, 2, 2);
    let node = handler(&p).await;
    let keys = RunKeys::new("/rdzv", &id);
    let forged = NodeRecord {
        v: SCHEMA_VERSION,
        node_id: "forged".into(),
        hostname: "nowhere".into(),
        addrs: vec!["10.0.0.1".into()],
        node_rank: None,
        prev_rank: None,
        local_world_size: None,
        probe: None,
        pid: 1,
        detached: false,
        left: false,
    };
    let mut raw = etcd.client().await.unwrap();
    raw.put(keys.member(1, "forged"), encode(&forged), None)
        .await
        .unwrap();
    // The forged record counts as a join in nobody's transaction, so make the count reach
    // max_nodes with a second real node: the finaliser then reads the records.
    let other = handler(&p).await;
    let (ra, rb) = tokio::join!(
        bounded(LIMIT, "a", node.next_rendezvous()),
        bounded(LIMIT, "b", other.next_rendezvous())
    );
    let errors: Vec<String> = [ra.err(), rb.err()]
        .into_iter()
        .flatten()
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.iter().any(|e| e.contains(&keys.member(1, "forged"))),
        "{errors:?}"
    );
}

/// Bad input (issue 10): foreign data under a run's keys — a garbage `current` (as `etcdctl
/// put /rdzv/<run>/current garbage` writes it), a round number out of range, a garbage
/// `closed` — was treated differently by different paths (`status` reported a state error,
/// `join` went on or reported the run closed; a huge round number overflowed). Every path — a
/// new node, a node of the run joining or closing, the status — now fails with a state error
/// naming the key, and the key is left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_current_or_closed_is_a_state_error_naming_the_key_on_every_path() {
    let etcd = etcd().await;
    let client = EtcdClient::new(etcd.client().await.unwrap());
    let mut raw = etcd.client().await.unwrap();
    let state_error_naming = |err: &RendezvousError, key: &str| matches!(err, RendezvousError::State(m) if m.contains(key));
    type KeyOf = fn(&RunKeys) -> String;
    let cases: [(KeyOf, &str); 6] = [
        (RunKeys::current, "garbage"),
        (RunKeys::current, "0"),
        (RunKeys::current, "-1"),
        (RunKeys::current, "18446744073709551615"),
        (RunKeys::current, "1000000000000"),
        (RunKeys::closed, "garbage"),
    ];
    for (which, value) in cases {
        for existing in [false, true] {
            let id = run_id();
            let keys = RunKeys::new("/rdzv", &id);
            let key = which(&keys);
            let what = format!("{key} = {value:?} in a run that existed: {existing}");
            let p = params(&etcd.endpoint(), &id, 1, 1);
            let node = if existing {
                Some(handler(&p).await)
            } else {
                None
            };
            raw.put(key.as_str(), value, None).await.unwrap();
            // A new node fails when it connects or when it joins.
            let newcomer = match bounded(LIMIT, "connect", EtcdRendezvousHandler::connect(&p)).await
            {
                Ok(h) => bounded(LIMIT, "join", h.next_rendezvous()).await.err(),
                Err(e) => Some(e),
            };
            match newcomer {
                Some(err) => assert!(state_error_naming(&err, &key), "new node, {what}: {err}"),
                None => panic!("a new node completed a round; {what}"),
            }
            if let Some(node) = node {
                let err = bounded(LIMIT, "join", node.next_rendezvous())
                    .await
                    .unwrap_err();
                assert!(state_error_naming(&err, &key), "join, {what}: {err}");
                let err = bounded(LIMIT, "close", node.set_closed())
                    .await
                    .unwrap_err();
                assert!(state_error_naming(&err, &key), "close, {what}: {err}");
            }
            let err = read_status(&client, &keys, &id).await.unwrap_err();
            assert!(state_error_naming(&err, &key), "status, {what}: {err}");
            let kept = raw.get(key.as_str(), None).await.unwrap();
            assert_eq!(
                kept.kvs()[0].value(),
                value.as_bytes(),
                "overwritten; {what}"
            );
        }
    }
}

/// Bad input (issue 10): the status of a run that never existed was an empty status (open
/// round 1, nobody waiting); it is an error saying that the run does not exist, and reading it
/// creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_run_that_never_existed_is_an_error() {
    let etcd = etcd().await;
    let client = EtcdClient::new(etcd.client().await.unwrap());
    let id = run_id();
    let keys = RunKeys::new("/rdzv", &id);
    let err = read_status(&client, &keys, &id).await.unwrap_err();
    assert!(
        matches!(&err, RendezvousError::NoSuchRun { run_id } if *run_id == id),
        "{err}"
    );
    assert!(err.to_string().contains("does not exist"), "{err}");
    let mut raw = etcd.client().await.unwrap();
    let left = raw
        .get(
            keys.run_prefix(),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(left.count(), 0, "reading the status created keys");
    // A run that a node created exists, even before any round completed.
    let p = params(&etcd.endpoint(), &id, 1, 1);
    let _node = handler(&p).await;
    let status = read_status(&client, &keys, &id).await.unwrap();
    assert_eq!(status.open_round, 1);
}

/// Defect (issue 12, c10d): a node leaving after its rendezvous etcd was gone (the c10d host's
/// agent had exited) retried for the whole rendezvous `timeout` (600 s by default): `rdzv run`
/// hung for ten minutes before exiting. Past the node lease's TTL there is nothing left to
/// undo (the lease expires on its own): `shutdown` and `detach` give up after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_after_the_etcd_is_gone_gives_up_after_the_lease_ttl_not_the_timeout() {
    for detach in [false, true] {
        let mut etcd = etcd().await;
        let p = params(&etcd.endpoint(), &run_id(), 1, 1)
            .with_config("timeout", "600")
            .with_config("keep_alive_ttl", "2");
        let node = handler(&p).await;
        bounded(LIMIT, "the round", node.next_rendezvous())
            .await
            .expect("round");
        etcd.stop();
        let started = std::time::Instant::now();
        let left = if detach {
            bounded(LIMIT, "detach with the etcd gone", node.detach()).await
        } else {
            bounded(LIMIT, "shutdown with the etcd gone", node.shutdown())
                .await
                .map(|_| ())
        };
        assert!(
            left.is_err(),
            "detach: {detach}: the etcd is gone: {left:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "detach: {detach}: gave up after {:?}",
            started.elapsed()
        );
    }
}

/// The members of a round of ~16,000 nodes (about 300 bytes each) make a range answer of more
/// than 4 MiB, tonic's default bound on a decoded message: the finaliser's read of the join
/// records failed with "decoded message length too large". etcd's own Go client accepts
/// answers up to 2 GiB; so does ours. Six values of 1 MiB stand in for those records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_answer_larger_than_four_mebibytes_is_read() {
    let etcd = etcd().await;
    let client = EtcdClient::new(etcd.client().await.expect("client"));
    let value = vec![b'x'; 1 << 20];
    for i in 0..6 {
        bounded(
            LIMIT,
            "put",
            client.put(format!("big/{i}"), value.clone(), None),
        )
        .await
        .expect("put 1 MiB");
    }
    let resp = bounded(
        LIMIT,
        "range",
        client.get("big/", Some(GetOptions::new().with_prefix())),
    )
    .await
    .expect("a 6 MiB range answer");
    assert_eq!(resp.kvs().len(), 6);
    let txn = Txn::new().and_then([TxnOp::get("big/", Some(GetOptions::new().with_prefix()))]);
    let resp = bounded(LIMIT, "txn", client.txn(txn))
        .await
        .expect("a 6 MiB transaction answer");
    assert_eq!(resp.get(0).map(|g| g.kvs().len()), Some(6));
}
