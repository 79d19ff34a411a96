//! Dialling a relay: the TCP (or proxy tunnel), TLS and WebSocket upgrade with the relay
//! subprotocol and bearer token, up to the WELCOME; URLs tried in order (failover).

use std::sync::Arc;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::builder::{ProxyChoice, Settings, display_url};
use super::proxy;
use crate::RelayError;
use crate::protocol::{self, ConnId, Frame, RelayFrame, SUBPROTOCOL};

/// The largest frame the client accepts from a relay (the relay's own limit is announced in
/// WELCOME and is usually 64 KiB; this only bounds what a hostile relay can make us read).
pub(crate) const CLIENT_MAX_FRAME_BYTES: usize = protocol::MAX_MAX_FRAME_BYTES;

pub(crate) type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A connected relay socket, after its WELCOME.
pub(crate) struct Socket {
    pub(crate) ws: WsStream,
    /// Our relay connection id.
    pub(crate) me: ConnId,
    /// The relay's frame limit.
    pub(crate) max_frame: usize,
    /// Which of the settings' URLs answered.
    pub(crate) url_index: usize,
    /// That URL, without credentials.
    pub(crate) url: String,
}

/// Tries every relay URL once, starting at index `start` (wrapping), each within the timeout.
pub(crate) async fn connect_any(settings: &Settings, start: usize) -> Result<Socket, RelayError> {
    connect_any_with(settings, start, SUBPROTOCOL).await
}

/// [`connect_any`] offering the subprotocol `protocol` (and requiring the relay to select it).
pub(crate) async fn connect_any_with(
    settings: &Settings,
    start: usize,
    protocol: &'static str,
) -> Result<Socket, RelayError> {
    let n = settings.urls.len();
    let mut last = None;
    for i in 0..n {
        let index = (start + i) % n;
        let url = &settings.urls[index];
        match tokio::time::timeout(settings.timeout, connect_one(settings, url, protocol)).await {
            Ok(Ok((ws, me, max_frame))) => {
                return Ok(Socket {
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

async fn connect_one(
    settings: &Settings,
    url: &url::Url,
    protocol: &'static str,
) -> Result<(WsStream, u64, usize), RelayError> {
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
        tokio_tungstenite::tungstenite::http::HeaderValue::from_static(protocol),
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
    if chosen != Some(protocol) {
        return Err(fail(format!(
            "the server did not select the {protocol} subprotocol (got {chosen:?}); is it a pluresdb-sync relay (one that speaks {protocol})?"
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
                    if !(protocol::MIN_MAX_FRAME_BYTES..=CLIENT_MAX_FRAME_BYTES)
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
