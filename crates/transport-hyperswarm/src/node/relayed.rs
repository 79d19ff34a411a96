//! With a relay path (Auto mode): the relay as one more discovery source and path. The
//! path's events keep the route table and the rooms current (a route that goes closes the
//! connections that used it, unless they have gone direct), members are dialled
//! through the same dial rounds, handshakes and one-connection-per-peer rule as DHT peers,
//! and `announce`, `connect` and `lookup` use the relay room and the DHT (when on) side by
//! side: they succeed as soon as either does, so peers meet in the relay room in
//! milliseconds without waiting for the DHT.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pluresdb_sync_core::{Connection, Error, PeerInfo, TopicHash};
use tokio::sync::{mpsc, oneshot};

use super::Node;
use super::candidates::{DialRound, LOOKUP_CHECK_BUDGET};
use super::duplicate::Path;
use crate::config::FIRST_LOOKUP_INTERVAL;
use crate::conn::code;
use crate::path::is_virtual;
use crate::relay_path::{RelayEvent, RelayPath, RelayRoute};

/// While the DHT is unreachable, how often Auto mode tries to announce again (the relay
/// room works meanwhile).
const DHT_ANNOUNCE_RETRY: Duration = Duration::from_secs(5);

impl Node {
    /// Applies the relay path's events until it closes.
    pub(super) async fn relay_events(self: Arc<Self>, path: Arc<dyn RelayPath>) {
        while let Some(event) = poll_fn(|cx| path.poll_event(cx)).await {
            self.on_relay_event(event);
            // Direct-made connections look at their relay routes again.
            self.relay_epoch.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn on_relay_event(self: &Arc<Self>, event: RelayEvent) {
        let routes = self.data.routes().clone();
        match event {
            RelayEvent::Connected { link, url, me } => {
                tracing::info!(relay = %url, link, "relay path up");
                self.state().relay.connected(link, url, me);
            }
            RelayEvent::Joined {
                link,
                topic,
                members,
            } => {
                let addrs: Vec<SocketAddr> =
                    members.iter().filter_map(|m| routes.addr_for(m)).collect();
                self.state().relay.joined(topic, link, &addrs);
                self.relay_joined.notify_waiters();
                self.dial_relayed(topic, addrs);
            }
            RelayEvent::MemberJoined { topic, route } => {
                if let Some(addr) = routes.addr_for(&route) {
                    self.state().relay.member_joined(topic, addr);
                    self.dial_relayed(topic, vec![addr]);
                }
            }
            RelayEvent::MemberLeft { topic, route } => {
                if let Some(addr) = routes.remove(&route) {
                    self.state().relay.member_left(&topic, addr);
                    self.path_lost(&[addr]);
                }
            }
            RelayEvent::JoinRefused { topic, reason } => {
                tracing::warn!(topic = %hex::encode(&topic[..4]), %reason, "the relay refused to join the topic's room");
            }
            RelayEvent::Disconnected { link, reason } => {
                tracing::info!(link, %reason, "relay path down; reconnecting");
                let gone = routes.remove_link(link);
                self.state().relay.disconnected(link, &gone);
                self.path_lost(&gone);
            }
        }
    }

    /// Closes the connections that went through relay routes at `addrs`, which are gone,
    /// unless they go direct now (they carry on over UDP).
    fn path_lost(&self, addrs: &[SocketAddr]) {
        let directs = self.data.directs();
        let conns: Vec<quinn::Connection> = {
            let st = self.state();
            addrs
                .iter()
                .filter(|a| !directs.is_direct(a))
                .flat_map(|a| st.sessions.connections_to(*a))
                .collect()
        };
        for c in conns {
            c.close(code::PATH_LOST, b"relay path lost");
        }
    }

    /// Whether a connection to `addr` still has its path: [`Path::Lost`] when `addr` is a
    /// virtual address whose relay route is gone and that does not go direct (as
    /// [`Node::path_lost`] closes those).
    pub(super) fn path_now(&self, addr: &SocketAddr) -> Path {
        if is_virtual(addr)
            && self.data.routes().route(addr).is_none()
            && !self.data.directs().is_direct(addr)
        {
            Path::Lost
        } else {
            Path::Open
        }
    }

    /// Dials relay members of `topic` now, if the application takes connections on it.
    fn dial_relayed(self: &Arc<Self>, topic: TopicHash, addrs: Vec<SocketAddr>) {
        if addrs.is_empty() || !self.state().topics.is_accepting(&topic) {
            return;
        }
        let node = self.clone();
        self.spawn(async move {
            if node.awaiting_routes(&topic) {
                tokio::time::sleep(super::direct_made::ROUTE_GRACE).await;
            }
            let mut round = DialRound::new(topic);
            round.offer(&node, addrs);
            round
                .finish(&node, tokio::time::Instant::now() + LOOKUP_CHECK_BUDGET)
                .await;
        });
    }

    /// Dials the members of `topic`'s relay room periodically (0.25 s after joining, then
    /// doubling up to the lookup interval), for those whose dial failed (backoff applies).
    async fn relay_discover(self: Arc<Self>, topic: TopicHash) {
        let mut interval = FIRST_LOOKUP_INTERVAL;
        loop {
            let members = self.state().relay.members(&topic);
            if !members.is_empty() {
                let mut round = DialRound::new(topic);
                round.offer(&self, members);
                round
                    .finish(&self, tokio::time::Instant::now() + LOOKUP_CHECK_BUDGET)
                    .await;
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(self.settings.lookup_interval);
        }
    }

    fn path(&self) -> Option<&Arc<dyn RelayPath>> {
        self.settings.relay.as_ref()
    }

    /// Waits (until `deadline`) for `topic`'s relay room to be joined.
    async fn wait_relay_joined(&self, topic: &TopicHash, deadline: tokio::time::Instant) -> bool {
        loop {
            let joined = self.relay_joined.notified();
            tokio::pin!(joined);
            joined.as_mut().enable();
            if self.state().relay.is_joined(topic) {
                return true;
            }
            if tokio::time::timeout_at(deadline, joined).await.is_err() {
                return false;
            }
        }
    }

    /// Auto mode's `announce`: joins `topic`'s relay room and (with the DHT) announces on
    /// the DHT, retrying in the background while the DHT is unreachable; done as soon as
    /// either works.
    pub(crate) async fn auto_announce(self: &Arc<Self>, topic: TopicHash) -> anyhow::Result<()> {
        self.register_topic(topic);
        if let Some(path) = self.path() {
            path.join(&topic);
        }
        // With LAN discovery, also on the LAN (a no-op without it).
        self.lan_advertise(topic);
        let (first, dht_result) = oneshot::channel();
        if self.dht.is_some() && !self.state().topics.is_announcing(&topic) {
            let node = self.clone();
            self.spawn(async move {
                let mut first = Some(first);
                loop {
                    match node.announce(topic).await {
                        Ok(()) => {
                            if let Some(f) = first.take() {
                                let _ = f.send(Ok(()));
                            }
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "announcing on the DHT failed; the relay room is used meanwhile");
                            if let Some(f) = first.take() {
                                let _ = f.send(Err(e));
                            }
                            tokio::time::sleep(DHT_ANNOUNCE_RETRY).await;
                        }
                    }
                }
            });
        } else if self.dht.is_some() {
            let _ = first.send(Ok(()));
        }
        let deadline = tokio::time::Instant::now() + self.settings.timeout;
        let relay = self.wait_relay_joined(&topic, deadline);
        tokio::pin!(relay);
        let mut dht_result = Some(dht_result);
        let mut dht_error = None;
        loop {
            let dht = async {
                match dht_result.as_mut() {
                    Some(rx) => rx.await.ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                joined = &mut relay => {
                    if joined {
                        return Ok(());
                    }
                    return Err(match dht_error {
                        Some(e) => e,
                        None => Error::Timeout {
                            what: "joining the topic's relay room".into(),
                            ms: self.settings.timeout.as_millis() as u64,
                        }
                        .into(),
                    });
                }
                result = dht => {
                    dht_result = None;
                    match result {
                        Some(Ok(())) => return Ok(()),
                        Some(Err(e)) => dht_error = Some(e),
                        // No DHT: only the relay counts.
                        None => {}
                    }
                }
            }
        }
    }

    /// Auto mode's `connect`: [`Node::auto_announce`], then dials relay members and DHT
    /// peers as they are found.
    pub(crate) async fn auto_connect(
        self: &Arc<Self>,
        topic: TopicHash,
    ) -> anyhow::Result<mpsc::Receiver<Box<dyn Connection>>> {
        self.auto_announce(topic).await?;
        if self.lan_on() {
            self.lan_seek(topic);
        }
        let (tx, rx) = mpsc::channel(self.settings.max_peers);
        let node = self.clone();
        let handle = self.spawn(async move {
            tokio::join!(
                node.clone().discover(topic, None),
                node.relay_discover(topic)
            );
        });
        self.state().topics.set_accepting(&topic, tx, handle);
        Ok(rx)
    }

    /// Auto mode's `lookup`: the relay room's members and (with the DHT) the DHT's answers,
    /// each verified by a handshake, merged by peer id. Fails only when neither source could
    /// be asked.
    pub(crate) async fn auto_lookup(
        self: &Arc<Self>,
        topic: TopicHash,
    ) -> anyhow::Result<Vec<PeerInfo>> {
        self.register_topic(topic);
        if let Some(path) = self.path() {
            path.join(&topic);
        }
        let relay = async {
            let deadline =
                tokio::time::Instant::now() + LOOKUP_CHECK_BUDGET.min(self.settings.timeout);
            if !self.wait_relay_joined(&topic, deadline).await {
                return None;
            }
            let members = self.state().relay.members(&topic);
            Some(self.verify(topic, members).await)
        };
        let dht = async {
            match self.dht {
                Some(_) => Some(self.lookup(topic).await),
                None => None,
            }
        };
        let (relayed, dht) = tokio::join!(relay, dht);
        let mut found: Vec<PeerInfo> = Vec::new();
        let dht = match (dht, &relayed) {
            (Some(Err(e)), None) => return Err(e),
            (None, None) => {
                return Err(Error::Timeout {
                    what: "joining the topic's relay room".into(),
                    ms: LOOKUP_CHECK_BUDGET.min(self.settings.timeout).as_millis() as u64,
                }
                .into());
            }
            (Some(Ok(peers)), _) => peers,
            _ => Vec::new(),
        };
        for peer in relayed.unwrap_or_default().into_iter().chain(dht) {
            let peer = self.described(peer);
            match found.iter_mut().find(|p| p.id == peer.id) {
                Some(known) => known.connected |= peer.connected,
                None => found.push(peer),
            }
        }
        Ok(found)
    }

    /// `peer` with a virtual address shown as the relay route it stands for.
    fn described(&self, mut peer: PeerInfo) -> PeerInfo {
        let addr = peer
            .address
            .as_deref()
            .and_then(|a| a.parse::<SocketAddr>().ok());
        if let Some(addr) = addr.filter(is_virtual) {
            peer.address = self
                .data
                .routes()
                .route(&addr)
                .map(|r| self.describe_route(&r));
        }
        peer
    }

    /// A relay route for people: `relay <url> connection <id>`.
    pub(crate) fn describe_route(&self, route: &RelayRoute) -> String {
        let url = self
            .state()
            .relay
            .url(route.link)
            .map(str::to_owned)
            .or_else(|| self.path().and_then(|p| p.url(route.link)))
            .unwrap_or_else(|| "(gone)".into());
        format!("relay {url} connection {}", route.conn)
    }
}
