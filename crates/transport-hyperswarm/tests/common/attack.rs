//! An attacker's tools against a real node: raw QUIC clients speaking the node's ALPN (of
//! either protocol version), Noise initiators built by hand, and QUIC Initials that never go
//! further. Everything an attacker needs is public: the info-hash is on the DHT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pluresdb_sync_core::TopicHash;
use pluresdb_sync_core::topic::{Domain, derive_from_topic};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// The protocol spoken now: Noise XXpsk0 after the info-hash.
pub const ALPN_V2: &[u8] = b"pluresdb-sync/hyperswarm/2";
/// The previous protocol: Noise XX, then topic tags.
pub const ALPN_V1: &[u8] = b"pluresdb-sync/hyperswarm/1";
pub const EXPORTER_V2: &[u8] = b"EXPORTER-pluresdb-sync-hyperswarm-noise-prologue-v2";
pub const EXPORTER_V1: &[u8] = b"EXPORTER-pluresdb-sync-hyperswarm-noise-prologue-v1";
pub const XX: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
pub const XX_PSK0: &str = "Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s";

/// What a DHT observer sees of a topic: its 20-byte info-hash.
pub fn info_hash(topic: &TopicHash) -> [u8; 20] {
    let mut out = [0u8; 20];
    out.copy_from_slice(&derive_from_topic(topic, Domain::DhtInfoHash)[..20]);
    out
}

/// What only those who know the topic have.
pub fn psk(topic: &TopicHash) -> [u8; 32] {
    derive_from_topic(topic, Domain::NoisePsk)
}

/// Accepts any certificate, as the transport does (Noise authenticates).
#[derive(Debug)]
struct AnyCert;

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A QUIC client config offering `alpns` (the server picks the one it speaks).
pub fn client_config(alpns: &[&[u8]]) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert))
        .with_no_client_auth();
    tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ))
}

/// A raw QUIC client on `bind` offering `alpns`.
pub fn client_on(bind: SocketAddr, alpns: &[&[u8]]) -> quinn::Endpoint {
    let mut ep = quinn::Endpoint::client(bind).unwrap();
    ep.set_default_client_config(client_config(alpns));
    ep
}

/// A raw QUIC client on 127.0.0.1 speaking the current protocol.
pub fn client() -> quinn::Endpoint {
    client_on("127.0.0.1:0".parse().unwrap(), &[ALPN_V2])
}

/// The ALPN the server chose on `conn`.
pub fn alpn(conn: &quinn::Connection) -> Vec<u8> {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .unwrap_or_default()
}

/// Waits until the victim closes `conn`, returning its close code.
pub async fn closed_by_victim(conn: &quinn::Connection) -> u64 {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the victim kept a bad connection open")
    {
        quinn::ConnectionError::ApplicationClosed(c) => c.error_code.into_inner(),
        other => panic!("unexpected end: {other}"),
    }
}

/// Writes a handshake message with its u16 length.
pub async fn send_frame(send: &mut quinn::SendStream, msg: &[u8]) {
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(msg);
    send.write_all(&framed).await.unwrap();
}

/// Reads a handshake message; `None` if the stream or connection ends first.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    recv.read_exact(&mut len).await.ok()?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    recv.read_exact(&mut msg).await.ok()?;
    Some(msg)
}

/// A Noise initiator with `params`, a throwaway static key, `prologue` and maybe a psk.
pub fn initiator(params: &str, prologue: &[u8], psk: Option<&[u8; 32]>) -> snow::HandshakeState {
    let key = snow::Builder::new(params.parse().unwrap())
        .generate_keypair()
        .unwrap();
    let mut b = snow::Builder::new(params.parse().unwrap())
        .local_private_key(&key.private)
        .unwrap()
        .prologue(prologue)
        .unwrap();
    if let Some(psk) = psk {
        b = b.psk(0, psk).unwrap();
    }
    b.build_initiator().unwrap()
}

/// The prologue both sides of `conn` use, for the exporter `label`.
pub fn exporter(conn: &quinn::Connection, label: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, label, b"").unwrap();
    out
}

/// `count` QUIC Initials to `victim`, each the first packet of a fresh connection attempt
/// offering both protocol versions: sent from a socket that then never answers, each one
/// is a half-open handshake the victim must deal with.
pub fn silent_initials(victim: SocketAddr, count: usize) -> Vec<Vec<u8>> {
    let mut ep = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let config = client_config(&[ALPN_V2, ALPN_V1]);
    let now = Instant::now();
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let (_, mut conn) = ep.connect(now, config.clone(), victim, "x").unwrap();
        let mut buf = Vec::new();
        if let Some(t) = conn.poll_transmit(now, 1, &mut buf) {
            buf.truncate(t.size);
            out.push(buf);
        }
    }
    out
}
