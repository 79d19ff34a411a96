//! `AutoTransportBuilder`: Auto mode's settings (the relay URLs and their access, the
//! identity, the DHT and QUIC knobs, the switches for tests), checked once, with the
//! defaults of the two transports it combines.

use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pluresdb_sync_core::{Error, Identity, TransportConfig};
use pluresdb_sync_transport_hyperswarm::{HyperswarmError, HyperswarmTransportBuilder};
use pluresdb_sync_transport_relay::{RelayError, RelayTransportBuilder};

use crate::AutoTransport;
use crate::path::LinkPath;

/// Why an [`AutoTransport`] cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AutoError {
    /// Auto mode needs at least one relay URL.
    #[error("auto mode needs a relay URL (relay_url)")]
    NoRelayUrl,
    /// A relay setting is invalid.
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// A DHT, QUIC or identity setting is invalid.
    #[error(transparent)]
    Hyperswarm(#[from] HyperswarmError),
    /// A setting of [`TransportConfig`] is invalid.
    #[error(transparent)]
    Core(#[from] Error),
}

/// Builds an [`AutoTransport`]. Every setting has the default of the transport it comes
/// from (Hyperswarm's for the DHT and QUIC, Relay's for the relay connection).
///
/// ```
/// use std::time::Duration;
/// use pluresdb_sync_transport_auto::AutoTransport;
///
/// let transport = AutoTransport::builder()
///     .relay_url("wss://relay.example.com/relay")
///     .relay_url("wss://relay-backup.example.com/relay")
///     .bootstrap(["127.0.0.1:6881"])
///     .timeout(Duration::from_secs(10))
///     .build()?;
/// assert_eq!(transport.peer_id().len(), 64);
/// # Ok::<(), pluresdb_sync_transport_auto::AutoError>(())
/// ```
#[derive(Debug, Default)]
pub struct AutoTransportBuilder {
    relay: RelayTransportBuilder,
    relay_urls: Vec<String>,
    hyperswarm: HyperswarmTransportBuilder,
    identity: Option<Identity>,
    identity_file: Option<PathBuf>,
    timeout: Option<Duration>,
    dht: Option<bool>,
    direct: Option<bool>,
}

impl AutoTransportBuilder {
    /// A builder preset from `config` (its `relay_url` and `timeout_ms`; Auto mode always
    /// encrypts) and the DHT bootstrap nodes in `PLURESDB_SYNC_BOOTSTRAP`.
    pub fn from_config(config: &TransportConfig) -> Result<Self, AutoError> {
        config.check()?;
        let url = config.relay_url.clone().ok_or(AutoError::NoRelayUrl)?;
        let mut b = Self {
            hyperswarm: HyperswarmTransportBuilder::from_config(config),
            ..Self::default()
        };
        b = b.relay_url(url);
        if config.timeout_ms > 0 {
            b = b.timeout(config.timeout());
        }
        Ok(b)
    }

    /// Adds a relay URL (`ws://` or `wss://`); several are tried in order (failover). At
    /// least one is required. A user name in the URL is sent as the bearer token.
    pub fn relay_url(mut self, url: impl Into<String>) -> Self {
        let url = url.into();
        self.relay_urls.push(url.clone());
        self.relay = self.relay.relay_url(url);
        self
    }

    /// A bearer token for relays that require one.
    pub fn auth_token(mut self, token: impl Into<String>) -> Self {
        self.relay = self.relay.auth_token(token);
        self
    }

    /// Trusts this DER certificate as a root for `wss://` relays, besides the Web PKI roots.
    pub fn add_root_certificate(mut self, der: Vec<u8>) -> Self {
        self.relay = self.relay.add_root_certificate(der);
        self
    }

    /// Connects to relays directly, ignoring proxy environment variables.
    pub fn no_proxy(mut self) -> Self {
        self.relay = self.relay.no_proxy();
        self
    }

    /// The peer's static key (default: a new random one).
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Loads the peer's static key from a key file written by `pluresdb-sync keygen` (when
    /// [`build`](Self::build) runs). An identity given with [`identity`](Self::identity) wins.
    pub fn identity_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.identity_file = Some(path.into());
        self
    }

    /// Time limit of one operation (`announce`, `lookup`, `connect`, dialling a relay;
    /// default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// DHT bootstrap nodes as `host:port` (default: the public mainline bootstrap nodes).
    pub fn bootstrap<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.hyperswarm = self.hyperswarm.bootstrap(nodes);
        self
    }

    /// The UDP address the data socket binds (default `0.0.0.0:0`).
    pub fn bind_addr(mut self, addr: SocketAddrV4) -> Self {
        self.hyperswarm = self.hyperswarm.bind_addr(addr);
        self
    }

    /// The most peers connected at once, over all topics (default 64).
    pub fn max_peers(mut self, max: usize) -> Self {
        self.hyperswarm = self.hyperswarm.max_peers(max);
        self
    }

    /// Time limit of one QUIC + Noise handshake (default 10 s).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.hyperswarm = self.hyperswarm.handshake_timeout(timeout);
        self
    }

    /// QUIC keep-alive interval and idle timeout (defaults 3 s and 10 s).
    pub fn keep_alive(mut self, interval: Duration, idle_timeout: Duration) -> Self {
        self.hyperswarm = self.hyperswarm.keep_alive(interval, idle_timeout);
        self
    }

    /// The rest of the Hyperswarm settings (lookup interval, DHT server mode, ...), applied
    /// to the builder this one holds.
    pub fn hyperswarm(
        mut self,
        f: impl FnOnce(HyperswarmTransportBuilder) -> HyperswarmTransportBuilder,
    ) -> Self {
        self.hyperswarm = f(self.hyperswarm);
        self
    }

    /// Uses the mainline DHT as well as the relay rooms (default on). Off: peers meet only
    /// in the relay's rooms.
    pub fn dht(mut self, on: bool) -> Self {
        self.dht = Some(on);
        self
    }

    /// Uses direct UDP (default on). Off: every packet crosses the relay (tests of the
    /// relayed path; networks that block UDP).
    pub fn direct(mut self, on: bool) -> Self {
        self.direct = Some(on);
        self
    }

    /// Checks the settings and builds the transport. Nothing touches the network yet.
    pub fn build(self) -> Result<AutoTransport, AutoError> {
        if self.relay_urls.is_empty() {
            return Err(AutoError::NoRelayUrl);
        }
        let identity = match (self.identity, &self.identity_file) {
            (Some(id), _) => id,
            (None, Some(path)) => Identity::load(path)?,
            (None, None) => Identity::generate()?,
        };
        let mut relay = self.relay.identity(identity.clone());
        let mut hyperswarm = self
            .hyperswarm
            .identity(identity)
            .dht(self.dht.unwrap_or(true))
            .direct(self.direct.unwrap_or(true));
        if let Some(t) = self.timeout {
            relay = relay.timeout(t);
            hyperswarm = hyperswarm.timeout(t);
        }
        let (link, rx) = relay.build_datagram_link()?;
        let path = Arc::new(LinkPath::new(link, rx));
        let inner = hyperswarm.relay_path(path.clone()).build()?;
        Ok(AutoTransport::new(inner, path, self.relay_urls))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_url_is_required_and_checked() {
        assert_eq!(
            AutoTransportBuilder::default().build().unwrap_err(),
            AutoError::NoRelayUrl
        );
        let err = AutoTransportBuilder::default()
            .relay_url("http://relay.example")
            .build()
            .unwrap_err();
        assert!(
            matches!(
                &err,
                AutoError::Relay(RelayError::Core(Error::InvalidRelayUrl { .. }))
            ),
            "{err}"
        );
        let err = AutoTransportBuilder::default()
            .relay_url("ws://relay.example/relay")
            .bootstrap(["no-port"])
            .build()
            .unwrap_err();
        assert!(matches!(&err, AutoError::Hyperswarm(_)), "{err}");
        let t = AutoTransportBuilder::default()
            .relay_url("ws://relay.example/relay")
            .dht(false)
            .direct(false)
            .build()
            .unwrap();
        assert_eq!(t.relay_urls(), ["ws://relay.example/relay"]);
    }

    #[test]
    fn from_config_needs_a_relay_url() {
        let mut config = TransportConfig {
            mode: pluresdb_sync_core::TransportMode::Auto,
            ..TransportConfig::default()
        };
        assert!(matches!(
            AutoTransportBuilder::from_config(&config),
            Err(AutoError::Core(Error::MissingRelayUrl))
        ));
        config.relay_url = Some("ws://127.0.0.1:9/relay".into());
        config.timeout_ms = 1234;
        let b = AutoTransportBuilder::from_config(&config).unwrap();
        assert_eq!(b.timeout, Some(Duration::from_millis(1234)));
        assert_eq!(b.relay_urls, ["ws://127.0.0.1:9/relay"]);
    }
}
