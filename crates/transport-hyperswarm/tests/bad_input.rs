//! Hostile input at a joined transport: garbage datagrams, forged handshakes, a flood of
//! connection attempts. No panic, bounded work, and the good peers keep being served.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::next_conn;
use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_core::{Connection, Transport};
use pluresdb_sync_transport_hyperswarm::HyperswarmTransport;
use pluresdb_sync_transport_hyperswarm::testkit::LoopbackDht;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

const ALPN: &[u8] = b"pluresdb-sync/hyperswarm/1";
const EXPORTER_LABEL: &[u8] = b"EXPORTER-pluresdb-sync-hyperswarm-noise-prologue-v1";

/// Two joined transports with their connection to each other.
struct Pair {
    a: HyperswarmTransport,
    b: HyperswarmTransport,
    ca: Box<dyn Connection>,
    cb: Box<dyn Connection>,
}

async fn pair(dht: &LoopbackDht, topic: [u8; 32]) -> Pair {
    let mut a = dht.transport().unwrap();
    let mut b = dht.transport().unwrap();
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let ca = next_conn(&mut ra, Duration::from_secs(30)).await;
    let cb = next_conn(&mut rb, Duration::from_secs(30)).await;
    // Keep the receivers alive for the test's duration.
    std::mem::forget(ra);
    std::mem::forget(rb);
    Pair { a, b, ca, cb }
}

async fn still_served(p: &mut Pair, n: usize) {
    for i in 0..n {
        let msg = format!("message {i}").repeat(100);
        p.ca.send(msg.as_bytes()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(20), p.cb.receive())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.as_deref(), Some(msg.as_bytes()), "message {i}");
    }
    p.cb.send(b"and back").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), p.ca.receive())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.as_deref(), Some(&b"and back"[..]));
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_truncated_datagrams_do_not_disturb_a_connection() {
    common::init_tracing();
    let dht = LoopbackDht::start().await.unwrap();
    let mut p = pair(&dht, fresh_topic("garbage")).await;
    let target = p.b.local_addr().unwrap();
    // b learns its public address from DHT nodes' replies; on a loaded machine the first
    // try may time out and the next comes a few seconds later.
    tokio::time::timeout(Duration::from_secs(30), async {
        while p.b.public_addr().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("b never learned its public address");
    assert_eq!(p.b.public_addr(), Some(target));
    let junk = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let flood = tokio::spawn(async move {
        let mut seed = 0x1234_5678_9abc_def1u64;
        for i in 0..3000u32 {
            let len = (xorshift(&mut seed) % 1400) as usize;
            let mut d: Vec<u8> = (0..len).map(|_| xorshift(&mut seed) as u8).collect();
            match i % 6 {
                // Fixed bit clear: dropped by the data socket.
                0 => {
                    if let Some(b) = d.first_mut() {
                        *b &= 0x3f;
                    }
                }
                // Fixed bit set: quinn's problem (unknown connection ids, bad Initials).
                1 => {
                    if let Some(b) = d.first_mut() {
                        *b |= 0x40;
                    }
                }
                // A forged KRPC reply claiming another public address.
                2 => {
                    d = b"d2:ip6:\x01\x02\x03\x04\x05\x061:t4:abcd1:y1:re".to_vec();
                }
                // Truncated probe and truncated long-header Initial.
                3 => d = b"\x00pluresdb".to_vec(),
                4 => d = vec![0xc0, 0, 0, 0, 1, 8],
                _ => d.truncate(3),
            }
            let _ = junk.send_to(&d, target).await;
            if i % 100 == 0 {
                tokio::task::yield_now().await;
            }
        }
    });
    still_served(&mut p, 200).await;
    flood.await.unwrap();
    still_served(&mut p, 10).await;
    // The forged KRPC reply did not change what b believes its address is.
    assert_eq!(p.b.public_addr(), p.b.local_addr());
    p.a.disconnect().await.unwrap();
    p.b.disconnect().await.unwrap();
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

/// A raw QUIC client speaking the transport's ALPN.
fn attacker() -> quinn::Endpoint {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    )));
    ep
}

/// Waits until the victim closes `conn`, returning its close code.
async fn closed_by_victim(conn: &quinn::Connection) -> u64 {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the victim kept a bad connection open")
    {
        quinn::ConnectionError::ApplicationClosed(c) => c.error_code.into_inner(),
        other => panic!("unexpected end: {other}"),
    }
}

async fn noise_msg(send: &mut quinn::SendStream, msg: &[u8]) {
    send.write_all(&(msg.len() as u16).to_be_bytes())
        .await
        .unwrap();
    send.write_all(msg).await.unwrap();
}

async fn read_noise_msg(recv: &mut quinn::RecvStream) -> Vec<u8> {
    let mut len = [0u8; 2];
    recv.read_exact(&mut len).await.unwrap();
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    recv.read_exact(&mut msg).await.unwrap();
    msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_handshakes_are_rejected() {
    common::init_tracing();
    let dht = LoopbackDht::start().await.unwrap();
    let topic = fresh_topic("forged");
    let mut p = pair(&dht, topic).await;
    let victim: SocketAddr = p.b.local_addr().unwrap();
    let ep = attacker();
    let connect = || async { ep.connect(victim, "x").unwrap().await.unwrap() };

    // 1. An oversized handshake length.
    let conn = connect().await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
    assert_eq!(closed_by_victim(&conn).await, 2, "protocol violation");

    // 2. Random Noise messages 1 and 3 (msg 1 of another session, replayed, looks the same).
    let conn = connect().await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    noise_msg(&mut send, &[9u8; 32]).await;
    let msg2 = read_noise_msg(&mut recv).await;
    assert_eq!(msg2.len(), 96);
    noise_msg(&mut send, &[7u8; 64]).await;
    assert_eq!(closed_by_victim(&conn).await, 2);

    // 3. A genuine Noise initiator whose prologue is not this connection's exporter (a
    //    relayed or replayed handshake): it cannot even read message 2; the victim times it
    //    out or sees garbage.
    let conn = connect().await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let key = [3u8; 32];
    let mut hs = snow::Builder::new("Noise_XX_25519_ChaChaPoly_BLAKE2s".parse().unwrap())
        .local_private_key(&key)
        .unwrap()
        .prologue(&[0u8; 32])
        .unwrap()
        .build_initiator()
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = hs.write_message(&[], &mut buf).unwrap();
    noise_msg(&mut send, &buf[..n]).await;
    let msg2 = read_noise_msg(&mut recv).await;
    assert!(
        hs.read_message(&msg2, &mut buf).is_err(),
        "prologue mismatch must fail"
    );
    noise_msg(&mut send, &[5u8; 64]).await;
    assert_eq!(closed_by_victim(&conn).await, 2);

    // 4. A correct handshake bound to the connection, but no knowledge of the topic.
    let conn = connect().await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut prologue = [0u8; 32];
    conn.export_keying_material(&mut prologue, EXPORTER_LABEL, b"")
        .unwrap();
    let mut hs = snow::Builder::new("Noise_XX_25519_ChaChaPoly_BLAKE2s".parse().unwrap())
        .local_private_key(&key)
        .unwrap()
        .prologue(&prologue)
        .unwrap()
        .build_initiator()
        .unwrap();
    let n = hs.write_message(&[], &mut buf).unwrap();
    noise_msg(&mut send, &buf[..n]).await;
    let msg2 = read_noise_msg(&mut recv).await;
    hs.read_message(&msg2, &mut buf).unwrap();
    let n = hs.write_message(&[], &mut buf).unwrap();
    noise_msg(&mut send, &buf[..n]).await;
    let mut hello = [0u8; 33];
    hello[0] = 1;
    send.write_all(&hello).await.unwrap();
    assert_eq!(closed_by_victim(&conn).await, 4, "unknown topic");

    // 5. A stalled handshake is cut at the handshake timeout (5 s here).
    let conn = connect().await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0]).await.unwrap();
    let started = std::time::Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(15), conn.closed())
        .await
        .expect("a stalled handshake was never cut");
    assert!(started.elapsed() < Duration::from_secs(10));

    // The good connection never noticed, and a new good peer still gets in.
    still_served(&mut p, 20).await;
    let mut c = dht.transport().unwrap();
    let mut rc = c.connect(topic).await.unwrap();
    let first = next_conn(&mut rc, Duration::from_secs(30)).await;
    let second = next_conn(&mut rc, Duration::from_secs(30)).await;
    let mut ids = [first.peer_id().to_owned(), second.peer_id().to_owned()];
    ids.sort();
    let mut want = [p.a.peer_id(), p.b.peer_id()];
    want.sort();
    assert_eq!(ids, want);
    for t in [&mut p.a, &mut p.b, &mut c] {
        t.disconnect().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connection_attempts_is_bounded() {
    common::init_tracing();
    let dht = LoopbackDht::start().await.unwrap();
    let topic = fresh_topic("flood");
    let mut p = pair(&dht, topic).await;
    let victim = p.b.local_addr().unwrap();
    let ep = attacker();
    // 150 connections that complete QUIC and then say nothing.
    let mut attempts = tokio::task::JoinSet::new();
    for _ in 0..150 {
        let connecting = ep.connect(victim, "x").unwrap();
        attempts.spawn(async move {
            match connecting.await {
                Ok(conn) => {
                    // Keep the stream: dropping it would finish it and end the handshake early.
                    let stream = conn.open_bi().await.ok();
                    Some((conn, stream))
                }
                Err(_) => None,
            }
        });
    }
    let mut open = Vec::new();
    let mut refused = 0;
    while let Some(r) = attempts.join_next().await {
        match r.unwrap() {
            Some(c) => open.push(c),
            None => refused += 1,
        }
    }
    assert!(refused > 0, "150 stalled handshakes were all accepted");
    assert!(
        open.len() <= 64 + 8,
        "{} handshakes held at once",
        open.len()
    );
    // The good connection is served meanwhile.
    still_served(&mut p, 20).await;
    // Every stalled connection is cut by the handshake timeout.
    for (conn, _) in &open {
        tokio::time::timeout(Duration::from_secs(15), conn.closed())
            .await
            .expect("a stalled connection outlived the handshake timeout");
    }
    p.a.disconnect().await.unwrap();
    p.b.disconnect().await.unwrap();
}
