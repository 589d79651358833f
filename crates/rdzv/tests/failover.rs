//! Failover across the members of a three-member etcd cluster: where a quorum remains, a member
//! that is killed, hung (SIGSTOP) or a black hole costs the job no membership and no restart,
//! and connecting tries every endpoint (and retries etcd's transient errors) within
//! `connect_timeout`.
//!
//! Every scenario puts the faulty member *first* in the endpoint list, where every node starts.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rdzv::etcd::{EtcdCluster, EtcdRendezvousHandler};
use rdzv::{MembershipEvent, RendezvousHandler};
use tokio::sync::broadcast;

/// The lease TTL of these tests (`common::params`).
const TTL: Duration = Duration::from_secs(3);

async fn cluster() -> EtcdCluster {
    init_logging();
    EtcdCluster::start()
        .await
        .expect("three-member etcd cluster")
}

/// The cluster's endpoints with member `first` first.
fn endpoints_from(cluster: &EtcdCluster, first: usize) -> String {
    let mut list = vec![cluster.member_endpoint(first).expect("member")];
    for i in 0..cluster.member_count() {
        if i != first {
            list.push(cluster.member_endpoint(i).expect("member"));
        }
    }
    list.join(",")
}

/// Asserts that no handler reports a lost peer or a lost membership for `quiet`.
async fn assert_no_membership_change(
    receivers: &mut [broadcast::Receiver<MembershipEvent>],
    quiet: Duration,
    fault: &str,
) {
    let deadline = tokio::time::Instant::now() + quiet;
    for (i, rx) in receivers.iter_mut().enumerate() {
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => break,
                Ok(Ok(
                    e @ (MembershipEvent::PeerLost { .. } | MembershipEvent::MembershipLost { .. }),
                )) => panic!("node {i} saw {e:?} while {fault}: the job would restart"),
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                Ok(Err(broadcast::error::RecvError::Closed)) => break,
            }
        }
    }
}

/// Three nodes complete round 1 on `endpoints`; `fault` is applied; for three TTLs nobody
/// loses a peer or its membership; the three complete round 2 with the same ranks while the
/// fault lasts; `heal` undoes it.
async fn job_keeps_its_round_through(
    cluster: &mut EtcdCluster,
    endpoints: &str,
    what: &str,
    fault: impl FnOnce(&mut EtcdCluster),
    heal: impl FnOnce(&mut EtcdCluster),
) {
    let p = params(endpoints, &run_id(), 3, 3);
    let hs: Vec<Arc<EtcdRendezvousHandler>> =
        vec![handler(&p).await, handler(&p).await, handler(&p).await];
    let first = bounded(Duration::from_secs(30), "round 1", rendezvous_all(&hs)).await;
    assert!(first.iter().all(|&(_, w, r)| w == 3 && r == 1), "{first:?}");
    let mut receivers: Vec<_> = hs.iter().map(|h| h.subscribe().expect("events")).collect();
    fault(cluster);
    assert_no_membership_change(&mut receivers, 3 * TTL, what).await;
    let second = bounded(
        Duration::from_secs(60),
        &format!("round 2 while {what}"),
        rendezvous_all(&hs),
    )
    .await;
    heal(cluster);
    assert!(
        second.iter().all(|&(_, w, r)| w == 3 && r == 2),
        "{second:?}"
    );
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(a.0, b.0, "ranks are sticky across rounds");
    }
    for h in &hs {
        let _ = h.shutdown().await;
    }
}

/// Regression (issue 10): with the first listed member hung, renewals waited on its stream
/// until the lease was about to expire, and the whole job restarted although two members were
/// healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_member_first_in_the_list_costs_no_membership() {
    let mut cluster = cluster().await;
    let endpoints = endpoints_from(&cluster, 0);
    job_keeps_its_round_through(
        &mut cluster,
        &endpoints,
        "member m0 is hung (SIGSTOP)",
        |c| c.stop_member(0).expect("SIGSTOP m0"),
        |c| c.cont_member(0).expect("SIGCONT m0"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_leader_first_in_the_list_costs_no_membership() {
    let mut cluster = cluster().await;
    let leader = cluster.leader().await.expect("leader");
    let endpoints = endpoints_from(&cluster, leader);
    job_keeps_its_round_through(
        &mut cluster,
        &endpoints,
        "the leader is hung (SIGSTOP)",
        |c| c.stop_member(leader).expect("SIGSTOP the leader"),
        |c| c.cont_member(leader).expect("SIGCONT the leader"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_first_in_the_list_costs_no_membership() {
    let mut cluster = cluster().await;
    let leader = cluster.leader().await.expect("leader");
    let follower = (leader + 1) % cluster.member_count();
    let endpoints = endpoints_from(&cluster, follower);
    job_keeps_its_round_through(
        &mut cluster,
        &endpoints,
        "a follower is killed",
        |c| c.kill_member(follower).expect("SIGKILL a follower"),
        |_| {},
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_first_in_the_list_costs_no_membership() {
    let mut cluster = cluster().await;
    let leader = cluster.leader().await.expect("leader");
    let endpoints = endpoints_from(&cluster, leader);
    job_keeps_its_round_through(
        &mut cluster,
        &endpoints,
        "the leader is killed",
        |c| c.kill_member(leader).expect("SIGKILL the leader"),
        |_| {},
    )
    .await;
}

/// A TCP port that accepts connections (the kernel's backlog) but never answers: a black hole.
fn black_hole() -> (std::net::TcpListener, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a black hole");
    let addr = listener.local_addr().expect("address").to_string();
    (listener, addr)
}

/// Regression (issue 10): `--rdzv-endpoint <blackhole>,<healthy>` failed after 5 s: the
/// connect probe waited on the first endpoint only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_hole_first_in_the_list_is_skipped_at_connect_and_after() {
    let cluster = cluster().await;
    let (_hole, hole) = black_hole();
    let endpoints = format!("{hole},{}", cluster.endpoints());
    let p = params(&endpoints, &run_id(), 2, 2).with_config("connect_timeout", "5");
    let started = Instant::now();
    let a = Arc::new(
        bounded(
            Duration::from_secs(10),
            "connect",
            EtcdRendezvousHandler::connect(&p),
        )
        .await
        .expect("connect past a black hole"),
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "connect waited {:?} on the black hole",
        started.elapsed()
    );
    let b = handler(&p).await;
    let infos = bounded(
        Duration::from_secs(30),
        "a round past a black hole",
        rendezvous_all(&[a.clone(), b.clone()]),
    )
    .await;
    assert_permutation(infos.iter().map(|i| i.0).collect(), 2);
    let mut receivers = vec![a.subscribe().unwrap(), b.subscribe().unwrap()];
    assert_no_membership_change(&mut receivers, 2 * TTL, "a black hole is listed first").await;
}

/// Regression (issue 10): connecting right after the leader was killed failed at once on
/// etcd's transient `leader changed` instead of retrying within `connect_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_right_after_the_leader_died_retries_until_a_new_one_is_elected() {
    let mut cluster = cluster().await;
    let leader = cluster.leader().await.expect("leader");
    let endpoints = endpoints_from(&cluster, leader);
    cluster.kill_member(leader).expect("SIGKILL the leader");
    let p = params(&endpoints, &run_id(), 1, 1).with_config("connect_timeout", "10");
    let h = bounded(
        Duration::from_secs(20),
        "connect",
        EtcdRendezvousHandler::connect(&p),
    )
    .await
    .expect("connect while a new leader is elected");
    let info = bounded(Duration::from_secs(30), "a round", h.next_rendezvous())
        .await
        .expect("rendezvous after the election");
    assert_eq!((info.rank, info.world_size), (0, 1));
}

/// A member that dies while the member every node watches through is hung is still noticed:
/// a watch stream that stays silent and does not answer a progress request is re-opened on
/// another member. Regression (issue 10): streams that do not answer within their timeout
/// must move to the next member too, not only requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_dies_while_the_watched_member_is_hung_is_noticed() {
    let mut cluster = cluster().await;
    let leader = cluster.leader().await.expect("leader");
    let hung = (leader + 1) % cluster.member_count();
    let endpoints = endpoints_from(&cluster, hung);
    let p = params(&endpoints, &run_id(), 2, 3).with_config("request_timeout", "2");
    let hs = vec![handler(&p).await, handler(&p).await, handler(&p).await];
    let first = bounded(Duration::from_secs(30), "round 1", rendezvous_all(&hs)).await;
    assert!(first.iter().all(|&(_, w, _)| w == 3), "{first:?}");
    let mut receivers: Vec<_> = hs[..2]
        .iter()
        .map(|h| h.subscribe().expect("events"))
        .collect();
    cluster
        .stop_member(hung)
        .expect("SIGSTOP the watched member");
    let victim = hs[2].node_id().to_string();
    let mut hs = hs;
    // A crash: no goodbye, its lease expires after the TTL.
    drop(hs.pop());
    // TTL, then two request timeouts of silence before the progress probe, one for its
    // answer, and slack for a loaded machine.
    let limit = TTL + 3 * Duration::from_secs(2) + Duration::from_secs(5);
    for (i, rx) in receivers.iter_mut().enumerate() {
        let e = wait_event(
            rx,
            limit,
            &format!("node {i} noticing the dead peer"),
            |e| matches!(e, MembershipEvent::PeerLost { .. }),
        )
        .await;
        assert!(
            matches!(&e, MembershipEvent::PeerLost { node_id, .. } if *node_id == victim),
            "{e:?}"
        );
    }
    let second = bounded(
        Duration::from_secs(60),
        "round 2 of the survivors",
        rendezvous_all(&hs),
    )
    .await;
    cluster.cont_member(hung).expect("SIGCONT");
    assert!(second.iter().all(|&(_, w, _)| w == 2), "{second:?}");
}
