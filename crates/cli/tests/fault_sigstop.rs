//! Fault injection: a peer process is frozen (SIGSTOP) for 10 s, then thawed (SIGCONT), in
//! relay mode (a real `pluresdb-sync relay` process with a 1 MiB per-connection queue cap and
//! its metrics endpoint) and in Hyperswarm mode (a loopback DHT testnet). The frozen peer P is
//! this test binary run as a child (`child_sink_peer`): two peers Q stream numbered messages
//! to it and P acknowledges every window; C and D, in the same room, ping-pong all along.
//! Checked: P's connections survive or are re-established and each Q resumes after its last
//! acknowledged message (P gets every message exactly once, in order, each session
//! gapless); C and D never lose their connection nor stall; in relay mode the relay's queued
//! bytes stay within the cap (and did fill up to it); P's RSS before and after is printed.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pluresdb_sync::{Connection, Transport, derive_topic};
use pluresdb_sync_transport_hyperswarm::testkit::LoopbackDht;
use pluresdb_sync_transport_relay::RelayTransport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use common::{T, message, ping_pong, rss_kib, seq_of};

/// How long P stays frozen.
const FROZEN: Duration = Duration::from_secs(10);
/// Messages each Q streams in all.
const N: u64 = 2000;
/// P acknowledges every this many messages (16 MiB: more than the kernel's socket buffers
/// and the relay's queue for P hold, so a frozen P makes the relay queue fill up).
const WINDOW: u64 = 1000;
/// Bytes of each message (an 8-byte big-endian sequence number, then filler).
const MESSAGE_BYTES: usize = 16 * 1024;
/// How many peers stream to P: together more than P's kernel socket buffer (up to half of
/// `tcp_rmem`'s 32 MiB here) and the relay's send buffer absorb, so the relay's queue for
/// a frozen P does fill.
const SENDERS: usize = 2;
/// The relay's per-connection queue cap in this test.
const QUEUE_CAP: usize = 1024 * 1024;

fn signal(pid: u32, sig: &str) {
    let out = Command::new("kill")
        .args([sig, &pid.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "kill {sig} {pid}: {out:?}");
}

/// The next connection on `rx` to `peer`; connections to others are kept in `keep` (dropping
/// them would close them).
async fn conn_to(
    rx: &mut mpsc::Receiver<Box<dyn Connection>>,
    peer: &str,
    keep: &mut Vec<Box<dyn Connection>>,
) -> Box<dyn Connection> {
    loop {
        let c = tokio::time::timeout(T, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no connection to {peer} within {T:?}"))
            .expect("the connect receiver ended");
        if c.peer_id() == peer {
            return c;
        }
        keep.push(c);
    }
}

/// What Q saw: per session the highest number whose `send` returned `Ok`, and when each
/// acknowledgment arrived.
#[derive(Debug, Default)]
struct SenderLog {
    sessions: Vec<Option<u64>>,
    acks: Vec<Instant>,
}

/// Q: streams 0..N to `peer` in windows, resuming after the last acknowledged message on
/// every new connection to it.
async fn sender(mut rx: mpsc::Receiver<Box<dyn Connection>>, peer: String) -> SenderLog {
    let mut log = SenderLog::default();
    let mut keep = Vec::new();
    let mut acked: Option<u64> = None;
    loop {
        let mut conn = conn_to(&mut rx, &peer, &mut keep).await;
        let mut sent_ok = None;
        let mut next = acked.map_or(0, |a| a + 1);
        let done = 'session: loop {
            if next >= N {
                break 'session true;
            }
            let end = ((next / WINDOW + 1) * WINDOW).min(N);
            for seq in next..end {
                if conn.send(&message(seq, MESSAGE_BYTES)).await.is_err() {
                    break 'session false;
                }
                sent_ok = Some(seq);
            }
            match tokio::time::timeout(T + FROZEN, conn.receive()).await {
                Ok(Ok(Some(ack))) => {
                    let a = u64::from_be_bytes(ack[..].try_into().expect("an 8-byte ack"));
                    assert!(a + 1 >= end, "ack {a} for a window ending at {end}");
                    acked = Some(a);
                    log.acks.push(Instant::now());
                    next = a + 1;
                }
                Ok(_) => break 'session false,
                Err(_) => panic!("no ack within {:?} (next {next})", T + FROZEN),
            }
        };
        log.sessions.push(sent_ok);
        if done {
            conn.close().await.unwrap();
            return log;
        }
    }
}

/// A process killed (and reaped) on drop, also when the test fails.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A child process whose stdout lines arrive on a channel, stamped with when they were read;
/// killed on drop.
struct Proc {
    child: Child,
    out: std::sync::mpsc::Receiver<(String, Instant)>,
    seen: Vec<(String, Instant)>,
}

impl Proc {
    /// The rest of the next line containing `prefix` (waiting off the async workers).
    fn line(&mut self, prefix: &str, within: Duration) -> String {
        tokio::task::block_in_place(|| self.line_blocking(prefix, within))
    }

    fn line_blocking(&mut self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok((l, at)) => {
                    self.seen.push((l.clone(), at));
                    if let Some((_, rest)) = l.split_once(prefix) {
                        return rest.trim().to_owned();
                    }
                    assert!(
                        !l.contains("FAILED") && !l.contains("panicked"),
                        "child: {l}"
                    );
                }
                Err(e) => panic!("no {prefix:?} line from the child ({e})"),
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `child_sink_peer` of this binary with `env`.
fn sink_peer(env: &[(&str, String)]) -> Proc {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_sink_peer",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let (tx, out) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((line, Instant::now())).is_err() {
                return;
            }
        }
    });
    Proc {
        child,
        out,
        seen: Vec::new(),
    }
}

/// The relay's metrics page.
async fn metrics_text(metrics: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(metrics).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    tokio::time::timeout(T, s.read_to_string(&mut body))
        .await
        .unwrap()
        .unwrap();
    body
}

/// The relay's `pluresdb_relay_queued_bytes` from its metrics endpoint.
async fn queued_bytes(metrics: std::net::SocketAddr) -> u64 {
    let body = metrics_text(metrics).await;
    body.lines()
        .find_map(|l| l.strip_prefix("pluresdb_relay_queued_bytes "))
        .unwrap_or_else(|| panic!("no pluresdb_relay_queued_bytes in {body}"))
        .trim()
        .parse()
        .unwrap()
}

/// What one run measured.
struct Figures {
    recovered: Duration,
    sessions: usize,
    rss_before: u64,
    rss_after: u64,
    gap: Duration,
    rounds: u64,
}

/// The scenario: P (a child) on `topic`, the [`SENDERS`] Qs, C and D in this process from
/// `make`; P frozen for [`FROZEN`] once it acknowledged a first window; `during` runs while
/// P is frozen.
async fn freeze_scenario<F, Fut>(
    topic: &str,
    child_env: Vec<(&str, String)>,
    make: F,
    during: impl std::future::Future<Output = ()>,
) -> Figures
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (Box<dyn Transport>, String)>,
{
    let topic_hash = derive_topic(topic);
    let mut env = child_env;
    env.push(("FAULT_TOPIC", topic.to_owned()));
    let mut p = sink_peer(&env);
    let p_id = p.line("READY ", T);
    let p_pid = p.child.id();

    let mut senders = Vec::new();
    let mut sending = Vec::new();
    for _ in 0..SENDERS {
        let (mut q, _) = make().await;
        let q_in = q.connect(topic_hash).await.unwrap();
        sending.push(tokio::spawn(sender(q_in, p_id.clone())));
        senders.push(q);
    }
    let ((mut c, c_id), (mut d, d_id)) = (make().await, make().await);
    let mut c_in = c.connect(topic_hash).await.unwrap();
    let mut d_in = d.connect(topic_hash).await.unwrap();
    let (mut keep_c, mut keep_d) = (Vec::new(), Vec::new());
    let cd = conn_to(&mut c_in, &d_id, &mut keep_c).await;
    let dc = conn_to(&mut d_in, &c_id, &mut keep_d).await;
    let stop = Arc::new(AtomicBool::new(false));
    let pairing = tokio::spawn(ping_pong(cd, dc, stop.clone(), Duration::from_millis(5)));

    // Mid-stream (P acknowledged a sender's first window), freeze P.
    let at = p.line("AT ", T);
    assert!(at.ends_with(&format!(" {}", WINDOW - 1)), "{at}");
    let rss_before = rss_kib(p_pid);
    signal(p_pid, "-STOP");
    let waited = tokio::time::timeout(FROZEN, during).await;
    assert!(waited.is_err(), "the check during the freeze ended early");
    // Taken before the signal: P may run and print before `kill` has even returned.
    let thawed = Instant::now();
    signal(p_pid, "-CONT");

    let done = p.line("DONE ", T + FROZEN);
    let rss_after = rss_kib(p_pid);
    let mut logs = Vec::new();
    for s in sending {
        logs.push(tokio::time::timeout(T, s).await.unwrap().unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let (gap, rounds) = pairing.await.unwrap();
    // Recovered: the first message of a session that started after the thaw or, when every
    // session survived, the first window P acknowledged after it.
    let after = |tag: &str| {
        p.seen
            .iter()
            .find(|(l, t)| *t > thawed && l.contains(tag))
            .map(|(_, t)| t.duration_since(thawed))
    };
    let recovered = after("FIRST ")
        .or_else(|| after("AT "))
        .expect("P got nothing after the thaw");
    for log in &logs {
        assert!(
            log.acks.iter().any(|&t| t > thawed),
            "no ack after the thaw"
        );
    }
    let sessions: usize = done
        .strip_prefix("sessions=")
        .and_then(|s| s.parse().ok())
        .unwrap();
    let used: usize = logs.iter().map(|l| l.sessions.len()).sum();
    assert_eq!(sessions, used, "P and the senders disagree: {logs:?}");
    // C and D never lost their connection (the loop unwraps every step) and never waited for
    // anything like the freeze.
    assert!(gap < FROZEN / 2, "the other pair stalled {gap:?}");
    for t in senders.iter_mut().chain([&mut c, &mut d]) {
        t.disconnect().await.unwrap();
    }
    drop(keep_c);
    drop(keep_d);
    Figures {
        recovered,
        sessions,
        rss_before,
        rss_after,
        gap,
        rounds,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_relay_peer_is_bounded_and_recovers_and_the_room_is_unaffected() {
    let mut relay = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
            .args([
                "relay",
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                "127.0.0.1:0",
            ])
            .args(["--max-queued-bytes-per-connection", &QUEUE_CAP.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(relay.0.stdout.take().unwrap()).lines();
    let (mut url, mut metrics) = (None, None);
    while url.is_none() || metrics.is_none() {
        let line = lines.next().expect("the relay ended").unwrap();
        if let Some(u) = line.strip_prefix("relay listening on ") {
            url = Some(u.to_owned());
        }
        if let Some(m) = line.strip_prefix("metrics on http://") {
            metrics = Some(m.trim_end_matches("/metrics").parse().unwrap());
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let (url, metrics): (String, std::net::SocketAddr) = (url.unwrap(), metrics.unwrap());

    let max_queued = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = max_queued.clone();
    let poll = async move {
        loop {
            seen.fetch_max(queued_bytes(metrics).await, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let u = url.clone();
    let figures = freeze_scenario(
        &format!("fault-sigstop-relay-{}", std::process::id()),
        vec![("FAULT_RELAY_URL", url.clone())],
        move || {
            let u = u.clone();
            async move {
                let t = RelayTransport::builder()
                    .relay_url(u)
                    .timeout(T)
                    .build()
                    .unwrap();
                let id = t.peer_id().to_owned();
                (Box::new(t) as Box<dyn Transport>, id)
            }
        },
        poll,
    )
    .await;
    let max_queued = max_queued.load(Ordering::Relaxed);
    let page = metrics_text(metrics).await;
    let drops: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("pluresdb_relay_drops_total") && !l.ends_with(" 0"))
        .collect();
    eprintln!(
        "RESULT relay SIGSTOP {} s: recovered {} ms after SIGCONT, {} session(s); relay queued \
         at most {max_queued} B (cap {QUEUE_CAP} B per connection); P's RSS {} KiB before, {} \
         KiB after; other pair: {} round trips, longest gap {} ms; relay drops: {drops:?}",
        FROZEN.as_secs(),
        figures.recovered.as_millis(),
        figures.sessions,
        figures.rss_before,
        figures.rss_after,
        figures.rounds,
        figures.gap.as_millis(),
    );
    // The frozen peer's queue filled to its cap and no further (a frame of slack for the
    // other connections' queues).
    assert!(
        max_queued <= (QUEUE_CAP + 2 * MESSAGE_BYTES) as u64,
        "the relay queued {max_queued} B"
    );
    assert!(
        max_queued >= (QUEUE_CAP / 2) as u64,
        "the freeze never backed up the relay ({max_queued} B queued): the test checks nothing"
    );
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_hyperswarm_peer_recovers_and_the_room_is_unaffected() {
    let dht = Arc::new(LoopbackDht::start().await.unwrap());
    let bootstrap = dht.bootstrap().join(",");
    let d2 = dht.clone();
    let figures = freeze_scenario(
        &format!("fault-sigstop-hyperswarm-{}", std::process::id()),
        vec![("FAULT_BOOTSTRAP", bootstrap)],
        move || {
            let dht = d2.clone();
            async move {
                let t = dht.builder().timeout(T).build().unwrap();
                let id = t.peer_id().to_owned();
                (Box::new(t) as Box<dyn Transport>, id)
            }
        },
        std::future::pending(),
    )
    .await;
    eprintln!(
        "RESULT hyperswarm SIGSTOP {} s: recovered {} ms after SIGCONT, {} session(s); P's RSS \
         {} KiB before, {} KiB after; other pair: {} round trips, longest gap {} ms",
        FROZEN.as_secs(),
        figures.recovered.as_millis(),
        figures.sessions,
        figures.rss_before,
        figures.rss_after,
        figures.rounds,
        figures.gap.as_millis(),
    );
}

/// The frozen peer P: joins `FAULT_TOPIC` by relay (`FAULT_RELAY_URL`) or Hyperswarm
/// (`FAULT_BOOTSTRAP`), takes every connection, delivers each sender's numbers once across sessions
/// (each session's run checked gapless and in order), acknowledges every window. Prints
/// `READY <peer id>`, `FIRST <session> <n>` per session, `AT <sender> <n>` per acknowledgment,
/// `DONE sessions=<k>`, then waits for stdin
/// to close.
#[test]
#[ignore = "run by the tests above as the peer they freeze"]
fn child_sink_peer() {
    let env = |k: &str| std::env::var(k).ok();
    let topic = derive_topic(&env("FAULT_TOPIC").unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (mut t, id): (Box<dyn Transport>, String) =
            match (env("FAULT_RELAY_URL"), env("FAULT_BOOTSTRAP")) {
                (Some(url), _) => {
                    let t = RelayTransport::builder()
                        .relay_url(url)
                        .timeout(T)
                        .build()
                        .unwrap();
                    let id = t.peer_id().to_owned();
                    (Box::new(t), id)
                }
                (None, Some(bootstrap)) => {
                    use pluresdb_sync_transport_hyperswarm::{HyperswarmTransport, testkit};
                    let t = HyperswarmTransport::builder()
                        .bootstrap(bootstrap.split(',').map(str::to_owned))
                        .bind_addr("127.0.0.1:0".parse().unwrap())
                        .dht_server_mode(true)
                        .dht_request_timeout(testkit::LOOPBACK_DHT_REQUEST_TIMEOUT)
                        .lookup_interval(testkit::LOOPBACK_LOOKUP_INTERVAL)
                        .timeout(T)
                        .build()
                        .unwrap();
                    let id = t.peer_id().to_owned();
                    (Box::new(t), id)
                }
                _ => panic!("FAULT_RELAY_URL or FAULT_BOOTSTRAP"),
            };
        let mut rx = t.connect(topic).await.unwrap();
        println!("READY {id}");
        // Connections from every member arrive on one channel; each reads on its own task
        // and hands messages (tagged with its session) to one checker.
        type Item = (String, usize, Option<Vec<u8>>, mpsc::Sender<u64>);
        let (tx, mut msgs) = mpsc::channel::<Item>(16);
        tokio::spawn(async move {
            let mut session = 0usize;
            while let Some(mut conn) = rx.recv().await {
                session += 1;
                let (tx, id, peer) = (tx.clone(), session, conn.peer_id().to_owned());
                let (ack_tx, mut ack_rx) = mpsc::channel::<u64>(4);
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            m = conn.receive() => {
                                let m = m.ok().flatten();
                                let end = m.is_none();
                                let item = (peer.clone(), id, m, ack_tx.clone());
                                if tx.send(item).await.is_err() || end {
                                    return;
                                }
                            }
                            Some(a) = ack_rx.recv() => {
                                if conn.send(&a.to_be_bytes()).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        // Per sender: the next number it delivers.
        let mut next: std::collections::HashMap<String, u64> = Default::default();
        let mut runs: std::collections::HashMap<usize, u64> = Default::default();
        while next.values().filter(|&&n| n == N).count() < SENDERS {
            let (peer, id, m, ack) = msgs.recv().await.expect("the connections ended");
            let Some(m) = m else {
                continue;
            };
            let seq = seq_of(&m, MESSAGE_BYTES);
            let delivered = next.entry(peer.clone()).or_default();
            match runs.get(&id) {
                None => {
                    assert!(
                        seq <= *delivered,
                        "session {id} starts at {seq} but {delivered} was never delivered"
                    );
                    println!("FIRST {id} {seq}");
                }
                Some(&last) => assert_eq!(seq, last + 1, "session {id}: {last} then {seq}"),
            }
            runs.insert(id, seq);
            if seq == *delivered {
                *delivered += 1;
            }
            if seq % WINDOW == WINDOW - 1 || seq == N - 1 {
                let upto = *delivered - 1;
                println!("AT {} {upto}", &peer[..8]);
                let _ = ack.send(upto).await;
            }
        }
        println!("DONE sessions={}", runs.len());
        // Stay (and keep the sessions open) until the parent has read our RSS.
        let mut line = String::new();
        let _ = tokio::io::AsyncBufReadExt::read_line(
            &mut tokio::io::BufReader::new(tokio::io::stdin()),
            &mut line,
        )
        .await;
        t.disconnect().await.unwrap();
    });
}
