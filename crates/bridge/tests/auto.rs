//! The bridge over the Auto transport: a relay server in this process and a mainline DHT
//! testnet on loopback, relayed only (every byte through the relay) and with every path on.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::*;
use pluresdb_sync_transport_auto::testkit::AutoNet;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_sync_a_burst_of_10000_events_exactly_once_relayed_only() {
    let net = AutoNet::start().await.unwrap();
    three_replicas_sync_exactly_once(&net.relayed_only_factory(), 10_000).await;
    net.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_sync_a_burst_of_10000_events_exactly_once_on_every_path() {
    let net = AutoNet::start().await.unwrap();
    three_replicas_sync_exactly_once(&net.full_factory(), 10_000).await;
    net.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_is_cut_and_the_others_go_on() {
    let net = AutoNet::start().await.unwrap();
    a_peer_that_never_reads_is_cut(&net.relayed_only_factory()).await;
    net.stop().await.unwrap();
}
