//! LAN discovery's driver (the protocol is in `docs/lan-discovery.md`, the state in
//! `lan_machine.rs`): one task owns the multicast socket, joins the group on the node's
//! interfaces (rescanned, so a network that comes up later is used), sends what the machine
//! says when it says, and hands the LAN candidates it reports to the same dial rounds,
//! handshakes and one-connection-per-peer rule as DHT answers. `connect` and `announce`
//! announce a topic on the LAN, `connect` and `lookup` look for its peers there.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pluresdb_sync_core::TopicHash;
use tokio::net::UdpSocket;
use tokio::sync::Notify;

use super::Node;
use super::candidates::{DialRound, LOOKUP_CHECK_BUDGET, MAX_CANDIDATES};
use super::lan_machine::{ANSWER_WAIT, LanMachine, LanStats, Transmit};
use super::offline::Offline;
use crate::config::{LAN_DISCOVERY_GROUP, Settings};
use crate::lan_wire::{MAX_PACKET_BYTES, Nonce};

/// How often the interface list is read again: a laptop that joins a network starts
/// announcing on it within this.
const IFACE_RESCAN: Duration = Duration::from_secs(5);

/// Which interfaces LAN discovery uses: the data socket's bind address decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Interfaces {
    /// Bound to every interface: every IPv4 interface that is up, loopback excepted.
    All,
    /// Bound to one address: the interface that has it.
    Only(Ipv4Addr),
}

/// LAN discovery's part of the node.
#[derive(Debug)]
pub(crate) struct Lan {
    machine: Mutex<LanMachine>,
    /// Wakes the driver when the machine may have something to send now.
    wake: Notify,
    interfaces: Interfaces,
    /// Set when the multicast socket could not be set up: LAN discovery is then off.
    failed: AtomicBool,
    /// What the DHT being unreachable has caused (see `offline.rs`).
    pub(super) offline: Mutex<Offline>,
}

impl Lan {
    /// LAN discovery for a node with `settings` whose data socket is at `local`, or `None`
    /// when it is switched off or the node is bound to loopback (no network segment).
    pub(super) fn new(settings: &Settings, local: SocketAddr) -> Option<Self> {
        let ip = *settings.bind.ip();
        if !settings.lan_discovery || ip.is_loopback() {
            return None;
        }
        let interfaces = if ip.is_unspecified() {
            Interfaces::All
        } else {
            Interfaces::Only(ip)
        };
        let machine = LanMachine::new(
            local.port(),
            settings.lan_announce_interval,
            Box::new(random_nonce),
        );
        Some(Self {
            machine: Mutex::new(machine),
            wake: Notify::new(),
            interfaces,
            failed: AtomicBool::new(false),
            offline: Mutex::new(Offline::default()),
        })
    }

    fn machine(&self) -> MutexGuard<'_, LanMachine> {
        self.machine.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn random_nonce() -> Nonce {
    let mut n = [0u8; 16];
    if getrandom::fill(&mut n).is_err() {
        // No OS randomness: a nonce from the clock still differs per packet (a nonce only
        // has to be fresh, not secret).
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        n = t.to_be_bytes();
    }
    n
}

/// The multicast socket: bound to the group's address (so only the group's datagrams
/// arrive), shared with other nodes on this host, TTL 1 (never routed), looped back (two
/// nodes on one host find each other; the machine drops its own packets).
fn bind_group() -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_multicast_ttl_v4(1)?;
    socket.set_multicast_loop_v4(true)?;
    let group = SocketAddr::V4(LAN_DISCOVERY_GROUP);
    if socket.bind(&group.into()).is_err() {
        // Systems that do not bind to a multicast address: the port on every address.
        let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, LAN_DISCOVERY_GROUP.port()));
        socket.bind(&any.into())?;
    }
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// The IPv4 addresses of the interfaces to use now.
fn current_interfaces(which: Interfaces) -> Vec<Ipv4Addr> {
    let all = match if_addrs::get_if_addrs() {
        Ok(all) => all,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list network interfaces");
            return Vec::new();
        }
    };
    let mut out: Vec<Ipv4Addr> = all
        .iter()
        .filter(|i| i.is_oper_up() && !i.is_loopback())
        .filter_map(|i| match i.ip() {
            std::net::IpAddr::V4(ip) => Some(ip),
            std::net::IpAddr::V6(_) => None,
        })
        .filter(|ip| match which {
            Interfaces::All => true,
            Interfaces::Only(only) => *ip == only,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

impl Node {
    /// Whether LAN discovery runs (on, not bound to loopback, its socket set up).
    pub(crate) fn lan_on(&self) -> bool {
        self.lan
            .as_ref()
            .is_some_and(|l| !l.failed.load(Ordering::Relaxed))
    }

    /// Announces `topic` on the LAN from now on.
    pub(crate) fn lan_advertise(&self, topic: TopicHash) {
        if let Some(lan) = &self.lan {
            lan.machine().advertise(Instant::now(), topic);
            lan.wake.notify_one();
        }
    }

    /// Looks for `topic`'s peers on the LAN from now on; returns until when answers to the
    /// first query may still arrive (`None` without LAN discovery).
    pub(crate) fn lan_seek(&self, topic: TopicHash) -> Option<tokio::time::Instant> {
        let lan = self.lan.as_ref()?;
        let first = lan.machine().seek(Instant::now(), topic);
        lan.wake.notify_one();
        Some(tokio::time::Instant::from_std(first + ANSWER_WAIT))
    }

    /// `lookup`'s candidates: the LAN candidates of `topic` first (so a peer found on both
    /// is listed at its LAN address), then `others`, at most [`MAX_CANDIDATES`]. Waits until
    /// `answers_until` first, so that answers to a first query are in.
    pub(crate) async fn with_lan_candidates(
        &self,
        topic: TopicHash,
        answers_until: Option<tokio::time::Instant>,
        others: Vec<SocketAddr>,
    ) -> Vec<SocketAddr> {
        let Some(lan) = &self.lan else {
            return others;
        };
        if let Some(until) = answers_until.filter(|_| self.lan_on()) {
            tokio::time::sleep_until(until).await;
        }
        let mut out: Vec<SocketAddr> = lan
            .machine()
            .candidates(Instant::now(), &topic)
            .into_iter()
            .map(SocketAddr::V4)
            .collect();
        for addr in others {
            if out.len() >= MAX_CANDIDATES {
                break;
            }
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
        out.truncate(MAX_CANDIDATES);
        out
    }

    /// LAN discovery's counters.
    pub(crate) fn lan_stats(&self) -> LanStats {
        self.lan
            .as_ref()
            .map(|l| l.machine().stats())
            .unwrap_or_default()
    }

    /// LAN discovery's task: owns the multicast socket until shutdown.
    pub(super) async fn lan_driver(self: Arc<Self>) {
        let Some(lan) = &self.lan else {
            return;
        };
        let socket = match bind_group() {
            Ok(s) => s,
            Err(e) => {
                lan.failed.store(true, Ordering::Relaxed);
                tracing::warn!(group = %LAN_DISCOVERY_GROUP, error = %e, "LAN discovery is off: cannot set up its multicast socket");
                return;
            }
        };
        let mut joined: Vec<Ipv4Addr> = Vec::new();
        let mut rescan = tokio::time::interval(IFACE_RESCAN);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let redial_every = self.settings.lookup_interval;
        let mut redial =
            tokio::time::interval_at(tokio::time::Instant::now() + redial_every, redial_every);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One byte more than the longest packet, so a longer datagram is seen as such.
        let mut buf = vec![0u8; MAX_PACKET_BYTES + 1];
        loop {
            let wake = lan.machine().next_wake();
            let due = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = rescan.tick() => self.lan_rescan(lan, &socket, &mut joined),
                _ = redial.tick() => self.lan_redial(lan),
                () = lan.wake.notified() => {}
                () = due => {}
                received = socket.recv_from(&mut buf) => match received {
                    Ok((n, SocketAddr::V4(from))) => {
                        let found = lan.machine().on_datagram(Instant::now(), from, &buf[..n]);
                        if !found.is_empty() {
                            self.lan_found(found);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // Not the remote's doing (the socket is unconnected); do not spin
                        // if it persists.
                        tracing::debug!(error = %e, "receiving on the LAN discovery socket failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
            let out = lan.machine().poll_transmit(Instant::now());
            for t in out {
                send(&socket, &t);
            }
        }
    }

    /// Joins the group on new interfaces, leaves it on gone ones, and tells the machine.
    fn lan_rescan(&self, lan: &Lan, socket: &UdpSocket, joined: &mut Vec<Ipv4Addr>) {
        let now = current_interfaces(lan.interfaces);
        let group = *LAN_DISCOVERY_GROUP.ip();
        for gone in joined.iter().filter(|i| !now.contains(i)) {
            let _ = socket.leave_multicast_v4(group, *gone);
        }
        joined.retain(|i| now.contains(i));
        for new in now
            .iter()
            .filter(|i| !joined.contains(i))
            .copied()
            .collect::<Vec<_>>()
        {
            match socket.join_multicast_v4(group, new) {
                Ok(()) => {
                    tracing::debug!(interface = %new, "LAN discovery joined the multicast group");
                    joined.push(new);
                }
                Err(e) => {
                    tracing::debug!(interface = %new, error = %e, "cannot join the LAN discovery group")
                }
            }
        }
        lan.machine().set_interfaces(Instant::now(), joined.clone());
    }

    /// Dials the LAN candidates `found` on topics the application takes connections on.
    fn lan_found(self: &Arc<Self>, found: Vec<(TopicHash, SocketAddrV4)>) {
        let mut by_topic: HashMap<TopicHash, Vec<SocketAddr>> = HashMap::new();
        {
            let st = self.state();
            for (topic, addr) in found {
                if st.topics.is_accepting(&topic) {
                    by_topic
                        .entry(topic)
                        .or_default()
                        .push(SocketAddr::V4(addr));
                }
            }
        }
        for (topic, addrs) in by_topic {
            let node = self.clone();
            self.spawn(async move {
                let mut round = DialRound::new(topic);
                round.offer(&node, addrs);
                let budget = tokio::time::Instant::now() + LOOKUP_CHECK_BUDGET;
                round.finish(&node, budget).await;
            });
        }
    }

    /// Offers every LAN candidate again (each lookup interval): what failed is retried once
    /// its backoff has passed, without waiting for the peer's next announce.
    fn lan_redial(self: &Arc<Self>, lan: &Lan) {
        let all = lan.machine().all_candidates(Instant::now());
        if !all.is_empty() {
            self.lan_found(all);
        }
    }
}

/// Multicasts one packet from its interface (best effort, as every datagram).
fn send(socket: &UdpSocket, t: &Transmit) {
    let via = socket2::SockRef::from(socket).set_multicast_if_v4(&t.via);
    if let Err(e) = via {
        tracing::debug!(interface = %t.via, error = %e, "cannot pick the interface for LAN discovery");
        return;
    }
    if let Err(e) = socket.try_send_to(&t.bytes, SocketAddr::V4(LAN_DISCOVERY_GROUP)) {
        tracing::debug!(interface = %t.via, error = %e, "a LAN discovery packet was not sent");
    }
}
