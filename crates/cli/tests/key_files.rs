//! Hostile key paths against the real `pluresdb-sync` binary and the library loader both
//! transports' builders use: a FIFO, `/dev/zero`, a directory, a symlink to someone else's
//! file, a zero secret. Every run is bounded (a timeout, and 1 GiB of address space), so a
//! regression fails instead of hanging the suite or eating the machine's memory.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use pluresdb_sync::Identity;

const T: Duration = Duration::from_secs(20);
/// Address-space limit for the binary, in KiB (`ulimit -v`).
const MEMORY_KIB: u32 = 1024 * 1024;

/// Runs the binary with `args` under the time and memory limits.
async fn run(args: &[&str]) -> Output {
    let script = format!("ulimit -v {MEMORY_KIB} && exec \"$0\" \"$@\"");
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_pluresdb-sync"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(T, child)
        .await
        .unwrap_or_else(|_| panic!("pluresdb-sync {args:?} still running after {T:?}"))
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// The command fails with every one of `needles` in its error.
async fn refused(args: &[&str], needles: &[&str]) {
    let out = run(args).await;
    assert!(!out.status.success(), "{args:?} succeeded: {out:?}");
    let err = stderr(&out);
    for n in needles {
        assert!(err.contains(n), "{args:?}: {err:?} lacks {n:?}");
    }
}

fn mkfifo(path: &Path) {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo (coreutils) is needed");
    assert!(made.success());
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test]
async fn key_paths_that_are_not_regular_files_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.key");
    mkfifo(&fifo);
    // Before: peer-id blocked forever on the FIFO, and read /dev/zero until memory ran out
    // (6 GB of RSS in 6 s).
    let cases = [
        (s(&fifo), "is a FIFO"),
        ("/dev/zero", "is a character device"),
        (s(dir.path()), "is a directory"),
    ];
    for (path, what) in cases {
        refused(
            &["peer-id", "--key", path],
            &[path, what, "not a regular file"],
        )
        .await;
        // `peer` loads the same way for both transports, before touching the network.
        refused(
            &["peer", "--mode", "hyperswarm", "--db", "x", "--key", path],
            &[path, what],
        )
        .await;
        refused(
            &[
                "peer",
                "--mode",
                "relay",
                "--relay-url",
                "ws://127.0.0.1:9/relay",
                "--db",
                "x",
                "--key",
                path,
            ],
            &[path, what],
        )
        .await;
    }
}

#[test]
fn the_relay_builder_refuses_a_fifo_and_dev_zero_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.key");
    mkfifo(&fifo);
    // The FIFO first: only a loader that checks the file type gets to /dev/zero, so this
    // in-process test cannot read it without bound.
    for (path, what) in [
        (fifo, "is a FIFO"),
        ("/dev/zero".into(), "character device"),
    ] {
        let shown = path.display().to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        // A thread of its own: if it blocks, the test fails and exits without joining it.
        std::thread::spawn(move || {
            let built = pluresdb_sync_transport_relay::RelayTransport::builder()
                .relay_url("ws://127.0.0.1:9/relay")
                .identity_file(&path)
                .build()
                .map(|_| ());
            let _ = tx.send(built);
        });
        let err = rx
            .recv_timeout(T)
            .unwrap_or_else(|_| panic!("build() still blocked on {shown} after {T:?}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&shown) && err.contains(what), "{err}");
    }
}

#[tokio::test]
async fn keygen_force_never_writes_through_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "someone else's file\n").unwrap();
    let link = dir.path().join("id.key");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    // Before: --force followed the link and replaced the victim's content with the secret.
    refused(
        &["keygen", "--out", s(&link), "--force"],
        &["symbolic link"],
    )
    .await;
    refused(&["keygen", "--out", s(&link)], &["already exists"]).await;
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "someone else's file\n"
    );
    let dangling = dir.path().join("dangling.key");
    let target = dir.path().join("target.key");
    std::os::unix::fs::symlink(&target, &dangling).unwrap();
    refused(
        &["keygen", "--out", s(&dangling), "--force"],
        &["symbolic link"],
    )
    .await;
    assert!(!target.exists());
}

#[tokio::test]
async fn keygen_force_swaps_in_a_new_file_and_keeps_the_old_one_intact_until_then() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("id.key");
    let old = stdout(&run(&["keygen", "--out", s(&path)]).await);
    let backup = dir.path().join("backup.key");
    std::fs::hard_link(&path, &backup).unwrap();
    let inode = std::fs::metadata(&path).unwrap().ino();
    let forced = run(&["keygen", "--out", s(&path), "--force"]).await;
    assert!(forced.status.success(), "{forced:?}");
    let new = stdout(&forced);
    assert_ne!(new, old);
    assert_eq!(stdout(&run(&["peer-id", "--key", s(&path)]).await), new);
    // Before: the old inode was truncated and rewritten in place, so the second name (and
    // anyone holding the file open) saw the new secret, and a crash in between left nothing.
    assert_eq!(stdout(&run(&["peer-id", "--key", s(&backup)]).await), old);
    assert_ne!(std::fs::metadata(&path).unwrap().ino(), inode);
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["backup.key", "id.key"], "a temporary file was left");
}

#[tokio::test]
async fn a_zero_or_repeated_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (name, digits) in [("zero.key", "00"), ("ones.key", "ff")] {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("secret-key: {}\n", digits.repeat(32))).unwrap();
        // Before: accepted, a key whose secret everyone knows.
        refused(&["peer-id", "--key", s(&path)], &[name, "degenerate"]).await;
        let err = Identity::load(&path).unwrap_err().to_string();
        assert!(err.contains("degenerate"), "{err}");
    }
}
