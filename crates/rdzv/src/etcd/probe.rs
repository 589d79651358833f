//! The fast path for crashes: a member learns within milliseconds that a peer's process died,
//! instead of after the peer's lease TTL.
//!
//! Every node listens on a TCP port ([`PeerProbe::listen`], advertised in its join record)
//! and holds the connections peers open to it, without ever writing to them. When the
//! finaliser completes a round, it gives each member its ring successor (the member of the
//! next rank) to watch, in the member's assignment: no extra request. After the round, a
//! member connects to its successor, checks the greeting the successor's listener sends (its
//! node id: the connection reached the right process, not whatever answers at a wrong or
//! reused address), and waits ([`PeerProbe::watch`]). When the successor's process dies — a
//! crash, SIGKILL, an OOM kill — its kernel closes the connection at once (EOF or reset), and
//! the watcher **revokes the successor's lease**: etcd deletes its join record and every
//! member's membership watch reports `PeerLost`, as after a lease expiry, but within a round
//! trip. Before revoking, the watcher connects once more: a peer that greets again is alive
//! (something between them reset the connection) and is watched on. The connections carry
//! TCP keep-alives, so that a NAT or firewall does not drop them as idle. A node that leaves
//! gracefully says goodbye on its connections first
//! ([`ProbeListener::farewell`]), so that its watchers stop without revoking anything.
//! Nothing else counts as a death: a refused or unanswered connection, or one that
//! never greets, is retried (a router answering for a wrong address refuses too), and a
//! peer that dies before its watcher connected is noticed by its lease.
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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::RendezvousError;

/// A future that resolves when the watched peer is known dead.
pub type PeerGone = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A live listener: peers' connections are held while it lives; dropping it closes them.
pub struct ProbeListener {
    /// Where peers connect (`host:port`).
    pub addr: String,
    watchers: Arc<AtomicUsize>,
    farewell: tokio::sync::watch::Sender<bool>,
    _guard: Box<dyn Send + Sync>,
}

impl ProbeListener {
    /// A listener at `addr`, kept alive by `guard`.
    pub fn new(addr: String, guard: impl Send + Sync + 'static) -> Self {
        Self {
            addr,
            watchers: Arc::default(),
            farewell: tokio::sync::watch::channel(false).0,
            _guard: Box::new(guard),
        }
    }

    /// With the sender the listener's connections hear [`ProbeListener::farewell`] from.
    pub fn with_farewell(mut self, farewell: tokio::sync::watch::Sender<bool>) -> Self {
        self.farewell = farewell;
        self
    }

    /// This node leaves gracefully: its watchers are told so and stop watching, so that
    /// the end of its connections is not taken for a crash.
    pub fn farewell(&self) {
        self.farewell.send_replace(true);
    }

    /// With a count of the peers watching now, kept by the listener.
    pub fn with_watchers(mut self, watchers: Arc<AtomicUsize>) -> Self {
        self.watchers = watchers;
        self
    }

    /// How many peers hold a greeted connection to this listener now.
    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
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
    /// Starts listening on `host` (this node's advertised address) as node `node_id`.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if no port can be bound.
    fn listen(&self, host: &str, node_id: &str) -> Result<ProbeListener, RendezvousError>;

    /// Resolves once the peer `node_id` listening at `addr` is known dead: a connection to
    /// it, greeted by it, ended. Pending for as long as the peer is unreachable, slow, or
    /// not the one at that address (the lease decides then). Cancel safe: drop it to stop
    /// watching.
    fn watch(&self, addr: &str, node_id: &str) -> PeerGone;
}

/// The TCP probe of real processes.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpProbe;

/// Bound on one connection attempt and on its greeting; an unanswered attempt (a
/// partition, a firewall) is retried, never taken for a death.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Bound on the confirming connection after a watched connection ended.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(1);

/// TCP keep-alives on probe connections: idle connections stay known to NATs and
/// firewalls, and a connection silently dropped on the way fails (and is re-opened).
fn keep_alive(stream: &TcpStream) {
    let params = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&params) {
        tracing::debug!(error = %e, "peer probe: cannot set TCP keep-alives");
    }
}

/// The greeting a listener sends to each connection: `rdzv-probe <node id>\n`.
fn greeting(node_id: &str) -> Vec<u8> {
    format!("rdzv-probe {node_id}\n").into_bytes()
}

impl PeerProbe for TcpProbe {
    fn listen(&self, host: &str, node_id: &str) -> Result<ProbeListener, RendezvousError> {
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
        let watchers = Arc::new(AtomicUsize::new(0));
        let (farewell, farewell_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(hold_connections(
            listener,
            greeting(node_id),
            watchers.clone(),
            farewell_rx,
        ));
        let addr = match host.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
            _ => format!("{host}:{port}"),
        };
        Ok(ProbeListener::new(addr, AbortOnDrop(task))
            .with_watchers(watchers)
            .with_farewell(farewell))
    }

    fn watch(&self, addr: &str, node_id: &str) -> PeerGone {
        let addr = addr.to_string();
        let expected = greeting(node_id);
        Box::pin(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                if let Ok(Some(mut stream)) =
                    tokio::time::timeout(CONNECT_TIMEOUT, greeted(&addr, &expected)).await
                {
                    backoff = Duration::from_millis(100);
                    let mut buf = [0u8; 64];
                    // After its greeting the peer writes only its farewell: then it leaves
                    // gracefully and there is nothing to watch. The end of the stream without
                    // one is its death.
                    let ended = match stream.read(&mut buf).await {
                        Ok(0) => true,
                        Ok(_) => return std::future::pending().await,
                        Err(e) => is_death(&e),
                    };
                    drop(stream);
                    if ended {
                        // Confirm: a live peer greets again (the connection was reset on
                        // the way); a dead one refuses, or cannot answer.
                        match tokio::time::timeout(CONFIRM_TIMEOUT, greeted(&addr, &expected)).await
                        {
                            Ok(Some(_)) => {
                                tracing::debug!(%addr, "peer probe: the connection ended but the peer answers again");
                                continue;
                            }
                            _ => return,
                        }
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        })
    }
}

/// A connection to `addr` that greeted as `expected`; `None` for anything else.
async fn greeted(addr: &str, expected: &[u8]) -> Option<TcpStream> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    keep_alive(&stream);
    let mut got = vec![0u8; expected.len()];
    stream.read_exact(&mut got).await.ok()?;
    (got == expected).then_some(stream)
}

/// Errors that mean the peer's end was closed (not a local or network failure).
fn is_death(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe)
}

/// Accepts connections, greets each, and holds it until the peer closes it; the connections
/// close when this task is aborted (the listener dropped) or the process dies.
async fn hold_connections(
    listener: TcpListener,
    greeting: Vec<u8>,
    watchers: Arc<AtomicUsize>,
    farewell: tokio::sync::watch::Receiver<bool>,
) {
    let mut held = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            accepted = listener.accept() => {
                if let Ok((mut stream, _)) = accepted {
                    keep_alive(&stream);
                    let greeting = greeting.clone();
                    let watchers = watchers.clone();
                    let mut farewell = farewell.clone();
                    held.spawn(async move {
                        if stream.write_all(&greeting).await.is_err() {
                            return;
                        }
                        watchers.fetch_add(1, Ordering::Relaxed);
                        let _count = DecrementOnDrop(watchers);
                        let mut buf = [0u8; 64];
                        tokio::select! {
                            biased;
                            // (A dropped listener says nothing: its connections just end.)
                            () = async {
                                if farewell.wait_for(|bye| *bye).await.is_err() {
                                    std::future::pending::<()>().await;
                                }
                            } => {
                                let _ = stream.write_all(b"bye\n").await;
                                // Held until the process ends: the watcher stops on the word.
                                std::future::pending::<()>().await;
                            }
                            _ = async { while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {} } => {}
                        }
                    });
                }
            }
            Some(_) = held.join_next(), if !held.is_empty() => {}
        }
    }
}

/// Counts a watcher out when its connection ends (or is dropped).
struct DecrementOnDrop(Arc<AtomicUsize>);

impl Drop for DecrementOnDrop {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
        let listener = TcpProbe.listen("127.0.0.1", "n1").expect("listen");
        let gone = TcpProbe.watch(&listener.addr, "n1");
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
    async fn a_refused_connection_is_not_a_death() {
        // What a router answers for a wrong address looks the same: only the end of a
        // greeted connection counts.
        let listener = TcpProbe.listen("127.0.0.1", "n1").expect("listen");
        let addr = listener.addr.clone();
        drop(listener);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), TcpProbe.watch(&addr, "n1"))
                .await
                .is_err(),
            "a refused connection was taken for a death"
        );
    }

    #[tokio::test]
    async fn another_node_at_the_address_is_not_watched() {
        let listener = TcpProbe.listen("127.0.0.1", "n2").expect("listen");
        let gone = TcpProbe.watch(&listener.addr, "n1");
        tokio::pin!(gone);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut gone)
                .await
                .is_err(),
            "a connection that did not greet as the peer was watched"
        );
        drop(listener);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), gone)
                .await
                .is_err(),
            "the end of another node's connection was taken for the peer's death"
        );
    }

    #[tokio::test]
    async fn a_frozen_peer_is_not_a_death() {
        // A listener nobody accepts from, as a SIGSTOPped process's: the kernel completes
        // the connection and nothing ever closes it. Only the lease can tell.
        let frozen = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = frozen.local_addr().expect("addr").to_string();
        let gone = TcpProbe.watch(&addr, "n1");
        assert!(
            tokio::time::timeout(Duration::from_millis(500), gone)
                .await
                .is_err(),
            "a frozen peer was reported dead"
        );
    }

    #[tokio::test]
    async fn a_farewell_stops_the_watch_without_a_death() {
        let listener = TcpProbe.listen("127.0.0.1", "n1").expect("listen");
        let gone = TcpProbe.watch(&listener.addr, "n1");
        tokio::pin!(gone);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while listener.watchers() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the watcher never connected"
            );
            tokio::select! {
                _ = &mut gone => panic!("a live peer was reported dead"),
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
        listener.farewell();
        drop(listener);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), gone)
                .await
                .is_err(),
            "a peer that said goodbye was reported dead"
        );
    }

    #[tokio::test]
    async fn a_connection_reset_while_the_peer_lives_is_not_a_death() {
        // A peer that lives on behind something that resets its first connection (a NAT's
        // idle timeout, a middlebox): it greets, then that connection is reset; every later
        // connection is greeted and held.
        let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            let mut first = true;
            let mut held = Vec::new();
            while let Ok((mut stream, _)) = server.accept().await {
                if stream.write_all(&greeting("n1")).await.is_err() {
                    continue;
                }
                if first {
                    first = false;
                    // Reset (RST) rather than close.
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    drop(stream);
                } else {
                    held.push(stream);
                }
            }
        });
        let gone = TcpProbe.watch(&addr, "n1");
        assert!(
            tokio::time::timeout(Duration::from_millis(1500), gone)
                .await
                .is_err(),
            "a reset connection to a live peer was taken for its death"
        );
    }
}
