//! Errors of the Hyperswarm transport: the public [`HyperswarmError`] (with the typed cause of
//! a failed handshake and the endpoints [`HyperswarmTransport::dial_failures`] lists), and the
//! internal error of one dial, which says whether this node declined the connection itself.
//!
//! [`HyperswarmTransport::dial_failures`]: crate::HyperswarmTransport::dial_failures

use std::fmt;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

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
    /// The identity could not be loaded from its key file (or generated).
    #[error(transparent)]
    Identity(pluresdb_sync_core::Error),
    /// The data socket or the DHT node could not be started.
    #[error("cannot start the hyperswarm transport on {bind}: {reason}")]
    Start {
        /// The bind address.
        bind: String,
        /// What failed.
        reason: String,
    },
    /// No DHT node answered: none of the bootstrap nodes could be resolved or reached (and
    /// no other DHT node is known). Typically there is no network, or the nodes are wrong.
    #[error(
        "{operation} on the mainline DHT failed after {} ms: no DHT node answered, {}",
        .elapsed.as_millis(),
        describe_bootstrap(.bootstrap)
    )]
    DhtUnreachable {
        /// What was being done: `"announcing"` or `"looking up peers"`.
        operation: &'static str,
        /// The bootstrap nodes, with what they resolved to when the transport started.
        bootstrap: Vec<BootstrapNode>,
        /// How long the operation took before it gave up.
        elapsed: Duration,
    },
    /// The QUIC connection or the Noise XX handshake with a remote failed.
    #[error("handshake with {addr} failed: {cause}")]
    Handshake {
        /// The remote endpoint.
        addr: SocketAddr,
        /// What failed.
        cause: HandshakeFailure,
    },
    /// A remote broke the wire protocol (the connection is then closed).
    #[error("peer at {addr} broke the protocol: {reason}")]
    Protocol {
        /// The remote endpoint.
        addr: SocketAddr,
        /// What it did.
        reason: String,
    },
}

/// Why a handshake with a remote failed (see [`HyperswarmError::Handshake`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeFailure {
    /// Nothing answered the QUIC handshake in time: a stale DHT entry, a peer gone, or a NAT
    /// that does not let our packets in.
    #[error("no answer within {} ms", .after.as_millis())]
    NoAnswer {
        /// How long it waited.
        after: Duration,
    },
    /// The remote answered but the handshake did not finish in time.
    #[error("the handshake did not finish within {} ms", .after.as_millis())]
    Timeout {
        /// The handshake timeout.
        after: Duration,
    },
    /// The QUIC connection failed (refused, closed by a transport error, lost).
    #[error("quic: {reason}")]
    Quic {
        /// quinn's description.
        reason: String,
    },
    /// The remote speaks another version of this protocol (its QUIC ALPN is not ours): the
    /// TLS handshake refused it. Upgrade the older peer.
    #[error("the peer speaks another protocol version (this node speaks {ours})")]
    Version {
        /// The protocol this node speaks, e.g. `pluresdb-sync/hyperswarm/2`.
        ours: &'static str,
    },
    /// The Noise handshake failed (a key that does not verify, a broken message).
    #[error("noise: {reason}")]
    Noise {
        /// What failed.
        reason: String,
    },
    /// The remote does not know the topic, or does not take connections on it (it only
    /// announces, or it left).
    #[error("the peer is not on this topic")]
    TopicUnknown,
    /// The remote has as many peers as it takes, or its application's connection queue is
    /// full; it may take the connection later.
    #[error("the peer is busy (too many peers or a full queue)")]
    Busy,
    /// The remote closed the connection for another reason.
    #[error("the peer closed the connection: {reason}")]
    Closed {
        /// Its reason, from its close code.
        reason: &'static str,
    },
    /// The handshake's stream failed after the QUIC handshake.
    #[error("the stream failed: {reason}")]
    Stream {
        /// quinn's description.
        reason: String,
    },
}

/// A DHT bootstrap node and the IPv4 addresses its name resolved to when the transport
/// started (the DHT is IPv4-only).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BootstrapNode {
    /// The node as configured, `host:port`.
    pub node: String,
    /// What it resolved to; empty when it did not resolve (no DNS) or only to IPv6.
    pub resolved: Vec<SocketAddrV4>,
}

impl BootstrapNode {
    pub(crate) fn new(node: impl Into<String>, resolved: Vec<SocketAddrV4>) -> Self {
        Self {
            node: node.into(),
            resolved,
        }
    }
}

impl fmt::Display for BootstrapNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.resolved.as_slice() {
            [] => write!(f, "{} (not resolved to an IPv4 address)", self.node),
            [one] if one.to_string() == self.node => write!(f, "{}", self.node),
            many => {
                let list: Vec<String> = many.iter().map(ToString::to_string).collect();
                write!(f, "{} = {}", self.node, list.join(" "))
            }
        }
    }
}

fn describe_bootstrap(nodes: &[BootstrapNode]) -> String {
    if nodes.is_empty() {
        return "and no bootstrap nodes are configured".into();
    }
    let list: Vec<String> = nodes.iter().map(ToString::to_string).collect();
    format!(
        "none of the bootstrap nodes could be resolved or reached: {}",
        list.join(", ")
    )
}

/// An endpoint (found on the DHT) that could not be reached, as
/// [`HyperswarmTransport::dial_failures`](crate::HyperswarmTransport::dial_failures) lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DialFailure {
    /// The endpoint.
    pub addr: SocketAddr,
    /// Consecutive failures; the next try waits 1 s, 5 s, 30 s, then 120 s after each.
    pub failures: u32,
    /// The last error, e.g. [`HyperswarmError::Handshake`] with
    /// [`HandshakeFailure::NoAnswer`]: `handshake with 10.0.0.1:4000 failed: no answer within
    /// 1500 ms`.
    pub error: HyperswarmError,
}

impl fmt::Display for DialFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} failures in a row)", self.error, self.failures)
    }
}

/// Why a dial, an identify check or an incoming handshake gave no session.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DialError {
    /// This node turned the connection down itself.
    #[error("declined the connection with {addr} on this side: {reason}")]
    Declined {
        /// The remote endpoint.
        addr: SocketAddr,
        /// Why.
        reason: Declined,
    },
    /// The remote or the network failed.
    #[error(transparent)]
    Failed(#[from] HyperswarmError),
}

impl DialError {
    /// Whether this is our own refusal (max peers, a full accept queue, the topic not joined):
    /// not the address failing, so not held against it.
    pub(crate) fn is_local(&self) -> bool {
        matches!(self, DialError::Declined { .. })
    }

    pub(crate) fn declined(addr: SocketAddr, reason: Declined) -> Self {
        DialError::Declined { addr, reason }
    }

    pub(crate) fn handshake(addr: SocketAddr, cause: HandshakeFailure) -> Self {
        DialError::Failed(HyperswarmError::Handshake { addr, cause })
    }

    pub(crate) fn protocol(addr: SocketAddr, reason: impl Into<String>) -> Self {
        DialError::Failed(HyperswarmError::Protocol {
            addr,
            reason: reason.into(),
        })
    }
}

/// Why this node declined a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Declined {
    /// It has `max_peers` connections.
    #[error("this node has {max} connections (max_peers)")]
    MaxPeers {
        /// The limit.
        max: usize,
    },
    /// The application is not taking connections (its queue is full, or it left the topic).
    #[error("the application's connection queue is full (or it left the topic)")]
    QueueFull,
    /// The topic is not joined here.
    #[error("the topic is not joined here")]
    TopicNotJoined,
    /// The relay route the connection was made over went during its handshake.
    #[error("the relay route went during the handshake")]
    PathLost,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_failed_with_which_value() {
        let addr: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let e = HyperswarmError::Handshake {
            addr,
            cause: HandshakeFailure::NoAnswer {
                after: Duration::from_millis(1500),
            },
        };
        assert_eq!(
            e.to_string(),
            "handshake with 10.0.0.1:4000 failed: no answer within 1500 ms"
        );
        let e = HyperswarmError::DhtUnreachable {
            operation: "announcing",
            bootstrap: vec![
                BootstrapNode::new("127.0.0.1:6881", vec!["127.0.0.1:6881".parse().unwrap()]),
                BootstrapNode::new("router.example:6881", vec![]),
                BootstrapNode::new(
                    "two.example:1",
                    vec!["10.0.0.1:1".parse().unwrap(), "10.0.0.2:1".parse().unwrap()],
                ),
            ],
            elapsed: Duration::from_millis(213),
        };
        assert_eq!(
            e.to_string(),
            "announcing on the mainline DHT failed after 213 ms: no DHT node answered, none of \
             the bootstrap nodes could be resolved or reached: 127.0.0.1:6881, router.example:6881 \
             (not resolved to an IPv4 address), two.example:1 = 10.0.0.1:1 10.0.0.2:1"
        );
        let e = HyperswarmError::DhtUnreachable {
            operation: "looking up peers",
            bootstrap: vec![],
            elapsed: Duration::from_millis(5),
        };
        assert!(
            e.to_string().ends_with("no bootstrap nodes are configured"),
            "{e}"
        );
        let e = DialError::declined(addr, Declined::MaxPeers { max: 8 });
        assert!(e.is_local());
        assert_eq!(
            e.to_string(),
            "declined the connection with 10.0.0.1:4000 on this side: this node has 8 \
             connections (max_peers)"
        );
        assert!(!DialError::handshake(addr, HandshakeFailure::Busy).is_local());
    }
}
