//! The Grafana dashboard and the alert rules against the real thing: the
//! Debian `prometheus` binary scrapes a lab agent every second and loads
//! deploy/prometheus/rules.yaml, the lab sees allowed, denied and audited
//! traffic, and then every PromQL query of deploy/grafana/portcullis.json
//! must return the series it is about (not merely no error), and every alert
//! rule must evaluate cleanly. `promtool check rules` and `promtool check
//! metrics` pass. Two more tests (no root needed) keep the PrometheusRule
//! and the plain rule file identical and every panel on the dashboard's
//! data source variable.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use portcullis_agent::{
    lab::{pod::ProbeOutcome, report::ProbeSpec, topology::default_topology, Family, LabOptions},
    mesh::mode::MODE_LABEL,
};
use portcullis_tests::{
    http_get, parse_response, promtool, require_binary, start_lab_with_options, TestLab,
    ALL_DECIDERS,
};
use serde_json::Value;

/// What Grafana's variables stand for when the queries run here. The rate
/// window spans the whole traffic phase and the policy apply before it, so
/// rates and the latency quantiles have something to compute.
const SUBSTITUTIONS: &[(&str, &str)] = &[
    ("${namespace}", ".*"),
    ("$namespace", ".*"),
    ("$__rate_interval", "1m"),
    ("$__interval", "15s"),
    ("$__range", "5m"),
];

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel)
}

fn read(rel: &str) -> String {
    let path = deploy(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn dashboard() -> Value {
    serde_json::from_str(&read("grafana/portcullis.json"))
        .expect("deploy/grafana/portcullis.json is JSON")
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// (panel title, expression) for every target of every panel.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push((title.clone(), expr.to_string()));
            }
        }
    }
    out
}

fn substitute(expr: &str) -> String {
    let mut e = expr.to_string();
    for (var, value) in SUBSTITUTIONS {
        e = e.replace(var, value);
    }
    assert!(
        !e.contains('$'),
        "a dashboard query uses a variable this test does not substitute: {expr}"
    );
    e
}

#[test]
fn prometheus_rule_and_plain_rule_file_have_the_same_groups() {
    let plain: serde_json::Value =
        serde_saphyr::from_str(&read("prometheus/rules.yaml")).expect("rules.yaml parses");
    let operator: serde_json::Value =
        serde_saphyr::from_str(&read("monitoring/alerts.yaml")).expect("alerts.yaml parses");
    assert_eq!(
        operator["apiVersion"].as_str(),
        Some("monitoring.coreos.com/v1")
    );
    assert_eq!(operator["kind"].as_str(), Some("PrometheusRule"));
    let groups = plain["groups"].as_array().expect("rules.yaml has groups");
    assert!(!groups.is_empty());
    assert_eq!(
        operator["spec"]["groups"], plain["groups"],
        "deploy/monitoring/alerts.yaml and deploy/prometheus/rules.yaml must hold the same \
         groups: regenerate alerts.yaml as its header says"
    );
    // The alerts the dashboard's users are promised.
    let alerts: BTreeSet<&str> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for want in [
        "PortcullisAgentDown",
        "PortcullisAgentAbsent",
        "PortcullisPolicyApplySlow",
        "PortcullisPolicyProblems",
        "PortcullisBPFMapNearCapacity",
        "PortcullisDropsSpike",
        "PortcullisPacketSocketGuardInactive",
        "PortcullisMeshHandshakeFailures",
        "PortcullisCertificateNearExpiry",
        "PortcullisPlaintextRefused",
    ] {
        assert!(alerts.contains(want), "no alert {want}: {alerts:?}");
    }
}

#[test]
fn dashboard_panels_all_use_the_datasource_variable() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let vars = d["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no template variable {name}"))
    };
    let ds = var("datasource");
    assert_eq!(
        (ds["type"].as_str(), ds["query"].as_str()),
        (Some("datasource"), Some("prometheus"))
    );
    let ns = var("namespace");
    assert_eq!(ns["type"], "query");
    assert!(
        ns["definition"]
            .as_str()
            .is_some_and(|q| q.starts_with("label_values(")),
        "{ns}"
    );
    assert_eq!(ns["datasource"]["uid"], "${datasource}");

    let mut queries = 0;
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or("?");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {title:?} does not use the datasource variable"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            let ds = &t["datasource"]["uid"];
            assert!(
                ds.is_null() || ds == "${datasource}",
                "a target of {title:?} uses data source {ds}"
            );
            assert!(t["expr"].is_string(), "a target of {title:?} has no expr");
            queries += 1;
        }
    }
    assert!(queries >= 10, "only {queries} queries");
    // Each query only uses variables the Prometheus test substitutes.
    for (_, expr) in dashboard_queries(&d) {
        substitute(&expr);
    }
}

/// The real Prometheus server, killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port")
        .port()
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        require_binary("prometheus");
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = deploy("prometheus/rules.yaml")
            .canonicalize()
            .expect("rules.yaml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: portcullis\n    static_configs:\n      - targets: [\"{target}\"]\n"
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("writing prometheus.yml");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting prometheus ({e}): install the Debian package `prometheus` (cargo xtask setup)")
            });
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET on Prometheus' HTTP API; the JSON answer and the HTTP status.
    async fn api(&self, path_and_query: &str) -> (u16, Value) {
        let (status, body) = get_http10(self.addr, path_and_query).await;
        let json = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path_and_query}: {status} {e}: {body}"));
        (status, json)
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("polling prometheus") {
                panic!("prometheus exited with {status}:\n{}", self.log());
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok()
                && get_http10(self.addr, "/-/ready").await.0 == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after 30 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// An instant query that must succeed; its result vector.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let (status, v) = self
            .api(&format!("/api/v1/query?query={}", urlencode(expr)))
            .await;
        assert!(
            status == 200 && v["status"] == "success",
            "query {expr} failed ({status}): {v}"
        );
        assert_eq!(v["data"]["resultType"], "vector", "{expr}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Polls until `expr` returns a sample whose value satisfies `ok`.
    async fn wait_for(&self, expr: &str, ok: impl Fn(f64) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.query(expr).await;
            if r.iter().any(|s| ok(sample_value(s))) {
                return;
            }
            if Instant::now() > deadline {
                let (_, targets) = self.api("/api/v1/targets").await;
                panic!(
                    "{what}: `{expr}` gave {r:?} for 60 s; targets: {targets}\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn sample_value(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An HTTP/1.0 GET: the server answers with a plain body (no chunked
/// encoding) and closes the connection.
async fn get_http10(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("sending request");
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .await
        .expect("reading response");
    let response = parse_response(raw);
    (response.status, response.body)
}

/// The label sets of a result vector.
fn label_sets(result: &[Value]) -> Vec<BTreeMap<String, String>> {
    result
        .iter()
        .map(|s| {
            s["metric"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect()
}

/// Asserts some series carries every (label, value) of `want`. Prometheus
/// drops empty labels: `""` matches an absent label.
fn assert_has_series(
    title: &str,
    expr: &str,
    sets: &[BTreeMap<String, String>],
    want: &[(&str, &str)],
) {
    assert!(
        sets.iter().any(|l| want
            .iter()
            .all(|(k, v)| l.get(*k).map_or("", String::as_str) == *v)),
        "panel {title:?}: `{expr}` has no series with {want:?}; it returned {sets:?}"
    );
}

/// What the traffic of the test must show in each kind of panel. Returns a
/// name for the check that applied, if any.
fn check_expected_series(title: &str, expr: &str, result: &[Value]) -> Option<&'static str> {
    let sets = label_sets(result);
    let keys: BTreeSet<&str> = sets
        .iter()
        .flat_map(|l| l.keys().map(String::as_str))
        .collect();
    let has = |k: &str| keys.contains(k);
    let check = |want: &[(&str, &str)]| assert_has_series(title, expr, &sets, want);
    // Rates of the traffic just generated are positive somewhere.
    let positive = || {
        assert!(
            result.iter().any(|s| sample_value(s) > 0.0),
            "panel {title:?}: `{expr}` shows no traffic: {result:?}"
        )
    };
    if expr.contains("portcullis_mesh_connections_total") {
        check(&[("direction", "outbound"), ("result", "mtls")]);
        check(&[("direction", "inbound"), ("result", "mtls")]);
        check(&[("direction", "outbound"), ("result", "passthrough")]);
        return Some("mesh connections");
    }
    if expr.contains("portcullis_mesh_failures_total") {
        check(&[("direction", "inbound"), ("reason", "tls_handshake")]);
        return Some("mesh failures");
    }
    if expr.contains("portcullis_identity_certificate_expiry_timestamp_seconds") {
        check(&[("spiffe_id", "spiffe://cluster.local/ns/x/sa/a")]);
        assert!(
            result.iter().all(|s| sample_value(s) > 0.0),
            "panel {title:?}: every certificate is still valid: {result:?}"
        );
        return Some("certificate expiry");
    }
    if expr.contains("portcullis_mesh_active_connections") {
        return Some("proxied connections");
    }
    if expr.contains("reason=\"plaintext\"") {
        positive();
        return Some("plaintext refused");
    }
    if expr.contains("portcullis_drops_total") && !expr.contains("portcullis_forwards_total") {
        positive();
        if has("policy") {
            check(&[("namespace", "y"), ("policy", "NetworkPolicy/default-deny")]);
            check(&[("namespace", "y"), ("policy", "L4Policy/no-c")]);
            check(&[("namespace", ""), ("policy", "ClusterL4Policy/quarantine")]);
            return Some("drops by policy");
        }
        if has("reason") {
            check(&[("reason", "default_deny")]);
            check(&[("reason", "policy")]);
            return Some("drops by reason");
        }
        if has("namespace") {
            check(&[("namespace", "y")]);
            check(&[("namespace", "")]);
            return Some("drops by namespace");
        }
        if has("protocol") {
            check(&[("direction", "ingress"), ("protocol", "tcp")]);
            check(&[("direction", "ingress"), ("protocol", "udp")]);
            return Some("drops by protocol");
        }
        return None;
    }
    if expr.contains("portcullis_audit_total") {
        positive();
        if has("policy") {
            check(&[("namespace", "x"), ("policy", "L4Policy/trial")]);
            return Some("audit by policy");
        }
        return None;
    }
    if expr.contains("portcullis_forwards_total") && has("reason") {
        positive();
        check(&[("reason", "policy")]);
        check(&[("reason", "audit")]);
        return Some("forwards by reason");
    }
    if expr.contains("histogram_quantile") {
        assert!(
            result.iter().all(|s| sample_value(s).is_finite()),
            "panel {title:?}: `{expr}` has no latency although a policy was applied: {result:?}"
        );
        return Some("apply latency");
    }
    if expr.contains("portcullis_bpf_map_entries") && has("map") {
        for map in ["endpoints", "identities", "policy", "counters"] {
            check(&[("map", map)]);
        }
        return Some("map pressure");
    }
    if expr.contains("up{") {
        assert!(
            result.iter().all(|s| sample_value(s) >= 1.0),
            "{title:?}: {result:?}"
        );
        return Some("agents up");
    }
    if expr.contains("portcullis_source_degraded")
        || expr.contains("portcullis_policy_report_leader")
    {
        // A standalone lab agent follows its files and reports to no API.
        assert!(
            result.len() == 1 && sample_value(&result[0]) == 0.0,
            "panel {title:?}: `{expr}`: {result:?}"
        );
        return Some("source health");
    }
    if expr.contains("portcullis_build_info") {
        check(&[("version", env!("CARGO_PKG_VERSION"))]);
        return Some("build info");
    }
    None
}

#[tokio::test]
async fn dashboard_queries_and_alert_rules_work_against_a_real_prometheus() {
    // Fail early, before building the lab, when the tools are missing.
    require_binary("prometheus");
    require_binary("promtool");
    promtool(&["check", "rules", "deploy/prometheus/rules.yaml"], None);

    // Namespace x is meshed PERMISSIVE, its pod c STRICT, so the mesh's
    // panels and alerts have traffic too.
    let mut topology = default_topology();
    for n in topology.namespaces.iter_mut().filter(|n| n.name == "x") {
        n.labels.insert(MODE_LABEL.into(), "permissive".into());
    }
    for w in topology
        .workloads
        .iter_mut()
        .filter(|w| w.namespace == "x" && w.name == "c")
    {
        w.labels.insert(MODE_LABEL.into(), "strict".into());
    }
    let mut opts = LabOptions::new("prom", topology);
    opts.admin_addr = Some("127.0.0.1:0".parse().unwrap());
    let lab: TestLab = start_lab_with_options(opts).await;
    let agent = lab.admin_addr().expect("the lab's agent serves metrics");

    let mut prom = Prometheus::start(agent);
    prom.wait_ready().await;
    prom.wait_for(
        "up{job=\"portcullis\"}",
        |v| v == 1.0,
        "Prometheus scrapes the agent",
    )
    .await;

    // The apply lands inside the queries' rate window (apply latency).
    lab.apply("policies.yaml", ALL_DECIDERS).await;

    let tcp80: ProbeSpec = "80/tcp".parse().unwrap();
    let udp81: ProbeSpec = "81/udp".parse().unwrap();
    let probe = |from: &'static str, to: &'static str, spec: ProbeSpec| {
        let lab = &lab;
        async move {
            lab.probe(from, to, spec, Family::Ipv4)
                .await
                .unwrap_or_else(|e| panic!("probing {from} → {to} {spec:?}: {e}"))
        }
    };
    // Rounds over at least 5 s, so that rates have several scrapes to work
    // on; each round drops by default deny, by an L4Policy deny and by a
    // ClusterL4Policy, audits one flow and allows one.
    let start = Instant::now();
    let mut rounds = 0;
    while rounds < 3 || start.elapsed() < Duration::from_secs(5) {
        let (default_deny, l4_deny, cluster_deny, audit, allowed) = tokio::join!(
            probe("z/a", "y/a", tcp80),
            probe("x/c", "y/b", udp81),
            probe("x/b", "z/c", tcp80),
            probe("y/a", "x/a", tcp80),
            probe("x/a", "y/b", tcp80),
        );
        // The mesh: mTLS between x's pods, plaintext refused by STRICT x/c,
        // and a client that speaks no TLS to x/b's HBONE port.
        let (mtls, plaintext, no_tls) = tokio::join!(
            probe("x/a", "x/b", tcp80),
            probe("z/a", "x/c", tcp80),
            probe("z/a", "x/b", "15008/tcp".parse().unwrap()),
        );
        assert_eq!(mtls, ProbeOutcome::Reached, "x/a → x/b over mTLS");
        assert_eq!(plaintext, ProbeOutcome::TimedOut, "z/a → STRICT x/c");
        // The HBONE port answers a non-TLS client with a TLS alert (which
        // the probe, wanting any bytes back, calls reached); the failure
        // must show in the mesh failures panel.
        let _ = no_tls;
        assert_eq!(default_deny, ProbeOutcome::TimedOut, "z/a → y/a");
        assert_eq!(l4_deny, ProbeOutcome::TimedOut, "x/c → y/b");
        assert_eq!(cluster_deny, ProbeOutcome::TimedOut, "x/b → z/c");
        assert_eq!(audit, ProbeOutcome::Reached, "y/a → x/a (audit)");
        assert_eq!(allowed, ProbeOutcome::Reached, "x/a → y/b");
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("{rounds} rounds of traffic in {:?}", start.elapsed());

    // Several scrapes, the last ones after the traffic.
    prom.wait_for(
        "count_over_time(portcullis_build_info{job=\"portcullis\"}[1m])",
        |v| v >= 5.0,
        "five scrapes",
    )
    .await;
    let audited = lab.admin_addr().unwrap();
    let scrape = http_get(audited, "/metrics", None).await;
    assert_eq!(scrape.status, 200);
    let audit_now = scrape
        .body
        .lines()
        .find(|l| l.starts_with("portcullis_audit_total{") && l.contains("L4Policy/trial"))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no audit series in the scrape:\n{}", scrape.body));
    prom.wait_for(
        "sum(portcullis_audit_total{policy=\"L4Policy/trial\"})",
        |v| v >= audit_now,
        "Prometheus has scraped the end of the traffic",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Every query of the dashboard.
    let d = dashboard();
    let queries = dashboard_queries(&d);
    let mut checked = BTreeSet::new();
    for (title, expr) in &queries {
        let e = substitute(expr);
        let result = prom.query(&e).await;
        assert!(
            !result.is_empty(),
            "panel {title:?}: `{e}` returned no series although the lab had that kind of traffic"
        );
        if let Some(check) = check_expected_series(title, &e, &result) {
            checked.insert(check);
        }
        eprintln!("ok {title:?}: {e} → {} series", result.len());
    }
    for want in [
        "drops by policy",
        "drops by reason",
        "drops by namespace",
        "audit by policy",
        "forwards by reason",
        "apply latency",
        "map pressure",
        "agents up",
        "build info",
        "source health",
        "mesh connections",
        "mesh failures",
        "plaintext refused",
        "certificate expiry",
        "proxied connections",
    ] {
        assert!(
            checked.contains(want),
            "the dashboard has no {want} panel (checked: {checked:?})"
        );
    }

    // The namespace variable lists the namespaces of dropping policies.
    let var = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "namespace")
        .unwrap();
    let def = var["definition"].as_str().unwrap();
    let (metric, label) = def
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
        .and_then(|r| r.split_once(", "))
        .unwrap_or_else(|| panic!("unexpected variable query {def}"));
    let (status, values) = prom
        .api(&format!(
            "/api/v1/label/{label}/values?match[]={}",
            urlencode(metric)
        ))
        .await;
    assert_eq!(status, 200, "{values}");
    let values: Vec<&str> = values["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert!(values.contains(&"y"), "{def} → {values:?}");

    // Every alert rule loaded and evaluates without error.
    let plain: serde_json::Value = serde_saphyr::from_str(&read("prometheus/rules.yaml")).unwrap();
    let want_rules: usize = plain["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_array().unwrap().len())
        .sum();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, v) = prom.api("/api/v1/rules").await;
        assert_eq!(
            (status, &v["status"]),
            (200, &Value::from("success")),
            "{v}"
        );
        let rules: Vec<&Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        assert_eq!(rules.len(), want_rules, "rules loaded: {v}");
        for r in &rules {
            let err = r["lastError"].as_str().unwrap_or_default();
            assert!(
                err.is_empty() && r["health"] != "err",
                "rule {} fails: {err}: {r}",
                r["name"]
            );
        }
        if rules.iter().all(|r| r["health"] == "ok") {
            // With a healthy agent, apply and no problems, nothing fires.
            for r in &rules {
                assert_ne!(r["state"], "firing", "{r}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rules not all evaluated healthy after 30 s: {v}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // promtool on a scrape of the agent taken now.
    let scrape = http_get(agent, "/metrics", None).await;
    assert_eq!(scrape.status, 200);
    promtool(&["check", "metrics"], Some(&scrape.body));
    drop(prom);
}
