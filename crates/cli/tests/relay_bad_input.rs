//! Hostile and broken clients against the real `pluresdb-sync relay` process on loopback.
//! Each gets a clear HTTP status, ERROR frame or close code; the relay stays up; a bystander
//! pair's traffic is unaffected and complete.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::SinkExt;
use pluresdb_sync_transport_relay::protocol::{
    ClientFrame, Frame, RelayFrame, SUBPROTOCOL, close_code, error_code,
};
use pluresdb_sync_transport_relay::testkit::raw::{self, Ws};
use pluresdb_sync_transport_relay::testkit::{WAIT as T, ws_url};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::{self, Message};

/// A relay process; killed when dropped.
struct Relay {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl Relay {
    async fn start(extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
            .args([
                "relay",
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                "127.0.0.1:0",
            ])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addr = None;
        let mut metrics = None;
        while addr.is_none() || metrics.is_none() {
            let line = tokio::time::timeout(T, lines.next_line())
                .await
                .expect("relay did not print its addresses")
                .unwrap()
                .expect("relay exited early");
            if let Some(rest) = line.strip_prefix("relay listening on ws://") {
                addr = Some(rest.trim_end_matches("/relay").parse().unwrap());
            } else if let Some(rest) = line.strip_prefix("metrics on http://") {
                metrics = Some(rest.trim_end_matches("/metrics").parse().unwrap());
            }
        }
        Self {
            child,
            addr: addr.unwrap(),
            metrics: metrics.unwrap(),
        }
    }

    async fn metrics(&self) -> String {
        http(self.metrics, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await
    }

    async fn metric(&self, line_prefix: &str) -> u64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(line_prefix)
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no metric {line_prefix} in {text}"))
    }

    /// Waits until a metric reaches at least `min` (metrics are updated by other tasks).
    async fn metric_at_least(&self, line_prefix: &str, min: u64) -> u64 {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let v = self.metric(line_prefix).await;
            if v >= min {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{line_prefix} stayed at {v} < {min}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn http(addr: SocketAddr, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

async fn ws_with(
    addr: SocketAddr,
    protocol: Option<&str>,
    token: Option<&str>,
) -> Result<Ws, tungstenite::Error> {
    raw::connect_with(&ws_url(addr), protocol, token)
        .await
        .map(|(ws, _)| ws)
}

/// A connected client and its relay-assigned id.
async fn client(addr: SocketAddr) -> (Ws, u64) {
    raw::client(&ws_url(addr)).await.unwrap()
}

/// The next relay frame; skips relay PINGs.
async fn next_data(ws: &mut Ws) -> Frame {
    raw::next_data(ws).await.unwrap()
}

async fn send(ws: &mut Ws, f: Frame) {
    raw::send(ws, f).await.unwrap()
}

/// Sends `f` and expects the relay's ERROR frame with `code` in answer.
async fn expect_error(ws: &mut Ws, f: Frame, code: u16) {
    send(ws, f).await;
    let answer = next_data(ws).await;
    assert!(
        matches!(answer, Frame::Relay(RelayFrame::Error { code: c, .. }) if c == code),
        "expected error {code}, got {answer:?}"
    );
}

/// Reads until the relay closes; returns the close code and reason.
async fn closed(ws: &mut Ws) -> (u16, String) {
    raw::closed(ws).await.unwrap()
}

async fn join(ws: &mut Ws, room: [u8; 32]) -> Vec<u64> {
    raw::joined(ws, room).await.unwrap()
}

/// Two clients in one room; `run` sends `n` numbered messages and checks every one arrives.
struct Bystanders {
    a: Ws,
    b: Ws,
    b_id: u64,
    room: [u8; 32],
}

impl Bystanders {
    async fn new(addr: SocketAddr) -> Self {
        let room = [0xB5; 32];
        let (mut a, _) = client(addr).await;
        let (mut b, b_id) = client(addr).await;
        join(&mut a, room).await;
        join(&mut b, room).await;
        assert!(matches!(
            next_data(&mut a).await,
            Frame::Relay(RelayFrame::PeerJoined { .. })
        ));
        Self { a, b, b_id, room }
    }

    async fn exchange(&mut self, n: u32) {
        for i in 0..n {
            let payload = i.to_be_bytes().to_vec();
            send(
                &mut self.a,
                Frame::Client(ClientFrame::Send {
                    room: self.room,
                    to: self.b_id,
                    payload,
                }),
            )
            .await;
        }
        for i in 0..n {
            match next_data(&mut self.b).await {
                Frame::Relay(RelayFrame::Deliver { payload, .. }) => {
                    assert_eq!(payload, i.to_be_bytes())
                }
                other => panic!("bystander message {i}: {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn plain_http_and_bad_upgrades_get_clear_statuses() {
    let relay = Relay::start(&[]).await;
    let plain = http(relay.addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(plain.starts_with("HTTP/1.1 426"), "{plain}");
    assert!(plain.contains(SUBPROTOCOL), "{plain}");
    let health = http(relay.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        health.starts_with("HTTP/1.1 200") && health.ends_with("ok"),
        "{health}"
    );
    let garbage = http(relay.addr, "\x16\x03\x01 not http at all\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    let huge = http(
        relay.addr,
        &format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10_000)),
    )
    .await;
    assert!(huge.starts_with("HTTP/1.1 431"), "{huge}");
    // v2 is spoken too (datagrams); an unknown version is refused.
    for protocol in [None, Some("chat"), Some("pluresdb-relay.v3")] {
        match ws_with(relay.addr, protocol, None).await {
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 400, "{protocol:?}");
                let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
                    .into_owned();
                assert!(body.contains(SUBPROTOCOL), "{body}");
            }
            other => panic!(
                "{protocol:?}: expected HTTP 400, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    assert!(
        relay
            .metric("pluresdb_relay_drops_total{reason=\"bad_upgrade\"}")
            .await
            >= 5
    );
    // Still serving.
    let (mut ws, _) = client(relay.addr).await;
    join(&mut ws, [1; 32]).await;
}

#[tokio::test]
async fn broken_frames_get_close_codes_and_bystanders_lose_nothing() {
    let relay = Relay::start(&[]).await;
    let mut by = Bystanders::new(relay.addr).await;
    let cases: Vec<(&str, Message, u16, &str)> = vec![
        (
            "text",
            Message::Text("hello".into()),
            close_code::TEXT_FRAME,
            "text frames",
        ),
        (
            "garbage",
            Message::Binary(vec![0x42, 1, 2, 3].into()),
            close_code::UNKNOWN_TYPE,
            "0x42",
        ),
        (
            "relay-only type",
            Message::Binary(
                Frame::Relay(RelayFrame::PeerLeft {
                    room: [0; 32],
                    peer: 1,
                })
                .encode()
                .into(),
            ),
            close_code::UNKNOWN_TYPE,
            "0x83",
        ),
        (
            "empty",
            Message::Binary(Vec::new().into()),
            close_code::MALFORMED,
            "empty",
        ),
        (
            "truncated join",
            Message::Binary(vec![0x01, 1, 2, 3].into()),
            close_code::MALFORMED,
            "truncated",
        ),
        (
            "truncated send",
            Message::Binary(vec![0x03; 20].into()),
            close_code::MALFORMED,
            "truncated",
        ),
        (
            "trailing bytes",
            Message::Binary(vec![0x05; 12].into()),
            close_code::MALFORMED,
            "trailing",
        ),
        (
            "oversized",
            Message::Binary(vec![0x04; 70_000].into()),
            close_code::FRAME_TOO_LARGE,
            "65536",
        ),
    ];
    for (name, msg, code, needle) in cases {
        let (mut bad, _) = client(relay.addr).await;
        let _ = bad.send(msg).await;
        let (got, reason) = closed(&mut bad).await;
        assert_eq!(got, code, "{name}: {reason}");
        assert!(
            reason.contains(needle),
            "{name}: {reason:?} lacks {needle:?}"
        );
        by.exchange(50).await;
    }
    // An oversized SEND payload inside a legal-sized frame is refused too.
    let (mut bad, _) = client(relay.addr).await;
    join(&mut bad, [2; 32]).await;
    let _ = bad
        .send(Message::Binary(
            pluresdb_sync_transport_relay::protocol::encode_send(
                &[2; 32],
                1,
                &vec![0; 65_536 - 41],
            )
            .into(),
        ))
        .await;
    let (got, reason) = closed(&mut bad).await;
    assert_eq!(got, close_code::FRAME_TOO_LARGE, "{reason}");
    by.exchange(50).await;
    assert!(
        relay
            .metric("pluresdb_relay_drops_total{reason=\"malformed\"}")
            .await
            >= 4
    );
    assert!(
        relay
            .metric("pluresdb_relay_drops_total{reason=\"oversized\"}")
            .await
            >= 2
    );
    assert!(
        relay
            .metric("pluresdb_relay_drops_total{reason=\"text_frame\"}")
            .await
            >= 1
    );
}

#[tokio::test]
async fn join_floods_and_sends_outside_rooms_get_error_frames_and_stay_open() {
    let relay = Relay::start(&[
        "--max-rooms-per-connection",
        "8",
        "--max-peers-per-room",
        "3",
    ])
    .await;
    let mut by = Bystanders::new(relay.addr).await;
    let (mut flood, _) = client(relay.addr).await;
    for i in 0..100u8 {
        send(
            &mut flood,
            Frame::Client(ClientFrame::Join { room: [i; 32] }),
        )
        .await;
    }
    let (mut joined, mut refused) = (0, 0);
    for _ in 0..100 {
        match next_data(&mut flood).await {
            Frame::Relay(RelayFrame::Joined { .. }) => joined += 1,
            Frame::Relay(RelayFrame::Error {
                code: error_code::TOO_MANY_ROOMS,
                ..
            }) => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((joined, refused), (8, 92));
    expect_error(
        &mut flood,
        Frame::Client(ClientFrame::Join { room: [0; 32] }),
        error_code::ALREADY_JOINED,
    )
    .await;
    // Sends and broadcasts to rooms not joined, and to unknown peers.
    expect_error(
        &mut flood,
        Frame::Client(ClientFrame::Send {
            room: by.room,
            to: by.b_id,
            payload: b"sneak".to_vec(),
        }),
        error_code::NOT_IN_ROOM,
    )
    .await;
    expect_error(
        &mut flood,
        Frame::Client(ClientFrame::Broadcast {
            room: by.room,
            payload: b"sneak".to_vec(),
        }),
        error_code::NOT_IN_ROOM,
    )
    .await;
    expect_error(
        &mut flood,
        Frame::Client(ClientFrame::Leave { room: by.room }),
        error_code::NOT_IN_ROOM,
    )
    .await;
    expect_error(
        &mut flood,
        Frame::Client(ClientFrame::Send {
            room: [0; 32],
            to: by.b_id,
            payload: b"x".to_vec(),
        }),
        error_code::UNKNOWN_PEER,
    )
    .await;
    // Full rooms refuse joins (the bystander room has 2 of 3).
    let (mut third, _) = client(relay.addr).await;
    join(&mut third, by.room).await;
    let (mut fourth, _) = client(relay.addr).await;
    expect_error(
        &mut fourth,
        Frame::Client(ClientFrame::Join { room: by.room }),
        error_code::ROOM_FULL,
    )
    .await;
    // The flooder is still served, and nothing leaked to the bystanders.
    send(&mut flood, Frame::Ping(5)).await;
    assert_eq!(next_data(&mut flood).await, Frame::Pong(5));
    for ws in [&mut by.a, &mut by.b] {
        assert!(matches!(
            next_data(ws).await,
            Frame::Relay(RelayFrame::PeerJoined { .. })
        ));
    }
    by.exchange(100).await;
    assert_eq!(
        relay
            .metric("pluresdb_relay_drops_total{reason=\"too_many_rooms\"}")
            .await,
        92
    );
}

#[tokio::test]
async fn a_client_that_never_reads_is_closed_as_slow_consumer() {
    let relay = Relay::start(&[
        "--send-queue-frames",
        "8",
        "--slow-consumer-timeout-ms",
        "300",
    ])
    .await;
    let mut by = Bystanders::new(relay.addr).await;
    let room = [0x51; 32];
    let (mut sleeper, sleeper_id) = client(relay.addr).await;
    join(&mut sleeper, room).await;
    let (mut sender, _) = client(relay.addr).await;
    join(&mut sender, room).await;
    // The sleeper never reads again. Push ~40 MiB at it: far beyond the socket buffers.
    let chunk = vec![7u8; 60_000];
    let push = async {
        for _ in 0..700 {
            let f = pluresdb_sync_transport_relay::protocol::encode_send(&room, sleeper_id, &chunk);
            if sender.send(Message::Binary(f.into())).await.is_err() {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), push)
        .await
        .unwrap();
    relay
        .metric_at_least("pluresdb_relay_drops_total{reason=\"slow_consumer\"}", 1)
        .await;
    // Once closed, the sleeper left the room: the sender is told the peer is unknown.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        send(
            &mut sender,
            Frame::Client(ClientFrame::Send {
                room,
                to: sleeper_id,
                payload: b"?".to_vec(),
            }),
        )
        .await;
        match next_data(&mut sender).await {
            Frame::Relay(RelayFrame::Error {
                code: error_code::UNKNOWN_PEER,
                ..
            }) => break,
            Frame::Relay(RelayFrame::PeerLeft { .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(tokio::time::Instant::now() < deadline);
    }
    by.exchange(100).await;
    drop(sleeper);
}

#[tokio::test]
async fn timeouts_close_silent_clients() {
    let relay = Relay::start(&[
        "--handshake-timeout-ms",
        "300",
        "--join-timeout-ms",
        "400",
        "--ping-interval-ms",
        "100",
        "--idle-timeout-ms",
        "500",
    ])
    .await;
    // Half-open: TCP but no HTTP request.
    let mut silent = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(T, silent.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the relay should close a silent socket");
    relay
        .metric_at_least(
            "pluresdb_relay_drops_total{reason=\"handshake_timeout\"}",
            1,
        )
        .await;
    // Upgraded but never joins.
    let (mut lazy, _) = client(relay.addr).await;
    let (code, reason) = closed(&mut lazy).await;
    assert_eq!(code, close_code::TIMEOUT);
    assert!(reason.contains("no room joined"), "{reason}");
    // Joins, then ignores the relay's PINGs.
    let (mut mute, _) = client(relay.addr).await;
    join(&mut mute, [3; 32]).await;
    let (code, reason) = closed(&mut mute).await;
    assert_eq!(code, close_code::TIMEOUT);
    assert!(reason.contains("nothing received"), "{reason}");
}

#[tokio::test]
async fn per_ip_limit_and_bearer_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "# operators\nsecret-1\n\nsecret-2\n").unwrap();
    let relay = Relay::start(&[
        "--max-connections-per-ip",
        "3",
        "--auth-token-file",
        tokens.to_str().unwrap(),
    ])
    .await;
    for token in [None, Some("wrong"), Some("secret-")] {
        match ws_with(relay.addr, Some(SUBPROTOCOL), token).await {
            Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401, "{token:?}"),
            other => panic!("{token:?}: expected 401, got {:?}", other.map(|_| ())),
        }
    }
    let mut open = Vec::new();
    for t in ["secret-1", "secret-2", "secret-1"] {
        open.push(
            ws_with(relay.addr, Some(SUBPROTOCOL), Some(t))
                .await
                .unwrap(),
        );
    }
    match ws_with(relay.addr, Some(SUBPROTOCOL), Some("secret-1")).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 429),
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    drop(open);
    // Slots free up once those connections are gone.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match ws_with(relay.addr, Some(SUBPROTOCOL), Some("secret-2")).await {
            Ok(_) => break,
            Err(tungstenite::Error::Http(resp)) if resp.status() == 429 => {
                assert!(tokio::time::Instant::now() < deadline, "slots never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        relay
            .metric("pluresdb_relay_drops_total{reason=\"unauthorized\"}")
            .await
            >= 3
    );
}

#[tokio::test]
async fn a_thousand_connect_disconnect_cycles() {
    let relay = Relay::start(&[]).await;
    let mut by = Bystanders::new(relay.addr).await;
    for i in 0..1000u32 {
        let (mut ws, _) = client(relay.addr).await;
        if i % 2 == 0 {
            join(&mut ws, [9; 32]).await;
            let _ = ws.close(None).await;
        }
        // Odd cycles just drop the socket without a close handshake.
    }
    by.exchange(100).await;
    relay
        .metric_at_least("pluresdb_relay_connections_total", 1002)
        .await;
    let deadline = tokio::time::Instant::now() + T;
    while relay.metric("pluresdb_relay_connections").await != 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections did not drain"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(relay.metric("pluresdb_relay_rooms").await, 1);
    // A socket dropped without a close handshake is a disconnect, not a protocol error.
    assert_eq!(
        relay
            .metric("pluresdb_relay_drops_total{reason=\"websocket_protocol\"}")
            .await,
        0
    );
}

#[tokio::test]
async fn per_ip_byte_rate_pauses_reads_without_dropping() {
    // 512 KiB/s with a 512 KiB burst: 2 MiB takes at least ~3 s to get through.
    let relay = Relay::start(&["--max-bytes-per-sec-per-ip", "524288"]).await;
    let room = [0x77; 32];
    let (mut tx, _) = client(relay.addr).await;
    let (mut rx, rx_id) = client(relay.addr).await;
    join(&mut tx, room).await;
    join(&mut rx, room).await;
    let chunk = vec![1u8; 60_000];
    let frames = 35; // 2.1 MB
    let started = std::time::Instant::now();
    let sender = async {
        for _ in 0..frames {
            let f = pluresdb_sync_transport_relay::protocol::encode_send(&room, rx_id, &chunk);
            tx.send(Message::Binary(f.into())).await.unwrap();
        }
    };
    let receiver = async {
        let mut got = 0;
        while got < frames {
            if let Frame::Relay(RelayFrame::Deliver { payload, .. }) = next_data(&mut rx).await {
                assert_eq!(payload.len(), chunk.len());
                got += 1;
            }
        }
    };
    tokio::time::timeout(
        Duration::from_secs(120),
        futures_util::future::join(sender, receiver),
    )
    .await
    .unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(2500),
        "2.1 MB passed in {elapsed:?}"
    );
    assert!(
        relay
            .metric("pluresdb_relay_drops_total{reason=\"rate_limited\"}")
            .await
            >= 1
    );
    assert_eq!(
        relay
            .metric("pluresdb_relay_drops_total{reason=\"slow_consumer\"}")
            .await,
        0
    );
}

#[tokio::test]
async fn sigterm_closes_clients_with_going_away_and_exits_cleanly() {
    let mut relay = Relay::start(&[]).await;
    let (mut ws, _) = client(relay.addr).await;
    join(&mut ws, [4; 32]).await;
    let pid = relay.child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let (code, reason) = closed(&mut ws).await;
    assert_eq!(code, close_code::GOING_AWAY, "{reason}");
    let exit = tokio::time::timeout(T, relay.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// A SIGTERM sent the moment the relay has printed its addresses (a supervisor stopping it at
/// once) is a clean shutdown, not a kill: the signals are watched from before the relay binds.
/// Before that, the handler was installed only after the addresses were printed, and a signal
/// in between killed the process (exit by signal, clients reset without a close frame).
#[tokio::test]
async fn sigterm_right_after_start_is_a_clean_shutdown() {
    for _ in 0..20 {
        let mut relay = Relay::start(&[]).await;
        let pid = relay.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(T, relay.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(exit.success(), "{exit:?}");
    }
}

/// Hostile request heads before authentication (issue 10, "a pre-auth panic"): non-ASCII,
/// empty, repeated and oversized values in every header the relay reads. Self-contained (its
/// own process handling and raw HTTP client) so the helpers above can move freely.
mod pre_auth_heads {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use futures_util::StreamExt;
    use pluresdb_sync_transport_relay::protocol::{Frame, RelayFrame, SUBPROTOCOL, decode};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::process::{Child, Command};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    const T: Duration = Duration::from_secs(30);
    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    /// Requests in flight at once (well under the default 64 connections per IP).
    const PARALLEL: usize = 16;

    /// A relay process whose stderr is kept (with backtraces on, as an operator might run it).
    struct Watched {
        child: Child,
        addr: SocketAddr,
        metrics: SocketAddr,
        stderr: Arc<Mutex<String>>,
    }

    impl Watched {
        async fn start(extra: &[&str]) -> Self {
            let mut child = Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
                .args([
                    "relay",
                    "--listen",
                    "127.0.0.1:0",
                    "--metrics",
                    "127.0.0.1:0",
                ])
                .args(extra)
                .env("RUST_BACKTRACE", "1")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let stderr = Arc::new(Mutex::new(String::new()));
            let mut err_lines = BufReader::new(child.stderr.take().unwrap()).lines();
            let sink = stderr.clone();
            tokio::spawn(async move {
                while let Ok(Some(line)) = err_lines.next_line().await {
                    let mut s = sink.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            });
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let (mut addr, mut metrics) = (None, None);
            while addr.is_none() || metrics.is_none() {
                let line = tokio::time::timeout(T, lines.next_line())
                    .await
                    .expect("relay did not print its addresses")
                    .unwrap()
                    .expect("relay exited early");
                if let Some(rest) = line.strip_prefix("relay listening on ws://") {
                    addr = Some(rest.trim_end_matches("/relay").parse().unwrap());
                } else if let Some(rest) = line.strip_prefix("metrics on http://") {
                    metrics = Some(rest.trim_end_matches("/metrics").parse().unwrap());
                }
            }
            Self {
                child,
                addr: addr.unwrap(),
                metrics: metrics.unwrap(),
                stderr,
            }
        }

        /// The process is alive and has printed no panic.
        fn assert_unharmed(&mut self) {
            assert!(self.child.try_wait().unwrap().is_none(), "the relay exited");
            let stderr = self.stderr.lock().unwrap();
            let panics = stderr.matches("panicked").count();
            assert_eq!(
                panics, 0,
                "{panics} panics; stderr begins: {:.2000}",
                *stderr
            );
        }
    }

    /// Sends `request` on a fresh connection and returns the response's status code, or what
    /// happened instead. Stops reading at the end of the response head.
    async fn status(addr: SocketAddr, request: &[u8]) -> Result<u16, String> {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(request).await.map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        let read = async {
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            }
        };
        tokio::time::timeout(T, read)
            .await
            .map_err(|_| "no response in 30 s".to_owned())?;
        let text = String::from_utf8_lossy(&got);
        text.strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("not an HTTP response: {text:?}"))
    }

    /// A complete WebSocket upgrade for the relay, with `replace` applied to its text and
    /// `extra` header lines (raw bytes, each ending in CRLF) added.
    fn upgrade(replace: &[(&str, &[u8])], extra: &[u8]) -> Vec<u8> {
        let mut req = format!(
            "GET /relay HTTP/1.1\r\nHost: relay.example\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\
             Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"
        )
        .into_bytes();
        for (from, to) in replace {
            let at = req
                .windows(from.len())
                .position(|w| w == from.as_bytes())
                .unwrap_or_else(|| panic!("{from:?} is not in the request"));
            req.splice(at..at + from.len(), to.iter().copied());
        }
        req.extend_from_slice(extra);
        req.extend_from_slice(b"\r\n");
        req
    }

    /// (what, request, status without tokens, status with tokens configured). `token` is a
    /// valid one, sent where a case is about something else than authentication.
    fn cases(token: &str) -> Vec<(&'static str, Vec<u8>, u16, u16)> {
        let auth = format!("Authorization: Bearer {token}\r\n").into_bytes();
        let with_auth = |replace: &[(&str, &[u8])], extra: &[u8]| {
            let mut lines = auth.clone();
            lines.extend_from_slice(extra);
            upgrade(replace, &lines)
        };
        let many = |line: &str, n: usize| line.repeat(n).into_bytes();
        let mut huge = b"GET /relay HTTP/1.1\r\nX: ".to_vec();
        // Exactly the head limit and no end: the relay reads all of it before answering, so
        // no unread bytes turn its close into a reset.
        huge.resize(8 * 1024, b'a');
        vec![
            (
                "bearer then a two-byte character",
                upgrade(&[], b"Authorization: Bearer\xc3\xa9x\r\n"),
                101,
                401,
            ),
            (
                "non-ASCII bearer token",
                upgrade(&[], b"Authorization: Bearer \xc3\xa9\xc3\xa9\r\n"),
                101,
                401,
            ),
            (
                "bearer token not UTF-8",
                upgrade(&[], b"Authorization: Bearer \xff\xfe\r\n"),
                101,
                401,
            ),
            (
                "only non-ASCII in authorization",
                upgrade(
                    &[],
                    b"Authorization: \xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\r\n",
                ),
                101,
                401,
            ),
            (
                "empty authorization",
                upgrade(&[], b"Authorization:\r\n"),
                101,
                401,
            ),
            (
                "bare scheme",
                upgrade(&[], b"Authorization: Bearer\r\n"),
                101,
                401,
            ),
            (
                "two authorizations",
                upgrade(&[], &[auth.clone(), auth.clone()].concat()),
                400,
                400,
            ),
            (
                "plain GET with the bad bearer",
                b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\xc3\xa9x\r\n\r\n".to_vec(),
                426,
                426,
            ),
            (
                "health check with the bad bearer",
                b"GET /healthz HTTP/1.1\r\nAuthorization: Bearer\xc3\xa9x\r\n\r\n".to_vec(),
                200,
                200,
            ),
            (
                "non-ASCII subprotocols beside ours",
                with_auth(&[], b"Sec-WebSocket-Protocol: \xc3\xa9, \xff,,\r\n"),
                101,
                101,
            ),
            (
                "only non-ASCII subprotocols",
                with_auth(&[(SUBPROTOCOL, b"\xc3\xa9")], b""),
                400,
                400,
            ),
            (
                "empty subprotocol",
                with_auth(&[(SUBPROTOCOL, b"")], b""),
                400,
                400,
            ),
            (
                "non-ASCII upgrade",
                with_auth(
                    &[("Upgrade: websocket", b"Upgrade: websocket\xc3\xa9")],
                    b"",
                ),
                426,
                426,
            ),
            (
                "empty upgrade",
                with_auth(&[("Upgrade: websocket", b"Upgrade:")], b""),
                426,
                426,
            ),
            (
                "non-ASCII connection",
                with_auth(&[("Connection: Upgrade", b"Connection: \xc3\xa9")], b""),
                400,
                400,
            ),
            (
                "non-ASCII key",
                with_auth(&[(KEY, b"\xc3\xa9GhlIHNhbXBsZSBub25jZQ=")], b""),
                400,
                400,
            ),
            ("empty key", with_auth(&[(KEY, b"")], b""), 400, 400),
            (
                "non-ASCII version",
                with_auth(&[("Version: 13", b"Version: 1\xc3\xa9")], b""),
                400,
                400,
            ),
            (
                "old version",
                with_auth(&[("Version: 13", b"Version: 8")], b""),
                400,
                400,
            ),
            (
                "non-ASCII host",
                with_auth(&[("relay.example", b"\xc3\xa9.example")], b""),
                101,
                101,
            ),
            (
                "empty host",
                with_auth(&[("relay.example", b"")], b""),
                101,
                101,
            ),
            (
                "non-ASCII path",
                with_auth(&[("/relay", b"/relay\xc3\xa9")], b""),
                101,
                101,
            ),
            (
                "path not UTF-8",
                with_auth(&[("/relay", b"/relay?\xff=\xfe")], b""),
                400,
                400,
            ),
            (
                "non-ASCII header name",
                with_auth(&[], b"\xc3\xa9: x\r\n"),
                400,
                400,
            ),
            (
                "40 subprotocol headers",
                with_auth(&[], &many("Sec-WebSocket-Protocol: x, y\r\n", 40)),
                101,
                101,
            ),
            (
                "65 headers",
                with_auth(&[], &many("X: y\r\n", 65)),
                400,
                400,
            ),
            ("8 KiB head without an end", huge, 431, 431),
            (
                "binary garbage",
                b"\xc3\xa9\x00\xff\r\n\r\n".to_vec(),
                400,
                400,
            ),
        ]
    }

    /// Sends `rounds` requests, cycling through the cases, `PARALLEL` at a time; every one must
    /// get its status.
    async fn attack(relay: &Watched, authed: bool, token: &str, rounds: usize) {
        let cases = Arc::new(cases(token));
        let addr = relay.addr;
        let results: Vec<_> = futures_util::stream::iter(0..rounds)
            .map(|i| {
                let cases = cases.clone();
                async move {
                    let (what, req, open, closed) = &cases[i % cases.len()];
                    let want = if authed { *closed } else { *open };
                    (*what, want, status(addr, req).await)
                }
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        let wrong: Vec<_> = results
            .iter()
            .filter(|(_, want, got)| got.as_ref() != Ok(want))
            .collect();
        assert!(
            wrong.is_empty(),
            "{} of {rounds} requests got the wrong answer, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
    }

    /// An honest client still gets in: upgraded with our subprotocol and welcomed.
    async fn honest_client(addr: SocketAddr, token: Option<&str>) {
        let mut req = format!("ws://{addr}/relay").into_client_request().unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", SUBPROTOCOL.parse().unwrap());
        if let Some(t) = token {
            req.headers_mut()
                .insert("Authorization", format!("Bearer {t}").parse().unwrap());
        }
        let (mut ws, _) = tokio::time::timeout(T, tokio_tungstenite::connect_async(req))
            .await
            .unwrap()
            .unwrap();
        match tokio::time::timeout(T, ws.next()).await.unwrap() {
            Some(Ok(Message::Binary(b))) => assert!(
                matches!(decode(&b), Ok(Frame::Relay(RelayFrame::Welcome { .. }))),
                "{b:?}"
            ),
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_thousand_hostile_heads_get_statuses_and_never_panic_the_relay() {
        let mut relay = Watched::start(&[]).await;
        attack(&relay, false, "unused", 1000).await;
        // The metrics listener reads heads with the same parser.
        for path in ["/metrics", "/healthz"] {
            let req = format!("GET {path} HTTP/1.1\r\nAuthorization: Bearer\u{e9}x\r\n\r\n");
            assert_eq!(
                status(relay.metrics, req.as_bytes()).await,
                Ok(200),
                "{path}"
            );
        }
        relay.assert_unharmed();
        honest_client(relay.addr, None).await;
    }

    #[tokio::test]
    async fn a_thousand_hostile_heads_against_a_relay_with_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, "s3cret-token\n").unwrap();
        let mut relay = Watched::start(&["--auth-token-file", tokens.to_str().unwrap()]).await;
        attack(&relay, true, "s3cret-token", 1000).await;
        relay.assert_unharmed();
        honest_client(relay.addr, Some("s3cret-token")).await;
    }
}

/// The relay raises its soft open-file limit to the hard limit (issue 10, "file descriptors"):
/// started under `ulimit -Sn 256`, its /proc limits show soft = hard, and it logs the limit.
#[tokio::test]
async fn the_relay_raises_its_open_file_limit_to_the_hard_limit() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 256 && exec \"$0\" relay --listen 127.0.0.1:0")
        .arg(env!("CARGO_BIN_EXE_pluresdb-sync"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = tokio::time::timeout(T, out.next_line())
            .await
            .expect("relay did not start")
            .unwrap()
            .expect("relay exited early");
        if line.starts_with("relay listening on") {
            break;
        }
    }
    let pid = child.id().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let row: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    let (soft, hard) = (row[3], row[4]);
    assert_eq!(soft, hard, "{limits}");
    // Otherwise the relay had nothing to raise and this test would prove nothing.
    assert!(
        hard.parse::<u64>().is_ok_and(|h| h > 256),
        "the hard open-file limit must exceed 256 for this test: {limits}"
    );
    child.start_kill().unwrap();
    let mut err = String::new();
    let mut stderr = child.stderr.take().unwrap();
    tokio::time::timeout(
        T,
        tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut err),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        err.contains(&format!("limit={hard}")) && err.contains("open file limit"),
        "{err}"
    );
}

/// Memory attacks against the relay process: never-reading receivers from several client IPs
/// (issue 10, "memory per client IP"). The process's RSS stays within the queued-bytes budget
/// plus a margin while they push, and comes back once they leave; a bystander pair on
/// another IP keeps talking throughout.
mod memory {
    use std::net::Ipv4Addr;
    use std::time::Instant;

    use tokio_tungstenite::MaybeTlsStream;

    use super::*;

    const MIB: u64 = 1024 * 1024;
    const PAYLOAD: usize = 60_000;

    /// The resident set of process `pid`, in bytes.
    pub(super) fn rss(pid: u32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        kib * 1024
    }

    /// A raw client connecting from loopback address `ip` (any 127.0.0.x is ours), after its
    /// WELCOME, and its connection id. `tiny_window`: a 4 KiB receive buffer, so that the
    /// kernel holds next to nothing for a client that stops reading and the relay's own
    /// queues take the rest (what an attacker wants).
    pub(super) async fn client_from(
        ip: Ipv4Addr,
        addr: SocketAddr,
        tiny_window: bool,
    ) -> (Ws, u64) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if tiny_window {
            socket.set_recv_buffer_size(4096).unwrap();
        }
        socket.bind((ip, 0).into()).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let req = raw::upgrade_request(&ws_url(addr), Some(SUBPROTOCOL), None).unwrap();
        let (mut ws, _) = tokio::time::timeout(
            T,
            tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream)),
        )
        .await
        .unwrap()
        .unwrap();
        let (id, _) = raw::welcome(&mut ws).await.unwrap();
        (ws, id)
    }

    /// A client-to-server WebSocket binary frame carrying `payload`, masked with the key 0
    /// (masking is required; a zero key leaves the bytes as they are, so one buffer can be
    /// written again and again at no cost to the attacker).
    fn ws_frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x82];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(payload);
        f
    }

    /// One attacking IP: 63 receivers that never read and one sender pushing `rounds` SENDs
    /// of 60 KB to each of them as pre-built WebSocket frames (it reads and discards what it
    /// is sent, so only the receivers' queues grow). Returns the receivers, still open, and
    /// how many SENDs went out before the relay stopped taking them.
    async fn attack(ip: Ipv4Addr, addr: SocketAddr, rounds: usize) -> (Vec<Ws>, usize) {
        use tokio::io::AsyncWriteExt;
        let room = [ip.octets()[3]; 32];
        let mut receivers = Vec::new();
        let mut frames = Vec::new();
        let payload = vec![0xA7u8; PAYLOAD];
        for _ in 0..63 {
            let (mut ws, id) = client_from(ip, addr, true).await;
            join(&mut ws, room).await;
            receivers.push(ws);
            let send = pluresdb_sync_transport_relay::protocol::encode_send(&room, id, &payload);
            frames.push(ws_frame(&send));
        }
        let (mut sender, _) = client_from(ip, addr, false).await;
        join(&mut sender, room).await;
        let MaybeTlsStream::Plain(tcp) = sender.into_inner() else {
            unreachable!("ws://")
        };
        let (mut rd, mut wr) = tcp.into_split();
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while matches!(tokio::io::AsyncReadExt::read(&mut rd, &mut buf).await, Ok(n) if n > 0) {
            }
        });
        let mut sent = 0;
        'push: for _ in 0..rounds {
            for f in &frames {
                let r = tokio::time::timeout(Duration::from_secs(60), wr.write_all(f)).await;
                if !matches!(r, Ok(Ok(()))) {
                    break 'push;
                }
                sent += 1;
            }
        }
        drop(wr);
        drain.abort();
        (receivers, sent)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_reading_receivers_on_three_ips_stay_within_the_budget_and_memory_comes_back() {
        const BUDGET: u64 = 64 * MIB;
        let budget = BUDGET.to_string();
        let relay = Relay::start(&["--max-queued-bytes", &budget]).await;
        let pid = relay.child.id().unwrap();
        let mut by = Bystanders::new(relay.addr).await;
        by.exchange(100).await;
        let baseline = rss(pid);
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(baseline));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    peak.fetch_max(rss(pid), std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let started = Instant::now();
        let attackers = futures_util::future::join_all(
            [2u8, 3, 4].map(|i| attack(Ipv4Addr::new(127, 0, 0, i), relay.addr, 110)),
        );
        // The bystanders talk all along: every message arrives; the slowest round is noted.
        let talking = async {
            let mut slowest = Duration::ZERO;
            let mut rounds = 0u64;
            loop {
                let t = Instant::now();
                by.exchange(20).await;
                // The receiving bystander pings too, so it is not idle for the relay.
                send(&mut by.b, Frame::Ping(rounds)).await;
                assert_eq!(next_data(&mut by.b).await, Frame::Pong(rounds));
                slowest = slowest.max(t.elapsed());
                rounds += 1;
                if rounds >= 5 && started.elapsed() > Duration::from_secs(2) {
                    return (rounds, slowest);
                }
            }
        };
        let (results, (rounds, slowest)) = tokio::join!(attackers, talking);
        let attack_time = started.elapsed();
        let sent: usize = results.iter().map(|(_, s)| s).sum();
        let during = peak.load(std::sync::atomic::Ordering::Relaxed);
        drop(results);
        let left = Instant::now();
        let deadline = left + T;
        while relay.metric("pluresdb_relay_connections").await != 2 {
            assert!(
                Instant::now() < deadline,
                "attackers' connections did not close"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Memory comes back once they are gone (waiting for it, within the test's patience).
        let mut after = rss(pid);
        while after > baseline + 16 * MIB && Instant::now() < left + T {
            tokio::time::sleep(Duration::from_millis(100)).await;
            after = rss(pid);
        }
        let recovered = left.elapsed();
        sampler.abort();
        by.exchange(100).await;
        let budget_drops = relay
            .metric("pluresdb_relay_drops_total{reason=\"memory_budget\"}")
            .await;
        let slow = relay
            .metric("pluresdb_relay_drops_total{reason=\"slow_consumer\"}")
            .await;
        eprintln!(
            "memory attack: {sent} SENDs of {PAYLOAD} B ({} MiB) in {attack_time:?}; RSS baseline {} MiB, peak {} MiB, after {} MiB ({recovered:?} after they left); {budget_drops} closed for the budget, {slow} as slow consumers; bystanders: {rounds} rounds of 20 messages, slowest {slowest:?}",
            sent as u64 * PAYLOAD as u64 / MIB,
            baseline / MIB,
            during / MIB,
            after / MIB
        );
        assert!(
            sent as u64 * PAYLOAD as u64 > 4 * BUDGET,
            "the attack pushed too little to test anything"
        );
        assert!(
            during <= baseline + BUDGET + 64 * MIB,
            "RSS peaked at {} MiB (baseline {} MiB, budget {} MiB)",
            during / MIB,
            baseline / MIB,
            BUDGET / MIB
        );
        assert!(
            after <= baseline + 16 * MIB,
            "RSS stayed at {} MiB after the attackers left (baseline {} MiB)",
            after / MIB,
            baseline / MIB
        );
        assert!(budget_drops >= 1, "the budget never had to close a queue");
    }
}

/// Raw WebSocket bytes after a real upgrade (issue 10, "WebSocket details"): protocol errors
/// close with 1002 and are counted; pings and unfinished fragmented messages are not activity.
mod websocket {
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::MaybeTlsStream;

    use super::*;

    /// A client-to-server frame: `first` is the FIN/RSV/opcode byte; masked with the key 0
    /// (the payload goes as it is) unless `unmasked`.
    fn frame(first: u8, payload: &[u8], unmasked: bool) -> Vec<u8> {
        let mask = if unmasked { 0 } else { 0x80 };
        let mut f = vec![first];
        match payload.len() {
            n if n < 126 => f.push(mask | n as u8),
            n => {
                f.push(mask | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        if !unmasked {
            f.extend_from_slice(&[0; 4]);
        }
        f.extend_from_slice(payload);
        f
    }

    /// A joined client's raw TCP stream (after WELCOME and JOINED).
    async fn raw_tcp(addr: SocketAddr) -> tokio::net::TcpStream {
        let (mut ws, _) = client(addr).await;
        join(&mut ws, [0x3C; 32]).await;
        match ws.into_inner() {
            MaybeTlsStream::Plain(s) => s,
            _ => unreachable!("ws://"),
        }
    }

    /// Reads server frames until a close frame: its code and reason (within [`T`] in all).
    async fn close_of<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u16, String) {
        tokio::time::timeout(T, close_frame(s))
            .await
            .expect("no close frame in time")
    }

    async fn close_frame<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u16, String) {
        let mut buf = Vec::new();
        loop {
            // Parse what is there: server frames are unmasked.
            let mut at = 0;
            while buf.len() >= at + 2 {
                let (op, len7) = (buf[at] & 0x0F, (buf[at + 1] & 0x7F) as usize);
                let (len, head) = match len7 {
                    126 if buf.len() >= at + 4 => {
                        (u16::from_be_bytes([buf[at + 2], buf[at + 3]]) as usize, 4)
                    }
                    127 if buf.len() >= at + 10 => (
                        u64::from_be_bytes(buf[at + 2..at + 10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => break,
                    n => (n, 2),
                };
                if buf.len() < at + head + len {
                    break;
                }
                let body = &buf[at + head..at + head + len];
                if op == 8 {
                    let code = u16::from_be_bytes([body[0], body[1]]);
                    return (code, String::from_utf8_lossy(&body[2..]).into_owned());
                }
                at += head + len;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the connection ended without a close frame");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    #[tokio::test]
    async fn protocol_errors_close_with_1002_and_are_counted() {
        let relay = Relay::start(&[]).await;
        let mut by = Bystanders::new(relay.addr).await;
        let ping = Frame::Ping(1).encode();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("oversized ping", frame(0x89, &[7; 126], false)),
            ("RSV1 set", frame(0xC2, &ping, false)),
            ("reserved data opcode", frame(0x83, &ping, false)),
            ("reserved control opcode", frame(0x8B, &[], false)),
            ("unmasked binary", frame(0x82, &ping, true)),
            ("fragmented ping", frame(0x09, &[1], false)),
        ];
        for (name, bytes) in &cases {
            let mut s = raw_tcp(relay.addr).await;
            s.write_all(bytes).await.unwrap();
            let (code, reason) = close_of(&mut s).await;
            assert_eq!(code, 1002, "{name}: {reason}");
            assert!(reason.contains("protocol error"), "{name}: {reason}");
            by.exchange(20).await;
        }
        assert_eq!(
            relay
                .metric("pluresdb_relay_drops_total{reason=\"websocket_protocol\"}")
                .await,
            cases.len() as u64
        );
    }

    /// A client that only sends WebSocket pings, or keeps an unfinished fragmented message
    /// open with them, is closed at the idle timeout like any silent one.
    #[tokio::test]
    async fn pings_and_unfinished_messages_are_not_activity() {
        let relay = Relay::start(&["--idle-timeout-ms", "1500", "--ping-interval-ms", "500"]).await;
        for fragment in [false, true] {
            let (mut rd, mut wr) = raw_tcp(relay.addr).await.into_split();
            if fragment {
                // The first 60 KB of a binary message that never gets its last fragment.
                wr.write_all(&frame(0x02, &[0x03; 60_000], false))
                    .await
                    .unwrap();
            }
            let pinger = tokio::spawn(async move {
                while wr.write_all(&frame(0x89, b"alive", false)).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
            let (code, reason) = close_of(&mut rd).await;
            pinger.abort();
            assert_eq!(code, close_code::TIMEOUT, "fragment {fragment}: {reason}");
            assert!(reason.contains("nothing received"), "{reason}");
        }
        // Still serving.
        let (mut ws, _) = client(relay.addr).await;
        join(&mut ws, [5; 32]).await;
    }
}

/// The relay out of file descriptors (issue 10, "file descriptors"): started under
/// `prlimit --nofile=64:64`, flooded with connections on both listeners, it waits between
/// failing accepts instead of spinning, and a client gets in once the flood leaves.
mod descriptors {
    use super::*;

    /// CPU time (user + system) of process `pid`, in clock ticks (1/100 s).
    fn cpu_ticks(pid: u32) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // The fields after the command name (which ends with the last ')').
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    #[tokio::test]
    async fn out_of_descriptors_the_relay_backs_off_and_recovers() {
        let mut child = Command::new("prlimit")
            .args(["--nofile=64:64", env!("CARGO_BIN_EXE_pluresdb-sync")])
            .args([
                "relay",
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                "127.0.0.1:0",
            ])
            .args(["--handshake-timeout-ms", "120000"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("prlimit (util-linux) is needed");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut addr, mut metrics) = (None::<SocketAddr>, None::<SocketAddr>);
        while addr.is_none() || metrics.is_none() {
            let line = tokio::time::timeout(T, lines.next_line())
                .await
                .unwrap()
                .unwrap()
                .expect("relay exited early");
            if let Some(rest) = line.strip_prefix("relay listening on ws://") {
                addr = Some(rest.trim_end_matches("/relay").parse().unwrap());
            } else if let Some(rest) = line.strip_prefix("metrics on http://") {
                metrics = Some(rest.trim_end_matches("/metrics").parse().unwrap());
            }
        }
        let (addr, metrics) = (addr.unwrap(), metrics.unwrap());
        let pid = child.id().unwrap();
        // Silent TCP connections to both listeners, from several IPs (so the per-IP limit is
        // not what refuses them): far more than 64 descriptors.
        let mut flood = Vec::new();
        for i in 0..160u32 {
            let ip = std::net::Ipv4Addr::new(127, 0, 1, 1 + (i % 4) as u8);
            let target = if i % 2 == 0 { addr } else { metrics };
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind((ip, 0).into()).unwrap();
            flood.push(s.connect(target).await.unwrap());
        }
        // Let it hit the limit, then measure its CPU for two seconds.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (t0, c0) = (std::time::Instant::now(), cpu_ticks(pid));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let used = (cpu_ticks(pid) - c0) as f64 / 100.0 / t0.elapsed().as_secs_f64();
        eprintln!(
            "out of descriptors: the relay used {:.1}% of a core",
            used * 100.0
        );
        assert!(
            used < 0.25,
            "the relay spun at {:.0}% of a core",
            used * 100.0
        );
        // The flood leaves; a client gets in, and the metrics answer.
        drop(flood);
        let started = std::time::Instant::now();
        let deadline = started + T;
        let mut ws = loop {
            match tokio::time::timeout(Duration::from_secs(5), raw::client(&ws_url(addr))).await {
                Ok(Ok((ws, _))) => break ws,
                _ => assert!(std::time::Instant::now() < deadline, "no client got in"),
            }
        };
        join(&mut ws, [0x44; 32]).await;
        eprintln!(
            "a client got in {:?} after the flood left",
            started.elapsed()
        );
        // The flood's connections are counted until the relay has read each one's end: wait
        // for that, not for a fixed time.
        loop {
            let text = http(metrics, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
            if text.contains("pluresdb_relay_connections 1\n") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the flood's connections are still counted: {text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
