//! The parts of the conformance kit that apply to a transport without peers.
#![allow(clippy::unwrap_used, missing_docs)]

use async_trait::async_trait;
use pluresdb_sync_core::Transport;
use pluresdb_sync_core::testkit::{ConformanceKit, TransportFactory, fresh_topic};
use pluresdb_sync_transport_disabled::DisabledTransport;

struct Disabled;

#[async_trait]
impl TransportFactory for Disabled {
    async fn create(&self, n: usize) -> anyhow::Result<Vec<Box<dyn Transport>>> {
        Ok((0..n)
            .map(|_| Box::new(DisabledTransport::new()) as Box<dyn Transport>)
            .collect())
    }
}

#[tokio::test]
async fn lifecycle_without_peers() {
    ConformanceKit::new(Disabled)
        .lifecycle_without_peers()
        .await
        .unwrap();
}

#[tokio::test]
async fn never_finds_or_connects_peers_even_when_others_announce() {
    let mut transports = Disabled.create(2).await.unwrap();
    let topic = fresh_topic("disabled");
    for t in &mut transports {
        t.announce(topic).await.unwrap();
    }
    for t in &mut transports {
        assert!(t.lookup(topic).await.unwrap().is_empty());
        assert!(t.connect(topic).await.unwrap().recv().await.is_none());
    }
}

#[tokio::test]
async fn works_after_disconnect_as_a_no_op() {
    let mut t = DisabledTransport::new();
    let topic = [0u8; 32];
    t.disconnect().await.unwrap();
    t.disconnect().await.unwrap();
    t.announce(topic).await.unwrap();
    assert!(t.lookup(topic).await.unwrap().is_empty());
    assert!(t.connect(topic).await.unwrap().recv().await.is_none());
    assert_eq!(t.name(), "disabled");
}

#[test]
fn usable_as_a_trait_object() {
    let boxed: Box<dyn Transport> = Box::new(DisabledTransport::new());
    assert_eq!(boxed.name(), "disabled");
}
