//! Finds a local pod's cgroup from its UID and QoS class, as the kubelet
//! laid it out, so the pod can be registered as an endpoint.
//!
//! The pod-level cgroup is what we want, not a container's: the kernel
//! programs walk a socket's cgroup ancestry, so one entry covers every
//! container of the pod, including ones that restart or start later. The
//! kubelet creates it at sandbox creation, before any container runs.
//!
//! Layouts (relative to the kubelet's cgroup root, `/` by default):
//! - systemd driver: `kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod<uid with _>.slice` (BestEffort likewise,
//!   Guaranteed directly as `kubepods.slice/kubepods-pod<uid_>.slice`);
//!   containers below as `cri-containerd-<id>.scope` or `crio-<id>.scope`.
//! - cgroupfs driver: `kubepods/burstable/pod<uid>` (`kubepods/besteffort/…`,
//!   Guaranteed `kubepods/pod<uid>`); containers below as `<id>` or
//!   `crio-<id>`.
//!
//! When neither expected path exists (another cgroup root, such as
//! `kubelet.slice`, or a QoS class that changed under us) the tree below the
//! base is searched, to a bounded depth, for a directory named after the pod.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt, fs, io,
    os::unix::fs::DirEntryExt as _,
    path::{Path, PathBuf},
    str::FromStr,
};

/// How far below the base a pod directory is searched for. Default layouts
/// put it 2–3 levels down; this leaves room for a nested cgroup root.
pub const DEFAULT_SEARCH_DEPTH: usize = 6;

/// Set by the kubelet on a static pod's mirror object: the UID the kubelet
/// uses on the node (and in cgroup names), unlike the mirror's own
/// `metadata.uid`, which the API server assigned.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

#[derive(Debug, thiserror::Error)]
pub enum PodCgroupError {
    #[error(
        "{uid:?} is not a pod UID the kubelet would use in a cgroup name \
         (expected 32 hex digits, optionally separated by dashes)"
    )]
    InvalidUid { uid: String },
    #[error("unknown QoS class {value:?} (expected Guaranteed, Burstable or BestEffort)")]
    InvalidQos { value: String },
    #[error("reading cgroup directory {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cgroup of pod {uid} ({qos}) not found: tried {}, then searched {depth} levels \
         below {} for pod{uid} or *-pod{}.slice; the kubelet creates it when the \
         pod's sandbox starts",
        list(tried), base.display(), uid.systemd()
    )]
    NotFound {
        uid: PodUid,
        qos: QosClass,
        base: PathBuf,
        tried: Vec<PathBuf>,
        depth: usize,
    },
    #[error("pod {uid} has more than one cgroup: {}", list(paths))]
    Ambiguous { uid: PodUid, paths: Vec<PathBuf> },
}

fn list(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(", ")
}

/// A pod UID as the kubelet spells it in cgroup names: API-server UIDs
/// are UUIDs, static pods' are 32-hex-digit config hashes. Validated,
/// because it becomes part of a path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodUid(String);

impl PodUid {
    pub fn new(uid: &str) -> Result<Self, PodCgroupError> {
        let hex = uid.chars().filter(|c| c.is_ascii_hexdigit()).count();
        let valid = uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        if valid && hex == 32 {
            Ok(Self(uid.to_string()))
        } else {
            Err(PodCgroupError::InvalidUid {
                uid: uid.to_string(),
            })
        }
    }

    /// The UID the kubelet uses for a pod object: the mirror annotation of
    /// a static pod, otherwise `metadata.uid`.
    pub fn of_pod(
        metadata_uid: &str,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Self, PodCgroupError> {
        Self::new(
            annotations
                .get(MIRROR_ANNOTATION)
                .map_or(metadata_uid, String::as_str),
        )
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// systemd reads `-` in a unit name as nesting, so the kubelet writes `_`.
    fn systemd(&self) -> String {
        self.0.replace('-', "_")
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A pod's `status.qosClass`: it decides the kubelet's parent cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub const ALL: [QosClass; 3] = [Self::Guaranteed, Self::Burstable, Self::BestEffort];

    /// The kubelet's parent cgroup name for the class; Guaranteed pods sit
    /// directly under kubepods.
    fn parent(self) -> Option<&'static str> {
        match self {
            Self::Guaranteed => None,
            Self::Burstable => Some("burstable"),
            Self::BestEffort => Some("besteffort"),
        }
    }
}

impl FromStr for QosClass {
    type Err = PodCgroupError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "Guaranteed" => Ok(Self::Guaranteed),
            "Burstable" => Ok(Self::Burstable),
            "BestEffort" => Ok(Self::BestEffort),
            _ => Err(PodCgroupError::InvalidQos {
                value: s.to_string(),
            }),
        }
    }
}

impl fmt::Display for QosClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Guaranteed => "Guaranteed",
            Self::Burstable => "Burstable",
            Self::BestEffort => "BestEffort",
        })
    }
}

/// The kubelet's `cgroupDriver`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

impl Driver {
    /// The parent of every pod cgroup, relative to the kubelet's cgroup root.
    fn kubepods(self, slice_prefix: &str) -> PathBuf {
        match self {
            Self::Systemd => PathBuf::from(format!("{slice_prefix}kubepods.slice")),
            Self::Cgroupfs => PathBuf::from("kubepods"),
        }
    }

    /// Where this driver puts a pod's cgroup, relative to the kubelet's
    /// cgroup root. `slice_prefix` is that root's systemd name plus `-`
    /// (`kubelet-` for `kubelet.slice`), since slice names repeat their
    /// parents'.
    fn pod_path(self, uid: &PodUid, qos: QosClass, slice_prefix: &str) -> PathBuf {
        match self {
            Self::Systemd => {
                let top = format!("{slice_prefix}kubepods");
                let mut path = self.kubepods(slice_prefix);
                let parent = match qos.parent() {
                    Some(class) => {
                        let parent = format!("{top}-{class}");
                        path.push(format!("{parent}.slice"));
                        parent
                    }
                    None => top,
                };
                path.join(format!("{parent}-pod{}.slice", uid.systemd()))
            }
            Self::Cgroupfs => {
                let mut path = self.kubepods(slice_prefix);
                path.extend(qos.parent());
                path.join(format!("pod{uid}"))
            }
        }
    }
}

/// The pod UID a directory name denotes, under either driver.
pub fn parse_pod_dir(name: &str) -> Option<PodUid> {
    if let Some(uid) = name.strip_prefix("pod") {
        return PodUid::new(uid).ok();
    }
    let (_, uid) = name.strip_suffix(".slice")?.rsplit_once("-pod")?;
    // The systemd form never holds a dash: that would be nesting.
    if uid.contains('-') {
        return None;
    }
    PodUid::new(&uid.replace('_', "-")).ok()
}

/// A pod cgroup a walk found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodDir {
    /// Relative to the mount.
    pub path: PathBuf,
    /// The cgroup id as the walk read it.
    pub id: u64,
}

/// Finds pod cgroups below one cgroup v2 mount.
#[derive(Clone, Debug)]
pub struct PodCgroupFinder {
    mount: PathBuf,
    /// Relative to the mount: the kubelet's cgroup root.
    base: PathBuf,
    depth: usize,
}

impl PodCgroupFinder {
    /// A finder for a kubelet with the default cgroup root (`/`).
    pub fn new(mount: impl Into<PathBuf>) -> Self {
        Self {
            mount: mount.into(),
            base: PathBuf::new(),
            depth: DEFAULT_SEARCH_DEPTH,
        }
    }

    /// Looks below `base` (relative to the mount, e.g. the kubelet's
    /// `--cgroup-root`) instead of the whole hierarchy.
    pub fn with_base(mut self, base: impl AsRef<Path>) -> Self {
        let base = base.as_ref();
        self.base = base.strip_prefix("/").unwrap_or(base).to_path_buf();
        self
    }

    pub fn with_depth(mut self, depth: usize) -> Self {
        self.depth = depth;
        self
    }

    /// The kubelet's cgroup root, absolute.
    pub fn base_dir(&self) -> PathBuf {
        self.mount.join(&self.base)
    }

    /// The cgroup2 mount the finder searches.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The base's systemd name plus `-` (`kubelet-` for `kubelet.slice`),
    /// since slice names repeat their parents'; empty otherwise.
    fn slice_prefix(&self) -> String {
        self.base
            .file_name()
            .and_then(|n| n.to_str()?.strip_suffix(".slice"))
            .map(|stem| format!("{stem}-"))
            .unwrap_or_default()
    }

    /// Where each driver would put the pod, relative to the mount.
    pub fn expected_paths(&self, uid: &PodUid, qos: QosClass) -> Vec<PathBuf> {
        let slice_prefix = self.slice_prefix();
        [Driver::Systemd, Driver::Cgroupfs]
            .into_iter()
            .map(|d| self.base.join(d.pod_path(uid, qos, &slice_prefix)))
            .collect()
    }

    /// The kubelet's pod-parent cgroups (`kubepods…`, either driver) that
    /// exist, absolute: every pod cgroup is below one of them.
    pub fn kubepods_dirs(&self) -> Vec<PathBuf> {
        [
            Driver::Systemd.kubepods(&self.slice_prefix()),
            Driver::Cgroupfs.kubepods(""),
        ]
        .into_iter()
        .map(|d| self.base_dir().join(d))
        .filter(|p| p.is_dir())
        .collect()
    }

    /// The pod-level cgroup of `uid`, relative to the mount.
    pub fn find(&self, uid: &PodUid, qos: QosClass) -> Result<PathBuf, PodCgroupError> {
        let tried = self.expected_paths(uid, qos);
        let mut hits: Vec<PathBuf> = tried
            .iter()
            .filter(|p| self.mount.join(p).is_dir())
            .cloned()
            .collect();
        if hits.is_empty() {
            hits = self
                .walk()?
                .into_iter()
                .filter(|(found, _)| found == uid)
                .map(|(_, dir)| dir.path)
                .collect();
        }
        match hits.len() {
            0 => Err(PodCgroupError::NotFound {
                uid: uid.clone(),
                qos,
                base: self.mount.join(&self.base),
                tried: tried.iter().map(|p| self.mount.join(p)).collect(),
                depth: self.depth,
            }),
            1 => Ok(hits.remove(0)),
            _ => Err(PodCgroupError::Ambiguous {
                uid: uid.clone(),
                paths: hits,
            }),
        }
    }

    /// Every pod with a cgroup on this node, with its cgroup relative to the
    /// mount: what to compare with the API's pods when reconciling starts
    /// and deletes.
    pub fn list(&self) -> Result<BTreeMap<PodUid, PathBuf>, PodCgroupError> {
        Ok(self
            .list_with_ids()?
            .into_iter()
            .map(|(uid, dir)| (uid, dir.path))
            .collect())
    }

    /// [`PodCgroupFinder::list`] with each cgroup's id as the walk read it
    /// (the directory's inode number, which is the cgroup id), so a pass
    /// need not look each one up again.
    pub fn list_with_ids(&self) -> Result<BTreeMap<PodUid, PodDir>, PodCgroupError> {
        self.list_visiting(|_| {})
    }

    /// [`PodCgroupFinder::list_with_ids`], calling `visit` with each
    /// directory the walk reads (absolute) just before reading it.
    pub fn list_visiting(
        &self,
        visit: impl FnMut(&Path),
    ) -> Result<BTreeMap<PodUid, PodDir>, PodCgroupError> {
        let mut pods: BTreeMap<PodUid, PodDir> = BTreeMap::new();
        for (uid, dir) in self.walk_visiting(visit)? {
            if let Some(first) = pods.get(&uid) {
                tracing::warn!(
                    pod = %uid,
                    used = %first.path.display(),
                    ignored = %dir.path.display(),
                    "pod has more than one cgroup"
                );
                continue;
            }
            pods.insert(uid, dir);
        }
        Ok(pods)
    }

    /// Breadth-first over directories below the base, shallowest first,
    /// without descending into pods (their children are containers).
    fn walk(&self) -> Result<Vec<(PodUid, PodDir)>, PodCgroupError> {
        self.walk_visiting(|_| {})
    }

    fn walk_visiting(
        &self,
        mut visit: impl FnMut(&Path),
    ) -> Result<Vec<(PodUid, PodDir)>, PodCgroupError> {
        let mut found = Vec::new();
        let mut queue = VecDeque::from([(self.base.clone(), 0)]);
        while let Some((dir, level)) = queue.pop_front() {
            let abs = self.mount.join(&dir);
            visit(&abs);
            let entries = match fs::read_dir(&abs) {
                Ok(entries) => entries,
                Err(source) if level == 0 => {
                    return Err(PodCgroupError::Read { path: abs, source });
                }
                // Cgroups come and go while we walk; a vanished one is no error.
                Err(e) => {
                    tracing::debug!(path = %abs.display(), error = %e, "skipping cgroup");
                    continue;
                }
            };
            let mut children: Vec<_> = entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| Some((e.file_name().into_string().ok()?, e.ino())))
                .collect();
            children.sort();
            for (name, id) in children {
                let path = dir.join(&name);
                if let Some(uid) = parse_pod_dir(&name) {
                    found.push((uid, PodDir { path, id }));
                } else if level + 1 < self.depth {
                    queue.push_back((path, level + 1));
                }
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::{
        ffi::CString,
        os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::*;
    use crate::cgroup;

    const UIDS: [&str; 3] = [
        "3f2a9c1e-5b7d-4e8f-9a0b-1c2d3e4f5a6b",
        "8e1d7c3b-2a4f-4b6e-8c9d-0e1f2a3b4c5d",
        "c0ffee00-1234-4abc-8def-0123456789ab",
    ];
    const CONTAINERS: [&str; 2] = [
        "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90",
        "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
    ];

    fn uid(s: &str) -> PodUid {
        PodUid::new(s).unwrap()
    }

    #[derive(Clone, Copy, Debug)]
    enum Runtime {
        Containerd,
        CriO,
    }

    /// Container cgroup names as each runtime creates them under a pod.
    fn container_dirs(driver: Driver, runtime: Runtime, id: &str) -> Vec<String> {
        match (driver, runtime) {
            (Driver::Systemd, Runtime::Containerd) => vec![format!("cri-containerd-{id}.scope")],
            (Driver::Systemd, Runtime::CriO) => {
                vec![
                    format!("crio-{id}.scope"),
                    format!("crio-conmon-{id}.scope"),
                ]
            }
            (Driver::Cgroupfs, Runtime::Containerd) => vec![id.to_string()],
            (Driver::Cgroupfs, Runtime::CriO) => {
                vec![format!("crio-{id}"), format!("crio-conmon-{id}")]
            }
        }
    }

    /// A uniquely named subtree of the real cgroup2 hierarchy, removed
    /// bottom-up on drop.
    pub(in crate::source::kube) struct TestTree {
        pub mount: PathBuf,
        pub base: PathBuf,
    }

    impl TestTree {
        pub fn new() -> Self {
            assert!(
                nix::unistd::geteuid().is_root(),
                "cgroup discovery tests build real cgroup trees and must run as root"
            );
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let mount = cgroup::cgroup2_mount().expect("a cgroup v2 hierarchy is mounted");
            let base = PathBuf::from(format!(
                "portcullis-test-kube-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir(mount.join(&base)).expect("creating the test cgroup");
            Self { mount, base }
        }

        /// Creates `rel` (below the test base) and its parents.
        pub fn mkdir(&self, rel: impl AsRef<Path>) -> PathBuf {
            let abs = self.mount.join(&self.base).join(rel);
            fs::create_dir_all(&abs).unwrap_or_else(|e| panic!("mkdir {}: {e}", abs.display()));
            abs
        }

        pub fn finder(&self) -> PodCgroupFinder {
            PodCgroupFinder::new(&self.mount).with_base(&self.base)
        }
    }

    impl Drop for TestTree {
        fn drop(&mut self) {
            if let Err(e) = rmdir_tree(&self.mount.join(&self.base)) {
                eprintln!("removing test cgroups: {e}");
            }
        }
    }

    /// cgroup directories hold only control files, which rmdir takes along;
    /// children must go first.
    fn rmdir_tree(dir: &Path) -> io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                rmdir_tree(&entry.path())?;
            }
        }
        fs::remove_dir(dir)
    }

    /// The id the kernel reports for a cgroup (what the BPF ancestry walk
    /// compares), read as its file handle rather than via stat.
    fn kernel_cgroup_id(path: &Path) -> u64 {
        #[repr(C)]
        struct Handle {
            bytes: u32,
            kind: i32,
            data: [u8; 64],
        }
        let mut handle = Handle {
            bytes: 64,
            kind: 0,
            data: [0; 64],
        };
        let mut mount_id = 0;
        let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `handle` is a file_handle header followed by 64 bytes, as
        // its `bytes` field says; both pointers outlive the call.
        let rc = unsafe {
            libc::name_to_handle_at(
                libc::AT_FDCWD,
                cpath.as_ptr(),
                (&raw mut handle).cast(),
                &mut mount_id,
                0,
            )
        };
        assert_eq!(
            rc,
            0,
            "name_to_handle_at {}: {}",
            path.display(),
            io::Error::last_os_error()
        );
        assert_eq!(handle.bytes, 8, "a cgroup2 file handle is its 64-bit id");
        u64::from_ne_bytes(handle.data[..8].try_into().unwrap())
    }

    /// Builds one pod per QoS class with the given driver and runtime, and
    /// checks each is found at its pod level, with the id the kernel uses.
    fn finds_pods_in_layout(driver: Driver, runtime: Runtime) {
        let tree = TestTree::new();
        let finder = tree.finder();
        // Unrelated cgroups beside the pods must not confuse the search.
        tree.mkdir("system.slice/containerd.service");
        tree.mkdir("user.slice/user-1000.slice/podman.slice");

        let mut expected = BTreeMap::new();
        for (qos, uid_str) in QosClass::ALL.into_iter().zip(UIDS) {
            let uid = uid(uid_str);
            let pod_rel = driver.pod_path(&uid, qos, "");
            let rel = tree.base.join(&pod_rel);
            let pod_dir = tree.mkdir(&pod_rel);
            let containers: Vec<PathBuf> = CONTAINERS
                .iter()
                .flat_map(|id| container_dirs(driver, runtime, id))
                .map(|name| tree.mkdir(pod_rel.join(name)))
                .collect();

            let found = finder
                .find(&uid, qos)
                .unwrap_or_else(|e| panic!("{driver:?}/{runtime:?}/{qos}: {e}"));
            assert_eq!(
                found, rel,
                "{driver:?}/{runtime:?}/{qos}: not the pod-level cgroup"
            );

            let abs = cgroup::resolve(&tree.mount, &found);
            assert_eq!(abs, pod_dir);
            let id = cgroup::cgroup_id(&abs).unwrap();
            assert_eq!(id, fs::metadata(&pod_dir).unwrap().ino());
            assert_eq!(
                id,
                kernel_cgroup_id(&pod_dir),
                "cgroup id is not the kernel's"
            );
            for c in &containers {
                assert!(
                    c.starts_with(&abs),
                    "{} is not below the pod cgroup, so the ancestry walk would miss it",
                    c.display()
                );
            }
            expected.insert(uid, rel);
        }
        assert_eq!(
            finder.list().unwrap(),
            expected,
            "{driver:?}/{runtime:?}: listing must return exactly the pods, not containers"
        );
        // The ids the walk reads are the kernel's, which the maps are keyed by.
        for (uid, dir) in finder.list_with_ids().unwrap() {
            assert_eq!(
                dir.id,
                kernel_cgroup_id(&tree.mount.join(&dir.path)),
                "{uid}: the listed id is not the kernel's cgroup id"
            );
        }
    }

    #[test]
    fn systemd_containerd() {
        finds_pods_in_layout(Driver::Systemd, Runtime::Containerd);
    }

    #[test]
    fn systemd_crio() {
        finds_pods_in_layout(Driver::Systemd, Runtime::CriO);
    }

    #[test]
    fn cgroupfs_containerd() {
        finds_pods_in_layout(Driver::Cgroupfs, Runtime::Containerd);
    }

    #[test]
    fn cgroupfs_crio() {
        finds_pods_in_layout(Driver::Cgroupfs, Runtime::CriO);
    }

    #[test]
    fn searches_below_a_custom_cgroup_root() {
        let tree = TestTree::new();
        let (systemd, cgroupfs) = (uid(UIDS[0]), uid(UIDS[1]));
        let systemd_pod = format!(
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/\
             kubelet-kubepods-burstable-pod{}.slice",
            systemd.systemd()
        );
        let cgroupfs_pod = format!("kubelet/kubepods/besteffort/pod{cgroupfs}");
        tree.mkdir(format!(
            "{systemd_pod}/cri-containerd-{}.scope",
            CONTAINERS[0]
        ));
        tree.mkdir(format!("{cgroupfs_pod}/{}", CONTAINERS[1]));
        let finder = tree.finder();

        assert_eq!(
            finder.find(&systemd, QosClass::Burstable).unwrap(),
            tree.base.join(&systemd_pod)
        );
        assert_eq!(
            finder.find(&cgroupfs, QosClass::BestEffort).unwrap(),
            tree.base.join(&cgroupfs_pod)
        );
        // A stale QoS class only costs the search, not the answer.
        assert_eq!(
            finder.find(&systemd, QosClass::Guaranteed).unwrap(),
            tree.base.join(&systemd_pod)
        );
        assert_eq!(
            finder.list().unwrap(),
            BTreeMap::from([
                (systemd.clone(), tree.base.join(&systemd_pod)),
                (cgroupfs.clone(), tree.base.join(&cgroupfs_pod)),
            ])
        );
        // Knowing the root makes the systemd path an expected one.
        let rooted = PodCgroupFinder::new(&tree.mount).with_base(tree.base.join("kubelet.slice"));
        assert_eq!(
            rooted.expected_paths(&systemd, QosClass::Burstable)[0],
            tree.base.join(&systemd_pod)
        );
        // The search is bounded: the pod sits 4 levels down.
        assert!(matches!(
            finder
                .clone()
                .with_depth(3)
                .find(&systemd, QosClass::Burstable),
            Err(PodCgroupError::NotFound { .. })
        ));
    }

    #[test]
    fn missing_pod_says_what_was_tried() {
        let tree = TestTree::new();
        tree.mkdir("kubepods.slice/kubepods-burstable.slice");
        let pod = uid(UIDS[2]);
        let err = tree.finder().find(&pod, QosClass::Burstable).unwrap_err();
        let base = tree.mount.join(&tree.base);
        let msg = err.to_string();
        assert_eq!(
            msg,
            format!(
                "cgroup of pod {pod} (Burstable) not found: tried \
                 {base}/kubepods.slice/kubepods-burstable.slice/\
                 kubepods-burstable-podc0ffee00_1234_4abc_8def_0123456789ab.slice, \
                 {base}/kubepods/burstable/pod{pod}, then searched 6 levels below {base} \
                 for pod{pod} or *-podc0ffee00_1234_4abc_8def_0123456789ab.slice; \
                 the kubelet creates it when the pod's sandbox starts",
                base = base.display()
            )
        );
    }

    #[test]
    fn one_pod_in_both_layouts_is_ambiguous() {
        let tree = TestTree::new();
        let pod = uid(UIDS[0]);
        for driver in [Driver::Systemd, Driver::Cgroupfs] {
            tree.mkdir(driver.pod_path(&pod, QosClass::Guaranteed, ""));
        }
        let err = tree.finder().find(&pod, QosClass::Guaranteed).unwrap_err();
        assert!(
            matches!(&err, PodCgroupError::Ambiguous { paths, .. } if paths.len() == 2),
            "{err}"
        );
    }

    #[test]
    fn names_parse_under_both_drivers_only_for_pods() {
        let want = Some(uid(UIDS[0]));
        let u = UIDS[0].replace('-', "_");
        assert_eq!(parse_pod_dir(&format!("pod{}", UIDS[0])), want);
        assert_eq!(parse_pod_dir(&format!("kubepods-pod{u}.slice")), want);
        assert_eq!(
            parse_pod_dir(&format!("kubepods-burstable-pod{u}.slice")),
            want
        );
        assert_eq!(
            parse_pod_dir(&format!("kubelet-kubepods-besteffort-pod{u}.slice")),
            want
        );
        // Static pods: a config hash without dashes.
        assert!(parse_pod_dir("pod0123456789abcdef0123456789abcdef").is_some());
        for not_a_pod in [
            "podman.slice",
            "kubepods-burstable.slice",
            &format!("cri-containerd-{}.scope", CONTAINERS[0]),
            CONTAINERS[0],
            &format!("crio-{}", CONTAINERS[0]),
            "pod",
            &format!("pod{}x", UIDS[0]),
        ] {
            assert_eq!(parse_pod_dir(not_a_pod), None, "{not_a_pod}");
        }
    }

    #[test]
    fn uids_that_could_escape_the_hierarchy_are_refused() {
        for bad in ["../../etc", "", "3f2a9c1e/5b7d", "3f2a9c1e-5b7d"] {
            let err = PodUid::new(bad).unwrap_err();
            assert!(err.to_string().contains("is not a pod UID"), "{err}");
        }
    }

    #[test]
    fn mirror_pods_use_the_kubelet_uid() {
        let hash = "0123456789abcdef0123456789abcdef";
        let annotations = BTreeMap::from([(MIRROR_ANNOTATION.to_string(), hash.to_string())]);
        assert_eq!(
            PodUid::of_pod(UIDS[0], &annotations).unwrap().as_str(),
            hash
        );
        assert_eq!(
            PodUid::of_pod(UIDS[0], &BTreeMap::new()).unwrap().as_str(),
            UIDS[0]
        );
    }

    #[test]
    fn qos_classes_parse_as_the_api_spells_them() {
        for qos in QosClass::ALL {
            assert_eq!(qos.to_string().parse::<QosClass>().unwrap(), qos);
        }
        let err = "burstable".parse::<QosClass>().unwrap_err();
        assert!(err.to_string().contains("\"burstable\""), "{err}");
    }
}
