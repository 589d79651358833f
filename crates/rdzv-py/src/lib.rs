//! `rdzv._rdzv`: the Rust half of the `rdzv` Python package (PyO3, abi3).
//!
//! The pure-Python half (`python/rdzv/`) gives PyTorch's names and signatures; this module
//! holds the state and does the work:
//!
//! - [`Handler`]: an [`EtcdRendezvousHandler`] with PyTorch's method names. Its
//!   `num_nodes_waiting()` turns the handler's membership events into the signal that makes
//!   torchrun's agent restart its workers: it is at least 1 once a peer of the current round
//!   was lost or left, nodes wait, a newer round started or the run closed.
//! - [`Store`]: the round's key-value store.
//! - [`EtcdServerCore`]: a throw-away local etcd ([`rdzv::etcd::EtcdServer`]).
//! - The exception classes (`RendezvousError` and its subclasses, named as PyTorch's).
//! - The library's `tracing` events forwarded to Python's `logging` ([`logging`]).
//!
//! There is one Tokio runtime per process, started on first use. Every call that waits
//! releases the GIL and runs on the runtime; lease keep-alives and membership watches are
//! tasks of the runtime and never need the interpreter. While a call waits, the calling
//! thread wakes every 100 ms to let Python handle signals (so Ctrl-C and torchrun's SIGTERM
//! handler interrupt a long `next_rendezvous()`).

mod logging;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyString};
use rdzv::etcd::{EtcdRendezvousHandler, EtcdServer, EtcdServerOptions};
use rdzv::{MembershipEvent, RendezvousHandler, RendezvousParameters};
use tokio::runtime::Runtime;
use tokio::sync::broadcast;

create_exception!(
    _rdzv,
    RendezvousError,
    PyException,
    "The base of rdzv's rendezvous errors (PyTorch's `RendezvousError`)."
);
create_exception!(
    _rdzv,
    RendezvousClosedError,
    RendezvousError,
    "The rendezvous is closed."
);
create_exception!(
    _rdzv,
    RendezvousTimeoutError,
    RendezvousError,
    "The rendezvous did not complete in time."
);
create_exception!(
    _rdzv,
    RendezvousConnectionError,
    RendezvousError,
    "The connection to the rendezvous backend failed."
);
create_exception!(
    _rdzv,
    RendezvousStateError,
    RendezvousError,
    "The rendezvous state is corrupt."
);
create_exception!(
    _rdzv,
    RendezvousGracefulExitError,
    RendezvousError,
    "This node was not admitted and the rendezvous ended: exit without failure."
);

/// How often a waiting call lets Python handle signals.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// How long the members of a round wait for rank 0's `MASTER_ADDR`/`MASTER_PORT`.
const MASTER_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(120);

/// The process's one runtime.
fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rdzv-runtime")
            .enable_all()
            .build()
            .expect("cannot start the rdzv Tokio runtime")
    })
}

/// Runs `fut` on the runtime without the GIL; returns early with Python's exception if a
/// signal handler raises (the task is then aborted).
fn run<T, F>(py: Python<'_>, fut: F) -> PyResult<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let rt = runtime();
    let mut task = rt.spawn(fut);
    loop {
        let polled = py.allow_threads(|| {
            rt.block_on(async { tokio::time::timeout(SIGNAL_POLL, &mut task).await })
        });
        match polled {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => return Err(RendezvousError::new_err(format!("rdzv task failed: {e}"))),
            Err(_elapsed) => {
                if let Err(e) = py.check_signals() {
                    task.abort();
                    return Err(e);
                }
            }
        }
    }
}

/// The Python exception for a rendezvous error.
fn to_py_err(e: rdzv::RendezvousError) -> PyErr {
    use rdzv::RendezvousError as E;
    let text = e.to_string();
    match e {
        E::Closed { .. } => RendezvousClosedError::new_err(text),
        E::Timeout(_) => RendezvousTimeoutError::new_err(text),
        E::Connection(_) => RendezvousConnectionError::new_err(text),
        E::State(_) | E::NoSuchRun { .. } => RendezvousStateError::new_err(text),
        E::GracefulExit(_) => RendezvousGracefulExitError::new_err(text),
        E::Parameters(_) | E::InvalidConfig { .. } | E::Registry(_) => PyValueError::new_err(text),
        E::Other(_) => RendezvousError::new_err(text),
    }
}

/// The bytes of a `bytes`, `bytearray` or `str` (UTF-8) value.
fn bytes_of(value: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(b) = value.downcast::<PyBytes>() {
        Ok(b.as_bytes().to_vec())
    } else if let Ok(b) = value.downcast::<PyByteArray>() {
        Ok(b.to_vec())
    } else if let Ok(s) = value.downcast::<PyString>() {
        Ok(s.to_cow()?.as_bytes().to_vec())
    } else {
        Err(PyTypeError::new_err(format!(
            "expected bytes or str, got {}",
            value.get_type().name()?
        )))
    }
}

fn seconds(value: f64, what: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!(
            "{what} must be a non-negative number of seconds, got {value}"
        ))
    })
}

/// Membership changes of the current round, as `num_nodes_waiting()` reports them.
struct Membership {
    events: broadcast::Receiver<MembershipEvent>,
    round: Option<u64>,
    changed: bool,
}

impl Membership {
    /// Reads the events that arrived; true once the current round changed.
    fn drain(&mut self) -> bool {
        use broadcast::error::TryRecvError;
        loop {
            match self.events.try_recv() {
                Ok(event) => {
                    if let Some(round) = self.round {
                        self.changed |= changes_round(&event, round, true);
                    }
                }
                // Events were dropped: some may have been ours.
                Err(TryRecvError::Lagged(_)) => self.changed |= self.round.is_some(),
                Err(TryRecvError::Empty | TryRecvError::Closed) => return self.changed,
            }
        }
    }
}

/// True if `event` means that the members of `round` must re-rendezvous. Nodes waiting count
/// only with `count_waiting` (rank 0 still publishes the master address when nodes wait).
fn changes_round(event: &MembershipEvent, round: u64, count_waiting: bool) -> bool {
    match event {
        MembershipEvent::PeerLeft { round: r, .. }
        | MembershipEvent::PeerLost { round: r, .. }
        | MembershipEvent::RoundSuperseded { round: r }
        | MembershipEvent::MembershipLost { round: r } => *r == round,
        MembershipEvent::NodesWaiting { round: r, waiting } => {
            count_waiting && *r == round && *waiting > 0
        }
        MembershipEvent::Closed => true,
    }
}

/// The outcome of a round for this node.
#[pyclass(module = "rdzv._rdzv", frozen, get_all)]
struct RoundInfo {
    /// This node's rank in the round.
    rank: usize,
    /// The number of nodes in the round.
    world_size: usize,
    /// The round number.
    round: u64,
    /// The round's store.
    store: Py<Store>,
    /// Where the workers' rank 0 listens (published by the node of rank 0).
    master_addr: String,
    /// The port of `master_addr`.
    master_port: u16,
}

/// An etcd rendezvous handler with PyTorch's method names.
#[pyclass(module = "rdzv._rdzv", frozen)]
struct Handler {
    inner: Arc<EtcdRendezvousHandler>,
    backend: String,
    membership: Mutex<Membership>,
}

/// Joins the next round, then agrees on the master address; re-joins if the round changes
/// before rank 0 published it (rank 0 may have died).
async fn round_with_master(
    handler: Arc<EtcdRendezvousHandler>,
) -> Result<(rdzv::RendezvousInfo, rdzv::bootstrap::MasterInfo), rdzv::RendezvousError> {
    let advertised = handler.advertised_addr();
    let mut events = handler
        .subscribe()
        .ok_or_else(|| rdzv::RendezvousError::Other("the etcd handler pushes no events".into()))?;
    loop {
        let info = handler.next_rendezvous().await?;
        let exchange = rdzv::bootstrap::exchange_master(
            &*info.store,
            info.rank,
            &advertised,
            MASTER_EXCHANGE_TIMEOUT,
        );
        let changed = async {
            loop {
                match events.recv().await {
                    Ok(event) if changes_round(&event, info.round, false) => return event,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
                }
            }
        };
        tokio::select! {
            biased;
            event = changed => {
                if event == MembershipEvent::Closed {
                    return Err(rdzv::RendezvousError::Closed { run_id: handler.run_id().to_string() });
                }
                tracing::info!(round = info.round, ?event, "membership changed before the master address was agreed: re-rendezvous");
            }
            master = exchange => return Ok((info, master?)),
        }
    }
}

#[pymethods]
impl Handler {
    /// The backend name the handler was created with (`etcd` or `etcd-v3`).
    fn get_backend(&self) -> &str {
        &self.backend
    }

    /// The run id.
    fn get_run_id(&self) -> &str {
        self.inner.run_id()
    }

    /// This node's id in the rendezvous (unique per handler).
    fn node_id(&self) -> &str {
        self.inner.node_id()
    }

    /// Joins the next round and waits until it completes; returns a `RoundInfo`.
    fn next_rendezvous(&self, py: Python<'_>) -> PyResult<RoundInfo> {
        let handler = self.inner.clone();
        let (info, master) = run(py, round_with_master(handler))?.map_err(to_py_err)?;
        let mut membership = self.membership.lock().unwrap_or_else(|e| e.into_inner());
        // Events of earlier rounds are dropped by the round filter.
        membership.round = Some(info.round);
        membership.changed = false;
        drop(membership);
        Ok(RoundInfo {
            rank: info.rank,
            world_size: info.world_size,
            round: info.round,
            store: Py::new(py, Store { inner: info.store })?,
            master_addr: master.addr,
            master_port: master.port,
        })
    }

    /// True if the run is closed.
    fn is_closed(&self, py: Python<'_>) -> PyResult<bool> {
        let handler = self.inner.clone();
        run(py, async move { handler.is_closed().await })?.map_err(to_py_err)
    }

    /// Closes the run for every node.
    fn set_closed(&self, py: Python<'_>) -> PyResult<()> {
        let handler = self.inner.clone();
        run(py, async move { handler.set_closed().await })?.map_err(to_py_err)
    }

    /// The number of nodes waiting for the next round, and at least 1 once the membership of
    /// the current round changed (a peer lost or left, a newer round, the run closed), so that
    /// torchrun's agent re-rendezvous.
    fn num_nodes_waiting(&self, py: Python<'_>) -> PyResult<usize> {
        let handler = self.inner.clone();
        let waiting =
            run(py, async move { handler.num_nodes_waiting().await })?.map_err(to_py_err)?;
        let changed = self
            .membership
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain();
        Ok(if changed { waiting.max(1) } else { waiting })
    }

    /// Leaves the rendezvous without closing the run; true on success.
    fn shutdown(&self, py: Python<'_>) -> PyResult<bool> {
        let handler = self.inner.clone();
        run(py, async move { handler.shutdown().await })?.map_err(to_py_err)
    }
}

/// Creates an etcd handler. `backend` is `etcd` or `etcd-v3` (the same rendezvous; the
/// handler reports the name it was given); `config` holds the `key=value` settings.
#[pyfunction]
#[pyo3(signature = (backend, endpoint, run_id, min_nodes, max_nodes, local_addr=None, config=None))]
#[allow(clippy::too_many_arguments)]
fn create_handler(
    py: Python<'_>,
    backend: String,
    endpoint: String,
    run_id: String,
    min_nodes: usize,
    max_nodes: usize,
    local_addr: Option<String>,
    config: Option<HashMap<String, String>>,
) -> PyResult<Handler> {
    if backend != "etcd" && backend != "etcd-v3" {
        return Err(PyValueError::new_err(format!(
            "the rendezvous backend '{backend}' is not registered; known backends: etcd, etcd-v3"
        )));
    }
    let mut params = RendezvousParameters::new("etcd", endpoint, run_id, min_nodes, max_nodes)
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    params.local_addr = local_addr;
    params.config.extend(config.unwrap_or_default());
    let inner = run(
        py,
        async move { EtcdRendezvousHandler::connect(&params).await },
    )?
    .map_err(to_py_err)?;
    let inner = Arc::new(inner);
    let events = inner
        .subscribe()
        .ok_or_else(|| RendezvousError::new_err("the etcd handler pushes no events"))?;
    Ok(Handler {
        inner,
        backend,
        membership: Mutex::new(Membership {
            events,
            round: None,
            changed: false,
        }),
    })
}

/// The key-value store of a round (PyTorch's `Store` operations). Values are `bytes`
/// (`str` is accepted and stored as UTF-8).
#[pyclass(module = "rdzv._rdzv", frozen)]
struct Store {
    inner: Arc<dyn rdzv::Store>,
}

#[pymethods]
impl Store {
    /// Sets `key` to `value`.
    fn set(&self, py: Python<'_>, key: String, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let (store, value) = (self.inner.clone(), bytes_of(value)?);
        run(py, async move { store.set(&key, &value).await })?.map_err(to_py_err)
    }

    /// The value of `key`, waiting until it exists (at most `timeout` seconds, else the
    /// store's timeout); `RendezvousTimeoutError` after that.
    #[pyo3(signature = (key, timeout=None))]
    fn get(&self, py: Python<'_>, key: String, timeout: Option<f64>) -> PyResult<Py<PyBytes>> {
        let store = self.inner.clone();
        let timeout = timeout.map(|t| seconds(t, "timeout")).transpose()?;
        let value = run(py, async move {
            match timeout {
                Some(t) => store.get_timeout(&key, t).await,
                None => store.get(&key).await,
            }
        })?
        .map_err(to_py_err)?;
        Ok(PyBytes::new(py, &value).unbind())
    }

    /// Adds `amount` to the integer counter `key` (created as 0); returns the new value.
    fn add(&self, py: Python<'_>, key: String, amount: i64) -> PyResult<i64> {
        let store = self.inner.clone();
        run(py, async move { store.add(&key, amount).await })?.map_err(to_py_err)
    }

    /// Sets `key` to `desired` if its value is `expected` (empty `expected`: the key is
    /// missing); returns the value after the call.
    fn compare_set(
        &self,
        py: Python<'_>,
        key: String,
        expected: &Bound<'_, PyAny>,
        desired: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyBytes>> {
        let store = self.inner.clone();
        let (expected, desired) = (bytes_of(expected)?, bytes_of(desired)?);
        let value = run(py, async move {
            store.compare_set(&key, &expected, &desired).await
        })?
        .map_err(to_py_err)?;
        Ok(PyBytes::new(py, &value).unbind())
    }

    /// Waits until all `keys` exist, at most `timeout` seconds.
    fn wait(&self, py: Python<'_>, keys: Vec<String>, timeout: f64) -> PyResult<()> {
        let store = self.inner.clone();
        let timeout = seconds(timeout, "timeout")?;
        run(py, async move {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            store.wait(&keys, timeout).await
        })?
        .map_err(to_py_err)
    }

    /// True if all `keys` exist.
    fn check(&self, py: Python<'_>, keys: Vec<String>) -> PyResult<bool> {
        let store = self.inner.clone();
        run(py, async move {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            store.check(&keys).await
        })?
        .map_err(to_py_err)
    }

    /// Deletes `key`; true if it existed.
    fn delete_key(&self, py: Python<'_>, key: String) -> PyResult<bool> {
        let store = self.inner.clone();
        run(py, async move { store.delete_key(&key).await })?.map_err(to_py_err)
    }

    /// The number of keys in the store.
    fn num_keys(&self, py: Python<'_>) -> PyResult<u64> {
        let store = self.inner.clone();
        run(py, async move { store.num_keys().await })?.map_err(to_py_err)
    }
}

/// Where the `etcd` binary is, as rdzv's Rust helper finds it: `RDZV_ETCD_BINARY`, else
/// `etcd` on `PATH`; `RuntimeError` saying why if neither.
#[pyfunction]
fn find_etcd_binary() -> PyResult<PathBuf> {
    rdzv::etcd::server::find_etcd_binary().map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// A local throw-away etcd on free loopback ports (see [`rdzv::etcd::EtcdServer`]); stopped
/// by `stop()` or when the object is collected.
#[pyclass(module = "rdzv._rdzv", frozen)]
struct EtcdServerCore {
    server: Mutex<Option<EtcdServer>>,
    endpoint: String,
    host: String,
    port: u16,
}

#[pymethods]
impl EtcdServerCore {
    /// Starts etcd and waits until it answers, at most `timeout` seconds. `data_dir`, if
    /// given, replaces the temporary data directory; `binary` is the etcd binary (else
    /// `find_etcd_binary()`); `extra_args` are appended to etcd's command line. `RuntimeError`
    /// if it does not start.
    #[staticmethod]
    #[pyo3(signature = (timeout=60.0, data_dir=None, binary=None, extra_args=None))]
    fn start(
        py: Python<'_>,
        timeout: f64,
        data_dir: Option<PathBuf>,
        binary: Option<PathBuf>,
        extra_args: Option<Vec<String>>,
    ) -> PyResult<Self> {
        let mut options = EtcdServerOptions {
            ready_timeout: seconds(timeout, "timeout")?,
            binary,
            ..Default::default()
        };
        if let Some(dir) = data_dir {
            let mut arg = std::ffi::OsString::from("--data-dir=");
            arg.push(dir.as_os_str());
            options.extra_args.push(arg);
        }
        options
            .extra_args
            .extend(extra_args.unwrap_or_default().into_iter().map(Into::into));
        let server = run(py, EtcdServer::start_with(options))?
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start etcd: {e}")))?;
        Ok(Self {
            endpoint: server.endpoint(),
            host: server.host().to_string(),
            port: server.port(),
            server: Mutex::new(Some(server)),
        })
    }

    /// `host:port` of the client URL.
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The client host.
    fn host(&self) -> &str {
        &self.host
    }

    /// The client port.
    fn port(&self) -> u16 {
        self.port
    }

    /// The start and end of etcd's log.
    fn log_tail(&self) -> String {
        self.lock()
            .as_ref()
            .map(|s| s.log_tail())
            .unwrap_or_default()
    }

    /// etcd's process id, or `None` once stopped.
    fn pid(&self) -> Option<u32> {
        self.lock().as_ref().map(|s| s.pid())
    }

    /// etcd's data directory, or `None` once stopped.
    fn data_dir(&self) -> Option<PathBuf> {
        self.lock().as_ref().map(|s| s.data_dir().to_path_buf())
    }

    /// etcd's exit code (or `-signal`) if it exited on its own; `None` while it runs or after
    /// `stop()`.
    fn exit_status(&self) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        let status = self.lock().as_mut()?.try_wait()?;
        Some(
            status
                .code()
                .or_else(|| status.signal().map(|s| -s))
                .unwrap_or(-1),
        )
    }

    /// Kills etcd and removes its temporary directory; idempotent.
    fn stop(&self, py: Python<'_>) {
        let server = self.lock().take();
        py.allow_threads(move || drop(server));
    }
}

impl EtcdServerCore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<EtcdServer>> {
        self.server.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymodule]
fn _rdzv(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let errors = [
        ("RendezvousError", py.get_type::<RendezvousError>()),
        (
            "RendezvousClosedError",
            py.get_type::<RendezvousClosedError>(),
        ),
        (
            "RendezvousTimeoutError",
            py.get_type::<RendezvousTimeoutError>(),
        ),
        (
            "RendezvousConnectionError",
            py.get_type::<RendezvousConnectionError>(),
        ),
        (
            "RendezvousStateError",
            py.get_type::<RendezvousStateError>(),
        ),
        (
            "RendezvousGracefulExitError",
            py.get_type::<RendezvousGracefulExitError>(),
        ),
    ];
    for (name, class) in errors {
        // Shown (and pickled) as `rdzv.<name>`, where the package re-exports them.
        class.setattr("__module__", "rdzv")?;
        m.add(name, class)?;
    }
    m.add_class::<Handler>()?;
    m.add_class::<RoundInfo>()?;
    m.add_class::<Store>()?;
    m.add_class::<EtcdServerCore>()?;
    m.add_function(wrap_pyfunction!(create_handler, m)?)?;
    m.add_function(wrap_pyfunction!(find_etcd_binary, m)?)?;
    m.add_function(wrap_pyfunction!(logging::install_logging, m)?)?;
    m.add_function(wrap_pyfunction!(logging::stop_logging, m)?)?;
    Ok(())
}
