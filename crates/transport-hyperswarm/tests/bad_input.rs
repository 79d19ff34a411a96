//! Hostile input at a joined transport: garbage datagrams, forged handshakes, a flood of
//! connection attempts. No panic, bounded work, and the good peers keep being served.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::attack::{
    self, ALPN_V1, ALPN_V2, EXPORTER_V1, EXPORTER_V2, XX, XX_PSK0, closed_by_victim, initiator,
    read_frame, send_frame,
};
use common::next_conn;
use common::pair::{pair, still_served};
use pluresdb_sync_core::Transport;
use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_transport_hyperswarm::testkit::LoopbackDht;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_handshakes_are_rejected() {
    common::init_tracing();
    let dht = LoopbackDht::start().await.unwrap();
    let topic = fresh_topic("forged");
    let mut p = pair(&dht, topic).await;
    let victim: SocketAddr = p.b.local_addr().unwrap();
    let ep = attack::client();
    let connect = || async { ep.connect(victim, "x").unwrap().await.unwrap() };
    let (info_hash, psk) = (attack::info_hash(&topic), attack::psk(&topic));
    let mut buf = [0u8; 1024];

    // 1. An oversized handshake length after the info-hash.
    let conn = connect().await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&info_hash).await.unwrap();
    send.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
    assert_eq!(closed_by_victim(&conn).await, 2, "protocol violation");

    // 2. An info-hash of no topic the victim joined: refused before any crypto.
    let conn = connect().await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&attack::info_hash(&fresh_topic("elsewhere")))
        .await
        .unwrap();
    assert_eq!(closed_by_victim(&conn).await, 4, "unknown topic");

    // 3. A random message 1 (a replayed one from another session looks the same): no
    //    message 2, the connection is closed.
    let conn = connect().await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&info_hash).await.unwrap();
    send_frame(&mut send, &[9u8; 49]).await;
    assert_eq!(read_frame(&mut recv).await, None, "no message 2");
    assert_eq!(closed_by_victim(&conn).await, 2);

    // 4. A genuine initiator that knows the topic, with a prologue that is not this
    //    connection's exporter (a relayed handshake): refused at message 1.
    let conn = connect().await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut hs = initiator(XX_PSK0, &[0u8; 32], Some(&psk));
    let n = hs.write_message(&[1], &mut buf).unwrap();
    send.write_all(&info_hash).await.unwrap();
    send_frame(&mut send, &buf[..n]).await;
    assert_eq!(read_frame(&mut recv).await, None, "no message 2");
    assert_eq!(closed_by_victim(&conn).await, 2);

    // 5. A room member replays its valid message 1 of one connection on another: the first
    //    connection gets message 2, the replay nothing (the prologue differs). The victim
    //    here is alone on its topic, so every DH it does is the attacker's.
    let lone_topic = fresh_topic("forged-alone");
    let (info_hash, psk) = (attack::info_hash(&lone_topic), attack::psk(&lone_topic));
    let mut v = dht.transport().unwrap();
    v.announce(lone_topic).await.unwrap();
    let to_v = v.local_addr().unwrap();
    let connect_v = || async { ep.connect(to_v, "x").unwrap().await.unwrap() };
    let first = connect_v().await;
    let (mut send, mut recv) = first.open_bi().await.unwrap();
    let mut hs = initiator(XX_PSK0, &attack::exporter(&first, EXPORTER_V2), Some(&psk));
    let n = hs.write_message(&[2], &mut buf).unwrap();
    let valid_message_1 = buf[..n].to_vec();
    send.write_all(&info_hash).await.unwrap();
    send_frame(&mut send, &valid_message_1).await;
    let msg2 = read_frame(&mut recv)
        .await
        .expect("message 2 for a room member");
    hs.read_message(&msg2, &mut buf).unwrap();
    let replay = connect_v().await;
    let (mut send, mut recv) = replay.open_bi().await.unwrap();
    send.write_all(&info_hash).await.unwrap();
    send_frame(&mut send, &valid_message_1).await;
    assert_eq!(
        read_frame(&mut recv).await,
        None,
        "no message 2 for a replay"
    );
    assert_eq!(closed_by_victim(&replay).await, 2);
    first.close(0u32.into(), b"");
    let stats = v.incoming_stats();
    assert_eq!(
        stats.message2_sent, 1,
        "only the first cost a DH: {stats:?}"
    );
    assert_eq!(stats.refused_at_message1, 1, "{stats:?}");
    v.disconnect().await.unwrap();

    // 6. A stalled handshake is cut at the handshake timeout (5 s here).
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

/// What a DHT observer can do: it reads the info-hash (the DHT key) and an announced
/// endpoint, dials it, and tries to get the peer's static key (its identity, the same on every
/// topic) without knowing the topic. It offers both protocol versions and tries every
/// handshake it can build. Returns the key if any attempt revealed it.
async fn observer_learns_key(
    victim: SocketAddr,
    info_hash: [u8; 20],
    attempts: &mut u64,
) -> Option<Vec<u8>> {
    let ep = attack::client_on("127.0.0.1:0".parse().unwrap(), &[ALPN_V2, ALPN_V1]);
    let mut buf = [0u8; 1024];
    // Psk guesses: none (plain XX), zeros, the info-hash itself padded.
    let mut padded = [0u8; 32];
    padded[..20].copy_from_slice(&info_hash);
    let guesses: [Option<[u8; 32]>; 3] = [None, Some([0u8; 32]), Some(padded)];
    for guess in guesses {
        for purpose in [1u8, 2] {
            let conn = ep.connect(victim, "x").unwrap().await.unwrap();
            *attempts += 1;
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            let v1 = attack::alpn(&conn) == ALPN_V1;
            let label = if v1 { EXPORTER_V1 } else { EXPORTER_V2 };
            let prologue = attack::exporter(&conn, label);
            let (params, psk) = match guess {
                Some(psk) if !v1 => (XX_PSK0, Some(psk)),
                _ => (XX, None),
            };
            let mut hs = initiator(params, &prologue, psk.as_ref());
            let payload: &[u8] = if v1 { &[] } else { &[purpose] };
            let n = hs.write_message(payload, &mut buf).unwrap();
            if !v1 {
                send.write_all(&info_hash).await.unwrap();
            }
            send_frame(&mut send, &buf[..n]).await;
            if let Some(msg2) = read_frame(&mut recv).await
                && hs.read_message(&msg2, &mut buf).is_ok()
            {
                return hs.get_remote_static().map(<[u8]>::to_vec);
            }
            conn.close(0u32.into(), b"");
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dht_observer_cannot_learn_a_peers_key() {
    common::init_tracing();
    let dht = LoopbackDht::start().await.unwrap();
    let topic = fresh_topic("observer");
    // The victim is alone on its topic (it connects; nobody else is there yet), so every
    // handshake it answers is the observer's.
    let mut v = dht.transport().unwrap();
    let mut rv = v.connect(topic).await.unwrap();
    let victim = v.local_addr().unwrap();
    let mut attempts = 0;
    let learned = observer_learns_key(victim, attack::info_hash(&topic), &mut attempts).await;
    assert_eq!(
        learned.map(hex::encode),
        None,
        "a DHT observer read the peer's static key (its id: {})",
        v.peer_id()
    );
    // Every attempt was refused at message 1 and cost the victim no Diffie-Hellman.
    tokio::time::timeout(Duration::from_secs(10), async {
        while v.incoming_stats().refused_at_message1 < attempts {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "not all {attempts} refused at message 1: {:?}",
            v.incoming_stats()
        )
    });
    let stats = v.incoming_stats();
    assert_eq!(stats.refused_at_message1, attempts, "{stats:?}");
    assert_eq!(stats.message2_sent, 0, "no DH for them: {stats:?}");
    // A peer that knows the topic still connects.
    let mut c = dht.transport().unwrap();
    let mut rc = c.connect(topic).await.unwrap();
    let conn = next_conn(&mut rc, Duration::from_secs(30)).await;
    assert_eq!(conn.peer_id(), v.peer_id());
    let conn = next_conn(&mut rv, Duration::from_secs(30)).await;
    assert_eq!(conn.peer_id(), c.peer_id());
    for t in [&mut v, &mut c] {
        t.disconnect().await.unwrap();
    }
}

/// A peer of the previous protocol version is refused in the TLS handshake, at once, and the
/// node counts it (its own dial to such a peer fails with `HandshakeFailure::Version`: unit
/// test `an_old_peer_gets_a_version_error_both_ways`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_peer_is_refused_at_once_with_a_version_error() {
    common::init_tracing();
    let dht = LoopbackDht::start().await.unwrap();
    let mut t = dht.transport().unwrap();
    t.announce(fresh_topic("old")).await.unwrap();
    let ep = attack::client_on("127.0.0.1:0".parse().unwrap(), &[ALPN_V1]);
    let started = std::time::Instant::now();
    let err = ep
        .connect(t.local_addr().unwrap(), "x")
        .unwrap()
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3), "not at once");
    // TLS alert 120, no_application_protocol, as a QUIC crypto error.
    let no_alpn = quinn::TransportErrorCode::crypto(120);
    assert!(
        matches!(&err, quinn::ConnectionError::ConnectionClosed(c) if c.error_code == no_alpn),
        "{err}"
    );
    tokio::time::timeout(Duration::from_secs(5), async {
        while t.incoming_stats().version == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the old peer was not counted");
    t.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connection_attempts_is_bounded() {
    common::init_tracing();
    let dht = LoopbackDht::start().await.unwrap();
    let topic = fresh_topic("flood");
    let mut p = pair(&dht, topic).await;
    let victim = p.b.local_addr().unwrap();
    let ep = attack::client();
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
    // From one IP: at most 16 before it must answer a Retry, then 8 validated.
    assert!(
        open.len() <= 16 + 8,
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
