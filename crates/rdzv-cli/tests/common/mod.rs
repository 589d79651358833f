//! Shared helpers of the end-to-end tests of `rdzv run` and `rdzv join`: a real etcd per test,
//! the `rdzv` and `worker` binaries, child processes with bounded waits that are killed on
//! drop, and the records the example worker writes.

#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdzv::etcd::EtcdServer;

/// Upper bound of every wait for a process or a condition, unless a test says otherwise.
pub const WAIT: Duration = Duration::from_secs(30);

/// Poll period of bounded waits on process state and files.
pub const POLL: Duration = Duration::from_millis(50);

/// Fast rendezvous timings for tests.
pub const FAST_CONF: &str = "last_call_timeout=1,keep_alive_ttl=2";

/// Environment variables of torchrun (`PET_*`) and of the worker hooks that must not leak from
/// the caller's environment into the processes under test.
const SCRUBBED_VARS: &[&str] = &[
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_RDZV_BACKEND",
    "PET_RDZV_ENDPOINT",
    "PET_RDZV_ID",
    "PET_RDZV_CONF",
    "PET_STANDALONE",
    "PET_MAX_RESTARTS",
    "PET_MONITOR_INTERVAL",
    "PET_ROLE",
    "PET_LOCAL_ADDR",
    "PET_NODE_RANK",
    "PET_REDIRECTS",
    "PET_TEE",
    "PET_LOG_DIR",
    "PET_GRACE_PERIOD",
    "WORKER_RECORD",
    "WORKER_FAIL_RANK",
    "WORKER_FAIL_UNTIL_RESTART",
    "WORKER_FAIL_AT",
    "WORKER_SLEEP_IF_WORLD",
    "WORKER_SLEEP_SECS",
    "WORKER_GATE_FILE",
    "WORKER_GATE_TIMEOUT_SECS",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RDZV_ETCD_PASSWORD",
];

/// The `rdzv` binary under test.
pub fn rdzv_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rdzv"))
}

/// The example worker, built by cargo next to the binary (`<bin dir>/examples/worker`).
pub fn worker_bin() -> PathBuf {
    let bin = rdzv_bin();
    let path = bin
        .parent()
        .expect("the rdzv binary has a parent directory")
        .join("examples")
        .join("worker");
    assert!(
        path.is_file(),
        "the example worker is missing at {}; it is built by `cargo test -p rdzv-cli` (or \
         `cargo build -p rdzv-cli --example worker`)",
        path.display()
    );
    path
}

/// A `rdzv` command with a clean, predictable environment.
pub fn rdzv() -> Command {
    command(rdzv_bin())
}

/// A command for `program` with a clean, predictable environment (no `PET_*`, no worker
/// hooks, plain logs), whose temporary files (the `torchelastic_*` log directories that an
/// agent keeps, as torchrun does) go under the build's `target/tmp`, not `/tmp`.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for var in SCRUBBED_VARS {
        cmd.env_remove(var);
    }
    cmd.env("NO_COLOR", "1")
        .env("RDZV_LOG", "info")
        .env("TMPDIR", env!("CARGO_TARGET_TMPDIR"));
    cmd.stdin(Stdio::null());
    cmd
}

/// A unique run id (per process, call and time).
pub fn run_id(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{tag}-{}-{}-{nanos:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh etcd for one test (synchronous tests), with the runtime that started it.
pub struct Etcd {
    pub server: EtcdServer,
    _runtime: tokio::runtime::Runtime,
}

impl Etcd {
    pub fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let server = runtime
            .block_on(EtcdServer::start())
            .expect("start etcd (install etcd-server or set RDZV_ETCD_BINARY)");
        Self {
            server,
            _runtime: runtime,
        }
    }

    pub fn endpoint(&self) -> String {
        self.server.endpoint()
    }
}

/// Polls `cond` every [`POLL`] until it holds; panics with `what()` after `limit`.
pub fn wait_until(limit: Duration, what: impl Fn() -> String, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {limit:?}: {}", what());
        }
        std::thread::sleep(POLL);
    }
}

/// Sends `signal` to `pid`; false if the process does not exist.
pub fn kill(pid: u32, signal: libc::c_int) -> bool {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) only takes integers.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// `(comm, state)` of a process from `/proc/<pid>/stat`, or `None` if it does not exist.
fn proc_stat(pid: u32) -> Option<(String, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let state = stat[close + 1..].split_whitespace().next()?.to_string();
    Some((comm, state))
}

/// True if `pid` is still one of our example workers (running, stopped or a zombie). A pid
/// reused by an unrelated process does not count.
pub fn worker_exists(pid: u32) -> bool {
    matches!(proc_stat(pid), Some((comm, _)) if comm == "worker")
}

/// True if `pid` is a worker that still runs (not a zombie waiting to be reaped by an init
/// that does not reap).
pub fn worker_running(pid: u32) -> bool {
    matches!(proc_stat(pid), Some((comm, state)) if comm == "worker" && state != "Z" && state != "X")
}

/// A child process whose output goes to files; SIGKILLed and reaped on drop unless waited for.
pub struct Proc {
    pub name: String,
    pub pid: u32,
    child: Option<Child>,
    status: Option<ExitStatus>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr in `<dir>/<name>.stdout` / `.stderr`.
    pub fn spawn(mut cmd: Command, dir: &Path, name: &str) -> Self {
        let stdout_path = dir.join(format!("{name}.stdout"));
        let stderr_path = dir.join(format!("{name}.stderr"));
        let stdout = File::create(&stdout_path).expect("create stdout file");
        let stderr = File::create(&stderr_path).expect("create stderr file");
        let child = cmd
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Self {
            name: name.to_string(),
            pid: child.id(),
            child: Some(child),
            status: None,
            stdout_path,
            stderr_path,
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Output of the process, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "--- {} (pid {}) stdout:\n{}\n--- {} stderr:\n{}",
            self.name,
            self.pid,
            self.stdout(),
            self.name,
            self.stderr()
        )
    }

    /// Non-blocking: the exit status if the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.status = Some(status);
                    self.child = None;
                }
            }
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits at most `limit` for the process to exit (polling `try_wait`); on timeout kills it
    /// and panics with its output.
    pub fn wait_for_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            if Instant::now() >= deadline {
                self.kill_now();
                panic!(
                    "{} (pid {}) did not exit within {limit:?}\n{}",
                    self.name,
                    self.pid,
                    self.describe()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for the process to exit and returns its exit code (panics if a signal killed it).
    pub fn exit_code(&mut self, limit: Duration) -> i32 {
        let status = self.wait_for_exit(limit);
        status.code().unwrap_or_else(|| {
            panic!(
                "{} was killed by a signal ({status})\n{}",
                self.name,
                self.describe()
            )
        })
    }

    pub fn signal(&self, signal: libc::c_int) {
        if self.status.is_none() {
            assert!(
                kill(self.pid, signal),
                "cannot send signal {signal} to {} (pid {}): {}",
                self.name,
                self.pid,
                std::io::Error::last_os_error()
            );
        }
    }

    /// SIGKILL and reap, if still running.
    pub fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            if let Ok(status) = child.wait() {
                self.status = Some(status);
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// Runs `cmd` to completion within `limit`; returns (exit code, stdout, stderr).
pub fn run_to_end(cmd: Command, dir: &Path, name: &str, limit: Duration) -> (i32, String, String) {
    let mut proc = Proc::spawn(cmd, dir, name);
    let code = proc.exit_code(limit);
    (code, proc.stdout(), proc.stderr())
}

/// One line the worker writes when it starts (after its environment checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartRecord {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub group_rank: usize,
    pub restart: u32,
    pub pid: u32,
    pub run_id: String,
    pub master: String,
}

/// The line a worker writes after a successful all-reduce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoneRecord {
    pub rank: usize,
    pub world: usize,
    pub restart: u32,
}

/// The parsed record file(s) of a test.
#[derive(Debug, Default, Clone)]
pub struct Records {
    pub starts: Vec<StartRecord>,
    pub dones: Vec<DoneRecord>,
    pub raw: String,
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in record line {line:?}"))
}

fn num<T: std::str::FromStr>(line: &str, key: &str) -> T {
    field(line, key)
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in record line {line:?}"))
}

impl Records {
    /// Reads and merges the record files that exist among `paths`.
    pub fn read(paths: &[PathBuf]) -> Self {
        let mut records = Self::default();
        for path in paths {
            let Ok(text) = std::fs::read_to_string(path) else {
                continue;
            };
            // A line may be incomplete while a worker writes it: skip it until it ends.
            let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            for line in complete.lines() {
                if line.trim().is_empty() {
                    continue;
                }
                records.raw.push_str(line);
                records.raw.push('\n');
                if line.starts_with("done ") {
                    records.dones.push(DoneRecord {
                        rank: num(line, "rank"),
                        world: num(line, "world"),
                        restart: num(line, "restart"),
                    });
                } else {
                    records.starts.push(StartRecord {
                        rank: num(line, "rank"),
                        world: num(line, "world"),
                        local_rank: num(line, "local_rank"),
                        group_rank: num(line, "group_rank"),
                        restart: num(line, "restart"),
                        pid: num(line, "pid"),
                        run_id: field(line, "run_id").to_string(),
                        master: field(line, "master").to_string(),
                    });
                }
            }
        }
        records
    }

    pub fn pids(&self) -> Vec<u32> {
        self.starts.iter().map(|s| s.pid).collect()
    }

    /// Start records of world size `world`.
    pub fn starts_with_world(&self, world: usize) -> Vec<&StartRecord> {
        self.starts.iter().filter(|s| s.world == world).collect()
    }

    /// Done records of world size `world`.
    pub fn dones_with_world(&self, world: usize) -> Vec<&DoneRecord> {
        self.dones.iter().filter(|d| d.world == world).collect()
    }
}

/// Asserts that `ranks` is a permutation of `0..n`.
pub fn assert_permutation(mut ranks: Vec<usize>, n: usize, context: &str) {
    ranks.sort_unstable();
    assert_eq!(
        ranks,
        (0..n).collect::<Vec<_>>(),
        "ranks must be 0..{n}, each once; {context}"
    );
}
