//! How long a failed watch waits before it retries.
//!
//! kube-runtime's default grows to 30 s and only starts over after 120 s
//! without an error, so an agent whose API server restarted a minute after
//! the last hiccup sat out most of 30 s per failure; after a restart the
//! watches meet a few failures in a row (403 until the authorizer's caches
//! fill, then 410 Gone for resource versions the new watch cache does not
//! hold), each doubling the wait. Seen against a real API server.
//!
//! Here the delay still doubles while the server stays away (no retry
//! storm from thousands of agents), to at most [`MAX_DELAY`], and starts
//! over as soon as the version probe sees the server answer again.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kube::runtime::utils::Backoff;

use super::{lock, Shared};

const MIN_DELAY: Duration = Duration::from_millis(250);
pub const MAX_DELAY: Duration = Duration::from_secs(8);

pub struct WatchBackoff {
    shared: Shared,
    next: Duration,
    /// The probe's recovery count when this backoff last started over.
    recoveries_seen: u64,
}

impl WatchBackoff {
    pub fn new(shared: Shared) -> Self {
        let recoveries_seen = lock(&shared).recoveries;
        Self {
            shared,
            next: MIN_DELAY,
            recoveries_seen,
        }
    }
}

/// A factor in [0.5, 1): spreads agents that failed together.
fn jitter() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    0.5 + f64::from(nanos % 1000) / 2000.0
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let recoveries = lock(&self.shared).recoveries;
        if recoveries != self.recoveries_seen {
            self.recoveries_seen = recoveries;
            self.next = MIN_DELAY;
        }
        let delay = self.next.mul_f64(jitter());
        self.next = (self.next * 2).min(MAX_DELAY);
        Some(delay)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = MIN_DELAY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_starts_over_when_the_server_answers_again() {
        let shared = Shared::default();
        let mut backoff = WatchBackoff::new(shared.clone());
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next().unwrap()).collect();
        assert!(delays[0] < MIN_DELAY + Duration::from_millis(1));
        assert!(delays[0] >= MIN_DELAY / 2);
        assert!(
            delays[7] >= MAX_DELAY / 2 && delays[7] <= MAX_DELAY,
            "{delays:?}"
        );
        assert!(delays.iter().all(|d| *d <= MAX_DELAY));
        // The probe saw the server come back: the next retry is quick.
        lock(&shared).recoveries += 1;
        assert!(backoff.next().unwrap() <= MIN_DELAY);
        assert!(backoff.next().unwrap() <= MIN_DELAY * 2);
        // A successful watch starts over too.
        for _ in 0..5 {
            backoff.next();
        }
        backoff.reset();
        assert!(backoff.next().unwrap() <= MIN_DELAY);
    }
}
