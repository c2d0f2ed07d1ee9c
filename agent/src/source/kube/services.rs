//! Services and EndpointSlices → the data path's [`Service`] table: each
//! ClusterIP port with the ready backends it leads to, so connections to a
//! ClusterIP are translated to a backend (and judged as that backend) at
//! connect time.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::{core::v1::Service as ApiService, discovery::v1::EndpointSlice};

use crate::policy::model::{unusable_reason, Protocol, Service, ServiceBackend, ServicePort};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        // SCTP is not enforced by the data path; nothing to translate.
        _ => None,
    }
}

/// Backends of one service port: the ready addresses of every slice, on the
/// slice port of the same name. Serving-but-terminating endpoints are left
/// out, as kube-proxy does while ready ones exist.
fn backends(slices: &[&EndpointSlice], port_name: &str, proto: Protocol) -> Vec<ServiceBackend> {
    let mut out = Vec::new();
    for slice in slices {
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && protocol(p.protocol.as_deref()) == Some(proto)
        }) else {
            continue;
        };
        let Some(number) = port
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            // `ready` unset means ready (API convention).
            if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    out.push(ServiceBackend { ip, port: number });
                }
            }
        }
    }
    out.sort_by_key(|b| (b.ip, b.port));
    out.dedup();
    out
}

fn cluster_ips(svc: &ApiService) -> Vec<IpAddr> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let listed = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter());
    let mut ips: Vec<IpAddr> = Vec::new();
    // "None" marks a headless service: clients reach pods directly.
    for ip in listed.filter_map(|ip| ip.parse::<IpAddr>().ok()) {
        if !ips.iter().any(|known| known.is_ipv4() == ip.is_ipv4()) {
            ips.push(ip);
        }
    }
    ips
}

pub fn services<'a>(
    services: impl IntoIterator<Item = &'a ApiService>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Vec<Service> {
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        let owner = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL));
        if let (Some(ns), Some(owner)) = (&slice.metadata.namespace, owner) {
            by_service
                .entry((ns.clone(), owner.clone()))
                .or_default()
                .push(slice);
        }
    }
    let mut out: Vec<Service> = Vec::new();
    for svc in services {
        let (Some(name), Some(namespace)) = (&svc.metadata.name, &svc.metadata.namespace) else {
            continue;
        };
        let ips = cluster_ips(svc);
        if ips.is_empty() {
            continue;
        }
        let slices = by_service
            .get(&(namespace.clone(), name.clone()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut ports: Vec<ServicePort> = Vec::new();
        for port in svc.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
            let (Some(proto), Ok(number)) =
                (protocol(port.protocol.as_deref()), u16::try_from(port.port))
            else {
                continue;
            };
            if number == 0
                || ports
                    .iter()
                    .any(|p| p.port == number && p.protocol == proto)
            {
                continue;
            }
            ports.push(ServicePort {
                port: number,
                protocol: proto,
                backends: backends(slices, port.name.as_deref().unwrap_or(""), proto),
            });
        }
        if !ports.is_empty() {
            out.push(Service {
                name: name.clone(),
                namespace: namespace.clone(),
                cluster_ips: ips,
                ports,
            });
        }
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// The inventory's own rule, so this filter cannot fall behind it.
fn usable(ip: &IpAddr) -> bool {
    unusable_reason(*ip).is_none()
}

/// Drops what the inventory rules would reject, so one odd Service cannot
/// stop the node's whole state from applying: a cluster IP that is also a
/// pod or node address (or another service's), or an unusable address.
/// Returns a problem per dropped service.
pub fn keep_consistent(services: &mut Vec<Service>, claimed: &[IpAddr]) -> Vec<String> {
    let mut taken: std::collections::HashSet<IpAddr> = claimed.iter().copied().collect();
    let mut problems = Vec::new();
    services.retain_mut(|svc| {
        for port in &mut svc.ports {
            port.backends.retain(|b| usable(&b.ip));
        }
        let clash = svc
            .cluster_ips
            .iter()
            .find(|ip| !usable(ip) || taken.contains(ip));
        if let Some(ip) = clash {
            problems.push(format!(
                "Service {}/{}: cluster IP {ip} is unusable or already used by a pod, \
                 the node or another service; not translated",
                svc.namespace, svc.name
            ));
            return false;
        }
        taken.extend(svc.cluster_ips.iter().copied());
        true
    });
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> ApiService {
        serde_json::from_value(v).unwrap()
    }

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn ready_endpoints_on_the_named_port_become_backends() {
        let s = svc(json!({
            "metadata": {"name": "web", "namespace": "x"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                     "ports": [{"name": "http", "port": 80, "targetPort": "web"},
                               {"name": "dns", "port": 53, "protocol": "UDP"}]}
        }));
        let e = slice(json!({
            "metadata": {"name": "web-abc", "namespace": "x",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.4"]}
            ]
        }));
        let out = services([&s], [&e]);
        assert_eq!(out.len(), 1);
        let web = &out[0];
        assert_eq!(web.cluster_ips.len(), 2);
        let http = &web.ports[0];
        assert_eq!((http.port, http.protocol), (80, Protocol::Tcp));
        let got: Vec<String> = http
            .backends
            .iter()
            .map(|b| format!("{}:{}", b.ip, b.port))
            .collect();
        assert_eq!(got, ["10.0.0.2:8080", "10.0.0.4:8080"]);
        assert_eq!(web.ports[1].backends[0].port, 5353);
    }

    #[test]
    fn headless_and_external_name_services_are_not_translated() {
        let headless = svc(json!({
            "metadata": {"name": "h", "namespace": "x"},
            "spec": {"clusterIP": "None", "ports": [{"port": 80}]}
        }));
        let external = svc(json!({
            "metadata": {"name": "e", "namespace": "x"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}
        }));
        assert!(services([&headless, &external], []).is_empty());
    }

    #[test]
    fn a_cluster_ip_that_clashes_is_dropped_with_a_problem() {
        let s = |name: &str, ip: &str| {
            svc(json!({"metadata": {"name": name, "namespace": "x"},
                       "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}))
        };
        let (a, b, c) = (s("a", "10.96.0.1"), s("b", "10.96.0.1"), s("c", "10.0.0.5"));
        let mut out = services([&a, &b, &c], []);
        let problems = keep_consistent(&mut out, &["10.0.0.5".parse().unwrap()]);
        let kept: Vec<&str> = out.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(kept, ["a"]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("Service x/b"), "{problems:?}");
    }

    #[test]
    fn a_service_without_endpoints_has_ports_without_backends() {
        let s = svc(json!({
            "metadata": {"name": "web", "namespace": "x"},
            "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 80}]}
        }));
        let out = services([&s], []);
        assert!(out[0].ports[0].backends.is_empty());
    }
}
