//! The `etcd` backend: connection options, the rendezvous, the store and a local server helper.

pub mod server;

pub use server::{find_etcd_binary, EtcdCluster, EtcdServer, EtcdServerError};
