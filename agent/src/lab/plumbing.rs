//! Network namespaces, veths, the bridge and cgroups that make up lab pods.
//! Everything is named after the lab so a later run can find and remove what
//! a crashed one left behind.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use super::topology::{PlannedPod, IPV4_PREFIX_LEN, IPV6_PREFIX_LEN, NODE_IPV4, NODE_IPV6};

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
    /// cgroup directory the programs attach to; pods' cgroups are below it.
    pub cgroup_root: PathBuf,
    /// Pods' cgroups named as a kubelet names them, by pod UID
    /// (Kubernetes-mode lab; see [`super::kube::LabKube::pod_uids`]).
    pub kubelet_uids: Option<BTreeMap<String, String>>,
}

impl LabNames {
    pub fn new(lab: &str, cgroup_mount: &Path) -> Self {
        Self {
            lab: lab.to_string(),
            cgroup_root: cgroup_mount.join(format!("portcullis-lab-{lab}")),
            kubelet_uids: None,
        }
    }

    fn prefix(&self) -> String {
        format!("pcl-{}-", self.lab)
    }

    pub fn node_netns(&self) -> String {
        format!("{}node", self.prefix())
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
        self.cgroup_root.join(format!(
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

/// The "node": a namespace holding the bridge that connects the pods, with
/// the node's addresses on it.
pub fn create_node(names: &LabNames) -> Result<(), PlumbingError> {
    let ns = names.node_netns();
    let v4 = format!("{NODE_IPV4}/{IPV4_PREFIX_LEN}");
    let v6 = format!("{NODE_IPV6}/{IPV6_PREFIX_LEN}");
    ip(&["netns", "add", &ns])?;
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &ns, "addr", "add", &v4, "dev", "br0"])?;
    // nodad: the address is usable at once instead of after duplicate detection.
    ip(&["-n", &ns, "addr", "add", &v6, "dev", "br0", "nodad"])?;
    ip(&["-n", &ns, "link", "set", "br0", "up"])
}

/// A pod: its own network namespace with `eth0` on the node's bridge.
pub fn create_pod(names: &LabNames, pod: &PlannedPod) -> Result<(), PlumbingError> {
    let node = names.node_netns();
    let ns = names.pod_netns(pod);
    let host_side = host_veth(pod);
    let v4 = format!("{}/{IPV4_PREFIX_LEN}", pod.ipv4);
    let v6 = format!("{}/{IPV6_PREFIX_LEN}", pod.ipv6);
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
    ip(&["-n", &ns, "link", "set", "eth0", "up"])
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
