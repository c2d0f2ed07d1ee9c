//! Standalone mode: policies from a directory of YAML files, workloads from
//! one inventory file. Changes are picked up by polling a cheap fingerprint
//! (names, sizes, modification times), which works on every filesystem and
//! inside containers where inotify on bind mounts is unreliable.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Read,
    path::{Path, PathBuf},
    time::SystemTime,
};

use super::{
    state::{StateError, StateStore},
    Snapshot,
};
use crate::policy::{
    model::CheckedInventory,
    parse::{parse_checked_inventory, parse_policies, ParseError, MAX_FILE_BYTES},
    PolicyObject, PolicyRef,
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
    #[error("opening the last-valid state in {dir}")]
    State {
        dir: PathBuf,
        #[source]
        source: StateError,
    },
    #[error(
        "state file {path} holds no valid version of {what}; refusing to guess what \
         was enforced: check it, then remove it to drop that last valid version"
    )]
    StateInvalid {
        path: PathBuf,
        what: String,
        #[source]
        source: Box<ParseError>,
    },
    #[error("state file {path} is not UTF-8 text; check it, then remove it")]
    StateNotText { path: PathBuf },
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

/// A file's text as last valid and applied, and what it parsed into.
#[derive(Clone, Debug)]
struct Version<T> {
    text: String,
    parsed: T,
}

/// Where the last valid and applied versions are kept on disk.
struct Durable {
    policies: StateStore,
    workloads: StateStore,
}

/// Key of the workloads file in its store.
const WORKLOADS_KEY: &str = "workloads.yaml";

/// What the latest load offered, kept until [`Source::settle`] says what
/// of it was applied.
#[derive(Default)]
struct Pending {
    /// Policy files that parsed, by file name.
    valid: BTreeMap<String, Version<Vec<PolicyObject>>>,
    /// Every policy file present, valid or not.
    present: BTreeSet<String>,
    inventory: Option<Version<CheckedInventory>>,
}

pub struct FileSource {
    policies_dir: PathBuf,
    workloads: PathBuf,
    /// Last valid and applied version of each policy file, by file name:
    /// what stands in for the file while it is invalid.
    committed: BTreeMap<String, Version<Vec<PolicyObject>>>,
    committed_inventory: Option<Version<CheckedInventory>>,
    durable: Option<Durable>,
    pending: Option<Pending>,
    /// Wakes the sync loop on file changes, once asked to.
    watch: Option<super::inotify::FileWatch>,
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

fn file_name(path: &Path) -> String {
    path.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
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
    fn wake_on_change(&mut self, wake: std::sync::Arc<super::wake::Wakeup>) {
        let mut dirs = vec![self.policies_dir.clone()];
        dirs.extend(self.policies_dir.parent().map(Path::to_path_buf));
        dirs.extend(self.workloads.parent().map(Path::to_path_buf));
        dirs.sort();
        dirs.dedup();
        match super::inotify::watch(&dirs, wake) {
            Ok(w) => self.watch = Some(w),
            // The loop's periodic re-check still sees changes, later.
            Err(e) => tracing::warn!("watching {dirs:?} for changes: {e}"),
        }
    }

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

    fn settle(&mut self, outcome: Option<&BTreeMap<PolicyRef, String>>) -> Vec<String> {
        FileSource::settle(self, outcome)
    }
}

impl FileSource {
    /// A source that remembers last valid versions in memory only: they
    /// are lost when the process ends (one-shot readers such as `explain`).
    pub fn new(policies_dir: PathBuf, workloads: PathBuf) -> Self {
        Self {
            policies_dir,
            workloads,
            committed: BTreeMap::new(),
            committed_inventory: None,
            durable: None,
            pending: None,
            watch: None,
        }
    }

    /// A source whose last valid versions survive restarts in `state_dir`
    /// (the agent). Fails if what is stored there cannot be read or is not
    /// valid: the caller must not start as if those objects never existed.
    pub fn durable(
        policies_dir: PathBuf,
        workloads: PathBuf,
        state_dir: &Path,
    ) -> Result<Self, FileSourceError> {
        let open = |dir: PathBuf| {
            StateStore::open(&dir).map_err(|source| FileSourceError::State { dir, source })
        };
        let durable = Durable {
            policies: open(state_dir.join("files").join("policies"))?,
            workloads: open(state_dir.join("files").join("workloads"))?,
        };
        let mut source = Self::new(policies_dir, workloads);
        let load = |store: &StateStore| {
            store.load_all().map_err(|source| FileSourceError::State {
                dir: store.dir().to_path_buf(),
                source,
            })
        };
        for (name, bytes) in load(&durable.policies)? {
            let stored = durable.policies.dir().join(&name);
            // Parsed as the file it stands for, so its objects compare equal
            // to the file's when the file is unchanged.
            let path = source.policies_dir.join(&name);
            let invalid = |source| FileSourceError::StateInvalid {
                path: stored.clone(),
                what: path.display().to_string(),
                source: Box::new(source),
            };
            let text = String::from_utf8(bytes).map_err(|_| FileSourceError::StateNotText {
                path: stored.clone(),
            })?;
            let parsed = parse_policies(&path, &text).map_err(invalid)?;
            source.committed.insert(name, Version { text, parsed });
        }
        if let Some(bytes) = load(&durable.workloads)?.remove(WORKLOADS_KEY) {
            let path = source.workloads.clone();
            let stored = durable.workloads.dir().join(WORKLOADS_KEY);
            let invalid = |source| FileSourceError::StateInvalid {
                path: stored.clone(),
                what: path.display().to_string(),
                source: Box::new(source),
            };
            let text = String::from_utf8(bytes).map_err(|_| FileSourceError::StateNotText {
                path: stored.clone(),
            })?;
            let parsed = parse_checked_inventory(&path, &text).map_err(invalid)?;
            source.committed_inventory = Some(Version { text, parsed });
        }
        source.durable = Some(durable);
        Ok(source)
    }

    pub fn fingerprint(&self) -> Fingerprint {
        fingerprint(&self.policies_dir, &self.workloads)
    }

    /// Reads everything. Invalid files are reported in the snapshot's
    /// problems and stand in with their last valid and applied content.
    pub fn load(&mut self) -> Result<Snapshot, FileSourceError> {
        let mut problems = Vec::new();
        let mut pending = Pending::default();
        let inventory = self.load_inventory(&mut problems, &mut pending)?;
        let files = policy_files(&self.policies_dir)?;
        let mut in_force: BTreeMap<PathBuf, Vec<PolicyObject>> = BTreeMap::new();
        for path in &files {
            let name = file_name(path);
            pending.present.insert(name.clone());
            let text = read_bounded(path).map_err(|e| match e {
                Bounded::Read(e) => format!("{}: {e}", path.display()),
                Bounded::TooLarge(e) => error_chain(&e),
            });
            let parsed = text.and_then(|text| {
                parse_policies(path, &text)
                    .map(|objects| (text, objects))
                    .map_err(|e| error_chain(&e))
            });
            match parsed {
                Ok((text, objects)) => {
                    in_force.insert(path.clone(), objects.clone());
                    pending.valid.insert(
                        name,
                        Version {
                            text,
                            parsed: objects,
                        },
                    );
                }
                Err(e) => {
                    let kept = match self.committed.get(&name) {
                        Some(last) => {
                            in_force.insert(path.clone(), last.parsed.clone());
                            "its last valid version stays enforced"
                        }
                        None => "none of its objects are applied",
                    };
                    problems.push(format!("{e} ({kept})"));
                }
            }
        }
        let policies = dedupe(&in_force, &mut problems);
        let previous = self
            .committed
            .values()
            .flat_map(|v| &v.parsed)
            .map(|o| (o.policy_ref(), o.clone()))
            .collect();
        self.pending = Some(pending);
        Ok(Snapshot {
            inventory,
            policies: std::sync::Arc::new(policies),
            previous: std::sync::Arc::new(previous),
            problems,
            ..Default::default()
        })
    }

    fn load_inventory(
        &mut self,
        problems: &mut Vec<String>,
        pending: &mut Pending,
    ) -> Result<CheckedInventory, FileSourceError> {
        let parsed = read_bounded(&self.workloads)
            .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> {
                match e {
                    Bounded::Read(e) => Box::new(e),
                    Bounded::TooLarge(e) => Box::new(e),
                }
            })
            .and_then(|text| {
                parse_checked_inventory(&self.workloads, &text)
                    .map(|inv| (text, inv))
                    .map_err(|e| Box::new(e) as _)
            });
        match (parsed, &self.committed_inventory) {
            (Ok((text, inv)), _) => {
                pending.inventory = Some(Version {
                    text,
                    parsed: inv.clone(),
                });
                Ok(inv)
            }
            (Err(e), Some(last)) => {
                problems.push(format!(
                    "{} (the last valid workloads stay in force)",
                    error_chain(e.as_ref())
                ));
                Ok(last.parsed.clone())
            }
            (Err(source), None) => Err(FileSourceError::NoInventory {
                path: self.workloads.clone(),
                source,
            }),
        }
    }

    /// Records what the latest load applied: a valid file none of whose
    /// objects was rejected becomes its file's last valid version (on disk
    /// first, when durable); a deleted file is forgotten (deleting is a valid
    /// change). A file with a rejected object keeps its earlier version, so
    /// after a restart that version is still what stands in for it.
    pub fn settle(&mut self, outcome: Option<&BTreeMap<PolicyRef, String>>) -> Vec<String> {
        let (Some(pending), Some(rejected)) = (self.pending.take(), outcome) else {
            return Vec::new();
        };
        let mut problems = Vec::new();
        let mut persist = |result: Result<(), StateError>| {
            if let Err(e) = result {
                problems.push(format!(
                    "{} (after a restart an older version may stand in for it)",
                    error_chain(&e)
                ));
                false
            } else {
                true
            }
        };
        let gone: Vec<String> = self
            .committed
            .keys()
            .filter(|name| !pending.present.contains(*name))
            .cloned()
            .collect();
        for name in gone {
            if persist(
                self.durable
                    .as_ref()
                    .map_or(Ok(()), |d| d.policies.remove(&name)),
            ) {
                self.committed.remove(&name);
            }
        }
        for (name, version) in pending.valid {
            let applied = !version
                .parsed
                .iter()
                .any(|o| rejected.contains_key(&o.reference));
            let unchanged = self
                .committed
                .get(&name)
                .is_some_and(|c| c.text == version.text);
            if !applied || unchanged {
                continue;
            }
            let stored = self
                .durable
                .as_ref()
                .map_or(Ok(()), |d| d.policies.put(&name, version.text.as_bytes()));
            if persist(stored) {
                self.committed.insert(name, version);
            }
        }
        if let Some(version) = pending.inventory {
            let unchanged = self
                .committed_inventory
                .as_ref()
                .is_some_and(|c| c.text == version.text);
            if !unchanged {
                let stored = self.durable.as_ref().map_or(Ok(()), |d| {
                    d.workloads.put(WORKLOADS_KEY, version.text.as_bytes())
                });
                if persist(stored) {
                    self.committed_inventory = Some(version);
                }
            }
        }
        problems
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

    const WORKLOADS: &str = "workloads:\n  - {name: a, namespace: z, labels: {app: a}, \
                             cgroup: /lab/a, ips: [198.18.0.10]}\n";

    fn deny(name: &str) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: {name}, namespace: z}}\nspec:\n  podSelector: {{}}\n"
        )
    }

    /// A policies directory, a workloads file and a state directory.
    struct Dirs {
        _root: tempfile::TempDir,
        policies: PathBuf,
        workloads: PathBuf,
        state: PathBuf,
    }

    impl Dirs {
        fn new() -> Self {
            let root = tempfile::tempdir().unwrap();
            let policies = root.path().join("policies");
            fs::create_dir(&policies).unwrap();
            let workloads = root.path().join("workloads.yaml");
            fs::write(&workloads, WORKLOADS).unwrap();
            Self {
                policies,
                workloads,
                state: root.path().join("state"),
                _root: root,
            }
        }

        /// A new agent process: only the disk carries over.
        fn source(&self) -> Result<FileSource, FileSourceError> {
            FileSource::durable(self.policies.clone(), self.workloads.clone(), &self.state)
        }

        fn write(&self, name: &str, text: &str) {
            fs::write(self.policies.join(name), text).unwrap();
        }
    }

    fn names(s: &Snapshot) -> Vec<String> {
        s.policies
            .iter()
            .map(|p| p.reference.name.to_string())
            .collect()
    }

    /// One pass the kernel took whole.
    fn pass(source: &mut FileSource) -> Snapshot {
        let snapshot = source.load().unwrap();
        assert!(source.settle(Some(&BTreeMap::new())).is_empty());
        snapshot
    }

    #[test]
    fn an_invalid_file_falls_back_to_its_last_valid_version_after_a_restart() {
        let d = Dirs::new();
        d.write("z.yaml", &deny("deny"));
        pass(&mut d.source().unwrap());

        d.write("z.yaml", "kind: NetworkPolicy\n  spec: [unclosed");
        fs::write(&d.workloads, "workloads: [unclosed").unwrap();
        let mut restarted = d.source().unwrap();
        let s = pass(&mut restarted);
        assert_eq!(names(&s), ["deny"], "the deny holds: {:?}", s.problems);
        assert_eq!(s.inventory.workloads.len(), 1, "so do the workloads");
        let report = s.problems.join("\n");
        assert!(
            report.contains("z.yaml") && report.contains("last valid version stays enforced"),
            "{report}"
        );
        assert!(report.contains("last valid workloads"), "{report}");
        // Its objects are not a change: nothing for the reconciler to hold back.
        assert_eq!(
            s.previous.values().cloned().collect::<Vec<_>>(),
            *s.policies
        );

        // Fixed: the new version applies and becomes the one kept.
        d.write("z.yaml", &deny("deny-v2"));
        assert_eq!(names(&pass(&mut restarted)), ["deny-v2"]);
        d.write("z.yaml", "not: [valid");
        assert_eq!(names(&pass(&mut d.source().unwrap())), ["deny-v2"]);
    }

    #[test]
    fn a_deleted_file_is_deleted_across_restarts() {
        let d = Dirs::new();
        d.write("z.yaml", &deny("deny"));
        let mut source = d.source().unwrap();
        pass(&mut source);
        fs::remove_file(d.policies.join("z.yaml")).unwrap();
        assert!(names(&pass(&mut source)).is_empty());
        // Re-created invalid: nothing of the deleted version comes back.
        d.write("z.yaml", "not: [valid");
        let s = pass(&mut d.source().unwrap());
        assert!(names(&s).is_empty());
        assert!(
            s.problems[0].contains("none of its objects are applied"),
            "{:?}",
            s.problems
        );
    }

    #[test]
    fn what_was_not_applied_is_not_remembered() {
        let d = Dirs::new();
        d.write("z.yaml", &deny("v1"));
        pass(&mut d.source().unwrap());
        d.write(
            "z.yaml",
            &deny("v1").replace("podSelector: {}", "podSelector: {matchLabels: {app: a}}"),
        );
        let mut source = d.source().unwrap();
        let s = source.load().unwrap();
        let v1 = s.previous.values().next().unwrap().clone();
        assert_ne!(s.policies[0], v1, "a change, with its previous version");
        // The reconciler held it back; after a restart the file turns invalid.
        let rejected = BTreeMap::from([(v1.policy_ref(), "too big".to_string())]);
        assert!(source.settle(Some(&rejected)).is_empty());
        // Nothing reached the kernel at all: nothing is recorded either.
        d.write("z.yaml", &deny("v2"));
        source.load().unwrap();
        assert!(source.settle(None).is_empty());
        d.write("z.yaml", "not: [valid");
        let s = pass(&mut d.source().unwrap());
        assert_eq!(*s.policies, [v1], "the version that was enforced");
    }

    #[test]
    fn a_damaged_state_file_refuses_to_start() {
        let d = Dirs::new();
        d.write("z.yaml", &deny("deny"));
        pass(&mut d.source().unwrap());
        let stored = d.state.join("files/policies/z.yaml");
        let mut raw = fs::read(&stored).unwrap();
        raw.truncate(raw.len() - 5);
        fs::write(&stored, raw).unwrap();
        let e = error_chain(&d.source().err().expect("refuses"));
        assert!(e.contains("z.yaml") && e.contains("corrupt"), "{e}");

        // Intact framing around text that is no longer a valid policy (an
        // older agent's format, a hand edit): also refused, naming the file.
        StateStore::open(&d.state.join("files/policies"))
            .unwrap()
            .put("z.yaml", b"kind: Nonsense")
            .unwrap();
        let e = error_chain(&d.source().err().expect("refuses"));
        assert!(
            e.contains("z.yaml") && e.contains("no valid version"),
            "{e}"
        );
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
        // The pass reached the kernel: these workloads are the last valid.
        source.settle(Some(&BTreeMap::new()));

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
