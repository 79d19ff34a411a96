//! A `Connection` to one remote peer through the relay: `send` cuts a message into chunks,
//! seals them and waits for the peer's window; `receive` opens and reassembles them and tells
//! the socket task what it consumed, which returns that credit to the peer.
//!
//! Flow control: the socket task's session machine opens the session's control chunks
//! (CREDIT, CLOSE; their own nonce sequence), publishes the peer's grant in
//! [`RelayConnection::send_limit`] and queues the data frames here, still sealed, charged to
//! the window this side granted (a peer that exceeds it loses the session).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use pluresdb_sync_core::{Connection, Error, MAX_MESSAGE_BYTES, transport::check_message_size};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use super::action::{Opened, SessionId};
use super::flow::{Owed, Window, frame_cost};
use super::wire::{self, Chunk, chunk, kind};
use crate::RelayError;
use crate::error::SessionError;
use crate::protocol::{ConnId, RoomId};

/// Shared between the socket task and the connections of one relay socket.
#[derive(Debug)]
pub(crate) struct LinkState {
    /// The relay's frame limit (from WELCOME).
    pub(crate) max_frame: AtomicUsize,
    /// False once the relay socket is gone or the transport disconnected.
    pub(crate) alive: AtomicBool,
    /// True once the application disconnected the transport.
    pub(crate) disconnected: AtomicBool,
}

impl LinkState {
    /// The state of a socket with frame limit `max_frame`; `alive` once it is up.
    pub(crate) fn new(max_frame: usize, alive: bool) -> Self {
        Self {
            max_frame: AtomicUsize::new(max_frame),
            alive: AtomicBool::new(alive),
            disconnected: AtomicBool::new(false),
        }
    }
}

/// What the socket task queues towards a `Connection`. Unbounded as a channel, bounded by the
/// window: only frames the peer had credit for are queued, and credit returns only as frames
/// leave the queue.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// A data peer frame (SEALED or PLAIN: MORE, LAST or ABORT), as received; `cost` credit
    /// units.
    Frame { frame: Vec<u8>, cost: u64 },
    /// The socket task ended the session (a malformed control chunk, an unexpected frame, or a
    /// flow-control violation).
    Failed(RelayError),
}

/// What a connection tells the socket task. The channel is unbounded but holds little: per
/// connection at most one `Closed` and the `Consumed` messages for one window (each is a
/// quarter of it, and the peer can send more only once the socket task processed them).
#[derive(Debug)]
pub(crate) enum Ctl {
    /// The connection ended on this side. `failed`: after a protocol error it found itself
    /// (the peer is told with REJECT, no session); otherwise the socket task sends CLOSE.
    Closed {
        room: RoomId,
        conn: ConnId,
        session: SessionId,
        failed: bool,
    },
    /// The application consumed `n` credit units: return them to the peer (CREDIT).
    Consumed {
        room: RoomId,
        conn: ConnId,
        session: SessionId,
        n: u64,
    },
}

pub(crate) struct RelayConnection {
    peer_id: String,
    room: RoomId,
    remote: ConnId,
    pub(crate) session: SessionId,
    /// The relay socket's outbound queue (bounded; shared by the transport's connections).
    out: mpsc::Sender<Message>,
    ctl: mpsc::UnboundedSender<Ctl>,
    inbound: mpsc::UnboundedReceiver<Inbound>,
    cipher: Option<Arc<snow::StatelessTransportState>>,
    /// Next nonce of our data sequence.
    send_nonce: u64,
    /// Next nonce of the peer's data sequence.
    recv_nonce: u64,
    /// The peer's window: its grants (followed from `send_limit`) and what we sent.
    send: Window,
    /// The peer's total grant; the socket task raises it, and drops the sender when the
    /// session ends.
    send_limit: watch::Receiver<u64>,
    /// Credit consumed by the application and not yet returned.
    owed: Owed,
    partial: Vec<u8>,
    /// A send was cancelled after some chunks of its message left: the next send starts with
    /// ABORT so the peer drops them.
    mid_message: bool,
    link: Arc<LinkState>,
    /// The session ended on this side (close, a failure or drop) and the socket task was told.
    closed: bool,
    /// The session failed (`receive` returned its error): later `receive`s return `Ok(None)`,
    /// never a frame still queued behind the failure.
    failed: bool,
}

impl std::fmt::Debug for RelayConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayConnection")
            .field("peer_id", &self.peer_id)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// The socket task's ends of a connection's channels.
pub(crate) struct Handle {
    pub(crate) inbound: mpsc::UnboundedSender<Inbound>,
    pub(crate) credit: watch::Sender<u64>,
}

impl RelayConnection {
    /// The connection of the session `o` opened, and the socket task's handle to it.
    pub(crate) fn open(
        o: Opened,
        out: mpsc::Sender<Message>,
        ctl: mpsc::UnboundedSender<Ctl>,
        link: Arc<LinkState>,
    ) -> (Self, Handle) {
        let (inbound_tx, inbound) = mpsc::unbounded_channel();
        let (credit, send_limit) = watch::channel(u64::from(o.window));
        let conn = Self {
            peer_id: o.peer_id,
            room: o.room,
            remote: o.conn,
            session: o.session,
            out,
            ctl,
            inbound,
            cipher: o.cipher,
            send_nonce: 0,
            recv_nonce: 0,
            send: Window::new(o.window),
            send_limit,
            owed: Owed::default(),
            partial: Vec::new(),
            mid_message: false,
            link,
            closed: false,
            failed: false,
        };
        let handle = Handle {
            inbound: inbound_tx,
            credit,
        };
        (conn, handle)
    }

    /// The session is over for `send`: closed here, ended by the socket task, or the link is
    /// gone.
    fn is_closed(&self) -> bool {
        self.closed
            || self.send_limit.has_changed().is_err()
            || !self.link.alive.load(Ordering::Acquire)
    }

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

    /// Ends the session on this side and tells the socket task (once).
    fn mark_closed(&mut self, failed: bool) {
        if !self.closed {
            self.closed = true;
            let _ = self.ctl.send(Ctl::Closed {
                room: self.room,
                conn: self.remote,
                session: self.session,
                failed,
            });
        }
    }

    /// Ends the session after a failure: the peer is told (REJECT from the socket task), and
    /// what is still queued is dropped, so later `receive`s return `Ok(None)`.
    fn fail(&mut self, cause: SessionError) -> anyhow::Error {
        self.mark_closed(true);
        self.ended_with_failure();
        RelayError::peer_session(self.remote, &self.peer_id, cause).into()
    }

    fn ended_with_failure(&mut self) {
        self.closed = true;
        self.failed = true;
        self.inbound.close();
        while self.inbound.try_recv().is_ok() {}
        self.partial = Vec::new();
    }

    /// Waits (cancel safe) until the peer's window has room for `cost` more credit units.
    async fn wait_credit(&mut self, cost: u64) -> anyhow::Result<()> {
        loop {
            if self.is_closed() {
                return Err(self.closed_error());
            }
            self.send.raise_to(*self.send_limit.borrow_and_update());
            if self.send.fits(cost) {
                return Ok(());
            }
            if self.send_limit.changed().await.is_err() {
                return Err(self.closed_error());
            }
        }
    }

    /// Sends one data (or ABORT) chunk within the peer's window.
    async fn send_chunk(&mut self, flag: u8, data: &[u8]) -> anyhow::Result<()> {
        let cost = frame_cost(wire::chunk_frame_len(data.len(), self.cipher.is_some()));
        self.wait_credit(cost).await?;
        let Ok(permit) = self.out.reserve().await else {
            return Err(self.closed_error());
        };
        // From here on nothing awaits: the nonce is used exactly when the frame is queued.
        let sealed = wire::seal(
            self.cipher.as_deref(),
            &mut self.send_nonce,
            &self.room,
            self.remote,
            flag,
            data,
        );
        match sealed {
            Ok(frame) => permit.send(Message::Binary(frame.into())),
            Err(e) => {
                drop(permit);
                return Err(self.fail(e));
            }
        }
        if self.send.spend(cost).is_err() {
            // Checked by wait_credit, and only this task spends.
            return Err(self.closed_error());
        }
        Ok(())
    }

    /// The chunk of a queued data frame: opened (encrypted) or read as it is (PLAIN), and
    /// where its flag byte is.
    fn open_frame(&mut self, frame: Vec<u8>) -> Result<(Vec<u8>, usize), SessionError> {
        match (frame.first().copied(), &self.cipher) {
            (Some(kind::SEALED), Some(cipher)) => {
                let plain = wire::open(cipher, self.recv_nonce, &frame)?;
                self.recv_nonce += 1;
                Ok((plain, 0))
            }
            (Some(kind::PLAIN), None) => Ok((frame, 1)),
            (other, _) => Err(SessionError::Malformed {
                what: format!(
                    "unexpected peer frame {:#04x} on an established session",
                    other.unwrap_or(0)
                ),
            }),
        }
    }

    /// Adds a data frame to the message being reassembled: the message when it is complete.
    fn reassemble(&mut self, frame: Vec<u8>) -> Result<Option<Vec<u8>>, SessionError> {
        let (mut plain, at) = self.open_frame(frame)?;
        let last = match wire::decode_chunk(&plain[at..])? {
            Chunk::Data { last, .. } => last,
            Chunk::Abort => {
                self.partial = Vec::new();
                return Ok(None);
            }
            Chunk::Credit(_) | Chunk::Close => {
                return Err(SessionError::Malformed {
                    what: "a control chunk in the data sequence".into(),
                });
            }
        };
        let data_len = plain.len() - at - 1;
        let len = self.partial.len() + data_len;
        if len > MAX_MESSAGE_BYTES {
            return Err(SessionError::MessageTooLarge {
                len,
                max: MAX_MESSAGE_BYTES,
            });
        }
        if last && self.partial.is_empty() {
            plain.drain(..at + 1);
            return Ok(Some(plain));
        }
        self.partial.extend_from_slice(&plain[at + 1..]);
        Ok(last.then(|| std::mem::take(&mut self.partial)))
    }
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
        if self.is_closed() {
            return Err(self.closed_error());
        }
        if self.mid_message {
            self.send_chunk(chunk::ABORT, &[]).await?;
            self.mid_message = false;
        }
        let max = wire::chunk_data_max(
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
            let Some(item) = self.inbound.recv().await else {
                // Ended by the peer (CLOSE, REJECT, it left) or by the socket's loss.
                self.closed = true;
                self.partial = Vec::new();
                return Ok(None);
            };
            match item {
                Inbound::Frame { frame, cost } => {
                    if let Some(n) = self.owed.consumed(cost) {
                        let _ = self.ctl.send(Ctl::Consumed {
                            room: self.room,
                            conn: self.remote,
                            session: self.session,
                            n,
                        });
                    }
                    match self.reassemble(frame) {
                        Ok(Some(message)) => return Ok(Some(message)),
                        Ok(None) => {}
                        Err(e) => return Err(self.fail(e)),
                    }
                }
                Inbound::Failed(e) => {
                    // The socket task ended the session and told the peer.
                    self.ended_with_failure();
                    return Err(e.into());
                }
            }
        }
    }

    async fn close(&mut self) -> anyhow::Result<()> {
        self.mark_closed(false);
        self.inbound.close();
        Ok(())
    }
}

impl Drop for RelayConnection {
    fn drop(&mut self) {
        // The socket task sends the CLOSE, after every frame this connection queued.
        self.mark_closed(false);
    }
}
