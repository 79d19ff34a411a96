//! The local-only transport of pluresdb-sync: no network, all data stays on this machine.
//!
//! Every operation succeeds as a no-op: `announce` does nothing, `lookup` finds nobody and
//! `connect` returns a receiver that yields nothing and is already closed. Use it where sync is
//! switched off, so the rest of the application runs the same code either way.
//!
//! ```
//! use pluresdb_sync_core::Transport;
//! use pluresdb_sync_transport_disabled::DisabledTransport;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! let mut transport = DisabledTransport::new();
//! let topic = pluresdb_sync_core::derive_topic("my-app-database");
//! transport.announce(topic).await?;
//! assert!(transport.lookup(topic).await?.is_empty());
//! let mut connections = transport.connect(topic).await?;
//! assert!(connections.recv().await.is_none());
//! assert_eq!(transport.name(), "disabled");
//! # Ok(())
//! # }
//! ```

use async_trait::async_trait;
use pluresdb_sync_core::{Connection, PeerInfo, TopicHash, Transport};
use tokio::sync::mpsc;

/// A transport that never touches the network. See the [crate docs](crate).
#[derive(Clone, Copy, Debug, Default)]
pub struct DisabledTransport;

impl DisabledTransport {
    /// A new disabled transport.
    pub fn new() -> Self {
        Self
    }
}

#[async_trait]
impl Transport for DisabledTransport {
    async fn connect(
        &mut self,
        _topic: TopicHash,
    ) -> anyhow::Result<mpsc::Receiver<Box<dyn Connection>>> {
        // The sender is dropped at once, so the receiver reports "closed" on its first recv.
        let (_tx, rx) = mpsc::channel(1);
        Ok(rx)
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
        "disabled"
    }
}
