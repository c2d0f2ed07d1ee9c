//! What one pass's desired state keeps for the next, so the parts worked
//! out from inputs that did not change are not worked out again. At a
//! thousand local pods and five thousand peers, parsing cgroup paths and
//! rebuilding the identity map were most of the desired-state stage.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
};

use foldhash::HashMap;
use portcullis_common::EndpointValue;

use crate::{
    cgroup::{self, CgroupError},
    mesh::mode::NamespaceModes,
    policy::{
        compile::{AddrPrefix, CompiledEndpoint},
        model::Workload,
    },
};

/// cgroup ids by absolute path, as the source's listing read them (see
/// [`crate::source::Snapshot::cgroup_ids`]).
pub(super) type Listed = Arc<std::collections::HashMap<PathBuf, u64>>;

/// The identity map as the writer takes it: (prefix length, address).
pub(super) type IdentityMap = Arc<BTreeMap<(u8, [u8; 16]), u32>>;

/// Where one endpoint's cgroup is.
struct EndpointPath {
    /// As the compile gave it.
    given: PathBuf,
    resolved: PathBuf,
    depth: usize,
    /// The id a listing gave, with that listing: the same listing answers
    /// the same. A new listing is asked again, so a cgroup removed and
    /// made again at the same path is never written with its old id.
    listed: Option<(Listed, u64)>,
}

/// A located cgroup.
pub(super) struct Located<'a> {
    pub resolved: &'a Path,
    /// Levels below the hierarchy's root.
    pub depth: usize,
    pub id: Result<u64, CgroupError>,
    /// The id came from the listing, not the file system.
    pub from_listing: bool,
}

/// Endpoints' cgroups by endpoint id, kept while the endpoint is.
#[derive(Default)]
pub(super) struct EndpointPaths {
    by_endpoint: HashMap<u32, EndpointPath>,
    /// The entries of the previous pass not used yet in this one.
    earlier: HashMap<u32, EndpointPath>,
}

impl EndpointPaths {
    /// Starts a pass: what the last one located and this one does not is
    /// dropped at the next.
    pub fn begin(&mut self) {
        self.earlier = std::mem::take(&mut self.by_endpoint);
    }

    /// Endpoint `endpoint`'s cgroup at `given` (absolute, or relative to
    /// `mount`), its id from `listed` or else read from the file system.
    pub fn locate(
        &mut self,
        mount: &Path,
        endpoint: u32,
        given: &Path,
        listed: &Listed,
    ) -> Located<'_> {
        let entry = match self.earlier.remove(&endpoint) {
            Some(kept) if kept.given == given => kept,
            _ => {
                let resolved = cgroup::resolve(mount, given);
                EndpointPath {
                    given: given.to_path_buf(),
                    depth: cgroup::depth(mount, &resolved),
                    resolved,
                    listed: None,
                }
            }
        };
        let entry = self
            .by_endpoint
            .entry(endpoint)
            .insert_entry(entry)
            .into_mut();
        let (id, from_listing) = match &entry.listed {
            Some((listing, id)) if Arc::ptr_eq(listing, listed) => (Ok(*id), true),
            _ => match listed.get(&entry.resolved) {
                Some(id) => {
                    entry.listed = Some((Arc::clone(listed), *id));
                    (Ok(*id), true)
                }
                // Not listed: asked every pass, it may appear any moment.
                None => {
                    entry.listed = None;
                    (cgroup::cgroup_id(&entry.resolved), false)
                }
            },
        };
        Located {
            resolved: &entry.resolved,
            depth: entry.depth,
            id,
            from_listing,
        }
    }
}

/// The identity map of the latest compile, shared while it is the same.
#[derive(Default)]
pub(super) struct KeptIdentities {
    from: BTreeMap<AddrPrefix, u32>,
    map: IdentityMap,
}

impl KeptIdentities {
    /// `identities` as the writer takes them: the kept map when they did
    /// not change (then the writer need not compare them either).
    pub fn of(&mut self, identities: &BTreeMap<AddrPrefix, u32>) -> IdentityMap {
        if self.from != *identities {
            self.map = Arc::new(
                identities
                    .iter()
                    .map(|(prefix, id)| ((prefix.len, prefix.addr), *id))
                    .collect(),
            );
            self.from = identities.clone();
        }
        Arc::clone(&self.map)
    }
}

/// Everything the endpoints' map entries are worked out from, besides the
/// file system: the compile's endpoints, the cgroup listing, which
/// endpoints ingress policy restricts, the local workloads (their mesh
/// labels) and the namespaces' mesh labels.
pub(super) struct EndpointInputs<'a> {
    pub endpoints: &'a [CompiledEndpoint],
    pub listed: &'a Listed,
    pub restricted: &'a Arc<BTreeSet<u32>>,
    /// The inventory's local workloads, in its order.
    pub local: Vec<&'a Arc<Workload>>,
    pub namespace_modes: NamespaceModes<'a>,
}

/// The same inputs, owned. Workloads are kept by `Arc`, so one compares
/// as the same only while it is the very object (an edited pod is a new
/// one), and its address cannot be reused meanwhile.
struct OwnedInputs {
    endpoints: Vec<CompiledEndpoint>,
    listed: Listed,
    restricted: Arc<BTreeSet<u32>>,
    local: Vec<Arc<Workload>>,
    namespace_modes: Vec<(String, String)>,
}

impl OwnedInputs {
    fn same(&self, now: &EndpointInputs<'_>) -> bool {
        Arc::ptr_eq(&self.listed, now.listed)
            && (Arc::ptr_eq(&self.restricted, now.restricted) || self.restricted == *now.restricted)
            && self.local.len() == now.local.len()
            && self
                .local
                .iter()
                .zip(&now.local)
                .all(|(a, b)| Arc::ptr_eq(a, b))
            && self.namespace_modes.len() == now.namespace_modes.labels().len()
            && self
                .namespace_modes
                .iter()
                .zip(now.namespace_modes.labels())
                .all(|((n, m), (n2, m2))| n == n2 && m == m2)
            && self.endpoints == now.endpoints
    }
}

/// The endpoints' entries one pass worked out, and the cgroup of each.
#[derive(Clone, Default)]
pub(super) struct EndpointEntries {
    pub values: Vec<(u64, EndpointValue)>,
    pub cgroups: Vec<(u64, PathBuf)>,
}

/// The endpoints' entries of the last pass whose every endpoint's cgroup
/// was found in the listing, within the depth the kernel searches: a pass
/// with the same inputs has the same entries (a pod elsewhere in the
/// cluster, a policy that restricts no other endpoint, a Service). A pass
/// that read any cgroup from the file system is never kept: it is read
/// again next time, as it may appear or be made again any moment.
#[derive(Default)]
pub(super) struct KeptEndpoints {
    kept: Option<(OwnedInputs, EndpointEntries)>,
    /// Passes that used the kept entries.
    reused: u64,
}

impl KeptEndpoints {
    pub fn of(&mut self, now: &EndpointInputs<'_>) -> Option<&EndpointEntries> {
        let entries = self
            .kept
            .as_ref()
            .filter(|(from, _)| from.same(now))
            .map(|(_, entries)| entries);
        self.reused += u64::from(entries.is_some());
        entries
    }

    #[cfg(test)]
    pub fn reused(&self) -> u64 {
        self.reused
    }

    /// Keeps `entries`, worked out from `now` with every cgroup listed.
    pub fn keep(&mut self, now: &EndpointInputs<'_>, entries: EndpointEntries) {
        let from = OwnedInputs {
            endpoints: now.endpoints.to_vec(),
            listed: Arc::clone(now.listed),
            restricted: Arc::clone(now.restricted),
            local: now.local.iter().map(|w| Arc::clone(w)).collect(),
            namespace_modes: now
                .namespace_modes
                .labels()
                .iter()
                .map(|(n, m)| (n.to_string(), m.to_string()))
                .collect(),
        };
        self.kept = Some((from, entries));
    }

    /// Forgets what was kept (a pass that read the file system).
    pub fn forget(&mut self) {
        self.kept = None;
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn listing(entries: &[(&Path, u64)]) -> Listed {
        Arc::new(
            entries
                .iter()
                .map(|(p, id)| (p.to_path_buf(), *id))
                .collect(),
        )
    }

    /// A cgroup made again at the same path has a new id; the new listing
    /// says so, and the endpoint must get it, not the one kept.
    #[test]
    fn a_new_listing_is_asked_again_and_an_unlisted_cgroup_is_read() {
        let mount = tempfile::tempdir().unwrap();
        let pod = mount.path().join("kubepods/pod1");
        std::fs::create_dir_all(&pod).unwrap();
        let mut paths = EndpointPaths::default();
        let first = listing(&[(&pod, 11)]);
        paths.begin();
        let at = paths.locate(mount.path(), 1, Path::new("/kubepods/pod1"), &first);
        assert_eq!((at.resolved, at.depth, at.id.unwrap()), (&*pod, 2, 11));

        paths.begin();
        let again = paths.locate(mount.path(), 1, Path::new("/kubepods/pod1"), &first);
        assert_eq!(again.id.unwrap(), 11);

        let remade = listing(&[(&pod, 12)]);
        paths.begin();
        assert_eq!(
            paths
                .locate(mount.path(), 1, Path::new("/kubepods/pod1"), &remade)
                .id
                .unwrap(),
            12
        );

        // Not listed: the file system answers (the directory's inode).
        use std::os::unix::fs::MetadataExt as _;
        let inode = std::fs::metadata(&pod).unwrap().ino();
        paths.begin();
        let unlisted = listing(&[]);
        assert_eq!(
            paths
                .locate(mount.path(), 1, Path::new("/kubepods/pod1"), &unlisted)
                .id
                .unwrap(),
            inode
        );
        // Gone from the file system too: missing, not the id kept before.
        std::fs::remove_dir(&pod).unwrap();
        paths.begin();
        assert!(paths
            .locate(mount.path(), 1, Path::new("/kubepods/pod1"), &unlisted)
            .id
            .is_err());
    }

    /// An endpoint whose cgroup moved is located at the new path.
    #[test]
    fn an_endpoint_whose_cgroup_moved_is_located_again() {
        let mount = Path::new("/sys/fs/cgroup");
        let a = mount.join("kubepods/besteffort/podA");
        let b = mount.join("kubepods/burstable/podA");
        let listed = listing(&[(&a, 1), (&b, 2)]);
        let mut paths = EndpointPaths::default();
        paths.begin();
        assert_eq!(paths.locate(mount, 7, &a, &listed).id.unwrap(), 1);
        paths.begin();
        let moved = paths.locate(mount, 7, &b, &listed);
        assert_eq!((moved.resolved, moved.depth), (&*b, 3));
        assert_eq!(moved.id.unwrap(), 2);
    }

    #[test]
    fn identities_are_shared_while_the_same_and_follow_every_change() {
        let prefix = |ip: &str| AddrPrefix::host(ip.parse::<IpAddr>().unwrap());
        let mut kept = KeptIdentities::default();
        let one: BTreeMap<_, _> = [(prefix("10.0.0.1"), 5)].into();
        let first = kept.of(&one);
        assert_eq!(first.len(), 1);
        assert_eq!(first[&(128, prefix("10.0.0.1").addr)], 5);
        assert!(Arc::ptr_eq(&first, &kept.of(&one.clone())));
        let moved: BTreeMap<_, _> = [(prefix("10.0.0.1"), 6)].into();
        let second = kept.of(&moved);
        assert_eq!(second[&(128, prefix("10.0.0.1").addr)], 6);
        assert!(kept.of(&BTreeMap::new()).is_empty());
    }
}
