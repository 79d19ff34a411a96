//! The testkit's fault injection (`AutoTransport::blackhole_udp`), which `bench auto`'s
//! forced switch relies on: a direct connection whose endpoint one side blackholes falls
//! back to the relay on both sides, as it does when iptables drops the path
//! (`path_switch.rs`), the same connection carrying messages throughout; lit again, it goes
//! direct again. Loopback, no root.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::stream::{direct, relayed, wait_path};
use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_core::{Connection, Transport};
use pluresdb_sync_transport_auto::testkit::AutoNet;
use pluresdb_sync_transport_hyperswarm::relay_path::PeerPath;

async fn exchange(from: &mut Box<dyn Connection>, to: &mut Box<dyn Connection>, msg: &[u8]) {
    from.send(msg).await.unwrap();
    assert_eq!(common::recv(to).await.as_deref(), Some(msg));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_endpoint_sends_the_connection_back_to_the_relay_and_lit_it_returns() {
    common::init_tracing();
    let net = AutoNet::start().await.unwrap();
    let build = || {
        net.builder()
            .dht(false)
            .keep_alive(Duration::from_millis(500), Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let (mut a, mut b) = (build(), build());
    assert!(
        !a.blackhole_udp("127.0.0.1:9".parse().unwrap(), true),
        "nothing to blackhole before networking starts"
    );
    let (mut ea, mut eb) = (a.path_events(), b.path_events());
    let topic = fresh_topic("blackhole");
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let (mut ca, mut cb) = tokio::join!(common::accept(&mut ra), common::accept(&mut rb));
    let (pa, pb) = (a.peer_id(), b.peer_id());
    wait_path(&mut ea, &pb, direct).await;
    wait_path(&mut eb, &pa, direct).await;
    let endpoint = match &a.paths()[0].path {
        PeerPath::Direct(e) => *e,
        other => panic!("not direct: {other:?}"),
    };
    exchange(&mut ca, &mut cb, b"direct").await;

    assert!(a.blackhole_udp(endpoint, true));
    wait_path(&mut ea, &pb, relayed).await;
    wait_path(&mut eb, &pa, relayed).await;
    let before = b.path_stats().upgraded_in;
    exchange(&mut ca, &mut cb, b"relayed").await;
    exchange(&mut cb, &mut ca, b"relayed back").await;
    let s = b.path_stats();
    assert_eq!(
        s.upgraded_in, before,
        "nothing from A arrived direct: {s:?}"
    );

    assert!(a.blackhole_udp(endpoint, false));
    wait_path(&mut ea, &pb, direct).await;
    wait_path(&mut eb, &pa, direct).await;
    let direct_in = b.path_stats().upgraded_in_bytes;
    exchange(&mut ca, &mut cb, &[7u8; 4000]).await;
    assert!(b.path_stats().upgraded_in_bytes > direct_in, "direct again");
    assert!(
        ra.try_recv().is_err() && rb.try_recv().is_err(),
        "one connection"
    );
    drop((ca, cb));
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
    net.stop().await.unwrap();
}
