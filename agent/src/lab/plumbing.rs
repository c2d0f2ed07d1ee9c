//! Network namespaces, veths, the bridges and cgroups that make up lab pods
//! and nodes, and the link between two nodes. Everything is named after the
//! lab so a later run can find and remove what a crashed one left behind.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use super::topology::{NodeNet, PlannedPod};

const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum PlumbingError {
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("running `ip` (is iproute2 installed?)")]
    IpMissing {
        #[source]
        source: std::io::Error,
    },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PlumbingError {
    let path = path.to_path_buf();
    move |source| PlumbingError::Io {
        action,
        path,
        source,
    }
}

/// Runs `ip` with the given arguments.
pub fn ip(args: &[&str]) -> Result<(), PlumbingError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| PlumbingError::IpMissing { source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(PlumbingError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Names of everything belonging to one lab.
#[derive(Clone, Debug)]
pub struct LabNames {
    pub lab: String,
    /// cgroup directory of the lab; pods' cgroups are below it. A one-node
    /// lab's agent attaches here (see [`LabNames::node_cgroup_root`]).
    pub cgroup_root: PathBuf,
    /// How many nodes the lab simulates (1 or 2).
    pub nodes: usize,
    /// Pods' cgroups named as a kubelet names them, by pod UID
    /// (Kubernetes-mode lab; see [`super::kube::LabKube::pod_uids`]).
    pub kubelet_uids: Option<BTreeMap<String, String>>,
}

impl LabNames {
    pub fn new(lab: &str, cgroup_mount: &Path) -> Self {
        Self {
            lab: lab.to_string(),
            cgroup_root: cgroup_mount.join(format!("portcullis-lab-{lab}")),
            nodes: 1,
            kubelet_uids: None,
        }
    }

    fn prefix(&self) -> String {
        format!("pcl-{}-", self.lab)
    }

    /// The first node's namespace.
    pub fn node_netns(&self) -> String {
        self.node_netns_of(1)
    }

    /// Node `node`'s (from 1) namespace: `…node`, `…node2`.
    pub fn node_netns_of(&self, node: usize) -> String {
        match node {
            1 => format!("{}node", self.prefix()),
            n => format!("{}node{n}", self.prefix()),
        }
    }

    /// Where node `node`'s agent attaches: the lab's cgroup in a one-node
    /// lab, a subtree of it per node otherwise (disjoint, so each agent
    /// sees only its own pods).
    pub fn node_cgroup_root(&self, node: usize) -> PathBuf {
        if self.nodes <= 1 {
            self.cgroup_root.clone()
        } else {
            self.cgroup_root.join(format!("node{node}"))
        }
    }

    pub fn pod_netns(&self, pod: &PlannedPod) -> String {
        format!("{}{}", self.prefix(), pod.index)
    }

    pub fn pod_cgroup(&self, pod: &PlannedPod) -> PathBuf {
        if let Some(uids) = &self.kubelet_uids {
            let uid = uids
                .get(&pod.key)
                .cloned()
                .unwrap_or_else(|| super::kube::pod_uid(pod));
            return self
                .cgroup_root
                .join(super::kube::pod_cgroup_relative(&uid));
        }
        self.node_cgroup_root(pod.node).join(format!(
            "{}-{}",
            sanitize(&pod.workload.namespace),
            sanitize(&pod.workload.name)
        ))
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A "node": a namespace holding the bridge that connects its pods, with
/// the node's addresses on it. In a two-node lab it also routes.
pub fn create_node(names: &LabNames, node: usize) -> Result<(), PlumbingError> {
    let ns = names.node_netns_of(node);
    let net = NodeNet::of(node, names.nodes);
    let v4 = format!("{}/{}", net.ipv4, net.prefix_v4);
    let v6 = format!("{}/{}", net.ipv6, net.prefix_v6);
    ip(&["netns", "add", &ns])?;
    if names.nodes > 1 {
        // Before any interface exists, so all inherit it: no duplicate
        // address detection, as a forwarding node sends neighbour
        // solicitations for other hosts' packets only from a link-local
        // address that is no longer tentative (a second lost at start).
        ip(&[
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ])?;
    }
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &ns, "addr", "add", &v4, "dev", "br0"])?;
    // nodad: the address is usable at once instead of after duplicate detection.
    ip(&["-n", &ns, "addr", "add", &v6, "dev", "br0", "nodad"])?;
    ip(&["-n", &ns, "link", "set", "br0", "up"])
}

/// A pod: its own network namespace with `eth0` on its node's bridge (and,
/// with two nodes, a default route through the node).
pub fn create_pod(names: &LabNames, pod: &PlannedPod) -> Result<(), PlumbingError> {
    let node = names.node_netns_of(pod.node);
    let net = NodeNet::of(pod.node, names.nodes);
    let ns = names.pod_netns(pod);
    let host_side = host_veth(pod);
    let v4 = format!("{}/{}", pod.ipv4, net.prefix_v4);
    let v6 = format!("{}/{}", pod.ipv6, net.prefix_v6);
    ip(&["netns", "add", &ns])?;
    ip(&[
        "-n", &node, "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns",
        &ns,
    ])?;
    ip(&[
        "-n", &node, "link", "set", &host_side, "master", "br0", "up",
    ])?;
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    ip(&["-n", &ns, "addr", "add", &v4, "dev", "eth0"])?;
    ip(&["-n", &ns, "addr", "add", &v6, "dev", "eth0", "nodad"])?;
    ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    if names.nodes > 1 {
        let (gw4, gw6) = (net.ipv4.to_string(), net.ipv6.to_string());
        ip(&[
            "-n", &ns, "route", "add", "default", "via", &gw4, "dev", "eth0",
        ])?;
        ip(&[
            "-n", &ns, "-6", "route", "add", "default", "via", &gw6, "dev", "eth0",
        ])?;
    }
    Ok(())
}

/// The interface on the node-to-node link in node `node`'s namespace,
/// named after the node at its other end.
pub fn link_interface(node: usize) -> String {
    format!("to-node{}", 3 - node)
}

/// Addresses of the node-to-node link's ends (link-local IPv4, a ULA /64
/// of its own), so neither node's pod subnet is used for the link.
fn link_addresses(node: usize) -> (String, String) {
    (
        format!("169.254.0.{node}"),
        format!("fd00:7063:6cff::{node}"),
    )
}

/// Joins node 1 and node 2 with a veth pair and routes each node's pod
/// subnets across it. Traffic the nodes make themselves leaves from their
/// bridge addresses, as a node's traffic leaves from its node IP.
pub fn create_link(names: &LabNames) -> Result<(), PlumbingError> {
    let (ns1, ns2) = (names.node_netns_of(1), names.node_netns_of(2));
    let (if1, if2) = (link_interface(1), link_interface(2));
    ip(&[
        "-n", &ns1, "link", "add", &if1, "type", "veth", "peer", "name", &if2, "netns", &ns2,
    ])?;
    for node in [1, 2] {
        let ns = names.node_netns_of(node);
        let dev = link_interface(node);
        let (v4, v6) = link_addresses(node);
        ip(&["-n", &ns, "addr", "add", &format!("{v4}/30"), "dev", &dev])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            &dev,
            "nodad",
        ])?;
        ip(&["-n", &ns, "link", "set", &dev, "up"])?;
        let (own, peer) = (NodeNet::of(node, 2), NodeNet::of(3 - node, 2));
        let (via4, via6) = link_addresses(3 - node);
        let to4 = format!("{}/{}", peer.subnet_v4, peer.prefix_v4);
        let to6 = format!("{}/{}", peer.subnet_v6, peer.prefix_v6);
        let (src4, src6) = (own.ipv4.to_string(), own.ipv6.to_string());
        ip(&[
            "-n", &ns, "route", "add", &to4, "via", &via4, "dev", &dev, "src", &src4,
        ])?;
        ip(&[
            "-n", &ns, "-6", "route", "add", &to6, "via", &via6, "dev", &dev, "src", &src6,
        ])?;
    }
    Ok(())
}

/// The node-side end of a pod's veth.
pub fn host_veth(pod: &PlannedPod) -> String {
    format!("v{}", pod.index)
}

pub fn create_cgroup(path: &Path) -> Result<(), PlumbingError> {
    fs::create_dir_all(path).map_err(io("creating cgroup", path))
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Removes every namespace and cgroup of this lab, killing what runs in
/// them. Safe to call when nothing exists.
pub fn remove_all(names: &LabNames) -> Result<(), PlumbingError> {
    remove_cgroup_tree(&names.cgroup_root)?;
    let prefix = names.prefix();
    if let Ok(entries) = fs::read_dir(NETNS_DIR) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(&prefix) {
                // Deleting the node namespace also removes the veths' host ends.
                ip(&["netns", "delete", &name])?;
            }
        }
    }
    Ok(())
}

pub(crate) fn remove_cgroup_tree(root: &Path) -> Result<(), PlumbingError> {
    if !root.exists() {
        return Ok(());
    }
    // cgroup.kill (Linux 5.14+) kills the whole subtree at once.
    let kill = root.join("cgroup.kill");
    if kill.exists() {
        fs::write(&kill, "1").map_err(io("killing processes of", root))?;
    }
    let children: Vec<PathBuf> = fs::read_dir(root)
        .map_err(io("listing", root))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    for child in children {
        remove_cgroup_tree(&child)?;
    }
    // rmdir fails with EBUSY until the killed processes have exited.
    let mut last = None;
    for _ in 0..100 {
        match fs::remove_dir(root) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
        thread::sleep(Duration::from_millis(20));
    }
    Err(PlumbingError::Io {
        action: "removing cgroup",
        path: root.to_path_buf(),
        source: last.unwrap_or_else(|| std::io::Error::other("still busy")),
    })
}
