//! Typed errors shared by every transport.
//!
//! The [`Transport`](crate::Transport) and [`Connection`](crate::Connection) traits return
//! `anyhow::Result` (the API existing PluresDB code uses); the errors underneath are these
//! types, so callers can tell them apart with `err.downcast_ref::<pluresdb_sync_core::Error>()`.

use std::path::PathBuf;

/// An error from pluresdb-sync's core or one of its transports.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `TransportConfig::relay_url` is needed for relay mode but is `None`.
    #[error("relay mode needs a relay_url (ws:// or wss://), but none was given")]
    MissingRelayUrl,
    /// `TransportConfig::relay_url` is not a usable WebSocket URL.
    #[error("relay_url {url:?} is invalid: {reason}")]
    InvalidRelayUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `TransportConfig::timeout_ms` is zero.
    #[error("timeout_ms must be greater than 0, got 0")]
    ZeroTimeout,
    /// The transport for a mode was compiled out.
    #[error(
        "transport mode {mode:?} is not available: enable the {feature:?} feature of the pluresdb-sync crate"
    )]
    FeatureNotEnabled {
        /// The mode that was asked for, in its config spelling.
        mode: &'static str,
        /// The Cargo feature that compiles it in.
        feature: &'static str,
    },
    /// A message is larger than a connection carries.
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    MessageTooLarge {
        /// Size of the rejected message.
        len: usize,
        /// The limit it exceeded.
        max: usize,
    },
    /// The connection was closed (by either side, or by `Transport::disconnect`).
    #[error("connection to peer {peer_id} is closed")]
    ConnectionClosed {
        /// The remote peer of the closed connection.
        peer_id: String,
    },
    /// The transport was disconnected; it takes no more work.
    #[error("the {transport} transport is disconnected")]
    TransportDisconnected {
        /// The transport's name.
        transport: &'static str,
    },
    /// A topic given as text is not 64 hex digits.
    #[error("topic {text:?} is not 64 hex digits: {reason}")]
    InvalidTopic {
        /// The text given (at most 80 characters of it).
        text: String,
        /// Why it was rejected.
        reason: String,
    },
    /// An identity key file could not be read or written.
    #[error("identity key file {path}: {reason}")]
    IdentityFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Bytes that should be an identity key are not a usable one.
    #[error("invalid identity key: {reason}")]
    InvalidIdentity {
        /// What is wrong with it.
        reason: String,
    },
    /// A network wait ran out of time.
    #[error("{what} timed out after {ms} ms")]
    Timeout {
        /// What was being waited for.
        what: String,
        /// The limit, in milliseconds.
        ms: u64,
    },
}

/// Why bytes could not be decoded by one of the core codecs.
///
/// Decoders never panic; every malformed input maps to one of these.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The input ended before the value did.
    #[error("input truncated: needed {needed} bytes at offset {offset}, only {available} left")]
    Truncated {
        /// Where the missing bytes start.
        offset: usize,
        /// How many were needed.
        needed: usize,
        /// How many were left.
        available: usize,
    },
    /// The format version byte is not one this build understands.
    #[error("unsupported codec version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// The version found.
        found: u8,
        /// The version this build supports.
        supported: u8,
    },
    /// The type tag is unknown.
    #[error("unknown event tag {0:#04x}")]
    UnknownTag(u8),
    /// A length field exceeds its limit.
    #[error("{field} of {len} bytes exceeds the {max}-byte limit")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A string field is not UTF-8.
    #[error("{field} is not valid UTF-8 (first bad byte at offset {offset})")]
    InvalidUtf8 {
        /// Which field.
        field: &'static str,
        /// Offset of the first invalid byte within the field.
        offset: usize,
    },
    /// Bytes remain after a complete value.
    #[error("{0} trailing bytes after a complete value")]
    TrailingBytes(usize),
}
