//! Policy rules only the inbound proxy can judge: peers named by SPIFFE
//! identity. The kernel sees addresses, never certificates, so such peers
//! compile to nothing there; for a flow an mTLS client asks for, the proxy
//! asks the evaluator whether the client's proven identity changes the
//! answer, and only then overrides the kernel's.

use std::net::IpAddr;

use crate::{
    identity::spiffe::SpiffeId,
    policy::{
        evaluate::{evaluate_authenticated, FlowQuery},
        model::{Inventory, Peer, Peers, PolicyObject, Protocol},
    },
};

/// The enforced policies and the workloads, kept only while some policy
/// names an identity.
#[derive(Debug)]
pub struct IdentityRules {
    inventory: Inventory,
    policies: Vec<PolicyObject>,
}

impl IdentityRules {
    /// `None` when no policy names an identity: the kernel decides alone.
    pub fn new(inventory: &Inventory, policies: &[PolicyObject]) -> Option<Self> {
        let names_identity = |p: &PolicyObject| {
            p.rules().any(|r| match &r.peers {
                Peers::All => false,
                Peers::Only(peers) => peers.iter().any(|p| matches!(p, Peer::Identity(_))),
            })
        };
        policies.iter().any(names_identity).then(|| Self {
            inventory: inventory.clone(),
            policies: policies.to_vec(),
        })
    }

    /// Whether `client`'s proven identity changes the ingress answer for
    /// its TCP flow from `from` to `to:port`: `Some(allowed)` if it does,
    /// `None` when the kernel's answer (the same without identities)
    /// stands.
    pub fn ruling(&self, from: IpAddr, client: &SpiffeId, to: IpAddr, port: u16) -> Option<bool> {
        let query = FlowQuery {
            src: from,
            dst: to,
            port,
            protocol: Protocol::Tcp,
        };
        let judge = |id| {
            evaluate_authenticated(&self.inventory, &self.policies, &query, id)
                .ingress
                .allows()
        };
        let with = judge(Some(client));
        (with != judge(None)).then_some(with)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::parse::{parse_inventory, parse_policies};

    const WORKLOADS: &str = "workloads:\n\
        \x20 - {name: a, namespace: x, serviceAccount: api, ips: [10.0.0.1]}\n\
        \x20 - {name: b, namespace: x, cgroup: /b, labels: {app: db}, ips: [10.0.0.2]}\n\
        \x20 - {name: c, namespace: y, ips: [10.0.0.3]}\n";

    fn rules(policy: &str) -> Option<IdentityRules> {
        let inventory = parse_inventory(Path::new("w.yaml"), WORKLOADS).unwrap();
        let policies = parse_policies(Path::new("p.yaml"), policy).unwrap();
        IdentityRules::new(&inventory, &policies)
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn only_a_proven_identity_meets_an_identity_peer() {
        let r = rules(
            "apiVersion: portcullis.dev/v1alpha1\nkind: L4Policy\n\
             metadata: {name: db, namespace: x}\n\
             spec:\n  podSelector: {matchLabels: {app: db}}\n  ingress:\n\
             \x20 - from: [{identity: {spiffeId: 'spiffe://cluster.local/ns/x/sa/api'}}]\n\
             \x20   ports: [{port: 5432}]\n\
             \x20 - from: [{identity: {namespace: y}}]\n",
        )
        .expect("the policy names identities");
        let (a, b, c) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        let api = id("spiffe://cluster.local/ns/x/sa/api");
        assert_eq!(r.ruling(a, &api, b, 5432), Some(true));
        // The rule names a port: another one stays denied, as without it.
        assert_eq!(r.ruling(a, &api, b, 80), None);
        assert_eq!(
            r.ruling(a, &id("spiffe://cluster.local/ns/x/sa/web"), b, 5432),
            None,
            "the wrong service account gets the kernel's answer: denied"
        );
        assert_eq!(
            r.ruling(c, &id("spiffe://cluster.local/ns/y/sa/any"), b, 80),
            Some(true),
            "namespace-wide"
        );
    }

    #[test]
    fn an_identity_deny_overrides_an_address_allow() {
        let r = rules(
            "apiVersion: portcullis.dev/v1alpha1\nkind: L4Policy\n\
             metadata: {name: db, namespace: x}\n\
             spec:\n  podSelector: {matchLabels: {app: db}}\n\
             \x20 ingressDeny:\n  - from: [{identity: {namespace: x}}]\n",
        )
        .unwrap();
        let a = "10.0.0.1".parse().unwrap();
        let b = "10.0.0.2".parse().unwrap();
        assert_eq!(
            r.ruling(a, &id("spiffe://cluster.local/ns/x/sa/api"), b, 80),
            Some(false)
        );
    }

    #[test]
    fn policies_without_identities_leave_the_kernel_alone() {
        assert!(rules(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {name: np, namespace: x}\nspec: {podSelector: {}}\n"
        )
        .is_none());
    }
}
