//! The bridge over the Hyperswarm transport, on a mainline DHT testnet on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use pluresdb_sync_core::Transport;
use pluresdb_sync_core::testkit::TransportFactory;
use pluresdb_sync_transport_hyperswarm::HyperswarmTransport;

/// Hyperswarm transports on one local DHT testnet.
struct LocalDht {
    testnet: mainline::Testnet,
}

impl LocalDht {
    async fn start() -> Self {
        let testnet = tokio::task::spawn_blocking(|| {
            mainline::Testnet::builder(5)
                .bind_address(Ipv4Addr::LOCALHOST)
                .build()
                .unwrap()
        })
        .await
        .unwrap();
        Self { testnet }
    }

    async fn stop(self) {
        tokio::task::spawn_blocking(move || drop(self.testnet))
            .await
            .unwrap();
    }
}

#[async_trait]
impl TransportFactory for LocalDht {
    async fn create(&self, n: usize) -> anyhow::Result<Vec<Box<dyn Transport>>> {
        (0..n)
            .map(|_| {
                let t = HyperswarmTransport::builder()
                    .bootstrap(self.testnet.bootstrap.clone())
                    .bind_addr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
                    .dht_server_mode(true)
                    .dht_request_timeout(Duration::from_millis(250))
                    .request_timeout(Duration::from_secs(10))
                    .lookup_interval(Duration::from_secs(1))
                    .build()?;
                Ok(Box::new(t) as Box<dyn Transport>)
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_sync_a_burst_of_10000_events_exactly_once() {
    let dht = LocalDht::start().await;
    three_replicas_sync_exactly_once(&dht, 10_000).await;
    dht.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_is_cut_and_the_others_go_on() {
    let dht = LocalDht::start().await;
    a_peer_that_never_reads_is_cut(&dht).await;
    dht.stop().await;
}
