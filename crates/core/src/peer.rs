//! Peers: who is on a topic.

use serde::{Deserialize, Serialize};

/// A peer's identity: the lowercase hex of its Noise static public key (64 hex digits).
pub type PeerId = String;

/// A peer found on a topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer's id.
    pub id: PeerId,
    /// Where it can be reached, when the transport knows (`ip:port` for Hyperswarm mode).
    pub address: Option<String>,
    /// Whether this transport holds an open connection to it.
    pub connected: bool,
}
