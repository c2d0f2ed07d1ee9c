//! Loads the kernel object, attaches it once at a cgroup v2 root and pins
//! maps and links, so enforcement outlives the agent process.
//!
//! Restart: maps are reused from their pins (the enforced state stays in
//! place); the new programs are attached before the old links are unpinned,
//! so there is no moment without a program on the cgroup.

use std::{
    fs::{self, File},
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::{
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, CgroupSockopt,
        ProgramError, SchedClassifier,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use portcullis_common::{
    State, ABI_VERSION, BACKENDS_MAP, ENDPOINTS_MAP, IDENTITIES_MAP, POLICY_MAP, PROG_CONNECT4,
    PROG_CONNECT6, PROG_EGRESS, PROG_GETPEERNAME4, PROG_GETPEERNAME6, PROG_INGRESS, PROG_RECVMSG4,
    PROG_RECVMSG6, PROG_SENDMSG4, PROG_SENDMSG6, PROG_SETSOCKOPT, PROG_TC_EGRESS, SERVICES_MAP,
    STATE_MAP,
};

use super::{
    frames::{FrameGuard, FrameGuardError},
    pin_lock::{PinDirLock, PinLockError, WAIT_FOR_HOLDER},
    socket_guard::{self, SocketGuardError},
    writer::MapWriter,
};

/// The kernel object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portcullis"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const LINKS_DIR: &str = "links";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this agent was built without its eBPF object (AYA_BUILD_SKIP was set); rebuild it")]
    NoObject,
    #[error(
        "map {map} is pinned with {pinned} entries, but {wanted} were asked for: a pinned map \
         keeps its size so enforcement never lapses across restarts; to resize, stop the \
         agent, run `portcullis uninstall` (pods are not enforced until the agent is back) \
         and start it with the new --map-capacity"
    )]
    PinnedCapacity {
        map: &'static str,
        pinned: u32,
        wanted: u32,
    },
    #[error("{path} is not a BPF filesystem and mounting one there failed")]
    NoBpfFs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "{pin_dir} holds maps of ABI version {found}, this agent uses {expected}; \
         run `portcullis uninstall --pin-dir {pin_dir}` to remove the old state"
    )]
    AbiMismatch {
        pin_dir: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(transparent)]
    PinDirInUse(#[from] PinLockError),
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the eBPF object")]
    Object {
        #[source]
        source: EbpfError,
    },
    #[error("program {name} is missing from the eBPF object or has the wrong type")]
    MissingProgram { name: &'static str },
    #[error("loading or attaching program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("pinning or replacing the link of program {name} at {path}")]
    Link {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("map {map} is missing from the eBPF object")]
    MissingMap { map: &'static str },
    #[error("opening pinned map {path}; is the agent (or lab) running?")]
    PinnedMap {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("accessing map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    /// bpffs directory for pinned maps and links.
    pub pin_dir: PathBuf,
    /// cgroup v2 directory the programs attach to; sockets in its subtree are
    /// candidates for enforcement.
    pub cgroup_root: PathBuf,
    /// Entries of the configurable maps.
    pub capacities: super::capacity::MapCapacities,
}

/// The loaded programs and the map writer.
pub struct Dataplane {
    pub writer: MapWriter,
    /// Owns the program fds; links are pinned and outlive it.
    ebpf: Ebpf,
    frames: FrameGuard,
    /// Why packet sockets are not refused to restricted pods, if they are not.
    socket_guard: Result<(), SocketGuardError>,
    /// This agent is the pin directory's only writer while it lives.
    _lock: PinDirLock,
}

enum Hook {
    SockAddr,
    Skb(CgroupSkbAttachType),
    Sockopt,
}

const PROGRAMS: [(&str, Hook); 11] = [
    (PROG_CONNECT4, Hook::SockAddr),
    (PROG_CONNECT6, Hook::SockAddr),
    (PROG_SENDMSG4, Hook::SockAddr),
    (PROG_SENDMSG6, Hook::SockAddr),
    (PROG_RECVMSG4, Hook::SockAddr),
    (PROG_RECVMSG6, Hook::SockAddr),
    (PROG_GETPEERNAME4, Hook::SockAddr),
    (PROG_GETPEERNAME6, Hook::SockAddr),
    (PROG_INGRESS, Hook::Skb(CgroupSkbAttachType::Ingress)),
    (PROG_EGRESS, Hook::Skb(CgroupSkbAttachType::Egress)),
    (PROG_SETSOCKOPT, Hook::Sockopt),
];

/// How many cgroup programs (and pinned links) the agent attaches; the
/// packet socket guard pins one more link per LSM program (named after it,
/// [`portcullis_common::LSM_PROGRAM_PREFIX`]) where the kernel loads BPF
/// LSM programs.
pub const PROGRAM_COUNT: usize = PROGRAMS.len();

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LoadError {
    let path = path.to_path_buf();
    move |source| LoadError::Io {
        action,
        path,
        source,
    }
}

/// A map pinned by an earlier agent keeps its size (the new programs reuse
/// it, with its entries, so enforcement never lapses); a different size
/// asked for is an error before anything changes.
fn check_pinned_capacities(
    pin_dir: &Path,
    capacities: &super::capacity::MapCapacities,
) -> Result<(), LoadError> {
    for (map, wanted) in capacities.by_map() {
        let path = pin_dir.join(map);
        if !path.exists() {
            continue;
        }
        let pinned = aya::maps::MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map(|info| info.max_entries())
            .map_err(|e| LoadError::Link {
                name: map,
                path: path.clone(),
                source: Box::new(e),
            })?;
        if pinned != wanted {
            return Err(LoadError::PinnedCapacity {
                map,
                pinned,
                wanted,
            });
        }
    }
    Ok(())
}

impl Dataplane {
    pub fn load(opts: &DataplaneOptions) -> Result<Self, LoadError> {
        if OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        Self::load_locked(opts, lock_pin_dir(&opts.pin_dir)?)
    }

    /// [`Dataplane::load`] with the pin directory's lock taken already
    /// ([`lock_pin_dir`]), by a caller that must own the node before it
    /// starts anything else.
    pub fn load_locked(opts: &DataplaneOptions, lock: PinDirLock) -> Result<Self, LoadError> {
        if OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        let links_dir = opts.pin_dir.join(LINKS_DIR);
        fs::create_dir_all(&links_dir).map_err(io("creating", &links_dir))?;
        check_abi(&opts.pin_dir)?;

        check_pinned_capacities(&opts.pin_dir, &opts.capacities)?;
        // The loader holds the kernel's parsed BTF (about 18 MiB here); it is
        // dropped before the socket guard parses its own copy, so the two
        // never sit in memory together (the agent's peak RSS).
        let mut ebpf = {
            let mut loader = EbpfLoader::new();
            loader.default_map_pin_directory(&opts.pin_dir);
            for (map, entries) in opts.capacities.by_map() {
                loader.map_max_entries(map, entries);
            }
            loader
                .load(OBJECT)
                .map_err(|source| LoadError::Object { source })?
        };
        let cgroup = File::open(&opts.cgroup_root).map_err(io("opening", &opts.cgroup_root))?;

        let old_links: Vec<PathBuf> = fs::read_dir(&links_dir)
            .map_err(io("listing", &links_dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        for (name, hook) in PROGRAMS {
            let link = attach(&mut ebpf, name, hook, &cgroup, &links_dir)?;
            let path = links_dir.join(format!("{name}-{stamp}"));
            link.pin(&path).map_err(|e| LoadError::Link {
                name,
                path: path.clone(),
                source: Box::new(e),
            })?;
        }
        // Not fatal: kernels without BPF LSM still get every other guarantee,
        // and the caller reports what is missing.
        let socket_guard = socket_guard::attach(&mut ebpf, &links_dir, stamp);
        // The new programs run; now drop the previous agent's links.
        for path in old_links {
            let unpinned = PinnedLink::from_pin(&path)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                .and_then(|l| l.unpin().map_err(|e| Box::new(e) as _));
            unpinned.map_err(|source| LoadError::Link {
                name: "previous",
                path,
                source,
            })?;
        }

        let writer = MapWriter::new(
            Array::try_from(take_map(&mut ebpf, STATE_MAP)?).map_err(map(STATE_MAP))?,
            HashMap::try_from(take_map(&mut ebpf, ENDPOINTS_MAP)?).map_err(map(ENDPOINTS_MAP))?,
            LpmTrie::try_from(take_map(&mut ebpf, IDENTITIES_MAP)?).map_err(map(IDENTITIES_MAP))?,
            LpmTrie::try_from(take_map(&mut ebpf, POLICY_MAP)?).map_err(map(POLICY_MAP))?,
            HashMap::try_from(take_map(&mut ebpf, SERVICES_MAP)?).map_err(map(SERVICES_MAP))?,
            HashMap::try_from(take_map(&mut ebpf, BACKENDS_MAP)?).map_err(map(BACKENDS_MAP))?,
            opts.capacities.generation(),
        );
        let frames_program: &mut SchedClassifier = ebpf
            .program_mut(PROG_TC_EGRESS)
            .and_then(|p| p.try_into().ok())
            .ok_or(LoadError::MissingProgram {
                name: PROG_TC_EGRESS,
            })?;
        frames_program.load().map_err(|source| LoadError::Program {
            name: PROG_TC_EGRESS,
            source,
        })?;
        let frames = FrameGuard::new(&opts.pin_dir).map_err(|e| LoadError::Link {
            name: PROG_TC_EGRESS,
            path: opts.pin_dir.join(super::frames::POD_LINKS_DIR),
            source: Box::new(e),
        })?;
        Ok(Self {
            writer,
            ebpf,
            frames,
            socket_guard,
            _lock: lock,
        })
    }

    /// Whether the kernel refuses packet sockets to pods ingress policy restricts,
    /// and why not.
    pub fn socket_guard(&self) -> Result<(), &SocketGuardError> {
        self.socket_guard.as_ref().map(|_| ())
    }

    /// Keeps the frame program on the interfaces of the pods whose cgroups
    /// are given (see [`FrameGuard::sync`]).
    pub fn guard_frames(&mut self, cgroups: &[PathBuf]) -> Vec<FrameGuardError> {
        match self
            .ebpf
            .program_mut(PROG_TC_EGRESS)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
        {
            Some(program) => self.frames.sync(program, cgroups),
            None => Vec::new(),
        }
    }
}

pub(super) fn map(map: &'static str) -> impl FnOnce(MapError) -> LoadError {
    move |source| LoadError::Map { map, source }
}

/// Opens the map `name` pinned in `pin_dir`.
pub(super) fn open_pinned(pin_dir: &Path, name: &'static str) -> Result<MapData, LoadError> {
    let path = pin_dir.join(name);
    MapData::from_pin(&path).map_err(|source| LoadError::PinnedMap { path, source })
}

/// A per-CPU counter (index 0 of a per-CPU array), summed over the CPUs.
pub(super) fn per_cpu_total(pin_dir: &Path, name: &'static str) -> Result<u64, LoadError> {
    let counter: aya::maps::PerCpuArray<MapData, u64> =
        aya::maps::PerCpuArray::try_from(Map::PerCpuArray(open_pinned(pin_dir, name)?))
            .map_err(map(name))?;
    Ok(counter.get(&0, 0).map_err(map(name))?.iter().sum())
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, LoadError> {
    ebpf.take_map(name)
        .ok_or(LoadError::MissingMap { map: name })
}

fn attach(
    ebpf: &mut Ebpf,
    name: &'static str,
    hook: Hook,
    cgroup: &File,
    scratch: &Path,
) -> Result<FdLink, LoadError> {
    let err = |source| LoadError::Program { name, source };
    let program = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?;
    // Through bpf_link_create (kernel >= 5.7) a cgroup link always coexists
    // with other programs and the kernel rejects any attach flag; `Single`
    // is aya's name for "no flags".
    let mode = CgroupAttachMode::Single;
    let link = match hook {
        Hook::SockAddr => {
            let p: &mut CgroupSockAddr = program
                .try_into()
                .map_err(|_| LoadError::MissingProgram { name })?;
            p.load().map_err(err)?;
            let id = p.attach(cgroup, mode).map_err(err)?;
            FdLink::try_from(p.take_link(id).map_err(err)?)
        }
        Hook::Skb(attach_type) => {
            let p: &mut CgroupSkb = program
                .try_into()
                .map_err(|_| LoadError::MissingProgram { name })?;
            p.load().map_err(err)?;
            let id = p.attach(cgroup, attach_type, mode).map_err(err)?;
            FdLink::try_from(p.take_link(id).map_err(err)?)
        }
        Hook::Sockopt => {
            let p: &mut CgroupSockopt = program
                .try_into()
                .map_err(|_| LoadError::MissingProgram { name })?;
            p.load().map_err(err)?;
            let prog = p.fd().map_err(err)?;
            let link = raw_link::cgroup(prog.as_fd(), cgroup.as_fd(), BPF_CGROUP_SETSOCKOPT)
                .map_err(io("attaching program to", &PathBuf::from(name)))?;
            return raw_link::into_fd_link(link, scratch).map_err(|e| LoadError::Link {
                name,
                path: PathBuf::new(),
                source: Box::new(e),
            });
        }
    };
    link.map_err(|e| LoadError::Link {
        name,
        path: PathBuf::new(),
        source: Box::new(e),
    })
}

/// `bpf_attach_type` of cgroup setsockopt programs (uapi/linux/bpf.h).
const BPF_CGROUP_SETSOCKOPT: u32 = 22;

/// Cgroup links aya 0.14 creates but cannot hand out as an [`FdLink`] to
/// pin (sockopt programs): made with the bpf(2) commands directly.
mod raw_link {
    use std::{
        ffi::CString,
        io,
        os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        path::Path,
    };

    use aya::programs::links::{FdLink, PinnedLink};

    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_LINK_CREATE: libc::c_long = 28;

    /// `union bpf_attr` is larger; the kernel wants the tail zeroed.
    #[repr(C, align(8))]
    struct Attr([u8; 128]);

    fn bpf(cmd: libc::c_long, attr: &Attr) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a valid, zero-padded bpf_attr for `cmd`.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *const Attr,
                std::mem::size_of::<Attr>(),
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    /// BPF_LINK_CREATE of `prog` on the cgroup `target` (no flags: links
    /// always coexist).
    pub fn cgroup(prog: BorrowedFd, target: BorrowedFd, attach_type: u32) -> io::Result<OwnedFd> {
        let mut attr = Attr([0; 128]);
        attr.0[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
        attr.0[4..8].copy_from_slice(&(target.as_raw_fd() as u32).to_ne_bytes());
        attr.0[8..12].copy_from_slice(&attach_type.to_ne_bytes());
        let fd = bpf(BPF_LINK_CREATE, &attr)?;
        // SAFETY: the kernel returned a new link file descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// Pins the link at a scratch path in the bpffs directory `scratch`, opens
    /// it back as aya's [`FdLink`] and removes the scratch pin (the link
    /// lives on through the returned descriptor).
    pub fn into_fd_link(link: OwnedFd, scratch: &Path) -> io::Result<FdLink> {
        // No dot: bpffs refuses names with one (EPERM).
        let path = scratch.join(format!("scratch-{}", std::process::id()));
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
        let mut attr = Attr([0; 128]);
        attr.0[0..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
        attr.0[8..12].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
        bpf(BPF_OBJ_PIN, &attr)?;
        let opened = PinnedLink::from_pin(&path).map_err(io::Error::other);
        let _ = std::fs::remove_file(&path);
        Ok(FdLink::from(opened?))
    }
}

/// Mounts bpffs at `dir` unless one is there already.
fn ensure_bpffs(dir: &Path) -> Result<(), LoadError> {
    let is_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
            .unwrap_or(false)
    };
    if is_bpffs(dir) {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(io("creating", dir))?;
    nix::mount::mount(
        Some("bpf"),
        dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| LoadError::NoBpfFs {
        path: dir.to_path_buf(),
        source,
    })
}

/// Makes the pin directory (on a bpffs) and takes its lock: this process
/// is then the only agent writing it, until the lock is dropped.
pub fn lock_pin_dir(pin_dir: &Path) -> Result<PinDirLock, LoadError> {
    ensure_bpffs(pin_dir.parent().unwrap_or(Path::new("/sys/fs/bpf")))?;
    fs::create_dir_all(pin_dir).map_err(io("creating", pin_dir))?;
    Ok(PinDirLock::acquire(pin_dir, WAIT_FOR_HOLDER, || {
        tracing::warn!(
            pins = %pin_dir.display(),
            "another agent holds the pin directory; waiting up to {WAIT_FOR_HOLDER:?} for it to \
             exit"
        )
    })?)
}

/// How long `uninstall` waits for an agent that is exiting.
const UNINSTALL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Refuses to reuse pinned maps that an agent with another map layout wrote.
fn check_abi(pin_dir: &Path) -> Result<(), LoadError> {
    let path = pin_dir.join(STATE_MAP);
    if !path.exists() {
        return Ok(());
    }
    let state: Array<MapData, State> =
        Array::try_from(Map::Array(open_pinned(pin_dir, STATE_MAP)?)).map_err(map(STATE_MAP))?;
    let found = state.get(&0, 0).map_err(map(STATE_MAP))?.abi_version;
    if found != 0 && found != ABI_VERSION {
        return Err(LoadError::AbiMismatch {
            pin_dir: pin_dir.to_path_buf(),
            found,
            expected: ABI_VERSION,
        });
    }
    Ok(())
}

/// Detaches the programs and removes every pinned map and link under
/// `pin_dir`: enforcement stops. Missing state is not an error; a running
/// agent's state is refused (after a moment's wait for it to exit).
pub fn uninstall(pin_dir: &Path) -> Result<(), LoadError> {
    let _lock = match PinDirLock::acquire(pin_dir, UNINSTALL_WAIT, || {}) {
        Err(PinLockError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(())
        }
        locked => locked?,
    };
    super::frames::uninstall(pin_dir).map_err(|e| LoadError::Link {
        name: PROG_TC_EGRESS,
        path: pin_dir.join(super::frames::POD_LINKS_DIR),
        source: Box::new(e),
    })?;
    let links_dir = pin_dir.join(LINKS_DIR);
    if let Ok(entries) = fs::read_dir(&links_dir) {
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            // Unpinning drops the last reference: the link detaches.
            if let Ok(link) = PinnedLink::from_pin(&path) {
                let _ = link.unpin();
            } else {
                fs::remove_file(&path).map_err(io("removing", &path))?;
            }
        }
        fs::remove_dir(&links_dir).map_err(io("removing", &links_dir))?;
    }
    if let Ok(entries) = fs::read_dir(pin_dir) {
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            fs::remove_file(&path).map_err(io("removing", &path))?;
        }
        fs::remove_dir(pin_dir).map_err(io("removing", pin_dir))?;
    }
    Ok(())
}
