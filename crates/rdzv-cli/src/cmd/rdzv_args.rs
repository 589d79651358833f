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
    /// Rendezvous backend: `etcd-v3` (rdzv's protocol over the etcd v3 API; the default),
    /// `etcd` and `etcd-v2` (the same), or, for `run`, `static` (fixed nodes, no
    /// rendezvous service).
    #[arg(
        long = "rdzv-backend",
        alias = "rdzv_backend",
        env = "PET_RDZV_BACKEND"
    )]
    pub backend: Option<String>,

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

/// What `--rdzv-backend` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// rdzv's protocol over etcd v3, under the name given (`etcd-v3`, `etcd`, `etcd-v2`).
    Etcd(String),
    /// torchrun's `static`: fixed nodes, ranks from `--node-rank`, no rendezvous service.
    Static,
    /// torchrun's `c10d`: the node whose address is the endpoint's host serves the rendezvous
    /// (an etcd that `rdzv run` starts there), the others connect to it.
    C10d,
    /// Anything else.
    Unknown(String),
}

/// The backends `rdzv run` knows, for error messages.
pub const BACKENDS: &str = "etcd-v3 (the default), etcd, etcd-v2 (the same protocol over the \
                            etcd v3 API), c10d (an etcd served by the endpoint's host) and static";

/// The error for an unknown backend.
pub fn unknown_backend(name: &str) -> String {
    format!("--rdzv-backend (or PET_RDZV_BACKEND) '{name}' is not supported; rdzv's backends are {BACKENDS}")
}

impl RendezvousTarget {
    /// The backend asked for (`etcd-v3` if none was given).
    pub fn backend_kind(&self) -> Backend {
        match self.backend.as_deref().map(str::trim) {
            None | Some("") => Backend::Etcd("etcd-v3".into()),
            Some(name @ ("etcd-v3" | "etcd")) => Backend::Etcd(name.into()),
            Some("etcd-v2") => {
                tracing::warn!(
                    "--rdzv-backend etcd-v2: rdzv speaks its own protocol over the etcd v3 API \
                     (etcd's v2 API is not used, and was removed in etcd 3.6); it cannot join \
                     PyTorch's etcd-v2 rendezvous"
                );
                Backend::Etcd("etcd-v2".into())
            }
            Some("static") => Backend::Static,
            Some("c10d") => Backend::C10d,
            Some(other) => Backend::Unknown(other.into()),
        }
    }

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
        let backend =
            match self.backend_kind() {
                Backend::Etcd(name) => name,
                // The etcd a c10d host serves is an etcd like any other for join, status, close.
                Backend::C10d => "c10d".to_string(),
                Backend::Static => return Err(usage(
                    "--rdzv-backend static has no rendezvous service: it is for `rdzv run` only",
                )),
                Backend::Unknown(name) => return Err(usage(unknown_backend(&name))),
            };
        let mut params =
            RendezvousParameters::new(&backend, &self.endpoint, run_id, nodes.min, nodes.max)?
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
