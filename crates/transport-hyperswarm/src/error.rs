//! Errors specific to the Hyperswarm transport.

use std::net::SocketAddr;

/// An error of the Hyperswarm transport. Generic failures (timeouts, closed connections,
/// oversized messages) are [`pluresdb_sync_core::Error`] values instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HyperswarmError {
    /// A bootstrap node is not written as `host:port`.
    #[error("bootstrap node {text:?} from {origin} is not host:port ({reason})")]
    InvalidBootstrap {
        /// The entry as given.
        text: String,
        /// Where it came from (the builder or the `PLURESDB_SYNC_BOOTSTRAP` variable).
        origin: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A builder value is out of range.
    #[error("{what} must be {expected}, got {got}")]
    InvalidSetting {
        /// The setting.
        what: &'static str,
        /// What it must be.
        expected: &'static str,
        /// The value given.
        got: String,
    },
    /// The data socket or the DHT node could not be started.
    #[error("cannot start the hyperswarm transport on {bind}: {reason}")]
    Start {
        /// The bind address.
        bind: String,
        /// What failed.
        reason: String,
    },
    /// The QUIC connection or the Noise XX handshake with a remote failed.
    #[error("handshake with {addr} failed: {reason}")]
    Handshake {
        /// The remote endpoint.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
    /// A remote broke the wire protocol (the connection is then closed).
    #[error("peer at {addr} broke the protocol: {reason}")]
    Protocol {
        /// The remote endpoint.
        addr: SocketAddr,
        /// What it did.
        reason: String,
    },
    /// This node turned the connection down itself (it has `max_peers` connections, the
    /// application's connection queue is full, or the topic is not joined here). Not held
    /// against the remote address: it is not put in backoff.
    #[error("declined the connection with {addr} on this side: {reason}")]
    Declined {
        /// The remote endpoint.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The remote is not (or no longer) taking connections on this topic.
    #[error("peer at {addr} refused the connection: {reason}")]
    Refused {
        /// The remote endpoint.
        addr: SocketAddr,
        /// Its reason.
        reason: String,
    },
}
