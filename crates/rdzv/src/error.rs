//! [`RendezvousError`]: the error kinds of PyTorch's rendezvous (closed, timeout, connection,
//! state, graceful exit) plus parameter, registry and general errors.

use crate::{ParameterError, RegistryError};

/// Everything a rendezvous operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    /// The run was closed (by `set_closed()` or because the job ended); no further rounds.
    #[error("the rendezvous of run '{run_id}' is closed")]
    Closed {
        /// The run that is closed.
        run_id: String,
    },
    /// The operation did not complete in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The backend could not be reached, or refused us (e.g. authentication).
    #[error("connection to the rendezvous backend failed: {0}")]
    Connection(String),
    /// The state stored in the backend is corrupt or not ours.
    #[error("invalid rendezvous state: {0}")]
    State(String),
    /// The run has no key in the backend: it never existed, or its keys outlived its last node
    /// by its `retention` and are gone.
    #[error(
        "the run '{run_id}' does not exist: no node created it, or its keys expired after its \
         last node left"
    )]
    NoSuchRun {
        /// The run id that was asked for.
        run_id: String,
    },
    /// Not a failure: this node was not admitted and the rendezvous ended; exit quietly.
    #[error("graceful exit: {0}")]
    GracefulExit(String),
    /// Invalid parameters or configuration.
    #[error(transparent)]
    Parameters(#[from] ParameterError),
    /// A configuration value the backend cannot use.
    #[error("invalid rendezvous configuration '{key}': {reason}")]
    InvalidConfig {
        /// The configuration key (or `endpoint`).
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The backend registry refused the request.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl RendezvousError {
    /// True for [`RendezvousError::Closed`].
    pub fn is_closed(&self) -> bool {
        matches!(self, Self::Closed { .. })
    }

    /// True for [`RendezvousError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout(_))
    }
}
