//! One simulated node of a lab: where its agent keeps pins, workloads,
//! names, identities and state, and its agent and node process while they
//! run. Node 1 keeps the paths a one-node lab always had; node 2's are
//! beside them, so one lab name still finds (and removes) everything.

use std::path::PathBuf;

use crate::app::AgentHandle;

use super::{pin_dir_for, pod::PodClient, state_dir_for};

/// A node of the lab (numbered from 1).
pub struct LabNode {
    pub number: usize,
    /// The cgroup this node's agent attaches to (its pods are below it).
    pub cgroup_root: PathBuf,
    /// Where this node's agent pins its programs and maps.
    pub pin_dir: PathBuf,
    /// This node's workloads file: its own pods with their cgroups, the
    /// other node's pods as remote workloads (addresses and labels only).
    pub workloads: PathBuf,
    /// Where this node's agent keeps the last valid version of each object.
    pub agent_state_dir: PathBuf,
    /// Where this node's agent publishes endpoint and rule names.
    pub names_file: PathBuf,
    /// Where this node's agent publishes its pods' identities.
    pub identities_file: PathBuf,
    /// Where this node's agent publishes its proxied connections.
    pub connections_file: PathBuf,
    pub agent: Option<AgentHandle>,
    /// A process in the node's namespace, outside every pod (the kubelet's
    /// place: its probes are node traffic).
    pub client: Option<PodClient>,
}

impl LabNode {
    pub fn new(lab: &str, number: usize, cgroup_root: PathBuf) -> Self {
        let state = state_dir_for(lab);
        let (pin_dir, dir) = match number {
            1 => (pin_dir_for(lab), state),
            n => (pin_dir_for_node(lab, n), state.join(format!("node{n}"))),
        };
        Self {
            number,
            cgroup_root,
            pin_dir,
            workloads: dir.join("workloads.yaml"),
            agent_state_dir: dir.join("agent-state"),
            names_file: dir.join(super::NAMES_FILE),
            identities_file: dir.join(crate::identity::local::LAB_FILE),
            connections_file: dir.join(crate::mesh::connections::LAB_FILE),
            agent: None,
            client: None,
        }
    }

    /// Stops the agent, leaving programs and maps pinned in the kernel.
    pub fn stop_agent(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.stop();
        }
    }
}

/// Node `n`'s (n ≥ 2) pins, beside node 1's [`pin_dir_for`] (bpffs
/// refuses names with a dot; `@` is in no lab name one would pick).
pub fn pin_dir_for_node(lab: &str, n: usize) -> PathBuf {
    PathBuf::from(format!("{}@node{n}", pin_dir_for(lab).display()))
}
