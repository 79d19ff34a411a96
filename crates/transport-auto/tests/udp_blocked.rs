//! UDP blocked from the start, for real: in a network namespace of its own (needs root,
//! `ip` and `iptables`), iptables drops every UDP packet that is neither to nor from the
//! DHT testnet, so the peers reach the DHT (they announce and look each other up there) but
//! not each other: their DHT dials and path probes are dropped, while the relay (WebSocket
//! over TCP) works. Two Auto peers connect through the relay (the time from `connect` to
//! the connection is printed), stay relayed (`paths()` and no path event say otherwise),
//! and a stream of 10,000 numbered messages arrives exactly once and in order.
//!
//! The parent test runs `child_udp_blocked` of this binary inside the namespace
//! (`ip netns exec`), so the rules never touch the host's network.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::netns::{output, run, run_child_in_namespace};
use common::stream::{MESSAGES, Stream, relayed, wait_path};
use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_core::{Connection, Transport};
use pluresdb_sync_transport_auto::AutoTransport;
use pluresdb_sync_transport_auto::testkit::AutoNet;
use pluresdb_sync_transport_hyperswarm::relay_path::PeerPath;

/// The iptables chain of the UDP filter (in the test's own namespace).
const CHAIN: &str = "AUTO_UDP_BLOCK";

#[test]
fn udp_blocked_root() {
    run_child_in_namespace("u", "child_udp_blocked");
}

/// Drops all UDP on loopback except to or from `dht_ports`.
fn block_udp_except(dht_ports: &[u16]) {
    run(&["iptables", "-N", CHAIN]);
    for port in dht_ports {
        let port = port.to_string();
        for dir in ["--sport", "--dport"] {
            run(&[
                "iptables", "-A", CHAIN, "-p", "udp", dir, &port, "-j", "RETURN",
            ]);
        }
    }
    run(&["iptables", "-A", CHAIN, "-p", "udp", "-j", "DROP"]);
    run(&["iptables", "-A", "INPUT", "-p", "udp", "-j", CHAIN]);
}

/// How many packets the chain's DROP rule dropped.
fn dropped_packets() -> u64 {
    let listing = output(&["iptables", "-L", CHAIN, "-n", "-v", "-x"]);
    listing
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("DROP"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the DROP rule's counter")
}

#[test]
#[ignore = "run by udp_blocked_root inside its network namespace"]
fn child_udp_blocked() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(udp_blocked());
}

async fn udp_blocked() {
    common::init_tracing();
    let net = AutoNet::start().await.unwrap();
    let dht_ports: Vec<u16> = net
        .dht()
        .bootstrap()
        .iter()
        .map(|a| a.rsplit(':').next().unwrap().parse().unwrap())
        .collect();
    block_udp_except(&dht_ports);
    // The DHT on, direct UDP on: everything is tried, only the relay gets through.
    let build = || net.builder().build().unwrap();
    let (mut a, mut b): (AutoTransport, AutoTransport) = (build(), build());
    let (mut ea, mut eb) = (a.path_events(), b.path_events());
    let topic = fresh_topic("udp-blocked");
    let started = Instant::now();
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let joined = started.elapsed();
    let (ca, cb) = tokio::join!(common::accept(&mut ra), common::accept(&mut rb));
    let connected = started.elapsed();
    let (ca, cb): (Box<dyn Connection>, Box<dyn Connection>) = (ca, cb);
    let (pa, pb) = (a.peer_id(), b.peer_id());
    // The first path event (the connection handed out) says relayed.
    for (events, t, peer) in [(&mut ea, &a, &pb), (&mut eb, &b, &pa)] {
        wait_path(events, peer, |_| true).await;
        let paths = t.paths();
        assert!(
            paths.iter().any(|p| &p.peer_id == peer && relayed(&p.path)),
            "connected through the relay: {paths:?}"
        );
    }

    let stream = Stream::start(ca, cb);
    let (tx, rx, longest_gap) = stream.finish().await;
    // Still relayed: no path event other than the first, no byte direct.
    for (events, t, peer) in [(&mut ea, &a, &pb), (&mut eb, &b, &pa)] {
        while let Ok(e) = events.try_recv() {
            assert!(
                !matches!(e.path, PeerPath::Direct(_)),
                "a path event said direct: {e:?}"
            );
        }
        let paths = t.paths();
        assert!(
            !paths.is_empty() && paths.iter().all(|p| &p.peer_id == peer && relayed(&p.path)),
            "relayed to the end: {paths:?}"
        );
        let s = t.path_stats();
        assert!(
            s.upgraded_in == 0 && s.upgraded_out == 0 && s.relayed_in > u64::from(MESSAGES / 10),
            "every packet crossed the relay: {s:?}"
        );
    }
    assert!(
        dropped_packets() > 0,
        "the peers tried UDP to each other and iptables dropped it"
    );
    // The one connection carried it all: no second one was handed out.
    assert!(ra.try_recv().is_err() && rb.try_recv().is_err());
    println!(
        "RESULT connect returned {} ms, connected through the relay {} ms after connect, \
         longest delivery gap {} ms, {} UDP packets dropped",
        joined.as_millis(),
        connected.as_millis(),
        longest_gap.as_millis(),
        dropped_packets(),
    );
    drop((tx, rx));
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), net.stop())
        .await
        .unwrap()
        .unwrap();
}
