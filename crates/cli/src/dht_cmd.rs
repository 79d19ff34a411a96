//! `pluresdb-sync dht`: run a mainline DHT node that Hyperswarm-mode peers bootstrap from.
//!
//! For private networks (and tests) that must not touch the public DHT: start one or more
//! nodes, then give peers `PLURESDB_SYNC_BOOTSTRAP=host:port[,host:port...]`.

use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

/// How often the node reports its routing table size.
const STATUS_INTERVAL: Duration = Duration::from_secs(60);

/// Options of `pluresdb-sync dht`.
#[derive(Debug, Args)]
pub(crate) struct DhtArgs {
    /// IPv4 address and UDP port to listen on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:6881")]
    listen: SocketAddrV4,
    /// Other nodes to join (host:port, comma-separated). Without it the node starts a new,
    /// private DHT and contacts nobody.
    #[arg(long, value_name = "NODES", value_delimiter = ',')]
    bootstrap: Vec<String>,
    /// Join the public BitTorrent mainline DHT through its default bootstrap nodes.
    #[arg(long, conflicts_with = "bootstrap")]
    public: bool,
}

/// Runs the node until Ctrl-C.
pub(crate) async fn run(args: DhtArgs) -> anyhow::Result<()> {
    let dht = tokio::task::spawn_blocking(move || {
        let mut builder = mainline::Dht::builder();
        builder
            .server_mode()
            .bind_address(*args.listen.ip())
            .port(args.listen.port());
        if !args.bootstrap.is_empty() {
            builder.bootstrap(&args.bootstrap);
        } else if !args.public {
            builder.no_bootstrap();
        }
        builder.build()
    })
    .await?
    .with_context(|| format!("cannot start a DHT node on {}", args.listen))?;
    let dht = dht.as_async();
    let info = dht.info().await;
    let addr = info.local_addr();
    println!("dht node listening on {addr}");
    println!("peers bootstrap with: PLURESDB_SYNC_BOOTSTRAP={addr}");
    let mut status = tokio::time::interval(STATUS_INTERVAL);
    status.tick().await;
    loop {
        tokio::select! {
            _ = status.tick() => {
                let nodes = dht.to_bootstrap().await.len();
                eprintln!("dht node {addr}: {nodes} nodes in the routing table");
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    eprintln!("dht node stopping");
    Ok(())
}
