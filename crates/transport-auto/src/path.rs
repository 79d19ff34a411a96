//! The relay client's datagram link as the Hyperswarm node's relay path: topics become room
//! hashes (`derive_from_topic(topic, Domain::RelayRoom)`, as in Relay mode), the link's
//! events become route events, datagrams pass through unchanged.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll};

use pluresdb_sync_core::TopicHash;
use pluresdb_sync_core::topic::{Domain, derive_from_topic};
use pluresdb_sync_transport_hyperswarm::relay_path::{
    RelayDatagram, RelayEvent, RelayPath, RelayRoute,
};
use pluresdb_sync_transport_relay::{DatagramLink, LinkEvent, LinkReceivers};

/// A [`DatagramLink`] as a [`RelayPath`].
#[derive(Debug)]
pub(crate) struct LinkPath {
    link: DatagramLink,
    rx: Mutex<LinkReceivers>,
    /// Room → topic, for the topics joined.
    topics: Mutex<HashMap<[u8; 32], TopicHash>>,
    /// Socket number → relay URL, while up.
    urls: Mutex<HashMap<u64, String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LinkPath {
    pub(crate) fn new(link: DatagramLink, rx: LinkReceivers) -> Self {
        Self {
            link,
            rx: Mutex::new(rx),
            topics: Mutex::default(),
            urls: Mutex::default(),
        }
    }

    /// The link (its errors and counters).
    pub(crate) fn link(&self) -> &DatagramLink {
        &self.link
    }

    fn topic(&self, room: &[u8; 32]) -> Option<TopicHash> {
        lock(&self.topics).get(room).copied()
    }

    /// The node's view of a link event; `None` for rooms of no joined topic.
    fn translate(&self, event: LinkEvent) -> Option<RelayEvent> {
        let route = |link, room, conn| RelayRoute { link, room, conn };
        Some(match event {
            LinkEvent::Connected { link, url, me } => {
                lock(&self.urls).insert(link, url.clone());
                RelayEvent::Connected { link, url, me }
            }
            LinkEvent::Joined {
                link,
                room,
                members,
            } => RelayEvent::Joined {
                link,
                topic: self.topic(&room)?,
                members: members.into_iter().map(|m| route(link, room, m)).collect(),
            },
            LinkEvent::MemberJoined { link, room, member } => RelayEvent::MemberJoined {
                topic: self.topic(&room)?,
                route: route(link, room, member),
            },
            LinkEvent::MemberLeft { link, room, member } => RelayEvent::MemberLeft {
                topic: self.topic(&room)?,
                route: route(link, room, member),
            },
            LinkEvent::JoinRefused {
                room,
                code,
                message,
                ..
            } => RelayEvent::JoinRefused {
                topic: self.topic(&room)?,
                reason: format!("{message} (code {code})"),
            },
            LinkEvent::Disconnected { link, reason } => {
                lock(&self.urls).remove(&link);
                RelayEvent::Disconnected { link, reason }
            }
            _ => return None,
        })
    }
}

impl RelayPath for LinkPath {
    fn join(&self, topic: &TopicHash) {
        let room = derive_from_topic(topic, Domain::RelayRoom);
        lock(&self.topics).insert(room, *topic);
        self.link.join(room);
    }

    fn send(&self, to: &RelayRoute, segment: usize, datagrams: &[u8]) -> bool {
        self.link
            .send(to.link, to.room, to.conn, segment, datagrams)
    }

    fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<RelayDatagram>> {
        lock(&self.rx).datagrams.poll_recv(cx).map(|d| {
            d.map(|d| RelayDatagram {
                from: RelayRoute {
                    link: d.link,
                    room: d.room,
                    conn: d.from,
                },
                segment: usize::from(d.segment),
                bytes: d.payload,
            })
        })
    }

    fn poll_event(&self, cx: &mut Context<'_>) -> Poll<Option<RelayEvent>> {
        loop {
            let event = match lock(&self.rx).events.poll_recv(cx) {
                Poll::Ready(Some(e)) => e,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            };
            if let Some(e) = self.translate(event) {
                return Poll::Ready(Some(e));
            }
        }
    }

    fn close(&self) {
        self.link.close();
    }

    fn url(&self, link: u64) -> Option<String> {
        lock(&self.urls).get(&link).cloned()
    }
}
