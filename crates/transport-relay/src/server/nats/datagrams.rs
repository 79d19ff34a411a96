//! DATAGRAMs (`pluresdb-relay.v2`) to members on other nodes: a droppable path over core
//! NATS that never waits, like the local one (`server/datagram.rs`).
//!
//! Out: a datagram for a remote member is encoded once, as the DATAGRAM_FROM frame its
//! receiver gets, and put in the node's datagram outbox without waiting: a bounded queue
//! whose bytes are charged to the memory budget (capped at `max_queued_bytes_per_connection`)
//! and of which one connection may hold at most [`share_bytes`]. One task publishes what is
//! queued to `P.dgram.<node>.<counter>` and gives the bytes back only once the NATS client
//! has flushed them to its socket, so datagrams on their way out never pin more than the
//! outbox. A full outbox (the bus is backed up, or this sender already has its share on the
//! way) drops the datagram (`datagram_bus_full`).
//!
//! In: each node subscribes to `P.dgram.<its node>.*` once, apart from the direct-send
//! subject, so datagrams never queue behind a DELIVER that waits for a slow receiver (and a
//! datagram flood never fills that subscription). Its task hands each datagram to the local
//! member without waiting, or drops it (see [`super::super::datagram::from_bus`]).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::super::budget::Queue;
use super::super::datagram;
use super::super::metrics::DropReason;
use super::bus::{self, BusMessage};
use super::loops::local_target;
use super::{NATS_PUBLISH_TIMEOUT, Nats, node_of};
use crate::protocol::{ConnId, DATAGRAM_OVERHEAD, RoomId, datagram_header, kind};

/// Datagrams the outbox holds at most, whatever their size (their bytes are bounded too).
pub(crate) const NATS_DATAGRAM_QUEUE: usize = 1024;

/// What one connection may have in the outbox, in bytes: the permits of its datagrams on
/// their way to NATS.
pub(crate) type BusShare = Arc<Semaphore>;

/// Bytes one connection may have in a `cap`-byte outbox at once: a quarter of it (so one
/// flooding sender leaves the others room), but at least one largest datagram (so every
/// sender can always send one).
pub(crate) fn share_bytes(cap: usize, max_frame: usize) -> usize {
    (cap / 4).max(max_frame + 64)
}

/// One datagram on its way to NATS.
pub(super) struct Outgoing {
    subject: String,
    frame: Bytes,
    /// What it is charged to the outbox (and the memory budget).
    cost: u32,
    /// Its sender's share, given back with the bytes.
    share: OwnedSemaphorePermit,
}

/// The node's datagram outbox: the sending side of the publisher's queue, and the charge
/// of what it holds.
#[derive(Debug)]
pub(super) struct Outbox {
    pub(super) tx: mpsc::Sender<Outgoing>,
    pub(super) queue: Arc<Queue>,
    /// [`share_bytes`] of this outbox.
    pub(super) share: usize,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("subject", &self.subject)
            .field("bytes", &self.frame.len())
            .finish()
    }
}

impl Nats {
    fn datagram_subject(&self, conn: ConnId) -> String {
        format!(
            "{}.dgram.{:08x}.{:08x}",
            self.prefix,
            node_of(conn),
            conn as u32
        )
    }

    /// The subject this node reads datagrams for its connections from.
    pub(super) fn datagram_inbox(&self) -> String {
        format!("{}.dgram.{:08x}.*", self.prefix, self.node)
    }

    /// A new connection's share of the datagram outbox.
    pub(crate) fn datagram_share(&self) -> BusShare {
        Arc::new(Semaphore::new(self.outbox.share))
    }

    /// Queues a datagram from `from` for `to`, a member of `room` on another node, to be
    /// published; never waits. Whether it was queued (if not, the outbox or `share` was
    /// full).
    pub(crate) fn publish_datagram(
        &self,
        share: &BusShare,
        room: &RoomId,
        from: ConnId,
        to: ConnId,
        segment: u16,
        payload: &[u8],
    ) -> bool {
        let subject = self.datagram_subject(to);
        let len = DATAGRAM_OVERHEAD + payload.len();
        let cost = u32::try_from(len + subject.len()).unwrap_or(u32::MAX);
        let Ok(share) = share.clone().try_acquire_many_owned(cost) else {
            return false;
        };
        let outbox = &self.outbox;
        let Ok(slot) = outbox.tx.try_reserve() else {
            return false;
        };
        if !self.local.budget().try_charge(&outbox.queue, cost) {
            return false;
        }
        let mut frame = BytesMut::with_capacity(len);
        frame.put_slice(&datagram_header(kind::DATAGRAM_FROM, room, from, segment));
        frame.put_slice(payload);
        slot.send(Outgoing {
            subject,
            frame: frame.freeze(),
            cost,
            share,
        });
        true
    }
}

/// Most datagrams published between two flushes.
const PUBLISH_BATCH: usize = 64;

/// Publishes what the outbox holds, in batches: publish each, flush the NATS client, then
/// give the batch's bytes back (to the outbox, the budget and the senders' shares).
pub(super) async fn publisher(nats: Weak<Nats>, mut rx: mpsc::Receiver<Outgoing>) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    while rx.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
        let Some(nats) = nats.upgrade() else {
            return;
        };
        let mut cost = 0usize;
        let mut shares = Vec::with_capacity(batch.len());
        // After a publish that failed or timed out, the rest of the batch is dropped rather
        // than waited for in turn: the bus is backed up.
        let mut stuck = false;
        for out in batch.drain(..) {
            cost += out.cost as usize;
            shares.push(out.share);
            if stuck {
                nats.local.metrics().dropped(DropReason::DatagramBusFull);
            } else if nats.publish(out.subject, out.frame).await {
                nats.metrics
                    .datagrams_published
                    .fetch_add(1, Ordering::Relaxed);
            } else {
                stuck = true;
            }
        }
        // Until flushed, the NATS client still holds the bytes.
        let _ = tokio::time::timeout(NATS_PUBLISH_TIMEOUT, nats.client.flush()).await;
        nats.outbox
            .queue
            .refund(u32::try_from(cost).unwrap_or(u32::MAX));
        drop(shares);
    }
}

/// `P.dgram.<node>.*`: datagrams for one local connection, named by the subject's last
/// token (the low 32 bits of its id). Never waits for a receiver.
pub(super) async fn inbox(nats: Weak<Nats>, mut sub: async_nats::Subscriber) {
    while let Some(msg) = sub.next().await {
        let Some(nats) = nats.upgrade() else {
            return;
        };
        nats.metrics.received.fetch_add(1, Ordering::Relaxed);
        let to = local_target(nats.node, &msg.subject);
        // A node of this cluster never publishes more than a frame; one configured with a
        // larger `max_frame` than ours would, and our clients would refuse it.
        let fits = msg.payload.len() <= nats.max_frame;
        match (to, bus::decode(&msg.payload)) {
            (Some(to), Ok(BusMessage::Datagram { room, .. })) if fits => {
                datagram::from_bus(&nats.local, &room, to, &msg.payload);
            }
            _ => {
                nats.metrics.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_is_a_quarter_of_the_outbox_and_at_least_a_frame() {
        assert_eq!(share_bytes(4 << 20, 64 << 10), 1 << 20);
        assert_eq!(share_bytes(200_000, 65_536), 65_536 + 64);
    }
}
