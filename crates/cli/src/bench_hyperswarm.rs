//! `pluresdb-sync bench hyperswarm`: Hyperswarm mode against baselines, on loopback, in one
//! run. Throughput of one connection (64 KiB messages) against raw quinn with one stream (the
//! ceiling of a QUIC path), rustls TLS 1.3 over TCP and plain TCP; time from both peers
//! joining a topic to the first message; idle CPU of a joined pair; memory per connection.
//! Everything runs in this process on 127.0.0.1 with a local mainline DHT testnet.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use pluresdb_sync::{Connection, HyperswarmTransport, Transport, derive_topic};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

/// Message size of the throughput runs.
const MESSAGE: usize = 64 * 1024;

/// Options of `bench hyperswarm`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// MiB sent per throughput run.
    #[arg(long, default_value_t = 512)]
    size_mib: usize,
    /// Interleaved rounds (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Connections opened for the memory measurement.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Seconds of the idle CPU measurement.
    #[arg(long, default_value_t = 5)]
    idle_secs: u64,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.size_mib > 0 && args.rounds > 0,
        "size and rounds must be > 0"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

fn testnet() -> anyhow::Result<mainline::Testnet> {
    Ok(mainline::Testnet::builder(5)
        .bind_address(Ipv4Addr::LOCALHOST)
        .build()?)
}

fn transport(bootstrap: &[String]) -> anyhow::Result<HyperswarmTransport> {
    Ok(HyperswarmTransport::builder()
        .bootstrap(bootstrap.iter().cloned())
        .bind_addr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .dht_server_mode(true)
        .dht_request_timeout(Duration::from_millis(250))
        .build()?)
}

async fn pair(
    bootstrap: &[String],
    label: &str,
) -> anyhow::Result<(
    HyperswarmTransport,
    HyperswarmTransport,
    Box<dyn Connection>,
    Box<dyn Connection>,
    Duration,
)> {
    let topic = derive_topic(&format!("bench-{label}-{:?}", Instant::now()));
    let mut a = transport(bootstrap)?;
    let mut b = transport(bootstrap)?;
    let started = Instant::now();
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra?, rb?);
    let wait = Duration::from_secs(30);
    let mut ca = tokio::time::timeout(wait, ra.recv())
        .await?
        .context("no connection")?;
    let mut cb = tokio::time::timeout(wait, rb.recv())
        .await?
        .context("no connection")?;
    ca.send(b"first").await?;
    cb.receive().await?.context("closed")?;
    let first = started.elapsed();
    Ok((a, b, ca, cb, first))
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let net = testnet()?;
    let bootstrap = net.bootstrap.clone();
    let total = args.size_mib * 1024 * 1024;
    let mut ours = Vec::new();
    let mut quinn_raw = Vec::new();
    let mut tls = Vec::new();
    let mut tcp = Vec::new();
    let mut first = Vec::new();
    for round in 0..args.rounds {
        let (mut a, mut b, ca, cb, t) = pair(&bootstrap, "tp").await?;
        first.push(t.as_secs_f64());
        ours.push(mib_per_s(
            total,
            hyperswarm_throughput(ca, cb, total).await?,
        ));
        a.disconnect().await?;
        b.disconnect().await?;
        quinn_raw.push(mib_per_s(total, raw_quinn(total).await?));
        tls.push(mib_per_s(
            total,
            tokio::task::spawn_blocking(move || tls_tcp(total)).await??,
        ));
        tcp.push(mib_per_s(
            total,
            tokio::task::spawn_blocking(move || plain_tcp(total)).await??,
        ));
        eprintln!(
            "round {}: hyperswarm {:.0}, raw quinn {:.0}, rustls/TCP {:.0}, TCP {:.0} MiB/s",
            round + 1,
            ours[round],
            quinn_raw[round],
            tls[round],
            tcp[round]
        );
    }
    let (o, q, s, p) = (
        median(&ours),
        median(&quinn_raw),
        median(&tls),
        median(&tcp),
    );
    println!(
        "throughput, one connection, {MESSAGE}-byte messages, {} MiB x {} rounds (medians):",
        args.size_mib, args.rounds
    );
    println!("  hyperswarm      {o:>8.0} MiB/s");
    println!(
        "  raw quinn       {q:>8.0} MiB/s   hyperswarm / raw quinn = {:.2}",
        o / q
    );
    println!(
        "  rustls TLS/TCP  {s:>8.0} MiB/s   hyperswarm / TLS-TCP   = {:.2}",
        o / s
    );
    println!(
        "  plain TCP       {p:>8.0} MiB/s   hyperswarm / TCP       = {:.2}",
        o / p
    );
    println!(
        "join to first message: median {:.3} s (max {:.3} s)",
        median(&first),
        first.iter().cloned().fold(0.0, f64::max)
    );

    // Idle CPU of a joined, connected pair (this process also runs the DHT testnet).
    let (mut a, mut b, _ca, _cb, _) = pair(&bootstrap, "idle").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu0, wall0) = (cpu_seconds()?, Instant::now());
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let share = (cpu_seconds()? - cpu0) / wall0.elapsed().as_secs_f64();
    println!(
        "idle CPU, joined pair + 5-node testnet: {:.2}% of a core",
        share * 100.0
    );
    a.disconnect().await?;
    b.disconnect().await?;

    // Memory per connection: start every node first, then join them all to one topic,
    // which makes a full mesh of n nodes: n(n-1)/2 connections, n(n-1) connection ends.
    let topic = derive_topic(&format!("bench-mem-{:?}", Instant::now()));
    let n = args.connections + 1;
    let mut nodes = Vec::new();
    for _ in 0..n {
        let t = transport(&bootstrap)?;
        t.lookup(topic).await?;
        nodes.push(t);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_bytes()?;
    let mut receivers = Vec::new();
    for t in &mut nodes {
        receivers.push(t.connect(topic).await?);
    }
    let mut held = Vec::new();
    for rx in &mut receivers {
        for _ in 0..n - 1 {
            let c = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await?
                .context("a receiver ended")?;
            held.push(c);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes()?;
    let ends = n * (n - 1);
    let per = (after.saturating_sub(before)) as f64 / ends as f64;
    println!(
        "memory: {:.0} KiB per connection end ({n} nodes in a full mesh, {ends} ends in this process)",
        per / 1024.0
    );
    drop(held);
    for t in &mut nodes {
        t.disconnect().await?;
    }
    Ok(())
}

fn mib_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / took.as_secs_f64()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

async fn hyperswarm_throughput(
    mut tx: Box<dyn Connection>,
    mut rx: Box<dyn Connection>,
    total: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        let msg = vec![7u8; MESSAGE];
        for _ in 0..total / MESSAGE {
            tx.send(&msg).await?;
        }
        anyhow::Ok(tx)
    });
    let mut got = 0;
    while got < total / MESSAGE * MESSAGE {
        got += rx.receive().await?.context("closed early")?.len();
    }
    let took = started.elapsed();
    sender.await??;
    Ok(took)
}

fn self_signed() -> anyhow::Result<(CertificateDer<'static>, PrivatePkcs8KeyDer<'static>)> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    Ok((
        cert.cert.der().clone(),
        PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()),
    ))
}

fn server_tls(alpn: Option<&[u8]>) -> anyhow::Result<rustls::ServerConfig> {
    let (cert, key) = self_signed()?;
    let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_single_cert(vec![cert], key.into())?;
    if let Some(a) = alpn {
        c.alpn_protocols = vec![a.to_vec()];
    }
    Ok(c)
}

fn client_tls(alpn: Option<&[u8]>) -> anyhow::Result<rustls::ClientConfig> {
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(TrustAll))
    .with_no_client_auth();
    if let Some(a) = alpn {
        c.alpn_protocols = vec![a.to_vec()];
    }
    Ok(c)
}

async fn raw_quinn(total: usize) -> anyhow::Result<Duration> {
    let server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls(Some(b"bench"))?)?,
    ));
    let se = quinn::Endpoint::server(server, "127.0.0.1:0".parse()?)?;
    let mut ce = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    ce.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls(Some(b"bench"))?)?,
    )));
    let addr = se.local_addr()?;
    let receiver = tokio::spawn(async move {
        let conn = se.accept().await.context("no connection")?.await?;
        let (_s, mut r) = conn.accept_bi().await?;
        let mut buf = vec![0u8; MESSAGE];
        let started = Instant::now();
        for _ in 0..total / MESSAGE {
            r.read_exact(&mut buf).await?;
        }
        anyhow::Ok(started.elapsed())
    });
    let conn = ce.connect(addr, "localhost")?.await?;
    let (mut s, _r) = conn.open_bi().await?;
    let msg = vec![7u8; MESSAGE];
    for _ in 0..total / MESSAGE {
        s.write_all(&msg).await?;
    }
    receiver.await?
}

fn tls_tcp(total: usize) -> anyhow::Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let config = Arc::new(server_tls(None)?);
    let receiver = std::thread::spawn(move || -> anyhow::Result<Duration> {
        let (sock, _) = listener.accept()?;
        sock.set_nodelay(true)?;
        let conn = rustls::ServerConnection::new(config)?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        let mut buf = vec![0u8; MESSAGE];
        let started = Instant::now();
        for _ in 0..total / MESSAGE {
            tls.read_exact(&mut buf)?;
        }
        Ok(started.elapsed())
    });
    let sock = TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    let conn = rustls::ClientConnection::new(
        Arc::new(client_tls(None)?),
        ServerName::try_from("localhost")?,
    )?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let msg = vec![7u8; MESSAGE];
    for _ in 0..total / MESSAGE {
        tls.write_all(&msg)?;
    }
    tls.flush()?;
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?
}

fn plain_tcp(total: usize) -> anyhow::Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || -> anyhow::Result<Duration> {
        let (mut sock, _) = listener.accept()?;
        let mut buf = vec![0u8; MESSAGE];
        let started = Instant::now();
        for _ in 0..total / MESSAGE {
            sock.read_exact(&mut buf)?;
        }
        Ok(started.elapsed())
    });
    let mut sock = TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    let msg = vec![7u8; MESSAGE];
    for _ in 0..total / MESSAGE {
        sock.write_all(&msg)?;
    }
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?
}

/// CPU seconds (user + system) of this process, from /proc (Linux; 10 ms ticks).
fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let rest = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 2..))
        .context("unexpected /proc/self/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

/// Resident memory of this process, from /proc (Linux; 4 KiB pages).
fn rss_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("unexpected /proc/self/statm")?
        .parse()?;
    Ok(pages * 4096)
}

/// Accepts any certificate: the baselines measure transport cost, not PKI.
#[derive(Debug)]
struct TrustAll;

impl rustls::client::danger::ServerCertVerifier for TrustAll {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
