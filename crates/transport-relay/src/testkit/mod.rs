//! Test plumbing for relay mode (feature `testkit`), shared by this crate's integration tests,
//! the CLI's tests, demo and benchmarks: a relay server in this process on a free loopback
//! port (with the `server` feature), a raw protocol client ([`raw`]) and a nats-server child
//! process ([`nats::NatsServer`]).
//!
//! ```
//! # #[cfg(feature = "server")]
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> anyhow::Result<()> {
//! use pluresdb_sync_transport_relay::testkit::{raw, relay};
//!
//! let (server, url) = relay().await?;
//! let (mut ws, _conn) = raw::client(&url).await?;
//! let peers = raw::joined(&mut ws, [7; 32]).await?;
//! assert!(peers.is_empty());
//! server.shutdown().await;
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "server"))]
//! # fn main() {}
//! ```

pub mod nats;
pub mod raw;

use std::net::SocketAddr;
use std::time::Duration;

/// How long any single wait of the testkit (a connect, the next frame, a process start) may
/// take before it is an error: generous, because a loaded 2-core CI machine is slow.
pub const WAIT: Duration = Duration::from_secs(30);

/// Scalar multiplications (X25519 Diffie-Hellman and public-key derivations) `transport`'s
/// handshakes have done so far: how tests see what a hostile handshake message cost.
pub fn scalar_mults(transport: &crate::RelayTransport) -> u64 {
    transport.scalar_mults()
}

/// The relay URL clients use for a relay listening on `addr`: `ws://{addr}/relay`.
pub fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/relay")
}

#[cfg(feature = "server")]
pub use in_process::{relay, relay_with, url};

#[cfg(feature = "server")]
mod in_process {
    use std::net::{Ipv4Addr, SocketAddr};

    use anyhow::Context;

    use crate::server::{RelayServer, RelayServerConfig};

    /// The relay URL of `server` (`ws://`, it has no TLS).
    pub fn url(server: &RelayServer) -> String {
        super::ws_url(server.local_addr())
    }

    /// A relay server in this process with the default configuration on a free loopback
    /// port, and its URL.
    pub async fn relay() -> anyhow::Result<(RelayServer, String)> {
        relay_with(RelayServerConfig::default()).await
    }

    /// A relay server in this process with `config` on a free loopback port, and its URL.
    pub async fn relay_with(config: RelayServerConfig) -> anyhow::Result<(RelayServer, String)> {
        let server = RelayServer::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config)
            .await
            .context("binding a relay server on 127.0.0.1")?;
        let url = url(&server);
        Ok((server, url))
    }
}
