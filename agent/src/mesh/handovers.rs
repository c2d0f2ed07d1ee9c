//! The inbound proxy's hand-overs, registered with the kernel by tuple:
//! the kernel trusts the proxy's socket mark on loopback only for a
//! registered tuple with that mark (`ebpf/src/mesh.rs`), since a process in
//! the pod with CAP_NET_RAW can put the same mark on a packet it forges.
//! A registration lives exactly as long as its connection.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap, Map, MapData, MapError};
use portcullis_common::{MeshHandoverKey, MESH_HANDOVER_MAP};

use crate::reconcile::addr16;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("opening pinned map {path}; are the kernel programs loaded?")]
    Open {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    /// The caller names the connection.
    #[error("registering a hand-over in map {MESH_HANDOVER_MAP} (full?)")]
    Register {
        #[source]
        source: MapError,
    },
}

/// The kernel's table of hand-overs, shared by every pod's inbound side.
#[derive(Clone)]
pub struct Handovers {
    map: Arc<Mutex<HashMap<MapData, MeshHandoverKey, u32>>>,
}

impl Handovers {
    /// Opens the pinned table and empties it: what a previous agent
    /// registered is stale, since its connections died with it (a plain
    /// hash map forgets nothing by itself), and a stale tuple is one a
    /// forger could reuse.
    pub fn open(pin_dir: &Path) -> Result<Self, HandoverError> {
        let path = pin_dir.join(MESH_HANDOVER_MAP);
        let data = MapData::from_pin(&path).map_err(|source| HandoverError::Open {
            path: path.clone(),
            source,
        })?;
        let mut map: HashMap<MapData, MeshHandoverKey, u32> = HashMap::try_from(Map::HashMap(data))
            .map_err(|source| HandoverError::Open { path, source })?;
        let stale: Vec<MeshHandoverKey> = map.keys().filter_map(Result::ok).collect();
        for key in &stale {
            let _ = map.remove(key);
        }
        Ok(Self {
            map: Arc::new(Mutex::new(map)),
        })
    }

    /// Registers the connection from `client` (the proxy's bound socket)
    /// to `app` with `mark`, until the returned registration is dropped.
    pub fn register(
        &self,
        client: SocketAddr,
        app: SocketAddr,
        mark: u32,
    ) -> Result<Registration, HandoverError> {
        let key = handover_key(client, app);
        self.lock()
            .insert(key, mark, 0)
            .map_err(|source| HandoverError::Register { source })?;
        Ok(Registration {
            handovers: self.clone(),
            key,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MapData, MeshHandoverKey, u32>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A registered hand-over; dropping it removes the registration.
pub struct Registration {
    handovers: Handovers,
    key: MeshHandoverKey,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = self.handovers.lock().remove(&self.key);
    }
}

/// The kernel's key for a hand-over: addresses in their 16-byte form
/// (IPv4-mapped for IPv4), as the packet parser gives them.
fn handover_key(client: SocketAddr, app: SocketAddr) -> MeshHandoverKey {
    MeshHandoverKey {
        client_addr: addr16(client.ip()),
        app_addr: addr16(app.ip()),
        client_port: client.port(),
        app_port: app.port(),
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_in_the_parsers_form() {
        let key = handover_key(
            "10.1.0.5:40000".parse().unwrap(),
            "10.1.0.9:8080".parse().unwrap(),
        );
        assert_eq!(
            key.client_addr,
            portcullis_common::ipv4_mapped([10, 1, 0, 5])
        );
        assert_eq!(key.app_addr, portcullis_common::ipv4_mapped([10, 1, 0, 9]));
        assert_eq!((key.client_port, key.app_port), (40000, 8080));
        let v6 = handover_key(
            "[fd00::5]:40000".parse().unwrap(),
            "[fd00::9]:80".parse().unwrap(),
        );
        assert_eq!(
            v6.client_addr,
            "fd00::5".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
    }
}
