//! Test plumbing for Auto mode (feature `testkit`): a relay server in this process and a
//! mainline DHT testnet on loopback, and Auto transports that use them. Nothing here
//! touches the public network.
//!
//! ```
//! use pluresdb_sync_core::Transport;
//! use pluresdb_sync_core::testkit::fresh_topic;
//! use pluresdb_sync_transport_auto::testkit::AutoNet;
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> anyhow::Result<()> {
//! let net = AutoNet::start().await?;
//! let mut a = net.relayed_only().build()?;
//! a.announce(fresh_topic("doc")).await?;
//! a.disconnect().await?;
//! net.stop().await?;
//! # Ok(())
//! # }
//! ```

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use async_trait::async_trait;
use pluresdb_sync_core::Transport;
use pluresdb_sync_core::testkit::TransportFactory;
use pluresdb_sync_transport_hyperswarm::testkit::LoopbackDht;
use pluresdb_sync_transport_relay::server::RelayServer;

use crate::{AutoTransport, AutoTransportBuilder};

/// A relay server in this process and a DHT testnet on loopback.
#[derive(Debug)]
pub struct AutoNet {
    relay: Option<RelayServer>,
    url: String,
    dht: LoopbackDht,
}

impl AutoNet {
    /// Starts a relay (default configuration, a free loopback port) and a DHT testnet.
    pub async fn start() -> anyhow::Result<Self> {
        let (relay, url) = pluresdb_sync_transport_relay::testkit::relay().await?;
        let dht = LoopbackDht::start().await?;
        Ok(Self {
            relay: Some(relay),
            url,
            dht,
        })
    }

    /// The relay's URL.
    pub fn relay_url(&self) -> &str {
        &self.url
    }

    /// The relay server (`None` while [`restart_relay`](Self::restart_relay) has it down).
    pub fn relay(&self) -> Option<&RelayServer> {
        self.relay.as_ref()
    }

    /// The DHT testnet.
    pub fn dht(&self) -> &LoopbackDht {
        &self.dht
    }

    /// Stops the relay server and starts a new one on the same address (clients lose their
    /// sockets and reconnect).
    pub async fn restart_relay(&mut self) -> anyhow::Result<()> {
        let Some(old) = self.relay.take() else {
            anyhow::bail!("the relay is not running");
        };
        let addr = old.local_addr();
        let config = old.config().clone();
        old.shutdown().await;
        self.relay = Some(RelayServer::bind(addr, config).await?);
        Ok(())
    }

    /// A builder on this relay and DHT, with the test timeouts of
    /// [`LoopbackDht::test_builder`] (10 s operations, 5 s handshakes, 0.5 s keep-alive, 3 s
    /// idle timeout, lookups every 2 s) and 127.0.0.1.
    pub fn builder(&self) -> AutoTransportBuilder {
        let dht = &self.dht;
        AutoTransport::builder()
            .hyperswarm(|_| dht.test_builder())
            .relay_url(&self.url)
            .no_proxy()
            .bind_addr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .timeout(Duration::from_secs(10))
    }

    /// [`builder`](Self::builder) with the DHT and direct UDP off: every byte crosses the
    /// relay.
    pub fn relayed_only(&self) -> AutoTransportBuilder {
        self.builder().dht(false).direct(false)
    }

    /// Stops the relay and the DHT testnet.
    pub async fn stop(self) -> anyhow::Result<()> {
        if let Some(r) = self.relay {
            r.shutdown().await;
        }
        self.dht.stop().await
    }
}

/// Builds Auto transports for the conformance kit: relayed only (DHT and direct UDP off) or
/// with everything on.
#[derive(Debug)]
pub struct AutoFactory<'a> {
    net: &'a AutoNet,
    relayed_only: bool,
}

impl AutoNet {
    /// A factory of relayed-only transports.
    pub fn relayed_only_factory(&self) -> AutoFactory<'_> {
        AutoFactory {
            net: self,
            relayed_only: true,
        }
    }

    /// A factory of transports with the DHT, direct UDP and the relay.
    pub fn full_factory(&self) -> AutoFactory<'_> {
        AutoFactory {
            net: self,
            relayed_only: false,
        }
    }
}

#[async_trait]
impl TransportFactory for AutoFactory<'_> {
    async fn create(&self, n: usize) -> anyhow::Result<Vec<Box<dyn Transport>>> {
        (0..n)
            .map(|_| {
                let b = if self.relayed_only {
                    self.net.relayed_only()
                } else {
                    self.net.builder()
                };
                Ok(Box::new(b.build()?) as Box<dyn Transport>)
            })
            .collect()
    }
}
