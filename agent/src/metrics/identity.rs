//! Workload identity: when each local identity's certificate expires, why
//! issuances fail, how long they take, renewals, identities by state, and
//! whether the revocations are known. Series appear when the identity
//! manager starts (an agent without identity exports none of them).

use std::time::{Duration, SystemTime};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use crate::identity::{issuer::FailureReason, local::IdentityState, spiffe::SpiffeId};

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct IdentityLabels {
    /// Bounded by the service accounts with a pod on this node.
    pub spiffe_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

/// Bucket bounds in seconds: in process a few milliseconds; over the
/// network tens of milliseconds, up to the 10 s timeout.
pub const ISSUANCE_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Clone)]
pub struct IdentityMetrics {
    expiry: Family<IdentityLabels, Gauge>,
    failures: Family<ReasonLabels, Counter>,
    duration: Histogram,
    renewals: Counter,
    states: Family<StateLabels, Gauge>,
    revocations_known: Gauge,
}

impl IdentityMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            expiry: Family::default(),
            failures: Family::default(),
            duration: Histogram::new(ISSUANCE_BUCKETS),
            renewals: Counter::default(),
            states: Family::default(),
            revocations_known: Gauge::default(),
        };
        registry.register_with_unit(
            "identity_certificate_expiry_timestamp",
            "When the current certificate of a local identity expires (Unix time); \
             kept at the expired one's time until a new one is issued, removed when \
             the identity's last local pod goes",
            Unit::Seconds,
            m.expiry.clone(),
        );
        registry.register(
            "identity_issuance_failures",
            "Certificate requests that failed, by reason (the CA's refusal, or \
             unreachable, timeout, untrusted_ca, invalid_response, ...)",
            m.failures.clone(),
        );
        registry.register_with_unit(
            "identity_issuance_duration",
            "Time a certificate request took, key generation and checks included, \
             granted or not",
            Unit::Seconds,
            m.duration.clone(),
        );
        registry.register(
            "identity_renewals",
            "Certificates issued to replace a previous one of the same identity",
            m.renewals.clone(),
        );
        registry.register(
            "identity_identities",
            "Local identities by state (pending, valid, renewing, failing, expired)",
            m.states.clone(),
        );
        registry.register(
            "identity_revocations_known",
            "1 while the revocations are known; 0 while they are not, and every \
             identity is then treated as revoked (fail closed)",
            m.revocations_known.clone(),
        );
        m
    }

    /// Creates the bounded series at 0, so rates and alerts work from the
    /// first scrape.
    pub fn enable(&self) {
        for reason in FailureReason::all() {
            let _ = self.failures.get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            });
        }
        for state in IdentityState::ALL {
            let _ = self.states.get_or_create(&StateLabels {
                state: state.as_str(),
            });
        }
    }

    pub fn set_expiry(&self, id: &SpiffeId, not_after: SystemTime) {
        let seconds = not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.expiry
            .get_or_create(&IdentityLabels {
                spiffe_id: id.to_string(),
            })
            .set(i64::try_from(seconds).unwrap_or(i64::MAX));
    }

    /// The identity left the node.
    pub fn remove(&self, id: &SpiffeId) {
        self.expiry.remove(&IdentityLabels {
            spiffe_id: id.to_string(),
        });
    }

    pub fn failed(&self, reason: FailureReason) {
        self.failures
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn observe(&self, took: Duration) {
        self.duration.observe(took.as_secs_f64());
    }

    pub fn renewed(&self) {
        self.renewals.inc();
    }

    pub fn set_states(&self, counts: &[(IdentityState, usize)]) {
        for (state, n) in counts {
            self.states
                .get_or_create(&StateLabels {
                    state: state.as_str(),
                })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }

    pub fn set_revocations_known(&self, known: bool) {
        self.revocations_known.set(i64::from(known));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::wire::RefusalReason;

    #[test]
    fn names_follow_the_conventions_and_an_identity_leaves_with_its_series() {
        let mut registry = Registry::with_prefix(crate::metrics::PREFIX);
        let m = IdentityMetrics::register(&mut registry);
        m.enable();
        let web: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        m.set_expiry(
            &web,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_777_633_200),
        );
        m.failed(FailureReason::Refused(RefusalReason::Unavailable));
        m.observe(Duration::from_millis(3));
        m.renewed();
        m.set_revocations_known(true);
        let encode = |r: &Registry| {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, r).unwrap();
            out
        };
        let text = encode(&registry);
        for needle in [
            "portcullis_identity_certificate_expiry_timestamp_seconds{spiffe_id=\"spiffe://cluster.local/ns/shop/sa/web\"} 1777633200",
            "portcullis_identity_issuance_failures_total{reason=\"unavailable\"} 1",
            "portcullis_identity_issuance_failures_total{reason=\"timeout\"} 0",
            "# TYPE portcullis_identity_issuance_duration_seconds histogram",
            "portcullis_identity_issuance_duration_seconds_count 1",
            "portcullis_identity_renewals_total 1",
            "portcullis_identity_identities{state=\"valid\"} 0",
            "portcullis_identity_revocations_known 1",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        m.remove(&web);
        assert!(!encode(&registry).contains("spiffe_id="));
    }
}
