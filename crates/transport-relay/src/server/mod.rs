//! The relay server: rooms of WebSocket clients that forward opaque frames to each other.
//!
//! Stateless beyond live sockets: a room is the set of connections that joined it, and goes
//! away with them. Any relay can serve any client; a restart loses only the live sockets.
//!
//! This file is the server handle and its listeners (`accept`: accepting without spinning). The rest, each owning one kind of state
//! (imports only go down this list, so there is no cycle): `config` (settings), `metrics`
//! (counters; a leaf), `outbox` (a queued batch of frames), `budget` (the bytes every queue
//! holds, against a cap per connection and one for the server, and who is closed when it is
//! short), `rooms` (room → local members, and every queueing to a member), `limits` (per-IP connection counts and byte-rate buckets),
//! `nats` (the bus to other nodes: remote members, node liveness), `state` (what every
//! connection shares), `gather` (one burst's DELIVERs per receiver), `datagram` (forwarding
//! DATAGRAMs without waiting), `requests` (a connection's state and what each frame does), `writer` (a connection's writer task),
//! `conn` (its reader loop), `http` (one request served by hyper, the head limits) and
//! `upgrade` (the relay's checks, then the WebSocket),
//! `tls` (PEM loading).
//!
//! ```no_run
//! use pluresdb_sync_transport_relay::server::{RelayServer, RelayServerConfig};
//!
//! # #[tokio::main]
//! # async fn main() -> anyhow::Result<()> {
//! let server = RelayServer::bind("127.0.0.1:0".parse()?, RelayServerConfig::default()).await?;
//! println!("relay on ws://{}/relay", server.local_addr());
//! server.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod accept;
mod budget;
mod config;
mod conn;
mod datagram;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod gather;
mod http;
mod limits;
mod metrics;
mod nats;
mod outbox;
mod requests;
mod rooms;
mod state;
mod tls;
mod upgrade;
mod writer;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use config::*;
pub use tls::tls_config_from_pem;

use limits::PerIp;
use metrics::{DropReason, Metrics};
use rooms::Rooms;
use state::Shared;

/// A running relay server. Dropping it stops accepting and aborts every connection;
/// [`RelayServer::shutdown`] first tells clients to go away (close code 1001).
#[derive(Debug)]
pub struct RelayServer {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl RelayServer {
    /// Binds `addr` (port 0 picks a free port) and starts serving.
    pub async fn bind(addr: SocketAddr, config: RelayServerConfig) -> io::Result<Self> {
        Self::bind_with_tls(addr, config, None).await
    }

    /// Like [`RelayServer::bind`], serving `wss://` with `tls` (see [`tls_config_from_pem`]).
    pub async fn bind_with_tls(
        addr: SocketAddr,
        config: RelayServerConfig,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> io::Result<Self> {
        config.check().map_err(io::Error::other)?;
        let metrics = Arc::new(Metrics::default());
        let budget = budget::Budget::new(
            config.max_queued_bytes,
            config.max_queued_bytes_per_connection,
            config.slow_consumer_timeout,
            metrics.clone(),
        );
        let rooms = Arc::new(Rooms::new(
            metrics.clone(),
            budget,
            config.slow_consumer_timeout,
            config.send_queue_frames,
        ));
        let nats = match &config.nats_url {
            Some(url) => Some(Arc::new(
                nats::Nats::connect(url, &config, rooms.clone()).await?,
            )),
            None => None,
        };
        // With NATS, the high 32 bits of a connection id are this node's random id, so ids
        // are unique across nodes.
        let first_id = nats.as_ref().map_or(1, |n| (u64::from(n.node) << 32) | 1);
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        if let Some(n) = &nats {
            n.start().await?;
        }
        let per_ip = PerIp::new(
            config.max_connections_per_ip,
            config.max_bytes_per_sec_per_ip,
            config.max_frame_bytes,
        );
        let shared = Arc::new(Shared {
            config,
            rooms,
            per_ip: Arc::new(per_ip),
            next_id: AtomicU64::new(first_id),
            metrics,
            shutdown: shutdown_rx,
            nats,
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(
            listener,
            shared.clone(),
            tls.map(tokio_rustls::TlsAcceptor::from),
        ));
        Ok(Self {
            local_addr,
            metrics_addr: None,
            shared,
            shutdown,
            tasks,
        })
    }

    /// Also serves `GET /metrics` (Prometheus text) and `GET /healthz` on `addr`.
    pub async fn serve_metrics(&mut self, addr: SocketAddr) -> io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        self.metrics_addr = Some(bound);
        self.tasks
            .spawn(metrics_loop(listener, self.shared.clone()));
        Ok(bound)
    }

    /// The address the relay listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The metrics listener's address, when [`RelayServer::serve_metrics`] was called.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The current metrics in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics_text()
    }

    /// The limits in force.
    pub fn config(&self) -> &RelayServerConfig {
        &self.shared.config
    }

    /// Closes every connection with code 1001 (going away), waiting at most 2 s, and stops.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while self
                .shared
                .metrics
                .connections_open
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        if let Some(n) = self.shared.nats.as_ref() {
            n.stop().await;
        }
        self.tasks.shutdown().await;
    }

    /// Serves until the process ends.
    pub async fn run_forever(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut conns = JoinSet::new();
    let mut shutdown = shared.shutdown.clone();
    let mut backoff = accept::Backoff::new();
    loop {
        tokio::select! {
            (stream, peer) = accept::accept(&listener, &mut backoff, "relay") => {
                    let slot = shared.per_ip.take(peer.ip());
                    if slot.far_over_limit {
                        // Twice the per-IP limit: refused before it costs a task (the first
                        // ones over the limit get their 429).
                        shared.metrics.dropped(DropReason::PerIpLimit);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    match &tls {
                        None => {
                            conns.spawn(upgrade::handle(shared.clone(), stream, peer, slot));
                        }
                        Some(acceptor) => {
                            let (acceptor, shared) = (acceptor.clone(), shared.clone());
                            conns.spawn(async move {
                                let limit = shared.config.handshake_timeout;
                                match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                                    Ok(Ok(tls)) => upgrade::handle(shared, tls, peer, slot).await,
                                    Ok(Err(e)) => {
                                        shared.metrics.dropped(DropReason::BadUpgrade);
                                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    }
                                    Err(_) => shared.metrics.dropped(DropReason::HandshakeTimeout),
                                }
                            });
                        }
                    }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = shutdown.changed() => {
                // Connections see the same signal and close themselves; wait for them.
                while conns.join_next().await.is_some() {}
                return;
            }
        }
    }
}

/// Most metrics requests served at once: a scraper sends one at a time; more are closed at
/// once, without a task.
const MAX_METRICS_CONNECTIONS: usize = 16;

async fn metrics_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    let mut backoff = accept::Backoff::new();
    loop {
        tokio::select! {
            (stream, _) = accept::accept(&listener, &mut backoff, "metrics") => {
                if conns.len() < MAX_METRICS_CONNECTIONS {
                    conns.spawn(serve_metrics_request(stream, shared.clone()));
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// The Prometheus text exposition format, version 0.0.4.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn serve_metrics_request(stream: TcpStream, shared: Arc<Shared>) {
    use hyper::StatusCode;
    let served = http::serve(stream, |req| match req.uri().path() {
        "/metrics" => {
            let mut resp = http::text(StatusCode::OK, &[], shared.metrics_text());
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(METRICS_CONTENT_TYPE),
            );
            resp
        }
        "/healthz" => http::text(StatusCode::OK, &[], "ok".into()),
        _ => http::text(
            StatusCode::NOT_FOUND,
            &[],
            "try /metrics or /healthz\n".into(),
        ),
    });
    let _ = tokio::time::timeout(shared.config.handshake_timeout, served).await;
}
