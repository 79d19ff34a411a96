//! Separate `pluresdb-sync` processes on loopback: a private DHT node (`dht`) and two
//! Hyperswarm-mode `peer`s that find each other through it and exchange lines.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

/// A child process whose output lines arrive on channels; killed on drop.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
            .args(args)
            .env_remove("PLURESDB_SYNC_BOOTSTRAP")
            // Peers bind every interface: no LAN discovery, so nothing is multicast off this
            // host and the offline error below stays an error.
            .env("PLURESDB_SYNC_LAN_DISCOVERY", "off")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = |r: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
            rx
        };
        let out = lines(Box::new(child.stdout.take().unwrap()));
        let err = lines(Box::new(child.stderr.take().unwrap()));
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            out,
            err,
        }
    }

    /// The first line of `stream` containing `needle`.
    fn wait_for(stream: &mpsc::Receiver<String>, needle: &str, seen: &mut Vec<String>) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match stream.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => seen.push(line),
                Err(e) => panic!("no line with {needle:?} ({e}); saw {seen:#?}"),
            }
        }
    }

    fn stdout_line(&self, needle: &str) -> String {
        Self::wait_for(&self.out, needle, &mut Vec::new())
    }

    fn stderr_line(&self, needle: &str) -> String {
        Self::wait_for(&self.err, needle, &mut Vec::new())
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn hyperswarm_peers_in_separate_processes_meet_through_a_private_dht_node() {
    let dht = Proc::spawn(&["dht", "--listen", "127.0.0.1:0"]);
    let line = dht.stdout_line("dht node listening on ");
    let addr = line.rsplit(' ').next().unwrap().to_owned();

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("a.key");
    let keygen = Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
        .args(["keygen", "--out", key.to_str().unwrap()])
        .output()
        .unwrap();
    let a_id = String::from_utf8(keygen.stdout).unwrap().trim().to_owned();

    let db = format!("cli-peers-{}", std::process::id());
    let peer = |extra: &[&str]| {
        let mut args = vec![
            "peer",
            "--mode",
            "hyperswarm",
            "--db",
            &db,
            "--bootstrap",
            &addr,
        ];
        args.extend_from_slice(extra);
        Proc::spawn(&args)
    };
    let mut a = peer(&["--key", key.to_str().unwrap()]);
    let mut b = peer(&[]);
    // B knows A by the identity in A's key file.
    let connected = b.stderr_line("connected");
    assert!(connected.contains(&a_id[..8]), "{connected}");
    a.stderr_line("connected");

    // Where B reaches A: the transport's verified address (a DHT lookup).
    let at = b.stderr_line(&format!("peer {} at 127.0.0.1:", &a_id[..8]));
    assert!(at.ends_with("(direct, QUIC)"), "{at}");

    a.say("hello from A");
    let got = b.stdout_line("hello from A");
    assert_eq!(got, format!("[{}] hello from A", &a_id[..8]));
    b.say("hello from B");
    a.stdout_line("hello from B");
    a.say("upsert doc-1");
    assert_eq!(b.stdout_line("doc-1"), "event upsert doc-1");

    // A leaves (stdin closed): it says so and exits cleanly; B sees the disconnect.
    a.stdin = None;
    a.stderr_line("leaving");
    let status = a.child.wait().unwrap();
    assert!(status.success(), "{status}");
    b.stderr_line(&format!("peer {} disconnected", &a_id[..8]));
}

/// The JSON object of the next stdout line whose "type" is `kind`.
fn json_line(p: &Proc, kind: &str) -> serde_json::Value {
    let line = p.stdout_line(&format!("\"type\":\"{kind}\""));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
}

#[test]
fn relay_peers_in_separate_processes_talk_through_a_relay_process() {
    let relay = Proc::spawn(&["relay", "--listen", "127.0.0.1:0"]);
    let line = relay.stdout_line("relay listening on ");
    let url = line.rsplit(' ').next().unwrap().to_owned();
    let db = format!("cli-relay-peers-{}", std::process::id());
    let peer = |extra: &[&str]| {
        let mut args = vec!["peer", "--mode", "relay", "--relay-url", &url, "--db", &db];
        args.extend_from_slice(extra);
        Proc::spawn(&args)
    };
    let mut a = peer(&[]);
    let mut b = peer(&["--json"]);
    let joining = json_line(&b, "joining");
    assert_eq!(joining["mode"], "relay");
    let b_id = joining["peer"].as_str().unwrap().to_owned();
    let connected = a.stderr_line("connected");
    assert!(
        connected.contains(&b_id[..8]) && connected.contains("via relay ws://"),
        "{connected}"
    );
    let connected = json_line(&b, "peer_connected");
    let a_id = connected["peer"].as_str().unwrap().to_owned();
    assert_eq!(a_id.len(), 64, "{connected}");

    // Messages and events, both ways; B's side as JSON.
    a.say("through the relay");
    let m = json_line(&b, "message");
    assert_eq!(
        (m["peer"].as_str(), m["text"].as_str()),
        (Some(&*a_id), Some("through the relay"))
    );
    a.say("upsert users/7");
    let e = json_line(&b, "event");
    assert_eq!(
        (e["kind"].as_str(), e["id"].as_str()),
        (Some("upsert"), Some("users/7"))
    );
    b.say("delete users/7");
    assert_eq!(a.stdout_line("users/7"), "event delete users/7");
    b.say("hello from B");
    assert_eq!(
        a.stdout_line("hello from B"),
        format!("[{}] hello from B", &b_id[..8])
    );

    // A leaves: B reports it.
    a.stdin = None;
    assert!(a.child.wait().unwrap().success());
    assert_eq!(
        json_line(&b, "peer_disconnected")["peer"].as_str(),
        Some(&*a_id)
    );
    b.stdin = None;
    json_line(&b, "leaving");
    assert!(b.child.wait().unwrap().success());
}

#[test]
fn peer_errors_say_the_cause_and_a_hint() {
    // Nothing listens on this port: the relay cannot be reached.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("ws://127.0.0.1:{port}/relay");
    let out = Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
        .args(["peer", "--mode", "relay", "--relay-url", &url, "--db", "x"])
        .args(["--timeout-ms", "2000"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("cannot reach the relay at {url}"))
            && err.contains("--mode hyperswarm"),
        "{err}"
    );

    // No DHT node answers at the bootstrap address.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent = udp.local_addr().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
        .args([
            "peer",
            "--mode",
            "hyperswarm",
            "--bootstrap",
            &silent,
            "--db",
            "x",
        ])
        .args(["--timeout-ms", "2000"])
        .env_remove("PLURESDB_SYNC_BOOTSTRAP")
        .env("PLURESDB_SYNC_LAN_DISCOVERY", "off")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(
            "no DHT bootstrap node answered within 2 s: pass --bootstrap, or use --mode relay"
        ),
        "{err}"
    );
    drop(udp);
}
