//! Bad input on the command line (issue 10): every usage or configuration error exits 2 with a
//! message naming the culprit, in every subcommand, and is found before anything is started or
//! connected to (the endpoint given is a closed port: a command that tried to connect would
//! fail later with a connection error and exit 1). Runtime failures keep exit code 1.

mod common;

use std::time::{Duration, Instant};

use common::{rdzv, run_to_end, Etcd, WAIT};

/// A closed port: connecting fails (with exit code 1), so exit code 2 proves the error was found
/// before connecting.
const CLOSED: &str = "127.0.0.1:1";

/// Usage errors are found before any connection attempt or etcd start: well within this.
const QUICK: Duration = Duration::from_secs(5);

const HUGE: &str = "18446744073709551615";

/// Runs `rdzv <args>`; returns (exit code, stdout, stderr, how long it took).
fn rdzv_run(args: &[&str]) -> (i32, String, String, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = rdzv();
    cmd.args(args);
    let started = Instant::now();
    let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "rdzv", WAIT);
    (code, stdout, stderr, started.elapsed())
}

/// Asserts that `rdzv <args>` exits 2 at once, prints nothing on stdout and names every one of
/// `needles` on stderr.
fn assert_usage_error(args: &[&str], needles: &[&str]) {
    let (code, stdout, stderr, took) = rdzv_run(args);
    let what = format!("rdzv {}", args.join(" "));
    assert_eq!(
        code, 2,
        "{what}: exit code; stdout {stdout:?}; stderr:\n{stderr}"
    );
    assert!(stdout.is_empty(), "{what}: stdout {stdout:?}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{what}: stderr does not name {needle:?}:\n{stderr}"
        );
    }
    assert!(
        !stderr.contains("panicked"),
        "{what}: a panic is not a usage error:\n{stderr}"
    );
    assert!(took < QUICK, "{what}: took {took:?}; did it connect?");
}

/// The rendezvous target of `run`, `join`, `status` and `close`, with `extra` (flags or a
/// `--rdzv-conf`) and a command for `run`.
fn target_args<'a>(
    sub: &'a str,
    endpoint: &'a str,
    id: Option<&'a str>,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![sub, "--rdzv-endpoint", endpoint];
    if let Some(id) = id {
        args.extend(["--rdzv-id", id]);
    }
    args.extend(extra);
    if sub == "run" {
        args.extend(["--", "true"]);
    }
    args
}

const TARGET_SUBCOMMANDS: [&str; 4] = ["run", "join", "status", "close"];

/// Bad input (issue 10): configuration errors found after clap's parsing (bad endpoint, bad
/// `--rdzv-conf` value, unknown or duplicate key, missing run id, ...) exited 1, like a
/// runtime failure, or were not found at all; they exit 2 in every subcommand.
#[test]
fn configuration_errors_exit_2_naming_the_culprit_in_every_subcommand() {
    let conf = |c: &'static str| vec!["--rdzv-conf", c];
    /// Endpoint, run id, extra flags, what stderr must name.
    type Case = (
        &'static str,
        Option<&'static str>,
        Vec<&'static str>,
        Vec<&'static str>,
    );
    let cases: Vec<Case> = vec![
        (":::", Some("job"), vec![], vec![":::"]),
        ("[:::]:1", Some("job"), vec![], vec![":::"]),
        ("1.2.3.4.5", Some("job"), vec![], vec!["1.2.3.4.5"]),
        ("a..b:2379", Some("job"), vec![], vec!["a..b"]),
        ("host:", Some("job"), vec![], vec!["host:"]),
        ("h:0", Some("job"), vec![], vec!["h:0"]),
        (CLOSED, None, vec![], vec!["--rdzv-id"]),
        (CLOSED, Some("a/b"), vec![], vec!["a/b"]),
        ("", Some("job"), vec![], vec!["--rdzv-endpoint"]),
        (
            CLOSED,
            Some("job"),
            vec!["--rdzv-backend", "zookeeper"],
            vec!["zookeeper"],
        ),
        (CLOSED, Some("job"), conf("timeout"), vec!["timeout"]),
        (
            CLOSED,
            Some("job"),
            conf("timeout=abc"),
            vec!["'timeout'", "abc"],
        ),
        (
            CLOSED,
            Some("job"),
            conf("timeout=18446744073709551615"),
            vec!["'timeout'", "7d"],
        ),
        (
            CLOSED,
            Some("job"),
            conf("timeout=0"),
            vec!["'timeout'", "1ms to 7d"],
        ),
        (
            CLOSED,
            Some("job"),
            conf("last_call_timeout=18446744073709551615"),
            vec!["'last_call_timeout'", "7d"],
        ),
        (
            CLOSED,
            Some("job"),
            conf("retention=400d"),
            vec!["'retention'", "365d"],
        ),
        (
            CLOSED,
            Some("job"),
            conf("keep_alive_ttl=1"),
            vec!["'keep_alive_ttl'", "2s"],
        ),
        (
            CLOSED,
            Some("job"),
            conf("connect_timeout=0"),
            vec!["'connect_timeout'"],
        ),
        (
            CLOSED,
            Some("job"),
            conf("protocol=ftp"),
            vec!["protocol", "ftp"],
        ),
        (
            CLOSED,
            Some("job"),
            conf("max_txn_ops=2"),
            vec!["max_txn_ops"],
        ),
        (CLOSED, Some("job"), conf("node_rank=-1"), vec!["node_rank"]),
        (
            CLOSED,
            Some("job"),
            conf("etcd_prefix=rdzv"),
            vec!["etcd_prefix"],
        ),
        (
            CLOSED,
            Some("job"),
            conf("cert=/x.pem"),
            vec!["cert", "key"],
        ),
        (
            CLOSED,
            Some("job"),
            conf("username=u"),
            vec!["username", "password"],
        ),
        (
            CLOSED,
            Some("job"),
            conf("timeuot=60"),
            vec![
                "timeuot",
                "did you mean 'timeout'",
                "last_call_timeout",
                "keep_alive_ttl",
            ],
        ),
        (
            CLOSED,
            Some("job"),
            conf("ca_cert=/ca.pem"),
            vec!["ca_cert", "cacert"],
        ),
        (
            CLOSED,
            Some("job"),
            conf("timeout=60,timeout=30"),
            vec!["timeout", "more than once"],
        ),
    ];
    for sub in TARGET_SUBCOMMANDS {
        for (endpoint, id, extra, needles) in &cases {
            if sub == "run" && endpoint.is_empty() {
                // No endpoint is torchrun's static single-node job for `run` (cli_launch).
                continue;
            }
            assert_usage_error(&target_args(sub, endpoint, *id, extra), needles);
        }
    }
}

/// Bad input (issue 10): `--monitor-interval 0` panicked after the workers started (a tokio
/// interval of 0) and `--exit-barrier-timeout 18446744073709551615` overflowed an `Instant`;
/// every duration flag is bounded at parse time, naming the flag and the range.
#[test]
fn duration_flags_are_bounded_naming_the_flag_and_the_range() {
    for (flag, value, range) in [
        ("--monitor-interval", "0", "1ms to 1h"),
        ("--monitor-interval", "2h", "1ms to 1h"),
        ("--exit-barrier-timeout", HUGE, "0s to 7d"),
        ("--shutdown-timeout", HUGE, "0s to 7d"),
        ("--shutdown-timeout", "-1", "negative"),
    ] {
        let arg = format!("{flag}={value}");
        assert_usage_error(
            &target_args("run", CLOSED, Some("job"), &[&arg]),
            &[flag, range],
        );
    }
    for value in [HUGE, "0", "8d"] {
        assert_usage_error(
            &["etcd", "--ready-timeout", value],
            &["--ready-timeout", "1ms to 7d"],
        );
    }
}

/// `rdzv run --standalone` checks its configuration before it starts its etcd.
#[test]
fn standalone_checks_the_configuration_before_starting_etcd() {
    for (conf, needle) in [
        ("timeuot=60", "timeuot"),
        ("timeout=18446744073709551615", "'timeout'"),
    ] {
        assert_usage_error(
            &["run", "--standalone", "--rdzv-conf", conf, "--", "true"],
            &[needle],
        );
    }
}

/// `rdzv bench` checks its flags and configuration before it starts etcd or connects.
#[test]
fn bench_usage_errors_exit_2_before_starting_anything() {
    for (args, needles) in [
        (vec!["--rdzv-conf", "timeuot=1"], vec!["timeuot"]),
        (
            vec!["--rdzv-conf", "timeout=1,timeout=2"],
            vec!["more than once"],
        ),
        (vec!["--rdzv-conf", "max_txn_ops=x"], vec!["max_txn_ops"]),
        (vec!["--rdzv-endpoint", ":::"], vec![":::"]),
        (vec!["--round-timeout", HUGE], vec!["--round-timeout"]),
        (vec!["--round-timeout", "0"], vec!["--round-timeout"]),
        (vec!["--ttl", "1"], vec!["--ttl"]),
        (vec!["--ttl", HUGE], vec!["--ttl"]),
        (vec!["--last-call", "1e300"], vec!["--last-call"]),
        (vec!["--last-call=-1"], vec!["--last-call"]),
        (vec!["--nodes", "0"], vec!["--nodes"]),
        (vec!["--runs", "0"], vec!["--runs"]),
        (
            vec!["--rdzv-endpoint", CLOSED, "--etcd-arg=--x"],
            vec!["--etcd-arg"],
        ),
    ] {
        let mut all = vec!["bench"];
        all.extend(args);
        assert_usage_error(&all, &needles);
    }
}

/// Runtime failures keep exit code 1: etcd unreachable.
#[test]
fn an_unreachable_etcd_exits_2() {
    for sub in TARGET_SUBCOMMANDS {
        let args = target_args(
            sub,
            CLOSED,
            Some("job"),
            &["--rdzv-conf", "connect_timeout=1"],
        );
        let (code, stdout, stderr, _) = rdzv_run(&args);
        assert_eq!(
            code,
            2,
            "rdzv {}: stdout {stdout:?}; stderr:\n{stderr}",
            args.join(" ")
        );
        assert!(stderr.contains("127.0.0.1:1"), "{sub}: {stderr}");
    }
}

/// The keys PyTorch's other backends take are accepted with a warning that says what rdzv does
/// with them (the command then fails only because etcd is unreachable, which the error says).
#[test]
fn pytorch_backend_keys_are_accepted_with_a_warning() {
    for (key, needle) in [
        ("join_timeout=60", "join_timeout"),
        ("close_timeout=30", "close_timeout"),
        ("heartbeat_timeout=5", "heartbeat_timeout"),
        ("keep_alive_interval=5", "keep_alive_interval"),
        ("keep_alive_max_attempt=3", "keep_alive_max_attempt"),
        ("read_timeout=60", "read_timeout"),
        ("is_host=1", "is_host"),
        ("store_type=tcp", "store_type"),
        ("use_libuv=0", "use_libuv"),
        ("local_addr=10.0.0.1", "local_addr"),
    ] {
        let conf = format!("connect_timeout=1,{key}");
        let args = target_args("status", CLOSED, Some("job"), &["--rdzv-conf", &conf]);
        let (code, _, stderr, _) = rdzv_run(&args);
        assert_eq!(code, 2, "{key}: {stderr}");
        assert!(
            stderr.contains("127.0.0.1:1") && !stderr.contains("unknown"),
            "{key} is accepted; only etcd is unreachable: {stderr}"
        );
        let warnings: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("WARN") && l.contains(&format!("'{needle}'")))
            .collect();
        assert_eq!(warnings.len(), 1, "{key}: one warning expected:\n{stderr}");
        assert!(
            warnings[0].contains("ignored") || warnings[0].contains("used as `timeout`"),
            "{key}: the warning must say what rdzv does with it:\n{stderr}"
        );
    }
    // A PyTorch key with a bad value is still an error.
    assert_usage_error(
        &target_args(
            "status",
            CLOSED,
            Some("job"),
            &["--rdzv-conf", "join_timeout=x"],
        ),
        &["join_timeout"],
    );
}

/// Bad input (issue 10): `rdzv status` of a run id that never existed printed an empty status
/// with exit code 0, and `rdzv close` of it succeeded and pre-closed it for an hour. Both now
/// say that the run does not exist (exit 1, nothing on stdout, nothing created); `close
/// --force` keeps closing it in advance.
#[test]
fn status_and_close_of_an_unknown_run_fail_unless_forced() {
    let etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    let id = common::run_id("never");
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["close"],
        // Still unknown afterwards: the failed commands created nothing.
        vec!["status"],
    ] {
        let mut all = args.clone();
        all.extend(["--rdzv-endpoint", &endpoint, "--rdzv-id", &id]);
        let (code, stdout, stderr, _) = rdzv_run(&all);
        let what = all.join(" ");
        assert_eq!(code, 1, "{what}: stdout {stdout:?}; stderr:\n{stderr}");
        assert!(stdout.is_empty(), "{what}: {stdout:?}");
        assert!(
            stderr.contains(&format!("'{id}'")) && stderr.contains("does not exist"),
            "{what}:\n{stderr}"
        );
    }
    let target = [
        "--rdzv-endpoint",
        endpoint.as_str(),
        "--rdzv-id",
        id.as_str(),
    ];
    let (code, _, stderr, _) = rdzv_run(&[&["close", "--force"][..], &target].concat());
    assert_eq!(code, 0, "close --force: {stderr}");
    let (code, stdout, stderr, _) = rdzv_run(&[&["status", "--json"][..], &target].concat());
    assert_eq!(code, 0, "status after close --force: {stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("JSON status");
    assert_eq!(status["closed"], true, "{stdout}");
    // An existing run is closed without --force.
    let id2 = common::run_id("known");
    let target2 = [
        "--rdzv-endpoint",
        endpoint.as_str(),
        "--rdzv-id",
        id2.as_str(),
    ];
    let (code, _, stderr, _) = rdzv_run(&[&["close", "--force"][..], &target2].concat());
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr, _) = rdzv_run(&[&["close"][..], &target2].concat());
    assert_eq!(code, 0, "close of an existing run: {stderr}");
}
