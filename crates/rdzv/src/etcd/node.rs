//! Who this node is ([`NodeRecord`] of the local process: host name, addresses, a unique id)
//! and its sources of randomness and time ([`NodeEnv`]), which the simulator replaces.

use std::sync::Arc;

use tokio::time::Instant;

use super::probe::{PeerProbe, TcpProbe};
use super::records::{now_ms, NodeRecord, SCHEMA_VERSION};

/// Who a node is, and its sources of randomness and time: from the machine for a real node,
/// given by the simulator for a simulated one (so that a seed replays exactly).
#[derive(Debug)]
pub struct NodeEnv {
    rng: std::sync::Mutex<fastrand::Rng>,
    /// Wall-clock milliseconds at `base` (records' timestamps).
    wall_base_ms: u64,
    base: Instant,
    probe: Option<Arc<dyn PeerProbe>>,
}

impl NodeEnv {
    /// From the machine: a random seed, the system clock and the TCP peer probe.
    pub fn from_machine() -> Self {
        Self::new(fastrand::u64(..), now_ms()).with_probe(Arc::new(TcpProbe))
    }

    /// A seeded random source, a wall clock that reads `wall_ms` now, and no peer probe.
    pub fn new(seed: u64, wall_ms: u64) -> Self {
        Self {
            rng: std::sync::Mutex::new(fastrand::Rng::with_seed(seed)),
            wall_base_ms: wall_ms,
            base: Instant::now(),
            probe: None,
        }
    }

    /// With a peer probe (see [`super::probe`]).
    pub fn with_probe(mut self, probe: Arc<dyn PeerProbe>) -> Self {
        self.probe = Some(probe);
        self
    }

    /// The peer probe, if this node has one.
    pub fn probe(&self) -> Option<&Arc<dyn PeerProbe>> {
        self.probe.as_ref()
    }

    pub(crate) fn with_rng<T>(&self, f: impl FnOnce(&mut fastrand::Rng) -> T) -> T {
        f(&mut self
            .rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Milliseconds since the Unix epoch, by this node's clock.
    pub fn now_ms(&self) -> u64 {
        self.wall_base_ms + Instant::now().duration_since(self.base).as_millis() as u64
    }

    /// A random number in `[0, 1)`.
    pub(crate) fn fraction(&self) -> f64 {
        self.with_rng(|r| r.f64())
    }

    /// A random token (128 bits, hex).
    pub(crate) fn token(&self) -> String {
        self.with_rng(|r| format!("{:016x}{:016x}", r.u64(..), r.u64(..)))
    }
}

/// This process's node record.
pub(crate) fn local_node_record(local_addr: Option<&str>, node_rank: Option<u64>) -> NodeRecord {
    let hostname = hostname();
    let safe_host: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    NodeRecord {
        v: SCHEMA_VERSION,
        node_id: format!("{safe_host}-{}-{}", std::process::id(), &suffix[..8]),
        hostname,
        addrs: match local_addr {
            Some(a) => vec![a.to_string()],
            None => detect_addresses(),
        },
        node_rank,
        prev_rank: None,
        local_world_size: None,
        probe: None,
        pid: std::process::id(),
        detached: false,
        left: false,
    }
}

/// This machine's host name (`localhost` if it cannot be read).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for `buf.len()` bytes; gethostname writes at most that many.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The addresses this host would use to reach others: the source address of the default
/// route for IPv4 and IPv6 (no packet is sent), falling back to loopback.
fn detect_addresses() -> Vec<String> {
    use std::net::UdpSocket;
    let mut addrs = Vec::new();
    for (bind, target) in [("0.0.0.0:0", "192.0.2.1:9"), ("[::]:0", "[2001:db8::1]:9")] {
        if let Ok(sock) = UdpSocket::bind(bind) {
            if sock.connect(target).is_ok() {
                if let Ok(local) = sock.local_addr() {
                    if !local.ip().is_unspecified() {
                        addrs.push(local.ip().to_string());
                    }
                }
            }
        }
    }
    if addrs.is_empty() {
        addrs.push("127.0.0.1".into());
    }
    addrs
}
