//! The handshake patterns that open a session, as pure steps: Noise `XXpsk0` (encryption on)
//! and HELLO (encryption off). Each message in gives the reply and, once done, the peer's
//! static key, the window it grants and the transport cipher; a peer of session version 1
//! or 2 (`XXpsk3`, see [`legacy`](super::legacy)) is named as such. A new pattern (with a
//! [`SESSION_VERSION`](super::wire::SESSION_VERSION) bump) is an edit of this file.

use std::sync::Arc;

use pluresdb_sync_core::Identity;
use pluresdb_sync_core::topic::{Domain, TopicHash, derive_from_topic};

use super::flow::FLOW_MIN_WINDOW_BYTES;
use super::legacy::{self, LEGACY_VERSION, Opening};
use super::noise_crypto::{Resolver, ScalarMults};
use super::wire::{
    SESSION_PARAMS_LEN, SESSION_VERSION, kind, parse_session_params, session_params,
};
use crate::error::SessionError;
use crate::protocol::{RoomId, SUBPROTOCOL};

/// The Noise pattern: XX (both static keys sent encrypted) with the PSK from the topic mixed
/// in first, so that only a peer that knows the topic can make the responder answer (and
/// reveal its static key), and a message 1 without it fails at its tag, before any
/// Diffie-Hellman.
pub(crate) const NOISE_PARAMS: &str = "Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s";
/// Where the PSK goes in the pattern (`psk0`: before the first message's tokens).
const PSK_POSITION: u8 = 0;
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
    /// Where this side's scalar multiplications are counted.
    pub(crate) mults: &'a ScalarMults,
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

pub(super) fn noise_error(message: u8) -> impl Fn(snow::Error) -> SessionError {
    move |e| SessionError::Noise {
        message,
        reason: e.to_string(),
    }
}

impl Handshake {
    /// Whether a peer frame of `kind` opens an attempt (HS1, an `XXpsk3` HS1 or version
    /// probe, or HELLO).
    pub(crate) fn opens(kind: u8) -> bool {
        matches!(kind, kind::HS1 | kind::LEGACY_HS1 | kind::HELLO)
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

    /// Whether `k` answers this attempt's version probe as a session version 1 or 2
    /// responder does (`XXpsk3`'s HS2): the peer is too old to talk to.
    pub(crate) fn expects_legacy(&self, k: u8) -> bool {
        matches!(self, Handshake::Noise { next: 2, .. }) && k == kind::LEGACY_HS2
    }

    /// Whether this side started the attempt and waits for the first answer (the state in
    /// which a simultaneous open is met).
    pub(crate) fn is_opening(&self) -> bool {
        matches!(self, Handshake::Noise { next: 2, .. } | Handshake::Hello)
    }

    /// Starts as the initiator: the state and the opening peer frames, in order (HS1 and the
    /// version probe, or HELLO).
    pub(crate) fn initiate(local: Local<'_>) -> Result<(Self, Vec<Vec<u8>>), SessionError> {
        if !local.encryption {
            return Ok((Handshake::Hello, vec![hello(local)]));
        }
        let mut hs = noise(local, NOISE_PARAMS, PSK_POSITION, true).map_err(noise_error(1))?;
        let m = write(&mut hs, kind::HS1, &[]).map_err(noise_error(1))?;
        let probe = legacy::probe(local)?;
        Ok((
            Handshake::Noise {
                hs: Box::new(hs),
                next: 2,
            },
            vec![m, probe],
        ))
    }

    /// Answers an opening frame (see [`Handshake::opens`]) from a peer this side has no
    /// attempt with. `Ok(None)`: nothing to do (the version probe of a peer of this version,
    /// whose HS1 or HELLO is what counts).
    pub(crate) fn respond(
        local: Local<'_>,
        k: u8,
        body: &[u8],
    ) -> Result<Option<Step>, SessionError> {
        let mismatch = |remote| SessionError::VersionMismatch {
            local: SESSION_VERSION,
            remote,
        };
        match (k, local.encryption) {
            (kind::LEGACY_HS1, _) => match legacy::read_opening(local, body)? {
                Opening::Probe(SESSION_VERSION) => Ok(None),
                Opening::Probe(v) => Err(mismatch(v)),
                Opening::Old => Err(mismatch(LEGACY_VERSION)),
            },
            (kind::HS1, true) => {
                let err = noise_error(1);
                let mut hs = noise(local, NOISE_PARAMS, PSK_POSITION, false).map_err(&err)?;
                read(&mut hs, body).map_err(&err)?;
                let reply = write(&mut hs, kind::HS2, &session_params(local.window))
                    .map_err(noise_error(2))?;
                Ok(Some(Step::Continue {
                    hs: Handshake::Noise {
                        hs: Box::new(hs),
                        next: 3,
                    },
                    reply,
                }))
            }
            (kind::HELLO, false) => Ok(Some(Step::Done {
                reply: Some(hello(local)),
                done: read_hello(body)?,
            })),
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
pub(super) fn prologue(room: &RoomId) -> Vec<u8> {
    let mut p = SUBPROTOCOL.as_bytes().to_vec();
    p.extend_from_slice(room);
    p
}

/// A Noise handshake state of `pattern` for `local`'s topic and room, with the topic's PSK at
/// `psk_position`.
pub(super) fn noise(
    local: Local<'_>,
    pattern: &str,
    psk_position: u8,
    initiator: bool,
) -> Result<snow::HandshakeState, snow::Error> {
    let params: snow::params::NoiseParams = pattern.parse()?;
    let secret = local.identity.secret_bytes();
    let psk = derive_from_topic(local.topic, Domain::NoisePsk);
    let prologue = prologue(local.room);
    let resolver = Box::new(Resolver::new(local.mults.clone()));
    let builder = snow::Builder::with_resolver(params, resolver)
        .local_private_key(&secret)?
        .psk(psk_position, &psk)?
        .prologue(&prologue)?;
    if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    }
}

/// Writes the next handshake message, with `payload`, as a peer frame of `k`.
pub(super) fn write(
    hs: &mut snow::HandshakeState,
    k: u8,
    payload: &[u8],
) -> Result<Vec<u8>, snow::Error> {
    let mut buf = vec![0u8; 1 + MAX_HANDSHAKE_MESSAGE];
    buf[0] = k;
    let n = hs.write_message(payload, &mut buf[1..])?;
    buf.truncate(1 + n);
    Ok(buf)
}

/// Reads a handshake message (the body of a peer frame); returns its payload.
pub(super) fn read(hs: &mut snow::HandshakeState, body: &[u8]) -> Result<Vec<u8>, snow::Error> {
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

    struct Side {
        id: Identity,
        topic: TopicHash,
        room: RoomId,
        encryption: bool,
        mults: ScalarMults,
    }

    impl Side {
        fn new(topic: &str) -> Self {
            Self {
                id: Identity::generate().unwrap(),
                topic: pluresdb_sync_core::derive_topic(topic),
                room: [1u8; 32],
                encryption: true,
                mults: ScalarMults::default(),
            }
        }

        fn plain(topic: &str) -> Self {
            Self {
                encryption: false,
                ..Self::new(topic)
            }
        }

        fn local(&self) -> Local<'_> {
            Local {
                identity: &self.id,
                topic: &self.topic,
                room: &self.room,
                encryption: self.encryption,
                window: FLOW_WINDOW_BYTES,
                mults: &self.mults,
            }
        }
    }

    /// The responder's answer to an opening frame that starts something.
    fn respond(b: &Side, m: &[u8]) -> Result<Step, SessionError> {
        Ok(Handshake::respond(b.local(), m[0], &m[1..])?.expect("a step"))
    }

    /// Runs the three Noise messages; the responder's view of the initiator's key.
    fn run(a: &Side, b: &Side) -> Result<[u8; 32], SessionError> {
        let (hs, opening) = Handshake::initiate(a.local())?;
        let [m1, probe] = &opening[..] else {
            panic!("HS1 and the version probe: {opening:?}")
        };
        assert_eq!(
            (m1[0], m1.len()),
            (kind::HS1, 1 + 48),
            "psk0: the key and a tag"
        );
        assert_eq!(probe[0], kind::LEGACY_HS1);
        let Step::Continue { hs: r, reply: m2 } = respond(b, m1)? else {
            panic!("the responder finished after message 1")
        };
        // The probe of a peer of this version changes nothing.
        assert!(Handshake::respond(b.local(), probe[0], &probe[1..])?.is_none());
        assert!(hs.expects(m2[0]) && !hs.expects(kind::HS3) && m2[0] == kind::HS2);
        let Step::Done {
            reply: Some(m3),
            done,
        } = hs.read(a.local(), m2[0], &m2[1..])?
        else {
            panic!("the initiator did not finish with message 3")
        };
        assert_eq!(done.window, FLOW_WINDOW_BYTES);
        assert_eq!(done.remote_key, b.id.public_bytes());
        assert_eq!(m3[0], kind::HS3);
        let Step::Done { reply: None, done } = r.read(b.local(), m3[0], &m3[1..])? else {
            panic!("the responder did not finish on message 3")
        };
        Ok(done.remote_key)
    }

    #[test]
    fn noise_needs_the_same_topic_from_the_first_message() {
        let (a, b) = (Side::new("x"), Side::new("x"));
        assert_eq!(run(&a, &b).unwrap(), a.id.public_bytes());
        // Each side: its ephemeral and static public keys, and three DHs; the initiator also
        // the probe's ephemeral key.
        assert_eq!((a.mults.get(), b.mults.get()), (6, 5));
        // Another topic: the responder refuses message 1 at its tag, before any curve
        // arithmetic, and never answers (so it reveals nothing, its static key least).
        let (a, other) = (Side::new("x"), Side::new("y"));
        assert!(matches!(
            run(&a, &other),
            Err(SessionError::Noise { message: 1, .. })
        ));
        assert_eq!(
            other.mults.get(),
            0,
            "a bogus HS1 costs no scalar multiplication"
        );
        let (_, opening) = Handshake::initiate(a.local()).unwrap();
        let mut flipped = opening[0].clone();
        flipped[5] ^= 1;
        let fresh = Side::new("x");
        assert!(respond(&fresh, &flipped).is_err());
        assert_eq!(fresh.mults.get(), 0);
    }

    #[test]
    fn an_xxpsk3_peer_is_a_version_mismatch_in_both_roles() {
        let (old, new) = (Side::new("x"), Side::new("x"));
        // Its HS1: XXpsk3 message 1 with an empty payload.
        let mut hs = noise(
            old.local(),
            "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s",
            3,
            true,
        )
        .unwrap();
        let m1 = write(&mut hs, kind::LEGACY_HS1, &[]).unwrap();
        let mismatch = |remote| SessionError::VersionMismatch {
            local: SESSION_VERSION,
            remote,
        };
        assert_eq!(respond(&new, &m1).err(), Some(mismatch(LEGACY_VERSION)));
        // A probe from a later version is named with that version.
        let m = write(
            &mut noise(
                old.local(),
                "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s",
                3,
                true,
            )
            .unwrap(),
            kind::LEGACY_HS1,
            &[9, 0, 0, 0, 0],
        )
        .unwrap();
        assert_eq!(respond(&new, &m).err(), Some(mismatch(9)));
        assert_eq!(
            new.mults.get(),
            0,
            "reading message 1 needs no curve arithmetic"
        );
        // Garbage under the old kind is a Noise error, answered with nothing.
        assert!(matches!(
            respond(&new, &[kind::LEGACY_HS1, 1, 2, 3]),
            Err(SessionError::Noise { message: 1, .. })
        ));
        // An old responder answers the probe (not the HS1) with its HS2: the initiator sees
        // the old kind while it waits.
        let (hs, opening) = Handshake::initiate(new.local()).unwrap();
        let mut r = noise(
            old.local(),
            "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s",
            3,
            false,
        )
        .unwrap();
        assert!(
            read(&mut r, &opening[0][1..]).is_err(),
            "XXpsk0's HS1 means nothing to it"
        );
        let mut r = noise(
            old.local(),
            "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s",
            3,
            false,
        )
        .unwrap();
        read(&mut r, &opening[1][1..]).unwrap();
        let hs2 = write(&mut r, kind::LEGACY_HS2, &[2, 0, 0, 0, 0]).unwrap();
        assert!(hs.expects_legacy(hs2[0]) && !hs.expects(hs2[0]));
        assert!(!hs.expects_legacy(kind::HS2));
    }

    #[test]
    fn hello_is_answered_with_hello_and_the_mismatch_is_named() {
        let (a, b) = (Side::plain("x"), Side::plain("x"));
        let (hs, opening) = Handshake::initiate(a.local()).unwrap();
        let [m] = &opening[..] else {
            panic!("HELLO alone: {opening:?}")
        };
        assert!(hs.expects(kind::HELLO) && hs.is_opening());
        let Step::Done {
            reply: Some(answer),
            done,
        } = respond(&b, m).unwrap()
        else {
            panic!("HELLO is answered at once")
        };
        assert_eq!(done.remote_key, a.id.public_bytes());
        let Step::Done { done, .. } = hs.read(a.local(), answer[0], &answer[1..]).unwrap() else {
            panic!("the answer completes it")
        };
        assert_eq!(done.remote_key, b.id.public_bytes());
        assert!(matches!(
            respond(&Side::new("x"), m),
            Err(SessionError::EncryptionMismatch {
                local: true,
                remote: false
            })
        ));
        assert!(matches!(
            respond(&b, &m[..33]),
            Err(SessionError::VersionMismatch { remote: 1, .. })
        ));
        assert!(matches!(
            respond(&b, &m[..10]),
            Err(SessionError::Malformed { .. })
        ));
        // An encrypted peer's probe is nothing to a plain side (its HS1 is the mismatch).
        let (_, opening) = Handshake::initiate(Side::new("x").local()).unwrap();
        assert!(
            Handshake::respond(b.local(), opening[1][0], &opening[1][1..])
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            respond(&b, &opening[0]),
            Err(SessionError::EncryptionMismatch { local: false, .. })
        ));
    }
}
