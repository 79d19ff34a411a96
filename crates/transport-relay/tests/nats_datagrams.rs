//! DATAGRAM frames (`pluresdb-relay.v2`) between relay nodes over a REAL nats-server (started
//! by each test on a free loopback port), with raw clients: datagrams cross nodes both ways,
//! every way one is dropped is counted, and a flood stays within the memory budget without
//! stalling the sender or closing the receiver.
//!
//! Without `nats-server` (`/usr/sbin/nats-server` on Debian) these tests skip, except with
//! `CI=true`, where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pluresdb_sync_transport_relay::protocol::{
    ClientFrame, DATAGRAM_OVERHEAD, Frame, RelayFrame, encode_datagram,
};
use pluresdb_sync_transport_relay::server::{
    RelayServer, RelayServerConfig, RelayServerConfigBuilder,
};
use pluresdb_sync_transport_relay::testkit::nats::NatsServer;
use pluresdb_sync_transport_relay::testkit::raw::{self, Ws};
use pluresdb_sync_transport_relay::testkit::relay_with;
use tokio_tungstenite::tungstenite::Message;

use common::{drops, metric};

const ROOM: [u8; 32] = [0x3c; 32];
const T: Duration = pluresdb_sync_transport_relay::testkit::WAIT;

/// A relay node on `nats`, with `config` applied to its settings.
async fn node(
    nats: &NatsServer,
    config: impl FnOnce(RelayServerConfigBuilder) -> RelayServerConfigBuilder,
) -> (RelayServer, String) {
    let builder = RelayServerConfig::builder()
        .nats_url(Some(nats.url()))
        // Room for the other node's answer on a loaded machine: a member a node did not
        // hear of in time is not routed to until it is announced again.
        .nats_membership_wait(Duration::from_secs(3));
    relay_with(config(builder).build().unwrap()).await.unwrap()
}

fn datagram(to: u64, segment: u16, payload: &[u8]) -> Frame {
    Frame::Client(ClientFrame::Datagram {
        room: ROOM,
        to,
        segment,
        payload: payload.to_vec(),
    })
}

/// Waits until `name` reaches `at_least`.
async fn reaches(server: &RelayServer, name: &str, at_least: u64) {
    tokio::time::timeout(T, async {
        while metric(server, name) < at_least {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{name} stayed below {at_least}: {}", server.metrics_text()));
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

/// Reads until the PEER_JOINED (or, with `left`, the PEER_LEFT) of `peer`.
async fn told_of(ws: &mut Ws, peer: u64, left: bool) {
    loop {
        match raw::next_data(ws).await.unwrap() {
            Frame::Relay(RelayFrame::PeerJoined { peer: p, .. }) if p == peer && !left => return,
            Frame::Relay(RelayFrame::PeerLeft { peer: p, .. }) if p == peer && left => return,
            Frame::Relay(RelayFrame::PeerJoined { .. } | RelayFrame::PeerLeft { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// `a` on the first node and `b` on the second, both v2 members of `ROOM` that know each
/// other.
async fn pair(url1: &str, url2: &str) -> ((Ws, u64), (Ws, u64)) {
    let (mut a, a_id) = raw::client_v2(url1).await.unwrap();
    assert!(raw::joined(&mut a, ROOM).await.unwrap().is_empty());
    let (mut b, b_id) = raw::client_v2(url2).await.unwrap();
    assert_eq!(raw::joined(&mut b, ROOM).await.unwrap(), vec![a_id]);
    told_of(&mut a, b_id, false).await;
    assert_ne!(a_id >> 32, b_id >> 32, "two nodes");
    ((a, a_id), (b, b_id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_cross_relay_nodes_both_ways() {
    let Some(nats) = NatsServer::start_or_skip().await else {
        return;
    };
    let (n1, url1) = node(&nats, |b| b).await;
    let (n2, url2) = node(&nats, |b| b).await;
    let ((mut a, a_id), (mut b, b_id)) = pair(&url1, &url2).await;
    let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    // The largest payload a frame holds crosses too.
    let largest = vec![0xee; 65_536 - DATAGRAM_OVERHEAD];
    raw::send(&mut a, datagram(b_id, 1200, &payload))
        .await
        .unwrap();
    raw::send(&mut a, datagram(b_id, 0, &largest))
        .await
        .unwrap();
    raw::send(&mut b, datagram(a_id, 0, b"back")).await.unwrap();
    let mut got = vec![next_payload(&mut b).await, next_payload(&mut b).await];
    // Datagrams are unordered; here they are not reordered, but the test does not rely on it.
    got.sort_by_key(|f| match f {
        Frame::Relay(RelayFrame::Datagram { segment, .. }) => u16::MAX - segment,
        _ => 0,
    });
    assert_eq!(
        got,
        vec![
            Frame::Relay(RelayFrame::Datagram {
                room: ROOM,
                from: a_id,
                segment: 1200,
                payload,
            }),
            Frame::Relay(RelayFrame::Datagram {
                room: ROOM,
                from: a_id,
                segment: 0,
                payload: largest,
            }),
        ]
    );
    assert_eq!(
        next_payload(&mut a).await,
        Frame::Relay(RelayFrame::Datagram {
            room: ROOM,
            from: b_id,
            segment: 0,
            payload: b"back".to_vec(),
        })
    );
    assert_eq!(
        metric(&n1, "pluresdb_relay_nats_datagrams_published_total"),
        2
    );
    assert_eq!(
        metric(&n2, "pluresdb_relay_nats_datagrams_published_total"),
        1
    );
    assert_eq!(metric(&n2, "pluresdb_relay_datagrams_forwarded_total"), 2);
    assert_eq!(metric(&n1, "pluresdb_relay_datagrams_forwarded_total"), 1);
    for n in [&n1, &n2] {
        assert_eq!(drops(n, "datagram_no_route"), 0);
        assert_eq!(drops(n, "datagram_bus_full"), 0);
    }
    n1.shutdown().await;
    n2.shutdown().await;
    nats.stop().await;
}

/// To an id no node knows, to a remote member that speaks only v1, to a remote member that
/// left: dropped and counted (on the sending node when it knows there is no such member, on
/// the receiving node otherwise), no ERROR, and routed datagrams still arrive. A malformed
/// datagram on the bus is dropped and counted; one laid out as `docs/relay-nats.md` says
/// reaches its receiver as the very same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_to_unknown_or_gone_remote_members_are_dropped_and_counted() {
    let Some(nats) = NatsServer::start_or_skip().await else {
        return;
    };
    let (n1, url1) = node(&nats, |b| b).await;
    let (n2, url2) = node(&nats, |b| b).await;
    let ((mut a, a_id), (mut b, b_id)) = pair(&url1, &url2).await;
    let (mut old, old_id) = raw::client(&url2).await.unwrap();
    raw::joined(&mut old, ROOM).await.unwrap();
    told_of(&mut a, old_id, false).await;
    told_of(&mut b, old_id, false).await;

    // An id on the second node that is no member: not published.
    let unknown = (b_id & !0xffff_ffff) | 0x00ab_cdef;
    raw::send(&mut a, datagram(unknown, 0, b"nobody"))
        .await
        .unwrap();
    // A v1 member on the second node: published, dropped there.
    raw::send(&mut a, datagram(old_id, 0, b"v1 member"))
        .await
        .unwrap();
    reaches(
        &n2,
        "pluresdb_relay_drops_total{reason=\"datagram_no_route\"}",
        1,
    )
    .await;
    assert_eq!(drops(&n1, "datagram_no_route"), 1);
    assert_eq!(
        metric(&n1, "pluresdb_relay_nats_datagrams_published_total"),
        1
    );

    // By hand on the bus, as the doc lays it out: type 0x85, room, sender, segment, payload.
    let p = "pluresdb.relay.v1";
    let peer = async_nats::connect(nats.url()).await.unwrap();
    let b_subject = format!("{p}.dgram.{:08x}.{:08x}", b_id >> 32, b_id as u32);
    let mut by_hand = vec![0x85];
    by_hand.extend_from_slice(&ROOM);
    by_hand.extend_from_slice(&a_id.to_be_bytes());
    by_hand.extend_from_slice(&7u16.to_be_bytes());
    by_hand.extend_from_slice(b"by hand");
    let dropped_before = metric(&n2, "pluresdb_relay_nats_dropped_total");
    for bad in [
        by_hand[..DATAGRAM_OVERHEAD - 1].to_vec(),
        encode_datagram(&ROOM, b_id, 0, b"a client's DATAGRAM, not a bus one"),
        Vec::new(),
    ] {
        peer.publish(b_subject.clone(), bad.into()).await.unwrap();
    }
    // A datagram for another room's member, or on a subject that names no connection.
    peer.publish(
        format!("{p}.dgram.{:08x}.zz", b_id >> 32),
        by_hand.clone().into(),
    )
    .await
    .unwrap();
    peer.publish(b_subject, by_hand.clone().into())
        .await
        .unwrap();
    peer.flush().await.unwrap();
    loop {
        match tokio::time::timeout(T, b.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Binary(bytes) if bytes.first() == Some(&0x85) => {
                assert_eq!(bytes.as_ref(), by_hand.as_slice());
                break;
            }
            // A relay PING.
            Message::Binary(bytes) if bytes.first() == Some(&0x05) => {}
            other => panic!("expected the datagram, got {other:?}"),
        }
    }
    reaches(&n2, "pluresdb_relay_nats_dropped_total", dropped_before + 4).await;

    // A member that left: once its node told ours, not published.
    drop(b);
    told_of(&mut a, b_id, true).await;
    raw::send(&mut a, datagram(b_id, 0, b"gone")).await.unwrap();
    // What arrives after them is the routed one only; no ERROR reaches the sender.
    let (mut c, c_id) = raw::client_v2(&url2).await.unwrap();
    raw::joined(&mut c, ROOM).await.unwrap();
    told_of(&mut a, c_id, false).await;
    raw::send(&mut a, datagram(c_id, 0, b"routed"))
        .await
        .unwrap();
    raw::send(&mut a, Frame::Ping(9)).await.unwrap();
    assert!(matches!(
        next_payload(&mut c).await,
        Frame::Relay(RelayFrame::Datagram { payload, from, .. }) if payload == b"routed" && from == a_id
    ));
    assert_eq!(next_payload(&mut a).await, Frame::Pong(9));
    assert_eq!(drops(&n1, "datagram_no_route"), 2);
    assert_eq!(
        metric(&n1, "pluresdb_relay_nats_datagrams_published_total"),
        2
    );
    assert_eq!(drops(&n2, "datagram_no_route"), 1);
    assert_eq!(
        drops(&n1, "datagram_bus_full") + drops(&n2, "datagram_queue_full"),
        0
    );
    drop(old);
    n1.shutdown().await;
    n2.shutdown().await;
    nats.stop().await;
}

/// A sender floods a member on the other node that does not read: datagrams are dropped (on
/// the sending node when the bus outbox is full, on the receiving node when the receiver's
/// queue is), neither node's queued bytes ever pass its budget, the sender's PING is
/// answered, the receiver is not closed as a slow consumer and gets later datagrams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datagram_flood_across_nodes_stays_within_the_budget() {
    let Some(nats) = NatsServer::start_or_skip().await else {
        return;
    };
    const BUDGET: usize = 2 << 20;
    // The sending node's outbox holds 512 KiB, a connection's share of it 128 KiB (eight of
    // the flood's datagrams); a receiver's queue 256 KiB (16 of them) or 64 frames (more than
    // c sends d below, even if d's writer never ran meanwhile).
    let config = |per_connection: usize| {
        move |b: RelayServerConfigBuilder| {
            b.max_frame_bytes(32 * 1024)
                .max_queued_bytes_per_connection(per_connection)
                .max_queued_bytes(BUDGET)
                .send_queue_frames(64)
                .slow_consumer_timeout(Duration::from_millis(200))
        }
    };
    let (n1, url1) = node(&nats, config(512 * 1024)).await;
    let (n2, url2) = node(&nats, config(256 * 1024)).await;
    let ((mut a, _), (mut b, b_id)) = pair(&url1, &url2).await;
    // A second pair, c on the first node and d (who reads) on the second.
    let (mut c, c_id) = raw::client_v2(&url1).await.unwrap();
    raw::joined(&mut c, ROOM).await.unwrap();
    let (mut d, d_id) = raw::client_v2(&url2).await.unwrap();
    raw::joined(&mut d, ROOM).await.unwrap();
    told_of(&mut c, d_id, false).await;
    let n1 = Arc::new(n1);
    let n2 = Arc::new(n2);
    // Samples both nodes' queued bytes while the flood runs.
    let done = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (n1, n2, done, most) = (n1.clone(), n2.clone(), done.clone(), most.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                for n in [&n1, &n2] {
                    most.fetch_max(metric(n, "pluresdb_relay_queued_bytes"), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let payload = vec![0x5a; 16 * 1024];
    let frame = encode_datagram(&ROOM, b_id, 0, &payload);
    const FLOOD: u64 = 2_000;
    const FAIR: u64 = 50;
    let flood = async {
        for _ in 0..FLOOD {
            a.feed(Message::Binary(frame.clone().into())).await.unwrap();
        }
        a.flush().await.unwrap();
    };
    // Meanwhile c sends small datagrams to d: a holds at most its share of the outbox, so
    // there is always room for c's.
    let fair = async {
        for i in 0..FAIR {
            raw::send(&mut c, datagram(d_id, 0, &i.to_be_bytes()))
                .await
                .unwrap();
            tokio::task::yield_now().await;
        }
    };
    tokio::join!(flood, fair);
    raw::send(&mut a, Frame::Ping(1)).await.unwrap();
    assert_eq!(next_payload(&mut a).await, Frame::Pong(1));
    done.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let most = most.load(Ordering::Relaxed);
    assert!(most <= BUDGET as u64, "{most} bytes queued");
    // Everything the sender sent is published or dropped on its node.
    let sent = || {
        metric(&n1, "pluresdb_relay_nats_datagrams_published_total")
            + drops(&n1, "datagram_bus_full")
    };
    tokio::time::timeout(T, async {
        while sent() < FLOOD + FAIR {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{}", n1.metrics_text()));
    assert_eq!(sent(), FLOOD + FAIR, "{}", n1.metrics_text());
    assert_eq!(drops(&n1, "datagram_no_route"), 0);
    let published = metric(&n1, "pluresdb_relay_nats_datagrams_published_total");
    let bus_full = drops(&n1, "datagram_bus_full");
    eprintln!(
        "flood of {FLOOD}: {published} published, {bus_full} dropped as datagram_bus_full, at most {most} bytes queued"
    );
    // The receiving node forwards or drops everything it got.
    let handled = || {
        metric(&n2, "pluresdb_relay_datagrams_forwarded_total") + drops(&n2, "datagram_queue_full")
    };
    tokio::time::timeout(T, async {
        while handled() < published && metric(&n2, "pluresdb_relay_nats_slow_consumer_total") == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{}", n2.metrics_text()));
    assert!(
        bus_full + drops(&n2, "datagram_queue_full") > 0,
        "a flood of {FLOOD} × 16 KiB to a receiver that does not read loses some: {}\n{}",
        n1.metrics_text(),
        n2.metrics_text()
    );
    eprintln!(
        "receiving node: {} forwarded, {} dropped as datagram_queue_full",
        metric(&n2, "pluresdb_relay_datagrams_forwarded_total"),
        drops(&n2, "datagram_queue_full")
    );
    assert_eq!(drops(&n2, "slow_consumer"), 0);
    // Every one of c's datagrams reached d, once.
    let mut fair = Vec::new();
    for _ in 0..FAIR {
        match next_payload(&mut d).await {
            Frame::Relay(RelayFrame::Datagram { from, payload, .. }) if from == c_id => {
                fair.push(u64::from_be_bytes(payload.try_into().unwrap()));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    fair.sort_unstable();
    assert_eq!(fair, (0..FAIR).collect::<Vec<_>>());
    assert_eq!(drops(&n1, "memory_budget") + drops(&n2, "memory_budget"), 0);
    // The receiver is still there and gets what was queued (its PONG comes after that),
    // then later traffic.
    raw::send(&mut b, Frame::Ping(2)).await.unwrap();
    let mut queued = 0;
    loop {
        match next_payload(&mut b).await {
            Frame::Relay(RelayFrame::Datagram { .. }) => queued += 1,
            Frame::Pong(2) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(queued > 0);
    raw::send(&mut a, datagram(b_id, 0, b"after"))
        .await
        .unwrap();
    loop {
        match next_payload(&mut b).await {
            Frame::Relay(RelayFrame::Datagram { payload, .. }) if payload == b"after" => break,
            Frame::Relay(RelayFrame::Datagram { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    Arc::into_inner(n1).unwrap().shutdown().await;
    Arc::into_inner(n2).unwrap().shutdown().await;
    nats.stop().await;
}
