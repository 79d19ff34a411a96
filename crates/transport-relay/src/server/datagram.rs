//! Forwarding DATAGRAM frames (`pluresdb-relay.v2`): best effort, never backpressure. A
//! datagram goes to the receiver's queue only if it and the memory budget have room at once;
//! a datagram for a member on another node goes to the NATS datagram outbox only if it has
//! room at once (`nats/datagrams.rs`), and from the bus to the receiver's queue by the same
//! rule. Otherwise, or when the receiver is not in the room with the sender, does not speak
//! version 2, or is the sender itself, it is dropped and counted. The sender never waits and
//! never gets an ERROR (QUIC above does loss recovery and congestion control; an ERROR per
//! datagram would only be a flood of its own).

use std::sync::atomic::Ordering;

use super::metrics::DropReason;
use super::nats::BusShare;
use super::outbox::Batch;
use super::rooms::{Member, Rooms};
use super::state::Shared;
use crate::protocol::{ConnId, RoomId, datagram_header, kind};

/// A DATAGRAM as a client sent it.
pub(super) struct Datagram<'a> {
    pub(super) room: RoomId,
    pub(super) to: ConnId,
    pub(super) segment: u16,
    pub(super) payload: &'a [u8],
}

/// Forwards a DATAGRAM from `from` (a member of its room if `in_room`) to its receiver as a
/// DATAGRAM_FROM, here or (with `share`, the sender's share of the bus outbox) through NATS,
/// or drops it. Never waits. Whether it was queued.
pub(super) fn forward(
    shared: &Shared,
    from: ConnId,
    in_room: bool,
    share: Option<&BusShare>,
    d: Datagram<'_>,
) -> bool {
    let metrics = &shared.metrics;
    let no_route = || {
        metrics.dropped(DropReason::DatagramNoRoute);
        false
    };
    if !in_room || d.to == from {
        return no_route();
    }
    match shared.rooms.member(&d.room, d.to) {
        Some(receiver) => {
            let header = datagram_header(kind::DATAGRAM_FROM, &d.room, from, d.segment);
            let len = header.len() + d.payload.len();
            queue(
                &shared.rooms,
                &receiver,
                Batch::two(&header, d.payload),
                len,
            )
        }
        None => match (shared.nats.as_ref(), share) {
            (Some(n), Some(share)) if n.is_remote_member(&d.room, d.to) => {
                let queued = n.publish_datagram(share, &d.room, from, d.to, d.segment, d.payload);
                if !queued {
                    metrics.dropped(DropReason::DatagramBusFull);
                }
                queued
            }
            _ => no_route(),
        },
    }
}

/// Hands a DATAGRAM_FROM `frame` from another node to local connection `to` if it is a
/// version 2 member of `room`, or drops it. Never waits. Whether it was queued.
pub(super) fn from_bus(rooms: &Rooms, room: &RoomId, to: ConnId, frame: &[u8]) -> bool {
    match rooms.member(room, to) {
        Some(receiver) => queue(rooms, &receiver, Batch::one(frame), frame.len()),
        None => {
            rooms.metrics().dropped(DropReason::DatagramNoRoute);
            false
        }
    }
}

/// Queues one DATAGRAM_FROM of `len` bytes to `receiver` if it speaks version 2 and has
/// room now.
fn queue(rooms: &Rooms, receiver: &Member, frame: Batch, len: usize) -> bool {
    let metrics = rooms.metrics();
    if !receiver.datagrams {
        metrics.dropped(DropReason::DatagramNoRoute);
        return false;
    }
    // Charged to the receiver's queue and the memory budget like every frame (its writer
    // gives the bytes back as it sends them); a queue or budget without room drops it.
    if rooms.try_queue(receiver, frame) {
        metrics.datagrams_forwarded.fetch_add(1, Ordering::Relaxed);
        metrics.forwarded(1, len);
        true
    } else {
        metrics.dropped(DropReason::DatagramQueueFull);
        false
    }
}
