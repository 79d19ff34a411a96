//! The task that owns one relay socket: rooms, peer sessions, handshakes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use pluresdb_sync_core::topic::{Domain, derive_from_topic};
use pluresdb_sync_core::{Connection, PeerInfo, TopicHash};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::Settings;
use super::connection::{Ctl, Inbound, LinkState, RelayConnection, SessionFlags};
use super::peer::{self, Chunk, ParamsError, chunk, kind};
use crate::RelayError;
use crate::protocol::{self, ClientFrame, ConnId, Frame, RelayFrame, RoomId};

/// Connections queued on a `connect` receiver; a room holds at most a few hundred peers.
pub(crate) const CONNECTION_QUEUE: usize = 256;
/// Frames queued towards the relay socket (shared by every connection of the transport).
pub(crate) const OUTBOUND_QUEUE_FRAMES: usize = 256;
/// Silence from the relay after which the client pings it.
pub const CLIENT_PING_INTERVAL: Duration = Duration::from_secs(20);
/// Silence from the relay after which the client gives the socket up.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most peer sessions (pending or established) per topic. An honest relay caps rooms far
/// lower (256 by default); this bounds what a hostile relay inventing peers can make us hold.
pub(crate) const MAX_SESSIONS_PER_TOPIC: usize = 1024;
/// First wait before reconnecting to a lost relay (jittered ±25%).
pub const RECONNECT_INITIAL_DELAY: Duration = Duration::from_millis(100);
/// Longest wait between reconnect rounds: a restarted relay is found within 10 s, and
/// thousands of clients do not hammer it in lockstep.
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(10);
/// Recent session errors kept for [`crate::RelayTransport::recent_errors`].
pub(crate) const MAX_RECENT_ERRORS: usize = 32;
/// How long a client that learned of a peer by PEER_JOINED waits for that peer's handshake
/// before starting one itself. With one relay the newcomer always starts at once; with relay
/// nodes sharing rooms over NATS, a join racing another join on another node can leave both
/// sides told of the other only by PEER_JOINED. Both starting is resolved by the lower
/// connection id, so a late fallback costs at most one extra handshake message.
pub(crate) const PEER_JOINED_FALLBACK: Duration = Duration::from_secs(3);
/// At most one REJECT (no session) per peer per this interval: one is enough to end the peer's
/// session, and a peer still sending frames for a session we ended does not get one each.
pub(crate) const REJECT_NO_SESSION_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(crate) enum Cmd {
    Join {
        topic: TopicHash,
        conns: Option<mpsc::Sender<Box<dyn Connection>>>,
        done: oneshot::Sender<Result<(), RelayError>>,
    },
    Lookup {
        topic: TopicHash,
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    Disconnect {
        done: oneshot::Sender<()>,
    },
}

enum State {
    AwaitHs2(Box<snow::HandshakeState>),
    AwaitHs3(Box<snow::HandshakeState>),
    AwaitHello,
    Established {
        /// Towards the `Connection`; bounded by the window this side granted (`flags.granted`).
        inbound: mpsc::UnboundedSender<Inbound>,
        flags: Arc<SessionFlags>,
        peer_id: String,
        /// Opens the peer's control chunks here, so that CREDIT is seen even while the
        /// application does not read (snow's stateless mode: the connection uses the same state
        /// for its data).
        cipher: Option<Arc<snow::StatelessTransportState>>,
        /// Next nonce of the peer's control sequence.
        recv_ctl_nonce: u64,
        /// Credit units the peer used so far.
        received: u64,
        /// The peer's total grant to us; the connection's `send` waits on it.
        credit: watch::Sender<u64>,
    },
}

struct Session {
    id: u64,
    started: Instant,
    state: State,
}

impl Session {
    fn close(&self) {
        if let State::Established { flags, .. } = &self.state {
            flags.closed.store(true, Ordering::Release);
        }
    }
}

struct TopicState {
    topic: TopicHash,
    joined: bool,
    waiting: Vec<oneshot::Sender<Result<(), RelayError>>>,
    conns: Option<mpsc::Sender<Box<dyn Connection>>>,
    sessions: HashMap<ConnId, Session>,
    unclaimed: Vec<RelayConnection>,
    members: HashSet<ConnId>,
    /// Peers announced by PEER_JOINED that have not sent anything yet, with when.
    announced: HashMap<ConnId, Instant>,
    /// When a REJECT (no session) last went to each peer (at most one per
    /// [`REJECT_NO_SESSION_INTERVAL`]; bounded like the sessions).
    rejected: HashMap<ConnId, Instant>,
    /// Peers whose unclaimed session was closed because it filled its window with nobody to
    /// read it: a later `connect` starts a new handshake with them.
    closed_unclaimed: HashSet<ConnId>,
}

impl TopicState {
    /// Whether a REJECT (no session) to `from` is due now (always when `force`: a session just
    /// ended here), noting it. The map keeps at most [`MAX_SESSIONS_PER_TOPIC`] peers: when
    /// full, entries older than the interval go, and a peer that still does not fit is not
    /// rejected now (unless forced; it is then just not noted).
    fn note_reject(&mut self, from: ConnId, force: bool) -> bool {
        let now = Instant::now();
        let due = force
            || self
                .rejected
                .get(&from)
                .is_none_or(|at| now.duration_since(*at) >= REJECT_NO_SESSION_INTERVAL);
        if !due {
            return false;
        }
        if self.rejected.len() >= MAX_SESSIONS_PER_TOPIC && !self.rejected.contains_key(&from) {
            self.rejected
                .retain(|_, at| now.duration_since(*at) < REJECT_NO_SESSION_INTERVAL);
        }
        if self.rejected.len() < MAX_SESSIONS_PER_TOPIC || self.rejected.contains_key(&from) {
            self.rejected.insert(from, now);
            true
        } else {
            force
        }
    }
}

pub(crate) struct Driver {
    pub(crate) settings: Arc<Settings>,
    pub(crate) url: String,
    pub(crate) me: ConnId,
    pub(crate) out: mpsc::Sender<Message>,
    pub(crate) link: Arc<LinkState>,
    pub(crate) errors: Arc<Mutex<VecDeque<String>>>,
    pub(crate) ctl_tx: mpsc::Sender<Ctl>,
    pub(crate) ctl_rx: mpsc::Receiver<Ctl>,
    topics: HashMap<RoomId, TopicState>,
    next_session: u64,
    my_peer_id: String,
}

/// A connected relay socket, as `connect_any` returns it.
pub(crate) struct Socket {
    pub(crate) ws: WsStream,
    pub(crate) me: ConnId,
    pub(crate) max_frame: usize,
    pub(crate) url_index: usize,
    pub(crate) url: String,
}

enum Outcome {
    Lost,
    Disconnect(oneshot::Sender<()>),
    Dropped,
}

/// A sender whose receiver is gone: sends fail at once. Stands in while no socket is up.
fn dead_sender() -> mpsc::Sender<Message> {
    mpsc::channel(1).0
}

fn dead_link() -> Arc<LinkState> {
    Arc::new(LinkState {
        max_frame: AtomicUsize::new(protocol::DEFAULT_MAX_FRAME_BYTES),
        alive: AtomicBool::new(false),
        disconnected: AtomicBool::new(false),
    })
}

impl Driver {
    pub(crate) fn new(settings: Arc<Settings>, errors: Arc<Mutex<VecDeque<String>>>) -> Self {
        let (ctl_tx, ctl_rx) = mpsc::channel(1024);
        let my_peer_id = settings.identity.peer_id();
        Self {
            settings,
            url: String::new(),
            me: 0,
            out: dead_sender(),
            link: dead_link(),
            errors,
            ctl_tx,
            ctl_rx,
            topics: HashMap::new(),
            next_session: 1,
            my_peer_id,
        }
    }

    /// Owns the relay link until the transport disconnects or is dropped: runs each socket,
    /// and when one is lost closes every session (their connections read `None`), reconnects
    /// with exponential backoff (next URL first) and rejoins every room.
    pub(crate) async fn supervise(mut self, first: Socket, mut cmds: mpsc::Receiver<Cmd>) {
        let mut socket = first;
        loop {
            let Socket {
                ws,
                me,
                max_frame,
                url_index,
                url,
            } = socket;
            let (sink, stream) = ws.split();
            let (out, out_rx) = mpsc::channel(OUTBOUND_QUEUE_FRAMES);
            // Aborted when this future is dropped (transport dropped), so the socket closes even
            // while the application still holds connections.
            let mut writer = AbortOnDrop(tokio::spawn(writer(sink, out_rx)));
            self.url = url;
            self.me = me;
            self.out = out;
            self.link = Arc::new(LinkState {
                max_frame: AtomicUsize::new(max_frame),
                alive: AtomicBool::new(true),
                disconnected: AtomicBool::new(false),
            });
            let rooms: Vec<RoomId> = self.topics.keys().copied().collect();
            for room in rooms {
                self.send_frame(Frame::Client(ClientFrame::Join { room }))
                    .await;
            }
            let outcome = self.run_socket(stream, &mut cmds).await;
            self.socket_lost();
            match outcome {
                Outcome::Disconnect(done) => {
                    self.link.disconnected.store(true, Ordering::Release);
                    self.out = dead_sender();
                    if tokio::time::timeout(Duration::from_secs(2), &mut writer.0)
                        .await
                        .is_err()
                    {
                        writer.0.abort();
                    }
                    self.finish();
                    let _ = done.send(());
                    return;
                }
                Outcome::Dropped => {
                    writer.0.abort();
                    self.finish();
                    return;
                }
                Outcome::Lost => writer.0.abort(),
            }
            self.out = dead_sender();
            let mut delay = RECONNECT_INITIAL_DELAY;
            let mut start = url_index + 1;
            socket = loop {
                let wake = Instant::now() + jitter(delay);
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(wake) => break,
                        cmd = cmds.recv() => match cmd {
                            None => return self.finish(),
                            Some(Cmd::Disconnect { done }) => {
                                self.link.disconnected.store(true, Ordering::Release);
                                self.finish();
                                let _ = done.send(());
                                return;
                            }
                            Some(cmd) => self.command(cmd).await,
                        },
                        Some(ctl) = self.ctl_rx.recv() => self.ctl(ctl).await,
                    }
                }
                match super::connect_any(&self.settings, start).await {
                    Ok(s) => break s,
                    Err(e) => {
                        self.record(e);
                        delay = (delay * 2).min(RECONNECT_MAX_DELAY);
                        start = 0;
                    }
                }
            };
        }
    }

    async fn ctl(&mut self, ctl: Ctl) {
        match ctl {
            Ctl::Closed {
                room,
                conn,
                id,
                notified,
            } => {
                if let Some(t) = self.topics.get_mut(&room)
                    && t.sessions.get(&conn).is_some_and(|s| s.id == id)
                {
                    t.sessions.remove(&conn);
                    if !notified {
                        // No CLOSE reached the peer (a failure, or a full outbound queue):
                        // without this its send would wait for credit forever.
                        t.note_reject(conn, true);
                        self.send_peer(&room, conn, &[kind::REJECT, peer::REJECT_NO_SESSION])
                            .await;
                    }
                }
            }
        }
    }

    fn record(&self, err: impl std::fmt::Display) {
        let text = err.to_string();
        tracing::warn!(relay = %self.url, "{text}");
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if e.len() == MAX_RECENT_ERRORS {
            e.pop_front();
        }
        e.push_back(text);
    }

    async fn send_frame(&self, f: Frame) {
        let _ = self.out.send(Message::Binary(f.encode().into())).await;
    }

    async fn send_peer(&self, room: &RoomId, to: ConnId, payload: &[u8]) {
        let frame = protocol::encode_send(room, to, payload);
        let _ = self.out.send(Message::Binary(frame.into())).await;
    }

    /// Runs one socket until it ends, the transport disconnects, or the transport is dropped.
    async fn run_socket(
        &mut self,
        mut stream: SplitStream<WsStream>,
        cmds: &mut mpsc::Receiver<Cmd>,
    ) -> Outcome {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut last_rx = Instant::now();
        let mut last_ping = last_rx;
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(Ok(msg)) = msg else {
                        self.record(RelayError::Protocol { url: self.url.clone(), reason: "the relay connection ended".into() });
                        return Outcome::Lost;
                    };
                    last_rx = Instant::now();
                    match msg {
                        Message::Binary(b) => match protocol::decode(&b) {
                            Ok(Frame::Relay(f)) => self.relay_frame(f).await,
                            Ok(Frame::Ping(n)) => { let _ = self.out.try_send(Message::Binary(Frame::Pong(n).encode().into())); }
                            Ok(_) => {}
                            Err(e) => {
                                self.record(RelayError::Protocol { url: self.url.clone(), reason: e.to_string() });
                                return Outcome::Lost;
                            }
                        },
                        Message::Close(c) => {
                            self.record(RelayError::Protocol { url: self.url.clone(), reason: format!("the relay closed the connection: {}", c.map(|c| format!("{} {}", u16::from(c.code), c.reason)).unwrap_or_default()) });
                            return Outcome::Lost;
                        }
                        _ => {}
                    }
                }
                cmd = cmds.recv() => match cmd {
                    None => return Outcome::Dropped,
                    Some(Cmd::Disconnect { done }) => {
                        let _ = self.out.try_send(Message::Close(None));
                        return Outcome::Disconnect(done);
                    }
                    Some(cmd) => self.command(cmd).await,
                },
                Some(ctl) = self.ctl_rx.recv() => self.ctl(ctl).await,
                _ = tick.tick() => {
                    let now = Instant::now();
                    if now.duration_since(last_rx) >= CLIENT_IDLE_TIMEOUT {
                        self.record(RelayError::Protocol { url: self.url.clone(), reason: format!("nothing received for {} s", CLIENT_IDLE_TIMEOUT.as_secs()) });
                        return Outcome::Lost;
                    }
                    if now.duration_since(last_rx.max(last_ping)) >= CLIENT_PING_INTERVAL {
                        last_ping = now;
                        let _ = self.out.try_send(Message::Binary(Frame::Ping(1).encode().into()));
                    }
                    self.expire_handshakes(now);
                    self.announced_fallback(now).await;
                }
            }
        }
    }

    /// The socket is gone: every session ends (its connection reads `None`); rooms are kept
    /// for the rejoin.
    fn socket_lost(&mut self) {
        self.link.alive.store(false, Ordering::Release);
        for t in self.topics.values_mut() {
            for (_, s) in t.sessions.drain() {
                s.close();
            }
            t.unclaimed.clear();
            t.members.clear();
            t.announced.clear();
            t.rejected.clear();
            t.closed_unclaimed.clear();
            t.joined = false;
        }
    }

    /// The transport is done: end every receiver and fail every waiting join.
    fn finish(&mut self) {
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

    /// Starts the handshake with peers announced by PEER_JOINED that stayed silent.
    async fn announced_fallback(&mut self, now: Instant) {
        let mut due = Vec::new();
        for (room, t) in &mut self.topics {
            t.announced.retain(|peer, at| {
                if t.sessions.contains_key(peer) {
                    return false;
                }
                if now.duration_since(*at) >= PEER_JOINED_FALLBACK {
                    due.push((*room, *peer));
                    return false;
                }
                true
            });
        }
        for (room, peer) in due {
            self.start_session(room, peer).await;
        }
    }

    fn expire_handshakes(&mut self, now: Instant) {
        let limit = self.settings.timeout;
        let mut expired = Vec::new();
        for t in self.topics.values_mut() {
            t.sessions.retain(|conn, s| {
                let pending = !matches!(s.state, State::Established { .. });
                if pending && now.duration_since(s.started) >= limit {
                    expired.push(*conn);
                    false
                } else {
                    true
                }
            });
        }
        for conn in expired {
            self.record(RelayError::Session {
                conn,
                reason: format!("handshake timed out after {} ms", limit.as_millis()),
            });
        }
    }

    async fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Join { topic, conns, done } => {
                let room = derive_from_topic(&topic, Domain::RelayRoom);
                if let Some(t) = self.topics.get_mut(&room) {
                    let mut restart = Vec::new();
                    if let Some(tx) = conns {
                        t.conns = Some(tx.clone());
                        for c in t.unclaimed.drain(..) {
                            let _ = tx.try_send(Box::new(c));
                        }
                        restart = t.closed_unclaimed.drain().collect();
                    }
                    if t.joined {
                        let _ = done.send(Ok(()));
                    } else {
                        t.waiting.push(done);
                    }
                    // Sessions closed for want of a reader: now there is one, handshake again.
                    // Ordered after the CLOSE on the same relay link, so the peer has ended
                    // the old session before it sees the new handshake.
                    for peer in restart {
                        self.start_session(room, peer).await;
                    }
                    return;
                }
                self.topics.insert(
                    room,
                    TopicState {
                        topic,
                        joined: false,
                        waiting: vec![done],
                        conns,
                        sessions: HashMap::new(),
                        unclaimed: Vec::new(),
                        members: HashSet::new(),
                        announced: HashMap::new(),
                        rejected: HashMap::new(),
                        closed_unclaimed: HashSet::new(),
                    },
                );
                self.send_frame(Frame::Client(ClientFrame::Join { room }))
                    .await;
            }
            Cmd::Lookup { topic, reply } => {
                let room = derive_from_topic(&topic, Domain::RelayRoom);
                let peers = match self.topics.get(&room) {
                    Some(t) => t
                        .sessions
                        .values()
                        .filter_map(|s| match &s.state {
                            State::Established { flags, peer_id, .. }
                                if !flags.closed.load(Ordering::Acquire) =>
                            {
                                Some(PeerInfo {
                                    id: peer_id.clone(),
                                    address: None,
                                    connected: true,
                                })
                            }
                            _ => None,
                        })
                        .collect(),
                    None => {
                        // Join as an observer so that peers there become known.
                        let (done, _) = oneshot::channel();
                        Box::pin(self.command(Cmd::Join {
                            topic,
                            conns: None,
                            done,
                        }))
                        .await;
                        Vec::new()
                    }
                };
                let _ = reply.send(peers);
            }
            Cmd::Disconnect { .. } => {}
        }
    }

    async fn relay_frame(&mut self, f: RelayFrame) {
        match f {
            RelayFrame::Joined { room, peers } => {
                let Some(t) = self.topics.get_mut(&room) else {
                    return;
                };
                t.joined = true;
                t.members
                    .extend(peers.iter().copied().take(MAX_SESSIONS_PER_TOPIC));
                for p in &peers {
                    t.announced.remove(p);
                }
                for w in t.waiting.drain(..) {
                    let _ = w.send(Ok(()));
                }
                // The newcomer starts every handshake, so each pair makes exactly one attempt.
                for peer in peers.into_iter().take(MAX_SESSIONS_PER_TOPIC) {
                    self.start_session(room, peer).await;
                }
            }
            RelayFrame::PeerJoined { room, peer } => {
                if let Some(t) = self.topics.get_mut(&room)
                    && t.members.len() < MAX_SESSIONS_PER_TOPIC
                    && peer != self.me
                    && t.members.insert(peer)
                    && !t.sessions.contains_key(&peer)
                {
                    t.announced.insert(peer, Instant::now());
                }
            }
            RelayFrame::PeerLeft { room, peer } => {
                if let Some(t) = self.topics.get_mut(&room) {
                    t.members.remove(&peer);
                    t.announced.remove(&peer);
                    t.rejected.remove(&peer);
                    t.closed_unclaimed.remove(&peer);
                    if let Some(s) = t.sessions.remove(&peer) {
                        s.close();
                    }
                }
            }
            RelayFrame::Deliver {
                room,
                from,
                payload,
                ..
            } => self.peer_frame(room, from, payload).await,
            RelayFrame::Error {
                code,
                about,
                room,
                message,
            } => {
                let err = RelayError::Refused {
                    about: match about {
                        protocol::kind::JOIN => "join",
                        protocol::kind::SEND => "send",
                        protocol::kind::LEAVE => "leave",
                        protocol::kind::BROADCAST => "broadcast",
                        _ => "a request",
                    },
                    code,
                    message,
                };
                if about == protocol::kind::JOIN
                    && self.topics.get(&room).is_some_and(|t| !t.joined)
                {
                    let t = self.topics.remove(&room);
                    for w in t.into_iter().flat_map(|t| t.waiting) {
                        let _ = w.send(Err(err.clone()));
                    }
                    return;
                }
                if code != protocol::error_code::UNKNOWN_PEER {
                    self.record(err);
                }
            }
            RelayFrame::Welcome { .. } => {}
        }
    }

    async fn start_session(&mut self, room: RoomId, peer: ConnId) {
        // A handshake with this peer is already under way (or done): the peer started first,
        // e.g. its HS1 arrived before our JOINED, which relay nodes sharing rooms over NATS
        // can do. Starting another would replace a working session.
        if self
            .topics
            .get(&room)
            .is_some_and(|t| t.sessions.contains_key(&peer))
        {
            return;
        }
        let encryption = self.settings.encryption;
        let id = self.next_session;
        self.next_session += 1;
        let hello = self.hello();
        let Some(t) = self.topics.get_mut(&room) else {
            return;
        };
        let (state, msg) = if encryption {
            let hs = peer::handshake(&self.settings.identity, &t.topic, &room, true)
                .and_then(|mut hs| peer::write_hs(&mut hs, kind::HS1, &[]).map(|m| (hs, m)));
            match hs {
                Ok((hs, m)) => (State::AwaitHs2(Box::new(hs)), m),
                Err(e) => {
                    self.record(RelayError::Session {
                        conn: peer,
                        reason: e.to_string(),
                    });
                    return;
                }
            }
        } else {
            (State::AwaitHello, hello)
        };
        t.sessions.insert(
            peer,
            Session {
                id,
                started: Instant::now(),
                state,
            },
        );
        self.send_peer(&room, peer, &msg).await;
    }

    fn hello(&self) -> Vec<u8> {
        let mut m = vec![kind::HELLO];
        m.extend_from_slice(&self.settings.identity.public_bytes());
        m.extend_from_slice(&peer::session_params());
        m
    }

    /// The remote's session parameters are unusable (an older client without flow control, or
    /// garbage): end the attempt on both sides with a clear error instead of a session that
    /// would hang on credit that never comes.
    async fn reject_params(&mut self, room: RoomId, from: ConnId, e: ParamsError) {
        if let Some(t) = self.topics.get_mut(&room)
            && let Some(s) = t.sessions.remove(&from)
        {
            s.close();
        }
        self.send_peer(
            &room,
            from,
            &[
                kind::REJECT,
                peer::REJECT_VERSION_MISMATCH,
                peer::SESSION_VERSION,
            ],
        )
        .await;
        self.record(match e {
            ParamsError::Version(remote) => RelayError::SessionVersionMismatch {
                conn: from,
                local: peer::SESSION_VERSION,
                remote,
            },
            ParamsError::Invalid(reason) => RelayError::Session { conn: from, reason },
        });
    }

    async fn reject_mismatch(&mut self, room: RoomId, from: ConnId, remote_on: bool) {
        if let Some(t) = self.topics.get_mut(&room) {
            t.sessions.remove(&from);
        }
        self.send_peer(
            &room,
            from,
            &[kind::REJECT, peer::REJECT_ENCRYPTION_MISMATCH],
        )
        .await;
        self.record(RelayError::EncryptionMismatch {
            conn: from,
            local: if self.settings.encryption {
                "on"
            } else {
                "off"
            },
            remote: if remote_on { "on" } else { "off" },
        });
    }

    async fn peer_frame(&mut self, room: RoomId, from: ConnId, payload: Vec<u8>) {
        let Some((&k, body)) = payload.split_first() else {
            return;
        };
        let encryption = self.settings.encryption;
        let me = self.me;
        let next_id = self.next_session;
        let Some(t) = self.topics.get_mut(&room) else {
            return;
        };
        // The peer is engaging: no fallback handshake towards it.
        t.announced.remove(&from);
        if matches!(k, kind::HS1 | kind::HELLO)
            && !t.sessions.contains_key(&from)
            && t.sessions.len() >= MAX_SESSIONS_PER_TOPIC
        {
            return self.record(RelayError::Session {
                conn: from,
                reason: format!("ignored: already {MAX_SESSIONS_PER_TOPIC} sessions on this topic"),
            });
        }
        match k {
            kind::HS1 => {
                if !encryption {
                    return self.reject_mismatch(room, from, true).await;
                }
                if let Some(s) = t.sessions.get(&from) {
                    if matches!(s.state, State::AwaitHs2(_)) && me < from {
                        return; // Both started; the lower connection id's attempt wins.
                    }
                    if let Some(old) = t.sessions.remove(&from) {
                        old.close();
                    }
                }
                let hs = peer::handshake(&self.settings.identity, &t.topic, &room, false).and_then(
                    |mut hs| {
                        peer::read_hs(&mut hs, body)?;
                        peer::write_hs(&mut hs, kind::HS2, &peer::session_params()).map(|m| (hs, m))
                    },
                );
                match hs {
                    Ok((hs, m)) => {
                        self.next_session += 1;
                        t.sessions.insert(
                            from,
                            Session {
                                id: next_id,
                                started: Instant::now(),
                                state: State::AwaitHs3(Box::new(hs)),
                            },
                        );
                        self.send_peer(&room, from, &m).await;
                    }
                    Err(e) => self.record(RelayError::Session {
                        conn: from,
                        reason: format!("handshake message 1: {e}"),
                    }),
                }
            }
            kind::HS2 => {
                let Some(Session {
                    state: State::AwaitHs2(_),
                    ..
                }) = t.sessions.get(&from)
                else {
                    return;
                };
                let Some(Session {
                    state: State::AwaitHs2(mut hs),
                    id,
                    ..
                }) = t.sessions.remove(&from)
                else {
                    return;
                };
                let r = peer::read_hs(&mut hs, body).and_then(|params| {
                    let m = peer::write_hs(&mut hs, kind::HS3, &peer::session_params())?;
                    Ok((params, m))
                });
                match r {
                    Ok((params, m)) => match peer::parse_session_params(&params) {
                        Ok(window) => {
                            self.send_peer(&room, from, &m).await;
                            self.establish_noise(room, from, id, *hs, window).await;
                        }
                        Err(e) => self.reject_params(room, from, e).await,
                    },
                    Err(e) => self.record(RelayError::Session {
                        conn: from,
                        reason: format!("handshake message 2 (is the topic the same?): {e}"),
                    }),
                }
            }
            kind::HS3 => {
                let Some(Session {
                    state: State::AwaitHs3(_),
                    ..
                }) = t.sessions.get(&from)
                else {
                    return;
                };
                let Some(Session {
                    state: State::AwaitHs3(mut hs),
                    id,
                    ..
                }) = t.sessions.remove(&from)
                else {
                    return;
                };
                match peer::read_hs(&mut hs, body) {
                    Ok(params) => match peer::parse_session_params(&params) {
                        Ok(window) => self.establish_noise(room, from, id, *hs, window).await,
                        Err(e) => self.reject_params(room, from, e).await,
                    },
                    Err(e) => self.record(RelayError::Session {
                        conn: from,
                        reason: format!("handshake message 3 (is the topic the same?): {e}"),
                    }),
                }
            }
            kind::HELLO => {
                if encryption {
                    return self.reject_mismatch(room, from, false).await;
                }
                if body.len() == 32 {
                    // A version 1 client: no session parameters, no flow control.
                    return self
                        .reject_params(room, from, ParamsError::Version(1))
                        .await;
                }
                let Some(key) = body
                    .get(..32)
                    .and_then(|k| <[u8; 32]>::try_from(k).ok())
                    .filter(|_| body.len() == 32 + peer::SESSION_PARAMS_LEN)
                else {
                    return self.record(RelayError::Session {
                        conn: from,
                        reason: format!(
                            "HELLO of {} bytes, expected {}",
                            body.len(),
                            32 + peer::SESSION_PARAMS_LEN
                        ),
                    });
                };
                let window = match peer::parse_session_params(&body[32..]) {
                    Ok(w) => w,
                    Err(e) => return self.reject_params(room, from, e).await,
                };
                let awaiting = matches!(
                    t.sessions.get(&from),
                    Some(Session {
                        state: State::AwaitHello,
                        ..
                    })
                );
                let id = match t.sessions.remove(&from) {
                    Some(s) if awaiting => s.id,
                    other => {
                        if let Some(old) = other {
                            old.close();
                        }
                        self.next_session += 1;
                        let hello = self.hello();
                        self.send_peer(&room, from, &hello).await;
                        next_id
                    }
                };
                self.establish(room, from, id, key, None, window).await;
            }
            kind::REJECT if body.first() == Some(&peer::REJECT_NO_SESSION) => {
                // The peer ended our session without its CLOSE reaching us: end it here too
                // (dropping its credit sender wakes a send waiting for credit). A handshake in
                // progress is not about that session and stays.
                let Some(Session {
                    state: State::Established { peer_id, .. },
                    ..
                }) = t.sessions.get(&from)
                else {
                    return;
                };
                let reason = format!(
                    "peer {peer_id} has no session with this side (it ended without its CLOSE reaching us): session closed"
                );
                if let Some(s) = t.sessions.remove(&from) {
                    s.close();
                }
                self.record(RelayError::Session { conn: from, reason });
            }
            kind::REJECT => {
                if let Some(s) = t.sessions.remove(&from) {
                    s.close();
                }
                match body.first() {
                    Some(&peer::REJECT_ENCRYPTION_MISMATCH) => {
                        self.record(RelayError::EncryptionMismatch {
                            conn: from,
                            local: if encryption { "on" } else { "off" },
                            remote: if encryption { "off" } else { "on" },
                        })
                    }
                    Some(&peer::REJECT_VERSION_MISMATCH) => {
                        self.record(RelayError::SessionVersionMismatch {
                            conn: from,
                            local: peer::SESSION_VERSION,
                            remote: body.get(1).copied().unwrap_or(0),
                        })
                    }
                    _ => {}
                }
            }
            _ => self.session_frame(room, from, payload).await,
        }
    }

    /// A frame of an established session: control chunks (CREDIT, CLOSE) are opened and
    /// applied here; data frames are queued, still sealed, for the connection within the window
    /// this side granted. Waits only for room in the outbound queue (CLOSE, REJECT).
    async fn session_frame(&mut self, room: RoomId, from: ConnId, payload: Vec<u8>) {
        let Some(t) = self.topics.get_mut(&room) else {
            return;
        };
        let Some(session) = t.sessions.get_mut(&from) else {
            // A data frame for a session we do not have (it ended here without a CLOSE
            // reaching the peer): tell the peer, so that its send does not wait for credit
            // forever. Rate limited per peer.
            if matches!(payload.first(), Some(&(kind::SEALED | kind::PLAIN)))
                && t.note_reject(from, false)
            {
                self.send_peer(&room, from, &[kind::REJECT, peer::REJECT_NO_SESSION])
                    .await;
            }
            return;
        };
        let session_id = session.id;
        let State::Established {
            inbound,
            flags,
            peer_id,
            cipher,
            recv_ctl_nonce,
            received,
            credit,
        } = &mut session.state
        else {
            return;
        };
        if flags.closed.load(Ordering::Acquire) {
            return;
        }
        let frame_len = payload.len();
        let control = match (payload.first().copied(), cipher.as_deref()) {
            (Some(kind::SEALED), Some(cipher)) if peer::is_control_len(frame_len) => {
                let mut out = [0u8; 64];
                match cipher.read_message(*recv_ctl_nonce, &payload[1..], &mut out) {
                    Ok(n) => {
                        *recv_ctl_nonce += 1;
                        Some(peer::decode_chunk(&out[..n]).map(owned_control))
                    }
                    // Not sealed in the control sequence: a data frame of the same length.
                    Err(_) => None,
                }
            }
            (Some(kind::SEALED), Some(_)) => None,
            (Some(kind::PLAIN), None) => match payload.get(1) {
                Some(&chunk::CREDIT | &chunk::CLOSE) => {
                    Some(peer::decode_chunk(&payload[1..]).map(owned_control))
                }
                _ => None,
            },
            (other, _) => Some(Err(format!(
                "unexpected peer frame {:#04x} on an established session",
                other.unwrap_or(0)
            ))),
        };
        let failure = match control {
            Some(Ok(Some(Control::Credit(n)))) => {
                credit.send_modify(|limit| *limit = limit.saturating_add(n));
                None
            }
            Some(Ok(Some(Control::Close))) => {
                let _ = inbound.send(Inbound::Close);
                if let Some(s) = t.sessions.remove(&from) {
                    s.close();
                }
                return;
            }
            Some(Ok(None)) => Some("a data chunk in the control sequence".to_owned()),
            Some(Err(e)) => Some(e),
            None => {
                let cost = peer::frame_cost(frame_len);
                let granted = flags.granted.load(Ordering::Acquire);
                if *received + cost > granted {
                    Some(format!(
                        "peer {peer_id} sent beyond its flow-control window ({granted} credit units granted, {} used): session closed",
                        *received + cost
                    ))
                } else {
                    *received += cost;
                    // Fails only when the connection was dropped; its Ctl::Closed follows.
                    let _ = inbound.send(Inbound::Frame {
                        frame: payload,
                        cost,
                    });
                    if t.conns.is_none() && granted - *received < peer::LARGEST_FRAME_COST {
                        // Nobody can read this session (no `connect` receiver: the transport
                        // only looked the topic up or announced it) and the peer may now be
                        // waiting for credit: close it rather than leave the peer blocked.
                        let reason = format!(
                            "closed the session with peer {peer_id}: it filled its {granted}-unit window and nothing reads it (no connect receiver for this topic)"
                        );
                        return self.close_unclaimed(room, from, session_id, reason).await;
                    }
                    None
                }
            }
        };
        if let Some(reason) = failure {
            let _ = inbound.send(Inbound::Failed(reason.clone()));
            if let Some(s) = t.sessions.remove(&from) {
                s.close();
            }
            // Tell the peer, so that its send does not wait for credit forever.
            t.note_reject(from, true);
            self.send_peer(&room, from, &[kind::REJECT, peer::REJECT_NO_SESSION])
                .await;
            self.record(RelayError::Session { conn: from, reason });
        }
    }

    /// Ends the unclaimed session `id` with `from`, sending its CLOSE; a later `connect`
    /// handshakes with the peer again.
    async fn close_unclaimed(&mut self, room: RoomId, from: ConnId, id: u64, reason: String) {
        let Some(t) = self.topics.get_mut(&room) else {
            return;
        };
        if let Some(s) = t.sessions.remove(&from) {
            s.close();
        }
        let conn = t
            .unclaimed
            .iter()
            .position(|c| c.remote == from && c.session_id == id)
            .map(|i| t.unclaimed.swap_remove(i));
        if t.members.contains(&from) {
            t.closed_unclaimed.insert(from);
        }
        let close = conn.and_then(|mut c| c.close_from_driver());
        match close {
            Some(m) => {
                let _ = self.out.send(m).await;
            }
            None => {
                t.note_reject(from, true);
                self.send_peer(&room, from, &[kind::REJECT, peer::REJECT_NO_SESSION])
                    .await;
            }
        }
        self.record(RelayError::Session { conn: from, reason });
    }

    async fn establish_noise(
        &mut self,
        room: RoomId,
        from: ConnId,
        id: u64,
        hs: snow::HandshakeState,
        window: u32,
    ) {
        let Some(key) = hs
            .get_remote_static()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
        else {
            return self.record(RelayError::Session {
                conn: from,
                reason: "no remote static key".into(),
            });
        };
        match hs.into_stateless_transport_mode() {
            Ok(cipher) => {
                self.establish(room, from, id, key, Some(Arc::new(cipher)), window)
                    .await
            }
            Err(e) => self.record(RelayError::Session {
                conn: from,
                reason: e.to_string(),
            }),
        }
    }

    async fn establish(
        &mut self,
        room: RoomId,
        from: ConnId,
        id: u64,
        key: [u8; 32],
        cipher: Option<Arc<snow::StatelessTransportState>>,
        window: u32,
    ) {
        let peer_id = hex::encode(key);
        if peer_id == self.my_peer_id {
            return self.record(RelayError::Session {
                conn: from,
                reason: "the remote has this transport's own identity".into(),
            });
        }
        let Some(t) = self.topics.get_mut(&room) else {
            return;
        };
        // A peer that reconnected to the relay shows up under a new connection id: the new
        // session replaces the old one, so there is still one connection per peer.
        let stale: Vec<ConnId> = t
            .sessions
            .iter()
            .filter(
                |(_, s)| matches!(&s.state, State::Established { peer_id: p, .. } if *p == peer_id),
            )
            .map(|(c, _)| *c)
            .collect();
        for c in stale {
            if let Some(s) = t.sessions.remove(&c) {
                s.close();
            }
        }
        t.unclaimed.retain(|c| c.peer_id != peer_id);
        let (inbound_tx, inbound) = mpsc::unbounded_channel();
        let (credit, send_limit) = watch::channel(u64::from(window));
        let flags = Arc::new(SessionFlags::new());
        let conn = RelayConnection {
            peer_id: peer_id.clone(),
            room,
            remote: from,
            session_id: id,
            out: self.out.clone(),
            ctl: self.ctl_tx.clone(),
            inbound,
            cipher: cipher.clone(),
            send_nonce: 0,
            send_ctl_nonce: peer::CONTROL_NONCE_BASE,
            recv_nonce: 0,
            partial: Vec::new(),
            flags: flags.clone(),
            link: self.link.clone(),
            closed_reported: false,
            send_limit,
            sent: 0,
            ungranted: 0,
            mid_message: false,
            failed: false,
        };
        t.sessions.insert(
            from,
            Session {
                id,
                started: Instant::now(),
                state: State::Established {
                    inbound: inbound_tx,
                    flags,
                    peer_id,
                    cipher,
                    recv_ctl_nonce: peer::CONTROL_NONCE_BASE,
                    received: 0,
                    credit,
                },
            },
        );
        match &t.conns {
            Some(tx) => {
                if let Err(e) = tx.try_send(Box::new(conn)) {
                    tracing::warn!(
                        "connection queue full or receiver dropped; closing the new connection"
                    );
                    drop(e);
                }
            }
            None => t.unclaimed.push(conn),
        }
    }
}

/// A control chunk the socket task applies itself.
enum Control {
    Credit(u64),
    Close,
}

/// The control chunk `c` is, or `None` for a data chunk (MORE, LAST, ABORT).
fn owned_control(c: Chunk<'_>) -> Option<Control> {
    match c {
        Chunk::Credit(n) => Some(Control::Credit(n)),
        Chunk::Close => Some(Control::Close),
        Chunk::Data { .. } | Chunk::Abort => None,
    }
}

/// Writes queued frames to the relay socket, batching flushes.
pub(crate) async fn writer(
    mut sink: futures_util::stream::SplitSink<WsStream, Message>,
    mut rx: mpsc::Receiver<Message>,
) {
    while let Some(m) = rx.recv().await {
        let mut closing = matches!(m, Message::Close(_));
        if sink.feed(m).await.is_err() {
            return;
        }
        while !closing {
            match rx.try_recv() {
                Ok(m) => {
                    closing = matches!(m, Message::Close(_));
                    if sink.feed(m).await.is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        if sink.flush().await.is_err() || closing {
            let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
            return;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
}

/// `d` ±25%, so that clients of a restarted relay do not all return at once.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = if getrandom::fill(&mut b).is_ok() {
        u16::from_le_bytes(b)
    } else {
        0x8000
    };
    // 0.75 .. 1.25
    let factor = 0.75 + f64::from(r) / f64::from(u16::MAX) / 2.0;
    d.mul_f64(factor)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
