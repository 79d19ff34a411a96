//! The core conformance kit against RelayTransports on a real relay server on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use pluresdb_sync_core::testkit::ConformanceKit;

mod common;
use common::{Factory, relay};

/// Transports on one relay server on loopback.
async fn one_relay(encryption: bool) -> Factory {
    Factory {
        servers: Arc::new(vec![relay().await.0]),
        encryption,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_encrypted() {
    ConformanceKit::new(one_relay(true).await)
        .run_all()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_unencrypted() {
    ConformanceKit::new(one_relay(false).await)
        .run_all()
        .await
        .unwrap();
}
