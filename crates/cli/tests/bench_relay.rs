//! `pluresdb-sync bench relay` runs end to end (tiny sizes) and prints every measurement.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[test]
fn bench_relay_prints_ratios_against_the_baseline() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
        .args([
            "bench",
            "relay",
            "--messages",
            "2000",
            "--idle-connections",
            "50",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in [
        "| 64 B messages/s |",
        "| 16384 B messages/s |",
        "| latency p50 at",
        "| latency p99 at",
        "| RSS per idle connection (50 joined connections",
    ] {
        assert!(text.contains(row), "missing {row:?} in\n{text}");
    }
    assert!(text.matches('x').count() >= 2, "no ratios in\n{text}");
}
