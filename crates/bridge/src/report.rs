//! What a bridge tells its application: reports as they happen, and counters on demand.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use pluresdb_sync_core::PeerId;

use crate::envelope::EnvelopeError;

/// Something that happened to a bridge's links, from [`SyncBridge::reports`](crate::SyncBridge::reports).
///
/// The hub gets `PeerConnected` / `PeerDisconnected` too; reports add why, and what went wrong
/// without ending a link.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BridgeEvent {
    /// A new peer is linked (the hub got `PeerConnected`).
    PeerConnected {
        /// The peer.
        peer_id: PeerId,
    },
    /// A linked peer's connection was replaced by a new one from the same peer (it
    /// reconnected); no new `PeerConnected`.
    ConnectionReplaced {
        /// The peer.
        peer_id: PeerId,
    },
    /// A peer's link ended (the hub got `PeerDisconnected`).
    PeerDisconnected {
        /// The peer.
        peer_id: PeerId,
        /// Why.
        reason: DisconnectReason,
    },
    /// A connection was refused: the bridge holds its maximum of peers.
    PeerRefused {
        /// The peer.
        peer_id: PeerId,
        /// The limit ([`SyncBridgeBuilder::max_peers`](crate::SyncBridgeBuilder::max_peers)).
        max_peers: usize,
    },
    /// A peer sent a message that is not a valid envelope; it was dropped, the link stays.
    BadFrame {
        /// The peer.
        peer_id: PeerId,
        /// What is wrong with it.
        error: EnvelopeError,
    },
    /// A message from a peer was dropped because the application has no message receiver
    /// (it never took [`SyncBridge::messages`](crate::SyncBridge::messages), or dropped it).
    MessageDropped {
        /// The peer.
        peer_id: PeerId,
        /// The message's length.
        len: usize,
    },
    /// An event the application published could not be sent to a peer (its id is longer than
    /// the event codec carries).
    EventNotSent {
        /// The peer.
        peer_id: PeerId,
        /// Why.
        error: EnvelopeError,
    },
    /// The transport yields no more connections (it was disconnected; at once for the
    /// disabled transport). Linked peers stay until they leave.
    TransportEnded,
}

/// Why a peer's link ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The peer closed the connection (or left the topic).
    Closed,
    /// The connection failed.
    Failed {
        /// The transport's error.
        error: String,
    },
    /// The peer did not keep up and was disconnected.
    Cut(CutReason),
    /// This bridge stopped.
    Stopped,
}

/// How a peer failed to keep up.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CutReason {
    /// It fell so far behind the hub's events that it missed `missed` of them (the hub's
    /// capacity bounds how far behind a peer may be).
    Lagged {
        /// Events it would have missed.
        missed: u64,
    },
    /// Its queue of application messages was full.
    QueueFull {
        /// Messages queued.
        queued: usize,
        /// Bytes queued.
        bytes: usize,
    },
    /// One send to it took longer than the send timeout.
    SendTimeout {
        /// The timeout, in milliseconds.
        ms: u64,
    },
}

impl fmt::Display for CutReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Lagged { missed } => write!(f, "it fell {missed} events behind"),
            Self::QueueFull { queued, bytes } => write!(
                f,
                "its message queue is full ({queued} messages, {bytes} bytes)"
            ),
            Self::SendTimeout { ms } => write!(f, "a send took longer than {ms} ms"),
        }
    }
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed => f.write_str("closed"),
            Self::Failed { error } => write!(f, "failed: {error}"),
            Self::Cut(why) => write!(f, "cut, not keeping up: {why}"),
            Self::Stopped => f.write_str("bridge stopped"),
        }
    }
}

impl fmt::Display for BridgeEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PeerConnected { peer_id } => write!(f, "peer {peer_id} connected"),
            Self::ConnectionReplaced { peer_id } => {
                write!(
                    f,
                    "peer {peer_id} reconnected; its new connection replaced the old"
                )
            }
            Self::PeerDisconnected { peer_id, reason } => {
                write!(f, "peer {peer_id} disconnected ({reason})")
            }
            Self::PeerRefused { peer_id, max_peers } => {
                write!(f, "peer {peer_id} refused: already {max_peers} peers")
            }
            Self::BadFrame { peer_id, error } => {
                write!(f, "dropped a bad message from peer {peer_id}: {error}")
            }
            Self::MessageDropped { peer_id, len } => write!(
                f,
                "dropped a {len}-byte message from peer {peer_id}: no message receiver"
            ),
            Self::EventNotSent { peer_id, error } => {
                write!(f, "an event could not be sent to peer {peer_id}: {error}")
            }
            Self::TransportEnded => f.write_str("the transport yields no more connections"),
        }
    }
}

/// A bridge's counters since it started, from [`SyncBridge::status`](crate::SyncBridge::status).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BridgeStatus {
    /// Peers linked now.
    pub peers: usize,
    /// Events sent (one per event per peer).
    pub events_sent: u64,
    /// Events received from peers and published on the hub.
    pub events_received: u64,
    /// Application messages sent (one per message per peer).
    pub messages_sent: u64,
    /// Application messages received from peers and queued for the application.
    pub messages_received: u64,
    /// Messages from peers dropped for want of a receiver.
    pub messages_dropped: u64,
    /// Invalid envelopes received (and dropped).
    pub bad_frames: u64,
    /// Peers cut for not keeping up.
    pub peers_cut: u64,
    /// Connections that replaced a linked peer's connection.
    pub replaced: u64,
}

/// The live counters behind [`BridgeStatus`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) events_sent: AtomicU64,
    pub(crate) events_received: AtomicU64,
    pub(crate) messages_sent: AtomicU64,
    pub(crate) messages_received: AtomicU64,
    pub(crate) messages_dropped: AtomicU64,
    pub(crate) bad_frames: AtomicU64,
    pub(crate) peers_cut: AtomicU64,
    pub(crate) replaced: AtomicU64,
}

/// Adds one to a counter.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// A snapshot, with `peers` linked now.
    pub(crate) fn status(&self, peers: usize) -> BridgeStatus {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BridgeStatus {
            peers,
            events_sent: get(&self.events_sent),
            events_received: get(&self.events_received),
            messages_sent: get(&self.messages_sent),
            messages_received: get(&self.messages_received),
            messages_dropped: get(&self.messages_dropped),
            bad_frames: get(&self.bad_frames),
            peers_cut: get(&self.peers_cut),
            replaced: get(&self.replaced),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_read_as_sentences() {
        let cut = BridgeEvent::PeerDisconnected {
            peer_id: "ab12".into(),
            reason: DisconnectReason::Cut(CutReason::QueueFull {
                queued: 3,
                bytes: 99,
            }),
        };
        assert_eq!(
            cut.to_string(),
            "peer ab12 disconnected (cut, not keeping up: its message queue is full \
             (3 messages, 99 bytes))"
        );
        let bad = BridgeEvent::BadFrame {
            peer_id: "ab12".into(),
            error: EnvelopeError::UnknownKind(7),
        };
        assert!(
            bad.to_string().contains("unknown envelope kind 0x07"),
            "{bad}"
        );
        assert_eq!(
            CutReason::Lagged { missed: 5 }.to_string(),
            "it fell 5 events behind"
        );
    }

    #[test]
    fn counters_snapshot() {
        let c = Counters::default();
        bump(&c.events_sent);
        bump(&c.events_sent);
        bump(&c.peers_cut);
        let s = c.status(2);
        assert_eq!((s.peers, s.events_sent, s.peers_cut), (2, 2, 1));
        assert_eq!(s.messages_sent, 0);
    }
}
