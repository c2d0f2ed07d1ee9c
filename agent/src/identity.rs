//! Workload identity: SPIFFE IDs for service accounts, the Portcullis CA
//! that signs them, the trust bundle that verifies them, and the
//! revocations that withdraw them.
//!
//! The pieces, each with one job:
//! - [`spiffe`]: the identity itself, `spiffe://<trust domain>/ns/<ns>/sa/<sa>`;
//! - [`authority`]: the CA's directory (roots, issuers, which one signs) and
//!   the signing of leaves from certificate requests;
//! - [`certificate`]: what a certificate says (identity, serial, validity);
//! - [`bundle`]: the trust bundle (several roots, for rotation) and the
//!   verification of a leaf's chain against it;
//! - [`revocation`]: revoked identities and serials, and the fail-closed
//!   view the data path consults;
//! - [`wire`]: the request and answer agents and the CA exchange;
//! - [`kube_watch`]: revocations and the bundle, kept current from the API;
//! - [`issuer`]: where the agent gets certificates (in process or the CA);
//! - [`manager`]: the agent's certificates for its local service accounts,
//!   renewed before they expire;
//! - [`local`]: those identities as `portcullis identity` shows them.

pub mod authority;
pub mod bundle;
pub mod certificate;
pub mod issuer;
pub mod kube_watch;
pub mod local;
pub mod manager;
pub mod revocation;
pub mod spiffe;
#[cfg(test)]
mod test_support;
pub mod wire;
