//! Every manifest under deploy/ (policy examples aside) parses into its typed
//! Kubernetes object, loses no field doing so (a typo'd field would be
//! silently ignored by the API server too), is installed by a
//! kustomization, and has the properties a reviewer checks before running
//! it on every node: least privilege, the right mounts, working probes.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, Namespace, Probe, Secret, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

const NAMESPACE: &str = "portcullis-system";
const SERVICE_ACCOUNT: &str = "portcullis-agent";
const ADMIN_PORT: i32 = 8443;
/// The ClusterRole that may read the agents' /metrics, and the identity
/// deploy/monitoring/ scrapes as.
const METRICS_READER: &str = "portcullis-metrics-reader";
const SCRAPER: &str = "portcullis-metrics-scraper";
/// Policy examples, not install manifests (`portcullis lab` tests them), and
/// the plain Prometheus rule file (tests/prometheus.rs tests it).
// deploy/ca and deploy/identity (the CA and the identity Component) are
// rendered with kustomize, applied to a real API server and checked for
// least privilege by tests/identity_ca.rs.
const NOT_MANIFESTS: &[&str] = &["examples", "prometheus", "ca", "identity"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[derive(Debug)]
enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    Secret(Box<Secret>),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Role(Role),
    RoleBinding(RoleBinding),
    DaemonSet(Box<DaemonSet>),
    Service(Box<Service>),
    CustomResourceDefinition(Box<CustomResourceDefinition>),
    /// monitoring.coreos.com has no typed model here.
    PodMonitor(Value),
    PrometheusRule(Value),
}

/// Everything under deploy/, loaded once per test.
struct Deploy {
    /// Manifest files (relative to deploy/) and their objects.
    objects: Vec<(PathBuf, Object)>,
    /// kustomization.yaml files (relative) and the files they list.
    kustomizations: BTreeMap<PathBuf, Vec<PathBuf>>,
}

fn yaml_files(dir: &Path, root: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        if path.is_dir() {
            if !NOT_MANIFESTS.iter().any(|n| rel == Path::new(n)) {
                yaml_files(&path, root, out);
            }
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(rel);
        }
    }
}

/// Parses into `T` and fails if serializing `T` back differs from the
/// document: k8s-openapi ignores unknown fields, so that is how a
/// misspelled or misplaced field shows up.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value, at: &str) -> T {
    let obj: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{at}: {e}"));
    let original = doc.clone();
    let round_trip = serde_json::to_value(&obj).unwrap();
    if let Some(diff) = first_difference(&original, &round_trip, "") {
        panic!("{at}: {diff} (unknown or misplaced field?)");
    }
    obj
}

fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => a
            .keys()
            .chain(b.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .find_map(|k| match (a.get(k), b.get(k)) {
                (Some(x), Some(y)) => first_difference(x, y, &format!("{path}.{k}")),
                (Some(_), None) => Some(format!("{path}.{k} is dropped by the typed model")),
                (None, _) => Some(format!("{path}.{k} appears only after parsing")),
            }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{path}: {a} became {b}")),
    }
}

fn parse(doc: &Value, at: &str) -> Object {
    let kind = doc
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_else(|| panic!("{at}: no kind"));
    match kind {
        "Namespace" => Object::Namespace(typed(doc, at)),
        "ServiceAccount" => Object::ServiceAccount(typed(doc, at)),
        "Secret" => Object::Secret(Box::new(typed(doc, at))),
        "ClusterRole" => Object::ClusterRole(typed(doc, at)),
        "ClusterRoleBinding" => Object::ClusterRoleBinding(typed(doc, at)),
        "Role" => Object::Role(typed(doc, at)),
        "RoleBinding" => Object::RoleBinding(typed(doc, at)),
        "DaemonSet" => Object::DaemonSet(Box::new(typed(doc, at))),
        "Service" => Object::Service(Box::new(typed(doc, at))),
        "CustomResourceDefinition" => Object::CustomResourceDefinition(Box::new(typed(doc, at))),
        "PodMonitor" => {
            let v = doc.clone();
            assert_eq!(v["apiVersion"], "monitoring.coreos.com/v1", "{at}");
            Object::PodMonitor(v)
        }
        "PrometheusRule" => {
            let v = doc.clone();
            assert_eq!(v["apiVersion"], "monitoring.coreos.com/v1", "{at}");
            Object::PrometheusRule(v)
        }
        other => panic!(
            "{at}: kind {other} is not one this test knows; add it to `parse` with its \
             typed k8s-openapi object"
        ),
    }
}

impl Deploy {
    fn load() -> Self {
        let root = deploy_dir();
        let mut files = Vec::new();
        yaml_files(&root, &root, &mut files);
        let mut objects = Vec::new();
        let mut kustomizations = BTreeMap::new();
        for rel in files {
            let text = fs::read_to_string(root.join(&rel)).unwrap();
            if rel.file_name().is_some_and(|n| n == "kustomization.yaml") {
                kustomizations.insert(rel.clone(), kustomization_resources(&rel, &text));
                continue;
            }
            // Empty documents are skipped, so `i` counts objects.
            let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", rel.display()));
            for (i, doc) in docs.into_iter().enumerate() {
                let at = format!("{} document {i}", rel.display());
                objects.push((rel.clone(), parse(&doc, &at)));
            }
        }
        Self {
            objects,
            kustomizations,
        }
    }

    fn daemonset(&self) -> &DaemonSet {
        let mut all = self.objects.iter().filter_map(|(_, o)| match o {
            Object::DaemonSet(d) => Some(d.as_ref()),
            _ => None,
        });
        let ds = all.next().expect("deploy/ has a DaemonSet");
        assert!(all.next().is_none(), "one DaemonSet expected");
        ds
    }

    fn agent_container(&self) -> &Container {
        let spec = self.daemonset().spec.as_ref().unwrap();
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.containers.len(), 1, "one container: the agent");
        &pod.containers[0]
    }

    fn pod_labels(&self) -> BTreeMap<String, String> {
        let template = &self.daemonset().spec.as_ref().unwrap().template;
        template.metadata.as_ref().unwrap().labels.clone().unwrap()
    }

    fn cluster_role(&self) -> &ClusterRole {
        self.cluster_role_named(SERVICE_ACCOUNT)
    }

    fn cluster_role_named(&self, name: &str) -> &ClusterRole {
        self.objects
            .iter()
            .find_map(|(_, o)| match o {
                Object::ClusterRole(r) if r.metadata.name.as_deref() == Some(name) => Some(r),
                _ => None,
            })
            .unwrap_or_else(|| panic!("deploy/ has no ClusterRole {name}"))
    }
}

/// The local files a kustomization installs (directories stand for their
/// own kustomization.yaml).
fn kustomization_resources(rel: &Path, text: &str) -> Vec<PathBuf> {
    let k: Value = serde_saphyr::from_str(text).unwrap();
    assert_eq!(
        k["kind"].as_str(),
        Some("Kustomization"),
        "{}",
        rel.display()
    );
    let dir = rel.parent().unwrap();
    k["resources"]
        .as_array()
        .unwrap_or_else(|| panic!("{} lists no resources", rel.display()))
        .iter()
        .map(|r| dir.join(r.as_str().expect("resources are paths")))
        .collect()
}

#[test]
fn kustomizations_install_exactly_the_manifests() {
    let deploy = Deploy::load();
    let root = deploy_dir();
    assert!(
        deploy
            .kustomizations
            .contains_key(Path::new("kustomization.yaml")),
        "`kubectl apply -k deploy/` needs deploy/kustomization.yaml"
    );
    let mut listed = BTreeSet::new();
    for (k, resources) in &deploy.kustomizations {
        for r in resources {
            let abs = root.join(r);
            if abs.is_dir() {
                assert!(
                    abs.join("kustomization.yaml").is_file(),
                    "{} lists directory {} without a kustomization.yaml",
                    k.display(),
                    r.display()
                );
            } else {
                assert!(
                    abs.is_file(),
                    "{} lists {}, which does not exist",
                    k.display(),
                    r.display()
                );
                listed.insert(r.clone());
            }
        }
    }
    let manifests: BTreeSet<PathBuf> = deploy.objects.iter().map(|(f, _)| f.clone()).collect();
    let unlisted: Vec<_> = manifests.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "manifests no kustomization installs: {unlisted:?}"
    );
    // The base must apply on any cluster: no kinds from optional operators.
    for r in &deploy.kustomizations[Path::new("kustomization.yaml")] {
        for (_, o) in deploy.objects.iter().filter(|(f, _)| f == r) {
            assert!(
                !matches!(o, Object::PodMonitor(_) | Object::PrometheusRule(_)),
                "{} is in the base, which would fail without the Prometheus Operator",
                r.display()
            );
        }
    }
}

#[test]
fn every_kind_is_present_and_namespaced_objects_share_one_namespace() {
    let deploy = Deploy::load();
    let mut kinds = BTreeSet::new();
    for (file, o) in &deploy.objects {
        let (kind, ns) = match o {
            Object::Namespace(n) => {
                assert_eq!(n.metadata.name.as_deref(), Some(NAMESPACE));
                ("Namespace", None)
            }
            Object::ServiceAccount(x) => ("ServiceAccount", x.metadata.namespace.as_deref()),
            Object::Secret(x) => ("Secret", x.metadata.namespace.as_deref()),
            Object::ClusterRole(_) => ("ClusterRole", Some(NAMESPACE)),
            Object::ClusterRoleBinding(b) if b.role_ref.name == METRICS_READER => {
                assert_binds_only(&b.subjects, SCRAPER, file);
                ("ClusterRoleBinding", Some(NAMESPACE))
            }
            Object::ClusterRoleBinding(b) => {
                assert_binds_agent(&b.subjects, file);
                ("ClusterRoleBinding", Some(NAMESPACE))
            }
            Object::Role(x) => ("Role", x.metadata.namespace.as_deref()),
            Object::RoleBinding(b) => {
                assert_binds_agent(&b.subjects, file);
                ("RoleBinding", b.metadata.namespace.as_deref())
            }
            Object::DaemonSet(x) => ("DaemonSet", x.metadata.namespace.as_deref()),
            Object::Service(x) => ("Service", x.metadata.namespace.as_deref()),
            Object::CustomResourceDefinition(c) => {
                assert_eq!(c.spec.group, "portcullis.dev", "{}", file.display());
                ("CustomResourceDefinition", Some(NAMESPACE))
            }
            Object::PodMonitor(v) => ("PodMonitor", v["metadata"]["namespace"].as_str()),
            Object::PrometheusRule(v) => ("PrometheusRule", v["metadata"]["namespace"].as_str()),
        };
        if let Some(ns) = ns {
            assert_eq!(ns, NAMESPACE, "{kind} in {} is elsewhere", file.display());
        }
        kinds.insert(kind);
    }
    for want in [
        "Namespace",
        "ServiceAccount",
        "Secret",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "DaemonSet",
        "Service",
        "CustomResourceDefinition",
        "PodMonitor",
        "PrometheusRule",
    ] {
        assert!(kinds.contains(want), "no {want} under deploy/");
    }
}

fn assert_binds_agent(subjects: &Option<Vec<Subject>>, file: &Path) {
    assert_binds_only(subjects, SERVICE_ACCOUNT, file)
}

fn assert_binds_only(subjects: &Option<Vec<Subject>>, account: &str, file: &Path) {
    let subjects = subjects.as_deref().unwrap_or_default();
    assert!(
        subjects.iter().all(|s| s.kind == "ServiceAccount"
            && s.name == account
            && s.namespace.as_deref() == Some(NAMESPACE)),
        "{}: binds {subjects:?}, not only the ServiceAccount {account}",
        file.display()
    );
    assert!(!subjects.is_empty(), "{}: binds nobody", file.display());
}

#[test]
fn daemonset_is_unprivileged_with_only_the_capabilities_it_needs() {
    let deploy = Deploy::load();
    let ds = deploy.daemonset();
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_ne!(pod.host_network, Some(true), "hostNetwork is not needed");
    // The frame guard enters each pod's network namespace through one of
    // its processes, so it must see them, and it must be on.
    assert_eq!(pod.host_pid, Some(true), "the frame guard needs hostPID");
    let args = deploy.agent_container().args.as_deref().unwrap_or_default();
    assert!(
        !args.iter().any(|a| a.starts_with("--guard-packet-sockets")),
        "the frame guard is on by default and must stay on: {args:?}"
    );
    assert_eq!(pod.service_account_name.as_deref(), Some(SERVICE_ACCOUNT));

    let sc = deploy
        .agent_container()
        .security_context
        .as_ref()
        .expect("securityContext");
    assert_ne!(
        sc.privileged,
        Some(true),
        "the agent must not be privileged"
    );
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(
        added,
        BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"]),
        "capabilities changed: update the justification in daemonset.yaml"
    );
}

#[test]
fn daemonset_mounts_bpffs_and_the_host_cgroup_tree() {
    let deploy = Deploy::load();
    let pod = deploy
        .daemonset()
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let host_paths: BTreeMap<&str, &str> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.as_str(), v.host_path.as_ref()?.path.as_str())))
        .collect();
    let mounts = deploy.agent_container().volume_mounts.as_deref().unwrap();
    let mount_of = |host: &str| {
        let (volume, _) = host_paths
            .iter()
            .find(|(_, p)| **p == host)
            .unwrap_or_else(|| panic!("no hostPath volume for {host}"));
        mounts
            .iter()
            .find(|m| m.name == *volume)
            .unwrap_or_else(|| panic!("hostPath {host} is not mounted"))
    };

    let bpffs = mount_of("/sys/fs/bpf");
    assert_eq!(
        bpffs.mount_path, "/sys/fs/bpf",
        "pins must land in the host's bpffs"
    );
    assert_ne!(bpffs.read_only, Some(true), "pinning writes to bpffs");
    // Bidirectional is refused by the API server for unprivileged pods.
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));

    let cgroup = mount_of("/sys/fs/cgroup");
    assert_eq!(cgroup.read_only, Some(true));
    // Where the agent reads whether the BPF LSM (packet sockets) runs.
    let securityfs = mount_of("/sys/kernel/security");
    assert_eq!(securityfs.mount_path, "/sys/kernel/security");
    assert_eq!(securityfs.read_only, Some(true));
    let args = deploy.agent_container().args.as_deref().unwrap_or_default();
    // The last valid policy versions must outlive the pod, like the pins.
    let state = mount_of("/var/lib/portcullis");
    assert_ne!(state.read_only, Some(true), "the agent records state");
    assert!(
        args.contains(&format!("--state-dir={}", state.mount_path)),
        "the agent is not told where its durable state is mounted: {args:?}"
    );
    assert!(
        args.contains(&format!("--host-cgroup={}", cgroup.mount_path)),
        "the agent is not told where the host cgroup tree is mounted: {args:?}"
    );
    let env = deploy.agent_container().env.as_deref().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref());
    assert_eq!(field.map(|f| f.field_path.as_str()), Some("spec.nodeName"));
    assert!(
        args.iter().any(|a| a == "--node-name=$(NODE_NAME)"),
        "{args:?}"
    );
    // A new pod never runs unenforced: deny-until-programmed is on, and the
    // agent can find its own pod cgroup to exempt it.
    assert!(args.iter().any(|a| a == "--deny-unprogrammed"), "{args:?}");
    let field_of = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    assert_eq!(field_of("POD_UID").as_deref(), Some("metadata.uid"));
    assert_eq!(
        field_of("POD_NAMESPACE").as_deref(),
        Some("metadata.namespace")
    );
}

/// The container port a probe or Service targets.
fn resolve_port(container: &Container, port: &IntOrString) -> i32 {
    match port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .unwrap_or_else(|| panic!("no container port named {name}"))
                .container_port
        }
    }
}

/// Issue 9: the admin port is on the pod network and the agent's own pod is
/// exempt from enforcement, so no policy can guard it: the shipped agent
/// must serve it in secure mode, and with no way to turn /metrics open.
#[test]
fn daemonset_serves_metrics_only_to_authorized_callers_over_tls() {
    let deploy = Deploy::load();
    let args = deploy.agent_container().args.clone().unwrap_or_default();
    assert!(
        args.iter().any(|a| a == "--admin-secure"),
        "the admin endpoint listens on the pod network: it must run with --admin-secure: {args:?}"
    );
    let addr = args
        .iter()
        .find_map(|a| a.strip_prefix("--admin-addr="))
        .expect("--admin-addr");
    assert_ne!(addr, "none");
    // A certificate, when given, comes with its key (the agent refuses one
    // without the other; this keeps the manifest from trying).
    let has = |flag: &str| args.iter().any(|a| a.starts_with(flag));
    assert_eq!(has("--admin-tls-cert"), has("--admin-tls-key"), "{args:?}");

    // The agent may ask the API server who a token is and what it may do.
    let rules = deploy.cluster_role().rules.as_deref().unwrap();
    assert!(allows(
        rules,
        "authentication.k8s.io",
        "tokenreviews",
        "create"
    ));
    assert!(allows(
        rules,
        "authorization.k8s.io",
        "subjectaccessreviews",
        "create"
    ));
    // The reader role grants exactly `get /metrics`, and is what the scraper
    // is bound to.
    let reader = deploy.cluster_role_named(METRICS_READER);
    let reader_rules = reader.rules.as_deref().unwrap();
    assert_eq!(reader_rules.len(), 1, "{reader_rules:?}");
    assert_eq!(
        reader_rules[0].non_resource_urls.as_deref(),
        Some(&["/metrics".to_string()][..])
    );
    assert_eq!(reader_rules[0].verbs, ["get"]);
    assert!(reader_rules[0].resources.is_none() && reader_rules[0].api_groups.is_none());
    let bound = deploy.objects.iter().any(|(_, o)| {
        matches!(o, Object::ClusterRoleBinding(b)
            if b.role_ref.name == METRICS_READER && b.role_ref.kind == "ClusterRole")
    });
    assert!(
        bound,
        "nothing is bound to {METRICS_READER}: the PodMonitor would get 401/403"
    );

    // The PodMonitor scrapes over HTTPS with the scraper's token.
    let monitor = deploy
        .objects
        .iter()
        .find_map(|(_, o)| match o {
            Object::PodMonitor(v) => Some(v),
            _ => None,
        })
        .expect("a PodMonitor");
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["scheme"], "https", "{endpoint}");
    assert!(
        endpoint["tlsConfig"].is_object(),
        "no tlsConfig: {endpoint}"
    );
    let auth = &endpoint["authorization"];
    assert_eq!(auth["type"], "Bearer", "{endpoint}");
    let secret_name = auth["credentials"]["name"].as_str().expect("credentials");
    let secret = deploy
        .objects
        .iter()
        .find_map(|(_, o)| match o {
            Object::Secret(s) if s.metadata.name.as_deref() == Some(secret_name) => Some(s),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Secret {secret_name} for the PodMonitor's token"));
    assert_eq!(
        secret.type_.as_deref(),
        Some("kubernetes.io/service-account-token")
    );
    assert_eq!(auth["credentials"]["key"], "token");
    let account = secret.metadata.annotations.as_ref().unwrap()
        ["kubernetes.io/service-account.name"]
        .as_str();
    assert_eq!(account, SCRAPER);
}

#[test]
fn daemonset_probes_the_admin_port_and_runs_everywhere() {
    let deploy = Deploy::load();
    let c = deploy.agent_container();
    let probe_target = |probe: &Option<Probe>, what: &str| {
        let http = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("no HTTP {what} probe"));
        // The admin port speaks only TLS in secure mode.
        assert_eq!(http.scheme.as_deref(), Some("HTTPS"), "{what} probe");
        (
            resolve_port(c, &http.port),
            http.path.clone().unwrap_or_default(),
        )
    };
    assert_eq!(
        probe_target(&c.liveness_probe, "liveness"),
        (ADMIN_PORT, "/healthz".into())
    );
    assert_eq!(
        probe_target(&c.readiness_probe, "readiness"),
        (ADMIN_PORT, "/readyz".into())
    );
    assert!(
        c.args
            .iter()
            .flatten()
            .any(|a| a == &format!("--admin-addr=0.0.0.0:{ADMIN_PORT}")),
        "the admin server must listen where the kubelet probes it"
    );

    let resources = c.resources.as_ref().expect("resources");
    let requests = resources.requests.as_ref().expect("requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    assert!(resources
        .limits
        .as_ref()
        .is_some_and(|l| l.contains_key("memory")));

    let spec = deploy.daemonset().spec.as_ref().unwrap();
    let strategy = spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().unwrap();
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));

    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "must tolerate every taint, or some nodes run unenforced"
    );
    let selector = spec.selector.match_labels.as_ref().unwrap();
    let labels = deploy.pod_labels();
    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
}

#[test]
fn service_and_podmonitor_reach_the_agents_metrics() {
    let deploy = Deploy::load();
    let pod_labels = deploy.pod_labels();
    let c = deploy.agent_container();
    let is_subset = |sel: &BTreeMap<String, String>, of: &BTreeMap<String, String>| {
        !sel.is_empty() && sel.iter().all(|(k, v)| of.get(k) == Some(v))
    };

    let service = deploy
        .objects
        .iter()
        .find_map(|(_, o)| match o {
            Object::Service(s) => Some(s),
            _ => None,
        })
        .expect("a Service");
    let spec = service.spec.as_ref().unwrap();
    assert!(
        is_subset(spec.selector.as_ref().unwrap(), &pod_labels),
        "the Service selects no agent pod"
    );
    let port = &spec.ports.as_ref().unwrap()[0];
    assert_eq!(
        resolve_port(c, port.target_port.as_ref().unwrap()),
        ADMIN_PORT
    );
    let service_labels = service.metadata.labels.clone().unwrap_or_default();

    let monitor = deploy
        .objects
        .iter()
        .find_map(|(_, o)| match o {
            Object::PodMonitor(v) => Some(v),
            _ => None,
        })
        .expect("a PodMonitor");
    let selector: BTreeMap<String, String> =
        serde_json::from_value(monitor["spec"]["selector"]["matchLabels"].clone())
            .expect("PodMonitor selector.matchLabels");
    assert!(
        is_subset(&selector, &pod_labels),
        "the PodMonitor selects no agent pod"
    );
    assert!(
        is_subset(&selector, &service_labels),
        "the PodMonitor and the Service disagree on the agent's labels"
    );
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    let port = IntOrString::String(endpoint["port"].as_str().expect("named port").into());
    assert_eq!(resolve_port(c, &port), ADMIN_PORT);
    assert_eq!(endpoint["path"], "/metrics");
}

fn allows(rules: &[PolicyRule], group: &str, resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        r.api_groups.iter().flatten().any(|g| g == group)
            && r.resources.iter().flatten().any(|x| x == resource)
            && r.verbs.iter().any(|v| v == verb)
    })
}

#[test]
fn cluster_role_is_least_privilege() {
    let deploy = Deploy::load();
    let rules = deploy.cluster_role().rules.as_deref().unwrap();
    for r in rules {
        let all = r
            .verbs
            .iter()
            .chain(r.resources.iter().flatten())
            .chain(r.api_groups.iter().flatten());
        for s in all {
            assert!(!s.contains('*'), "wildcard {s:?} in {r:?}");
        }
        assert!(r.non_resource_urls.is_none(), "{r:?}");
        assert!(r.resource_names.is_none(), "{r:?}");
        for v in &r.verbs {
            assert!(
                !["escalate", "bind", "impersonate"].contains(&v.as_str()),
                "{r:?}"
            );
        }
        for res in r.resources.iter().flatten() {
            assert!(res != "secrets", "the agent needs no Secrets cluster-wide");
        }
        let core = r.api_groups.iter().flatten().any(|g| g.is_empty());
        let writes = r
            .verbs
            .iter()
            .any(|v| !["get", "list", "watch"].contains(&v.as_str()));
        if core && writes {
            assert_eq!(
                r.resources.as_deref(),
                Some(&["events".to_string()][..]),
                "write verbs on core resources other than events: {r:?}"
            );
        }
    }
    // Everything the kube source watches is readable.
    for (group, resource) in [
        ("", "pods"),
        ("", "namespaces"),
        ("", "nodes"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("networking.k8s.io", "networkpolicies"),
        ("portcullis.dev", "l4policies"),
        ("portcullis.dev", "clusterl4policies"),
    ] {
        for verb in ["get", "list", "watch"] {
            assert!(
                allows(rules, group, resource, verb),
                "cannot {verb} {resource}.{group}"
            );
        }
        assert!(
            !allows(rules, group, resource, "update") && !allows(rules, group, resource, "patch"),
            "{resource}.{group} is writable beyond its status"
        );
    }
    for resource in ["l4policies/status", "clusterl4policies/status"] {
        assert!(allows(rules, "portcullis.dev", resource, "patch"));
    }
    assert!(allows(rules, "", "events", "create"));

    let role = deploy
        .objects
        .iter()
        .find_map(|(_, o)| match o {
            Object::Role(r) => Some(r),
            _ => None,
        })
        .expect("a Role for leader election");
    let role_rules = role.rules.as_deref().unwrap();
    assert_eq!(role_rules.len(), 1, "the Role is only for Leases");
    for verb in ["get", "create", "update"] {
        assert!(allows(role_rules, "coordination.k8s.io", "leases", verb));
    }
    assert!(
        !allows(rules, "coordination.k8s.io", "leases", "update"),
        "Leases cluster-wide"
    );
}
