//! The DHT node's request timeout, from round trips measured before it starts. `mainline`
//! fixes one timeout per node, and an iterative query (a lookup, or the one an announcement
//! rides on) ends only when every node it asked has answered or timed out: a single node that
//! never answers (a read-only or departed node that other nodes still list) holds the query,
//! and so the announcement, for the whole timeout. So the timeout is short where replies come
//! fast, and follows the link where they do not: read-only pings to the bootstrap nodes
//! measure it (the pure [`Probe`] and [`from_round_trips`]; [`measure`] is their blocking
//! driver on a throwaway socket). An explicit `dht_request_timeout` skips all this.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use crate::krpc;

/// The shortest request timeout: an answer from anywhere on a well-connected path comes within
/// this (round trips between continents stay under ~300 ms); later answers come from slow or
/// overloaded nodes, which a query does without (it asks the 20 closest nodes it knows at
/// once).
pub(crate) const FLOOR: Duration = Duration::from_millis(500);

/// The longest: `mainline`'s default, also used when no bootstrap node answered the probe
/// (offline, or a link slower than [`PROBE_TIMEOUT`]).
pub(crate) const CEILING: Duration = mainline::DEFAULT_REQUEST_TIMEOUT;

/// The timeout is this many times the slowest round trip measured: DHT nodes are farther and
/// busier than the bootstrap nodes.
const RTT_FACTOR: u32 = 3;

/// Bootstrap nodes pinged.
const MAX_PROBED: usize = 4;

/// How long the probe waits for a first answer.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// After the first answer, the others get as long again as it took, at least this.
const MIN_GRACE: Duration = Duration::from_millis(50);

/// The request timeout for measured round trips (none: [`CEILING`]).
pub(crate) fn from_round_trips(rtts: &[Duration]) -> Duration {
    match rtts.iter().max() {
        None => CEILING,
        Some(slowest) => (*slowest * RTT_FACTOR).clamp(FLOOR, CEILING),
    }
}

/// One round of pings sent at one moment, and the round trips of their answers.
#[derive(Debug)]
pub(crate) struct Probe {
    sent_at: Instant,
    answered: Vec<bool>,
    rtts: Vec<Duration>,
    deadline: Instant,
}

impl Probe {
    /// A round of `pings` sent at `now`.
    pub(crate) fn new(now: Instant, pings: usize) -> Self {
        Self {
            sent_at: now,
            answered: vec![false; pings],
            rtts: Vec::new(),
            deadline: now + PROBE_TIMEOUT,
        }
    }

    /// Until when to wait for more answers.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether waiting longer is pointless at `now`: every ping answered, or the deadline
    /// passed.
    pub(crate) fn is_done(&self, now: Instant) -> bool {
        now >= self.deadline || self.answered.iter().all(|a| *a)
    }

    /// Ping `index` was answered at `now` (a repeated answer counts once).
    pub(crate) fn on_answer(&mut self, now: Instant, index: usize) {
        let Some(answered) = self.answered.get_mut(index) else {
            return;
        };
        if *answered {
            return;
        }
        *answered = true;
        let rtt = now.saturating_duration_since(self.sent_at);
        if self.rtts.is_empty() {
            self.deadline = self.deadline.min(now + rtt.max(MIN_GRACE));
        }
        self.rtts.push(rtt);
    }

    /// The round trips measured, in the order the answers came.
    pub(crate) fn round_trips(&self) -> &[Duration] {
        &self.rtts
    }
}

/// Pings up to [`MAX_PROBED`] of `nodes` from a throwaway socket on `ip` (read-only pings:
/// nobody takes it for a DHT node) and returns the round trips of the answers (blocking, at
/// most [`PROBE_TIMEOUT`] plus the grace after a first answer).
pub(crate) fn measure(ip: Ipv4Addr, nodes: &[SocketAddrV4]) -> Vec<Duration> {
    let nodes = &nodes[..nodes.len().min(MAX_PROBED)];
    if nodes.is_empty() {
        return Vec::new();
    }
    let Ok(socket) = UdpSocket::bind((ip, 0)) else {
        return Vec::new();
    };
    let random = mainline::Id::random();
    let nonce = random.as_bytes();
    let node_id = *mainline::Id::random().as_bytes();
    // Transaction ids: three random bytes and the ping's index.
    let txid = |i: usize| [nonce[0], nonce[1], nonce[2], i as u8];
    let mut probe = Probe::new(Instant::now(), nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        let _ = socket.send_to(&krpc::encode_ping(txid(i), node_id), node);
    }
    let mut buf = [0u8; 1500];
    loop {
        let now = Instant::now();
        if probe.is_done(now) {
            break;
        }
        let wait = probe.deadline().saturating_duration_since(now);
        if socket
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .is_err()
        {
            break;
        }
        let Ok((n, SocketAddr::V4(from))) = socket.recv_from(&mut buf) else {
            // A timeout, an ICMP error surfacing, or IPv6 noise: check the deadline again.
            continue;
        };
        let Ok(reply) = krpc::decode_reply(&buf[..n]) else {
            continue;
        };
        let index = reply.txid.get(3).map(|i| usize::from(*i));
        if let Some(index) = index
            && reply.txid.len() == 4
            && reply.txid[..3] == nonce[..3]
            && nodes.get(index) == Some(&from)
        {
            probe.on_answer(Instant::now(), index);
        }
    }
    probe.round_trips().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_timeout_follows_the_slowest_round_trip_within_bounds() {
        assert_eq!(from_round_trips(&[]), CEILING, "nothing answered");
        assert_eq!(from_round_trips(&[MS, 2 * MS]), FLOOR, "loopback");
        assert_eq!(from_round_trips(&[40 * MS, 250 * MS]), 750 * MS);
        assert_eq!(
            from_round_trips(&[900 * MS]),
            CEILING,
            "slower than the ceiling allows"
        );
    }

    #[test]
    fn the_probe_waits_a_grace_after_the_first_answer_and_not_for_the_silent() {
        let t0 = Instant::now();
        let mut p = Probe::new(t0, 3);
        assert_eq!(p.deadline(), t0 + PROBE_TIMEOUT);
        assert!(!p.is_done(t0));
        p.on_answer(t0 + 80 * MS, 1);
        // As long again as the first answer took.
        assert_eq!(p.deadline(), t0 + 160 * MS);
        p.on_answer(t0 + 90 * MS, 1);
        assert_eq!(p.round_trips(), [80 * MS], "a repeated answer counts once");
        p.on_answer(t0 + 100 * MS, 7);
        assert_eq!(p.round_trips().len(), 1, "no such ping");
        p.on_answer(t0 + 150 * MS, 0);
        assert!(!p.is_done(t0 + 150 * MS), "one ping is still out");
        assert!(p.is_done(t0 + 160 * MS), "the silent one is not waited for");
        assert_eq!(from_round_trips(p.round_trips()), FLOOR);
    }

    #[test]
    fn fast_answers_get_the_minimum_grace_and_all_answered_ends_it() {
        let t0 = Instant::now();
        let mut p = Probe::new(t0, 2);
        p.on_answer(t0 + MS, 0);
        assert_eq!(p.deadline(), t0 + MS + MIN_GRACE);
        p.on_answer(t0 + 3 * MS, 1);
        assert!(p.is_done(t0 + 3 * MS));
        let silent = Probe::new(t0, 2);
        assert!(!silent.is_done(t0 + PROBE_TIMEOUT - MS));
        assert!(silent.is_done(t0 + PROBE_TIMEOUT));
        assert_eq!(from_round_trips(silent.round_trips()), CEILING);
    }

    #[test]
    fn measures_answering_nodes_and_ignores_silent_ones() {
        let lo = Ipv4Addr::LOCALHOST;
        // A node that answers pings the way a DHT node does, and one that never answers.
        let answering = UdpSocket::bind((lo, 0)).unwrap();
        let silent = UdpSocket::bind((lo, 0)).unwrap();
        let addr = |s: &UdpSocket| match s.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!(),
        };
        let nodes = [addr(&silent), addr(&answering)];
        let server = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            let (n, from) = answering.recv_from(&mut buf).unwrap();
            let ping = &buf[..n];
            assert!(ping.windows(9).any(|w| w == b"2:roi1e1:"), "read-only");
            let t = ping.windows(5).position(|w| w == b"1:t4:").unwrap() + 5;
            let mut reply = b"d1:rd2:id20:aaaaaaaaaaaaaaaaaaaae1:t4:".to_vec();
            reply.extend_from_slice(&ping[t..t + 4]);
            reply.extend_from_slice(b"1:y1:re");
            // A forged reply with another transaction id first: ignored.
            answering.send_to(b"d1:t4:zzzz1:y1:re", from).unwrap();
            answering.send_to(&reply, from).unwrap();
        });
        let rtts = measure(lo, &nodes);
        server.join().unwrap();
        assert_eq!(rtts.len(), 1, "{rtts:?}");
        assert!(measure(lo, &[]).is_empty());
    }
}
