//! Setup shared by the relay integration tests: the testkit's relay server and raw protocol
//! client (panicking on failure, as tests want), transports and their connections, and timed
//! waits. Each test binary uses a part.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pluresdb_sync_core::testkit::TransportFactory;
use pluresdb_sync_core::{Connection, Transport};
use pluresdb_sync_transport_relay::protocol::{Frame, RoomId, SUBPROTOCOL};
use pluresdb_sync_transport_relay::server::{RelayServer, RelayServerConfig};
use pluresdb_sync_transport_relay::testkit::{self, raw};
use pluresdb_sync_transport_relay::{RelayError, RelayTransport};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::client::{Request, Response};

pub(crate) use pluresdb_sync_transport_relay::testkit::raw::Ws;
pub(crate) use pluresdb_sync_transport_relay::testkit::{url, ws_url};

/// How long any single network wait may take before the test fails.
pub(crate) const T: Duration = testkit::WAIT;

/// A relay server with the default configuration on a free loopback port, and its URL.
pub(crate) async fn relay() -> (RelayServer, String) {
    relay_with(RelayServerConfig::default()).await
}

/// A relay server with `config` on a free loopback port, and its URL.
pub(crate) async fn relay_with(config: RelayServerConfig) -> (RelayServer, String) {
    testkit::relay_with(config).await.unwrap()
}

/// A transport with default settings (encrypted) on `url`.
pub(crate) fn transport(url: &str) -> RelayTransport {
    RelayTransport::builder().relay_url(url).build().unwrap()
}

/// Builds a transport on relay `i % servers.len()` for the conformance kit.
pub(crate) struct Factory {
    pub(crate) servers: Arc<Vec<RelayServer>>,
    pub(crate) encryption: bool,
}

#[async_trait]
impl TransportFactory for Factory {
    async fn create(&self, n: usize) -> anyhow::Result<Vec<Box<dyn Transport>>> {
        (0..n)
            .map(|i| {
                Ok(Box::new(
                    RelayTransport::builder()
                        .relay_url(url(&self.servers[i % self.servers.len()]))
                        .encryption(self.encryption)
                        .timeout(T)
                        .build()?,
                ) as Box<dyn Transport>)
            })
            .collect()
    }
}

/// The next connection from a `connect` receiver.
pub(crate) async fn accept(rx: &mut mpsc::Receiver<Box<dyn Connection>>) -> Box<dyn Connection> {
    tokio::time::timeout(T, rx.recv())
        .await
        .expect("no connection in time")
        .expect("the connection receiver ended")
}

/// What the next `receive` returns: a message, or `None` once the connection closed.
pub(crate) async fn next_message(c: &mut Box<dyn Connection>) -> Option<Vec<u8>> {
    tokio::time::timeout(T, c.receive())
        .await
        .expect("receive timed out")
        .unwrap()
}

/// The next message (the connection must still be open).
pub(crate) async fn recv(c: &mut Box<dyn Connection>) -> Vec<u8> {
    next_message(c).await.expect("connection closed")
}

/// Waits until `t` reported an error whose message contains `needle`; returns it.
pub(crate) async fn wait_for_error(t: &RelayTransport, needle: &str) -> RelayError {
    let deadline = Instant::now() + T;
    loop {
        if let Some(e) = t
            .recent_errors()
            .into_iter()
            .find(|e| e.to_string().contains(needle))
        {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no error containing {needle:?}: {:?}",
            errors(t)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The messages of `t`'s recent errors.
pub(crate) fn errors(t: &RelayTransport) -> Vec<String> {
    t.recent_errors().iter().map(ToString::to_string).collect()
}

/// A loopback port that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether something accepts TCP connections on loopback `port` within `within`.
pub(crate) async fn listening(port: u16, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A WebSocket upgrade request for `url` that offers the relay subprotocol.
pub(crate) fn upgrade_request(url: &str) -> Request {
    raw::upgrade_request(url, Some(SUBPROTOCOL), None).unwrap()
}

/// A raw WebSocket to the relay at `addr`, offering the relay subprotocol, and the upgrade
/// response.
pub(crate) async fn raw_connect(addr: SocketAddr) -> (Ws, Response) {
    raw::connect(&ws_url(addr)).await.unwrap()
}

/// Reads the WELCOME: the connection id and the announced frame limit.
pub(crate) async fn welcome(ws: &mut Ws) -> (u64, u32) {
    raw::welcome(ws).await.unwrap()
}

/// A raw protocol client on the relay at `addr`, after its WELCOME, and its connection id.
pub(crate) async fn raw(addr: SocketAddr) -> (Ws, u64) {
    raw::client(&ws_url(addr)).await.unwrap()
}

/// The next relay frame (binary messages only).
pub(crate) async fn next(ws: &mut Ws) -> Frame {
    raw::next(ws).await.unwrap()
}

/// Sends one frame.
pub(crate) async fn send(ws: &mut Ws, f: Frame) {
    raw::send(ws, f).await.unwrap()
}

/// Joins `room`; returns the members JOINED lists.
pub(crate) async fn joined(ws: &mut Ws, room: RoomId) -> Vec<u64> {
    raw::joined(ws, room).await.unwrap()
}

/// The value of the first metric line of `server` starting with `line_start` (a name with
/// its labels).
pub(crate) fn metric(server: &RelayServer, line_start: &str) -> u64 {
    let text = server.metrics_text();
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in {text}"))
}

/// The count of one `pluresdb_relay_drops_total` reason.
pub(crate) fn drops(server: &RelayServer, reason: &str) -> u64 {
    metric(
        server,
        &format!("pluresdb_relay_drops_total{{reason=\"{reason}\"}}"),
    )
}
