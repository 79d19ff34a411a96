//! The core conformance kit over a local mainline DHT testnet on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use pluresdb_sync_core::testkit::ConformanceKit;
use pluresdb_sync_transport_hyperswarm::testkit::LoopbackDht;

async fn kit() -> ConformanceKit<LoopbackDht> {
    common::init_tracing();
    ConformanceKit::new(LoopbackDht::start().await.unwrap()).with_timeout(Duration::from_secs(60))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_whole_kit() {
    kit().await.run_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_peers_form_a_full_mesh() {
    kit().await.one_connection_per_peer(5).await.unwrap();
}
