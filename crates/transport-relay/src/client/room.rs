//! One room (one topic) as a pure state machine: who is in it, the session with each peer, and
//! the rules between them — who starts a handshake, the simultaneous-open tie-break, one
//! session per static key, REJECT (no session), handshake expiry, sessions nobody reads.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use pluresdb_sync_core::{PeerInfo, TopicHash};

use super::action::{Action, Opened, SessionId};
use super::flow::LARGEST_FRAME_COST;
use super::handshake::{self, Handshake, Local, Step};
use super::legacy::LEGACY_VERSION;
use super::reject_limit::RejectLimit;
use super::room_ctx::Ctx;
use super::session::{Event, Live, Session, State};
use super::wire::{self, kind, reject};
use crate::RelayError;
use crate::error::SessionError;
use crate::protocol::{self, ConnId, RoomId};

/// Most peer sessions (pending or established) per topic. An honest relay caps rooms far
/// lower (256 by default); this bounds what a hostile relay inventing peers can make us hold.
pub(crate) const MAX_SESSIONS_PER_TOPIC: usize = 1024;
/// How long a client that learned of a peer by PEER_JOINED waits for that peer's handshake
/// before starting one itself. With one relay the newcomer always starts at once; with relay
/// nodes sharing rooms over NATS, a join racing another join on another node can leave both
/// sides told of the other only by PEER_JOINED. Both starting is resolved by the lower
/// connection id, so a late fallback costs at most one extra handshake message.
pub(crate) const PEER_JOINED_FALLBACK: Duration = Duration::from_secs(3);

/// One joined (or joining) room.
pub(crate) struct Room {
    topic: TopicHash,
    id: RoomId,
    /// The relay answered JOINED on the current socket.
    pub(crate) joined: bool,
    /// An application reads this topic's connections (`connect`, not only `lookup` or
    /// `announce`).
    pub(crate) claimed: bool,
    sessions: HashMap<ConnId, Session>,
    members: HashSet<ConnId>,
    /// Peers announced by PEER_JOINED that have not sent anything yet, with when.
    announced: HashMap<ConnId, Instant>,
    /// When a REJECT (no session) last went to each peer (bounded like the sessions).
    rejected: RejectLimit,
    /// Peers whose unclaimed session was closed because it filled its window with nobody to
    /// read it: claiming the room starts a new handshake with them.
    closed_unread: HashSet<ConnId>,
}

impl Room {
    /// A room for `topic`, not joined yet.
    pub(crate) fn new(topic: TopicHash, id: RoomId, claimed: bool) -> Self {
        Self {
            topic,
            id,
            joined: false,
            claimed,
            sessions: HashMap::new(),
            members: HashSet::new(),
            announced: HashMap::new(),
            rejected: RejectLimit::new(MAX_SESSIONS_PER_TOPIC),
            closed_unread: HashSet::new(),
        }
    }

    /// The established sessions, as `lookup` reports them.
    pub(crate) fn peers(&self) -> Vec<PeerInfo> {
        self.sessions
            .values()
            .filter_map(Session::live)
            .map(|l| PeerInfo {
                id: l.peer_id.clone(),
                address: None,
                connected: true,
            })
            .collect()
    }

    /// The relay answered JOINED: `peers` were already here. The newcomer starts every
    /// handshake, so each pair makes exactly one attempt.
    pub(crate) fn on_joined(&mut self, peers: Vec<ConnId>, now: Instant, cx: &mut Ctx<'_>) {
        self.joined = true;
        cx.out.push(Action::Joined { room: self.id });
        for peer in peers.into_iter().take(MAX_SESSIONS_PER_TOPIC) {
            self.members.insert(peer);
            self.announced.remove(&peer);
            self.start(peer, now, cx);
        }
    }

    /// A peer joined after us: it starts the handshake (or, after [`PEER_JOINED_FALLBACK`]
    /// of silence, we do).
    pub(crate) fn on_peer_joined(&mut self, peer: ConnId, now: Instant, cx: &Ctx<'_>) {
        if self.members.len() < MAX_SESSIONS_PER_TOPIC
            && peer != cx.me
            && self.members.insert(peer)
            && !self.sessions.contains_key(&peer)
        {
            self.announced.insert(peer, now);
        }
    }

    /// A peer left the room (or the relay): its session ends.
    pub(crate) fn on_peer_left(&mut self, peer: ConnId, cx: &mut Ctx<'_>) {
        self.members.remove(&peer);
        self.announced.remove(&peer);
        self.rejected.forget(peer);
        self.closed_unread.remove(&peer);
        self.end(peer, None, cx);
    }

    /// An application now reads the room: handshake again with the peers whose sessions were
    /// closed for want of a reader (after their CLOSE on the same relay link, so the peer has
    /// ended the old session before it sees the new handshake).
    pub(crate) fn claim(&mut self, now: Instant, cx: &mut Ctx<'_>) {
        self.claimed = true;
        let peers: Vec<ConnId> = self.closed_unread.drain().collect();
        for peer in peers {
            self.start(peer, now, cx);
        }
    }

    /// The socket is gone: every session ends; the room is kept for the rejoin.
    pub(crate) fn on_socket_lost(&mut self, cx: &mut Ctx<'_>) {
        let conns: Vec<ConnId> = self.sessions.keys().copied().collect();
        for conn in conns {
            self.end(conn, None, cx);
        }
        self.members.clear();
        self.announced.clear();
        self.rejected.clear();
        self.closed_unread.clear();
        self.joined = false;
    }

    /// The transport disconnects: CLOSE every established session, so peers learn at once.
    pub(crate) fn close_all(&mut self, cx: &mut Ctx<'_>) {
        let conns: Vec<ConnId> = self.sessions.keys().copied().collect();
        for conn in conns {
            self.close(conn, cx);
        }
    }

    /// Handshake expiry and the PEER_JOINED fallback.
    pub(crate) fn on_timeout(&mut self, now: Instant, cx: &mut Ctx<'_>) {
        let limit = cx.timeout;
        let expired: Vec<ConnId> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                matches!(s.state, State::Pending { started, .. } if now.duration_since(started) >= limit)
            })
            .map(|(c, _)| *c)
            .collect();
        for conn in expired {
            self.sessions.remove(&conn);
            cx.record(RelayError::session(
                conn,
                SessionError::HandshakeTimeout {
                    ms: limit.as_millis() as u64,
                },
            ));
        }
        let mut due = Vec::new();
        self.announced.retain(|peer, at| {
            if self.sessions.contains_key(peer) {
                return false;
            }
            if now.duration_since(*at) >= PEER_JOINED_FALLBACK {
                due.push(*peer);
                return false;
            }
            true
        });
        for peer in due {
            self.start(peer, now, cx);
        }
    }

    /// The connection of `session` with `conn` ended on this side: CLOSE tells the peer, or,
    /// after a `failed` session (its frames can no longer be trusted), REJECT (no session).
    pub(crate) fn on_closed(
        &mut self,
        conn: ConnId,
        session: SessionId,
        failed: bool,
        now: Instant,
        cx: &mut Ctx<'_>,
    ) {
        if self.sessions.get(&conn).is_none_or(|s| s.id != session) {
            return;
        }
        if failed {
            self.end(conn, None, cx);
            self.reject_no_session(conn, true, now, cx);
        } else {
            self.close(conn, cx);
        }
    }

    /// The application consumed `n` credit units of `session`: return them (CREDIT).
    pub(crate) fn on_consumed(
        &mut self,
        conn: ConnId,
        session: SessionId,
        n: u64,
        now: Instant,
        cx: &mut Ctx<'_>,
    ) {
        let room = self.id;
        let Some(Session {
            id,
            state: State::Live(live),
        }) = self.sessions.get_mut(&conn)
        else {
            return;
        };
        if *id != session {
            return;
        }
        match live.credit(&room, conn, n) {
            Ok(frame) => cx.out.push(Action::Send(frame)),
            Err(e) => self.fail(conn, e, now, cx),
        }
    }

    /// A peer frame (the payload of a DELIVER) from `from`.
    pub(crate) fn on_frame(
        &mut self,
        from: ConnId,
        payload: Vec<u8>,
        now: Instant,
        cx: &mut Ctx<'_>,
    ) {
        let Some((&k, body)) = payload.split_first() else {
            return;
        };
        // The peer is engaging: no fallback handshake towards it.
        self.announced.remove(&from);
        if Handshake::opens(k) {
            // Charged before any crypto: a flood of openings costs a few answers at most.
            if !cx.limit.allow(from, now) {
                return cx.log.limited(now);
            }
            if !self.sessions.contains_key(&from) && self.sessions.len() >= MAX_SESSIONS_PER_TOPIC {
                let e = SessionError::TooManySessions {
                    max: MAX_SESSIONS_PER_TOPIC,
                };
                return cx.refused(RelayError::session(from, e), now);
            }
            return self.on_open(from, k, body, now, cx);
        }
        match k {
            kind::HS2 | kind::HS3 => self.on_handshake(from, k, body, now, cx),
            kind::LEGACY_HS2 => self.on_legacy(from, k, now, cx),
            kind::REJECT => self.on_reject(from, body, now, cx),
            _ => self.on_session_frame(from, payload, now, cx),
        }
    }

    fn local<'a>(topic: &'a TopicHash, room: &'a RoomId, cx: &Ctx<'a>) -> Local<'a> {
        Local {
            identity: cx.identity,
            topic,
            room,
            encryption: cx.encryption,
            window: cx.window,
            mults: cx.mults,
        }
    }

    /// Starts a handshake with `peer`, unless one is under way or done: the peer may have
    /// started first (e.g. its HS1 arrived before our JOINED, which relay nodes sharing rooms
    /// over NATS can do), and starting another would replace a working session.
    fn start(&mut self, peer: ConnId, now: Instant, cx: &mut Ctx<'_>) {
        if self.sessions.contains_key(&peer) {
            return;
        }
        let (topic, room) = (self.topic, self.id);
        match Handshake::initiate(Self::local(&topic, &room, cx)) {
            Ok((hs, opening)) => {
                let id = cx.new_session_id();
                self.sessions.insert(
                    peer,
                    Session {
                        id,
                        state: State::Pending { hs, started: now },
                    },
                );
                for frame in opening {
                    self.send(peer, &frame, cx);
                }
            }
            Err(e) => cx.record(RelayError::session(peer, e)),
        }
    }

    /// An opening frame (HS1 or HELLO).
    fn on_open(&mut self, from: ConnId, k: u8, body: &[u8], now: Instant, cx: &mut Ctx<'_>) {
        if let Some(Session {
            state: State::Pending { hs, .. },
            ..
        }) = self.sessions.get(&from)
        {
            if hs.expects(k) {
                // Encryption off, both sent HELLO: each one's HELLO answers the other's.
                return self.on_handshake(from, k, body, now, cx);
            }
            if hs.is_opening() && matches!(k, kind::HS1 | kind::LEGACY_HS1) && cx.me < from {
                // Both started; the lower connection id's attempt wins (the peer answers ours).
                return;
            }
        }
        let (topic, room) = (self.topic, self.id);
        match Handshake::respond(Self::local(&topic, &room, cx), k, body) {
            // A version probe from a peer of this version: its HS1 is what counts.
            Ok(None) => {}
            Ok(Some(step)) => {
                // The peer started over (or won the tie-break): its attempt replaces ours.
                self.end(from, None, cx);
                let id = cx.new_session_id();
                self.step(from, id, step, now, cx);
            }
            Err(e) => self.refuse(from, e, now, cx),
        }
    }

    /// The next message of an attempt under way (HS2, HS3, or a HELLO answering ours).
    fn on_handshake(&mut self, from: ConnId, k: u8, body: &[u8], now: Instant, cx: &mut Ctx<'_>) {
        let expected = matches!(
            self.sessions.get(&from),
            Some(Session { state: State::Pending { hs, .. }, .. }) if hs.expects(k)
        );
        if !expected {
            return;
        }
        let Some(Session {
            id,
            state: State::Pending { hs, .. },
        }) = self.sessions.remove(&from)
        else {
            return;
        };
        let (topic, room) = (self.topic, self.id);
        match hs.read(Self::local(&topic, &room, cx), k, body) {
            Ok(step) => self.step(from, id, step, now, cx),
            Err(e) => self.refuse(from, e, now, cx),
        }
    }

    /// An old responder's answer to this side's version probe: refused with REJECT (version
    /// mismatch), so both sides name the cause.
    fn on_legacy(&mut self, from: ConnId, k: u8, now: Instant, cx: &mut Ctx<'_>) {
        let legacy = matches!(
            self.sessions.get(&from),
            Some(Session { state: State::Pending { hs, .. }, .. }) if hs.expects_legacy(k)
        );
        if legacy {
            let e = SessionError::VersionMismatch {
                local: wire::SESSION_VERSION,
                remote: LEGACY_VERSION,
            };
            self.refuse(from, e, now, cx);
        }
    }

    fn step(&mut self, from: ConnId, id: SessionId, step: Step, now: Instant, cx: &mut Ctx<'_>) {
        match step {
            Step::Continue { hs, reply } => {
                self.sessions.insert(
                    from,
                    Session {
                        id,
                        state: State::Pending { hs, started: now },
                    },
                );
                self.send(from, &reply, cx);
            }
            Step::Done { reply, done } => {
                if let Some(reply) = reply {
                    self.send(from, &reply, cx);
                }
                self.establish(from, id, done, cx);
            }
        }
    }

    /// An attempt failed: answer it when the protocol does (REJECT for a mismatch) and record
    /// why. An established session with the peer stays.
    fn refuse(&mut self, from: ConnId, e: SessionError, now: Instant, cx: &mut Ctx<'_>) {
        if matches!(
            self.sessions.get(&from),
            Some(Session {
                state: State::Pending { .. },
                ..
            })
        ) {
            self.sessions.remove(&from);
        }
        if let Some(answer) = wire::reject_for(&e) {
            self.send(from, &answer, cx);
        }
        cx.refused(RelayError::session(from, e), now);
    }

    fn establish(&mut self, from: ConnId, id: SessionId, done: handshake::Done, cx: &mut Ctx<'_>) {
        if done.remote_key == cx.identity.public_bytes() {
            return cx.record(RelayError::session(from, SessionError::OwnIdentity));
        }
        let peer_id = hex::encode(done.remote_key);
        // A peer that reconnected to the relay shows up under a new connection id: the new
        // session replaces the old one, so there is still one connection per peer.
        let stale: Vec<ConnId> = self
            .sessions
            .iter()
            .filter(|(c, s)| **c != from && s.live().is_some_and(|l| l.peer_id == peer_id))
            .map(|(c, _)| *c)
            .collect();
        for c in stale {
            self.end(c, None, cx);
        }
        self.sessions.insert(
            from,
            Session {
                id,
                state: State::Live(Live::new(
                    peer_id.clone(),
                    done.cipher.clone(),
                    done.window,
                    cx.window,
                )),
            },
        );
        cx.out.push(Action::Open(Opened {
            room: self.id,
            conn: from,
            session: id,
            peer_id,
            cipher: done.cipher,
            window: done.window,
        }));
    }

    fn on_reject(&mut self, from: ConnId, body: &[u8], now: Instant, cx: &mut Ctx<'_>) {
        match wire::rejected(body, cx.encryption) {
            None => {
                // The peer ended our session without its CLOSE reaching us: end it here too
                // (a send waiting for credit then fails). A handshake in progress is not about
                // that session and stays.
                let Some(live) = self.sessions.get(&from).and_then(Session::live) else {
                    return;
                };
                let e = RelayError::peer_session(from, &live.peer_id, SessionError::NoSession);
                self.end(from, None, cx);
                cx.record(e);
            }
            Some(cause) => {
                self.end(from, None, cx);
                cx.refused(RelayError::session(from, cause), now);
            }
        }
    }

    /// A frame of an established session: control chunks are applied here; data frames are
    /// delivered, still sealed, within the window this side granted.
    fn on_session_frame(&mut self, from: ConnId, frame: Vec<u8>, now: Instant, cx: &mut Ctx<'_>) {
        let Some(session) = self.sessions.get_mut(&from) else {
            // A data frame for a session we do not have (it ended here without a CLOSE
            // reaching the peer): tell the peer, so that its send does not wait for credit
            // forever. Rate limited per peer.
            if matches!(frame.first(), Some(&(kind::SEALED | kind::PLAIN))) {
                self.reject_no_session(from, false, now, cx);
            }
            return;
        };
        let id = session.id;
        let State::Live(live) = &mut session.state else {
            return;
        };
        match live.on_frame(&frame) {
            Ok(Event::Data { cost }) => {
                let unread = !self.claimed && live.remaining() < LARGEST_FRAME_COST;
                cx.out.push(Action::Deliver {
                    session: id,
                    frame,
                    cost,
                });
                if unread {
                    // Nobody can read this session (no `connect` receiver: the transport only
                    // looked the topic up or announced it) and the peer may now be waiting for
                    // credit: close it rather than leave the peer blocked.
                    self.close_unread(from, cx);
                }
            }
            Ok(Event::Credit { limit }) => cx.out.push(Action::Credit { session: id, limit }),
            Ok(Event::Close) => self.end(from, None, cx),
            Err(e) => self.fail(from, e, now, cx),
        }
    }

    /// The established session with `from` broke the protocol: its connection gets the error,
    /// the peer a REJECT (no session, so that its send does not wait for credit forever).
    fn fail(&mut self, from: ConnId, cause: SessionError, now: Instant, cx: &mut Ctx<'_>) {
        let Some(live) = self.sessions.get(&from).and_then(Session::live) else {
            return;
        };
        let e = RelayError::peer_session(from, &live.peer_id, cause);
        self.end(from, Some(e.clone()), cx);
        self.reject_no_session(from, true, now, cx);
        cx.record(e);
    }

    fn close_unread(&mut self, from: ConnId, cx: &mut Ctx<'_>) {
        let Some(live) = self.sessions.get(&from).and_then(Session::live) else {
            return;
        };
        let e = RelayError::peer_session(
            from,
            &live.peer_id,
            SessionError::Unread {
                window: live.granted(),
            },
        );
        self.close(from, cx);
        if self.members.contains(&from) {
            self.closed_unread.insert(from);
        }
        cx.record(e);
    }

    /// Ends the session with `conn`, telling the peer with CLOSE if it was established.
    fn close(&mut self, conn: ConnId, cx: &mut Ctx<'_>) {
        let room = self.id;
        if let Some(Session {
            id,
            state: State::Live(mut live),
        }) = self.sessions.remove(&conn)
        {
            match live.close(&room, conn) {
                Ok(frame) => cx.out.push(Action::Send(frame)),
                Err(_) => self.send(conn, &[kind::REJECT, reject::NO_SESSION], cx),
            }
            cx.out.push(Action::End {
                session: id,
                error: None,
            });
        }
    }

    /// Forgets the session with `conn`; an established one's connection ends (after `error`).
    fn end(&mut self, conn: ConnId, error: Option<RelayError>, cx: &mut Ctx<'_>) {
        if let Some(Session {
            id,
            state: State::Live(_),
        }) = self.sessions.remove(&conn)
        {
            cx.out.push(Action::End { session: id, error });
        }
    }

    /// Sends REJECT (no session) to `to` if one is due (see [`RejectLimit::due`]).
    fn reject_no_session(&mut self, to: ConnId, force: bool, now: Instant, cx: &mut Ctx<'_>) {
        if self.rejected.due(to, force, now) {
            self.send(to, &[kind::REJECT, reject::NO_SESSION], cx);
        }
    }

    fn send(&self, to: ConnId, peer_frame: &[u8], cx: &mut Ctx<'_>) {
        cx.out.push(Action::Send(protocol::encode_send(
            &self.id, to, peer_frame,
        )));
    }
}
