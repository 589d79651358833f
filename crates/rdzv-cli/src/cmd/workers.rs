//! The local worker group of `rdzv run`: starting the workers with torchrun's environment,
//! their output (tee, redirects, log files), watching them, and stopping them without leaving
//! orphans.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// Which of a worker's streams go where (torchrun's `--redirects`/`--tee` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Streams {
    /// Standard output.
    pub stdout: bool,
    /// Standard error.
    pub stderr: bool,
}

impl std::str::FromStr for Streams {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "0" => Ok(Self {
                stdout: false,
                stderr: false,
            }),
            "1" => Ok(Self {
                stdout: true,
                stderr: false,
            }),
            "2" => Ok(Self {
                stdout: false,
                stderr: true,
            }),
            "3" => Ok(Self {
                stdout: true,
                stderr: true,
            }),
            other => Err(format!(
                "`{other}` is not a stream selection: 0 (none), 1 (stdout), 2 (stderr) or 3 (both)"
            )),
        }
    }
}

/// Everything needed to start one attempt of the local group.
#[derive(Debug, Clone)]
pub struct GroupSpec {
    /// The command and its arguments.
    pub command: Vec<OsString>,
    /// Environment of every worker (rank variables are added per worker), set over the
    /// agent's own environment.
    pub env: BTreeMap<String, String>,
    /// Variables of the agent's environment the workers must not inherit (rdzv's secrets).
    pub env_remove: Vec<String>,
    /// Workers on this node.
    pub nproc: usize,
    /// This node's rank in the round.
    pub group_rank: usize,
    /// Nodes in the round.
    pub group_world_size: usize,
    /// Where per-attempt files go (`<dir>/attempt_<n>/<local_rank>/`).
    pub attempt_dir: PathBuf,
    /// Write these streams to log files only (no console).
    pub redirects: Streams,
    /// Write these streams to log files and to the console, prefixed `[rank<N>]:`.
    pub tee: Streams,
}

/// One running worker.
#[derive(Debug)]
pub struct Worker {
    /// Local rank.
    pub local_rank: usize,
    /// Global rank.
    pub rank: usize,
    /// Process id (also its process group id).
    pub pid: u32,
    /// The error file torch writes on an uncaught exception.
    pub error_file: PathBuf,
    child: Child,
    pumps: Vec<JoinHandle<()>>,
    exit: Option<ExitStatus>,
}

/// How a worker ended.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Local rank.
    pub local_rank: usize,
    /// Global rank.
    pub rank: usize,
    /// Process id.
    pub pid: u32,
    /// Exit status.
    pub status: ExitStatus,
    /// When it was noticed.
    pub time: SystemTime,
    /// The worker's error file, if it wrote one.
    pub error_file: Option<PathBuf>,
}

impl Failure {
    /// `exitcode: N` or `signal: SIGNAME (N)`.
    pub fn describe_exit(&self) -> String {
        match (self.status.code(), self.status.signal()) {
            (Some(code), _) => format!("exitcode: {code}"),
            (None, Some(sig)) => format!("exitcode: -{sig} (signal {})", signal_name(sig)),
            _ => "exitcode: unknown".into(),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "?",
    }
}

/// The state of the group at one look.
#[derive(Debug)]
pub enum GroupState {
    /// Some workers still run, none failed.
    Running,
    /// Every worker exited 0.
    Succeeded,
    /// At least one worker failed (the first one noticed).
    Failed(Failure),
}

/// The local workers of one attempt.
#[derive(Debug)]
pub struct WorkerGroup {
    workers: Vec<Worker>,
    /// Every failure observed while the group ran (not the workers stopped afterwards).
    failures: Vec<Failure>,
}

async fn pump(
    reader: impl tokio::io::AsyncRead + Unpin,
    file: Option<PathBuf>,
    console: Option<(String, bool)>,
) {
    let mut file = match file {
        Some(p) => tokio::fs::File::create(&p).await.ok(),
        None => None,
    };
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(f) = file.as_mut() {
            let _ = f.write_all(line.as_bytes()).await;
            let _ = f.write_all(b"\n").await;
        }
        if let Some((prefix, to_stderr)) = &console {
            // One write per line so that lines of different workers do not interleave.
            let text = format!("{prefix}{line}\n");
            if *to_stderr {
                let _ = tokio::io::stderr().write_all(text.as_bytes()).await;
            } else {
                let _ = tokio::io::stdout().write_all(text.as_bytes()).await;
            }
        }
    }
    if let Some(f) = file.as_mut() {
        let _ = f.flush().await;
    }
}

impl WorkerGroup {
    /// Starts `spec.nproc` workers.
    ///
    /// # Errors
    /// If a directory cannot be created or a worker cannot be started (then the workers
    /// already started are killed).
    pub async fn start(spec: &GroupSpec) -> anyhow::Result<Self> {
        let mut group = Self {
            workers: Vec::new(),
            failures: Vec::new(),
        };
        for local_rank in 0..spec.nproc {
            match Self::start_one(spec, local_rank).await {
                Ok(w) => group.workers.push(w),
                Err(e) => {
                    group.stop(Duration::from_secs(1)).await;
                    return Err(e);
                }
            }
        }
        Ok(group)
    }

    async fn start_one(spec: &GroupSpec, local_rank: usize) -> anyhow::Result<Worker> {
        let rank = spec.group_rank * spec.nproc + local_rank;
        let world = spec.group_world_size * spec.nproc;
        let dir = spec.attempt_dir.join(local_rank.to_string());
        tokio::fs::create_dir_all(&dir)
            .await
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let error_file = dir.join("error.json");
        // An error file left by an earlier start in this directory must not be blamed on
        // this one.
        match tokio::fs::remove_file(&error_file).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot clear the old {}", error_file.display()))
            }
        }
        let line = super::launch::substitute_local_rank(&spec.command, local_rank);
        let mut cmd = Command::new(&line[0]);
        cmd.args(&line[1..]);
        for var in &spec.env_remove {
            cmd.env_remove(var);
        }
        cmd.envs(&spec.env);
        let per_worker = [
            ("LOCAL_RANK", local_rank.to_string()),
            ("RANK", rank.to_string()),
            ("GROUP_RANK", spec.group_rank.to_string()),
            ("ROLE_RANK", rank.to_string()),
            ("LOCAL_WORLD_SIZE", spec.nproc.to_string()),
            ("WORLD_SIZE", world.to_string()),
            ("GROUP_WORLD_SIZE", spec.group_world_size.to_string()),
            ("ROLE_WORLD_SIZE", world.to_string()),
            ("TORCHELASTIC_ERROR_FILE", error_file.display().to_string()),
        ];
        cmd.envs(per_worker.iter().map(|(k, v)| (k, v)));
        let capture_out = spec.redirects.stdout || spec.tee.stdout;
        let capture_err = spec.redirects.stderr || spec.tee.stderr;
        cmd.stdin(Stdio::null());
        cmd.stdout(if capture_out {
            Stdio::piped()
        } else {
            Stdio::inherit()
        });
        cmd.stderr(if capture_err {
            Stdio::piped()
        } else {
            Stdio::inherit()
        });
        cmd.process_group(0);
        cmd.kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; it only changes this (forked) process's own
        // settings before exec.
        unsafe {
            cmd.pre_exec(|| {
                // Workers die with their agent, even if it is SIGKILLed: no orphans.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {:?}", spec.command[0]))?;
        let pid = child.id().unwrap_or(0);
        let mut pumps = Vec::new();
        let prefix = format!("[rank{rank}]:");
        if let Some(out) = child.stdout.take() {
            let console = spec.tee.stdout.then(|| (prefix.clone(), false));
            pumps.push(tokio::spawn(pump(
                out,
                Some(dir.join("stdout.log")),
                console,
            )));
        }
        if let Some(err) = child.stderr.take() {
            let console = spec.tee.stderr.then(|| (prefix.clone(), true));
            pumps.push(tokio::spawn(pump(
                err,
                Some(dir.join("stderr.log")),
                console,
            )));
        }
        tracing::debug!(local_rank, rank, pid, "worker started");
        Ok(Worker {
            local_rank,
            rank,
            pid,
            error_file,
            child,
            pumps,
            exit: None,
        })
    }

    /// Looks at every worker once (non-blocking).
    pub fn poll(&mut self) -> GroupState {
        let before = self.failures.len();
        for w in &mut self.workers {
            if w.exit.is_none() {
                if let Ok(Some(status)) = w.child.try_wait() {
                    w.exit = Some(status);
                    if !status.success() {
                        self.failures.push(Failure {
                            local_rank: w.local_rank,
                            rank: w.rank,
                            pid: w.pid,
                            status,
                            time: SystemTime::now(),
                            error_file: w.error_file.exists().then(|| w.error_file.clone()),
                        });
                    }
                }
            }
        }
        if self.failures.len() > before {
            let root = super::summary::root_cause(&self.failures).unwrap_or(0);
            return GroupState::Failed(self.failures[root].clone());
        }
        if self
            .workers
            .iter()
            .all(|w| matches!(w.exit, Some(s) if s.success()))
        {
            GroupState::Succeeded
        } else {
            GroupState::Running
        }
    }

    /// Every failure observed by [`WorkerGroup::poll`] (the root cause among them).
    pub fn failures(&self) -> &[Failure] {
        &self.failures
    }

    /// Sends `signal` to every running worker's process group.
    pub fn signal(&self, signal: i32) {
        for w in &self.workers {
            if w.exit.is_none() && w.pid > 0 {
                // SAFETY: kill(2) with a negative pid signals that process group; the group
                // is the worker's own (process_group(0)).
                unsafe {
                    libc::kill(-(w.pid as i32), signal);
                }
            }
        }
    }

    /// Stops every worker: SIGTERM to each process group, then SIGKILL after `grace`; waits
    /// for all of them and for their output to be written.
    pub async fn stop(&mut self, grace: Duration) {
        self.stop_with(libc::SIGTERM, grace).await;
    }

    /// As [`WorkerGroup::stop`], with `signal` instead of SIGTERM (the signal that stopped the
    /// agent, as torchrun forwards it).
    pub async fn stop_with(&mut self, signal: i32, grace: Duration) {
        self.signal(signal);
        let deadline = tokio::time::Instant::now() + grace;
        for w in &mut self.workers {
            if w.exit.is_none() {
                match tokio::time::timeout_at(deadline, w.child.wait()).await {
                    Ok(Ok(status)) => w.exit = Some(status),
                    _ => {
                        // SAFETY: as in `signal`.
                        unsafe {
                            libc::kill(-(w.pid as i32), libc::SIGKILL);
                        }
                        w.exit = w.child.wait().await.ok();
                    }
                }
            }
            // Anything the worker's children left in its group goes too.
            // SAFETY: as in `signal`; ESRCH if the group is already empty.
            unsafe {
                libc::kill(-(w.pid as i32), libc::SIGKILL);
            }
        }
        self.drain().await;
    }

    /// Waits until the output of exited workers is written.
    pub async fn drain(&mut self) {
        for w in &mut self.workers {
            for p in w.pumps.drain(..) {
                let _ = tokio::time::timeout(Duration::from_secs(5), p).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 12): a reused log directory blamed a new failure on an old run's
    /// `error.json`; starting a worker clears it.
    #[tokio::test]
    async fn an_old_error_file_is_cleared_before_a_worker_starts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let attempt = dir.path().join("attempt_0");
        std::fs::create_dir_all(attempt.join("0")).expect("dir");
        let old = attempt.join("0/error.json");
        std::fs::write(&old, "{\"message\": \"an old failure\"}").expect("old error file");
        let spec = GroupSpec {
            command: vec!["true".into()],
            env: BTreeMap::new(),
            env_remove: Vec::new(),
            nproc: 1,
            group_rank: 0,
            group_world_size: 1,
            attempt_dir: attempt,
            redirects: Streams::default(),
            tee: Streams::default(),
        };
        let mut group = WorkerGroup::start(&spec).await.expect("start");
        assert!(!old.exists(), "the old error file is still there");
        group.stop(Duration::from_secs(1)).await;
    }
}
