//! The conformance kit against the in-memory reference transport, and proof that the kit
//! catches transports that break the contract.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use async_trait::async_trait;
use pluresdb_sync_core::testkit::memory::MemoryNetwork;
use pluresdb_sync_core::testkit::{ConformanceKit, TransportFactory};
use pluresdb_sync_core::{Connection, PeerInfo, TopicHash, Transport};
use std::time::Duration;
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_transport_passes_the_whole_kit() {
    ConformanceKit::new(MemoryNetwork::new())
        .run_all()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_can_run_concurrently_on_one_network() {
    let kit = ConformanceKit::new(MemoryNetwork::new());
    let (a, b, c) = tokio::join!(
        kit.ordering(),
        kit.one_connection_per_peer(5),
        kit.remote_close()
    );
    a.unwrap();
    b.unwrap();
    c.unwrap();
}

/// What a faulty transport gets wrong.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Drops every empty message.
    DropsEmptyMessages,
    /// Swaps every 100th message with the next one.
    Reorders,
    /// Yields every connection twice.
    DuplicatesConnections,
    /// Accepts sends of any size (and truncates them).
    NoSizeLimit,
    /// Keeps connections open after disconnect.
    IgnoresDisconnect,
    /// Loses the message when a receive is cancelled at the wrong moment.
    CancelUnsafeReceive,
}

struct Faulty {
    net: MemoryNetwork,
    fault: Fault,
}

#[async_trait]
impl TransportFactory for Faulty {
    async fn create(&self, n: usize) -> anyhow::Result<Vec<Box<dyn Transport>>> {
        (0..n)
            .map(|_| {
                Ok(Box::new(FaultyTransport {
                    inner: self.net.transport()?,
                    fault: self.fault,
                }) as Box<dyn Transport>)
            })
            .collect()
    }
}

struct FaultyTransport {
    inner: pluresdb_sync_core::testkit::memory::MemoryTransport,
    fault: Fault,
}

#[async_trait]
impl Transport for FaultyTransport {
    async fn connect(
        &mut self,
        topic: TopicHash,
    ) -> anyhow::Result<mpsc::Receiver<Box<dyn Connection>>> {
        let mut inner = self.inner.connect(topic).await?;
        let (tx, rx) = mpsc::channel::<Box<dyn Connection>>(16);
        let fault = self.fault;
        tokio::spawn(async move {
            while let Some(conn) = inner.recv().await {
                let peer = conn.peer_id().to_owned();
                if tx
                    .send(Box::new(FaultyConn {
                        inner: conn,
                        fault,
                        sent: 0,
                        held: None,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
                if matches!(fault, Fault::DuplicatesConnections) {
                    let _ = tx.send(Box::new(Ghost(peer))).await;
                }
            }
            if matches!(fault, Fault::IgnoresDisconnect) {
                // Keep the receiver open forever.
                std::future::pending::<()>().await;
            }
        });
        Ok(rx)
    }
    async fn announce(&mut self, topic: TopicHash) -> anyhow::Result<()> {
        self.inner.announce(topic).await
    }
    async fn lookup(&self, topic: TopicHash) -> anyhow::Result<Vec<PeerInfo>> {
        self.inner.lookup(topic).await
    }
    async fn disconnect(&mut self) -> anyhow::Result<()> {
        if matches!(self.fault, Fault::IgnoresDisconnect) {
            return Ok(());
        }
        self.inner.disconnect().await
    }
    fn name(&self) -> &str {
        "faulty"
    }
}

struct FaultyConn {
    inner: Box<dyn Connection>,
    fault: Fault,
    sent: usize,
    held: Option<Vec<u8>>,
}

#[async_trait]
impl Connection for FaultyConn {
    fn peer_id(&self) -> &str {
        self.inner.peer_id()
    }
    async fn send(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.sent += 1;
        match self.fault {
            Fault::DropsEmptyMessages if data.is_empty() => Ok(()),
            Fault::Reorders if self.sent % 100 == 50 && self.held.is_none() => {
                self.held = Some(data.to_vec());
                Ok(())
            }
            Fault::Reorders if self.held.is_some() => {
                self.inner.send(data).await?;
                let held = self.held.take().unwrap();
                self.inner.send(&held).await
            }
            Fault::NoSizeLimit if data.len() > pluresdb_sync_core::MAX_MESSAGE_BYTES => {
                self.inner.send(&data[..16]).await
            }
            _ => self.inner.send(data).await,
        }
    }
    async fn receive(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        let msg = self.inner.receive().await;
        if matches!(self.fault, Fault::CancelUnsafeReceive) {
            // Like a transport that reads a frame, then awaits again before returning it.
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        msg
    }
    async fn close(&mut self) -> anyhow::Result<()> {
        self.inner.close().await
    }
}

/// A duplicate connection that says hello like the real one would, then idles.
struct Ghost(String);

#[async_trait]
impl Connection for Ghost {
    fn peer_id(&self) -> &str {
        &self.0
    }
    async fn send(&mut self, _: &[u8]) -> anyhow::Result<()> {
        Ok(())
    }
    async fn receive(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        std::future::pending().await
    }
    async fn close(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

fn kit(fault: Fault) -> ConformanceKit<Faulty> {
    ConformanceKit::new(Faulty {
        net: MemoryNetwork::new(),
        fault,
    })
    .with_timeout(Duration::from_secs(3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kit_catches_dropped_empty_messages() {
    let err = kit(Fault::DropsEmptyMessages)
        .message_boundaries()
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("message 0"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kit_catches_reordering() {
    let err = kit(Fault::Reorders).ordering().await.unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("expected sequence number 48"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kit_catches_duplicate_connections() {
    let err = kit(Fault::DuplicatesConnections)
        .one_connection_per_peer(2)
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("two connections") || text.contains("second connection"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kit_catches_missing_size_limit() {
    let err = kit(Fault::NoSizeLimit).oversized_send().await.unwrap_err();
    assert!(format!("{err:#}").contains("succeeded"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kit_catches_ignored_disconnect() {
    let err = kit(Fault::IgnoresDisconnect)
        .disconnect_ends_everything()
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("timed out"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kit_catches_cancel_unsafe_receive() {
    let err = kit(Fault::CancelUnsafeReceive)
        .receive_is_cancel_safe()
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("expected message"), "{err:#}");
}
