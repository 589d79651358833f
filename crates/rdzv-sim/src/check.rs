//! [`Checker`]: the rendezvous's promises, checked after every change of the simulated etcd
//! (it is the model's observer) and at every view a node reports.
//!
//! From etcd's state, at every revision:
//! - `current` never moves backwards;
//! - a round is finalised once: a second `final` with another token is two views of one round;
//! - when `final(r)` is written, the assignments of `r` with its token are exactly the ranks
//!   `0..W`, one node each, `W` is the final's world size and `min_nodes <= W <= max_nodes`;
//! - closed stays closed: no round is finalised while the run is closed, nor, after it starts
//!   again, any round that was open when it closed; `closed` is deleted (the run starts
//!   again) only when no node acts and every live node's presence record was written after
//!   the close (the nodes of the closed job have all exited), and `current` then moves on;
//! - no join record is created in a round that was already finalised (a ghost round);
//! - a node that holds a rank in round `r` and is still in it (its record there alive) does
//!   not join a later round without having learnt its rank in `r` (abandoning its round);
//! - a node's lease does not expire while it still acts on the round its record was in (a
//!   node acts on a lost membership: its fence must stop it first).
//!
//! From the nodes: each node's rounds strictly increase (one round at a time), and the rank
//! and world size a node was told are those of the round's table.

use std::collections::{BTreeMap, BTreeSet};

use rdzv::etcd::api::{Event, EventType};
use rdzv::etcd::keys::RunKeys;
use rdzv::etcd::records::{decode, Assignment, FinalRecord, NodeRecord};

use crate::model::Model;
use crate::server::Cause;

/// What the checker knows of a finalised round.
#[derive(Debug, Clone)]
pub struct RoundTable {
    /// The final record's token.
    pub token: String,
    /// The world size.
    pub world: usize,
    /// Node id → rank.
    pub ranks: BTreeMap<String, usize>,
    /// Node id → (first global rank, global world size), as assigned.
    pub global: BTreeMap<String, (Option<u64>, Option<u64>)>,
    /// The revision of the final record.
    pub revision: i64,
}

#[derive(Debug, Default, Clone)]
struct NodeTrack {
    last_view: Option<u64>,
    acting: Option<u64>,
    gone: bool,
}

/// The invariant checker of one simulated run.
#[derive(Debug)]
pub struct Checker {
    keys: RunKeys,
    min_nodes: usize,
    max_nodes: usize,
    current: u64,
    closed: bool,
    /// The mod revision of the `closed` marker while closed.
    closed_rev: i64,
    /// Rounds up to this one were open or done when the run was last closed: none of them
    /// may be finalised any more.
    sealed_through: u64,
    reopens: u64,
    finals: BTreeMap<u64, RoundTable>,
    /// When each round was finalised (ms).
    final_times: BTreeMap<u64, u64>,
    nodes: BTreeMap<String, NodeTrack>,
    violations: Vec<String>,
    checks: u64,
    views: u64,
    trace: u64,
    now_ms: u64,
}

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

impl Checker {
    /// A checker for the run with these keys and node bounds.
    pub fn new(keys: RunKeys, min_nodes: usize, max_nodes: usize) -> Self {
        Self {
            keys,
            min_nodes,
            max_nodes,
            current: 0,
            closed: false,
            closed_rev: 0,
            sealed_through: 0,
            reopens: 0,
            finals: BTreeMap::new(),
            final_times: BTreeMap::new(),
            nodes: BTreeMap::new(),
            violations: Vec::new(),
            checks: 0,
            views: 0,
            trace: 0xcbf2_9ce4_8422_2325,
            now_ms: 0,
        }
    }

    fn violate(&mut self, what: String) {
        let what = format!("t={}ms: {what}", self.now_ms);
        tracing::error!("{what}");
        if self.violations.len() < 50 {
            self.violations.push(what);
        }
    }

    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        self.checks += 1;
        if !ok {
            let what = what();
            self.violate(what);
        }
    }

    /// The violations found so far.
    pub fn violations(&self) -> &[String] {
        &self.violations
    }

    /// Number of checks run.
    pub fn checks(&self) -> u64 {
        self.checks
    }

    /// Number of views nodes reported.
    pub fn views(&self) -> u64 {
        self.views
    }

    /// A hash of everything observed, in order: equal for equal runs.
    pub fn trace(&self) -> u64 {
        self.trace
    }

    /// The finalised rounds.
    pub fn finals(&self) -> &BTreeMap<u64, RoundTable> {
        &self.finals
    }

    /// True once the run was closed.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Records an extra line in the trace (a node's action).
    pub fn note(&mut self, what: &str) {
        self.trace = fnv(self.trace, what.as_bytes());
    }

    /// Observes one change of etcd (all `events` are of one revision, caused by `cause`), at
    /// `now_ms`.
    pub fn observe(&mut self, model: &Model, events: &[Event], cause: Cause, now_ms: u64) {
        self.now_ms = now_ms;
        for e in events {
            self.trace = fnv(self.trace, &e.kv.key);
            self.trace = fnv(self.trace, &e.kv.mod_revision.to_le_bytes());
            self.trace = fnv(self.trace, &[e.event_type as u8]);
            let key = String::from_utf8_lossy(&e.kv.key).into_owned();
            let put = e.event_type == EventType::Put;
            if key == self.keys.current() {
                self.on_current(&e.kv.value, put);
            } else if key == self.keys.closed() {
                if put {
                    if !self.closed {
                        self.closed = true;
                        self.closed_rev = e.kv.mod_revision;
                        self.sealed_through = self.sealed_through.max(self.current);
                    }
                } else {
                    self.on_reopen(model);
                }
            } else if let Some((round, section, name)) = self.keys.parse_round_key(&key) {
                let name = name.to_string();
                match (section, name.as_str(), put) {
                    ("ctl", "final", true) => self.on_final(model, round, e),
                    ("member", node, true) if e.kv.version == 1 => {
                        self.on_join(model, round, node, e.kv.lease)
                    }
                    ("member", node, false) if matches!(cause, Cause::LeaseExpired(_)) => {
                        self.on_lease_expired(round, node)
                    }
                    _ => {}
                }
            }
        }
    }

    /// The `closed` marker was deleted: the run starts again. Only when the closed job's
    /// nodes have all exited (no node acts; every presence record is younger than the close).
    fn on_reopen(&mut self, model: &Model) {
        let was_closed = self.closed;
        self.check(was_closed, || {
            "the closed marker was deleted while the run was not closed".into()
        });
        let acting = self.acting();
        self.check(acting.is_empty(), || {
            format!("the closed run started again while nodes still act on it: {acting:?}")
        });
        let closed_rev = self.closed_rev;
        let prefix = self.keys.agent_prefix();
        let old: Vec<String> = model
            .scan_prefix(prefix.as_bytes())
            .filter(|kv| kv.create_revision <= closed_rev)
            .map(|kv| String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned())
            .collect();
        self.check(old.is_empty(), || {
            format!("the closed run started again while its nodes {old:?} still live")
        });
        self.closed = false;
        self.reopens += 1;
    }

    /// How often the closed run started again.
    pub fn reopens(&self) -> u64 {
        self.reopens
    }

    fn on_current(&mut self, value: &[u8], put: bool) {
        if !put {
            self.check(false, || "the run's current round was deleted".into());
            return;
        }
        let round: u64 = std::str::from_utf8(value)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let before = self.current;
        self.check(round >= before, || {
            format!("current moved backwards from round {before} to {round}")
        });
        self.current = self.current.max(round);
    }

    fn on_final(&mut self, model: &Model, round: u64, e: &Event) {
        let record: FinalRecord = match decode(&e.kv.key, &e.kv.value) {
            Ok(r) => r,
            Err(err) => return self.violate(format!("round {round}: unreadable final: {err}")),
        };
        let closed = self.closed;
        self.check(!closed, || {
            format!("round {round} was finalised after the run was closed")
        });
        let sealed = self.sealed_through;
        self.check(round > sealed, || {
            format!(
                "round {round} was finalised after the run was closed with rounds up to \
                 {sealed} (and started again)"
            )
        });
        if let Some(prev) = self.finals.get(&round) {
            let same = prev.token == record.token;
            self.check(same, || {
                format!("round {round} was finalised twice (two views of one round)")
            });
            return;
        }
        let prefix = self.keys.assign_prefix(round);
        let mut ranks = BTreeMap::new();
        let mut global = BTreeMap::new();
        for kv in model.scan_prefix(prefix.as_bytes()) {
            let Ok(a) = decode::<Assignment>(&kv.key, &kv.value) else {
                continue;
            };
            if a.token == record.token {
                let node = String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned();
                ranks.insert(node.clone(), a.rank);
                global.insert(node, (a.first_global_rank, a.global_world_size));
            }
        }
        self.check_global_ranks(model, round, &ranks, &global);
        let w = record.world_size;
        let mut seen: Vec<usize> = ranks.values().copied().collect();
        seen.sort_unstable();
        let expected: Vec<usize> = (0..w).collect();
        self.check(seen == expected, || {
            format!("round {round}: ranks {seen:?} are not exactly 0..{w} (one node each)")
        });
        let (min, max) = (self.min_nodes, self.max_nodes);
        self.check(min <= w && w <= max, || {
            format!("round {round}: world size {w} outside [{min}, {max}]")
        });
        self.final_times.insert(round, self.now_ms);
        self.finals.insert(
            round,
            RoundTable {
                token: record.token,
                world: w,
                ranks,
                global,
                revision: e.kv.mod_revision,
            },
        );
    }

    /// Global ranks (the members' workers) as torchrun lays them out: in rank order, each
    /// member's `local_world_size` ranks after the previous member's, `0..total` exactly once.
    fn check_global_ranks(
        &mut self,
        model: &Model,
        round: u64,
        ranks: &BTreeMap<String, usize>,
        global: &BTreeMap<String, (Option<u64>, Option<u64>)>,
    ) {
        let mut by_rank: Vec<(usize, &String)> = ranks.iter().map(|(n, r)| (*r, n)).collect();
        by_rank.sort_unstable();
        // (rank, node, first, total, its local world size if its join record is still there:
        // a member that left just before the round completed has a rank but no record).
        let rows: Vec<_> = by_rank
            .into_iter()
            .map(|(rank, node)| {
                let lws = model
                    .get(self.keys.member(round, node).as_bytes())
                    .and_then(|kv| decode::<NodeRecord>(&kv.key, &kv.value).ok())
                    .and_then(|r| r.local_world_size);
                let (first, total) = global.get(node).copied().unwrap_or((None, None));
                (rank, node.clone(), first, total, lws)
            })
            .collect();
        if rows.iter().any(|r| r.2.is_none() || r.3.is_none()) {
            return;
        }
        let totals: BTreeSet<u64> = rows.iter().filter_map(|r| r.3).collect();
        self.check(totals.len() == 1, || {
            format!("round {round}: the members were told different global world sizes {totals:?}")
        });
        let mut next = 0u64;
        // Exact while every member before has a known size; after an unknown one, the first
        // ranks must only increase.
        let mut exact = true;
        for (rank, node, first, _, lws) in &rows {
            let first = first.unwrap_or_default();
            let ok = if exact { first == next } else { first >= next };
            self.check(ok, || {
                format!(
                    "round {round}: rank {rank} ({node}) has first global rank {first}, \
                     expected {next} (the sum of the members' workers before it)"
                )
            });
            match lws {
                Some(lws) => next = first + lws,
                None => {
                    exact = false;
                    next = first + 1;
                }
            }
        }
        let total = totals.iter().next().copied().unwrap_or_default();
        self.check(if exact { total == next } else { total >= next }, || {
            format!("round {round}: global world size {total}, the workers add up to {next}")
        });
    }

    fn on_join(&mut self, model: &Model, round: u64, node: &str, lease: i64) {
        let finalised = self.finals.contains_key(&round);
        self.check(!finalised, || {
            format!("{node} joined round {round} after it was finalised (a ghost round)")
        });
        // Abandoning a round: the node holds a rank in an earlier round that it never
        // learnt, and its record there is still alive under the lease it joins with now (its
        // peers count on it). A record under an older lease is a membership the node knows it
        // lost (its fence), which its peers learn when that lease goes.
        let last_view = self.nodes.get(node).and_then(|t| t.last_view);
        let abandoned: Vec<(u64, usize)> = self
            .finals
            .range(..round)
            .filter(|(r, _)| last_view.is_none_or(|v| v < **r))
            .filter_map(|(r, t)| t.ranks.get(node).map(|rank| (*r, *rank)))
            .filter(|(r, _)| {
                model
                    .get(self.keys.member(*r, node).as_bytes())
                    .is_some_and(|kv| kv.lease == lease)
            })
            .collect();
        for (r, rank) in abandoned {
            self.check(false, || {
                format!(
                    "{node} joined round {round} while it holds rank {rank} in round {r}, \
                     which it never learnt and whose record is still alive (it abandoned its round)"
                )
            });
        }
    }

    /// A node's lease expired, taking its record of `round`: it must not act there any more
    /// (its fence must have stopped it first).
    fn on_lease_expired(&mut self, round: u64, node: &str) {
        let acting = self
            .nodes
            .get(node)
            .is_some_and(|t| !t.gone && t.acting == Some(round));
        self.check(!acting, || {
            format!(
                "{node} still acts in round {round} although its membership record is gone \
                 (it acts on a lost membership)"
            )
        });
    }

    /// A node was told it completed `round` with `rank` of `world`; it acts on it from now.
    pub fn on_view(&mut self, node: &str, round: u64, rank: usize, world: usize) {
        self.note(&format!("view {node} {round} {rank} {world}"));
        self.views += 1;
        let track = self.nodes.entry(node.to_string()).or_default().clone();
        self.check(track.last_view.is_none_or(|v| v < round), || {
            format!(
                "{node} completed round {round} after round {:?} (rounds must increase)",
                track.last_view
            )
        });
        match self.finals.get(&round).cloned() {
            Some(t) => {
                let told = t.ranks.get(node).copied();
                self.check(told == Some(rank) && t.world == world, || {
                    format!(
                        "{node} was told rank {rank} of {world} in round {round}, the table says \
                         {told:?} of {}",
                        t.world
                    )
                });
            }
            None => self.check(false, || {
                format!("{node} completed round {round}, which was never finalised")
            }),
        }
        let t = self.nodes.entry(node.to_string()).or_default();
        t.last_view = Some(round);
        t.acting = Some(round);
    }

    /// A node was told its global ranks (with its view): they must be the table's.
    pub fn on_global_ranks(&mut self, node: &str, round: u64, told: Option<rdzv::GlobalRanks>) {
        let Some(t) = self.finals.get(&round).cloned() else {
            return;
        };
        let table = t.global.get(node).copied().unwrap_or((None, None));
        let expected = match table {
            (Some(first), Some(total)) => Some((first as usize, total as usize)),
            _ => None,
        };
        let got = told.map(|g| (g.first, g.world_size));
        self.check(got == expected, || {
            format!(
                "{node} was told global ranks {got:?} in round {round}, the table says {expected:?}"
            )
        });
    }

    /// A node stopped acting on its round (it re-rendezvouses, leaves, or was told it lost).
    pub fn on_stop(&mut self, node: &str) {
        self.note(&format!("stop {node}"));
        if let Some(t) = self.nodes.get_mut(node) {
            t.acting = None;
        }
    }

    /// A node crashed or exited: it no longer acts.
    pub fn on_gone(&mut self, node: &str) {
        self.note(&format!("gone {node}"));
        let t = self.nodes.entry(node.to_string()).or_default();
        t.gone = true;
        t.acting = None;
    }

    /// The nodes acting now, with their rounds.
    pub fn acting(&self) -> BTreeMap<String, u64> {
        self.nodes
            .iter()
            .filter(|(_, t)| !t.gone)
            .filter_map(|(n, t)| t.acting.map(|r| (n.clone(), r)))
            .collect()
    }

    /// Checks progress at the end of a quiet period: the nodes in `alive` (neither crashed nor
    /// gone) that act are all in the last finalised round, and their number is
    /// `min(alive, max_nodes)` (or none if the run is closed or fewer than `min_nodes` live);
    /// and no round was finalised in the last `stable_ms`.
    pub fn check_settled(&mut self, alive: &BTreeSet<String>, now_ms: u64, stable_ms: u64) {
        self.now_ms = now_ms;
        let acting = self.acting();
        let last = self.finals.iter().next_back().map(|(r, t)| (*r, t.clone()));
        if self.closed {
            let n = acting.len();
            self.check(n == 0, || {
                format!("{n} node(s) still act after the run closed")
            });
            return;
        }
        let want = if alive.len() >= self.min_nodes {
            alive.len().min(self.max_nodes)
        } else {
            0
        };
        let in_last: BTreeSet<&String> = match &last {
            Some((r, _)) => acting
                .iter()
                .filter(|(_, ar)| **ar == *r)
                .map(|(n, _)| n)
                .collect(),
            None => BTreeSet::new(),
        };
        let last_round = last.as_ref().map(|(r, _)| *r);
        self.check(in_last.len() == want && acting.len() == want, || {
            format!(
                "not settled: {} of {} live node(s) act ({acting:?}), {} in the last round \
                 {last_round:?}; expected {want}",
                acting.len(),
                alive.len(),
                in_last.len()
            )
        });
        if let Some((r, _)) = &last {
            let last_final_ms = self.final_times.get(r).copied().unwrap_or(0);
            self.check(now_ms.saturating_sub(last_final_ms) >= stable_ms, || {
                format!(
                    "not stable: round {r} was finalised {} ms before the end of the quiet \
                     period (the job keeps re-forming)",
                    now_ms.saturating_sub(last_final_ms)
                )
            });
        }
    }
}
