//! Policy application: latency from the source event to the kernel, outcome
//! of each pass, current problems.

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use crate::reconcile::PassTimings;

/// Labels of `portcullis_policy_applies_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    /// `success` (the pass reached the kernel) or `failure`.
    pub result: &'static str,
}

/// Labels of `portcullis_policy_pass_stage_seconds`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StageLabels {
    /// `load` (the source's view), `compile`, `desired` (map contents) or
    /// `write` (the inactive generation written and flipped).
    pub stage: &'static str,
}

/// The stages of a pass, as `portcullis_policy_pass_stage_seconds` labels
/// them, in the order a pass runs them.
pub const STAGES: [&str; 4] = ["load", "compile", "desired", "write"];

/// Bucket bounds in seconds: an apply is a few milliseconds for small
/// policies and seconds for maps with ~10⁵–10⁶ entries.
pub const APPLY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct ApplyMetrics {
    latency: Histogram,
    passes: Family<ResultLabels, Counter>,
    stages: Family<StageLabels, Histogram>,
    problems: Gauge,
}

impl ApplyMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            latency: Histogram::new(APPLY_BUCKETS),
            passes: Family::default(),
            stages: Family::new_with_constructor(|| Histogram::new(APPLY_BUCKETS)),
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
        registry.register_with_unit(
            "policy_pass_stage",
            "Time each stage of a pass that reached the kernel took: where a \
             slow change spends it",
            Unit::Seconds,
            m.stages.clone(),
        );
        registry.register(
            "policy_problems",
            "Problems of the latest pass (invalid files, failed writes)",
            m.problems.clone(),
        );
        for result in ["success", "unchanged", "failure"] {
            let _ = m.passes.get_or_create(&ResultLabels { result });
        }
        for stage in STAGES {
            let _ = m.stages.get_or_create(&StageLabels { stage });
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

    /// The stages of a pass that reached the kernel: the source's `load`,
    /// then what the reconciler timed.
    pub fn stages(&self, load: Duration, pass: &PassTimings) {
        let times = [load, pass.compile, pass.desired, pass.write];
        for (stage, time) in STAGES.into_iter().zip(times) {
            self.stages
                .get_or_create(&StageLabels { stage })
                .observe(time.as_secs_f64());
        }
    }

    /// A pass worked out exactly what the kernel already held: nothing
    /// written, no flip, so no latency or stages either.
    pub fn unchanged(&self) {
        self.passes
            .get_or_create(&ResultLabels {
                result: "unchanged",
            })
            .inc();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_stage_of_a_pass_is_observed_under_its_own_label() {
        let mut registry = Registry::with_prefix("portcullis");
        let m = ApplyMetrics::register(&mut registry);
        m.stages(
            Duration::from_millis(3),
            &PassTimings {
                compile: Duration::from_millis(40),
                desired: Duration::from_millis(7),
                write: Duration::from_millis(2),
            },
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for (stage, sum) in [
            ("load", "0.003"),
            ("compile", "0.04"),
            ("desired", "0.007"),
            ("write", "0.002"),
        ] {
            let count =
                format!("portcullis_policy_pass_stage_seconds_count{{stage=\"{stage}\"}} 1");
            let total =
                format!("portcullis_policy_pass_stage_seconds_sum{{stage=\"{stage}\"}} {sum}");
            assert!(text.contains(&count), "missing {count:?} in:\n{text}");
            assert!(text.contains(&total), "missing {total:?} in:\n{text}");
        }
        let compile_in_50ms =
            "portcullis_policy_pass_stage_seconds_bucket{le=\"0.05\",stage=\"compile\"} 1";
        let compile_in_25ms =
            "portcullis_policy_pass_stage_seconds_bucket{le=\"0.025\",stage=\"compile\"} 0";
        assert!(
            text.contains(compile_in_50ms) && text.contains(compile_in_25ms),
            "{text}"
        );
    }

    /// A pass that found nothing to write is counted apart and timed
    /// nowhere: the histograms time flips.
    #[test]
    fn a_pass_with_nothing_to_write_is_counted_but_not_timed() {
        let mut registry = Registry::with_prefix("portcullis");
        let m = ApplyMetrics::register(&mut registry);
        m.unchanged();
        m.unchanged();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "portcullis_policy_applies_total{result=\"unchanged\"} 2",
            "portcullis_policy_applies_total{result=\"success\"} 0",
            "portcullis_policy_apply_seconds_count 0",
            "portcullis_policy_pass_stage_seconds_count{stage=\"write\"} 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }
}
