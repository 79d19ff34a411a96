//! The `pluresdb-sync` binary, run as a user would.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::{Command, Output};

fn run(args: &[&str], env: &[(&str, &std::path::Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn topic_prints_the_spec_vector() {
    let out = run(&["topic", "my-app-database"], &[]);
    assert!(out.status.success());
    assert_eq!(
        stdout(&out).trim(),
        "9b7834b794d97cd464a616bf639d0f36788de21c2849d5a8652637769f6e47cc"
    );
    let empty = run(&["topic", ""], &[]);
    assert_eq!(
        stdout(&empty).trim(),
        "0e5751c026e543b2e8ab2eb06099daa1d1e5df47778f7787faab45cdf12fe3a8"
    );
}

#[test]
fn keygen_writes_a_private_key_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/id.key");
    let p = path.to_str().unwrap();
    let out = run(&["keygen", "--out", p], &[]);
    assert!(out.status.success(), "{out:?}");
    let peer_id = stdout(&out).trim().to_owned();
    assert_eq!(peer_id.len(), 64);
    assert!(
        peer_id
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // The key file must not contain the peer id's secret in the peer id line, and the
    // peer-id command reads the same identity back.
    let again = run(&["peer-id", "--key", p], &[]);
    assert_eq!(stdout(&again).trim(), peer_id);

    let refused = run(&["keygen", "--out", p], &[]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(stdout(&run(&["peer-id", "--key", p], &[])).trim(), peer_id);

    let forced = run(&["keygen", "--out", p, "--force"], &[]);
    assert!(forced.status.success());
    assert_ne!(stdout(&forced).trim(), peer_id);
}

#[test]
fn keygen_default_location_uses_xdg_config_home() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["keygen"], &[("XDG_CONFIG_HOME", dir.path())]);
    assert!(out.status.success(), "{out:?}");
    assert!(dir.path().join("pluresdb-sync/identity.key").exists());
}

#[test]
fn bad_key_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.key");
    std::fs::write(&path, "secret-key: nothex\n").unwrap();
    let out = run(&["peer-id", "--key", path.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.key") && err.contains("hex"), "{err}");
}

#[test]
fn help_lists_every_subcommand() {
    let out = run(&["--help"], &[]);
    assert!(out.status.success());
    let help = stdout(&out);
    for sub in ["topic", "keygen", "peer-id", "peer"] {
        assert!(help.contains(sub), "--help lacks {sub}: {help}");
    }
    let keygen = stdout(&run(&["keygen", "--help"], &[]));
    assert!(
        keygen.contains("--force") && keygen.contains("0600"),
        "{keygen}"
    );
}

#[test]
fn peer_in_disabled_mode_joins_and_leaves_when_stdin_ends() {
    let out = Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
        .args(["peer", "--mode", "disabled", "--db", "my-app-database"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("joining topic 9b7834b7 over disabled"),
        "{err}"
    );
    assert!(err.contains("leaving"), "{err}");
}

#[test]
fn peer_reports_config_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
        .args(["peer", "--mode", "relay", "--db", "x"])
        .env_remove("PLURESDB_SYNC_RELAY_URL")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("relay_url"), "{err}");

    let bad_topic = run(&["peer", "--mode", "disabled", "--topic", "abc"], &[]);
    assert!(!bad_topic.status.success());
    assert!(String::from_utf8_lossy(&bad_topic.stderr).contains("64 hex digits"));
}

/// The README's main job: over both transports three replicas link up, sync a burst of
/// events exactly once, stream a snapshot, and notice one leaving; then the table.
#[test]
fn demo_runs_every_transport_end_to_end() {
    let out = Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
        .args(["demo", "--timeout-ms", "60000"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for mode in ["relay", "hyperswarm", "auto"] {
        for line in [
            "full mesh of 3 replicas in",
            "each replica published 5000 events; each applied the other 10000 exactly once",
            "A streamed a 16 MiB snapshot to B and C",
            "C left; A and B saw PeerDisconnected C",
        ] {
            assert!(err.contains(&format!("[{mode}] {line}")), "{line}: {err}");
        }
    }
    let table = stdout(&out);
    let rows: Vec<&str> = table.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(rows.len(), 4, "{table}");
    for column in ["mode", "peers", "connect ms", "events/s", "MiB/s"] {
        assert!(rows[0].contains(column), "{table}");
    }
    assert!(
        rows[1].starts_with("relay")
            && rows[2].starts_with("hyperswarm")
            && rows[3].starts_with("auto"),
        "{table}"
    );
    // Every number in the rows is positive.
    for row in &rows[1..] {
        let numbers: Vec<f64> = row
            .split_whitespace()
            .skip(1)
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(numbers.len(), 4, "{row}");
        assert_eq!(numbers[0], 3.0, "{row}");
        assert!(numbers[2..].iter().all(|n| *n > 0.0), "{row}");
    }
}

/// A demo step that fails says which one and why, and exits non-zero.
#[test]
fn demo_failure_names_the_step() {
    let out = Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
        .args(["demo", "--mode", "relay", "--timeout-ms", "1"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error: relay demo"), "{err}");
}

/// The benchmarks in miniature, so they keep working (numbers from debug builds mean nothing).
#[test]
fn benchmarks_run_in_miniature() {
    let relay = Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
        .args(["bench", "relay", "--connections", "50", "--rounds", "1"])
        .args(["--messages", "500", "--latency-secs", "0.2"])
        .output()
        .unwrap();
    let table = stdout(&relay);
    assert!(
        relay.status.success(),
        "{}",
        String::from_utf8_lossy(&relay.stderr)
    );
    for row in [
        "message rate, 64 B",
        "message rate, 16384 B",
        "latency p99",
        "RSS per idle",
    ] {
        assert!(table.contains(row), "{table}");
    }

    let hs = Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
        .args([
            "bench",
            "hyperswarm",
            "--mib",
            "2",
            "--rounds",
            "1",
            "--joins",
            "1",
        ])
        .args(["--idle-secs", "0.2", "--mesh", "3"])
        .output()
        .unwrap();
    let table = stdout(&hs);
    assert!(
        hs.status.success(),
        "{}",
        String::from_utf8_lossy(&hs.stderr)
    );
    for row in [
        "plain TCP",
        "raw quinn",
        "hyperswarm",
        "time to first message",
        "(3 links)",
    ] {
        assert!(table.contains(row), "{table}");
    }

    let bridge = Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
        .args(["bench", "bridge", "--events", "500", "--messages", "50"])
        .args(["--rounds", "1"])
        .output()
        .unwrap();
    let table = stdout(&bridge);
    assert!(
        bridge.status.success(),
        "{}",
        String::from_utf8_lossy(&bridge.stderr)
    );
    for row in [
        "relay: events of 20 B",
        "relay: messages of 16384 B",
        "hyperswarm: events of 20 B",
        "hyperswarm: messages of 16384 B",
    ] {
        assert!(table.contains(row), "{table}");
    }

    let auto = Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
        .args([
            "bench",
            "auto",
            "--mib",
            "2",
            "--rounds",
            "1",
            "--joins",
            "1",
            "--switches",
            "1",
            "--switch-messages",
            "600",
        ])
        .output()
        .unwrap();
    let table = stdout(&auto);
    assert!(
        auto.status.success(),
        "{}",
        String::from_utf8_lossy(&auto.stderr)
    );
    for row in [
        "auto, direct path",
        "auto, relayed path",
        "relay mode",
        "bytes sent direct",
        "joined to direct path",
        "forced switch (1 runs): longest delivery gap",
        "messages lost 0, duplicated 0, out of order 0",
    ] {
        assert!(table.contains(row), "{table}");
    }
}
