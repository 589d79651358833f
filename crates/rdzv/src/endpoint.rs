//! Parsing of rendezvous endpoints: `host`, `host:port`, `[ipv6]:port`, bare IPv6, optional
//! `http://`/`https://` scheme, and comma-separated lists for an etcd cluster.

use std::fmt;

/// The scheme given in front of an endpoint, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `http://`
    Http,
    /// `https://`
    Https,
}

/// One parsed endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or IP address, without IPv6 brackets.
    pub host: String,
    /// Port number.
    pub port: u16,
    /// Scheme given in the text, if any.
    pub scheme: Option<Scheme>,
}

/// Why an endpoint could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// TODO(helper): variants for empty input, empty host, bad host, bad port, port out of range,
    /// unsupported scheme, empty list item.
    #[error("invalid endpoint '{endpoint}': {reason}")]
    Invalid {
        /// The text that was given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl Endpoint {
    /// `host:port`, with IPv6 hosts in brackets.
    pub fn host_port(&self) -> String {
        todo!()
    }

    /// `http://host:port` or `https://host:port` (the endpoint's own scheme wins over `default`).
    pub fn url(&self, default: Scheme) -> String {
        let _ = default;
        todo!()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.host_port())
    }
}

/// Parses one endpoint; `default_port` is used when none is given.
///
/// # Errors
/// [`EndpointError`] for an empty host, a malformed host, a bad or out-of-range port.
pub fn parse_endpoint(text: &str, default_port: u16) -> Result<Endpoint, EndpointError> {
    let _ = (text, default_port);
    todo!()
}

/// Parses a comma-separated list of endpoints (an etcd cluster).
///
/// # Errors
/// [`EndpointError`] for an empty list, an empty item or any item [`parse_endpoint`] rejects.
pub fn parse_endpoints(text: &str, default_port: u16) -> Result<Vec<Endpoint>, EndpointError> {
    let _ = (text, default_port);
    todo!()
}
