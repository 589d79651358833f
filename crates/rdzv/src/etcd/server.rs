//! [`EtcdServer`]: starts a real, throw-away `etcd` process on free loopback ports, for tests
//! and for standalone runs; [`EtcdCluster`]: three such members forming one cluster.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a local etcd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EtcdServerError {
    /// TODO(helper): binary not found (say how to install it), spawn failure, not ready in time
    /// (with the tail of etcd's log), I/O errors.
    #[error("{0}")]
    Other(String),
}

/// A running local etcd; killed (and its data dir removed) on [`EtcdServer::stop`] or drop.
#[derive(Debug)]
pub struct EtcdServer {
    _private: (),
}

impl EtcdServer {
    /// Starts etcd on free ports of 127.0.0.1 with a fresh temporary data dir and waits (bounded)
    /// until it answers.
    ///
    /// # Errors
    /// [`EtcdServerError`] if the binary is missing, or etcd did not answer in time after a few
    /// attempts.
    ///
    /// # Cancel safety
    /// Cancel safe: a process started by a cancelled call is killed when its handle drops.
    pub async fn start() -> Result<Self, EtcdServerError> {
        todo!()
    }

    /// `host:port` of the client URL.
    pub fn endpoint(&self) -> String {
        todo!()
    }

    /// The client host (`127.0.0.1`).
    pub fn host(&self) -> &str {
        todo!()
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        todo!()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        todo!()
    }

    /// The etcd process id.
    pub fn pid(&self) -> u32 {
        todo!()
    }

    /// A new client connected to this server.
    ///
    /// # Errors
    /// [`EtcdServerError`] if connecting fails.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn client(&self) -> Result<etcd_client::Client, EtcdServerError> {
        todo!()
    }

    /// Kills etcd and removes its data dir. Idempotent.
    pub fn stop(&mut self) {
        todo!()
    }
}

/// Where the `etcd` binary is: `RDZV_ETCD_BINARY`, else `etcd` on `PATH`.
///
/// # Errors
/// [`EtcdServerError`] naming how to install etcd when none is found.
pub fn find_etcd_binary() -> Result<PathBuf, EtcdServerError> {
    todo!()
}

/// A three-member loopback etcd cluster, for fault tests.
#[derive(Debug)]
pub struct EtcdCluster {
    _private: (),
}

impl EtcdCluster {
    /// Starts three members and waits until the cluster answers.
    ///
    /// # Errors
    /// As [`EtcdServer::start`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn start() -> Result<Self, EtcdServerError> {
        let _ = Duration::from_secs(0);
        todo!()
    }

    /// Comma-separated `host:port` list of all members' client URLs.
    pub fn endpoints(&self) -> String {
        todo!()
    }
}
