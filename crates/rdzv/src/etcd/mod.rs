//! The `etcd` backend: connection options, the rendezvous, the store and a local server helper.
//!
//! One module per concern: [`options`] (configuration and connecting), [`conf_keys`] (which
//! configuration keys are accepted), [`client`] (request
//! counting and error mapping), [`backoff`] (pauses between retries), [`keys`] (the key layout), [`records`] (what is stored),
//! [`ranks`] (member selection and rank assignment, pure), [`lease`] (keep-alive),
//! [`watch`] (a watch that recovers from compaction), [`rendezvous`] (the handler),
//! [`store`] (the round's key-value store) and [`server`] (a throw-away etcd).

pub mod api;
pub mod backoff;
pub mod client;
pub mod conf_keys;
mod finalize;
pub mod keys;
pub mod lease;
mod monitor;
pub mod node;
pub mod options;
pub mod probe;
pub mod ranks;
pub mod records;
pub mod rendezvous;
mod restarts;
mod round;
pub mod server;
pub mod status;
pub mod store;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

pub use client::{EtcdClient, RequestStats, StatsSnapshot};
pub use node::NodeEnv;
pub use options::{ConnectionOptions, RendezvousSettings, DEFAULT_ETCD_PORT};
pub use rendezvous::EtcdRendezvousHandler;
pub use server::{
    find_etcd_binary, find_etcd_binary_from, EtcdCluster, EtcdServer, EtcdServerError,
    EtcdServerOptions, EtcdTls, ETCD_BINARY_ENV,
};
pub use status::{read_status, run_exists, MemberStatus, RunStatus};
pub use store::EtcdStore;

use crate::{HandlerCreator, RendezvousHandler};

/// The creator the registry uses for the `etcd` backend.
pub fn handler_creator() -> HandlerCreator {
    Arc::new(|params| {
        Box::pin(async move {
            let handler = EtcdRendezvousHandler::connect(&params).await?;
            Ok(Arc::new(handler) as Arc<dyn RendezvousHandler>)
        })
    })
}

/// `now + timeout`, for a timeout of any size: a sum beyond the clock's range is a deadline a
/// century away (no practical end) instead of a panic.
pub(crate) fn deadline_after(timeout: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}
