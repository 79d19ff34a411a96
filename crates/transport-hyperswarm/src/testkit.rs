//! Test plumbing for Hyperswarm mode (feature `testkit`): a private mainline DHT testnet on
//! loopback and transports bootstrapped from it, shared by this crate's integration tests and
//! the CLI's demo and benchmarks; [`LibtorrentDht`], a private DHT of libtorrent nodes (needs
//! Python with `python3-libtorrent`). Nothing here touches the public network.
//!
//! ```
//! use pluresdb_sync_core::Transport;
//! use pluresdb_sync_core::testkit::fresh_topic;
//! use pluresdb_sync_transport_hyperswarm::testkit::LoopbackDht;
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> anyhow::Result<()> {
//! let dht = LoopbackDht::start().await?;
//! let mut a = dht.builder().build()?;
//! a.announce(fresh_topic("doc")).await?;
//! a.disconnect().await?;
//! dht.stop().await?;
//! # Ok(())
//! # }
//! ```

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use pluresdb_sync_core::Transport;
use pluresdb_sync_core::testkit::TransportFactory;

use crate::{HyperswarmError, HyperswarmTransport, HyperswarmTransportBuilder};

mod libtorrent;
pub use libtorrent::{DhtPacket, LibtorrentDht};

/// DHT nodes in the loopback testnet: enough for lookups to find announcements by routing,
/// few enough to start in well under a second.
pub const TESTNET_NODES: usize = 5;

/// The DHT request timeout of loopback transports: loopback nodes answer at once, so a
/// request that is not answered within this is lost, not slow.
pub const LOOPBACK_DHT_REQUEST_TIMEOUT: Duration = Duration::from_millis(250);

/// The lookup interval of loopback transports: peers that join find each other within about
/// a second.
pub const LOOPBACK_LOOKUP_INTERVAL: Duration = Duration::from_secs(1);

/// A mainline DHT testnet on 127.0.0.1 and Hyperswarm transports bootstrapped from it.
///
/// Its nodes run on blocking threads: start it with [`LoopbackDht::start`] and stop it with
/// [`LoopbackDht::stop`] from async code (dropping it also stops the nodes).
pub struct LoopbackDht {
    testnet: mainline::Testnet,
}

impl std::fmt::Debug for LoopbackDht {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackDht")
            .field("bootstrap", &self.testnet.bootstrap)
            .finish()
    }
}

impl LoopbackDht {
    /// Starts [`TESTNET_NODES`] DHT nodes on 127.0.0.1, off the async workers (mainline's
    /// start-up blocks until the nodes are bound).
    pub async fn start() -> anyhow::Result<Self> {
        let testnet = tokio::task::spawn_blocking(|| {
            mainline::Testnet::builder(TESTNET_NODES)
                .bind_address(Ipv4Addr::LOCALHOST)
                .build()
        })
        .await
        .context("the task starting the loopback DHT testnet failed")?
        .context("starting a loopback DHT testnet")?;
        Ok(Self { testnet })
    }

    /// The testnet nodes' addresses (`127.0.0.1:port`), to bootstrap other DHT nodes from.
    pub fn bootstrap(&self) -> &[String] {
        &self.testnet.bootstrap
    }

    /// The first node's address, for messages.
    pub fn first_node(&self) -> &str {
        self.testnet.bootstrap.first().map_or("?", String::as_str)
    }

    /// A builder for a transport on 127.0.0.1 using this DHT: a server-mode DHT node,
    /// [`LOOPBACK_DHT_REQUEST_TIMEOUT`] and [`LOOPBACK_LOOKUP_INTERVAL`]; everything else is
    /// the default. The demo and the benchmarks use this.
    pub fn builder(&self) -> HyperswarmTransportBuilder {
        HyperswarmTransport::builder()
            .bootstrap(self.testnet.bootstrap.clone())
            .bind_addr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .dht_server_mode(true)
            .dht_request_timeout(LOOPBACK_DHT_REQUEST_TIMEOUT)
            .lookup_interval(LOOPBACK_LOOKUP_INTERVAL)
    }

    /// [`LoopbackDht::builder`] with the timeouts tests want, so that a failure or a dead
    /// peer shows within seconds: a 10 s operation timeout, 5 s handshakes, a keep-alive every 500 ms
    /// with a 3 s idle timeout, lookups every 2 s.
    pub fn test_builder(&self) -> HyperswarmTransportBuilder {
        self.builder()
            .timeout(Duration::from_secs(10))
            .handshake_timeout(Duration::from_secs(5))
            .keep_alive(Duration::from_millis(500), Duration::from_secs(3))
            .lookup_interval(Duration::from_secs(2))
    }

    /// A transport from [`LoopbackDht::test_builder`].
    pub fn transport(&self) -> Result<HyperswarmTransport, HyperswarmError> {
        self.test_builder().build()
    }

    /// Stops the testnet's nodes, off the async workers.
    pub async fn stop(self) -> anyhow::Result<()> {
        tokio::task::spawn_blocking(move || drop(self.testnet))
            .await
            .context("the task stopping the loopback DHT testnet failed")
    }
}

/// A LAN discovery announce of `topic`, as a node whose data socket is at `from_ip`:`port`
/// would multicast it with `nonce` (for tests that send hostile or forged packets to
/// [`LAN_DISCOVERY_GROUP`](crate::LAN_DISCOVERY_GROUP); the layout is in
/// `docs/lan-discovery.md`).
pub fn lan_announce(
    topic: &pluresdb_sync_core::TopicHash,
    nonce: [u8; 16],
    from_ip: Ipv4Addr,
    port: u16,
    ttl_secs: u16,
) -> Vec<u8> {
    use pluresdb_sync_core::topic::{Domain, derive_from_topic};
    let key = derive_from_topic(topic, Domain::LanTag);
    let tag = crate::lan_wire::announce_tag(&key, &nonce, from_ip, port, ttl_secs);
    crate::lan_wire::encode(&crate::lan_wire::Packet::Announce {
        nonce,
        port,
        ttl_secs,
        tags: vec![tag],
    })
}

/// Transports from [`LoopbackDht::transport`], for the conformance kit.
#[async_trait]
impl TransportFactory for LoopbackDht {
    async fn create(&self, n: usize) -> anyhow::Result<Vec<Box<dyn Transport>>> {
        (0..n)
            .map(|_| Ok(Box::new(self.transport()?) as Box<dyn Transport>))
            .collect()
    }
}
