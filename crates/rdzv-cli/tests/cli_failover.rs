//! `rdzv run` and `rdzv status` on a three-member etcd cluster with one member down, hung or
//! listed first: where a quorum remains, the job keeps its round (no restart) and the
//! diagnosis tool answers.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{rdzv, run_id, run_to_end, wait_until, worker_bin, Proc, Records, WAIT};
use rdzv::etcd::EtcdCluster;

/// The lease TTL of these tests, in seconds.
const TTL_SECS: u64 = 3;

struct Cluster {
    cluster: EtcdCluster,
    runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let cluster = runtime
            .block_on(EtcdCluster::start())
            .expect("start a three-member etcd cluster");
        Self {
            cluster,
            runtime,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// The endpoints with member `first` first, then the others in order.
    fn endpoints_from(&self, first: usize) -> String {
        let n = self.cluster.member_count();
        (0..n)
            .map(|i| (first + i) % n)
            .map(|m| self.cluster.member_endpoint(m).expect("member"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn leader(&self) -> usize {
        self.runtime
            .block_on(self.cluster.leader())
            .expect("the cluster has a leader")
    }
}

/// Regression (issue 10): with the first listed member hung (SIGSTOP), an agent must renew
/// its lease through the others and keep its workers: no restart, one start per rank.
#[test]
fn rdzv_run_keeps_its_workers_while_the_first_listed_member_is_hung() {
    let mut c = Cluster::start();
    let id = run_id("hung-member");
    let gate = c.dir.path().join("gate");
    let endpoints = c.endpoints_from(0);
    let records: Vec<PathBuf> = (0..2)
        .map(|i| c.dir.path().join(format!("records-{i}.txt")))
        .collect();
    let mut agents: Vec<Proc> = records
        .iter()
        .enumerate()
        .map(|(i, record)| {
            let mut cmd = rdzv();
            cmd.arg("run")
                .args(["--nnodes", "2", "--nproc-per-node", "1"])
                .args(["--rdzv-backend", "etcd", "--rdzv-endpoint", &endpoints])
                .args(["--rdzv-id", &id])
                .args([
                    "--rdzv-conf",
                    &format!("last_call_timeout=1,keep_alive_ttl={TTL_SECS}"),
                ])
                .args(["--local-addr", "127.0.0.1", "--monitor-interval", "0.1"])
                .arg("--")
                .arg(worker_bin())
                .env("WORKER_RECORD", record)
                .env("WORKER_GATE_FILE", &gate);
            Proc::spawn(cmd, c.dir.path(), &format!("agent{i}"))
        })
        .collect();
    let describe = |agents: &[Proc]| {
        let mut text: Vec<String> = agents.iter().map(Proc::describe).collect();
        text.push(format!("--- records:\n{}", Records::read(&records).raw));
        text.join("\n")
    };
    wait_until(
        WAIT,
        || format!("both workers started\n{}", describe(&agents)),
        || Records::read(&records).starts.len() >= 2,
    );
    c.cluster.stop_member(0).expect("SIGSTOP m0");
    // Three TTLs with the member every agent started on hung: had a renewal waited on it,
    // the leases would have expired and the agents restarted their workers.
    std::thread::sleep(Duration::from_secs(3 * TTL_SECS));
    std::fs::write(&gate, b"go").expect("open the gate");
    for (i, agent) in agents.iter_mut().enumerate() {
        let code = agent.exit_code(WAIT);
        assert_eq!(code, 0, "agent{i} exited with {code}");
    }
    c.cluster.cont_member(0).expect("SIGCONT m0");
    let seen = Records::read(&records);
    assert_eq!(
        seen.starts.len(),
        2,
        "the workers were restarted while a member was hung\n{}",
        describe(&agents)
    );
    assert!(seen.starts.iter().all(|s| s.restart == 0), "{}", seen.raw);
    assert_eq!(seen.dones.len(), 2, "{}", seen.raw);
}

/// A run exists on the cluster: one `rdzv join` completed a round of one node.
fn create_run(c: &Cluster, id: &str) {
    let mut cmd = rdzv();
    cmd.args(["join", "--nnodes", "1"])
        .args(["--rdzv-endpoint", &c.endpoints_from(0), "--rdzv-id", id])
        .args(["--rdzv-conf", "last_call_timeout=1"]);
    let (code, stdout, stderr) = run_to_end(cmd, c.dir.path(), "join", WAIT);
    assert_eq!(code, 0, "rdzv join: {stdout}\n{stderr}");
}

fn status_from(c: &Cluster, id: &str, first: usize) -> (i32, String, String) {
    let mut cmd = rdzv();
    cmd.args(["status", "--json"])
        .args(["--rdzv-endpoint", &c.endpoints_from(first), "--rdzv-id", id])
        .args(["--rdzv-conf", "connect_timeout=5,request_timeout=2"]);
    run_to_end(cmd, c.dir.path(), "status", WAIT)
}

fn assert_status_answers(c: &Cluster, id: &str, what: &str) {
    for first in 0..c.cluster.member_count() {
        let (code, stdout, stderr) = status_from(c, id, first);
        assert_eq!(
            code, 0,
            "rdzv status with {what}, m{first} listed first: exit {code}\n{stdout}\n{stderr}"
        );
        let status: serde_json::Value =
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
        assert_eq!(status["run_id"], id, "{stdout}");
        assert!(status["last_round"].is_object(), "{stdout}");
    }
}

/// Regression (issue 10): `rdzv status` failed if any listed endpoint was down, in any order
/// (it did not use the failover client).
#[test]
fn rdzv_status_answers_with_a_member_killed_in_any_position() {
    let mut c = Cluster::start();
    let id = run_id("status-killed");
    create_run(&c, &id);
    let follower = (c.leader() + 1) % c.cluster.member_count();
    c.cluster.kill_member(follower).expect("SIGKILL a follower");
    assert_status_answers(&c, &id, "a member killed");
}

#[test]
fn rdzv_status_answers_with_a_member_hung_in_any_position() {
    let mut c = Cluster::start();
    let id = run_id("status-hung");
    create_run(&c, &id);
    let follower = (c.leader() + 1) % c.cluster.member_count();
    c.cluster.stop_member(follower).expect("SIGSTOP a follower");
    assert_status_answers(&c, &id, "a member hung");
    c.cluster.cont_member(follower).expect("SIGCONT");
}
