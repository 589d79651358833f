//! [`GrpcEtcd`]: the [`EtcdApi`] on a real etcd cluster through `etcd-client`, with failover.
//!
//! # Failover
//! One connection per endpoint; each request goes to the current one. A request that never
//! reached a server (connection refused or reset) is sent to the next endpoint at once, and
//! that one becomes current; a server-side "unavailable" (no leader, timed out) or no answer
//! within the request timeout also moves to the next endpoint, but is returned to the caller
//! as [`ApiError::Unavailable`] (the request may have been applied), who decides whether the
//! operation is safe to retry. (A single balanced channel over all endpoints keeps routing
//! some requests to a dead member.)
//!
//! A connection is made on first use ([`GrpcEtcd::lazy`]), inside the request's time bound,
//! and made again on the next use if it failed: a member that is down or a black hole when a
//! node starts is skipped and used once it is back. A lease renewal that the caller gives up
//! on (a hung member) also moves to the next endpoint, so the next renewal goes elsewhere.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client as ec;

use super::{
    ApiError, Compare, CompareOp, CompareTarget, DeleteResponse, EtcdApi, Event, EventType,
    GetOptions, GetResponse, KeyValue, LeaseGrant, PutResponse, Txn, TxnOp, TxnOpResponse,
    TxnResponse, WatchOptions, WatchResponse, WatchStream,
};

/// The default bound on one request (a member cut off from its leader otherwise holds a
/// request for etcd's own timeout, 5 s plus two election timeouts).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest answer (range, transaction, watch message) accepted: 2 GiB, as etcd's own Go
/// client (`MaxCallRecvMsgSize`). tonic's default, 4 MiB, is the join records of a round of
/// about 16,000 nodes.
pub const MAX_ANSWER_BYTES: usize = i32::MAX as usize;

/// An open keep-alive stream of one lease, on one endpoint.
struct KeepAlive {
    endpoint: usize,
    keeper: ec::LeaseKeeper,
    stream: ec::LeaseKeepAliveStream,
}

/// The keep-alive stream of one lease, if open.
type KeepAliveSlot = Arc<tokio::sync::Mutex<Option<KeepAlive>>>;

/// One endpoint of the cluster: its URL and, once connected, its client.
struct Member {
    url: String,
    client: tokio::sync::OnceCell<ec::Client>,
}

/// A real etcd cluster: one `etcd-client` connection per endpoint, with failover.
#[derive(Clone)]
pub struct GrpcEtcd {
    members: Arc<Vec<Member>>,
    connect_options: Option<ec::ConnectOptions>,
    current: Arc<AtomicUsize>,
    request_timeout: Duration,
    keep_alives: Arc<std::sync::Mutex<HashMap<i64, KeepAliveSlot>>>,
}

impl std::fmt::Debug for GrpcEtcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcEtcd")
            .field(
                "endpoints",
                &self
                    .members
                    .iter()
                    .map(|m| m.url.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("current", &self.current.load(Ordering::Relaxed))
            .finish()
    }
}

impl GrpcEtcd {
    /// One connected client per endpoint (in the order failover tries them).
    pub fn new(clients: Vec<ec::Client>) -> Self {
        let members = clients
            .into_iter()
            .enumerate()
            .map(|(i, c)| Member {
                url: format!("endpoint #{i}"),
                client: tokio::sync::OnceCell::new_with(Some(c)),
            })
            .collect();
        Self::with_members(members, None)
    }

    /// One client per endpoint URL (in the order failover tries them), each connected on first
    /// use with `options` and, if that fails, again on the next use: an endpoint that is down
    /// (or a black hole) when the node starts costs nothing but the bounded first attempt,
    /// and is used once it is back.
    pub fn lazy(urls: Vec<String>, options: ec::ConnectOptions) -> Self {
        let members = urls
            .into_iter()
            .map(|url| Member {
                url,
                client: tokio::sync::OnceCell::new(),
            })
            .collect();
        Self::with_members(members, Some(options))
    }

    fn with_members(members: Vec<Member>, connect_options: Option<ec::ConnectOptions>) -> Self {
        Self {
            members: Arc::new(members),
            connect_options,
            current: Arc::new(AtomicUsize::new(0)),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            keep_alives: Arc::default(),
        }
    }

    /// Bounds every request (not the life of a watch stream) by `timeout`.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The bound on one request.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The number of endpoints.
    pub fn endpoint_count(&self) -> usize {
        self.members.len()
    }

    /// The URL of endpoint `index` (as given to [`GrpcEtcd::lazy`]).
    pub fn endpoint_url(&self, index: usize) -> Option<&str> {
        self.members.get(index).map(|m| m.url.as_str())
    }

    /// Makes endpoint `index` the one requests go to first.
    pub fn prefer(&self, index: usize) {
        if index < self.members.len() {
            self.current.store(index, Ordering::Relaxed);
        }
    }

    /// The client of endpoint `index`, connecting it if needed.
    async fn client(&self, index: usize) -> Result<ec::Client, ApiError> {
        let member = &self.members[index];
        member
            .client
            .get_or_try_init(|| async {
                let options = self.connect_options.clone();
                ec::Client::connect([member.url.as_str()], options)
                    .await
                    .map_err(map_error)
            })
            .await
            .cloned()
    }

    /// Asks endpoint `index` alone (no failover) for the number of keys at `key`, within the
    /// request timeout: does this member answer, with a leader, and accept our credentials?
    ///
    /// # Errors
    /// The member's [`ApiError`]; [`ApiError::Unavailable`] if it does not answer in time.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn probe(&self, index: usize, key: &[u8]) -> Result<(), ApiError> {
        if index >= self.members.len() {
            return Err(ApiError::NotReached(format!("no endpoint #{index}")));
        }
        let attempt = async {
            let mut client = self.client(index).await?;
            client
                .get(key, Some(ec::GetOptions::new().with_count_only()))
                .await
                .map_err(map_error)?;
            Ok(())
        };
        match tokio::time::timeout(self.request_timeout, attempt).await {
            Ok(answer) => answer,
            Err(_) => Err(ApiError::Unavailable(format!(
                "no answer within {:?}",
                self.request_timeout
            ))),
        }
    }

    fn advance_from(&self, idx: usize) {
        let n = self.members.len();
        if n > 1 {
            self.current.store((idx + 1) % n, Ordering::Relaxed);
        }
    }

    /// Sends one request, failing over as the module docs say.
    async fn call<T, F, Fut>(&self, op: F) -> Result<(T, usize), ApiError>
    where
        F: Fn(ec::Client) -> Fut,
        Fut: Future<Output = Result<T, ec::Error>>,
    {
        let n = self.members.len();
        if n == 0 {
            return Err(ApiError::NotReached("no etcd endpoint".into()));
        }
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            let attempt = async {
                let client = self.client(idx).await?;
                op(client).await.map_err(map_error)
            };
            let answer = match tokio::time::timeout(self.request_timeout, attempt).await {
                Ok(answer) => answer,
                Err(_) => {
                    self.advance_from(idx);
                    return Err(ApiError::Unavailable(format!(
                        "no answer within {:?}",
                        self.request_timeout
                    )));
                }
            };
            match answer {
                Ok(v) => {
                    if i > 0 {
                        self.current.store(idx, Ordering::Relaxed);
                    }
                    return Ok((v, idx));
                }
                Err(e) => match e {
                    ApiError::NotReached(_) if n > 1 => {
                        tracing::debug!(endpoint = idx, error = %e, "endpoint unreachable; trying the next");
                        last = Some(e);
                    }
                    ApiError::Unavailable(_) => {
                        self.advance_from(idx);
                        return Err(e);
                    }
                    e => return Err(e),
                },
            }
        }
        self.advance_from(start);
        Err(last.unwrap_or_else(|| ApiError::NotReached("no etcd endpoint answered".into())))
    }

    /// The keep-alive slot of a lease.
    fn keep_alive_slot(&self, id: i64) -> KeepAliveSlot {
        let mut map = self
            .keep_alives
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(id).or_default().clone()
    }

    fn forget_keep_alive(&self, id: i64) {
        self.keep_alives
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
    }
}

/// Maps an `etcd-client` error to an [`ApiError`].
pub(crate) fn map_error(err: ec::Error) -> ApiError {
    use ec::Error as E;
    match &err {
        E::GRpcStatus(status) => {
            let code = status.code() as i32;
            let msg = status.message().to_string();
            if matches!(code, code::UNAUTHENTICATED | code::PERMISSION_DENIED) {
                return ApiError::Unauthorized(msg);
            }
            if msg.contains("requested lease not found") {
                return ApiError::LeaseNotFound;
            }
            if msg.contains("required revision has been compacted") {
                return ApiError::Compacted;
            }
            if msg.contains("too many requests") {
                return ApiError::Overloaded(msg);
            }
            // tonic reports a connection that failed under a request as `transport error`,
            // and a refused connection as `Unavailable` without etcd's `etcdserver:` prefix.
            if msg.starts_with("transport error")
                || (code == code::UNAVAILABLE && !msg.starts_with("etcdserver:"))
            {
                return ApiError::NotReached(msg);
            }
            if matches!(
                code,
                code::UNAVAILABLE | code::DEADLINE_EXCEEDED | code::CANCELLED | code::ABORTED
            ) || msg.contains("leader")
                || msg.contains("timed out")
            {
                return ApiError::Unavailable(msg);
            }
            ApiError::Other(msg)
        }
        E::TransportError(_) | E::IoError(_) => ApiError::NotReached(err.to_string()),
        E::LeaseKeepAliveError(m) if m.contains("not found") => ApiError::LeaseNotFound,
        E::LeaseKeepAliveError(_) | E::WatchError(_) => ApiError::Unavailable(err.to_string()),
        _ => ApiError::Other(err.to_string()),
    }
}

/// gRPC status codes (stable numbers of the gRPC spec; no direct dependency on tonic).
mod code {
    pub const CANCELLED: i32 = 1;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const ABORTED: i32 = 10;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}

fn to_compare(c: &Compare) -> ec::Compare {
    let op = match c.op {
        CompareOp::Equal => ec::CompareOp::Equal,
        CompareOp::Greater => ec::CompareOp::Greater,
        CompareOp::Less => ec::CompareOp::Less,
        CompareOp::NotEqual => ec::CompareOp::NotEqual,
    };
    let key = c.key.clone();
    let compare = match &c.target {
        CompareTarget::Version(v) => ec::Compare::version(key, op, *v),
        CompareTarget::CreateRevision(r) => ec::Compare::create_revision(key, op, *r),
        CompareTarget::ModRevision(r) => ec::Compare::mod_revision(key, op, *r),
        CompareTarget::Value(v) => ec::Compare::value(key, op, v.clone()),
        CompareTarget::Lease(l) => ec::Compare::lease(key, op, *l),
    };
    match c.range_end() {
        Some(end) => compare.with_range(end),
        None => compare,
    }
}

fn to_get_options(key: &[u8], o: &GetOptions) -> ec::GetOptions {
    let mut g = ec::GetOptions::new();
    if let Some(end) = o.range_end(key) {
        g = g.with_range(end);
    }
    if o.count_only {
        g = g.with_count_only();
    }
    if o.keys_only {
        g = g.with_keys_only();
    }
    if o.limit > 0 {
        g = g.with_limit(o.limit);
    }
    g
}

fn to_txn(t: &Txn) -> ec::Txn {
    let ops = |ops: &[TxnOp]| ops.iter().map(to_op).collect::<Vec<_>>();
    ec::Txn::new()
        .when(t.compare.iter().map(to_compare).collect::<Vec<_>>())
        .and_then(ops(&t.success))
        .or_else(ops(&t.failure))
}

fn to_op(op: &TxnOp) -> ec::TxnOp {
    match op {
        TxnOp::Get { key, options } => {
            ec::TxnOp::get(key.clone(), Some(to_get_options(key, options)))
        }
        TxnOp::Put {
            key,
            value,
            options,
        } => {
            let mut p = ec::PutOptions::new();
            if options.lease != 0 {
                p = p.with_lease(options.lease);
            }
            if options.prev_kv {
                p = p.with_prev_key();
            }
            ec::TxnOp::put(key.clone(), value.clone(), Some(p))
        }
        TxnOp::Delete { key, options } => {
            let mut d = ec::DeleteOptions::new();
            if let Some(end) = options.range_end(key) {
                d = d.with_range(end);
            }
            if options.prev_kv {
                d = d.with_prev_key();
            }
            ec::TxnOp::delete(key.clone(), Some(d))
        }
        TxnOp::Txn(t) => ec::TxnOp::txn(to_txn(t)),
    }
}

fn from_kv(kv: &ec::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    }
}

fn header_revision(h: Option<&ec::ResponseHeader>) -> i64 {
    h.map(|h| h.revision()).unwrap_or(0)
}

fn from_get(g: &ec::GetResponse) -> GetResponse {
    GetResponse {
        revision: header_revision(g.header()),
        kvs: g.kvs().iter().map(from_kv).collect(),
        count: g.count(),
        more: g.more(),
    }
}

fn from_txn(t: &ec::TxnResponse) -> TxnResponse {
    from_txn_at(t, 0)
}

/// A transaction's answer; a nested one has no header and takes its outer one's revision.
fn from_txn_at(t: &ec::TxnResponse, outer_revision: i64) -> TxnResponse {
    let revision = header_revision(t.header()).max(outer_revision);
    TxnResponse {
        revision,
        succeeded: t.succeeded(),
        responses: t
            .op_responses()
            .iter()
            .map(|r| match r {
                ec::TxnOpResponse::Get(g) => {
                    let mut g = from_get(g);
                    g.revision = g.revision.max(revision);
                    TxnOpResponse::Get(g)
                }
                ec::TxnOpResponse::Put(p) => TxnOpResponse::Put(PutResponse {
                    revision: header_revision(p.header()).max(revision),
                    prev_kv: p.prev_key().map(from_kv),
                }),
                ec::TxnOpResponse::Delete(d) => TxnOpResponse::Delete(DeleteResponse {
                    revision: header_revision(d.header()).max(revision),
                    deleted: d.deleted(),
                    prev_kvs: d.prev_kvs().iter().map(from_kv).collect(),
                }),
                ec::TxnOpResponse::Txn(t) => TxnOpResponse::Txn(from_txn_at(t, revision)),
            })
            .collect(),
    }
}

fn from_watch(w: &ec::WatchResponse) -> WatchResponse {
    WatchResponse {
        revision: header_revision(w.header()),
        events: w
            .events()
            .iter()
            .filter_map(|e| {
                Some(Event {
                    event_type: match e.event_type() {
                        ec::EventType::Put => EventType::Put,
                        ec::EventType::Delete => EventType::Delete,
                    },
                    kv: from_kv(e.kv()?),
                    prev_kv: e.prev_kv().map(from_kv),
                })
            })
            .collect(),
        compact_revision: w.compact_revision(),
        canceled: w.canceled(),
        cancel_reason: w.cancel_reason().to_string(),
    }
}

/// Moves to the next endpoint if dropped while armed (the request was cancelled).
struct FailOverOnDrop<'a> {
    etcd: &'a GrpcEtcd,
    endpoint: usize,
    armed: bool,
}

impl Drop for FailOverOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.etcd.advance_from(self.endpoint);
        }
    }
}

/// A watch stream of `etcd-client`, on one endpoint, that notices when that member hangs.
///
/// A stream silent for [`GrpcWatch::idle`] sends a progress request, which a live member
/// answers at once (with an empty response, or with the events it had); without an answer
/// within the request timeout the stream is given up as [`ApiError::Unavailable`] and the
/// next endpoint becomes current, where the caller re-opens it.
struct GrpcWatch {
    stream: ec::WatchStream,
    etcd: GrpcEtcd,
    endpoint: usize,
}

impl std::fmt::Debug for GrpcWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcWatch")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl GrpcWatch {
    /// How long a stream may stay silent before it is asked for progress: two request
    /// timeouts (a progress request per idle watch and period is cheap for etcd, but not free
    /// at thousands of nodes).
    fn idle(&self) -> Duration {
        self.etcd.request_timeout * 2
    }

    fn give_up(&self, why: String) -> ApiError {
        tracing::debug!(endpoint = self.endpoint, "{why}; failing over");
        self.etcd.advance_from(self.endpoint);
        ApiError::Unavailable(why)
    }
}

fn from_message(
    answer: Result<Option<ec::WatchResponse>, ec::Error>,
) -> Result<Option<WatchResponse>, ApiError> {
    match answer {
        Ok(Some(w)) => Ok(Some(from_watch(&w))),
        Ok(None) => Ok(None),
        Err(e) => Err(map_error(e)),
    }
}

#[async_trait]
impl WatchStream for GrpcWatch {
    async fn message(&mut self) -> Result<Option<WatchResponse>, ApiError> {
        if let Ok(answer) = tokio::time::timeout(self.idle(), self.stream.message()).await {
            return from_message(answer);
        }
        if let Err(e) = self.stream.request_progress().await {
            return Err(self.give_up(format!("cannot ask a silent watch for progress: {e}")));
        }
        match tokio::time::timeout(self.etcd.request_timeout, self.stream.message()).await {
            Ok(answer) => from_message(answer),
            Err(_) => Err(self.give_up(format!(
                "a silent watch stream did not answer a progress request within {:?}",
                self.etcd.request_timeout
            ))),
        }
    }

    async fn add_watch(&mut self, key: Vec<u8>, options: WatchOptions) -> Result<(), ApiError> {
        self.stream
            .watch(key, Some(to_watch_options(&options)))
            .await
            .map_err(map_error)
    }
}

#[async_trait]
impl EtcdApi for GrpcEtcd {
    async fn range(&self, key: Vec<u8>, options: GetOptions) -> Result<GetResponse, ApiError> {
        let opts = to_get_options(&key, &options);
        let (resp, _) = self
            .call(|c| {
                let (key, opts) = (key.clone(), opts.clone());
                async move {
                    c.kv_client()
                        .max_decoding_message_size(MAX_ANSWER_BYTES)
                        .get(key, Some(opts))
                        .await
                }
            })
            .await?;
        Ok(from_get(&resp))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, ApiError> {
        let txn = to_txn(&txn);
        let (resp, _) = self
            .call(|c| {
                let txn = txn.clone();
                async move {
                    c.kv_client()
                        .max_decoding_message_size(MAX_ANSWER_BYTES)
                        .txn(txn)
                        .await
                }
            })
            .await?;
        Ok(from_txn(&resp))
    }

    async fn lease_grant(&self, ttl: i64) -> Result<LeaseGrant, ApiError> {
        let (resp, _) = self
            .call(|mut c| async move { c.lease_grant(ttl, None).await })
            .await?;
        Ok(LeaseGrant {
            id: resp.id(),
            ttl: resp.ttl(),
        })
    }

    async fn lease_revoke(&self, id: i64) -> Result<(), ApiError> {
        self.forget_keep_alive(id);
        self.call(|mut c| async move { c.lease_revoke(id).await })
            .await?;
        Ok(())
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<i64, ApiError> {
        let slot = self.keep_alive_slot(id);
        let mut slot = slot.lock().await;
        let current = self.current.load(Ordering::Relaxed) % self.members.len().max(1);
        // A renewal cancelled by the caller (it took too long: a hung member) fails over.
        let mut guard = FailOverOnDrop {
            etcd: self,
            endpoint: current,
            armed: true,
        };
        if let Some(mut ka) = slot.take().filter(|ka| ka.endpoint == current) {
            let renewal = async {
                ka.keeper.keep_alive().await.map_err(map_error)?;
                match ka.stream.message().await {
                    Ok(Some(resp)) => Ok(resp.ttl().max(0)),
                    Ok(None) => Err(ApiError::Unavailable("keep-alive stream ended".into())),
                    Err(e) => Err(map_error(e)),
                }
            };
            let answer = tokio::time::timeout(self.request_timeout, renewal).await;
            guard.armed = false;
            return match answer {
                Ok(Ok(ttl)) => {
                    *slot = Some(ka);
                    Ok(ttl)
                }
                Ok(Err(e)) => {
                    if matches!(e, ApiError::Unavailable(_) | ApiError::NotReached(_)) {
                        self.advance_from(current);
                    }
                    Err(e)
                }
                Err(_) => {
                    self.advance_from(current);
                    Err(ApiError::Unavailable(format!(
                        "no keep-alive answer within {:?}",
                        self.request_timeout
                    )))
                }
            };
        }
        // Opening the stream sends one renewal and reads its answer.
        let opened = self
            .call(|c| async move { c.lease_client().keep_alive(id).await })
            .await;
        guard.armed = false;
        match opened {
            Ok(((keeper, stream), endpoint)) => {
                *slot = Some(KeepAlive {
                    endpoint,
                    keeper,
                    stream,
                });
                // The first answer was positive (etcd-client checks it); its TTL is not kept.
                Ok(1)
            }
            Err(ApiError::LeaseNotFound) => Ok(0),
            Err(e) => Err(e),
        }
    }

    async fn lease_time_to_live(&self, id: i64) -> Result<Option<i64>, ApiError> {
        let (resp, _) = self
            .call(|mut c| async move { c.lease_time_to_live(id, None).await })
            .await?;
        Ok((resp.ttl() > 0).then_some(resp.ttl()))
    }

    async fn watch(
        &self,
        key: Vec<u8>,
        options: WatchOptions,
    ) -> Result<(Box<dyn WatchStream>, i64), ApiError> {
        let opts = to_watch_options(&options);
        let ((stream, created), endpoint) = self
            .call(|c| {
                let (key, opts) = (key.clone(), opts.clone());
                async move {
                    let mut stream = c
                        .watch_client()
                        .max_decoding_message_size(MAX_ANSWER_BYTES)
                        .watch(key, Some(opts))
                        .await?;
                    // The first message confirms the creation, with the revision it was
                    // created at.
                    let created = stream.message().await?.ok_or_else(|| {
                        ec::Error::WatchError("stream ended before it was created".into())
                    })?;
                    Ok((stream, created))
                }
            })
            .await?;
        let revision = header_revision(created.header());
        let mut first = from_watch(&created);
        if first.canceled && first.compact_revision == 0 {
            return Err(ApiError::Other(format!(
                "watch refused: {}",
                first.cancel_reason
            )));
        }
        let stream = GrpcWatch {
            stream,
            etcd: self.clone(),
            endpoint,
        };
        if first.compact_revision > 0 || !first.events.is_empty() {
            // Hand the creation message on: it carries news.
            first.revision = revision;
            return Ok((
                Box::new(Prepended {
                    first: Some(first),
                    rest: stream,
                }),
                revision,
            ));
        }
        Ok((Box::new(stream), revision))
    }

    async fn compact(&self, revision: i64) -> Result<(), ApiError> {
        self.call(|mut c| async move { c.compact(revision, None).await })
            .await?;
        Ok(())
    }
}

fn to_watch_options(options: &WatchOptions) -> ec::WatchOptions {
    let mut opts = ec::WatchOptions::new();
    if let Some(end) = &options.range_end {
        opts = opts.with_range(end.clone());
    }
    if options.start_revision > 0 {
        opts = opts.with_start_revision(options.start_revision);
    }
    if options.prev_kv {
        opts = opts.with_prev_key();
    }
    opts
}

/// A watch stream whose first message was read already.
#[derive(Debug)]
struct Prepended {
    first: Option<WatchResponse>,
    rest: GrpcWatch,
}

#[async_trait]
impl WatchStream for Prepended {
    async fn message(&mut self) -> Result<Option<WatchResponse>, ApiError> {
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        self.rest.message().await
    }

    async fn add_watch(&mut self, key: Vec<u8>, options: WatchOptions) -> Result<(), ApiError> {
        self.rest.add_watch(key, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code, msg: &str) -> ec::Error {
        ec::Error::GRpcStatus(tonic::Status::new(code, msg))
    }

    /// Regression: a request on a connection to a killed cluster member failed with
    /// `Unknown: transport error`, which was neither retried on the next endpoint nor treated
    /// as transient, so `next_rendezvous` failed instead of failing over.
    #[test]
    fn transport_error_on_a_dead_member_is_not_reached_and_transient() {
        let e = map_error(status(tonic::Code::Unknown, "transport error"));
        assert!(matches!(e, ApiError::NotReached(_)), "{e:?}");
        assert!(e.is_transient());
    }

    #[test]
    fn connection_refused_is_not_reached() {
        let e = map_error(status(tonic::Code::Unavailable, "tcp connect error"));
        assert!(matches!(e, ApiError::NotReached(_)), "{e:?}");
    }

    #[test]
    fn server_timeout_may_have_applied_so_it_is_unavailable() {
        let e = map_error(status(
            tonic::Code::Unavailable,
            "etcdserver: request timed out",
        ));
        assert!(matches!(e, ApiError::Unavailable(_)), "{e:?}");
        assert!(e.is_transient());
    }

    #[test]
    fn too_many_requests_is_overloaded_and_transient() {
        let e = map_error(status(
            tonic::Code::ResourceExhausted,
            "etcdserver: too many requests",
        ));
        assert!(matches!(e, ApiError::Overloaded(_)), "{e:?}");
        assert!(e.is_transient());
    }

    #[test]
    fn permission_denied_is_unauthorized_and_not_transient() {
        let e = map_error(status(
            tonic::Code::PermissionDenied,
            "etcdserver: permission denied",
        ));
        assert!(matches!(e, ApiError::Unauthorized(_)), "{e:?}");
        assert!(!e.is_transient());
    }

    #[test]
    fn lease_not_found_is_recognised() {
        let e = map_error(status(
            tonic::Code::NotFound,
            "etcdserver: requested lease not found",
        ));
        assert_eq!(e, ApiError::LeaseNotFound);
    }
}
