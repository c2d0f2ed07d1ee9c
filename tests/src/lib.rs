//! Shared harness for the privileged tests: one lab per test, serialized,
//! and matrix helpers that compare what the kernel did with what was expected
//! and with what the policy evaluator predicts.

pub mod agent_process;
pub mod attack;
pub mod kube_api;
pub mod kube_source_harness;
pub mod mesh_wire;
pub mod relay;

use std::{collections::BTreeMap, net::IpAddr};

use tokio::sync::{Mutex, MutexGuard};

use portcullis_agent::{
    lab::{
        pod::Protocol,
        report::{Matrix, ProbeSpec},
        topology::{default_topology, Topology},
        Family, Lab, LabOptions,
    },
    policy::{
        evaluate::{evaluate, FlowQuery},
        model::{Protocol as PolicyProtocol, Service},
        parse::{parse_inventory, parse_policies},
    },
};

/// Labs share the kernel (cgroup programs, bpffs): one at a time, even when
/// the harness runs tests in parallel.
static KERNEL: Mutex<()> = Mutex::const_new(());

/// Pinned cgroup links under `pin_dir` (the packet socket guard's LSM
/// links, pinned beside them where the kernel loads them, are not).
pub fn cgroup_links(pin_dir: &std::path::Path) -> usize {
    std::fs::read_dir(pin_dir.join("links"))
        .expect("links directory")
        .filter_map(|e| e.ok())
        .filter(|e| {
            !e.file_name()
                .to_string_lossy()
                .starts_with(portcullis_common::LSM_PROGRAM_PREFIX)
        })
        .count()
}

/// Fails the test (never skips it) when not root: these tests exist to
/// exercise the real kernel data path.
pub fn require_root() {
    assert!(
        nix_is_root(),
        "this test loads eBPF programs and builds network namespaces: run it as root \
         (sudo -E cargo xtask test)"
    );
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Holds the kernel for a (synchronous) test that runs a lab through the CLI.
pub fn kernel_lock() -> MutexGuard<'static, ()> {
    KERNEL.blocking_lock()
}

/// A running lab plus the lock that keeps other labs out.
pub struct TestLab {
    pub lab: Lab,
    _guard: MutexGuard<'static, ()>,
}

impl std::ops::Deref for TestLab {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.lab
    }
}

impl std::ops::DerefMut for TestLab {
    fn deref_mut(&mut self) -> &mut Lab {
        &mut self.lab
    }
}

/// Starts the default x,y,z × a,b,c lab, named after the test.
pub async fn start_lab(name: &str) -> TestLab {
    start_lab_with(name, default_topology()).await
}

/// Starts a lab on a custom topology (e.g. named ports that mean different
/// numbers on different pods), named after the test.
pub async fn start_lab_with(name: &str, topology: Topology) -> TestLab {
    start_lab_with_options(LabOptions::new(name, topology)).await
}

impl TestLab {
    /// Writes a policy file that must be rejected, waits until the agent has
    /// processed it, and asserts the agent reports a problem for it whose
    /// text contains every needle (file, object, field, reason...). Returns
    /// the report.
    pub async fn apply_expect_problem(&self, file: &str, yaml: &str, needles: &[&str]) -> String {
        self.lab.write_policy(file, yaml).expect("writing policy");
        let status = self
            .lab
            .wait_applied()
            .await
            .expect("agent processes policy");
        let report = status
            .problems
            .iter()
            .find(|p| p.contains(file))
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "policy {file} should be rejected with a problem naming it; problems: {:?}",
                    status.problems
                )
            });
        let missing: Vec<_> = needles.iter().filter(|n| !report.contains(*n)).collect();
        assert!(
            missing.is_empty(),
            "the problem reported for {file} should mention {missing:?}: {report}"
        );
        eprintln!("{file} rejected as expected: {report}");
        report
    }

    /// Writes a policy file and waits until the agent applied it cleanly.
    pub async fn apply(&self, file: &str, yaml: &str) {
        self.lab.write_policy(file, yaml).expect("writing policy");
        let status = self.lab.wait_applied().await.expect("agent applies policy");
        assert!(
            status.problems.is_empty(),
            "policy {file} should apply cleanly: {:?}",
            status.problems
        );
    }

    /// Replaces the lab's services and waits until the agent applied them
    /// cleanly.
    pub async fn apply_services(&mut self, services: Vec<Service>) {
        self.lab.set_services(services).expect("writing services");
        let status = self
            .lab
            .wait_applied()
            .await
            .expect("agent applies services");
        assert!(
            status.problems.is_empty(),
            "services should apply cleanly: {:?}",
            status.problems
        );
    }

    pub async fn remove(&self, file: &str) {
        self.lab.remove_policy(file).expect("removing policy");
        let status = self
            .lab
            .wait_applied()
            .await
            .expect("agent applies removal");
        assert!(status.problems.is_empty(), "{:?}", status.problems);
    }

    pub async fn matrix(&self, spec: &str, family: Family) -> Matrix {
        let spec: ProbeSpec = spec.parse().expect("probe spec");
        let mut m = self
            .lab
            .probe_matrix(&[spec], family)
            .await
            .expect("probing");
        m.remove(0)
    }

    /// Probes and asserts the full matrix equals `expected(from, to)`, without
    /// the evaluator cross-check: for states with deliberately invalid files,
    /// whose enforced content (the last valid version) no file shows.
    pub async fn assert_kernel_matrix(
        &self,
        spec: &str,
        family: Family,
        expected: impl Fn(&str, &str) -> bool,
    ) {
        let m = self.matrix(spec, family).await;
        let want = expected_matrix(&self.lab, &expected);
        assert_matrix_eq(spec, family, &m.booleans(), &want);
    }

    /// Probes and asserts the full matrix equals `expected(from, to)` and
    /// what the policy evaluator predicts from the current files.
    pub async fn assert_matrix(
        &self,
        spec: &str,
        family: Family,
        expected: impl Fn(&str, &str) -> bool,
    ) {
        let m = self.matrix(spec, family).await;
        let want = expected_matrix(&self.lab, &expected);
        assert_matrix_eq(spec, family, &m.booleans(), &want);
        // The kernel must also agree with the policy evaluator, cell by cell.
        let predicted = self.evaluator_matrix(&m.spec, family);
        assert_matrix_eq(
            &format!("{spec} (evaluator vs kernel)"),
            family,
            &m.booleans(),
            &predicted,
        );
    }

    /// What the evaluator says for every pair, from the lab's current
    /// policy files and workloads file (each node's, in a two-node lab).
    pub fn evaluator_matrix(
        &self,
        spec: &ProbeSpec,
        family: Family,
    ) -> BTreeMap<String, BTreeMap<String, bool>> {
        let inventories: Vec<_> = (1..=self.lab.node_count())
            .map(|node| {
                let inv_path = self.lab.node_workloads_file(node).expect("node");
                let text = std::fs::read_to_string(inv_path).expect("workloads file");
                parse_inventory(inv_path, &text).expect("lab inventory parses")
            })
            .collect();
        let mut policies = Vec::new();
        let mut files: Vec<_> = std::fs::read_dir(self.lab.policies_dir())
            .expect("policies dir")
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).expect("policy file");
            policies.extend(parse_policies(&f, &text).expect("policies in tests are valid"));
        }
        let protocol = match spec.protocol {
            Protocol::Tcp => PolicyProtocol::Tcp,
            Protocol::Udp => PolicyProtocol::Udp,
        };
        let addr = |key: &str| {
            let p = self.lab.pods().iter().find(|p| p.key == key).expect("pod");
            match family {
                Family::Ipv4 => IpAddr::from(p.ipv4),
                Family::Ipv6 => IpAddr::from(p.ipv6),
            }
        };
        expected_matrix(&self.lab, &|from: &str, to: &str| {
            let q = FlowQuery {
                src: addr(from),
                dst: addr(to),
                port: spec.port,
                protocol,
            };
            // Each node judges its own pods' side of a flow: the source's
            // node its egress, the destination's node its ingress.
            let node = |key: &str| self.lab.pod_node(key).expect("pod");
            let allowed = |n: usize| evaluate(&inventories[n - 1], &policies, &q).allowed;
            let (f, t) = (node(from), node(to));
            allowed(f) && (f == t || allowed(t))
        })
    }
}

pub fn expected_matrix(
    lab: &Lab,
    expected: &impl Fn(&str, &str) -> bool,
) -> BTreeMap<String, BTreeMap<String, bool>> {
    let keys: Vec<&str> = lab.pods().iter().map(|p| p.key.as_str()).collect();
    keys.iter()
        .map(|f| {
            (
                f.to_string(),
                keys.iter()
                    .map(|t| (t.to_string(), expected(f, t)))
                    .collect(),
            )
        })
        .collect()
}

/// Compares matrices and, on mismatch, lists every differing cell.
pub fn assert_matrix_eq(
    spec: &str,
    family: Family,
    got: &BTreeMap<String, BTreeMap<String, bool>>,
    want: &BTreeMap<String, BTreeMap<String, bool>>,
) {
    let mut diffs = Vec::new();
    for (f, row) in want {
        for (t, w) in row {
            let g = got.get(f).and_then(|r| r.get(t)).copied();
            if g != Some(*w) {
                diffs.push(format!("{f} → {t}: expected {w}, measured {g:?}"));
            }
        }
    }
    assert!(
        diffs.is_empty(),
        "{spec} over {family:?}: {} cell(s) differ:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    portcullis_agent::source::file::error_chain(e)
}

/// Starts a lab with explicit options (e.g. an admin endpoint); the name in
/// `opts` should be the test's.
pub async fn start_lab_with_options(opts: LabOptions) -> TestLab {
    require_root();
    let guard = KERNEL.lock().await;
    let name = opts.name.clone();
    let lab = Lab::start(opts)
        .await
        .unwrap_or_else(|e| panic!("starting lab {name}: {}", chain(&e)));
    TestLab { lab, _guard: guard }
}

/// An HTTP response, as [`http_get`] read it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// A plain HTTP/1.1 GET (the admin endpoint speaks nothing fancier), with
/// an optional `Accept` header.
pub async fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
    accept: Option<&str>,
) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("sending request");
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .await
        .expect("reading response");
    parse_response(raw)
}

/// Status, content type and body of a whole HTTP/1.x response.
pub fn parse_response(raw: Vec<u8>) -> HttpResponse {
    let raw = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("malformed HTTP response: {raw:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    HttpResponse {
        status,
        content_type,
        body: body.to_string(),
    }
}

/// Fails the test unless `name` is on PATH (the tools `cargo xtask setup`
/// installs).
pub fn require_binary(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not installed: install the Debian package `prometheus` (cargo xtask setup)"
    );
}

/// Runs `promtool` (from the Debian `prometheus` package) in the repository
/// root, with `stdin` as its input, and fails the test if it complains.
pub fn promtool(args: &[&str], stdin: Option<&str>) {
    use std::{
        io::Write as _,
        process::{Command, Stdio},
    };
    require_binary("promtool");
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running promtool ({e}): install the Debian package `prometheus` (cargo xtask setup)"));
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} fails: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A policy set with one flow decided by each kind of decider: a default
/// deny in y (x may reach y/b), an explicit L4Policy deny for x/c → y/b, an
/// Admin-tier quarantine of z/c, and an audit-mode L4Policy on x/a that only
/// pods of x pass.
pub const ALL_DECIDERS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: y}
spec:
  podSelector: {}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: y}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress:
    - from: [{namespaceSelector: {matchLabels: {ns: x}}}]
---
apiVersion: portcullis.dev/v1alpha1
kind: L4Policy
metadata: {name: no-c, namespace: y}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingressDeny:
    - from: [{namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: c}}}]
---
apiVersion: portcullis.dev/v1alpha1
kind: ClusterL4Policy
metadata: {name: quarantine}
spec:
  tier: Admin
  priority: 5
  subject: {namespaceSelector: {matchLabels: {ns: z}}, podSelector: {matchLabels: {pod: c}}}
  ingress:
    - action: Deny
---
apiVersion: portcullis.dev/v1alpha1
kind: L4Policy
metadata: {name: trial, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  mode: Audit
  ingress:
    - from: [{podSelector: {}}]
"#;
