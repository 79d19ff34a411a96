//! `pluresdb-sync peer`: one replica on a topic through a `SyncBridge`. Stdin lines
//! `upsert ID` / `delete ID` publish events, any other line is an application message to
//! every peer; peers, their addresses, events and messages are printed as they happen
//! (`--json`: one JSON object per line on stdout, for scripts).

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use pluresdb_sync::{
    BridgeEvent, HyperswarmTransportBuilder, Identity, PeerInfo, RelayTransport, SyncBridge,
    SyncBroadcaster, SyncEvent, TopicHash, Transport, TransportConfig, TransportMode, derive_topic,
    topic::parse_topic_hex, try_create_transport,
};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::broadcast::error::RecvError;

/// How often a progress line is printed while no peer is linked.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Options of `pluresdb-sync peer`.
#[derive(Debug, Args)]
pub(crate) struct PeerArgs {
    /// The database id whose topic to join.
    #[arg(long, conflicts_with = "topic", required_unless_present = "topic")]
    db: Option<String>,
    /// The topic to join, as 64 hex digits (as `pluresdb-sync topic` prints it).
    #[arg(long)]
    topic: Option<String>,
    /// The transport: hyperswarm, relay, auto (the DHT and a relay together) or disabled.
    #[arg(long, default_value = "hyperswarm")]
    mode: TransportMode,
    /// The relay's ws:// or wss:// URL (relay and auto modes).
    #[arg(long, env = "PLURESDB_SYNC_RELAY_URL")]
    relay_url: Option<String>,
    /// Timeout for network operations, in milliseconds.
    #[arg(long, default_value_t = pluresdb_sync::config::DEFAULT_TIMEOUT_MS)]
    timeout_ms: u64,
    /// Turn off end-to-end encryption (every peer must agree).
    #[arg(long)]
    no_encryption: bool,
    /// Identity key file (from `pluresdb-sync keygen`); a new random identity without it.
    #[arg(long, value_name = "FILE")]
    key: Option<std::path::PathBuf>,
    /// DHT bootstrap nodes, host:port, comma-separated (Hyperswarm and auto modes) [default:
    /// $PLURESDB_SYNC_BOOTSTRAP, else the public mainline DHT].
    #[arg(long, value_name = "NODES", value_delimiter = ',')]
    bootstrap: Vec<String>,
    /// Print one JSON object per line on stdout (joined, peer_connected, peer_address,
    /// peer_disconnected, event, message, published, sent, report, leaving) instead of text.
    #[arg(long)]
    json: bool,
}

impl PeerArgs {
    fn topic(&self) -> anyhow::Result<TopicHash> {
        match (&self.db, &self.topic) {
            (_, Some(hex)) => Ok(parse_topic_hex(hex)?),
            (Some(db), None) => Ok(derive_topic(db)),
            (None, None) => anyhow::bail!("pass --db <id> or --topic <hex>"),
        }
    }
}

/// Where output goes: text (status on stderr, traffic on stdout) or JSON lines on stdout.
struct Out {
    json: bool,
}

impl Out {
    /// A status line: stderr as text; a JSON object on stdout.
    fn status(&self, text: String, object: serde_json::Value) {
        if self.json {
            println!("{object}");
        } else {
            eprintln!("{text}");
        }
    }

    /// A traffic line: stdout either way.
    fn traffic(&self, text: String, object: serde_json::Value) {
        if self.json {
            println!("{object}");
        } else {
            println!("{text}");
        }
    }
}

/// What a stdin line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Event(SyncEvent),
    Message(String),
}

fn parse_line(line: String) -> Line {
    let mut words = line.splitn(2, ' ');
    match (words.next(), words.next().map(str::trim)) {
        (Some("upsert"), Some(id)) if !id.is_empty() => {
            Line::Event(SyncEvent::NodeUpsert { id: id.to_owned() })
        }
        (Some("delete"), Some(id)) if !id.is_empty() => {
            Line::Event(SyncEvent::NodeDelete { id: id.to_owned() })
        }
        _ => Line::Message(line),
    }
}

fn describe(event: &SyncEvent) -> (&'static str, &str) {
    match event {
        SyncEvent::NodeUpsert { id } => ("upsert", id),
        SyncEvent::NodeDelete { id } => ("delete", id),
        SyncEvent::PeerConnected { peer_id } => ("peer_connected", peer_id),
        SyncEvent::PeerDisconnected { peer_id } => ("peer_disconnected", peer_id),
    }
}

type Lookup<'a> = Pin<Box<dyn Future<Output = anyhow::Result<Vec<PeerInfo>>> + 'a>>;

/// Runs until stdin ends or Ctrl-C.
pub(crate) async fn run(args: PeerArgs) -> anyhow::Result<()> {
    let out = Out { json: args.json };
    let topic = args.topic()?;
    let config = TransportConfig {
        mode: args.mode,
        relay_url: args.relay_url.clone(),
        timeout_ms: args.timeout_ms,
        encryption: !args.no_encryption,
    };
    let (me, transport) = build_transport(&args, config)?;
    let name = transport.name().to_owned();
    out.status(
        format!(
            "joining topic {} over {name} as {} (lines: `upsert ID` / `delete ID` publish an \
             event, anything else is a message to every peer; Ctrl-D to leave)",
            short(&hex::encode(topic)),
            me.as_deref().map_or("-".into(), short)
        ),
        json!({"type": "joining", "topic": hex::encode(topic), "mode": name, "peer": me}),
    );
    let hub = SyncBroadcaster::default();
    let mut from_network = hub.subscribe_remote();
    let started = Instant::now();
    let bridge = SyncBridge::start(transport, topic, hub.clone())
        .await
        .map_err(|e| with_hint(e, &args))?;
    let mut reports = bridge.reports();
    let mut messages = bridge
        .messages()
        .context("the message receiver is taken once")?;
    out.status(
        format!("joined; discovering peers over {name}…"),
        json!({"type": "joined", "ms": started.elapsed().as_millis() as u64}),
    );

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut progress =
        tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    let wants_addresses = args.mode == TransportMode::Hyperswarm;
    let mut lookup: Option<Lookup<'_>> = None;
    let mut lookup_again = false;
    let mut addressed: BTreeSet<String> = BTreeSet::new();
    let mut ever_linked = false;
    loop {
        tokio::select! {
            line = lines.next_line() => match line.context("reading stdin")? {
                Some(line) => match parse_line(line) {
                    Line::Event(event) => {
                        let (kind, id) = describe(&event);
                        out.status(
                            format!("published {kind} {id} to {} peers", bridge.peers().len()),
                            json!({"type": "published", "kind": kind, "id": id}),
                        );
                        hub.publish(event).ok();
                    }
                    Line::Message(text) => {
                        let sent = bridge.broadcast(text.as_bytes())?;
                        if sent == 0 {
                            out.status(
                                "(no peers yet; not sent)".into(),
                                json!({"type": "sent", "peers": 0}),
                            );
                        } else if out.json {
                            println!("{}", json!({"type": "sent", "peers": sent}));
                        }
                    }
                },
                None => break,
            },
            event = from_network.recv() => match event {
                Ok(SyncEvent::PeerConnected { peer_id }) => {
                    ever_linked = true;
                    let via = match args.mode {
                        TransportMode::Relay => format!(
                            " via relay {}",
                            args.relay_url.as_deref().unwrap_or("?")
                        ),
                        _ => String::new(),
                    };
                    out.status(
                        format!("peer {} connected{via}", short(&peer_id)),
                        json!({"type": "peer_connected", "peer": peer_id,
                               "via": via.trim()}),
                    );
                    if wants_addresses {
                        lookup_again = true;
                    }
                }
                Ok(SyncEvent::PeerDisconnected { peer_id }) => {
                    addressed.remove(&peer_id);
                    out.status(
                        format!("peer {} disconnected", short(&peer_id)),
                        json!({"type": "peer_disconnected", "peer": peer_id}),
                    );
                }
                Ok(event) => {
                    let (kind, id) = describe(&event);
                    out.traffic(
                        format!("event {kind} {id}"),
                        json!({"type": "event", "kind": kind, "id": id}),
                    );
                }
                Err(RecvError::Lagged(n)) => out.status(
                    format!("(missed {n} events: printing is slower than they arrive)"),
                    json!({"type": "report", "text": format!("missed {n} events")}),
                ),
                Err(RecvError::Closed) => break,
            },
            message = messages.recv() => match message {
                Some((peer, bytes)) => {
                    let text = String::from_utf8_lossy(&bytes);
                    out.traffic(
                        format!("[{}] {text}", short(&peer)),
                        json!({"type": "message", "peer": peer, "text": text,
                               "bytes": bytes.len()}),
                    );
                }
                None => break,
            },
            report = reports.recv() => match report {
                // Arrivals and departures are printed from the hub; the rest says what
                // went wrong.
                Ok(BridgeEvent::PeerConnected { .. } | BridgeEvent::PeerDisconnected {
                    reason: pluresdb_sync::DisconnectReason::Closed
                        | pluresdb_sync::DisconnectReason::Stopped,
                    ..
                }) => {}
                Ok(report) => out.status(
                    format!("bridge: {report}"),
                    json!({"type": "report", "text": report.to_string()}),
                ),
                Err(RecvError::Lagged(n)) => out.status(
                    format!("(missed {n} bridge reports)"),
                    json!({"type": "report", "text": format!("missed {n} reports")}),
                ),
                Err(RecvError::Closed) => {}
            },
            found = async {
                match lookup.as_mut() {
                    Some(running) => running.await,
                    None => std::future::pending().await,
                }
            }, if lookup.is_some() => {
                lookup = None;
                match found {
                    Ok(found) => {
                        let linked = bridge.peers();
                        for p in found {
                            let Some(addr) = p.address else { continue };
                            if linked.contains(&p.id) && addressed.insert(p.id.clone()) {
                                // Auto mode lists a relayed peer as "relay <url> connection <id>".
                                let path = if addr.starts_with("relay ") { "relayed" } else { "direct" };
                                out.status(
                                    format!("peer {} at {addr} ({path}, QUIC)", short(&p.id)),
                                    json!({"type": "peer_address", "peer": p.id,
                                           "address": addr, "path": path}),
                                );
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "lookup for peer addresses failed"),
                }
            }
            _ = progress.tick() => {
                if bridge.peers().is_empty() {
                    let secs = started.elapsed().as_secs();
                    let hint = if ever_linked { "" } else { discovery_hint(&args) };
                    out.status(
                        format!("still discovering peers over {name} ({secs} s){hint}"),
                        json!({"type": "discovering", "seconds": secs}),
                    );
                }
            }
        }
        if lookup.is_none() && lookup_again {
            lookup_again = false;
            lookup = Some(Box::pin(bridge.lookup()));
        }
    }
    drop(lookup);
    out.status("leaving".into(), json!({"type": "leaving"}));
    tokio::time::timeout(Duration::from_secs(10), bridge.stop())
        .await
        .context("leaving took more than 10 s")??;
    Ok(())
}

/// What to try when no peer shows up.
fn discovery_hint(args: &PeerArgs) -> &'static str {
    match args.mode {
        TransportMode::Hyperswarm if args.bootstrap.is_empty() => {
            ": is another peer on the same --db? behind a strict NAT, try --mode relay"
        }
        TransportMode::Hyperswarm => ": is another peer on the same --db and --bootstrap?",
        TransportMode::Relay => ": is another peer on the same --db and relay?",
        TransportMode::Auto => ": is another peer on the same --db, on the same relay or DHT?",
        TransportMode::Disabled => ": disabled mode never finds peers",
    }
}

/// The start error with what to do about it.
fn with_hint(err: anyhow::Error, args: &PeerArgs) -> anyhow::Error {
    let secs = args.timeout_ms / 1000;
    match args.mode {
        // Either the whole start timed out, or every DHT request did before it.
        TransportMode::Hyperswarm
            if matches!(
                err.downcast_ref::<pluresdb_sync::Error>(),
                Some(pluresdb_sync::Error::Timeout { .. })
            ) || matches!(
                err.downcast_ref::<pluresdb_sync::hyperswarm::HyperswarmError>(),
                Some(pluresdb_sync::hyperswarm::HyperswarmError::DhtUnreachable { .. })
            ) =>
        {
            err.context(format!(
                "no DHT bootstrap node answered within {secs} s: pass --bootstrap, or use \
                 --mode relay"
            ))
        }
        TransportMode::Hyperswarm => {
            err.context("cannot start hyperswarm mode: check --bootstrap, or use --mode relay")
        }
        TransportMode::Relay => err.context(format!(
            "cannot reach the relay at {}: check --relay-url and that the relay runs, or use \
             --mode hyperswarm",
            args.relay_url.as_deref().unwrap_or("?")
        )),
        TransportMode::Auto => err.context(format!(
            "cannot join the topic in auto mode: neither the relay at {} nor the DHT answered \
             within {secs} s; check --relay-url and --bootstrap",
            args.relay_url.as_deref().unwrap_or("?")
        )),
        TransportMode::Disabled => err,
    }
}

/// The transport for `config` and its peer id, with the identity and bootstrap options that
/// the facade's `TransportConfig` does not carry.
fn build_transport(
    args: &PeerArgs,
    config: TransportConfig,
) -> anyhow::Result<(Option<String>, Box<dyn Transport>)> {
    config.validate()?;
    let identity = args.key.as_deref().map(Identity::load).transpose()?;
    Ok(match config.mode {
        TransportMode::Hyperswarm => {
            let mut builder = HyperswarmTransportBuilder::from_config(&config);
            if !args.bootstrap.is_empty() {
                builder = builder.bootstrap(args.bootstrap.clone());
            }
            if let Some(identity) = identity {
                builder = builder.identity(identity);
            }
            let t = builder.build()?;
            (Some(t.peer_id()), Box::new(t))
        }
        TransportMode::Relay => {
            let mut builder = RelayTransport::builder()
                .relay_url(config.relay_url.clone().unwrap_or_default())
                .encryption(config.encryption)
                .timeout(config.timeout());
            if let Some(identity) = identity {
                builder = builder.identity(identity);
            }
            let t = builder.build()?;
            (Some(t.peer_id()), Box::new(t))
        }
        TransportMode::Auto => {
            let mut builder = pluresdb_sync::AutoTransportBuilder::from_config(&config)?;
            if !args.bootstrap.is_empty() {
                builder = builder.bootstrap(args.bootstrap.clone());
            }
            if let Some(identity) = identity {
                builder = builder.identity(identity);
            }
            let t = builder.build()?;
            (Some(t.peer_id()), Box::new(t))
        }
        TransportMode::Disabled => (None, try_create_transport(config)?),
    })
}

/// The first 8 hex digits of a peer id, enough to tell peers apart on a screen.
pub(crate) fn short(peer_id: &str) -> String {
    peer_id.chars().take(8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_events_or_messages() {
        assert_eq!(
            parse_line("upsert users/1".into()),
            Line::Event(SyncEvent::NodeUpsert {
                id: "users/1".into()
            })
        );
        assert_eq!(
            parse_line("delete a b".into()),
            Line::Event(SyncEvent::NodeDelete { id: "a b".into() })
        );
        for text in ["upsert", "upsert ", "hello", "deleted x", ""] {
            assert_eq!(parse_line(text.into()), Line::Message(text.into()));
        }
    }
}
