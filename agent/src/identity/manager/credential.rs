//! One identity's credential: a key made in memory for one request, and the
//! certificate the CA answered with, accepted only if it is what was asked
//! for.

use std::{sync::Arc, time::SystemTime};

use rcgen::{CertificateParams, KeyPair, PublicKeyData as _, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::{certificate::X509Certificate, prelude::FromDer as _};

use crate::identity::{
    authority::{chain_from_pem, new_key},
    bundle::TrustBundle,
    certificate::CertificateInfo,
    issuer::{Granted, IssueError},
    spiffe::SpiffeId,
};

/// A certificate and its key, as the mTLS data path presents them. The key
/// exists only in this process: it is never written or sent.
pub struct Credential {
    pub id: SpiffeId,
    pub info: CertificateInfo,
    /// Leaf first, then the issuer.
    pub chain: Vec<CertificateDer<'static>>,
    /// The roots the chain was verified against.
    pub bundle: TrustBundle,
    key: PrivatePkcs8KeyDer<'static>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("id", &self.id)
            .field("serial", &self.info.serial)
            .field("not_after", &self.info.not_after)
            .finish_non_exhaustive()
    }
}

impl Credential {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The chain and key as a rustls server or client presents them.
    pub fn certified_key(&self) -> Result<Arc<rustls::sign::CertifiedKey>, rustls::Error> {
        let provider = rustls::crypto::ring::default_provider();
        rustls::sign::CertifiedKey::from_der(self.chain.clone(), self.key(), &provider)
            .map(Arc::new)
    }
}

/// A fresh key and the certificate request it signs.
pub struct Request {
    pub key: KeyPair,
    pub csr_pem: String,
}

/// Makes a P-256 key and a PKCS#10 request naming `id` (the CA takes only
/// the public key from it; the SAN is for people reading requests).
pub fn request(id: &SpiffeId) -> Result<Request, IssueError> {
    let internal = |what: &str, source: rcgen::Error| IssueError::Internal {
        what: format!("{what} for {id}"),
        source: Box::new(source),
    };
    let key = new_key("a key").map_err(|e| IssueError::Internal {
        what: format!("making a key for {id}"),
        source: Box::new(e),
    })?;
    let mut params = CertificateParams::default();
    params.subject_alt_names =
        vec![SanType::URI(id.uri().try_into().map_err(|e| {
            internal("naming the identity in the request", e)
        })?)];
    let csr_pem = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| internal("making the certificate request", e))?;
    Ok(Request { key, csr_pem })
}

/// Accepts what the CA granted for `id` and `key` at `now`: the chain
/// verifies against the granted bundle, is valid now, names `id` (in
/// `trust_domain`), and certifies `key`.
pub fn accept(
    id: &SpiffeId,
    key: KeyPair,
    granted: Granted,
    now: SystemTime,
) -> Result<Credential, IssueError> {
    let invalid = |why: String| IssueError::InvalidResponse { why };
    let chain = chain_from_pem(&granted.chain_pem.concat())
        .map_err(|e| invalid(format!("the certificate chain is not PEM ({e})")))?;
    let info = granted
        .bundle
        .verify(&chain, id.trust_domain(), now)
        .map_err(|e| {
            invalid(format!(
                "the certificate for {id} does not verify: {}",
                crate::source::file::error_chain(&e)
            ))
        })?;
    if info.spiffe_id.as_ref() != Some(id) {
        return Err(invalid(format!(
            "asked for {id}, got a certificate for {}",
            info.spiffe_id
                .as_ref()
                .map_or("no identity".to_string(), |i| i.to_string())
        )));
    }
    let (_, leaf) = X509Certificate::from_der(&chain[0])
        .map_err(|e| invalid(format!("the leaf is unreadable ({e})")))?;
    if leaf.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
        return Err(invalid(format!(
            "the certificate for {id} (serial {}) certifies another key than the one requested",
            info.serial
        )));
    }
    Ok(Credential {
        id: id.clone(),
        info,
        chain,
        bundle: granted.bundle,
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::identity::authority::CaDir;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", sa).unwrap()
    }

    fn grant(ca: &CaDir, for_id: &SpiffeId, csr: &str) -> Granted {
        let authority = ca.authority().unwrap();
        let issued = authority
            .issue(for_id, csr, Duration::from_secs(60), SystemTime::now())
            .unwrap();
        Granted {
            chain_pem: issued.chain_pem,
            bundle: authority.bundle().clone(),
        }
    }

    #[test]
    fn the_certificate_asked_for_is_accepted_and_usable_by_rustls() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaDir::init(dir.path(), "r1").unwrap();
        let web = id("web");
        let r = request(&web).unwrap();
        let granted = grant(&ca, &web, &r.csr_pem);
        let c = accept(&web, r.key, granted, SystemTime::now()).unwrap();
        assert_eq!(c.info.spiffe_id, Some(web));
        assert_eq!(c.chain.len(), 2);
        c.certified_key().unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("key:"), "{debug}");
    }

    #[test]
    fn another_identity_another_key_or_another_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaDir::init(dir.path().join("a"), "r1").unwrap();
        let other = CaDir::init(dir.path().join("b"), "r2").unwrap();
        let web = id("web");

        let r = request(&web).unwrap();
        let granted = grant(&ca, &id("api"), &r.csr_pem);
        let e = accept(&web, r.key, granted, SystemTime::now()).unwrap_err();
        assert!(e.to_string().contains("got a certificate for"), "{e}");

        let r = request(&web).unwrap();
        let someone_else = request(&web).unwrap();
        let granted = grant(&ca, &web, &someone_else.csr_pem);
        let e = accept(&web, r.key, granted, SystemTime::now()).unwrap_err();
        assert!(e.to_string().contains("another key"), "{e}");

        let r = request(&web).unwrap();
        let mut granted = grant(&ca, &web, &r.csr_pem);
        granted.bundle = other.bundle().unwrap();
        let e = accept(&web, r.key, granted, SystemTime::now()).unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");
        assert_eq!(e.reason().as_str(), "invalid_response");

        // Expired by the time it is checked.
        let r = request(&web).unwrap();
        let granted = grant(&ca, &web, &r.csr_pem);
        let later = SystemTime::now() + Duration::from_secs(120);
        assert!(accept(&web, r.key, granted, later).is_err());
    }
}
