//! Durable last-valid state: the text of every source object that was last
//! valid *and applied*, kept on disk so a restarted agent (kill -9, node
//! reboot, pod rescheduled onto the same node) can fall back to it instead
//! of dropping what was enforced.
//!
//! Why this design:
//! - One file per object (a policy file, a Kubernetes object, the workloads
//!   file), so a change rewrites only what changed and one damaged file
//!   names exactly one object.
//! - Every write is atomic and durable: write a temporary file, fsync it,
//!   rename it over the old one, fsync the directory. A crash at any moment
//!   leaves either the old or the new version, never a mix; leftover
//!   temporary files are removed when the store is opened.
//! - Every file starts with a header carrying the payload's length and an
//!   FNV-1a checksum, so a truncated or damaged file is recognised. Such a
//!   file fails closed: [`StateStore::load_all`] returns an error naming it,
//!   and the caller refuses to start rather than silently forget a policy
//!   (the pinned kernel state keeps enforcing meanwhile).

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

/// First token of every state file; the number is the format version.
const MAGIC: &str = "portcullis-state 1";
/// Suffix of files being written; never read back.
const TMP_SUFFIX: &str = ".tmp";
/// Longest key kept, well below the 255-byte file name limit.
const MAX_KEY: usize = 240;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("creating the state directory {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading state file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state file {path} is corrupt ({reason}); refusing to guess what was enforced: \
         check it, then remove it to drop that object's last valid version"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("writing state file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("removing state file {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state key {key:?} cannot be a file name (empty, too long, or a path)")]
    Key { key: String },
}

/// A directory of durable key → bytes records.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Opens (creating, mode 0700) the store in `dir` and removes temporary
    /// files a crash left behind.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StateError::Create {
                path: dir.to_path_buf(),
                source,
            })?;
        let store = Self {
            dir: dir.to_path_buf(),
        };
        for entry in store.entries()? {
            if entry.to_string_lossy().ends_with(TMP_SUFFIX) {
                let path = dir.join(&entry);
                fs::remove_file(&path).map_err(|source| StateError::Remove { path, source })?;
            }
        }
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entries(&self) -> Result<Vec<std::ffi::OsString>, StateError> {
        let read = |source| StateError::Read {
            path: self.dir.clone(),
            source,
        };
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(read)? {
            out.push(entry.map_err(read)?.file_name());
        }
        out.sort();
        Ok(out)
    }

    /// Every record. Any file that cannot be read or fails its check is an
    /// error: the caller must not go on as if the object never existed.
    pub fn load_all(&self) -> Result<BTreeMap<String, Vec<u8>>, StateError> {
        let mut out = BTreeMap::new();
        for name in self.entries()? {
            let path = self.dir.join(&name);
            let Some(key) = name.to_str().filter(|k| !k.ends_with(TMP_SUFFIX)) else {
                return Err(StateError::Corrupt {
                    path,
                    reason: "a file name the store never writes".into(),
                });
            };
            let raw = fs::read(&path).map_err(|source| StateError::Read {
                path: path.clone(),
                source,
            })?;
            let payload = decode(&raw).map_err(|reason| StateError::Corrupt {
                path: path.clone(),
                reason,
            })?;
            out.insert(key.to_string(), payload);
        }
        Ok(out)
    }

    /// Replaces the record atomically and durably.
    pub fn put(&self, key: &str, payload: &[u8]) -> Result<(), StateError> {
        let path = self.path(key)?;
        let tmp = self.dir.join(format!("{key}{TMP_SUFFIX}"));
        let write = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(write)?;
        file.write_all(&encode(payload)).map_err(write)?;
        // Data on disk before the rename makes it visible.
        file.sync_all().map_err(write)?;
        drop(file);
        fs::rename(&tmp, &path).map_err(write)?;
        self.sync_dir().map_err(write)
    }

    /// Deletes the record (absent is fine) durably.
    pub fn remove(&self, key: &str) -> Result<(), StateError> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StateError::Remove { path, source }),
        }
        self.sync_dir()
            .map_err(|source| StateError::Remove { path, source })
    }

    fn path(&self, key: &str) -> Result<PathBuf, StateError> {
        let valid = !key.is_empty()
            && key.len() <= MAX_KEY
            && !key.contains('/')
            && !key.contains('\0')
            && !key.starts_with('.')
            && !key.ends_with(TMP_SUFFIX);
        if !valid {
            return Err(StateError::Key {
                key: key.chars().take(80).collect(),
            });
        }
        Ok(self.dir.join(key))
    }

    /// Makes renames and unlinks in the directory durable.
    fn sync_dir(&self) -> std::io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

/// A key made of parts that may hold any character: bytes outside
/// `[a-z0-9.-]` are written `%xx`, parts are joined with `_` (never kept
/// as is), so distinct part lists give distinct keys.
pub fn key_of(parts: &[&str]) -> String {
    let mut out = String::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push('_');
        }
        for b in part.bytes() {
            match b {
                b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' => out.push(b as char),
                _ => out.push_str(&format!("%{b:02x}")),
            }
        }
    }
    out
}

fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = format!("{MAGIC} {} {:016x}\n", payload.len(), fnv1a(payload)).into_bytes();
    out.extend_from_slice(payload);
    out
}

fn decode(raw: &[u8]) -> Result<Vec<u8>, String> {
    let newline = raw
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("no header line")?;
    let header = std::str::from_utf8(&raw[..newline]).map_err(|_| "header is not text")?;
    let rest = header
        .strip_prefix(MAGIC)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or_else(|| format!("header {:?} is not {MAGIC:?}", trim(header)))?;
    let (len, sum) = rest.split_once(' ').ok_or("header has no checksum")?;
    let len: usize = len.parse().map_err(|_| "header length is not a number")?;
    let sum = u64::from_str_radix(sum, 16).map_err(|_| "header checksum is not hex")?;
    let payload = &raw[newline + 1..];
    if payload.len() != len {
        return Err(format!(
            "{} bytes where the header promises {len}",
            payload.len()
        ));
    }
    if fnv1a(payload) != sum {
        return Err("checksum mismatch".into());
    }
    Ok(payload.to_vec())
}

fn trim(s: &str) -> String {
    s.chars().take(40).collect()
}

/// 64-bit FNV-1a: detects truncation and damage, not tampering (whoever can
/// write the state directory is root on the node anyway).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_removal_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        store.put("a.yaml", b"first").unwrap();
        store.put("a.yaml", b"second").unwrap();
        store.put("b.yaml", b"").unwrap();
        let reopened = StateStore::open(dir.path()).unwrap();
        let all = reopened.load_all().unwrap();
        assert_eq!(all["a.yaml"], b"second");
        assert_eq!(all["b.yaml"], b"");
        reopened.remove("a.yaml").unwrap();
        reopened.remove("never-written").unwrap();
        let all = StateStore::open(dir.path()).unwrap().load_all().unwrap();
        assert_eq!(all.keys().collect::<Vec<_>>(), ["b.yaml"]);
    }

    #[test]
    fn a_crash_mid_write_leaves_the_old_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        store.put("a.yaml", b"old").unwrap();
        // What a crash between writing the temporary file and the rename
        // leaves behind: a half-written temporary file.
        fs::write(dir.path().join("a.yaml.tmp"), b"portcullis-state 1 9 00").unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        assert_eq!(store.load_all().unwrap()["a.yaml"], b"old");
        assert!(!dir.path().join("a.yaml.tmp").exists(), "leftover removed");
        // No temporary file stays after a successful write.
        store.put("a.yaml", b"new").unwrap();
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.yaml"]);
    }

    #[test]
    fn a_damaged_file_fails_closed_and_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        store.put("good.yaml", b"kept").unwrap();
        store.put("bad.yaml", b"some policy text").unwrap();
        let path = dir.path().join("bad.yaml");
        let mut raw = fs::read(&path).unwrap();
        for (damage, expect) in [
            (raw.len() - 3, "bytes where the header promises"),
            (raw.len(), "checksum mismatch"),
        ] {
            let mut bytes = raw.clone();
            if damage < raw.len() {
                bytes.truncate(damage);
            } else {
                *bytes.last_mut().unwrap() ^= 1;
            }
            fs::write(&path, &bytes).unwrap();
            let e = store.load_all().unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, StateError::Corrupt { .. }), "{text}");
            assert!(text.contains("bad.yaml") && text.contains(expect), "{text}");
        }
        raw = b"policy text without a header".to_vec();
        fs::write(&path, &raw).unwrap();
        assert!(matches!(store.load_all(), Err(StateError::Corrupt { .. })));
    }

    #[test]
    fn an_unreadable_file_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        // A directory where a record should be: reading it fails.
        fs::create_dir(dir.path().join("odd.yaml")).unwrap();
        let e = store.load_all().unwrap_err();
        assert!(matches!(e, StateError::Read { .. }), "{e}");
        assert!(e.to_string().contains("odd.yaml"), "{e}");
    }

    #[test]
    fn keys_are_file_names_and_distinct() {
        assert_eq!(key_of(&["l4policy", "x", "web"]), "l4policy_x_web");
        assert_eq!(key_of(&["a/b", "C"]), "a%2fb_%43");
        assert_ne!(key_of(&["a_b", "c"]), key_of(&["a", "b_c"]));
        assert_eq!(
            key_of(&["ClusterL4Policy", "", "all"]).matches('_').count(),
            2
        );
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        for bad in ["", "../x", "a/b", ".hidden", "x.tmp"] {
            assert!(
                matches!(store.put(bad, b""), Err(StateError::Key { .. })),
                "{bad:?}"
            );
        }
    }
}
