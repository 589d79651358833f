//! `rdzv run`: a torchrun-compatible elastic launcher.
//!
//! On each node it joins the rendezvous, starts the local workers with the environment
//! PyTorch expects, watches them and the membership of the round, and restarts the group on a
//! failure (counted against `--max-restarts`) or a membership change (not counted).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdzv::etcd::{EtcdRendezvousHandler, EtcdServer};
use rdzv::{MembershipEvent, RendezvousHandler, Store};
use tokio::sync::broadcast;

use super::launch::{self, Mode};
use super::membership::{round_end, RoundEnd};
use super::rdzv_args::{unknown_backend, Backend, NodeRange, RendezvousTarget};
use super::signals::{
    parse_signals, SignalEvent, Termination, TerminationSignals, DEFAULT_SIGNALS,
};
use super::summary;
use super::workers::{
    parse_local_ranks, ConsoleSpec, Failure, GroupSpec, GroupState, LineFilters, StreamMap,
    VirtualLocalRank, WorkerGroup,
};
use crate::usage::usage;

/// Arguments of `rdzv run` (torchrun's names and `PET_*` environment variables).
#[derive(Debug, clap::Args)]
#[command(
    after_help = "`--start-method` is not needed: rdzv always starts workers as separate processes \
(it is accepted and ignored, for torchrun compatibility)."
)]
pub struct RunArgs {
    /// Number of nodes: N, or MIN:MAX for an elastic job.
    #[arg(long, env = "PET_NNODES", default_value = "1:1")]
    nnodes: NodeRange,

    /// Workers per node: a number, `gpu` (one per visible NVIDIA GPU), `cpu` (one per CPU) or
    /// `auto` (GPUs if any, else CPUs).
    #[arg(
        long = "nproc-per-node",
        alias = "nproc_per_node",
        env = "PET_NPROC_PER_NODE",
        default_value = "1"
    )]
    nproc_per_node: String,

    #[command(flatten)]
    target: RendezvousTarget,

    /// Single-node job on an auto-started local etcd with a random run id.
    #[arg(long, env = "PET_STANDALONE", value_parser = clap::builder::BoolishValueParser::new())]
    standalone: bool,

    /// Restarts after a failure before giving up. With etcd the budget is the job's: a failed
    /// round counts once, whichever nodes' workers failed in it (torchrun counts per node).
    #[arg(
        long = "max-restarts",
        alias = "max_restarts",
        env = "PET_MAX_RESTARTS",
        default_value_t = 0
    )]
    max_restarts: u32,

    /// How often to check the workers (seconds or a duration such as 100ms; 1ms to 1h).
    #[arg(long = "monitor-interval", alias = "monitor_interval", env = "PET_MONITOR_INTERVAL", default_value = "0.1", value_parser = monitor_interval)]
    monitor_interval: Duration,

    /// `static` backend: the address of the node with `--node-rank 0` (MASTER_ADDR).
    #[arg(long = "master-addr", alias = "master_addr", env = "PET_MASTER_ADDR")]
    master_addr: Option<String>,

    /// `static` backend: the port workers of node 0 serve on (MASTER_PORT); 29500 by default
    /// on several nodes, a free port on one.
    #[arg(long = "master-port", alias = "master_port", env = "PET_MASTER_PORT")]
    master_port: Option<u16>,

    /// The workers' role name (ROLE_NAME).
    #[arg(long, env = "PET_ROLE", default_value = "default")]
    role: String,

    /// The address this node advertises (MASTER_ADDR if it gets group rank 0).
    #[arg(long = "local-addr", alias = "local_addr", env = "PET_LOCAL_ADDR")]
    local_addr: Option<String>,

    /// A hint for this node's place in the first round's rank order.
    #[arg(long = "node-rank", alias = "node_rank", env = "PET_NODE_RANK")]
    node_rank: Option<u64>,

    /// Send worker output only to log files: 0 none, 1 stdout, 2 stderr, 3 both, or a map by
    /// local rank (`0:3,1:0`).
    #[arg(long, short = 'r', env = "PET_REDIRECTS", default_value = "0")]
    redirects: StreamMap,

    /// Send worker output to log files and to the console, lines prefixed (torchrun's
    /// `[<role><local rank>]:`, or `--log-line-prefix-template`); same values as `--redirects`.
    #[arg(long, short = 't', env = "PET_TEE", default_value = "0")]
    tee: StreamMap,

    /// Only show these local ranks' output on the console (`0,1,2`); their log files are kept.
    #[arg(long = "local-ranks-filter", alias = "local_ranks_filter", env = "PET_LOCAL_RANKS_FILTER", value_parser = parse_local_ranks)]
    local_ranks_filter: Option<std::collections::BTreeSet<usize>>,

    /// The prefix of tee'd console lines: `${role_name}`, `${local_rank}`, `${rank}` and
    /// `${hostname}` are replaced (e.g. `[${rank}]:`).
    #[arg(
        long = "log-line-prefix-template",
        alias = "log_line_prefix_template",
        env = "PET_LOG_LINE_PREFIX_TEMPLATE"
    )]
    log_line_prefix_template: Option<String>,

    /// Tee'd stdout lines (`--tee`, of the local ranks `--local-ranks-filter` shows) that
    /// contain any of these comma-separated strings (`,,` for a comma) are also written,
    /// prefixed, to `attempt_<n>/filtered_stdout.log` of the log directory.
    #[arg(
        long = "duplicate-stdout-filters",
        alias = "duplicate_stdout_filters",
        env = "PET_DUPLICATE_STDOUT_FILTERS"
    )]
    duplicate_stdout_filters: Option<LineFilters>,

    /// As `--duplicate-stdout-filters`, for tee'd stderr lines (`filtered_stderr.log`).
    #[arg(
        long = "duplicate-stderr-filters",
        alias = "duplicate_stderr_filters",
        env = "PET_DUPLICATE_STDERR_FILTERS"
    )]
    duplicate_stderr_filters: Option<LineFilters>,

    /// Every worker gets LOCAL_RANK=0 and sees only its own GPU, at index 0
    /// (CUDA_VISIBLE_DEVICES, and HIP_VISIBLE_DEVICES if set: the agent's local-rank-th
    /// device, or the local rank).
    #[arg(long = "virtual-local-rank", alias = "virtual_local_rank", env = "PET_VIRTUAL_LOCAL_RANK", value_parser = clap::builder::BoolishValueParser::new())]
    virtual_local_rank: bool,

    /// torchrun's event log handler: `null` (its default), `console` or `dynamic_rendezvous`
    /// are accepted; rdzv logs its own events to stderr (see RDZV_LOG) whichever is given.
    #[arg(
        long = "event-log-handler",
        alias = "event_log_handler",
        env = "PET_EVENT_LOG_HANDLER"
    )]
    event_log_handler: Option<String>,

    /// Not supported (torchrun's Python plugin for the log layout): exits 2.
    #[arg(long = "logs-specs", alias = "logs_specs", value_name = "NAME")]
    logs_specs: Option<String>,

    /// Not supported (torchrun binds workers to the CPUs near their GPU): exits 2.
    #[arg(long = "numa-binding", alias = "numa_binding", value_name = "MODE")]
    numa_binding: Option<String>,

    /// Not supported (torchrun prints a shell completion script for itself): exits 2.
    #[arg(
        long = "print-completion",
        alias = "print_completion",
        value_name = "SHELL"
    )]
    print_completion: Option<String>,

    /// Directory for per-attempt worker logs and error files (default: a temporary one).
    #[arg(long = "log-dir", alias = "log_dir", env = "PET_LOG_DIR")]
    log_dir: Option<PathBuf>,

    /// Time between the stop signal and SIGKILL when stopping workers (0s to 7d); if not
    /// given, `TORCH_ELASTIC_SHUTDOWN_TIMEOUT`, else 30 s, as torchrun.
    #[arg(
        long = "shutdown-timeout",
        visible_alias = "grace-period",
        alias = "shutdown_timeout",
        env = "PET_SHUTDOWN_TIMEOUT",
        value_parser = timeout
    )]
    shutdown_timeout: Option<Duration>,

    /// Resolved from `shutdown_timeout` (not a flag).
    #[arg(skip = DEFAULT_SHUTDOWN_TIMEOUT)]
    grace_period: Duration,

    /// Signals that stop the agent, forwarded to the workers (which then get the grace
    /// period). SIGUSR1 and SIGUSR2, unless listed here, are forwarded to the workers and the
    /// agent goes on (SLURM's pre-emption warning).
    #[arg(
        long = "signals-to-handle",
        alias = "signals_to_handle",
        env = "PET_SIGNALS_TO_HANDLE",
        default_value = DEFAULT_SIGNALS
    )]
    signals_to_handle: String,

    /// How long a node whose workers succeeded waits for the other nodes to finish (0s to 7d).
    #[arg(long = "exit-barrier-timeout", default_value = "300", value_parser = timeout)]
    exit_barrier_timeout: Duration,

    /// Accepted for torchrun compatibility and ignored.
    #[arg(
        long = "start-method",
        alias = "start_method",
        env = "PET_START_METHOD",
        hide = true
    )]
    start_method: Option<String>,

    /// Run the training script as a Python module: `python -u -m <module> args…`.
    #[arg(short = 'm', long = "module", env = "PET_MODULE", value_parser = clap::builder::BoolishValueParser::new())]
    module: bool,

    /// Run the entry point as a program, not through Python (as the `-- command` form does).
    #[arg(long = "no-python", alias = "no_python", env = "PET_NO_PYTHON", value_parser = clap::builder::BoolishValueParser::new())]
    no_python: bool,

    /// torchrun runs the script with runpy in its own interpreter; rdzv runs it as with no
    /// flag (`python -u script`), in a process of its own.
    #[arg(long = "run-path", alias = "run_path", env = "PET_RUN_PATH", value_parser = clap::builder::BoolishValueParser::new())]
    run_path: bool,

    /// The workers' Python interpreter (default: python3, else python, on PATH).
    #[arg(long = "python", env = "PYTHON")]
    python: Option<OsString>,

    /// The training script (a module with -m, a program with --no-python or after `--`) and
    /// its arguments; `${local_rank}` in them is replaced by each worker's local rank.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required_unless_present = "print_completion",
        value_name = "TRAINING_SCRIPT"
    )]
    command: Vec<OsString>,
}

/// torchrun's event log handlers (`torch.distributed.elastic.events.handlers`).
const EVENT_LOG_HANDLERS: &[&str] = &["null", "console", "dynamic_rendezvous"];

/// The torchrun flags rdzv does not implement, each with a specific error (exit 2) that says
/// what to do instead; `--event-log-handler` is checked here too.
fn refuse_unsupported(args: &RunArgs) -> anyhow::Result<()> {
    if args.print_completion.is_some() {
        return Err(usage(
            "rdzv run does not support --print-completion: torchrun prints a completion \
             script for torchrun (with the shtab package); rdzv has none. Complete `rdzv run` \
             as torchrun: its flags have the same names",
        ));
    }
    if args.numa_binding.is_some() {
        return Err(usage(format!(
            "rdzv run does not support --numa-binding: it does not bind workers to CPUs. Bind \
             them in the worker command instead, e.g. `rdzv run --no-python numactl \
             --cpunodebind=<node> --membind=<node> python -u train.py` ({} in any argument is \
             replaced by the worker's local rank)",
            launch::LOCAL_RANK_MACRO
        )));
    }
    if args.logs_specs.is_some() {
        return Err(usage(
            "rdzv run does not support --logs-specs: it names a Python plugin (a \
             `torchrun.logs_specs` entry point) only torchrun can load. rdzv writes torchrun's \
             default layout: choose it with --log-dir, --redirects, --tee and \
             --local-ranks-filter",
        ));
    }
    match args.event_log_handler.as_deref().map(str::trim) {
        None | Some("null") => {}
        Some(name) if EVENT_LOG_HANDLERS.contains(&name) => tracing::info!(
            handler = name,
            "--event-log-handler: rdzv does not write torchrun's event records; its agent logs \
             its own events to stderr (RDZV_LOG sets the level)"
        ),
        Some(name) => {
            return Err(usage(format!(
                "--event-log-handler (or PET_EVENT_LOG_HANDLER) '{name}' is not one of \
                 torchrun's: {}",
                EVENT_LOG_HANDLERS.join(", ")
            )))
        }
    }
    Ok(())
}

/// The longest `--monitor-interval`.
const MAX_MONITOR_INTERVAL: Duration = Duration::from_secs(3600);

/// `--monitor-interval`: 1ms to 1h (a tokio interval of zero panics).
fn monitor_interval(text: &str) -> Result<Duration, String> {
    rdzv::parse_duration_in(text, Duration::from_millis(1)..=MAX_MONITOR_INTERVAL)
}

/// `--grace-period`, `--exit-barrier-timeout`: 0s to 7d ([`rdzv::MAX_TIMEOUT`]).
fn timeout(text: &str) -> Result<Duration, String> {
    rdzv::parse_duration_in(text, Duration::ZERO..=rdzv::MAX_TIMEOUT)
}

/// torchrun's default shutdown timeout (grace period before SIGKILL).
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// The round-store key where the nodes of a round agree on `--nproc-per-node`.
const NPROC_KEY: &str = "rdzv/nproc_per_node";

/// torchrun's default port of a c10d rendezvous endpoint.
const DEFAULT_C10D_PORT: u16 = 29400;

/// `--rdzv-backend c10d`, as torchrun's: the node whose address is the endpoint's host serves
/// the rendezvous on that port — here an etcd this agent starts, where torchrun's agent starts a
/// TCPStore — and every node (that one included) joins through it as with `etcd-v3`.
/// `localhost:0` on a single node picks a free port. Several agents on the host: the first to
/// bind the port serves it, the others are clients. Returns the etcd this agent serves, if any
/// (it lives as long as the agent: this host is a single point of failure of the job).
///
/// # Errors
/// A usage error for a bad endpoint; the etcd's own error if it cannot start.
async fn serve_c10d(args: &mut RunArgs) -> anyhow::Result<Option<EtcdServer>> {
    let text = args.target.endpoint.trim().to_string();
    if text.is_empty() {
        return Err(usage(
            "--rdzv-backend c10d needs --rdzv-endpoint <host>:<port>",
        ));
    }
    let ep = rdzv::parse_endpoint(&text, DEFAULT_C10D_PORT)
        .or_else(|e| match text.rsplit_once(':') {
            // Port 0 (torchrun's `localhost:0`) is valid for c10d: a free port.
            Some((host, "0")) => rdzv::parse_endpoint(host, DEFAULT_C10D_PORT)
                .map(|e| rdzv::Endpoint { port: 0, ..e })
                .map_err(|_| e),
            _ => Err(e),
        })
        .map_err(|e| usage(format!("--rdzv-endpoint for c10d: {e}")))?;
    if ep.port == 0 && args.nnodes.max > 1 {
        return Err(usage(
            "a c10d endpoint with port 0 (a free port) only works on a single node: give the \
             port the other nodes will connect to",
        ));
    }
    if args.target.run_id.is_none() {
        args.target.run_id = Some("none".into());
    }
    let Some(listen) = local_address_of(&ep.host) else {
        tracing::info!(endpoint = %text, "c10d: the rendezvous is served by another host");
        args.target.endpoint = format!("{}:{}", bracket(&ep.host), ep.port);
        return Ok(None);
    };
    let port = if ep.port == 0 {
        rdzv::bootstrap::free_port(&listen.to_string())?
    } else {
        ep.port
    };
    // This host's agents reach the etcd at the address the host name gave.
    args.target.endpoint = format!("{}:{port}", bracket(&listen.to_string()));
    // The first agent on this host to bind the port serves it; the others are its clients.
    if std::net::TcpListener::bind((listen, port)).is_err() {
        tracing::info!(
            port,
            "c10d: the port is taken (another agent on this host serves it)"
        );
        return Ok(None);
    }
    let listen_host = match listen {
        std::net::IpAddr::V4(v4) if v4 == std::net::Ipv4Addr::LOCALHOST => None,
        ip if ip.is_loopback() => Some(ip),
        // Other hosts connect to this address: listen on every interface, as a TCPStore does.
        std::net::IpAddr::V4(_) => Some(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        std::net::IpAddr::V6(_) => Some(std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
    };
    let options = rdzv::etcd::EtcdServerOptions {
        client_port: Some(port),
        listen_host,
        ..Default::default()
    };
    match EtcdServer::start_with(options).await {
        Ok(etcd) => {
            tracing::warn!(
                endpoint = %args.target.endpoint,
                "c10d: this node serves the job's rendezvous (an etcd); the job depends on \
                 this host: an etcd cluster (--rdzv-backend etcd-v3) has no single point of \
                 failure"
            );
            Ok(Some(etcd))
        }
        // Lost the race for the port to another agent of this host: be its client.
        Err(e) if std::net::TcpListener::bind((listen, port)).is_err() => {
            tracing::info!(port, "c10d: another agent on this host serves the port");
            tracing::debug!(error = %e, "c10d: the etcd this agent started could not bind");
            Ok(None)
        }
        Err(e) => Err(e).context("c10d: cannot start the rendezvous etcd on this host"),
    }
}

/// `host` with IPv6 brackets if it needs them in `host:port`.
fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// The local address `host` names, if it names this machine: a loopback or local IP, this
/// machine's host name, or a name that resolves to an address of this machine (one a socket
/// can be bound to).
fn local_address_of(host: &str) -> Option<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    let candidates: Vec<std::net::IpAddr> = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => (host, 0)
            .to_socket_addrs()
            .map(|addrs| addrs.map(|a| a.ip()).collect())
            .unwrap_or_default(),
    };
    candidates
        .into_iter()
        .find(|ip| std::net::TcpListener::bind((*ip, 0)).is_ok())
}

/// torchrun's default `--master-port` for the `static` backend on several nodes.
const DEFAULT_MASTER_PORT: u16 = 29500;

/// Where the workers of a `static` job meet: the endpoint if given (torchrun's static backend
/// takes it as the master's `host:port`), else `--master-addr`/`--master-port`; on one node
/// with no port given, a free port of 127.0.0.1.
fn static_master(args: &RunArgs, nnodes: usize) -> anyhow::Result<rdzv::bootstrap::MasterInfo> {
    let endpoint = args.target.endpoint.trim();
    if !endpoint.is_empty() {
        let e = rdzv::parse_endpoint(endpoint, args.master_port.unwrap_or(DEFAULT_MASTER_PORT))
            .map_err(|e| usage(format!("--rdzv-endpoint for the static backend: {e}")))?;
        return Ok(rdzv::bootstrap::MasterInfo {
            addr: e.host,
            port: e.port,
        });
    }
    let addr = args
        .master_addr
        .clone()
        .unwrap_or_else(|| "127.0.0.1".into());
    if nnodes > 1 && args.master_addr.is_none() {
        tracing::warn!(
            "static backend on {nnodes} nodes without --master-addr (PET_MASTER_ADDR): \
             MASTER_ADDR is 127.0.0.1, which only works if every node is this machine"
        );
    }
    let port = match args.master_port {
        Some(0) => return Err(usage("--master-port must be between 1 and 65535")),
        Some(p) => p,
        None if nnodes == 1 => rdzv::bootstrap::free_port(&addr)?,
        None => DEFAULT_MASTER_PORT,
    };
    Ok(rdzv::bootstrap::MasterInfo { addr, port })
}

/// `rdzv run` with the `static` backend (torchrun's default when no endpoint is given): a fixed
/// number of nodes, this node's group rank from `--node-rank`, no rendezvous service and no
/// etcd. A worker failure restarts this node's workers only (the other nodes' workers fail
/// in their collectives and restart too), within `--max-restarts`.
async fn run_static(
    args: RunArgs,
    nproc: usize,
    command: Vec<OsString>,
) -> anyhow::Result<ExitCode> {
    if args.standalone {
        return usage_error(
            "--standalone starts an etcd: it does not go with --rdzv-backend static",
        );
    }
    if args.nnodes.min != args.nnodes.max {
        return usage_error(format!(
            "the static backend needs a fixed --nnodes N, not {}:{}: an elastic job needs \
             --rdzv-backend etcd-v3 and --rdzv-endpoint",
            args.nnodes.min, args.nnodes.max
        ));
    }
    let nnodes = args.nnodes.min;
    let node_rank = usize::try_from(args.node_rank.unwrap_or(0)).unwrap_or(usize::MAX);
    if node_rank >= nnodes {
        return usage_error(format!(
            "--node-rank {node_rank} is not below --nnodes {nnodes}"
        ));
    }
    if !args.target.conf.trim().is_empty() {
        tracing::warn!("--rdzv-conf is ignored by the static backend");
    }
    // As torchrun 2.15: one node with neither endpoint nor master port is a standalone job
    // with a random run id (whatever --rdzv-id says); otherwise the id given, or `none`.
    let run_id =
        if nnodes == 1 && args.target.endpoint.trim().is_empty() && args.master_port.is_none() {
            uuid::Uuid::new_v4().to_string()
        } else {
            args.target.run_id.clone().unwrap_or_else(|| "none".into())
        };
    let mut master = static_master(&args, nnodes)?;
    let log_root = log_root(args.log_dir.as_deref(), &run_id)?;
    tracing::info!(log_dir = %log_root.display(), "worker logs and error files go here (kept)");
    let handled_signals = parse_signals(&args.signals_to_handle).map_err(usage)?;
    let mut signals = TerminationSignals::install_for(&handled_signals)?;
    // No membership can change: a channel that never delivers.
    let (_never, mut events) = broadcast::channel::<MembershipEvent>(1);
    let hostname = rdzv::etcd::node::hostname();
    let mut restart_count: u32 = 0;
    loop {
        let round = u64::from(restart_count) + 1;
        let spec = group_spec(
            &args,
            &command,
            nproc,
            &run_id,
            restart_count,
            &log_root,
            Placement {
                round,
                group_rank: node_rank,
                group_world_size: nnodes,
                global: rdzv::GlobalRanks {
                    first: node_rank * nproc,
                    world_size: nnodes * nproc,
                },
            },
            &master,
        );
        tracing::info!(
            backend = "static",
            group_rank = node_rank,
            group_world_size = nnodes,
            world_size = nnodes * nproc,
            master = %format!("{}:{}", master.addr, master.port),
            restart_count,
            "starting workers"
        );
        let mut group = WorkerGroup::start(&spec).await?;
        match monitor(
            &mut group,
            round,
            &mut events,
            &mut signals,
            args.monitor_interval,
        )
        .await
        {
            Outcome::Succeeded => {
                group.drain().await;
                tracing::info!("all workers succeeded");
                return Ok(ExitCode::SUCCESS);
            }
            Outcome::Failed(failure) => {
                group.stop(args.grace_period).await;
                if restart_count < args.max_restarts {
                    restart_count += 1;
                    log_restart(&failure, restart_count, args.max_restarts);
                    if nnodes == 1 && args.master_port.is_none() {
                        master.port = rdzv::bootstrap::free_port(&master.addr)?;
                    }
                    continue;
                }
                report_failure(
                    &summary::Context {
                        entrypoint: &entrypoint(&args.command),
                        hostname: &hostname,
                        run_id: &run_id,
                        round,
                        group_rank: node_rank,
                    },
                    group.failures(),
                );
                return Ok(ExitCode::FAILURE);
            }
            Outcome::Signal(sig) => {
                tracing::info!(signal = sig.signo(), "stopping the workers");
                group.stop_with(sig.signo(), args.grace_period).await;
                return Ok(ExitCode::from(sig.exit_code()));
            }
            Outcome::MembershipChanged(_) | Outcome::Closed => {
                unreachable!("a static job has no membership events")
            }
        }
    }
}

/// The directory of this agent's worker logs, as torchrun makes it and keeps it:
/// `<base>/<run_id>_<random>/`, where `<base>` is `--log-dir` or a new
/// `/tmp/torchelastic_<random>/`.
fn log_root(log_dir: Option<&std::path::Path>, run_id: &str) -> anyhow::Result<PathBuf> {
    let base = match log_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the log directory {}", dir.display()))?;
            dir.to_path_buf()
        }
        None => tempfile::Builder::new()
            .prefix("torchelastic_")
            .tempdir()
            .context("cannot create a temporary log directory")?
            .keep(),
    };
    Ok(tempfile::Builder::new()
        .prefix(&format!("{run_id}_"))
        .tempdir_in(&base)
        .with_context(|| format!("cannot create a log directory in {}", base.display()))?
        .keep())
}

/// A usage error (exit code 2, printed by `main`).
fn usage_error(msg: impl std::fmt::Display) -> anyhow::Result<ExitCode> {
    Err(usage(msg))
}

/// Why the monitor loop stopped.
enum Outcome {
    Succeeded,
    Failed(Failure),
    MembershipChanged(String),
    Closed,
    Signal(Termination),
}

/// Runs `rdzv run`.
///
/// # Errors
/// If etcd cannot be reached, the rendezvous fails (timeout, state), or workers cannot be
/// started.
pub async fn run(mut args: RunArgs) -> anyhow::Result<ExitCode> {
    refuse_unsupported(&args)?;
    let nproc = match super::devices::nproc_per_node_here(&args.nproc_per_node) {
        Ok(n) => n,
        Err(e) => return usage_error(e),
    };
    if args.virtual_local_rank {
        VirtualLocalRank::from_env(|k| std::env::var(k).ok())
            .check(nproc)
            .map_err(usage)?;
    }
    args.grace_period = match (
        args.shutdown_timeout,
        std::env::var("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"),
    ) {
        (Some(t), _) => t,
        (None, Ok(text)) => timeout(&text)
            .map_err(|e| usage(format!("TORCH_ELASTIC_SHUTDOWN_TIMEOUT={text:?}: {e}")))?,
        (None, Err(_)) => DEFAULT_SHUTDOWN_TIMEOUT,
    };
    let handled_signals = parse_signals(&args.signals_to_handle)
        .map_err(|e| usage(format!("--signals-to-handle: {e}")))?;
    let argv: Vec<OsString> = std::env::args_os().collect();
    let dashed = launch::is_dashed_form(&argv, &args.command);
    let mode = Mode::from_flags(args.module, args.no_python, dashed).map_err(usage)?;
    let python = match mode {
        Mode::Program => None,
        Mode::Script | Mode::Module => Some(
            launch::python(args.python.as_deref(), |name| {
                launch::find_on_path(name, std::env::var_os("PATH").as_deref())
            })
            .map_err(usage)?,
        ),
    };
    let command = launch::command_line(mode, python.as_deref(), &args.command);
    // Found before the node joins: a typo must not cost the job a membership change.
    if launch::resolve_program(&command[0], std::env::var_os("PATH").as_deref()).is_none() {
        return usage_error(format!(
            "cannot run {:?}: no such executable{}",
            command[0],
            match mode {
                Mode::Program => "",
                Mode::Script | Mode::Module => " (the Python interpreter: see --python)",
            }
        ));
    }
    let c10d = args.target.backend_kind() == Backend::C10d;
    let static_job = match args.target.backend_kind() {
        Backend::Static => true,
        Backend::C10d => false,
        Backend::Unknown(name) => return usage_error(unknown_backend(&name)),
        // torchrun's default: no rendezvous service unless an endpoint is given.
        Backend::Etcd(_) => {
            args.target.backend.is_none()
                && args.target.endpoint.trim().is_empty()
                && !args.standalone
        }
    };
    if nproc > 1 && std::env::var_os("OMP_NUM_THREADS").is_none() {
        tracing::warn!(
            "\n*****************************************\nSetting OMP_NUM_THREADS environment \
             variable for each process to be 1 in default, to avoid your system being \
             overloaded, please further tune the variable for optimal performance in your \
             application as needed. \n*****************************************"
        );
    }
    if args.start_method.is_some() {
        tracing::info!("--start-method is not needed by rdzv and is ignored");
    }
    if static_job {
        return run_static(args, nproc, command).await;
    }
    let mut signals = TerminationSignals::install_for(&handled_signals)?;
    let _etcd: Option<EtcdServer> = if c10d {
        if args.standalone {
            return usage_error("--standalone starts its own etcd: it does not go with c10d");
        }
        serve_c10d(&mut args).await?
    } else if args.standalone {
        if !args.target.endpoint.trim().is_empty() {
            return usage_error("--standalone starts its own etcd: do not give --rdzv-endpoint");
        }
        if args.nnodes != (NodeRange { min: 1, max: 1 }) {
            return usage_error(
                "--standalone is a single-node job: do not give --nnodes other than 1",
            );
        }
        // The configuration is checked before the etcd is started.
        args.target.check_without_endpoint(
            args.nnodes,
            args.local_addr.as_deref(),
            args.node_rank,
        )?;
        let etcd = EtcdServer::start()
            .await
            .context("cannot start the local etcd for --standalone")?;
        args.target.endpoint = etcd.endpoint();
        args.target.run_id = Some(uuid::Uuid::new_v4().to_string());
        if args.local_addr.is_none() {
            args.local_addr = Some("127.0.0.1".into());
        }
        tracing::info!(endpoint = %args.target.endpoint, run_id = args.target.run_id.as_deref().unwrap_or_default(), "standalone: started a local etcd");
        Some(etcd)
    } else {
        None
    };
    let params = args
        .target
        .parameters(args.nnodes, args.local_addr.as_deref(), args.node_rank)?
        // The finaliser lays out the global ranks from every node's worker count.
        .with_config("local_world_size", nproc.to_string());
    let run_id = params.run_id.clone();
    let handler = Arc::new(
        EtcdRendezvousHandler::connect(&params)
            .await
            .context("cannot connect to the rendezvous")?,
    );
    let mut events = handler
        .subscribe()
        .context("the etcd handler pushes events")?;
    let log_root = log_root(args.log_dir.as_deref(), &run_id)?;
    tracing::info!(log_dir = %log_root.display(), "worker logs and error files go here (kept)");
    let advertised = handler.advertised_addr();
    if args.nnodes.max > 1 && args.local_addr.is_none() && is_loopback(&advertised) {
        tracing::warn!(
            address = %advertised,
            "\n*****************************************\nthis node found no address other \
             than loopback (no default route): if it becomes rank 0, nodes on other hosts \
             cannot reach MASTER_ADDR={advertised}. Give --local-addr (or PET_LOCAL_ADDR) with \
             an address the other nodes can reach.\n*****************************************"
        );
    }
    let mut restart_count: u32 = 0;
    loop {
        // TORCHELASTIC_RESTART_COUNT is the job's (every node restarts after a failure).
        match handler.failed_rounds().await {
            Ok(n) => restart_count = restart_count.max(u32::try_from(n).unwrap_or(u32::MAX)),
            Err(e) => tracing::debug!(error = %e, "cannot read the job's restart count"),
        }
        let info = tokio::select! {
            r = handler.next_rendezvous() => match r {
                Ok(info) => info,
                Err(e) if e.is_closed() => {
                    eprintln!("rdzv run: the run '{run_id}' is closed (another node failed or it was closed); stopping");
                    let _ = handler.shutdown().await;
                    return Ok(ExitCode::FAILURE);
                }
                Err(e) => {
                    let _ = handler.shutdown().await;
                    return Err(e).context("rendezvous failed");
                }
            },
            sig = signals.recv() => {
                let _ = handler.shutdown().await;
                return Ok(ExitCode::from(sig.exit_code()));
            }
        };
        // Rank 0 may be gone before it published: race the exchange against membership
        // events and signals, so that the nodes re-rendezvous (or stop) instead of waiting.
        let exchange = rdzv::bootstrap::exchange_master(
            &*info.store,
            info.rank,
            &advertised,
            Duration::from_secs(120),
        );
        let master = tokio::select! {
            biased;
            sig = signals.recv() => {
                let _ = handler.shutdown().await;
                return Ok(ExitCode::from(sig.exit_code()));
            }
            change = membership_change(&mut events, info.round) => match change {
                Outcome::Closed => {
                    eprintln!("rdzv run: the run '{run_id}' was closed by another node; stopping");
                    let _ = handler.shutdown().await;
                    return Ok(ExitCode::FAILURE);
                }
                Outcome::MembershipChanged(why) => {
                    tracing::info!(round = info.round, "{why}: re-rendezvous before the workers start");
                    continue;
                }
                _ => unreachable!("membership_change returns membership outcomes only"),
            },
            master = exchange => master.context("cannot agree on MASTER_ADDR/MASTER_PORT")?,
        };
        // Global ranks: each node's workers after those of the nodes before it, as the
        // finaliser laid them out from every node's --nproc-per-node (torchrun's layout).
        let global = match info.global_ranks {
            Some(g) => g,
            // A member that did not say (not started by `rdzv run`): only the same count on
            // every node gives right ranks; refuse a node that differs rather than hand out
            // duplicate ranks (the first node of the round sets it).
            None => {
                let agreed = info
                    .store
                    .compare_set(NPROC_KEY, b"", nproc.to_string().as_bytes())
                    .await
                    .context("cannot agree on --nproc-per-node")?;
                if agreed != nproc.to_string().as_bytes() {
                    let _ = handler.shutdown().await;
                    return Err(usage(format!(
                        "--nproc-per-node differs across the nodes of run '{run_id}': this node \
                         has {nproc}, the others {}, and not every node said how many workers \
                         it runs",
                        String::from_utf8_lossy(&agreed)
                    )));
                }
                rdzv::GlobalRanks {
                    first: info.rank * nproc,
                    world_size: info.world_size * nproc,
                }
            }
        };
        let spec = group_spec(
            &args,
            &command,
            nproc,
            &run_id,
            restart_count,
            &log_root,
            Placement {
                round: info.round,
                group_rank: info.rank,
                group_world_size: info.world_size,
                global,
            },
            &master,
        );
        let first = global.first;
        tracing::info!(
            round = info.round,
            group_rank = info.rank,
            group_world_size = info.world_size,
            ranks = %format!("{first}..{}", first + nproc),
            world_size = global.world_size,
            master = %format!("{}:{}", master.addr, master.port),
            restart_count,
            "starting workers"
        );
        let mut group = match WorkerGroup::start(&spec).await {
            Ok(g) => g,
            Err(e) => {
                let _ = handler.shutdown().await;
                return Err(e);
            }
        };
        let outcome = monitor(
            &mut group,
            info.round,
            &mut events,
            &mut signals,
            args.monitor_interval,
        )
        .await;
        match outcome {
            Outcome::Succeeded => {
                group.drain().await;
                let signal = exit_barrier(
                    &*info.store,
                    info.world_size,
                    args.exit_barrier_timeout,
                    &mut events,
                    &mut signals,
                )
                .await;
                if let Some(sig) = signal {
                    let _ = handler.shutdown().await;
                    return Ok(ExitCode::from(sig.exit_code()));
                }
                if let Err(e) = handler.detach().await {
                    tracing::warn!(error = %e, "could not leave the rendezvous cleanly");
                }
                tracing::info!(round = info.round, "all workers succeeded");
                return Ok(ExitCode::SUCCESS);
            }
            Outcome::Failed(failure) => {
                group.stop(args.grace_period).await;
                // The budget is the job's: one failed round counts once, whichever nodes'
                // workers failed in it.
                let failed = match handler.record_failed_round(info.round).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot count the failure in etcd; counting it on this node");
                        u64::from(restart_count) + 1
                    }
                };
                if failed <= u64::from(args.max_restarts) {
                    restart_count = u32::try_from(failed).unwrap_or(u32::MAX);
                    log_restart(&failure, restart_count, args.max_restarts);
                    continue;
                }
                report_failure(
                    &summary::Context {
                        entrypoint: &entrypoint(&args.command),
                        hostname: &handler.node_record().hostname,
                        run_id: &run_id,
                        round: info.round,
                        group_rank: info.rank,
                    },
                    group.failures(),
                );
                if let Err(e) = handler.set_closed().await {
                    tracing::warn!(error = %e, "could not close the run");
                }
                let _ = handler.shutdown().await;
                return Ok(ExitCode::FAILURE);
            }
            Outcome::MembershipChanged(why) => {
                tracing::info!(
                    round = info.round,
                    "{why}: restarting the workers into the next round"
                );
                group.stop(args.grace_period).await;
            }
            Outcome::Closed => {
                group.stop(args.grace_period).await;
                eprintln!("rdzv run: the run '{run_id}' was closed by another node; stopping");
                let _ = handler.shutdown().await;
                return Ok(ExitCode::FAILURE);
            }
            Outcome::Signal(sig) => {
                tracing::info!(signal = sig.signo(), "stopping the workers");
                group.stop_with(sig.signo(), args.grace_period).await;
                let _ = handler.shutdown().await;
                return Ok(ExitCode::from(sig.exit_code()));
            }
        }
    }
}

fn worker_env(
    args: &RunArgs,
    nproc: usize,
    run_id: &str,
    restart_count: u32,
    round: u64,
    master: &rdzv::bootstrap::MasterInfo,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        env.insert(k.to_string(), v);
    };
    set("ROLE_NAME", args.role.clone());
    set("MASTER_ADDR", master.addr.clone());
    set("MASTER_PORT", master.port.to_string());
    set("TORCHELASTIC_RESTART_COUNT", restart_count.to_string());
    set("TORCHELASTIC_MAX_RESTARTS", args.max_restarts.to_string());
    set("TORCHELASTIC_RUN_ID", run_id.to_string());
    set("TORCHELASTIC_USE_AGENT_STORE", "False".into());
    set(
        "TORCHELASTIC_SIGNALS_TO_HANDLE",
        args.signals_to_handle.clone(),
    );
    // Not torchrun's: the rendezvous round the workers were started for (for logs and checks).
    set("RDZV_ROUND", round.to_string());
    set(
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        std::env::var("TORCH_NCCL_ASYNC_ERROR_HANDLING").unwrap_or_else(|_| "1".into()),
    );
    // As torchrun: one OpenMP thread per worker when several share the node, unless set.
    if nproc > 1 && std::env::var_os("OMP_NUM_THREADS").is_none() {
        set("OMP_NUM_THREADS", "1".into());
    }
    // The workers inherit the agent's environment, but never rdzv's credentials.
    if let Ok(conf) = std::env::var("PET_RDZV_CONF") {
        set("PET_RDZV_CONF", rdzv::secrets::without_secret_items(&conf));
    }
    env
}

async fn monitor(
    group: &mut WorkerGroup,
    round: u64,
    events: &mut broadcast::Receiver<MembershipEvent>,
    signals: &mut TerminationSignals,
    interval: Duration,
) -> Outcome {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => match group.poll() {
                GroupState::Running => {}
                GroupState::Succeeded => return Outcome::Succeeded,
                GroupState::Failed(f) => return Outcome::Failed(f),
            },
            outcome = membership_change(events, round) => return outcome,
            event = signals.next() => match event {
                SignalEvent::Stop(sig) => return Outcome::Signal(sig),
                SignalEvent::Forward(signo) => {
                    tracing::info!(signal = signo, "forwarding the signal to the workers");
                    group.signal(signo);
                }
            },
        }
    }
}

/// [`round_end`] as an [`Outcome`].
async fn membership_change(
    events: &mut broadcast::Receiver<MembershipEvent>,
    current: u64,
) -> Outcome {
    match round_end(events, current, true).await {
        RoundEnd::Closed => Outcome::Closed,
        RoundEnd::Changed(why) => Outcome::MembershipChanged(why),
    }
}

/// Waits until every node of the round has succeeded (or the run closes, or the timeout);
/// returns the signal that interrupted the wait, if one did.
async fn exit_barrier(
    store: &dyn Store,
    world_size: usize,
    timeout: Duration,
    events: &mut broadcast::Receiver<MembershipEvent>,
    signals: &mut TerminationSignals,
) -> Option<Termination> {
    const COUNT: &str = "rdzv/exit_barrier/count";
    const DONE: &str = "rdzv/exit_barrier/done";
    let wait = async {
        let n = store.add(COUNT, 1).await?;
        if n as usize >= world_size {
            store.set(DONE, b"1").await?;
        }
        store.get_timeout(DONE, timeout).await.map(|_| ())
    };
    // A node known lost will never arrive: do not wait for it (nor after the run closed).
    let gone = async {
        loop {
            match events.recv().await {
                Ok(MembershipEvent::Closed) | Err(broadcast::error::RecvError::Closed) => {
                    return "the run was closed".to_string()
                }
                Ok(MembershipEvent::PeerLost { node_id, .. }) => {
                    return format!("node {node_id} was lost")
                }
                Ok(MembershipEvent::MembershipLost { .. }) => {
                    return "this node's membership was lost".to_string()
                }
                _ => {}
            }
        }
    };
    tokio::select! {
        r = wait => if let Err(e) = r {
            tracing::warn!(error = %e, "exit barrier: not every node confirmed success");
        },
        why = gone => tracing::info!("exit barrier: {why}; not waiting for the others"),
        sig = signals.recv() => return Some(sig),
    }
    None
}

/// True for a loopback address (`127.0.0.0/8`, `::1`, `localhost`).
fn is_loopback(addr: &str) -> bool {
    let bare = addr.trim_matches(|c| c == '[' || c == ']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Where this node's workers sit in a round.
struct Placement {
    round: u64,
    group_rank: usize,
    group_world_size: usize,
    global: rdzv::GlobalRanks,
}

/// One attempt of the local group, for either backend.
#[allow(clippy::too_many_arguments)]
fn group_spec(
    args: &RunArgs,
    command: &[OsString],
    nproc: usize,
    run_id: &str,
    restart_count: u32,
    log_root: &std::path::Path,
    at: Placement,
    master: &rdzv::bootstrap::MasterInfo,
) -> GroupSpec {
    GroupSpec {
        command: command.to_vec(),
        env: worker_env(args, nproc, run_id, restart_count, at.round, master),
        env_remove: vec![rdzv::secrets::PASSWORD_ENV.to_string()],
        nproc,
        group_rank: at.group_rank,
        group_world_size: at.group_world_size,
        first_rank: at.global.first,
        world_size: at.global.world_size,
        attempt_dir: log_root.join(format!("attempt_{restart_count}")),
        redirects: args.redirects.clone(),
        tee: args.tee.clone(),
        console: console_spec(args),
        duplicate_stdout: args.duplicate_stdout_filters.clone(),
        duplicate_stderr: args.duplicate_stderr_filters.clone(),
        virtual_local_rank: args
            .virtual_local_rank
            .then(|| VirtualLocalRank::from_env(|k| std::env::var(k).ok())),
    }
}

/// The console settings of the workers' output.
fn console_spec(args: &RunArgs) -> ConsoleSpec {
    ConsoleSpec {
        prefix_template: args.log_line_prefix_template.clone(),
        local_ranks: args.local_ranks_filter.clone(),
        role: args.role.clone(),
        hostname: rdzv::etcd::node::hostname(),
    }
}

/// The log line of a restart after a failure.
fn log_restart(failure: &Failure, restart_count: u32, max_restarts: u32) {
    tracing::warn!(
        rank = failure.rank,
        exit = %failure.describe_exit(),
        restart_count,
        max_restarts,
        "worker failed; restarting the group"
    );
}

/// What the summary calls the job: the training script, module or program.
fn entrypoint(command: &[OsString]) -> String {
    command
        .first()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Prints torchrun's failure summary and writes the root cause to the agent's own
/// `TORCHELASTIC_ERROR_FILE`, if it has one.
fn report_failure(ctx: &summary::Context<'_>, failures: &[Failure]) {
    if failures.is_empty() {
        return;
    }
    eprintln!("{}", summary::format_summary(ctx, failures));
    let Some(dest) = std::env::var_os("TORCHELASTIC_ERROR_FILE").filter(|d| !d.is_empty()) else {
        return;
    };
    let root = summary::root_cause(failures).unwrap_or(0);
    if let Err(e) = summary::write_agent_error_file(std::path::Path::new(&dest), &failures[root]) {
        tracing::warn!(error = %e, file = %std::path::Path::new(&dest).display(), "cannot write the agent's error file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_are_recognised() {
        for lo in ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"] {
            assert!(is_loopback(lo), "{lo}");
        }
        for other in ["10.0.0.1", "fe80::1", "node-a", ""] {
            assert!(!is_loopback(other), "{other}");
        }
    }

    #[test]
    fn duration_flags_are_bounded() {
        assert_eq!(monitor_interval("0.1"), Ok(Duration::from_millis(100)));
        assert_eq!(monitor_interval("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["0", "0s", "2h", "18446744073709551615", "-1", "x"] {
            assert!(monitor_interval(bad).is_err(), "{bad}");
        }
        assert_eq!(timeout("0"), Ok(Duration::ZERO));
        assert_eq!(timeout("7d"), Ok(rdzv::MAX_TIMEOUT));
        for bad in ["8d", "18446744073709551615", "-5s"] {
            let reason = timeout(bad).unwrap_err();
            assert!(
                reason.contains("7d") || reason.contains("negative"),
                "{bad}: {reason}"
            );
        }
    }
}
