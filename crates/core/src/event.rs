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
///
/// # Local and remote events
///
/// Besides the subscribers of [`subscribe`](Self::subscribe), which see every event, a hub
/// has a second channel for code that carries events to other replicas (the SyncBridge):
/// [`subscribe_local`](Self::subscribe_local) sees only the events the application published
/// with [`publish`](Self::publish), never those published with
/// [`publish_remote`](Self::publish_remote) (events that arrived from a peer, and peer
/// arrivals and departures). A bridge sends on what it reads from `subscribe_local` and
/// publishes what peers send with `publish_remote`, so an event is never sent back to where it
/// came from and never circulates, whatever the events contain and however far a subscriber
/// lags: the origin is the channel, not a guess from the event's content.
/// [`subscribe_remote`](Self::subscribe_remote) is the other half: only what came from the
/// network, e.g. for showing it.
///
/// ```
/// use pluresdb_sync_core::{SyncBroadcaster, SyncEvent};
///
/// let hub = SyncBroadcaster::new(16);
/// let mut app = hub.subscribe();
/// let mut outgoing = hub.subscribe_local();
/// let from_peer = SyncEvent::NodeUpsert { id: "n1".into() };
/// hub.publish_remote(from_peer.clone()).unwrap();
/// hub.publish(SyncEvent::NodeDelete { id: "n2".into() }).unwrap();
/// assert_eq!(app.try_recv().unwrap(), from_peer);
/// assert_eq!(app.try_recv().unwrap(), SyncEvent::NodeDelete { id: "n2".into() });
/// // Only the application's own event is there to send on.
/// assert_eq!(outgoing.try_recv().unwrap(), SyncEvent::NodeDelete { id: "n2".into() });
/// assert!(outgoing.try_recv().is_err());
/// ```
#[derive(Clone, Debug)]
pub struct SyncBroadcaster {
    /// Every event, for [`SyncBroadcaster::subscribe`].
    tx: broadcast::Sender<SyncEvent>,
    /// Events the application published, for [`SyncBroadcaster::subscribe_local`].
    local: broadcast::Sender<SyncEvent>,
    /// Events published with `publish_remote`, for [`SyncBroadcaster::subscribe_remote`].
    remote: broadcast::Sender<SyncEvent>,
    /// The capacity asked for (at least 1).
    capacity: usize,
}

impl SyncBroadcaster {
    /// A broadcaster keeping up to `capacity` events per subscriber (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let (tx, _) = broadcast::channel(capacity);
        let (local, _) = broadcast::channel(capacity);
        let (remote, _) = broadcast::channel(capacity);
        Self {
            tx,
            local,
            remote,
            capacity,
        }
    }

    /// How many events a subscriber may fall behind by before it loses some: the capacity
    /// given to [`new`](Self::new) (at least 1; tokio may keep a few more).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A new subscriber; it sees the events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<SyncEvent> {
        self.tx.subscribe()
    }

    /// A new subscriber to the events the application publishes with
    /// [`publish`](Self::publish) from now on; events published with
    /// [`publish_remote`](Self::publish_remote) never reach it. Bounded like
    /// [`subscribe`](Self::subscribe) (same capacity, `Lagged` when it falls behind).
    pub fn subscribe_local(&self) -> broadcast::Receiver<SyncEvent> {
        self.local.subscribe()
    }

    /// A new subscriber to the events published with
    /// [`publish_remote`](Self::publish_remote) from now on (what came from peers, and peer
    /// arrivals and departures); the application's own events never reach it. For showing
    /// what the network brought. Bounded like [`subscribe`](Self::subscribe).
    pub fn subscribe_remote(&self) -> broadcast::Receiver<SyncEvent> {
        self.remote.subscribe()
    }

    /// Publishes an event of the application to the [`subscribe`](Self::subscribe) and
    /// [`subscribe_local`](Self::subscribe_local) subscribers, returning how many there are.
    ///
    /// Fails (giving the event back) when there is no subscriber.
    pub fn publish(
        &self,
        event: SyncEvent,
    ) -> Result<usize, broadcast::error::SendError<SyncEvent>> {
        let local = if self.local.receiver_count() > 0 {
            self.local.send(event.clone()).unwrap_or(0)
        } else {
            0
        };
        match self.tx.send(event) {
            Ok(n) => Ok(n + local),
            Err(_) if local > 0 => Ok(local),
            Err(e) => Err(e),
        }
    }

    /// Publishes an event that did not originate here (it came from a peer, or says that a
    /// peer came or went) to the [`subscribe`](Self::subscribe) and
    /// [`subscribe_remote`](Self::subscribe_remote) subscribers, returning how many there are.
    ///
    /// Fails (giving the event back) when there is no such subscriber.
    pub fn publish_remote(
        &self,
        event: SyncEvent,
    ) -> Result<usize, broadcast::error::SendError<SyncEvent>> {
        let remote = if self.remote.receiver_count() > 0 {
            self.remote.send(event.clone()).unwrap_or(0)
        } else {
            0
        };
        match self.tx.send(event) {
            Ok(n) => Ok(n + remote),
            Err(_) if remote > 0 => Ok(remote),
            Err(e) => Err(e),
        }
    }

    /// The number of live subscribers of every kind.
    pub fn subscriber_count(&self) -> usize {
        self.tx.receiver_count() + self.local.receiver_count() + self.remote.receiver_count()
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
        assert_eq!(hub.capacity(), 1);
        assert_eq!(
            SyncBroadcaster::default().capacity(),
            DEFAULT_BROADCAST_CAPACITY
        );
        let mut rx = hub.subscribe();
        hub.publish(SyncEvent::PeerConnected {
            peer_id: "p".into(),
        })
        .unwrap();
        assert!(rx.try_recv().is_ok());
    }

    #[test]
    fn remote_events_never_reach_local_subscribers() {
        let hub = SyncBroadcaster::new(8);
        let mut all = hub.subscribe();
        let mut local = hub.subscribe_local();
        assert_eq!(hub.subscriber_count(), 2);
        let event = SyncEvent::NodeUpsert { id: "same".into() };
        assert_eq!(hub.publish_remote(event.clone()).unwrap(), 1);
        // The application publishes an identical event: it is its own, so it goes out.
        assert_eq!(hub.publish(event.clone()).unwrap(), 2);
        assert_eq!(all.try_recv().unwrap(), event);
        assert_eq!(all.try_recv().unwrap(), event);
        assert_eq!(local.try_recv().unwrap(), event);
        assert!(local.try_recv().is_err());
    }

    #[test]
    fn remote_subscribers_see_only_what_came_from_peers() {
        let hub = SyncBroadcaster::new(8);
        let mut remote = hub.subscribe_remote();
        let own = SyncEvent::NodeUpsert { id: "mine".into() };
        let theirs = SyncEvent::NodeUpsert {
            id: "theirs".into(),
        };
        // The application's own event has no receiver here: a remote subscriber never sees it.
        assert!(hub.publish(own).is_err());
        assert_eq!(hub.publish_remote(theirs.clone()).unwrap(), 1);
        assert_eq!(remote.try_recv().unwrap(), theirs);
        assert!(remote.try_recv().is_err());
        assert_eq!(hub.subscriber_count(), 1);
    }

    #[test]
    fn a_local_subscriber_alone_counts_as_a_receiver() {
        let hub = SyncBroadcaster::new(8);
        let _local = hub.subscribe_local();
        let event = SyncEvent::NodeDelete { id: "x".into() };
        assert_eq!(hub.publish(event.clone()).unwrap(), 1);
        // Nobody subscribed to everything: a remote event has no receiver.
        assert_eq!(hub.publish_remote(event.clone()).unwrap_err().0, event);
    }
}
