//! A connection's state (its id, rooms and the DELIVERs its burst gathered) and what each
//! client frame does to it: JOIN and LEAVE change the room registry (and tell the other
//! members, here and through NATS), SEND and BROADCAST become DELIVERs to members, DATAGRAM
//! a DATAGRAM_FROM if the receiver has room (`datagram`), PING is answered; a request that cannot be served gets an ERROR, a protocol violation closes.

use std::collections::HashSet;

use bytes::Bytes;
use tokio::time::Instant;

use super::datagram::{self, Datagram};
use super::gather::Gathered;
use super::metrics::DropReason;
use super::nats::BusShare;
use super::outbox::Batch;
use super::rooms::{Joined, Member};
use super::state::Shared;
use crate::protocol::{
    self, ClientFrame, ConnId, DELIVER_OVERHEAD, ForwardView, Frame, RelayFrame, RoomId,
    close_code, error_code, kind,
};

/// A close code and reason: the frame ends the connection.
type Close = (u16, String);

/// A connection's state, owned by its reader.
pub(super) struct Conn<'a> {
    pub(super) shared: &'a Shared,
    pub(super) id: ConnId,
    /// How other connections reach this one.
    pub(super) me: Member,
    /// The rooms this connection joined.
    rooms: HashSet<RoomId>,
    /// DELIVERs of the current burst not yet queued, per receiver.
    gathered: Gathered,
    /// With NATS, its share of the node's datagram outbox.
    bus_share: Option<BusShare>,
}

impl<'a> Conn<'a> {
    /// A connection that joined no room yet; `me` is how others reach it.
    pub(super) fn new(shared: &'a Shared, id: ConnId, me: Member) -> Self {
        Self {
            shared,
            id,
            me,
            rooms: HashSet::new(),
            gathered: Gathered::default(),
            bus_share: shared.nats.as_ref().map(|n| n.datagram_share()),
        }
    }

    /// Handles one frame. `Ok(true)` after a successful JOIN; `Err` closes the connection.
    pub(super) async fn frame(&mut self, data: &[u8]) -> Result<bool, Close> {
        // SEND and BROADCAST are viewed in place: the payload is copied once, into DELIVER.
        // Consecutive SENDs gather their DELIVERs per receiver; anything else first queues
        // what was gathered, so every receiver sees frames in the order they were sent.
        let view = protocol::decode_forward(data);
        if let Some(ForwardView::Send { room, to, payload }) = view {
            self.send_to(room, to, payload).await?;
            return Ok(false);
        }
        // Datagrams are unordered by nature: they need not wait for what was gathered.
        if let Some(ForwardView::Datagram {
            room,
            to,
            segment,
            payload,
        }) = view
        {
            self.datagram(room, to, segment, payload);
            return Ok(false);
        }
        self.flush().await;
        if let Some(ForwardView::Broadcast { room, payload }) = view {
            self.broadcast(room, payload).await?;
            return Ok(false);
        }
        let m = &self.shared.metrics;
        let frame = protocol::decode(data).map_err(|e| {
            m.dropped(if e.close_code() == close_code::UNKNOWN_TYPE {
                DropReason::UnknownType
            } else {
                DropReason::Malformed
            });
            (e.close_code(), e.to_string())
        })?;
        match frame {
            Frame::Relay(r) => {
                m.dropped(DropReason::UnknownType);
                let t = Frame::Relay(r).encode()[0];
                Err((
                    close_code::UNKNOWN_TYPE,
                    format!("relay frame type {t:#04x} is only sent by the relay"),
                ))
            }
            Frame::Ping(n) => {
                self.reply(Frame::Pong(n)).await;
                Ok(false)
            }
            Frame::Pong(_) => Ok(false),
            Frame::Client(ClientFrame::Join { room }) => self.join(room).await,
            Frame::Client(ClientFrame::Leave { room }) => {
                if self.rooms.remove(&room) {
                    self.leave(room).await;
                } else {
                    self.error(
                        error_code::NOT_IN_ROOM,
                        kind::LEAVE,
                        room,
                        DropReason::NotInRoom,
                        "leave of a room not joined".into(),
                    )
                    .await;
                }
                Ok(false)
            }
            Frame::Client(ClientFrame::Send { room, to, payload }) => {
                self.send_to(room, to, &payload).await.map(|()| false)
            }
            Frame::Client(ClientFrame::Broadcast { room, payload }) => {
                self.broadcast(room, &payload).await.map(|()| false)
            }
            Frame::Client(ClientFrame::Datagram {
                room,
                to,
                segment,
                payload,
            }) => {
                self.datagram(room, to, segment, &payload);
                Ok(false)
            }
        }
    }

    /// A DATAGRAM: forwarded or dropped, never waited for (see `datagram`).
    fn datagram(&self, room: RoomId, to: ConnId, segment: u16, payload: &[u8]) {
        let in_room = self.rooms.contains(&room);
        let d = Datagram {
            room,
            to,
            segment,
            payload,
        };
        datagram::forward(self.shared, self.id, in_room, self.bus_share.as_ref(), d);
    }

    /// A payload over `max_frame - DELIVER_OVERHEAD` could not be forwarded: close (1009).
    fn check_payload(&self, len: usize) -> Result<(), Close> {
        let max_payload = self.shared.config.max_frame_bytes - DELIVER_OVERHEAD;
        if len > max_payload {
            self.shared.metrics.dropped(DropReason::Oversized);
            return Err((
                close_code::FRAME_TOO_LARGE,
                format!("payload of {len} bytes exceeds the {max_payload}-byte limit"),
            ));
        }
        Ok(())
    }

    async fn send_to(&mut self, room: RoomId, to: ConnId, payload: &[u8]) -> Result<(), Close> {
        self.check_payload(payload.len())?;
        let rooms = &*self.shared.rooms;
        // A receiver already written to in this room in this burst needs no second lookup
        // (any LEAVE in between would have queued and cleared what was gathered).
        let found = self.gathered.find(to);
        if let Some((i, r)) = found
            && r == room
        {
            let id = self.id;
            self.gathered.stage(rooms, i, room, id, payload).await;
            return Ok(());
        }
        if !self.rooms.contains(&room) {
            self.error(
                error_code::NOT_IN_ROOM,
                kind::SEND,
                room,
                DropReason::NotInRoom,
                "send to a room not joined".into(),
            )
            .await;
            return Ok(());
        }
        match rooms.member(&room, to).filter(|_| to != self.id) {
            Some(member) => {
                let found = found.map(|(i, _)| i);
                let id = self.id;
                let i = self.gathered.receiver(rooms, found, to, room, member).await;
                self.gathered.stage(rooms, i, room, id, payload).await;
            }
            None if to != self.id
                && self
                    .shared
                    .nats
                    .as_ref()
                    .is_some_and(|n| n.is_remote_member(&room, to)) =>
            {
                let frame: Bytes = protocol::encode_deliver(&room, self.id, false, payload).into();
                if let Some(n) = self.shared.nats.as_ref() {
                    // Boxed: the NATS futures are large and would otherwise enlarge every
                    // connection's task, with or without NATS.
                    Box::pin(n.send_to(to, frame)).await;
                }
            }
            None => {
                self.error(
                    error_code::UNKNOWN_PEER,
                    kind::SEND,
                    room,
                    DropReason::UnknownPeer,
                    format!("connection {to} is not in this room"),
                )
                .await;
            }
        }
        Ok(())
    }

    async fn broadcast(&mut self, room: RoomId, payload: &[u8]) -> Result<(), Close> {
        self.check_payload(payload.len())?;
        if !self.rooms.contains(&room) {
            self.error(
                error_code::NOT_IN_ROOM,
                kind::BROADCAST,
                room,
                DropReason::NotInRoom,
                "broadcast to a room not joined".into(),
            )
            .await;
            return Ok(());
        }
        let targets = self.shared.rooms.others(&room, self.id);
        let frame = protocol::encode_deliver(&room, self.id, true, payload);
        let batch = Batch::one(&frame);
        let deadline = self.shared.rooms.deadline();
        for t in targets {
            if self.notify(&t, batch.clone(), deadline).await {
                self.shared.metrics.forwarded(1, frame.len());
            }
        }
        if let Some(n) = self.shared.nats.as_ref()
            && n.remote_count(&room) > 0
        {
            Box::pin(n.broadcast(&room, frame.into())).await;
        }
        Ok(())
    }

    async fn join(&mut self, room: RoomId) -> Result<bool, Close> {
        let cfg = &self.shared.config;
        if self.rooms.contains(&room) {
            self.error(
                error_code::ALREADY_JOINED,
                kind::JOIN,
                room,
                DropReason::AlreadyJoined,
                "room already joined".into(),
            )
            .await;
            return Ok(false);
        }
        if self.rooms.len() >= cfg.max_rooms_per_connection {
            self.error(
                error_code::TOO_MANY_ROOMS,
                kind::JOIN,
                room,
                DropReason::TooManyRooms,
                format!(
                    "at most {} rooms per connection",
                    cfg.max_rooms_per_connection
                ),
            )
            .await;
            return Ok(false);
        }
        let nats = self.shared.nats.as_ref();
        let remote = nats.map_or(0, |n| n.remote_count(&room));
        let joined =
            self.shared
                .rooms
                .join(room, self.id, &self.me, remote, cfg.max_peers_per_room);
        let (mut peers, others) = match joined {
            Joined::Joined(peers, others) => (peers, others),
            Joined::Full(full) => {
                self.error(
                    error_code::ROOM_FULL,
                    kind::JOIN,
                    room,
                    DropReason::RoomFull,
                    format!("room has {full} members, the limit"),
                )
                .await;
                return Ok(false);
            }
        };
        self.rooms.insert(room);
        if let Some(n) = nats {
            peers.extend(Box::pin(n.join(room, self.id)).await);
            // Local and remote members are capped separately; JOINED must fit a frame.
            peers.truncate(cfg.max_peers_per_room.saturating_sub(1));
        }
        self.reply(Frame::Relay(RelayFrame::Joined { room, peers }))
            .await;
        let notice = Batch::one(
            &Frame::Relay(RelayFrame::PeerJoined {
                room,
                peer: self.id,
            })
            .encode(),
        );
        let deadline = self.shared.rooms.deadline();
        for o in others {
            self.notify(&o, notice.clone(), deadline).await;
        }
        Ok(true)
    }

    /// Leaves `room` (already removed from `self.rooms`) and tells the other members.
    async fn leave(&mut self, room: RoomId) {
        let Some((others, last)) = self.shared.rooms.leave(&room, self.id) else {
            return;
        };
        if let Some(n) = self.shared.nats.as_ref() {
            Box::pin(n.leave(room, self.id, last)).await;
        }
        let notice = Batch::one(
            &Frame::Relay(RelayFrame::PeerLeft {
                room,
                peer: self.id,
            })
            .encode(),
        );
        let deadline = self.shared.rooms.deadline();
        for o in others {
            self.notify(&o, notice.clone(), deadline).await;
        }
    }

    /// Leaves every room (the connection ends).
    pub(super) async fn leave_all(&mut self) {
        for room in std::mem::take(&mut self.rooms) {
            self.leave(room).await;
        }
    }

    /// Queues everything the burst gathered (see `gather`).
    pub(super) async fn flush(&mut self) {
        let rooms = &*self.shared.rooms;
        self.gathered.flush(rooms).await;
    }

    /// Queues frames to another member, waiting at most until `deadline` (shared by every
    /// member one operation queues to); closes that member if its queue stays full.
    async fn notify(&self, to: &Member, frames: Batch, deadline: Instant) -> bool {
        self.shared.rooms.queue(to, frames, deadline).await
    }

    async fn reply(&self, frame: Frame) {
        let deadline = self.shared.rooms.deadline();
        self.notify(&self.me, Batch::one(&frame.encode()), deadline)
            .await;
    }

    async fn error(&self, code: u16, about: u8, room: RoomId, reason: DropReason, message: String) {
        self.shared.metrics.dropped(reason);
        self.reply(Frame::Relay(RelayFrame::Error {
            code,
            about,
            room,
            message,
        }))
        .await;
    }
}
