//! A private mainline DHT on loopback and Hyperswarm transports tuned for it, shared by the
//! demo and the benchmarks: nothing they do touches the public network.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::Context;
use pluresdb_sync::{HyperswarmTransport, HyperswarmTransportBuilder};

/// DHT nodes in the loopback testnet.
pub(crate) const TESTNET_NODES: usize = 5;

/// A DHT testnet on 127.0.0.1 and transports bootstrapped from it. Its nodes are blocking
/// threads: drop it with [`LoopbackDht::stop`] from async code.
pub(crate) struct LoopbackDht {
    testnet: mainline::Testnet,
}

impl LoopbackDht {
    /// Starts the testnet (off the async workers: mainline's start-up blocks).
    pub(crate) async fn start() -> anyhow::Result<Self> {
        let testnet = tokio::task::spawn_blocking(|| {
            mainline::Testnet::builder(TESTNET_NODES)
                .bind_address(Ipv4Addr::LOCALHOST)
                .build()
        })
        .await?
        .context("starting a loopback DHT testnet")?;
        Ok(Self { testnet })
    }

    /// The first node's address, for messages.
    pub(crate) fn first_node(&self) -> &str {
        self.testnet.bootstrap.first().map_or("?", String::as_str)
    }

    /// A builder for a transport on 127.0.0.1 using this DHT: server-mode DHT node and short
    /// DHT request timeouts (loopback answers at once), lookups every second.
    pub(crate) fn builder(&self) -> HyperswarmTransportBuilder {
        HyperswarmTransport::builder()
            .bootstrap(self.testnet.bootstrap.clone())
            .bind_addr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .dht_server_mode(true)
            .dht_request_timeout(Duration::from_millis(250))
            .lookup_interval(Duration::from_secs(1))
    }

    /// Stops the testnet's nodes.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        tokio::task::spawn_blocking(move || drop(self.testnet)).await?;
        Ok(())
    }
}
