//! Whether the protections that depend on the kernel's configuration are
//! in force on this node, so a node without them shows up in Prometheus
//! rather than only in a log line.

use prometheus_client::{metrics::gauge::Gauge, registry::Registry};

pub struct GuardMetrics {
    packet_socket_guard: Gauge,
}

impl GuardMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            packet_socket_guard: Gauge::default(),
        };
        registry.register(
            "packet_socket_guard_active",
            "1 when the BPF LSM program refusing packet (AF_PACKET) sockets to pods that \
             ingress policy restricts runs; 0 when the kernel cannot run it (BPF LSM not enabled: \
             boot with bpf in lsm=) and such pods can read frames ingress policy drops",
            m.packet_socket_guard.clone(),
        );
        m
    }

    pub fn set_packet_socket_guard(&self, active: bool) {
        self.packet_socket_guard.set(i64::from(active));
    }
}

#[cfg(test)]
mod tests {
    use crate::metrics::Metrics;

    #[test]
    fn a_node_without_the_packet_socket_guard_shows_zero() {
        let m = Metrics::new();
        m.guards.set_packet_socket_guard(false);
        let text = m.encode().unwrap();
        assert!(
            text.contains("portcullis_packet_socket_guard_active 0"),
            "{text}"
        );
        m.guards.set_packet_socket_guard(true);
        let text = m.encode().unwrap();
        assert!(
            text.contains("portcullis_packet_socket_guard_active 1"),
            "{text}"
        );
    }
}
