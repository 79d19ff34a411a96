//! Hyperswarm mode of pluresdb-sync: peers find each other on the BitTorrent mainline DHT and
//! talk directly over QUIC, authenticated by a Noise XX handshake.
//!
//! ```no_run
//! use pluresdb_sync_core::{derive_topic, Transport};
//! use pluresdb_sync_transport_hyperswarm::HyperswarmTransport;
//!
//! # #[tokio::main]
//! # async fn main() -> anyhow::Result<()> {
//! // Default: the public mainline DHT, all IPv4 interfaces, a random port and key.
//! let mut transport = HyperswarmTransport::builder().build()?;
//! println!("I am {}", transport.peer_id());
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
//! How it works (details in `docs/architecture.md`, "Hyperswarm mode"):
//! - **Discovery**: a topic's DHT info-hash is the first 20 bytes of
//!   `derive_from_topic(topic, Domain::DhtInfoHash)`; the topic itself is never published.
//!   `announce` stores this node's data-socket endpoint under it (refreshed every
//!   [`DEFAULT_ANNOUNCE_INTERVAL`] until `disconnect`); `lookup` and `connect` read it back.
//! - **LAN discovery** (on by default, [`HyperswarmTransportBuilder::lan_discovery`]):
//!   peers on one network segment also find each other by multicast on
//!   [`LAN_DISCOVERY_GROUP`], with tags keyed by the topic that rotate with every packet; a
//!   newcomer's query is answered at once. They connect over the same path, at their LAN
//!   address, and need no DHT (see `docs/lan-discovery.md`).
//! - **Connections**: QUIC (quinn) on one UDP socket, then the dialler names the topic's
//!   info-hash and a Noise handshake keyed with the topic from its first message
//!   (`Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s`) runs on the connection's stream, with the QUIC
//!   connection's exported keying material as the Noise prologue. Only peers that know the
//!   topic get past message 1 or learn each other's key; Noise authenticates both static keys
//!   (the peer id is the remote's key); QUIC's packet protection encrypts the messages, once.
//! - **Hostile input**: incoming attempts are admitted before any crypto within bounds
//!   (handshakes in progress per IP and in total, a QUIC Retry under load, per-IP rates);
//!   [`HyperswarmTransport::incoming_stats`] counts how they ended, and refusals are logged
//!   as one summary line per interval.
//! - **One connection per peer**: when both sides dial, the peer with the smaller key decides
//!   which connection survives.
//! - **Errors**: the `anyhow` errors of the `Transport` calls downcast to
//!   [`HyperswarmError`] (e.g. [`HyperswarmError::DhtUnreachable`] offline) or
//!   [`pluresdb_sync_core::Error`]; unreachable endpoints are listed with their typed
//!   [`HandshakeFailure`] by [`HyperswarmTransport::dial_failures`].
//!
//! Not wire-compatible with the JavaScript hyperswarm/HyperDHT network.
//!
//! Networking starts lazily: [`HyperswarmTransport::from_config`] and the builder only check
//! settings; the first async call binds the socket and starts the DHT node.
//!
//! With a [`relay_path::RelayPath`] ([`HyperswarmTransportBuilder::relay_path`], what Auto
//! mode's crate sets), a relay is one more path and discovery source: topics are joined in
//! its rooms too, and members met there are dialled and connected through it exactly like
//! DHT peers (see [`relay_path`]). A connection made through the relay then moves to a
//! direct path once authenticated UDP probes prove one, and back when it goes silent for
//! 2 s, without quinn noticing (the data socket switches what is behind the connection's
//! virtual address); [`HyperswarmTransport::paths`] and [`HyperswarmTransport::path_events`]
//! show it.
//!
//! With the `testkit` feature, [`testkit::LoopbackDht`] runs a private DHT on loopback for
//! tests, demos and benchmarks.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod blackhole;
mod config;
mod conn;
mod direct;
mod error;
mod fallback;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod krpc;
mod lan_wire;
mod node;
mod noise;
mod path;
mod path_wire;
mod quic;
pub mod relay_path;
mod socket;
mod stats;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;
mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use pluresdb_sync_core::{Connection, Error, PeerInfo, TopicHash, Transport, TransportConfig};
use tokio::sync::{OnceCell, mpsc};

pub use config::{
    BOOTSTRAP_ENV, DEFAULT_ANNOUNCE_INTERVAL, DEFAULT_BIND, DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_KEEP_ALIVE, DEFAULT_LAN_ANNOUNCE_INTERVAL,
    DEFAULT_LOOKUP_INTERVAL, DEFAULT_MAX_PEERS, DEFAULT_TIMEOUT, HyperswarmTransportBuilder,
    LAN_DISCOVERY_ENV, LAN_DISCOVERY_GROUP, MAX_LAN_ANNOUNCE_INTERVAL, MIN_LAN_ANNOUNCE_INTERVAL,
};
pub use error::{BootstrapNode, DialFailure, HandshakeFailure, HyperswarmError};
pub use node::LanStats;
pub use noise::NOISE_PARAMS;
pub use quic::SOCKET_BUFFER_BYTES;
pub use stats::IncomingStats;

use config::Settings;
use node::Node;

/// The transport's name.
const NAME: &str = "hyperswarm";

/// Direct peer-to-peer transport: mainline DHT discovery, QUIC, Noise XX. See the
/// [crate docs](crate).
#[derive(Debug)]
pub struct HyperswarmTransport {
    settings: Arc<Settings>,
    node: OnceCell<Arc<Node>>,
    disconnected: bool,
    board: Arc<node::PathBoard>,
}

impl HyperswarmTransport {
    /// A builder with every default.
    pub fn builder() -> HyperswarmTransportBuilder {
        HyperswarmTransportBuilder::default()
    }

    /// The transport for `config` (its `timeout_ms`), with bootstrap nodes from
    /// [`BOOTSTRAP_ENV`] when set. Cheap and synchronous: nothing touches the network until
    /// the first async call.
    pub fn from_config(config: &TransportConfig) -> Result<Self, HyperswarmError> {
        HyperswarmTransportBuilder::from_config(config).build()
    }

    pub(crate) fn with_settings(settings: Arc<Settings>) -> Self {
        Self {
            settings,
            node: OnceCell::new(),
            disconnected: false,
            board: Arc::default(),
        }
    }

    /// This peer's id: the lowercase hex of its Noise static public key.
    pub fn peer_id(&self) -> String {
        self.settings.identity.peer_id()
    }

    /// The DHT bootstrap nodes in use (`None`: the public mainline bootstrap nodes).
    pub fn bootstrap_nodes(&self) -> Option<&[String]> {
        self.settings.bootstrap.as_deref()
    }

    /// The data socket's public (reflexive) address as DHT nodes see it, once learned (see
    /// the crate docs).
    pub fn public_addr(&self) -> Option<SocketAddr> {
        self.node.get().and_then(|n| n.public_addr())
    }

    /// Endpoints listed on the DHT that could not be reached lately (by `connect`'s dialler
    /// or `lookup`'s check), by address, with the last error (typed: usually
    /// [`HyperswarmError::Handshake`] and its [`HandshakeFailure`]): how a pair of peers that
    /// cannot punch through their NATs shows up. Connections this node declined itself (its
    /// `max_peers` reached, a full accept queue) are not listed. Empty before networking
    /// starts.
    pub fn dial_failures(&self) -> Vec<DialFailure> {
        self.node
            .get()
            .map(|n| n.dial_failures())
            .unwrap_or_default()
    }

    /// LAN discovery's counters: packets received, dropped (and why), sent, and the LAN
    /// candidates known (diagnostics). All zero before networking starts or without LAN
    /// discovery.
    pub fn lan_stats(&self) -> LanStats {
        self.node.get().map(|n| n.lan_stats()).unwrap_or_default()
    }

    /// How many hole-punch probes the data socket received (diagnostics).
    pub fn probes_received(&self) -> u64 {
        self.node.get().map_or(0, |n| n.probes_received())
    }

    /// Counters of the data socket's paths (direct UDP, relay); zero before networking
    /// starts.
    pub fn path_stats(&self) -> relay_path::PathStats {
        self.node.get().map(|n| n.path_stats()).unwrap_or_default()
    }

    /// Every address where a peer proved its key (by peer id), direct or through a relay:
    /// a peer met both on the DHT and in a relay room is listed at both.
    pub fn verified_addresses(&self) -> Vec<(String, relay_path::PeerAddress)> {
        self.node
            .get()
            .map(|n| n.verified_addresses())
            .unwrap_or_default()
    }

    /// The current path of every open connection (one entry per connection handed to the
    /// application): direct to an address, or relayed via a relay URL. In Auto mode a
    /// connection made through the relay moves to a proven direct endpoint and back, and one
    /// made directly falls back to its peer's relay route and back when both are in the
    /// topic's relay room (see the Auto mode section of the architecture doc); in Hyperswarm
    /// mode a connection keeps its path.
    pub fn paths(&self) -> Vec<relay_path::PathInfo> {
        self.node.get().map(|n| n.paths()).unwrap_or_default()
    }

    /// A receiver of path events: one when a connection is handed to the application (its
    /// first path) and one each time a connection's path changes. Bounded: a receiver that
    /// falls behind by more than 256 events loses the oldest (`RecvError::Lagged`). Can be
    /// called before networking starts.
    pub fn path_events(&self) -> tokio::sync::broadcast::Receiver<relay_path::PathInfo> {
        self.board.subscribe()
    }

    /// What this node did with incoming connection attempts: how many were retried, refused
    /// (and why), or completed, and how many Diffie-Hellman-costing messages 2 it sent.
    /// Zero before networking starts.
    pub fn incoming_stats(&self) -> IncomingStats {
        self.node
            .get()
            .map(|n| n.incoming_stats())
            .unwrap_or_default()
    }

    /// The data socket's local address, once networking has started.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.node.get().map(|n| n.local_addr())
    }

    /// Fault injection for tests and benchmarks (feature `testkit`): drops every UDP
    /// packet this node's data socket would send to `addr` or receives from it (`dark`), or
    /// stops doing so, as if the network path to `addr` were blackholed; the relay path is
    /// untouched. A peer's direct path goes dark without root or iptables. At most 64
    /// addresses are dark at once; `false` when that many are, or before networking starts.
    #[cfg(feature = "testkit")]
    #[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
    pub fn blackhole_udp(&self, addr: SocketAddr, dark: bool) -> bool {
        self.node
            .get()
            .is_some_and(|n| n.data_socket().blackhole().set(addr, dark))
    }

    async fn node(&self) -> anyhow::Result<&Arc<Node>> {
        if self.disconnected {
            return Err(Error::TransportDisconnected { transport: NAME }.into());
        }
        let settings = self.settings.clone();
        let board = self.board.clone();
        self.node
            .get_or_try_init(|| Node::start(settings, board))
            .await
    }
}

#[async_trait]
impl Transport for HyperswarmTransport {
    async fn connect(
        &mut self,
        topic: TopicHash,
    ) -> anyhow::Result<mpsc::Receiver<Box<dyn Connection>>> {
        let node = self.node().await?;
        match self.settings.relay {
            Some(_) => node.auto_connect(topic).await,
            None => node.connect(topic).await,
        }
    }

    async fn announce(&mut self, topic: TopicHash) -> anyhow::Result<()> {
        let node = self.node().await?;
        match self.settings.relay {
            Some(_) => node.auto_announce(topic).await,
            None => node.announce(topic).await,
        }
    }

    async fn lookup(&self, topic: TopicHash) -> anyhow::Result<Vec<PeerInfo>> {
        let node = self.node().await?;
        match self.settings.relay {
            Some(_) => node.auto_lookup(topic).await,
            None => node.lookup(topic).await,
        }
    }

    async fn disconnect(&mut self) -> anyhow::Result<()> {
        if self.disconnected {
            return Ok(());
        }
        self.disconnected = true;
        if let Some(node) = self.node.get() {
            node.shutdown();
            node.wait_closed().await;
        }
        Ok(())
    }

    fn name(&self) -> &str {
        NAME
    }
}

impl Drop for HyperswarmTransport {
    fn drop(&mut self) {
        if let Some(node) = self.node.get() {
            node.shutdown();
        }
    }
}
