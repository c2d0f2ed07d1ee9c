//! The CA's own TLS certificate: signed by the active issuer for the
//! Service's names, so agents verify the CA with the same trust bundle
//! they verify peers with. It is swapped in place (a rustls certificate
//! resolver), when it nears its end and whenever the active issuer
//! changes, without dropping the listener or open connections.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::identity::authority::{chain_from_pem, Authority, AuthorityError};

/// How long a serving certificate is valid; it is renewed at two thirds.
pub const SERVING_LIFETIME: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("signing the CA's serving certificate for {names:?}")]
    Sign {
        names: Vec<String>,
        #[source]
        source: Box<AuthorityError>,
    },
    #[error("reading back the CA's serving certificate")]
    Pem(#[source] rustls_pki_types::pem::Error),
    #[error("loading the CA's serving key into rustls")]
    Key(#[source] rustls::Error),
}

/// What is being served, and when to replace it.
struct Current {
    key: Arc<CertifiedKey>,
    /// The issuer that signed it (DER), to notice an activation.
    issuer: CertificateDer<'static>,
    renew_at: SystemTime,
}

/// The resolver the TLS acceptor asks for every handshake.
#[derive(Default)]
pub struct ServingCert {
    current: RwLock<Option<Current>>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServingCert")
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.as_ref().map(|c| c.key.clone())
    }
}

impl ServingCert {
    /// Does the certificate need replacing under `authority` at `now`?
    pub fn due(&self, authority: &Authority, now: SystemTime) -> bool {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        match current.as_ref() {
            None => true,
            Some(c) => now >= c.renew_at || &c.issuer != authority.issuer_certificate(),
        }
    }

    /// Signs a fresh certificate for `names` and serves it from the next
    /// handshake on.
    pub fn renew(&self, authority: &Authority, names: &[String]) -> Result<(), ServingError> {
        let (issued, key) = authority
            .serving_certificate(names, SERVING_LIFETIME)
            .map_err(|source| ServingError::Sign {
                names: names.to_vec(),
                source: Box::new(source),
            })?;
        let chain = chain_from_pem(&issued.chain_pem.concat()).map_err(ServingError::Pem)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        let signing = provider
            .key_provider
            .load_private_key(key_der)
            .map_err(ServingError::Key)?;
        let lifetime = issued
            .info
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let current = Current {
            key: Arc::new(CertifiedKey::new(chain, signing)),
            issuer: authority.issuer_certificate().clone(),
            renew_at: SystemTime::now() + lifetime * 2 / 3,
        };
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(current);
        Ok(())
    }

    /// The leaf being served, if any (for logs and tests).
    pub fn certificate(&self) -> Option<CertificateDer<'static>> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.as_ref().and_then(|c| c.key.cert.first().cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{authority::CaDir, certificate::CertificateInfo};

    #[test]
    fn renewal_follows_the_active_issuer() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaDir::init(dir.path(), "one").unwrap();
        let serving = ServingCert::default();
        let names = vec!["portcullis-ca.portcullis-system.svc".to_string()];
        let first = ca.authority().unwrap();
        assert!(serving.due(&first, SystemTime::now()));
        serving.renew(&first, &names).unwrap();
        assert!(!serving.due(&first, SystemTime::now()));
        assert!(serving.due(&first, SystemTime::now() + SERVING_LIFETIME));
        ca.add_root("two").unwrap();
        assert!(!serving.due(&ca.authority().unwrap(), SystemTime::now()));
        ca.activate("two").unwrap();
        let second = ca.authority().unwrap();
        assert!(serving.due(&second, SystemTime::now()));
        serving.renew(&second, &names).unwrap();
        let leaf = serving.certificate().unwrap();
        let info = CertificateInfo::from_der(&leaf, "serving").unwrap();
        assert!(info.issuer.contains("issuer two"), "{}", info.issuer);
    }
}
