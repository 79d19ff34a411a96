//! The handshakes: dialling a candidate (QUIC, hole-punch probes meanwhile, Noise XX, the
//! hello with its topic tag, and for `Connect` settling the session) and answering incoming
//! connections the same way from the other side; each failure gets its typed cause.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pluresdb_sync_core::TopicHash;
use tokio::sync::Semaphore;

use super::Node;
use super::book::Outcome;
use super::topics::Found;
use crate::conn::code;
use crate::error::{Declined, DialError, HandshakeFailure};
use crate::noise::{self, Role};
use crate::quic;
use crate::socket::PROBE;
use crate::wire::{self, HELLO_LEN, Purpose, TAG_LEN};

/// How long a dial to an address not verified before waits for the QUIC handshake (the
/// first answer); after that, the whole exchange still has the handshake timeout. A live
/// peer answers a QUIC Initial within one round trip: well under a second on loopback, a LAN
/// or the internet. With the 100 ms initial RTT estimate, quinn resends a lost Initial after
/// ~0.3 s and ~0.9 s, so a peer up to ~500 ms away answers in time even when two Initials are
/// lost. Dead DHT entries (most of what a stale or hostile DHT returns) thus free their dial
/// slot after this, not after the full handshake timeout. Addresses verified before keep the
/// full handshake timeout (a peer behind a NAT may answer only once it punches back).
pub(crate) const FIRST_ANSWER_TIMEOUT: Duration = Duration::from_millis(1500);

/// Interval between hole-punch probes to a peer while dialling it: often enough that the
/// remote's QUIC Initial finds the NAT mapping open, rare enough to be negligible traffic.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_millis(200);

impl Node {
    /// Dials `addr`, runs the handshake and (for `Connect`) settles the connection.
    pub(super) async fn dial(
        self: &Arc<Self>,
        addr: SocketAddr,
        topic: TopicHash,
        purpose: Purpose,
    ) -> Result<Outcome, DialError> {
        let psk = self
            .state()
            .topics
            .psk(&topic)
            .ok_or(DialError::declined(addr, Declined::TopicNotJoined))?;
        let fail = |cause| DialError::handshake(addr, cause);
        // Most unverified DHT entries are dead: do not let them hold a dial slot for long.
        let known = self.state().book.is_verified(addr);
        let first_answer = if known {
            self.settings.handshake_timeout
        } else {
            FIRST_ANSWER_TIMEOUT.min(self.settings.handshake_timeout)
        };
        let answered = AtomicBool::new(false);
        let work = async {
            let connecting = self
                .endpoint
                .connect(addr, quic::SERVER_NAME)
                .map_err(|e| {
                    fail(HandshakeFailure::Quic {
                        reason: e.to_string(),
                    })
                })?;
            let conn = tokio::time::timeout(first_answer, connecting)
                .await
                .map_err(|_| {
                    fail(HandshakeFailure::NoAnswer {
                        after: first_answer,
                    })
                })?
                .map_err(|e| fail(quic_cause(&e)))?;
            answered.store(true, Ordering::Relaxed);
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| fail(quic_cause(&e)))?;
            let prologue = noise::prologue(&conn).map_err(|e| {
                fail(HandshakeFailure::Noise {
                    reason: e.to_string(),
                })
            })?;
            let hs = noise::initiate(&mut send, &mut recv, &self.settings.identity, &prologue)
                .await
                .map_err(|e| {
                    fail(closed_cause(&conn).unwrap_or(HandshakeFailure::Noise {
                        reason: e.to_string(),
                    }))
                })?;
            if hs.remote_static == self.public_key {
                conn.close(code::SELF, b"self");
                return Ok(Outcome::Myself);
            }
            let tag = noise::topic_tag(&psk, Role::Initiator, &hs.hash);
            send.write_all(&wire::encode_hello(purpose, &tag))
                .await
                .map_err(|e| fail(stream_cause(&conn, e)))?;
            let mut reply = [0u8; TAG_LEN];
            if let Err(e) = recv.read_exact(&mut reply).await {
                // A leader that already holds a connection with us closes this one as a
                // duplicate right after its tag, which the close may overtake: the peer (its
                // key proven by Noise) is there, just connected already.
                if closed_cause(&conn)
                    == Some(HandshakeFailure::Closed {
                        reason: code::describe(code::DUPLICATE),
                    })
                {
                    return Ok(Outcome::Known(hs.remote_static));
                }
                return Err(fail(stream_cause(&conn, e)));
            }
            if !noise::tags_equal(&reply, &noise::topic_tag(&psk, Role::Responder, &hs.hash)) {
                conn.close(code::PROTOCOL, b"bad topic tag");
                return Err(DialError::protocol(
                    addr,
                    "its topic tag is wrong (it does not know the topic)",
                ));
            }
            match purpose {
                Purpose::Identify => {
                    conn.close(code::DONE, b"");
                    Ok(Outcome::Known(hs.remote_static))
                }
                Purpose::Connect => {
                    self.settle(topic, hs.remote_static, conn, send, recv, addr)
                        .await
                }
            }
        };
        // Hole punching: while dialling, also send probes, so that our NAT maps and lets in
        // the remote's packets (it probes and dials us at the same time).
        let data = self.data.clone();
        let probing = async move {
            loop {
                data.send_raw(addr, PROBE);
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        };
        let work = async {
            tokio::select! {
                result = work => result,
                never = probing => never,
            }
        };
        let limit = self.settings.handshake_timeout;
        match tokio::time::timeout(limit, work).await {
            Ok(result) => result,
            Err(_) if answered.load(Ordering::Relaxed) => {
                Err(fail(HandshakeFailure::Timeout { after: limit }))
            }
            Err(_) => Err(fail(HandshakeFailure::NoAnswer { after: limit })),
        }
    }

    /// Answers incoming connections: each handshake runs in its own task, at most
    /// [`quic::MAX_INCOMING_HANDSHAKES`] at once (more are refused before any crypto), each
    /// under the handshake timeout.
    pub(super) async fn accept_loop(self: Arc<Self>) {
        let slots = Arc::new(Semaphore::new(quic::MAX_INCOMING_HANDSHAKES));
        while let Some(incoming) = self.endpoint.accept().await {
            // Bounded: beyond this many handshakes in progress, new ones are refused.
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::debug!(addr = %incoming.remote_address(), "too many handshakes; refused");
                incoming.refuse();
                continue;
            };
            let node = self.clone();
            self.spawn(async move {
                let _permit = permit;
                let addr = incoming.remote_address();
                let limit = node.settings.handshake_timeout;
                match tokio::time::timeout(limit, node.respond(incoming)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%addr, error = %e, "incoming connection failed"),
                    Err(_) => tracing::debug!(%addr, "incoming handshake timed out"),
                }
            });
        }
    }

    /// The responder's side: QUIC, Noise XX, the initiator's hello and topic tag, our tag,
    /// then (for `Connect`) settling the session.
    async fn respond(self: &Arc<Self>, incoming: quinn::Incoming) -> Result<(), DialError> {
        let addr = incoming.remote_address();
        let fail = |cause| DialError::handshake(addr, cause);
        let quic = |e: quinn::ConnectionError| fail(quic_cause(&e));
        let conn = incoming.accept().map_err(quic)?.await.map_err(quic)?;
        let (mut send, mut recv) = conn.accept_bi().await.map_err(quic)?;
        let noise_failed = |e: anyhow::Error| {
            fail(HandshakeFailure::Noise {
                reason: e.to_string(),
            })
        };
        let prologue = noise::prologue(&conn).map_err(noise_failed)?;
        let hs =
            match noise::respond(&mut send, &mut recv, &self.settings.identity, &prologue).await {
                Ok(hs) => hs,
                Err(e) => {
                    conn.close(code::PROTOCOL, b"handshake failed");
                    return Err(noise_failed(e));
                }
            };
        if hs.remote_static == self.public_key {
            conn.close(code::SELF, b"self");
            return Ok(());
        }
        let mut hello = [0u8; HELLO_LEN];
        recv.read_exact(&mut hello)
            .await
            .map_err(|e| fail(stream_cause(&conn, e)))?;
        let (purpose, tag) = match wire::decode_hello(&hello) {
            Ok(h) => h,
            Err(e) => {
                conn.close(code::PROTOCOL, b"bad hello");
                return Err(DialError::protocol(addr, e.to_string()));
            }
        };
        let found = self.state().topics.find_by_tag(&tag, &hs.hash);
        let Some(Found {
            topic,
            psk,
            accepting,
        }) = found
        else {
            conn.close(code::UNKNOWN_TOPIC, b"unknown topic");
            return Ok(());
        };
        if purpose == Purpose::Connect && !accepting {
            conn.close(
                code::UNKNOWN_TOPIC,
                b"not accepting connections on this topic",
            );
            return Ok(());
        }
        send.write_all(&noise::topic_tag(&psk, Role::Responder, &hs.hash))
            .await
            .map_err(|e| fail(stream_cause(&conn, e)))?;
        match purpose {
            Purpose::Identify => {
                // The initiator closes; do not hold the connection longer than that.
                let _ = tokio::time::timeout(self.settings.handshake_timeout, conn.closed()).await;
                Ok(())
            }
            Purpose::Connect => self
                .settle(topic, hs.remote_static, conn, send, recv, addr)
                .await
                .map(|_| ()),
        }
    }
}

/// The cause of a failed QUIC connection: the remote's close code if it closed it.
fn quic_cause(e: &quinn::ConnectionError) -> HandshakeFailure {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => closed_by_remote(c.error_code),
        other => HandshakeFailure::Quic {
            reason: other.to_string(),
        },
    }
}

/// What the remote's close code says about why a handshake failed.
fn closed_by_remote(code: quinn::VarInt) -> HandshakeFailure {
    match code {
        code::BUSY => HandshakeFailure::Busy,
        code::UNKNOWN_TOPIC => HandshakeFailure::TopicUnknown,
        other => HandshakeFailure::Closed {
            reason: code::describe(other),
        },
    }
}

/// Why the connection closed, if the remote closed it with a reason.
fn closed_cause(conn: &quinn::Connection) -> Option<HandshakeFailure> {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => Some(closed_by_remote(c.error_code)),
        _ => None,
    }
}

/// The cause of a failed read or write on the handshake's stream: the remote's close reason
/// when it closed the connection, else the stream error.
pub(super) fn stream_cause(
    conn: &quinn::Connection,
    e: impl std::fmt::Display,
) -> HandshakeFailure {
    closed_cause(conn).unwrap_or_else(|| HandshakeFailure::Stream {
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;

    async fn node(handshake_timeout: Duration) -> Arc<Node> {
        let t = crate::HyperswarmTransport::builder()
            .bootstrap(Vec::<String>::new())
            .bind_addr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .handshake_timeout(handshake_timeout)
            .build()
            .unwrap();
        Node::start(t.settings.clone()).await.unwrap()
    }

    #[test]
    fn close_codes_name_the_cause() {
        assert_eq!(closed_by_remote(code::BUSY), HandshakeFailure::Busy);
        assert_eq!(
            closed_by_remote(code::UNKNOWN_TOPIC),
            HandshakeFailure::TopicUnknown
        );
        assert_eq!(
            closed_by_remote(code::REPLACED),
            HandshakeFailure::Closed {
                reason: "replaced by a newer connection"
            }
        );
    }

    /// Real dials on loopback (no DHT): each way a handshake ends has its typed result.
    #[tokio::test]
    async fn dials_end_with_typed_causes() {
        let a = node(Duration::from_secs(5)).await;
        let b = node(Duration::from_secs(5)).await;
        let (to_b, topic) = (b.local_addr(), [3u8; 32]);
        // Our own refusal: the topic is not joined here.
        let err = a.dial(to_b, topic, Purpose::Identify).await.unwrap_err();
        assert_eq!(
            err,
            DialError::declined(to_b, Declined::TopicNotJoined),
            "{err}"
        );
        assert!(err.is_local());
        // The remote does not know the topic.
        a.register_topic(topic);
        let err = a.dial(to_b, topic, Purpose::Identify).await.unwrap_err();
        assert_eq!(
            err,
            DialError::handshake(to_b, HandshakeFailure::TopicUnknown),
            "{err}"
        );
        // It knows it (lookup only): identified, but it takes no connections on it.
        b.register_topic(topic);
        let known = a.dial(to_b, topic, Purpose::Identify).await;
        assert_eq!(known, Ok(Outcome::Known(b.public_key)));
        let err = a.dial(to_b, topic, Purpose::Connect).await.unwrap_err();
        assert_eq!(
            err,
            DialError::handshake(to_b, HandshakeFailure::TopicUnknown),
            "{err}"
        );
        // Ourselves.
        let own = a.local_addr();
        assert_eq!(
            a.dial(own, topic, Purpose::Identify).await,
            Ok(Outcome::Myself)
        );
        // Nobody answers: no answer within the first-answer timeout (capped by the
        // handshake timeout).
        let quick = node(Duration::from_millis(300)).await;
        quick.register_topic(topic);
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to_silent = silent.local_addr().unwrap();
        let err = quick
            .dial(to_silent, topic, Purpose::Identify)
            .await
            .unwrap_err();
        let after = Duration::from_millis(300);
        assert_eq!(
            err,
            DialError::handshake(to_silent, HandshakeFailure::NoAnswer { after }),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!("handshake with {to_silent} failed: no answer within 300 ms")
        );
        for n in [a, b, quick] {
            n.shutdown();
        }
    }
}
