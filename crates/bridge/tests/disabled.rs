//! The bridge over the disabled transport: it starts, nothing arrives, it stops.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::{fresh_topic, next_event};
use pluresdb_sync_bridge::SyncBridge;
use pluresdb_sync_core::{SyncBroadcaster, SyncEvent};
use pluresdb_sync_transport_disabled::DisabledTransport;

#[tokio::test]
async fn disabled_starts_and_nothing_arrives() {
    let hub = SyncBroadcaster::default();
    let mut seen = hub.subscribe();
    let bridge = SyncBridge::start(
        Box::new(DisabledTransport::new()),
        fresh_topic(),
        hub.clone(),
    )
    .await
    .unwrap();
    assert_eq!(bridge.transport_name(), "disabled");
    let mut messages = bridge.messages().unwrap();
    let event = SyncEvent::NodeUpsert { id: "n1".into() };
    // The bridge's own subscription counts: the application may publish with no subscriber
    // of its own.
    assert_eq!(hub.publish(event.clone()).unwrap(), 2);
    assert_eq!(bridge.broadcast(b"hello").unwrap(), 0);
    assert!(bridge.lookup().await.unwrap().is_empty());
    bridge.stop().await.unwrap();
    // Only the application's own event; no peer ever came or went.
    assert_eq!(next_event(&mut seen).await, event);
    assert!(seen.is_empty());
    assert!(messages.recv().await.is_none());
}
