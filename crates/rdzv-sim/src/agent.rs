//! A simulated node: the shipped [`EtcdRendezvousHandler`] driven as `rdzv run` drives it.
//!
//! The agent joins a round, acts on its rank until a membership event says the round changed
//! (a peer lost or left, nodes waiting, a newer round, its own lease lost), then joins the next
//! round; it leaves gracefully or closes the run when the harness asks; it ends when the run is
//! closed or the rendezvous fails (an operator, or Kubernetes, would then start a
//! replacement: the harness does). It reports every view and every change of what it acts on
//! to the [`Checker`].

use std::sync::{Arc, Mutex};

use rdzv::etcd::records::{NodeRecord, SCHEMA_VERSION};
use rdzv::etcd::{EtcdClient, EtcdRendezvousHandler, NodeEnv, RendezvousSettings};
use rdzv::{MembershipEvent, RendezvousHandler, RendezvousParameters};
use tokio::sync::{broadcast, Notify};

use crate::check::Checker;
use crate::probe::ProbeNet;
use crate::server::{NodeLink, SimEtcd};

/// What the harness can ask of an agent.
#[derive(Debug, Default)]
pub struct AgentControl {
    /// Leave gracefully (`shutdown()`), then end.
    pub leave: Notify,
    /// Close the run (`set_closed()`).
    pub close: Notify,
}

/// Everything the agents of one run share.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The simulated etcd.
    pub etcd: SimEtcd,
    /// The invariant checker.
    pub checker: Arc<Mutex<Checker>>,
    /// The rendezvous parameters (the same for every node).
    pub params: RendezvousParameters,
    /// The protocol settings (the same for every node).
    pub settings: RendezvousSettings,
    /// The nodes' peer probes.
    pub probes: Arc<ProbeNet>,
}

impl Shared {
    fn check(&self, f: impl FnOnce(&mut Checker)) {
        f(&mut self
            .checker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
    }
}

/// How an agent ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEnd {
    /// The run was closed.
    Closed,
    /// It left when asked.
    Left,
    /// It was asked to close the run (and stopped acting first).
    Closing,
    /// The rendezvous failed (timeout, state, connection).
    Failed(String),
}

/// Runs one node until it ends.
pub async fn run_agent(
    shared: Shared,
    name: String,
    host: usize,
    link: Arc<NodeLink>,
    seed: u64,
    skew_ms: i64,
    control: Arc<AgentControl>,
) -> AgentEnd {
    let client = EtcdClient::from_api(Arc::new(shared.etcd.connect(link)), Arc::default());
    let record = NodeRecord {
        v: SCHEMA_VERSION,
        node_id: name.clone(),
        hostname: format!("host{host}"),
        addrs: vec![format!("10.0.{}.{}", host / 250, host % 250 + 1)],
        node_rank: None,
        prev_rank: None,
        // Nodes run different numbers of workers, as a launcher says.
        local_world_size: Some(1 + host as u64 % 3),
        probe: None,
        pid: host as u32 + 100,
        detached: false,
        left: false,
    };
    // Each node's wall clock is skewed (the protocol must not care).
    let wall = (1_800_000_000_000_i64 + shared.etcd.now_ms() as i64 + skew_ms) as u64;
    let handler = match EtcdRendezvousHandler::with_identity(
        client,
        &shared.params,
        shared.settings.clone(),
        record,
        NodeEnv::new(seed, wall).with_probe(Arc::new(shared.probes.probe_for(&name))),
    )
    .await
    {
        Ok(h) => h,
        Err(e) => {
            shared.check(|c| c.on_gone(&name));
            return AgentEnd::Failed(format!("connect: {e}"));
        }
    };
    let mut events = handler.subscribe().expect("the etcd handler pushes events");
    let end = serve(&shared, &name, &handler, &mut events, &control).await;
    shared.check(|c| c.on_gone(&name));
    match &end {
        AgentEnd::Left | AgentEnd::Failed(_) => {
            let _ = handler.shutdown().await;
        }
        AgentEnd::Closed | AgentEnd::Closing => {}
    }
    end
}

async fn serve(
    shared: &Shared,
    name: &str,
    handler: &EtcdRendezvousHandler,
    events: &mut broadcast::Receiver<MembershipEvent>,
    control: &AgentControl,
) -> AgentEnd {
    loop {
        let result = tokio::select! {
            biased;
            _ = control.leave.notified() => return AgentEnd::Left,
            _ = control.close.notified() => {
                let _ = handler.set_closed().await;
                continue;
            }
            r = handler.next_rendezvous() => r,
        };
        let info = match result {
            Ok(info) => info,
            Err(e) if e.is_closed() => return AgentEnd::Closed,
            Err(e) => return AgentEnd::Failed(e.to_string()),
        };
        tracing::info!(
            round = info.round,
            rank = info.rank,
            world = info.world_size,
            "agent: acting"
        );
        shared.check(|c| {
            c.on_view(name, info.round, info.rank, info.world_size);
            c.on_global_ranks(name, info.round, info.global_ranks);
        });
        // Act on the rank until the membership changes.
        let stop = loop {
            tokio::select! {
                biased;
                _ = control.leave.notified() => break Some(AgentEnd::Left),
                // As `rdzv run` when its restarts are exhausted: stop the workers, then close.
                _ = control.close.notified() => break Some(AgentEnd::Closing),
                ev = events.recv() => match ev {
                    Ok(MembershipEvent::Closed) | Err(broadcast::error::RecvError::Closed) => {
                        break Some(AgentEnd::Closed)
                    }
                    Ok(MembershipEvent::PeerLost { round, .. })
                    | Ok(MembershipEvent::PeerLeft { round, .. })
                    | Ok(MembershipEvent::RoundSuperseded { round })
                    | Ok(MembershipEvent::MembershipLost { round })
                        if round == info.round => break None,
                    Ok(MembershipEvent::NodesWaiting { round, waiting })
                        if round == info.round && waiting > 0 => break None,
                    Err(broadcast::error::RecvError::Lagged(_)) => break None,
                    Ok(_) => {}
                },
            }
        };
        tracing::info!(round = info.round, ?stop, "agent: stopped acting");
        shared.check(|c| c.on_stop(name));
        match stop {
            Some(AgentEnd::Closing) => {
                let _ = handler.set_closed().await;
                return AgentEnd::Closed;
            }
            Some(end) => return end,
            None => {}
        }
    }
}
