//! The KV service: keys and values, ranges, compares and transactions.
//!
//! These are rdzv's own types for the subset of etcd's `etcdserverpb` KV API the protocol
//! uses, with builders named as `etcd-client`'s, so that the same protocol code can run on real
//! etcd ([`super::GrpcEtcd`]) and on the simulator's in-memory model.

/// A key and its value, as etcd stores it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty in a delete event or a keys-only read).
    pub value: Vec<u8>,
    /// The revision of the key's creation (0 in a delete event).
    pub create_revision: i64,
    /// The revision of the key's last change (for a delete event: of the deletion).
    pub mod_revision: i64,
    /// Number of changes since creation (1 on creation; 0 in a delete event).
    pub version: i64,
    /// The lease the key is bound to (0: none).
    pub lease: i64,
}

impl KeyValue {
    /// The key.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The key as UTF-8, if it is.
    ///
    /// # Errors
    /// If the key is not UTF-8.
    pub fn key_str(&self) -> Result<&str, std::str::Utf8Error> {
        std::str::from_utf8(&self.key)
    }

    /// The value.
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// The revision of the key's creation.
    pub fn create_revision(&self) -> i64 {
        self.create_revision
    }

    /// The revision of the key's last change.
    pub fn mod_revision(&self) -> i64 {
        self.mod_revision
    }

    /// Number of changes since creation.
    pub fn version(&self) -> i64 {
        self.version
    }

    /// The lease the key is bound to (0: none).
    pub fn lease(&self) -> i64 {
        self.lease
    }
}

/// A comparison operator of a transaction's compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    /// `==`.
    Equal,
    /// `>`.
    Greater,
    /// `<`.
    Less,
    /// `!=`.
    NotEqual,
}

/// What a compare looks at, and the value it compares with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    /// The key's version (0 if absent).
    Version(i64),
    /// The key's create revision (0 if absent).
    CreateRevision(i64),
    /// The key's mod revision (0 if absent).
    ModRevision(i64),
    /// The key's value (a compare on the value of an absent key is false).
    Value(Vec<u8>),
    /// The key's lease (0 if absent or unbound).
    Lease(i64),
}

/// One condition of a transaction, on one key or (with [`Compare::with_prefix`] or
/// [`Compare::with_range`]) on every key of a range, as etcd evaluates it: the condition
/// holds for every key present, and an empty range compares as one absent key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The key (the start of the range).
    pub key: Vec<u8>,
    /// The operator.
    pub op: CompareOp,
    /// What is compared, with what.
    pub target: CompareTarget,
    range: KeyRange,
}

impl Compare {
    fn new(key: impl Into<Vec<u8>>, op: CompareOp, target: CompareTarget) -> Self {
        Self {
            key: key.into(),
            op,
            target,
            range: KeyRange::default(),
        }
    }

    /// Compares every key that starts with the key.
    pub fn with_prefix(mut self) -> Self {
        self.range.prefix = true;
        self
    }

    /// Compares every key in `[key, end)`.
    pub fn with_range(mut self, end: impl Into<Vec<u8>>) -> Self {
        self.range.end = Some(end.into());
        self
    }

    /// The end of the compared range: `None` for the single key.
    pub fn range_end(&self) -> Option<Vec<u8>> {
        self.range.end(&self.key)
    }

    /// Compares the key's version.
    pub fn version(key: impl Into<Vec<u8>>, op: CompareOp, version: i64) -> Self {
        Self::new(key, op, CompareTarget::Version(version))
    }

    /// Compares the key's create revision (`== 0`: the key is absent).
    pub fn create_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: i64) -> Self {
        Self::new(key, op, CompareTarget::CreateRevision(revision))
    }

    /// Compares the key's mod revision.
    pub fn mod_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: i64) -> Self {
        Self::new(key, op, CompareTarget::ModRevision(revision))
    }

    /// Compares the key's value.
    pub fn value(key: impl Into<Vec<u8>>, op: CompareOp, value: impl Into<Vec<u8>>) -> Self {
        Self::new(key, op, CompareTarget::Value(value.into()))
    }

    /// Compares the key's lease.
    pub fn lease(key: impl Into<Vec<u8>>, op: CompareOp, lease: i64) -> Self {
        Self::new(key, op, CompareTarget::Lease(lease))
    }
}

/// The keys an operation covers besides its key: none, `[key, end)`, or the key's prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyRange {
    end: Option<Vec<u8>>,
    prefix: bool,
}

impl KeyRange {
    /// The range end for `key`, if a range is given.
    fn end(&self, key: &[u8]) -> Option<Vec<u8>> {
        if self.prefix {
            Some(prefix_end_bytes(key))
        } else {
            self.end.clone()
        }
    }
}

/// Options of a range read (a single key unless a range is given).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GetOptions {
    pub(crate) range: KeyRange,
    pub(crate) count_only: bool,
    pub(crate) keys_only: bool,
    pub(crate) limit: i64,
}

impl GetOptions {
    /// A single key.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every key that starts with the given key.
    pub fn with_prefix(mut self) -> Self {
        self.range.prefix = true;
        self
    }

    /// The keys in `[key, end)`.
    pub fn with_range(mut self, end: impl Into<Vec<u8>>) -> Self {
        self.range.end = Some(end.into());
        self
    }

    /// Only the number of keys.
    pub fn with_count_only(mut self) -> Self {
        self.count_only = true;
        self
    }

    /// Keys without values.
    pub fn with_keys_only(mut self) -> Self {
        self.keys_only = true;
        self
    }

    /// At most `limit` keys (0: no limit).
    pub fn with_limit(mut self, limit: i64) -> Self {
        self.limit = limit;
        self
    }

    /// Whether only the count is asked for.
    pub fn count_only(&self) -> bool {
        self.count_only
    }

    /// Whether values are left out.
    pub fn keys_only(&self) -> bool {
        self.keys_only
    }

    /// The limit (0: none).
    pub fn limit(&self) -> i64 {
        self.limit
    }

    /// The end of the range for `key`: `None` for the single key.
    pub fn range_end(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.range.end(key)
    }
}

/// Options of a put.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutOptions {
    pub(crate) lease: i64,
    pub(crate) prev_kv: bool,
}

impl PutOptions {
    /// No lease, no previous value.
    pub fn new() -> Self {
        Self::default()
    }

    /// Binds the key to `lease`.
    pub fn with_lease(mut self, lease: i64) -> Self {
        self.lease = lease;
        self
    }

    /// Returns the previous key-value.
    pub fn with_prev_key(mut self) -> Self {
        self.prev_kv = true;
        self
    }

    /// The lease (0: none).
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// Whether the previous key-value is returned.
    pub fn prev_kv(&self) -> bool {
        self.prev_kv
    }
}

/// Options of a delete (a single key unless a range is given).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteOptions {
    pub(crate) range: KeyRange,
    pub(crate) prev_kv: bool,
}

impl DeleteOptions {
    /// A single key.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every key that starts with the given key.
    pub fn with_prefix(mut self) -> Self {
        self.range.prefix = true;
        self
    }

    /// The keys in `[key, end)`.
    pub fn with_range(mut self, end: impl Into<Vec<u8>>) -> Self {
        self.range.end = Some(end.into());
        self
    }

    /// Returns the deleted key-values.
    pub fn with_prev_key(mut self) -> Self {
        self.prev_kv = true;
        self
    }

    /// Whether the deleted key-values are returned.
    pub fn prev_kv(&self) -> bool {
        self.prev_kv
    }

    /// The end of the range for `key`: `None` for the single key.
    pub fn range_end(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.range.end(key)
    }
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// A range read.
    Get {
        /// The (first) key.
        key: Vec<u8>,
        /// Range and result options.
        options: GetOptions,
    },
    /// A put.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// Lease and result options.
        options: PutOptions,
    },
    /// A delete.
    Delete {
        /// The (first) key.
        key: Vec<u8>,
        /// Range and result options.
        options: DeleteOptions,
    },
    /// A nested transaction (its path is decided with the outer one's, before any write).
    Txn(Txn),
}

impl TxnOp {
    /// A range read.
    pub fn get(key: impl Into<Vec<u8>>, options: Option<GetOptions>) -> Self {
        Self::Get {
            key: key.into(),
            options: options.unwrap_or_default(),
        }
    }

    /// A put.
    pub fn put(
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        options: Option<PutOptions>,
    ) -> Self {
        Self::Put {
            key: key.into(),
            value: value.into(),
            options: options.unwrap_or_default(),
        }
    }

    /// A delete.
    pub fn delete(key: impl Into<Vec<u8>>, options: Option<DeleteOptions>) -> Self {
        Self::Delete {
            key: key.into(),
            options: options.unwrap_or_default(),
        }
    }

    /// A nested transaction.
    pub fn txn(txn: Txn) -> Self {
        Self::Txn(txn)
    }
}

/// A transaction: if every compare holds, the success operations, else the failure ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// The conditions (all must hold).
    pub compare: Vec<Compare>,
    /// Operations if they hold.
    pub success: Vec<TxnOp>,
    /// Operations if they do not.
    pub failure: Vec<TxnOp>,
}

impl Txn {
    /// An empty transaction (no compares: it always succeeds).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds conditions.
    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Self {
        self.compare.extend(compares);
        self
    }

    /// Adds operations run when the conditions hold.
    pub fn and_then(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.success.extend(ops);
        self
    }

    /// Adds operations run when they do not.
    pub fn or_else(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.failure.extend(ops);
        self
    }

    /// Number of operations, nested ones included (what etcd's `--max-txn-ops` limits, per
    /// branch; this counts both branches, an upper bound).
    pub fn op_count(&self) -> usize {
        fn count(ops: &[TxnOp]) -> usize {
            ops.iter()
                .map(|op| match op {
                    TxnOp::Txn(t) => 1 + t.op_count(),
                    _ => 1,
                })
                .sum()
        }
        count(&self.success).max(count(&self.failure))
    }
}

/// The answer to a range read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GetResponse {
    /// The store's revision when read.
    pub revision: i64,
    /// The keys (none if count only).
    pub kvs: Vec<KeyValue>,
    /// Number of keys in the range (whatever the limit).
    pub count: i64,
    /// True if the limit left keys out.
    pub more: bool,
}

impl GetResponse {
    /// The keys.
    pub fn kvs(&self) -> &[KeyValue] {
        &self.kvs
    }

    /// Number of keys in the range.
    pub fn count(&self) -> i64 {
        self.count
    }

    /// The store's revision when read.
    pub fn revision(&self) -> i64 {
        self.revision
    }
}

/// The answer to a put.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutResponse {
    /// The store's revision after the put.
    pub revision: i64,
    /// The previous key-value, if asked for and the key existed.
    pub prev_kv: Option<KeyValue>,
}

impl PutResponse {
    /// The previous key-value, if asked for and the key existed.
    pub fn prev_key(&self) -> Option<&KeyValue> {
        self.prev_kv.as_ref()
    }
}

/// The answer to a delete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteResponse {
    /// The store's revision after the delete.
    pub revision: i64,
    /// Number of keys deleted.
    pub deleted: i64,
    /// The deleted key-values, if asked for.
    pub prev_kvs: Vec<KeyValue>,
}

impl DeleteResponse {
    /// Number of keys deleted.
    pub fn deleted(&self) -> i64 {
        self.deleted
    }
}

/// The answer to one operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOpResponse {
    /// To a range read.
    Get(GetResponse),
    /// To a put.
    Put(PutResponse),
    /// To a delete.
    Delete(DeleteResponse),
    /// To a nested transaction.
    Txn(TxnResponse),
}

/// The answer to a transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxnResponse {
    /// The store's revision after the transaction.
    pub revision: i64,
    /// Whether the compares held.
    pub succeeded: bool,
    /// One answer per operation of the branch that ran.
    pub responses: Vec<TxnOpResponse>,
}

impl TxnResponse {
    /// Whether the compares held.
    pub fn succeeded(&self) -> bool {
        self.succeeded
    }

    /// The store's revision after the transaction.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The answers, one per operation of the branch that ran.
    pub fn op_responses(&self) -> &[TxnOpResponse] {
        &self.responses
    }

    /// The answer of operation `index` if it was a read.
    pub fn get(&self, index: usize) -> Option<&GetResponse> {
        match self.responses.get(index) {
            Some(TxnOpResponse::Get(g)) => Some(g),
            _ => None,
        }
    }

    /// The answer of operation `index` if it was a put.
    pub fn put(&self, index: usize) -> Option<&PutResponse> {
        match self.responses.get(index) {
            Some(TxnOpResponse::Put(p)) => Some(p),
            _ => None,
        }
    }

    /// The answer of operation `index` if it was a nested transaction.
    pub fn txn(&self, index: usize) -> Option<&TxnResponse> {
        match self.responses.get(index) {
            Some(TxnOpResponse::Txn(t)) => Some(t),
            _ => None,
        }
    }
}

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix;
/// `[0]`, meaning "to the end", if there is none).
pub fn prefix_end_bytes(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
