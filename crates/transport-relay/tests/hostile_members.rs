//! A room member that knows only the room hash (any relay client; the relay operator too)
//! attacking the peers in the room through a real relay on loopback: it must not learn a
//! static key, must not make a peer do Diffie-Hellman without the topic, and floods of
//! handshake openings get a handful of answers and log lines, not one each.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_core::topic::{Domain, derive_from_topic};
use pluresdb_sync_core::{Connection, TopicHash, Transport};
use pluresdb_sync_transport_relay::RelayTransport;
use pluresdb_sync_transport_relay::protocol::{
    ClientFrame, Frame, RelayFrame, RoomId, SUBPROTOCOL,
};
use pluresdb_sync_transport_relay::testkit::scalar_mults;

mod common;
use common::{T, Ws, accept, joined, next, raw, recv, relay, send};

const XXPSK3: &str = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s";
const XXPSK0: &str = "Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s";
/// REJECT (no session): the victim's answer to a SEALED frame from a peer it has no session
/// with. Everything the attacker sent before it has been handled by then.
const REJECT_NO_SESSION: [u8; 2] = [0x2F, 3];

fn transport(url: &str) -> RelayTransport {
    RelayTransport::builder()
        .relay_url(url)
        .timeout(T)
        .build()
        .unwrap()
}

/// A raw relay client in a room: it knows the room hash and nothing else.
struct Member {
    ws: Ws,
    room: RoomId,
}

impl Member {
    /// Joins `room` and says something harmless to every member (a REJECT about no session,
    /// which a peer without a session with it ignores), so that none of them greets it
    /// after the PEER_JOINED fallback.
    async fn join(addr: std::net::SocketAddr, room: RoomId) -> (Self, Vec<u64>) {
        let (mut ws, _) = raw(addr).await;
        let peers = joined(&mut ws, room).await;
        let mut m = Self { ws, room };
        for &p in &peers {
            m.send(p, REJECT_NO_SESSION.to_vec()).await;
        }
        (m, peers)
    }

    async fn send(&mut self, to: u64, payload: Vec<u8>) {
        let room = self.room;
        send(
            &mut self.ws,
            Frame::Client(ClientFrame::Send { room, to, payload }),
        )
        .await;
    }

    /// The next DELIVER: who sent it and its payload.
    async fn deliver(&mut self) -> (u64, Vec<u8>) {
        loop {
            if let Frame::Relay(RelayFrame::Deliver { from, payload, .. }) =
                next(&mut self.ws).await
            {
                return (from, payload);
            }
        }
    }

    /// Ends whatever `to` holds for this member (a REJECT naming another version ends any
    /// attempt), then a SEALED frame `to` has no session for: everything sent before has
    /// been handled once its REJECT (no session) comes back. Returns what `to` sent this
    /// member meanwhile.
    async fn sync(&mut self, to: u64) -> Vec<Vec<u8>> {
        self.send(to, vec![0x2F, 2, 99]).await;
        self.send(to, [&[0x10][..], &[0u8; 40][..]].concat()).await;
        let mut got = Vec::new();
        loop {
            let (from, payload) = self.deliver().await;
            if from != to {
                continue;
            }
            if payload == REJECT_NO_SESSION {
                return got;
            }
            got.push(payload);
        }
    }
}

/// A Noise initiator of `pattern` in `room` with `psk` (the attacker has no topic, so any).
fn initiator(pattern: &str, room: &RoomId, psk: &[u8; 32]) -> snow::HandshakeState {
    let mut prologue = SUBPROTOCOL.as_bytes().to_vec();
    prologue.extend_from_slice(room);
    let key = snow::Builder::new(pattern.parse().unwrap())
        .generate_keypair()
        .unwrap();
    snow::Builder::new(pattern.parse().unwrap())
        .local_private_key(&key.private)
        .unwrap()
        .psk(if pattern == XXPSK0 { 0 } else { 3 }, psk)
        .unwrap()
        .prologue(&prologue)
        .unwrap()
        .build_initiator()
        .unwrap()
}

/// Message 1 of `hs` (empty payload) as a peer frame of `kind`.
fn message1(hs: &mut snow::HandshakeState, kind: u8) -> Vec<u8> {
    let mut buf = [0u8; 128];
    let n = hs.write_message(&[], &mut buf).unwrap();
    [&[kind][..], &buf[..n]].concat()
}

/// A victim in `topic`'s room and an honest peer it has a session with.
async fn victim_and_friend(
    url: &str,
    topic: TopicHash,
) -> (
    RelayTransport,
    RelayTransport,
    Box<dyn Connection>,
    Box<dyn Connection>,
) {
    let mut victim = transport(url);
    let mut friend = transport(url);
    let mut v_rx = victim.connect(topic).await.unwrap();
    let mut f_rx = friend.connect(topic).await.unwrap();
    let vf = accept(&mut v_rx).await;
    let fv = accept(&mut f_rx).await;
    (victim, friend, vf, fv)
}

/// Every handshake opening a member without the topic can make, against a peer, and whether
/// the peer's answers reveal its static key: they must not, and the peer does no curve
/// arithmetic for any of them. (With `XXpsk3`, message 2 carries the responder's static key
/// encrypted only under ephemeral keys, so the member read it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_member_without_the_topic_learns_no_static_key_and_costs_no_dh() {
    let (server, url) = relay().await;
    let topic = fresh_topic("identity-leak");
    let room = derive_from_topic(&topic, Domain::RelayRoom);
    let (mut victim, mut friend, mut vf, mut fv) = victim_and_friend(&url, topic).await;
    let victim_key = hex::decode(victim.peer_id()).unwrap();
    let (mut x, members) = Member::join(server.local_addr(), room).await;
    assert_eq!(members.len(), 2);
    let before = scalar_mults(&victim);
    let guess = [7u8; 32];
    for &v in &members {
        // XXpsk3 message 1 (the old HS1), XXpsk0 message 1 with a guessed PSK under both
        // kinds, and garbage of the right length.
        let mut old = initiator(XXPSK3, &room, &guess);
        x.send(v, message1(&mut old, 0x01)).await;
        let mut new = initiator(XXPSK0, &room, &guess);
        let hs1 = message1(&mut new, 0x04);
        x.send(v, hs1.clone()).await;
        x.send(v, [&[0x01][..], &hs1[1..]].concat()).await;
        x.send(v, [&[0x04][..], &[0x5A; 48][..]].concat()).await;
        let answers = x.sync(v).await;
        for a in &answers {
            // Whatever came back, try to read it as message 2 of the attempts made.
            for (kind, hs) in [(0x02, &mut old), (0x05, &mut new)] {
                let mut out = [0u8; 256];
                if a[0] == kind && hs.read_message(&a[1..], &mut out).is_ok() {
                    let key = hs.get_remote_static().unwrap_or_default().to_vec();
                    assert_ne!(key, victim_key, "the member read the victim's static key");
                    panic!("the member completed message 2 of a handshake: {a:?}");
                }
            }
        }
        // All a member learns is that the peer speaks session version 3.
        assert_eq!(answers, [vec![0x2F, 2, 3]], "answers from {v}");
    }
    assert_eq!(
        scalar_mults(&victim),
        before,
        "the victim did curve arithmetic for an attacker without the topic"
    );
    // The honest pair is untouched.
    vf.send(b"still here").await.unwrap();
    assert_eq!(recv(&mut fv).await, b"still here");
    fv.send(b"and here").await.unwrap();
    assert_eq!(recv(&mut vf).await, b"and here");
    victim.disconnect().await.unwrap();
    friend.disconnect().await.unwrap();
}

/// A member replays an honest newcomer's HS1 (it received one: newcomers greet every member)
/// to the victim 20,000 times. The victim answers a burst and then one attempt per second,
/// each costing four scalar multiplications, not 20,000 answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_hs1_gets_a_handful_of_answers_not_one_each() {
    const REPLAYS: usize = 20_000;
    let (server, url) = relay().await;
    let topic = fresh_topic("hs1-replay");
    let room = derive_from_topic(&topic, Domain::RelayRoom);
    let mut victim = transport(&url);
    let mut v_rx = victim.connect(topic).await.unwrap();
    let (mut x, members) = Member::join(server.local_addr(), room).await;
    let [v] = members[..] else {
        panic!("{members:?}")
    };
    let mut newcomer = transport(&url);
    let mut n_rx = newcomer.connect(topic).await.unwrap();
    let (_, hs1) = x.deliver().await;
    let mut vn = accept(&mut v_rx).await;
    let mut nv = accept(&mut n_rx).await;
    let started = Instant::now();
    let before = scalar_mults(&victim);
    for _ in 0..REPLAYS {
        x.send(v, hs1.clone()).await;
    }
    let answers = x.sync(v).await;
    let elapsed = started.elapsed();
    // The burst (8 openings) and one more per 500 ms.
    let allowed = 8 + 2 * elapsed.as_secs() as usize + 2;
    assert!(
        answers.len() <= allowed,
        "{} answers to {REPLAYS} replays in {elapsed:?}",
        answers.len()
    );
    assert!(!answers.is_empty(), "the first replays are answered");
    let mults = scalar_mults(&victim) - before;
    assert!(
        mults <= 4 * answers.len() as u64,
        "{mults} scalar multiplications for {} answers",
        answers.len()
    );
    // The honest pair is untouched.
    nv.send(b"hello").await.unwrap();
    assert_eq!(recv(&mut vn).await, b"hello");
    victim.disconnect().await.unwrap();
    newcomer.disconnect().await.unwrap();
}

/// A `Write` that keeps what the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// 20,000 bogus HS1s give a handful of WARN lines and one summary, not 20,000 lines. The
/// runtime is single-threaded so that the subscriber set for this thread sees the victim's
/// socket task.
#[tokio::test]
async fn a_flood_of_bogus_hs1s_logs_a_summary_not_a_line_each() {
    const BOGUS: usize = 20_000;
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let (server, url) = relay().await;
    let topic = fresh_topic("hs1-flood");
    let room = derive_from_topic(&topic, Domain::RelayRoom);
    let mut victim = transport(&url);
    let _v_rx = victim.connect(topic).await.unwrap();
    let (mut x, members) = Member::join(server.local_addr(), room).await;
    let [v] = members[..] else {
        panic!("{members:?}")
    };
    // Under both kinds a version 3 client reads as message 1 (versions 1 and 2 read 0x01).
    for i in 0..BOGUS {
        let kind = if i % 2 == 0 { 0x04 } else { 0x01 };
        x.send(v, [&[kind][..], &[i as u8; 48][..]].concat()).await;
    }
    let answers = x.sync(v).await;
    assert!(answers.is_empty(), "{answers:?}");
    let refused = |l: &String| l.contains("WARN") && l.contains("noise handshake message 1");
    let lines = log.lines();
    let one_by_one = lines.iter().filter(|l| refused(l)).count();
    assert!(
        (1..=4).contains(&one_by_one),
        "{one_by_one} WARN lines for {BOGUS} bogus HS1s"
    );
    // The rest are counted, and said once (after the 10 s interval).
    let deadline = Instant::now() + T;
    let summary = loop {
        if let Some(l) = log
            .lines()
            .into_iter()
            .find(|l| l.contains("not logged one by one"))
        {
            break l;
        }
        assert!(Instant::now() < deadline, "no summary line");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    // "… s, R more refused handshakes and L rate-limited handshake openings …"
    let words: Vec<&str> = summary.split_whitespace().collect();
    let before = |w: &str| -> u64 {
        let i = words.iter().position(|x| *x == w).unwrap();
        words[i - 1].parse().unwrap()
    };
    let (refused_later, limited) = (before("more"), before("rate-limited"));
    assert!(refused_later + limited >= (BOGUS - 4) as u64, "{summary}");
    assert!(
        log.lines().len() <= 12,
        "{} lines: {:?}",
        log.lines().len(),
        log.lines()
    );
    victim.disconnect().await.unwrap();
}
