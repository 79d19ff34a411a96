//! An in-memory reference transport: the contract of [`Transport`] with no network at all.
//!
//! Every [`MemoryTransport`] made from one [`MemoryNetwork`] can reach the others. It exists to
//! test the conformance kit itself and to show transport authors the expected behaviour; it is
//! not a production transport.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::transport::check_message_size;
use crate::{Connection, Error, Identity, PeerId, PeerInfo, TopicHash, Transport};

/// Messages buffered per direction of a connection before `send` waits (backpressure).
const CONNECTION_QUEUE: usize = 16;
/// New connections buffered per `connect` receiver before the network waits.
const ACCEPT_QUEUE: usize = 64;

/// A shared in-memory "network" that [`MemoryTransport`]s meet on.
#[derive(Clone, Debug, Default)]
pub struct MemoryNetwork {
    state: Arc<Mutex<NetState>>,
}

#[derive(Debug, Default)]
struct NetState {
    /// Who called `connect` on a topic, and where to deliver new connections for them.
    joined: HashMap<TopicHash, HashMap<PeerId, Member>>,
    /// Who is findable on a topic.
    announced: HashMap<TopicHash, HashSet<PeerId>>,
}

#[derive(Debug)]
struct Member {
    accept: mpsc::Sender<Box<dyn Connection>>,
    shutdown: CancellationToken,
}

impl MemoryNetwork {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new transport on this network with a fresh random identity.
    pub fn transport(&self) -> Result<MemoryTransport, Error> {
        let identity = Identity::generate()?;
        Ok(MemoryTransport {
            peer_id: identity.peer_id(),
            net: self.clone(),
            shutdown: CancellationToken::new(),
            disconnected: false,
        })
    }

    fn lock(&self) -> MutexGuard<'_, NetState> {
        // A poisoned lock only means another test thread panicked; the state is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn leave(&self, peer_id: &str) {
        let mut state = self.lock();
        for members in state.joined.values_mut() {
            members.remove(peer_id);
        }
        for peers in state.announced.values_mut() {
            peers.remove(peer_id);
        }
        state.joined.retain(|_, m| !m.is_empty());
        state.announced.retain(|_, p| !p.is_empty());
    }
}

/// A transport over a [`MemoryNetwork`]. Its name is `"memory"`.
#[derive(Debug)]
pub struct MemoryTransport {
    peer_id: PeerId,
    net: MemoryNetwork,
    shutdown: CancellationToken,
    disconnected: bool,
}

impl MemoryTransport {
    /// This transport's own peer id.
    pub fn peer_id(&self) -> &str {
        &self.peer_id
    }

    fn ensure_live(&self) -> Result<(), Error> {
        if self.disconnected {
            return Err(Error::TransportDisconnected {
                transport: "memory",
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    async fn connect(
        &mut self,
        topic: TopicHash,
    ) -> anyhow::Result<mpsc::Receiver<Box<dyn Connection>>> {
        self.ensure_live()?;
        let (accept, incoming) = mpsc::channel(ACCEPT_QUEUE);
        let mut deliveries = Vec::new();
        {
            let mut state = self.net.lock();
            state
                .announced
                .entry(topic)
                .or_default()
                .insert(self.peer_id.clone());
            let members = state.joined.entry(topic).or_default();
            // The lock makes "both dial at once" impossible: whoever joins second makes the
            // one connection of the pair.
            for (other_id, other) in members.iter() {
                if *other_id == self.peer_id {
                    continue;
                }
                let (mine, theirs) = MemoryConnection::pair(
                    (&self.peer_id, &self.shutdown),
                    (other_id, &other.shutdown),
                );
                deliveries.push((accept.clone(), Box::new(mine) as Box<dyn Connection>));
                deliveries.push((
                    other.accept.clone(),
                    Box::new(theirs) as Box<dyn Connection>,
                ));
            }
            members.insert(
                self.peer_id.clone(),
                Member {
                    accept,
                    shutdown: self.shutdown.clone(),
                },
            );
        }
        for (tx, conn) in deliveries {
            // Deliver off the caller's task: a full accept queue must not block `connect`.
            tokio::spawn(async move {
                let _ = tx.send(conn).await;
            });
        }
        Ok(incoming)
    }

    async fn announce(&mut self, topic: TopicHash) -> anyhow::Result<()> {
        self.ensure_live()?;
        self.net
            .lock()
            .announced
            .entry(topic)
            .or_default()
            .insert(self.peer_id.clone());
        Ok(())
    }

    async fn lookup(&self, topic: TopicHash) -> anyhow::Result<Vec<PeerInfo>> {
        self.ensure_live()?;
        let state = self.net.lock();
        let joined = state.joined.get(&topic);
        let i_joined = joined.is_some_and(|m| m.contains_key(&self.peer_id));
        let mut peers: Vec<PeerInfo> = state
            .announced
            .get(&topic)
            .into_iter()
            .flatten()
            .filter(|id| **id != self.peer_id)
            .map(|id| PeerInfo {
                id: id.clone(),
                address: None,
                connected: i_joined && joined.is_some_and(|m| m.contains_key(id)),
            })
            .collect();
        peers.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(peers)
    }

    async fn disconnect(&mut self) -> anyhow::Result<()> {
        if !self.disconnected {
            self.disconnected = true;
            self.shutdown.cancel();
            self.net.leave(&self.peer_id);
        }
        Ok(())
    }

    fn name(&self) -> &str {
        "memory"
    }
}

impl Drop for MemoryTransport {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.net.leave(&self.peer_id);
    }
}

/// One end of an in-memory connection.
#[derive(Debug)]
struct MemoryConnection {
    peer_id: PeerId,
    tx: Option<mpsc::Sender<Vec<u8>>>,
    rx: mpsc::Receiver<Vec<u8>>,
    local_shutdown: CancellationToken,
    remote_shutdown: CancellationToken,
}

impl MemoryConnection {
    /// Two connected ends; `a` is handed to the first peer (and names the second as its remote).
    fn pair(a: (&PeerId, &CancellationToken), b: (&PeerId, &CancellationToken)) -> (Self, Self) {
        let (a_tx, b_rx) = mpsc::channel(CONNECTION_QUEUE);
        let (b_tx, a_rx) = mpsc::channel(CONNECTION_QUEUE);
        let end = |remote: &PeerId,
                   tx,
                   rx,
                   local: &CancellationToken,
                   remote_token: &CancellationToken| Self {
            peer_id: remote.clone(),
            tx: Some(tx),
            rx,
            local_shutdown: local.clone(),
            remote_shutdown: remote_token.clone(),
        };
        (
            end(b.0, a_tx, a_rx, a.1, b.1),
            end(a.0, b_tx, b_rx, b.1, a.1),
        )
    }

    fn closed_error(&self) -> anyhow::Error {
        Error::ConnectionClosed {
            peer_id: self.peer_id.clone(),
        }
        .into()
    }
}

#[async_trait]
impl Connection for MemoryConnection {
    fn peer_id(&self) -> &str {
        &self.peer_id
    }

    async fn send(&mut self, data: &[u8]) -> anyhow::Result<()> {
        check_message_size(data.len())?;
        if self.local_shutdown.is_cancelled() || self.remote_shutdown.is_cancelled() {
            return Err(self.closed_error());
        }
        let Some(tx) = &self.tx else {
            return Err(self.closed_error());
        };
        let sent = tokio::select! {
            r = tx.send(data.to_vec()) => r.is_ok(),
            () = self.local_shutdown.cancelled() => false,
            () = self.remote_shutdown.cancelled() => false,
        };
        if sent {
            Ok(())
        } else {
            Err(self.closed_error())
        }
    }

    async fn receive(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        if self.tx.is_none() || self.local_shutdown.is_cancelled() {
            return Ok(None);
        }
        // Messages already queued are delivered before a remote shutdown is reported.
        Ok(tokio::select! {
            biased;
            msg = self.rx.recv() => msg,
            () = self.local_shutdown.cancelled() => None,
            () = self.remote_shutdown.cancelled() => self.rx.try_recv().ok(),
        })
    }

    async fn close(&mut self) -> anyhow::Result<()> {
        self.tx = None;
        self.rx.close();
        Ok(())
    }
}
