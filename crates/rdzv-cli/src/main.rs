//! The `rdzv` command.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error, 128 + N stopped
//! by signal N (see [`usage`]).

mod cmd;
mod usage;

use clap::{Parser, Subcommand};

/// mimalloc: an agent's (and the bench's) many small allocations — gRPC frames, watch
/// events, records — cost about a fifth of the client's CPU with glibc's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Elastic rendezvous and launcher for distributed training jobs over etcd v3.
#[derive(Debug, Parser)]
#[command(name = "rdzv", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a local etcd on free loopback ports; print its endpoint (host:port) on the first
    /// line of standard output; stop cleanly on Ctrl-C or SIGTERM.
    Etcd(cmd::etcd::EtcdArgs),
    /// Run an elastic job: join the rendezvous, start the local workers with torchrun's
    /// environment, restart them on failures and membership changes.
    Run(Box<cmd::run::RunArgs>),
    /// Join the next round once and print RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, RUN_ID
    /// and ROUND as shell assignments (or JSON), for `eval "$(rdzv join ...)"`.
    Join(cmd::join::JoinArgs),
    /// Show a run: closed or not, the open round and who waits in it, the last round's members.
    Status(cmd::status::StatusArgs),
    /// Close a run: every pending and later rendezvous of it fails.
    Close(cmd::close::CloseArgs),
    /// Measure what a rendezvous round costs as the job grows (time, etcd requests, CPU,
    /// memory), with participants simulated in this process or (`--processes`) spread over
    /// child processes.
    Bench(cmd::bench::BenchArgs),
    /// (Internal) one child process of `rdzv bench --processes`, directed on its standard
    /// input.
    #[command(name = "bench-child", hide = true)]
    BenchChild,
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("RDZV_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rdzv: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Etcd(args) => cmd::etcd::run(args).await,
            Command::Run(args) => cmd::run::run(*args).await,
            Command::Join(args) => cmd::join::run(args).await,
            Command::Status(args) => cmd::status::run(args).await,
            Command::Close(args) => cmd::close::run(args).await,
            Command::Bench(args) => cmd::bench::run(args).await,
            Command::BenchChild => cmd::bench::run_child().await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rdzv: error: {e:#}");
            std::process::ExitCode::from(usage::exit_code(&e))
        }
    }
}
