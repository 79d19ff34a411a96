//! Discovery on the mainline DHT: a topic's info-hash, the DHT node (bootstrap names are
//! resolved here, so that errors can say what each resolved to; its request timeout comes
//! from `request_timeout.rs`), announcing and refreshing, `connect`'s periodic lookups
//! feeding dial rounds, and `lookup`'s query feeding the identify checks; "no DHT node
//! answered" is told apart from a timeout.
//!
//! A join does not wait for its announcement: `connect` looks up at once, announces beside
//! it (the announcement rides on the lookup's `get_peers` query), returns once a DHT node has
//! answered, and looks up again as soon as its announcement has landed.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use pluresdb_sync_core::topic::{Domain, derive_from_topic};
use pluresdb_sync_core::{Connection, Error, PeerInfo, TopicHash};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{Notify, mpsc};

use super::Node;
use super::candidates::{DialRound, LOOKUP_CHECK_BUDGET, MAX_CANDIDATES};
use crate::HyperswarmError;
use crate::config::{FIRST_LOOKUP_INTERVAL, Settings};
use crate::error::BootstrapNode;

mod request_timeout;

/// Re-announce interval while the public address is still unknown.
const UNKNOWN_ADDR_RETRY: Duration = Duration::from_secs(5);

/// The error of a call the node's shutdown interrupted.
fn disconnected() -> anyhow::Error {
    Error::TransportDisconnected {
        transport: crate::NAME,
    }
    .into()
}

/// The 20-byte DHT info-hash of a topic: a domain-separated hash, so the topic stays private.
fn info_hash(topic: &TopicHash) -> mainline::Id {
    let derived = derive_from_topic(topic, Domain::DhtInfoHash);
    let mut id = [0u8; 20];
    id.copy_from_slice(&derived[..20]);
    // `from_bytes` only fails on a length other than 20.
    mainline::Id::from_bytes(id).unwrap_or_else(|_| mainline::Id::random())
}

/// Builds the DHT node for `settings`, with the bootstrap nodes resolved to IPv4 addresses
/// (blocking: name resolution, and the round trips that set the request timeout unless the
/// settings fix it). Returns what each bootstrap node resolved to.
pub(super) fn start_dht(s: &Settings) -> Result<(mainline::Dht, Vec<BootstrapNode>), String> {
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
    let request_timeout = s.dht_request_timeout.unwrap_or_else(|| {
        let rtts = request_timeout::measure(*s.bind.ip(), &resolved);
        let timeout = request_timeout::from_round_trips(&rtts);
        tracing::debug!(
            ?rtts,
            ?timeout,
            "DHT request timeout from the bootstrap nodes' round trips"
        );
        timeout
    });
    b.request_timeout(request_timeout);
    let dht = b
        .build()
        .map_err(|e| format!("cannot start the DHT node: {e}"))?;
    Ok((dht, bootstrap))
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

/// What the task announcing a topic tells whoever waits for its first announcement.
#[derive(Debug)]
enum Announced {
    /// A DHT node answered this node (a ping of the public-address round): the DHT is
    /// reachable, whatever the announcement's outcome.
    Answered,
    /// The first announcement ended.
    Done(anyhow::Result<()>),
}

impl Node {
    /// Announces `topic` on the DHT now (the data socket's public port, learned first) and
    /// keeps refreshing it until shutdown: every announce interval, or every 5 s while the
    /// public address is unknown or the last attempt failed. Returns when the first
    /// announcement is done; if it failed, nothing keeps announcing. (`Node::announce` adds
    /// the LAN.)
    pub(crate) async fn announce_dht(self: &Arc<Self>, topic: TopicHash) -> anyhow::Result<()> {
        self.register_topic(topic);
        if self.state().topics.is_announcing(&topic) {
            return Ok(());
        }
        let mut events = self.start_announcing(topic, None);
        let result = loop {
            match events.recv().await {
                Some(Announced::Answered) => {}
                Some(Announced::Done(result)) => break result,
                None => break Err(disconnected()),
            }
        };
        if result.is_err() {
            self.state().topics.stop_announcing(&topic);
        }
        result
    }

    /// Starts the task announcing `topic`; its events say when a DHT node answered and how the
    /// first announcement ended. Each announcement that lands notifies `landed`.
    fn start_announcing(
        self: &Arc<Self>,
        topic: TopicHash,
        landed: Option<Arc<Notify>>,
    ) -> mpsc::Receiver<Announced> {
        let (tx, events) = mpsc::channel(2);
        let node = self.clone();
        let handle = self.spawn(async move {
            let mut first = Some(tx);
            loop {
                let result = node.announce_once(topic, first.as_ref()).await;
                let failed = result.is_err();
                if let (false, Some(landed)) = (failed, &landed) {
                    landed.notify_one();
                }
                match (first.take(), result) {
                    (Some(tx), result) => {
                        if let Err(TrySendError::Full(Announced::Done(Err(e))))
                        | Err(TrySendError::Closed(Announced::Done(Err(e)))) =
                            tx.try_send(Announced::Done(result))
                        {
                            // Nobody waits for it any more (`connect` returned once a DHT
                            // node answered).
                            tracing::warn!(error = %e, "announcing on the DHT failed; retrying in 5 s");
                        }
                    }
                    (None, Err(e)) => {
                        tracing::warn!(error = %e, "re-announcing on the DHT failed; retrying in 5 s");
                    }
                    (None, Ok(())) => {}
                }
                // Until the public address is known, retry soon: the announced port may be
                // the wrong one behind a NAT that does not keep ports.
                let wait = if node.public_addr().is_some() && !failed {
                    node.settings.announce_interval
                } else {
                    node.settings.announce_interval.min(UNKNOWN_ADDR_RETRY)
                };
                tokio::time::sleep(wait).await;
            }
        });
        self.state().topics.set_announcing(&topic, handle);
        events
    }

    /// One announcement of `topic`: the public address first, then `announce_peer`, riding on
    /// a `get_peers` query of the topic (the one `connect`'s lookup started, if it still runs):
    /// the announcement goes to the nodes that query found, and a lookup made meanwhile shares
    /// the query and gets its peers (a lookup sharing the `get` query `announce_peer` starts on
    /// its own would get none). Tells `events` once a DHT node answered.
    async fn announce_once(
        &self,
        topic: TopicHash,
        events: Option<&mpsc::Sender<Announced>>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        if let Some(dht) = &self.dht {
            drop(dht.get_peers(info_hash(&topic)));
        }
        let (answered, public) = self.learn_public_addr().await;
        if answered && let Some(events) = events {
            let _ = events.try_send(Announced::Answered);
        }
        let port = self
            .settings
            .announce_port
            .or(public.map(|p| p.port()))
            .unwrap_or(self.local_addr.port());
        let Some(dht) = &self.dht else {
            return Ok(());
        };
        match tokio::time::timeout(
            self.settings.timeout,
            dht.announce_peer(info_hash(&topic), Some(port)),
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

    /// Joins `topic`: looks up and dials peers at once and periodically, and announces beside
    /// that. Returns as soon as a DHT node answered (the announcement goes on in the
    /// background; a failure is logged and retried); fails only when the first announcement
    /// failed before any DHT node answered (no DHT reachable: [`HyperswarmError::DhtUnreachable`]).
    /// With LAN discovery it returns at once: LAN peers are dialled from the start, and an
    /// unreachable DHT is retried in the background (see `offline.rs`).
    pub(crate) async fn connect(
        self: &Arc<Self>,
        topic: TopicHash,
    ) -> anyhow::Result<mpsc::Receiver<Box<dyn Connection>>> {
        self.register_topic(topic);
        let lan = self.lan_on();
        let (tx, rx) = mpsc::channel(self.settings.max_peers);
        let announcing = self.state().topics.is_announcing(&topic);
        let announced = (!announcing).then(|| Arc::new(Notify::new()));
        let node = self.clone();
        let landed = announced.clone();
        let handle = self.spawn(async move { node.discover(topic, landed).await });
        self.state().topics.set_accepting(&topic, tx, handle);
        if lan {
            self.lan_seek(topic);
            self.lan_advertise(topic);
        }
        let Some(announced) = announced else {
            return Ok(rx);
        };
        let mut events = self.start_announcing(topic, Some(announced));
        if lan {
            let node = self.clone();
            self.spawn(async move {
                while let Some(event) = events.recv().await {
                    match event {
                        Announced::Answered => {}
                        Announced::Done(Ok(())) => break,
                        Announced::Done(Err(e)) => {
                            node.state().topics.stop_announcing(&topic);
                            node.dht_unreachable(&e);
                            node.retry_dht(topic);
                            break;
                        }
                    }
                }
            });
            return Ok(rx);
        }
        let reached = match events.recv().await {
            Some(Announced::Answered | Announced::Done(Ok(()))) => Ok(()),
            Some(Announced::Done(Err(e))) => Err(e),
            None => Err(disconnected()),
        };
        if let Err(e) = reached {
            self.state().topics.stop_accepting(&topic);
            return Err(e);
        }
        Ok(rx)
    }

    /// Looks the topic up periodically (0.25 s after joining, then doubling up to the lookup
    /// interval) and feeds each query's answers, as they arrive, to a [`DialRound`], which
    /// gets [`LOOKUP_CHECK_BUDGET`] after the query for what it could not dial at once.
    /// `announced` cuts a wait short when this node's announcement has landed: a peer that
    /// joined at the same moment announced at about the same time, so the next lookup finds it.
    pub(super) async fn discover(
        self: Arc<Self>,
        topic: TopicHash,
        announced: Option<Arc<Notify>>,
    ) {
        let Some(dht) = self.dht.clone() else {
            return;
        };
        let mut interval = FIRST_LOOKUP_INTERVAL;
        loop {
            let mut round = DialRound::new(topic);
            let mut stream = dht.get_peers(info_hash(&topic));
            let deadline = tokio::time::Instant::now() + self.settings.timeout;
            while let Ok(Some(batch)) = tokio::time::timeout_at(deadline, stream.next()).await {
                let real = batch.into_iter().map(SocketAddr::V4);
                if !round.offer(&self, real.filter(|a| !crate::path::is_virtual(a))) {
                    break;
                }
            }
            drop(stream);
            let budget = tokio::time::Instant::now() + LOOKUP_CHECK_BUDGET;
            round.finish(&self, budget).await;
            match &announced {
                Some(announced) => {
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => {}
                        _ = announced.notified() => {}
                    }
                }
                None => tokio::time::sleep(interval).await,
            }
            interval = (interval * 2).min(self.settings.lookup_interval);
        }
    }

    /// Lists the peers on `topic`: the LAN's and the DHT's candidates (at most
    /// [`MAX_CANDIDATES`]), each verified by its Noise key (see [`Node::verify`]). Fails with
    /// [`HyperswarmError::DhtUnreachable`] when no DHT node answered at all, unless LAN
    /// discovery runs.
    pub(crate) async fn lookup(
        self: &Arc<Self>,
        topic: TopicHash,
    ) -> anyhow::Result<Vec<PeerInfo>> {
        self.register_topic(topic);
        let lan_answers = self.lan_seek(topic);
        let started = Instant::now();
        let Some(dht) = &self.dht else {
            return Ok(Vec::new());
        };
        let mut stream = dht.get_peers(info_hash(&topic));
        let deadline = tokio::time::Instant::now() + self.settings.timeout;
        let mut candidates: Vec<SocketAddr> = Vec::new();
        let mut got_any_batch = false;
        'outer: while let Ok(Some(batch)) = tokio::time::timeout_at(deadline, stream.next()).await {
            got_any_batch = true;
            for addr in batch {
                let addr = SocketAddr::V4(addr);
                if !crate::path::is_virtual(&addr) && !candidates.contains(&addr) {
                    candidates.push(addr);
                    if candidates.len() >= MAX_CANDIDATES {
                        break 'outer;
                    }
                }
            }
        }
        drop(stream);
        if !got_any_batch && !self.dht_reachable().await {
            let e = self.unreachable("looking up peers", started);
            if !self.lan_on() {
                return Err(e);
            }
            self.dht_unreachable(&e);
        }
        let candidates = self
            .with_lan_candidates(topic, lan_answers, candidates)
            .await;
        Ok(self.verify(topic, candidates).await)
    }

    /// Whether the DHT node knows any other node.
    async fn dht_reachable(&self) -> bool {
        let Some(dht) = &self.dht else {
            return false;
        };
        let id = *dht.info().await.id();
        !dht.find_node(id).await.is_empty()
    }

    /// The error of an operation that ran out of time (DHT nodes answered, but too slowly).
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
