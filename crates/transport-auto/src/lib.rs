//! Auto mode of pluresdb-sync: every pair of replicas connects, whatever their networks.
//! Hyperswarm mode's design (mainline DHT discovery, UDP hole punching, QUIC with a Noise XX
//! handshake, one connection per topic and peer) with a WebSocket relay as one more
//! discovery source and one more path: peers meet in the topic's relay room within
//! milliseconds as well as on the DHT, and a peer met in the room is connected *through*
//! the relay, its QUIC packets carried as relay datagrams (relay protocol v2), so the same
//! handshake, topic proof and one-connection-per-peer rule hold whichever way it was met.
//!
//! ```no_run
//! use pluresdb_sync_core::{derive_topic, Transport};
//! use pluresdb_sync_transport_auto::AutoTransport;
//!
//! # #[tokio::main]
//! # async fn main() -> anyhow::Result<()> {
//! let mut transport = AutoTransport::builder()
//!     .relay_url("wss://relay.example.com/relay")
//!     .build()?;
//! let mut connections = transport.connect(derive_topic("my-app-database")).await?;
//! while let Some(mut conn) = connections.recv().await {
//!     conn.send(b"hello").await?;
//!     if let Some(reply) = conn.receive().await? {
//!         println!("{} says {} bytes", conn.peer_id(), reply.len());
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! - **What the relay sees**: room hashes (`derive_from_topic(topic, Domain::RelayRoom)`),
//!   connection ids it assigned, and QUIC packets (ciphertext). Peers authenticate each other
//!   with Noise XX inside QUIC, end to end, exactly as in Hyperswarm mode.
//! - **One connection, two paths** (milestone 2): a connection made through the relay
//!   upgrades itself: the peers send each other their direct candidates over the
//!   connection, probe them at the same moment with UDP probes authenticated by a key from
//!   the connection's TLS exporter, and once one is answered the data socket sends the
//!   connection's packets to it directly while quinn still sees the same (virtual) address,
//!   so its loss recovery and congestion control carry the connection across the switch.
//!   When the direct endpoint misses pongs for 0.9 s its packets also go through the relay
//!   (QUIC drops the duplicates); silent for 2 s, they go back through the relay alone, and
//!   probing goes on, so it upgrades again later. [`AutoTransport::paths`] and
//!   [`AutoTransport::path_events`] show each connection's path. A connection made directly
//!   (a peer dialled at a DHT or LAN address) falls back the same way when both peers are
//!   in the topic's room on the same relay: they tell each other their relay routes over
//!   the connection, and its packets go through the peer's route while the direct path is
//!   silent. When both kinds exist for a peer, the one-connection-per-peer rule keeps one,
//!   and either can fall back. A relayed connection whose route ends (the peer
//!   leaves the room, a relay socket is lost) while it is not direct ends too (`receive`
//!   returns `Ok(None)`), and the peers connect again once both are back in the room; one
//!   that is direct carries on.
//! - Errors are typed: [`AutoError`] from the builder; the `anyhow` errors of the
//!   `Transport` calls downcast to [`pluresdb_sync_core::Error`] or the transports' own.
//!
//! With the `testkit` feature, [`testkit::AutoNet`] runs a relay server and a DHT testnet in
//! the process for tests, demos and benchmarks.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod builder;
mod path;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use pluresdb_sync_core::{Connection, PeerInfo, TopicHash, Transport, TransportConfig};
use pluresdb_sync_transport_hyperswarm::HyperswarmTransport;
use pluresdb_sync_transport_hyperswarm::relay_path::{PathInfo, PathStats, PeerAddress};
use pluresdb_sync_transport_relay::{LinkStats, RelayError};
use tokio::sync::mpsc;

pub use builder::{AutoError, AutoTransportBuilder};

use path::LinkPath;

/// The transport's name.
const NAME: &str = "auto";

/// Auto mode: DHT and relay discovery, direct or relayed QUIC paths. See the
/// [crate docs](crate).
#[derive(Debug)]
pub struct AutoTransport {
    inner: HyperswarmTransport,
    path: Arc<LinkPath>,
    relay_urls: Vec<String>,
}

impl AutoTransport {
    /// A builder (at least one [`relay_url`](AutoTransportBuilder::relay_url) is required).
    pub fn builder() -> AutoTransportBuilder {
        AutoTransportBuilder::default()
    }

    /// The transport for `config` (its `relay_url` and `timeout_ms`), with DHT bootstrap
    /// nodes from `PLURESDB_SYNC_BOOTSTRAP` when set. Cheap and synchronous.
    pub fn from_config(config: &TransportConfig) -> Result<Self, AutoError> {
        AutoTransportBuilder::from_config(config)?.build()
    }

    fn new(inner: HyperswarmTransport, path: Arc<LinkPath>, relay_urls: Vec<String>) -> Self {
        Self {
            inner,
            path,
            relay_urls,
        }
    }

    /// This peer's id: the lowercase hex of its Noise static public key.
    pub fn peer_id(&self) -> String {
        self.inner.peer_id()
    }

    /// The relay URLs, in the order they are tried.
    pub fn relay_urls(&self) -> &[String] {
        &self.relay_urls
    }

    /// The data socket's local address, once networking has started.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.local_addr()
    }

    /// Every address where a peer proved its key, direct or through the relay.
    pub fn verified_addresses(&self) -> Vec<(String, PeerAddress)> {
        self.inner.verified_addresses()
    }

    /// Counters of the data socket's paths.
    pub fn path_stats(&self) -> PathStats {
        self.inner.path_stats()
    }

    /// The current path of every open connection: direct to an address or relayed via a
    /// relay URL. A connection made through the relay moves to a proven direct endpoint
    /// and back; see the [crate docs](crate).
    pub fn paths(&self) -> Vec<PathInfo> {
        self.inner.paths()
    }

    /// Path events: one when a connection is handed to the application (its first path)
    /// and one each time a connection's path changes (bounded: a receiver more than 256
    /// events behind loses the oldest). Can be called before networking starts.
    pub fn path_events(&self) -> tokio::sync::broadcast::Receiver<PathInfo> {
        self.inner.path_events()
    }

    /// Counters of the relay link (datagrams sent, received, dropped).
    pub fn relay_stats(&self) -> LinkStats {
        self.path.link().stats()
    }

    /// The most recent relay errors (dial failures, lost sockets), oldest first.
    pub fn relay_errors(&self) -> Vec<RelayError> {
        self.path.link().recent_errors()
    }

    /// Fault injection for tests and benchmarks (feature `testkit`): drops every UDP packet
    /// the data socket would send to `addr` or receives from it (`dark`), or stops doing so,
    /// as if the network path were blackholed; the relay path is untouched. A connection
    /// that went direct to `addr` then falls back to the relay as it would on a real network.
    /// See `HyperswarmTransport::blackhole_udp`.
    #[cfg(feature = "testkit")]
    #[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
    pub fn blackhole_udp(&self, addr: SocketAddr, dark: bool) -> bool {
        self.inner.blackhole_udp(addr, dark)
    }

    /// The Hyperswarm transport underneath (its DHT diagnostics: `dial_failures`,
    /// `public_addr`).
    pub fn hyperswarm(&self) -> &HyperswarmTransport {
        &self.inner
    }
}

#[async_trait]
impl Transport for AutoTransport {
    async fn connect(
        &mut self,
        topic: TopicHash,
    ) -> anyhow::Result<mpsc::Receiver<Box<dyn Connection>>> {
        self.inner.connect(topic).await
    }

    async fn announce(&mut self, topic: TopicHash) -> anyhow::Result<()> {
        self.inner.announce(topic).await
    }

    async fn lookup(&self, topic: TopicHash) -> anyhow::Result<Vec<PeerInfo>> {
        self.inner.lookup(topic).await
    }

    /// Closes every connection (remotes see `Ok(None)`), leaves the relay rooms and stops
    /// the DHT node. Later calls fail with `TransportDisconnected`.
    async fn disconnect(&mut self) -> anyhow::Result<()> {
        self.inner.disconnect().await
    }

    fn name(&self) -> &str {
        NAME
    }
}
