//! The transport conformance kit: checks of the contract every [`Transport`] must keep.
//!
//! A transport crate implements [`TransportFactory`] (how to make transports that can reach
//! each other: a shared relay server, a local DHT testnet, ...) and runs the kit from its
//! integration tests:
//!
//! ```
//! use pluresdb_sync_core::testkit::{ConformanceKit, memory::MemoryNetwork};
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> anyhow::Result<()> {
//! let kit = ConformanceKit::new(MemoryNetwork::new());
//! kit.message_boundaries().await?;
//! kit.ordering().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Each check makes fresh transports on a fresh random topic, so checks may run in parallel.
//! Every wait has a timeout ([`ConformanceKit::with_timeout`]); a failure is an error naming
//! the check, the step and the values seen.

pub mod memory;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::{Connection, Error, MAX_MESSAGE_BYTES, TopicHash, Transport, derive_topic};

/// Makes transports that can find and reach each other.
#[async_trait]
pub trait TransportFactory: Send + Sync {
    /// Builds `n` new, independent transports (each with its own identity) that can reach each
    /// other. The factory owns whatever they share (a relay server, a DHT testnet).
    async fn create(&self, n: usize) -> anyhow::Result<Vec<Box<dyn Transport>>>;
}

#[async_trait]
impl TransportFactory for memory::MemoryNetwork {
    async fn create(&self, n: usize) -> anyhow::Result<Vec<Box<dyn Transport>>> {
        (0..n)
            .map(|_| Ok(Box::new(self.transport()?) as Box<dyn Transport>))
            .collect()
    }
}

/// The default per-step timeout: generous, because a loaded 2-core CI machine is slow.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long to watch for a duplicate connection after every expected one arrived.
const SETTLE: Duration = Duration::from_secs(1);

/// The sizes every transport must carry whole: empty, tiny, a typical frame, the maximum.
pub const BOUNDARY_SIZES: [usize; 4] = [0, 1, 64 * 1024, MAX_MESSAGE_BYTES];

/// How many back-to-back messages the ordering check sends.
pub const ORDERING_MESSAGES: usize = 10_000;

/// Runs the contract checks against transports from a [`TransportFactory`].
#[derive(Debug)]
pub struct ConformanceKit<F> {
    factory: F,
    timeout: Duration,
}

/// `n` transports on one topic, each holding one connection to every other.
struct Mesh {
    topic: TopicHash,
    transports: Vec<Box<dyn Transport>>,
    incoming: Vec<mpsc::Receiver<Box<dyn Connection>>>,
    /// `conns[i]` are transport i's connections, sorted by the remote's index.
    conns: Vec<Vec<Box<dyn Connection>>>,
    /// The peer id of every transport, as its remotes saw it.
    ids: Vec<String>,
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

    /// One transport alone: announce, lookup (empty: it never lists itself), connect (yields
    /// nothing), disconnect (the receiver ends), disconnect again (harmless).
    /// Applies to every transport, the disabled one included.
    pub async fn lifecycle_without_peers(&self) -> anyhow::Result<()> {
        let mut transports = self.factory.create(1).await?;
        let mut t = transports.pop().context("factory returned no transport")?;
        let topic = fresh_topic("lifecycle");
        self.within("announce", t.announce(topic)).await??;
        let peers = self.within("lookup", t.lookup(topic)).await??;
        ensure!(
            peers.is_empty(),
            "lookup on a topic only this transport announced returned {peers:?} (it must not list itself)"
        );
        let mut rx = self.within("connect", t.connect(topic)).await??;
        if let Ok(Some(conn)) = tokio::time::timeout(SETTLE, rx.recv()).await {
            bail!(
                "a lone transport yielded a connection to peer {}",
                conn.peer_id()
            );
        }
        self.within("disconnect", t.disconnect()).await??;
        let after = self
            .within("the connect receiver to end after disconnect", rx.recv())
            .await?;
        ensure!(
            after.is_none(),
            "the connect receiver yielded a connection after disconnect"
        );
        self.within("second disconnect", t.disconnect())
            .await?
            .context("a second disconnect must be harmless")?;
        Ok(())
    }

    /// Messages of 0 B, 1 B, 64 KiB and 16 MiB arrive whole, in both directions.
    pub async fn message_boundaries(&self) -> anyhow::Result<()> {
        let mut mesh = self.mesh(2, "boundaries").await?;
        for (from, to) in [(0, 1), (1, 0)] {
            let tx = mesh.take(from, to)?;
            let rx = mesh.take(to, from)?;
            let payloads: Vec<Vec<u8>> = BOUNDARY_SIZES
                .iter()
                .enumerate()
                .map(|(i, &len)| pattern(len, i as u64))
                .collect();
            let (tx, rx) = self
                .transfer(tx, rx, payloads, |i, expected, got| {
                    ensure!(
                        got.len() == expected.len(),
                        "message {i}: sent {} bytes, received {}",
                        expected.len(),
                        got.len()
                    );
                    if let Some(at) = first_difference(expected, got) {
                        bail!(
                            "message {i} ({} bytes) differs at byte {at}",
                            expected.len()
                        );
                    }
                    Ok(())
                })
                .await
                .with_context(|| format!("direction {from} -> {to}"))?;
            mesh.put_back(from, to, tx);
            mesh.put_back(to, from, rx);
        }
        mesh.shutdown().await
    }

    /// 10,000 back-to-back sends of varying size arrive in order, none lost or repeated.
    pub async fn ordering(&self) -> anyhow::Result<()> {
        let mut mesh = self.mesh(2, "ordering").await?;
        let tx = mesh.take(0, 1)?;
        let rx = mesh.take(1, 0)?;
        let payloads: Vec<Vec<u8>> = (0..ORDERING_MESSAGES)
            .map(|seq| {
                let mut msg = (seq as u64).to_be_bytes().to_vec();
                msg.resize(8 + seq % 97, (seq % 251) as u8);
                msg
            })
            .collect();
        self.transfer(tx, rx, payloads, |i, expected, got| {
            ensure!(
                got == expected,
                "message {i}: expected sequence number {i} ({} bytes), got {} bytes starting {:?}",
                expected.len(),
                got.len(),
                &got[..got.len().min(8)]
            );
            Ok(())
        })
        .await?;
        mesh.shutdown().await
    }

    /// `n` transports join one topic at the same moment (so pairs dial each other at once):
    /// each yields exactly one connection per remote peer, with consistent peer ids.
    pub async fn one_connection_per_peer(&self, n: usize) -> anyhow::Result<()> {
        ensure!(
            n >= 2,
            "one_connection_per_peer needs at least 2 transports"
        );
        let mut mesh = self.mesh(n, "one-per-peer").await?;
        // `mesh` already proved n-1 distinct, consistent peers each; now prove nothing else
        // arrives.
        let extra = mesh
            .incoming
            .iter_mut()
            .enumerate()
            .map(|(i, rx)| async move {
                match tokio::time::timeout(SETTLE, rx.recv()).await {
                    Ok(Some(conn)) => Err(anyhow!(
                        "transport {i} yielded a second connection to peer {}",
                        conn.peer_id()
                    )),
                    _ => Ok(()),
                }
            });
        for result in join_all(extra).await {
            result?;
        }
        mesh.shutdown().await
    }

    /// `receive` futures dropped mid-way (as `select!` and `timeout` do) lose no message.
    pub async fn receive_is_cancel_safe(&self) -> anyhow::Result<()> {
        const MESSAGES: u64 = 2_000;
        let mut mesh = self.mesh(2, "cancel-safe").await?;
        let mut tx = mesh.take(0, 1)?;
        let mut rx = mesh.take(1, 0)?;
        let sender: JoinHandle<anyhow::Result<Box<dyn Connection>>> = tokio::spawn(async move {
            for seq in 0..MESSAGES {
                let mut msg = seq.to_be_bytes().to_vec();
                // Every 100th message is large, so receives are often cut mid-message.
                let len = if seq % 100 == 0 {
                    256 * 1024
                } else {
                    8 + (seq as usize * 7) % 3000
                };
                msg.resize(len, seq as u8);
                tx.send(&msg)
                    .await
                    .with_context(|| format!("send of message {seq}"))?;
            }
            Ok(tx)
        });
        let mut sender = AbortOnDrop(Some(sender));
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let deadline = Instant::now() + self.timeout;
        let mut next = 0u64;
        let mut cancelled = 0u64;
        while next < MESSAGES {
            ensure!(
                Instant::now() < deadline,
                "only {next} of {MESSAGES} messages arrived in {} ms",
                self.timeout.as_millis()
            );
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let patience = Duration::from_micros(20 + rng % 500);
            match tokio::time::timeout(patience, rx.receive()).await {
                Err(_) => cancelled += 1,
                Ok(got) => {
                    let msg = got?.with_context(|| format!("closed before message {next}"))?;
                    let seq = msg
                        .first_chunk::<8>()
                        .map(|b| u64::from_be_bytes(*b))
                        .with_context(|| format!("message {next} is {} bytes", msg.len()))?;
                    ensure!(
                        seq == next,
                        "expected message {next}, got {seq} after {cancelled} cancelled receives"
                    );
                    next += 1;
                }
            }
        }
        let tx = self
            .within("the sender to finish", sender.join())
            .await???;
        mesh.put_back(0, 1, tx);
        mesh.put_back(1, 0, rx);
        mesh.shutdown().await
    }

    /// After the remote closes: queued messages still arrive, then `receive` gives `Ok(None)`;
    /// `send` on a closed connection is an error (on both sides), not a panic.
    pub async fn remote_close(&self) -> anyhow::Result<()> {
        let mut mesh = self.mesh(2, "remote-close").await?;
        let mut a = mesh.take(0, 1)?;
        let mut b = mesh.take(1, 0)?;
        for i in 0..3u8 {
            self.within("send before close", a.send(&[i; 3])).await??;
        }
        self.within("close", a.close()).await??;
        for i in 0..3u8 {
            let got = self.within("receive before close", b.receive()).await??;
            ensure!(
                got.as_deref() == Some(&[i; 3][..]),
                "message {i} sent before close: got {got:?}"
            );
        }
        let end = self
            .within("receive after remote close", b.receive())
            .await??;
        ensure!(
            end.is_none(),
            "receive after the remote closed returned {} bytes instead of Ok(None)",
            end.map_or(0, |m| m.len())
        );
        let err = self
            .within("send after close", a.send(b"late"))
            .await?
            .err()
            .context("send after close succeeded; it must be an error")?;
        ensure!(!err.to_string().is_empty(), "the error has no message");
        ensure!(
            self.within("send to a closed remote", b.send(b"late"))
                .await?
                .is_err(),
            "send on a connection whose remote closed (and whose receive returned None) succeeded"
        );
        match self.within("receive after own close", a.receive()).await? {
            Ok(None) | Err(_) => {}
            Ok(Some(m)) => bail!(
                "receive after own close returned a {}-byte message",
                m.len()
            ),
        }
        self.within("second close", a.close()).await?.ok();
        mesh.shutdown().await
    }

    /// `lookup` lists a peer that announced (by the id its connections show), never the
    /// caller itself, and nothing on a topic nobody announced.
    pub async fn lookup_lists_announced(&self) -> anyhow::Result<()> {
        let mut ts = self.factory.create(2).await?;
        let topic = fresh_topic("lookup");
        self.within("announce", ts[0].announce(topic)).await??;
        let found = self
            .poll_lookup(&*ts[1], topic, |peers| !peers.is_empty())
            .await
            .context("the announced peer never appeared in lookup")?;
        let ids: HashSet<&str> = found.iter().map(|p| p.id.as_str()).collect();
        ensure!(
            ids.len() == found.len(),
            "lookup listed a peer twice: {found:?}"
        );
        ensure!(
            found.iter().all(|p| !p.id.is_empty()),
            "lookup listed a peer with an empty id: {found:?}"
        );
        let nobody = self
            .within(
                "lookup on an unused topic",
                ts[1].lookup(fresh_topic("unused")),
            )
            .await??;
        ensure!(
            nobody.is_empty(),
            "lookup on a topic nobody announced returned {nobody:?}"
        );
        for t in &mut ts {
            self.within("disconnect", t.disconnect()).await??;
        }

        // With connections: ids in lookup match the ids connections report.
        let mesh = self.mesh(2, "lookup-ids").await?;
        let (a_id, b_id) = (mesh.ids[0].clone(), mesh.ids[1].clone());
        let seen_by_b = self
            .poll_lookup(&*mesh.transports[1], mesh.topic, |peers| {
                peers.iter().any(|p| p.id == a_id)
            })
            .await
            .with_context(|| format!("lookup never listed connected peer {a_id}"))?;
        ensure!(
            !seen_by_b.iter().any(|p| p.id == b_id),
            "lookup listed the caller itself ({b_id}): {seen_by_b:?}"
        );
        mesh.shutdown().await
    }

    /// `disconnect` closes every connection on both ends, ends the connect receiver, and a
    /// second `disconnect` is harmless.
    pub async fn disconnect_ends_everything(&self) -> anyhow::Result<()> {
        let mut mesh = self.mesh(2, "disconnect").await?;
        let mut a = mesh.take(0, 1)?;
        let mut b = mesh.take(1, 0)?;
        self.within("disconnect", mesh.transports[0].disconnect())
            .await??;
        let end = self
            .within("remote receive after disconnect", b.receive())
            .await??;
        ensure!(
            end.is_none(),
            "the remote received {} bytes instead of Ok(None) after disconnect",
            end.map_or(0, |m| m.len())
        );
        let after = self
            .within("the connect receiver to end", mesh.incoming[0].recv())
            .await?;
        ensure!(
            after.is_none(),
            "connect receiver yielded a connection after disconnect"
        );
        ensure!(
            self.within("send after disconnect", a.send(b"x"))
                .await?
                .is_err(),
            "send on a connection of a disconnected transport succeeded"
        );
        match self.within("receive after disconnect", a.receive()).await? {
            Ok(None) | Err(_) => {}
            Ok(Some(m)) => bail!(
                "receive after disconnect returned a {}-byte message",
                m.len()
            ),
        }
        self.within("second disconnect", mesh.transports[0].disconnect())
            .await?
            .context("a second disconnect must be harmless")?;
        // Calls after disconnect may fail but must not panic or hang.
        let _ = self
            .within(
                "lookup after disconnect",
                mesh.transports[0].lookup(mesh.topic),
            )
            .await?;
        let _ = self
            .within(
                "announce after disconnect",
                mesh.transports[0].announce(mesh.topic),
            )
            .await?;
        mesh.shutdown().await
    }

    /// A send over [`MAX_MESSAGE_BYTES`] is a clear error naming the size, and the connection
    /// stays usable: nothing of the rejected message reaches the remote.
    pub async fn oversized_send(&self) -> anyhow::Result<()> {
        let mut mesh = self.mesh(2, "oversized").await?;
        let mut a = mesh.take(0, 1)?;
        let mut b = mesh.take(1, 0)?;
        let too_big = vec![7u8; MAX_MESSAGE_BYTES + 1];
        let err = self
            .within("oversized send", a.send(&too_big))
            .await?
            .err()
            .context("a send of MAX_MESSAGE_BYTES + 1 bytes succeeded")?;
        let text = err.to_string();
        ensure!(
            text.contains(&too_big.len().to_string()),
            "the error does not name the size {}: {text:?}",
            too_big.len()
        );
        self.within("send after rejected send", a.send(b"still here"))
            .await?
            .context("the connection broke after a rejected oversized send")?;
        let got = self.within("receive", b.receive()).await??;
        ensure!(
            got.as_deref() == Some(&b"still here"[..]),
            "expected the message after the rejected one, got {:?}",
            got.map(|m| m.len())
        );
        mesh.put_back(0, 1, a);
        mesh.put_back(1, 0, b);
        mesh.shutdown().await
    }

    async fn within<T>(&self, what: &str, fut: impl Future<Output = T>) -> anyhow::Result<T> {
        tokio::time::timeout(self.timeout, fut).await.map_err(|_| {
            Error::Timeout {
                what: what.to_owned(),
                ms: self.timeout.as_millis() as u64,
            }
            .into()
        })
    }

    async fn poll_lookup(
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
    async fn transfer(
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

    /// Builds `n` transports on a fresh topic, connects them all at once and waits until each
    /// has one connection to every other, identified by a hello message.
    async fn mesh(&self, n: usize, label: &str) -> anyhow::Result<Mesh> {
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
    fn slot(from: usize, to: usize) -> usize {
        if to < from { to } else { to - 1 }
    }

    fn take(&mut self, from: usize, to: usize) -> anyhow::Result<Box<dyn Connection>> {
        let slot = Self::slot(from, to);
        let list = self.conns.get_mut(from).context("no such transport")?;
        ensure!(slot < list.len(), "no connection {from} -> {to}");
        // Swap in a placeholder so other indices stay valid.
        Ok(std::mem::replace(&mut list[slot], Box::new(Taken)))
    }

    fn put_back(&mut self, from: usize, to: usize, conn: Box<dyn Connection>) {
        let slot = Self::slot(from, to);
        if let Some(c) = self.conns.get_mut(from).and_then(|l| l.get_mut(slot)) {
            *c = conn;
        }
    }

    async fn shutdown(mut self) -> anyhow::Result<()> {
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

struct AbortOnDrop<T>(Option<JoinHandle<T>>);

impl<T> AbortOnDrop<T> {
    async fn join(&mut self) -> anyhow::Result<T> {
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
async fn join_all<T, Fut: Future<Output = T>>(futs: impl IntoIterator<Item = Fut>) -> Vec<T> {
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

/// A topic no other test uses.
pub fn fresh_topic(label: &str) -> TopicHash {
    let mut nonce = [0u8; 16];
    // Falls back to the clock if the OS RNG fails; uniqueness is all that matters here.
    if getrandom::fill(&mut nonce).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        nonce = t.to_le_bytes();
    }
    derive_topic(&format!(
        "pluresdb-sync-testkit/{label}/{}",
        hex::encode(nonce)
    ))
}

/// `len` bytes of a pattern that differs per `seed` and per position.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ() {
        assert_ne!(pattern(64, 1), pattern(64, 2));
        assert_eq!(pattern(64, 1), pattern(64, 1));
        assert!(pattern(0, 3).is_empty());
    }

    #[test]
    fn slots() {
        assert_eq!(Mesh::slot(0, 1), 0);
        assert_eq!(Mesh::slot(1, 0), 0);
        assert_eq!(Mesh::slot(2, 0), 0);
        assert_eq!(Mesh::slot(2, 1), 1);
        assert_eq!(Mesh::slot(0, 2), 1);
    }
}
