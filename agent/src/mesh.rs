//! The mesh data path: how meshed pods' TCP connections travel between
//! nodes, mutually authenticated with the workload identities of
//! [`crate::identity`].
//!
//! - [`hbone`]: the transport, HTTP/2 CONNECT over mutual TLS 1.3 as Istio
//!   ambient defines it (port 15008), client pool and server.

pub mod hbone;
