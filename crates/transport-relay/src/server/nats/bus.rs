//! The messages relay nodes exchange over NATS and their codec: a pure decoder over bytes
//! that never panics and allocates at most its input's length. Layout: `docs/relay-nats.md`.
//!
//! Every message starts with a type byte. A DELIVER is byte for byte the relay DELIVER frame
//! the receiving node hands to its clients (type `0x84`, see `docs/relay-protocol.md`), and a
//! DATAGRAM byte for byte the DATAGRAM_FROM frame (type `0x85`), so both are forwarded without
//! re-encoding and are never larger than a relay frame; the other types (`0xA0`..=`0xA5`) are
//! outside the relay protocol's.

use crate::protocol::{self, ConnId, DATAGRAM_OVERHEAD, DELIVER_OVERHEAD, RoomId};

/// Bus message type bytes.
pub(crate) mod kind {
    /// A relay DELIVER frame: a BROADCAST to a room, or a SEND to one connection.
    pub(crate) const DELIVER: u8 = crate::protocol::kind::DELIVER;
    /// A relay DATAGRAM_FROM frame: a DATAGRAM (`pluresdb-relay.v2`) to one connection.
    pub(crate) const DATAGRAM: u8 = crate::protocol::kind::DATAGRAM_FROM;
    /// `node:u32`: the node is alive.
    pub(crate) const HEARTBEAT: u8 = 0xA0;
    /// `node:u32`: the node shuts down; forget its members now.
    pub(crate) const GOODBYE: u8 = 0xA1;
    /// `room[32] conn:u64`: `conn` joined `room` on the publishing node.
    pub(crate) const MEMBER_JOINED: u8 = 0xA2;
    /// `room[32] conn:u64`: `conn` left `room` (or disconnected).
    pub(crate) const MEMBER_LEFT: u8 = 0xA3;
    /// `room[32]`, with a reply subject: who is in this room on your node?
    pub(crate) const MEMBERS_QUERY: u8 = 0xA4;
    /// `room[32] count:u32 conn:u64 × count`: the answering node's members of `room`.
    pub(crate) const MEMBERS: u8 = 0xA5;
}

/// One bus message; a DELIVER's payload is borrowed from the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BusMessage<'a> {
    /// A node is alive.
    Heartbeat { node: u32 },
    /// A node shuts down cleanly.
    Goodbye { node: u32 },
    /// A member joined a room on the publishing node.
    MemberJoined { room: RoomId, conn: ConnId },
    /// A member left a room on the publishing node.
    MemberLeft { room: RoomId, conn: ConnId },
    /// Asks every node for its members of a room.
    MembersQuery { room: RoomId },
    /// One node's members of a room.
    Members { room: RoomId, conns: Vec<ConnId> },
    /// Traffic for the publishing node's peers: the relay DELIVER frame, as is.
    Deliver {
        room: RoomId,
        from: ConnId,
        broadcast: bool,
        payload: &'a [u8],
    },
    /// A datagram for one of the receiving node's connections: the relay DATAGRAM_FROM
    /// frame, as is (the receiver is named by the subject).
    Datagram {
        room: RoomId,
        from: ConnId,
        segment: u16,
        payload: &'a [u8],
    },
}

/// Why bytes are not a bus message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BusError {
    #[error("empty relay bus message")]
    Empty,
    #[error("unknown relay bus message type {0:#04x}")]
    UnknownType(u8),
    #[error("relay bus message type {kind:#04x} has {got} bytes, needs {needed}")]
    Length { kind: u8, needed: usize, got: usize },
    #[error("relay bus MEMBERS lists {count} members but carries {got} bytes of ids")]
    BadCount { count: u32, got: usize },
    #[error("relay bus DELIVER has invalid flags {0:#04x}")]
    BadFlags(u8),
}

fn room_at(b: &[u8], at: usize) -> RoomId {
    let mut r = [0u8; 32];
    r.copy_from_slice(&b[at..at + 32]);
    r
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// Decodes one bus message. Pure: never panics, allocates at most the input's length.
pub(crate) fn decode(bytes: &[u8]) -> Result<BusMessage<'_>, BusError> {
    let (&kind, body) = bytes.split_first().ok_or(BusError::Empty)?;
    // Every index below is within `body`: each type checks its length first.
    let exact = |needed: usize| {
        if body.len() == needed {
            Ok(())
        } else {
            Err(BusError::Length {
                kind,
                needed,
                got: body.len(),
            })
        }
    };
    let at_least = |needed: usize| {
        if body.len() >= needed {
            Ok(())
        } else {
            Err(BusError::Length {
                kind,
                needed,
                got: body.len(),
            })
        }
    };
    Ok(match kind {
        kind::HEARTBEAT | kind::GOODBYE => {
            exact(4)?;
            let node = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            if kind == kind::HEARTBEAT {
                BusMessage::Heartbeat { node }
            } else {
                BusMessage::Goodbye { node }
            }
        }
        kind::MEMBER_JOINED | kind::MEMBER_LEFT => {
            exact(40)?;
            let (room, conn) = (room_at(body, 0), u64_at(body, 32));
            if kind == kind::MEMBER_JOINED {
                BusMessage::MemberJoined { room, conn }
            } else {
                BusMessage::MemberLeft { room, conn }
            }
        }
        kind::MEMBERS_QUERY => {
            exact(32)?;
            BusMessage::MembersQuery {
                room: room_at(body, 0),
            }
        }
        kind::MEMBERS => {
            at_least(36)?;
            let count = u32::from_be_bytes([body[32], body[33], body[34], body[35]]);
            let ids = &body[36..];
            if !ids.len().is_multiple_of(8) || (ids.len() / 8) as u64 != u64::from(count) {
                return Err(BusError::BadCount {
                    count,
                    got: ids.len(),
                });
            }
            BusMessage::Members {
                room: room_at(body, 0),
                conns: (0..ids.len() / 8).map(|i| u64_at(ids, i * 8)).collect(),
            }
        }
        kind::DELIVER => {
            at_least(DELIVER_OVERHEAD - 1)?;
            let flags = body[40];
            if flags & !1 != 0 {
                return Err(BusError::BadFlags(flags));
            }
            BusMessage::Deliver {
                room: room_at(body, 0),
                from: u64_at(body, 32),
                broadcast: flags == 1,
                payload: &body[41..],
            }
        }
        kind::DATAGRAM => {
            at_least(DATAGRAM_OVERHEAD - 1)?;
            BusMessage::Datagram {
                room: room_at(body, 0),
                from: u64_at(body, 32),
                segment: u16::from_be_bytes([body[40], body[41]]),
                payload: &body[42..],
            }
        }
        other => return Err(BusError::UnknownType(other)),
    })
}

impl BusMessage<'_> {
    /// The message's bytes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            BusMessage::Heartbeat { node } | BusMessage::Goodbye { node } => {
                let heartbeat = matches!(self, BusMessage::Heartbeat { .. });
                out.push(if heartbeat {
                    kind::HEARTBEAT
                } else {
                    kind::GOODBYE
                });
                out.extend_from_slice(&node.to_be_bytes());
            }
            BusMessage::MemberJoined { room, conn } | BusMessage::MemberLeft { room, conn } => {
                let joined = matches!(self, BusMessage::MemberJoined { .. });
                out.push(if joined {
                    kind::MEMBER_JOINED
                } else {
                    kind::MEMBER_LEFT
                });
                out.extend_from_slice(room);
                out.extend_from_slice(&conn.to_be_bytes());
            }
            BusMessage::MembersQuery { room } => {
                out.push(kind::MEMBERS_QUERY);
                out.extend_from_slice(room);
            }
            BusMessage::Members { room, conns } => {
                out.reserve(37 + 8 * conns.len());
                out.push(kind::MEMBERS);
                out.extend_from_slice(room);
                // A node has at most max_peers_per_room (≤ u32::MAX) members of a room.
                out.extend_from_slice(&u32::try_from(conns.len()).unwrap_or(0).to_be_bytes());
                for c in conns {
                    out.extend_from_slice(&c.to_be_bytes());
                }
            }
            BusMessage::Deliver {
                room,
                from,
                broadcast,
                payload,
            } => return protocol::encode_deliver(room, *from, *broadcast, payload),
            BusMessage::Datagram {
                room,
                from,
                segment,
                payload,
            } => {
                out.reserve(DATAGRAM_OVERHEAD + payload.len());
                out.extend_from_slice(&protocol::datagram_header(
                    kind::DATAGRAM,
                    room,
                    *from,
                    *segment,
                ));
                out.extend_from_slice(payload);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message() -> impl Strategy<Value = (u8, u32, RoomId, u64, Vec<u64>, bool, Vec<u8>)> {
        (
            0u8..8,
            any::<u32>(),
            any::<[u8; 32]>(),
            any::<u64>(),
            proptest::collection::vec(any::<u64>(), 0..40),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
    }

    fn build<'a>(
        (which, node, room, conn, conns, broadcast, payload): &'a (
            u8,
            u32,
            RoomId,
            u64,
            Vec<u64>,
            bool,
            Vec<u8>,
        ),
    ) -> BusMessage<'a> {
        let (node, room, conn) = (*node, *room, *conn);
        match which {
            0 => BusMessage::Heartbeat { node },
            1 => BusMessage::Goodbye { node },
            2 => BusMessage::MemberJoined { room, conn },
            3 => BusMessage::MemberLeft { room, conn },
            4 => BusMessage::MembersQuery { room },
            5 => BusMessage::Members {
                room,
                conns: conns.clone(),
            },
            6 => BusMessage::Deliver {
                room,
                from: conn,
                broadcast: *broadcast,
                payload,
            },
            _ => BusMessage::Datagram {
                room,
                from: conn,
                // The node id's low bits: any u16.
                segment: node as u16,
                payload,
            },
        }
    }

    proptest! {
        #[test]
        fn every_message_round_trips(m in message()) {
            let msg = build(&m);
            let bytes = msg.encode();
            prop_assert_eq!(decode(&bytes), Ok(msg));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(msg) = decode(&bytes) {
                prop_assert_eq!(msg.encode(), bytes);
            }
        }

        #[test]
        fn every_truncation_of_a_fixed_size_message_is_rejected(m in message(), extra in any::<u8>()) {
            let msg = build(&m);
            let bytes = msg.encode();
            if !matches!(msg, BusMessage::Deliver { .. } | BusMessage::Datagram { .. }) {
                for cut in 0..bytes.len() {
                    prop_assert!(decode(&bytes[..cut]).is_err());
                }
                let mut longer = bytes.clone();
                longer.push(extra);
                prop_assert!(decode(&longer).is_err());
            }
        }
    }

    #[test]
    fn a_deliver_is_the_relay_frame_clients_receive() {
        let msg = BusMessage::Deliver {
            room: [9; 32],
            from: 7 << 32 | 1,
            broadcast: true,
            payload: b"ciphertext",
        };
        let bytes = msg.encode();
        assert_eq!(
            bytes,
            protocol::encode_deliver(&[9; 32], 7 << 32 | 1, true, b"ciphertext")
        );
        assert_eq!(
            protocol::decode(&bytes),
            Ok(protocol::Frame::Relay(protocol::RelayFrame::Deliver {
                room: [9; 32],
                from: 7 << 32 | 1,
                broadcast: true,
                payload: b"ciphertext".to_vec(),
            }))
        );
        assert!(bytes.len() - b"ciphertext".len() == DELIVER_OVERHEAD);
    }

    #[test]
    fn a_datagram_is_the_relay_frame_clients_receive() {
        let msg = BusMessage::Datagram {
            room: [4; 32],
            from: 9 << 32 | 3,
            segment: 1200,
            payload: b"quic packets",
        };
        let bytes = msg.encode();
        assert_eq!(
            protocol::decode(&bytes),
            Ok(protocol::Frame::Relay(protocol::RelayFrame::Datagram {
                room: [4; 32],
                from: 9 << 32 | 3,
                segment: 1200,
                payload: b"quic packets".to_vec(),
            }))
        );
        assert_eq!(bytes.len(), DATAGRAM_OVERHEAD + b"quic packets".len());
        // The header alone is a datagram with no payload; one byte less is not.
        let empty = &bytes[..DATAGRAM_OVERHEAD];
        assert!(matches!(
            decode(empty),
            Ok(BusMessage::Datagram { payload: [], .. })
        ));
        assert_eq!(
            decode(&bytes[..DATAGRAM_OVERHEAD - 1]),
            Err(BusError::Length {
                kind: kind::DATAGRAM,
                needed: 42,
                got: 41
            })
        );
        // A client's DATAGRAM (type 0x07, naming the receiver) is not a bus message.
        let client = protocol::encode_datagram(&[4; 32], 1, 0, b"x");
        assert_eq!(decode(&client), Err(BusError::UnknownType(0x07)));
    }

    #[test]
    fn errors_are_specific() {
        assert_eq!(decode(&[]), Err(BusError::Empty));
        // A relay frame that is not a DELIVER is not a bus message (no reuse of PING etc.).
        for t in [0x01, 0x05, 0x06, 0x81, 0x82, 0x8F] {
            assert_eq!(decode(&[t; 41]), Err(BusError::UnknownType(t)));
        }
        assert_eq!(
            decode(&[kind::HEARTBEAT, 0, 0, 1]),
            Err(BusError::Length {
                kind: kind::HEARTBEAT,
                needed: 4,
                got: 3
            })
        );
        let mut deliver = protocol::encode_deliver(&[0; 32], 1, false, b"x");
        deliver[41] = 3;
        assert_eq!(decode(&deliver), Err(BusError::BadFlags(3)));
        assert_eq!(
            decode(&deliver[..41]),
            Err(BusError::Length {
                kind: kind::DELIVER,
                needed: 41,
                got: 40
            })
        );
        let mut members = BusMessage::Members {
            room: [0; 32],
            conns: vec![1, 2],
        }
        .encode();
        members.truncate(members.len() - 8);
        assert_eq!(
            decode(&members),
            Err(BusError::BadCount { count: 2, got: 8 })
        );
        assert_eq!(
            BusError::UnknownType(0x05).to_string(),
            "unknown relay bus message type 0x05"
        );
    }
}
