//! The job's restart budget: failed rounds counted once per round, whichever members report
//! them, so that `--max-restarts` bounds the restarts of the whole job (torchrun counts per
//! agent, so a job of N nodes may restart N times more than asked; PyTorch issue 108158).

use super::api::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use super::rendezvous::EtcdRendezvousHandler;
use crate::RendezvousError;

/// Attempts of the compare-and-swap before giving up (each lost race means another member
/// counted a round meanwhile: at most one per round).
const MAX_ATTEMPTS: usize = 64;

/// Parses the counter: canonical decimal.
pub(super) fn parse_count(key: &str, value: &[u8]) -> Result<u64, RendezvousError> {
    std::str::from_utf8(value)
        .ok()
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) && t.len() <= 12)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| {
            RendezvousError::State(format!(
                "'{key}' holds {:?}, not a count of failed rounds; was it written by something \
                 else?",
                String::from_utf8_lossy(&value[..value.len().min(64)])
            ))
        })
}

impl EtcdRendezvousHandler {
    /// The job's number of failed rounds so far (0 for a new job).
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if etcd fails; [`RendezvousError::State`] if the
    /// counter holds something else.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn failed_rounds(&self) -> Result<u64, RendezvousError> {
        let key = self.keys.restarts();
        let resp = self.client.get(key.clone(), None).await?;
        match resp.kvs().first() {
            Some(kv) => parse_count(&key, kv.value()),
            None => Ok(0),
        }
    }

    /// Counts round `round` as failed, once however many members report it (and however
    /// often a lost answer makes one retry); returns the job's number of failed rounds.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if etcd fails; [`RendezvousError::State`] if the
    /// counter holds something else.
    ///
    /// # Cancel safety
    /// Cancel safe: the count is applied once or not at all.
    pub async fn record_failed_round(&self, round: u64) -> Result<u64, RendezvousError> {
        let (key, marker) = (self.keys.restarts(), self.keys.failed(round));
        let run_lease = self.run_lease_id().await?;
        for _ in 0..MAX_ATTEMPTS {
            let resp = self.client.get(key.clone(), None).await?;
            let (count, rev) = match resp.kvs().first() {
                Some(kv) => (parse_count(&key, kv.value())?, kv.mod_revision()),
                None => (0, 0),
            };
            let txn = Txn::new()
                .when([
                    Compare::create_revision(marker.clone(), CompareOp::Equal, 0),
                    Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
                ])
                .and_then([
                    TxnOp::put(
                        marker.clone(),
                        "1",
                        Some(PutOptions::new().with_lease(run_lease)),
                    ),
                    TxnOp::put(
                        key.clone(),
                        (count + 1).to_string(),
                        Some(PutOptions::new().with_lease(run_lease)),
                    ),
                ])
                .or_else([TxnOp::get(marker.clone(), None)]);
            let answer = self.client.txn(txn).await?;
            if answer.succeeded() {
                return Ok(count + 1);
            }
            let counted = answer.get(0).is_some_and(|g| !g.kvs().is_empty());
            if counted {
                // Another member (or an earlier attempt whose answer was lost) counted it.
                return self.failed_rounds().await;
            }
        }
        Err(RendezvousError::Connection(format!(
            "could not count round {round}'s failure: the counter kept changing"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_canonical_decimals() {
        assert_eq!(parse_count("k", b"0").ok(), Some(0));
        assert_eq!(parse_count("k", b"42").ok(), Some(42));
        for bad in [&b""[..], b"-1", b"1.5", b" 1", b"x", b"9999999999999"] {
            let err = parse_count("/rdzv/job/restarts", bad).unwrap_err();
            assert!(err.to_string().contains("/rdzv/job/restarts"), "{err}");
        }
    }
}
