//! The JSON records rdzv stores in etcd, with a schema version, and their strict decoding:
//! anything under our prefix that we did not write gives a state error naming the key.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::RendezvousError;

/// The schema version of every record.
pub const SCHEMA_VERSION: u32 = 2;

/// What a node publishes when it joins a round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Schema version.
    pub v: u32,
    /// Unique per handler (process).
    pub node_id: String,
    /// Host name.
    pub hostname: String,
    /// Advertised addresses, most preferred first.
    pub addrs: Vec<String>,
    /// Rank-order hint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_rank: Option<u64>,
    /// Rank in the previous round, if this node was a member of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_rank: Option<usize>,
    /// How many workers (global ranks) this node runs, if it says (a launcher does): the
    /// finaliser then gives every member its first global rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_world_size: Option<u64>,
    /// Where this node's peer probe listens (`host:port`; see [`super::probe`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    /// Process id.
    pub pid: u32,
    /// Set when the node left after the round without failing (a one-shot member).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detached: bool,
    /// Set just before the node leaves gracefully (its record is then deleted).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub left: bool,
}

/// The summary of a completed round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalRecord {
    /// Schema version.
    pub v: u32,
    /// The round.
    pub round: u64,
    /// Number of members.
    pub world_size: usize,
    /// Random token shared by this round's assignments.
    pub token: String,
    /// The etcd revision at which the finaliser read the members.
    pub members_revision: i64,
    /// The node that finalised.
    pub finalizer: String,
    /// The run's `min_nodes` (as the finaliser had it).
    pub min_nodes: usize,
    /// The run's `max_nodes` (as the finaliser had it).
    pub max_nodes: usize,
    /// Every join record the finaliser read (at `members_revision`) got a rank: a join record
    /// of the round created at or before that revision is a member's, any later one is not.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_ranked: bool,
}

/// A member's rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// Schema version.
    pub v: u32,
    /// Rank in `0..world_size`.
    pub rank: usize,
    /// Number of members.
    pub world_size: usize,
    /// Must equal the [`FinalRecord::token`].
    pub token: String,
    /// The first global rank of this node's workers: the sum of the local world sizes of the
    /// members before it in rank order (only when every member gave its local world size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_global_rank: Option<u64>,
    /// The sum of the members' local world sizes (with `first_global_rank`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_world_size: Option<u64>,
    /// The peer this member watches for a crash (its ring successor; see [`super::probe`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<WatchedPeer>,
}

/// A member's ring successor, as the finaliser read its join record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchedPeer {
    /// Its node id.
    pub node_id: String,
    /// Where its probe listens.
    pub probe: String,
    /// The lease its join record is bound to (revoked when its process dies).
    pub lease: i64,
}

/// The last-call marker: the round completes `duration_ms` after it was written, with whoever
/// joined. Its writer times it on its own monotonic clock; the others, as backups, from when
/// they saw it (no wall clocks are compared).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastCall {
    /// Schema version.
    pub v: u32,
    /// How long after it was written the round completes.
    pub duration_ms: u64,
    /// The node that will finalise the round (others take over if it does not).
    pub writer: String,
}

/// The closed marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosedRecord {
    /// Schema version.
    pub v: u32,
    /// Who closed the run.
    pub by: String,
    /// When, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Closed by an operator (`rdzv close`): it stays closed for the run's retention. A run
    /// closed by its own nodes (the job failed) starts again once they have all exited.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub by_operator: bool,
}

/// A finaliser's claim on a large round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Schema version.
    pub v: u32,
    /// The claiming node.
    pub node_id: String,
    /// The token its assignments carry.
    pub token: String,
}

/// Serialises a record.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Our records are plain structs of strings and numbers: serialisation cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

/// Decodes the record stored at `key`.
///
/// # Errors
/// [`RendezvousError::State`] naming the key if the bytes are not such a record or carry an
/// unknown schema version.
pub fn decode<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, RendezvousError> {
    let key = String::from_utf8_lossy(key);
    let json: serde_json::Value = serde_json::from_slice(value).map_err(|e| {
        RendezvousError::State(format!(
            "key '{key}' does not hold an rdzv record ({e}); was it written by something else?"
        ))
    })?;
    match json.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(SCHEMA_VERSION) => {}
        Some(v) => {
            return Err(RendezvousError::State(format!(
                "key '{key}' holds schema version {v}; this rdzv understands {SCHEMA_VERSION}"
            )))
        }
        None => {
            return Err(RendezvousError::State(format!(
                "key '{key}' holds JSON without an rdzv schema version"
            )))
        }
    }
    serde_json::from_value(json).map_err(|e| {
        RendezvousError::State(format!("key '{key}' holds a malformed rdzv record: {e}"))
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_json_names_the_key() {
        let err = decode::<FinalRecord>(b"/p/r/1/ctl/final", b"{not json").unwrap_err();
        assert!(matches!(&err, RendezvousError::State(m) if m.contains("/p/r/1/ctl/final")));
    }

    #[test]
    fn unknown_schema_version_is_a_state_error() {
        let err =
            decode::<LastCall>(b"k", br#"{"v":99,"duration_ms":1,"writer":"x"}"#).unwrap_err();
        assert!(matches!(&err, RendezvousError::State(m) if m.contains("version 99")));
    }

    #[test]
    fn missing_fields_are_a_state_error() {
        let err = decode::<Assignment>(b"k", br#"{"v":2,"rank":1}"#).unwrap_err();
        assert!(matches!(&err, RendezvousError::State(m) if m.contains("malformed")));
    }

    #[test]
    fn records_round_trip() {
        let a = Assignment {
            v: SCHEMA_VERSION,
            rank: 3,
            world_size: 4,
            token: "t".into(),
            first_global_rank: None,
            global_world_size: None,
            watch: Some(WatchedPeer {
                node_id: "n2".into(),
                probe: "10.0.0.2:4242".into(),
                lease: 7,
            }),
        };
        assert_eq!(decode::<Assignment>(b"k", &encode(&a)).unwrap(), a);
        // Records without the newer optional fields still decode.
        let old = decode::<Assignment>(b"k", br#"{"v":2,"rank":1,"world_size":2,"token":"t"}"#);
        assert_eq!(old.unwrap().watch, None);
    }
}
