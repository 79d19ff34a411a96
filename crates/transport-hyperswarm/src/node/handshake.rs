//! Dialling a candidate: QUIC (hole-punch probes meanwhile), the info-hash and Noise XXpsk0
//! keyed with the topic, and for `Connect` settling the session; each failure gets its typed
//! cause (shared with the responder's side, `respond.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pluresdb_sync_core::TopicHash;

use super::Node;
use super::book::Outcome;
use super::topics;
use crate::conn::code;
use crate::error::{Declined, DialError, HandshakeFailure};
use crate::noise;
use crate::quic;
use crate::socket::PROBE;
use crate::wire::{self, Purpose};

/// The TLS alert `no_application_protocol` (RFC 8446), as a QUIC crypto error: the ALPNs of
/// the two sides (their protocol versions) differ.
const NO_APPLICATION_PROTOCOL: u8 = 120;

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
            let info_hash = topics::info_hash(&topic);
            let hs = noise::initiate(
                &mut send,
                &mut recv,
                &self.settings.identity,
                &prologue,
                &psk,
                &info_hash,
                purpose,
            )
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
}

/// The cause of a failed QUIC connection: the remote's close code if it closed it, a
/// version mismatch if either side's TLS refused the other's ALPN.
pub(super) fn quic_cause(e: &quinn::ConnectionError) -> HandshakeFailure {
    let no_alpn = quinn::TransportErrorCode::crypto(NO_APPLICATION_PROTOCOL);
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => closed_by_remote(c.error_code),
        quinn::ConnectionError::ConnectionClosed(c) if c.error_code == no_alpn => version(),
        quinn::ConnectionError::TransportError(t) if t.code == no_alpn => version(),
        other => HandshakeFailure::Quic {
            reason: other.to_string(),
        },
    }
}

fn version() -> HandshakeFailure {
    HandshakeFailure::Version {
        ours: std::str::from_utf8(wire::ALPN).unwrap_or("?"),
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
pub(super) fn closed_cause(conn: &quinn::Connection) -> Option<HandshakeFailure> {
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

    /// A peer of the previous protocol version: a typed `Version` failure on our side whether
    /// we dial it or it dials us, and it is refused at once (no hang).
    #[tokio::test]
    async fn an_old_peer_gets_a_version_error_both_ways() {
        let a = node(Duration::from_secs(5)).await;
        let topic = [4u8; 32];
        a.register_topic(topic);
        let socket = quic::bind_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap();
        let (old, _data, _diverted) =
            quic::endpoint_for(&a.settings, socket, wire::ALPN_V1).unwrap();
        let old_addr = old.local_addr().unwrap();
        let answering = old.clone();
        let server = tokio::spawn(async move {
            let incoming = answering.accept().await.unwrap();
            match incoming.accept() {
                Ok(connecting) => connecting.await.map(|_| ()),
                Err(e) => Err(e),
            }
        });
        let started = std::time::Instant::now();
        let err = a.dial(old_addr, topic, Purpose::Connect).await.unwrap_err();
        let ours = "pluresdb-sync/hyperswarm/2";
        assert_eq!(
            err,
            DialError::handshake(old_addr, HandshakeFailure::Version { ours }),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "handshake with {old_addr} failed: the peer speaks another protocol version \
                 (this node speaks {ours})"
            )
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "refused at once"
        );
        // The old side's QUIC handshake failed too.
        assert!(server.await.unwrap().is_err());
        // The old peer dials us: refused in the TLS handshake, recorded as a version mismatch.
        let err = old
            .connect(a.local_addr(), quic::SERVER_NAME)
            .unwrap()
            .await
            .unwrap_err();
        assert_eq!(quic_cause(&err), HandshakeFailure::Version { ours });
        tokio::time::timeout(Duration::from_secs(5), async {
            while a.incoming_stats().version == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the refusal was not recorded as a version mismatch");
        assert_eq!(a.incoming_stats().message2_sent, 0);
        a.shutdown();
    }
}
