//! Waiting for the signals that ask us to stop.

use tokio::signal::unix::{signal, SignalKind};

/// The signal that arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM.
    Terminate,
    /// SIGHUP.
    Hangup,
}

impl Termination {
    /// The signal number.
    pub fn signo(self) -> i32 {
        match self {
            Self::Interrupt => libc::SIGINT,
            Self::Terminate => libc::SIGTERM,
            Self::Hangup => libc::SIGHUP,
        }
    }

    /// The conventional exit code after this signal (128 + signal number).
    pub fn exit_code(self) -> u8 {
        128 + self.signo() as u8
    }
}

/// Installed handlers for SIGINT, SIGTERM and SIGHUP.
#[derive(Debug)]
pub struct TerminationSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl TerminationSignals {
    /// Installs the handlers (do it early: a signal before this kills the process).
    ///
    /// # Errors
    /// If a handler cannot be installed.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for the next one.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn recv(&mut self) -> Termination {
        tokio::select! {
            _ = self.int.recv() => Termination::Interrupt,
            _ = self.term.recv() => Termination::Terminate,
            _ = self.hup.recv() => Termination::Hangup,
        }
    }
}
