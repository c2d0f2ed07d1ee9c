//! The trust bundle: every root a peer's certificate may chain to. It holds
//! several roots so a root can be rotated without a failed handshake (add
//! the new root everywhere, switch issuing, then remove the old one), and
//! verification of an identity chain goes through rustls' WebPKI verifier.

use std::{sync::Arc, time::SystemTime};

use rustls::{
    crypto::ring,
    server::{danger::ClientCertVerifier, WebPkiClientVerifier},
    RootCertStore,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, UnixTime};

use super::{
    certificate::{CertificateError, CertificateInfo},
    spiffe::SpiffeId,
};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{what}: no certificate in the trust bundle")]
    Empty { what: String },
    #[error("{what}: a trust bundle entry is not PEM")]
    Pem {
        what: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{what}: root {index} is not a usable trust anchor")]
    Anchor {
        what: String,
        index: usize,
        #[source]
        source: rustls::Error,
    },
    #[error("{what}: root {index}")]
    Root {
        what: String,
        index: usize,
        #[source]
        source: CertificateError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no certificate was presented")]
    NoCertificate,
    #[error("the certificate chain does not verify against the trust bundle")]
    Chain(#[source] rustls::Error),
    #[error("the certificate is unreadable")]
    Certificate(#[source] CertificateError),
    #[error("the certificate carries no SPIFFE ID")]
    NoIdentity,
    #[error("the certificate is a CA certificate, not an identity")]
    IsCa,
    #[error("{id} is outside the trust domain {expected}")]
    ForeignTrustDomain { id: SpiffeId, expected: String },
    #[error("building the verifier from the trust bundle")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// A set of trusted roots, in the order they were published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// Checks every root is a certificate rustls accepts as an anchor.
    pub fn new(roots: Vec<CertificateDer<'static>>, what: &str) -> Result<Self, BundleError> {
        if roots.is_empty() {
            return Err(BundleError::Empty { what: what.into() });
        }
        for (index, root) in roots.iter().enumerate() {
            let mut store = RootCertStore::empty();
            store
                .add(root.clone())
                .map_err(|source| BundleError::Anchor {
                    what: what.into(),
                    index,
                    source,
                })?;
            CertificateInfo::from_der(root, &format!("{what}: root {index}")).map_err(
                |source| BundleError::Root {
                    what: what.into(),
                    index,
                    source,
                },
            )?;
        }
        Ok(Self { roots })
    }

    /// Reads every CERTIFICATE block of a PEM text.
    pub fn from_pem(pem: &str, what: &str) -> Result<Self, BundleError> {
        let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| BundleError::Pem {
                what: what.into(),
                source,
            })?;
        Self::new(roots, what)
    }

    /// One PEM text, roots in order: the ConfigMap and file form.
    pub fn to_pem(&self) -> String {
        self.pem_blocks().concat()
    }

    /// One PEM block per root: the wire form.
    pub fn pem_blocks(&self) -> Vec<String> {
        self.roots.iter().map(|der| pem_certificate(der)).collect()
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots as a rustls store, for TLS clients and servers.
    pub fn root_store(&self) -> RootCertStore {
        let mut store = RootCertStore::empty();
        for root in &self.roots {
            // Checked in `new`.
            let _ = store.add(root.clone());
        }
        store
    }

    /// The verifier a TLS server uses to require a client identity.
    pub fn client_verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, VerifyError> {
        WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.root_store()),
            Arc::new(ring::default_provider()),
        )
        .build()
        .map_err(VerifyError::Verifier)
    }

    /// Verifies an identity chain (leaf first, then intermediates) at `now`:
    /// it chains to one of the roots, is valid, is meant for mutual TLS, is
    /// not a CA, and carries one SPIFFE ID of `trust_domain`.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        trust_domain: &str,
        now: SystemTime,
    ) -> Result<CertificateInfo, VerifyError> {
        let (leaf, intermediates) = chain.split_first().ok_or(VerifyError::NoCertificate)?;
        let now = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        self.client_verifier()?
            .verify_client_cert(leaf, intermediates, now)
            .map_err(VerifyError::Chain)?;
        let info = CertificateInfo::from_der(leaf, "the peer's certificate")
            .map_err(VerifyError::Certificate)?;
        if info.is_ca {
            return Err(VerifyError::IsCa);
        }
        let id = info.spiffe_id.clone().ok_or(VerifyError::NoIdentity)?;
        if id.trust_domain() != trust_domain {
            return Err(VerifyError::ForeignTrustDomain {
                id,
                expected: trust_domain.into(),
            });
        }
        Ok(info)
    }
}

/// A DER certificate as one PEM block.
pub fn pem_certificate(der: &[u8]) -> String {
    pem_block("CERTIFICATE", der)
}

/// PEM armour (RFC 7468), by the `pem` crate rcgen uses too.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}
