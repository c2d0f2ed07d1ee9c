//! The outbound side of one meshed pod: its redirected TCP connects arrive
//! on loopback port 15001 in its namespace. Each is looked up (where was
//! it going?) and carried over HBONE when the destination is a meshed pod,
//! or passed through in plaintext when it is outside the mesh. A meshed
//! destination that cannot be reached over mTLS is a refused connection,
//! never a plaintext one.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::FutureExt;
use portcullis_common::mesh;
use tokio::{
    io::copy_bidirectional,
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, info};

use crate::metrics::MeshMetrics;

use super::{
    connections::{self, ConnectionRecord, ConnectionTable},
    counted::Counted,
    hbone::{self, HbonePool, LocalIdentity},
    netns::PodNetns,
    original::{Originals, Taken},
    plan::{LocalPod, MeshPlan},
};

pub struct OutboundPod {
    pub pod: LocalPod,
    pub netns: Arc<PodNetns>,
    /// The cookie of the pod's network namespace, as the kernel files
    /// redirected connections under it.
    pub netns_cookie: u64,
    pub identity: LocalIdentity,
    pub plan: watch::Receiver<Arc<MeshPlan>>,
    pub originals: Arc<Mutex<Originals>>,
    pub pool: Arc<HbonePool>,
    pub connections: ConnectionTable,
    pub metrics: MeshMetrics,
}

impl OutboundPod {
    /// Accepts until the listener fails or the task is aborted.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((tcp, from)) => {
                    tokio::spawn(self.clone().proxy(tcp, from));
                }
                Err(e) => {
                    info!(pod = %self.pod.reference, "outbound listener: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn proxy(self: Arc<Self>, app: TcpStream, from: SocketAddr) {
        let mode = self.pod.mode.as_str();
        // Requests and replies are small on keep-alive connections: no
        // Nagle delay on either side of the proxy.
        let _ = app.set_nodelay(true);
        let taken = self
            .originals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(self.netns_cookie, from);
        let original = match taken {
            Ok(Taken::Fresh(o)) => o,
            Ok(Taken::Stale { age }) => {
                debug!(pod = %self.pod.reference, client = %from, ?age, "stale original destination");
                self.refuse(app, "stale_original_destination");
                return;
            }
            Ok(Taken::Missing) | Err(_) => {
                // Not redirected by the kernel (a process connecting to the
                // listener itself), or its record was lost: going nowhere.
                self.refuse(app, "no_original_destination");
                return;
            }
        };
        let destination = original.destination;
        let peer = self.plan.borrow().peer(destination.ip()).cloned();
        let _active = self.metrics.open("outbound");
        let netns = self.netns.clone();
        let mut app = Counted::new(app);
        let _relayed = match peer {
            Some(peer) => {
                let hbone = SocketAddr::new(destination.ip(), mesh::INBOUND_PORT);
                let dial = move || async move { dial(&netns, hbone).await }.boxed();
                let opened = self
                    .pool
                    .open(
                        &self.identity,
                        hbone,
                        destination,
                        self.pod.address_like(destination.ip()),
                        Some(&peer.id),
                        dial,
                    )
                    .await;
                match opened {
                    Ok(mut tunnel) => {
                        self.metrics.connection("outbound", mode, "mtls");
                        let _tracked = self.connections.track(ConnectionRecord {
                            peer_identity: Some(tunnel.peer.id.to_string()),
                            peer_serial: Some(tunnel.peer.serial.clone()),
                            peer_not_after: Some(connections::unix(tunnel.peer.not_after)),
                            ..self.record(from, destination, "mtls")
                        });
                        let close = tunnel.close_signal();
                        hbone::relay(&mut app, &mut tunnel, &close).await
                    }
                    Err(e) => {
                        debug!(pod = %self.pod.reference, %destination, "HBONE: {e}");
                        self.refuse(app.into_inner(), e.reason());
                        return;
                    }
                }
            }
            None => match dial(&netns, destination).await {
                Ok(mut upstream) => {
                    let _ = upstream.set_nodelay(true);
                    self.metrics.connection("outbound", mode, "passthrough");
                    let _tracked =
                        self.connections
                            .track(self.record(from, destination, "passthrough"));
                    copy_bidirectional(&mut app, &mut upstream).await
                }
                Err(_) => {
                    self.refuse(app.into_inner(), "connect_failed");
                    return;
                }
            },
        };
        // Counted as carried, whether the relay ended cleanly or in a reset.
        self.metrics.relayed("outbound", app.bytes());
    }

    /// The table entry of a connection from `from` (on loopback: the port
    /// is the client's) to `destination`, without a peer.
    fn record(
        &self,
        from: SocketAddr,
        destination: SocketAddr,
        transport: &str,
    ) -> ConnectionRecord {
        ConnectionRecord {
            direction: "outbound".into(),
            pod: self.pod.reference.to_string(),
            from: SocketAddr::new(self.pod.address_like(destination.ip()), from.port()).to_string(),
            to: destination.to_string(),
            transport: transport.into(),
            local_identity: self.pod.id.to_string(),
            peer_identity: None,
            peer_serial: None,
            peer_not_after: None,
            since: connections::unix(std::time::SystemTime::now()),
        }
    }

    /// Resets the application's connection: it sees the failure at once.
    fn refuse(&self, app: TcpStream, reason: &'static str) {
        self.metrics
            .connection("outbound", self.pod.mode.as_str(), "refused");
        self.metrics.failure("outbound", reason);
        // A zero linger is an abortive close (RST): it never blocks.
        #[allow(deprecated)]
        let _ = app.set_linger(Some(Duration::ZERO));
        drop(app);
    }
}

/// Connects from inside the pod's namespace (the agent's sockets are never
/// redirected: its cgroup is not a pod's).
async fn dial(netns: &PodNetns, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = netns
        .run(move || match to {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        })
        .await
        .map_err(std::io::Error::other)??;
    socket.connect(to).await
}
