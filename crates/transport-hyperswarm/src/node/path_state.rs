//! Pure: the path choice of one connection in Auto mode, made through a relay or made
//! directly: which direct endpoints of the peer are candidates, when to probe them, which
//! one is proven, and when the connection's packets go direct or back through the relay. Inputs are the peer's
//! candidates (sent over the connection), authenticated probes received and the clock;
//! outputs are probes to send and path switches. No I/O and no clock of its own, so every
//! rule is unit-tested in milliseconds.
//!
//! The rules, in Tailscale's and iroh's manner:
//! - Both sides send their candidates as soon as the connection is up and again every
//!   [`CANDIDATES_EVERY`] while relayed (they travel as unreliable QUIC datagrams), and
//!   probe each candidate of the peer at once when it arrives, then every [`PROBE_EVERY`]:
//!   both punch at the same moment, one round trip through the relay after the connection
//!   is up.
//! - A ping received (already authenticated) is answered with a pong to where it came from,
//!   and that address becomes a candidate probed at once (ICE's triggered check: the NAT
//!   mapping the peer's packet came through is the one most likely to work back).
//! - An answered ping proves its endpoint: the connection goes direct there.
//! - While direct, the endpoint is pinged every [`HEARTBEAT_EVERY`]. No pong for
//!   [`SUSPECT`] makes the path suspect: packets go both ways (direct and through the
//!   relay; QUIC drops the duplicate copies by packet number) until a pong clears it, so a
//!   dying path costs less than the full silence; no pong for [`SILENCE`] puts the
//!   connection back on the relay, and probing goes on, so it goes direct again when an
//!   endpoint answers later.
//! - A connection made directly ([`PathMachine::made_direct`]) starts direct at the peer's
//!   address `E`, its only candidate (quinn addresses the peer there), and has a relay to
//!   fall back to only once the peers have shared a relay route ([`Input::Route`]). With a
//!   route the same rules apply (heartbeats, suspect, silence, probing `E` while relayed);
//!   without one nothing is probed (QUIC's keep-alives are all, as in Hyperswarm mode), and
//!   losing the route while relayed puts it back on `E` (there is no other path).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

/// How often candidates are sent while the connection is relayed.
pub(crate) const CANDIDATES_EVERY: Duration = Duration::from_secs(2);

/// How often each candidate is probed while the connection is relayed.
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(1);

/// How often the direct endpoint is pinged while the connection uses it.
pub(crate) const HEARTBEAT_EVERY: Duration = Duration::from_millis(400);

/// How long the direct endpoint may leave pings unanswered before packets also go through
/// the relay (two heartbeats missed).
pub(crate) const SUSPECT: Duration = Duration::from_millis(900);

/// How long the direct endpoint may leave pings unanswered before the connection goes back
/// to the relay.
pub(crate) const SILENCE: Duration = Duration::from_secs(2);

/// Most candidates kept per connection (the peer's own list and addresses it pinged from):
/// a hostile peer cannot make us probe more.
pub(crate) const MAX_CANDIDATES: usize = 8;

/// Pings per candidate whose pong is still accepted (older nonces are forgotten).
const OUTSTANDING: usize = 8;

/// A triggered check is not repeated sooner than this for one address.
const TRIGGER_GAP: Duration = Duration::from_millis(100);

/// What happens to the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Input {
    /// The connection is up (relayed).
    Start,
    /// Time passed (the driver calls at [`PathMachine::next_wakeup`] at the latest).
    Tick,
    /// The peer's candidates arrived over the connection.
    Candidates(Vec<SocketAddr>),
    /// An authenticated ping from `from`.
    Ping {
        /// Where it came from.
        from: SocketAddr,
        /// Its nonce (echoed in the pong).
        nonce: u64,
    },
    /// An authenticated pong from `from`.
    Pong {
        /// Where it came from.
        from: SocketAddr,
        /// The nonce of the ping it answers.
        nonce: u64,
    },
    /// A connection made directly: a relay route to the peer is there (`true`: learned or
    /// changed) or gone (`false`).
    Route(bool),
}

/// What the driver does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send our candidates over the connection.
    SendCandidates,
    /// Send an authenticated ping to `to` over UDP.
    Ping {
        /// The candidate.
        to: SocketAddr,
        /// The ping's nonce.
        nonce: u64,
    },
    /// Send an authenticated pong to `to` over UDP.
    Pong {
        /// Where the ping came from.
        to: SocketAddr,
        /// The ping's nonce.
        nonce: u64,
    },
    /// `addr` is the peer (it proved it): packets from it belong to this connection.
    Learn(SocketAddr),
    /// Send the connection's packets to `addr` over UDP from now on.
    UseDirect(SocketAddr),
    /// Send the connection's packets through the relay from now on.
    UseRelay,
    /// While direct: also send every packet through the relay (`true`: the direct path is
    /// suspect) or not any more (`false`: it answered).
    AlsoRelay(bool),
}

/// Where the connection's packets go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Current {
    /// Through the relay.
    Relay,
    /// Over UDP to this proven endpoint.
    Direct(SocketAddr),
}

#[derive(Debug)]
struct Candidate {
    addr: SocketAddr,
    next_ping: Instant,
    last_triggered: Option<Instant>,
    outstanding: Vec<u64>,
    last_pong: Option<Instant>,
}

/// The path choice of one relayed connection.
#[derive(Debug)]
pub(crate) struct PathMachine {
    candidates: Vec<Candidate>,
    current: Current,
    /// When the current direct endpoint last answered (or was chosen).
    heard: Instant,
    next_candidates: Option<Instant>,
    next_nonce: u64,
    switches: u64,
    /// While direct: the endpoint missed [`SUSPECT`] worth of pongs.
    suspect: bool,
    /// A connection made directly: its peer's address, its only candidate.
    fixed: Option<SocketAddr>,
    /// Whether a relay route is there to fall back to (always, for a relay-made connection).
    relay: bool,
}

impl PathMachine {
    /// A machine whose nonces start at `first_nonce` (random in the driver, so nonces of
    /// two connections do not line up).
    pub(crate) fn new(now: Instant, first_nonce: u64) -> Self {
        Self {
            candidates: Vec::new(),
            current: Current::Relay,
            heard: now,
            next_candidates: None,
            next_nonce: first_nonce,
            switches: 0,
            suspect: false,
            fixed: None,
            relay: true,
        }
    }

    /// The machine of a connection made directly to `addr`: direct there, with no relay
    /// route yet.
    pub(crate) fn made_direct(now: Instant, first_nonce: u64, addr: SocketAddr) -> Self {
        let mut m = Self::new(now, first_nonce);
        m.fixed = Some(addr);
        m.relay = false;
        m.current = Current::Direct(addr);
        m.add(addr, now);
        m
    }

    /// Where the connection's packets go now.
    #[cfg(test)]
    pub(crate) fn current(&self) -> Current {
        self.current
    }

    /// How many times the path changed.
    #[cfg(test)]
    pub(crate) fn switches(&self) -> u64 {
        self.switches
    }

    /// When [`Input::Tick`] is due at the latest.
    pub(crate) fn next_wakeup(&self) -> Option<Instant> {
        if !self.relay {
            return None;
        }
        match self.current {
            Current::Direct(addr) => {
                let ping = self
                    .candidates
                    .iter()
                    .find(|c| c.addr == addr)
                    .map(|c| c.next_ping);
                let silent = self.heard + if self.suspect { SILENCE } else { SUSPECT };
                Some(ping.map_or(silent, |p| p.min(silent)))
            }
            Current::Relay => self
                .candidates
                .iter()
                .map(|c| c.next_ping)
                .chain(self.next_candidates)
                .min(),
        }
    }

    fn nonce(&mut self) -> u64 {
        self.next_nonce = self.next_nonce.wrapping_add(1);
        self.next_nonce
    }

    /// Pings candidate `i` now.
    fn ping(&mut self, i: usize, now: Instant, out: &mut Vec<Action>) {
        let nonce = self.nonce();
        let direct = self.current == Current::Direct(self.candidates[i].addr);
        let c = &mut self.candidates[i];
        if c.outstanding.len() == OUTSTANDING {
            c.outstanding.remove(0);
        }
        c.outstanding.push(nonce);
        c.next_ping = now + if direct { HEARTBEAT_EVERY } else { PROBE_EVERY };
        out.push(Action::Ping { to: c.addr, nonce });
    }

    /// Adds `addr` as a candidate (unless known, unusable, or the list is full); its index.
    fn add(&mut self, addr: SocketAddr, now: Instant) -> Option<usize> {
        if let Some(i) = self.candidates.iter().position(|c| c.addr == addr) {
            return Some(i);
        }
        if !usable(&addr)
            || self.candidates.len() >= MAX_CANDIDATES
            || self.fixed.is_some_and(|f| f != addr)
        {
            return None;
        }
        self.candidates.push(Candidate {
            addr,
            next_ping: now,
            last_triggered: None,
            outstanding: Vec::new(),
            last_pong: None,
        });
        Some(self.candidates.len() - 1)
    }

    /// Applies `input` at `now`; what to do, in order.
    pub(crate) fn on_event(&mut self, now: Instant, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Start if self.fixed.is_some() => {}
            Input::Start => {
                out.push(Action::SendCandidates);
                self.next_candidates = Some(now + CANDIDATES_EVERY);
            }
            Input::Route(there) => self.on_route(there, now, &mut out),
            Input::Candidates(addrs) => {
                for addr in addrs {
                    let known = self.candidates.iter().any(|c| c.addr == addr);
                    if let Some(i) = self.add(addr, now)
                        && !known
                        && self.current == Current::Relay
                    {
                        self.ping(i, now, &mut out);
                    }
                }
            }
            Input::Ping { from, nonce } => {
                if self.fixed.is_none() {
                    out.push(Action::Learn(from));
                }
                out.push(Action::Pong { to: from, nonce });
                if self.current == Current::Relay
                    && let Some(i) = self.add(from, now)
                {
                    let c = &self.candidates[i];
                    let recent = c
                        .last_triggered
                        .is_some_and(|t| now.saturating_duration_since(t) < TRIGGER_GAP);
                    if !recent {
                        self.candidates[i].last_triggered = Some(now);
                        self.ping(i, now, &mut out);
                    }
                }
            }
            Input::Pong { from, nonce } => {
                let Some(c) = self
                    .candidates
                    .iter_mut()
                    .find(|c| c.addr == from && c.outstanding.contains(&nonce))
                else {
                    return out;
                };
                c.outstanding.retain(|n| *n != nonce);
                c.last_pong = Some(now);
                match self.current {
                    Current::Direct(addr) if addr == from => {
                        self.heard = now;
                        if self.suspect {
                            self.suspect = false;
                            out.push(Action::AlsoRelay(false));
                        }
                    }
                    Current::Direct(_) => {}
                    Current::Relay => {
                        if self.fixed.is_none() {
                            out.push(Action::Learn(from));
                        }
                        self.switch(Current::Direct(from), now, &mut out);
                        let i = self.candidates.iter().position(|c| c.addr == from);
                        if let Some(c) = i.map(|i| &mut self.candidates[i]) {
                            c.next_ping = now + HEARTBEAT_EVERY;
                        }
                    }
                }
            }
            Input::Tick => {}
        }
        self.tick(now, &mut out);
        out
    }

    fn switch(&mut self, to: Current, now: Instant, out: &mut Vec<Action>) {
        self.current = to;
        self.suspect = false;
        self.heard = now;
        self.switches += 1;
        match to {
            Current::Direct(addr) => {
                self.next_candidates = None;
                out.push(Action::UseDirect(addr));
            }
            Current::Relay => {
                if self.fixed.is_none() {
                    self.next_candidates = Some(now);
                }
                out.push(Action::UseRelay);
            }
        }
    }

    /// A direct-made connection's relay route came (or changed) or went.
    fn on_route(&mut self, there: bool, now: Instant, out: &mut Vec<Action>) {
        let Some(addr) = self.fixed else {
            return;
        };
        let had = self.relay;
        self.relay = there;
        match (there, self.current) {
            (true, Current::Direct(_)) if !had => {
                // Silence is counted from now, with a heartbeat at once.
                self.heard = now;
                if let Some(c) = self.candidates.first_mut() {
                    c.next_ping = now;
                }
            }
            (true, _) => {}
            (false, Current::Relay) => self.switch(Current::Direct(addr), now, out),
            (false, Current::Direct(_)) => {
                if self.suspect {
                    self.suspect = false;
                    out.push(Action::AlsoRelay(false));
                }
            }
        }
    }

    /// Whatever is due at `now`: silence, pings, candidates.
    fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !self.relay {
            // Nothing to fall back to: nothing to watch.
            return;
        }
        if let Current::Direct(_) = self.current
            && !self.suspect
            && now.saturating_duration_since(self.heard) >= SUSPECT
            && now.saturating_duration_since(self.heard) < SILENCE
        {
            self.suspect = true;
            out.push(Action::AlsoRelay(true));
        }
        if let Current::Direct(_) = self.current
            && now.saturating_duration_since(self.heard) >= SILENCE
        {
            self.switch(Current::Relay, now, out);
            // Probe every candidate again from now on.
            for c in &mut self.candidates {
                c.next_ping = c.next_ping.min(now + PROBE_EVERY);
            }
        }
        match self.current {
            Current::Direct(addr) => {
                if let Some(i) = self.candidates.iter().position(|c| c.addr == addr)
                    && self.candidates[i].next_ping <= now
                {
                    self.ping(i, now, out);
                }
            }
            Current::Relay => {
                for i in 0..self.candidates.len() {
                    if self.candidates[i].next_ping <= now {
                        self.ping(i, now, out);
                    }
                }
                if self.next_candidates.is_some_and(|t| t <= now) {
                    out.push(Action::SendCandidates);
                    self.next_candidates = Some(now + CANDIDATES_EVERY);
                }
            }
        }
    }
}

/// Whether `addr` can be a direct endpoint: IPv4 (the data socket's family), a unicast
/// address with a port, never a virtual address.
pub(crate) fn usable(addr: &SocketAddr) -> bool {
    match addr {
        SocketAddr::V4(v4) => {
            let ip = v4.ip();
            v4.port() != 0
                && !ip.is_unspecified()
                && !ip.is_multicast()
                && !ip.is_broadcast()
                && !crate::path::is_virtual(addr)
        }
        SocketAddr::V6(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn pings(actions: &[Action]) -> Vec<(SocketAddr, u64)> {
        actions
            .iter()
            .filter_map(|x| match x {
                Action::Ping { to, nonce } => Some((*to, *nonce)),
                _ => None,
            })
            .collect()
    }

    /// Runs the machine's ticks from `from` to `to` in 10 ms steps; every action.
    fn run(m: &mut PathMachine, from: Instant, to: Instant) -> Vec<(Duration, Action)> {
        let mut out = Vec::new();
        let mut t = from;
        while t <= to {
            for x in m.on_event(t, Input::Tick) {
                out.push((t - from, x));
            }
            t += Duration::from_millis(10);
        }
        out
    }

    #[test]
    fn start_sends_candidates_then_probes_each_candidate_at_once() {
        let t0 = Instant::now();
        let mut m = PathMachine::new(t0, 100);
        assert_eq!(m.on_event(t0, Input::Start), vec![Action::SendCandidates]);
        let got = m.on_event(
            t0 + Duration::from_millis(5),
            Input::Candidates(vec![a("10.0.0.2:4000"), a("192.168.1.2:4000")]),
        );
        assert_eq!(
            pings(&got),
            vec![(a("10.0.0.2:4000"), 101), (a("192.168.1.2:4000"), 102)]
        );
        assert_eq!(m.current(), Current::Relay);
        // The same list again probes nothing new.
        let again = m.on_event(
            t0 + Duration::from_millis(6),
            Input::Candidates(vec![a("10.0.0.2:4000")]),
        );
        assert!(pings(&again).is_empty(), "{again:?}");
        // Then every second, and candidates every 2 s.
        let later = run(
            &mut m,
            t0 + Duration::from_millis(10),
            t0 + Duration::from_millis(2010),
        );
        let ping_times: Vec<Duration> = later
            .iter()
            .filter(|(_, x)| matches!(x, Action::Ping { .. }))
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(ping_times.len(), 4, "{later:?}");
        assert!(later.iter().any(|(_, x)| *x == Action::SendCandidates));
    }

    #[test]
    fn a_pong_to_an_outstanding_ping_proves_the_endpoint() {
        let t0 = Instant::now();
        let mut m = PathMachine::new(t0, 0);
        m.on_event(t0, Input::Start);
        let e = a("10.0.0.2:4000");
        let nonce = pings(&m.on_event(t0, Input::Candidates(vec![e])))[0].1;
        // A pong with a wrong nonce, or from elsewhere, proves nothing.
        let t1 = t0 + Duration::from_millis(3);
        assert!(
            m.on_event(
                t1,
                Input::Pong {
                    from: e,
                    nonce: nonce + 7
                }
            )
            .is_empty()
        );
        assert!(
            m.on_event(
                t1,
                Input::Pong {
                    from: a("10.0.0.9:4000"),
                    nonce
                }
            )
            .is_empty()
        );
        assert_eq!(m.current(), Current::Relay);
        let got = m.on_event(t1, Input::Pong { from: e, nonce });
        assert_eq!(got, vec![Action::Learn(e), Action::UseDirect(e)]);
        assert_eq!(m.current(), Current::Direct(e));
        // A replayed pong changes nothing.
        assert!(m.on_event(t1, Input::Pong { from: e, nonce }).is_empty());
        assert_eq!(m.switches(), 1);
    }

    #[test]
    fn a_ping_is_answered_and_its_source_probed_once() {
        let t0 = Instant::now();
        let mut m = PathMachine::new(t0, 0);
        let s = a("203.0.113.5:6000");
        let got = m.on_event(t0, Input::Ping { from: s, nonce: 42 });
        assert_eq!(got[0], Action::Learn(s));
        assert_eq!(got[1], Action::Pong { to: s, nonce: 42 });
        assert_eq!(pings(&got).len(), 1, "triggered check: {got:?}");
        let again = m.on_event(
            t0 + Duration::from_millis(20),
            Input::Ping { from: s, nonce: 43 },
        );
        assert_eq!(
            again,
            vec![Action::Learn(s), Action::Pong { to: s, nonce: 43 }]
        );
    }

    #[test]
    fn silence_while_direct_goes_back_to_the_relay_and_an_answer_upgrades_again() {
        let t0 = Instant::now();
        let mut m = PathMachine::new(t0, 0);
        m.on_event(t0, Input::Start);
        let e = a("10.0.0.2:4000");
        let nonce = pings(&m.on_event(t0, Input::Candidates(vec![e])))[0].1;
        m.on_event(t0, Input::Pong { from: e, nonce });
        assert_eq!(m.current(), Current::Direct(e));
        // Answered heartbeats keep it direct for 10 s.
        let mut t = t0;
        let end = t0 + Duration::from_secs(10);
        while t < end {
            t += Duration::from_millis(10);
            for x in m.on_event(t, Input::Tick) {
                if let Action::Ping { to, nonce } = x {
                    assert_eq!(to, e);
                    let answer =
                        m.on_event(t + Duration::from_millis(1), Input::Pong { from: e, nonce });
                    assert!(answer.iter().all(|x| !matches!(x, Action::UseRelay)));
                }
                assert_ne!(x, Action::UseRelay, "at {:?}", t - t0);
            }
        }
        assert_eq!(m.current(), Current::Direct(e));
        // Blackholed at `end`: back on the relay within SILENCE (+ a heartbeat).
        let blackholed = run(&mut m, end, end + Duration::from_secs(3));
        let (at, _) = blackholed
            .iter()
            .find(|(_, x)| *x == Action::UseRelay)
            .expect("falls back");
        // The last pong came at most 1 ms after `end`; ticks are 10 ms apart.
        let late = SILENCE + Duration::from_millis(11);
        assert!(*at <= late && *at >= SILENCE - HEARTBEAT_EVERY, "{at:?}");
        let (suspect_at, _) = blackholed
            .iter()
            .find(|(_, x)| *x == Action::AlsoRelay(true))
            .expect("suspect first");
        assert!(
            *suspect_at < *at && *suspect_at >= SUSPECT - HEARTBEAT_EVERY,
            "{suspect_at:?}"
        );
        assert!(blackholed.iter().any(|(_, x)| *x == Action::SendCandidates));
        assert_eq!(m.current(), Current::Relay);
        // Still probing; the first answer upgrades again.
        let t2 = end + Duration::from_secs(4);
        let probes = pings(&m.on_event(t2, Input::Tick));
        let probes = if probes.is_empty() {
            pings(&m.on_event(t2 + PROBE_EVERY, Input::Tick))
        } else {
            probes
        };
        let (to, nonce) = probes[0];
        assert_eq!(to, e);
        let got = m.on_event(t2 + PROBE_EVERY, Input::Pong { from: e, nonce });
        assert!(got.contains(&Action::UseDirect(e)), "{got:?}");
        assert_eq!(m.switches(), 3);
    }

    #[test]
    fn wakeups_cover_every_deadline() {
        let t0 = Instant::now();
        let mut m = PathMachine::new(t0, 0);
        assert_eq!(m.next_wakeup(), None, "nothing to do yet");
        m.on_event(t0, Input::Start);
        assert_eq!(m.next_wakeup(), Some(t0 + CANDIDATES_EVERY));
        let e = a("10.0.0.2:4000");
        let nonce = pings(&m.on_event(t0, Input::Candidates(vec![e])))[0].1;
        assert_eq!(m.next_wakeup(), Some(t0 + PROBE_EVERY));
        m.on_event(t0, Input::Pong { from: e, nonce });
        assert_eq!(m.next_wakeup(), Some(t0 + HEARTBEAT_EVERY));
    }

    #[test]
    fn a_suspect_path_is_doubled_through_the_relay_until_it_answers() {
        let t0 = Instant::now();
        let mut m = PathMachine::new(t0, 0);
        let e = a("10.0.0.2:4000");
        let nonce = pings(&m.on_event(t0, Input::Candidates(vec![e])))[0].1;
        m.on_event(t0, Input::Pong { from: e, nonce });
        // Heartbeats go unanswered for SUSPECT.
        let quiet = run(&mut m, t0, t0 + SUSPECT);
        assert_eq!(
            quiet
                .iter()
                .filter(|(_, x)| *x == Action::AlsoRelay(true))
                .count(),
            1,
            "{quiet:?}"
        );
        assert_eq!(m.current(), Current::Direct(e), "still direct");
        // The next heartbeat is answered: no more doubling, still direct.
        let t1 = t0 + SUSPECT + Duration::from_millis(20);
        let (to, nonce) = pings(&m.on_event(t1 + HEARTBEAT_EVERY, Input::Tick))[0];
        assert_eq!(to, e);
        let got = m.on_event(t1 + HEARTBEAT_EVERY, Input::Pong { from: e, nonce });
        assert_eq!(got, vec![Action::AlsoRelay(false)]);
        assert_eq!(m.current(), Current::Direct(e));
    }

    #[test]
    fn candidates_are_bounded_and_checked() {
        let t0 = Instant::now();
        let mut m = PathMachine::new(t0, 0);
        let many: Vec<SocketAddr> = (1..=40)
            .map(|i| SocketAddr::from(([10, 0, 0, i as u8], 4000)))
            .chain([
                a("0.0.0.0:4000"),
                a("10.0.0.1:0"),
                a("240.0.0.1:1"),
                a("[::1]:4000"),
                a("239.1.1.1:4000"),
            ])
            .collect();
        let got = m.on_event(t0, Input::Candidates(many));
        assert_eq!(pings(&got).len(), MAX_CANDIDATES);
        assert!(!usable(&a("240.0.0.1:1")) && !usable(&a("0.0.0.0:4000")));
        assert!(usable(&a("127.0.0.1:4000")));
        // Pings from anywhere are still answered, but add no candidate beyond the bound.
        let got = m.on_event(
            t0,
            Input::Ping {
                from: a("10.9.9.9:1"),
                nonce: 1,
            },
        );
        assert_eq!(pings(&got).len(), 0);
        assert!(got.contains(&Action::Pong {
            to: a("10.9.9.9:1"),
            nonce: 1
        }));
    }

    /// Answers every ping `m` sends from `from` to `to` (1 ms later) while running ticks.
    fn run_answered(m: &mut PathMachine, from: Instant, to: Instant) -> Vec<(Duration, Action)> {
        let mut out = Vec::new();
        let mut t = from;
        while t <= to {
            for x in m.on_event(t, Input::Tick) {
                if let Action::Ping { to, nonce } = x {
                    let answer = t + Duration::from_millis(1);
                    out.extend(
                        m.on_event(answer, Input::Pong { from: to, nonce })
                            .into_iter()
                            .map(|y| (answer - from, y)),
                    );
                }
                out.push((t - from, x));
            }
            t += Duration::from_millis(10);
        }
        out
    }

    #[test]
    fn a_direct_made_connection_without_a_route_stays_as_it_is() {
        let t0 = Instant::now();
        let e = a("10.0.0.2:4000");
        let mut m = PathMachine::made_direct(t0, 0, e);
        assert_eq!(m.current(), Current::Direct(e), "starts direct");
        assert!(
            m.on_event(t0, Input::Start).is_empty(),
            "no candidates to send"
        );
        assert_eq!(m.next_wakeup(), None);
        // Silence for 10 s: nothing to fall back to, nothing probed.
        assert!(run(&mut m, t0, t0 + Duration::from_secs(10)).is_empty());
        assert_eq!(m.current(), Current::Direct(e));
        // Candidates are not taken (quinn addresses the peer at `e`), pings are answered.
        let other = a("10.0.0.3:4000");
        assert!(m.on_event(t0, Input::Candidates(vec![other])).is_empty());
        assert_eq!(
            m.on_event(
                t0,
                Input::Ping {
                    from: other,
                    nonce: 5
                }
            ),
            vec![Action::Pong {
                to: other,
                nonce: 5
            }]
        );
        assert_eq!(m.switches(), 0);
    }

    #[test]
    fn a_direct_made_connection_falls_back_to_its_route_and_comes_back() {
        let t0 = Instant::now();
        let e = a("10.0.0.2:4000");
        let mut m = PathMachine::made_direct(t0, 0, e);
        m.on_event(t0, Input::Start);
        // The route is learned 5 s later: heartbeats start at once, silence counts from now.
        let t1 = t0 + Duration::from_secs(5);
        let got = m.on_event(t1, Input::Route(true));
        assert_eq!(pings(&got).len(), 1, "{got:?}");
        assert_eq!(pings(&got)[0].0, e);
        assert!(!got.contains(&Action::UseRelay));
        // Answered heartbeats keep it direct.
        let t2 = t1 + Duration::from_secs(5);
        let answered = run_answered(&mut m, t1, t2);
        assert!(
            answered
                .iter()
                .all(|(_, x)| matches!(x, Action::Ping { .. })),
            "{answered:?}"
        );
        assert_eq!(m.current(), Current::Direct(e));
        // The direct path dies: suspect (both ways), then the relay alone.
        let dark = run(&mut m, t2, t2 + Duration::from_secs(3));
        let at = |want: &Action| dark.iter().find(|(_, x)| x == want).map(|(t, _)| *t);
        let suspect = at(&Action::AlsoRelay(true)).expect("suspect");
        let relayed = at(&Action::UseRelay).expect("falls back");
        assert!(
            suspect < relayed && relayed <= SILENCE + Duration::from_millis(20),
            "{dark:?}"
        );
        assert_eq!(m.current(), Current::Relay);
        assert!(
            dark.iter()
                .all(|(_, x)| !matches!(x, Action::SendCandidates | Action::Learn(_))),
            "a direct-made connection has no candidates to send nor endpoints to learn"
        );
        // Relayed: `e` is probed every second; its answer puts the connection back there.
        let probing = run(
            &mut m,
            t2 + Duration::from_secs(3),
            t2 + Duration::from_secs(6),
        );
        let probes = pings(&probing.iter().map(|(_, x)| x.clone()).collect::<Vec<_>>());
        assert!((2..=4).contains(&probes.len()), "{probing:?}");
        assert!(probes.iter().all(|(to, _)| *to == e));
        let (_, nonce) = *probes.last().unwrap();
        let back = m.on_event(t2 + Duration::from_secs(6), Input::Pong { from: e, nonce });
        assert_eq!(back, vec![Action::UseDirect(e)]);
        assert_eq!(m.current(), Current::Direct(e));
        assert_eq!(m.switches(), 2);
    }

    #[test]
    fn a_direct_made_connection_losing_its_route_goes_back_to_its_address() {
        let t0 = Instant::now();
        let e = a("10.0.0.2:4000");
        // Lost while direct and fine: it keeps the direct path, and stops probing.
        let mut m = PathMachine::made_direct(t0, 0, e);
        m.on_event(t0, Input::Route(true));
        run_answered(&mut m, t0, t0 + Duration::from_secs(2));
        assert!(
            m.on_event(t0 + Duration::from_secs(2), Input::Route(false))
                .is_empty()
        );
        assert_eq!(m.current(), Current::Direct(e));
        assert_eq!(m.next_wakeup(), None);
        assert!(
            run(
                &mut m,
                t0 + Duration::from_secs(2),
                t0 + Duration::from_secs(8)
            )
            .is_empty()
        );
        // Lost while suspect: no more doubling.
        let mut m = PathMachine::made_direct(t0, 0, e);
        m.on_event(t0, Input::Route(true));
        let quiet = run(&mut m, t0, t0 + SUSPECT + Duration::from_millis(50));
        assert!(quiet.iter().any(|(_, x)| *x == Action::AlsoRelay(true)));
        let t1 = t0 + SUSPECT + Duration::from_millis(60);
        assert_eq!(
            m.on_event(t1, Input::Route(false)),
            vec![Action::AlsoRelay(false)]
        );
        assert_eq!(m.current(), Current::Direct(e));
        // Lost while relayed: back on `e`, the only path left; a new route resumes watching.
        let mut m = PathMachine::made_direct(t0, 0, e);
        m.on_event(t0, Input::Route(true));
        run(&mut m, t0, t0 + Duration::from_secs(3));
        assert_eq!(m.current(), Current::Relay);
        let t2 = t0 + Duration::from_secs(3);
        assert_eq!(
            m.on_event(t2, Input::Route(false)),
            vec![Action::UseDirect(e)]
        );
        assert_eq!(m.current(), Current::Direct(e));
        assert!(run(&mut m, t2, t2 + Duration::from_secs(5)).is_empty());
        let t3 = t2 + Duration::from_secs(5);
        assert_eq!(pings(&m.on_event(t3, Input::Route(true))).len(), 1);
        let again = run(&mut m, t3, t3 + Duration::from_secs(3));
        assert!(
            again.iter().any(|(_, x)| *x == Action::UseRelay),
            "{again:?}"
        );
    }

    #[test]
    fn a_route_for_a_relay_made_connection_changes_nothing() {
        let t0 = Instant::now();
        let mut m = PathMachine::new(t0, 0);
        m.on_event(t0, Input::Start);
        assert!(m.on_event(t0, Input::Route(false)).is_empty());
        assert_eq!(
            m.next_wakeup(),
            Some(t0 + CANDIDATES_EVERY),
            "still watching"
        );
    }
}
