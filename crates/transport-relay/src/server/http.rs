//! One HTTP/1.1 request per connection, served by hyper: the relay's head limits, what it
//! reads from a request head, and the hand-over of the stream after a `101`.
//!
//! hyper parses the head (and answers `400`/`431` itself when it cannot); the relay's own
//! checks run on the parsed request and answer everything else with a clear status. Header
//! values are raw bytes (HTTP allows obs-text, so they need not be UTF-8): they are compared
//! and split as bytes and never sliced as strings, and the lints below keep any index or
//! string slice from coming back.
#![deny(clippy::indexing_slicing, clippy::string_slice)]

use std::convert::Infallible;
use std::future::ready;
use std::sync::Mutex;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{
    AUTHORIZATION, CONNECTION, CONTENT_TYPE, HeaderValue, SEC_WEBSOCKET_PROTOCOL, UPGRADE,
};
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::handshake::server::create_response_with_body;

/// The largest request head the relay reads: browsers and proxies send well under 8 KiB.
/// hyper answers a longer one with `431`.
pub(crate) const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most header lines the relay takes (more get `400`); hyper's own cap (100, then `431`)
/// stays above it.
pub(crate) const MAX_HEADERS: usize = 64;
/// The authentication scheme the relay reads (compared without regard to case, RFC 7235).
const BEARER: &[u8] = b"bearer";

/// A response with a plain-text body.
pub(crate) type Answer = Response<String>;

/// A plain-text response: `status`, `body`, and `headers` (name, value) added.
pub(crate) fn text(status: StatusCode, headers: &[(&'static str, &str)], body: String) -> Answer {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(*name, v);
        }
    }
    resp
}

/// What the relay needs from a request head.
#[derive(Debug, Default)]
pub(crate) struct Head {
    /// An `Upgrade` header lists `websocket`. When set, the head has also passed every check
    /// of the WebSocket handshake, and `accept` is its `101` response.
    pub(crate) upgrade_websocket: bool,
    pub(crate) subprotocols: Vec<String>,
    /// The token of an `Authorization: Bearer <token>` header; `None` when there is none, the
    /// scheme is another one, or the token is not UTF-8 (so it cannot match a configured one).
    pub(crate) bearer: Option<String>,
    /// The `101 Switching Protocols` response of a WebSocket upgrade (without a subprotocol).
    pub(crate) accept: Option<Response<()>>,
}

/// Reads what the relay needs from `req`; `Err` is the reason for a `400`. Pure: unit and
/// property tests drive it with arbitrary header bytes.
pub(crate) fn read_head<B>(req: &Request<B>) -> Result<Head, String> {
    let headers = req.headers();
    if headers.len() > MAX_HEADERS {
        return Err(format!(
            "{} header lines; at most {MAX_HEADERS}",
            headers.len()
        ));
    }
    let mut head = Head {
        upgrade_websocket: headers
            .get_all(UPGRADE)
            .iter()
            .any(|h| list_items(h.as_bytes()).any(|v| v.eq_ignore_ascii_case(b"websocket"))),
        subprotocols: headers
            .get_all(SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .flat_map(|h| list_items(h.as_bytes()))
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect(),
        ..Head::default()
    };
    let mut authorizations = headers.get_all(AUTHORIZATION).iter();
    head.bearer = authorizations
        .next()
        .and_then(|h| bearer_token(h.as_bytes()));
    let more = authorizations.count();
    if more > 0 {
        // Which one counts would depend on who reads it (a proxy in front may check another).
        return Err(format!("{} Authorization headers; send one", more + 1));
    }
    if head.upgrade_websocket {
        // The checks of tungstenite's server handshake (method GET, HTTP/1.1, `Connection:
        // Upgrade`, exactly `Upgrade: websocket`, `Sec-WebSocket-Version: 13`, a valid
        // `Sec-WebSocket-Key`), which also derives the accept key.
        let accept = create_response_with_body(req, || ()).map_err(|e| e.to_string())?;
        head.accept = Some(accept);
    }
    Ok(head)
}

/// The non-empty items of a comma-separated header value, without surrounding whitespace.
fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|v| !v.is_empty())
}

/// The token of a `Bearer` credential (`Bearer` SP token, RFC 6750).
fn bearer_token(value: &[u8]) -> Option<String> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at_checked(BEARER.len())?;
    if !scheme.eq_ignore_ascii_case(BEARER)
        || !rest.first().is_some_and(|&b| b == b' ' || b == b'\t')
    {
        return None;
    }
    let token = rest.trim_ascii();
    if token.is_empty() {
        return None;
    }
    std::str::from_utf8(token).ok().map(str::to_owned)
}

/// How serving one request ended.
#[derive(Debug)]
pub(crate) enum Served<S> {
    /// A response other than `101` was sent and the connection closed.
    Answered,
    /// hyper refused the head itself (malformed: `400`; over [`MAX_HEAD_BYTES`]: `431`).
    Refused(hyper::Error),
    /// The client went away or the socket failed before a response was sent.
    Gone,
    /// `101` was sent: the stream, and the bytes the client sent after the head (WebSocket
    /// frames it did not wait to send).
    Upgraded(S, Bytes),
}

/// Serves the first request on `stream` with `answer`, and no other (`Connection: close`). When
/// the answer is `101`, hands the stream back. No timeout here: the caller bounds the whole
/// call.
pub(crate) async fn serve<S, F>(stream: S, answer: F) -> Served<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(&Request<Incoming>) -> Answer + Send + Sync,
{
    let upgrade: Mutex<Option<OnUpgrade>> = Mutex::new(None);
    let service = hyper::service::service_fn(|mut req: Request<Incoming>| {
        let mut resp = answer(&req);
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            *upgrade.lock().unwrap_or_else(|p| p.into_inner()) = Some(hyper::upgrade::on(&mut req));
        } else {
            // One request per connection. (Not `keep_alive(false)`: that would also turn the
            // 101's `Connection: Upgrade` into `close`.)
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        ready(Ok::<_, Infallible>(resp))
    });
    let served = hyper::server::conn::http1::Builder::new()
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES)
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    let pending = upgrade.lock().unwrap_or_else(|p| p.into_inner()).take();
    match served {
        Err(e) if e.is_parse() || e.is_parse_too_large() => return Served::Refused(e),
        Err(_) => return Served::Gone,
        Ok(()) => {}
    }
    let Some(pending) = pending else {
        return Served::Answered;
    };
    match pending.await.map(|u| u.downcast::<TokioIo<S>>()) {
        Ok(Ok(parts)) => Served::Upgraded(parts.io.into_inner(), parts.read_buf),
        // The stream type is the one passed in, so the downcast cannot fail.
        Ok(Err(_)) | Err(_) => Served::Gone,
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests;
