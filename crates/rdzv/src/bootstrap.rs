//! MASTER_ADDR / MASTER_PORT for the workers of a round, as PyTorch's
//! `RendezvousStoreInfo.build`: the node with rank 0 picks a free port on its advertised
//! address and publishes both through the round's store; every node reads them back.

use std::net::{IpAddr, TcpListener};
use std::time::Duration;

use crate::{RendezvousError, Store};

/// Store key of the master address.
pub const MASTER_ADDR_KEY: &str = "MASTER_ADDR";
/// Store key of the master port.
pub const MASTER_PORT_KEY: &str = "MASTER_PORT";

/// Where the workers' rank 0 listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterInfo {
    /// Address (IPv6 without brackets, as `MASTER_ADDR` expects).
    pub addr: String,
    /// Port.
    pub port: u16,
}

/// A free TCP port on `addr` (or on all addresses if `addr` cannot be bound). The port is not
/// reserved: the workers bind it soon after, as with torchrun.
///
/// # Errors
/// [`RendezvousError::Other`] if no port can be bound at all.
pub fn free_port(addr: &str) -> Result<u16, RendezvousError> {
    let ip: Option<IpAddr> = addr.trim_matches(|c| c == '[' || c == ']').parse().ok();
    let listener = match ip {
        Some(ip) => TcpListener::bind((ip, 0)).or_else(|_| TcpListener::bind(("0.0.0.0", 0))),
        None => TcpListener::bind(("0.0.0.0", 0)),
    }
    .map_err(|e| RendezvousError::Other(format!("cannot pick a free port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| RendezvousError::Other(format!("cannot pick a free port: {e}")))
}

/// Rank 0 publishes `advertised_addr` and a free port; every rank returns what rank 0
/// published (waiting at most `timeout`).
///
/// # Errors
/// [`RendezvousError::Timeout`] if rank 0 does not publish in time; [`RendezvousError::State`]
/// if the published port is not a number.
///
/// # Cancel safety
/// Cancel safe.
pub async fn exchange_master(
    store: &dyn Store,
    rank: usize,
    advertised_addr: &str,
    timeout: Duration,
) -> Result<MasterInfo, RendezvousError> {
    if rank == 0 {
        let addr = advertised_addr.trim_matches(|c| c == '[' || c == ']');
        let port = free_port(addr)?;
        store.set(MASTER_ADDR_KEY, addr.as_bytes()).await?;
        store
            .set(MASTER_PORT_KEY, port.to_string().as_bytes())
            .await?;
    }
    let addr =
        String::from_utf8_lossy(&store.get_timeout(MASTER_ADDR_KEY, timeout).await?).into_owned();
    let port_text =
        String::from_utf8_lossy(&store.get_timeout(MASTER_PORT_KEY, timeout).await?).into_owned();
    let port = port_text.parse().map_err(|_| {
        RendezvousError::State(format!(
            "MASTER_PORT in the store is '{port_text}', not a port"
        ))
    })?;
    Ok(MasterInfo { addr, port })
}
