//! Conformance: scenarios written from the specifications — upstream
//! NetworkPolicy v1 semantics and /tmp/spec/crd-spec.md for L4Policy and
//! ClusterL4Policy — each with the full 9×9 matrix it must produce, measured
//! through the real kernel and cross-checked against the policy evaluator.
//!
//! Lab: namespaces x, y, z (labels ns=<name>, kubernetes.io/metadata.name)
//! × pods a, b, c (label pod=<name>), each serving TCP/UDP 80 and 81 (named
//! serve-80-tcp, serve-81-tcp, serve-80-udp, serve-81-udp). IPv4 of pod i
//! (x/a, x/b, x/c, y/a, ..., z/c) is 198.18.1.(10+i), IPv6
//! fd00:7063:6c00::1:(i+1). A pod reaching itself is always allowed.
//!
//! Expectations are derived from the specifications, never from observed
//! output. One test per scenario: a failure names the scenario (the test)
//! and lists the differing cells.

use portcullis_tests::{start_lab, start_lab_with};

include!("scenarios/conformance.rs");
