//! `pluresdb-sync bench relay`: the relay against a plain tokio-tungstenite echo server,
//! measured in the same run on the same machine, reported as ratios.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use futures_util::{SinkExt, StreamExt};
use pluresdb_sync_transport_relay::protocol::{
    ClientFrame, Frame, RelayFrame, SUBPROTOCOL, decode, encode_send,
};
use pluresdb_sync_transport_relay::server::{RelayServer, RelayServerConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Benchmarks.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Debug, Subcommand)]
enum BenchWhat {
    /// Relay forwarding rate, added latency and memory per idle connection, against a plain
    /// tokio-tungstenite echo server measured in the same run.
    Relay {
        /// Messages per throughput run.
        #[arg(long, default_value_t = 200_000)]
        messages: usize,
        /// Idle connections for the memory measurement (each needs a file descriptor here
        /// and one in the relay process).
        #[arg(long, default_value_t = 10_000)]
        idle_connections: usize,
    },
}

pub(crate) fn run(args: BenchArgs) -> anyhow::Result<()> {
    let BenchWhat::Relay {
        messages,
        idle_connections,
    } = args.what;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(relay(messages, idle_connections))
}

async fn relay(messages: usize, idle: usize) -> anyhow::Result<()> {
    let echo = spawn_echo().await?;
    let relay = RelayServer::bind("127.0.0.1:0".parse()?, RelayServerConfig::default()).await?;
    let relay_addr = relay.local_addr();
    println!("| measurement | echo baseline | relay | ratio |");
    println!("|---|---|---|---|");
    let mut rates = Vec::new();
    for size in [64usize, 16 * 1024] {
        let n = if size > 1024 { messages / 4 } else { messages };
        let base = echo_rate(echo, size, n).await?;
        let ours = relay_rate(relay_addr, size, n).await?;
        println!(
            "| {size} B messages/s | {base:.0} | {ours:.0} | {:.2}x (target >= 0.7x) |",
            ours / base
        );
        rates.push((size, base, ours));
    }
    let (_, base64, ours64) = rates[0];
    let load = base64.min(ours64) / 2.0;
    let (b50, b99) = echo_latency(echo, load, 20_000).await?;
    let (r50, r99) = relay_latency(relay_addr, load, 20_000).await?;
    println!(
        "| latency p50 at {load:.0} msg/s (64 B) | {} | {} | +{} |",
        us(b50),
        us(r50),
        us(r50.saturating_sub(b50))
    );
    println!(
        "| latency p99 at {load:.0} msg/s (64 B) | {} | {} | +{} (target relay p99 < 5 ms) |",
        us(b99),
        us(r99),
        us(r99.saturating_sub(b99))
    );
    drop(relay);
    let per_conn = idle_memory(idle).await?;
    println!(
        "| RSS per idle connection ({idle} joined connections, relay process) | - | {:.1} KiB | (target < 16 KiB) |",
        per_conn / 1024.0
    );
    Ok(())
}

fn us(d: Duration) -> String {
    format!("{} us", d.as_micros())
}

/// A plain tokio-tungstenite server that echoes every binary message back (batching flushes).
async fn spawn_echo() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let (mut tx, rx) = ws.split();
                // Batch writes like the relay does, so the baseline is not handicapped by a
                // flush per message.
                let mut rx = rx.ready_chunks(64);
                while let Some(batch) = rx.next().await {
                    for m in batch {
                        let Ok(m) = m else { return };
                        if m.is_binary() && tx.feed(m).await.is_err() {
                            return;
                        }
                    }
                    if tx.flush().await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

async fn ws(addr: SocketAddr, protocol: bool) -> anyhow::Result<Ws> {
    let mut req = format!("ws://{addr}/relay").into_client_request()?;
    if protocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", SUBPROTOCOL.parse()?);
    }
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true).await?;
    Ok(ws)
}

async fn next_frame(ws: &mut Ws) -> anyhow::Result<Frame> {
    loop {
        match ws.next().await.context("relay closed")?? {
            Message::Binary(b) => match decode(&b)? {
                Frame::Ping(_) => {}
                f => return Ok(f),
            },
            Message::Close(c) => bail!("relay closed: {c:?}"),
            _ => {}
        }
    }
}

/// Two relay clients in one room: returns (sender, receiver, receiver id, room).
async fn relay_pair(addr: SocketAddr) -> anyhow::Result<(Ws, Ws, u64, [u8; 32])> {
    let mut room = [0u8; 32];
    getrandom::fill(&mut room).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut a = ws(addr, true).await?;
    let mut b = ws(addr, true).await?;
    next_frame(&mut a).await?;
    let Frame::Relay(RelayFrame::Welcome { conn: b_id, .. }) = next_frame(&mut b).await? else {
        bail!("no WELCOME");
    };
    for c in [&mut a, &mut b] {
        c.send(Message::Binary(
            Frame::Client(ClientFrame::Join { room }).encode().into(),
        ))
        .await?;
        next_frame(c).await?;
    }
    Ok((a, b, b_id, room))
}

async fn echo_rate(addr: SocketAddr, size: usize, n: usize) -> anyhow::Result<f64> {
    let (mut tx, mut rx) = ws(addr, false).await?.split();
    let payload = vec![1u8; size];
    let start = Instant::now();
    let send = async {
        for _ in 0..n {
            tx.feed(Message::Binary(payload.clone().into())).await?;
        }
        tx.flush().await?;
        anyhow::Ok(())
    };
    let recv = async {
        let mut got = 0;
        while got < n {
            if let Message::Binary(_) = rx.next().await.context("echo closed")?? {
                got += 1;
            }
        }
        anyhow::Ok(())
    };
    let (s, r) = tokio::join!(send, recv);
    s?;
    r?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

async fn relay_rate(addr: SocketAddr, size: usize, n: usize) -> anyhow::Result<f64> {
    let (a, mut b, b_id, room) = relay_pair(addr).await?;
    let (mut tx, _a_rx) = a.split();
    let payload = vec![1u8; size];
    let start = Instant::now();
    let send = async {
        for _ in 0..n {
            tx.feed(Message::Binary(encode_send(&room, b_id, &payload).into()))
                .await?;
        }
        tx.flush().await?;
        anyhow::Ok(())
    };
    let recv = async {
        let mut got = 0;
        while got < n {
            if let Frame::Relay(RelayFrame::Deliver { .. }) = next_frame(&mut b).await? {
                got += 1;
            }
        }
        anyhow::Ok(())
    };
    let (s, r) = tokio::join!(send, recv);
    s?;
    r?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Sends `n` 64-byte messages at `rate`/s, each stamped with its send time; returns the
/// p50/p99 one-way delay seen by `receive` (same process, same clock).
async fn paced<S, R>(
    rate: f64,
    n: usize,
    mut send: S,
    mut receive: R,
) -> anyhow::Result<(Duration, Duration)>
where
    S: FnMut(Vec<u8>) -> futures_util::future::BoxFuture<'static, anyhow::Result<()>>,
    R: FnMut() -> futures_util::future::BoxFuture<'static, anyhow::Result<Vec<u8>>>,
{
    let origin = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let sender = async {
        for i in 0..n {
            tokio::time::sleep_until((origin + interval * i as u32).into()).await;
            let mut p = (origin.elapsed().as_nanos() as u64).to_be_bytes().to_vec();
            p.resize(64, 0);
            send(p).await?;
        }
        anyhow::Ok(())
    };
    let receiver = async {
        let mut delays = Vec::with_capacity(n);
        while delays.len() < n {
            let p = receive().await?;
            let mut stamp = [0u8; 8];
            stamp.copy_from_slice(p.get(..8).context("short message")?);
            let sent = Duration::from_nanos(u64::from_be_bytes(stamp));
            delays.push(origin.elapsed().saturating_sub(sent));
        }
        anyhow::Ok(delays)
    };
    let (s, r) = tokio::join!(sender, receiver);
    s?;
    let mut d = r?;
    d.sort();
    Ok((d[d.len() / 2], d[(d.len() * 99) / 100]))
}

async fn echo_latency(
    addr: SocketAddr,
    rate: f64,
    n: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let (tx, rx) = ws(addr, false).await?.split();
    let tx = std::sync::Arc::new(tokio::sync::Mutex::new(tx));
    let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
    paced(
        rate,
        n,
        |p| {
            let tx = tx.clone();
            Box::pin(async move { Ok(tx.lock().await.send(Message::Binary(p.into())).await?) })
        },
        || {
            let rx = rx.clone();
            Box::pin(async move {
                loop {
                    if let Message::Binary(b) = rx.lock().await.next().await.context("closed")?? {
                        return Ok(b.to_vec());
                    }
                }
            })
        },
    )
    .await
}

async fn relay_latency(
    addr: SocketAddr,
    rate: f64,
    n: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let (a, b, b_id, room) = relay_pair(addr).await?;
    let (tx, _a_rx) = a.split();
    let tx = std::sync::Arc::new(tokio::sync::Mutex::new(tx));
    let b = std::sync::Arc::new(tokio::sync::Mutex::new(b));
    paced(
        rate,
        n,
        |p| {
            let tx = tx.clone();
            Box::pin(async move {
                Ok(tx
                    .lock()
                    .await
                    .send(Message::Binary(encode_send(&room, b_id, &p).into()))
                    .await?)
            })
        },
        || {
            let b = b.clone();
            Box::pin(async move {
                loop {
                    if let Frame::Relay(RelayFrame::Deliver { payload, .. }) =
                        next_frame(&mut *b.lock().await).await?
                    {
                        return Ok(payload);
                    }
                }
            })
        },
    )
    .await
}

/// Starts this binary's relay in its own process, opens `n` idle connections that each join
/// a room, and returns the relay's RSS growth per connection in bytes.
async fn idle_memory(n: usize) -> anyhow::Result<f64> {
    use tokio::io::AsyncBufReadExt;
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .args(["relay", "--listen", "127.0.0.1:0"])
        .args(["--max-connections-per-ip", &(n + 10).to_string()])
        .args(["--max-peers-per-room", "1000"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("relay exited")?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await??
        .context("relay printed nothing")?;
    let addr: SocketAddr = line
        .trim_start_matches("relay listening on ws://")
        .trim_end_matches("/relay")
        .parse()?;
    let rss = || -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .context("no VmRSS")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kib * 1024)
    };
    let before = rss()?;
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = ws(addr, true).await?;
        next_frame(&mut c).await?;
        let mut room = [0u8; 32];
        room[..8].copy_from_slice(&((i / 500) as u64).to_be_bytes());
        c.send(Message::Binary(
            Frame::Client(ClientFrame::Join { room }).encode().into(),
        ))
        .await?;
        next_frame(&mut c).await?;
        conns.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss()?;
    drop(conns);
    let _ = child.start_kill();
    let _ = child.wait().await;
    Ok(after.saturating_sub(before) as f64 / n as f64)
}
