//! The admin endpoint's TLS server configuration: a certificate and key from
//! PEM files, or a self-signed certificate made in memory at start.
//!
//! The self-signed default exists so the bearer token Prometheus sends never
//! crosses the pod network in clear, with nothing to provision; it protects
//! against eavesdroppers, not against an active interceptor, which is what a
//! certificate the scraper verifies (`--admin-tls-cert`) adds.

use std::{path::PathBuf, sync::Arc};

use rustls::ServerConfig;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the admin TLS certificate chain {path}")]
    Certificate {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path}: no CERTIFICATE block in the admin TLS certificate file")]
    NoCertificate { path: PathBuf },
    #[error("reading the admin TLS private key {path}")]
    Key {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("generating the admin endpoint's self-signed certificate")]
    Generate {
        #[source]
        source: rcgen::Error,
    },
    #[error("the admin TLS certificate and key do not form a usable server configuration")]
    Config {
        #[source]
        source: rustls::Error,
    },
}

/// Where the admin endpoint's certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertSource {
    /// PEM files: the chain (leaf first) and its private key.
    Files { cert: PathBuf, key: PathBuf },
    /// A fresh self-signed certificate for these names (DNS names or IP
    /// addresses), made at start and never written to disk.
    SelfSigned { names: Vec<String> },
}

/// The names a self-signed certificate carries by default: enough for a
/// client on the node (`localhost`, loopback) to verify it by pinning.
pub fn default_names() -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if let Ok(host) = std::env::var("HOSTNAME") {
        if !host.is_empty() {
            names.push(host);
        }
    }
    names
}

/// A server configuration and the leaf certificate it presents (logged by
/// fingerprint, and what a client can pin).
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    pub certificate: CertificateDer<'static>,
}

pub fn server_tls(source: &CertSource) -> Result<ServerTls, TlsError> {
    let (chain, key) = match source {
        CertSource::Files { cert, key } => load(cert, key)?,
        CertSource::SelfSigned { names } => self_signed(names)?,
    };
    let certificate = chain[0].clone();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|source| TlsError::Config { source })?;
    // Prometheus and curl speak HTTP/1.1; the server speaks nothing else.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ServerTls {
        config: Arc::new(config),
        certificate,
    })
}

type Pair = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn load(cert: &PathBuf, key: &PathBuf) -> Result<Pair, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Certificate {
            path: cert.clone(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: cert.clone() });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
        path: key.clone(),
        source,
    })?;
    Ok((chain, key))
}

fn self_signed(names: &[String]) -> Result<Pair, TlsError> {
    let generated = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|source| TlsError::Generate { source })?;
    let key = PrivatePkcs8KeyDer::from(generated.signing_key.serialize_der());
    Ok((vec![generated.cert.der().clone()], key.into()))
}

/// SHA-256 of a certificate, as `openssl x509 -fingerprint -sha256` prints it.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    ring::digest::digest(&ring::digest::SHA256, cert.as_ref())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_certificate_is_made_for_the_names_given() {
        let tls = server_tls(&CertSource::SelfSigned {
            names: vec!["localhost".into()],
        })
        .unwrap();
        assert!(!tls.certificate.as_ref().is_empty());
        assert_eq!(fingerprint(&tls.certificate).len(), 32 * 3 - 1);
        // Two starts, two keys: nothing is reused from disk.
        let again = server_tls(&CertSource::SelfSigned {
            names: vec!["localhost".into()],
        })
        .unwrap();
        assert_ne!(tls.certificate, again.certificate);
    }

    #[test]
    fn certificate_files_load_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["agent".to_string()]).unwrap();
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        let tls = server_tls(&CertSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        })
        .unwrap();
        assert_eq!(&tls.certificate, made.cert.der());

        let missing = dir.path().join("missing.key");
        let e = server_tls(&CertSource::Files {
            cert: cert.clone(),
            key: missing.clone(),
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains(&*missing.to_string_lossy()), "{e}");

        std::fs::write(&key, "not a key").unwrap();
        let e = server_tls(&CertSource::Files {
            cert: key.clone(),
            key: key.clone(),
        })
        .err()
        .unwrap();
        assert!(
            matches!(e, TlsError::NoCertificate { .. }) && e.to_string().contains("tls.key"),
            "{e}"
        );
    }
}
