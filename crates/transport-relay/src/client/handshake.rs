//! The handshake patterns that open a session, as pure steps: Noise `XXpsk3` (encryption on)
//! and HELLO (encryption off). Each message in gives the reply and, once done, the peer's
//! static key, the window it grants and the transport cipher. A new pattern (say `XXpsk0`,
//! with a [`SESSION_VERSION`](super::wire::SESSION_VERSION) bump) is an edit of this file.

use std::sync::Arc;

use pluresdb_sync_core::Identity;
use pluresdb_sync_core::topic::{Domain, TopicHash, derive_from_topic};

use super::flow::FLOW_MIN_WINDOW_BYTES;
use super::wire::{SESSION_PARAMS_LEN, kind, parse_session_params, session_params};
use crate::error::SessionError;
use crate::protocol::{RoomId, SUBPROTOCOL};

/// The Noise pattern: XX (both static keys sent encrypted), PSK from the topic mixed in last.
pub(crate) const NOISE_PARAMS: &str = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s";
/// Where the PSK goes in the pattern (`psk3`: after the third message's tokens).
const PSK_POSITION: u8 = 3;
/// A handshake message here is at most 96 bytes of keys and tags plus the session
/// parameters; anything longer is not ours.
const MAX_HANDSHAKE_MESSAGE: usize = 256;

/// What this side brings to a handshake.
#[derive(Clone, Copy)]
pub(crate) struct Local<'a> {
    pub(crate) identity: &'a Identity,
    pub(crate) topic: &'a TopicHash,
    pub(crate) room: &'a RoomId,
    pub(crate) encryption: bool,
    /// The window this side grants the peer.
    pub(crate) window: u32,
}

/// An attempt under way: what this side waits for.
pub(crate) enum Handshake {
    /// Noise, waiting for message `next` (2 as the initiator, 3 as the responder).
    Noise {
        hs: Box<snow::HandshakeState>,
        next: u8,
    },
    /// Encryption off: our HELLO is sent, the peer's is awaited.
    Hello,
}

/// A completed handshake.
pub(crate) struct Done {
    /// The static key the peer proved (or, encryption off, claimed).
    pub(crate) remote_key: [u8; 32],
    /// The window the peer grants this side.
    pub(crate) window: u32,
    /// The transport cipher (encryption on).
    pub(crate) cipher: Option<Arc<snow::StatelessTransportState>>,
}

/// What a handshake message leads to.
pub(crate) enum Step {
    /// Send `reply` and wait for the next message in `hs`.
    Continue { hs: Handshake, reply: Vec<u8> },
    /// Established; send `reply` first when there is one.
    Done { reply: Option<Vec<u8>>, done: Done },
}

fn noise_error(message: u8) -> impl Fn(snow::Error) -> SessionError {
    move |e| SessionError::Noise {
        message,
        reason: e.to_string(),
    }
}

impl Handshake {
    /// Whether a peer frame of `kind` opens an attempt (HS1 or HELLO).
    pub(crate) fn opens(kind: u8) -> bool {
        matches!(kind, kind::HS1 | kind::HELLO)
    }

    /// Whether a frame of `kind` is the next message of this attempt.
    pub(crate) fn expects(&self, k: u8) -> bool {
        match self {
            Handshake::Noise { next: 2, .. } => k == kind::HS2,
            Handshake::Noise { next: 3, .. } => k == kind::HS3,
            Handshake::Noise { .. } => false,
            Handshake::Hello => k == kind::HELLO,
        }
    }

    /// Whether this side started the attempt and waits for the first answer (the state in
    /// which a simultaneous open is met).
    pub(crate) fn is_opening(&self) -> bool {
        matches!(self, Handshake::Noise { next: 2, .. } | Handshake::Hello)
    }

    /// Starts as the initiator: the state and the opening peer frame.
    pub(crate) fn initiate(local: Local<'_>) -> Result<(Self, Vec<u8>), SessionError> {
        if !local.encryption {
            return Ok((Handshake::Hello, hello(local)));
        }
        let mut hs = noise(local, true).map_err(noise_error(1))?;
        let m = write(&mut hs, kind::HS1, &[]).map_err(noise_error(1))?;
        Ok((
            Handshake::Noise {
                hs: Box::new(hs),
                next: 2,
            },
            m,
        ))
    }

    /// Answers an opening frame (HS1 or HELLO, see [`Handshake::opens`]) from a peer this
    /// side has no attempt with.
    pub(crate) fn respond(local: Local<'_>, k: u8, body: &[u8]) -> Result<Step, SessionError> {
        match (k, local.encryption) {
            (kind::HS1, true) => {
                let err = noise_error(1);
                let mut hs = noise(local, false).map_err(&err)?;
                read(&mut hs, body).map_err(&err)?;
                let reply = write(&mut hs, kind::HS2, &session_params(local.window))
                    .map_err(noise_error(2))?;
                Ok(Step::Continue {
                    hs: Handshake::Noise {
                        hs: Box::new(hs),
                        next: 3,
                    },
                    reply,
                })
            }
            (kind::HELLO, false) => Ok(Step::Done {
                reply: Some(hello(local)),
                done: read_hello(body)?,
            }),
            (kind::HS1 | kind::HELLO, on) => Err(SessionError::EncryptionMismatch {
                local: on,
                remote: !on,
            }),
            (other, _) => Err(SessionError::Malformed {
                what: format!("peer frame {other:#04x} does not open a session"),
            }),
        }
    }

    /// Reads the next message of this attempt (one it [`expects`](Handshake::expects)).
    pub(crate) fn read(self, local: Local<'_>, k: u8, body: &[u8]) -> Result<Step, SessionError> {
        match self {
            Handshake::Noise { mut hs, next: 2 } if k == kind::HS2 => {
                let params = read(&mut hs, body).map_err(noise_error(2))?;
                let window = parse_session_params(&params, FLOW_MIN_WINDOW_BYTES)?;
                let reply = write(&mut hs, kind::HS3, &session_params(local.window))
                    .map_err(noise_error(3))?;
                Ok(Step::Done {
                    reply: Some(reply),
                    done: finish(*hs, window)?,
                })
            }
            Handshake::Noise { mut hs, next: 3 } if k == kind::HS3 => {
                let params = read(&mut hs, body).map_err(noise_error(3))?;
                let window = parse_session_params(&params, FLOW_MIN_WINDOW_BYTES)?;
                Ok(Step::Done {
                    reply: None,
                    done: finish(*hs, window)?,
                })
            }
            Handshake::Hello if k == kind::HELLO => Ok(Step::Done {
                reply: None,
                done: read_hello(body)?,
            }),
            _ => Err(SessionError::Malformed {
                what: format!("unexpected handshake frame {k:#04x}"),
            }),
        }
    }
}

/// The prologue binds a handshake to the protocol version and the room.
fn prologue(room: &RoomId) -> Vec<u8> {
    let mut p = SUBPROTOCOL.as_bytes().to_vec();
    p.extend_from_slice(room);
    p
}

/// A Noise handshake state for `local`'s topic and room.
fn noise(local: Local<'_>, initiator: bool) -> Result<snow::HandshakeState, snow::Error> {
    let params: snow::params::NoiseParams = NOISE_PARAMS.parse()?;
    let secret = local.identity.secret_bytes();
    let psk = derive_from_topic(local.topic, Domain::NoisePsk);
    let prologue = prologue(local.room);
    let builder = snow::Builder::new(params)
        .local_private_key(&secret)?
        .psk(PSK_POSITION, &psk)?
        .prologue(&prologue)?;
    if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    }
}

/// Writes the next handshake message, with `payload`, as a peer frame of `k`.
fn write(hs: &mut snow::HandshakeState, k: u8, payload: &[u8]) -> Result<Vec<u8>, snow::Error> {
    let mut buf = vec![0u8; 1 + MAX_HANDSHAKE_MESSAGE];
    buf[0] = k;
    let n = hs.write_message(payload, &mut buf[1..])?;
    buf.truncate(1 + n);
    Ok(buf)
}

/// Reads a handshake message (the body of a peer frame); returns its payload.
fn read(hs: &mut snow::HandshakeState, body: &[u8]) -> Result<Vec<u8>, snow::Error> {
    let mut scratch = [0u8; MAX_HANDSHAKE_MESSAGE];
    let n = hs.read_message(body, &mut scratch)?;
    Ok(scratch[..n].to_vec())
}

/// The established Noise session: the key the peer proved and the transport cipher.
fn finish(hs: snow::HandshakeState, window: u32) -> Result<Done, SessionError> {
    let remote_key = hs
        .get_remote_static()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or_else(|| SessionError::Malformed {
            what: "no remote static key after the handshake".into(),
        })?;
    let cipher = hs.into_stateless_transport_mode().map_err(noise_error(3))?;
    Ok(Done {
        remote_key,
        window,
        cipher: Some(Arc::new(cipher)),
    })
}

/// This side's HELLO: kind, static key, session parameters.
fn hello(local: Local<'_>) -> Vec<u8> {
    let mut m = vec![kind::HELLO];
    m.extend_from_slice(&local.identity.public_bytes());
    m.extend_from_slice(&session_params(local.window));
    m
}

/// A peer's HELLO body: its key and the window it grants (32 bytes alone: version 1).
fn read_hello(body: &[u8]) -> Result<Done, SessionError> {
    let Some((key, params)) = body.split_first_chunk::<32>() else {
        return Err(SessionError::Malformed {
            what: format!(
                "HELLO of {} bytes, expected {}",
                body.len(),
                32 + SESSION_PARAMS_LEN
            ),
        });
    };
    Ok(Done {
        remote_key: *key,
        window: parse_session_params(params, FLOW_MIN_WINDOW_BYTES)?,
        cipher: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::flow::FLOW_WINDOW_BYTES;

    fn local<'a>(id: &'a Identity, topic: &'a TopicHash, room: &'a RoomId) -> Local<'a> {
        Local {
            identity: id,
            topic,
            room,
            encryption: true,
            window: FLOW_WINDOW_BYTES,
        }
    }

    /// Runs the three Noise messages; the responder's view of the initiator's key.
    fn run(a: Local<'_>, b: Local<'_>) -> Result<[u8; 32], SessionError> {
        let (hs, m1) = Handshake::initiate(a)?;
        let Step::Continue { hs: r, reply: m2 } = Handshake::respond(b, m1[0], &m1[1..])? else {
            panic!("the responder finished after message 1")
        };
        assert!(hs.expects(m2[0]) && !hs.expects(kind::HS3));
        let Step::Done {
            reply: Some(m3),
            done,
        } = hs.read(a, m2[0], &m2[1..])?
        else {
            panic!("the initiator did not finish with message 3")
        };
        assert_eq!(done.window, FLOW_WINDOW_BYTES);
        let Step::Done { reply: None, done } = r.read(b, m3[0], &m3[1..])? else {
            panic!("the responder did not finish on message 3")
        };
        Ok(done.remote_key)
    }

    #[test]
    fn noise_needs_the_same_topic() {
        let room = [1u8; 32];
        let (a, b) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let (x, y) = (
            pluresdb_sync_core::derive_topic("x"),
            pluresdb_sync_core::derive_topic("y"),
        );
        assert_eq!(
            run(local(&a, &x, &room), local(&b, &x, &room)).unwrap(),
            a.public_bytes()
        );
        assert!(matches!(
            run(local(&a, &x, &room), local(&b, &y, &room)),
            Err(SessionError::Noise { message: 3, .. })
        ));
    }

    #[test]
    fn hello_is_answered_with_hello_and_the_mismatch_is_named() {
        let room = [1u8; 32];
        let topic = pluresdb_sync_core::derive_topic("x");
        let (a, b) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let plain = |id| Local {
            encryption: false,
            ..local(id, &topic, &room)
        };
        let (hs, m) = Handshake::initiate(plain(&a)).unwrap();
        assert!(hs.expects(kind::HELLO) && hs.is_opening());
        let Step::Done {
            reply: Some(answer),
            done,
        } = Handshake::respond(plain(&b), m[0], &m[1..]).unwrap()
        else {
            panic!("HELLO is answered at once")
        };
        assert_eq!(done.remote_key, a.public_bytes());
        let Step::Done { done, .. } = hs.read(plain(&a), answer[0], &answer[1..]).unwrap() else {
            panic!("the answer completes it")
        };
        assert_eq!(done.remote_key, b.public_bytes());
        assert!(matches!(
            Handshake::respond(local(&b, &topic, &room), m[0], &m[1..]),
            Err(SessionError::EncryptionMismatch {
                local: true,
                remote: false
            })
        ));
        assert!(matches!(
            Handshake::respond(plain(&b), m[0], &m[1..33]),
            Err(SessionError::VersionMismatch { remote: 1, .. })
        ));
        assert!(matches!(
            Handshake::respond(plain(&b), m[0], &m[1..10]),
            Err(SessionError::Malformed { .. })
        ));
    }
}
