//! Who is in a round and who gets which rank: pure functions, no I/O.
//!
//! - **Selection.** If more than `max_nodes` joined, members of the previous round come first,
//!   then the others in join order; the rest wait for the next round.
//! - **Sticky ranks.** A member of the previous round keeps its rank if it is still below the
//!   new world size (on a conflict, the earlier joiner wins).
//! - **Deterministic order for the rest.** Free ranks are filled, in ascending order, by the
//!   remaining nodes sorted by their `node_rank` hint (nodes without one last), then by host
//!   name in natural order (`node7 < node66`), then by join order.

use std::cmp::Ordering;

/// A node that joined a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Node id.
    pub node_id: String,
    /// Host name.
    pub hostname: String,
    /// Rank-order hint.
    pub node_rank: Option<u64>,
    /// Rank in the previous round.
    pub prev_rank: Option<usize>,
    /// etcd create revision of its join record (join order).
    pub joined: i64,
    /// Its workers, if it said.
    pub local_world_size: Option<u64>,
}

/// The outcome: `ranked[r]` has rank `r`; `waiting` did not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankTable {
    /// Members in rank order.
    pub ranked: Vec<Candidate>,
    /// Nodes beyond `max_nodes`.
    pub waiting: Vec<Candidate>,
}

/// Selects at most `max_nodes` members and assigns ranks.
pub fn assign_ranks(mut candidates: Vec<Candidate>, max_nodes: usize) -> RankTable {
    candidates.sort_by(|a, b| {
        (a.prev_rank.is_none(), a.joined, &a.node_id).cmp(&(
            b.prev_rank.is_none(),
            b.joined,
            &b.node_id,
        ))
    });
    let waiting = if candidates.len() > max_nodes {
        candidates.split_off(max_nodes)
    } else {
        Vec::new()
    };
    let world = candidates.len();
    let mut slots: Vec<Option<Candidate>> = vec![None; world];
    let mut rest = Vec::new();
    // Earlier joiners first, so they win conflicts over a previous rank.
    candidates.sort_by(|a, b| (a.joined, &a.node_id).cmp(&(b.joined, &b.node_id)));
    for c in candidates {
        match c.prev_rank {
            Some(r) if r < world && slots[r].is_none() => slots[r] = Some(c),
            _ => rest.push(c),
        }
    }
    rest.sort_by(|a, b| {
        let hint = |c: &Candidate| c.node_rank.unwrap_or(u64::MAX);
        hint(a)
            .cmp(&hint(b))
            .then_with(|| natural_cmp(&a.hostname, &b.hostname))
            .then_with(|| a.joined.cmp(&b.joined))
            .then_with(|| a.node_id.cmp(&b.node_id))
    });
    let mut rest = rest.into_iter();
    let ranked = slots
        .into_iter()
        .map(|slot| slot.or_else(|| rest.next()))
        .collect::<Option<Vec<_>>>()
        .unwrap_or_default();
    RankTable { ranked, waiting }
}

/// Compares strings so that runs of digits compare as numbers: `node7 < node66 < node100`.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (&a[..da], &b[..db]);
                let strip = |n: &[u8]| {
                    let z = n.iter().take_while(|&&c| c == b'0').count();
                    n[z..].to_vec()
                };
                let (sa, sb) = (strip(na), strip(nb));
                let ord = sa
                    .len()
                    .cmp(&sb.len())
                    .then_with(|| sa.cmp(&sb))
                    .then(da.cmp(&db));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, host: &str, joined: i64) -> Candidate {
        Candidate {
            node_id: id.into(),
            hostname: host.into(),
            node_rank: None,
            prev_rank: None,
            joined,
            local_world_size: None,
        }
    }

    fn ids(t: &RankTable) -> Vec<&str> {
        t.ranked.iter().map(|c| c.node_id.as_str()).collect()
    }

    #[test]
    fn natural_order_puts_node7_before_node66() {
        let mut hosts = vec!["node66", "node7", "node100", "node07x", "alpha", "node8"];
        hosts.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            hosts,
            vec!["alpha", "node7", "node07x", "node8", "node66", "node100"]
        );
    }

    #[test]
    fn first_round_orders_by_host_naturally_not_by_join_order() {
        let t = assign_ranks(
            vec![
                c("a", "node66", 1),
                c("b", "node7", 2),
                c("c", "node100", 3),
            ],
            8,
        );
        assert_eq!(ids(&t), vec!["b", "a", "c"]);
        assert!(t.waiting.is_empty());
    }

    #[test]
    fn node_rank_hint_comes_before_host_name() {
        let mut x = c("x", "zzz", 5);
        x.node_rank = Some(0);
        let t = assign_ranks(vec![c("a", "aaa", 1), x], 8);
        assert_eq!(ids(&t), vec!["x", "a"]);
    }

    #[test]
    fn same_host_falls_back_to_join_order() {
        let t = assign_ranks(vec![c("late", "h", 9), c("early", "h", 3)], 8);
        assert_eq!(ids(&t), vec!["early", "late"]);
    }

    #[test]
    fn survivors_keep_their_ranks_and_newcomers_fill_gaps() {
        let mut s0 = c("s0", "h9", 10);
        s0.prev_rank = Some(0);
        let mut s2 = c("s2", "h1", 11);
        s2.prev_rank = Some(2);
        let n = c("new", "h0", 12);
        let t = assign_ranks(vec![n, s2, s0], 8);
        assert_eq!(ids(&t), vec!["s0", "new", "s2"]);
    }

    #[test]
    fn previous_rank_beyond_new_world_size_is_reassigned() {
        let mut s3 = c("s3", "h3", 1);
        s3.prev_rank = Some(3);
        let mut s0 = c("s0", "h0", 2);
        s0.prev_rank = Some(0);
        let t = assign_ranks(vec![s3, s0], 8);
        assert_eq!(ids(&t), vec!["s0", "s3"]);
    }

    #[test]
    fn conflicting_previous_ranks_go_to_the_earlier_joiner() {
        let mut a = c("a", "h", 5);
        a.prev_rank = Some(0);
        let mut b = c("b", "h", 4);
        b.prev_rank = Some(0);
        let t = assign_ranks(vec![a, b], 8);
        assert_eq!(ids(&t), vec!["b", "a"]);
    }

    #[test]
    fn overflow_prefers_previous_members_then_join_order() {
        let mut old = c("old", "z", 100);
        old.prev_rank = Some(1);
        let t = assign_ranks(
            vec![c("n1", "a", 1), c("n2", "b", 2), old, c("n3", "c", 3)],
            3,
        );
        assert_eq!(t.ranked.len(), 3);
        assert!(ids(&t).contains(&"old"));
        assert_eq!(t.ranked[1].node_id, "old");
        assert_eq!(
            t.waiting
                .iter()
                .map(|c| c.node_id.as_str())
                .collect::<Vec<_>>(),
            vec!["n3"]
        );
    }

    #[test]
    fn ranks_are_a_permutation_for_many_nodes() {
        let cands: Vec<_> = (0..500)
            .map(|i| {
                let mut x = c(
                    &format!("n{i}"),
                    &format!("host{}", (i * 7919) % 500),
                    i as i64,
                );
                if i % 3 == 0 {
                    x.prev_rank = Some((i * 13) % 600);
                }
                x
            })
            .collect();
        let t = assign_ranks(cands, 400);
        assert_eq!(t.ranked.len(), 400);
        assert_eq!(t.waiting.len(), 100);
        let mut seen: Vec<_> = t.ranked.iter().map(|c| c.node_id.clone()).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 400);
    }
}
