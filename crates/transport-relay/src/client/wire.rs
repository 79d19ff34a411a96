//! The end-to-end wire format between two clients (inside SEND/DELIVER payloads): peer frame
//! kinds, REJECT reasons, session parameters, chunks, and sealing. Pure; the relay never
//! parses these. Layout in `docs/relay-protocol.md`.

use crate::error::SessionError;
use crate::protocol::{ConnId, DELIVER_OVERHEAD, RoomId};

/// The Noise authentication tag.
pub(crate) const TAG_LEN: usize = 16;
/// The largest Noise message.
pub(crate) const NOISE_MAX: usize = 65_535;

/// Peer frame kinds (the first byte of a SEND payload).
pub(crate) mod kind {
    /// `XXpsk3` message 1: a session version 1 or 2 initiator's HS1, or (with the sender's
    /// session parameters as its payload) a version 3 initiator's version probe.
    pub(crate) const LEGACY_HS1: u8 = 0x01;
    /// `XXpsk3` message 2: a session version 1 or 2 responder's HS2.
    pub(crate) const LEGACY_HS2: u8 = 0x02;
    /// Noise `XXpsk0` handshake message 1.
    pub(crate) const HS1: u8 = 0x04;
    /// Noise `XXpsk0` handshake message 2.
    pub(crate) const HS2: u8 = 0x05;
    /// Noise `XXpsk0` handshake message 3.
    pub(crate) const HS3: u8 = 0x06;
    /// A sealed chunk.
    pub(crate) const SEALED: u8 = 0x10;
    /// Encryption off: the static key and session parameters.
    pub(crate) const HELLO: u8 = 0x20;
    /// Encryption off: a chunk in the clear.
    pub(crate) const PLAIN: u8 = 0x21;
    /// Ends an attempt or a session.
    pub(crate) const REJECT: u8 = 0x2F;
}

/// REJECT reasons (the byte after the kind).
pub(crate) mod reject {
    /// The peers disagree about encryption.
    pub(crate) const ENCRYPTION_MISMATCH: u8 = 1;
    /// The peers speak different end-to-end session versions (followed by the rejecter's).
    pub(crate) const VERSION_MISMATCH: u8 = 2;
    /// The sender has no session with the receiver (it ended without a CLOSE reaching the
    /// receiver): the receiver ends its established session.
    pub(crate) const NO_SESSION: u8 = 3;
}

/// The end-to-end session version this client speaks. Version 1 (no handshake payload, a
/// 32-byte HELLO) had no flow control; version 2 added the session parameters (version and
/// receive window) to HS2, HS3 and HELLO, and the CREDIT and ABORT chunks; version 3 runs
/// `Noise_XXpsk0` instead of `XXpsk3` (the topic key from the first message, so only peers
/// that know the topic learn each other's static keys), with HS2 and HS3 under new kinds.
///
/// Public because it is what two releases must agree on to talk (a mismatch is reported as
/// [`SessionError::VersionMismatch`]).
pub const SESSION_VERSION: u8 = 3;

/// Bytes of the session parameters (`version:u8 window:u32`) in HS2, HS3 and HELLO.
pub(crate) const SESSION_PARAMS_LEN: usize = 5;

/// Noise nonces of the control sequence (CREDIT and CLOSE chunks) start here; data chunks
/// (MORE, LAST, ABORT) use 0, 1, 2, … Two sequences under one key with disjoint nonces, so
/// that the socket task can open control chunks without decrypting the data (which the
/// application's task does, in parallel).
pub(crate) const CONTROL_NONCE_BASE: u64 = 1 << 63;

/// Chunk flags (first plaintext byte).
pub(crate) mod chunk {
    /// Message bytes; more follow.
    pub(crate) const MORE: u8 = 0;
    /// The last bytes of a message.
    pub(crate) const LAST: u8 = 1;
    /// The sender closed the session.
    pub(crate) const CLOSE: u8 = 2;
    /// More credit for the receiver of this chunk.
    pub(crate) const CREDIT: u8 = 3;
    /// Drop the partial message.
    pub(crate) const ABORT: u8 = 4;
}

/// A decoded chunk (the plaintext of SEALED, or the body of PLAIN).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Chunk<'a> {
    /// Message bytes; `last` ends the message.
    Data { last: bool, data: &'a [u8] },
    /// The sender closed the connection.
    Close,
    /// The sender may send this many more credit units.
    Credit(u64),
    /// Discard the partial message (its send was cancelled part way).
    Abort,
}

fn malformed(what: String) -> SessionError {
    SessionError::Malformed { what }
}

/// Decodes a chunk. Pure; the flag byte and the body lengths of CLOSE, CREDIT and ABORT are
/// checked.
pub(crate) fn decode_chunk(bytes: &[u8]) -> Result<Chunk<'_>, SessionError> {
    let Some((&flag, body)) = bytes.split_first() else {
        return Err(malformed("empty chunk".into()));
    };
    let empty = |c: Chunk<'static>, name: &str| {
        if body.is_empty() {
            Ok(c)
        } else {
            Err(malformed(format!(
                "{name} chunk with {} body bytes, expected 0",
                body.len()
            )))
        }
    };
    match flag {
        chunk::MORE => Ok(Chunk::Data {
            last: false,
            data: body,
        }),
        chunk::LAST => Ok(Chunk::Data {
            last: true,
            data: body,
        }),
        chunk::CLOSE => empty(Chunk::Close, "CLOSE"),
        chunk::ABORT => empty(Chunk::Abort, "ABORT"),
        chunk::CREDIT => <[u8; 8]>::try_from(body)
            .map(|b| Chunk::Credit(u64::from_be_bytes(b)))
            .map_err(|_| {
                malformed(format!(
                    "CREDIT chunk with {} body bytes, expected 8",
                    body.len()
                ))
            }),
        other => Err(malformed(format!("unknown chunk flag {other}"))),
    }
}

/// The length of the peer frame (SEND payload) that carries a chunk of `data_len` bytes.
pub(crate) fn chunk_frame_len(data_len: usize, encrypted: bool) -> usize {
    1 + 1 + data_len + if encrypted { TAG_LEN } else { 0 }
}

/// The SEALED peer frame lengths a control chunk can have: CLOSE (no body) and CREDIT (8-byte
/// body). Only SEALED frames of these lengths are tried against the control sequence; data
/// frames of the same length fail that (authenticated) decryption and stay data.
pub(crate) fn is_control_len(frame_len: usize) -> bool {
    frame_len == chunk_frame_len(0, true) || frame_len == chunk_frame_len(8, true)
}

/// The most message bytes one chunk carries under a relay frame limit of `max_frame`: what
/// fits a SEND payload (`max_frame − 42`) after the kind byte, the flag and (encrypted) the
/// tag, and never more than one Noise message holds, in both modes.
pub(crate) fn chunk_data_max(max_frame: usize, encrypted: bool) -> usize {
    chunk_data_max_const(max_frame, encrypted)
}

/// [`chunk_data_max`], usable in constants.
pub(crate) const fn chunk_data_max_const(max_frame: usize, encrypted: bool) -> usize {
    let tag = if encrypted { TAG_LEN } else { 0 };
    let by_frame = max_frame.saturating_sub(DELIVER_OVERHEAD + 1 + tag + 1);
    let by_noise = NOISE_MAX - TAG_LEN - 1;
    if by_frame < by_noise {
        by_frame
    } else {
        by_noise
    }
}

/// The session parameters this side sends: its version and the window it grants.
pub(crate) fn session_params(window: u32) -> [u8; SESSION_PARAMS_LEN] {
    let mut p = [0u8; SESSION_PARAMS_LEN];
    p[0] = SESSION_VERSION;
    p[1..].copy_from_slice(&window.to_be_bytes());
    p
}

/// Reads the remote's session parameters: the window it grants us. An empty payload is a
/// version 1 client. Pure.
pub(crate) fn parse_session_params(p: &[u8], min_window: u32) -> Result<u32, SessionError> {
    let mismatch = |remote| SessionError::VersionMismatch {
        local: SESSION_VERSION,
        remote,
    };
    match p.first() {
        None => Err(mismatch(1)),
        Some(&SESSION_VERSION) => {
            let w = <[u8; 4]>::try_from(&p[1..]).map_err(|_| {
                malformed(format!(
                    "session parameters of {} bytes, expected {SESSION_PARAMS_LEN}",
                    p.len()
                ))
            })?;
            let window = u32::from_be_bytes(w);
            if window < min_window {
                return Err(SessionError::WindowTooSmall {
                    window,
                    min: min_window,
                });
            }
            Ok(window)
        }
        Some(&v) => Err(mismatch(v)),
    }
}

/// The peer frame that answers an attempt failing with `e`, if the protocol answers it:
/// REJECT (encryption mismatch) or REJECT (version mismatch, our version).
pub(crate) fn reject_for(e: &SessionError) -> Option<Vec<u8>> {
    match e {
        SessionError::EncryptionMismatch { .. } => {
            Some(vec![kind::REJECT, reject::ENCRYPTION_MISMATCH])
        }
        SessionError::VersionMismatch { .. }
        | SessionError::WindowTooSmall { .. }
        | SessionError::Malformed { .. } => Some(vec![
            kind::REJECT,
            reject::VERSION_MISMATCH,
            SESSION_VERSION,
        ]),
        _ => None,
    }
}

/// What a received REJECT body means (`None`: no session, handled apart).
pub(crate) fn rejected(body: &[u8], encryption: bool) -> Option<SessionError> {
    match body.first() {
        Some(&reject::NO_SESSION) => None,
        Some(&reject::ENCRYPTION_MISMATCH) => Some(SessionError::EncryptionMismatch {
            local: encryption,
            remote: !encryption,
        }),
        Some(&reject::VERSION_MISMATCH) => Some(SessionError::VersionMismatch {
            local: SESSION_VERSION,
            remote: body.get(1).copied().unwrap_or(0),
        }),
        other => Some(SessionError::Rejected {
            reason: other.copied().unwrap_or(0),
        }),
    }
}

/// One SEND relay frame to `remote` carrying a chunk with `flag` and `data`: SEALED with
/// `nonce` (then advanced) when `cipher` is given, else PLAIN.
pub(crate) fn seal(
    cipher: Option<&snow::StatelessTransportState>,
    nonce: &mut u64,
    room: &RoomId,
    remote: ConnId,
    flag: u8,
    data: &[u8],
) -> Result<Vec<u8>, SessionError> {
    let mut buf = Vec::with_capacity(DELIVER_OVERHEAD + 1 + data.len() + TAG_LEN);
    buf.push(crate::protocol::kind::SEND);
    buf.extend_from_slice(room);
    buf.extend_from_slice(&remote.to_be_bytes());
    match cipher {
        Some(cipher) => {
            buf.push(kind::SEALED);
            let mut plain = Vec::with_capacity(1 + data.len());
            plain.push(flag);
            plain.extend_from_slice(data);
            let start = buf.len();
            buf.resize(start + plain.len() + TAG_LEN, 0);
            let n = cipher
                .write_message(*nonce, &plain, &mut buf[start..])
                .map_err(|e| SessionError::Encrypt {
                    reason: e.to_string(),
                })?;
            *nonce += 1;
            buf.truncate(start + n);
        }
        None => {
            buf.push(kind::PLAIN);
            buf.push(flag);
            buf.extend_from_slice(data);
        }
    }
    Ok(buf)
}

/// Opens the SEALED frame `sealed` (kind byte included) with `nonce`: its chunk.
pub(crate) fn open(
    cipher: &snow::StatelessTransportState,
    nonce: u64,
    sealed: &[u8],
) -> Result<Vec<u8>, SessionError> {
    let body = sealed.get(1..).unwrap_or_default();
    let mut out = vec![0u8; body.len()];
    let n = cipher
        .read_message(nonce, body, &mut out)
        .map_err(|e| SessionError::Decrypt {
            reason: e.to_string(),
        })?;
    out.truncate(n);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::flow::{FLOW_MIN_WINDOW_BYTES, FLOW_WINDOW_BYTES};

    #[test]
    fn chunk_sizes_fit_the_relay_frame() {
        let max = crate::protocol::DEFAULT_MAX_FRAME_BYTES;
        let enc = chunk_data_max(max, true);
        // SEND header 41 + kind 1 + flag 1 + data + tag 16 == max - 1 (DELIVER adds one byte).
        assert_eq!(41 + 1 + 1 + enc + TAG_LEN, max - 1);
        let plain = chunk_data_max(max, false);
        assert_eq!(41 + 1 + 1 + plain, max - 1);
        assert_eq!(plain, 65_492);
        assert!(chunk_data_max(1 << 20, true) + 1 + TAG_LEN <= NOISE_MAX);
        assert_eq!(
            chunk_data_max(1 << 20, false),
            chunk_data_max(1 << 20, true)
        );
    }

    #[test]
    fn session_params_round_trip_and_old_peers_are_named() {
        let min = FLOW_MIN_WINDOW_BYTES;
        assert_eq!(
            parse_session_params(&session_params(FLOW_WINDOW_BYTES), min),
            Ok(FLOW_WINDOW_BYTES)
        );
        let v = |remote| {
            Err(SessionError::VersionMismatch {
                local: SESSION_VERSION,
                remote,
            })
        };
        assert_eq!(parse_session_params(&[], min), v(1));
        assert_eq!(parse_session_params(&[2, 0, 0], min), v(2));
        assert_eq!(parse_session_params(&[4, 0, 0], min), v(4));
        assert_eq!(
            parse_session_params(&[SESSION_VERSION, 0, 0, 0, 1], min),
            Err(SessionError::WindowTooSmall { window: 1, min })
        );
        assert!(matches!(
            parse_session_params(&[SESSION_VERSION, 0], min),
            Err(SessionError::Malformed { .. })
        ));
    }

    #[test]
    fn control_chunk_lengths() {
        assert!(is_control_len(1 + 1 + TAG_LEN) && is_control_len(1 + 1 + 8 + TAG_LEN));
        assert!(!is_control_len(1 + 1 + 1 + TAG_LEN));
    }

    #[test]
    fn chunks_decode() {
        assert_eq!(
            decode_chunk(&[chunk::LAST, 7]),
            Ok(Chunk::Data {
                last: true,
                data: &[7]
            })
        );
        assert_eq!(
            decode_chunk(&[chunk::MORE]),
            Ok(Chunk::Data {
                last: false,
                data: &[]
            })
        );
        assert_eq!(decode_chunk(&[chunk::CLOSE]), Ok(Chunk::Close));
        assert_eq!(decode_chunk(&[chunk::ABORT]), Ok(Chunk::Abort));
        let mut credit = vec![chunk::CREDIT];
        credit.extend_from_slice(&5u64.to_be_bytes());
        assert_eq!(decode_chunk(&credit), Ok(Chunk::Credit(5)));
        assert!(decode_chunk(&credit[..5]).is_err());
        assert!(decode_chunk(&[chunk::CLOSE, 1]).is_err());
        assert!(decode_chunk(&[9]).is_err());
        assert!(decode_chunk(&[]).is_err());
    }

    #[test]
    fn rejects_are_read_and_answered() {
        assert_eq!(rejected(&[reject::NO_SESSION], true), None);
        assert_eq!(
            rejected(&[reject::ENCRYPTION_MISMATCH], false),
            Some(SessionError::EncryptionMismatch {
                local: false,
                remote: true
            })
        );
        assert_eq!(
            rejected(&[reject::VERSION_MISMATCH, 2], true),
            Some(SessionError::VersionMismatch {
                local: SESSION_VERSION,
                remote: 2
            })
        );
        assert_eq!(
            rejected(&[9], true),
            Some(SessionError::Rejected { reason: 9 })
        );
        assert_eq!(
            reject_for(&SessionError::VersionMismatch {
                local: 2,
                remote: 1
            }),
            Some(vec![
                kind::REJECT,
                reject::VERSION_MISMATCH,
                SESSION_VERSION
            ])
        );
        assert_eq!(reject_for(&SessionError::HandshakeTimeout { ms: 1 }), None);
    }

    #[test]
    fn plain_chunks_are_sealed_in_the_clear() {
        let mut nonce = 0;
        let f = seal(None, &mut nonce, &[1; 32], 9, chunk::LAST, b"hi").unwrap();
        assert_eq!(&f[41..], &[kind::PLAIN, chunk::LAST, b'h', b'i']);
        assert_eq!(nonce, 0);
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = decode_chunk(&bytes);
            let _ = parse_session_params(&bytes, FLOW_MIN_WINDOW_BYTES);
            let _ = rejected(&bytes, true);
        }
    }
}
