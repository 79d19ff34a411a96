//! `pluresdb-sync`: the command-line face of pluresdb-sync.

mod bench;
mod demo;
mod dht_cmd;
mod peer;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use pluresdb_sync::{Identity, derive_topic};

mod relay_cmd;

/// jemalloc instead of the system allocator: after a burst of queued frames (never-reading
/// receivers, up to the relay's budget) glibc's malloc kept most of it resident once the
/// connections were gone (96 MiB of a 17 MiB baseline 30 s later), and so did mimalloc
/// (122 of 26 MiB: it frees lazily, with MADV_FREE); jemalloc with its background purge
/// thread gives it back (see `relay_cmd::return_freed_memory`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Peer discovery and secure transports for PluresDB replication.
#[derive(Debug, Parser)]
#[command(name = "pluresdb-sync", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the topic (64 hex digits, BLAKE2b-256) peers of a database meet on.
    Topic {
        /// The database id, e.g. "my-app-database".
        db_id: String,
    },
    /// Create a new identity key (a Noise static X25519 key) and print its peer id.
    ///
    /// The file is created with mode 0600 and never overwritten unless --force is given.
    Keygen {
        /// Where to write the key [default: $XDG_CONFIG_HOME/pluresdb-sync/identity.key,
        /// or ~/.config/pluresdb-sync/identity.key].
        #[arg(short, long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Replace an existing key file (the old identity is lost).
        #[arg(long)]
        force: bool,
    },
    /// Three replicas on this machine find each other and sync through SyncBridge over each
    /// transport (a relay server and a DHT testnet run in-process on loopback): events, a
    /// message stream, one leaving; prints what happens and a table.
    Demo(demo::DemoArgs),
    /// Benchmarks against baselines measured in the same run (use a --release build).
    Bench(bench::BenchArgs),
    /// Run a mainline DHT node for Hyperswarm-mode peers of a private network to bootstrap from.
    Dht(dht_cmd::DhtArgs),
    /// Join a topic as a replica (a SyncBridge): stdin `upsert ID` / `delete ID` publish
    /// events, other lines are messages to every peer; prints peers, events and messages.
    Peer(peer::PeerArgs),
    /// Print the peer id of an existing identity key file.
    PeerId {
        /// The key file [default: as for keygen].
        #[arg(short, long, value_name = "FILE")]
        key: Option<PathBuf>,
    },
    /// Run a relay server (WebSocket rooms for relay mode).
    Relay(Box<relay_cmd::RelayArgs>),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Topic { db_id } => {
            println!("{}", hex::encode(derive_topic(&db_id)));
        }
        Command::Keygen { out, force } => {
            let path = key_path(out)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                create_private_dir(dir)?;
            }
            let identity = Identity::generate()?;
            identity.save(&path, force)?;
            eprintln!("wrote identity key to {}", path.display());
            println!("{}", identity.peer_id());
        }
        Command::Bench(args) => runtime()?.block_on(bench::run(args))?,
        Command::Dht(args) => runtime()?.block_on(dht_cmd::run(args))?,
        Command::Demo(args) => runtime()?.block_on(demo::run(args))?,
        Command::Peer(args) => runtime()?.block_on(peer::run(args))?,
        Command::PeerId { key } => {
            let path = key_path(key)?;
            println!("{}", Identity::load(&path)?.peer_id());
        }
        Command::Relay(args) => relay_cmd::run(*args)?,
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}

/// The given path, or the default key location.
fn key_path(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .ok_or_else(|| {
            anyhow::anyhow!("neither XDG_CONFIG_HOME nor HOME is set: pass the key path with --out")
        })?;
    Ok(config.join("pluresdb-sync").join("identity.key"))
}

fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| anyhow::anyhow!("cannot create directory {}: {e}", dir.display()))
}
