//! How sources wake the sync loop: a change signals at once, so a pass
//! starts when something changed, not at the next tick of a poll.

use std::{
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

#[derive(Default)]
pub struct Wakeup {
    pending: Mutex<bool>,
    signalled: Condvar,
}

impl Wakeup {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Something changed: the waiting loop (or its next wait) returns.
    pub fn signal(&self) {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.signalled.notify_all();
    }

    /// Waits for a signal, at most `timeout`; true if one came. Signals
    /// sent while nobody waited are kept for the next wait.
    pub fn wait(&self, timeout: Duration) -> bool {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let (mut pending, _) = self
            .signalled
            .wait_timeout_while(pending, timeout, |p| !*p)
            .unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *pending)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_signal_wakes_the_waiter_at_once_and_is_kept_until_taken() {
        let wake = Wakeup::new();
        assert!(!wake.wait(Duration::from_millis(10)), "nothing signalled");
        wake.signal();
        assert!(wake.wait(Duration::ZERO), "kept for the next wait");
        assert!(!wake.wait(Duration::ZERO), "taken once");
        let other = wake.clone();
        let started = Instant::now();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            other.signal();
        });
        assert!(wake.wait(Duration::from_secs(10)));
        assert!(started.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
    }
}
