//! The CA's metrics, served on `GET /metrics` of its HTTPS port:
//! `portcullis_ca_certificates_issued_total`,
//! `portcullis_ca_refusals_total{reason}` (bounded: the wire reasons), and
//! `portcullis_ca_bundle_roots` (roots published). Counts only: nothing in
//! them names a workload, so they are served without authentication.

use prometheus_client::{
    encoding::{text as openmetrics, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::identity::wire::RefusalReason;

#[derive(Debug, thiserror::Error)]
pub enum CaMetricsError {
    #[error("encoding the CA metrics as OpenMetrics text")]
    Encode(#[source] std::fmt::Error),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

pub struct CaMetrics {
    registry: Registry,
    issued: Counter,
    refusals: Family<ReasonLabels, Counter>,
    bundle_roots: Gauge,
}

impl Default for CaMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CaMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis_ca");
        let issued = Counter::default();
        registry.register(
            "certificates_issued",
            "Identity certificates signed",
            issued.clone(),
        );
        let refusals: Family<ReasonLabels, Counter> = Family::default();
        // Every reason from the start, so a rate over a new reason is not
        // missing its first increment.
        for reason in RefusalReason::ALL {
            drop(refusals.get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            }));
        }
        registry.register(
            "refusals",
            "Certificate requests refused, by reason",
            refusals.clone(),
        );
        let bundle_roots = Gauge::default();
        registry.register(
            "bundle_roots",
            "Roots in the trust bundle the CA last published",
            bundle_roots.clone(),
        );
        Self {
            registry,
            issued,
            refusals,
            bundle_roots,
        }
    }

    pub fn issued(&self) {
        self.issued.inc();
    }

    pub fn refused(&self, reason: RefusalReason) {
        self.refusals
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn set_bundle_roots(&self, roots: usize) {
        self.bundle_roots.set(roots as i64);
    }

    pub fn encode(&self) -> Result<String, CaMetricsError> {
        let mut out = String::new();
        openmetrics::encode(&mut out, &self.registry).map_err(CaMetricsError::Encode)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_by_reason() {
        let m = CaMetrics::new();
        m.issued();
        m.refused(RefusalReason::NoPodOnNode);
        let text = m.encode().unwrap();
        assert!(
            text.contains("portcullis_ca_certificates_issued_total 1"),
            "{text}"
        );
        assert!(
            text.contains("portcullis_ca_refusals_total{reason=\"no_pod_on_node\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("portcullis_ca_refusals_total{reason=\"revoked\"} 0"),
            "{text}"
        );
    }
}
