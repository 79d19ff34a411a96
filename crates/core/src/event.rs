//! Sync events and the in-process broadcaster that fans them out.

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Something that happened to the replicated database or its peers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncEvent {
    /// A node was inserted or updated.
    NodeUpsert {
        /// The node's id.
        id: String,
    },
    /// A node was deleted.
    NodeDelete {
        /// The node's id.
        id: String,
    },
    /// A peer connected.
    PeerConnected {
        /// The peer's id.
        peer_id: String,
    },
    /// A peer disconnected.
    PeerDisconnected {
        /// The peer's id.
        peer_id: String,
    },
}

/// The capacity of [`SyncBroadcaster::default`]: events a slow subscriber may fall behind by
/// before it starts losing the oldest ones (it then sees `RecvError::Lagged`).
pub const DEFAULT_BROADCAST_CAPACITY: usize = 1024;

/// A lightweight pub/sub hub for [`SyncEvent`]s (a bounded tokio broadcast channel).
///
/// Memory is bounded by the capacity: a subscriber that falls more than `capacity` events
/// behind loses the oldest and is told how many it missed.
///
/// ```
/// use pluresdb_sync_core::{SyncBroadcaster, SyncEvent};
///
/// let hub = SyncBroadcaster::new(16);
/// let mut rx = hub.subscribe();
/// let event = SyncEvent::NodeUpsert { id: "n1".into() };
/// assert_eq!(hub.publish(event.clone()).unwrap(), 1);
/// assert_eq!(rx.try_recv().unwrap(), event);
/// ```
#[derive(Clone, Debug)]
pub struct SyncBroadcaster {
    tx: broadcast::Sender<SyncEvent>,
}

impl SyncBroadcaster {
    /// A broadcaster keeping up to `capacity` events per subscriber (at least 1).
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self { tx }
    }

    /// A new subscriber; it sees the events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<SyncEvent> {
        self.tx.subscribe()
    }

    /// Publishes an event to every subscriber, returning how many there are.
    ///
    /// Fails (giving the event back) when there is no subscriber.
    pub fn publish(
        &self,
        event: SyncEvent,
    ) -> Result<usize, broadcast::error::SendError<SyncEvent>> {
        self.tx.send(event)
    }

    /// The number of live subscribers.
    pub fn subscriber_count(&self) -> usize {
        self.tx.receiver_count()
    }
}

impl Default for SyncBroadcaster {
    fn default() -> Self {
        Self::new(DEFAULT_BROADCAST_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::broadcast::error::RecvError;

    #[test]
    fn publish_without_subscribers_is_an_error() {
        let hub = SyncBroadcaster::default();
        let event = SyncEvent::NodeDelete { id: "x".into() };
        let err = hub.publish(event.clone()).unwrap_err();
        assert_eq!(err.0, event);
    }

    #[tokio::test]
    async fn fan_out_and_lag() {
        let hub = SyncBroadcaster::new(2);
        let mut a = hub.subscribe();
        let mut b = hub.subscribe();
        assert_eq!(hub.subscriber_count(), 2);
        for i in 0..3 {
            assert_eq!(
                hub.publish(SyncEvent::NodeUpsert { id: i.to_string() })
                    .unwrap(),
                2
            );
        }
        // `a` fell behind by one: told so, then gets the newest two.
        assert!(matches!(a.recv().await, Err(RecvError::Lagged(1))));
        assert_eq!(
            a.recv().await.unwrap(),
            SyncEvent::NodeUpsert { id: "1".into() }
        );
        assert_eq!(
            a.recv().await.unwrap(),
            SyncEvent::NodeUpsert { id: "2".into() }
        );
        drop(hub);
        assert!(matches!(b.recv().await, Err(RecvError::Lagged(1))));
        b.recv().await.unwrap();
        b.recv().await.unwrap();
        assert!(matches!(b.recv().await, Err(RecvError::Closed)));
    }

    #[test]
    fn zero_capacity_is_clamped() {
        let hub = SyncBroadcaster::new(0);
        let mut rx = hub.subscribe();
        hub.publish(SyncEvent::PeerConnected {
            peer_id: "p".into(),
        })
        .unwrap();
        assert!(rx.try_recv().is_ok());
    }
}
