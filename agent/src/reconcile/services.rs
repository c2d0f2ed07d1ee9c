//! Services → the kernel's frontend and backend maps.
//!
//! Every (cluster IP, port, protocol) is one frontend with its own id and
//! backend list, holding only backends of the cluster IP's family: the kernel
//! rewrites the destination in place, and a socket can only be sent to an
//! address of its own family. Ids and backend order follow the sorted
//! frontends and backends, not the input order, so an unchanged service
//! rewrites nothing.

use std::collections::{BTreeMap, BTreeSet};

use portcullis_common::{BackendValue, ServiceSlot, ServiceValue};

use crate::policy::model::{Protocol, Service};

use super::addr16;

/// Frontend map and backend map contents.
pub type ServiceMaps = (
    BTreeMap<ServiceSlot, ServiceValue>,
    BTreeMap<(u32, u32), BackendValue>,
);

pub fn desired(services: &[Service]) -> ServiceMaps {
    let mut frontends: BTreeMap<ServiceSlot, BTreeSet<([u8; 16], u16)>> = BTreeMap::new();
    for service in services {
        for cluster_ip in &service.cluster_ips {
            for port in &service.ports {
                // The data path only sees TCP and UDP sockets.
                if !Protocol::SOCKET.contains(&port.protocol) {
                    continue;
                }
                let slot = ServiceSlot {
                    addr: addr16(*cluster_ip),
                    port: port.port,
                    protocol: port.protocol.number(),
                };
                let backends = port
                    .backends
                    .iter()
                    .filter(|b| b.ip.is_ipv4() == cluster_ip.is_ipv4())
                    .map(|b| (addr16(b.ip), b.port));
                frontends.entry(slot).or_default().extend(backends);
            }
        }
    }
    let mut services = BTreeMap::new();
    let mut backends = BTreeMap::new();
    for (i, (slot, list)) in frontends.into_iter().enumerate() {
        let service_id = i as u32 + 1;
        services.insert(
            slot,
            ServiceValue {
                service_id,
                backend_count: list.len() as u32,
            },
        );
        for (index, (addr, port)) in list.into_iter().enumerate() {
            backends.insert(
                (service_id, index as u32),
                BackendValue {
                    addr,
                    port,
                    _pad: 0,
                },
            );
        }
    }
    (services, backends)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{ServiceBackend, ServicePort};

    fn service(ips: &[&str], backends: &[(&str, u16)]) -> Service {
        Service {
            name: "web".into(),
            namespace: "y".into(),
            cluster_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            ports: vec![ServicePort {
                port: 80,
                protocol: Protocol::Tcp,
                backends: backends
                    .iter()
                    .map(|(ip, port)| ServiceBackend {
                        ip: ip.parse().unwrap(),
                        port: *port,
                    })
                    .collect(),
            }],
        }
    }

    #[test]
    fn each_family_gets_its_own_frontend_and_backends() {
        let s = service(
            &["10.96.0.10", "fd00::10"],
            &[("10.0.0.2", 8080), ("fd00::2", 8080), ("10.0.0.1", 8080)],
        );
        let (fronts, backs) = desired(&[s]);
        assert_eq!(fronts.len(), 2);
        let v4 = fronts
            .iter()
            .find(|(k, _)| k.addr == addr16("10.96.0.10".parse().unwrap()))
            .unwrap()
            .1;
        assert_eq!(v4.backend_count, 2);
        // Sorted: 10.0.0.1 first, whatever the input order.
        assert_eq!(
            backs[&(v4.service_id, 0)].addr,
            addr16("10.0.0.1".parse().unwrap())
        );
        assert_eq!(backs.len(), 3);
    }

    #[test]
    fn a_port_without_backends_is_a_frontend_with_none() {
        let (fronts, backs) = desired(&[service(&["10.96.0.10"], &[])]);
        assert_eq!(fronts.values().next().unwrap().backend_count, 0);
        assert!(backs.is_empty());
    }
}
