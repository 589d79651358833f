//! The view recorder and invariant checker of the chaos tests.
//!
//! A [`View`] is what one node (one `rdzv run` agent, or one `rdzv join` process) saw of one
//! round: its group rank, the world size (in nodes) and the master address. Views come from
//! the example worker's record lines (one file per agent, see [`views_from_worker_records`])
//! and from `rdzv join --json` (see [`view_from_join_json`]). [`check_rounds`] checks every
//! round across nodes, [`check_progress`] checks that the job ended; both return a
//! [`CheckReport`] whose violations name the invariant, the round and the nodes.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One node's view of one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// Which process: `agent3`, `join7`, ...
    pub node: String,
    /// The rendezvous round.
    pub round: u64,
    /// The node's rank in the round (`GROUP_RANK`).
    pub group_rank: usize,
    /// Nodes in the round (`GROUP_WORLD_SIZE`).
    pub world: usize,
    /// `MASTER_ADDR:MASTER_PORT`.
    pub master: String,
    /// Workers of this node that started in this round (1 for a `rdzv join`).
    pub workers_started: usize,
    /// Workers of this node that finished their all-reduce in this round (1 for a returned
    /// `rdzv join`).
    pub workers_done: usize,
}

impl View {
    /// A view with one started and no finished worker (for hand-written views).
    pub fn new(node: &str, round: u64, group_rank: usize, world: usize, master: &str) -> Self {
        Self {
            node: node.to_string(),
            round,
            group_rank,
            world,
            master: master.to_string(),
            workers_started: 1,
            workers_done: 0,
        }
    }

    /// The same view with `done` finished workers.
    pub fn done(mut self, done: usize) -> Self {
        self.workers_done = done;
        self
    }
}

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant (a short stable name, e.g. `unique-ranks`).
    pub invariant: &'static str,
    /// The round concerned, if one.
    pub round: Option<u64>,
    /// The nodes concerned.
    pub nodes: Vec<String>,
    /// What was seen.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]", self.invariant)?;
        if let Some(r) = self.round {
            write!(f, " round {r}")?;
        }
        if !self.nodes.is_empty() {
            write!(f, " nodes {}", self.nodes.join(","))?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What a check saw and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Distinct rounds seen.
    pub rounds: usize,
    /// Views checked.
    pub views: usize,
    /// Individual invariant checks run.
    pub checks: usize,
    /// Broken invariants.
    pub violations: Vec<Violation>,
}

impl CheckReport {
    fn check(&mut self, ok: bool, violation: impl FnOnce() -> Violation) {
        self.checks += 1;
        if !ok {
            self.violations.push(violation());
        }
    }

    /// Adds another report's counts and violations.
    pub fn merge(&mut self, other: CheckReport) {
        self.rounds = self.rounds.max(other.rounds);
        self.views = self.views.max(other.views);
        self.checks += other.checks;
        self.violations.extend(other.violations);
    }

    /// True if no invariant was broken.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// The invariants broken, one per line.
    pub fn describe(&self) -> String {
        self.violations
            .iter()
            .map(|v| format!("  {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Panics with every violation and `context` (which should name the seed) if any.
    pub fn assert_ok(&self, context: &str) {
        assert!(
            self.is_ok(),
            "{} invariant violation(s); {context}\n{}",
            self.violations.len(),
            self.describe()
        );
    }

    /// True if some violation is of `invariant`.
    pub fn has(&self, invariant: &str) -> bool {
        self.violations.iter().any(|v| v.invariant == invariant)
    }
}

/// The value of `key=` in a record line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

fn num<T: std::str::FromStr>(line: &str, key: &str) -> Result<T, String> {
    let v = field(line, key).ok_or_else(|| format!("no {key}= in record line {line:?}"))?;
    v.parse()
        .map_err(|_| format!("{key}={v:?} is not a number in record line {line:?}"))
}

/// Parses the record file of one agent (`node`) whose agent starts `nproc` workers per round.
///
/// Start lines of the same round merge into one view; a `done` line belongs to the view of
/// the last round started before it (an agent stops a round's workers before it starts the
/// next round's). Lines that contradict each other (two workers of one node disagreeing on
/// the group rank, world size or master of a round, a world size that is not a multiple of
/// `nproc`, a `done` line that matches no worker of its round) are returned as violations
/// of the invariant `node-consistency`. An incomplete last line (being written) is ignored.
pub fn views_from_worker_records(
    node: &str,
    text: &str,
    nproc: usize,
) -> (Vec<View>, Vec<Violation>) {
    let mut views: Vec<View> = Vec::new();
    let mut ranks_seen: Vec<BTreeSet<usize>> = Vec::new();
    let mut problems = Vec::new();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let problem = |round: Option<u64>, message: String| Violation {
        invariant: "node-consistency",
        round,
        nodes: vec![node.to_string()],
        message,
    };
    for line in complete.lines().filter(|l| !l.trim().is_empty()) {
        if line.starts_with("done ") {
            let parsed =
                num::<usize>(line, "rank").and_then(|r| Ok((r, num::<usize>(line, "world")?)));
            let (rank, world) = match parsed {
                Ok(v) => v,
                Err(e) => {
                    problems.push(problem(None, e));
                    continue;
                }
            };
            match views.last_mut() {
                Some(v) if v.world * nproc == world && ranks_seen.last().is_some_and(|s| s.contains(&rank)) => {
                    v.workers_done += 1;
                }
                Some(v) => problems.push(problem(
                    Some(v.round),
                    format!(
                        "{line:?} matches no worker of the round it follows (world {} nodes x {nproc}, ranks {:?})",
                        v.world,
                        ranks_seen.last()
                    ),
                )),
                None => problems.push(problem(None, format!("{line:?} before any start line"))),
            }
            continue;
        }
        let parsed = (|| -> Result<(u64, usize, usize, usize, String), String> {
            let round = num::<u64>(line, "round")?;
            let rank = num::<usize>(line, "rank")?;
            let world = num::<usize>(line, "world")?;
            let group_rank = num::<usize>(line, "group_rank")?;
            let master = field(line, "master")
                .ok_or_else(|| format!("no master= in {line:?}"))?
                .to_string();
            Ok((round, rank, world, group_rank, master))
        })();
        let (round, rank, world, group_rank, master) = match parsed {
            Ok(v) => v,
            Err(e) => {
                problems.push(problem(None, e));
                continue;
            }
        };
        if nproc == 0 || world % nproc != 0 {
            problems.push(problem(
                Some(round),
                format!("world {world} is not a multiple of {nproc} workers per node: {line:?}"),
            ));
            continue;
        }
        let nodes = world / nproc;
        match views.last_mut() {
            Some(v) if v.round == round => {
                if v.group_rank != group_rank || v.world != nodes || v.master != master {
                    problems.push(problem(
                        Some(round),
                        format!(
                            "workers of one node disagree: group rank {} / {group_rank}, world {} / {nodes} nodes, master {} / {master}",
                            v.group_rank, v.world, v.master
                        ),
                    ));
                }
                if let Some(seen) = ranks_seen.last_mut() {
                    if !seen.insert(rank) {
                        problems.push(problem(
                            Some(round),
                            format!("global rank {rank} started twice"),
                        ));
                    }
                }
                v.workers_started += 1;
            }
            _ => {
                views.push(View {
                    node: node.to_string(),
                    round,
                    group_rank,
                    world: nodes,
                    master,
                    workers_started: 1,
                    workers_done: 0,
                });
                ranks_seen.push(BTreeSet::from([rank]));
            }
        }
    }
    (views, problems)
}

/// The view of a `rdzv join --json` line printed by `node` (a returned join counts as done).
pub fn view_from_join_json(node: &str, line: &str) -> Result<View, String> {
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .map_err(|e| format!("{node}: not JSON ({e}): {line:?}"))?;
    let n = |key: &str| {
        v[key]
            .as_u64()
            .ok_or_else(|| format!("{node}: no number {key} in {line:?}"))
    };
    let addr = v["master_addr"]
        .as_str()
        .ok_or_else(|| format!("{node}: no master_addr in {line:?}"))?;
    Ok(View {
        node: node.to_string(),
        round: n("round")?,
        group_rank: n("rank")? as usize,
        world: n("world_size")? as usize,
        master: format!("{addr}:{}", n("master_port")?),
        workers_started: 1,
        workers_done: 1,
    })
}

/// The node-count bounds of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// `min_nodes`.
    pub min_nodes: usize,
    /// `max_nodes`.
    pub max_nodes: usize,
}

/// Checks every round across nodes, and every node's sequence of rounds:
///
/// - `unique-ranks`: in a round, no two nodes have the same group rank;
/// - `rank-range`: every group rank is in `0..W`;
/// - `exact-ranks`: a round with at most `W` members and all `W` reporting has exactly the
///   ranks `0..W`; `members-le-world`: no round has more members than `W`;
/// - `agree-world`, `agree-master`: the members of a round agree on `W` and on the master;
/// - `world-bounds`: `min_nodes <= W <= max_nodes`;
/// - `rounds-increase`: each node's rounds strictly increase (in the order it saw them), so a
///   node is in at most one round at a time.
pub fn check_rounds(views: &[View], bounds: Bounds) -> CheckReport {
    let mut report = CheckReport {
        views: views.len(),
        ..Default::default()
    };
    let mut by_round: BTreeMap<u64, Vec<&View>> = BTreeMap::new();
    for v in views {
        by_round.entry(v.round).or_default().push(v);
    }
    report.rounds = by_round.len();
    for (&round, members) in &by_round {
        let names = |vs: &[&View]| vs.iter().map(|v| v.node.clone()).collect::<Vec<_>>();
        let violation = |invariant, vs: &[&View], message: String| Violation {
            invariant,
            round: Some(round),
            nodes: names(vs),
            message,
        };
        let mut by_rank: BTreeMap<usize, Vec<&View>> = BTreeMap::new();
        for v in members {
            by_rank.entry(v.group_rank).or_default().push(v);
        }
        for (rank, holders) in &by_rank {
            report.check(holders.len() == 1, || {
                violation(
                    "unique-ranks",
                    holders,
                    format!("{} nodes have group rank {rank}", holders.len()),
                )
            });
        }
        let worlds: BTreeSet<usize> = members.iter().map(|v| v.world).collect();
        report.check(worlds.len() == 1, || {
            let detail: Vec<String> = members
                .iter()
                .map(|v| format!("{}:W={}", v.node, v.world))
                .collect();
            violation(
                "agree-world",
                members,
                format!("world sizes differ: {}", detail.join(" ")),
            )
        });
        let masters: BTreeSet<&str> = members.iter().map(|v| v.master.as_str()).collect();
        report.check(masters.len() == 1, || {
            let detail: Vec<String> = members
                .iter()
                .map(|v| format!("{}:{}", v.node, v.master))
                .collect();
            violation(
                "agree-master",
                members,
                format!("masters differ: {}", detail.join(" ")),
            )
        });
        for v in members {
            report.check(v.group_rank < v.world, || {
                violation(
                    "rank-range",
                    &[v],
                    format!("group rank {} is not below W={}", v.group_rank, v.world),
                )
            });
            report.check(
                (bounds.min_nodes..=bounds.max_nodes).contains(&v.world),
                || {
                    violation(
                        "world-bounds",
                        &[v],
                        format!(
                            "W={} is outside min_nodes..=max_nodes = {}..={}",
                            v.world, bounds.min_nodes, bounds.max_nodes
                        ),
                    )
                },
            );
        }
        let world = *worlds.iter().next().unwrap_or(&0);
        report.check(members.len() <= world, || {
            violation(
                "members-le-world",
                members,
                format!("{} nodes are in a round of W={world}", members.len()),
            )
        });
        if worlds.len() == 1 && members.len() == world {
            let ranks: Vec<usize> = by_rank.keys().copied().collect();
            report.check(ranks == (0..world).collect::<Vec<_>>(), || {
                violation(
                    "exact-ranks",
                    members,
                    format!("all {world} members reported, ranks {ranks:?} are not 0..{world}"),
                )
            });
        }
    }
    let mut by_node: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for v in views {
        by_node.entry(v.node.as_str()).or_default().push(v.round);
    }
    for (node, rounds) in by_node {
        report.check(rounds.windows(2).all(|w| w[0] < w[1]), || Violation {
            invariant: "rounds-increase",
            round: None,
            nodes: vec![node.to_string()],
            message: format!("rounds in the order seen: {rounds:?}"),
        });
    }
    report
}

/// `round-budget`: at most `budget` distinct rounds. Every round should have a cause (a node
/// lost, left, or waiting); a restart storm (rounds completing back to back with no change of
/// membership, e.g. a livelock) breaks this bound even when the job finishes in the end.
pub fn check_round_budget(views: &[View], budget: usize) -> CheckReport {
    let rounds: BTreeSet<u64> = views.iter().map(|v| v.round).collect();
    let mut report = CheckReport {
        rounds: rounds.len(),
        views: views.len(),
        ..Default::default()
    };
    report.check(rounds.len() <= budget, || Violation {
        invariant: "round-budget",
        round: rounds.iter().next_back().copied(),
        nodes: Vec::new(),
        message: format!(
            "{} rounds seen, more than the budget of {budget} for the faults injected",
            rounds.len()
        ),
    });
    report
}

/// What the end of a job must look like.
#[derive(Debug, Clone, Default)]
pub struct Ending {
    /// Nodes that must have finished (exited 0 / returned) within the bound.
    pub must_finish: Vec<String>,
    /// Nodes that did finish.
    pub finished: Vec<String>,
    /// Workers per node (1 for `rdzv join`).
    pub nproc: usize,
}

/// Checks progress:
///
/// - `survivors-finish`: every node of `must_finish` finished;
/// - for `rdzv run` jobs (every finished node's last view is the job's final round):
///   `one-final-round` (all finished nodes ended in the same round), `final-round-complete`
///   (it has `W` members, all of them finished) and `final-workers-done` (every worker of
///   every member of the final round finished its all-reduce).
///
/// With `jobs_end_together == false` (one-shot `rdzv join`s, each its own ending), only
/// `survivors-finish` and `final-workers-done` apply, per finished node.
pub fn check_progress(views: &[View], ending: &Ending, jobs_end_together: bool) -> CheckReport {
    let mut report = CheckReport {
        views: views.len(),
        ..Default::default()
    };
    let finished: BTreeSet<&str> = ending.finished.iter().map(String::as_str).collect();
    for node in &ending.must_finish {
        report.check(finished.contains(node.as_str()), || Violation {
            invariant: "survivors-finish",
            round: None,
            nodes: vec![node.clone()],
            message: "did not finish within the bound".into(),
        });
    }
    let last_view = |node: &str| views.iter().rev().find(|v| v.node == node);
    let mut final_rounds: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for node in &finished {
        match last_view(node) {
            Some(v) => final_rounds
                .entry(v.round)
                .or_default()
                .push(node.to_string()),
            None => report.check(false, || Violation {
                invariant: "final-workers-done",
                round: None,
                nodes: vec![node.to_string()],
                message: "finished without any recorded round".into(),
            }),
        }
    }
    for node in &finished {
        if let Some(v) = last_view(node) {
            report.check(
                v.workers_done == ending.nproc && v.workers_started == ending.nproc,
                || Violation {
                    invariant: "final-workers-done",
                    round: Some(v.round),
                    nodes: vec![node.to_string()],
                    message: format!(
                        "finished with {} of {} workers started and {} done in its last round",
                        v.workers_started, ending.nproc, v.workers_done
                    ),
                },
            );
        }
    }
    if !jobs_end_together {
        report.rounds = final_rounds.len();
        return report;
    }
    report.check(final_rounds.len() <= 1, || Violation {
        invariant: "one-final-round",
        round: None,
        nodes: finished.iter().map(|s| s.to_string()).collect(),
        message: format!("finished nodes ended in different rounds: {final_rounds:?}"),
    });
    if let Some((&round, _)) = final_rounds.iter().next_back() {
        let members: Vec<&View> = views.iter().filter(|v| v.round == round).collect();
        let world = members.first().map_or(0, |v| v.world);
        let names: Vec<String> = members.iter().map(|v| v.node.clone()).collect();
        report.check(members.len() == world, || Violation {
            invariant: "final-round-complete",
            round: Some(round),
            nodes: names.clone(),
            message: format!(
                "{} of W={world} members recorded the final round",
                members.len()
            ),
        });
        for v in &members {
            report.check(finished.contains(v.node.as_str()), || Violation {
                invariant: "final-round-complete",
                round: Some(round),
                nodes: vec![v.node.clone()],
                message: "a member of the final round did not finish".into(),
            });
        }
        report.rounds = 1;
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Bounds = Bounds {
        min_nodes: 2,
        max_nodes: 3,
    };
    const M: &str = "10.0.0.1:1234";

    fn clean() -> Vec<View> {
        vec![
            View::new("a", 1, 0, 3, M),
            View::new("b", 1, 1, 3, M),
            View::new("c", 1, 2, 3, M),
            View::new("a", 2, 0, 2, "10.0.0.1:99").done(1),
            View::new("b", 2, 1, 2, "10.0.0.1:99").done(1),
        ]
    }

    fn only(report: &CheckReport, invariant: &str) {
        assert!(
            report.has(invariant),
            "expected a {invariant} violation, got:\n{}",
            report.describe()
        );
        assert!(
            report.violations.iter().all(|v| v.invariant == invariant),
            "expected only {invariant}, got:\n{}",
            report.describe()
        );
    }

    #[test]
    fn clean_views_pass_and_are_counted() {
        let report = check_rounds(&clean(), B);
        report.assert_ok("clean views");
        assert_eq!(report.rounds, 2);
        assert_eq!(report.views, 5);
        // Per round: ranks (3 + 2), world, master, per view 2 (5 views), members, exact-ranks;
        // then one per node.
        assert_eq!(report.checks, 5 + 2 * 2 + 5 * 2 + 2 * 2 + 3);
    }

    #[test]
    fn duplicate_ranks_are_caught() {
        let mut v = clean();
        v[1].group_rank = 0;
        let report = check_rounds(&v, B);
        assert!(report.has("unique-ranks"), "{}", report.describe());
        let dup = report
            .violations
            .iter()
            .find(|x| x.invariant == "unique-ranks")
            .unwrap();
        assert_eq!(dup.round, Some(1));
        assert_eq!(dup.nodes, vec!["a".to_string(), "b".to_string()]);
        assert!(
            report.has("exact-ranks"),
            "all 3 reported, ranks are not 0..3"
        );
    }

    #[test]
    fn a_rank_outside_the_world_is_caught() {
        let mut v = clean();
        v.truncate(2);
        v[1].group_rank = 3;
        let report = check_rounds(&v, B);
        only(&report, "rank-range");
        assert!(report.violations[0].to_string().contains("round 1 nodes b"));
    }

    #[test]
    fn missing_ranks_of_a_complete_round_are_caught() {
        // Two members of a round of W=2 with ranks 1 and 2: also out of range.
        let v = vec![View::new("a", 1, 1, 2, M), View::new("b", 1, 2, 2, M)];
        let report = check_rounds(&v, B);
        assert!(report.has("exact-ranks"), "{}", report.describe());
        assert!(report.has("rank-range"), "{}", report.describe());
    }

    #[test]
    fn disagreeing_world_sizes_are_caught() {
        let mut v = clean();
        v[2].world = 2;
        v[2].group_rank = 1;
        let report = check_rounds(&v, B);
        assert!(report.has("agree-world"), "{}", report.describe());
    }

    #[test]
    fn disagreeing_masters_are_caught() {
        let mut v = clean();
        v[4].master = "10.0.0.2:99".into();
        let report = check_rounds(&v, B);
        only(&report, "agree-master");
        assert_eq!(report.violations[0].round, Some(2));
    }

    #[test]
    fn world_sizes_outside_the_bounds_are_caught() {
        let v = vec![View::new("a", 1, 0, 1, M)];
        only(&check_rounds(&v, B), "world-bounds");
        let v: Vec<View> = (0..4)
            .map(|r| View::new(&format!("n{r}"), 1, r, 4, M))
            .collect();
        only(&check_rounds(&v, B), "world-bounds");
    }

    #[test]
    fn more_members_than_the_world_are_caught() {
        let v = vec![
            View::new("a", 1, 0, 2, M),
            View::new("b", 1, 1, 2, M),
            View::new("c", 1, 1, 2, M),
        ];
        let report = check_rounds(&v, B);
        assert!(report.has("members-le-world"), "{}", report.describe());
        assert!(report.has("unique-ranks"), "{}", report.describe());
    }

    #[test]
    fn rounds_going_back_are_caught() {
        let mut v = clean();
        v.push(View::new("a", 1, 0, 3, M));
        let report = check_rounds(&v, B);
        assert!(report.has("rounds-increase"), "{}", report.describe());
        let mut v = clean();
        // The same round twice on one node (two separate views) is not "strictly increasing".
        v.push(View::new("b", 2, 1, 2, "10.0.0.1:99"));
        assert!(check_rounds(&v, B).has("rounds-increase"));
    }

    #[test]
    fn a_restart_storm_breaks_the_round_budget() {
        check_round_budget(&clean(), 2).assert_ok("two rounds, budget two");
        let storm: Vec<View> = (1..=30).map(|r| View::new("a", r, 0, 2, M)).collect();
        let report = check_round_budget(&storm, 10);
        only(&report, "round-budget");
        assert_eq!(report.violations[0].round, Some(30));
    }

    fn ending(must: &[&str], finished: &[&str]) -> Ending {
        Ending {
            must_finish: must.iter().map(|s| s.to_string()).collect(),
            finished: finished.iter().map(|s| s.to_string()).collect(),
            nproc: 1,
        }
    }

    #[test]
    fn a_clean_ending_passes() {
        let report = check_progress(&clean(), &ending(&["a", "b"], &["a", "b"]), true);
        report.assert_ok("clean ending");
        assert!(report.checks >= 6, "{report:?}");
    }

    #[test]
    fn a_survivor_that_did_not_finish_is_caught() {
        let report = check_progress(&clean(), &ending(&["a", "b", "d"], &["a", "b"]), true);
        only(&report, "survivors-finish");
        assert_eq!(report.violations[0].nodes, vec!["d".to_string()]);
    }

    #[test]
    fn an_incomplete_final_round_is_caught() {
        // b is a member of the final round but did not finish.
        let report = check_progress(&clean(), &ending(&["a"], &["a"]), true);
        only(&report, "final-round-complete");
        // The final round misses a member's record.
        let v: Vec<View> = clean()
            .into_iter()
            .filter(|v| v.node != "b" || v.round != 2)
            .collect();
        let report = check_progress(&v, &ending(&["a"], &["a"]), true);
        assert!(report.has("final-round-complete"), "{}", report.describe());
    }

    #[test]
    fn unfinished_workers_are_caught() {
        let mut v = clean();
        v[4].workers_done = 0;
        let report = check_progress(&v, &ending(&["a", "b"], &["a", "b"]), true);
        only(&report, "final-workers-done");
        assert_eq!(report.violations[0].round, Some(2));
    }

    #[test]
    fn finishing_in_different_rounds_is_caught() {
        let mut v = clean();
        v.push(View::new("c", 3, 0, 2, M).done(1));
        let report = check_progress(&v, &ending(&["a", "b", "c"], &["a", "b", "c"]), true);
        assert!(report.has("one-final-round"), "{}", report.describe());
    }

    #[test]
    fn worker_records_become_views() {
        let text = "\
rank=0 world=4 local_rank=0 group_rank=0 restart=0 pid=10 run_id=x master=h:1 round=1
rank=1 world=4 local_rank=1 group_rank=0 restart=0 pid=11 run_id=x master=h:1 round=1
rank=2 world=6 local_rank=0 group_rank=1 restart=0 pid=12 run_id=x master=h:2 round=3
done rank=2 world=6 restart=0
rank=3 world=6 local_rank=1 group_rank=1 restart=0 pid=13 run_id=x master=h:2 round=3
done rank=3 world=6 restart=0
rank=0 world=2 local_rank=0 group_rank=0 restart=0 pid=14 run_id=x master=h:3 round=";
        let (views, problems) = views_from_worker_records("agent0", text, 2);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            views,
            vec![
                View {
                    workers_started: 2,
                    ..View::new("agent0", 1, 0, 2, "h:1")
                },
                View {
                    workers_started: 2,
                    workers_done: 2,
                    ..View::new("agent0", 3, 1, 3, "h:2")
                },
            ],
            "the incomplete last line is ignored"
        );
    }

    #[test]
    fn contradicting_worker_records_are_caught() {
        let text = "\
rank=0 world=4 local_rank=0 group_rank=0 restart=0 pid=10 run_id=x master=h:1 round=1
rank=3 world=4 local_rank=1 group_rank=1 restart=0 pid=11 run_id=x master=h:1 round=1
done rank=2 world=4 restart=0
rank=0 world=3 local_rank=0 group_rank=0 restart=0 pid=12 run_id=x master=h:1 round=2
";
        let (_, problems) = views_from_worker_records("agent0", text, 2);
        let messages: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 3, "{messages:#?}");
        assert!(problems.iter().all(|p| p.invariant == "node-consistency"));
        assert!(messages[0].contains("disagree"), "{messages:#?}");
        assert!(messages[1].contains("matches no worker"), "{messages:#?}");
        assert!(messages[2].contains("not a multiple"), "{messages:#?}");
    }

    #[test]
    fn join_json_becomes_a_view() {
        let line = r#"{"rank":1,"world_size":3,"round":4,"run_id":"r","master_addr":"127.0.0.1","master_port":555,"node_id":"n"}"#;
        let v = view_from_join_json("join2", line).unwrap();
        assert_eq!(v, View::new("join2", 4, 1, 3, "127.0.0.1:555").done(1));
        assert!(view_from_join_json("join2", "{}").is_err());
        assert!(view_from_join_json("join2", "rank=1").is_err());
    }
}
