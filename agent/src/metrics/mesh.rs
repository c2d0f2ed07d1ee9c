//! Transparent mTLS: proxied connections by direction, mode and result,
//! handshake failures by reason, bytes, live connections, and meshed pods
//! by mode. Label values are bounded: a few directions, three modes, a
//! fixed set of results and reasons.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `outbound` (from a meshed pod) or `inbound` (to one).
    pub direction: &'static str,
    /// The local pod's mode: `strict` or `permissive`.
    pub mode: &'static str,
    /// `mtls`, `passthrough` (outbound to a pod outside the mesh),
    /// `refused` (policy, identity or a missing destination), `failed`.
    pub result: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FailureLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ModeLabels {
    pub mode: &'static str,
}

#[derive(Clone)]
pub struct MeshMetrics {
    connections: Family<ConnectionLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    bytes: Family<DirectionLabels, Counter>,
    active: Family<DirectionLabels, Gauge>,
    pods: Family<ModeLabels, Gauge>,
}

impl MeshMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            connections: Family::default(),
            failures: Family::default(),
            bytes: Family::default(),
            active: Family::default(),
            pods: Family::default(),
        };
        registry.register(
            "mesh_connections",
            "TCP connections of meshed pods the agent's proxies handled, by direction, \
             the local pod's mode, and result (mtls, passthrough, refused, failed)",
            m.connections.clone(),
        );
        registry.register(
            "mesh_failures",
            "Proxied connections that failed or were refused, by direction and reason \
             (tls_handshake, peer_untrusted, peer_revoked, policy_denied, ...)",
            m.failures.clone(),
        );
        registry.register_with_unit(
            "mesh",
            "Bytes the proxies relayed, both ways, by direction",
            Unit::Bytes,
            m.bytes.clone(),
        );
        registry.register(
            "mesh_active_connections",
            "Proxied connections open now, by direction",
            m.active.clone(),
        );
        registry.register(
            "mesh_pods",
            "Local pods in the mesh, by mode",
            m.pods.clone(),
        );
        m
    }

    pub fn connection(&self, direction: &'static str, mode: &'static str, result: &'static str) {
        self.connections
            .get_or_create(&ConnectionLabels {
                direction,
                mode,
                result,
            })
            .inc();
    }

    pub fn failure(&self, direction: &'static str, reason: &'static str) {
        self.failures
            .get_or_create(&FailureLabels { direction, reason })
            .inc();
    }

    pub fn relayed(&self, direction: &'static str, bytes: u64) {
        self.bytes
            .get_or_create(&DirectionLabels { direction })
            .inc_by(bytes);
    }

    /// Counts a connection open until the guard is dropped.
    pub fn open(&self, direction: &'static str) -> ActiveGuard {
        let gauge = self
            .active
            .get_or_create(&DirectionLabels { direction })
            .clone();
        gauge.inc();
        ActiveGuard(gauge)
    }

    pub fn set_pods(&self, mode: &'static str, count: usize) {
        self.pods
            .get_or_create(&ModeLabels { mode })
            .set(count as i64);
    }
}

pub struct ActiveGuard(Gauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
