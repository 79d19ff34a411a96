//! Relay mode for pluresdb-sync: peers meet in rooms on a WebSocket relay (port 443 friendly)
//! and talk over end-to-end encrypted sessions carried through it.
//!
//! ```no_run
//! use pluresdb_sync_core::{derive_topic, Connection, Transport};
//! use pluresdb_sync_transport_relay::RelayTransport;
//!
//! # #[tokio::main]
//! # async fn main() -> anyhow::Result<()> {
//! let mut transport = RelayTransport::builder()
//!     .relay_url("wss://relay.example.com/relay")
//!     .relay_url("wss://relay-backup.example.com/relay") // tried when the first fails
//!     .build()?;
//! let topic = derive_topic("my-app-database");
//! let mut peers = transport.connect(topic).await?;
//! while let Some(mut conn) = peers.recv().await {
//!     conn.send(b"hello").await?;
//!     if let Some(reply) = conn.receive().await? {
//!         println!("{} says {} bytes", conn.peer_id(), reply.len());
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! - The relay only sees a room id, `derive_from_topic(topic, Domain::RelayRoom)`, and
//!   connection ids it assigned; it never learns the topic, a peer identity or plaintext.
//! - Each pair of peers runs a Noise `XXpsk0_25519_ChaChaPoly_BLAKE2s` handshake through the
//!   relay with a pre-shared key derived from the topic and mixed in from the first message,
//!   so only peers that know the topic can talk, or even learn each other's static keys. The
//!   remote's peer id is the static key it proved. `encryption: false` turns this off (both
//!   sides must agree; a mismatch is reported in [`RelayTransport::recent_errors`]).
//! - Errors are typed: [`RelayTransport::recent_errors`] returns [`RelayError`]s, and a failed
//!   session is [`RelayError::Session`] with a [`SessionError`] cause (a handshake timeout, a
//!   version or encryption mismatch, a window violation, …).
//! - Messages up to 16 MiB are split into relay frames (64 KiB by default) and reassembled.
//! - Every session has end-to-end flow control: the receiver grants a window of
//!   [`FLOW_WINDOW_BYTES`] and returns credit as the application reads, and `send` waits when
//!   the window is full. An application that does not read one connection therefore blocks
//!   only the peer sending to it, never the transport's other connections and topics; a peer
//!   that ignores its window loses the session.
//! - The `Connection` contract: a `send` may wait until the peer reads. One message of the
//!   largest size (16 MiB) each way always fits in an empty window, so peers that each send one
//!   message and then `receive` never deadlock; to send more before reading, read on another
//!   task. A session that ends on one side without its CLOSE reaching the other is answered
//!   with a REJECT (no session), so a `send` never waits forever on a session that is gone;
//!   after a failure, `receive` returns the error once and then `Ok(None)`.
//!   `Transport::disconnect` sends CLOSE on every session, so peers' `receive` returns
//!   `Ok(None)` at once.
//! - [`DatagramLink`] (from [`RelayTransportBuilder::build_datagram_link`]) is a path for
//!   droppable datagrams through a relay (protocol version 2): Auto mode carries its QUIC
//!   packets on it.
//! - With the `server` feature, [`server::RelayServer`] is the relay itself (run by
//!   `pluresdb-sync relay`). The wire protocol is in `docs/relay-protocol.md`.
//! - With the `testkit` feature, [`testkit`] holds test plumbing: an in-process relay, a raw
//!   protocol client, a nats-server process.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod client;
mod error;
pub mod protocol;
#[cfg(feature = "server")]
#[cfg_attr(docsrs, doc(cfg(feature = "server")))]
pub mod server;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;

pub use client::{
    Datagram, DatagramLink, FLOW_WINDOW_BYTES, LINK_DATAGRAM_QUEUE, LINK_EVENT_QUEUE, LinkEvent,
    LinkReceivers, LinkStats, MAX_LINK_ROOMS, RelayTransport, RelayTransportBuilder,
    SESSION_VERSION, datagrams_of,
};
pub use error::{RelayError, SessionError};
