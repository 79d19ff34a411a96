//! LAN discovery's state machine, pure (every input takes `now`; no sockets): which topics
//! this node announces and looks for, when the next announce or query is due, answering
//! queries (rate-limited), checking received packets (per-source and overall rate limits,
//! own and replayed nonces, tags), and the bounded, expiring table of LAN candidates. The
//! driver in `lan.rs` moves its packets and hands its candidates to the dial rounds.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use pluresdb_sync_core::TopicHash;
use pluresdb_sync_core::topic::{Domain, derive_from_topic};

use crate::lan_wire::{self, LanTag, MAX_TAGS, Nonce, Packet};

/// After the first announce (or query) of a topic, two more follow after 1 s and 3 s, so
/// that one lost multicast packet (common on Wi-Fi) does not cost a whole interval.
pub(crate) const BURST: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(2)];

/// Answers to queries: at most one announce round per this gap, however many queries
/// arrive (one multicast answer serves every querier). Short, so a newcomer that queries
/// right after another one still hears an answer within a few hundred milliseconds.
pub(crate) const ANSWER_GAP: Duration = Duration::from_millis(250);

/// How long `lookup` waits for answers after a topic's first query: one answer gap plus a
/// LAN round trip, with room for a busy host.
pub(crate) const ANSWER_WAIT: Duration = Duration::from_millis(500);

/// Most LAN candidates remembered (over all topics); expired ones go first, then the one
/// expiring soonest.
pub(crate) const MAX_LAN_CANDIDATES: usize = 256;

/// Most LAN candidates from one source IP: a host may run a few nodes, not hundreds.
pub(crate) const MAX_PER_SOURCE: usize = 8;

/// Longest validity of a LAN candidate, whatever its announce says.
pub(crate) const MAX_ENTRY_TTL: Duration = Duration::from_secs(60 * 60);

/// Packets taken from one source IP: a burst of 16, then 8 per second (a peer sends a
/// packet per announce, query and answer: far fewer).
const SOURCE_BURST: f64 = 16.0;
const SOURCE_RATE: f64 = 8.0;

/// Packets taken from everyone together per second (and burst): bounds the MACs computed
/// when many sources (or spoofed ones) send at once.
const GLOBAL_BURST: f64 = 256.0;
const GLOBAL_RATE: f64 = 256.0;

/// Most sources whose rate is tracked; beyond, idle ones are forgotten.
const MAX_SOURCES: usize = 256;

/// Nonces remembered to drop copies of a packet (replays) and this node's own packets.
const SEEN_NONCES: usize = 1024;
const OWN_NONCES: usize = 256;

/// Counters of what LAN discovery received and sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LanStats {
    /// Datagrams received on the multicast group.
    pub received: u64,
    /// Dropped before decoding: a source (or everyone together) over its rate.
    pub rate_limited: u64,
    /// Not a valid packet (wrong size, magic, version, fields).
    pub malformed: u64,
    /// A copy of a packet seen before (its nonce).
    pub replayed: u64,
    /// Valid packets with no tag of a topic this node is on (other topics, or forged).
    pub unmatched: u64,
    /// Packets with a tag of one of this node's topics.
    pub matched: u64,
    /// Candidates not stored: their source already has the most entries.
    pub refused: u64,
    /// Packets sent (announces and queries, one per interface each).
    pub sent: u64,
    /// LAN candidates in the table now (expired ones included until they are purged).
    pub candidates: usize,
}

/// One packet to multicast from the interface with address `via`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Transmit {
    pub(crate) via: Ipv4Addr,
    pub(crate) bytes: Vec<u8>,
}

struct LanTopic {
    key: [u8; 32],
    advertise: bool,
    /// When this node started looking for the topic's peers (its first query).
    sought: Option<Instant>,
    next_query: Option<Instant>,
    queries_left: usize,
}

/// A token bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(now: Instant, burst: f64) -> Self {
        Self {
            tokens: burst,
            at: now,
        }
    }

    fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A bounded set of nonces, oldest forgotten first.
struct NonceRing {
    order: VecDeque<Nonce>,
    set: HashSet<Nonce>,
    cap: usize,
}

impl NonceRing {
    fn new(cap: usize) -> Self {
        Self {
            order: VecDeque::with_capacity(cap),
            set: HashSet::with_capacity(cap),
            cap,
        }
    }

    fn contains(&self, n: &Nonce) -> bool {
        self.set.contains(n)
    }

    /// Adds `n`; returns false if it was there already.
    fn insert(&mut self, n: Nonce) -> bool {
        if !self.set.insert(n) {
            return false;
        }
        self.order.push_back(n);
        if self.order.len() > self.cap
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

/// LAN discovery's state.
pub(crate) struct LanMachine {
    topics: HashMap<TopicHash, LanTopic>,
    interfaces: Vec<Ipv4Addr>,
    port: u16,
    ttl_secs: u16,
    interval: Duration,
    next_announce: Option<Instant>,
    announces_left: usize,
    answer_due: Option<Instant>,
    last_round: Option<Instant>,
    sources: HashMap<Ipv4Addr, Bucket>,
    global: Option<Bucket>,
    seen: NonceRing,
    own: NonceRing,
    /// (topic, endpoint) → when it expires.
    table: HashMap<(TopicHash, SocketAddrV4), Instant>,
    stats: LanStats,
    nonce: Box<dyn FnMut() -> Nonce + Send>,
}

impl std::fmt::Debug for LanMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LanMachine")
            .field("interfaces", &self.interfaces)
            .field("port", &self.port)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl LanMachine {
    /// A machine for a node whose data socket has `port`, announcing every `interval`
    /// (entries it announces live 3 intervals), with nonces from `nonce`.
    pub(crate) fn new(
        port: u16,
        interval: Duration,
        nonce: Box<dyn FnMut() -> Nonce + Send>,
    ) -> Self {
        let ttl = (interval * 3).as_secs().clamp(1, u64::from(u16::MAX));
        Self {
            topics: HashMap::new(),
            interfaces: Vec::new(),
            port,
            ttl_secs: u16::try_from(ttl).unwrap_or(u16::MAX),
            interval,
            next_announce: None,
            announces_left: 0,
            answer_due: None,
            last_round: None,
            sources: HashMap::new(),
            global: None,
            seen: NonceRing::new(SEEN_NONCES),
            own: NonceRing::new(OWN_NONCES),
            table: HashMap::new(),
            stats: LanStats::default(),
            nonce,
        }
    }

    fn topic(&mut self, topic: TopicHash) -> &mut LanTopic {
        self.topics.entry(topic).or_insert_with(|| LanTopic {
            key: derive_from_topic(&topic, Domain::LanTag),
            advertise: false,
            sought: None,
            next_query: None,
            queries_left: 0,
        })
    }

    /// Announces `topic` from now on: an announce round at once (and its burst).
    pub(crate) fn advertise(&mut self, now: Instant, topic: TopicHash) {
        let t = self.topic(topic);
        if !t.advertise {
            t.advertise = true;
            self.start_announcing(now);
        }
    }

    fn start_announcing(&mut self, now: Instant) {
        self.next_announce = Some(now);
        self.announces_left = BURST.len();
    }

    /// Looks for `topic`'s peers from now on: a query at once (and its burst). Returns when
    /// the topic's first query was due, so `lookup` knows how long answers may still come.
    pub(crate) fn seek(&mut self, now: Instant, topic: TopicHash) -> Instant {
        let t = self.topic(topic);
        if let Some(at) = t.sought {
            return at;
        }
        t.sought = Some(now);
        t.next_query = Some(now);
        t.queries_left = BURST.len();
        now
    }

    /// The interfaces to announce and query on. A new one gets an announce round and the
    /// queries at once (with their bursts).
    pub(crate) fn set_interfaces(&mut self, now: Instant, interfaces: Vec<Ipv4Addr>) {
        let added = interfaces.iter().any(|i| !self.interfaces.contains(i));
        self.interfaces = interfaces;
        if !added {
            return;
        }
        if self.topics.values().any(|t| t.advertise) {
            self.start_announcing(now);
        }
        for t in self.topics.values_mut().filter(|t| t.sought.is_some()) {
            t.next_query = Some(now);
            t.queries_left = BURST.len();
        }
    }

    /// When [`LanMachine::poll_transmit`] has something to send next.
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        let announcing = self.topics.values().any(|t| t.advertise);
        let announce = self.next_announce.filter(|_| announcing);
        let queries = self.topics.values().filter_map(|t| t.next_query);
        announce
            .into_iter()
            .chain(self.answer_due.filter(|_| announcing))
            .chain(queries)
            .min()
    }

    /// The packets due at `now`: an announce round (periodic, or answering a query) and the
    /// queries due, one packet per interface (more when over [`MAX_TAGS`] topics).
    pub(crate) fn poll_transmit(&mut self, now: Instant) -> Vec<Transmit> {
        let mut out = Vec::new();
        let periodic = self.next_announce.is_some_and(|t| t <= now);
        let answer = self.answer_due.is_some_and(|t| t <= now);
        let keys: Vec<[u8; 32]> = self
            .topics
            .values()
            .filter(|t| t.advertise)
            .map(|t| t.key)
            .collect();
        if (periodic || answer) && !keys.is_empty() {
            self.announce_round(&keys, &mut out);
            self.last_round = Some(now);
            self.answer_due = None;
            if periodic {
                self.next_announce = Some(match self.announces_left {
                    0 => now + self.interval,
                    left => {
                        self.announces_left = left - 1;
                        now + BURST[BURST.len() - left]
                    }
                });
            }
        }
        let mut due = Vec::new();
        for t in self.topics.values_mut() {
            if t.next_query.is_some_and(|q| q <= now) {
                due.push(t.key);
                t.next_query = match t.queries_left {
                    0 => None,
                    left => {
                        t.queries_left = left - 1;
                        Some(now + BURST[BURST.len() - left])
                    }
                };
            }
        }
        if !due.is_empty() {
            self.query_round(&due, &mut out);
        }
        self.stats.sent += out.len() as u64;
        out
    }

    fn fresh_nonce(&mut self) -> Nonce {
        let n = (self.nonce)();
        self.own.insert(n);
        n
    }

    fn announce_round(&mut self, keys: &[[u8; 32]], out: &mut Vec<Transmit>) {
        let (port, ttl) = (self.port, self.ttl_secs);
        for via in self.interfaces.clone() {
            for chunk in keys.chunks(MAX_TAGS) {
                let nonce = self.fresh_nonce();
                let tags = chunk
                    .iter()
                    .map(|k| lan_wire::announce_tag(k, &nonce, via, port, ttl))
                    .collect();
                let packet = Packet::Announce {
                    nonce,
                    port,
                    ttl_secs: ttl,
                    tags,
                };
                out.push(Transmit {
                    via,
                    bytes: lan_wire::encode(&packet),
                });
            }
        }
    }

    fn query_round(&mut self, keys: &[[u8; 32]], out: &mut Vec<Transmit>) {
        for via in self.interfaces.clone() {
            for chunk in keys.chunks(MAX_TAGS) {
                let nonce = self.fresh_nonce();
                let tags = chunk
                    .iter()
                    .map(|k| lan_wire::query_tag(k, &nonce, via))
                    .collect();
                let packet = Packet::Query { nonce, tags };
                out.push(Transmit {
                    via,
                    bytes: lan_wire::encode(&packet),
                });
            }
        }
    }

    /// Takes one datagram from `from`; returns the LAN candidates it announced for topics
    /// this node looks for (stored in the table). A query for a topic this node announces
    /// schedules an answer. Anything else changes nothing but the counters.
    pub(crate) fn on_datagram(
        &mut self,
        now: Instant,
        from: SocketAddrV4,
        bytes: &[u8],
    ) -> Vec<(TopicHash, SocketAddrV4)> {
        self.stats.received += 1;
        let global = self
            .global
            .get_or_insert_with(|| Bucket::full(now, GLOBAL_BURST));
        if !global.take(now, GLOBAL_RATE, GLOBAL_BURST) {
            self.stats.rate_limited += 1;
            return Vec::new();
        }
        let packet = match lan_wire::decode(bytes) {
            Ok(p) => p,
            Err(e) => {
                tracing::trace!(%from, error = %e, "lan packet dropped");
                self.stats.malformed += 1;
                return Vec::new();
            }
        };
        if self.own.contains(packet.nonce()) {
            return Vec::new();
        }
        if !self.source_allows(now, *from.ip()) {
            self.stats.rate_limited += 1;
            return Vec::new();
        }
        if !self.seen.insert(*packet.nonce()) {
            self.stats.replayed += 1;
            return Vec::new();
        }
        let ip = *from.ip();
        let mut found = Vec::new();
        let matched = match &packet {
            Packet::Announce {
                nonce,
                port,
                ttl_secs,
                tags,
            } => {
                let matching: Vec<TopicHash> = self
                    .topics
                    .iter()
                    .filter(|(_, t)| t.sought.is_some())
                    .filter(|(_, t)| {
                        let tag = lan_wire::announce_tag(&t.key, nonce, ip, *port, *ttl_secs);
                        lan_wire::holds(tags, &tag)
                    })
                    .map(|(topic, _)| *topic)
                    .collect();
                let addr = SocketAddrV4::new(ip, *port);
                let ttl = Duration::from_secs(u64::from(*ttl_secs)).min(MAX_ENTRY_TTL);
                for topic in &matching {
                    if self.store(now, *topic, addr, now + ttl) {
                        found.push((*topic, addr));
                    }
                }
                !matching.is_empty()
            }
            Packet::Query { nonce, tags } => {
                let asked = self.topics.values().filter(|t| t.advertise).any(|t| {
                    let tag: LanTag = lan_wire::query_tag(&t.key, nonce, ip);
                    lan_wire::holds(tags, &tag)
                });
                if asked {
                    let due = self.last_round.map_or(now, |t| (t + ANSWER_GAP).max(now));
                    self.answer_due = Some(self.answer_due.map_or(due, |d| d.min(due)));
                }
                asked
            }
        };
        if matched {
            self.stats.matched += 1;
        } else {
            self.stats.unmatched += 1;
        }
        found
    }

    fn source_allows(&mut self, now: Instant, ip: Ipv4Addr) -> bool {
        if self.sources.len() >= MAX_SOURCES && !self.sources.contains_key(&ip) {
            // Forget sources idle long enough to have a full bucket again.
            let refill = Duration::from_secs_f64(SOURCE_BURST / SOURCE_RATE);
            self.sources
                .retain(|_, b| now.saturating_duration_since(b.at) < refill);
            if self.sources.len() >= MAX_SOURCES {
                self.sources.clear();
            }
        }
        self.sources
            .entry(ip)
            .or_insert_with(|| Bucket::full(now, SOURCE_BURST))
            .take(now, SOURCE_RATE, SOURCE_BURST)
    }

    /// Stores a candidate until `expires`; false if its source has too many already.
    fn store(
        &mut self,
        now: Instant,
        topic: TopicHash,
        addr: SocketAddrV4,
        expires: Instant,
    ) -> bool {
        let key = (topic, addr);
        if let Some(e) = self.table.get_mut(&key) {
            *e = expires;
            return true;
        }
        self.table.retain(|_, e| *e > now);
        let from_source = self
            .table
            .keys()
            .filter(|(_, a)| a.ip() == addr.ip())
            .count();
        if from_source >= MAX_PER_SOURCE {
            self.stats.refused += 1;
            return false;
        }
        if self.table.len() >= MAX_LAN_CANDIDATES
            && let Some(soonest) = self.table.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k)
        {
            self.table.remove(&soonest);
        }
        self.table.insert(key, expires);
        true
    }

    /// The unexpired LAN candidates of `topic`.
    pub(crate) fn candidates(&self, now: Instant, topic: &TopicHash) -> Vec<SocketAddrV4> {
        let mut out: Vec<SocketAddrV4> = self
            .table
            .iter()
            .filter(|((t, _), e)| t == topic && **e > now)
            .map(|((_, a), _)| *a)
            .collect();
        out.sort();
        out
    }

    /// Every unexpired candidate, by topic.
    pub(crate) fn all_candidates(&self, now: Instant) -> Vec<(TopicHash, SocketAddrV4)> {
        self.table
            .iter()
            .filter(|(_, e)| **e > now)
            .map(|(k, _)| *k)
            .collect()
    }

    /// The counters.
    pub(crate) fn stats(&self) -> LanStats {
        LanStats {
            candidates: self.table.len(),
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    fn counter() -> Box<dyn FnMut() -> Nonce + Send> {
        let mut n = 0u128;
        Box::new(move || {
            n += 1;
            n.to_be_bytes()
        })
    }

    /// A machine with a counter nonce whose values differ from `other`'s.
    fn machine(port: u16, seed: u128) -> LanMachine {
        let mut n = seed << 64;
        let mut m = LanMachine::new(
            port,
            Duration::from_secs(30),
            Box::new(move || {
                n += 1;
                n.to_be_bytes()
            }),
        );
        m.set_interfaces(Instant::now(), vec![if seed == 1 { A } else { B }]);
        m
    }

    fn deliver(
        to: &mut LanMachine,
        now: Instant,
        t: &[Transmit],
        port: u16,
    ) -> Vec<(TopicHash, SocketAddrV4)> {
        t.iter()
            .flat_map(|t| to.on_datagram(now, SocketAddrV4::new(t.via, port), &t.bytes))
            .collect()
    }

    #[test]
    fn a_newcomer_query_is_answered_and_both_learn_each_other() {
        let topic = [5u8; 32];
        let now = Instant::now();
        let mut member = machine(4000, 1);
        member.advertise(now, topic);
        member.seek(now, topic);
        let first = member.poll_transmit(now);
        assert_eq!(first.len(), 2, "an announce and a query: {first:?}");

        // The newcomer starts later (after the member's burst): its announce tells the
        // member where to dial, its query makes the member answer at once.
        for t in [now + Duration::from_secs(1), now + Duration::from_secs(3)] {
            assert_eq!(
                member.poll_transmit(t).len(),
                2,
                "the burst at +1 s and +3 s"
            );
        }
        let later = now + Duration::from_secs(5);
        let mut newcomer = machine(5000, 2);
        newcomer.advertise(later, topic);
        assert_eq!(newcomer.seek(later, topic), later);
        let hello = newcomer.poll_transmit(later);
        let t = later + Duration::from_millis(1);
        let found = deliver(&mut member, t, &hello, 5353);
        assert_eq!(found, vec![(topic, SocketAddrV4::new(B, 5000))]);
        assert_eq!(member.next_wake(), Some(t), "the answer is due now");
        let answer = member.poll_transmit(t);
        assert_eq!(answer.len(), 1, "one announce round on one interface");
        let found = deliver(&mut newcomer, t, &answer, 5353);
        assert_eq!(found, vec![(topic, SocketAddrV4::new(A, 4000))]);
        assert_eq!(
            newcomer.candidates(t, &topic),
            vec![SocketAddrV4::new(A, 4000)]
        );
        assert_eq!(newcomer.stats().matched, 1);
        // A second query right after: the answer waits out the gap.
        let again = newcomer.poll_transmit(later + Duration::from_secs(1));
        let t2 = t + Duration::from_millis(10);
        deliver(&mut member, t2, &again, 5353);
        assert_eq!(member.next_wake(), Some(t + ANSWER_GAP));
        assert!(member.poll_transmit(t2).is_empty());
        assert_eq!(member.poll_transmit(t + ANSWER_GAP).len(), 1);
    }

    #[test]
    fn announces_follow_the_burst_then_the_interval_and_rotate_their_tags() {
        let topic = [1u8; 32];
        let t0 = Instant::now();
        let mut m = machine(4000, 1);
        assert_eq!(m.next_wake(), None, "nothing to say yet");
        m.advertise(t0, topic);
        let mut times = Vec::new();
        let mut packets = Vec::new();
        let mut now = t0;
        for _ in 0..5 {
            let due = m.next_wake().unwrap();
            assert!(due >= now);
            now = due;
            let out = m.poll_transmit(now);
            assert_eq!(out.len(), 1);
            packets.push(out[0].bytes.clone());
            times.push((now - t0).as_secs());
        }
        assert_eq!(times, [0, 1, 3, 33, 63]);
        // Each announce has a fresh nonce and tag: a passive listener cannot link them by
        // their bytes (only the source address stays).
        let tags: HashSet<Vec<u8>> = packets.iter().map(|p| p[6..].to_vec()).collect();
        assert_eq!(tags.len(), packets.len());
        // The topic appears nowhere in the packet.
        for p in &packets {
            assert!(!p.windows(16).any(|w| w == &topic[..16]));
            let key = derive_from_topic(&topic, Domain::LanTag);
            assert!(!p.windows(16).any(|w| w == &key[..16]));
        }
    }

    #[test]
    fn other_topics_forgeries_copies_and_own_packets_are_not_candidates() {
        let (mine, other) = ([1u8; 32], [2u8; 32]);
        let now = Instant::now();
        let mut me = machine(4000, 1);
        me.advertise(now, mine);
        me.seek(now, mine);
        let own = me.poll_transmit(now);
        assert!(deliver(&mut me, now, &own, 5353).is_empty(), "own packets");
        assert_eq!(me.stats().matched, 0);

        let mut stranger = machine(5000, 2);
        stranger.advertise(now, other);
        let theirs = stranger.poll_transmit(now);
        assert!(deliver(&mut me, now, &theirs, 5353).is_empty());
        assert_eq!(me.stats().unmatched, 1);

        let mut peer = machine(6000, 3);
        peer.advertise(now, mine);
        let good = peer.poll_transmit(now);
        let found = deliver(&mut me, now, &good, 5353);
        assert_eq!(found, vec![(mine, SocketAddrV4::new(B, 6000))]);
        // Copies, from anywhere: replays, dropped before any MAC is computed.
        let elsewhere = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 9), 1);
        assert!(me.on_datagram(now, elsewhere, &good[0].bytes).is_empty());
        assert!(deliver(&mut me, now, &good, 5353).is_empty());
        assert_eq!(me.stats().replayed, 2);
        // A fresh packet sent from another address than it was made for: no match.
        let fresh = peer.poll_transmit(now + Duration::from_secs(1));
        assert!(me.on_datagram(now, elsewhere, &fresh[0].bytes).is_empty());
        assert_eq!(me.stats().unmatched, 2);
        // A forged tag (another nonce under the same tag) and garbage.
        let mut forged = fresh[0].bytes.clone();
        forged[6] ^= 1;
        assert!(
            me.on_datagram(now, SocketAddrV4::new(B, 1), &forged)
                .is_empty()
        );
        assert!(
            me.on_datagram(now, SocketAddrV4::new(B, 1), b"garbage")
                .is_empty()
        );
        let s = me.stats();
        assert_eq!((s.malformed, s.unmatched, s.matched), (1, 3, 1));
        assert_eq!(s.candidates, 1);
    }

    #[test]
    fn entries_expire_and_the_table_is_bounded() {
        let topic = [1u8; 32];
        let key = derive_from_topic(&topic, Domain::LanTag);
        let mut now = Instant::now();
        let mut me = LanMachine::new(4000, Duration::from_secs(30), counter());
        me.seek(now, topic);
        let mut nonce = 1_000_000u128;
        let mut announce = |me: &mut LanMachine, now, ip: Ipv4Addr, port: u16, ttl: u16| {
            nonce += 1;
            let n = nonce.to_be_bytes();
            let bytes = lan_wire::encode(&Packet::Announce {
                nonce: n,
                port,
                ttl_secs: ttl,
                tags: vec![lan_wire::announce_tag(&key, &n, ip, port, ttl)],
            });
            me.on_datagram(now, SocketAddrV4::new(ip, 9), &bytes)
        };
        // One source gets at most MAX_PER_SOURCE entries (its rate limit aside).
        for port in 1..=20u16 {
            now += Duration::from_millis(200);
            announce(&mut me, now, A, port, 60);
        }
        assert_eq!(me.candidates(now, &topic).len(), MAX_PER_SOURCE);
        assert_eq!(me.stats().refused, 20 - MAX_PER_SOURCE as u64);
        // Many sources: the table stays at its bound.
        for i in 0..600u32 {
            let ip = Ipv4Addr::from(0x0a01_0000 + i);
            announce(&mut me, now, ip, 7, 60);
            now += Duration::from_millis(5);
            assert!(me.stats().candidates <= MAX_LAN_CANDIDATES);
        }
        assert_eq!(me.stats().candidates, MAX_LAN_CANDIDATES);
        // Everything expires with its ttl (capped at an hour).
        let short = announce(&mut me, now, B, 1, 2);
        assert_eq!(short.len(), 1);
        assert!(
            me.candidates(now, &topic)
                .contains(&SocketAddrV4::new(B, 1))
        );
        assert!(
            !me.candidates(now + Duration::from_secs(2), &topic)
                .contains(&SocketAddrV4::new(B, 1))
        );
        let long = announce(&mut me, now, Ipv4Addr::new(10, 9, 9, 9), 1, u16::MAX);
        assert_eq!(long.len(), 1);
        assert!(me.candidates(now + MAX_ENTRY_TTL, &topic).is_empty());
    }

    #[test]
    fn floods_are_rate_limited_per_source_and_overall() {
        let now = Instant::now();
        let mut me = LanMachine::new(4000, Duration::from_secs(30), counter());
        me.seek(now, [1; 32]);
        let junk = lan_wire::encode(&Packet::Query {
            nonce: [0; 16],
            tags: vec![[0; 16]],
        });
        for i in 0..100u8 {
            let mut p = junk.clone();
            p[6] = i; // distinct nonces: not replays
            me.on_datagram(now, SocketAddrV4::new(A, 1), &p);
        }
        let s = me.stats();
        assert_eq!(s.received, 100);
        assert_eq!(s.unmatched, SOURCE_BURST as u64);
        assert_eq!(s.rate_limited, 100 - SOURCE_BURST as u64);
        // The source's budget comes back with time.
        let later = now + Duration::from_secs(1);
        let mut p = junk.clone();
        p[7] = 1;
        me.on_datagram(later, SocketAddrV4::new(A, 1), &p);
        assert_eq!(me.stats().unmatched, SOURCE_BURST as u64 + 1);
        // Many (spoofed) sources at once: the overall budget holds.
        let mut me = LanMachine::new(4000, Duration::from_secs(30), counter());
        for i in 0..1000u32 {
            let mut p = junk.clone();
            p[6..10].copy_from_slice(&i.to_be_bytes());
            me.on_datagram(
                now,
                SocketAddrV4::new(Ipv4Addr::from(0x0a00_0000 + i), 1),
                &p,
            );
        }
        let s = me.stats();
        assert_eq!(s.unmatched + s.malformed, GLOBAL_BURST as u64);
        assert_eq!(s.rate_limited, 1000 - GLOBAL_BURST as u64);
        assert!(me.sources.len() <= MAX_SOURCES);
    }

    #[test]
    fn a_new_interface_gets_announces_and_queries_at_once() {
        let topic = [1u8; 32];
        let t0 = Instant::now();
        let mut m = LanMachine::new(4000, Duration::from_secs(30), counter());
        m.advertise(t0, topic);
        m.seek(t0, topic);
        assert!(m.poll_transmit(t0).is_empty(), "no interface yet");
        let later = t0 + Duration::from_secs(100);
        for t in [
            t0 + Duration::from_secs(1),
            t0 + Duration::from_secs(3),
            t0 + Duration::from_secs(33),
        ] {
            m.poll_transmit(t);
        }
        m.set_interfaces(later, vec![A]);
        assert_eq!(m.next_wake(), Some(later));
        let out = m.poll_transmit(later);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|t| t.via == A));
        // The same list again changes nothing.
        m.set_interfaces(later, vec![A]);
        assert!(m.poll_transmit(later).is_empty());
    }

    #[test]
    fn many_topics_are_split_into_packets_of_at_most_max_tags() {
        let now = Instant::now();
        let mut m = machine(4000, 1);
        for i in 0..150u8 {
            m.advertise(now, [i; 32]);
        }
        let out = m.poll_transmit(now);
        assert_eq!(out.len(), 3);
        for t in &out {
            assert!(t.bytes.len() <= lan_wire::MAX_PACKET_BYTES);
            assert!(lan_wire::decode(&t.bytes).is_ok());
        }
    }
}
