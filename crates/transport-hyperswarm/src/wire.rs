//! The wire format on a connection's one bidirectional QUIC stream (see
//! `docs/architecture.md`, "Hyperswarm mode"). Decoders are pure functions over bytes.
//!
//! ```text
//! QUIC ALPN "pluresdb-sync/hyperswarm/2" (version 1 had no psk: refused in the TLS handshake)
//! initiator -> responder  info-hash      20 bytes: the DHT key of the topic dialled for
//! initiator -> responder  noise msg 1    u16 BE length, Noise XXpsk0 `-> psk, e`;
//!                                        payload 1 byte purpose (1 connect, 2 identify)
//! responder -> initiator  noise msg 2    u16 BE length, `<- e, ee, s, es`
//! initiator -> responder  noise msg 3    u16 BE length, `-> s, se`; connect only
//! leader    -> follower   verdict        1 byte (1 accept, 2 duplicate); connect only
//! both ways               messages       u32 BE length (<= 16 MiB) + payload
//! ```

use pluresdb_sync_core::MAX_MESSAGE_BYTES;

/// The QUIC ALPN of this protocol; a version bump changes it (a peer of another version is
/// refused in the TLS handshake: `HandshakeFailure::Version`).
pub(crate) const ALPN: &[u8] = b"pluresdb-sync/hyperswarm/2";

/// The ALPN of version 1 (Noise XX without a psk, then topic tags): an old peer, in tests.
#[cfg(test)]
pub(crate) const ALPN_V1: &[u8] = b"pluresdb-sync/hyperswarm/1";

/// Noise handshake messages here are at most 96 bytes (message 1 with its purpose byte is
/// 49); anything longer than this is an attack or a bug.
pub(crate) const MAX_HANDSHAKE_MESSAGE: usize = 1024;

/// Length of the info-hash the initiator names first.
pub(crate) const INFO_HASH_LEN: usize = 20;

/// Length of a message header.
pub(crate) const FRAME_HEADER_LEN: usize = 4;

/// Why bytes from a remote were rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WireError {
    #[error("handshake message of {0} bytes exceeds the {MAX_HANDSHAKE_MESSAGE}-byte limit")]
    HandshakeTooLong(usize),
    #[error("empty handshake message")]
    HandshakeEmpty,
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    FrameTooLong(usize),
    #[error("message 1 payload of {0} bytes, expected 1 (the purpose)")]
    PurposeLength(usize),
    #[error("unknown purpose {0:#04x}")]
    UnknownPurpose(u8),
    #[error("unknown verdict {0:#04x}")]
    UnknownVerdict(u8),
}

/// Why the initiator opened the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A lasting connection, yielded to the application on both sides.
    Connect,
    /// Only learn and verify the responder's key (for `lookup`); closed right after.
    Identify,
}

impl Purpose {
    /// The byte in message 1's payload.
    pub(crate) fn to_byte(self) -> u8 {
        match self {
            Purpose::Connect => 1,
            Purpose::Identify => 2,
        }
    }
}

/// The leader's decision about a new connection (see `Node::settle`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// This connection is the one both sides keep.
    Accept,
    /// A connection between the two peers already exists; this one is dropped.
    Duplicate,
}

impl Verdict {
    pub(crate) fn to_byte(self) -> u8 {
        match self {
            Verdict::Accept => 1,
            Verdict::Duplicate => 2,
        }
    }
}

/// Decodes a verdict byte.
pub(crate) fn decode_verdict(byte: u8) -> Result<Verdict, WireError> {
    match byte {
        1 => Ok(Verdict::Accept),
        2 => Ok(Verdict::Duplicate),
        other => Err(WireError::UnknownVerdict(other)),
    }
}

/// Decodes a handshake message's length prefix.
pub(crate) fn decode_handshake_len(header: [u8; 2]) -> Result<usize, WireError> {
    let len = usize::from(u16::from_be_bytes(header));
    if len == 0 {
        return Err(WireError::HandshakeEmpty);
    }
    if len > MAX_HANDSHAKE_MESSAGE {
        return Err(WireError::HandshakeTooLong(len));
    }
    Ok(len)
}

/// Encodes a handshake message's length prefix (`len` is at most 65535 by construction).
pub(crate) fn encode_handshake_len(len: usize) -> [u8; 2] {
    u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes()
}

/// Decodes a message header: the payload length, at most [`MAX_MESSAGE_BYTES`].
pub(crate) fn decode_frame_len(header: [u8; FRAME_HEADER_LEN]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(WireError::FrameTooLong(len));
    }
    Ok(len)
}

/// Encodes a message header; the caller has checked `len <= MAX_MESSAGE_BYTES`.
pub(crate) fn encode_frame_len(len: usize) -> [u8; FRAME_HEADER_LEN] {
    u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes()
}

/// Decodes message 1's payload: the purpose byte.
pub(crate) fn decode_purpose(payload: &[u8]) -> Result<Purpose, WireError> {
    match *payload {
        [1] => Ok(Purpose::Connect),
        [2] => Ok(Purpose::Identify),
        [other] => Err(WireError::UnknownPurpose(other)),
        _ => Err(WireError::PurposeLength(payload.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn limits() {
        assert_eq!(decode_frame_len(encode_frame_len(0)), Ok(0));
        assert_eq!(
            decode_frame_len(encode_frame_len(MAX_MESSAGE_BYTES)),
            Ok(MAX_MESSAGE_BYTES)
        );
        assert_eq!(
            decode_frame_len((MAX_MESSAGE_BYTES as u32 + 1).to_be_bytes()),
            Err(WireError::FrameTooLong(MAX_MESSAGE_BYTES + 1))
        );
        assert_eq!(decode_handshake_len([0, 0]), Err(WireError::HandshakeEmpty));
        assert_eq!(
            decode_handshake_len([0xff, 0xff]),
            Err(WireError::HandshakeTooLong(65535))
        );
        assert_eq!(decode_handshake_len(encode_handshake_len(96)), Ok(96));
        assert_eq!(decode_verdict(0), Err(WireError::UnknownVerdict(0)));
        assert_eq!(decode_purpose(&[3]), Err(WireError::UnknownPurpose(3)));
        let err = WireError::FrameTooLong(MAX_MESSAGE_BYTES + 1).to_string();
        assert!(err.contains("16777217"), "{err}");
    }

    proptest! {
        #[test]
        fn purpose_roundtrip(identify in any::<bool>()) {
            let purpose = if identify { Purpose::Identify } else { Purpose::Connect };
            prop_assert_eq!(decode_purpose(&[purpose.to_byte()]), Ok(purpose));
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = decode_purpose(&bytes);
            if bytes.len() >= 4 {
                let len = decode_frame_len([bytes[0], bytes[1], bytes[2], bytes[3]]);
                if let Ok(len) = len { prop_assert!(len <= MAX_MESSAGE_BYTES); }
                let hs = decode_handshake_len([bytes[0], bytes[1]]);
                if let Ok(len) = hs { prop_assert!((1..=MAX_HANDSHAKE_MESSAGE).contains(&len)); }
            }
            if let Some(&b) = bytes.first() { let _ = decode_verdict(b); }
        }

        #[test]
        fn purpose_rejects_other_lengths(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            prop_assume!(bytes.len() != 1);
            prop_assert_eq!(decode_purpose(&bytes), Err(WireError::PurposeLength(bytes.len())));
        }
    }
}
