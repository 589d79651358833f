//! Parsing of rendezvous endpoints: `host`, `host:port`, `[ipv6]:port`, bare IPv6, optional
//! `http://`/`https://` scheme, and comma-separated lists for an etcd cluster.
//!
//! The rules follow PyTorch's `parse_rendezvous_endpoint`, with these deliberate differences:
//!
//! - an empty endpoint is an error ([`EndpointError::Empty`]); PyTorch silently uses
//!   `localhost`;
//! - an unbracketed IPv6 literal (more than one `:`, e.g. `::1`, `fe80::1`) is taken whole as
//!   the host, with the default port; PyTorch splits it at its last colon (`::1` becomes host
//!   `:` and port `1`). To give a port with an IPv6 address, bracket it: `[::1]:2379`;
//! - port 0 is rejected ([`EndpointError::PortOutOfRange`]), since nothing can be reached on
//!   it; PyTorch accepts it;
//! - an `http://` or `https://` prefix (any case) and one trailing `/` are accepted, as in
//!   etcd client URLs; any other scheme is an error;
//! - hosts are checked more strictly than PyTorch's pattern `^[\w\.:-]+$` (whose `\w` also
//!   admits non-ASCII letters): a host with a `:` must be an IPv6 address, one of digits and
//!   dots an IPv4 address, any other a host name of non-empty ASCII labels (see
//!   [`parse_endpoint`]); so `:::`, `1.2.3.4.5` or `a..b` fail here, not later in DNS.

use std::fmt;

/// The scheme given in front of an endpoint, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `http://`
    Http,
    /// `https://`
    Https,
}

impl Scheme {
    /// `"http"` or `"https"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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

/// Why an endpoint could not be parsed. Every variant carries the endpoint text as given
/// (for list errors, the whole list).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// The endpoint (or the whole list) is empty or only whitespace.
    #[error("the rendezvous endpoint '{endpoint}' is empty: expected host[:port]")]
    Empty {
        /// The text that was given.
        endpoint: String,
    },

    /// There is no host before the port (`:2379`, `[]`, `http://`).
    #[error("the rendezvous endpoint '{endpoint}' has an empty host name")]
    EmptyHost {
        /// The text that was given.
        endpoint: String,
    },

    /// The host is not an IPv6 address, an IPv4 address or a host name (see
    /// [`parse_endpoint`]), or its IPv6 brackets are malformed.
    #[error(
        "the host name '{host}' of the rendezvous endpoint '{endpoint}' must be a dot-separated \
         list of labels, an IPv4 address, or an IPv6 address (IPv6 with a port in brackets: \
         [::1]:2379)"
    )]
    InvalidHost {
        /// The text that was given.
        endpoint: String,
        /// The offending host part.
        host: String,
    },

    /// The port is not 1 to 5 ASCII digits (empty, signed, with spaces, ...).
    #[error(
        "the port '{port}' of the rendezvous endpoint '{endpoint}' must be an integer between 1 \
         and 65535"
    )]
    InvalidPort {
        /// The text that was given.
        endpoint: String,
        /// The offending port text.
        port: String,
    },

    /// The port is a number, but 0 or greater than 65535.
    #[error(
        "the port {port} of the rendezvous endpoint '{endpoint}' is out of range: it must be \
         between 1 and 65535"
    )]
    PortOutOfRange {
        /// The text that was given.
        endpoint: String,
        /// The port number that was given.
        port: u32,
    },

    /// A scheme other than `http` or `https` precedes `://`.
    #[error(
        "the scheme '{scheme}' of the rendezvous endpoint '{endpoint}' is not supported: use \
         http:// or https://"
    )]
    UnsupportedScheme {
        /// The text that was given.
        endpoint: String,
        /// The scheme that was given (as written).
        scheme: String,
    },

    /// An item of an endpoint list is empty (`a,,b`, a trailing comma).
    #[error("item {} of the rendezvous endpoint list '{endpoint}' is empty", .index + 1)]
    EmptyListItem {
        /// The whole list that was given.
        endpoint: String,
        /// The 0-based position of the empty item.
        index: usize,
    },
}

impl Endpoint {
    /// `host:port`, with IPv6 hosts (any host containing `:`) in brackets: `[::1]:2379`.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// `http://host:port` or `https://host:port` (the endpoint's own scheme wins over `default`).
    pub fn url(&self, default: Scheme) -> String {
        format!(
            "{}://{}",
            self.scheme.unwrap_or(default).as_str(),
            self.host_port()
        )
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.host_port())
    }
}

/// Parses one endpoint; `default_port` is used (verbatim) when none is given.
///
/// After trimming surrounding whitespace, the accepted forms are:
///
/// - an optional `http://` or `https://` prefix (any case), kept in [`Endpoint::scheme`], and
///   one optional trailing `/`;
/// - `host` or `host:port` (split at the last `:`), e.g. `localhost`, `10.0.0.1:2379`;
/// - `[ipv6]` or `[ipv6]:port`, e.g. `[::1]`, `[2001:db8::1]:2379`;
/// - a bare IPv6 literal (more than one `:`, no brackets), e.g. `::1`, `fe80::1`: the whole
///   text is the host and the port is `default_port`. Unlike PyTorch, `::1` is *not* split
///   into host `:` and port `1`; a bare IPv6 literal can never carry a port.
///
/// The host (brackets removed) must be one of:
///
/// - an IPv6 address, if it contains a `:` (checked by [`std::net::Ipv6Addr`]'s parser, so
///   `:::`, `1:2:3:4:5:6:7:8:9` and zone ids such as `%eth0` are rejected);
/// - an IPv4 address `a.b.c.d`, if it has only digits and dots (so `1.2.3.4.5`, `256.0.0.1`,
///   `1.2.3` and `123` are rejected rather than left to the resolver);
/// - otherwise a host name: labels of ASCII letters, digits, `_` and `-`, separated by `.`,
///   none empty (`a..b`, `.a` are rejected), at most 63 characters each and 253 in all; one
///   trailing `.` (a fully qualified name) is allowed.
///
/// A port must be 1 to 5 ASCII digits, between 1 and 65535.
///
/// Unlike PyTorch, an empty endpoint is an error rather than `localhost`, and port 0 is
/// rejected.
///
/// # Errors
/// - [`EndpointError::Empty`] for empty or whitespace-only text;
/// - [`EndpointError::UnsupportedScheme`] for a scheme other than http/https before `://`;
/// - [`EndpointError::EmptyHost`] for `:2379`, `[]`, `http://`;
/// - [`EndpointError::InvalidHost`] for a host with other characters (`~`, `a b`), a
///   malformed IP address (`:::`, `1.2.3.4.5`), an empty or too long label (`a..b`) or
///   malformed brackets (`[::1`, `[::1]x`);
/// - [`EndpointError::InvalidPort`] for a port that is not 1 to 5 digits (`h:`, `h:abc`,
///   `h:-1`, `h:123456`);
/// - [`EndpointError::PortOutOfRange`] for port 0 or a port above 65535.
///
/// As in PyTorch, a bad port is reported before a bad host (`:abc` is an
/// [`EndpointError::InvalidPort`], `:123` an [`EndpointError::EmptyHost`]).
pub fn parse_endpoint(text: &str, default_port: u16) -> Result<Endpoint, EndpointError> {
    let endpoint = text.trim();
    if endpoint.is_empty() {
        return Err(EndpointError::Empty {
            endpoint: text.to_string(),
        });
    }
    let owned = || endpoint.to_string();

    let (scheme, rest) = match endpoint.split_once("://") {
        Some((scheme, rest)) => {
            let parsed = if scheme.eq_ignore_ascii_case("http") {
                Scheme::Http
            } else if scheme.eq_ignore_ascii_case("https") {
                Scheme::Https
            } else {
                return Err(EndpointError::UnsupportedScheme {
                    endpoint: owned(),
                    scheme: scheme.to_string(),
                });
            };
            (Some(parsed), rest)
        }
        None => (None, endpoint),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Err(EndpointError::EmptyHost { endpoint: owned() });
    }

    let (host, port_text) = if let Some(bracketed) = rest.strip_prefix('[') {
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err(EndpointError::InvalidHost {
                endpoint: owned(),
                host: rest.to_string(),
            });
        };
        if after.is_empty() {
            (host, None)
        } else if let Some(port) = after.strip_prefix(':') {
            (host, Some(port))
        } else {
            return Err(EndpointError::InvalidHost {
                endpoint: owned(),
                host: rest.to_string(),
            });
        }
    } else if rest.matches(':').count() > 1 {
        // A bare IPv6 literal: never split (see the docs).
        (rest, None)
    } else if let Some((host, port)) = rest.rsplit_once(':') {
        (host, Some(port))
    } else {
        (rest, None)
    };

    // As in PyTorch, the port is checked before the host (`:abc` is a port error).
    let port = match port_text {
        None => default_port,
        Some(port_text) => parse_port(port_text).map_err(|number| match number {
            Some(port) => EndpointError::PortOutOfRange {
                endpoint: owned(),
                port,
            },
            None => EndpointError::InvalidPort {
                endpoint: owned(),
                port: port_text.to_string(),
            },
        })?,
    };

    if host.is_empty() {
        return Err(EndpointError::EmptyHost { endpoint: owned() });
    }
    if !valid_host(host) {
        return Err(EndpointError::InvalidHost {
            endpoint: owned(),
            host: host.to_string(),
        });
    }

    Ok(Endpoint {
        host: host.to_string(),
        port,
        scheme,
    })
}

/// The longest host name (RFC 1035, without the trailing dot).
const MAX_HOST_NAME_LEN: usize = 253;

/// The longest label of a host name (RFC 1035).
const MAX_LABEL_LEN: usize = 63;

/// Whether `host` (brackets removed) is an IPv6 address (it has a `:`), an IPv4 address (only
/// digits and dots) or a host name (non-empty labels of ASCII letters, digits, `_` and `-`,
/// separated by `.`, at most 63 characters each and 253 in all, one trailing `.` allowed).
fn valid_host(host: &str) -> bool {
    if host.contains(':') {
        return host.parse::<std::net::Ipv6Addr>().is_ok();
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return host.parse::<std::net::Ipv4Addr>().is_ok();
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    name.len() <= MAX_HOST_NAME_LEN
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= MAX_LABEL_LEN
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
        })
}

/// A port of 1 to 5 ASCII digits in 1..=65535. The error is the number if it had the right
/// form but was out of range, `None` if it was malformed.
fn parse_port(text: &str) -> Result<u16, Option<u32>> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(None);
    }
    let number: u32 = text.parse().map_err(|_| None)?;
    match u16::try_from(number) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(Some(number)),
    }
}

/// Parses a comma-separated list of endpoints (an etcd cluster), e.g.
/// `h1:2379, h2:2379, [::1]:2379`. Each item is trimmed and parsed with [`parse_endpoint`];
/// the order is kept and duplicates are not removed.
///
/// # Errors
/// - [`EndpointError::Empty`] if the whole text is empty or whitespace-only;
/// - [`EndpointError::EmptyListItem`] for an empty item (`a,,b`, `a,`, `,a`, `a, ,b`);
/// - any error of [`parse_endpoint`] for the first bad item (carrying that item's text).
pub fn parse_endpoints(text: &str, default_port: u16) -> Result<Vec<Endpoint>, EndpointError> {
    if text.trim().is_empty() {
        return Err(EndpointError::Empty {
            endpoint: text.to_string(),
        });
    }
    text.split(',')
        .enumerate()
        .map(|(index, item)| {
            let item = item.trim();
            if item.is_empty() {
                Err(EndpointError::EmptyListItem {
                    endpoint: text.trim().to_string(),
                    index,
                })
            } else {
                parse_endpoint(item, default_port)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(host: &str, port: u16, scheme: Option<Scheme>) -> Endpoint {
        Endpoint {
            host: host.to_string(),
            port,
            scheme,
        }
    }

    // ---- valid forms -----------------------------------------------------------------------

    #[test]
    fn parses_host_and_port() {
        for (text, host, port) in [
            ("dummy.com:0123", "dummy.com", 123),
            ("dummy.com:65535", "dummy.com", 65535),
            ("dummy.com:1", "dummy.com", 1),
            ("localhost:2379", "localhost", 2379),
            ("dummy-1.com:123", "dummy-1.com", 123),
            ("under_score:80", "under_score", 80),
            ("127.0.0.1:29400", "127.0.0.1", 29400),
            ("  10.0.0.1:2379  ", "10.0.0.1", 2379),
            ("[2001:db8::1]:123", "2001:db8::1", 123),
            ("[2001:db8::1]:65535", "2001:db8::1", 65535),
            ("[::1]:2379", "::1", 2379),
            ("[::]:1", "::", 1),
            ("[localhost]:80", "localhost", 80),
        ] {
            assert_eq!(
                parse_endpoint(text, 7),
                Ok(ep(host, port, None)),
                "{text:?}"
            );
        }
    }

    #[test]
    fn uses_default_port_when_none_given() {
        for (text, host) in [
            ("dummy.com", "dummy.com"),
            ("localhost", "localhost"),
            ("127.0.0.1", "127.0.0.1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("[::1]", "::1"),
            (" host ", "host"),
            ("host/", "host"),
        ] {
            assert_eq!(
                parse_endpoint(text, 2379),
                Ok(ep(host, 2379, None)),
                "{text:?}"
            );
            assert_eq!(
                parse_endpoint(text, 29400),
                Ok(ep(host, 29400, None)),
                "{text:?}"
            );
        }
    }

    #[test]
    fn bare_ipv6_is_the_whole_host() {
        for text in [
            "::1",
            "::",
            "fe80::1",
            "2001:db8::2",
            "2001:0db8:0000:0000:0000:0000:0000:0001",
            "::ffff:192.168.0.1",
            // Ambiguous, but a bare IPv6 literal never carries a port.
            "2001:db8::1:2379",
        ] {
            assert_eq!(
                parse_endpoint(text, 2379),
                Ok(ep(text, 2379, None)),
                "{text:?}"
            );
        }
        assert_eq!(
            parse_endpoint("http://fe80::1/", 2379),
            Ok(ep("fe80::1", 2379, Some(Scheme::Http)))
        );
    }

    #[test]
    fn parses_schemes_case_insensitively() {
        for (text, scheme, host, port) in [
            ("http://h:1", Scheme::Http, "h", 1),
            ("https://h:2", Scheme::Https, "h", 2),
            ("HTTP://h:3", Scheme::Http, "h", 3),
            ("HttpS://h", Scheme::Https, "h", 2379),
            ("http://10.0.0.1:2379/", Scheme::Http, "10.0.0.1", 2379),
            ("https://[::1]:2380/", Scheme::Https, "::1", 2380),
            ("https://[::1]", Scheme::Https, "::1", 2379),
            (
                " https://etcd.example.com ",
                Scheme::Https,
                "etcd.example.com",
                2379,
            ),
        ] {
            assert_eq!(
                parse_endpoint(text, 2379),
                Ok(ep(host, port, Some(scheme))),
                "{text:?}"
            );
        }
    }

    // ---- errors ----------------------------------------------------------------------------

    #[test]
    fn rejects_empty() {
        for text in ["", " ", "\t\n"] {
            let err = parse_endpoint(text, 2379).unwrap_err();
            assert!(
                matches!(&err, EndpointError::Empty { endpoint } if endpoint == text),
                "{text:?}: {err:?}"
            );
        }
    }

    #[test]
    fn rejects_empty_host() {
        for text in [
            ":123",
            ":2379",
            "[]",
            "[]:2379",
            "http://",
            "https:///",
            "/",
            "http://:80",
        ] {
            let err = parse_endpoint(text, 2379).unwrap_err();
            assert!(
                matches!(&err, EndpointError::EmptyHost { endpoint } if endpoint == text),
                "{text:?}: {err:?}"
            );
        }
    }

    #[test]
    fn rejects_invalid_host() {
        for (text, host) in [
            ("~", "~"),
            ("dummy.com :123", "dummy.com "),
            ("~:123", "~"),
            ("a b", "a b"),
            ("host/path", "host/path"),
            ("host//", "host/"),
            ("fe80::1%eth0", "fe80::1%eth0"),
            ("[fe80::1%eth0]:80", "fe80::1%eth0"),
            ("[::1", "[::1"),
            ("[::1]x", "[::1]x"),
            ("[::1]2379", "[::1]2379"),
            ("[a]b]:1", "[a]b]:1"),
            ("ünï.com:80", "ünï.com"),
            ("user@host:80", "user@host"),
            ("http:// host", " host"),
        ] {
            let err = parse_endpoint(text, 2379).unwrap_err();
            assert!(
                matches!(&err, EndpointError::InvalidHost { endpoint, host: h }
                    if endpoint == text.trim() && h == host),
                "{text:?}: {err:?}"
            );
        }
    }

    /// Bad input (issue 10): `:::` was accepted and failed later with a DNS error. A host with
    /// colons must be an IPv6 address, a host of digits and dots an IPv4 address, and a host
    /// name a list of non-empty labels.
    #[test]
    fn malformed_ip_addresses_and_host_names_are_rejected_at_parse_time() {
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = ["abcdefghi"; 26].join(".");
        for (text, host) in [
            (":::", ":::"),
            ("::::", "::::"),
            ("[:::]:1", ":::"),
            ("[::::]", "::::"),
            ("a:b:c", "a:b:c"),
            ("1:2:3:4:5:6:7:8:9", "1:2:3:4:5:6:7:8:9"),
            ("12345::1", "12345::1"),
            ("http://:::/", ":::"),
            ("1.2.3.4.5", "1.2.3.4.5"),
            ("1.2.3.4.5:80", "1.2.3.4.5"),
            ("[1.2.3.4.5]:80", "1.2.3.4.5"),
            ("256.1.1.1", "256.1.1.1"),
            ("1.2.3", "1.2.3"),
            ("123", "123"),
            ("1.2.3.4.", "1.2.3.4."),
            ("a..b", "a..b"),
            (".a", ".a"),
            ("..", ".."),
            (".", "."),
            ("a.b..", "a.b.."),
            (long_label.as_str(), long_label.as_str()),
            (long_name.as_str(), long_name.as_str()),
        ] {
            let err = parse_endpoint(text, 2379).unwrap_err();
            assert!(
                matches!(&err, EndpointError::InvalidHost { endpoint, host: h }
                    if endpoint == text && h == host),
                "{text:?}: {err:?}"
            );
            assert!(
                parse_endpoints(&format!("ok:1,{text}"), 2379).is_err(),
                "{text:?}"
            );
        }
        // Still accepted: full, compressed and IPv4-mapped IPv6, FQDNs with a trailing dot,
        // labels of 63 characters, digits in host names.
        let label63 = format!("{}.com", "a".repeat(63));
        for text in [
            "::",
            "1:2:3:4:5:6:7:8",
            "::ffff:10.0.0.1",
            "etcd.example.com.",
            "node-7.local",
            "1node",
            "10.0.0.255",
            label63.as_str(),
        ] {
            assert!(parse_endpoint(text, 2379).is_ok(), "{text:?} rejected");
        }
    }

    #[test]
    fn rejects_invalid_port() {
        for (text, port) in [
            ("dummy.com:", ""),
            (":abc", "abc"),
            (":-123", "-123"),
            (":-", "-"),
            ("h:abc", "abc"),
            ("h:-123", "-123"),
            ("h:-", "-"),
            ("h:+80", "+80"),
            ("h: 80", " 80"),
            ("h:80 x", "80 x"),
            ("h:123456", "123456"),
            ("h:000001", "000001"),
            ("h:1.5", "1.5"),
            ("h:2379/v3", "2379/v3"),
            ("[::1]:", ""),
            ("[::1]:x", "x"),
            ("http://h:port", "port"),
            ("h:８０", "８０"),
        ] {
            let err = parse_endpoint(text, 2379).unwrap_err();
            assert!(
                matches!(&err, EndpointError::InvalidPort { endpoint, port: p }
                    if endpoint == text && p == port),
                "{text:?}: {err:?}"
            );
        }
    }

    #[test]
    fn rejects_port_out_of_range() {
        for (text, port) in [
            ("dummy.com:65536", 65536),
            ("dummy.com:70000", 70000),
            ("h:99999", 99999),
            ("h:0", 0),
            ("h:00000", 0),
            ("[::1]:0", 0),
            ("[2001:db8::1]:65536", 65536),
            ("https://h:70000/", 70000),
        ] {
            let err = parse_endpoint(text, 2379).unwrap_err();
            assert!(
                matches!(&err, EndpointError::PortOutOfRange { endpoint, port: p }
                    if endpoint == text && *p == port),
                "{text:?}: {err:?}"
            );
        }
    }

    #[test]
    fn rejects_unsupported_schemes() {
        for (text, scheme) in [
            ("etcd://h:2379", "etcd"),
            ("unix://h", "unix"),
            ("ftp://h", "ftp"),
            ("://h", ""),
            ("httpx://h", "httpx"),
            ("http ://h", "http "),
        ] {
            let err = parse_endpoint(text, 2379).unwrap_err();
            assert!(
                matches!(&err, EndpointError::UnsupportedScheme { endpoint, scheme: s }
                    if endpoint == text && s == scheme),
                "{text:?}: {err:?}"
            );
        }
    }

    #[test]
    fn error_messages_contain_the_endpoint() {
        for text in ["", ":1", "~", "h:x", "h:70000", "etcd://h", "a,,b"] {
            let err = match parse_endpoints(text, 2379) {
                Err(e) => e,
                Ok(v) => panic!("{text:?} parsed as {v:?}"),
            };
            assert!(err.to_string().contains(&format!("'{text}'")), "{err}");
        }
        let err = parse_endpoints("a,,b", 1).unwrap_err();
        assert!(err.to_string().contains("item 2"), "{err}");
    }

    // ---- formatting ------------------------------------------------------------------------

    #[test]
    fn host_port_url_and_display() {
        let v4 = ep("10.0.0.1", 2379, None);
        assert_eq!(v4.host_port(), "10.0.0.1:2379");
        assert_eq!(v4.to_string(), "10.0.0.1:2379");
        assert_eq!(v4.url(Scheme::Http), "http://10.0.0.1:2379");
        assert_eq!(v4.url(Scheme::Https), "https://10.0.0.1:2379");

        let v6 = ep("::1", 2380, Some(Scheme::Https));
        assert_eq!(v6.host_port(), "[::1]:2380");
        assert_eq!(v6.to_string(), "[::1]:2380");
        assert_eq!(v6.url(Scheme::Http), "https://[::1]:2380");

        let http = ep("h", 1, Some(Scheme::Http));
        assert_eq!(http.url(Scheme::Https), "http://h:1");

        assert_eq!(Scheme::Http.to_string(), "http");
        assert_eq!(Scheme::Https.as_str(), "https");
    }

    #[test]
    fn formatting_round_trips() {
        for text in ["h:1", "[::1]:2379", "[2001:db8::1]:65535", "10.0.0.1:80"] {
            let parsed = parse_endpoint(text, 2379).unwrap();
            assert_eq!(parsed.host_port(), text);
            assert_eq!(parse_endpoint(&parsed.host_port(), 1), Ok(parsed.clone()));
            let url = parsed.url(Scheme::Https);
            let reparsed = parse_endpoint(&url, 1).unwrap();
            assert_eq!(reparsed.host_port(), text);
            assert_eq!(reparsed.scheme, Some(Scheme::Https));
        }
        // A bare IPv6 host gets brackets, so its output can carry the port.
        let bare = parse_endpoint("::1", 2379).unwrap();
        assert_eq!(bare.host_port(), "[::1]:2379");
        assert_eq!(parse_endpoint(&bare.host_port(), 1), Ok(bare));
    }

    // ---- lists -----------------------------------------------------------------------------

    #[test]
    fn parses_lists() {
        assert_eq!(
            parse_endpoints("h1:1, h2 ,[::1]:3, https://h4:4/ , ::2", 2379),
            Ok(vec![
                ep("h1", 1, None),
                ep("h2", 2379, None),
                ep("::1", 3, None),
                ep("h4", 4, Some(Scheme::Https)),
                ep("::2", 2379, None),
            ])
        );
        assert_eq!(
            parse_endpoints(" single ", 5),
            Ok(vec![ep("single", 5, None)])
        );
        assert_eq!(
            parse_endpoints("h:1,h:1", 5),
            Ok(vec![ep("h", 1, None), ep("h", 1, None)])
        );
    }

    #[test]
    fn list_rejects_empty() {
        for text in ["", "  ", "\n"] {
            let err = parse_endpoints(text, 2379).unwrap_err();
            assert!(
                matches!(&err, EndpointError::Empty { endpoint } if endpoint == text),
                "{text:?}: {err:?}"
            );
        }
    }

    #[test]
    fn list_rejects_empty_items() {
        for (text, index) in [
            ("a,,b", 1),
            ("a,", 1),
            (",a", 0),
            ("a, ,b", 1),
            (",", 0),
            (" , ", 0),
            ("a:1,b:2,", 2),
        ] {
            let err = parse_endpoints(text, 2379).unwrap_err();
            assert!(
                matches!(&err, EndpointError::EmptyListItem { endpoint, index: i }
                    if endpoint == text.trim() && *i == index),
                "{text:?}: {err:?}"
            );
        }
    }

    #[test]
    fn list_reports_first_bad_item() {
        let err = parse_endpoints("good:1, ~:2, bad:x", 2379).unwrap_err();
        assert!(
            matches!(&err, EndpointError::InvalidHost { endpoint, .. } if endpoint == "~:2"),
            "{err:?}"
        );
        let err = parse_endpoints("good:1, bad:x", 2379).unwrap_err();
        assert!(matches!(&err, EndpointError::InvalidPort { port, .. } if port == "x"));
        let err = parse_endpoints("good:1, h:0", 2379).unwrap_err();
        assert!(matches!(err, EndpointError::PortOutOfRange { port: 0, .. }));
        let err = parse_endpoints("good:1, :5", 2379).unwrap_err();
        assert!(matches!(err, EndpointError::EmptyHost { .. }));
        let err = parse_endpoints("good:1, etcd://h", 2379).unwrap_err();
        assert!(matches!(err, EndpointError::UnsupportedScheme { .. }));
    }
}
