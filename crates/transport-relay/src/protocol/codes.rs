//! The numbers of the relay protocol: frame type bytes, ERROR codes and WebSocket close codes.

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
    /// Client (`pluresdb-relay.v2`): a droppable datagram for one peer.
    pub const DATAGRAM: u8 = 0x07;
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
    /// Relay (`pluresdb-relay.v2`): a datagram from a peer.
    pub const DATAGRAM_FROM: u8 = 0x85;
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
    /// A WebSocket protocol error (RSV bits, a reserved opcode, an unmasked frame, an
    /// oversized or fragmented control frame, ...).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A message over the frame limit, or a SEND/BROADCAST payload over
    /// `max_frame - DELIVER_OVERHEAD`.
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
    /// The relay's memory budget for queued frames was used up and this connection's send
    /// queue was among the largest.
    pub const OVER_BUDGET: u16 = 4010;
}
