//! Property tests of the codec: encode and decode agree, the in-place view agrees with
//! decode, and no input makes decode panic.

use super::*;
use proptest::prelude::*;

fn room() -> impl Strategy<Value = RoomId> {
    any::<[u8; 32]>()
}

fn frame() -> impl Strategy<Value = Frame> {
    let payload = proptest::collection::vec(any::<u8>(), 0..300);
    prop_oneof![
        room().prop_map(|room| Frame::Client(ClientFrame::Join { room })),
        room().prop_map(|room| Frame::Client(ClientFrame::Leave { room })),
        (room(), any::<u64>(), payload.clone()).prop_map(|(room, to, payload)| {
            Frame::Client(ClientFrame::Send { room, to, payload })
        }),
        (room(), payload.clone())
            .prop_map(|(room, payload)| Frame::Client(ClientFrame::Broadcast { room, payload })),
        (room(), any::<u64>(), any::<u16>(), payload.clone()).prop_map(
            |(room, to, segment, payload)| Frame::Client(ClientFrame::Datagram {
                room,
                to,
                segment,
                payload
            })
        ),
        (room(), any::<u64>(), any::<u16>(), payload.clone()).prop_map(
            |(room, from, segment, payload)| Frame::Relay(RelayFrame::Datagram {
                room,
                from,
                segment,
                payload
            })
        ),
        any::<u64>().prop_map(Frame::Ping),
        any::<u64>().prop_map(Frame::Pong),
        (any::<u64>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
            |(conn, max_frame, max_rooms, max_peers)| Frame::Relay(RelayFrame::Welcome {
                conn,
                max_frame,
                max_rooms,
                max_peers
            })
        ),
        (room(), proptest::collection::vec(any::<u64>(), 0..40))
            .prop_map(|(room, peers)| Frame::Relay(RelayFrame::Joined { room, peers })),
        (room(), any::<u64>())
            .prop_map(|(room, peer)| Frame::Relay(RelayFrame::PeerJoined { room, peer })),
        (room(), any::<u64>())
            .prop_map(|(room, peer)| Frame::Relay(RelayFrame::PeerLeft { room, peer })),
        (room(), any::<u64>(), any::<bool>(), payload).prop_map(
            |(room, from, broadcast, payload)| Frame::Relay(RelayFrame::Deliver {
                room,
                from,
                broadcast,
                payload
            })
        ),
        (any::<u16>(), any::<u8>(), room(), "\\PC{0,60}").prop_map(
            |(code, about, room, message)| Frame::Relay(RelayFrame::Error {
                code,
                about,
                room,
                message
            })
        ),
    ]
}

proptest! {
    #[test]
    fn roundtrip(f in frame()) {
        let bytes = f.encode();
        prop_assert_eq!(decode(&bytes).unwrap(), f);
    }

    #[cfg(feature = "server")]
    #[test]
    fn forward_view_agrees_with_decode(f in frame(), cut in any::<usize>()) {
        let bytes = f.encode();
        let bytes = &bytes[..cut % (bytes.len() + 1)];
        let view = decode_forward(bytes);
        match decode(bytes) {
            Ok(Frame::Client(ClientFrame::Send { room, to, payload })) => prop_assert_eq!(
                view,
                Some(ForwardView::Send { room, to, payload: &payload })
            ),
            Ok(Frame::Client(ClientFrame::Broadcast { room, payload })) => prop_assert_eq!(
                view,
                Some(ForwardView::Broadcast { room, payload: &payload })
            ),
            Ok(Frame::Client(ClientFrame::Datagram { room, to, segment, payload })) => {
                prop_assert_eq!(
                    view,
                    Some(ForwardView::Datagram { room, to, segment, payload: &payload })
                )
            }
            _ => prop_assert_eq!(view, None),
        }
    }

    #[test]
    fn datagram_view_agrees_with_decode(f in frame(), cut in any::<usize>()) {
        let bytes = f.encode();
        let bytes = &bytes[..cut % (bytes.len() + 1)];
        let view = decode_datagram_from(bytes);
        match decode(bytes) {
            Ok(Frame::Relay(RelayFrame::Datagram { room, from, segment, payload })) => {
                prop_assert_eq!(view, Some(DatagramFrom { room, from, segment, payload: &payload }))
            }
            _ => prop_assert_eq!(view, None),
        }
    }

    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn fixed_size_frames_reject_every_truncation_and_extension(f in frame(), extra in any::<u8>()) {
        let bytes = f.encode();
        let variable = matches!(
            f,
            Frame::Client(
                ClientFrame::Send { .. }
                    | ClientFrame::Broadcast { .. }
                    | ClientFrame::Datagram { .. }
            ) | Frame::Relay(
                RelayFrame::Deliver { .. } | RelayFrame::Error { .. } | RelayFrame::Datagram { .. }
            )
        );
        if !variable {
            for cut in 0..bytes.len() {
                prop_assert!(decode(&bytes[..cut]).is_err());
            }
            let mut longer = bytes.clone();
            longer.push(extra);
            prop_assert!(decode(&longer).is_err());
        }
    }

    #[test]
    fn mutated_type_byte_is_rejected_or_reparsed(f in frame(), t in any::<u8>()) {
        let mut bytes = f.encode();
        bytes[0] = t;
        // Either an error or some frame; never a panic.
        if let Ok(g) = decode(&bytes) {
            prop_assert_eq!(g.encode(), bytes);
        }
    }
}

#[test]
fn errors_are_specific() {
    assert_eq!(decode(&[]), Err(FrameError::Empty));
    assert_eq!(decode(&[0x42]), Err(FrameError::UnknownType(0x42)));
    assert_eq!(
        decode(&[kind::JOIN, 1, 2]),
        Err(FrameError::Truncated {
            kind: kind::JOIN,
            needed: 32,
            got: 2
        })
    );
    let mut join = Frame::Client(ClientFrame::Join { room: [1; 32] }).encode();
    join.push(0);
    assert_eq!(
        decode(&join),
        Err(FrameError::Trailing {
            kind: kind::JOIN,
            extra: 1
        })
    );
    let mut deliver = encode_deliver(&[0; 32], 1, false, b"x");
    deliver[41] = 2;
    assert!(matches!(decode(&deliver), Err(FrameError::BadFlags { .. })));
    let mut joined = Frame::Relay(RelayFrame::Joined {
        room: [0; 32],
        peers: vec![1, 2],
    })
    .encode();
    joined.truncate(joined.len() - 8);
    assert!(matches!(
        decode(&joined),
        Err(FrameError::BadCount { count: 2, .. })
    ));
    assert_eq!(
        FrameError::UnknownType(9).close_code(),
        close_code::UNKNOWN_TYPE
    );
    assert_eq!(FrameError::Empty.close_code(), close_code::MALFORMED);
    assert_eq!(
        FrameError::UnknownType(0x42).to_string(),
        "unknown relay frame type 0x42"
    );
}

#[test]
fn long_error_messages_are_cut_on_a_char_boundary() {
    let msg = "é".repeat(200);
    let f = Frame::Relay(RelayFrame::Error {
        code: 1,
        about: 3,
        room: [0; 32],
        message: msg,
    });
    match decode(&f.encode()).unwrap() {
        Frame::Relay(RelayFrame::Error { message, .. }) => {
            assert!(message.len() <= MAX_ERROR_MESSAGE_BYTES);
            assert_eq!(message.len(), 256);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn deliver_overhead_matches_the_encoding() {
    assert_eq!(
        encode_deliver(&[0; 32], 1, true, &[]).len(),
        DELIVER_OVERHEAD
    );
    assert_eq!(encode_send(&[0; 32], 1, &[]).len(), DELIVER_OVERHEAD - 1);
    assert_eq!(
        encode_datagram(&[0; 32], 1, 0, &[]).len(),
        DATAGRAM_OVERHEAD
    );
    let from = Frame::Relay(RelayFrame::Datagram {
        room: [0; 32],
        from: 1,
        segment: 0,
        payload: Vec::new(),
    });
    assert_eq!(from.encode().len(), DATAGRAM_OVERHEAD);
}

#[test]
fn datagram_layout_is_as_documented() {
    let bytes = encode_datagram(&[9; 32], 0x0102, 1200, b"quic");
    assert_eq!(bytes[0], 0x07);
    assert_eq!(&bytes[1..33], &[9; 32]);
    assert_eq!(&bytes[33..41], &0x0102u64.to_be_bytes());
    assert_eq!(&bytes[41..43], &1200u16.to_be_bytes());
    assert_eq!(&bytes[43..], b"quic");
    let mut from = bytes.clone();
    from[0] = kind::DATAGRAM_FROM;
    assert_eq!(
        decode_datagram_from(&from),
        Some(DatagramFrom {
            room: [9; 32],
            from: 0x0102,
            segment: 1200,
            payload: b"quic"
        })
    );
    assert_eq!(
        decode_datagram_from(&bytes),
        None,
        "a client frame is not DATAGRAM_FROM"
    );
    assert!(matches!(
        decode(&bytes[..42]),
        Err(FrameError::Truncated {
            kind: kind::DATAGRAM,
            needed: 42,
            got: 41
        })
    ));
}
