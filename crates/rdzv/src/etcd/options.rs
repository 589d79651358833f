//! The etcd backend's settings, read from [`RendezvousParameters`], and connecting to etcd.
//!
//! Configuration keys (all optional):
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `protocol` | `http` | `http` or `https` for endpoints given without a scheme |
//! | `cacert`, `cert`, `key` | – | PEM files for TLS (server CA; client certificate and key) |
//! | `username` | – | etcd user (authentication) |
//! | `password_file` | – | file whose first line is the user's password (recommended) |
//! | `password` | – | the password itself: visible in `ps`, avoid (see [`crate::secrets`]) |
//! | `connect_timeout` | `5s` | bound on connecting to etcd |
//! | `request_timeout` | `5s` | bound on one etcd request (then the next endpoint is tried) |
//! | `etcd_prefix` | `/rdzv` | key prefix; a run lives under `<prefix>/<run_id>/` |
//! | `timeout` | `600s` | bound on one `next_rendezvous()` |
//! | `last_call_timeout` | `30s` | wait after `min_nodes` have joined, for more to come |
//! | `keep_alive_ttl` | `10s` | TTL of a node's lease; renewed every third of it |
//! | `retention` | `1h` | how long a run's keys outlive its last node |
//! | `store_timeout` | `300s` | default bound on blocking store operations |
//! | `node_rank` | – | a hint for this node's place in the first round's rank order |
//! | `max_txn_ops` | `128` | etcd's `--max-txn-ops`: larger rank tables are written in chunks |
//!
//! Without `password` or `password_file`, a `username` takes its password from the environment
//! variable `RDZV_ETCD_PASSWORD`. Workers started by `rdzv run` never get the password.
//!
//! Durations are seconds (`30`, `1.5`) or humantime (`30s`, `2m`).

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use super::client::EtcdClient;

use crate::endpoint::{parse_endpoints, Endpoint, Scheme};
use crate::{ParameterError, RendezvousError, RendezvousParameters};

/// The default etcd client port.
pub const DEFAULT_ETCD_PORT: u16 = 2379;

/// How to connect to etcd.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionOptions {
    /// The cluster's endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Scheme for endpoints given without one.
    pub protocol: Scheme,
    /// CA certificate (PEM file).
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM file).
    pub cert: Option<PathBuf>,
    /// Client key (PEM file).
    pub key: Option<PathBuf>,
    /// etcd user name.
    pub username: Option<String>,
    /// etcd password (never logged).
    pub password: Option<String>,
    /// Bound on connecting.
    pub connect_timeout: Duration,
    /// Bound on one request.
    pub request_timeout: Duration,
    /// The key the connect probe reads (count only): the run prefix, so that a user granted
    /// only rdzv's prefix can connect.
    pub probe_key: String,
}

impl std::fmt::Debug for ConnectionOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionOptions")
            .field("endpoints", &self.urls())
            .field("cacert", &self.cacert)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("probe_key", &self.probe_key)
            .finish()
    }
}

/// How long connecting waits for an endpoint before it also tries the next one.
pub const CONNECT_HEDGE: Duration = Duration::from_millis(200);

/// The smallest `max_txn_ops`: the transaction that completes a round has up to seven
/// operations besides the rank table.
pub const MIN_TXN_OPS: usize = 8;

/// The rendezvous protocol's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousSettings {
    /// Key prefix, without trailing `/`.
    pub prefix: String,
    /// Bound on one `next_rendezvous()`.
    pub timeout: Duration,
    /// Wait after `min_nodes` have joined.
    pub last_call_timeout: Duration,
    /// TTL of a node's lease.
    pub keep_alive_ttl: Duration,
    /// TTL of the run lease.
    pub retention: Duration,
    /// Default bound on blocking store operations.
    pub store_timeout: Duration,
    /// Rank-order hint.
    pub node_rank: Option<u64>,
    /// Operations per transaction at most (etcd's `--max-txn-ops`).
    pub max_txn_ops: usize,
    /// Minimum nodes per round.
    pub min_nodes: usize,
    /// Maximum nodes per round.
    pub max_nodes: usize,
}

fn duration(
    params: &RendezvousParameters,
    key: &str,
    default: Duration,
) -> Result<Duration, ParameterError> {
    Ok(params.get_duration(key)?.unwrap_or(default))
}

fn path(params: &RendezvousParameters, key: &str) -> Option<PathBuf> {
    params.get(key).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The etcd password: `password`, else the first line of `password_file`, else (with a
/// `username`) the environment variable [`crate::secrets::PASSWORD_ENV`].
fn password(params: &RendezvousParameters) -> Result<Option<String>, RendezvousError> {
    let bad = |reason: String| RendezvousError::InvalidConfig {
        key: "password_file".to_string(),
        reason,
    };
    match (params.get("password"), path(params, "password_file")) {
        (Some(_), Some(_)) => Err(bad(
            "give either `password` or `password_file`, not both".into()
        )),
        (Some(password), None) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "the etcd password is given in the rendezvous configuration, which every \
                     user of this machine can read (ps, /proc): use password_file=<path> or \
                     the environment variable {} instead",
                    crate::secrets::PASSWORD_ENV
                );
            });
            Ok(Some(password.to_string()))
        }
        (None, Some(file)) => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| bad(format!("cannot read {}: {e}", file.display())))?;
            let first = text.lines().next().unwrap_or("").trim_end_matches('\r');
            if first.is_empty() {
                return Err(bad(format!(
                    "{} is empty: its first line must be the password",
                    file.display()
                )));
            }
            Ok(Some(first.to_string()))
        }
        (None, None) if params.get("username").is_some() => {
            Ok(std::env::var(crate::secrets::PASSWORD_ENV)
                .ok()
                .filter(|p| !p.is_empty()))
        }
        (None, None) => Ok(None),
    }
}

impl ConnectionOptions {
    /// Reads the connection options from parameters.
    ///
    /// # Errors
    /// [`RendezvousError::Parameters`] for a bad endpoint, protocol, duration, or TLS/auth
    /// options given only in part (`cert` without `key`, `username` without `password`).
    pub fn from_parameters(params: &RendezvousParameters) -> Result<Self, RendezvousError> {
        let bad = |key: &str, reason: String| RendezvousError::InvalidConfig {
            key: key.to_string(),
            reason,
        };
        let protocol = match params
            .get("protocol")
            .map(|p| p.trim().to_ascii_lowercase())
        {
            // TLS files without a protocol mean https.
            None if path(params, "cacert").is_some() || path(params, "cert").is_some() => {
                Scheme::Https
            }
            None => Scheme::Http,
            Some(p) if p == "http" => Scheme::Http,
            Some(p) if p == "https" => Scheme::Https,
            Some(p) => return Err(bad("protocol", format!("'{p}' is neither http nor https"))),
        };
        let endpoints = parse_endpoints(&params.endpoint, DEFAULT_ETCD_PORT)
            .map_err(|e| bad("endpoint", e.to_string()))?;
        let options = Self {
            endpoints,
            protocol,
            cacert: path(params, "cacert"),
            cert: path(params, "cert"),
            key: path(params, "key"),
            username: params.get("username").map(str::to_string),
            password: password(params)?,
            connect_timeout: duration(params, "connect_timeout", Duration::from_secs(5))?,
            request_timeout: duration(
                params,
                "request_timeout",
                super::client::DEFAULT_REQUEST_TIMEOUT,
            )?,
            probe_key: format!(
                "{}/",
                params.get_str("etcd_prefix", "/rdzv").trim_end_matches('/')
            ),
        };
        if options.cert.is_some() != options.key.is_some() {
            return Err(bad(
                "cert",
                "`cert` and `key` must be given together".into(),
            ));
        }
        if options.username.is_some() != options.password.is_some() {
            return Err(bad(
                "username",
                format!(
                    "`username` needs a password (`password_file`, `password` or the \
                     environment variable {}) and a password needs a `username`",
                    crate::secrets::PASSWORD_ENV
                ),
            ));
        }
        if (options.cacert.is_some() || options.cert.is_some())
            && options.urls().iter().any(|u| u.starts_with("http://"))
        {
            return Err(bad(
                "protocol",
                "`cacert`/`cert` are given but an endpoint uses plain http: use protocol=https \
                 (or https:// endpoints)"
                    .into(),
            ));
        }
        if options.request_timeout.is_zero() {
            return Err(bad("request_timeout", "must be greater than zero".into()));
        }
        if options.connect_timeout.is_zero() {
            return Err(bad("connect_timeout", "must be greater than zero".into()));
        }
        Ok(options)
    }

    /// Options for plain-HTTP endpoints.
    ///
    /// # Errors
    /// [`RendezvousError::Parameters`] for a bad endpoint list.
    pub fn plain(endpoints: &str) -> Result<Self, RendezvousError> {
        let params = RendezvousParameters::new("etcd", endpoints, "x", 1, 1)?;
        Self::from_parameters(&params)
    }

    /// The endpoints as URLs.
    pub fn urls(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .map(|e| e.url(self.protocol))
            .collect()
    }

    fn uses_tls(&self) -> bool {
        self.cacert.is_some()
            || self.cert.is_some()
            || self.urls().iter().any(|u| u.starts_with("https://"))
    }

    fn tls(&self) -> Result<TlsOptions, RendezvousError> {
        let read = |key: &str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| RendezvousError::InvalidConfig {
                key: key.to_string(),
                reason: format!("cannot read {}: {e}", p.display()),
            })
        };
        let mut tls = TlsOptions::new();
        if let Some(ca) = &self.cacert {
            tls = tls.ca_certificate(Certificate::from_pem(read("cacert", ca)?));
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            tls = tls.identity(Identity::from_pem(read("cert", cert)?, read("key", key)?));
        }
        Ok(tls)
    }

    /// Connects and checks that etcd answers (and accepts our credentials), all within
    /// `connect_timeout`.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if etcd is unreachable, does not answer in time or refuses
    /// us; [`RendezvousError::Parameters`] if a TLS file cannot be read.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn connect(&self) -> Result<Client, RendezvousError> {
        let options = self.client_options()?;
        let urls = self.urls();
        let described = urls.join(",");
        let attempt = async {
            let client = Client::connect(&urls, Some(options)).await.map_err(|e| {
                super::client::map_grpc_err(&format!("connecting to {described}"), e)
            })?;
            // The connection is lazy: ask something to know that etcd answers.
            client
                .kv_client()
                .get(
                    self.probe_key.as_str(),
                    Some(etcd_client::GetOptions::new().with_count_only()),
                )
                .await
                .map_err(|e| super::client::map_grpc_err(&format!("talking to {described}"), e))?;
            Ok::<_, RendezvousError>(client)
        };
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(RendezvousError::Connection(format!(
                "etcd at {described} did not answer within {:?}",
                self.connect_timeout
            ))),
        }
    }

    /// A client that fails over between the endpoints (see [`super::api::GrpcEtcd`]), once
    /// one of them has answered: the endpoints are probed (a count-only read of
    /// [`probe_key`](Self::probe_key)) in their order, each [`CONNECT_HEDGE`] after the
    /// previous without waiting for it to answer; transient errors (no leader yet, `leader changed`,
    /// overloaded, unreachable) are retried, and the first endpoint to answer becomes the
    /// current one, all within `connect_timeout`. Endpoints that are down or black holes
    /// cost nothing more; they are connected again when failover reaches them.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if no endpoint answers in time (with each endpoint's
    /// last error) or etcd refuses us (wrong credentials, no permission on the prefix: at
    /// once); [`RendezvousError::InvalidConfig`] if a TLS file cannot be read.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn connect_failover(
        &self,
        stats: std::sync::Arc<super::client::RequestStats>,
    ) -> Result<EtcdClient, RendezvousError> {
        use futures::stream::{FuturesUnordered, StreamExt};

        let urls = self.urls();
        let described = urls.join(",");
        let api = super::api::GrpcEtcd::lazy(urls.clone(), self.client_options()?)
            .with_request_timeout(self.request_timeout.min(self.connect_timeout));
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let key = self.probe_key.as_bytes();
        let mut probes: FuturesUnordered<_> = (0..urls.len())
            .map(|i| {
                let api = &api;
                async move {
                    // Hedged: the endpoints are tried in the order given, each one a little
                    // after the previous, so that the first listed is preferred when it
                    // answers and a silent one delays the connection by this much only.
                    tokio::time::sleep(CONNECT_HEDGE * i as u32).await;
                    (i, probe_until(api, i, key, deadline).await)
                }
            })
            .collect();
        let mut failures = Vec::new();
        while let Some((i, outcome)) = probes.next().await {
            match outcome {
                Ok(()) => {
                    api.prefer(i);
                    drop(probes);
                    return Ok(EtcdClient::from_api(std::sync::Arc::new(api), stats));
                }
                Err(e) if e.is_transient() => failures.push(format!("{}: {e}", urls[i])),
                Err(e) => {
                    return Err(super::client::map_api_err(
                        &format!("connecting to {}", urls[i]),
                        e,
                    ))
                }
            }
        }
        Err(RendezvousError::Connection(format!(
            "no etcd endpoint of {described} answered within {:?}: {}",
            self.connect_timeout,
            failures.join("; ")
        )))
    }

    fn client_options(&self) -> Result<ConnectOptions, RendezvousError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if self.uses_tls() {
            options = options.with_tls(self.tls()?);
        }
        if let (Some(user), Some(password)) = (&self.username, &self.password) {
            options = options.with_user(user.clone(), password.clone());
        }
        Ok(options)
    }
}

impl RendezvousSettings {
    /// Reads the protocol settings from parameters.
    ///
    /// # Errors
    /// [`RendezvousError::Parameters`] for a malformed value, a zero timeout or TTL, or a prefix
    /// that is not an absolute key path.
    pub fn from_parameters(params: &RendezvousParameters) -> Result<Self, RendezvousError> {
        let bad = |key: &str, reason: &str| RendezvousError::InvalidConfig {
            key: key.to_string(),
            reason: reason.to_string(),
        };
        let prefix = params.get_str("etcd_prefix", "/rdzv");
        let prefix = prefix.trim_end_matches('/').to_string();
        if !params.get_str("etcd_prefix", "/rdzv").starts_with('/') {
            return Err(bad("etcd_prefix", "must start with '/'"));
        }
        let settings = Self {
            prefix,
            timeout: duration(params, "timeout", Duration::from_secs(600))?,
            last_call_timeout: duration(params, "last_call_timeout", Duration::from_secs(30))?,
            keep_alive_ttl: duration(params, "keep_alive_ttl", Duration::from_secs(10))?,
            retention: duration(params, "retention", Duration::from_secs(3600))?,
            store_timeout: duration(params, "store_timeout", Duration::from_secs(300))?,
            node_rank: match params.get_int("node_rank")? {
                Some(r) if r < 0 => return Err(bad("node_rank", "must not be negative")),
                r => r.map(|r| r as u64),
            },
            max_txn_ops: match params.get_int("max_txn_ops")?.unwrap_or(128) {
                n if n < MIN_TXN_OPS as i64 => {
                    return Err(bad("max_txn_ops", "must be at least 8"))
                }
                n => n as usize,
            },
            min_nodes: params.min_nodes,
            max_nodes: params.max_nodes,
        };
        if settings.timeout.is_zero() {
            return Err(bad("timeout", "must be greater than zero"));
        }
        if settings.keep_alive_ttl < Duration::from_secs(2) {
            return Err(bad("keep_alive_ttl", "must be at least 2 seconds"));
        }
        if settings.retention < settings.keep_alive_ttl {
            return Err(bad("retention", "must be at least keep_alive_ttl"));
        }
        Ok(settings)
    }

    /// The node lease TTL in whole seconds (rounded up).
    pub fn keep_alive_ttl_secs(&self) -> i64 {
        secs_ceil(self.keep_alive_ttl)
    }

    /// The run lease TTL in whole seconds (rounded up).
    pub fn retention_secs(&self) -> i64 {
        secs_ceil(self.retention)
    }
}

/// Probes endpoint `index` until it answers, etcd refuses us, or `deadline`; transient errors
/// are retried with a growing pause. Returns the last transient error at the deadline.
async fn probe_until(
    api: &super::api::GrpcEtcd,
    index: usize,
    key: &[u8],
    deadline: tokio::time::Instant,
) -> Result<(), super::api::ApiError> {
    let mut pause = Duration::from_millis(50);
    let mut last = super::api::ApiError::Unavailable("no answer".into());
    loop {
        match tokio::time::timeout_at(deadline, api.probe(index, key)).await {
            Err(_) => return Err(last),
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) if e.is_transient() => {
                tracing::debug!(endpoint = api.endpoint_url(index), error = %e, "etcd endpoint not ready; retrying");
                last = e;
            }
            Ok(Err(e)) => return Err(e),
        }
        if tokio::time::timeout_at(deadline, tokio::time::sleep(pause))
            .await
            .is_err()
        {
            return Err(last);
        }
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

fn secs_ceil(d: Duration) -> i64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i64::try_from(s).unwrap_or(i64::MAX).max(1)
}
