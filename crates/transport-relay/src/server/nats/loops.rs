//! The tasks that read the node's NATS subscriptions (a room's subject, its direct-send
//! subject, the node subject) and beat its heartbeat. Each holds the node weakly and ends
//! with it.

use std::sync::Weak;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use tokio::time::Instant;

use super::bus::{self, BusMessage};
use super::{NATS_HEARTBEAT_INTERVAL, NATS_MAX_NODES, NATS_NODE_TIMEOUT, Nats, node_of};
use crate::protocol::{ConnId, RoomId};

/// `P.room.<room>`: membership, membership queries and broadcasts of one room.
pub(super) async fn room(nats: Weak<Nats>, room: RoomId, mut sub: async_nats::Subscriber) {
    while let Some(msg) = sub.next().await {
        let Some(nats) = nats.upgrade() else {
            return;
        };
        nats.metrics.received.fetch_add(1, Ordering::Relaxed);
        match bus::decode(&msg.payload) {
            Ok(BusMessage::Deliver {
                room: r,
                broadcast: true,
                ..
            }) if r == room => {
                // Forwarded as is to the local members (the sender is on another node, so
                // none of them): a bus DELIVER is the relay frame.
                nats.local.forward_room(&room, &msg.payload).await;
            }
            Ok(BusMessage::MemberJoined { room: r, conn }) if r == room => {
                nats.learn(room, &[conn], true).await;
            }
            Ok(BusMessage::MemberLeft { room: r, conn }) if r == room => {
                nats.forget(room, conn).await;
            }
            Ok(BusMessage::MembersQuery { room: r }) if r == room => {
                let Some(reply) = msg.reply else { continue };
                let conns = nats.local.local_members(&room);
                if conns.is_empty() {
                    continue;
                }
                let answer = BusMessage::Members { room, conns }.encode();
                nats.publish(reply.to_string(), answer.into()).await;
            }
            _ => {
                nats.metrics.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The local connection a `P.conn.<node>.<counter>` or `P.dgram.<node>.<counter>` message is
/// for: this node's id in the high 32 bits, the subject's last token (hex) in the low ones.
pub(super) fn local_target(node: u32, subject: &str) -> Option<u64> {
    let counter = u32::from_str_radix(subject.rsplit('.').next()?, 16).ok()?;
    Some((u64::from(node) << 32) | u64::from(counter))
}

/// `P.conn.<node>.*`: DELIVER frames for one local connection, named by the subject's last
/// token (the low 32 bits of its id).
pub(super) async fn direct(nats: Weak<Nats>, mut sub: async_nats::Subscriber) {
    while let Some(msg) = sub.next().await {
        let Some(nats) = nats.upgrade() else {
            return;
        };
        nats.metrics.received.fetch_add(1, Ordering::Relaxed);
        let to = local_target(nats.node, &msg.subject);
        let ok = match (to, bus::decode(&msg.payload)) {
            (
                Some(to),
                Ok(BusMessage::Deliver {
                    room,
                    broadcast: false,
                    ..
                }),
            ) => nats.local.forward_one(&room, to, &msg.payload).await,
            _ => false,
        };
        if !ok {
            nats.metrics.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `P.node`: heartbeats and goodbyes; forgets the members of nodes silent for
/// [`NATS_NODE_TIMEOUT`] or gone.
pub(super) async fn node(nats: Weak<Nats>, mut sub: async_nats::Subscriber) {
    let mut check = tokio::time::interval(NATS_HEARTBEAT_INTERVAL);
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => Some(m), None => return },
            _ = check.tick() => None,
        };
        let Some(nats) = nats.upgrade() else {
            return;
        };
        let mut gone = Vec::new();
        match msg.as_ref().map(|m| bus::decode(&m.payload)) {
            Some(Ok(BusMessage::Heartbeat { node })) => {
                nats.metrics.received.fetch_add(1, Ordering::Relaxed);
                let mut nodes = nats.nodes.lock().unwrap_or_else(|p| p.into_inner());
                if nodes.len() < NATS_MAX_NODES || nodes.contains_key(&node) {
                    nodes.insert(node, Instant::now());
                }
            }
            Some(Ok(BusMessage::Goodbye { node })) => {
                nats.metrics.received.fetch_add(1, Ordering::Relaxed);
                nats.nodes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&node);
                gone.push(node);
            }
            Some(_) => {
                nats.metrics.dropped.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                let now = Instant::now();
                nats.nodes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|n, seen| {
                        let alive = now.duration_since(*seen) < NATS_NODE_TIMEOUT;
                        if !alive {
                            gone.push(*n);
                        }
                        alive
                    });
            }
        }
        for node in gone {
            let lost: Vec<(RoomId, ConnId)> = nats
                .rooms()
                .iter()
                .flat_map(|(room, r)| {
                    r.members
                        .iter()
                        .filter(|c| node_of(**c) == node)
                        .map(|c| (*room, *c))
                        .collect::<Vec<_>>()
                })
                .collect();
            for (room, c) in lost {
                nats.forget(room, c).await;
            }
        }
    }
}

/// Says on `P.node` every [`NATS_HEARTBEAT_INTERVAL`] that this node is alive.
pub(super) async fn heartbeat(nats: Weak<Nats>) {
    let mut tick = tokio::time::interval(NATS_HEARTBEAT_INTERVAL);
    loop {
        tick.tick().await;
        let Some(nats) = nats.upgrade() else {
            return;
        };
        let beat = BusMessage::Heartbeat { node: nats.node }.encode();
        nats.publish(nats.node_subject(), beat.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::local_target;

    #[test]
    fn a_subject_names_a_local_connection_or_nothing() {
        assert_eq!(
            local_target(0x0102_0304, "pluresdb.relay.v1.P.dgram.0102.ff"),
            Some(0x0102_0304_0000_00ff)
        );
        assert_eq!(local_target(7, "x.P.conn.7.zz"), None);
        assert_eq!(
            local_target(7, "x.P.conn.7.1ffffffff"),
            None,
            "over 32 bits"
        );
        assert_eq!(local_target(7, ""), None);
    }
}
