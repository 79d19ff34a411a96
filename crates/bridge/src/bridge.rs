//! The [`SyncBridge`] handle: starting, the task that admits connections, the application's
//! calls (messages, peers, reports, status), and stopping.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use bytes::Bytes;
use pluresdb_sync_core::{
    Connection, PeerId, PeerInfo, SyncBroadcaster, SyncEvent, TopicHash, Transport,
};
use tokio::sync::{broadcast, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{Settings, SyncBridgeBuilder};
use crate::envelope;
use crate::error::BridgeError;
use crate::link::{Link, LinkHandle, close};
use crate::queues::{ByteBudget, Incoming, Messages, PushError, outbox};
use crate::report::{BridgeEvent, BridgeStatus, Counters, bump};
use crate::table::{Admitted, PeerTable};

/// What the handle, the admitting task and every link share.
pub(crate) struct Shared {
    pub(crate) hub: SyncBroadcaster,
    pub(crate) settings: Settings,
    table: Mutex<PeerTable<Arc<LinkHandle>>>,
    reports: broadcast::Sender<BridgeEvent>,
    pub(crate) counters: Counters,
    pub(crate) messages_tx: mpsc::Sender<Incoming>,
    messages_rx: Mutex<Option<mpsc::Receiver<Incoming>>>,
    taken: AtomicBool,
    pub(crate) in_budget: ByteBudget,
    cancel: CancellationToken,
    /// Never read: it makes the application's `publish` succeed while the bridge runs, also
    /// before any peer is linked (the events then reach nobody, which is no error). An unread
    /// receiver costs nothing beyond the hub's bounded ring.
    _listening: broadcast::Receiver<SyncEvent>,
}

impl Shared {
    pub(crate) fn lock_table(&self) -> MutexGuard<'_, PeerTable<Arc<LinkHandle>>> {
        // Nothing panics while holding it; a poisoned table is still consistent.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a report to whoever listens (nobody listening is fine).
    pub(crate) fn report(&self, event: BridgeEvent) {
        tracing::debug!(%event, "bridge");
        let _ = self.reports.send(event);
    }

    /// Whether the application took its message receiver.
    pub(crate) fn messages_taken(&self) -> bool {
        self.taken.load(Ordering::Acquire)
    }
}

/// Carries a [`SyncBroadcaster`]'s events and the application's messages between the
/// replicas on one topic, over any [`Transport`]. See the [crate docs](crate).
pub struct SyncBridge {
    shared: Arc<Shared>,
    transport: tokio::sync::Mutex<Box<dyn Transport>>,
    topic: TopicHash,
    name: String,
    admit: Option<JoinHandle<()>>,
    _cancel_on_drop: DropGuard,
}

impl fmt::Debug for SyncBridge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncBridge")
            .field("transport", &self.name)
            .field("peers", &self.shared.lock_table().len())
            .finish_non_exhaustive()
    }
}

impl SyncBridge {
    /// Joins `topic` on `transport` and starts bridging `hub` to every peer there, with the
    /// default limits ([`SyncBridge::builder`] for others).
    ///
    /// Fails when the transport cannot join the topic (its error, with context).
    pub async fn start(
        transport: Box<dyn Transport>,
        topic: TopicHash,
        hub: SyncBroadcaster,
    ) -> anyhow::Result<Self> {
        Self::builder().start(transport, topic, hub).await
    }

    /// A builder for a bridge with other limits.
    pub fn builder() -> SyncBridgeBuilder {
        SyncBridgeBuilder::default()
    }

    pub(crate) async fn start_with(
        settings: Settings,
        mut transport: Box<dyn Transport>,
        topic: TopicHash,
        hub: SyncBroadcaster,
    ) -> anyhow::Result<Self> {
        let name = transport.name().to_owned();
        let incoming = transport.connect(topic).await.with_context(|| {
            format!(
                "joining topic {} over the {name} transport",
                hex_prefix(&topic)
            )
        })?;
        let (messages_tx, messages_rx) = mpsc::channel(settings.message_queue);
        let (reports, _) = broadcast::channel(settings.report_capacity);
        let cancel = CancellationToken::new();
        let shared = Arc::new(Shared {
            _listening: hub.subscribe_local(),
            hub,
            table: Mutex::new(PeerTable::new(settings.max_peers)),
            reports,
            counters: Counters::default(),
            messages_tx,
            messages_rx: Mutex::new(Some(messages_rx)),
            taken: AtomicBool::new(false),
            in_budget: ByteBudget::new(settings.message_queue_bytes),
            settings,
            cancel: cancel.clone(),
        });
        let admit = tokio::spawn(admit_connections(shared.clone(), incoming));
        Ok(Self {
            shared,
            transport: tokio::sync::Mutex::new(transport),
            topic,
            name,
            admit: Some(admit),
            _cancel_on_drop: cancel.drop_guard(),
        })
    }

    /// Queues an application message for `peer`, waiting while its queue is full; a peer
    /// that still has no room after the send timeout is disconnected (reported) and the call
    /// fails with [`BridgeError::PeerTooSlow`]. Use it to stream data to one peer at the
    /// pace it takes it.
    pub async fn send_to(&self, peer: &str, bytes: impl AsRef<[u8]>) -> Result<(), BridgeError> {
        let frame = envelope::encode_message(bytes.as_ref())?;
        let link = self.link(peer)?;
        let pushed = link
            .outbox
            .push(frame, self.shared.settings.send_timeout)
            .await;
        self.pushed(peer, &link, pushed)
    }

    /// Queues an application message for `peer` without waiting: a peer whose queue is full
    /// is disconnected (reported) and the call fails with [`BridgeError::PeerTooSlow`].
    pub fn try_send_to(&self, peer: &str, bytes: impl AsRef<[u8]>) -> Result<(), BridgeError> {
        let frame = envelope::encode_message(bytes.as_ref())?;
        let link = self.link(peer)?;
        let pushed = link.outbox.try_push(frame);
        self.pushed(peer, &link, pushed)
    }

    fn link(&self, peer: &str) -> Result<Arc<LinkHandle>, BridgeError> {
        self.shared
            .lock_table()
            .get(peer)
            .cloned()
            .ok_or_else(|| BridgeError::NotConnected {
                peer_id: peer.to_owned(),
            })
    }

    fn pushed(
        &self,
        peer: &str,
        link: &LinkHandle,
        pushed: Result<(), PushError>,
    ) -> Result<(), BridgeError> {
        match pushed {
            Ok(()) => Ok(()),
            Err(PushError::Closed) => Err(BridgeError::NotConnected {
                peer_id: peer.to_owned(),
            }),
            Err(PushError::Full(reason)) => {
                link.cut(reason.clone());
                Err(BridgeError::PeerTooSlow {
                    peer_id: peer.to_owned(),
                    reason,
                })
            }
        }
    }

    /// Queues an application message for every linked peer; returns how many. Never waits
    /// (one slow peer must not hold up the others): peers whose queue is full are
    /// disconnected (reported) and not counted.
    pub fn broadcast(&self, bytes: impl AsRef<[u8]>) -> Result<usize, BridgeError> {
        let frame: Bytes = envelope::encode_message(bytes.as_ref())?;
        let table = self.shared.lock_table();
        let mut queued = 0;
        for (_, link) in table.iter() {
            match link.outbox.try_push(frame.clone()) {
                Ok(()) => queued += 1,
                Err(PushError::Full(reason)) => link.cut(reason),
                Err(PushError::Closed) => {}
            }
        }
        Ok(queued)
    }

    /// The receiver of application messages from peers, the first time it is asked for
    /// (`None` after that). Until it is taken, messages from peers are dropped and reported
    /// ([`BridgeEvent::MessageDropped`]).
    pub fn messages(&self) -> Option<Messages> {
        let rx = self
            .shared
            .messages_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        self.shared.taken.store(true, Ordering::Release);
        Some(Messages { rx })
    }

    /// A new receiver of reports ([`BridgeEvent`]s) from now on; bounded (it sees `Lagged`
    /// when it falls more than the report capacity behind).
    pub fn reports(&self) -> broadcast::Receiver<BridgeEvent> {
        self.shared.reports.subscribe()
    }

    /// The peers linked now, sorted.
    pub fn peers(&self) -> Vec<PeerId> {
        let mut peers: Vec<PeerId> = self
            .shared
            .lock_table()
            .iter()
            .map(|(p, _)| p.to_owned())
            .collect();
        peers.sort_unstable();
        peers
    }

    /// The bridge's counters.
    pub fn status(&self) -> BridgeStatus {
        let peers = self.shared.lock_table().len();
        self.shared.counters.status(peers)
    }

    /// Asks the transport who is on the topic ([`Transport::lookup`]): addresses, where the
    /// transport knows them. May take as long as the transport's lookup (a DHT query).
    pub async fn lookup(&self) -> anyhow::Result<Vec<PeerInfo>> {
        self.transport.lock().await.lookup(self.topic).await
    }

    /// The transport's name.
    pub fn transport_name(&self) -> &str {
        &self.name
    }

    /// The topic.
    pub fn topic(&self) -> TopicHash {
        self.topic
    }

    /// Stops: every link closes its connection (each peer's hub sees this one leave, and this
    /// hub gets `PeerDisconnected` for each), every task ends, and the transport disconnects
    /// (leaving the topic).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shared.cancel.cancel();
        if let Some(admit) = self.admit.take() {
            admit.await.context("the bridge's connection task failed")?;
        }
        self.transport
            .get_mut()
            .disconnect()
            .await
            .with_context(|| format!("disconnecting the {} transport", self.name))
    }
}

/// The first 8 hex digits of a topic, enough to recognise it in a message.
fn hex_prefix(topic: &TopicHash) -> String {
    topic[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Admits every connection the transport yields, until the bridge stops; then waits for
/// every link to end.
async fn admit_connections(shared: Arc<Shared>, mut incoming: mpsc::Receiver<Box<dyn Connection>>) {
    let mut tasks = JoinSet::new();
    let mut open = true;
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => break,
            conn = incoming.recv(), if open => match conn {
                Some(conn) => admit(&shared, conn, &mut tasks),
                None => {
                    open = false;
                    shared.report(BridgeEvent::TransportEnded);
                }
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "a bridge link task failed");
                }
            }
        }
    }
    drop(incoming);
    while tasks.join_next().await.is_some() {}
}

/// One connection: a new link, a replacement for a linked peer's connection, or a refusal.
fn admit(shared: &Arc<Shared>, conn: Box<dyn Connection>, tasks: &mut JoinSet<()>) {
    let peer_id = conn.peer_id().to_owned();
    let mut conn = Some(conn);
    let mut link_outbox = None;
    let mut to_close = None;
    let mut start = None;
    let report = {
        let mut table = shared.lock_table();
        let made = table.admit(&peer_id, |id| {
            let (tx, rx) = outbox(shared.settings.peer_queue, shared.settings.peer_queue_bytes);
            link_outbox = Some(rx);
            Arc::new(LinkHandle::new(id, tx, &shared.cancel))
        });
        match made {
            Admitted::New(handle) => {
                // Subscribed before the hub hears of the peer: whatever the application
                // publishes on seeing PeerConnected reaches this peer.
                let events = shared.hub.subscribe_local();
                let _ = shared.hub.publish_remote(SyncEvent::PeerConnected {
                    peer_id: peer_id.clone(),
                });
                start = Some((handle.clone(), events));
                BridgeEvent::PeerConnected {
                    peer_id: peer_id.clone(),
                }
            }
            Admitted::Existing(handle) => {
                to_close = conn.take().and_then(|c| handle.hand_over(c));
                bump(&shared.counters.replaced);
                BridgeEvent::ConnectionReplaced {
                    peer_id: peer_id.clone(),
                }
            }
            Admitted::Full => {
                to_close = conn.take();
                BridgeEvent::PeerRefused {
                    peer_id: peer_id.clone(),
                    max_peers: shared.settings.max_peers,
                }
            }
        }
    };
    shared.report(report);
    if let Some(conn) = to_close {
        tasks.spawn(close(conn));
    }
    if let (Some((handle, events)), Some(outbox), Some(conn)) = (start, link_outbox, conn) {
        let link = Link {
            shared: shared.clone(),
            handle,
            peer_id,
            events,
            outbox,
            pending: None,
        };
        tasks.spawn(link.run(conn));
    }
}
