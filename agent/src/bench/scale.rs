//! Scale check: many workloads and rules compile and load; how compile time,
//! map entries and kernel memory grow with the number of rules.
//!
//! All workloads are local (the worst case for the policy map: every
//! endpoint's entries are installed). Their cgroups are empty directories
//! under a private subtree where the programs attach, so the host is not
//! affected.

use std::{
    fmt::Write as _,
    fs,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{ensure, Context as _};
use aya::maps::MapData;
use portcullis_common::{ENDPOINTS_MAP, IDENTITIES_MAP, POLICY_MAP};

use crate::{
    bpf::{loader::uninstall, Dataplane, DataplaneOptions},
    cgroup,
    policy::{
        compile::Compiler,
        model::CheckedInventory,
        parse::{parse_inventory, parse_policies},
    },
    reconcile::Reconciler,
    source::Snapshot,
};

const NAMESPACES: usize = 50;
const APPS: usize = 100;
const RULES_PER_POLICY: usize = 10;
const PIN_DIR: &str = "/sys/fs/bpf/portcullis-scale";
const CGROUP_DIR: &str = "portcullis-scale";

/// One measured size.
#[derive(Clone, Debug)]
pub struct ScalePoint {
    pub rules: usize,
    pub compile_secs: f64,
    pub apply_secs: f64,
    /// One pass (compile, map contents, apply) after one pod's labels
    /// changed, in steady state: the incremental path.
    pub change_secs: f64,
    pub policy_entries: usize,
    pub identity_entries: usize,
    /// Kernel memory of the endpoint, identity and policy maps (both
    /// generations, as deployed).
    pub kernel_bytes: u64,
}

fn inventory_yaml(workloads: usize) -> String {
    let mut y = String::from("namespaces:\n");
    for n in 0..NAMESPACES {
        let _ = writeln!(y, "  - {{name: ns-{n}, labels: {{team: t-{}}}}}", n % 5);
    }
    y.push_str("workloads:\n");
    for i in 0..workloads {
        let ip = std::net::Ipv4Addr::from(u32::from_be_bytes([198, 18, 4, 1]) + i as u32);
        let _ = writeln!(
            y,
            "  - {{name: w-{i}, namespace: ns-{}, labels: {{app: app-{}, tier: t{}}}, \
             cgroup: /{CGROUP_DIR}/w-{i}, ips: [{ip}], \
             ports: [{{name: http, containerPort: 8080, protocol: TCP}}]}}",
            i % NAMESPACES,
            i % APPS,
            i % 3
        );
    }
    y
}

/// `rules` distinct ingress rules in policies of ten rules each, selecting
/// apps and naming peers by namespace and app labels.
fn policies_yaml(rules: usize) -> String {
    let mut y = String::new();
    for p in 0..rules.div_ceil(RULES_PER_POLICY) {
        let _ = write!(
            y,
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: pol-{p}, namespace: ns-{}}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: app-{}}}}}\n  ingress:\n",
            p % NAMESPACES,
            p % APPS
        );
        for j in 0..RULES_PER_POLICY.min(rules - p * RULES_PER_POLICY) {
            let _ = writeln!(
                y,
                "    - from: [{{namespaceSelector: {{matchLabels: {{team: t-{}}}}}, \
                 podSelector: {{matchLabels: {{app: app-{}}}}}}}]\n      ports: [{{port: {}}}]",
                (p + j) % 5,
                (p * 7 + j) % APPS,
                // A distinct port per rule: no two rules collapse into one.
                1000 + p * RULES_PER_POLICY + j
            );
        }
    }
    y
}

/// Kernel memory charged for a pinned map (fdinfo `memlock`).
fn map_memory(path: &Path) -> anyhow::Result<u64> {
    let map = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let fd = map.fd().as_fd().as_raw_fd();
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no memlock in fdinfo")
}

/// Best effort, before a run (leftovers of a crashed one) and after it.
fn remove_cgroups(root: &Path) {
    let _ = crate::lab::plumbing::remove_cgroup_tree(root);
}

/// Measures each rule count with `workloads` local workloads.
pub fn run(rule_counts: &[usize], workloads: usize) -> anyhow::Result<Vec<ScalePoint>> {
    ensure!(
        rule_counts.iter().all(|&r| r <= 60_000),
        "at most 60000 rules: each gets its own port"
    );
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the scale check loads maps into the kernel: run it as root"
    );
    let mount = cgroup::cgroup2_mount()?;
    let root: PathBuf = mount.join(CGROUP_DIR);
    let pin_dir = PathBuf::from(PIN_DIR);
    uninstall(&pin_dir)?;
    remove_cgroups(&root);
    for i in 0..workloads {
        fs::create_dir_all(root.join(format!("w-{i}")))?;
    }
    let result = measure(rule_counts, workloads, &mount, &root, &pin_dir);
    uninstall(&pin_dir)?;
    remove_cgroups(&root);
    result
}

fn measure(
    rule_counts: &[usize],
    workloads: usize,
    mount: &Path,
    root: &Path,
    pin_dir: &Path,
) -> anyhow::Result<Vec<ScalePoint>> {
    let inventory = parse_inventory(
        Path::new("scale-workloads.yaml"),
        &inventory_yaml(workloads),
    )?;
    let mut dataplane = Dataplane::load(&DataplaneOptions {
        pin_dir: pin_dir.to_path_buf(),
        cgroup_root: root.to_path_buf(),
        capacities: Default::default(),
    })?;
    let mut points = Vec::new();
    for &rules in rule_counts {
        let policies = parse_policies(Path::new("scale-policies.yaml"), &policies_yaml(rules))?;
        let started = Instant::now();
        let compiled = Compiler::new().compile(&inventory, &policies)?;
        let compile_secs = started.elapsed().as_secs_f64();
        let snapshot = Snapshot {
            inventory: CheckedInventory::new(inventory.clone())?,
            policies: std::sync::Arc::new(policies),
            ..Default::default()
        };
        let mut reconciler = Reconciler::new(mount.to_path_buf());
        let started = Instant::now();
        let applied = reconciler.reconcile(&snapshot, &mut dataplane.writer)?;
        let apply_secs = started.elapsed().as_secs_f64();
        // A second pass fills the other generation too: steady state.
        reconciler.reconcile(&snapshot, &mut dataplane.writer)?;
        let mut changed = snapshot.clone();
        changed.inventory = snapshot.inventory.edit(|i| {
            std::sync::Arc::make_mut(&mut i.workloads[0])
                .labels_mut()
                .insert("app".into(), format!("app-{}", APPS / 2));
        })?;
        let started = Instant::now();
        reconciler.reconcile(&changed, &mut dataplane.writer)?;
        let change_secs = started.elapsed().as_secs_f64();
        ensure!(
            applied.missing_cgroups.is_empty(),
            "cgroups missing: {:?}",
            applied.missing_cgroups
        );
        let kernel_bytes = [ENDPOINTS_MAP, IDENTITIES_MAP, POLICY_MAP]
            .iter()
            .map(|m| map_memory(&pin_dir.join(m)))
            .sum::<anyhow::Result<u64>>()?;
        eprintln!(
            "scale: {rules} rules, {workloads} workloads: compile {compile_secs:.3}s, apply \
             {apply_secs:.3}s, one pod relabelled {change_secs:.3}s, {} policy entries, {:.1} \
             MiB kernel memory",
            compiled.rules.len(),
            kernel_bytes as f64 / 1048576.0
        );
        points.push(ScalePoint {
            rules,
            compile_secs,
            apply_secs,
            change_secs,
            policy_entries: compiled.rules.len(),
            identity_entries: compiled.identities.len(),
            kernel_bytes,
        });
    }
    Ok(points)
}

/// The scale section of BENCHMARKS.md.
pub fn render(points: &[ScalePoint], workloads: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Scale: {workloads} workloads, growing rule counts\n"
    );
    let _ = writeln!(
        out,
        "All {workloads} workloads are local to the node (every endpoint's entries are \
         installed), in {NAMESPACES} namespaces; policies of {RULES_PER_POLICY} ingress rules \
         select apps and name peers by namespace and app labels. Compile and apply are a first \
         pass from nothing; \"one pod relabelled\" is a whole steady-state pass (incremental \
         compile, map contents, apply to the next generation and flip) after one pod's app \
         label changed. Kernel memory is what the kernel charges for the endpoint, identity and \
         policy maps holding both generations.\n"
    );
    let _ = writeln!(
        out,
        "| rules | compile s | apply s | one pod relabelled s | policy entries | identity entries \
         | kernel MiB | bytes/rule |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for p in points {
        let _ = writeln!(
            out,
            "| {} | {:.3} | {:.3} | {:.3} | {} | {} | {:.1} | {:.0} |",
            p.rules,
            p.compile_secs,
            p.apply_secs,
            p.change_secs,
            p.policy_entries,
            p.identity_entries,
            p.kernel_bytes as f64 / 1048576.0,
            p.kernel_bytes as f64 / p.rules as f64
        );
    }
    if let (Some(first), Some(last)) = (points.first(), points.last()) {
        let scale = last.rules as f64 / first.rules as f64;
        let growth = |a: f64, b: f64| if a > 0.0 { b / a / scale } else { 0.0 };
        let _ = writeln!(
            out,
            "\nFrom {} to {} rules ({scale:.0}×): compile time grew {:.2}× linear, policy entries \
             {:.2}× linear, kernel memory {:.2}× linear (1.00 = exactly linear; below is better).\n",
            first.rules,
            last.rules,
            growth(first.compile_secs, last.compile_secs),
            growth(first.policy_entries as f64, last.policy_entries as f64),
            growth(first.kernel_bytes as f64, last.kernel_bytes as f64),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_inputs_parse_with_the_requested_sizes() {
        let inv = parse_inventory(Path::new("w.yaml"), &inventory_yaml(120)).unwrap();
        assert_eq!(inv.workloads.len(), 120);
        let pols = parse_policies(Path::new("p.yaml"), &policies_yaml(25)).unwrap();
        assert_eq!(pols.len(), 3, "25 rules in policies of ten");
        assert_eq!(policies_yaml(25).matches("- from:").count(), 25);
    }
}
