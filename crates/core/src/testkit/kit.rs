//! The kit runner: [`ConformanceKit`] holds a factory and a step timeout, runs every check in
//! order ([`ConformanceKit::run_all`]), and gives the checks their timed waits.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::mesh::AbortOnDrop;
use super::{DEFAULT_STEP_TIMEOUT, TransportFactory};
use crate::{Connection, Error, TopicHash, Transport};

/// Runs the contract checks against transports from a [`TransportFactory`].
#[derive(Debug)]
pub struct ConformanceKit<F> {
    pub(super) factory: F,
    pub(super) timeout: Duration,
}

impl<F: TransportFactory> ConformanceKit<F> {
    /// A kit over `factory` with [`DEFAULT_STEP_TIMEOUT`].
    pub fn new(factory: F) -> Self {
        Self {
            factory,
            timeout: DEFAULT_STEP_TIMEOUT,
        }
    }

    /// Sets the timeout of each waiting step.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The factory the kit uses.
    pub fn factory(&self) -> &F {
        &self.factory
    }

    /// Runs every check for transports that connect peers, printing progress to stderr.
    pub async fn run_all(&self) -> anyhow::Result<()> {
        self.step("lifecycle_without_peers", self.lifecycle_without_peers())
            .await?;
        self.step("message_boundaries", self.message_boundaries())
            .await?;
        self.step("ordering", self.ordering()).await?;
        self.step(
            "one_connection_per_peer(2)",
            self.one_connection_per_peer(2),
        )
        .await?;
        self.step(
            "one_connection_per_peer(3)",
            self.one_connection_per_peer(3),
        )
        .await?;
        self.step("receive_is_cancel_safe", self.receive_is_cancel_safe())
            .await?;
        self.step("remote_close", self.remote_close()).await?;
        self.step("lookup_lists_announced", self.lookup_lists_announced())
            .await?;
        self.step(
            "disconnect_ends_everything",
            self.disconnect_ends_everything(),
        )
        .await?;
        self.step("oversized_send", self.oversized_send()).await?;
        Ok(())
    }

    async fn step(
        &self,
        name: &str,
        check: impl Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        eprintln!("conformance: {name} ...");
        check
            .await
            .with_context(|| format!("conformance check {name} failed"))?;
        eprintln!(
            "conformance: {name} ok ({} ms)",
            started.elapsed().as_millis()
        );
        Ok(())
    }

    pub(super) async fn within<T>(
        &self,
        what: &str,
        fut: impl Future<Output = T>,
    ) -> anyhow::Result<T> {
        tokio::time::timeout(self.timeout, fut).await.map_err(|_| {
            Error::Timeout {
                what: what.to_owned(),
                ms: self.timeout.as_millis() as u64,
            }
            .into()
        })
    }

    pub(super) async fn poll_lookup(
        &self,
        t: &dyn Transport,
        topic: TopicHash,
        done: impl Fn(&[crate::PeerInfo]) -> bool,
    ) -> anyhow::Result<Vec<crate::PeerInfo>> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let peers = self.within("lookup", t.lookup(topic)).await??;
            if done(&peers) {
                return Ok(peers);
            }
            if Instant::now() >= deadline {
                bail!(
                    "after {} ms lookup still returns {peers:?}",
                    self.timeout.as_millis()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends `payloads` on `tx` from another task while receiving them on `rx`, checking each.
    pub(super) async fn transfer(
        &self,
        mut tx: Box<dyn Connection>,
        mut rx: Box<dyn Connection>,
        payloads: Vec<Vec<u8>>,
        check: impl Fn(usize, &[u8], &[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<(Box<dyn Connection>, Box<dyn Connection>)> {
        let count = payloads.len();
        let (expected_tx, mut expected) = mpsc::unbounded_channel();
        let sender: JoinHandle<anyhow::Result<Box<dyn Connection>>> = tokio::spawn(async move {
            for (i, payload) in payloads.into_iter().enumerate() {
                tx.send(&payload)
                    .await
                    .with_context(|| format!("send of message {i} ({} bytes)", payload.len()))?;
                let _ = expected_tx.send(payload);
            }
            Ok(tx)
        });
        let mut sender = AbortOnDrop(Some(sender));
        for i in 0..count {
            let got = self
                .within(&format!("receive of message {i}"), rx.receive())
                .await??
                .with_context(|| format!("connection closed before message {i}"))?;
            // A message can arrive before the sender task records it as sent.
            let want = self
                .within("the sender", expected.recv())
                .await?
                .context("the sender stopped early")?;
            check(i, &want, &got)?;
        }
        let tx = self
            .within("the sender to finish", sender.join())
            .await???;
        Ok((tx, rx))
    }
}
