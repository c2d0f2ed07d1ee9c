//! When to ask the CA: renewal at half-life with jitter, and retries with
//! capped exponential backoff that never wait past a held certificate's
//! expiry. Pure functions of the clock and a jitter draw, so they are
//! tested without waiting.

use std::time::{Duration, SystemTime};

use ring::rand::{SecureRandom as _, SystemRandom};

/// Renewal happens half-way through a certificate's validity, moved by up
/// to ± this fraction of the whole lifetime, so agents that started
/// together do not renew together (40 %..60 % of the lifetime: a 1 h
/// certificate is renewed 24 to 36 minutes in).
pub const RENEW_JITTER: f64 = 0.10;
/// Retries are spread by up to ± this fraction of their delay.
pub const RETRY_JITTER: f64 = 0.10;
/// The first retry after a failure.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Retries never wait longer than this (nor longer than a quarter of the
/// lifetime of the last certificate, so short-lived ones retry often).
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The last attempt with a certificate still held is made this long before
/// it expires (or a twentieth of its lifetime, if shorter).
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(30);

/// A draw in -1.0..=1.0 for the jitters.
pub fn jitter() -> f64 {
    let mut bytes = [0u8; 4];
    // ring's system randomness does not fail on Linux; no jitter if it did.
    if SystemRandom::new().fill(&mut bytes).is_err() {
        return 0.0;
    }
    f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX) * 2.0 - 1.0
}

fn lifetime(not_before: SystemTime, not_after: SystemTime) -> Duration {
    not_after.duration_since(not_before).unwrap_or_default()
}

/// When to renew a certificate valid from `not_before` to `not_after`.
pub fn renewal_at(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let lifetime = lifetime(not_before, not_after).as_secs_f64();
    let offset = lifetime * (0.5 + RENEW_JITTER * jitter.clamp(-1.0, 1.0));
    not_before + Duration::from_secs_f64(offset.max(0.0))
}

/// The delay before retry number `failures` (1 after the first failure):
/// 1 s, 2 s, 4 s, ... up to `cap`, before jitter.
pub fn backoff(failures: u32, cap: Duration) -> Duration {
    let exponent = failures.saturating_sub(1).min(20);
    FIRST_RETRY
        .saturating_mul(1 << exponent)
        .min(cap)
        .max(FIRST_RETRY)
}

/// What a failing identity holds: the expiry of its current certificate,
/// if any, and the lifetime of the last one it had, if any.
#[derive(Clone, Copy, Debug, Default)]
pub struct Held {
    pub not_after: Option<SystemTime>,
    pub lifetime: Option<Duration>,
}

/// The margin before expiry for the last attempt with a certificate held.
pub fn expiry_margin(lifetime: Duration) -> Duration {
    EXPIRY_MARGIN.min(lifetime / 20)
}

/// When to retry after `failures` consecutive failures at `now`.
pub fn retry_at(
    now: SystemTime,
    failures: u32,
    held: Held,
    max_backoff: Duration,
    jitter: f64,
) -> SystemTime {
    let cap = match held.lifetime {
        Some(l) => max_backoff.min(l / 4).max(FIRST_RETRY),
        None => max_backoff,
    };
    let delay = backoff(failures, cap).mul_f64(1.0 + RETRY_JITTER * jitter.clamp(-1.0, 1.0));
    let at = now + delay.max(FIRST_RETRY);
    match held.not_after {
        // While the certificate is held, one more attempt before it
        // expires, however long the backoff has grown.
        Some(not_after) => {
            let last = not_after
                .checked_sub(expiry_margin(held.lifetime.unwrap_or_default()))
                .unwrap_or(not_after);
            if now < last {
                at.min(last)
            } else {
                at
            }
        }
        None => at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn renewal_is_at_half_life_within_the_jitter_bounds() {
        let (nb, na) = (T0 + secs(1000), T0 + secs(1000 + 3600));
        assert_eq!(renewal_at(nb, na, 0.0), nb + secs(1800));
        assert_eq!(renewal_at(nb, na, -1.0), nb + secs(1440));
        assert_eq!(renewal_at(nb, na, 1.0), nb + secs(2160));
        // Out-of-range draws are clamped.
        assert_eq!(renewal_at(nb, na, 7.0), nb + secs(2160));
        for _ in 0..1000 {
            let at = renewal_at(nb, na, jitter());
            assert!(at >= nb + secs(1440) && at <= nb + secs(2160), "{at:?}");
        }
        // A 20 s certificate (backdated 5 s): 10 to 15 s into its 25 s.
        let (nb, na) = (T0, T0 + secs(25));
        assert!(renewal_at(nb, na, -1.0) >= T0 + secs(10));
        assert!(renewal_at(nb, na, 1.0) <= T0 + secs(15));
    }

    #[test]
    fn backoff_doubles_from_one_second_and_is_capped() {
        let cap = secs(60);
        let delays: Vec<u64> = (1..=9).map(|n| backoff(n, cap).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(0, cap), secs(1));
        assert_eq!(backoff(u32::MAX, cap), cap);
        assert_eq!(
            backoff(5, Duration::from_millis(10)),
            secs(1),
            "at least 1 s"
        );
    }

    #[test]
    fn retries_are_capped_by_the_lifetime_and_jittered() {
        let now = T0 + secs(100);
        let none = Held::default();
        assert_eq!(retry_at(now, 30, none, secs(60), 0.0), now + secs(60));
        assert_eq!(retry_at(now, 30, none, secs(60), 1.0), now + secs(66));
        assert_eq!(retry_at(now, 30, none, secs(60), -1.0), now + secs(54));
        // After a 20 s certificate expired: every 5 s at most.
        let expired = Held {
            not_after: None,
            lifetime: Some(secs(20)),
        };
        assert_eq!(retry_at(now, 30, expired, secs(60), 0.0), now + secs(5));
    }

    #[test]
    fn a_held_certificate_gets_one_last_attempt_before_it_expires() {
        let lifetime = secs(3600);
        let not_after = T0 + secs(10_000);
        let held = Held {
            not_after: Some(not_after),
            lifetime: Some(lifetime),
        };
        let last = not_after - secs(30);
        for failures in 1..40 {
            for jitter in [-1.0, 0.0, 1.0] {
                // From anywhere before the last attempt, never past it.
                for now in [T0 + secs(9_000), last - secs(3), last - secs(1)] {
                    let at = retry_at(now, failures, held, secs(600), jitter);
                    assert!(at <= last, "failures {failures} now {now:?}: {at:?}");
                    assert!(at > now, "{at:?}");
                }
            }
        }
        // Early on, the backoff decides.
        assert_eq!(
            retry_at(T0 + secs(5_000), 3, held, secs(600), 0.0),
            T0 + secs(5_004)
        );
        // Past the last attempt, backoff again: the certificate expires.
        let now = last + secs(1);
        assert_eq!(retry_at(now, 30, held, secs(60), 0.0), now + secs(60));
        // 20 s: the last attempt is 1 s before expiry.
        assert_eq!(expiry_margin(secs(20)), secs(1));
        assert_eq!(expiry_margin(secs(86_400)), secs(30));
    }
}
