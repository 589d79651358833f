//! `rdzv join`: a one-shot barrier for shell and batch scripts.
//!
//! ```sh
//! eval "$(rdzv join --rdzv-endpoint etcd:2379 --rdzv-id job42 --nnodes 4)"
//! echo "I am $RANK of $WORLD_SIZE; master at $MASTER_ADDR:$MASTER_PORT"
//! ```

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use rdzv::etcd::EtcdRendezvousHandler;
use rdzv::RendezvousHandler;

use super::membership::{round_end, RoundEnd};
use super::rdzv_args::{NodeRange, RendezvousTarget};

/// Arguments of `rdzv join`.
#[derive(Debug, clap::Args)]
pub struct JoinArgs {
    #[command(flatten)]
    target: RendezvousTarget,

    /// Number of nodes: N, or MIN:MAX for an elastic round.
    #[arg(long, env = "PET_NNODES", default_value = "1")]
    nnodes: NodeRange,

    /// The address this node advertises (MASTER_ADDR if it gets rank 0).
    #[arg(long = "local-addr", alias = "local_addr", env = "PET_LOCAL_ADDR")]
    local_addr: Option<String>,

    /// A hint for this node's place in the first round's rank order.
    #[arg(long = "node-rank", alias = "node_rank", env = "PET_NODE_RANK")]
    node_rank: Option<u64>,

    /// Print one JSON object instead of shell assignments.
    #[arg(long)]
    json: bool,

    /// Stay a member until killed or interrupted, instead of leaving after printing (for
    /// debugging and fault tests: a SIGKILL then looks like a crashed node).
    #[arg(long, hide = true)]
    hold: bool,
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/@%+=,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs `rdzv join`.
///
/// # Errors
/// A usage error (exit code 2) if the parameters are invalid; another error if etcd cannot be
/// reached or the round fails (closed, timeout, foreign state).
pub async fn run(args: JoinArgs) -> anyhow::Result<ExitCode> {
    let params = args
        .target
        .parameters(args.nnodes, args.local_addr.as_deref(), args.node_rank)?;
    let mut signals = if args.hold {
        Some(super::signals::TerminationSignals::install()?)
    } else {
        None
    };
    let handler = EtcdRendezvousHandler::connect(&params)
        .await
        .context("cannot join the rendezvous")?;
    let mut events = handler
        .subscribe()
        .context("the etcd handler pushes events")?;
    let addr = handler.advertised_addr();
    // A peer lost before rank 0 published MASTER_ADDR makes the round useless: join again.
    let (info, master) = loop {
        let info = handler.next_rendezvous().await?;
        let exchange = rdzv::bootstrap::exchange_master(
            &*info.store,
            info.rank,
            &addr,
            Duration::from_secs(60),
        );
        tokio::select! {
            biased;
            end = round_end(&mut events, info.round, false) => match end {
                RoundEnd::Closed => {
                    return Err(anyhow::anyhow!(
                        "the run '{}' was closed before the round could be used",
                        handler.run_id()
                    ));
                }
                RoundEnd::Changed(why) => {
                    tracing::info!(round = info.round, "{why}: joining again");
                }
            },
            master = exchange => break (info, master?),
        }
    };
    let out = if args.json {
        serde_json::json!({
            "rank": info.rank,
            "world_size": info.world_size,
            "round": info.round,
            "run_id": handler.run_id(),
            "master_addr": master.addr,
            "master_port": master.port,
            "node_id": handler.node_id(),
        })
        .to_string()
    } else {
        [
            format!("RANK={}", info.rank),
            format!("WORLD_SIZE={}", info.world_size),
            format!("MASTER_ADDR={}", shell_quote(&master.addr)),
            format!("MASTER_PORT={}", master.port),
            format!("RUN_ID={}", shell_quote(handler.run_id())),
            format!("ROUND={}", info.round),
        ]
        .join("\n")
    };
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{out}")?;
        stdout.flush()?;
    }
    if let Some(signals) = signals.as_mut() {
        signals.recv().await;
        handler.shutdown().await?;
    } else {
        handler.detach().await?;
    }
    Ok(ExitCode::SUCCESS)
}
