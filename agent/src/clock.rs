//! Times as people read them: UTC, to the second or to the millisecond.

use time::OffsetDateTime;

/// `2026-05-01 10:00:00 UTC` (`@<seconds>` when out of range).
pub fn utc(unix_seconds: u64) -> String {
    match OffsetDateTime::from_unix_timestamp(unix_seconds as i64) {
        Ok(t) => format!("{} UTC", date_time(t)),
        Err(_) => format!("@{unix_seconds}"),
    }
}

/// `2026-12-02 15:04:05.123 UTC`, as flow events are dated (the raw
/// number when out of range).
pub fn utc_millis(unix_seconds: f64) -> String {
    match OffsetDateTime::from_unix_timestamp_nanos((unix_seconds * 1e9) as i128) {
        Ok(t) => format!("{}.{:03} UTC", date_time(t), t.millisecond()),
        Err(_) => format!("{unix_seconds:.3}"),
    }
}

fn date_time(t: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Clock `id` (`libc::CLOCK_*`) in nanoseconds. CLOCK_MONOTONIC is the
/// clock of the kernel's `bpf_ktime_get_ns`.
pub fn read_ns(id: libc::clockid_t) -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write; the clocks asked for
    // always exist, so the call cannot fail.
    unsafe { libc::clock_gettime(id, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
