//! Errors of the application-facing calls of a bridge.

use crate::envelope::EnvelopeError;
use crate::report::CutReason;

/// Why [`SyncBridge::send_to`](crate::SyncBridge::send_to) or
/// [`SyncBridge::broadcast`](crate::SyncBridge::broadcast) did not queue a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BridgeError {
    /// No link to that peer (never connected, or gone).
    #[error("peer {peer_id} is not connected")]
    NotConnected {
        /// The peer asked for.
        peer_id: String,
    },
    /// The message cannot be put in an envelope (it is too large).
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The peer's queue was full: it is being disconnected, and the message was not queued.
    #[error("peer {peer_id} is not keeping up ({reason}); it is being disconnected")]
    PeerTooSlow {
        /// The peer.
        peer_id: String,
        /// Its queue when it was cut.
        reason: CutReason,
    },
}
