//! `pluresdb-sync bench auto`, the forced switch: an Auto pair that met in the relay room
//! and went direct streams numbered messages (200 bytes, one per millisecond); a third of
//! the way in, side A's data socket blackholes B's direct endpoint (the testkit's
//! `blackhole_udp`: UDP to and from it dropped, no root needed), so the connection falls
//! back to the relay; once the fallback has carried a sixth of the messages the endpoint is
//! lit again and the connection goes direct again. Measured: the longest gap between
//! consecutive deliveries, dark → relayed and lit → direct, and messages lost, duplicated
//! or out of order (the target: a gap under 2 s, nothing lost).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pluresdb_sync::hyperswarm::relay_path::{PathInfo, PeerPath};
use pluresdb_sync::hyperswarm::{DEFAULT_IDLE_TIMEOUT, DEFAULT_KEEP_ALIVE};
use pluresdb_sync::{AutoTransport, Connection, Transport};
use pluresdb_sync_transport_auto::testkit::AutoNet;
use tokio::sync::broadcast;

use super::auto::{WAIT, pair};

/// Bytes per message (its number first).
const SIZE: usize = 200;

/// How long the reader waits for a message before it counts the rest as lost.
const GIVE_UP: Duration = Duration::from_secs(10);

/// One forced switch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Switch {
    /// The longest time between two consecutive deliveries.
    pub(super) longest_gap: Duration,
    /// From blackholing to both sides' paths saying relayed (the later side).
    pub(super) to_relayed: Duration,
    /// From lighting the endpoint again to both sides direct.
    pub(super) to_direct: Duration,
    pub(super) lost: u32,
    pub(super) duplicated: u32,
    pub(super) out_of_order: u32,
}

/// What the reader saw.
struct Delivery {
    longest_gap: Duration,
    lost: u32,
    duplicated: u32,
    out_of_order: u32,
}

/// Reads numbered messages until the last one arrives, the connection ends or nothing
/// arrives for [`GIVE_UP`]; hands the connection back (dropping it would close it).
async fn read(
    mut rx: Box<dyn Connection>,
    messages: u32,
    count: Arc<AtomicU32>,
) -> (Box<dyn Connection>, Delivery) {
    let mut seen = HashSet::new();
    let (mut duplicated, mut out_of_order) = (0, 0);
    let mut next = 0u32;
    let mut last = Instant::now();
    let mut longest_gap = Duration::ZERO;
    while seen.len() < messages as usize {
        let Ok(Ok(Some(msg))) = tokio::time::timeout(GIVE_UP, rx.receive()).await else {
            break;
        };
        let Some(n) = msg
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
        else {
            continue;
        };
        let now = Instant::now();
        longest_gap = longest_gap.max(now - last);
        last = now;
        if !seen.insert(n) {
            duplicated += 1;
        } else if n != next {
            out_of_order += 1;
        }
        next = n.saturating_add(1);
        count.fetch_add(1, Ordering::Relaxed);
    }
    let delivery = Delivery {
        longest_gap,
        lost: messages.saturating_sub(seen.len() as u32),
        duplicated,
        out_of_order,
    };
    (rx, delivery)
}

/// Waits for a path event matching `want`; when it came.
async fn wait_path(
    events: &mut broadcast::Receiver<PathInfo>,
    want: impl Fn(&PeerPath) -> bool,
) -> anyhow::Result<Instant> {
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(e) if want(&e.path) => return Ok(Instant::now()),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => bail!("path events ended"),
            }
        }
    })
    .await
    .context("no such path event in time")?
}

fn is_direct(p: &PeerPath) -> bool {
    matches!(p, PeerPath::Direct(_))
}

/// Waits until `n` messages arrived.
async fn reached(count: &AtomicU32, n: u32) -> anyhow::Result<()> {
    tokio::time::timeout(WAIT, async {
        while count.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .with_context(|| format!("{n} messages did not arrive in time"))
}

/// One forced switch on a fresh pair, streaming `messages` messages.
pub(super) async fn forced_switch(net: &AutoNet, messages: u32) -> anyhow::Result<Switch> {
    let build = || {
        net.builder()
            .dht(false)
            .keep_alive(DEFAULT_KEEP_ALIVE, DEFAULT_IDLE_TIMEOUT)
            .build()
    };
    let (mut a, mut b): (AutoTransport, AutoTransport) = (build()?, build()?);
    let (mut ea, mut eb) = (a.path_events(), b.path_events());
    let (mut tx, rx) = pair(&mut a, &mut b).await?;
    wait_path(&mut ea, is_direct).await?;
    wait_path(&mut eb, is_direct).await?;
    let endpoint = a
        .paths()
        .into_iter()
        .find_map(|p| match p.path {
            PeerPath::Direct(e) => Some(e),
            _ => None,
        })
        .context("A's connection is not direct")?;

    let count = Arc::new(AtomicU32::new(0));
    let reader = tokio::spawn(read(rx, messages, count.clone()));
    let writer = tokio::spawn(async move {
        let mut msg = vec![0u8; SIZE];
        for n in 0..messages {
            msg[..4].copy_from_slice(&n.to_be_bytes());
            tx.send(&msg).await?;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        anyhow::Ok(tx)
    });
    reached(&count, messages / 3).await?;
    if !a.blackhole_udp(endpoint, true) {
        bail!("cannot blackhole {endpoint}");
    }
    let dark = Instant::now();
    let relayed = |p: &PeerPath| !is_direct(p);
    let fell = wait_path(&mut ea, relayed)
        .await?
        .max(wait_path(&mut eb, relayed).await?);
    let at_fallback = count.load(Ordering::Relaxed);
    reached(&count, (at_fallback + messages / 6).min(messages)).await?;
    a.blackhole_udp(endpoint, false);
    let lit = Instant::now();
    let back = wait_path(&mut ea, is_direct)
        .await?
        .max(wait_path(&mut eb, is_direct).await?);
    let (rx, delivery) = reader.await.context("the reader failed")?;
    let tx = writer.await.context("the writer failed")??;
    drop((tx, rx));
    a.disconnect().await?;
    b.disconnect().await?;
    Ok(Switch {
        longest_gap: delivery.longest_gap,
        to_relayed: fell - dark,
        to_direct: back - lit,
        lost: delivery.lost,
        duplicated: delivery.duplicated,
        out_of_order: delivery.out_of_order,
    })
}
