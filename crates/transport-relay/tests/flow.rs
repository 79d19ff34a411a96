//! End-to-end flow control: a connection whose application does not read blocks only its own
//! sender; a peer that ignores its window loses the session; a peer without flow control is
//! named. Real relay server on loopback; the misbehaving peers are raw protocol clients.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::time::Duration;

use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_core::topic::{Domain, derive_from_topic};
use pluresdb_sync_core::{Connection, Identity, TopicHash, Transport};
use pluresdb_sync_transport_relay::protocol::{
    ClientFrame, Frame, RelayFrame, RoomId, SUBPROTOCOL,
};
use pluresdb_sync_transport_relay::server::RelayServer;
use pluresdb_sync_transport_relay::{
    FLOW_WINDOW_BYTES, RelayTransport, SESSION_VERSION, SessionError,
};
use tokio::sync::mpsc;

mod common;
use common::{
    T, Ws, accept, errors, joined, next, next_message, raw, recv, relay, send, wait_for_error,
};

const WINDOW: usize = FLOW_WINDOW_BYTES as usize;

fn transport_with(url: &str, encryption: bool) -> RelayTransport {
    RelayTransport::builder()
        .relay_url(url)
        .encryption(encryption)
        .timeout(T)
        .build()
        .unwrap()
}

/// The next `n` connections of `rx`, by peer id.
async fn conns(
    rx: &mut mpsc::Receiver<Box<dyn Connection>>,
    n: usize,
) -> HashMap<String, Box<dyn Connection>> {
    let mut out = HashMap::new();
    while out.len() < n {
        let c = accept(rx).await;
        out.insert(c.peer_id().to_owned(), c);
    }
    out
}

/// Message `i` of `len` bytes: its index, then a fill that depends on it.
fn msg(i: usize, len: usize) -> Vec<u8> {
    let mut m = vec![(i % 251) as u8; len];
    m[..4].copy_from_slice(&(i as u32).to_be_bytes());
    m
}

/// `n` messages of `len` bytes from `x` to `y` and then back, each checked in order.
async fn exchange(x: &mut Box<dyn Connection>, y: &mut Box<dyn Connection>, n: usize, len: usize) {
    one_way(x, y, n, len).await;
    one_way(y, x, n, len).await;
}

async fn one_way(
    from: &mut Box<dyn Connection>,
    to: &mut Box<dyn Connection>,
    n: usize,
    len: usize,
) {
    let send = async {
        for i in 0..n {
            tokio::time::timeout(T, from.send(&msg(i, len)))
                .await
                .unwrap()
                .unwrap();
        }
    };
    let check = async {
        for i in 0..n {
            assert_eq!(recv(to).await, msg(i, len), "message {i}");
        }
    };
    tokio::join!(send, check);
}

fn assert_no_slow_consumer(t: &RelayTransport) {
    let errors = errors(t);
    assert!(
        !errors
            .iter()
            .any(|e| e.contains("4009") || e.contains("flow")),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_reads_blocks_only_its_own_sender() {
    const LEN: usize = 32 * 1024; // one chunk: a timed-out send leaves nothing behind
    const TOTAL: usize = 3 * WINDOW / LEN;
    let (_server, url) = relay().await;
    let (mut a, mut b, mut c) = (
        transport_with(&url, true),
        transport_with(&url, true),
        transport_with(&url, true),
    );
    let topic = fresh_topic("never-reads");
    let (mut a_rx, mut b_rx, mut c_rx) = (
        a.connect(topic).await.unwrap(),
        b.connect(topic).await.unwrap(),
        c.connect(topic).await.unwrap(),
    );
    let (mut a_conns, mut b_conns, mut c_conns) = (
        conns(&mut a_rx, 2).await,
        conns(&mut b_rx, 2).await,
        conns(&mut c_rx, 2).await,
    );
    let mut ab = a_conns.remove(&b.peer_id()).unwrap();
    let mut ac = a_conns.remove(&c.peer_id()).unwrap();
    let mut ba = b_conns.remove(&a.peer_id()).unwrap();
    let mut bc = b_conns.remove(&c.peer_id()).unwrap();
    let mut ca = c_conns.remove(&a.peer_id()).unwrap();
    let mut cb = c_conns.remove(&b.peer_id()).unwrap();

    // A sends to B, whose application does not read, until send blocks.
    let mut sent = 0;
    loop {
        assert!(
            sent < TOTAL,
            "send to a peer that never reads never blocked"
        );
        match tokio::time::timeout(Duration::from_secs(2), ab.send(&msg(sent, LEN))).await {
            Ok(r) => {
                r.unwrap();
                sent += 1;
                assert!(
                    sent * LEN <= WINDOW,
                    "{sent} messages of {LEN} bytes went beyond the {WINDOW}-byte window"
                );
            }
            // Blocked with most of the window used: the window is what stopped it.
            Err(_) if sent * LEN >= WINDOW / 2 => break,
            Err(_) => {} // a slow machine, not the window: keep going
        }
    }

    // Meanwhile every other session of A, B and C flows both ways, more than a window each.
    exchange(&mut ac, &mut ca, 100, 64 * 1024).await;
    exchange(&mut bc, &mut cb, 100, 64 * 1024).await;
    exchange(&mut ac, &mut ca, 2000, 16).await;
    // A's send to B is still blocked.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), ab.send(&msg(sent, LEN)))
            .await
            .is_err()
    );

    // B reads at last: every message arrives, in order, and A's remaining sends complete.
    let sender = tokio::spawn(async move {
        for i in sent..TOTAL {
            tokio::time::timeout(T, ab.send(&msg(i, LEN)))
                .await
                .unwrap()
                .unwrap();
        }
        ab
    });
    for i in 0..TOTAL {
        assert_eq!(recv(&mut ba).await, msg(i, LEN), "message {i} from A");
    }
    let _ab = tokio::time::timeout(T, sender).await.unwrap().unwrap();
    for t in [&a, &b, &c] {
        assert_no_slow_consumer(t);
    }
    for t in [&mut a, &mut b, &mut c] {
        t.disconnect().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_cancelled_mid_message_is_dropped_whole() {
    let (_server, url) = relay().await;
    let (mut a, mut b) = (transport_with(&url, true), transport_with(&url, true));
    let topic = fresh_topic("cancelled-send");
    let (mut a_rx, mut b_rx) = (
        a.connect(topic).await.unwrap(),
        b.connect(topic).await.unwrap(),
    );
    let mut ab = accept(&mut a_rx).await;
    let mut ba = accept(&mut b_rx).await;
    // A first message B does not read yet uses half the window; then 16 MiB does not fit in
    // what is left: the send blocks part way through, and is cancelled there.
    let filler = msg(0, WINDOW / 2);
    tokio::time::timeout(T, ab.send(&filler))
        .await
        .unwrap()
        .unwrap();
    let big = msg(1, pluresdb_sync_core::MAX_MESSAGE_BYTES);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), ab.send(&big))
            .await
            .is_err()
    );
    let sender = tokio::spawn(async move {
        ab.send(b"after").await.unwrap();
        ab.send(&big).await.unwrap();
        ab
    });
    // B never sees the torn message: the next one arrives whole, then a full 16 MiB one.
    assert!(recv(&mut ba).await == filler);
    assert_eq!(recv(&mut ba).await, b"after");
    assert_eq!(
        recv(&mut ba).await,
        msg(1, pluresdb_sync_core::MAX_MESSAGE_BYTES)
    );
    tokio::time::timeout(T, sender).await.unwrap().unwrap();
    assert_no_slow_consumer(&b);
}

/// A raw relay client that speaks the end-to-end protocol unencrypted, as the test wants.
struct Raw {
    ws: Ws,
    room: RoomId,
    id: Identity,
    key: [u8; 32],
}

impl Raw {
    /// Connects and joins `topic`'s room; returns the members already there.
    async fn join(server: &RelayServer, topic: &TopicHash) -> (Self, Vec<u64>) {
        let (mut ws, _) = raw(server.local_addr()).await;
        let room = derive_from_topic(topic, Domain::RelayRoom);
        let peers = joined(&mut ws, room).await;
        let id = Identity::generate().unwrap();
        let key = id.public_bytes();
        (Self { ws, room, id, key }, peers)
    }

    async fn send(&mut self, to: u64, payload: Vec<u8>) {
        let room = self.room;
        send(
            &mut self.ws,
            Frame::Client(ClientFrame::Send { room, to, payload }),
        )
        .await;
    }

    /// The next DELIVER payload, and who sent it.
    async fn deliver(&mut self) -> (u64, Vec<u8>) {
        loop {
            if let Frame::Relay(RelayFrame::Deliver { from, payload, .. }) =
                next(&mut self.ws).await
            {
                return (from, payload);
            }
        }
    }

    /// The next DELIVER payload from `from`.
    async fn deliver_from(&mut self, from: u64) -> Vec<u8> {
        loop {
            let (f, payload) = self.deliver().await;
            if f == from {
                return payload;
            }
        }
    }

    /// A Noise state of `pattern` (`XXpsk0`: this version; `XXpsk3`: session versions 1 and
    /// 2) for the topic, with this client's key.
    fn noise_state(&self, topic: &TopicHash, psk0: bool, initiator: bool) -> snow::HandshakeState {
        let mut prologue = SUBPROTOCOL.as_bytes().to_vec();
        prologue.extend_from_slice(&self.room);
        let (pattern, at) = if psk0 {
            ("Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s", 0)
        } else {
            ("Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s", 3)
        };
        let (secret, psk) = (
            self.id.secret_bytes(),
            derive_from_topic(topic, Domain::NoisePsk),
        );
        let b = snow::Builder::new(pattern.parse().unwrap())
            .local_private_key(&secret)
            .unwrap()
            .psk(at, &psk)
            .unwrap()
            .prologue(&prologue)
            .unwrap();
        if initiator {
            b.build_initiator().unwrap()
        } else {
            b.build_responder().unwrap()
        }
    }

    /// The Noise XXpsk0 handshake (HS1 0x04, HS2 0x05, HS3 0x06) as the initiator with relay
    /// connection `to`, sending `params` as the payload of message 3. Returns the transport
    /// state and the responder's static key.
    async fn noise(
        &mut self,
        topic: &TopicHash,
        to: u64,
        params: &[u8],
    ) -> (snow::StatelessTransportState, Vec<u8>) {
        let mut hs = self.noise_state(topic, true, true);
        let mut buf = vec![0u8; 1024];
        let n = hs.write_message(&[], &mut buf).unwrap();
        self.send(to, [&[0x04][..], &buf[..n]].concat()).await;
        let hs2 = self.deliver_from(to).await;
        assert_eq!(hs2[0], 0x05, "expected HS2, got {hs2:?}");
        hs.read_message(&hs2[1..], &mut buf).unwrap();
        let n = hs.write_message(params, &mut buf).unwrap();
        self.send(to, [&[0x06][..], &buf[..n]].concat()).await;
        let remote = hs.get_remote_static().unwrap().to_vec();
        (hs.into_stateless_transport_mode().unwrap(), remote)
    }

    /// A session version 2 initiator: its XXpsk3 HS1 (kind 0x01, empty payload) to `to`.
    async fn v2_hs1(&mut self, topic: &TopicHash, to: u64) {
        let mut hs = self.noise_state(topic, false, true);
        let mut buf = vec![0u8; 1024];
        let n = hs.write_message(&[], &mut buf).unwrap();
        self.send(to, [&[0x01][..], &buf[..n]].concat()).await;
    }

    /// A session version 2 responder to whoever starts: it cannot read the XXpsk0 HS1 (kind
    /// 0x04, unknown to it, so it ignores it) and answers the XXpsk3 version probe (kind
    /// 0x01) with its HS2 (kind 0x02) carrying version 2's parameters. Returns who started.
    async fn v2_responder(&mut self, topic: &TopicHash) -> u64 {
        let mut hs = self.noise_state(topic, false, false);
        let (from, hs1) = self.deliver().await;
        assert_eq!(hs1[0], 0x04, "expected HS1, got {hs1:?}");
        let probe = self.deliver_from(from).await;
        assert_eq!(probe[0], 0x01, "expected the version probe, got {probe:?}");
        let mut buf = vec![0u8; 1024];
        let n = hs.read_message(&probe[1..], &mut buf).unwrap();
        assert_eq!(
            buf[0], SESSION_VERSION,
            "the probe names the prober's version"
        );
        assert_eq!(n, 5);
        let params = [&[2][..], &FLOW_WINDOW_BYTES.to_be_bytes()].concat();
        let n = hs.write_message(&params, &mut buf).unwrap();
        self.send(from, [&[0x02][..], &buf[..n]].concat()).await;
        from
    }

    /// An unencrypted HELLO: kind, static key, and (unless `v1`) the session parameters.
    fn hello(&self, v1: bool) -> Vec<u8> {
        let mut m = vec![0x20];
        m.extend_from_slice(&self.key);
        if !v1 {
            m.push(SESSION_VERSION);
            m.extend_from_slice(&FLOW_WINDOW_BYTES.to_be_bytes());
        }
        m
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_ignores_its_window_loses_the_session_and_nothing_else() {
    ignores_its_window(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_peer_that_ignores_its_window_loses_the_session_and_nothing_else() {
    ignores_its_window(true).await;
}

async fn ignores_its_window(encryption: bool) {
    const LEN: usize = 60_000;
    let (server, url) = relay().await;
    let (mut victim, mut honest) = (
        transport_with(&url, encryption),
        transport_with(&url, encryption),
    );
    let topic = fresh_topic("hostile-credit");
    let mut v_rx = victim.connect(topic).await.unwrap();
    let mut h_rx = honest.connect(topic).await.unwrap();
    let mut vh = accept(&mut v_rx).await;
    let mut hv = accept(&mut h_rx).await;

    // The hostile peer greets everyone, finds the victim by its static key, then floods it
    // with four windows of messages without waiting for any credit.
    let (mut x, members) = Raw::join(&server, &topic).await;
    assert_eq!(members.len(), 2);
    let victim_key = hex::decode(victim.peer_id()).unwrap();
    let mut cipher = None;
    let victim_conn = if encryption {
        let mut found = None;
        for m in members {
            let (c, key) = x
                .noise(
                    &topic,
                    m,
                    &[&[SESSION_VERSION][..], &FLOW_WINDOW_BYTES.to_be_bytes()].concat(),
                )
                .await;
            if key == victim_key {
                cipher = Some(c);
                found = Some(m);
            }
        }
        found.expect("the victim answered the handshake")
    } else {
        for m in &members {
            let hello = x.hello(false);
            x.send(*m, hello).await;
        }
        loop {
            let (from, payload) = x.deliver().await;
            if payload.first() == Some(&0x20) && payload[1..33] == victim_key[..] {
                break from;
            }
        }
    };
    let mut vx = accept(&mut v_rx).await;
    assert_eq!(vx.peer_id(), hex::encode(x.key));
    let frames = 4 * WINDOW / LEN;
    for i in 0..frames {
        let mut chunk = vec![1]; // LAST
        chunk.extend_from_slice(&msg(i, LEN));
        let frame = match &cipher {
            Some(c) => {
                let mut sealed = vec![0u8; 1 + chunk.len() + 16];
                sealed[0] = 0x10; // SEALED
                let n = c.write_message(i as u64, &chunk, &mut sealed[1..]).unwrap();
                sealed.truncate(1 + n);
                sealed
            }
            None => [&[0x21][..], &chunk].concat(), // PLAIN
        };
        x.send(victim_conn, frame).await;
    }

    let err = wait_for_error(&victim, "flow-control window").await;
    assert!(
        matches!(
            err.session_cause(),
            Some(SessionError::WindowExceeded { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&hex::encode(x.key)), "{err}");
    // What the victim holds for the hostile peer is what its window allowed, then the error.
    let mut held = 0;
    let end = loop {
        match tokio::time::timeout(T, vx.receive()).await.unwrap() {
            Ok(Some(m)) => {
                assert_eq!(m, msg(held / LEN, LEN));
                held += m.len();
            }
            other => break other,
        }
    };
    assert!(
        held > 0 && held <= WINDOW,
        "{held} bytes held for the hostile peer"
    );
    let end = end.unwrap_err().to_string();
    assert!(end.contains("flow-control window"), "{end}");
    assert!(vx.send(b"x").await.is_err());

    // The victim's other session is unaffected, both ways, well beyond a window.
    exchange(&mut vh, &mut hv, 200, 64 * 1024).await;
    assert!(
        !errors(&victim).iter().any(|e| e.contains("4009")),
        "{:?}",
        errors(&victim)
    );
    victim.disconnect().await.unwrap();
    honest.disconnect().await.unwrap();
}

#[tokio::test]
async fn a_peer_without_flow_control_gets_a_clear_error_not_a_hang() {
    without_flow_control(false).await;
}

#[tokio::test]
async fn an_encrypted_peer_without_flow_control_gets_a_clear_error_not_a_hang() {
    without_flow_control(true).await;
}

/// An older peer is rejected with a clear error on this side and a REJECT on its side, not
/// left to hang: encrypted, a session version 2 initiator (XXpsk3); unencrypted, a version 1
/// HELLO (no session parameters, so no flow control).
async fn without_flow_control(encryption: bool) {
    let (server, url) = relay().await;
    let mut victim = transport_with(&url, encryption);
    let topic = fresh_topic("v1-peer");
    let mut v_rx = victim.connect(topic).await.unwrap();
    let (mut x, members) = Raw::join(&server, &topic).await;
    let [v] = members[..] else {
        panic!("{members:?}")
    };
    let remote = if encryption {
        x.v2_hs1(&topic, v).await;
        2
    } else {
        let hello = x.hello(true);
        x.send(v, hello).await;
        1
    };
    rejected_as_old(&mut x, v, &mut victim, &mut v_rx, remote).await;
}

/// `x` gets REJECT (version mismatch) from relay connection `v`, and `t` reports the clear
/// error (the peer's version `remote`) and hands out no connection.
async fn rejected_as_old(
    x: &mut Raw,
    v: u64,
    t: &mut RelayTransport,
    rx: &mut mpsc::Receiver<Box<dyn Connection>>,
    remote: u8,
) {
    let reject = x.deliver_from(v).await;
    assert_eq!(
        reject,
        [0x2F, 2, SESSION_VERSION],
        "REJECT, version mismatch, our version"
    );
    let err = wait_for_error(t, &format!("session version {remote}")).await;
    assert_eq!(
        err.session_cause(),
        Some(&SessionError::VersionMismatch {
            local: SESSION_VERSION,
            remote
        })
    );
    assert!(err.to_string().contains("flow control"), "{err}");
    assert!(
        rx.try_recv().is_err(),
        "no connection for a peer that was rejected"
    );
    t.disconnect().await.unwrap();
}

/// The other direction: this side starts the handshake and a session version 2 responder
/// answers the version probe. This side rejects it with the same clear error.
#[tokio::test]
async fn a_v2_responder_gets_a_clear_error_not_a_hang() {
    let (server, url) = relay().await;
    let topic = fresh_topic("v2-responder");
    let (mut x, members) = Raw::join(&server, &topic).await;
    assert!(members.is_empty(), "{members:?}");
    // The newcomer starts every handshake: the transport joins second.
    let mut newcomer = transport_with(&url, true);
    let mut n_rx = newcomer.connect(topic).await.unwrap();
    let n = x.v2_responder(&topic).await;
    rejected_as_old(&mut x, n, &mut newcomer, &mut n_rx, 2).await;
}

/// `chunk` sealed with `nonce` as a SEALED peer frame.
fn sealed(c: &snow::StatelessTransportState, nonce: u64, chunk: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 1 + chunk.len() + 16];
    out[0] = 0x10;
    let n = c.write_message(nonce, chunk, &mut out[1..]).unwrap();
    out.truncate(1 + n);
    out
}

/// A raw client that joined after `victim` (the only member) and completed the encrypted
/// handshake with it, the victim's connection to it, and the victim's relay connection id.
async fn raw_session(
    server: &RelayServer,
    topic: &TopicHash,
    victim: &RelayTransport,
    v_rx: &mut mpsc::Receiver<Box<dyn Connection>>,
) -> (Raw, snow::StatelessTransportState, u64, Box<dyn Connection>) {
    let (mut x, members) = Raw::join(server, topic).await;
    let [v] = members[..] else {
        panic!("{members:?}")
    };
    let params = [&[SESSION_VERSION][..], &FLOW_WINDOW_BYTES.to_be_bytes()].concat();
    let (cipher, key) = x.noise(topic, v, &params).await;
    assert_eq!(hex::encode(key), victim.peer_id());
    let vx = accept(v_rx).await;
    assert_eq!(vx.peer_id(), hex::encode(x.key));
    (x, cipher, v, vx)
}

/// REJECT, reason 3: no session.
const REJECT_NO_SESSION: [u8; 2] = [0x2F, 3];

/// A peer that only looked the topic up (no `connect` receiver) still completes handshakes;
/// nobody reads those sessions, so once one's window is full it is closed (CLOSE), and the
/// sender's send fails instead of waiting forever. A later `connect` gets connections again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_only_looked_up_never_blocks_a_sender_forever() {
    const LEN: usize = 1024 * 1024;
    let (_server, url) = relay().await;
    let (mut a, mut b) = (transport_with(&url, true), transport_with(&url, true));
    let topic = fresh_topic("lookup-only");
    let mut a_rx = a.connect(topic).await.unwrap();
    // B only looks the topic up: it joins as an observer and handshakes with A.
    assert!(b.lookup(topic).await.unwrap().is_empty());
    let mut ab = accept(&mut a_rx).await;
    assert_eq!(ab.peer_id(), b.peer_id());

    let mut sent = 0;
    let err = loop {
        assert!(
            sent <= 2 * WINDOW / LEN,
            "{sent} messages went to a peer that reads nothing"
        );
        match tokio::time::timeout(T, ab.send(&msg(sent, LEN)))
            .await
            .expect("send to a peer without a reader hung")
        {
            Ok(()) => sent += 1,
            Err(e) => break e.to_string(),
        }
    };
    assert!(err.contains("closed"), "{err}");
    assert!(sent * LEN <= WINDOW, "{sent} messages sent");
    let why = wait_for_error(&b, "nothing reads it").await;
    assert!(
        matches!(why.session_cause(), Some(SessionError::Unread { .. })),
        "{why}"
    );
    assert!(why.to_string().contains(&a.peer_id()), "{why}");
    assert!(next_message(&mut ab).await.is_none());

    // B connects now: both get a connection to the other, which works both ways.
    let mut b_rx = b.connect(topic).await.unwrap();
    let mut ba = accept(&mut b_rx).await;
    assert_eq!(ba.peer_id(), a.peer_id());
    let mut ab = accept(&mut a_rx).await;
    assert_eq!(ab.peer_id(), b.peer_id());
    exchange(&mut ab, &mut ba, 40, 1024 * 1024).await;
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
}

/// A data frame for a session this side does not have, and a session that fails here, are
/// answered with REJECT (no session), so the peer's send never waits for credit forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_ends_here_without_close_is_rejected_to_the_peer() {
    let (server, url) = relay().await;
    let mut victim = transport_with(&url, true);
    let topic = fresh_topic("no-session");
    let mut v_rx = victim.connect(topic).await.unwrap();

    // A data frame with no session at all.
    let (mut y, members) = Raw::join(&server, &topic).await;
    let [v] = members[..] else {
        panic!("{members:?}")
    };
    y.send(v, [&[0x10][..], &[7u8; 40][..]].concat()).await;
    assert_eq!(y.deliver_from(v).await, REJECT_NO_SESSION);
    drop(y);

    // A session that fails in the connection (a frame that does not decrypt).
    let (mut x, _cipher, v, mut vx) = raw_session(&server, &topic, &victim, &mut v_rx).await;
    x.send(v, [&[0x10][..], &[9u8; 40][..]].concat()).await;
    let err = tokio::time::timeout(T, vx.receive())
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("decryption failed"), "{err}");
    assert_eq!(x.deliver_from(v).await, REJECT_NO_SESSION);
    assert!(next_message(&mut vx).await.is_none());
    victim.disconnect().await.unwrap();
}

/// The other side of it: a peer that answers REJECT (no session) ends our session, and a send
/// waiting for credit returns an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_waiting_for_credit_fails_when_the_peer_has_no_session() {
    const LEN: usize = 1024 * 1024;
    let (server, url) = relay().await;
    let mut a = transport_with(&url, true);
    let topic = fresh_topic("rejected-sender");
    let mut a_rx = a.connect(topic).await.unwrap();
    let (mut x, _cipher, v, mut ax) = raw_session(&server, &topic, &a, &mut a_rx).await;
    let sender = tokio::spawn(async move {
        for i in 0..4 * WINDOW / LEN {
            if let Err(e) = ax.send(&msg(i, LEN)).await {
                return (i, e.to_string());
            }
        }
        panic!("sent four windows to a peer that never granted credit");
    });
    // The raw peer reads (and never credits) until A's window is nearly used: A now waits.
    let mut got = 0;
    while got + 2 * LEN < WINDOW {
        got += x.deliver_from(v).await.len();
    }
    x.send(v, REJECT_NO_SESSION.to_vec()).await;
    let (sent, err) = tokio::time::timeout(T, sender)
        .await
        .expect("a send waiting for credit hung after REJECT")
        .unwrap();
    assert!(sent * LEN <= WINDOW, "{sent}");
    assert!(err.contains("closed"), "{err}");
    let why = wait_for_error(&a, "has no session").await;
    assert_eq!(why.session_cause(), Some(&SessionError::NoSession));
    assert!(why.to_string().contains(&hex::encode(x.key)), "{why}");
    a.disconnect().await.unwrap();
}

/// After a failure, `receive` returns `Ok(None)`: never a frame still queued behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_after_a_failure_returns_none_not_what_was_queued() {
    let (server, url) = relay().await;
    let mut victim = transport_with(&url, true);
    let topic = fresh_topic("after-failure");
    let mut v_rx = victim.connect(topic).await.unwrap();
    let (mut x, cipher, v, mut vx) = raw_session(&server, &topic, &victim, &mut v_rx).await;
    // A frame that does not decrypt, a good message, then a frame the socket task fails the
    // session on (PLAIN in an encrypted session), whose REJECT shows all three were queued.
    x.send(v, [&[0x10][..], &[9u8; 40][..]].concat()).await;
    x.send(v, sealed(&cipher, 0, &[&[1][..], b"after"].concat()))
        .await;
    x.send(v, vec![0x21, 1, 1]).await;
    assert_eq!(x.deliver_from(v).await, REJECT_NO_SESSION);
    let err = tokio::time::timeout(T, vx.receive())
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("decryption failed"), "{err}");
    for _ in 0..3 {
        assert_eq!(
            tokio::time::timeout(T, vx.receive())
                .await
                .unwrap()
                .unwrap(),
            None
        );
    }
    assert!(vx.send(b"x").await.is_err());
    victim.disconnect().await.unwrap();
}

/// Both sides send one message of the largest size before reading: both sends complete (one
/// such message always fits in an empty window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_sending_the_largest_message_before_reading_do_not_deadlock() {
    const MAX: usize = pluresdb_sync_core::MAX_MESSAGE_BYTES;
    let (_server, url) = relay().await;
    let (mut a, mut b) = (transport_with(&url, true), transport_with(&url, true));
    let topic = fresh_topic("both-send-max");
    let mut a_rx = a.connect(topic).await.unwrap();
    let mut b_rx = b.connect(topic).await.unwrap();
    let mut ab = accept(&mut a_rx).await;
    let mut ba = accept(&mut b_rx).await;
    let (at_a, at_b) = tokio::join!(send_then_receive(&mut ab, 1), send_then_receive(&mut ba, 2));
    assert!(at_a == msg(2, MAX), "A got the wrong message");
    assert!(at_b == msg(1, MAX), "B got the wrong message");
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
}

/// Sends message `i` of the largest size, then receives one.
async fn send_then_receive(c: &mut Box<dyn Connection>, i: usize) -> Vec<u8> {
    let m = msg(i, pluresdb_sync_core::MAX_MESSAGE_BYTES);
    tokio::time::timeout(T, c.send(&m))
        .await
        .expect("send of the largest message deadlocked")
        .unwrap();
    recv(c).await
}

/// `disconnect` sends CLOSE on every live session, so the peer learns at once (before the
/// relay's PEER_LEFT, which alone told it before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_sends_close_on_every_session() {
    let (server, url) = relay().await;
    let mut leaving = transport_with(&url, true);
    let topic = fresh_topic("disconnect-close");
    let mut l_rx = leaving.connect(topic).await.unwrap();
    let (mut x, cipher, v, _held) = raw_session(&server, &topic, &leaving, &mut l_rx).await;
    leaving.disconnect().await.unwrap();
    let close = x.deliver_from(v).await;
    assert_eq!(close[0], 0x10, "SEALED: {close:?}");
    let mut out = [0u8; 64];
    let n = cipher
        .read_message(1 << 63, &close[1..], &mut out)
        .expect("sealed with the first control nonce");
    assert_eq!(&out[..n], &[2], "a CLOSE chunk");
    match next(&mut x.ws).await {
        Frame::Relay(RelayFrame::PeerLeft { peer, .. }) => assert_eq!(peer, v),
        other => panic!("expected PEER_LEFT after the CLOSE, got {other:?}"),
    }
}
