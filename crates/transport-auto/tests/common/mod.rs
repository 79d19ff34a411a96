//! What the Auto mode integration tests share: the step timeout, logging, and waiting for a
//! connection or a message; namespaces for the root tests (`netns`) and streams of
//! numbered messages (`stream`).
#![allow(dead_code)]

pub(crate) mod netns;
pub(crate) mod stream;

use std::time::Duration;

use pluresdb_sync_core::Connection;
use tokio::sync::mpsc;

pub(crate) const T: Duration = Duration::from_secs(30);

/// Logs to the test's output with `RUST_LOG` (e.g. `pluresdb_sync_transport_hyperswarm=debug`).
pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub(crate) async fn accept(rx: &mut mpsc::Receiver<Box<dyn Connection>>) -> Box<dyn Connection> {
    tokio::time::timeout(T, rx.recv())
        .await
        .expect("no connection in time")
        .expect("the connection receiver ended")
}

pub(crate) async fn recv(c: &mut Box<dyn Connection>) -> Option<Vec<u8>> {
    tokio::time::timeout(T, c.receive())
        .await
        .expect("receive timed out")
        .unwrap_or(None)
}
