//! Horizontal scale-out over NATS core subjects (`--nats URL`).
//!
//! Every node keeps only its own sockets plus what it learned from the bus. Subjects (with the
//! default prefix `pluresdb.relay.v1`, see `docs/relay-nats.md`):
//!
//! - `P.room.<room hex>`: membership and broadcasts of one room; a node subscribes while it
//!   has at least one local member there.
//! - `P.conn.<node hex8>.<counter hex8>`: direct sends to one connection; each node subscribes
//!   to `P.conn.<its node hex8>.*` once.
//! - `P.node`: node heartbeats and goodbyes.
//!
//! Bus messages are relay frames (the same encoder and decoder): `PEER_JOINED`/`PEER_LEFT`
//! announce a member, `JOIN` asks every node for its members of a room (reply subject set),
//! `JOINED` answers with the replying node's local members, `DELIVER` carries traffic,
//! `PING`/`PONG` with the node id are a node's heartbeat and goodbye.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::Shared;
use crate::protocol::{ConnId, Frame, RelayFrame, RoomId, kind};

/// Messages buffered per NATS subscription before the client drops (and reports a slow
/// consumer): bounds memory to this many bus messages (each ≤ `max_frame_bytes`) per
/// subscribed room while a node cannot keep up.
pub const NATS_SUBSCRIPTION_CAPACITY: usize = 4096;
/// Commands (publishes) the NATS client queues towards the server; when full, publishing
/// waits (the sending socket sees backpressure), at most [`NATS_PUBLISH_TIMEOUT`].
pub const NATS_CLIENT_CAPACITY: usize = 4096;
/// Longest wait to hand one message to the NATS client before it counts as a publish error.
pub const NATS_PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// Time to reach the NATS server at start; an unreachable server fails the start clearly.
pub const NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a node says it is alive on `P.node`.
pub const NATS_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// Silence after which another node's members are forgotten (its clients see `PEER_LEFT`):
/// three heartbeats, so one lost heartbeat does not drop anyone.
pub const NATS_NODE_TIMEOUT: Duration = Duration::from_secs(6);
/// Most other nodes one node tracks: bounds the heartbeat table.
pub const NATS_MAX_NODES: usize = 4096;

/// Counters of the NATS path.
#[derive(Debug, Default)]
pub(crate) struct NatsMetrics {
    pub(crate) published: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) publish_errors: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) slow_consumer: AtomicU64,
    pub(crate) disconnects: AtomicU64,
    pub(crate) up: AtomicU64,
}

#[derive(Debug)]
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
    rooms: Mutex<HashMap<RoomId, RemoteRoom>>,
    nodes: Mutex<HashMap<u32, Instant>>,
    pub(crate) metrics: Arc<NatsMetrics>,
    /// False while the NATS connection is down.
    pub(crate) up: watch::Receiver<bool>,
    tasks: Mutex<Vec<AbortHandle>>,
}

fn hex_room(room: &RoomId) -> String {
    hex::encode(room)
}

/// The node part of a connection id.
pub(crate) fn node_of(conn: ConnId) -> u32 {
    (conn >> 32) as u32
}

impl Nats {
    /// Connects to `url`; fails clearly when the server is unreachable.
    pub(crate) async fn connect(url: &str, prefix: &str) -> Result<Self, std::io::Error> {
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
                    "cannot connect to NATS at {url}: no answer within {} ms",
                    NATS_CONNECT_TIMEOUT.as_millis()
                ))
            })?
            .map_err(|e| std::io::Error::other(format!("cannot connect to NATS at {url}: {e}")))?;
        metrics.up.store(1, Ordering::Relaxed);
        let mut id = [0u8; 4];
        getrandom::fill(&mut id).map_err(|e| std::io::Error::other(e.to_string()))?;
        // Node 0 would make ids collide with a relay running without NATS; never use it.
        let node = u32::from_be_bytes(id).max(1);
        // The event callback owns the sender of `up`.
        drop(up_tx);
        Ok(Self {
            client,
            prefix: prefix.to_owned(),
            node,
            rooms: Mutex::default(),
            nodes: Mutex::default(),
            metrics,
            up,
            tasks: Mutex::default(),
        })
    }

    fn rooms(&self) -> MutexGuard<'_, HashMap<RoomId, RemoteRoom>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn room_subject(&self, room: &RoomId) -> String {
        format!("{}.room.{}", self.prefix, hex_room(room))
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

    /// Starts the per-node subscriptions (direct sends, heartbeats).
    pub(crate) async fn start(shared: &Arc<Shared>) -> Result<(), std::io::Error> {
        let Some(nats) = shared.nats.as_ref() else {
            return Ok(());
        };
        let err = |e: async_nats::SubscribeError| {
            std::io::Error::other(format!("cannot subscribe on NATS: {e}"))
        };
        let conns = nats
            .client
            .subscribe(format!("{}.conn.{:08x}.*", nats.prefix, nats.node))
            .await
            .map_err(err)?;
        let nodes = nats
            .client
            .subscribe(nats.node_subject())
            .await
            .map_err(err)?;
        let weak = Arc::downgrade(shared);
        let tasks = vec![
            tokio::spawn(direct_loop(weak.clone(), conns)).abort_handle(),
            tokio::spawn(node_loop(weak.clone(), nodes)).abort_handle(),
            tokio::spawn(heartbeat_loop(weak)).abort_handle(),
        ];
        *nats.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        nats.client
            .flush()
            .await
            .map_err(|e| std::io::Error::other(format!("cannot reach NATS: {e}")))?;
        Ok(())
    }

    /// Says goodbye (others forget this node's members at once) and stops the loops.
    pub(crate) async fn stop(&self) {
        self.publish(
            self.node_subject(),
            Frame::Pong(u64::from(self.node)).encode().into(),
        )
        .await;
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

    /// A local connection joined `room`: follow the room (asking the other nodes for their
    /// members the first time), announce the member, return the members on other nodes.
    pub(crate) async fn join(shared: &Arc<Shared>, room: RoomId, conn: ConnId) -> Vec<ConnId> {
        let Some(nats) = shared.nats.as_ref() else {
            return Vec::new();
        };
        let existing = {
            let mut rooms = nats.rooms();
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
                nats.announce(room, conn).await;
                let wait = shared.config.nats_membership_wait * 4;
                let _ = tokio::time::timeout(wait, ready.wait_for(|v| *v)).await;
            }
            Err(tx) => {
                nats.follow(shared, room, conn).await;
                let _ = tx.send(true);
            }
        }
        nats.rooms()
            .get(&room)
            .map(|r| r.members.iter().copied().collect())
            .unwrap_or_default()
    }

    async fn announce(&self, room: RoomId, conn: ConnId) {
        let announce = Frame::Relay(RelayFrame::PeerJoined { room, peer: conn }).encode();
        self.publish(self.room_subject(&room), announce.into())
            .await;
    }

    /// Subscribes to the room, announces `conn` and collects the other nodes' members.
    async fn follow(&self, shared: &Arc<Shared>, room: RoomId, conn: ConnId) {
        let sub = match self.client.subscribe(self.room_subject(&room)).await {
            Ok(s) => s,
            Err(e) => {
                self.metrics.publish_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot subscribe to a room on NATS");
                return;
            }
        };
        let task = tokio::spawn(room_loop(Arc::downgrade(shared), room, sub)).abort_handle();
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
        let ask = Frame::Client(crate::protocol::ClientFrame::Join { room }).encode();
        self.publish_with_reply(self.room_subject(&room), Some(inbox), ask.into())
            .await;
        let deadline = Instant::now() + shared.config.nats_membership_wait;
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, replies.next()).await {
            self.metrics.received.fetch_add(1, Ordering::Relaxed);
            if let Ok(Frame::Relay(RelayFrame::Joined { room: r, peers })) =
                crate::protocol::decode(&msg.payload)
                && r == room
            {
                self.learn(shared, room, &peers, false).await;
            }
        }
    }

    /// Adds remote members; with `notify`, tells local members (PEER_JOINED).
    async fn learn(&self, shared: &Arc<Shared>, room: RoomId, peers: &[ConnId], notify: bool) {
        let max = shared.config.max_peers_per_room;
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
                if r.members.len() >= max {
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
                let f: Bytes = Frame::Relay(RelayFrame::PeerJoined { room, peer: p })
                    .encode()
                    .into();
                super::conn::notify_room(shared, &room, f).await;
            }
        }
    }

    /// Removes remote members and tells local members (PEER_LEFT).
    async fn forget(&self, shared: &Arc<Shared>, room: RoomId, peer: ConnId) {
        let removed = self
            .rooms()
            .get_mut(&room)
            .is_some_and(|r| r.members.remove(&peer));
        if removed {
            let f: Bytes = Frame::Relay(RelayFrame::PeerLeft { room, peer })
                .encode()
                .into();
            super::conn::notify_room(shared, &room, f).await;
        }
    }

    /// A local connection left `room`; `last` when no local member remained.
    pub(crate) async fn leave(&self, shared: &Shared, room: RoomId, conn: ConnId, last: bool) {
        let notice = Frame::Relay(RelayFrame::PeerLeft { room, peer: conn }).encode();
        self.publish(self.room_subject(&room), notice.into()).await;
        if !last {
            return;
        }
        let removed = {
            // Under the local rooms' lock (always taken before ours), so a connection joining
            // meanwhile either keeps the room followed or follows it anew.
            let local = shared.rooms();
            if local.contains_key(&room) {
                None
            } else {
                self.rooms().remove(&room)
            }
        };
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

/// Room subject: membership, queries and broadcasts.
async fn room_loop(shared: Weak<Shared>, room: RoomId, mut sub: async_nats::Subscriber) {
    while let Some(msg) = sub.next().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(nats) = shared.nats.as_ref() else {
            return;
        };
        nats.metrics.received.fetch_add(1, Ordering::Relaxed);
        let data = msg.payload;
        if data.first() == Some(&kind::DELIVER) {
            // room[32] from:u64 flags:u8 payload: forwarded as is to the local members (the
            // sender is on another node, so none of them).
            if data.len() >= 42 && data[1..33] == room[..] {
                super::conn::forward_room(&shared, &room, data).await;
            } else {
                nats.metrics.dropped.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        match crate::protocol::decode(&data) {
            Ok(Frame::Relay(RelayFrame::PeerJoined { room: r, peer })) if r == room => {
                nats.learn(&shared, room, &[peer], true).await;
            }
            Ok(Frame::Relay(RelayFrame::PeerLeft { room: r, peer })) if r == room => {
                nats.forget(&shared, room, peer).await;
            }
            Ok(Frame::Client(crate::protocol::ClientFrame::Join { room: r })) if r == room => {
                let Some(reply) = msg.reply else { continue };
                let peers = super::conn::local_members(&shared, &room);
                if peers.is_empty() {
                    continue;
                }
                let answer = Frame::Relay(RelayFrame::Joined { room, peers }).encode();
                nats.publish(reply.to_string(), answer.into()).await;
            }
            _ => {
                nats.metrics.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// `P.conn.<node>.*`: DELIVER frames for one local connection.
async fn direct_loop(shared: Weak<Shared>, mut sub: async_nats::Subscriber) {
    while let Some(msg) = sub.next().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(nats) = shared.nats.as_ref() else {
            return;
        };
        nats.metrics.received.fetch_add(1, Ordering::Relaxed);
        let to = msg
            .subject
            .rsplit('.')
            .next()
            .and_then(|t| u32::from_str_radix(t, 16).ok())
            .map(|c| (u64::from(nats.node) << 32) | u64::from(c));
        let data = msg.payload;
        let ok = match to {
            Some(to) if data.first() == Some(&kind::DELIVER) && data.len() >= 42 => {
                let room: RoomId = data[1..33].try_into().unwrap_or([0; 32]);
                super::conn::forward_one(&shared, &room, to, data).await
            }
            _ => false,
        };
        if !ok {
            nats.metrics.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `P.node`: heartbeats (PING node) and goodbyes (PONG node).
async fn node_loop(shared: Weak<Shared>, mut sub: async_nats::Subscriber) {
    let mut check = tokio::time::interval(NATS_HEARTBEAT_INTERVAL);
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => Some(m), None => return },
            _ = check.tick() => None,
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(nats) = shared.nats.as_ref() else {
            return;
        };
        let mut gone = Vec::new();
        match msg.map(|m| crate::protocol::decode(&m.payload)) {
            Some(Ok(Frame::Ping(n))) => {
                nats.metrics.received.fetch_add(1, Ordering::Relaxed);
                let mut nodes = nats.nodes.lock().unwrap_or_else(|p| p.into_inner());
                if nodes.len() < NATS_MAX_NODES || nodes.contains_key(&(n as u32)) {
                    nodes.insert(n as u32, Instant::now());
                }
            }
            Some(Ok(Frame::Pong(n))) => {
                nats.metrics.received.fetch_add(1, Ordering::Relaxed);
                nats.nodes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(n as u32));
                gone.push(n as u32);
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
                nats.forget(&shared, room, c).await;
            }
        }
    }
}

async fn heartbeat_loop(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(NATS_HEARTBEAT_INTERVAL);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(nats) = shared.nats.as_ref() else {
            return;
        };
        let beat = Frame::Ping(u64::from(nats.node)).encode();
        nats.publish(nats.node_subject(), beat.into()).await;
    }
}
