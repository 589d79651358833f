//! [`ProbeNet`]: the simulated peer probe (see `rdzv::etcd::probe`). A node's listener lives
//! as long as its handler: a crashed node (its task aborted, its handler dropped) closes it,
//! and every watcher learns it at once, as a kernel closes a dead process's sockets. A
//! partitioned or stalled node closes nothing. The harness can also reset the connections to
//! a live node ([`ProbeNet::reset`]): a false crash report, which must cost at most a restart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rdzv::etcd::probe::{PeerGone, PeerProbe, ProbeListener};
use rdzv::RendezvousError;
use tokio::sync::watch;

use crate::world::lock;

/// What watchers of one listener see: whether it is closed, and how often its connections
/// were reset while it lived.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct LinkView {
    closed: bool,
    resets: u64,
    farewell: bool,
}

/// Every node's probe listener, by address.
#[derive(Debug, Default)]
pub struct ProbeNet {
    listeners: Mutex<BTreeMap<String, watch::Sender<LinkView>>>,
}

impl ProbeNet {
    /// Resets every connection to the node listening at `addr` (it lives on): its watchers
    /// take it for dead. Returns false if no live listener is there.
    pub fn reset(&self, addr: &str) -> bool {
        let listeners = lock(&self.listeners);
        match listeners.get(addr) {
            Some(tx) if !tx.borrow().closed => {
                tx.send_modify(|v| v.resets += 1);
                true
            }
            _ => false,
        }
    }

    /// The probe of the node `name`.
    pub fn probe_for(self: &Arc<Self>, name: &str) -> SimProbe {
        SimProbe {
            net: self.clone(),
            name: name.to_string(),
        }
    }
}

/// One node's probe.
#[derive(Debug)]
pub struct SimProbe {
    net: Arc<ProbeNet>,
    name: String,
}

/// Closes the listener when dropped (the handler dropped: the node crashed or ended).
struct Closer(watch::Sender<LinkView>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.send_modify(|v| v.closed = true);
    }
}

impl PeerProbe for SimProbe {
    fn listen(&self, _host: &str, _node_id: &str) -> Result<ProbeListener, RendezvousError> {
        let addr = format!("probe:{}", self.name);
        let (tx, _) = watch::channel(LinkView::default());
        lock(&self.net.listeners).insert(addr.clone(), tx.clone());
        // The farewell reaches the watchers through the listener's view.
        let (bye, mut bye_rx) = watch::channel(false);
        let view = tx.clone();
        tokio::spawn(async move {
            if bye_rx.wait_for(|b| *b).await.is_ok() {
                view.send_modify(|v| v.farewell = true);
            }
        });
        Ok(ProbeListener::new(addr, Closer(tx)).with_farewell(bye))
    }

    fn watch(&self, addr: &str, _node_id: &str) -> PeerGone {
        let rx = lock(&self.net.listeners).get(addr).map(|tx| tx.subscribe());
        Box::pin(async move {
            // Unknown: nothing listens there (a refused connection): the lease decides.
            let Some(mut rx) = rx else {
                return std::future::pending().await;
            };
            let start = rx.borrow().resets;
            let seen = rx
                .wait_for(|v| v.farewell || v.closed || v.resets > start)
                .await
                .map(|v| *v);
            if let Ok(v) = seen {
                if v.farewell && v.resets == start {
                    // It left gracefully: nothing to report.
                    std::future::pending::<()>().await;
                }
            }
        })
    }
}
