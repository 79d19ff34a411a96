use super::*;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

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

/// A request with `headers` (raw value bytes), as hyper hands it to the relay.
fn request(headers: &[(&str, &[u8])]) -> Request<()> {
    let mut req = Request::new(());
    for (name, value) in headers {
        let name = hyper::header::HeaderName::from_bytes(name.as_bytes()).unwrap();
        req.headers_mut()
            .append(name, HeaderValue::from_bytes(value).unwrap());
    }
    req
}

/// What the relay's answer does with a head: `400` with the reason, `101` for an upgrade,
/// else `200` with the bearer token.
fn answer(req: &Request<Incoming>) -> Answer {
    match read_head(req) {
        Err(e) => text(StatusCode::BAD_REQUEST, &[], format!("{e}\n")),
        Ok(Head {
            accept: Some(accept),
            ..
        }) => Answer::from_parts(accept.into_parts().0, String::new()),
        Ok(head) => text(
            StatusCode::OK,
            &[],
            head.bearer.unwrap_or_else(|| "no token".into()),
        ),
    }
}

/// Sends `bytes` (then closes the write side when `close`) to [`serve`] and returns what came
/// back and how serving ended.
async fn exchange(bytes: &[u8], close: bool) -> (String, Served<()>) {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let served = tokio::spawn(serve(server, answer));
    // hyper may answer and close before reading everything.
    let _ = client.write_all(bytes).await;
    if close {
        let _ = client.shutdown().await;
    }
    let served = match served.await.unwrap() {
        Served::Upgraded(stream, rest) => {
            drop::<DuplexStream>(stream);
            Served::Upgraded((), rest)
        }
        Served::Answered => Served::Answered,
        Served::Refused(e) => Served::Refused(e),
        Served::Gone => Served::Gone,
    };
    let mut got = Vec::new();
    // The server side is gone (or upgraded and handed back): read what it wrote.
    let read = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let mut chunk = [0u8; 4096];
        loop {
            match client.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    });
    let _ = read.await;
    (String::from_utf8_lossy(&got).into_owned(), served)
}

fn reason(req: &Request<()>) -> String {
    match read_head(req) {
        Err(reason) => reason,
        Ok(head) => panic!("{req:?}: expected a reason, got {head:?}"),
    }
}

#[test]
fn reads_an_upgrade() {
    let req = request(&[
        ("upgrade", b"websocket"),
        ("connection", b"Upgrade"),
        ("sec-websocket-version", b"13"),
        ("sec-websocket-key", KEY.as_bytes()),
        ("sec-websocket-protocol", b"pluresdb-relay.v1"),
        ("sec-websocket-protocol", b"foo, ,x"),
        ("authorization", b"Bearer abc "),
    ]);
    let head = read_head(&req).unwrap();
    assert!(head.upgrade_websocket);
    assert_eq!(head.subprotocols, vec!["pluresdb-relay.v1", "foo", "x"]);
    assert_eq!(head.bearer.as_deref(), Some("abc"));
    let accept = head.accept.unwrap();
    assert_eq!(accept.status(), StatusCode::SWITCHING_PROTOCOLS);
    // RFC 6455's example key and its accept value.
    assert_eq!(
        accept.headers()["sec-websocket-accept"],
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
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
        let head = read_head(&request(&[("authorization", value)])).unwrap();
        assert_eq!(
            head.bearer.as_deref(),
            token,
            "{:?}",
            String::from_utf8_lossy(value)
        );
    }
    let two = reason(&request(&[
        ("authorization", b"Bearer a"),
        ("authorization", b"Bearer b"),
    ]));
    assert!(two.contains("2 Authorization headers"), "{two}");
}

#[test]
fn non_ascii_and_empty_values_never_panic() {
    let head = read_head(&request(&[
        ("upgrade", b"websocket\xc3\xa9"),
        ("upgrade", b""),
        ("sec-websocket-protocol", b"\xc3, \xa9"),
        ("sec-websocket-protocol", b""),
        ("host", b"\xff"),
    ]))
    .unwrap();
    assert!(!head.upgrade_websocket);
    assert!(head.accept.is_none());
    assert_eq!(head.subprotocols, vec!["\u{fffd}", "\u{fffd}"]);
}

#[test]
fn more_than_64_headers_are_refused() {
    let lines: Vec<(&str, &[u8])> = vec![("x", b"y"); MAX_HEADERS + 1];
    let got = reason(&request(&lines));
    assert!(got.contains("65 header lines; at most 64"), "{got}");
    assert!(read_head(&request(&lines[1..])).is_ok());
}

/// What the `relay_http_head` fuzz target found on the old hand-written parser within ~1,700
/// runs (a panic): invalid UTF-8 before the scheme, replaced by three-byte characters.
#[tokio::test]
async fn fuzz_found_replacement_characters_before_the_scheme() {
    let mut req = b"GET /relay HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                    Conneey: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                    Sec-WebSocket-Protocol: pluresdb-relay.v1\r\nAuthorization: "
        .to_vec();
    req.extend_from_slice(&[0xff; 19]);
    req.extend_from_slice(b"Bearer fuzz-token\r\n\r\ne: w\n");
    let (got, served) = exchange(&req, false).await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert!(got.to_lowercase().contains("connection"), "{got}");
    assert!(matches!(served, Served::Answered), "{served:?}");
}

#[tokio::test]
async fn bad_upgrades_get_400_with_the_reason() {
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
        let (got, served) = exchange(&req, false).await;
        // hyper answers in the request's version (HTTP/1.0 for the version case).
        assert!(
            got.get(8..).is_some_and(|s| s.starts_with(" 400"))
                && got.to_lowercase().contains(reason),
            "{:?}: {got}",
            String::from_utf8_lossy(&req)
        );
        assert!(matches!(served, Served::Answered), "{served:?}");
    }
}

#[tokio::test]
async fn hyper_refuses_garbage_and_heads_over_the_limit() {
    let (got, served) = exchange(b"\x16\x03\x01 not http at all\r\n\r\n", false).await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert!(matches!(served, Served::Refused(_)), "{served:?}");
    // Over the limit in one write, and exactly the limit with no end of head.
    let huge = upgrade_with(format!("X: {}\r\n", "a".repeat(MAX_HEAD_BYTES)).as_bytes());
    let mut endless = b"GET /relay HTTP/1.1\r\nX: ".to_vec();
    endless.resize(MAX_HEAD_BYTES, b'a');
    for req in [huge, endless] {
        let (got, served) = exchange(&req, false).await;
        assert!(got.starts_with("HTTP/1.1 431"), "{got}");
        assert!(matches!(served, Served::Refused(_)), "{served:?}");
    }
    // Just under the limit is read.
    let mut fits = b"GET / HTTP/1.1\r\nX: ".to_vec();
    fits.resize(MAX_HEAD_BYTES - 4, b'a');
    fits.extend_from_slice(b"\r\n\r\n");
    let (got, _) = exchange(&fits, false).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

#[tokio::test]
async fn a_head_cut_short_is_gone_without_an_answer() {
    let (got, served) = exchange(b"GET /healthz HTTP/1.1\r\nHost", true).await;
    assert_eq!(got, "");
    assert!(matches!(served, Served::Gone), "{served:?}");
}

#[tokio::test]
async fn one_request_per_connection() {
    let two = b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n";
    let (got, served) = exchange(two, false).await;
    assert_eq!(got.matches("HTTP/1.1 200").count(), 1, "{got}");
    assert!(got.to_lowercase().contains("connection: close"), "{got}");
    assert!(matches!(served, Served::Answered), "{served:?}");
}

#[tokio::test]
async fn an_upgrade_hands_back_the_stream_and_the_bytes_after_the_head() {
    let mut req = upgrade_with(b"");
    let (got, served) = exchange(&req, false).await;
    assert!(got.starts_with("HTTP/1.1 101"), "{got}");
    match served {
        Served::Upgraded(_, rest) => assert!(rest.is_empty(), "{rest:?}"),
        other => panic!("expected an upgrade, got {other:?}"),
    }
    // A client that did not wait for the 101: its first frame is handed over, not lost.
    req.extend_from_slice(b"\x82\x00");
    let (got, served) = exchange(&req, false).await;
    assert!(got.starts_with("HTTP/1.1 101"), "{got}");
    match served {
        Served::Upgraded(_, rest) => assert_eq!(&rest[..], b"\x82\x00"),
        other => panic!("expected an upgrade, got {other:?}"),
    }
}

/// A real WebSocket client (tokio-tungstenite's) completes the handshake against [`serve`]
/// and its frames reach the stream handed back: the 101 keeps `Connection: Upgrade`.
#[tokio::test]
async fn a_tungstenite_client_completes_the_handshake() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, protocol::Role};
    let (client, server) = tokio::io::duplex(64 * 1024);
    let served = tokio::spawn(serve(server, answer));
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://relay.example/relay", client)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::binary(&b"hello"[..])).await.unwrap();
    let Served::Upgraded(stream, rest) = served.await.unwrap() else {
        panic!("expected an upgrade");
    };
    let mut server = tokio_tungstenite::WebSocketStream::from_partially_read(
        stream,
        rest.to_vec(),
        Role::Server,
        None,
    )
    .await;
    assert_eq!(
        server.next().await.unwrap().unwrap(),
        Message::binary(&b"hello"[..])
    );
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Any bytes, then the end of the stream: an HTTP/1.x status (hyper answers an HTTP/1.0
    /// request in HTTP/1.0) or a close, never a panic or a hang.
    #[test]
    fn any_bytes_get_a_status_or_a_close(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let (got, _) = runtime().block_on(exchange(&bytes, true));
        prop_assert!(got.is_empty() || got.starts_with("HTTP/1.1 ") || got.starts_with("HTTP/1.0 "), "{got}");
    }

    /// Near-valid heads: each gets a status (an upgrade a `101`, never a silent close); a
    /// bearer token the relay reads is in the request.
    #[test]
    fn near_valid_heads_get_a_status(
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
        let (got, served) = runtime().block_on(exchange(&req, false));
        prop_assert!(got.starts_with("HTTP/1.1 "), "{got}");
        if got.starts_with("HTTP/1.1 101") {
            prop_assert!(matches!(served, Served::Upgraded(..)), "{served:?}");
        }
        if let Some(token) = got.strip_prefix("HTTP/1.1 200").and_then(|r| r.split("\r\n\r\n").nth(1)) {
            prop_assert!(token == "no token" || req.windows(token.len()).any(|w| w == token.as_bytes()));
        }
    }
}
