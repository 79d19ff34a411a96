//! The NAT matrix in Auto mode, for real, in network namespaces (needs root, `ip` and
//! `iptables`). A "public" segment holds a relay server and a mainline DHT testnet; each
//! peer sits on it directly ("none") or behind a NAT router namespace with
//! endpoint-independent ("eim") or symmetric ("sym") mapping, both dropping unsolicited
//! input like home routers (the `pluresdb-sync-netlab` testkit). For each of the six pairs
//! of kinds, on fresh sites: both join a topic, the first connection carries a message
//! each way, then the pair settles: none×none, none×eim, none×sym and eim×eim must end up
//! direct (hole punching from the relayed connection, or a DHT dial), eim×sym and sym×sym
//! stay relayed; either way the same connection then carries messages both ways, in order.
//! The matrix is printed: the final path, the time from both joining to the first message
//! exchanged, and to the direct path. Times are printed, never asserted.
//!
//! The peers, the relay and the DHT run in this process, each on a tokio runtime whose
//! threads entered its namespace, so every socket is on the right network.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod nat_lab;

use std::time::{Duration, Instant};

use nat_lab::{Peer, T, World, init_tracing, pair_name, wait_until};
use pluresdb_sync_core::Connection;
use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_netlab::{Nat, prerequisites};
use pluresdb_sync_transport_hyperswarm::relay_path::PeerPath;

/// How long a pair may take to go direct before it counts as staying relayed: several
/// rounds of candidates (every 2 s) and probes (every 1 s), and a DHT lookup (every 2 s)
/// with a dial.
const DIRECT_WAIT: Duration = Duration::from_secs(10);

/// Messages each way after the pair settled.
const AFTER: u32 = 50;

/// What one pair did.
struct Outcome {
    x: Nat,
    y: Nat,
    /// The path both sides ended on (or the failure).
    result: anyhow::Result<Settled>,
}

struct Settled {
    path_a: PeerPath,
    path_b: PeerPath,
    first_message: Duration,
    direct_after: Option<Duration>,
    public_known: (bool, bool),
    diagnostics: String,
}

impl Settled {
    fn direct(&self) -> bool {
        matches!(self.path_a, PeerPath::Direct(_)) && matches!(self.path_b, PeerPath::Direct(_))
    }

    fn relayed(&self) -> bool {
        matches!(self.path_a, PeerPath::Relayed { .. })
            && matches!(self.path_b, PeerPath::Relayed { .. })
    }
}

/// Sends `n` numbered messages from `from` to `to` and checks each arrives once, in order.
async fn stream(
    from: &mut Box<dyn Connection>,
    to: &mut Box<dyn Connection>,
    tag: u8,
    n: u32,
) -> anyhow::Result<()> {
    for i in 0..n {
        let mut m = vec![tag];
        m.extend_from_slice(&i.to_be_bytes());
        from.send(&m).await?;
    }
    for i in 0..n {
        let m = tokio::time::timeout(T, to.receive())
            .await
            .map_err(|_| anyhow::anyhow!("message {i} of {tag}: nothing within {T:?}"))??
            .ok_or_else(|| anyhow::anyhow!("message {i} of {tag}: the connection ended"))?;
        let want: Vec<u8> = [&[tag][..], &i.to_be_bytes()].concat();
        anyhow::ensure!(m == want, "message {i} of {tag}: got {m:?}");
    }
    Ok(())
}

async fn run_pair(world: &mut World, x: Nat, y: Nat) -> Outcome {
    let mut a = world.peer(1, x).await;
    let mut b = world.peer(2, y).await;
    let result = settle(&mut a, &mut b, x, y).await;
    a.stop().await;
    b.stop().await;
    world.remove(a);
    world.remove(b);
    Outcome { x, y, result }
}

async fn settle(a: &mut Peer, b: &mut Peer, x: Nat, y: Nat) -> anyhow::Result<Settled> {
    let topic = fresh_topic(&format!("auto-nat-{}", pair_name(x, y)));
    let (ida, idb) = (a.t().peer_id(), b.t().peer_id());
    let joined = Instant::now();
    let (ca, cb) = tokio::join!(a.join(topic), b.join(topic));
    let (mut ca, mut cb) = (ca?, cb?);
    // Whether each side knew its public address when its connection was handed out (the
    // candidates it sent first had it).
    let public_known = (
        a.t().hyperswarm().public_addr().is_some(),
        b.t().hyperswarm().public_addr().is_some(),
    );
    anyhow::ensure!(
        ca.peer_id() == idb && cb.peer_id() == ida,
        "connected to the wrong peers"
    );
    // The first message each way, at once.
    let (sa, sb) = tokio::join!(ca.send(b"hello from a"), cb.send(b"hello from b"));
    sa?;
    sb?;
    let (ma, mb) = tokio::join!(
        tokio::time::timeout(T, ca.receive()),
        tokio::time::timeout(T, cb.receive())
    );
    let (ma, mb) = (ma??, mb??);
    anyhow::ensure!(
        ma.as_deref() == Some(b"hello from b") && mb.as_deref() == Some(b"hello from a"),
        "first messages: a got {ma:?}, b got {mb:?}"
    );
    let first_message = joined.elapsed();
    let direct_at = wait_until(DIRECT_WAIT, || a.direct_to(&idb) && b.direct_to(&ida)).await;
    let direct_after = direct_at.map(|t| t - joined);
    // Settled: the same connections carry messages both ways.
    stream(&mut ca, &mut cb, b'a', AFTER).await?;
    stream(&mut cb, &mut ca, b'b', AFTER).await?;
    let (pa, pb) = (a.paths_to(&idb), b.paths_to(&ida));
    anyhow::ensure!(
        pa.len() == 1 && pb.len() == 1,
        "one connection per peer: a has {pa:?}, b has {pb:?}"
    );
    let diagnostics = format!("a: {}\n    b: {}", a.diagnostics(), b.diagnostics());
    ca.close().await?;
    drop(cb);
    Ok(Settled {
        path_a: pa[0].clone(),
        path_b: pb[0].clone(),
        first_message,
        direct_after,
        public_known,
        diagnostics,
    })
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn short(p: &PeerPath) -> &'static str {
    match p {
        PeerPath::Direct(_) => "direct",
        PeerPath::Relayed { .. } => "relayed",
        _ => "other",
    }
}

#[test]
fn auto_nat_matrix_root() {
    if !prerequisites("auto_nat_matrix_root", &["ip", "iptables"]) {
        return;
    }
    init_tracing();
    let started = Instant::now();
    let mut world = World::start("am");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut outcomes = Vec::new();
    for (x, y) in Nat::pairs() {
        let t0 = Instant::now();
        let o = rt.block_on(run_pair(&mut world, x, y));
        eprintln!(
            "{:>9}: {} ({:.1} s)",
            pair_name(x, y),
            match &o.result {
                Ok(s) => format!("a {} / b {}", s.path_a, s.path_b),
                Err(e) => format!("failed: {e:#}"),
            },
            t0.elapsed().as_secs_f64()
        );
        outcomes.push(o);
    }
    world.stop();
    eprintln!(
        "\nAuto NAT matrix (relay and DHT testnet on the public segment; times from both joining):"
    );
    eprintln!(
        "  {:>9}  {:<8} {:>14} {:>12}  public address known at connect (a/b)",
        "pair", "path", "first message", "direct after"
    );
    for o in &outcomes {
        match &o.result {
            Ok(s) => eprintln!(
                "  {:>9}  {:<8} {:>11} ms {:>12}  {}/{}",
                pair_name(o.x, o.y),
                if s.path_a == s.path_b || short(&s.path_a) == short(&s.path_b) {
                    short(&s.path_a).to_owned()
                } else {
                    format!("{}/{}", short(&s.path_a), short(&s.path_b))
                },
                s.first_message.as_millis(),
                s.direct_after
                    .map_or("-".to_owned(), |d| format!("{} ms", d.as_millis())),
                yes(s.public_known.0),
                yes(s.public_known.1),
            ),
            Err(e) => eprintln!("  {:>9}  failed: {e:#}", pair_name(o.x, o.y)),
        }
    }
    eprintln!("(whole matrix {:.1} s)", started.elapsed().as_secs_f64());
    for o in &outcomes {
        let name = pair_name(o.x, o.y);
        let s = match &o.result {
            Ok(s) => s,
            Err(e) => panic!("{name}: {e:#}"),
        };
        let must_direct = !matches!((o.x, o.y), (Nat::Eim, Nat::Sym) | (Nat::Sym, Nat::Sym));
        if must_direct {
            assert!(
                s.direct(),
                "{name} must end up direct: a {} / b {}\n    {}",
                s.path_a,
                s.path_b,
                s.diagnostics
            );
        } else {
            assert!(
                s.relayed(),
                "{name} must stay relayed: a {} / b {}\n    {}",
                s.path_a,
                s.path_b,
                s.diagnostics
            );
        }
    }
}
