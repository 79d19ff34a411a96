//! `RelayTransportBuilder`: the transport's settings, checked once, with documented defaults.
//! Its `Debug` never shows a bearer token or a password.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pluresdb_sync_core::config::{DEFAULT_TIMEOUT_MS, check_relay_url};
use pluresdb_sync_core::{Error, Identity, TransportConfig};

use super::RelayTransport;
use crate::RelayError;

/// Default silence from the relay after which the client pings it: below the relay's own
/// 45 s idle timeout, with room for a lost ping.
pub(crate) const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(20);
/// Default silence from the relay after which the client gives the socket up and reconnects:
/// three keep-alive intervals, so two lost pings are not fatal.
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The checked settings a transport runs with.
pub(crate) struct Settings {
    pub(crate) urls: Vec<url::Url>,
    pub(crate) identity: Identity,
    pub(crate) encryption: bool,
    pub(crate) timeout: Duration,
    pub(crate) keep_alive: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) auth_token: Option<String>,
    pub(crate) extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub(crate) proxy: ProxyChoice,
}

/// Which forward proxy the client tunnels through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum ProxyChoice {
    /// `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY`, minus `NO_PROXY` (the default).
    #[default]
    FromEnv,
    /// This proxy for every relay URL.
    Url(url::Url),
    /// Connect directly.
    Direct,
}

/// `url` without its user name and password (a relay token, a proxy password).
pub(crate) fn display_url(url: &url::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

/// A URL as given, whose `Debug` hides the credentials in it.
#[derive(Clone, PartialEq, Eq)]
struct UrlText(String);

impl std::fmt::Debug for UrlText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The part between "://" and the first "@" before the path is user:password.
        let s = &self.0;
        let start = s.find("://").map_or(0, |i| i + 3);
        let host_end = s[start..]
            .find(['/', '?', '#'])
            .map_or(s.len(), |i| start + i);
        match s[start..host_end].rfind('@') {
            Some(at) => write!(f, "\"{}<redacted>@{}\"", &s[..start], &s[start + at + 1..]),
            None => write!(f, "{s:?}"),
        }
    }
}

/// A secret whose `Debug` is `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Builds a [`RelayTransport`] with options beyond [`TransportConfig`].
#[derive(Debug, Default)]
pub struct RelayTransportBuilder {
    urls: Vec<UrlText>,
    identity: Option<Identity>,
    identity_file: Option<PathBuf>,
    encryption: Option<bool>,
    timeout: Option<Duration>,
    keep_alive: Option<Duration>,
    idle_timeout: Option<Duration>,
    auth_token: Option<Secret>,
    extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    proxy: Option<UrlText>,
    direct: bool,
}

impl RelayTransportBuilder {
    /// A builder preset from `config`: its `relay_url`, `timeout_ms` and `encryption`.
    pub fn from_config(config: &TransportConfig) -> Result<Self, RelayError> {
        config.validate().map_err(|e| match e.downcast::<Error>() {
            Ok(core) => RelayError::Core(core),
            Err(other) => RelayError::InvalidSetting {
                name: "config",
                value: String::new(),
                reason: other.to_string(),
            },
        })?;
        let url = config.relay_url.clone().ok_or(Error::MissingRelayUrl)?;
        Ok(Self::default()
            .relay_url(url)
            .encryption(config.encryption)
            .timeout(config.timeout()))
    }

    /// Tunnels through this HTTP proxy (`http://[user:pass@]host:port`, HTTP CONNECT) instead of
    /// the one from `HTTPS_PROXY`/`HTTP_PROXY` (which are honoured by default, with `NO_PROXY`).
    pub fn proxy(mut self, url: impl Into<String>) -> Self {
        self.proxy = Some(UrlText(url.into()));
        self
    }

    /// Connects directly, ignoring proxy environment variables.
    pub fn no_proxy(mut self) -> Self {
        self.direct = true;
        self
    }

    /// Adds a relay URL (`ws://` or `wss://`). Several URLs are tried in order.
    /// A user name in the URL (`wss://TOKEN@relay.example/relay`) is sent as the bearer token.
    pub fn relay_url(mut self, url: impl Into<String>) -> Self {
        self.urls.push(UrlText(url.into()));
        self
    }

    /// Adds several relay URLs, tried in order (failover).
    pub fn relay_urls<I: IntoIterator<Item = S>, S: Into<String>>(mut self, urls: I) -> Self {
        self.urls
            .extend(urls.into_iter().map(|u| UrlText(u.into())));
        self
    }

    /// The peer identity (default: a new random one).
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Loads the identity from a key file written by `pluresdb-sync keygen` (when `build`
    /// runs). An identity given with [`identity`](Self::identity) wins.
    pub fn identity_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.identity_file = Some(path.into());
        self
    }

    /// End-to-end encryption (default true). Both peers must agree.
    pub fn encryption(mut self, on: bool) -> Self {
        self.encryption = Some(on);
        self
    }

    /// Timeout for connecting, joining and handshakes (default
    /// [`DEFAULT_TIMEOUT_MS`](pluresdb_sync_core::config::DEFAULT_TIMEOUT_MS)).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Silence from the relay after which the client pings it (default 20 s, below the
    /// relay's own 45 s idle timeout).
    pub fn keep_alive(mut self, interval: Duration) -> Self {
        self.keep_alive = Some(interval);
        self
    }

    /// Silence from the relay after which the client gives the socket up (every session on it
    /// ends) and reconnects (default 60 s). Must be longer than [`keep_alive`](Self::keep_alive).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = Some(timeout);
        self
    }

    /// A bearer token for relays that require one (`--auth-token-file`).
    pub fn auth_token(mut self, token: impl Into<String>) -> Self {
        self.auth_token = Some(Secret(token.into()));
        self
    }

    /// Trusts this DER certificate as a root for `wss://` relays, besides the Web PKI roots.
    pub fn add_root_certificate(mut self, der: Vec<u8>) -> Self {
        self.extra_roots.push(der.into());
        self
    }

    /// Checks the settings and builds the transport. Cheap and synchronous: nothing touches
    /// the network until first use.
    pub fn build(self) -> Result<RelayTransport, RelayError> {
        Ok(RelayTransport::with_settings(Arc::new(self.settings()?)))
    }

    /// Checks the settings.
    pub(crate) fn settings(self) -> Result<Settings, RelayError> {
        if self.urls.is_empty() {
            return Err(RelayError::NoRelayUrl);
        }
        let urls = self
            .urls
            .iter()
            .map(|u| check_relay_url(&u.0))
            .collect::<Result<Vec<_>, Error>>()?;
        let identity = match (self.identity, self.identity_file) {
            (Some(id), _) => id,
            (None, Some(path)) => Identity::load(&path)?,
            (None, None) => Identity::generate()?,
        };
        let timeout = self
            .timeout
            .unwrap_or(Duration::from_millis(DEFAULT_TIMEOUT_MS));
        if timeout.is_zero() {
            return Err(Error::ZeroTimeout.into());
        }
        let keep_alive = self.keep_alive.unwrap_or(DEFAULT_KEEP_ALIVE);
        let idle_timeout = self.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
        if keep_alive.is_zero() {
            return Err(invalid("keep_alive", keep_alive, "must be greater than 0"));
        }
        if idle_timeout <= keep_alive {
            return Err(invalid(
                "idle_timeout",
                idle_timeout,
                &format!("must be longer than keep_alive ({keep_alive:?})"),
            ));
        }
        let proxy = match (self.direct, self.proxy) {
            (true, _) => ProxyChoice::Direct,
            (false, Some(p)) => {
                let parsed = url::Url::parse(&p.0)
                    .ok()
                    .filter(|u| u.scheme() == "http" && u.host_str().is_some())
                    .ok_or_else(|| RelayError::InvalidSetting {
                        name: "proxy",
                        value: format!("{p:?}"),
                        reason: "expected http://[user:pass@]host:port".into(),
                    })?;
                ProxyChoice::Url(parsed)
            }
            (false, None) => ProxyChoice::FromEnv,
        };
        Ok(Settings {
            urls,
            identity,
            encryption: self.encryption.unwrap_or(true),
            timeout,
            keep_alive,
            idle_timeout,
            auth_token: self.auth_token.map(|s| s.0),
            extra_roots: self.extra_roots,
            proxy,
        })
    }
}

fn invalid(name: &'static str, value: Duration, reason: &str) -> RelayError {
    RelayError::InvalidSetting {
        name,
        value: format!("{value:?}"),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_a_token_or_a_password() {
        let b = RelayTransportBuilder::default()
            .relay_url("wss://tok3n@relay.example/relay")
            .relay_url("ws://user:pa55@[::1]:9/relay?x=@y")
            .relay_url("ws://relay.example/relay")
            .auth_token("s3cret")
            .proxy("http://proxyuser:hunter2@proxy:3128");
        let shown = format!("{b:?}");
        for secret in ["s3cret", "tok3n", "pa55", "hunter2", "proxyuser"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("relay.example/relay"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(shown.contains("[::1]:9/relay?x=@y"), "{shown}");
    }

    #[test]
    fn the_idle_timeout_must_exceed_the_keep_alive() {
        let b = || RelayTransportBuilder::default().relay_url("ws://127.0.0.1:1/relay");
        let err = b()
            .keep_alive(Duration::from_secs(5))
            .idle_timeout(Duration::from_secs(5))
            .build()
            .unwrap_err();
        assert!(
            matches!(
                err,
                RelayError::InvalidSetting {
                    name: "idle_timeout",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("longer than keep_alive"), "{err}");
        assert!(matches!(
            b().keep_alive(Duration::ZERO).build(),
            Err(RelayError::InvalidSetting {
                name: "keep_alive",
                ..
            })
        ));
        assert!(matches!(
            b().timeout(Duration::ZERO).build(),
            Err(RelayError::Core(Error::ZeroTimeout))
        ));
        assert!(b().build().is_ok());
    }
}
