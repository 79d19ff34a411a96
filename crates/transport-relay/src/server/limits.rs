//! Per-client-IP limits: the count of open connections from each IP and the byte-rate token
//! bucket all of an IP's connections share.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type IpEntry = (usize, Arc<Mutex<Bucket>>);

/// Open connections and the shared byte-rate bucket of each client IP.
#[derive(Debug)]
pub(super) struct PerIp {
    map: Mutex<HashMap<IpAddr, IpEntry>>,
    max_connections: usize,
    /// Bytes per second per IP; `None`: no rate limit.
    rate: Option<u64>,
    max_frame: usize,
}

impl PerIp {
    pub(super) fn new(max_connections: usize, rate: Option<u64>, max_frame: usize) -> Self {
        Self {
            map: Mutex::default(),
            max_connections,
            rate,
            max_frame,
        }
    }

    /// Counts a new connection from `ip` until the slot is dropped.
    pub(super) fn take(self: &Arc<Self>, ip: IpAddr) -> IpSlot {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (n, bucket) = map.entry(ip).or_insert_with(|| {
            let bucket = Bucket::new(self.rate.unwrap_or(0), self.max_frame);
            (0, Arc::new(Mutex::new(bucket)))
        });
        *n += 1;
        IpSlot {
            over_limit: *n > self.max_connections,
            far_over_limit: *n > 2 * self.max_connections,
            bucket: bucket.clone(),
            per_ip: self.clone(),
            ip,
        }
    }
}

/// Counts a connection against its IP's limit until dropped.
#[derive(Debug)]
pub(super) struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
    /// More than `max_connections_per_ip` connections from this IP are open, this one included.
    pub(super) over_limit: bool,
    /// More than twice as many: not even worth a 429.
    pub(super) far_over_limit: bool,
    /// The IP's byte-rate bucket, shared by all its connections.
    bucket: Arc<Mutex<Bucket>>,
}

impl IpSlot {
    /// Charges `bytes` read; returns how long to pause reading (zero when within the rate).
    pub(super) fn charge(&self, bytes: usize) -> Duration {
        if self.per_ip.rate.is_none() {
            return Duration::ZERO;
        }
        self.bucket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(bytes as f64, Instant::now())
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.per_ip.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, _)) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// A token bucket of bytes: `rate` per second, holding at most one second's worth (and at
/// least two frames, so one frame can always pass).
#[derive(Debug)]
struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, max_frame: usize) -> Self {
        let rate = rate as f64;
        let capacity = rate.max(2.0 * max_frame as f64);
        Self {
            rate,
            capacity,
            tokens: capacity,
            last: Instant::now(),
        }
    }

    fn take(&mut self, bytes: f64, now: Instant) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity) - bytes;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_pauses_after_the_burst_and_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, 100); // capacity 1000 bytes
        b.last = t0;
        assert_eq!(b.take(1000.0, t0), Duration::ZERO);
        let wait = b.take(500.0, t0);
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // One second later the debt is paid and 500 more are available.
        assert_eq!(b.take(500.0, t0 + Duration::from_secs(1)), Duration::ZERO);
        // Never more than the capacity after a long idle.
        let wait = b.take(1500.0, t0 + Duration::from_secs(100));
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        let mut off = Bucket::new(0, 100);
        assert_eq!(off.take(1e9, t0), Duration::ZERO);
    }

    #[test]
    fn slots_count_per_ip_and_free_on_drop() {
        let per_ip = Arc::new(PerIp::new(2, None, 1024));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = per_ip.take(a);
        let s2 = per_ip.take(a);
        let s3 = per_ip.take(a);
        assert!(!s1.over_limit && !s2.over_limit && s3.over_limit);
        assert!(!s3.far_over_limit);
        let (s4, s5) = (per_ip.take(a), per_ip.take(a));
        assert!(!s4.far_over_limit && s5.far_over_limit);
        drop((s4, s5));
        assert!(!per_ip.take(b).over_limit, "another IP has its own count");
        drop(s3);
        drop(s2);
        assert!(!per_ip.take(a).over_limit);
        drop(s1);
        assert!(
            per_ip.map.lock().unwrap().is_empty(),
            "an IP with no connection left is forgotten"
        );
        assert_eq!(
            per_ip.take(a).charge(1 << 30),
            Duration::ZERO,
            "no rate limit"
        );
    }
}
