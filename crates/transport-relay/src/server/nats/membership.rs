//! What a node tells the bus and learns from it about rooms: its members joining and leaving,
//! the other nodes' members (asked for once per room, then kept current), and the traffic it
//! publishes for them.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::bus::{self, BusMessage};
use super::{NATS_MAX_NODES, NATS_PUBLISH_TIMEOUT, Nats, RemoteRoom, loops, node_of};
use crate::protocol::{ConnId, Frame, RelayFrame, RoomId};

impl Nats {
    /// A local connection joined `room`: follow the room (asking the other nodes for their
    /// members the first time), announce the member, return the members on other nodes.
    pub(crate) async fn join(self: &Arc<Self>, room: RoomId, conn: ConnId) -> Vec<ConnId> {
        let existing = {
            let mut rooms = self.rooms();
            match rooms.get(&room) {
                Some(r) => Ok(r.ready.clone()),
                None => {
                    let (tx, rx) = watch::channel(false);
                    rooms.insert(
                        room,
                        RemoteRoom {
                            members: HashSet::new(),
                            ready: rx,
                            task: None,
                        },
                    );
                    Err(tx)
                }
            }
        };
        match existing {
            Ok(mut ready) => {
                self.announce(room, conn).await;
                let wait = self.membership_wait * 4;
                let _ = tokio::time::timeout(wait, ready.wait_for(|v| *v)).await;
            }
            Err(tx) => {
                self.follow(room, conn).await;
                let _ = tx.send(true);
            }
        }
        self.rooms()
            .get(&room)
            .map(|r| r.members.iter().copied().collect())
            .unwrap_or_default()
    }

    async fn announce(&self, room: RoomId, conn: ConnId) {
        let announce = BusMessage::MemberJoined { room, conn }.encode();
        self.publish(self.room_subject(&room), announce.into())
            .await;
    }

    /// Subscribes to the room, announces `conn` and collects the other nodes' members.
    async fn follow(self: &Arc<Self>, room: RoomId, conn: ConnId) {
        let sub = match self.client.subscribe(self.room_subject(&room)).await {
            Ok(s) => s,
            Err(e) => {
                self.metrics.publish_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot subscribe to a room on NATS");
                return;
            }
        };
        let task = tokio::spawn(loops::room(Arc::downgrade(self), room, sub)).abort_handle();
        match self.rooms().get_mut(&room) {
            Some(r) => r.task = Some(task),
            None => {
                // Everyone left while subscribing.
                task.abort();
                return;
            }
        }
        let inbox = self.client.new_inbox();
        let mut replies = match self.client.subscribe(inbox.clone()).await {
            Ok(s) => s,
            Err(e) => {
                self.metrics.publish_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot subscribe to a NATS inbox");
                return;
            }
        };
        // The server has our subscriptions before anyone can answer or announce.
        let _ = tokio::time::timeout(NATS_PUBLISH_TIMEOUT, self.client.flush()).await;
        // Announce before asking, so a node asking at the same moment either gets our answer
        // or our announcement.
        self.announce(room, conn).await;
        let ask = BusMessage::MembersQuery { room }.encode();
        self.publish_with_reply(self.room_subject(&room), Some(inbox), ask.into())
            .await;
        let deadline = Instant::now() + self.membership_wait;
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, replies.next()).await {
            self.metrics.received.fetch_add(1, Ordering::Relaxed);
            match bus::decode(&msg.payload) {
                Ok(BusMessage::Members { room: r, conns }) if r == room => {
                    self.learn(room, &conns, false).await;
                }
                _ => {
                    self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Adds remote members; with `notify`, tells local members (PEER_JOINED).
    pub(super) async fn learn(&self, room: RoomId, peers: &[ConnId], notify: bool) {
        let mut new = Vec::new();
        {
            let mut rooms = self.rooms();
            let Some(r) = rooms.get_mut(&room) else {
                return;
            };
            for &p in peers {
                if node_of(p) == self.node || node_of(p) == 0 {
                    continue;
                }
                if r.members.len() >= self.max_peers {
                    self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if r.members.insert(p) {
                    new.push(p);
                }
            }
        }
        {
            // A node we learned members of is watched even if we never heard it beat, so its
            // members are forgotten when it stays silent.
            let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            for p in &new {
                if nodes.len() < NATS_MAX_NODES {
                    nodes.entry(node_of(*p)).or_insert_with(Instant::now);
                }
            }
        }
        if notify {
            for p in new {
                let f = Frame::Relay(RelayFrame::PeerJoined { room, peer: p }).encode();
                self.local.notify_room(&room, &f).await;
            }
        }
    }

    /// Removes a remote member and tells local members (PEER_LEFT).
    pub(super) async fn forget(&self, room: RoomId, peer: ConnId) {
        let removed = self
            .rooms()
            .get_mut(&room)
            .is_some_and(|r| r.members.remove(&peer));
        if removed {
            let f = Frame::Relay(RelayFrame::PeerLeft { room, peer }).encode();
            self.local.notify_room(&room, &f).await;
        }
    }

    /// A local connection left `room`; `last` when no local member remained.
    pub(crate) async fn leave(&self, room: RoomId, conn: ConnId, last: bool) {
        let notice = BusMessage::MemberLeft { room, conn }.encode();
        self.publish(self.room_subject(&room), notice.into()).await;
        if !last {
            return;
        }
        // Under the local registry's lock (always taken before ours), so a connection joining
        // meanwhile either keeps the room followed or follows it anew.
        let removed = self
            .local
            .if_absent(&room, || self.rooms().remove(&room))
            .flatten();
        // Aborting the task drops the subscriber, which unsubscribes.
        if let Some(t) = removed.and_then(|r| r.task) {
            t.abort();
        }
    }

    /// Whether `conn` is known as a member of `room` on another node.
    pub(crate) fn is_remote_member(&self, room: &RoomId, conn: ConnId) -> bool {
        self.rooms()
            .get(room)
            .is_some_and(|r| r.members.contains(&conn))
    }

    /// Members of `room` on other nodes.
    pub(crate) fn remote_count(&self, room: &RoomId) -> usize {
        self.rooms().get(room).map_or(0, |r| r.members.len())
    }

    /// Publishes a DELIVER frame to one connection on another node.
    pub(crate) async fn send_to(&self, to: ConnId, deliver: Bytes) -> bool {
        self.publish(self.conn_subject(to), deliver).await
    }

    /// Publishes a broadcast DELIVER frame to the other nodes in the room.
    pub(crate) async fn broadcast(&self, room: &RoomId, deliver: Bytes) -> bool {
        self.publish(self.room_subject(room), deliver).await
    }
}
