//! The mesh's own threads and runtimes (one for the outbound side, one for
//! the inbound side): follows the plan each sync pass sends, and keeps one
//! inbound and one outbound listener in each local meshed pod's network
//! namespace.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use portcullis_common::mesh;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    bpf::{inspect::KernelView, loader::LoadError},
    cgroup,
    identity::manager::IdentityHandle,
    metrics::MeshMetrics,
    policy::model::{Inventory, PolicyObject, WorkloadRef},
    source::file::error_chain,
    worker::Worker,
};

use super::{
    authz::IdentityRules,
    connections::ConnectionTable,
    handovers::{HandoverError, Handovers},
    hbone::{self, HbonePool, LocalIdentity, TrustInputs, TunnelRegistry},
    inbound::{InboundGate, InboundPod},
    mode::MeshMode,
    netns::{self, PodNetns},
    original::{OriginalError, Originals},
    outbound::OutboundPod,
    plan::{LocalPod, MeshPlan},
};

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("the mesh needs the kernel's connection records")]
    Originals {
        #[source]
        source: OriginalError,
    },
    #[error("the mesh needs the kernel's hand-over table")]
    Handovers {
        #[source]
        source: HandoverError,
    },
    #[error("the mesh needs the kernel's policy maps")]
    Kernel {
        #[source]
        source: LoadError,
    },
    #[error("starting the mesh runtime")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug)]
pub struct MeshOptions {
    pub pin_dir: PathBuf,
    pub cgroup_mount: PathBuf,
    pub trust_domain: String,
    /// Where the live connections are published for `portcullis
    /// connections` (none: not published).
    pub connections_file: Option<PathBuf>,
}

/// How far the mesh is: pods planned, pods whose listeners run and whose
/// certificate is here, and why the others are not ready.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshState {
    pub planned: usize,
    pub ready: usize,
    pub waiting: Vec<String>,
}

impl MeshState {
    /// Every local meshed pod can carry traffic.
    pub fn is_ready(&self) -> bool {
        self.ready == self.planned && self.waiting.is_empty()
    }
}

/// The running mesh. Dropping it closes every listener it opened.
pub struct MeshHandle {
    /// Follows the pods' listeners and certificates.
    pub state: watch::Receiver<MeshState>,
    plan: watch::Sender<Arc<MeshPlan>>,
    identity_rules: watch::Sender<Option<Arc<IdentityRules>>>,
    /// The runtime's problems, with the plan they answer.
    reports: Mutex<mpsc::Receiver<Report>>,
    options: MeshOptions,
    /// Dropped first: its pods' listeners end before the inbound runtime.
    _worker: Worker,
    _inbound: Worker,
}

/// What the runtime made of a plan: the pods it could not mesh, and why.
type Report = (Arc<MeshPlan>, Vec<String>);

/// How long a sync pass waits for the listeners of new pods: they should
/// exist before the kernel starts redirecting to them.
const SYNC_WAIT: Duration = Duration::from_secs(5);

/// How often the connection table is published (when it changed).
const PUBLISH_EVERY: Duration = Duration::from_millis(500);

/// How soon pods that could not be meshed are tried again.
const RETRY: Duration = Duration::from_millis(250);

impl MeshHandle {
    /// Follows `inventory`: starts and stops pods' listeners, and waits for
    /// the runtime's answer to this very plan. Returns the problems (bad
    /// mode labels, pods that cannot be proxied yet).
    pub fn sync(&self, inventory: &Inventory) -> Vec<String> {
        let plan = Arc::new(MeshPlan::new(
            inventory,
            &self.options.trust_domain,
            &self.options.cgroup_mount,
        ));
        let mut problems = plan.problems.clone();
        let reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        self.plan.send_replace(plan.clone());
        let deadline = Instant::now() + SYNC_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match reports.recv_timeout(left) {
                // Answers to earlier plans (retries, new certificates) are stale.
                Ok((answered, more)) if Arc::ptr_eq(&answered, &plan) => {
                    problems.extend(more);
                    break;
                }
                Ok(_) => continue,
                Err(_) => {
                    problems.push("mesh: the listeners of new pods are still starting".into());
                    break;
                }
            }
        }
        problems
    }

    /// Follows the enforced policies, for the rules only the inbound proxy
    /// can judge (identity peers).
    pub fn set_policies(&self, inventory: &Inventory, policies: &[PolicyObject]) {
        self.identity_rules
            .send_replace(IdentityRules::new(inventory, policies).map(Arc::new));
    }
}

/// What every pod's proxies share.
struct Shared {
    certificates: watch::Receiver<crate::identity::manager::Certificates>,
    plan: watch::Receiver<Arc<MeshPlan>>,
    originals: Arc<Mutex<Originals>>,
    handovers: Handovers,
    kernel: Arc<Mutex<KernelView>>,
    identity_rules: watch::Receiver<Option<Arc<IdentityRules>>>,
    connections: ConnectionTable,
    trust: TrustInputs,
    registry: TunnelRegistry,
    metrics: MeshMetrics,
    /// The inbound side's runtime: listeners and HBONE servers run there.
    inbound: tokio::runtime::Handle,
}

/// Starts the mesh on the identities of `identity`.
pub fn start(
    options: MeshOptions,
    identity: &IdentityHandle,
    metrics: MeshMetrics,
) -> Result<MeshHandle, MeshError> {
    let originals =
        Originals::open(&options.pin_dir).map_err(|source| MeshError::Originals { source })?;
    let handovers =
        Handovers::open(&options.pin_dir).map_err(|source| MeshError::Handovers { source })?;
    let kernel =
        KernelView::open(&options.pin_dir).map_err(|source| MeshError::Kernel { source })?;
    let (plan_tx, plan_rx) = watch::channel(Arc::new(MeshPlan::default()));
    let (rules_tx, rules_rx) = watch::channel(None);
    let (report_tx, report_rx) = mpsc::channel();
    let (state_tx, state_rx) = watch::channel(MeshState::default());
    let trust = TrustInputs {
        trust_domain: options.trust_domain.clone(),
        bundle: identity.bundle.clone(),
        revocations: identity.revocations.clone(),
    };
    let certificates = identity.certificates.clone();
    // One thread for the outbound side (and following the plan), one for
    // the inbound side, each running its tasks in turn: what several
    // connections of one side have ready in one turn leaves as one write on
    // the shared HBONE connection, where a work-stealing pool wrote each
    // frame alone as its thread woke (a third fewer syscalls per request).
    let runtime = single_threaded("portcullis-mesh")?;
    let inbound_runtime = single_threaded("portcullis-mesh-in")?;
    let inbound = inbound_runtime.handle().clone();
    let inbound_worker = Worker::spawn("portcullis-mesh-in", inbound_runtime, |stop| async {
        let _ = stop.await;
    })
    .map_err(|source| MeshError::Runtime { source })?;
    let connections = ConnectionTable::default();
    let connections_file = options.connections_file.clone();
    let worker = Worker::spawn("portcullis-mesh", runtime, move |stop| async move {
        let publisher = connections_file.map(|path| {
            let table = connections.clone();
            tokio::spawn(async move {
                loop {
                    if let Err(e) = table.publish_if_changed(&path) {
                        warn!("{}", error_chain(&e));
                    }
                    tokio::time::sleep(PUBLISH_EVERY).await;
                }
            })
        });
        let registry = TunnelRegistry::new();
        let revocations = registry.watch(trust.revocations.clone());
        let shared = Arc::new(Shared {
            certificates,
            plan: plan_rx.clone(),
            originals: Arc::new(Mutex::new(originals)),
            handovers,
            kernel: Arc::new(Mutex::new(kernel)),
            identity_rules: rules_rx,
            connections: connections.clone(),
            trust,
            registry,
            metrics,
            inbound,
        });
        follow(shared, plan_rx, report_tx, state_tx, stop).await;
        revocations.abort();
        if let Some(p) = publisher {
            p.abort();
        }
    })
    .map_err(|source| MeshError::Runtime { source })?;
    Ok(MeshHandle {
        state: state_rx,
        plan: plan_tx,
        identity_rules: rules_tx,
        reports: Mutex::new(report_rx),
        options,
        _worker: worker,
        _inbound: inbound_worker,
    })
}

fn single_threaded(name: &str) -> Result<tokio::runtime::Runtime, MeshError> {
    tokio::runtime::Builder::new_current_thread()
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(|source| MeshError::Runtime { source })
}

/// A pod's listeners, running.
struct RunningPod {
    pod: LocalPod,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RunningPod {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn follow(
    shared: Arc<Shared>,
    mut plan: watch::Receiver<Arc<MeshPlan>>,
    reports: mpsc::Sender<Report>,
    state: watch::Sender<MeshState>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut certificates = shared.certificates.clone();
    let mut running: BTreeMap<WorkloadRef, RunningPod> = BTreeMap::new();
    let mut waiting = false;
    loop {
        // A pod whose first process has not started yet has no namespace
        // to enter: try again shortly, without waiting for a change.
        tokio::select! {
            _ = &mut stop => break,
            changed = plan.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(RETRY), if waiting => {}
            _ = certificates.changed() => {}
        }
        let current = plan.borrow_and_update().clone();
        running.retain(|r, p| current.local.get(r) == Some(&p.pod));
        let mut problems = Vec::new();
        for (reference, pod) in &current.local {
            if running.contains_key(reference) {
                continue;
            }
            match start_pod(&shared, pod).await {
                Ok(tasks) => {
                    info!(pod = %reference, mode = %pod.mode, id = %pod.id, "meshed");
                    running.insert(
                        reference.clone(),
                        RunningPod {
                            pod: pod.clone(),
                            tasks,
                        },
                    );
                }
                Err(e) => problems.push(format!("pod {reference}: not meshed yet: {e}")),
            }
        }
        for mode in [MeshMode::Permissive, MeshMode::Strict] {
            let count = running.values().filter(|p| p.pod.mode == mode).count();
            shared.metrics.set_pods(mode.as_str(), count);
        }
        waiting = !problems.is_empty();
        let issued = certificates.borrow_and_update().clone();
        let uncertified: Vec<String> = running
            .values()
            .filter(|p| !issued.contains_key(&p.pod.id))
            .map(|p| {
                format!(
                    "pod {}: no certificate for {} yet",
                    p.pod.reference, p.pod.id
                )
            })
            .collect();
        state.send_replace(MeshState {
            planned: current.local.len(),
            ready: running.len() - uncertified.len(),
            waiting: problems.iter().cloned().chain(uncertified).collect(),
        });
        let _ = reports.send((current, problems));
    }
}

/// Enters the pod's namespace, prepares it, and opens both listeners.
async fn start_pod(shared: &Arc<Shared>, pod: &LocalPod) -> Result<Vec<JoinHandle<()>>, String> {
    let path = netns::of_cgroup(&pod.cgroup).map_err(|e| error_chain(&e))?;
    let ns = Arc::new(PodNetns::enter(&path).map_err(|e| error_chain(&e))?);
    ns.prepare(pod.ipv6.is_some())
        .await
        .map_err(|e| error_chain(&e))?;
    let cgroup_id = cgroup::cgroup_id(&pod.cgroup).map_err(|e| error_chain(&e))?;
    let (pod_ip, pod_ipv6) = (pod.ip, pod.ipv6);
    let (outbound, inbound) = ns
        .run(move || {
            // On the pod's address, first: binding fails unless this really
            // is the pod's namespace (a process may sit in the pod's cgroup
            // a moment before it enters the namespace).
            let mut inbound = vec![listen(SocketAddr::from((pod_ip, mesh::INBOUND_PORT)))?];
            let mut outbound = vec![listen(SocketAddr::from((
                Ipv4Addr::LOCALHOST,
                mesh::OUTBOUND_PORT,
            )))?];
            if let Some(v6) = pod_ipv6 {
                inbound.push(listen(SocketAddr::from((v6, mesh::INBOUND_PORT)))?);
                outbound.push(listen(SocketAddr::from((
                    Ipv6Addr::LOCALHOST,
                    mesh::OUTBOUND_PORT,
                )))?);
            }
            Ok((outbound, inbound))
        })
        .await
        .map_err(|e| error_chain(&e))?
        .map_err(|e| format!("opening the mesh listeners: {e}"))?;
    let netns_cookie =
        netns::netns_cookie(&outbound[0]).map_err(|e| format!("SO_NETNS_COOKIE: {e}"))?;
    let tokio_listeners = |l: Vec<std::net::TcpListener>| {
        l.into_iter()
            .map(TcpListener::from_std)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())
    };
    let outbound = tokio_listeners(outbound)?;
    let inbound = {
        // Registered with the inbound runtime's reactor, where they are served.
        let _inbound_runtime = shared.inbound.enter();
        tokio_listeners(inbound)?
    };
    let identity = LocalIdentity {
        id: pod.id.clone(),
        certificates: shared.certificates.clone(),
    };
    let out = Arc::new(OutboundPod {
        pod: pod.clone(),
        netns: ns.clone(),
        netns_cookie,
        identity: identity.clone(),
        plan: shared.plan.clone(),
        originals: shared.originals.clone(),
        // One pool per pod: a pooled connection was dialled from one pod's
        // namespace and carries that pod's address.
        pool: Arc::new(HbonePool::new(
            shared.trust.clone(),
            shared.registry.clone(),
        )),
        connections: shared.connections.clone(),
        metrics: shared.metrics.clone(),
    });
    let handler: Arc<dyn hbone::InboundHandler> = Arc::new(InboundGate(Arc::new(InboundPod {
        pod: pod.clone(),
        cgroup_id,
        netns: ns,
        plan: shared.plan.clone(),
        kernel: shared.kernel.clone(),
        handovers: shared.handovers.clone(),
        identity_rules: shared.identity_rules.clone(),
        connections: shared.connections.clone(),
        metrics: shared.metrics.clone(),
    })));
    let inbound_task = |inbound: TcpListener| {
        let (identity, handler) = (identity.clone(), handler.clone());
        let shared = shared.clone();
        let runtime = shared.inbound.clone();
        runtime.spawn(async move {
            loop {
                let (tcp, _) = match inbound.accept().await {
                    Ok(a) => a,
                    Err(e) => {
                        warn!("inbound listener: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (identity, trust, handler, registry, metrics) = (
                    identity.clone(),
                    shared.trust.clone(),
                    handler.clone(),
                    shared.registry.clone(),
                    shared.metrics.clone(),
                );
                tokio::spawn(async move {
                    let _active = metrics.open("inbound");
                    if let Err(e) = hbone::serve(tcp, identity, trust, handler, registry).await {
                        metrics.failure("inbound", e.reason());
                    }
                });
            }
        })
    };
    let mut tasks: Vec<_> = outbound
        .into_iter()
        .map(|l| tokio::spawn(out.clone().serve(l)))
        .collect();
    tasks.extend(inbound.into_iter().map(inbound_task));
    Ok(tasks)
}

/// A listening socket in the calling thread's namespace (std sets
/// SO_REUSEADDR: a restarted agent binds at once, whatever its predecessor
/// left in TIME_WAIT).
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}
