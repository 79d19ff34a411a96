//! A `Connection` to one remote peer through the relay.
//!
//! Flow control: the socket task opens the session's control chunks (CREDIT, CLOSE; their own
//! nonce sequence), applies CREDIT to [`RelayConnection::send_limit`] and queues the data frames
//! here, still sealed, charging each to the window this side granted (a peer that exceeds it
//! loses the session). `receive` decrypts them and returns credit as it consumes them; `send`
//! waits until the peer's window has room.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use async_trait::async_trait;
use pluresdb_sync_core::{Connection, Error, MAX_MESSAGE_BYTES, transport::check_message_size};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use super::peer::{self, chunk, kind};
use crate::RelayError;
use crate::protocol::{ConnId, RoomId};

/// Shared between the socket task and the connections of one relay link.
#[derive(Debug)]
pub(crate) struct LinkState {
    /// The relay's frame limit (from WELCOME).
    pub(crate) max_frame: AtomicUsize,
    /// False once the relay socket is gone or the transport disconnected.
    pub(crate) alive: AtomicBool,
    /// True once the application disconnected the transport.
    pub(crate) disconnected: AtomicBool,
}

/// Shared between a session in the socket task and its `Connection`.
#[derive(Debug)]
pub(crate) struct SessionFlags {
    pub(crate) closed: AtomicBool,
    /// Credit units this side granted the peer in total (the initial window plus every CREDIT
    /// sent). Raised by the connection before the CREDIT leaves, read by the socket task to
    /// police the peer.
    pub(crate) granted: AtomicU64,
}

impl SessionFlags {
    pub(crate) fn new() -> Self {
        Self {
            closed: AtomicBool::new(false),
            granted: AtomicU64::new(u64::from(peer::FLOW_WINDOW_BYTES)),
        }
    }
}

/// What the socket task queues towards a `Connection`.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// A data peer frame (SEALED or PLAIN: MORE, LAST or ABORT), as received; `cost` credit
    /// units.
    Frame { frame: Vec<u8>, cost: u64 },
    /// The remote closed the connection.
    Close,
    /// The socket task ended the session (a malformed control chunk, an unexpected frame, or a
    /// flow-control violation): the reason.
    Failed(String),
}

/// Tells the socket task a session ended locally.
#[derive(Debug)]
pub(crate) enum Ctl {
    /// `notified`: a CLOSE for the session was queued towards the peer. When not, the socket
    /// task tells the peer with a REJECT (no session), so that its `send` does not wait for
    /// credit forever.
    Closed {
        room: RoomId,
        conn: ConnId,
        id: u64,
        notified: bool,
    },
}

pub(crate) struct RelayConnection {
    pub(crate) peer_id: String,
    pub(crate) room: RoomId,
    pub(crate) remote: ConnId,
    pub(crate) session_id: u64,
    pub(crate) out: mpsc::Sender<Message>,
    pub(crate) ctl: mpsc::Sender<Ctl>,
    /// Unbounded as a channel, bounded by the window: the socket task only queues frames the
    /// peer had credit for, and credit returns only as frames leave this queue.
    pub(crate) inbound: mpsc::UnboundedReceiver<Inbound>,
    pub(crate) cipher: Option<Arc<snow::StatelessTransportState>>,
    /// Next nonce of our data sequence.
    pub(crate) send_nonce: u64,
    /// Next nonce of our control sequence (from [`peer::CONTROL_NONCE_BASE`]).
    pub(crate) send_ctl_nonce: u64,
    /// Next nonce of the peer's data sequence.
    pub(crate) recv_nonce: u64,
    pub(crate) partial: Vec<u8>,
    pub(crate) flags: Arc<SessionFlags>,
    pub(crate) link: Arc<LinkState>,
    pub(crate) closed_reported: bool,
    /// Credit units the peer granted us in total (its window plus its CREDITs); the socket
    /// task raises it, and drops the sender when the session ends.
    pub(crate) send_limit: watch::Receiver<u64>,
    /// Credit units sent so far.
    pub(crate) sent: u64,
    /// Credit units consumed by the application and not yet returned to the peer.
    pub(crate) ungranted: u64,
    /// A send was cancelled after some chunks of its message left: the next send starts with
    /// ABORT so the peer drops them.
    pub(crate) mid_message: bool,
    /// The session failed (`receive` returned its error): later `receive`s return `Ok(None)`,
    /// never a frame still queued behind the failure.
    pub(crate) failed: bool,
}

impl std::fmt::Debug for RelayConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayConnection")
            .field("peer_id", &self.peer_id)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

impl RelayConnection {
    fn closed_error(&self) -> anyhow::Error {
        if self.link.disconnected.load(Ordering::Acquire) {
            Error::TransportDisconnected { transport: "relay" }.into()
        } else {
            Error::ConnectionClosed {
                peer_id: self.peer_id.clone(),
            }
            .into()
        }
    }

    /// One SEND frame carrying a control chunk (CREDIT or CLOSE) with `flag` and `data`, in the
    /// control nonce sequence. Uses a nonce: only call it when the frame will surely be queued
    /// (hold a permit).
    fn control_frame(&mut self, flag: u8, data: &[u8]) -> anyhow::Result<Message> {
        seal(
            self.cipher.as_deref(),
            &mut self.send_ctl_nonce,
            &self.room,
            self.remote,
            flag,
            data,
        )
    }

    /// Marks the session closed and tells the socket task (once); `notified`: a CLOSE was
    /// queued towards the peer.
    fn mark_closed(&mut self, notified: bool) {
        self.flags.closed.store(true, Ordering::Release);
        if !self.closed_reported {
            self.closed_reported = true;
            let _ = self.ctl.try_send(Ctl::Closed {
                room: self.room,
                conn: self.remote,
                id: self.session_id,
                notified,
            });
        }
    }

    /// Closes the session from the socket task, which then sends the returned CLOSE itself
    /// (for a connection nobody claimed). `None` if it cannot be sealed.
    pub(crate) fn close_from_driver(&mut self) -> Option<Message> {
        self.flags.closed.store(true, Ordering::Release);
        self.closed_reported = true;
        self.inbound.close();
        self.control_frame(chunk::CLOSE, &[]).ok()
    }

    /// Ends the session after a failure: the peer is told (REJECT from the socket task), and
    /// what is still queued is dropped, so later `receive`s return `Ok(None)`.
    fn fail(&mut self, reason: String) -> anyhow::Error {
        self.mark_closed(false);
        self.failed = true;
        self.inbound.close();
        while self.inbound.try_recv().is_ok() {}
        self.partial = Vec::new();
        RelayError::Session {
            conn: self.remote,
            reason,
        }
        .into()
    }

    /// Returns the consumed credit to the peer through a reserved slot of the outbound queue
    /// (the permit borrows a clone of `out`, so the nonce is used only for a queued frame).
    fn grant(&mut self, permit: mpsc::Permit<'_, Message>) {
        let n = std::mem::take(&mut self.ungranted);
        // Raised before the CREDIT leaves, so the socket task never polices the peer with a
        // lower total than the peer may use.
        self.flags.granted.fetch_add(n, Ordering::AcqRel);
        match self.control_frame(chunk::CREDIT, &n.to_be_bytes()) {
            Ok(m) => permit.send(m),
            Err(_) => self.flags.closed.store(true, Ordering::Release),
        }
    }

    /// Sends the credit owed if it reached the threshold and the outbound queue has room now.
    fn try_grant(&mut self) {
        if self.ungranted < peer::FLOW_GRANT_THRESHOLD {
            return;
        }
        let out = self.out.clone();
        match out.try_reserve() {
            Ok(permit) => self.grant(permit),
            // The link is gone: nobody to return credit to.
            Err(mpsc::error::TrySendError::Closed(())) => self.ungranted = 0,
            // Sent from the next receive or send (they wait for room).
            Err(mpsc::error::TrySendError::Full(())) => {}
        }
    }

    /// The outbound queue to wait on for room, when credit is owed (it was full when the
    /// credit became due): a wait for data or credit also returns the credit owed.
    fn owed_credit_out(&self) -> Option<mpsc::Sender<Message>> {
        (self.ungranted >= peer::FLOW_GRANT_THRESHOLD).then(|| self.out.clone())
    }

    /// Sends the credit owed through the slot [`room_for_credit`] reserved; if the link is gone
    /// there is nobody to return it to.
    fn grant_reserved(
        &mut self,
        slot: Result<mpsc::Permit<'_, Message>, mpsc::error::SendError<()>>,
    ) {
        match slot {
            Ok(p) => self.grant(p),
            Err(_) => self.ungranted = 0,
        }
    }

    /// Waits (cancel safe) until the peer's window has room for `cost` more credit units,
    /// meanwhile returning credit we owe it.
    async fn wait_credit(&mut self, cost: u64) -> anyhow::Result<()> {
        loop {
            if self.flags.closed.load(Ordering::Acquire) || !self.link.alive.load(Ordering::Acquire)
            {
                return Err(self.closed_error());
            }
            let limit = *self.send_limit.borrow_and_update();
            if limit.saturating_sub(self.sent) >= cost {
                return Ok(());
            }
            let out = self.owed_credit_out();
            tokio::select! {
                r = self.send_limit.changed() => r.map_err(|_| self.closed_error())?,
                p = room_for_credit(out.as_ref()) => self.grant_reserved(p),
            }
        }
    }

    /// Sends one data (or ABORT) chunk within the peer's window.
    async fn send_chunk(&mut self, flag: u8, data: &[u8]) -> anyhow::Result<()> {
        let cost = peer::frame_cost(peer::chunk_frame_len(data.len(), self.cipher.is_some()));
        self.wait_credit(cost).await?;
        let Ok(permit) = self.out.reserve().await else {
            return Err(self.closed_error());
        };
        // From here on nothing awaits: the nonce is used exactly when the frame is queued.
        let m = seal(
            self.cipher.as_deref(),
            &mut self.send_nonce,
            &self.room,
            self.remote,
            flag,
            data,
        )?;
        permit.send(m);
        self.sent += cost;
        Ok(())
    }
}

/// A slot of `out` for the credit owed; never ready when nothing is owed (`None`).
async fn room_for_credit(
    out: Option<&mpsc::Sender<Message>>,
) -> Result<mpsc::Permit<'_, Message>, mpsc::error::SendError<()>> {
    match out {
        Some(out) => out.reserve().await,
        None => std::future::pending().await,
    }
}

/// One SEND frame to `remote` carrying a chunk with `flag` and `data`, sealed with `nonce`
/// (then advanced) when the session is encrypted.
fn seal(
    cipher: Option<&snow::StatelessTransportState>,
    nonce: &mut u64,
    room: &RoomId,
    remote: ConnId,
    flag: u8,
    data: &[u8],
) -> anyhow::Result<Message> {
    let mut buf = Vec::with_capacity(41 + 2 + data.len() + peer::TAG_LEN);
    buf.push(crate::protocol::kind::SEND);
    buf.extend_from_slice(room);
    buf.extend_from_slice(&remote.to_be_bytes());
    match cipher {
        Some(cipher) => {
            buf.push(kind::SEALED);
            let mut plain = Vec::with_capacity(1 + data.len());
            plain.push(flag);
            plain.extend_from_slice(data);
            let start = buf.len();
            buf.resize(start + plain.len() + peer::TAG_LEN, 0);
            let n = cipher
                .write_message(*nonce, &plain, &mut buf[start..])
                .map_err(|e| RelayError::Session {
                    conn: remote,
                    reason: format!("encryption failed: {e}"),
                })?;
            *nonce += 1;
            buf.truncate(start + n);
        }
        None => {
            buf.push(kind::PLAIN);
            buf.push(flag);
            buf.extend_from_slice(data);
        }
    }
    Ok(Message::Binary(buf.into()))
}

#[async_trait]
impl Connection for RelayConnection {
    fn peer_id(&self) -> &str {
        &self.peer_id
    }

    /// Waits while the peer's flow-control window is full (its application is not reading).
    /// Cancelling it loses at most this message: if some of its chunks already left, the next
    /// `send` tells the peer to drop them (ABORT), so the peer never sees a corrupt message.
    async fn send(&mut self, data: &[u8]) -> anyhow::Result<()> {
        check_message_size(data.len())?;
        if self.flags.closed.load(Ordering::Acquire) || !self.link.alive.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        if self.mid_message {
            self.send_chunk(chunk::ABORT, &[]).await?;
            self.mid_message = false;
        }
        let max = peer::chunk_data_max(
            self.link.max_frame.load(Ordering::Relaxed),
            self.cipher.is_some(),
        )
        .max(1);
        if data.is_empty() {
            return self.send_chunk(chunk::LAST, &[]).await;
        }
        let mut chunks = data.chunks(max).peekable();
        while let Some(c) = chunks.next() {
            let last = chunks.peek().is_none();
            let flag = if last { chunk::LAST } else { chunk::MORE };
            self.send_chunk(flag, c).await?;
            self.mid_message = !last;
        }
        Ok(())
    }

    async fn receive(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        if self.failed {
            return Ok(None);
        }
        loop {
            let out = self.owed_credit_out();
            let item = tokio::select! {
                item = self.inbound.recv() => item,
                p = room_for_credit(out.as_ref()) => {
                    self.grant_reserved(p);
                    continue;
                }
            };
            let Some(item) = item else {
                self.mark_closed(false);
                return Ok(None);
            };
            match item {
                Inbound::Frame { frame, cost } => {
                    self.ungranted += cost;
                    self.try_grant();
                    let (plain, skip) = match (frame.first().copied(), &self.cipher) {
                        (Some(kind::SEALED), Some(cipher)) => {
                            let mut out = vec![0u8; frame.len() - 1];
                            match cipher.read_message(self.recv_nonce, &frame[1..], &mut out) {
                                Ok(n) => {
                                    self.recv_nonce += 1;
                                    out.truncate(n);
                                    (out, 0)
                                }
                                Err(e) => {
                                    return Err(self.fail(format!("decryption failed: {e}")));
                                }
                            }
                        }
                        (Some(kind::PLAIN), None) => (frame, 1),
                        (other, _) => {
                            return Err(self.fail(format!(
                                "unexpected peer frame {:#04x} on an established session",
                                other.unwrap_or(0)
                            )));
                        }
                    };
                    let last = match peer::decode_chunk(&plain[skip..]) {
                        Ok(peer::Chunk::Data { last, .. }) => last,
                        Ok(peer::Chunk::Abort) => {
                            self.partial = Vec::new();
                            continue;
                        }
                        Ok(peer::Chunk::Credit(_) | peer::Chunk::Close) => {
                            return Err(self.fail("a control chunk in the data sequence".into()));
                        }
                        Err(e) => return Err(self.fail(e)),
                    };
                    let data = &plain[skip + 1..];
                    if self.partial.len() + data.len() > MAX_MESSAGE_BYTES {
                        let len = self.partial.len() + data.len();
                        return Err(self.fail(format!(
                            "incoming message of at least {len} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit"
                        )));
                    }
                    if last && self.partial.is_empty() {
                        let mut plain = plain;
                        plain.drain(..skip + 1);
                        return Ok(Some(plain));
                    }
                    self.partial.extend_from_slice(data);
                    if last {
                        return Ok(Some(std::mem::take(&mut self.partial)));
                    }
                }
                Inbound::Close => {
                    self.mark_closed(false);
                    self.inbound.close();
                    self.partial = Vec::new();
                    return Ok(None);
                }
                Inbound::Failed(reason) => return Err(self.fail(reason)),
            }
        }
    }

    async fn close(&mut self) -> anyhow::Result<()> {
        if self.flags.closed.swap(true, Ordering::AcqRel) {
            self.mark_closed(false);
            return Ok(());
        }
        // Cancelled while waiting for room: `closed` is already set, so Drop reports the close
        // unnotified and the socket task tells the peer (REJECT).
        let mut notified = false;
        if self.link.alive.load(Ordering::Acquire) {
            // CLOSE needs no credit: a session can always be closed.
            let out = self.out.clone();
            if let Ok(permit) = out.reserve().await
                && let Ok(m) = self.control_frame(chunk::CLOSE, &[])
            {
                permit.send(m);
                notified = true;
            }
        }
        self.mark_closed(notified);
        self.inbound.close();
        Ok(())
    }
}

impl Drop for RelayConnection {
    fn drop(&mut self) {
        let mut notified = false;
        if !self.flags.closed.swap(true, Ordering::AcqRel)
            && self.link.alive.load(Ordering::Acquire)
        {
            // Best effort: the remote learns of the close now instead of when the peer leaves.
            // When the outbound queue is full, the socket task sends a REJECT instead.
            let out = self.out.clone();
            if let Ok(permit) = out.try_reserve()
                && let Ok(m) = self.control_frame(chunk::CLOSE, &[])
            {
                permit.send(m);
                notified = true;
            }
        }
        self.mark_closed(notified);
    }
}
