//! [`EtcdStore`]: the round's key-value store, on etcd, under `<run>/kv/<round>/`.
//!
//! Every operation is one etcd request or transaction; blocking reads wait on a watch, not by
//! polling. `add` is a compare-and-swap transaction whose failure branch returns the current
//! value, so a retry under contention costs one request and no separate read.
//!
//! Operations whose answer is lost to a transient error are retried (within the store's
//! timeout) when that cannot apply them twice. `add` records its outcome under a unique key in
//! the same transaction (when the store has an operation prefix, as a round's store does), so
//! a retry after a lost answer finds the first attempt's result instead of adding again.

use std::time::Duration;

use super::api::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use async_trait::async_trait;
use tokio::time::Instant;

use super::client::{is_transient, EtcdClient};
use super::keys::prefix_end;
use super::watch::{RangeWatch, WatchItem};
use crate::{RendezvousError, Store};

/// A store scoped to one run and round.
#[derive(Debug, Clone)]
pub struct EtcdStore {
    client: EtcdClient,
    prefix: String,
    lease: i64,
    timeout: Duration,
    ops: Option<String>,
}

impl EtcdStore {
    /// A store under `prefix`; keys are bound to `lease` (0 for none); blocking operations wait
    /// at most `timeout` by default.
    pub fn new(client: EtcdClient, prefix: String, lease: i64, timeout: Duration) -> Self {
        Self {
            client,
            prefix,
            lease,
            timeout,
            ops: None,
        }
    }

    /// Records the outcome of every `add` under `prefix` (keys bound to the store's lease), so
    /// that an `add` whose answer was lost can be retried without adding twice.
    pub fn with_op_prefix(mut self, prefix: String) -> Self {
        self.ops = Some(prefix);
        self
    }

    /// Runs `op` again after transient errors, within the store's timeout.
    async fn retry<T, F, Fut>(&self, op: F) -> Result<T, RendezvousError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, RendezvousError>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(50);
        loop {
            match op().await {
                Err(e) if is_transient(&e) && Instant::now() + backoff < deadline => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn put_options(&self) -> Option<PutOptions> {
        (self.lease != 0).then(|| PutOptions::new().with_lease(self.lease))
    }

    /// Which of `keys` exist now, and the revision of that answer.
    async fn existing(&self, keys: &[&str]) -> Result<(Vec<bool>, i64), RendezvousError> {
        let ops: Vec<TxnOp> = keys
            .iter()
            .map(|k| TxnOp::get(self.key(k), Some(GetOptions::new().with_count_only())))
            .collect();
        let mut found = Vec::with_capacity(keys.len());
        let mut revision = 0;
        for chunk in ops.chunks(100) {
            let resp = self
                .retry(|| self.client.txn(Txn::new().and_then(chunk.to_vec())))
                .await?;
            revision = revision.max(resp.revision());
            for r in resp.op_responses() {
                found.push(matches!(r, TxnOpResponse::Get(g) if g.count() > 0));
            }
        }
        Ok((found, revision))
    }
}

fn parse_counter(key: &str, value: &[u8]) -> Result<i64, RendezvousError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            RendezvousError::State(format!(
                "store key '{key}' does not hold an integer counter"
            ))
        })
}

#[async_trait]
impl Store for EtcdStore {
    async fn set(&self, key: &str, value: &[u8]) -> Result<(), RendezvousError> {
        self.retry(|| {
            self.client
                .put(self.key(key), value.to_vec(), self.put_options())
        })
        .await?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, RendezvousError> {
        self.get_timeout(key, self.timeout).await
    }

    async fn get_timeout(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, RendezvousError> {
        let full = self.key(key);
        let resp = self.retry(|| self.client.get(full.clone(), None)).await?;
        if let Some(kv) = resp.kvs().first() {
            return Ok(kv.value().to_vec());
        }
        let revision = resp.revision();
        let deadline = super::deadline_after(timeout);
        let mut end = full.clone().into_bytes();
        end.push(0);
        let mut watch = RangeWatch::open(&self.client, full.clone(), end, revision + 1).await?;
        loop {
            let item = tokio::time::timeout_at(deadline, watch.next())
                .await
                .map_err(|_| {
                    RendezvousError::Timeout(format!(
                        "store key '{key}' did not appear within {timeout:?}"
                    ))
                })??;
            match item {
                WatchItem::Events(events) => {
                    if let Some(kv) = events
                        .iter()
                        .rev()
                        .filter(|e| e.event_type() == EventType::Put)
                        .find_map(|e| e.kv())
                    {
                        return Ok(kv.value().to_vec());
                    }
                }
                WatchItem::Resync { kvs, .. } => {
                    if let Some(kv) = kvs.first() {
                        return Ok(kv.value().to_vec());
                    }
                }
            }
        }
    }

    async fn add(&self, key: &str, delta: i64) -> Result<i64, RendezvousError> {
        let full = self.key(key);
        // Where this call's outcome is recorded (see the module docs).
        let op_key = self
            .ops
            .as_ref()
            .map(|p| format!("{p}{}", uuid::Uuid::new_v4().simple()));
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(50);
        // Start by assuming the counter does not exist; each failed attempt tells us its value.
        let mut seen: Option<(i64, i64)> = None; // (value, mod_revision)
        loop {
            let (compare, new) = match seen {
                None => (
                    Compare::create_revision(full.clone(), CompareOp::Equal, 0),
                    delta,
                ),
                Some((value, rev)) => (
                    Compare::mod_revision(full.clone(), CompareOp::Equal, rev),
                    value.checked_add(delta).ok_or_else(|| {
                        RendezvousError::State(format!("store counter '{key}' would overflow"))
                    })?,
                ),
            };
            let mut success = vec![TxnOp::put(
                full.clone(),
                new.to_string(),
                self.put_options(),
            )];
            let mut failure = vec![TxnOp::get(full.clone(), None)];
            if let Some(op) = &op_key {
                success.push(TxnOp::put(op.clone(), new.to_string(), self.put_options()));
                failure.push(TxnOp::get(op.clone(), None));
            }
            let txn = Txn::new()
                .when([compare])
                .and_then(success)
                .or_else(failure);
            let resp = match self.client.txn(txn).await {
                Ok(resp) => resp,
                // Same compare again: if the lost attempt was applied, this one fails and
                // finds the outcome under `op_key`; if not, at most one of them applies.
                Err(e) if op_key.is_some() && is_transient(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
                Err(e) => return Err(e),
            };
            if resp.succeeded() {
                return Ok(new);
            }
            if let Some(kv) = resp.get(1).and_then(|g| g.kvs().first()) {
                return parse_counter(key, kv.value());
            }
            seen = match resp.get(0).and_then(|g| g.kvs().first()) {
                Some(kv) => Some((parse_counter(key, kv.value())?, kv.mod_revision())),
                None => None,
            };
        }
    }

    async fn compare_set(
        &self,
        key: &str,
        expected: &[u8],
        desired: &[u8],
    ) -> Result<Vec<u8>, RendezvousError> {
        let full = self.key(key);
        let compare = if expected.is_empty() {
            Compare::create_revision(full.clone(), CompareOp::Equal, 0)
        } else {
            Compare::value(full.clone(), CompareOp::Equal, expected.to_vec())
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(
                full.clone(),
                desired.to_vec(),
                self.put_options(),
            )])
            .or_else([TxnOp::get(full.clone(), None)]);
        // Retrying is safe: if a lost attempt applied, the retry reads `desired` back.
        let resp = self.retry(|| self.client.txn(txn.clone())).await?;
        if resp.succeeded() {
            return Ok(desired.to_vec());
        }
        Ok(match resp.op_responses().iter().next() {
            Some(TxnOpResponse::Get(g)) => g
                .kvs()
                .first()
                .map(|kv| kv.value().to_vec())
                .unwrap_or_default(),
            _ => Vec::new(),
        })
    }

    async fn wait(&self, keys: &[&str], timeout: Duration) -> Result<(), RendezvousError> {
        let deadline = super::deadline_after(timeout);
        let (found, revision) = self.existing(keys).await?;
        let mut missing: std::collections::BTreeSet<String> = keys
            .iter()
            .zip(found)
            .filter(|(_, f)| !f)
            .map(|(k, _)| self.key(k))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut watch = RangeWatch::open(
            &self.client,
            self.prefix.clone(),
            prefix_end(&self.prefix),
            revision + 1,
        )
        .await?;
        while !missing.is_empty() {
            let item = tokio::time::timeout_at(deadline, watch.next())
                .await
                .map_err(|_| {
                    let names: Vec<&str> = missing
                        .iter()
                        .map(|k| k.strip_prefix(&self.prefix).unwrap_or(k))
                        .collect();
                    RendezvousError::Timeout(format!(
                        "store keys {names:?} did not appear within {timeout:?}"
                    ))
                })??;
            match item {
                WatchItem::Events(events) => {
                    for e in events.iter().filter(|e| e.event_type() == EventType::Put) {
                        if let Some(kv) = e.kv() {
                            missing.remove(&*String::from_utf8_lossy(kv.key()));
                        }
                    }
                }
                WatchItem::Resync { kvs, .. } => {
                    for kv in &kvs {
                        missing.remove(&*String::from_utf8_lossy(kv.key()));
                    }
                }
            }
        }
        Ok(())
    }

    async fn check(&self, keys: &[&str]) -> Result<bool, RendezvousError> {
        Ok(self.existing(keys).await?.0.into_iter().all(|f| f))
    }

    async fn delete_key(&self, key: &str) -> Result<bool, RendezvousError> {
        Ok(self
            .retry(|| self.client.delete(self.key(key), None))
            .await?
            .deleted()
            > 0)
    }

    async fn num_keys(&self) -> Result<u64, RendezvousError> {
        let resp = self
            .retry(|| {
                self.client.get(
                    self.prefix.clone(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
            })
            .await?;
        Ok(resp.count().max(0) as u64)
    }
}
