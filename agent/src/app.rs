//! Wiring for the standalone agent: file source → reconciler → kernel, on a
//! dedicated thread (map writes are blocking syscalls), with its progress
//! published on a watch channel.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::watch;

mod cgroup_wait;
use cgroup_wait::CgroupWait;
use tracing::{debug, error, info, warn};

use crate::{
    admin::{self, AdminError, AdminServer, AdminState, Exposure, SecureOptions},
    bpf::{frames::FrameGuardError, writer::MapUsage, Dataplane, DataplaneOptions, LoadError},
    cgroup::{self, CgroupError},
    identity::{
        manager::{self as identity_manager, IdentityHandle, IdentityOptions, ManagerError},
        spiffe::SpiffeId,
    },
    memory::{release_freed, TrimWhenQuiet},
    mesh::{
        self,
        runtime::{MeshError, MeshHandle, MeshOptions, MeshState},
    },
    metrics::Metrics,
    policy::model::Inventory,
    reconcile::{PublishedNames, Reconciler},
    source::{
        file::{error_chain, FileSource, FileSourceError},
        kube::{KubeOptions, KubeSource, KubeSourceError},
        wake::Wakeup,
        Revision, Source,
    },
};

/// How long the sync loop sleeps at most without a signal: a safety net
/// for a missed file notification, and the pace of health checks (a
/// source's staleness) that no event announces.
pub const RECHECK: Duration = Duration::from_secs(1);
/// A failed pass is retried after this, doubling up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How soon the frame guard retries pods that had no process.
const MISSING_PROCESS_RETRY: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("finding the cgroup v2 hierarchy")]
    Cgroup {
        #[source]
        source: CgroupError,
    },
    #[error("loading the kernel programs")]
    Load {
        #[source]
        source: LoadError,
    },
    #[error("starting the admin endpoint (/metrics, /healthz, /readyz)")]
    Admin {
        #[source]
        source: AdminError,
    },
    #[error("starting the Kubernetes source")]
    Kube {
        #[source]
        source: KubeSourceError,
    },
    #[error("starting the identity manager")]
    Identity {
        #[source]
        source: ManagerError,
    },
    #[error("starting the mesh (transparent mTLS)")]
    Mesh {
        #[source]
        source: MeshError,
    },
    #[error(
        "reading the last valid policy state (nothing was changed in the kernel: the \
         pinned maps keep enforcing what they held)"
    )]
    State {
        #[source]
        source: FileSourceError,
    },
}

/// Where desired state comes from.
#[derive(Clone)]
pub enum SourceOptions {
    /// Standalone: a directory of policy files and a workloads file.
    Files {
        policies_dir: PathBuf,
        workloads: PathBuf,
    },
    /// The Kubernetes API (a DaemonSet on every node).
    Kubernetes(Box<KubeOptions>),
}

impl std::fmt::Debug for SourceOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Files {
                policies_dir,
                workloads,
            } => f
                .debug_struct("Files")
                .field("policies_dir", policies_dir)
                .field("workloads", workloads)
                .finish(),
            Self::Kubernetes(k) => f
                .debug_struct("Kubernetes")
                .field("node_name", &k.node_name)
                .finish(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub source: SourceOptions,
    pub pin_dir: PathBuf,
    /// The cgroup v2 hierarchy workload cgroups are resolved in; detected
    /// from mountinfo when `None`. In a container, the host's, mounted in.
    pub cgroup_mount: Option<PathBuf>,
    /// Where to attach; the cgroup v2 root when `None`.
    pub cgroup_root: Option<PathBuf>,
    /// Where to publish what endpoint ids and rule cookies mean (JSON).
    pub names_file: Option<PathBuf>,
    /// Where to serve /metrics, /healthz and /readyz; none when `None`.
    /// Port 0 picks a free port (see [`AgentHandle::admin_addr`]).
    pub admin_addr: Option<SocketAddr>,
    /// Serve the admin endpoint over TLS with `/metrics` behind TokenReview
    /// and SubjectAccessReview; Kubernetes source only. Plain when `None`.
    pub admin_secure: Option<SecureOptions>,
    /// Where the last valid and applied version of every object is kept, so
    /// a restarted agent falls back to it (see [`crate::source::state`]);
    /// memory only when `None`.
    pub state_dir: Option<PathBuf>,
    /// Attach the frame program to every enforced pod's interfaces, so
    /// frames of packet sockets are judged (see [`crate::bpf::frames`]).
    /// Needs the pods' processes and the right to enter their network
    /// namespaces.
    pub guard_frames: bool,
    /// Entries of the kernel maps (defaults sized for a large node).
    pub map_capacities: crate::bpf::capacity::MapCapacities,
    /// Certificates for the service accounts of local workloads (see
    /// [`crate::identity::manager`]); none when `None`.
    pub identity: Option<IdentityOptions>,
}

/// What the agent has done so far.
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// What the latest pass read; for files, compare with
    /// [`crate::source::file::fingerprint`].
    pub revision: Revision,
    /// Why the source may be out of date (API unreachable, initial list
    /// pending): the agent is not ready, and keeps enforcing what it has.
    pub degraded: Option<String>,
    /// Passes that reached the kernel.
    pub applied: u64,
    /// Problems of the latest pass (invalid files, failed writes).
    pub problems: Vec<String>,
    /// Local workloads not enforced yet because their cgroup does not exist
    /// (retried every few seconds).
    pub waiting_for_cgroup: Vec<String>,
    /// Enforced pods whose cgroup has no process yet, so the frame program
    /// cannot be attached to their interfaces (retried quickly: a pod's
    /// first process follows its cgroup within moments).
    pub waiting_for_process: Vec<String>,
    pub usage: MapUsage,
    /// Why packet (AF_PACKET) sockets are not refused to pods policy
    /// restricts, nor XDP sockets to enforced pods (the BPF LSM program
    /// cannot run); `None` when they are.
    /// Known at load, so it stands for the agent's whole life.
    pub packet_sockets_unguarded: Option<String>,
    /// Why the latest pass did not reach the kernel (the files could not be
    /// read, compiling or writing failed); `None` when it did.
    pub pass_error: Option<String>,
}

pub struct AgentHandle {
    pub status: watch::Receiver<Status>,
    pub pin_dir: PathBuf,
    pub metrics: Arc<Metrics>,
    /// The identity manager's outputs (certificates, revocations, bundle),
    /// when identity is on.
    pub identity: Option<IdentityHandle>,
    /// How far the mesh is, when identity (and so the mesh) is on.
    pub mesh: Option<watch::Receiver<MeshState>>,
    stop: Arc<AtomicBool>,
    /// Wakes the sync loop, to see `stop` at once.
    wake: Arc<Wakeup>,
    thread: Option<thread::JoinHandle<()>>,
    admin: Option<AdminServer>,
}

impl AgentHandle {
    /// Stops the loop. Enforcement stays in the kernel (pinned).
    pub fn stop(mut self) {
        self.halt();
    }

    /// Where the admin endpoint listens (the bound port when asked for 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::addr)
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(i) = self.identity.take() {
            i.stop();
        }
        if let Some(a) = self.admin.take() {
            a.stop();
        }
    }
}

/// Clears the running flag when the sync loop ends, panics included.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Loads the programs and starts syncing. Errors that stop the agent from
/// enforcing anything are returned here; later problems go to the status.
pub fn start(opts: AgentOptions) -> Result<AgentHandle, AgentError> {
    // Settled before the kernel programs load, so a bad certificate or a
    // secure mode without Kubernetes leaves nothing attached.
    let exposure = match opts.admin_addr {
        Some(_) => Some(exposure(&opts).map_err(|source| AgentError::Admin { source })?),
        None => None,
    };
    // Before anything starts: a second agent on this node's pins must start
    // nothing (not even the identity manager, which would publish over the
    // first's identities file) before it is refused.
    let pin_lock = crate::bpf::loader::lock_pin_dir(&opts.pin_dir)
        .map_err(|source| AgentError::Load { source })?;
    let metrics = Arc::new(Metrics::new());
    // Also before the programs load: a bad CA URL leaves nothing attached.
    let (identity, demand) = match &opts.identity {
        Some(identity) => {
            let (tx, rx) = watch::channel(BTreeSet::new());
            let client = match &opts.source {
                SourceOptions::Kubernetes(k) => Some(k.client.clone()),
                SourceOptions::Files { .. } => None,
            };
            let handle =
                identity_manager::start(identity.clone(), client, rx, metrics.identity.clone())
                    .map_err(|source| AgentError::Identity { source })?;
            (
                Some(handle),
                Some(IdentityDemand {
                    trust_domain: identity.trust_domain.clone(),
                    tx,
                }),
            )
        }
        None => (None, None),
    };
    let mount = match &opts.cgroup_mount {
        Some(m) => m.clone(),
        None => cgroup::cgroup2_mount().map_err(|source| AgentError::Cgroup { source })?,
    };
    let cgroup_root = opts.cgroup_root.clone().unwrap_or_else(|| mount.clone());
    let dataplane = Dataplane::load_locked(
        &DataplaneOptions {
            pin_dir: opts.pin_dir.clone(),
            cgroup_root: cgroup_root.clone(),
            capacities: opts.map_capacities,
        },
        pin_lock,
    )
    .map_err(|source| AgentError::Load { source })?;
    // Loading parsed the kernel's BTF; give those pages back.
    release_freed();
    metrics.maps.set_capacities(&opts.map_capacities);
    let opts_capacity = opts.map_capacities.generation();
    info!(
        cgroup = %cgroup_root.display(),
        pins = %opts.pin_dir.display(),
        "kernel programs attached"
    );
    // The mesh needs the pinned maps the load just made, and identities.
    let mesh = match (&identity, &opts.identity) {
        (Some(handle), Some(options)) => Some(
            mesh::runtime::start(
                MeshOptions {
                    pin_dir: opts.pin_dir.clone(),
                    cgroup_mount: mount.clone(),
                    trust_domain: options.trust_domain.clone(),
                    connections_file: options.connections_file.clone(),
                },
                handle,
                metrics.mesh.clone(),
            )
            .map_err(|source| AgentError::Mesh { source })?,
        ),
        _ => None,
    };
    let mesh_state = mesh.as_ref().map(|m| m.state.clone());
    let unguarded = dataplane.socket_guard().err().map(|e| error_chain(e));
    match &unguarded {
        Some(why) => error!(
            "packet (AF_PACKET) sockets are NOT refused to pods that ingress policy restricts, so \
             such pods can read frames ingress policy drops, and XDP (AF_XDP) sockets are NOT \
             refused to enforced pods, whose frames no program judges on the way out: {why} \
             (docs/policy.md, \"Packet sockets\")"
        ),
        None => info!(
            "packet sockets are refused to pods that ingress policy restricts, and XDP sockets \
             to every enforced pod (BPF LSM)"
        ),
    }
    metrics.guards.set_packet_socket_guard(unguarded.is_none());
    // Counts from before this agent (pinned maps survive restarts) were made
    // under cookie numbers this agent does not know: start from them.
    if let Err(e) = metrics.decisions.baseline(&opts.pin_dir) {
        warn!("metrics: {}", error_chain(&e));
    }
    let (tx, rx) = watch::channel(Status {
        packet_sockets_unguarded: unguarded,
        ..Status::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let wake = Wakeup::new();
    let running = Arc::new(AtomicBool::new(true));
    let admin = match opts.admin_addr.zip(exposure) {
        Some((addr, exposure)) => {
            let server = admin::serve_with(
                addr,
                AdminState {
                    metrics: metrics.clone(),
                    status: rx.clone(),
                    running: running.clone(),
                    pin_dir: opts.pin_dir.clone(),
                },
                exposure,
            )
            .map_err(|source| AgentError::Admin { source })?;
            match server.certificate() {
                Some(cert) => info!(
                    addr = %server.addr(),
                    certificate_sha256 = %admin::tls::fingerprint(cert),
                    "serving /metrics (bearer token, TokenReview + SubjectAccessReview), \
                     /healthz and /readyz over TLS"
                ),
                None => info!(addr = %server.addr(), "serving /metrics, /healthz, /readyz"),
            }
            Some(server)
        }
        None => None,
    };
    let thread = {
        let stop = stop.clone();
        let loop_wake = wake.clone();
        let source: Box<dyn Source> = match &opts.source {
            SourceOptions::Files {
                policies_dir,
                workloads,
            } => match &opts.state_dir {
                Some(dir) => Box::new(
                    FileSource::durable(policies_dir.clone(), workloads.clone(), dir)
                        .map_err(|source| AgentError::State { source })?,
                ),
                None => Box::new(FileSource::new(policies_dir.clone(), workloads.clone())),
            },
            SourceOptions::Kubernetes(k) => {
                exempt_own_cgroup(&opts.pin_dir, &mount, k)?;
                let mut k = (**k).clone();
                if k.state_dir.is_none() {
                    k.state_dir = opts.state_dir.clone();
                }
                Box::new(
                    KubeSource::start(k, &mount).map_err(|source| AgentError::Kube { source })?,
                )
            }
        };
        let names_file = opts.names_file.clone();
        let metrics = metrics.clone();
        let pin_dir = opts.pin_dir.clone();
        let guard_frames = opts.guard_frames;
        let trust_domain = demand.as_ref().map(|d| d.trust_domain.clone());
        thread::Builder::new()
            .name("portcullis-sync".into())
            .spawn(move || {
                let _running = Running(running);
                sync_loop(
                    guard_frames,
                    names_file,
                    source,
                    Reconciler::new(mount)
                        .with_capacity(opts_capacity)
                        .with_trust_domain(trust_domain),
                    dataplane,
                    Observers {
                        status: tx,
                        metrics,
                        pin_dir,
                        demand,
                        mesh,
                    },
                    (&stop, loop_wake),
                )
            })
            .expect("spawning the sync thread")
    };
    Ok(AgentHandle {
        status: rx,
        pin_dir: opts.pin_dir,
        metrics,
        identity,
        mesh: mesh_state,
        stop,
        wake,
        thread: Some(thread),
        admin,
    })
}

/// Plain, or TLS with `/metrics` authorized through the Kubernetes API the
/// source already talks to.
fn exposure(opts: &AgentOptions) -> Result<Exposure, AdminError> {
    let Some(secure) = &opts.admin_secure else {
        return Ok(Exposure::Plain);
    };
    let SourceOptions::Kubernetes(k) = &opts.source else {
        return Err(AdminError::SecureNeedsKubernetes);
    };
    let tls = admin::tls::server_tls(&secure.cert).map_err(|source| AdminError::Tls { source })?;
    let auth = admin::auth::MetricsAuth::new(k.client.clone(), admin::auth::AuthOptions::default());
    Ok(Exposure::Secure {
        tls,
        auth: Arc::new(auth),
    })
}

/// With deny-until-programmed, the agent's own pod must never be denied
/// (it could not reach the API to program itself): it is exempted in the
/// kernel before any watch starts. Without it, any exemption is cleared.
fn exempt_own_cgroup(pin_dir: &Path, mount: &Path, k: &KubeOptions) -> Result<(), AgentError> {
    let id = if k.deny_unprogrammed {
        let own = crate::source::kube::own_cgroup(mount, k)
            .map_err(|source| AgentError::Kube { source })?;
        info!(cgroup = %own.display(), "the agent's own pod is exempt from enforcement");
        cgroup::cgroup_id(&own).map_err(|source| AgentError::Cgroup { source })?
    } else {
        0
    };
    crate::bpf::counters::set_exempt_cgroup(pin_dir, id)
        .map_err(|source| AgentError::Load { source })
}

/// Where the sync loop reports what it did.
struct Observers {
    status: watch::Sender<Status>,
    metrics: Arc<Metrics>,
    /// Where the kernel counters are pinned.
    pin_dir: PathBuf,
    /// Where the identities of local workloads go, when identity is on.
    demand: Option<IdentityDemand>,
    /// The mesh's proxies, when identity is on.
    mesh: Option<MeshHandle>,
}

/// Feeds the identity manager the service accounts with a local pod.
struct IdentityDemand {
    trust_domain: String,
    tx: watch::Sender<BTreeSet<SpiffeId>>,
}

/// The identities of the workloads enforced here, and the workloads whose
/// names make no SPIFFE ID (reported as problems).
pub fn local_identities(
    inventory: &Inventory,
    trust_domain: &str,
) -> (BTreeSet<SpiffeId>, Vec<String>) {
    let mut ids = BTreeSet::new();
    let mut problems = Vec::new();
    for w in inventory.workloads.iter().filter(|w| w.is_local()) {
        match SpiffeId::new(trust_domain, &w.namespace, w.service_account()) {
            Ok(id) => {
                ids.insert(id);
            }
            Err(e) => problems.push(format!("workload {}: no identity: {e}", w.reference())),
        }
    }
    (ids, problems)
}

impl Observers {
    /// A pass succeeded (and reached the kernel if it `wrote`). The
    /// counters are read knowing both the old and the new rule cookies (the
    /// kernel may have counted under either since the flip), then only the
    /// new meanings are kept.
    /// `names_changed`: the pass's names are not the last pass's.
    fn applied(
        &self,
        applied: &crate::reconcile::Applied,
        changed_at: Option<SystemTime>,
        load_time: Duration,
        names_changed: bool,
    ) {
        let m = &self.metrics;
        // Timed to the flip: a pass that changed nothing made none.
        if applied.wrote {
            let flipped = applied.flipped_at.unwrap_or_else(SystemTime::now);
            m.apply
                .succeeded(changed_at.map(|t| flipped.duration_since(t).unwrap_or_default()));
            m.apply.stages(load_time, &applied.timings);
        } else {
            m.apply.unchanged();
        }
        m.maps.set_usage(applied.usage);
        if !applied.wrote && !names_changed {
            // No flip and the same meanings: nothing to attribute anew and
            // nothing gone to retire. At 10,000 rules this was milliseconds
            // that kept the next pass waiting.
            return;
        }
        m.decisions
            .learn_cookie_policies(&applied.names.cookie_policies);
        if let Err(e) = m.refresh(&self.pin_dir) {
            warn!("metrics: {}", error_chain(&e));
        } else {
            // Just counted: retire what endpoints and rules that are gone
            // left in the counters map.
            let (endpoints, cookies) = (&applied.names.endpoints, &applied.names.cookies);
            let keep = |k: &portcullis_common::CounterKey| {
                (k.endpoint_id == portcullis_common::ENDPOINT_ID_NONE
                    || endpoints.contains_key(&k.endpoint_id))
                    && (k.rule_cookie == 0 || cookies.contains_key(&k.rule_cookie))
            };
            match crate::bpf::counters::retire(&self.pin_dir, keep) {
                Ok(0) => {}
                Ok(n) => info!(retired = n, "counters of removed pods and rules retired"),
                Err(e) => warn!("retiring counters: {}", error_chain(&e)),
            }
        }
        m.decisions
            .set_cookie_policies(&applied.names.cookie_policies);
    }

    /// A pass read the workloads: the identity manager follows them.
    fn workloads(&self, inventory: &Inventory) -> Vec<String> {
        let Some(demand) = &self.demand else {
            return Vec::new();
        };
        let (ids, mut problems) = local_identities(inventory, &demand.trust_domain);
        demand.tx.send_if_modified(|current| {
            let changed = *current != ids;
            *current = ids;
            changed
        });
        // After the demand: new pods' certificates are on their way while
        // their listeners open.
        if let Some(mesh) = &self.mesh {
            problems.extend(mesh.sync(inventory));
        }
        problems
    }

    fn publish(&self, status: &Status) {
        if status.pass_error.is_some() {
            self.metrics.apply.failed();
        }
        self.metrics.apply.set_problems(status.problems.len());
        self.status.send_replace(status.clone());
    }
}

/// A stage's duration as the log shows it.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// Writes aside and renames, so readers never see half a file.
fn publish(path: &Path, names: &PublishedNames) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    // Compact: a program reads it (`explain`, `flows`), and at 10,000 rules
    // the indented form was megabytes written after every compile.
    let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    serde_json::to_writer(&mut file, names)?;
    std::io::Write::flush(&mut file)?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// How long after the `failed`-th failed pass in a row the next try
/// comes: 100 ms, doubling, at most 30 s.
fn retry_delay(failed: u32) -> Duration {
    RETRY_FIRST
        .saturating_mul(1 << (failed.clamp(1, 16) - 1))
        .min(RETRY_MAX)
}

/// Attaches the frame program to every enforced pod: the pods without a
/// process yet (waited for), and the problems.
fn guard_frames(dataplane: &mut Dataplane, cgroups: &[PathBuf]) -> (Vec<String>, Vec<String>) {
    let mut waiting = Vec::new();
    let mut problems = Vec::new();
    for e in dataplane.guard_frames(cgroups) {
        let text = error_chain(&e);
        match e {
            FrameGuardError::NoProcess { .. } => waiting.push(text),
            _ => problems.push(text),
        }
    }
    (waiting, problems)
}

fn sync_loop(
    guard_frames_on: bool,
    names_file: Option<PathBuf>,
    mut source: Box<dyn Source>,
    mut reconciler: Reconciler,
    mut dataplane: Dataplane,
    observers: Observers,
    (stop, wake): (&AtomicBool, Arc<Wakeup>),
) {
    let mut seen: Option<Revision> = None;
    let mut status = observers.status.borrow().clone();
    let mut missing_cgroups: Option<CgroupWait> = None;
    let mut missing_processes = false;
    // The cgroups the frame guard follows, and when it last tried.
    let mut guarded: Vec<PathBuf> = Vec::new();
    let mut last_guard = Instant::now();
    let mut last_pass_wall = SystemTime::now();
    // Sources signal changes; the loop sleeps until one comes or a retry
    // is due (no polling of the source).
    source.wake_on_change(wake.clone());
    // A failed pass is tried again, sooner first.
    let mut failed_passes: u32 = 0;
    let mut retry_failed_at: Option<Instant> = None;
    let mut first = true;
    // The names the observers and the names file have: a pass with the
    // same ones (it compiled nothing new) need not publish them again.
    let mut published: Option<Arc<PublishedNames>> = None;
    let mut trim = TrimWhenQuiet::default();
    while !stop.load(Ordering::Relaxed) {
        if !first {
            let mut due = vec![RECHECK];
            due.extend(trim.due_in(Instant::now()));
            if let Some(wait) = &missing_cgroups {
                due.push(wait.due(source.missing_cgroup_retry()));
            }
            if missing_processes {
                due.push(MISSING_PROCESS_RETRY.saturating_sub(last_guard.elapsed()));
            }
            if let Some(at) = retry_failed_at {
                due.push(at.saturating_duration_since(Instant::now()));
            }
            let timeout = due.into_iter().min().unwrap_or(RECHECK);
            if !timeout.is_zero() {
                wake.wait(timeout);
            }
        }
        first = false;
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let degraded = source.degraded();
        observers
            .metrics
            .source
            .set(degraded.is_some(), source.is_report_leader());
        if degraded != status.degraded {
            match &degraded {
                Some(why) => warn!("{why}; enforcing the last applied state"),
                None => info!("source is current again"),
            }
            status.degraded = degraded;
            observers.publish(&status);
        }
        let Some(fp) = source.revision() else {
            continue;
        };
        // A pass that met missing cgroups is retried once one may have
        // appeared: the cgroup comes without anything else changing.
        let every = source.missing_cgroup_retry();
        let retry = missing_cgroups
            .as_mut()
            .is_some_and(|wait| wait.pass_now(&*source, every))
            || retry_failed_at.is_some_and(|at| Instant::now() >= at);
        let changed = seen.as_ref() != Some(&fp);
        if !changed && !retry && trim.take(Instant::now()) {
            // A lull after passes: give back the compiles they replaced.
            let started = Instant::now();
            release_freed();
            debug!(ms = millis(started.elapsed()), "freed memory given back");
        }
        if !changed && !retry && missing_processes && last_guard.elapsed() >= MISSING_PROCESS_RETRY
        {
            // Only the frame guard waits: attach it again, no new pass.
            last_guard = Instant::now();
            let (waiting, problems) = guard_frames(&mut dataplane, &guarded);
            missing_processes = !waiting.is_empty();
            let new: Vec<String> = problems
                .into_iter()
                .filter(|p| !status.problems.contains(p))
                .collect();
            if waiting != status.waiting_for_process || !new.is_empty() {
                for p in &new {
                    error!("{p}");
                }
                status.waiting_for_process = waiting;
                status.problems.extend(new);
                observers.publish(&status);
            }
        }
        if changed || retry {
            let previous_pass = last_pass_wall;
            last_pass_wall = SystemTime::now();
            // The source event: when the newest change was written. A file
            // modified before the previous pass (copied with its old time)
            // could not have been seen earlier than that pass; a deletion
            // leaves no time, so its detection stands in. Retries have none.
            let changed_at = changed.then(|| {
                source
                    .changed_at(&fp, seen.as_ref())
                    .map_or(last_pass_wall, |t| t.max(previous_pass))
            });
            status.revision = fp.clone();
            status.problems.clear();
            status.waiting_for_cgroup.clear();
            status.waiting_for_process.clear();
            status.pass_error = None;
            let load_started = Instant::now();
            match source.load() {
                Ok(snapshot) => {
                    let load_time = load_started.elapsed();
                    status.problems = snapshot.problems.clone();
                    status
                        .problems
                        .extend(observers.workloads(&snapshot.inventory));
                    match reconciler.reconcile(&snapshot, &mut dataplane.writer) {
                        Ok(applied) => {
                            let names_changed = !published
                                .as_ref()
                                .is_some_and(|p| Arc::ptr_eq(p, &applied.names));
                            status.problems.extend(applied.rejected.values().cloned());
                            status
                                .problems
                                .extend(source.settle(Some(&applied.rejected)));
                            observers.applied(&applied, changed_at, load_time, names_changed);
                            if let Some(mesh) = &observers.mesh {
                                mesh.set_policies(&snapshot.inventory, &applied.enforced);
                            }
                            status.applied += 1;
                            status.usage = applied.usage;
                            status.waiting_for_cgroup = applied.missing_cgroups.clone();
                            if guard_frames_on {
                                guarded = applied.endpoint_cgroups.clone();
                                last_guard = Instant::now();
                                let (waiting, problems) = guard_frames(&mut dataplane, &guarded);
                                status.waiting_for_process = waiting;
                                status.problems.extend(problems);
                            }
                            missing_cgroups = CgroupWait::after_pass(
                                !status.waiting_for_cgroup.is_empty(),
                                applied.missing_cgroup_paths.clone(),
                            );
                            missing_processes = !status.waiting_for_process.is_empty();
                            published = Some(Arc::clone(&applied.names));
                            if let Some(path) = names_file.as_ref().filter(|_| names_changed) {
                                if let Err(e) = publish(path, &applied.names) {
                                    status.problems.push(format!(
                                        "publishing names to {}: {e}",
                                        path.display()
                                    ));
                                    // Written again by the next pass.
                                    published = None;
                                }
                            }
                            info!(
                                endpoints = applied.endpoints,
                                identities = applied.usage.identities,
                                rules = applied.usage.policy,
                                policies = snapshot.policies.len(),
                                held_back = applied.rejected.len(),
                                load_ms = millis(load_time),
                                compile_ms = millis(applied.timings.compile),
                                desired_ms = millis(applied.timings.desired),
                                write_ms = millis(applied.timings.write),
                                "policy applied"
                            );
                        }
                        Err(e) => {
                            status.pass_error = Some(error_chain(&e));
                            status.problems.push(error_chain(&e));
                            status.problems.extend(source.settle(None));
                        }
                    }
                }
                Err(e) => {
                    status.pass_error = Some(error_chain(&*e));
                    status.problems.push(error_chain(&*e));
                }
            }
            if status.pass_error.is_some() {
                failed_passes += 1;
                let backoff = retry_delay(failed_passes);
                warn!(
                    attempt = failed_passes,
                    "the pass failed; trying again in {backoff:?}"
                );
                retry_failed_at = Some(Instant::now() + backoff);
            } else {
                failed_passes = 0;
                retry_failed_at = None;
            }
            for p in &status.problems {
                error!("{p}");
            }
            for w in &status.waiting_for_cgroup {
                warn!("not enforced until its cgroup exists: {w}");
            }
            for w in &status.waiting_for_process {
                warn!("packet sockets not guarded until the pod has a process: {w}");
            }
            seen = Some(fp);
            observers.publish(&status);
            trim.after_pass(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_passes_are_retried_sooner_first_then_every_thirty_seconds() {
        let delays: Vec<u64> = (1..=12)
            .map(|n| retry_delay(n).as_millis() as u64)
            .collect();
        assert_eq!(&delays[..4], &[100, 200, 400, 800]);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(retry_delay(12), RETRY_MAX);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
    }
    use crate::admin::tls::CertSource;

    fn options(source: SourceOptions, pins: &Path) -> AgentOptions {
        AgentOptions {
            source,
            pin_dir: pins.to_path_buf(),
            cgroup_mount: Some(pins.to_path_buf()),
            cgroup_root: None,
            names_file: None,
            admin_addr: Some("127.0.0.1:0".parse().unwrap()),
            admin_secure: Some(SecureOptions {
                cert: CertSource::SelfSigned {
                    names: vec!["localhost".into()],
                },
            }),
            state_dir: None,
            guard_frames: false,
            map_capacities: Default::default(),
            identity: None,
        }
    }

    fn files() -> SourceOptions {
        SourceOptions::Files {
            policies_dir: "/nonexistent".into(),
            workloads: "/nonexistent/w.yaml".into(),
        }
    }

    #[test]
    fn local_workloads_give_one_identity_per_namespace_and_service_account() {
        let inventory: Inventory = serde_saphyr::from_str(
            "workloads:\n\
             - {name: a, namespace: x, serviceAccount: web, cgroup: /a}\n\
             - {name: b, namespace: x, serviceAccount: web, cgroup: /b}\n\
             - {name: c, namespace: x, cgroup: /c}\n\
             - {name: d, namespace: y, serviceAccount: api}\n",
        )
        .unwrap();
        let (ids, problems) = local_identities(&inventory, "example.org");
        let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        assert_eq!(
            ids,
            [
                "spiffe://example.org/ns/x/sa/default",
                "spiffe://example.org/ns/x/sa/web"
            ]
        );
        assert!(problems.is_empty(), "{problems:?}");
    }

    /// Secure mode asks the API server, so the file source cannot have it;
    /// the agent refuses before it loads or pins anything.
    #[test]
    fn secure_mode_without_kubernetes_is_refused_before_anything_loads() {
        let dir = tempfile::tempdir().unwrap();
        let pins = dir.path().join("pins");
        let e = start(options(files(), &pins)).err().expect("refused");
        assert!(
            matches!(
                e,
                AgentError::Admin {
                    source: AdminError::SecureNeedsKubernetes
                }
            ),
            "{e:?}"
        );
        assert!(!pins.exists(), "nothing was pinned");
    }

    #[test]
    fn a_missing_certificate_is_refused_before_anything_loads() {
        let dir = tempfile::tempdir().unwrap();
        let pins = dir.path().join("pins");
        let mut opts = options(files(), &pins);
        opts.admin_secure = None;
        assert!(matches!(exposure(&opts), Ok(Exposure::Plain)));
        // Kubernetes mode with certificate files that do not exist.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let (service, _handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = kube::Client::new(service, "default");
        let kube = SourceOptions::Kubernetes(Box::new(KubeOptions::new(client, "node")));
        let mut opts = options(kube, &pins);
        assert!(matches!(exposure(&opts), Ok(Exposure::Secure { .. })));
        opts.admin_secure = Some(SecureOptions {
            cert: CertSource::Files {
                cert: dir.path().join("tls.crt"),
                key: dir.path().join("tls.key"),
            },
        });
        let e = start(opts).err().expect("refused");
        let chain = error_chain(&e);
        assert!(chain.contains("tls.crt"), "{chain}");
        assert!(!pins.exists(), "nothing was pinned");
    }
}
