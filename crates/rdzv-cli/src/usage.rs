//! Exit codes, and which errors are usage or configuration errors.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | a runtime failure: a rendezvous that timed out, an unknown run (`status`, `close` without `--force`), `run`: a worker group that failed after its restarts, a run closed by another node |
//! | 2 | bad input: a usage or configuration error (a bad flag, endpoint, run id, `--rdzv-conf` key or value; found before anything is started or connected to), an etcd that cannot be reached or refuses us (wrong endpoint, credentials or permissions), data under the run's keys that is not rdzv's |
//! | 128 + N | `run`, `join --hold`: stopped by signal N (130 for SIGINT, 143 for SIGTERM) |

use std::fmt;

use rdzv::{EndpointError, ParameterError, RendezvousError};

/// Exit code of a usage or configuration error (as clap's own).
pub const USAGE: u8 = 2;

/// A usage or configuration error found by the command itself (after clap's parsing).
#[derive(Debug)]
pub struct UsageError(String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A [`UsageError`] with `message`, as an [`anyhow::Error`].
pub fn usage(message: impl fmt::Display) -> anyhow::Error {
    anyhow::Error::new(UsageError(message.to_string()))
}

/// Whether `err` (or any error in its chain) is a usage or configuration error: a
/// [`UsageError`], or the library's parameter, endpoint and configuration errors.
pub fn is_usage_error(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.is::<UsageError>()
            || e.is::<ParameterError>()
            || e.is::<EndpointError>()
            || matches!(
                e.downcast_ref::<RendezvousError>(),
                Some(
                    RendezvousError::Parameters(_)
                        | RendezvousError::InvalidConfig { .. }
                        | RendezvousError::Registry(_)
                )
            )
    })
}

/// Whether `err` (or any error in its chain) says that etcd could not be used as given
/// (unreachable, refusing us) or holds data under our keys that is not ours.
pub fn is_bad_backend(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        matches!(
            e.downcast_ref::<RendezvousError>(),
            Some(RendezvousError::Connection(_) | RendezvousError::State(_))
        )
    })
}

/// The exit code for an error that ended a command: [`USAGE`] for bad input (usage and
/// configuration errors, an etcd that cannot be used as given, foreign data), 1 for anything
/// else.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if is_usage_error(err) || is_bad_backend(err) {
        USAGE
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn configuration_errors_are_usage_errors_anywhere_in_the_chain() {
        let usage_errors = [
            usage("bad flag"),
            anyhow::Error::new(ParameterError::EmptyRunId),
            anyhow::Error::new(RendezvousError::from(ParameterError::EmptyRunId)),
            anyhow::Error::new(RendezvousError::InvalidConfig {
                key: "timeout".into(),
                reason: "x".into(),
            }),
            Err::<(), _>(RendezvousError::InvalidConfig {
                key: "k".into(),
                reason: "r".into(),
            })
            .context("cannot connect")
            .unwrap_err(),
            Err::<(), _>(ParameterError::EmptyBackend)
                .context("invalid --rdzv-conf")
                .unwrap_err(),
        ];
        for err in &usage_errors {
            assert_eq!(exit_code(err), 2, "{err:#}");
        }
        let bad_backend = [
            anyhow::Error::new(RendezvousError::Connection("refused".into())),
            Err::<(), _>(RendezvousError::State("garbage".into()))
                .context("cannot join")
                .unwrap_err(),
        ];
        for err in &bad_backend {
            assert!(!is_usage_error(err), "{err:#}");
            assert_eq!(exit_code(err), 2, "{err:#}");
        }
        let runtime_errors = [
            anyhow::anyhow!("etcd exited"),
            anyhow::Error::new(RendezvousError::NoSuchRun { run_id: "x".into() }),
            Err::<(), _>(RendezvousError::Timeout("slow".into()))
                .context("rendezvous failed")
                .unwrap_err(),
        ];
        for err in &runtime_errors {
            assert_eq!(exit_code(err), 1, "{err:#}");
        }
    }
}
