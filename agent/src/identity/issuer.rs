//! Issuers: where the agent's identity manager gets a certificate for one
//! SPIFFE ID and one certificate request.
//!
//! - [`ca_dir::CaDirIssuer`]: standalone, signs in process from a CA
//!   directory (`--ca-dir`), read afresh at every issuance;
//! - [`remote::RemoteIssuer`]: asks `portcullis ca` over HTTPS (`--ca-url`),
//!   authenticated by a projected ServiceAccount token.
//!
//! Either answers the chain and the bundle it chains to, or an
//! [`IssueError`] whose [`FailureReason`] labels the failure metric.

pub mod ca_dir;
pub mod remote;

use std::{future::Future, path::PathBuf, time::Duration};

use super::{
    authority::AuthorityError, bundle::TrustBundle, spiffe::SpiffeId, wire::RefusalReason,
};

/// What an issuer grants: the chain to present, and the roots it chains to.
#[derive(Clone, Debug)]
pub struct Granted {
    /// PEM certificates, leaf first, then the issuer.
    pub chain_pem: Vec<String>,
    /// The bundle the issuer trusts now: the in-process CA's own roots, or
    /// the agent's configured bundle for a remote CA (never roots taken
    /// from the CA's answer).
    pub bundle: TrustBundle,
}

/// Where certificates come from.
pub trait Issuer: Send + Sync + 'static {
    /// Asks for a certificate for `id` with the public key of `csr_pem`.
    fn issue(
        &self,
        id: &SpiffeId,
        csr_pem: &str,
    ) -> impl Future<Output = Result<Granted, IssueError>> + Send;

    /// Names the CA in logs (`CA directory /x`, `CA https://...`).
    fn describe(&self) -> String;
}

/// Why an issuance failed. Bounded: it labels
/// `portcullis_identity_issuance_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailureReason {
    /// The CA answered with a refusal (or, in process, would have).
    Refused(RefusalReason),
    /// No connection, or it broke.
    Unreachable,
    /// No answer in time.
    Timeout,
    /// The CA's serving certificate does not verify against the bundle.
    UntrustedCa,
    /// No trust bundle yet to verify the CA with.
    NoTrustBundle,
    /// The token file is unreadable or empty.
    TokenUnreadable,
    /// The answer is not what the protocol says, or its certificate is not
    /// the one asked for (another identity, another key, a broken chain).
    InvalidResponse,
    /// The agent could not make a key or request.
    Internal,
}

impl FailureReason {
    /// Every label, so the metric's series exist from the start.
    pub fn all() -> Vec<FailureReason> {
        let mut all: Vec<_> = RefusalReason::ALL.into_iter().map(Self::Refused).collect();
        all.extend([
            Self::Unreachable,
            Self::Timeout,
            Self::UntrustedCa,
            Self::NoTrustBundle,
            Self::TokenUnreadable,
            Self::InvalidResponse,
            Self::Internal,
        ]);
        all
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused(r) => r.as_str(),
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
            Self::UntrustedCa => "untrusted_ca",
            Self::NoTrustBundle => "no_trust_bundle",
            Self::TokenUnreadable => "token_unreadable",
            Self::InvalidResponse => "invalid_response",
            Self::Internal => "internal",
        }
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("the CA refused ({}): {message}", reason.as_str())]
    Refused {
        reason: RefusalReason,
        message: String,
    },
    #[error("the CA directory {dir} cannot sign")]
    Authority {
        dir: PathBuf,
        #[source]
        source: Box<AuthorityError>,
    },
    #[error("the CA at {url} is unreachable")]
    Unreachable {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the CA at {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("the CA at {url} presented a certificate the trust bundle does not verify")]
    UntrustedCa {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no trust bundle to verify the CA at {url} with yet ({from})")]
    NoTrustBundle { url: String, from: String },
    #[error("reading the CA token file {path}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA token file {path} is empty")]
    EmptyToken { path: PathBuf },
    #[error("the CA's answer: {why}")]
    InvalidResponse { why: String },
    #[error("{what}")]
    Internal {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl IssueError {
    pub fn reason(&self) -> FailureReason {
        match self {
            Self::Refused { reason, .. } => FailureReason::Refused(*reason),
            // A request the in-process CA cannot read is ours; anything else
            // is the directory (missing, moved, unreadable key).
            Self::Authority { source, .. } => match **source {
                AuthorityError::Request(_) | AuthorityError::KeyAlgorithm => {
                    FailureReason::Refused(RefusalReason::BadRequest)
                }
                _ => FailureReason::Refused(RefusalReason::Unavailable),
            },
            Self::Unreachable { .. } => FailureReason::Unreachable,
            Self::Timeout { .. } => FailureReason::Timeout,
            Self::UntrustedCa { .. } => FailureReason::UntrustedCa,
            Self::NoTrustBundle { .. } => FailureReason::NoTrustBundle,
            Self::Token { .. } | Self::EmptyToken { .. } => FailureReason::TokenUnreadable,
            Self::InvalidResponse { .. } => FailureReason::InvalidResponse,
            Self::Internal { .. } => FailureReason::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn failure_labels_are_unique_and_include_every_refusal() {
        let labels: Vec<&str> = FailureReason::all().iter().map(|r| r.as_str()).collect();
        let unique: BTreeSet<&str> = labels.iter().copied().collect();
        assert_eq!(unique.len(), labels.len(), "{labels:?}");
        for r in RefusalReason::ALL {
            assert!(unique.contains(r.as_str()), "{}", r.as_str());
        }
        for l in &labels {
            assert!(
                l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{l}"
            );
        }
    }

    #[test]
    fn a_missing_ca_directory_is_unavailable_and_a_bad_request_is_ours() {
        let missing = IssueError::Authority {
            dir: "/x".into(),
            source: Box::new(AuthorityError::NotInitialized { dir: "/x".into() }),
        };
        assert_eq!(missing.reason().as_str(), "unavailable");
        let bad = IssueError::Authority {
            dir: "/x".into(),
            source: Box::new(AuthorityError::KeyAlgorithm),
        };
        assert_eq!(bad.reason().as_str(), "bad_request");
        let refused = IssueError::Refused {
            reason: RefusalReason::NoPodOnNode,
            message: "no pod".into(),
        };
        assert_eq!(refused.reason().as_str(), "no_pod_on_node");
        assert!(refused.to_string().contains("no_pod_on_node"), "{refused}");
    }
}
