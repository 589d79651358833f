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
//! | `keep_alive_ttl` | `10s` | TTL of a node's lease; renewed every third of it; how long a leaving node retries an unreachable etcd |
//! | `retention` | `1h` | how long a run's keys outlive its last node |
//! | `store_timeout` | `300s` | default bound on blocking store operations |
//! | `node_rank` | – | a hint for this node's place in the first round's rank order |
//! | `local_world_size` | – | this node's workers (set by `rdzv run`): members get global ranks |
//! | `max_txn_ops` | `128` | etcd's `--max-txn-ops`: larger rank tables are written in chunks |
//! | `peer_probe` | `true` | members hold a TCP connection to a peer and revoke its lease when its process dies (crashes noticed in milliseconds; see [`super::probe`]) |
//!
//! Without `password` or `password_file`, a `username` takes its password from the environment
//! variable `RDZV_ETCD_PASSWORD`. Workers started by `rdzv run` never get the password.
//!
//! Any other key is an error, except the keys of PyTorch's other backends, which are accepted
//! with a warning; `join_timeout` is used as `timeout` when `timeout` is not given (see
//! [`super::conf_keys`]).
//!
//! Durations are seconds (`30`, `1.5`) or humantime (`30s`, `2m`). Every duration is bounded,
//! so that no value can overflow a deadline, a lease TTL or a count of milliseconds; a value
//! outside its range is an error naming the key and the range:
//!
//! | key | accepted |
//! |---|---|
//! | `timeout` (and `join_timeout`), `connect_timeout`, `request_timeout` | 1ms to 7d ([`MAX_TIMEOUT`]) |
//! | `last_call_timeout`, `store_timeout` | 0s to 7d |
//! | `keep_alive_ttl` | 2s to 7d |
//! | `retention` | 2s to 365d ([`MAX_RETENTION`]), and at least `keep_alive_ttl` |

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use super::client::EtcdClient;

use crate::endpoint::{parse_endpoints, Endpoint, Scheme};
use crate::{ParameterError, RendezvousError, RendezvousParameters, MAX_RETENTION, MAX_TIMEOUT};

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
    /// How many workers this node runs (`local_world_size`, set by launchers): with every
    /// member's, each gets its global ranks.
    pub local_world_size: Option<u64>,
    /// Operations per transaction at most (etcd's `--max-txn-ops`).
    pub max_txn_ops: usize,
    /// Whether members watch a peer's process for a crash (`peer_probe`).
    pub peer_probe: bool,
    /// Minimum nodes per round.
    pub min_nodes: usize,
    /// Maximum nodes per round.
    pub max_nodes: usize,
}

/// The shortest timeout of the settings that must be positive.
const MIN_POSITIVE: Duration = Duration::from_millis(1);

/// The shortest `keep_alive_ttl` (the lease is renewed every third of it).
const MIN_TTL: Duration = Duration::from_secs(2);

/// The duration at `key` (or `default`), within `range`.
fn duration(
    params: &RendezvousParameters,
    key: &str,
    default: Duration,
    range: RangeInclusive<Duration>,
) -> Result<Duration, ParameterError> {
    Ok(params.get_duration_in(key, range)?.unwrap_or(default))
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
    /// [`RendezvousError::InvalidConfig`] for an unknown configuration key (see
    /// [`super::conf_keys`]), a bad endpoint, protocol, or TLS/auth options given only in part
    /// (`cert` without `key`, `username` without `password`); [`RendezvousError::Parameters`]
    /// for a malformed or out-of-range duration.
    pub fn from_parameters(params: &RendezvousParameters) -> Result<Self, RendezvousError> {
        super::conf_keys::check_keys(params)?;
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
            connect_timeout: duration(
                params,
                "connect_timeout",
                Duration::from_secs(5),
                MIN_POSITIVE..=MAX_TIMEOUT,
            )?,
            request_timeout: duration(
                params,
                "request_timeout",
                super::client::DEFAULT_REQUEST_TIMEOUT,
                MIN_POSITIVE..=MAX_TIMEOUT,
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
            .with_request_timeout(self.request_timeout);
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
    /// [`RendezvousError::InvalidConfig`] for an unknown configuration key (see
    /// [`super::conf_keys`]), a prefix that is not an absolute key path or a value out of
    /// range; [`RendezvousError::Parameters`] for a malformed value or a duration out of range
    /// (see the module docs).
    pub fn from_parameters(params: &RendezvousParameters) -> Result<Self, RendezvousError> {
        super::conf_keys::check_keys(params)?;
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
            timeout: {
                // PyTorch's c10d/etcd-v2 name, used when `timeout` is not given (see
                // `conf_keys`); its value is checked either way.
                let join = params.get_duration_in("join_timeout", MIN_POSITIVE..=MAX_TIMEOUT)?;
                let timeout = params.get_duration_in("timeout", MIN_POSITIVE..=MAX_TIMEOUT)?;
                timeout.or(join).unwrap_or(Duration::from_secs(600))
            },
            last_call_timeout: duration(
                params,
                "last_call_timeout",
                Duration::from_secs(30),
                Duration::ZERO..=MAX_TIMEOUT,
            )?,
            keep_alive_ttl: duration(
                params,
                "keep_alive_ttl",
                Duration::from_secs(10),
                MIN_TTL..=MAX_TIMEOUT,
            )?,
            retention: duration(
                params,
                "retention",
                Duration::from_secs(3600),
                MIN_TTL..=MAX_RETENTION,
            )?,
            store_timeout: duration(
                params,
                "store_timeout",
                Duration::from_secs(300),
                Duration::ZERO..=MAX_TIMEOUT,
            )?,
            node_rank: match params.get_int("node_rank")? {
                Some(r) if r < 0 => return Err(bad("node_rank", "must not be negative")),
                r => r.map(|r| r as u64),
            },
            local_world_size: match params.get_int("local_world_size")? {
                Some(n) if !(1..=1_000_000).contains(&n) => {
                    return Err(bad("local_world_size", "must be between 1 and 1000000"))
                }
                n => n.map(|n| n as u64),
            },
            max_txn_ops: match params.get_int("max_txn_ops")?.unwrap_or(128) {
                n if n < MIN_TXN_OPS as i64 => {
                    return Err(bad("max_txn_ops", "must be at least 8"))
                }
                n => n as usize,
            },
            peer_probe: params.get_bool_or("peer_probe", true)?,
            min_nodes: params.min_nodes,
            max_nodes: params.max_nodes,
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn params(conf: &str) -> RendezvousParameters {
        RendezvousParameters::new("etcd", "127.0.0.1:2379", "job", 1, 2)
            .and_then(|p| p.with_config_str(conf))
            .unwrap_or_else(|e| panic!("{conf}: {e}"))
    }

    fn settings(conf: &str) -> Result<RendezvousSettings, RendezvousError> {
        RendezvousSettings::from_parameters(&params(conf))
    }

    fn connection(conf: &str) -> Result<ConnectionOptions, RendezvousError> {
        ConnectionOptions::from_parameters(&params(conf))
    }

    /// Bad input (issue 10): `timeout=18446744073709551615` overflowed an `Instant` (a panic),
    /// `last_call_timeout=18446744073709551615` wrapped to about zero in milliseconds. Every
    /// duration is bounded when the settings are read, and the error names the key and the
    /// accepted range.
    #[test]
    fn huge_or_zero_durations_are_rejected_naming_the_key_and_the_range() {
        let huge = "18446744073709551615";
        for (key, range) in [
            ("timeout", "1ms to 7d"),
            ("last_call_timeout", "0s to 7d"),
            ("keep_alive_ttl", "2s to 7d"),
            ("retention", "2s to 365d"),
            ("store_timeout", "0s to 7d"),
            ("connect_timeout", "1ms to 7d"),
            ("request_timeout", "1ms to 7d"),
        ] {
            let above = if key == "retention" { "366d" } else { "8d" };
            for value in [huge, above, "99999999h"] {
                let conf = format!("{key}={value}");
                let err = match settings(&conf).and_then(|_| connection(&conf).map(|_| ())) {
                    Err(e) => e.to_string(),
                    Ok(()) => panic!("{conf} accepted"),
                };
                assert!(
                    err.contains(&format!("'{key}'")) && err.contains(range),
                    "{conf}: {err}"
                );
            }
        }
        for key in ["timeout", "connect_timeout", "request_timeout"] {
            let conf = format!("{key}=0");
            let err = match settings(&conf).and_then(|_| connection(&conf).map(|_| ())) {
                Err(e) => e.to_string(),
                Ok(()) => panic!("{conf} accepted"),
            };
            assert!(
                err.contains(key) && err.contains("1ms to 7d"),
                "{conf}: {err}"
            );
        }
        let err = settings("retention=366d").unwrap_err().to_string();
        assert!(err.contains("'retention'") && err.contains("365d"), "{err}");
        let err = settings("keep_alive_ttl=1s").unwrap_err().to_string();
        assert!(err.contains("'keep_alive_ttl'"), "{err}");
    }

    /// `join_timeout` (PyTorch's c10d name) is `timeout` when `timeout` is not given; its value
    /// is checked either way.
    #[test]
    fn join_timeout_is_an_alias_of_timeout_when_timeout_is_not_given() {
        let s = |conf: &str| settings(conf).map(|s| s.timeout);
        assert_eq!(s("join_timeout=60").unwrap(), Duration::from_secs(60));
        assert_eq!(
            s("join_timeout=60,timeout=30").unwrap(),
            Duration::from_secs(30)
        );
        assert_eq!(s("").unwrap(), Duration::from_secs(600));
        for conf in [
            "join_timeout=x",
            "join_timeout=8d,timeout=1",
            "join_timeout=0",
        ] {
            let err = settings(conf).unwrap_err().to_string();
            assert!(err.contains("'join_timeout'"), "{conf}: {err}");
        }
    }

    /// Unknown keys are rejected by both readers of the configuration.
    #[test]
    fn unknown_keys_are_rejected_by_settings_and_connection_options() {
        for err in [
            settings("timeuot=60").unwrap_err(),
            connection("timeuot=60").unwrap_err(),
        ] {
            assert!(
                matches!(&err, RendezvousError::InvalidConfig { key, .. } if key == "timeuot"),
                "{err}"
            );
        }
    }

    /// The largest accepted values keep the internal arithmetic in range: deadlines, lease
    /// TTLs in seconds and the last call in milliseconds.
    #[test]
    fn largest_accepted_durations_keep_the_arithmetic_in_range() {
        let s = settings(
            "timeout=7d,last_call_timeout=7d,keep_alive_ttl=7d,retention=365d,store_timeout=7d",
        )
        .unwrap();
        let now = tokio::time::Instant::now();
        for d in [s.timeout, s.last_call_timeout, s.store_timeout, s.retention] {
            assert!(now.checked_add(d).is_some());
        }
        assert_eq!(s.keep_alive_ttl_secs(), 7 * 86_400);
        assert_eq!(s.retention_secs(), 365 * 86_400);
        assert_eq!(
            u64::try_from(s.last_call_timeout.as_millis()),
            Ok(7 * 86_400_000)
        );
        let c = connection("connect_timeout=7d,request_timeout=7d").unwrap();
        assert_eq!(c.connect_timeout, Duration::from_secs(7 * 86_400));
    }
}
