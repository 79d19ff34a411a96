//! NAT traversal for real, in network namespaces (needs root, `ip` and `iptables`).
//!
//! A "public" namespace holds a bridge (10.211.0.0/24) and a mainline DHT testnet. Each
//! peer sits either directly on the bridge (no NAT) or in a private namespace behind a NAT
//! router namespace: endpoint-independent mapping (`MASQUERADE`) or endpoint-dependent
//! "symmetric" mapping (`MASQUERADE --random-fully`), both dropping unsolicited inbound
//! packets like home routers do. Every pair of kinds is tried; the matrix is printed.
//! Peers run as child processes (`ip netns exec ... <this test binary> --exact child_peer`).
//! The namespaces and routers come from the `pluresdb-sync-netlab` testkit, which removes
//! them on drop, even when the test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use pluresdb_sync_netlab::{Lab, Nat, PublicNet, prerequisites};

/// How long a pair may take to connect before it counts as "no direct connection".
const CONNECT_WAIT: Duration = Duration::from_secs(20);

/// The test's private internet: the public segment and the mainline testnet's child.
struct Net {
    lab: Lab,
    public: PublicNet,
}

impl Net {
    fn new() -> Self {
        let mut lab = Lab::new("hs").unwrap();
        let public = lab.public_net(211).unwrap();
        Net { lab, public }
    }
}

/// One pair's outcome: each side's RESULT line, and how long the slower side took from its
/// `connect` to the first message exchanged (when both connected).
struct PairResult {
    x: Nat,
    y: Nat,
    a: String,
    b: String,
    joined: Option<Duration>,
}

impl PairResult {
    fn connected(&self) -> bool {
        self.joined.is_some()
    }
}

/// The `N` of a child's "connected in N ms".
fn connected_ms(result: &str) -> Option<u64> {
    result
        .strip_prefix("connected in ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs each pair of `pairs` (fresh sites each) against the DHT at `bootstrap`; `defaults`:
/// the peers' DHT settings at their defaults (as on the public network) instead of the
/// testnet's tuning. Prints each pair and returns the outcomes.
fn run_pairs(
    net: &mut Net,
    bootstrap: &str,
    pairs: &[(Nat, Nat)],
    defaults: bool,
) -> Vec<PairResult> {
    let mut results = Vec::new();
    for &(x, y) in pairs {
        let a = net.lab.site(&net.public, 1, x).unwrap();
        let b = net.lab.site(&net.public, 2, y).unwrap();
        let topic = format!("{}{}-{}-{defaults}", net.lab.prefix(), x.name(), y.name());
        let env = |ip: Ipv4Addr| {
            let mut env = vec![
                ("HS_BOOTSTRAP", bootstrap.to_owned()),
                ("HS_BIND", ip.to_string()),
                ("HS_TOPIC", topic.clone()),
                ("HS_WAIT_MS", CONNECT_WAIT.as_millis().to_string()),
            ];
            if defaults {
                env.push(("HS_DHT_DEFAULTS", "1".to_owned()));
            }
            env
        };
        let started = Instant::now();
        let child_a = a.host.test_child("child_peer", &env(a.ip)).unwrap();
        let child_b = b.host.test_child("child_peer", &env(b.ip)).unwrap();
        let out_a = child_a.wait_with_output().unwrap();
        let out_b = child_b.wait_with_output().unwrap();
        let result = |o: &std::process::Output| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r.trim().to_owned()))
                .unwrap_or_else(|| format!("crashed: {}", String::from_utf8_lossy(&o.stderr)))
        };
        let (ra, rb) = (result(&out_a), result(&out_b));
        eprintln!(
            "{:>4} x {:<4}  a: {ra:<28} b: {rb:<28} ({:.1} s)",
            x.name(),
            y.name(),
            started.elapsed().as_secs_f64()
        );
        let joined = match (connected_ms(&ra), connected_ms(&rb)) {
            (Some(ma), Some(mb)) => Some(Duration::from_millis(ma.max(mb))),
            _ => None,
        };
        results.push(PairResult {
            x,
            y,
            a: ra,
            b: rb,
            joined,
        });
        net.lab.remove_site(&net.public, &a);
        net.lab.remove_site(&net.public, &b);
    }
    results
}

/// Prints the matrix: per pair, direct or not, and the time to the first message.
fn print_matrix(title: &str, results: &[PairResult]) {
    eprintln!(
        "\nNAT matrix, {title} (direct connection; time from connect to the first message, slower side):"
    );
    for r in results {
        let outcome = match r.joined {
            Some(t) => format!("connected in {} ms", t.as_millis()),
            None => "no".to_owned(),
        };
        eprintln!("  {:>4} x {:<4} {outcome}", r.x.name(), r.y.name());
    }
}

/// Starts the mainline testnet in the public namespace (a child process); its bootstrap list.
fn start_mainline_testnet(net: &mut Net) -> String {
    let mut dht = net.public.ns.test_child("child_dht", &[]).unwrap();
    let stdout = dht.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let bootstrap = loop {
        let line = lines.next().expect("the DHT child ended").unwrap();
        // libtest prints "test child_dht ... " before our line, on the same line.
        if let Some((_, b)) = line.split_once("BOOTSTRAP ") {
            break b.trim().to_owned();
        }
    };
    net.lab.keep(dht);
    bootstrap
}

#[test]
fn nat_matrix_root() {
    if !prerequisites("nat_matrix_root", &["ip", "iptables"]) {
        return;
    }
    let mut net = Net::new();
    // The DHT testnet runs in the public namespace.
    let bootstrap = start_mainline_testnet(&mut net);
    let results = run_pairs(&mut net, &bootstrap, &Nat::pairs(), false);
    print_matrix("mainline testnet", &results);
    for r in &results {
        let must = !matches!((r.x, r.y), (Nat::Eim, Nat::Sym) | (Nat::Sym, Nat::Sym));
        let (x, y, ra, rb) = (r.x.name(), r.y.name(), &r.a, &r.b);
        assert_eq!(r.connected(), must, "{x} x {y}: a {ra}, b {rb}");
        if !must {
            // Not silence: each side names the endpoint it could not reach and why.
            for r in [ra, rb] {
                assert!(
                    r.contains("handshake with") && r.contains("no answer within"),
                    "{x} x {y}: no clear dial error: {r}"
                );
            }
        }
    }
}

/// The pairs that punch through, on a private DHT of libtorrent nodes in the public namespace
/// (needs root and python3-libtorrent; `scripts/test` installs both), with the peers' DHT
/// settings at their defaults as on the public network: each pair connects.
#[test]
fn nat_matrix_libtorrent_root_needs_python3_libtorrent() {
    use pluresdb_sync_transport_hyperswarm::testkit::LibtorrentDht;
    if !pluresdb_sync_netlab::have_root_tools(&["ip", "iptables"])
        || LibtorrentDht::python().is_none()
    {
        assert!(
            std::env::var("CI").is_err(),
            "nat_matrix_libtorrent_root_needs_python3_libtorrent needs root, ip, iptables and \
             python3-libtorrent; scripts/test installs them"
        );
        eprintln!("skipped: needs root, ip, iptables and python3-libtorrent");
        return;
    }
    let mut net = Net::new();
    let public = net.public.ns.name().to_owned();
    let dht = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(LibtorrentDht::start_in(
            &["ip", "netns", "exec", &public],
            8,
            Ipv4Addr::new(10, 211, 0, 1),
        ))
        .unwrap();
    let bootstrap = dht.bootstrap().join(",");
    let pairs = [
        (Nat::None, Nat::None),
        (Nat::None, Nat::Eim),
        (Nat::None, Nat::Sym),
        (Nat::Eim, Nat::Eim),
    ];
    let results = run_pairs(&mut net, &bootstrap, &pairs, true);
    print_matrix("libtorrent DHT, DHT settings at defaults", &results);
    for r in &results {
        let (x, y, ra, rb) = (r.x.name(), r.y.name(), &r.a, &r.b);
        assert!(r.connected(), "{x} x {y}: a {ra}, b {rb}");
    }
    drop(dht);
}

#[test]
#[ignore = "run by nat_matrix_root inside the public namespace"]
fn child_dht() {
    let testnet = mainline::Testnet::builder(4)
        .bind_address(Ipv4Addr::new(10, 211, 0, 1))
        .build()
        .unwrap();
    println!("BOOTSTRAP {}", testnet.bootstrap.join(","));
    // Serve until the parent closes our stdin (or kills us).
    let mut line = String::new();
    while std::io::stdin()
        .read_line(&mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
    {}
}

#[test]
#[ignore = "run by nat_matrix_root inside a peer namespace"]
fn child_peer() {
    use pluresdb_sync_core::{Transport, derive_topic};
    let env = |k: &str| std::env::var(k).unwrap();
    let bind: Ipv4Addr = env("HS_BIND").parse().unwrap();
    let wait = Duration::from_millis(env("HS_WAIT_MS").parse().unwrap());
    let topic = derive_topic(&env("HS_TOPIC"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut builder = pluresdb_sync_transport_hyperswarm::HyperswarmTransport::builder()
            .bootstrap(env("HS_BOOTSTRAP").split(',').map(str::to_owned))
            .bind_addr(SocketAddrV4::new(bind, 0))
            .timeout(Duration::from_secs(10))
            .handshake_timeout(Duration::from_secs(5))
            .lookup_interval(Duration::from_secs(2));
        if std::env::var("HS_DHT_DEFAULTS").is_err() {
            // Tuned for the testnet: its nodes answer at once.
            builder = builder
                .dht_server_mode(true)
                .dht_request_timeout(Duration::from_millis(250));
        }
        let mut t = builder.build().unwrap();
        let started = Instant::now();
        let mut rx = t.connect(topic).await.unwrap();
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(mut conn)) => {
                conn.send(b"hello").await.unwrap();
                let got = tokio::time::timeout(Duration::from_secs(10), conn.receive()).await;
                let ok = matches!(got, Ok(Ok(Some(ref m))) if m == b"hello");
                println!(
                    "RESULT {} in {} ms (public {:?})",
                    if ok { "connected" } else { "broken" },
                    started.elapsed().as_millis(),
                    t.public_addr()
                );
                // Let the remote read our hello before we go.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            _ => {
                // Each failure is typed; its text names the endpoint and the cause.
                let failures: Vec<String> = t
                    .dial_failures()
                    .iter()
                    .map(|f| {
                        assert!(matches!(
                            f.error,
                            pluresdb_sync_transport_hyperswarm::HyperswarmError::Handshake { .. }
                        ));
                        f.to_string()
                    })
                    .collect();
                println!(
                    "RESULT no connection within {} ms (public {:?}); dial failures: {failures:?}",
                    wait.as_millis(),
                    t.public_addr()
                );
            }
        }
        t.disconnect().await.unwrap();
    });
}
