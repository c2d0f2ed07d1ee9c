//! The certificate authority: its directory of roots and issuers, and the
//! signing of identity leaves.
//!
//! The directory is flat, so that it can be a Kubernetes Secret mounted as
//! files:
//! - `root-<name>.pem`: a root, published in the trust bundle;
//! - `root-<name>.key`: its key (only needed to make issuers; keep it
//!   offline, out of the Secret);
//! - `issuer-<name>.pem`, `issuer-<name>.key`: an intermediate signed by
//!   root `<name>`, which signs leaves;
//! - `active-issuer`: the name of the issuer in use.
//!
//! Rotation is three steps with the bundle always a superset of what any
//! live leaf chains to: [`CaDir::add_root`] (the new root joins the bundle),
//! [`CaDir::activate`] (new leaves chain to it), [`CaDir::retire_root`]
//! (once every old leaf has expired).

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::{pem::PemObject, CertificateDer};

use super::{
    bundle::{BundleError, TrustBundle},
    certificate::{CertificateError, CertificateInfo},
    spiffe::SpiffeId,
};

const ACTIVE_ISSUER: &str = "active-issuer";
/// Roots outlive many issuer rotations.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Issuers are rotated with their root, or on their own before this.
const ISSUER_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Leaves are backdated this much, for peers whose clocks run behind.
const CLOCK_SKEW: Duration = Duration::from_secs(5);

/// Leaf lifetimes an operator may configure (ztunnel and Linkerd use 24 h).
pub const MIN_LEAF_LIFETIME: Duration = Duration::from_secs(10 * 60);
pub const MAX_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "CA name {name:?}: use 1 to 40 lowercase letters, digits and '-' \
         (it becomes part of file names)"
    )]
    Name { name: String },
    #[error("{dir} already holds a CA (it has {ACTIVE_ISSUER}); refusing to overwrite it")]
    AlreadyInitialized { dir: PathBuf },
    #[error("{dir} already has a root named {name:?}")]
    RootExists { dir: PathBuf, name: String },
    #[error("{dir} has no root named {name:?} (see `portcullis ca status --dir {dir}`)")]
    NoRoot { dir: PathBuf, name: String },
    #[error("{dir} has no issuer named {name:?}, or its key is missing")]
    NoIssuer { dir: PathBuf, name: String },
    #[error(
        "{dir}: root {name:?} signs the active issuer; activate another issuer \
         before retiring it"
    )]
    RetiringActive { dir: PathBuf, name: String },
    #[error(
        "{dir} holds no CA: {ACTIVE_ISSUER} is missing (create one with `portcullis ca init`)"
    )]
    NotInitialized { dir: PathBuf },
    #[error("{path}: not a usable key")]
    Key {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("{what}")]
    Certificate {
        what: String,
        #[source]
        source: CertificateError,
    },
    #[error("{what}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("the trust bundle of {dir}")]
    Bundle {
        dir: PathBuf,
        #[source]
        source: BundleError,
    },
    #[error("the certificate request is invalid (it must be a PKCS#10 request in PEM, signed by its key)")]
    Request(#[source] rcgen::Error),
    #[error("the certificate request's key is not ECDSA P-256, the only kind Portcullis signs")]
    KeyAlgorithm,
    #[error("lifetime {lifetime:?} is outside {MIN_LEAF_LIFETIME:?}..={MAX_LEAF_LIFETIME:?}")]
    Lifetime { lifetime: Duration },
    #[error("the system clock is before 1970 or beyond what a certificate can hold")]
    Clock,
}

/// One root and what the directory holds for it.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RootStatus {
    pub name: String,
    pub certificate: CertificateInfo,
    /// Is the root key in the directory (needed only to make issuers)?
    pub has_key: bool,
    /// Is there an issuer for this root?
    pub has_issuer: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaStatus {
    pub dir: PathBuf,
    pub active_issuer: Option<String>,
    pub roots: Vec<RootStatus>,
}

/// A CA directory.
#[derive(Clone, Debug)]
pub struct CaDir {
    dir: PathBuf,
}

impl CaDir {
    /// A directory that already holds a CA, or is about to.
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory's first root and issuer, and activates it.
    pub fn init(dir: impl Into<PathBuf>, name: &str) -> Result<Self, AuthorityError> {
        let ca = Self::at(dir);
        if ca.file(ACTIVE_ISSUER).exists() {
            return Err(AuthorityError::AlreadyInitialized { dir: ca.dir });
        }
        fs::create_dir_all(&ca.dir).map_err(|source| AuthorityError::Io {
            action: "creating",
            path: ca.dir.clone(),
            source,
        })?;
        ca.add_root(name)?;
        ca.activate(name)?;
        Ok(ca)
    }

    /// Step 1 of a rotation: a new root (in the bundle from now on) and its
    /// issuer, not yet used.
    pub fn add_root(&self, name: &str) -> Result<(), AuthorityError> {
        check_name(name)?;
        if self.root_cert_path(name).exists() {
            return Err(AuthorityError::RootExists {
                dir: self.dir.clone(),
                name: name.into(),
            });
        }
        let now = SystemTime::now();
        let root_key = new_key("the root key")?;
        let mut root = ca_params(&format!("Portcullis root {name}"), now, ROOT_LIFETIME)?;
        root.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        let root_cert = root
            .self_signed(&root_key)
            .map_err(|source| AuthorityError::Generate {
                what: format!("signing root {name}"),
                source,
            })?;
        let issuer_key = new_key("the issuer key")?;
        let mut issuer = ca_params(&format!("Portcullis issuer {name}"), now, ISSUER_LIFETIME)?;
        issuer.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let issuer_cert = issuer
            .signed_by(&issuer_key, &Issuer::new(root, &root_key))
            .map_err(|source| AuthorityError::Generate {
                what: format!("signing issuer {name}"),
                source,
            })?;
        // Keys first, so a crash never leaves a certificate without its key.
        self.write(&format!("root-{name}.key"), &root_key.serialize_pem(), true)?;
        self.write(
            &format!("issuer-{name}.key"),
            &issuer_key.serialize_pem(),
            true,
        )?;
        self.write(&format!("issuer-{name}.pem"), &issuer_cert.pem(), false)?;
        self.write(&format!("root-{name}.pem"), &root_cert.pem(), false)
    }

    /// Step 2: new leaves are signed by issuer `name`.
    pub fn activate(&self, name: &str) -> Result<(), AuthorityError> {
        check_name(name)?;
        if !self.file(&format!("issuer-{name}.pem")).exists()
            || !self.file(&format!("issuer-{name}.key")).exists()
        {
            return Err(AuthorityError::NoIssuer {
                dir: self.dir.clone(),
                name: name.into(),
            });
        }
        if !self.root_cert_path(name).exists() {
            return Err(AuthorityError::NoRoot {
                dir: self.dir.clone(),
                name: name.into(),
            });
        }
        self.write(ACTIVE_ISSUER, &format!("{name}\n"), false)
    }

    /// Step 3: root `name` and its issuer leave the directory (and so the
    /// bundle). Refused while its issuer is active.
    pub fn retire_root(&self, name: &str) -> Result<(), AuthorityError> {
        check_name(name)?;
        if !self.root_cert_path(name).exists() {
            return Err(AuthorityError::NoRoot {
                dir: self.dir.clone(),
                name: name.into(),
            });
        }
        if self.active_issuer()?.as_deref() == Some(name) {
            return Err(AuthorityError::RetiringActive {
                dir: self.dir.clone(),
                name: name.into(),
            });
        }
        for file in [
            format!("root-{name}.pem"),
            format!("root-{name}.key"),
            format!("issuer-{name}.pem"),
            format!("issuer-{name}.key"),
        ] {
            let path = self.file(&file);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(AuthorityError::Io {
                        action: "removing",
                        path,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// The roots (the bundle) and which issuer is active.
    pub fn status(&self) -> Result<CaStatus, AuthorityError> {
        let mut roots = Vec::new();
        for name in self.root_names()? {
            let path = self.root_cert_path(&name);
            let pem = self.read(&path)?;
            let certificate = CertificateInfo::from_pem(&pem, &path.display().to_string())
                .map_err(|source| AuthorityError::Certificate {
                    what: format!("root {name}"),
                    source,
                })?;
            roots.push(RootStatus {
                has_key: self.file(&format!("root-{name}.key")).exists(),
                has_issuer: self.file(&format!("issuer-{name}.pem")).exists(),
                name,
                certificate,
            });
        }
        Ok(CaStatus {
            dir: self.dir.clone(),
            active_issuer: self.active_issuer()?,
            roots,
        })
    }

    /// Every root in the directory, in name order.
    pub fn bundle(&self) -> Result<TrustBundle, AuthorityError> {
        let mut pem = String::new();
        for name in self.root_names()? {
            pem.push_str(&self.read(&self.root_cert_path(&name))?);
        }
        TrustBundle::from_pem(&pem, &self.dir.display().to_string()).map_err(|source| {
            AuthorityError::Bundle {
                dir: self.dir.clone(),
                source,
            }
        })
    }

    /// The signer as the directory stands now (read afresh each call, so a
    /// rotation needs no restart).
    pub fn authority(&self) -> Result<Authority, AuthorityError> {
        let name = self
            .active_issuer()?
            .ok_or_else(|| AuthorityError::NotInitialized {
                dir: self.dir.clone(),
            })?;
        let cert_path = self.file(&format!("issuer-{name}.pem"));
        let key_path = self.file(&format!("issuer-{name}.key"));
        if !cert_path.exists() || !key_path.exists() {
            return Err(AuthorityError::NoIssuer {
                dir: self.dir.clone(),
                name,
            });
        }
        let cert_pem = self.read(&cert_path)?;
        let key =
            KeyPair::from_pem(&self.read(&key_path)?).map_err(|source| AuthorityError::Key {
                path: key_path.clone(),
                source,
            })?;
        let certificate = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
            AuthorityError::Certificate {
                what: format!("issuer {name}"),
                source: CertificateError::Content {
                    what: cert_path.display().to_string(),
                    why: e.to_string(),
                },
            }
        })?;
        Ok(Authority {
            issuer_name: name,
            issuer_cert: certificate.into_owned(),
            issuer_key: key,
            bundle: self.bundle()?,
        })
    }

    fn active_issuer(&self) -> Result<Option<String>, AuthorityError> {
        let path = self.file(ACTIVE_ISSUER);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(AuthorityError::Io {
                action: "reading",
                path,
                source,
            }),
        }
    }

    fn root_names(&self) -> Result<Vec<String>, AuthorityError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| AuthorityError::Io {
            action: "listing",
            path: self.dir.clone(),
            source,
        })?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let file = e.file_name().into_string().ok()?;
                let name = file.strip_prefix("root-")?.strip_suffix(".pem")?;
                Some(name.to_string())
            })
            .collect();
        names.sort();
        Ok(names)
    }

    fn root_cert_path(&self, name: &str) -> PathBuf {
        self.file(&format!("root-{name}.pem"))
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read(&self, path: &Path) -> Result<String, AuthorityError> {
        fs::read_to_string(path).map_err(|source| AuthorityError::Io {
            action: "reading",
            path: path.into(),
            source,
        })
    }

    /// Writes aside and renames; keys are created 0600.
    fn write(&self, name: &str, text: &str, secret: bool) -> Result<(), AuthorityError> {
        let path = self.file(name);
        let tmp = self.file(&format!(".{name}.tmp"));
        let io = |action, source| AuthorityError::Io {
            action,
            path: path.clone(),
            source,
        };
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(&tmp)
            .map_err(|e| io("creating", e))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| io("writing", e))?;
        fs::rename(&tmp, &path).map_err(|e| io("renaming into place", e))
    }
}

/// A leaf and the chain that goes with it.
#[derive(Clone, Debug)]
pub struct Issued {
    /// Leaf first, then the issuer: what a TLS peer presents.
    pub chain_pem: Vec<String>,
    pub info: CertificateInfo,
}

/// The active issuer, ready to sign.
pub struct Authority {
    issuer_name: String,
    issuer_cert: CertificateDer<'static>,
    issuer_key: KeyPair,
    bundle: TrustBundle,
}

impl Authority {
    pub fn issuer_name(&self) -> &str {
        &self.issuer_name
    }

    /// The active issuer's certificate (DER): what a change of issuer is
    /// noticed by, even when a re-made CA reuses a name.
    pub fn issuer_certificate(&self) -> &CertificateDer<'static> {
        &self.issuer_cert
    }

    /// The roots of the directory this authority was read from.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// Signs a leaf for `id` with the public key of `csr_pem`, whose
    /// signature proves its holder has the private key. Nothing else of the
    /// request is used: the identity, lifetime and usages are the CA's.
    /// Callers check the lifetime against their configured range; `issue`
    /// takes any, so tests can watch renewals in seconds.
    pub fn issue(
        &self,
        id: &SpiffeId,
        csr_pem: &str,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Issued, AuthorityError> {
        let request =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(AuthorityError::Request)?;
        if request.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(AuthorityError::KeyAlgorithm);
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.uri().try_into().map_err(|source| {
            AuthorityError::Generate {
                what: format!("putting {id} in a certificate"),
                source,
            }
        })?)];
        params.not_before = asn1_time(now.checked_sub(CLOCK_SKEW).ok_or(AuthorityError::Clock)?)?;
        params.not_after = asn1_time(now.checked_add(lifetime).ok_or(AuthorityError::Clock)?)?;
        params.serial_number = Some(random_serial()?);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        self.sign(
            params,
            &request.public_key,
            &format!("a certificate for {id}"),
        )
    }

    /// A serving certificate for the CA's own TLS endpoint, for these DNS
    /// names or IP addresses, with a key made here.
    pub fn serving_certificate(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<(Issued, KeyPair), AuthorityError> {
        let key = new_key("the CA's serving key")?;
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(|source| AuthorityError::Generate {
                what: format!("serving names {names:?}"),
                source,
            })?;
        let now = SystemTime::now();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "Portcullis CA");
        params.not_before = asn1_time(now.checked_sub(CLOCK_SKEW).ok_or(AuthorityError::Clock)?)?;
        params.not_after = asn1_time(now.checked_add(lifetime).ok_or(AuthorityError::Clock)?)?;
        params.serial_number = Some(random_serial()?);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let issued = self.sign(params, &key, "the CA's serving certificate")?;
        Ok((issued, key))
    }

    fn sign(
        &self,
        params: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        what: &str,
    ) -> Result<Issued, AuthorityError> {
        let issuer =
            Issuer::from_ca_cert_der(&self.issuer_cert, &self.issuer_key).map_err(|source| {
                AuthorityError::Generate {
                    what: format!("reading issuer {}", self.issuer_name),
                    source,
                }
            })?;
        let leaf =
            params
                .signed_by(public_key, &issuer)
                .map_err(|source| AuthorityError::Generate {
                    what: format!("signing {what}"),
                    source,
                })?;
        let info = CertificateInfo::from_der(leaf.der(), what).map_err(|source| {
            AuthorityError::Certificate {
                what: what.into(),
                source,
            }
        })?;
        Ok(Issued {
            chain_pem: vec![
                leaf.pem(),
                super::bundle::pem_certificate(&self.issuer_cert),
            ],
            info,
        })
    }
}

/// Checks a configured leaf lifetime against the allowed range.
pub fn check_lifetime(lifetime: Duration) -> Result<Duration, AuthorityError> {
    if (MIN_LEAF_LIFETIME..=MAX_LEAF_LIFETIME).contains(&lifetime) {
        Ok(lifetime)
    } else {
        Err(AuthorityError::Lifetime { lifetime })
    }
}

/// A fresh ECDSA P-256 key, in memory.
pub fn new_key(what: &str) -> Result<KeyPair, AuthorityError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| AuthorityError::Generate {
        what: format!("generating {what}"),
        source,
    })
}

fn ca_params(
    common_name: &str,
    now: SystemTime,
    lifetime: Duration,
) -> Result<CertificateParams, AuthorityError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Portcullis");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.not_before = asn1_time(now.checked_sub(CLOCK_SKEW).ok_or(AuthorityError::Clock)?)?;
    params.not_after = asn1_time(now.checked_add(lifetime).ok_or(AuthorityError::Clock)?)?;
    params.serial_number = Some(random_serial()?);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// 128 random bits, kept positive (RFC 5280 allows up to 20 octets).
fn random_serial() -> Result<SerialNumber, AuthorityError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AuthorityError::Generate {
            what: "drawing a serial number".into(),
            source: rcgen::Error::RingUnspecified,
        })?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn asn1_time(t: SystemTime) -> Result<time::OffsetDateTime, AuthorityError> {
    let seconds = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| AuthorityError::Clock)?
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(seconds as i64).map_err(|_| AuthorityError::Clock)
}

fn check_name(name: &str) -> Result<(), AuthorityError> {
    let ok = (1..=40).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(AuthorityError::Name { name: name.into() })
    }
}

/// Reads a PEM certificate chain file's blocks (leaf first).
pub fn chain_from_pem(
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, rustls_pki_types::pem::Error> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect()
}

#[cfg(test)]
mod tests;
