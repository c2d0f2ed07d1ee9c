//! What makes a peer trusted, on both sides of a handshake: its chain
//! verifies against the current trust bundle (webpki, for the right usage),
//! its leaf is not a CA and carries one SPIFFE ID of our trust domain, that
//! identity and serial are not revoked (unknown revocations refuse), and,
//! for a client that asked for one, it is the expected identity.
//!
//! rustls only lets a verifier answer with a `rustls::Error` (which becomes
//! the alert the peer sees), so each verifier is made for one handshake and
//! records its verdict, with the detail, for the side that runs it.

use std::{
    fmt,
    sync::{Arc, LazyLock, Mutex},
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{ring, CryptoProvider, WebPkiSupportedAlgorithms},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ParsedCertificate,
    },
    CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{PeerInfo, TrustInputs};
use crate::identity::{
    certificate::{CertificateError as ReadError, CertificateInfo},
    revocation::{RevocationStatus, Revoked},
    spiffe::SpiffeId,
};

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("no trust bundle yet")]
    NoTrustBundle,
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the certificate chain does not verify against the trust bundle")]
    Chain {
        #[source]
        source: rustls::Error,
    },
    #[error("the peer's certificate")]
    Unreadable {
        #[source]
        source: ReadError,
    },
    #[error("the peer's certificate is a CA certificate, not an identity")]
    IsCa,
    #[error("the peer's certificate carries no SPIFFE ID")]
    NoIdentity,
    // Identities are boxed: these errors travel by value in handshakes.
    #[error("{id} is outside the trust domain {expected}")]
    ForeignTrustDomain { id: Box<SpiffeId>, expected: String },
    #[error("{id} (serial {serial}) is revoked ({what}): {reason}")]
    Revoked {
        id: Box<SpiffeId>,
        serial: String,
        what: Box<Revoked>,
        reason: String,
    },
    #[error("the revocations are not known ({why}), so {id} is refused")]
    RevocationsUnknown { id: Box<SpiffeId>, why: String },
    #[error("expected {expected}, the peer is {actual}")]
    WrongPeer {
        expected: Box<SpiffeId>,
        actual: Box<SpiffeId>,
    },
}

impl PeerError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoTrustBundle => "no_trust_bundle",
            Self::Revoked { .. } => "peer_revoked",
            Self::RevocationsUnknown { .. } => "revocations_unknown",
            Self::WrongPeer { .. } => "wrong_peer",
            Self::NoCertificate
            | Self::Chain { .. }
            | Self::Unreadable { .. }
            | Self::IsCa
            | Self::NoIdentity
            | Self::ForeignTrustDomain { .. } => "peer_untrusted",
        }
    }

    /// What the peer is told (the TLS alert follows from it).
    fn to_rustls(&self) -> rustls::Error {
        let certificate = match self {
            Self::Chain { source } => return source.clone(),
            Self::NoCertificate => return rustls::Error::NoCertificatesPresented,
            Self::NoTrustBundle => CertificateError::UnknownIssuer,
            Self::Unreadable { .. } => CertificateError::BadEncoding,
            Self::Revoked { .. } => CertificateError::Revoked,
            Self::RevocationsUnknown { .. } => CertificateError::UnknownRevocationStatus,
            Self::IsCa
            | Self::NoIdentity
            | Self::ForeignTrustDomain { .. }
            | Self::WrongPeer { .. } => CertificateError::ApplicationVerificationFailure,
        };
        rustls::Error::InvalidCertificate(certificate)
    }
}

pub(super) fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The signature algorithms both verifiers accept: ring's, as the
/// provider's.
static SIGNATURES: LazyLock<WebPkiSupportedAlgorithms> =
    LazyLock::new(|| ring::default_provider().signature_verification_algorithms);

/// One handshake's identity checks and their verdict.
pub(super) struct PeerCheck {
    trust: TrustInputs,
    expected: Option<SpiffeId>,
    verdict: Mutex<Option<Result<PeerInfo, PeerError>>>,
}

impl fmt::Debug for PeerCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerCheck")
            .field("trust_domain", &self.trust.trust_domain)
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl PeerCheck {
    pub(super) fn new(trust: TrustInputs, expected: Option<SpiffeId>) -> Arc<Self> {
        Arc::new(Self {
            trust,
            expected,
            verdict: Mutex::new(None),
        })
    }

    /// The verdict once the handshake has run; `None` if the peer's
    /// certificate was never looked at.
    pub(super) fn verdict(&self) -> Option<Result<PeerInfo, PeerError>> {
        self.verdict
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Records the verdict and answers rustls.
    fn record(&self, verdict: Result<PeerInfo, PeerError>) -> Result<(), rustls::Error> {
        let answer = verdict.as_ref().map(|_| ()).map_err(PeerError::to_rustls);
        *self.verdict.lock().unwrap_or_else(|p| p.into_inner()) = Some(verdict);
        answer
    }

    /// Runs `chain` (the webpki check for this side) then the identity checks.
    fn run(
        &self,
        end_entity: &CertificateDer<'_>,
        chain: impl FnOnce(&crate::identity::bundle::TrustBundle) -> Result<(), rustls::Error>,
    ) -> Result<(), rustls::Error> {
        let verdict = (|| {
            let bundle = self.trust.bundle.borrow().clone();
            let bundle = bundle.ok_or(PeerError::NoTrustBundle)?;
            chain(&bundle).map_err(|source| PeerError::Chain { source })?;
            self.identity(end_entity)
        })();
        self.record(verdict)
    }

    fn identity(&self, end_entity: &CertificateDer<'_>) -> Result<PeerInfo, PeerError> {
        let info = CertificateInfo::from_der(end_entity, "the peer's certificate")
            .map_err(|source| PeerError::Unreadable { source })?;
        if info.is_ca {
            return Err(PeerError::IsCa);
        }
        let id = info.spiffe_id.ok_or(PeerError::NoIdentity)?;
        if id.trust_domain() != self.trust.trust_domain {
            return Err(PeerError::ForeignTrustDomain {
                id: Box::new(id),
                expected: self.trust.trust_domain.clone(),
            });
        }
        let status = self
            .trust
            .revocations
            .borrow()
            .check(&id, Some(&info.serial));
        match status {
            RevocationStatus::Good => {}
            RevocationStatus::Revoked { what, reason } => {
                return Err(PeerError::Revoked {
                    id: Box::new(id),
                    serial: info.serial,
                    what: Box::new(what),
                    reason,
                })
            }
            RevocationStatus::Unknown { why } => {
                return Err(PeerError::RevocationsUnknown {
                    id: Box::new(id),
                    why,
                })
            }
        }
        if let Some(expected) = &self.expected {
            if *expected != id {
                return Err(PeerError::WrongPeer {
                    expected: Box::new(expected.clone()),
                    actual: Box::new(id),
                });
            }
        }
        Ok(PeerInfo {
            id,
            serial: info.serial,
            not_after: info.not_after,
        })
    }
}

/// The client's verifier of the server: webpki chain and server usage
/// against the bundle, no hostname (our leaves name no host), then
/// [`PeerCheck`].
#[derive(Debug)]
pub(super) struct ServerVerifier {
    check: Arc<PeerCheck>,
}

impl ServerVerifier {
    pub(super) fn new(check: Arc<PeerCheck>) -> Arc<Self> {
        Arc::new(Self { check })
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check.run(end_entity, |bundle| {
            let leaf = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &leaf,
                &bundle.root_store(),
                intermediates,
                now,
                SIGNATURES.all,
            )
        })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &SIGNATURES)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &SIGNATURES)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SIGNATURES.supported_schemes()
    }
}

/// The server's verifier of the client: a client certificate is required;
/// the bundle's WebPKI client verifier checks chain and usage, then
/// [`PeerCheck`].
#[derive(Debug)]
pub(super) struct ClientVerifier {
    check: Arc<PeerCheck>,
}

impl ClientVerifier {
    pub(super) fn new(check: Arc<PeerCheck>) -> Arc<Self> {
        Arc::new(Self { check })
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a client has exactly one certificate to offer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check.run(end_entity, |bundle| {
            let verifier = bundle
                .client_verifier()
                .map_err(|e| rustls::Error::General(format!("the trust bundle's verifier: {e}")))?;
            verifier
                .verify_client_cert(end_entity, intermediates, now)
                .map(|_| ())
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &SIGNATURES)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &SIGNATURES)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SIGNATURES.supported_schemes()
    }
}
