//! The Noise XX handshake, bound to its QUIC connection, and topic tags.
//!
//! Both peers feed 32 bytes of the QUIC connection's exported keying material (RFC 5705 /
//! RFC 9001 exporter, label [`EXPORTER_LABEL`]) into Noise as the prologue. A machine in the
//! middle that terminates two QUIC connections gets two different exporter values, so the
//! Noise handshake fails: the static key Noise authenticates is that of the QUIC peer
//! itself. Payloads then travel in the QUIC stream, encrypted once, by QUIC.

use blake2::Blake2sMac256;
use blake2::digest::{KeyInit, Mac};
use pluresdb_sync_core::Identity;
use quinn::{RecvStream, SendStream};

use crate::wire::{self, TAG_LEN};

/// The Noise protocol: the spec's `XX_25519_ChaChaPoly_BLAKE2s`.
pub const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";

/// Exporter label for the Noise prologue.
pub(crate) const EXPORTER_LABEL: &[u8] = b"EXPORTER-pluresdb-sync-hyperswarm-noise-prologue-v1";

/// What a finished handshake established.
#[derive(Debug)]
pub(crate) struct Handshaked {
    /// The remote's static public key, authenticated by Noise.
    pub(crate) remote_static: [u8; 32],
    /// The Noise handshake hash: unique to this session, used to bind topic tags to it.
    pub(crate) hash: [u8; 32],
}

/// The Noise prologue for `conn`: its exported keying material.
pub(crate) fn prologue(conn: &quinn::Connection) -> anyhow::Result<[u8; 32]> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .map_err(|_| anyhow::anyhow!("the QUIC connection cannot export keying material"))?;
    Ok(out)
}

fn builder<'a>(secret: &'a [u8; 32], prologue: &'a [u8; 32]) -> anyhow::Result<snow::Builder<'a>> {
    let params: snow::params::NoiseParams = NOISE_PARAMS.parse()?;
    Ok(snow::Builder::new(params)
        .local_private_key(secret)?
        .prologue(prologue)?)
}

/// Runs the initiator's side of Noise XX on the stream.
pub(crate) async fn initiate(
    send: &mut SendStream,
    recv: &mut RecvStream,
    identity: &Identity,
    prologue: &[u8; 32],
) -> anyhow::Result<Handshaked> {
    let secret = identity.secret_bytes();
    let mut hs = builder(&secret, prologue)?.build_initiator()?;
    let mut buf = [0u8; wire::MAX_HANDSHAKE_MESSAGE];
    let mut scratch = [0u8; wire::MAX_HANDSHAKE_MESSAGE];
    let n = hs.write_message(&[], &mut buf)?;
    write_message(send, &buf[..n]).await?;
    let len = read_message(recv, &mut buf).await?;
    hs.read_message(&buf[..len], &mut scratch)?;
    let n = hs.write_message(&[], &mut buf)?;
    write_message(send, &buf[..n]).await?;
    finish(&hs)
}

/// Runs the responder's side of Noise XX on the stream.
pub(crate) async fn respond(
    send: &mut SendStream,
    recv: &mut RecvStream,
    identity: &Identity,
    prologue: &[u8; 32],
) -> anyhow::Result<Handshaked> {
    let secret = identity.secret_bytes();
    let mut hs = builder(&secret, prologue)?.build_responder()?;
    let mut buf = [0u8; wire::MAX_HANDSHAKE_MESSAGE];
    let mut scratch = [0u8; wire::MAX_HANDSHAKE_MESSAGE];
    let len = read_message(recv, &mut buf).await?;
    hs.read_message(&buf[..len], &mut scratch)?;
    let n = hs.write_message(&[], &mut buf)?;
    write_message(send, &buf[..n]).await?;
    let len = read_message(recv, &mut buf).await?;
    hs.read_message(&buf[..len], &mut scratch)?;
    finish(&hs)
}

fn finish(hs: &snow::HandshakeState) -> anyhow::Result<Handshaked> {
    anyhow::ensure!(hs.is_handshake_finished(), "the handshake did not finish");
    let remote = hs
        .get_remote_static()
        .ok_or_else(|| anyhow::anyhow!("no remote static key after the handshake"))?;
    let remote_static: [u8; 32] = remote
        .try_into()
        .map_err(|_| anyhow::anyhow!("remote static key of {} bytes", remote.len()))?;
    let hash: [u8; 32] = hs
        .get_handshake_hash()
        .try_into()
        .map_err(|_| anyhow::anyhow!("unexpected handshake hash length"))?;
    Ok(Handshaked {
        remote_static,
        hash,
    })
}

async fn write_message(send: &mut SendStream, msg: &[u8]) -> anyhow::Result<()> {
    send.write_all(&wire::encode_handshake_len(msg.len()))
        .await?;
    send.write_all(msg).await?;
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

/// Which side computes a topic tag (the two tags of one session differ).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Role {
    Initiator,
    Responder,
}

/// Proof of knowing the topic, bound to one handshake: BLAKE2s-MAC keyed with the topic's
/// `Domain::NoisePsk` value over a role label and the handshake hash. It reveals nothing
/// about the topic and cannot be replayed into another session.
pub(crate) fn topic_tag(psk: &[u8; 32], role: Role, hash: &[u8; 32]) -> [u8; TAG_LEN] {
    // A 32-byte key is always valid for BLAKE2s; the fallback is unreachable.
    let Ok(mut mac) = <Blake2sMac256 as KeyInit>::new_from_slice(psk) else {
        return [0u8; TAG_LEN];
    };
    mac.update(match role {
        Role::Initiator => b"pluresdb-sync/v1/topic-tag/initiator",
        Role::Responder => b"pluresdb-sync/v1/topic-tag/responder",
    });
    mac.update(hash);
    mac.finalize().into_bytes().into()
}

/// Compares tags in constant time.
pub(crate) fn tags_equal(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_depend_on_everything() {
        let h = [1u8; 32];
        let a = topic_tag(&[2; 32], Role::Initiator, &h);
        assert!(tags_equal(&a, &topic_tag(&[2; 32], Role::Initiator, &h)));
        assert!(!tags_equal(&a, &topic_tag(&[3; 32], Role::Initiator, &h)));
        assert!(!tags_equal(&a, &topic_tag(&[2; 32], Role::Responder, &h)));
        assert!(!tags_equal(
            &a,
            &topic_tag(&[2; 32], Role::Initiator, &[9; 32])
        ));
    }

    #[test]
    fn params_parse() {
        let params: snow::params::NoiseParams = NOISE_PARAMS.parse().unwrap();
        assert_eq!(params.name, NOISE_PARAMS);
    }
}
