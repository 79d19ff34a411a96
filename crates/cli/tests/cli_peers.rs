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

    a.say("hello from A");
    let got = b.stdout_line("hello from A");
    assert_eq!(got, format!("[{}] hello from A", &a_id[..8]));
    b.say("hello from B");
    a.stdout_line("hello from B");

    // A leaves (stdin closed): it says so and exits cleanly; B sees the disconnect.
    a.stdin = None;
    a.stderr_line("leaving");
    let status = a.child.wait().unwrap();
    assert!(status.success(), "{status}");
    b.stderr_line(&format!("peer {} disconnected", &a_id[..8]));
}

#[test]
fn relay_peers_in_separate_processes_talk_through_a_relay_process() {
    let relay = Proc::spawn(&["relay", "--listen", "127.0.0.1:0"]);
    let line = relay.stdout_line("relay listening on ");
    let url = line.rsplit(' ').next().unwrap().to_owned();
    let db = format!("cli-relay-peers-{}", std::process::id());
    let peer = || Proc::spawn(&["peer", "--mode", "relay", "--relay-url", &url, "--db", &db]);
    let mut a = peer();
    let b = peer();
    a.stderr_line("connected");
    b.stderr_line("connected");
    a.say("through the relay");
    let got = b.stdout_line("through the relay");
    assert!(got.ends_with("] through the relay"), "{got}");
}
