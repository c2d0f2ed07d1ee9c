//! When the changes not yet applied were seen: apply latency starts at the
//! oldest of them, so a burst coalesced into one pass reports how long its
//! first change waited, not its last.

use std::{collections::VecDeque, time::SystemTime};

/// More unapplied changes than this (no pass for a long while, e.g. the
/// initial lists still pending) are not timed one by one: the last stamp
/// then stands for every later change too, so their latency is over-,
/// never understated.
const CAPACITY: usize = 4096;

/// Change stamps by watch revision, oldest first.
#[derive(Debug, Default)]
pub struct PendingChanges {
    stamps: VecDeque<(u64, SystemTime)>,
}

impl PendingChanges {
    /// Change number `revision` was seen at `at`.
    pub fn record(&mut self, revision: u64, at: SystemTime) {
        let full = self.stamps.len() >= CAPACITY;
        match self.stamps.back_mut() {
            Some(last) if full => last.0 = revision,
            _ => self.stamps.push_back((revision, at)),
        }
    }

    /// When the oldest change after `applied` (the revision the last
    /// successful pass took, if any) and up to `now` was seen. Changes up
    /// to `applied` are forgotten: a pass has taken them. Changes after
    /// `now` stay for the next pass.
    pub fn oldest_since(&mut self, now: u64, applied: Option<u64>) -> Option<SystemTime> {
        if let Some(applied) = applied {
            while self.stamps.front().is_some_and(|(r, _)| *r <= applied) {
                self.stamps.pop_front();
            }
        }
        self.stamps
            .iter()
            .find(|(r, _)| *r <= now)
            .map(|(_, at)| *at)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn a_burst_is_timed_from_its_first_change() {
        let mut p = PendingChanges::default();
        for (r, ms) in [(1, 10), (2, 20), (3, 30)] {
            p.record(r, at(ms));
        }
        assert_eq!(p.oldest_since(3, None), Some(at(10)));
        // A failed pass takes nothing: the retry still starts at 10.
        assert_eq!(p.oldest_since(3, None), Some(at(10)));
    }

    #[test]
    fn a_taken_change_is_forgotten_and_a_later_one_waits_for_its_pass() {
        let mut p = PendingChanges::default();
        p.record(1, at(10));
        p.record(2, at(20));
        // A pass read revision 1; change 2 came in meanwhile.
        assert_eq!(p.oldest_since(1, None), Some(at(10)));
        // The next pass, after 1 was applied, starts at change 2.
        p.record(3, at(30));
        assert_eq!(p.oldest_since(3, Some(1)), Some(at(20)));
        assert_eq!(p.oldest_since(3, Some(3)), None);
    }

    #[test]
    fn stamps_are_bounded() {
        let mut p = PendingChanges::default();
        for r in 0..(CAPACITY as u64 + 10) {
            p.record(r, at(r));
        }
        assert_eq!(p.stamps.len(), CAPACITY);
        assert_eq!(p.oldest_since(u64::MAX, None), Some(at(0)));
        // Past the first CAPACITY - 1, the last stamp's time stands for all.
        let last = CAPACITY as u64 + 9;
        assert_eq!(
            p.oldest_since(last, Some(last - 1)),
            Some(at(CAPACITY as u64 - 1))
        );
    }
}
