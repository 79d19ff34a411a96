//! A `Connection` to one remote peer through the relay.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use pluresdb_sync_core::{Connection, Error, MAX_MESSAGE_BYTES, transport::check_message_size};
use tokio::sync::mpsc;
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
#[derive(Debug, Default)]
pub(crate) struct SessionFlags {
    pub(crate) closed: AtomicBool,
}

/// Tells the socket task a session ended locally.
#[derive(Debug)]
pub(crate) enum Ctl {
    Closed { room: RoomId, conn: ConnId, id: u64 },
}

pub(crate) struct RelayConnection {
    pub(crate) peer_id: String,
    pub(crate) room: RoomId,
    pub(crate) remote: ConnId,
    pub(crate) session_id: u64,
    pub(crate) out: mpsc::Sender<Message>,
    pub(crate) ctl: mpsc::Sender<Ctl>,
    pub(crate) inbound: mpsc::Receiver<Vec<u8>>,
    pub(crate) cipher: Option<Arc<snow::StatelessTransportState>>,
    pub(crate) send_nonce: u64,
    pub(crate) recv_nonce: u64,
    pub(crate) partial: Vec<u8>,
    pub(crate) flags: Arc<SessionFlags>,
    pub(crate) link: Arc<LinkState>,
    pub(crate) closed_reported: bool,
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

    /// One SEND frame carrying a chunk with `flag` and `data`.
    fn frame(&mut self, flag: u8, data: &[u8]) -> anyhow::Result<Message> {
        let mut buf = Vec::with_capacity(41 + 2 + data.len() + peer::TAG_LEN);
        buf.push(crate::protocol::kind::SEND);
        buf.extend_from_slice(&self.room);
        buf.extend_from_slice(&self.remote.to_be_bytes());
        match &self.cipher {
            Some(cipher) => {
                buf.push(kind::SEALED);
                let mut plain = Vec::with_capacity(1 + data.len());
                plain.push(flag);
                plain.extend_from_slice(data);
                let start = buf.len();
                buf.resize(start + plain.len() + peer::TAG_LEN, 0);
                let n = cipher
                    .write_message(self.send_nonce, &plain, &mut buf[start..])
                    .map_err(|e| RelayError::Session {
                        conn: self.remote,
                        reason: format!("encryption failed: {e}"),
                    })?;
                self.send_nonce += 1;
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

    fn mark_closed(&mut self) {
        self.flags.closed.store(true, Ordering::Release);
        if !self.closed_reported {
            self.closed_reported = true;
            let _ = self.ctl.try_send(Ctl::Closed {
                room: self.room,
                conn: self.remote,
                id: self.session_id,
            });
        }
    }

    fn fail(&mut self, reason: String) -> anyhow::Error {
        self.mark_closed();
        self.inbound.close();
        RelayError::Session {
            conn: self.remote,
            reason,
        }
        .into()
    }
}

#[async_trait]
impl Connection for RelayConnection {
    fn peer_id(&self) -> &str {
        &self.peer_id
    }

    async fn send(&mut self, data: &[u8]) -> anyhow::Result<()> {
        check_message_size(data.len())?;
        if self.flags.closed.load(Ordering::Acquire) || !self.link.alive.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        let max = peer::chunk_data_max(
            self.link.max_frame.load(Ordering::Relaxed),
            self.cipher.is_some(),
        )
        .max(1);
        let mut chunks = data.chunks(max).peekable();
        if data.is_empty() {
            let m = self.frame(chunk::LAST, &[])?;
            return self.out.send(m).await.map_err(|_| self.closed_error());
        }
        while let Some(c) = chunks.next() {
            let flag = if chunks.peek().is_some() {
                chunk::MORE
            } else {
                chunk::LAST
            };
            let m = self.frame(flag, c)?;
            if self.out.send(m).await.is_err() {
                return Err(self.closed_error());
            }
        }
        Ok(())
    }

    async fn receive(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        loop {
            let Some(frame) = self.inbound.recv().await else {
                self.mark_closed();
                return Ok(None);
            };
            let Some((&k, body)) = frame.split_first() else {
                return Err(self.fail("empty peer frame".into()));
            };
            let plain;
            let chunk_bytes: &[u8] = match (k, &self.cipher) {
                (kind::SEALED, Some(cipher)) => {
                    let mut out = vec![0u8; body.len()];
                    match cipher.read_message(self.recv_nonce, body, &mut out) {
                        Ok(n) => {
                            self.recv_nonce += 1;
                            out.truncate(n);
                            plain = out;
                            &plain
                        }
                        Err(e) => return Err(self.fail(format!("decryption failed: {e}"))),
                    }
                }
                (kind::PLAIN, None) => body,
                (other, _) => {
                    return Err(self.fail(format!(
                        "unexpected peer frame {other:#04x} on an established session"
                    )));
                }
            };
            let Some((&flag, data)) = chunk_bytes.split_first() else {
                return Err(self.fail("empty chunk".into()));
            };
            match flag {
                chunk::MORE | chunk::LAST => {
                    if self.partial.len() + data.len() > MAX_MESSAGE_BYTES {
                        let len = self.partial.len() + data.len();
                        return Err(self.fail(format!(
                            "incoming message of at least {len} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit"
                        )));
                    }
                    self.partial.extend_from_slice(data);
                    if flag == chunk::LAST {
                        return Ok(Some(std::mem::take(&mut self.partial)));
                    }
                }
                chunk::CLOSE => {
                    self.mark_closed();
                    self.inbound.close();
                    self.partial = Vec::new();
                    return Ok(None);
                }
                other => return Err(self.fail(format!("unknown chunk flag {other}"))),
            }
        }
    }

    async fn close(&mut self) -> anyhow::Result<()> {
        if self.flags.closed.swap(true, Ordering::AcqRel) {
            self.mark_closed();
            return Ok(());
        }
        if self.link.alive.load(Ordering::Acquire)
            && let Ok(m) = self.frame(chunk::CLOSE, &[])
        {
            let _ = self.out.send(m).await;
        }
        self.mark_closed();
        self.inbound.close();
        Ok(())
    }
}

impl Drop for RelayConnection {
    fn drop(&mut self) {
        if !self.flags.closed.swap(true, Ordering::AcqRel)
            && self.link.alive.load(Ordering::Acquire)
        {
            // Best effort: the remote learns of the close now instead of when the peer leaves.
            if let Ok(m) = self.frame(chunk::CLOSE, &[]) {
                let _ = self.out.try_send(m);
            }
        }
        self.mark_closed();
    }
}
