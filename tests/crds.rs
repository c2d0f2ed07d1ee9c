//! Our CRDs, manifests and examples as a real kube-apiserver judges them,
//! through kubectl as a user runs it (`kubectl apply`, whose field
//! validation is Strict by default): the CRDs install structural and are
//! served; every CEL rule and schema check rejects what it should with an
//! answer naming the field, and accepts the smallest fix (the agent, parsing
//! the same object, agrees on both); and every object we ship in deploy/,
//! docs/ and the README is accepted.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Output,
};

use k8s_openapi::{
    api::core::v1::Namespace,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::api::{Api, PostParams};
use portcullis_agent::{
    identity::revocation::RevocationEntry,
    policy::{model::is_valid_port_name, parse::parse_policies},
};
use portcullis_tests::kube_api::{self, ControlPlane};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What `kubectl apply --dry-run=server` says to `yaml`.
fn dry_run(plane: &ControlPlane, yaml: &str) -> Output {
    plane.kubectl_with_input(&["apply", "--dry-run=server", "-f", "-"], yaml)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts kubectl succeeded and reported `objects` objects, one a line.
fn assert_applied(what: &str, out: &Output, objects: usize) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "{what}: the server refused it:\n{stderr}{stdout}"
    );
    assert_eq!(
        stdout.lines().count(),
        objects,
        "{what}: expected {objects} objects applied:\n{stdout}{stderr}"
    );
}

/// Every object of a (multi-document) YAML text, empty documents left out.
fn objects(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap_or_else(|e| panic!("not YAML: {e}\n{yaml}"))
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

fn is_object(doc: &Value) -> bool {
    doc["apiVersion"].is_string() && doc["kind"].is_string()
}

fn is_kustomize_input(doc: &Value) -> bool {
    doc["apiVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("kustomize.config.k8s.io/"))
}

/// Creates the namespaces `objects` live in (tests share them).
async fn create_namespaces(plane: &ControlPlane, objects: &[Value]) {
    let api: Api<Namespace> = Api::all(plane.client().await);
    let names: BTreeSet<&str> = objects
        .iter()
        .filter_map(|o| o["metadata"]["namespace"].as_str())
        .collect();
    for name in names {
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &namespace).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_already_exists() => {}
            Err(e) => panic!("creating namespace {name}: {e}"),
        }
    }
}

fn crd_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/crds"))
        .expect("deploy/crds")
        .map(|e| e.expect("a directory entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 2, "expected our CRDs in deploy/crds");
    files
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_crds_install_structural_and_are_served() {
    let plane = kube_api::shared().await;
    let crds: Api<CustomResourceDefinition> = Api::all(plane.client().await);
    for path in crd_files() {
        let file = &objects(&read(&path))[0];
        let name = file["metadata"]["name"].as_str().expect("a CRD name");
        let served = crds.get(name).await.expect("our CRD on the server");
        let status = served.status.expect("a CRD status");
        let conditions = status.conditions.unwrap_or_default();
        for wanted in ["Established", "NamesAccepted"] {
            assert!(
                conditions
                    .iter()
                    .any(|c| c.type_ == wanted && c.status == "True"),
                "{name}: not {wanted}: {conditions:?}"
            );
        }
        assert!(
            !conditions.iter().any(|c| c.type_ == "NonStructuralSchema"),
            "{name}: the server finds the schema non-structural: {conditions:?}"
        );
        // Every name we ask for was granted: kind, plural, short names.
        let names = &file["spec"]["names"];
        let accepted = serde_json::to_value(&status.accepted_names).unwrap();
        for field in ["kind", "plural", "shortNames"] {
            assert_eq!(accepted[field], names[field], "{name}: {field}");
        }
        // The server takes the file again without a warning (an unknown
        // format, a deprecated field, ...).
        let out =
            plane.kubectl_with_input(&["replace", "--dry-run=server", "-f", "-"], &read(&path));
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        assert_eq!(text(&out.stderr), "", "{name}: warnings");
        // An object of each kind is stored, and kubectl lists it by plural
        // and by short name.
        let object = match names["kind"].as_str().unwrap() {
            "L4Policy" => l4("{podSelector: {}}"),
            "ClusterL4Policy" => cluster("{tier: Baseline, priority: 1000}"),
            "PortcullisRevocation" => revocation("{serial: '0a:1b', reason: served}"),
            other => panic!("{other}: add a minimal object here"),
        }
        .replace("name: case", "name: served");
        let created = plane.kubectl_with_input(&["create", "-f", "-"], &object);
        assert_applied(name, &created, 1);
        let mut lists = vec![names["plural"].as_str().unwrap()];
        lists.extend(
            names["shortNames"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap()),
        );
        for list in lists {
            let out =
                plane.kubectl_with_input(&["get", list, "--all-namespaces", "-o", "name"], "");
            assert!(
                out.status.success() && text(&out.stdout).contains("/served\n"),
                "kubectl get {list}: {}{}",
                text(&out.stdout),
                text(&out.stderr)
            );
        }
        let deleted = plane.kubectl_with_input(&["delete", "-f", "-"], &object);
        assert_applied(name, &deleted, 1);
    }
}

/// The header of the ClusterL4Policy and L4Policy objects below.
const CLUSTER: &str =
    "apiVersion: portcullis.dev/v1alpha1\nkind: ClusterL4Policy\nmetadata: {name: case}\n";
const L4: &str =
    "apiVersion: portcullis.dev/v1alpha1\nkind: L4Policy\nmetadata: {name: case, namespace: default}\n";

fn cluster(spec: &str) -> String {
    format!("{CLUSTER}spec: {spec}\n")
}

fn l4(spec: &str) -> String {
    format!("{L4}spec: {spec}\n")
}

const REVOCATION: &str =
    "apiVersion: portcullis.dev/v1alpha1\nkind: PortcullisRevocation\nmetadata: {name: case}\n";

fn revocation(spec: &str) -> String {
    format!("{REVOCATION}spec: {spec}\n")
}

/// An object that breaks one rule of our CRDs, next to the smallest change
/// that keeps it.
struct Pair {
    breaks: String,
    keeps: String,
    /// What `kubectl apply` answers to `breaks`: each names the field.
    answer: &'static [&'static str],
}

fn pair(breaks: String, keeps: String, answer: &'static [&'static str]) -> Pair {
    Pair {
        breaks,
        keeps,
        answer,
    }
}

/// Every rule a user can break, CEL or schema.
fn pairs() -> Vec<Pair> {
    vec![
        // CEL.
        pair(
            cluster("{tier: Baseline, priority: 10, egress: [{action: Pass}]}"),
            cluster("{tier: Admin, priority: 10, egress: [{action: Pass}]}"),
            &["spec: Invalid value: action Pass is only allowed in tier Admin"],
        ),
        pair(
            cluster("{tier: Baseline, priority: 10, ingress: [{action: Deny}, {action: Pass}]}"),
            cluster("{tier: Baseline, priority: 10, ingress: [{action: Deny}, {action: Allow}]}"),
            &["spec: Invalid value: action Pass is only allowed in tier Admin"],
        ),
        pair(
            revocation("{spiffeId: spiffe://cluster.local/ns/a/sa/b, serial: '0a'}"),
            revocation("{spiffeId: spiffe://cluster.local/ns/a/sa/b}"),
            &["spec: Invalid value: set exactly one of spiffeId and serial"],
        ),
        pair(
            revocation("{reason: forgot the target}"),
            revocation("{serial: '0a:1b', reason: forgot the target}"),
            &["spec: Invalid value: set exactly one of spiffeId and serial"],
        ),
        pair(
            revocation("{serial: 'not hex'}"),
            revocation("{serial: '0x0a1b'}"),
            &["spec.serial: Invalid value"],
        ),
        // Enumerations.
        pair(
            cluster("{tier: Gold, priority: 10}"),
            cluster("{tier: Baseline, priority: 10}"),
            &[r#"spec.tier: Unsupported value: "Gold""#],
        ),
        pair(
            cluster("{tier: Admin, priority: 10, ingress: [{action: Reject}]}"),
            cluster("{tier: Admin, priority: 10, ingress: [{action: Deny}]}"),
            &[r#"spec.ingress[0].action: Unsupported value: "Reject""#],
        ),
        pair(
            cluster("{tier: Admin, priority: 10, egress: [{action: Deny, ports: [{protocol: ICMP}]}]}"),
            cluster("{tier: Admin, priority: 10, egress: [{action: Deny, ports: [{protocol: SCTP}]}]}"),
            &[r#"spec.egress[0].ports[0].protocol: Unsupported value: "ICMP""#],
        ),
        pair(
            l4("{podSelector: {}, mode: DryRun}"),
            l4("{podSelector: {}, mode: Audit}"),
            &[r#"spec.mode: Unsupported value: "DryRun""#],
        ),
        pair(
            l4("{podSelector: {}, policyTypes: [Ingress, Both]}"),
            l4("{podSelector: {}, policyTypes: [Ingress, Egress]}"),
            &[r#"spec.policyTypes[1]: Unsupported value: "Both""#],
        ),
        // Required fields.
        pair(
            cluster("{priority: 10}"),
            cluster("{priority: 10, tier: Admin}"),
            &["spec.tier: Required value"],
        ),
        pair(
            cluster("{tier: Admin}"),
            cluster("{tier: Admin, priority: 10}"),
            &["spec.priority: Required value"],
        ),
        pair(
            cluster("{tier: Admin, priority: 10, egress: [{to: [{podSelector: {}}]}]}"),
            cluster("{tier: Admin, priority: 10, egress: [{action: Allow, to: [{podSelector: {}}]}]}"),
            &["spec.egress[0].action: Required value"],
        ),
        pair(
            L4.to_string(),
            l4("{podSelector: {}}"),
            &["spec: Required value"],
        ),
        pair(
            l4("{mode: Audit}"),
            l4("{mode: Audit, podSelector: {}}"),
            &["spec.podSelector: Required value"],
        ),
        pair(
            l4("{podSelector: {}, egressDeny: [{to: [{ipBlock: {except: [10.1.0.0/16]}}]}]}"),
            l4("{podSelector: {}, egressDeny: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]}]}"),
            &["spec.egressDeny[0].to[0].ipBlock.cidr: Required value"],
        ),
        pair(
            l4("{podSelector: {matchExpressions: [{key: app}]}}"),
            l4("{podSelector: {matchExpressions: [{key: app, operator: Exists}]}}"),
            &["spec.podSelector.matchExpressions[0].operator: Required value"],
        ),
        // Ranges.
        pair(
            cluster("{tier: Admin, priority: 1001}"),
            cluster("{tier: Admin, priority: 1000}"),
            &["spec.priority: Invalid value: 1001", "less than or equal to 1000"],
        ),
        pair(
            cluster("{tier: Admin, priority: -1}"),
            cluster("{tier: Admin, priority: 0}"),
            &["spec.priority: Invalid value: -1", "greater than or equal to 0"],
        ),
        pair(
            cluster("{tier: Admin, priority: 10, egress: [{action: Deny, ports: [{port: 1, endPort: 70000}]}]}"),
            cluster("{tier: Admin, priority: 10, egress: [{action: Deny, ports: [{port: 1, endPort: 65535}]}]}"),
            &["spec.egress[0].ports[0].endPort: Invalid value: 70000", "less than or equal to 65535"],
        ),
        // Ports: number bounds for numbers, a pattern for names.
        pair(
            cluster("{tier: Admin, priority: 10, egress: [{action: Deny, ports: [{port: 70000}]}]}"),
            cluster("{tier: Admin, priority: 10, egress: [{action: Deny, ports: [{port: 65535}]}]}"),
            &["spec.egress[0].ports[0].port: Invalid value: 70000", "less than or equal to 65535"],
        ),
        pair(
            l4("{podSelector: {}, ingress: [{ports: [{port: 0}]}]}"),
            l4("{podSelector: {}, ingress: [{ports: [{port: 1}]}]}"),
            &["spec.ingress[0].ports[0].port: Invalid value: 0", "greater than or equal to 1"],
        ),
        pair(
            l4("{podSelector: {}, ingress: [{ports: [{port: HTTP}]}]}"),
            l4("{podSelector: {}, ingress: [{ports: [{port: http}]}]}"),
            &[r#"spec.ingress[0].ports[0].port: Invalid value: "HTTP""#, "should match"],
        ),
        pair(
            l4("{podSelector: {}, ingress: [{ports: [{port: metrics-http-tls}]}]}"),
            l4("{podSelector: {}, ingress: [{ports: [{port: metrics-https}]}]}"),
            &["spec.ingress[0].ports[0].port: Too long"],
        ),
        // CEL on ports, peers and selectors, in both kinds.
        pair(
            l4("{podSelector: {}, egressDeny: [{ports: [{port: http, endPort: 90}]}]}"),
            l4("{podSelector: {}, egressDeny: [{ports: [{port: 80, endPort: 90}]}]}"),
            &["spec.egressDeny[0].ports[0].endPort: Invalid value: endPort needs a numeric port"],
        ),
        pair(
            cluster("{tier: Admin, priority: 10, ingress: [{action: Allow, ports: [{endPort: 90}]}]}"),
            cluster("{tier: Admin, priority: 10, ingress: [{action: Allow, ports: [{port: 80, endPort: 90}]}]}"),
            &["spec.ingress[0].ports[0].endPort: Invalid value: endPort needs a numeric port"],
        ),
        pair(
            l4("{podSelector: {}, ingressDeny: [{from: [{}]}]}"),
            l4("{podSelector: {}, ingressDeny: [{from: [{namespaceSelector: {}}]}]}"),
            &["spec.ingressDeny[0].from[0]: Invalid value: a peer is an ipBlock, a podSelector and/or namespaceSelector, or an identity"],
        ),
        pair(
            l4("{podSelector: {}, ingress: [{from: [{identity: {namespace: shop}, podSelector: {}}]}]}"),
            l4("{podSelector: {}, ingress: [{from: [{identity: {namespace: shop}}, {podSelector: {}}]}]}"),
            &["spec.ingress[0].from[0]: Invalid value: a peer is an ipBlock, a podSelector and/or namespaceSelector, or an identity"],
        ),
        pair(
            l4("{podSelector: {}, ingress: [{from: [{identity: {namespace: shop, spiffeId: 'spiffe://cluster.local/ns/y/sa/a'}}]}]}"),
            l4("{podSelector: {}, ingress: [{from: [{identity: {spiffeId: 'spiffe://cluster.local/ns/y/sa/a'}}]}]}"),
            &["spec.ingress[0].from[0].identity: Invalid value: an identity is a spiffeId or a namespace"],
        ),
        pair(
            cluster("{tier: Admin, priority: 10, ingress: [{action: Allow, from: [{identity: {}}]}]}"),
            cluster("{tier: Admin, priority: 10, ingress: [{action: Allow, from: [{identity: {namespace: shop}}]}]}"),
            &["spec.ingress[0].from[0].identity: Invalid value: an identity is a spiffeId or a namespace"],
        ),
        pair(
            cluster("{tier: Admin, priority: 10, egress: [{action: Deny, to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]}"),
            cluster("{tier: Admin, priority: 10, egress: [{action: Deny, to: [{ipBlock: {cidr: 10.0.0.0/8}}, {podSelector: {}}]}]}"),
            &["spec.egress[0].to[0]: Invalid value: a peer is an ipBlock, a podSelector and/or namespaceSelector, or an identity"],
        ),
        pair(
            l4("{podSelector: {matchExpressions: [{key: app, operator: Matches, values: [web]}]}}"),
            l4("{podSelector: {matchExpressions: [{key: app, operator: In, values: [web]}]}}"),
            &[r#"spec.podSelector.matchExpressions[0].operator: Unsupported value: "Matches""#],
        ),
        pair(
            l4("{podSelector: {matchExpressions: [{key: app, operator: NotIn, values: []}]}}"),
            l4("{podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [web]}]}}"),
            &["spec.podSelector.matchExpressions[0].values: Invalid value: operators In and NotIn need values, Exists and DoesNotExist take none"],
        ),
        pair(
            cluster("{tier: Admin, priority: 10, subject: {namespaceSelector: {matchExpressions: [{key: team, operator: Exists, values: [shop]}]}}}"),
            cluster("{tier: Admin, priority: 10, subject: {namespaceSelector: {matchExpressions: [{key: team, operator: Exists}]}}}"),
            &["spec.subject.namespaceSelector.matchExpressions[0].values: Invalid value: operators In and NotIn need values, Exists and DoesNotExist take none"],
        ),
        // Unknown fields: kubectl's default field validation is Strict.
        pair(
            cluster("{tier: Admin, priority: 10, egres: [{action: Deny}]}"),
            cluster("{tier: Admin, priority: 10, egress: [{action: Deny}]}"),
            &[r#"unknown field "spec.egres""#],
        ),
        pair(
            l4("{podSelector: {}, ingress: [{ports: [{prot: UDP}]}]}"),
            l4("{podSelector: {}, ingress: [{ports: [{protocol: UDP}]}]}"),
            &[r#"unknown field "spec.ingress[0].ports[0].prot""#],
        ),
        // Names.
        pair(
            cluster("{tier: Admin, priority: 10}").replace("name: case", "name: Case_1"),
            cluster("{tier: Admin, priority: 10}").replace("name: case", "name: case-1"),
            &[r#"metadata.name: Invalid value: "Case_1""#],
        ),
    ]
}

/// The messages of every CEL rule in our CRDs, by kind.
fn cel_rules() -> BTreeSet<(String, String)> {
    fn walk(kind: &str, schema: &Value, rules: &mut BTreeSet<(String, String)>) {
        match schema {
            Value::Object(map) => {
                for rule in map
                    .get("x-kubernetes-validations")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let message = rule["message"].as_str().expect("every rule has a message");
                    rules.insert((kind.to_string(), message.to_string()));
                }
                map.values().for_each(|v| walk(kind, v, rules));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(kind, v, rules)),
            _ => {}
        }
    }
    let mut rules = BTreeSet::new();
    for path in crd_files() {
        let crd = &objects(&read(&path))[0];
        let kind = crd["spec"]["names"]["kind"].as_str().expect("a kind");
        walk(kind, &crd["spec"]["versions"], &mut rules);
    }
    rules
}

fn kind_of(yaml: &str) -> String {
    objects(yaml)[0]["kind"]
        .as_str()
        .expect("a kind")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_rejects_with_an_answer_naming_the_field_and_accepts_the_fix() {
    let plane = kube_api::shared().await;
    let pairs = pairs();
    // No CEL rule without a case here.
    let mut untested = cel_rules();
    assert!(!untested.is_empty(), "expected CEL rules in deploy/crds");
    for pair in &pairs {
        let kind = kind_of(&pair.breaks);
        untested.retain(|(k, message)| {
            !(k == &kind && pair.answer.iter().any(|a| a.contains(message.as_str())))
        });
    }
    assert!(
        untested.is_empty(),
        "CEL rules without a case: {untested:?}"
    );

    for Pair {
        breaks,
        keeps,
        answer,
    } in &pairs
    {
        let out = dry_run(plane, breaks);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "the server accepted:\n{breaks}");
        for fragment in *answer {
            assert!(
                stderr.contains(fragment),
                "the answer to\n{breaks}\nlacks {fragment:?}:\n{stderr}"
            );
        }
        assert_applied(keeps, &dry_run(plane, keeps), 1);

        let agent = |yaml: &str| -> Result<(), String> {
            if kind_of(yaml) == "PortcullisRevocation" {
                // What the CA and agents read of a revocation.
                let object: Value = objects(yaml).remove(0);
                let entry: RevocationEntry =
                    serde_json::from_value(object["spec"].clone()).map_err(|e| e.to_string())?;
                entry.revoked().map(drop)
            } else {
                parse_policies(Path::new("case.yaml"), yaml)
                    .map(drop)
                    .map_err(|e| format!("{e:?}"))
            }
        };
        assert!(agent(breaks).is_err(), "the agent accepts:\n{breaks}");
        if let Err(e) = agent(keeps) {
            panic!("the agent rejects\n{keeps}\n{e:?}");
        }
    }
}

/// Objects the API server accepts and the agent rejects: the agent
/// reports them in the object's status (Accepted False, reason Invalid) and
/// keeps enforcing its last valid version. A check moved into the CRD
/// moves its case into [`pairs`].
fn only_the_agent_rejects() -> Vec<String> {
    let egress = |rule: &str| l4(&format!("{{podSelector: {{}}, egress: [{rule}]}}"));
    vec![
        // CEL's cost budget: see NetworkPolicyPort in the agent.
        egress("{ports: [{port: 90, endPort: 80}]}"),
        // CIDRs: CEL's IP library needs Kubernetes 1.31.
        egress("{to: [{ipBlock: {cidr: 10.0.0.0/33}}]}"),
        egress("{to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}"),
        egress("{to: [{ipBlock: {cidr: '::ffff:10.0.0.0/104'}}]}"),
        // Label syntax: regexes over strings of unbounded length, which
        // the cost budget refuses.
        egress("{to: [{podSelector: {matchLabels: {'app name': web}}}]}"),
        egress("{to: [{podSelector: {matchLabels: {app: -web}}}]}"),
        egress("{to: [{podSelector: {matchExpressions: [{key: '', operator: Exists}]}}]}"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_only_the_agent_rejects() {
    let plane = kube_api::shared().await;
    for yaml in only_the_agent_rejects() {
        assert_applied(&yaml, &dry_run(plane, &yaml), 1);
        assert!(
            parse_policies(Path::new("case.yaml"), &yaml).is_err(),
            "the agent accepts it too: move it to pairs()\n{yaml}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_and_the_agent_agree_on_port_names() {
    let plane = kube_api::shared().await;
    let names = [
        "http",
        "h2c",
        "a",
        "8a",
        "serve-80-tcp",
        "a23456789012345",
        "",
        "80",
        "HTTP",
        "-http",
        "http-",
        "ht--tp",
        "a_b",
        "a234567890123456",
    ];
    for name in names {
        let yaml = l4(&format!(
            "{{podSelector: {{}}, ingress: [{{ports: [{{port: '{name}'}}]}}]}}"
        ));
        let server = dry_run(plane, &yaml).status.success();
        let agent = parse_policies(Path::new("case.yaml"), &yaml).is_ok();
        assert_eq!(
            server, agent,
            "port name {name:?}: server {server}, agent {agent}"
        );
        assert_eq!(agent, is_valid_port_name(name), "port name {name:?}");
    }
}

/// The ```` ```yaml ```` blocks of a Markdown file, with their first line
/// number; ```` ```yaml fragment ```` (part of a spec) and
/// ```` ```yaml workloads ```` (a standalone workloads file) are left out.
fn yaml_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in markdown.lines().enumerate() {
        let fence = line.trim_start();
        match &mut current {
            None if fence == "```yaml" => current = Some((n + 2, String::new())),
            Some(_) if fence.starts_with("```") => blocks.extend(current.take()),
            Some((_, block)) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_in_the_docs_is_accepted() {
    let plane = kube_api::shared().await;
    let mut files = vec![repo().join("README.md")];
    for entry in std::fs::read_dir(repo().join("docs")).expect("docs/") {
        let path = entry.expect("a directory entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    let mut examples = 0;
    for path in files {
        for (line, block) in yaml_blocks(&read(&path)) {
            let docs = objects(&block);
            let at = format!("{}:{line}", path.strip_prefix(repo()).unwrap().display());
            // The README's topology and workloads files are for the
            // standalone agent, not the API server.
            if !docs.iter().any(is_object) {
                eprintln!("{at}: not Kubernetes objects, not applied");
                continue;
            }
            // Kustomize's own files are `kubectl apply -k` input, rendered
            // and applied by the tests of what they install.
            if docs.iter().all(is_kustomize_input) {
                eprintln!("{at}: kustomize's input, not applied");
                continue;
            }
            assert!(
                docs.iter().all(is_object),
                "{at}: a block mixing Kubernetes objects and other YAML"
            );
            create_namespaces(plane, &docs).await;
            assert_applied(&at, &dry_run(plane, &block), docs.len());
            examples += docs.len();
        }
    }
    // docs/policy.md alone has 7.
    assert!(examples >= 7, "only {examples} example objects found");
}

/// Files under deploy/ that hold no object for the API server.
const NOT_OBJECTS: [(&str, &str); 6] = [
    (
        "kustomization.yaml",
        "kustomize's input: see kubectl_apply_k_deploy_installs",
    ),
    (
        "ca/kustomization.yaml",
        "kustomize's input: tests/identity_ca.rs renders and applies it",
    ),
    (
        "identity/kustomization.yaml",
        "a kustomize Component: tests/identity_ca.rs renders and applies it",
    ),
    (
        "identity/agent-ca-access.yaml",
        "a JSON patch of the agent DaemonSet, applied by the identity Component",
    ),
    (
        "monitoring/kustomization.yaml",
        "kustomize's input: see kubectl_apply_k_deploy_installs",
    ),
    (
        "prometheus/rules.yaml",
        "a Prometheus rule file; tests/prometheus.rs loads it into a real Prometheus",
    ),
];

/// The Prometheus Operator's PodMonitor and PrometheusRule kinds, so the
/// server can take deploy/monitoring. Stand-ins: the operator's CRDs are
/// not ours to ship, so the server checks these objects' metadata and
/// scope, not their specs.
const OPERATOR_STAND_INS: &str = "
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: podmonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  names: {kind: PodMonitor, plural: podmonitors, singular: podmonitor}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: prometheusrules.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  names: {kind: PrometheusRule, plural: prometheusrules, singular: prometheusrule}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
";

fn install_operator_stand_ins(plane: &ControlPlane) {
    let out = plane.kubectl_with_input(&["apply", "-f", "-"], OPERATOR_STAND_INS);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = plane.kubectl_with_input(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/podmonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com",
        ],
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Every YAML file under `dir`, relative to it, sorted.
fn yaml_files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, files: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(root, &path, files);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let relative = path.strip_prefix(root).unwrap();
                files.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, dir, &mut files);
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_manifest_and_example_in_deploy_is_accepted() {
    let plane = kube_api::shared().await;
    let deploy = repo().join("deploy");
    let namespace =
        plane.kubectl_with_input(&["apply", "-f", "-"], &read(&deploy.join("namespace.yaml")));
    assert!(namespace.status.success(), "{}", text(&namespace.stderr));
    install_operator_stand_ins(plane);
    let files = yaml_files(&deploy);
    for (file, why) in NOT_OBJECTS {
        assert!(files.iter().any(|f| f == file), "deploy/{file} is gone");
        eprintln!("deploy/{file}: not applied: {why}");
    }
    let mut applied = 0;
    for file in files
        .iter()
        .filter(|f| !NOT_OBJECTS.iter().any(|(n, _)| n == f))
    {
        let yaml = read(&deploy.join(file));
        let docs = objects(&yaml);
        assert!(
            !docs.is_empty() && docs.iter().all(is_object),
            "deploy/{file}: not Kubernetes objects; if that is meant, add it to NOT_OBJECTS"
        );
        create_namespaces(plane, &docs).await;
        assert_applied(
            &format!("deploy/{file}"),
            &dry_run(plane, &yaml),
            docs.len(),
        );
        applied += 1;
    }
    assert!(
        applied >= 10,
        "only {applied} manifests found under deploy/"
    );
}

/// `kubectl apply -k dir` for real: every object of the kustomization
/// is applied and then on the server, and applying it again (an upgrade)
/// passes.
fn apply_kustomization(plane: &ControlPlane, dir: &Path) {
    let kustomization = &objects(&read(&dir.join("kustomization.yaml")))[0];
    let objects_in_it: usize = kustomization["resources"]
        .as_array()
        .expect("kustomization resources")
        .iter()
        .map(|file| objects(&read(&dir.join(file.as_str().expect("a file name")))).len())
        .sum();
    let dir = dir.to_str().expect("a UTF-8 path");
    let apply = plane.kubectl_with_input(&["apply", "-k", dir], "");
    assert_applied(&format!("apply -k {dir}"), &apply, objects_in_it);
    let on_server = plane.kubectl_with_input(&["get", "-k", dir, "-o", "name"], "");
    assert_applied(&format!("get -k {dir}"), &on_server, objects_in_it);
    let again = plane.kubectl_with_input(&["apply", "-k", dir, "--dry-run=server"], "");
    assert_applied(&format!("apply -k {dir} again"), &again, objects_in_it);
}

/// The install the README gives, on a cluster of its own and for real: a
/// server-side dry run cannot take it on a fresh cluster, as it does not
/// create the namespace the rest goes into.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_k_deploy_installs() {
    let plane = ControlPlane::start().await.expect("a control plane");
    let deploy = repo().join("deploy");
    apply_kustomization(&plane, &deploy);
    // Then, on clusters with the Prometheus Operator, its monitoring.
    install_operator_stand_ins(&plane);
    apply_kustomization(&plane, &deploy.join("monitoring"));
}
