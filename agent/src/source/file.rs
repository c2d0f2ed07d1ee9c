//! Standalone mode: policies from a directory of YAML files, workloads from
//! one inventory file. Changes are picked up by polling a cheap fingerprint
//! (names, sizes, modification times), which works on every filesystem and
//! inside containers where inotify on bind mounts is unreliable.

use std::{
    collections::BTreeMap,
    fs,
    io::Read,
    path::{Path, PathBuf},
    time::SystemTime,
};

use super::Snapshot;
use crate::policy::{
    model::Inventory,
    parse::{parse_inventory, parse_policies, ParseError, MAX_FILE_BYTES},
    PolicyObject,
};

#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("workloads file {path} is invalid and no earlier version was valid")]
    NoInventory {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What the files looked like; equal fingerprints mean nothing to reload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(Vec<(PathBuf, u64, Option<SystemTime>)>);

impl Fingerprint {
    /// When the newest change since `previous` was made: the latest
    /// modification time among files that are new or changed. `None` when
    /// only deletions happened (a deleted file leaves no time behind).
    pub fn newest_change_since(&self, previous: Option<&Fingerprint>) -> Option<SystemTime> {
        self.0
            .iter()
            .filter(|entry| previous.is_none_or(|p| !p.0.contains(entry)))
            .filter_map(|(_, _, modified)| *modified)
            .max()
    }
}

pub struct FileSource {
    policies_dir: PathBuf,
    workloads: PathBuf,
    /// Last valid content of each policy file.
    last_good: BTreeMap<PathBuf, Vec<PolicyObject>>,
    last_inventory: Option<Inventory>,
}

pub fn is_policy_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml") | Some("yml")
    )
}

fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, FileSourceError> {
    let read = fs::read_dir(dir).map_err(|source| FileSourceError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_policy_file(p))
        .collect();
    files.sort();
    Ok(files)
}

/// Fingerprint of a policy directory and a workloads file.
pub fn fingerprint(policies_dir: &Path, workloads: &Path) -> Fingerprint {
    let mut out = Vec::new();
    let files = policy_files(policies_dir).unwrap_or_default();
    for p in files.iter().map(|p| p.as_path()).chain([workloads]) {
        let meta = fs::metadata(p).ok();
        out.push((
            p.to_path_buf(),
            meta.as_ref().map_or(u64::MAX, |m| m.len()),
            meta.and_then(|m| m.modified().ok()),
        ));
    }
    Fingerprint(out)
}

impl super::Source for FileSource {
    fn revision(&self) -> Option<super::Revision> {
        Some(super::Revision::Files(self.fingerprint()))
    }

    fn changed_at(
        &self,
        now: &super::Revision,
        previous: Option<&super::Revision>,
    ) -> Option<SystemTime> {
        let super::Revision::Files(now) = now else {
            return None;
        };
        let previous = match previous {
            Some(super::Revision::Files(p)) => Some(p),
            _ => None,
        };
        now.newest_change_since(previous)
    }

    fn load(&mut self) -> Result<Snapshot, Box<dyn std::error::Error + Send + Sync>> {
        FileSource::load(self).map_err(Into::into)
    }
}

impl FileSource {
    pub fn new(policies_dir: PathBuf, workloads: PathBuf) -> Self {
        Self {
            policies_dir,
            workloads,
            last_good: BTreeMap::new(),
            last_inventory: None,
        }
    }

    pub fn fingerprint(&self) -> Fingerprint {
        fingerprint(&self.policies_dir, &self.workloads)
    }

    /// Reads everything. Invalid files are reported in the snapshot's
    /// problems and stand in with their last valid content.
    pub fn load(&mut self) -> Result<Snapshot, FileSourceError> {
        let mut problems = Vec::new();
        let inventory = self.load_inventory(&mut problems)?;
        let files = policy_files(&self.policies_dir)?;
        self.last_good.retain(|p, _| files.contains(p));
        for path in &files {
            let parsed = read_bounded(path)
                .map_err(|e| match e {
                    Bounded::Read(e) => format!("{}: {e}", path.display()),
                    Bounded::TooLarge(e) => error_chain(&e),
                })
                .and_then(|text| parse_policies(path, &text).map_err(|e| error_chain(&e)));
            match parsed {
                Ok(objects) => {
                    self.last_good.insert(path.clone(), objects);
                }
                Err(e) => {
                    let kept = if self.last_good.contains_key(path) {
                        "its last valid version stays enforced"
                    } else {
                        "none of its objects are applied"
                    };
                    problems.push(format!("{e} ({kept})"));
                }
            }
        }
        let policies = dedupe(&self.last_good, &mut problems);
        Ok(Snapshot {
            inventory,
            policies,
            problems,
            ..Default::default()
        })
    }

    fn load_inventory(&mut self, problems: &mut Vec<String>) -> Result<Inventory, FileSourceError> {
        let parsed = read_bounded(&self.workloads)
            .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> {
                match e {
                    Bounded::Read(e) => Box::new(e),
                    Bounded::TooLarge(e) => Box::new(e),
                }
            })
            .and_then(|text| parse_inventory(&self.workloads, &text).map_err(|e| Box::new(e) as _));
        match (parsed, &self.last_inventory) {
            (Ok(inv), _) => {
                self.last_inventory = Some(inv.clone());
                Ok(inv)
            }
            (Err(e), Some(last)) => {
                problems.push(format!(
                    "{} (the last valid workloads stay in force)",
                    error_chain(e.as_ref())
                ));
                Ok(last.clone())
            }
            (Err(source), None) => Err(FileSourceError::NoInventory {
                path: self.workloads.clone(),
                source,
            }),
        }
    }
}

enum Bounded {
    Read(std::io::Error),
    TooLarge(ParseError),
}

/// Reads a policy or workloads file, refusing one over the parser's size
/// limit without reading it whole.
fn read_bounded(path: &Path) -> Result<String, Bounded> {
    let file = fs::File::open(path).map_err(Bounded::Read)?;
    let size = file.metadata().map_err(Bounded::Read)?.len();
    let mut text = String::new();
    file.take(MAX_FILE_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(Bounded::Read)?;
    if text.len() > MAX_FILE_BYTES {
        return Err(Bounded::TooLarge(ParseError::TooLarge {
            path: path.to_path_buf(),
            size: usize::try_from(size).unwrap_or(usize::MAX).max(text.len()),
        }));
    }
    Ok(text)
}

/// One policy per namespace/name: a second definition is a problem, and the
/// first (in file order) wins.
fn dedupe(
    by_file: &BTreeMap<PathBuf, Vec<PolicyObject>>,
    problems: &mut Vec<String>,
) -> Vec<PolicyObject> {
    let mut seen: BTreeMap<_, PathBuf> = BTreeMap::new();
    let mut out = Vec::new();
    for (path, objects) in by_file {
        for o in objects {
            let id = o.policy_ref();
            if let Some(first) = seen.get(&id) {
                problems.push(format!(
                    "{}: {id} is already defined in {}; this copy is ignored",
                    path.display(),
                    first.display()
                ));
                continue;
            }
            seen.insert(id, path.clone());
            out.push(o.clone());
        }
    }
    out
}

/// An error and its causes on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn newest_change_is_the_latest_modified_new_or_changed_file() {
        let t = |s| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        let before = Fingerprint(vec![
            ("a.yaml".into(), 1, t(10)),
            ("b.yaml".into(), 1, t(20)),
        ]);
        let after = Fingerprint(vec![
            ("a.yaml".into(), 2, t(30)),
            ("b.yaml".into(), 1, t(20)),
            ("c.yaml".into(), 1, t(25)),
        ]);
        assert_eq!(after.newest_change_since(Some(&before)), t(30));
        assert_eq!(before.newest_change_since(Some(&before)), None);
        let deleted = Fingerprint(vec![("a.yaml".into(), 1, t(10))]);
        assert_eq!(deleted.newest_change_since(Some(&before)), None);
    }

    #[test]
    fn oversized_files_are_refused_with_their_size() {
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        fs::create_dir(&policies).unwrap();
        let workloads = dir.path().join("workloads.yaml");
        fs::write(&workloads, "workloads: [{name: a, namespace: x}]\n").unwrap();
        let big = policies.join("big.yaml");
        let name = "a".repeat(10 << 20);
        fs::write(
            &big,
            format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}}}\n"),
        )
        .unwrap();
        fs::write(
            policies.join("ok.yaml"),
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: ok, namespace: x}\n",
        )
        .unwrap();
        let mut source = FileSource::new(policies, workloads.clone());
        let snapshot = source.load().unwrap();
        assert_eq!(snapshot.policies.len(), 1, "the valid file still applies");
        let [problem] = snapshot.problems.as_slice() else {
            panic!("{:?}", snapshot.problems)
        };
        assert!(
            problem.contains("big.yaml: the file is 10485") && problem.contains("at most 4194304"),
            "{problem}"
        );
        assert!(problem.len() < 300, "{problem}");

        fs::write(&workloads, format!("# {}\n", "x".repeat(MAX_FILE_BYTES))).unwrap();
        let snapshot = source.load().unwrap();
        assert!(
            snapshot.problems[0].contains("the file is 4194307 bytes")
                && snapshot.problems[0].contains("last valid workloads stay in force"),
            "{:?}",
            snapshot.problems
        );
    }
}
