//! The agent's admin endpoint on a running lab: drops by default deny, by an
//! explicit L4Policy deny and by a ClusterL4Policy, and audit verdicts, each
//! counted under the policy that decided, equal to what the kernel counted;
//! readiness; and `promtool check metrics` on the scraped text.

use std::collections::BTreeMap;

use portcullis_agent::{
    lab::{pod::ProbeOutcome, report::ProbeSpec, topology::default_topology, Family, LabOptions},
    reconcile::PublishedNames,
};
use portcullis_common::{
    DIRECTION_INGRESS, PROTO_TCP, PROTO_UDP, REASON_DEFAULT_DENY, REASON_POLICY, VERDICT_AUDIT,
    VERDICT_DENY,
};
use portcullis_tests::{
    http_get, promtool, start_lab_with_options, HttpResponse, TestLab, ALL_DECIDERS,
};

/// Probes per kind of decision.
const PROBES: u64 = 3;

/// One sample of the Prometheus text format: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

fn parse_samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = value.parse().expect("sample value");
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels = BTreeMap::new();
                // Label values here are names and enum words: no escapes.
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").expect("label pair");
                    labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (name.to_string(), labels)
            }
        };
        out.push((name, labels, value));
    }
    out
}

/// The value of the series with exactly these labels, if it exists.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .iter()
        .find(|(n, l, _)| n == name && *l == want)
        .map(|(_, _, v)| *v)
}

fn must(samples: &[Sample], name: &str, labels: &[(&str, &str)], text: &str) -> f64 {
    value(samples, name, labels)
        .unwrap_or_else(|| panic!("no series {name}{labels:?} in the scrape:\n{text}"))
}

async fn scrape(lab: &TestLab) -> (String, Vec<Sample>) {
    let addr = lab.admin_addr().expect("the lab's agent serves metrics");
    let r = http_get(addr, "/metrics", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.content_type.starts_with("text/plain; version=0.0.4"),
        "without an Accept header /metrics is the Prometheus text format: {}",
        r.content_type
    );
    let samples = parse_samples(&r.body);
    (r.body, samples)
}

/// What the kernel counted for decisions of this verdict, reason and
/// protocol in ingress whose rule cookie the agent attributes first to
/// (namespace, kind/name).
fn kernel_count(
    lab: &TestLab,
    names: &PublishedNames,
    verdict: u8,
    reason: u8,
    protocol: u8,
    policy: (&str, &str),
) -> u64 {
    lab.counters()
        .expect("reading kernel counters")
        .iter()
        .filter(|s| {
            let k = s.key;
            let first = names
                .cookie_policies
                .get(&k.rule_cookie)
                .and_then(|ps| ps.first());
            k.direction == DIRECTION_INGRESS
                && k.verdict == verdict
                && k.reason == reason
                && k.protocol == protocol
                && first.is_some_and(|p| {
                    p.namespace == policy.0 && format!("{}/{}", p.kind, p.name) == policy.1
                })
        })
        .map(|s| s.count)
        .sum()
}

#[tokio::test]
async fn metrics_attribute_drops_and_audits_to_the_deciding_policy() {
    let mut opts = LabOptions::new("metrics", default_topology());
    opts.admin_addr = Some("127.0.0.1:0".parse().unwrap());
    let lab = start_lab_with_options(opts).await;
    let addr = lab.admin_addr().expect("admin endpoint is up");
    assert_ne!(addr.port(), 0, "the bound port is reported");

    let health = http_get(addr, "/healthz", None).await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let ready = http_get(addr, "/readyz", None).await;
    assert_eq!(
        (ready.status, ready.body.as_str()),
        (200, "ready\n"),
        "the lab's first (empty) policy set was applied"
    );
    let missing = http_get(addr, "/nope", None).await;
    assert_eq!(missing.status, 404);

    lab.apply("policies.yaml", ALL_DECIDERS).await;
    let names: PublishedNames =
        serde_json::from_slice(&std::fs::read(lab.names_file()).expect("names file"))
            .expect("names file parses");

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
    for _ in 0..PROBES {
        // All at once: a drop takes one probe timeout.
        let (default_deny, l4_deny, cluster_deny, audit) = tokio::join!(
            probe("z/a", "y/a", tcp80),
            probe("x/c", "y/b", udp81),
            probe("x/b", "z/c", tcp80),
            probe("y/a", "x/a", tcp80),
        );
        assert_eq!(
            default_deny,
            ProbeOutcome::TimedOut,
            "z/a → y/a: default deny"
        );
        assert_eq!(l4_deny, ProbeOutcome::TimedOut, "x/c → y/b: L4Policy deny");
        assert_eq!(
            cluster_deny,
            ProbeOutcome::TimedOut,
            "x/b → z/c: quarantine"
        );
        assert_eq!(
            audit,
            ProbeOutcome::Reached,
            "y/a → x/a: audit lets it pass"
        );
    }

    let (text, samples) = scrape(&lab).await;
    eprintln!("{text}");
    let drops =
        |reason: &'static str, protocol: &'static str, ns: &'static str, policy: &'static str| {
            [
                ("direction", "ingress"),
                ("reason", reason),
                ("protocol", protocol),
                ("namespace", ns),
                ("policy", policy),
            ]
        };
    // Each kind of drop is counted under its policy, and the count is what
    // the kernel counted (a dropped TCP SYN may be retransmitted and a UDP
    // probe resends, so the kernel may count more decisions than probes).
    for (labels, verdict_reason, protocol) in [
        (
            drops("default_deny", "tcp", "y", "NetworkPolicy/default-deny"),
            REASON_DEFAULT_DENY,
            PROTO_TCP,
        ),
        (
            drops("policy", "udp", "y", "L4Policy/no-c"),
            REASON_POLICY,
            PROTO_UDP,
        ),
        (
            drops("policy", "tcp", "", "ClusterL4Policy/quarantine"),
            REASON_POLICY,
            PROTO_TCP,
        ),
    ] {
        let got = must(&samples, "portcullis_drops_total", &labels, &text) as u64;
        let kernel = kernel_count(
            &lab,
            &names,
            VERDICT_DENY,
            verdict_reason,
            protocol,
            (labels[3].1, labels[4].1),
        );
        assert!(got >= PROBES, "{labels:?}: {got} < {PROBES} probes\n{text}");
        assert_eq!(got, kernel, "{labels:?}: metrics vs kernel counters");
    }
    // An audited flow is one decision (its SYN) per probe, exactly.
    let audit_labels = [
        ("direction", "ingress"),
        ("protocol", "tcp"),
        ("namespace", "x"),
        ("policy", "L4Policy/trial"),
    ];
    let audited = must(&samples, "portcullis_audit_total", &audit_labels, &text) as u64;
    assert_eq!(audited, PROBES, "{text}");
    assert_eq!(
        audited,
        kernel_count(
            &lab,
            &names,
            VERDICT_AUDIT,
            REASON_DEFAULT_DENY,
            PROTO_TCP,
            ("x", "L4Policy/trial")
        )
    );
    let forwarded_audits = must(
        &samples,
        "portcullis_forwards_total",
        &[
            ("direction", "ingress"),
            ("reason", "audit"),
            ("protocol", "tcp"),
        ],
        &text,
    );
    assert_eq!(forwarded_audits as u64, PROBES, "audited flows passed");

    // Apply, map and agent metrics.
    let applied = must(
        &samples,
        "portcullis_policy_apply_seconds_count",
        &[],
        &text,
    );
    assert!(
        applied >= 2.0,
        "the initial and the policy apply: {applied}"
    );
    assert!(must(&samples, "portcullis_policy_apply_seconds_sum", &[], &text) > 0.0);
    // Every pass that reached the kernel is timed by stage.
    for stage in ["load", "compile", "desired", "write"] {
        let label = [("stage", stage)];
        assert_eq!(
            must(
                &samples,
                "portcullis_policy_pass_stage_seconds_count",
                &label,
                &text
            ),
            must(
                &samples,
                "portcullis_policy_applies_total",
                &[("result", "success")],
                &text
            ),
            "{stage}: one observation per pass that reached the kernel"
        );
        assert!(
            must(
                &samples,
                "portcullis_policy_pass_stage_seconds_sum",
                &label,
                &text
            ) > 0.0,
            "{stage} took no time:\n{text}"
        );
    }
    assert_eq!(
        must(
            &samples,
            "portcullis_policy_applies_total",
            &[("result", "success")],
            &text
        ),
        applied
    );
    assert_eq!(
        must(&samples, "portcullis_policy_problems", &[], &text),
        0.0
    );
    assert_eq!(
        must(
            &samples,
            "portcullis_bpf_map_entries",
            &[("map", "endpoints")],
            &text
        ) as usize,
        lab.pods().len()
    );
    assert!(
        must(
            &samples,
            "portcullis_bpf_map_entries",
            &[("map", "policy")],
            &text
        ) > 0.0
    );
    assert!(
        must(
            &samples,
            "portcullis_bpf_map_entries",
            &[("map", "counters")],
            &text
        ) > 0.0
    );
    assert_eq!(
        must(
            &samples,
            "portcullis_bpf_map_capacity",
            &[("map", "policy")],
            &text
        ),
        f64::from(portcullis_common::POLICY_CAPACITY / 2)
    );
    assert_eq!(
        must(&samples, "portcullis_uncounted_decisions_total", &[], &text),
        0.0
    );
    assert_eq!(
        must(
            &samples,
            "portcullis_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            &text
        ),
        1.0
    );
    promtool(&["check", "metrics"], Some(&text));

    // Prometheus asks for OpenMetrics and gets it.
    let om: HttpResponse = http_get(
        addr,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    )
    .await;
    assert_eq!(om.status, 200);
    assert!(
        om.content_type.starts_with("application/openmetrics-text"),
        "{}",
        om.content_type
    );
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    assert!(om.body.contains("# TYPE portcullis_drops counter"));

    // Removing the policies removes their series (labels only name
    // configured objects); the rest keep counting.
    lab.remove("policies.yaml").await;
    let (text, samples) = scrape(&lab).await;
    assert!(
        !samples
            .iter()
            .any(|(_, l, _)| l.get("policy").is_some_and(|p| !p.is_empty())),
        "no series names a deleted policy:\n{text}"
    );
    assert!(
        must(
            &samples,
            "portcullis_policy_apply_seconds_count",
            &[],
            &text
        ) > applied,
        "the removal was an apply too"
    );
    promtool(&["check", "metrics"], Some(&text));
    let ready = http_get(addr, "/readyz", None).await;
    assert_eq!(ready.status, 200, "{}", ready.body);
}
