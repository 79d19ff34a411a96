//! The relay server: rooms of WebSocket clients that forward opaque frames to each other.
//!
//! Stateless beyond live sockets: a room is the set of connections that joined it, and goes
//! away with them. Any relay can serve any client; a restart loses only the live sockets.
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

mod config;
mod conn;
mod http;
mod metrics;
mod nats;
mod outbox;

pub use nats::{
    NATS_CLIENT_CAPACITY, NATS_CONNECT_TIMEOUT, NATS_HEARTBEAT_INTERVAL, NATS_MAX_NODES,
    NATS_NODE_TIMEOUT, NATS_PUBLISH_TIMEOUT, NATS_SUBSCRIPTION_CAPACITY,
};

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use config::*;

use crate::protocol::{ConnId, RoomId};
use metrics::Metrics;

type IpEntry = (usize, Arc<Mutex<Bucket>>);

/// A member of a room, as other connections see it.
#[derive(Clone, Debug)]
struct Member {
    tx: tokio::sync::mpsc::Sender<outbox::Batch>,
    kill: Arc<watch::Sender<Option<(u16, String)>>>,
}

#[derive(Debug)]
struct Shared {
    config: RelayServerConfig,
    rooms: Mutex<HashMap<RoomId, HashMap<ConnId, Member>>>,
    /// Open connections and the shared byte-rate bucket of each client IP.
    per_ip: Mutex<HashMap<IpAddr, IpEntry>>,
    next_id: std::sync::atomic::AtomicU64,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
    /// The bus to the other relay nodes, with `nats_url`.
    nats: Option<nats::Nats>,
}

impl Shared {
    fn rooms(&self) -> MutexGuard<'_, HashMap<RoomId, HashMap<ConnId, Member>>> {
        // A panic while holding the lock cannot leave the map inconsistent in a way that
        // matters more than losing the relay, so poisoning is ignored.
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn metrics_text(&self) -> String {
        let rooms = self.rooms().len();
        self.metrics
            .render(rooms, self.nats.as_ref().map(|n| &*n.metrics))
    }
}

/// Counts a connection against its IP's limit until dropped.
struct IpSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
    over_limit: bool,
    /// The IP's byte-rate bucket, shared by all its connections.
    bucket: Arc<Mutex<Bucket>>,
}

impl IpSlot {
    fn take(shared: &Arc<Shared>, ip: IpAddr) -> Self {
        let mut map = shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let (n, bucket) = map.entry(ip).or_insert_with(|| {
            let rate = shared.config.max_bytes_per_sec_per_ip.unwrap_or(0);
            (
                0,
                Arc::new(Mutex::new(Bucket::new(rate, shared.config.max_frame_bytes))),
            )
        });
        *n += 1;
        let over_limit = *n > shared.config.max_connections_per_ip;
        Self {
            shared: shared.clone(),
            ip,
            over_limit,
            bucket: bucket.clone(),
        }
    }

    /// Charges `bytes` read; returns how long to pause reading (zero when within the rate).
    fn charge(&self, bytes: usize) -> std::time::Duration {
        if self.shared.config.max_bytes_per_sec_per_ip.is_none() {
            return std::time::Duration::ZERO;
        }
        self.bucket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(bytes as f64, std::time::Instant::now())
    }
}

/// A token bucket of bytes: `rate` per second, holding at most one second's worth (and at
/// least two frames, so one frame can always pass).
#[derive(Debug)]
struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl Bucket {
    fn new(rate: u64, max_frame: usize) -> Self {
        let rate = rate as f64;
        let capacity = rate.max(2.0 * max_frame as f64);
        Self {
            rate,
            capacity,
            tokens: capacity,
            last: std::time::Instant::now(),
        }
    }

    fn take(&mut self, bytes: f64, now: std::time::Instant) -> std::time::Duration {
        if self.rate <= 0.0 {
            return std::time::Duration::ZERO;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity) - bytes;
        if self.tokens >= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, _)) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

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
        let nats = match &config.nats_url {
            Some(url) => Some(nats::Nats::connect(url, &config.nats_subject_prefix).await?),
            None => None,
        };
        // With NATS, the high 32 bits of a connection id are this node's random id, so ids
        // are unique across nodes.
        let first_id = nats.as_ref().map_or(1, |n| (u64::from(n.node) << 32) | 1);
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            config,
            rooms: Mutex::default(),
            per_ip: Mutex::default(),
            next_id: std::sync::atomic::AtomicU64::new(first_id),
            metrics: Metrics::default(),
            shutdown: shutdown_rx,
            nats,
        });
        nats::Nats::start(&shared).await?;
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
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let slot = IpSlot::take(&shared, peer.ip());
                    match &tls {
                        None => {
                            conns.spawn(conn::handle(shared.clone(), stream, peer, slot));
                        }
                        Some(acceptor) => {
                            let (acceptor, shared) = (acceptor.clone(), shared.clone());
                            conns.spawn(async move {
                                let limit = shared.config.handshake_timeout;
                                match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                                    Ok(Ok(tls)) => conn::handle(shared, tls, peer, slot).await,
                                    Ok(Err(e)) => {
                                        shared.metrics.drop(metrics::Drop::BadUpgrade);
                                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    }
                                    Err(_) => shared.metrics.drop(metrics::Drop::HandshakeTimeout),
                                }
                            });
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "relay accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
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

async fn metrics_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    conns.spawn(serve_metrics_request(stream, shared.clone()));
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_metrics_request(mut stream: TcpStream, shared: Arc<Shared>) {
    let head = tokio::time::timeout(
        shared.config.handshake_timeout,
        http::read_head(&mut stream),
    )
    .await;
    let Ok(Ok((head, _))) = head else { return };
    match head.path.as_str() {
        "/metrics" => {
            let body = shared.metrics_text();
            http::respond(&mut stream, "200 OK", "", &body).await;
        }
        "/healthz" => http::respond(&mut stream, "200 OK", "", "ok").await,
        _ => {
            http::respond(
                &mut stream,
                "404 Not Found",
                "",
                "try /metrics or /healthz\n",
            )
            .await
        }
    }
}

/// A rustls server configuration (ring, TLS 1.2 and 1.3) from PEM files: a certificate chain
/// and its private key (PKCS#8, PKCS#1 or SEC1).
pub fn tls_config_from_pem(
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, crate::RelayError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |name: &'static str, path: &std::path::Path, reason: String| {
        crate::RelayError::InvalidSetting {
            name,
            value: path.display().to_string(),
            reason,
        }
    };
    let certs = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| bad("tls_cert", cert_path, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("tls_cert", cert_path, e.to_string()))?;
    if certs.is_empty() {
        return Err(bad(
            "tls_cert",
            cert_path,
            "no certificate in the file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| bad("tls_key", key_path, e.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad("tls_cert", cert_path, e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| bad("tls_key", key_path, e.to_string()))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn bucket_pauses_after_the_burst_and_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, 100); // capacity 1000 bytes
        b.last = t0;
        assert_eq!(b.take(1000.0, t0), Duration::ZERO);
        let wait = b.take(500.0, t0);
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // One second later the debt is paid and 500 more are available.
        assert_eq!(b.take(500.0, t0 + Duration::from_secs(1)), Duration::ZERO);
        // Never more than the capacity after a long idle.
        let wait = b.take(1500.0, t0 + Duration::from_secs(100));
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        let mut off = Bucket::new(0, 100);
        assert_eq!(off.take(1e9, t0), Duration::ZERO);
    }
}
