//! A path switch mid-stream, for real: in a network namespace of its own (needs root, `ip`
//! and `iptables`), a relay server, and two Auto peers that meet in its room and go direct;
//! a stream of 10,000 numbered messages; midway the direct path is dropped with iptables
//! (the relay's TCP stays up), so the connection falls back to the relay, then the rule is
//! removed and the connection goes direct again. Every message arrives exactly once and in
//! order, on the one connection; before the fallback, while the direct path is only
//! suspect, packets go both ways. The times (drop → relayed, the longest gap in delivery,
//! restore → direct) are printed.
//!
//! The parent test makes the namespace and runs `child_path_switch` of this same binary
//! inside it (`ip netns exec`), so the iptables rules never touch the host's network. The
//! namespace is removed on drop, even when the test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::netns::{run_child_in_namespace, udp_rule};
use common::stream::{MESSAGES, Stream, direct, relayed, wait_path};
use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_core::{Connection, Transport};
use pluresdb_sync_transport_auto::AutoTransport;
use pluresdb_sync_transport_auto::testkit::AutoNet;

#[test]
fn path_switch_root() {
    run_child_in_namespace("s", "child_path_switch");
}

#[test]
#[ignore = "run by path_switch_root inside its network namespace"]
fn child_path_switch() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(path_switch());
}

async fn path_switch() {
    let net = AutoNet::start().await.unwrap();
    // The default idle timeout (10 s), not the testkit's 3 s: a blackholed path is noticed
    // in 2 s, and quinn's retransmissions then need a moment to reach the relay path.
    let build = || {
        net.builder()
            .dht(false)
            .keep_alive(Duration::from_millis(500), Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let (mut a, mut b): (AutoTransport, AutoTransport) = (build(), build());
    let (mut ea, mut eb) = (a.path_events(), b.path_events());
    let topic = fresh_topic("path-switch");
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let (ca, cb) = tokio::join!(ra.recv(), rb.recv());
    let (ca, cb): (Box<dyn Connection>, Box<dyn Connection>) = (ca.unwrap(), cb.unwrap());
    let (pa, pb) = (a.peer_id(), b.peer_id());
    wait_path(&mut ea, &pb, direct).await;
    wait_path(&mut eb, &pa, direct).await;
    let ports = [
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    ];

    let stream = Stream::start(ca, cb);
    stream.reached(MESSAGES / 3).await;
    let direct_before = b.path_stats().upgraded_in_bytes;
    let relayed_before = b.path_stats().relayed_in;
    udp_rule("-A", &ports);
    let dropped = Instant::now();
    let fell_a = wait_path(&mut ea, &pb, relayed).await;
    let fell_b = wait_path(&mut eb, &pa, relayed).await;
    // Delivery goes on over the relay while UDP is dropped.
    let at_fallback = stream.count();
    let direct_at_fallback = b.path_stats().upgraded_in_bytes;
    stream.reached(at_fallback + 500).await;
    let s = b.path_stats();
    assert!(
        s.relayed_in > relayed_before && s.upgraded_in_bytes == direct_at_fallback,
        "500 messages went through the relay, none direct: {s:?}"
    );
    // Before falling back, the suspect path's packets went through the relay too.
    assert!(a.path_stats().doubled_out > 0, "{:?}", a.path_stats());
    udp_rule("-D", &ports);
    let restored = Instant::now();
    let back_a = wait_path(&mut ea, &pb, direct).await;
    let back_b = wait_path(&mut eb, &pa, direct).await;
    let direct_mid = b.path_stats().upgraded_in_bytes;
    let (mut ca, cb, longest_gap) = stream.finish().await;
    assert!(
        b.path_stats().upgraded_in_bytes > direct_mid,
        "direct again after the restore: {:?}",
        b.path_stats()
    );
    assert!(direct_mid >= direct_before);
    println!(
        "RESULT drop->relayed {} ms / {} ms (a / b), longest delivery gap {} ms, restore->direct {} ms / {} ms",
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
