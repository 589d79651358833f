//! The simulator in the suite: many seeded runs of the shipped protocol with random faults,
//! every invariant checked after every change of etcd.
//!
//! `RDZV_SIM_SEEDS=<n>` (and `RDZV_SIM_FROM=<first>`) run more seeds, for soak; or use the
//! `rdzv-sim` binary: `cargo run --release -p rdzv-sim -- --seeds 100000`.

use std::time::Instant;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

#[test]
fn ten_thousand_simulated_rounds_with_faults_keep_every_invariant() {
    let seeds = env_u64("RDZV_SIM_SEEDS", 2000);
    let from = env_u64("RDZV_SIM_FROM", 0);
    let started = Instant::now();
    let (mut rounds, mut faults, mut checks, mut views, mut reopens) = (0, 0, 0, 0, 0);
    let mut failed = Vec::new();
    for seed in from..from + seeds {
        let report = rdzv_sim::run_seed(seed);
        rounds += report.rounds;
        faults += report.fault_count();
        checks += report.checks;
        views += report.views;
        reopens += report.reopens;
        if !report.passed() {
            failed.push(format!(
                "seed {seed} ({}): {:#?}",
                report.config, report.violations
            ));
        }
    }
    println!(
        "{seeds} seed(s) from {from}: {rounds} round(s), {views} view(s), {faults} fault(s), \
         {reopens} restart(s) of a closed run, {checks} check(s) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        failed.is_empty(),
        "{} seed(s) violated invariants (replay one with `cargo run -p rdzv-sim -- --seed N \
         --verbose`):\n{}",
        failed.len(),
        failed.join("\n")
    );
    if seeds >= 2000 {
        assert!(rounds >= 10_000, "only {rounds} rounds were simulated");
        assert!(
            reopens >= 10,
            "a closed run started again only {reopens} time(s)"
        );
    }
}
