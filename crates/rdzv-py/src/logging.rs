//! rdzv's `tracing` events, forwarded to Python's `logging` (the logger `rdzv`).
//!
//! The library logs from Tokio tasks (lease keep-alives, membership watches) that must never
//! wait for the interpreter. So the subscriber's layer only formats the event and hands it to a
//! bounded channel (dropping it, and counting, when the channel is full); one forwarding
//! thread takes the GIL and calls `logging.getLogger("rdzv").log(level, message)`. Python's
//! handlers and the logger's level then decide what is shown, as for any Python library.
//!
//! Which events are forwarded at all is decided on the Rust side, by `RDZV_LOG` (an
//! `EnvFilter` directive such as `debug` or `rdzv=debug`; `info` when unset): a `debug` event
//! costs nothing unless asked for.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;

use pyo3::prelude::*;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

/// The environment variable of the Rust-side filter.
pub const LOG_ENV: &str = "RDZV_LOG";

/// Records waiting for the forwarding thread; more are dropped (and counted).
const CAPACITY: usize = 1024;

/// The Python logger's name.
const LOGGER: &str = "rdzv";

struct Record {
    level: Level,
    target: String,
    message: String,
}

static SENDER: OnceLock<SyncSender<Record>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Set at interpreter exit (`atexit`): the forwarding thread then takes the GIL no more.
static STOPPED: AtomicBool = AtomicBool::new(false);

/// Python's level number of a `tracing` level.
fn levelno(level: Level) -> u32 {
    match level {
        Level::ERROR => 40,
        Level::WARN => 30,
        Level::INFO => 20,
        Level::DEBUG => 10,
        Level::TRACE => 5,
    }
}

/// The event's message, then its other fields as `key=value`.
#[derive(Default)]
struct Message {
    message: String,
    fields: String,
}

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

struct ToPython;

impl<S: Subscriber> Layer<S> for ToPython {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if STOPPED.load(Ordering::Relaxed) {
            return;
        }
        let Some(sender) = SENDER.get() else { return };
        let mut visitor = Message::default();
        event.record(&mut visitor);
        let record = Record {
            level: *event.metadata().level(),
            target: event.metadata().target().to_string(),
            message: visitor.message + &visitor.fields,
        };
        if let Err(TrySendError::Full(_)) = sender.try_send(record) {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn forward(records: Receiver<Record>) {
    for record in records {
        if STOPPED.load(Ordering::Relaxed) {
            return;
        }
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        let sent = Python::with_gil(|py| -> PyResult<()> {
            let logger = py.import("logging")?.call_method1("getLogger", (LOGGER,))?;
            if dropped > 0 {
                logger.call_method1(
                    "log",
                    (
                        30,
                        format!("{dropped} log records of rdzv were dropped (Python was busy)"),
                    ),
                )?;
            }
            let level = levelno(record.level);
            if logger.call_method1("isEnabledFor", (level,))?.is_truthy()? {
                logger.call_method1("log", (level, "%s [%s]", record.message, record.target))?;
            }
            Ok(())
        });
        if let Err(e) = sent {
            Python::with_gil(|py| e.print(py));
        }
    }
}

/// Installs the forwarding (once per process; later calls do nothing). Returns false if
/// another `tracing` subscriber was already installed.
#[pyfunction]
pub fn install_logging() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
        let (sender, receiver) = sync_channel(CAPACITY);
        let installed = tracing_subscriber::registry()
            .with(ToPython.with_filter(filter))
            .try_init()
            .is_ok();
        if installed {
            let _ = SENDER.set(sender);
            let spawned = std::thread::Builder::new()
                .name("rdzv-log".into())
                .spawn(move || forward(receiver));
            if spawned.is_err() {
                STOPPED.store(true, Ordering::Relaxed);
            }
        }
        installed
    })
}

/// Stops forwarding (called at interpreter exit): events are dropped from then on.
#[pyfunction]
pub fn stop_logging() {
    STOPPED.store(true, Ordering::Relaxed);
}
