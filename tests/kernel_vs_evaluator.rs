//! Property test through the real kernel: random small policy sets from a
//! grammar over the lab's labels, namespaces, ports and pod-address CIDRs;
//! for each, the measured matrix must equal the policy evaluator's
//! prediction, cell by cell.
//!
//! Seeded and reproducible: PORTCULLIS_PROPERTY_SEED (default below) and
//! PORTCULLIS_PROPERTY_CASES (default 25). A failure prints the seed, the
//! case number and the policies; PORTCULLIS_PROPERTY_VERBOSE=1 prints every
//! case and how many of its cells were allowed.

use std::collections::BTreeMap;

use portcullis_agent::lab::{report::ProbeSpec, Family};
use portcullis_tests::{start_lab, TestLab};

const DEFAULT_SEED: u64 = 0x5eed_c0de_2026;
const DEFAULT_CASES: usize = 25;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

/// splitmix64: small, deterministic, good enough for test generation.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, case: usize) -> Self {
        Rng(seed ^ (case as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
}

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

fn pod_selector(r: &mut Rng) -> String {
    match r.below(7) {
        0 => "{}".into(),
        1 | 2 => format!("{{matchLabels: {{pod: {}}}}}", r.pick(&PODS)),
        3 => format!(
            "{{matchExpressions: [{{key: pod, operator: In, values: [{}, {}]}}]}}",
            r.pick(&PODS),
            r.pick(&PODS)
        ),
        4 => format!(
            "{{matchExpressions: [{{key: pod, operator: NotIn, values: [{}]}}]}}",
            r.pick(&PODS)
        ),
        5 => "{matchExpressions: [{key: pod, operator: Exists}]}".into(),
        _ => "{matchExpressions: [{key: tier, operator: DoesNotExist}]}".into(),
    }
}

fn namespace_selector(r: &mut Rng) -> String {
    match r.below(6) {
        0 => "{}".into(),
        1 | 2 => format!("{{matchLabels: {{ns: {}}}}}", r.pick(&NAMESPACES)),
        3 => format!(
            "{{matchLabels: {{kubernetes.io/metadata.name: {}}}}}",
            r.pick(&NAMESPACES)
        ),
        4 => format!(
            "{{matchExpressions: [{{key: ns, operator: In, values: [{}, {}]}}]}}",
            r.pick(&NAMESPACES),
            r.pick(&NAMESPACES)
        ),
        _ => format!(
            "{{matchExpressions: [{{key: ns, operator: NotIn, values: [{}]}}]}}",
            r.pick(&NAMESPACES)
        ),
    }
}

/// A CIDR around a pod address (IPv4 198.18.1.(10+i) or IPv6
/// fd00:7063:6c00::1:(i+1)), with an optional except strictly inside it.
fn ip_block(r: &mut Rng) -> String {
    let v6 = r.chance(35);
    let bits: u32 = if v6 { 128 } else { 32 };
    let pod_addr = |i: usize| -> u128 {
        if v6 {
            u128::from("fd00:7063:6c00::1:0".parse::<std::net::Ipv6Addr>().unwrap()) + i as u128 + 1
        } else {
            u128::from(u32::from(std::net::Ipv4Addr::new(198, 18, 1, 10)) + i as u32)
        }
    };
    let full: u128 = if v6 { !0 } else { (1u128 << 32) - 1 };
    let mask = |len: u32| -> u128 {
        if len == 0 {
            0
        } else {
            full & !((1u128 << (bits - len)) - 1)
        }
    };
    let fmt = |addr: u128, len: u32| -> String {
        if v6 {
            format!("\"{}/{len}\"", std::net::Ipv6Addr::from(addr))
        } else {
            format!("{}/{len}", std::net::Ipv4Addr::from(addr as u32))
        }
    };
    let host = pod_addr(r.below(9));
    let lens: [u32; 7] = [0, 1, 2, 3, 4, 8, 128];
    let len = bits - lens[r.below(lens.len())].min(bits);
    let net = host & mask(len);
    let cidr = fmt(net, len);
    if len < bits && r.chance(50) {
        // An except strictly inside the block, around a pod address in it.
        let elen = (len + 1).max(bits - r.below(5) as u32);
        let mut e_host = pod_addr(r.below(9));
        if e_host & mask(len) != net {
            e_host = host;
        }
        format!(
            "{{ipBlock: {{cidr: {cidr}, except: [{}]}}}}",
            fmt(e_host & mask(elen), elen)
        )
    } else {
        format!("{{ipBlock: {{cidr: {cidr}}}}}")
    }
}

fn peer(r: &mut Rng, cluster: bool) -> String {
    match r.below(5) {
        0 => format!("{{podSelector: {}}}", pod_selector(r)),
        1 => format!("{{namespaceSelector: {}}}", namespace_selector(r)),
        2 => format!(
            "{{namespaceSelector: {}, podSelector: {}}}",
            namespace_selector(r),
            pod_selector(r)
        ),
        3 if cluster => format!("{{namespaceSelector: {}}}", namespace_selector(r)),
        _ => ip_block(r),
    }
}

fn port(r: &mut Rng) -> String {
    let proto = |r: &mut Rng| if r.chance(50) { "TCP" } else { "UDP" };
    match r.below(6) {
        0 => format!("{{port: {}}}", r.pick(&["80", "81"])),
        1 => format!(
            "{{protocol: {}, port: {}}}",
            proto(r),
            r.pick(&["80", "81"])
        ),
        2 => format!("{{protocol: {}}}", proto(r)),
        3 => {
            let p = proto(r);
            format!(
                "{{protocol: {p}, port: 80, endPort: {}}}",
                r.pick(&["80", "81", "90"])
            )
        }
        4 => {
            // Named ports, sometimes with a protocol that does not match the name.
            let name = r.pick(&[
                "serve-80-tcp",
                "serve-81-tcp",
                "serve-80-udp",
                "serve-81-udp",
            ]);
            format!("{{protocol: {}, port: {name}}}", proto(r))
        }
        _ => "{protocol: UDP, port: 81}".into(),
    }
}

fn list(r: &mut Rng, max: usize, mut item: impl FnMut(&mut Rng) -> String) -> String {
    let n = 1 + r.below(max);
    let items: Vec<String> = (0..n).map(|_| item(r)).collect();
    format!("[{}]", items.join(", "))
}

/// One NetworkPolicy-shaped rule: `{from|to: [...], ports: [...]}`.
fn rule(r: &mut Rng, peers_key: &str) -> String {
    let mut fields = Vec::new();
    match r.below(10) {
        0..=2 => {}
        3 => fields.push(format!("{peers_key}: []")),
        _ => fields.push(format!("{peers_key}: {}", list(r, 2, |r| peer(r, false)))),
    }
    if r.chance(60) {
        fields.push(format!("ports: {}", list(r, 2, port)));
    }
    format!("{{{}}}", fields.join(", "))
}

fn rules(r: &mut Rng, peers_key: &str) -> String {
    if r.chance(15) {
        "[]".into()
    } else {
        list(r, 2, |r| rule(r, peers_key))
    }
}

fn network_policy(r: &mut Rng, name: &str) -> String {
    let mut spec = vec![format!("podSelector: {}", pod_selector(r))];
    match r.below(8) {
        0 => spec.push("policyTypes: [Ingress]".into()),
        1 => spec.push("policyTypes: [Egress]".into()),
        2 => spec.push("policyTypes: [Ingress, Egress]".into()),
        _ => {}
    }
    if r.chance(70) {
        spec.push(format!("ingress: {}", rules(r, "from")));
    }
    if r.chance(50) {
        spec.push(format!("egress: {}", rules(r, "to")));
    }
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {}}}\nspec:\n  {}\n",
        r.pick(&NAMESPACES),
        spec.join("\n  ")
    )
}

fn l4_policy(r: &mut Rng, name: &str) -> String {
    let mut spec = vec![format!("podSelector: {}", pod_selector(r))];
    if r.chance(20) {
        spec.push("mode: Audit".into());
    }
    if r.chance(40) {
        spec.push(format!("ingress: {}", rules(r, "from")));
    }
    if r.chance(30) {
        spec.push(format!("egress: {}", rules(r, "to")));
    }
    if r.chance(60) {
        spec.push(format!("ingressDeny: {}", list(r, 2, |r| rule(r, "from"))));
    }
    if r.chance(40) {
        spec.push(format!("egressDeny: {}", list(r, 2, |r| rule(r, "to"))));
    }
    format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: L4Policy\nmetadata: {{name: {name}, namespace: {}}}\nspec:\n  {}\n",
        r.pick(&NAMESPACES),
        spec.join("\n  ")
    )
}

fn cluster_rule(r: &mut Rng, admin: bool, peers_key: &str) -> String {
    let actions: &[&str] = if admin {
        &["Allow", "Deny", "Pass"]
    } else {
        &["Allow", "Deny"]
    };
    let mut fields = vec![format!("action: {}", r.pick(actions))];
    if r.chance(70) {
        fields.push(format!("{peers_key}: {}", list(r, 2, |r| peer(r, true))));
    }
    if r.chance(50) {
        fields.push(format!("ports: {}", list(r, 2, port)));
    }
    format!("{{{}}}", fields.join(", "))
}

fn cluster_policy(r: &mut Rng, name: &str) -> String {
    let admin = r.chance(60);
    let mut spec = vec![
        format!("tier: {}", if admin { "Admin" } else { "Baseline" }),
        format!("priority: {}", r.pick(&["0", "5", "10", "10", "1000"])),
    ];
    let mut subject = Vec::new();
    if r.chance(60) {
        subject.push(format!("namespaceSelector: {}", namespace_selector(r)));
    }
    if r.chance(50) {
        subject.push(format!("podSelector: {}", pod_selector(r)));
    }
    spec.push(format!("subject: {{{}}}", subject.join(", ")));
    if r.chance(70) {
        spec.push(format!(
            "ingress: {}",
            list(r, 3, |r| cluster_rule(r, admin, "from"))
        ));
    }
    if r.chance(50) {
        spec.push(format!(
            "egress: {}",
            list(r, 3, |r| cluster_rule(r, admin, "to"))
        ));
    }
    format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: ClusterL4Policy\nmetadata: {{name: {name}}}\nspec:\n  {}\n",
        spec.join("\n  ")
    )
}

fn diff(
    got: &BTreeMap<String, BTreeMap<String, bool>>,
    want: &BTreeMap<String, BTreeMap<String, bool>>,
) -> Vec<String> {
    let mut d = Vec::new();
    for (f, row) in want {
        for (t, w) in row {
            let g = got.get(f).and_then(|r| r.get(t)).copied();
            if g != Some(*w) {
                d.push(format!("  {f} → {t}: evaluator {w}, kernel {g:?}"));
            }
        }
    }
    d
}

async fn run(lab: &TestLab, what: &str, generate: impl Fn(&mut Rng) -> String) {
    let seed: u64 = env_or("PORTCULLIS_PROPERTY_SEED", DEFAULT_SEED);
    let cases: usize = env_or("PORTCULLIS_PROPERTY_CASES", DEFAULT_CASES);
    eprintln!("{what}: seed {seed:#x}, {cases} cases (PORTCULLIS_PROPERTY_SEED / PORTCULLIS_PROPERTY_CASES)");
    let verbose = std::env::var_os("PORTCULLIS_PROPERTY_VERBOSE").is_some();
    let mut failures = Vec::new();
    for case in 0..cases {
        let mut r = Rng::new(seed, case);
        let yaml = generate(&mut r);
        lab.apply("case.yaml", &yaml).await;
        if verbose {
            eprintln!("case {case}:\n{yaml}");
        }
        let mut probes = vec![("80/tcp", Family::Ipv4), ("81/udp", Family::Ipv4)];
        if case % 5 == 4 {
            probes.push(("80/tcp", Family::Ipv6));
        }
        for (spec, family) in probes {
            let measured = lab.matrix(spec, family).await.booleans();
            let spec: ProbeSpec = spec.parse().unwrap();
            let predicted = lab.evaluator_matrix(&spec, family);
            let d = diff(&measured, &predicted);
            if verbose {
                let allowed = measured
                    .values()
                    .flat_map(|r| r.values())
                    .filter(|a| **a)
                    .count();
                eprintln!("case {case} {spec:?} {family:?}: {allowed}/81 allowed");
            }
            if !d.is_empty() {
                failures.push(format!(
                    "case {case} (seed {seed:#x}), {}/{} over {family:?}: {} cell(s) differ\n{}\npolicies:\n{yaml}",
                    spec.port,
                    format!("{:?}", spec.protocol).to_lowercase(),
                    d.len(),
                    d.join("\n")
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: kernel and evaluator disagree in {} probe(s); reproduce with \
         PORTCULLIS_PROPERTY_SEED={seed} PORTCULLIS_PROPERTY_CASES={cases}\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[tokio::test]
async fn random_network_policies_kernel_matches_evaluator() {
    let lab = start_lab("kve-np").await;
    run(&lab, "NetworkPolicy", |r| {
        let n = 1 + r.below(3);
        (0..n)
            .map(|i| network_policy(r, &format!("p{i}")))
            .collect::<Vec<_>>()
            .join("---\n")
    })
    .await;
}

#[tokio::test]
async fn random_policies_with_l4_and_cluster_policies_kernel_matches_evaluator() {
    let lab = start_lab("kve-crd").await;
    run(&lab, "NetworkPolicy + L4Policy + ClusterL4Policy", |r| {
        let mut docs = Vec::new();
        for i in 0..r.below(3) {
            docs.push(network_policy(r, &format!("np{i}")));
        }
        for i in 0..1 + r.below(2) {
            docs.push(l4_policy(r, &format!("l4-{i}")));
        }
        for i in 0..1 + r.below(2) {
            docs.push(cluster_policy(r, &format!("c{i}")));
        }
        docs.join("---\n")
    })
    .await;
}
