//! `portcullis ca`: the CA's directory commands and the CA service agents
//! ask for certificates.
//!
//! The pieces, each with one job:
//! - [`cli`]: the subcommands and their flags, and `ca status`'s output;
//! - [`keys`]: where the signing keys come from (a directory, or a Secret
//!   copied into a private in-memory directory and kept current);
//! - [`authorize`]: who is asking (TokenReview) and whether their node runs
//!   a pod of the identity they ask for (node authorization);
//! - [`serving`]: the CA's own TLS certificate, renewed and hot-swapped;
//! - [`publish`]: the trust bundle ConfigMap agents watch;
//! - [`metrics`]: issued and refused certificates;
//! - [`server`]: the HTTPS endpoint that ties them together.
//!
//! The signing itself, the directory layout, the wire format and the
//! revocation watch are [`crate::identity`]'s.

pub mod authorize;
pub mod cli;
pub mod keys;
pub mod metrics;
pub mod publish;
pub mod server;
pub mod serving;

pub use cli::{run, CaArgs};
