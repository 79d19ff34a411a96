//! `pluresdb-sync relay`: run the relay server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use pluresdb_sync_transport_relay::server::{self, RelayServer, RelayServerConfig};

/// Options of `pluresdb-sync relay`. Every limit defaults to the documented const. Every flag
/// can also come from the environment: `--max-frame-bytes` from
/// `PLURESDB_SYNC_RELAY_MAX_FRAME_BYTES` and so on (a flag wins), so that secrets such as the
/// NATS URL's credentials need not be on the command line.
#[derive(Debug, Args)]
pub(crate) struct RelayArgs {
    /// Address to listen on, e.g. 0.0.0.0:443 (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", env = "PLURESDB_SYNC_RELAY_LISTEN")]
    listen: SocketAddr,
    /// PEM certificate chain: serve wss:// (needs --tls-key).
    #[arg(
        long,
        value_name = "PEM",
        requires = "tls_key",
        env = "PLURESDB_SYNC_RELAY_TLS_CERT"
    )]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(
        long,
        value_name = "PEM",
        requires = "tls_cert",
        env = "PLURESDB_SYNC_RELAY_TLS_KEY"
    )]
    tls_key: Option<PathBuf>,
    /// Serve Prometheus metrics (GET /metrics) and /healthz on this address.
    #[arg(long, value_name = "ADDR", env = "PLURESDB_SYNC_RELAY_METRICS")]
    metrics: Option<SocketAddr>,
    /// File of accepted bearer tokens, one per line (blank lines and # comments ignored).
    #[arg(long, value_name = "FILE", env = "PLURESDB_SYNC_RELAY_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// Largest relay frame in bytes [default: 65536].
    #[arg(long, env = "PLURESDB_SYNC_RELAY_MAX_FRAME_BYTES")]
    max_frame_bytes: Option<usize>,
    /// Most rooms per connection [default: 64].
    #[arg(long, env = "PLURESDB_SYNC_RELAY_MAX_ROOMS_PER_CONNECTION")]
    max_rooms_per_connection: Option<usize>,
    /// Most members per room [default: 256].
    #[arg(long, env = "PLURESDB_SYNC_RELAY_MAX_PEERS_PER_ROOM")]
    max_peers_per_room: Option<usize>,
    /// Most open connections per client IP [default: 64].
    #[arg(long, env = "PLURESDB_SYNC_RELAY_MAX_CONNECTIONS_PER_IP")]
    max_connections_per_ip: Option<usize>,
    /// Milliseconds from TCP accept to a completed upgrade [default: 10000].
    #[arg(long, env = "PLURESDB_SYNC_RELAY_HANDSHAKE_TIMEOUT_MS")]
    handshake_timeout_ms: Option<u64>,
    /// Milliseconds after the upgrade to the first join [default: 30000].
    #[arg(long, env = "PLURESDB_SYNC_RELAY_JOIN_TIMEOUT_MS")]
    join_timeout_ms: Option<u64>,
    /// Milliseconds of silence before the relay pings [default: 15000].
    #[arg(long, env = "PLURESDB_SYNC_RELAY_PING_INTERVAL_MS")]
    ping_interval_ms: Option<u64>,
    /// Milliseconds of silence before the relay closes [default: 45000].
    #[arg(long, env = "PLURESDB_SYNC_RELAY_IDLE_TIMEOUT_MS")]
    idle_timeout_ms: Option<u64>,
    /// Entries queued per connection: a frame, or up to 16 KiB of small frames [default: 256].
    #[arg(long, env = "PLURESDB_SYNC_RELAY_SEND_QUEUE_FRAMES")]
    send_queue_frames: Option<usize>,
    /// Milliseconds a full queue may block forwarding before its reader is closed [default: 5000].
    #[arg(long, env = "PLURESDB_SYNC_RELAY_SLOW_CONSUMER_TIMEOUT_MS")]
    slow_consumer_timeout_ms: Option<u64>,
    /// Bytes queued to one connection at most; senders to it wait beyond it [default: 4194304].
    #[arg(long, env = "PLURESDB_SYNC_RELAY_MAX_QUEUED_BYTES_PER_CONNECTION")]
    max_queued_bytes_per_connection: Option<usize>,
    /// Bytes queued to all connections together at most; when used up, the largest queues are
    /// closed (4010) [default: 268435456].
    #[arg(long, env = "PLURESDB_SYNC_RELAY_MAX_QUEUED_BYTES")]
    max_queued_bytes: Option<usize>,
    /// Bytes per second each client IP may send; reads pause beyond it [default: no limit].
    #[arg(long, env = "PLURESDB_SYNC_RELAY_MAX_BYTES_PER_SEC_PER_IP")]
    max_bytes_per_sec_per_ip: Option<u64>,
    /// Scale out over NATS: rooms span every relay on the same NATS server(s)
    /// (`nats://host:4222`, comma-separated) [default: a single relay].
    #[arg(
        long,
        value_name = "URL",
        env = "PLURESDB_SYNC_RELAY_NATS",
        hide_env_values = true
    )]
    nats: Option<String>,
    /// Prefix of the NATS subjects [default: pluresdb.relay.v1].
    #[arg(long, env = "PLURESDB_SYNC_RELAY_NATS_SUBJECT_PREFIX")]
    nats_subject_prefix: Option<String>,
}

impl RelayArgs {
    fn config(&self) -> anyhow::Result<RelayServerConfig> {
        let mut b = RelayServerConfig::builder();
        let ms = Duration::from_millis;
        if let Some(v) = self.max_frame_bytes {
            b = b.max_frame_bytes(v);
        }
        if let Some(v) = self.max_rooms_per_connection {
            b = b.max_rooms_per_connection(v);
        }
        if let Some(v) = self.max_peers_per_room {
            b = b.max_peers_per_room(v);
        }
        if let Some(v) = self.max_connections_per_ip {
            b = b.max_connections_per_ip(v);
        }
        if let Some(v) = self.handshake_timeout_ms {
            b = b.handshake_timeout(ms(v));
        }
        if let Some(v) = self.join_timeout_ms {
            b = b.join_timeout(ms(v));
        }
        if let Some(v) = self.ping_interval_ms {
            b = b.ping_interval(ms(v));
        }
        if let Some(v) = self.idle_timeout_ms {
            b = b.idle_timeout(ms(v));
        }
        if let Some(v) = self.send_queue_frames {
            b = b.send_queue_frames(v);
        }
        if let Some(v) = self.slow_consumer_timeout_ms {
            b = b.slow_consumer_timeout(ms(v));
        }
        if let Some(v) = self.max_queued_bytes_per_connection {
            b = b.max_queued_bytes_per_connection(v);
        }
        if let Some(v) = self.max_queued_bytes {
            b = b.max_queued_bytes(v);
        }
        if let Some(v) = self.max_bytes_per_sec_per_ip {
            b = b.max_bytes_per_sec_per_ip(Some(v));
        }
        if let Some(url) = &self.nats {
            b = b.nats_url(Some(url.clone()));
        }
        if let Some(p) = &self.nats_subject_prefix {
            b = b.nats_subject_prefix(p.clone());
        }
        if let Some(path) = &self.auth_token_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --auth-token-file {}", path.display()))?;
            let tokens: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect();
            anyhow::ensure!(
                !tokens.is_empty(),
                "--auth-token-file {} holds no token",
                path.display()
            );
            b = b.auth_tokens(tokens);
        }
        Ok(b.build()?)
    }
}

/// Runs the relay until SIGINT or SIGTERM, then closes every connection with 1001.
pub(crate) fn run(args: RelayArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    return_freed_memory();
    raise_open_file_limit();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(server::tls_config_from_pem(cert, key)?),
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let mut signals = Signals::watch()?;
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        let nats = config.nats_url.is_some();
        let mut relay = RelayServer::bind_with_tls(args.listen, config, tls)
            .await
            .map_err(|e| {
                // A NATS failure names its URL itself; anything else is the listener.
                if nats && e.to_string().contains("NATS") {
                    anyhow::Error::new(e)
                } else {
                    anyhow::Error::new(e).context(format!("cannot listen on {}", args.listen))
                }
            })?;
        // Scripts and tests read the bound address from these lines.
        println!("relay listening on {scheme}://{}/relay", relay.local_addr());
        if let Some(addr) = args.metrics {
            let bound = relay
                .serve_metrics(addr)
                .await
                .with_context(|| format!("cannot listen on --metrics {addr}"))?;
            println!("metrics on http://{bound}/metrics");
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        signals.recv().await?;
        eprintln!("shutting down: closing connections with 1001");
        relay.shutdown().await;
        Ok(())
    })
}

/// Every connection is a file descriptor, and the usual soft limit (1,024) is far below what a
/// relay holds: at it, accepts fail with "Too many open files" and pairs take seconds to
/// connect. The hard limit is what the operator allows; take all of it.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open file limit (RLIMIT_NOFILE soft limit)"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
}

/// jemalloc returns freed pages to the system only as it allocates, after its decay time
/// (10 s); a relay that goes quiet after a burst would keep them. Its background thread
/// purges on time instead.
fn return_freed_memory() {
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "cannot start jemalloc's background purge thread");
    }
}

/// SIGINT and SIGTERM, watched from before the relay binds: a signal that arrives while the
/// relay starts (a supervisor stopping it at once, a test that connects and signals fast)
/// still shuts it down cleanly instead of killing the process with its sockets open.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts watching (needs the runtime).
    fn watch() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                term: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
                int: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Waits for the first of them.
    async fn recv(&mut self) -> anyhow::Result<()> {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c()
            .await
            .context("cannot watch Ctrl-C")?;
        Ok(())
    }
}
