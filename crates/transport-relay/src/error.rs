//! The relay transport's own errors.

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
    /// The two peers disagree about end-to-end encryption.
    #[error(
        "peer on relay connection {conn} has encryption {remote} but this transport has it {local}: set TransportConfig::encryption the same on both sides"
    )]
    EncryptionMismatch {
        /// The remote's relay connection id.
        conn: u64,
        /// "on" or "off".
        local: &'static str,
        /// "on" or "off".
        remote: &'static str,
    },
    /// A peer session failed (handshake or decryption).
    #[error("session with relay connection {conn} failed: {reason}")]
    Session {
        /// The remote's relay connection id.
        conn: u64,
        /// What failed.
        reason: String,
    },
    /// The two peers speak different end-to-end session versions (version 2 added flow
    /// control; version 1 clients send no session parameters).
    #[error(
        "peer on relay connection {conn} speaks end-to-end session version {remote} but this transport speaks version {local} (version 2 added flow control): run the same pluresdb-sync release on both sides"
    )]
    SessionVersionMismatch {
        /// The remote's relay connection id.
        conn: u64,
        /// This transport's session version.
        local: u8,
        /// The remote's (1 when it sent no session parameters).
        remote: u8,
    },
}
