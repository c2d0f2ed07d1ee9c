//! `portcullis lab`: a throwaway topology of network namespaces ("pods"),
//! each with its own cgroup, on one bridge, enforced by a real agent, and the
//! measured reachability between every pair of pods. With two nodes, each
//! node is a namespace with its own bridge, pods and agent, and a veth link
//! joins the nodes (see [`node`]).

pub mod affinity;
pub mod cli;
pub mod kube;
pub mod mesh_report;
pub mod node;
pub mod plumbing;
pub mod pod;
pub mod report;
pub mod topology;

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::json;

use crate::{
    app::{self, AgentHandle, AgentOptions, Status},
    bpf::{self, CounterSample, LoadError},
    cgroup::{self, CgroupError},
    policy::model::Service,
    source::kube::KubeOptions,
    source::{
        file::{fingerprint, is_policy_file},
        Revision,
    },
};
use node::LabNode;
use plumbing::{LabNames, PlumbingError};
use pod::{LoadResult, Placement, PodClient, PodError, ProbeOutcome, Protocol};
use report::{Matrix, ProbeSpec};
use topology::{NodeNet, PlannedPod, Topology, TopologyError};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the mesh is not ready after {MESH_READY_WITHIN:?}: {waiting}")]
    MeshNotReady { waiting: String },
    #[error("the lab needs root (network namespaces, cgroups and eBPF); run it with sudo")]
    NotRoot,
    #[error("finding the cgroup v2 hierarchy")]
    Cgroup {
        #[source]
        source: CgroupError,
    },
    #[error("building the lab network")]
    Plumbing {
        #[source]
        source: PlumbingError,
    },
    #[error("starting the agent")]
    Agent {
        #[source]
        source: app::AgentError,
    },
    #[error("removing the previous lab's pinned state")]
    Pins {
        #[source]
        source: LoadError,
    },
    #[error("pod {pod}")]
    Pod {
        pod: String,
        #[source]
        source: PodError,
    },
    #[error("no pod {pod} in the lab (pods are namespace/name, e.g. x/a)")]
    UnknownPod { pod: String },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("making the lab's throwaway CA")]
    Ca {
        #[source]
        source: crate::identity::authority::AuthorityError,
    },
    #[error("the agent did not apply the policies within {seconds}s")]
    ApplyTimeout { seconds: u64 },
    #[error("the lab's agent is not running (stopped or detached)")]
    NoAgent,
    #[error("reading counters")]
    Counters {
        #[source]
        source: LoadError,
    },
    #[error("pinning pod {pod} to CPUs")]
    Affinity {
        pod: String,
        #[source]
        source: affinity::AffinityError,
    },
    #[error("placing the pods on the lab's nodes")]
    Placement {
        #[source]
        source: TopologyError,
    },
    #[error("a lab on a Kubernetes API server has one node")]
    KubernetesNodes,
    #[error("the lab has no node {node}")]
    UnknownNode { node: usize },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LabError {
    let path = path.to_path_buf();
    move |source| LabError::Io {
        action,
        path,
        source,
    }
}

/// IPv4 or IPv6: which pod address probes go to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Family {
    #[default]
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        }
    }
}

/// How long [`Lab::wait_applied`] waits for meshed pods' listeners and
/// certificates.
const MESH_READY_WITHIN: Duration = Duration::from_secs(20);

#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Names the lab's namespaces, cgroups and pins; labs with different
    /// names can coexist.
    pub name: String,
    pub topology: Topology,
    /// How long a probe waits for an answer before it counts as dropped.
    pub probe_timeout: Duration,
    /// Where the lab's agent serves /metrics, /healthz and /readyz (port 0:
    /// any free port, see [`Lab::admin_addr`]); none when `None`.
    pub admin_addr: Option<SocketAddr>,
    /// Kubernetes mode: the agent reads pods and policies from this API
    /// server instead of the lab's files (see [`kube`]).
    pub kubernetes: Option<kube::LabKube>,
    /// Lifetime of the pods' certificates from the lab's CA (renewed at
    /// half-life).
    pub leaf_lifetime: Duration,
    /// How many nodes to simulate, 1 or 2; each has its own bridge, pods,
    /// agent and identities, and two are joined by a link (files only).
    pub nodes: usize,
    /// Whether the agents attach the frame guard to the pods' interfaces
    /// (`--guard-packet-sockets`); off, a test sees what the other layers
    /// hold alone.
    pub guard_frames: bool,
}

impl LabOptions {
    pub fn new(name: &str, topology: Topology) -> Self {
        Self {
            name: name.to_string(),
            topology,
            probe_timeout: Duration::from_millis(1000),
            admin_addr: None,
            kubernetes: None,
            leaf_lifetime: crate::identity::authority::DEFAULT_LEAF_LIFETIME,
            nodes: 1,
            guard_frames: true,
        }
    }
}

pub struct Lab {
    names: LabNames,
    pods: Vec<PlannedPod>,
    clients: Vec<PodClient>,
    /// Node 1 first; the first one is "the" node of one-node accessors.
    nodes: Vec<LabNode>,
    state_dir: PathBuf,
    /// Shared by every node's agent, as a cluster's policies are.
    policies_dir: PathBuf,
    probe_timeout: Duration,
    admin_addr: Option<SocketAddr>,
    kubernetes: Option<kube::LabKube>,
    leaf_lifetime: Duration,
    guard_frames: bool,
    /// What the workloads file is generated from.
    topology: Topology,
    services: Vec<Service>,
    torn_down: bool,
}

/// A TCP connection a pod keeps open (see [`Lab::hold`]).
#[derive(Clone, Copy, Debug)]
pub struct HeldConnection {
    pod: usize,
    id: u64,
}

/// File name of the agent's published names in a lab's state directory.
pub const NAMES_FILE: &str = "names.json";

const APPLY_TIMEOUT: Duration = Duration::from_secs(20);

pub fn pin_dir_for(name: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/portcullis-lab-{name}"))
}

/// Where a lab keeps its policies, workloads file and published names.
pub fn state_dir_for(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/portcullis-lab-{name}"))
}

/// The end of the node-to-node link in one node, for captures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkEnd {
    pub node: usize,
    /// The node's network namespace.
    pub netns: String,
    pub interface: String,
}

/// Removes whatever a lab of this name left behind (a crashed run), with
/// one node or two.
fn remove_leftovers(names: &LabNames) -> Result<(), LabError> {
    plumbing::remove_all(names).map_err(|source| LabError::Plumbing { source })?;
    for pins in [
        pin_dir_for(&names.lab),
        node::pin_dir_for_node(&names.lab, 2),
    ] {
        bpf::loader::uninstall(&pins).map_err(|source| LabError::Pins { source })?;
    }
    let state = state_dir_for(&names.lab);
    if state.exists() {
        fs::remove_dir_all(&state).map_err(io("removing", &state))?;
    }
    Ok(())
}

impl Lab {
    /// Builds the topology and starts an agent on it with no policies.
    pub async fn start(opts: LabOptions) -> Result<Lab, LabError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(LabError::NotRoot);
        }
        if opts.kubernetes.is_some() && opts.nodes != 1 {
            return Err(LabError::KubernetesNodes);
        }
        let pods = topology::plan_on(&opts.topology, opts.nodes)
            .map_err(|source| LabError::Placement { source })?;
        let mount = cgroup::cgroup2_mount().map_err(|source| LabError::Cgroup { source })?;
        let mut names = LabNames::new(&opts.name, &mount);
        names.nodes = opts.nodes;
        names.kubelet_uids = opts.kubernetes.as_ref().map(|k| k.pod_uids.clone());
        remove_leftovers(&names)?;
        let state_dir = state_dir_for(&opts.name);
        let mut lab = Lab {
            pods,
            clients: Vec::new(),
            nodes: (1..=opts.nodes)
                .map(|n| LabNode::new(&opts.name, n, names.node_cgroup_root(n)))
                .collect(),
            names,
            policies_dir: state_dir.join("policies"),
            state_dir,
            probe_timeout: opts.probe_timeout,
            admin_addr: opts.admin_addr,
            kubernetes: opts.kubernetes.clone(),
            leaf_lifetime: opts.leaf_lifetime,
            guard_frames: opts.guard_frames,
            topology: opts.topology.clone(),
            services: Vec::new(),
            torn_down: false,
        };
        // From here on, Drop cleans up whatever was built if a step fails.
        lab.build(&opts.topology).await?;
        Ok(lab)
    }

    async fn build(&mut self, topology: &Topology) -> Result<(), LabError> {
        let plumb =
            |r: Result<(), PlumbingError>| r.map_err(|source| LabError::Plumbing { source });
        plumb(plumbing::create_cgroup(&self.names.cgroup_root))?;
        for node in &self.nodes {
            plumb(plumbing::create_node(&self.names, node.number))?;
            plumb(plumbing::create_cgroup(&node.cgroup_root))?;
        }
        if self.nodes.len() > 1 {
            plumb(plumbing::create_link(&self.names))?;
        }
        for pod in &self.pods {
            plumb(plumbing::create_pod(&self.names, pod))?;
            plumb(plumbing::create_cgroup(&self.names.pod_cgroup(pod)))?;
        }
        fs::create_dir_all(&self.policies_dir).map_err(io("creating", &self.policies_dir))?;
        for node in &self.nodes {
            let yaml = workloads_yaml(topology, &self.pods, &self.names, node.number, &[]);
            if let Some(dir) = node.workloads.parent() {
                fs::create_dir_all(dir).map_err(io("creating", dir))?;
            }
            fs::write(&node.workloads, yaml).map_err(io("writing", &node.workloads))?;
        }

        self.attach_agent()?;

        let exe = portcullis_exe().map_err(io("locating", Path::new("/proc/self/exe")))?;
        for pod in &self.pods {
            let serve: Vec<(u16, Protocol)> = pod
                .workload
                .ports
                .iter()
                .map(|p| {
                    let proto = if p.protocol == "UDP" {
                        Protocol::Udp
                    } else {
                        Protocol::Tcp
                    };
                    (p.container_port, proto)
                })
                .collect();
            let netns = plumbing::netns_path(&self.names.pod_netns(pod));
            let cgroup = self.names.pod_cgroup(pod);
            let placement = Placement {
                netns: &netns,
                cgroup: Some(&cgroup),
            };
            let client = PodClient::spawn(&exe, placement, &serve)
                .await
                .map_err(|source| LabError::Pod {
                    pod: pod.key.clone(),
                    source,
                })?;
            self.clients.push(client);
        }
        for node in &mut self.nodes {
            let node_netns = plumbing::netns_path(&self.names.node_netns_of(node.number));
            let client = PodClient::spawn(
                &exe,
                Placement {
                    netns: &node_netns,
                    cgroup: None,
                },
                &[],
            )
            .await
            .map_err(|source| LabError::Pod {
                pod: format!("node{}", node.number),
                source,
            })?;
            node.client = Some(client);
        }
        // Every pod has a process now: wait for a pass that attached the
        // frame program to each, so a lab is fully enforced once started.
        for node in &self.nodes {
            let applied = self.applied_predicate(node);
            self.wait_node_status(node, |s| applied(s) && s.waiting_for_process.is_empty())
                .await?;
        }
        Ok(())
    }

    /// Starts every node's agent on its own pins, cgroup subtree, workloads
    /// file and identities; the policies are the lab's, shared.
    fn attach_agent(&mut self) -> Result<(), LabError> {
        for i in 0..self.nodes.len() {
            let agent = self.start_node_agent(&self.nodes[i])?;
            self.nodes[i].agent = Some(agent);
        }
        Ok(())
    }

    fn start_node_agent(&self, node: &LabNode) -> Result<AgentHandle, LabError> {
        let source = match &self.kubernetes {
            None => app::SourceOptions::Files {
                policies_dir: self.policies_dir.clone(),
                workloads: node.workloads.clone(),
            },
            Some(k) => {
                let mut options = KubeOptions::new(k.client.clone(), &k.node_name);
                let mount = self.names.cgroup_root.parent().unwrap_or(Path::new("/"));
                options.kubelet_cgroup_root = self
                    .names
                    .cgroup_root
                    .strip_prefix(mount)
                    .unwrap_or(Path::new(""))
                    .to_path_buf();
                options.probe_interval = Duration::from_millis(200);
                if !k.report_status {
                    options.reporter = None;
                }
                options.deny_unprogrammed = k.deny_unprogrammed;
                options.own_pod_uid = k.own_pod_uid.clone();
                app::SourceOptions::Kubernetes(Box::new(options))
            }
        };
        app::start(AgentOptions {
            source,
            cgroup_mount: None,
            pin_dir: node.pin_dir.clone(),
            cgroup_root: Some(node.cgroup_root.clone()),
            names_file: Some(node.names_file.clone()),
            // One admin endpoint: node 1's.
            admin_addr: self.admin_addr.filter(|_| node.number == 1),
            admin_secure: None,
            state_dir: Some(node.agent_state_dir.clone()),
            guard_frames: self.guard_frames,
            map_capacities: Default::default(),
            identity: self.identity(node)?,
        })
        .map_err(|source| LabError::Agent { source })
    }

    /// Stops the agents and detaches the programs: no enforcement at all
    /// (the benchmark's baseline).
    pub fn detach_agent(&mut self) -> Result<(), LabError> {
        for node in &mut self.nodes {
            node.stop_agent();
            bpf::loader::uninstall(&node.pin_dir).map_err(|source| LabError::Pins { source })?;
        }
        Ok(())
    }

    /// Starts fresh agents (after [`Lab::detach_agent`]) and waits until
    /// they have applied the current policies (node 1's status returned).
    pub async fn reattach_agent(&mut self) -> Result<Status, LabError> {
        self.attach_agent()?;
        self.wait_applied().await
    }

    /// Network namespace name of a pod, for tools run inside it.
    pub fn pod_netns(&self, key: &str) -> Result<String, LabError> {
        let i = self.pod_index(key)?;
        Ok(self.names.pod_netns(&self.pods[i]))
    }

    /// cgroup directory of a pod: a process must join it (as well as the
    /// pod's network namespace) to be that pod to the kernel programs.
    pub fn pod_cgroup(&self, key: &str) -> Result<PathBuf, LabError> {
        let i = self.pod_index(key)?;
        Ok(self.names.pod_cgroup(&self.pods[i]))
    }

    /// Network namespace name of the (first) node (the bridge and the pods'
    /// host-side veths), for tools that watch what leaves a pod.
    pub fn node_netns(&self) -> String {
        self.names.node_netns()
    }

    /// How many nodes the lab simulates.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Network namespace name of node `node` (from 1).
    pub fn node_netns_of(&self, node: usize) -> Result<String, LabError> {
        self.lab_node(node)?;
        Ok(self.names.node_netns_of(node))
    }

    /// The node (from 1) pod `key` runs on.
    pub fn pod_node(&self, key: &str) -> Result<usize, LabError> {
        Ok(self.pods[self.pod_index(key)?].node)
    }

    /// The two ends of the node-to-node link (node 1's first), for
    /// captures of what crosses between nodes; `None` with one node.
    pub fn node_link(&self) -> Option<[LinkEnd; 2]> {
        (self.nodes.len() == 2).then(|| {
            [1, 2].map(|node| LinkEnd {
                node,
                netns: self.names.node_netns_of(node),
                interface: plumbing::link_interface(node),
            })
        })
    }

    /// A node's addresses (its bridge's), as its workloads file names them.
    pub fn node_net(&self, node: usize) -> Result<NodeNet, LabError> {
        self.lab_node(node)?;
        Ok(NodeNet::of(node, self.nodes.len()))
    }

    fn lab_node(&self, node: usize) -> Result<&LabNode, LabError> {
        node.checked_sub(1)
            .and_then(|i| self.nodes.get(i))
            .ok_or(LabError::UnknownNode { node })
    }

    /// The IPv4 address of pod `key`.
    pub fn pod_ipv4(&self, key: &str) -> Result<std::net::Ipv4Addr, LabError> {
        Ok(self.pods[self.pod_index(key)?].ipv4)
    }

    /// Name of a pod's veth on the node side, in its node's namespace
    /// ([`Lab::node_netns`] with one node, see [`Lab::pod_node`]).
    pub fn pod_host_veth(&self, key: &str) -> Result<String, LabError> {
        let i = self.pod_index(key)?;
        Ok(plumbing::host_veth(&self.pods[i]))
    }

    /// Opens TCP connections from `from` to `to:port` as fast as possible.
    pub async fn load(
        &self,
        from: &str,
        to: &str,
        port: u16,
        duration: Duration,
        concurrency: u32,
    ) -> Result<LoadResult, LabError> {
        let (f, t) = (self.pod_index(from)?, self.pod_index(to)?);
        self.clients[f]
            .load(self.address(t, Family::Ipv4), port, duration, concurrency)
            .await
            .map_err(|source| LabError::Pod {
                pod: from.into(),
                source,
            })
    }

    /// The process id of a pod's process, while it runs.
    pub fn pod_pid(&self, key: &str) -> Result<u32, LabError> {
        let i = self.pod_index(key)?;
        self.clients[i].pid().ok_or_else(|| LabError::Pod {
            pod: key.into(),
            source: PodError::Gone,
        })
    }

    /// Pins a pod's process to `cpus` (benchmarks: keep a flood off the
    /// measured pods' CPU).
    pub fn pin_pod(&self, key: &str, cpus: &[usize]) -> Result<(), LabError> {
        let pid = self.pod_pid(key)?;
        affinity::pin_process(pid, cpus).map_err(|source| LabError::Affinity {
            pod: key.into(),
            source,
        })
    }

    pub fn pods(&self) -> &[PlannedPod] {
        &self.pods
    }

    /// Where the running (node 1's) agent's admin endpoint listens, if it
    /// has one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.nodes[0]
            .agent
            .as_ref()
            .and_then(AgentHandle::admin_addr)
    }

    pub fn policies_dir(&self) -> &Path {
        &self.policies_dir
    }

    /// Node 1's pins.
    pub fn pin_dir(&self) -> &Path {
        &self.nodes[0].pin_dir
    }

    /// Standalone labs give their pods identities from a throwaway CA in
    /// the lab's directory (made once, kept across agent restarts), and
    /// publish them where `portcullis identity --lab NAME` reads. Labs on
    /// an API server leave identity to the test that drives them.
    /// Every node's agent signs with the same lab CA, for its own pods only,
    /// so the nodes trust each other's identities.
    fn identity(
        &self,
        node: &LabNode,
    ) -> Result<Option<crate::identity::manager::IdentityOptions>, LabError> {
        use crate::identity::{authority, manager::IdentityOptions};
        if self.kubernetes.is_some() {
            return Ok(None);
        }
        let dir = self.ca_dir();
        if authority::CaDir::at(&dir).authority().is_err() {
            let _ = std::fs::remove_dir_all(&dir);
            authority::CaDir::init(&dir, "lab").map_err(|source| LabError::Ca { source })?;
        }
        let mut options = IdentityOptions::ca_dir(dir, self.leaf_lifetime);
        options.identities_file = Some(node.identities_file.clone());
        options.connections_file = Some(node.connections_file.clone());
        Ok(Some(options))
    }

    /// The lab's throwaway CA (`portcullis ca status --dir` reads it).
    pub fn ca_dir(&self) -> PathBuf {
        self.state_dir.join("ca")
    }

    /// Where (node 1's) agent keeps the last valid version of each object;
    /// it outlives the agent (restarts), not the lab.
    pub fn agent_state_dir(&self) -> PathBuf {
        self.nodes[0].agent_state_dir.clone()
    }

    /// The cgroup node 1's agent attaches to (its pods are below it); the
    /// lab's own cgroup with one node.
    pub fn cgroup_root(&self) -> &Path {
        &self.nodes[0].cgroup_root
    }

    /// Where node 1's agent publishes endpoint and rule names.
    pub fn names_file(&self) -> PathBuf {
        self.nodes[0].names_file.clone()
    }

    /// `portcullis agent` arguments that run node 1's agent as a process
    /// of its own on this lab's files, pins and cgroups (stop the
    /// in-process one first).
    pub fn agent_args(&self) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec!["agent".into()];
        for (flag, value) in [
            ("--policies", self.policies_dir().to_path_buf()),
            ("--workloads", self.workloads_file().to_path_buf()),
            ("--pin-dir", self.pin_dir().to_path_buf()),
            ("--cgroup-root", self.cgroup_root().to_path_buf()),
            ("--names-file", self.names_file()),
        ] {
            args.push(flag.into());
            args.push(value.into());
        }
        args
    }

    /// Node 1's workloads file (every pod; only node 1's with a cgroup).
    pub fn workloads_file(&self) -> &Path {
        &self.nodes[0].workloads
    }

    /// Node `node`'s workloads file: its own pods with their cgroups, the
    /// other node's as remote workloads.
    pub fn node_workloads_file(&self, node: usize) -> Result<&Path, LabError> {
        Ok(&self.lab_node(node)?.workloads)
    }

    /// Replaces the services in the lab's workloads file (cluster IPs should
    /// be addresses no interface has, e.g. 198.18.200.0/24, so only the
    /// agent's translation makes them reachable). Wait with
    /// [`Lab::wait_applied`].
    pub fn set_services(&mut self, services: Vec<Service>) -> Result<(), LabError> {
        self.services = services;
        for node in &self.nodes {
            let yaml = workloads_yaml(
                &self.topology,
                &self.pods,
                &self.names,
                node.number,
                &self.services,
            );
            // Write aside and rename, so the agent never reads half a file.
            let tmp = node.workloads.with_file_name(".workloads.yaml.tmp");
            fs::write(&tmp, yaml).map_err(io("writing", &tmp))?;
            fs::rename(&tmp, &node.workloads).map_err(io("writing", &node.workloads))?;
        }
        Ok(())
    }

    /// Puts every namespace of the lab in the mesh with `mode` (DISABLED
    /// takes them out) and rewrites the workloads file; wait with
    /// [`Lab::wait_applied`] (the mTLS bench switches the mesh per round).
    pub fn set_mesh_mode(&mut self, mode: crate::mesh::mode::MeshMode) -> Result<(), LabError> {
        self.topology.mesh_all(mode);
        self.set_services(self.services.clone())
    }

    /// Replaces the lab's policies with the policy files of `dir`.
    pub fn use_policies_from(&self, dir: &Path) -> Result<(), LabError> {
        self.clear_policies()?;
        let entries = fs::read_dir(dir).map_err(io("reading policies from", dir))?;
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && is_policy_file(p))
            .collect();
        files.sort();
        for f in files {
            let to = self.policies_dir.join(f.file_name().unwrap_or_default());
            fs::copy(&f, &to).map_err(io("copying", &f))?;
        }
        Ok(())
    }

    /// Writes (or replaces) one policy file in the lab's policy directory.
    pub fn write_policy(&self, file_name: &str, yaml: &str) -> Result<(), LabError> {
        let path = self.policies_dir.join(file_name);
        // Write aside and rename, so the agent never reads half a file.
        let tmp = self.state_dir.join(format!(".{file_name}.tmp"));
        fs::write(&tmp, yaml).map_err(io("writing", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("writing", &path))
    }

    pub fn remove_policy(&self, file_name: &str) -> Result<(), LabError> {
        let path = self.policies_dir.join(file_name);
        fs::remove_file(&path).map_err(io("removing", &path))
    }

    pub fn clear_policies(&self) -> Result<(), LabError> {
        let entries =
            fs::read_dir(&self.policies_dir).map_err(io("listing", &self.policies_dir))?;
        for p in entries.flatten().map(|e| e.path()) {
            fs::remove_file(&p).map_err(io("removing", &p))?;
        }
        Ok(())
    }

    /// Waits until the agent (every node's) has processed the current
    /// policy files and returns its status (node 1's; check `problems` for
    /// invalid files, see [`Lab::node_agent_status`] for the others).
    /// In Kubernetes mode: waits for a pass that reached the kernel with
    /// the source current.
    pub async fn wait_applied(&self) -> Result<Status, LabError> {
        let mut first = None;
        for node in &self.nodes {
            let status = self
                .wait_node_status(node, self.applied_predicate(node))
                .await?;
            first.get_or_insert(status);
        }
        for node in &self.nodes {
            self.wait_meshed(node).await?;
        }
        Ok(first.expect("a lab has a node"))
    }

    /// Waits until every meshed pod's listeners run and its certificate is
    /// here, so a probe right after meets a working mesh.
    async fn wait_meshed(&self, node: &LabNode) -> Result<(), LabError> {
        let Some(mut state) = node.agent.as_ref().and_then(|a| a.mesh.clone()) else {
            return Ok(());
        };
        let ready = tokio::time::timeout(MESH_READY_WITHIN, state.wait_for(|s| s.is_ready()))
            .await
            .is_ok_and(|r| r.is_ok());
        if ready {
            return Ok(());
        }
        let waiting = state.borrow().waiting.join("; ");
        Err(LabError::MeshNotReady { waiting })
    }

    /// Whether a status is of a pass that applied the current state.
    fn applied_predicate(&self, node: &LabNode) -> impl Fn(&Status) -> bool {
        let want = Revision::Files(fingerprint(&self.policies_dir, &node.workloads));
        let kubernetes = self.kubernetes.is_some();
        move |s| {
            if kubernetes {
                s.applied > 0 && s.degraded.is_none() && s.pass_error.is_none()
            } else {
                s.revision == want
            }
        }
    }

    /// The running (node 1's) agent's metrics, as /metrics would serve them.
    pub fn agent_metrics(&self) -> Option<std::sync::Arc<crate::metrics::Metrics>> {
        self.node_agent_metrics(1)
    }

    /// Node `node`'s agent's metrics, while it runs.
    pub fn node_agent_metrics(
        &self,
        node: usize,
    ) -> Option<std::sync::Arc<crate::metrics::Metrics>> {
        let agent = self.lab_node(node).ok()?.agent.as_ref()?;
        Some(agent.metrics.clone())
    }

    /// The certificates the running (node 1's) agent holds for its pods.
    pub fn agent_certificates(
        &self,
    ) -> Option<tokio::sync::watch::Receiver<crate::identity::manager::Certificates>> {
        self.node_agent_certificates(1)
    }

    /// The certificates node `node`'s agent holds for its own pods.
    pub fn node_agent_certificates(
        &self,
        node: usize,
    ) -> Option<tokio::sync::watch::Receiver<crate::identity::manager::Certificates>> {
        let agent = self.lab_node(node).ok()?.agent.as_ref()?;
        agent.identity.as_ref().map(|i| i.certificates.clone())
    }

    /// The running (node 1's) agent's status, as it changes.
    pub fn agent_status(&self) -> Option<tokio::sync::watch::Receiver<Status>> {
        self.node_agent_status(1)
    }

    /// Node `node`'s agent's status, as it changes.
    pub fn node_agent_status(&self, node: usize) -> Option<tokio::sync::watch::Receiver<Status>> {
        let agent = self.lab_node(node).ok()?.agent.as_ref()?;
        Some(agent.status.clone())
    }

    /// Waits (up to the apply timeout) for the (node 1's) agent's status to
    /// satisfy `ready`.
    pub async fn wait_status(&self, ready: impl Fn(&Status) -> bool) -> Result<Status, LabError> {
        self.wait_node_status(&self.nodes[0], ready).await
    }

    async fn wait_node_status(
        &self,
        node: &LabNode,
        ready: impl Fn(&Status) -> bool,
    ) -> Result<Status, LabError> {
        let agent = node.agent.as_ref().ok_or(LabError::NoAgent)?;
        let mut rx = agent.status.clone();
        let status = tokio::time::timeout(APPLY_TIMEOUT, async {
            rx.wait_for(|s| ready(s)).await.map(|s| s.clone())
        })
        .await;
        match status {
            Ok(Ok(status)) => Ok(status),
            _ => Err(LabError::ApplyTimeout {
                seconds: APPLY_TIMEOUT.as_secs(),
            }),
        }
    }

    fn pod_index(&self, key: &str) -> Result<usize, LabError> {
        self.pods
            .iter()
            .position(|p| p.key == key)
            .ok_or_else(|| LabError::UnknownPod { pod: key.into() })
    }

    fn address(&self, index: usize, family: Family) -> IpAddr {
        let p = &self.pods[index];
        match family {
            Family::Ipv4 => p.ipv4.into(),
            Family::Ipv6 => p.ipv6.into(),
        }
    }

    /// One probe from pod `from` to pod `to` (both `namespace/name`).
    pub async fn probe(
        &self,
        from: &str,
        to: &str,
        spec: ProbeSpec,
        family: Family,
    ) -> Result<ProbeOutcome, LabError> {
        let (f, t) = (self.pod_index(from)?, self.pod_index(to)?);
        self.clients[f]
            .probe(
                self.address(t, family),
                spec.port,
                spec.protocol,
                self.probe_timeout,
            )
            .await
            .map_err(|source| LabError::Pod {
                pod: from.into(),
                source,
            })
    }

    /// One probe from pod `from` to any address (a service's cluster IP).
    pub async fn probe_address(
        &self,
        from: &str,
        addr: IpAddr,
        spec: ProbeSpec,
    ) -> Result<ProbeOutcome, LabError> {
        let f = self.pod_index(from)?;
        self.clients[f]
            .probe(addr, spec.port, spec.protocol, self.probe_timeout)
            .await
            .map_err(|source| LabError::Pod {
                pod: from.into(),
                source,
            })
    }

    /// Opens a TCP connection from `from` to `to` and keeps it open.
    pub async fn hold(
        &self,
        from: &str,
        to: &str,
        port: u16,
        family: Family,
    ) -> Result<(HeldConnection, ProbeOutcome), LabError> {
        let t = self.pod_index(to)?;
        self.hold_address(from, self.address(t, family), port).await
    }

    /// Opens a TCP connection from `from` to any address and keeps it open.
    pub async fn hold_address(
        &self,
        from: &str,
        addr: IpAddr,
        port: u16,
    ) -> Result<(HeldConnection, ProbeOutcome), LabError> {
        let f = self.pod_index(from)?;
        let (id, outcome) = self.clients[f]
            .hold(addr, port, self.probe_timeout)
            .await
            .map_err(|source| LabError::Pod {
                pod: from.into(),
                source,
            })?;
        Ok((HeldConnection { pod: f, id }, outcome))
    }

    /// Sends data on a held connection and waits for the echo.
    pub async fn ping(&self, held: &HeldConnection) -> Result<ProbeOutcome, LabError> {
        self.clients[held.pod]
            .ping(held.id, self.probe_timeout)
            .await
            .map_err(|source| LabError::Pod {
                pod: self.pods[held.pod].key.clone(),
                source,
            })
    }

    /// Stops the agent without removing its pinned state, then starts a new
    /// one, as an upgrade or a crash-restart would.
    pub async fn restart_agent(&mut self) -> Result<Status, LabError> {
        self.stop_agent();
        self.reattach_agent().await
    }

    /// Stops the agents, leaving programs and maps pinned in the kernel.
    pub fn stop_agent(&mut self) {
        for node in &mut self.nodes {
            node.stop_agent();
        }
    }

    /// A probe from the node itself (like a kubelet health check): the
    /// node `to` runs on.
    pub async fn probe_from_node(
        &self,
        to: &str,
        spec: ProbeSpec,
        family: Family,
    ) -> Result<ProbeOutcome, LabError> {
        let t = self.pod_index(to)?;
        let node = self
            .lab_node(self.pods[t].node)?
            .client
            .as_ref()
            .ok_or(LabError::UnknownPod { pod: "node".into() })?;
        node.probe(
            self.address(t, family),
            spec.port,
            spec.protocol,
            self.probe_timeout,
        )
        .await
        .map_err(|source| LabError::Pod {
            pod: "node".into(),
            source,
        })
    }

    /// Probes every ordered pair of pods (self included) on each spec, all
    /// at once: a full matrix takes about one probe timeout.
    pub async fn probe_matrix(
        &self,
        specs: &[ProbeSpec],
        family: Family,
    ) -> Result<Vec<Matrix>, LabError> {
        let mut jobs = Vec::new();
        for (si, spec) in specs.iter().enumerate() {
            for (f, from) in self.pods.iter().enumerate() {
                for (t, to) in self.pods.iter().enumerate() {
                    let client = &self.clients[f];
                    let addr = self.address(t, family);
                    let limit = self.probe_timeout;
                    let spec = *spec;
                    jobs.push(async move {
                        let outcome = client
                            .probe(addr, spec.port, spec.protocol, limit)
                            .await
                            .map_err(|source| LabError::Pod {
                                pod: from.key.clone(),
                                source,
                            })?;
                        Ok::<_, LabError>((si, from.key.clone(), to.key.clone(), outcome))
                    });
                }
            }
        }
        let results = futures::future::join_all(jobs).await;
        let mut matrices: Vec<Matrix> = specs
            .iter()
            .map(|s| Matrix {
                spec: *s,
                cells: Default::default(),
            })
            .collect();
        for r in results {
            let (si, from, to, outcome) = r?;
            matrices[si]
                .cells
                .entry(from)
                .or_default()
                .insert(to, outcome);
        }
        Ok(matrices)
    }

    /// Decision counters from (node 1's) kernel programs, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<CounterSample>, LabError> {
        self.node_counters(1)
    }

    /// Decision counters of node `node`'s programs, summed over CPUs.
    pub fn node_counters(&self, node: usize) -> Result<Vec<CounterSample>, LabError> {
        bpf::read_counters(&self.lab_node(node)?.pin_dir)
            .map(|(c, _)| c)
            .map_err(|source| LabError::Counters { source })
    }

    /// Stops everything and removes every trace of the lab.
    pub async fn shutdown(mut self) -> Result<(), LabError> {
        for c in self.clients.drain(..) {
            c.stop().await;
        }
        for node in &mut self.nodes {
            if let Some(n) = node.client.take() {
                n.stop().await;
            }
        }
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), LabError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        self.stop_agent();
        remove_leftovers(&self.names)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Pod processes die with their handles (kill_on_drop); the rest is
        // removed here so a failed test or a panic leaves nothing behind.
        self.clients.clear();
        for node in &mut self.nodes {
            node.client = None;
        }
        if let Err(e) = self.teardown() {
            eprintln!("portcullis lab: cleanup failed: {e}");
        }
    }
}

/// The `portcullis` binary (it also runs the lab's pod processes): the one
/// running now, unless that is a test harness, in which case the one built
/// beside it (or `PORTCULLIS_BIN`, which `cargo xtask test` sets).
pub fn portcullis_exe() -> std::io::Result<PathBuf> {
    Ok(helper_exe(&std::env::current_exe()?))
}

fn helper_exe(current: &Path) -> PathBuf {
    if let Ok(p) = std::env::var("PORTCULLIS_BIN") {
        return PathBuf::from(p);
    }
    let is_portcullis = current.file_name().is_some_and(|n| n == "portcullis");
    if is_portcullis {
        return current.to_path_buf();
    }
    // target/<profile>/deps/test-xxxx → target/<profile>/portcullis
    current
        .parent()
        .and_then(|deps| deps.parent())
        .map(|p| p.join("portcullis"))
        .unwrap_or_else(|| current.to_path_buf())
}

/// The standalone workloads file describing the lab's pods to node
/// `node`'s agent: its own pods with their cgroups, the others' (on the
/// other node) as remote workloads, with addresses and labels only.
fn workloads_yaml(
    t: &Topology,
    pods: &[PlannedPod],
    names: &LabNames,
    node: usize,
    services: &[Service],
) -> String {
    let namespaces: Vec<_> = t
        .namespaces
        .iter()
        .map(|n| json!({"name": n.name, "labels": n.labels}))
        .collect();
    let workloads: Vec<_> = pods
        .iter()
        .map(|p| {
            let mut w = json!({
                "name": p.workload.name,
                "namespace": p.workload.namespace,
                "labels": p.workload.labels,
                "ips": [p.ipv4.to_string(), p.ipv6.to_string()],
                "ports": p.workload.ports,
                "serviceAccount": p.workload.service_account(),
            });
            if p.node == node {
                w["cgroup"] = json!(names.pod_cgroup(p));
            }
            w
        })
        .collect();
    let net = NodeNet::of(node, names.nodes);
    let mut doc = json!({
        "nodeIPs": [net.ipv4.to_string(), net.ipv6.to_string()],
        "namespaces": namespaces,
        "workloads": workloads,
    });
    if !services.is_empty() {
        doc["services"] = serde_json::to_value(services).expect("services serialize");
    }
    serde_saphyr::to_string(&doc).expect("JSON values serialize to YAML")
}
