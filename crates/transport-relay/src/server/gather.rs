//! The DELIVERs one reader burst produces, gathered per receiver and queued together: one
//! queue entry (a [`Batch`](super::outbox::Batch)) and one writer wake-up per receiver per
//! burst instead of per frame, and a slow receiver never delays what was gathered for others.

use tokio::time::Instant;

use super::outbox::BatchBuilder;
use super::rooms::{Member, Rooms};
use crate::protocol::{ConnId, RoomId};

/// Most receivers one burst gathers DELIVERs for before queueing them all (bounds the
/// gathered bytes to this many batches).
const MAX_PENDING_RECEIVERS: usize = 16;

/// DELIVERs gathered for one receiver during a burst.
#[derive(Debug)]
struct Pending {
    /// The room of the last DELIVER gathered.
    room: RoomId,
    to: ConnId,
    member: Member,
    frames: BatchBuilder,
}

/// The DELIVERs of the current burst not yet queued, per receiver.
#[derive(Debug, Default)]
pub(super) struct Gathered {
    pending: Vec<Pending>,
}

impl Gathered {
    /// Where DELIVERs for `to` are gathered, and the room of the last one.
    pub(super) fn find(&self, to: ConnId) -> Option<(usize, RoomId)> {
        self.pending
            .iter()
            .position(|p| p.to == to)
            .map(|i| (i, self.pending[i].room))
    }

    /// Gathers for receiver `to` (a member of `room`), or for the one found at `found`; the
    /// index to [`stage`](Self::stage) into. Queues everything first when the burst already
    /// gathers for the most receivers.
    pub(super) async fn receiver(
        &mut self,
        rooms: &Rooms,
        found: Option<usize>,
        to: ConnId,
        room: RoomId,
        member: Member,
    ) -> usize {
        if let Some(i) = found.filter(|&i| i < self.pending.len()) {
            // The same receiver in another room: the same batch, so that it sees every frame
            // in the order it was sent.
            self.pending[i].room = room;
            return i;
        }
        if self.pending.len() >= MAX_PENDING_RECEIVERS {
            self.flush(rooms).await;
        }
        self.start(to, room, member)
    }

    fn start(&mut self, to: ConnId, room: RoomId, member: Member) -> usize {
        self.pending.push(Pending {
            room,
            to,
            member,
            frames: BatchBuilder::default(),
        });
        self.pending.len() - 1
    }

    /// Adds a DELIVER from `from` in `room` to the receiver at `i`; when that receiver's
    /// batch is full, first queues everything gathered.
    pub(super) async fn stage(
        &mut self,
        rooms: &Rooms,
        mut i: usize,
        room: RoomId,
        from: ConnId,
        payload: &[u8],
    ) {
        let Some(p) = self.pending.get(i) else {
            return;
        };
        if !p.frames.fits(payload.len()) {
            let (to, member) = (p.to, p.member.clone());
            self.flush(rooms).await;
            i = self.start(to, room, member);
        }
        self.pending[i]
            .frames
            .push_deliver(&room, from, false, payload);
    }

    /// Queues every receiver's gathered DELIVERs: first to every receiver with room in its
    /// queue, without waiting, then to the ones whose queue was full, waiting at most the
    /// slow-consumer timeout for all of them together. A slow receiver thus never delays
    /// what was gathered for the others, and full receivers stall the sender once, not once
    /// each.
    pub(super) async fn flush(&mut self, rooms: &Rooms) {
        let metrics = rooms.metrics();
        let mut full = Vec::new();
        for mut p in self.pending.drain(..) {
            let (frames, bytes) = (p.frames.frames(), p.frames.frame_bytes());
            if frames == 0 {
                continue;
            }
            let batch = p.frames.take();
            if rooms.try_queue(&p.member, batch.clone()) {
                metrics.forwarded(frames, bytes);
            } else if !p.member.tx.is_closed() {
                p.member.queue.full(Instant::now());
                full.push((p.member, batch, frames, bytes));
            }
        }
        let deadline = rooms.deadline();
        for (member, batch, frames, bytes) in full {
            if rooms.queue(&member, batch, deadline).await {
                metrics.forwarded(frames, bytes);
            }
        }
    }
}
