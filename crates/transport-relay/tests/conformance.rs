//! The core conformance kit against RelayTransports on a real relay server on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use async_trait::async_trait;
use pluresdb_sync_core::Transport;
use pluresdb_sync_core::testkit::{ConformanceKit, TransportFactory};
use pluresdb_sync_transport_relay::RelayTransport;
use pluresdb_sync_transport_relay::server::{RelayServer, RelayServerConfig};

struct Relay {
    server: RelayServer,
    encryption: bool,
}

impl Relay {
    async fn start(encryption: bool) -> Self {
        let server =
            RelayServer::bind("127.0.0.1:0".parse().unwrap(), RelayServerConfig::default())
                .await
                .unwrap();
        Self { server, encryption }
    }
}

#[async_trait]
impl TransportFactory for Relay {
    async fn create(&self, n: usize) -> anyhow::Result<Vec<Box<dyn Transport>>> {
        let url = format!("ws://{}/relay", self.server.local_addr());
        (0..n)
            .map(|_| {
                Ok(Box::new(
                    RelayTransport::builder()
                        .relay_url(url.clone())
                        .encryption(self.encryption)
                        .timeout(Duration::from_secs(30))
                        .build()?,
                ) as Box<dyn Transport>)
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_encrypted() {
    ConformanceKit::new(Relay::start(true).await)
        .run_all()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_unencrypted() {
    ConformanceKit::new(Relay::start(false).await)
        .run_all()
        .await
        .unwrap();
}
