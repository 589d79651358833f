//! `rdzv-sim`: runs the deterministic simulation for many seeds (the soak version of the
//! suite's simulation test) and prints what it found.
//!
//! ```text
//! cargo run --release -p rdzv-sim -- --seeds 10000            # seeds 0..10000
//! cargo run --release -p rdzv-sim -- --seed 1234 --verbose    # replay one seed, with logs
//! ```

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

/// Deterministic simulation of rdzv's rendezvous.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Number of seeds to run.
    #[arg(long, default_value_t = 200)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Run this one seed only.
    #[arg(long)]
    seed: Option<u64>,
    /// Log the protocol (RUST_LOG syntax, default debug) while running.
    #[arg(long)]
    verbose: bool,
    /// Stop at the first failing seed.
    #[arg(long)]
    fail_fast: bool,
}

/// Log timestamps in simulated milliseconds since the run started.
struct SimTime;

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        thread_local! {
            static START: std::cell::OnceCell<tokio::time::Instant> = const { std::cell::OnceCell::new() };
        }
        match tokio::runtime::Handle::try_current() {
            Ok(_) => {
                let now = tokio::time::Instant::now();
                let start = START.with(|s| *s.get_or_init(|| now));
                write!(w, "{:>8}ms", now.duration_since(start).as_millis())
            }
            Err(_) => write!(w, "        -"),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.verbose {
        tracing_subscriber::fmt()
            .with_timer(SimTime)
            .with_ansi(false)
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "debug".into()),
            )
            .init();
    }
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => (args.from..args.from + args.seeds).collect(),
    };
    let started = Instant::now();
    let (mut rounds, mut faults, mut checks, mut reopens, mut failed) = (0, 0, 0, 0, Vec::new());
    for seed in seeds.iter().copied() {
        let report = rdzv_sim::run_seed(seed);
        rounds += report.rounds;
        faults += report.fault_count();
        checks += report.checks;
        reopens += report.reopens;
        if !report.passed() || args.seed.is_some() {
            println!(
                "seed {seed}: {} — {} round(s), {} fault(s) {:?}, {} check(s), trace {:016x}",
                report.config,
                report.rounds,
                report.fault_count(),
                report.faults,
                report.checks,
                report.trace
            );
            for v in &report.violations {
                println!("  VIOLATION {v}");
            }
        }
        if report.violations.iter().any(|v| v.starts_with("livelock")) {
            println!("seed {seed} livelocked; exiting (its thread still spins)");
            failed.push(seed);
            break;
        }
        if !report.passed() {
            failed.push(seed);
            if args.fail_fast {
                break;
            }
        }
    }
    println!(
        "{} seed(s), {rounds} round(s), {faults} fault(s), {reopens} restart(s) of a closed run, \
         {checks} check(s) in {:.1} s; failed: {failed:?}",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
