//! Encoding relay frames, including the copy-free SEND and DELIVER encoders of the hot path.

use super::{
    ClientFrame, ConnId, DATAGRAM_OVERHEAD, DELIVER_OVERHEAD, Frame, MAX_ERROR_MESSAGE_BYTES,
    RelayFrame, RoomId, kind,
};

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
                ClientFrame::Datagram {
                    room,
                    to,
                    segment,
                    payload,
                } => return encode_datagram(room, *to, *segment, payload),
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
                RelayFrame::Datagram {
                    room,
                    from,
                    segment,
                    payload,
                } => {
                    let mut out =
                        datagram_header(kind::DATAGRAM_FROM, room, *from, *segment).to_vec();
                    out.extend_from_slice(payload);
                    return out;
                }
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

/// Encodes a SEND frame without building a [`ClientFrame`] (no payload copy beyond the output).
pub fn encode_send(room: &RoomId, to: ConnId, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(41 + payload.len());
    out.push(kind::SEND);
    out.extend_from_slice(room);
    out.extend_from_slice(&to.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Encodes a DATAGRAM frame (client to relay) without building a [`ClientFrame`].
pub fn encode_datagram(room: &RoomId, to: ConnId, segment: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DATAGRAM_OVERHEAD + payload.len());
    out.extend_from_slice(&datagram_header(kind::DATAGRAM, room, to, segment));
    out.extend_from_slice(payload);
    out
}

/// The bytes of a DATAGRAM (`kind::DATAGRAM`, with the receiver) or DATAGRAM_FROM
/// (`kind::DATAGRAM_FROM`, with the sender) frame before its payload: both headers have the
/// same layout and length.
pub(crate) fn datagram_header(
    kind: u8,
    room: &RoomId,
    conn: ConnId,
    segment: u16,
) -> [u8; DATAGRAM_OVERHEAD] {
    let mut h = [0u8; DATAGRAM_OVERHEAD];
    h[0] = kind;
    h[1..33].copy_from_slice(room);
    h[33..41].copy_from_slice(&conn.to_be_bytes());
    h[41..43].copy_from_slice(&segment.to_be_bytes());
    h
}

/// Encodes a DELIVER frame.
pub fn encode_deliver(room: &RoomId, from: ConnId, broadcast: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DELIVER_OVERHEAD + payload.len());
    out.extend_from_slice(&deliver_header(room, from, broadcast));
    out.extend_from_slice(payload);
    out
}

/// The bytes of a DELIVER frame before its payload.
pub(crate) fn deliver_header(
    room: &RoomId,
    from: ConnId,
    broadcast: bool,
) -> [u8; DELIVER_OVERHEAD] {
    let mut h = [0u8; DELIVER_OVERHEAD];
    h[0] = kind::DELIVER;
    h[1..33].copy_from_slice(room);
    h[33..41].copy_from_slice(&from.to_be_bytes());
    h[41] = u8::from(broadcast);
    h
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
