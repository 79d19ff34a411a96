//! The relay wire protocol, version 1: frame types, limits, error and close codes, and a pure
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
pub use decode::decode;
#[cfg(feature = "server")]
pub(crate) use encode::deliver_header;
#[cfg(feature = "server")]
pub(crate) use encode::truncate_utf8;
pub use encode::{encode_deliver, encode_send};
#[cfg(feature = "server")]
pub(crate) use forward::{ForwardView, decode_forward};
pub use frame::{ClientFrame, Frame, FrameError, RelayFrame};
pub use limits::{
    DEFAULT_MAX_FRAME_BYTES, DELIVER_OVERHEAD, MAX_ERROR_MESSAGE_BYTES, MAX_MAX_FRAME_BYTES,
    MIN_MAX_FRAME_BYTES,
};

/// The WebSocket subprotocol a client must offer and the relay selects.
pub const SUBPROTOCOL: &str = "pluresdb-relay.v1";

/// A room id: `derive_from_topic(topic, Domain::RelayRoom)`.
pub type RoomId = [u8; 32];

/// A connection id the relay assigned.
pub type ConnId = u64;
