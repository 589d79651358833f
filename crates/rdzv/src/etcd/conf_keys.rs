//! The configuration keys of the etcd backend, and the check that rejects any other key: a typo
//! such as `timeuot=60` would otherwise be ignored silently.
//!
//! Three kinds of keys besides rdzv's own ([`KNOWN_KEYS`]):
//!
//! - the keys of PyTorch's other rendezvous backends (`c10d`, `etcd-v2`, `static`), which a
//!   torchrun user may carry over ([`PYTORCH_KEYS`]): accepted, with a warning (once per
//!   process and key) that says what rdzv does with each. `join_timeout` — the `c10d` and
//!   `etcd-v2` name of the bound on joining — is an alias of `timeout`, used when `timeout`
//!   is not given (and ignored when it is: `timeout` is the `etcd` backend's name, and
//!   torchrun always sets it);
//! - the TLS keys of PyTorch's `etcd-v2` backend (`ca_cert`, `ssl_cert`, `ssl_cert_key`,
//!   [`RENAMED_KEYS`]): rejected with the rdzv name to use, since ignoring them would connect
//!   without the TLS files the user meant;
//! - anything else: rejected, with the closest known key if one is near and the list of known
//!   keys.

use std::collections::BTreeSet;
use std::sync::Mutex;

use crate::{RendezvousError, RendezvousParameters};

/// The keys the etcd backend reads (see [`super::options`]).
pub const KNOWN_KEYS: &[&str] = &[
    "protocol",
    "cacert",
    "cert",
    "key",
    "username",
    "password",
    "password_file",
    "connect_timeout",
    "request_timeout",
    "etcd_prefix",
    "timeout",
    "last_call_timeout",
    "keep_alive_ttl",
    "retention",
    "store_timeout",
    "node_rank",
    "local_world_size",
    "max_txn_ops",
    "peer_probe",
];

/// Keys of PyTorch's other backends, accepted with a warning: `(key, what rdzv does with it)`.
pub const PYTORCH_KEYS: &[(&str, &str)] = &[
    (
        "join_timeout",
        "PyTorch's c10d/etcd-v2 name for rdzv's `timeout`: used as `timeout` when `timeout` is \
         not given, ignored when it is",
    ),
    (
        "close_timeout",
        "ignored: closing a run is bounded by `timeout`",
    ),
    (
        "heartbeat_timeout",
        "ignored: a dead node is noticed when its lease expires, within `keep_alive_ttl`",
    ),
    (
        "heartbeat",
        "ignored: a dead node is noticed when its lease expires, within `keep_alive_ttl`",
    ),
    (
        "keep_alive_interval",
        "ignored: a node renews its lease every third of `keep_alive_ttl`",
    ),
    (
        "keep_alive_max_attempt",
        "ignored: a node is lost when its lease expires, after `keep_alive_ttl`",
    ),
    (
        "read_timeout",
        "ignored: etcd requests are bounded by `request_timeout`, store reads by \
         `store_timeout`",
    ),
    (
        "is_host",
        "ignored: the round's store is kept in etcd, no node hosts a TCPStore",
    ),
    (
        "store_type",
        "ignored: the round's store is kept in etcd, no node hosts a TCPStore",
    ),
    (
        "use_libuv",
        "ignored: the round's store is kept in etcd, no node hosts a TCPStore",
    ),
    (
        "local_addr",
        "ignored as a configuration key: give the address as `local_addr` of the parameters \
         (`--local-addr`)",
    ),
];

/// TLS keys of PyTorch's `etcd-v2` backend, rejected with rdzv's name: `(key, rdzv's key)`.
pub const RENAMED_KEYS: &[(&str, &str)] = &[
    ("ca_cert", "cacert"),
    ("ssl_cert", "cert"),
    ("ssl_cert_key", "key"),
];

/// Checks every configuration key of `params`: rdzv's own keys pass, PyTorch's other
/// backends' keys pass with a warning (logged once per process and key), any other key is an
/// error.
///
/// # Errors
/// [`RendezvousError::InvalidConfig`] naming the first unknown key, with the known keys (and
/// the closest one, or rdzv's name of an `etcd-v2` TLS key).
pub fn check_keys(params: &RendezvousParameters) -> Result<(), RendezvousError> {
    for key in params.config.keys() {
        let key = key.as_str();
        if KNOWN_KEYS.contains(&key) {
            continue;
        }
        if let Some((_, handling)) = PYTORCH_KEYS.iter().find(|(k, _)| *k == key) {
            warn_once(key, handling);
            continue;
        }
        let reason = match RENAMED_KEYS.iter().find(|(k, _)| *k == key) {
            Some((_, ours)) => format!(
                "'{key}' is the name PyTorch's etcd-v2 backend uses; rdzv's etcd backend calls \
                 it '{ours}'"
            ),
            None => {
                let hint = closest_key(key)
                    .map(|k| format!(" (did you mean '{k}'?)"))
                    .unwrap_or_default();
                format!(
                    "unknown key{hint}; the etcd backend's keys are {}; the keys of PyTorch's \
                     other backends ({}) are accepted with a warning",
                    KNOWN_KEYS.join(", "),
                    PYTORCH_KEYS
                        .iter()
                        .map(|(k, _)| *k)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        };
        return Err(RendezvousError::InvalidConfig {
            key: key.to_string(),
            reason,
        });
    }
    Ok(())
}

fn warn_once(key: &str, handling: &str) {
    static WARNED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let first = WARNED
        .lock()
        .map(|mut warned| warned.insert(key.to_string()))
        .unwrap_or(true);
    if first {
        tracing::warn!(key, "rendezvous configuration key '{key}': {handling}");
    }
}

/// The known key (rdzv's or PyTorch's) within two edits of `key`, if there is one.
fn closest_key(key: &str) -> Option<&'static str> {
    KNOWN_KEYS
        .iter()
        .copied()
        .chain(PYTORCH_KEYS.iter().map(|(k, _)| *k))
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance (insertions, deletions, substitutions), by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = substitution.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(conf: &str) -> RendezvousParameters {
        RendezvousParameters::new("etcd", "h", "job", 1, 1)
            .and_then(|p| p.with_config_str(conf))
            .unwrap_or_else(|e| panic!("{conf}: {e}"))
    }

    fn error(conf: &str) -> String {
        match check_keys(&params(conf)) {
            Err(RendezvousError::InvalidConfig { key, reason }) => format!("{key}: {reason}"),
            other => panic!("{conf}: {other:?}"),
        }
    }

    /// Bad input (issue 10): `--rdzv-conf timeuot=60` was ignored silently.
    #[test]
    fn an_unknown_key_is_rejected_with_the_closest_and_the_known_keys() {
        let err = error("timeuot=60");
        assert!(err.starts_with("timeuot:"), "{err}");
        assert!(err.contains("did you mean 'timeout'?"), "{err}");
        for key in KNOWN_KEYS {
            assert!(err.contains(key), "{err} lacks {key}");
        }
        let err = error("timeout=1,bogus=1");
        assert!(
            err.starts_with("bogus:") && !err.contains("did you mean"),
            "{err}"
        );
        assert!(error("keep_alive_tll=3").contains("did you mean 'keep_alive_ttl'?"));
        assert!(error("Timeout=3").contains("did you mean 'timeout'?"));
    }

    #[test]
    fn etcd_v2_tls_keys_are_rejected_with_rdzvs_name() {
        for (key, ours) in RENAMED_KEYS {
            let err = error(&format!("{key}=/x.pem"));
            assert!(err.contains(&format!("calls it '{ours}'")), "{err}");
        }
    }

    #[test]
    fn known_and_pytorch_keys_pass() {
        let all: Vec<String> = KNOWN_KEYS
            .iter()
            .chain(PYTORCH_KEYS.iter().map(|(k, _)| k))
            .map(|k| format!("{k}=1"))
            .collect();
        assert!(check_keys(&params(&all.join(","))).is_ok());
        assert!(check_keys(&params("")).is_ok());
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("timeuot", "timeout"), 2);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(closest_key("protocl"), Some("protocol"));
        assert_eq!(closest_key("zzzzzz"), None);
    }
}
