//! The transport's session machine, pure: every room, the relay frames that concern them,
//! and what the driver must do about each input (`Vec<Action>`). No I/O, no awaits, no clock
//! of its own (every input carries `now`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pluresdb_sync_core::topic::{Domain, derive_from_topic};
use pluresdb_sync_core::{Identity, PeerInfo, TopicHash};

use super::action::{Action, SessionId};
use super::flow::FLOW_WINDOW_BYTES;
use super::handshake_limit::{HandshakeLimit, MAX_TRACKED_REMOTES};
use super::noise_crypto::ScalarMults;
use super::refusal_log::RefusalLog;
use super::room::Room;
use super::room_ctx::Ctx;
use crate::RelayError;
use crate::protocol::{self, ClientFrame, ConnId, Frame, RelayFrame, RoomId};

/// What a machine is made of.
pub(crate) struct Config {
    pub(crate) identity: Identity,
    pub(crate) encryption: bool,
    /// How long a handshake may take.
    pub(crate) handshake_timeout: Duration,
    /// The window this side grants each peer ([`FLOW_WINDOW_BYTES`] outside tests).
    pub(crate) window: u32,
    /// Where handshakes count their scalar multiplications.
    pub(crate) mults: ScalarMults,
}

impl Config {
    /// The settings a transport runs with.
    pub(crate) fn new(
        identity: Identity,
        encryption: bool,
        handshake_timeout: Duration,
        mults: ScalarMults,
    ) -> Self {
        Self {
            identity,
            encryption,
            handshake_timeout,
            window: FLOW_WINDOW_BYTES,
            mults,
        }
    }
}

/// Every room of one transport and its sessions.
pub(crate) struct Machine {
    config: Config,
    /// This side's relay connection id on the current socket.
    me: ConnId,
    rooms: HashMap<RoomId, Room>,
    next_session: SessionId,
    /// Handshake openings per remote connection (across rooms: one remote socket).
    limit: HandshakeLimit,
    /// Which refusals are logged one by one.
    log: RefusalLog,
}

/// Runs `f` on room `$room` with the shared context, collecting its actions.
macro_rules! in_room {
    ($self:ident, $room:expr, |$r:ident, $cx:ident| $body:expr) => {{
        let mut out = Vec::new();
        if let Some($r) = $self.rooms.get_mut(&$room) {
            let $cx = &mut Ctx {
                identity: &$self.config.identity,
                encryption: $self.config.encryption,
                timeout: $self.config.handshake_timeout,
                window: $self.config.window,
                mults: &$self.config.mults,
                me: $self.me,
                next_session: &mut $self.next_session,
                limit: &mut $self.limit,
                log: &mut $self.log,
                out: &mut out,
            };
            $body;
        }
        out
    }};
}

impl Machine {
    /// A machine with no rooms.
    pub(crate) fn new(config: Config) -> Self {
        Self {
            config,
            me: 0,
            rooms: HashMap::new(),
            next_session: 1,
            limit: HandshakeLimit::new(MAX_TRACKED_REMOTES),
            log: RefusalLog::new(),
        }
    }

    /// Runs `f` on every room with the shared context.
    fn each_room(&mut self, mut f: impl FnMut(&mut Room, &mut Ctx<'_>)) -> Vec<Action> {
        let mut out = Vec::new();
        let cx = &mut Ctx {
            identity: &self.config.identity,
            encryption: self.config.encryption,
            timeout: self.config.handshake_timeout,
            window: self.config.window,
            mults: &self.config.mults,
            me: self.me,
            next_session: &mut self.next_session,
            limit: &mut self.limit,
            log: &mut self.log,
            out: &mut out,
        };
        for room in self.rooms.values_mut() {
            f(room, cx);
        }
        out
    }

    /// Joins `topic`'s room (JOIN, once). `claim`: an application reads its connections. When
    /// the room is already joined, [`Action::Joined`] answers at once.
    pub(crate) fn join(&mut self, topic: TopicHash, claim: bool, now: Instant) -> Vec<Action> {
        let room = derive_from_topic(&topic, Domain::RelayRoom);
        if let std::collections::hash_map::Entry::Vacant(e) = self.rooms.entry(room) {
            e.insert(Room::new(topic, room, claim));
            return vec![Action::Send(
                Frame::Client(ClientFrame::Join { room }).encode(),
            )];
        }
        in_room!(self, room, |r, cx| {
            if claim && !r.claimed {
                r.claim(now, cx);
            }
            if r.joined {
                cx.out.push(Action::Joined { room });
            }
        })
    }

    /// The established sessions of `topic`'s room; `None` when it is not joined.
    pub(crate) fn lookup(&self, topic: &TopicHash) -> Option<Vec<PeerInfo>> {
        let room = derive_from_topic(topic, Domain::RelayRoom);
        self.rooms.get(&room).map(Room::peers)
    }

    /// A new socket is up with relay connection id `me`: JOIN every room again.
    pub(crate) fn on_socket_up(&mut self, me: ConnId) -> Vec<Action> {
        self.me = me;
        self.rooms
            .keys()
            .map(|&room| Action::Send(Frame::Client(ClientFrame::Join { room }).encode()))
            .collect()
    }

    /// The socket is gone: every session ends (rooms are kept for the rejoin).
    pub(crate) fn on_socket_lost(&mut self) -> Vec<Action> {
        self.limit.clear();
        self.each_room(|r, cx| r.on_socket_lost(cx))
    }

    /// The transport disconnects: CLOSE for every established session.
    pub(crate) fn close_all(&mut self) -> Vec<Action> {
        self.each_room(|r, cx| r.close_all(cx))
    }

    /// Handshake expiry, the PEER_JOINED fallback and the refusal summary; call it about
    /// twice a second.
    pub(crate) fn on_timeout(&mut self, now: Instant) -> Vec<Action> {
        let mut out = self.each_room(|r, cx| r.on_timeout(now, cx));
        if let Some(q) = self.log.on_timeout(now) {
            out.push(Action::Quieted(q));
        }
        out
    }

    /// The connection of `session` ended on this side (`failed`: after a protocol error).
    pub(crate) fn on_closed(
        &mut self,
        room: RoomId,
        conn: ConnId,
        session: SessionId,
        failed: bool,
        now: Instant,
    ) -> Vec<Action> {
        in_room!(self, room, |r, cx| r
            .on_closed(conn, session, failed, now, cx))
    }

    /// The application consumed `n` credit units of `session`.
    pub(crate) fn on_consumed(
        &mut self,
        room: RoomId,
        conn: ConnId,
        session: SessionId,
        n: u64,
        now: Instant,
    ) -> Vec<Action> {
        in_room!(self, room, |r, cx| r.on_consumed(conn, session, n, now, cx))
    }

    /// A frame from the relay.
    pub(crate) fn on_relay_frame(&mut self, f: RelayFrame, now: Instant) -> Vec<Action> {
        match f {
            RelayFrame::Joined { room, peers } => {
                in_room!(self, room, |r, cx| r.on_joined(peers, now, cx))
            }
            RelayFrame::PeerJoined { room, peer } => {
                in_room!(self, room, |r, cx| r.on_peer_joined(peer, now, cx))
            }
            RelayFrame::PeerLeft { room, peer } => {
                in_room!(self, room, |r, cx| r.on_peer_left(peer, cx))
            }
            RelayFrame::Deliver {
                room,
                from,
                payload,
                ..
            } => in_room!(self, room, |r, cx| r.on_frame(from, payload, now, cx)),
            RelayFrame::Error {
                code,
                about,
                room,
                message,
            } => self.on_error(code, about, room, message),
            // Sessions never use datagrams (and a v1 socket is never sent one).
            RelayFrame::Welcome { .. } | RelayFrame::Datagram { .. } => Vec::new(),
        }
    }

    fn on_error(&mut self, code: u16, about: u8, room: RoomId, message: String) -> Vec<Action> {
        let error = RelayError::Refused {
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
        if about == protocol::kind::JOIN && self.rooms.get(&room).is_some_and(|r| !r.joined) {
            self.rooms.remove(&room);
            return vec![Action::JoinFailed { room, error }];
        }
        // A SEND to a peer that just left races its PEER_LEFT: not worth reporting.
        if code == protocol::error_code::UNKNOWN_PEER {
            return Vec::new();
        }
        vec![Action::Record(error)]
    }
}

#[cfg(test)]
#[path = "machine_tests/mod.rs"]
mod tests;
