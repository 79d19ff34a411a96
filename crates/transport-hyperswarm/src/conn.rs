//! A connection handed to the application: length-prefixed messages on the one QUIC stream.

use std::time::Duration;

use async_trait::async_trait;
use pluresdb_sync_core::{Connection, Error, transport::check_message_size};
use quinn::{ReadError, RecvStream, SendStream, VarInt};

use crate::wire::{self, FRAME_HEADER_LEN};

/// QUIC application close codes.
pub(crate) mod code {
    use quinn::VarInt;
    /// Closed normally (by `close`, or after the remote finished).
    pub(crate) const CLOSED: VarInt = VarInt::from_u32(0);
    /// A connection between these peers already exists.
    pub(crate) const DUPLICATE: VarInt = VarInt::from_u32(1);
    /// The remote broke the protocol.
    pub(crate) const PROTOCOL: VarInt = VarInt::from_u32(2);
    /// Too many peers or a full queue.
    pub(crate) const BUSY: VarInt = VarInt::from_u32(3);
    /// The topic tag matches no topic joined here.
    pub(crate) const UNKNOWN_TOPIC: VarInt = VarInt::from_u32(4);
    /// The address is this very node.
    pub(crate) const SELF: VarInt = VarInt::from_u32(5);
    /// The transport disconnected.
    pub(crate) const DISCONNECT: VarInt = VarInt::from_u32(6);
    /// An identify exchange is done.
    pub(crate) const DONE: VarInt = VarInt::from_u32(7);
    /// A newer connection to the same peer replaced this one.
    pub(crate) const REPLACED: VarInt = VarInt::from_u32(8);
    /// The relay route the connection used is gone (the peer left the room, or a relay
    /// socket was lost).
    pub(crate) const PATH_LOST: VarInt = VarInt::from_u32(9);

    /// A short text for a close code received from a remote.
    pub(crate) fn describe(code: VarInt) -> &'static str {
        match code.into_inner() {
            0 => "closed",
            1 => "duplicate connection",
            2 => "protocol violation",
            3 => "busy (too many peers or a full queue)",
            4 => "not on this topic",
            5 => "self",
            6 => "disconnected",
            7 => "done",
            8 => "replaced by a newer connection",
            9 => "relay path lost",
            _ => "unknown reason",
        }
    }
}

/// Messages larger than this are read in pieces, so a remote announcing a 16 MiB message
/// and sending nothing costs no more than this.
const INITIAL_PAYLOAD_CAPACITY: usize = 64 * 1024;

/// How long `close` lets the remote acknowledge the last messages before the QUIC
/// connection is closed (after which unacknowledged data is lost).
pub(crate) const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// One open connection to a remote peer.
pub(crate) struct HsConnection {
    peer_id: String,
    conn: quinn::Connection,
    send: SendStream,
    recv: RecvStream,
    closed_locally: bool,
    remote_done: bool,
    /// A send was cancelled half-way: the stream is out of sync and unusable.
    poisoned: bool,
    header: [u8; FRAME_HEADER_LEN],
    header_filled: usize,
    payload: Option<(usize, Vec<u8>)>,
}

impl HsConnection {
    pub(crate) fn new(
        peer_id: String,
        conn: quinn::Connection,
        send: SendStream,
        recv: RecvStream,
    ) -> Self {
        Self {
            peer_id,
            conn,
            send,
            recv,
            closed_locally: false,
            remote_done: false,
            poisoned: false,
            header: [0; FRAME_HEADER_LEN],
            header_filled: 0,
            payload: None,
        }
    }

    fn closed_error(&self) -> anyhow::Error {
        Error::ConnectionClosed {
            peer_id: self.peer_id.clone(),
        }
        .into()
    }

    /// The remote is gone or finished: close our side too.
    fn remote_ended(&mut self) {
        self.remote_done = true;
        self.conn.close(code::CLOSED, b"");
    }

    fn protocol_error(&mut self, reason: String) -> anyhow::Error {
        self.remote_done = true;
        self.conn.close(code::PROTOCOL, b"protocol violation");
        crate::HyperswarmError::Protocol {
            addr: self.conn.remote_address(),
            reason,
        }
        .into()
    }

    fn read_failed(&mut self, e: ReadError) -> anyhow::Result<Option<Vec<u8>>> {
        match e {
            ReadError::Reset(_) | ReadError::ConnectionLost(_) | ReadError::ClosedStream => {
                tracing::debug!(peer = %self.peer_id, error = %e, "connection ended");
                self.remote_ended();
                Ok(None)
            }
            other => Err(self.protocol_error(other.to_string())),
        }
    }
}

#[async_trait]
impl Connection for HsConnection {
    fn peer_id(&self) -> &str {
        &self.peer_id
    }

    async fn send(&mut self, data: &[u8]) -> anyhow::Result<()> {
        if self.closed_locally || self.remote_done || self.poisoned {
            return Err(self.closed_error());
        }
        check_message_size(data.len())?;
        // If this future is dropped half-way, the stream holds half a message: poison it.
        self.poisoned = true;
        let header = wire::encode_frame_len(data.len());
        let result = match self.send.write_all(&header).await {
            Ok(()) => self.send.write_all(data).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                self.poisoned = false;
                Ok(())
            }
            Err(e) => {
                tracing::debug!(peer = %self.peer_id, error = %e, "send failed");
                self.remote_ended();
                Err(self.closed_error())
            }
        }
    }

    async fn receive(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        if self.closed_locally || self.remote_done {
            return Ok(None);
        }
        // Cancel-safe: partial reads are kept in `self` (quinn's reads are cancel-safe).
        loop {
            if let Some((len, buf)) = &mut self.payload {
                let (len, have) = (*len, buf.len());
                if have == len {
                    let msg = self.payload.take().map(|(_, b)| b).unwrap_or_default();
                    return Ok(Some(msg));
                }
                match self.recv.read_chunk(len - have, true).await {
                    Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                    Ok(None) => {
                        return Err(self.protocol_error(format!(
                            "stream ended inside a {len}-byte message after {have} bytes"
                        )));
                    }
                    Err(e) => return self.read_failed(e),
                }
                continue;
            }
            match self.recv.read(&mut self.header[self.header_filled..]).await {
                Ok(Some(n)) => {
                    self.header_filled += n;
                    if self.header_filled == FRAME_HEADER_LEN {
                        self.header_filled = 0;
                        match wire::decode_frame_len(self.header) {
                            Ok(len) => {
                                self.payload = Some((
                                    len,
                                    Vec::with_capacity(len.min(INITIAL_PAYLOAD_CAPACITY)),
                                ));
                            }
                            Err(e) => return Err(self.protocol_error(e.to_string())),
                        }
                    }
                }
                Ok(None) if self.header_filled == 0 => {
                    self.remote_ended();
                    return Ok(None);
                }
                Ok(None) => {
                    return Err(self.protocol_error("stream ended inside a message header".into()));
                }
                Err(e) => return self.read_failed(e),
            }
        }
    }

    async fn close(&mut self) -> anyhow::Result<()> {
        if self.closed_locally {
            return Ok(());
        }
        self.closed_locally = true;
        let _ = self.recv.stop(code::CLOSED);
        if self.remote_done || self.send.finish().is_err() {
            self.conn.close(code::CLOSED, b"");
            return Ok(());
        }
        // Let the remote acknowledge what was sent, then close; bounded by CLOSE_LINGER.
        let acked = self.send.stopped();
        let conn = self.conn.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CLOSE_LINGER, acked).await;
            conn.close(code::CLOSED, b"");
        });
        Ok(())
    }
}

impl Drop for HsConnection {
    fn drop(&mut self) {
        if !self.closed_locally && !self.remote_done {
            // Dropped without close: finish the stream (quinn does on drop) and close soon.
            let _ = self.send.finish();
            let acked = self.send.stopped();
            let conn = self.conn.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = tokio::time::timeout(CLOSE_LINGER, acked).await;
                    conn.close(code::CLOSED, b"");
                });
            } else {
                self.conn.close(code::CLOSED, b"");
            }
        }
    }
}

impl std::fmt::Debug for HsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsConnection")
            .field("peer_id", &self.peer_id)
            .field("remote", &self.conn.remote_address())
            .finish_non_exhaustive()
    }
}

/// Whether `e` says the remote closed the connection with `code`.
pub(crate) fn closed_with(e: &quinn::ConnectionError, wanted: VarInt) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == wanted)
}
