//! `RelayTransport`: the client side of relay mode, and the map of its parts.
//!
//! - [`builder`]: settings and their defaults.
//! - [`dial`] (with [`proxy`]): opening a relay socket up to its WELCOME.
//! - [`supervisor`]: the task that owns the link: one socket at a time, the writer, pings and
//!   the idle timeout, reconnects with backoff.
//! - [`driver`]: executes what the session machine decides; [`outbound`] queues its frames.
//! - [`machine`], [`room`] (with [`room_ctx`]), [`session`], [`handshake`], [`reject_limit`],
//!   [`handshake_limit`], [`refusal_log`]: the pure session machine (rooms, per-peer
//!   sessions, the handshake patterns, rate limits), speaking [`action`]s;
//!   [`legacy`]: telling session versions apart; [`noise_crypto`]: the X25519 its
//!   handshakes run on (lazy, counted).
//! - [`wire`] (peer frames) and [`flow`] (windows): pure formats and arithmetic.
//! - [`connection`]: the application's `Connection` (chunking, sealing, reassembly).
//! - [`datagram`] (with [`link_machine`] and [`link_socket`]): the datagram link of relay
//!   protocol v2, a path for QUIC packets (Auto mode): rooms, membership, datagrams.

mod action;
mod builder;
mod coalesce;
mod connection;
mod datagram;
mod dial;
mod driver;
mod flow;
mod handshake;
mod handshake_limit;
mod legacy;
mod link_machine;
mod link_socket;
mod machine;
mod noise_crypto;
mod outbound;
mod proxy;
mod refusal_log;
mod reject_limit;
mod room;
mod room_ctx;
mod session;
mod supervisor;
mod wire;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pluresdb_sync_core::{Connection, Error, PeerInfo, TopicHash, Transport, TransportConfig};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::RelayError;
use driver::{Cmd, Driver};

pub use builder::RelayTransportBuilder;
pub use datagram::{
    Datagram, DatagramLink, LINK_DATAGRAM_QUEUE, LINK_EVENT_QUEUE, LinkEvent, LinkReceivers,
    LinkStats, MAX_LINK_ROOMS, datagrams_of,
};
pub use flow::FLOW_WINDOW_BYTES;
pub use wire::SESSION_VERSION;

/// Recent session errors kept for [`RelayTransport::recent_errors`].
const MAX_RECENT_ERRORS: usize = 32;
/// Requests from the application queued towards the socket task.
const COMMAND_QUEUE: usize = 64;
/// How long `disconnect` waits for the socket task to close every session and the socket.
const DISCONNECT_WAIT: Duration = Duration::from_secs(5);

/// The most recent errors, shared by the transport and its socket task.
#[derive(Clone, Default)]
pub(crate) struct ErrorLog(Arc<Mutex<VecDeque<RelayError>>>);

impl ErrorLog {
    /// Logs `e` (about relay `url`) and keeps it, dropping the oldest beyond
    /// [`MAX_RECENT_ERRORS`].
    pub(crate) fn record(&self, url: &str, e: RelayError) {
        tracing::warn!(relay = %url, "{e}");
        let mut errors = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if errors.len() == MAX_RECENT_ERRORS {
            errors.pop_front();
        }
        errors.push_back(e);
    }

    pub(crate) fn snapshot(&self) -> Vec<RelayError> {
        let errors = self.0.lock().unwrap_or_else(|p| p.into_inner());
        errors.iter().cloned().collect()
    }
}

struct Link {
    cmds: mpsc::Sender<Cmd>,
    task: JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Slot {
    Idle,
    Up(Link),
    Disconnected,
}

/// The relay transport: peers meet in a room on a WebSocket relay, and talk over end-to-end
/// encrypted (Noise XXpsk0) sessions carried through it. See the [crate docs](crate).
pub struct RelayTransport {
    settings: Arc<builder::Settings>,
    slot: tokio::sync::Mutex<Slot>,
    errors: ErrorLog,
    mults: noise_crypto::ScalarMults,
}

impl std::fmt::Debug for RelayTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayTransport")
            .field("peer_id", &self.settings.identity.peer_id())
            .field("relays", &self.settings.urls.len())
            .field("encryption", &self.settings.encryption)
            .finish_non_exhaustive()
    }
}

impl RelayTransport {
    /// A builder for identity, several relay URLs, an auth token and more.
    pub fn builder() -> RelayTransportBuilder {
        RelayTransportBuilder::default()
    }

    /// The transport `config` describes (its `relay_url`, `timeout_ms` and `encryption`), with
    /// a new random identity. Cheap and synchronous.
    pub fn from_config(config: &TransportConfig) -> Result<Self, RelayError> {
        RelayTransportBuilder::from_config(config)?.build()
    }

    fn with_settings(settings: Arc<builder::Settings>) -> Self {
        Self {
            settings,
            slot: tokio::sync::Mutex::new(Slot::Idle),
            errors: ErrorLog::default(),
            mults: noise_crypto::ScalarMults::default(),
        }
    }

    /// Scalar multiplications (X25519 Diffie-Hellman and key derivations) this transport's
    /// handshakes did so far.
    #[cfg(feature = "testkit")]
    pub(crate) fn scalar_mults(&self) -> u64 {
        self.mults.get()
    }

    /// This transport's peer id (the hex of its Noise static public key).
    pub fn peer_id(&self) -> String {
        self.settings.identity.peer_id()
    }

    /// The most recent session and relay errors (handshake failures, encryption mismatches,
    /// refused requests, lost sockets), oldest first; at most 32 are kept. A session failure
    /// is [`RelayError::Session`], whose [`SessionError`](crate::SessionError) cause says why.
    pub fn recent_errors(&self) -> Vec<RelayError> {
        self.errors.snapshot()
    }

    async fn cmds(&self) -> anyhow::Result<mpsc::Sender<Cmd>> {
        let mut slot = self.slot.lock().await;
        if let Slot::Up(link) = &*slot
            && !link.task.is_finished()
        {
            return Ok(link.cmds.clone());
        }
        if matches!(*slot, Slot::Disconnected) {
            return Err(Error::TransportDisconnected { transport: "relay" }.into());
        }
        let link = self.open_link().await?;
        let cmds = link.cmds.clone();
        *slot = Slot::Up(link);
        Ok(cmds)
    }

    /// Connects to the first relay that answers and starts the task that owns the link.
    async fn open_link(&self) -> Result<Link, RelayError> {
        let socket = dial::connect_any(&self.settings, 0).await?;
        let (cmds, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let s = &self.settings;
        let config = machine::Config::new(
            s.identity.clone(),
            s.encryption,
            s.timeout,
            self.mults.clone(),
        );
        let (driver, ctl) = Driver::new(config, self.errors.clone());
        let task = tokio::spawn(supervisor::supervise(
            self.settings.clone(),
            driver,
            ctl,
            socket,
            cmd_rx,
        ));
        Ok(Link { cmds, task })
    }

    /// Sends `cmd` and waits (within the timeout) for its answer.
    async fn ask<T>(&self, cmd: Cmd, wait: oneshot::Receiver<T>, what: &str) -> anyhow::Result<T> {
        let cmds = self.cmds().await?;
        cmds.send(cmd)
            .await
            .map_err(|_| Error::TransportDisconnected { transport: "relay" })?;
        match tokio::time::timeout(self.settings.timeout, wait).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(Error::TransportDisconnected { transport: "relay" }.into()),
            Err(_) => Err(Error::Timeout {
                what: what.into(),
                ms: self.settings.timeout.as_millis() as u64,
            }
            .into()),
        }
    }

    async fn join(
        &self,
        topic: TopicHash,
        conns: Option<mpsc::Sender<Box<dyn Connection>>>,
    ) -> anyhow::Result<()> {
        let (done, wait) = oneshot::channel();
        let cmd = Cmd::Join { topic, conns, done };
        Ok(self.ask(cmd, wait, "joining the relay room").await??)
    }
}

#[async_trait]
impl Transport for RelayTransport {
    async fn connect(
        &mut self,
        topic: TopicHash,
    ) -> anyhow::Result<mpsc::Receiver<Box<dyn Connection>>> {
        let (tx, rx) = mpsc::channel(driver::CONNECTION_QUEUE);
        self.join(topic, Some(tx)).await?;
        Ok(rx)
    }

    async fn announce(&mut self, topic: TopicHash) -> anyhow::Result<()> {
        self.join(topic, None).await
    }

    async fn lookup(&self, topic: TopicHash) -> anyhow::Result<Vec<PeerInfo>> {
        let (reply, wait) = oneshot::channel();
        self.ask(Cmd::Lookup { topic, reply }, wait, "relay lookup")
            .await
    }

    /// Closes every session (each peer is sent CLOSE, so its `receive` returns `Ok(None)` at
    /// once) and the relay socket. Later calls fail with `TransportDisconnected`.
    async fn disconnect(&mut self) -> anyhow::Result<()> {
        let mut slot = self.slot.lock().await;
        if let Slot::Up(link) = std::mem::replace(&mut *slot, Slot::Disconnected) {
            let (done, wait) = oneshot::channel();
            if link.cmds.send(Cmd::Disconnect { done }).await.is_ok() {
                let _ = tokio::time::timeout(DISCONNECT_WAIT, wait).await;
            }
        }
        Ok(())
    }

    fn name(&self) -> &str {
        "relay"
    }
}
