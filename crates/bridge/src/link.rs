//! One peer's link: the task that owns the peer's connection and moves events and messages
//! across it, in both directions, until the peer leaves, fails, is cut or the bridge stops.
//!
//! A [`Connection`] is `&mut self` for both `send` and `receive`, so one task does both: it
//! waits for whichever comes first (a message from the peer, an application event, a queued
//! application message, a replacement connection, cancellation) and handles it, reading what
//! the peer sent before sending anything. `receive`, `broadcast::Receiver::recv` and
//! `mpsc::Receiver::recv` are cancel safe, so nothing is lost between rounds. While a send is
//! under way the link does not read: two peers sending each other messages larger than the
//! transport's window at the same moment wait on each other until the send timeout cuts the
//! link (the relay's window is 18 MiB, more than a message; Hyperswarm's is QUIC's stream
//! window).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use pluresdb_sync_core::{Connection, PeerId, SyncEvent};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::bridge::Shared;
use crate::config::CLOSE_TIMEOUT;
use crate::envelope::{self, ENVELOPE_HEADER_BYTES, EventBatch, Frame};
use crate::queues::{Incoming, Outbox, OutboxReceiver};
use crate::report::{BridgeEvent, CutReason, DisconnectReason, bump};
use crate::table::LinkId;

/// How often a send that is under way checks whether the peer fell too far behind the hub.
const LAG_CHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// The part of a link the rest of the bridge holds (in the peer table).
pub(crate) struct LinkHandle {
    pub(crate) id: LinkId,
    /// Application messages for this peer.
    pub(crate) outbox: Outbox,
    cancel: CancellationToken,
    /// Why the link was cancelled, when it was cut from outside (a full outbox).
    cut: Mutex<Option<CutReason>>,
    /// A newer connection from the same peer, waiting for the link to take it.
    handover: Mutex<Option<Box<dyn Connection>>>,
    handover_ready: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl std::fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkHandle")
            .field("id", &self.id)
            .field("cancelled", &self.cancel.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl LinkHandle {
    /// A handle whose cancellation follows `parent`'s.
    pub(crate) fn new(id: LinkId, outbox: Outbox, parent: &CancellationToken) -> Self {
        Self {
            id,
            outbox,
            cancel: parent.child_token(),
            cut: Mutex::new(None),
            handover: Mutex::new(None),
            handover_ready: Notify::new(),
        }
    }

    /// Cuts the peer: the link ends soon, reporting `reason` (the first one given).
    pub(crate) fn cut(&self, reason: CutReason) {
        lock(&self.cut).get_or_insert(reason);
        self.cancel.cancel();
    }

    /// Gives the link a newer connection to the same peer; returns one that was still waiting
    /// (it was never used: the caller closes it).
    pub(crate) fn hand_over(&self, conn: Box<dyn Connection>) -> Option<Box<dyn Connection>> {
        let displaced = lock(&self.handover).replace(conn);
        self.handover_ready.notify_one();
        displaced
    }

    fn take_handover(&self) -> Option<Box<dyn Connection>> {
        lock(&self.handover).take()
    }
}

/// What a frame being sent carries, for the counters.
#[derive(Clone, Copy, Debug)]
enum Sent {
    Events(u64),
    Messages(u64),
}

/// Events waiting in the hub go out together in one envelope up to this size: under load,
/// one transport message carries many events (no timer: only what is already waiting).
pub(crate) const MAX_BATCH_BYTES: usize = 64 * 1024;

/// How serving one connection ended.
#[derive(Debug)]
enum End {
    /// The peer closed it.
    Closed,
    /// It failed.
    Failed(String),
    /// The peer did not keep up.
    Cut(CutReason),
    /// The link was cancelled (bridge stopped, or cut from outside).
    Cancelled,
}

/// A link's task state.
pub(crate) struct Link {
    pub(crate) shared: Arc<Shared>,
    pub(crate) handle: Arc<LinkHandle>,
    pub(crate) peer_id: PeerId,
    /// The application's events, read at this peer's pace.
    pub(crate) events: broadcast::Receiver<SyncEvent>,
    pub(crate) outbox: OutboxReceiver,
    /// A message from the peer waiting for room in the application's queue.
    pub(crate) pending: Option<Bytes>,
}

impl Link {
    /// Serves the peer until its link ends; connections handed over replace the current one.
    pub(crate) async fn run(mut self, mut conn: Box<dyn Connection>) {
        loop {
            let end = self.serve(&mut conn).await;
            let may_continue = matches!(
                end,
                End::Closed | End::Failed(_) | End::Cut(CutReason::SendTimeout { .. })
            );
            // Under the table lock: a connection handed over before this point is taken
            // here; after it, the peer is gone from the table and a new connection makes a
            // new link.
            let decision = {
                let mut table = self.shared.lock_table();
                match self.handle.take_handover() {
                    Some(new) if may_continue => Ok(new),
                    waiting => {
                        let removed = table.remove(&self.peer_id, self.handle.id).is_some();
                        if removed {
                            let _ = self.shared.hub.publish_remote(SyncEvent::PeerDisconnected {
                                peer_id: self.peer_id.clone(),
                            });
                        }
                        Err((removed, waiting))
                    }
                }
            };
            match decision {
                Ok(new) => {
                    let old = std::mem::replace(&mut conn, new);
                    self.replaced(old).await;
                }
                Err((removed, waiting)) => {
                    let reason = match end {
                        End::Closed => DisconnectReason::Closed,
                        End::Failed(error) => DisconnectReason::Failed { error },
                        End::Cut(why) => DisconnectReason::Cut(why),
                        End::Cancelled => lock(&self.handle.cut)
                            .take()
                            .map_or(DisconnectReason::Stopped, DisconnectReason::Cut),
                    };
                    if removed {
                        if matches!(reason, DisconnectReason::Cut(_)) {
                            bump(&self.shared.counters.peers_cut);
                        }
                        self.shared.report(BridgeEvent::PeerDisconnected {
                            peer_id: self.peer_id.clone(),
                            reason,
                        });
                    }
                    if let Some(unused) = waiting {
                        close(unused).await;
                    }
                    close(conn).await;
                    return;
                }
            }
        }
    }

    /// Closes the connection a newer one replaced (the replacement was counted and reported
    /// when it arrived).
    async fn replaced(&mut self, old: Box<dyn Connection>) {
        // A message of the old connection that waited for room goes on waiting; it came
        // before anything the new one brings.
        close(old).await;
    }

    /// Moves events and messages over `conn` until it ends or the link is cancelled.
    ///
    /// The wait is biased: what the peer sent comes before anything to send, so every send
    /// starts right after `receive` found nothing waiting. Two links doing that can never both
    /// wait in `send` on each other for messages that fit the transport's window: a link
    /// whose send waits for the other to read had emptied its own inbound just before, and the
    /// other, had it sent anything since, would be reading rather than waiting. Events and
    /// application messages take turns.
    async fn serve(&mut self, conn: &mut Box<dyn Connection>) -> End {
        let mut messages_first = false;
        loop {
            let pending_len = self.pending.as_ref().map_or(0, Bytes::len);
            let out = tokio::select! {
                biased;
                _ = self.handle.cancel.cancelled() => return End::Cancelled,
                _ = self.handle.handover_ready.notified() => {
                    if let Some(new) = self.handle.take_handover() {
                        let old = std::mem::replace(conn, new);
                        self.replaced(old).await;
                    }
                    continue;
                }
                got = conn.receive(), if self.pending.is_none() => {
                    if let Some(end) = self.received(got) {
                        return end;
                    }
                    continue;
                }
                room = room(&self.shared, pending_len), if self.pending.is_some() => {
                    if let Some(bytes) = self.pending.take() {
                        self.deliver(bytes, room);
                    }
                    continue;
                }
                out = next_out(&mut self.events, &mut self.outbox, messages_first) => out,
            };
            messages_first = !messages_first;
            let (frame, kind) = match out {
                Out::Event(Ok(event)) => match self.batch(event) {
                    Ok(Some(batch)) => batch,
                    Ok(None) => continue,
                    Err(end) => return end,
                },
                Out::Event(Err(broadcast::error::RecvError::Lagged(missed))) => {
                    return End::Cut(CutReason::Lagged { missed });
                }
                Out::Event(Err(broadcast::error::RecvError::Closed)) | Out::Message(None) => {
                    return End::Cancelled;
                }
                Out::Message(Some(frame)) => (frame, Sent::Messages(1)),
            };
            if let Err(end) = self.send(conn, &frame).await {
                return end;
            }
            let (counter, n) = match kind {
                Sent::Events(n) => (&self.shared.counters.events_sent, n),
                Sent::Messages(n) => (&self.shared.counters.messages_sent, n),
            };
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// One envelope of `first` and whatever other application events are waiting already,
    /// up to [`MAX_BATCH_BYTES`]; `Ok(None)` when none of them is a node event.
    fn batch(&mut self, first: SyncEvent) -> Result<Option<(Bytes, Sent)>, End> {
        let mut batch = EventBatch::new();
        let mut next = Some(first);
        while let Some(event) = next.take() {
            if let Err(error) = batch.push(&event) {
                self.shared.report(BridgeEvent::EventNotSent {
                    peer_id: self.peer_id.clone(),
                    error,
                });
            }
            if batch.bytes() >= MAX_BATCH_BYTES {
                break;
            }
            match self.events.try_recv() {
                Ok(event) => next = Some(event),
                Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                    return Err(End::Cut(CutReason::Lagged { missed }));
                }
                Err(_) => {}
            }
        }
        let n = batch.len() as u64;
        Ok((n > 0).then(|| (batch.finish(), Sent::Events(n))))
    }

    /// Handles what one `receive` returned; `Some` when the connection ended.
    fn received(&mut self, got: anyhow::Result<Option<Vec<u8>>>) -> Option<End> {
        match got {
            Ok(Some(bytes)) => {
                self.on_frame(bytes);
                None
            }
            Ok(None) => Some(End::Closed),
            Err(e) => Some(End::Failed(format!("{e:#}"))),
        }
    }

    /// Sends one frame, giving up when the link is cancelled, the send times out, or the
    /// peer falls so far behind the hub's events meanwhile that it would miss some.
    async fn send(&self, conn: &mut Box<dyn Connection>, frame: &[u8]) -> Result<(), End> {
        let timeout = self.shared.settings.send_timeout;
        // tokio keeps a power of two of events; behind by more than that, some are lost.
        let kept = self.shared.hub.capacity().next_power_of_two();
        let behind = async {
            loop {
                tokio::time::sleep(LAG_CHECK).await;
                let behind = self.events.len();
                if behind > kept {
                    return (behind - kept) as u64;
                }
            }
        };
        // The send first: one that completes at once never starts the lag check's timer.
        tokio::select! {
            biased;
            sent = tokio::time::timeout(timeout, conn.send(frame)) => match sent {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(End::Failed(format!("sending: {e:#}"))),
                Err(_) => Err(End::Cut(CutReason::SendTimeout {
                    ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                })),
            },
            _ = self.handle.cancel.cancelled() => Err(End::Cancelled),
            missed = behind => Err(End::Cut(CutReason::Lagged { missed })),
        }
    }

    /// Handles one message from the peer.
    fn on_frame(&mut self, bytes: Vec<u8>) {
        match envelope::decode(&bytes) {
            Ok(Frame::Events(events)) => {
                self.shared
                    .counters
                    .events_received
                    .fetch_add(events.len() as u64, Ordering::Relaxed);
                for event in events {
                    // No subscriber is no error: the event had nobody to reach.
                    let _ = self.shared.hub.publish_remote(event);
                }
            }
            Ok(Frame::Message(payload)) => {
                let len = payload.len();
                if !self.shared.messages_taken() {
                    self.dropped(len);
                    return;
                }
                let bytes = Bytes::from(bytes).slice(ENVELOPE_HEADER_BYTES..);
                let ready = self.shared.in_budget.try_take(len).and_then(|budget| {
                    self.shared
                        .messages_tx
                        .clone()
                        .try_reserve_owned()
                        .ok()
                        .map(|slot| (budget, slot))
                });
                match ready {
                    Some(room) => self.deliver(bytes, Some(room)),
                    None => self.pending = Some(bytes),
                }
            }
            Err(error) => {
                bump(&self.shared.counters.bad_frames);
                self.shared.report(BridgeEvent::BadFrame {
                    peer_id: self.peer_id.clone(),
                    error,
                });
            }
        }
    }

    /// Puts a message from the peer in the application's queue, or counts it dropped when
    /// the application's receiver is gone (`room` is `None`).
    fn deliver(&mut self, bytes: Bytes, room: Option<Room>) {
        let Some((budget, slot)) = room else {
            self.dropped(bytes.len());
            return;
        };
        slot.send(Incoming {
            peer_id: self.peer_id.clone(),
            bytes,
            _budget: budget,
        });
        bump(&self.shared.counters.messages_received);
    }

    fn dropped(&self, len: usize) {
        bump(&self.shared.counters.messages_dropped);
        self.shared.report(BridgeEvent::MessageDropped {
            peer_id: self.peer_id.clone(),
            len,
        });
    }
}

/// The next thing to send: an application event or a queued application message.
enum Out {
    Event(Result<SyncEvent, broadcast::error::RecvError>),
    Message(Option<Bytes>),
}

/// Waits for the next thing to send, looking at messages first when `messages_first` (the
/// caller alternates it, so neither starves the other). Cancel safe.
async fn next_out(
    events: &mut broadcast::Receiver<SyncEvent>,
    outbox: &mut OutboxReceiver,
    messages_first: bool,
) -> Out {
    if messages_first {
        tokio::select! {
            biased;
            m = outbox.recv() => Out::Message(m),
            e = events.recv() => Out::Event(e),
        }
    } else {
        tokio::select! {
            biased;
            e = events.recv() => Out::Event(e),
            m = outbox.recv() => Out::Message(m),
        }
    }
}

/// Room for one message in the application's queue: its bytes and its slot.
type Room = (
    tokio::sync::OwnedSemaphorePermit,
    mpsc::OwnedPermit<Incoming>,
);

/// Waits for room for a message of `len` bytes; `None` once the application dropped its
/// receiver. Cancel safe: what it took is given back when dropped.
async fn room(shared: &Shared, len: usize) -> Option<Room> {
    let budget = shared.in_budget.take(len).await;
    let slot = shared.messages_tx.clone().reserve_owned().await.ok()?;
    Some((budget, slot))
}

/// Closes a connection, giving up after [`CLOSE_TIMEOUT`].
pub(crate) async fn close(mut conn: Box<dyn Connection>) {
    if let Ok(Err(e)) = tokio::time::timeout(CLOSE_TIMEOUT, conn.close()).await {
        tracing::debug!(peer = conn.peer_id(), error = %e, "closing a bridge connection failed");
    }
}
