//! Completing a round: one read of its join records, the rank table ([`super::ranks`]), and
//! one guarded transaction that writes the assignments, `final`, `current = r + 1` and drops
//! the keys of round `r - 2` — or, for a table larger than `max_txn_ops`, the same in chunks
//! under a claim bound to the finaliser's lease (several chunks in flight at once).
//!
//! Every write is guarded by "`final` absent, not closed" (and the last by "`current` is
//! `r`"), so a stale or slow finaliser changes nothing. A finaliser whose answer was lost
//! and that tries again recognises its own claim (by its lease) and takes it over with a new
//! token, so a lost answer never blocks the round.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use tokio::time::Instant;

use super::api::{
    Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnResponse,
};
use super::backoff::Backoff;
use super::client::is_overloaded;
use super::ranks::{assign_ranks, Candidate};
use super::records::{
    decode, encode, Assignment, Claim, FinalRecord, NodeRecord, WatchedPeer, SCHEMA_VERSION,
};
use super::rendezvous::EtcdRendezvousHandler;
use super::round::RoundResult;
use crate::RendezvousError;

/// How many chunks of a large round's assignments the finaliser writes at once.
const CHUNKS_IN_FLIGHT: usize = 8;

impl EtcdRendezvousHandler {
    /// Tries to complete `round`: at once if `at_max` and `max_nodes` joined, or because its
    /// last call is `due` (then with at least `min_nodes`; with fewer, the last call of
    /// revision `lastcall_rev` is withdrawn). `Ok(None)`: not now, or someone else did.
    pub(super) async fn try_finalize(
        &self,
        round: u64,
        at_max: bool,
        due: bool,
        lastcall_rev: Option<i64>,
    ) -> Result<Option<RoundResult>, RendezvousError> {
        let k = &self.keys;
        let (min, max) = (self.settings.min_nodes, self.settings.max_nodes);
        let resp = self
            .client
            .get(
                k.member_prefix(round),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let members_revision = resp.revision();
        let mut candidates = Vec::with_capacity(resp.kvs().len());
        // Each member's probe and lease, for its ring predecessor to watch.
        let mut probes = std::collections::BTreeMap::new();
        for kv in resp.kvs() {
            let rec: NodeRecord = decode(kv.key(), kv.value())?;
            if kv.lease() == 0 {
                return Err(RendezvousError::State(format!(
                    "join record '{}' is not bound to a lease; was it written by something else?",
                    String::from_utf8_lossy(kv.key())
                )));
            }
            if let Some(probe) = rec.probe {
                probes.insert(rec.node_id.clone(), (probe, kv.lease()));
            }
            candidates.push(Candidate {
                node_id: rec.node_id,
                hostname: rec.hostname,
                node_rank: rec.node_rank,
                prev_rank: rec.prev_rank,
                joined: kv.create_revision(),
                local_world_size: rec.local_world_size,
            });
        }
        if candidates.len() < min {
            if let (true, Some(rev)) = (due, lastcall_rev) {
                // Members left during the last call: withdraw it; the next join re-arms it.
                // Not if a node joined after the read: its join did not arm a last call (this
                // one was armed), so nothing would re-arm it; the next attempt counts it.
                let txn = Txn::new()
                    .when([
                        Compare::mod_revision(k.lastcall(round), CompareOp::Equal, rev),
                        Compare::mod_revision(
                            k.join_seq(round),
                            CompareOp::Less,
                            members_revision + 1,
                        ),
                    ])
                    .and_then([TxnOp::delete(k.lastcall(round), None)]);
                let withdrawn = self.client.txn(txn).await?.succeeded();
                tracing::debug!(
                    round,
                    members = candidates.len(),
                    min,
                    withdrawn,
                    "too few members at the last call"
                );
            }
            return Ok(None);
        }
        if !due && (!at_max || candidates.len() < max) {
            // More joins than members (some left): wait for the last call.
            return Ok(None);
        }
        let table = assign_ranks(candidates, max);
        let world_size = table.ranked.len();
        let all_ranked = table.waiting.is_empty();
        let token = self.env.token();
        let record = FinalRecord {
            v: SCHEMA_VERSION,
            round,
            world_size,
            token: token.clone(),
            members_revision,
            finalizer: self.node.node_id.clone(),
            min_nodes: min,
            max_nodes: max,
            all_ranked,
        };
        let run_lease = self.run_lease_id().await?;
        let leased = || Some(PutOptions::new().with_lease(run_lease));
        // Global ranks as torchrun lays them out: each member's workers after those of the
        // members before it in rank order (only if every member said how many it runs).
        let sizes: Option<Vec<u64>> = table.ranked.iter().map(|c| c.local_world_size).collect();
        let firsts: Option<(Vec<u64>, u64)> = sizes.map(|sizes| {
            let mut total = 0u64;
            let firsts = sizes
                .iter()
                .map(|n| {
                    let first = total;
                    total = total.saturating_add(*n);
                    first
                })
                .collect();
            (firsts, total)
        });
        // Each member watches its ring successor's process (none in a round of one).
        let watched = |rank: usize| -> Option<WatchedPeer> {
            let next = table.ranked.get((rank + 1) % world_size)?;
            let (probe, lease) = probes.get(&next.node_id)?;
            (world_size > 1 && self.settings.peer_probe).then(|| WatchedPeer {
                node_id: next.node_id.clone(),
                probe: probe.clone(),
                lease: *lease,
            })
        };
        let assigns: Vec<TxnOp> = table
            .ranked
            .iter()
            .enumerate()
            .map(|(rank, c)| {
                let a = Assignment {
                    watch: watched(rank),
                    v: SCHEMA_VERSION,
                    rank,
                    world_size,
                    token: token.clone(),
                    first_global_rank: firsts.as_ref().map(|(f, _)| f[rank]),
                    global_world_size: firsts.as_ref().map(|(_, total)| *total),
                };
                TxnOp::put(k.assign(round, &c.node_id), encode(&a), leased())
            })
            .collect();
        let mut finish = vec![
            TxnOp::put(k.final_key(round), encode(&record), leased()),
            TxnOp::put(k.current(), (round + 1).to_string(), leased()),
        ];
        if round > 2 {
            // Nobody reads a round two behind the one just completed: drop its keys.
            let old = round - 2;
            let range =
                |prefix: String| TxnOp::delete(prefix, Some(DeleteOptions::new().with_prefix()));
            finish.push(range(k.round_prefix(old)));
            finish.push(range(k.assign_prefix(old)));
            finish.push(range(k.kv_prefix(old)));
            finish.push(range(k.op_prefix(old)));
        }
        let written = if assigns.len() + finish.len() <= self.settings.max_txn_ops {
            let mut ops = assigns;
            ops.extend(finish);
            self.txn_through_overload(Txn::new().when(self.open_guards(round)).and_then(ops))
                .await?
                .succeeded()
        } else {
            self.finalize_in_chunks(round, &token, assigns, finish)
                .await?
        };
        if !written {
            return Ok(None);
        }
        let rank = table
            .ranked
            .iter()
            .position(|c| c.node_id == self.node.node_id);
        let global = rank.zip(firsts.as_ref()).and_then(|(r, (f, total))| {
            Some(crate::GlobalRanks {
                first: usize::try_from(f[r]).ok()?,
                world_size: usize::try_from(*total).ok()?,
            })
        });
        tracing::debug!(
            round,
            world_size,
            waiting = table.waiting.len(),
            "completed the round"
        );
        let watch = rank.and_then(watched);
        Ok(Some(RoundResult {
            record,
            rank,
            global,
            watch,
            next_round: round + 1,
            ctl_watch: None,
        }))
    }

    /// Sends `txn`; while etcd refuses it with its backpressure (not applied), again after a
    /// jittered pause, for at most a lease TTL. A completing node that gave up would join
    /// again on a new watch and read the join records again: more load for a busy etcd.
    async fn txn_through_overload(&self, txn: Txn) -> Result<TxnResponse, RendezvousError> {
        let give_up = Instant::now() + self.settings.keep_alive_ttl;
        let mut backoff = Backoff::starting_at(Duration::from_millis(100));
        loop {
            match self.client.txn(txn.clone()).await {
                Err(e) if is_overloaded(&e) && Instant::now() + backoff.step() < give_up => {
                    tracing::debug!(error = %e, "completing transaction refused as overloaded; retrying");
                    tokio::time::sleep(backoff.next_pause(self.env.fraction())).await;
                }
                other => return other,
            }
        }
    }

    /// "Round `round` is open": not final, the run not closed, `current` is `round`.
    fn open_guards(&self, round: u64) -> Vec<Compare> {
        let k = &self.keys;
        vec![
            Compare::create_revision(k.final_key(round), CompareOp::Equal, 0),
            Compare::create_revision(k.closed(), CompareOp::Equal, 0),
            Compare::value(k.current(), CompareOp::Equal, round.to_string()),
        ]
    }

    async fn finalize_in_chunks(
        &self,
        round: u64,
        token: &str,
        assigns: Vec<TxnOp>,
        finish: Vec<TxnOp>,
    ) -> Result<bool, RendezvousError> {
        let k = &self.keys;
        let claim_key = k.claim(round);
        let claim = encode(&Claim {
            v: SCHEMA_VERSION,
            node_id: self.node.node_id.clone(),
            token: token.to_string(),
        });
        let lease = self.node_lease.lock().await.id();
        let put_claim = || {
            TxnOp::put(
                claim_key.clone(),
                claim.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
        };
        // Claim the round: if nobody holds it, or if we do (an earlier attempt of ours whose
        // answer was lost): the claim is bound to our lease.
        let take = Txn::new()
            .when(self.open_guards(round))
            .and_then([TxnOp::txn(
                Txn::new()
                    .when([Compare::lease(claim_key.clone(), CompareOp::Equal, 0)])
                    .and_then([put_claim()])
                    .or_else([TxnOp::txn(
                        Txn::new()
                            .when([Compare::lease(claim_key.clone(), CompareOp::Equal, lease)])
                            .and_then([put_claim()]),
                    )]),
            )]);
        let resp = self.txn_through_overload(take).await?;
        let claimed = resp.succeeded()
            && resp
                .txn(0)
                .is_some_and(|t| t.succeeded() || t.txn(0).is_some_and(|t| t.succeeded()));
        if !claimed {
            return Ok(false);
        }
        let ours = || {
            let mut c = vec![Compare::value(
                claim_key.clone(),
                CompareOp::Equal,
                claim.clone(),
            )];
            c.extend(self.open_guards(round));
            c
        };
        // The chunks are independent (each guarded by the claim): several in flight at once
        // let etcd batch them into fewer raft rounds. `final` comes only after all of them.
        let chunks: Vec<Txn> = assigns
            .chunks(self.settings.max_txn_ops.max(1))
            .map(|chunk| Txn::new().when(ours()).and_then(chunk.to_vec()))
            .collect();
        let written: Vec<bool> = futures::stream::iter(chunks)
            .map(|txn| async move { self.txn_through_overload(txn).await.map(|r| r.succeeded()) })
            .buffer_unordered(CHUNKS_IN_FLIGHT)
            .try_collect()
            .await?;
        if written.contains(&false) {
            return Ok(false);
        }
        let mut ops = finish;
        ops.push(TxnOp::delete(claim_key.clone(), None));
        Ok(self
            .txn_through_overload(Txn::new().when(ours()).and_then(ops))
            .await?
            .succeeded())
    }

    /// This node's assignment in a completed round: the one its watch delivered (`side`, the
    /// last value of its assignment key seen) if it belongs to `record` (same token), else
    /// read.
    pub(super) async fn read_assignment(
        &self,
        record: FinalRecord,
        side: Option<&KeyValue>,
    ) -> Result<RoundResult, RendezvousError> {
        let mut ours = match side {
            Some(kv) => {
                let a: Assignment = decode(kv.key(), kv.value())?;
                (a.token == record.token).then_some(a)
            }
            None => None,
        };
        if ours.is_none() {
            tracing::debug!(
                round = record.round,
                seen = side.is_some(),
                "assignment not delivered on the watch; reading it"
            );
            let resp = self
                .client
                .get(self.keys.assign(record.round, &self.node.node_id), None)
                .await?;
            ours = match resp.kvs().first() {
                Some(kv) => {
                    let a: Assignment = decode(kv.key(), kv.value())?;
                    (a.token == record.token).then_some(a)
                }
                None => None,
            };
        }
        let rank = ours.as_ref().map(|a| a.rank);
        let global = ours.as_ref().and_then(super::round::global_ranks);
        let watch = ours.and_then(|a| a.watch);
        let next_round = record.round + 1;
        Ok(RoundResult {
            record,
            rank,
            global,
            watch,
            next_round,
            ctl_watch: None,
        })
    }
}
