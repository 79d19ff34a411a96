//! The relay frames as values: what a client sends, what the relay sends, and why bytes are
//! not a frame.

use super::{ConnId, RoomId, close_code};

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
    /// (`pluresdb-relay.v2`) A datagram for one member of a room: forwarded if the
    /// receiver's queue has room, else dropped, never waited for.
    Datagram {
        /// The room both are in.
        room: RoomId,
        /// The receiving connection.
        to: ConnId,
        /// The size of each datagram in `payload` but the last (which may be shorter);
        /// 0: `payload` is one datagram.
        segment: u16,
        /// Opaque bytes: one or more datagrams.
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
    /// (`pluresdb-relay.v2`) A datagram from a peer.
    Datagram {
        /// The room.
        room: RoomId,
        /// The sender.
        from: ConnId,
        /// As the sender's [`ClientFrame::Datagram::segment`].
        segment: u16,
        /// Opaque bytes: one or more datagrams.
        payload: Vec<u8>,
    },
    /// A request failed.
    Error {
        /// One of [`error_code`](super::error_code).
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
