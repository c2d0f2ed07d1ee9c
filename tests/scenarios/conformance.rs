// The conformance scenarios, included by `conformance.rs` (plain lab) and
// `conformance_mesh.rs` (every pod meshed STRICT): each binary defines
// `start_lab` and `start_lab_with` before including this file.

use std::collections::{BTreeMap, BTreeSet};

use portcullis_agent::lab::{
    topology::{default_topology, Topology},
    Family::{Ipv4, Ipv6},
};
use portcullis_common::{DIRECTION_EGRESS, DIRECTION_INGRESS, VERDICT_AUDIT, VERDICT_DENY};
use portcullis_tests::TestLab;

fn ns(p: &str) -> &str {
    p.split('/').next().unwrap()
}

fn pod(p: &str) -> &str {
    p.split('/').nth(1).unwrap()
}

fn all(_: &str, _: &str) -> bool {
    true
}

fn indent(spec: &str) -> String {
    spec.trim_matches('\n')
        .lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A NetworkPolicy document; `spec` is the body of `spec:`.
fn np(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{}\n",
        indent(spec)
    )
}

/// An L4Policy document.
fn l4(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: L4Policy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{}\n",
        indent(spec)
    )
}

/// A ClusterL4Policy document (cluster-scoped: no namespace).
fn cl4(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: ClusterL4Policy\nmetadata: {{name: {name}}}\nspec:\n{}\n",
        indent(spec)
    )
}

fn docs(d: &[String]) -> String {
    d.join("---\n")
}

/// One test per scenario, each on its own lab named after it.
macro_rules! scenario {
    ($(#[$m:meta])* $name:ident, |$lab:ident| $body:block) => {
        $(#[$m])*
        #[tokio::test]
        async fn $name() {
            let $lab = start_lab(concat!("cf-", stringify!($name))).await;
            $body
        }
    };
    ($(#[$m:meta])* $name:ident, topology = $topo:expr, |$lab:ident| $body:block) => {
        $(#[$m])*
        #[tokio::test]
        async fn $name() {
            let $lab = start_lab_with(concat!("cf-", stringify!($name)), $topo).await;
            $body
        }
    };
}

/// Kernel counters for one direction and verdict: total count and the rule
/// cookies seen.
fn counted(lab: &TestLab, direction: u8, verdict: u8) -> (u64, BTreeSet<u32>) {
    let samples = lab.counters().expect("reading kernel counters");
    let mut total = 0;
    let mut cookies = BTreeSet::new();
    for s in samples
        .iter()
        .filter(|s| s.key.direction == direction && s.key.verdict == verdict)
    {
        total += s.count;
        if s.count > 0 {
            cookies.insert(s.key.rule_cookie);
        }
    }
    (total, cookies)
}

/// Per-cookie counts for one direction and verdict.
fn counted_by_cookie(lab: &TestLab, direction: u8, verdict: u8) -> BTreeMap<u32, u64> {
    let mut m = BTreeMap::new();
    for s in lab
        .counters()
        .expect("reading kernel counters")
        .iter()
        .filter(|s| s.key.direction == direction && s.key.verdict == verdict)
    {
        *m.entry(s.key.rule_cookie).or_default() += s.count;
    }
    m
}

fn delta(after: &BTreeMap<u32, u64>, before: &BTreeMap<u32, u64>) -> BTreeMap<u32, u64> {
    after
        .iter()
        .map(|(c, n)| (*c, n - before.get(c).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Default topology plus labels for set-based selector tests: pods x/a, y/b
/// and z/c carry tier=web; namespace y carries env=prod.
fn tiered() -> Topology {
    let mut t = default_topology();
    for w in &mut t.workloads {
        if matches!(
            (w.namespace.as_str(), w.name.as_str()),
            ("x", "a") | ("y", "b") | ("z", "c")
        ) {
            w.labels.insert("tier".into(), "web".into());
        }
    }
    for n in &mut t.namespaces {
        if n.name == "y" {
            n.labels.insert("env".into(), "prod".into());
        }
    }
    t
}

/// Default topology where the port name `web` means TCP 80 on pods a, TCP 81
/// on pods b, and does not exist on pods c (which keep the default names).
fn web_port_topology() -> Topology {
    let mut t = default_topology();
    for w in &mut t.workloads {
        let web = match w.name.as_str() {
            "a" => Some(80),
            "b" => Some(81),
            _ => None,
        };
        for p in &mut w.ports {
            if Some(p.container_port) == web && p.protocol == "TCP" {
                p.name = Some("web".into());
            }
        }
    }
    t
}

/// The TCP port `web` names on a pod of [`web_port_topology`].
fn web_port(p: &str) -> Option<u16> {
    match pod(p) {
        "a" => Some(80),
        "b" => Some(81),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// NetworkPolicy: isolation, selectors, peers
// ---------------------------------------------------------------------------

scenario!(np_no_policy_allows_everything, |lab| {
    lab.assert_matrix("80/tcp", Ipv4, all).await;
    lab.assert_matrix("81/udp", Ipv6, all).await;
});

scenario!(
    np_default_deny_ingress_isolates_whole_namespace_tcp_and_udp,
    |lab| {
        lab.apply(
            "deny.yaml",
            &np(
                "y",
                "default-deny",
                "podSelector: {}\npolicyTypes: [Ingress]",
            ),
        )
        .await;
        let want = |f: &str, t: &str| f == t || ns(t) != "y";
        lab.assert_matrix("80/tcp", Ipv4, want).await;
        lab.assert_matrix("81/udp", Ipv4, want).await;
    }
);

scenario!(np_ingress_empty_list_isolates_selected_pod_only, |lab| {
    lab.apply(
        "p.yaml",
        &np(
            "x",
            "a-closed",
            "podSelector: {matchLabels: {pod: a}}\ningress: []",
        ),
    )
    .await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || t != "x/a")
        .await;
});

scenario!(np_ingress_empty_rule_allows_all_sources_and_ports, |lab| {
    lab.apply(
        "p.yaml",
        &docs(&[
            np("x", "all-closed", "podSelector: {}\ningress: []"),
            np(
                "x",
                "a-open",
                "podSelector: {matchLabels: {pod: a}}\ningress: [{}]",
            ),
        ]),
    )
    .await;
    let want = |f: &str, t: &str| f == t || ns(t) != "x" || t == "x/a";
    lab.assert_matrix("80/tcp", Ipv4, want).await;
    lab.assert_matrix("81/udp", Ipv4, want).await;
});

scenario!(np_absent_from_matches_all_sources_on_listed_port, |lab| {
    lab.apply(
        "p.yaml",
        &np(
            "z",
            "c-web",
            "podSelector: {matchLabels: {pod: c}}\ningress:\n- ports: [{port: 80}]",
        ),
    )
    .await;
    lab.assert_matrix("80/tcp", Ipv4, all).await;
    lab.assert_matrix("81/tcp", Ipv4, |f, t| f == t || t != "z/c")
        .await;
});

scenario!(
    np_empty_from_list_matches_all_sources_like_absent_from,
    |lab| {
        lab.apply(
            "p.yaml",
            &np(
                "y",
                "b-web",
                "podSelector: {matchLabels: {pod: b}}\ningress:\n- from: []\n  ports: [{port: 80}]",
            ),
        )
        .await;
        lab.assert_matrix("80/tcp", Ipv4, all).await;
        lab.assert_matrix("81/tcp", Ipv4, |f, t| f == t || t != "y/b")
            .await;
    }
);

scenario!(
    np_pod_selector_peer_selects_in_policy_namespace_only,
    |lab| {
        lab.apply(
            "p.yaml",
            &np(
                "y",
                "from-a",
                "podSelector: {}\ningress:\n- from: [{podSelector: {matchLabels: {pod: a}}}]",
            ),
        )
        .await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || ns(t) != "y" || f == "y/a")
            .await;
    }
);

scenario!(
    np_namespace_selector_match_labels_selects_namespace,
    |lab| {
        lab.apply(
            "p.yaml",
            &np(
                "z",
                "from-x",
                "podSelector: {}\ningress:\n- from: [{namespaceSelector: {matchLabels: {ns: x}}}]",
            ),
        )
        .await;
        let want = |f: &str, t: &str| f == t || ns(t) != "z" || ns(f) == "x";
        lab.assert_matrix("80/tcp", Ipv4, want).await;
        lab.assert_matrix("81/udp", Ipv6, want).await;
    }
);

scenario!(
    np_empty_namespace_selector_matches_pods_of_all_namespaces,
    |lab| {
        lab.apply("p.yaml", &np("x", "b-any", "podSelector: {matchLabels: {pod: b}}\ningress:\n- from: [{namespaceSelector: {}}]\n  ports: [{port: 80}]")).await;
        lab.assert_matrix("80/tcp", Ipv4, all).await;
        lab.assert_matrix("81/tcp", Ipv4, |f, t| f == t || t != "x/b")
            .await;
    }
);

scenario!(
    np_empty_pod_selector_peer_matches_own_namespace_only,
    |lab| {
        lab.apply(
            "p.yaml",
            &np(
                "x",
                "b-local",
                "podSelector: {matchLabels: {pod: b}}\ningress:\n- from: [{podSelector: {}}]",
            ),
        )
        .await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || t != "x/b" || ns(f) == "x")
            .await;
    }
);

scenario!(np_namespace_and_pod_selector_in_one_peer_are_anded, |lab| {
    lab.apply("p.yaml", &np("z", "c-from-yb", "podSelector: {matchLabels: {pod: c}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]")).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || t != "z/c" || f == "y/b")
        .await;
});

scenario!(
    np_namespace_and_pod_selector_in_separate_peers_are_ored,
    |lab| {
        lab.apply("p.yaml", &np("z", "c-from-y-or-b", "podSelector: {matchLabels: {pod: c}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {ns: y}}}, {podSelector: {matchLabels: {pod: b}}}]")).await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| {
            f == t || t != "z/c" || ns(f) == "y" || f == "z/b"
        })
        .await;
    }
);

scenario!(np_match_expressions_in_on_namespaces_and_pods, |lab| {
    lab.apply(
        "p.yaml",
        &np(
            "x",
            "in",
            r#"
podSelector: {}
ingress:
- from:
  - namespaceSelector: {matchExpressions: [{key: ns, operator: In, values: [y, z]}]}
    podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, c]}]}
"#,
        ),
    )
    .await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| {
        f == t || ns(t) != "x" || (ns(f) != "x" && pod(f) != "b")
    })
    .await;
});

scenario!(np_match_expressions_notin_on_target_and_namespaces, |lab| {
    lab.apply(
        "p.yaml",
        &np(
            "y",
            "notin",
            r#"
podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [b]}]}
ingress:
- from:
  - namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x, y]}]}
"#,
        ),
    )
    .await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| {
        f == t || !(t == "y/a" || t == "y/c") || ns(f) == "z"
    })
    .await;
});

scenario!(
    np_match_expressions_exists_and_does_not_exist_on_standard_labels,
    |lab| {
        lab.apply("p.yaml", &docs(&[
        np("z", "a-exists", "podSelector: {matchLabels: {pod: a}}\ningress:\n- from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: Exists}]}}]"),
        np("z", "b-none", "podSelector: {matchLabels: {pod: b}}\ningress:\n- from: [{namespaceSelector: {}, podSelector: {matchExpressions: [{key: pod, operator: DoesNotExist}]}}]"),
        np("z", "c-by-name", "podSelector: {matchLabels: {pod: c}}\ningress:\n- from: [{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [y]}]}}]"),
    ])).await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| {
            f == t
                || match t {
                    "z/b" => false,
                    "z/c" => ns(f) == "y",
                    _ => true,
                }
        })
        .await;
    }
);

scenario!(
    np_exists_peer_selects_only_labelled_pods,
    topology = tiered(),
    |lab| {
        lab.apply("p.yaml", &np("x", "from-web", "podSelector: {}\ningress:\n- from: [{namespaceSelector: {}, podSelector: {matchExpressions: [{key: tier, operator: Exists}]}}]")).await;
        let web = |p: &str| matches!(p, "x/a" | "y/b" | "z/c");
        lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || ns(t) != "x" || web(f))
            .await;
    }
);

scenario!(
    np_does_not_exist_selects_unlabelled_namespaces_and_targets,
    topology = tiered(),
    |lab| {
        lab.apply("p.yaml", &docs(&[
        np("z", "not-prod", "podSelector: {matchExpressions: [{key: tier, operator: DoesNotExist}]}\ningress:\n- from: [{namespaceSelector: {matchExpressions: [{key: env, operator: DoesNotExist}]}}]"),
        np("z", "web-closed", "podSelector: {matchExpressions: [{key: tier, operator: Exists}]}\ningress: []"),
    ])).await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| {
            f == t || ns(t) != "z" || (t != "z/c" && ns(f) != "y")
        })
        .await;
    }
);

scenario!(
    np_notin_matches_pods_without_the_key,
    topology = tiered(),
    |lab| {
        lab.apply("p.yaml", &np("y", "a-not-web", "podSelector: {matchLabels: {pod: a}}\ningress:\n- from: [{namespaceSelector: {}, podSelector: {matchExpressions: [{key: tier, operator: NotIn, values: [web]}]}}]")).await;
        let web = |p: &str| matches!(p, "x/a" | "y/b" | "z/c");
        lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || t != "y/a" || !web(f))
            .await;
    }
);

// ---------------------------------------------------------------------------
// NetworkPolicy: policyTypes, directions, union
// ---------------------------------------------------------------------------

scenario!(
    np_explicit_egress_policy_type_ignores_ingress_rules,
    |lab| {
        lab.apply(
            "p.yaml",
            &np(
                "x",
                "a-out",
                r#"
podSelector: {matchLabels: {pod: a}}
policyTypes: [Egress]
ingress:
- from: [{podSelector: {matchLabels: {pod: b}}}]
egress:
- to: [{namespaceSelector: {matchLabels: {ns: y}}}]
"#,
            ),
        )
        .await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || f != "x/a" || ns(t) == "y")
            .await;
    }
);

scenario!(
    np_default_policy_types_ingress_only_leaves_egress_open,
    |lab| {
        lab.apply("p.yaml", &np("x", "a-in", "podSelector: {matchLabels: {pod: a}}\ningress:\n- from: [{podSelector: {matchLabels: {pod: b}}}]")).await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || t != "x/a" || f == "x/b")
            .await;
    }
);

scenario!(
    np_egress_rules_without_policy_types_isolate_ingress_too,
    |lab| {
        // Upstream default: policyTypes always contains Ingress, plus Egress when
        // the policy has egress rules. No ingress rules: x/a's ingress is closed.
        lab.apply("p.yaml", &np("x", "a-out", "podSelector: {matchLabels: {pod: a}}\negress:\n- to: [{namespaceSelector: {matchLabels: {ns: z}}}]")).await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| {
            f == t || (t != "x/a" && (f != "x/a" || ns(t) == "z"))
        })
        .await;
    }
);

scenario!(
    np_ingress_and_egress_policy_types_without_rules_deny_both_ways,
    |lab| {
        lab.apply(
            "p.yaml",
            &np(
                "z",
                "lockdown",
                "podSelector: {}\npolicyTypes: [Ingress, Egress]",
            ),
        )
        .await;
        let want = |f: &str, t: &str| f == t || (ns(f) != "z" && ns(t) != "z");
        lab.assert_matrix("80/tcp", Ipv4, want).await;
        lab.assert_matrix("81/udp", Ipv6, want).await;
    }
);

scenario!(np_egress_default_deny_blocks_only_selected_sources, |lab| {
    lab.apply(
        "p.yaml",
        &np("x", "no-out", "podSelector: {}\npolicyTypes: [Egress]"),
    )
    .await;
    let want = |f: &str, t: &str| f == t || ns(f) != "x";
    lab.assert_matrix("80/tcp", Ipv4, want).await;
    lab.assert_matrix("80/udp", Ipv4, want).await;
});

scenario!(
    np_source_egress_and_destination_ingress_must_both_allow,
    |lab| {
        lab.apply("p.yaml", &docs(&[
        np("x", "a-out", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\negress:\n- to: [{namespaceSelector: {matchLabels: {ns: y}}}]"),
        np("y", "b-in", "podSelector: {matchLabels: {pod: b}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {ns: z}}}, {namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: c}}}]"),
    ])).await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| {
            let egress = f != "x/a" || ns(t) == "y";
            let ingress = t != "y/b" || ns(f) == "z" || f == "x/c";
            f == t || (egress && ingress)
        })
        .await;
    }
);

scenario!(
    np_allows_of_all_policies_selecting_a_pod_are_unioned,
    |lab| {
        lab.apply("p.yaml", &docs(&[
        np("y", "web-from-x", "podSelector: {matchLabels: {pod: a}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {ns: x}}}]\n  ports: [{port: 80}]"),
        np("y", "all-from-c", "podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}\ningress:\n- from: [{podSelector: {matchLabels: {pod: c}}}]"),
    ])).await;
        let target = |t: &str| t == "y/a" || t == "y/b";
        lab.assert_matrix("80/tcp", Ipv4, |f, t| {
            f == t || !target(t) || f == "y/c" || (t == "y/a" && ns(f) == "x")
        })
        .await;
        lab.assert_matrix("81/tcp", Ipv4, |f, t| f == t || !target(t) || f == "y/c")
            .await;
    }
);

// ---------------------------------------------------------------------------
// NetworkPolicy: ipBlock
// ---------------------------------------------------------------------------

scenario!(np_ipblock_ipv4_cidr_with_except_ingress, |lab| {
    // 198.18.1.8/29 = .8–.15: x/a, x/b, x/c, y/a, y/b, y/c; except x/c (.12).
    lab.apply("p.yaml", &np("z", "a-from-block", "podSelector: {matchLabels: {pod: a}}\ningress:\n- from: [{ipBlock: {cidr: 198.18.1.8/29, except: [198.18.1.12/32]}}]")).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| {
        f == t || t != "z/a" || matches!(f, "x/a" | "x/b" | "y/a" | "y/b" | "y/c")
    })
    .await;
    // An IPv4 block matches no IPv6 source.
    lab.assert_matrix("80/tcp", Ipv6, |f, t| f == t || t != "z/a")
        .await;
});

scenario!(np_ipblock_ipv6_cidr_with_except_ingress, |lab| {
    // ::1:0/124 covers every pod; except ::1:4/126 = y/a, y/b, y/c, z/a.
    lab.apply("p.yaml", &np("y", "c-from-block", "podSelector: {matchLabels: {pod: c}}\ningress:\n- from: [{ipBlock: {cidr: \"fd00:7063:6c00::1:0/124\", except: [\"fd00:7063:6c00::1:4/126\"]}}]")).await;
    lab.assert_matrix("80/tcp", Ipv6, |f, t| {
        f == t || t != "y/c" || matches!(f, "x/a" | "x/b" | "x/c" | "z/b" | "z/c")
    })
    .await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || t != "y/c")
        .await;
});

scenario!(np_ipblock_single_hosts_slash_32_and_slash_128, |lab| {
    lab.apply("p.yaml", &np("x", "b-hosts", "podSelector: {matchLabels: {pod: b}}\ningress:\n- from: [{ipBlock: {cidr: 198.18.1.16/32}}, {ipBlock: {cidr: \"fd00:7063:6c00::1:9/128\"}}]")).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || t != "x/b" || f == "z/a")
        .await;
    lab.assert_matrix("80/tcp", Ipv6, |f, t| f == t || t != "x/b" || f == "z/c")
        .await;
});

scenario!(np_ipblock_all_ipv4_with_except_egress, |lab| {
    // except 198.18.1.16/30 = .16–.19: z/a, z/b, z/c.
    lab.apply("p.yaml", &np("x", "c-out", "podSelector: {matchLabels: {pod: c}}\npolicyTypes: [Egress]\negress:\n- to: [{ipBlock: {cidr: 0.0.0.0/0, except: [198.18.1.16/30]}}]")).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || f != "x/c" || ns(t) != "z")
        .await;
    lab.assert_matrix("80/tcp", Ipv6, |f, t| f == t || f != "x/c")
        .await;
});

scenario!(np_ipblock_all_ipv6_with_except_egress, |lab| {
    // except ::1:2/127 = x/b, x/c.
    lab.apply("p.yaml", &np("x", "a-out", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\negress:\n- to: [{ipBlock: {cidr: \"::/0\", except: [\"fd00:7063:6c00::1:2/127\"]}}]")).await;
    lab.assert_matrix("80/tcp", Ipv6, |f, t| {
        f == t || f != "x/a" || !(t == "x/b" || t == "x/c")
    })
    .await;
    // ::/0 is IPv6 only: IPv4 destinations are not in it.
    lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || f != "x/a")
        .await;
});

scenario!(np_ipblock_and_selector_peers_are_ored, |lab| {
    lab.apply("p.yaml", &np("y", "a-mixed", "podSelector: {matchLabels: {pod: a}}\ningress:\n- from: [{ipBlock: {cidr: 198.18.1.10/31}}, {namespaceSelector: {matchLabels: {ns: z}}}]")).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| {
        f == t || t != "y/a" || f == "x/a" || f == "x/b" || ns(f) == "z"
    })
    .await;
    lab.assert_matrix("80/tcp", Ipv6, |f, t| f == t || t != "y/a" || ns(f) == "z")
        .await;
});

// ---------------------------------------------------------------------------
// NetworkPolicy: ports
// ---------------------------------------------------------------------------

scenario!(
    np_numeric_tcp_port_opens_neither_udp_nor_other_ports,
    |lab| {
        lab.apply("p.yaml", &np("x", "a-81", "podSelector: {matchLabels: {pod: a}}\ningress:\n- ports: [{protocol: TCP, port: 81}]")).await;
        let closed = |f: &str, t: &str| f == t || t != "x/a";
        lab.assert_matrix("81/tcp", Ipv4, all).await;
        lab.assert_matrix("81/udp", Ipv4, closed).await;
        lab.assert_matrix("80/tcp", Ipv4, closed).await;
    }
);

scenario!(np_port_without_protocol_means_tcp, |lab| {
    lab.apply(
        "p.yaml",
        &np(
            "y",
            "b-80",
            "podSelector: {matchLabels: {pod: b}}\ningress:\n- ports: [{port: 80}]",
        ),
    )
    .await;
    lab.assert_matrix("80/tcp", Ipv4, all).await;
    lab.assert_matrix("80/udp", Ipv4, |f, t| f == t || t != "y/b")
        .await;
});

scenario!(np_udp_port_rule_opens_udp_only, |lab| {
    lab.apply(
        "p.yaml",
        &np(
            "y",
            "b-dns",
            "podSelector: {matchLabels: {pod: b}}\ningress:\n- ports: [{protocol: UDP, port: 80}]",
        ),
    )
    .await;
    lab.assert_matrix("80/udp", Ipv6, all).await;
    lab.assert_matrix("80/tcp", Ipv6, |f, t| f == t || t != "y/b")
        .await;
});

scenario!(
    np_protocol_without_port_matches_every_port_of_that_protocol,
    |lab| {
        lab.apply(
            "p.yaml",
            &np(
                "z",
                "b-udp",
                "podSelector: {matchLabels: {pod: b}}\ningress:\n- ports: [{protocol: UDP}]",
            ),
        )
        .await;
        lab.assert_matrix("80/udp", Ipv4, all).await;
        lab.assert_matrix("81/udp", Ipv4, all).await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || t != "z/b")
            .await;
    }
);

scenario!(
    np_named_port_ingress_needs_name_and_protocol_to_match,
    |lab| {
        lab.apply("p.yaml", &docs(&[
        np("z", "b-named", "podSelector: {matchLabels: {pod: b}}\ningress:\n- ports: [{protocol: UDP, port: serve-81-udp}]"),
        // Protocol defaults to TCP; z/c has no TCP port named serve-81-udp.
        np("z", "c-named-tcp", "podSelector: {matchLabels: {pod: c}}\ningress:\n- ports: [{port: serve-81-udp}]"),
    ])).await;
        lab.assert_matrix("81/udp", Ipv4, |f, t| f == t || t != "z/c")
            .await;
        lab.assert_matrix("80/udp", Ipv4, |f, t| f == t || !(t == "z/b" || t == "z/c"))
            .await;
        lab.assert_matrix("81/tcp", Ipv4, |f, t| f == t || !(t == "z/b" || t == "z/c"))
            .await;
    }
);

scenario!(np_named_port_egress_resolves_on_destination, |lab| {
    lab.apply("p.yaml", &np("x", "a-out", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\negress:\n- to: [{namespaceSelector: {matchLabels: {ns: y}}}]\n  ports: [{port: serve-80-tcp}]")).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || f != "x/a" || ns(t) == "y")
        .await;
    lab.assert_matrix("81/tcp", Ipv4, |f, t| f == t || f != "x/a")
        .await;
});

scenario!(
    np_named_port_means_different_numbers_on_different_pods,
    topology = web_port_topology(),
    |lab| {
        lab.apply("p.yaml", &docs(&[
        np("z", "web-in", "podSelector: {}\ningress:\n- from: [{namespaceSelector: {}}]\n  ports: [{port: web}]"),
        np("x", "c-web-out", "podSelector: {matchLabels: {pod: c}}\npolicyTypes: [Egress]\negress:\n- ports: [{port: web}]"),
    ])).await;
        for port in [80u16, 81] {
            let want = move |f: &str, t: &str| {
                let egress = f != "x/c" || web_port(t) == Some(port);
                let ingress = ns(t) != "z" || web_port(t) == Some(port);
                f == t || (egress && ingress)
            };
            lab.assert_matrix(&format!("{port}/tcp"), Ipv4, want).await;
        }
    }
);

scenario!(np_end_port_ranges, |lab| {
    lab.apply("p.yaml", &docs(&[
        np("y", "c-range", "podSelector: {matchLabels: {pod: c}}\ningress:\n- ports: [{protocol: TCP, port: 80, endPort: 81}]"),
        np("x", "b-range", "podSelector: {matchLabels: {pod: b}}\ningress:\n- ports: [{protocol: UDP, port: 81, endPort: 90}]"),
    ])).await;
    let tcp = |f: &str, t: &str| f == t || t != "x/b";
    lab.assert_matrix("80/tcp", Ipv4, tcp).await;
    lab.assert_matrix("81/tcp", Ipv4, tcp).await;
    lab.assert_matrix("80/udp", Ipv4, |f, t| f == t || !(t == "x/b" || t == "y/c"))
        .await;
    lab.assert_matrix("81/udp", Ipv4, |f, t| f == t || t != "y/c")
        .await;
});

// Upstream e2e: a policy allowing only SCTP is accepted and isolates; its
// SCTP port never admits TCP or UDP.
scenario!(
    np_sctp_only_policy_isolates_and_never_admits_tcp_or_udp,
    |lab| {
        lab.apply(
            "sctp.yaml",
            &np(
                "x",
                "sctp-web",
                "podSelector: {}\ningress:\n- ports: [{protocol: SCTP, port: 80}]",
            ),
        )
        .await;
        let isolated_x = |f: &str, t: &str| f == t || !t.starts_with("x/");
        lab.assert_matrix("80/tcp", Ipv4, isolated_x).await;
        lab.assert_matrix("80/udp", Ipv4, isolated_x).await;
    }
);

scenario!(np_end_port_below_port_is_rejected_naming_the_field, |lab| {
    lab.apply_expect_problem(
        "range.yaml",
        &np(
            "x",
            "bad-range",
            "podSelector: {}\ningress:\n- ports: [{protocol: TCP, port: 81, endPort: 80}]",
        ),
        &["range.yaml", "bad-range", "endPort"],
    )
    .await;
    lab.assert_kernel_matrix("80/tcp", Ipv4, all).await;
});

// ---------------------------------------------------------------------------
// NetworkPolicy: changes while running
// ---------------------------------------------------------------------------

scenario!(
    np_create_update_delete_apply_to_new_connections_at_once,
    |lab| {
        let from = |n: &str| {
            np("z", "z-web", &format!("podSelector: {{}}\ningress:\n- from: [{{namespaceSelector: {{matchLabels: {{ns: {n}}}}}}}]\n  ports: [{{port: 80}}]"))
        };
        lab.apply("z.yaml", &from("x")).await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| {
            f == t || ns(t) != "z" || ns(f) == "x"
        })
        .await;
        lab.apply("z.yaml", &from("y")).await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| {
            f == t || ns(t) != "z" || ns(f) == "y"
        })
        .await;
        lab.remove("z.yaml").await;
        lab.assert_matrix("80/tcp", Ipv4, all).await;
    }
);

scenario!(
    np_update_moves_isolation_between_pods_and_directions,
    |lab| {
        lab.apply(
            "y.yaml",
            &np(
                "y",
                "closed",
                "podSelector: {matchLabels: {pod: a}}\ningress: []",
            ),
        )
        .await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || t != "y/a")
            .await;
        lab.apply(
            "y.yaml",
            &np(
                "y",
                "closed",
                "podSelector: {matchLabels: {pod: b}}\ningress: []",
            ),
        )
        .await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || t != "y/b")
            .await;
        lab.apply(
            "y.yaml",
            &np(
                "y",
                "closed",
                "podSelector: {matchLabels: {pod: b}}\npolicyTypes: [Ingress, Egress]",
            ),
        )
        .await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || (t != "y/b" && f != "y/b"))
            .await;
    }
);

scenario!(np_removing_one_of_two_policies_keeps_the_other, |lab| {
    lab.apply(
        "a.yaml",
        &np(
            "x",
            "from-y",
            "podSelector: {}\ningress:\n- from: [{namespaceSelector: {matchLabels: {ns: y}}}]",
        ),
    )
    .await;
    lab.apply(
        "b.yaml",
        &np(
            "x",
            "from-z",
            "podSelector: {}\ningress:\n- from: [{namespaceSelector: {matchLabels: {ns: z}}}]",
        ),
    )
    .await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| {
        f == t || ns(t) != "x" || ns(f) != "x"
    })
    .await;
    lab.remove("a.yaml").await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| {
        f == t || ns(t) != "x" || ns(f) == "z"
    })
    .await;
    lab.remove("b.yaml").await;
    lab.assert_matrix("80/tcp", Ipv4, all).await;
});

// ---------------------------------------------------------------------------
// L4Policy
// ---------------------------------------------------------------------------

scenario!(l4_allow_rules_isolate_like_network_policy, |lab| {
    lab.apply("p.yaml", &l4("x", "a-from-y", "podSelector: {matchLabels: {pod: a}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {ns: y}}}]")).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || t != "x/a" || ns(f) == "y")
        .await;
});

scenario!(l4_allow_rules_join_the_network_policy_union, |lab| {
    lab.apply("p.yaml", &docs(&[
        np("y", "b-from-x", "podSelector: {matchLabels: {pod: b}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {ns: x}}}]\n  ports: [{port: 80}]"),
        l4("y", "b-from-z", "podSelector: {matchLabels: {pod: b}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {ns: z}}}]\n  ports: [{protocol: TCP, port: 80}]"),
    ])).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || t != "y/b" || ns(f) != "y")
        .await;
    lab.assert_matrix("81/tcp", Ipv4, |f, t| f == t || t != "y/b")
        .await;
});

scenario!(l4_ingress_deny_beats_network_policy_allow, |lab| {
    lab.apply("p.yaml", &docs(&[
        np("z", "open", "podSelector: {}\ningress: [{}]"),
        l4("z", "no-x", "podSelector: {}\ningressDeny:\n- from: [{namespaceSelector: {matchLabels: {ns: x}}}]"),
    ])).await;
    let want = |f: &str, t: &str| ns(t) != "z" || ns(f) != "x";
    lab.assert_matrix("80/tcp", Ipv4, want).await;
    lab.assert_matrix("81/udp", Ipv4, want).await;
});

scenario!(l4_ingress_deny_beats_allow_of_another_l4policy, |lab| {
    lab.apply("p.yaml", &docs(&[
        l4("y", "allow-all", "podSelector: {}\ningress: [{}]"),
        l4("y", "deny-a", "podSelector: {}\ningressDeny:\n- from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: a}}}]"),
    ])).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| {
        f == t || ns(t) != "y" || pod(f) != "a"
    })
    .await;
});

scenario!(l4_deny_only_policy_does_not_isolate, |lab| {
    lab.apply("p.yaml", &l4("z", "a-no-x-web", "podSelector: {matchLabels: {pod: a}}\ningressDeny:\n- from: [{namespaceSelector: {matchLabels: {ns: x}}}]\n  ports: [{protocol: TCP, port: 80}]")).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| t != "z/a" || ns(f) != "x")
        .await;
    lab.assert_matrix("81/tcp", Ipv4, all).await;
});

scenario!(l4_egress_deny_beats_network_policy_egress_allow, |lab| {
    lab.apply("p.yaml", &docs(&[
        np("x", "out-all", "podSelector: {}\npolicyTypes: [Egress]\negress: [{}]"),
        l4("x", "no-y-81", "podSelector: {}\negressDeny:\n- to: [{namespaceSelector: {matchLabels: {ns: y}}}]\n  ports: [{protocol: UDP, port: 81}]"),
    ])).await;
    lab.assert_matrix("81/udp", Ipv4, |f, t| ns(f) != "x" || ns(t) != "y")
        .await;
    lab.assert_matrix("80/udp", Ipv4, all).await;
});

scenario!(l4_egress_deny_to_cidr_without_isolation, |lab| {
    lab.apply("p.yaml", &l4("y", "a-not-zb", "podSelector: {matchLabels: {pod: a}}\negressDeny:\n- to: [{ipBlock: {cidr: 198.18.1.17/32}}]")).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| !(f == "y/a" && t == "z/b"))
        .await;
    lab.assert_matrix("80/tcp", Ipv6, all).await;
});

scenario!(l4_port_ranges_in_allow_and_deny_rules, |lab| {
    lab.apply(
        "p.yaml",
        &l4(
            "z",
            "c-ranges",
            r#"
podSelector: {matchLabels: {pod: c}}
ingress:
- ports: [{protocol: TCP, port: 80, endPort: 81}]
ingressDeny:
- from: [{namespaceSelector: {matchLabels: {ns: y}}}]
  ports: [{protocol: TCP, port: 81, endPort: 85}]
"#,
        ),
    )
    .await;
    lab.assert_matrix("80/tcp", Ipv4, all).await;
    lab.assert_matrix("81/tcp", Ipv4, |f, t| t != "z/c" || ns(f) != "y")
        .await;
    lab.assert_matrix("80/udp", Ipv4, |f, t| f == t || t != "z/c")
        .await;
});

scenario!(
    l4_audit_isolation_passes_traffic_and_counts_audit_verdicts,
    |lab| {
        lab.apply("p.yaml", &l4("z", "audit-x-only", "podSelector: {}\nmode: Audit\ningress:\n- from: [{namespaceSelector: {matchLabels: {ns: x}}}]")).await;
        let audit_before = counted(&lab, DIRECTION_INGRESS, VERDICT_AUDIT).0;
        let deny_before = counted(&lab, DIRECTION_INGRESS, VERDICT_DENY).0;
        lab.assert_matrix("80/tcp", Ipv4, all).await;
        let (audit_after, cookies) = counted(&lab, DIRECTION_INGRESS, VERDICT_AUDIT);
        // Would-be drops: y/* → z/* (9) and z/* → other z/* (6); one SYN each.
        assert_eq!(
            audit_after - audit_before,
            15,
            "one AUDIT verdict per would-be-dropped flow"
        );
        assert!(
            !cookies.contains(&0),
            "audit verdicts carry the audit policy's cookie: {cookies:?}"
        );
        assert_eq!(
            counted(&lab, DIRECTION_INGRESS, VERDICT_DENY).0,
            deny_before,
            "audit mode never drops"
        );
    }
);

scenario!(
    l4_audit_deny_rule_counts_only_flows_enforcement_allows,
    |lab| {
        lab.apply("p.yaml", &docs(&[
        l4("y", "audit-no-x", "podSelector: {matchLabels: {pod: a}}\nmode: Audit\ningressDeny:\n- from: [{namespaceSelector: {matchLabels: {ns: x}}}]\n  ports: [{protocol: TCP, port: 80}]"),
        l4("y", "deny-xc", "podSelector: {matchLabels: {pod: a}}\ningressDeny:\n- from: [{namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: c}}}]"),
    ])).await;
        let audit_before = counted_by_cookie(&lab, DIRECTION_INGRESS, VERDICT_AUDIT);
        let deny_before = counted_by_cookie(&lab, DIRECTION_INGRESS, VERDICT_DENY);
        lab.assert_matrix("80/tcp", Ipv4, |f, t| !(f == "x/c" && t == "y/a"))
            .await;
        let audit = delta(
            &counted_by_cookie(&lab, DIRECTION_INGRESS, VERDICT_AUDIT),
            &audit_before,
        );
        let deny = delta(
            &counted_by_cookie(&lab, DIRECTION_INGRESS, VERDICT_DENY),
            &deny_before,
        );
        // x/a and x/b → y/a pass as AUDIT, attributed to the audit deny rule;
        // x/c → y/a is dropped by the enforced deny (not audited).
        assert_eq!(
            audit.values().sum::<u64>(),
            2,
            "audit verdicts by cookie: {audit:?}"
        );
        assert_eq!(audit.len(), 1, "one audit rule decided: {audit:?}");
        assert!(!audit.contains_key(&0), "{audit:?}");
        assert!(!deny.is_empty(), "the enforced deny dropped x/c → y/a");
        assert!(
        deny.keys().all(|c| !audit.contains_key(c)),
        "the enforced deny and the audit rule have different cookies: deny {deny:?}, audit {audit:?}"
    );
    }
);

scenario!(l4_audit_egress_isolation_counts_audit_verdicts, |lab| {
    lab.apply(
        "p.yaml",
        &l4(
            "x",
            "audit-b-out",
            "podSelector: {matchLabels: {pod: b}}\nmode: Audit\npolicyTypes: [Egress]",
        ),
    )
    .await;
    let before = counted(&lab, DIRECTION_EGRESS, VERDICT_AUDIT).0;
    lab.assert_matrix("80/tcp", Ipv4, all).await;
    let after = counted(&lab, DIRECTION_EGRESS, VERDICT_AUDIT).0;
    assert_eq!(
        after - before,
        8,
        "x/b → each of the 8 other pods would be dropped"
    );
});

scenario!(l4_create_update_delete_apply_at_once, |lab| {
    let deny_from = |n: &str| {
        l4("x", "deny", &format!("podSelector: {{}}\ningressDeny:\n- from: [{{namespaceSelector: {{matchLabels: {{ns: {n}}}}}}}]"))
    };
    lab.apply("l4.yaml", &deny_from("y")).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| ns(t) != "x" || ns(f) != "y")
        .await;
    lab.apply("l4.yaml", &deny_from("z")).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| ns(t) != "x" || ns(f) != "z")
        .await;
    lab.remove("l4.yaml").await;
    lab.assert_matrix("80/tcp", Ipv4, all).await;
});

scenario!(l4_unknown_mode_is_rejected_naming_the_field, |lab| {
    lab.apply_expect_problem(
        "mode.yaml",
        &l4(
            "x",
            "bad-mode",
            "podSelector: {}\nmode: Monitor\ningress: [{}]",
        ),
        &["mode.yaml", "bad-mode", "mode"],
    )
    .await;
    lab.assert_kernel_matrix("80/tcp", Ipv4, all).await;
});

scenario!(
    l4_missing_pod_selector_is_rejected_naming_the_field,
    |lab| {
        lab.apply_expect_problem(
            "nosel.yaml",
            &l4("x", "no-selector", "ingress: []"),
            &["nosel.yaml", "no-selector", "podSelector"],
        )
        .await;
        lab.assert_kernel_matrix("80/tcp", Ipv4, all).await;
    }
);

scenario!(l4_sctp_deny_never_matches_tcp_or_udp, |lab| {
    lab.apply(
        "sctp.yaml",
        &l4(
            "x",
            "sctp-deny",
            "podSelector: {}\ningressDeny:\n- ports: [{protocol: SCTP, port: 80}]",
        ),
    )
    .await;
    lab.assert_matrix("80/tcp", Ipv4, all).await;
    lab.assert_matrix("80/udp", Ipv4, all).await;
});

scenario!(l4_unknown_field_is_rejected_naming_it, |lab| {
    lab.apply_expect_problem(
        "typo.yaml",
        &l4("x", "typo", "podSelector: {}\ningresDeny: [{}]"),
        &["typo.yaml", "typo", "ingresDeny"],
    )
    .await;
    lab.assert_kernel_matrix("80/tcp", Ipv4, all).await;
});

// ---------------------------------------------------------------------------
// ClusterL4Policy
// ---------------------------------------------------------------------------

scenario!(
    cl4_admin_allow_overrides_network_policy_default_deny,
    |lab| {
        lab.apply("p.yaml", &docs(&[
        np("z", "default-deny", "podSelector: {}\npolicyTypes: [Ingress]"),
        cl4("let-x-in", "tier: Admin\npriority: 10\nsubject: {namespaceSelector: {matchLabels: {ns: z}}}\ningress:\n- action: Allow\n  from: [{namespaceSelector: {matchLabels: {ns: x}}}]"),
    ])).await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| {
            f == t || ns(t) != "z" || ns(f) == "x"
        })
        .await;
    }
);

scenario!(
    cl4_admin_allow_overrides_l4policy_deny_and_pod_only_peer_spans_namespaces,
    |lab| {
        lab.apply("p.yaml", &docs(&[
        l4("y", "deny-all-in", "podSelector: {}\ningressDeny:\n- from: [{namespaceSelector: {}}]"),
        // A peer with only podSelector matches pods in all namespaces.
        cl4("let-a-in", "tier: Admin\npriority: 10\nsubject: {namespaceSelector: {matchLabels: {ns: y}}}\ningress:\n- action: Allow\n  from: [{podSelector: {matchLabels: {pod: a}}}]"),
    ])).await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| {
            f == t || ns(t) != "y" || pod(f) == "a"
        })
        .await;
    }
);

scenario!(cl4_admin_deny_overrides_network_policy_allow, |lab| {
    lab.apply("p.yaml", &docs(&[
        np("x", "open", "podSelector: {}\ningress: [{}]"),
        cl4("no-z-web", "tier: Admin\npriority: 10\nsubject: {namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: b}}}\ningress:\n- action: Deny\n  from: [{namespaceSelector: {matchLabels: {ns: z}}}]\n  ports: [{protocol: TCP, port: 80}]"),
    ])).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| t != "x/b" || ns(f) != "z")
        .await;
    lab.assert_matrix("81/tcp", Ipv4, all).await;
});

scenario!(cl4_admin_pass_delegates_to_network_policies, |lab| {
    lab.apply("c.yaml", &cl4("gate", "tier: Admin\npriority: 10\nsubject: {namespaceSelector: {matchLabels: {ns: z}}}\ningress:\n- action: Pass\n  from: [{namespaceSelector: {matchLabels: {ns: y}}}]\n- action: Deny")).await;
    // Passed flows meet no NetworkPolicy: allowed. The rest hit the Deny.
    lab.assert_matrix("80/tcp", Ipv4, |f, t| {
        f == t || ns(t) != "z" || ns(f) == "y"
    })
    .await;
    lab.apply("n.yaml", &np("z", "only-y-a", "podSelector: {}\ningress:\n- from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: a}}}]")).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || ns(t) != "z" || f == "y/a")
        .await;
});

scenario!(
    cl4_admin_pass_skips_later_admin_rules_and_meets_l4_deny,
    |lab| {
        lab.apply("p.yaml", &docs(&[
        cl4("pass-all", "tier: Admin\npriority: 1\nsubject: {namespaceSelector: {matchLabels: {ns: x}}}\ningress:\n- action: Pass"),
        cl4("allow-all", "tier: Admin\npriority: 2\nsubject: {namespaceSelector: {matchLabels: {ns: x}}}\ningress:\n- action: Allow"),
        l4("x", "deny-z", "podSelector: {}\ningressDeny:\n- from: [{namespaceSelector: {matchLabels: {ns: z}}}]"),
    ])).await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| ns(t) != "x" || ns(f) != "z")
            .await;
    }
);

scenario!(cl4_lower_priority_number_is_evaluated_first, |lab| {
    let deny = |prio: u32| {
        cl4("a-deny", &format!("tier: Admin\npriority: {prio}\nsubject: {{namespaceSelector: {{matchLabels: {{ns: z}}}}}}\ningress:\n- action: Deny"))
    };
    let allow = cl4("b-allow", "tier: Admin\npriority: 5\nsubject: {namespaceSelector: {matchLabels: {ns: z}}}\ningress:\n- action: Allow\n  from: [{namespaceSelector: {matchLabels: {ns: x}}}]");
    lab.apply("p.yaml", &docs(&[deny(20), allow.clone()])).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| {
        f == t || ns(t) != "z" || ns(f) == "x"
    })
    .await;
    lab.apply("p.yaml", &docs(&[deny(1), allow])).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || ns(t) != "z")
        .await;
});

scenario!(cl4_priority_ties_are_broken_by_policy_name, |lab| {
    let allow_y = "- action: Allow\n  from: [{namespaceSelector: {matchLabels: {ns: y}}}]";
    let deny_all = "- action: Deny";
    let pol = |name: &str, rule: &str| {
        cl4(name, &format!("tier: Admin\npriority: 7\nsubject: {{namespaceSelector: {{matchLabels: {{ns: z}}}}}}\ningress:\n{rule}"))
    };
    lab.apply(
        "p.yaml",
        &docs(&[pol("beta", deny_all), pol("alpha", allow_y)]),
    )
    .await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| {
        f == t || ns(t) != "z" || ns(f) == "y"
    })
    .await;
    lab.apply(
        "p.yaml",
        &docs(&[pol("beta", allow_y), pol("alpha", deny_all)]),
    )
    .await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || ns(t) != "z")
        .await;
});

scenario!(cl4_rules_of_one_policy_apply_in_order, |lab| {
    lab.apply(
        "p.yaml",
        &cl4(
            "ordered",
            r#"
tier: Admin
priority: 10
subject: {namespaceSelector: {matchLabels: {ns: y}}}
ingress:
- action: Allow
  from: [{namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: a}}}]
- action: Deny
  from: [{namespaceSelector: {matchLabels: {ns: x}}}]
"#,
        ),
    )
    .await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| {
        ns(t) != "y" || ns(f) != "x" || f == "x/a"
    })
    .await;
});

scenario!(cl4_baseline_applies_only_to_pods_not_isolated, |lab| {
    lab.apply("p.yaml", &docs(&[
        cl4("no-z", "tier: Baseline\npriority: 10\nsubject: {namespaceSelector: {}}\ningress:\n- action: Deny\n  from: [{namespaceSelector: {matchLabels: {ns: z}}}]"),
        np("x", "a-from-z", "podSelector: {matchLabels: {pod: a}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {ns: z}}}]"),
    ])).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| {
        f == t
            || if t == "x/a" {
                ns(f) == "z"
            } else {
                ns(f) != "z"
            }
    })
    .await;
});

scenario!(cl4_baseline_deny_is_a_cluster_default_deny, |lab| {
    lab.apply("p.yaml", &docs(&[
        cl4("default-deny", "tier: Baseline\npriority: 1000\nsubject: {namespaceSelector: {}}\ningress:\n- action: Deny"),
        cl4("z-internal", "tier: Baseline\npriority: 10\nsubject: {namespaceSelector: {matchLabels: {ns: z}}}\ningress:\n- action: Allow\n  from: [{namespaceSelector: {matchLabels: {ns: z}}}]"),
        np("y", "b-from-x", "podSelector: {matchLabels: {pod: b}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {ns: x}}}]"),
    ])).await;
    let want =
        |f: &str, t: &str| f == t || (t == "y/b" && ns(f) == "x") || (ns(t) == "z" && ns(f) == "z");
    lab.assert_matrix("80/tcp", Ipv4, want).await;
    lab.assert_matrix("81/udp", Ipv6, want).await;
});

scenario!(
    cl4_baseline_egress_default_deny_yields_to_network_policy_egress,
    |lab| {
        lab.apply("p.yaml", &docs(&[
        cl4("x-no-out", "tier: Baseline\npriority: 100\nsubject: {namespaceSelector: {matchLabels: {ns: x}}}\negress:\n- action: Deny"),
        np("x", "a-to-y", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\negress:\n- to: [{namespaceSelector: {matchLabels: {ns: y}}}]"),
    ])).await;
        lab.assert_matrix("80/tcp", Ipv4, |f, t| {
            f == t || ns(f) != "x" || (f == "x/a" && ns(t) == "y")
        })
        .await;
    }
);

scenario!(cl4_admin_cidr_peers_ipv4_egress_and_ipv6_ingress, |lab| {
    lab.apply("p.yaml", &docs(&[
        // .12/30 = x/c, y/a, y/b, y/c; except y/b.
        cl4("z-cidr-out", "tier: Admin\npriority: 10\nsubject: {namespaceSelector: {matchLabels: {ns: z}}}\negress:\n- action: Deny\n  to: [{ipBlock: {cidr: 198.18.1.12/30, except: [198.18.1.14/32]}}]"),
        // ::1:0/124 = every pod; except x/a.
        cl4("xc-cidr-in", "tier: Admin\npriority: 10\nsubject: {namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: c}}}\ningress:\n- action: Deny\n  from: [{ipBlock: {cidr: \"fd00:7063:6c00::1:0/124\", except: [\"fd00:7063:6c00::1:1/128\"]}}]"),
    ])).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| {
        !(ns(f) == "z" && matches!(t, "x/c" | "y/a" | "y/c"))
    })
    .await;
    lab.assert_matrix("80/tcp", Ipv6, |f, t| f == t || t != "x/c" || f == "x/a")
        .await;
});

scenario!(cl4_subject_selects_by_namespace_expression_and_pod, |lab| {
    lab.apply("p.yaml", &cl4("b-closed", "tier: Admin\npriority: 10\nsubject:\n  namespaceSelector: {matchExpressions: [{key: ns, operator: In, values: [x, y]}]}\n  podSelector: {matchLabels: {pod: b}}\ningress:\n- action: Deny")).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| f == t || !(t == "x/b" || t == "y/b"))
        .await;
});

scenario!(
    cl4_subject_without_namespace_selector_covers_all_namespaces,
    |lab| {
        lab.apply("p.yaml", &cl4("c-no-81-udp", "tier: Admin\npriority: 10\nsubject: {podSelector: {matchLabels: {pod: c}}}\ningress:\n- action: Deny\n  ports: [{protocol: UDP, port: 81}]")).await;
        lab.assert_matrix("81/udp", Ipv4, |f, t| f == t || pod(t) != "c")
            .await;
        lab.assert_matrix("80/udp", Ipv4, all).await;
    }
);

scenario!(cl4_port_ranges_and_named_ports, |lab| {
    lab.apply(
        "p.yaml",
        &cl4(
            "y-out",
            r#"
tier: Admin
priority: 10
subject: {namespaceSelector: {matchLabels: {ns: y}}}
egress:
- action: Deny
  to: [{namespaceSelector: {matchLabels: {ns: z}}}]
  ports: [{protocol: TCP, port: 80, endPort: 81}]
- action: Deny
  ports: [{protocol: UDP, port: serve-81-udp}]
"#,
        ),
    )
    .await;
    let tcp = |f: &str, t: &str| !(ns(f) == "y" && ns(t) == "z");
    lab.assert_matrix("80/tcp", Ipv4, tcp).await;
    lab.assert_matrix("81/tcp", Ipv4, tcp).await;
    lab.assert_matrix("81/udp", Ipv4, |f, t| f == t || ns(f) != "y")
        .await;
    lab.assert_matrix("80/udp", Ipv4, all).await;
});

scenario!(cl4_admin_allow_egress_overrides_l4_egress_deny, |lab| {
    lab.apply("p.yaml", &docs(&[
        l4("x", "no-out", "podSelector: {}\negressDeny: [{}]"),
        cl4("x-to-y", "tier: Admin\npriority: 10\nsubject: {namespaceSelector: {matchLabels: {ns: x}}}\negress:\n- action: Allow\n  to: [{namespaceSelector: {matchLabels: {ns: y}}}]"),
    ])).await;
    lab.assert_matrix("80/tcp", Ipv4, |f, t| {
        f == t || ns(f) != "x" || ns(t) == "y"
    })
    .await;
});

scenario!(cl4_pass_in_baseline_is_rejected_naming_the_field, |lab| {
    lab.apply_expect_problem(
        "pass.yaml",
        &cl4(
            "bad-pass",
            "tier: Baseline\npriority: 10\nsubject: {}\ningress:\n- action: Pass",
        ),
        &["pass.yaml", "bad-pass", "action"],
    )
    .await;
    lab.assert_kernel_matrix("80/tcp", Ipv4, all).await;
});

scenario!(cl4_priority_1001_is_rejected_naming_the_field, |lab| {
    lab.apply_expect_problem(
        "prio.yaml",
        &cl4(
            "bad-prio",
            "tier: Admin\npriority: 1001\nsubject: {}\ningress:\n- action: Deny",
        ),
        &["prio.yaml", "bad-prio", "priority"],
    )
    .await;
    lab.assert_kernel_matrix("80/tcp", Ipv4, all).await;
});

scenario!(cl4_unknown_tier_is_rejected_naming_the_field, |lab| {
    lab.apply_expect_problem(
        "tier.yaml",
        &cl4(
            "bad-tier",
            "tier: Developer\npriority: 10\nsubject: {}\ningress:\n- action: Deny",
        ),
        &["tier.yaml", "bad-tier", "tier"],
    )
    .await;
    lab.assert_kernel_matrix("80/tcp", Ipv4, all).await;
});

scenario!(cl4_namespace_in_metadata_is_rejected, |lab| {
    let yaml = "apiVersion: portcullis.dev/v1alpha1\nkind: ClusterL4Policy\nmetadata: {name: namespaced, namespace: x}\nspec:\n  tier: Admin\n  priority: 10\n  subject: {}\n  ingress:\n  - action: Deny\n";
    lab.apply_expect_problem("ns.yaml", yaml, &["ns.yaml", "namespaced", "namespace"])
        .await;
    lab.assert_kernel_matrix("80/tcp", Ipv4, all).await;
});
