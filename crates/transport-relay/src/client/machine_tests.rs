//! Deterministic tests of the session machine: machines wired back to back through a
//! simulated relay ([`Pair`], in the spirit of quinn-proto's), no sockets, no clock.

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

#[test]
fn the_newcomer_starts_and_both_sides_count_the_session_established() {
    for encryption in [true, false] {
        let mut p = Pair::meet((1, encryption), (2, encryption));
        p.drive();
        let (a_key, b_key) = (p.sides[0].identity.peer_id(), p.sides[1].identity.peer_id());
        let (a, b) = (&p.sides[0], &p.sides[1]);
        assert_eq!(a.live().len(), 1, "{:?}", a.errors);
        assert_eq!(b.live().len(), 1, "{:?}", b.errors);
        assert_eq!(a.live()[0].peer_id, b_key);
        assert_eq!(b.live()[0].peer_id, a_key);
        assert_eq!(a.live()[0].window, FLOW_MIN_WINDOW_BYTES);
        assert_eq!(a.live()[0].cipher.is_some(), encryption);
        assert!(a.errors.is_empty() && b.errors.is_empty());
        assert_eq!((a.joined, b.joined), (1, 1));
        let peers = p.sides[0].machine.lookup(&topic()).unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].id, b_key);
    }
}

/// Both sides start (each was told of the other by JOINED): the lower connection id's
/// attempt completes, the other is dropped, one session results on each side.
#[test]
fn simultaneous_open_the_lower_connection_id_wins() {
    for (low, high) in [(1, 2), (2, 1)] {
        // The side listed first has id `low`, which is the lower one only the first time.
        let mut p = Pair::new([(low, true), (high, true)]);
        let now = p.now;
        p.sides[0].joined_with(&[high], now);
        p.sides[1].joined_with(&[low], now);
        let first_ids: Vec<_> = p.sides.iter().map(|s| s.machine.next_session - 1).collect();
        p.drive();
        for (i, s) in p.sides.iter().enumerate() {
            assert_eq!(s.live().len(), 1, "side {}: {:?}", s.me, s.errors);
            assert!(s.errors.is_empty(), "{:?}", s.errors);
            let kept_own = s.live()[0].session == first_ids[i];
            assert_eq!(
                kept_own,
                s.me == low.min(high),
                "side {} kept its own attempt: {kept_own}",
                s.me
            );
        }
    }
    // Encryption off: both HELLOs cross and answer each other; one session each.
    let mut p = Pair::new([(1, false), (2, false)]);
    let now = p.now;
    p.sides[0].joined_with(&[2], now);
    p.sides[1].joined_with(&[1], now);
    p.drive();
    assert!(
        p.sides
            .iter()
            .all(|s| s.live().len() == 1 && s.errors.is_empty())
    );
}

#[test]
fn a_peer_beyond_its_window_loses_the_session_and_is_told() {
    let mut p = Pair::meet((1, true), (2, true));
    p.drive();
    let now = p.now;
    let mut nonce = 0;
    let frames: Vec<Vec<u8>> = (0..3)
        .map(|_| p.sides[1].data_frame(0, &mut nonce, 60_000))
        .collect();
    let cost = frame_cost(frames[0].len());
    assert!(
        2 * cost <= u64::from(FLOW_MIN_WINDOW_BYTES) && 3 * cost > u64::from(FLOW_MIN_WINDOW_BYTES)
    );
    let a = p.side(1);
    for f in frames {
        a.deliver(2, f, now);
    }
    let session = a.opened[0].session;
    assert_eq!(a.delivered.len(), 2, "what fits the window is delivered");
    assert!(
        a.delivered
            .iter()
            .all(|(s, _, c)| *s == session && *c == cost)
    );
    let exceeded = SessionError::WindowExceeded {
        granted: u64::from(FLOW_MIN_WINDOW_BYTES),
        used: 3 * cost,
    };
    let [(ended, Some(err))] = &a.ended[..] else {
        panic!("{:?}", a.ended)
    };
    assert_eq!((*ended, err.session_cause()), (session, Some(&exceeded)));
    assert_eq!(a.causes(), [&exceeded]);
    assert_eq!(a.take_sent_to(2), [vec![kind::REJECT, reject::NO_SESSION]]);
    // The peer learns it has no session any more.
    let b_key = p.sides[0].identity.peer_id();
    p.side(2)
        .deliver(1, vec![kind::REJECT, reject::NO_SESSION], now);
    let b = p.side(2);
    assert!(b.live().is_empty());
    assert_eq!(b.causes(), [&SessionError::NoSession]);
    assert!(b.errors[0].to_string().contains(&b_key));
}

#[test]
fn a_session_version_mismatch_is_rejected_with_our_version() {
    let mut p = Pair::new([(1, false)]);
    let now = p.now;
    let a = p.side(1);
    a.joined_with(&[], now);
    let key = Identity::generate().unwrap().public_bytes();
    a.deliver(5, plain_hello(key, &[]), now); // version 1: no parameters
    a.deliver(6, plain_hello(key, &[9, 0, 0, 0, 0]), now); // a later version
    let reply = vec![kind::REJECT, reject::VERSION_MISMATCH, SESSION_VERSION];
    assert_eq!(a.take_sent_to(5), std::slice::from_ref(&reply));
    assert_eq!(a.take_sent_to(6), [reply]);
    let v = |remote| SessionError::VersionMismatch {
        local: SESSION_VERSION,
        remote,
    };
    assert_eq!(a.causes(), [&v(1), &v(9)]);
    assert!(a.opened.is_empty());
    // Rejected by a peer with another version: the attempt ends, named.
    a.joined_with(&[7], now);
    assert_eq!(a.take_sent_to(7).len(), 1, "HELLO to the member");
    a.deliver(7, vec![kind::REJECT, reject::VERSION_MISMATCH, 9], now);
    assert_eq!(a.causes().last(), Some(&&v(9)));
    p.advance(TIMEOUT);
    assert!(
        !p.sides[0]
            .causes()
            .iter()
            .any(|c| matches!(c, SessionError::HandshakeTimeout { .. })),
        "the rejected attempt is gone, not left to expire"
    );
}

/// An `XXpsk3` state of a session version 2 client in the room.
fn old_noise(id: &Identity, initiator: bool) -> snow::HandshakeState {
    let (t, r, mults) = (topic(), room(), ScalarMults::default());
    let local = Local {
        identity: id,
        topic: &t,
        room: &r,
        encryption: true,
        window: FLOW_MIN_WINDOW_BYTES,
        mults: &mults,
    };
    handshake::noise(local, "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s", 3, initiator).unwrap()
}

/// A session version 2 peer (`XXpsk3`) in either role: a version mismatch on this side, and
/// REJECT (version mismatch, our version) to it, which it reports as one too.
#[test]
fn an_xxpsk3_peer_is_refused_with_our_version_in_both_roles() {
    let mut p = Pair::new([(1, true)]);
    let now = p.now;
    let old = Identity::generate().unwrap();
    let reply = vec![kind::REJECT, reject::VERSION_MISMATCH, SESSION_VERSION];
    let v2 = SessionError::VersionMismatch {
        local: SESSION_VERSION,
        remote: 2,
    };
    let a = p.side(1);
    a.joined_with(&[], now);
    // It starts: its HS1 is XXpsk3 message 1, empty.
    let hs1 = handshake::write(&mut old_noise(&old, true), kind::LEGACY_HS1, &[]).unwrap();
    a.deliver(5, hs1, now);
    assert_eq!(a.take_sent_to(5), std::slice::from_ref(&reply));
    assert_eq!(a.causes(), [&v2]);
    // This side starts: the old peer ignores HS1 (a kind it does not know) and answers the
    // version probe with its HS2.
    a.joined_with(&[7], now);
    let sent = a.take_sent_to(7);
    assert_eq!((sent[0][0], sent[1][0]), (kind::HS1, kind::LEGACY_HS1));
    let mut r = old_noise(&old, false);
    handshake::read(&mut r, &sent[1][1..]).unwrap();
    let hs2 = handshake::write(&mut r, kind::LEGACY_HS2, &[2, 0, 2, 0, 0]).unwrap();
    a.deliver(7, hs2, now);
    assert_eq!(a.take_sent_to(7), [reply]);
    assert_eq!(a.causes(), [&v2, &v2]);
    assert!(a.opened.is_empty());
    p.advance(TIMEOUT);
    assert_eq!(
        p.sides[0].errors.len(),
        2,
        "the refused attempt does not expire too"
    );
    // And it reads our REJECT as a version mismatch with version 3.
    assert_eq!(
        wire::rejected(&[reject::VERSION_MISMATCH, SESSION_VERSION], true),
        Some(SessionError::VersionMismatch {
            local: SESSION_VERSION,
            remote: 3
        })
    );
}

/// Someone in the room without the topic: whatever HS1 it sends, nothing comes back (no
/// static key, no reply at all) and no curve arithmetic is done.
#[test]
fn an_hs1_without_the_topic_gets_no_answer_and_costs_no_dh() {
    let mut p = Pair::new([(1, true)]);
    let now = p.now;
    let a = p.side(1);
    a.joined_with(&[], now);
    let wrong = pluresdb_sync_core::derive_topic("another topic");
    let (r, mults, id) = (
        room(),
        ScalarMults::default(),
        Identity::generate().unwrap(),
    );
    let stranger = Local {
        identity: &id,
        topic: &wrong,
        room: &r,
        encryption: true,
        window: FLOW_MIN_WINDOW_BYTES,
        mults: &mults,
    };
    let (_, opening) = handshake::Handshake::initiate(stranger).unwrap();
    for (i, f) in opening.iter().enumerate() {
        a.deliver(10 + i as u64, f.clone(), now);
    }
    a.deliver(20, [&[kind::HS1][..], &[0u8; 48]].concat(), now);
    assert!(a.outbox.is_empty(), "{:?}", a.outbox);
    assert_eq!(a.machine.config.mults.get(), 0);
    assert!(matches!(
        a.causes()[..],
        [
            SessionError::Noise { message: 1, .. },
            SessionError::Noise { message: 1, .. }
        ]
    ));
}

/// One valid HS1 replayed 20,000 times by a room member, and 20,000 bogus ones: a burst of
/// answers and records, then one per interval, and a summary line instead of the rest.
#[test]
fn handshake_floods_are_rate_limited_per_remote_and_logged_in_summary() {
    let mut p = Pair::meet((1, true), (2, true));
    let now = p.now;
    let opening = p.side(2).take_sent_to(1);
    let hs1 = opening[0].clone();
    assert_eq!(hs1[0], kind::HS1);
    let a = p.side(1);
    for _ in 0..20_000 {
        a.deliver(66, hs1.clone(), now);
    }
    let replies = a.take_sent_to(66);
    assert_eq!(replies.len(), HANDSHAKE_BURST as usize);
    assert!(replies.iter().all(|r| r[0] == kind::HS2));
    let dhs = a.machine.config.mults.get();
    assert_eq!(
        dhs,
        4 * u64::from(HANDSHAKE_BURST),
        "e, ee, s, es per answer"
    );
    for i in 0..20_000u32 {
        a.deliver(77, [&[kind::HS1][..], &[i as u8; 48]].concat(), now);
    }
    assert!(a.outbox.is_empty());
    assert_eq!(a.errors.len(), REFUSALS_LOGGED_PER_INTERVAL as usize);
    assert_eq!(a.machine.config.mults.get(), dhs, "bogus ones cost no DH");
    // The real initiator is not held back by either flood.
    for f in opening {
        p.side(1).deliver(2, f, now);
    }
    p.drive();
    assert_eq!(p.sides[0].live().len(), 1, "{:?}", p.sides[0].errors);
    assert_eq!(p.sides[1].live().len(), 1, "{:?}", p.sides[1].errors);
    p.advance(REFUSAL_LOG_INTERVAL);
    let q = p.sides[0].quieted.clone();
    assert_eq!(
        q,
        [Quieted {
            refused: u64::from(HANDSHAKE_BURST) - u64::from(REFUSALS_LOGGED_PER_INTERVAL),
            limited: 2 * (20_000 - u64::from(HANDSHAKE_BURST)),
            over: REFUSAL_LOG_INTERVAL
        }]
    );
}

#[test]
fn an_encryption_mismatch_is_named_on_both_sides_in_both_roles() {
    for (a_enc, b_enc) in [(true, false), (false, true)] {
        let mut p = Pair::meet((1, a_enc), (2, b_enc));
        p.drive();
        for s in &p.sides {
            let local = s.me == 1 && a_enc || s.me == 2 && b_enc;
            assert_eq!(
                s.causes(),
                [&SessionError::EncryptionMismatch {
                    local,
                    remote: !local
                }],
                "side {} (encryption {local})",
                s.me
            );
            assert!(s.opened.is_empty());
        }
        p.advance(TIMEOUT);
        assert!(
            p.sides.iter().all(|s| s.errors.len() == 1),
            "nothing left to expire"
        );
    }
}

#[test]
fn a_frame_for_a_session_that_is_gone_gets_reject_no_session_once_a_second() {
    let mut p = Pair::meet((1, true), (2, true));
    p.drive();
    let mut nonce = 0;
    let frames: Vec<Vec<u8>> = (0..4)
        .map(|_| p.sides[1].data_frame(0, &mut nonce, 100))
        .collect();
    let now = p.now;
    let a = p.side(1);
    let session = a.opened[0].session;
    // A's connection failed (e.g. a frame that did not decrypt): the peer is told at once.
    let actions = a.machine.on_closed(room(), 2, session, true, now);
    a.absorb(actions);
    let no_session = vec![kind::REJECT, reject::NO_SESSION];
    assert_eq!(a.take_sent_to(2), std::slice::from_ref(&no_session));
    // Frames still coming for it are answered at most once per interval.
    a.deliver(2, frames[0].clone(), now);
    a.deliver(2, frames[1].clone(), now + REJECT_NO_SESSION_INTERVAL / 2);
    assert!(a.take_sent_to(2).is_empty());
    a.deliver(2, frames[2].clone(), now + REJECT_NO_SESSION_INTERVAL);
    assert_eq!(a.take_sent_to(2), std::slice::from_ref(&no_session));
    // A stranger that never had a session gets one too.
    a.deliver(9, frames[3].clone(), now);
    assert_eq!(a.take_sent_to(9), [no_session]);
    assert!(a.delivered.is_empty());
}

#[test]
fn reject_no_session_ends_the_established_session_but_not_a_handshake() {
    let mut p = Pair::meet((1, true), (2, true));
    let now = p.now;
    // B's HS1 is in flight: a REJECT (no session) now is not about this attempt.
    p.side(2)
        .deliver(1, vec![kind::REJECT, reject::NO_SESSION], now);
    assert!(p.sides[1].errors.is_empty());
    p.drive();
    assert_eq!(p.sides[1].live().len(), 1, "the handshake went on");
    p.side(2)
        .deliver(1, vec![kind::REJECT, reject::NO_SESSION], now);
    let b = p.side(2);
    assert!(b.live().is_empty());
    assert_eq!(b.ended.len(), 1);
    assert_eq!(b.ended[0].1, None, "its receive just ends");
    assert_eq!(b.causes(), [&SessionError::NoSession]);
    assert!(b.take_sent_to(1).is_empty(), "a REJECT is never answered");
}

/// The initiator started over (its first attempt's answer was lost): the new HS1 replaces
/// the attempt under way, and one session results.
#[test]
fn a_duplicate_handshake_start_replaces_the_attempt_under_way() {
    let mut p = Pair::meet((1, true), (2, true));
    let now = p.now;
    let first = p.side(2).take_sent_to(1);
    assert_eq!(first.len(), 2, "HS1 and the version probe");
    assert_eq!((first[0][0], first[1][0]), (kind::HS1, kind::LEGACY_HS1));
    for f in first {
        p.side(1).deliver(2, f, now);
    }
    let lost = p.side(1).take_sent_to(2);
    assert_eq!(lost[0][0], kind::HS2, "answered, but the answer is lost");
    // B starts over: a new machine with the same identity and relay connection.
    let id = p.sides[1].identity.clone();
    p.sides[1] = Side::new(2, true, id, now);
    p.sides[1].joined_with(&[1], now);
    p.drive();
    assert_eq!(p.sides[0].opened.len(), 1, "{:?}", p.sides[0].errors);
    assert_eq!(p.sides[1].live().len(), 1, "{:?}", p.sides[1].errors);
    p.advance(TIMEOUT);
    assert!(p.sides[0].errors.is_empty(), "{:?}", p.sides[0].errors);
    assert_eq!(p.sides[0].live().len(), 1);
}

#[test]
fn a_peer_that_reconnects_replaces_its_old_session() {
    let mut p = Pair::meet((1, true), (2, true));
    p.drive();
    let now = p.now;
    let old = p.sides[0].opened[0].session;
    // B's relay socket was replaced: same key, new connection id 3; 2 has not left yet.
    let id = p.sides[1].identity.clone();
    p.sides.push(Side::new(3, true, id, now));
    p.side(1).frame(
        RelayFrame::PeerJoined {
            room: room(),
            peer: 3,
        },
        now,
    );
    p.side(3).joined_with(&[1], now);
    p.drive();
    let a = &p.sides[0];
    assert_eq!(a.ended, [(old, None)]);
    assert_eq!(a.live().len(), 1);
    assert_eq!(a.live()[0].conn, 3);
    assert_eq!(p.sides[0].machine.lookup(&topic()).unwrap().len(), 1);
}

#[test]
fn handshakes_expire() {
    let mut p = Pair::meet((1, true), (2, true));
    let now = p.now;
    for f in p.side(2).take_sent_to(1) {
        p.side(1).deliver(2, f, now);
    }
    let _lost_hs2 = p.side(1).take_sent_to(2);
    p.advance(TIMEOUT - Duration::from_millis(1));
    assert!(p.sides.iter().all(|s| s.errors.is_empty()));
    p.advance(Duration::from_millis(1));
    for s in &p.sides {
        assert_eq!(
            s.causes(),
            [&SessionError::HandshakeTimeout {
                ms: TIMEOUT.as_millis() as u64
            }],
            "side {}",
            s.me
        );
    }
    assert!(p.sides[0].machine.lookup(&topic()).unwrap().is_empty());
}

#[test]
fn a_peer_announced_only_by_peer_joined_is_greeted_after_the_fallback() {
    let mut p = Pair::new([(1, true)]);
    let now = p.now;
    let a = p.side(1);
    a.joined_with(&[], now);
    a.frame(
        RelayFrame::PeerJoined {
            room: room(),
            peer: 2,
        },
        now,
    );
    p.advance(PEER_JOINED_FALLBACK - Duration::from_millis(1));
    assert!(p.sides[0].outbox.is_empty(), "the newcomer starts first");
    p.advance(Duration::from_millis(1));
    let sent = p.side(1).take_sent_to(2);
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0][0], kind::HS1);
}

#[test]
fn peer_left_ends_the_session() {
    let mut p = Pair::meet((1, true), (2, true));
    p.drive();
    let now = p.now;
    let session = p.sides[0].opened[0].session;
    p.side(1).frame(
        RelayFrame::PeerLeft {
            room: room(),
            peer: 2,
        },
        now,
    );
    assert_eq!(p.sides[0].ended, [(session, None)]);
    assert!(p.sides[0].machine.lookup(&topic()).unwrap().is_empty());
}

#[test]
fn disconnect_closes_every_live_session() {
    let mut p = Pair::new([(1, true), (2, true), (3, false)]);
    let now = p.now;
    p.side(1).joined_with(&[], now);
    p.side(2).joined_with(&[1], now);
    p.drive();
    // 3 speaks plain: its attempt is rejected, not a live session.
    p.side(3).joined_with(&[1], now);
    p.drive();
    assert_eq!(p.sides[0].live().len(), 1);
    let actions = p.side(1).machine.close_all();
    p.side(1).absorb(actions);
    let close = p.side(1).outbox.clone();
    assert_eq!(close.len(), 1, "one CLOSE, to the live session only");
    p.drive();
    assert!(p.sides.iter().all(|s| s.live().is_empty()));
    assert_eq!(p.sides[1].ended[0].1, None, "a clean close, not a failure");
    assert!(p.sides[1].errors.is_empty());
}

#[test]
fn consumed_credit_reaches_the_sender_as_a_higher_limit() {
    for encryption in [true, false] {
        let mut p = Pair::meet((1, encryption), (2, encryption));
        p.drive();
        let now = p.now;
        let session = p.sides[0].opened[0].session;
        let actions = p.side(1).machine.on_consumed(room(), 2, session, 1000, now);
        p.side(1).absorb(actions);
        // A stale session id returns nothing.
        let actions = p
            .side(1)
            .machine
            .on_consumed(room(), 2, session + 99, 5, now);
        assert!(actions.is_empty());
        p.drive();
        let b = &p.sides[1];
        assert_eq!(
            b.credits,
            [(b.opened[0].session, u64::from(FLOW_MIN_WINDOW_BYTES) + 1000)]
        );
        assert!(b.delivered.is_empty(), "CREDIT is not data");
        assert!(b.errors.is_empty());
    }
}

#[test]
fn a_session_nobody_reads_is_closed_when_its_window_fills_and_reopened_when_claimed() {
    let now = Instant::now();
    // A only looked the topic up: it joins without claiming the room.
    let a = Side::joining(1, false, Identity::generate().unwrap(), false, now);
    let b = Side::new(2, false, Identity::generate().unwrap(), now);
    let mut p = Pair {
        sides: vec![a, b],
        now,
    };
    p.side(1).joined_with(&[], now);
    p.side(1).frame(
        RelayFrame::PeerJoined {
            room: room(),
            peer: 2,
        },
        now,
    );
    p.side(2).joined_with(&[1], now);
    p.drive();
    let mut nonce = 0;
    let frame = p.sides[1].data_frame(0, &mut nonce, 60_000);
    p.side(1).deliver(2, frame.clone(), now);
    assert!(p.sides[0].live().len() == 1, "room left: still open");
    p.side(1).deliver(2, frame, now);
    let a = p.side(1);
    assert!(a.live().is_empty());
    assert!(matches!(a.causes()[..], [SessionError::Unread { .. }]));
    let sent = a.take_sent_to(2);
    assert_eq!(sent, [vec![kind::PLAIN, chunk::CLOSE]]);
    // `connect` now: A handshakes with B again.
    let actions = a.machine.join(topic(), true, now);
    a.absorb(actions);
    assert_eq!(a.joined, 2, "already joined: answered at once");
    let hello = a.take_sent_to(2);
    assert_eq!(hello.len(), 1);
    assert_eq!(hello[0][0], kind::HELLO);
}

proptest::proptest! {
    /// Whatever peers send, in any order, the machine neither panics nor answers with more
    /// than one frame per frame received.
    #[test]
    fn hostile_peer_frames_never_panic(
        frames in proptest::collection::vec(
            (1u64..5, proptest::sample::select(vec![
                kind::HS1, kind::HS2, kind::HS3, kind::SEALED, kind::HELLO, kind::PLAIN,
                kind::REJECT, kind::LEGACY_HS1, kind::LEGACY_HS2, 0x03, 0x00, 0x7F,
            ]), proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)),
            0..40,
        ),
        encryption in proptest::prelude::any::<bool>(),
    ) {
        let now = Instant::now();
        let mut a = Side::new(9, encryption, Identity::generate().unwrap(), now);
        a.joined_with(&[1, 2], now);
        a.outbox.clear();
        for (from, k, body) in frames {
            a.deliver(from, [&[k][..], &body].concat(), now);
            proptest::prop_assert!(a.outbox.len() <= 1, "{:?}", a.outbox);
            a.outbox.clear();
        }
    }
}
