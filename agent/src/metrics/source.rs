//! The policy source's health: whether it can be followed, and whether this
//! agent is the one writing Events and conditions for invalid objects.

use prometheus_client::{metrics::gauge::Gauge, registry::Registry};

pub struct SourceMetrics {
    degraded: Gauge,
    report_leader: Gauge,
}

impl SourceMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            degraded: Gauge::default(),
            report_leader: Gauge::default(),
        };
        registry.register(
            "source_degraded",
            "1 while the policy source cannot be followed (API server unreachable, \
             initial lists pending); the last applied state stays enforced",
            m.degraded.clone(),
        );
        registry.register(
            "policy_report_leader",
            "1 on the agent that holds the Lease and reports invalid policy objects \
             as Events and conditions; 0 on every other agent and in standalone mode",
            m.report_leader.clone(),
        );
        m
    }

    pub fn set(&self, degraded: bool, leader: bool) {
        self.degraded.set(i64::from(degraded));
        self.report_leader.set(i64::from(leader));
    }
}
