//! RelayTransport specifics beyond the conformance kit, against a real relay on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_core::{Error, Identity, Transport, TransportConfig, TransportMode};
use pluresdb_sync_transport_relay::server::{RelayServer, RelayServerConfig};
use pluresdb_sync_transport_relay::{RelayError, RelayTransport, SessionError};

mod common;
use common::{T, accept, errors, next_message, recv, relay, relay_with, transport, wait_for_error};

#[tokio::test]
async fn encryption_mismatch_is_a_clear_error_on_both_sides() {
    let (_server, url) = relay().await;
    let mut on = transport(&url);
    let mut off = RelayTransport::builder()
        .relay_url(&url)
        .encryption(false)
        .build()
        .unwrap();
    let topic = fresh_topic("mismatch");
    let mut on_rx = on.connect(topic).await.unwrap();
    let mut off_rx = off.connect(topic).await.unwrap();
    let e1 = wait_for_error(&on, "encryption").await;
    let e2 = wait_for_error(&off, "encryption").await;
    assert_eq!(
        e1.session_cause(),
        Some(&SessionError::EncryptionMismatch {
            local: true,
            remote: false
        })
    );
    assert_eq!(
        e2.session_cause(),
        Some(&SessionError::EncryptionMismatch {
            local: false,
            remote: true
        })
    );
    let (e1, e2) = (e1.to_string(), e2.to_string());
    assert!(
        e1.contains("encryption off") && e1.contains("has it on"),
        "{e1}"
    );
    assert!(
        e2.contains("encryption on") && e2.contains("has it off"),
        "{e2}"
    );
    assert!(on_rx.try_recv().is_err());
    assert!(off_rx.try_recv().is_err());
    on.disconnect().await.unwrap();
    off.disconnect().await.unwrap();
}

#[tokio::test]
async fn identity_comes_from_the_keygen_file() {
    let (_server, url) = relay().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("id.key");
    let id = Identity::generate().unwrap();
    id.save(&path, false).unwrap();
    let mut a = RelayTransport::builder()
        .relay_url(&url)
        .identity_file(&path)
        .build()
        .unwrap();
    let mut b = transport(&url);
    assert_eq!(a.peer_id(), id.peer_id());
    let topic = fresh_topic("identity");
    let _a_rx = a.connect(topic).await.unwrap();
    let mut b_rx = b.connect(topic).await.unwrap();
    let conn = accept(&mut b_rx).await;
    assert_eq!(conn.peer_id(), id.peer_id());
    let err = RelayTransport::builder()
        .relay_url(&url)
        .identity_file(dir.path().join("missing"))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[tokio::test]
async fn from_config_is_cheap_and_checks_the_url() {
    let config = TransportConfig {
        mode: TransportMode::Relay,
        relay_url: Some("ws://127.0.0.1:1/relay".into()),
        ..Default::default()
    };
    let t = RelayTransport::from_config(&config).unwrap();
    assert_eq!(t.name(), "relay");
    let missing = TransportConfig {
        mode: TransportMode::Relay,
        ..Default::default()
    };
    let err = RelayTransport::from_config(&missing).unwrap_err();
    assert!(
        matches!(err, RelayError::Core(Error::MissingRelayUrl)),
        "{err}"
    );
    let err = RelayTransport::builder().build().unwrap_err();
    assert!(matches!(err, RelayError::NoRelayUrl), "{err}");
    let err = RelayTransport::builder()
        .relay_url("http://x")
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("http://x"), "{err}");
}

#[tokio::test]
async fn unreachable_relay_is_a_clear_error_and_failover_uses_the_next_url() {
    let (_server, url) = relay().await;
    // A port that was just free: nothing listens there.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("ws://{}/relay", l.local_addr().unwrap())
    };
    let mut only_dead = RelayTransport::builder()
        .relay_url(&dead)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let err = only_dead.announce(fresh_topic("dead")).await.unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<RelayError>(),
            Some(RelayError::Connect { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&dead), "{err}");

    let mut a = RelayTransport::builder()
        .relay_urls([dead.clone(), url.clone()])
        .build()
        .unwrap();
    let mut b = transport(&url);
    let topic = fresh_topic("failover");
    let mut a_rx = a.connect(topic).await.unwrap();
    let _b_rx = b.connect(topic).await.unwrap();
    let conn = accept(&mut a_rx).await;
    assert_eq!(conn.peer_id(), b.peer_id());
}

#[tokio::test]
async fn a_server_that_is_not_a_relay_is_named() {
    // A plain HTTP server (the relay's metrics port) does not upgrade.
    let (mut server, _) = relay().await;
    let metrics = server
        .serve_metrics("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut t = RelayTransport::builder()
        .relay_url(format!("ws://{metrics}/relay"))
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let err = t
        .announce(fresh_topic("not-relay"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot connect to relay"), "{err}");
}

#[tokio::test]
async fn peers_on_different_topics_never_meet() {
    let (_server, url) = relay().await;
    let mut a = transport(&url);
    let mut b = transport(&url);
    let mut a_rx = a.connect(fresh_topic("x")).await.unwrap();
    let mut b_rx = b.connect(fresh_topic("y")).await.unwrap();
    let c = fresh_topic("z");
    let mut a_rx2 = a.connect(c).await.unwrap();
    let mut b_rx2 = b.connect(c).await.unwrap();
    // Both meet on the shared topic, which proves the link works...
    accept(&mut a_rx2).await;
    accept(&mut b_rx2).await;
    // ...and nothing arrived on the other ones.
    assert!(a_rx.try_recv().is_err());
    assert!(b_rx.try_recv().is_err());
}

#[tokio::test]
async fn wss_with_rustls_on_both_ends() {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let tls =
        pluresdb_sync_transport_relay::server::tls_config_from_pem(&cert_path, &key_path).unwrap();
    let server = RelayServer::bind_with_tls(
        "127.0.0.1:0".parse().unwrap(),
        RelayServerConfig::default(),
        Some(tls),
    )
    .await
    .unwrap();
    let url = format!("wss://{}/relay", server.local_addr());
    let der = cert.cert.der().to_vec();
    let mut a = RelayTransport::builder()
        .relay_url(&url)
        .add_root_certificate(der.clone())
        .build()
        .unwrap();
    let mut b = RelayTransport::builder()
        .relay_url(&url)
        .add_root_certificate(der)
        .build()
        .unwrap();
    let topic = fresh_topic("wss");
    let mut a_rx = a.connect(topic).await.unwrap();
    let mut b_rx = b.connect(topic).await.unwrap();
    let mut ca = accept(&mut a_rx).await;
    let mut cb = accept(&mut b_rx).await;
    ca.send(b"over tls").await.unwrap();
    assert_eq!(recv(&mut cb).await, b"over tls");

    // Without trusting the certificate the client refuses the relay.
    let mut untrusting = RelayTransport::builder()
        .relay_url(&url)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let err = untrusting.announce(topic).await.unwrap_err().to_string();
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    let missing = pluresdb_sync_transport_relay::server::tls_config_from_pem(
        &dir.path().join("nope.pem"),
        &key_path,
    )
    .unwrap_err();
    assert!(missing.to_string().contains("nope.pem"), "{missing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_loss_closes_sessions_then_failover_rejoins_and_peers_meet_again() {
    let (first, url1) = relay().await;
    let (_second, url2) = relay().await;
    let build = || {
        RelayTransport::builder()
            .relay_urls([url1.clone(), url2.clone()])
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let (mut a, mut b) = (build(), build());
    let topic = fresh_topic("failover-rejoin");
    let mut a_rx = a.connect(topic).await.unwrap();
    let mut b_rx = b.connect(topic).await.unwrap();
    let mut ca = accept(&mut a_rx).await;
    let mut cb = accept(&mut b_rx).await;
    ca.send(b"before").await.unwrap();
    assert_eq!(cb.receive().await.unwrap().unwrap(), b"before");

    first.shutdown().await;
    // Lost peers: both old connections end cleanly.
    assert_eq!(next_message(&mut ca).await, None);
    assert_eq!(next_message(&mut cb).await, None);
    assert!(ca.send(b"late").await.is_err());
    // Both fail over to the second relay, rejoin, and meet again with new connections.
    let mut ca2 = accept(&mut a_rx).await;
    let mut cb2 = accept(&mut b_rx).await;
    assert_eq!(ca2.peer_id(), b.peer_id());
    assert_eq!(cb2.peer_id(), a.peer_id());
    cb2.send(b"after").await.unwrap();
    assert_eq!(recv(&mut ca2).await, b"after");
    assert!(
        errors(&a).iter().any(|e| e.contains("1001")),
        "{:?}",
        errors(&a)
    );
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
}

#[tokio::test]
async fn a_returning_peer_gets_a_new_connection() {
    let (_server, url) = relay().await;
    let id = Identity::generate().unwrap();
    let mut a = transport(&url);
    let mut b = RelayTransport::builder()
        .relay_url(&url)
        .identity(id.clone())
        .build()
        .unwrap();
    let topic = fresh_topic("returning");
    let mut a_rx = a.connect(topic).await.unwrap();
    let _b_rx = b.connect(topic).await.unwrap();
    let mut first = accept(&mut a_rx).await;
    drop(_b_rx);
    drop(b); // Gone without a goodbye: the relay reports it left.
    assert_eq!(next_message(&mut first).await, None);
    let mut b2 = RelayTransport::builder()
        .relay_url(&url)
        .identity(id.clone())
        .build()
        .unwrap();
    let mut b2_rx = b2.connect(topic).await.unwrap();
    let mut again = accept(&mut a_rx).await;
    assert_eq!(again.peer_id(), id.peer_id());
    let mut cb = accept(&mut b2_rx).await;
    cb.send(b"back").await.unwrap();
    assert_eq!(recv(&mut again).await, b"back");
}

#[tokio::test]
async fn bearer_token_from_the_builder_or_the_url() {
    let (server, _) = relay_with(
        RelayServerConfig::builder()
            .auth_tokens(vec!["s3cret".into()])
            .build()
            .unwrap(),
    )
    .await;
    let addr = server.local_addr();
    let topic = fresh_topic("auth");
    let mut none = RelayTransport::builder()
        .relay_url(format!("ws://{addr}/relay"))
        .build()
        .unwrap();
    let err = none.announce(topic).await.unwrap_err().to_string();
    assert!(err.contains("401"), "{err}");
    let mut wrong = RelayTransport::builder()
        .relay_url(format!("ws://{addr}/relay"))
        .auth_token("nope")
        .build()
        .unwrap();
    assert!(
        wrong
            .announce(topic)
            .await
            .unwrap_err()
            .to_string()
            .contains("401")
    );
    let mut by_builder = RelayTransport::builder()
        .relay_url(format!("ws://{addr}/relay"))
        .auth_token("s3cret")
        .build()
        .unwrap();
    by_builder.announce(topic).await.unwrap();
    let mut by_url = RelayTransport::builder()
        .relay_url(format!("ws://s3cret@{addr}/relay"))
        .build()
        .unwrap();
    by_url.announce(topic).await.unwrap();
    let found = tokio::time::timeout(T, async {
        loop {
            let peers = by_url.lookup(topic).await.unwrap();
            if !peers.is_empty() {
                return peers;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(found[0].id, by_builder.peer_id());
    // The token never shows in errors.
    let mut bad_url = RelayTransport::builder()
        .relay_url(format!("ws://hunter2@{addr}/relay"))
        .build()
        .unwrap();
    let err = bad_url.announce(topic).await.unwrap_err().to_string();
    assert!(err.contains("401") && !err.contains("hunter2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_with_backoff_to_a_restarted_relay() {
    let (server, url) = relay().await;
    let addr = server.local_addr();
    let mut a = transport(&url);
    let mut b = transport(&url);
    let topic = fresh_topic("restart");
    let mut a_rx = a.connect(topic).await.unwrap();
    let mut b_rx = b.connect(topic).await.unwrap();
    let mut ca = accept(&mut a_rx).await;
    accept(&mut b_rx).await;
    server.shutdown().await;
    assert_eq!(next_message(&mut ca).await, None);
    // Wait until both have failed at least one reconnect attempt, then bring the relay back.
    for t in [&a, &b] {
        let deadline = Instant::now() + T;
        while !t
            .recent_errors()
            .iter()
            .any(|e| matches!(e, RelayError::Connect { .. }))
        {
            assert!(Instant::now() < deadline, "{:?}", errors(t));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let _restarted = RelayServer::bind(addr, RelayServerConfig::default())
        .await
        .unwrap();
    let mut ca2 = accept(&mut a_rx).await;
    let mut cb2 = accept(&mut b_rx).await;
    ca2.send(b"restarted").await.unwrap();
    assert_eq!(recv(&mut cb2).await, b"restarted");
}

/// A minimal HTTP CONNECT proxy on loopback that demands basic auth `user:p@ss`
/// (`dXNlcjpwQHNz`) and counts the tunnels it opened.
async fn connect_proxy() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tunnels = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = tunnels.clone();
    tokio::spawn(async move {
        loop {
            let (mut client, _) = listener.accept().await.unwrap();
            let count = count.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split_whitespace().nth(1).unwrap().to_owned();
                if !head.contains("Proxy-Authorization: Basic dXNlcjpwQHNz\r\n") {
                    let _ = client
                        .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let mut upstream = tokio::net::TcpStream::connect(target).await.unwrap();
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (format!("http://user:p%40ss@{addr}"), tunnels)
}

#[tokio::test]
async fn tunnels_through_an_http_connect_proxy_with_basic_auth() {
    let (_server, url) = relay().await;
    let (proxy, tunnels) = connect_proxy().await;
    let build = || {
        RelayTransport::builder()
            .relay_url(&url)
            .proxy(&proxy)
            .build()
            .unwrap()
    };
    let (mut a, mut b) = (build(), build());
    let topic = fresh_topic("proxy");
    let mut a_rx = a.connect(topic).await.unwrap();
    let mut b_rx = b.connect(topic).await.unwrap();
    let mut ca = accept(&mut a_rx).await;
    let mut cb = accept(&mut b_rx).await;
    ca.send(b"through the proxy").await.unwrap();
    assert_eq!(recv(&mut cb).await, b"through the proxy");
    assert_eq!(tunnels.load(std::sync::atomic::Ordering::SeqCst), 2);

    let bad = proxy.replace("p%40ss", "wrong");
    let mut refused = RelayTransport::builder()
        .relay_url(&url)
        .proxy(&bad)
        .build()
        .unwrap();
    let err = refused.announce(topic).await.unwrap_err().to_string();
    assert!(err.contains("407") && err.contains("proxy"), "{err}");
    assert!(
        !err.contains("wrong"),
        "the proxy password leaked into {err}"
    );
    let err = RelayTransport::builder()
        .relay_url(&url)
        .proxy("socks5://x:1")
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("socks5://x:1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_ends_the_peers_connections_cleanly() {
    let (_server, url) = relay().await;
    let (mut a, mut b, mut c) = (transport(&url), transport(&url), transport(&url));
    let topic = fresh_topic("disconnect");
    let mut a_rx = a.connect(topic).await.unwrap();
    let mut b_rx = b.connect(topic).await.unwrap();
    let mut c_rx = c.connect(topic).await.unwrap();
    let _a_conns = [accept(&mut a_rx).await, accept(&mut a_rx).await];
    let mut ba = accept(&mut b_rx).await;
    let mut ca = accept(&mut c_rx).await;
    if ba.peer_id() != a.peer_id() {
        ba = accept(&mut b_rx).await;
    }
    if ca.peer_id() != a.peer_id() {
        ca = accept(&mut c_rx).await;
    }
    a.disconnect().await.unwrap();
    for (t, conn) in [(&b, &mut ba), (&c, &mut ca)] {
        assert_eq!(next_message(conn).await, None);
        let err = conn.send(b"x").await.unwrap_err();
        assert!(
            matches!(
                err.downcast_ref::<Error>(),
                Some(Error::ConnectionClosed { .. })
            ),
            "{err}"
        );
        assert!(errors(t).is_empty(), "a clean close: {:?}", errors(t));
    }
    let err = a.lookup(topic).await.unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<Error>(),
            Some(Error::TransportDisconnected { .. })
        ),
        "{err}"
    );
}

/// A fake relay for one unencrypted client: it makes relay connection 2 answer the client's
/// HELLO (granting a huge window), then never reads the client's socket again while it sends,
/// over 3 s, frames from strangers that each need an answer (REJECT, no session). The client
/// fills its socket and outbound queue by then; a client that waited for room in that queue to
/// answer would stop its idle timer too. Returns the URL.
async fn relay_that_stops_reading() -> String {
    use futures_util::{SinkExt, StreamExt};
    use pluresdb_sync_transport_relay::protocol::{
        ClientFrame, Frame, RelayFrame, SUBPROTOCOL, decode, encode_deliver,
    };
    use tokio_tungstenite::tungstenite::{self, Message};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        #[allow(clippy::result_large_err)]
        let cb = |_: &tungstenite::handshake::server::Request,
                  mut resp: tungstenite::handshake::server::Response| {
            resp.headers_mut()
                .insert("Sec-WebSocket-Protocol", SUBPROTOCOL.parse().unwrap());
            Ok(resp)
        };
        let ws = tokio_tungstenite::accept_hdr_async(s, cb).await.unwrap();
        let (mut sink, mut stream) = ws.split();
        let send = |f: Vec<u8>| Message::Binary(f.into());
        let welcome = Frame::Relay(RelayFrame::Welcome {
            conn: 1,
            max_frame: 65536,
            max_rooms: 64,
            max_peers: 256,
        });
        sink.send(send(welcome.encode())).await.unwrap();
        let room = loop {
            let Some(Ok(Message::Binary(b))) = stream.next().await else {
                return;
            };
            if let Ok(Frame::Client(ClientFrame::Join { room })) = decode(&b) {
                break room;
            }
        };
        let joined = Frame::Relay(RelayFrame::Joined {
            room,
            peers: vec![2],
        });
        sink.send(send(joined.encode())).await.unwrap();
        let key = Identity::generate().unwrap().public_bytes();
        let hello = [
            &[0x20][..],
            &key,
            &[pluresdb_sync_transport_relay::SESSION_VERSION],
            &u32::MAX.to_be_bytes(),
        ]
        .concat();
        sink.send(send(encode_deliver(&room, 2, false, &hello)))
            .await
            .unwrap();
        // From here on the client's socket is never read.
        for stranger in 3..303u64 {
            let frame = encode_deliver(&room, stranger, false, &[0x10; 40]);
            if sink.send(send(frame)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _keep_open = (sink, stream);
        std::future::pending::<()>().await;
    });
    format!("ws://{addr}/relay")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_stops_reading_is_given_up_after_the_idle_timeout() {
    let url = relay_that_stops_reading().await;
    let mut t = RelayTransport::builder()
        .relay_url(&url)
        .encryption(false)
        .keep_alive(Duration::from_millis(500))
        .idle_timeout(Duration::from_secs(2))
        .timeout(T)
        .build()
        .unwrap();
    let mut rx = t.connect(fresh_topic("stops-reading")).await.unwrap();
    let mut conn = accept(&mut rx).await;
    // The application fills the socket, and the queue behind it, towards the stuck relay.
    let filler = tokio::spawn(async move {
        let m = vec![0u8; 1 << 20];
        while conn.send(&m).await.is_ok() {}
    });
    let e = wait_for_error(&t, "nothing received for 2000 ms").await;
    assert!(matches!(e, RelayError::Protocol { .. }), "{e}");
    // Giving the socket up ended the session, so the blocked send returned.
    tokio::time::timeout(T, filler).await.unwrap().unwrap();
}

#[tokio::test]
async fn dropping_a_transport_closes_its_socket_even_with_live_connections() {
    let (_server, url) = relay().await;
    let mut a = transport(&url);
    let mut b = transport(&url);
    let topic = fresh_topic("drop-transport");
    let mut a_rx = a.connect(topic).await.unwrap();
    let mut b_rx = b.connect(topic).await.unwrap();
    let mut ca = accept(&mut a_rx).await;
    let mut held = accept(&mut b_rx).await;
    drop(b);
    assert_eq!(next_message(&mut ca).await, None);
    assert_eq!(next_message(&mut held).await, None);
    assert!(held.send(b"x").await.is_err());
}

/// A fake relay for two clients that tells each of the other only by PEER_JOINED (JOINED
/// lists nobody), as two joins racing on two NATS relay nodes can, then forwards SENDs.
async fn relay_that_only_announces() -> String {
    use futures_util::{SinkExt, StreamExt};
    use pluresdb_sync_transport_relay::protocol::{
        ClientFrame, Frame, RelayFrame, SUBPROTOCOL, decode, encode_deliver,
    };
    use tokio_tungstenite::tungstenite::{self, Message};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut sinks = Vec::new();
        let mut streams = Vec::new();
        let mut room = [0u8; 32];
        for id in [1u64, 2] {
            let (s, _) = listener.accept().await.unwrap();
            #[allow(clippy::result_large_err)]
            let cb = |_: &tungstenite::handshake::server::Request,
                      mut resp: tungstenite::handshake::server::Response| {
                resp.headers_mut()
                    .insert("Sec-WebSocket-Protocol", SUBPROTOCOL.parse().unwrap());
                Ok(resp)
            };
            let ws = tokio_tungstenite::accept_hdr_async(s, cb).await.unwrap();
            let (mut sink, mut stream) = ws.split();
            let welcome = Frame::Relay(RelayFrame::Welcome {
                conn: id,
                max_frame: 65536,
                max_rooms: 64,
                max_peers: 256,
            });
            sink.send(Message::Binary(welcome.encode().into()))
                .await
                .unwrap();
            loop {
                let Some(Ok(Message::Binary(b))) = stream.next().await else {
                    return;
                };
                if let Ok(Frame::Client(ClientFrame::Join { room: r })) = decode(&b) {
                    room = r;
                    break;
                }
            }
            sinks.push(sink);
            streams.push(stream);
        }
        for (i, sink) in sinks.iter_mut().enumerate() {
            let other = 2 - i as u64;
            for f in [
                Frame::Relay(RelayFrame::Joined {
                    room,
                    peers: Vec::new(),
                }),
                Frame::Relay(RelayFrame::PeerJoined { room, peer: other }),
            ] {
                sink.send(Message::Binary(f.encode().into())).await.unwrap();
            }
        }
        let mut sinks = sinks.into_iter();
        let (to_1, to_2) = (sinks.next().unwrap(), sinks.next().unwrap());
        let mut streams = streams.into_iter();
        let (from_1, from_2) = (streams.next().unwrap(), streams.next().unwrap());
        let pump = |mut from: futures_util::stream::SplitStream<_>,
                    mut to: futures_util::stream::SplitSink<_, Message>,
                    me: u64| async move {
            while let Some(Ok(m)) = from.next().await {
                if let Message::Binary(b) = m
                    && let Ok(Frame::Client(ClientFrame::Send { room, payload, .. })) = decode(&b)
                {
                    let d = encode_deliver(&room, me, false, &payload);
                    if to.send(Message::Binary(d.into())).await.is_err() {
                        return;
                    }
                }
            }
        };
        // Client 1's SENDs go to client 2 and the other way round.
        tokio::join!(pump(from_1, to_2, 1), pump(from_2, to_1, 2));
    });
    format!("ws://{addr}/relay")
}

#[tokio::test]
async fn peers_told_of_each_other_only_by_peer_joined_still_meet_once() {
    let url = relay_that_only_announces().await;
    let topic = fresh_topic("peer-joined-fallback");
    let mut a = transport(&url);
    let mut b = transport(&url);
    let (a_in, b_in) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut a_in, mut b_in) = (a_in.unwrap(), b_in.unwrap());
    let t0 = Instant::now();
    let mut ab = accept(&mut a_in).await;
    let mut ba = accept(&mut b_in).await;
    // Nobody starts at once; both fall back after PEER_JOINED_FALLBACK (3 s).
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(ab.peer_id(), b.peer_id());
    assert_eq!(ba.peer_id(), a.peer_id());
    ab.send(b"hello").await.unwrap();
    let got = next_message(&mut ba).await;
    assert_eq!(got.as_deref(), Some(&b"hello"[..]));
    // Exactly one connection each: no second one shows up.
    assert!(
        tokio::time::timeout(Duration::from_secs(1), a_in.recv())
            .await
            .is_err()
    );
    assert!(b_in.try_recv().is_err());
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
}
