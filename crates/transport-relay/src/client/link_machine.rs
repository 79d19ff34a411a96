//! The datagram link's pure state machine: which rooms are wanted, which are joined on the
//! current socket and who is in each. Socket changes, the wanted rooms and relay frames go
//! in (no I/O, no clock); frames to send and [`LinkEvent`]s come out. Datagrams themselves
//! never pass through it (the socket loop forwards them directly).

use std::collections::{HashMap, HashSet};

use super::datagram::LinkEvent;
use crate::protocol::{ClientFrame, ConnId, RelayFrame, RoomId, error_code, kind};

/// Most members remembered per room: a hostile relay cannot inflate state beyond this (the
/// relay's own default limit is 256 members per room).
pub(crate) const MAX_MEMBERS_PER_ROOM: usize = 1024;

/// What the driver does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Send this frame to the relay (in order, never dropped).
    Send(ClientFrame),
    /// Tell the link's owner.
    Event(LinkEvent),
}

#[derive(Debug, PartialEq, Eq)]
enum Room {
    /// JOIN sent, no answer yet.
    Joining,
    /// Joined: the other members.
    Joined(HashSet<ConnId>),
    /// The relay refused the JOIN; tried again on the next socket.
    Refused,
}

/// The socket the machine is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Up {
    link: u64,
}

/// Rooms and their members on the current socket.
#[derive(Debug, Default)]
pub(crate) struct LinkMachine {
    wanted: HashSet<RoomId>,
    rooms: HashMap<RoomId, Room>,
    up: Option<Up>,
}

impl LinkMachine {
    /// A new socket (`link` is its number, never reused) is up with relay connection id `me`:
    /// every wanted room is joined.
    pub(crate) fn socket_up(&mut self, link: u64, me: ConnId, url: String) -> Vec<Step> {
        self.rooms.clear();
        self.up = Some(Up { link });
        let mut steps = vec![Step::Event(LinkEvent::Connected { link, me, url })];
        for room in self.wanted.iter().copied() {
            self.rooms.insert(room, Room::Joining);
            steps.push(Step::Send(ClientFrame::Join { room }));
        }
        steps
    }

    /// The socket is gone: every membership on it ended.
    pub(crate) fn socket_lost(&mut self, reason: String) -> Vec<Step> {
        self.rooms.clear();
        match self.up.take() {
            Some(Up { link }) => vec![Step::Event(LinkEvent::Disconnected { link, reason })],
            None => Vec::new(),
        }
    }

    /// The owner now wants exactly `wanted`: joins the new rooms and leaves the others
    /// (when a socket is up; otherwise the next socket joins them).
    pub(crate) fn want(&mut self, wanted: &HashSet<RoomId>) -> Vec<Step> {
        let mut steps = Vec::new();
        let added: Vec<RoomId> = wanted.difference(&self.wanted).copied().collect();
        let removed: Vec<RoomId> = self.wanted.difference(wanted).copied().collect();
        self.wanted = wanted.clone();
        if self.up.is_none() {
            return steps;
        }
        for room in removed {
            if self.rooms.remove(&room).is_some_and(|r| r != Room::Refused) {
                steps.push(Step::Send(ClientFrame::Leave { room }));
            }
        }
        for room in added {
            self.rooms.insert(room, Room::Joining);
            steps.push(Step::Send(ClientFrame::Join { room }));
        }
        steps
    }

    /// A frame from the relay (DATAGRAM_FROM excepted).
    pub(crate) fn on_frame(&mut self, f: RelayFrame) -> Vec<Step> {
        let Some(Up { link }) = self.up else {
            return Vec::new();
        };
        let event = match f {
            RelayFrame::Joined { room, peers } => match self.rooms.get_mut(&room) {
                Some(r @ Room::Joining) => {
                    let members: HashSet<ConnId> =
                        peers.into_iter().take(MAX_MEMBERS_PER_ROOM).collect();
                    let mut listed: Vec<ConnId> = members.iter().copied().collect();
                    listed.sort_unstable();
                    *r = Room::Joined(members);
                    Some(LinkEvent::Joined {
                        link,
                        room,
                        members: listed,
                    })
                }
                _ => None,
            },
            RelayFrame::PeerJoined { room, peer } => match self.rooms.get_mut(&room) {
                Some(Room::Joined(members))
                    if members.len() < MAX_MEMBERS_PER_ROOM && !members.contains(&peer) =>
                {
                    members.insert(peer);
                    Some(LinkEvent::MemberJoined {
                        link,
                        room,
                        member: peer,
                    })
                }
                _ => None,
            },
            RelayFrame::PeerLeft { room, peer } => match self.rooms.get_mut(&room) {
                Some(Room::Joined(members)) if members.contains(&peer) => {
                    members.remove(&peer);
                    Some(LinkEvent::MemberLeft {
                        link,
                        room,
                        member: peer,
                    })
                }
                _ => None,
            },
            RelayFrame::Error {
                code,
                about: kind::JOIN,
                room,
                message,
            } if code != error_code::ALREADY_JOINED => match self.rooms.get_mut(&room) {
                Some(r @ Room::Joining) => {
                    *r = Room::Refused;
                    Some(LinkEvent::JoinRefused {
                        link,
                        room,
                        code,
                        message,
                    })
                }
                _ => None,
            },
            _ => None,
        };
        event.map(Step::Event).into_iter().collect()
    }

    /// Whether `room` is joined on the current socket.
    #[cfg(test)]
    pub(crate) fn is_joined(&self, room: &RoomId) -> bool {
        matches!(self.rooms.get(room), Some(Room::Joined(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: RoomId = [1; 32];
    const B: RoomId = [2; 32];

    fn set(rooms: &[RoomId]) -> HashSet<RoomId> {
        rooms.iter().copied().collect()
    }

    fn events(steps: Vec<Step>) -> Vec<LinkEvent> {
        steps
            .into_iter()
            .filter_map(|s| match s {
                Step::Event(e) => Some(e),
                Step::Send(_) => None,
            })
            .collect()
    }

    #[test]
    fn wanted_rooms_are_joined_on_every_socket_and_membership_is_reported() {
        let mut m = LinkMachine::default();
        assert!(m.want(&set(&[A])).is_empty(), "no socket: nothing sent yet");
        let steps = m.socket_up(1, 10, "ws://r/relay".into());
        assert_eq!(
            steps,
            vec![
                Step::Event(LinkEvent::Connected {
                    link: 1,
                    me: 10,
                    url: "ws://r/relay".into()
                }),
                Step::Send(ClientFrame::Join { room: A })
            ]
        );
        let joined = m.on_frame(RelayFrame::Joined {
            room: A,
            peers: vec![7, 3],
        });
        assert_eq!(
            events(joined),
            vec![LinkEvent::Joined {
                link: 1,
                room: A,
                members: vec![3, 7]
            }]
        );
        assert!(m.is_joined(&A));
        // A second JOINED (a confused relay) changes nothing.
        assert!(
            m.on_frame(RelayFrame::Joined {
                room: A,
                peers: vec![]
            })
            .is_empty()
        );
        assert_eq!(
            events(m.on_frame(RelayFrame::PeerJoined { room: A, peer: 9 })),
            vec![LinkEvent::MemberJoined {
                link: 1,
                room: A,
                member: 9
            }]
        );
        // Known already, or for a room not joined: nothing.
        assert!(
            m.on_frame(RelayFrame::PeerJoined { room: A, peer: 9 })
                .is_empty()
        );
        assert!(
            m.on_frame(RelayFrame::PeerJoined { room: B, peer: 4 })
                .is_empty()
        );
        assert_eq!(
            events(m.on_frame(RelayFrame::PeerLeft { room: A, peer: 3 })),
            vec![LinkEvent::MemberLeft {
                link: 1,
                room: A,
                member: 3
            }]
        );
        assert!(
            m.on_frame(RelayFrame::PeerLeft { room: A, peer: 3 })
                .is_empty()
        );
        // The socket goes: one Disconnected, then a new socket joins again.
        assert_eq!(
            events(m.socket_lost("gone".into())),
            vec![LinkEvent::Disconnected {
                link: 1,
                reason: "gone".into()
            }]
        );
        assert!(m.socket_lost("again".into()).is_empty());
        assert!(!m.is_joined(&A));
        let steps = m.socket_up(2, 11, "ws://r/relay".into());
        assert!(steps.contains(&Step::Send(ClientFrame::Join { room: A })));
        // Membership of the old socket is not carried over.
        assert!(
            m.on_frame(RelayFrame::PeerLeft { room: A, peer: 7 })
                .is_empty()
        );
    }

    #[test]
    fn wanting_fewer_rooms_leaves_them_and_refusals_are_reported_once() {
        let mut m = LinkMachine::default();
        m.socket_up(1, 10, String::new());
        assert_eq!(
            m.want(&set(&[A, B]))
                .into_iter()
                .filter(|s| matches!(s, Step::Send(ClientFrame::Join { .. })))
                .count(),
            2
        );
        m.on_frame(RelayFrame::Joined {
            room: A,
            peers: vec![],
        });
        let refused = m.on_frame(RelayFrame::Error {
            code: error_code::ROOM_FULL,
            about: kind::JOIN,
            room: B,
            message: "full".into(),
        });
        assert_eq!(
            events(refused),
            vec![LinkEvent::JoinRefused {
                link: 1,
                room: B,
                code: error_code::ROOM_FULL,
                message: "full".into()
            }]
        );
        // ALREADY_JOINED and errors about other frames are not refusals.
        for (code, about) in [
            (error_code::ALREADY_JOINED, kind::JOIN),
            (error_code::NOT_IN_ROOM, kind::LEAVE),
        ] {
            let e = RelayFrame::Error {
                code,
                about,
                room: A,
                message: String::new(),
            };
            assert!(m.on_frame(e).is_empty());
        }
        assert!(m.is_joined(&A));
        // Leaving: LEAVE for the joined room, nothing for the refused one.
        assert_eq!(
            m.want(&set(&[])),
            vec![Step::Send(ClientFrame::Leave { room: A })]
        );
        assert!(
            m.on_frame(RelayFrame::PeerJoined { room: A, peer: 5 })
                .is_empty()
        );
    }

    #[test]
    fn a_hostile_relay_cannot_inflate_membership() {
        let mut m = LinkMachine::default();
        m.want(&set(&[A]));
        m.socket_up(1, 10, String::new());
        m.on_frame(RelayFrame::Joined {
            room: A,
            peers: (0..5_000).collect(),
        });
        for peer in 10_000..12_000 {
            m.on_frame(RelayFrame::PeerJoined { room: A, peer });
        }
        match m.rooms.get(&A) {
            Some(Room::Joined(members)) => assert_eq!(members.len(), MAX_MEMBERS_PER_ROOM),
            other => panic!("{other:?}"),
        }
    }
}
