//! `portcullis flows`: the kernel's flow events with names — which workload
//! talked to which, on what port, and what decided.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use portcullis_common::{
    FlowEvent, DIRECTION_INGRESS, ENDPOINT_ID_NONE, FLOW_FLAG_MESH, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP, REASON_DEFAULT_DENY, REASON_HOST, REASON_LOCAL, REASON_MALFORMED,
    REASON_NOT_ISOLATED, REASON_NOT_PROGRAMMED, REASON_NO_BACKEND, REASON_PACKET_SOCKET,
    REASON_PLAINTEXT, REASON_POLICY, REASON_REPLY, REASON_SPOOFED, REASON_UNCLASSIFIED,
    VERDICT_ALLOW, VERDICT_AUDIT,
};
use serde::Serialize;

use crate::{
    identity::spiffe::SpiffeId,
    policy::{compile::addr_from16, model::Inventory},
    reconcile::PublishedNames,
};

/// A flow event with names.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NamedFlow {
    /// Wall-clock time, seconds since the Unix epoch.
    pub time: f64,
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: &'static str,
    /// The enforced endpoint's side: ingress or egress.
    pub direction: &'static str,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub decided_by: String,
    /// Through the mesh: `mtls`, or `passthrough` (a meshed pod's
    /// connection to a pod outside the mesh).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh: Option<&'static str>,
    /// The other side's SPIFFE ID on an mTLS flow: the client's certificate
    /// (ingress, checked against the pod at the client's address by the
    /// inbound proxy), or the identity the outbound proxy required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_identity: Option<String>,
}

/// Names addresses and ids using the inventory and the agent's names.
pub struct Namer {
    by_ip: BTreeMap<IpAddr, String>,
    /// Meshed pods' identities by address (when the trust domain is known).
    meshed: BTreeMap<IpAddr, String>,
    names: PublishedNames,
    /// Wall clock minus monotonic clock, to date kernel timestamps.
    boot_offset: f64,
}

fn clock(id: libc::clockid_t) -> f64 {
    crate::clock::read_ns(id) as f64 / 1e9
}

impl Namer {
    pub fn new(inventory: &Inventory, names: PublishedNames) -> Self {
        let by_ip = inventory
            .workloads
            .iter()
            .flat_map(|w| {
                let name = format!("{}/{}", w.namespace, w.name);
                w.ips
                    .iter()
                    .map(move |ip| (ip.to_canonical(), name.clone()))
            })
            .chain(inventory.services.iter().flat_map(|s| {
                let name = format!("service {}/{}", s.namespace, s.name);
                s.cluster_ips
                    .iter()
                    .map(move |ip| (ip.to_canonical(), name.clone()))
            }))
            .collect();
        let meshed = names
            .trust_domain
            .as_deref()
            .map(|td| meshed_identities(inventory, td))
            .unwrap_or_default();
        Self {
            by_ip,
            meshed,
            names,
            boot_offset: clock(libc::CLOCK_REALTIME) - clock(libc::CLOCK_MONOTONIC),
        }
    }

    pub fn name(&self, e: &FlowEvent) -> NamedFlow {
        let endpoint = self
            .names
            .endpoints
            .get(&e.endpoint_id)
            .cloned()
            .unwrap_or_else(|| match e.endpoint_id {
                ENDPOINT_ID_NONE => "(unregistered pod)".to_string(),
                id => format!("endpoint {id}"),
            });
        let peer_ip = addr_from16(e.peer_addr).to_canonical();
        let peer = self
            .by_ip
            .get(&peer_ip)
            .cloned()
            .unwrap_or_else(|| peer_ip.to_string());
        let (from, to) = if e.direction == DIRECTION_INGRESS {
            (peer, endpoint)
        } else {
            (endpoint, peer)
        };
        let decided_by = match e.reason {
            REASON_POLICY | REASON_DEFAULT_DENY | REASON_UNCLASSIFIED => self
                .names
                .cookies
                .get(&e.rule_cookie)
                .cloned()
                .unwrap_or_else(|| format!("rule cookie {}", e.rule_cookie)),
            REASON_NO_BACKEND => "the service port has no ready backend".into(),
            REASON_NOT_PROGRAMMED => "pod not programmed yet".into(),
            REASON_SPOOFED => "source address not the pod's own".into(),
            REASON_MALFORMED => "not a readable IP packet".into(),
            REASON_PACKET_SOCKET => {
                "packet sockets are refused to pods ingress policy restricts".into()
            }
            REASON_PLAINTEXT => "plaintext refused: the pod's mesh mode is STRICT".into(),
            _ => String::new(),
        };
        let (mesh, peer_identity) = if e.flags & FLOW_FLAG_MESH == 0 {
            (None, None)
        } else {
            match self.meshed.get(&peer_ip) {
                Some(id) => (Some("mtls"), Some(id.clone())),
                // Only the outbound side passes a flow on to a pod outside
                // the mesh; the inbound proxy serves meshed clients only.
                None if e.direction != DIRECTION_INGRESS => (Some("passthrough"), None),
                None => (Some("mtls"), None),
            }
        };
        NamedFlow {
            time: self.boot_offset + e.timestamp_ns as f64 / 1e9,
            from,
            to,
            port: e.port,
            protocol: protocol_name(e.protocol),
            direction: direction_name(e.direction),
            verdict: verdict_name(e.verdict),
            reason: reason_name(e.reason),
            decided_by,
            mesh,
            peer_identity,
        }
    }
}

/// Every meshed pod's address → its SPIFFE ID.
fn meshed_identities(inventory: &Inventory, trust_domain: &str) -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    let modes = crate::mesh::mode::NamespaceModes::of(inventory);
    for w in &inventory.workloads {
        if !modes.of_workload(w).0.is_meshed() {
            continue;
        }
        let Ok(id) = SpiffeId::new(trust_domain, &w.namespace, w.service_account()) else {
            continue;
        };
        for ip in &w.ips {
            out.insert(ip.to_canonical(), id.to_string());
        }
    }
    out
}

/// How people read the kernel's `PROTO_*` values (flows and counters).
pub fn protocol_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        PROTO_SCTP => "SCTP",
        _ => "other",
    }
}

/// How people read the kernel's `DIRECTION_*` values.
pub fn direction_name(d: u8) -> &'static str {
    if d == DIRECTION_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

/// How people read the kernel's `VERDICT_*` values.
pub fn verdict_name(v: u8) -> &'static str {
    match v {
        VERDICT_ALLOW => "allow",
        VERDICT_AUDIT => "audit",
        _ => "deny",
    }
}

/// How people read the kernel's `REASON_*` values.
pub fn reason_name(r: u8) -> &'static str {
    match r {
        REASON_POLICY => "policy",
        REASON_DEFAULT_DENY => "default-deny",
        REASON_NOT_ISOLATED => "not-isolated",
        REASON_LOCAL => "local",
        REASON_HOST => "host",
        REASON_REPLY => "reply",
        REASON_NO_BACKEND => "no-backend",
        REASON_NOT_PROGRAMMED => "not-programmed",
        REASON_SPOOFED => "spoofed",
        REASON_MALFORMED => "malformed",
        REASON_UNCLASSIFIED => "unclassified",
        REASON_PACKET_SOCKET => "packet-socket",
        REASON_PLAINTEXT => "plaintext",
        _ => "unknown",
    }
}

/// Which flows to show.
#[derive(Clone, Debug, Default)]
pub struct FlowFilter {
    /// Either side in this namespace.
    pub namespace: Option<String>,
    /// Either side is this workload (`namespace/name`).
    pub pod: Option<String>,
    /// allow, deny or audit.
    pub verdict: Option<String>,
}

impl FlowFilter {
    pub fn matches(&self, f: &NamedFlow) -> bool {
        let in_ns = |side: &str, ns: &str| side.split_once('/').is_some_and(|(n, _)| n == ns);
        self.namespace
            .as_deref()
            .is_none_or(|ns| in_ns(&f.from, ns) || in_ns(&f.to, ns))
            && self.pod.as_deref().is_none_or(|p| f.from == p || f.to == p)
            && self.verdict.as_deref().is_none_or(|v| f.verdict == v)
    }
}

impl NamedFlow {
    pub fn render(&self) -> String {
        let by = if self.decided_by.is_empty() {
            String::new()
        } else {
            format!(": {}", self.decided_by)
        };
        let mesh = match (self.mesh, &self.peer_identity) {
            (Some(m), Some(id)) => format!(" [{m} {id}]"),
            (Some(m), None) => format!(" [{m}]"),
            (None, _) => String::new(),
        };
        format!(
            "{} {} → {} {}/{} {} {} ({}){by}{mesh}",
            crate::clock::utc_millis(self.time),
            self.from,
            self.to,
            self.port,
            self.protocol,
            self.direction,
            self.verdict.to_uppercase(),
            self.reason
        )
    }
}

/// Where a running agent's flow events and names are.
#[derive(Clone, Debug)]
pub struct FlowSource {
    pub pin_dir: PathBuf,
    pub names_file: PathBuf,
    pub workloads: PathBuf,
}

/// How long `flows` waits for the next event before checking for Ctrl-C.
pub const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    #[error("opening the flow events")]
    Open {
        #[source]
        source: crate::bpf::LoadError,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn load_names(source: &FlowSource) -> Result<Namer, FlowsError> {
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).map_err(|e| FlowsError::Read {
            path: path.clone(),
            source: Box::new(e),
        })
    };
    let names: PublishedNames =
        serde_json::from_str(&read(&source.names_file)?).map_err(|e| FlowsError::Read {
            path: source.names_file.clone(),
            source: Box::new(e),
        })?;
    let inventory =
        crate::policy::parse::parse_inventory(&source.workloads, &read(&source.workloads)?)
            .map_err(|e| FlowsError::Read {
                path: source.workloads.clone(),
                source: Box::new(e),
            })?;
    Ok(Namer::new(&inventory, names))
}

/// Prints matching flows as they come, until `count` were printed (or
/// forever). Names are reloaded now and then: the agent renumbers rules as
/// policies change.
pub fn tail(
    source: &FlowSource,
    filter: &FlowFilter,
    json: bool,
    count: Option<usize>,
) -> Result<(), FlowsError> {
    let mut reader = crate::bpf::events::EventReader::open(&source.pin_dir)
        .map_err(|source| FlowsError::Open { source })?;
    let mut namer = load_names(source)?;
    let mut loaded = std::time::Instant::now();
    let mut printed = 0;
    while count.is_none_or(|c| printed < c) {
        if loaded.elapsed() > Duration::from_secs(2) {
            if let Ok(n) = load_names(source) {
                namer = n;
            }
            loaded = std::time::Instant::now();
        }
        let Some(event) = reader.next(POLL) else {
            continue;
        };
        let flow = namer.name(&event);
        if !filter.matches(&flow) {
            continue;
        }
        if json {
            println!("{}", serde_json::to_string(&flow).expect("serializable"));
        } else {
            println!("{}", flow.render());
        }
        printed += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use portcullis_common::DIRECTION_EGRESS;

    use super::*;

    fn flow(from: &str, to: &str, verdict: &'static str) -> NamedFlow {
        NamedFlow {
            time: 0.0,
            from: from.into(),
            to: to.into(),
            port: 80,
            protocol: "TCP",
            direction: "ingress",
            verdict,
            reason: "policy",
            decided_by: String::new(),
            mesh: None,
            peer_identity: None,
        }
    }

    fn event(peer: [u8; 4], direction: u8, flags: u8) -> FlowEvent {
        FlowEvent {
            timestamp_ns: 0,
            endpoint_id: 1,
            rule_cookie: 0,
            peer_addr: portcullis_common::ipv4_mapped(peer),
            peer_port: 80,
            port: 80,
            direction,
            verdict: VERDICT_ALLOW,
            reason: REASON_POLICY,
            protocol: PROTO_TCP,
            flags,
            _pad: [0; 7],
        }
    }

    #[test]
    fn mesh_flows_name_the_peer_identity_or_say_passthrough() {
        let inventory = crate::policy::parse::parse_inventory(
            std::path::Path::new("w.yaml"),
            "namespaces:\n  - {name: x, labels: {portcullis.dev/mtls: strict}}\n  - {name: z}\n\
             workloads:\n  - {name: a, namespace: x, serviceAccount: api, ips: [10.0.0.1]}\n  \
             - {name: b, namespace: x, cgroup: /b, ips: [10.0.0.2]}\n  \
             - {name: c, namespace: z, ips: [10.0.0.3]}\n",
        )
        .expect("inventory");
        let names = PublishedNames {
            endpoints: BTreeMap::from([(1, "x/b".to_string())]),
            trust_domain: Some("cluster.local".into()),
            ..Default::default()
        };
        let namer = Namer::new(&inventory, names);
        let inbound = namer.name(&event([10, 0, 0, 1], DIRECTION_INGRESS, FLOW_FLAG_MESH));
        assert_eq!(inbound.mesh, Some("mtls"));
        assert_eq!(
            inbound.peer_identity.as_deref(),
            Some("spiffe://cluster.local/ns/x/sa/api")
        );
        assert!(
            inbound
                .render()
                .ends_with("[mtls spiffe://cluster.local/ns/x/sa/api]"),
            "{}",
            inbound.render()
        );
        let out = namer.name(&event([10, 0, 0, 3], DIRECTION_EGRESS, FLOW_FLAG_MESH));
        assert_eq!((out.mesh, out.peer_identity), (Some("passthrough"), None));
        // Unflagged: a plaintext flow, whoever the peer is.
        let plain = namer.name(&event([10, 0, 0, 1], DIRECTION_INGRESS, 0));
        assert_eq!((plain.mesh, plain.peer_identity.as_deref()), (None, None));
        let json = serde_json::to_string(&plain).expect("json");
        assert!(!json.contains("mesh"), "{json}");
    }

    #[test]
    fn filters_by_namespace_pod_and_verdict() {
        let f = flow("x/a", "y/b", "deny");
        let by = |namespace: Option<&str>, pod: Option<&str>, verdict: Option<&str>| FlowFilter {
            namespace: namespace.map(Into::into),
            pod: pod.map(Into::into),
            verdict: verdict.map(Into::into),
        };
        assert!(by(Some("y"), None, None).matches(&f));
        assert!(!by(Some("z"), None, None).matches(&f));
        assert!(by(None, Some("x/a"), Some("deny")).matches(&f));
        assert!(!by(None, Some("x/b"), None).matches(&f));
        assert!(!by(None, None, Some("allow")).matches(&f));
        // An external address has no namespace.
        assert!(!by(Some("x"), None, None).matches(&flow("203.0.113.9", "z/a", "deny")));
    }

    #[test]
    fn flows_print_wall_clock_times_not_epoch_seconds() {
        let mut f = flow("x/a", "y/b", "deny");
        f.time = 1_796_187_761.058;
        let line = f.render();
        assert!(
            line.starts_with("2026-12-02 ") && line.contains(".058 UTC"),
            "{line}"
        );
        assert!(!line.contains("1796187761"), "{line}");
    }
}
