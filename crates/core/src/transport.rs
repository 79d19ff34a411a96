//! The pluggable transport abstraction.

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::{PeerInfo, TopicHash};

/// The largest message a [`Connection`] carries: 16 MiB. Larger sends fail with
/// [`Error::MessageTooLarge`](crate::Error::MessageTooLarge) and leave the connection usable.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// A way to find peers on a topic and open connections to them.
///
/// Object safe: held as `Box<dyn Transport>`. Errors are `anyhow::Error` wrapping a typed
/// error ([`crate::Error`] or a transport's own), which callers may `downcast_ref`.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Joins `topic` and yields every connection (incoming and outgoing) to a peer on it,
    /// exactly once per remote peer, even when both sides dial at the same time.
    ///
    /// The receiver ends when the transport is disconnected.
    async fn connect(
        &mut self,
        topic: TopicHash,
    ) -> anyhow::Result<mpsc::Receiver<Box<dyn Connection>>>;

    /// Makes this peer findable on `topic` (until [`Transport::disconnect`]).
    async fn announce(&mut self, topic: TopicHash) -> anyhow::Result<()>;

    /// Lists the peers currently known on `topic`, without this peer itself.
    async fn lookup(&self, topic: TopicHash) -> anyhow::Result<Vec<PeerInfo>>;

    /// Stops announcing, closes every connection and ends every receiver from
    /// [`Transport::connect`]. Calling it again does nothing.
    async fn disconnect(&mut self) -> anyhow::Result<()>;

    /// The transport's name: `"hyperswarm"`, `"relay"` or `"disabled"`.
    fn name(&self) -> &str;
}

/// An open, ordered, message-oriented connection to one remote peer.
#[async_trait]
pub trait Connection: Send + Sync {
    /// The remote peer's id.
    fn peer_id(&self) -> &str;

    /// Sends one message, delivered whole and in order (at most [`MAX_MESSAGE_BYTES`]).
    async fn send(&mut self, data: &[u8]) -> anyhow::Result<()>;

    /// Receives the next message; `Ok(None)` once the connection is closed and drained.
    ///
    /// Cancel safe: dropping the future before it completes (in `tokio::select!` or
    /// `tokio::time::timeout`) loses no message; the next call returns it.
    async fn receive(&mut self) -> anyhow::Result<Option<Vec<u8>>>;

    /// Closes the connection; the remote's `receive` then returns `Ok(None)`.
    async fn close(&mut self) -> anyhow::Result<()>;
}

/// Checks a message against [`MAX_MESSAGE_BYTES`], for use at the top of `Connection::send`.
pub fn check_message_size(len: usize) -> Result<(), crate::Error> {
    if len > MAX_MESSAGE_BYTES {
        return Err(crate::Error::MessageTooLarge {
            len,
            max: MAX_MESSAGE_BYTES,
        });
    }
    Ok(())
}
