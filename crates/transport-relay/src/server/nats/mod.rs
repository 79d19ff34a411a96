//! Horizontal scale-out over NATS core subjects (`--nats URL`): the NATS side of one relay
//! node, its connection, subjects and lifecycle.
//!
//! Every node keeps only its own sockets plus what it learned from the bus. Subjects (with the
//! default prefix `pluresdb.relay.v1`, see `docs/relay-nats.md`):
//!
//! - `P.room.<room hex>`: membership and broadcasts of one room; a node subscribes while it
//!   has at least one local member there.
//! - `P.conn.<node hex8>.<counter hex8>`: direct sends to one connection; each node subscribes
//!   to `P.conn.<its node hex8>.*` once.
//! - `P.dgram.<node hex8>.<counter hex8>`: datagrams (`pluresdb-relay.v2`) to one
//!   connection; each node subscribes to `P.dgram.<its node hex8>.*` once.
//! - `P.node`: node heartbeats and goodbyes.
//!
//! The messages are the bus's own ([`bus`]); what a node learns from them is in
//! `membership`, the subscription loops in `loops`, the datagram path in `datagrams`.

pub(crate) mod bus;
mod datagrams;
mod loops;
mod membership;

pub(crate) use datagrams::BusShare;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::config::{RelayServerConfig, redact_url};
use super::metrics::NatsMetrics;
use super::rooms::Rooms;
use crate::protocol::{ConnId, RoomId};
use bus::BusMessage;

/// Messages buffered per NATS subscription before the client drops (and reports a slow
/// consumer): bounds memory to this many bus messages (each ≤ `max_frame_bytes`) per
/// subscribed room while a node cannot keep up.
pub(crate) const NATS_SUBSCRIPTION_CAPACITY: usize = 4096;
/// Commands (publishes) the NATS client queues towards the server; when full, publishing
/// waits (the sending socket sees backpressure), at most [`NATS_PUBLISH_TIMEOUT`].
pub(crate) const NATS_CLIENT_CAPACITY: usize = 4096;
/// Longest wait to hand one message to the NATS client before it counts as a publish error.
pub(crate) const NATS_PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// Time to reach the NATS server at start; an unreachable server fails the start clearly.
pub(crate) const NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a node says it is alive on `P.node`.
pub(crate) const NATS_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// Silence after which another node's members are forgotten (its clients see `PEER_LEFT`):
/// three heartbeats, so one lost heartbeat does not drop anyone.
pub(crate) const NATS_NODE_TIMEOUT: Duration = Duration::from_secs(6);
/// Most other nodes one node tracks: bounds the heartbeat table.
pub(crate) const NATS_MAX_NODES: usize = 4096;

#[derive(Debug)]
/// What a node knows of one room it has local members in.
struct RemoteRoom {
    /// Members on other nodes, at most `max_peers_per_room`.
    members: HashSet<ConnId>,
    /// True once the first membership query finished.
    ready: watch::Receiver<bool>,
    task: Option<AbortHandle>,
}

/// The NATS side of one relay node.
#[derive(Debug)]
pub(crate) struct Nats {
    client: async_nats::Client,
    prefix: String,
    /// This node's id: the high 32 bits of every connection id it assigns.
    pub(crate) node: u32,
    /// What this node knows of the rooms it has local members in: their remote members.
    rooms: Mutex<HashMap<RoomId, RemoteRoom>>,
    /// When each other node was last heard.
    nodes: Mutex<HashMap<u32, Instant>>,
    pub(crate) metrics: Arc<NatsMetrics>,
    /// False while the NATS connection is down.
    pub(crate) up: watch::Receiver<bool>,
    tasks: Mutex<Vec<AbortHandle>>,
    /// This node's room registry: the local members traffic from the bus goes to.
    local: Arc<Rooms>,
    /// `max_peers_per_room`: the most remote members cached per room.
    max_peers: usize,
    /// `nats_membership_wait`.
    membership_wait: Duration,
    /// `max_frame_bytes`: no bus message for a client is larger.
    max_frame: usize,
    /// Datagrams for members on other nodes, on their way to NATS.
    outbox: datagrams::Outbox,
    /// The outbox's receiving side, until [`Nats::start`] hands it to its publisher.
    outbox_rx: Mutex<Option<mpsc::Receiver<datagrams::Outgoing>>>,
}

/// The node part of a connection id.
pub(crate) fn node_of(conn: ConnId) -> u32 {
    (conn >> 32) as u32
}

impl Nats {
    /// Connects to the NATS server(s) of `config.nats_url`; fails clearly when they are
    /// unreachable. `local` is the node's room registry.
    pub(crate) async fn connect(
        url: &str,
        config: &RelayServerConfig,
        local: Arc<Rooms>,
    ) -> Result<Self, std::io::Error> {
        let shown = redact_url(url);
        let metrics = Arc::new(NatsMetrics::default());
        let (up_tx, up) = watch::channel(true);
        let up_tx = Arc::new(up_tx);
        let (m, u) = (metrics.clone(), up_tx.clone());
        let options = async_nats::ConnectOptions::new()
            .no_echo()
            .subscription_capacity(NATS_SUBSCRIPTION_CAPACITY)
            .client_capacity(NATS_CLIENT_CAPACITY)
            .connection_timeout(NATS_CONNECT_TIMEOUT)
            .name("pluresdb-sync-relay")
            .event_callback(move |event| {
                let (m, u) = (m.clone(), u.clone());
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            m.disconnects.fetch_add(1, Ordering::Relaxed);
                            m.up.store(0, Ordering::Relaxed);
                            tracing::warn!("relay lost its NATS connection");
                            let _ = u.send(false);
                        }
                        async_nats::Event::Connected => {
                            m.up.store(1, Ordering::Relaxed);
                            tracing::info!("relay (re)connected to NATS");
                            let _ = u.send(true);
                        }
                        async_nats::Event::SlowConsumer(_) => {
                            m.slow_consumer.fetch_add(1, Ordering::Relaxed);
                        }
                        other => tracing::debug!(event = %other, "NATS event"),
                    }
                }
            });
        let client = tokio::time::timeout(NATS_CONNECT_TIMEOUT, options.connect(url))
            .await
            .map_err(|_| {
                std::io::Error::other(format!(
                    "cannot connect to NATS at {shown}: no answer within {} ms",
                    NATS_CONNECT_TIMEOUT.as_millis()
                ))
            })?
            .map_err(|e| {
                std::io::Error::other(format!("cannot connect to NATS at {shown}: {e}"))
            })?;
        metrics.up.store(1, Ordering::Relaxed);
        let mut id = [0u8; 4];
        getrandom::fill(&mut id).map_err(|e| std::io::Error::other(e.to_string()))?;
        // Node 0 would make ids collide with a relay running without NATS; never use it.
        let node = u32::from_be_bytes(id).max(1);
        // The event callback owns the sender of `up`.
        drop(up_tx);
        let (tx, rx) = mpsc::channel(datagrams::NATS_DATAGRAM_QUEUE);
        let cap = config.max_queued_bytes_per_connection;
        let outbox = datagrams::Outbox {
            tx,
            queue: local.budget().open_unlisted(cap),
            share: datagrams::share_bytes(cap, config.max_frame_bytes),
        };
        Ok(Self {
            client,
            prefix: config.nats_subject_prefix.clone(),
            node,
            rooms: Mutex::default(),
            nodes: Mutex::default(),
            metrics,
            up,
            tasks: Mutex::default(),
            local,
            max_peers: config.max_peers_per_room,
            membership_wait: config.nats_membership_wait,
            max_frame: config.max_frame_bytes,
            outbox,
            outbox_rx: Mutex::new(Some(rx)),
        })
    }

    fn rooms(&self) -> MutexGuard<'_, HashMap<RoomId, RemoteRoom>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn room_subject(&self, room: &RoomId) -> String {
        format!("{}.room.{}", self.prefix, hex::encode(room))
    }

    fn conn_subject(&self, conn: ConnId) -> String {
        format!(
            "{}.conn.{:08x}.{:08x}",
            self.prefix,
            node_of(conn),
            conn as u32
        )
    }

    fn node_subject(&self) -> String {
        format!("{}.node", self.prefix)
    }

    async fn publish(&self, subject: String, payload: Bytes) -> bool {
        self.publish_with_reply(subject, None, payload).await
    }

    async fn publish_with_reply(
        &self,
        subject: String,
        reply: Option<String>,
        payload: Bytes,
    ) -> bool {
        let sent = match reply {
            None => {
                tokio::time::timeout(NATS_PUBLISH_TIMEOUT, self.client.publish(subject, payload))
                    .await
            }
            Some(r) => {
                tokio::time::timeout(
                    NATS_PUBLISH_TIMEOUT,
                    self.client.publish_with_reply(subject, r, payload),
                )
                .await
            }
        };
        match sent {
            Ok(Ok(())) => {
                self.metrics.published.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(Err(e)) => {
                self.metrics.publish_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "NATS publish failed");
                false
            }
            Err(_) => {
                self.metrics.publish_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("NATS publish timed out");
                false
            }
        }
    }

    /// Starts the per-node subscriptions (direct sends, datagrams, heartbeats) and the
    /// datagram publisher.
    pub(crate) async fn start(self: &Arc<Self>) -> Result<(), std::io::Error> {
        let err = |e: async_nats::SubscribeError| {
            std::io::Error::other(format!("cannot subscribe on NATS: {e}"))
        };
        let conns = self
            .client
            .subscribe(format!("{}.conn.{:08x}.*", self.prefix, self.node))
            .await
            .map_err(err)?;
        let dgrams = self
            .client
            .subscribe(self.datagram_inbox())
            .await
            .map_err(err)?;
        let nodes = self
            .client
            .subscribe(self.node_subject())
            .await
            .map_err(err)?;
        let weak = Arc::downgrade(self);
        let mut tasks = vec![
            tokio::spawn(loops::direct(weak.clone(), conns)).abort_handle(),
            tokio::spawn(datagrams::inbox(weak.clone(), dgrams)).abort_handle(),
            tokio::spawn(loops::node(weak.clone(), nodes)).abort_handle(),
            tokio::spawn(loops::heartbeat(weak.clone())).abort_handle(),
        ];
        let outbox = self
            .outbox_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(rx) = outbox {
            tasks.push(tokio::spawn(datagrams::publisher(weak, rx)).abort_handle());
        }
        *self.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        self.client
            .flush()
            .await
            .map_err(|e| std::io::Error::other(format!("cannot reach NATS: {e}")))?;
        Ok(())
    }

    /// Says goodbye (others forget this node's members at once) and stops the loops.
    pub(crate) async fn stop(&self) {
        let goodbye = BusMessage::Goodbye { node: self.node }.encode();
        self.publish(self.node_subject(), goodbye.into()).await;
        let _ = tokio::time::timeout(NATS_PUBLISH_TIMEOUT, self.client.flush()).await;
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        for (_, r) in self.rooms().drain() {
            if let Some(t) = r.task {
                t.abort();
            }
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for t in self
            .tasks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        for (_, r) in self
            .rooms
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            if let Some(t) = r.task {
                t.abort();
            }
        }
    }
}
