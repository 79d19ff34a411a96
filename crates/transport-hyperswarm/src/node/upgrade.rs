//! The driver of path upgrades (Auto mode): for each connection made through a relay, one
//! task runs its `PathMachine` (`path_state.rs`), sends the connection's candidates as QUIC
//! datagrams, sends and answers authenticated UDP probes (`path_wire.rs`), and switches
//! the data socket's direct table (`direct.rs`), the path board and an info-level log line
//! when the machine says so. The node's probe handler checks each probe's tag and hands it
//! to the task of its connection (by path id), through a bounded queue.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::Node;
use super::path_state::{Action, Input, MAX_CANDIDATES, PathMachine, usable};
use crate::path_wire::{
    self, EXPORT_LABEL, PathKeys, Probe, ProbeKind, decode_candidates, encode_candidates,
};
use crate::relay_path::{PathInfo, PeerPath};

/// Probes that may wait for one connection's task; more are dropped (the peer probes again).
const PROBE_QUEUE: usize = 64;

/// Ping nonces remembered per connection: a ping is accepted once, and only if it is not
/// older than this many nonces behind the newest (replays of captured pings are refused).
const REPLAY_WINDOW: u64 = 64;

/// Where the probe handler sends a connection's probes.
pub(crate) struct ProbeRoute {
    keys: PathKeys,
    /// Whether this side is the QUIC server (probes from the same side are our own).
    server: bool,
    tx: mpsc::Sender<(SocketAddr, Probe)>,
}

/// Where a connection's authenticated probes arrive, with where they came from.
pub(super) type ProbeQueue = mpsc::Receiver<(SocketAddr, Probe)>;

/// The probe routes of live connections with a path choice, by path id.
pub(crate) type ProbeRoutes = HashMap<[u8; 8], ProbeRoute>;

/// Accepts each ping nonce once, within a window behind the newest.
#[derive(Debug, Default)]
pub(super) struct Replay {
    newest: Option<u64>,
    seen: VecDeque<u64>,
}

impl Replay {
    /// The machine's input for an authenticated probe from `from` (a replayed ping is
    /// nothing but time passing).
    pub(super) fn input(&mut self, from: SocketAddr, p: &Probe) -> Input {
        match p.kind {
            ProbeKind::Ping if self.fresh(p.nonce) => Input::Ping {
                from,
                nonce: p.nonce,
            },
            ProbeKind::Ping => Input::Tick,
            ProbeKind::Pong => Input::Pong {
                from,
                nonce: p.nonce,
            },
        }
    }

    fn fresh(&mut self, nonce: u64) -> bool {
        if let Some(newest) = self.newest
            && (nonce.saturating_add(REPLAY_WINDOW) < newest || self.seen.contains(&nonce))
        {
            return false;
        }
        self.newest = Some(self.newest.map_or(nonce, |n| n.max(nonce)));
        if self.seen.len() as u64 == REPLAY_WINDOW {
            self.seen.pop_front();
        }
        self.seen.push_back(nonce);
        true
    }
}

impl Node {
    fn probe_routes(&self) -> std::sync::MutexGuard<'_, ProbeRoutes> {
        self.probe_routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A path probe the data socket diverted: checked, then handed to its connection.
    pub(super) fn on_path_probe(&self, from: SocketAddr, bytes: &[u8]) {
        let Some(probe) = path_wire::decode_probe(bytes) else {
            return;
        };
        let routes = self.probe_routes();
        let Some(route) = routes.get(&probe.id) else {
            return;
        };
        if probe.from_server == route.server || !route.keys.verify(&probe) {
            tracing::trace!(%from, "path probe refused");
            return;
        }
        let _ = route.tx.try_send((from, probe));
    }

    /// Whether `addr` is a proven direct endpoint of a relay-made connection, or the relay
    /// route a direct-made connection falls back to: its packets are that connection's, so
    /// it is not dialled (the peer there is connected).
    pub(super) fn is_upgraded_endpoint(&self, addr: &SocketAddr) -> bool {
        self.data.directs().virtual_for(addr).is_some()
            || self.data.fallbacks().real_for(addr).is_some()
    }

    /// Registers `conn` for path probes: its keys, whether this side is the QUIC server,
    /// and the queue its probes arrive on (`None` when its keys cannot be derived or are
    /// taken). [`Node::unregister_probes`] undoes it.
    pub(super) fn register_probes(
        &self,
        conn: &quinn::Connection,
    ) -> Option<(PathKeys, bool, ProbeQueue)> {
        let mut material = [0u8; 40];
        conn.export_keying_material(&mut material, EXPORT_LABEL, b"")
            .ok()?;
        let keys = PathKeys::from_material(&material);
        let server = conn.side() == quinn::Side::Server;
        let (tx, rx) = mpsc::channel(PROBE_QUEUE);
        let mut routes = self.probe_routes();
        if routes.contains_key(&keys.id) {
            return None;
        }
        routes.insert(
            keys.id,
            ProbeRoute {
                keys: keys.clone(),
                server,
                tx,
            },
        );
        Some((keys, server, rx))
    }

    /// Forgets the probe route of the connection with `keys`.
    pub(super) fn unregister_probes(&self, keys: &PathKeys) {
        self.probe_routes().remove(&keys.id);
    }

    /// A fresh first nonce for a connection's probes (the lower half of a random number,
    /// so the counter never wraps in a connection's life).
    pub(super) fn first_nonce() -> u64 {
        let mut first = [0u8; 8];
        let _ = getrandom::fill(&mut first);
        u64::from_be_bytes(first) >> 1
    }

    /// Our direct candidates: the data socket's addresses (each IPv4 interface's when bound
    /// to all of them; loopback only when bound to it) and its public address.
    fn own_candidates(&self) -> Vec<SocketAddr> {
        let local = self.local_addr;
        let mut out = Vec::new();
        if local.ip().is_unspecified() {
            if let Ok(all) = if_addrs::get_if_addrs() {
                out.extend(
                    all.iter()
                        .filter(|i| !i.is_loopback())
                        .filter_map(|i| match i.ip() {
                            std::net::IpAddr::V4(ip) => Some(SocketAddr::from((ip, local.port()))),
                            std::net::IpAddr::V6(_) => None,
                        }),
                );
            }
        } else {
            out.push(local);
        }
        if let Some(public) = self.public_addr() {
            out.insert(0, public);
        }
        out.retain(usable);
        out.dedup();
        out.truncate(MAX_CANDIDATES);
        out
    }

    /// The relay URL behind virtual address `vaddr`.
    pub(super) fn relay_url_of(&self, vaddr: &SocketAddr) -> String {
        let link = self.data.routes().route(vaddr).map(|r| r.link);
        link.and_then(|l| {
            self.state()
                .relay
                .url(l)
                .map(str::to_owned)
                .or_else(|| self.settings.relay.as_ref().and_then(|p| p.url(l)))
        })
        .unwrap_or_else(|| "(gone)".into())
    }

    /// The path of a new connection to `addr` (a virtual address: the relay behind it).
    pub(super) fn initial_path(&self, addr: SocketAddr) -> PeerPath {
        if crate::path::is_virtual(&addr) {
            PeerPath::Relayed {
                url: self.relay_url_of(&addr),
            }
        } else {
            PeerPath::Direct(addr)
        }
    }

    /// Runs the path choice of `conn`, made through the relay at virtual address `vaddr`,
    /// until it closes.
    pub(super) async fn drive_path(
        self: Arc<Self>,
        conn: quinn::Connection,
        vaddr: SocketAddr,
        mut info: PathInfo,
    ) {
        let Some((keys, server, mut rx)) = self.register_probes(&conn) else {
            return;
        };
        let mut machine = PathMachine::new(tokio::time::Instant::now(), Self::first_nonce());
        let mut replay = Replay::default();
        // Our candidates change when the public address is learned (often just after a
        // relay-made connection is up) or changes: sent again at once, not at the next
        // round, so the peer probes the new address now.
        let mut public = self.reflexive.watch_public();
        public.mark_unchanged();
        let mut actions = machine.on_event(tokio::time::Instant::now(), Input::Start);
        loop {
            self.apply_path_actions(&conn, &keys, server, vaddr, &mut info, actions);
            let wake = machine
                .next_wakeup()
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(60));
            let input = tokio::select! {
                _ = conn.closed() => break,
                d = conn.read_datagram() => match d {
                    Ok(bytes) => match decode_candidates(&bytes) {
                        Some(list) => Input::Candidates(list),
                        None => Input::Tick,
                    },
                    Err(_) => break,
                },
                p = rx.recv() => match p {
                    // Probes through the relay prove direct-made connections' routes only.
                    Some((from, _)) if crate::path::is_virtual(&from) => Input::Tick,
                    Some((from, p)) => replay.input(from, &p),
                    None => break,
                },
                Ok(()) = public.changed() => {
                    self.apply_path_actions(&conn, &keys, server, vaddr, &mut info, vec![Action::SendCandidates]);
                    Input::Tick
                }
                _ = tokio::time::sleep_until(wake) => Input::Tick,
            };
            actions = machine.on_event(tokio::time::Instant::now(), input);
        }
        self.unregister_probes(&keys);
        self.data.directs().forget(&vaddr);
    }

    fn apply_path_actions(
        &self,
        conn: &quinn::Connection,
        keys: &PathKeys,
        server: bool,
        vaddr: SocketAddr,
        info: &mut PathInfo,
        actions: Vec<Action>,
    ) {
        for action in actions {
            match action {
                Action::SendCandidates => {
                    let list = encode_candidates(&self.own_candidates());
                    if let Err(e) = conn.send_datagram(list.into()) {
                        tracing::debug!(error = %e, "cannot send path candidates");
                    }
                }
                Action::Ping { to, nonce } => {
                    self.data
                        .send_raw(to, &keys.encode(ProbeKind::Ping, server, nonce));
                }
                Action::Pong { to, nonce } => {
                    self.data
                        .send_raw(to, &keys.encode(ProbeKind::Pong, server, nonce));
                }
                Action::Learn(from) => {
                    if !self.data.directs().learn(from, vaddr) {
                        tracing::debug!(%from, "too many direct endpoints learned for a peer");
                    }
                }
                Action::UseDirect(to) => {
                    self.data.directs().set_send(vaddr, Some(to));
                    tracing::info!(peer = %info.peer_id, path = %format!("direct {to}"), "connection path changed");
                    info.path = PeerPath::Direct(to);
                    self.board.set(conn.stable_id(), info.clone());
                }
                Action::AlsoRelay(doubled) => {
                    self.data.directs().set_doubled(vaddr, doubled);
                    tracing::debug!(peer = %info.peer_id, doubled, "direct path suspect: packets through the relay too");
                }
                Action::UseRelay => {
                    self.data.directs().set_send(vaddr, None);
                    info.path = PeerPath::Relayed {
                        url: self.relay_url_of(&vaddr),
                    };
                    tracing::info!(peer = %info.peer_id, path = %info.path, "connection path changed (the direct path went silent)");
                    self.board.set(conn.stable_id(), info.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_ping_nonce_is_accepted_once_and_old_ones_never() {
        let mut r = Replay::default();
        assert!(r.fresh(1000));
        assert!(!r.fresh(1000), "a replay");
        assert!(r.fresh(1002));
        assert!(r.fresh(1001), "late but within the window");
        assert!(r.fresh(2000));
        assert!(!r.fresh(1001), "too old");
        assert!(!r.fresh(2000 - REPLAY_WINDOW - 1));
        for n in 2001..2001 + 2 * REPLAY_WINDOW {
            assert!(r.fresh(n));
        }
        assert!(r.seen.len() as u64 <= REPLAY_WINDOW, "bounded");
    }
}
