//! The Noise XXpsk0 handshake, keyed with the topic from its first message and bound to its
//! QUIC connection.
//!
//! The initiator first names the info-hash it dialled for (public: it is the DHT key), so the
//! responder knows which topic's pre-shared key (`derive_from_topic(topic, Domain::NoisePsk)`)
//! to use; then Noise `XXpsk0` runs with that key mixed in before message 1. So:
//!
//! - message 1 (`-> psk, e`, payload: the purpose byte) decrypts only under the topic's key:
//!   a remote that does not know the topic is refused there, and the responder did no
//!   Diffie-Hellman for it (only hashing and one AEAD check);
//! - message 2 (`<- e, ee, s, es`) carries the responder's static key encrypted under keys
//!   that mix in the topic's key: only someone who knows the topic reads it, so a DHT
//!   observer dialling an announced endpoint cannot learn or link the peer's identity;
//! - the handshake completes only if both know the topic, which proves it both ways (no
//!   separate topic proof is needed).
//!
//! Both peers feed 32 bytes of the QUIC connection's exported keying material (RFC 5705 /
//! RFC 9001 exporter, label [`EXPORTER_LABEL`]) into Noise as the prologue. A machine in the
//! middle that terminates two QUIC connections gets two different exporter values, so the
//! handshake fails: the static key Noise authenticates is that of the QUIC peer itself. It
//! also makes every message 1 unique to its connection: one replayed on another connection
//! fails to decrypt. Payloads then travel in the QUIC stream, encrypted once, by QUIC.

use pluresdb_sync_core::Identity;
use quinn::{RecvStream, SendStream};

use crate::wire::{self, INFO_HASH_LEN, Purpose, WireError};

/// The Noise protocol: the spec's `XX_25519_ChaChaPoly_BLAKE2s` with the topic's pre-shared
/// key mixed in before the first message.
pub const NOISE_PARAMS: &str = "Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s";

/// Exporter label for the Noise prologue.
pub(crate) const EXPORTER_LABEL: &[u8] = b"EXPORTER-pluresdb-sync-hyperswarm-noise-prologue-v2";

/// What a finished handshake established.
#[derive(Debug)]
pub(crate) struct Handshaked {
    /// The remote's static public key, authenticated by Noise.
    pub(crate) remote_static: [u8; 32],
}

/// Why the responder's side of the handshake failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RespondError {
    /// Message 1 did not decrypt under the topic's key (the initiator does not know the
    /// topic, or replayed a message 1 of another connection), or it is malformed. No
    /// Diffie-Hellman was done.
    #[error("noise message 1 rejected: {0}")]
    Message1(String),
    /// The stream failed, or a later message was wrong.
    #[error("{0}")]
    Other(#[from] anyhow::Error),
}

/// The Noise prologue for `conn`: its exported keying material.
pub(crate) fn prologue(conn: &quinn::Connection) -> anyhow::Result<[u8; 32]> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .map_err(|_| anyhow::anyhow!("the QUIC connection cannot export keying material"))?;
    Ok(out)
}

fn builder<'a>(
    secret: &'a [u8; 32],
    prologue: &'a [u8; 32],
    psk: &'a [u8; 32],
) -> anyhow::Result<snow::Builder<'a>> {
    let params: snow::params::NoiseParams = NOISE_PARAMS.parse()?;
    Ok(snow::Builder::new(params)
        .local_private_key(secret)?
        .prologue(prologue)?
        .psk(0, psk)?)
}

/// Runs the initiator's side on the stream: names `info_hash`, sends message 1 with
/// `purpose`, reads message 2 (which only a responder that knows the topic can write) and,
/// for [`Purpose::Connect`], sends message 3. An identify exchange stops after message 2:
/// it only wants the responder's key.
pub(crate) async fn initiate(
    send: &mut SendStream,
    recv: &mut RecvStream,
    identity: &Identity,
    prologue: &[u8; 32],
    psk: &[u8; 32],
    info_hash: &[u8; INFO_HASH_LEN],
    purpose: Purpose,
) -> anyhow::Result<Handshaked> {
    let secret = identity.secret_bytes();
    let mut hs = builder(&secret, prologue, psk)?.build_initiator()?;
    let mut buf = [0u8; wire::MAX_HANDSHAKE_MESSAGE];
    let mut scratch = [0u8; wire::MAX_HANDSHAKE_MESSAGE];
    let n = hs.write_message(&[purpose.to_byte()], &mut buf)?;
    let mut first = Vec::with_capacity(INFO_HASH_LEN + 2 + n);
    first.extend_from_slice(info_hash);
    first.extend_from_slice(&wire::encode_handshake_len(n));
    first.extend_from_slice(&buf[..n]);
    send.write_all(&first).await?;
    let len = read_message(recv, &mut buf).await?;
    hs.read_message(&buf[..len], &mut scratch)?;
    if purpose == Purpose::Connect {
        let n = hs.write_message(&[], &mut buf)?;
        write_message(send, &buf[..n]).await?;
        anyhow::ensure!(hs.is_handshake_finished(), "the handshake did not finish");
    }
    remote_static(&hs)
}

/// The responder's state after message 1: the initiator knows the topic.
pub(crate) struct Responder {
    hs: snow::HandshakeState,
    /// What the initiator wants.
    pub(crate) purpose: Purpose,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("purpose", &self.purpose)
            .finish_non_exhaustive()
    }
}

/// Reads the initiator's info-hash (before any crypto: the caller picks the topic's key).
pub(crate) async fn read_info_hash(recv: &mut RecvStream) -> anyhow::Result<[u8; INFO_HASH_LEN]> {
    let mut info_hash = [0u8; INFO_HASH_LEN];
    recv.read_exact(&mut info_hash).await?;
    Ok(info_hash)
}

/// Reads and checks message 1 under `psk`: symmetric crypto only.
pub(crate) async fn respond_first(
    recv: &mut RecvStream,
    identity: &Identity,
    prologue: &[u8; 32],
    psk: &[u8; 32],
) -> Result<Responder, RespondError> {
    let mut buf = [0u8; wire::MAX_HANDSHAKE_MESSAGE];
    let len = read_message(recv, &mut buf).await?;
    let secret = identity.secret_bytes();
    let mut hs = builder(&secret, prologue, psk)?
        .build_responder()
        .map_err(anyhow::Error::from)?;
    let mut payload = [0u8; wire::MAX_HANDSHAKE_MESSAGE];
    let n = hs
        .read_message(&buf[..len], &mut payload)
        .map_err(|e| RespondError::Message1(e.to_string()))?;
    let purpose = wire::decode_purpose(&payload[..n])
        .map_err(|e: WireError| RespondError::Message1(e.to_string()))?;
    Ok(Responder { hs, purpose })
}

impl Responder {
    /// Sends message 2 (our static key; two Diffie-Hellman operations).
    pub(crate) async fn reply(&mut self, send: &mut SendStream) -> anyhow::Result<()> {
        let mut buf = [0u8; wire::MAX_HANDSHAKE_MESSAGE];
        let n = self.hs.write_message(&[], &mut buf)?;
        write_message(send, &buf[..n]).await
    }

    /// Reads message 3: the initiator's static key.
    pub(crate) async fn finish(mut self, recv: &mut RecvStream) -> anyhow::Result<Handshaked> {
        let mut buf = [0u8; wire::MAX_HANDSHAKE_MESSAGE];
        let mut scratch = [0u8; wire::MAX_HANDSHAKE_MESSAGE];
        let len = read_message(recv, &mut buf).await?;
        self.hs.read_message(&buf[..len], &mut scratch)?;
        anyhow::ensure!(
            self.hs.is_handshake_finished(),
            "the handshake did not finish"
        );
        remote_static(&self.hs)
    }
}

fn remote_static(hs: &snow::HandshakeState) -> anyhow::Result<Handshaked> {
    let remote = hs
        .get_remote_static()
        .ok_or_else(|| anyhow::anyhow!("no remote static key after the handshake"))?;
    let remote_static: [u8; 32] = remote
        .try_into()
        .map_err(|_| anyhow::anyhow!("remote static key of {} bytes", remote.len()))?;
    Ok(Handshaked { remote_static })
}

async fn write_message(send: &mut SendStream, msg: &[u8]) -> anyhow::Result<()> {
    let mut framed = Vec::with_capacity(2 + msg.len());
    framed.extend_from_slice(&wire::encode_handshake_len(msg.len()));
    framed.extend_from_slice(msg);
    send.write_all(&framed).await?;
    Ok(())
}

async fn read_message(
    recv: &mut RecvStream,
    buf: &mut [u8; wire::MAX_HANDSHAKE_MESSAGE],
) -> anyhow::Result<usize> {
    let mut header = [0u8; 2];
    recv.read_exact(&mut header).await?;
    let len = wire::decode_handshake_len(header)?;
    recv.read_exact(&mut buf[..len]).await?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(
        psk_i: &[u8; 32],
        psk_r: &[u8; 32],
        prologue_r: &[u8; 32],
    ) -> (snow::HandshakeState, snow::HandshakeState) {
        let (a, b) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let (sa, sb) = (a.secret_bytes(), b.secret_bytes());
        let i = builder(&sa, &[1; 32], psk_i)
            .unwrap()
            .build_initiator()
            .unwrap();
        let r = builder(&sb, prologue_r, psk_r)
            .unwrap()
            .build_responder()
            .unwrap();
        (i, r)
    }

    #[test]
    fn params_parse() {
        let params: snow::params::NoiseParams = NOISE_PARAMS.parse().unwrap();
        assert_eq!(params.name, NOISE_PARAMS);
    }

    /// Message 1 is checked under the psk and the prologue: a wrong topic or another
    /// connection's message 1 fails at once.
    #[test]
    fn message_1_needs_the_psk_and_the_prologue() {
        let mut buf = [0u8; 1024];
        let mut out = [0u8; 1024];
        let (mut i, mut r) = pair(&[7; 32], &[7; 32], &[1; 32]);
        let n = i.write_message(&[1], &mut buf).unwrap();
        assert_eq!(n, 32 + 1 + 16, "e, then the encrypted purpose byte");
        assert_eq!(r.read_message(&buf[..n], &mut out).unwrap(), 1);
        assert_eq!(out[0], 1);
        // Another topic.
        let (mut i, mut r) = pair(&[7; 32], &[8; 32], &[1; 32]);
        let n = i.write_message(&[1], &mut buf).unwrap();
        assert!(r.read_message(&buf[..n], &mut out).is_err());
        // Another connection (prologue).
        let (mut i, mut r) = pair(&[7; 32], &[7; 32], &[2; 32]);
        let n = i.write_message(&[1], &mut buf).unwrap();
        assert!(r.read_message(&buf[..n], &mut out).is_err());
    }

    /// With the same psk the handshake completes and each side learns the other's key.
    #[test]
    fn the_same_psk_completes_the_handshake() {
        let mut buf = [0u8; 1024];
        let mut out = [0u8; 1024];
        let (mut i, mut r) = pair(&[7; 32], &[7; 32], &[1; 32]);
        let n = i.write_message(&[1], &mut buf).unwrap();
        r.read_message(&buf[..n], &mut out).unwrap();
        let n = r.write_message(&[], &mut buf).unwrap();
        assert_eq!(
            n,
            32 + 48 + 16,
            "e, the encrypted s, an empty payload's tag"
        );
        i.read_message(&buf[..n], &mut out).unwrap();
        let n = i.write_message(&[], &mut buf).unwrap();
        r.read_message(&buf[..n], &mut out).unwrap();
        assert!(i.is_handshake_finished() && r.is_handshake_finished());
        assert_eq!(i.get_remote_static().map(<[u8]>::len), Some(32));
        assert_eq!(r.get_remote_static().map(<[u8]>::len), Some(32));
    }
}
