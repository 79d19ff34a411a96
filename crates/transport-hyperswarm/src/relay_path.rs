//! A relay as one more path for the node's QUIC packets, and one more discovery source (Auto
//! mode). The node knows nothing of relay protocols: whoever adds a relay implements
//! [`RelayPath`] (the `pluresdb-sync-transport-auto` crate does, over the relay client's
//! datagram link) and hands it to [`HyperswarmTransportBuilder::relay_path`]. The node then
//! joins each topic's room through it, dials the members it reports through the same
//! dialer, QUIC + Noise handshake, topic proof and one-connection-per-peer rule as peers
//! found on the DHT, and the data socket carries the packets of those connections as relay
//! datagrams (each relayed peer has a virtual address quinn sees as its address).
//!
//! [`HyperswarmTransportBuilder::relay_path`]: crate::HyperswarmTransportBuilder::relay_path

use std::fmt;
use std::task::{Context, Poll};

use pluresdb_sync_core::TopicHash;

/// Where a relayed peer is reached: the relay socket (`link`, a number the path never
/// reuses, so that a route through a socket that is gone never aliases a new one), the room
/// both joined, and the peer's relay connection id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayRoute {
    /// The relay socket's number.
    pub link: u64,
    /// The room (a hash of the topic).
    pub room: [u8; 32],
    /// The peer's relay connection id.
    pub conn: u64,
}

/// Datagrams received through the relay from one route: one (`segment == 0`) or several of
/// `segment` bytes each (the last may be shorter), as the sender's batch was cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayDatagram {
    /// Who sent them.
    pub from: RelayRoute,
    /// The size of each datagram but the last; 0: `bytes` is one datagram.
    pub segment: usize,
    /// The datagrams (a view of the received frame, not a copy).
    pub bytes: bytes::Bytes,
}

/// What the relay path tells the node, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayEvent {
    /// A relay socket is up (`url` without credentials).
    Connected {
        /// The socket's number.
        link: u64,
        /// The relay.
        url: String,
        /// Our relay connection id on it (told to peers of connections made directly, so
        /// they can fall back to the relay route to us).
        me: u64,
    },
    /// `topic`'s room is joined on socket `link`; `members` were in it already.
    Joined {
        /// The socket.
        link: u64,
        /// The topic.
        topic: TopicHash,
        /// The routes to the members.
        members: Vec<RelayRoute>,
    },
    /// A member joined `topic`'s room.
    MemberJoined {
        /// The topic.
        topic: TopicHash,
        /// The route to it.
        route: RelayRoute,
    },
    /// A member left `topic`'s room (or lost its relay socket): its route is gone.
    MemberLeft {
        /// The topic.
        topic: TopicHash,
        /// The route that is gone.
        route: RelayRoute,
    },
    /// The relay refused to join `topic`'s room.
    JoinRefused {
        /// The topic.
        topic: TopicHash,
        /// Why (for logs).
        reason: String,
    },
    /// Relay socket `link` is gone, and every route through it.
    Disconnected {
        /// The socket.
        link: u64,
        /// Why (for logs).
        reason: String,
    },
}

/// A relay the node can send QUIC packets through and meet peers on. Implementations never
/// block and never wait: [`send`](RelayPath::send) drops what does not fit, like a full UDP
/// socket buffer (QUIC recovers), and the polls register the waker like any `poll_*`.
pub trait RelayPath: fmt::Debug + Send + Sync + 'static {
    /// Joins `topic`'s room (idempotent); members arrive as [`RelayEvent`]s.
    fn join(&self, topic: &TopicHash);

    /// Sends datagrams to `to`: one (`segment == 0`) or several of `segment` bytes each, the
    /// last possibly shorter (a GSO batch). `false` when any was dropped.
    fn send(&self, to: &RelayRoute, segment: usize, datagrams: &[u8]) -> bool;

    /// The next received datagrams (`Ready(None)`: the path is closed).
    fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<RelayDatagram>>;

    /// The next event (`Ready(None)`: the path is closed).
    fn poll_event(&self, cx: &mut Context<'_>) -> Poll<Option<RelayEvent>>;

    /// Leaves every room and closes the relay socket.
    fn close(&self);

    /// The relay URL of socket `link`, while it is up (for logs and peer listings).
    fn url(&self, link: u64) -> Option<String>;
}

/// Counters of the data socket's two paths (diagnostics; see
/// [`HyperswarmTransport::path_stats`](crate::HyperswarmTransport::path_stats)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PathStats {
    /// Packets (or GSO batches) handed to the relay path.
    pub relayed_out: u64,
    /// Packet batches received from the relay path and handed to QUIC.
    pub relayed_in: u64,
    /// Packets neither sent nor read over UDP because direct UDP is off.
    pub direct_blocked: u64,
    /// Packets for a virtual address without a route, and relay datagrams that could not be
    /// handed to QUIC.
    pub unroutable: u64,
    /// Packets (or GSO batches) of connections made through the relay that went over UDP to
    /// the peer's proven direct endpoint instead (the connection upgraded), and their bytes.
    pub upgraded_out: u64,
    /// See [`upgraded_out`](Self::upgraded_out).
    pub upgraded_out_bytes: u64,
    /// UDP packet batches from a proven direct endpoint handed to QUIC as the relay-made
    /// connection's, and their bytes.
    pub upgraded_in: u64,
    /// See [`upgraded_in`](Self::upgraded_in).
    pub upgraded_in_bytes: u64,
    /// Packets (or batches) also sent through the relay because the direct path they went
    /// on was suspect (unanswered for a moment; QUIC drops the duplicate copies).
    pub doubled_out: u64,
    /// Now (not a counter): the relay routes adopted by connections made directly, i.e.
    /// how many of those can fall back to the relay when their direct path dies (their
    /// peers shared a relay room with this node and told each other their routes).
    pub fallback_routes: u64,
}

/// Which way a connection's packets go now.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PeerPath {
    /// Over UDP to this address of the peer.
    Direct(std::net::SocketAddr),
    /// Through the relay at `url` (without credentials; `(gone)` once its socket is lost).
    Relayed {
        /// The relay.
        url: String,
    },
}

impl fmt::Display for PeerPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerPath::Direct(addr) => write!(f, "direct {addr}"),
            PeerPath::Relayed { url } => write!(f, "relayed via {url}"),
        }
    }
}

/// A connection's current path: listed by
/// [`HyperswarmTransport::paths`](crate::HyperswarmTransport::paths), and sent to
/// [`HyperswarmTransport::path_events`](crate::HyperswarmTransport::path_events) receivers
/// when a connection is handed to the application and each time its path changes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PathInfo {
    /// The peer.
    pub peer_id: String,
    /// The topic of the connection.
    pub topic: TopicHash,
    /// The path.
    pub path: PeerPath,
}

/// An address where a peer proved its key in a handshake.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PeerAddress {
    /// Directly over UDP.
    Direct(std::net::SocketAddr),
    /// Through a relay: `relay <url> connection <id>`.
    Relayed(String),
}
