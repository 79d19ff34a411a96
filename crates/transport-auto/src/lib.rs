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
//! - **Milestone 1** (this version): a connection has one path, the one it was made on
//!   (direct when the peer was dialled at a DHT address, relayed when met in the room); when
//!   both exist for a peer, the one-connection-per-peer rule keeps one. A relayed
//!   connection ends when its route does (the peer leaves the room, a relay socket is lost;
//!   `receive` returns `Ok(None)`), and the peers connect again as soon as both are back in
//!   the room. Moving a connection between paths is the next milestone.
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
use pluresdb_sync_transport_hyperswarm::relay_path::{PathStats, PeerAddress};
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

    /// Counters of the relay link (datagrams sent, received, dropped).
    pub fn relay_stats(&self) -> LinkStats {
        self.path.link().stats()
    }

    /// The most recent relay errors (dial failures, lost sockets), oldest first.
    pub fn relay_errors(&self) -> Vec<RelayError> {
        self.path.link().recent_errors()
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
