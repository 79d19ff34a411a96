//! The driver of a direct-made connection's fallback (Auto mode): for each connection made
//! directly (quinn addresses the peer at its real address `E`), one task tells the peer
//! this node's relay route in the topic's room and learns the peer's (`route_share.rs`,
//! over QUIC datagrams), proves the peer's route when it is a member of the same room on
//! the same relay (an authenticated ping through the relay, answered through it), then
//! adopts it in the data socket's fallback table (`fallback.rs`), runs the
//! connection's `PathMachine` (`path_state.rs`, made direct), and switches the fallback
//! table, the path board and an info-level log line when the machine says so. Probes are
//! those of relay-made connections (`upgrade.rs`): authenticated UDP pings to `E`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pluresdb_sync_core::TopicHash;
use tokio::time::Instant;

use super::Node;
use super::path_state::{Action, Input, PathMachine};
use super::route_share::{RouteProof, RouteShare};
use super::upgrade::Replay;
use crate::fallback::Via;
use crate::path_wire::{PathKeys, ProbeKind, RouteId, Routes, decode_routes, encode_routes};
use crate::relay_path::{PathInfo, PeerPath};

/// How long a new relay room member waits to be dialled while a connection made directly
/// on the topic has not adopted its peer's relay route yet: the member may be that very
/// peer, whose route is on its way over the connection (then it is not dialled at all,
/// see [`Node::is_upgraded_endpoint`]); a relay-made connection to it would be a duplicate
/// whose packets, once the route is adopted, are taken for the direct-made one's. The
/// room's periodic dial rounds start this late anyway.
pub(crate) const ROUTE_GRACE: Duration = crate::config::FIRST_LOOKUP_INTERVAL;

/// When an unresolved route is looked at again.
#[derive(Debug)]
struct Recheck {
    at: Option<Instant>,
    wait: Duration,
}

impl Default for Recheck {
    fn default() -> Self {
        Self {
            at: None,
            wait: super::route_share::RESEND_FIRST,
        }
    }
}

impl Recheck {
    /// Schedules the next look (`pending`: a route is told but unresolved), or stops.
    fn update(&mut self, now: Instant, pending: bool) {
        if !pending {
            *self = Self::default();
        } else if self.at.is_none() {
            self.at = Some(now + self.wait);
            self.wait = (self.wait * 2).min(super::route_share::RESEND_MAX);
        }
    }
}

impl Node {
    /// Whether a connection made directly on `topic` has no relay route adopted yet.
    pub(super) fn awaiting_routes(&self, topic: &TopicHash) -> bool {
        let addrs = self.state().sessions.direct_made_on(topic);
        let fallbacks = self.data.fallbacks();
        addrs.iter().any(|a| !fallbacks.has(a))
    }

    /// Our route in `topic`'s relay room: the relay socket it is joined on, our
    /// connection id there.
    fn own_route(&self, topic: &TopicHash) -> Option<RouteId> {
        let st = self.state();
        let link = st.relay.joined_on(topic)?;
        Some(RouteId::new(st.relay.url(link)?, st.relay.me(link)?))
    }

    /// The virtual address of the member of `topic`'s relay room at `id` (on our relay
    /// socket, whose URL hashes to `id`'s relay, or a node of the same NATS bus), if there
    /// is one and it is free for the connection to `real` to adopt.
    fn resolve_route(
        &self,
        topic: &TopicHash,
        id: &RouteId,
        real: SocketAddr,
    ) -> Option<SocketAddr> {
        let st = self.state();
        let link = st.relay.joined_on(topic)?;
        // The same relay, or a node of the same NATS-scaled relay: there connection ids
        // carry the node's nonzero 32-bit id in their high bits and are unique across the
        // nodes (whose URLs differ), while a lone relay's ids are small counters that
        // another relay hands out too. The proof decides either way.
        let same_relay = RouteId::new(st.relay.url(link)?, 0).relay == id.relay;
        if !same_relay && id.conn >> 32 == 0 {
            return None;
        }
        let routes = self.data.routes();
        let v = st.relay.members(topic).into_iter().find(|v| {
            routes
                .route(v)
                .is_some_and(|r| r.link == link && r.conn == id.conn)
        })?;
        // A route that carries a connection of its own, or that another address adopted,
        // is not this peer's to take (a peer naming another member's route, or two relay
        // nodes behind one URL handing out the same id, would otherwise break it).
        let taken = !st.sessions.connections_to(v).is_empty()
            || self
                .data
                .fallbacks()
                .real_for(&v)
                .is_some_and(|e| e != real);
        (!taken).then_some(v)
    }

    fn send_routes(conn: &quinn::Connection, m: &Routes) {
        if let Err(e) = conn.send_datagram(encode_routes(m).into()) {
            tracing::debug!(error = %e, "cannot send relay routes");
        }
    }

    /// Runs the fallback of `conn`, made directly to `addr`, until it closes.
    pub(super) async fn drive_fallback(
        self: Arc<Self>,
        conn: quinn::Connection,
        addr: SocketAddr,
        mut info: PathInfo,
    ) {
        let Some((keys, server, mut rx)) = self.register_probes(&conn) else {
            return;
        };
        let topic = info.topic;
        let mut epoch = self.relay_epoch.subscribe();
        let now = Instant::now();
        let mut machine = PathMachine::made_direct(now, Self::first_nonce(), addr);
        let (mut share, first) = RouteShare::start(now, self.own_route(&topic));
        Self::send_routes(&conn, &first);
        let mut replay = Replay::default();
        // Pings through the relay have nonces of their own, so a window of their own.
        let mut relay_replay = Replay::default();
        let mut proof = RouteProof::new(Self::first_nonce());
        let mut adopted: Option<SocketAddr> = None;
        // While the peer's route is told but not resolved here (not in the room yet, or a
        // connection of its own still uses it, e.g. a duplicate being closed), looked at
        // again after 1 s, doubling to 32 s.
        let mut recheck = Recheck::default();
        let mut actions = Vec::new();
        loop {
            self.apply_fallback(&conn, &keys, server, addr, adopted, &mut info, actions);
            let wake = machine
                .next_wakeup()
                .into_iter()
                .chain(share.next_wakeup())
                .chain(proof.next_wakeup())
                .chain(recheck.at)
                .min()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
            let input = tokio::select! {
                _ = conn.closed() => break,
                d = conn.read_datagram() => match d {
                    Ok(bytes) => match decode_routes(&bytes) {
                        Some(m) => {
                            let (answer, changed) = share.on_message(Instant::now(), m);
                            if let Some(a) = answer {
                                Self::send_routes(&conn, &a);
                            }
                            if changed {
                                self.retarget(&topic, addr, &share, &mut proof, &mut adopted, &keys, server)
                            } else {
                                Input::Tick
                            }
                        }
                        None => Input::Tick,
                    },
                    Err(_) => break,
                },
                p = rx.recv() => match p {
                    Some((from, p)) if crate::path::is_virtual(&from) => match relay_replay.input(from, &p) {
                        Input::Ping { from, nonce } => {
                            self.data.send_raw(from, &keys.encode(ProbeKind::Pong, server, nonce));
                            Input::Tick
                        }
                        Input::Pong { from, nonce } if proof.on_pong(from, nonce) => {
                            self.data.fallbacks().adopt(addr, from);
                            adopted = Some(from);
                            tracing::debug!(%addr, route = %self.relay_url_of_route(&from), "a relay route to fall back to, proven");
                            Input::Route(true)
                        }
                        _ => Input::Tick,
                    },
                    Some((from, p)) => replay.input(from, &p),
                    None => break,
                },
                changed = epoch.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if let Some(m) = share.set_ours(Instant::now(), self.own_route(&topic)) {
                        Self::send_routes(&conn, &m);
                    }
                    self.retarget(&topic, addr, &share, &mut proof, &mut adopted, &keys, server)
                }
                _ = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    if let Some(m) = share.tick(now) {
                        Self::send_routes(&conn, &m);
                    }
                    if let Some((to, nonce)) = proof.tick(now) {
                        self.data.send_raw(to, &keys.encode(ProbeKind::Ping, server, nonce));
                    }
                    if recheck.at.is_some_and(|t| t <= now) {
                        recheck.at = None;
                        self.retarget(&topic, addr, &share, &mut proof, &mut adopted, &keys, server)
                    } else {
                        Input::Tick
                    }
                }
            };
            recheck.update(
                Instant::now(),
                share.theirs().is_some() && proof.target().is_none(),
            );
            actions = machine.on_event(Instant::now(), input);
        }
        self.unregister_probes(&keys);
        if let Some(v) = adopted {
            self.data.fallbacks().release(addr, v);
        }
    }

    /// Looks at the relay route the peer told again: a route that resolves here and is new
    /// is pinged through the relay (it is adopted once a pong proves it); the route adopted
    /// before is released when it is not the one any more. The machine's input (`Tick` when
    /// nothing changed for it).
    #[allow(clippy::too_many_arguments)]
    fn retarget(
        &self,
        topic: &TopicHash,
        addr: SocketAddr,
        share: &RouteShare,
        proof: &mut RouteProof,
        adopted: &mut Option<SocketAddr>,
        keys: &PathKeys,
        server: bool,
    ) -> Input {
        let want = share
            .theirs()
            .and_then(|id| self.resolve_route(topic, &id, addr));
        if let Some((to, nonce)) = proof.set_target(Instant::now(), want) {
            self.data
                .send_raw(to, &keys.encode(ProbeKind::Ping, server, nonce));
        }
        match *adopted {
            Some(old) if Some(old) != want => {
                self.data.fallbacks().release(addr, old);
                *adopted = None;
                Input::Route(false)
            }
            _ => Input::Tick,
        }
    }

    /// The relay URL behind `vaddr` for people.
    fn relay_url_of_route(&self, vaddr: &SocketAddr) -> String {
        self.data
            .routes()
            .route(vaddr)
            .map(|r| self.describe_route(&r))
            .unwrap_or_else(|| "(gone)".into())
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_fallback(
        &self,
        conn: &quinn::Connection,
        keys: &PathKeys,
        server: bool,
        addr: SocketAddr,
        adopted: Option<SocketAddr>,
        info: &mut PathInfo,
        actions: Vec<Action>,
    ) {
        let fallbacks = self.data.fallbacks();
        for action in actions {
            match action {
                Action::Ping { to, nonce } => {
                    self.data
                        .send_raw(to, &keys.encode(ProbeKind::Ping, server, nonce));
                }
                Action::Pong { to, nonce } => {
                    self.data
                        .send_raw(to, &keys.encode(ProbeKind::Pong, server, nonce));
                }
                Action::AlsoRelay(doubled) => {
                    fallbacks.set_via(addr, if doubled { Via::Both } else { Via::Direct });
                    tracing::debug!(peer = %info.peer_id, doubled, "direct path suspect: packets through the relay too");
                }
                Action::UseRelay => {
                    fallbacks.set_via(addr, Via::Relay);
                    info.path = PeerPath::Relayed {
                        url: adopted.map_or_else(|| "(gone)".into(), |v| self.relay_url_of(&v)),
                    };
                    tracing::info!(peer = %info.peer_id, path = %info.path, "connection path changed (the direct path went silent)");
                    self.board.set(conn.stable_id(), info.clone());
                }
                Action::UseDirect(to) => {
                    fallbacks.set_via(addr, Via::Direct);
                    if info.path != PeerPath::Direct(to) {
                        info.path = PeerPath::Direct(to);
                        tracing::info!(peer = %info.peer_id, path = %info.path, "connection path changed");
                        self.board.set(conn.stable_id(), info.clone());
                    }
                }
                // A direct-made connection has no candidates to send, and its peer's
                // address is quinn's already.
                Action::SendCandidates | Action::Learn(_) => {}
            }
        }
    }
}
