//! The registry of one node's rooms (room → its local members) and the routing of frames to
//! members: every queueing to a member, from a local sender or from the NATS bus, goes through
//! [`Rooms::queue`], its memory budget and its slow-consumer rule.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::budget::{Budget, Queue, Refused};
use super::metrics::{DropReason, Metrics};
use super::outbox::Batch;
use crate::protocol::{ConnId, RoomId, close_code};

/// Where a connection's close code and reason are set, once, by whoever ends it.
pub(super) type Kill = Arc<watch::Sender<Option<(u16, String)>>>;

/// Asks a connection to close with `code` and `reason`; the first request wins.
pub(super) fn kill(k: &watch::Sender<Option<(u16, String)>>, code: u16, reason: String) {
    k.send_if_modified(|slot| {
        if slot.is_none() {
            *slot = Some((code, reason));
            true
        } else {
            false
        }
    });
}

/// A member of a room, as other connections see it: its writer's queue, what the budget
/// knows of it, its kill switch, and whether it speaks `pluresdb-relay.v2` (only those
/// receive datagrams).
#[derive(Clone, Debug)]
pub(super) struct Member {
    pub(super) tx: mpsc::Sender<Batch>,
    pub(super) queue: Arc<Queue>,
    pub(super) kill: Kill,
    pub(super) datagrams: bool,
}

/// What a JOIN did to the registry.
pub(super) enum Joined {
    /// The connection is a member now: the ids already there, and those members.
    Joined(Vec<ConnId>, Vec<Member>),
    /// The room is full: it has this many members (local plus remote).
    Full(usize),
}

/// The rooms with at least one local member. A room goes away with its last member.
#[derive(Debug)]
pub(super) struct Rooms {
    map: Mutex<HashMap<RoomId, HashMap<ConnId, Member>>>,
    metrics: Arc<Metrics>,
    budget: Budget,
    slow_consumer_timeout: Duration,
    send_queue_frames: usize,
}

impl Rooms {
    pub(super) fn new(
        metrics: Arc<Metrics>,
        budget: Budget,
        slow_consumer_timeout: Duration,
        send_queue_frames: usize,
    ) -> Self {
        Self {
            map: Mutex::default(),
            metrics,
            budget,
            slow_consumer_timeout,
            send_queue_frames,
        }
    }

    /// The memory budget every queue is charged to.
    pub(super) fn budget(&self) -> &Budget {
        &self.budget
    }

    /// How long an operation that queues to one or more members may wait in total, from now:
    /// a full receiver stalls its sender at most this long, however many receivers are full.
    pub(super) fn deadline(&self) -> Instant {
        Instant::now() + self.slow_consumer_timeout
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<RoomId, HashMap<ConnId, Member>>> {
        // A panic while holding the lock cannot leave the map inconsistent in a way that
        // matters more than losing the relay, so poisoning is ignored.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The server's counters.
    pub(super) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Rooms with at least one local member.
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Adds `id` to `room` unless the room already has `max_peers` members, counting
    /// `remote` members on other nodes.
    pub(super) fn join(
        &self,
        room: RoomId,
        id: ConnId,
        me: &Member,
        remote: usize,
        max_peers: usize,
    ) -> Joined {
        let mut rooms = self.lock();
        let members = rooms.entry(room).or_default();
        let total = members.len() + remote;
        if total >= max_peers {
            if members.is_empty() {
                rooms.remove(&room);
            }
            return Joined::Full(total);
        }
        let peers = members.keys().copied().collect();
        let others = members.values().cloned().collect();
        members.insert(id, me.clone());
        Joined::Joined(peers, others)
    }

    /// Removes `id` from `room`: the remaining members, and whether it was the last one.
    /// `None` when the room does not exist.
    pub(super) fn leave(&self, room: &RoomId, id: ConnId) -> Option<(Vec<Member>, bool)> {
        let mut rooms = self.lock();
        let members = rooms.get_mut(room)?;
        members.remove(&id);
        let others = members.values().cloned().collect();
        let last = members.is_empty();
        if last {
            rooms.remove(room);
        }
        Some((others, last))
    }

    /// Runs `f` under the registry's lock if `room` has no local member. The lock is taken
    /// before any lock `f` takes (the NATS cache's), never after.
    pub(super) fn if_absent<R>(&self, room: &RoomId, f: impl FnOnce() -> R) -> Option<R> {
        let rooms = self.lock();
        (!rooms.contains_key(room)).then(f)
    }

    /// Local member `to` of `room`.
    pub(super) fn member(&self, room: &RoomId, to: ConnId) -> Option<Member> {
        self.lock().get(room).and_then(|r| r.get(&to)).cloned()
    }

    /// The local members of `room` except `except`.
    pub(super) fn others(&self, room: &RoomId, except: ConnId) -> Vec<Member> {
        self.lock()
            .get(room)
            .map(|r| {
                r.iter()
                    .filter(|(id, _)| **id != except)
                    .map(|(_, m)| m.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn all(&self, room: &RoomId) -> Vec<Member> {
        self.lock()
            .get(room)
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The ids of the local members of `room`.
    pub(super) fn local_members(&self, room: &RoomId) -> Vec<ConnId> {
        self.lock()
            .get(room)
            .map(|r| r.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Queues frames to a member, charging them to its queue and the memory budget; closes
    /// that member (4009) if its queue stays full for the slow-consumer timeout or until
    /// `deadline`, or (4010) if the budget stays short. Whether the frames were queued.
    pub(super) async fn queue(&self, to: &Member, frames: Batch, deadline: Instant) -> bool {
        let cost = frames.cost();
        // The common case needs no timer.
        if !self.budget.try_charge(&to.queue, cost) {
            match self.budget.charge(&to.queue, cost, deadline).await {
                Ok(()) => {}
                Err(Refused::Closed) => return false,
                Err(Refused::SlowConsumer) => return self.slow_consumer(to),
                Err(Refused::OverBudget) => {
                    self.metrics.dropped(DropReason::MemoryBudget);
                    kill(
                        &to.kill,
                        close_code::OVER_BUDGET,
                        "the relay's budget for queued frames stayed used up".into(),
                    );
                    return false;
                }
            }
        }
        let frames = match to.tx.try_send(frames) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return self.unqueued(to, cost),
            Err(mpsc::error::TrySendError::Full(m)) => m,
        };
        let until = deadline.min(to.queue.full(Instant::now()) + self.slow_consumer_timeout);
        match tokio::time::timeout_at(until, to.tx.send(frames)).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => self.unqueued(to, cost),
            Err(_) => {
                self.unqueued(to, cost);
                self.slow_consumer(to)
            }
        }
    }

    /// Queues a small frame of the connection's own (WELCOME, PING) if it fits now.
    pub(super) fn try_queue(&self, to: &Member, frames: Batch) -> bool {
        let cost = frames.cost();
        if !self.budget.try_charge(&to.queue, cost) {
            return false;
        }
        to.tx.try_send(frames).is_ok() || self.unqueued(to, cost)
    }

    /// Gives back the charge of frames that were not queued after all; `false`.
    fn unqueued(&self, to: &Member, cost: u32) -> bool {
        to.queue.refund(cost);
        false
    }

    /// Closes `to` as a slow consumer (4009); `false`.
    fn slow_consumer(&self, to: &Member) -> bool {
        self.metrics.dropped(DropReason::SlowConsumer);
        kill(
            &to.kill,
            close_code::SLOW_CONSUMER,
            format!(
                "send queue full ({} frames or {} bytes) for {} ms",
                self.send_queue_frames,
                self.budget.per_connection(),
                self.slow_consumer_timeout.as_millis()
            ),
        );
        false
    }

    /// Sends a membership notice from the bus to every local member of `room`.
    pub(super) async fn notify_room(&self, room: &RoomId, frame: &[u8]) {
        let frame = Batch::one(frame);
        let deadline = self.deadline();
        for m in self.all(room) {
            self.queue(&m, frame.clone(), deadline).await;
        }
    }

    /// Forwards a broadcast DELIVER from another node to every local member of `room`.
    pub(super) async fn forward_room(&self, room: &RoomId, frame: &[u8]) {
        let batch = Batch::one(frame);
        let deadline = self.deadline();
        for m in self.all(room) {
            if self.queue(&m, batch.clone(), deadline).await {
                self.metrics.forwarded(1, frame.len());
            }
        }
    }

    /// Forwards a direct DELIVER from another node to local connection `to`, if it is in
    /// `room`. Whether it was queued.
    pub(super) async fn forward_one(&self, room: &RoomId, to: ConnId, frame: &[u8]) -> bool {
        let Some(t) = self.member(room, to) else {
            return false;
        };
        let ok = self.queue(&t, Batch::one(frame), self.deadline()).await;
        if ok {
            self.metrics.forwarded(1, frame.len());
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Killed = watch::Receiver<Option<(u16, String)>>;

    fn rooms(metrics: Arc<Metrics>, timeout: Duration) -> Rooms {
        let budget = Budget::new(1 << 20, 1 << 16, timeout, metrics.clone());
        Rooms::new(metrics, budget, timeout, 4)
    }

    /// A member with a queue of `frames` entries; its writer's side, never read.
    fn member(rooms: &Rooms, id: ConnId, frames: usize) -> (Member, mpsc::Receiver<Batch>, Killed) {
        let (tx, rx) = mpsc::channel(frames);
        let (kill, killed) = watch::channel(None);
        let kill = Arc::new(kill);
        let queue = rooms.budget().open(id, kill.clone());
        (
            Member {
                tx,
                queue,
                kill,
                datagrams: true,
            },
            rx,
            killed,
        )
    }

    #[test]
    fn joins_count_local_and_remote_members_and_the_last_leave_removes_the_room() {
        let rooms = rooms(Arc::default(), Duration::from_millis(10));
        let (a, _ra, _) = member(&rooms, 1, 4);
        let (b, _rb, _) = member(&rooms, 2, 4);
        let room = [1; 32];
        assert!(
            matches!(rooms.join(room, 1, &a, 0, 3), Joined::Joined(p, o) if p.is_empty() && o.is_empty())
        );
        assert!(matches!(rooms.join(room, 2, &b, 2, 3), Joined::Full(3)));
        assert!(
            matches!(rooms.join(room, 2, &b, 0, 3), Joined::Joined(p, o) if p == vec![1] && o.len() == 1)
        );
        assert!(matches!(rooms.join([2; 32], 3, &b, 5, 3), Joined::Full(5)));
        assert_eq!(
            rooms.len(),
            1,
            "a room refused to its first member is not kept"
        );
        assert_eq!(rooms.others(&room, 1).len(), 1);
        assert!(rooms.member(&room, 2).is_some() && rooms.member(&room, 9).is_none());
        assert!(rooms.if_absent(&room, || ()).is_none());
        let (others, last) = rooms.leave(&room, 1).unwrap();
        assert_eq!((others.len(), last), (1, false));
        let (others, last) = rooms.leave(&room, 2).unwrap();
        assert_eq!((others.len(), last), (0, true));
        assert!(rooms.leave(&room, 2).is_none());
        assert_eq!(rooms.len(), 0);
        assert_eq!(rooms.if_absent(&room, || 7), Some(7));
    }

    #[tokio::test]
    async fn a_member_whose_queue_stays_full_is_closed_as_a_slow_consumer() {
        let metrics = Arc::new(Metrics::default());
        let rooms = rooms(metrics.clone(), Duration::from_millis(20));
        let (slow, _queue, killed) = member(&rooms, 1, 1);
        assert!(
            rooms
                .queue(&slow, Batch::one(b"one"), rooms.deadline())
                .await
        );
        assert!(
            !rooms
                .queue(&slow, Batch::one(b"two"), rooms.deadline())
                .await
        );
        let reason = killed.borrow().clone();
        assert_eq!(
            reason.map(|(code, _)| code),
            Some(close_code::SLOW_CONSUMER)
        );
        assert!(
            metrics
                .render(0, 0, None)
                .contains("pluresdb_relay_drops_total{reason=\"slow_consumer\"} 1\n")
        );
        assert_eq!(
            rooms.budget().queued(),
            7,
            "only what was queued is charged"
        );
    }

    /// Eight receivers that never read: one operation queueing to all of them waits about
    /// one slow-consumer timeout in total, not one per receiver in turn.
    #[tokio::test]
    async fn full_receivers_stall_a_sender_for_a_bounded_total_time() {
        let timeout = Duration::from_millis(200);
        let rooms = rooms(Arc::default(), timeout);
        let members: Vec<_> = (0..8).map(|i| member(&rooms, i, 1)).collect();
        let deadline = rooms.deadline();
        for (m, _, _) in &members {
            assert!(rooms.queue(m, Batch::one(b"fills it"), deadline).await);
        }
        let started = Instant::now();
        let deadline = rooms.deadline();
        for (m, _, _) in &members {
            assert!(!rooms.queue(m, Batch::one(b"no room"), deadline).await);
        }
        let waited = started.elapsed();
        assert!(waited >= timeout && waited < 4 * timeout, "{waited:?}");
        assert!(members.iter().all(|(_, _, k)| k.borrow().is_some()));
    }
}
