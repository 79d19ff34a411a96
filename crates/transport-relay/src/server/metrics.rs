//! The relay server's counters and their Prometheus text. A leaf: it knows nothing of the
//! server's other modules, which only count into it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why the relay dropped a frame or a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DropReason {
    Malformed,
    UnknownType,
    TextFrame,
    Oversized,
    NotInRoom,
    UnknownPeer,
    RoomFull,
    TooManyRooms,
    AlreadyJoined,
    SlowConsumer,
    IdleTimeout,
    JoinTimeout,
    HandshakeTimeout,
    PerIpLimit,
    BadUpgrade,
    Unauthorized,
    RateLimited,
    NatsDown,
    DatagramNoRoute,
    DatagramQueueFull,
    DatagramBusFull,
    MemoryBudget,
    WebSocketProtocol,
}

const DROPS: [(DropReason, &str); 23] = [
    (DropReason::Malformed, "malformed"),
    (DropReason::UnknownType, "unknown_type"),
    (DropReason::TextFrame, "text_frame"),
    (DropReason::Oversized, "oversized"),
    (DropReason::NotInRoom, "not_in_room"),
    (DropReason::UnknownPeer, "unknown_peer"),
    (DropReason::RoomFull, "room_full"),
    (DropReason::TooManyRooms, "too_many_rooms"),
    (DropReason::AlreadyJoined, "already_joined"),
    (DropReason::SlowConsumer, "slow_consumer"),
    (DropReason::IdleTimeout, "idle_timeout"),
    (DropReason::JoinTimeout, "join_timeout"),
    (DropReason::HandshakeTimeout, "handshake_timeout"),
    (DropReason::PerIpLimit, "per_ip_limit"),
    (DropReason::BadUpgrade, "bad_upgrade"),
    (DropReason::Unauthorized, "unauthorized"),
    (DropReason::RateLimited, "rate_limited"),
    (DropReason::NatsDown, "nats_down"),
    (DropReason::DatagramNoRoute, "datagram_no_route"),
    (DropReason::DatagramQueueFull, "datagram_queue_full"),
    (DropReason::DatagramBusFull, "datagram_bus_full"),
    (DropReason::MemoryBudget, "memory_budget"),
    (DropReason::WebSocketProtocol, "websocket_protocol"),
];

/// Counters of the NATS path (with `nats_url`).
#[derive(Debug, Default)]
pub(crate) struct NatsMetrics {
    pub(crate) published: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) publish_errors: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) datagrams_published: AtomicU64,
    pub(crate) slow_consumer: AtomicU64,
    pub(crate) disconnects: AtomicU64,
    pub(crate) up: AtomicU64,
}

/// Counters of one relay server.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) connections_open: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) frames_forwarded: AtomicU64,
    pub(crate) bytes_forwarded: AtomicU64,
    pub(crate) frames_received: AtomicU64,
    pub(crate) datagrams_forwarded: AtomicU64,
    drops: [AtomicU64; DROPS.len()],
}

impl Metrics {
    pub(crate) fn dropped(&self, reason: DropReason) {
        if let Some(i) = DROPS.iter().position(|(d, _)| *d == reason) {
            self.drops[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn forwarded(&self, frames: usize, bytes: usize) {
        self.frames_forwarded
            .fetch_add(frames as u64, Ordering::Relaxed);
        self.bytes_forwarded
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn render(
        &self,
        rooms: usize,
        queued_bytes: usize,
        nats: Option<&NatsMetrics>,
    ) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "pluresdb_relay_connections",
            "gauge",
            "Open WebSocket connections.",
            get(&self.connections_open),
        );
        metric(
            "pluresdb_relay_connections_total",
            "counter",
            "WebSocket connections accepted.",
            get(&self.connections_total),
        );
        metric(
            "pluresdb_relay_rooms",
            "gauge",
            "Rooms with at least one member.",
            rooms as u64,
        );
        metric(
            "pluresdb_relay_queued_bytes",
            "gauge",
            "Bytes of frames queued to connections' writers (bounded by --max-queued-bytes).",
            queued_bytes as u64,
        );
        metric(
            "pluresdb_relay_frames_received_total",
            "counter",
            "Relay frames received from clients.",
            get(&self.frames_received),
        );
        metric(
            "pluresdb_relay_frames_forwarded_total",
            "counter",
            "DELIVER frames queued to receivers.",
            get(&self.frames_forwarded),
        );
        metric(
            "pluresdb_relay_bytes_forwarded_total",
            "counter",
            "Bytes of DELIVER frames queued to receivers.",
            get(&self.bytes_forwarded),
        );
        metric(
            "pluresdb_relay_datagrams_forwarded_total",
            "counter",
            "DATAGRAM frames queued to receivers (the others are counted as drops).",
            get(&self.datagrams_forwarded),
        );
        let _ = writeln!(
            out,
            "# HELP pluresdb_relay_drops_total Frames or connections refused, by reason.\n# TYPE pluresdb_relay_drops_total counter"
        );
        for (i, (_, name)) in DROPS.iter().enumerate() {
            let _ = writeln!(
                out,
                "pluresdb_relay_drops_total{{reason=\"{name}\"}} {}",
                get(&self.drops[i])
            );
        }
        if let Some(n) = nats {
            for (name, kind, help, v) in [
                (
                    "pluresdb_relay_nats_up",
                    "gauge",
                    "1 while the NATS connection is up.",
                    &n.up,
                ),
                (
                    "pluresdb_relay_nats_published_total",
                    "counter",
                    "Messages published to NATS.",
                    &n.published,
                ),
                (
                    "pluresdb_relay_nats_received_total",
                    "counter",
                    "Messages received from NATS.",
                    &n.received,
                ),
                (
                    "pluresdb_relay_nats_publish_errors_total",
                    "counter",
                    "Publishes that failed or timed out.",
                    &n.publish_errors,
                ),
                (
                    "pluresdb_relay_nats_dropped_total",
                    "counter",
                    "Bus messages dropped: malformed, for an unknown connection, or over a member cap.",
                    &n.dropped,
                ),
                (
                    "pluresdb_relay_nats_datagrams_published_total",
                    "counter",
                    "DATAGRAMs published to members on other nodes (the others are counted as drops).",
                    &n.datagrams_published,
                ),
                (
                    "pluresdb_relay_nats_slow_consumer_total",
                    "counter",
                    "Times the NATS client dropped messages because a subscription buffer was full.",
                    &n.slow_consumer,
                ),
                (
                    "pluresdb_relay_nats_disconnects_total",
                    "counter",
                    "Times the NATS connection was lost.",
                    &n.disconnects,
                ),
            ] {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                    get(v)
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.dropped(DropReason::SlowConsumer);
        m.dropped(DropReason::SlowConsumer);
        m.forwarded(2, 100);
        let text = m.render(3, 77, None);
        assert!(text.contains("pluresdb_relay_queued_bytes 77\n"), "{text}");
        assert!(text.contains("pluresdb_relay_rooms 3\n"), "{text}");
        assert!(text.contains("pluresdb_relay_drops_total{reason=\"slow_consumer\"} 2\n"));
        assert!(text.contains("pluresdb_relay_bytes_forwarded_total 100\n"));
        assert!(
            text.contains("pluresdb_relay_frames_forwarded_total 2\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE pluresdb_relay_connections gauge"));
    }
}
