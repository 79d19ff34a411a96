//! A real nats-server (Debian package `nats-server`) as a child process on a loopback port,
//! for the relay's NATS scale-out tests.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use super::WAIT;

/// Where Debian installs nats-server (`/usr/sbin`), then elsewhere.
pub const NATS_SERVER_PATHS: [&str; 3] = [
    "/usr/sbin/nats-server",
    "/usr/bin/nats-server",
    "/usr/local/bin/nats-server",
];

/// A nats-server child process listening on 127.0.0.1; killed when dropped.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    port: u16,
}

impl NatsServer {
    /// The installed nats-server binary, if any (see [`NATS_SERVER_PATHS`]).
    pub fn binary() -> Option<&'static str> {
        NATS_SERVER_PATHS
            .into_iter()
            .find(|p| Path::new(p).exists())
    }

    /// For tests that need nats-server: starts it on a free port, or returns `None` (after
    /// saying so on stderr) when it is not installed, so the test can skip.
    ///
    /// # Panics
    ///
    /// When nats-server is missing and `CI=true` (CI must not skip silently), or when it is
    /// installed but does not start.
    pub async fn start_or_skip() -> Option<Self> {
        if Self::binary().is_none() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "nats-server is missing (Debian package nats-server; scripts/test installs it)"
            );
            eprintln!("skipping: nats-server is not installed");
            return None;
        }
        match Self::start().await {
            Ok(nats) => Some(nats),
            Err(e) => panic!("{e:#}"),
        }
    }

    /// Starts nats-server on a loopback port that was free a moment ago.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(free_port()?).await
    }

    /// Starts nats-server on 127.0.0.1:`port` and waits until it accepts connections.
    pub async fn start_on(port: u16) -> anyhow::Result<Self> {
        let Some(bin) = Self::binary() else {
            bail!("nats-server is not installed (looked in {NATS_SERVER_PATHS:?})");
        };
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {bin}"))?;
        let nats = Self { child, port };
        tokio::time::timeout(WAIT, async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .with_context(|| format!("nats-server did not listen on port {port} within {WAIT:?}"))?;
        Ok(nats)
    }

    /// Its loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its client URL, `nats://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills it and waits until it has exited.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A loopback TCP port that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .context("binding 127.0.0.1:0")?
        .local_addr()?
        .port())
}
