//! [`KeptLease`]: an etcd lease kept alive by a background task that survives transient etcd
//! errors and reports the lease lost only when it is really gone.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::client::EtcdClient;
use crate::RendezvousError;

/// A lease and the task that renews it every third of its TTL.
#[derive(Debug)]
pub struct KeptLease {
    id: i64,
    ttl: Duration,
    lost: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl KeptLease {
    /// Grants a lease of `ttl` and starts keeping it alive.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if the grant fails.
    ///
    /// # Cancel safety
    /// Cancel safe; a lease granted by a cancelled call expires by itself.
    pub async fn grant(client: &EtcdClient, ttl_secs: i64) -> Result<Self, RendezvousError> {
        let id = client.lease_grant(ttl_secs).await?;
        Ok(Self::keep(client, id, ttl_secs))
    }

    /// Keeps an existing lease alive.
    pub fn keep(client: &EtcdClient, id: i64, ttl_secs: i64) -> Self {
        let ttl = Duration::from_secs(ttl_secs.max(1) as u64);
        let (tx, lost) = watch::channel(false);
        let task = tokio::spawn(keep_alive_loop(client.clone(), id, ttl, tx));
        Self {
            id,
            ttl,
            lost,
            task,
        }
    }

    /// The lease id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// True once the lease is known to be gone.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// A receiver that turns `true` when the lease is lost.
    pub fn lost_receiver(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// Stops renewing (the lease then expires after its TTL).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for KeptLease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn keep_alive_loop(client: EtcdClient, id: i64, ttl: Duration, lost: watch::Sender<bool>) {
    let period = ttl / 3;
    // The lease is valid at least until `valid_until`, as far as we know.
    let mut valid_until = Instant::now() + ttl;
    let mut backoff = Duration::from_millis(100);
    loop {
        let (mut keeper, mut stream) = match client.lease_keep_alive(id).await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(lease = id, error = %e, "cannot open keep-alive stream; retrying");
                if Instant::now() > valid_until && lease_gone(&client, id).await {
                    break;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(period.max(Duration::from_millis(200)));
                continue;
            }
        };
        // Opening the stream sent one renewal and read its (positive) answer.
        valid_until = Instant::now() + ttl;
        backoff = Duration::from_millis(100);
        loop {
            tokio::time::sleep(period).await;
            client.stats().count_keep_alive();
            if keeper.keep_alive().await.is_err() {
                break;
            }
            // A slow answer under load is no reason to drop the stream: wait for it as long as
            // the lease is known to be valid.
            let answer_by = valid_until.max(Instant::now() + period);
            match tokio::time::timeout_at(answer_by, stream.message()).await {
                Ok(Ok(Some(resp))) => {
                    if resp.ttl() <= 0 {
                        tracing::warn!(lease = id, "etcd says the lease is gone");
                        let _ = lost.send(true);
                        return;
                    }
                    valid_until = Instant::now() + Duration::from_secs(resp.ttl() as u64);
                }
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => break,
            }
        }
        tracing::debug!(lease = id, "keep-alive stream broken; reconnecting");
        if Instant::now() > valid_until && lease_gone(&client, id).await {
            break;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(period.max(Duration::from_millis(200)));
    }
    tracing::warn!(lease = id, "lease lost");
    let _ = lost.send(true);
}

/// True if etcd confirms the lease no longer exists (false if etcd cannot be asked).
async fn lease_gone(client: &EtcdClient, id: i64) -> bool {
    matches!(client.lease_ttl(id).await, Ok(None))
}
