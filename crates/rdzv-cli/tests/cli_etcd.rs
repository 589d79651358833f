//! Tests of the real `rdzv` binary: `--help`, `--version` and `rdzv etcd`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Upper bound of every wait in these tests.
const WAIT: Duration = Duration::from_secs(30);

fn rdzv() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rdzv"));
    // Plain, parseable logs.
    cmd.env("NO_COLOR", "1").env("RDZV_LOG", "info");
    cmd
}

/// Runs `rdzv` with `args` to completion, bounded by [`WAIT`].
fn run_to_end(mut cmd: Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run rdzv");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(output) => output.expect("cannot wait for rdzv"),
        Err(_) => {
            kill(pid, libc::SIGKILL);
            panic!("rdzv (pid {pid}) did not exit within {WAIT:?}");
        }
    }
}

fn kill(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) only takes integers.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
}

fn proc_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `pid` is alive: it exists and is not a zombie (a killed orphan may stay a zombie
/// for a while if the container's init does not reap it).
fn proc_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|close| stat[close + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X"))
}

/// Pids of the processes whose parent is `parent` and whose command name is `comm`, from
/// `/proc/*/stat`.
fn children_named(parent: u32, comm: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes may vanish while we look.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may contain spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if name == comm && ppid == Some(parent) {
            pids.push(pid);
        }
    }
    pids
}

/// Removes ANSI escape sequences, in case the logs are coloured after all.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip `ESC [ ... <letter>`.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Forwards the lines of a pipe to a channel, from a thread.
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A running `rdzv etcd`; SIGKILLed on drop if the test did not wait for it (its etcd then
/// dies of the parent-death signal).
struct RdzvEtcd {
    child: Option<Child>,
    pid: u32,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    /// Every stderr line seen so far, for failure messages.
    stderr_seen: Vec<String>,
}

impl RdzvEtcd {
    fn spawn() -> Self {
        let mut child = rdzv()
            .arg("etcd")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run rdzv etcd");
        let pid = child.id();
        let stdout = lines_of(child.stdout.take().expect("piped stdout"));
        let stderr = lines_of(child.stderr.take().expect("piped stderr"));
        Self {
            child: Some(child),
            pid,
            stdout,
            stderr,
            stderr_seen: Vec::new(),
        }
    }

    fn first_stdout_line(&mut self) -> String {
        match self.stdout.recv_timeout(WAIT) {
            Ok(line) => line,
            Err(e) => {
                self.drain_stderr();
                panic!(
                    "no endpoint on stdout within {WAIT:?} ({e}); stderr:\n{}",
                    self.stderr_seen.join("\n")
                )
            }
        }
    }

    fn drain_stderr(&mut self) {
        while let Ok(line) = self.stderr.try_recv() {
            self.stderr_seen.push(strip_ansi(&line));
        }
    }

    /// Waits for a stderr line containing `needle` and returns it.
    fn stderr_line_with(&mut self, needle: &str) -> String {
        if let Some(line) = self.stderr_seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    let line = strip_ansi(&line);
                    self.stderr_seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no stderr line with {needle:?} within {WAIT:?} ({e}); stderr:\n{}",
                    self.stderr_seen.join("\n")
                ),
            }
        }
    }

    /// Waits (bounded) for rdzv to exit.
    fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("not waited yet");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(WAIT) {
            Ok(status) => status.expect("cannot wait for rdzv"),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                kill(self.pid, libc::SIGKILL);
                self.drain_stderr();
                panic!(
                    "rdzv etcd (pid {}) did not exit within {WAIT:?}; stderr:\n{}",
                    self.pid,
                    self.stderr_seen.join("\n")
                );
            }
        }
    }
}

impl Drop for RdzvEtcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The value of `key=` in a log line, up to the next space.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let pattern = format!("{key}=");
    let start = line
        .find(&pattern)
        .unwrap_or_else(|| panic!("no {pattern} in {line:?}"))
        + pattern.len();
    line[start..].split_whitespace().next().unwrap_or("")
}

/// Puts and gets a key through `endpoint`, bounded.
fn put_get(endpoint: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let check = async {
            let mut client = etcd_client::Client::connect([endpoint], None)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            client
                .put("cli-key", "cli-value", None)
                .await
                .map_err(|e| format!("put: {e}"))?;
            let got = client
                .get("cli-key", None)
                .await
                .map_err(|e| format!("get: {e}"))?;
            let value = got.kvs().first().map(|kv| kv.value().to_vec());
            if value.as_deref() == Some(b"cli-value".as_slice()) {
                Ok(())
            } else {
                Err(format!("get returned {value:?}"))
            }
        };
        match tokio::time::timeout(WAIT, check).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("etcd at {endpoint}: {e}"),
            Err(_) => panic!("etcd at {endpoint} did not answer within {WAIT:?}"),
        }
    });
}

#[test]
fn help_and_version() {
    let mut cmd = rdzv();
    cmd.arg("--help");
    let out = run_to_end(cmd);
    assert!(out.status.success(), "rdzv --help failed: {out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("rdzv"), "{help}");
    assert!(
        help.contains("etcd"),
        "the etcd subcommand is not listed: {help}"
    );

    let mut cmd = rdzv();
    cmd.arg("--version");
    let out = run_to_end(cmd);
    assert!(out.status.success(), "rdzv --version failed: {out:?}");
    let version = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        version.trim(),
        format!("rdzv {}", env!("CARGO_PKG_VERSION")),
        "unexpected version output"
    );

    let mut cmd = rdzv();
    cmd.args(["etcd", "--help"]);
    let out = run_to_end(cmd);
    assert!(out.status.success(), "rdzv etcd --help failed: {out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("--ready-timeout"));
}

/// Starts `rdzv etcd`, checks the endpoint answers, sends `signal` and checks that rdzv exits 0
/// and leaves neither the etcd process nor its data dir behind.
fn serve_then_stop_with(signal: libc::c_int) {
    let mut rdzv = RdzvEtcd::spawn();
    let endpoint = rdzv.first_stdout_line();
    let port = endpoint
        .strip_prefix("127.0.0.1:")
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("the first stdout line is not 127.0.0.1:<port>: {endpoint:?}"));
    assert_ne!(port, 0);

    let line = rdzv.stderr_line_with("data_dir=");
    let data_dir = PathBuf::from(field(&line, "data_dir"));
    let logged_pid: u32 = field(&line, "pid")
        .parse()
        .unwrap_or_else(|_| panic!("no numeric pid in {line:?}"));
    assert!(
        data_dir.is_dir(),
        "{} is not a directory",
        data_dir.display()
    );
    let etcd_pids = children_named(rdzv.pid, "etcd");
    assert_eq!(etcd_pids, vec![logged_pid], "etcd children of rdzv");

    put_get(&endpoint);

    kill(rdzv.pid, signal);
    let status = rdzv.wait();
    assert!(status.success(), "rdzv etcd exited with {status}");
    assert!(
        !proc_exists(logged_pid),
        "etcd (pid {logged_pid}) is still there after rdzv exited"
    );
    assert!(
        !data_dir.exists(),
        "{} is still there after rdzv exited",
        data_dir.display()
    );
    // Nothing more on stdout than the endpoint.
    let rest: Vec<String> = rdzv.stdout.try_iter().collect();
    assert!(rest.is_empty(), "unexpected stdout lines: {rest:?}");
}

#[test]
fn etcd_serves_and_stops_on_sigterm() {
    serve_then_stop_with(libc::SIGTERM);
}

#[test]
fn etcd_serves_and_stops_on_sigint() {
    serve_then_stop_with(libc::SIGINT);
}

#[test]
fn etcd_dies_with_a_killed_rdzv() {
    let mut rdzv = RdzvEtcd::spawn();
    let _endpoint = rdzv.first_stdout_line();
    let line = rdzv.stderr_line_with("data_dir=");
    let etcd_pid: u32 = field(&line, "pid")
        .parse()
        .unwrap_or_else(|_| panic!("no numeric pid in {line:?}"));
    // rdzv cannot clean up after SIGKILL; remove its directory ourselves.
    let base_dir = PathBuf::from(field(&line, "data_dir"))
        .parent()
        .expect("the data dir has a parent")
        .to_path_buf();
    assert!(proc_alive(etcd_pid));

    kill(rdzv.pid, libc::SIGKILL);
    let _ = rdzv.wait();
    // The kernel delivers the parent-death signal; there is no event to wait on, so poll,
    // bounded.
    let deadline = Instant::now() + WAIT;
    while proc_alive(etcd_pid) {
        assert!(
            Instant::now() < deadline,
            "etcd (pid {etcd_pid}) survived its SIGKILLed parent for {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(&base_dir);
}

#[test]
fn etcd_without_binary_fails_with_install_hint() {
    let mut cmd = rdzv();
    cmd.arg("etcd")
        .env("RDZV_ETCD_BINARY", "/nonexistent/rdzv-test/etcd");
    let out = run_to_end(cmd);
    assert!(!out.status.success(), "must fail: {out:?}");
    assert!(out.stdout.is_empty(), "no endpoint expected: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("RDZV_ETCD_BINARY"), "{stderr}");
    assert!(stderr.contains("apt-get install etcd-server"), "{stderr}");
}

#[test]
fn etcd_rejects_a_bad_ready_timeout() {
    let mut cmd = rdzv();
    cmd.args(["etcd", "--ready-timeout", "soon"]);
    let out = run_to_end(cmd);
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap usage error expected: {out:?}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("soon"));
}
