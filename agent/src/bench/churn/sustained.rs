//! Sustained churn: pods added and deleted at a steady rate through the
//! real API server for a while, the agent keeping up as it goes.
//!
//! After each second, a sample of flows between pods the second did not
//! touch (half of them to or from pods added the second before, a quarter
//! a flow some rule admits) is decided
//! twice: by the kernel (the pinned maps, with the kernel's own decision
//! code, as `portcullis explain` does) and by the evaluator over the
//! cluster as written. Pods added the second before must also have an
//! identity, and pods deleted then none: a pass that fell behind by more
//! than a second shows as a disagreement. Once the writes stop and the
//! agent is quiet, every pod is checked: a missed update is a live pod
//! without its endpoint or identity, or a deleted one still holding one.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use std::fmt::Write as _;

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use kube::api::{Api, ListParams};
use portcullis_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, IDENTITY_WORLD, PROTO_TCP, VERDICT_DENY,
};

use super::{histogram::Reading, objects, objects::PodSpec, pod_cgroup, Agent, Cluster, PIN_DIR};
use crate::{
    bpf::inspect::KernelView,
    policy::{
        compile::addr16,
        evaluate::{evaluate, FlowQuery},
        model::{
            Direction, Inventory, Labels, NamespaceScope, NetworkPolicyRules, Origin, Peer, Peers,
            PolicyKind, PolicyObject, PortSpec, Protocol, Rule, Workload,
        },
    },
    source::kube::slim_pod::SlimPod,
};

/// Flows checked after each second.
const SAMPLE: usize = 20;
/// The agent is quiet once no pass ends for this long (longer than a pass
/// under load, so one still running is waited for).
const SETTLED: Duration = Duration::from_secs(2);
/// Requests in flight while a second's changes are written.
const CONCURRENCY: usize = 32;

#[derive(Clone, Debug)]
pub struct SustainedOptions {
    /// Pods added, and pods deleted, per second.
    pub rate: usize,
    pub seconds: usize,
}

#[derive(Clone, Debug, Default)]
pub struct SustainedResult {
    pub rate: usize,
    pub seconds: usize,
    pub added: usize,
    pub deleted: usize,
    /// Seconds whose writes did not fit in the second.
    pub late_seconds: usize,
    /// Wall time of the writes, s.
    pub writing_secs: f64,
    pub flows_checked: usize,
    pub flows_allowed: usize,
    /// Sampled flows and fresh pods the kernel disagreed on, described.
    pub disagreements: Vec<String>,
    /// From the last write until the agent was quiet, s.
    pub settle_secs: f64,
    /// Pods whose final state the kernel does not hold, described.
    pub missed: Vec<String>,
    pub pods_checked: usize,
    /// The agent's passes over the run.
    pub passes: Reading,
}

/// The cluster as the bench wrote it, for the evaluator.
struct Written {
    node: Node,
    namespaces: Vec<Namespace>,
    policies: Vec<PolicyObject>,
    /// Live pods by index, with their UIDs.
    pods: BTreeMap<usize, (Pod, String)>,
}

struct Cgroups<'a>(&'a BTreeMap<String, PathBuf>);

impl crate::source::kube::workloads::CgroupLookup for Cgroups<'_> {
    fn pod_cgroup(&self, pod: &SlimPod) -> Result<PathBuf, PathBuf> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        self.0.get(&uid).cloned().ok_or_else(PathBuf::new)
    }
}

impl Written {
    fn inventory(&self, mount: &Path) -> Inventory {
        let cgroups: BTreeMap<String, PathBuf> = self
            .pods
            .iter()
            .filter(|(i, _)| PodSpec::nth(**i).local)
            .map(|(_, (_, uid))| (uid.clone(), pod_cgroup(mount, uid)))
            .collect();
        // Decoded from the written objects' JSON, as the agent decodes
        // what the API serves.
        let pods: Vec<std::sync::Arc<SlimPod>> = self
            .pods
            .values()
            .map(|(p, _)| {
                let json = serde_json::to_value(p).expect("pods serialize");
                std::sync::Arc::new(serde_json::from_value(json).expect("a pod decodes slim"))
            })
            .collect();
        crate::source::kube::workloads::Translations::default()
            .inventory(
                objects::NODE,
                Some(&self.node),
                &self.namespaces,
                &pods,
                &Cgroups(&cgroups),
            )
            .0
    }
}

/// A pod index from its address (see [`PodSpec::nth`]).
fn index_of(pod: &Pod) -> Option<usize> {
    let ip: std::net::Ipv4Addr = pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
    let base = u32::from(std::net::Ipv4Addr::new(10, 64, 0, 10));
    u32::from(ip).checked_sub(base).map(|i| i as usize)
}

async fn read_cluster(client: &kube::Client) -> anyhow::Result<Written> {
    let node = Api::<Node>::all(client.clone())
        .get(objects::NODE)
        .await
        .context("reading the node")?;
    let namespaces = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let policies = Api::<NetworkPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|np| {
            // The same wire form the agent reads.
            let raw: crate::policy::model::NetworkPolicy =
                serde_json::to_value(np).and_then(serde_json::from_value)?;
            anyhow::Ok(crate::policy::parse::network_policy(
                Origin::Kubernetes,
                &raw,
            )?)
        })
        .collect::<Result<Vec<_>, _>>()
        .context("a NetworkPolicy the bench wrote does not parse")?;
    let mut pods = BTreeMap::new();
    for pod in Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
    {
        if let Some(i) = index_of(&pod) {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            pods.insert(i, (pod, uid));
        }
    }
    Ok(Written {
        node,
        namespaces,
        policies,
        pods,
    })
}

/// The kernel's identity for an address (`None`: no pod's).
fn identity(view: &KernelView, ip: IpAddr) -> anyhow::Result<Option<u32>> {
    Ok(view
        .active_identity(&addr16(ip))?
        .filter(|&id| id != IDENTITY_WORLD))
}

/// Kernel and evaluator on one flow: whether the evaluator allows it, and
/// what the kernel decides otherwise (`None` when they agree).
fn check_flow(
    view: &KernelView,
    mount: &Path,
    inventory: &Inventory,
    policies: &[PolicyObject],
    (src, dst, port): (&PodSpec, &PodSpec, u16),
    uids: (&str, &str),
) -> anyhow::Result<(bool, Option<String>)> {
    let query = FlowQuery {
        src: IpAddr::V4(src.ip),
        dst: IpAddr::V4(dst.ip),
        port,
        protocol: Protocol::Tcp,
    };
    let expected = evaluate(inventory, policies, &query);
    let mut problems = Vec::new();
    for (pod, uid, direction, verdict, peer) in [
        (src, uids.0, DIRECTION_EGRESS, &expected.egress, dst.ip),
        (dst, uids.1, DIRECTION_INGRESS, &expected.ingress, src.ip),
    ] {
        if !pod.local {
            continue;
        }
        let id = crate::cgroup::cgroup_id(&pod_cgroup(mount, uid))?;
        let kernel = match view.endpoint(id)? {
            None => "no endpoint".to_string(),
            Some(ep) => {
                let d = view.decide(&ep, direction, PROTO_TCP, addr16(IpAddr::V4(peer)), port)?;
                match d.verdict == VERDICT_DENY {
                    true => "deny".into(),
                    false => "allow".into(),
                }
            }
        };
        let wanted = match verdict.allows() {
            true => "allow",
            false => "deny",
        };
        if kernel != wanted {
            problems.push(format!(
                "{} {}:{port} → {}: kernel {kernel}, evaluator {wanted}",
                if direction == DIRECTION_INGRESS {
                    "ingress"
                } else {
                    "egress"
                },
                src.name,
                dst.name
            ));
        }
    }
    Ok((
        expected.allowed,
        (!problems.is_empty()).then(|| problems.join("; ")),
    ))
}

/// A deterministic pseudo-random sequence (the bench is reproducible).
struct Draw(u64);

impl Draw {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) as usize) % n.max(1)
    }
}

/// The TCP ports some policy of `namespace` names.
fn policy_ports(policies: &[PolicyObject], namespace: &str) -> Vec<u16> {
    let mut ports = BTreeSet::new();
    for p in policies
        .iter()
        .filter(|p| &*p.reference.namespace == namespace)
    {
        if let PolicyKind::NetworkPolicy(np) = &*p.kind {
            for rule in np.effective_rules(Direction::Ingress) {
                for port in &rule.ports {
                    if let PortSpec::Range { first, .. } = port.port {
                        ports.insert(first);
                    }
                }
            }
        }
    }
    ports.into_iter().collect()
}

/// A flow some ingress rule admits: (source, destination, port). Random
/// pairs are nearly all denied (a rule names one app in one team's
/// namespaces), so without these the check would hardly see an allow.
/// Rules are tried from a random one on: the first whose policy selects
/// one of `dsts` and whose peers admit one of `sources` gives the flow.
fn admitted_flow(
    inventory: &Inventory,
    policies: &[PolicyObject],
    (dsts, sources): (&[usize], &[usize]),
    draw: &mut Draw,
) -> Option<(usize, usize, u16)> {
    let by_ip: HashMap<IpAddr, &Workload> = inventory
        .workloads
        .iter()
        .flat_map(|w| w.ips.iter().map(move |ip| (*ip, &**w)))
        .collect();
    let workloads = |indexes: &[usize]| -> Vec<(usize, &Workload)> {
        indexes
            .iter()
            .filter_map(|&i| Some((i, *by_ip.get(&IpAddr::V4(PodSpec::nth(i).ip))?)))
            .collect()
    };
    let (dsts, sources) = (workloads(dsts), workloads(sources));
    let namespace_labels: HashMap<&str, Labels> = inventory
        .namespaces
        .iter()
        .map(|n| (n.name.as_str(), inventory.namespace_labels(&n.name)))
        .collect();
    let admits = |peers: &[Peer], w: &Workload| {
        peers.iter().any(|peer| match peer {
            Peer::Pods { namespaces, pods } => {
                let namespace_ok = match namespaces {
                    NamespaceScope::Exactly(ns) => *ns == w.namespace,
                    NamespaceScope::Matching(selector) => namespace_labels
                        .get(w.namespace.as_str())
                        .is_some_and(|labels| selector.matches(labels)),
                };
                namespace_ok && pods.matches(&w.labels)
            }
            _ => false,
        })
    };
    let rules: Vec<(&str, &NetworkPolicyRules, &Rule)> = policies
        .iter()
        .filter_map(|p| match &*p.kind {
            PolicyKind::NetworkPolicy(np) => Some((&*p.reference.namespace, np)),
            _ => None,
        })
        .flat_map(|(ns, np)| {
            np.effective_rules(Direction::Ingress)
                .iter()
                .map(move |r| (ns, np, r))
        })
        .collect();
    let start = draw.below(rules.len());
    for &(namespace, np, rule) in rules.iter().cycle().skip(start).take(rules.len().min(50)) {
        let port = rule.ports.iter().find_map(|p| match p.port {
            PortSpec::Range { first, .. } => Some(first),
            _ => None,
        });
        let (Some(port), Peers::Only(peers)) = (port, &rule.peers) else {
            continue;
        };
        let Some(&(dst, _)) = dsts
            .iter()
            .find(|(_, w)| w.namespace == namespace && np.pod_selector.matches(&w.labels))
        else {
            continue;
        };
        if let Some(&(src, _)) = sources.iter().find(|(i, w)| *i != dst && admits(peers, w)) {
            return Some((src, dst, port));
        }
    }
    None
}

/// Runs the churn; returns, with the result, the live pods' UIDs by index.
pub(super) async fn run(
    agent: &mut Agent,
    cluster: &Cluster,
    options: &SustainedOptions,
    first_index: usize,
) -> anyhow::Result<(SustainedResult, BTreeMap<usize, String>)> {
    let mount = cluster.mount.as_path();
    let mut written = read_cluster(&cluster.client).await?;
    let view = KernelView::open(Path::new(PIN_DIR)).context("opening the agent's pinned maps")?;
    let mut result = SustainedResult {
        rate: options.rate,
        seconds: options.seconds,
        ..SustainedResult::default()
    };
    let start = agent.histogram().await?;
    // Oldest first: the pods deleted are the ones there longest.
    let mut deletable: VecDeque<usize> = written.pods.keys().copied().collect();
    let mut next = first_index;
    let mut draw = Draw(0x5EED);
    let mut fresh: Vec<usize> = Vec::new();
    let mut gone: Vec<(usize, IpAddr)> = Vec::new();
    let mut all_gone: Vec<(usize, IpAddr)> = Vec::new();
    let began = Instant::now();
    let mut last_write = began;
    let mut at_last_write = start.clone();
    for second in 0..options.seconds {
        let due = began + Duration::from_secs(second as u64 + 1);
        let adds: Vec<usize> = (next..next + options.rate).collect();
        next += options.rate;
        let deletes: Vec<(usize, String)> = (0..options.rate)
            .filter_map(|_| deletable.pop_front())
            .filter_map(|i| written.pods.get(&i).map(|(_, uid)| (i, uid.clone())))
            .collect();
        let added: Vec<(usize, (Pod, String))> = futures::stream::iter(adds)
            .map(|i| async move {
                let spec = PodSpec::nth(i);
                let uid = cluster.bind_pod(&spec).await?;
                let pod = cluster.run_pod(&spec).await?;
                anyhow::Ok((i, (pod, uid)))
            })
            .buffer_unordered(CONCURRENCY / 2)
            .try_collect()
            .await?;
        futures::stream::iter(&deletes)
            .map(|(i, uid)| cluster.delete_pod(*i, uid))
            .buffer_unordered(CONCURRENCY / 2)
            .try_collect::<Vec<()>>()
            .await?;
        last_write = Instant::now();
        // Passes ending from here on may hold this second's writes.
        at_last_write = agent.histogram().await?;
        if Instant::now() > due {
            result.late_seconds += 1;
        }
        // The second's pods are not sampled this second: they are checked
        // next second, when a pass has had a second to take them.
        let touched: BTreeSet<usize> = added
            .iter()
            .map(|(i, _)| *i)
            .chain(deletes.iter().map(|(i, _)| *i))
            .collect();
        result.added += added.len();
        result.deleted += deletes.len();
        check_second(
            &view,
            mount,
            &written,
            &touched,
            &fresh,
            &gone,
            &mut draw,
            &mut result,
        )?;
        fresh = added.iter().map(|(i, _)| *i).collect();
        gone = deletes
            .iter()
            .map(|(i, _)| (*i, IpAddr::V4(PodSpec::nth(*i).ip)))
            .collect();
        for (i, _) in &deletes {
            written.pods.remove(i);
        }
        all_gone.extend(&gone);
        for (i, pod) in added {
            written.pods.insert(i, pod);
            deletable.push_back(i);
        }
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
    result.writing_secs = (last_write - began).as_secs_f64();
    // The agent may have caught up already: quiet is no pass for a while,
    // whether or not one starts after the last write.
    let mut seen = at_last_write;
    let mut changed_at = last_write;
    while changed_at.elapsed() < SETTLED && last_write.elapsed() < super::PASS_BOUND {
        tokio::time::sleep(super::POLL).await;
        let now = agent.histogram().await?;
        if now.count != seen.count {
            seen = now;
            changed_at = Instant::now();
        }
    }
    result.settle_secs = (changed_at - last_write).as_secs_f64();
    result.passes = seen.since(&start);
    final_check(&view, mount, &written, &all_gone, &mut result)?;
    let live = written
        .pods
        .into_iter()
        .map(|(i, (_, uid))| (i, uid))
        .collect();
    Ok((result, live))
}

/// The flows and fresh pods of one second (see the module docs).
#[allow(clippy::too_many_arguments)]
fn check_second(
    view: &KernelView,
    mount: &Path,
    written: &Written,
    touched: &BTreeSet<usize>,
    fresh: &[usize],
    gone: &[(usize, IpAddr)],
    draw: &mut Draw,
    result: &mut SustainedResult,
) -> anyhow::Result<()> {
    for &i in fresh.iter().filter(|i| !touched.contains(i)) {
        let spec = PodSpec::nth(i);
        if identity(view, IpAddr::V4(spec.ip))?.is_none() {
            result.disagreements.push(format!(
                "pod {}/{} added a second ago has no identity",
                spec.namespace, spec.name
            ));
        }
    }
    for &(i, ip) in gone {
        if !written.pods.contains_key(&i) && identity(view, ip)?.is_some() {
            result
                .disagreements
                .push(format!("{ip}, deleted a second ago, still has an identity"));
        }
    }
    let inventory = written.inventory(mount);
    let stable: Vec<usize> = written
        .pods
        .keys()
        .copied()
        .filter(|i| !touched.contains(i))
        .collect();
    let local: Vec<usize> = stable
        .iter()
        .copied()
        .filter(|&i| PodSpec::nth(i).local)
        .collect();
    let fresh: Vec<usize> = fresh
        .iter()
        .copied()
        .filter(|i| written.pods.contains_key(i) && !touched.contains(i))
        .collect();
    if local.is_empty() || stable.is_empty() {
        return Ok(());
    }
    for n in 0..SAMPLE {
        // Half the flows touch a pod added the second before.
        let pick_fresh = n % 2 == 0 && !fresh.is_empty();
        let (src, dst) = match pick_fresh {
            true => {
                let f = fresh[draw.below(fresh.len())];
                match PodSpec::nth(f).local {
                    true => (stable[draw.below(stable.len())], f),
                    false => (f, local[draw.below(local.len())]),
                }
            }
            false => (
                stable[draw.below(stable.len())],
                local[draw.below(local.len())],
            ),
        };
        // Half the flows of stable pods: one a rule admits.
        let admitted = match n % 4 == 1 {
            true => admitted_flow(&inventory, &written.policies, (&local, &stable), draw),
            false => None,
        };
        let (src, dst, port) = match admitted {
            Some(flow) => flow,
            None => {
                let ports = policy_ports(&written.policies, &PodSpec::nth(dst).namespace);
                let port = match ports.is_empty() {
                    true => 80,
                    false => ports[draw.below(ports.len())],
                };
                (src, dst, port)
            }
        };
        if src == dst {
            continue;
        }
        let (src_spec, dst_spec) = (PodSpec::nth(src), PodSpec::nth(dst));
        let uids = (&written.pods[&src].1, &written.pods[&dst].1);
        let (allowed, problem) = check_flow(
            view,
            mount,
            &inventory,
            &written.policies,
            (&src_spec, &dst_spec, port),
            (uids.0.as_str(), uids.1.as_str()),
        )?;
        result.flows_checked += 1;
        result.flows_allowed += usize::from(allowed);
        result.disagreements.extend(problem);
    }
    Ok(())
}

/// Every pod once the agent is quiet: live ones enforced and known,
/// deleted ones forgotten.
fn final_check(
    view: &KernelView,
    mount: &Path,
    written: &Written,
    gone: &[(usize, IpAddr)],
    result: &mut SustainedResult,
) -> anyhow::Result<()> {
    for (&i, (_, uid)) in &written.pods {
        let spec = PodSpec::nth(i);
        result.pods_checked += 1;
        if identity(view, IpAddr::V4(spec.ip))?.is_none() {
            result
                .missed
                .push(format!("{}/{}: no identity", spec.namespace, spec.name));
        }
        if spec.local {
            let id = crate::cgroup::cgroup_id(&pod_cgroup(mount, uid))?;
            if view.endpoint(id)?.is_none() {
                result
                    .missed
                    .push(format!("{}/{}: no endpoint", spec.namespace, spec.name));
            }
        }
    }
    for &(i, ip) in gone {
        if !written.pods.contains_key(&i) {
            result.pods_checked += 1;
            if identity(view, ip)?.is_some() {
                result
                    .missed
                    .push(format!("{ip}: deleted, still has an identity"));
            }
        }
    }
    Ok(())
}

/// The sustained-churn paragraph and table of the churn section.
pub fn render(r: &SustainedResult) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "\nSustained churn: for {} s, {} pods added (bound, then running with an address) \
         and {} deleted (cgroup, then object) per second, {} API writes a second in all, \
         while the agent kept up. After each second, {SAMPLE} flows between pods that \
         second did not touch (half of them with a pod added the second before, a \
         quarter a flow some rule admits, as random pairs are nearly all denied) were \
         decided by the kernel (the pinned maps, the kernel's own decision code) and by \
         the evaluator on the cluster as written; pods added the second before must have \
         an identity and pods deleted then none. Once the writes stopped and the agent \
         was quiet, every live pod was checked for its identity (and endpoint, when \
         local) and every deleted pod for having none.\n\n",
        r.seconds,
        r.rate,
        r.rate,
        r.rate * 3,
    );
    s.push_str(
        "| pods added / deleted | writing s (late seconds) | flows checked (allowed) | \
         disagreements | last pass after last write, s | pods checked | missed updates | \
         passes | pass p50 / p99 (buckets) ms |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let bound = |q| {
        r.passes
            .quantile_bound(q)
            .map_or("–".to_string(), super::ms)
    };
    let _ = writeln!(
        s,
        "| {} / {} | {:.1} ({}) | {} ({}) | {} | {:.1} | {} | {} | {} | {} / {} |",
        r.added,
        r.deleted,
        r.writing_secs,
        r.late_seconds,
        r.flows_checked,
        r.flows_allowed,
        r.disagreements.len(),
        r.settle_secs,
        r.pods_checked,
        r.missed.len(),
        r.passes.count,
        bound(0.5),
        bound(0.99),
    );
    let verdict = match (r.missed.is_empty(), r.late_seconds) {
        (true, 0) => "0 missed updates at the full rate: met.".to_string(),
        (true, late) => format!(
            "0 missed updates, but the writer fell behind the rate in {late} of {} seconds: \
             **NOT met** at the full rate.",
            r.seconds
        ),
        (false, _) => format!("{} missed updates: **NOT met**.", r.missed.len()),
    };
    let _ = writeln!(s, "\n{verdict}");
    for d in r.missed.iter().chain(&r.disagreements).take(5) {
        let _ = writeln!(s, "- {d}");
    }
    s
}
