//! The etcd rendezvous against a real etcd: rounds of many participants, last call, waiting
//! nodes, sticky ranks, liveness, closing, timeouts, isolation and corrupt data.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rdzv::etcd::EtcdRendezvousHandler;
use rdzv::{MembershipEvent, RendezvousError, RendezvousHandler};

const LIMIT: Duration = Duration::from_secs(30);

async fn full_round(n: usize) {
    let etcd = etcd().await;
    let run = run_id();
    let p = params(&etcd.endpoint(), &run, n, n);
    let mut handlers = Vec::new();
    for _ in 0..n {
        handlers.push(handler(&p).await);
    }
    let results = bounded(LIMIT, "a full round", rendezvous_all(&handlers)).await;
    assert!(
        results.iter().all(|&(_, w, r)| w == n && r == 1),
        "{results:?}"
    );
    assert_permutation(results.iter().map(|r| r.0).collect(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_participant_gets_rank_zero() {
    full_round(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_participants() {
    full_round(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_participants() {
    full_round(8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_participants() {
    full_round(64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_costs_a_few_requests_per_node() {
    let etcd = etcd().await;
    let run = run_id();
    let n = 16;
    let p = params(&etcd.endpoint(), &run, n, n);
    let mut handlers = Vec::new();
    for _ in 0..n {
        handlers.push(handler(&p).await);
    }
    let before: Vec<_> = handlers
        .iter()
        .map(|h| h.client().stats().snapshot())
        .collect();
    rendezvous_all(&handlers).await;
    let (mut requests, mut events) = (0, 0);
    for (h, b) in handlers.iter().zip(&before) {
        let used = h.client().stats().snapshot().since(b);
        requests += used.requests;
        events += used.watch_events;
    }
    // join, watch, read rank, watch membership = 4 per node; plus a constant for the
    // last-call marker and the finaliser's read and write.
    assert!(
        requests <= 4 * n as u64 + 4,
        "{requests} requests for {n} nodes"
    );
    assert!(
        events <= 3 * n as u64,
        "{events} watch events for {n} nodes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_call_includes_late_joiner_then_a_later_one_waits_and_is_admitted_next_round() {
    let etcd = etcd().await;
    let run = run_id();
    let p = params(&etcd.endpoint(), &run, 2, 4).with_config("last_call_timeout", "3");
    let (a, b, c, d) = (
        handler(&p).await,
        handler(&p).await,
        handler(&p).await,
        handler(&p).await,
    );
    let ta = tokio::spawn({
        let a = a.clone();
        async move { a.next_rendezvous().await }
    });
    let tb = tokio::spawn({
        let b = b.clone();
        async move { b.next_rendezvous().await }
    });
    // c joins inside the 3 s window opened by the second join.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tc = tokio::spawn({
        let c = c.clone();
        async move { c.next_rendezvous().await }
    });
    let mut infos = Vec::new();
    for t in [ta, tb, tc] {
        infos.push(
            bounded(LIMIT, "last-call round", t)
                .await
                .unwrap()
                .expect("round"),
        );
    }
    assert!(infos.iter().all(|i| i.world_size == 3 && i.round == 1));
    assert_permutation(infos.iter().map(|i| i.rank).collect(), 3);
    let old_ranks = [infos[0].rank, infos[1].rank, infos[2].rank];

    // d arrives after completion: it waits, and the members are told.
    let mut ev = a.subscribe().unwrap();
    let td = tokio::spawn({
        let d = d.clone();
        async move { d.next_rendezvous().await }
    });
    wait_event(&mut ev, LIMIT, "NodesWaiting", |e| {
        matches!(e, MembershipEvent::NodesWaiting { waiting: 1, .. })
    })
    .await;
    assert_eq!(a.num_nodes_waiting().await.unwrap(), 1);
    assert!(!td.is_finished(), "the late node must wait for the members");

    // The members re-rendezvous: the new round has all four; survivors keep their ranks.
    let next = bounded(
        LIMIT,
        "round 2",
        rendezvous_all(&[a.clone(), b.clone(), c.clone()]),
    )
    .await;
    let info_d = bounded(LIMIT, "late node's round", td)
        .await
        .unwrap()
        .expect("late node admitted");
    assert_eq!(info_d.round, 2);
    assert_eq!(info_d.world_size, 4);
    for (i, (rank, world, round)) in next.iter().enumerate() {
        assert_eq!((*world, *round), (4, 2));
        assert_eq!(*rank, old_ranks[i], "a survivor's rank must be sticky");
    }
    assert_eq!(info_d.rank, 3, "the newcomer fills the free rank");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_beyond_max_wait_for_the_next_round() {
    let etcd = etcd().await;
    let run = run_id();
    let p = params(&etcd.endpoint(), &run, 3, 3);
    let mut hs = Vec::new();
    for _ in 0..5 {
        hs.push(handler(&p).await);
    }
    let tasks: Vec<_> = hs
        .iter()
        .cloned()
        .map(|h| tokio::spawn(async move { h.next_rendezvous().await }))
        .collect();
    // Exactly three complete round 1; two keep waiting.
    let mut done = Vec::new();
    let mut pending = Vec::new();
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(5), t).await {
            Ok(r) => done.push(r.unwrap().expect("round")),
            Err(_) => pending.push(()),
        }
    }
    assert_eq!(done.len(), 3, "max_nodes members complete");
    assert!(done.iter().all(|i| i.round == 1 && i.world_size == 3));
    assert_permutation(done.iter().map(|i| i.rank).collect(), 3);
}

/// Issue 13: with the peer probe, a member whose process is gone (its handler dropped without
/// leaving: its probe connections close) is reported at once by the member watching it,
/// long before its 60 s lease would expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_is_reported_at_once_by_its_peer_probe() {
    let etcd = etcd().await;
    let run = run_id();
    let p = params(&etcd.endpoint(), &run, 2, 2).with_config("keep_alive_ttl", "60");
    let (a, b) = (handler(&p).await, handler(&p).await);
    assert!(a.probe_addr().is_some() && b.probe_addr().is_some());
    rendezvous_all(&[a.clone(), b.clone()]).await;
    let mut ev = a.subscribe().unwrap();
    let b_id = b.node_id().to_string();
    // A peer that dies before its watcher has connected is left to its lease: wait until
    // `a` watches `b`.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.probe_watchers() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "nobody watches b's process 10 s after the round"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(b);
    let lost = wait_event(
        &mut ev,
        Duration::from_secs(10),
        "PeerLost from the peer probe (the lease TTL is 60 s)",
        |e| matches!(e, MembershipEvent::PeerLost { .. }),
    )
    .await;
    assert_eq!(
        lost,
        MembershipEvent::PeerLost {
            round: 1,
            node_id: b_id
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_is_reported_within_its_lease_ttl() {
    let etcd = etcd().await;
    let run = run_id();
    // Without the peer probe: the lease alone (a frozen process, a lost host).
    let p = params(&etcd.endpoint(), &run, 2, 2)
        .with_config("keep_alive_ttl", "2")
        .with_config("peer_probe", "false");
    let (a, b) = (handler(&p).await, handler(&p).await);
    rendezvous_all(&[a.clone(), b.clone()]).await;
    let mut ev = a.subscribe().unwrap();
    let b_id = b.node_id().to_string();
    // Simulate a crash: b's keep-alive stops and it never says goodbye.
    drop(b);
    let started = std::time::Instant::now();
    let lost = wait_event(
        &mut ev,
        Duration::from_secs(2 + 4),
        "PeerLost after lease expiry",
        |e| matches!(e, MembershipEvent::PeerLost { .. }),
    )
    .await;
    assert_eq!(
        lost,
        MembershipEvent::PeerLost {
            round: 1,
            node_id: b_id
        }
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "expiry cannot be instant"
    );
    assert!(
        !a.is_closed().await.unwrap(),
        "a lost peer does not close the run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_notifies_peers_at_once_and_keeps_the_run_open() {
    let etcd = etcd().await;
    let run = run_id();
    // A long TTL: only the graceful path can notify within the bound below.
    let p = params(&etcd.endpoint(), &run, 2, 2).with_config("keep_alive_ttl", "30");
    let (a, b) = (handler(&p).await, handler(&p).await);
    rendezvous_all(&[a.clone(), b.clone()]).await;
    let mut ev = a.subscribe().unwrap();
    assert!(b.shutdown().await.unwrap());
    wait_event(
        &mut ev,
        Duration::from_secs(3),
        "PeerLeft after graceful leave",
        |e| matches!(e, MembershipEvent::PeerLeft { node_id, .. } if node_id == b.node_id()),
    )
    .await;
    assert!(
        !a.is_closed().await.unwrap(),
        "shutdown must not close the run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_fails_pending_and_later_rendezvous() {
    let etcd = etcd().await;
    let run = run_id();
    let p = params(&etcd.endpoint(), &run, 2, 2);
    let (a, b) = (handler(&p).await, handler(&p).await);
    assert!(!a.is_closed().await.unwrap());
    let pending = tokio::spawn({
        let a = a.clone();
        async move { a.next_rendezvous().await }
    });
    // Let a join before closing, so that the pending path is the one tested.
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.set_closed().await.unwrap();
    let err = bounded(LIMIT, "pending call to fail", pending)
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, RendezvousError::Closed { .. }), "{err}");
    assert!(a.is_closed().await.unwrap());
    let err = b.next_rendezvous().await.unwrap_err();
    assert!(err.is_closed(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_learn_that_the_run_was_closed() {
    let etcd = etcd().await;
    let run = run_id();
    let p = params(&etcd.endpoint(), &run, 2, 2);
    let (a, b) = (handler(&p).await, handler(&p).await);
    rendezvous_all(&[a.clone(), b.clone()]).await;
    let mut ev = a.subscribe().unwrap();
    b.set_closed().await.unwrap();
    wait_event(&mut ev, Duration::from_secs(5), "Closed event", |e| {
        *e == MembershipEvent::Closed
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_node_times_out_and_leaves_the_round() {
    let etcd = etcd().await;
    let run = run_id();
    let p = params(&etcd.endpoint(), &run, 2, 2).with_config("timeout", "1");
    let a = handler(&p).await;
    let started = std::time::Instant::now();
    let err = bounded(LIMIT, "timeout", a.next_rendezvous())
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    let left = a
        .client()
        .get(
            a.keys().member_prefix(1),
            Some(
                rdzv::etcd::api::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        left.count(),
        0,
        "a timed-out node must not stay in the round"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runs_on_one_etcd_do_not_see_each_other() {
    let etcd = etcd().await;
    let (r1, r2) = (run_id(), run_id());
    let p1 = params(&etcd.endpoint(), &r1, 2, 2);
    let p2 = params(&etcd.endpoint(), &r2, 2, 2);
    let hs = vec![
        handler(&p1).await,
        handler(&p2).await,
        handler(&p1).await,
        handler(&p2).await,
    ];
    let results = bounded(LIMIT, "two runs", rendezvous_all(&hs)).await;
    assert!(
        results.iter().all(|&(_, w, r)| w == 2 && r == 1),
        "{results:?}"
    );
    assert_permutation(vec![results[0].0, results[2].0], 2);
    assert_permutation(vec![results[1].0, results[3].0], 2);
    hs[0].set_closed().await.unwrap();
    assert!(hs[2].is_closed().await.unwrap());
    assert!(
        !hs[1].is_closed().await.unwrap(),
        "closing one run leaves the other open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finaliser_killed_mid_round_another_takes_over() {
    let etcd = etcd().await;
    let run = run_id();
    // min 2, max 4: the second join arms a 3 s last call and its writer should finalise.
    let p = params(&etcd.endpoint(), &run, 2, 4)
        .with_config("last_call_timeout", "3")
        .with_config("keep_alive_ttl", "2");
    let (a, b, c) = (handler(&p).await, handler(&p).await, handler(&p).await);
    let ta = tokio::spawn({
        let a = a.clone();
        async move { a.next_rendezvous().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tb = tokio::spawn({
        let b = b.clone();
        async move { b.next_rendezvous().await }
    });
    // Wait until the last call is armed, and check that b wrote it.
    let lastcall_key = a.keys().lastcall(1);
    bounded(LIMIT, "last call", async {
        loop {
            let r = a.client().get(lastcall_key.clone(), None).await.unwrap();
            if let Some(kv) = r.kvs().first() {
                let v: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
                assert_eq!(
                    v["writer"],
                    b.node_id(),
                    "the second joiner arms the last call"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Kill the finaliser: its task and its keep-alive stop without a word.
    tb.abort();
    drop(b);
    let tc = tokio::spawn({
        let c = c.clone();
        async move { c.next_rendezvous().await }
    });
    let ia = bounded(LIMIT, "a's round", ta)
        .await
        .unwrap()
        .expect("a completes");
    let ic = bounded(LIMIT, "c's round", tc)
        .await
        .unwrap()
        .expect("c completes");
    assert_eq!(ia.round, ic.round);
    assert_eq!(ia.world_size, ic.world_size);
    assert_permutation(vec![ia.rank, ic.rank], 2);
    assert_eq!(
        ia.world_size, 2,
        "the dead finaliser's lease expired before the backup finalised"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_data_under_the_prefix_is_a_state_error_naming_the_key() {
    let etcd = etcd().await;
    let run = run_id();
    let p = params(&etcd.endpoint(), &run, 1, 1);
    let a = handler(&p).await;
    let key = a.keys().lastcall(1);
    a.client()
        .put(key.clone(), "{not json", None)
        .await
        .unwrap();
    let err = bounded(LIMIT, "state error", a.next_rendezvous())
        .await
        .unwrap_err();
    match err {
        RendezvousError::State(msg) => assert!(msg.contains(&key), "{msg}"),
        other => panic!("expected a state error, got {other}"),
    }
    // Nothing of ours was overwritten: the foreign value is still there.
    let r = a.client().get(key, None).await.unwrap();
    assert_eq!(r.kvs()[0].value(), b"{not json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_round_ranks_follow_node_rank_hints() {
    let etcd = etcd().await;
    let run = run_id();
    let p = params(&etcd.endpoint(), &run, 3, 3);
    let mut hs = Vec::new();
    for hint in [2, 0, 1] {
        hs.push(handler(&p.clone().with_config("node_rank", hint.to_string())).await);
    }
    let results = rendezvous_all(&hs).await;
    assert_eq!(
        results.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![2, 0, 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_can_be_listed_in_rank_order() {
    let etcd = etcd().await;
    let run = run_id();
    let p = params(&etcd.endpoint(), &run, 2, 2).with_local_addr("10.1.2.3");
    let (a, b) = (handler(&p).await, handler(&p).await);
    let results = rendezvous_all(&[a.clone(), b.clone()]).await;
    let members = a.members(1).await.unwrap();
    assert_eq!(members.len(), 2);
    let rank0 = if results[0].0 == 0 {
        a.node_id()
    } else {
        b.node_id()
    };
    assert_eq!(members[0].node_id, rank0);
    assert_eq!(members[0].addrs, vec!["10.1.2.3".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_registry() {
    let etcd = etcd().await;
    let p = params(&etcd.endpoint(), &run_id(), 1, 1);
    let h: Arc<dyn RendezvousHandler> = rdzv::create_handler(p).await.unwrap();
    assert_eq!(h.backend(), "etcd");
    let info = h.next_rendezvous().await.unwrap();
    assert_eq!((info.rank, info.world_size, info.round), (0, 1, 1));
    let again = h.next_rendezvous().await.unwrap();
    assert_eq!(again.round, 2, "each call is a new round");
    assert!(h.shutdown().await.unwrap());
    let _unused: Option<EtcdRendezvousHandler> = None;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_rank_tables_are_written_in_chunks_within_etcds_txn_limit() {
    // etcd limited to 16 operations per transaction: 40 assignments need several chunks.
    let etcd = rdzv::etcd::EtcdServer::start_with(rdzv::etcd::EtcdServerOptions {
        extra_args: vec!["--max-txn-ops=16".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let n = 40;
    let p = params(&etcd.endpoint(), &run_id(), n, n).with_config("max_txn_ops", "16");
    let mut hs = Vec::new();
    for _ in 0..n {
        hs.push(handler(&p).await);
    }
    let results = bounded(LIMIT, "chunked round", rendezvous_all(&hs)).await;
    assert!(results.iter().all(|&(_, w, r)| w == n && r == 1));
    assert_permutation(results.iter().map(|r| r.0).collect(), n);
    // The claim is gone once the round is final.
    let claim = hs[0]
        .client()
        .get(hs[0].keys().claim(1), None)
        .await
        .unwrap();
    assert!(
        claim.kvs().is_empty(),
        "the finaliser's claim must be removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_old_rounds_are_removed() {
    let etcd = etcd().await;
    let p = params(&etcd.endpoint(), &run_id(), 1, 1);
    let h = handler(&p).await;
    for expected in 1..=5 {
        let info = h.next_rendezvous().await.unwrap();
        assert_eq!(info.round, expected);
        info.store.set("k", b"v").await.unwrap();
    }
    let count = |prefix: String| {
        let h = h.clone();
        async move {
            h.client()
                .get(
                    prefix,
                    Some(
                        rdzv::etcd::api::GetOptions::new()
                            .with_prefix()
                            .with_count_only(),
                    ),
                )
                .await
                .unwrap()
                .count()
        }
    };
    for old in 1..=3 {
        assert_eq!(
            count(h.keys().round_prefix(old)).await,
            0,
            "round {old} keys remain"
        );
        assert_eq!(
            count(h.keys().assign_prefix(old)).await,
            0,
            "round {old} ranks remain"
        );
        assert_eq!(
            count(h.keys().kv_prefix(old)).await,
            0,
            "round {old} store remains"
        );
    }
    assert!(
        count(h.keys().round_prefix(5)).await > 0,
        "the last round is kept"
    );
    assert_eq!(
        count(h.keys().kv_prefix(4)).await,
        1,
        "the previous round's store is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_waits_for_the_members_instead_of_starting_a_round_alone() {
    let etcd = etcd().await;
    let p = params(&etcd.endpoint(), &run_id(), 1, 3);
    let (a, b) = (handler(&p).await, handler(&p).await);
    let first = a.next_rendezvous().await.unwrap();
    assert_eq!((first.round, first.world_size), (1, 1));
    let mut ev = a.subscribe().unwrap();
    let tb = tokio::spawn({
        let b = b.clone();
        async move { b.next_rendezvous().await }
    });
    wait_event(&mut ev, LIMIT, "NodesWaiting", |e| {
        matches!(e, MembershipEvent::NodesWaiting { waiting: 1, .. })
    })
    .await;
    // min_nodes is 1 and the last call 1 s, yet b must not complete a round without a.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !tb.is_finished(),
        "the newcomer formed a round while the members were alive"
    );
    let second = bounded(LIMIT, "a re-joins", a.next_rendezvous())
        .await
        .unwrap();
    let ib = bounded(LIMIT, "b's round", tb).await.unwrap().unwrap();
    assert_eq!((second.round, second.world_size), (2, 2));
    assert_eq!((ib.round, ib.world_size), (2, 2));
    assert_eq!(second.rank, 0, "the member keeps its rank");
    assert_eq!(ib.rank, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_starts_a_round_once_the_previous_one_dissolved() {
    let etcd = etcd().await;
    let p = params(&etcd.endpoint(), &run_id(), 1, 3);
    let (a, b) = (handler(&p).await, handler(&p).await);
    a.next_rendezvous().await.unwrap();
    let tb = tokio::spawn({
        let b = b.clone();
        async move { b.next_rendezvous().await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!tb.is_finished());
    a.shutdown().await.unwrap();
    // b notices at its next check (every keep_alive_ttl = 3 s), then the 1 s last call runs.
    let ib = bounded(Duration::from_secs(15), "b alone", tb)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((ib.round, ib.world_size, ib.rank), (2, 1, 0));
}
