//! Hole-punching plumbing on loopback: the public address learned on the data socket itself,
//! probes sent while dialling, both sharing the socket with QUIC.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::next_conn;
use pluresdb_sync_core::Transport;
use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_transport_hyperswarm::testkit::LoopbackDht;

async fn wait_for_public_addr(t: &pluresdb_sync_transport_hyperswarm::HyperswarmTransport) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while t.public_addr().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no public address learned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(t.public_addr(), t.local_addr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_address_is_learned_on_the_data_socket_and_probes_flow() {
    common::init_tracing();
    let dht = LoopbackDht::start().await.unwrap();
    let topic = fresh_topic("punch");
    let mut a = dht.transport().unwrap();
    let mut b = dht.transport().unwrap();
    a.announce(topic).await.unwrap();
    // The testnet's server nodes answered a KRPC ping sent from the QUIC socket, and the
    // reply (diverted away from quinn) named this socket's address. (On a loaded machine the
    // first attempt may time out; it is retried every few seconds until it succeeds.)
    wait_for_public_addr(&a).await;
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let mut ca = next_conn(&mut ra, Duration::from_secs(30)).await;
    let mut cb = next_conn(&mut rb, Duration::from_secs(30)).await;
    wait_for_public_addr(&b).await;
    // Whoever dialled probed the other first.
    assert!(a.probes_received() + b.probes_received() > 0);
    ca.send(b"through the punched path").await.unwrap();
    assert_eq!(
        cb.receive().await.unwrap().as_deref(),
        Some(&b"through the punched path"[..])
    );
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
}
