//! `pluresdb-sync peer`: join a topic, print what peers send, send stdin lines to every peer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use pluresdb_sync::{
    Connection, HyperswarmTransportBuilder, Identity, RelayTransport, TopicHash, TransportConfig,
    TransportMode, derive_topic, topic::parse_topic_hex, try_create_transport,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{Mutex, mpsc};

/// Lines queued per peer before the slowest peer starts dropping them (and says so).
const OUTBOX_LINES: usize = 256;

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

type Outboxes = Arc<Mutex<HashMap<String, mpsc::Sender<Arc<[u8]>>>>>;

/// Runs until stdin ends or Ctrl-C.
pub(crate) async fn run(args: PeerArgs) -> anyhow::Result<()> {
    let topic = args.topic()?;
    let config = TransportConfig {
        mode: args.mode,
        relay_url: args.relay_url.clone(),
        timeout_ms: args.timeout_ms,
        encryption: !args.no_encryption,
    };
    let mut transport = build_transport(&args, config)?;
    eprintln!(
        "joining topic {} over {} (type lines to send them to every peer; Ctrl-D to leave)",
        hex_short(&topic),
        transport.name()
    );
    if let Some(key) = &args.key {
        eprintln!("identity {}", short(&Identity::load(key)?.peer_id()));
    }
    let mut incoming = transport.connect(topic).await.context("connect")?;
    let outboxes: Outboxes = Arc::default();

    let accept = {
        let outboxes = outboxes.clone();
        tokio::spawn(async move {
            while let Some(conn) = incoming.recv().await {
                let peer = conn.peer_id().to_owned();
                let (tx, rx) = mpsc::channel(OUTBOX_LINES);
                // Registered before it is announced, so a line typed on seeing
                // "connected" reaches this peer.
                outboxes.lock().await.insert(peer.clone(), tx);
                eprintln!("peer {} connected", short(&peer));
                let outboxes = outboxes.clone();
                tokio::spawn(async move {
                    serve(conn, rx).await;
                    outboxes.lock().await.remove(&peer);
                    eprintln!("peer {} disconnected", short(&peer));
                });
            }
        })
    };

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => match line.context("reading stdin")? {
                Some(line) => broadcast(&outboxes, line.into_bytes().into()).await,
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    eprintln!("leaving");
    tokio::time::timeout(Duration::from_secs(5), transport.disconnect())
        .await
        .context("disconnect timed out")??;
    accept.abort();
    Ok(())
}

/// The transport for `config`, with the identity and bootstrap options that the facade's
/// `TransportConfig` does not carry.
fn build_transport(
    args: &PeerArgs,
    config: TransportConfig,
) -> anyhow::Result<Box<dyn pluresdb_sync::Transport>> {
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
            Box::new(builder.build()?)
        }
        TransportMode::Relay => {
            let mut builder = RelayTransport::builder()
                .relay_url(config.relay_url.clone().unwrap_or_default())
                .encryption(config.encryption)
                .timeout(config.timeout());
            if let Some(identity) = identity {
                builder = builder.identity(identity);
            }
            Box::new(builder.build()?)
        }
        TransportMode::Auto => {
            let mut builder = pluresdb_sync::AutoTransportBuilder::from_config(&config)?;
            if !args.bootstrap.is_empty() {
                builder = builder.bootstrap(args.bootstrap.clone());
            }
            if let Some(identity) = identity {
                builder = builder.identity(identity);
            }
            Box::new(builder.build()?)
        }
        TransportMode::Disabled => try_create_transport(config)?,
    })
}

async fn broadcast(outboxes: &Outboxes, msg: Arc<[u8]>) {
    let boxes = outboxes.lock().await;
    if boxes.is_empty() {
        eprintln!("(no peers yet; not sent)");
    }
    for (peer, tx) in boxes.iter() {
        if tx.try_send(msg.clone()).is_err() {
            eprintln!(
                "peer {} is not keeping up; line dropped for it",
                short(peer)
            );
        }
    }
}

/// Owns one connection: prints what arrives, sends what the outbox holds.
async fn serve(mut conn: Box<dyn Connection>, mut outbox: mpsc::Receiver<Arc<[u8]>>) {
    let peer = short(conn.peer_id());
    loop {
        tokio::select! {
            msg = conn.receive() => match msg {
                Ok(Some(bytes)) => println!("[{peer}] {}", String::from_utf8_lossy(&bytes)),
                Ok(None) => return,
                Err(e) => {
                    eprintln!("peer {peer}: {e:#}");
                    return;
                }
            },
            out = outbox.recv() => match out {
                Some(bytes) => {
                    if let Err(e) = conn.send(&bytes).await {
                        eprintln!("peer {peer}: send failed: {e:#}");
                        return;
                    }
                }
                None => {
                    let _ = conn.close().await;
                    return;
                }
            },
        }
    }
}

/// The first 8 hex digits of a peer id, enough to tell peers apart on a screen.
pub(crate) fn short(peer_id: &str) -> String {
    peer_id.chars().take(8).collect()
}

fn hex_short(topic: &TopicHash) -> String {
    short(&hex::encode(topic))
}
