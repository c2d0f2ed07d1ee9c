//! The agent's local identities as it publishes them for `portcullis
//! identity`: public facts only (no key, no certificate body), one JSON
//! file replaced atomically after every change.

use std::{
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::clock::utc;
use serde::{Deserialize, Serialize};

/// Where `portcullis agent` publishes its identities by default.
pub const DEFAULT_FILE: &str = "/run/portcullis/identities.json";
/// The file's name in a lab's state directory.
pub const LAB_FILE: &str = "identities.json";

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(
        "{path}: no identities published here; is an agent running with --ca-dir or \
         --ca-url (and this --identities-file)?"
    )]
    Missing { path: PathBuf },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an identities file")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Where a lab started with `portcullis lab --keep --name NAME` publishes.
pub fn lab_file(name: &str) -> PathBuf {
    crate::lab::state_dir_for(name).join(LAB_FILE)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityState {
    /// No certificate yet; the first request is under way.
    Pending,
    /// A current certificate, not due for renewal.
    Valid,
    /// A current certificate, its renewal under way.
    Renewing,
    /// The latest request failed; retried with backoff. A current
    /// certificate, if any, is kept until it expires.
    Failing,
    /// The certificate expired before a renewal succeeded; it was dropped.
    Expired,
}

impl IdentityState {
    pub const ALL: [IdentityState; 5] = [
        Self::Pending,
        Self::Valid,
        Self::Renewing,
        Self::Failing,
        Self::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Valid => "valid",
            Self::Renewing => "renewing",
            Self::Failing => "failing",
            Self::Expired => "expired",
        }
    }
}

/// The latest failure of an identity's requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastError {
    /// The failure metric's label (`unavailable`, `revoked`, ...).
    pub reason: String,
    pub message: String,
    /// Unix seconds.
    pub at: u64,
    /// Consecutive failures so far.
    pub failures: u32,
}

/// One local identity. Times are Unix seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalIdentity {
    pub spiffe_id: String,
    pub state: IdentityState,
    /// Of the current certificate, or of the expired one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// When the next request (renewal or retry) is due, if none is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalIdentities {
    /// Where certificates come from (`CA directory /x`, `CA https://...`).
    pub ca: String,
    pub identities: Vec<LocalIdentity>,
}

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl LocalIdentities {
    /// Writes aside and renames, so readers never see half a file.
    pub fn write(&self, path: &Path) -> Result<(), LocalError> {
        let io = |action, source| LocalError::Io {
            action,
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
        }
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        let json = serde_json::to_vec_pretty(self).expect("identities serialize");
        let mut file = std::fs::File::create(&tmp).map_err(|e| io("creating", e))?;
        file.write_all(&json)
            .and_then(|()| file.write_all(b"\n"))
            .map_err(|e| io("writing", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("renaming into place", e))
    }

    pub fn read(path: &Path) -> Result<Self, LocalError> {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LocalError::Missing { path: path.into() })
            }
            Err(source) => {
                return Err(LocalError::Io {
                    action: "reading",
                    path: path.into(),
                    source,
                })
            }
        };
        serde_json::from_slice(&text).map_err(|source| LocalError::Parse {
            path: path.into(),
            source,
        })
    }

    /// The human form, with times in UTC and relative to `now`.
    pub fn render(&self, now: SystemTime) -> String {
        let mut out = String::new();
        let now = unix(now);
        if self.identities.is_empty() {
            let _ = writeln!(out, "no local identities (no local pods) — {}", self.ca);
            return out;
        }
        let _ = writeln!(
            out,
            "{} local identities — {}",
            self.identities.len(),
            self.ca
        );
        for i in &self.identities {
            let _ = writeln!(out, "\n{}  {}", i.spiffe_id, i.state.as_str());
            if let Some(serial) = &i.serial {
                let _ = writeln!(out, "  serial      {serial}");
            }
            if let (Some(nb), Some(na)) = (i.not_before, i.not_after) {
                let expiry = if na > now {
                    format!("expires in {}", human(na - now))
                } else {
                    format!("expired {} ago", human(now - na))
                };
                let _ = writeln!(out, "  valid       {} → {} ({expiry})", utc(nb), utc(na));
            }
            if let Some(issuer) = &i.issuer {
                let _ = writeln!(out, "  issuer      {issuer}");
            }
            if let Some(at) = i.next_attempt {
                let what = match i.state {
                    IdentityState::Valid => "renewal",
                    _ => "next request",
                };
                let when = if at > now {
                    format!("in {}", human(at - now))
                } else {
                    "now".into()
                };
                let _ = writeln!(out, "  {what:<11} {} ({when})", utc(at));
            }
            if let Some(e) = &i.last_error {
                let _ = writeln!(
                    out,
                    "  last error  {} ({} failure{} in a row, {} ago): {}",
                    e.reason,
                    e.failures,
                    if e.failures == 1 { "" } else { "s" },
                    human(now.saturating_sub(e.at)),
                    e.message
                );
            }
        }
        out
    }
}

/// `45s`, `4m 12s`, `34m`, `2h 5m`, `3d 4h`.
pub fn human(seconds: u64) -> String {
    let d = Duration::from_secs(seconds).as_secs();
    let (days, hours, minutes, secs) = (d / 86_400, d / 3600 % 24, d / 60 % 60, d % 60);
    match d {
        0..60 => format!("{secs}s"),
        60..600 if secs > 0 => format!("{minutes}m {secs}s"),
        60..3600 => format!("{minutes}m"),
        3600..86_400 if minutes > 0 => format!("{hours}h {minutes}m"),
        3600..86_400 => format!("{hours}h"),
        _ if hours > 0 => format!("{days}d {hours}h"),
        _ => format!("{days}d"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LocalIdentities {
        LocalIdentities {
            ca: "CA directory /etc/portcullis/ca".into(),
            identities: vec![
                LocalIdentity {
                    spiffe_id: "spiffe://cluster.local/ns/shop/sa/web".into(),
                    state: IdentityState::Valid,
                    serial: Some("5f0a".into()),
                    not_before: Some(1_777_629_600),
                    not_after: Some(1_777_633_200),
                    issuer: Some("O=Portcullis, CN=Portcullis issuer r1".into()),
                    next_attempt: Some(1_777_631_400),
                    last_error: None,
                },
                LocalIdentity {
                    spiffe_id: "spiffe://cluster.local/ns/shop/sa/api".into(),
                    state: IdentityState::Failing,
                    serial: None,
                    not_before: None,
                    not_after: None,
                    issuer: None,
                    next_attempt: Some(1_777_631_270),
                    last_error: Some(LastError {
                        reason: "revoked".into(),
                        message:
                            "identity spiffe://cluster.local/ns/shop/sa/api is revoked: leaked"
                                .into(),
                        at: 1_777_630_690,
                        failures: 3,
                    }),
                },
            ],
        }
    }

    #[test]
    fn the_human_form_shows_utc_times_and_how_long_is_left() {
        // 2026-05-01 10:20:00 UTC: 40 minutes before expiry.
        let now = UNIX_EPOCH + Duration::from_secs(1_777_630_800);
        let text = sample().render(now);
        for needle in [
            "2 local identities — CA directory /etc/portcullis/ca",
            "spiffe://cluster.local/ns/shop/sa/web  valid",
            "serial      5f0a",
            "2026-05-01 10:00:00 UTC → 2026-05-01 11:00:00 UTC (expires in 40m)",
            "renewal     2026-05-01 10:30:00 UTC (in 10m)",
            "spiffe://cluster.local/ns/shop/sa/api  failing",
            "last error  revoked (3 failures in a row, 1m 50s ago): identity",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        let later = UNIX_EPOCH + Duration::from_secs(1_777_633_300);
        assert!(sample().render(later).contains("(expired 1m 40s ago)"));
    }

    #[test]
    fn human_durations() {
        for (s, text) in [
            (0, "0s"),
            (45, "45s"),
            (252, "4m 12s"),
            (2040, "34m"),
            (2045, "34m"),
            (3600, "1h"),
            (7500, "2h 5m"),
            (86_400 * 3 + 3600 * 4 + 5, "3d 4h"),
        ] {
            assert_eq!(human(s), text, "{s}");
        }
    }

    #[test]
    fn the_file_is_replaced_whole_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/identities.json");
        let e = LocalIdentities::read(&path).unwrap_err().to_string();
        assert!(e.contains("--ca-dir"), "{e}");
        sample().write(&path).unwrap();
        assert_eq!(LocalIdentities::read(&path).unwrap(), sample());
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["identities.json"], "no temporary file left");
        let json = std::fs::read_to_string(&path).unwrap();
        assert!(json.contains("\"spiffeId\""), "{json}");
        assert!(!json.contains("PRIVATE"), "{json}");
    }
}
