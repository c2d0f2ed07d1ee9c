//! `portcullis explain` on a running lab: the deciding policy and rule for
//! default deny, explicit deny, cluster tiers and audit, each cross-checked
//! against the kernel maps.

use portcullis_agent::{
    explain::{explain, lab_paths, Explanation},
    lab::Family,
};
use portcullis_tests::{start_lab, ALL_DECIDERS};

fn check(e: &Explanation, allowed: bool, ingress_by: &str) {
    let text = e.render();
    assert_eq!(e.allowed, allowed, "{text}");
    assert!(
        e.ingress.decided_by.contains(ingress_by),
        "ingress should be decided by {ingress_by:?}:\n{text}"
    );
    assert!(
        e.kernel_agrees(),
        "the kernel must hold the same decision:\n{text}"
    );
    let kernel = e
        .ingress
        .kernel
        .as_ref()
        .expect("lab pods are enforced here");
    assert_eq!(kernel.decided_by, e.ingress.decided_by, "{text}");
}

#[tokio::test]
async fn explain_names_the_deciding_rule_and_matches_the_kernel() {
    let lab = start_lab("explain").await;
    lab.apply("policies.yaml", ALL_DECIDERS).await;
    let paths = lab_paths("explain");
    let why = |from: &str, to: &str, port: &str| {
        explain(&paths, from, to, port.parse().unwrap(), Family::Ipv4).unwrap()
    };

    check(
        &why("z/a", "y/a", "80/tcp"),
        false,
        "denied by default: isolated by y/default-deny",
    );
    check(
        &why("x/a", "y/b", "80/tcp"),
        true,
        "allowed by y/web rule 0",
    );
    check(
        &why("x/c", "y/b", "81/udp"),
        false,
        "denied by L4Policy y/no-c deny rule 0",
    );
    check(
        &why("x/b", "z/c", "80/tcp"),
        false,
        "Deny by ClusterL4Policy quarantine rule 0 (Admin tier, priority 5)",
    );
    // Audit: allowed, but the trial policy would have dropped it (only pods
    // of x may reach x/a under it).
    check(
        &why("y/a", "x/a", "80/tcp"),
        true,
        "audit: L4Policy x/trial would deny by default",
    );
    // Egress of an unisolated pod, and over IPv6 too.
    let e = explain(
        &paths,
        "x/a",
        "y/b",
        "80/tcp".parse().unwrap(),
        Family::Ipv6,
    )
    .unwrap();
    assert_eq!(e.egress.decided_by, "allowed: no policy isolates it");
    assert!(e.kernel_agrees(), "{}", e.render());

    // The measured matrix agrees with what explain said.
    let m = lab.matrix("80/tcp", Family::Ipv4).await;
    assert!(!m.reached("z/a", "y/a"));
    assert!(m.reached("x/a", "y/b"));
    assert!(!m.reached("x/b", "z/c"));
    assert!(m.reached("y/a", "x/a"), "audit lets traffic pass");
}
