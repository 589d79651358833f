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

/// torchrun's `--redirects`/`--tee` value: one selection for every local rank (`3`), or a
/// map from local rank to selection (`0:3,1:0`; ranks not listed get none).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamMap {
    all: Streams,
    per_rank: Option<BTreeMap<usize, Streams>>,
}

impl StreamMap {
    /// The selection of `local_rank`.
    pub fn for_rank(&self, local_rank: usize) -> Streams {
        match &self.per_rank {
            Some(map) => map.get(&local_rank).copied().unwrap_or_default(),
            None => self.all,
        }
    }
}

impl std::str::FromStr for StreamMap {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if !s.contains(':') {
            return Ok(Self {
                all: s.parse()?,
                per_rank: None,
            });
        }
        let mut map = BTreeMap::new();
        for item in s.split(',') {
            let (rank, value) = item
                .split_once(':')
                .ok_or_else(|| format!("`{item}` is not <local rank>:<0-3> (as in 0:3,1:0)"))?;
            let rank: usize = rank
                .trim()
                .parse()
                .map_err(|_| format!("`{rank}` is not a local rank (in `{s}`)"))?;
            if map.insert(rank, value.parse()?).is_some() {
                return Err(format!("local rank {rank} is given twice in `{s}`"));
            }
        }
        Ok(Self {
            all: Streams::default(),
            per_rank: Some(map),
        })
    }
}

/// How the console lines of tee'd workers are prefixed and which local ranks show at all.
#[derive(Debug, Clone, Default)]
pub struct ConsoleSpec {
    /// torchrun's `--log-line-prefix-template` (`${role_name}`, `${local_rank}`, `${rank}`,
    /// `${hostname}`); `None` for torchrun's default `[<role><local rank>]:`.
    pub prefix_template: Option<String>,
    /// torchrun's `--local-ranks-filter`: only these local ranks show on the console (their
    /// tee'd streams still go to the log files).
    pub local_ranks: Option<std::collections::BTreeSet<usize>>,
    /// The role name (`--role`).
    pub role: String,
    /// This host's name.
    pub hostname: String,
}

impl ConsoleSpec {
    /// The prefix of a worker's console lines.
    pub fn prefix(&self, local_rank: usize, rank: usize) -> String {
        match &self.prefix_template {
            None => format!("[{}{local_rank}]:", self.role),
            Some(t) => t
                .replace("${role_name}", &self.role)
                .replace("${local_rank}", &local_rank.to_string())
                .replace("${rank}", &rank.to_string())
                .replace("${hostname}", &self.hostname),
        }
    }

    /// True if `local_rank`'s output may show on the console.
    pub fn shows(&self, local_rank: usize) -> bool {
        self.local_ranks
            .as_ref()
            .is_none_or(|ranks| ranks.contains(&local_rank))
    }
}

/// Parses torchrun's `--local-ranks-filter` (`0,1,2`).
///
/// # Errors
/// Anything but a non-empty comma-separated list of local ranks.
pub fn parse_local_ranks(text: &str) -> Result<std::collections::BTreeSet<usize>, String> {
    text.split(',')
        .map(|r| {
            r.trim().parse::<usize>().map_err(|_| {
                format!(
                    "--local-ranks-filter must be a comma-separated list of integers e.g. \
                     --local-ranks-filter=0,1,2 (got `{text}`)"
                )
            })
        })
        .collect()
}

/// torchrun's `--duplicate-stdout-filters`/`--duplicate-stderr-filters`: the tee'd lines that
/// contain any of these strings are also written to `attempt_<n>/filtered_std{out,err}.log`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LineFilters(pub Vec<String>);

impl std::str::FromStr for LineFilters {
    type Err = std::convert::Infallible;

    /// torchrun's comma-separated list, where `,,` is a comma (so `""` is one empty filter,
    /// which every line matches, as in torchrun).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        const PLACEHOLDER: &str = "\u{0}";
        Ok(Self(
            text.replace(",,", PLACEHOLDER)
                .split(',')
                .map(|item| item.replace(PLACEHOLDER, ","))
                .collect(),
        ))
    }
}

impl LineFilters {
    /// True if `line` contains any of the filters.
    pub fn matches(&self, line: &str) -> bool {
        self.0.iter().any(|needle| line.contains(needle.as_str()))
    }
}

/// torchrun's `--virtual-local-rank`: every worker gets `LOCAL_RANK=0` and sees only its own
/// device, at index 0: `CUDA_VISIBLE_DEVICES` (and `HIP_VISIBLE_DEVICES` if the agent has a
/// non-empty one, which then gives the devices) is the agent's `local_rank`-th device, or
/// `local_rank` itself if the agent has no such variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualLocalRank {
    /// The variable the agent's devices come from.
    pub source: &'static str,
    /// The agent's devices (`None` if it has no such variable).
    pub devices: Option<Vec<String>>,
}

impl VirtualLocalRank {
    /// From the agent's environment, as `get` reads it.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Self {
        match get("HIP_VISIBLE_DEVICES").filter(|v| !v.is_empty()) {
            Some(hip) => Self {
                source: "HIP_VISIBLE_DEVICES",
                devices: Some(hip.split(',').map(|d| d.trim().to_string()).collect()),
            },
            None => Self {
                source: "CUDA_VISIBLE_DEVICES",
                devices: get("CUDA_VISIBLE_DEVICES")
                    .map(|v| v.split(',').map(|d| d.trim().to_string()).collect()),
            },
        }
    }

    /// Checks that each of `nproc` workers has a device.
    ///
    /// # Errors
    /// Fewer visible devices than workers (torchrun fails the same way, when it starts them).
    pub fn check(&self, nproc: usize) -> Result<(), String> {
        match &self.devices {
            Some(devices) if devices.len() < nproc => Err(format!(
                "--virtual-local-rank: {nproc} workers per node but {}={} has {} device(s)",
                self.source,
                devices.join(","),
                devices.len()
            )),
            _ => Ok(()),
        }
    }

    /// The variables of the worker of `local_rank` (after [`VirtualLocalRank::check`]).
    pub fn env(&self, local_rank: usize) -> Vec<(&'static str, String)> {
        let device = self
            .devices
            .as_ref()
            .and_then(|d| d.get(local_rank).cloned())
            .unwrap_or_else(|| local_rank.to_string());
        let mut vars = vec![
            ("LOCAL_RANK", "0".to_string()),
            ("CUDA_VISIBLE_DEVICES", device.clone()),
        ];
        if self.source == "HIP_VISIBLE_DEVICES" {
            vars.push(("HIP_VISIBLE_DEVICES", device));
        }
        vars
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
    /// The global rank of local rank 0 (torchrun's layout: the workers of the nodes before
    /// this one in group-rank order come first).
    pub first_rank: usize,
    /// All workers of the round (WORLD_SIZE).
    pub world_size: usize,
    /// Where per-attempt files go (`<dir>/attempt_<n>/<local_rank>/`).
    pub attempt_dir: PathBuf,
    /// Write these streams to log files only (no console), per local rank.
    pub redirects: StreamMap,
    /// Write these streams to log files and to the console, prefixed, per local rank.
    pub tee: StreamMap,
    /// Console prefix and filter.
    pub console: ConsoleSpec,
    /// Tee'd stdout lines matching these also go to `<attempt_dir>/filtered_stdout.log`.
    pub duplicate_stdout: Option<LineFilters>,
    /// Tee'd stderr lines matching these also go to `<attempt_dir>/filtered_stderr.log`.
    pub duplicate_stderr: Option<LineFilters>,
    /// `--virtual-local-rank`: each worker's `LOCAL_RANK` and visible device.
    pub virtual_local_rank: Option<VirtualLocalRank>,
}

/// A file the tee'd lines of every worker that match `filters` are copied to.
#[derive(Debug, Clone)]
struct Duplicate {
    filters: LineFilters,
    file: std::sync::Arc<std::sync::Mutex<std::fs::File>>,
}

impl Duplicate {
    /// Creates (truncates) `path` for `filters`, if there are any.
    fn create(filters: Option<&LineFilters>, path: PathBuf) -> anyhow::Result<Option<Self>> {
        let Some(filters) = filters else {
            return Ok(None);
        };
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Some(Self {
            filters: filters.clone(),
            file: std::sync::Arc::new(std::sync::Mutex::new(file)),
        }))
    }

    /// Writes `text` (a whole prefixed line) if `line` matches.
    fn write(&self, line: &str, text: &str) {
        use std::io::Write;
        if self.filters.matches(line) {
            if let Ok(mut f) = self.file.lock() {
                let _ = f.write_all(text.as_bytes());
            }
        }
    }
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
    duplicate: Option<Duplicate>,
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
            if let Some(d) = &duplicate {
                d.write(&line, &text);
            }
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
        let duplicates = if spec.duplicate_stdout.is_some() || spec.duplicate_stderr.is_some() {
            tokio::fs::create_dir_all(&spec.attempt_dir)
                .await
                .with_context(|| format!("cannot create {}", spec.attempt_dir.display()))?;
            (
                Duplicate::create(
                    spec.duplicate_stdout.as_ref(),
                    spec.attempt_dir.join("filtered_stdout.log"),
                )?,
                Duplicate::create(
                    spec.duplicate_stderr.as_ref(),
                    spec.attempt_dir.join("filtered_stderr.log"),
                )?,
            )
        } else {
            (None, None)
        };
        for local_rank in 0..spec.nproc {
            match Self::start_one(spec, local_rank, &duplicates).await {
                Ok(w) => group.workers.push(w),
                Err(e) => {
                    group.stop(Duration::from_secs(1)).await;
                    return Err(e);
                }
            }
        }
        Ok(group)
    }

    async fn start_one(
        spec: &GroupSpec,
        local_rank: usize,
        duplicates: &(Option<Duplicate>, Option<Duplicate>),
    ) -> anyhow::Result<Worker> {
        let rank = spec.first_rank + local_rank;
        let world = spec.world_size;
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
        if let Some(virtual_rank) = &spec.virtual_local_rank {
            cmd.envs(virtual_rank.env(local_rank));
        }
        let redirect = spec.redirects.for_rank(local_rank);
        let shown = spec.console.shows(local_rank);
        // A filtered-out rank's tee'd streams go to their files only (as torchrun's).
        let tee = if shown {
            spec.tee.for_rank(local_rank)
        } else {
            Streams::default()
        };
        let to_file_out = redirect.stdout || spec.tee.for_rank(local_rank).stdout;
        let to_file_err = redirect.stderr || spec.tee.for_rank(local_rank).stderr;
        let stdio = |to_file: bool| match (to_file, shown) {
            (true, _) => Stdio::piped(),
            (false, true) => Stdio::inherit(),
            (false, false) => Stdio::null(),
        };
        cmd.stdin(Stdio::null());
        cmd.stdout(stdio(to_file_out));
        cmd.stderr(stdio(to_file_err));
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
        let prefix = spec.console.prefix(local_rank, rank);
        if let Some(out) = child.stdout.take() {
            let console = tee.stdout.then(|| (prefix.clone(), false));
            // As torchrun's: only tee'd lines (of the ranks the console shows) are duplicated.
            let duplicate = duplicates.0.clone().filter(|_| tee.stdout);
            pumps.push(tokio::spawn(pump(
                out,
                Some(dir.join("stdout.log")),
                console,
                duplicate,
            )));
        }
        if let Some(err) = child.stderr.take() {
            let console = tee.stderr.then(|| (prefix.clone(), true));
            let duplicate = duplicates.1.clone().filter(|_| tee.stderr);
            pumps.push(tokio::spawn(pump(
                err,
                Some(dir.join("stderr.log")),
                console,
                duplicate,
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

    #[test]
    fn stream_maps_parse_as_torchrun() {
        let all: StreamMap = "3".parse().unwrap();
        assert_eq!(
            all.for_rank(5),
            Streams {
                stdout: true,
                stderr: true
            }
        );
        let map: StreamMap = "0:3,1:1".parse().unwrap();
        assert_eq!(
            map.for_rank(0),
            Streams {
                stdout: true,
                stderr: true
            }
        );
        assert_eq!(
            map.for_rank(1),
            Streams {
                stdout: true,
                stderr: false
            }
        );
        assert_eq!(
            map.for_rank(2),
            Streams::default(),
            "unlisted ranks get none"
        );
        for bad in ["4", "0:4", "x:1", "0:1,0:2", "0:1,", ""] {
            assert!(bad.parse::<StreamMap>().is_err(), "{bad}");
        }
    }

    #[test]
    fn console_prefixes_are_torchruns() {
        let mut c = ConsoleSpec {
            role: "default".into(),
            hostname: "node-a".into(),
            ..ConsoleSpec::default()
        };
        assert_eq!(c.prefix(1, 5), "[default1]:");
        c.prefix_template = Some("${hostname}:${rank}/${local_rank} ${role_name}| ".into());
        assert_eq!(c.prefix(1, 5), "node-a:5/1 default| ");
        assert!(c.shows(3));
        c.local_ranks = Some(parse_local_ranks("0, 2").unwrap());
        assert!(c.shows(2) && !c.shows(1));
        assert!(parse_local_ranks("").is_err());
        assert!(parse_local_ranks("a,1").is_err());
    }

    #[test]
    fn line_filters_split_as_torchrun() {
        let f: LineFilters = "apple,or,,ange".parse().unwrap();
        assert_eq!(f.0, vec!["apple".to_string(), "or,ange".to_string()]);
        assert!(f.matches("an apple a day") && f.matches("x or,ange y"));
        assert!(!f.matches("orange"));
        let all: LineFilters = "".parse().unwrap();
        assert!(
            all.matches("anything"),
            "torchrun's [''] matches every line"
        );
    }

    #[test]
    fn virtual_local_ranks_are_torchruns() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let none = VirtualLocalRank::from_env(env(&[]));
        assert_eq!(
            none.env(3),
            vec![
                ("LOCAL_RANK", "0".to_string()),
                ("CUDA_VISIBLE_DEVICES", "3".to_string())
            ]
        );
        let cuda = VirtualLocalRank::from_env(env(&[("CUDA_VISIBLE_DEVICES", "4, 6")]));
        assert_eq!(cuda.env(1)[1], ("CUDA_VISIBLE_DEVICES", "6".to_string()));
        assert!(cuda.check(2).is_ok());
        let err = cuda.check(3).unwrap_err();
        assert!(err.contains("CUDA_VISIBLE_DEVICES=4,6"), "{err}");
        let hip = VirtualLocalRank::from_env(env(&[
            ("HIP_VISIBLE_DEVICES", "7,8"),
            ("CUDA_VISIBLE_DEVICES", "0,1"),
        ]));
        assert_eq!(
            hip.env(0),
            vec![
                ("LOCAL_RANK", "0".to_string()),
                ("CUDA_VISIBLE_DEVICES", "7".to_string()),
                ("HIP_VISIBLE_DEVICES", "7".to_string())
            ]
        );
    }

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
            first_rank: 0,
            world_size: 1,
            attempt_dir: attempt,
            redirects: StreamMap::default(),
            tee: StreamMap::default(),
            console: ConsoleSpec::default(),
            duplicate_stdout: None,
            duplicate_stderr: None,
            virtual_local_rank: None,
        };
        let mut group = WorkerGroup::start(&spec).await.expect("start");
        assert!(!old.exists(), "the old error file is still there");
        group.stop(Duration::from_secs(1)).await;
    }
}
