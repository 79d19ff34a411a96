//! `pluresdb-sync bench relay`.
//!
//! - Message rate: one client streams N messages that cross the server once. Baseline: a plain
//!   tokio-tungstenite echo server (client -> server -> same client). Relay: the relay server
//!   (client A -> relay -> client B, raw relay frames, no Noise: this measures the server).
//! - Added latency: the same paths paced at half the relay's 64 B message rate; every
//!   message carries its send time; the relay's p50/p99 minus the baseline's.
//! - Memory per idle connection: a relay server *process* is spawned; N WebSocket clients each
//!   join their own room; the server's RSS growth divided by N. With `--idle-baseline PATH`
//!   another build's relay is measured the same way in the same run, alternating.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use pluresdb_sync_transport_relay::protocol::{self, ConnId, RoomId};
use pluresdb_sync_transport_relay::testkit::raw::{self, Ws};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

use super::{median, quantile, raise_fd_limit, rss_bytes};

/// Options of `pluresdb-sync bench relay`.
#[derive(Debug, Args)]
pub(crate) struct RelayBenchArgs {
    /// Idle connections for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Rounds of each throughput measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Messages per throughput round at 64 B (16 KiB rounds send a tenth as many).
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Seconds of paced traffic for the latency measurement.
    #[arg(long, default_value_t = 3.0)]
    latency_secs: f64,
    /// Another `pluresdb-sync` binary (an older build, say) whose relay's idle memory is
    /// measured in the same run, alternating with this one's, as the baseline.
    #[arg(long, value_name = "PATH")]
    idle_baseline: Option<std::path::PathBuf>,
    /// Rounds of the idle-memory measurement (the median is reported).
    #[arg(long, default_value_t = 1)]
    idle_rounds: usize,
    /// Only the idle-memory measurement (no message rate or latency).
    #[arg(long)]
    idle_only: bool,
}

pub(super) async fn run(args: RelayBenchArgs) -> anyhow::Result<()> {
    if args.idle_only {
        let (base, ours) = idle_rows(&args).await?;
        print_idle(base, ours, args.connections);
        return Ok(());
    }
    let echo = spawn_echo_server().await?;
    let (relay, relay_url) = pluresdb_sync_transport_relay::testkit::relay().await?;
    let echo_url = format!("ws://{echo}/");

    let mut rows = Vec::new();
    let mut relay_rate_64 = 0.0;
    for (size, count) in [
        (64, args.messages),
        (16 * 1024, (args.messages / 10).max(1)),
    ] {
        let (mut base, mut ours) = (Vec::new(), Vec::new());
        for round in 0..args.rounds.max(1) {
            base.push(echo_rate(&echo_url, size, count).await?);
            ours.push(relay_rate(&relay_url, size, count).await?);
            eprintln!(
                "  {size} B round {round}: echo {:.0} msg/s, relay {:.0} msg/s",
                base[round], ours[round]
            );
        }
        let (b, o) = (median(&mut base), median(&mut ours));
        if size == 64 {
            relay_rate_64 = o;
        }
        rows.push((format!("message rate, {size} B (msg/s)"), b, o));
    }

    // Half of the relay's own capacity; both paths carry the same paced load.
    let rate = relay_rate_64 / 2.0;
    let secs = args.latency_secs;
    eprintln!("latency at half load ({rate:.0} msg/s for {secs} s)");
    let base = echo_latency(&echo_url, rate, secs).await?;
    let ours = relay_latency(&relay_url, rate, secs).await?;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    relay.shutdown().await;

    let (idle_base, idle_ours) = idle_rows(&args).await?;

    println!(
        "{:<34} {:>14} {:>14} {:>8}",
        "relay benchmark", "baseline", "relay", "ratio"
    );
    for (name, b, o) in &rows {
        println!("{name:<34} {b:>14.0} {o:>14.0} {:>8.2}", o / b);
    }
    for (name, q) in [("latency p50 (ms)", 0.5), ("latency p99 (ms)", 0.99)] {
        let (b, o) = (ms(quantile(&base, q)), ms(quantile(&ours, q)));
        println!("{name:<34} {b:>14.3} {o:>14.3}   added {:.3} ms", o - b);
    }
    print_idle(idle_base, idle_ours, args.connections);
    Ok(())
}

/// The idle memory per connection of `--idle-baseline`'s relay (when given) and this
/// binary's, medians of `--idle-rounds` alternating rounds.
async fn idle_rows(args: &RelayBenchArgs) -> anyhow::Result<(Option<f64>, f64)> {
    let ours_exe = std::env::current_exe()?;
    let (mut base, mut ours) = (Vec::new(), Vec::new());
    for round in 0..args.idle_rounds.max(1) {
        if let Some(exe) = &args.idle_baseline {
            eprintln!(
                "memory per idle connection, baseline {} ({} connections, round {round})",
                exe.display(),
                args.connections
            );
            base.push(idle_memory(exe, args.connections).await?);
        }
        eprintln!(
            "memory per idle connection ({} connections, round {round})",
            args.connections
        );
        ours.push(idle_memory(&ours_exe, args.connections).await?);
    }
    let base = (!base.is_empty()).then(|| median(&mut base));
    Ok((base, median(&mut ours)))
}

fn print_idle(base: Option<f64>, ours: f64, connections: usize) {
    let name = "RSS per idle connection (bytes)";
    match base {
        Some(b) => println!(
            "{name:<34} {b:>14.0} {ours:>14.0} {:>8.2}   ({connections} connections)",
            ours / b
        ),
        None => println!(
            "{name:<34} {:>14} {ours:>14.0}   ({connections} connections)",
            "-"
        ),
    }
}

/// A plain tokio-tungstenite server that sends every binary message back.
async fn spawn_echo_server() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let (sink, stream) = ws.split();
                let _ = stream
                    .try_filter(|m| std::future::ready(m.is_binary()))
                    .forward(sink)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// A plain WebSocket to the echo server.
async fn echo_connect(url: &str) -> anyhow::Result<Ws> {
    let (ws, _) = raw::connect_with(url, None, None)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(ws)
}

/// A relay client that joined `room`: its socket and connection id.
async fn relay_client(url: &str, room: RoomId) -> anyhow::Result<(Ws, ConnId)> {
    let (mut ws, id) = raw::client(url).await?;
    raw::joined(&mut ws, room).await?;
    Ok((ws, id))
}

fn random_room() -> RoomId {
    let mut room = [0u8; 32];
    let _ = getrandom::fill(&mut room);
    room
}

/// Sends `count` messages on `tx` (built by `frame`) while counting `count` binary messages on
/// `rx`; returns messages per second.
async fn stream_rate(
    mut tx: impl SinkExt<Message, Error = tokio_tungstenite::tungstenite::Error>
    + Unpin
    + Send
    + 'static,
    mut rx: impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
    count: usize,
    frame: Vec<u8>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let frame = bytes::Bytes::from(frame);
    let sender = tokio::spawn(async move {
        for _ in 0..count {
            tx.feed(Message::Binary(frame.clone())).await?;
        }
        tx.flush().await?;
        anyhow::Ok(tx)
    });
    let mut got = 0;
    while got < count {
        match tokio::time::timeout(Duration::from_secs(30), rx.next()).await {
            Ok(Some(Ok(Message::Binary(_)))) => got += 1,
            Ok(Some(Ok(_))) => {}
            other => bail!("after {got} of {count} messages: {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    sender.await??;
    Ok(count as f64 / elapsed.as_secs_f64())
}

async fn echo_rate(url: &str, size: usize, count: usize) -> anyhow::Result<f64> {
    let (tx, rx) = echo_connect(url).await?.split();
    stream_rate(tx, rx, count, vec![7; size]).await
}

async fn relay_rate(url: &str, size: usize, count: usize) -> anyhow::Result<f64> {
    let room = random_room();
    let (a, _) = relay_client(url, room).await?;
    let (b, b_id) = relay_client(url, room).await?;
    let (tx, _a_rx) = a.split();
    let (_b_tx, rx) = b.split();
    stream_rate(
        tx,
        rx,
        count,
        protocol::encode_send(&room, b_id, &vec![7; size]),
    )
    .await
}

/// Sends 64 B messages at `rate` per second for `secs`, each stamped with its send time;
/// returns the sorted one-way latencies seen by the receiver.
async fn paced_latency(
    mut tx: impl SinkExt<Message, Error = tokio_tungstenite::tungstenite::Error>
    + Unpin
    + Send
    + 'static,
    mut rx: impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
    rate: f64,
    secs: f64,
    header: Vec<u8>,
) -> anyhow::Result<Vec<Duration>> {
    let epoch = Instant::now();
    let total = (rate * secs).max(1.0) as usize;
    let header_len = header.len();
    let sender = tokio::spawn(async move {
        // Bursts every millisecond: tokio timers cannot tick once per message at these rates.
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let mut sent = 0usize;
        while sent < total {
            tick.tick().await;
            let due = ((epoch.elapsed().as_secs_f64() * rate) as usize).min(total);
            while sent < due {
                let mut msg = header.clone();
                msg.extend_from_slice(&(epoch.elapsed().as_nanos() as u64).to_be_bytes());
                msg.resize(header_len + 64, 0);
                tx.feed(Message::Binary(msg.into())).await?;
                sent += 1;
            }
            tx.flush().await?;
        }
        anyhow::Ok(tx)
    });
    let offset = if header_len > 0 {
        protocol::DELIVER_OVERHEAD
    } else {
        0
    };
    let mut latencies = Vec::with_capacity(total);
    while latencies.len() < total {
        match tokio::time::timeout(Duration::from_secs(30), rx.next()).await {
            Ok(Some(Ok(Message::Binary(m)))) => {
                let stamp = m
                    .get(offset..offset + 8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                    .context("a message without its timestamp")?;
                latencies.push(epoch.elapsed().saturating_sub(Duration::from_nanos(stamp)));
            }
            Ok(Some(Ok(_))) => {}
            other => bail!("after {} of {total} messages: {other:?}", latencies.len()),
        }
    }
    sender.await??;
    latencies.sort();
    Ok(latencies)
}

async fn echo_latency(url: &str, rate: f64, secs: f64) -> anyhow::Result<Vec<Duration>> {
    let (tx, rx) = echo_connect(url).await?.split();
    paced_latency(tx, rx, rate, secs, Vec::new()).await
}

async fn relay_latency(url: &str, rate: f64, secs: f64) -> anyhow::Result<Vec<Duration>> {
    let room = random_room();
    let (a, _) = relay_client(url, room).await?;
    let (b, b_id) = relay_client(url, room).await?;
    let (tx, _a_rx) = a.split();
    let (_b_tx, rx) = b.split();
    // SEND header; the payload (timestamp + padding) follows it.
    let header = protocol::encode_send(&room, b_id, &[]);
    paced_latency(tx, rx, rate, secs, header).await
}

/// Spawns `exe relay` (a `pluresdb-sync` binary) and measures its RSS growth per idle,
/// joined connection.
async fn idle_memory(exe: &std::path::Path, connections: usize) -> anyhow::Result<f64> {
    let limit = raise_fd_limit();
    if limit < (connections as u64) + 256 {
        bail!(
            "the open-file limit is {limit}; {connections} connections need more (raise the hard limit)"
        );
    }
    let mut child = tokio::process::Command::new(exe)
        .args(["relay", "--listen", "127.0.0.1:0"])
        .args(["--max-connections-per-ip", &(connections + 16).to_string()])
        .args(["--join-timeout-ms", "600000", "--idle-timeout-ms", "600000"])
        .args(["--ping-interval-ms", "300000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("spawning the relay server")?;
    let pid = child.id().context("relay exited at once")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .context("relay did not start")??
            .context("relay exited")?;
        if let Some(rest) = line.strip_prefix("relay listening on ") {
            break rest.to_owned();
        }
    };
    // One warm-up connection so one-time allocations are not counted per connection.
    let warm = relay_client(&url, random_room()).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes(pid).context("cannot read the relay's RSS")?;

    let mut clients = Vec::with_capacity(connections);
    let mut pending = futures_util::stream::iter(0..connections)
        .map(|_| relay_client(&url, random_room()))
        .buffer_unordered(128);
    while let Some(client) = pending.next().await {
        clients.push(client?);
        if clients.len() % 2_000 == 0 {
            eprintln!("  {} connections open", clients.len());
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes(pid).context("cannot read the relay's RSS")?;
    drop(clients);
    drop(warm);
    let _ = child.kill().await;
    Ok(after.saturating_sub(before) as f64 / connections as f64)
}
