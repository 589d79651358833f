//! Signals, as torchrun's `--signals-to-handle`: SIGTERM, SIGINT, SIGHUP and SIGQUIT stop the
//! agent (exit 128 + N) after forwarding them to the workers, which get the grace period
//! (`--grace-period`, torchrun's `TORCH_ELASTIC_SHUTDOWN_TIMEOUT`); SIGUSR1 and SIGUSR2 are
//! forwarded to the workers and the agent goes on (SLURM's pre-emption warning). Static
//! single-node jobs (no etcd) with shell workers.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{kill, rdzv, run_to_end, wait_until, Proc, WAIT};

/// A worker that writes `ready-<RANK>`, records the signals it gets in `got-<RANK>` and exits 0
/// on SIGUSR1 (`usr1_exits`) or goes on; it ignores SIGTERM if `ignore_term`.
fn worker(dir: &Path, usr1_exits: bool, ignore_term: bool) -> String {
    let d = dir.display();
    let usr1 = if usr1_exits {
        format!("echo USR1 >> {d}/got-$RANK; exit 0")
    } else {
        format!("echo USR1 >> {d}/got-$RANK")
    };
    let term = if ignore_term {
        "trap '' TERM; ".to_string()
    } else {
        String::new()
    };
    format!(
        "{term}trap '{usr1}' USR1; trap 'echo QUIT >> {d}/got-$RANK; exit 3' QUIT; \
         echo ready > {d}/ready-$RANK; while :; do sleep 0.05; done"
    )
}

fn agent(dir: &Path, flags: &[&str], script: &str) -> Proc {
    let mut cmd = rdzv();
    cmd.arg("run")
        .args(["--nproc-per-node", "2"])
        .args(flags)
        .args(["--no-python", "sh", "-c", script])
        .current_dir(dir);
    Proc::spawn(cmd, dir, "agent")
}

fn wait_ready(dir: &Path, agent: &Proc) {
    wait_until(
        WAIT,
        || format!("both workers ready\n{}", agent.describe()),
        || (0..2).all(|r| dir.join(format!("ready-{r}")).exists()),
    );
}

fn got(dir: &Path, rank: usize) -> String {
    std::fs::read_to_string(dir.join(format!("got-{rank}"))).unwrap_or_default()
}

#[test]
fn sigusr1_is_forwarded_to_the_workers_and_the_agent_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = agent(dir.path(), &[], &worker(dir.path(), true, false));
    wait_ready(dir.path(), &a);
    assert!(kill(a.pid, libc::SIGUSR1), "signal the agent");
    // The workers exit 0 on SIGUSR1: the job succeeds, the agent was not killed by it.
    let code = a.exit_code(WAIT);
    assert_eq!(code, 0, "{}", a.describe());
    for rank in 0..2 {
        assert_eq!(got(dir.path(), rank).trim(), "USR1", "{}", a.describe());
    }
}

#[test]
fn sigquit_stops_the_agent_after_forwarding_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = agent(dir.path(), &[], &worker(dir.path(), false, false));
    wait_ready(dir.path(), &a);
    assert!(kill(a.pid, libc::SIGQUIT), "signal the agent");
    let code = a.exit_code(WAIT);
    assert_eq!(code, 128 + libc::SIGQUIT, "{}", a.describe());
    for rank in 0..2 {
        assert!(got(dir.path(), rank).contains("QUIT"), "{}", a.describe());
    }
}

#[test]
fn a_listed_sigusr1_stops_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = agent(
        dir.path(),
        &[
            "--signals-to-handle",
            "SIGTERM,SIGUSR1",
            "--grace-period",
            "1",
        ],
        &worker(dir.path(), false, false),
    );
    wait_ready(dir.path(), &a);
    assert!(kill(a.pid, libc::SIGUSR1), "signal the agent");
    let code = a.exit_code(WAIT);
    assert_eq!(code, 128 + libc::SIGUSR1, "{}", a.describe());
    assert!(got(dir.path(), 0).contains("USR1"), "forwarded first");
}

/// torchrun reads its grace period from `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` (30 s by default):
/// workers that ignore SIGTERM are SIGKILLed after it.
#[test]
fn the_grace_period_comes_from_torch_elastic_shutdown_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = rdzv();
    cmd.arg("run")
        .args(["--nproc-per-node", "2"])
        .args(["--no-python", "sh", "-c", &worker(dir.path(), false, true)])
        .env("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "1")
        .current_dir(dir.path());
    let mut a = Proc::spawn(cmd, dir.path(), "agent");
    wait_ready(dir.path(), &a);
    let sent = Instant::now();
    assert!(kill(a.pid, libc::SIGTERM), "signal the agent");
    let code = a.exit_code(WAIT);
    assert_eq!(code, 143, "{}", a.describe());
    assert!(
        sent.elapsed() < Duration::from_secs(15),
        "the 1 s grace period of TORCH_ELASTIC_SHUTDOWN_TIMEOUT was not used: {:?}",
        sent.elapsed()
    );
    assert!(
        sent.elapsed() >= Duration::from_millis(900),
        "workers ignoring SIGTERM got their grace period: {:?}",
        sent.elapsed()
    );
}

#[test]
fn unknown_signals_to_handle_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = rdzv();
    cmd.args([
        "run",
        "--signals-to-handle",
        "SIGKILL",
        "--no-python",
        "true",
    ]);
    let (code, _, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("SIGKILL") && stderr.contains("SIGUSR1"),
        "{stderr}"
    );
}

/// `--shutdown-timeout` (torchrun 2.15's flag; `--grace-period` is rdzv's older name) wins
/// over `TORCH_ELASTIC_SHUTDOWN_TIMEOUT`.
#[test]
fn the_shutdown_timeout_flag_wins_over_the_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = rdzv();
    cmd.arg("run")
        .args(["--nproc-per-node", "2", "--shutdown-timeout", "1"])
        .args(["--no-python", "sh", "-c", &worker(dir.path(), false, true)])
        .env("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
        .current_dir(dir.path());
    let mut a = Proc::spawn(cmd, dir.path(), "agent");
    wait_ready(dir.path(), &a);
    let sent = Instant::now();
    assert!(kill(a.pid, libc::SIGTERM), "signal the agent");
    assert_eq!(a.exit_code(WAIT), 143, "{}", a.describe());
    assert!(
        sent.elapsed() < Duration::from_secs(15),
        "{:?}",
        sent.elapsed()
    );
}

/// The names of the entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The pids of the processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|it| {
            it.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `rdzv run --standalone` starts a throw-away etcd whose data directory is in `$TMPDIR`
/// (`rdzv-etcd-*`). Stopped by any of torchrun's default `--signals-to-handle`, the agent
/// forwards the signal to its workers, exits 128 + N (README, exit codes) and leaves neither
/// that directory nor the etcd behind. The log directory (`$TMPDIR/torchelastic_*`) is kept on
/// purpose, as torchrun keeps its /tmp/torchelastic_*: the workers' logs outlive the job.
#[test]
fn a_standalone_agent_stopped_by_a_signal_leaves_no_etcd_data_behind() {
    for (name, signo) in [
        ("TERM", libc::SIGTERM),
        ("INT", libc::SIGINT),
        ("HUP", libc::SIGHUP),
        ("QUIT", libc::SIGQUIT),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).expect("TMPDIR");
        let d = dir.path().display();
        let traps: String = ["TERM", "INT", "HUP", "QUIT"]
            .iter()
            .map(|s| format!("trap 'echo {s} >> {d}/got-$RANK; exit 0' {s}; "))
            .collect();
        let script = format!("{traps}echo ready > {d}/ready-$RANK; while :; do sleep 0.05; done");
        let mut cmd = rdzv();
        cmd.args(["run", "--standalone", "--nproc-per-node", "2"])
            .args(["--no-python", "sh", "-c", &script])
            .env("TMPDIR", &tmp)
            .current_dir(dir.path());
        let mut a = Proc::spawn(cmd, dir.path(), "agent");
        wait_ready(dir.path(), &a);
        let running = entries(&tmp);
        assert!(
            running.iter().any(|n| n.starts_with("rdzv-etcd-"))
                && running.iter().any(|n| n.starts_with("torchelastic_")),
            "SIG{name}: the etcd data and log directories are in TMPDIR while the job runs: \
             {running:?}\n{}",
            a.describe()
        );
        assert!(kill(a.pid, signo), "signal the agent");
        let code = a.exit_code(WAIT);
        assert_eq!(code, 128 + signo, "SIG{name}: {}", a.describe());
        for rank in 0..2 {
            assert_eq!(
                got(dir.path(), rank).trim(),
                name,
                "SIG{name}: worker {rank} got it\n{}",
                a.describe()
            );
        }
        let left = entries(&tmp);
        assert!(
            left.len() == 1 && left[0].starts_with("torchelastic_"),
            "SIG{name}: only the log directory is left in TMPDIR, no etcd data: {left:?}\n{}",
            a.describe()
        );
        assert!(
            tmp.join(&left[0])
                .read_dir()
                .is_ok_and(|mut d| d.next().is_some()),
            "SIG{name}: the kept log directory holds the run's logs"
        );
        let tmp_text = tmp.display().to_string();
        assert_eq!(
            processes_mentioning(&tmp_text),
            Vec::<u32>::new(),
            "SIG{name}: no etcd (nor anything else started with its data dir) is left"
        );
    }
}
