//! Revocations: identities and certificate serials that must no longer be
//! trusted. The CA refuses to issue to a revoked identity; the data path
//! refuses handshakes from, and closes connections of, a revoked identity
//! or serial.
//!
//! What the data path consults is a [`RevocationView`], and a view that is
//! not known (never read, unreadable, or stale) answers
//! [`RevocationStatus::Unknown`] for everyone: unknown fails closed.
//!
//! Standalone, revocations are a YAML file:
//! ```yaml
//! revocations:
//!   - spiffeId: spiffe://cluster.local/ns/shop/sa/web
//!     reason: key leaked in incident 42
//!   - serial: "5f:0a:..."
//! ```
//! In Kubernetes they are `PortcullisRevocation` objects with the same
//! fields in `spec`.

use std::{collections::BTreeMap, fmt, path::Path, sync::Arc};

use serde::{Deserialize, Serialize};

use super::{certificate::normalize_serial, spiffe::SpiffeId};

/// Revocation files larger than this are refused rather than parsed.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("{path}: reading the revocations file")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {size} bytes; revocation files are limited to {MAX_FILE_BYTES} bytes")]
    TooLarge { path: String, size: u64 },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{what}: revocations[{index}]: {message}")]
    Entry {
        what: String,
        index: usize,
        message: String,
    },
}

/// What is revoked: every certificate of an identity, or one certificate.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Revoked {
    Identity(SpiffeId),
    /// Canonical serial (see [`normalize_serial`]).
    Serial(String),
}

impl fmt::Display for Revoked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Identity(id) => write!(f, "identity {id}"),
            Self::Serial(s) => write!(f, "certificate serial {s}"),
        }
    }
}

/// One entry as users write it: exactly one of `spiffeId` and `serial`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RevocationEntry {
    /// Every certificate of this identity, e.g.
    /// `spiffe://cluster.local/ns/shop/sa/web`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^spiffe://"))]
    pub spiffe_id: Option<String>,
    /// One certificate, by serial in hex (`0a:1b:…`, `0x0a1b…` or `0a1b…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128), regex(pattern = r"^(0[xX])?[0-9a-fA-F:]+$"))]
    pub serial: Option<String>,
    /// Why, for people reading refusals and logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
}

impl RevocationEntry {
    /// What the entry revokes, or why it cannot be read.
    pub fn revoked(&self) -> Result<Revoked, String> {
        match (&self.spiffe_id, &self.serial) {
            (Some(id), None) => id
                .parse::<SpiffeId>()
                .map(Revoked::Identity)
                .map_err(|e| format!("spiffeId: {e}")),
            (None, Some(serial)) => normalize_serial(serial)
                .map(Revoked::Serial)
                .ok_or_else(|| format!("serial: {serial:?} is not a hexadecimal serial number")),
            (Some(_), Some(_)) => Err("set one of spiffeId and serial, not both".into()),
            (None, None) => Err("set one of spiffeId and serial".into()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevocationFile {
    #[serde(default)]
    revocations: Vec<RevocationEntry>,
}

/// The revoked identities and serials, each with its reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevocationSet {
    entries: BTreeMap<Revoked, String>,
}

impl RevocationSet {
    /// Builds a set from entries; `what` names their origin in errors. One
    /// bad entry rejects the whole set: a partly read list would un-revoke.
    pub fn from_entries(entries: &[RevocationEntry], what: &str) -> Result<Self, RevocationError> {
        let mut set = Self::default();
        for (index, entry) in entries.iter().enumerate() {
            let revoked = entry.revoked().map_err(|message| RevocationError::Entry {
                what: what.into(),
                index,
                message,
            })?;
            set.insert(revoked, entry.reason.clone().unwrap_or_default());
        }
        Ok(set)
    }

    pub fn insert(&mut self, revoked: Revoked, reason: String) {
        self.entries.insert(revoked, reason);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Revoked, &str)> {
        self.entries.iter().map(|(k, v)| (k, v.as_str()))
    }

    /// Is this identity, or this certificate of it, revoked?
    pub fn check(&self, id: &SpiffeId, serial: Option<&str>) -> RevocationStatus {
        if let Some(reason) = self.entries.get(&Revoked::Identity(id.clone())) {
            return RevocationStatus::Revoked {
                what: Revoked::Identity(id.clone()),
                reason: reason.clone(),
            };
        }
        if let Some(serial) = serial.and_then(normalize_serial) {
            let key = Revoked::Serial(serial);
            if let Some(reason) = self.entries.get(&key) {
                return RevocationStatus::Revoked {
                    what: key,
                    reason: reason.clone(),
                };
            }
        }
        RevocationStatus::Good
    }

    /// Parses a revocations file's text.
    pub fn parse(text: &str, what: &str) -> Result<Self, RevocationError> {
        let file: RevocationFile =
            serde_saphyr::from_str(text).map_err(|e| RevocationError::Parse {
                path: what.into(),
                message: e.to_string(),
            })?;
        Self::from_entries(&file.revocations, what)
    }

    /// Reads a revocations file. A missing file is an empty set: standalone
    /// installations without revocations need no file.
    pub fn read_file(path: &Path) -> Result<Self, RevocationError> {
        let what = path.display().to_string();
        let size = match std::fs::metadata(path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(RevocationError::Read { path: what, source }),
        };
        if size > MAX_FILE_BYTES {
            return Err(RevocationError::TooLarge { path: what, size });
        }
        let text = std::fs::read_to_string(path).map_err(|source| RevocationError::Read {
            path: what.clone(),
            source,
        })?;
        Self::parse(&text, &what)
    }
}

/// The answer for one identity and certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RevocationStatus {
    Good,
    Revoked {
        what: Revoked,
        reason: String,
    },
    /// The revocations are not known: treat as revoked.
    Unknown {
        why: String,
    },
}

impl RevocationStatus {
    /// May this identity be trusted (or issued to)?
    pub fn is_good(&self) -> bool {
        matches!(self, Self::Good)
    }
}

/// What the CA and the data path consult: a known set, or the reason it is
/// not known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RevocationView {
    Known(Arc<RevocationSet>),
    Unknown { why: String },
}

impl Default for RevocationView {
    fn default() -> Self {
        Self::Unknown {
            why: "the revocations have not been read yet".into(),
        }
    }
}

impl RevocationView {
    pub fn check(&self, id: &SpiffeId, serial: Option<&str>) -> RevocationStatus {
        match self {
            Self::Known(set) => set.check(id, serial),
            Self::Unknown { why } => RevocationStatus::Unknown { why: why.clone() },
        }
    }

    /// The view of a revocations file as it is now.
    pub fn of_file(path: &Path) -> Self {
        match RevocationSet::read_file(path) {
            Ok(set) => Self::Known(Arc::new(set)),
            Err(e) => Self::Unknown {
                why: crate::source::file::error_chain(&e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> SpiffeId {
        text.parse().unwrap()
    }

    #[test]
    fn a_revoked_identity_or_serial_is_refused_and_others_pass() {
        let set = RevocationSet::parse(
            "revocations:\n\
             - spiffeId: spiffe://cluster.local/ns/shop/sa/web\n\
             \x20 reason: leaked\n\
             - serial: \"0A:BC\"\n",
            "test",
        )
        .unwrap();
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        let api = id("spiffe://cluster.local/ns/shop/sa/api");
        assert!(matches!(
            set.check(&web, Some("01")),
            RevocationStatus::Revoked { reason, .. } if reason == "leaked"
        ));
        assert!(matches!(
            set.check(&api, Some("0abc")),
            RevocationStatus::Revoked { what: Revoked::Serial(s), .. } if s == "0abc"
        ));
        assert_eq!(set.check(&api, Some("0abd")), RevocationStatus::Good);
        assert_eq!(set.check(&api, None), RevocationStatus::Good);
    }

    #[test]
    fn an_unreadable_list_fails_closed_naming_the_entry() {
        let e = RevocationSet::parse(
            "revocations:\n- spiffeId: spiffe://cluster.local/ns/a/sa/b\n- serial: xyz\n",
            "revocations.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("revocations.yaml: revocations[1]: serial"),
            "{e}"
        );
        for bad in [
            "revocations:\n- reason: no target\n",
            "revocations:\n- spiffeId: spiffe://cluster.local/ns/a/sa/b\n  serial: \"01\"\n",
            "revocations:\n- spiffeId: spiffe://cluster.local/ns/a/sa/b\n  reasons: typo\n",
            "revoked: []\n",
        ] {
            assert!(RevocationSet::parse(bad, "f").is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revocations.yaml");
        std::fs::write(&path, "revocations: [ {").unwrap();
        let view = RevocationView::of_file(&path);
        let someone = id("spiffe://cluster.local/ns/a/sa/b");
        assert!(matches!(
            view.check(&someone, None),
            RevocationStatus::Unknown { why } if why.contains("revocations.yaml")
        ));
        assert!(!RevocationView::default().check(&someone, None).is_good());
    }

    #[test]
    fn a_missing_file_revokes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let view = RevocationView::of_file(&dir.path().join("absent.yaml"));
        let someone = id("spiffe://cluster.local/ns/a/sa/b");
        assert_eq!(view.check(&someone, None), RevocationStatus::Good);
    }
}
