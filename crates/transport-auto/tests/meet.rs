//! Auto mode's relay path on loopback, with a real relay server in this process and a real
//! DHT testnet: peers meeting through the relay alone, a peer met both on the DHT and in the
//! relay room, and the relay restarting under relayed connections.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_core::{Connection, Transport};
use pluresdb_sync_transport_auto::AutoTransport;
use pluresdb_sync_transport_auto::testkit::AutoNet;
use pluresdb_sync_transport_hyperswarm::relay_path::{PathInfo, PeerAddress, PeerPath};

use common::{T, accept, init_tracing, recv};

/// Sends `msg` from `a` to `b` and back.
async fn exchange(a: &mut Box<dyn Connection>, b: &mut Box<dyn Connection>, msg: &[u8]) {
    a.send(msg).await.unwrap();
    assert_eq!(recv(b).await.as_deref(), Some(msg));
    b.send(msg).await.unwrap();
    assert_eq!(recv(a).await.as_deref(), Some(msg));
}

/// With the DHT off, two peers meet in the relay room and connect through the relay: well
/// under a second on loopback (printed, not asserted), every packet relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_the_dht_meet_through_the_relay_alone() {
    let net = AutoNet::start().await.unwrap();
    let mut a = net.relayed_only().build().unwrap();
    let mut b = net.relayed_only().build().unwrap();
    assert_eq!(a.name(), "auto");
    let topic = fresh_topic("meet-relay");
    let started = Instant::now();
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let (mut ca, mut cb) = tokio::join!(accept(&mut ra), accept(&mut rb));
    ca.send(b"first").await.unwrap();
    assert_eq!(recv(&mut cb).await.as_deref(), Some(&b"first"[..]));
    let first = started.elapsed();
    eprintln!(
        "relay only: joined to first message in {} ms",
        first.as_millis()
    );
    assert_eq!(ca.peer_id(), b.peer_id());
    assert_eq!(cb.peer_id(), a.peer_id());
    exchange(&mut ca, &mut cb, &vec![7u8; 300_000]).await;
    for t in [&a, &b] {
        let s = t.path_stats();
        assert!(s.relayed_out > 0 && s.relayed_in > 0, "{s:?}");
        assert!(t.relay_stats().sent > 0, "{:?}", t.relay_stats());
        // Nothing went over UDP: direct is off and no datagram was sent to a real address.
        let listed = t.verified_addresses();
        assert!(
            listed
                .iter()
                .all(|(_, at)| matches!(at, PeerAddress::Relayed(_))),
            "{listed:?}"
        );
    }
    let relay = net.relay().unwrap().metrics_text();
    assert!(
        relay.lines().any(
            |l| l.starts_with("pluresdb_relay_datagrams_forwarded_total ") && !l.ends_with(" 0")
        ),
        "{relay}"
    );
    // lookup lists the peer (by its real key) with its relay route.
    let peers = a.lookup(topic).await.unwrap();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0].id, b.peer_id());
    assert!(peers[0].connected);
    let address = peers[0].address.clone().unwrap_or_default();
    assert!(address.starts_with("relay ws://127.0.0.1:"), "{address}");
    a.disconnect().await.unwrap();
    assert_eq!(
        recv(&mut cb).await,
        None,
        "disconnect ends the remote's connection"
    );
    b.disconnect().await.unwrap();
    net.stop().await.unwrap();
}

/// Both peers are on the DHT (with direct UDP) and in the relay room: they are met both ways
/// (verified at a direct address and at a relay route, or the relay-made connection went
/// direct first, after which the DHT address is not dialled), and each side still yields
/// exactly one connection, over several DHT and relay rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_found_on_the_dht_and_in_the_relay_room_yields_one_connection() {
    init_tracing();
    let net = AutoNet::start().await.unwrap();
    let mut a = net.builder().build().unwrap();
    let mut b = net.builder().build().unwrap();
    let topic = fresh_topic("both-ways");
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let (mut ca, mut cb) = tokio::join!(accept(&mut ra), accept(&mut rb));
    exchange(&mut ca, &mut cb, b"hello").await;
    // Until one side has verified the other both directly and through the relay (so that
    // pair has made, or answered, a connection each way), or the connection made through
    // the relay went direct (then the DHT address is that connection's, and not dialled).
    let both = |t: &AutoTransport, peer: &str| {
        let at = t.verified_addresses();
        let direct = at
            .iter()
            .any(|(p, a)| p == peer && matches!(a, PeerAddress::Direct(_)));
        let relayed = at
            .iter()
            .any(|(p, a)| p == peer && matches!(a, PeerAddress::Relayed(_)));
        direct && relayed
    };
    let upgraded = |t: &AutoTransport| {
        matches!(
            t.paths()[..],
            [PathInfo {
                path: PeerPath::Direct(_),
                ..
            }]
        )
    };
    let deadline = Instant::now() + T;
    while !(both(&a, &b.peer_id()) || both(&b, &a.peer_id()) || (upgraded(&a) && upgraded(&b))) {
        assert!(
            Instant::now() < deadline,
            "a: {:?} {:?} {:?}\nb: {:?} {:?} {:?}",
            a.verified_addresses(),
            a.hyperswarm().dial_failures(),
            a.paths(),
            b.verified_addresses(),
            b.hyperswarm().dial_failures(),
            b.paths()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two more DHT lookup rounds (2 s apart in tests): no second connection appears, and the
    // one there is keeps working.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(ra.try_recv().is_err(), "a got a second connection");
    assert!(rb.try_recv().is_err(), "b got a second connection");
    exchange(&mut ca, &mut cb, b"still the one").await;
    let peers = a.lookup(topic).await.unwrap();
    assert_eq!(peers.len(), 1, "{peers:?}");
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
    net.stop().await.unwrap();
}

/// The relay restarts under a relayed connection. As designed in this milestone, the
/// connection ends (its route is gone: `receive` returns `Ok(None)` on both sides), and the
/// peers, back in the room on the new relay, connect again on the same `connect` receivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_relay_restart_relayed_peers_reconnect() {
    init_tracing();
    let mut net = AutoNet::start().await.unwrap();
    let mut a = net.relayed_only().build().unwrap();
    let mut b = net.relayed_only().build().unwrap();
    let topic = fresh_topic("relay-restart");
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let (mut ca, mut cb) = tokio::join!(accept(&mut ra), accept(&mut rb));
    exchange(&mut ca, &mut cb, b"before").await;
    let restarted = Instant::now();
    net.restart_relay().await.unwrap();
    assert_eq!(recv(&mut ca).await, None, "the relayed connection ends");
    assert_eq!(recv(&mut cb).await, None, "on both sides");
    let (mut ca2, mut cb2) = tokio::join!(accept(&mut ra), accept(&mut rb));
    exchange(&mut ca2, &mut cb2, b"after").await;
    eprintln!(
        "relay restart: connected again after {} ms",
        restarted.elapsed().as_millis()
    );
    assert_eq!(ca2.peer_id(), b.peer_id());
    assert!(!a.relay_errors().is_empty(), "the lost socket is recorded");
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
    net.stop().await.unwrap();
}
