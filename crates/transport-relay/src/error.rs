//! The relay transport's own errors: what failed, typed so that callers can act on the cause.

/// An error specific to the relay transport or server.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// A configuration value is out of range.
    #[error("invalid relay setting {name} = {value}: {reason}")]
    InvalidSetting {
        /// The knob.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why it is invalid.
        reason: String,
    },
    /// No relay URL was given to the builder.
    #[error("no relay URL given (relay_url or relay_urls)")]
    NoRelayUrl,
    /// A setting shared by every transport is invalid (a relay URL, the timeout, the identity
    /// file): the core error says which.
    #[error(transparent)]
    Core(#[from] pluresdb_sync_core::Error),
    /// A relay frame is larger than allowed.
    #[error("relay frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Connecting to the relay failed.
    #[error("cannot connect to relay {url}: {reason}")]
    Connect {
        /// The relay URL (without credentials).
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The relay broke the protocol or closed the connection.
    #[error("relay {url}: {reason}")]
    Protocol {
        /// The relay URL.
        url: String,
        /// What happened.
        reason: String,
    },
    /// The relay refused a request (an ERROR frame).
    #[error("relay refused {about}: {message} (code {code})")]
    Refused {
        /// What was refused.
        about: &'static str,
        /// The relay's error code.
        code: u16,
        /// The relay's explanation.
        message: String,
    },
    /// An end-to-end session with a peer failed or could not start; `cause` says why.
    #[error("session with {} failed: {cause}", Who(*conn, peer_id.as_deref()))]
    Session {
        /// The remote's relay connection id.
        conn: u64,
        /// The remote's peer id, once its handshake proved it.
        peer_id: Option<String>,
        /// What failed.
        cause: SessionError,
    },
}

impl RelayError {
    /// The session failure `cause` with relay connection `conn` (peer not known yet).
    pub(crate) fn session(conn: u64, cause: SessionError) -> Self {
        RelayError::Session {
            conn,
            peer_id: None,
            cause,
        }
    }

    /// The session failure `cause` with peer `peer_id` on relay connection `conn`.
    pub(crate) fn peer_session(conn: u64, peer_id: &str, cause: SessionError) -> Self {
        RelayError::Session {
            conn,
            peer_id: Some(peer_id.to_owned()),
            cause,
        }
    }

    /// The cause, when this is a session failure.
    pub fn session_cause(&self) -> Option<&SessionError> {
        match self {
            RelayError::Session { cause, .. } => Some(cause),
            _ => None,
        }
    }
}

/// Names the remote of a session in messages.
struct Who<'a>(u64, Option<&'a str>);

impl std::fmt::Display for Who<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.1 {
            Some(peer) => write!(f, "peer {peer} on relay connection {}", self.0),
            None => write!(f, "relay connection {}", self.0),
        }
    }
}

fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

/// Why an end-to-end session with one peer failed or never started (inside
/// [`RelayError::Session`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The handshake did not complete within the transport's timeout.
    #[error("the handshake timed out after {ms} ms")]
    HandshakeTimeout {
        /// The limit, in milliseconds.
        ms: u64,
    },
    /// A Noise handshake message did not verify: usually the peer uses another topic (the
    /// pre-shared key) or a hostile relay altered it.
    #[error("noise handshake message {message} failed (is the topic the same?): {reason}")]
    Noise {
        /// Which message (1, 2 or 3; 0 when starting the handshake).
        message: u8,
        /// What snow reported.
        reason: String,
    },
    /// The two peers disagree about end-to-end encryption.
    #[error(
        "the peer has encryption {} but this transport has it {}: set TransportConfig::encryption the same on both sides",
        on_off(*remote),
        on_off(*local)
    )]
    EncryptionMismatch {
        /// Whether this transport encrypts.
        local: bool,
        /// Whether the peer does.
        remote: bool,
    },
    /// The two peers speak different end-to-end session versions (version 2 added flow
    /// control, and version 1 clients send no session parameters; version 3 mixes the topic
    /// key into the handshake from its first message, and versions 1 and 2 look alike there).
    #[error(
        "the peer speaks end-to-end session version {remote} but this transport speaks version {local} (version 2 added flow control, version 3 keeps static keys from anyone who does not know the topic): run the same pluresdb-sync release on both sides"
    )]
    VersionMismatch {
        /// This transport's session version.
        local: u8,
        /// The peer's (1 when it sent no session parameters; 2 for any `XXpsk3` handshake).
        remote: u8,
    },
    /// The peer announced a flow-control window too small to carry the largest frame twice.
    #[error("the peer's flow-control window of {window} bytes is below the {min}-byte minimum")]
    WindowTooSmall {
        /// What it announced.
        window: u32,
        /// The least accepted.
        min: u32,
    },
    /// The peer sent beyond the flow-control window this side granted it.
    #[error(
        "it sent beyond its flow-control window ({granted} credit units granted, {used} used): session closed"
    )]
    WindowExceeded {
        /// Credit units granted in total.
        granted: u64,
        /// Credit units it would have used.
        used: u64,
    },
    /// The peer ended the attempt with a REJECT whose reason this client does not know.
    #[error("the peer rejected the session (REJECT reason {reason})")]
    Rejected {
        /// The reason byte.
        reason: u8,
    },
    /// The peer has no session with this side (it ended without its CLOSE reaching us): it
    /// answered REJECT (no session).
    #[error(
        "the peer has no session with this side (it ended without its CLOSE reaching us): session closed"
    )]
    NoSession,
    /// A peer frame or chunk broke the end-to-end protocol.
    #[error("malformed peer frame: {what}")]
    Malformed {
        /// What was wrong with it.
        what: String,
    },
    /// A sealed frame of the session did not decrypt.
    #[error("decryption failed: {reason}")]
    Decrypt {
        /// What snow reported.
        reason: String,
    },
    /// Sealing a frame failed (this side's fault; the session ends).
    #[error("encryption failed: {reason}")]
    Encrypt {
        /// What snow reported.
        reason: String,
    },
    /// An incoming message grew beyond the largest a connection carries.
    #[error("incoming message of at least {len} bytes exceeds the {max}-byte limit")]
    MessageTooLarge {
        /// Bytes received so far.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The remote proved this transport's own static key.
    #[error("the remote has this transport's own identity")]
    OwnIdentity,
    /// The topic already has the most sessions this client holds; the new one was ignored.
    #[error("ignored: already {max} sessions on this topic")]
    TooManySessions {
        /// The limit.
        max: usize,
    },
    /// Nothing reads the session (the transport only called `lookup` or `announce` for the
    /// topic) and its window is full: it was closed so that the peer's `send` does not wait
    /// forever. A later `connect` handshakes again.
    #[error(
        "nothing reads it (no connect receiver for this topic) and it filled its {window}-unit window: closed so that the peer's send does not wait forever"
    )]
    Unread {
        /// Credit units the peer had been granted.
        window: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_peer_and_the_cause() {
        let e = RelayError::peer_session(
            7,
            "ab12",
            SessionError::WindowExceeded {
                granted: 10,
                used: 12,
            },
        );
        assert_eq!(
            e.to_string(),
            "session with peer ab12 on relay connection 7 failed: it sent beyond its flow-control window (10 credit units granted, 12 used): session closed"
        );
        let e = RelayError::session(
            3,
            SessionError::EncryptionMismatch {
                local: true,
                remote: false,
            },
        );
        assert!(
            e.to_string()
                .starts_with("session with relay connection 3 failed: the peer has encryption off but this transport has it on"),
            "{e}"
        );
        assert_eq!(
            e.session_cause(),
            Some(&SessionError::EncryptionMismatch {
                local: true,
                remote: false
            })
        );
        assert_eq!(RelayError::NoRelayUrl.session_cause(), None);
    }
}
