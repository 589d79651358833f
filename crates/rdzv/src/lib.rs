//! # rdzv
//!
//! Elastic rendezvous for distributed training jobs over the etcd v3 API.
//!
//! Before every start and restart, the nodes of a multi-node job (PyTorch, JAX, anything with
//! ranks) must agree on who is in the job and who has which rank. This crate keeps the semantics
//! and parameter names of PyTorch's `torch.distributed.elastic.rendezvous` and its `etcd`
//! backend, but speaks etcd v3 (leases, transactions, watches), costs O(N) etcd requests per
//! round, notices dead peers by lease expiry and hands out sticky, deterministic ranks.
//!
//! The main entry points:
//! - [`RendezvousParameters`]: what a node asks for (backend, endpoint, run id, node counts,
//!   free-form `key=value` configuration).
//! - [`RendezvousHandler`]: the handler trait; [`create_handler`] builds one through the
//!   default [`HandlerRegistry`], in which the `etcd` backend is registered.
//! - [`etcd::EtcdServer`]: starts a real, throw-away etcd for tests and standalone runs.

#![warn(missing_docs)]

pub mod bootstrap;
pub mod endpoint;
pub mod error;
pub mod etcd;
pub mod handler;
pub mod parameters;
pub mod registry;
pub mod secrets;
pub mod store;

#[cfg(test)]
mod proptests;

pub use endpoint::{parse_endpoint, parse_endpoints, Endpoint, EndpointError};
pub use error::RendezvousError;
pub use handler::{GlobalRanks, MembershipEvent, RendezvousHandler, RendezvousInfo};
pub use parameters::{
    parse_config, parse_duration, parse_duration_in, ParameterError, RendezvousParameters,
    MAX_RETENTION, MAX_TIMEOUT,
};
pub use registry::{
    create_handler, default_registry, HandlerCreator, HandlerRegistry, RegistryError,
};
pub use store::Store;
