//! End to end on a real cluster (issue 5): install the DaemonSet from
//! `deploy/` with the image in `PORTCULLIS_IMAGE`, then check on real pods
//! that a NetworkPolicy and L4Policies are enforced (by pod IP and through a
//! ClusterIP), that an invalid L4Policy is reported, and that the agents
//! count the drops.
//!
//! Ignored because CI has no cluster; how to run it with kind is in
//! docs/kubernetes.md. The cluster is driven with `kubectl`, which every
//! cluster user has, so this test needs no Kubernetes client crate.

use std::{
    collections::BTreeMap,
    path::{Component, Path, PathBuf},
    process::{Command, Output, Stdio},
    thread::sleep,
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;

const AGENT_NAMESPACE: &str = "portcullis-system";
const AGENT_DAEMONSET: &str = "portcullis-agent";
const AGENT_SELECTOR: &str = "app.kubernetes.io/name=portcullis,app.kubernetes.io/component=agent";
/// The admin port of deploy/daemonset.yaml (`--admin-addr=0.0.0.0:8443
/// --admin-secure`: HTTPS, /metrics for authorized bearer tokens only).
const AGENT_ADMIN_PORT: u16 = 8443;
/// The ServiceAccount deploy/monitoring/scraper.yaml lets read /metrics.
const SCRAPER_ACCOUNT: &str = "portcullis-metrics-scraper";
const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.53";
const SERVER_PORT: u16 = 8080;
/// Watch latency plus at least two 3 s connection attempts.
const PROPAGATION: Duration = Duration::from_secs(15);
/// Events and conditions come from whichever agent holds the status Lease.
const REPORTING: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- kubectl

/// Runs kubectl, optionally feeding `stdin`; fails the test if kubectl is
/// missing, never if the command itself fails (callers decide).
fn kubectl_output(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write as _;
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run kubectl ({e}): install it and put it on PATH (docs/kubernetes.md)")
        });
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

/// Runs kubectl and returns its stdout; fails the test with kubectl's
/// stderr if it fails.
fn kubectl(args: &[&str]) -> String {
    checked(args, kubectl_output(args, None))
}

/// `kubectl apply -f -` of a manifest.
fn apply(manifest: &str) {
    let args = ["apply", "-f", "-"];
    checked(&args, kubectl_output(&args, Some(manifest)));
}

fn checked(args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "kubectl {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8(out.stdout).unwrap()
}

fn kubectl_json(args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    serde_json::from_str(&kubectl(&args)).unwrap()
}

/// Fails early, naming what is missing, before anything is installed.
fn preflight() -> String {
    let image = std::env::var("PORTCULLIS_IMAGE").unwrap_or_default();
    assert!(
        !image.is_empty(),
        "PORTCULLIS_IMAGE is not set: the agent image to install, e.g. portcullis:dev \
         loaded into kind (see docs/kubernetes.md)"
    );
    let context = kubectl_output(&["config", "current-context"], None);
    assert!(
        context.status.success(),
        "kubectl has no current context: set KUBECONFIG or create a cluster \
         (kind create cluster); kubectl said: {}",
        String::from_utf8_lossy(&context.stderr).trim()
    );
    let context = String::from_utf8_lossy(&context.stdout).trim().to_string();
    let ready = kubectl_output(&["get", "--raw", "/readyz"], None);
    assert!(
        ready.status.success(),
        "the API server of context {context:?} is not reachable: {}",
        String::from_utf8_lossy(&ready.stderr).trim()
    );
    eprintln!("kube_e2e: context {context}, image {image}");
    image
}

/// Polls `check` until it returns `Some` or `timeout` passes.
fn eventually<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(Duration::from_secs(1));
    }
}

fn keep_install() -> bool {
    std::env::var("PORTCULLIS_E2E_KEEP").is_ok_and(|v| v == "1")
}

// ---------------------------------------------------------------- install

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The image name (without tag) deploy/daemonset.yaml runs, which the
/// overlay's `images:` entry must name to replace it.
fn deployed_image_name() -> String {
    let text = std::fs::read_to_string(repo().join("deploy/daemonset.yaml")).unwrap();
    let ds: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
    let image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .expect("deploy/daemonset.yaml: no container image")
        .to_string();
    split_image(&image).0
}

/// `name[:tag]` or `name@digest` → (name, tag, digest). A ':' before the
/// last '/' belongs to a registry port, not a tag.
fn split_image(image: &str) -> (String, Option<String>, Option<String>) {
    if let Some((name, digest)) = image.split_once('@') {
        return (name.into(), None, Some(digest.into()));
    }
    let after_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[after_slash..].rfind(':') {
        Some(i) => (
            image[..after_slash + i].into(),
            Some(image[after_slash + i + 1..].into()),
            None,
        ),
        None => (image.into(), None, None),
    }
}

/// kustomize rejects absolute resource paths, so the overlay reaches
/// deploy/ through `..`s.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out: PathBuf = from[common..].iter().map(|_| "..").collect();
    out.extend(&to[common..]);
    out
}

fn kustomization(dir: &Path, image: &str) -> String {
    let deploy = repo().join("deploy").canonicalize().unwrap();
    let base = relative(&dir.canonicalize().unwrap(), &deploy);
    let (name, tag, digest) = split_image(image);
    let mut text = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
         resources:\n  - {}\nimages:\n  - name: {}\n    newName: {name}\n",
        base.display(),
        deployed_image_name(),
    );
    if let Some(tag) = tag {
        text += &format!("    newTag: \"{tag}\"\n");
    }
    if let Some(digest) = digest {
        text += &format!("    digest: {digest}\n");
    }
    text
}

/// The installed agent; uninstalled on drop unless PORTCULLIS_E2E_KEEP=1.
struct Install {
    overlay: tempfile::TempDir,
}

impl Install {
    fn new(image: &str) -> Install {
        let overlay = tempfile::Builder::new()
            .prefix("portcullis-e2e-")
            .tempdir()
            .unwrap();
        let text = kustomization(overlay.path(), image);
        std::fs::write(overlay.path().join("kustomization.yaml"), text).unwrap();
        let install = Install { overlay };
        let dir = install.dir();
        kubectl(&["apply", "-k", &dir]);
        let rollout = kubectl_output(
            &[
                "-n",
                AGENT_NAMESPACE,
                "rollout",
                "status",
                &format!("ds/{AGENT_DAEMONSET}"),
                "--timeout=180s",
            ],
            None,
        );
        if !rollout.status.success() {
            let logs = kubectl_output(
                &[
                    "-n",
                    AGENT_NAMESPACE,
                    "logs",
                    "-l",
                    AGENT_SELECTOR,
                    "--tail=30",
                    "--prefix",
                ],
                None,
            );
            panic!(
                "the agent DaemonSet did not become ready: {}\nagent logs:\n{}",
                String::from_utf8_lossy(&rollout.stderr).trim(),
                String::from_utf8_lossy(&logs.stdout)
            );
        }
        install
    }

    fn dir(&self) -> String {
        self.overlay.path().display().to_string()
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        if keep_install() {
            eprintln!("kube_e2e: PORTCULLIS_E2E_KEEP=1, leaving the agent installed");
            return;
        }
        // Best effort: a failed cleanup must not hide the test's own failure.
        let out = kubectl_output(
            &[
                "delete",
                "-k",
                &self.dir(),
                "--ignore-not-found",
                "--timeout=120s",
            ],
            None,
        );
        if !out.status.success() {
            eprintln!(
                "kube_e2e: uninstalling failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

// ---------------------------------------------------------------- fixture

/// A throwaway namespace with the server, two clients and a Service;
/// deleted on drop (after printing what a failure needs to be understood).
struct Fixture {
    ns: String,
    server_ip: String,
    cluster_ip: String,
}

impl Fixture {
    fn new() -> Fixture {
        let secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let ns = format!("portcullis-e2e-{}-{secs}", std::process::id());
        kubectl(&["create", "namespace", &ns]);
        // From here on the guard owns the namespace, even if setup fails.
        let mut f = Fixture {
            ns,
            server_ip: String::new(),
            cluster_ip: String::new(),
        };
        let ns = &f.ns;
        // `extra`: more container fields, indented as such.
        let pod = |name: &str, app: &str, args: &str, extra: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, \
                 labels: {{app: {app}}}}}\nspec:\n  terminationGracePeriodSeconds: 0\n  \
                 containers:\n    - name: agnhost\n      image: {AGNHOST}\n      \
                 args: {args}\n{extra}"
            )
        };
        let server = pod(
            "server",
            "server",
            &format!("[netexec, --http-port={SERVER_PORT}]"),
            &format!(
                "      ports: [{{name: http, containerPort: {SERVER_PORT}}}]\n      \
                 readinessProbe: {{tcpSocket: {{port: {SERVER_PORT}}}}}\n"
            ),
        );
        let service = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: server, namespace: {ns}}}\n\
             spec:\n  selector: {{app: server}}\n  \
             ports: [{{name: http, port: {SERVER_PORT}, targetPort: {SERVER_PORT}}}]\n"
        );
        apply(
            &[
                server,
                pod("client", "client", "[pause]", ""),
                pod("other", "other", "[pause]", ""),
                service,
            ]
            .join("---\n"),
        );
        kubectl(&[
            "-n",
            ns,
            "wait",
            "--for=condition=Ready",
            "pod",
            "--all",
            "--timeout=180s",
        ]);
        f.server_ip = kubectl(&["-n", ns, "get", "pod/server", "-o=jsonpath={.status.podIP}"]);
        f.cluster_ip = kubectl(&[
            "-n",
            ns,
            "get",
            "service/server",
            "-o=jsonpath={.spec.clusterIP}",
        ]);
        f
    }

    /// The server by pod IP and by ClusterIP.
    fn targets(&self) -> [String; 2] {
        [
            format!("{}:{SERVER_PORT}", self.server_ip),
            format!("{}:{SERVER_PORT}", self.cluster_ip),
        ]
    }

    /// One TCP connection attempt from pod `from`, classified by agnhost.
    fn connect(&self, from: &str, target: &str) -> Reach {
        let out = kubectl_output(
            &[
                "-n",
                &self.ns,
                "exec",
                from,
                "--",
                "/agnhost",
                "connect",
                target,
                "--timeout=3s",
            ],
            None,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        // agnhost exits 1 and prints TIMEOUT, REFUSED or "OTHER: <error>".
        match out.status.code() {
            Some(0) => Reach::Connected,
            _ if stderr.contains("TIMEOUT") => Reach::Timeout,
            // connect() failing with EPERM: an egress deny in the socket hook.
            _ if stderr.contains("operation not permitted") => Reach::NotPermitted,
            _ => Reach::Other(stderr.trim().to_string()),
        }
    }

    /// Waits up to PROPAGATION for `from → target` to end as `want`.
    fn expect_eventually(&self, from: &str, target: &str, want: Reach) {
        let mut last = None;
        let ok = eventually(PROPAGATION, || {
            let got = self.connect(from, target);
            let done = got == want;
            last = Some(got);
            done.then_some(())
        });
        assert!(
            ok.is_some(),
            "{from} → {target}: expected {want:?} within {PROPAGATION:?}, last got {:?}",
            last.unwrap()
        );
    }

    /// Once a policy is seen in effect, the rest must hold at once.
    fn expect_now(&self, from: &str, target: &str, want: Reach) {
        let got = self.connect(from, target);
        assert_eq!(got, want, "{from} → {target}");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for args in [
                vec![
                    "-n",
                    &self.ns,
                    "get",
                    "pods,services,networkpolicies,l4policies",
                    "-o",
                    "wide",
                ],
                vec!["-n", &self.ns, "get", "events.events.k8s.io"],
                vec![
                    "-n",
                    AGENT_NAMESPACE,
                    "logs",
                    "-l",
                    AGENT_SELECTOR,
                    "--tail=50",
                    "--prefix",
                ],
            ] {
                let out = kubectl_output(&args, None);
                eprintln!(
                    "--- kubectl {}\n{}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let out = kubectl_output(
            &[
                "delete",
                "namespace",
                &self.ns,
                "--ignore-not-found",
                "--timeout=120s",
            ],
            None,
        );
        if !out.status.success() {
            eprintln!(
                "kube_e2e: deleting namespace {} failed: {}",
                self.ns,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[derive(Debug, PartialEq)]
enum Reach {
    Connected,
    /// The SYN was dropped (an ingress deny drops silently).
    Timeout,
    NotPermitted,
    /// Anything else, kubectl errors included: never taken for a verdict.
    Other(String),
}

// ---------------------------------------------------------------- metrics

/// Sum of the `metric` series whose labels include all of `want`, in a
/// Prometheus/OpenMetrics text scrape.
fn sum_series(text: &str, metric: &str, want: &[(&str, &str)]) -> f64 {
    let prefix = format!("{metric}{{");
    text.lines()
        .filter_map(|line| line.strip_prefix(&prefix)?.split_once("} "))
        .filter(|(labels, _)| {
            let labels = parse_labels(labels);
            want.iter()
                .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .filter_map(|(_, value)| value.split_whitespace().next()?.parse::<f64>().ok())
        .sum()
}

/// `a="x",b="y"` → map. Our label values never hold quotes or commas
/// (docs/metrics.md), so no unescaping is needed.
fn parse_labels(labels: &str) -> BTreeMap<String, String> {
    labels
        .split("\",")
        .filter_map(|pair| {
            let (k, v) = pair.split_once("=\"")?;
            Some((k.to_string(), v.trim_end_matches('"').to_string()))
        })
        .collect()
}

/// `portcullis_drops_total` for one policy, summed over every agent: the
/// drop is counted on the node of the pod that enforced it. Scraped as
/// Prometheus would: the scraper ServiceAccount's token over HTTPS, through
/// `kubectl port-forward` (the API server's pod proxy does not pass the
/// caller's token on, so the agent would rightly answer 401).
fn drops(ns: &str, policy: &str, direction: &str) -> f64 {
    let scraper = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/monitoring/scraper.yaml"
    );
    kubectl(&["apply", "-f", scraper]);
    let token = kubectl(&["-n", AGENT_NAMESPACE, "create", "token", SCRAPER_ACCOUNT]);
    let pods = kubectl(&[
        "-n",
        AGENT_NAMESPACE,
        "get",
        "pods",
        "-l",
        AGENT_SELECTOR,
        "-o=jsonpath={.items[*].metadata.name}",
    ]);
    pods.split_whitespace()
        .map(|pod| {
            sum_series(
                &scrape(pod, token.trim()),
                "portcullis_drops_total",
                &[
                    ("namespace", ns),
                    ("policy", policy),
                    ("direction", direction),
                    ("reason", "policy"),
                ],
            )
        })
        .sum()
}

/// GETs an agent pod's /metrics with a bearer token through a port-forward.
fn scrape(pod: &str, token: &str) -> String {
    use std::io::{BufRead as _, BufReader};
    let target = format!("pod/{pod}");
    let ports = format!(":{AGENT_ADMIN_PORT}");
    let mut forward = Command::new("kubectl")
        .args(["-n", AGENT_NAMESPACE, "port-forward", &target, &ports])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("kubectl port-forward");
    // "Forwarding from 127.0.0.1:40123 -> 8443"
    let mut line = String::new();
    BufReader::new(forward.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("port-forward output");
    let local = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no local port in {line:?}"))
        .to_string();
    // The agent's certificate is self-signed unless one is configured.
    let out = Command::new("curl")
        .args(["-sSk", "--fail", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("https://127.0.0.1:{local}/metrics"))
        .output()
        .expect("curl is needed to scrape the agents");
    let _ = forward.kill();
    let _ = forward.wait();
    assert!(
        out.status.success(),
        "scraping {pod}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------- status

/// The `Accepted` condition of an L4Policy: (status, reason, message).
fn accepted(ns: &str, name: &str) -> Option<(String, String, String)> {
    let p = kubectl_json(&["-n", ns, "get", "l4policy", name]);
    let c = p["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?;
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    Some((s("status"), s("reason"), s("message")))
}

/// Notes of the InvalidPolicy Events about the L4Policy `name`.
fn invalid_policy_events(ns: &str, name: &str) -> Vec<String> {
    let events = kubectl_json(&["-n", ns, "get", "events.events.k8s.io"]);
    events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["reason"] == "InvalidPolicy"
                && e["type"] == "Warning"
                && e["regarding"]["kind"] == "L4Policy"
                && e["regarding"]["name"] == name
        })
        .map(|e| e["note"].as_str().unwrap_or_default().to_string())
        .collect()
}

// ---------------------------------------------------------------- the test

#[test]
#[ignore = "needs a Kubernetes cluster: see docs/kubernetes.md"]
fn daemonset_enforces_and_reports_policies() {
    let image = preflight();
    // Dropped in reverse order: the namespace goes before the install.
    let _install = Install::new(&image);
    let f = Fixture::new();
    let ns = f.ns.clone();
    let [pod_ip, cluster_ip] = f.targets();

    // Baseline: nothing isolates the server.
    for from in ["client", "other"] {
        for target in [&pod_ip, &cluster_ip] {
            f.expect_eventually(from, target, Reach::Connected);
        }
    }

    // A standard NetworkPolicy: only app=client may reach the server.
    apply(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: only-client, namespace: {ns}}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  \
         policyTypes: [Ingress]\n  ingress:\n    - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n      \
         ports: [{{protocol: TCP, port: {SERVER_PORT}}}]\n"
    ));
    f.expect_eventually("other", &pod_ip, Reach::Timeout);
    f.expect_now("other", &cluster_ip, Reach::Timeout);
    f.expect_now("client", &pod_ip, Reach::Connected);
    f.expect_now("client", &cluster_ip, Reach::Connected);

    // L4Policies, which only Portcullis enforces: an explicit ingress deny
    // beats the NetworkPolicy's allow, and an egress deny by pod selector
    // must catch a ClusterIP too (translated to the backend at connect
    // time), failing connect() at once instead of timing out.
    apply(&format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: L4Policy\n\
         metadata: {{name: deny-client, namespace: {ns}}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  \
         ingressDeny:\n    - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n      \
         ports: [{{protocol: TCP, port: {SERVER_PORT}}}]\n---\n\
         apiVersion: portcullis.dev/v1alpha1\nkind: L4Policy\n\
         metadata: {{name: other-egress, namespace: {ns}}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: other}}}}\n  \
         egressDeny:\n    - to: [{{podSelector: {{matchLabels: {{app: server}}}}}}]\n      \
         ports: [{{protocol: TCP, port: {SERVER_PORT}}}]\n"
    ));
    f.expect_eventually("client", &pod_ip, Reach::Timeout);
    f.expect_now("client", &cluster_ip, Reach::Timeout);
    f.expect_eventually("other", &cluster_ip, Reach::NotPermitted);
    f.expect_now("other", &pod_ip, Reach::NotPermitted);
    for name in ["deny-client", "other-egress"] {
        let status = eventually(REPORTING, || {
            accepted(&ns, name).filter(|(status, ..)| status == "True")
        });
        assert!(
            status.is_some(),
            "L4Policy {name}: no Accepted=True condition within {REPORTING:?}: {:?}",
            accepted(&ns, name)
        );
    }

    // The agents counted those drops under the deciding policy (the
    // NetworkPolicy's drops are not asserted: kind's kindnet enforces
    // NetworkPolicy too and may drop first).
    for (policy, direction) in [
        ("L4Policy/deny-client", "ingress"),
        ("L4Policy/other-egress", "egress"),
    ] {
        let counted = eventually(PROPAGATION, || {
            Some(drops(&ns, policy, direction)).filter(|n| *n > 0.0)
        });
        assert!(
            counted.is_some(),
            "no portcullis_drops_total{{namespace={ns:?}, policy={policy:?}, \
             direction={direction:?}, reason=\"policy\"}} on any agent"
        );
    }

    // An object the CRD schema admits (CIDR checks need CEL's IP library,
    // Kubernetes 1.31) but the agent rejects: reported, and the rest stays
    // enforced.
    apply(&format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: L4Policy\n\
         metadata: {{name: bad-cidr, namespace: {ns}}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  \
         ingressDeny:\n    - from: [{{ipBlock: {{cidr: 10.0.0.0/33}}}}]\n"
    ));
    let events = eventually(REPORTING, || {
        Some(invalid_policy_events(&ns, "bad-cidr")).filter(|e| !e.is_empty())
    });
    let events = events.unwrap_or_else(|| {
        panic!("no InvalidPolicy Event about L4Policy {ns}/bad-cidr within {REPORTING:?}")
    });
    assert!(
        events.iter().any(|note| note.contains("10.0.0.0/33")),
        "InvalidPolicy Events do not name the bad CIDR: {events:?}"
    );
    let condition = eventually(REPORTING, || {
        accepted(&ns, "bad-cidr").filter(|(status, ..)| status == "False")
    });
    let (_, reason, message) = condition.unwrap_or_else(|| {
        panic!(
            "L4Policy bad-cidr: no Accepted=False condition within {REPORTING:?}: {:?}",
            accepted(&ns, "bad-cidr")
        )
    });
    assert_eq!(reason, "Invalid");
    assert!(
        message.contains("10.0.0.0/33"),
        "condition message: {message}"
    );
    f.expect_now("client", &pod_ip, Reach::Timeout);
    f.expect_now("other", &cluster_ip, Reach::NotPermitted);
}

// Pure helpers, checked without a cluster.

#[test]
fn images_split_into_name_tag_and_digest() {
    let s = |n: &str, t: Option<&str>, d: Option<&str>| {
        (n.to_string(), t.map(String::from), d.map(String::from))
    };
    assert_eq!(
        split_image("portcullis:dev"),
        s("portcullis", Some("dev"), None)
    );
    assert_eq!(
        split_image("localhost:5000/portcullis"),
        s("localhost:5000/portcullis", None, None)
    );
    assert_eq!(
        split_image("localhost:5000/p/portcullis:1.2"),
        s("localhost:5000/p/portcullis", Some("1.2"), None)
    );
    assert_eq!(
        split_image("ghcr.io/p/portcullis@sha256:ab"),
        s("ghcr.io/p/portcullis", None, Some("sha256:ab"))
    );
    assert_eq!(deployed_image_name(), "ghcr.io/portcullis/portcullis");
    assert_eq!(
        relative(Path::new("/tmp/x"), Path::new("/work/repo/deploy")),
        PathBuf::from("../../work/repo/deploy")
    );
}

#[test]
fn drop_series_are_summed_by_label() {
    let text = "# TYPE portcullis_drops_total counter\n\
        portcullis_drops_total{direction=\"ingress\",reason=\"policy\",protocol=\"tcp\",namespace=\"n\",policy=\"L4Policy/a\"} 2\n\
        portcullis_drops_total{direction=\"ingress\",reason=\"policy\",protocol=\"udp\",namespace=\"n\",policy=\"L4Policy/a\"} 1\n\
        portcullis_drops_total{direction=\"egress\",reason=\"policy\",protocol=\"tcp\",namespace=\"n\",policy=\"L4Policy/a\"} 5\n\
        portcullis_drops_total{direction=\"ingress\",reason=\"policy\",protocol=\"tcp\",namespace=\"n\",policy=\"L4Policy/ab\"} 7\n";
    let want = [
        ("namespace", "n"),
        ("policy", "L4Policy/a"),
        ("direction", "ingress"),
    ];
    assert_eq!(sum_series(text, "portcullis_drops_total", &want), 3.0);
    assert_eq!(
        sum_series(text, "portcullis_drops_total", &[("policy", "x")]),
        0.0
    );
}
