//! End-to-end peer frames (inside SEND/DELIVER payloads) and the Noise handshake.
//! The relay never parses these. Layout in `docs/relay-protocol.md`.

use pluresdb_sync_core::Identity;
use pluresdb_sync_core::topic::{Domain, TopicHash, derive_from_topic};

use crate::protocol::{DELIVER_OVERHEAD, RoomId, SUBPROTOCOL};

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

/// Chunk flags (first plaintext byte).
pub(crate) mod chunk {
    pub(crate) const MORE: u8 = 0;
    pub(crate) const LAST: u8 = 1;
    pub(crate) const CLOSE: u8 = 2;
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

/// Writes the next handshake message as a peer frame.
pub(crate) fn write_hs(hs: &mut snow::HandshakeState, kind: u8) -> Result<Vec<u8>, snow::Error> {
    let mut buf = vec![0u8; 1 + 256];
    buf[0] = kind;
    let n = hs.write_message(&[], &mut buf[1..])?;
    buf.truncate(1 + n);
    Ok(buf)
}

/// Reads a handshake message (the body of a peer frame).
pub(crate) fn read_hs(hs: &mut snow::HandshakeState, body: &[u8]) -> Result<(), snow::Error> {
    let mut scratch = [0u8; 256];
    hs.read_message(body, &mut scratch)?;
    Ok(())
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
            let m1 = write_hs(&mut i, kind::HS1)?;
            read_hs(&mut r, &m1[1..])?;
            let m2 = write_hs(&mut r, kind::HS2)?;
            read_hs(&mut i, &m2[1..])?;
            let m3 = write_hs(&mut i, kind::HS3)?;
            read_hs(&mut r, &m3[1..])?;
            Ok(r.get_remote_static().unwrap_or_default().to_vec())
        };
        let t = pluresdb_sync_core::derive_topic("x");
        assert_eq!(run(&t, &t).unwrap(), a.public_bytes().to_vec());
        assert!(run(&t, &pluresdb_sync_core::derive_topic("y")).is_err());
    }
}
