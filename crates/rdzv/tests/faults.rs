//! Faults of etcd itself: a paused server (SIGSTOP) shorter than the lease TTL costs no
//! membership; a killed member of a three-member cluster does not stop the rendezvous.

mod common;

use std::time::Duration;

use common::*;
use rdzv::etcd::EtcdCluster;
use rdzv::MembershipEvent;
use rdzv::RendezvousHandler;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_etcd_pause_costs_no_membership() {
    let etcd = etcd().await;
    let p = params(&etcd.endpoint(), &run_id(), 2, 2).with_config("keep_alive_ttl", "5");
    let (a, b) = (handler(&p).await, handler(&p).await);
    rendezvous_all(&[a.clone(), b.clone()]).await;
    let mut ev = a.subscribe().unwrap();
    let pid = etcd.pid() as i32;
    // SAFETY: signalling our own etcd child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    tokio::time::sleep(Duration::from_secs(2)).await;
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    // Longer than the TTL: had a keep-alive been lost, the lease would now be gone.
    let quiet = tokio::time::timeout(Duration::from_secs(7), async {
        loop {
            match ev.recv().await {
                Ok(
                    e @ (MembershipEvent::PeerLost { .. } | MembershipEvent::MembershipLost { .. }),
                ) => return e,
                _ => continue,
            }
        }
    })
    .await;
    assert!(
        quiet.is_err(),
        "membership lost after a 2 s pause with a 5 s TTL: {quiet:?}"
    );
    // And the members can go on to a next round.
    let next = bounded(
        Duration::from_secs(20),
        "next round",
        rendezvous_all(&[a, b]),
    )
    .await;
    assert!(next.iter().all(|&(_, w, r)| w == 2 && r == 2), "{next:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendezvous_survives_a_killed_cluster_member() {
    let mut cluster = EtcdCluster::start()
        .await
        .expect("three-member etcd cluster");
    let endpoints = cluster.endpoints();
    let p = params(&endpoints, &run_id(), 3, 3);
    let hs = vec![handler(&p).await, handler(&p).await, handler(&p).await];
    let first = bounded(Duration::from_secs(30), "round 1", rendezvous_all(&hs)).await;
    assert!(first.iter().all(|&(_, w, r)| w == 3 && r == 1));
    let leader = cluster.leader().await.unwrap();
    cluster.kill_member(leader).unwrap();
    let second = bounded(
        Duration::from_secs(60),
        "round 2 after the leader died",
        rendezvous_all(&hs),
    )
    .await;
    assert!(
        second.iter().all(|&(_, w, r)| w == 3 && r == 2),
        "{second:?}"
    );
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(a.0, b.0, "ranks are sticky across rounds");
    }
}
