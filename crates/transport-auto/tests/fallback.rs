//! A connection made directly falls back to the relay and comes back, for real: in a
//! network namespace of its own (needs root, `ip` and `iptables`), a relay server and a
//! loopback DHT testnet. The relay's TCP port is refused first, so the two Auto peers can
//! only meet on the DHT and connect directly; then the relay is let through, both join the
//! topic's room and tell each other their relay routes over the connection. A stream of
//! numbered messages runs; midway the direct path is dropped with iptables, so the
//! connection falls back to the relay (on the old code it stalls: a direct-made connection
//! had no relay path), then the rule is removed and it goes direct again. Every message
//! arrives exactly once and in order, on the one connection. The times are printed.
//!
//! A second scenario lets the peers meet both ways at once (the relay room and the DHT):
//! whichever connection the one-connection-per-peer rule keeps (relay-made, which goes
//! direct, or direct-made, which adopts a route), the same drop falls back and comes back.
//!
//! Each parent test makes a namespace and runs its `child_...` test of this same binary
//! inside it (`ip netns exec`), so the iptables rules never touch the host's network. The
//! namespace is removed on drop, even when the test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pluresdb_sync_core::Transport;
use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_transport_auto::AutoTransport;
use pluresdb_sync_transport_auto::testkit::AutoNet;
use pluresdb_sync_transport_hyperswarm::relay_path::PeerPath;

mod common;
use common::netns::{run, run_child_in_namespace, udp_rule};
use common::stream::{Stream, relayed, wait_path};
use common::{T, accept, init_tracing};

const MESSAGES: u32 = 6_000;

#[test]
fn direct_made_fallback_root() {
    run_child_in_namespace("fd", "child_direct_made_fallback");
}

#[test]
fn met_both_ways_fallback_root() {
    run_child_in_namespace("fb", "child_met_both_ways_fallback");
}

/// Waits until `cond` holds (checked every 10 ms).
async fn until(what: &str, cond: impl Fn() -> bool) {
    tokio::time::timeout(T, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: not in time"));
}

/// Adds (`-A`) or removes (`-D`) the rule refusing TCP to `port` (a reset at once).
fn tcp_rule(op: &str, port: u16) {
    run(&[
        "iptables",
        op,
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        &port.to_string(),
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ]);
}

fn block_on(f: impl std::future::Future<Output = ()>) {
    init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(f);
}

#[test]
#[ignore = "run by direct_made_fallback_root inside its network namespace"]
fn child_direct_made_fallback() {
    block_on(fallback(true));
}

#[test]
#[ignore = "run by met_both_ways_fallback_root inside its network namespace"]
fn child_met_both_ways_fallback() {
    block_on(fallback(false));
}

/// A pair that meets only on the DHT first (`direct_first`) or both ways at once; the
/// stream, the drop and the restore.
async fn fallback(direct_first: bool) {
    let net = AutoNet::start().await.unwrap();
    let relay_port: u16 = net
        .relay_url()
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("the relay URL's port");
    if direct_first {
        // No relay yet: the peers can only meet on the DHT.
        tcp_rule("-A", relay_port);
    }
    // The default idle timeout (10 s), as in path_switch.rs.
    let build = || {
        net.builder()
            .keep_alive(Duration::from_millis(500), Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let (mut a, mut b): (AutoTransport, AutoTransport) = (build(), build());
    let (mut ea, mut eb) = (a.path_events(), b.path_events());
    let topic = fresh_topic("direct-made-fallback");
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let (ca, cb) = tokio::join!(accept(&mut ra), accept(&mut rb));
    let (pa, pb) = (a.peer_id(), b.peer_id());
    let (addr_a, addr_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    // The path is listed a moment after the connection is handed out.
    until("paths listed", || {
        a.paths().len() == 1 && b.paths().len() == 1
    })
    .await;
    let relay_back = Instant::now();
    if direct_first {
        assert_eq!(a.paths()[0].path, PeerPath::Direct(addr_b), "made directly");
        assert_eq!(b.paths()[0].path, PeerPath::Direct(addr_a), "made directly");
        assert_eq!(a.path_stats().fallback_routes, 0, "no relay yet");
        // The relay comes: both join the room, share their routes and adopt each other's.
        tcp_rule("-D", relay_port);
        until("both adopt a relay route", || {
            a.path_stats().fallback_routes == 1 && b.path_stats().fallback_routes == 1
        })
        .await;
    } else {
        // Ready to fall back: direct-made with a route adopted, or relay-made gone direct.
        let ready = |t: &AutoTransport, peer: SocketAddr| {
            t.path_stats().fallback_routes == 1
                || (t.paths().iter().any(|p| p.path == PeerPath::Direct(peer))
                    && t.path_stats().upgraded_in > 0)
        };
        until("both ready to fall back", || {
            ready(&a, addr_b) && ready(&b, addr_a)
        })
        .await;
        println!(
            "kept: {}",
            if a.path_stats().fallback_routes == 1 {
                "the direct-made connection"
            } else {
                "the relay-made connection"
            }
        );
    }
    let adopted_in = relay_back.elapsed();
    assert_eq!(a.paths().len(), 1, "still one connection: {:?}", a.paths());
    assert_eq!(b.paths().len(), 1, "still one connection: {:?}", b.paths());

    let stream = Stream::start_n(ca, cb, MESSAGES);
    stream.reached(MESSAGES / 4).await;
    let relayed_before = b.path_stats().relayed_in;
    let ports = [addr_a.port(), addr_b.port()];
    // Only the switches from now on count (the hand-out and the upgrade were before).
    while ea.try_recv().is_ok() {}
    while eb.try_recv().is_ok() {}
    udp_rule("-A", &ports);
    let dropped = Instant::now();
    let (fell_a, fell_b) = tokio::join!(
        wait_path(&mut ea, &pb, relayed),
        wait_path(&mut eb, &pa, relayed)
    );
    assert!(
        a.paths().iter().all(|p| relayed(&p.path)),
        "{:?}",
        a.paths()
    );
    // Delivery goes on over the relay while UDP is dropped.
    stream.reached(stream.count() + 500).await;
    let s = b.path_stats();
    assert!(
        s.relayed_in > relayed_before + 100,
        "500 messages came through the relay: {s:?}"
    );
    // Before falling back, the suspect path's packets went through the relay too.
    assert!(a.path_stats().doubled_out > 0, "{:?}", a.path_stats());
    udp_rule("-D", &ports);
    let restored = Instant::now();
    let (back_a, back_b) = tokio::join!(
        wait_path(&mut ea, &pb, |p| *p == PeerPath::Direct(addr_b)),
        wait_path(&mut eb, &pa, |p| *p == PeerPath::Direct(addr_a))
    );
    let relayed_back = b.path_stats().relayed_in;
    let (mut ca, cb, longest_gap) = stream.finish().await;
    assert_eq!(a.paths()[0].path, PeerPath::Direct(addr_b));
    let relayed_after = b.path_stats().relayed_in - relayed_back;
    assert!(
        relayed_after < 50,
        "direct again: {relayed_after} batches still came through the relay"
    );
    println!(
        "RESULT ready to fall back {} ms after the relay came (or the connection), drop->relayed {} ms / {} ms (a / b), longest delivery gap {} ms, restore->direct {} ms / {} ms",
        adopted_in.as_millis(),
        (fell_a - dropped).as_millis(),
        (fell_b - dropped).as_millis(),
        longest_gap.as_millis(),
        (back_a - restored).as_millis(),
        (back_b - restored).as_millis(),
    );
    ca.close().await.unwrap();
    drop(cb);
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
    net.stop().await.unwrap();
}
