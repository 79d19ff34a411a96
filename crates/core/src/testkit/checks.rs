//! The individual contract checks, one public method of [`ConformanceKit`] each: lifecycle,
//! message boundaries, ordering, one connection per peer, cancel safety, remote close,
//! lookup, disconnect, oversized sends.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use tokio::task::JoinHandle;

use super::mesh::{AbortOnDrop, join_all};
use super::{
    BOUNDARY_SIZES, ConformanceKit, ORDERING_MESSAGES, TransportFactory, fresh_topic, pattern,
};
use crate::{Connection, MAX_MESSAGE_BYTES};

/// How long to watch for a duplicate connection after every expected one arrived.
const SETTLE: Duration = Duration::from_secs(1);

impl<F: TransportFactory> ConformanceKit<F> {
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
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}
