//! The sizes the relay protocol fixes: frame limits, header overheads, message lengths.

/// The default largest relay frame (one WebSocket message), 64 KiB: big enough that a 16 MiB
/// message is only 257 frames, small enough that one read never allocates much.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;

/// The smallest frame limit a relay may announce: room for headers and useful payload.
pub const MIN_MAX_FRAME_BYTES: usize = 1024;
/// The largest frame limit a relay may announce (and the most a client reads per frame).
pub const MAX_MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Bytes a DELIVER frame adds around its payload: type, room, sender id, flags. A SEND or
/// BROADCAST payload may be at most `max_frame - DELIVER_OVERHEAD` bytes so that it can be
/// forwarded; the relay closes a connection that sends a larger one with
/// [`close_code::FRAME_TOO_LARGE`](super::close_code::FRAME_TOO_LARGE).
pub const DELIVER_OVERHEAD: usize = 1 + 32 + 8 + 1;

/// The longest human-readable message in an ERROR frame.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 256;

/// Bytes a DATAGRAM or DATAGRAM_FROM frame adds around its payload: type, room, connection
/// id, segment size. Both directions have the same header, so a DATAGRAM that fits the
/// relay's frame limit can always be forwarded; its payload is at most
/// `max_frame - DATAGRAM_OVERHEAD` bytes.
pub const DATAGRAM_OVERHEAD: usize = 1 + 32 + 8 + 2;
