//! The data socket as quinn sees it: a wrapper that takes non-QUIC datagrams (hole-punch
//! probes, KRPC replies telling our public address) out of every received batch before
//! quinn sees them, so one UDP socket carries QUIC, probes and address discovery; and, with
//! a relay path (Auto mode), the router between UDP and the relay: packets to a virtual
//! address (`path.rs`) go to its relay route, relay datagrams come back from the route's
//! virtual address, so quinn sees relayed peers as ordinary addresses; once such a peer has
//! a proven direct endpoint (`direct.rs`), its packets go over UDP instead and its UDP
//! packets are presented from the virtual address. Reading alternates between the UDP
//! socket and the relay so that neither starves the other.
//!
//! Classification uses the QUIC "fixed bit" (0x40 of the first byte), which this endpoint
//! never greases (`grease_quic_bit(false)`): probes start with 0x00. KRPC messages start with
//! `d` (0x64, fixed bit set), so they are recognised by their bencoded shape. Every GRO
//! segment of a batch is checked, not only the first.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

use crate::blackhole::Blackhole;
use crate::direct::DirectTable;
use crate::fallback::{FallbackTable, Via};
use crate::path::{RouteTable, is_virtual};
use crate::relay_path::{RelayDatagram, RelayPath};

/// A hole-punch probe: starts with 0x00 (QUIC fixed bit clear).
pub(crate) const PROBE: &[u8] = b"\x00pluresdb-sync/punch/v1";

/// How many diverted datagrams may wait for the node's handler; more are dropped (they are
/// best-effort by nature), so a flood cannot grow memory.
pub(crate) const DIVERT_QUEUE: usize = 256;

/// What a received datagram is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// For quinn.
    Quic,
    /// A hole-punch probe.
    Probe,
    /// A bencoded KRPC message (a DHT node's reply to our ping).
    Krpc,
    /// A path probe (`path_wire.rs`) of a connection made through a relay.
    Path,
    /// Neither: dropped.
    Garbage,
}

/// Classifies one datagram. Pure.
pub(crate) fn classify(d: &[u8]) -> Kind {
    let Some(&first) = d.first() else {
        return Kind::Garbage;
    };
    if d.starts_with(PROBE) {
        return Kind::Probe;
    }
    if crate::path_wire::is_probe(d) {
        return Kind::Path;
    }
    if first == b'd' && d.last() == Some(&b'e') && d.windows(5).any(|w| w == b"1:y1:") {
        return Kind::Krpc;
    }
    if first & 0x40 == 0 {
        return Kind::Garbage;
    }
    Kind::Quic
}

/// Removes every non-QUIC segment from the first `n` entries of a received batch, handing
/// each to `divert`, and compacts what is left. Returns the number of entries left.
pub(crate) fn filter_batch(
    bufs: &mut [IoSliceMut<'_>],
    meta: &mut [RecvMeta],
    n: usize,
    mut divert: impl FnMut(SocketAddr, Kind, &[u8]),
) -> usize {
    let mut kept = 0;
    for i in 0..n.min(bufs.len()).min(meta.len()) {
        let m = meta[i];
        let len = m.len.min(bufs[i].len());
        let stride = if m.stride == 0 { len.max(1) } else { m.stride };
        let buf = &mut bufs[i][..len];
        let (mut read, mut write) = (0, 0);
        while read < len {
            let end = (read + stride).min(len);
            match classify(&buf[read..end]) {
                Kind::Quic => {
                    if write != read {
                        buf.copy_within(read..end, write);
                    }
                    write += end - read;
                }
                kind => divert(m.addr, kind, &buf[read..end]),
            }
            read = end;
        }
        if write == 0 {
            continue;
        }
        if kept != i {
            let (head, tail) = bufs.split_at_mut(i);
            head[kept][..write].copy_from_slice(&tail[0][..write]);
        }
        meta[kept] = RecvMeta { len: write, ..m };
        kept += 1;
    }
    kept
}

/// Counters of what the data socket diverted or could not route.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) probes: AtomicU64,
    pub(crate) garbage: AtomicU64,
    pub(crate) dropped: AtomicU64,
    /// Packets to a virtual address with no route, or relay datagrams from a route that got
    /// no address (the route table full), or too large for quinn's buffer.
    pub(crate) unroutable: AtomicU64,
    /// Packets not sent or read over UDP because direct UDP is off.
    pub(crate) direct_blocked: AtomicU64,
    /// Datagrams sent and received through the relay path.
    pub(crate) relayed_out: AtomicU64,
    pub(crate) relayed_in: AtomicU64,
    /// Packets (or GSO batches) of relay-made connections sent over UDP to their proven
    /// endpoint, and their bytes.
    pub(crate) upgraded_out: AtomicU64,
    pub(crate) upgraded_out_bytes: AtomicU64,
    /// UDP packet batches presented to quinn from a virtual address, and their bytes.
    pub(crate) upgraded_in: AtomicU64,
    pub(crate) upgraded_in_bytes: AtomicU64,
    /// Packets sent both ways because their direct path was suspect (counted in
    /// `relayed_out` and, when the UDP send worked, `upgraded_out` too).
    pub(crate) doubled_out: AtomicU64,
}

/// The relay side of the data socket.
struct Relayed {
    path: Arc<dyn RelayPath>,
    routes: Arc<RouteTable>,
    /// The rest of a relay batch that did not fit quinn's buffers in one poll.
    pending: Mutex<Option<RelayDatagram>>,
}

/// The data socket handed to quinn.
pub(crate) struct DataSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    diverted: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    pub(crate) counters: Arc<Counters>,
    relay: Option<Relayed>,
    /// Whether UDP to and from real addresses is used (off: relay only, for tests).
    direct: bool,
    /// Which side is read first next time (they take turns).
    relay_first: AtomicBool,
    routes: Arc<RouteTable>,
    /// Proven direct endpoints of virtual addresses.
    directs: DirectTable,
    /// UDP addresses forced dark (fault injection for tests and benchmarks; empty otherwise).
    blackhole: Blackhole,
    /// Relay routes adopted by real addresses (direct-made connections' fallback).
    fallbacks: FallbackTable,
}

impl DataSocket {
    /// The data socket over `inner`, routing virtual addresses to `relay` (if any), with
    /// direct UDP on or off. Returns the datagrams diverted from UDP.
    pub(crate) fn new(
        inner: Arc<dyn AsyncUdpSocket>,
        relay: Option<Arc<dyn RelayPath>>,
        direct: bool,
    ) -> (Arc<Self>, mpsc::Receiver<(SocketAddr, Vec<u8>)>) {
        let (tx, rx) = mpsc::channel(DIVERT_QUEUE);
        let routes = Arc::new(RouteTable::default());
        let socket = Arc::new(Self {
            inner,
            diverted: tx,
            counters: Arc::default(),
            relay: relay.map(|path| Relayed {
                path,
                routes: routes.clone(),
                pending: Mutex::new(None),
            }),
            direct,
            relay_first: AtomicBool::new(false),
            routes,
            directs: DirectTable::default(),
            blackhole: Blackhole::default(),
            fallbacks: FallbackTable::default(),
        });
        (socket, rx)
    }

    /// The virtual addresses of relay routes.
    pub(crate) fn routes(&self) -> &Arc<RouteTable> {
        &self.routes
    }

    /// The direct endpoints of virtual addresses.
    pub(crate) fn directs(&self) -> &DirectTable {
        &self.directs
    }

    /// The UDP addresses forced dark (tests and benchmarks).
    #[cfg_attr(not(feature = "testkit"), allow(dead_code))]
    pub(crate) fn blackhole(&self) -> &Blackhole {
        &self.blackhole
    }

    /// The relay routes adopted by real addresses.
    pub(crate) fn fallbacks(&self) -> &FallbackTable {
        &self.fallbacks
    }

    /// Whether UDP to real addresses is used.
    pub(crate) fn direct_on(&self) -> bool {
        self.direct
    }

    /// Sends one datagram outside QUIC (best effort: a full socket buffer drops it): to a
    /// virtual address through its relay route (a path probe proving that route), to a
    /// real one over UDP unless direct UDP is off.
    pub(crate) fn send_raw(&self, to: SocketAddr, bytes: &[u8]) {
        if is_virtual(&to) {
            if let Some((r, route)) = self
                .relay
                .as_ref()
                .and_then(|r| Some((r, r.routes.route(&to)?)))
            {
                r.path.send(&route, 0, bytes);
            }
            return;
        }
        if !self.direct || self.blackhole.is_dark(&to) {
            return;
        }
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents: bytes,
            segment_size: None,
            src_ip: None,
        };
        if let Err(e) = self.inner.try_send(&transmit) {
            tracing::trace!(%to, error = %e, "raw datagram not sent");
        }
    }
}

impl fmt::Debug for DataSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataSocket")
            .field("local_addr", &self.inner.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for DataSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let to = transmit.destination;
        let mut doubled = false;
        if is_virtual(&to)
            && self.direct
            && let Some((endpoint, also_relay)) = self.directs.route(&to)
        {
            let direct = Transmit {
                destination: endpoint,
                ..*transmit
            };
            // A dark endpoint loses the packet as a blackholed path would.
            let sent = if self.blackhole.is_dark(&endpoint) {
                Ok(())
            } else {
                self.inner.try_send(&direct)
            };
            match sent {
                Ok(()) => {
                    self.counters.upgraded_out.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .upgraded_out_bytes
                        .fetch_add(transmit.contents.len() as u64, Ordering::Relaxed);
                }
                // The copy through the relay still goes.
                Err(_) if also_relay => {}
                Err(e) => return Err(e),
            }
            if !also_relay {
                return Ok(());
            }
            // A suspect direct path: a copy through the relay too (QUIC drops duplicates).
            doubled = true;
        }
        if is_virtual(&to) {
            // Like a full UDP buffer, a packet that cannot go is dropped (QUIC recovers).
            let route = self
                .relay
                .as_ref()
                .and_then(|r| Some((r, r.routes.route(&to)?)));
            let counter = match route {
                Some((r, route)) => {
                    let segment = transmit.segment_size.unwrap_or(0);
                    r.path.send(&route, segment, transmit.contents);
                    if doubled {
                        self.counters.doubled_out.fetch_add(1, Ordering::Relaxed);
                    }
                    &self.counters.relayed_out
                }
                None => &self.counters.unroutable,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if !self.direct {
            self.counters.direct_blocked.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        match self.fallbacks.route(&to) {
            Some((vaddr, via)) => self.send_fallback(transmit, vaddr, via),
            None => self.send_udp(transmit),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        if self.relay.is_none() {
            return self.poll_udp(cx, bufs, meta);
        }
        // Both sides register the waker when they have nothing.
        if self.relay_first.fetch_xor(true, Ordering::Relaxed) {
            let n = self.poll_relay(cx, bufs, meta);
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            self.poll_udp(cx, bufs, meta)
        } else {
            if let Poll::Ready(r) = self.poll_udp(cx, bufs, meta) {
                return Poll::Ready(r);
            }
            match self.poll_relay(cx, bufs, meta) {
                0 => Poll::Pending,
                n => Poll::Ready(Ok(n)),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

impl DataSocket {
    /// Sends a packet quinn addressed to a real address through the relay route `vaddr`
    /// its connection adopted, and (`Via::Both`) over UDP too.
    /// Sends over UDP, unless the destination is forced dark (then the packet is lost, as on
    /// a blackholed path).
    fn send_udp(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        if self.blackhole.is_dark(&transmit.destination) {
            return Ok(());
        }
        self.inner.try_send(transmit)
    }

    fn send_fallback(
        &self,
        transmit: &Transmit<'_>,
        vaddr: SocketAddr,
        via: Via,
    ) -> io::Result<()> {
        let udp = match via {
            Via::Relay => Ok(()),
            _ => self.send_udp(transmit),
        };
        let route = self
            .relay
            .as_ref()
            .and_then(|r| Some((r, r.routes.route(&vaddr)?)));
        match route {
            Some((r, route)) => {
                r.path.send(
                    &route,
                    transmit.segment_size.unwrap_or(0),
                    transmit.contents,
                );
                self.counters.relayed_out.fetch_add(1, Ordering::Relaxed);
                if via == Via::Both {
                    self.counters.doubled_out.fetch_add(1, Ordering::Relaxed);
                }
                // The copy through the relay went.
                Ok(())
            }
            // The route went a moment ago: UDP is all there is.
            None if via == Via::Relay => self.send_udp(transmit),
            None => udp,
        }
    }

    /// Reads what the relay path has into `bufs` (whole datagrams, a batch as one entry with
    /// its segment size as stride), each from its route's virtual address; 0 when nothing is
    /// there (the waker is then registered).
    fn poll_relay(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> usize {
        let Some(r) = &self.relay else {
            return 0;
        };
        let mut pending = r.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let d = match pending.take() {
                Some(d) => d,
                None => match r.path.poll_recv(cx) {
                    Poll::Ready(Some(d)) => d,
                    Poll::Ready(None) | Poll::Pending => break,
                },
            };
            let segment = if d.segment == 0 {
                d.bytes.len()
            } else {
                d.segment
            };
            let cap = bufs[n].len();
            let Some(addr) = r.routes.addr_for(&d.from) else {
                self.counters.unroutable.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            // A path probe through the relay (proving a direct-made connection's route) goes
            // to the node's probe handler, from the route's address.
            if d.segment == 0 && crate::path_wire::is_probe(&d.bytes) {
                if self.diverted.try_send((addr, d.bytes.to_vec())).is_err() {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            // A direct-made connection's peer falling back: its packets are its real address's.
            let addr = self.fallbacks.real_for(&addr).unwrap_or(addr);
            if segment == 0 || segment > cap {
                // Empty (quinn has no use for it) or larger than any packet quinn reads.
                self.counters.unroutable.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let take = if d.bytes.len() <= cap {
                d.bytes.len()
            } else {
                cap / segment * segment
            };
            bufs[n][..take].copy_from_slice(&d.bytes[..take]);
            meta[n] = RecvMeta {
                addr,
                len: take,
                stride: segment.min(take),
                ecn: None,
                dst_ip: None,
            };
            n += 1;
            self.counters.relayed_in.fetch_add(1, Ordering::Relaxed);
            if take < d.bytes.len() {
                *pending = Some(RelayDatagram {
                    bytes: d.bytes.slice(take..),
                    ..d
                });
            }
        }
        n
    }

    /// Reads the UDP socket, diverting non-QUIC datagrams (and everything when direct UDP is
    /// off).
    fn poll_udp(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let n = ready!(self.inner.poll_recv(cx, bufs, meta))?;
            // Entries from a dark address are emptied: `filter_batch` drops empty entries.
            for m in meta.iter_mut().take(n) {
                if self.blackhole.is_dark(&m.addr) {
                    m.len = 0;
                }
            }
            if !self.direct {
                self.counters
                    .direct_blocked
                    .fetch_add(n as u64, Ordering::Relaxed);
                continue;
            }
            let kept = filter_batch(bufs, meta, n, |from, kind, bytes| match kind {
                Kind::Garbage => {
                    self.counters.garbage.fetch_add(1, Ordering::Relaxed);
                }
                Kind::Probe => {
                    self.counters.probes.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    if self.diverted.try_send((from, bytes.to_vec())).is_err() {
                        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            if kept > 0 {
                for m in &mut meta[..kept] {
                    if let Some(vaddr) = self.directs.virtual_for(&m.addr) {
                        m.addr = vaddr;
                        self.counters.upgraded_in.fetch_add(1, Ordering::Relaxed);
                        self.counters
                            .upgraded_in_bytes
                            .fetch_add(m.len as u64, Ordering::Relaxed);
                    }
                }
                return Poll::Ready(Ok(kept));
            }
            // Everything was diverted: poll again (registers the waker when nothing is left).
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn quic(len: usize, tag: u8) -> Vec<u8> {
        let mut v = vec![tag; len];
        v[0] = 0x40 | (tag & 0x3f);
        v
    }

    #[test]
    fn classification() {
        assert_eq!(classify(PROBE), Kind::Probe);
        assert_eq!(classify(b"d1:t4:abcd1:y1:re"), Kind::Krpc);
        assert_eq!(classify(&quic(1200, 3)), Kind::Quic);
        assert_eq!(classify(&[0x00, 1, 2]), Kind::Garbage);
        assert_eq!(classify(&[]), Kind::Garbage);
        // A QUIC short header that happens to start with 'd' is still QUIC.
        assert_eq!(classify(b"d\x01\x02\x03"), Kind::Quic);
    }

    /// Runs filter_batch over `batches` (each a list of segments sharing a stride) and
    /// returns the kept segments per entry and the diverted ones.
    fn run(batches: Vec<Vec<Vec<u8>>>) -> (Vec<Vec<Vec<u8>>>, Vec<Vec<u8>>) {
        let mut storage: Vec<Vec<u8>> = vec![vec![0u8; 8192]; batches.len() + 1];
        let mut meta = vec![RecvMeta::default(); storage.len()];
        let mut strides = Vec::new();
        for (i, segs) in batches.iter().enumerate() {
            let stride = segs.first().map_or(1, Vec::len);
            let mut at = 0;
            for s in segs {
                storage[i][at..at + s.len()].copy_from_slice(s);
                at += s.len();
            }
            meta[i] = RecvMeta {
                len: at,
                stride,
                ..RecvMeta::default()
            };
            strides.push(stride);
        }
        let mut diverted = Vec::new();
        let mut bufs: Vec<IoSliceMut<'_>> =
            storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let kept = filter_batch(&mut bufs, &mut meta, batches.len(), |_, _, b| {
            diverted.push(b.to_vec())
        });
        let out = (0..kept)
            .map(|i| {
                bufs[i][..meta[i].len]
                    .chunks(meta[i].stride)
                    .map(<[u8]>::to_vec)
                    .collect()
            })
            .collect();
        (out, diverted)
    }

    #[test]
    fn diverts_middle_and_last_segments_and_drops_empty_entries() {
        let (q1, q2, q3) = (quic(100, 1), quic(100, 2), quic(40, 3));
        let mut probe = PROBE.to_vec();
        probe.resize(100, 0);
        let (kept, diverted) = run(vec![
            vec![q1.clone(), probe.clone(), q2.clone(), q3.clone()],
            vec![probe.clone()],
            vec![q2.clone()],
        ]);
        assert_eq!(kept, vec![vec![q1, q2.clone(), q3], vec![q2]]);
        assert_eq!(diverted, vec![probe.clone(), probe]);
    }

    /// A relay path over channels: what the data socket sends, and what it is to receive.
    #[derive(Debug)]
    struct Channels {
        sent: std::sync::Mutex<Vec<(crate::relay_path::RelayRoute, usize, Vec<u8>)>>,
        incoming: std::sync::Mutex<mpsc::UnboundedReceiver<RelayDatagram>>,
    }

    impl RelayPath for Channels {
        fn join(&self, _: &pluresdb_sync_core::TopicHash) {}
        fn send(&self, to: &crate::relay_path::RelayRoute, segment: usize, d: &[u8]) -> bool {
            self.sent.lock().unwrap().push((*to, segment, d.to_vec()));
            true
        }
        fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<RelayDatagram>> {
            self.incoming.lock().unwrap().poll_recv(cx)
        }
        fn poll_event(&self, _: &mut Context<'_>) -> Poll<Option<crate::relay_path::RelayEvent>> {
            Poll::Pending
        }
        fn close(&self) {}
        fn url(&self, _: u64) -> Option<String> {
            None
        }
    }

    /// Packets to a virtual address go to its route (a GSO batch with its segment size),
    /// never to UDP; relay batches come back from the route's address, a batch larger than
    /// quinn's buffer split over several entries at whole datagrams; with direct UDP off,
    /// real addresses are neither sent to nor read from.
    #[tokio::test]
    async fn virtual_addresses_are_routed_through_the_relay() {
        let (tx, rx) = mpsc::unbounded_channel();
        let path = Arc::new(Channels {
            sent: Default::default(),
            incoming: std::sync::Mutex::new(rx),
        });
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_nonblocking(true).unwrap();
        let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, udp).unwrap();
        let (socket, _diverted) = DataSocket::new(inner, Some(path.clone()), false);
        let route = crate::relay_path::RelayRoute {
            link: 1,
            room: [5; 32],
            conn: 9,
        };
        let vaddr = socket.routes().addr_for(&route).unwrap();
        let batch = quic(3 * 1200 + 100, 7);
        let send = |to: SocketAddr, segment_size: Option<usize>| {
            socket.try_send(&Transmit {
                destination: to,
                ecn: None,
                contents: &batch,
                segment_size,
                src_ip: None,
            })
        };
        send(vaddr, Some(1200)).unwrap();
        send("240.9.9.9:1".parse().unwrap(), None).unwrap();
        send("127.0.0.1:9".parse().unwrap(), None).unwrap();
        assert_eq!(
            *path.sent.lock().unwrap(),
            vec![(route, 1200, batch.clone())]
        );
        let c = &socket.counters;
        assert_eq!(c.unroutable.load(Ordering::Relaxed), 1, "no route: dropped");
        assert_eq!(c.direct_blocked.load(Ordering::Relaxed), 1, "direct is off");
        // Receiving: 5 datagrams of 1000 bytes (the last 400) into buffers of 2,500 bytes.
        let from_relay = quic(4 * 1000 + 400, 3);
        tx.send(RelayDatagram {
            from: route,
            segment: 1000,
            bytes: from_relay.clone().into(),
        })
        .unwrap();
        let mut storage = vec![vec![0u8; 2500]; 2];
        let mut meta = vec![RecvMeta::default(); 2];
        let mut got = Vec::new();
        while got.len() < from_relay.len() {
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let n = std::future::poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta))
                .await
                .unwrap();
            for i in 0..n {
                assert_eq!(meta[i].addr, vaddr);
                assert_eq!(meta[i].stride, 1000.min(meta[i].len));
                assert!(meta[i].len % 1000 == 0 || got.len() + meta[i].len == 4400);
                got.extend_from_slice(&bufs[i][..meta[i].len]);
            }
        }
        assert_eq!(got, from_relay);
    }

    /// A direct-made connection's adopted route: what quinn sends to the real address goes
    /// over UDP only, both ways, or through the route alone as told; the route's relay
    /// datagrams come back from the real address, a path probe through the relay is diverted
    /// from the route's address, and a probe to a virtual address goes through its route.
    #[tokio::test]
    async fn an_adopted_route_carries_a_real_address_packets_as_told() {
        let (tx, rx) = mpsc::unbounded_channel();
        let path = Arc::new(Channels {
            sent: Default::default(),
            incoming: std::sync::Mutex::new(rx),
        });
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_nonblocking(true).unwrap();
        let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, udp).unwrap();
        let (socket, mut diverted) = DataSocket::new(inner, Some(path.clone()), true);
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let e = peer.local_addr().unwrap();
        let route = crate::relay_path::RelayRoute {
            link: 1,
            room: [5; 32],
            conn: 9,
        };
        let v = socket.routes().addr_for(&route).unwrap();
        let packet = quic(300, 4);
        let mut poller = socket.clone().create_io_poller();
        // Sends once the UDP socket is writable (tokio learns it by polling).
        let mut send = async || loop {
            std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
                .await
                .unwrap();
            match socket.try_send(&Transmit {
                destination: e,
                ecn: None,
                contents: &packet,
                segment_size: None,
                src_ip: None,
            }) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                r => break r.unwrap(),
            }
        };
        let relayed = || path.sent.lock().unwrap().len();
        let mut buf = [0u8; 2048];
        // Adopted, still direct: UDP only.
        socket.fallbacks().adopt(e, v);
        send().await;
        assert_eq!(peer.recv(&mut buf).unwrap(), 300);
        assert_eq!(relayed(), 0);
        // Suspect: both ways.
        socket.fallbacks().set_via(e, Via::Both);
        send().await;
        assert_eq!(peer.recv(&mut buf).unwrap(), 300);
        assert_eq!(*path.sent.lock().unwrap(), vec![(route, 0, packet.clone())]);
        // Silent: the relay alone.
        socket.fallbacks().set_via(e, Via::Relay);
        send().await;
        assert_eq!(relayed(), 2);
        peer.set_nonblocking(true).unwrap();
        assert!(peer.recv(&mut buf).is_err(), "nothing over UDP");
        let c = &socket.counters;
        assert_eq!(c.doubled_out.load(Ordering::Relaxed), 1);
        // The route's datagrams are the real address's; a probe through it is diverted.
        let keys = crate::path_wire::PathKeys::from_material(&[3; 40]);
        let probe = keys.encode(crate::path_wire::ProbeKind::Ping, false, 1);
        for bytes in [probe.clone(), quic(200, 5)] {
            tx.send(RelayDatagram {
                from: route,
                segment: 0,
                bytes: bytes.into(),
            })
            .unwrap();
        }
        let mut storage = vec![vec![0u8; 2048]; 2];
        let mut meta = vec![RecvMeta::default(); 2];
        let mut bufs: Vec<IoSliceMut<'_>> =
            storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let n = loop {
            let n = std::future::poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta))
                .await
                .unwrap();
            if n > 0 {
                break n;
            }
        };
        assert_eq!((n, meta[0].addr, meta[0].len), (1, e, 200));
        assert_eq!(diverted.try_recv().unwrap(), (v, probe.clone()));
        socket.send_raw(v, &probe);
        assert_eq!(
            path.sent.lock().unwrap().last().unwrap(),
            &(route, 0, probe)
        );
        // Released: the route's datagrams are its own again, E's packets UDP only.
        socket.fallbacks().release(e, v);
        send().await;
        assert_eq!(relayed(), 3, "only the probe went since");
    }

    proptest! {
        #[test]
        fn keeps_exactly_the_quic_segments_in_order(
            plan in proptest::collection::vec(proptest::collection::vec(any::<bool>(), 1..6), 1..5),
            stride in 20usize..200,
        ) {
            let mut probe = PROBE.to_vec();
            probe.resize(stride, 0);
            let mut tag = 0u8;
            let mut expected = Vec::new();
            let mut batches = Vec::new();
            for entry in &plan {
                let mut segs = Vec::new();
                let mut kept = Vec::new();
                for &is_quic in entry {
                    tag = tag.wrapping_add(1);
                    if is_quic {
                        let q = quic(stride, tag);
                        kept.push(q.clone());
                        segs.push(q);
                    } else {
                        segs.push(probe.clone());
                    }
                }
                if !kept.is_empty() { expected.push(kept); }
                batches.push(segs);
            }
            let (got, diverted) = run(batches);
            prop_assert_eq!(got, expected);
            prop_assert!(diverted.iter().all(|d| d == &probe));
        }
    }
}
