//! The one-connection-per-peer rule, pure: when a new connection to a peer is ready, which
//! side decides (the leader, with the smaller static key), and what, given the sessions this
//! node holds and whether the new connection's path is still there. Both peers apply it to
//! the same facts, so when both dial at once exactly one connection survives on each side.

use crate::wire::Verdict;

/// This node's session with the remote on the topic, when the new connection is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Existing {
    /// None.
    None,
    /// One whose connection has closed (it is replaced).
    Dead,
    /// One whose connection is open.
    Live,
}

/// The new connection's path when it is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    /// There: a real address, a relay route still there, or a virtual address gone direct.
    Open,
    /// Its relay route went while the handshake ran (the member left the room, or the relay
    /// socket was lost): nothing can reach the peer through it any more. The sessions
    /// that used the route were closed when it went, so this one would find them dead.
    Lost,
}

/// What this node holds when a new connection to a peer is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Held {
    /// Its session with that peer on the topic.
    pub(crate) existing: Existing,
    /// Its live sessions, over all topics and peers.
    pub(crate) live: usize,
    /// The new connection's path.
    pub(crate) path: Path,
}

/// What to do with the new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// It becomes the session (replacing any old one); the leader tells the follower
    /// [`Verdict::Accept`].
    Keep,
    /// It is dropped: the leader has a live session with the peer (and closes the new
    /// connection as a duplicate), or the follower was told [`Verdict::Duplicate`].
    Duplicate,
    /// It is declined: this node has `max` peers.
    Full,
    /// It is dropped (closed as "relay path lost"): its path is [`Path::Lost`]. Kept, it
    /// would be handed out unable to carry a byte, and, live until its idle timeout, make
    /// every new connection to the peer a duplicate (it would replace the session the lost
    /// route's close left dead). Either side may find the route gone first; the other side
    /// loses the route too (the peer left its room, or was the one that lost its socket) and
    /// closes the connection when it does, or never gets it.
    PathLost,
}

/// Whether this node leads the decision about connections with `remote`.
pub(crate) fn leads(local: &[u8; 32], remote: &[u8; 32]) -> bool {
    local < remote
}

/// The leader's decision about a new connection from this node (`local`) to `remote`
/// (another key: a connection to itself never gets this far); `None` when this node
/// follows: it then awaits the leader's verdict and [`obey`]s it.
pub(crate) fn decide(
    local: &[u8; 32],
    remote: &[u8; 32],
    held: Held,
    max: usize,
) -> Option<Decision> {
    if !leads(local, remote) {
        return None;
    }
    Some(match held.existing {
        _ if held.path == Path::Lost => Decision::PathLost,
        Existing::Live => Decision::Duplicate,
        _ if held.live >= max => Decision::Full,
        _ => Decision::Keep,
    })
}

/// The follower's decision once the leader's `verdict` arrived. It keeps what the leader
/// keeps (the leader saw any old connection as dead; so is it, soon, here) unless the new
/// connection's path went meanwhile, or it is full and has no session with the peer to
/// replace.
pub(crate) fn obey(verdict: Verdict, held: Held, max: usize) -> Decision {
    match verdict {
        Verdict::Duplicate => Decision::Duplicate,
        Verdict::Accept if held.path == Path::Lost => Decision::PathLost,
        Verdict::Accept if held.live >= max && held.existing == Existing::None => Decision::Full,
        Verdict::Accept => Decision::Keep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: [u8; 32] = [1; 32];
    const LARGE: [u8; 32] = [2; 32];

    fn held(existing: Existing, live: usize) -> Held {
        Held {
            existing,
            live,
            path: Path::Open,
        }
    }

    fn lost(existing: Existing, live: usize) -> Held {
        Held {
            path: Path::Lost,
            ..held(existing, live)
        }
    }

    #[test]
    fn the_smaller_key_leads_and_the_other_follows() {
        assert!(leads(&SMALL, &LARGE) && !leads(&LARGE, &SMALL));
        let fresh = held(Existing::None, 0);
        assert_eq!(decide(&SMALL, &LARGE, fresh, 8), Some(Decision::Keep));
        assert_eq!(decide(&LARGE, &SMALL, fresh, 8), None);
        // The follower waits whatever it holds: the leader's facts decide.
        for existing in [Existing::None, Existing::Dead, Existing::Live] {
            let h = held(existing, 8);
            assert_eq!(decide(&LARGE, &SMALL, h, 8), None);
        }
        assert_eq!(obey(Verdict::Accept, fresh, 8), Decision::Keep);
        assert_eq!(obey(Verdict::Duplicate, fresh, 8), Decision::Duplicate);
    }

    #[test]
    fn a_live_session_makes_the_new_connection_a_duplicate() {
        assert_eq!(
            decide(&SMALL, &LARGE, held(Existing::Live, 1), 8),
            Some(Decision::Duplicate)
        );
        // Even when full: it is a duplicate, not a refusal.
        assert_eq!(
            decide(&SMALL, &LARGE, held(Existing::Live, 8), 8),
            Some(Decision::Duplicate)
        );
        // A dead one is replaced.
        assert_eq!(
            decide(&SMALL, &LARGE, held(Existing::Dead, 1), 8),
            Some(Decision::Keep)
        );
        // The follower replaces its own (live-looking) session when the leader accepts.
        assert_eq!(
            obey(Verdict::Accept, held(Existing::Live, 1), 8),
            Decision::Keep
        );
    }

    #[test]
    fn max_peers_declines_new_peers_on_both_sides() {
        assert_eq!(
            decide(&SMALL, &LARGE, held(Existing::None, 2), 2),
            Some(Decision::Full)
        );
        assert_eq!(
            decide(&SMALL, &LARGE, held(Existing::Dead, 2), 2),
            Some(Decision::Full)
        );
        assert_eq!(
            decide(&SMALL, &LARGE, held(Existing::None, 1), 2),
            Some(Decision::Keep)
        );
        assert_eq!(
            obey(Verdict::Accept, held(Existing::None, 2), 2),
            Decision::Full
        );
        // A follower at its limit still replaces a session it has with the peer.
        for existing in [Existing::Dead, Existing::Live] {
            assert_eq!(obey(Verdict::Accept, held(existing, 2), 2), Decision::Keep);
        }
        assert_eq!(
            obey(Verdict::Duplicate, held(Existing::None, 2), 2),
            Decision::Duplicate
        );
    }

    /// The race seen after a relay restart: a connection whose handshake ran over the old
    /// route settles just after the route went. The route's close left the session dead,
    /// so the old rule kept the new connection (`Keep`): handed out unable to carry a byte,
    /// it ended at its idle timeout, and until then every connection over the new route
    /// was a duplicate of it.
    #[test]
    fn a_connection_whose_route_went_is_never_kept() {
        for existing in [Existing::None, Existing::Dead, Existing::Live] {
            for live in [0, 1, 8] {
                let h = lost(existing, live);
                assert_eq!(
                    decide(&SMALL, &LARGE, h, 8),
                    Some(Decision::PathLost),
                    "{h:?}"
                );
                // The follower waits for the verdict, then drops it whatever the leader
                // said (the leader may not have seen the route go yet).
                assert_eq!(decide(&LARGE, &SMALL, h, 8), None);
                assert_eq!(obey(Verdict::Accept, h, 8), Decision::PathLost, "{h:?}");
                assert_eq!(obey(Verdict::Duplicate, h, 8), Decision::Duplicate);
            }
        }
        // With the route there, the same facts keep it, as before.
        assert_eq!(
            decide(&SMALL, &LARGE, held(Existing::Dead, 0), 8),
            Some(Decision::Keep)
        );
        assert_eq!(
            obey(Verdict::Accept, held(Existing::Dead, 0), 8),
            Decision::Keep
        );
    }
}
