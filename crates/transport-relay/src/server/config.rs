//! The relay server's settings: every limit with its documented default, the checks that
//! they fit together, the builder, and a `Debug` that never shows a secret.

use std::time::Duration;

use crate::RelayError;
use crate::protocol::{DEFAULT_MAX_FRAME_BYTES, MAX_MAX_FRAME_BYTES, MIN_MAX_FRAME_BYTES};

/// Default most rooms one connection may join: a client syncs a handful of databases; this
/// bounds the fan-out state one socket can hold.
pub const DEFAULT_MAX_ROOMS_PER_CONNECTION: usize = 64;
/// Default most members of one room: bounds broadcast fan-out per frame.
pub const DEFAULT_MAX_PEERS_PER_ROOM: usize = 256;
/// Default most open connections from one IP: one host behind one NAT runs a few clients.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 64;
/// Default time from TCP accept to a completed WebSocket upgrade: slow links finish a TLS and
/// HTTP exchange in well under 10 s; idle sockets must not hold a slot longer.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time after the upgrade within which a client must join a room.
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default silence after which the relay sends a PING (below common 60 s proxy idle timeouts).
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(15);
/// Default silence after which the relay closes a connection (three ping intervals).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(45);
/// Default send queue per connection, in entries. An entry is one frame, or the small frames
/// one sender's burst produced for this receiver gathered up to 16 KiB; what the entries may
/// hold in bytes is capped by [`DEFAULT_MAX_QUEUED_BYTES_PER_CONNECTION`].
pub const DEFAULT_SEND_QUEUE_FRAMES: usize = 256;
/// Default cap on the bytes queued to one connection: 64 frames of 64 KiB, more than a fast
/// link drains in a round trip; past it, senders to that connection wait (backpressure).
pub const DEFAULT_MAX_QUEUED_BYTES_PER_CONNECTION: usize = 4 * 1024 * 1024;
/// Default budget for the bytes queued to all connections together: what never-reading
/// receivers can pin, however many IPs they come from. When it is used up, the largest
/// queues are closed (4010). Sized for a small relay host; raise it with the memory you
/// give the relay (each connection can also hold its WebSocket buffers, ~150 KiB at most).
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 256 * 1024 * 1024;
/// Default wait for room in a full send queue before the receiver is closed as a slow
/// consumer. Senders are paused (backpressure) meanwhile, never buffered without bound.
pub const DEFAULT_SLOW_CONSUMER_TIMEOUT: Duration = Duration::from_secs(5);
/// Default per-IP read rate: off. The right rate depends on the relay's uplink and users;
/// memory stays bounded without it (per-connection queues), so operators opt in with
/// `--max-bytes-per-sec-per-ip`.
pub const DEFAULT_MAX_BYTES_PER_SEC_PER_IP: Option<u64> = None;

/// Default NATS subject prefix: versioned, so an incompatible bus format gets a new prefix
/// and old and new nodes never misread each other.
pub const DEFAULT_NATS_SUBJECT_PREFIX: &str = "pluresdb.relay.v1";
/// Default time a node collects the other nodes' answers when a room gets its first local
/// member (only then; later joins use what the node already follows). NATS round trips
/// inside one data centre take well under a millisecond; this leaves room for loaded nodes.
pub const DEFAULT_NATS_MEMBERSHIP_WAIT: Duration = Duration::from_millis(250);

/// The relay server's limits. Build with [`RelayServerConfig::builder`].
///
/// Its `Debug` output shows how many bearer tokens there are, never the tokens, and NATS URLs
/// without their user info (credentials).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayServerConfig {
    /// The largest relay frame (one WebSocket message), in bytes.
    pub max_frame_bytes: usize,
    /// The most rooms one connection may join.
    pub max_rooms_per_connection: usize,
    /// The most members of one room.
    pub max_peers_per_room: usize,
    /// The most open connections from one IP address.
    pub max_connections_per_ip: usize,
    /// TCP accept to completed upgrade.
    pub handshake_timeout: Duration,
    /// Upgrade to first JOIN.
    pub join_timeout: Duration,
    /// Silence before the relay pings.
    pub ping_interval: Duration,
    /// Silence before the relay closes.
    pub idle_timeout: Duration,
    /// Entries queued per connection (a frame, or a batch of small frames of at most 16 KiB).
    pub send_queue_frames: usize,
    /// How long a forward waits on a full queue before closing the receiver.
    pub slow_consumer_timeout: Duration,
    /// Bytes queued to one connection at most.
    pub max_queued_bytes_per_connection: usize,
    /// Bytes queued to all connections together at most.
    pub max_queued_bytes: usize,
    /// Accepted bearer tokens (empty: an open relay).
    pub auth_tokens: Vec<String>,
    /// Bytes per second one IP may send (token bucket; reads pause, nothing is buffered).
    pub max_bytes_per_sec_per_ip: Option<u64>,
    /// NATS server(s) to scale out over (`nats://host:4222`, comma-separated); `None`: a
    /// single relay.
    pub nats_url: Option<String>,
    /// The prefix of every NATS subject this relay uses.
    pub nats_subject_prefix: String,
    /// How long a node collects other nodes' members of a room it starts following.
    pub nats_membership_wait: Duration,
}

impl Default for RelayServerConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_rooms_per_connection: DEFAULT_MAX_ROOMS_PER_CONNECTION,
            max_peers_per_room: DEFAULT_MAX_PEERS_PER_ROOM,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            join_timeout: DEFAULT_JOIN_TIMEOUT,
            ping_interval: DEFAULT_PING_INTERVAL,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            send_queue_frames: DEFAULT_SEND_QUEUE_FRAMES,
            slow_consumer_timeout: DEFAULT_SLOW_CONSUMER_TIMEOUT,
            max_queued_bytes_per_connection: DEFAULT_MAX_QUEUED_BYTES_PER_CONNECTION,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            auth_tokens: Vec::new(),
            max_bytes_per_sec_per_ip: DEFAULT_MAX_BYTES_PER_SEC_PER_IP,
            nats_url: None,
            nats_subject_prefix: DEFAULT_NATS_SUBJECT_PREFIX.to_owned(),
            nats_membership_wait: DEFAULT_NATS_MEMBERSHIP_WAIT,
        }
    }
}

impl std::fmt::Debug for RelayServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured, so a new field cannot be forgotten here.
        let Self {
            max_frame_bytes,
            max_rooms_per_connection,
            max_peers_per_room,
            max_connections_per_ip,
            handshake_timeout,
            join_timeout,
            ping_interval,
            idle_timeout,
            send_queue_frames,
            slow_consumer_timeout,
            max_queued_bytes_per_connection,
            max_queued_bytes,
            auth_tokens,
            max_bytes_per_sec_per_ip,
            nats_url,
            nats_subject_prefix,
            nats_membership_wait,
        } = self;
        f.debug_struct("RelayServerConfig")
            .field("max_frame_bytes", max_frame_bytes)
            .field("max_rooms_per_connection", max_rooms_per_connection)
            .field("max_peers_per_room", max_peers_per_room)
            .field("max_connections_per_ip", max_connections_per_ip)
            .field("handshake_timeout", handshake_timeout)
            .field("join_timeout", join_timeout)
            .field("ping_interval", ping_interval)
            .field("idle_timeout", idle_timeout)
            .field("send_queue_frames", send_queue_frames)
            .field("slow_consumer_timeout", slow_consumer_timeout)
            .field(
                "max_queued_bytes_per_connection",
                max_queued_bytes_per_connection,
            )
            .field("max_queued_bytes", max_queued_bytes)
            .field(
                "auth_tokens",
                &format_args!("<{} redacted>", auth_tokens.len()),
            )
            .field("max_bytes_per_sec_per_ip", max_bytes_per_sec_per_ip)
            .field("nats_url", &nats_url.as_deref().map(redact_url))
            .field("nats_subject_prefix", nats_subject_prefix)
            .field("nats_membership_wait", nats_membership_wait)
            .finish()
    }
}

/// NATS URL(s) (comma-separated) without user info: `nats://user:secret@host:4222` shows as
/// `nats://<redacted>@host:4222`. For logs, errors and `Debug`.
pub(crate) fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|u| {
            let rest_at = u.find("://").map_or(0, |i| i + 3);
            match u[rest_at..].rfind('@') {
                Some(at) => format!("{}<redacted>{}", &u[..rest_at], &u[rest_at + at..]),
                None => u.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl RelayServerConfig {
    /// A builder starting from the defaults.
    ///
    /// ```
    /// use pluresdb_sync_transport_relay::server::RelayServerConfig;
    ///
    /// let config = RelayServerConfig::builder().max_frame_bytes(16 * 1024).build().unwrap();
    /// assert_eq!(config.max_frame_bytes, 16 * 1024);
    /// assert!(RelayServerConfig::builder().max_frame_bytes(10).build().is_err());
    /// ```
    pub fn builder() -> RelayServerConfigBuilder {
        RelayServerConfigBuilder(Self::default())
    }

    /// Checks the limits are usable together.
    pub fn check(&self) -> Result<(), RelayError> {
        let bad = |name: &'static str, value: String, reason: String| {
            Err(RelayError::InvalidSetting {
                name,
                value,
                reason,
            })
        };
        if !(MIN_MAX_FRAME_BYTES..=MAX_MAX_FRAME_BYTES).contains(&self.max_frame_bytes) {
            return bad(
                "max_frame_bytes",
                self.max_frame_bytes.to_string(),
                format!("must be {MIN_MAX_FRAME_BYTES}..={MAX_MAX_FRAME_BYTES}"),
            );
        }
        for (name, v) in [
            ("max_rooms_per_connection", self.max_rooms_per_connection),
            ("max_peers_per_room", self.max_peers_per_room),
            ("max_connections_per_ip", self.max_connections_per_ip),
            ("send_queue_frames", self.send_queue_frames),
        ] {
            if v == 0 || v > u32::MAX as usize {
                return bad(name, v.to_string(), "must be 1..=4294967295".into());
            }
        }
        if self.max_peers_per_room * 8 + 37 > self.max_frame_bytes {
            return bad(
                "max_peers_per_room",
                self.max_peers_per_room.to_string(),
                format!(
                    "the JOINED list ({} bytes) must fit max_frame_bytes ({})",
                    self.max_peers_per_room * 8 + 37,
                    self.max_frame_bytes
                ),
            );
        }
        for (name, v) in [
            ("handshake_timeout", self.handshake_timeout),
            ("join_timeout", self.join_timeout),
            ("ping_interval", self.ping_interval),
            ("idle_timeout", self.idle_timeout),
            ("slow_consumer_timeout", self.slow_consumer_timeout),
            ("nats_membership_wait", self.nats_membership_wait),
        ] {
            if v.is_zero() {
                return bad(name, format!("{v:?}"), "must be greater than zero".into());
            }
        }
        if self.idle_timeout <= self.ping_interval {
            return bad(
                "idle_timeout",
                format!("{:?}", self.idle_timeout),
                format!(
                    "must exceed ping_interval ({:?}) so a ping can be answered",
                    self.ping_interval
                ),
            );
        }
        if self.max_bytes_per_sec_per_ip == Some(0) {
            return bad(
                "max_bytes_per_sec_per_ip",
                "0".into(),
                "must be greater than zero (leave it unset for no limit)".into(),
            );
        }
        let p = &self.nats_subject_prefix;
        if p.is_empty()
            || p.starts_with('.')
            || p.ends_with('.')
            || p.contains("..")
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        {
            return bad(
                "nats_subject_prefix",
                format!("{p:?}"),
                "must be dot-separated tokens of letters, digits, '-' and '_'".into(),
            );
        }
        if self
            .nats_url
            .as_deref()
            .is_some_and(|u| u.trim().is_empty())
        {
            return bad(
                "nats_url",
                "\"\"".into(),
                "must name a NATS server, e.g. nats://127.0.0.1:4222".into(),
            );
        }
        // A batch is at most one frame and its 4-byte length; two must fit a queue.
        let least = 2 * (self.max_frame_bytes + 4);
        if !(least..=u32::MAX as usize).contains(&self.max_queued_bytes_per_connection) {
            return bad(
                "max_queued_bytes_per_connection",
                self.max_queued_bytes_per_connection.to_string(),
                format!("must be {least}..=4294967295 (two frames of max_frame_bytes)"),
            );
        }
        if self.max_queued_bytes < self.max_queued_bytes_per_connection
            || self.max_queued_bytes > usize::MAX >> 4
        {
            return bad(
                "max_queued_bytes",
                self.max_queued_bytes.to_string(),
                format!(
                    "must be at least max_queued_bytes_per_connection ({})",
                    self.max_queued_bytes_per_connection
                ),
            );
        }
        if self.auth_tokens.iter().any(String::is_empty) {
            return bad(
                "auth_tokens",
                "\"\"".into(),
                "tokens must not be empty".into(),
            );
        }
        Ok(())
    }
}

/// Builds a [`RelayServerConfig`]; each setter documents its default const.
#[derive(Clone, Debug)]
pub struct RelayServerConfigBuilder(RelayServerConfig);

macro_rules! setter {
    ($(#[$doc:meta] $name:ident: $ty:ty),* $(,)?) => {$(
        #[$doc]
        pub fn $name(mut self, value: $ty) -> Self {
            self.0.$name = value;
            self
        }
    )*};
}

impl RelayServerConfigBuilder {
    setter! {
        /// [`DEFAULT_MAX_FRAME_BYTES`](crate::protocol::DEFAULT_MAX_FRAME_BYTES).
        max_frame_bytes: usize,
        /// [`DEFAULT_MAX_ROOMS_PER_CONNECTION`].
        max_rooms_per_connection: usize,
        /// [`DEFAULT_MAX_PEERS_PER_ROOM`].
        max_peers_per_room: usize,
        /// [`DEFAULT_MAX_CONNECTIONS_PER_IP`].
        max_connections_per_ip: usize,
        /// [`DEFAULT_HANDSHAKE_TIMEOUT`].
        handshake_timeout: Duration,
        /// [`DEFAULT_JOIN_TIMEOUT`].
        join_timeout: Duration,
        /// [`DEFAULT_PING_INTERVAL`].
        ping_interval: Duration,
        /// [`DEFAULT_IDLE_TIMEOUT`].
        idle_timeout: Duration,
        /// [`DEFAULT_SEND_QUEUE_FRAMES`].
        send_queue_frames: usize,
        /// [`DEFAULT_SLOW_CONSUMER_TIMEOUT`].
        slow_consumer_timeout: Duration,
        /// [`DEFAULT_MAX_QUEUED_BYTES_PER_CONNECTION`].
        max_queued_bytes_per_connection: usize,
        /// [`DEFAULT_MAX_QUEUED_BYTES`].
        max_queued_bytes: usize,
        /// Bearer tokens a client must present (default none: an open relay).
        auth_tokens: Vec<String>,
        /// [`DEFAULT_MAX_BYTES_PER_SEC_PER_IP`].
        max_bytes_per_sec_per_ip: Option<u64>,
        /// NATS server URL(s) to scale out over (default none: a single relay).
        nats_url: Option<String>,
        /// [`DEFAULT_NATS_SUBJECT_PREFIX`].
        nats_subject_prefix: String,
        /// [`DEFAULT_NATS_MEMBERSHIP_WAIT`].
        nats_membership_wait: Duration,
    }

    /// The checked configuration.
    pub fn build(self) -> Result<RelayServerConfig, RelayError> {
        self.0.check()?;
        Ok(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_tokens_or_nats_credentials() {
        let config = RelayServerConfig::builder()
            .auth_tokens(vec!["s3cret-token".into(), "other-token".into()])
            .nats_url(Some(
                "nats://relay:pa55word@10.0.0.1:4222,tls://tok3n@10.0.0.2:4222,nats://10.0.0.3"
                    .into(),
            ))
            .build()
            .unwrap();
        for text in [
            format!("{config:?}"),
            format!("{config:#?}"),
            format!(
                "{:?}",
                RelayServerConfig::builder().auth_tokens(config.auth_tokens.clone())
            ),
        ] {
            for secret in ["s3cret", "other-token", "pa55word", "relay:", "tok3n"] {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
        }
        let text = format!("{config:?}");
        assert!(text.contains("auth_tokens: <2 redacted>"), "{text}");
        assert!(
            text.contains(
                "nats://<redacted>@10.0.0.1:4222,tls://<redacted>@10.0.0.2:4222,nats://10.0.0.3"
            ),
            "{text}"
        );
        assert!(text.contains("max_frame_bytes: 65536"), "{text}");
    }

    #[test]
    fn urls_without_user_info_are_shown_as_they_are() {
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("user:pw@host:4222"), "<redacted>@host:4222");
        assert_eq!(redact_url(""), "");
    }
}
