//! What the pure session machine asks of its driver: the whole vocabulary between the two.

use std::sync::Arc;

use super::refusal_log::Quieted;
use crate::RelayError;
use crate::protocol::{ConnId, RoomId};

/// A session's id, unique within one transport (a new handshake is a new session).
pub(crate) type SessionId = u64;

/// One thing for the driver to do, in order.
#[derive(Debug)]
pub(crate) enum Action {
    /// Queue this encoded relay frame (JOIN, or a SEND carrying a peer frame) towards the relay.
    Send(Vec<u8>),
    /// A session is established: hand its connection to the application.
    Open(Opened),
    /// Queue this data peer frame (SEALED or PLAIN, still sealed) for `session`'s connection;
    /// it used `cost` credit units of the window this side granted.
    Deliver {
        session: SessionId,
        frame: Vec<u8>,
        cost: u64,
    },
    /// The peer's total grant to `session` is now `limit` credit units.
    Credit { session: SessionId, limit: u64 },
    /// `session` ended. Its connection's `receive` returns what was queued, then `error` (if
    /// any), then `None`.
    End {
        session: SessionId,
        error: Option<RelayError>,
    },
    /// Keep this error for `recent_errors` (and log it).
    Record(RelayError),
    /// Log the summary of the refusals not recorded one by one.
    Quieted(Quieted),
    /// `room` is joined: answer the joins waiting for it.
    Joined { room: RoomId },
    /// The relay refused to join `room`: fail the joins waiting for it (the room is forgotten).
    JoinFailed { room: RoomId, error: RelayError },
}

/// A newly established session.
pub(crate) struct Opened {
    pub(crate) room: RoomId,
    /// The peer's relay connection id.
    pub(crate) conn: ConnId,
    pub(crate) session: SessionId,
    /// The hex of the peer's static key.
    pub(crate) peer_id: String,
    /// The transport cipher (encryption on).
    pub(crate) cipher: Option<Arc<snow::StatelessTransportState>>,
    /// The window the peer granted this side: the connection's initial send window.
    pub(crate) window: u32,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("conn", &self.conn)
            .field("session", &self.session)
            .field("peer_id", &self.peer_id)
            .field("encrypted", &self.cipher.is_some())
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}
