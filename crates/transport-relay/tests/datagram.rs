//! DATAGRAM frames (`pluresdb-relay.v2`) against the relay server, with raw clients: the
//! version negotiation, forwarding, and every way a datagram is dropped (counted, the
//! connection kept, the sender never stalled).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use futures_util::SinkExt;
use pluresdb_sync_transport_relay::protocol::{
    ClientFrame, Frame, RelayFrame, SUBPROTOCOL, SUBPROTOCOL_V2, close_code, encode_datagram,
};
use pluresdb_sync_transport_relay::server::RelayServerConfig;
use pluresdb_sync_transport_relay::testkit::raw::{self, Ws};
use pluresdb_sync_transport_relay::testkit::{relay, relay_with};
use tokio_tungstenite::tungstenite::Message;

use common::{drops, metric};

const ROOM: [u8; 32] = [0xd7; 32];

fn datagram(to: u64, segment: u16, payload: &[u8]) -> Frame {
    Frame::Client(ClientFrame::Datagram {
        room: ROOM,
        to,
        segment,
        payload: payload.to_vec(),
    })
}

/// A v2 client in `ROOM`, past its JOINED.
async fn member(url: &str) -> (Ws, u64) {
    let (mut ws, id) = raw::client_v2(url).await.unwrap();
    raw::joined(&mut ws, ROOM).await.unwrap();
    (ws, id)
}

/// The next frame that is not a PING or a membership notice.
async fn next_payload(ws: &mut Ws) -> Frame {
    loop {
        match raw::next_data(ws).await.unwrap() {
            Frame::Relay(RelayFrame::PeerJoined { .. } | RelayFrame::PeerLeft { .. }) => {}
            f => return f,
        }
    }
}

#[tokio::test]
async fn the_relay_selects_v2_when_offered_and_still_speaks_v1() {
    let (server, url) = relay().await.unwrap();
    for (offered, selected) in [
        (SUBPROTOCOL_V2.to_owned(), SUBPROTOCOL_V2),
        (SUBPROTOCOL.to_owned(), SUBPROTOCOL),
        (format!("{SUBPROTOCOL}, {SUBPROTOCOL_V2}"), SUBPROTOCOL_V2),
        (format!("other, {SUBPROTOCOL}"), SUBPROTOCOL),
    ] {
        let (mut ws, resp) = raw::connect_with(&url, Some(&offered), None).await.unwrap();
        assert_eq!(
            resp.headers().get("sec-websocket-protocol").unwrap(),
            selected,
            "offered {offered}"
        );
        raw::welcome(&mut ws).await.unwrap();
    }
    let refused = raw::connect_with(&url, Some("pluresdb-relay.v3"), None).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 400);
            let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default());
            assert!(
                body.contains(SUBPROTOCOL) && body.contains(SUBPROTOCOL_V2),
                "{body}"
            );
        }
        other => panic!("expected a 400, got {other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn datagrams_reach_the_member_with_sender_and_segment_size() {
    let (server, url) = relay().await.unwrap();
    let (mut a, a_id) = member(&url).await;
    let (mut b, b_id) = member(&url).await;
    let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    raw::send(&mut a, datagram(b_id, 1200, &payload))
        .await
        .unwrap();
    raw::send(&mut b, datagram(a_id, 0, b"back")).await.unwrap();
    assert_eq!(
        next_payload(&mut b).await,
        Frame::Relay(RelayFrame::Datagram {
            room: ROOM,
            from: a_id,
            segment: 1200,
            payload
        })
    );
    assert_eq!(
        next_payload(&mut a).await,
        Frame::Relay(RelayFrame::Datagram {
            room: ROOM,
            from: b_id,
            segment: 0,
            payload: b"back".to_vec()
        })
    );
    assert_eq!(
        metric(&server, "pluresdb_relay_datagrams_forwarded_total"),
        2
    );
    server.shutdown().await;
}

/// To a connection that is not in the room, from a sender that is not in it, to the sender
/// itself, to a member that speaks only v1: dropped and counted, no ERROR, nothing delivered,
/// and every connection stays open.
#[tokio::test]
async fn datagrams_without_a_route_are_dropped_and_counted() {
    let (server, url) = relay().await.unwrap();
    let (mut a, a_id) = member(&url).await;
    let (mut b, b_id) = member(&url).await;
    let (mut old, old_id) = raw::client(&url).await.unwrap();
    raw::joined(&mut old, ROOM).await.unwrap();
    let (mut outsider, _) = raw::client_v2(&url).await.unwrap();
    raw::joined(&mut outsider, [1; 32]).await.unwrap();

    raw::send(&mut a, datagram(9_999, 0, b"nobody"))
        .await
        .unwrap();
    raw::send(&mut a, datagram(a_id, 0, b"myself"))
        .await
        .unwrap();
    raw::send(&mut a, datagram(old_id, 0, b"v1 member"))
        .await
        .unwrap();
    raw::send(&mut outsider, datagram(b_id, 0, b"not in the room"))
        .await
        .unwrap();
    // What does arrive after them: the dropped ones never do, and no ERROR is sent.
    raw::send(&mut a, datagram(b_id, 0, b"routed"))
        .await
        .unwrap();
    raw::send(
        &mut a,
        Frame::Client(ClientFrame::Send {
            room: ROOM,
            to: old_id,
            payload: b"v1 still works".to_vec(),
        }),
    )
    .await
    .unwrap();
    raw::send(&mut a, Frame::Ping(7)).await.unwrap();
    raw::send(&mut outsider, Frame::Ping(8)).await.unwrap();
    assert!(matches!(
        next_payload(&mut b).await,
        Frame::Relay(RelayFrame::Datagram { payload, .. }) if payload == b"routed"
    ));
    assert!(matches!(
        next_payload(&mut old).await,
        Frame::Relay(RelayFrame::Deliver { payload, .. }) if payload == b"v1 still works"
    ));
    assert_eq!(next_payload(&mut a).await, Frame::Pong(7));
    assert_eq!(next_payload(&mut outsider).await, Frame::Pong(8));
    assert_eq!(drops(&server, "datagram_no_route"), 4);
    assert_eq!(drops(&server, "datagram_queue_full"), 0);
    assert_eq!(
        metric(&server, "pluresdb_relay_datagrams_forwarded_total"),
        1
    );
    server.shutdown().await;
}

/// A receiver that does not read: its queue fills, datagrams to it are dropped, and the
/// sender is never slowed (its PING is answered at once) nor is the receiver closed as a
/// slow consumer (datagrams never wait for room).
#[tokio::test]
async fn a_full_queue_drops_datagrams_and_never_stalls_the_sender() {
    let config = RelayServerConfig::builder()
        .send_queue_frames(8)
        .slow_consumer_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let (server, url) = relay_with(config).await.unwrap();
    let (mut a, _) = member(&url).await;
    let (mut b, b_id) = member(&url).await;
    let payload = vec![0x5a; 16 * 1024];
    // Far more than the receiver's queue and socket buffers hold: 4,000 × 16 KiB.
    let frame = encode_datagram(&ROOM, b_id, 0, &payload);
    for _ in 0..4_000 {
        a.feed(Message::Binary(frame.clone().into())).await.unwrap();
    }
    a.flush().await.unwrap();
    raw::send(&mut a, Frame::Ping(1)).await.unwrap();
    assert_eq!(next_payload(&mut a).await, Frame::Pong(1));
    assert!(drops(&server, "datagram_queue_full") > 0);
    assert_eq!(drops(&server, "slow_consumer"), 0);
    // The receiver is still there and gets what was queued, then later traffic.
    assert!(matches!(
        next_payload(&mut b).await,
        Frame::Relay(RelayFrame::Datagram { .. })
    ));
    raw::send(&mut b, Frame::Ping(2)).await.unwrap();
    loop {
        match next_payload(&mut b).await {
            Frame::Relay(RelayFrame::Datagram { .. }) => {}
            Frame::Pong(2) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    server.shutdown().await;
}

/// A DATAGRAM frame over the relay's frame limit closes the connection (1009) like any
/// other frame.
#[tokio::test]
async fn an_oversized_datagram_closes_with_1009() {
    let config = RelayServerConfig::builder()
        .max_frame_bytes(1024)
        .max_peers_per_room(8)
        .build()
        .unwrap();
    let (server, url) = relay_with(config).await.unwrap();
    let (mut a, _) = member(&url).await;
    let (_b, b_id) = member(&url).await;
    // The largest that fits is forwarded; one byte more is too large.
    let fits = vec![1u8; 1024 - pluresdb_sync_transport_relay::protocol::DATAGRAM_OVERHEAD];
    raw::send(&mut a, datagram(b_id, 0, &fits)).await.unwrap();
    let mut over = fits.clone();
    over.push(1);
    raw::send(&mut a, datagram(b_id, 0, &over)).await.unwrap();
    let (code, reason) = raw::closed(&mut a).await.unwrap();
    assert_eq!(code, close_code::FRAME_TOO_LARGE, "{reason}");
    assert!(drops(&server, "oversized") >= 1);
    assert_eq!(
        metric(&server, "pluresdb_relay_datagrams_forwarded_total"),
        1
    );
    server.shutdown().await;
}

/// Datagram bytes count against the per-IP byte rate: a flood pauses the sender's reads
/// (`rate_limited`), it is not buffered.
#[tokio::test]
async fn datagrams_count_against_the_per_ip_byte_rate() {
    let config = RelayServerConfig::builder()
        .max_bytes_per_sec_per_ip(Some(256 * 1024))
        .build()
        .unwrap();
    let (server, url) = relay_with(config).await.unwrap();
    let (mut a, _) = member(&url).await;
    let (mut b, b_id) = member(&url).await;
    let payload = vec![7u8; 8 * 1024];
    for _ in 0..96 {
        raw::send(&mut a, datagram(b_id, 0, &payload))
            .await
            .unwrap();
    }
    raw::send(&mut a, Frame::Ping(3)).await.unwrap();
    assert_eq!(next_payload(&mut a).await, Frame::Pong(3));
    assert!(
        drops(&server, "rate_limited") > 0,
        "{}",
        server.metrics_text()
    );
    let mut got = 0;
    while got < 96 {
        match next_payload(&mut b).await {
            Frame::Relay(RelayFrame::Datagram { .. }) => got += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    server.shutdown().await;
}
