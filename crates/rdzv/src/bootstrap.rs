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
/// It is drawn below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), so that
/// between now and the workers' bind no outgoing connection of this host takes it and no
/// other `bind(0)` is handed it (a port from `bind(0)` is an ephemeral one: a busy host gave it
/// to a connection before rank 0's TCPStore listened, `EADDRINUSE`). If no port there is free,
/// the kernel picks one.
///
/// # Errors
/// [`RendezvousError::Other`] if no port can be bound at all.
pub fn free_port(addr: &str) -> Result<u16, RendezvousError> {
    let ip: IpAddr = addr
        .trim_matches(|c| c == '[' || c == ']')
        .parse()
        .ok()
        .filter(|ip| TcpListener::bind((*ip, 0)).is_ok())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let (low, _) = ephemeral_range();
    let below = PORT_FLOOR..low.max(PORT_FLOOR + 1);
    for _ in 0..64 {
        let port = fastrand::u16(below.clone());
        if TcpListener::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    let listener = TcpListener::bind((ip, 0))
        .map_err(|e| RendezvousError::Other(format!("cannot pick a free port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| RendezvousError::Other(format!("cannot pick a free port: {e}")))
}

/// The lowest port [`free_port`] draws (above the well-known and most registered services).
const PORT_FLOOR: u16 = 10_000;

/// The kernel's ephemeral port range (Linux's default if it cannot be read).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .unwrap_or((32_768, 60_999))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (flaky torchrun scale-up test, `EADDRINUSE` on MASTER_PORT): a port from
    /// `bind(0)` is an ephemeral one, which a busy host may hand to an outgoing connection
    /// before rank 0's workers bind it. Ports are drawn below the ephemeral range.
    #[test]
    fn free_ports_are_below_the_ephemeral_range_and_bindable() {
        let (low, high) = ephemeral_range();
        assert!(low <= high, "{low}..{high}");
        for _ in 0..20 {
            let port = free_port("127.0.0.1").expect("a free port");
            assert!(
                (PORT_FLOOR..low).contains(&port),
                "{port} is not in {PORT_FLOOR}..{low}"
            );
            TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        }
    }
}
