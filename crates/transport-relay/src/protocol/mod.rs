//! The relay wire protocol, versions 1 and 2 (2 adds droppable datagrams): frame types, limits, error and close codes, and a pure
//! encoder/decoder. Written down in `docs/relay-protocol.md`; a third-party client or relay
//! needs only what this module exports.
//!
//! ```
//! use pluresdb_sync_transport_relay::protocol::{decode, ClientFrame, Frame};
//!
//! let frame = Frame::Client(ClientFrame::Send { room: [7; 32], to: 42, payload: b"hi".to_vec() });
//! let bytes = frame.encode();
//! assert_eq!(decode(&bytes).unwrap(), frame);
//! assert!(decode(&bytes[..10]).is_err());
//! ```

mod codes;
mod decode;
mod encode;
#[cfg(feature = "server")]
mod forward;
mod frame;
mod limits;
#[cfg(test)]
mod tests;

pub use codes::{close_code, error_code, kind};
pub use decode::{DatagramFrom, decode, decode_datagram_from};
#[cfg(feature = "server")]
pub(crate) use encode::datagram_header;
#[cfg(feature = "server")]
pub(crate) use encode::deliver_header;
#[cfg(feature = "server")]
pub(crate) use encode::truncate_utf8;
pub use encode::{encode_datagram, encode_deliver, encode_send};
#[cfg(feature = "server")]
pub(crate) use forward::{ForwardView, decode_forward};
pub use frame::{ClientFrame, Frame, FrameError, RelayFrame};
pub use limits::{
    DATAGRAM_OVERHEAD, DEFAULT_MAX_FRAME_BYTES, DELIVER_OVERHEAD, MAX_ERROR_MESSAGE_BYTES,
    MAX_MAX_FRAME_BYTES, MIN_MAX_FRAME_BYTES,
};

/// The WebSocket subprotocol of version 1 (rooms, SEND, BROADCAST, membership), which the
/// relay transport offers. It is also part of the end-to-end handshake's prologue.
pub const SUBPROTOCOL: &str = "pluresdb-relay.v1";

/// The WebSocket subprotocol of version 2: version 1 plus droppable DATAGRAM frames. A relay
/// selects it when a client offers it (and version 1 for clients that offer only that); only
/// connections that speak it receive datagrams.
pub const SUBPROTOCOL_V2: &str = "pluresdb-relay.v2";

/// Every subprotocol the relay accepts, newest first.
pub const SUBPROTOCOLS: [&str; 2] = [SUBPROTOCOL_V2, SUBPROTOCOL];

/// A room id: `derive_from_topic(topic, Domain::RelayRoom)`.
pub type RoomId = [u8; 32];

/// A connection id the relay assigned.
pub type ConnId = u64;
