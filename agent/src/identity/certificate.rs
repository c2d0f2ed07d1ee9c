//! What a certificate says, read back from its DER: the identity it
//! carries, its serial, its validity and its issuer. Used to report local
//! identities, to schedule renewals and to match revoked serials.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{pem::PemObject, CertificateDer};
use serde::Serialize;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use super::spiffe::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("{what}: not a PEM certificate")]
    Pem {
        what: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{what}: not an X.509 certificate ({why})")]
    Der { what: String, why: String },
    #[error("{what}: {why}")]
    Content { what: String, why: String },
}

/// The facts of one certificate that Portcullis acts on or shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateInfo {
    /// The SPIFFE ID of its one URI SAN, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<SpiffeId>,
    /// Lowercase hex, no separators, no leading zero bytes: the form
    /// revocations name serials in.
    pub serial: String,
    #[serde(with = "unix_seconds")]
    pub not_before: SystemTime,
    #[serde(with = "unix_seconds")]
    pub not_after: SystemTime,
    /// The issuer's distinguished name, as OpenSSL prints it.
    pub issuer: String,
    pub subject: String,
    pub is_ca: bool,
}

impl CertificateInfo {
    /// Reads a DER certificate; `what` names it in errors.
    pub fn from_der(der: &[u8], what: &str) -> Result<Self, CertificateError> {
        let (rest, cert) = X509Certificate::from_der(der).map_err(|e| CertificateError::Der {
            what: what.into(),
            why: e.to_string(),
        })?;
        if !rest.is_empty() {
            return Err(CertificateError::Der {
                what: what.into(),
                why: format!("{} bytes after the certificate", rest.len()),
            });
        }
        let content = |why: String| CertificateError::Content {
            what: what.into(),
            why,
        };
        let uris: Vec<&str> = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => {
                return Err(content(format!(
                    "unreadable subject alternative names: {e}"
                )))
            }
        };
        let spiffe_id = match uris.as_slice() {
            [] => None,
            [one] if one.starts_with("spiffe://") => Some(
                one.parse::<SpiffeId>()
                    .map_err(|e| content(format!("its SPIFFE ID: {e}")))?,
            ),
            [_] => None,
            many => {
                return Err(content(format!(
                    "{} URI SANs; an identity certificate carries exactly one",
                    many.len()
                )))
            }
        };
        let validity = cert.validity();
        Ok(Self {
            spiffe_id,
            serial: serial_hex(cert.raw_serial()),
            not_before: unix_time(validity.not_before.timestamp()),
            not_after: unix_time(validity.not_after.timestamp()),
            issuer: cert.issuer().to_string(),
            subject: cert.subject().to_string(),
            is_ca: cert.is_ca(),
        })
    }

    /// Reads the first certificate of a PEM text.
    pub fn from_pem(pem: &str, what: &str) -> Result<Self, CertificateError> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|source| {
            CertificateError::Pem {
                what: what.into(),
                source,
            }
        })?;
        Self::from_der(&der, what)
    }

    /// The whole validity period.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// Has it expired at `now`?
    pub fn expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

/// The canonical form of a serial: lowercase hex of its bytes without
/// leading zeros (DER adds one to keep a serial positive).
pub fn serial_hex(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let hex: String = bytes[start..].iter().map(|b| format!("{b:02x}")).collect();
    if hex.is_empty() {
        "0".into()
    } else {
        hex
    }
}

/// Brings a serial as people write it (`0A:1B`, `0x0a1b`, `0a1b`) to the
/// canonical form; `None` when it is not hex.
pub fn normalize_serial(text: &str) -> Option<String> {
    let text = text.trim();
    let text = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    let digits: String = text.chars().filter(|c| *c != ':').collect();
    if digits.is_empty() || digits.len() > 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let digits = digits.to_ascii_lowercase();
    let trimmed = digits.trim_start_matches('0');
    let mut canonical = if trimmed.is_empty() {
        "0".to_string()
    } else {
        trimmed.to_string()
    };
    // Whole bytes, as serial_hex prints them.
    if canonical.len() % 2 == 1 && canonical != "0" {
        canonical.insert(0, '0');
    }
    Some(canonical)
}

fn unix_time(seconds: i64) -> SystemTime {
    if seconds >= 0 {
        UNIX_EPOCH + Duration::from_secs(seconds as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs())
    }
}

/// Seconds since the epoch, as JSON numbers: what `--json` consumers and
/// Prometheus expect.
pub mod unix_seconds {
    use std::time::{SystemTime, UNIX_EPOCH};

    use serde::Serializer;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let seconds = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        };
        s.serialize_i64(seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_compare_in_one_form_however_they_are_written() {
        assert_eq!(serial_hex(&[0x00, 0x8a, 0x01]), "8a01");
        assert_eq!(serial_hex(&[0, 0]), "0");
        for written in ["8A:01", "0x8a01", "008a01", "8a01", " 8A01 "] {
            assert_eq!(
                normalize_serial(written).as_deref(),
                Some("8a01"),
                "{written}"
            );
        }
        assert_eq!(normalize_serial("a01").as_deref(), Some("0a01"));
        assert_eq!(normalize_serial("xyz"), None);
        assert_eq!(normalize_serial(""), None);
    }
}
