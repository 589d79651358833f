//! `rdzv etcd`: a local etcd for standalone use.

use std::process::ExitCode;

/// Arguments of `rdzv etcd`.
#[derive(Debug, clap::Args)]
pub struct EtcdArgs {}

/// Runs `rdzv etcd`.
pub async fn run(args: EtcdArgs) -> anyhow::Result<ExitCode> {
    let _ = args;
    todo!()
}
