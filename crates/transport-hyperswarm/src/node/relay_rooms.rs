//! With a relay path: each topic's relay room as the node knows it, pure: whether it is
//! joined (on which relay socket) and the virtual addresses of its members, plus the URL of
//! each relay socket that is up and our relay connection id on it. Fed by the path's events; read by `connect`'s dial rounds
//! and `lookup`.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;

use pluresdb_sync_core::TopicHash;

#[derive(Debug, Default)]
struct Room {
    /// The relay socket it is joined on.
    joined_on: Option<u64>,
    members: BTreeSet<SocketAddr>,
}

/// The relay rooms of the joined topics.
#[derive(Debug, Default)]
pub(crate) struct RelayRooms {
    rooms: HashMap<TopicHash, Room>,
    urls: HashMap<u64, String>,
    /// Our relay connection id on each socket that is up.
    mine: HashMap<u64, u64>,
}

impl RelayRooms {
    /// Relay socket `link` is up, at `url`, where we are relay connection `me`.
    pub(crate) fn connected(&mut self, link: u64, url: String, me: u64) {
        self.urls.insert(link, url);
        self.mine.insert(link, me);
    }

    /// `topic`'s room is joined on `link`, with these members.
    pub(crate) fn joined(&mut self, topic: TopicHash, link: u64, members: &[SocketAddr]) {
        let room = self.rooms.entry(topic).or_default();
        room.joined_on = Some(link);
        room.members.extend(members.iter().copied());
    }

    /// A member joined `topic`'s room.
    pub(crate) fn member_joined(&mut self, topic: TopicHash, addr: SocketAddr) {
        self.rooms.entry(topic).or_default().members.insert(addr);
    }

    /// A member left `topic`'s room.
    pub(crate) fn member_left(&mut self, topic: &TopicHash, addr: SocketAddr) {
        if let Some(room) = self.rooms.get_mut(topic) {
            room.members.remove(&addr);
        }
    }

    /// Relay socket `link` is gone: rooms joined on it are not joined any more, and the
    /// members at `gone` (its routes' addresses) are gone from every room.
    pub(crate) fn disconnected(&mut self, link: u64, gone: &[SocketAddr]) {
        self.urls.remove(&link);
        self.mine.remove(&link);
        for room in self.rooms.values_mut() {
            if room.joined_on == Some(link) {
                room.joined_on = None;
            }
            for addr in gone {
                room.members.remove(addr);
            }
        }
    }

    /// Whether `topic`'s room is joined.
    pub(crate) fn is_joined(&self, topic: &TopicHash) -> bool {
        self.rooms.get(topic).is_some_and(|r| r.joined_on.is_some())
    }

    /// The relay socket `topic`'s room is joined on.
    pub(crate) fn joined_on(&self, topic: &TopicHash) -> Option<u64> {
        self.rooms.get(topic).and_then(|r| r.joined_on)
    }

    /// Our relay connection id on socket `link`, while it is up.
    pub(crate) fn me(&self, link: u64) -> Option<u64> {
        self.mine.get(&link).copied()
    }

    /// The members of `topic`'s room.
    pub(crate) fn members(&self, topic: &TopicHash) -> Vec<SocketAddr> {
        self.rooms
            .get(topic)
            .map(|r| r.members.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The URL of relay socket `link`, while it is up.
    pub(crate) fn url(&self, link: u64) -> Option<&str> {
        self.urls.get(&link).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_follow_membership_and_the_socket() {
        let mut r = RelayRooms::default();
        let (t, other) = ([1u8; 32], [2u8; 32]);
        let a: SocketAddr = "240.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "240.0.0.2:1".parse().unwrap();
        assert!(!r.is_joined(&t));
        r.connected(1, "ws://relay/relay".into(), 77);
        assert_eq!(r.me(1), Some(77));
        r.joined(t, 1, &[a]);
        r.member_joined(t, b);
        assert!(r.is_joined(&t) && !r.is_joined(&other));
        assert_eq!((r.joined_on(&t), r.joined_on(&other)), (Some(1), None));
        assert_eq!(r.members(&t), vec![a, b]);
        r.member_left(&t, a);
        assert_eq!(r.members(&t), vec![b]);
        assert_eq!(r.url(1), Some("ws://relay/relay"));
        r.disconnected(1, &[b]);
        assert!(!r.is_joined(&t));
        assert!(r.members(&t).is_empty());
        assert_eq!((r.url(1), r.me(1)), (None, None));
        // A new socket: joined again.
        r.joined(t, 2, &[]);
        assert!(r.is_joined(&t));
        // An old socket's loss does not unjoin the new one.
        r.disconnected(1, &[]);
        assert!(r.is_joined(&t));
    }
}
