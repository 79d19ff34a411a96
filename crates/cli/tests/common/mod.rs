//! What the CLI's process-level tests share: a relay process on NATS, numbered messages that
//! carry their own check, a ping-pong pair that measures its longest stall, and a process's
//! resident memory.
#![allow(dead_code)]

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pluresdb_sync::Connection;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The step timeout.
pub(crate) const T: Duration = Duration::from_secs(30);

/// A `pluresdb-sync relay` process on the NATS server at `nats_port`; returns it (killed on
/// drop) and its ws:// URL.
pub(crate) async fn relay_on_nats(nats_port: u16) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
        .args(["relay", "--listen", "127.0.0.1:0", "--nats"])
        .arg(format!("nats://127.0.0.1:{nats_port}"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = tokio::time::timeout(T, lines.next_line())
            .await
            .expect("relay did not print its address")
            .unwrap()
            .expect("relay exited early");
        if let Some(rest) = line.strip_prefix("relay listening on ") {
            return (child, rest.to_owned());
        }
    }
}

/// The resident set of process `pid`, in KiB (from /proc).
pub(crate) fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Message `seq` of `len` bytes: its 8-byte big-endian number, then a filler derived from it.
pub(crate) fn message(seq: u64, len: usize) -> Vec<u8> {
    let mut m = vec![(seq % 251) as u8; len];
    m[..8].copy_from_slice(&seq.to_be_bytes());
    m
}

/// The number of a [`message`] of `len` bytes, checking its length and filler.
pub(crate) fn seq_of(m: &[u8], len: usize) -> u64 {
    assert_eq!(m.len(), len, "a message of {} bytes", m.len());
    let seq = u64::from_be_bytes(m[..8].try_into().unwrap());
    assert!(
        m[8..].iter().all(|&b| b == (seq % 251) as u8),
        "message {seq} is corrupt"
    );
    seq
}

/// C and D ping-pong until `stop`, pausing `pause` after each round trip: the longest time
/// between two round trips, and how many were made.
pub(crate) async fn ping_pong(
    mut cd: Box<dyn Connection>,
    mut dc: Box<dyn Connection>,
    stop: Arc<AtomicBool>,
    pause: Duration,
) -> (Duration, u64) {
    let (mut max_gap, mut rounds) = (Duration::ZERO, 0u64);
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        cd.send(&rounds.to_be_bytes()).await.unwrap();
        let got = tokio::time::timeout(T, dc.receive())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.as_deref(), Some(&rounds.to_be_bytes()[..]));
        dc.send(b"pong").await.unwrap();
        let got = tokio::time::timeout(T, cd.receive())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.as_deref(), Some(&b"pong"[..]));
        rounds += 1;
        max_gap = max_gap.max(last.elapsed());
        last = Instant::now();
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    (max_gap, rounds)
}
