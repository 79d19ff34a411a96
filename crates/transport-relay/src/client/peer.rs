//! End-to-end peer frames (inside SEND/DELIVER payloads) and the Noise handshake.
//! The relay never parses these. Layout in `docs/relay-protocol.md`.

use pluresdb_sync_core::Identity;
use pluresdb_sync_core::topic::{Domain, TopicHash, derive_from_topic};

use pluresdb_sync_core::MAX_MESSAGE_BYTES;

use crate::protocol::{DELIVER_OVERHEAD, MIN_MAX_FRAME_BYTES, RoomId, SUBPROTOCOL};

/// The Noise pattern: XX (both static keys sent encrypted), PSK from the topic mixed in last.
pub(crate) const NOISE_PARAMS: &str = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s";
/// The Noise authentication tag.
pub(crate) const TAG_LEN: usize = 16;
/// The largest Noise message.
pub(crate) const NOISE_MAX: usize = 65_535;

pub(crate) mod kind {
    pub(crate) const HS1: u8 = 0x01;
    pub(crate) const HS2: u8 = 0x02;
    pub(crate) const HS3: u8 = 0x03;
    pub(crate) const SEALED: u8 = 0x10;
    pub(crate) const HELLO: u8 = 0x20;
    pub(crate) const PLAIN: u8 = 0x21;
    pub(crate) const REJECT: u8 = 0x2F;
}

/// REJECT reason: the peers disagree about encryption.
pub(crate) const REJECT_ENCRYPTION_MISMATCH: u8 = 1;
/// REJECT reason: the peers speak different end-to-end session versions (body: `2, version:u8`).
pub(crate) const REJECT_VERSION_MISMATCH: u8 = 2;
/// REJECT reason: the sender has no session with the receiver (it ended without a CLOSE
/// reaching the receiver, e.g. a failure or a dropped connection with a full outbound queue),
/// sent when a data frame arrives for it. The receiver ends its established session.
pub(crate) const REJECT_NO_SESSION: u8 = 3;

/// The end-to-end session version this client speaks. Version 1 (no handshake payload, a
/// 32-byte HELLO) had no flow control; version 2 adds the session parameters (version and
/// receive window) to HS2, HS3 and HELLO, and the CREDIT and ABORT chunks.
pub const SESSION_VERSION: u8 = 2;

/// The receive window each side grants its peer when a session starts, in credit units
/// (peer-frame bytes plus [`FLOW_FRAME_OVERHEAD`] per frame): 18 MiB, so that one message of
/// the largest size ([`MAX_MESSAGE_BYTES`], 16 MiB, cut into chunks for the smallest relay frame
/// limit, with the per-frame costs) always fits in an empty window: two peers that each send
/// one such message before reading complete both sends (a smaller window deadlocked them).
/// It also bounds what one session can hold queued while the application does not read it
/// (memory stays bounded against a peer that ignores it: sending beyond it ends the session).
/// Measured through a loopback relay (encrypted, 2 cores): 4 MiB cost 8% of the throughput of
/// 64 KiB messages, 8 MiB about 4%, 16 MiB nothing.
pub const FLOW_WINDOW_BYTES: u32 = 18 * 1024 * 1024;

/// The credit one message of `MAX_MESSAGE_BYTES` uses when the relay frame limit is
/// `max_frame` (encrypted, the smaller chunks), plus one ABORT that may precede it.
pub(crate) const fn max_message_cost(max_frame: usize) -> u64 {
    let by_frame = max_frame.saturating_sub(DELIVER_OVERHEAD + 1 + TAG_LEN + 1);
    let by_noise = NOISE_MAX - TAG_LEN - 1;
    let per = if by_frame < by_noise {
        by_frame
    } else {
        by_noise
    };
    let chunks = MAX_MESSAGE_BYTES.div_ceil(per) + 1;
    (MAX_MESSAGE_BYTES + chunks * (2 + TAG_LEN)) as u64 + chunks as u64 * FLOW_FRAME_OVERHEAD
}

// One largest message always fits in an empty window, whatever frame limit the relay has.
const _: () = assert!(FLOW_WINDOW_BYTES as u64 >= max_message_cost(MIN_MAX_FRAME_BYTES));

/// Credit units charged per peer frame on top of its bytes, so that a flood of tiny frames
/// (an empty message is a 2- or 18-byte frame) is bounded by the window too: 64 covers a queue
/// slot and the allocation of each queued frame.
pub const FLOW_FRAME_OVERHEAD: u64 = 64;

/// The receiver returns credit once the application consumed this much (a quarter of the
/// window): few CREDIT frames (one per 4.5 MiB read), and the sender never runs dry while the
/// reader keeps up (it always has at least three quarters of the window). An eighth measured
/// the same.
pub(crate) const FLOW_GRANT_THRESHOLD: u64 = FLOW_WINDOW_BYTES as u64 / 4;

/// The credit the largest data frame can use: a chunk is at most `NOISE_MAX - TAG_LEN - 1`
/// bytes (see [`chunk_data_max`]), so its frame at most `NOISE_MAX + 1`. A sender with less
/// window left than this may be waiting for credit.
pub(crate) const LARGEST_FRAME_COST: u64 = NOISE_MAX as u64 + 1 + FLOW_FRAME_OVERHEAD;

/// The smallest window a peer may announce: two of the largest frames. Smaller could leave a
/// sender unable to send even one frame.
pub(crate) const FLOW_MIN_WINDOW_BYTES: u32 =
    2 * (NOISE_MAX as u32 + 2 + FLOW_FRAME_OVERHEAD as u32);

// The window this side grants must be one a peer accepts.
const _: () = assert!(FLOW_WINDOW_BYTES >= FLOW_MIN_WINDOW_BYTES);

/// Noise nonces of the control sequence (CREDIT and CLOSE chunks) start here; data chunks
/// (MORE, LAST, ABORT) use 0, 1, 2, … Two sequences under one key with disjoint nonces, so
/// that the socket task can open control chunks without decrypting the data (which the
/// application's task does, in parallel).
pub(crate) const CONTROL_NONCE_BASE: u64 = 1 << 63;

/// The SEALED peer frame lengths a control chunk can have: CLOSE (no body) and CREDIT (8-byte
/// body). Only SEALED frames of these lengths are tried against the control sequence; data
/// frames of the same length fail that (authenticated) decryption and stay data.
pub(crate) fn is_control_len(frame_len: usize) -> bool {
    frame_len == chunk_frame_len(0, true) || frame_len == chunk_frame_len(8, true)
}

/// Bytes of the session parameters (`version:u8 window:u32`) in HS2, HS3 and HELLO.
pub(crate) const SESSION_PARAMS_LEN: usize = 5;

/// Chunk flags (first plaintext byte).
pub(crate) mod chunk {
    pub(crate) const MORE: u8 = 0;
    pub(crate) const LAST: u8 = 1;
    pub(crate) const CLOSE: u8 = 2;
    pub(crate) const CREDIT: u8 = 3;
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

/// Decodes a chunk. Pure; the flag byte and the body lengths of CLOSE, CREDIT and ABORT are
/// checked.
pub(crate) fn decode_chunk(bytes: &[u8]) -> Result<Chunk<'_>, String> {
    let Some((&flag, body)) = bytes.split_first() else {
        return Err("empty chunk".into());
    };
    let empty = |c: Chunk<'static>, name: &str| {
        if body.is_empty() {
            Ok(c)
        } else {
            Err(format!(
                "{name} chunk with {} body bytes, expected 0",
                body.len()
            ))
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
            .map_err(|_| format!("CREDIT chunk with {} body bytes, expected 8", body.len())),
        other => Err(format!("unknown chunk flag {other}")),
    }
}

/// The length of the peer frame (SEND payload) that carries a chunk of `data_len` bytes.
pub(crate) fn chunk_frame_len(data_len: usize, encrypted: bool) -> usize {
    1 + 1 + data_len + if encrypted { TAG_LEN } else { 0 }
}

/// The credit a data (or ABORT) peer frame of `frame_len` bytes uses. CLOSE and CREDIT frames
/// use none: a session can always be closed and credit always returned.
pub(crate) fn frame_cost(frame_len: usize) -> u64 {
    frame_len as u64 + FLOW_FRAME_OVERHEAD
}

/// The session parameters this side sends: its version and the window it grants.
pub(crate) fn session_params() -> [u8; SESSION_PARAMS_LEN] {
    let mut p = [0u8; SESSION_PARAMS_LEN];
    p[0] = SESSION_VERSION;
    p[1..].copy_from_slice(&FLOW_WINDOW_BYTES.to_be_bytes());
    p
}

/// Why the remote's session parameters are unusable.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ParamsError {
    /// Another session version (1 = none sent: a client without flow control).
    Version(u8),
    /// Version 2 with a malformed body or a window below the minimum.
    Invalid(String),
}

/// Reads the remote's session parameters: the window it grants us. Pure.
pub(crate) fn parse_session_params(p: &[u8]) -> Result<u32, ParamsError> {
    match p.first() {
        None => Err(ParamsError::Version(1)),
        Some(&SESSION_VERSION) => {
            let w = <[u8; 4]>::try_from(&p[1..]).map_err(|_| {
                ParamsError::Invalid(format!(
                    "session parameters of {} bytes, expected {SESSION_PARAMS_LEN}",
                    p.len()
                ))
            })?;
            let window = u32::from_be_bytes(w);
            if window < FLOW_MIN_WINDOW_BYTES {
                return Err(ParamsError::Invalid(format!(
                    "flow-control window of {window} bytes is below the {FLOW_MIN_WINDOW_BYTES}-byte minimum"
                )));
            }
            Ok(window)
        }
        Some(&v) => Err(ParamsError::Version(v)),
    }
}

/// The most message bytes one chunk carries under a relay frame limit of `max_frame`.
pub(crate) fn chunk_data_max(max_frame: usize, encrypted: bool) -> usize {
    let tag = if encrypted { TAG_LEN } else { 0 };
    let by_frame = max_frame.saturating_sub(DELIVER_OVERHEAD + 1 + tag + 1);
    let by_noise = NOISE_MAX - TAG_LEN - 1;
    by_frame.min(by_noise)
}

/// The prologue binds a handshake to the protocol version and the room.
pub(crate) fn prologue(room: &RoomId) -> Vec<u8> {
    let mut p = SUBPROTOCOL.as_bytes().to_vec();
    p.extend_from_slice(room);
    p
}

/// Starts a Noise handshake for `topic` with `identity`.
pub(crate) fn handshake(
    identity: &Identity,
    topic: &TopicHash,
    room: &RoomId,
    initiator: bool,
) -> Result<snow::HandshakeState, snow::Error> {
    let params: snow::params::NoiseParams = NOISE_PARAMS.parse()?;
    let secret = identity.secret_bytes();
    let psk = derive_from_topic(topic, Domain::NoisePsk);
    let prologue = prologue(room);
    let builder = snow::Builder::new(params)
        .local_private_key(&secret)?
        .psk(3, &psk)?
        .prologue(&prologue)?;
    if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    }
}

/// Writes the next handshake message, with `payload`, as a peer frame.
pub(crate) fn write_hs(
    hs: &mut snow::HandshakeState,
    kind: u8,
    payload: &[u8],
) -> Result<Vec<u8>, snow::Error> {
    let mut buf = vec![0u8; 1 + 256];
    buf[0] = kind;
    let n = hs.write_message(payload, &mut buf[1..])?;
    buf.truncate(1 + n);
    Ok(buf)
}

/// Reads a handshake message (the body of a peer frame); returns its payload.
pub(crate) fn read_hs(hs: &mut snow::HandshakeState, body: &[u8]) -> Result<Vec<u8>, snow::Error> {
    let mut scratch = [0u8; 256];
    let n = hs.read_message(body, &mut scratch)?;
    Ok(scratch[..n].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_fit_the_relay_frame() {
        let max = crate::protocol::DEFAULT_MAX_FRAME_BYTES;
        let enc = chunk_data_max(max, true);
        // SEND header 41 + kind 1 + flag 1 + data + tag 16 == max - 1 (DELIVER adds one byte).
        assert_eq!(41 + 1 + 1 + enc + TAG_LEN, max - 1);
        assert!(chunk_data_max(max, false) > enc);
        assert!(chunk_data_max(1 << 20, true) + 1 + TAG_LEN <= NOISE_MAX);
    }

    #[test]
    fn handshake_needs_the_same_topic() {
        let room = [1u8; 32];
        let (a, b) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let run = |ta: &TopicHash, tb: &TopicHash| -> Result<Vec<u8>, snow::Error> {
            let mut i = handshake(&a, ta, &room, true)?;
            let mut r = handshake(&b, tb, &room, false)?;
            let m1 = write_hs(&mut i, kind::HS1, &[])?;
            read_hs(&mut r, &m1[1..])?;
            let m2 = write_hs(&mut r, kind::HS2, &session_params())?;
            assert_eq!(read_hs(&mut i, &m2[1..])?, session_params());
            let m3 = write_hs(&mut i, kind::HS3, &session_params())?;
            assert_eq!(read_hs(&mut r, &m3[1..])?, session_params());
            Ok(r.get_remote_static().unwrap_or_default().to_vec())
        };
        let t = pluresdb_sync_core::derive_topic("x");
        assert_eq!(run(&t, &t).unwrap(), a.public_bytes().to_vec());
        assert!(run(&t, &pluresdb_sync_core::derive_topic("y")).is_err());
    }

    #[test]
    fn session_params_round_trip_and_old_peers_are_named() {
        assert_eq!(
            parse_session_params(&session_params()),
            Ok(FLOW_WINDOW_BYTES)
        );
        assert_eq!(parse_session_params(&[]), Err(ParamsError::Version(1)));
        assert_eq!(
            parse_session_params(&[3, 0, 0]),
            Err(ParamsError::Version(3))
        );
        assert!(matches!(
            parse_session_params(&[SESSION_VERSION, 0, 0, 0, 1]),
            Err(ParamsError::Invalid(e)) if e.contains("below")
        ));
        assert!(matches!(
            parse_session_params(&[SESSION_VERSION, 0]),
            Err(ParamsError::Invalid(_))
        ));
    }

    #[test]
    fn the_window_holds_the_largest_frames_and_the_grant_leaves_room() {
        let largest = frame_cost(chunk_frame_len(chunk_data_max(1 << 20, true), true));
        assert!(u64::from(FLOW_MIN_WINDOW_BYTES) >= 2 * largest);
        assert!(u64::from(FLOW_WINDOW_BYTES) - FLOW_GRANT_THRESHOLD >= largest);
        // The control chunks' SEALED lengths, which the socket task tries to open.
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

    proptest::proptest! {
        #[test]
        fn decode_chunk_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = decode_chunk(&bytes);
            let _ = parse_session_params(&bytes);
        }
    }
}
