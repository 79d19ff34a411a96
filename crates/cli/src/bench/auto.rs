//! `pluresdb-sync bench auto`: Auto mode against the modes it combines, same run, rounds
//! interleaved, on loopback with a relay server in this process and a loopback DHT.
//!
//! - Direct path: an Auto pair that met in the relay room (DHT off) and upgraded to the
//!   direct path, against a Hyperswarm pair; 64 KiB messages over one connection.
//! - Relayed path: an Auto pair with direct UDP off (QUIC packets as relay datagrams),
//!   against a Relay-mode pair on the same relay.
//! - Time from both joining to the first message (relay room, DHT off) and to the direct
//!   path: fresh pairs, median.
//! - The forced switch (`auto_switch.rs`): the longest gap in delivery while the direct path
//!   goes dark mid-stream and the connection falls back to the relay, and what was lost.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use pluresdb_sync::hyperswarm::relay_path::PeerPath;
use pluresdb_sync::{AutoTransport, Connection, RelayTransport, Transport};
use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_transport_auto::testkit::AutoNet;

use super::hyperswarm::ours;
use super::median;

pub(super) const WAIT: Duration = Duration::from_secs(30);

/// Options of `pluresdb-sync bench auto`.
#[derive(Debug, Args)]
pub(crate) struct AutoBenchArgs {
    /// MiB sent per throughput round.
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// Throughput rounds per pair (interleaved; the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Fresh Auto pairs timed from joining to the first message and to the direct path.
    #[arg(long, default_value_t = 5)]
    joins: usize,
    /// Forced switches (fresh pairs; the direct path blackholed mid-stream).
    #[arg(long, default_value_t = 3)]
    switches: usize,
    /// Numbered messages (200 bytes, one per millisecond) per forced switch.
    #[arg(long, default_value_t = 6000)]
    switch_messages: u32,
}

pub(super) type Pair = (Box<dyn Connection>, Box<dyn Connection>);

/// Connects `a` and `b` on a fresh topic.
pub(super) async fn pair(a: &mut dyn Transport, b: &mut dyn Transport) -> anyhow::Result<Pair> {
    let topic = fresh_topic("bench-auto");
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra?, rb?);
    let (ca, cb) = tokio::join!(
        tokio::time::timeout(WAIT, ra.recv()),
        tokio::time::timeout(WAIT, rb.recv())
    );
    Ok((
        ca.context("A found no peer")?.context("A ended")?,
        cb.context("B found no peer")?.context("B ended")?,
    ))
}

/// Waits until `t`'s only connection is direct.
async fn until_direct(t: &AutoTransport) -> anyhow::Result<()> {
    let mut events = t.path_events();
    let direct = |t: &AutoTransport| {
        t.paths()
            .iter()
            .any(|p| matches!(p.path, PeerPath::Direct(_)))
    };
    tokio::time::timeout(WAIT, async {
        while !direct(t) {
            let _ = events.recv().await;
        }
    })
    .await
    .context("the Auto pair did not go direct")
}

pub(super) async fn run(args: AutoBenchArgs) -> anyhow::Result<()> {
    let bytes = args.mib.max(1) * 1024 * 1024;
    let net = AutoNet::start().await?;
    let url = net.relay_url().to_owned();
    let relay = || {
        RelayTransport::builder()
            .relay_url(url.clone())
            .timeout(WAIT)
            .build()
    };

    let mut hs = (net.dht().builder().build()?, net.dht().builder().build()?);
    let mut direct = (
        net.builder().dht(false).build()?,
        net.builder().dht(false).build()?,
    );
    let mut relayed = (net.relayed_only().build()?, net.relayed_only().build()?);
    let mut relay_mode = (relay()?, relay()?);
    let mut pairs: Vec<Pair> = vec![
        pair(&mut hs.0, &mut hs.1).await.context("hyperswarm")?,
        pair(&mut direct.0, &mut direct.1)
            .await
            .context("auto, direct")?,
        pair(&mut relayed.0, &mut relayed.1)
            .await
            .context("auto, relayed")?,
        pair(&mut relay_mode.0, &mut relay_mode.1)
            .await
            .context("relay mode")?,
    ];
    until_direct(&direct.0).await?;
    until_direct(&direct.1).await?;
    let names = [
        "hyperswarm",
        "auto, direct path",
        "auto, relayed path",
        "relay mode",
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    // The process's CPU time per MiB (both peers, the relay, everything): less moved by
    // other load on the machine than the rate.
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for round in 0..args.rounds.max(1) {
        let mut next = Vec::new();
        for (i, (tx, rx)) in pairs.into_iter().enumerate() {
            let before = super::cpu_time().context("cannot read /proc/self/stat")?;
            let (tx, rx, rate) = ours(tx, rx, bytes).await.context(names[i])?;
            let used = super::cpu_time().context("cannot read /proc/self/stat")? - before;
            results[i].push(rate);
            cpu[i].push(used.as_secs_f64() * 1000.0 / args.mib.max(1) as f64);
            next.push((tx, rx));
        }
        pairs = next;
        eprintln!(
            "  round {round}: {}",
            names
                .iter()
                .zip(&results)
                .map(|(n, r)| format!("{n} {:.0}", r[round]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let m: Vec<f64> = results.iter_mut().map(|r| median(r)).collect();
    let c: Vec<f64> = cpu.iter_mut().map(|r| median(r)).collect();
    let direct_stats = direct.0.path_stats();
    let relayed_links = (relayed.0.relay_stats(), relayed.1.relay_stats());
    let metrics = net.relay().map(|r| r.metrics_text()).unwrap_or_default();
    drop(pairs);
    for t in [&mut hs.0, &mut hs.1] {
        t.disconnect().await?;
    }
    for t in [&mut direct.0, &mut direct.1, &mut relayed.0, &mut relayed.1] {
        t.disconnect().await?;
    }
    for t in [&mut relay_mode.0, &mut relay_mode.1] {
        t.disconnect().await?;
    }

    eprintln!(
        "joins ({} fresh Auto pairs, relay room, DHT off)",
        args.joins
    );
    let (mut first, mut to_direct) = (Vec::new(), Vec::new());
    for _ in 0..args.joins.max(1) {
        let mut a = net.builder().dht(false).build()?;
        let mut b = net.builder().dht(false).build()?;
        let started = Instant::now();
        let (mut ca, mut cb) = pair(&mut a, &mut b).await?;
        ca.send(b"first").await?;
        tokio::time::timeout(WAIT, cb.receive())
            .await
            .context("no first message")??
            .context("closed early")?;
        first.push(started.elapsed().as_secs_f64() * 1000.0);
        until_direct(&a).await?;
        until_direct(&b).await?;
        to_direct.push(started.elapsed().as_secs_f64() * 1000.0);
        drop((ca, cb));
        a.disconnect().await?;
        b.disconnect().await?;
    }
    eprintln!(
        "forced switches ({} fresh pairs, {} messages each)",
        args.switches, args.switch_messages
    );
    let mut switches = Vec::new();
    for i in 0..args.switches.max(1) {
        let s = super::auto_switch::forced_switch(&net, args.switch_messages.max(60))
            .await
            .context("forced switch")?;
        eprintln!("  switch {i}: {s:?}");
        switches.push(s);
    }
    net.stop().await?;

    println!(
        "{:<36} {:>10} {:>14} {:>12}",
        "64 KiB messages, one connection", "MiB/s", "ratio", "CPU ms/MiB"
    );
    println!("{:<36} {:>10.0} {:>14} {:>12.2}", names[0], m[0], "-", c[0]);
    println!(
        "{:<36} {:>10.0} {:>9.2} ÷ hs {:>12.2}",
        names[1],
        m[1],
        m[1] / m[0],
        c[1]
    );
    println!("{:<36} {:>10.0} {:>14} {:>12.2}", names[3], m[3], "-", c[3]);
    println!(
        "{:<36} {:>10.0} {:>9.2} ÷ relay {:>9.2}",
        names[2],
        m[2],
        m[2] / m[3],
        c[2]
    );
    println!(
        "direct pair, side A: {} bytes sent direct, {} packets relayed",
        direct_stats.upgraded_out_bytes, direct_stats.relayed_out
    );
    let metric = |line: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    println!(
        "relayed pair: frames sent {} + {} ({} + {} dropped at the links), relay forwarded {} datagrams, dropped {} (receiver's queue full), links dropped {} + {} received",
        relayed_links.0.sent,
        relayed_links.1.sent,
        relayed_links.0.send_dropped,
        relayed_links.1.send_dropped,
        metric("pluresdb_relay_datagrams_forwarded_total"),
        metric("pluresdb_relay_drops_total{reason=\"datagram_queue_full\"}"),
        relayed_links.0.received_dropped,
        relayed_links.1.received_dropped,
    );
    println!(
        "joined to first message, median (ms) {:>10.1}",
        median(&mut first)
    );
    println!(
        "joined to direct path, median (ms)   {:>10.1}",
        median(&mut to_direct)
    );
    let ms = |f: fn(&super::auto_switch::Switch) -> Duration| -> Vec<f64> {
        switches
            .iter()
            .map(|s| f(s).as_secs_f64() * 1000.0)
            .collect()
    };
    let mut gaps = ms(|s| s.longest_gap);
    let worst = gaps.iter().copied().fold(0.0, f64::max);
    println!(
        "forced switch ({} runs): longest delivery gap, median (ms) {:>6.0} (worst {worst:.0}; target < 2000)",
        switches.len(),
        median(&mut gaps)
    );
    println!(
        "  direct path dark -> relayed, median (ms) {:>6.0}; lit -> direct again {:>6.0}",
        median(&mut ms(|s| s.to_relayed)),
        median(&mut ms(|s| s.to_direct))
    );
    let sum = |f: fn(&super::auto_switch::Switch) -> u32| switches.iter().map(f).sum::<u32>();
    println!(
        "  messages lost {}, duplicated {}, out of order {} (of {} x {})",
        sum(|s| s.lost),
        sum(|s| s.duplicated),
        sum(|s| s.out_of_order),
        switches.len(),
        args.switch_messages.max(60)
    );
    Ok(())
}
