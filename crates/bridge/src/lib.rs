//! The SyncBridge of pluresdb-sync: it carries a [`SyncBroadcaster`]'s events and the
//! application's own messages between the replicas on one topic, over any [`Transport`].
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> anyhow::Result<()> {
//! use pluresdb_sync_bridge::SyncBridge;
//! use pluresdb_sync_core::testkit::memory::MemoryNetwork;
//! use pluresdb_sync_core::{derive_topic, SyncBroadcaster, SyncEvent};
//!
//! let net = MemoryNetwork::new(); // in-memory transports; any Transport works the same
//! let topic = derive_topic("my-app-database");
//! let (hub_a, hub_b) = (SyncBroadcaster::default(), SyncBroadcaster::default());
//! let (mut seen_by_a, mut seen_by_b) = (hub_a.subscribe(), hub_b.subscribe());
//! let (ta, tb) = (net.transport()?, net.transport()?);
//! let (id_a, id_b) = (ta.peer_id().to_owned(), tb.peer_id().to_owned());
//! let a = SyncBridge::start(Box::new(ta), topic, hub_a.clone()).await?;
//! let b = SyncBridge::start(Box::new(tb), topic, hub_b.clone()).await?;
//! let mut from_peers = b.messages().expect("taken once");
//!
//! // Each hub hears of the other replica...
//! assert_eq!(seen_by_a.recv().await?, SyncEvent::PeerConnected { peer_id: id_b });
//! assert_eq!(seen_by_b.recv().await?, SyncEvent::PeerConnected { peer_id: id_a.clone() });
//! // ...and A's application events arrive as B's hub events.
//! hub_a.publish(SyncEvent::NodeUpsert { id: "n1".into() })?;
//! assert_eq!(seen_by_b.recv().await?, SyncEvent::NodeUpsert { id: "n1".into() });
//!
//! // Application messages share the connection.
//! a.broadcast(b"a snapshot chunk")?; // or a.send_to(&id_b, ..).await? for one peer
//! let (from, bytes) = from_peers.recv().await.expect("a message");
//! assert_eq!((from.as_str(), &bytes[..]), (id_a.as_str(), &b"a snapshot chunk"[..]));
//!
//! a.stop().await?; // B's hub hears that A left
//! assert_eq!(seen_by_b.recv().await?, SyncEvent::PeerDisconnected { peer_id: id_a });
//! b.stop().await
//! # }
//! ```
//!
//! # What it does
//!
//! - **Events out.** Every `NodeUpsert` / `NodeDelete` the application publishes on the hub
//!   ([`SyncBroadcaster::publish`]) goes to every peer linked at that moment, in the order
//!   published, in the event codec inside a small envelope (`docs/event-codec.md`); events
//!   already waiting for a peer travel together in one envelope (no timer, no added wait).
//! - **Events in.** Events from peers are published on the local hub with
//!   [`SyncBroadcaster::publish_remote`]; `PeerConnected` / `PeerDisconnected` are published as
//!   peers come and go.
//! - **Exactly once while linked; no echo, no loop.** The bridge reads only
//!   [`SyncBroadcaster::subscribe_local`], which carries the events the application published
//!   and never those published with `publish_remote`. So what a peer sent is never sent back
//!   or on, even when the application publishes an identical event itself (that one is the
//!   application's, and goes out), and whatever a subscriber's lag. Events reach the peers
//!   the transport connects directly (every transport makes a full mesh per topic); the
//!   bridge does **not** forward multi-hop.
//! - **One link per peer.** A new connection from a peer that is already linked replaces the
//!   old connection (a reconnect): no second `PeerConnected`, and the link's queues and event
//!   position carry over. The transports themselves yield one connection per peer when both
//!   sides dial.
//! - **Application messages** on the same connections: [`SyncBridge::send_to`] (waits for
//!   room in that peer's queue), [`SyncBridge::try_send_to`],
//!   [`SyncBridge::broadcast`], and the [`Messages`] receiver of `(peer, bytes)`.
//! - **Bounded everything.** Each peer reads the hub's application events at its own pace: a
//!   peer that falls more than the hub's capacity behind is cut (it would miss events). Each
//!   peer's queue of application messages is bounded in messages and bytes: a peer whose
//!   queue is full is cut. A send that takes longer than the send timeout cuts the peer. A
//!   cut is reported and the others never wait for it. Messages from peers wait in a bounded
//!   queue for the application; when it is full, the bridge stops reading from the peers that
//!   send more (backpressure). Limits: [`SyncBridgeBuilder`].
//! - **Reports.** [`SyncBridge::reports`] streams [`BridgeEvent`]s (peer cut and why, bad
//!   envelope from a peer, dropped message, ...); [`SyncBridge::status`] has the counters.
//!
//! [`SyncBroadcaster`]: pluresdb_sync_core::SyncBroadcaster
//! [`SyncBroadcaster::publish`]: pluresdb_sync_core::SyncBroadcaster::publish
//! [`SyncBroadcaster::publish_remote`]: pluresdb_sync_core::SyncBroadcaster::publish_remote
//! [`SyncBroadcaster::subscribe_local`]: pluresdb_sync_core::SyncBroadcaster::subscribe_local
//! [`Transport`]: pluresdb_sync_core::Transport
#![cfg_attr(docsrs, feature(doc_cfg))]

mod bridge;
mod config;
pub mod envelope;
mod error;
mod link;
mod queues;
mod report;
mod table;

pub use bridge::SyncBridge;
pub use config::{
    CLOSE_TIMEOUT, DEFAULT_MAX_PEERS, DEFAULT_MESSAGE_QUEUE, DEFAULT_MESSAGE_QUEUE_BYTES,
    DEFAULT_PEER_QUEUE, DEFAULT_PEER_QUEUE_BYTES, DEFAULT_REPORT_CAPACITY, DEFAULT_SEND_TIMEOUT,
    SyncBridgeBuilder,
};
pub use envelope::{EnvelopeError, MAX_BRIDGE_MESSAGE_BYTES};
pub use error::BridgeError;
pub use queues::Messages;
pub use report::{BridgeEvent, BridgeStatus, CutReason, DisconnectReason};
