//! The relay server against raw WebSocket clients on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pluresdb_sync_transport_relay::protocol::{
    ClientFrame, Frame, RelayFrame, SUBPROTOCOL, decode, error_code,
};
use pluresdb_sync_transport_relay::server::{RelayServer, RelayServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const T: Duration = Duration::from_secs(20);

async fn client(addr: std::net::SocketAddr) -> (Ws, u64) {
    let mut req = format!("ws://{addr}/relay").into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", SUBPROTOCOL.parse().unwrap());
    let (mut ws, resp) = tokio::time::timeout(T, tokio_tungstenite::connect_async(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        SUBPROTOCOL
    );
    match next(&mut ws).await {
        Frame::Relay(RelayFrame::Welcome {
            conn, max_frame, ..
        }) => {
            assert_eq!(max_frame, 64 * 1024);
            (ws, conn)
        }
        other => panic!("expected WELCOME, got {other:?}"),
    }
}

async fn next(ws: &mut Ws) -> Frame {
    loop {
        let msg = tokio::time::timeout(T, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Binary(b) = msg {
            return decode(&b).unwrap();
        }
    }
}

async fn send(ws: &mut Ws, f: Frame) {
    ws.send(Message::Binary(f.encode().into())).await.unwrap();
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
    let mut server =
        RelayServer::bind("127.0.0.1:0".parse().unwrap(), RelayServerConfig::default())
            .await
            .unwrap();
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
