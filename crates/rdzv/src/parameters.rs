//! [`RendezvousParameters`]: what a node asks the rendezvous for, with typed getters for the
//! free-form `key=value` configuration.
//!
//! The behaviour follows PyTorch's `torch.distributed.elastic.rendezvous.RendezvousParameters`
//! and `_parse_rendezvous_config`, with these deliberate differences:
//!
//! - the run id is validated (see [`validate_run_id`]), because it becomes a segment of etcd
//!   keys;
//! - a whitespace-only backend name counts as empty;
//! - [`RendezvousParameters::get_bool`] ignores surrounding whitespace (PyTorch rejects `" true"`);
//! - a configuration string that gives a key twice is an error ([`parse_config`]; PyTorch keeps
//!   the last value);
//! - durations can be read with [`RendezvousParameters::get_duration`], and bounded with
//!   [`RendezvousParameters::get_duration_in`] (the etcd backend bounds every duration it
//!   reads, see [`crate::etcd::options`]).

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::time::Duration;

/// The longest accepted run id, in bytes (UTF-8).
pub const MAX_RUN_ID_LEN: usize = 256;

/// The longest timeout, TTL or wait a setting or flag accepts: 7 days. Deadlines computed from
/// it (`now + timeout`), lease TTLs in seconds and milliseconds in records stay far from any
/// overflow.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// The longest retention of a run's keys: 365 days.
pub const MAX_RETENTION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why parameters or a configuration value are invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParameterError {
    /// The backend name is empty (or only whitespace).
    #[error("the rendezvous backend name must be a non-empty string")]
    EmptyBackend,

    /// The run id is empty (or only whitespace).
    #[error("the rendezvous run id must be a non-empty string")]
    EmptyRunId,

    /// The run id cannot be used as an etcd key segment.
    #[error("the rendezvous run id {run_id:?} is invalid: {reason}")]
    InvalidRunId {
        /// The run id that was given.
        run_id: String,
        /// What is wrong with it.
        reason: String,
    },

    /// `min_nodes` is less than 1.
    #[error("the minimum number of rendezvous nodes ({min}) must be greater than zero")]
    MinNodes {
        /// The `min_nodes` that was given.
        min: usize,
    },

    /// `max_nodes` is less than `min_nodes`.
    #[error(
        "the maximum number of rendezvous nodes ({max}) must be greater than or equal to the \
         minimum number of rendezvous nodes ({min})"
    )]
    MaxNodes {
        /// The `min_nodes` that was given.
        min: usize,
        /// The `max_nodes` that was given.
        max: usize,
    },

    /// A configuration string has an item with an empty key (`=x`, `a=1,,b=2`, trailing comma).
    /// The text is shown with secrets redacted.
    #[error(
        "the rendezvous configuration string {text:?} must be in format \
         <key1>=<value1>,...,<keyN>=<valueN> (found an item with an empty key)"
    )]
    ConfigFormat {
        /// The whole configuration string.
        text: String,
    },

    /// A configuration item has no value (`a` or `a=`).
    #[error("the rendezvous configuration option '{key}' must have a value specified")]
    MissingValue {
        /// The key without value.
        key: String,
    },

    /// A configuration string gives the same key twice (`a=1,a=2`).
    #[error(
        "the rendezvous configuration option '{key}' is given more than once: give each key \
         once"
    )]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },

    /// A configuration value is not an integer.
    #[error("the rendezvous configuration option '{key}' does not represent a valid integer value: {value:?}")]
    NotAnInteger {
        /// The configuration key.
        key: String,
        /// The value that was found.
        value: String,
    },

    /// A configuration value is not a boolean.
    #[error(
        "the rendezvous configuration option '{key}' does not represent a valid boolean value: \
         {value:?} (expected one of 1, true, t, yes, y, 0, false, f, no, n)"
    )]
    NotABool {
        /// The configuration key.
        key: String,
        /// The value that was found.
        value: String,
    },

    /// A configuration value is not a duration.
    #[error(
        "the rendezvous configuration option '{key}' does not represent a valid duration: \
         {value:?} ({reason})"
    )]
    NotADuration {
        /// The configuration key.
        key: String,
        /// The value that was found.
        value: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A configuration value is a duration, but outside the range the key accepts.
    #[error(
        "the rendezvous configuration option '{key}' is out of range: {value:?} (accepted: {} \
         to {})",
        format_duration_bound(*.min),
        format_duration_bound(*.max)
    )]
    DurationOutOfRange {
        /// The configuration key.
        key: String,
        /// The value that was found.
        value: String,
        /// The shortest accepted duration.
        min: Duration,
        /// The longest accepted duration.
        max: Duration,
    },
}

/// The parameters of a rendezvous, as in PyTorch (`backend`, `endpoint`, `run_id`, `min_nodes`,
/// `max_nodes`, `local_addr`, free-form configuration). Its `Debug` output redacts secret
/// configuration values (see [`crate::secrets`]).
#[derive(Clone, PartialEq, Eq)]
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

impl std::fmt::Debug for RendezvousParameters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let config: BTreeMap<&str, &str> = self
            .config
            .iter()
            .map(|(k, v)| {
                let shown = if crate::secrets::is_secret_key(k) {
                    crate::secrets::REDACTED
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("RendezvousParameters")
            .field("backend", &self.backend)
            .field("endpoint", &self.endpoint)
            .field("run_id", &self.run_id)
            .field("min_nodes", &self.min_nodes)
            .field("max_nodes", &self.max_nodes)
            .field("local_addr", &self.local_addr)
            .field("config", &config)
            .finish()
    }
}

impl RendezvousParameters {
    /// Validated parameters without configuration.
    ///
    /// The checks run in PyTorch's order — backend, then `min_nodes`, then `max_nodes` — followed
    /// by the run id (which PyTorch does not check; see [`validate_run_id`]). The endpoint is not
    /// checked here: its syntax depends on the backend (see [`crate::endpoint`]).
    ///
    /// # Errors
    /// - [`ParameterError::EmptyBackend`] for an empty or whitespace-only backend;
    /// - [`ParameterError::MinNodes`] for `min_nodes < 1`;
    /// - [`ParameterError::MaxNodes`] for `max_nodes < min_nodes`;
    /// - [`ParameterError::EmptyRunId`] / [`ParameterError::InvalidRunId`] for a run id that
    ///   [`validate_run_id`] rejects.
    pub fn new(
        backend: impl Into<String>,
        endpoint: impl Into<String>,
        run_id: impl Into<String>,
        min_nodes: usize,
        max_nodes: usize,
    ) -> Result<Self, ParameterError> {
        let params = Self {
            backend: backend.into(),
            endpoint: endpoint.into(),
            run_id: run_id.into(),
            min_nodes,
            max_nodes,
            local_addr: None,
            config: BTreeMap::new(),
        };
        params.validate()?;
        Ok(params)
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

    /// Adds every entry of a torchrun-style configuration string `a=1,b=x`; its entries
    /// overwrite existing ones with the same key (a key given twice *within* the string is an
    /// error).
    ///
    /// # Errors
    /// [`ParameterError::ConfigFormat`], [`ParameterError::MissingValue`] or
    /// [`ParameterError::DuplicateKey`] if the string is malformed (see [`parse_config`]);
    /// `self` is then dropped unchanged.
    pub fn with_config_str(mut self, text: &str) -> Result<Self, ParameterError> {
        self.config.extend(parse_config(text)?);
        Ok(self)
    }

    /// Checks the parameters again (after fields were changed directly), in the same order as
    /// [`RendezvousParameters::new`].
    ///
    /// # Errors
    /// As [`RendezvousParameters::new`].
    pub fn validate(&self) -> Result<(), ParameterError> {
        if self.backend.trim().is_empty() {
            return Err(ParameterError::EmptyBackend);
        }
        if self.min_nodes < 1 {
            return Err(ParameterError::MinNodes {
                min: self.min_nodes,
            });
        }
        if self.max_nodes < self.min_nodes {
            return Err(ParameterError::MaxNodes {
                min: self.min_nodes,
                max: self.max_nodes,
            });
        }
        validate_run_id(&self.run_id)
    }

    /// The raw configuration value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.config.get(key).map(String::as_str)
    }

    /// The value of `key`, or `default`.
    pub fn get_str(&self, key: &str, default: &str) -> String {
        self.get(key).unwrap_or(default).to_string()
    }

    /// The value of `key` as an `i64`: surrounding whitespace and a leading `+`/`-` are
    /// accepted (like Python's `int()`), anything else (`0a`, `1.5`, empty) is not.
    /// A missing key gives `Ok(None)`.
    ///
    /// # Errors
    /// [`ParameterError::NotAnInteger`] naming the key and value if the value is not an integer
    /// in the range of `i64`.
    pub fn get_int(&self, key: &str) -> Result<Option<i64>, ParameterError> {
        self.get(key)
            .map(|value| {
                value
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| ParameterError::NotAnInteger {
                        key: key.to_string(),
                        value: value.to_string(),
                    })
            })
            .transpose()
    }

    /// [`RendezvousParameters::get_int`], with `default` for a missing key.
    ///
    /// # Errors
    /// As [`RendezvousParameters::get_int`]; a present but invalid value is an error, not the
    /// default.
    pub fn get_int_or(&self, key: &str, default: i64) -> Result<i64, ParameterError> {
        Ok(self.get_int(key)?.unwrap_or(default))
    }

    /// The value of `key` as a boolean: `1`, `true`, `t`, `yes`, `y` are true and `0`, `false`,
    /// `f`, `no`, `n` are false, in any case (as PyTorch's `get_as_bool`). Unlike PyTorch,
    /// surrounding whitespace is ignored (`" true "` is true). A missing key gives `Ok(None)`.
    ///
    /// # Errors
    /// [`ParameterError::NotABool`] naming the key and value for any other value (`01`, `2`,
    /// `truefalse`, empty, ...).
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, ParameterError> {
        self.get(key)
            .map(|value| match value.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "t" | "yes" | "y" => Ok(true),
                "0" | "false" | "f" | "no" | "n" => Ok(false),
                _ => Err(ParameterError::NotABool {
                    key: key.to_string(),
                    value: value.to_string(),
                }),
            })
            .transpose()
    }

    /// [`RendezvousParameters::get_bool`], with `default` for a missing key.
    ///
    /// # Errors
    /// As [`RendezvousParameters::get_bool`]; a present but invalid value is an error, not the
    /// default.
    pub fn get_bool_or(&self, key: &str, default: bool) -> Result<bool, ParameterError> {
        Ok(self.get_bool(key)?.unwrap_or(default))
    }

    /// The value of `key` as a duration. Accepted, after trimming surrounding whitespace:
    ///
    /// - plain non-negative seconds, integer or decimal, as PyTorch's integer timeouts: `30`,
    ///   `1.5`, `.25`, `+2` (fractions finer than a nanosecond are truncated);
    /// - a [`humantime`] duration: `30s`, `2m`, `1h 30m`, `250ms`, `1.5s`.
    ///
    /// A missing key gives `Ok(None)`.
    ///
    /// # Errors
    /// [`ParameterError::NotADuration`] naming the key and value, with a reason, for a negative
    /// (`-1`, `-5s`), non-finite (`inf`, `NaN`), too large or otherwise malformed value
    /// (`abc`, `1e3`, `5 parsecs`, empty).
    pub fn get_duration(&self, key: &str) -> Result<Option<Duration>, ParameterError> {
        self.get(key)
            .map(|value| {
                parse_duration(value).map_err(|reason| ParameterError::NotADuration {
                    key: key.to_string(),
                    value: value.to_string(),
                    reason,
                })
            })
            .transpose()
    }

    /// [`RendezvousParameters::get_duration`], checked against `range` (inclusive). A missing
    /// key gives `Ok(None)`.
    ///
    /// # Errors
    /// As [`RendezvousParameters::get_duration`], and [`ParameterError::DurationOutOfRange`]
    /// naming the key, the value and the range for a duration outside `range`.
    pub fn get_duration_in(
        &self,
        key: &str,
        range: RangeInclusive<Duration>,
    ) -> Result<Option<Duration>, ParameterError> {
        match self.get_duration(key)? {
            Some(d) if !range.contains(&d) => Err(ParameterError::DurationOutOfRange {
                key: key.to_string(),
                value: self.get(key).unwrap_or_default().to_string(),
                min: *range.start(),
                max: *range.end(),
            }),
            other => Ok(other),
        }
    }

    /// [`RendezvousParameters::get_duration`], with `default` for a missing key.
    ///
    /// # Errors
    /// As [`RendezvousParameters::get_duration`]; a present but invalid value is an error, not
    /// the default.
    pub fn get_duration_or(
        &self,
        key: &str,
        default: Duration,
    ) -> Result<Duration, ParameterError> {
        Ok(self.get_duration(key)?.unwrap_or(default))
    }
}

/// Checks that `run_id` can be used verbatim as one segment of an etcd key.
///
/// Run ids are rejected, never escaped, so that every node of a job derives exactly the same
/// keys from the same text and the keys stay readable. The rules:
///
/// - not empty and not whitespace-only;
/// - no `/` (it would add key levels and could reach other jobs' keys);
/// - no control characters (`\n`, `\t`, `\0`, DEL, ...) and no whitespace other than the
///   plain space (e.g. no no-break or line-separator characters);
/// - not exactly `.` or `..` (path-like segments that tools may normalise away);
/// - at most [`MAX_RUN_ID_LEN`] (256) bytes.
///
/// Everything else printable is allowed, including letters and digits of any script, `-`,
/// `_`, `.`, `:`, `@`, `+`, `=` and interior spaces. Leading or trailing spaces are not
/// trimmed: `"job"` and `"job "` are different run ids.
///
/// # Errors
/// [`ParameterError::EmptyRunId`] for an empty or whitespace-only run id,
/// [`ParameterError::InvalidRunId`] (with the reason) for any other violation.
pub fn validate_run_id(run_id: &str) -> Result<(), ParameterError> {
    let invalid = |reason: String| ParameterError::InvalidRunId {
        run_id: run_id.to_string(),
        reason,
    };
    if run_id.trim().is_empty() {
        return Err(ParameterError::EmptyRunId);
    }
    if run_id.len() > MAX_RUN_ID_LEN {
        return Err(invalid(format!(
            "it is {} bytes long, the maximum is {MAX_RUN_ID_LEN}",
            run_id.len()
        )));
    }
    if run_id == "." || run_id == ".." {
        return Err(invalid(
            "'.' and '..' are not allowed as etcd key segments".to_string(),
        ));
    }
    if let Some(c) = run_id
        .chars()
        .find(|&c| c == '/' || c.is_control() || (c.is_whitespace() && c != ' '))
    {
        let reason = if c == '/' {
            "it must not contain '/'".to_string()
        } else {
            format!("it must not contain control or non-space whitespace characters (found {c:?})")
        };
        return Err(invalid(reason));
    }
    Ok(())
}

/// Parses a torchrun-style configuration string `a=1,b=x` (as `--rdzv-conf`), like PyTorch's
/// `_parse_rendezvous_config`:
///
/// - the whole string is trimmed; an empty string gives an empty map;
/// - items are separated by `,` (no escaping) and split at their *first* `=`, so values may
///   contain `=` and `/` (`c=dummy3=dummy4` gives `c` → `dummy3=dummy4`);
/// - keys and values are trimmed;
/// - unlike PyTorch, where a later duplicate overwrites an earlier one, a key given twice is
///   an error: `timeout=60,timeout=30` is more likely a mistake than an intent.
///
/// # Errors
/// - [`ParameterError::ConfigFormat`] for an item with an empty key (`=x`, `a=1,,b=2`, a
///   trailing comma, `" ,  "`);
/// - [`ParameterError::MissingValue`] for an item without `=` or with an empty value (`a`,
///   `a=`, `a=  `);
/// - [`ParameterError::DuplicateKey`] for a key given twice (`a=1,a=2`, also with the same
///   value).
pub fn parse_config(text: &str) -> Result<BTreeMap<String, String>, ParameterError> {
    let mut config = BTreeMap::new();
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Ok(config);
    }
    for item in trimmed.split(',') {
        let (key, value) = match item.split_once('=') {
            Some((key, value)) => (key.trim(), value.trim()),
            None => (item.trim(), ""),
        };
        if key.is_empty() {
            return Err(ParameterError::ConfigFormat {
                text: crate::secrets::redact_config_text(text),
            });
        }
        if value.is_empty() {
            return Err(ParameterError::MissingValue {
                key: key.to_string(),
            });
        }
        if config.insert(key.to_string(), value.to_string()).is_some() {
            return Err(ParameterError::DuplicateKey {
                key: key.to_string(),
            });
        }
    }
    Ok(config)
}

/// Parses a duration: plain non-negative seconds (`30`, `1.5`) or humantime (`30s`, `2m`,
/// `1h 30m`, `250ms`), as [`RendezvousParameters::get_duration`] does.
///
/// # Errors
/// A human-readable reason if the text is not such a duration.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let text = value.trim();
    if text.is_empty() {
        return Err("the value is empty".to_string());
    }
    if text.starts_with('-') {
        return Err("negative durations are not allowed".to_string());
    }
    let unsigned = text.strip_prefix('+').unwrap_or(text);
    let lower = unsigned.to_ascii_lowercase();
    if matches!(lower.as_str(), "nan" | "inf" | "infinity") {
        return Err("the value is not a finite number".to_string());
    }
    if unsigned.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return parse_plain_seconds(unsigned);
    }
    humantime::parse_duration(unsigned).map_err(|e| {
        format!("expected seconds (e.g. 30 or 1.5) or a duration such as 30s, 2m or 1h 30m: {e}")
    })
}

/// [`parse_duration`], checked against `range` (inclusive): for command-line flags.
///
/// # Errors
/// As [`parse_duration`], and a reason naming the accepted range for a duration outside it.
pub fn parse_duration_in(value: &str, range: RangeInclusive<Duration>) -> Result<Duration, String> {
    let d = parse_duration(value)?;
    if range.contains(&d) {
        Ok(d)
    } else {
        Err(format!(
            "out of range (accepted: {} to {})",
            format_duration_bound(*range.start()),
            format_duration_bound(*range.end())
        ))
    }
}

/// A bound of a duration range, in the largest unit that expresses it exactly and in a form
/// that [`parse_duration`] reads back: `0s`, `1ms`, `2s`, `1h`, `7d`, `365d`.
pub fn format_duration_bound(d: Duration) -> String {
    const UNITS: [(u128, &str); 6] = [
        (86_400_000_000_000, "d"),
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
    ];
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    for (size, unit) in UNITS {
        if nanos % size == 0 {
            return format!("{}{unit}", nanos / size);
        }
    }
    format!("{nanos}ns")
}

/// Parses `digits[.digits]` (either side may be empty, not both) as seconds, exactly.
fn parse_plain_seconds(text: &str) -> Result<Duration, String> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err("expected a number of seconds".to_string());
    }
    if fraction.contains('.') {
        return Err("the number has more than one decimal point".to_string());
    }
    let secs = if whole.is_empty() {
        0
    } else {
        whole
            .parse::<u64>()
            .map_err(|_| "the number of seconds is too large".to_string())?
    };
    let mut nanos: u32 = 0;
    let mut scale: u32 = 100_000_000;
    for c in fraction.chars().take(9) {
        let digit = c
            .to_digit(10)
            .ok_or_else(|| format!("unexpected character {c:?}"))?;
        nanos += digit * scale;
        scale /= 10;
    }
    Ok(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> RendezvousParameters {
        match RendezvousParameters::new("etcd", "localhost:2379", "job-1", 1, 4) {
            Ok(p) => p,
            Err(e) => panic!("valid parameters rejected: {e}"),
        }
    }

    fn with(key: &str, value: &str) -> RendezvousParameters {
        params().with_config(key, value)
    }

    // ---- new / validate ----------------------------------------------------------------

    #[test]
    fn new_initializes_fields() {
        let p = RendezvousParameters::new("etcd", "h:2379", "run", 2, 3)
            .unwrap()
            .with_local_addr("10.0.0.1")
            .with_config("dummy_param", "x");
        assert_eq!(p.backend, "etcd");
        assert_eq!(p.endpoint, "h:2379");
        assert_eq!(p.run_id, "run");
        assert_eq!(p.min_nodes, 2);
        assert_eq!(p.max_nodes, 3);
        assert_eq!(p.local_addr.as_deref(), Some("10.0.0.1"));
        assert_eq!(p.get("dummy_param"), Some("x"));
        assert!(p.validate().is_ok());
    }

    /// Regression (issue 10): a malformed `--rdzv-conf` error echoed the whole string,
    /// password included.
    #[test]
    fn errors_and_debug_output_redact_the_password() {
        let err = parse_config("timeout=5,password=hunter2,,x=1").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(err.to_string().contains("timeout=5"), "{err}");
        let p = params().with_config("password", "hunter2");
        let debug = format!("{p:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }

    #[test]
    fn new_accepts_min_one_and_min_equal_max() {
        assert!(RendezvousParameters::new("etcd", "", "r", 1, 1).is_ok());
        assert!(RendezvousParameters::new("etcd", "", "r", 3, 3).is_ok());
        assert!(RendezvousParameters::new("etcd", "", "r", 1, 1000).is_ok());
    }

    #[test]
    fn new_does_not_validate_endpoint() {
        assert!(RendezvousParameters::new("etcd", "~~~", "r", 1, 1).is_ok());
    }

    #[test]
    fn new_rejects_empty_backend() {
        for backend in ["", " ", "\t\n"] {
            let err = RendezvousParameters::new(backend, "h", "r", 1, 2).unwrap_err();
            assert!(
                matches!(err, ParameterError::EmptyBackend),
                "{backend:?}: {err:?}"
            );
        }
    }

    #[test]
    fn new_rejects_min_nodes_below_one() {
        let err = RendezvousParameters::new("etcd", "h", "r", 0, 2).unwrap_err();
        assert!(
            matches!(err, ParameterError::MinNodes { min: 0 }),
            "{err:?}"
        );
        assert!(err.to_string().contains("(0)"), "{err}");
    }

    #[test]
    fn new_rejects_max_below_min() {
        for max in [2, 1, 0] {
            let err = RendezvousParameters::new("etcd", "h", "r", 3, max).unwrap_err();
            assert!(
                matches!(err, ParameterError::MaxNodes { min: 3, max: m } if m == max),
                "{max}: {err:?}"
            );
        }
    }

    #[test]
    fn validation_order_matches_pytorch_then_run_id() {
        // Everything wrong: the backend is reported first.
        let err = RendezvousParameters::new("", "h", "", 0, 0).unwrap_err();
        assert!(matches!(err, ParameterError::EmptyBackend), "{err:?}");
        // Then min_nodes (max < min is also true here, and run id is empty).
        let err = RendezvousParameters::new("etcd", "h", "", 0, 0).unwrap_err();
        assert!(matches!(err, ParameterError::MinNodes { .. }), "{err:?}");
        // Then max_nodes.
        let err = RendezvousParameters::new("etcd", "h", "a/b", 2, 1).unwrap_err();
        assert!(
            matches!(err, ParameterError::MaxNodes { min: 2, max: 1 }),
            "{err:?}"
        );
        // Then the run id.
        let err = RendezvousParameters::new("etcd", "h", "a/b", 1, 1).unwrap_err();
        assert!(
            matches!(err, ParameterError::InvalidRunId { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn validate_rechecks_after_direct_changes() {
        let mut p = params();
        p.max_nodes = 0;
        assert!(matches!(
            p.validate(),
            Err(ParameterError::MaxNodes { min: 1, max: 0 })
        ));
        p.max_nodes = 4;
        p.min_nodes = 0;
        assert!(matches!(
            p.validate(),
            Err(ParameterError::MinNodes { min: 0 })
        ));
        p.min_nodes = 1;
        p.run_id = "..".into();
        assert!(matches!(
            p.validate(),
            Err(ParameterError::InvalidRunId { .. })
        ));
        p.run_id = "ok".into();
        p.backend = String::new();
        assert!(matches!(p.validate(), Err(ParameterError::EmptyBackend)));
        p.backend = "etcd".into();
        assert!(p.validate().is_ok());
    }

    // ---- run id --------------------------------------------------------------------------

    #[test]
    fn run_id_accepts_safe_ids() {
        let long = "a".repeat(MAX_RUN_ID_LEN);
        let ok = [
            "job",
            "job-1",
            "my_job.v2",
            "user@host:1234",
            "a+b=c",
            "123",
            "-",
            "...",
            ".hidden",
            "with space",
            " leading",
            "trailing ",
            "ünïcödé-日本",
            "%41~!#$&*()[]{}",
            long.as_str(),
        ];
        for id in ok {
            assert!(validate_run_id(id).is_ok(), "{id:?} rejected");
            assert!(
                RendezvousParameters::new("etcd", "h", id, 1, 1).is_ok(),
                "{id:?}"
            );
        }
    }

    #[test]
    fn run_id_rejects_empty_and_whitespace_only() {
        for id in ["", " ", "   ", "\t", "\n", " \r\n "] {
            let err = validate_run_id(id).unwrap_err();
            assert!(matches!(err, ParameterError::EmptyRunId), "{id:?}: {err:?}");
        }
    }

    #[test]
    fn run_id_rejects_unsafe_ids() {
        let too_long = "a".repeat(MAX_RUN_ID_LEN + 1);
        // 86 three-byte characters = 258 bytes, though only 86 chars.
        let too_long_bytes = "日".repeat(86);
        let bad = [
            "a/b",
            "/",
            "/job",
            "job/",
            ".",
            "..",
            "a\nb",
            "a\tb",
            "a\0b",
            "job\r",
            "a\u{7f}b",
            "a\u{85}b",
            "a\u{a0}b",
            "a\u{2028}b",
            "a\u{1b}[31m",
            too_long.as_str(),
            too_long_bytes.as_str(),
        ];
        for id in bad {
            let err = validate_run_id(id).unwrap_err();
            assert!(
                matches!(&err, ParameterError::InvalidRunId { run_id, .. } if run_id == id),
                "{id:?}: {err:?}"
            );
        }
    }

    #[test]
    fn run_id_error_messages_name_the_problem() {
        let msg = validate_run_id("a/b").unwrap_err().to_string();
        assert!(msg.contains("a/b") && msg.contains('/'), "{msg}");
        let msg = validate_run_id(&"x".repeat(300)).unwrap_err().to_string();
        assert!(msg.contains("300") && msg.contains("256"), "{msg}");
    }

    // ---- parse_config --------------------------------------------------------------------

    #[test]
    fn parse_config_returns_map() {
        let config =
            parse_config(" a=1 , b = 2 , c=dummy3=dummy4, d=/path/to/x, e = 127.0.0.1:29400 ")
                .unwrap();
        let expected: BTreeMap<String, String> = [
            ("a", "1"),
            ("b", "2"),
            ("c", "dummy3=dummy4"),
            ("d", "/path/to/x"),
            ("e", "127.0.0.1:29400"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(config, expected);
    }

    #[test]
    fn parse_config_pytorch_utils_test_case() {
        let config = parse_config(" b= dummy1 ,c=dummy3=dummy4 , d=dummy5/dummy6").unwrap();
        assert_eq!(config.len(), 3);
        assert_eq!(config["b"], "dummy1");
        assert_eq!(config["c"], "dummy3=dummy4");
        assert_eq!(config["d"], "dummy5/dummy6");
    }

    #[test]
    fn parse_config_empty_gives_empty_map() {
        for text in ["", " ", "   ", "\t\n"] {
            assert!(parse_config(text).unwrap().is_empty(), "{text:?}");
        }
    }

    /// Bad input (issue 10): a later duplicate key silently overwrote an earlier one (as in
    /// PyTorch); `timeout=60,timeout=30` is now an error naming the key.
    #[test]
    fn parse_config_rejects_duplicate_keys() {
        for (text, key) in [
            ("a=1,b=2,a=3", "a"),
            ("a=1,a=1", "a"),
            (" timeout = 60 ,timeout=30", "timeout"),
            ("b=1,a=x=y,a=z", "a"),
        ] {
            let err = parse_config(text).unwrap_err();
            assert!(
                matches!(&err, ParameterError::DuplicateKey { key: k } if k == key),
                "{text:?}: {err:?}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("'{key}'")) && msg.contains("more than once"),
                "{msg}"
            );
        }
        // Keys differing in case are different keys.
        assert_eq!(parse_config("a=1,A=2").unwrap().len(), 2);
    }

    #[test]
    fn parse_config_rejects_empty_keys() {
        for text in [
            "a=1,",
            "a=1,,b=2",
            "a=1, ,b=2",
            "=x",
            " = x",
            "a=1,=2",
            " ,  ",
            ",",
            ",a=1",
        ] {
            let err = parse_config(text).unwrap_err();
            assert!(
                matches!(&err, ParameterError::ConfigFormat { text: t } if t == text),
                "{text:?}: {err:?}"
            );
        }
    }

    #[test]
    fn parse_config_rejects_missing_values() {
        for (text, key) in [
            ("a", "a"),
            ("a=", "a"),
            ("a= ", "a"),
            (" a =  ", "a"),
            ("b=1,a", "a"),
            ("b=1, a=,c=2", "a"),
            ("long key", "long key"),
        ] {
            let err = parse_config(text).unwrap_err();
            assert!(
                matches!(&err, ParameterError::MissingValue { key: k } if k == key),
                "{text:?}: {err:?}"
            );
            assert!(err.to_string().contains(&format!("'{key}'")), "{err}");
        }
    }

    #[test]
    fn with_config_str_merges_and_overwrites() {
        let p = params()
            .with_config("a", "old")
            .with_config("keep", "k")
            .with_config_str("a=new, b=2")
            .unwrap();
        assert_eq!(p.get("a"), Some("new"));
        assert_eq!(p.get("b"), Some("2"));
        assert_eq!(p.get("keep"), Some("k"));
        assert_eq!(p.config.len(), 3);
        assert_eq!(params().with_config_str("  ").unwrap(), params());
    }

    #[test]
    fn with_config_str_reports_errors() {
        assert!(matches!(
            params().with_config_str("a=1,,"),
            Err(ParameterError::ConfigFormat { .. })
        ));
        assert!(matches!(
            params().with_config_str("a=1,timeout"),
            Err(ParameterError::MissingValue { key }) if key == "timeout"
        ));
    }

    // ---- getters -------------------------------------------------------------------------

    #[test]
    fn get_and_get_str() {
        let p = with("k", "v");
        assert_eq!(p.get("k"), Some("v"));
        assert_eq!(p.get("missing"), None);
        assert_eq!(p.get_str("k", "d"), "v");
        assert_eq!(p.get_str("missing", "d"), "d");
    }

    #[test]
    fn typed_getters_return_none_or_default_for_missing_key() {
        let p = params();
        assert_eq!(p.get_int("missing"), Ok(None));
        assert_eq!(p.get_bool("missing"), Ok(None));
        assert_eq!(p.get_duration("missing"), Ok(None));
        assert_eq!(p.get_int_or("missing", 7), Ok(7));
        assert_eq!(p.get_bool_or("missing", true), Ok(true));
        assert_eq!(
            p.get_duration_or("missing", Duration::from_secs(9)),
            Ok(Duration::from_secs(9))
        );
    }

    #[test]
    fn get_int_accepts_integers() {
        for (value, expected) in [
            ("0", 0),
            ("-10", -10),
            ("5", 5),
            ("  4", 4),
            ("4  ", 4),
            (" 4 ", 4),
            ("+3", 3),
            ("-0", 0),
            ("007", 7),
            ("\t600\n", 600),
            ("9223372036854775807", i64::MAX),
            ("-9223372036854775808", i64::MIN),
        ] {
            assert_eq!(
                with("k", value).get_int("k"),
                Ok(Some(expected)),
                "{value:?}"
            );
            assert_eq!(
                with("k", value).get_int_or("k", 1),
                Ok(expected),
                "{value:?}"
            );
        }
    }

    #[test]
    fn get_int_rejects_non_integers() {
        for value in [
            "a",
            "0a",
            "3b",
            "abc",
            "",
            " ",
            "1.5",
            "1e3",
            "- 1",
            "+-1",
            "1 2",
            "0x10",
            "9223372036854775808",
        ] {
            let err = with("timeout", value).get_int("timeout").unwrap_err();
            assert!(
                matches!(&err, ParameterError::NotAnInteger { key, value: v }
                    if key == "timeout" && v == value),
                "{value:?}: {err:?}"
            );
            assert!(err.to_string().contains("'timeout'"), "{err}");
            // A present but invalid value is an error, not the default.
            assert!(matches!(
                with("timeout", value).get_int_or("timeout", 1),
                Err(ParameterError::NotAnInteger { .. })
            ));
        }
    }

    #[test]
    fn get_bool_accepts_pytorch_spellings() {
        for value in [
            "1", "True", "tRue", "T", "t", "yEs", "Y", "y", "YES", " true ",
        ] {
            assert_eq!(with("k", value).get_bool("k"), Ok(Some(true)), "{value:?}");
            assert_eq!(
                with("k", value).get_bool_or("k", false),
                Ok(true),
                "{value:?}"
            );
        }
        for value in [
            "0", "False", "faLse", "F", "f", "nO", "N", "n", "NO", "\tno\n",
        ] {
            assert_eq!(with("k", value).get_bool("k"), Ok(Some(false)), "{value:?}");
            assert_eq!(
                with("k", value).get_bool_or("k", true),
                Ok(false),
                "{value:?}"
            );
        }
    }

    #[test]
    fn get_bool_rejects_other_values() {
        for value in [
            "01",
            "Flse",
            "Ture",
            "g",
            "4",
            "_",
            "truefalse",
            "2",
            "-1",
            "",
            " ",
            "on",
            "off",
            "yes please",
        ] {
            let err = with("is_host", value).get_bool("is_host").unwrap_err();
            assert!(
                matches!(&err, ParameterError::NotABool { key, value: v }
                    if key == "is_host" && v == value),
                "{value:?}: {err:?}"
            );
            assert!(err.to_string().contains("'is_host'"), "{err}");
            assert!(matches!(
                with("is_host", value).get_bool_or("is_host", true),
                Err(ParameterError::NotABool { .. })
            ));
        }
    }

    #[test]
    fn get_duration_accepts_seconds_and_humantime() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        for (value, expected) in [
            ("30", s(30)),
            ("0", s(0)),
            (" 600 ", s(600)),
            ("+2", s(2)),
            ("1.5", ms(1500)),
            ("0.25", ms(250)),
            (".5", ms(500)),
            ("5.", s(5)),
            ("0.000000001", Duration::from_nanos(1)),
            ("1.0000000019", Duration::new(1, 1)),
            ("30s", s(30)),
            ("2m", s(120)),
            ("1h 30m", s(5400)),
            ("1h30m", s(5400)),
            ("250ms", ms(250)),
            ("1.5s", ms(1500)),
            ("2min", s(120)),
            ("1day", s(86400)),
            (" 10s ", s(10)),
            ("0s", s(0)),
        ] {
            assert_eq!(
                with("join_timeout", value).get_duration("join_timeout"),
                Ok(Some(expected)),
                "{value:?}"
            );
            assert_eq!(
                with("join_timeout", value).get_duration_or("join_timeout", s(1)),
                Ok(expected),
                "{value:?}"
            );
        }
    }

    #[test]
    fn get_duration_rejects_bad_values() {
        for value in [
            "-1",
            "-0.5",
            "-5s",
            " -1 ",
            "NaN",
            "nan",
            "inf",
            "-inf",
            "+inf",
            "Infinity",
            "abc",
            "",
            "  ",
            ".",
            "1.2.3",
            "1e3",
            "5 parsecs",
            "30 s x",
            "s",
            "99999999999999999999999",
            "0x10",
        ] {
            let err = with("join_timeout", value)
                .get_duration("join_timeout")
                .unwrap_err();
            assert!(
                matches!(&err, ParameterError::NotADuration { key, value: v, reason }
                    if key == "join_timeout" && v == value && !reason.is_empty()),
                "{value:?}: {err:?}"
            );
            assert!(err.to_string().contains("'join_timeout'"), "{err}");
            assert!(matches!(
                with("join_timeout", value).get_duration_or("join_timeout", Duration::ZERO),
                Err(ParameterError::NotADuration { .. })
            ));
        }
    }

    #[test]
    fn get_duration_in_bounds_values_naming_key_value_and_range() {
        let s = Duration::from_secs;
        let range = Duration::from_millis(1)..=MAX_TIMEOUT;
        assert_eq!(
            with("t", "7d").get_duration_in("t", range.clone()),
            Ok(Some(MAX_TIMEOUT))
        );
        assert_eq!(
            with("t", "1ms").get_duration_in("t", range.clone()),
            Ok(Some(Duration::from_millis(1)))
        );
        assert_eq!(params().get_duration_in("t", range.clone()), Ok(None));
        for value in ["0", "604800.000000001", "8d", "18446744073709551615"] {
            let err = with("t", value)
                .get_duration_in("t", range.clone())
                .unwrap_err();
            assert!(
                matches!(&err, ParameterError::DurationOutOfRange { key, value: v, min, max }
                    if key == "t" && v == value && *min == Duration::from_millis(1)
                        && *max == MAX_TIMEOUT),
                "{value:?}: {err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains("'t'") && msg.contains("1ms to 7d"), "{msg}");
        }
        // A malformed value is still reported as such.
        assert!(matches!(
            with("t", "x").get_duration_in("t", range),
            Err(ParameterError::NotADuration { .. })
        ));
        assert_eq!(parse_duration_in("2s", s(2)..=s(2)), Ok(s(2)));
        let reason = parse_duration_in("0", Duration::from_millis(1)..=s(3600)).unwrap_err();
        assert!(reason.contains("1ms to 1h"), "{reason}");
        assert!(parse_duration_in("x", s(0)..=s(1)).is_err());
    }

    #[test]
    fn duration_bounds_are_formatted_in_their_largest_exact_unit() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(1), "1ns"),
            (Duration::from_micros(3), "3us"),
            (Duration::from_millis(1), "1ms"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(2), "2s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(3600), "1h"),
            (MAX_TIMEOUT, "7d"),
            (MAX_RETENTION, "365d"),
        ];
        for (d, text) in cases {
            assert_eq!(format_duration_bound(d), text);
            assert_eq!(parse_duration(text), Ok(d), "{text} does not read back");
        }
    }

    #[test]
    fn get_duration_reasons_are_specific() {
        let reason = |value: &str| match with("k", value).get_duration("k") {
            Err(ParameterError::NotADuration { reason, .. }) => reason,
            other => panic!("{value:?}: {other:?}"),
        };
        assert!(reason("-3").contains("negative"));
        assert!(reason("-3s").contains("negative"));
        assert!(reason("inf").contains("finite"));
        assert!(reason("NaN").contains("finite"));
        assert!(reason("").contains("empty"));
        assert!(reason("99999999999999999999999").contains("too large"));
    }

    #[test]
    fn error_messages_name_keys_and_values() {
        let cases: Vec<(ParameterError, &[&str])> = vec![
            (ParameterError::EmptyBackend, &["backend"]),
            (ParameterError::EmptyRunId, &["run id"]),
            (ParameterError::MinNodes { min: 0 }, &["minimum", "(0)"]),
            (ParameterError::MaxNodes { min: 3, max: 2 }, &["(2)", "(3)"]),
            (
                ParameterError::ConfigFormat {
                    text: "a=1,,".into(),
                },
                &["a=1,,", "<key1>=<value1>"],
            ),
            (ParameterError::MissingValue { key: "a".into() }, &["'a'"]),
            (
                ParameterError::NotAnInteger {
                    key: "timeout".into(),
                    value: "x1".into(),
                },
                &["'timeout'", "x1", "integer"],
            ),
            (
                ParameterError::NotABool {
                    key: "is_host".into(),
                    value: "maybe".into(),
                },
                &["'is_host'", "maybe", "boolean"],
            ),
            (
                ParameterError::NotADuration {
                    key: "t".into(),
                    value: "-1".into(),
                    reason: "negative durations are not allowed".into(),
                },
                &["'t'", "-1", "negative"],
            ),
        ];
        for (err, needles) in cases {
            let msg = err.to_string();
            for needle in needles {
                assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
            }
        }
    }
}
