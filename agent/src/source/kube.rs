//! Kubernetes mode. Today: the node-local facts the kube source needs, i.e.
//! where the kubelet put each local pod's cgroup. The watchers that turn
//! API objects into a [`super::Snapshot`] come later (issue 5).

pub mod cgroups;
