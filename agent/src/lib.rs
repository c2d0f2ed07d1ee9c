//! Portcullis agent: keeps the kernel's policy maps in sync with policy
//! objects, and the `lab` that builds throwaway pod topologies to test them.

pub mod admin;
pub mod app;
pub mod bench;
pub mod bpf;
pub mod ca;
pub mod cgroup;
pub mod clock;
pub mod crd;
pub mod explain;
pub mod flows;
pub mod fuzzing;
pub mod identity;
pub mod intern;
pub mod kube_plane;
pub mod kube_report;
pub mod lab;
pub mod memory;
pub mod mesh;
pub mod metrics;
pub mod policy;
pub mod reconcile;
pub mod source;
pub mod worker;
