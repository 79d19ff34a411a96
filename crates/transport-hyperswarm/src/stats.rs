//! [`IncomingStats`]: what a node did with incoming connection attempts.

/// Counts of what this node did with incoming connection attempts since it started, from
/// [`HyperswarmTransport::incoming_stats`](crate::HyperswarmTransport::incoming_stats)
/// (diagnostics: how much an attack cost, and where it was stopped). Each attempt ends in at
/// most one of the refusal counts; `retried` attempts usually come back validated and count
/// again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IncomingStats {
    /// QUIC connection attempts seen (first Initials of a connection).
    pub attempts: u64,
    /// Answered with a QUIC Retry (the client must prove its address first): under load, or
    /// an IP trying too often. Costs this node no state.
    pub retried: u64,
    /// Refused before the QUIC handshake: too many handshakes in progress, in total or from
    /// the attempt's IP.
    pub refused_busy: u64,
    /// Refused before the QUIC handshake: its IP (or address) starts handshakes too often.
    pub rate_limited: u64,
    /// QUIC handshakes refused because the remote speaks another protocol version.
    pub version: u64,
    /// QUIC handshakes that failed otherwise, or did not finish in time.
    pub quic_failed: u64,
    /// Refused before any Noise crypto: the info-hash the remote named is not a topic this
    /// node joined.
    pub unknown_info_hash: u64,
    /// Refused at Noise message 1: it did not decrypt under the topic's key (the remote does
    /// not know the topic, or replayed another connection's message), or was malformed. No
    /// Diffie-Hellman was done for these.
    pub refused_at_message1: u64,
    /// Noise messages 2 sent: each cost this node two Diffie-Hellman operations, and only
    /// remotes that know the topic get one.
    pub message2_sent: u64,
    /// Declined after message 1: the remote knows the topic, but asked for a connection on
    /// a topic this node only announces.
    pub declined: u64,
    /// Handshakes that failed after message 1 (a bad message 3, a stream error, a timeout).
    pub failed_late: u64,
    /// Handshakes completed (message 3 read, or an identify exchange answered).
    pub completed: u64,
}
