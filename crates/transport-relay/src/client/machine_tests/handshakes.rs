//! Handshakes: who starts, the simultaneous-open tie-break, windows, versions, old and
//! keyless peers, floods, encryption mismatches, REJECT, duplicates and reconnects.

use super::*;

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
