//! The running node: data socket + QUIC endpoint, DHT node, topics and sessions.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use mainline::async_dht::AsyncDht;
use pluresdb_sync_core::topic::{Domain, derive_from_topic};
use pluresdb_sync_core::{Connection, Error, PeerInfo, TopicHash};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::HyperswarmError;
use crate::config::{FIRST_LOOKUP_INTERVAL, Settings};
use crate::conn::code;
use crate::error::BootstrapNode;
use crate::quic;
use crate::socket::DataSocket;

mod book;
mod candidates;
mod dialer;
mod duplicate;
mod handshake;
mod reflexive;
mod sessions;
mod topics;

use book::AddressBook;
use candidates::{DialRound, LOOKUP_CHECK_BUDGET, MAX_LOOKUP_CANDIDATES, WarnLimit};
use dialer::{Dialer, MAX_CONCURRENT_DIALS};
use reflexive::Reflexive;
use sessions::Sessions;
use topics::Topics;

/// Re-announce interval while the public address is still unknown.
const UNKNOWN_ADDR_RETRY: Duration = Duration::from_secs(5);

/// The 20-byte DHT info-hash of a topic: a domain-separated hash, so the topic stays private.
pub(crate) fn info_hash(topic: &TopicHash) -> mainline::Id {
    let derived = derive_from_topic(topic, Domain::DhtInfoHash);
    let mut id = [0u8; 20];
    id.copy_from_slice(&derived[..20]);
    // `from_bytes` only fails on a length other than 20.
    mainline::Id::from_bytes(id).unwrap_or_else(|_| mainline::Id::random())
}

struct State {
    topics: Topics,
    sessions: Sessions,
    book: AddressBook,
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
    dht: AsyncDht,
    /// The bootstrap nodes and what they resolved to (given to the DHT node as addresses).
    bootstrap: Vec<BootstrapNode>,
    state: Mutex<State>,
    tasks: Mutex<JoinSet<()>>,
    shutdown: CancellationToken,
    /// Dial slots and the dials in flight.
    dialer: Arc<Dialer>,
    /// Rate limit of "cannot reach a peer" warnings.
    unreachable_warnings: Mutex<WarnLimit>,
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
    pub(crate) async fn start(settings: Arc<Settings>) -> anyhow::Result<Arc<Node>> {
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
                let bootstrap = match &s.bootstrap {
                    Some(nodes) => resolve_bootstrap(nodes),
                    None => resolve_bootstrap(&mainline::DEFAULT_BOOTSTRAP_NODES),
                };
                let resolved: Vec<SocketAddrV4> = bootstrap
                    .iter()
                    .flat_map(|n| n.resolved.iter().copied())
                    .collect();
                let mut b = mainline::Dht::builder();
                b.bind_address(*s.bind.ip()).port(0).bootstrap(&resolved);
                if s.dht_server_mode {
                    b.server_mode();
                }
                if let Some(t) = s.dht_request_timeout {
                    b.request_timeout(t);
                }
                let dht = b
                    .build()
                    .map_err(|e| format!("cannot start the DHT node: {e}"))?;
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
        let node = Arc::new(Node {
            public_key: settings.identity.public_bytes(),
            settings,
            endpoint,
            data,
            reflexive: Reflexive::default(),
            local_addr,
            dht: dht.as_async(),
            bootstrap,
            state: Mutex::new(State {
                topics: Topics::default(),
                sessions: Sessions::default(),
                book: AddressBook::new(local_addr, announce_port),
            }),
            tasks: Mutex::new(JoinSet::new()),
            shutdown: CancellationToken::new(),
            dialer: Dialer::new(MAX_CONCURRENT_DIALS),
            unreachable_warnings: Mutex::new(WarnLimit::default()),
        });
        let accepting = node.clone();
        node.spawn(async move { accepting.accept_loop().await });
        let handler = node.clone();
        node.spawn(async move { handler.handle_diverted(diverted).await });
        tracing::debug!(addr = %local_addr, peer = %node.settings.identity.peer_id(), "hyperswarm node started");
        Ok(node)
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way that
        // matters more than stopping all networking would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

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

    fn timeout_error(&self, what: String) -> anyhow::Error {
        Error::Timeout {
            what,
            ms: self.settings.timeout.as_millis() as u64,
        }
        .into()
    }

    fn bootstrap_text(&self) -> String {
        let nodes: Vec<String> = self.bootstrap.iter().map(ToString::to_string).collect();
        nodes.join(", ")
    }

    /// The error of an operation that found no DHT node to talk to.
    fn unreachable(&self, operation: &'static str, started: Instant) -> anyhow::Error {
        HyperswarmError::DhtUnreachable {
            operation,
            bootstrap: self.bootstrap.clone(),
            elapsed: started.elapsed(),
        }
        .into()
    }

    fn unreachable_warnings(&self) -> MutexGuard<'_, WarnLimit> {
        self.unreachable_warnings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn register_topic(&self, topic: TopicHash) {
        self.state().topics.join(topic);
    }

    /// Announces `topic` now and keeps refreshing it until shutdown.
    pub(crate) async fn announce(self: &Arc<Self>, topic: TopicHash) -> anyhow::Result<()> {
        self.register_topic(topic);
        if self.state().topics.is_announcing(&topic) {
            return Ok(());
        }
        self.announce_once(topic).await?;
        let node = self.clone();
        let handle = self.spawn(async move {
            loop {
                // Until the public address is known, retry soon: the announced port may be
                // the wrong one behind a NAT that does not keep ports.
                let wait = if node.public_addr().is_some() {
                    node.settings.announce_interval
                } else {
                    node.settings.announce_interval.min(UNKNOWN_ADDR_RETRY)
                };
                tokio::time::sleep(wait).await;
                if let Err(e) = node.announce_once(topic).await {
                    tracing::warn!(error = %e, "re-announcing on the DHT failed; retrying later");
                }
            }
        });
        self.state().topics.set_announcing(&topic, handle);
        Ok(())
    }

    async fn announce_once(&self, topic: TopicHash) -> anyhow::Result<()> {
        let started = Instant::now();
        let public = self.learn_public_addr().await;
        let port = self
            .settings
            .announce_port
            .or(public.map(|p| p.port()))
            .unwrap_or(self.local_addr.port());
        match tokio::time::timeout(
            self.settings.timeout,
            self.dht.announce_peer(info_hash(&topic), Some(port)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(mainline::errors::PutQueryError::ErrorResponse(e))) => {
                Err(HyperswarmError::Start {
                    bind: self.local_addr.to_string(),
                    reason: format!("DHT nodes refused the announcement: {e:?}"),
                }
                .into())
            }
            // No node to send it to, or none of them answered.
            Ok(Err(_)) => Err(self.unreachable("announcing", started)),
            Err(_) => Err(self.timeout_error(format!(
                "announcing on the mainline DHT (bootstrap nodes: {})",
                self.bootstrap_text()
            ))),
        }
    }

    /// Joins `topic`: announce, then look up and dial peers periodically.
    pub(crate) async fn connect(
        self: &Arc<Self>,
        topic: TopicHash,
    ) -> anyhow::Result<mpsc::Receiver<Box<dyn Connection>>> {
        self.announce(topic).await?;
        let (tx, rx) = mpsc::channel(self.settings.max_peers);
        let node = self.clone();
        let handle = self.spawn(async move { node.discover(topic).await });
        self.state().topics.set_accepting(&topic, tx, handle);
        Ok(rx)
    }

    /// Looks the topic up periodically and dials every new address: as the DHT's answers
    /// arrive, each batch in [`schedule`] order while dial slots are free; what found no
    /// slot is dialled after the query, in schedule order again, as slots free up, for at
    /// most [`LOOKUP_CHECK_BUDGET`]; addresses `lookup` is checking are dialled after their
    /// check, if it verified them, within the same budget. The rest waits for the next round.
    async fn discover(self: Arc<Self>, topic: TopicHash) {
        let mut interval = FIRST_LOOKUP_INTERVAL;
        loop {
            let mut round = DialRound::new(topic);
            let mut stream = self.dht.get_peers(info_hash(&topic));
            let deadline = tokio::time::Instant::now() + self.settings.timeout;
            while let Ok(Some(batch)) = tokio::time::timeout_at(deadline, stream.next()).await {
                if !round.offer(&self, batch.into_iter().map(SocketAddr::V4)) {
                    break;
                }
            }
            drop(stream);
            let budget = tokio::time::Instant::now() + LOOKUP_CHECK_BUDGET;
            round.finish(&self, budget).await;
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(self.settings.lookup_interval);
        }
    }

    pub(crate) fn public_addr(&self) -> Option<SocketAddr> {
        self.reflexive.public().map(SocketAddr::V4)
    }

    pub(crate) fn dial_failures(&self) -> Vec<crate::DialFailure> {
        self.state().book.dial_failures()
    }

    pub(crate) fn probes_received(&self) -> u64 {
        self.data
            .counters
            .probes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Lists the peers on `topic`: DHT results, each verified by its Noise key.
    ///
    /// Addresses with a live session or verified within [`IDENTIFY_TTL`] are listed at once;
    /// the others are checked in [`schedule`] order, each as soon as a dial slot is its turn
    /// (waiting in one queue with the `connect` loop, so neither starves). Returns when its
    /// checks are done or after [`LOOKUP_CHECK_BUDGET`], with what is verified by then;
    /// checks still running finish in the background for the next lookup.
    pub(crate) async fn lookup(
        self: &Arc<Self>,
        topic: TopicHash,
    ) -> anyhow::Result<Vec<PeerInfo>> {
        self.register_topic(topic);
        let started = Instant::now();
        let mut stream = self.dht.get_peers(info_hash(&topic));
        let deadline = tokio::time::Instant::now() + self.settings.timeout;
        let mut candidates: Vec<SocketAddr> = Vec::new();
        let mut got_any_batch = false;
        'outer: while let Ok(Some(batch)) = tokio::time::timeout_at(deadline, stream.next()).await {
            got_any_batch = true;
            for addr in batch {
                let addr = SocketAddr::V4(addr);
                if !candidates.contains(&addr) {
                    candidates.push(addr);
                    if candidates.len() >= MAX_LOOKUP_CANDIDATES {
                        break 'outer;
                    }
                }
            }
        }
        drop(stream);
        if !got_any_batch && !self.dht_reachable().await {
            return Err(self.unreachable("looking up peers", started));
        }
        Ok(self.verify(topic, candidates).await)
    }

    async fn dht_reachable(&self) -> bool {
        let id = *self.dht.info().await.id();
        !self.dht.find_node(id).await.is_empty()
    }
}

/// Resolves bootstrap `host:port` names to IPv4 addresses (blocking).
fn resolve_bootstrap(nodes: &[impl AsRef<str>]) -> Vec<BootstrapNode> {
    use std::net::ToSocketAddrs;
    nodes
        .iter()
        .map(|node| {
            let node = node.as_ref();
            let resolved = match node.to_socket_addrs() {
                Ok(addrs) => addrs
                    .filter_map(|a| match a {
                        SocketAddr::V4(v4) => Some(v4),
                        SocketAddr::V6(_) => None,
                    })
                    .collect(),
                Err(e) => {
                    tracing::debug!(node, error = %e, "cannot resolve a DHT bootstrap node");
                    Vec::new()
                }
            };
            BootstrapNode::new(node, resolved)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_hash_is_the_derived_prefix() {
        let topic = [7u8; 32];
        let derived = derive_from_topic(&topic, Domain::DhtInfoHash);
        assert_eq!(info_hash(&topic).as_bytes()[..], derived[..20]);
        assert_ne!(info_hash(&topic).as_bytes()[..], topic[..20]);
    }
}
