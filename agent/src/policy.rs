//! Policy: parse NetworkPolicy objects and workload inventories, compile them
//! to kernel map contents, and evaluate flows directly against the policies
//! (an oracle for the compiler and the basis of "why was this dropped?").
//!
//! - [`model`]: inventory, NetworkPolicy wire types, validated policies;
//! - [`parse`]: YAML → validated objects, with precise errors;
//! - [`selector`]: label selectors;
//! - [`compile`]: inventory + policies → endpoint, identity and policy map
//!   contents, with ids stable across compiles;
//! - [`evaluate`]: the verdict for one flow, straight from the policies.
//!
//! Pure code: no I/O beyond the strings it is given, no aya, tokio or kube.

pub mod compile;
pub mod describe;
pub mod evaluate;
pub mod model;
pub mod parse;
pub mod selector;

pub use model::{PolicyObject, PolicyRef};

#[cfg(test)]
mod agreement_tests;
#[cfg(test)]
mod test_support;
