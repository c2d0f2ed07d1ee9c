//! Policy application: latency from the source event to the kernel, outcome
//! of each pass, current problems.

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

/// Labels of `portcullis_policy_applies_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    /// `success` (the pass reached the kernel) or `failure`.
    pub result: &'static str,
}

/// Bucket bounds in seconds: an apply is a few milliseconds for small
/// policies and seconds for maps with ~10⁵–10⁶ entries.
pub const APPLY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct ApplyMetrics {
    latency: Histogram,
    passes: Family<ResultLabels, Counter>,
    problems: Gauge,
}

impl ApplyMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            latency: Histogram::new(APPLY_BUCKETS),
            passes: Family::default(),
            problems: Gauge::default(),
        };
        registry.register_with_unit(
            "policy_apply",
            "Time from a policy or workload change being detected to the kernel \
             maps holding it",
            Unit::Seconds,
            m.latency.clone(),
        );
        registry.register(
            "policy_applies",
            "Reconcile passes, by whether they reached the kernel",
            m.passes.clone(),
        );
        registry.register(
            "policy_problems",
            "Problems of the latest pass (invalid files, failed writes)",
            m.problems.clone(),
        );
        for result in ["success", "failure"] {
            let _ = m.passes.get_or_create(&ResultLabels { result });
        }
        m
    }

    /// A pass reached the kernel; `latency` is set when a source change
    /// triggered it (not for retries).
    pub fn succeeded(&self, latency: Option<Duration>) {
        self.passes
            .get_or_create(&ResultLabels { result: "success" })
            .inc();
        if let Some(l) = latency {
            self.latency.observe(l.as_secs_f64());
        }
    }

    pub fn failed(&self) {
        self.passes
            .get_or_create(&ResultLabels { result: "failure" })
            .inc();
    }

    pub fn set_problems(&self, n: usize) {
        self.problems.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
