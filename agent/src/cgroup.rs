//! cgroup v2 facts: where the unified hierarchy is mounted, and cgroup ids.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading /proc/self/mountinfo")]
    MountInfo {
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no cgroup v2 hierarchy is mounted; Portcullis needs cgroup v2 \
         (mount -t cgroup2 none /sys/fs/cgroup/unified)"
    )]
    NoCgroup2,
    #[error(
        "{path} is not a cgroup v2 hierarchy, and neither is {path}/unified \
         (no cgroup.controllers file); pass the host's cgroup2 mount"
    )]
    NotCgroup2 { path: PathBuf },
    #[error("cgroup {path} does not exist or cannot be read")]
    Missing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The mount point of the cgroup v2 (unified) hierarchy, read from
/// mountinfo: it is /sys/fs/cgroup on pure v2 hosts and often
/// /sys/fs/cgroup/unified on hybrid ones.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|source| CgroupError::MountInfo { source })?;
    parse_cgroup2_mount(&info).ok_or(CgroupError::NoCgroup2)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mountpoint options... - fstype source
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mountpoint = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mountpoint))
    })
}

/// The cgroup v2 hierarchy at `path`: the path itself, or `unified/` below
/// it on a hybrid host (cgroup v1 controllers at the top).
pub fn cgroup2_at(path: &Path) -> Result<PathBuf, CgroupError> {
    [path.to_path_buf(), path.join("unified")]
        .into_iter()
        .find(|p| p.join("cgroup.controllers").is_file())
        .ok_or_else(|| CgroupError::NotCgroup2 {
            path: path.to_path_buf(),
        })
}

/// Resolves a cgroup path given as absolute, or relative to the cgroup2 mount.
pub fn resolve(mount: &Path, path: &Path) -> PathBuf {
    if path.starts_with(mount) {
        path.to_path_buf()
    } else {
        mount.join(path.strip_prefix("/").unwrap_or(path))
    }
}

/// How many levels below the hierarchy's root a resolved cgroup path lies
/// (the root is 0): the kernel finds endpoints only down to
/// [`portcullis_common::MAX_CGROUP_DEPTH`].
pub fn depth(mount: &Path, resolved: &Path) -> usize {
    resolved
        .strip_prefix(mount)
        .map_or(0, |rest| rest.components().count())
}

/// The deepest ancestor of a resolved cgroup path (itself included) the
/// kernel's ancestry search reaches.
pub fn deepest_visible(mount: &Path, resolved: &Path) -> PathBuf {
    let limit = portcullis_common::MAX_CGROUP_DEPTH as usize;
    let mut path = resolved.to_path_buf();
    while depth(mount, &path) > limit {
        path.pop();
    }
    path
}

/// The cgroup id the kernel reports for a cgroup v2 directory: its inode.
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| CgroupError::Missing {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_cgroup_is_the_hierarchy_itself_or_unified_below_it() {
        let hybrid = tempfile::tempdir().unwrap();
        fs::create_dir(hybrid.path().join("unified")).unwrap();
        fs::write(hybrid.path().join("unified/cgroup.controllers"), "").unwrap();
        assert_eq!(
            cgroup2_at(hybrid.path()).unwrap(),
            hybrid.path().join("unified")
        );
        let pure = tempfile::tempdir().unwrap();
        fs::write(pure.path().join("cgroup.controllers"), "cpu io").unwrap();
        assert_eq!(cgroup2_at(pure.path()).unwrap(), pure.path());
        let neither = tempfile::tempdir().unwrap();
        let e = cgroup2_at(neither.path()).unwrap_err().to_string();
        assert!(e.contains("not a cgroup v2 hierarchy"), "{e}");
    }

    #[test]
    fn finds_unified_mount_on_hybrid_hosts() {
        let info = "\
25 1 0:23 / /sys/fs/cgroup rw - tmpfs tmpfs rw
30 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
35 25 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/vda rw"),
            None
        );
    }

    #[test]
    fn depth_counts_levels_below_the_root_and_the_kernel_sees_twelve() {
        let mount = Path::new("/sys/fs/cgroup");
        assert_eq!(depth(mount, mount), 0);
        assert_eq!(depth(mount, &mount.join("kubepods.slice/pod1")), 2);
        let deep: PathBuf = (1..=14).fold(mount.to_path_buf(), |p, i| p.join(format!("l{i}")));
        assert_eq!(depth(mount, &deep), 14);
        let visible = deepest_visible(mount, &deep);
        assert_eq!(depth(mount, &visible), 12);
        assert!(deep.starts_with(&visible));
        let shallow = mount.join("a/b");
        assert_eq!(deepest_visible(mount, &shallow), shallow);
    }

    #[test]
    fn resolves_relative_and_absolute_paths() {
        let m = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(resolve(m, Path::new("/lab/x-a")), m.join("lab/x-a"));
        assert_eq!(resolve(m, Path::new("lab/x-a")), m.join("lab/x-a"));
        assert_eq!(resolve(m, &m.join("lab")), m.join("lab"));
    }
}
