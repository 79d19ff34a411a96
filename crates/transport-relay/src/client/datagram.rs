//! The datagram link: one relay socket speaking `pluresdb-relay.v2`, used as a path for
//! datagrams (Auto mode sends QUIC packets through it). Join rooms, learn who is in them
//! (by relay connection id), send and receive droppable datagrams; the socket is dialled on
//! the first join and redialled with backoff (next URL first) when lost, every wanted room
//! joined again. Nothing here is end-to-end: the peers' own protocol (QUIC) authenticates and
//! encrypts what the datagrams carry, so the relay sees only ciphertext, connection ids and
//! room hashes.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use super::builder::Settings;
use super::{ErrorLog, RelayTransportBuilder, link_socket};
use crate::RelayError;
use crate::protocol::{ConnId, DATAGRAM_OVERHEAD, RoomId, encode_datagram};

/// Received datagrams waiting for the owner; more are dropped (counted in
/// [`LinkStats::received_dropped`]): datagrams are best effort, and a slow reader must not
/// make the link buffer without bound.
pub const LINK_DATAGRAM_QUEUE: usize = 1024;

/// Membership events waiting for the owner. When full, the link stops reading the relay
/// until the owner catches up (events are never dropped).
pub const LINK_EVENT_QUEUE: usize = 1024;

/// Most rooms a link joins at once (the relay's own default limit is 64).
pub const MAX_LINK_ROOMS: usize = 1024;

/// One received DATAGRAM_FROM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    /// The socket it came on ([`LinkEvent::Connected`]'s `link`).
    pub link: u64,
    /// The room.
    pub room: RoomId,
    /// The sender's relay connection id.
    pub from: ConnId,
    /// The size of each datagram in `payload` but the last; 0: `payload` is one datagram.
    pub segment: u16,
    /// One or more datagrams.
    pub payload: Bytes,
}

/// What happened on the link, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkEvent {
    /// A socket is up: `link` numbers it (never reused), `me` is this side's relay connection
    /// id on it.
    Connected {
        /// The socket's number.
        link: u64,
        /// Our relay connection id.
        me: ConnId,
        /// The relay (without credentials).
        url: String,
    },
    /// `room` is joined on socket `link`; `members` were already in it.
    Joined {
        /// The socket.
        link: u64,
        /// The room.
        room: RoomId,
        /// The other members, by relay connection id.
        members: Vec<ConnId>,
    },
    /// `member` joined `room`.
    MemberJoined {
        /// The socket.
        link: u64,
        /// The room.
        room: RoomId,
        /// Its relay connection id.
        member: ConnId,
    },
    /// `member` left `room` (or lost its socket).
    MemberLeft {
        /// The socket.
        link: u64,
        /// The room.
        room: RoomId,
        /// Its relay connection id.
        member: ConnId,
    },
    /// The relay refused to join `room` (ROOM_FULL, TOO_MANY_ROOMS); tried again on the next
    /// socket.
    JoinRefused {
        /// The socket.
        link: u64,
        /// The room.
        room: RoomId,
        /// The relay's error code.
        code: u16,
        /// The relay's explanation.
        message: String,
    },
    /// Socket `link` is gone, and every membership on it with it; the link redials.
    Disconnected {
        /// The socket.
        link: u64,
        /// Why.
        reason: String,
    },
}

/// What the link's owner reads: datagrams, and membership events.
#[derive(Debug)]
pub struct LinkReceivers {
    /// Received datagrams (lossy: at most [`LINK_DATAGRAM_QUEUE`] wait).
    pub datagrams: mpsc::Receiver<Datagram>,
    /// Membership and socket events (lossless: at most [`LINK_EVENT_QUEUE`] wait).
    pub events: mpsc::Receiver<LinkEvent>,
}

/// Counters of a link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Datagram frames sent.
    pub sent: u64,
    /// Datagrams not sent: no socket, a stale `link`, or the outbound queue full.
    pub send_dropped: u64,
    /// Datagram frames received and handed to the owner.
    pub received: u64,
    /// Received datagram frames dropped because the owner did not read them in time.
    pub received_dropped: u64,
}

/// The current socket's side of sending.
pub(crate) struct Out {
    pub(crate) link: u64,
    pub(crate) tx: mpsc::Sender<Message>,
    pub(crate) max_frame: usize,
}

#[derive(Default)]
pub(crate) struct LinkState {
    /// The rooms the owner wants joined.
    pub(crate) wanted: HashSet<RoomId>,
    /// The socket datagrams go to, while one is up.
    pub(crate) out: Option<Out>,
    /// The socket task, once started.
    task: Option<JoinHandle<()>>,
    pub(crate) closed: bool,
    /// The owner's ends, until the socket task starts and takes them.
    senders: Option<(mpsc::Sender<Datagram>, mpsc::Sender<LinkEvent>)>,
}

/// What the link handle and its socket task share.
pub(crate) struct Shared {
    pub(crate) settings: Arc<Settings>,
    state: Mutex<LinkState>,
    /// Woken when the wanted rooms change or the link closes.
    pub(crate) changed: Notify,
    pub(crate) errors: ErrorLog,
    pub(crate) sent: AtomicU64,
    pub(crate) send_dropped: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) received_dropped: AtomicU64,
}

impl Shared {
    pub(crate) fn state(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A datagram path through a relay: one socket speaking `pluresdb-relay.v2`, dialled on the
/// first [`join`](Self::join) and redialled with backoff (next URL first) when lost, every
/// wanted room joined again. Datagrams are droppable and not end-to-end protected here: the
/// peers' own protocol (QUIC) does that, so the relay sees only ciphertext, connection ids
/// and room hashes. Dropping it closes the socket.
///
/// ```no_run
/// use pluresdb_sync_transport_relay::{LinkEvent, RelayTransportBuilder};
///
/// # #[tokio::main]
/// # async fn main() -> anyhow::Result<()> {
/// let (link, mut rx) = RelayTransportBuilder::default()
///     .relay_url("wss://relay.example.com/relay")
///     .build_datagram_link()?;
/// link.join([7; 32]);
/// while let Some(event) = rx.events.recv().await {
///     if let LinkEvent::Joined { link: socket, room, members, .. } = event {
///         for to in members {
///             link.send(socket, room, to, 0, b"hello");
///         }
///     }
/// }
/// # Ok(())
/// # }
/// ```
pub struct DatagramLink {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DatagramLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatagramLink")
            .field("relays", &self.shared.settings.urls.len())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl RelayTransportBuilder {
    /// Checks the settings (the relay URLs, token, proxy, roots, timeout, keep-alive and
    /// idle timeout; identity and encryption do not apply) and builds a [`DatagramLink`]
    /// with the receivers its owner reads. Cheap and synchronous: the socket is dialled on
    /// the first [`DatagramLink::join`].
    pub fn build_datagram_link(self) -> Result<(DatagramLink, LinkReceivers), RelayError> {
        let settings = self.settings()?;
        let (dtx, drx) = mpsc::channel(LINK_DATAGRAM_QUEUE);
        let (etx, erx) = mpsc::channel(LINK_EVENT_QUEUE);
        let state = LinkState {
            senders: Some((dtx, etx)),
            ..LinkState::default()
        };
        let shared = Arc::new(Shared {
            settings: Arc::new(settings),
            state: Mutex::new(state),
            changed: Notify::new(),
            errors: ErrorLog::default(),
            sent: AtomicU64::new(0),
            send_dropped: AtomicU64::new(0),
            received: AtomicU64::new(0),
            received_dropped: AtomicU64::new(0),
        });
        let receivers = LinkReceivers {
            datagrams: drx,
            events: erx,
        };
        Ok((DatagramLink { shared }, receivers))
    }
}

impl DatagramLink {
    /// Joins `room` (on every socket from now on). The first join starts the socket task, so
    /// it must be called within a tokio runtime. Past [`MAX_LINK_ROOMS`] rooms the join is
    /// refused and recorded in [`recent_errors`](Self::recent_errors).
    pub fn join(&self, room: RoomId) {
        let mut st = self.shared.state();
        if st.closed || st.wanted.contains(&room) {
            return;
        }
        if st.wanted.len() >= MAX_LINK_ROOMS {
            drop(st);
            self.shared.errors.record(
                "",
                RelayError::InvalidSetting {
                    name: "rooms",
                    value: (MAX_LINK_ROOMS + 1).to_string(),
                    reason: format!("a datagram link joins at most {MAX_LINK_ROOMS} rooms"),
                },
            );
            return;
        }
        st.wanted.insert(room);
        if st.task.is_none()
            && let Some((datagrams, events)) = st.senders.take()
        {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    let shared = self.shared.clone();
                    st.task = Some(rt.spawn(link_socket::run(shared, datagrams, events)));
                }
                Err(e) => {
                    st.senders = Some((datagrams, events));
                    drop(st);
                    let url = String::new();
                    let reason = format!("the datagram link needs a tokio runtime: {e}");
                    self.shared.errors.record(
                        &url,
                        RelayError::Protocol {
                            url: url.clone(),
                            reason,
                        },
                    );
                    return;
                }
            }
        }
        drop(st);
        self.shared.changed.notify_one();
    }

    /// Leaves `room`.
    pub fn leave(&self, room: RoomId) {
        if self.shared.state().wanted.remove(&room) {
            self.shared.changed.notify_one();
        }
    }

    /// Sends datagrams to relay connection `to` in `room` on socket `link`: one datagram
    /// (`segment == 0`), or several of `segment` bytes each (the last may be shorter), as
    /// few frames as the relay's frame limit allows (whole datagrams per frame). Never
    /// waits: `false` when any was dropped (no socket, `link` is not the current socket, or
    /// the outbound queue is full).
    pub fn send(&self, link: u64, room: RoomId, to: ConnId, segment: usize, bytes: &[u8]) -> bool {
        let (tx, max_frame) = {
            let st = self.shared.state();
            match &st.out {
                Some(out) if out.link == link => (out.tx.clone(), out.max_frame),
                _ => {
                    self.shared.send_dropped.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
            }
        };
        let mut all = true;
        for (segment, chunk) in frames_of(segment, bytes, max_frame - DATAGRAM_OVERHEAD) {
            let frame = encode_datagram(&room, to, segment, chunk);
            if tx.try_send(Message::Binary(frame.into())).is_ok() {
                self.shared.sent.fetch_add(1, Ordering::Relaxed);
            } else {
                self.shared.send_dropped.fetch_add(1, Ordering::Relaxed);
                all = false;
            }
        }
        all
    }

    /// Leaves every room and closes the socket; the receivers end. Idempotent.
    pub fn close(&self) {
        let mut st = self.shared.state();
        st.closed = true;
        st.wanted.clear();
        st.out = None;
        st.senders = None;
        drop(st);
        self.shared.changed.notify_one();
    }

    /// The most recent relay errors (dial failures, lost sockets, refused joins), oldest
    /// first; at most 32 are kept.
    pub fn recent_errors(&self) -> Vec<RelayError> {
        self.shared.errors.snapshot()
    }

    /// The link's counters.
    pub fn stats(&self) -> LinkStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LinkStats {
            sent: get(&self.shared.sent),
            send_dropped: get(&self.shared.send_dropped),
            received: get(&self.shared.received),
            received_dropped: get(&self.shared.received_dropped),
        }
    }
}

impl Drop for DatagramLink {
    fn drop(&mut self) {
        self.close();
        if let Some(task) = self.shared.state().task.take() {
            task.abort();
        }
    }
}

/// Splits `bytes` (datagrams of `segment` bytes each, the last possibly shorter; one
/// datagram when `segment` is 0) into frame payloads of at most `max_payload` bytes, whole
/// datagrams each, with the segment size each frame declares. A datagram larger than
/// `max_payload` or than `u16::MAX` cannot be relayed and is skipped.
pub(crate) fn frames_of(
    segment: usize,
    bytes: &[u8],
    max_payload: usize,
) -> impl Iterator<Item = (u16, &[u8])> {
    let fits = |len: usize| len <= max_payload && len <= usize::from(u16::MAX);
    let (per_frame, seg) = if segment == 0 || segment >= bytes.len() {
        (bytes.len().max(1), 0)
    } else {
        (segment * (max_payload / segment).max(1), segment)
    };
    let ok = if seg == 0 {
        fits(bytes.len())
    } else {
        fits(seg)
    };
    let chunks = if ok && !bytes.is_empty() {
        bytes.chunks(per_frame)
    } else {
        bytes[..0].chunks(1)
    };
    let empty = ok && bytes.is_empty();
    chunks
        .map(move |c| {
            let declared = if seg == 0 || c.len() <= seg { 0 } else { seg };
            // `fits(seg)` above makes this lossless.
            (u16::try_from(declared).unwrap_or(0), c)
        })
        .chain(empty.then_some((0u16, &[][..])))
}

/// The datagrams in a received payload: `segment` bytes each (the last possibly shorter),
/// or the whole payload when `segment` is 0.
pub fn datagrams_of(segment: u16, payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    let size = if segment == 0 {
        payload.len().max(1)
    } else {
        usize::from(segment)
    };
    let empty = payload.is_empty();
    payload.chunks(size).chain(empty.then_some(&[][..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_datagram_is_one_frame() {
        let got: Vec<_> = frames_of(0, b"abc", 100).collect();
        assert_eq!(got, vec![(0, &b"abc"[..])]);
        let got: Vec<_> = frames_of(0, b"", 100).collect();
        assert_eq!(got, vec![(0, &b""[..])]);
        assert_eq!(
            frames_of(0, &[0; 101], 100).count(),
            0,
            "too large: skipped"
        );
        // A "batch" of one datagram shorter than its segment size is one datagram.
        let got: Vec<_> = frames_of(1200, &[1; 700], 100_000).collect();
        assert_eq!(got, vec![(0, &[1u8; 700][..])]);
    }

    #[test]
    fn a_batch_is_cut_into_frames_of_whole_datagrams() {
        let bytes: Vec<u8> = (0..10 * 1200 + 500).map(|i| i as u8).collect();
        let frames: Vec<(u16, &[u8])> = frames_of(1200, &bytes, 4 * 1200 + 100).collect();
        let sizes: Vec<usize> = frames.iter().map(|(_, c)| c.len()).collect();
        assert_eq!(sizes, vec![4800, 4800, 2900]);
        assert!(frames.iter().all(|(s, _)| *s == 1200));
        // A last frame holding one short datagram declares no segment size.
        let frames: Vec<_> = frames_of(1200, &bytes[..2 * 1200 + 10], 2 * 1200).collect();
        assert_eq!(frames[1], (0, &bytes[2400..2410]));
    }

    proptest! {
        /// Whatever the batch and the frame limit, the receiver gets back exactly the
        /// datagrams that were sent, in order.
        #[test]
        fn frames_carry_exactly_the_datagrams(
            segment in 1usize..3000,
            count in 1usize..40,
            last in 1usize..3000,
            max_payload in 100usize..70_000,
        ) {
            let last = last.min(segment);
            let mut bytes = Vec::new();
            let mut sent = Vec::new();
            for i in 0..count {
                let len = if i + 1 == count { last } else { segment };
                let d: Vec<u8> = (0..len).map(|j| (i * 7 + j) as u8).collect();
                bytes.extend_from_slice(&d);
                sent.push(d);
            }
            let mut got: Vec<Vec<u8>> = Vec::new();
            for (seg, payload) in frames_of(segment, &bytes, max_payload) {
                prop_assert!(payload.len() <= max_payload);
                got.extend(datagrams_of(seg, payload).map(<[u8]>::to_vec));
            }
            if segment <= max_payload || count == 1 && last <= max_payload {
                prop_assert_eq!(got, sent);
            } else {
                prop_assert!(got.is_empty(), "datagrams over the frame limit are skipped");
            }
        }
    }
}
