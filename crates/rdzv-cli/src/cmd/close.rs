//! `rdzv close`: closes a run, so that every pending and later rendezvous of it fails (and
//! launchers stop). Unlike a run closed by its own nodes after a failure, which starts again
//! once they have all exited (a pod restart, a requeue), a run an operator closed stays
//! closed for its retention.

use std::process::ExitCode;

use rdzv::etcd::keys::RunKeys;
use rdzv::etcd::{run_exists, ConnectionOptions, EtcdRendezvousHandler, RendezvousSettings};
use rdzv::{RendezvousError, RendezvousHandler};

use super::rdzv_args::{NodeRange, RendezvousTarget};

/// Arguments of `rdzv close`.
#[derive(Debug, clap::Args)]
pub struct CloseArgs {
    #[command(flatten)]
    target: RendezvousTarget,

    /// Close the run even if it does not exist (yet): it is then closed in advance, for its
    /// `retention` (default 1h), and every node that joins it meanwhile fails. (A closed run
    /// stays closed for its retention whether it existed or not; a run its own nodes closed
    /// after a failure starts again once they have exited, unless `rdzv close` closed it.)
    #[arg(long)]
    force: bool,
}

/// Runs `rdzv close`.
///
/// # Errors
/// A usage error (exit code 2) for bad parameters; [`rdzv::RendezvousError::NoSuchRun`] if the
/// run does not exist and `--force` is not given; another error if etcd cannot be reached or
/// holds a foreign state.
pub async fn run(args: CloseArgs) -> anyhow::Result<ExitCode> {
    let params = args
        .target
        .parameters(NodeRange { min: 1, max: 1 }, None, None)?;
    let settings = RendezvousSettings::from_parameters(&params)?;
    let client = ConnectionOptions::from_parameters(&params)?
        .connect_failover(Default::default())
        .await?;
    let keys = RunKeys::new(&settings.prefix, &params.run_id);
    let existed = run_exists(&client, &keys).await?;
    if !existed && !args.force {
        return Err(anyhow::Error::new(RendezvousError::NoSuchRun {
            run_id: params.run_id.clone(),
        })
        .context("nothing to close (--force closes it in advance)"));
    }
    let retention = settings.retention;
    let handler = EtcdRendezvousHandler::with_client(client, &params, settings).await?;
    handler.close_by_operator().await?;
    handler.shutdown().await?;
    if existed {
        eprintln!("closed run '{}'", params.run_id);
    } else {
        eprintln!(
            "closed run '{}' in advance (it did not exist): for {}",
            params.run_id,
            humantime::format_duration(retention)
        );
    }
    Ok(ExitCode::SUCCESS)
}
