//! NAT traversal for real, in network namespaces (needs root, `ip` and `iptables`).
//!
//! A "public" namespace holds a bridge (10.211.0.0/24) and a mainline DHT testnet. Each
//! peer sits either directly on the bridge (no NAT) or in a private namespace behind a NAT
//! router namespace: endpoint-independent mapping (`MASQUERADE`) or endpoint-dependent
//! "symmetric" mapping (`MASQUERADE --random-fully`), both dropping unsolicited inbound
//! packets like home routers do. Every pair of kinds is tried; the matrix is printed.
//! Peers run as child processes (`ip netns exec ... <this test binary> --exact child_peer`).
//! Namespaces are removed on drop, even when the test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a pair may take to connect before it counts as "no direct connection".
const CONNECT_WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Nat {
    None,
    Eim,
    Sym,
}

impl Nat {
    fn name(self) -> &'static str {
        match self {
            Nat::None => "none",
            Nat::Eim => "eim",
            Nat::Sym => "sym",
        }
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces of one test run, removed on drop.
struct Net {
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Net {
    fn new() -> Self {
        remove_stale_namespaces();
        let prefix = format!("hs{:x}", std::process::id());
        let mut net = Net {
            prefix,
            namespaces: Vec::new(),
            children: Vec::new(),
        };
        let public = net.ns("p");
        run(&["ip", "-n", &public, "link", "add", "br0", "type", "bridge"]);
        run(&[
            "ip",
            "-n",
            &public,
            "addr",
            "add",
            "10.211.0.1/24",
            "dev",
            "br0",
        ]);
        run(&["ip", "-n", &public, "link", "set", "br0", "up"]);
        net
    }

    fn public(&self) -> String {
        format!("{}p", self.prefix)
    }

    fn ns(&mut self, suffix: &str) -> String {
        let name = format!("{}{suffix}", self.prefix);
        run(&["ip", "netns", "add", &name]);
        self.namespaces.push(name.clone());
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// A veth from the bridge into `ns`, named `<prefix><tag>a` (bridge side) / `..b`.
    fn plug(&self, ns: &str, tag: &str, cidr: &str) -> String {
        let public = self.public();
        let (a, b) = (
            format!("{}{tag}a", self.prefix),
            format!("{}{tag}b", self.prefix),
        );
        run(&[
            "ip", "-n", &public, "link", "add", &a, "type", "veth", "peer", "name", &b, "netns", ns,
        ]);
        run(&[
            "ip", "-n", &public, "link", "set", &a, "master", "br0", "up",
        ]);
        run(&["ip", "-n", ns, "addr", "add", cidr, "dev", &b]);
        run(&["ip", "-n", ns, "link", "set", &b, "up"]);
        b
    }

    /// A site for a peer; returns (namespace the peer runs in, its IP).
    fn site(&mut self, idx: u8, nat: Nat) -> (String, Ipv4Addr) {
        let wan_ip = Ipv4Addr::new(10, 211, 0, 10 + idx);
        match nat {
            Nat::None => {
                let host = self.ns(&format!("h{idx}"));
                self.plug(&host, &format!("h{idx}"), &format!("{wan_ip}/24"));
                (host, wan_ip)
            }
            Nat::Eim | Nat::Sym => {
                let router = self.ns(&format!("r{idx}"));
                let host = self.ns(&format!("h{idx}"));
                let wan = self.plug(&router, &format!("r{idx}"), &format!("{wan_ip}/24"));
                let (lan_r, lan_h) = (
                    format!("{}l{idx}r", self.prefix),
                    format!("{}l{idx}h", self.prefix),
                );
                run(&[
                    "ip", "-n", &router, "link", "add", &lan_r, "type", "veth", "peer", "name",
                    &lan_h, "netns", &host,
                ]);
                run(&[
                    "ip",
                    "-n",
                    &router,
                    "addr",
                    "add",
                    &format!("10.212.{idx}.1/24"),
                    "dev",
                    &lan_r,
                ]);
                run(&["ip", "-n", &router, "link", "set", &lan_r, "up"]);
                run(&[
                    "ip",
                    "-n",
                    &host,
                    "addr",
                    "add",
                    &format!("10.212.{idx}.2/24"),
                    "dev",
                    &lan_h,
                ]);
                run(&["ip", "-n", &host, "link", "set", &lan_h, "up"]);
                run(&[
                    "ip",
                    "-n",
                    &host,
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("10.212.{idx}.1"),
                ]);
                run(&[
                    "ip",
                    "netns",
                    "exec",
                    &router,
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                ]);
                let mut masq = vec![
                    "ip",
                    "netns",
                    "exec",
                    &router,
                    "iptables",
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-o",
                    &wan,
                    "-j",
                    "MASQUERADE",
                ];
                if nat == Nat::Sym {
                    masq.push("--random-fully");
                }
                run(&masq);
                // Like a home router: drop unsolicited input on the WAN side. Without it the
                // first unsolicited punch packet leaves a conntrack entry for a flow to the
                // router itself, MASQUERADE then cannot reuse that port for the host behind
                // it, and punching between two port-preserving NATs fails.
                run(&[
                    "ip",
                    "netns",
                    "exec",
                    &router,
                    "iptables",
                    "-A",
                    "INPUT",
                    "-i",
                    &wan,
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "NEW",
                    "-j",
                    "DROP",
                ]);
                (host, Ipv4Addr::new(10, 212, idx, 2))
            }
        }
    }

    fn remove_site(&mut self, idx: u8) {
        // Delete the bridge-side veth ends first: namespace removal is asynchronous, and the
        // next site reuses the names.
        let public = self.public();
        for tag in [format!("h{idx}"), format!("r{idx}")] {
            let _ = Command::new("ip")
                .args([
                    "-n",
                    &public,
                    "link",
                    "del",
                    &format!("{}{tag}a", self.prefix),
                ])
                .output();
        }
        for suffix in [format!("h{idx}"), format!("r{idx}")] {
            let name = format!("{}{suffix}", self.prefix);
            if let Some(pos) = self.namespaces.iter().position(|n| *n == name) {
                let _ = Command::new("ip").args(["netns", "del", &name]).output();
                self.namespaces.remove(pos);
            }
        }
    }

    /// Runs `test` of this binary inside `ns` with `env`.
    fn child(&self, ns: &str, test: &str, env: &[(&str, String)]) -> Child {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(exe)
            .args([
                "--exact",
                test,
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Removes namespaces left by runs that were killed (their process is gone): names are
/// `hs<pid in hex>` followed by `p`, `r` or `h`.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix("hs") else {
            continue;
        };
        let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
        let kind = rest[hex.len()..].chars().next();
        let Ok(pid) = u32::from_str_radix(&hex, 16) else {
            continue;
        };
        if matches!(kind, Some('p' | 'r' | 'h'))
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

fn have_root_tools() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let tools = ["ip", "iptables"].iter().all(|t| {
        Command::new(t).arg("-V").output().is_ok()
            || Command::new(t).arg("--version").output().is_ok()
    });
    root && tools
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
        let (ns_a, ip_a) = net.site(1, x);
        let (ns_b, ip_b) = net.site(2, y);
        let topic = format!("{}-{}-{}-{defaults}", net.prefix, x.name(), y.name());
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
        let a = net.child(&ns_a, "child_peer", &env(ip_a));
        let b = net.child(&ns_b, "child_peer", &env(ip_b));
        let out_a = a.wait_with_output().unwrap();
        let out_b = b.wait_with_output().unwrap();
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
        net.remove_site(1);
        net.remove_site(2);
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
    let mut dht = net.child(&net.public(), "child_dht", &[]);
    let stdout = dht.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let bootstrap = loop {
        let line = lines.next().expect("the DHT child ended").unwrap();
        // libtest prints "test child_dht ... " before our line, on the same line.
        if let Some((_, b)) = line.split_once("BOOTSTRAP ") {
            break b.trim().to_owned();
        }
    };
    net.children.push(dht);
    bootstrap
}

#[test]
fn nat_matrix_root() {
    if !have_root_tools() {
        assert!(
            std::env::var("CI").is_err(),
            "nat_matrix_root needs root, ip (iproute2) and iptables; scripts/test installs them"
        );
        eprintln!("skipped: needs root, ip and iptables");
        return;
    }
    let mut net = Net::new();
    // The DHT testnet runs in the public namespace.
    let bootstrap = start_mainline_testnet(&mut net);
    let kinds = [Nat::None, Nat::Eim, Nat::Sym];
    let mut pairs = Vec::new();
    for (i, &x) in kinds.iter().enumerate() {
        for &y in &kinds[i..] {
            pairs.push((x, y));
        }
    }
    let results = run_pairs(&mut net, &bootstrap, &pairs, false);
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
    if !have_root_tools() || LibtorrentDht::python().is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "nat_matrix_libtorrent_root_needs_python3_libtorrent needs root, ip, iptables and \
             python3-libtorrent; scripts/test installs them"
        );
        eprintln!("skipped: needs root, ip, iptables and python3-libtorrent");
        return;
    }
    let mut net = Net::new();
    let public = net.public();
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
