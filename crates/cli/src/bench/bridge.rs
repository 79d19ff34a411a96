//! `pluresdb-sync bench bridge`: what the SyncBridge costs on top of the connection it uses.
//!
//! Per transport (relay through an in-process relay server; hyperswarm on a loopback DHT
//! testnet), rounds interleaved, the median reported:
//! - Events: replica A's application publishes N events on its hub; until B's application
//!   has seen all N on its hub (envelope, codec, per-peer task, hub on both sides; events
//!   waiting together share a transport message). Baseline: N raw `Connection` messages of
//!   the size of one event's envelope, sent from A's connection until B's connection
//!   received them all.
//! - Events one by one: the same, but each event (each raw message) is sent only once the
//!   previous one arrived: no batching, the cost of one event's trip (N / 20 of them).
//! - Messages: M application messages (16 KiB by default) with `send_to` until B's
//!   `Messages` receiver has them all, against M raw `Connection` messages of the same size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Args;
use pluresdb_sync::{
    Connection, Messages, RelayTransport, SyncBridge, SyncBroadcaster, SyncEvent, Transport,
    bridge::envelope,
};
use pluresdb_sync_core::testkit::fresh_topic;
use tokio::sync::broadcast;

use super::median;

/// How long any one wait may take before the benchmark fails.
const WAIT: Duration = Duration::from_secs(60);

/// Options of `pluresdb-sync bench bridge`.
#[derive(Debug, Args)]
pub(crate) struct BridgeBenchArgs {
    /// Events per round.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Application messages per round.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Bytes per application message.
    #[arg(long, default_value_t = 16 * 1024)]
    message_bytes: usize,
    /// Rounds of each measurement (interleaved; the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Which transports to measure.
    #[arg(long, value_enum, default_value = "all")]
    mode: Mode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    All,
    Relay,
    Hyperswarm,
}

/// The event id of sequence number `i`: always the same length, so every event's envelope
/// has the same size as the raw baseline's messages.
fn event(i: usize) -> SyncEvent {
    SyncEvent::NodeUpsert {
        id: format!("doc/{i:010}"),
    }
}

/// One row of the result table.
struct Row {
    name: String,
    raw: f64,
    bridge: f64,
}

pub(super) async fn run(args: BridgeBenchArgs) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    if matches!(args.mode, Mode::All | Mode::Relay) {
        let (server, url) = pluresdb_sync_transport_relay::testkit::relay().await?;
        let make = || -> anyhow::Result<Box<dyn Transport>> {
            Ok(Box::new(
                RelayTransport::builder()
                    .relay_url(url.clone())
                    .timeout(WAIT)
                    .build()?,
            ))
        };
        let four = [make()?, make()?, make()?, make()?];
        rows.extend(measure("relay", four, &args).await.context("relay")?);
        server.shutdown().await;
    }
    if matches!(args.mode, Mode::All | Mode::Hyperswarm) {
        let dht = pluresdb_sync_transport_hyperswarm::testkit::LoopbackDht::start().await?;
        let make =
            || -> anyhow::Result<Box<dyn Transport>> { Ok(Box::new(dht.builder().build()?)) };
        let four = [make()?, make()?, make()?, make()?];
        rows.extend(
            measure("hyperswarm", four, &args)
                .await
                .context("hyperswarm")?,
        );
        dht.stop().await?;
    }
    println!(
        "{:<44} {:>14} {:>14} {:>8}",
        "bridge benchmark (per second)", "raw Connection", "SyncBridge", "ratio"
    );
    for r in &rows {
        println!(
            "{:<44} {:>14.0} {:>14.0} {:>8.2}",
            r.name,
            r.raw,
            r.bridge,
            r.bridge / r.raw
        );
    }
    Ok(())
}

/// Both measurements over one transport: `t[0]`, `t[1]` for the raw pair, `t[2]`, `t[3]`
/// for the bridged pair.
async fn measure(
    mode: &str,
    t: [Box<dyn Transport>; 4],
    args: &BridgeBenchArgs,
) -> anyhow::Result<Vec<Row>> {
    let [mut ra, mut rb, ba, bb] = t;
    let (mut ca, mut cb) = raw_pair(&mut ra, &mut rb).await?;
    let event_bytes = envelope::encode_event(&event(0))?
        .context("a node event has an envelope")?
        .len();

    let capacity = args.events.max(1).next_power_of_two();
    let (hub_a, hub_b) = (
        SyncBroadcaster::new(capacity),
        SyncBroadcaster::new(capacity),
    );
    let mut seen_b = hub_b.subscribe();
    let topic = fresh_topic("bench-bridge");
    let a = Arc::new(SyncBridge::start(ba, topic, hub_a.clone()).await?);
    let b = SyncBridge::start(bb, topic, hub_b.clone()).await?;
    let mut messages_b = b.messages().context("the message receiver")?;
    match tokio::time::timeout(WAIT, seen_b.recv()).await {
        Ok(Ok(SyncEvent::PeerConnected { .. })) => {}
        other => bail!("the bridged pair did not link up: {other:?}"),
    }
    let peer_b = loop {
        if let Some(p) = a.peers().pop() {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };

    let (mut raw_events, mut bridge_events) = (Vec::new(), Vec::new());
    let (mut raw_single, mut bridge_single) = (Vec::new(), Vec::new());
    let singles = (args.events / 20).max(1);
    let (mut raw_msgs, mut bridge_msgs) = (Vec::new(), Vec::new());
    for round in 0..args.rounds.max(1) {
        let (x, y, r) = raw_rate(ca, cb, event_bytes, args.events).await?;
        (ca, cb) = (x, y);
        raw_events.push(r);
        bridge_events.push(bridge_event_rate(&hub_a, &mut seen_b, args.events).await?);
        raw_single.push(raw_one_by_one(&mut ca, &mut cb, event_bytes, singles).await?);
        bridge_single.push(bridge_one_by_one(&hub_a, &mut seen_b, singles).await?);
        let (x, y, r) = raw_rate(ca, cb, args.message_bytes, args.messages).await?;
        (ca, cb) = (x, y);
        raw_msgs.push(r);
        bridge_msgs.push(
            bridge_message_rate(
                &a,
                &peer_b,
                &mut messages_b,
                args.message_bytes,
                args.messages,
            )
            .await?,
        );
        eprintln!(
            "  {mode} round {round}: events raw {:.0}/s bridge {:.0}/s; one by one raw {:.0}/s \
             bridge {:.0}/s; messages raw {:.0}/s bridge {:.0}/s",
            raw_events[round],
            bridge_events[round],
            raw_single[round],
            bridge_single[round],
            raw_msgs[round],
            bridge_msgs[round]
        );
    }
    let status = a.status();
    ensure!(
        status.peers_cut == 0,
        "the bridge cut its peer during the benchmark: {status:?}"
    );
    Arc::into_inner(a)
        .context("the bridge is still shared")?
        .stop()
        .await?;
    b.stop().await?;
    drop((ca, cb));
    ra.disconnect().await?;
    rb.disconnect().await?;
    Ok(vec![
        Row {
            name: format!("{mode}: events of {event_bytes} B"),
            raw: median(&mut raw_events),
            bridge: median(&mut bridge_events),
        },
        Row {
            name: format!("{mode}: events of {event_bytes} B, one by one"),
            raw: median(&mut raw_single),
            bridge: median(&mut bridge_single),
        },
        Row {
            name: format!("{mode}: messages of {} B", args.message_bytes),
            raw: median(&mut raw_msgs),
            bridge: median(&mut bridge_msgs),
        },
    ])
}

/// A connection each way between two transports on a fresh topic.
async fn raw_pair(
    a: &mut Box<dyn Transport>,
    b: &mut Box<dyn Transport>,
) -> anyhow::Result<(Box<dyn Connection>, Box<dyn Connection>)> {
    let topic = fresh_topic("bench-raw");
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra?, rb?);
    let (ca, cb) = tokio::join!(
        tokio::time::timeout(WAIT, ra.recv()),
        tokio::time::timeout(WAIT, rb.recv())
    );
    Ok((
        ca.context("no raw connection in time")?
            .context("transport ended")?,
        cb.context("no raw connection in time")?
            .context("transport ended")?,
    ))
}

/// `count` raw messages of `size` bytes from `a` until `b` has them all, per second.
async fn raw_rate(
    mut a: Box<dyn Connection>,
    mut b: Box<dyn Connection>,
    size: usize,
    count: usize,
) -> anyhow::Result<(Box<dyn Connection>, Box<dyn Connection>, f64)> {
    let message = vec![0x5a; size];
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..count {
            a.send(&message).await?;
        }
        anyhow::Ok(a)
    });
    for i in 0..count {
        let got = tokio::time::timeout(WAIT, b.receive())
            .await
            .with_context(|| format!("raw message {i} timed out"))??
            .context("raw connection closed")?;
        ensure!(got.len() == size, "raw message {i} has {} bytes", got.len());
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    Ok((sender.await??, b, rate))
}

/// `count` raw messages of `size` bytes, each sent once the previous one arrived, per second.
async fn raw_one_by_one(
    a: &mut Box<dyn Connection>,
    b: &mut Box<dyn Connection>,
    size: usize,
    count: usize,
) -> anyhow::Result<f64> {
    let message = vec![0x5a; size];
    let started = Instant::now();
    for i in 0..count {
        a.send(&message).await?;
        let got = tokio::time::timeout(WAIT, b.receive())
            .await
            .with_context(|| format!("raw message {i} timed out"))??
            .context("raw connection closed")?;
        ensure!(got.len() == size, "raw message {i} has {} bytes", got.len());
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// `count` events, each published once the previous one reached the peer's hub, per second.
async fn bridge_one_by_one(
    hub: &SyncBroadcaster,
    seen: &mut broadcast::Receiver<SyncEvent>,
    count: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    for i in 0..count {
        hub.publish(event(i)).context("publishing")?;
        let got = tokio::time::timeout(WAIT, seen.recv())
            .await
            .with_context(|| format!("event {i} timed out"))?
            .with_context(|| format!("event {i}"))?;
        ensure!(got == event(i), "event {i} arrived as {got:?}");
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// `count` events published on `hub` until `seen` (the peer's hub) has them all, per second.
async fn bridge_event_rate(
    hub: &SyncBroadcaster,
    seen: &mut broadcast::Receiver<SyncEvent>,
    count: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    for i in 0..count {
        hub.publish(event(i)).context("publishing")?;
    }
    for i in 0..count {
        let got = tokio::time::timeout(WAIT, seen.recv())
            .await
            .with_context(|| format!("event {i} timed out"))?
            .with_context(|| format!("event {i}"))?;
        ensure!(got == event(i), "event {i} arrived as {got:?}");
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// `count` messages of `size` bytes sent with `send_to` until `messages` has them all, per
/// second. The sender is its own task, as in the raw baseline.
async fn bridge_message_rate(
    bridge: &Arc<SyncBridge>,
    peer: &str,
    messages: &mut Messages,
    size: usize,
    count: usize,
) -> anyhow::Result<f64> {
    let message = vec![0x5a; size];
    let started = Instant::now();
    let (bridge, peer) = (bridge.clone(), peer.to_owned());
    let send = tokio::spawn(async move {
        for _ in 0..count {
            bridge.send_to(&peer, &message).await?;
        }
        anyhow::Ok(())
    });
    let receive = async {
        for i in 0..count {
            let (_, got) = tokio::time::timeout(WAIT, messages.recv())
                .await
                .with_context(|| format!("message {i} timed out"))?
                .context("the bridge stopped")?;
            ensure!(got.len() == size, "message {i} has {} bytes", got.len());
        }
        anyhow::Ok(())
    };
    receive.await?;
    send.await??;
    Ok(count as f64 / started.elapsed().as_secs_f64())
}
