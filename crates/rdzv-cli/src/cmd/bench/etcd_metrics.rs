//! etcd's own request counters, read from its `/metrics` endpoint (Prometheus text format)
//! with a minimal HTTP/1.0 GET over a TCP stream.
//!
//! Counted per gRPC method from `grpc_server_started_total` (an RPC or stream is counted when
//! it starts: `grpc_server_handled_total` would count a watch or keep-alive stream only when it
//! ends), plus the messages received on the `Watch` and `LeaseKeepAlive` streams
//! (`grpc_server_msg_received_total`: watch creations and cancellations, keep-alives) and
//! `etcd_server_proposals_committed_total` (raft proposals: writes, lease grants and revokes).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on one read of `/metrics`.
const FETCH_LIMIT: Duration = Duration::from_secs(5);

/// Bound on the size of a `/metrics` answer (etcd's is about 150 KB).
const MAX_BYTES: u64 = 16 << 20;

/// etcd's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct EtcdCounters {
    /// RPCs (unary calls and streams) started, per gRPC method.
    started: BTreeMap<String, f64>,
    /// Messages received on streams, per gRPC method.
    received: BTreeMap<String, f64>,
    proposals_committed: f64,
}

impl EtcdCounters {
    /// Reads the counters of the etcd whose client address is `addr` (`host:port`).
    pub(super) async fn fetch(addr: &str) -> anyhow::Result<Self> {
        let body = tokio::time::timeout(FETCH_LIMIT, get(addr, "/metrics"))
            .await
            .with_context(|| {
                format!("no answer from http://{addr}/metrics within {FETCH_LIMIT:?}")
            })??;
        Ok(Self::parse(&body))
    }

    /// The counters in a `/metrics` text.
    pub(super) fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for sample in text.lines().filter_map(parse_sample) {
            let method = || {
                sample
                    .labels
                    .iter()
                    .find(|(k, _)| k == "grpc_method")
                    .map(|(_, v)| v.clone())
            };
            match sample.name {
                "grpc_server_started_total" => {
                    if let Some(m) = method() {
                        *out.started.entry(m).or_default() += sample.value;
                    }
                }
                "grpc_server_msg_received_total" => {
                    if let Some(m) = method() {
                        *out.received.entry(m).or_default() += sample.value;
                    }
                }
                "etcd_server_proposals_committed_total" => out.proposals_committed += sample.value,
                _ => {}
            }
        }
        out
    }

    /// What etcd counted between `before` and `self`: `rpcs` (all methods), `range`, `txn`,
    /// `put`, `delete_range`, `lease_grant`, `lease_revoke`, `watch_streams` (started),
    /// `watch_requests` and `keep_alive_requests` (messages on those streams), and
    /// `proposals_committed`.
    pub(super) fn since(&self, before: &Self) -> BTreeMap<String, u64> {
        let delta = |now: f64, then: f64| (now - then).max(0.0).round() as u64;
        let of = |map: &BTreeMap<String, f64>, old: &BTreeMap<String, f64>, m: &str| {
            delta(
                map.get(m).copied().unwrap_or(0.0),
                old.get(m).copied().unwrap_or(0.0),
            )
        };
        let total = |map: &BTreeMap<String, f64>| map.values().sum::<f64>();
        let mut out = BTreeMap::new();
        out.insert(
            "rpcs".to_string(),
            delta(total(&self.started), total(&before.started)),
        );
        for (key, method) in [
            ("range", "Range"),
            ("txn", "Txn"),
            ("put", "Put"),
            ("delete_range", "DeleteRange"),
            ("lease_grant", "LeaseGrant"),
            ("lease_revoke", "LeaseRevoke"),
            ("watch_streams", "Watch"),
        ] {
            out.insert(key.to_string(), of(&self.started, &before.started, method));
        }
        out.insert(
            "watch_requests".to_string(),
            of(&self.received, &before.received, "Watch"),
        );
        out.insert(
            "keep_alive_requests".to_string(),
            of(&self.received, &before.received, "LeaseKeepAlive"),
        );
        out.insert(
            "proposals_committed".to_string(),
            delta(self.proposals_committed, before.proposals_committed),
        );
        out
    }
}

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Debug, PartialEq)]
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Parses a sample line; `None` for comments, blank lines and what it cannot read.
fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = &inner[parse_labels(inner, &mut labels)?..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `key="value", ...}` from the start of `s` into `labels`; returns the index just after
/// the closing `}`.
fn parse_labels(s: &str, labels: &mut Vec<(String, String)>) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut i = 0;
    loop {
        while i < bytes.len() && (bytes[i] == b',' || bytes[i].is_ascii_whitespace()) {
            i += 1;
        }
        if *bytes.get(i)? == b'}' {
            return Some(i + 1);
        }
        let eq = i + s[i..].find('=')?;
        let key = s[i..eq].trim().to_string();
        i = eq + 1;
        while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        if *bytes.get(i)? != b'"' {
            return None;
        }
        i += 1;
        let mut value = String::new();
        loop {
            let c = s[i..].chars().next()?;
            i += c.len_utf8();
            match c {
                '"' => break,
                '\\' => {
                    let e = s[i..].chars().next()?;
                    i += e.len_utf8();
                    value.push(if e == 'n' { '\n' } else { e });
                }
                c => value.push(c),
            }
        }
        labels.push((key, value));
    }
}

/// The version of the etcd whose client address is `addr` (its `/version`: `etcdserver`).
pub(super) async fn etcd_version(addr: &str) -> Option<String> {
    let body = tokio::time::timeout(FETCH_LIMIT, get(addr, "/version"))
        .await
        .ok()?
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v.get("etcdserver")?.as_str().map(str::to_string)
}

/// `GET path` over HTTP/1.0 (the answer is not chunked and ends with the connection);
/// returns the body of a 200 answer.
async fn get(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.take(MAX_BYTES).read_to_end(&mut answer).await?;
    http_body(&answer).with_context(|| format!("GET http://{addr}{path}"))
}

/// The body of an HTTP/1.x answer with status 200 (not chunked).
fn http_body(answer: &[u8]) -> anyhow::Result<String> {
    let text = String::from_utf8_lossy(answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("an incomplete HTTP answer");
    };
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default();
    let code = status.split_whitespace().nth(1);
    if !status.starts_with("HTTP/1.") || code != Some("200") {
        bail!("answered {status:?}");
    }
    if lines.any(|h| {
        let h = h.to_ascii_lowercase();
        h.starts_with("transfer-encoding:") && h.contains("chunked")
    }) {
        bail!("a chunked answer to an HTTP/1.0 request");
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP grpc_server_started_total Total number of RPCs started on the server.
# TYPE grpc_server_started_total counter
grpc_server_started_total{grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 10
grpc_server_started_total{grpc_method="Txn",grpc_service="etcdserverpb.KV",grpc_type="unary"} 4
grpc_server_started_total{grpc_method="Watch",grpc_service="etcdserverpb.Watch",grpc_type="bidi_stream"} 2
grpc_server_msg_received_total{grpc_method="Watch",grpc_service="etcdserverpb.Watch",grpc_type="bidi_stream"} 7
grpc_server_msg_received_total{grpc_method="LeaseKeepAlive",grpc_service="etcdserverpb.Lease",grpc_type="bidi_stream"} 3
grpc_server_handled_total{grpc_code="OK",grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 10
etcd_server_proposals_committed_total 5
weird{a="x\"}y", b = "2" ,} 1.5e3 1700000000
"#;

    #[test]
    fn samples_are_name_labels_and_value() {
        let s = parse_sample(r#"a_total{x="1",y="q\"uo}te\\"} 42"#).unwrap();
        assert_eq!(s.name, "a_total");
        assert_eq!(
            s.labels,
            vec![
                ("x".to_string(), "1".to_string()),
                ("y".to_string(), "q\"uo}te\\".to_string())
            ]
        );
        assert_eq!(s.value, 42.0);
        let plain = parse_sample("etcd_server_proposals_committed_total 5").unwrap();
        assert_eq!(
            (plain.name, plain.labels.len(), plain.value),
            ("etcd_server_proposals_committed_total", 0, 5.0)
        );
        let with_ts = parse_sample(r#"weird{a="x\"}y", b = "2" ,} 1.5e3 1700000000"#).unwrap();
        assert_eq!(with_ts.labels.len(), 2, "{with_ts:?}");
        assert_eq!(with_ts.value, 1500.0);
        assert_eq!(parse_sample("m{} 1").unwrap().value, 1.0);
        assert!(parse_sample("# TYPE a counter").is_none());
        assert!(parse_sample("").is_none());
        assert!(parse_sample(r#"broken{a="1" 2"#).is_none());
        assert!(parse_sample("novalue").is_none());
    }

    #[test]
    fn counters_and_their_deltas() {
        let before = EtcdCounters::parse(TEXT);
        let after = EtcdCounters::parse(
            &TEXT
                .replace("\"unary\"} 10", "\"unary\"} 25")
                .replace("proposals_committed_total 5", "proposals_committed_total 9"),
        );
        let d = after.since(&before);
        assert_eq!(d["range"], 15);
        assert_eq!(d["rpcs"], 15, "started, not handled: {d:?}");
        assert_eq!(d["txn"], 0);
        assert_eq!(d["proposals_committed"], 4);
        let zero = EtcdCounters::default();
        let d = before.since(&zero);
        assert_eq!(d["rpcs"], 16);
        assert_eq!(d["watch_streams"], 2);
        assert_eq!(d["watch_requests"], 7);
        assert_eq!(d["keep_alive_requests"], 3);
        assert_eq!(d["lease_grant"], 0);
        // Counters never go backwards (an etcd restart would): no negative deltas.
        assert_eq!(zero.since(&before)["rpcs"], 0);
    }

    #[test]
    fn http_answers() {
        let ok = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\na 1\n";
        assert_eq!(http_body(ok).unwrap(), "a 1\n");
        assert!(http_body(b"HTTP/1.1 404 Not Found\r\n\r\n").is_err());
        assert!(http_body(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n").is_err());
        assert!(http_body(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[tokio::test]
    async fn fetch_reads_a_local_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            let request = String::from_utf8_lossy(&buf[..n]).to_string();
            let answer = format!("HTTP/1.0 200 OK\r\n\r\n{TEXT}");
            s.write_all(answer.as_bytes()).await.unwrap();
            request
        });
        let counters = EtcdCounters::fetch(&addr).await.unwrap();
        assert_eq!(counters, EtcdCounters::parse(TEXT));
        let request = server.await.unwrap();
        assert!(
            request.starts_with("GET /metrics HTTP/1.0\r\n"),
            "{request}"
        );
    }
}
