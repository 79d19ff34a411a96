//! The builder, its defaults, and the settings a running node reads.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pluresdb_sync_core::config::DEFAULT_TIMEOUT_MS;
use pluresdb_sync_core::{Identity, TransportConfig};

use crate::relay_path::RelayPath;
use crate::{HyperswarmError, HyperswarmTransport};

/// Environment variable with comma-separated `host:port` DHT bootstrap nodes, read by
/// [`HyperswarmTransport::from_config`] (so private networks and tests need no code change).
pub const BOOTSTRAP_ENV: &str = "PLURESDB_SYNC_BOOTSTRAP";

/// Default bind address: every IPv4 interface, a port chosen by the OS. The DHT crate is
/// IPv4-only, and a random port avoids clashing with other instances.
pub const DEFAULT_BIND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);

/// Default maximum number of connected peers (over all topics): enough for a replica set,
/// small enough to bound memory (each connection may buffer a 16 MiB message).
pub const DEFAULT_MAX_PEERS: usize = 64;

/// Default time limit of one network operation (`announce`, `lookup`, `connect`): 30 s, what
/// `TransportConfig::timeout_ms` defaults to. A DHT query on the public network takes a few
/// seconds; an operation that finds no DHT node at all fails at once, not after this.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(DEFAULT_TIMEOUT_MS);

/// Default time limit of one QUIC + Noise handshake: a few round trips even on a slow path,
/// and time for a peer behind a NAT to punch back. (A dial to an address never verified
/// gives up after 1.5 s without an answer, so dead DHT entries do not hold dial slots long.)
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default QUIC keep-alive interval: keeps NAT mappings open (most expire UDP after 30 s or
/// more) and lets a lost peer be noticed.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(3);

/// Default idle timeout: a peer silent this long (about three keep-alives lost) is gone, and
/// its connection's `receive` returns `Ok(None)`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default longest interval between two DHT lookups of a joined topic. Lookups start 0.25 s
/// apart and the interval doubles up to this, so new peers are found fast at first and the
/// DHT is not hammered later (a wait also ends once this node's announcement has landed: a
/// peer that joined at the same moment is on the DHT by then).
pub const DEFAULT_LOOKUP_INTERVAL: Duration = Duration::from_secs(30);

/// The first interval between DHT lookups after joining (then doubling up to the lookup
/// interval).
pub(crate) const FIRST_LOOKUP_INTERVAL: Duration = Duration::from_millis(250);

/// Default interval between re-announcements: other DHT implementations expire peers after
/// about 30 minutes, so refresh well within that.
pub const DEFAULT_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(10 * 60);

/// Environment variable that switches LAN discovery on or off (`on`/`off`, `true`/`false`,
/// `1`/`0`, `yes`/`no`), read by [`HyperswarmTransport::from_config`]: tests and hosts
/// that must not multicast need no code change.
pub const LAN_DISCOVERY_ENV: &str = "PLURESDB_SYNC_LAN_DISCOVERY";

/// The multicast group and port of LAN discovery: `239.255.0.0/16` is the organisation-local
/// scope (RFC 2365), and packets go out with TTL 1, so they never leave the network segment.
pub const LAN_DISCOVERY_GROUP: SocketAddrV4 =
    SocketAddrV4::new(Ipv4Addr::new(239, 255, 80, 83), 21033);

/// Default interval between LAN announcements: what Syncthing's local discovery uses. Joins
/// do not wait for it (a newcomer queries and members answer at once); it bounds how long a
/// peer that left stays listed (3 intervals) and costs one packet of ~60 bytes per interface
/// per interval. Raise it to save battery.
pub const DEFAULT_LAN_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(30);

/// Shortest LAN announce interval accepted: more often is only traffic.
pub const MIN_LAN_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(1);

/// Longest LAN announce interval accepted: receivers keep an entry for 3 intervals but at
/// most an hour, so a longer interval would let entries lapse between announcements.
pub const MAX_LAN_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(20 * 60);

/// Everything a running node needs, fixed at build time.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) bootstrap: Option<Vec<String>>,
    pub(crate) bind: SocketAddrV4,
    pub(crate) identity: Identity,
    pub(crate) max_peers: usize,
    pub(crate) timeout: Duration,
    pub(crate) handshake_timeout: Duration,
    pub(crate) keep_alive: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) lookup_interval: Duration,
    pub(crate) announce_interval: Duration,
    pub(crate) dht_server_mode: bool,
    pub(crate) dht_request_timeout: Option<Duration>,
    pub(crate) announce_port: Option<u16>,
    pub(crate) lan_discovery: bool,
    pub(crate) lan_announce_interval: Duration,
    /// The relay path (Auto mode), if any.
    pub(crate) relay: Option<Arc<dyn RelayPath>>,
    /// Whether the DHT is used (off only with a relay path).
    pub(crate) dht: bool,
    /// Whether UDP to real addresses is used (off only with a relay path).
    pub(crate) direct: bool,
}

/// Builds a [`HyperswarmTransport`]; every setting has a documented default.
///
/// ```
/// use std::time::Duration;
/// use pluresdb_sync_transport_hyperswarm::HyperswarmTransport;
///
/// let transport = HyperswarmTransport::builder()
///     .bootstrap(["127.0.0.1:6881"])
///     .max_peers(8)
///     .timeout(Duration::from_secs(5))
///     .build()?;
/// assert_eq!(transport.peer_id().len(), 64);
/// # Ok::<(), pluresdb_sync_transport_hyperswarm::HyperswarmError>(())
/// ```
#[derive(Clone, Debug)]
pub struct HyperswarmTransportBuilder {
    bootstrap: Option<Vec<String>>,
    bootstrap_origin: &'static str,
    bind: SocketAddrV4,
    identity: Option<Identity>,
    identity_file: Option<PathBuf>,
    max_peers: usize,
    timeout: Duration,
    handshake_timeout: Duration,
    keep_alive: Duration,
    idle_timeout: Duration,
    lookup_interval: Duration,
    announce_interval: Duration,
    dht_server_mode: bool,
    dht_request_timeout: Option<Duration>,
    announce_port: Option<u16>,
    lan_discovery: bool,
    lan_announce_interval: Duration,
    /// A value of [`LAN_DISCOVERY_ENV`] that is no switch, reported by `build`.
    lan_env_invalid: Option<String>,
    relay: Option<Arc<dyn RelayPath>>,
    dht: bool,
    direct: bool,
}

impl Default for HyperswarmTransportBuilder {
    fn default() -> Self {
        Self {
            bootstrap: None,
            bootstrap_origin: "the builder",
            bind: DEFAULT_BIND,
            identity: None,
            identity_file: None,
            max_peers: DEFAULT_MAX_PEERS,
            timeout: DEFAULT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            keep_alive: DEFAULT_KEEP_ALIVE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            lookup_interval: DEFAULT_LOOKUP_INTERVAL,
            announce_interval: DEFAULT_ANNOUNCE_INTERVAL,
            dht_server_mode: false,
            dht_request_timeout: None,
            announce_port: None,
            lan_discovery: true,
            lan_announce_interval: DEFAULT_LAN_ANNOUNCE_INTERVAL,
            lan_env_invalid: None,
            relay: None,
            dht: true,
            direct: true,
        }
    }
}

impl HyperswarmTransportBuilder {
    /// DHT bootstrap nodes as `host:port` (default: the public mainline bootstrap nodes).
    /// Host names are resolved when the transport starts, not here.
    pub fn bootstrap<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.bootstrap = Some(nodes.into_iter().map(Into::into).collect());
        self.bootstrap_origin = "the builder";
        self
    }

    /// Reads bootstrap nodes from [`BOOTSTRAP_ENV`] when it is set and not empty.
    pub fn bootstrap_from_env(mut self) -> Self {
        if let Ok(value) = std::env::var(BOOTSTRAP_ENV)
            && !value.trim().is_empty()
        {
            self.bootstrap = Some(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            );
            self.bootstrap_origin = "PLURESDB_SYNC_BOOTSTRAP";
        }
        self
    }

    /// The UDP address the data socket (QUIC and hole punching) binds to; the DHT node binds
    /// the same IP on its own port. Default [`DEFAULT_BIND`].
    pub fn bind_addr(mut self, addr: SocketAddrV4) -> Self {
        self.bind = addr;
        self
    }

    /// The peer's static Noise key (default: a new random one, so the peer id changes each
    /// run). Takes precedence over [`identity_file`](Self::identity_file).
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Loads the peer's static key from a key file written by `pluresdb-sync keygen`, when
    /// [`build`](Self::build) runs (default: a new random key).
    pub fn identity_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.identity_file = Some(path.into());
        self
    }

    /// The most peers connected at once, over all topics (default [`DEFAULT_MAX_PEERS`]).
    pub fn max_peers(mut self, max: usize) -> Self {
        self.max_peers = max;
        self
    }

    /// Time limit of one operation: `announce`, `lookup`, each announcement (also those
    /// `connect` makes in the background), and starting the node (default
    /// [`DEFAULT_TIMEOUT`]; `TransportConfig::timeout_ms` sets it).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Time limit of one handshake (default [`DEFAULT_HANDSHAKE_TIMEOUT`]).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// QUIC keep-alive interval and idle timeout (defaults [`DEFAULT_KEEP_ALIVE`],
    /// [`DEFAULT_IDLE_TIMEOUT`]). The idle timeout bounds how long a lost peer goes
    /// unnoticed.
    pub fn keep_alive(mut self, interval: Duration, idle_timeout: Duration) -> Self {
        self.keep_alive = interval;
        self.idle_timeout = idle_timeout;
        self
    }

    /// Longest interval between DHT lookups of a joined topic (default
    /// [`DEFAULT_LOOKUP_INTERVAL`]).
    pub fn lookup_interval(mut self, interval: Duration) -> Self {
        self.lookup_interval = interval;
        self
    }

    /// Interval between re-announcements (default [`DEFAULT_ANNOUNCE_INTERVAL`]).
    pub fn announce_interval(mut self, interval: Duration) -> Self {
        self.announce_interval = interval;
        self
    }

    /// Runs the DHT node in server mode (answering other nodes' queries). Default off: a
    /// node behind NAT cannot serve. Useful on public hosts and local test networks.
    pub fn dht_server_mode(mut self, on: bool) -> Self {
        self.dht_server_mode = on;
        self
    }

    /// How long the DHT node waits for each KRPC reply. Default: measured when the node
    /// starts, from read-only pings to up to 4 bootstrap nodes: 3 times the slowest answer,
    /// at least 0.5 s and at most 2 s (the `mainline` crate's default, also used when no
    /// bootstrap node answers within 0.5 s). A DHT query ends only when every node it asked
    /// answered or timed out, so one node that never answers holds an announcement for this
    /// long; short values make local test networks fast.
    pub fn dht_request_timeout(mut self, timeout: Duration) -> Self {
        self.dht_request_timeout = Some(timeout);
        self
    }

    /// Announces this UDP port instead of the data socket's own, for a host behind a manual
    /// port forward whose external port differs (default: the data socket's port).
    pub fn announce_port(mut self, port: u16) -> Self {
        self.announce_port = Some(port);
        self
    }

    /// Finds peers on the same network segment by multicast (default on; see
    /// `docs/lan-discovery.md`), besides the DHT: they connect over the same QUIC + Noise
    /// path at their LAN address, and with LAN discovery on, an unreachable DHT is not an
    /// error (`connect` and `announce` warn once and retry the DHT in the background;
    /// `lookup` lists the LAN's peers). A node bound to loopback has no LAN discovery.
    pub fn lan_discovery(mut self, on: bool) -> Self {
        self.lan_discovery = on;
        self
    }

    /// Interval between LAN announcements (default [`DEFAULT_LAN_ANNOUNCE_INTERVAL`],
    /// from [`MIN_LAN_ANNOUNCE_INTERVAL`] to [`MAX_LAN_ANNOUNCE_INTERVAL`]); raise it to save
    /// battery: joins do not wait for it.
    pub fn lan_announce_interval(mut self, interval: Duration) -> Self {
        self.lan_announce_interval = interval;
        self
    }

    /// Reads the LAN discovery switch from [`LAN_DISCOVERY_ENV`] when it is set and not
    /// empty (a value that is no switch makes [`build`](Self::build) fail).
    pub fn lan_discovery_from_env(mut self) -> Self {
        if let Ok(value) = std::env::var(LAN_DISCOVERY_ENV)
            && !value.trim().is_empty()
        {
            match parse_switch(&value) {
                Some(on) => self.lan_discovery = on,
                None => self.lan_env_invalid = Some(value),
            }
        }
        self
    }

    /// Adds a relay as one more path and discovery source (what Auto mode does; see
    /// [`relay_path`](crate::relay_path)): topics are joined in the relay's rooms too, their
    /// members dialled like DHT peers, and their packets carried as relay datagrams.
    pub fn relay_path(mut self, path: Arc<dyn RelayPath>) -> Self {
        self.relay = Some(path);
        self
    }

    /// Uses the mainline DHT (default on). Off needs a [`relay_path`](Self::relay_path): peers
    /// then meet only in the relay's rooms, and no DHT node is started.
    pub fn dht(mut self, on: bool) -> Self {
        self.dht = on;
        self
    }

    /// Sends and reads UDP to and from real addresses (default on). Off needs a
    /// [`relay_path`](Self::relay_path): every packet then crosses the relay (for tests of
    /// the relayed path, and for networks that block UDP).
    pub fn direct(mut self, on: bool) -> Self {
        self.direct = on;
        self
    }

    /// Checks the settings and builds the transport. Nothing touches the network yet: the
    /// socket and the DHT node start on the first async call.
    pub fn build(self) -> Result<HyperswarmTransport, HyperswarmError> {
        if self.relay.is_none() && !(self.dht && self.direct) {
            return Err(invalid(
                "dht and direct",
                "on, unless a relay path is set",
                "off",
            ));
        }
        if let Some(nodes) = &self.bootstrap {
            for node in nodes {
                check_host_port(node).map_err(|reason| HyperswarmError::InvalidBootstrap {
                    text: node.clone(),
                    origin: self.bootstrap_origin,
                    reason,
                })?;
            }
        }
        if let Some(value) = &self.lan_env_invalid {
            return Err(invalid(
                LAN_DISCOVERY_ENV,
                "on, off, true, false, 1, 0, yes or no",
                value,
            ));
        }
        if !(MIN_LAN_ANNOUNCE_INTERVAL..=MAX_LAN_ANNOUNCE_INTERVAL)
            .contains(&self.lan_announce_interval)
        {
            return Err(invalid(
                "lan_announce_interval",
                "from 1 s to 20 min",
                &format!("{:?}", self.lan_announce_interval),
            ));
        }
        if self.announce_port == Some(0) {
            return Err(invalid("announce_port", "a port from 1 to 65535", "0"));
        }
        if self.max_peers == 0 {
            return Err(invalid("max_peers", "at least 1", "0"));
        }
        for (what, value) in [
            ("timeout", self.timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("keep_alive interval", self.keep_alive),
            ("lookup_interval", self.lookup_interval),
            ("announce_interval", self.announce_interval),
        ] {
            if value.is_zero() {
                return Err(invalid(what, "greater than zero", "0 s"));
            }
        }
        if self.idle_timeout <= self.keep_alive {
            return Err(invalid(
                "idle_timeout",
                "longer than the keep-alive interval",
                &format!("{:?}", self.idle_timeout),
            ));
        }
        let identity = match (self.identity, &self.identity_file) {
            (Some(id), _) => id,
            (None, Some(path)) => Identity::load(path).map_err(HyperswarmError::Identity)?,
            (None, None) => Identity::generate().map_err(HyperswarmError::Identity)?,
        };
        Ok(HyperswarmTransport::with_settings(Arc::new(Settings {
            bootstrap: self.bootstrap,
            bind: self.bind,
            identity,
            max_peers: self.max_peers,
            timeout: self.timeout,
            handshake_timeout: self.handshake_timeout,
            keep_alive: self.keep_alive,
            idle_timeout: self.idle_timeout,
            lookup_interval: self.lookup_interval,
            announce_interval: self.announce_interval,
            dht_server_mode: self.dht_server_mode,
            dht_request_timeout: self.dht_request_timeout,
            announce_port: self.announce_port,
            lan_discovery: self.lan_discovery,
            lan_announce_interval: self.lan_announce_interval,
            relay: self.relay,
            dht: self.dht,
            direct: self.direct,
        })))
    }

    /// A builder preset from `config` (its `timeout_ms`), [`BOOTSTRAP_ENV`] and
    /// [`LAN_DISCOVERY_ENV`], for settings `TransportConfig` does not carry.
    pub fn from_config(config: &TransportConfig) -> Self {
        let mut builder = Self::default()
            .bootstrap_from_env()
            .lan_discovery_from_env();
        if config.timeout_ms > 0 {
            builder.timeout = config.timeout();
        }
        builder
    }
}

fn invalid(what: &'static str, expected: &'static str, got: &str) -> HyperswarmError {
    HyperswarmError::InvalidSetting {
        what,
        expected,
        got: got.to_owned(),
    }
}

/// An on/off switch as text.
fn parse_switch(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "on" | "true" | "yes" => Some(true),
        "0" | "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

/// Checks `host:port` syntax without resolving anything.
fn check_host_port(text: &str) -> Result<(), String> {
    let (host, port) = text.rsplit_once(':').ok_or_else(|| "no port".to_owned())?;
    if host.is_empty() {
        return Err("no host".into());
    }
    if host.contains(char::is_whitespace) {
        return Err("the host contains white space".into());
    }
    match port.parse::<u16>() {
        Ok(0) => Err("port 0".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("port {port:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_parse() {
        for on in ["1", "on", "TRUE", " yes "] {
            assert_eq!(parse_switch(on), Some(true), "{on}");
        }
        for off in ["0", "off", "False", "no"] {
            assert_eq!(parse_switch(off), Some(false), "{off}");
        }
        for bad in ["", "maybe", "2"] {
            assert_eq!(parse_switch(bad), None, "{bad}");
        }
        let b = HyperswarmTransportBuilder {
            lan_env_invalid: Some("maybe".into()),
            ..HyperswarmTransportBuilder::default()
        };
        let err = b.build().unwrap_err().to_string();
        assert!(
            err.contains(LAN_DISCOVERY_ENV) && err.contains("maybe"),
            "{err}"
        );
    }

    #[test]
    fn host_port_syntax() {
        for good in ["127.0.0.1:6881", "router.bittorrent.com:6881", "[::1]:1"] {
            assert_eq!(check_host_port(good), Ok(()), "{good}");
        }
        for bad in ["127.0.0.1", ":6881", "host:0", "host:70000", "a b:1", ""] {
            assert!(check_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn build_validates() {
        let err = HyperswarmTransportBuilder::default()
            .bootstrap(["nope"])
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("\"nope\""), "{err}");
        let err = HyperswarmTransportBuilder::default()
            .max_peers(0)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("max_peers"), "{err}");
        let err = HyperswarmTransportBuilder::default()
            .keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("idle_timeout"), "{err}");
        for bad in [Duration::from_millis(999), Duration::from_secs(20 * 60 + 1)] {
            let err = HyperswarmTransportBuilder::default()
                .lan_announce_interval(bad)
                .build()
                .unwrap_err();
            assert!(err.to_string().contains("lan_announce_interval"), "{err}");
        }
        let built = HyperswarmTransportBuilder::default()
            .lan_announce_interval(MAX_LAN_ANNOUNCE_INTERVAL)
            .build()
            .unwrap();
        assert!(built.settings.lan_discovery, "on by default");
        assert_eq!(
            built.settings.lan_announce_interval,
            MAX_LAN_ANNOUNCE_INTERVAL
        );
        let off = HyperswarmTransportBuilder::default()
            .lan_discovery(false)
            .build()
            .unwrap();
        assert!(!off.settings.lan_discovery);
        HyperswarmTransportBuilder::default().build().unwrap();
    }

    #[test]
    fn identity_comes_from_the_key_file() {
        let dir = std::env::temp_dir().join(format!("hs-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("peer.key");
        let identity = Identity::generate().unwrap();
        identity.save(&path, true).unwrap();
        let built = HyperswarmTransportBuilder::default()
            .identity_file(&path)
            .build()
            .unwrap();
        assert_eq!(built.peer_id(), identity.peer_id());
        // An explicit identity wins over the file.
        let other = Identity::generate().unwrap();
        let built = HyperswarmTransportBuilder::default()
            .identity_file(&path)
            .identity(other.clone())
            .build()
            .unwrap();
        assert_eq!(built.peer_id(), other.peer_id());
        let missing = dir.join("missing.key");
        let err = HyperswarmTransportBuilder::default()
            .identity_file(&missing)
            .build()
            .unwrap_err();
        assert!(
            matches!(
                &err,
                HyperswarmError::Identity(pluresdb_sync_core::Error::IdentityFile { path, .. })
                    if *path == missing
            ),
            "{err}"
        );
        assert!(err.to_string().contains("missing.key"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn from_config_takes_the_timeout() {
        let config = TransportConfig {
            timeout_ms: 1234,
            ..TransportConfig::default()
        };
        let b = HyperswarmTransportBuilder::from_config(&config);
        assert_eq!(b.timeout, Duration::from_millis(1234));
        assert_eq!(
            HyperswarmTransportBuilder::default().timeout,
            Duration::from_secs(30)
        );
    }
}
