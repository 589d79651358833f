//! The rendezvous flags shared by `run`, `join`, `status` and `close`, with torchrun's names
//! and environment variables (`PET_*`, as Kubernetes operators set them).

use anyhow::Context;
use rdzv::etcd::{ConnectionOptions, RendezvousSettings};
use rdzv::RendezvousParameters;

use crate::usage::usage;

/// `--nnodes N` or `--nnodes MIN:MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeRange {
    /// Minimum number of nodes.
    pub min: usize,
    /// Maximum number of nodes.
    pub max: usize,
}

impl std::str::FromStr for NodeRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let num = |s: &str| -> Result<usize, String> {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{s}` is not a number of nodes"))
        };
        let (min, max) = match text.split_once(':') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let n = num(text)?;
                (n, n)
            }
        };
        if min < 1 {
            return Err("the minimum number of nodes must be at least 1".into());
        }
        if max < min {
            return Err(format!("the maximum ({max}) is below the minimum ({min})"));
        }
        Ok(Self { min, max })
    }
}

/// Where the rendezvous is: endpoint, run id, backend and its configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct RendezvousTarget {
    /// Rendezvous backend.
    #[arg(
        long = "rdzv-backend",
        alias = "rdzv_backend",
        env = "PET_RDZV_BACKEND",
        default_value = "etcd"
    )]
    pub backend: String,

    /// Backend endpoint(s): host[:port], [ipv6]:port, comma-separated for an etcd cluster.
    #[arg(
        long = "rdzv-endpoint",
        alias = "rdzv_endpoint",
        env = "PET_RDZV_ENDPOINT",
        default_value = ""
    )]
    pub endpoint: String,

    /// The job's id; every node of one job uses the same one. Required: unlike torchrun,
    /// there is no default shared by every job.
    #[arg(long = "rdzv-id", alias = "rdzv_id", env = "PET_RDZV_ID")]
    pub run_id: Option<String>,

    /// Backend configuration `key=value,...` (e.g. `timeout=60,last_call_timeout=5`). Unknown
    /// keys and keys given twice are errors; durations are bounded (`timeout` 1ms to 7d,
    /// `retention` 2s to 365d, ...).
    #[arg(
        long = "rdzv-conf",
        alias = "rdzv_conf",
        env = "PET_RDZV_CONF",
        default_value = ""
    )]
    pub conf: String,
}

impl RendezvousTarget {
    /// Parameters for this target with the given node range and options, with the whole
    /// configuration checked as the etcd backend will read it (endpoints, keys, values), so
    /// that configuration errors are found before anything is started or connected to.
    ///
    /// # Errors
    /// A usage error (exit code 2, see [`crate::usage`]) if a value is invalid: empty
    /// endpoint, missing run id, another backend than etcd, bad configuration string, unknown
    /// key, value out of range, ...
    pub fn parameters(
        &self,
        nodes: NodeRange,
        local_addr: Option<&str>,
        node_rank: Option<u64>,
    ) -> anyhow::Result<RendezvousParameters> {
        if self.endpoint.trim().is_empty() {
            return Err(usage("--rdzv-endpoint (or PET_RDZV_ENDPOINT) is required"));
        }
        let Some(run_id) = self.run_id.as_deref() else {
            return Err(usage(
                "--rdzv-id (or PET_RDZV_ID) is required: every job needs its own id",
            ));
        };
        match self.backend.trim() {
            "etcd" => {}
            "etcd-v2" => tracing::warn!(
                "--rdzv-backend etcd-v2: rdzv speaks its own protocol over the etcd v3 API (as \
                 the `etcd` backend); it cannot join PyTorch's etcd-v2 rendezvous"
            ),
            other => {
                return Err(usage(format!(
                    "--rdzv-backend (or PET_RDZV_BACKEND) '{other}' is not supported: rdzv \
                     implements the `etcd` backend (over the etcd v3 API)"
                )))
            }
        }
        let mut params =
            RendezvousParameters::new(&self.backend, &self.endpoint, run_id, nodes.min, nodes.max)?
                .with_config_str(&self.conf)
                .context("invalid --rdzv-conf")?;
        if let Some(addr) = local_addr {
            params = params.with_local_addr(addr);
        }
        if let Some(rank) = node_rank {
            params = params.with_config("node_rank", rank.to_string());
        }
        ConnectionOptions::from_parameters(&params)?;
        RendezvousSettings::from_parameters(&params)?;
        Ok(params)
    }

    /// Checks everything but the endpoint and run id (for `--standalone`, before its etcd is
    /// started and its run id drawn).
    ///
    /// # Errors
    /// As [`RendezvousTarget::parameters`].
    pub fn check_without_endpoint(
        &self,
        nodes: NodeRange,
        local_addr: Option<&str>,
        node_rank: Option<u64>,
    ) -> anyhow::Result<()> {
        let probe = Self {
            endpoint: "127.0.0.1".into(),
            run_id: Some("standalone".into()),
            ..self.clone()
        };
        probe.parameters(nodes, local_addr, node_rank).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ranges() {
        assert_eq!("4".parse::<NodeRange>(), Ok(NodeRange { min: 4, max: 4 }));
        assert_eq!("1:3".parse::<NodeRange>(), Ok(NodeRange { min: 1, max: 3 }));
        for bad in ["0", "3:2", "x", "1:", ":2", "-1", "0:0"] {
            assert!(bad.parse::<NodeRange>().is_err(), "{bad}");
        }
    }
}
