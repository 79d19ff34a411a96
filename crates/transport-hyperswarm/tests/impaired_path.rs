//! Fault injection: a Hyperswarm pair on an impaired path inside a network namespace (needs
//! root, `ip`, `iptables` and `tc`). This kernel has no `sch_netem` (and no loadable
//! modules), so the impairments are made with what it has, all in the kernel and only in the
//! test's namespace, on the pair's data ports: 5% loss (`iptables -m statistic ... -j DROP`
//! on INPUT, so senders see no error), 5% duplicates (`-j TEE` clones a packet back onto the
//! path) and reordering (an HTB class of 2 Mbit/s, to which a `u32` filter sends packets
//! whose ciphertext byte at offset 40 has its low four bits clear, about 1 in 16: they wait
//! behind the rate while the others pass). A pair connects first; then the impairments go
//! on and A streams numbered messages: B must get every one exactly once, in order, on the
//! same connection. The kernel's counters prove each impairment happened. On loopback QUIC
//! sends with UDP GSO, so netfilter sees socket buffers of several datagrams (about six on
//! average here): loss and duplicates hit bursts of datagrams, harsher than per-datagram 5%.
//! The pair runs as a child process inside the namespace (`child_impaired_pair`), made
//! by the `pluresdb-sync-netlab` testkit (removed on drop, also when the test fails).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use pluresdb_sync_netlab::{Lab, prerequisites};

/// Messages A streams under impairment.
const N: u64 = 2000;
/// Bytes of each message (an 8-byte big-endian sequence number, then filler).
const MESSAGE_BYTES: usize = 4096;

/// The packets of the rule lines of `listing` (iptables -L -v -n -x) with `target`, summed.
fn rule_packets(listing: &str, target: &str) -> u64 {
    listing
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some(target))
        .map(|l| l.split_whitespace().next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Sent packets (datagrams, GSO segments counted one by one) and overlimits of HTB class
/// `class` in `tc -s class show` output.
fn class_stats(listing: &str, class: &str) -> (u64, u64) {
    let mut lines = listing.lines();
    while let Some(l) = lines.next() {
        if l.starts_with(&format!("class htb {class} ")) {
            let stats = lines.next().unwrap();
            let words: Vec<&str> = stats.split_whitespace().collect();
            let after = |w: &str| {
                let i = words.iter().position(|x| *x == w).unwrap();
                words[i + 1]
                    .trim_end_matches([',', ')'])
                    .parse::<u64>()
                    .unwrap()
            };
            return (after("bytes"), after("overlimits")); // "Sent B bytes P pkt (..."
        }
    }
    panic!("no class {class} in {listing}");
}

/// A streams 0..N numbered messages to B, which checks each arrives once, whole and in
/// order, on this one connection; the time it took.
async fn stream(
    mut ab: Box<dyn pluresdb_sync_core::Connection>,
    mut ba: Box<dyn pluresdb_sync_core::Connection>,
) -> (
    Box<dyn pluresdb_sync_core::Connection>,
    Box<dyn pluresdb_sync_core::Connection>,
    Duration,
) {
    let within = Duration::from_secs(30);
    let started = Instant::now();
    let sending = tokio::spawn(async move {
        for seq in 0..N {
            let mut m = vec![(seq % 251) as u8; MESSAGE_BYTES];
            m[..8].copy_from_slice(&seq.to_be_bytes());
            ab.send(&m).await.unwrap();
        }
        ab
    });
    for expected in 0..N {
        let m = tokio::time::timeout(within, ba.receive())
            .await
            .unwrap_or_else(|_| panic!("nothing within {within:?} after {expected}"))
            .unwrap()
            .unwrap_or_else(|| panic!("the connection ended after {expected} messages"));
        assert_eq!(m.len(), MESSAGE_BYTES);
        let seq = u64::from_be_bytes(m[..8].try_into().unwrap());
        assert_eq!(seq, expected, "out of order, lost or duplicated");
        assert!(
            m[8..].iter().all(|&x| x == (seq % 251) as u8),
            "{seq} corrupt"
        );
    }
    let took = started.elapsed();
    let ab = sending.await.unwrap();
    (ab, ba, took)
}

#[test]
fn impaired_path_loss_duplicates_reordering_root() {
    if !prerequisites(
        "impaired_path_loss_duplicates_reordering_root",
        &["ip", "iptables", "tc"],
    ) {
        return;
    }
    let mut lab = Lab::new("fi").unwrap();
    let ns = lab.namespace("n").unwrap();
    let exec = |args: &[&str]| ns.exec(args).unwrap();
    let mut child = ns
        .command(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_impaired_pair",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut line_with = |prefix: &str| loop {
        let l = lines
            .next()
            .unwrap_or_else(|| panic!("the child ended before {prefix:?}"))
            .unwrap();
        if let Some((_, rest)) = l.split_once(prefix) {
            return rest.trim().to_owned();
        }
    };
    // The pair is connected: impair both data ports.
    let ports: Vec<String> = line_with("PORTS ")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(ports.len(), 2);
    for port in &ports {
        // A rule without a target only counts: the packets (socket buffers) reaching the pair.
        exec(&["iptables", "-A", "INPUT", "-p", "udp", "--dport", port]);
        exec(&[
            "iptables",
            "-A",
            "INPUT",
            "-p",
            "udp",
            "--dport",
            port,
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            "0.05",
            "-j",
            "DROP",
        ]);
        exec(&[
            "iptables",
            "-t",
            "mangle",
            "-A",
            "OUTPUT",
            "-p",
            "udp",
            "--dport",
            port,
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            "0.05",
            "-j",
            "TEE",
            "--gateway",
            "127.0.0.1",
        ]);
    }
    exec(&[
        "tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "10",
    ]);
    exec(&[
        "tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb", "rate",
        "1gbit", "burst", "1m", "cburst", "1m",
    ]);
    exec(&[
        "tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:20", "htb", "rate",
        "2mbit", "ceil", "2mbit", "burst", "2k", "cburst", "2k",
    ]);
    for port in &ports {
        exec(&[
            "tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1",
            "u32", "match", "ip", "protocol", "17", "0xff", "match", "ip", "dport", port, "0xffff",
            "match", "u8", "0x00", "0x0f", "at", "40", "flowid", "1:20",
        ]);
    }
    let stdin = child.stdin.as_mut().unwrap();
    writeln!(stdin, "GO").unwrap();
    stdin.flush().unwrap();
    let result = line_with("RESULT ");
    let status = child.wait().unwrap();
    assert!(status.success(), "the pair failed: {result}");

    let input = exec(&["iptables", "-L", "INPUT", "-v", "-n", "-x"]);
    let dropped = rule_packets(&input, "DROP");
    // Counting rules have no target: their third column is the protocol.
    let arrived = rule_packets(&input, "17") + rule_packets(&input, "udp");
    let duplicated = rule_packets(
        &exec(&["iptables", "-t", "mangle", "-L", "OUTPUT", "-v", "-n", "-x"]),
        "TEE",
    );
    let classes = exec(&["tc", "-s", "class", "show", "dev", "lo"]);
    let (slow_pkts, slow_over) = class_stats(&classes, "1:20");
    let (fast_pkts, _) = class_stats(&classes, "1:10");
    eprintln!(
        "RESULT impaired path: {result}; of {arrived} socket buffers to the pair's ports the \
         kernel dropped {dropped} and duplicated {duplicated}; the slow class held back \
         {slow_pkts} datagrams ({slow_over} overlimits) while {fast_pkts} passed"
    );
    assert!(dropped > 0 && duplicated > 0, "no loss or no duplicates");
    assert!(
        slow_pkts > 0 && slow_over > 0 && fast_pkts > 0,
        "no packet was held back: no reordering"
    );
    assert!(result.starts_with("ok"), "{result}");
}

#[test]
#[ignore = "run by impaired_path_loss_duplicates_reordering_root inside its namespace"]
fn child_impaired_pair() {
    use pluresdb_sync_core::Transport;
    use pluresdb_sync_core::testkit::fresh_topic;
    use pluresdb_sync_transport_hyperswarm::testkit::LoopbackDht;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let within = Duration::from_secs(30);
        let dht = LoopbackDht::start().await.unwrap();
        let topic = fresh_topic("impaired");
        let mut a = dht.test_builder().build().unwrap();
        let mut b = dht.test_builder().build().unwrap();
        let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
        let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
        let ab = common::next_conn(&mut ra, within).await;
        let ba = common::next_conn(&mut rb, within).await;
        // The same stream on the unimpaired path first, for comparison.
        let (ab, ba, baseline) = stream(ab, ba).await;
        println!(
            "PORTS {} {}",
            a.local_addr().unwrap().port(),
            b.local_addr().unwrap().port()
        );
        let mut go = String::new();
        std::io::stdin().read_line(&mut go).unwrap();
        assert_eq!(go.trim(), "GO");

        let (mut ab, mut ba, took) = stream(ab, ba).await;
        // Still the same connection, both ways; no second one was made.
        ba.send(b"still up").await.unwrap();
        let got = tokio::time::timeout(within, ab.receive()).await.unwrap();
        assert_eq!(got.unwrap().as_deref(), Some(&b"still up"[..]));
        assert!(
            ra.try_recv().is_err() && rb.try_recv().is_err(),
            "a reconnect"
        );
        let mib = (N as f64) * MESSAGE_BYTES as f64 / (1024.0 * 1024.0);
        println!(
            "RESULT ok: {N} messages of {MESSAGE_BYTES} B in order, once each, one connection, \
             in {:.2} s ({:.1} MiB/s; unimpaired: {:.2} s, {:.1} MiB/s)",
            took.as_secs_f64(),
            mib / took.as_secs_f64(),
            baseline.as_secs_f64(),
            mib / baseline.as_secs_f64()
        );
        a.disconnect().await.unwrap();
        b.disconnect().await.unwrap();
        dht.stop().await.unwrap();
    });
}
