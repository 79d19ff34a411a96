//! The core conformance kit in Auto mode, relayed only (the DHT and direct UDP off, so every
//! byte crosses a real relay server in this process), and with every path on.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use pluresdb_sync_core::testkit::ConformanceKit;
use pluresdb_sync_transport_auto::testkit::AutoNet;

const STEP: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_only_passes_the_whole_kit() {
    let net = AutoNet::start().await.unwrap();
    ConformanceKit::new(net.relayed_only_factory())
        .with_timeout(STEP)
        .run_all()
        .await
        .unwrap();
    net.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_only_five_peers_form_a_full_mesh() {
    let net = AutoNet::start().await.unwrap();
    ConformanceKit::new(net.relayed_only_factory())
        .with_timeout(STEP)
        .one_connection_per_peer(5)
        .await
        .unwrap();
    net.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_dht_and_direct_udp_passes_the_whole_kit() {
    let net = AutoNet::start().await.unwrap();
    ConformanceKit::new(net.full_factory())
        .with_timeout(STEP)
        .run_all()
        .await
        .unwrap();
    net.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_dht_and_direct_udp_five_peers_form_a_full_mesh() {
    let net = AutoNet::start().await.unwrap();
    ConformanceKit::new(net.full_factory())
        .with_timeout(STEP)
        .one_connection_per_peer(5)
        .await
        .unwrap();
    net.stop().await.unwrap();
}
