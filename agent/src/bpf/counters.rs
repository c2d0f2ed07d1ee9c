//! Reads the kernel's per-CPU decision counters.

use std::path::Path;

use aya::maps::{Map, MapData, PerCpuHashMap};
use portcullis_common::{CounterKey, COUNTERS_MAP};

use super::loader::{map, open_pinned, per_cpu_total, LoadError};

/// One counter, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterSample {
    pub key: CounterKey,
    pub count: u64,
}

/// Name of the map counting decisions lost because the counter map was full.
pub const COUNTERS_LOST_MAP: &str = "PCL_CNT_LOST";

/// Reads all counters from the maps pinned in `pin_dir`, plus the number of
/// decisions that could not be counted because the map was full.
pub fn read_counters(pin_dir: &Path) -> Result<(Vec<CounterSample>, u64), LoadError> {
    let counters: PerCpuHashMap<MapData, CounterKey, u64> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(open_pinned(pin_dir, COUNTERS_MAP)?))
            .map_err(map(COUNTERS_MAP))?;
    let mut out = Vec::new();
    for item in counters.iter() {
        let (key, per_cpu) = item.map_err(map(COUNTERS_MAP))?;
        out.push(CounterSample {
            key,
            count: per_cpu.iter().sum(),
        });
    }
    Ok((out, per_cpu_total(pin_dir, COUNTERS_LOST_MAP)?))
}

/// Deletes the counters `keep` rejects (those of endpoints and rules that
/// no longer exist), so pod and policy churn cannot fill the map for good.
/// Read the counters just before: what a deleted entry gained since then
/// is lost. Returns how many were deleted.
pub fn retire(pin_dir: &Path, keep: impl Fn(&CounterKey) -> bool) -> Result<usize, LoadError> {
    let mut counters: PerCpuHashMap<MapData, CounterKey, u64> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(open_pinned(pin_dir, COUNTERS_MAP)?))
            .map_err(map(COUNTERS_MAP))?;
    let retired: Vec<CounterKey> = counters
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !keep(k))
        .collect();
    let mut deleted = 0;
    for key in &retired {
        match counters.remove(key) {
            Ok(()) => deleted += 1,
            // Gone already: nothing to do.
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map(COUNTERS_MAP)(e)),
        }
    }
    Ok(deleted)
}

/// Changes the run-time switches of the agent pinned at `pin_dir`.
fn update_settings(
    pin_dir: &Path,
    change: impl FnOnce(&mut portcullis_common::Settings),
) -> Result<(), LoadError> {
    use aya::maps::Array;
    use portcullis_common::{Settings, SETTINGS_MAP};
    let mut settings: Array<MapData, Settings> =
        Array::try_from(Map::Array(open_pinned(pin_dir, SETTINGS_MAP)?))
            .map_err(map(SETTINGS_MAP))?;
    let mut value = settings.get(&0, 0).map_err(map(SETTINGS_MAP))?;
    change(&mut value);
    settings.set(0, value, 0).map_err(map(SETTINGS_MAP))
}

/// Turns counting and flow events off (`quiet`) or on for the agent pinned
/// at `pin_dir`. Only for measuring what they cost: it rewrites the
/// settings beside the running agent, without its pin lock, which is safe
/// only because that agent writes its settings once, at start.
pub fn set_quiet(pin_dir: &Path, quiet: bool) -> Result<(), LoadError> {
    update_settings(pin_dir, |s| s.quiet = u32::from(quiet))
}

/// Sockets below cgroup `id` are never judged or denied (0: none).
pub fn set_exempt_cgroup(pin_dir: &Path, id: u64) -> Result<(), LoadError> {
    update_settings(pin_dir, |s| s.exempt_cgroup = id)
}
