//! The signals an agent handles, as torchrun's `--signals-to-handle`: those listed stop the
//! agent (forwarded to the workers, which get the grace period before SIGKILL; exit 128 + N);
//! SIGUSR1 and SIGUSR2, unless listed, are only forwarded to the workers and the agent goes on
//! (SLURM's `--signal=USR1@<seconds>` pre-emption warning reaches the training script).

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// torchrun's default `--signals-to-handle`.
pub const DEFAULT_SIGNALS: &str = "SIGTERM,SIGINT,SIGHUP,SIGQUIT";

/// The signals `--signals-to-handle` may name (the others cannot be caught or make no sense
/// to forward).
const KNOWN: &[(&str, i32)] = &[
    ("SIGTERM", libc::SIGTERM),
    ("SIGINT", libc::SIGINT),
    ("SIGHUP", libc::SIGHUP),
    ("SIGQUIT", libc::SIGQUIT),
    ("SIGUSR1", libc::SIGUSR1),
    ("SIGUSR2", libc::SIGUSR2),
];

/// The signals only forwarded to the workers when they are not in `--signals-to-handle`.
const FORWARDED: &[i32] = &[libc::SIGUSR1, libc::SIGUSR2];

/// Parses `--signals-to-handle`: comma-separated names, with or without `SIG`, any case.
///
/// # Errors
/// An unknown or uncatchable signal, or an empty list: a message naming the accepted ones.
pub fn parse_signals(text: &str) -> Result<Vec<i32>, String> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim) {
        let upper = item.to_ascii_uppercase();
        let name = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        let Some(&(_, signo)) = KNOWN.iter().find(|(n, _)| *n == name) else {
            return Err(format!(
                "`{item}` is not a signal rdzv handles; use some of {}",
                KNOWN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ));
        };
        if !out.contains(&signo) {
            out.push(signo);
        }
    }
    Ok(out)
}

/// A signal that stops the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Termination(i32);

impl Termination {
    /// The signal number.
    pub fn signo(self) -> i32 {
        self.0
    }

    /// The conventional exit code after this signal (128 + signal number).
    pub fn exit_code(self) -> u8 {
        u8::try_from(128 + self.0).unwrap_or(u8::MAX)
    }
}

/// What a signal asks of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalEvent {
    /// Stop (after forwarding it to the workers).
    Stop(Termination),
    /// Forward this signal to the workers and go on.
    Forward(i32),
}

/// Installed handlers: the signals that stop the agent, and those only forwarded.
#[derive(Debug)]
pub struct TerminationSignals {
    stop: mpsc::UnboundedReceiver<i32>,
    forward: mpsc::UnboundedReceiver<i32>,
}

impl TerminationSignals {
    /// Installs torchrun's default set ([`DEFAULT_SIGNALS`]) (do it early: a signal before
    /// this kills the process).
    ///
    /// # Errors
    /// If a handler cannot be installed.
    pub fn install() -> std::io::Result<Self> {
        let handled = parse_signals(DEFAULT_SIGNALS).unwrap_or_default();
        Self::install_for(&handled)
    }

    /// Installs handlers: `handled` stop the agent; SIGUSR1 and SIGUSR2, if not among them,
    /// are only forwarded.
    ///
    /// # Errors
    /// If a handler cannot be installed.
    pub fn install_for(handled: &[i32]) -> std::io::Result<Self> {
        let (stop_tx, stop) = mpsc::unbounded_channel();
        let (forward_tx, forward) = mpsc::unbounded_channel();
        let forwarded = FORWARDED.iter().filter(|s| !handled.contains(s));
        for (&signo, tx) in handled
            .iter()
            .map(|s| (s, &stop_tx))
            .chain(forwarded.map(|s| (s, &forward_tx)))
        {
            let mut stream = signal(SignalKind::from_raw(signo))?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if tx.send(signo).is_err() {
                        return;
                    }
                }
            });
        }
        Ok(Self { stop, forward })
    }

    /// Waits for the next signal that stops the agent.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn recv(&mut self) -> Termination {
        match self.stop.recv().await {
            Some(signo) => Termination(signo),
            None => std::future::pending().await,
        }
    }

    /// Waits for the next signal of either kind (while workers run).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn next(&mut self) -> SignalEvent {
        tokio::select! {
            biased;
            Some(signo) = self.stop.recv() => SignalEvent::Stop(Termination(signo)),
            Some(signo) = self.forward.recv() => SignalEvent::Forward(signo),
            else => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_lists_parse_as_torchrun_names_them() {
        assert_eq!(
            parse_signals(DEFAULT_SIGNALS),
            Ok(vec![
                libc::SIGTERM,
                libc::SIGINT,
                libc::SIGHUP,
                libc::SIGQUIT
            ])
        );
        assert_eq!(
            parse_signals("usr1, sigTERM,SIGUSR1"),
            Ok(vec![libc::SIGUSR1, libc::SIGTERM])
        );
        for bad in ["SIGKILL", "SIGSTOP", "", "TERM,,INT", "SIGFOO"] {
            assert!(parse_signals(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exit_codes_are_128_plus_the_signal() {
        assert_eq!(Termination(libc::SIGINT).exit_code(), 130);
        assert_eq!(Termination(libc::SIGTERM).exit_code(), 143);
        assert_eq!(Termination(libc::SIGQUIT).exit_code(), 131);
    }
}
