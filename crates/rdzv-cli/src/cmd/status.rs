//! `rdzv status`: what a run looks like now: closed or not, the open round and who waits in
//! it, the last completed round and its members (alive or not).

use std::process::ExitCode;

use rdzv::etcd::keys::RunKeys;
use rdzv::etcd::{read_status, ConnectionOptions, RendezvousSettings};

use super::rdzv_args::{NodeRange, RendezvousTarget};

/// Arguments of `rdzv status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    target: RendezvousTarget,

    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `rdzv status`.
///
/// # Errors
/// If etcd cannot be reached or holds records we cannot read.
pub async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let params = args
        .target
        .parameters(NodeRange { min: 1, max: 1 }, None, None)?;
    let settings = RendezvousSettings::from_parameters(&params)?;
    // The failover client: the diagnosis tool must work while members are down.
    let client = ConnectionOptions::from_parameters(&params)?
        .connect_failover(Default::default())
        .await?;
    let keys = RunKeys::new(&settings.prefix, &params.run_id);
    let status = read_status(&client, &keys, &params.run_id).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("run:        {}", status.run_id);
    match &status.closed_by {
        Some(c) if c.by_operator => println!(
            "closed:     yes, by an operator ({}): it stays closed",
            c.by
        ),
        Some(c) => println!(
            "closed:     yes, by its node {} (the job failed): it starts again once its live \
             nodes have exited",
            c.by
        ),
        None => println!("closed:     no"),
    }
    println!("nodes:      {} live", status.agents);
    println!(
        "restarts:   {} (failed rounds of the job)",
        status.failed_rounds
    );
    println!(
        "open round: {} ({} node(s) joined)",
        status.open_round,
        status.waiting.len()
    );
    if let Some(lc) = &status.last_call {
        println!(
            "last call:  armed by {} (completes {:.1}s after it was armed)",
            lc.writer,
            lc.duration_ms as f64 / 1000.0
        );
    }
    for n in &status.waiting {
        let what = if status.spares.contains(&n.node_id) {
            "spare  "
        } else {
            "waiting"
        };
        println!(
            "  {what}   {}  {}  {}",
            n.node_id,
            n.hostname,
            n.addrs.join(",")
        );
    }
    match &status.last_round {
        Some(r) => {
            println!("last round: {} (world size {})", r.round, r.world_size);
            for m in &status.members {
                println!(
                    "  rank {:>4}  {:<5}  {}  {}  {}",
                    m.rank,
                    if m.node.detached {
                        "done"
                    } else if m.alive {
                        "alive"
                    } else {
                        "gone"
                    },
                    m.node.node_id,
                    m.node.hostname,
                    m.node.addrs.join(",")
                );
            }
        }
        None => println!("last round: none completed yet"),
    }
    Ok(ExitCode::SUCCESS)
}
