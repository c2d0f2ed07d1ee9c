//! Transparent mutual TLS between pods, without sidecars. The kernel
//! redirects a meshed pod's outbound TCP to the agent's listener inside the
//! pod's own network namespace; the agent carries it over HBONE (HTTP/2
//! CONNECT in mutual TLS 1.3, both sides presenting SPIFFE certificates of
//! [`crate::identity`]) to the destination pod's inbound listener, which
//! authenticates, judges and hands the connection to the application from
//! the client's own address.
//!
//! - [`mode`]: which pods are meshed, and how strictly (labels);
//! - [`plan`]: the local pods to proxy for, and every meshed address;
//! - [`netns`]: working inside a pod's network namespace;
//! - [`original`]: where a redirected connection was going (kernel map);
//! - [`outbound`] and [`inbound`]: one pod's two listeners;
//! - [`hbone`]: the transport, as Istio ambient defines it (port 15008);
//! - [`runtime`]: the mesh's thread, following the plan.

pub mod authz;
pub mod connections;
pub mod counted;
pub mod handovers;
pub mod hbone;
pub mod inbound;
pub mod mode;
pub mod netns;
pub mod original;
pub mod outbound;
pub mod plan;
pub mod runtime;
