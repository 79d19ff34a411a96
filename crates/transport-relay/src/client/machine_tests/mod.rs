//! Deterministic tests of the session machine: machines wired back to back through a
//! simulated relay ([`Pair`], in the spirit of quinn-proto's), no sockets, no clock. This
//! file is the harness; `handshakes.rs` and `sessions.rs` hold the cases.

mod handshakes;
mod sessions;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use pluresdb_sync_core::Identity;
use pluresdb_sync_core::topic::{Domain, TopicHash, derive_from_topic};

use super::{Config, Machine};
use crate::RelayError;
use crate::client::action::{Action, Opened, SessionId};
use crate::client::flow::{FLOW_MIN_WINDOW_BYTES, frame_cost};
use crate::client::handshake::{self, Local};
use crate::client::handshake_limit::HANDSHAKE_BURST;
use crate::client::noise_crypto::ScalarMults;
use crate::client::refusal_log::{Quieted, REFUSAL_LOG_INTERVAL, REFUSALS_LOGGED_PER_INTERVAL};
use crate::client::reject_limit::REJECT_NO_SESSION_INTERVAL;
use crate::client::room::PEER_JOINED_FALLBACK;
use crate::client::wire::{self, SESSION_VERSION, chunk, kind, reject};
use crate::error::SessionError;
use crate::protocol::{ClientFrame, ConnId, Frame, RelayFrame, RoomId};

const TIMEOUT: Duration = Duration::from_secs(10);

fn topic() -> TopicHash {
    pluresdb_sync_core::derive_topic("machine tests")
}

fn room() -> RoomId {
    derive_from_topic(&topic(), Domain::RelayRoom)
}

/// One client: its machine, its relay connection id, and what its machine asked for.
struct Side {
    machine: Machine,
    me: ConnId,
    identity: Identity,
    opened: Vec<Opened>,
    ended: Vec<(SessionId, Option<RelayError>)>,
    delivered: Vec<(SessionId, Vec<u8>, u64)>,
    credits: Vec<(SessionId, u64)>,
    errors: Vec<RelayError>,
    quieted: Vec<Quieted>,
    /// Peer frames it sent and the relay has not delivered yet: (to, payload).
    outbox: VecDeque<(ConnId, Vec<u8>)>,
    joins: usize,
    joined: usize,
}

impl Side {
    /// A client with relay connection id `me` in the room (claimed), granting the smallest
    /// window a peer accepts.
    fn new(me: ConnId, encryption: bool, identity: Identity, now: Instant) -> Self {
        Self::joining(me, encryption, identity, true, now)
    }

    /// A client joining the room, `claim`ing it (`connect`) or not (`lookup`, `announce`).
    fn joining(
        me: ConnId,
        encryption: bool,
        identity: Identity,
        claim: bool,
        now: Instant,
    ) -> Self {
        let mut s = Self {
            machine: Machine::new(Config {
                identity: identity.clone(),
                encryption,
                handshake_timeout: TIMEOUT,
                window: FLOW_MIN_WINDOW_BYTES,
                mults: ScalarMults::default(),
            }),
            me,
            identity,
            opened: Vec::new(),
            ended: Vec::new(),
            delivered: Vec::new(),
            credits: Vec::new(),
            errors: Vec::new(),
            quieted: Vec::new(),
            outbox: VecDeque::new(),
            joins: 0,
            joined: 0,
        };
        let up = s.machine.on_socket_up(me);
        s.absorb(up);
        let join = s.machine.join(topic(), claim, now);
        s.absorb(join);
        s
    }

    fn absorb(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send(bytes) => match crate::protocol::decode(&bytes) {
                    Ok(Frame::Client(ClientFrame::Send { to, payload, .. })) => {
                        self.outbox.push_back((to, payload))
                    }
                    Ok(Frame::Client(ClientFrame::Join { .. })) => self.joins += 1,
                    other => panic!("unexpected frame {other:?}"),
                },
                Action::Open(o) => self.opened.push(o),
                Action::Deliver {
                    session,
                    frame,
                    cost,
                } => self.delivered.push((session, frame, cost)),
                Action::Credit { session, limit } => self.credits.push((session, limit)),
                Action::End { session, error } => self.ended.push((session, error)),
                Action::Record(e) => self.errors.push(e),
                Action::Quieted(q) => self.quieted.push(q),
                Action::Joined { .. } => self.joined += 1,
                Action::JoinFailed { error, .. } => panic!("join failed: {error}"),
            }
        }
    }

    fn frame(&mut self, f: RelayFrame, now: Instant) {
        let actions = self.machine.on_relay_frame(f, now);
        self.absorb(actions);
    }

    /// The relay's JOINED, listing `peers`.
    fn joined_with(&mut self, peers: &[ConnId], now: Instant) {
        let f = RelayFrame::Joined {
            room: room(),
            peers: peers.to_vec(),
        };
        self.frame(f, now);
    }

    /// A peer frame from `from`.
    fn deliver(&mut self, from: ConnId, payload: Vec<u8>, now: Instant) {
        let f = RelayFrame::Deliver {
            room: room(),
            from,
            broadcast: false,
            payload,
        };
        self.frame(f, now);
    }

    /// The sessions opened and not ended.
    fn live(&self) -> Vec<&Opened> {
        self.opened
            .iter()
            .filter(|o| !self.ended.iter().any(|(s, _)| *s == o.session))
            .collect()
    }

    /// The causes of the session errors recorded.
    fn causes(&self) -> Vec<&SessionError> {
        self.errors
            .iter()
            .filter_map(RelayError::session_cause)
            .collect()
    }

    /// The peer frames it sent to `to` (and drops them).
    fn take_sent_to(&mut self, to: ConnId) -> Vec<Vec<u8>> {
        let (mine, rest) = self.outbox.drain(..).partition(|(t, _)| *t == to);
        self.outbox = rest;
        mine.into_iter().map(|(_, p)| p).collect()
    }

    /// A data chunk of `len` bytes sealed for `session` as its connection would send it.
    fn data_frame(&self, session: usize, nonce: &mut u64, len: usize) -> Vec<u8> {
        let o = &self.opened[session];
        let f = wire::seal(
            o.cipher.as_deref(),
            nonce,
            &room(),
            o.conn,
            chunk::MORE,
            &vec![7u8; len],
        )
        .unwrap();
        f[41..].to_vec()
    }
}

/// Clients wired through a simulated relay that delivers every SEND in order.
struct Pair {
    sides: Vec<Side>,
    now: Instant,
}

impl Pair {
    fn new(sides: impl IntoIterator<Item = (ConnId, bool)>) -> Self {
        let now = Instant::now();
        let sides = sides
            .into_iter()
            .map(|(me, enc)| Side::new(me, enc, Identity::generate().unwrap(), now))
            .collect();
        Self { sides, now }
    }

    /// Two clients, the first in the room before the second (the newcomer, which starts).
    fn meet(a: (ConnId, bool), b: (ConnId, bool)) -> Self {
        let mut p = Self::new([a, b]);
        let now = p.now;
        p.sides[0].joined_with(&[], now);
        p.sides[0].frame(
            RelayFrame::PeerJoined {
                room: room(),
                peer: b.0,
            },
            now,
        );
        p.sides[1].joined_with(&[a.0], now);
        p
    }

    fn side(&mut self, me: ConnId) -> &mut Side {
        self.sides.iter_mut().find(|s| s.me == me).unwrap()
    }

    /// Delivers every frame sent until nothing is in flight.
    fn drive(&mut self) {
        for _ in 0..100 {
            let mut moved = false;
            for i in 0..self.sides.len() {
                while let Some((to, payload)) = self.sides[i].outbox.pop_front() {
                    moved = true;
                    let (from, now) = (self.sides[i].me, self.now);
                    if let Some(s) = self.sides.iter_mut().find(|s| s.me == to) {
                        s.deliver(from, payload, now);
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the machines never went quiet");
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        let now = self.now;
        for s in &mut self.sides {
            let actions = s.machine.on_timeout(now);
            s.absorb(actions);
        }
    }
}

fn plain_hello(key: [u8; 32], params: &[u8]) -> Vec<u8> {
    [&[kind::HELLO][..], &key, params].concat()
}
