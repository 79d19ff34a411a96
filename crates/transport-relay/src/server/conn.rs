//! One client connection: HTTP head, upgrade, then the frame loop.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};

use super::http::{self, HeadError, Prefixed};
use super::metrics::Drop;
use super::outbox::{Batch, BatchBuilder};
use super::{IpSlot, Member, Shared};
use crate::protocol::{
    self, ClientFrame, ConnId, DELIVER_OVERHEAD, ForwardView, Frame, RelayFrame, RoomId,
    SUBPROTOCOL, close_code, error_code, kind,
};

/// How long the writer may take to put a close frame on the wire.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// tungstenite's read chunk per connection (its default is 128 KiB). It dominates idle memory:
/// measured RSS per idle, joined connection (5,000 connections, release build) was 31 KiB with
/// 16 KiB, 23.6 KiB with 8 KiB and 17.7 KiB with 4 KiB. 8 KiB keeps a 64 KiB frame to eight
/// reads; the relay benchmark should settle this against throughput.
const WS_READ_BUFFER_BYTES: usize = 8 * 1024;
/// tungstenite batches writes up to this many bytes before writing to the socket.
const WS_WRITE_BUFFER_BYTES: usize = 16 * 1024;
/// Most queued frames the writer batches before one flush.
const WRITE_BATCH: usize = 64;

type Kill = Arc<watch::Sender<Option<(u16, String)>>>;

fn kill(k: &watch::Sender<Option<(u16, String)>>, code: u16, reason: String) {
    k.send_if_modified(|slot| {
        if slot.is_none() {
            *slot = Some((code, reason));
            true
        } else {
            false
        }
    });
}

pub(super) async fn handle<S>(shared: Arc<Shared>, mut stream: S, peer: SocketAddr, slot: IpSlot)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let head = match tokio::time::timeout_at(deadline, http::read_head(&mut stream)).await {
        Err(_) => {
            shared.metrics.drop(Drop::HandshakeTimeout);
            return;
        }
        Ok(Err(HeadError::TooLarge)) => {
            shared.metrics.drop(Drop::BadUpgrade);
            http::respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "",
                "request head over 8 KiB\n",
            )
            .await;
            return;
        }
        Ok(Err(HeadError::Malformed(e))) => {
            shared.metrics.drop(Drop::BadUpgrade);
            http::respond(
                &mut stream,
                "400 Bad Request",
                "",
                &format!("malformed HTTP request: {e}\n"),
            )
            .await;
            return;
        }
        Ok(Err(HeadError::Io | HeadError::Eof)) => return,
        Ok(Ok(h)) => h,
    };
    let (head, buf) = head;
    if head.path == "/healthz" && !head.upgrade_websocket {
        http::respond(&mut stream, "200 OK", "", "ok").await;
        return;
    }
    if !head.upgrade_websocket {
        shared.metrics.drop(Drop::BadUpgrade);
        http::respond(
            &mut stream,
            "426 Upgrade Required",
            &format!("Upgrade: websocket\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"),
            &format!("this is a pluresdb-sync relay: connect with a WebSocket using the {SUBPROTOCOL} subprotocol\n"),
        )
        .await;
        return;
    }
    if !head.subprotocols.iter().any(|p| p == SUBPROTOCOL) {
        shared.metrics.drop(Drop::BadUpgrade);
        http::respond(
            &mut stream,
            "400 Bad Request",
            "",
            &format!(
                "unsupported WebSocket subprotocol {:?}: this relay speaks {SUBPROTOCOL}\n",
                head.subprotocols.join(", ")
            ),
        )
        .await;
        return;
    }
    if !shared.config.auth_tokens.is_empty()
        && !token_ok(&shared.config.auth_tokens, head.bearer.as_deref())
    {
        shared.metrics.drop(Drop::Unauthorized);
        http::respond(
            &mut stream,
            "401 Unauthorized",
            "WWW-Authenticate: Bearer\r\n",
            "this relay needs a valid bearer token\n",
        )
        .await;
        return;
    }
    if shared.nats.as_ref().is_some_and(|n| !*n.up.borrow()) {
        shared.metrics.drop(Drop::NatsDown);
        http::respond(
            &mut stream,
            "503 Service Unavailable",
            "Retry-After: 1\r\n",
            "this relay has lost its NATS connection; try another relay\n",
        )
        .await;
        return;
    }
    if slot.over_limit {
        shared.metrics.drop(Drop::PerIpLimit);
        http::respond(
            &mut stream,
            "429 Too Many Requests",
            "",
            &format!(
                "more than {} connections from {}\n",
                shared.config.max_connections_per_ip,
                peer.ip()
            ),
        )
        .await;
        return;
    }
    let max = shared.config.max_frame_bytes;
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(WS_WRITE_BUFFER_BYTES)
        .max_write_buffer_size(WS_WRITE_BUFFER_BYTES + 2 * max);
    // The closure's error type is fixed by tungstenite's `Callback` trait.
    #[allow(clippy::result_large_err)]
    let callback = |_: &tungstenite::handshake::server::Request,
                    mut resp: tungstenite::handshake::server::Response| {
        resp.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            tungstenite::http::HeaderValue::from_static(SUBPROTOCOL),
        );
        Ok(resp)
    };
    let ws = match tokio::time::timeout_at(
        deadline,
        tokio_tungstenite::accept_hdr_async_with_config(
            Prefixed::new(buf, stream),
            callback,
            Some(ws_config),
        ),
    )
    .await
    {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            shared.metrics.drop(Drop::BadUpgrade);
            tracing::debug!(%peer, error = %e, "websocket upgrade failed");
            return;
        }
        Err(_) => {
            shared.metrics.drop(Drop::HandshakeTimeout);
            return;
        }
    };
    shared
        .metrics
        .connections_total
        .fetch_add(1, Ordering::Relaxed);
    shared
        .metrics
        .connections_open
        .fetch_add(1, Ordering::Relaxed);
    run(&shared, ws, &slot).await;
    shared
        .metrics
        .connections_open
        .fetch_sub(1, Ordering::Relaxed);
    drop(slot);
}

/// Constant-time comparison against every configured token.
fn token_ok(tokens: &[String], given: Option<&str>) -> bool {
    use subtle::ConstantTimeEq;
    let Some(given) = given else { return false };
    let mut ok = subtle::Choice::from(0);
    for t in tokens {
        // ct_eq on slices of different lengths is false without looking at contents; the
        // token lengths are not secret enough to matter.
        ok |= t.as_bytes().ct_eq(given.as_bytes());
    }
    bool::from(ok)
}

/// Most frames handled per wake-up of a connection's reader before its timers and kill
/// signals are looked at again.
const READ_BURST: usize = 256;

/// Most receivers one burst gathers DELIVERs for before queueing them all (bounds the
/// gathered bytes to this many batches).
const MAX_PENDING_RECEIVERS: usize = 16;

/// The reader's clock.
struct Reads {
    /// When the last frame arrived.
    last_rx: Instant,
    /// Reads pause until this instant when the IP is over its byte rate (TCP then pushes back
    /// on the client; nothing is buffered here).
    read_at: Instant,
    ever_joined: bool,
    /// Binary frames not yet added to the metric (added once per burst: the counter is
    /// shared by every connection).
    received: u64,
}

impl Reads {
    fn count(&mut self, shared: &Shared) {
        shared
            .metrics
            .frames_received
            .fetch_add(std::mem::take(&mut self.received), Ordering::Relaxed);
    }
}

struct Conn<'a> {
    shared: &'a Arc<Shared>,
    id: ConnId,
    me: Member,
    rooms: HashSet<RoomId>,
    /// DELIVERs of the current burst not yet queued, per receiver (see `outbox`).
    pending: Vec<Pending>,
}

/// DELIVERs gathered for one receiver in one room during a burst.
struct Pending {
    room: RoomId,
    to: ConnId,
    member: Member,
    frames: BatchBuilder,
}

async fn run<S>(shared: &Arc<Shared>, ws: WebSocketStream<S>, slot: &IpSlot)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cfg = &shared.config;
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (sink, mut stream) = ws.split();
    // The queue holds batches of frame bytes, not tungstenite `Message`s: a queue block (32
    // slots, allocated with the channel) of 32-byte `Batch`es instead of larger `Message`s
    // saves about 1 KiB per idle connection.
    let (tx, rx) = mpsc::channel::<Batch>(cfg.send_queue_frames);
    let (kill_tx, kill_rx) = watch::channel(None);
    let kill_tx: Kill = Arc::new(kill_tx);
    let mut writer = tokio::spawn(writer(sink, rx, kill_rx.clone()));
    let mut conn = Conn {
        shared,
        id,
        me: Member {
            tx,
            kill: kill_tx.clone(),
        },
        rooms: HashSet::new(),
        pending: Vec::new(),
    };
    let welcome = Frame::Relay(RelayFrame::Welcome {
        conn: id,
        max_frame: cfg.max_frame_bytes as u32,
        max_rooms: cfg.max_rooms_per_connection as u32,
        max_peers: cfg.max_peers_per_room as u32,
    });
    let _ = conn.me.tx.try_send(Batch::one(&welcome.encode()));

    let started = Instant::now();
    let mut reads = Reads {
        last_rx: started,
        read_at: started,
        ever_joined: false,
        received: 0,
    };
    let mut last_ping = started;
    let mut ping_nonce = 0u64;
    let mut shutdown = shared.shutdown.clone();
    let mut killed = kill_rx;
    let mut nats_up = shared.nats.as_ref().map(|n| n.up.clone());
    'conn: loop {
        // A paused reader is not idle: the pause counts as activity.
        let idle_at = reads.last_rx.max(reads.read_at) + cfg.idle_timeout;
        let ping_at = reads.last_rx.max(last_ping).max(reads.read_at) + cfg.ping_interval;
        let mut wake = idle_at.min(ping_at);
        if !reads.ever_joined {
            wake = wake.min(started + cfg.join_timeout);
        }
        let reading = Instant::now() >= reads.read_at;
        if !reading {
            wake = wake.min(reads.read_at);
        }
        tokio::select! {
            _ = killed.changed() => break,
            _ = shutdown.changed() => {
                kill(&kill_tx, close_code::GOING_AWAY, "relay shutting down".into());
                break;
            }
            // A node cut off from the bus cannot reach the other nodes' members: send its
            // clients to another relay.
            () = nats_lost(&mut nats_up) => {
                shared.metrics.drop(Drop::NatsDown);
                kill(&kill_tx, close_code::GOING_AWAY, "relay lost its NATS connection; reconnect to another relay".into());
                break;
            }
            _ = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if !reads.ever_joined && now >= started + cfg.join_timeout {
                    shared.metrics.drop(Drop::JoinTimeout);
                    kill(&kill_tx, close_code::TIMEOUT, format!("no room joined within {} ms", cfg.join_timeout.as_millis()));
                    break;
                }
                if now >= idle_at {
                    shared.metrics.drop(Drop::IdleTimeout);
                    kill(&kill_tx, close_code::TIMEOUT, format!("nothing received for {} ms", cfg.idle_timeout.as_millis()));
                    break;
                }
                if now >= ping_at && now >= reads.read_at {
                    ping_nonce += 1;
                    let _ = conn.me.tx.try_send(Batch::one(&Frame::Ping(ping_nonce).encode()));
                    last_ping = now;
                }
            }
            msg = stream.next(), if reading => {
                // Frames already buffered or readable are handled in one burst, without
                // re-arming the select's timers per frame.
                let mut next = msg;
                let mut burst = 0;
                reads.last_rx = Instant::now();
                loop {
                    // Only a binary frame's bytes are held across the await: the reader's
                    // future (one per connection) stays small.
                    let data = match next.map(|m| conn.binary(m, &kill_tx)) {
                        Some(Ok(data)) => Some(data),
                        Some(Err(ControlFlow::Continue(()))) => None,
                        Some(Err(ControlFlow::Break(()))) | None => break 'conn,
                    };
                    if let Some(data) = data
                        && conn.frame_bytes(data, slot, &mut reads, &kill_tx).await.is_break()
                    {
                        break 'conn;
                    }
                    burst += 1;
                    if burst >= READ_BURST || reads.read_at > reads.last_rx {
                        break;
                    }
                    match stream.next().now_or_never() {
                        Some(m) => next = m,
                        None => break,
                    }
                }
                reads.count(shared);
                conn.flush().await;
            }
        }
    }
    reads.count(shared);
    // Frames the client sent before it went away (or broke the protocol) still go out.
    conn.flush().await;
    conn.leave_all().await;
    kill(&kill_tx, 1000, String::new());
    drop(conn);
    if tokio::time::timeout(CLOSE_WRITE_TIMEOUT * 2, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

async fn writer<S>(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    mut rx: mpsc::Receiver<Batch>,
    mut kill: watch::Receiver<Option<(u16, String)>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        tokio::select! {
            biased;
            _ = kill.changed() => break,
            m = rx.recv() => {
                let Some(m) = m else { break };
                let batch = async {
                    feed(&mut sink, m).await?;
                    for _ in 0..WRITE_BATCH {
                        match rx.try_recv() {
                            Ok(m) => feed(&mut sink, m).await?,
                            Err(_) => break,
                        }
                    }
                    sink.flush().await
                };
                tokio::select! {
                    r = batch => if r.is_err() { return },
                    _ = kill.changed() => break,
                }
            }
        }
    }
    let reason = kill.borrow().clone();
    if let Some((code, text)) = reason {
        let frame = CloseFrame {
            code: code.into(),
            reason: protocol::truncate_utf8(&text, 123).into(),
        };
        // What was queued before the close (replies, errors) goes first, if the client
        // takes it within the timeout; a slow consumer gets only the close attempt.
        let goodbye = async {
            while let Ok(m) = rx.try_recv() {
                feed(&mut sink, m).await?;
            }
            sink.send(Message::Close(Some(frame))).await
        };
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, goodbye).await;
    }
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, sink.close()).await;
}

/// Hands a batch's frames to the WebSocket sink (which writes whenever its buffer fills).
async fn feed<S>(
    sink: &mut futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    batch: Batch,
) -> Result<(), tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for frame in batch.frames() {
        sink.feed(Message::Binary(frame)).await?;
    }
    Ok(())
}

/// Resolves when the NATS connection is down; never without NATS.
async fn nats_lost(up: &mut Option<watch::Receiver<bool>>) {
    match up {
        Some(up) => {
            if up.wait_for(|up| !*up).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Queues a frame to a member; closes that member if its queue stays full longer than the
/// slow-consumer timeout.
async fn queue(shared: &Shared, to: &Member, frame: Batch) -> bool {
    // The common case needs no timer.
    let msg = match to.tx.try_send(frame) {
        Ok(()) => return true,
        Err(mpsc::error::TrySendError::Closed(_)) => return false,
        Err(mpsc::error::TrySendError::Full(m)) => m,
    };
    match to
        .tx
        .send_timeout(msg, shared.config.slow_consumer_timeout)
        .await
    {
        Ok(()) => true,
        Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
            shared.metrics.drop(Drop::SlowConsumer);
            kill(
                &to.kill,
                close_code::SLOW_CONSUMER,
                format!(
                    "send queue full ({} frames) for {} ms",
                    shared.config.send_queue_frames,
                    shared.config.slow_consumer_timeout.as_millis()
                ),
            );
            false
        }
        Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
    }
}

fn local_targets(shared: &Shared, room: &RoomId) -> Vec<Member> {
    shared
        .rooms()
        .get(room)
        .map(|r| r.values().cloned().collect())
        .unwrap_or_default()
}

/// Sends a membership notice from the bus to every local member of `room`.
pub(super) async fn notify_room(shared: &Shared, room: &RoomId, frame: Bytes) {
    let frame = Batch::one(&frame);
    for m in local_targets(shared, room) {
        queue(shared, &m, frame.clone()).await;
    }
}

/// Forwards a broadcast DELIVER from another node to every local member of `room`.
pub(super) async fn forward_room(shared: &Shared, room: &RoomId, frame: Bytes) {
    let len = frame.len();
    let frame = Batch::one(&frame);
    for m in local_targets(shared, room) {
        if queue(shared, &m, frame.clone()).await {
            shared.metrics.forwarded(1, len);
        }
    }
}

/// Forwards a direct DELIVER from another node to local connection `to`, if it is in `room`.
pub(super) async fn forward_one(shared: &Shared, room: &RoomId, to: ConnId, frame: Bytes) -> bool {
    let target = shared.rooms().get(room).and_then(|r| r.get(&to)).cloned();
    let Some(t) = target else { return false };
    let len = frame.len();
    let ok = queue(shared, &t, Batch::one(&frame)).await;
    if ok {
        shared.metrics.forwarded(1, len);
    }
    ok
}

/// The local members of `room`.
pub(super) fn local_members(shared: &Shared, room: &RoomId) -> Vec<ConnId> {
    shared
        .rooms()
        .get(room)
        .map(|r| r.keys().copied().collect())
        .unwrap_or_default()
}

impl Conn<'_> {
    /// The bytes of a binary WebSocket message; `Err(Continue)` for messages to skip,
    /// `Err(Break)` when the connection ends (after `kill` when the client is at fault).
    fn binary(
        &self,
        msg: Result<Message, tungstenite::Error>,
        kill_tx: &Kill,
    ) -> Result<Bytes, ControlFlow<()>> {
        let shared = self.shared;
        match msg {
            Ok(Message::Binary(data)) => Ok(data),
            Ok(Message::Text(_)) => {
                shared.metrics.drop(Drop::TextFrame);
                kill(
                    kill_tx,
                    close_code::TEXT_FRAME,
                    "text frames are not part of the relay protocol; send binary frames".into(),
                );
                Err(ControlFlow::Break(()))
            }
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {
                Err(ControlFlow::Continue(()))
            }
            Ok(Message::Close(_)) => Err(ControlFlow::Break(())),
            Err(tungstenite::Error::Capacity(e)) => {
                shared.metrics.drop(Drop::Oversized);
                let reason = match e {
                    tungstenite::error::CapacityError::MessageTooLong { size, max_size } => {
                        format!("relay frame of {size} bytes exceeds the {max_size}-byte limit")
                    }
                    other => other.to_string(),
                };
                kill(kill_tx, close_code::FRAME_TOO_LARGE, reason);
                Err(ControlFlow::Break(()))
            }
            Err(e) => {
                tracing::debug!(conn = self.id, error = %e, "relay connection read failed");
                Err(ControlFlow::Break(()))
            }
        }
    }

    /// Handles one binary message: rate accounting, then the frame. `Break` ends the
    /// connection (after `kill`).
    async fn frame_bytes(
        &mut self,
        data: Bytes,
        slot: &IpSlot,
        reads: &mut Reads,
        kill_tx: &Kill,
    ) -> ControlFlow<()> {
        let shared = self.shared;
        let pause = slot.charge(data.len());
        if !pause.is_zero() {
            shared.metrics.drop(Drop::RateLimited);
            reads.read_at = Instant::now() + pause;
        }
        reads.received += 1;
        match self.frame(&data).await {
            Ok(joined) => {
                reads.ever_joined |= joined;
                ControlFlow::Continue(())
            }
            Err((code, reason)) => {
                kill(kill_tx, code, reason);
                ControlFlow::Break(())
            }
        }
    }

    /// Handles one frame. `Ok(true)` after a successful JOIN; `Err` closes the connection.
    async fn frame(&mut self, data: &[u8]) -> Result<bool, (u16, String)> {
        // SEND and BROADCAST are viewed in place: the payload is copied once, into DELIVER.
        // Consecutive SENDs gather their DELIVERs per receiver; anything else first queues
        // what was gathered, so every receiver sees frames in the order they were sent.
        let view = protocol::decode_forward(data);
        if let Some(ForwardView::Send { room, to, payload }) = view {
            self.send_to(room, to, payload).await?;
            return Ok(false);
        }
        self.flush().await;
        if let Some(ForwardView::Broadcast { room, payload }) = view {
            self.broadcast(room, payload).await?;
            return Ok(false);
        }
        let m = &self.shared.metrics;
        let frame = protocol::decode(data).map_err(|e| {
            m.drop(if e.close_code() == close_code::UNKNOWN_TYPE {
                Drop::UnknownType
            } else {
                Drop::Malformed
            });
            (e.close_code(), e.to_string())
        })?;
        match frame {
            Frame::Relay(r) => {
                m.drop(Drop::UnknownType);
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
                        Drop::NotInRoom,
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
        }
    }

    fn check_payload(&self, len: usize) -> Result<(), (u16, String)> {
        let max_payload = self.shared.config.max_frame_bytes - DELIVER_OVERHEAD;
        if len > max_payload {
            self.shared.metrics.drop(Drop::Oversized);
            return Err((
                close_code::FRAME_TOO_LARGE,
                format!("payload of {len} bytes exceeds the {max_payload}-byte limit"),
            ));
        }
        Ok(())
    }

    async fn send_to(
        &mut self,
        room: RoomId,
        to: ConnId,
        payload: &[u8],
    ) -> Result<(), (u16, String)> {
        self.check_payload(payload.len())?;
        // A receiver already written to in this room in this burst needs no second lookup
        // (any LEAVE in between would have queued and cleared what was gathered).
        let gathered = self.pending.iter().position(|p| p.to == to);
        if let Some(i) = gathered
            && self.pending[i].room == room
        {
            self.stage(i, room, payload).await;
            return Ok(());
        }
        if !self.rooms.contains(&room) {
            self.error(
                error_code::NOT_IN_ROOM,
                kind::SEND,
                room,
                Drop::NotInRoom,
                "send to a room not joined".into(),
            )
            .await;
            return Ok(());
        }
        let target = self
            .shared
            .rooms()
            .get(&room)
            .and_then(|r| r.get(&to))
            .cloned();
        match target.filter(|_| to != self.id) {
            Some(member) => {
                let i = match gathered {
                    // The same receiver in another room: the same batch, so that it sees
                    // every frame in the order it was sent.
                    Some(i) => {
                        self.pending[i].room = room;
                        i
                    }
                    None => {
                        if self.pending.len() >= MAX_PENDING_RECEIVERS {
                            self.flush().await;
                        }
                        self.gather(to, room, member)
                    }
                };
                self.stage(i, room, payload).await;
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
                    Drop::UnknownPeer,
                    format!("connection {to} is not in this room"),
                )
                .await;
            }
        }
        Ok(())
    }

    async fn broadcast(&mut self, room: RoomId, payload: &[u8]) -> Result<(), (u16, String)> {
        self.check_payload(payload.len())?;
        if !self.rooms.contains(&room) {
            self.error(
                error_code::NOT_IN_ROOM,
                kind::BROADCAST,
                room,
                Drop::NotInRoom,
                "broadcast to a room not joined".into(),
            )
            .await;
            return Ok(());
        }
        let targets = self.members(&room);
        let frame = protocol::encode_deliver(&room, self.id, true, payload);
        let batch = Batch::one(&frame);
        for t in targets {
            if self.notify(&t, batch.clone()).await {
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

    fn members(&self, room: &RoomId) -> Vec<Member> {
        self.shared
            .rooms()
            .get(room)
            .map(|r| {
                r.iter()
                    .filter(|(id, _)| **id != self.id)
                    .map(|(_, m)| m.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn join(&mut self, room: RoomId) -> Result<bool, (u16, String)> {
        let cfg = &self.shared.config;
        if self.rooms.contains(&room) {
            self.error(
                error_code::ALREADY_JOINED,
                kind::JOIN,
                room,
                Drop::AlreadyJoined,
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
                Drop::TooManyRooms,
                format!(
                    "at most {} rooms per connection",
                    cfg.max_rooms_per_connection
                ),
            )
            .await;
            return Ok(false);
        }
        let remote = self
            .shared
            .nats
            .as_ref()
            .map_or(0, |n| n.remote_count(&room));
        let joined = {
            let mut rooms = self.shared.rooms();
            let members = rooms.entry(room).or_default();
            let total = members.len() + remote;
            if total >= cfg.max_peers_per_room {
                if members.is_empty() {
                    rooms.remove(&room);
                }
                Err(total)
            } else {
                let peers: Vec<ConnId> = members.keys().copied().collect();
                let others: Vec<Member> = members.values().cloned().collect();
                members.insert(self.id, self.me.clone());
                Ok((peers, others))
            }
        };
        let (peers, others) = match joined {
            Ok(v) => v,
            Err(full) => {
                self.error(
                    error_code::ROOM_FULL,
                    kind::JOIN,
                    room,
                    Drop::RoomFull,
                    format!("room has {full} members, the limit"),
                )
                .await;
                return Ok(false);
            }
        };
        self.rooms.insert(room);
        let mut peers = peers;
        if self.shared.nats.is_some() {
            let remote = Box::pin(super::nats::Nats::join(self.shared, room, self.id)).await;
            peers.extend(remote);
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
        for o in others {
            self.notify(&o, notice.clone()).await;
        }
        Ok(true)
    }

    async fn leave(&mut self, room: RoomId) {
        let mut last = false;
        let others = {
            let mut rooms = self.shared.rooms();
            let Some(members) = rooms.get_mut(&room) else {
                return;
            };
            members.remove(&self.id);
            let others: Vec<Member> = members.values().cloned().collect();
            if members.is_empty() {
                rooms.remove(&room);
                last = true;
            }
            others
        };
        if let Some(n) = self.shared.nats.as_ref() {
            Box::pin(n.leave(self.shared, room, self.id, last)).await;
        }
        let notice = Batch::one(
            &Frame::Relay(RelayFrame::PeerLeft {
                room,
                peer: self.id,
            })
            .encode(),
        );
        for o in others {
            self.notify(&o, notice.clone()).await;
        }
    }

    async fn leave_all(&mut self) {
        for room in std::mem::take(&mut self.rooms) {
            self.leave(room).await;
        }
    }

    /// Adds a DELIVER to `pending[i]`, first queueing that receiver's batch if it is full.
    /// Adds a DELIVER in `room` to `pending[i]`; when that receiver's batch is full, first
    /// queues everything gathered (see `flush`).
    async fn stage(&mut self, mut i: usize, room: RoomId, payload: &[u8]) {
        if !self.pending[i].frames.fits(payload.len()) {
            let (to, member) = (self.pending[i].to, self.pending[i].member.clone());
            self.flush().await;
            i = self.gather(to, room, member);
        }
        let id = self.id;
        self.pending[i]
            .frames
            .push_deliver(&room, id, false, payload);
    }

    /// Starts gathering DELIVERs for a receiver; its index in `pending`.
    fn gather(&mut self, to: ConnId, room: RoomId, member: Member) -> usize {
        self.pending.push(Pending {
            room,
            to,
            member,
            frames: BatchBuilder::default(),
        });
        self.pending.len() - 1
    }

    /// Queues every receiver's gathered DELIVERs: first to every receiver with room in its
    /// queue, without waiting, then to the ones whose queue was full, waiting at most the
    /// slow-consumer timeout for each. A slow receiver thus never delays what was gathered
    /// for the others.
    async fn flush(&mut self) {
        let mut full = Vec::new();
        for mut p in self.pending.drain(..) {
            let (frames, bytes) = (p.frames.frames(), p.frames.frame_bytes());
            if frames == 0 {
                continue;
            }
            match p.member.tx.try_send(p.frames.take()) {
                Ok(()) => self.shared.metrics.forwarded(frames, bytes),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(batch)) => {
                    full.push((p.member, batch, frames, bytes));
                }
            }
        }
        for (member, batch, frames, bytes) in full {
            if self.notify(&member, batch).await {
                self.shared.metrics.forwarded(frames, bytes);
            }
        }
    }

    /// Queues frames to another member; closes that member if its queue stays full.
    async fn notify(&self, to: &Member, frame: Batch) -> bool {
        queue(self.shared, to, frame).await
    }

    async fn reply(&self, frame: Frame) {
        self.notify(&self.me, Batch::one(&frame.encode())).await;
    }

    async fn error(&self, code: u16, about: u8, room: RoomId, reason: Drop, message: String) {
        self.shared.metrics.drop(reason);
        self.reply(Frame::Relay(RelayFrame::Error {
            code,
            about,
            room,
            message,
        }))
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        let tokens = vec!["secret-one".to_owned(), "two".to_owned()];
        assert!(token_ok(&tokens, Some("two")));
        assert!(token_ok(&tokens, Some("secret-one")));
        assert!(!token_ok(&tokens, Some("secret")));
        assert!(!token_ok(&tokens, Some("")));
        assert!(!token_ok(&tokens, None));
    }
}
