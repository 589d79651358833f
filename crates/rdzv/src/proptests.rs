//! Property tests of the parsers of untrusted input (issue 10, bad input): endpoints,
//! durations, configuration strings, and the records read back from etcd. Each property runs
//! 256 cases and takes well under a second.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use proptest::prelude::*;

use crate::endpoint::{parse_endpoint, parse_endpoints, Endpoint, Scheme};
use crate::etcd::records::{
    decode, encode, Assignment, Claim, ClosedRecord, FinalRecord, LastCall, NodeRecord,
    SCHEMA_VERSION,
};
use crate::etcd::rendezvous::{parse_round_value, MAX_ROUND};
use crate::parameters::{parse_config, parse_duration, parse_duration_in, MAX_RETENTION};
use crate::{ParameterError, RendezvousError, RendezvousParameters};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

/// Text that looks like input: mostly the characters the parsers care about.
fn input_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ a-z0-9:.,=/\\[\\]_%+-]{0,40}",
        "[0-9.:\\[\\]]{0,24}",
    ]
}

fn host_name() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-zA-Z_][a-zA-Z0-9_-]{0,12}", 1..5).prop_map(|labels| labels.join("."))
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        host_name(),
        any::<u32>().prop_map(|ip| Ipv4Addr::from(ip).to_string()),
        any::<u128>().prop_map(|ip| Ipv6Addr::from(ip).to_string()),
    ]
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    (
        host(),
        1..=u16::MAX,
        prop_oneof![
            Just(None),
            Just(Some(Scheme::Http)),
            Just(Some(Scheme::Https))
        ],
    )
        .prop_map(|(host, port, scheme)| Endpoint { host, port, scheme })
}

fn decode_all(key: &[u8], value: &[u8]) {
    let _ = decode::<NodeRecord>(key, value);
    let _ = decode::<FinalRecord>(key, value);
    let _ = decode::<Assignment>(key, value);
    let _ = decode::<LastCall>(key, value);
    let _ = decode::<ClosedRecord>(key, value);
    let _ = decode::<Claim>(key, value);
    let _ = parse_round_value(key, value);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn endpoint_parsers_never_panic(text in input_text(), port in any::<u16>()) {
        let _ = parse_endpoint(&text, port);
        let _ = parse_endpoints(&text, port);
    }

    /// A valid endpoint, formatted (with brackets for IPv6, with its scheme if it has one),
    /// parses back to itself.
    #[test]
    fn a_formatted_endpoint_parses_back(e in endpoint(), default_port in any::<u16>()) {
        let text = match e.scheme {
            Some(scheme) => e.url(scheme),
            None => e.host_port(),
        };
        prop_assert_eq!(parse_endpoint(&text, default_port), Ok(e.clone()), "{}", text);
        let list = format!("{text}, {text}");
        prop_assert_eq!(parse_endpoints(&list, default_port), Ok(vec![e.clone(), e]));
    }

    /// A bare IPv6 address is the whole host, with the default port.
    #[test]
    fn a_bare_ipv6_address_takes_the_default_port(ip in any::<u128>(), port in 1..=u16::MAX) {
        let host = Ipv6Addr::from(ip).to_string();
        prop_assert_eq!(
            parse_endpoint(&host, port),
            Ok(Endpoint { host: host.clone(), port, scheme: None })
        );
    }

    #[test]
    fn the_duration_parser_never_panics_and_bounds_hold(
        text in prop_oneof![input_text(), "[0-9]{1,25}(\\.[0-9]{0,12})?(ns|us|ms|s|m|h|d|y)?"],
        lo in 0u64..1_000_000,
        span in 0u64..1_000_000,
    ) {
        let _ = parse_duration(&text);
        let range = Duration::from_millis(lo)..=Duration::from_millis(lo + span);
        if let Ok(d) = parse_duration_in(&text, range.clone()) {
            prop_assert!(range.contains(&d));
        }
        let params = RendezvousParameters::new("etcd", "h", "r", 1, 1)
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            .with_config("k", text.clone());
        match params.get_duration_in("k", range.clone()) {
            Ok(Some(d)) => prop_assert!(range.contains(&d)),
            Ok(None) => prop_assert!(false, "a present key read as missing"),
            Err(ParameterError::NotADuration { .. } | ParameterError::DurationOutOfRange { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error {e:?}"),
        }
    }

    /// `N` (seconds) and `Ns` (humantime) agree, for whole and fractional seconds.
    #[test]
    fn plain_seconds_and_humantime_seconds_agree(
        secs in 0..=MAX_RETENTION.as_secs(),
        millis in prop::option::of(0u32..1000),
    ) {
        let text = match millis {
            Some(ms) => format!("{secs}.{ms:03}"),
            None => secs.to_string(),
        };
        let plain = parse_duration(&text);
        prop_assert!(plain.is_ok(), "{}: {:?}", text, plain);
        prop_assert_eq!(plain.clone(), parse_duration(&format!("{text}s")), "{}", text);
        prop_assert_eq!(
            plain,
            Ok(Duration::from_secs(secs) + Duration::from_millis(millis.unwrap_or(0).into()))
        );
    }

    #[test]
    fn the_config_parser_never_panics(text in input_text()) {
        let _ = parse_config(&text);
    }

    /// A map formatted as `k=v,...` (with spaces around) parses back to itself.
    #[test]
    fn a_formatted_config_parses_back(
        map in prop::collection::btree_map("[a-z_][a-z0-9_]{0,12}", "[a-zA-Z0-9_./:=+-]{1,16}", 0..8),
        pad in "[ ]{0,2}",
    ) {
        let text = map
            .iter()
            .map(|(k, v)| format!("{pad}{k}{pad}={pad}{v}{pad}"))
            .collect::<Vec<_>>()
            .join(",");
        prop_assert_eq!(parse_config(&text), Ok(map));
    }

    /// A key given twice is rejected, whatever the values and wherever it is repeated.
    #[test]
    fn duplicate_config_keys_are_rejected(
        map in prop::collection::btree_map("[a-z_][a-z0-9_]{0,12}", "[a-z0-9]{1,8}", 1..8),
        which in any::<prop::sample::Index>(),
        value in "[a-z0-9]{1,8}",
        at in any::<prop::sample::Index>(),
    ) {
        let mut items: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let key = map.keys().nth(which.index(map.len())).cloned().unwrap_or_default();
        let position = at.index(items.len() + 1);
        items.insert(position, format!("{key}={value}"));
        let parsed: Result<BTreeMap<String, String>, _> = parse_config(&items.join(","));
        prop_assert_eq!(parsed, Err(ParameterError::DuplicateKey { key }));
    }

    /// The record parsers and the round parser never panic, on bytes or on JSON-like text.
    #[test]
    fn record_parsers_never_panic(
        key in prop::collection::vec(any::<u8>(), 0..32),
        value in prop::collection::vec(any::<u8>(), 0..256),
        json in "\\{(\"(v|rank|world_size|token|node_id|addrs|duration_ms|by|at_ms)\":(2|-1|1e400|\"x\"|null|\\[\\]|\\{\\}|18446744073709551616),?){0,6}\\}",
    ) {
        decode_all(&key, &value);
        decode_all(&key, json.as_bytes());
    }

    /// Whatever a round key holds, a parsed round is in range.
    #[test]
    fn parsed_rounds_are_in_range(value in prop_oneof!["[0-9]{1,22}", input_text()]) {
        if let Ok(round) = parse_round_value(b"k", value.as_bytes()) {
            prop_assert!((1..=MAX_ROUND).contains(&round));
            prop_assert_eq!(round.to_string(), value);
        }
    }

    /// Records rdzv writes are read back unchanged.
    #[test]
    fn node_records_round_trip(
        node_id in any::<String>(),
        hostname in any::<String>(),
        addrs in prop::collection::vec(any::<String>(), 0..4),
        node_rank in prop::option::of(any::<u64>()),
        prev_rank in prop::option::of(any::<usize>()),
        local_world_size in prop::option::of(any::<u64>()),
        probe in prop::option::of("[a-z0-9.:]{1,20}"),
        pid in any::<u32>(),
        detached in any::<bool>(),
        left in any::<bool>(),
    ) {
        let record = NodeRecord {
            v: SCHEMA_VERSION, node_id, hostname, addrs, node_rank, prev_rank, local_world_size,
            probe, pid, detached, left,
        };
        let decoded: Result<NodeRecord, RendezvousError> = decode(b"k", &encode(&record));
        prop_assert_eq!(decoded.ok(), Some(record));
    }
}
