//! The `portcullis lab` command: build, apply, probe, print, tear down.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context as _};

use super::{
    report::{self, ProbeSpec},
    topology::{self, Topology},
    Family, Lab, LabOptions,
};
use crate::mesh::mode::MeshMode;

#[derive(Debug, clap::Args)]
pub struct LabArgs {
    /// Directory of policy files (every *.yaml / *.yml, multi-document allowed).
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// Namespaces, labels, pods and ports to build instead of the default
    /// x,y,z × a,b,c (workloads-file format without cgroup and ips).
    #[arg(long)]
    pub topology: Option<PathBuf>,
    /// Port/protocol to probe, e.g. 80/tcp; repeatable. Default: 80/tcp,
    /// 81/tcp, 80/udp, 81/udp.
    #[arg(long = "probe")]
    pub probes: Vec<ProbeSpec>,
    /// Address family to probe over.
    #[arg(long, value_enum, default_value_t = Family::Ipv4)]
    pub family: Family,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Print the pods and their addresses without building anything.
    #[arg(long)]
    pub topology_only: bool,
    /// Probe once before the policies are applied, then again after.
    #[arg(long)]
    pub show_before: bool,
    /// Lab name: labs with different names can run side by side.
    #[arg(long, default_value = "lab")]
    pub name: String,
    /// How long a probe waits before it counts as dropped.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Keep the lab running after probing, until Ctrl-C, e.g. to run
    /// `portcullis explain --lab NAME` against it.
    #[arg(long)]
    pub keep: bool,
    /// Put every lab namespace in the mesh (transparent mTLS between the
    /// pods): strict, permissive or disabled. Pods' own
    /// `portcullis.dev/mtls` labels still win.
    #[arg(long)]
    pub mtls: Option<MeshMode>,
    /// Simulated nodes, 1 or 2. With 2, pods take turns (or follow their
    /// `node` in the topology file); each node has its own bridge, agent
    /// and identities, and a link joins the nodes.
    #[arg(long, default_value_t = 1, value_parser = parse_nodes)]
    pub nodes: usize,
}

fn parse_nodes(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if (1..=topology::MAX_NODES).contains(&n) => Ok(n),
        _ => Err(format!(
            "{value:?}: the lab simulates 1 or 2 nodes (--nodes 1 or --nodes 2)"
        )),
    }
}

fn load_topology(args: &LabArgs) -> anyhow::Result<Topology> {
    let mut topology = match &args.topology {
        None => topology::default_topology(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading topology {}", path.display()))?;
            topology::parse_topology(path, &text)?
        }
    };
    if let Some(mode) = args.mtls {
        topology.mesh_all(mode);
    }
    Ok(topology)
}

pub async fn run(args: LabArgs) -> anyhow::Result<()> {
    let topology = load_topology(&args)?;
    if args.topology_only {
        let pods = topology::plan_on(&topology, args.nodes)?;
        if args.json {
            println!("{}", serde_json::json!({"pods": report::pods_json(&pods)}));
        } else {
            for p in &pods {
                let node = match args.nodes {
                    1 => String::new(),
                    _ => format!(" node{}", p.node),
                };
                println!("{:<20} {:<16} {}{node}", p.key, p.ipv4, p.ipv6);
            }
        }
        return Ok(());
    }
    if let Some(dir) = &args.policies {
        if !dir.is_dir() {
            bail!("--policies {}: not a directory", dir.display());
        }
    }
    let specs = if args.probes.is_empty() {
        ProbeSpec::all_default()
    } else {
        args.probes.clone()
    };
    let mut opts = LabOptions::new(&args.name, topology);
    opts.probe_timeout = Duration::from_millis(args.timeout_ms);
    opts.nodes = args.nodes;
    if !args.json {
        eprintln!(
            "building lab '{}': {} pods on {} node(s) …",
            args.name,
            opts.topology.workloads.len(),
            opts.nodes
        );
    }
    let lab = Lab::start(opts).await?;
    if !args.json && lab.node_count() > 1 {
        eprint!("{}", describe_nodes(&lab));
    }
    // Ctrl-C anywhere below still tears the lab down.
    let outcome = tokio::select! {
        r = measure(&lab, &args, &specs) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted; removing the lab");
            // With --keep, Ctrl-C is how the lab is meant to end.
            if args.keep {
                Ok(())
            } else {
                Err(anyhow::anyhow!("interrupted before the measurement finished"))
            }
        }
    };
    lab.shutdown().await.context("removing the lab")?;
    outcome
}

/// Which pods run where, and the link between the nodes.
fn describe_nodes(lab: &Lab) -> String {
    let mut out = String::new();
    for node in 1..=lab.node_count() {
        let pods: Vec<&str> = lab
            .pods()
            .iter()
            .filter(|p| p.node == node)
            .map(|p| p.key.as_str())
            .collect();
        let (net, netns) = match (lab.node_net(node), lab.node_netns_of(node)) {
            (Ok(net), Ok(netns)) => (net, netns),
            _ => continue,
        };
        out.push_str(&format!(
            "node{node} ({netns}, {}/{}): {}\n",
            net.subnet_v4,
            net.prefix_v4,
            pods.join(", ")
        ));
    }
    if let Some([a, b]) = lab.node_link() {
        out.push_str(&format!(
            "link: {} in {} <-> {} in {}\n",
            a.interface, a.netns, b.interface, b.netns
        ));
    }
    out
}

async fn measure(lab: &Lab, args: &LabArgs, specs: &[ProbeSpec]) -> anyhow::Result<()> {
    let human = !args.json;
    // Every agent has applied its first pass once the lab is up, but meshed
    // pods' listeners and certificates may still be on their way.
    lab.wait_applied().await?;
    if args.show_before && human {
        let before = lab.probe_matrix(specs, args.family).await?;
        println!("== Before: no policies ==\n");
        print!(
            "{}",
            report::render(lab.pods(), &before, args.family.as_str())
        );
    }
    if let Some(dir) = &args.policies {
        lab.use_policies_from(dir)?;
        let status = lab.wait_applied().await?;
        if !status.problems.is_empty() {
            for p in &status.problems {
                eprintln!("error: {p}");
            }
            bail!(
                "{} problem(s) in the policies of {}; nothing was measured",
                status.problems.len(),
                dir.display()
            );
        }
        if human {
            eprintln!(
                "applied {} policy map entries for {} endpoints",
                status.usage.policy, status.usage.endpoints
            );
        }
    }
    let started = std::time::Instant::now();
    let after = lab.probe_matrix(specs, args.family).await?;
    if args.json {
        println!("{}", report::matrices_json(lab.pods(), &after));
    } else {
        let title = match &args.policies {
            Some(dir) => format!("With policies from {}", dir.display()),
            None => "No policies".to_string(),
        };
        println!("== {title} ==\n");
        print!(
            "{}",
            report::render(lab.pods(), &after, args.family.as_str())
        );
        eprintln!(
            "probed {} pairs × {} port(s) in {:.1}s",
            lab.pods().len() * lab.pods().len(),
            specs.len(),
            started.elapsed().as_secs_f64()
        );
    }
    if human && args.mtls.is_some_and(|m| m.is_meshed()) {
        if let Some(shown) =
            super::mesh_report::encrypted_connection(lab, &args.name, &after).await?
        {
            println!("== Encrypted ==\n\n{shown}");
        }
    }
    if args.keep {
        eprintln!(
            "lab '{}' keeps running; try `portcullis explain --lab {} --from x/a --to y/b \
             --port 80/tcp`. Ctrl-C removes it.",
            args.name, args.name
        );
        std::future::pending::<()>().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_nodes;

    #[test]
    fn the_lab_has_one_or_two_nodes() {
        assert_eq!(parse_nodes("1"), Ok(1));
        assert_eq!(parse_nodes("2"), Ok(2));
        for bad in ["0", "3", "-1", "two", ""] {
            let e = parse_nodes(bad).unwrap_err();
            assert!(e.contains("1 or 2 nodes"), "{bad}: {e}");
        }
    }
}
