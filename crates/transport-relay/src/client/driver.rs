//! The thin executor around the session machine: it feeds the machine what the relay, the
//! application and the connections say, and carries out the machine's actions (frames out,
//! connections handed over, data and credit delivered, errors kept). It never awaits; the
//! supervisor owns the socket and the waiting.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use pluresdb_sync_core::topic::{Domain, derive_from_topic};
use pluresdb_sync_core::{Connection, PeerInfo, TopicHash};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use super::ErrorLog;
use super::action::{Action, Opened, SessionId};
use super::connection::{Ctl, Handle, Inbound, LinkState, RelayConnection};
use super::machine::{Config, Machine};
use super::outbound::Outbound;
use crate::RelayError;
use crate::protocol::{self, Frame, RelayFrame, RoomId};

/// Connections queued on a `connect` receiver; a room holds at most a few hundred peers.
pub(crate) const CONNECTION_QUEUE: usize = 256;

/// A request from the application.
pub(crate) enum Cmd {
    /// Join `topic` (`conns`: hand its connections there).
    Join {
        topic: TopicHash,
        conns: Option<mpsc::Sender<Box<dyn Connection>>>,
        done: oneshot::Sender<Result<(), RelayError>>,
    },
    /// The established sessions of `topic` (joining it as an observer if need be).
    Lookup {
        topic: TopicHash,
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    /// Close every session and the socket.
    Disconnect { done: oneshot::Sender<()> },
}

/// The application's side of one room.
#[derive(Default)]
struct Topic {
    conns: Option<mpsc::Sender<Box<dyn Connection>>>,
    waiting: Vec<oneshot::Sender<Result<(), RelayError>>>,
    /// Connections established while nobody reads the topic, for a later `connect`.
    unclaimed: Vec<RelayConnection>,
}

/// Runs the machine for the transport's socket task.
pub(crate) struct Driver {
    machine: Machine,
    topics: HashMap<RoomId, Topic>,
    /// The socket task's ends of the live connections.
    handles: HashMap<SessionId, Handle>,
    out: Outbound,
    link: Arc<LinkState>,
    ctl: mpsc::UnboundedSender<Ctl>,
    errors: ErrorLog,
    url: String,
}

impl Driver {
    /// A driver with no socket yet, and the receiver of what its connections tell it.
    pub(crate) fn new(config: Config, errors: ErrorLog) -> (Self, mpsc::UnboundedReceiver<Ctl>) {
        let (ctl, ctl_rx) = mpsc::unbounded_channel();
        let driver = Self {
            machine: Machine::new(config),
            topics: HashMap::new(),
            handles: HashMap::new(),
            out: Outbound::dead(),
            link: Arc::new(LinkState::new(protocol::DEFAULT_MAX_FRAME_BYTES, false)),
            ctl,
            errors,
            url: String::new(),
        };
        (driver, ctl_rx)
    }

    /// The relay URL of the current (or last) socket.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The outbound side, for the supervisor to wait for room and to pace reading.
    pub(crate) fn outbound(&mut self) -> &mut Outbound {
        &mut self.out
    }

    /// A socket is up: frames go to `out`; every room is joined again.
    pub(crate) fn socket_up(
        &mut self,
        out: mpsc::Sender<Message>,
        me: protocol::ConnId,
        max_frame: usize,
        url: String,
    ) {
        self.out.replace(out);
        self.link = Arc::new(LinkState::new(max_frame, true));
        self.url = url;
        let actions = self.machine.on_socket_up(me);
        self.execute(actions);
    }

    /// The socket is gone: every session ends (connections read `None`); rooms are kept.
    pub(crate) fn socket_lost(&mut self) {
        self.link.alive.store(false, Ordering::Release);
        let actions = self.machine.on_socket_lost();
        self.execute(actions);
        for t in self.topics.values_mut() {
            t.unclaimed.clear();
        }
        self.handles.clear();
        self.out = Outbound::dead();
    }

    /// The transport disconnects: CLOSE every session, then the WebSocket.
    pub(crate) fn disconnect(&mut self) {
        self.link.disconnected.store(true, Ordering::Release);
        let actions = self.machine.close_all();
        self.execute(actions);
        self.out.push(Message::Close(None));
    }

    /// The transport is done: end every session and receiver and fail every waiting join.
    pub(crate) fn finish(&mut self) {
        self.socket_lost();
        for (_, t) in self.topics.drain() {
            for w in t.waiting {
                let _ = w.send(Err(RelayError::Protocol {
                    url: self.url.clone(),
                    reason: "the transport disconnected".into(),
                }));
            }
        }
    }

    /// Keeps `e` for `recent_errors`.
    pub(crate) fn record(&self, e: RelayError) {
        self.errors.record(&self.url, e);
    }

    /// Queues a relay frame of the socket task's own (PING, PONG).
    pub(crate) fn send_frame(&mut self, f: &Frame) {
        self.out.push(Message::Binary(f.encode().into()));
    }

    /// A request from the application.
    pub(crate) fn command(&mut self, cmd: Cmd) {
        let now = Instant::now();
        match cmd {
            Cmd::Join { topic, conns, done } => {
                let room = derive_from_topic(&topic, Domain::RelayRoom);
                let t = self.topics.entry(room).or_default();
                let claim = conns.is_some();
                if let Some(tx) = conns {
                    for c in t.unclaimed.drain(..) {
                        let _ = tx.try_send(Box::new(c));
                    }
                    t.conns = Some(tx);
                }
                t.waiting.push(done);
                let actions = self.machine.join(topic, claim, now);
                self.execute(actions);
            }
            Cmd::Lookup { topic, reply } => {
                let peers = match self.machine.lookup(&topic) {
                    Some(peers) => peers,
                    None => {
                        // Join as an observer so that peers there become known.
                        let room = derive_from_topic(&topic, Domain::RelayRoom);
                        self.topics.entry(room).or_default();
                        let actions = self.machine.join(topic, false, now);
                        self.execute(actions);
                        Vec::new()
                    }
                };
                let _ = reply.send(peers);
            }
            // The supervisor handles it (it owns the socket).
            Cmd::Disconnect { done } => {
                let _ = done.send(());
            }
        }
    }

    /// What a connection said.
    pub(crate) fn ctl(&mut self, ctl: Ctl) {
        let now = Instant::now();
        let actions = match ctl {
            Ctl::Closed {
                room,
                conn,
                session,
                failed,
            } => self.machine.on_closed(room, conn, session, failed, now),
            Ctl::Consumed {
                room,
                conn,
                session,
                n,
            } => self.machine.on_consumed(room, conn, session, n, now),
        };
        self.execute(actions);
    }

    /// A frame from the relay.
    pub(crate) fn relay_frame(&mut self, f: RelayFrame) {
        let actions = self.machine.on_relay_frame(f, Instant::now());
        self.execute(actions);
    }

    /// The periodic tick: handshake expiry, the PEER_JOINED fallback.
    pub(crate) fn tick(&mut self) {
        let actions = self.machine.on_timeout(Instant::now());
        self.execute(actions);
    }

    fn execute(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send(frame) => self.out.push(Message::Binary(frame.into())),
                Action::Open(o) => self.open(o),
                Action::Deliver {
                    session,
                    frame,
                    cost,
                } => {
                    if let Some(h) = self.handles.get(&session) {
                        // Fails only when the connection was dropped; its Ctl::Closed follows.
                        let _ = h.inbound.send(Inbound::Frame { frame, cost });
                    }
                }
                Action::Credit { session, limit } => {
                    if let Some(h) = self.handles.get(&session) {
                        h.credit.send_replace(limit);
                    }
                }
                Action::End { session, error } => {
                    // Dropping the handle ends the connection's receive (after what is queued)
                    // and fails a send waiting for credit.
                    if let (Some(h), Some(e)) = (self.handles.remove(&session), error) {
                        let _ = h.inbound.send(Inbound::Failed(e));
                    }
                    for t in self.topics.values_mut() {
                        t.unclaimed.retain(|c| c.session != session);
                    }
                }
                Action::Record(e) => self.record(e),
                Action::Quieted(q) => tracing::warn!(
                    relay = %self.url,
                    "in the last {} s, {} more refused handshakes and {} rate-limited handshake openings were not logged one by one",
                    q.over.as_secs(),
                    q.refused,
                    q.limited
                ),
                Action::Joined { room } => {
                    if let Some(t) = self.topics.get_mut(&room) {
                        for w in t.waiting.drain(..) {
                            let _ = w.send(Ok(()));
                        }
                    }
                }
                Action::JoinFailed { room, error } => {
                    if let Some(t) = self.topics.remove(&room) {
                        for w in t.waiting {
                            let _ = w.send(Err(error.clone()));
                        }
                    }
                }
            }
        }
    }

    /// Hands the connection of a new session to the application (or keeps it unclaimed).
    fn open(&mut self, o: Opened) {
        let session = o.session;
        let room = o.room;
        let (conn, handle) =
            RelayConnection::open(o, self.out.sender(), self.ctl.clone(), self.link.clone());
        self.handles.insert(session, handle);
        let Some(t) = self.topics.get_mut(&room) else {
            return; // dropped: its CLOSE goes out
        };
        match &t.conns {
            Some(tx) => {
                if tx.try_send(Box::new(conn)).is_err() {
                    tracing::warn!(
                        "connection queue full or receiver dropped; closing the new connection"
                    );
                }
            }
            None => t.unclaimed.push(conn),
        }
    }
}
