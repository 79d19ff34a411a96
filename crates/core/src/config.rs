//! Transport configuration.

use serde::{Deserialize, Serialize};

use crate::Error;

/// The default for [`TransportConfig::timeout_ms`]: 30 s, long enough for a DHT lookup on a
/// slow network, short enough that a dead relay is noticed.
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;

/// Which transport to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportMode {
    /// Direct peer-to-peer: DHT discovery, UDP hole punching, Noise XX streams.
    #[default]
    Hyperswarm,
    /// Through a WebSocket relay (port 443), end-to-end encrypted.
    Relay,
    /// No network: every operation is a no-op.
    Disabled,
    /// Hyperswarm's DHT discovery and direct QUIC paths, with a relay (`relay_url`) as one
    /// more discovery source and path: every pair connects, over the relay when no direct
    /// path exists. Recommended for applications.
    Auto,
}

impl TransportMode {
    /// The mode as spelled in configuration files and transport names.
    pub const fn as_str(self) -> &'static str {
        match self {
            TransportMode::Hyperswarm => "hyperswarm",
            TransportMode::Relay => "relay",
            TransportMode::Disabled => "disabled",
            TransportMode::Auto => "auto",
        }
    }
}

impl std::fmt::Display for TransportMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TransportMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "hyperswarm" => Ok(TransportMode::Hyperswarm),
            "relay" => Ok(TransportMode::Relay),
            "disabled" => Ok(TransportMode::Disabled),
            "auto" => Ok(TransportMode::Auto),
            other => Err(format!(
                "unknown transport mode {other:?} (expected hyperswarm, relay, auto or disabled)"
            )),
        }
    }
}

/// How to build a transport (see `pluresdb_sync::create_transport`).
///
/// Richer knobs (bootstrap nodes, identity keys, limits) live on each transport's builder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TransportConfig {
    /// Which transport (default Hyperswarm).
    pub mode: TransportMode,
    /// The relay's `ws://` or `wss://` URL; required in relay and auto modes.
    pub relay_url: Option<String>,
    /// Timeout for network operations, in milliseconds (default 30000; must be > 0).
    pub timeout_ms: u64,
    /// End-to-end encryption of payloads (default true).
    pub encryption: bool,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            mode: TransportMode::default(),
            relay_url: None,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            encryption: true,
        }
    }
}

impl TransportConfig {
    /// Checks the configuration: relay and auto modes need a `ws://` or `wss://` URL with a host, and
    /// `timeout_ms` must be > 0. Errors are [`Error`] values inside the `anyhow::Error`.
    ///
    /// ```
    /// use pluresdb_sync_core::{TransportConfig, TransportMode};
    ///
    /// let config = TransportConfig { mode: TransportMode::Relay, ..Default::default() };
    /// let err = config.validate().unwrap_err();
    /// assert!(err.to_string().contains("relay_url"));
    /// ```
    pub fn validate(&self) -> anyhow::Result<()> {
        self.check().map_err(anyhow::Error::from)
    }

    /// [`TransportConfig::validate`] with the typed error.
    pub fn check(&self) -> Result<(), Error> {
        if self.timeout_ms == 0 {
            return Err(Error::ZeroTimeout);
        }
        if matches!(self.mode, TransportMode::Relay | TransportMode::Auto) {
            let url = self.relay_url.as_deref().ok_or(Error::MissingRelayUrl)?;
            check_relay_url(url)?;
        }
        Ok(())
    }

    /// `timeout_ms` as a [`std::time::Duration`].
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms)
    }
}

/// Checks that `url` is a `ws://` or `wss://` URL with a host.
pub fn check_relay_url(url: &str) -> Result<url::Url, Error> {
    let invalid = |reason: String| Error::InvalidRelayUrl {
        url: url.to_owned(),
        reason,
    };
    let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    if !matches!(parsed.scheme(), "ws" | "wss") {
        return Err(invalid(format!(
            "scheme {:?} is not ws or wss",
            parsed.scheme()
        )));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("it has no host".into()));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_spec() {
        let c = TransportConfig::default();
        assert_eq!(c.mode, TransportMode::Hyperswarm);
        assert_eq!(c.relay_url, None);
        assert_eq!(c.timeout_ms, 30_000);
        assert!(c.encryption);
        c.validate().unwrap();
    }

    #[test]
    fn validation_errors_name_the_value() {
        let zero = TransportConfig {
            timeout_ms: 0,
            ..Default::default()
        };
        assert!(matches!(zero.check(), Err(Error::ZeroTimeout)));

        let relay = |url: Option<&str>| TransportConfig {
            mode: TransportMode::Relay,
            relay_url: url.map(str::to_owned),
            ..Default::default()
        };
        assert!(matches!(relay(None).check(), Err(Error::MissingRelayUrl)));
        for bad in [
            "https://relay.example.com",
            "relay.example.com",
            "ws://",
            "wss://:443",
            "",
        ] {
            let err = relay(Some(bad)).validate().unwrap_err();
            assert!(
                matches!(
                    err.downcast_ref::<Error>(),
                    Some(Error::InvalidRelayUrl { .. })
                ),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        for good in [
            "wss://relay.example.com",
            "ws://127.0.0.1:8080/relay",
            "wss://[::1]:443",
        ] {
            relay(Some(good)).validate().unwrap();
        }
        // Modes other than relay ignore relay_url.
        let disabled = TransportConfig {
            mode: TransportMode::Disabled,
            relay_url: Some("nonsense".into()),
            ..Default::default()
        };
        disabled.validate().unwrap();
    }

    #[test]
    fn serde_spelling() {
        let c = TransportConfig {
            mode: TransportMode::Relay,
            relay_url: Some("wss://r.example".into()),
            timeout_ms: 5,
            encryption: false,
        };
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("\"relay\""), "{json}");
        assert_eq!(serde_json::from_str::<TransportConfig>(&json).unwrap(), c);
        let partial: TransportConfig = serde_json::from_str(r#"{"mode":"disabled"}"#).unwrap();
        assert_eq!(partial.mode, TransportMode::Disabled);
        assert_eq!(partial.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert!(serde_json::from_str::<TransportConfig>(r#"{"mode":"carrier-pigeon"}"#).is_err());
    }

    #[test]
    fn mode_parsing() {
        assert_eq!(
            "Relay".parse::<TransportMode>().unwrap(),
            TransportMode::Relay
        );
        let err = "tcp".parse::<TransportMode>().unwrap_err();
        assert!(err.contains("\"tcp\""));
        for mode in [
            TransportMode::Hyperswarm,
            TransportMode::Relay,
            TransportMode::Disabled,
            TransportMode::Auto,
        ] {
            assert_eq!(mode.to_string().parse::<TransportMode>().unwrap(), mode);
        }
        assert_eq!("AUTO".parse::<TransportMode>(), Ok(TransportMode::Auto));
        assert_eq!(TransportMode::Auto.as_str(), "auto");
        assert!(err.contains("auto"), "{err}");
    }

    #[test]
    fn auto_mode_needs_a_relay_url_and_spells_auto() {
        let auto = |url: Option<&str>| TransportConfig {
            mode: TransportMode::Auto,
            relay_url: url.map(str::to_owned),
            ..Default::default()
        };
        assert!(matches!(auto(None).check(), Err(Error::MissingRelayUrl)));
        assert!(matches!(
            auto(Some("https://r.example")).check(),
            Err(Error::InvalidRelayUrl { .. })
        ));
        auto(Some("wss://r.example/relay")).validate().unwrap();
        let json = serde_json::to_string(&auto(Some("wss://r.example"))).unwrap();
        assert!(json.contains("\"mode\":\"auto\""), "{json}");
        let back: TransportConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.mode, TransportMode::Auto);
    }
}
