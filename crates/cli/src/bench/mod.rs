//! `pluresdb-sync bench`: measurements as ratios against baselines run in the same process,
//! on the same machine, in the same run. Results go to `docs/benchmarks.md`.

mod auto;
mod auto_switch;
mod bridge;
mod hyperswarm;
mod join;
mod relay;

use std::time::Duration;

use clap::{Args, Subcommand};

/// Options of `pluresdb-sync bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    target: BenchTarget,
}

#[derive(Debug, Subcommand)]
enum BenchTarget {
    /// The relay server against a plain tokio-tungstenite echo server: message rate (64 B and
    /// 16 KiB), added latency at half load, memory per idle connection.
    Relay(relay::RelayBenchArgs),
    /// Hyperswarm connections against raw quinn, rustls TLS over TCP and plain TCP: throughput
    /// with 64 KiB messages, time to first message, idle CPU, memory per connection.
    Hyperswarm(hyperswarm::HyperswarmBenchArgs),
    /// SyncBridge events and messages against raw Connection messages of the same size, over
    /// relay and hyperswarm on loopback.
    Bridge(bridge::BridgeBenchArgs),
    /// Auto mode against the modes it combines: the direct path against Hyperswarm mode,
    /// the relayed path against Relay mode (64 KiB messages), joined to first message and to
    /// the direct path, the gap in delivery when the direct path goes dark mid-stream.
    Auto(auto::AutoBenchArgs),
}

/// Runs the chosen benchmark; progress on stderr, the result table on stdout.
pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; run benchmarks with --release");
    }
    match args.target {
        BenchTarget::Relay(a) => relay::run(a).await,
        BenchTarget::Hyperswarm(a) => hyperswarm::run(a).await,
        BenchTarget::Bridge(a) => bridge::run(a).await,
        BenchTarget::Auto(a) => auto::run(a).await,
    }
}

/// The median of `values` (0 when empty).
fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The `q` quantile (0..=1) of sorted durations.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Resident memory of a process in bytes (`/proc/<pid>/status` VmRSS), if readable.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// CPU time (user + system) this process has used, from `/proc/self/stat`.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // /proc reports in USER_HZ, which Linux fixes at 100 for user space.
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Raises this process's open-file limit to its hard limit (children inherit it).
fn raise_fd_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

fn mib_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut []), 0.0);
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&d, 0.5), Duration::from_millis(51));
        assert_eq!(quantile(&d, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn proc_readings() {
        assert!(rss_bytes(std::process::id()).unwrap() > 1024 * 1024);
        assert!(cpu_time().is_some());
    }
}
