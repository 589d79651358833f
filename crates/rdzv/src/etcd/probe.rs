//! The fast path for crashes: a member learns within milliseconds that a peer's process died,
//! instead of after the peer's lease TTL.
//!
//! Every node listens on a TCP port ([`PeerProbe::listen`], advertised in its join record)
//! and holds the connections peers open to it, without ever writing to them. When the
//! finaliser completes a round, it gives each member its ring successor (the member of the
//! next rank) to watch, in the member's assignment: no extra request. After the round, a
//! member connects to its successor and waits ([`PeerProbe::watch`]). When the successor's
//! process dies — a crash, SIGKILL, an OOM kill — its kernel closes the connection at once
//! (EOF or reset; a refused connection means the same), and the watcher **revokes the
//! successor's lease**: etcd deletes its join record and every member's membership watch
//! reports `PeerLost`, as after a lease expiry, but within a round trip.
//!
//! The lease stays the ground truth: a frozen process (SIGSTOP), a lost host or a partition
//! close nothing, and are noticed when the lease expires, as before. A false report (a
//! connection reset by something other than the peer's death) revokes a live node's lease:
//! that node learns it at once (its own record's deletion, its next keep-alive) and stops
//! acting on its rank, and the job re-forms — it costs a restart, never a wrong rank, as the
//! simulator checks with injected false reports.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::RendezvousError;

/// A future that resolves when the watched peer is known dead.
pub type PeerGone = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A live listener: peers' connections are held while it lives; dropping it closes them.
pub struct ProbeListener {
    /// Where peers connect (`host:port`).
    pub addr: String,
    _guard: Box<dyn Send + Sync>,
}

impl ProbeListener {
    /// A listener at `addr`, kept alive by `guard`.
    pub fn new(addr: String, guard: impl Send + Sync + 'static) -> Self {
        Self {
            addr,
            _guard: Box::new(guard),
        }
    }
}

impl Debug for ProbeListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeListener")
            .field("addr", &self.addr)
            .finish()
    }
}

/// How nodes learn that a peer's process died (TCP on real machines, in memory in the
/// simulator).
pub trait PeerProbe: Send + Sync + Debug {
    /// Starts listening on `host` (this node's advertised address).
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if no port can be bound.
    fn listen(&self, host: &str) -> Result<ProbeListener, RendezvousError>;

    /// Resolves once the peer listening at `addr` is known dead: its connection ended or
    /// was refused. Pending for as long as the peer is merely unreachable or slow (the lease
    /// decides then). Cancel safe: drop it to stop watching.
    fn watch(&self, addr: &str) -> PeerGone;
}

/// The TCP probe of real processes.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpProbe;

/// Bound on one connection attempt; an unanswered attempt (a partition, a firewall) is
/// retried, never taken for a death.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

impl PeerProbe for TcpProbe {
    fn listen(&self, host: &str) -> Result<ProbeListener, RendezvousError> {
        let bind = |host: &str| -> std::io::Result<std::net::TcpListener> {
            let ip: std::net::IpAddr = host
                .parse()
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
            let listener = std::net::TcpListener::bind((ip, 0))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        };
        let std_listener = bind(host)
            .or_else(|_| bind("0.0.0.0"))
            .map_err(|e| RendezvousError::Connection(format!("peer probe: cannot listen: {e}")))?;
        let port = std_listener
            .local_addr()
            .map_err(|e| RendezvousError::Connection(format!("peer probe: {e}")))?
            .port();
        let listener = TcpListener::from_std(std_listener)
            .map_err(|e| RendezvousError::Connection(format!("peer probe: {e}")))?;
        let task = tokio::spawn(hold_connections(listener));
        let addr = match host.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
            _ => format!("{host}:{port}"),
        };
        Ok(ProbeListener::new(addr, AbortOnDrop(task)))
    }

    fn watch(&self, addr: &str) -> PeerGone {
        let addr = addr.to_string();
        Box::pin(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
                    Ok(Ok(mut stream)) => {
                        backoff = Duration::from_millis(100);
                        let mut buf = [0u8; 64];
                        // The peer never writes: any end of the stream is its death.
                        loop {
                            match stream.read(&mut buf).await {
                                Ok(0) => return,
                                Ok(_) => {}
                                Err(e) if is_death(&e) => return,
                                Err(_) => break,
                            }
                        }
                    }
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
                    Ok(Err(_)) | Err(_) => {}
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        })
    }
}

/// Errors that mean the peer's end was closed (not a local or network failure).
fn is_death(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe)
}

/// Accepts connections and holds each until the peer closes it; the connections close when
/// this task is aborted (the listener dropped) or the process dies.
async fn hold_connections(listener: TcpListener) {
    let mut held = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((mut stream, _)) = accepted {
                    held.spawn(async move {
                        let mut buf = [0u8; 64];
                        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                    });
                }
            }
            Some(_) = held.join_next(), if !held.is_empty() => {}
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dropped_listener_is_reported_dead_at_once() {
        let listener = TcpProbe.listen("127.0.0.1").expect("listen");
        let gone = TcpProbe.watch(&listener.addr);
        tokio::pin!(gone);
        // Alive: the watch does not resolve.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut gone)
                .await
                .is_err(),
            "a live peer was reported dead"
        );
        drop(listener);
        tokio::time::timeout(Duration::from_secs(5), gone)
            .await
            .expect("the closed connection was not noticed");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_death() {
        let listener = TcpProbe.listen("127.0.0.1").expect("listen");
        let addr = listener.addr.clone();
        drop(listener);
        tokio::time::timeout(Duration::from_secs(5), TcpProbe.watch(&addr))
            .await
            .expect("a refused connection was not taken for a death");
    }

    #[tokio::test]
    async fn a_frozen_peer_is_not_a_death() {
        // A listener nobody accepts from, as a SIGSTOPped process's: the kernel completes
        // the connection and nothing ever closes it. Only the lease can tell.
        let frozen = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = frozen.local_addr().expect("addr").to_string();
        let gone = TcpProbe.watch(&addr);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), gone)
                .await
                .is_err(),
            "a frozen peer was reported dead"
        );
    }
}
