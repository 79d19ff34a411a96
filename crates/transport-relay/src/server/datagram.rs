//! Forwarding DATAGRAM frames (`pluresdb-relay.v2`): best effort, never backpressure. A
//! datagram goes to the receiver's queue only if it and the memory budget have room at once; otherwise, or when the
//! receiver is not in the room with the sender, does not speak version 2, or is the sender
//! itself, it is dropped and counted. The sender never waits and never gets an ERROR (QUIC
//! above does loss recovery and congestion control; an ERROR per datagram would only be a
//! flood of its own).

use std::sync::atomic::Ordering;

use super::metrics::DropReason;
use super::outbox::Batch;
use super::state::Shared;
use crate::protocol::{ConnId, RoomId, datagram_header, kind};

/// Forwards a DATAGRAM from `from` (a member of `room` if `in_room`) to `to` as a
/// DATAGRAM_FROM, or drops it. Never waits. Whether it was queued.
pub(super) fn forward(
    shared: &Shared,
    from: ConnId,
    in_room: bool,
    room: RoomId,
    to: ConnId,
    segment: u16,
    payload: &[u8],
) -> bool {
    let metrics = &shared.metrics;
    let receiver = in_room
        .then(|| shared.rooms.member(&room, to))
        .flatten()
        .filter(|m| m.datagrams && to != from);
    let Some(receiver) = receiver else {
        metrics.dropped(DropReason::DatagramNoRoute);
        return false;
    };
    let header = datagram_header(kind::DATAGRAM_FROM, &room, from, segment);
    // Charged to the receiver's queue and the memory budget like every frame (its writer
    // gives the bytes back as it sends them); a queue or budget without room drops it.
    if shared
        .rooms
        .try_queue(&receiver, Batch::two(&header, payload))
    {
        metrics.datagrams_forwarded.fetch_add(1, Ordering::Relaxed);
        metrics.forwarded(1, header.len() + payload.len());
        true
    } else {
        metrics.dropped(DropReason::DatagramQueueFull);
        false
    }
}
