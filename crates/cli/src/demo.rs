//! `pluresdb-sync demo`: three replicas on this machine find each other and stay in sync
//! through `SyncBridge`, over each transport, with nothing but this repository (a relay
//! server and a DHT testnet run in-process on loopback).
//!
//! Per transport: the replicas join one topic and link up (a full mesh); each publishes a
//! burst of events that every other applies exactly once; one streams a snapshot to the
//! others as application messages; one leaves and the others notice. Then a table.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use pluresdb_sync::{
    BridgeEvent, Messages, SyncBridge, SyncBroadcaster, SyncEvent, TopicHash, Transport,
    derive_topic,
};
use tokio::sync::broadcast;

/// The database every replica of the demo holds.
const DB: &str = "pluresdb-sync-demo";
/// Replicas per transport.
const REPLICAS: usize = 3;
/// Events each replica publishes in one burst.
const EVENTS: usize = 5_000;
/// The snapshot replica A streams to the others: this many messages of [`CHUNK`] bytes.
const CHUNKS: usize = 256;
const CHUNK: usize = 64 * 1024;
/// Each hub keeps this many events for a subscriber that falls behind: room for a whole
/// burst from every replica, so that nothing in the demo depends on how fast it reads.
const HUB_CAPACITY: usize = 4 * EVENTS;
const NAMES: [&str; REPLICAS] = ["A", "B", "C"];

/// What one transport achieved in the demo.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) mode: &'static str,
    pub(crate) peers: usize,
    pub(crate) connect: Duration,
    pub(crate) events_per_s: f64,
    pub(crate) mib_per_s: f64,
}

/// One replica: its database's event hub, what its application sees, and its bridge.
struct Replica {
    name: &'static str,
    id: String,
    hub: SyncBroadcaster,
    seen: broadcast::Receiver<SyncEvent>,
    bridge: SyncBridge,
    messages: Messages,
    reports: broadcast::Receiver<BridgeEvent>,
}

/// The next event a replica's application sees, within `timeout`.
async fn next_event(r: &mut Replica, timeout: Duration) -> anyhow::Result<SyncEvent> {
    match tokio::time::timeout(timeout, r.seen.recv()).await {
        Ok(Ok(event)) => Ok(event),
        Ok(Err(e)) => bail!("replica {}'s event subscription failed: {e}", r.name),
        Err(_) => bail!(
            "replica {} saw no event within {} ms",
            r.name,
            timeout.as_millis()
        ),
    }
}

/// The reports a replica's bridge made, for the cause of a failure.
fn reports_of(r: &mut Replica) -> String {
    let mut lines = Vec::new();
    while let Ok(report) = r.reports.try_recv() {
        lines.push(report.to_string());
    }
    if lines.is_empty() {
        "no bridge reports".into()
    } else {
        format!("bridge reports: {}", lines.join("; "))
    }
}

/// Runs the whole demo over `transports` (each with its own peer id) that can reach each other.
async fn showcase(
    mode: &'static str,
    transports: Vec<(String, Box<dyn Transport>)>,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let say = |msg: String| eprintln!("[{mode}] {msg}");
    let topic: TopicHash = derive_topic(DB);
    let names: HashMap<String, &str> = transports
        .iter()
        .zip(NAMES)
        .map(|((id, _), name)| (id.clone(), name))
        .collect();
    let name_of = |id: &str| names.get(id).copied().unwrap_or("?");

    // 1. Join and link up.
    let started = Instant::now();
    let mut rs = Vec::new();
    for ((id, transport), name) in transports.into_iter().zip(NAMES) {
        let hub = SyncBroadcaster::new(HUB_CAPACITY);
        let seen = hub.subscribe();
        let bridge = SyncBridge::start(transport, topic, hub.clone())
            .await
            .with_context(|| format!("starting replica {name}'s bridge"))?;
        let messages = bridge
            .messages()
            .context("the message receiver is taken once")?;
        let reports = bridge.reports();
        say(format!(
            "replica {name} ({}…) joins database \"{DB}\" (topic {}…)",
            &id[..8],
            &hex::encode(topic)[..16]
        ));
        rs.push(Replica {
            name,
            id,
            hub,
            seen,
            bridge,
            messages,
            reports,
        });
    }
    for r in &mut rs {
        let mut peers = BTreeSet::new();
        while peers.len() < REPLICAS - 1 {
            match next_event(r, timeout).await {
                Ok(SyncEvent::PeerConnected { peer_id }) => {
                    peers.insert(name_of(&peer_id));
                }
                Ok(other) => bail!("replica {} saw {other:?} before its peers", r.name),
                Err(e) => {
                    let why = reports_of(r);
                    return Err(
                        e.context(format!("replica {} did not find its peers ({why})", r.name))
                    );
                }
            }
        }
        let peers: Vec<&str> = peers.into_iter().collect();
        say(format!("{}: PeerConnected {}", r.name, peers.join(", ")));
    }
    let connect = started.elapsed();
    say(format!(
        "full mesh of {REPLICAS} replicas in {} ms",
        connect.as_millis()
    ));

    // 2. Events: every replica publishes a burst; every other applies each once, in order.
    let started = Instant::now();
    for seq in 0..EVENTS {
        for r in &rs {
            let id = format!("{}/doc-{seq}", r.name);
            let event = if seq % 10 == 9 {
                SyncEvent::NodeDelete { id }
            } else {
                SyncEvent::NodeUpsert { id }
            };
            r.hub.publish(event).context("publishing an event")?;
        }
    }
    for r in &mut rs {
        let mut next: HashMap<String, usize> = HashMap::new();
        let mut shown = false;
        while next.values().sum::<usize>() < REPLICAS * EVENTS {
            let event = next_event(r, timeout)
                .await
                .with_context(|| format!("replica {} stopped receiving events", r.name))?;
            let (SyncEvent::NodeUpsert { id } | SyncEvent::NodeDelete { id }) = &event else {
                bail!("replica {} saw {event:?} during the burst", r.name);
            };
            let (from, seq) = id.split_once("/doc-").context("a demo event id")?;
            let expected = next.entry(from.to_owned()).or_default();
            ensure!(
                seq == expected.to_string(),
                "replica {} got {id} when {from}/doc-{expected} was next (duplicate or lost)",
                r.name
            );
            *expected += 1;
            if from != r.name && !shown {
                say(format!("{} ← {from}: {event:?}", r.name));
                shown = true;
            }
        }
    }
    let deliveries = REPLICAS * (REPLICAS - 1) * EVENTS;
    let events_per_s = deliveries as f64 / started.elapsed().as_secs_f64();
    say(format!(
        "each replica published {EVENTS} events; each applied the other {} exactly once, in \
         order ({deliveries} deliveries, {events_per_s:.0} events/s)",
        (REPLICAS - 1) * EVENTS
    ));

    // 3. A message stream: A sends the others a snapshot, paced by each peer's queue.
    let total = CHUNKS * CHUNK;
    let started = Instant::now();
    let receivers: Vec<String> = rs[1..].iter().map(|r| r.id.clone()).collect();
    let a = &rs[0];
    let a_id = a.id.clone();
    for i in 0..CHUNKS {
        let mut chunk = vec![(i % 251) as u8; CHUNK];
        chunk[..4].copy_from_slice(&(i as u32).to_be_bytes());
        for peer in &receivers {
            a.bridge
                .send_to(peer, &chunk)
                .await
                .with_context(|| format!("streaming chunk {i} to {}", name_of(peer)))?;
        }
    }
    for r in &mut rs[1..] {
        let mut got = 0;
        while got < CHUNKS {
            let (from, bytes) = tokio::time::timeout(timeout, r.messages.recv())
                .await
                .with_context(|| format!("replica {} stopped receiving the snapshot", r.name))?
                .context("the bridge stopped")?;
            ensure!(
                from == a_id && bytes.len() == CHUNK,
                "replica {} got a {}-byte message from {}",
                r.name,
                bytes.len(),
                name_of(&from)
            );
            let seq = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            ensure!(
                seq == got,
                "replica {} got chunk {seq} when {got} was next",
                r.name
            );
            got += 1;
        }
    }
    let mib_per_s =
        (total * (REPLICAS - 1)) as f64 / (1024.0 * 1024.0) / started.elapsed().as_secs_f64();
    say(format!(
        "A streamed a {} MiB snapshot to B and C in {CHUNKS} messages of {} KiB ({mib_per_s:.0} \
         MiB/s received in all)",
        total >> 20,
        CHUNK >> 10
    ));

    // 4. C leaves; A and B notice.
    let leaving = rs.pop().context("three replicas")?;
    let left_id = leaving.id.clone();
    let started = Instant::now();
    leaving.bridge.stop().await.context("stopping replica C")?;
    for r in &mut rs {
        loop {
            match next_event(r, timeout).await? {
                SyncEvent::PeerDisconnected { peer_id } if peer_id == left_id => break,
                SyncEvent::PeerDisconnected { peer_id } => {
                    bail!("replica {} lost {} instead", r.name, name_of(&peer_id))
                }
                _ => {}
            }
        }
        ensure!(
            r.bridge.peers().len() == REPLICAS - 2,
            "replica {} should still have its other peer",
            r.name
        );
    }
    say(format!(
        "C left; A and B saw PeerDisconnected C within {} ms and stay linked",
        started.elapsed().as_millis()
    ));
    for r in rs {
        r.bridge
            .stop()
            .await
            .with_context(|| format!("stopping replica {}", r.name))?;
    }
    Ok(Outcome {
        mode,
        peers: REPLICAS,
        connect,
        events_per_s,
        mib_per_s,
    })
}

/// Prints the outcomes as a table on stdout.
pub(crate) fn print_table(outcomes: &[Outcome]) {
    println!(
        "{:<12} {:>6} {:>12} {:>12} {:>10}",
        "mode", "peers", "connect ms", "events/s", "MiB/s"
    );
    for o in outcomes {
        println!(
            "{:<12} {:>6} {:>12} {:>12.0} {:>10.0}",
            o.mode,
            o.peers,
            o.connect.as_millis(),
            o.events_per_s,
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
    Auto,
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
    if matches!(args.mode, DemoMode::All | DemoMode::Auto) {
        outcomes.push(auto(timeout).await.context("auto demo")?);
    }
    println!();
    print_table(&outcomes);
    Ok(())
}

async fn relay(timeout: Duration) -> anyhow::Result<Outcome> {
    use pluresdb_sync::RelayTransport;
    use pluresdb_sync::topic::{Domain, derive_from_topic};

    let (server, url) = pluresdb_sync_transport_relay::testkit::relay()
        .await
        .context("starting the relay server")?;
    let room = derive_from_topic(&derive_topic(DB), Domain::RelayRoom);
    eprintln!(
        "[relay] relay server on {url}; replicas join room {}… (the relay never sees the topic \
         or a plaintext byte: Noise XXpsk0 end to end)",
        &hex::encode(room)[..16]
    );
    let mut transports = Vec::new();
    for _ in 0..REPLICAS {
        let t = RelayTransport::builder()
            .relay_url(url.clone())
            .timeout(timeout)
            .build()?;
        transports.push((t.peer_id(), Box::new(t) as Box<dyn Transport>));
    }
    let outcome = showcase("relay", transports, timeout).await;
    let forwarded: Vec<String> = server
        .metrics_text()
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("forwarded"))
        .map(str::to_owned)
        .collect();
    eprintln!("[relay] relay metrics: {}", forwarded.join(", "));
    server.shutdown().await;
    outcome
}

async fn hyperswarm(timeout: Duration) -> anyhow::Result<Outcome> {
    use pluresdb_sync_transport_hyperswarm::testkit::{LoopbackDht, TESTNET_NODES};

    let dht = LoopbackDht::start().await?;
    eprintln!(
        "[hyperswarm] local mainline DHT testnet of {TESTNET_NODES} nodes on {}; replicas \
         announce a domain-separated info-hash, dial over QUIC and authenticate with Noise \
         XXpsk0 keyed by the topic",
        dht.first_node()
    );
    let mut transports = Vec::new();
    for _ in 0..REPLICAS {
        let t = dht.builder().timeout(timeout).build()?;
        transports.push((t.peer_id(), Box::new(t) as Box<dyn Transport>));
    }
    let outcome = showcase("hyperswarm", transports, timeout).await;
    dht.stop().await?;
    outcome
}

async fn auto(timeout: Duration) -> anyhow::Result<Outcome> {
    use pluresdb_sync_transport_auto::testkit::AutoNet;

    let net = AutoNet::start().await?;
    eprintln!(
        "[auto] relay server on {} and a local DHT testnet; replicas meet in the relay room \
         and on the DHT, one connection per peer (QUIC + Noise XXpsk0, relayed or direct)",
        net.relay_url()
    );
    let mut transports = Vec::new();
    for _ in 0..REPLICAS {
        let t = net.builder().timeout(timeout).build()?;
        transports.push((t.peer_id(), Box::new(t) as Box<dyn Transport>));
    }
    let outcome = showcase("auto", transports, timeout).await;
    net.stop().await?;
    outcome
}
