//! [`RendezvousParameters`]: what a node asks the rendezvous for, with typed getters for the
//! free-form `key=value` configuration.

use std::collections::BTreeMap;
use std::time::Duration;

/// Why parameters or a configuration value are invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParameterError {
    /// TODO(helper): one variant per kind of mistake (empty backend, empty/unsafe run_id,
    /// min_nodes < 1, max < min, bad config string, missing value, wrong type for a key).
    #[error("{0}")]
    Invalid(String),
}

/// The parameters of a rendezvous, as in PyTorch (`backend`, `endpoint`, `run_id`, `min_nodes`,
/// `max_nodes`, `local_addr`, free-form configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousParameters {
    /// Backend name, e.g. `etcd`.
    pub backend: String,
    /// Backend endpoint(s), e.g. `localhost:2379` or `h1:2379,h2:2379`.
    pub endpoint: String,
    /// The job's id; every node of one job uses the same one.
    pub run_id: String,
    /// Minimum number of nodes for a round to complete.
    pub min_nodes: usize,
    /// Maximum number of nodes in a round.
    pub max_nodes: usize,
    /// The address this node advertises to its peers, if set.
    pub local_addr: Option<String>,
    /// Free-form backend configuration.
    pub config: BTreeMap<String, String>,
}

impl RendezvousParameters {
    /// Validated parameters without configuration.
    ///
    /// # Errors
    /// [`ParameterError`] for an empty backend, an empty or unsafe run id, `min_nodes < 1` or
    /// `max_nodes < min_nodes`.
    pub fn new(
        backend: impl Into<String>,
        endpoint: impl Into<String>,
        run_id: impl Into<String>,
        min_nodes: usize,
        max_nodes: usize,
    ) -> Result<Self, ParameterError> {
        let _ = (backend.into(), endpoint.into(), run_id.into(), min_nodes, max_nodes);
        todo!()
    }

    /// Sets `local_addr`.
    pub fn with_local_addr(mut self, addr: impl Into<String>) -> Self {
        self.local_addr = Some(addr.into());
        self
    }

    /// Adds one configuration entry (later entries overwrite earlier ones).
    pub fn with_config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.insert(key.into(), value.into());
        self
    }

    /// Adds every entry of a torchrun-style configuration string `a=1,b=x`.
    ///
    /// # Errors
    /// [`ParameterError`] if the string is malformed (see [`parse_config`]).
    pub fn with_config_str(self, text: &str) -> Result<Self, ParameterError> {
        let _ = text;
        todo!()
    }

    /// Checks the parameters again (after fields were changed directly).
    ///
    /// # Errors
    /// As [`RendezvousParameters::new`].
    pub fn validate(&self) -> Result<(), ParameterError> {
        todo!()
    }

    /// The raw configuration value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.config.get(key).map(String::as_str)
    }

    /// The value of `key`, or `default`.
    pub fn get_str(&self, key: &str, default: &str) -> String {
        self.get(key).unwrap_or(default).to_string()
    }

    /// The value of `key` as an integer (surrounding whitespace and a sign accepted).
    ///
    /// # Errors
    /// [`ParameterError`] naming the key if the value is not an integer.
    pub fn get_int(&self, key: &str) -> Result<Option<i64>, ParameterError> {
        let _ = key;
        todo!()
    }

    /// The value of `key` as a boolean: `1,true,t,yes,y` / `0,false,f,no,n`, any case.
    ///
    /// # Errors
    /// [`ParameterError`] naming the key for any other value.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, ParameterError> {
        let _ = key;
        todo!()
    }

    /// The value of `key` as a duration: plain seconds (`30`, `1.5`) or humantime (`30s`, `2m`).
    ///
    /// # Errors
    /// [`ParameterError`] naming the key for a negative, non-finite or malformed value.
    pub fn get_duration(&self, key: &str) -> Result<Option<Duration>, ParameterError> {
        let _ = key;
        todo!()
    }
}

/// Parses a torchrun-style configuration string `a=1,b=x` (as `--rdzv-conf`).
///
/// # Errors
/// [`ParameterError`] for an empty key or a key without value.
pub fn parse_config(text: &str) -> Result<BTreeMap<String, String>, ParameterError> {
    let _ = text;
    todo!()
}
