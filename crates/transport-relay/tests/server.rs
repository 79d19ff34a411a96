//! The relay server against raw WebSocket clients on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pluresdb_sync_transport_relay::protocol::{
    ClientFrame, Frame, RelayFrame, SUBPROTOCOL, close_code, error_code,
};
use pluresdb_sync_transport_relay::server::RelayServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::{T, Ws, joined, next, raw_connect, relay, relay_with, send, welcome};

async fn client(addr: std::net::SocketAddr) -> (Ws, u64) {
    let (mut ws, resp) = raw_connect(addr).await;
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        SUBPROTOCOL
    );
    let (conn, max_frame) = welcome(&mut ws).await;
    assert_eq!(max_frame, 64 * 1024);
    (ws, conn)
}

/// The next frame that is not a PEER_JOINED notice.
async fn next_but_joins(ws: &mut Ws) -> Frame {
    loop {
        match next(ws).await {
            Frame::Relay(RelayFrame::PeerJoined { .. }) => {}
            other => return other,
        }
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(T, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

/// A relay with its metrics listener: the server, the metrics address, the relay address.
async fn relay_with_metrics() -> (
    pluresdb_sync_transport_relay::server::RelayServer,
    std::net::SocketAddr,
    std::net::SocketAddr,
) {
    let (mut server, _) = relay().await;
    let metrics = server
        .serve_metrics("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = server.local_addr();
    (server, metrics, addr)
}

#[tokio::test]
async fn rooms_route_by_relay_assigned_ids() {
    let (server, metrics, addr) = relay_with_metrics().await;
    let room = [9u8; 32];
    let (mut a, a_id) = client(addr).await;
    let (mut b, b_id) = client(addr).await;
    assert_ne!(a_id, b_id);
    send(&mut a, Frame::Client(ClientFrame::Join { room })).await;
    assert_eq!(
        next(&mut a).await,
        Frame::Relay(RelayFrame::Joined {
            room,
            peers: vec![]
        })
    );
    send(&mut b, Frame::Client(ClientFrame::Join { room })).await;
    assert_eq!(
        next(&mut b).await,
        Frame::Relay(RelayFrame::Joined {
            room,
            peers: vec![a_id]
        })
    );
    assert_eq!(
        next(&mut a).await,
        Frame::Relay(RelayFrame::PeerJoined { room, peer: b_id })
    );
    send(
        &mut b,
        Frame::Client(ClientFrame::Send {
            room,
            to: a_id,
            payload: b"hi a".to_vec(),
        }),
    )
    .await;
    assert_eq!(
        next(&mut a).await,
        Frame::Relay(RelayFrame::Deliver {
            room,
            from: b_id,
            broadcast: false,
            payload: b"hi a".to_vec()
        })
    );
    send(
        &mut a,
        Frame::Client(ClientFrame::Broadcast {
            room,
            payload: b"all".to_vec(),
        }),
    )
    .await;
    assert_eq!(
        next(&mut b).await,
        Frame::Relay(RelayFrame::Deliver {
            room,
            from: a_id,
            broadcast: true,
            payload: b"all".to_vec()
        })
    );
    // Errors keep the connection open.
    send(
        &mut a,
        Frame::Client(ClientFrame::Send {
            room: [1; 32],
            to: b_id,
            payload: vec![],
        }),
    )
    .await;
    assert!(matches!(
        next(&mut a).await,
        Frame::Relay(RelayFrame::Error {
            code: error_code::NOT_IN_ROOM,
            ..
        })
    ));
    send(
        &mut a,
        Frame::Client(ClientFrame::Send {
            room,
            to: 999_999,
            payload: vec![],
        }),
    )
    .await;
    assert!(matches!(
        next(&mut a).await,
        Frame::Relay(RelayFrame::Error {
            code: error_code::UNKNOWN_PEER,
            ..
        })
    ));
    send(&mut a, Frame::Ping(77)).await;
    assert_eq!(next(&mut a).await, Frame::Pong(77));
    // Leaving tells the others.
    drop(b);
    assert_eq!(
        next(&mut a).await,
        Frame::Relay(RelayFrame::PeerLeft { room, peer: b_id })
    );
    assert!(
        http_get(addr, "/healthz")
            .await
            .starts_with("HTTP/1.1 200 OK")
    );
    let text = http_get(metrics, "/metrics").await;
    assert!(
        text.contains("pluresdb_relay_frames_forwarded_total 2"),
        "{text}"
    );
    assert!(
        text.contains("pluresdb_relay_drops_total{reason=\"not_in_room\"} 1"),
        "{text}"
    );
    assert!(text.contains("pluresdb_relay_rooms 1"), "{text}");
    server.shutdown().await;
}

/// The relay handles what a client pipelines in bursts and gathers DELIVERs per receiver:
/// every receiver still sees frames in the order they were sent, whatever other frame kinds
/// sit between them, and frames sent just before a protocol error are still delivered.
#[tokio::test]
async fn pipelined_frames_keep_their_order_and_survive_a_protocol_error() {
    let (server, metrics, addr) = relay_with_metrics().await;
    let room = [4u8; 32];
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (mut ws, id) = client(addr).await;
        send(&mut ws, Frame::Client(ClientFrame::Join { room })).await;
        assert!(matches!(
            next(&mut ws).await,
            Frame::Relay(RelayFrame::Joined { .. })
        ));
        clients.push((ws, id));
    }
    let (mut c, c_id) = clients.pop().unwrap();
    let (mut b, b_id) = clients.pop().unwrap();
    let (mut a, a_id) = clients.pop().unwrap();

    // What A pipelines, in one write: what B and C must each see, in order.
    let mut frames = Vec::new();
    let (mut to_b, mut to_c) = (Vec::new(), Vec::new());
    for i in 0..600u32 {
        let to = if i % 7 == 3 { c_id } else { b_id };
        let payload = i.to_be_bytes().to_vec();
        if to == b_id { &mut to_b } else { &mut to_c }.push((false, payload.clone()));
        frames.push(Frame::Client(ClientFrame::Send { room, to, payload }));
        if i == 300 {
            let payload = b"everyone".to_vec();
            to_b.push((true, payload.clone()));
            to_c.push((true, payload.clone()));
            frames.push(Frame::Client(ClientFrame::Broadcast { room, payload }));
            // An error reply to A in the middle changes nothing for B and C.
            frames.push(Frame::Client(ClientFrame::Leave { room: [5; 32] }));
        }
    }
    for f in &frames {
        a.feed(Message::Binary(f.encode().into())).await.unwrap();
    }
    // A frame type no one sends: a protocol error that closes A.
    a.feed(Message::Binary(vec![0x7e, 1, 2].into()))
        .await
        .unwrap();
    a.flush().await.unwrap();

    for (ws, expected) in [(&mut b, &to_b), (&mut c, &to_c)] {
        for (broadcast, payload) in expected {
            assert_eq!(
                next_but_joins(ws).await,
                Frame::Relay(RelayFrame::Deliver {
                    room,
                    from: a_id,
                    broadcast: *broadcast,
                    payload: payload.clone(),
                })
            );
        }
        let left = loop {
            match next(ws).await {
                Frame::Relay(RelayFrame::PeerJoined { .. }) => {}
                other => break other,
            }
        };
        assert_eq!(
            left,
            Frame::Relay(RelayFrame::PeerLeft { room, peer: a_id })
        );
    }
    assert!(matches!(
        next_but_joins(&mut a).await,
        Frame::Relay(RelayFrame::Error {
            code: error_code::NOT_IN_ROOM,
            ..
        })
    ));
    let close = loop {
        match tokio::time::timeout(T, a.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(f)))) => break f,
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), close_code::UNKNOWN_TYPE, "{close:?}");
    let text = http_get(metrics, "/metrics").await;
    let forwarded = to_b.len() + to_c.len();
    assert!(
        text.contains(&format!(
            "pluresdb_relay_frames_forwarded_total {forwarded}\n"
        )),
        "{text}"
    );
    server.shutdown().await;
}

/// Frames a burst gathered for a fast receiver are not held back while the relay waits for
/// room in a slow receiver's queue (up to the slow-consumer timeout, here a minute: far past
/// this test's hang guard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_receiver_does_not_delay_frames_for_a_fast_one() {
    let config = RelayServerConfig::builder()
        .send_queue_frames(2)
        .slow_consumer_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let (server, _) = relay_with(config).await;
    let addr = server.local_addr();
    let room = [6u8; 32];
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (mut ws, id) = client(addr).await;
        joined(&mut ws, room).await;
        clients.push((ws, id));
    }
    let (_slow, slow_id) = clients.pop().unwrap(); // never reads
    let (mut fast, fast_id) = clients.pop().unwrap();
    let (mut s, s_id) = clients.pop().unwrap();
    let (mut f, _) = clients.pop().unwrap();
    // F fills the slow receiver's socket buffers and then its queue: F's reader is left
    // waiting for room (the slow receiver never reads) and F's own sends stall.
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let filler = tokio::spawn(async move {
        let payload = vec![0u8; 60 * 1024];
        for _ in 0..2000 {
            let frame = Frame::Client(ClientFrame::Send {
                room,
                to: slow_id,
                payload: payload.clone(),
            });
            if f.send(Message::Binary(frame.encode().into()))
                .await
                .is_err()
            {
                break;
            }
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    // Stalled: no progress for a second (bounded by the hang guard).
    tokio::time::timeout(T, async {
        let mut last = usize::MAX;
        loop {
            let now = sent.load(Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
    .await
    .expect("the filler never stalled");
    assert!(
        sent.load(Ordering::Relaxed) < 2000,
        "the slow receiver took everything"
    );
    // S pipelines a frame to the fast receiver and one to the slow one in one write.
    for (to, payload) in [(fast_id, b"fast".to_vec()), (slow_id, b"slow".to_vec())] {
        s.feed(Message::Binary(
            Frame::Client(ClientFrame::Send { room, to, payload })
                .encode()
                .into(),
        ))
        .await
        .unwrap();
    }
    s.flush().await.unwrap();
    assert_eq!(
        next_but_joins(&mut fast).await,
        Frame::Relay(RelayFrame::Deliver {
            room,
            from: s_id,
            broadcast: false,
            payload: b"fast".to_vec(),
        })
    );
    filler.abort();
    drop(server);
}

/// One receiver in two rooms sees one sender's frames in the order they were sent, however
/// the relay gathers them.
#[tokio::test]
async fn frames_to_one_receiver_in_two_rooms_keep_their_order() {
    let (server, _) = relay().await;
    let addr = server.local_addr();
    let (r1, r2) = ([7u8; 32], [8u8; 32]);
    let (mut a, a_id) = client(addr).await;
    let (mut b, b_id) = client(addr).await;
    for ws in [&mut a, &mut b] {
        for room in [r1, r2] {
            joined(ws, room).await;
        }
    }
    let mut expected = Vec::new();
    for i in 0..300u32 {
        let room = if i % 3 == 1 { r2 } else { r1 };
        let payload = i.to_be_bytes().to_vec();
        expected.push(Frame::Relay(RelayFrame::Deliver {
            room,
            from: a_id,
            broadcast: false,
            payload: payload.clone(),
        }));
        a.feed(Message::Binary(
            Frame::Client(ClientFrame::Send {
                room,
                to: b_id,
                payload,
            })
            .encode()
            .into(),
        ))
        .await
        .unwrap();
    }
    a.flush().await.unwrap();
    for want in expected {
        assert_eq!(next_but_joins(&mut b).await, want);
    }
}
