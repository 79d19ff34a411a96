//! SEND, BROADCAST and DATAGRAM viewed in place, without copying their payload: the relay's
//! hot path.

use super::{ConnId, RoomId, kind};

/// A SEND or BROADCAST frame viewed in place, without copying its payload: the relay's hot
/// path. Agrees with [`decode`](super::decode) on every input (property-tested).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ForwardView<'a> {
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
    /// A DATAGRAM.
    Datagram {
        /// The room.
        room: RoomId,
        /// The receiver.
        to: ConnId,
        /// The segment size (0: one datagram).
        segment: u16,
        /// The payload, borrowed from the input.
        payload: &'a [u8],
    },
}

/// Views a SEND, BROADCAST or DATAGRAM frame in place; `None` for any other or malformed input (use
/// [`decode`](super::decode) for those, and for the error).
pub(crate) fn decode_forward(bytes: &[u8]) -> Option<ForwardView<'_>> {
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
        kind::DATAGRAM => {
            let to = u64::from_be_bytes(body.get(32..40)?.try_into().ok()?);
            let segment = u16::from_be_bytes(body.get(40..42)?.try_into().ok()?);
            Some(ForwardView::Datagram {
                room: room(body)?,
                to,
                segment,
                payload: &body[42..],
            })
        }
        _ => None,
    }
}
