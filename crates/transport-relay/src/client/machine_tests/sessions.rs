//! Sessions once set up: expiry, peers announced late or leaving, disconnect, credit,
//! unread sessions, hostile frames.

use super::*;

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
