//! [`RunStatus`]: what is known of a run, read from etcd in a few requests (for `rdzv status`).

use super::api::GetOptions;
use serde::Serialize;

use super::client::EtcdClient;
use super::keys::RunKeys;
use super::records::{decode, ClosedRecord, FinalRecord, LastCall, NodeRecord};
use crate::RendezvousError;

/// A member of a completed round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberStatus {
    /// Rank in the round.
    pub rank: usize,
    /// True while the member's join record exists (its lease is alive).
    pub alive: bool,
    /// The member's record.
    #[serde(flatten)]
    pub node: NodeRecord,
}

/// The state of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunStatus {
    /// The run id.
    pub run_id: String,
    /// Whether the run is closed.
    pub closed: bool,
    /// Who closed it and when (ms since the epoch).
    pub closed_by: Option<ClosedRecord>,
    /// The round nodes join now.
    pub open_round: u64,
    /// Nodes that joined the open round.
    pub waiting: Vec<NodeRecord>,
    /// Those of them that are hot spares: newcomers beyond a full last round, waiting for a
    /// member to leave or be lost (node ids).
    pub spares: Vec<String>,
    /// Whether the open round may start (a member of the last round re-joined, or the last
    /// round dissolved).
    pub gate_open: bool,
    /// The open round's last call, if armed.
    pub last_call: Option<LastCall>,
    /// The last completed round.
    pub last_round: Option<FinalRecord>,
    /// Its members in rank order.
    pub members: Vec<MemberStatus>,
    /// The job's failed rounds (the restarts `rdzv run` counted against `--max-restarts`).
    pub failed_rounds: u64,
    /// Live nodes of the run (connected, whether in a round or not). A run closed by its own
    /// nodes starts again once those that were live at the close have exited.
    pub agents: u64,
}

/// Whether the run has any key (a node created it, and its keys have not expired).
///
/// # Errors
/// [`RendezvousError::Connection`].
///
/// # Cancel safety
/// Cancel safe.
pub async fn run_exists(client: &EtcdClient, keys: &RunKeys) -> Result<bool, RendezvousError> {
    let resp = client
        .get(
            keys.run_prefix(),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?;
    Ok(resp.count() > 0)
}

/// Reads the status of a run (writes nothing).
///
/// # Errors
/// [`RendezvousError::NoSuchRun`] if the run has no key (see [`run_exists`]),
/// [`RendezvousError::Connection`], or [`RendezvousError::State`] for records we cannot read.
///
/// # Cancel safety
/// Cancel safe.
pub async fn read_status(
    client: &EtcdClient,
    keys: &RunKeys,
    run_id: &str,
) -> Result<RunStatus, RendezvousError> {
    if !run_exists(client, keys).await? {
        return Err(RendezvousError::NoSuchRun {
            run_id: run_id.to_string(),
        });
    }
    let closed = client.get(keys.closed(), None).await?;
    let closed_by = match closed.kvs().first() {
        Some(kv) => Some(decode::<ClosedRecord>(kv.key(), kv.value())?),
        None => None,
    };
    let current = client.get(keys.current(), None).await?;
    let open_round = match current.kvs().first() {
        Some(kv) => super::rendezvous::parse_round(kv)?,
        None => 1,
    };
    let open = client
        .get(
            keys.round_prefix(open_round),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    let mut waiting = Vec::new();
    let mut last_call = None;
    let mut gate_open = open_round == 1;
    for kv in open.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        match keys.parse_round_key(&key) {
            Some((_, "member", _)) => waiting.push(decode::<NodeRecord>(kv.key(), kv.value())?),
            Some((_, "ctl", "lastcall")) => {
                last_call = Some(decode::<LastCall>(kv.key(), kv.value())?)
            }
            Some((_, "ctl", "gate")) => gate_open = true,
            _ => {}
        }
    }
    let mut last_round = None;
    let mut members = Vec::new();
    if open_round > 1 {
        let prev = open_round - 1;
        let fin = client.get(keys.final_key(prev), None).await?;
        if let Some(kv) = fin.kvs().first() {
            last_round = Some(decode::<FinalRecord>(kv.key(), kv.value())?);
        }
        // One read of the join records and one of the ranks.
        let records = client
            .get(
                keys.member_prefix(prev),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let mut alive = std::collections::HashMap::new();
        for kv in records.kvs() {
            let rec: NodeRecord = decode(kv.key(), kv.value())?;
            alive.insert(rec.node_id.clone(), rec);
        }
        let assigns = client
            .get(
                keys.assign_prefix(prev),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        for kv in assigns.kvs() {
            let a: super::records::Assignment = decode(kv.key(), kv.value())?;
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let node_id = key.rsplit('/').next().unwrap_or_default().to_string();
            let node = alive.remove(&node_id);
            members.push(MemberStatus {
                rank: a.rank,
                alive: node.is_some(),
                node: node.unwrap_or_else(|| NodeRecord {
                    v: super::records::SCHEMA_VERSION,
                    node_id,
                    hostname: String::new(),
                    addrs: Vec::new(),
                    node_rank: None,
                    prev_rank: None,
                    local_world_size: None,
                    probe: None,
                    pid: 0,
                    detached: false,
                    left: false,
                }),
            });
        }
        members.sort_by_key(|m| m.rank);
    }
    let full = last_round
        .as_ref()
        .is_some_and(|r| r.world_size >= r.max_nodes);
    let spares = if full && !gate_open {
        waiting
            .iter()
            .filter(|n| n.prev_rank.is_none())
            .map(|n| n.node_id.clone())
            .collect()
    } else {
        Vec::new()
    };
    let failed_rounds = match client.get(keys.restarts(), None).await?.kvs().first() {
        Some(kv) => super::restarts::parse_count(&keys.restarts(), kv.value())?,
        None => 0,
    };
    let agents = client
        .get(
            keys.agent_prefix(),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?
        .count() as u64;
    Ok(RunStatus {
        failed_rounds,
        agents,
        run_id: run_id.to_string(),
        closed: closed_by.is_some(),
        closed_by,
        open_round,
        waiting,
        spares,
        gate_open,
        last_call,
        last_round,
        members,
    })
}
