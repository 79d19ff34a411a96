//! The running node, the owner of everything: it starts the data socket, the QUIC endpoint
//! and the DHT node, holds the parts (each in its own file below), spawns and owns every
//! task, and shuts it all down.
//!
//! | part | owns |
//! |---|---|
//! | `topics.rs` | the joined topics: psk, accept queue, announce and discovery tasks |
//! | `sessions.rs` | the one live connection per topic and peer; settling a connection |
//! | `duplicate.rs` | the pure one-connection-per-peer rule (`decide`, `obey`) |
//! | `book.rs` | the pure address book: verified peers, backoff, tiers, own addresses |
//! | `dialer.rs` | dial slots, dials and checks in flight, the `InFlight` guard |
//! | `candidates.rs` | candidates of any source to dials (`DialRound`) and `lookup` checks |
//! | `handshake.rs` | dialling: QUIC, probes, info-hash, Noise XXpsk0; typed causes |
//! | `respond.rs` | answering: admission of each Initial, the responder's handshake, records |
//! | `admission.rs` | pure: who may start a handshake (half-open bounds, Retry, rates) |
//! | `limiter.rs` | pure: token buckets per key in a bounded table |
//! | `incoming.rs` | pure: counts of how incoming handshakes end; log lines and summaries |
//! | `discovery.rs` | the DHT: info-hash, bootstrap, announce, `connect`'s loop, `lookup` |
//! | `reflexive.rs` | the public address: KRPC pings and their pure majority tally |
//! | `lan.rs` | LAN discovery's driver: the multicast socket, interfaces, candidates to dial rounds |
//! | `lan_machine.rs` | pure: LAN announces, queries and answers, packet checks, the candidate table |
//! | `offline.rs` | no DHT while LAN discovery runs: `announce` succeeds, warns once, retries |
//! | `relay_rooms.rs` | pure: with a relay path, each topic's room: joined or not, its members' virtual addresses |
//! | `relayed.rs` | with a relay path (Auto mode): its events, dialling room members, `announce`/`connect`/`lookup` over the relay and the DHT |
//! | `path_state.rs` | pure: one relay-made connection's path choice: candidates, probes, proven, silent, back to the relay |
//! | `upgrade.rs` | the path choice's driver: candidates over the connection, probes over UDP, switching the data socket |
//! | `route_share.rs` | pure: a direct-made connection's peers telling each other their relay routes |
//! | `direct_made.rs` | the driver of a direct-made connection's fallback to the relay and back |
//! | `path_board.rs` | every connection's current path and the broadcast of changes |
//!
//! `topics`, `sessions`, `book` and `relay` live under one lock ([`Node::state`]); the dialer
//! and the reflexive learner have their own, and so do admission and the incoming record.
//! Lock order: the dialer's in-flight lock, then the state; admission and the record are
//! taken alone.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mainline::async_dht::AsyncDht;
use pluresdb_sync_core::{Error, TopicHash};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::HyperswarmError;
use crate::config::Settings;
use crate::conn::code;
use crate::error::BootstrapNode;
use crate::quic;
use crate::socket::DataSocket;

mod admission;
mod book;
mod candidates;
mod dialer;
mod direct_made;
mod discovery;
mod duplicate;
mod handshake;
mod incoming;
mod lan;
pub(crate) mod lan_machine;
mod limiter;
mod offline;
mod path_board;
pub(crate) mod path_state;
mod reflexive;
mod relay_rooms;
mod relayed;
mod respond;
mod route_share;
mod sessions;
mod topics;
mod upgrade;

use admission::Admission;
use incoming::Record;

use book::AddressBook;
use candidates::WarnLimit;
use dialer::{Dialer, MAX_CONCURRENT_DIALS};
use lan::Lan;
pub use lan_machine::LanStats;
pub(crate) use path_board::PathBoard;
use reflexive::Reflexive;
use relay_rooms::RelayRooms;
use sessions::Sessions;
use topics::Topics;

/// What the node knows, under one lock: decisions about sessions read the topics and the
/// address book at the same moment.
struct State {
    topics: Topics,
    sessions: Sessions,
    book: AddressBook,
    relay: RelayRooms,
}

pub(crate) struct Node {
    settings: Arc<Settings>,
    public_key: [u8; 32],
    endpoint: quinn::Endpoint,
    /// The UDP socket under `endpoint`, for probes and KRPC pings.
    data: Arc<DataSocket>,
    /// The data socket's public address as DHT nodes report it.
    reflexive: Reflexive,
    local_addr: SocketAddr,
    /// The DHT node (`None` when the DHT is off).
    dht: Option<AsyncDht>,
    /// Woken when a relay room is joined (with a relay path).
    relay_joined: tokio::sync::Notify,
    /// Counts the relay path's events (direct-made connections watch their routes with it).
    relay_epoch: tokio::sync::watch::Sender<u64>,
    /// The bootstrap nodes and what they resolved to (given to the DHT node as addresses).
    bootstrap: Vec<BootstrapNode>,
    state: Mutex<State>,
    tasks: Mutex<JoinSet<()>>,
    shutdown: CancellationToken,
    /// Dial slots and the dials in flight.
    dialer: Arc<Dialer>,
    /// Rate limit of "cannot reach a peer" warnings.
    unreachable_warnings: Mutex<WarnLimit>,
    /// LAN discovery (`None` when off or bound to loopback).
    lan: Option<Lan>,
    /// Who may start an incoming handshake now.
    admission: Mutex<Admission>,
    /// How incoming handshakes ended; `incoming_changed` wakes the summary writer.
    incoming: Mutex<Record>,
    incoming_changed: tokio::sync::Notify,
    /// Every connection's path (shared with the transport).
    board: Arc<PathBoard>,
    /// Where path probes of relay-made connections go.
    probe_routes: Mutex<upgrade::ProbeRoutes>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Binds the data socket, starts the DHT node and the QUIC endpoint.
    pub(crate) async fn start(
        settings: Arc<Settings>,
        board: Arc<PathBoard>,
    ) -> anyhow::Result<Arc<Node>> {
        let s = settings.clone();
        let bind = settings.bind;
        let start_failed = |reason: String| HyperswarmError::Start {
            bind: bind.to_string(),
            reason,
        };
        // Binding and the DHT's bootstrap name resolution block: keep them off the runtime.
        let started = tokio::time::timeout(
            settings.timeout,
            tokio::task::spawn_blocking(move || -> Result<_, String> {
                let socket = quic::bind_socket(s.bind)
                    .map_err(|e| format!("cannot bind the UDP data socket: {e}"))?;
                let (dht, bootstrap) = if s.dht {
                    let (dht, bootstrap) = discovery::start_dht(&s)?;
                    (Some(dht), bootstrap)
                } else {
                    (None, Vec::new())
                };
                Ok((socket, dht, bootstrap))
            }),
        )
        .await
        .map_err(|_| Error::Timeout {
            what: "starting the DHT node (resolving bootstrap nodes)".into(),
            ms: settings.timeout.as_millis() as u64,
        })?
        .map_err(|e| start_failed(e.to_string()))?
        .map_err(start_failed)?;
        let (socket, dht, bootstrap) = started;
        let endpoint =
            quic::endpoint(&settings, socket).map_err(|e| start_failed(e.to_string()))?;
        let (endpoint, data, diverted) = endpoint;
        let local_addr = endpoint.local_addr()?;
        let announce_port = settings.announce_port;
        let lan = Lan::new(&settings, local_addr);
        let node = Arc::new(Node {
            public_key: settings.identity.public_bytes(),
            settings,
            endpoint,
            data,
            reflexive: Reflexive::default(),
            local_addr,
            dht: dht.map(|d| d.as_async()),
            relay_joined: tokio::sync::Notify::new(),
            relay_epoch: tokio::sync::watch::Sender::new(0),
            bootstrap,
            state: Mutex::new(State {
                topics: Topics::default(),
                sessions: Sessions::default(),
                book: AddressBook::new(local_addr, announce_port),
                relay: RelayRooms::default(),
            }),
            tasks: Mutex::new(JoinSet::new()),
            shutdown: CancellationToken::new(),
            dialer: Dialer::new(MAX_CONCURRENT_DIALS),
            unreachable_warnings: Mutex::new(WarnLimit::default()),
            lan,
            admission: Mutex::new(Admission::default()),
            incoming: Mutex::new(Record::default()),
            incoming_changed: tokio::sync::Notify::new(),
            board,
            probe_routes: Mutex::default(),
        });
        let accepting = node.clone();
        node.spawn(async move { accepting.accept_loop().await });
        let handler = node.clone();
        node.spawn(async move { handler.handle_diverted(diverted).await });
        if node.lan.is_some() {
            node.spawn(node.clone().lan_driver());
        }
        if let Some(path) = node.settings.relay.clone() {
            let events = node.clone();
            node.spawn(async move { events.relay_events(path).await });
        }
        tracing::debug!(addr = %local_addr, peer = %node.settings.identity.peer_id(), "hyperswarm node started");
        Ok(node)
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The data socket (the testkit's fault injection reaches its blackhole through this).
    #[cfg(feature = "testkit")]
    pub(crate) fn data_socket(&self) -> &DataSocket {
        &self.data
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way that
        // matters more than stopping all networking would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `fut` as a task of this node: it ends at shutdown at the latest.
    fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) -> AbortHandle {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        while tasks.try_join_next().is_some() {}
        let token = self.shutdown.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = fut => {}
            }
        })
    }

    /// Stops everything: no more announcing, every connection closed, receivers ended.
    pub(crate) fn shutdown(&self) {
        self.shutdown.cancel();
        if let Some(path) = &self.settings.relay {
            path.close();
        }
        self.endpoint.close(code::DISCONNECT, b"disconnect");
        {
            let mut st = self.state();
            st.topics.clear();
            st.sessions.clear();
        }
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.abort_all();
    }

    /// Waits (bounded) until the endpoint has told every peer it closed.
    pub(crate) async fn wait_closed(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    fn unreachable_warnings(&self) -> MutexGuard<'_, WarnLimit> {
        self.unreachable_warnings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn admission(&self) -> MutexGuard<'_, Admission> {
        self.admission.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn incoming(&self) -> MutexGuard<'_, Record> {
        self.incoming.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn incoming_stats(&self) -> crate::IncomingStats {
        self.incoming().stats()
    }

    fn register_topic(&self, topic: TopicHash) {
        self.state().topics.join(topic);
    }

    pub(crate) fn public_addr(&self) -> Option<SocketAddr> {
        self.reflexive.public().map(SocketAddr::V4)
    }

    pub(crate) fn dial_failures(&self) -> Vec<crate::DialFailure> {
        self.state().book.dial_failures()
    }

    pub(crate) fn path_stats(&self) -> crate::relay_path::PathStats {
        let c = &self.data.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        crate::relay_path::PathStats {
            relayed_out: get(&c.relayed_out),
            relayed_in: get(&c.relayed_in),
            direct_blocked: get(&c.direct_blocked),
            unroutable: get(&c.unroutable),
            upgraded_out: get(&c.upgraded_out),
            upgraded_out_bytes: get(&c.upgraded_out_bytes),
            upgraded_in: get(&c.upgraded_in),
            upgraded_in_bytes: get(&c.upgraded_in_bytes),
            doubled_out: get(&c.doubled_out),
            fallback_routes: self.data.fallbacks().len() as u64,
        }
    }

    pub(crate) fn verified_addresses(&self) -> Vec<(String, crate::relay_path::PeerAddress)> {
        use crate::relay_path::PeerAddress;
        let verified = self.state().book.verified_peers();
        verified
            .into_iter()
            .map(|(addr, peer)| {
                let at = match self.data.routes().route(&addr) {
                    Some(route) => PeerAddress::Relayed(self.describe_route(&route)),
                    None if crate::path::is_virtual(&addr) => {
                        PeerAddress::Relayed("relay (route gone)".into())
                    }
                    None => PeerAddress::Direct(addr),
                };
                (hex::encode(peer), at)
            })
            .collect()
    }

    pub(crate) fn paths(&self) -> Vec<crate::relay_path::PathInfo> {
        self.board.snapshot()
    }

    pub(crate) fn probes_received(&self) -> u64 {
        self.data
            .counters
            .probes
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}
