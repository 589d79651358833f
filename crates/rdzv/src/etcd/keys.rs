//! The key layout of one run in etcd.
//!
//! ```text
//! <prefix>/<run_id>/lease                      run lease id (bound to the run lease)
//! <prefix>/<run_id>/closed                     present once the run is closed
//! <prefix>/<run_id>/agent/<node>               a live node of the run (bound to its lease)
//! <prefix>/<run_id>/current                    number of the open round
//! <prefix>/<run_id>/restarts                   failed rounds of the job (its restart budget)
//! <prefix>/<run_id>/failed/<round>             this round's failure was counted
//! <prefix>/<run_id>/r/<round>/ctl/lastcall     when the open round completes (≥ min joined)
//! <prefix>/<run_id>/r/<round>/ctl/claim        finaliser's claim (large rounds only)
//! <prefix>/<run_id>/r/<round>/ctl/final        the completed round's summary
//! <prefix>/<run_id>/r/<round>/ctl/closed       copy of `closed` for the round's watchers
//! <prefix>/<run_id>/r/<round>/ctl/waiting      some node wants this round to start: members
//!                                              of the previous round re-rendezvous
//! <prefix>/<run_id>/r/<round>/ctl/gate         the round may start (a previous member joined,
//!                                              or the previous round dissolved)
//! <prefix>/<run_id>/r/<round>/ctl/keeper       the newcomer watching the previous round
//! <prefix>/<run_id>/r/<round>/ctl/done         the previous round's job finished
//! <prefix>/<run_id>/r/<round>/member/<node>    a node's join record (bound to its lease)
//! <prefix>/<run_id>/r/<round>/seq              its version counts the round's joins
//! <prefix>/<run_id>/assign/<round>/<node>      a member's rank
//! <prefix>/<run_id>/kv/<round>/<key>           the round's store
//! <prefix>/<run_id>/op/<round>/<id>            outcomes of the store's counter updates
//! ```
//!
//! Round numbers are zero-padded so that keys sort by round: a member of round `r` watches the
//! one range from `r/<r>/member/` to the end of `r/<r+1>/ctl/`, which holds exactly the
//! departures of its peers and the control keys of the next round (someone waits, closed,
//! final) — a constant number of events per member, however many nodes join the next round.

/// Keys of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunKeys {
    base: String,
}

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl RunKeys {
    /// Keys of `run_id` under `prefix` (no trailing `/`).
    pub fn new(prefix: &str, run_id: &str) -> Self {
        Self {
            base: format!("{}/{}", prefix.trim_end_matches('/'), run_id),
        }
    }

    /// `<prefix>/<run_id>/`: every key of the run starts with it.
    pub fn run_prefix(&self) -> String {
        format!("{}/", self.base)
    }

    /// The run lease pointer.
    pub fn lease(&self) -> String {
        format!("{}/lease", self.base)
    }

    /// The closed marker.
    pub fn closed(&self) -> String {
        format!("{}/closed", self.base)
    }

    /// `agent/`: the live nodes of the run (a record each, bound to its lease, from connect
    /// until it leaves or its lease is lost).
    pub fn agent_prefix(&self) -> String {
        format!("{}/agent/", self.base)
    }

    /// A node's presence record.
    pub fn agent(&self, node_id: &str) -> String {
        format!("{}{node_id}", self.agent_prefix())
    }

    /// The open round's number.
    pub fn current(&self) -> String {
        format!("{}/current", self.base)
    }

    /// The job's number of failed rounds.
    pub fn restarts(&self) -> String {
        format!("{}/restarts", self.base)
    }

    /// The marker that round `round`'s failure was counted.
    pub fn failed(&self, round: u64) -> String {
        format!("{}/failed/{round:012}", self.base)
    }

    /// `failed/`: the markers of counted failed rounds.
    pub fn failed_prefix(&self) -> String {
        format!("{}/failed/", self.base)
    }

    /// `r/<round>/`.
    pub fn round_prefix(&self, round: u64) -> String {
        format!("{}/r/{round:012}/", self.base)
    }

    /// `r/<round>/ctl/`.
    pub fn ctl_prefix(&self, round: u64) -> String {
        format!("{}ctl/", self.round_prefix(round))
    }

    /// The last-call marker of a round.
    pub fn lastcall(&self, round: u64) -> String {
        format!("{}lastcall", self.ctl_prefix(round))
    }

    /// The finaliser claim of a round.
    pub fn claim(&self, round: u64) -> String {
        format!("{}claim", self.ctl_prefix(round))
    }

    /// The summary of a completed round.
    pub fn final_key(&self, round: u64) -> String {
        format!("{}final", self.ctl_prefix(round))
    }

    /// The marker of a round's first joiner (members of the previous round watch it).
    pub fn waiting(&self, round: u64) -> String {
        format!("{}waiting", self.ctl_prefix(round))
    }

    /// The gate of a round: present once the round may start.
    pub fn gate(&self, round: u64) -> String {
        format!("{}gate", self.ctl_prefix(round))
    }

    /// The newcomer that watches the previous round's dissolution.
    pub fn keeper(&self, round: u64) -> String {
        format!("{}keeper", self.ctl_prefix(round))
    }

    /// Written in round `round` when the job of round `round - 1` finished (its members stop
    /// watching each other).
    pub fn done(&self, round: u64) -> String {
        format!("{}done", self.ctl_prefix(round))
    }

    /// `op/<round>/`: outcomes of the round store's counter updates.
    pub fn op_prefix(&self, round: u64) -> String {
        format!("{}/op/{round:012}/", self.base)
    }

    /// The closed marker in a round's control keys.
    pub fn round_closed(&self, round: u64) -> String {
        format!("{}closed", self.ctl_prefix(round))
    }

    /// The key whose version counts the joins of a round.
    pub fn join_seq(&self, round: u64) -> String {
        format!("{}seq", self.round_prefix(round))
    }

    /// `r/<round>/member/`.
    pub fn member_prefix(&self, round: u64) -> String {
        format!("{}member/", self.round_prefix(round))
    }

    /// A node's join record in a round.
    pub fn member(&self, round: u64, node_id: &str) -> String {
        format!("{}{node_id}", self.member_prefix(round))
    }

    /// `assign/<round>/`.
    pub fn assign_prefix(&self, round: u64) -> String {
        format!("{}/assign/{round:012}/", self.base)
    }

    /// A member's rank in a round.
    pub fn assign(&self, round: u64, node_id: &str) -> String {
        format!("{}{node_id}", self.assign_prefix(round))
    }

    /// `kv/<round>/`: the round's store.
    pub fn kv_prefix(&self, round: u64) -> String {
        format!("{}/kv/{round:012}/", self.base)
    }

    /// The range a member of `round` watches after completion: its peers' join records and
    /// the next round's control keys. Returns `(start, end)`.
    pub fn membership_range(&self, round: u64) -> (String, Vec<u8>) {
        (
            self.member_prefix(round),
            prefix_end(&self.ctl_prefix(round + 1)),
        )
    }

    /// What a key under `r/` is: `(round, section, name)`, e.g. `(3, "member", "node-a")`.
    pub fn parse_round_key<'a>(&self, key: &'a str) -> Option<(u64, &'a str, &'a str)> {
        let rest = key.strip_prefix(&self.base)?.strip_prefix("/r/")?;
        let (round, rest) = rest.split_once('/')?;
        let (section, name) = rest.split_once('/')?;
        Some((round.parse().ok()?, section, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_consecutive_rounds_sort_by_round() {
        let k = RunKeys::new("/rdzv/", "job");
        assert_eq!(k.member(9, "a"), "/rdzv/job/r/000000000009/member/a");
        assert!(k.member(9, "zzz") < k.member(10, "a"));
        assert!(k.final_key(10) < k.member(10, "a"));
    }

    #[test]
    fn membership_range_covers_own_members_and_next_round_only() {
        let k = RunKeys::new("/p", "job");
        let (start, end) = k.membership_range(4);
        let inside = |key: &str| key >= start.as_str() && key.as_bytes() < end.as_slice();
        assert!(inside(&k.member(4, "n1")));
        assert!(inside(&k.final_key(5)));
        assert!(inside(&k.round_closed(5)));
        assert!(inside(&k.waiting(5)));
        assert!(
            !inside(&k.agent("n1")),
            "presence records cost the members' watches nothing"
        );
        assert!(
            !inside(&k.member(5, "n2")),
            "joins of the next round are not watched one by one"
        );
        assert!(!inside(&k.final_key(4)));
        assert!(!inside(&k.lastcall(4)));
        assert!(!inside(&k.member(6, "n3")));
        assert!(!inside(&k.assign(4, "n1")));
        assert!(!inside(&k.assign(5, "n1")));
        assert!(!inside(&k.kv_prefix(4)));
    }

    #[test]
    fn parse_round_key_round_trips() {
        let k = RunKeys::new("/p", "job");
        assert_eq!(
            k.parse_round_key(&k.member(7, "n-1")),
            Some((7, "member", "n-1"))
        );
        assert_eq!(
            k.parse_round_key(&k.final_key(8)),
            Some((8, "ctl", "final"))
        );
        assert_eq!(k.parse_round_key("/p/other/r/1/member/x"), None);
    }

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
