//! The inbound side of one meshed pod: HBONE connections arrive on its
//! port 15008; each CONNECT is checked (it names this pod, the client's
//! certificate belongs to the pod at the client's address, policy allows
//! that pod to reach this port) and handed to the application from the
//! client's own address, so the application, the counters and `flows`
//! see the real client.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use futures::{future::BoxFuture, FutureExt};
use hyper::StatusCode;
use portcullis_common::{mesh, DIRECTION_INGRESS, PROTO_TCP, VERDICT_DENY};
use tokio::{net::TcpStream, sync::watch};

use crate::{bpf::inspect::KernelView, metrics::MeshMetrics, reconcile::addr16};

use super::{
    authz::IdentityRules,
    connections::{self, ConnectionRecord, ConnectionTable},
    handovers::{Handovers, Registration},
    hbone::{InboundHandler, InboundRequest, Opened, Refusal},
    netns::{set_int_option, PodNetns},
    plan::{LocalPod, MeshPlan},
};

/// Decides and opens the connections HBONE clients ask one pod for.
pub struct InboundPod {
    pub pod: LocalPod,
    pub cgroup_id: u64,
    pub netns: Arc<PodNetns>,
    pub plan: watch::Receiver<Arc<MeshPlan>>,
    pub kernel: Arc<Mutex<KernelView>>,
    /// Where each hand-over is registered for the kernel, which trusts the
    /// mark only on a registered tuple.
    pub handovers: Handovers,
    /// Rules naming identities, when some policy has them.
    pub identity_rules: watch::Receiver<Option<Arc<IdentityRules>>>,
    pub connections: ConnectionTable,
    pub metrics: MeshMetrics,
}

fn refusal(status: StatusCode, reason: &'static str, message: String) -> Refusal {
    Refusal {
        status,
        reason,
        message,
    }
}

impl InboundPod {
    /// Everything but the connection itself: what may be refused, and what
    /// policy says of the flow.
    fn check(&self, req: &InboundRequest) -> Result<Ruling, Refusal> {
        let pod = &self.pod;
        if !pod.owns(req.authority.ip()) {
            return Err(refusal(
                StatusCode::BAD_REQUEST,
                "wrong_destination",
                format!(
                    "{} is not pod {} ({})",
                    req.authority, pod.reference, pod.ip
                ),
            ));
        }
        let port = req.authority.port();
        if port == mesh::INBOUND_PORT || port == mesh::OUTBOUND_PORT || port == 0 {
            return Err(refusal(
                StatusCode::BAD_REQUEST,
                "reserved_port",
                format!("port {port} belongs to the mesh, not to the application"),
            ));
        }
        // The certificate must be that of the pod at the client's address:
        // a client cannot borrow another pod's address to meet an
        // address-based rule.
        let source = req.from.ip();
        let owner = self.plan.borrow().peer(source).cloned();
        match owner {
            Some(peer) if peer.id == req.peer.id => {}
            Some(peer) => {
                return Err(refusal(
                    StatusCode::FORBIDDEN,
                    "identity_mismatch",
                    format!(
                        "the client's certificate names {} but {source} is pod {} ({})",
                        req.peer.id, peer.reference, peer.id
                    ),
                ))
            }
            None => {
                return Err(refusal(
                    StatusCode::FORBIDDEN,
                    "unknown_source",
                    format!(
                        "{source} is not a meshed pod ({} connected from it)",
                        req.peer.id
                    ),
                ))
            }
        }
        let rules = self.identity_rules.borrow().clone();
        if let Some(allowed) =
            rules.and_then(|r| r.ruling(source, &req.peer.id, req.authority.ip(), port))
        {
            return Ok(if allowed {
                Ruling::IdentityAllows
            } else {
                Ruling::IdentityDenies
            });
        }
        let kernel = self.kernel.lock().unwrap_or_else(|e| e.into_inner());
        let unavailable = |what: &str| {
            refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_programmed",
                format!("pod {} {what}", pod.reference),
            )
        };
        let ep = kernel
            .endpoint(self.cgroup_id)
            .map_err(|e| unavailable(&format!("cannot be judged: {e}")))?
            .ok_or_else(|| unavailable("is not programmed yet"))?;
        let decision = kernel
            .decide(&ep, DIRECTION_INGRESS, PROTO_TCP, addr16(source), port)
            .map_err(|e| unavailable(&format!("cannot be judged: {e}")))?;
        Ok(if decision.verdict == VERDICT_DENY {
            Ruling::Denied
        } else {
            Ruling::KernelAllows
        })
    }

    /// Connects to the application from the client's address: a
    /// transparent socket in the pod's namespace, marked so the kernel
    /// judges it as the client's own connection (or, with [`mesh::MARK`],
    /// lets it through as judged here) and routes the replies back to it.
    /// The tuple is registered with its mark between bind and connect, for
    /// as long as the connection lives.
    async fn connect(
        &self,
        client: IpAddr,
        to: SocketAddr,
        mark: u32,
    ) -> std::io::Result<(TcpStream, Registration)> {
        if client.is_ipv4() != to.is_ipv4() {
            // The pod has no address of the client's family.
            return Err(std::io::Error::from(std::io::ErrorKind::AddrNotAvailable));
        }
        let socket = self
            .netns
            .run(move || {
                let s = if client.is_ipv4() {
                    let s = tokio::net::TcpSocket::new_v4()?;
                    set_int_option(&s, libc::SOL_IP, libc::IP_TRANSPARENT, 1)?;
                    s
                } else {
                    let s = tokio::net::TcpSocket::new_v6()?;
                    set_int_option(&s, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1)?;
                    s
                };
                set_int_option(&s, libc::SOL_SOCKET, libc::SO_MARK, mark as i32)?;
                s.bind(SocketAddr::new(client, 0))?;
                Ok(s)
            })
            .await
            .map_err(std::io::Error::other)??;
        let registration = self
            .handovers
            .register(socket.local_addr()?, to, mark)
            .map_err(std::io::Error::other)?;
        let stream = socket.connect(to).await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, registration))
    }

    /// Hands an allowed flow to the application.
    async fn hand_over(
        &self,
        req: &InboundRequest,
        ruling: Ruling,
    ) -> Result<(TcpStream, Registration), Refusal> {
        let port = req.authority.port();
        let client = req.from.ip();
        let to = req.authority;
        let failed = |e: std::io::Error| {
            refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "connect_failed",
                format!("connecting to {}:{port}: {e}", self.pod.reference),
            )
        };
        let denied = || {
            refusal(
                StatusCode::FORBIDDEN,
                "policy_denied",
                format!(
                    "policy denies {} ({client}) → {}:{port}",
                    req.peer.id, self.pod.reference
                ),
            )
        };
        match ruling {
            Ruling::IdentityAllows => self.connect(client, to, mesh::MARK).await.map_err(failed),
            Ruling::IdentityDenies => Err(denied()),
            Ruling::KernelAllows => self
                .connect(client, to, mesh::MARK_JUDGE)
                .await
                .map_err(failed),
            Ruling::Denied => {
                // Shown to the kernel all the same, so its counters and flow
                // events record the refused flow exactly as they would the
                // client's plaintext attempt; it drops the SYN. Should the
                // policy have changed since the check, the kernel's word
                // stands and the connection is used.
                let witness =
                    tokio::time::timeout(WITNESS_WAIT, self.connect(client, to, mesh::MARK_JUDGE))
                        .await;
                match witness {
                    Ok(Ok(opened)) => Ok(opened),
                    _ => Err(denied()),
                }
            }
        }
    }
}

/// What policy says of a flow the inbound proxy was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ruling {
    /// The kernel's maps allow it (or audit it): the kernel judges the
    /// handover itself, and counts it.
    KernelAllows,
    Denied,
    /// A rule naming the client's proven identity allows what the kernel,
    /// blind to identities, would not: the handover passes as judged.
    IdentityAllows,
    /// A rule naming the client's identity denies it.
    IdentityDenies,
}

/// How long a denied flow's witness connection waits: the kernel judges
/// the SYN as loopback delivers it, well within this.
const WITNESS_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// What the HBONE server calls: the pod's checks, then the connection.
pub struct InboundGate(pub Arc<InboundPod>);

impl InboundHandler for InboundGate {
    fn open(&self, req: InboundRequest) -> BoxFuture<'static, Result<Opened, Refusal>> {
        let pod = self.0.clone();
        async move {
            let record = ConnectionRecord {
                direction: "inbound".into(),
                pod: pod.pod.reference.to_string(),
                from: req.from.to_string(),
                to: req.authority.to_string(),
                transport: "mtls".into(),
                local_identity: pod.pod.id.to_string(),
                peer_identity: Some(req.peer.id.to_string()),
                peer_serial: Some(req.peer.serial.clone()),
                peer_not_after: Some(connections::unix(req.peer.not_after)),
                since: connections::unix(std::time::SystemTime::now()),
            };
            let (app, registration) = pod.open(req).await?;
            let tracked = pod.connections.track(record);
            Ok(Opened {
                app,
                keep: Some(Box::new((tracked, registration))),
            })
        }
        .boxed()
    }
}

impl InboundPod {
    async fn open(&self, req: InboundRequest) -> Result<(TcpStream, Registration), Refusal> {
        let mode = self.pod.mode.as_str();
        let opened = match self.check(&req) {
            Ok(ruling) => self.hand_over(&req, ruling).await,
            Err(r) => Err(r),
        };
        match &opened {
            Ok(_) => self.metrics.connection("inbound", mode, "mtls"),
            Err(r) => {
                self.metrics.connection("inbound", mode, "refused");
                self.metrics.failure("inbound", r.reason);
                tracing::info!(
                    pod = %self.pod.reference,
                    peer = %req.peer.id,
                    reason = r.reason,
                    "refused: {}",
                    r.message
                );
            }
        }
        opened
    }
}
