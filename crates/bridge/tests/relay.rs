//! The bridge over the relay transport, through a relay server in this process on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use async_trait::async_trait;
use common::*;
use pluresdb_sync_core::Transport;
use pluresdb_sync_core::testkit::TransportFactory;
use pluresdb_sync_transport_relay::RelayTransport;
use pluresdb_sync_transport_relay::server::RelayServer;
use pluresdb_sync_transport_relay::testkit::relay;

/// Relay transports on one relay server in this process.
struct Relay {
    server: RelayServer,
    url: String,
}

impl Relay {
    async fn start() -> Self {
        let (server, url) = relay().await.unwrap();
        Self { server, url }
    }
}

#[async_trait]
impl TransportFactory for Relay {
    async fn create(&self, n: usize) -> anyhow::Result<Vec<Box<dyn Transport>>> {
        (0..n)
            .map(|_| {
                let t = RelayTransport::builder()
                    .relay_url(&self.url)
                    .timeout(T)
                    .build()?;
                Ok(Box::new(t) as Box<dyn Transport>)
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_sync_a_burst_of_10000_events_exactly_once() {
    let relay = Relay::start().await;
    three_replicas_sync_exactly_once(&relay, 10_000).await;
    relay.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_is_cut_and_the_others_go_on() {
    let relay = Relay::start().await;
    a_peer_that_never_reads_is_cut(&relay).await;
    relay.server.shutdown().await;
}
