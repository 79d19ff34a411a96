//! `pluresdb-sync bench hyperswarm` runs end to end (tiny sizes; loopback only).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;

#[test]
fn bench_hyperswarm_reports_every_measurement() {
    let out = Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
        .args([
            "bench",
            "hyperswarm",
            "--size-mib",
            "4",
            "--rounds",
            "1",
            "--connections",
            "2",
            "--idle-secs",
            "1",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "hyperswarm / raw quinn =",
        "hyperswarm / TLS-TCP",
        "hyperswarm / TCP",
        "join to first message",
        "idle CPU",
        "per connection end",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}
