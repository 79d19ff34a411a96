//! `pluresdb-sync bench hyperswarm`.
//!
//! - Throughput: 64 KiB messages over one connection, rounds interleaved across: plain TCP
//!   (nodelay), rustls TLS 1.3 over TCP, raw quinn with one stream (the ceiling for a
//!   QUIC-based path; 4 MiB socket buffers like ours), and two `HyperswarmTransport`s on a
//!   loopback DHT testnet. Every stream carries the same `u32` length-prefixed framing.
//! - Time to first message (`join.rs`): fresh pairs join a fresh topic, both at once and one
//!   after the other; until B receives A's first message. Median and p90. With
//!   `--dht libtorrent` on a private DHT of libtorrent nodes (needs `python3-libtorrent`)
//!   with every transport setting at its default, as on the public network; only this runs.
//! - Idle CPU: process CPU time over a quiet interval with a joined pair, minus the same
//!   interval with only the testnet running.
//! - Memory per connection: RSS growth when N transports form a full mesh, divided by the
//!   N(N-1)/2 links (each link counts both of its ends).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use pluresdb_sync::{Connection, HyperswarmTransport, Transport};
use pluresdb_sync_core::testkit::fresh_topic;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{cpu_time, join, median, mib_per_s, rss_bytes};

const MESSAGE: usize = 64 * 1024;

/// Options of `pluresdb-sync bench hyperswarm`.
#[derive(Debug, Args)]
pub(crate) struct HyperswarmBenchArgs {
    /// MiB sent per throughput round.
    #[arg(long, default_value_t = 512)]
    mib: usize,
    /// Throughput rounds per stream (interleaved; the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Fresh pairs timed from joining a topic to the first message.
    #[arg(long, default_value_t = 5)]
    joins: usize,
    /// Seconds of idleness for the CPU measurement.
    #[arg(long, default_value_t = 10.0)]
    idle_secs: f64,
    /// Transports in the full mesh of the memory measurement.
    #[arg(long, default_value_t = 16)]
    mesh: usize,
    /// The DHT the pairs join on: the loopback `mainline` testnet (every measurement), or a
    /// private DHT of libtorrent nodes (only the join times; needs `python3-libtorrent`).
    #[arg(long, value_enum, default_value_t = Dht::Mainline)]
    dht: Dht,
    /// Nodes of the libtorrent DHT.
    #[arg(long, default_value_t = 8)]
    libtorrent_nodes: usize,
    /// Only the join times.
    #[arg(long)]
    joins_only: bool,
}

/// The DHT of a benchmark run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Dht {
    /// `testkit::LoopbackDht`: mainline nodes on 127.0.0.1, transports tuned for it.
    Mainline,
    /// `testkit::LibtorrentDht`: libtorrent 2.0 nodes on 127.0.0.1, transports at defaults.
    Libtorrent,
}

fn print_joins(joins: &join::JoinTimes) {
    println!(
        "{:<44} {:>8} {:>8}",
        "time to first message (ms)", "median", "p90"
    );
    for (name, median, p90) in joins.rows() {
        println!("  {name:<42} {median:>8.0} {p90:>8.0}");
    }
}

/// Only the join times, on a private libtorrent DHT, transports at their defaults.
async fn run_libtorrent(args: &HyperswarmBenchArgs) -> anyhow::Result<()> {
    use pluresdb_sync_transport_hyperswarm::testkit::LibtorrentDht;
    let dht = LibtorrentDht::start(args.libtorrent_nodes, Ipv4Addr::LOCALHOST).await?;
    let make =
        || -> anyhow::Result<HyperswarmTransport> { Ok(dht.builder(Ipv4Addr::LOCALHOST).build()?) };
    eprintln!(
        "time to first message on {} libtorrent nodes ({} fresh pairs each way)",
        args.libtorrent_nodes, args.joins
    );
    let joins = join::measure(&make, args.joins).await?;
    dht.stop().await?;
    print_joins(&joins);
    Ok(())
}

pub(super) async fn run(args: HyperswarmBenchArgs) -> anyhow::Result<()> {
    if args.dht == Dht::Libtorrent {
        return run_libtorrent(&args).await;
    }
    let bytes = args.mib.max(1) * 1024 * 1024;
    let dht = pluresdb_sync_transport_hyperswarm::testkit::LoopbackDht::start().await?;
    let make = || -> anyhow::Result<HyperswarmTransport> { Ok(dht.builder().build()?) };
    if args.joins_only {
        eprintln!(
            "time to first message ({} fresh pairs each way)",
            args.joins
        );
        let joins = join::measure(&make, args.joins).await?;
        dht.stop().await?;
        print_joins(&joins);
        return Ok(());
    }

    // Idle CPU baseline: the testnet alone.
    let idle = Duration::from_secs_f64(args.idle_secs);
    eprintln!("idle CPU: testnet alone for {idle:?}");
    let testnet_only = cpu_over(idle).await?;

    let (mut a, mut b) = (make()?, make()?);
    let (mut ca, mut cb) = pair(&mut a, &mut b).await?;

    let names = [
        "plain TCP",
        "rustls TLS 1.3 / TCP",
        "raw quinn, 1 stream",
        "hyperswarm",
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for round in 0..args.rounds.max(1) {
        results[0].push(tcp(bytes).await?);
        results[1].push(tls(bytes).await?);
        results[2].push(quinn_raw(bytes).await?);
        let (x, y, rate) = ours(ca, cb, bytes).await?;
        (ca, cb) = (x, y);
        results[3].push(rate);
        eprintln!(
            "  round {round}: tcp {:.0}, tls {:.0}, quinn {:.0}, hyperswarm {:.0} MiB/s",
            results[0][round], results[1][round], results[2][round], results[3][round]
        );
    }
    let medians: Vec<f64> = results.iter_mut().map(|r| median(r)).collect();

    eprintln!("idle CPU: joined pair for {idle:?}");
    let joined = cpu_over(idle).await?;
    let idle_pct = 100.0 * joined.saturating_sub(testnet_only).as_secs_f64() / idle.as_secs_f64();
    drop((ca, cb));
    a.disconnect().await?;
    b.disconnect().await?;

    eprintln!(
        "time to first message ({} fresh pairs each way)",
        args.joins
    );
    let joins = join::measure(&make, args.joins).await?;

    eprintln!("memory per connection (full mesh of {})", args.mesh);
    let (per_conn, links) = memory_per_connection(&make, args.mesh).await?;
    dht.stop().await?;

    println!(
        "{:<36} {:>10} {:>18}",
        "64 KiB messages, one connection", "MiB/s", "hyperswarm ÷ this"
    );
    for (name, m) in names.iter().zip(&medians) {
        println!("{name:<36} {m:>10.0} {:>18.2}", medians[3] / m);
    }
    print_joins(&joins);
    println!("idle CPU of a joined pair (% of a core) {idle_pct:>8.2}");
    println!("RSS per connection (bytes, both ends) {per_conn:>10.0}   ({links} links)");
    Ok(())
}

/// Connects `a` and `b` on a fresh topic; their connections to each other.
async fn pair(
    a: &mut HyperswarmTransport,
    b: &mut HyperswarmTransport,
) -> anyhow::Result<(Box<dyn Connection>, Box<dyn Connection>)> {
    let topic = fresh_topic("bench");
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra?, rb?);
    let wait = Duration::from_secs(30);
    let (ca, cb) = tokio::join!(
        tokio::time::timeout(wait, ra.recv()),
        tokio::time::timeout(wait, rb.recv())
    );
    Ok((
        ca.context("A found no peer")?.context("A ended")?,
        cb.context("B found no peer")?.context("B ended")?,
    ))
}

async fn cpu_over(period: Duration) -> anyhow::Result<Duration> {
    let before = cpu_time().context("cannot read /proc/self/stat")?;
    tokio::time::sleep(period).await;
    let after = cpu_time().context("cannot read /proc/self/stat")?;
    Ok(after.saturating_sub(before))
}

pub(super) async fn ours(
    mut tx: Box<dyn Connection>,
    mut rx: Box<dyn Connection>,
    bytes: usize,
) -> anyhow::Result<(Box<dyn Connection>, Box<dyn Connection>, f64)> {
    let count = bytes / MESSAGE;
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        let msg = vec![0x5Au8; MESSAGE];
        for _ in 0..count {
            tx.send(&msg).await?;
        }
        anyhow::Ok(tx)
    });
    for i in 0..count {
        let got = tokio::time::timeout(Duration::from_secs(30), rx.receive())
            .await
            .with_context(|| format!("message {i} timed out"))??
            .context("closed early")?;
        if got.len() != MESSAGE {
            bail!("message {i} has {} bytes", got.len());
        }
    }
    let rate = mib_per_s(count * MESSAGE, started.elapsed());
    Ok((sender.await??, rx, rate))
}

/// Streams `bytes` as length-prefixed 64 KiB messages from `w` to `r`; MiB/s.
async fn framed<W, R>(mut w: W, mut r: R, bytes: usize) -> anyhow::Result<f64>
where
    W: AsyncWrite + Unpin + Send + 'static,
    R: AsyncRead + Unpin,
{
    let count = bytes / MESSAGE;
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        let mut msg = (MESSAGE as u32).to_be_bytes().to_vec();
        msg.resize(4 + MESSAGE, 0x5A);
        for _ in 0..count {
            w.write_all(&msg).await?;
        }
        w.flush().await?;
        anyhow::Ok(w)
    });
    let mut buf = vec![0u8; MESSAGE];
    for _ in 0..count {
        let mut len = [0u8; 4];
        r.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len != MESSAGE {
            bail!("bad frame length {len}");
        }
        r.read_exact(&mut buf).await?;
    }
    let rate = mib_per_s(count * MESSAGE, started.elapsed());
    let mut w = sender.await??;
    let _ = w.shutdown().await;
    Ok(rate)
}

async fn tcp_pair() -> anyhow::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let (client, server) = tokio::join!(
        TcpStream::connect(listener.local_addr()?),
        listener.accept()
    );
    let (client, (server, _)) = (client?, server?);
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    Ok((client, server))
}

async fn tcp(bytes: usize) -> anyhow::Result<f64> {
    let (client, server) = tcp_pair().await?;
    framed(client, server, bytes).await
}

struct SelfSigned {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

fn self_signed() -> anyhow::Result<SelfSigned> {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    Ok(SelfSigned {
        cert: c.cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(c.signing_key.serialize_der()),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_configs(alpn: &[u8]) -> anyhow::Result<(rustls::ServerConfig, rustls::ClientConfig)> {
    let id = self_signed()?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![id.cert.clone()], id.key.into())?;
    server.alpn_protocols = vec![alpn.to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(id.cert)?;
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![alpn.to_vec()];
    Ok((server, client))
}

async fn tls(bytes: usize) -> anyhow::Result<f64> {
    let (server_cfg, client_cfg) = tls_configs(b"bench")?;
    let (client, server) = tcp_pair().await?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let name = ServerName::try_from("localhost")?;
    let (c, s) = tokio::join!(connector.connect(name, client), acceptor.accept(server));
    framed(c?, s?, bytes).await
}

fn quinn_socket() -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let buffer = pluresdb_sync_transport_hyperswarm::SOCKET_BUFFER_BYTES;
    socket.set_recv_buffer_size(buffer)?;
    socket.set_send_buffer_size(buffer)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
    Ok(socket.into())
}

async fn quinn_raw(bytes: usize) -> anyhow::Result<f64> {
    use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
    let (server_tls, client_tls) = tls_configs(b"bench")?;
    let server_cfg =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls)?));
    let runtime = Arc::new(quinn::TokioRuntime);
    let server = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_cfg),
        quinn_socket()?,
        runtime.clone(),
    )?;
    let mut client = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        quinn_socket()?,
        runtime,
    )?;
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client_tls)?,
    )));
    let server_addr = server.local_addr()?;
    let accept = async {
        let conn = server.accept().await.context("no incoming")?.await?;
        anyhow::Ok(conn)
    };
    let dial = async { anyhow::Ok(client.connect(server_addr, "localhost")?.await?) };
    // The server must accept while the client dials: quinn handshakes wait for accept().
    let (dialed, accepted) = tokio::join!(dial, accept);
    let (dialed, accepted) = (dialed?, accepted?);
    let send = dialed.open_bi().await?.0;
    let count = bytes / MESSAGE;
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        let mut send = send;
        let mut msg = (MESSAGE as u32).to_be_bytes().to_vec();
        msg.resize(4 + MESSAGE, 0x5A);
        for _ in 0..count {
            send.write_all(&msg).await?;
        }
        send.finish()?;
        anyhow::Ok(send)
    });
    // The stream reaches the server with its first data.
    let (_s, mut recv) = accepted.accept_bi().await?;
    let mut buf = vec![0u8; 4 + MESSAGE];
    for _ in 0..count {
        recv.read_exact(&mut buf).await?;
        if buf[..4] != (MESSAGE as u32).to_be_bytes() {
            bail!("bad frame header {:?}", &buf[..4]);
        }
    }
    let rate = mib_per_s(count * MESSAGE, started.elapsed());
    sender.await??;
    dialed.close(0u32.into(), b"done");
    accepted.close(0u32.into(), b"done");
    client.wait_idle().await;
    Ok(rate)
}

async fn memory_per_connection(
    make: &impl Fn() -> anyhow::Result<HyperswarmTransport>,
    nodes: usize,
) -> anyhow::Result<(f64, usize)> {
    let nodes = nodes.max(2);
    let mut ts: Vec<HyperswarmTransport> = (0..nodes).map(|_| make()).collect::<Result<_, _>>()?;
    // Start every transport's sockets and DHT node first, on an unrelated topic.
    let warm = fresh_topic("bench-warm");
    for t in &mut ts {
        t.announce(warm).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_bytes(std::process::id()).context("cannot read RSS")?;

    // A full mesh: every node connects to every other.
    let topic = fresh_topic("bench-mem");
    let mut receivers = Vec::new();
    for t in &mut ts {
        receivers.push(t.connect(topic).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut conns = Vec::new();
    for (i, rx) in receivers.iter_mut().enumerate() {
        for n in 0..nodes - 1 {
            let left = deadline.saturating_duration_since(Instant::now());
            let conn = tokio::time::timeout(left, rx.recv())
                .await
                .with_context(|| format!("node {i} has {n} of {} connections", nodes - 1))?
                .context("transport ended")?;
            conns.push(conn);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes(std::process::id()).context("cannot read RSS")?;
    let links = conns.len() / 2;
    drop(conns);
    for t in &mut ts {
        t.disconnect().await?;
    }
    Ok((
        after.saturating_sub(before) as f64 / links.max(1) as f64,
        links,
    ))
}
