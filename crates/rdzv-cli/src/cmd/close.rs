//! `rdzv close`: closes a run, so that every pending and later rendezvous of it fails (and
//! launchers stop).

use std::process::ExitCode;

use rdzv::etcd::EtcdRendezvousHandler;
use rdzv::RendezvousHandler;

use super::rdzv_args::{NodeRange, RendezvousTarget};

/// Arguments of `rdzv close`.
#[derive(Debug, clap::Args)]
pub struct CloseArgs {
    #[command(flatten)]
    target: RendezvousTarget,
}

/// Runs `rdzv close`.
///
/// # Errors
/// If etcd cannot be reached.
pub async fn run(args: CloseArgs) -> anyhow::Result<ExitCode> {
    let params = args
        .target
        .parameters(NodeRange { min: 1, max: 1 }, None, None)?;
    let handler = EtcdRendezvousHandler::connect(&params).await?;
    handler.set_closed().await?;
    handler.shutdown().await?;
    eprintln!("closed run '{}'", params.run_id);
    Ok(ExitCode::SUCCESS)
}
