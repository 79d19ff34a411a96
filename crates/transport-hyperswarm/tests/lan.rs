//! LAN discovery for real, in network namespaces (needs root and `ip`; the NAT case also
//! `iptables`).
//!
//! Each test builds its own namespaces: hosts plugged by veth pairs into a bridge (a
//! switch) in a namespace of its own, and for the NAT case a router namespace whose LAN is
//! that bridge and whose WAN is on a "public" bridge with a DHT testnet. Peers run as child
//! processes (`ip netns exec … <this test binary> --exact child_…`). The namespaces come
//! from the `pluresdb-sync-netlab` testkit, which removes them on drop, even when a test
//! fails. Veth interfaces are multicast-capable and a bridge
//! floods multicast, so nothing more than addresses is needed for the group to reach every
//! host: LAN discovery picks the interface of each packet itself (no multicast route).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use pluresdb_sync_core::{Transport, derive_topic};
use pluresdb_sync_netlab::{Lab, Netns, prerequisites};
use pluresdb_sync_transport_hyperswarm::{
    HyperswarmError, HyperswarmTransport, LAN_DISCOVERY_GROUP,
};

/// How long a pair may take to connect before the test gives up (a hang guard, not the
/// target: the target is well under 3 s, and the time is printed).
const HANG_GUARD: Duration = Duration::from_secs(20);

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces of one test (a `pluresdb-sync-netlab` lab: removed on drop, also when
/// the test fails), by name.
struct Net {
    lab: Lab,
    /// The start of the lab's namespace names (also used in topics).
    prefix: String,
    /// Short prefix of interface names (at most 15 characters in all).
    ifp: String,
    spaces: Vec<Netns>,
}

impl Net {
    fn new(test: char) -> Self {
        let lab = Lab::new(&format!("ln{test}")).unwrap();
        Net {
            prefix: lab.prefix().to_owned(),
            lab,
            ifp: format!("l{test}"),
            spaces: Vec::new(),
        }
    }

    /// A new namespace `<prefix><suffix>`; its name.
    fn ns(&mut self, suffix: &str) -> String {
        let ns = self.lab.namespace(suffix).unwrap();
        let name = ns.name().to_owned();
        self.spaces.push(ns);
        name
    }

    fn get(&self, name: &str) -> &Netns {
        self.spaces.iter().find(|n| n.name() == name).unwrap()
    }

    /// A bridge `br` in `ns`, with `cidr` on it if given.
    fn bridge(&self, ns: &str, br: &str, cidr: Option<&str>) {
        self.lab.bridge(self.get(ns), br, cidr).unwrap();
    }

    /// A veth from bridge `br` in `bridge_ns` into `host_ns`, with `cidr` on the host end;
    /// returns the host end's name.
    fn plug(&self, bridge_ns: &str, br: &str, host_ns: &str, tag: &str, cidr: &str) -> String {
        let tag = format!("{}{tag}", self.ifp);
        self.lab
            .plug(self.get(bridge_ns), br, self.get(host_ns), &tag, cidr)
            .unwrap()
    }

    /// Runs `test` of this binary inside `ns` with `env`.
    fn child(&self, ns: &str, test: &str, env: &[(&str, String)]) -> Child {
        self.get(ns).test_child(test, env).unwrap()
    }
}

/// The value after `key ` on the first line of `out` that has it.
fn field(out: &str, key: &str) -> Option<String> {
    out.lines().find_map(|l| {
        l.split_once(&format!("{key} "))
            .map(|(_, v)| v.trim().to_owned())
    })
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Waits for a child, killing it after `guard`.
fn wait(mut child: Child, guard: Duration) -> Output {
    let deadline = Instant::now() + guard;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

fn peer_env(
    bind: Ipv4Addr,
    topic: &str,
    bootstrap: &str,
    lan: bool,
    wait: Duration,
) -> Vec<(&'static str, String)> {
    vec![
        ("LP_BIND", bind.to_string()),
        ("LP_TOPIC", topic.to_owned()),
        ("LP_BOOTSTRAP", bootstrap.to_owned()),
        ("LP_LAN", if lan { "on" } else { "off" }.to_owned()),
        ("LP_WAIT_MS", wait.as_millis().to_string()),
    ]
}

/// A switch namespace with a bridge and `hosts` hosts at 10.<net>.0.11, .12, …
fn lan_of(net: &mut Net, subnet: u8, hosts: u8) -> Vec<(String, Ipv4Addr)> {
    let switch = net.ns("s");
    net.bridge(&switch, "br0", None);
    (1..=hosts)
        .map(|i| {
            let host = net.ns(&format!("h{i}"));
            let ip = Ipv4Addr::new(10, subnet, 0, 10 + i);
            net.plug(&switch, "br0", &host, &format!("h{i}"), &format!("{ip}/24"));
            (host, ip)
        })
        .collect()
}

/// A DHT bootstrap address nobody serves (on the hosts' subnet, no host has it).
fn no_dht(subnet: u8) -> String {
    format!("10.{subnet}.0.1:6881")
}

#[test]
fn lan_peers_on_one_bridge_connect_without_a_dht_and_not_with_lan_off_root() {
    if !prerequisites("lan_peers_on_one_bridge_…_root", &["ip"]) {
        return;
    }
    let mut net = Net::new('a');
    let hosts = lan_of(&mut net, 221, 2);
    let bootstrap = no_dht(221);
    let on = format!("{}-on", net.prefix);
    let off = format!("{}-off", net.prefix);
    // Both pairs at once, on the same hosts: LAN discovery on (they must connect) and off
    // (today's fail-fast offline error).
    let started = Instant::now();
    let kids: Vec<Child> = [(&on, true), (&off, false)]
        .iter()
        .flat_map(|(topic, lan)| {
            hosts
                .iter()
                .map(|(ns, ip)| {
                    net.child(
                        ns,
                        "child_peer",
                        &peer_env(*ip, topic, &bootstrap, *lan, HANG_GUARD),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let outs: Vec<(String, String)> = kids
        .into_iter()
        .map(|k| text(&wait(k, HANG_GUARD + Duration::from_secs(15))))
        .collect();
    eprintln!(
        "both pairs done after {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let ids: Vec<String> = outs
        .iter()
        .map(|(o, _)| field(o, "ID").unwrap_or_default())
        .collect();
    if std::env::var("LP_SHOW").is_ok() {
        for (i, (out, err)) in outs.iter().enumerate() {
            eprintln!("=== peer {i}\n{out}\n{err}");
        }
    }
    for (i, (out, err)) in outs.iter().enumerate() {
        let lan = i < 2;
        eprintln!(
            "peer {i} (lan {lan}): {}",
            field(out, "RESULT").unwrap_or_else(|| format!("crashed: {err}"))
        );
        if lan {
            let other = &ids[1 - i];
            let result = field(out, "RESULT").unwrap_or_default();
            assert!(
                result.starts_with(&format!("connected to {other}")),
                "peer {i}: {out}\n{err}"
            );
            let connect = field(out, "CONNECT").unwrap_or_default();
            assert!(
                connect.starts_with("ok"),
                "connect must not fail offline: {connect}"
            );
            // lookup lists the other at its LAN address, connected.
            let (other_ip, _) = (hosts[1 - i].1, ());
            let message = field(out, "MESSAGE");
            assert_eq!(
                message.as_deref(),
                Some("received"),
                "peer {i}: {out}\n{err}"
            );
            let lookup = field(out, "LOOKUP").unwrap_or_default();
            assert!(
                lookup.starts_with(&format!("{other} {other_ip}:")) && lookup.ends_with("true"),
                "peer {i}: lookup {lookup}"
            );
            // Warned once that the DHT is not reachable, however often it was tried.
            let warnings = err.matches("the DHT is not reachable").count();
            assert_eq!(warnings, 1, "peer {i}: {err}");
        } else {
            let connect = field(out, "CONNECT").unwrap_or_default();
            assert!(
                connect.starts_with("failed DhtUnreachable")
                    && connect.contains("no DHT node answered"),
                "peer {i}: LAN discovery off must keep the offline error: {out}\n{err}"
            );
        }
    }
}

#[test]
fn lan_peers_behind_one_nat_connect_on_their_lan_addresses_root() {
    if !prerequisites("lan_peers_behind_one_nat_…_root", &["ip", "iptables"]) {
        return;
    }
    let mut net = Net::new('b');
    // The public side: a bridge and the DHT.
    let public = net.ns("p");
    net.bridge(&public, "br0", Some("10.222.0.1/24"));
    let mut dht = net.child(
        &public,
        "child_dht",
        &[("LP_DHT_BIND", "10.222.0.1".into())],
    );
    let stdout = dht.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let bootstrap = loop {
        let line = lines.next().expect("the DHT child ended").unwrap();
        if let Some(b) = field(&line, "BOOTSTRAP") {
            break b;
        }
    };
    net.lab.keep(dht);
    // The home router: WAN on the public bridge, LAN a bridge of its own, MASQUERADE (no
    // hairpin), unsolicited WAN input dropped.
    let router = net.ns("r");
    let wan = net.plug(&public, "br0", &router, "w", "10.222.0.2/24");
    net.bridge(&router, "br1", Some("10.223.0.1/24"));
    let ipt = |args: &[&str]| {
        let mut all = vec!["ip", "netns", "exec", &router, "iptables"];
        all.extend_from_slice(args);
        run(&all);
    };
    ipt(&[
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-o",
        &wan,
        "-j",
        "MASQUERADE",
    ]);
    ipt(&[
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
    run(&[
        "ip",
        "netns",
        "exec",
        &router,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    let hosts: Vec<(String, Ipv4Addr)> = (1..=2u8)
        .map(|i| {
            let host = net.ns(&format!("h{i}"));
            let ip = Ipv4Addr::new(10, 223, 0, 10 + i);
            net.plug(&router, "br1", &host, &format!("h{i}"), &format!("{ip}/24"));
            run(&[
                "ip",
                "-n",
                &host,
                "route",
                "add",
                "default",
                "via",
                "10.223.0.1",
            ]);
            (host, ip)
        })
        .collect();
    // LAN discovery on: they must connect, at their LAN addresses. Off (at the same time,
    // another topic): the DHT lists only the router's address, which does not hairpin.
    let on = format!("{}-on", net.prefix);
    let off = format!("{}-off", net.prefix);
    let off_wait = Duration::from_secs(6);
    let started = Instant::now();
    let mut kids = Vec::new();
    for (topic, lan, wait) in [(&on, true, HANG_GUARD), (&off, false, off_wait)] {
        for (ns, ip) in &hosts {
            kids.push(net.child(
                ns,
                "child_peer",
                &peer_env(*ip, topic, &bootstrap, lan, wait),
            ));
        }
    }
    let outs: Vec<(String, String)> = kids
        .into_iter()
        .map(|k| text(&wait(k, HANG_GUARD + Duration::from_secs(15))))
        .collect();
    eprintln!("done after {:.2} s", started.elapsed().as_secs_f64());
    let ids: Vec<String> = outs
        .iter()
        .map(|(o, _)| field(o, "ID").unwrap_or_default())
        .collect();
    for (i, (out, err)) in outs.iter().enumerate() {
        let result = field(out, "RESULT").unwrap_or_else(|| format!("crashed: {err}"));
        eprintln!("peer {i}: {result}");
        if i < 2 {
            let other = &ids[1 - i];
            assert!(
                result.starts_with(&format!("connected to {other}")),
                "peer {i}: {out}\n{err}"
            );
            let message = field(out, "MESSAGE");
            assert_eq!(
                message.as_deref(),
                Some("received"),
                "peer {i}: {out}\n{err}"
            );
            let lookup = field(out, "LOOKUP").unwrap_or_default();
            let other_ip = hosts[1 - i].1;
            assert!(
                lookup.starts_with(&format!("{other} {other_ip}:")),
                "peer {i}: not on the LAN path: {lookup}"
            );
        } else {
            assert!(
                result.starts_with("none"),
                "peer {i} without LAN discovery: {out}\n{err}"
            );
            // What it tried is the router's shared public address.
            let failures = field(out, "FAILURES").unwrap_or_default();
            assert!(failures.contains("10.222.0.2:"), "peer {i}: {failures}");
        }
    }
}

#[test]
fn lan_garbage_and_spoofed_packets_change_nothing_root() {
    if !prerequisites("lan_garbage_and_spoofed_packets_…_root", &["ip"]) {
        return;
    }
    let mut net = Net::new('c');
    let hosts = lan_of(&mut net, 224, 3);
    let bootstrap = no_dht(224);
    let topic = format!("{}-topic", net.prefix);
    let [(victim_ns, victim_ip), (peer_ns, peer_ip), (attacker_ns, _)] =
        <[(String, Ipv4Addr); 3]>::try_from(hosts).unwrap();
    let attacker_addrs: Vec<String> = ATTACKER_ADDRS
        .iter()
        .map(|i| format!("10.224.0.{i}"))
        .collect();
    for a in &attacker_addrs[1..] {
        let dev = format!("{}h3b", net.ifp);
        run(&[
            "ip",
            "-n",
            &attacker_ns,
            "addr",
            "add",
            &format!("{a}/24"),
            "dev",
            &dev,
        ]);
    }
    let mut victim = net.child(
        &victim_ns,
        "child_victim",
        &peer_env(victim_ip, &topic, &bootstrap, true, HANG_GUARD),
    );
    let victim_out = victim.stdout.take().unwrap();
    let mut victim_lines = BufReader::new(victim_out).lines();
    let victim_id = loop {
        let line = victim_lines.next().expect("the victim ended").unwrap();
        if let Some(id) = field(&line, "ID") {
            break id;
        }
    };
    // The attacker knows the topic, captures a real announce and sends its worst.
    let attacker = net.child(
        &attacker_ns,
        "child_attacker",
        &[
            ("LP_TOPIC", topic.clone()),
            ("LP_ADDRS", attacker_addrs.join(",")),
            ("LP_VICTIM", victim_ip.to_string()),
        ],
    );
    let (aout, aerr) = text(&wait(attacker, HANG_GUARD));
    eprintln!(
        "attacker: {}",
        field(&aout, "SENT").unwrap_or_else(|| format!("crashed: {aerr}"))
    );
    assert!(field(&aout, "SENT").is_some(), "{aout}\n{aerr}");
    // Then a real peer joins: it must still find the victim, and be the only connection.
    let peer = net.child(
        &peer_ns,
        "child_peer",
        &peer_env(peer_ip, &topic, &bootstrap, true, HANG_GUARD),
    );
    let (pout, perr) = text(&wait(peer, HANG_GUARD + Duration::from_secs(15)));
    let result = field(&pout, "RESULT").unwrap_or_else(|| format!("crashed: {perr}"));
    eprintln!("peer: {result}");
    assert!(
        result.starts_with(&format!("connected to {victim_id}")),
        "{pout}\n{perr}"
    );
    let peer_id = field(&pout, "ID").unwrap();
    // The victim reports and ends when its stdin closes.
    drop(victim.stdin.take());
    let rest: Vec<String> = victim_lines.map_while(Result::ok).collect();
    let status = victim.wait().unwrap();
    let mut verr = String::new();
    if let Some(mut e) = victim.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut verr).unwrap();
    }
    let report = rest.join("\n");
    eprintln!("victim: {report}");
    assert!(
        status.success(),
        "the victim failed (a panic?): {report}\n{verr}"
    );
    let connections = field(&report, "CONNECTIONS").unwrap_or_default();
    assert_eq!(
        connections, peer_id,
        "connections other than the real peer: {report}"
    );
    let stats = field(&report, "STATS").unwrap_or_default();
    let n = |k: &str| -> u64 {
        stats
            .split_once(&format!("{k}: "))
            .and_then(|(_, r)| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {stats}"))
    };
    // Garbage and truncated copies; copies of one packet; random and spoofed tags; one
    // host's many ports: each kind is counted where it was stopped.
    assert!(n("malformed") >= 16 + 14, "{stats}");
    assert!(n("replayed") >= 7, "{stats}");
    assert!(n("unmatched") >= 12, "{stats}");
    assert_eq!(
        n("refused"),
        14 - 8,
        "one source keeps at most 8 entries: {stats}"
    );
    // The table: the silent socket, the babbler, 8 ports of one host, the real peer.
    assert!(n("candidates") <= 11, "{stats}");
    // What the attacker advertised with the right tag was dialled and failed.
    let failures = field(&report, "FAILURES").unwrap_or_default();
    for a in ["10.224.0.15:", "10.224.0.17:", "10.224.0.18:"] {
        assert!(failures.contains(a), "{a} not dialled: {failures}");
    }
    assert!(
        !failures.contains(&format!("{victim_ip}:4242")),
        "a spoofed tag was taken: {failures}"
    );
}

// --- children ---------------------------------------------------------------------------

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn peer_transport() -> HyperswarmTransport {
    let bind: Ipv4Addr = env("LP_BIND").parse().unwrap();
    HyperswarmTransport::builder()
        .bootstrap(env("LP_BOOTSTRAP").split(',').map(str::to_owned))
        .bind_addr(SocketAddrV4::new(bind, 0))
        .dht_server_mode(true)
        .dht_request_timeout(Duration::from_millis(250))
        .timeout(Duration::from_secs(10))
        .handshake_timeout(Duration::from_secs(5))
        .lookup_interval(Duration::from_secs(2))
        .lan_discovery(env("LP_LAN") == "on")
        .build()
        .unwrap()
}

#[test]
#[ignore = "run by the LAN tests inside a host namespace"]
fn child_peer() {
    init_tracing();
    let wait = Duration::from_millis(env("LP_WAIT_MS").parse().unwrap());
    let topic = derive_topic(&env("LP_TOPIC"));
    runtime().block_on(async move {
        let mut t = peer_transport();
        println!("ID {}", t.peer_id());
        let started = Instant::now();
        let mut rx = match t.connect(topic).await {
            Ok(rx) => {
                println!("CONNECT ok in {} ms", started.elapsed().as_millis());
                rx
            }
            Err(e) => {
                let kind = match e.downcast_ref::<HyperswarmError>() {
                    Some(HyperswarmError::DhtUnreachable { .. }) => "DhtUnreachable",
                    _ => "other",
                };
                println!("CONNECT failed {kind}: {e}");
                println!("RESULT none (connect failed)");
                return;
            }
        };
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(mut conn)) => {
                let took = started.elapsed();
                println!(
                    "RESULT connected to {} in {} ms",
                    conn.peer_id(),
                    took.as_millis()
                );
                // Looked up while both still hold the connection: each sends its message
                // only after its lookup, and closes only after the other's message.
                let peers = t.lookup(topic).await.unwrap();
                for p in peers.iter().filter(|p| p.id == conn.peer_id()) {
                    let addr = p.address.as_deref().unwrap_or("-");
                    println!("LOOKUP {} {addr} {}", p.id, p.connected);
                }
                let ok = exchange(&t.peer_id(), conn.as_mut()).await;
                println!("MESSAGE {}", if ok { "received" } else { "lost" });
            }
            _ => {
                let failures: Vec<String> =
                    t.dial_failures().iter().map(ToString::to_string).collect();
                println!("RESULT none within {} ms", wait.as_millis());
                println!("FAILURES {failures:?}");
            }
        }
        t.disconnect().await.unwrap();
    });
}

/// Sends "hello", reads the other's, and closes without losing what either has not read
/// yet; returns whether the other's message arrived.
async fn exchange(me: &str, conn: &mut dyn pluresdb_sync_core::Connection) -> bool {
    let within = Duration::from_secs(10);
    if conn.send(b"hello").await.is_err() {
        return false;
    }
    let got = tokio::time::timeout(within, conn.receive()).await;
    let ok = matches!(got, Ok(Ok(Some(ref m))) if m == b"hello");
    // A close drops what the remote has not read yet (QUIC discards a closed connection's
    // streams), so the larger id says it has read everything and waits for the smaller one
    // to close.
    if ok && me > conn.peer_id() {
        let _ = conn.send(b"bye").await;
        let end = tokio::time::timeout(within, conn.receive()).await;
        assert!(matches!(end, Ok(Ok(None))), "{end:?}");
    } else if ok {
        let bye = tokio::time::timeout(within, conn.receive()).await;
        assert!(matches!(bye, Ok(Ok(Some(ref m))) if m == b"bye"), "{bye:?}");
    }
    let _ = conn.close().await;
    ok
}

#[test]
#[ignore = "run by lan_garbage_and_spoofed_packets_change_nothing_root"]
fn child_victim() {
    init_tracing();
    let topic = derive_topic(&env("LP_TOPIC"));
    runtime().block_on(async move {
        let mut t = peer_transport();
        println!("ID {}", t.peer_id());
        let mut rx = t.connect(topic).await.unwrap();
        // Take connections until the parent closes stdin.
        let (done_tx, mut done) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            while std::io::stdin()
                .read_line(&mut line)
                .map(|n| n > 0)
                .unwrap_or(false)
            {}
            let _ = done_tx.send(());
        });
        let mut peers = Vec::new();
        let mut conns = Vec::new();
        loop {
            tokio::select! {
                _ = &mut done => break,
                c = rx.recv() => match c {
                    Some(mut c) => {
                        peers.push(c.peer_id().to_owned());
                        let me = t.peer_id();
                        conns.push(tokio::spawn(async move { exchange(&me, c.as_mut()).await }));
                    }
                    None => break,
                },
            }
        }
        for c in conns {
            assert!(c.await.unwrap(), "a message was lost");
        }
        println!("CONNECTIONS {}", peers.join(","));
        println!("STATS {:?}", t.lan_stats());
        let failures: Vec<String> = t.dial_failures().iter().map(ToString::to_string).collect();
        println!("FAILURES {failures:?}");
        t.disconnect().await.unwrap();
    });
}

/// The attacker's addresses: one per kind of attack, so that each kind fits in what one
/// source may send at once (the rate limits themselves are unit-tested).
const ATTACKER_ADDRS: [u8; 6] = [13, 14, 15, 16, 17, 18];

#[test]
#[ignore = "run by lan_garbage_and_spoofed_packets_change_nothing_root"]
fn child_attacker() {
    use pluresdb_sync_transport_hyperswarm::testkit::lan_announce;
    init_tracing();
    let topic = derive_topic(&env("LP_TOPIC"));
    let addrs: Vec<Ipv4Addr> = env("LP_ADDRS")
        .split(',')
        .map(|a| a.parse().unwrap())
        .collect();
    let victim: Ipv4Addr = env("LP_VICTIM").parse().unwrap();
    let group = *LAN_DISCOVERY_GROUP.ip();
    let new_socket =
        || socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    let listen = {
        let s = new_socket();
        s.set_reuse_address(true).unwrap();
        s.bind(&std::net::SocketAddr::V4(LAN_DISCOVERY_GROUP).into())
            .unwrap();
        s.join_multicast_v4(&group, &addrs[0]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        UdpSocket::from(s)
    };
    let senders: Vec<UdpSocket> = addrs
        .iter()
        .map(|ip| {
            let s = new_socket();
            s.bind(&std::net::SocketAddr::V4(SocketAddrV4::new(*ip, 0)).into())
                .unwrap();
            s.set_multicast_if_v4(&addrs[0]).unwrap();
            UdpSocket::from(s)
        })
        .collect();
    let mut sent = 0usize;
    let mut out = |from: usize, bytes: &[u8]| {
        let _ = senders[from].send_to(bytes, LAN_DISCOVERY_GROUP);
        sent += 1;
        std::thread::sleep(Duration::from_millis(2));
    };
    // A real announce of the victim's, captured from the group.
    let mut buf = [0u8; 2048];
    let captured = loop {
        let (n, from) = listen.recv_from(&mut buf).expect("no announce within 5 s");
        if buf[5] == 1 && from.ip() == std::net::IpAddr::V4(victim) {
            break buf[..n].to_vec();
        }
    };
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut nonces = 0u8;
    let mut nonce = || {
        nonces += 1;
        let mut n = [nonces; 16];
        n[0] = 0xa7;
        n
    };
    // 0: garbage of every size, oversized datagrams.
    for i in 0..16usize {
        let len = if i % 4 == 0 { 4000 } else { (i * 97) % 1600 };
        let bytes: Vec<u8> = (0..len).map(|j| (j * 31 + i) as u8).collect();
        out(0, &bytes);
    }
    // 1: the victim's own announce truncated, bit-flipped, and replayed to it.
    for i in 0..14usize {
        let cut = (i * 5 + 1) % captured.len();
        out(1, &captured[..cut]);
    }
    out(1, &captured);
    let mut flipped = captured.clone();
    flipped[30] ^= 0x10;
    out(1, &flipped);
    // 2: the right tag for the topic pointing at a silent socket, sent 8 times (one is
    // new, the rest are copies).
    let silent = UdpSocket::bind(SocketAddrV4::new(addrs[2], 0)).unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let silent_packet = lan_announce(&topic, nonce(), addrs[2], silent_port, 60);
    for _ in 0..8 {
        out(2, &silent_packet);
    }
    // 3: well-formed announces and queries with random tags, and a spoofed one: the right
    // tag for another host's address, sent from ours.
    for i in 0..12 {
        let mut p = captured.clone();
        for b in &mut p[6..22] {
            *b = next() as u8;
        }
        for b in &mut p[27..] {
            *b = next() as u8;
        }
        if i % 3 == 0 {
            // The same tags in a query.
            let mut q = p[..22].to_vec();
            q[5] = 2;
            q.push(((p.len() - 27) / 16) as u8);
            q.extend_from_slice(&p[27..]);
            p = q;
        }
        out(3, &p);
    }
    out(3, &lan_announce(&topic, nonce(), victim, 4242, 60));
    // 4: the right tag pointing at a socket that answers everything with garbage.
    let babbler = UdpSocket::bind(SocketAddrV4::new(addrs[4], 0)).unwrap();
    let babbling = babbler.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut b = [0u8; 2048];
        while let Ok((_, from)) = babbling.recv_from(&mut b) {
            let _ = babbling.send_to(&[0x40; 64], from);
        }
    });
    let port = babbler.local_addr().unwrap().port();
    out(4, &lan_announce(&topic, nonce(), addrs[4], port, 60));
    // 5: right tags for 14 ports of one host: at most 8 are kept.
    for port in 20_000..20_014u16 {
        out(5, &lan_announce(&topic, nonce(), addrs[5], port, 60));
    }
    // Give the victim time to dial what it was told (and fail) before these sockets go.
    std::thread::sleep(Duration::from_secs(3));
    println!("SENT {sent} packets");
    std::io::stdout().flush().unwrap();
    drop((silent, babbler));
}

#[test]
#[ignore = "run by lan_peers_behind_one_nat_connect_on_their_lan_addresses_root"]
fn child_dht() {
    let bind: Ipv4Addr = env("LP_DHT_BIND").parse().unwrap();
    let testnet = mainline::Testnet::builder(4)
        .bind_address(bind)
        .build()
        .unwrap();
    println!("BOOTSTRAP {}", testnet.bootstrap.join(","));
    let mut line = String::new();
    while std::io::stdin()
        .read_line(&mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
    {}
}
