//! Attaches the frame program (`pcl_tc_egress`) to the interfaces of every
//! enforced pod. Packet (AF_PACKET) sockets write frames straight to the
//! device, past the cgroup hooks, so this is the one part of enforcement
//! that is per pod rather than per node.
//!
//! A pod's interfaces live in its network namespace, found through a process
//! of its cgroup. The attach happens on a thread of its own that enters
//! that namespace (setns changes only the calling thread), so the agent's
//! other threads never leave their own. Links are tcx links, pinned like
//! the cgroup links: they outlive the agent, and a restart attaches anew
//! before it drops its predecessor's.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::programs::{
    links::{FdLink, LinkOrder, PinnedLink},
    tc::{SchedClassifier, TcAttachOptions, TcAttachType},
};
use nix::sched::{setns, CloneFlags};

/// Where the pod links are pinned, in the pin directory.
pub const POD_LINKS_DIR: &str = "pod-links";
/// How deep below a pod's cgroup to look for one of its processes.
pub(crate) const PROCESS_SEARCH_DEPTH: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameGuardError {
    #[error("no process in cgroup {cgroup} yet, so its network namespace is unknown")]
    NoProcess { cgroup: PathBuf },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("entering the network namespace of {cgroup}")]
    Setns {
        cgroup: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("listing the interfaces of {cgroup}")]
    Interfaces {
        cgroup: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("the thread attaching to the interfaces of {cgroup} panicked")]
    AttachThread { cgroup: PathBuf },
    #[error("attaching the frame program to {interface} of {cgroup}")]
    Attach {
        interface: String,
        cgroup: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A pod's network namespace, by the inode of its nsfs file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Netns(u64);

/// Keeps the frame program attached to every enforced pod's interfaces.
pub struct FrameGuard {
    dir: PathBuf,
    /// The agent's own namespace: a pod sharing it (host network) is never
    /// attached to, or the node's interfaces would be.
    own_netns: Option<Netns>,
    /// Pods attached by this process: cgroup → (namespace, pinned links).
    attached: BTreeMap<PathBuf, (Netns, Vec<PathBuf>)>,
    /// Links a previous agent pinned, dropped once this one has attached.
    stale: BTreeSet<PathBuf>,
}

impl FrameGuard {
    pub fn new(pin_dir: &Path) -> Result<Self, FrameGuardError> {
        let dir = pin_dir.join(POD_LINKS_DIR);
        fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let stale = fs::read_dir(&dir)
            .map_err(io("listing", &dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        Ok(Self {
            dir,
            own_netns: netns_of(Path::new("/proc/self/ns/net")).ok(),
            attached: BTreeMap::new(),
            stale,
        })
    }

    /// Attaches to the pods in `cgroups` not attached yet (or whose
    /// namespace changed) and detaches from pods no longer there. Returns
    /// what could not be done, per pod; those are tried again next time.
    pub fn sync(
        &mut self,
        program: &mut SchedClassifier,
        cgroups: &[PathBuf],
    ) -> Vec<FrameGuardError> {
        let mut problems = Vec::new();
        let wanted: BTreeSet<&PathBuf> = cgroups.iter().collect();
        let gone: Vec<PathBuf> = self
            .attached
            .keys()
            .filter(|c| !wanted.contains(c))
            .cloned()
            .collect();
        for cgroup in gone {
            if let Some((_, links)) = self.attached.remove(&cgroup) {
                unpin_all(&links);
            }
        }
        for cgroup in cgroups {
            let netns = match pod_netns(cgroup) {
                Ok(n) => n,
                Err(e) => {
                    problems.push(e);
                    continue;
                }
            };
            if self.own_netns == Some(netns.1) {
                continue;
            }
            if self
                .attached
                .get(cgroup)
                .is_some_and(|(n, _)| *n == netns.1)
            {
                continue;
            }
            match attach_in(program, cgroup, &netns.0, &self.dir) {
                Ok(links) => {
                    for link in &links {
                        self.stale.remove(link);
                    }
                    if let Some((_, old)) = self.attached.insert(cgroup.clone(), (netns.1, links)) {
                        unpin_all(&old);
                    }
                }
                Err(e) => problems.push(e),
            }
        }
        // The predecessor's links go once every pod that can be has ours.
        if problems.is_empty() {
            unpin_all(
                &std::mem::take(&mut self.stale)
                    .into_iter()
                    .collect::<Vec<_>>(),
            );
        }
        problems
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FrameGuardError {
    let path = path.to_path_buf();
    move |source| FrameGuardError::Io {
        action,
        path,
        source,
    }
}

fn netns_of(path: &Path) -> Result<Netns, FrameGuardError> {
    fs::metadata(path)
        .map(|m| Netns(m.ino()))
        .map_err(io("reading", path))
}

/// The nsfs path and identity of the network namespace of a process in
/// the pod's cgroup (or below it: a pod's containers have cgroups of their
/// own).
fn pod_netns(cgroup: &Path) -> Result<(PathBuf, Netns), FrameGuardError> {
    let pid = first_process(cgroup, PROCESS_SEARCH_DEPTH).ok_or(FrameGuardError::NoProcess {
        cgroup: cgroup.to_path_buf(),
    })?;
    let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let netns = netns_of(&path)?;
    Ok((path, netns))
}

pub(crate) fn first_process(cgroup: &Path, depth: usize) -> Option<u32> {
    let procs = fs::read_to_string(cgroup.join("cgroup.procs")).ok()?;
    // A pid of 0 is one outside this process's pid namespace.
    if let Some(pid) = procs
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .find(|p| *p != 0)
    {
        return Some(pid);
    }
    if depth == 0 {
        return None;
    }
    fs::read_dir(cgroup)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| first_process(&e.path(), depth - 1))
}

/// Attaches to every interface of the namespace at `netns`, loopback
/// included, from a thread that enters it, and pins the links. On `lo` a
/// packet socket could otherwise forge what only the stack and the mesh's
/// inbound proxy put there: a frame from a foreign source, carrying the
/// proxy's mark (any CAP_NET_RAW process may set SO_MARK), which ingress
/// takes for a hand-over the proxy already judged.
fn attach_in(
    program: &mut SchedClassifier,
    cgroup: &Path,
    netns: &Path,
    dir: &Path,
) -> Result<Vec<PathBuf>, FrameGuardError> {
    let ns = File::open(netns).map_err(io("opening", netns))?;
    let tag = cgroup_tag(cgroup);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|source| FrameGuardError::Setns {
                    cgroup: cgroup.to_path_buf(),
                    source,
                })?;
                let interfaces = nix::net::if_::if_nameindex().map_err(|source| {
                    FrameGuardError::Interfaces {
                        cgroup: cgroup.to_path_buf(),
                        source,
                    }
                })?;
                let mut pinned = Vec::new();
                for iface in interfaces.iter() {
                    let name = iface.name().to_string_lossy().into_owned();
                    let attach_err = |source: Box<dyn std::error::Error + Send + Sync>| {
                        FrameGuardError::Attach {
                            interface: name.clone(),
                            cgroup: cgroup.to_path_buf(),
                            source,
                        }
                    };
                    let id = program
                        .attach_with_options(
                            &name,
                            TcAttachType::Egress,
                            TcAttachOptions::TcxOrder(LinkOrder::default()),
                        )
                        .map_err(|e| attach_err(Box::new(e)))?;
                    let link = program.take_link(id).map_err(|e| attach_err(Box::new(e)))?;
                    let fd_link = FdLink::try_from(link).map_err(|e| attach_err(Box::new(e)))?;
                    let path = dir.join(format!("{tag}-{}", iface.index()));
                    let _ = fs::remove_file(&path);
                    fd_link.pin(&path).map_err(|e| attach_err(Box::new(e)))?;
                    pinned.push(path);
                }
                Ok(pinned)
            })
            .join()
            .unwrap_or_else(|_| {
                Err(FrameGuardError::AttachThread {
                    cgroup: cgroup.to_path_buf(),
                })
            })
    })
}

/// A file-name-safe tag for a cgroup: its inode, unique while it exists.
fn cgroup_tag(cgroup: &Path) -> String {
    fs::metadata(cgroup).map_or_else(|_| "gone".into(), |m| format!("cg{}", m.ino()))
}

/// Detaches every pod link under `pin_dir` and removes their directory.
pub fn uninstall(pin_dir: &Path) -> Result<(), FrameGuardError> {
    let dir = pin_dir.join(POD_LINKS_DIR);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(());
    };
    let links: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    unpin_all(&links);
    fs::remove_dir(&dir).map_err(io("removing", &dir))
}

fn unpin_all(links: &[PathBuf]) {
    for path in links {
        // Unpinning drops the last reference: the link detaches.
        match PinnedLink::from_pin(path) {
            Ok(link) => {
                let _ = link.unpin();
            }
            Err(_) => {
                let _ = fs::remove_file(path);
            }
        }
    }
}
