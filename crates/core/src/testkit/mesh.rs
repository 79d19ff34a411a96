//! The mesh the checks run on: `n` fresh transports joined to one topic at once, each holding
//! exactly one connection to every other, identified by a hello message; and the small task
//! helpers the checks share.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;

use anyhow::{Context, anyhow, bail, ensure};
use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{ConformanceKit, TransportFactory, fresh_topic};
use crate::{Connection, TopicHash, Transport};

/// `n` transports on one topic, each holding one connection to every other.
pub(super) struct Mesh {
    pub(super) topic: TopicHash,
    pub(super) transports: Vec<Box<dyn Transport>>,
    pub(super) incoming: Vec<mpsc::Receiver<Box<dyn Connection>>>,
    /// `conns[i]` are transport i's connections, sorted by the remote's index.
    pub(super) conns: Vec<Vec<Box<dyn Connection>>>,
    /// The peer id of every transport, as its remotes saw it.
    pub(super) ids: Vec<String>,
}

impl<F: TransportFactory> ConformanceKit<F> {
    /// Builds `n` transports on a fresh topic, connects them all at once and waits until each
    /// has one connection to every other, identified by a hello message.
    pub(super) async fn mesh(&self, n: usize, label: &str) -> anyhow::Result<Mesh> {
        let transports = self.factory.create(n).await?;
        ensure!(
            transports.len() == n,
            "factory made {} transports, asked for {n}",
            transports.len()
        );
        let topic = fresh_topic(label);
        // Join concurrently so that peers discover and dial each other at the same time.
        let joins = transports.into_iter().map(|mut t| async move {
            let rx = t.connect(topic).await;
            (t, rx)
        });
        let mut ts = Vec::with_capacity(n);
        let mut incoming = Vec::with_capacity(n);
        for (i, (t, rx)) in self
            .within("connect", join_all(joins))
            .await?
            .into_iter()
            .enumerate()
        {
            incoming.push(rx.with_context(|| format!("connect of transport {i}"))?);
            ts.push(t);
        }
        let mut raw: Vec<Vec<Box<dyn Connection>>> = Vec::with_capacity(n);
        for (i, rx) in incoming.iter_mut().enumerate() {
            let mut conns = Vec::with_capacity(n - 1);
            while conns.len() < n - 1 {
                let conn = self
                    .within(
                        &format!("transport {i} to get {} connections", n - 1),
                        rx.recv(),
                    )
                    .await?
                    .with_context(|| {
                        format!(
                            "transport {i}'s connect receiver ended after {} connections",
                            conns.len()
                        )
                    })?;
                conns.push(conn);
            }
            raw.push(conns);
        }
        // Identify every connection's remote by a hello carrying its index.
        for (i, conns) in raw.iter_mut().enumerate() {
            for conn in conns.iter_mut() {
                self.within("hello", conn.send(format!("hello {i}").as_bytes()))
                    .await??;
            }
        }
        let mut ids: Vec<Option<String>> = vec![None; n];
        let mut conns: Vec<Vec<Box<dyn Connection>>> = Vec::with_capacity(n);
        for (i, list) in raw.into_iter().enumerate() {
            let mut by_remote = BTreeMap::new();
            for mut conn in list {
                let hello = self
                    .within("hello", conn.receive())
                    .await??
                    .context("connection closed before its hello")?;
                let j: usize = std::str::from_utf8(&hello)
                    .ok()
                    .and_then(|s| s.strip_prefix("hello "))
                    .and_then(|s| s.parse().ok())
                    .filter(|&j| j < n)
                    .with_context(|| format!("bad hello {hello:?}"))?;
                ensure!(j != i, "transport {i} got a connection to itself");
                let id = conn.peer_id().to_owned();
                ensure!(
                    !id.is_empty(),
                    "transport {i} has a connection with an empty peer id"
                );
                match &ids[j] {
                    Some(known) => ensure!(
                        *known == id,
                        "transport {j} has two peer ids: {known} and {id}"
                    ),
                    None => ids[j] = Some(id.clone()),
                }
                if by_remote.insert(j, conn).is_some() {
                    bail!("transport {i} has two connections to transport {j} (peer {id})");
                }
            }
            conns.push(by_remote.into_values().collect());
        }
        let ids: Vec<String> = ids
            .into_iter()
            .enumerate()
            .map(|(i, id)| id.with_context(|| format!("nobody saw transport {i}")))
            .collect::<anyhow::Result<_>>()?;
        let distinct: HashSet<&String> = ids.iter().collect();
        ensure!(distinct.len() == n, "peer ids are not distinct: {ids:?}");
        Ok(Mesh {
            topic,
            transports: ts,
            incoming,
            conns,
            ids,
        })
    }
}

impl Mesh {
    /// Index of transport `to` within `conns[from]`.
    pub(super) fn slot(from: usize, to: usize) -> usize {
        if to < from { to } else { to - 1 }
    }

    pub(super) fn take(&mut self, from: usize, to: usize) -> anyhow::Result<Box<dyn Connection>> {
        let slot = Self::slot(from, to);
        let list = self.conns.get_mut(from).context("no such transport")?;
        ensure!(slot < list.len(), "no connection {from} -> {to}");
        // Swap in a placeholder so other indices stay valid.
        Ok(std::mem::replace(&mut list[slot], Box::new(Taken)))
    }

    pub(super) fn put_back(&mut self, from: usize, to: usize, conn: Box<dyn Connection>) {
        let slot = Self::slot(from, to);
        if let Some(c) = self.conns.get_mut(from).and_then(|l| l.get_mut(slot)) {
            *c = conn;
        }
    }

    pub(super) async fn shutdown(mut self) -> anyhow::Result<()> {
        for (i, t) in self.transports.iter_mut().enumerate() {
            t.disconnect()
                .await
                .with_context(|| format!("disconnect of transport {i}"))?;
        }
        Ok(())
    }
}

/// Stands in for a connection the kit moved out of a [`Mesh`].
struct Taken;

#[async_trait]
impl Connection for Taken {
    fn peer_id(&self) -> &str {
        ""
    }
    async fn send(&mut self, _: &[u8]) -> anyhow::Result<()> {
        bail!("connection taken")
    }
    async fn receive(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        bail!("connection taken")
    }
    async fn close(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

pub(super) struct AbortOnDrop<T>(pub(super) Option<JoinHandle<T>>);

impl<T> AbortOnDrop<T> {
    pub(super) async fn join(&mut self) -> anyhow::Result<T> {
        let handle = self.0.take().context("joined twice")?;
        handle.await.map_err(|e| anyhow!("sender task failed: {e}"))
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// Polls futures concurrently on the current task; results in input order.
pub(super) async fn join_all<T, Fut: Future<Output = T>>(
    futs: impl IntoIterator<Item = Fut>,
) -> Vec<T> {
    let mut set = Vec::new();
    for fut in futs {
        set.push(Box::pin(fut));
    }
    let mut out: Vec<Option<T>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (fut, slot) in set.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots() {
        assert_eq!(Mesh::slot(0, 1), 0);
        assert_eq!(Mesh::slot(1, 0), 0);
        assert_eq!(Mesh::slot(2, 0), 0);
        assert_eq!(Mesh::slot(2, 1), 1);
        assert_eq!(Mesh::slot(0, 2), 1);
    }
}
