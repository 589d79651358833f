//! Keeping rdzv's credentials out of sight: which configuration keys are secret, where else
//! a password may come from, and how configuration text is redacted for messages and cleaned
//! for the workers' environment.
//!
//! A password can be given three ways, from the most to the least exposed:
//!
//! 1. `password=<secret>` in the configuration (`--rdzv-conf`): visible to every user in `ps`
//!    and `/proc/<pid>/cmdline`; rdzv warns;
//! 2. the environment variable [`PASSWORD_ENV`] (`RDZV_ETCD_PASSWORD`): visible only to the
//!    same user (and root), not passed on to workers;
//! 3. `password_file=<path>`: the first line of a file (e.g. a Kubernetes secret volume,
//!    mode 0400); recommended.

/// The environment variable a password may come from (when the configuration has neither
/// `password` nor `password_file`).
pub const PASSWORD_ENV: &str = "RDZV_ETCD_PASSWORD";

/// Configuration keys whose values are secrets.
pub const SECRET_KEYS: &[&str] = &["password"];

/// What replaces a secret in messages.
pub const REDACTED: &str = "<redacted>";

/// True if `key` (trimmed) names a secret.
pub fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.contains(&key.trim())
}

/// `text` (a `key=value,...` configuration string, possibly malformed) with the value of every
/// secret item replaced by [`REDACTED`]; everything else is kept as written.
pub fn redact_config_text(text: &str) -> String {
    text.split(',')
        .map(|item| match item.split_once('=') {
            Some((key, _)) if is_secret_key(key) => format!("{key}={REDACTED}"),
            _ => item.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `text` (a `key=value,...` configuration string) without its secret items, for the
/// environment the workers inherit (`PET_RDZV_CONF`).
pub fn without_secret_items(text: &str) -> String {
    text.split(',')
        .filter(|item| !matches!(item.split_once('='), Some((key, _)) if is_secret_key(key)))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn redaction_keeps_everything_but_the_secret() {
        assert_eq!(
            redact_config_text("timeout=5, password = hunter2,username=u"),
            "timeout=5, password =<redacted>,username=u"
        );
        assert_eq!(redact_config_text("password"), "password");
        assert_eq!(redact_config_text(""), "");
        assert_eq!(
            redact_config_text("a=1,,password=x=y"),
            "a=1,,password=<redacted>"
        );
    }

    #[test]
    fn stripping_drops_secret_items_only() {
        assert_eq!(
            without_secret_items("timeout=5,password=hunter2,username=u"),
            "timeout=5,username=u"
        );
        assert_eq!(without_secret_items("password=x"), "");
        assert_eq!(
            without_secret_items("password_file=/run/pw"),
            "password_file=/run/pw"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever the configuration text, a secret value written in it never survives
        /// redaction or stripping.
        #[test]
        fn a_secret_never_survives(
            before in "[a-z_=, ]{0,20}",
            secret in "[0-9][A-Za-z0-9!@#%^&*]{7,15}",
            after in "[a-z_=, ]{0,20}",
        ) {
            let text = format!("{before},password={secret},{after}");
            prop_assert!(!redact_config_text(&text).contains(&secret));
            prop_assert!(!without_secret_items(&text).contains(&secret));
        }
    }
}
