//! What every room of a transport shares while it handles an input: this side's identity
//! and settings, its relay connection id, the session id counter, the handshake rate limit and
//! refusal log, and where actions go.

use std::time::{Duration, Instant};

use pluresdb_sync_core::Identity;

use super::action::{Action, SessionId};
use super::handshake_limit::HandshakeLimit;
use super::noise_crypto::ScalarMults;
use super::refusal_log::RefusalLog;
use crate::RelayError;
use crate::protocol::ConnId;

/// What every room of a transport shares: this side's identity and settings, its relay
/// connection id, the session id counter, and where actions go.
pub(crate) struct Ctx<'a> {
    pub(crate) identity: &'a Identity,
    pub(crate) encryption: bool,
    /// How long a handshake may take.
    pub(crate) timeout: Duration,
    /// The window this side grants each peer.
    pub(crate) window: u32,
    /// Where handshakes count their scalar multiplications.
    pub(crate) mults: &'a ScalarMults,
    /// This side's relay connection id.
    pub(crate) me: ConnId,
    /// The next session id (the only place one is made).
    pub(crate) next_session: &'a mut SessionId,
    /// The rate limit on handshake openings per remote.
    pub(crate) limit: &'a mut HandshakeLimit,
    /// Which refusals are recorded one by one.
    pub(crate) log: &'a mut RefusalLog,
    pub(crate) out: &'a mut Vec<Action>,
}

impl Ctx<'_> {
    pub(super) fn new_session_id(&mut self) -> SessionId {
        let id = *self.next_session;
        *self.next_session += 1;
        id
    }

    pub(super) fn record(&mut self, e: RelayError) {
        self.out.push(Action::Record(e));
    }

    /// Records a refused handshake (or a REJECT received), unless the quota of refusals
    /// logged one by one is used up for this interval.
    pub(super) fn refused(&mut self, e: RelayError, now: Instant) {
        if let Some(e) = self.log.refused(e, now) {
            self.record(e);
        }
    }
}
