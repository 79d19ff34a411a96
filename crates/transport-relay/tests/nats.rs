//! Relay scale-out over a REAL nats-server (Debian package `nats-server`, started by each test
//! on a free loopback port): clients on different relay nodes reach each other, fail over
//! when a node dies, and a node started later learns existing members.
//!
//! Without `nats-server` (`/usr/sbin/nats-server` on Debian) these tests skip, except with `CI=true`, where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use pluresdb_sync_core::testkit::ConformanceKit;
use pluresdb_sync_core::{Connection, Transport, derive_topic};
use pluresdb_sync_transport_relay::RelayTransport;
use pluresdb_sync_transport_relay::protocol::{ClientFrame, Frame, RelayFrame};
use pluresdb_sync_transport_relay::server::{RelayServer, RelayServerConfig};
use pluresdb_sync_transport_relay::testkit::nats::NatsServer;
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::{
    Factory, T, Ws, accept, free_port, joined, next, raw, recv, relay_with, send, upgrade_request,
    url, ws_url,
};
async fn node(nats: &NatsServer) -> RelayServer {
    let config = RelayServerConfig::builder()
        .nats_url(Some(nats.url()))
        .build()
        .unwrap();
    relay_with(config).await.0
}

/// A relay node on its own runtime and thread, so that it can be killed hard: every task
/// stops where it is (no LEAVE, no 1001, no NATS goodbye), its sockets close.
struct KillableNode {
    addr: SocketAddr,
    kill: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KillableNode {
    async fn start(nats: &NatsServer) -> Self {
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let (kill, kill_rx) = std::sync::mpsc::channel::<()>();
        let url = nats.url();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let server = rt.block_on(async {
                let config = RelayServerConfig::builder()
                    .nats_url(Some(url))
                    .build()
                    .unwrap();
                RelayServer::bind("127.0.0.1:0".parse().unwrap(), config)
                    .await
                    .unwrap()
            });
            addr_tx.send(server.local_addr()).unwrap();
            let _ = kill_rx.recv();
            // Drop every task without running it again, then the server.
            rt.shutdown_background();
            drop(server);
        });
        let addr = tokio::time::timeout(T, addr_rx).await.unwrap().unwrap();
        Self {
            addr,
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        ws_url(self.addr)
    }

    async fn kill(mut self) {
        drop(self.kill.take());
        let thread = self.thread.take().unwrap();
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_on_two_nodes_pass_the_conformance_checks() {
    let Some(nats) = NatsServer::start_or_skip().await else {
        return;
    };
    let nodes = std::sync::Arc::new(vec![node(&nats).await, node(&nats).await]);
    // Transport i talks to node i % 2.
    let kit = ConformanceKit::new(Factory {
        servers: nodes.clone(),
        encryption: true,
    });
    for (name, r) in [
        ("message_boundaries", kit.message_boundaries().await),
        ("ordering", kit.ordering().await),
        ("remote_close", kit.remote_close().await),
        (
            "one_connection_per_peer(4)",
            kit.one_connection_per_peer(4).await,
        ),
        (
            "disconnect_ends_everything",
            kit.disconnect_ends_everything().await,
        ),
    ] {
        if let Err(e) = r {
            let m: Vec<String> = nodes
                .iter()
                .map(|n| {
                    n.metrics_text()
                        .lines()
                        .filter(|l| l.starts_with("pluresdb_relay_nats") || l.contains("slow"))
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .collect();
            panic!("{name}: {e:#}\nnode metrics:\n{}", m.join("\n--\n"));
        }
    }
    drop(kit);
    nats.stop().await;
}

async fn exchange(a: &mut Box<dyn Connection>, b: &mut Box<dyn Connection>, msg: &[u8]) {
    a.send(msg).await.unwrap();
    let got = recv(b).await;
    assert_eq!(got, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_node_fail_over_to_another() {
    let Some(nats) = NatsServer::start_or_skip().await else {
        return;
    };
    let doomed = KillableNode::start(&nats).await;
    let survivor = node(&nats).await;
    let topic = derive_topic("nats-failover");
    // A knows both relays, the doomed one first; B uses the survivor.
    let mut a = RelayTransport::builder()
        .relay_urls([doomed.url(), url(&survivor)])
        .timeout(T)
        .build()
        .unwrap();
    let mut b = RelayTransport::builder()
        .relay_url(url(&survivor))
        .timeout(T)
        .build()
        .unwrap();
    let mut a_in = a.connect(topic).await.unwrap();
    let mut b_in = b.connect(topic).await.unwrap();
    let mut ab = accept(&mut a_in).await;
    let mut ba = accept(&mut b_in).await;
    exchange(&mut ab, &mut ba, b"before").await;
    exchange(&mut ba, &mut ab, b"before, back").await;
    assert_eq!(ab.peer_id(), b.peer_id());

    // Kill the node without goodbye: sockets drop, no 1001, no NATS goodbye.
    doomed.kill().await;

    // A's session ends; A reconnects to the survivor; both see a new connection.
    let closed = tokio::time::timeout(T, ab.receive()).await.unwrap();
    assert!(matches!(closed, Ok(None) | Err(_)), "{closed:?}");
    let mut ab2 = accept(&mut a_in).await;
    let mut ba2 = accept(&mut b_in).await;
    assert_eq!(ab2.peer_id(), b.peer_id());
    assert_eq!(ba2.peer_id(), a.peer_id());
    exchange(&mut ab2, &mut ba2, b"after failover").await;
    exchange(&mut ba2, &mut ab2, b"after failover, back").await;
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
    survivor.shutdown().await;
    nats.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_later_learns_existing_members() {
    let Some(nats) = NatsServer::start_or_skip().await else {
        return;
    };
    let first = node(&nats).await;
    let room = [7u8; 32];
    let (mut x, x_id) = raw(first.local_addr()).await;
    let (mut x2, x2_id) = raw(first.local_addr()).await;
    for ws in [&mut x, &mut x2] {
        send(ws, Frame::Client(ClientFrame::Join { room })).await;
        assert!(matches!(
            next(ws).await,
            Frame::Relay(RelayFrame::Joined { .. })
        ));
    }
    assert!(matches!(
        next(&mut x).await,
        Frame::Relay(RelayFrame::PeerJoined { peer, .. }) if peer == x2_id
    ));

    // A node that did not exist when X joined.
    let later = node(&nats).await;
    let (mut y, y_id) = raw(later.local_addr()).await;
    assert_ne!(
        y_id >> 32,
        x_id >> 32,
        "connection ids carry distinct node ids"
    );
    send(&mut y, Frame::Client(ClientFrame::Join { room })).await;
    match next(&mut y).await {
        Frame::Relay(RelayFrame::Joined { room: r, mut peers }) => {
            assert_eq!(r, room);
            peers.sort_unstable();
            let mut want = vec![x_id, x2_id];
            want.sort_unstable();
            assert_eq!(peers, want);
        }
        other => panic!("expected JOINED, got {other:?}"),
    }
    for ws in [&mut x, &mut x2] {
        assert!(matches!(
            next(ws).await,
            Frame::Relay(RelayFrame::PeerJoined { peer, .. }) if peer == y_id
        ));
    }

    // Direct send across nodes, both ways, and a broadcast.
    send(
        &mut y,
        Frame::Client(ClientFrame::Send {
            room,
            to: x_id,
            payload: b"to x".to_vec(),
        }),
    )
    .await;
    assert_eq!(
        next(&mut x).await,
        Frame::Relay(RelayFrame::Deliver {
            room,
            from: y_id,
            broadcast: false,
            payload: b"to x".to_vec()
        })
    );
    send(
        &mut x,
        Frame::Client(ClientFrame::Broadcast {
            room,
            payload: b"all".to_vec(),
        }),
    )
    .await;
    for ws in [&mut y, &mut x2] {
        assert_eq!(
            next(ws).await,
            Frame::Relay(RelayFrame::Deliver {
                room,
                from: x_id,
                broadcast: true,
                payload: b"all".to_vec()
            })
        );
    }

    // Y leaves: X and X2 hear it.
    send(&mut y, Frame::Client(ClientFrame::Leave { room })).await;
    for ws in [&mut x, &mut x2] {
        assert!(matches!(
            next(ws).await,
            Frame::Relay(RelayFrame::PeerLeft { peer, .. }) if peer == y_id
        ));
    }
    let m = later.metrics_text();
    assert!(m.contains("pluresdb_relay_nats_up 1\n"), "{m}");
    assert!(
        !m.contains("pluresdb_relay_nats_published_total 0\n"),
        "{m}"
    );
    assert!(!m.contains("pluresdb_relay_nats_received_total 0\n"), "{m}");
    later.shutdown().await;
    first.shutdown().await;
    nats.stop().await;
}

#[tokio::test]
async fn an_unreachable_nats_fails_the_start_clearly() {
    let port = free_port();
    let config = RelayServerConfig::builder()
        .nats_url(Some(format!("nats://127.0.0.1:{port}")))
        .build()
        .unwrap();
    let err = RelayServer::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot connect to NATS at nats://127.0.0.1:"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_nats_sends_clients_away_and_refuses_new_ones() {
    let Some(nats) = NatsServer::start_or_skip().await else {
        return;
    };
    let port = nats.port();
    let relay = node(&nats).await;
    let (mut x, _) = raw(relay.local_addr()).await;
    send(&mut x, Frame::Client(ClientFrame::Join { room: [1; 32] })).await;
    assert!(matches!(
        next(&mut x).await,
        Frame::Relay(RelayFrame::Joined { .. })
    ));
    nats.stop().await;
    // The client is told to go elsewhere (1001 with a reason).
    let close = tokio::time::timeout(T, async {
        loop {
            match x.next().await {
                Some(Ok(Message::Close(c))) => return c,
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(u16::from(close.code), 1001);
    assert!(close.reason.contains("NATS"), "{}", close.reason);
    // New clients get 503 while NATS is down.
    match tokio_tungstenite::connect_async(upgrade_request(&url(&relay))).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503)
        }
        other => panic!("expected 503, got {other:?}"),
    }
    let m = relay.metrics_text();
    assert!(m.contains("pluresdb_relay_nats_up 0\n"), "{m}");
    assert!(
        m.contains("pluresdb_relay_nats_disconnects_total 1\n"),
        "{m}"
    );

    // NATS comes back on the same port: the relay reconnects and serves again.
    let nats = NatsServer::start_on(port).await.unwrap();
    tokio::time::timeout(T, async {
        while !relay.metrics_text().contains("pluresdb_relay_nats_up 1\n") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the relay did not reconnect to NATS");
    let (mut y, _) = raw(relay.local_addr()).await;
    send(&mut y, Frame::Client(ClientFrame::Join { room: [1; 32] })).await;
    assert!(matches!(
        next(&mut y).await,
        Frame::Relay(RelayFrame::Joined { .. })
    ));
    relay.shutdown().await;
    nats.stop().await;
}

/// Skips PEER_JOINED notices until the PEER_LEFT of `who`; returns how long it took.
async fn left(ws: &mut Ws, who: u64) -> Duration {
    let t0 = std::time::Instant::now();
    loop {
        match next(ws).await {
            Frame::Relay(RelayFrame::PeerLeft { peer, .. }) if peer == who => {
                return t0.elapsed();
            }
            Frame::Relay(RelayFrame::PeerJoined { .. }) => {}
            other => panic!("expected PEER_LEFT of {who}, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_a_dead_node_are_forgotten_and_a_clean_stop_says_goodbye() {
    let Some(nats) = NatsServer::start_or_skip().await else {
        return;
    };
    let room = [9u8; 32];
    let survivor = node(&nats).await;
    let (mut y, _) = raw(survivor.local_addr()).await;
    assert!(joined(&mut y, room).await.is_empty());

    // Killed without any goodbye (no LEAVE, no 1001): forgotten after missed heartbeats.
    let dead = KillableNode::start(&nats).await;
    let (mut x, x_id) = raw(dead.addr).await;
    joined(&mut x, room).await;
    dead.kill().await;
    let took = left(&mut y, x_id).await;
    assert!(
        took >= Duration::from_secs(2),
        "PEER_LEFT after {took:?} came before any heartbeat could be missed"
    );

    // A clean shutdown: its members leave at once.
    let stopping = node(&nats).await;
    let (mut z, z_id) = raw(stopping.local_addr()).await;
    joined(&mut z, room).await;
    let t0 = std::time::Instant::now();
    stopping.shutdown().await;
    left(&mut y, z_id).await;
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    drop(x);
    survivor.shutdown().await;
    nats.stop().await;
}

/// Bytes of a bus message as `docs/relay-nats.md` lays them out (built here from the doc, not
/// with the relay's encoder).
fn bus(kind: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![kind];
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// A relay DELIVER frame, which is also the bus DELIVER.
fn deliver_bytes(room: [u8; 32], from: u64, flags: u8, payload: &[u8]) -> Vec<u8> {
    bus(0x84, &[&room, &from.to_be_bytes(), &[flags], payload])
}

/// Waits until the metrics counter `name` reaches `at_least`.
async fn counter_reaches(relay: &RelayServer, name: &str, at_least: u64) {
    let read = |text: String| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    tokio::time::timeout(T, async {
        while read(relay.metrics_text()) < at_least {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{name} stayed below {at_least}: {}", relay.metrics_text()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_speaks_the_documented_bus_format_and_drops_anything_else() {
    let Some(nats) = NatsServer::start_or_skip().await else {
        return;
    };
    let config = RelayServerConfig::builder()
        .nats_url(Some(nats.url()))
        // Room for the test's own answer on a loaded machine.
        .nats_membership_wait(Duration::from_secs(3))
        .build()
        .unwrap();
    let relay = relay_with(config).await.0;
    let room = [5u8; 32];
    let p = "pluresdb.relay.v1";
    let room_subject = format!("{p}.room.{}", hex::encode(room));
    // A member on a pretend node, whose messages this test publishes by hand.
    let fake_node: u32 = 0x0BAD_CAFE;
    let fake = (u64::from(fake_node) << 32) | 1;
    let fake_subject = format!("{p}.conn.{fake_node:08x}.00000001");

    let peer = async_nats::connect(nats.url()).await.unwrap();
    let mut room_sub = peer.subscribe(room_subject.clone()).await.unwrap();
    let mut node_sub = peer.subscribe(format!("{p}.node")).await.unwrap();
    let mut fake_sub = peer.subscribe(fake_subject).await.unwrap();
    peer.flush().await.unwrap();

    let (mut x, x_id) = raw(relay.local_addr()).await;
    send(&mut x, Frame::Client(ClientFrame::Join { room })).await;
    // The node announces X, then asks who is in the room; the pretend node answers.
    let joined_msg = tokio::time::timeout(T, room_sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        joined_msg.payload.as_ref(),
        bus(0xA2, &[&room, &x_id.to_be_bytes()]),
        "MEMBER_JOINED"
    );
    let query = tokio::time::timeout(T, room_sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(query.payload.as_ref(), bus(0xA4, &[&room]), "MEMBERS_QUERY");
    let members = bus(0xA5, &[&room, &1u32.to_be_bytes(), &fake.to_be_bytes()]);
    peer.publish(query.reply.unwrap(), members.into())
        .await
        .unwrap();
    match next(&mut x).await {
        Frame::Relay(RelayFrame::Joined { peers, .. }) => assert_eq!(peers, vec![fake]),
        other => panic!("expected JOINED listing the pretend member, got {other:?}"),
    }
    // The node's heartbeat carries its node id; the pretend node beats too.
    let node_id = (x_id >> 32) as u32;
    loop {
        let beat = tokio::time::timeout(T, node_sub.next())
            .await
            .unwrap()
            .unwrap();
        if beat.payload.as_ref() == bus(0xA0, &[&node_id.to_be_bytes()]) {
            break;
        }
    }
    let heartbeat = bus(0xA0, &[&fake_node.to_be_bytes()]);
    peer.publish(format!("{p}.node"), heartbeat.into())
        .await
        .unwrap();

    // Anything else is dropped and counted; the old format's frames are not bus messages.
    let x_subject = format!("{p}.conn.{:08x}.{:08x}", x_id >> 32, x_id as u32);
    let hostile: Vec<(String, Vec<u8>)> = vec![
        // The old goodbye (PONG node): must not make the node forget the pretend member.
        (
            format!("{p}.node"),
            bus(0x06, &[&u64::from(fake_node).to_be_bytes()]),
        ),
        // The old membership query (JOIN room).
        (room_subject.clone(), bus(0x01, &[&room])),
        // A truncated MEMBER_LEFT of the pretend member.
        (room_subject.clone(), bus(0xA3, &[&room, &[0, 0, 0]])),
        // Bad DELIVER flags.
        (room_subject.clone(), deliver_bytes(room, fake, 2, b"x")),
        // A direct DELIVER on the room subject, a broadcast one on a connection subject.
        (room_subject.clone(), deliver_bytes(room, fake, 0, b"x")),
        (x_subject.clone(), deliver_bytes(room, fake, 1, b"x")),
        // Another room's announcement on this room's subject.
        (
            room_subject.clone(),
            bus(0xA3, &[&[6; 32], &fake.to_be_bytes()]),
        ),
        (room_subject.clone(), Vec::new()),
    ];
    let count = hostile.len() as u64;
    for (subject, payload) in hostile {
        peer.publish(subject, payload.into()).await.unwrap();
    }
    peer.flush().await.unwrap();
    counter_reaches(&relay, "pluresdb_relay_nats_dropped_total", count).await;

    // Well-formed traffic from the pretend node reaches X as the very same bytes.
    let broadcast = deliver_bytes(room, fake, 1, b"to all");
    peer.publish(room_subject.clone(), broadcast.clone().into())
        .await
        .unwrap();
    let direct = deliver_bytes(room, fake, 0, b"to x");
    peer.publish(x_subject, direct.clone().into())
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        match tokio::time::timeout(T, x.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Binary(b) => got.push(b.to_vec()),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    got.sort();
    let mut want = vec![broadcast, direct];
    want.sort();
    assert_eq!(got, want);

    // X's SEND to the pretend member (still known: the old goodbye did nothing) is published
    // on its connection subject as a DELIVER.
    send(
        &mut x,
        Frame::Client(ClientFrame::Send {
            room,
            to: fake,
            payload: b"to fake".to_vec(),
        }),
    )
    .await;
    let sent = tokio::time::timeout(T, fake_sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        sent.payload.as_ref(),
        deliver_bytes(room, x_id, 0, b"to fake")
    );

    // MEMBER_LEFT of the pretend member: X hears PEER_LEFT.
    peer.publish(
        room_subject,
        bus(0xA3, &[&room, &fake.to_be_bytes()]).into(),
    )
    .await
    .unwrap();
    assert_eq!(
        next(&mut x).await,
        Frame::Relay(RelayFrame::PeerLeft { room, peer: fake })
    );
    relay.shutdown().await;
    nats.stop().await;
}
