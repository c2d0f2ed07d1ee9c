//! What agents and the CA exchange: HTTPS (HTTP/1.1 over rustls), one
//! `POST` of JSON per certificate.
//!
//! Why not gRPC (Istio's `CreateCertificate`)? The request is one message
//! and one answer, never streamed; HTTPS with a PKCS#10 request keeps the
//! wire debuggable with `curl`, reuses the hyper and rustls the agent
//! already serves its admin endpoint with, and needs no protobuf compiler
//! in the build. The CSR is the standard proof that the caller holds the
//! key; the CA takes only its public key from it.
//!
//! - Request: `POST /v1/certificates`, `Authorization: Bearer <projected
//!   ServiceAccount token, audience portcullis-ca>`, an [`IssueRequest`].
//! - Granted: `200` with an [`IssueResponse`].
//! - Refused: `4xx`/`5xx` with a [`Refusal`], whose reason agents log and
//!   count.

use serde::{Deserialize, Serialize};

/// The one path the CA serves certificates on.
pub const ISSUE_PATH: &str = "/v1/certificates";
/// The audience agents' tokens must be minted for.
pub const DEFAULT_AUDIENCE: &str = "portcullis-ca";
/// Requests larger than this are refused unread.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssueRequest {
    /// Which identity: the CA makes the SPIFFE ID from these and its trust
    /// domain, so a caller cannot name another trust domain.
    pub namespace: String,
    pub service_account: String,
    /// PKCS#10 request in PEM, ECDSA P-256.
    pub csr: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssueResponse {
    /// PEM certificates, leaf first, then the issuer.
    pub certificate_chain: Vec<String>,
    /// PEM roots the CA trusts now (the bundle).
    pub trust_bundle: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Refusal {
    pub reason: RefusalReason,
    /// For people: what was wrong, naming the object.
    pub message: String,
}

/// Why a certificate was not issued. Bounded: it labels a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// No token, or the API server does not accept it for our audience
    /// (wrong audience, expired, or its pod is gone).
    Unauthenticated,
    /// The token is valid but not a Portcullis agent's.
    NotAnAgent,
    /// The token is not bound to a pod, so the caller's node is unknown.
    NotBoundToPod,
    /// No pod with this service account is scheduled on the caller's node.
    NoPodOnNode,
    /// The identity is revoked.
    Revoked,
    /// The CA does not know the current revocations: it fails closed.
    RevocationUnknown,
    /// The request is malformed (JSON, CSR, names).
    BadRequest,
    /// The CA could not decide (API server unreachable, signing failed).
    Unavailable,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 8] = [
        Self::Unauthenticated,
        Self::NotAnAgent,
        Self::NotBoundToPod,
        Self::NoPodOnNode,
        Self::Revoked,
        Self::RevocationUnknown,
        Self::BadRequest,
        Self::Unavailable,
    ];

    /// The metric label and JSON value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::NotAnAgent => "not_an_agent",
            Self::NotBoundToPod => "not_bound_to_pod",
            Self::NoPodOnNode => "no_pod_on_node",
            Self::Revoked => "revoked",
            Self::RevocationUnknown => "revocation_unknown",
            Self::BadRequest => "bad_request",
            Self::Unavailable => "unavailable",
        }
    }

    /// The HTTP status a refusal is sent with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::Unauthenticated => 401,
            Self::NotAnAgent | Self::NotBoundToPod | Self::NoPodOnNode | Self::Revoked => 403,
            Self::BadRequest => 400,
            Self::RevocationUnknown | Self::Unavailable => 503,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_reasons_are_the_labels_on_the_wire() {
        for reason in RefusalReason::ALL {
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(json, format!("\"{}\"", reason.as_str()));
            assert_eq!(
                serde_json::from_str::<RefusalReason>(&json).unwrap(),
                reason
            );
        }
    }
}
