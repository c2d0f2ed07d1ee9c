//! Attaches the BPF LSM programs (see ebpf/src/packet_socket.rs) and tells
//! whether the kernel runs them: `pcl_socket_create` refuses packet
//! (AF_PACKET) sockets to pods ingress policy restricts and XDP sockets to
//! every enforced pod; `pcl_socket_setsockopt` refuses PACKET_QDISC_BYPASS
//! to enforced pods, 32-bit processes included.
//!
//! The programs need a kernel built with `CONFIG_BPF_LSM` and the BPF LSM
//! enabled at boot (`bpf` in the `lsm=` list); attaching succeeds without
//! the latter, but the hooks never run. Neither is true everywhere, so the
//! agent runs on without the refusal, but never silently: the caller gets
//! the reason, to log, publish in the status and show in a metric.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    programs::{links::FdLink, Lsm, ProgramError},
    Btf, BtfError, Ebpf,
};
use portcullis_common::{
    LSM_HOOK_SOCKET_CREATE, LSM_HOOK_SOCKET_SETSOCKOPT, PROG_SOCKET_CREATE, PROG_SOCKET_SETSOCKOPT,
};

/// The LSM programs and their hooks.
pub const LSM_PROGRAMS: [(&str, &str); 2] = [
    (PROG_SOCKET_CREATE, LSM_HOOK_SOCKET_CREATE),
    (PROG_SOCKET_SETSOCKOPT, LSM_HOOK_SOCKET_SETSOCKOPT),
];

/// The kernel's list of active LSMs (securityfs).
pub const LSM_LIST: &str = "/sys/kernel/security/lsm";
const SECURITYFS: &str = "/sys/kernel/security";

#[derive(Debug, thiserror::Error)]
pub enum SocketGuardError {
    #[error("reading the kernel's BTF, which LSM programs are loaded against")]
    Btf {
        #[source]
        source: BtfError,
    },
    #[error("program {program} is missing from the eBPF object or is not an LSM program")]
    MissingProgram { program: &'static str },
    #[error(
        "loading {program} on the LSM hook {hook} (the kernel needs CONFIG_BPF_LSM=y, and the \
         agent CAP_BPF and CAP_PERFMON)"
    )]
    Load {
        program: &'static str,
        hook: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching {program}")]
    Attach {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("pinning the link of {program} at {path}")]
    Pin {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error(
        "the BPF LSM is not enabled in this kernel ({path} lists {active:?}), so the hook never \
         runs; boot with `bpf` added to the lsm= parameter, e.g. lsm={active},bpf"
    )]
    NotEnabled { path: PathBuf, active: String },
    #[error("cannot tell whether the BPF LSM is enabled: {action} {path}")]
    Unknown {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Loads and attaches the programs, pins their links in `links_dir` as
/// `<program>-<stamp>` (with the cgroup links, so they outlive the agent),
/// then checks that the kernel runs them.
pub fn attach(ebpf: &mut Ebpf, links_dir: &Path, stamp: u128) -> Result<(), SocketGuardError> {
    let btf = Btf::from_sys_fs().map_err(|source| SocketGuardError::Btf { source })?;
    for (program_name, hook) in LSM_PROGRAMS {
        let program: &mut Lsm = ebpf
            .program_mut(program_name)
            .and_then(|p| p.try_into().ok())
            .ok_or(SocketGuardError::MissingProgram {
                program: program_name,
            })?;
        program
            .load(hook, &btf)
            .map_err(|source| SocketGuardError::Load {
                program: program_name,
                hook,
                source,
            })?;
        let attach_err = |source| SocketGuardError::Attach {
            program: program_name,
            source,
        };
        let id = program.attach().map_err(attach_err)?;
        let link = FdLink::from(program.take_link(id).map_err(attach_err)?);
        let pin = links_dir.join(format!("{program_name}-{stamp}"));
        link.pin(&pin).map_err(|source| SocketGuardError::Pin {
            program: program_name,
            path: pin,
            source,
        })?;
    }
    bpf_lsm_enabled(Path::new(LSM_LIST))
}

/// Whether `bpf` is among the active LSMs in `list` (the kernel's
/// [`LSM_LIST`]), mounting securityfs first when it is not mounted.
pub fn bpf_lsm_enabled(list: &Path) -> Result<(), SocketGuardError> {
    let unknown = |action, source| SocketGuardError::Unknown {
        action,
        path: list.to_path_buf(),
        source,
    };
    let text = match fs::read_to_string(list) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound && list == Path::new(LSM_LIST) => {
            mount_securityfs().map_err(|e| unknown("mounting securityfs to read", e))?;
            fs::read_to_string(list).map_err(|e| unknown("reading", e))?
        }
        Err(e) => return Err(unknown("reading", e)),
    };
    let active = text.trim();
    if active.split(',').any(|lsm| lsm == "bpf") {
        Ok(())
    } else {
        Err(SocketGuardError::NotEnabled {
            path: list.to_path_buf(),
            active: active.to_string(),
        })
    }
}

fn mount_securityfs() -> io::Result<()> {
    nix::mount::mount(
        Some("securityfs"),
        SECURITYFS,
        Some("securityfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lsm");
        fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn bpf_in_the_active_list_is_enabled() {
        let (_d, path) = list("lockdown,capability,landlock,bpf\n");
        assert!(bpf_lsm_enabled(&path).is_ok());
    }

    #[test]
    fn a_list_without_bpf_says_how_to_enable_it() {
        let (_d, path) = list("lockdown,capability,yama,apparmor\n");
        let e = bpf_lsm_enabled(&path).unwrap_err();
        assert!(
            e.to_string()
                .contains("lsm=lockdown,capability,yama,apparmor,bpf"),
            "{e}"
        );
        // A name that merely contains "bpf" is not the BPF LSM.
        let (_d, path) = list("capability,notbpf\n");
        assert!(matches!(
            bpf_lsm_enabled(&path),
            Err(SocketGuardError::NotEnabled { .. })
        ));
    }

    #[test]
    fn an_unreadable_list_is_reported_not_taken_for_enabled() {
        let dir = tempfile::tempdir().unwrap();
        let e = bpf_lsm_enabled(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, SocketGuardError::Unknown { .. }), "{e}");
    }
}
