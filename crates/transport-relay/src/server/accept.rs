//! Accepting connections without spinning: when `accept` fails (out of file descriptors,
//! `EMFILE`/`ENFILE`, or out of memory), the pending connection stays in the backlog and the
//! next call fails at once, so a loop that retries at once burns a core. Each listener waits
//! after an error, twice as long each time up to a second, and logs a summary at most once
//! per interval instead of a line per failure.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// The first wait after an accept error.
pub(super) const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest wait between accept attempts while they fail: a freed descriptor is used
/// within a second.
pub(super) const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per this interval while accepts fail.
const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The backoff of one listener, pure.
#[derive(Debug)]
pub(super) struct Backoff {
    next: Duration,
    failures: u64,
    logged_at: Option<Instant>,
}

impl Backoff {
    pub(super) fn new() -> Self {
        Self {
            next: ACCEPT_BACKOFF_MIN,
            failures: 0,
            logged_at: None,
        }
    }

    /// An accept failed at `now`: how long to wait, and whether to log (with the failures
    /// since the last line).
    pub(super) fn on_error(&mut self, now: Instant) -> (Duration, Option<u64>) {
        let wait = self.next;
        self.next = (self.next * 2).min(ACCEPT_BACKOFF_MAX);
        self.failures += 1;
        let log = self
            .logged_at
            .is_none_or(|at| now.saturating_duration_since(at) >= ACCEPT_LOG_INTERVAL);
        if !log {
            return (wait, None);
        }
        self.logged_at = Some(now);
        (wait, Some(std::mem::take(&mut self.failures)))
    }

    /// An accept succeeded: the next error waits the shortest time again.
    pub(super) fn on_success(&mut self) {
        self.next = ACCEPT_BACKOFF_MIN;
    }
}

/// The next connection on `listener` (named `what` in the log), waiting out errors.
pub(super) async fn accept(
    listener: &TcpListener,
    backoff: &mut Backoff,
    what: &str,
) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => {
                backoff.on_success();
                return accepted;
            }
            Err(e) => {
                let (wait, log) = backoff.on_error(Instant::now());
                if let Some(failures) = log {
                    tracing::warn!(
                        error = %e,
                        failures,
                        "{what} accept failed (out of file descriptors?): retrying with backoff"
                    );
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_to_a_second_and_logs_once_per_interval() {
        let t0 = Instant::now();
        let mut b = Backoff::new();
        let mut waits = Vec::new();
        let mut logs = Vec::new();
        for i in 0..12 {
            let (w, log) = b.on_error(t0 + Duration::from_millis(i));
            waits.push(w);
            logs.extend(log);
        }
        assert_eq!(waits[0], ACCEPT_BACKOFF_MIN);
        assert_eq!(waits[1], ACCEPT_BACKOFF_MIN * 2);
        assert_eq!(*waits.last().unwrap(), ACCEPT_BACKOFF_MAX);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(logs, [1], "one line for the first failure, then quiet");
        let (_, log) = b.on_error(t0 + ACCEPT_LOG_INTERVAL);
        assert_eq!(log, Some(12), "then the count since");
        b.on_success();
        assert_eq!(b.on_error(t0 + ACCEPT_LOG_INTERVAL).0, ACCEPT_BACKOFF_MIN);
    }
}
