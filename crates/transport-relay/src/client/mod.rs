//! `RelayTransport`: the client side of relay mode.

mod connection;
mod driver;
mod peer;
mod proxy;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use pluresdb_sync_core::config::check_relay_url;
use pluresdb_sync_core::{
    Connection, Error, Identity, PeerInfo, TopicHash, Transport, TransportConfig,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::RelayError;
use crate::protocol::{self, Frame, RelayFrame, SUBPROTOCOL};
use driver::{Cmd, Driver};

pub use driver::{
    CLIENT_IDLE_TIMEOUT, CLIENT_PING_INTERVAL, RECONNECT_INITIAL_DELAY, RECONNECT_MAX_DELAY,
};
pub use peer::{FLOW_FRAME_OVERHEAD, FLOW_WINDOW_BYTES, SESSION_VERSION};

/// The largest frame the client accepts from a relay (the relay's own limit is announced in
/// WELCOME and is usually 64 KiB; this only bounds what a hostile relay can make us read).
pub const CLIENT_MAX_FRAME_BYTES: usize = crate::protocol::MAX_MAX_FRAME_BYTES;

#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) urls: Vec<url::Url>,
    pub(crate) identity: Identity,
    pub(crate) encryption: bool,
    pub(crate) timeout: Duration,
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

struct Link {
    cmds: mpsc::Sender<Cmd>,
    task: JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Slot {
    Idle,
    Up(Link),
    Disconnected,
}

/// The relay transport: peers meet in a room on a WebSocket relay, and talk over end-to-end
/// encrypted (Noise XXpsk3) sessions carried through it. See the [crate docs](crate).
pub struct RelayTransport {
    settings: Arc<Settings>,
    slot: tokio::sync::Mutex<Slot>,
    errors: Arc<Mutex<VecDeque<String>>>,
}

impl std::fmt::Debug for RelayTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayTransport")
            .field("peer_id", &self.settings.identity.peer_id())
            .field("relays", &self.settings.urls.len())
            .field("encryption", &self.settings.encryption)
            .finish_non_exhaustive()
    }
}

/// Builds a [`RelayTransport`] with options beyond [`TransportConfig`].
#[derive(Debug, Default)]
pub struct RelayTransportBuilder {
    urls: Vec<String>,
    identity: Option<Identity>,
    identity_file: Option<PathBuf>,
    encryption: Option<bool>,
    timeout: Option<Duration>,
    auth_token: Option<String>,
    extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    proxy: Option<String>,
    direct: bool,
}

impl RelayTransportBuilder {
    /// Tunnels through this HTTP proxy (`http://[user:pass@]host:port`, HTTP CONNECT) instead of
    /// the one from `HTTPS_PROXY`/`HTTP_PROXY` (which are honoured by default, with `NO_PROXY`).
    pub fn proxy(mut self, url: impl Into<String>) -> Self {
        self.proxy = Some(url.into());
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
        self.urls.push(url.into());
        self
    }

    /// Adds several relay URLs, tried in order (failover).
    pub fn relay_urls<I: IntoIterator<Item = S>, S: Into<String>>(mut self, urls: I) -> Self {
        self.urls.extend(urls.into_iter().map(Into::into));
        self
    }

    /// The peer identity (default: a new random one).
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Loads the identity from a key file written by `pluresdb-sync keygen`.
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

    /// A bearer token for relays that require one (`--auth-token-file`).
    pub fn auth_token(mut self, token: impl Into<String>) -> Self {
        self.auth_token = Some(token.into());
        self
    }

    /// Trusts this DER certificate as a root for `wss://` relays, besides the Web PKI roots.
    pub fn add_root_certificate(mut self, der: Vec<u8>) -> Self {
        self.extra_roots.push(der.into());
        self
    }

    /// The transport. Cheap and synchronous: nothing touches the network until first use.
    pub fn build(self) -> Result<RelayTransport, anyhow::Error> {
        if self.urls.is_empty() {
            return Err(RelayError::NoRelayUrl.into());
        }
        let urls = self
            .urls
            .iter()
            .map(|u| check_relay_url(u))
            .collect::<Result<Vec<_>, Error>>()?;
        let identity = match (self.identity, self.identity_file) {
            (Some(id), _) => id,
            (None, Some(path)) => Identity::load(&path)?,
            (None, None) => Identity::generate()?,
        };
        let timeout = self.timeout.unwrap_or(Duration::from_millis(
            pluresdb_sync_core::config::DEFAULT_TIMEOUT_MS,
        ));
        if timeout.is_zero() {
            return Err(Error::ZeroTimeout.into());
        }
        let proxy = match (self.direct, self.proxy) {
            (true, _) => ProxyChoice::Direct,
            (false, Some(p)) => {
                let parsed = url::Url::parse(&p)
                    .ok()
                    .filter(|u| u.scheme() == "http" && u.host_str().is_some())
                    .ok_or_else(|| RelayError::InvalidSetting {
                        name: "proxy",
                        value: p.clone(),
                        reason: "expected http://[user:pass@]host:port".into(),
                    })?;
                ProxyChoice::Url(parsed)
            }
            (false, None) => ProxyChoice::FromEnv,
        };
        Ok(RelayTransport {
            settings: Arc::new(Settings {
                urls,
                identity,
                encryption: self.encryption.unwrap_or(true),
                timeout,
                auth_token: self.auth_token,
                extra_roots: self.extra_roots,
                proxy,
            }),
            slot: tokio::sync::Mutex::new(Slot::Idle),
            errors: Arc::default(),
        })
    }
}

impl RelayTransport {
    /// A builder for identity, several relay URLs, an auth token and more.
    pub fn builder() -> RelayTransportBuilder {
        RelayTransportBuilder::default()
    }

    /// The transport `config` describes (its `relay_url`, `timeout_ms` and `encryption`), with
    /// a new random identity. Cheap and synchronous.
    pub fn from_config(config: &TransportConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let url = config.relay_url.clone().ok_or(Error::MissingRelayUrl)?;
        Self::builder()
            .relay_url(url)
            .encryption(config.encryption)
            .timeout(config.timeout())
            .build()
    }

    /// This transport's peer id (the hex of its Noise static public key).
    pub fn peer_id(&self) -> String {
        self.settings.identity.peer_id()
    }

    /// The most recent session and relay errors (handshake failures, encryption mismatches,
    /// refused requests), oldest first; at most 32 are kept.
    pub fn recent_errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    async fn cmds(&self) -> anyhow::Result<mpsc::Sender<Cmd>> {
        let mut slot = self.slot.lock().await;
        if let Slot::Up(link) = &*slot
            && !link.task.is_finished()
        {
            return Ok(link.cmds.clone());
        }
        if matches!(*slot, Slot::Disconnected) {
            return Err(Error::TransportDisconnected { transport: "relay" }.into());
        }
        let link = open_link(&self.settings, &self.errors).await?;
        let cmds = link.cmds.clone();
        *slot = Slot::Up(link);
        Ok(cmds)
    }

    async fn join(
        &self,
        topic: TopicHash,
        conns: Option<mpsc::Sender<Box<dyn Connection>>>,
    ) -> anyhow::Result<()> {
        let cmds = self.cmds().await?;
        let (done, wait) = oneshot::channel();
        cmds.send(Cmd::Join { topic, conns, done })
            .await
            .map_err(|_| Error::TransportDisconnected { transport: "relay" })?;
        match tokio::time::timeout(self.settings.timeout, wait).await {
            Ok(Ok(r)) => Ok(r?),
            Ok(Err(_)) => Err(Error::TransportDisconnected { transport: "relay" }.into()),
            Err(_) => Err(Error::Timeout {
                what: "joining the relay room".into(),
                ms: self.settings.timeout.as_millis() as u64,
            }
            .into()),
        }
    }
}

#[async_trait]
impl Transport for RelayTransport {
    async fn connect(
        &mut self,
        topic: TopicHash,
    ) -> anyhow::Result<mpsc::Receiver<Box<dyn Connection>>> {
        let (tx, rx) = mpsc::channel(driver::CONNECTION_QUEUE);
        self.join(topic, Some(tx)).await?;
        Ok(rx)
    }

    async fn announce(&mut self, topic: TopicHash) -> anyhow::Result<()> {
        self.join(topic, None).await
    }

    async fn lookup(&self, topic: TopicHash) -> anyhow::Result<Vec<PeerInfo>> {
        let cmds = self.cmds().await?;
        let (reply, wait) = oneshot::channel();
        cmds.send(Cmd::Lookup { topic, reply })
            .await
            .map_err(|_| Error::TransportDisconnected { transport: "relay" })?;
        match tokio::time::timeout(self.settings.timeout, wait).await {
            Ok(Ok(peers)) => Ok(peers),
            Ok(Err(_)) => Err(Error::TransportDisconnected { transport: "relay" }.into()),
            Err(_) => Err(Error::Timeout {
                what: "relay lookup".into(),
                ms: self.settings.timeout.as_millis() as u64,
            }
            .into()),
        }
    }

    async fn disconnect(&mut self) -> anyhow::Result<()> {
        let mut slot = self.slot.lock().await;
        if let Slot::Up(link) = std::mem::replace(&mut *slot, Slot::Disconnected) {
            let (done, wait) = oneshot::channel();
            if link.cmds.send(Cmd::Disconnect { done }).await.is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
            }
        }
        Ok(())
    }

    fn name(&self) -> &str {
        "relay"
    }
}

/// Connects to the first relay that answers and starts the task that owns the link.
async fn open_link(
    settings: &Arc<Settings>,
    errors: &Arc<Mutex<VecDeque<String>>>,
) -> anyhow::Result<Link> {
    let socket = connect_any(settings, 0).await?;
    let (cmds, cmd_rx) = mpsc::channel(64);
    let driver = Driver::new(settings.clone(), errors.clone());
    let task = tokio::spawn(driver.supervise(socket, cmd_rx));
    Ok(Link { cmds, task })
}

/// Tries every relay URL once, starting at index `start` (wrapping), each within the timeout.
pub(crate) async fn connect_any(
    settings: &Settings,
    start: usize,
) -> Result<driver::Socket, RelayError> {
    let n = settings.urls.len();
    let mut last = None;
    for i in 0..n {
        let index = (start + i) % n;
        let url = &settings.urls[index];
        match tokio::time::timeout(settings.timeout, connect_one(settings, url)).await {
            Ok(Ok((ws, me, max_frame))) => {
                return Ok(driver::Socket {
                    ws,
                    me,
                    max_frame,
                    url_index: index,
                    url: display_url(url),
                });
            }
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(RelayError::Connect {
                    url: display_url(url),
                    reason: format!("timed out after {} ms", settings.timeout.as_millis()),
                })
            }
        }
    }
    Err(last.unwrap_or(RelayError::NoRelayUrl))
}

fn display_url(url: &url::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

async fn connect_one(
    settings: &Settings,
    url: &url::Url,
) -> Result<(driver::WsStream, u64, usize), RelayError> {
    let shown = display_url(url);
    let fail = |reason: String| RelayError::Connect {
        url: shown.clone(),
        reason,
    };
    let token = settings
        .auth_token
        .clone()
        .or_else(|| (!url.username().is_empty()).then(|| percent_decode(url.username())));
    let mut req = shown
        .as_str()
        .into_client_request()
        .map_err(|e| fail(e.to_string()))?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        tokio_tungstenite::tungstenite::http::HeaderValue::from_static(SUBPROTOCOL),
    );
    if let Some(t) = token {
        let value = format!("Bearer {t}")
            .parse()
            .map_err(|_| fail("the auth token is not a valid header value".into()))?;
        req.headers_mut().insert("Authorization", value);
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(CLIENT_MAX_FRAME_BYTES))
        .max_frame_size(Some(CLIENT_MAX_FRAME_BYTES));
    let connector = if url.scheme() == "wss" {
        Some(tls_connector(&settings.extra_roots).map_err(&fail)?)
    } else {
        None
    };
    let proxy = match &settings.proxy {
        ProxyChoice::Direct => None,
        ProxyChoice::Url(p) => Some(p.clone()),
        ProxyChoice::FromEnv => proxy::proxy_from_env(url, |k| std::env::var(k).ok()),
    };
    let handshake = match proxy {
        None => {
            tokio_tungstenite::connect_async_tls_with_config(req, Some(config), true, connector)
                .await
        }
        Some(p) => {
            let host = url.host_str().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = url.port_or_known_default().unwrap_or(443);
            let tunnel = proxy::connect_via(&p, host, port)
                .await
                .map_err(|e| fail(format!("via proxy {}: {e}", display_url(&p))))?;
            tokio_tungstenite::client_async_tls_with_config(req, tunnel, Some(config), connector)
                .await
        }
    };
    let (mut ws, resp) = handshake.map_err(|e| match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => fail(format!(
            "HTTP {}: {}",
            resp.status(),
            resp.body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(&b[..b.len().min(200)])
                    .trim()
                    .to_owned())
                .unwrap_or_default()
        )),
        other => fail(other.to_string()),
    })?;
    let chosen = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok());
    if chosen != Some(SUBPROTOCOL) {
        return Err(fail(format!(
            "the server did not select the {SUBPROTOCOL} subprotocol (got {chosen:?}); is it a pluresdb-sync relay?"
        )));
    }
    loop {
        let Some(msg) = ws.next().await else {
            return Err(fail("closed before WELCOME".into()));
        };
        match msg.map_err(|e| fail(e.to_string()))? {
            Message::Binary(b) => match protocol::decode(&b) {
                Ok(Frame::Relay(RelayFrame::Welcome {
                    conn, max_frame, ..
                })) => {
                    let max_frame = max_frame as usize;
                    if !(crate::protocol::MIN_MAX_FRAME_BYTES..=CLIENT_MAX_FRAME_BYTES)
                        .contains(&max_frame)
                    {
                        return Err(fail(format!(
                            "relay announced an unusable frame limit {max_frame}"
                        )));
                    }
                    return Ok((ws, conn, max_frame));
                }
                other => return Err(fail(format!("expected WELCOME, got {other:?}"))),
            },
            Message::Close(c) => {
                return Err(fail(format!(
                    "closed before WELCOME: {}",
                    c.map(|c| c.reason.to_string()).unwrap_or_default()
                )));
            }
            _ => {}
        }
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("t={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn tls_connector(
    extra: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<tokio_tungstenite::Connector, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra {
        roots
            .add(cert.clone())
            .map_err(|e| format!("bad root certificate: {e}"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_tungstenite::Connector::Rustls(Arc::new(config)))
}
