//! Thousands of bad handshakes against a real node (bogus messages 1 from someone who knows
//! only the info-hash, and one room member's valid message 1 replayed): no Diffie-Hellman for
//! any of them, the remote rate limited, and a handful of log lines instead of one per
//! attempt. Its own binary: the test installs the process's tracing subscriber, a layer that
//! counts this crate's lines.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::attack::{self, EXPORTER_V2, XX_PSK0, initiator, read_frame, send_frame};
use pluresdb_sync_core::Transport;
use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_transport_hyperswarm::testkit::LoopbackDht;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{EnvFilter, Layer};

/// Every line this crate logs at DEBUG or above: its level and message.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<(tracing::Level, String)>>>);

impl Lines {
    fn snapshot(&self) -> Vec<(tracing::Level, String)> {
        self.0.lock().unwrap().clone()
    }
}

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for Lines {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        if meta
            .target()
            .starts_with("pluresdb_sync_transport_hyperswarm")
        {
            let mut m = Message(String::new());
            event.record(&mut m);
            self.0.lock().unwrap().push((*meta.level(), m.0));
        }
    }
}

/// Runs `n` handshakes from `ep` to `victim`, 32 at a time, each sending `message_1` after
/// `info_hash` (or a fresh random one when `None`) and waiting for the victim to end it.
async fn bad_handshakes(
    ep: quinn::Endpoint,
    victim: SocketAddr,
    info_hash: [u8; 20],
    message_1: Option<Vec<u8>>,
    n: usize,
) {
    let message_1 = Arc::new(message_1);
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..32 {
        let (ep, message_1) = (ep.clone(), message_1.clone());
        tasks.spawn(async move {
            for i in (worker..n).step_by(32) {
                let Ok(connecting) = ep.connect(victim, "x") else {
                    continue;
                };
                let Ok(conn) = connecting.await else {
                    continue;
                };
                let Ok((mut send, mut recv)) = conn.open_bi().await else {
                    continue;
                };
                let msg: Vec<u8> = match message_1.as_ref() {
                    Some(m) => m.clone(),
                    None => (0..49).map(|j| (i * 31 + j) as u8).collect(),
                };
                let _ = send.write_all(&info_hash).await;
                send_frame(&mut send, &msg).await;
                assert_eq!(
                    read_frame(&mut recv).await,
                    None,
                    "a message 2 for attempt {i}"
                );
                let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_bad_handshakes_cost_no_dh_and_log_a_summary() {
    let lines = Lines::default();
    let subscriber = tracing_subscriber::registry().with(
        lines
            .clone()
            .with_filter(EnvFilter::new("pluresdb_sync_transport_hyperswarm=debug")),
    );
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let dht = LoopbackDht::start().await.unwrap();
    let topic = fresh_topic("log-flood");
    // The victim is alone on its topic: every DH it does is an attacker's.
    let mut v = dht.transport().unwrap();
    v.announce(topic).await.unwrap();
    let victim = v.local_addr().unwrap();
    let (info_hash, psk) = (attack::info_hash(&topic), attack::psk(&topic));

    // A room member's one valid message 1 (it gets its message 2: one DH pair).
    let member = attack::client_on("127.0.0.21:0".parse().unwrap(), &[attack::ALPN_V2]);
    let conn = member.connect(victim, "x").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut hs = initiator(XX_PSK0, &attack::exporter(&conn, EXPORTER_V2), Some(&psk));
    let mut buf = [0u8; 1024];
    let n = hs.write_message(&[2], &mut buf).unwrap();
    let valid = buf[..n].to_vec();
    send.write_all(&info_hash).await.unwrap();
    send_frame(&mut send, &valid).await;
    assert!(
        read_frame(&mut recv).await.is_some(),
        "the member's own message 2"
    );
    conn.close(0u32.into(), b"");
    let before = lines.snapshot().len();

    // 1,000 replays of it from the member's address, 1,000 bogus ones from an observer.
    let started = Instant::now();
    let observer = attack::client_on("127.0.0.22:0".parse().unwrap(), &[attack::ALPN_V2]);
    tokio::join!(
        bad_handshakes(member, victim, info_hash, Some(valid), 1000),
        bad_handshakes(observer, victim, info_hash, None, 1000),
    );
    let took = started.elapsed();
    let stats = v.incoming_stats();
    let during = lines.snapshot()[before..].to_vec();
    eprintln!(
        "2000 bad handshakes in {took:?}: {stats:?}; {} log lines: {during:#?}",
        during.len()
    );
    assert_eq!(
        stats.message2_sent, 1,
        "only the member's own handshake cost a DH"
    );
    assert!(stats.attempts >= 2000, "{stats:?}");
    // What reached message 1 is what the two IPs' rates let through (per IP: bursts of 32
    // unvalidated and 32 validated attempts, then 16 + 8 per second), not every attempt.
    let allowed = 2.0 * (64.0 + 24.0 * took.as_secs_f64());
    // The attackers go faster than that (unless the machine is so loaded that they do not:
    // then nothing needs turning away), so attempts were turned away before any crypto.
    let turned_away = stats.rate_limited + stats.retried + stats.refused_busy;
    if stats.attempts as f64 > allowed {
        assert!(turned_away > 0, "{stats:?}");
    }
    assert!(
        (stats.refused_at_message1 as f64) <= allowed,
        "{} reached message 1 in {took:?}, the rates allow {allowed}",
        stats.refused_at_message1
    );
    // One debug line per kind of refusal and interval, one summary per interval.
    let intervals = took.as_secs() / 10 + 1;
    assert!(
        during.len() as u64 <= 10 * intervals,
        "{} lines for 2000 attempts",
        during.len()
    );

    // The summaries come at the end of each interval, with the counts (on a loaded machine
    // the attempts span several intervals, and the first may hold no rate-limited ones yet).
    let summaries = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let found: Vec<String> = lines
                .snapshot()
                .into_iter()
                .filter(|(level, msg)| {
                    *level == tracing::Level::WARN && msg.contains("incoming handshakes refused")
                })
                .map(|(_, msg)| msg)
                .collect();
            let all = found.join("\n");
            let limited = stats.rate_limited == 0 || all.contains("rate limited");
            if limited && all.contains("refused at noise message 1") {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("no summary line with the rate-limited and refused counts");
    assert!(
        summaries.lines().count() as u64 <= intervals + 2,
        "{summaries}"
    );
    v.disconnect().await.unwrap();
}
