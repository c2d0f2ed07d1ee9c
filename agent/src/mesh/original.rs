//! Where a redirected connection was going: the kernel files it under the
//! client's network namespace and port when the connection's SYN leaves
//! (`ebpf/src/mesh.rs`); the outbound listener takes it from there.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
};

use aya::maps::{HashMap, Map, MapData, MapError};
use portcullis_common::{MeshClientKey, MeshOriginal, MESH_ORIGINAL_MAP};

#[derive(Debug, thiserror::Error)]
pub enum OriginalError {
    #[error("opening pinned map {path}; are the kernel programs loaded?")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: MapError,
    },
    #[error("reading map {MESH_ORIGINAL_MAP}")]
    Read {
        #[source]
        source: MapError,
    },
}

/// A redirected connection's original destination and the endpoint that
/// made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Original {
    pub destination: SocketAddr,
    pub endpoint_id: u32,
}

pub struct Originals {
    map: HashMap<MapData, MeshClientKey, MeshOriginal>,
}

impl Originals {
    pub fn open(pin_dir: &Path) -> Result<Self, OriginalError> {
        let path = pin_dir.join(MESH_ORIGINAL_MAP);
        let data = MapData::from_pin(&path).map_err(|source| OriginalError::Open {
            path: path.clone(),
            source,
        })?;
        let map = HashMap::try_from(Map::LruHashMap(data))
            .map_err(|source| OriginalError::Open { path, source })?;
        Ok(Self { map })
    }

    /// Takes the entry of the client at `client` (the listener's view of
    /// it: loopback, so only its family and port tell) in the namespace
    /// with `netns_cookie`: each connection's entry is read once.
    pub fn take(
        &mut self,
        netns_cookie: u64,
        client: std::net::SocketAddr,
    ) -> Result<Option<Original>, OriginalError> {
        let key = MeshClientKey {
            netns_cookie,
            port: client.port(),
            family: if client.is_ipv4() { 4 } else { 6 },
            _pad: [0; 5],
        };
        let value = match self.map.get(&key, 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(source) => return Err(OriginalError::Read { source }),
        };
        let _ = self.map.remove(&key);
        Ok(Some(Original {
            destination: SocketAddr::new(address(value.addr), value.port),
            endpoint_id: value.endpoint_id,
        }))
    }
}

/// The 16-byte kernel form back to an address (IPv4-mapped is IPv4).
pub fn address(addr: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}
