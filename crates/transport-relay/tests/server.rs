//! The relay server against raw WebSocket clients on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use pluresdb_sync_transport_relay::protocol::{
    ClientFrame, Frame, RelayFrame, SUBPROTOCOL, error_code,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

#[tokio::test]
async fn rooms_route_by_relay_assigned_ids() {
    let (mut server, _) = relay().await;
    let metrics = server
        .serve_metrics("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = server.local_addr();
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
