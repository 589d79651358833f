//! `rdzv run` runs what torchrun runs: `python -u train.py args…`, `-m module`, `--no-python`
//! (and the `-- command` form), `${local_rank}` replaced, `OMP_NUM_THREADS` as torchrun sets
//! it, `PET_*` booleans as torchrun parses them, and worker logs kept where it says.
//! Single-node `--standalone` jobs with real Python workers (`python3` on `PATH`).

mod common;

use std::path::Path;
use std::process::Command;

use common::{rdzv, run_to_end, WAIT};

/// A Python script that prints, for its worker, one line `rank=<R> argv=<json> cmdline=<json>
/// omp=<OMP_NUM_THREADS or ->`.
const SCRIPT: &str = r#"
import json, os, sys
cmdline = open("/proc/self/cmdline", "rb").read().split(b"\0")[:-1]
line = "rank=%s argv=%s cmdline=%s omp=%s\n" % (
    os.environ["RANK"], json.dumps(sys.argv[1:]),
    json.dumps([c.decode() for c in cmdline]), os.environ.get("OMP_NUM_THREADS", "-"))
os.write(1, line.encode())  # one write: workers share the agent's stdout
"#;

fn standalone(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = rdzv();
    cmd.args(["run", "--standalone"])
        .args(args)
        .current_dir(dir)
        .env_remove("OMP_NUM_THREADS")
        .env_remove("PYTHON");
    cmd
}

fn lines_of(stdout: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("rank=")).collect();
    lines.sort_unstable();
    lines
}

#[test]
fn a_script_runs_as_python_u_script_with_local_rank_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("train.py"), SCRIPT).expect("script");
    let cmd = standalone(
        dir.path(),
        &[
            "--nproc-per-node",
            "2",
            "train.py",
            "--local-rank=${local_rank}",
            "--",
            "x",
        ],
    );
    let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let lines = lines_of(&stdout);
    assert_eq!(lines.len(), 2, "{stdout}\n{stderr}");
    for (rank, line) in lines.iter().enumerate() {
        assert!(
            line.contains(&format!(r#"argv=["--local-rank={rank}", "--", "x"]"#)),
            "{line}"
        );
        assert!(
            line.contains(r#", "-u", "train.py", "#),
            "python -u train.py: {line}"
        );
        assert!(line.ends_with("omp=1"), "two workers per node: {line}");
    }
    assert!(
        stderr.contains("Setting OMP_NUM_THREADS"),
        "torchrun's warning: {stderr}"
    );
}

#[test]
fn a_module_runs_as_python_u_m_module() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("pkg")).expect("package");
    std::fs::write(dir.path().join("pkg/__init__.py"), "").expect("package");
    std::fs::write(dir.path().join("pkg/train.py"), SCRIPT).expect("module");
    let mut cmd = standalone(dir.path(), &["-m", "pkg.train", "a"]);
    cmd.env("PYTHONPATH", dir.path());
    let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let lines = lines_of(&stdout);
    assert_eq!(lines.len(), 1, "{stdout}\n{stderr}");
    assert!(lines[0].contains(r#"argv=["a"]"#), "{}", lines[0]);
    assert!(lines[0].contains(r#""-u", "-m""#), "{}", lines[0]);
    assert!(
        lines[0].ends_with("omp=-"),
        "one worker per node: OMP_NUM_THREADS is not set: {}",
        lines[0]
    );
    assert!(!stderr.contains("Setting OMP_NUM_THREADS"), "{stderr}");
}

#[test]
fn no_python_and_the_dashed_form_run_the_program_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [
        &["--no-python", "sh", "-c", "echo rank=$RANK prog"][..],
        &["--", "sh", "-c", "echo rank=$RANK prog"][..],
    ] {
        let (code, stdout, stderr) =
            run_to_end(standalone(dir.path(), args), dir.path(), "agent", WAIT);
        assert_eq!(code, 0, "{args:?}: {stdout}\n{stderr}");
        assert_eq!(lines_of(&stdout), ["rank=0 prog"], "{args:?}: {stderr}");
    }
}

#[test]
fn the_interpreter_is_python_or_its_flag_and_a_missing_one_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("train.py"), SCRIPT).expect("script");
    // A wrapper interpreter given by --python is used.
    let wrapper = dir.path().join("mypython");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\necho wrapped >&2\nexec python3 \"$@\"\n",
    )
    .expect("wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let wrapper_text = wrapper.display().to_string();
    let cmd = standalone(dir.path(), &["--python", &wrapper_text, "train.py"]);
    let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stderr.contains("wrapped"), "{stderr}");
    // None found, or -m with --no-python: exit 2 before anything starts.
    let mut cmd = standalone(dir.path(), &["train.py"]);
    cmd.env("PATH", dir.path().join("empty"));
    let (code, _, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--python"), "{stderr}");
    let cmd = standalone(dir.path(), &["--no-python", "-m", "x"]);
    let (code, _, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--module"), "{stderr}");
}

#[test]
fn pet_booleans_are_parsed_as_torchrun_parses_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = rdzv();
    cmd.args(["run", "--no-python", "true"])
        .env("PET_STANDALONE", "1")
        .current_dir(dir.path());
    let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
    assert_eq!(code, 0, "PET_STANDALONE=1: {stdout}\n{stderr}");
}

#[test]
fn worker_logs_are_kept_where_the_agent_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cmd = standalone(
        dir.path(),
        &[
            "--redirects",
            "3",
            "--no-python",
            "sh",
            "-c",
            "echo kept-output",
        ],
    );
    let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let log_dir = stderr
        .split_whitespace()
        .find_map(|w| w.strip_prefix("log_dir="))
        .unwrap_or_else(|| panic!("the agent says where the logs are: {stderr}"));
    let path = Path::new(log_dir.trim_matches('"'));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    assert!(
        path.parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("torchelastic_")),
        "torchrun's layout /tmp/torchelastic_*/<run_id>_*: {}",
        path.display()
    );
    assert!(name.contains('_'), "{}", path.display());
    let out = std::fs::read_to_string(path.join("attempt_0/0/stdout.log"))
        .unwrap_or_else(|e| panic!("the log is kept after the agent exited ({e})"));
    assert_eq!(out.trim(), "kept-output");
    if let Some(base) = path.parent() {
        let _ = std::fs::remove_dir_all(base);
    }
}

// ---- the static backend ------------------------------------------------------------------

/// Waits for every agent to exit 0 and checks that their workers formed one world of `world`
/// (ranks `0..world`, each done once); returns the records.
fn all_succeed_in_one_world(
    agents: &mut [common::Proc],
    records: &[std::path::PathBuf],
    world: usize,
) -> common::Records {
    for (i, a) in agents.iter_mut().enumerate() {
        let code = a.exit_code(WAIT);
        assert_eq!(code, 0, "node{i}\n{}", a.describe());
    }
    let seen = common::Records::read(records);
    assert_eq!(seen.dones.len(), world, "{}", seen.raw);
    common::assert_permutation(
        seen.dones.iter().map(|d| d.rank).collect(),
        world,
        &seen.raw,
    );
    seen
}

fn worker_cmd(dir: &Path, args: &[&str], record: &Path) -> Command {
    let mut cmd = rdzv();
    cmd.arg("run")
        .args(args)
        .arg("--")
        .arg(common::worker_bin())
        .env("WORKER_RECORD", record)
        // No etcd can be found: a static job must not need one.
        .env("RDZV_ETCD_BINARY", "/nonexistent/etcd")
        .current_dir(dir);
    cmd
}

/// torchrun's default: with no endpoint, a single-node job needs no rendezvous service (no
/// etcd at all), and restarts still work.
#[test]
fn no_endpoint_is_a_single_node_job_without_etcd_whose_restarts_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = dir.path().join("records.txt");
    let mut cmd = worker_cmd(
        dir.path(),
        &["--nproc-per-node", "2", "--max-restarts", "1"],
        &record,
    );
    cmd.env("WORKER_FAIL_RANK", "1")
        .env("WORKER_FAIL_UNTIL_RESTART", "1");
    let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
    let records = common::Records::read(&[record]);
    let context = format!("{stdout}\n{stderr}\n--- records:\n{}", records.raw);
    assert_eq!(code, 0, "{context}");
    assert_eq!(records.dones.len(), 2, "{context}");
    assert!(
        records.dones.iter().all(|d| d.world == 2 && d.restart == 1),
        "both workers succeed after one restart: {context}"
    );
    // As torchrun 2.15: one node with no endpoint and no master port gets a random run id,
    // the same for every worker and attempt.
    let ids: std::collections::BTreeSet<&str> =
        records.starts.iter().map(|s| s.run_id.as_str()).collect();
    assert_eq!(ids.len(), 1, "{context}");
    assert!(
        ids.iter().all(|id| id.len() == 36 && *id != "none"),
        "a random run id: {context}"
    );
}

/// `--rdzv-backend static` on two nodes (here, two agents on this machine): ranks from
/// `--node-rank`, MASTER_ADDR/MASTER_PORT from `--master-addr`/`--master-port`, one world.
#[test]
fn static_backend_on_two_nodes_forms_one_world() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = rdzv::bootstrap::free_port("127.0.0.1")
        .expect("a free port")
        .to_string();
    let records: Vec<_> = (0..2)
        .map(|i| dir.path().join(format!("records-{i}.txt")))
        .collect();
    let mut agents: Vec<common::Proc> = (0..2)
        .map(|node| {
            let node_rank = node.to_string();
            let mut cmd = worker_cmd(
                dir.path(),
                &[
                    "--rdzv-backend",
                    "static",
                    "--nnodes",
                    "2",
                    "--node-rank",
                    &node_rank,
                    "--nproc-per-node",
                    "2",
                    "--master-addr",
                    "127.0.0.1",
                ],
                &records[node],
            );
            cmd.env("PET_MASTER_PORT", &port);
            common::Proc::spawn(cmd, dir.path(), &format!("node{node}"))
        })
        .collect();
    let seen = all_succeed_in_one_world(&mut agents, &records, 4);
    for s in &seen.starts {
        assert_eq!(s.master, format!("127.0.0.1:{port}"), "{}", seen.raw);
        assert_eq!(
            s.group_rank,
            s.rank / 2,
            "ranks follow --node-rank: {}",
            seen.raw
        );
    }
}

#[test]
fn backends_are_honoured_and_unknown_ones_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (args, needle) in [
        (
            &[
                "--rdzv-backend",
                "zk",
                "--rdzv-endpoint",
                "h:1",
                "--rdzv-id",
                "j",
            ][..],
            "etcd-v3 (the default), etcd, etcd-v2",
        ),
        (&["--rdzv-backend", "zookeeper"][..], "static"),
        (
            &["--rdzv-backend", "static", "--nnodes", "1:2"][..],
            "fixed --nnodes",
        ),
        (
            &[
                "--rdzv-backend",
                "static",
                "--nnodes",
                "2",
                "--node-rank",
                "2",
            ][..],
            "--node-rank 2",
        ),
        (
            &["--rdzv-backend", "static", "--standalone"][..],
            "--standalone",
        ),
        // An explicit etcd backend needs its endpoint.
        (
            &["--rdzv-backend", "etcd-v3", "--rdzv-id", "j"][..],
            "--rdzv-endpoint",
        ),
    ] {
        let mut cmd = rdzv();
        cmd.arg("run").args(args).args(["--no-python", "true"]);
        let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
        assert_eq!(code, 2, "{args:?}: {stdout}\n{stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// torchrun's failure summary: the root cause with the traceback of the worker's error file
/// (as `@record` writes it), copied to the agent's own `TORCHELASTIC_ERROR_FILE`.
#[test]
fn the_failure_summary_shows_the_root_cause_and_fills_the_agents_error_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent_error = dir.path().join("agent-error.json");
    let script = r#"if [ "$RANK" = 1 ]; then
  printf '%s' '{"message": {"message": "ValueError: boom", "extraInfo": {"py_callstack": "Traceback (most recent call last):\n  File \"train.py\", line 3\nValueError: boom", "timestamp": "1000"}}}' > "$TORCHELASTIC_ERROR_FILE"
  exit 1
fi
sleep 30"#;
    let mut cmd = rdzv();
    cmd.args(["run", "--nproc-per-node", "2", "--shutdown-timeout", "1"])
        .args(["--no-python", "sh", "-c", script])
        .env("TORCHELASTIC_ERROR_FILE", &agent_error)
        .current_dir(dir.path());
    let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    let root = stderr
        .find("Root Cause (first observed failure):")
        .unwrap_or_else(|| panic!("no root cause section: {stderr}"));
    assert!(stderr.contains("sh FAILED"), "{stderr}");
    let cause = &stderr[root..];
    assert!(cause.contains("rank      : 1 (local_rank: 1)"), "{cause}");
    assert!(cause.contains("exitcode  : 1"), "{cause}");
    assert!(
        cause.contains("Traceback (most recent call last):"),
        "{cause}"
    );
    assert!(cause.contains("ValueError: boom"), "{cause}");
    let copied = std::fs::read_to_string(&agent_error).expect("the agent's error file");
    assert!(copied.contains("ValueError: boom"), "{copied}");
}

// ---- console output: per-rank maps, the rank filter, the line prefix ----------------------

/// `-t 0:3,1:1`, `--local-ranks-filter`, `--log-line-prefix-template`, as torchrun's: rank 0
/// tees both streams, rank 1 only stdout, rank 2 nothing; the filter hides rank 1 from the
/// console (its file stays); the template names the global rank and the role.
#[test]
fn per_rank_tee_maps_the_rank_filter_and_the_prefix_template() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_dir = dir.path().join("logs");
    let log_dir_text = log_dir.display().to_string();
    let mut cmd = rdzv();
    cmd.args(["run", "--nproc-per-node", "3", "--role", "trainer"])
        .args(["--tee", "0:3,1:1", "--local-ranks-filter", "0,2"])
        .args(["--log-line-prefix-template", "<${role_name}:${rank}> "])
        .args(["--log-dir", &log_dir_text])
        .args([
            "--no-python",
            "sh",
            "-c",
            "echo out-$RANK; echo err-$RANK >&2",
        ])
        .current_dir(dir.path());
    let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.lines().any(|l| l == "<trainer:0> out-0"), "{stdout}");
    assert!(stderr.lines().any(|l| l == "<trainer:0> err-0"), "{stderr}");
    // Rank 1 is filtered out: nothing on the console, its tee'd stdout in its file.
    assert!(
        !stdout.contains("out-1") && !stderr.contains("err-1"),
        "{stdout}\n{stderr}"
    );
    // Rank 2 is not tee'd: plain, unprefixed output.
    assert!(stdout.lines().any(|l| l == "out-2"), "{stdout}");
    assert!(stderr.lines().any(|l| l == "err-2"), "{stderr}");
    let run_dir = std::fs::read_dir(&log_dir)
        .expect("log dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .next()
        .expect("the run's log directory");
    let rank1 = std::fs::read_to_string(run_dir.join("attempt_0/1/stdout.log"))
        .expect("rank 1's stdout file");
    assert_eq!(rank1.trim(), "out-1");
}

#[test]
fn bad_console_flags_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [
        &["--tee", "0:4"][..],
        &["--redirects", "0:1,0:2"][..],
        &["--local-ranks-filter", "a"][..],
    ] {
        let mut cmd = rdzv();
        cmd.arg("run").args(args).args(["--no-python", "true"]);
        let (code, _, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
        assert_eq!(code, 2, "{args:?}: {stderr}");
    }
}

// ---- the c10d backend --------------------------------------------------------------------

/// `--rdzv-backend c10d --rdzv-endpoint localhost:P` on two agents of this host: the first to
/// bind P serves the rendezvous (an etcd), the other joins through it; one world of four.
#[test]
fn c10d_agents_on_the_endpoints_host_serve_and_join_one_world() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = rdzv::bootstrap::free_port("127.0.0.1")
        .expect("a free port")
        .to_string();
    let endpoint = format!("localhost:{port}");
    let records: Vec<_> = (0..2)
        .map(|i| dir.path().join(format!("records-{i}.txt")))
        .collect();
    let mut agents: Vec<common::Proc> = (0..2)
        .map(|node| {
            let mut cmd = rdzv();
            cmd.arg("run")
                .args(["--rdzv-backend", "c10d", "--rdzv-endpoint", &endpoint])
                .args([
                    "--rdzv-id",
                    "c10d-job",
                    "--nnodes",
                    "2",
                    "--nproc-per-node",
                    "2",
                ])
                .args([
                    "--rdzv-conf",
                    "last_call_timeout=1",
                    "--local-addr",
                    "127.0.0.1",
                ])
                .arg("--")
                .arg(common::worker_bin())
                .env("WORKER_RECORD", &records[node])
                .current_dir(dir.path());
            common::Proc::spawn(cmd, dir.path(), &format!("node{node}"))
        })
        .collect();
    all_succeed_in_one_world(&mut agents, &records, 4);
    let served: usize = agents
        .iter()
        .filter(|a| a.stderr().contains("this node serves the job's rendezvous"))
        .count();
    assert_eq!(served, 1, "exactly one agent serves the rendezvous");
}

/// torchrun's single-node c10d form: `localhost:0` picks a free port.
#[test]
fn c10d_localhost_0_is_a_single_node_job_on_a_free_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = dir.path().join("records.txt");
    let mut cmd = rdzv();
    cmd.arg("run")
        .args(["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"])
        .args(["--nproc-per-node", "2"])
        .arg("--")
        .arg(common::worker_bin())
        .env("WORKER_RECORD", &record)
        .current_dir(dir.path());
    let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(common::Records::read(&[record]).dones.len(), 2, "{stderr}");
    let mut cmd = rdzv();
    cmd.arg("run")
        .args(["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"])
        .args(["--nnodes", "2", "--no-python", "true"]);
    let (code, _, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
    assert_eq!(code, 2, "port 0 on several nodes: {stderr}");
}

// ---- torchrun's rarer flags --------------------------------------------------------------

/// The one run directory under `log_dir` (`<run_id>_<random>`).
fn only_run_dir(log_dir: &Path) -> std::path::PathBuf {
    let runs: Vec<_> = std::fs::read_dir(log_dir)
        .expect("log dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    assert_eq!(runs.len(), 1, "one run directory: {runs:?}");
    runs[0].clone()
}

/// As torchrun's: the tee'd lines (of the ranks `--local-ranks-filter` shows) that contain any
/// of the filters (`,,` is a comma) are copied, prefixed, to `attempt_0/filtered_std*.log`;
/// lines that are not tee'd, or of a filtered-out rank, are not. `PET_*` gives the same.
#[test]
fn duplicate_filters_copy_matching_teed_lines_to_the_attempts_filtered_logs() {
    for via_env in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let log_dir = dir.path().join("logs");
        let log_dir_text = log_dir.display().to_string();
        let mut cmd = rdzv();
        cmd.args(["run", "--nproc-per-node", "3"])
            .args(["--tee", "0:3,1:3,2:2", "--local-ranks-filter", "0,2"])
            .args(["--log-dir", &log_dir_text]);
        if via_env {
            cmd.env("PET_DUPLICATE_STDOUT_FILTERS", "apple,or,,ange")
                .env("PET_DUPLICATE_STDERR_FILTERS", "pear");
        } else {
            cmd.args(["--duplicate-stdout-filters", "apple,or,,ange"])
                .args(["--duplicate-stderr-filters", "pear"]);
        }
        cmd.args([
            "--no-python",
            "sh",
            "-c",
            "echo apple-$RANK; echo or,ange-$RANK; echo orange-$RANK; echo pear-$RANK; \
             echo pear-err-$RANK >&2; echo plum-err-$RANK >&2",
        ])
        .current_dir(dir.path());
        let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
        assert_eq!(code, 0, "{stdout}\n{stderr}");
        let attempt = only_run_dir(&log_dir).join("attempt_0");
        let read = |name: &str| {
            let text = std::fs::read_to_string(attempt.join(name))
                .unwrap_or_else(|e| panic!("{name} ({e}); env: {via_env}\n{stderr}"));
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            lines.sort();
            lines
        };
        // Rank 0: stdout and stderr tee'd; rank 1: filtered out of the console; rank 2: only
        // stderr tee'd (its stdout is on the console, not tee'd).
        assert_eq!(
            read("filtered_stdout.log"),
            ["[default0]:apple-0", "[default0]:or,ange-0"],
            "env: {via_env}"
        );
        assert_eq!(
            read("filtered_stderr.log"),
            ["[default0]:pear-err-0", "[default2]:pear-err-2"],
            "env: {via_env}"
        );
    }
}

/// As torchrun's `--virtual-local-rank` (or `PET_VIRTUAL_LOCAL_RANK=1`): every worker gets
/// `LOCAL_RANK=0` and `CUDA_VISIBLE_DEVICES` its own device of the agent's list (or its local
/// rank if there is none); more workers than devices exit 2 before anything starts.
#[test]
fn virtual_local_rank_gives_each_worker_local_rank_0_and_its_own_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = "echo rank=$RANK local=$LOCAL_RANK cuda=${CUDA_VISIBLE_DEVICES--}";
    /// Flags, environment, the workers' lines.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], [&'a str; 2]);
    let cases: [Case; 3] = [
        (
            &["--virtual-local-rank"],
            &[("CUDA_VISIBLE_DEVICES", "4,6")],
            ["rank=0 local=0 cuda=4", "rank=1 local=0 cuda=6"],
        ),
        (
            &[],
            &[("PET_VIRTUAL_LOCAL_RANK", "1")],
            ["rank=0 local=0 cuda=0", "rank=1 local=0 cuda=1"],
        ),
        // Without the flag, torchrun's usual: the local rank, the devices inherited.
        (
            &[],
            &[("CUDA_VISIBLE_DEVICES", "4,6")],
            ["rank=0 local=0 cuda=4,6", "rank=1 local=1 cuda=4,6"],
        ),
    ];
    for (flags, env, expected) in cases {
        let mut cmd = rdzv();
        cmd.args(["run", "--nproc-per-node", "2"])
            .args(flags)
            .args(["--no-python", "sh", "-c", script])
            .env_remove("CUDA_VISIBLE_DEVICES")
            .env_remove("HIP_VISIBLE_DEVICES")
            .envs(env.iter().copied())
            .current_dir(dir.path());
        let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
        assert_eq!(code, 0, "{flags:?} {env:?}: {stdout}\n{stderr}");
        assert_eq!(lines_of(&stdout), expected, "{flags:?} {env:?}: {stderr}");
    }
    let mut cmd = rdzv();
    cmd.args(["run", "--nproc-per-node", "3", "--virtual-local-rank"])
        .args(["--no-python", "sh", "-c", "touch started"])
        .env("CUDA_VISIBLE_DEVICES", "4,6")
        .env_remove("HIP_VISIBLE_DEVICES")
        .current_dir(dir.path());
    let (code, _, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--virtual-local-rank") && stderr.contains("CUDA_VISIBLE_DEVICES=4,6"),
        "{stderr}"
    );
    assert!(!dir.path().join("started").exists(), "no worker started");
}

/// `--event-log-handler` (or `PET_EVENT_LOG_HANDLER`) takes torchrun's handler names; any
/// other exits 2 naming them.
#[test]
fn event_log_handler_takes_torchruns_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (flags, env) in [
        (&["--event-log-handler", "null"][..], None),
        (&["--event-log-handler", "console"][..], None),
        (&[][..], Some("dynamic_rendezvous")),
    ] {
        let mut cmd = rdzv();
        cmd.arg("run").args(flags).args(["--no-python", "true"]);
        if let Some(value) = env {
            cmd.env("PET_EVENT_LOG_HANDLER", value);
        }
        let (code, _, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
        assert_eq!(code, 0, "{flags:?} {env:?}: {stderr}");
    }
    let mut cmd = rdzv();
    cmd.args(["run", "--no-python", "true"])
        .env("PET_EVENT_LOG_HANDLER", "syslog");
    let (code, _, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("'syslog'") && stderr.contains("null, console, dynamic_rendezvous"),
        "{stderr}"
    );
}

/// torchrun's flags rdzv does not implement exit 2 with an error that names the flag and says
/// what to do instead, not clap's unknown-argument error (`--print-completion` needs no
/// training script, as in torchrun).
#[test]
fn unsupported_torchrun_flags_exit_2_naming_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (args, flag, hint) in [
        (
            &["--numa-binding", "node", "--no-python", "touch", "started"][..],
            "--numa-binding",
            "numactl",
        ),
        (
            &["--logs-specs", "custom", "--no-python", "touch", "started"][..],
            "--logs-specs",
            "--log-dir",
        ),
        (
            &["--print-completion", "bash"][..],
            "--print-completion",
            "same names",
        ),
        (
            &["--numa_binding=socket", "--no-python", "touch", "started"][..],
            "--numa-binding",
            "numactl",
        ),
    ] {
        let mut cmd = rdzv();
        cmd.arg("run").args(args).current_dir(dir.path());
        let (code, _, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("rdzv run does not support {flag}:")) && stderr.contains(hint),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.contains("unexpected argument"),
            "{args:?}: {stderr}"
        );
        assert!(
            !dir.path().join("started").exists(),
            "{args:?}: a worker started"
        );
    }
}
