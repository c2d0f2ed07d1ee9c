//! How full the kernel maps are.

use portcullis_common::COUNTERS_CAPACITY;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::bpf::writer::{generation_capacity, MapUsage};

/// Labels of the map gauges: `endpoints`, `identities`, `policy`,
/// `services`, `backends` (entries of one generation; each map holds two)
/// and `counters`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

pub struct MapMetrics {
    entries: Family<MapLabels, Gauge>,
    capacity: Family<MapLabels, Gauge>,
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl MapMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            entries: Family::default(),
            capacity: Family::default(),
        };
        registry.register(
            "bpf_map_entries",
            "Entries in a kernel map (generational maps: the active generation)",
            m.entries.clone(),
        );
        registry.register(
            "bpf_map_capacity",
            "Entries a kernel map can hold (generational maps: per generation)",
            m.capacity.clone(),
        );
        let cap = generation_capacity();
        for (map, n) in [
            ("endpoints", cap.endpoints),
            ("identities", cap.identities),
            ("policy", cap.policy),
            ("services", cap.services),
            ("backends", cap.backends),
            ("counters", COUNTERS_CAPACITY as usize),
        ] {
            m.capacity
                .get_or_create(&MapLabels { map })
                .set(gauge_value(n));
            m.entries.get_or_create(&MapLabels { map }).set(0);
        }
        m
    }

    /// What the maps were created with.
    pub fn set_capacities(&self, c: &crate::bpf::capacity::MapCapacities) {
        let g = c.generation();
        for (map, n) in [
            ("endpoints", g.endpoints),
            ("identities", g.identities),
            ("policy", g.policy),
            ("services", g.services),
            ("backends", g.backends),
            ("counters", c.counters as usize),
        ] {
            self.capacity
                .get_or_create(&MapLabels { map })
                .set(gauge_value(n));
        }
    }

    /// Entries written by the latest apply.
    pub fn set_usage(&self, usage: MapUsage) {
        for (map, n) in [
            ("endpoints", usage.endpoints),
            ("identities", usage.identities),
            ("policy", usage.policy),
            ("services", usage.services),
            ("backends", usage.backends),
        ] {
            self.entries
                .get_or_create(&MapLabels { map })
                .set(gauge_value(n));
        }
    }

    pub fn set_counter_entries(&self, n: usize) {
        self.entries
            .get_or_create(&MapLabels { map: "counters" })
            .set(gauge_value(n));
    }
}
