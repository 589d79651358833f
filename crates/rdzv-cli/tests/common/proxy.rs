//! A fault-injecting TCP proxy for the chaos tests: it sits between one process and one etcd
//! endpoint and copies bytes both ways, connection by connection (etcd speaks gRPC over
//! HTTP/2, so the proxy is byte-level and never parses anything).
//!
//! [`FaultProxy::start`] runs the proxy on its own thread (a current-thread tokio runtime), so
//! synchronous and asynchronous tests alike drive it through a cloneable [`ProxyHandle`]; the
//! fault can be switched at any time and applies to existing and new connections:
//!
//! | fault | existing connections | new connections |
//! |---|---|---|
//! | [`Fault::Pass`] | bytes flow | forwarded |
//! | [`Fault::Stall`] | bytes are held in both directions (a hung peer); they flow again after the stall | accepted and held, connected upstream after the stall |
//! | [`Fault::Blackhole`] | bytes are read and dropped, nothing answers; reset when the fault ends | accepted, never forwarded nor answered; reset when the fault ends |
//! | [`Fault::Refuse`] | reset (RST) | reset right after the accept (the client sees a reset, not `ECONNREFUSED`) |
//! | [`Fault::LoseResponses`] | client→server bytes flow, server→client bytes are dropped; a connection that lost bytes is reset when the fault ends | as existing ones |
//! | [`Fault::Delay`] | every chunk waits before it is written | as existing ones |
//!
//! [`ProxyHandle::lose_responses`] sets `LoseResponses` for a window and then goes back to
//! `Pass` by itself: the requests of the window were applied, their answers were lost and the
//! connection breaks, which is what a client sees when a server dies after committing.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Bound on connecting to the upstream server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Size of one copied chunk.
const CHUNK: usize = 16 * 1024;

/// What the proxy does to the bytes; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Hold all bytes in both directions; connections stay open.
    Stall,
    /// Accept, read and drop; never forward, never answer.
    Blackhole,
    /// Reset existing connections and new ones.
    Refuse,
    /// Forward client→server, drop server→client; reset connections that lost bytes when the
    /// fault ends.
    LoseResponses,
    /// Forward every chunk after this delay.
    Delay(Duration),
}

/// Counters of a proxy, for assertions and summaries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections connected upstream.
    pub connected: u64,
    /// Connections currently forwarding (connected upstream and not closed).
    pub active: u64,
    /// Connections reset by the proxy (refused, faulted or tainted).
    pub resets: u64,
    /// Bytes forwarded client→server.
    pub bytes_up: u64,
    /// Bytes forwarded server→client.
    pub bytes_down: u64,
    /// Bytes dropped (blackhole, lost responses).
    pub bytes_dropped: u64,
    /// Fault changes so far.
    pub fault_changes: u64,
}

/// The direction of a pump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// What one pump does with the next chunk under a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Forward(Duration),
    Hold,
    Discard,
    Reset,
}

fn action(fault: Fault, dir: Dir) -> Action {
    match (fault, dir) {
        (Fault::Pass, _) => Action::Forward(Duration::ZERO),
        (Fault::Delay(d), _) => Action::Forward(d),
        (Fault::Stall, _) => Action::Hold,
        (Fault::Blackhole, _) => Action::Discard,
        (Fault::Refuse, _) => Action::Reset,
        (Fault::LoseResponses, Dir::Up) => Action::Forward(Duration::ZERO),
        (Fault::LoseResponses, Dir::Down) => Action::Discard,
    }
}

/// The fault in force, its generation (bumped on every change) and the reset epoch (bumped
/// by [`ProxyHandle::reset`]: connections opened in an earlier epoch are reset).
#[derive(Debug, Clone, Copy)]
struct FaultState {
    generation: u64,
    fault: Fault,
    epoch: u64,
}

struct Shared {
    fault: watch::Sender<FaultState>,
    stats: Mutex<ProxyStats>,
    changed: Condvar,
    runtime: tokio::runtime::Handle,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut ProxyStats)) {
        let mut stats = self.stats.lock().expect("proxy stats lock");
        f(&mut stats);
        self.changed.notify_all();
    }

    fn current(&self) -> Fault {
        self.fault.borrow().fault
    }
}

/// A cloneable control handle of a [`FaultProxy`].
#[derive(Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    upstream: SocketAddr,
}

impl std::fmt::Debug for ProxyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyHandle")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .field("fault", &self.fault())
            .finish()
    }
}

impl ProxyHandle {
    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `host:port` of [`addr`](Self::addr), as an etcd endpoint.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// The server the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        self.shared.current()
    }

    /// Switches to `fault`, for existing and new connections; returns its generation.
    pub fn set(&self, fault: Fault) -> u64 {
        self.change(fault, false)
    }

    /// The generation of the fault in force (bumped by every change).
    pub fn generation(&self) -> u64 {
        self.shared.fault.borrow().generation
    }

    /// Goes back to [`Fault::Pass`] if the fault in force is still the one of `generation`
    /// (as returned by [`set`](Self::set)); returns whether it did.
    pub fn pass_if(&self, generation: u64) -> bool {
        if self.generation() == generation {
            self.pass();
            true
        } else {
            false
        }
    }

    fn change(&self, fault: Fault, reset: bool) -> u64 {
        let mut generation = 0;
        self.shared.fault.send_modify(|state| {
            state.generation += 1;
            state.fault = fault;
            if reset {
                state.epoch += 1;
            }
            generation = state.generation;
        });
        self.shared.update(|s| s.fault_changes += 1);
        generation
    }

    /// [`Fault::Pass`].
    pub fn pass(&self) {
        self.set(Fault::Pass);
    }

    /// [`Fault::Stall`].
    pub fn stall(&self) {
        self.set(Fault::Stall);
    }

    /// [`Fault::Blackhole`].
    pub fn blackhole(&self) {
        self.set(Fault::Blackhole);
    }

    /// [`Fault::Refuse`]: resets existing connections and refuses new ones.
    pub fn refuse(&self) {
        self.set(Fault::Refuse);
    }

    /// Resets every existing connection once and forwards again ([`Fault::Pass`]): new
    /// connections pass.
    pub fn reset(&self) {
        self.change(Fault::Pass, true);
    }

    /// [`Fault::Delay`] of `d` per chunk.
    pub fn delay(&self, d: Duration) {
        self.set(Fault::Delay(d));
    }

    /// [`Fault::LoseResponses`] for `window`, then [`Fault::Pass`] (unless the fault was
    /// changed meanwhile); returns at once.
    pub fn lose_responses(&self, window: Duration) {
        let generation = self.set(Fault::LoseResponses);
        let handle = self.clone();
        self.shared.runtime.spawn(async move {
            tokio::time::sleep(window).await;
            if handle.shared.fault.borrow().generation == generation {
                handle.pass();
            }
        });
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ProxyStats {
        self.shared.stats.lock().expect("proxy stats lock").clone()
    }

    /// Blocks until `cond` holds for the counters (woken on every change); panics with
    /// `what` and the counters after `limit`.
    pub fn wait_stats(&self, limit: Duration, what: &str, cond: impl Fn(&ProxyStats) -> bool) {
        let deadline = Instant::now() + limit;
        let mut stats = self.shared.stats.lock().expect("proxy stats lock");
        while !cond(&stats) {
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "proxy {}: timed out after {limit:?} waiting for {what}; counters {stats:?}",
                    self.addr
                );
            }
            stats = self
                .shared
                .changed
                .wait_timeout(stats, deadline - now)
                .expect("proxy stats lock")
                .0;
        }
    }

    /// Blocks until the fault in force is `fault` (e.g. the end of a
    /// [`lose_responses`](Self::lose_responses) window); panics after `limit`.
    pub fn wait_fault(&self, limit: Duration, fault: Fault) {
        self.wait_stats(limit, &format!("fault {fault:?}"), |_| {
            self.fault() == fault
        });
    }
}

/// A running proxy; stopped (every connection closed) on drop.
pub struct FaultProxy {
    handle: ProxyHandle,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy on a free port of 127.0.0.1 forwarding to `upstream`, in [`Fault::Pass`].
    pub fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0".parse().expect("a socket address"), upstream)
    }

    /// Starts a proxy listening on `listen` (port 0: a free one) forwarding to `upstream`.
    pub fn start_on(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared {
            fault: watch::channel(FaultState {
                generation: 0,
                fault: Fault::Pass,
                epoch: 0,
            })
            .0,
            stats: Mutex::new(ProxyStats::default()),
            changed: Condvar::new(),
            runtime: runtime.handle().clone(),
        });
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel();
        let accept_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => panic!("fault proxy: cannot register the listener: {e}"),
                    };
                    accept_loop(listener, upstream, accept_shared, shutdown_rx).await;
                });
                // Dropping the runtime drops every connection task and closes its sockets.
                drop(runtime);
            })?;
        Ok(Self {
            handle: ProxyHandle {
                shared,
                addr,
                upstream,
            },
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// A control handle.
    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }
}

impl std::ops::Deref for FaultProxy {
    type Target = ProxyHandle;

    fn deref(&self) -> &ProxyHandle {
        &self.handle
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let _ = client.set_nodelay(true);
                    tokio::spawn(connection(client, upstream, shared.clone()));
                }
                // E.g. EMFILE: the next accept may work; do not spin on a persistent error.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

/// Closes `stream` with a RST (SO_LINGER 0).
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// How a pump or a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Eof,
    Reset,
}

async fn connection(mut client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    shared.update(|s| s.accepted += 1);
    let mut rx = shared.fault.subscribe();
    let epoch = rx.borrow().epoch;
    let tainted = AtomicBool::new(false);
    // Before connecting upstream: the fault decides whether and when.
    loop {
        let state = *rx.borrow_and_update();
        if state.epoch != epoch {
            shared.update(|s| s.resets += 1);
            return reset(client);
        }
        match state.fault {
            Fault::Refuse => {
                shared.update(|s| s.resets += 1);
                return reset(client);
            }
            Fault::Stall => {
                if rx.changed().await.is_err() {
                    return;
                }
            }
            Fault::Blackhole => {
                let mut buf = vec![0u8; CHUNK];
                tokio::select! {
                    r = client.read(&mut buf) => match r {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            tainted.store(true, Ordering::Relaxed);
                            shared.update(|s| s.bytes_dropped += n as u64);
                        }
                    },
                    changed = rx.changed() => if changed.is_err() { return },
                }
            }
            Fault::Pass | Fault::Delay(_) | Fault::LoseResponses => {
                if tainted.load(Ordering::Relaxed) {
                    shared.update(|s| s.resets += 1);
                    return reset(client);
                }
                break;
            }
        }
    }
    let mut server = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream)).await
    {
        Ok(Ok(s)) => s,
        _ => {
            shared.update(|s| s.resets += 1);
            return reset(client);
        }
    };
    let _ = server.set_nodelay(true);
    shared.update(|s| {
        s.connected += 1;
        s.active += 1;
    });
    let end = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let up = pump(
            Dir::Up,
            &mut cr,
            &mut sw,
            rx.clone(),
            epoch,
            &tainted,
            &shared,
        );
        let down = pump(
            Dir::Down,
            &mut sr,
            &mut cw,
            rx.clone(),
            epoch,
            &tainted,
            &shared,
        );
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            let end = tokio::select! {
                e = &mut up, if !up_done => { up_done = true; e }
                e = &mut down, if !down_done => { down_done = true; e }
            };
            if end == End::Reset {
                break End::Reset;
            }
            if up_done && down_done {
                break End::Eof;
            }
        }
    };
    shared.update(|s| {
        s.active -= 1;
        if end == End::Reset {
            s.resets += 1;
        }
    });
    if end == End::Reset {
        reset(client);
        reset(server);
    }
}

/// Copies `from` → `to` under the fault in force until EOF (`End::Eof`, after shutting down
/// `to`'s write side) or until the connection must be reset.
async fn pump(
    dir: Dir,
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    mut rx: watch::Receiver<FaultState>,
    epoch: u64,
    tainted: &AtomicBool,
    shared: &Shared,
) -> End {
    // The action under the state in force; `Reset` once the connection's epoch has passed.
    let act = |state: &FaultState| {
        if state.epoch != epoch {
            Action::Reset
        } else {
            action(state.fault, dir)
        }
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        let now = act(&rx.borrow_and_update());
        if tainted.load(Ordering::Relaxed) && matches!(now, Action::Forward(_)) {
            return End::Reset;
        }
        match now {
            Action::Reset => return End::Reset,
            Action::Hold => {
                if rx.changed().await.is_err() {
                    return End::Reset;
                }
                continue;
            }
            Action::Forward(_) | Action::Discard => {}
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) => {
                    if matches!(now, Action::Forward(_)) {
                        let _ = to.shutdown().await;
                        return End::Eof;
                    }
                    return End::Reset;
                }
                Ok(n) => n,
                Err(_) => return End::Reset,
            },
            changed = rx.changed() => {
                if changed.is_err() {
                    return End::Reset;
                }
                continue;
            }
        };
        // The chunk follows the fault in force now; a stall holds it until the next change.
        let mut then = act(&rx.borrow_and_update());
        while then == Action::Hold {
            if rx.changed().await.is_err() {
                return End::Reset;
            }
            then = act(&rx.borrow_and_update());
        }
        match then {
            Action::Forward(delay) => {
                if tainted.load(Ordering::Relaxed) {
                    return End::Reset;
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return End::Reset;
                }
                shared.update(|s| match dir {
                    Dir::Up => s.bytes_up += n as u64,
                    Dir::Down => s.bytes_down += n as u64,
                });
            }
            Action::Discard => {
                tainted.store(true, Ordering::Relaxed);
                shared.update(|s| s.bytes_dropped += n as u64);
            }
            Action::Reset => return End::Reset,
            Action::Hold => unreachable!("held above"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{ErrorKind, Read, Write};
    use std::net::{TcpListener as StdListener, TcpStream as StdStream};

    /// Bound of every wait in these tests.
    const LIMIT: Duration = Duration::from_secs(5);
    /// How long "nothing arrives" is watched for (a negative check needs a bound).
    const QUIET: Duration = Duration::from_millis(300);

    /// An echo server on threads; records what it received.
    struct Echo {
        addr: SocketAddr,
        received: Arc<(Mutex<Vec<u8>>, Condvar)>,
    }

    impl Echo {
        fn start() -> Self {
            let listener = StdListener::bind("127.0.0.1:0").expect("bind echo");
            let addr = listener.local_addr().expect("echo addr");
            let received: Arc<(Mutex<Vec<u8>>, Condvar)> = Arc::default();
            let rec = received.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { return };
                    let rec = rec.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 4096];
                        loop {
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    let (lock, cv) = &*rec;
                                    lock.lock().unwrap().extend_from_slice(&buf[..n]);
                                    cv.notify_all();
                                    if conn.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    });
                }
            });
            Self { addr, received }
        }

        fn received(&self) -> Vec<u8> {
            self.received.0.lock().unwrap().clone()
        }

        /// Waits until the server has received `bytes` (in total, as a suffix).
        fn wait_received(&self, bytes: &[u8]) {
            let (lock, cv) = &*self.received;
            let deadline = Instant::now() + LIMIT;
            let mut got = lock.lock().unwrap();
            while !got.ends_with(bytes) {
                let now = Instant::now();
                assert!(
                    now < deadline,
                    "the echo server never received {bytes:?}: {got:?}"
                );
                got = cv.wait_timeout(got, deadline - now).unwrap().0;
            }
        }
    }

    fn connect(proxy: &ProxyHandle) -> StdStream {
        let s = StdStream::connect_timeout(&proxy.addr(), LIMIT).expect("connect to the proxy");
        s.set_read_timeout(Some(LIMIT)).unwrap();
        s
    }

    fn read_exact(s: &mut StdStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).expect("read the echo");
        buf
    }

    /// Asserts that nothing arrives on `s` for [`QUIET`].
    fn assert_quiet(s: &mut StdStream, what: &str) {
        s.set_read_timeout(Some(QUIET)).unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            other => panic!("{what}: expected silence, got {other:?}"),
        }
        s.set_read_timeout(Some(LIMIT)).unwrap();
    }

    /// Asserts that `s` is broken: a read ends with a reset or EOF (within [`LIMIT`]).
    fn assert_broken(s: &mut StdStream, what: &str) {
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("{what}: expected a reset connection, got {other:?}"),
        }
    }

    #[test]
    fn pass_forwards_both_ways() {
        let echo = Echo::start();
        let proxy = FaultProxy::start(echo.addr).unwrap();
        let mut s = connect(&proxy);
        s.write_all(b"hello").unwrap();
        assert_eq!(read_exact(&mut s, 5), b"hello");
        // The proxy counts a chunk after forwarding it: the reader may be first.
        proxy.wait_stats(LIMIT, "both directions counted", |s| {
            (s.bytes_up, s.bytes_down) == (5, 5)
        });
        let stats = proxy.stats();
        assert_eq!((stats.accepted, stats.connected, stats.active), (1, 1, 1));
        drop(s);
        proxy.wait_stats(LIMIT, "the connection closes", |s| s.active == 0);
        assert_eq!(proxy.stats().resets, 0, "a clean close is no reset");
    }

    #[test]
    fn stall_holds_bytes_then_delivers_them_on_the_same_connection() {
        let echo = Echo::start();
        let proxy = FaultProxy::start(echo.addr).unwrap();
        let mut s = connect(&proxy);
        s.write_all(b"a").unwrap();
        assert_eq!(read_exact(&mut s, 1), b"a");
        proxy.stall();
        s.write_all(b"b").unwrap();
        assert_quiet(&mut s, "stalled");
        assert_eq!(echo.received(), b"a", "a stalled byte reached the server");
        proxy.pass();
        assert_eq!(
            read_exact(&mut s, 1),
            b"b",
            "held bytes flow after the stall"
        );
        // A connection opened during a stall is held, then served.
        proxy.stall();
        let mut late = connect(&proxy);
        late.write_all(b"c").unwrap();
        assert_quiet(&mut late, "new connection while stalled");
        assert_eq!(
            proxy.stats().connected,
            1,
            "not connected upstream while stalled"
        );
        proxy.pass();
        assert_eq!(read_exact(&mut late, 1), b"c");
        assert_eq!(proxy.stats().resets, 0);
    }

    #[test]
    fn blackhole_never_answers_and_resets_when_it_ends() {
        let echo = Echo::start();
        let proxy = FaultProxy::start(echo.addr).unwrap();
        let mut old = connect(&proxy);
        proxy.blackhole();
        let mut new = connect(&proxy);
        proxy.wait_stats(LIMIT, "the new connection is accepted", |s| s.accepted == 2);
        old.write_all(b"x").unwrap();
        new.write_all(b"y").unwrap();
        assert_quiet(&mut old, "blackholed existing connection");
        assert_quiet(&mut new, "blackholed new connection");
        proxy.wait_stats(LIMIT, "both bytes dropped", |s| s.bytes_dropped == 2);
        assert!(echo.received().is_empty(), "nothing reaches the server");
        proxy.pass();
        assert_broken(&mut old, "existing connection after the blackhole");
        assert_broken(&mut new, "new connection after the blackhole");
        let mut fresh = connect(&proxy);
        fresh.write_all(b"z").unwrap();
        assert_eq!(read_exact(&mut fresh, 1), b"z");
    }

    #[test]
    fn refuse_resets_existing_and_new_connections() {
        let echo = Echo::start();
        let proxy = FaultProxy::start(echo.addr).unwrap();
        let mut old = connect(&proxy);
        old.write_all(b"1").unwrap();
        assert_eq!(read_exact(&mut old, 1), b"1");
        proxy.refuse();
        assert_broken(&mut old, "existing connection");
        match StdStream::connect_timeout(&proxy.addr(), LIMIT) {
            Err(_) => {}
            Ok(mut s) => {
                s.set_read_timeout(Some(LIMIT)).unwrap();
                assert_broken(&mut s, "new connection while refusing");
            }
        }
        proxy.wait_stats(LIMIT, "two resets", |s| s.resets >= 2);
        proxy.pass();
        let mut s = connect(&proxy);
        s.write_all(b"2").unwrap();
        assert_eq!(read_exact(&mut s, 1), b"2");
    }

    #[test]
    fn reset_breaks_existing_connections_only() {
        let echo = Echo::start();
        let proxy = FaultProxy::start(echo.addr).unwrap();
        let mut old = connect(&proxy);
        old.write_all(b"1").unwrap();
        assert_eq!(read_exact(&mut old, 1), b"1");
        proxy.reset();
        assert_eq!(proxy.fault(), Fault::Pass);
        assert_broken(&mut old, "existing connection after reset");
        let mut s = connect(&proxy);
        s.write_all(b"2").unwrap();
        assert_eq!(read_exact(&mut s, 1), b"2");
    }

    #[test]
    fn lost_responses_apply_the_request_then_reset() {
        let echo = Echo::start();
        let proxy = FaultProxy::start(echo.addr).unwrap();
        let mut s = connect(&proxy);
        s.write_all(b"a").unwrap();
        assert_eq!(read_exact(&mut s, 1), b"a");
        proxy.lose_responses(Duration::from_millis(400));
        s.write_all(b"req").unwrap();
        echo.wait_received(b"req");
        proxy.wait_stats(LIMIT, "the answer is dropped", |s| s.bytes_dropped == 3);
        // The answer never arrives; the connection is reset when the window ends.
        assert_broken(&mut s, "connection that lost an answer");
        assert_eq!(proxy.fault(), Fault::Pass, "the window ended by itself");
        let mut fresh = connect(&proxy);
        fresh.write_all(b"ok").unwrap();
        assert_eq!(read_exact(&mut fresh, 2), b"ok");
    }

    #[test]
    fn pass_if_ends_only_its_own_fault() {
        let echo = Echo::start();
        let proxy = FaultProxy::start(echo.addr).unwrap();
        let stall = proxy.set(Fault::Stall);
        let blackhole = proxy.set(Fault::Blackhole);
        assert!(!proxy.pass_if(stall), "a later fault rules");
        assert_eq!(proxy.fault(), Fault::Blackhole);
        assert!(proxy.pass_if(blackhole));
        assert_eq!(proxy.fault(), Fault::Pass);
    }

    #[test]
    fn delay_slows_every_chunk() {
        let echo = Echo::start();
        let proxy = FaultProxy::start(echo.addr).unwrap();
        let d = Duration::from_millis(150);
        proxy.delay(d);
        let mut s = connect(&proxy);
        let started = Instant::now();
        s.write_all(b"slow").unwrap();
        assert_eq!(read_exact(&mut s, 4), b"slow");
        let took = started.elapsed();
        assert!(
            took >= 2 * d,
            "one round trip crosses two delays, took {took:?}"
        );
        assert!(took < LIMIT, "took {took:?}");
    }
}
