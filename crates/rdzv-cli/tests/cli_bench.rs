//! Tests of `rdzv bench`: small job sizes, each run with its own etcd.

use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Upper bound of one `rdzv bench` run in these tests.
const WAIT: Duration = Duration::from_secs(120);

/// Runs `rdzv bench` with `args` to completion, bounded by [`WAIT`].
fn bench(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_rdzv"))
        .arg("bench")
        .args(args)
        .env("NO_COLOR", "1")
        .env("RDZV_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run rdzv bench");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(output) => output.expect("cannot wait for rdzv bench"),
        Err(_) => {
            // SAFETY: kill(2) only takes integers.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("rdzv bench (pid {pid}) did not finish within {WAIT:?}");
        }
    }
}

/// The JSON lines of a successful run.
fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "rdzv bench failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\nstderr:\n{stderr}"))
        })
        .collect()
}

fn num(line: &serde_json::Value, key: &str) -> f64 {
    line.get(key)
        .and_then(serde_json::Value::as_f64)
        .unwrap_or_else(|| panic!("no number {key:?} in {line}"))
}

/// Checks the fields every line has, for a measured round of `participants` nodes.
fn check_line(line: &serde_json::Value, participants: usize, max_requests_per_node: f64) {
    assert!(line.get("error").is_none(), "{line}");
    assert_eq!(num(line, "participants") as usize, participants, "{line}");
    assert_eq!(
        num(line, "ranked") as usize,
        participants,
        "not all ranked: {line}"
    );
    let wall = num(line, "wall_s");
    let last = num(line, "last_join_to_ranked_s");
    let (p50, p99) = (num(line, "p50_s"), num(line, "p99_s"));
    assert!(wall > 0.0 && wall < 60.0, "wall_s: {line}");
    assert!(
        (0.0..=wall).contains(&last),
        "last_join_to_ranked_s: {line}"
    );
    assert!(
        p50 > 0.0 && p50 <= p99 && p99 <= wall + 1e-6,
        "p50/p99: {line}"
    );
    let requests = num(line, "requests");
    assert!(requests > 0.0, "requests: {line}");
    let per_node = num(line, "requests_per_node");
    assert!(
        (per_node - requests / participants as f64).abs() < 1e-6,
        "requests_per_node: {line}"
    );
    assert!(
        per_node <= max_requests_per_node,
        "{per_node} requests per node (at most {max_requests_per_node} expected): {line}"
    );
    assert!(num(line, "watch_events") >= 0.0, "watch_events: {line}");
    let cpu = num(line, "cpu_s");
    assert!((0.0..60.0).contains(&cpu), "cpu_s: {line}");
    assert!(num(line, "peak_rss_bytes") > 1e6, "peak_rss_bytes: {line}");
    assert!(
        num(line, "etcd_cpu_s") >= 0.0,
        "etcd_cpu_s (own etcd): {line}"
    );
}

#[test]
fn bench_full_rounds_one_json_line_per_size() {
    let out = bench(&["--nodes", "2,4", "--json"]);
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 2, "one line per job size: {lines:?}");
    for (line, n) in lines.iter().zip([2usize, 4]) {
        assert_eq!(num(line, "nodes") as usize, n, "{line}");
        assert_eq!(line["scenario"], "full", "{line}");
        assert_eq!(num(line, "round") as u64, 1, "{line}");
        // join, ctl watch, assignment read, membership watch; plus the finaliser's few.
        check_line(line, n, 6.0);
        assert!(
            num(&line["etcd_requests"], "rpcs") >= n as f64,
            "etcd's own count: {line}"
        );
    }
}

/// Each member's assignment comes on the watch it waits on, and its membership watch goes on
/// that watch's stream: etcd serves one watch stream per node and no read per node (before:
/// two streams and one assignment read per node). A member whose assignment came just after
/// `final` reads it; a few may.
#[test]
fn bench_a_round_costs_one_watch_stream_and_no_assignment_read_per_node() {
    let n = 16;
    let out = bench(&["--nodes", &n.to_string(), "--json"]);
    let lines = json_lines(&out);
    let etcd = &lines[0]["etcd_requests"];
    let streams = num(etcd, "watch_streams");
    assert!(
        streams >= n as f64 && streams <= (n + n / 4) as f64,
        "about one watch stream per node: {etcd}"
    );
    // The finaliser's read of the join records, and a few fallbacks at most.
    assert!(num(etcd, "range") <= (1 + n / 4) as f64, "{etcd}");
}

/// `--profile` printed nothing once the finaliser's debug event was renamed: the phases
/// are read from the library's events, so a test must see them.
#[test]
fn bench_profile_reports_the_phases_of_the_round() {
    let out = bench(&["--nodes", "4", "--profile", "--json"]);
    let lines = json_lines(&out);
    let line = &lines[0];
    let phases = &line["phases"];
    assert!(phases.is_object(), "no phases with --profile: {line}");
    let wall = num(line, "wall_s");
    for key in ["join_p50_s", "all_joined_s", "finalised_s", "notify_max_s"] {
        let v = num(phases, key);
        assert!(
            (0.0..=wall).contains(&v),
            "phase {key} = {v} outside 0..wall {wall}: {line}"
        );
    }
    assert!(
        num(phases, "all_joined_s") <= num(phases, "finalised_s"),
        "the round was finalised before all had joined: {line}"
    );
}

/// `etcd-limit`: the request mix of a round without the protocol, phase by phase, each
/// phase taking time and every client served (one transaction, watch and read each).
#[test]
fn bench_etcd_limit_times_the_request_mix_of_a_round() {
    let out = bench(&["--nodes", "8", "--scenario", "etcd-limit", "--json"]);
    let lines = json_lines(&out);
    let line = &lines[0];
    assert_eq!(line["scenario"], "etcd-limit", "{line}");
    let limit = &line["limit"];
    let mut sum = 0.0;
    for key in ["txn_s", "watch_s", "notify_s", "range_s"] {
        let v = num(limit, key);
        assert!(v > 0.0, "phase {key} took no time: {line}");
        sum += v;
    }
    assert!(
        (num(line, "wall_s") - sum).abs() < 1e-6,
        "wall_s is the sum of the phases: {line}"
    );
    // One transaction, one watch creation and one read per client.
    assert_eq!(num(line, "requests") as u64, 3 * 8 + 1, "{line}");
    assert_eq!(num(line, "watch_creates") as u64, 8, "{line}");
    assert_eq!(num(&line["etcd_requests"], "txn") as u64, 8 + 1, "{line}");
}

/// `idle`: a running job of 6 nodes over one lease TTL sends lease renewals and nothing else
/// (no request, no watch event), and the table gives the rates on a line below.
#[test]
fn bench_idle_measures_what_a_running_job_costs_per_second() {
    let out = bench(&["--nodes", "6", "--scenario", "idle", "--ttl", "2", "--json"]);
    let lines = json_lines(&out);
    let line = &lines[0];
    assert_eq!(line["scenario"], "idle", "{line}");
    assert!(num(line, "wall_s") >= 2.0, "the window is one TTL: {line}");
    // A lease is renewed every third of its TTL: about 3 renewals per node in the window.
    let renewals = num(line, "keep_alives") as u64;
    assert!(
        (6..=5 * 6).contains(&renewals),
        "{renewals} renewals of 6 leases in one TTL: {line}"
    );
    assert_eq!(num(line, "requests") as u64, 0, "churn: {line}");
    assert_eq!(num(line, "watch_events") as u64, 0, "churn: {line}");
    assert!(num(line, "etcd_cpu_s") >= 0.0, "{line}");

    let out = bench(&["--nodes", "2", "--scenario", "idle", "--ttl", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().any(|l| l.starts_with("  idle for ")
            && l.contains("lease renewals/s")
            && l.contains("of a core")),
        "no rates line: {stdout}"
    );
}

/// With `--runs 3` the line is the median, and it lists every run's wall time, sorted, so
/// that what the median hides can be seen.
#[test]
fn bench_reports_the_wall_time_of_every_run() {
    let out = bench(&["--nodes", "4", "--runs", "3", "--json"]);
    let lines = json_lines(&out);
    let line = &lines[0];
    let walls: Vec<f64> = line["wall_runs_s"]
        .as_array()
        .unwrap_or_else(|| panic!("no wall_runs_s: {line}"))
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .collect();
    assert_eq!(walls.len(), 3, "{line}");
    assert!(walls.windows(2).all(|w| w[0] <= w[1]), "sorted: {line}");
    assert_eq!(
        walls[1],
        num(line, "wall_s"),
        "the median is the middle run: {line}"
    );

    let out = bench(&["--nodes", "2", "--runs", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().any(|l| l.starts_with("  runs: wall_s ")),
        "no runs line: {stdout}"
    );
}

/// The table's first line names the etcd version measured (3.4 and 3.5 differ by 2x at
/// 4,096 nodes).
#[test]
fn bench_names_the_version_of_its_etcd() {
    let out = bench(&["--nodes", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first = stdout.lines().next().unwrap_or_default();
    let version = first
        .split("own etcd ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_default();
    assert!(
        version.split('.').count() == 3 && version.split('.').all(|p| p.parse::<u32>().is_ok()),
        "no etcd version in the header: {first:?}"
    );
}

#[test]
fn bench_leave_reforms_the_round_without_the_leaver() {
    let out = bench(&["--nodes", "4", "--scenario", "leave", "--json"]);
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["scenario"], "leave", "{line}");
    assert_eq!(num(line, "nodes") as usize, 4, "{line}");
    assert_eq!(num(line, "round") as u64, 2, "{line}");
    // Plus the check that the lost peer was a member.
    check_line(line, 3, 8.0);
    let detect = num(line, "detect_p50_s");
    assert!(
        (0.0..5.0).contains(&detect),
        "a leave is seen at once: {line}"
    );
}

/// Whether process `pid` is still a `rdzv bench-child` that has not exited (a zombie has).
fn child_alive(pid: u64) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .unwrap_or("");
    String::from_utf8_lossy(&cmdline).contains("bench-child") && state != "Z"
}

/// The `rdzv bench-child` processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .filter(|&pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            ppid == Some(parent) && child_alive(pid)
        })
        .collect()
}

/// Polls `cond` every 20 ms until it holds (true) or `limit` passes (false).
fn poll(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

#[test]
fn bench_processes_spread_the_participants_over_children() {
    let out = bench(&["--nodes", "16", "--processes", "3", "--json"]);
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["scenario"], "full", "{line}");
    assert_eq!(num(line, "round") as u64, 1, "{line}");
    // Ranks checked across the processes (else the line would be an error).
    check_line(line, 16, 6.0);
    assert_eq!(num(line, "processes") as usize, 3, "{line}");
    assert_eq!(num(line, "connections") as usize, 16, "one each: {line}");
    let rss_per_node = num(line, "rss_per_node_bytes");
    assert!(
        rss_per_node > 0.0 && (rss_per_node - num(line, "peak_rss_bytes") / 16.0).abs() <= 1.0,
        "rss_per_node_bytes: {line}"
    );
    let cpu_per_node = num(line, "cpu_per_node_s");
    assert!(
        cpu_per_node > 0.0 && (cpu_per_node - num(line, "cpu_s") / 16.0).abs() < 1e-9,
        "cpu_per_node_s: {line}"
    );
    // etcd's own counters: every participant joined (a Txn) and watched its round (a watch
    // stream, which also brings its rank).
    let etcd = &line["etcd_requests"];
    for (key, at_least) in [
        ("rpcs", 32.0),
        ("txn", 16.0),
        ("watch_streams", 16.0),
        ("proposals_committed", 16.0),
    ] {
        assert!(num(etcd, key) >= at_least, "etcd_requests.{key}: {line}");
    }
    // Every child is gone once the line is printed.
    check_children_gone(line, 3);
}

/// The child process ids of a `--processes` line, each checked gone.
fn check_children_gone(line: &serde_json::Value, processes: usize) {
    let pids: Vec<u64> = line["child_pids"]
        .as_array()
        .unwrap_or_else(|| panic!("no child_pids: {line}"))
        .iter()
        .map(|p| p.as_u64().expect("a pid"))
        .collect();
    assert_eq!(pids.len(), processes, "{line}");
    for pid in pids {
        assert!(!child_alive(pid), "child {pid} outlived the bench: {line}");
    }
}

#[test]
fn bench_processes_reform_rounds_after_a_crash_a_leave_and_a_newcomer() {
    let out = bench(&[
        "--nodes",
        "6",
        "--processes",
        "3",
        "--scenario",
        "kill,freeze,leave,scale-up",
        "--ttl",
        "2",
        "--json",
    ]);
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 4, "{lines:?}");
    // A frozen process closes nothing: only its lease (TTL 2 s) tells.
    let freeze = &lines[1];
    assert_eq!(freeze["scenario"], "freeze", "{freeze}");
    check_line(freeze, 5, 8.0);
    let detect = num(freeze, "detect_max_s");
    assert!((1.0..10.0).contains(&detect), "detect_max_s: {freeze}");
    assert_eq!(
        num(&freeze["etcd_requests"], "lease_revoke") as u64,
        0,
        "nobody revokes a frozen node's lease: {freeze}"
    );
    check_children_gone(freeze, 3);
    let lines: Vec<_> = [0, 2, 3].iter().map(|i| lines[*i].clone()).collect();
    for (line, (scenario, participants)) in
        lines
            .iter()
            .zip([("kill", 5usize), ("leave", 5), ("scale-up", 6)])
    {
        assert_eq!(line["scenario"], scenario, "{line}");
        assert_eq!(num(line, "round") as u64, 2, "{line}");
        check_line(line, participants, 8.0);
        assert_eq!(num(line, "processes") as usize, 3, "{line}");
        let detect = num(line, "detect_max_s");
        if scenario == "kill" {
            // The killed process's watcher sees its probe connection close and revokes its
            // lease, before the lease (TTL 2 s) could expire.
            assert!((0.0..1.5).contains(&detect), "detect_max_s: {line}");
        } else {
            assert!((0.0..5.0).contains(&detect), "detect_max_s: {line}");
        }
        assert!(
            num(&line["etcd_requests"], "txn") >= participants as f64,
            "{line}"
        );
        check_children_gone(line, 3);
    }
    // A crash's lease is revoked by its watcher (the peer probe); a graceful leave revokes
    // its own.
    assert_eq!(
        num(&lines[0]["etcd_requests"], "lease_revoke") as u64,
        1,
        "{}",
        lines[0]
    );
    assert_eq!(
        num(&lines[1]["etcd_requests"], "lease_revoke") as u64,
        1,
        "{}",
        lines[1]
    );
}

#[test]
fn bench_children_exit_with_their_parent() {
    // An etcd that never answers (connections wait in the backlog): the children stay in
    // their setup until their parent dies.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("cannot bind");
    let endpoint = silent.local_addr().expect("no address").to_string();
    let mut parent = Command::new(env!("CARGO_BIN_EXE_rdzv"))
        .args(["bench", "--nodes", "4", "--processes", "2", "--json"])
        .args(["--rdzv-endpoint", &endpoint])
        .env("RDZV_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot run rdzv bench");
    let pid = parent.id();
    let mut children = Vec::new();
    let found = poll(Duration::from_secs(30), || {
        children = children_of(pid);
        children.len() == 2
    });
    let _ = parent.kill();
    let _ = parent.wait();
    assert!(found, "the bench did not start 2 children: {children:?}");
    assert!(
        poll(Duration::from_secs(10), || children
            .iter()
            .all(|&c| !child_alive(c))),
        "children {children:?} outlived their parent"
    );
}

#[test]
fn bench_processes_bad_input_is_a_usage_error() {
    for (args, message) in [
        (&["--processes", "0"][..], "--processes must be at least 1"),
        (
            &["--nodes", "2,8", "--processes", "3"],
            "more than --nodes 2",
        ),
        (
            &["--nodes", "4", "--processes", "2", "--connections", "2"],
            "--connections",
        ),
        (
            &["--nodes", "4", "--processes", "2", "--profile"],
            "--profile",
        ),
        (
            &["--nodes", "4", "--processes", "2", "--scenario", "exit"],
            "--processes supports only",
        ),
        (
            &["--nodes", "4", "--processes", "1", "--scenario", "kill"],
            "needs at least 2 processes",
        ),
        (
            &["--nodes", "4", "--scenario", "freeze"],
            "the freeze scenario needs --processes",
        ),
    ] {
        let out = bench(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

/// A bench stopped by a signal (Ctrl-C, or `kill`, while a long round runs) left its etcd's
/// data directory in `/tmp`: the process died before the etcd it started was dropped. It now
/// stops cleanly, exits 128 + N and leaves nothing behind.
#[test]
fn a_bench_stopped_by_a_signal_leaves_no_etcd_data_behind() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let etcd_dirs = || {
            std::fs::read_dir(tmp.path())
                .expect("read tmp")
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("rdzv-etcd"))
                .count()
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_rdzv"))
            .args(["bench", "--nodes", "4", "--scenario", "last-call"])
            .args(["--last-call", "60"])
            .env("TMPDIR", tmp.path())
            .env("RDZV_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run rdzv bench");
        assert!(
            poll(Duration::from_secs(30), || etcd_dirs() == 1),
            "the bench's etcd data directory never appeared in TMPDIR"
        );
        // SAFETY: kill(2) only takes integers.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let mut status = None;
        assert!(
            poll(Duration::from_secs(20), || {
                status = child.try_wait().expect("wait");
                status.is_some()
            }),
            "the bench did not stop within 20 s of signal {signal}"
        );
        assert_eq!(status.and_then(|s| s.code()), Some(128 + signal));
        assert_eq!(
            etcd_dirs(),
            0,
            "signal {signal} left the etcd data directory behind"
        );
    }
}
