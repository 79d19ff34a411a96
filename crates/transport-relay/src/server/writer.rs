//! A connection's writer task: drains its bounded queue into the WebSocket, many queued
//! entries per flush, and writes the close frame when the connection is killed.

use std::time::Duration;

use futures_util::SinkExt;
use futures_util::stream::SplitSink;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

use super::budget::Inbox;
use super::outbox::Batch;
use crate::protocol::{self, close_code};

/// How long the writer may take to put a close frame on the wire.
pub(super) const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Most queued entries the writer takes before one flush.
const WRITE_BATCH: usize = 64;
/// The longest close reason: a close frame's payload is at most 125 bytes, 2 of them the code.
const MAX_CLOSE_REASON_BYTES: usize = 123;

/// The sending half of a connection's WebSocket.
pub(super) type Sink<S> = SplitSink<WebSocketStream<S>, Message>;

/// Writes what the queue `rx` yields until it closes or `kill` is set; when killed, then what
/// is still queued (within the close timeout) and the close frame with the kill's code. A
/// connection closed for not reading (slow consumer, memory budget) gets only the close
/// frame: what it had queued is dropped at once, giving its bytes back to the budget.
pub(super) async fn run<S>(
    mut sink: Sink<S>,
    mut rx: Inbox,
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
                            Some(m) => feed(&mut sink, m).await?,
                            None => break,
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
    if let Some((close_code::SLOW_CONSUMER | close_code::OVER_BUDGET, _)) = reason {
        rx.discard();
    }
    if let Some((code, text)) = reason {
        let frame = CloseFrame {
            code: code.into(),
            reason: protocol::truncate_utf8(&text, MAX_CLOSE_REASON_BYTES).into(),
        };
        // What was queued before the close (replies, errors) goes first, if the client
        // takes it within the timeout; a slow consumer gets only the close attempt.
        let goodbye = async {
            while let Some(m) = rx.try_recv() {
                feed(&mut sink, m).await?;
            }
            sink.send(Message::Close(Some(frame))).await
        };
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, goodbye).await;
    }
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, sink.close()).await;
}

/// Hands a batch's frames to the WebSocket sink (which writes whenever its buffer fills).
async fn feed<S>(sink: &mut Sink<S>, batch: Batch) -> Result<(), tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for frame in batch.frames() {
        sink.feed(Message::Binary(frame)).await?;
    }
    Ok(())
}
