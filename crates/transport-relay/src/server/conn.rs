//! One client connection after the upgrade: its reader loop (frames in bursts, timers, rate
//! pauses, kill signals), which drives the connection's state (`requests`) and spawns its
//! writer task (`writer`).

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Message};

use super::budget::Inbox;
use super::limits::IpSlot;
use super::metrics::DropReason;
use super::outbox::Batch;
use super::requests::Conn;
use super::rooms::{Kill, Member, kill};
use super::state::Shared;
use super::writer;
use crate::protocol::{Frame, RelayFrame, close_code};

/// Most frames handled per wake-up of a connection's reader before its timers and kill
/// signals are looked at again.
const READ_BURST: usize = 256;

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

/// Runs the connection until the client leaves, breaks the protocol, times out, is killed
/// (slow consumer) or the relay shuts down; then leaves its rooms and lets the writer close.
/// `datagrams`: the client speaks `pluresdb-relay.v2` and may be sent datagrams.
pub(super) async fn run<S>(shared: &Shared, ws: WebSocketStream<S>, slot: &IpSlot, datagrams: bool)
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
    let queue = shared.rooms.budget().open(id, kill_tx.clone());
    let inbox = Inbox::new(rx, queue.clone());
    let mut writer = tokio::spawn(writer::run(sink, inbox, kill_rx.clone()));
    let me = Member {
        tx,
        queue,
        kill: kill_tx.clone(),
        datagrams,
    };
    let mut conn = Conn::new(shared, id, me);
    let welcome = Frame::Relay(RelayFrame::Welcome {
        conn: id,
        max_frame: cfg.max_frame_bytes as u32,
        max_rooms: cfg.max_rooms_per_connection as u32,
        max_peers: cfg.max_peers_per_room as u32,
    });
    shared
        .rooms
        .try_queue(&conn.me, Batch::one(&welcome.encode()));

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
                shared.metrics.dropped(DropReason::NatsDown);
                kill(&kill_tx, close_code::GOING_AWAY, "relay lost its NATS connection; reconnect to another relay".into());
                break;
            }
            _ = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if !reads.ever_joined && now >= started + cfg.join_timeout {
                    shared.metrics.dropped(DropReason::JoinTimeout);
                    kill(&kill_tx, close_code::TIMEOUT, format!("no room joined within {} ms", cfg.join_timeout.as_millis()));
                    break;
                }
                if now >= idle_at {
                    shared.metrics.dropped(DropReason::IdleTimeout);
                    kill(&kill_tx, close_code::TIMEOUT, format!("nothing received for {} ms", cfg.idle_timeout.as_millis()));
                    break;
                }
                if now >= ping_at && now >= reads.read_at {
                    ping_nonce += 1;
                    shared.rooms.try_queue(&conn.me, Batch::one(&Frame::Ping(ping_nonce).encode()));
                    last_ping = now;
                }
            }
            msg = stream.next(), if reading => {
                // Frames already buffered or readable are handled in one burst, without
                // re-arming the select's timers per frame.
                // Only relay frames are activity: WebSocket pings and pongs are not (nor are
                // the fragments of an unfinished message, which yield nothing), so a client
                // that sends only those is closed at the idle timeout.
                let mut next = msg;
                let mut burst = 0;
                loop {
                    // Only a binary frame's bytes are held across the await: the reader's
                    // future (one per connection) stays small.
                    let data = match next.map(|m| conn.binary(m, &kill_tx)) {
                        Some(Ok(data)) => Some(data),
                        Some(Err(ControlFlow::Continue(()))) => None,
                        Some(Err(ControlFlow::Break(()))) | None => break 'conn,
                    };
                    if let Some(data) = data {
                        reads.last_rx = Instant::now();
                        if conn.frame_bytes(data, slot, &mut reads, &kill_tx).await.is_break() {
                            break 'conn;
                        }
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
    shared.rooms.budget().close(id);
    drop(conn);
    if tokio::time::timeout(writer::CLOSE_WRITE_TIMEOUT * 2, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
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
                shared.metrics.dropped(DropReason::TextFrame);
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
                shared.metrics.dropped(DropReason::Oversized);
                let reason = match e {
                    tungstenite::error::CapacityError::MessageTooLong { size, max_size } => {
                        format!("relay frame of {size} bytes exceeds the {max_size}-byte limit")
                    }
                    other => other.to_string(),
                };
                kill(kill_tx, close_code::FRAME_TOO_LARGE, reason);
                Err(ControlFlow::Break(()))
            }
            Err(tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            )) => {
                // The socket ended without a close frame (the client crashed, was killed or
                // dropped it): a disconnect like a reset, not a protocol violation.
                tracing::debug!(
                    conn = self.id,
                    "relay connection ended without a close frame"
                );
                Err(ControlFlow::Break(()))
            }
            Err(tungstenite::Error::Protocol(e)) => {
                // RSV bits, reserved opcodes, unmasked or oversized control frames, ...
                shared.metrics.dropped(DropReason::WebSocketProtocol);
                kill(
                    kill_tx,
                    close_code::PROTOCOL_ERROR,
                    format!("WebSocket protocol error: {e}"),
                );
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
            shared.metrics.dropped(DropReason::RateLimited);
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
}
