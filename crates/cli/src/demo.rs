//! `pluresdb-sync demo`: two replicas on this machine find each other and sync, over each
//! transport, with nothing but this repository (a relay server and a DHT testnet run
//! in-process on loopback).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pluresdb_sync::{
    Connection, SyncBroadcaster, SyncEvent, TopicHash, Transport, codec, derive_topic,
};

/// Events replica A publishes for B to apply.
const EVENTS: usize = 1_000;
/// Round trips timed for latency.
const ROUND_TRIPS: usize = 200;
/// Bulk transfer: this many messages of [`BULK_MESSAGE`] bytes.
const BULK_MESSAGES: usize = 256;
const BULK_MESSAGE: usize = 64 * 1024;

/// What one transport achieved in the demo.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) mode: &'static str,
    pub(crate) connect: Duration,
    pub(crate) events_per_s: f64,
    pub(crate) rtt_p50: Duration,
    pub(crate) rtt_p99: Duration,
    pub(crate) mib_per_s: f64,
}

/// Runs the two-replica exchange over transports `a` and `b` that can reach each other.
pub(crate) async fn exchange(
    mode: &'static str,
    mut a: Box<dyn Transport>,
    mut b: Box<dyn Transport>,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let topic: TopicHash = derive_topic("pluresdb-sync-demo");
    let say = |msg: String| eprintln!("[{mode}] {msg}");
    say(format!(
        "replicas A and B join topic {}… of database \"pluresdb-sync-demo\"",
        &hex::encode(topic)[..16]
    ));

    let started = Instant::now();
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.context("A connect")?, rb.context("B connect")?);
    let (ca, cb) = tokio::join!(
        tokio::time::timeout(timeout, ra.recv()),
        tokio::time::timeout(timeout, rb.recv())
    );
    let mut ca = ca
        .context("A found no peer in time")?
        .context("A's transport ended")?;
    let mut cb = cb
        .context("B found no peer in time")?
        .context("B's transport ended")?;
    let connect = started.elapsed();
    say(format!(
        "connected in {} ms: A sees peer {}…, B sees peer {}…",
        connect.as_millis(),
        crate::peer::short(ca.peer_id()),
        crate::peer::short(cb.peer_id())
    ));

    // 1. Events: A publishes upserts, B decodes them into its own broadcaster.
    let hub = SyncBroadcaster::default();
    let mut applied = hub.subscribe();
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        for i in 0..EVENTS {
            let event = SyncEvent::NodeUpsert {
                id: format!("doc/{i}"),
            };
            ca.send(&codec::encode_event(&event)?).await?;
        }
        anyhow::Ok(ca)
    });
    for i in 0..EVENTS {
        let bytes = recv(&mut cb, timeout).await?;
        let event = codec::decode_event(&bytes).with_context(|| format!("event {i}"))?;
        hub.publish(event).ok();
        match applied.try_recv() {
            Ok(SyncEvent::NodeUpsert { id }) if id == format!("doc/{i}") => {}
            other => bail!("event {i} arrived as {other:?}"),
        }
    }
    let mut ca = sender.await??;
    let events_per_s = EVENTS as f64 / started.elapsed().as_secs_f64();
    say(format!(
        "B applied {EVENTS} events from A ({events_per_s:.0} events/s)"
    ));

    // 2. Latency: ping-pong.
    let mut rtts = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..ROUND_TRIPS {
        let t = Instant::now();
        ca.send(&(i as u32).to_be_bytes()).await?;
        let ping = recv(&mut cb, timeout).await?;
        cb.send(&ping).await?;
        let pong = recv(&mut ca, timeout).await?;
        if pong != (i as u32).to_be_bytes() {
            bail!("round trip {i} came back as {pong:?}");
        }
        rtts.push(t.elapsed());
    }
    rtts.sort();
    let (rtt_p50, rtt_p99) = (rtts[ROUND_TRIPS / 2], rtts[ROUND_TRIPS * 99 / 100]);
    say(format!(
        "{ROUND_TRIPS} round trips: p50 {} µs, p99 {} µs",
        rtt_p50.as_micros(),
        rtt_p99.as_micros()
    ));

    // 3. Bulk: B sends A a database snapshot in 64 KiB messages.
    let total = BULK_MESSAGES * BULK_MESSAGE;
    let started = Instant::now();
    let bulk = tokio::spawn(async move {
        let chunk = vec![0xA5u8; BULK_MESSAGE];
        for _ in 0..BULK_MESSAGES {
            cb.send(&chunk).await?;
        }
        anyhow::Ok(cb)
    });
    let mut received = 0;
    while received < total {
        received += recv(&mut ca, timeout).await?.len();
    }
    let mut cb = bulk.await??;
    let mib_per_s = total as f64 / (1024.0 * 1024.0) / started.elapsed().as_secs_f64();
    say(format!(
        "B sent A {} MiB at {mib_per_s:.0} MiB/s",
        total >> 20
    ));

    // 4. Leave: A closes; B sees the end of the connection.
    ca.close().await?;
    match tokio::time::timeout(timeout, cb.receive()).await {
        Ok(Ok(None)) => say("A left; B saw the connection close".into()),
        other => bail!("after A closed, B's receive gave {other:?}"),
    }
    a.disconnect().await?;
    b.disconnect().await?;
    Ok(Outcome {
        mode,
        connect,
        events_per_s,
        rtt_p50,
        rtt_p99,
        mib_per_s,
    })
}

async fn recv(conn: &mut Box<dyn Connection>, timeout: Duration) -> anyhow::Result<Vec<u8>> {
    tokio::time::timeout(timeout, conn.receive())
        .await
        .context("timed out waiting for a message")??
        .context("the connection closed early")
}

/// Prints the outcomes as a table on stdout.
pub(crate) fn print_table(outcomes: &[Outcome]) {
    println!(
        "{:<12} {:>12} {:>12} {:>10} {:>10} {:>10}",
        "transport", "connect ms", "events/s", "p50 µs", "p99 µs", "MiB/s"
    );
    for o in outcomes {
        println!(
            "{:<12} {:>12} {:>12.0} {:>10} {:>10} {:>10.0}",
            o.mode,
            o.connect.as_millis(),
            o.events_per_s,
            o.rtt_p50.as_micros(),
            o.rtt_p99.as_micros(),
            o.mib_per_s
        );
    }
}

/// Options of `pluresdb-sync demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Which transports to show.
    #[arg(long, value_enum, default_value = "all")]
    mode: DemoMode,
    /// Per-step timeout, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DemoMode {
    All,
    Relay,
    Hyperswarm,
}

/// Runs the demo: every selected transport in turn, then a summary table on stdout.
pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut outcomes = Vec::new();
    if matches!(args.mode, DemoMode::All | DemoMode::Relay) {
        outcomes.push(relay(timeout).await.context("relay demo")?);
    }
    if matches!(args.mode, DemoMode::All | DemoMode::Hyperswarm) {
        outcomes.push(hyperswarm(timeout).await.context("hyperswarm demo")?);
    }
    println!();
    print_table(&outcomes);
    Ok(())
}

async fn relay(timeout: Duration) -> anyhow::Result<Outcome> {
    use pluresdb_sync::RelayTransport;
    use pluresdb_sync::topic::{Domain, derive_from_topic};
    use pluresdb_sync_transport_relay::server::{RelayServer, RelayServerConfig};

    let server = RelayServer::bind(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        RelayServerConfig::default(),
    )
    .await
    .context("starting the relay server")?;
    let url = format!("ws://{}", server.local_addr());
    let room = derive_from_topic(&derive_topic("pluresdb-sync-demo"), Domain::RelayRoom);
    eprintln!(
        "[relay] relay server on {url}; replicas join room {}… (the relay never sees the topic \
         or a plaintext byte: Noise XXpsk0 end to end)",
        &hex::encode(room)[..16]
    );
    let make = || {
        RelayTransport::builder()
            .relay_url(url.clone())
            .timeout(timeout)
            .build()
            .map(|t| Box::new(t) as Box<dyn Transport>)
    };
    let outcome = exchange("relay", make()?, make()?, timeout).await?;
    let forwarded: Vec<String> = server
        .metrics_text()
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("forwarded"))
        .map(str::to_owned)
        .collect();
    eprintln!("[relay] relay metrics: {}", forwarded.join(", "));
    server.shutdown().await;
    Ok(outcome)
}

async fn hyperswarm(timeout: Duration) -> anyhow::Result<Outcome> {
    let dht = pluresdb_sync_transport_hyperswarm::testkit::LoopbackDht::start().await?;
    eprintln!(
        "[hyperswarm] local mainline DHT testnet of {} nodes on {}; replicas announce a \
         domain-separated info-hash, dial over QUIC and authenticate with Noise XX",
        pluresdb_sync_transport_hyperswarm::testkit::TESTNET_NODES,
        dht.first_node()
    );
    let make = || {
        dht.builder()
            .timeout(timeout)
            .build()
            .map(|t| Box::new(t) as Box<dyn Transport>)
    };
    let outcome = exchange("hyperswarm", make()?, make()?, timeout).await?;
    dht.stop().await?;
    Ok(outcome)
}
