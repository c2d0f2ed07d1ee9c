//! How many entries the kernel maps hold: defaults sized for a large node,
//! configurable per map (`--map-capacity policy=2097152`). The generational
//! maps hold two generations, so one policy state may use half.

use std::{fmt, str::FromStr};

use portcullis_common::{
    BACKENDS_CAPACITY, BACKENDS_MAP, COUNTERS_CAPACITY, COUNTERS_MAP, ENDPOINTS_CAPACITY,
    ENDPOINTS_MAP, IDENTITIES_CAPACITY, IDENTITIES_MAP, POLICY_CAPACITY, POLICY_MAP,
    SERVICES_CAPACITY, SERVICES_MAP,
};

use super::writer::MapUsage;

/// The kernel rejects larger maps long before this; it also keeps a typo
/// from asking for gigabytes.
pub const MAX_CAPACITY: u32 = 1 << 26;
/// Two generations of at least one entry.
pub const MIN_CAPACITY: u32 = 2;

/// Entries of each configurable map (both generations, for the
/// generational ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapCapacities {
    pub endpoints: u32,
    pub identities: u32,
    pub policy: u32,
    pub services: u32,
    pub backends: u32,
    pub counters: u32,
}

impl Default for MapCapacities {
    fn default() -> Self {
        Self {
            endpoints: ENDPOINTS_CAPACITY,
            identities: IDENTITIES_CAPACITY,
            policy: POLICY_CAPACITY,
            services: SERVICES_CAPACITY,
            backends: BACKENDS_CAPACITY,
            counters: COUNTERS_CAPACITY,
        }
    }
}

/// The names users write, with the kernel map each stands for.
const NAMES: [(&str, &str); 6] = [
    ("endpoints", ENDPOINTS_MAP),
    ("identities", IDENTITIES_MAP),
    ("policy", POLICY_MAP),
    ("services", SERVICES_MAP),
    ("backends", BACKENDS_MAP),
    ("counters", COUNTERS_MAP),
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CapacityError {
    #[error("--map-capacity {0:?}: expected MAP=ENTRIES, e.g. policy=2097152")]
    Syntax(String),
    #[error("--map-capacity: no map {name:?}; the maps are endpoints, identities, policy, services, backends and counters")]
    UnknownMap { name: String },
    #[error("--map-capacity {name}={value}: not a number of entries from {MIN_CAPACITY} to {MAX_CAPACITY}")]
    OutOfRange { name: String, value: String },
}

/// One `MAP=ENTRIES` setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapacitySetting {
    name: &'static str,
    entries: u32,
}

impl FromStr for CapacitySetting {
    type Err = CapacityError;

    fn from_str(text: &str) -> Result<Self, CapacityError> {
        let (name, value) = text
            .split_once('=')
            .ok_or_else(|| CapacityError::Syntax(text.into()))?;
        let (name, _) = NAMES
            .iter()
            .find(|(n, _)| *n == name.trim())
            .ok_or_else(|| CapacityError::UnknownMap { name: name.into() })?;
        let entries = value
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| (MIN_CAPACITY..=MAX_CAPACITY).contains(n))
            .ok_or_else(|| CapacityError::OutOfRange {
                name: (*name).into(),
                value: value.into(),
            })?;
        Ok(Self { name, entries })
    }
}

impl MapCapacities {
    /// The defaults with `settings` applied (a later one wins).
    pub fn with(settings: &[CapacitySetting]) -> Self {
        let mut c = Self::default();
        for s in settings {
            *c.entry_mut(s.name) = s.entries;
        }
        c
    }

    fn entry_mut(&mut self, name: &str) -> &mut u32 {
        match name {
            "endpoints" => &mut self.endpoints,
            "identities" => &mut self.identities,
            "policy" => &mut self.policy,
            "services" => &mut self.services,
            "backends" => &mut self.backends,
            _ => &mut self.counters,
        }
    }

    /// (kernel map name, entries) of every configurable map.
    pub fn by_map(&self) -> [(&'static str, u32); 6] {
        let mut c = *self;
        NAMES.map(|(name, map)| (map, *c.entry_mut(name)))
    }

    /// What one generation may use.
    pub fn generation(&self) -> MapUsage {
        let half = |n: u32| (n / 2) as usize;
        MapUsage {
            endpoints: half(self.endpoints),
            identities: half(self.identities),
            policy: half(self.policy),
            services: half(self.services),
            backends: half(self.backends),
        }
    }
}

impl fmt::Display for MapCapacities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut c = *self;
        for (i, (name, _)) in NAMES.iter().enumerate() {
            write!(
                f,
                "{}{name}={}",
                if i > 0 { " " } else { "" },
                c.entry_mut(name)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_bad_ones_name_the_map_and_value() {
        let s: CapacitySetting = "policy=2097152".parse().unwrap();
        let c = MapCapacities::with(&[s, "counters = 1000".parse().unwrap()]);
        assert_eq!(c.policy, 2_097_152);
        assert_eq!(c.counters, 1000);
        assert_eq!(c.generation().policy, 1_048_576);
        assert_eq!(c.endpoints, ENDPOINTS_CAPACITY);
        let err = |t: &str| t.parse::<CapacitySetting>().unwrap_err().to_string();
        assert!(err("policy").contains("expected MAP=ENTRIES"));
        assert!(err("polcy=5").contains("no map \"polcy\""));
        assert!(err("policy=-1").contains("policy=-1"));
        assert!(err("policy=1").contains("from 2"));
        assert!(err("policy=999999999999").contains("999999999999"));
    }
}
