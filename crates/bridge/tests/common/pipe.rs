//! Connections the test holds the other end of: an in-process pipe per connection, and a
//! transport that yields whatever connections the test feeds it. For checking what a bridge
//! does with exactly the connections and bytes a test chooses (a reconnect, a hostile peer).

use std::time::Duration;

use async_trait::async_trait;
use pluresdb_sync_core::{
    Connection, Error, PeerInfo, TopicHash, Transport, transport::check_message_size,
};
use tokio::sync::mpsc;

/// One direction of a pipe holds this many messages before `send` waits.
pub const PIPE_QUEUE: usize = 4;

/// One end of a pipe.
pub struct PipeEnd {
    peer_id: String,
    tx: Option<mpsc::Sender<Vec<u8>>>,
    rx: mpsc::Receiver<Vec<u8>>,
}

/// A connected pair: `(the end a bridge gets, seeing the remote as `remote_id`; the test's
/// end)`.
pub fn pipe(remote_id: &str, local_id: &str) -> (PipeEnd, PipeEnd) {
    let (a_tx, a_rx) = mpsc::channel(PIPE_QUEUE);
    let (b_tx, b_rx) = mpsc::channel(PIPE_QUEUE);
    (
        PipeEnd {
            peer_id: remote_id.to_owned(),
            tx: Some(a_tx),
            rx: b_rx,
        },
        PipeEnd {
            peer_id: local_id.to_owned(),
            tx: Some(b_tx),
            rx: a_rx,
        },
    )
}

impl PipeEnd {
    /// The next message, or `None` once the other end closed; panics after `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Vec<u8>> {
        tokio::time::timeout(within, self.rx.recv())
            .await
            .expect("no message from the bridge in time")
    }
}

#[async_trait]
impl Connection for PipeEnd {
    fn peer_id(&self) -> &str {
        &self.peer_id
    }

    async fn send(&mut self, data: &[u8]) -> anyhow::Result<()> {
        check_message_size(data.len())?;
        let closed = || Error::ConnectionClosed {
            peer_id: self.peer_id.clone(),
        };
        let tx = self.tx.as_ref().ok_or_else(closed)?;
        tx.send(data.to_vec()).await.map_err(|_| closed())?;
        Ok(())
    }

    async fn receive(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.rx.recv().await)
    }

    async fn close(&mut self) -> anyhow::Result<()> {
        self.tx = None;
        self.rx.close();
        Ok(())
    }
}

/// A transport whose `connect` yields the connections sent on [`FeedTransport::new`]'s sender.
pub struct FeedTransport {
    rx: Option<mpsc::Receiver<Box<dyn Connection>>>,
}

impl FeedTransport {
    /// The transport and the sender to feed it connections with.
    pub fn new() -> (Self, mpsc::Sender<Box<dyn Connection>>) {
        let (tx, rx) = mpsc::channel(16);
        (Self { rx: Some(rx) }, tx)
    }
}

#[async_trait]
impl Transport for FeedTransport {
    async fn connect(
        &mut self,
        _topic: TopicHash,
    ) -> anyhow::Result<mpsc::Receiver<Box<dyn Connection>>> {
        self.rx
            .take()
            .ok_or_else(|| anyhow::anyhow!("this test transport connects once"))
    }

    async fn announce(&mut self, _topic: TopicHash) -> anyhow::Result<()> {
        Ok(())
    }

    async fn lookup(&self, _topic: TopicHash) -> anyhow::Result<Vec<PeerInfo>> {
        Ok(Vec::new())
    }

    async fn disconnect(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    fn name(&self) -> &str {
        "feed"
    }
}
