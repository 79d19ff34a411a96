//! The bridge's knobs, their defaults, and the builder that sets them.

use std::time::Duration;

use pluresdb_sync_core::{SyncBroadcaster, TopicHash, Transport};

use crate::SyncBridge;

/// Application messages queued for one peer before it counts as not keeping up and is
/// disconnected: 1024, a burst of small messages absorbed without waiting on the network.
pub const DEFAULT_PEER_QUEUE: usize = 1024;

/// Bytes of application messages queued for one peer before it counts as not keeping up:
/// 32 MiB, two of the largest messages (one being sent, one waiting).
pub const DEFAULT_PEER_QUEUE_BYTES: usize = 32 * 1024 * 1024;

/// Messages from peers waiting for the application's [`Messages`](crate::Messages) receiver:
/// 1024. When it is full, the bridge stops reading from the peers that send more
/// (backpressure through the transport) and keeps sending to them.
pub const DEFAULT_MESSAGE_QUEUE: usize = 1024;

/// Bytes of messages from peers waiting for the application: 64 MiB, four of the largest.
pub const DEFAULT_MESSAGE_QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// How long one send to a peer may take before the peer counts as not keeping up and is
/// disconnected (also how long [`SyncBridge::send_to`] waits for room in a peer's queue):
/// 30 s, the transports' default network timeout.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Peers one bridge keeps at once: 1024, the relay client's sessions-per-topic limit (the
/// Hyperswarm transport's own default limit, 64, is lower).
pub const DEFAULT_MAX_PEERS: usize = 1024;

/// Reports ([`BridgeEvent`](crate::BridgeEvent)s) kept for a slow reader before it sees
/// `Lagged`: 256.
pub const DEFAULT_REPORT_CAPACITY: usize = 256;

/// How long closing one connection may take (a replaced one, or every one at stop): 5 s,
/// the Hyperswarm transport's close linger (the remote acknowledges the last messages).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The settings of one bridge.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) peer_queue: usize,
    pub(crate) peer_queue_bytes: usize,
    pub(crate) message_queue: usize,
    pub(crate) message_queue_bytes: usize,
    pub(crate) send_timeout: Duration,
    pub(crate) max_peers: usize,
    pub(crate) report_capacity: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            peer_queue: DEFAULT_PEER_QUEUE,
            peer_queue_bytes: DEFAULT_PEER_QUEUE_BYTES,
            message_queue: DEFAULT_MESSAGE_QUEUE,
            message_queue_bytes: DEFAULT_MESSAGE_QUEUE_BYTES,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            max_peers: DEFAULT_MAX_PEERS,
            report_capacity: DEFAULT_REPORT_CAPACITY,
        }
    }
}

/// Builds a [`SyncBridge`] with other than the default limits. Zero counts are raised to 1.
///
/// Events have no queue of their own here: each peer reads the hub's application events
/// (`SyncBroadcaster::subscribe_local`) at its own pace, so the hub's capacity
/// ([`SyncBroadcaster::new`]) is how far a peer may fall behind before it is disconnected.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> anyhow::Result<()> {
/// use std::time::Duration;
/// use pluresdb_sync_bridge::SyncBridge;
/// use pluresdb_sync_core::{derive_topic, SyncBroadcaster};
/// use pluresdb_sync_transport_disabled::DisabledTransport;
///
/// let bridge = SyncBridge::builder()
///     .peer_queue(64)
///     .send_timeout(Duration::from_secs(5))
///     .start(Box::new(DisabledTransport::new()), derive_topic("db"), SyncBroadcaster::default())
///     .await?;
/// bridge.stop().await
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct SyncBridgeBuilder {
    settings: Settings,
}

impl SyncBridgeBuilder {
    /// Application messages queued per peer [default: [`DEFAULT_PEER_QUEUE`]].
    pub fn peer_queue(mut self, messages: usize) -> Self {
        self.settings.peer_queue = messages.max(1);
        self
    }

    /// Bytes of application messages queued per peer [default: [`DEFAULT_PEER_QUEUE_BYTES`]].
    pub fn peer_queue_bytes(mut self, bytes: usize) -> Self {
        self.settings.peer_queue_bytes = bytes.max(1);
        self
    }

    /// Messages from peers waiting for the application [default: [`DEFAULT_MESSAGE_QUEUE`]].
    pub fn message_queue(mut self, messages: usize) -> Self {
        self.settings.message_queue = messages.max(1);
        self
    }

    /// Bytes of messages from peers waiting for the application [default:
    /// [`DEFAULT_MESSAGE_QUEUE_BYTES`]]. A larger single message still passes, alone.
    pub fn message_queue_bytes(mut self, bytes: usize) -> Self {
        self.settings.message_queue_bytes = bytes.max(1);
        self
    }

    /// The longest one send to a peer may take [default: [`DEFAULT_SEND_TIMEOUT`]].
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.settings.send_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Peers kept at once; connections beyond are refused [default: [`DEFAULT_MAX_PEERS`]].
    pub fn max_peers(mut self, peers: usize) -> Self {
        self.settings.max_peers = peers.max(1);
        self
    }

    /// Reports kept for a slow reader [default: [`DEFAULT_REPORT_CAPACITY`]].
    pub fn report_capacity(mut self, reports: usize) -> Self {
        self.settings.report_capacity = reports.max(1);
        self
    }

    /// Joins `topic` on `transport` and starts bridging `hub` to every peer there.
    pub async fn start(
        self,
        transport: Box<dyn Transport>,
        topic: TopicHash,
        hub: SyncBroadcaster,
    ) -> anyhow::Result<SyncBridge> {
        SyncBridge::start_with(self.settings, transport, topic, hub).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_raised_to_one() {
        let b = SyncBridgeBuilder::default()
            .peer_queue(0)
            .peer_queue_bytes(0)
            .message_queue(0)
            .message_queue_bytes(0)
            .max_peers(0)
            .report_capacity(0)
            .send_timeout(Duration::ZERO);
        let s = b.settings;
        assert_eq!(
            (
                s.peer_queue,
                s.peer_queue_bytes,
                s.message_queue,
                s.message_queue_bytes,
                s.max_peers,
                s.report_capacity
            ),
            (1, 1, 1, 1, 1, 1)
        );
        assert_eq!(s.send_timeout, Duration::from_millis(1));
        assert_eq!(Settings::default().peer_queue, DEFAULT_PEER_QUEUE);
    }
}
