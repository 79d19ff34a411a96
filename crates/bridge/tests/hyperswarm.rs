//! The bridge over the Hyperswarm transport, on a mainline DHT testnet on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::*;
use pluresdb_sync_transport_hyperswarm::testkit::LoopbackDht;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_sync_a_burst_of_10000_events_exactly_once() {
    let dht = LoopbackDht::start().await.unwrap();
    three_replicas_sync_exactly_once(&dht, 10_000).await;
    dht.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_is_cut_and_the_others_go_on() {
    let dht = LoopbackDht::start().await.unwrap();
    a_peer_that_never_reads_is_cut(&dht).await;
    dht.stop().await.unwrap();
}
