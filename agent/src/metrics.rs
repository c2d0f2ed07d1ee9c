//! Prometheus metrics: one [`Registry`], one metrics struct per concern
//! registered into it, encoded as OpenMetrics text for `/metrics`. Names and
//! labels are documented in docs/metrics.md.

pub mod apply;
pub mod decisions;
pub mod guards;
pub mod identity;
pub mod labels;
pub mod maps;
pub mod mesh;
pub mod source;
pub mod text;

use prometheus_client::{
    encoding::{text as openmetrics, EncodeLabelSet},
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::bpf::LoadError;
pub use apply::ApplyMetrics;
pub use decisions::DecisionMetrics;
pub use guards::GuardMetrics;
pub use identity::IdentityMetrics;
pub use maps::MapMetrics;
pub use mesh::MeshMetrics;
pub use source::SourceMetrics;

/// Every metric name starts with this (`portcullis_drops_total`, ...).
pub const PREFIX: &str = "portcullis";

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("reading the kernel's decision counters")]
    Counters {
        #[source]
        source: LoadError,
    },
    #[error("encoding the metrics as OpenMetrics text")]
    Encode {
        #[source]
        source: std::fmt::Error,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub decisions: DecisionMetrics,
    pub apply: ApplyMetrics,
    pub maps: MapMetrics,
    pub source: SourceMetrics,
    pub guards: GuardMetrics,
    pub identity: IdentityMetrics,
    pub mesh: MeshMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let decisions = DecisionMetrics::register(&mut registry);
        let apply = ApplyMetrics::register(&mut registry);
        let maps = MapMetrics::register(&mut registry);
        let source = SourceMetrics::register(&mut registry);
        let guards = GuardMetrics::register(&mut registry);
        let identity = IdentityMetrics::register(&mut registry);
        let mesh = MeshMetrics::register(&mut registry);
        let build_info: Family<VersionLabels, Gauge> = Family::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the agent's version in the label",
            build_info,
        );
        Self {
            registry,
            decisions,
            apply,
            maps,
            source,
            guards,
            identity,
            mesh,
        }
    }

    /// Reads the kernel counters into the decision metrics.
    pub fn refresh(&self, pin_dir: &std::path::Path) -> Result<(), MetricsError> {
        let r = self.decisions.refresh(pin_dir);
        self.maps
            .set_counter_entries(self.decisions.kernel_entries());
        r
    }

    /// OpenMetrics text of every metric (without reading the kernel; see
    /// [`Metrics::refresh`]).
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut out = String::new();
        openmetrics::encode(&mut out, &self.registry)
            .map_err(|source| MetricsError::Encode { source })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use portcullis_common::{
        CounterKey, DIRECTION_INGRESS, PROTO_TCP, REASON_DEFAULT_DENY, REASON_NOT_ISOLATED,
        VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY,
    };

    use crate::bpf::CounterSample;

    fn metrics_with_decisions() -> Metrics {
        let m = Metrics::new();
        let sample = |verdict, reason| CounterSample {
            key: CounterKey {
                endpoint_id: 1,
                rule_cookie: 0,
                direction: DIRECTION_INGRESS,
                verdict,
                reason,
                protocol: PROTO_TCP,
            },
            count: 1,
        };
        m.decisions.observe(
            &[
                sample(VERDICT_DENY, REASON_DEFAULT_DENY),
                sample(VERDICT_ALLOW, REASON_NOT_ISOLATED),
                sample(VERDICT_AUDIT, REASON_DEFAULT_DENY),
            ],
            0,
        );
        m
    }

    #[test]
    fn every_metric_is_exposed_with_its_conventional_name() {
        let text = metrics_with_decisions().encode().unwrap();
        for needle in [
            "# TYPE portcullis_drops counter",
            "# TYPE portcullis_forwards counter",
            "# TYPE portcullis_audit counter",
            "# TYPE portcullis_uncounted_decisions counter",
            "portcullis_uncounted_decisions_total 0",
            "# TYPE portcullis_policy_apply_seconds histogram",
            "# UNIT portcullis_policy_apply_seconds seconds",
            "portcullis_policy_applies_total{result=\"success\"} 0",
            "# TYPE portcullis_policy_pass_stage_seconds histogram",
            "portcullis_policy_pass_stage_seconds_count{stage=\"compile\"} 0",
            "portcullis_policy_problems 0",
            "portcullis_source_degraded 0",
            "portcullis_policy_report_leader 0",
            "portcullis_bpf_map_capacity{map=\"policy\"} 524288",
            "portcullis_bpf_map_entries{map=\"endpoints\"} 0",
            &format!(
                "portcullis_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
            "# EOF",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }

    #[test]
    fn the_prometheus_text_form_names_counter_families_with_total() {
        let text = text::to_prometheus_text(&metrics_with_decisions().encode().unwrap());
        for needle in [
            "# TYPE portcullis_drops_total counter",
            "# HELP portcullis_uncounted_decisions_total ",
            "# TYPE portcullis_policy_apply_seconds histogram",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
    }
}
