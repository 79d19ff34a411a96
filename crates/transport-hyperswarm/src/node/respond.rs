//! Answering incoming connections: admission of each first Initial (`admission.rs`: accept,
//! QUIC Retry or refuse, before any crypto), then the responder's side of the handshake (QUIC,
//! the info-hash, Noise XXpsk0 message 1 checked before any Diffie-Hellman, messages 2 and
//! 3) and for `Connect` settling the session; every way an attempt ends is recorded
//! (`incoming.rs`: counts, one debug line per kind, a summary per interval).

use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::Node;
use super::admission::{Attempt, Refusal, Ticket, Verdict};
use super::handshake::{quic_cause, stream_cause};
use super::incoming::{Event, SUMMARY_INTERVAL};
use super::topics::Found;
use crate::conn::code;
use crate::error::{DialError, HandshakeFailure};
use crate::noise::{self, RespondError};
use crate::wire::Purpose;

/// Where an incoming handshake got to: what its failure (or timeout) counts as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// The QUIC handshake.
    Quic,
    /// QUIC is up; the info-hash and message 1 are awaited (no DH done).
    Message1,
    /// Message 1 was accepted.
    Late,
}

/// A failed incoming handshake: what it counts as, and why.
struct Refused {
    event: Event,
    error: DialError,
}

/// Gives an admitted handshake's slot back when the handshake ends, also when its task is
/// aborted at shutdown.
struct Slot {
    node: Arc<Node>,
    ticket: Option<Ticket>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.node.admission().finish(t);
        }
    }
}

impl Node {
    /// Answers incoming connections until the endpoint closes; a companion task writes the
    /// refusal summaries.
    pub(super) async fn accept_loop(self: Arc<Self>) {
        let summaries = self.clone();
        self.spawn(async move { summaries.write_summaries().await });
        while let Some(incoming) = self.endpoint.accept().await {
            self.admit(incoming);
        }
    }

    /// Decides about one first Initial, before any crypto.
    fn admit(self: &Arc<Self>, incoming: quinn::Incoming) {
        let now = Instant::now();
        let addr = incoming.remote_address();
        let validated = incoming.remote_address_validated();
        let verified = validated && self.state().book.is_verified(addr);
        self.note(Event::Attempt, addr, &"");
        let attempt = Attempt {
            addr,
            validated,
            verified,
        };
        let verdict = self.admission().offer(now, attempt);
        match verdict {
            Verdict::Accept(ticket) => {
                let slot = Slot {
                    node: self.clone(),
                    ticket: Some(ticket),
                };
                let node = self.clone();
                self.spawn(async move {
                    let _slot = slot;
                    node.answer(incoming, addr).await;
                });
            }
            Verdict::Retry => {
                self.note(Event::Retried, addr, &"under load or trying too often");
                if let Err(e) = incoming.retry() {
                    // Only for an address validated already, which is never retried.
                    e.into_incoming().ignore();
                }
            }
            Verdict::Refuse(why) => {
                let (event, detail) = match why {
                    Refusal::Busy => (Event::Busy, "too many handshakes in progress"),
                    Refusal::PerIp => (Event::Busy, "too many handshakes from its ip"),
                    Refusal::RateLimited => (Event::RateLimited, "it tries too often"),
                };
                self.note(event, addr, &detail);
                incoming.refuse();
            }
        }
    }

    /// Runs one admitted handshake under the handshake timeout and records how it ended.
    async fn answer(self: &Arc<Self>, incoming: quinn::Incoming, addr: SocketAddr) {
        let limit = self.settings.handshake_timeout;
        let mut stage = Stage::Quic;
        let result = tokio::time::timeout(limit, self.respond(incoming, &mut stage)).await;
        let refused = match result {
            Ok(Ok(())) => return,
            Ok(Err(r)) => r,
            Err(_) => {
                let event = match stage {
                    Stage::Quic => Event::QuicFailed,
                    Stage::Message1 => Event::Message1,
                    Stage::Late => Event::FailedLate,
                };
                let cause = HandshakeFailure::Timeout { after: limit };
                Refused {
                    event,
                    error: DialError::handshake(addr, cause),
                }
            }
        };
        self.note(refused.event, addr, &refused.error);
    }

    /// The responder's side: QUIC, the info-hash, Noise message 1 (no DH before it checks
    /// out), message 2, then message 3 and settling for `Connect`.
    async fn respond(
        self: &Arc<Self>,
        incoming: quinn::Incoming,
        stage: &mut Stage,
    ) -> Result<(), Refused> {
        let addr = incoming.remote_address();
        let quic_failed = |e: quinn::ConnectionError| {
            let cause = quic_cause(&e);
            let event = match cause {
                HandshakeFailure::Version { .. } => Event::Version,
                _ => Event::QuicFailed,
            };
            Refused {
                event,
                error: DialError::handshake(addr, cause),
            }
        };
        let conn = incoming
            .accept()
            .map_err(quic_failed)?
            .await
            .map_err(quic_failed)?;
        *stage = Stage::Message1;
        let at_message1 = |conn: &quinn::Connection, e: &dyn Display| {
            conn.close(code::PROTOCOL, b"handshake failed");
            Refused {
                event: Event::Message1,
                error: DialError::handshake(addr, stream_cause(conn, e)),
            }
        };
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| at_message1(&conn, &e))?;
        let prologue = noise::prologue(&conn).map_err(|e| at_message1(&conn, &e))?;
        let info_hash = noise::read_info_hash(&mut recv)
            .await
            .map_err(|e| at_message1(&conn, &e))?;
        let found = self.state().topics.find_by_info_hash(&info_hash);
        let Some(Found {
            topic,
            psk,
            accepting,
        }) = found
        else {
            conn.close(code::UNKNOWN_TOPIC, b"unknown topic");
            return Err(Refused {
                event: Event::UnknownInfoHash,
                error: DialError::handshake(addr, HandshakeFailure::TopicUnknown),
            });
        };
        let identity = &self.settings.identity;
        let mut responder = noise::respond_first(&mut recv, identity, &prologue, &psk)
            .await
            .map_err(|e| match e {
                RespondError::Message1(reason) => {
                    conn.close(code::PROTOCOL, b"handshake failed");
                    Refused {
                        event: Event::Message1,
                        error: DialError::handshake(addr, HandshakeFailure::Noise { reason }),
                    }
                }
                RespondError::Other(e) => at_message1(&conn, &e),
            })?;
        *stage = Stage::Late;
        let late = |conn: &quinn::Connection, e: &dyn Display| Refused {
            event: Event::FailedLate,
            error: DialError::handshake(addr, stream_cause(conn, e)),
        };
        let purpose = responder.purpose;
        if purpose == Purpose::Connect && !accepting {
            conn.close(
                code::UNKNOWN_TOPIC,
                b"not accepting connections on this topic",
            );
            return Err(Refused {
                event: Event::Declined,
                error: DialError::handshake(addr, HandshakeFailure::TopicUnknown),
            });
        }
        self.note(Event::Message2Sent, addr, &"");
        responder
            .reply(&mut send)
            .await
            .map_err(|e| late(&conn, &e))?;
        if purpose == Purpose::Identify {
            self.note(Event::Completed, addr, &"");
            // The initiator closes; do not hold the connection longer than that.
            let _ = tokio::time::timeout(self.settings.handshake_timeout, conn.closed()).await;
            return Ok(());
        }
        let hs = match responder.finish(&mut recv).await {
            Ok(hs) => hs,
            Err(e) => {
                conn.close(code::PROTOCOL, b"handshake failed");
                return Err(late(&conn, &e));
            }
        };
        self.note(Event::Completed, addr, &"");
        if hs.remote_static == self.public_key {
            conn.close(code::SELF, b"self");
            return Ok(());
        }
        self.admission().completed(Instant::now(), addr);
        // What settling decides (a duplicate, max peers, a full queue) is not a failed
        // handshake: the initiator learns it from the verdict or the close code.
        let _ = self
            .settle(topic, hs.remote_static, conn, send, recv, addr)
            .await;
        Ok(())
    }

    /// Records `event` for an attempt from `addr`; the first refusal of its kind in an
    /// interval is logged with its detail, the rest go into the summary.
    fn note(&self, event: Event, addr: SocketAddr, detail: &dyn Display) {
        let first = self.incoming().record(Instant::now(), event);
        if first {
            tracing::debug!(
                %addr,
                %detail,
                "incoming handshake {}; more are summarised every {} s",
                event.describe(),
                SUMMARY_INTERVAL.as_secs()
            );
            self.incoming_changed.notify_one();
        }
    }

    /// Writes each interval's summary of refusals when it is due: one line per interval
    /// however many there were, WARN when they point at an attack or a misconfiguration.
    async fn write_summaries(&self) {
        loop {
            let due = self.incoming().due();
            match due {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => self.incoming_changed.notified().await,
            }
            let summary = self.incoming().summary(Instant::now());
            if let Some(s) = summary {
                if s.alarming() {
                    tracing::warn!("{s}");
                } else {
                    tracing::debug!("{s}");
                }
            }
        }
    }
}
