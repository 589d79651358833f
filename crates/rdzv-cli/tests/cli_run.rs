//! End-to-end tests of `rdzv run` with real processes and a real etcd: several agents on this
//! machine (one per "node"), each starting the example worker (`examples/worker.rs`), which
//! checks torchrun's environment, performs a TCP all-reduce through MASTER_ADDR/MASTER_PORT
//! and appends what it saw to a record file (one per agent).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    assert_permutation, kill, rdzv, run_id, run_to_end, wait_until, worker_bin, worker_exists,
    worker_running, Etcd, Proc, Records, FAST_CONF, WAIT,
};

/// Upper bound for the workers of a SIGKILLed agent to die (parent-death signal) and for a
/// finished agent's workers to disappear.
const GONE: Duration = Duration::from_secs(5);

/// One job: an etcd, a run id, a scratch directory and the agents started so far. Dropping it
/// SIGKILLs every agent and every worker that is still running.
struct Job {
    etcd: Etcd,
    dir: tempfile::TempDir,
    id: String,
    agents: Vec<Proc>,
    /// One record file per agent (index = agent index).
    record_files: Vec<PathBuf>,
}

/// How to start one agent.
#[derive(Clone, Default)]
struct AgentSpec<'a> {
    nnodes: &'a str,
    nproc: usize,
    /// Extra `rdzv run` flags (before `--`).
    flags: Vec<String>,
    /// Extra environment (worker hooks).
    env: Vec<(&'a str, String)>,
    /// `--local-addr` (127.0.0.1 if unset).
    local_addr: Option<&'a str>,
    /// `--rdzv-conf` (FAST_CONF if unset).
    conf: Option<&'a str>,
}

impl<'a> AgentSpec<'a> {
    fn new(nnodes: &'a str, nproc: usize) -> Self {
        Self {
            nnodes,
            nproc,
            ..Default::default()
        }
    }

    fn flag(mut self, flag: impl Into<String>) -> Self {
        self.flags.push(flag.into());
        self
    }

    fn env(mut self, key: &'a str, value: impl Into<String>) -> Self {
        self.env.push((key, value.into()));
        self
    }
}

impl Job {
    fn new(tag: &str) -> Self {
        // Fail early and clearly if the example is missing.
        let _ = worker_bin();
        Self {
            etcd: Etcd::start(),
            dir: tempfile::tempdir().expect("tempdir"),
            id: run_id(tag),
            agents: Vec::new(),
            record_files: Vec::new(),
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn endpoint(&self) -> String {
        self.etcd.endpoint()
    }

    /// The `rdzv run` command of the next agent (index `self.agents.len()`).
    fn command(&self, spec: &AgentSpec<'_>, record: &Path) -> Command {
        let mut cmd = rdzv();
        cmd.arg("run")
            .args(["--nnodes", spec.nnodes])
            .args(["--nproc-per-node", &spec.nproc.to_string()])
            .args(["--rdzv-backend", "etcd"])
            .args(["--rdzv-endpoint", &self.endpoint()])
            .args(["--rdzv-id", &self.id])
            .args(["--rdzv-conf", spec.conf.unwrap_or(FAST_CONF)])
            .args(["--local-addr", spec.local_addr.unwrap_or("127.0.0.1")])
            .args(["--monitor-interval", "0.1"])
            .args(&spec.flags)
            .arg("--")
            .arg(worker_bin());
        cmd.env("WORKER_RECORD", record);
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts an agent; returns its index.
    fn start(&mut self, spec: &AgentSpec<'_>) -> usize {
        let index = self.agents.len();
        let record = self.dir().join(format!("records-{index}.txt"));
        let cmd = self.command(spec, &record);
        let agent = Proc::spawn(cmd, self.dir(), &format!("agent{index}"));
        self.agents.push(agent);
        self.record_files.push(record);
        index
    }

    fn records(&self) -> Records {
        Records::read(&self.record_files)
    }

    fn agent_records(&self, index: usize) -> Records {
        Records::read(&self.record_files[index..=index])
    }

    /// Everything the agents printed, for failure messages.
    fn describe(&self) -> String {
        let mut text: Vec<String> = self.agents.iter().map(Proc::describe).collect();
        text.push(format!("--- records:\n{}", self.records().raw));
        text.join("\n")
    }

    /// Waits (bounded) until the records satisfy `cond`.
    fn wait_records(&self, what: &str, cond: impl Fn(&Records) -> bool) {
        wait_until(
            WAIT,
            || format!("waiting for {what}\n{}", self.describe()),
            || cond(&self.records()),
        );
    }

    /// Waits for agent `index` to exit; returns its exit code.
    fn exit_code(&mut self, index: usize) -> i32 {
        let status = self.agents[index].wait_for_exit(WAIT);
        match status.code() {
            Some(code) => code,
            None => panic!(
                "agent{index} was killed by a signal ({status})\n{}",
                self.describe()
            ),
        }
    }

    /// Waits for every agent and asserts they all exit with `expected`.
    fn expect_all_exit(&mut self, expected: i32) {
        for i in 0..self.agents.len() {
            let code = self.exit_code(i);
            assert_eq!(
                code,
                expected,
                "agent{i} exited with {code}, expected {expected}\n{}",
                self.describe()
            );
        }
    }

    /// Asserts (bounded) that no worker any agent started still runs. Workers of an agent that
    /// exited on its own must be reaped by it; a SIGKILLed agent's workers may stay zombies of
    /// an init that does not reap, which is fine.
    fn assert_no_worker_left(&self) {
        let pids = self.records().pids();
        assert!(!pids.is_empty(), "no worker recorded\n{}", self.describe());
        wait_until(
            GONE,
            || {
                let left: Vec<u32> = pids
                    .iter()
                    .copied()
                    .filter(|p| worker_running(*p))
                    .collect();
                format!("workers still running: {left:?}\n{}", self.describe())
            },
            || pids.iter().all(|p| !worker_running(*p)),
        );
    }

    /// `rdzv status --json` of this run; `null` while no agent has created the run yet (then
    /// `rdzv status` says that it does not exist).
    fn status(&self) -> serde_json::Value {
        let mut cmd = rdzv();
        cmd.args([
            "status",
            "--rdzv-endpoint",
            &self.endpoint(),
            "--rdzv-id",
            &self.id,
            "--json",
        ]);
        let (code, stdout, stderr) = run_to_end(cmd, self.dir(), "status", WAIT);
        if code == 1 && stdout.is_empty() && stderr.contains("does not exist") {
            return serde_json::Value::Null;
        }
        assert_eq!(code, 0, "rdzv status failed: {stdout}\n{stderr}");
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("rdzv status --json is not JSON ({e}): {stdout}"))
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            agent.kill_now();
        }
        // The workers die with their agent (parent-death signal); make sure anyway.
        for pid in self.records().pids() {
            if worker_running(pid) {
                kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Checks a job that ran `nodes` agents × `nproc` workers to success in one attempt per
/// node: every rank started and finished exactly once in the final world, ranks are laid out
/// as torchrun does, all agree on the master, and each agent printed its workers' lines.
fn assert_clean_success(job: &Job, nodes: usize, nproc: usize) {
    let world = nodes * nproc;
    let records = job.records();
    let context = job.describe();
    assert_eq!(records.starts.len(), world, "start records\n{context}");
    assert_eq!(records.dones.len(), world, "done records\n{context}");
    assert_permutation(
        records.starts.iter().map(|s| s.rank).collect(),
        world,
        &context,
    );
    assert_permutation(
        records.dones.iter().map(|d| d.rank).collect(),
        world,
        &context,
    );
    let master = &records.starts[0].master;
    assert!(
        master.starts_with("127.0.0.1:"),
        "MASTER_ADDR is the advertised --local-addr: {master}\n{context}"
    );
    for s in &records.starts {
        assert_eq!(s.world, world, "{s:?}\n{context}");
        assert_eq!(s.restart, 0, "{s:?}\n{context}");
        assert_eq!(&s.master, master, "one master for all: {s:?}\n{context}");
        assert_eq!(s.run_id, job.id, "TORCHELASTIC_RUN_ID: {s:?}\n{context}");
    }
    let mut group_ranks = Vec::new();
    for (i, agent) in job.agents.iter().enumerate() {
        let mine = job.agent_records(i);
        assert_eq!(mine.starts.len(), nproc, "agent{i}'s workers\n{context}");
        let group_rank = mine.starts[0].group_rank;
        assert!(
            mine.starts.iter().all(|s| s.group_rank == group_rank),
            "one group rank per agent\n{context}"
        );
        group_ranks.push(group_rank);
        assert_permutation(
            mine.starts.iter().map(|s| s.local_rank).collect(),
            nproc,
            &context,
        );
        let stdout = agent.stdout();
        for s in &mine.starts {
            let line = format!("worker rank {} of {world} ok", s.rank);
            assert!(
                stdout.lines().any(|l| l == line),
                "agent{i}'s stdout lacks {line:?}\n{context}"
            );
        }
    }
    assert_permutation(group_ranks, nodes, &context);
}

#[test]
fn two_nodes_with_two_workers_each() {
    let mut job = Job::new("run-2x2");
    for _ in 0..2 {
        job.start(&AgentSpec::new("2", 2));
    }
    job.expect_all_exit(0);
    assert_clean_success(&job, 2, 2);
    job.assert_no_worker_left();
}

#[test]
fn three_nodes_with_two_workers_each() {
    let mut job = Job::new("run-3x2");
    for _ in 0..3 {
        job.start(&AgentSpec::new("3", 2));
    }
    job.expect_all_exit(0);
    assert_clean_success(&job, 3, 2);
    job.assert_no_worker_left();
}

#[test]
fn a_failed_worker_restarts_the_job() {
    let mut job = Job::new("run-restart");
    for _ in 0..2 {
        job.start(
            &AgentSpec::new("2", 2)
                .flag("--max-restarts=2")
                .env("WORKER_FAIL_RANK", "1")
                .env("WORKER_FAIL_UNTIL_RESTART", "1"),
        );
    }
    job.expect_all_exit(0);
    let records = job.records();
    let context = job.describe();
    assert!(
        records.starts.iter().any(|s| s.rank == 1 && s.restart == 0),
        "rank 1 must have started (and failed) at restart 0\n{context}"
    );
    assert_eq!(records.dones.len(), 4, "one success per rank\n{context}");
    assert_permutation(records.dones.iter().map(|d| d.rank).collect(), 4, &context);
    assert!(
        records.dones.iter().all(|d| d.world == 4),
        "all in a world of 4\n{context}"
    );
    let rank1 = records.dones.iter().find(|d| d.rank == 1).expect("rank 1");
    assert_eq!(
        rank1.restart, 1,
        "one failure consumed exactly one restart: TORCHELASTIC_RESTART_COUNT=1\n{context}"
    );
    job.assert_no_worker_left();
}

#[test]
fn a_killed_agent_is_replaced_by_a_smaller_round_while_min_is_met() {
    let mut job = Job::new("run-kill");
    for _ in 0..3 {
        job.start(
            &AgentSpec::new("2:3", 2)
                .env("WORKER_SLEEP_IF_WORLD", "6")
                .env("WORKER_SLEEP_SECS", "60"),
        );
    }
    job.wait_records("6 workers running in a world of 6", |r| {
        r.starts_with_world(6).len() == 6
    });
    let victim = 2;
    let victim_pids: Vec<u32> = job.agent_records(victim).pids();
    job.agents[victim].signal(libc::SIGKILL);
    let _ = job.agents[victim].wait_for_exit(WAIT);
    wait_until(
        GONE,
        || {
            format!(
                "the SIGKILLed agent's workers {victim_pids:?} still run\n{}",
                job.describe()
            )
        },
        || victim_pids.iter().all(|p| !worker_running(*p)),
    );

    for i in 0..2 {
        let code = job.exit_code(i);
        assert_eq!(code, 0, "agent{i}\n{}", job.describe());
    }
    let records = job.records();
    let context = job.describe();
    let dones4 = records.dones_with_world(4);
    assert_eq!(
        dones4.len(),
        4,
        "the two survivors finish in a world of 4\n{context}"
    );
    assert_permutation(dones4.iter().map(|d| d.rank).collect(), 4, &context);
    assert!(
        records.dones_with_world(6).is_empty(),
        "the world of 6 never finished\n{context}"
    );
    assert!(
        records.dones.iter().all(|d| d.restart == 0),
        "a membership change does not consume a restart\n{context}"
    );
    assert!(
        job.agent_records(victim).dones.is_empty(),
        "the killed agent's workers did not finish\n{context}"
    );
    job.assert_no_worker_left();
}

/// Issue 13: a SIGKILLed agent was noticed only when its lease expired. Its watcher (the
/// member of the previous rank) sees its probe connection close and revokes its lease: with
/// a 60 s TTL, the survivors run in a world of 4 within 20 s (in practice, well under one).
#[test]
fn a_killed_agent_is_noticed_in_well_under_its_ttl() {
    let mut job = Job::new("run-probe");
    let spec = AgentSpec {
        conf: Some("last_call_timeout=1,keep_alive_ttl=60"),
        ..AgentSpec::new("2:3", 2)
            .env("WORKER_SLEEP_IF_WORLD", "6")
            .env("WORKER_SLEEP_SECS", "120")
    };
    for _ in 0..3 {
        job.start(&spec);
    }
    job.wait_records("6 workers running in a world of 6", |r| {
        r.starts_with_world(6).len() == 6
    });
    job.agents[2].signal(libc::SIGKILL);
    let _ = job.agents[2].wait_for_exit(WAIT);
    wait_until(
        Duration::from_secs(20),
        || {
            format!(
                "the survivors are not in a world of 4 within 20 s of the kill (TTL 60 s)\n{}",
                job.describe()
            )
        },
        || job.records().starts_with_world(4).len() == 4,
    );
    for i in 0..2 {
        let code = job.exit_code(i);
        assert_eq!(code, 0, "agent{i}\n{}", job.describe());
    }
    let revoked = (0..2).any(|i| job.agents[i].stderr().contains("revoking its lease"));
    assert!(
        revoked,
        "a survivor says it revoked the dead agent's lease\n{}",
        job.describe()
    );
    job.assert_no_worker_left();
}

/// Issue 13: the peer probe must not turn a connection reset while the watched agent lives
/// (a NAT, a firewall, a middlebox) into a crash report: the watcher connects again, is
/// greeted, and watches on — no revoked lease, no restart. The probe connections of real
/// agents are destroyed with `ss -K` (the kernel's SOCK_DESTROY) while their workers run.
#[test]
fn a_probe_connection_reset_while_the_agent_lives_costs_no_restart() {
    let mut job = Job::new("run-probe-reset");
    let spec = AgentSpec {
        conf: Some("last_call_timeout=1,keep_alive_ttl=60"),
        ..AgentSpec::new("2", 1)
            .env("WORKER_SLEEP_IF_WORLD", "2")
            .env("WORKER_SLEEP_SECS", "6")
    };
    for _ in 0..2 {
        job.start(&spec);
    }
    job.wait_records("2 workers running in a world of 2", |r| {
        r.starts_with_world(2).len() == 2
    });
    let status = job.status();
    let ports: Vec<String> = status["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            let probe = m["probe"]
                .as_str()
                .expect("each member advertises its probe");
            probe.rsplit(':').next().unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(ports.len(), 2, "{status}");
    let filter = format!("( sport = :{} or sport = :{} )", ports[0], ports[1]);
    let established = || {
        let out = std::process::Command::new("ss")
            .args(["-tnH", "state", "established", &filter])
            .output()
            .expect("ss");
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    wait_until(
        WAIT,
        || {
            format!(
                "the agents never watched each other (ports {ports:?})\n{}",
                job.describe()
            )
        },
        || established() == 2,
    );
    let killed = std::process::Command::new("ss")
        .args(["-K", "-tnH", "state", "established", &filter])
        .output()
        .expect("ss -K");
    assert!(killed.status.success(), "ss -K failed: {killed:?}");
    let destroyed = String::from_utf8_lossy(&killed.stdout).lines().count();
    assert_eq!(
        destroyed, 2,
        "ss -K destroyed {destroyed} connection(s): {killed:?}"
    );
    // Both watchers connect again (and are greeted) while the workers still run.
    wait_until(
        WAIT,
        || format!("the watchers did not reconnect\n{}", job.describe()),
        || established() == 2,
    );
    job.expect_all_exit(0);
    let records = job.records();
    let context = job.describe();
    assert_eq!(records.starts.len(), 2, "each rank started once\n{context}");
    assert!(
        records.starts.iter().all(|s| s.restart == 0),
        "no restart\n{context}"
    );
    assert!(
        (0..2).all(|i| !job.agents[i].stderr().contains("revoking its lease")),
        "no lease was revoked\n{context}"
    );
}

/// Two agents of a `--nnodes 2:3` job run (their world-4 workers sleep), then a third one
/// arrives: every agent restarts into a world of 6, which finishes. Returns the job and each
/// agent's `--log-dir` (given only if `log_dirs`).
fn grow_to_three_nodes(tag: &str, log_dirs: bool) -> (Job, Vec<PathBuf>) {
    let mut job = Job::new(tag);
    let logs: Vec<PathBuf> = (0..3)
        .map(|i| job.dir().join(format!("logs-{i}")))
        .collect();
    let spec = |i: usize| {
        let mut spec = AgentSpec::new("2:3", 2)
            .env("WORKER_SLEEP_IF_WORLD", "4")
            .env("WORKER_SLEEP_SECS", "60");
        if log_dirs {
            spec = spec
                .flag(format!("--log-dir={}", logs[i].display()))
                .flag("--redirects=1");
        }
        spec
    };
    job.start(&spec(0));
    job.start(&spec(1));
    job.wait_records("4 workers running in a world of 4", |r| {
        r.starts_with_world(4).len() == 4
    });
    job.start(&spec(2));
    job.expect_all_exit(0);

    let records = job.records();
    let context = job.describe();
    assert_eq!(records.dones.len(), 6, "done records\n{context}");
    assert!(records.dones.iter().all(|d| d.world == 6), "{context}");
    assert_permutation(records.dones.iter().map(|d| d.rank).collect(), 6, &context);
    assert!(
        records.dones.iter().all(|d| d.restart == 0),
        "a membership change does not consume a restart (TORCHELASTIC_RESTART_COUNT stays 0)\n{context}"
    );
    job.assert_no_worker_left();
    (job, logs)
}

/// Regression (issue 12): different `--nproc-per-node` on different nodes silently gave
/// duplicate ranks and a different WORLD_SIZE per node. Now every node's count travels in its
/// join record and the global ranks are torchrun's: each node's after those of the nodes
/// before it in group-rank order, WORLD_SIZE the sum.
#[test]
fn different_nproc_per_node_gives_torchruns_global_ranks() {
    let mut job = Job::new("run-hetero");
    job.start(&AgentSpec::new("2", 1).env("WORKER_HETEROGENEOUS", "1"));
    job.start(&AgentSpec::new("2", 2).env("WORKER_HETEROGENEOUS", "1"));
    job.expect_all_exit(0);
    let records = job.records();
    let context = job.describe();
    assert_eq!(records.dones.len(), 3, "{context}");
    assert!(
        records.starts.iter().all(|s| s.world == 3),
        "WORLD_SIZE is the sum\n{context}"
    );
    assert_permutation(records.starts.iter().map(|s| s.rank).collect(), 3, &context);
    // Group-rank order: the node with group rank 0 has the first global ranks.
    let mut by_group: Vec<(usize, usize, usize)> = records
        .starts
        .iter()
        .map(|s| (s.group_rank, s.local_rank, s.rank))
        .collect();
    by_group.sort_unstable();
    let ranks: Vec<usize> = by_group.iter().map(|t| t.2).collect();
    assert_eq!(
        ranks,
        vec![0, 1, 2],
        "ranks follow group rank, then local rank\n{context}"
    );
}

#[test]
fn a_third_node_joins_a_running_job() {
    grow_to_three_nodes("run-grow", false);
}

/// Logs go to `attempt_<restart count>`, as torchrun's: a membership change is no restart, so
/// the final world's output of the first two agents is in `attempt_0` too.
#[test]
fn log_dir_attempt_is_the_restart_count_across_membership_changes() {
    let (job, logs) = grow_to_three_nodes("run-grow-logs", true);
    for (i, dir) in logs.iter().enumerate() {
        for s in job.agent_records(i).starts.iter().filter(|s| s.world == 6) {
            let file = run_log_dir(dir, &job.id)
                .join("attempt_0")
                .join(s.local_rank.to_string())
                .join("stdout.log");
            let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
                panic!(
                    "agent{i}: cannot read {} ({e}); log files: {:?}",
                    file.display(),
                    list_files(dir)
                )
            });
            assert!(
                text.contains(&format!("worker rank {} of 6 ok", s.rank)),
                "agent{i}: the world-6 output of rank {} is not in {} (attempt_<restart count>; \
                 the restart count is still 0): {text:?}; log files: {:?}",
                s.rank,
                file.display(),
                list_files(dir)
            );
        }
    }
}

/// Regression (issue 12): `--max-restarts` was counted per node (as torchrun does, PyTorch
/// issue 108158), so a job of N nodes could restart N times more than asked. The budget is the
/// job's: here rank 0 (node A) fails in the first attempt and rank 1 (node B) in the second;
/// with `--max-restarts 1` the second failed round exhausts the job's budget.
#[test]
fn max_restarts_is_a_budget_for_the_whole_job() {
    let mut job = Job::new("run-budget");
    for _ in 0..2 {
        job.start(
            &AgentSpec::new("2", 1)
                .flag("--max-restarts=1")
                .env("WORKER_FAIL_AT", "0@0,1@1"),
        );
    }
    for i in 0..2 {
        let code = job.exit_code(i);
        assert_eq!(
            code,
            1,
            "agent{i}: the job's budget is spent\n{}",
            job.describe()
        );
    }
    let records = job.records();
    let context = job.describe();
    let mut attempts: Vec<u32> = records.starts.iter().map(|s| s.restart).collect();
    attempts.sort_unstable();
    attempts.dedup();
    assert_eq!(
        attempts,
        vec![0, 1],
        "two attempts, every node's workers told the job's restart count\n{context}"
    );
    assert!(records.dones.is_empty(), "{context}");
    assert_eq!(
        job.status()["failed_rounds"],
        2,
        "rdzv status shows the job's count"
    );
}

#[test]
fn exhausted_restarts_close_the_run() {
    let mut job = Job::new("run-exhausted");
    for _ in 0..2 {
        job.start(
            &AgentSpec::new("2", 2)
                .flag("--max-restarts=1")
                .env("WORKER_FAIL_RANK", "0"),
        );
    }
    job.expect_all_exit(1);
    let records = job.records();
    let context = job.describe();
    assert!(records.dones.is_empty(), "nothing succeeded\n{context}");
    let mut rank0_restarts: Vec<u32> = records
        .starts
        .iter()
        .filter(|s| s.rank == 0)
        .map(|s| s.restart)
        .collect();
    rank0_restarts.sort_unstable();
    assert_eq!(
        rank0_restarts,
        vec![0, 1],
        "rank 0 ran at restart 0 and, once, at restart 1\n{context}"
    );
    let failing: Vec<usize> = (0..job.agents.len())
        .filter(|i| job.agents[*i].stderr().contains("exitcode"))
        .collect();
    assert!(
        !failing.is_empty(),
        "a failure summary with `exitcode` on some agent's stderr\n{context}"
    );
    for i in failing {
        let stderr = job.agents[i].stderr();
        assert!(
            stderr.contains("rank") && stderr.contains("exitcode: 1"),
            "agent{i}'s failure summary names the rank and the exit code\n{context}"
        );
    }
    let status = job.status();
    assert_eq!(status["closed"], true, "the run is closed: {status}");
    job.assert_no_worker_left();
}

/// Issue 12: a run closed by its own nodes after a failure stayed closed for its retention
/// (an hour), so a Kubernetes pod restart or a SLURM requeue with the same run id failed at
/// once. It starts again once the failed job's agents have exited; `rdzv close` (an operator)
/// keeps it closed.
#[test]
fn a_failed_job_starts_again_with_the_same_run_id_unless_an_operator_closed_it() {
    let mut job = Job::new("run-requeue");
    for _ in 0..2 {
        job.start(
            &AgentSpec::new("2", 1)
                .flag("--max-restarts=0")
                .env("WORKER_FAIL_RANK", "0"),
        );
    }
    job.expect_all_exit(1);
    assert_eq!(
        job.status()["closed"],
        true,
        "the failed job closed the run"
    );
    // The requeued job: the same command line, and this time the workers succeed.
    let requeued: Vec<usize> = (0..2).map(|_| job.start(&AgentSpec::new("2", 1))).collect();
    for i in requeued.iter().copied() {
        let code = job.exit_code(i);
        assert_eq!(
            code,
            0,
            "requeued agent{i} exited with {code}\n{}",
            job.describe()
        );
        let done = job.agent_records(i).dones.len();
        assert_eq!(
            done,
            1,
            "requeued agent{i}'s worker finished once\n{}",
            job.describe()
        );
    }
    let status = job.status();
    assert_eq!(
        status["closed"], false,
        "the requeued job's run is open: {status}"
    );
    assert_eq!(
        status["failed_rounds"], 0,
        "the requeued job has its own restart budget: {status}"
    );
    // An operator closes it: a later agent with the same id is refused.
    let mut close = rdzv();
    close.args([
        "close",
        "--rdzv-endpoint",
        &job.endpoint(),
        "--rdzv-id",
        &job.id,
    ]);
    let (code, stdout, stderr) = run_to_end(close, job.dir(), "close", WAIT);
    assert_eq!(code, 0, "rdzv close failed: {stdout}\n{stderr}");
    let late = job.start(&AgentSpec::new("1", 1));
    let code = job.exit_code(late);
    assert_eq!(
        code,
        1,
        "an agent of a run an operator closed\n{}",
        job.describe()
    );
    assert!(
        job.agents[late].stderr().contains("is closed"),
        "the refused agent says the run is closed\n{}",
        job.describe()
    );
    assert!(
        job.agent_records(late).starts.is_empty(),
        "no worker started"
    );
}

fn terminate_agent(signal: libc::c_int) {
    let mut job = Job::new("run-term");
    job.start(&AgentSpec::new("1", 2).env("WORKER_SLEEP_SECS", "60"));
    job.wait_records("2 sleeping workers", |r| r.starts.len() == 2);
    let pids = job.records().pids();
    job.agents[0].signal(signal);
    let code = job.exit_code(0);
    assert_eq!(
        code,
        128 + signal,
        "exit code after signal {signal}\n{}",
        job.describe()
    );
    // The agent waited for its workers: they are gone, not even zombies.
    for pid in pids {
        assert!(
            !worker_exists(pid),
            "worker {pid} is still there after its agent exited\n{}",
            job.describe()
        );
    }
    // The agent left the rendezvous: its join record is gone at once, not at lease expiry.
    let status = job.status();
    let members = status["members"].as_array().cloned().unwrap_or_default();
    assert!(
        members.iter().all(|m| m["alive"] == false),
        "the agent left the rendezvous: {status}"
    );
}

#[test]
fn sigterm_stops_the_workers_and_exits_143() {
    terminate_agent(libc::SIGTERM);
}

#[test]
fn sigint_stops_the_workers_and_exits_130() {
    terminate_agent(libc::SIGINT);
}

/// Workers that ignore SIGTERM are SIGKILLed after the grace period.
#[test]
fn workers_ignoring_sigterm_are_killed_after_the_grace_period() {
    let job = Job::new("run-grace");
    let pid_file = job.dir().join("pids.txt");
    let mut cmd = rdzv();
    cmd.arg("run")
        .args(["--nnodes", "1", "--nproc-per-node", "2"])
        .args(["--rdzv-endpoint", &job.endpoint(), "--rdzv-id", &job.id])
        .args(["--rdzv-conf", FAST_CONF, "--local-addr", "127.0.0.1"])
        .args(["--grace-period", "1"])
        .args(["--", "sh", "-c"])
        .arg(r#"trap '' TERM; echo $$ >> "$0"; exec sleep 60"#)
        .arg(&pid_file);
    let mut agent = Proc::spawn(cmd, job.dir(), "agent-grace");
    let read_pids = || -> Vec<u32> {
        std::fs::read_to_string(&pid_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    wait_until(
        WAIT,
        || {
            format!(
                "2 worker pids in {}\n{}",
                pid_file.display(),
                agent.describe()
            )
        },
        || read_pids().len() == 2,
    );
    // Wait until both have exec'd `sleep` (the trap is set before).
    let pids = read_pids();
    let is_sleep = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
    };
    wait_until(
        WAIT,
        || format!("workers {pids:?} to exec sleep"),
        || pids.iter().all(|p| is_sleep(*p)),
    );
    let sent = std::time::Instant::now();
    agent.signal(libc::SIGTERM);
    let code = agent.exit_code(WAIT);
    let took = sent.elapsed();
    assert_eq!(code, 143, "{}", agent.describe());
    assert!(
        took >= Duration::from_millis(900),
        "the grace period (1 s) was not waited for: exited after {took:?}"
    );
    assert!(
        took < Duration::from_secs(10),
        "exited only after {took:?}; the grace period is 1 s"
    );
    for pid in pids {
        assert!(
            !is_sleep(pid),
            "worker {pid} ignoring SIGTERM survived its agent\n{}",
            agent.describe()
        );
    }
}

#[test]
fn standalone_runs_a_single_node_job() {
    let _ = worker_bin();
    let dir = tempfile::tempdir().expect("tempdir");
    let record = dir.path().join("records.txt");
    let mut cmd = rdzv();
    cmd.args(["run", "--standalone", "--nproc-per-node", "2", "--"])
        .arg(worker_bin())
        .env("WORKER_RECORD", &record);
    let mut agent = Proc::spawn(cmd, dir.path(), "standalone");
    let code = agent.exit_code(WAIT);
    let records = Records::read(&[record]);
    let context = format!("{}\n--- records:\n{}", agent.describe(), records.raw);
    assert_eq!(code, 0, "{context}");
    assert_eq!(records.dones.len(), 2, "{context}");
    assert!(records.dones.iter().all(|d| d.world == 2), "{context}");
    assert_permutation(records.dones.iter().map(|d| d.rank).collect(), 2, &context);
    let run_ids: Vec<&str> = records.starts.iter().map(|s| s.run_id.as_str()).collect();
    assert!(
        !run_ids[0].is_empty() && run_ids[0] != "none" && run_ids.iter().all(|r| *r == run_ids[0]),
        "a random run id shared by the workers: {run_ids:?}"
    );
    for pid in records.pids() {
        assert!(!worker_exists(pid), "worker {pid} left behind\n{context}");
    }
    // The auto-started etcd is stopped with the agent (its endpoint is in the log, if logged).
    let endpoint = agent.stderr().split_whitespace().find_map(|w| {
        w.strip_prefix("endpoint=")
            .map(|e| e.trim_matches('"').to_string())
    });
    match endpoint {
        Some(endpoint) => {
            let addr: std::net::SocketAddr = endpoint
                .parse()
                .unwrap_or_else(|e| panic!("endpoint={endpoint} is not host:port ({e})"));
            assert!(
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
                "the standalone etcd at {endpoint} still answers after its agent exited"
            );
        }
        None => eprintln!("note: the standalone etcd endpoint is not logged; not checked"),
    }
}

#[test]
fn tee_prefixes_console_lines_as_torchrun() {
    let mut job = Job::new("run-tee");
    job.start(&AgentSpec::new("1", 2).flag("--tee=3"));
    job.expect_all_exit(0);
    let stdout = job.agents[0].stdout();
    let stderr = job.agents[0].stderr();
    let context = job.describe();
    for rank in 0..2 {
        // torchrun's default prefix: `[<role><local rank>]:`.
        let out = format!("[default{rank}]:worker rank {rank} of 2 ok");
        let err = format!("[default{rank}]:worker rank {rank} stderr");
        assert!(
            stdout.lines().any(|l| l == out),
            "stdout lacks {out:?}\n{context}"
        );
        assert!(
            stderr.lines().any(|l| l == err),
            "stderr lacks {err:?}\n{context}"
        );
    }
    for line in stdout.lines().filter(|l| l.contains("worker rank")) {
        assert!(
            line.starts_with("[default"),
            "unprefixed worker line {line:?}\n{context}"
        );
    }
    job.assert_no_worker_left();
}

/// The files under `dir`, for failure messages.
fn list_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap_or(&p).display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// The one directory `<log dir>/<run id>_<random>/` an agent made, as torchrun's layout.
fn run_log_dir(logs: &Path, run_id: &str) -> PathBuf {
    let prefix = format!("{run_id}_");
    let found: Vec<PathBuf> = std::fs::read_dir(logs)
        .unwrap_or_else(|e| panic!("cannot list {} ({e})", logs.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one <run_id>_<random> directory expected in {}: {found:?}",
        logs.display()
    );
    found.into_iter().next().unwrap_or_default()
}

#[test]
fn log_dir_holds_per_attempt_files() {
    let mut job = Job::new("run-logs");
    let logs = job.dir().join("logs");
    job.start(
        &AgentSpec::new("1", 2)
            .flag(format!("--log-dir={}", logs.display()))
            .flag("--redirects=3")
            .flag("--max-restarts=1")
            .env("WORKER_FAIL_RANK", "1")
            .env("WORKER_FAIL_UNTIL_RESTART", "1"),
    );
    job.expect_all_exit(0);
    let context = format!("{}\n--- log files: {:?}", job.describe(), list_files(&logs));
    let root = run_log_dir(&logs, &job.id);
    let read = |rel: &str| {
        std::fs::read_to_string(root.join(rel))
            .unwrap_or_else(|e| panic!("cannot read {rel} ({e})\n{context}"))
    };

    // Attempt 0: rank 1 failed and wrote torch's error file.
    let error = read("attempt_0/1/error.json");
    let json: serde_json::Value = serde_json::from_str(&error)
        .unwrap_or_else(|e| panic!("error.json is not JSON ({e}): {error}"));
    assert!(
        json["message"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("injected failure of rank 1")),
        "{json}"
    );
    assert!(
        read("attempt_0/1/stderr.log").contains("injected failure"),
        "{context}"
    );

    // Attempt 1: both succeeded; their output is in the files, not on the console.
    for rank in 0..2 {
        let out = read(&format!("attempt_1/{rank}/stdout.log"));
        assert!(
            out.contains(&format!("worker rank {rank} of 2 ok")),
            "{out:?}\n{context}"
        );
        let err = read(&format!("attempt_1/{rank}/stderr.log"));
        assert!(
            err.contains(&format!("worker rank {rank} stderr")),
            "{err:?}\n{context}"
        );
    }
    assert!(
        !job.agents[0].stdout().contains("worker rank"),
        "--redirects 3 keeps worker output off the console\n{context}"
    );
    job.assert_no_worker_left();
}

#[test]
fn ipv6_master_addr() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback");
        return;
    }
    let mut job = Job::new("run-ipv6");
    job.start(&AgentSpec {
        local_addr: Some("::1"),
        ..AgentSpec::new("1", 2)
    });
    job.expect_all_exit(0);
    let records = job.records();
    let context = job.describe();
    assert_eq!(records.dones.len(), 2, "{context}");
    for s in &records.starts {
        assert!(
            s.master.starts_with("::1:"),
            "MASTER_ADDR is the IPv6 literal without brackets: {s:?}\n{context}"
        );
    }
    job.assert_no_worker_left();
}

#[test]
fn bad_flags_exit_2() {
    let _ = worker_bin();
    let dir = tempfile::tempdir().expect("tempdir");
    let record = dir.path().join("records.txt");
    let endpoint = "127.0.0.1:1";
    let worker = worker_bin().display().to_string();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "--nnodes 3:2",
            vec![
                "--nnodes",
                "3:2",
                "--rdzv-endpoint",
                endpoint,
                "--",
                &worker,
            ],
        ),
        (
            "--nproc-per-node 0",
            vec![
                "--nproc-per-node",
                "0",
                "--rdzv-endpoint",
                endpoint,
                "--",
                &worker,
            ],
        ),
        (
            "--standalone with --rdzv-endpoint",
            vec!["--standalone", "--rdzv-endpoint", endpoint, "--", &worker],
        ),
        (
            "no --rdzv-id (there is no default id shared by every job)",
            vec!["--rdzv-endpoint", endpoint, "--", &worker],
        ),
        ("no command", vec!["--standalone"]),
        ("no command after --", vec!["--standalone", "--"]),
        (
            "--tee 4",
            vec!["--tee", "4", "--rdzv-endpoint", endpoint, "--", &worker],
        ),
        (
            "--max-restarts -1",
            vec![
                "--max-restarts",
                "-1",
                "--rdzv-endpoint",
                endpoint,
                "--",
                &worker,
            ],
        ),
        (
            "no --rdzv-endpoint on several nodes (the static default needs a fixed --nnodes)",
            vec!["--nnodes", "1:2", "--rdzv-id", "x", "--", &worker],
        ),
    ];
    for (what, args) in cases {
        let mut cmd = rdzv();
        cmd.arg("run").args(&args).env("WORKER_RECORD", &record);
        let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "bad", WAIT);
        assert_eq!(
            code, 2,
            "{what}: exit code; stdout {stdout:?}; stderr:\n{stderr}"
        );
        assert!(!stderr.trim().is_empty(), "{what}: no message");
        assert!(!record.exists(), "{what}: a worker was started");
    }
    // A missing endpoint with an etcd backend named names the flag and its variable.
    let mut cmd = rdzv();
    cmd.args(["run", "--rdzv-backend", "etcd-v3", "--rdzv-id", "x", "--"])
        .arg(&worker);
    let (_, _, stderr) = run_to_end(cmd, dir.path(), "bad", WAIT);
    assert!(stderr.contains("--rdzv-endpoint"), "{stderr}");
}

#[test]
fn pet_environment_variables_configure_the_agent() {
    let job = Job::new("run-pet");
    let record = job.dir().join("records.txt");
    let mut cmd = rdzv();
    cmd.args(["run", "--"])
        .arg(worker_bin())
        .env("PET_NNODES", "1")
        .env("PET_NPROC_PER_NODE", "2")
        .env("PET_RDZV_BACKEND", "etcd")
        .env("PET_RDZV_ENDPOINT", job.endpoint())
        .env("PET_RDZV_ID", &job.id)
        .env("PET_RDZV_CONF", FAST_CONF)
        .env("PET_LOCAL_ADDR", "127.0.0.1")
        .env("PET_MAX_RESTARTS", "0")
        .env("WORKER_RECORD", &record);
    let mut agent = Proc::spawn(cmd, job.dir(), "agent-pet");
    let code = agent.exit_code(WAIT);
    let records = Records::read(&[record]);
    let context = format!("{}\n--- records:\n{}", agent.describe(), records.raw);
    assert_eq!(code, 0, "{context}");
    assert_eq!(records.dones.len(), 2, "{context}");
    for s in &records.starts {
        assert_eq!(s.run_id, job.id, "{context}");
        assert_eq!(s.world, 2, "{context}");
        assert!(s.master.starts_with("127.0.0.1:"), "{context}");
    }
}

#[test]
fn node_rank_hint_orders_the_first_round() {
    let mut job = Job::new("run-noderank");
    job.start(&AgentSpec::new("2", 1).flag("--node-rank=1"));
    job.start(&AgentSpec::new("2", 1).flag("--node-rank=0"));
    job.expect_all_exit(0);
    let context = job.describe();
    assert_eq!(job.agent_records(0).starts[0].group_rank, 1, "{context}");
    assert_eq!(job.agent_records(1).starts[0].group_rank, 0, "{context}");
    job.assert_no_worker_left();
}

#[test]
fn a_worker_killed_by_a_signal_is_reported() {
    let mut job = Job::new("run-sigkill-worker");
    job.start(&AgentSpec::new("1", 2).env("WORKER_SLEEP_SECS", "60"));
    job.wait_records("2 sleeping workers", |r| r.starts.len() == 2);
    let victim = job
        .records()
        .starts
        .iter()
        .find(|s| s.rank == 1)
        .expect("rank 1 started")
        .pid;
    assert!(kill(victim, libc::SIGKILL), "SIGKILL worker {victim}");
    let code = job.exit_code(0);
    let stderr = job.agents[0].stderr();
    let context = job.describe();
    assert_eq!(code, 1, "no restarts left\n{context}");
    assert!(
        stderr.contains("exitcode  : -9"),
        "torch reports -<signal>, in torchrun's layout\n{context}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("rank") && l.contains('1') && !l.contains("group rank")),
        "the failure summary names rank 1\n{context}"
    );
    for pid in job.records().pids() {
        assert!(!worker_exists(pid), "worker {pid} left behind\n{context}");
    }
    assert_eq!(job.status()["closed"], true, "the run is closed");
}

#[test]
fn sigterm_while_waiting_for_peers() {
    let mut job = Job::new("run-term-waiting");
    job.start(&AgentSpec::new("2", 1));
    wait_until(
        WAIT,
        || format!("the agent waits in the open round\n{}", job.describe()),
        || {
            job.status()["waiting"]
                .as_array()
                .is_some_and(|w| w.len() == 1)
        },
    );
    job.agents[0].signal(libc::SIGTERM);
    let code = job.exit_code(0);
    assert_eq!(code, 143, "{}", job.describe());
    let status = job.status();
    assert_eq!(
        status["waiting"].as_array().map(Vec::len),
        Some(0),
        "the agent left the open round: {status}"
    );
    assert!(job.records().starts.is_empty(), "no worker started");
}

/// A node whose workers succeeded waits in the exit barrier for the others; a SIGTERM there
/// must still stop it promptly with 128 + 15.
#[test]
fn sigterm_during_the_exit_barrier() {
    let job = Job::new("run-term-barrier");
    let pid_file = job.dir().join("pids.txt");
    let agent = |script: &str, name: &str| {
        let mut cmd = rdzv();
        cmd.arg("run")
            .args(["--nnodes", "2", "--nproc-per-node", "1"])
            .args(["--rdzv-endpoint", &job.endpoint(), "--rdzv-id", &job.id])
            .args(["--rdzv-conf", FAST_CONF, "--local-addr", "127.0.0.1"])
            .args(["--", "sh", "-c", script])
            .arg(&pid_file);
        Proc::spawn(cmd, job.dir(), name)
    };
    // Node A's worker succeeds at once; node B's sleeps.
    let mut a = agent(r#"echo "a $$" >> "$0""#, "agent-a");
    let mut b = agent(r#"echo "b $$" >> "$0"; exec sleep 60"#, "agent-b");
    let pid_of = |tag: &str| -> Option<u32> {
        std::fs::read_to_string(&pid_file)
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(tag)?.trim().parse().ok())
    };
    let describe = |a: &Proc, b: &Proc| format!("{}\n{}", a.describe(), b.describe());
    wait_until(
        WAIT,
        || format!("both workers started\n{}", describe(&a, &b)),
        || pid_of("a ").is_some() && pid_of("b ").is_some(),
    );
    let a_worker = pid_of("a ").unwrap();
    let b_worker = pid_of("b ").unwrap();
    // A's worker reaped by its agent: A saw the success and is in (or entering) the barrier.
    wait_until(
        WAIT,
        || format!("agent A reaps its worker {a_worker}\n{}", describe(&a, &b)),
        || !Path::new(&format!("/proc/{a_worker}")).exists(),
    );
    assert!(a.is_running(), "A waits for B\n{}", describe(&a, &b));
    a.signal(libc::SIGTERM);
    let code = a.exit_code(Duration::from_secs(10));
    assert_eq!(code, 143, "{}", describe(&a, &b));

    b.signal(libc::SIGTERM);
    let code = b.exit_code(WAIT);
    assert_eq!(code, 143, "{}", describe(&a, &b));
    let sleeping = std::fs::read_to_string(format!("/proc/{b_worker}/comm"))
        .is_ok_and(|c| c.trim() == "sleep");
    assert!(!sleeping, "B's worker survived\n{}", describe(&a, &b));
}

/// Starts agent 0 (`--node-rank 0`, so it gets group rank 0) of a `--nnodes 2:2` job, waits
/// until it has joined, stops it (SIGSTOP), then starts agent 1, which completes the round with
/// it and waits for rank 0's MASTER_ADDR.
fn rank_zero_stopped_before_publishing(tag: &str) -> Job {
    let mut job = Job::new(tag);
    job.start(&AgentSpec::new("2:2", 1).flag("--node-rank=0"));
    wait_until(
        WAIT,
        || format!("agent0 never joined\n{}", job.describe()),
        || {
            job.status()["waiting"]
                .as_array()
                .is_some_and(|w| w.len() == 1)
        },
    );
    job.agents[0].signal(libc::SIGSTOP);
    job.start(&AgentSpec::new("2:2", 1).flag("--node-rank=1"));
    job
}

/// Defect 6: `rdzv run` waited 120 s for MASTER_ADDR, deaf to membership events, when rank 0
/// was gone right after the round; the survivors must re-rendezvous as soon as rank 0 is lost.
#[test]
fn lost_rank_zero_before_master_published_makes_the_others_re_rendezvous() {
    let mut job = rank_zero_stopped_before_publishing("run-master-lost");
    wait_until(
        WAIT,
        || format!("agent1 kept waiting for MASTER_ADDR\n{}", job.describe()),
        || {
            job.agents[1]
                .stderr()
                .contains("re-rendezvous before the workers start")
        },
    );
    job.agents[0].signal(libc::SIGCONT);
    job.expect_all_exit(0);
    let records = job.records();
    assert_eq!(
        records.dones_with_world(2).len(),
        2,
        "both workers finish together\n{}",
        job.describe()
    );
    job.assert_no_worker_left();
}

/// Defect 6: SIGTERM was ignored while waiting for MASTER_ADDR.
#[test]
fn sigterm_while_waiting_for_the_master_address_exits_at_once() {
    let mut job = rank_zero_stopped_before_publishing("run-master-sigterm");
    // The round completed: agent 1 waits for MASTER_ADDR from the stopped rank 0.
    wait_until(
        WAIT,
        || format!("the round never completed\n{}", job.describe()),
        || job.status()["last_round"]["round"] == 1,
    );
    job.agents[1].signal(libc::SIGTERM);
    let status = job.agents[1].wait_for_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(143), "{}", job.describe());
    job.agents[0].signal(libc::SIGCONT);
}

/// Regression (issue 12): a node whose workers succeeded waited in the exit barrier for a node
/// known lost (up to `--exit-barrier-timeout`, 300 s by default). It stops waiting when the
/// lost node's lease expires.
#[test]
fn the_exit_barrier_does_not_wait_for_a_lost_node() {
    let job = Job::new("run-barrier-lost");
    let agent = |i: usize, script: &str| {
        let mut cmd = rdzv();
        cmd.arg("run")
            .args(["--nnodes", "2", "--nproc-per-node", "1"])
            .args(["--rdzv-endpoint", &job.endpoint(), "--rdzv-id", &job.id])
            .args(["--rdzv-conf", FAST_CONF, "--local-addr", "127.0.0.1"])
            .args(["--no-python", "sh", "-c", script]);
        Proc::spawn(cmd, job.dir(), &format!("agent{i}"))
    };
    let started = job.dir().join("slow-started");
    let mut fast = agent(0, "true");
    let mut slow = agent(1, &format!("touch {}; sleep 60", started.display()));
    wait_until(
        WAIT,
        || format!("the slow node's worker started\n{}", slow.describe()),
        || started.exists(),
    );
    // The fast node's worker is done; it waits in the exit barrier for the slow one.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        fast.is_running(),
        "the fast node must wait for the slow one\n{}",
        fast.describe()
    );
    slow.kill_now();
    let killed = std::time::Instant::now();
    let code = fast.exit_code(WAIT);
    assert_eq!(code, 0, "{}", fast.describe());
    assert!(
        killed.elapsed() < Duration::from_secs(15),
        "the fast node waited {:?} for a lost node",
        killed.elapsed()
    );
}
