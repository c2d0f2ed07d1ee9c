//! Reads flow events from the pinned kernel ring buffer.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    time::Duration,
};

use aya::maps::{Map, MapData, RingBuf};
use portcullis_common::{FlowEvent, EVENTS_LOST_MAP, EVENTS_MAP};

use super::loader::{map, open_pinned, per_cpu_total, LoadError};

/// How long a woken reader lets events gather before it reads them: the
/// most an event waits. The ring (EVENTS_RING_BYTES, ~5000 events) holds
/// 50 ms of the kernel's rate limit on nodes of up to ~50 CPUs.
const BATCH: Duration = Duration::from_millis(50);

pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    /// Opens the ring buffer of the agent pinned at `pin_dir`. Each event is
    /// delivered to one reader only.
    pub fn open(pin_dir: &Path) -> Result<Self, LoadError> {
        let ring = RingBuf::try_from(Map::RingBuf(open_pinned(pin_dir, EVENTS_MAP)?))
            .map_err(map(EVENTS_MAP))?;
        Ok(Self { ring })
    }

    /// The next event, waiting at most `timeout` for one.
    pub fn next(&mut self, timeout: Duration) -> Option<FlowEvent> {
        if let Some(e) = self.try_next() {
            return Some(e);
        }
        let mut pfd = libc::pollfd {
            fd: self.ring.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) } > 0;
        if ready {
            // Woken by the first event after the ring ran empty. Let more
            // arrive before reading on: the kernel signals only that first
            // one, so a flood costs one wakeup per BATCH instead of one per
            // event. Each wakeup switches the reader in and the workload on
            // that CPU out, and measured that switch is most of the cost.
            std::thread::sleep(BATCH);
        }
        self.try_next()
    }

    fn try_next(&mut self) -> Option<FlowEvent> {
        let item = self.ring.next()?;
        if item.len() < std::mem::size_of::<FlowEvent>() {
            return None;
        }
        // SAFETY: the kernel wrote a FlowEvent (plain integers) here; read
        // unaligned as the ring gives no alignment promise to Rust.
        Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) })
    }
}

/// Events the kernel could not emit (over the rate limit or ring full).
pub fn events_lost(pin_dir: &Path) -> Result<u64, LoadError> {
    per_cpu_total(pin_dir, EVENTS_LOST_MAP)
}
