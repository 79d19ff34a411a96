//! The HTTP request head before a WebSocket upgrade, read by hand so the relay can answer
//! `/healthz`, plain HTTP and bad upgrades with a clear status instead of a dropped socket.
//!
//! Everything here handles bytes from anyone who can open a TCP connection, before any
//! authentication. Header values are raw bytes (HTTP allows obs-text, so they need not be
//! UTF-8): they are compared and split as bytes and never sliced as strings, and the lints
//! below keep any index or string slice from coming back.
#![deny(clippy::indexing_slicing, clippy::string_slice)]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::machine::TryParse;
use tokio_tungstenite::tungstenite::handshake::server::{Request, create_response};

/// The largest request head the relay reads: browsers and proxies send well under 8 KiB.
pub(crate) const MAX_HEAD_BYTES: usize = 8 * 1024;
const MAX_HEADERS: usize = 64;
/// The authentication scheme the relay reads (compared without regard to case, RFC 7235).
const BEARER: &[u8] = b"bearer";

/// What the relay needs from a request head.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) method: String,
    pub(crate) path: String,
    /// An `Upgrade` header lists `websocket`. When set, the head has also passed every check
    /// the WebSocket handshake makes (see [`check_upgrade`]).
    pub(crate) upgrade_websocket: bool,
    pub(crate) subprotocols: Vec<String>,
    /// The token of an `Authorization: Bearer <token>` header; `None` when there is none, the
    /// scheme is another one, or the token is not UTF-8 (so it cannot match a configured one).
    pub(crate) bearer: Option<String>,
}

#[derive(Debug)]
pub(crate) enum HeadError {
    TooLarge,
    Malformed(String),
    Io,
    Eof,
}

/// Parses a complete head from `buf` (everything read so far); `Ok(None)` when more bytes are
/// needed. Pure: the fuzz target and property tests drive it with arbitrary bytes.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    if len > MAX_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    let mut head = Head {
        method: req.method.unwrap_or_default().to_owned(),
        path: req.path.unwrap_or_default().to_owned(),
        ..Head::default()
    };
    let mut authorizations = 0;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("upgrade") {
            head.upgrade_websocket |=
                list_items(h.value).any(|v| v.eq_ignore_ascii_case(b"websocket"));
        } else if h.name.eq_ignore_ascii_case("sec-websocket-protocol") {
            head.subprotocols
                .extend(list_items(h.value).map(|v| String::from_utf8_lossy(v).into_owned()));
        } else if h.name.eq_ignore_ascii_case("authorization") {
            authorizations += 1;
            head.bearer = bearer_token(h.value);
        }
    }
    if authorizations > 1 {
        // Which one counts would depend on who reads it (a proxy in front may check another).
        return Err(HeadError::Malformed(format!(
            "{authorizations} Authorization headers; send one"
        )));
    }
    if head.upgrade_websocket {
        let rest = buf.get(len..).unwrap_or_default();
        check_upgrade(buf.get(..len).unwrap_or_default(), rest)?;
    }
    Ok(Some((head, len)))
}

/// A WebSocket upgrade must pass the checks the handshake after this one makes (method GET,
/// HTTP/1.1, `Connection: Upgrade`, `Upgrade: websocket`, `Sec-WebSocket-Version: 13`, a
/// valid `Sec-WebSocket-Key`, a parseable path) and the client must wait for the response
/// before sending more: the handshake runs these checks itself, but fails them by dropping
/// the socket, so they are run here first to answer 400 with the reason.
fn check_upgrade(head: &[u8], rest: &[u8]) -> Result<(), HeadError> {
    let request = match Request::try_parse(head) {
        Ok(Some((_, request))) => request,
        Ok(None) => return Err(HeadError::Malformed("incomplete request head".into())),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    create_response(&request).map_err(|e| HeadError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(HeadError::Malformed(format!(
            "{} bytes after the upgrade request: a WebSocket client waits for the response",
            rest.len()
        )));
    }
    Ok(())
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

/// Reads until a complete head (or an error). Returns the head and every byte read.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(Head, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Eof);
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if let Some((head, _)) = parse_head(&buf)? {
            return Ok((head, buf));
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
    }
}

/// Writes a short plain-text response and shuts the write side.
pub(crate) async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: &str,
    extra_headers: &str,
    body: &str,
) {
    let text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(text.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A stream that first replays bytes already read (the request head) and then reads on.
#[derive(Debug)]
pub(crate) struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.pos);
            buf.put_slice(this.prefix.get(this.pos..this.pos + n).unwrap_or_default());
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio_tungstenite::tungstenite;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn upgrade_with(extra: &[u8]) -> Vec<u8> {
        let mut req = format!(
            "GET /relay HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\
             Sec-WebSocket-Protocol: pluresdb-relay.v1\r\n"
        )
        .into_bytes();
        req.extend_from_slice(extra);
        req.extend_from_slice(b"\r\n");
        req
    }

    fn malformed(buf: &[u8]) -> String {
        match parse_head(buf) {
            Err(HeadError::Malformed(reason)) => reason,
            other => panic!(
                "{:?}: expected Malformed, got {other:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }

    /// Runs tungstenite's server handshake (what the relay runs after this parser) over `buf`.
    fn tungstenite_accepts(buf: &[u8]) -> bool {
        struct Duplex(std::io::Cursor<Vec<u8>>, Vec<u8>);
        impl std::io::Read for Duplex {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                std::io::Read::read(&mut self.0, b)
            }
        }
        impl std::io::Write for Duplex {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                std::io::Write::write(&mut self.1, b)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        tungstenite::accept(Duplex(std::io::Cursor::new(buf.to_vec()), Vec::new())).is_ok()
    }

    #[test]
    fn parses_an_upgrade() {
        let req =
            upgrade_with(b"Authorization: Bearer abc \r\nSec-WebSocket-Protocol: foo, ,x\r\n");
        let (head, len) = parse_head(&req).unwrap().unwrap();
        assert_eq!(len, req.len());
        assert_eq!(head.method, "GET");
        assert_eq!(head.path, "/relay");
        assert!(head.upgrade_websocket);
        assert_eq!(head.subprotocols, vec!["pluresdb-relay.v1", "foo", "x"]);
        assert_eq!(head.bearer.as_deref(), Some("abc"));
        assert!(tungstenite_accepts(&req));
        assert!(parse_head(b"GET / HTTP/1.1\r\nHost").unwrap().is_none());
        assert!(matches!(
            parse_head(b"\x00\x01\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn bearer_tokens_are_read_as_bytes() {
        // The issue-10 panic: "Bearer" then a two-byte character, sliced at byte 7 before.
        for (value, token) in [
            (&b"Bearer\xc3\xa9x"[..], None),
            (b"Bearer \xc3\xa9x", Some("\u{e9}x")),
            (b"bearer   tok  ", Some("tok")),
            (b"BEARER\ttok", Some("tok")),
            (b"Bearer", None),
            (b"Bearer ", None),
            (b"Bearertok", None),
            (b"Basic dXNlcjpwYXNz", None),
            (b"Bearer \xff\xfe", None),
            (b"\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9", None),
            (b"", None),
        ] {
            let mut req = b"GET / HTTP/1.1\r\nAuthorization: ".to_vec();
            req.extend_from_slice(value);
            req.extend_from_slice(b"\r\n\r\n");
            let (head, _) = parse_head(&req).unwrap().unwrap();
            assert_eq!(
                head.bearer.as_deref(),
                token,
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
        let two = malformed(
            b"GET / HTTP/1.1\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n",
        );
        assert!(two.contains("2 Authorization headers"), "{two}");
    }

    /// What the `relay_http_head` fuzz target found on the old parser within ~1,700 runs
    /// (a panic): invalid UTF-8 before the scheme, replaced by three-byte characters.
    #[test]
    fn fuzz_found_replacement_characters_before_the_scheme() {
        let mut req = b"GET /relay HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                        Conneey: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                        Sec-WebSocket-Protocol: pluresdb-relay.v1\r\nAuthorization: "
            .to_vec();
        req.extend_from_slice(&[0xff; 19]);
        req.extend_from_slice(b"Bearer fuzz-token\r\n\r\ne: w\n");
        let reason = malformed(&req).to_lowercase();
        assert!(reason.contains("connection"), "{reason}");
    }

    #[test]
    fn non_ascii_and_empty_values_never_panic() {
        let (head, _) = parse_head(
            b"GET / HTTP/1.1\r\nUpgrade: websocket\xc3\xa9\r\nUpgrade:\r\n\
              Sec-WebSocket-Protocol: \xc3, \xa9\r\nSec-WebSocket-Protocol:\r\nHost: \xff\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(!head.upgrade_websocket);
        assert_eq!(head.subprotocols, vec!["\u{fffd}", "\u{fffd}"]);
        let (head, _) = parse_head(&upgrade_with(b"Sec-WebSocket-Protocol: \xc3\xa9\r\n"))
            .unwrap()
            .unwrap();
        assert_eq!(head.subprotocols, vec!["pluresdb-relay.v1", "\u{e9}"]);
    }

    #[test]
    fn bad_upgrades_are_malformed_with_the_reason() {
        let fix = |from: &str, to: &str| {
            String::from_utf8(upgrade_with(b""))
                .unwrap()
                .replacen(from, to, 1)
                .into_bytes()
        };
        for (req, reason) in [
            (fix("GET", "POST"), "method"),
            (fix("HTTP/1.1", "HTTP/1.0"), "version"),
            (
                fix("Connection: Upgrade", "Connection: keep-alive"),
                "connection",
            ),
            (
                fix("Upgrade: websocket", "Upgrade: h2c, websocket"),
                "upgrade",
            ),
            (fix("Version: 13", "Version: 8"), "version"),
            (fix(KEY, "short"), "key"),
            (fix(&format!("Sec-WebSocket-Key: {KEY}\r\n"), ""), "key"),
        ] {
            let got = malformed(&req).to_lowercase();
            assert!(
                got.contains(reason),
                "{:?}: {got}",
                String::from_utf8_lossy(&req)
            );
            assert!(!tungstenite_accepts(&req));
        }
        let mut junk = upgrade_with(b"");
        junk.extend_from_slice(b"\x82\x00");
        let got = malformed(&junk);
        assert!(got.contains("2 bytes after the upgrade request"), "{got}");
        // A head over the limit that arrived in one read is still too large.
        let huge = upgrade_with(format!("X: {}\r\n", "a".repeat(MAX_HEAD_BYTES)).as_bytes());
        assert!(matches!(parse_head(&huge), Err(HeadError::TooLarge)));
    }

    #[tokio::test]
    async fn read_head_stops_at_the_limit() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        client
            .write_all(&vec![b'a'; 2 * MAX_HEAD_BYTES])
            .await
            .unwrap();
        assert!(matches!(
            read_head(&mut server).await,
            Err(HeadError::TooLarge)
        ));
        let (mut client, mut server) = tokio::io::duplex(1024);
        client
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        drop(client);
        assert!(matches!(read_head(&mut server).await, Err(HeadError::Eof)));
    }

    /// Header lines that matter to the relay, with values from anywhere in 0..=255.
    fn header_line() -> impl Strategy<Value = Vec<u8>> {
        let name = prop::sample::select(vec![
            "Upgrade",
            "Connection",
            "Sec-WebSocket-Protocol",
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Version",
            "Authorization",
            "Host",
            "X-Other",
        ]);
        let value = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..40),
            prop::sample::select(vec![
                b"websocket".to_vec(),
                b"Upgrade".to_vec(),
                b"13".to_vec(),
                KEY.as_bytes().to_vec(),
                b"pluresdb-relay.v1".to_vec(),
                b"Bearer \xc3\xa9".to_vec(),
                b"Bearer\xc3\xa9x".to_vec(),
            ]),
        ];
        (name, value).prop_map(|(n, v)| {
            let mut line = n.as_bytes().to_vec();
            line.extend_from_slice(b": ");
            line.extend(v.into_iter().filter(|&b| b != b'\r' && b != b'\n'));
            line.extend_from_slice(b"\r\n");
            line
        })
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_head(&bytes);
        }

        /// Near-valid heads: whatever the parser lets through as a WebSocket upgrade, the
        /// handshake after it accepts too (so every request gets a status, never a dropped
        /// socket); a bearer token it reports is in the request.
        #[test]
        fn accepted_upgrades_pass_the_handshake(
            method in prop::sample::select(vec!["GET", "POST", "get"]),
            path in prop::sample::select(vec!["/relay", "/", "/relay?x=1", "/\u{e9}", "*"]),
            lines in proptest::collection::vec(header_line(), 0..10),
            base in any::<bool>(),
            junk in proptest::collection::vec(any::<u8>(), 0..3),
        ) {
            let mut req = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
            if base {
                req = upgrade_with(&lines.concat());
                req.truncate(req.len() - 2);
            } else {
                req.extend(lines.concat());
            }
            req.extend_from_slice(b"\r\n");
            req.extend_from_slice(&junk);
            match parse_head(&req) {
                Ok(Some((head, _))) => {
                    if head.upgrade_websocket {
                        prop_assert!(tungstenite_accepts(&req));
                    }
                    if let Some(token) = head.bearer {
                        prop_assert!(req.windows(token.len()).any(|w| w == token.as_bytes()));
                    }
                }
                Ok(None) | Err(HeadError::Malformed(_)) => {}
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
        }
    }
}
