//! The relay server against raw WebSocket clients on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use futures_util::{SinkExt, StreamExt};
use pluresdb_sync_transport_relay::protocol::{
    ClientFrame, Frame, RelayFrame, SUBPROTOCOL, close_code, error_code,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::{T, Ws, next, raw_connect, relay, send, welcome};

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
