//! [`Model`]: an in-memory model of etcd v3's MVCC store, pure and synchronous.
//!
//! It keeps what the rendezvous depends on, with etcd's semantics: a global revision bumped
//! once per write transaction; per key its create and mod revisions, version and lease;
//! transactions whose path through nested transactions is decided on the state before any
//! write, whose reads see the writes made earlier in the same transaction, and that are
//! rejected whole (nothing applied) when a put names a missing lease, a key is written twice
//! or a branch has more than `max_txn_ops` operations; leases with TTLs on the caller's clock
//! (milliseconds), raised to etcd's minimum, extended by renewals and by a leader change,
//! revoked at expiry (each expired lease in its own revision); an event history for watches
//! from a past revision; and compaction, after which a watch from before the compaction
//! revision is told it was compacted.
//!
//! Time is passed in by the caller (`now`, in milliseconds), so the model itself has no clock
//! and no randomness: the same calls give the same answers. A differential test
//! (`tests/model_vs_etcd.rs`) replays the same operations on the model and on a real etcd.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rdzv::etcd::api::{
    ApiError, Compare, CompareOp, CompareTarget, DeleteResponse, Event, EventType, GetOptions,
    GetResponse, KeyValue, LeaseGrant, PutResponse, Txn, TxnOp, TxnOpResponse, TxnResponse,
};

/// Limits of the modelled etcd (its command-line flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `--max-txn-ops` (etcd's default: 128).
    pub max_txn_ops: usize,
    /// The shortest lease TTL etcd grants, in seconds (with default election timing etcd
    /// raises shorter TTLs to 2 s).
    pub min_lease_ttl: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_txn_ops: 128,
            min_lease_ttl: 2,
        }
    }
}

#[derive(Debug, Clone)]
struct Lease {
    ttl: i64,
    expires_at: u64,
    keys: BTreeSet<Vec<u8>>,
}

/// The model of one etcd cluster's store (as its clients see it).
#[derive(Debug, Clone)]
pub struct Model {
    limits: Limits,
    revision: i64,
    compact_revision: i64,
    kvs: BTreeMap<Vec<u8>, KeyValue>,
    /// Every event after the compaction revision (and at it), in order.
    history: VecDeque<Event>,
    leases: BTreeMap<i64, Lease>,
    next_lease: i64,
}

impl Default for Model {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

/// Which keys a range covers.
#[derive(Debug, Clone)]
struct Span {
    key: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Span {
    fn new(key: &[u8], end: Option<Vec<u8>>) -> Self {
        Self {
            key: key.to_vec(),
            end,
        }
    }

    fn contains(&self, k: &[u8]) -> bool {
        match &self.end {
            None => k == self.key.as_slice(),
            // `[0]` as the end means "every key from `key` on".
            Some(end) if end.as_slice() == [0] => k >= self.key.as_slice(),
            Some(end) => k >= self.key.as_slice() && k < end.as_slice(),
        }
    }
}

/// Matches a key against a watched range, as a watch would.
pub fn in_range(key: &[u8], start: &[u8], end: Option<&[u8]>) -> bool {
    Span::new(start, end.map(<[u8]>::to_vec)).contains(key)
}

impl Model {
    /// An empty store at revision 1 (as a new etcd).
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            revision: 1,
            compact_revision: 0,
            kvs: BTreeMap::new(),
            history: VecDeque::new(),
            leases: BTreeMap::new(),
            next_lease: 0x694d_0000_0000,
        }
    }

    /// The current revision.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The compaction revision (0: never compacted).
    pub fn compact_revision(&self) -> i64 {
        self.compact_revision
    }

    /// The key-value of `key`, if present.
    pub fn get(&self, key: &[u8]) -> Option<&KeyValue> {
        self.kvs.get(key)
    }

    /// Every key-value whose key starts with `prefix`, in key order.
    pub fn scan_prefix<'a>(&'a self, prefix: &'a [u8]) -> impl Iterator<Item = &'a KeyValue> {
        self.kvs
            .range(prefix.to_vec()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv)
    }

    /// True if lease `id` exists.
    pub fn lease_exists(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    /// Number of live leases.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    fn span_kvs(&self, span: &Span) -> Vec<&KeyValue> {
        match &span.end {
            None => self.kvs.get(&span.key).into_iter().collect(),
            Some(_) => self
                .kvs
                .range(span.key.clone()..)
                .take_while(|(k, _)| span.contains(k))
                .map(|(_, kv)| kv)
                .collect(),
        }
    }

    /// A range read.
    ///
    /// # Errors
    /// None today; a `Result` as every call of the API.
    pub fn range(&self, key: &[u8], options: &GetOptions) -> Result<GetResponse, ApiError> {
        Ok(self.read(key, options))
    }

    fn read(&self, key: &[u8], options: &GetOptions) -> GetResponse {
        let span = Span::new(key, options.range_end(key));
        let found = self.span_kvs(&span);
        let count = found.len() as i64;
        let limit = options.limit();
        // As etcd: `more` says that the limit cut keys out of the answer (never when only
        // the count is asked for).
        let more = !options.count_only() && limit > 0 && count > limit;
        let kvs = if options.count_only() {
            Vec::new()
        } else {
            found
                .into_iter()
                .take(if limit > 0 {
                    limit as usize
                } else {
                    usize::MAX
                })
                .map(|kv| {
                    let mut kv = kv.clone();
                    if options.keys_only() {
                        kv.value.clear();
                    }
                    kv
                })
                .collect()
        };
        GetResponse {
            revision: self.revision,
            kvs,
            count,
            more,
        }
    }

    /// As etcd: on a range, the compare holds for every key present, and an empty range
    /// compares as one absent key.
    fn compare_holds(&self, c: &Compare) -> bool {
        match c.range_end() {
            None => self.compare_kv(c, self.kvs.get(&c.key)),
            Some(end) => {
                let present = self.span_kvs(&Span::new(&c.key, Some(end)));
                if present.is_empty() {
                    return self.compare_kv(c, None);
                }
                present.into_iter().all(|kv| self.compare_kv(c, Some(kv)))
            }
        }
    }

    fn compare_kv(&self, c: &Compare, kv: Option<&KeyValue>) -> bool {
        let ord = |a: i64, b: i64| a.cmp(&b);
        let result = match (&c.target, kv) {
            (CompareTarget::Value(_), None) => return false,
            (CompareTarget::Value(v), Some(kv)) => kv.value.as_slice().cmp(v.as_slice()),
            (CompareTarget::Version(v), kv) => ord(kv.map_or(0, |kv| kv.version), *v),
            (CompareTarget::CreateRevision(v), kv) => {
                ord(kv.map_or(0, |kv| kv.create_revision), *v)
            }
            (CompareTarget::ModRevision(v), kv) => ord(kv.map_or(0, |kv| kv.mod_revision), *v),
            (CompareTarget::Lease(v), kv) => ord(kv.map_or(0, |kv| kv.lease), *v),
        };
        use std::cmp::Ordering::*;
        match c.op {
            CompareOp::Equal => result == Equal,
            CompareOp::NotEqual => result != Equal,
            CompareOp::Greater => result == Greater,
            CompareOp::Less => result == Less,
        }
    }

    /// The branch of `txn` (and of its nested transactions) that runs, decided on the
    /// current state: a tree of booleans in operation order.
    fn path(&self, txn: &Txn) -> Path {
        let succeeded = txn.compare.iter().all(|c| self.compare_holds(c));
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        let nested = ops
            .iter()
            .filter_map(|op| match op {
                TxnOp::Txn(t) => Some(self.path(t)),
                _ => None,
            })
            .collect();
        Path { succeeded, nested }
    }

    /// Checks a branch as etcd's `checkIntervals` does (both branches of nested
    /// transactions, whichever runs): no key put twice, no key both put and deleted. Returns
    /// the branch's puts and deletes.
    fn check_intervals(ops: &[TxnOp]) -> Result<(BTreeSet<Vec<u8>>, Vec<Span>), ApiError> {
        let duplicate = || ApiError::Other("etcdserver: duplicate key given in txn request".into());
        let mut dels: Vec<Span> = ops
            .iter()
            .filter_map(|op| match op {
                TxnOp::Delete { key, options } => Some(Span::new(key, options.range_end(key))),
                _ => None,
            })
            .collect();
        let mut puts: BTreeSet<Vec<u8>> = BTreeSet::new();
        for op in ops {
            let TxnOp::Txn(t) = op else { continue };
            let (then_puts, then_dels) = Self::check_intervals(&t.success)?;
            let (else_puts, else_dels) = Self::check_intervals(&t.failure)?;
            for k in &then_puts {
                if puts.contains(k) || dels.iter().any(|d| d.contains(k)) {
                    return Err(duplicate());
                }
                puts.insert(k.clone());
            }
            for k in &else_puts {
                // A key of both branches is fine: only one of them runs.
                if puts.contains(k) && !then_puts.contains(k) {
                    return Err(duplicate());
                }
                if dels.iter().any(|d| d.contains(k)) {
                    return Err(duplicate());
                }
                puts.insert(k.clone());
            }
            dels.extend(then_dels);
            dels.extend(else_dels);
        }
        for op in ops {
            let TxnOp::Put { key, .. } = op else { continue };
            if puts.contains(key) || dels.iter().any(|d| d.contains(key)) {
                return Err(duplicate());
            }
            puts.insert(key.clone());
        }
        Ok((puts, dels))
    }

    /// Checks a transaction as etcd does before applying anything: sizes and duplicate keys
    /// of both branches, then the leases of the puts on the path that runs.
    fn check(&self, txn: &Txn, path: &Path) -> Result<(), ApiError> {
        self.check_sizes(txn)?;
        Self::check_intervals(&txn.success)?;
        Self::check_intervals(&txn.failure)?;
        self.check_leases(txn, path)
    }

    fn check_sizes(&self, txn: &Txn) -> Result<(), ApiError> {
        let max = self.limits.max_txn_ops;
        if txn.compare.len() > max || txn.success.len() > max || txn.failure.len() > max {
            return Err(ApiError::Other(
                "etcdserver: too many operations in txn request".into(),
            ));
        }
        for op in txn.success.iter().chain(&txn.failure) {
            if let TxnOp::Txn(t) = op {
                self.check_sizes(t)?;
            }
        }
        Ok(())
    }

    fn check_leases(&self, txn: &Txn, path: &Path) -> Result<(), ApiError> {
        let ops = if path.succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        let mut nested = path.nested.iter();
        for op in ops {
            match op {
                TxnOp::Put { options, .. }
                    if options.lease() != 0 && !self.leases.contains_key(&options.lease()) =>
                {
                    return Err(ApiError::LeaseNotFound);
                }
                TxnOp::Txn(t) => {
                    let p = nested.next().expect("a path per nested transaction");
                    self.check_leases(t, p)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Runs a transaction at time `now`; returns its answer and the events it caused (all at
    /// the new revision).
    ///
    /// # Errors
    /// [`ApiError::LeaseNotFound`] if a put names a missing lease, [`ApiError::Other`] for too
    /// many operations or a key written twice; nothing is applied then.
    pub fn txn(&mut self, txn: &Txn) -> Result<(TxnResponse, Vec<Event>), ApiError> {
        let path = self.path(txn);
        self.check(txn, &path)?;
        let mut events = Vec::new();
        let next = self.revision + 1;
        let mut resp = self.apply(txn, &path, next, &mut events);
        if !events.is_empty() {
            self.revision = next;
            self.history.extend(events.iter().cloned());
        }
        set_revision(&mut resp, self.revision);
        Ok((resp, events))
    }

    fn apply(&mut self, txn: &Txn, path: &Path, rev: i64, events: &mut Vec<Event>) -> TxnResponse {
        let ops = if path.succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        let mut nested = path.nested.iter();
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let r = match op {
                TxnOp::Get { key, options } => {
                    // Reads see the writes made earlier in this transaction.
                    TxnOpResponse::Get(self.read(key, options))
                }
                TxnOp::Put {
                    key,
                    value,
                    options,
                } => {
                    let prev = self.put_kv(key, value, options.lease(), rev, events);
                    TxnOpResponse::Put(PutResponse {
                        revision: rev,
                        prev_kv: prev.filter(|_| options.prev_kv()),
                    })
                }
                TxnOp::Delete { key, options } => {
                    let span = Span::new(key, options.range_end(key));
                    let deleted = self.delete_span(&span, rev, events);
                    TxnOpResponse::Delete(DeleteResponse {
                        revision: rev,
                        deleted: deleted.len() as i64,
                        prev_kvs: if options.prev_kv() {
                            deleted
                        } else {
                            Vec::new()
                        },
                    })
                }
                TxnOp::Txn(t) => {
                    let p = nested.next().expect("a path per nested transaction");
                    TxnOpResponse::Txn(self.apply(t, p, rev, events))
                }
            };
            responses.push(r);
        }
        TxnResponse {
            revision: rev,
            succeeded: path.succeeded,
            responses,
        }
    }

    fn put_kv(
        &mut self,
        key: &[u8],
        value: &[u8],
        lease: i64,
        rev: i64,
        events: &mut Vec<Event>,
    ) -> Option<KeyValue> {
        let prev = self.kvs.get(key).cloned();
        if let Some(old) = prev.as_ref().filter(|p| p.lease != 0) {
            if let Some(l) = self.leases.get_mut(&old.lease) {
                l.keys.remove(key);
            }
        }
        if lease != 0 {
            if let Some(l) = self.leases.get_mut(&lease) {
                l.keys.insert(key.to_vec());
            }
        }
        let kv = KeyValue {
            key: key.to_vec(),
            value: value.to_vec(),
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(0, |p| p.version) + 1,
            lease,
        };
        self.kvs.insert(key.to_vec(), kv.clone());
        events.push(Event {
            event_type: EventType::Put,
            kv,
            prev_kv: prev.clone(),
        });
        prev
    }

    fn delete_span(&mut self, span: &Span, rev: i64, events: &mut Vec<Event>) -> Vec<KeyValue> {
        let keys: Vec<Vec<u8>> = self
            .span_kvs(span)
            .into_iter()
            .map(|kv| kv.key.clone())
            .collect();
        keys.into_iter()
            .filter_map(|k| self.delete_key(&k, rev, events))
            .collect()
    }

    fn delete_key(&mut self, key: &[u8], rev: i64, events: &mut Vec<Event>) -> Option<KeyValue> {
        let old = self.kvs.remove(key)?;
        if old.lease != 0 {
            if let Some(l) = self.leases.get_mut(&old.lease) {
                l.keys.remove(key);
            }
        }
        events.push(Event {
            event_type: EventType::Delete,
            kv: KeyValue {
                key: key.to_vec(),
                mod_revision: rev,
                ..KeyValue::default()
            },
            prev_kv: Some(old.clone()),
        });
        Some(old)
    }

    /// Grants a lease of `ttl` seconds at `now` (ms); a TTL below etcd's minimum is raised.
    pub fn lease_grant(&mut self, ttl: i64, now: u64) -> LeaseGrant {
        let ttl = ttl.max(self.limits.min_lease_ttl);
        self.next_lease += 1;
        let id = self.next_lease;
        self.leases.insert(
            id,
            Lease {
                ttl,
                expires_at: now + ttl as u64 * 1000,
                keys: BTreeSet::new(),
            },
        );
        LeaseGrant { id, ttl }
    }

    /// Revokes a lease; returns the events of the deletion of its keys (one revision).
    ///
    /// # Errors
    /// [`ApiError::LeaseNotFound`] if it does not exist.
    pub fn lease_revoke(&mut self, id: i64) -> Result<Vec<Event>, ApiError> {
        let lease = self.leases.remove(&id).ok_or(ApiError::LeaseNotFound)?;
        let mut events = Vec::new();
        let next = self.revision + 1;
        for key in lease.keys {
            self.delete_key(&key, next, &mut events);
        }
        if !events.is_empty() {
            self.revision = next;
            self.history.extend(events.iter().cloned());
        }
        Ok(events)
    }

    /// Renews a lease at `now`; its TTL, or 0 if it does not exist.
    pub fn lease_keep_alive(&mut self, id: i64, now: u64) -> i64 {
        match self.leases.get_mut(&id) {
            Some(l) => {
                l.expires_at = l.expires_at.max(now + l.ttl as u64 * 1000);
                l.ttl
            }
            None => 0,
        }
    }

    /// The remaining TTL of a lease at `now`, in whole seconds (at least 1), if it exists.
    pub fn lease_time_to_live(&self, id: i64, now: u64) -> Option<i64> {
        self.leases
            .get(&id)
            .map(|l| (l.expires_at.saturating_sub(now).div_ceil(1000)).max(1) as i64)
    }

    /// When the next lease expires (ms), if any lease exists.
    pub fn next_expiry(&self) -> Option<u64> {
        self.leases.values().map(|l| l.expires_at).min()
    }

    /// Revokes every lease whose time is up at `now`, each in its own revision; returns the
    /// expired leases with the events of each.
    pub fn expire(&mut self, now: u64) -> Vec<(i64, Vec<Event>)> {
        let due: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires_at <= now)
            .map(|(id, _)| *id)
            .collect();
        due.into_iter()
            .map(|id| (id, self.lease_revoke(id).unwrap_or_default()))
            .collect()
    }

    /// A leader change: etcd's new leader extends every lease by its TTL from `now`.
    pub fn leader_change(&mut self, now: u64) {
        for l in self.leases.values_mut() {
            l.expires_at = l.expires_at.max(now + l.ttl as u64 * 1000);
        }
    }

    /// Compacts the history up to `revision`.
    ///
    /// # Errors
    /// [`ApiError::Compacted`] if it is at or before the last compaction; [`ApiError::Other`]
    /// if it is in the future.
    pub fn compact(&mut self, revision: i64) -> Result<(), ApiError> {
        if revision > self.revision {
            return Err(ApiError::Other(
                "mvcc: required revision is a future revision".into(),
            ));
        }
        if revision <= self.compact_revision {
            return Err(ApiError::Compacted);
        }
        self.compact_revision = revision;
        while self
            .history
            .front()
            .is_some_and(|e| e.kv.mod_revision < revision)
        {
            self.history.pop_front();
        }
        Ok(())
    }

    /// The events in `[start, end)` from revision `from` on, for a watch created now.
    ///
    /// # Errors
    /// [`ApiError::Compacted`] if `from` is before the compaction revision.
    pub fn events_since(
        &self,
        from: i64,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Result<Vec<Event>, ApiError> {
        if from < self.compact_revision {
            return Err(ApiError::Compacted);
        }
        Ok(self
            .history
            .iter()
            .filter(|e| e.kv.mod_revision >= from && in_range(&e.kv.key, start, end))
            .cloned()
            .collect())
    }
}

/// The branch a transaction takes, and those of its nested transactions.
#[derive(Debug)]
struct Path {
    succeeded: bool,
    nested: Vec<Path>,
}

fn set_revision(resp: &mut TxnResponse, revision: i64) {
    resp.revision = revision;
    for r in &mut resp.responses {
        match r {
            TxnOpResponse::Get(_) => {}
            TxnOpResponse::Put(p) => p.revision = revision,
            TxnOpResponse::Delete(d) => d.revision = revision,
            TxnOpResponse::Txn(t) => set_revision(t, revision),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdzv::etcd::api::{DeleteOptions, PutOptions};

    fn put(m: &mut Model, k: &str, v: &str) -> TxnResponse {
        m.txn(&Txn::new().and_then([TxnOp::put(k, v, None)]))
            .unwrap()
            .0
    }

    #[test]
    fn a_write_bumps_the_revision_once_and_versions_count_changes() {
        let mut m = Model::default();
        assert_eq!(put(&mut m, "a", "1").revision, 2);
        assert_eq!(put(&mut m, "a", "2").revision, 3);
        let kv = m.get(b"a").unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
        // A read-only transaction and a delete of nothing do not bump it.
        let (r, ev) = m
            .txn(&Txn::new().and_then([TxnOp::delete("zz", None), TxnOp::get("a", None)]))
            .unwrap();
        assert_eq!((r.revision, ev.len()), (3, 0));
    }

    #[test]
    fn the_path_is_decided_before_any_write_but_reads_see_earlier_writes() {
        let mut m = Model::default();
        let nested = Txn::new()
            .when([Compare::create_revision("k", CompareOp::Equal, 0)])
            .and_then([TxnOp::put("nested", "saw-absent", None)])
            .or_else([TxnOp::put("nested", "saw-present", None)]);
        let (r, _) = m
            .txn(&Txn::new().and_then([
                TxnOp::put("k", "v", None),
                TxnOp::txn(nested),
                TxnOp::get("k", None),
            ]))
            .unwrap();
        assert_eq!(m.get(b"nested").unwrap().value, b"saw-absent");
        assert_eq!(r.get(2).unwrap().kvs[0].value, b"v");
    }

    #[test]
    fn a_put_on_a_missing_lease_applies_nothing() {
        let mut m = Model::default();
        let txn = Txn::new().and_then([
            TxnOp::put("a", "1", None),
            TxnOp::put("b", "1", Some(PutOptions::new().with_lease(42))),
        ]);
        assert_eq!(m.txn(&txn).unwrap_err(), ApiError::LeaseNotFound);
        assert!(m.get(b"a").is_none());
        assert_eq!(m.revision(), 1);
    }

    #[test]
    fn duplicate_keys_and_too_many_ops_are_refused() {
        let mut m = Model::new(Limits {
            max_txn_ops: 2,
            min_lease_ttl: 1,
        });
        let dup = Txn::new().and_then([TxnOp::put("a", "1", None), TxnOp::put("a", "2", None)]);
        assert!(matches!(m.txn(&dup), Err(ApiError::Other(m)) if m.contains("duplicate")));
        let many = Txn::new().and_then((0..3).map(|i| TxnOp::put(format!("k{i}"), "v", None)));
        assert!(matches!(m.txn(&many), Err(ApiError::Other(m)) if m.contains("too many")));
    }

    #[test]
    fn a_key_in_both_branches_of_a_nested_txn_is_fine_across_nested_txns_not() {
        let mut m = Model::default();
        let both = Txn::new()
            .when([Compare::version("k", CompareOp::Equal, 0)])
            .and_then([TxnOp::put("k", "1", None)])
            .or_else([TxnOp::put("k", "2", None)]);
        assert!(m
            .txn(&Txn::new().and_then([TxnOp::txn(both.clone())]))
            .is_ok());
        let twice = Txn::new().and_then([TxnOp::txn(both.clone()), TxnOp::txn(both)]);
        assert!(matches!(m.txn(&twice), Err(ApiError::Other(m)) if m.contains("duplicate")));
        let put_and_delete = Txn::new().and_then([
            TxnOp::put("/a/x", "1", None),
            TxnOp::delete("/a/", Some(DeleteOptions::new().with_prefix())),
        ]);
        assert!(m.txn(&put_and_delete).is_err());
    }

    #[test]
    fn value_compare_on_a_missing_key_is_false_others_compare_with_zero() {
        let m = Model::default();
        assert!(!m.compare_holds(&Compare::value("x", CompareOp::NotEqual, "v")));
        assert!(m.compare_holds(&Compare::version("x", CompareOp::Equal, 0)));
        assert!(m.compare_holds(&Compare::lease("x", CompareOp::Equal, 0)));
    }

    #[test]
    fn leases_expire_on_the_callers_clock_and_take_their_keys() {
        let mut m = Model::default();
        let l = m.lease_grant(1, 0);
        assert_eq!(l.ttl, 2, "raised to the minimum");
        m.txn(&Txn::new().and_then([
            TxnOp::put("a", "1", Some(PutOptions::new().with_lease(l.id))),
            TxnOp::put("b", "1", Some(PutOptions::new().with_lease(l.id))),
        ]))
        .unwrap();
        assert!(m.expire(1_999).is_empty());
        assert_eq!(m.lease_keep_alive(l.id, 1_500), 2);
        assert!(m.expire(3_000).is_empty());
        let expired = m.expire(3_500);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].1.len(), 2, "both keys deleted");
        assert!(expired[0].1.iter().all(|e| e.kv.mod_revision == 3));
        assert!(m.get(b"a").is_none());
        assert_eq!(m.lease_keep_alive(l.id, 4_000), 0);
        assert_eq!(m.lease_revoke(l.id), Err(ApiError::LeaseNotFound));
    }

    #[test]
    fn a_rebound_key_leaves_its_old_lease() {
        let mut m = Model::default();
        let (l1, l2) = (m.lease_grant(5, 0), m.lease_grant(5, 0));
        let bind = |l: i64| {
            Txn::new().and_then([TxnOp::put("k", "v", Some(PutOptions::new().with_lease(l)))])
        };
        m.txn(&bind(l1.id)).unwrap();
        m.txn(&bind(l2.id)).unwrap();
        assert!(m.lease_revoke(l1.id).unwrap().is_empty());
        assert!(m.get(b"k").is_some());
    }

    #[test]
    fn watch_history_respects_ranges_and_compaction() {
        let mut m = Model::default();
        put(&mut m, "/a/1", "x"); // rev 2
        put(&mut m, "/b/1", "x"); // rev 3
        m.txn(&Txn::new().and_then([TxnOp::delete(
            "/a/",
            Some(DeleteOptions::new().with_prefix()),
        )]))
        .unwrap(); // rev 4
        let ev = m.events_since(2, b"/a/", Some(b"/a0")).unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[1].event_type, EventType::Delete);
        assert_eq!(ev[1].kv.mod_revision, 4);
        m.compact(3).unwrap();
        assert_eq!(
            m.events_since(2, b"/", Some(b"0")),
            Err(ApiError::Compacted)
        );
        assert_eq!(m.events_since(3, b"/", Some(b"0")).unwrap().len(), 2);
        assert_eq!(m.compact(3), Err(ApiError::Compacted));
    }

    #[test]
    fn count_limit_and_keys_only() {
        let mut m = Model::default();
        for i in 0..5 {
            put(&mut m, &format!("/p/{i}"), "value");
        }
        let r = m
            .range(
                b"/p/",
                &GetOptions::new()
                    .with_prefix()
                    .with_limit(2)
                    .with_keys_only(),
            )
            .unwrap();
        assert_eq!((r.count, r.kvs.len(), r.more), (5, 2, true));
        assert!(r.kvs[0].value.is_empty());
        let c = m
            .range(b"/p/", &GetOptions::new().with_prefix().with_count_only())
            .unwrap();
        assert_eq!((c.count, c.kvs.len()), (5, 0));
    }
}
