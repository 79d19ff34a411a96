//! Sessions: the one live QUIC connection per topic and peer, and settling a handshaked
//! connection into it: the verdict on the wire (the rule is `duplicate.rs`'s), handing the
//! connection to the application's accept queue, and forgetting the session when its
//! connection ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use pluresdb_sync_core::TopicHash;
use quinn::{RecvStream, SendStream};

use super::Node;
use super::book::Outcome;
use super::duplicate::{Decision, Existing, Held, Path, decide, obey};
use super::handshake::stream_cause;
use crate::conn::{HsConnection, closed_with, code};
use crate::error::{Declined, DialError};
use crate::wire::{self, Verdict};

/// A session's key: the topic and the remote's static key.
pub(crate) type SessionKey = (TopicHash, [u8; 32]);

struct Session {
    conn: quinn::Connection,
    addr: SocketAddr,
}

impl Session {
    fn alive(&self) -> bool {
        self.conn.close_reason().is_none()
    }
}

/// The sessions of a node, at most one per topic and peer.
#[derive(Default)]
pub(crate) struct Sessions {
    map: HashMap<SessionKey, Session>,
}

impl Sessions {
    /// How many sessions have an open connection.
    pub(crate) fn live(&self) -> usize {
        self.map.values().filter(|s| s.alive()).count()
    }

    /// The peer with a live session on `topic` whose connection goes to `addr`.
    pub(crate) fn at(&self, topic: &TopicHash, addr: SocketAddr) -> Option<[u8; 32]> {
        self.map
            .iter()
            .find(|((t, _), s)| t == topic && s.addr == addr && s.alive())
            .map(|((_, k), _)| *k)
    }

    /// The real (not virtual) addresses of the live sessions on `topic`: its connections
    /// made directly.
    pub(crate) fn direct_made_on(&self, topic: &TopicHash) -> Vec<SocketAddr> {
        self.map
            .iter()
            .filter(|((t, _), s)| t == topic && s.alive() && !crate::path::is_virtual(&s.addr))
            .map(|(_, s)| s.addr)
            .collect()
    }

    /// Whether the session `key` exists and its connection is open.
    pub(crate) fn is_live(&self, key: &SessionKey) -> bool {
        self.map.get(key).is_some_and(Session::alive)
    }

    /// What [`decide`] and [`obey`] need to know about `key`, for a new connection on
    /// `path`.
    fn held(&self, key: &SessionKey, path: Path) -> Held {
        let existing = match self.map.get(key) {
            None => Existing::None,
            Some(s) if s.alive() => Existing::Live,
            Some(_) => Existing::Dead,
        };
        Held {
            existing,
            live: self.live(),
            path,
        }
    }

    /// Makes `conn` the session `key` (closing the connection it replaces) if `decision`
    /// is to keep it; returns `decision`.
    fn apply(
        &mut self,
        decision: Decision,
        key: SessionKey,
        conn: &quinn::Connection,
        addr: SocketAddr,
    ) -> Decision {
        if decision != Decision::Keep {
            return decision;
        }
        let new = Session {
            conn: conn.clone(),
            addr,
        };
        if let Some(old) = self.map.insert(key, new)
            && old.conn.stable_id() != conn.stable_id()
        {
            old.conn.close(code::REPLACED, b"replaced");
        }
        decision
    }

    /// Removes the session `key` if `conn` is still its connection.
    fn forget(&mut self, key: &SessionKey, conn: &quinn::Connection) {
        if self
            .map
            .get(key)
            .is_some_and(|s| s.conn.stable_id() == conn.stable_id())
        {
            self.map.remove(key);
        }
    }

    /// The live connections whose remote address is `addr`, on any topic.
    pub(crate) fn connections_to(&self, addr: SocketAddr) -> Vec<quinn::Connection> {
        self.map
            .values()
            .filter(|s| s.addr == addr && s.alive())
            .map(|s| s.conn.clone())
            .collect()
    }

    /// Forgets every session (their connections are closed with the endpoint).
    pub(crate) fn clear(&mut self) {
        self.map.clear();
    }
}

impl Node {
    /// Settles a connection to `remote` on `topic` whose handshake is done: decides,
    /// consistently on both sides, whether it is the one connection kept between the two
    /// peers (the leader decides and sends its verdict; the follower obeys), then hands it
    /// to the application. So exactly one connection survives even when both dial at once.
    pub(super) async fn settle(
        self: &Arc<Self>,
        topic: TopicHash,
        remote: [u8; 32],
        conn: quinn::Connection,
        mut send: SendStream,
        mut recv: RecvStream,
        addr: SocketAddr,
    ) -> Result<Outcome, DialError> {
        let key = (topic, remote);
        let max = self.settings.max_peers;
        // Decided under the state lock, so two connections to one peer settle in turn, and
        // so a relay route that goes either is seen gone here or, removed after, closes the
        // session made here (`path_lost` removes the route first, then closes the sessions
        // at its address under this lock).
        let decided = {
            let mut st = self.state();
            let held = st.sessions.held(&key, self.path_now(&addr));
            decide(&self.public_key, &remote, held, max)
                .map(|d| st.sessions.apply(d, key, &conn, addr))
        };
        let decision = match decided {
            Some(decision) => {
                if decision == Decision::Keep
                    && let Err(e) = send.write_all(&[Verdict::Accept.to_byte()]).await
                {
                    self.forget_session(key, &conn);
                    return Err(DialError::handshake(addr, stream_cause(&conn, e)));
                }
                decision
            }
            None => {
                let verdict = read_verdict(&conn, &mut recv, addr).await?;
                let mut st = self.state();
                let held = st.sessions.held(&key, self.path_now(&addr));
                st.sessions
                    .apply(obey(verdict, held, max), key, &conn, addr)
            }
        };
        match decision {
            Decision::Keep => {}
            Decision::Duplicate => {
                conn.close(code::DUPLICATE, b"duplicate");
                return Ok(Outcome::Known(remote));
            }
            Decision::Full => {
                conn.close(code::BUSY, b"too many peers");
                return Err(DialError::declined(addr, Declined::MaxPeers { max }));
            }
            Decision::PathLost => {
                tracing::debug!(%addr, peer = %hex::encode(remote), "a connection made as its relay route went is dropped");
                conn.close(code::PATH_LOST, b"relay path lost");
                return Err(DialError::declined(addr, Declined::PathLost));
            }
        }
        // One that ended while it settled (its relay route went after the decision, or the
        // peer closed it) is not handed out: the application would get a connection that
        // ends at once.
        if let Some(reason) = conn.close_reason() {
            self.forget_session(key, &conn);
            return Err(DialError::handshake(addr, stream_cause(&conn, reason)));
        }
        let sender = self.state().topics.accept_queue(&topic);
        let connection = HsConnection::new(hex::encode(remote), conn.clone(), send, recv);
        let delivered = match sender {
            // Full queue: the application is not taking connections; refuse rather than
            // buffer without bound. The remote retries with backoff.
            Some(tx) => tx.try_send(Box::new(connection)).is_ok(),
            None => false,
        };
        if !delivered {
            self.forget_session(key, &conn);
            conn.close(code::BUSY, b"not accepting");
            return Err(DialError::declined(addr, Declined::QueueFull));
        }
        let info = crate::relay_path::PathInfo {
            peer_id: hex::encode(remote),
            topic,
            path: self.initial_path(addr),
        };
        self.board.set(conn.stable_id(), info.clone());
        if self.settings.relay.is_some() && self.data.direct_on() {
            if crate::path::is_virtual(&addr) {
                self.spawn(self.clone().drive_path(conn.clone(), addr, info));
            } else {
                self.spawn(self.clone().drive_fallback(conn.clone(), addr, info));
            }
        }
        let node = self.clone();
        self.spawn(async move {
            conn.closed().await;
            node.forget_session(key, &conn);
            node.board.remove(conn.stable_id());
        });
        Ok(Outcome::Connected(remote))
    }

    fn forget_session(&self, key: SessionKey, conn: &quinn::Connection) {
        self.state().sessions.forget(&key, conn);
    }
}

/// Reads the leader's verdict. A leader that closed the connection as a duplicate said
/// [`Verdict::Duplicate`] too.
async fn read_verdict(
    conn: &quinn::Connection,
    recv: &mut RecvStream,
    addr: SocketAddr,
) -> Result<Verdict, DialError> {
    let mut byte = [0u8; 1];
    if let Err(e) = recv.read_exact(&mut byte).await {
        if let quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) = &e
            && closed_with(c, code::DUPLICATE)
        {
            return Ok(Verdict::Duplicate);
        }
        return Err(DialError::handshake(addr, stream_cause(conn, e)));
    }
    wire::decode_verdict(byte[0]).map_err(|e| {
        conn.close(code::PROTOCOL, b"bad verdict");
        DialError::protocol(addr, e.to_string())
    })
}
