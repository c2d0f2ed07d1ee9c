//! Where a redirected connection was going: the kernel files it under the
//! client's network namespace, address and port when the connection's SYN
//! leaves (`ebpf/src/mesh.rs`); the outbound listener takes it from there,
//! once, and only while it is fresh.
//!
//! The entry is taken with one `BPF_MAP_LOOKUP_AND_DELETE_ELEM`, which
//! copies and unlinks it under its bucket's lock. A lookup, then a delete,
//! would copy an LRU element the kernel may be handing to another
//! connection at that moment (its free lists do not wait for readers): a
//! stranger's destination, or its endpoint and so its identity.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    time::Duration,
};

use aya::maps::{MapData, MapError, MapType};
use portcullis_common::{mesh, MeshClientKey, MeshOriginal, MESH_ORIGINAL_MAP};

use crate::policy::compile::{addr16, addr_from16};

#[derive(Debug, thiserror::Error)]
pub enum OriginalError {
    #[error("opening pinned map {path}; are the kernel programs loaded?")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: MapError,
    },
    #[error(
        "pinned map {path} is not the LRU hash of client → original destination this agent \
         reads (pinned by another version?)"
    )]
    Layout { path: std::path::PathBuf },
    #[error("taking an entry out of map {MESH_ORIGINAL_MAP}")]
    Read {
        #[source]
        source: io::Error,
    },
}

/// A redirected connection's original destination and the endpoint that
/// made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Original {
    pub destination: SocketAddr,
    pub endpoint_id: u32,
}

/// What the kernel had filed for an accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    Fresh(Original),
    /// Filed longer ago than [`mesh::ORIGINAL_MAX_AGE_NS`]: left by a
    /// connection the listener never accepted, not this one's.
    Stale {
        age: Duration,
    },
    /// Nothing filed: the kernel did not redirect this connection.
    Missing,
}

pub struct Originals {
    map: MapData,
}

impl Originals {
    pub fn open(pin_dir: &Path) -> Result<Self, OriginalError> {
        let path = pin_dir.join(MESH_ORIGINAL_MAP);
        let map = MapData::from_pin(&path).map_err(|source| OriginalError::Open {
            path: path.clone(),
            source,
        })?;
        // The take below writes what the kernel copies into a value of
        // ours: the pinned map must be the LRU hash of exactly our layout.
        let info = map.info().map_err(|source| OriginalError::Open {
            path: path.clone(),
            source,
        })?;
        let fits = matches!(info.map_type(), Ok(MapType::LruHash))
            && info.key_size() as usize == std::mem::size_of::<MeshClientKey>()
            && info.value_size() as usize == std::mem::size_of::<MeshOriginal>();
        if !fits {
            return Err(OriginalError::Layout { path });
        }
        Ok(Self { map })
    }

    /// Takes the entry of the client at `client` in the namespace with
    /// `netns_cookie`: each connection's entry is read once.
    pub fn take(&mut self, netns_cookie: u64, client: SocketAddr) -> Result<Taken, OriginalError> {
        let key = MeshClientKey {
            netns_cookie,
            addr: addr16(client.ip()),
            port: client.port(),
            _pad: [0; 6],
        };
        let value = match lookup_and_delete(&self.map, &key) {
            Ok(Some(v)) => v,
            Ok(None) => return Ok(Taken::Missing),
            Err(source) => return Err(OriginalError::Read { source }),
        };
        Ok(judge_age(
            value,
            crate::clock::read_ns(libc::CLOCK_MONOTONIC),
        ))
    }
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (uapi/linux/bpf.h), which aya 0.14
/// offers for queues and stacks only.
fn lookup_and_delete(map: &MapData, key: &MeshClientKey) -> io::Result<Option<MeshOriginal>> {
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    /// The map-element part of `union bpf_attr`.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = MeshOriginal::default();
    let attr = ElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: key as *const MeshClientKey as u64,
        value: &mut value as *mut MeshOriginal as u64,
        flags: 0,
    };
    // SAFETY: `attr` names a live map descriptor, a key and a value buffer
    // of the map's sizes (its layout is checked at load, ABI_VERSION).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if ret == 0 {
        return Ok(Some(value));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(err)
    }
}

/// The entry as found at `now_ns` (CLOCK_MONOTONIC, the clock of
/// `bpf_ktime_get_ns`). One filed "after" now is taken as stale too: the
/// clocks are the same, so that cannot happen honestly.
fn judge_age(value: MeshOriginal, now_ns: u64) -> Taken {
    match now_ns.checked_sub(value.filed_ns) {
        Some(age) if value.filed_ns != 0 && age <= mesh::ORIGINAL_MAX_AGE_NS => {
            Taken::Fresh(Original {
                destination: SocketAddr::new(addr_from16(value.addr), value.port),
                endpoint_id: value.endpoint_id,
            })
        }
        age => Taken::Stale {
            age: Duration::from_nanos(age.unwrap_or(0)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filed_at(filed_ns: u64) -> MeshOriginal {
        MeshOriginal {
            addr: addr16("10.0.0.7".parse().unwrap()),
            port: 80,
            endpoint_id: 3,
            filed_ns,
            ..Default::default()
        }
    }

    #[test]
    fn a_fresh_entry_names_its_destination() {
        let now = 50 * mesh::ORIGINAL_MAX_AGE_NS;
        let taken = judge_age(filed_at(now - mesh::ORIGINAL_MAX_AGE_NS), now);
        assert_eq!(
            taken,
            Taken::Fresh(Original {
                destination: "10.0.0.7:80".parse().unwrap(),
                endpoint_id: 3
            })
        );
    }

    #[test]
    fn old_unstamped_and_future_entries_are_stale() {
        let now = 50 * mesh::ORIGINAL_MAX_AGE_NS;
        for filed in [now - mesh::ORIGINAL_MAX_AGE_NS - 1, 0, now + 1] {
            assert!(
                matches!(judge_age(filed_at(filed), now), Taken::Stale { .. }),
                "filed at {filed}, now {now}"
            );
        }
    }

    #[test]
    fn ipv4_clients_are_keyed_mapped_like_the_kernel_files_them() {
        assert_eq!(
            addr16("127.0.0.1".parse().unwrap()),
            portcullis_common::ipv4_mapped([127, 0, 0, 1])
        );
        assert_eq!(
            addr_from16(addr16("::1".parse().unwrap())),
            "::1".parse::<std::net::IpAddr>().unwrap()
        );
    }
}
