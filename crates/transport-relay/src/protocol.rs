//! The relay wire protocol, version 1: frame types, limits, error and close codes, and a pure
//! encoder/decoder. Written down in `docs/relay-protocol.md`.
//!
//! ```
//! use pluresdb_sync_transport_relay::protocol::{decode, ClientFrame, Frame};
//!
//! let frame = Frame::Client(ClientFrame::Send { room: [7; 32], to: 42, payload: b"hi".to_vec() });
//! let bytes = frame.encode();
//! assert_eq!(decode(&bytes).unwrap(), frame);
//! assert!(decode(&bytes[..10]).is_err());
//! ```

/// The WebSocket subprotocol a client must offer and the relay selects.
pub const SUBPROTOCOL: &str = "pluresdb-relay.v1";

/// The default largest relay frame (one WebSocket message), 64 KiB: big enough that a 16 MiB
/// message is only 257 frames, small enough that one read never allocates much.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;

/// The smallest frame limit a relay may announce: room for headers and useful payload.
pub const MIN_MAX_FRAME_BYTES: usize = 1024;
/// The largest frame limit a relay may announce (and the most a client reads per frame).
pub const MAX_MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Bytes a DELIVER frame adds around its payload: type, room, sender id, flags. A SEND or
/// BROADCAST payload may be at most `max_frame - DELIVER_OVERHEAD` bytes so that it can be
/// forwarded.
pub const DELIVER_OVERHEAD: usize = 1 + 32 + 8 + 1;

/// The longest human-readable message in an ERROR frame.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 256;

/// A room id: `derive_from_topic(topic, Domain::RelayRoom)`.
pub type RoomId = [u8; 32];

/// A connection id the relay assigned.
pub type ConnId = u64;

/// Frame type bytes.
pub mod kind {
    /// Client: join a room.
    pub const JOIN: u8 = 0x01;
    /// Client: leave a room.
    pub const LEAVE: u8 = 0x02;
    /// Client: send to one peer.
    pub const SEND: u8 = 0x03;
    /// Client: send to every other member.
    pub const BROADCAST: u8 = 0x04;
    /// Both: ping.
    pub const PING: u8 = 0x05;
    /// Both: pong.
    pub const PONG: u8 = 0x06;
    /// Relay: first frame, connection id and limits.
    pub const WELCOME: u8 = 0x80;
    /// Relay: join succeeded, with the members already present.
    pub const JOINED: u8 = 0x81;
    /// Relay: a peer joined.
    pub const PEER_JOINED: u8 = 0x82;
    /// Relay: a peer left.
    pub const PEER_LEFT: u8 = 0x83;
    /// Relay: a payload from a peer.
    pub const DELIVER: u8 = 0x84;
    /// Relay: a request failed.
    pub const ERROR: u8 = 0x8F;
}

/// ERROR frame codes: a request failed, the connection stays open.
pub mod error_code {
    /// SEND, BROADCAST or LEAVE for a room not joined.
    pub const NOT_IN_ROOM: u16 = 1;
    /// SEND to a connection id not in the room.
    pub const UNKNOWN_PEER: u16 = 2;
    /// JOIN of a full room.
    pub const ROOM_FULL: u16 = 3;
    /// JOIN beyond the per-connection room limit.
    pub const TOO_MANY_ROOMS: u16 = 4;
    /// JOIN of a room already joined.
    pub const ALREADY_JOINED: u16 = 5;
}

/// WebSocket close codes the relay uses.
pub mod close_code {
    /// The relay shuts down.
    pub const GOING_AWAY: u16 = 1001;
    /// A message over the frame limit.
    pub const FRAME_TOO_LARGE: u16 = 1009;
    /// Truncated body, trailing bytes, bad flags.
    pub const MALFORMED: u16 = 4000;
    /// A type not defined for this direction.
    pub const UNKNOWN_TYPE: u16 = 4001;
    /// A text message.
    pub const TEXT_FRAME: u16 = 4002;
    /// Join or idle timeout.
    pub const TIMEOUT: u16 = 4008;
    /// The send queue stayed full.
    pub const SLOW_CONSUMER: u16 = 4009;
}

/// A frame from a client to the relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientFrame {
    /// Join a room.
    Join {
        /// The room.
        room: RoomId,
    },
    /// Leave a room.
    Leave {
        /// The room.
        room: RoomId,
    },
    /// Deliver a payload to one member of a room.
    Send {
        /// The room both are in.
        room: RoomId,
        /// The receiving connection.
        to: ConnId,
        /// Opaque bytes.
        payload: Vec<u8>,
    },
    /// Deliver a payload to every other member.
    Broadcast {
        /// The room.
        room: RoomId,
        /// Opaque bytes.
        payload: Vec<u8>,
    },
}

/// A frame from the relay to a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayFrame {
    /// The first frame: who you are, what the limits are.
    Welcome {
        /// Your connection id.
        conn: ConnId,
        /// The largest frame the relay accepts.
        max_frame: u32,
        /// The most rooms one connection may join.
        max_rooms: u32,
        /// The most members a room may have.
        max_peers: u32,
    },
    /// A join succeeded.
    Joined {
        /// The room.
        room: RoomId,
        /// The members already there.
        peers: Vec<ConnId>,
    },
    /// A peer joined a room you are in.
    PeerJoined {
        /// The room.
        room: RoomId,
        /// The peer.
        peer: ConnId,
    },
    /// A peer left a room you are in.
    PeerLeft {
        /// The room.
        room: RoomId,
        /// The peer.
        peer: ConnId,
    },
    /// A payload from a peer.
    Deliver {
        /// The room.
        room: RoomId,
        /// The sender.
        from: ConnId,
        /// Whether it was a BROADCAST.
        broadcast: bool,
        /// Opaque bytes.
        payload: Vec<u8>,
    },
    /// A request failed.
    Error {
        /// One of [`error_code`].
        code: u16,
        /// The type of the frame that caused it.
        about: u8,
        /// The room concerned (zeros when none).
        room: RoomId,
        /// For humans.
        message: String,
    },
}

/// Any relay frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Client to relay.
    Client(ClientFrame),
    /// Relay to client.
    Relay(RelayFrame),
    /// Either direction.
    Ping(u64),
    /// Either direction.
    Pong(u64),
}

/// Why bytes are not a valid frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The input is empty.
    #[error("empty relay frame")]
    Empty,
    /// The type byte is unknown.
    #[error("unknown relay frame type {0:#04x}")]
    UnknownType(u8),
    /// The body ended early.
    #[error("relay frame type {kind:#04x} truncated: needs {needed} bytes, got {got}")]
    Truncated {
        /// The frame type.
        kind: u8,
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes it had.
        got: usize,
    },
    /// Bytes after a complete body.
    #[error("relay frame type {kind:#04x} has {extra} trailing bytes")]
    Trailing {
        /// The frame type.
        kind: u8,
        /// How many.
        extra: usize,
    },
    /// Flag bits that must be zero are set.
    #[error("relay frame type {kind:#04x} has invalid flags {flags:#04x}")]
    BadFlags {
        /// The frame type.
        kind: u8,
        /// The flags.
        flags: u8,
    },
    /// An ERROR message that is too long or not UTF-8.
    #[error("relay error message is invalid: {0}")]
    BadMessage(String),
    /// A JOINED list longer than the frame holds.
    #[error("relay JOINED frame lists {count} peers but carries {got} bytes of ids")]
    BadCount {
        /// The declared count.
        count: u32,
        /// Bytes present.
        got: usize,
    },
}

impl FrameError {
    /// The close code the relay uses when a client sends this.
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::UnknownType(_) => close_code::UNKNOWN_TYPE,
            _ => close_code::MALFORMED,
        }
    }
}

struct Reader<'a> {
    kind: u8,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(FrameError::Truncated {
                kind: self.kind,
                needed: self.pos.saturating_add(n),
                got: self.bytes.len(),
            }),
        }
    }
    fn room(&mut self) -> Result<RoomId, FrameError> {
        let mut r = [0u8; 32];
        r.copy_from_slice(self.take(32)?);
        Ok(r)
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(b))
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let mut b = [0u8; 2];
        b.copy_from_slice(self.take(2)?);
        Ok(u16::from_be_bytes(b))
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.bytes[self.pos..];
        self.pos = self.bytes.len();
        s
    }
    fn finish(&self) -> Result<(), FrameError> {
        if self.pos == self.bytes.len() {
            Ok(())
        } else {
            Err(FrameError::Trailing {
                kind: self.kind,
                extra: self.bytes.len() - self.pos,
            })
        }
    }
}

/// Decodes one frame. Pure: never panics, allocates at most the input's length.
pub fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
    let (&kind, body) = bytes.split_first().ok_or(FrameError::Empty)?;
    let mut r = Reader {
        kind,
        bytes: body,
        pos: 0,
    };
    let frame = match kind {
        kind::JOIN => Frame::Client(ClientFrame::Join { room: r.room()? }),
        kind::LEAVE => Frame::Client(ClientFrame::Leave { room: r.room()? }),
        kind::SEND => Frame::Client(ClientFrame::Send {
            room: r.room()?,
            to: r.u64()?,
            payload: r.rest().to_vec(),
        }),
        kind::BROADCAST => Frame::Client(ClientFrame::Broadcast {
            room: r.room()?,
            payload: r.rest().to_vec(),
        }),
        kind::PING => Frame::Ping(r.u64()?),
        kind::PONG => Frame::Pong(r.u64()?),
        kind::WELCOME => Frame::Relay(RelayFrame::Welcome {
            conn: r.u64()?,
            max_frame: r.u32()?,
            max_rooms: r.u32()?,
            max_peers: r.u32()?,
        }),
        kind::JOINED => {
            let room = r.room()?;
            let count = r.u32()?;
            let ids = r.rest();
            if !ids.len().is_multiple_of(8) || (ids.len() / 8) as u64 != u64::from(count) {
                return Err(FrameError::BadCount {
                    count,
                    got: ids.len(),
                });
            }
            let peers = ids
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    u64::from_be_bytes(b)
                })
                .collect();
            Frame::Relay(RelayFrame::Joined { room, peers })
        }
        kind::PEER_JOINED => Frame::Relay(RelayFrame::PeerJoined {
            room: r.room()?,
            peer: r.u64()?,
        }),
        kind::PEER_LEFT => Frame::Relay(RelayFrame::PeerLeft {
            room: r.room()?,
            peer: r.u64()?,
        }),
        kind::DELIVER => {
            let room = r.room()?;
            let from = r.u64()?;
            let flags = r.u8()?;
            if flags & !1 != 0 {
                return Err(FrameError::BadFlags { kind, flags });
            }
            Frame::Relay(RelayFrame::Deliver {
                room,
                from,
                broadcast: flags & 1 == 1,
                payload: r.rest().to_vec(),
            })
        }
        kind::ERROR => {
            let code = r.u16()?;
            let about = r.u8()?;
            let room = r.room()?;
            let text = r.rest();
            if text.len() > MAX_ERROR_MESSAGE_BYTES {
                return Err(FrameError::BadMessage(format!(
                    "{} bytes exceeds {MAX_ERROR_MESSAGE_BYTES}",
                    text.len()
                )));
            }
            let message = std::str::from_utf8(text)
                .map_err(|e| FrameError::BadMessage(e.to_string()))?
                .to_owned();
            Frame::Relay(RelayFrame::Error {
                code,
                about,
                room,
                message,
            })
        }
        other => return Err(FrameError::UnknownType(other)),
    };
    r.finish()?;
    Ok(frame)
}

impl Frame {
    /// Encodes the frame. ERROR messages longer than [`MAX_ERROR_MESSAGE_BYTES`] are cut at a
    /// character boundary.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Frame::Client(c) => match c {
                ClientFrame::Join { room } => {
                    out.push(kind::JOIN);
                    out.extend_from_slice(room);
                }
                ClientFrame::Leave { room } => {
                    out.push(kind::LEAVE);
                    out.extend_from_slice(room);
                }
                ClientFrame::Send { room, to, payload } => {
                    return encode_send(room, *to, payload);
                }
                ClientFrame::Broadcast { room, payload } => {
                    out.reserve(33 + payload.len());
                    out.push(kind::BROADCAST);
                    out.extend_from_slice(room);
                    out.extend_from_slice(payload);
                }
            },
            Frame::Relay(r) => match r {
                RelayFrame::Welcome {
                    conn,
                    max_frame,
                    max_rooms,
                    max_peers,
                } => {
                    out.push(kind::WELCOME);
                    out.extend_from_slice(&conn.to_be_bytes());
                    out.extend_from_slice(&max_frame.to_be_bytes());
                    out.extend_from_slice(&max_rooms.to_be_bytes());
                    out.extend_from_slice(&max_peers.to_be_bytes());
                }
                RelayFrame::Joined { room, peers } => {
                    out.push(kind::JOINED);
                    out.extend_from_slice(room);
                    out.extend_from_slice(&(peers.len() as u32).to_be_bytes());
                    for p in peers {
                        out.extend_from_slice(&p.to_be_bytes());
                    }
                }
                RelayFrame::PeerJoined { room, peer } => {
                    out.push(kind::PEER_JOINED);
                    out.extend_from_slice(room);
                    out.extend_from_slice(&peer.to_be_bytes());
                }
                RelayFrame::PeerLeft { room, peer } => {
                    out.push(kind::PEER_LEFT);
                    out.extend_from_slice(room);
                    out.extend_from_slice(&peer.to_be_bytes());
                }
                RelayFrame::Deliver {
                    room,
                    from,
                    broadcast,
                    payload,
                } => return encode_deliver(room, *from, *broadcast, payload),
                RelayFrame::Error {
                    code,
                    about,
                    room,
                    message,
                } => {
                    out.push(kind::ERROR);
                    out.extend_from_slice(&code.to_be_bytes());
                    out.push(*about);
                    out.extend_from_slice(room);
                    out.extend_from_slice(
                        truncate_utf8(message, MAX_ERROR_MESSAGE_BYTES).as_bytes(),
                    );
                }
            },
            Frame::Ping(n) => {
                out.push(kind::PING);
                out.extend_from_slice(&n.to_be_bytes());
            }
            Frame::Pong(n) => {
                out.push(kind::PONG);
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
        out
    }
}

/// A SEND or BROADCAST frame viewed in place, without copying its payload: the relay's hot
/// path. Agrees with [`decode`] on every input (property-tested).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardView<'a> {
    /// A SEND.
    Send {
        /// The room.
        room: RoomId,
        /// The receiver.
        to: ConnId,
        /// The payload, borrowed from the input.
        payload: &'a [u8],
    },
    /// A BROADCAST.
    Broadcast {
        /// The room.
        room: RoomId,
        /// The payload, borrowed from the input.
        payload: &'a [u8],
    },
}

/// Views a SEND or BROADCAST frame in place; `None` for any other or malformed input (use
/// [`decode`] for those, and for the error).
pub fn decode_forward(bytes: &[u8]) -> Option<ForwardView<'_>> {
    let (&kind, body) = bytes.split_first()?;
    let room = |b: &[u8]| -> Option<RoomId> { b.get(..32)?.try_into().ok() };
    match kind {
        kind::SEND => {
            let to = u64::from_be_bytes(body.get(32..40)?.try_into().ok()?);
            Some(ForwardView::Send {
                room: room(body)?,
                to,
                payload: &body[40..],
            })
        }
        kind::BROADCAST => Some(ForwardView::Broadcast {
            room: room(body)?,
            payload: body.get(32..)?,
        }),
        _ => None,
    }
}

/// Encodes a SEND frame without building a [`ClientFrame`] (no payload copy beyond the output).
pub fn encode_send(room: &RoomId, to: ConnId, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(41 + payload.len());
    out.push(kind::SEND);
    out.extend_from_slice(room);
    out.extend_from_slice(&to.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Encodes a DELIVER frame.
pub fn encode_deliver(room: &RoomId, from: ConnId, broadcast: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DELIVER_OVERHEAD + payload.len());
    out.extend_from_slice(&deliver_header(room, from, broadcast));
    out.extend_from_slice(payload);
    out
}

/// The bytes of a DELIVER frame before its payload.
pub fn deliver_header(room: &RoomId, from: ConnId, broadcast: bool) -> [u8; DELIVER_OVERHEAD] {
    let mut h = [0u8; DELIVER_OVERHEAD];
    h[0] = kind::DELIVER;
    h[1..33].copy_from_slice(room);
    h[33..41].copy_from_slice(&from.to_be_bytes());
    h[41] = u8::from(broadcast);
    h
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
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
            (room(), payload.clone()).prop_map(|(room, payload)| Frame::Client(
                ClientFrame::Broadcast { room, payload }
            )),
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
                Frame::Client(ClientFrame::Send { .. } | ClientFrame::Broadcast { .. })
                    | Frame::Relay(RelayFrame::Deliver { .. } | RelayFrame::Error { .. })
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
    }
}
