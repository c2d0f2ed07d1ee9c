//! Kubernetes mode: desired state from the API server, through kube-rs
//! watchers and reflector stores, fed to the same reconcile path as the
//! file source.
//!
//! Safety properties, and how they hold:
//! - Nothing is applied until every watcher has completed its initial list,
//!   so a partial view (pods known, their policies not yet) never replaces
//!   what the pinned maps already enforce.
//! - A relist (after `410 Gone`, or a reconnect) swaps a store's contents
//!   atomically when the new list is complete; the maps change only by the
//!   difference.
//! - While the API server is unreachable the watchers retry with backoff,
//!   the kernel keeps enforcing the last applied state, and the agent
//!   reports not-ready.

mod backoff;
mod cgroup_tree;
pub mod cgroups;
mod label_sets;
mod pending;
mod policies;
mod prune;
mod recheck;
mod services;
pub mod slim_pod;
pub(crate) mod workloads;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use ::kube::{
    api::{ApiResource, DynamicObject},
    runtime::{
        reflector::{self, store::Writer, Store},
        watcher::{self, Event},
        WatchStreamExt,
    },
    Api, Client, Resource,
};
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::{sync::watch, task::JoinHandle};

use self::{
    cgroup_tree::{Listing, PodCgroupTree},
    cgroups::{PodCgroupFinder, PodDir, PodUid, QosClass},
    policies::{ApiPolicy, PolicyTracker},
    slim_pod::SlimPod,
    workloads::CgroupLookup,
};
use super::{Guards, Revision, Snapshot, Source};
use crate::{
    crd,
    kube_report::{ObjectReport, Reporter, ReporterOptions},
    policy::model::{CheckedInventory, Inventory},
};

/// How often the API server is asked whether it is there, when no watch
/// event says so.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("the Kubernetes source needs a tokio runtime to run its watchers on")]
    NoRuntime,
    #[error(
        "--deny-unprogrammed needs the agent's own pod cgroup, so a restarted \
         agent is never locked out by its predecessor's guard: set POD_UID \
         (downward API metadata.uid)"
    )]
    OwnCgroupUnknown,
    #[error("finding the agent's own pod cgroup")]
    OwnCgroup {
        #[source]
        source: cgroups::PodCgroupError,
    },
    #[error(
        "reading the last valid policy objects in {dir} (nothing was changed in the \
         kernel: the pinned maps keep enforcing what they held)"
    )]
    State {
        dir: PathBuf,
        #[source]
        source: policies::TrackerError,
    },
}

/// Settings of the Kubernetes source.
#[derive(Clone)]
pub struct KubeOptions {
    pub client: Client,
    /// This node's name (`spec.nodeName` of the pods to enforce).
    pub node_name: String,
    /// The kubelet's cgroup root, relative to the cgroup2 mount (`/` by
    /// default; the kubelet's `--cgroup-root`).
    pub kubelet_cgroup_root: PathBuf,
    /// Deny traffic of local pods until their endpoint is programmed.
    pub deny_unprogrammed: bool,
    pub probe_interval: Duration,
    /// The agent's own pod UID (downward API), to find its cgroup.
    pub own_pod_uid: Option<String>,
    /// Report invalid policy objects to the API (Events, conditions) when
    /// this agent holds the Lease; `None` leaves that to others.
    pub reporter: Option<ReporterOptions>,
    /// Where the last valid and applied version of every policy object is
    /// kept across restarts (below `kube/policies`); memory only when `None`.
    pub state_dir: Option<PathBuf>,
}

impl KubeOptions {
    pub fn new(client: Client, node_name: impl Into<String>) -> Self {
        let node_name = node_name.into();
        Self {
            client,
            reporter: Some(ReporterOptions::new(node_name.clone())),
            node_name,
            kubelet_cgroup_root: PathBuf::from("/"),
            deny_unprogrammed: false,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            own_pod_uid: None,
            state_dir: None,
        }
    }
}

/// The resources the source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Watched {
    Pods,
    Namespaces,
    Node,
    NetworkPolicies,
    L4Policies,
    ClusterL4Policies,
    Services,
    EndpointSlices,
}

impl Watched {
    pub const ALL: [Watched; 8] = [
        Self::Pods,
        Self::Namespaces,
        Self::Node,
        Self::NetworkPolicies,
        Self::L4Policies,
        Self::ClusterL4Policies,
        Self::Services,
        Self::EndpointSlices,
    ];
}

impl fmt::Display for Watched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pods => "pods",
            Self::Namespaces => "namespaces",
            Self::Node => "this node",
            Self::NetworkPolicies => "networkpolicies",
            Self::L4Policies => "l4policies.portcullis.dev",
            Self::ClusterL4Policies => "clusterl4policies.portcullis.dev",
            Self::Services => "services",
            Self::EndpointSlices => "endpointslices",
        })
    }
}

/// What the watchers have seen, shared with the sync loop.
#[derive(Default)]
struct Progress {
    /// Changes seen after the initial lists.
    revision: u64,
    /// The resources changed since a load last took them: what the load
    /// must read again (see [`KeptView`]).
    dirty: BTreeSet<Watched>,
    /// The pods (namespace, name) the events since a load last took the
    /// marks named; `None` when they named too many, or a relist named none
    /// (and before the first load): the load then reads every pod.
    named_pods: Option<BTreeSet<(String, String)>>,
    /// When each change not yet applied was seen.
    pending: pending::PendingChanges,
    synced: BTreeSet<Watched>,
    /// Latest watch error per resource, until the watch delivers again
    /// (or, for a transient one, the API server answers a probe).
    failing: BTreeMap<Watched, (WatchFailure, Instant)>,
    last_probe_ok: Option<Instant>,
    probe_error: Option<String>,
    /// How often the probe saw the API server answer after failing: the
    /// watches' backoff starts over at each.
    recoveries: u64,
    /// The sync loop, woken on every change.
    wake: Option<Arc<crate::source::wake::Wakeup>>,
}

type Shared = Arc<Mutex<Progress>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Progress> {
    // A panicking watcher task must not take the sync loop with it.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// Past this many pods named between two loads, a load reads them all:
/// checking each would cost as much, and the set stays small.
const NAMED_PODS_MAX: usize = 64;

impl Progress {
    /// An event changed (or removed) the object `meta` describes.
    fn changed_object(&mut self, what: Watched, meta: &ObjectMeta) {
        if what == Watched::Pods {
            if let Some(named) = &mut self.named_pods {
                named.insert((
                    meta.namespace.clone().unwrap_or_default(),
                    meta.name.clone().unwrap_or_default(),
                ));
                if named.len() > NAMED_PODS_MAX {
                    self.named_pods = None;
                }
            }
        }
        self.changed(what);
    }

    /// A list replaced the store's contents: no object named.
    fn relisted(&mut self, what: Watched) {
        if what == Watched::Pods {
            self.named_pods = None;
        }
        self.synced.insert(what);
        self.changed(what);
    }

    /// What the events since the last call changed, for a load to read
    /// again (see [`Reread`]).
    fn take_marks(&mut self) -> (BTreeSet<Watched>, Option<BTreeSet<(String, String)>>) {
        let dirty = std::mem::take(&mut self.dirty);
        let named = self.named_pods.replace(BTreeSet::new());
        (dirty, named)
    }

    fn changed(&mut self, what: Watched) {
        self.revision += 1;
        self.dirty.insert(what);
        self.pending.record(self.revision, SystemTime::now());
        self.failing.remove(&what);
        self.wake();
    }

    /// When the oldest change a pass at `now` takes was seen (those up to
    /// `previous` are applied already): a burst's latency is its first
    /// change's wait, not its last's.
    fn changed_at(&mut self, now: &Revision, previous: Option<&Revision>) -> Option<SystemTime> {
        let events = |r: &Revision| match r {
            Revision::Events(n) => Some(*n),
            _ => None,
        };
        let now = events(now)?;
        self.pending.oldest_since(now, previous.and_then(events))
    }

    /// Tells the sync loop to look: the revision or the health changed.
    fn wake(&self) {
        if let Some(w) = &self.wake {
            w.signal();
        }
    }
}

struct Stores {
    pods: Store<SlimPod>,
    namespaces: Store<Namespace>,
    node: Store<Node>,
    network_policies: Store<NetworkPolicy>,
    l4_policies: Store<DynamicObject>,
    cluster_l4_policies: Store<DynamicObject>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
}

pub struct KubeSource {
    options: KubeOptions,
    stores: Stores,
    progress: Shared,
    /// The pod cgroups, walked again only when they changed.
    cgroups: PodCgroupTree,
    mount: PathBuf,
    tracker: PolicyTracker,
    reports: watch::Sender<Vec<ObjectReport>>,
    /// Reports of the latest load, published once its outcome is known (an
    /// object that does not fit is reported too).
    pending_reports: Option<Arc<Vec<ObjectReport>>>,
    /// Pods as workloads, kept while they do not change.
    translations: workloads::Translations,
    /// The latest view that passed its check, kept for the next load: it
    /// reads again only what changed, and does not check again what the
    /// workloads it shares say of themselves.
    kept: Option<KeptView>,
    /// Whether this agent's reporter holds the Lease; `None` without one.
    leadership: Option<watch::Receiver<bool>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Runs one watcher into its store, recording progress and errors.
fn spawn_watch<K>(
    runtime: &tokio::runtime::Handle,
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    what: Watched,
    shared: Shared,
) -> JoinHandle<()>
where
    K: Resource
        + prune::Prune
        + Clone
        + serde::de::DeserializeOwned
        + fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    runtime.spawn(async move {
        // Only what the agent reads reaches the store.
        let stream = watcher::watcher(api, config)
            .backoff(backoff::WatchBackoff::new(shared.clone()))
            .modify(|o: &mut K| o.prune());
        let stream = reflector::reflector(writer, stream);
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            let mut p = lock(&shared);
            match event {
                Ok(Event::Init) | Ok(Event::InitApply(_)) => {}
                Ok(Event::InitDone) => p.relisted(what),
                Ok(Event::Apply(o)) | Ok(Event::Delete(o)) => p.changed_object(what, o.meta()),
                Err(e) => {
                    let failure = describe_watch_error(&e);
                    tracing::warn!("watching {what}: {}", failure.message);
                    p.failing.insert(what, (failure, Instant::now()));
                    p.wake();
                }
            }
        }
    })
}

/// A watch failure, said briefly, and whether the API server answering
/// the version probe shows it is over.
struct WatchFailure {
    message: String,
    /// Connection problems and 5xx answers end when the server is back;
    /// a 403 or 404 lasts until [`recheck::is_over`] says otherwise.
    transient: bool,
    /// The HTTP status, when the API server answered.
    code: Option<u16>,
}

fn describe_status(status: &::kube::core::Status) -> WatchFailure {
    let hint = match status.code {
        404 => " (is the CRD installed? kubectl apply -k deploy/)",
        403 => " (check the ClusterRole in deploy/rbac.yaml)",
        _ => "",
    };
    WatchFailure {
        message: format!(
            "{} {}: {}{hint}",
            status.code, status.reason, status.message
        ),
        transient: status.code >= 500 || status.code == 429,
        code: Some(status.code),
    }
}

fn describe_watch_error(e: &watcher::Error) -> WatchFailure {
    use watcher::Error as W;
    match e {
        W::InitialListFailed(c) | W::WatchStartFailed(c) | W::WatchFailed(c) => match c {
            ::kube::Error::Api(status) => describe_status(status),
            other => WatchFailure {
                message: crate::source::file::error_chain(other),
                transient: true,
                code: None,
            },
        },
        W::WatchError(status) => describe_status(status),
        W::NoResourceVersion => WatchFailure {
            message: e.to_string(),
            transient: false,
            code: None,
        },
    }
}

/// Like [`spawn_watch`], for Portcullis' kinds, watched untyped so one
/// object that does not decode is reported alone (see `policies.rs`).
fn spawn_dynamic_watch(
    runtime: &tokio::runtime::Handle,
    client: &Client,
    resource: ApiResource,
    what: Watched,
    shared: Shared,
) -> (Store<DynamicObject>, JoinHandle<()>) {
    let writer = Writer::new(resource.clone());
    let store = writer.as_reader();
    let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
    let task = spawn_watch(
        runtime,
        api,
        watcher::Config::default(),
        writer,
        what,
        shared,
    );
    (store, task)
}

/// Asks the API server for its version now and then: the one signal that
/// it is back when watches resume silently.
fn spawn_probe(
    runtime: &tokio::runtime::Handle,
    client: Client,
    every: Duration,
    shared: Shared,
) -> JoinHandle<()> {
    runtime.spawn(async move {
        loop {
            let result = client.apiserver_version().await;
            {
                let mut p = lock(&shared);
                match result {
                    Ok(_) => {
                        p.last_probe_ok = Some(Instant::now());
                        if p.probe_error.take().is_some() {
                            p.recoveries += 1;
                        }
                    }
                    Err(e) => p.probe_error = Some(crate::source::file::error_chain(&e)),
                }
            }
            recheck_failures(&client, &shared).await;
            tokio::time::sleep(every).await;
        }
    })
}

/// Clears the 403 and 404 failures that are over (see [`recheck`]),
/// unless the watch failed again meanwhile.
async fn recheck_failures(client: &Client, shared: &Shared) {
    let lasting: Vec<(Watched, u16, Instant)> = {
        let p = lock(shared);
        if p.probe_error.is_some() {
            return;
        }
        p.failing
            .iter()
            .filter(|(_, (f, _))| !f.transient)
            .filter_map(|(w, (f, at))| Some((*w, f.code?, *at)))
            .collect()
    };
    for (what, code, at) in lasting {
        if recheck::is_over(client, what, code).await {
            let mut p = lock(shared);
            if p.failing.get(&what).is_some_and(|(_, seen)| *seen == at) {
                tracing::info!("watching {what}: {code} is over");
                p.failing.remove(&what);
            }
        }
    }
}

impl KubeSource {
    /// Starts the watchers on the current tokio runtime. `mount` is the
    /// cgroup2 hierarchy the kubelet's cgroups are in.
    pub fn start(options: KubeOptions, mount: &Path) -> Result<Self, KubeSourceError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| KubeSourceError::NoRuntime)?;
        // Read before any watch starts: a damaged state refuses to start.
        let tracker = match &options.state_dir {
            Some(dir) => {
                let dir = dir.join("kube").join("policies");
                PolicyTracker::durable(&dir)
                    .map_err(|source| KubeSourceError::State { dir, source })?
            }
            None => PolicyTracker::default(),
        };
        let progress: Shared = Arc::default();
        let client = options.client.clone();
        let mut tasks = Vec::new();

        macro_rules! typed {
            ($kind:ty, $what:expr, $config:expr) => {{
                let writer = Writer::<$kind>::default();
                let store = writer.as_reader();
                tasks.push(spawn_watch(
                    &runtime,
                    Api::<$kind>::all(client.clone()),
                    $config,
                    writer,
                    $what,
                    progress.clone(),
                ));
                store
            }};
        }
        let any = watcher::Config::default;
        let pods = typed!(SlimPod, Watched::Pods, any());
        let namespaces = typed!(Namespace, Watched::Namespaces, any());
        let node = typed!(
            Node,
            Watched::Node,
            any().fields(&format!("metadata.name={}", options.node_name))
        );
        let network_policies = typed!(NetworkPolicy, Watched::NetworkPolicies, any());
        let services = typed!(Service, Watched::Services, any());
        let endpoint_slices = typed!(EndpointSlice, Watched::EndpointSlices, any());
        let (l4_policies, task) = spawn_dynamic_watch(
            &runtime,
            &client,
            ApiResource::erase::<crd::L4Policy>(&()),
            Watched::L4Policies,
            progress.clone(),
        );
        tasks.push(task);
        let (cluster_l4_policies, task) = spawn_dynamic_watch(
            &runtime,
            &client,
            ApiResource::erase::<crd::ClusterL4Policy>(&()),
            Watched::ClusterL4Policies,
            progress.clone(),
        );
        tasks.push(task);
        tasks.push(spawn_probe(
            &runtime,
            client.clone(),
            options.probe_interval,
            progress.clone(),
        ));
        let finder = PodCgroupFinder::new(mount).with_base(&options.kubelet_cgroup_root);
        let (reports, reports_rx) = watch::channel(Vec::new());
        let leadership = options.reporter.clone().map(|reporter_options| {
            // The reporter logs its own leadership changes.
            let reporter = Reporter::new(client.clone(), reporter_options);
            let leadership = reporter.leadership();
            tasks.push(runtime.spawn(reporter.run(reports_rx)));
            leadership
        });
        Ok(Self {
            options,
            stores: Stores {
                pods,
                namespaces,
                node,
                network_policies,
                l4_policies,
                cluster_l4_policies,
                services,
                endpoint_slices,
            },
            progress,
            cgroups: PodCgroupTree::new(finder),
            mount: mount.to_path_buf(),
            tracker,
            reports,
            pending_reports: None,
            translations: workloads::Translations::default(),
            kept: None,
            leadership,
            tasks,
        })
    }

    /// Every policy object with its validity, after each pass: what the
    /// status writer reports to the API.
    pub fn reports(&self) -> watch::Receiver<Vec<ObjectReport>> {
        self.reports.subscribe()
    }

    fn publish_reports(&self, reports: Arc<Vec<ObjectReport>>) {
        self.reports.send_if_modified(|current| {
            let changed = *current != *reports;
            if changed {
                *current = Arc::unwrap_or_clone(reports);
            }
            changed
        });
    }
}

impl KubeSource {
    /// Reads the view again from the stores, as much as `reread` says,
    /// and checks it: a view the inventory rules reject would be a bug in
    /// the translation, refused whole rather than enforced in part. The
    /// only check of the pass: the mesh, the identity demand and the
    /// compile all take this checked view.
    fn read_view(
        &mut self,
        reread: Reread,
        kept: Option<KeptView>,
        walk: Option<u64>,
    ) -> Result<KeptView, crate::policy::model::InventoryError> {
        let s = &self.stores;
        let (mut inventory, local) = match (reread, &kept) {
            (Reread::Services, Some(kept)) => {
                (Inventory::clone(&kept.inventory), kept.local.clone())
            }
            _ => {
                let unlisted = Listing::default();
                let lookup = ListedCgroups {
                    mount: &self.mount,
                    finder: self.cgroups.finder(),
                    listed: &self.cgroups.last().unwrap_or(&unlisted).pods,
                    walk,
                };
                let node = s.node.state();
                let namespaces = s.namespaces.state();
                let pods = s.pods.state();
                self.translations.inventory(
                    &self.options.node_name,
                    node.first().map(|n| n.as_ref()),
                    namespaces.iter().map(|n| n.as_ref()),
                    pods.iter(),
                    &lookup,
                )
            }
        };
        let services = s.services.state();
        let slices = s.endpoint_slices.state();
        inventory.services = services::services(
            services.iter().map(|x| x.as_ref()),
            slices.iter().map(|x| x.as_ref()),
        );
        let claimed: Vec<_> = inventory
            .node_ips
            .iter()
            .chain(inventory.workloads.iter().flat_map(|w| w.ips.iter()))
            .copied()
            .collect();
        let service_problems = services::keep_consistent(&mut inventory.services, &claimed);
        if let Some(kept) = kept.as_ref().filter(|kept| *kept.inventory == inventory) {
            // The events changed nothing the view reads (a deletion mark
            // before the removal): the same checked view, so the pass
            // knows at once that nothing is to be compiled.
            return Ok(KeptView {
                inventory: kept.inventory.clone(),
                walk,
                local,
                service_problems,
            });
        }
        let inventory = match &kept {
            Some(previous) => CheckedInventory::new_after(inventory, &previous.inventory)?,
            None => CheckedInventory::new(inventory)?,
        };
        Ok(KeptView {
            inventory,
            walk,
            local,
            service_problems,
        })
    }
}

impl KubeSource {
    /// The kept view with the `named` pods as the store has them now, when
    /// those pods alone settle it (see `workloads::patch`); `None` leaves
    /// the view to be read whole. The Services are the kept ones: none
    /// changed, and none clashes with a pod's new address.
    fn patch_view(
        &mut self,
        kept: &KeptView,
        named: &BTreeSet<(String, String)>,
    ) -> Option<Result<KeptView, crate::policy::model::InventoryError>> {
        let unlisted = Listing::default();
        let lookup = ListedCgroups {
            mount: &self.mount,
            finder: self.cgroups.finder(),
            listed: &self.cgroups.last().unwrap_or(&unlisted).pods,
            walk: kept.walk,
        };
        let pods = &self.stores.pods;
        let changes = self.translations.patch(
            &self.options.node_name,
            &kept.inventory,
            named.iter().map(|(ns, name)| (ns.as_str(), name.as_str())),
            |ns, name| pods.get(&reflector::ObjectRef::new(name).within(ns)),
            &lookup,
        )?;
        Some(kept.inventory.patch(changes).map(|inventory| KeptView {
            inventory,
            walk: kept.walk,
            local: kept.local.clone(),
            service_problems: Vec::new(),
        }))
    }
}

/// The agent's own cgroup in `mount`: its pod's, by UID, or else the one
/// /proc/self/cgroup names (outside a cgroup namespace).
pub fn own_cgroup(mount: &Path, options: &KubeOptions) -> Result<PathBuf, KubeSourceError> {
    if let Some(uid) = &options.own_pod_uid {
        let uid = PodUid::new(uid).map_err(|source| KubeSourceError::OwnCgroup { source })?;
        let finder = PodCgroupFinder::new(mount).with_base(&options.kubelet_cgroup_root);
        // The QoS class only picks the first place to look; find() searches.
        let relative = finder
            .find(&uid, QosClass::BestEffort)
            .map_err(|source| KubeSourceError::OwnCgroup { source })?;
        return Ok(mount.join(relative));
    }
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .filter(|p| *p != "/")
        .map(|p| mount.join(p.trim_start_matches('/')))
        .filter(|p| p.is_dir())
        .ok_or(KubeSourceError::OwnCgroupUnknown)
}

/// What a load read from the pod, namespace, node, Service and
/// EndpointSlice stores, kept for the next load.
struct KeptView {
    /// Checked, with its Services.
    inventory: CheckedInventory,
    /// The cgroup walk its workloads were looked up in, if any listed.
    walk: Option<u64>,
    local: workloads::LocalPods,
    /// What keeping its Services consistent with the pods reported.
    service_problems: Vec<String>,
}

/// What a load reads again of the view the last one kept. A policy edit
/// need not translate five thousand pods again, nor an EndpointSlice
/// change either; at that size each was milliseconds of every pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reread {
    /// The view is the kept one.
    Nothing,
    /// The kept workloads, namespaces and node; Services read again (they
    /// are checked against the workloads' addresses, which are kept).
    Services,
    /// The kept view with the pods the events named read again, if that
    /// settles it (see `workloads::patch`); everything otherwise.
    NamedPods,
    Everything,
}

impl Reread {
    /// After the resources in `dirty` changed, the cgroups were listed by
    /// walk number `walk` (`None`: not listed), and the last load kept
    /// `kept`. Without a kept view, or a listing to compare, everything.
    /// Changed pods are read again unless `pods_read_alike` tells that
    /// those the events named leave the view as it was (asked only then);
    /// only those pods when the events `named_pods` (all of them) and
    /// nothing else changed that the view reads.
    fn after(
        dirty: &BTreeSet<Watched>,
        kept: Option<&KeptView>,
        walk: Option<u64>,
        named_pods: bool,
        pods_read_alike: impl FnOnce() -> bool,
    ) -> Self {
        let view = [Watched::Namespaces, Watched::Node];
        let services = [Watched::Services, Watched::EndpointSlices];
        let Some(kept) = kept else {
            return Self::Everything;
        };
        if walk.is_none() || walk != kept.walk || view.iter().any(|w| dirty.contains(w)) {
            return Self::Everything;
        }
        let services_changed = services.iter().any(|w| dirty.contains(w));
        if dirty.contains(&Watched::Pods) && !pods_read_alike() {
            // A Service the last view dropped for a clash may come back.
            let patchable = named_pods && !services_changed && kept.service_problems.is_empty();
            return match patchable {
                true => Self::NamedPods,
                false => Self::Everything,
            };
        }
        match services_changed {
            true => Self::Services,
            false => Self::Nothing,
        }
    }
}

/// Local pod cgroups, found by one walk per pass.
struct ListedCgroups<'a> {
    mount: &'a Path,
    finder: &'a PodCgroupFinder,
    listed: &'a BTreeMap<PodUid, PodDir>,
    /// The walk that listed them, if any did.
    walk: Option<u64>,
}

impl CgroupLookup for ListedCgroups<'_> {
    fn listing(&self) -> Option<u64> {
        self.walk
    }

    fn pod_cgroup(&self, pod: &SlimPod) -> Result<PathBuf, PathBuf> {
        let none = BTreeMap::new();
        let annotations = pod.metadata.annotations.as_ref().unwrap_or(&none);
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        let Ok(uid) = PodUid::of_pod(uid, annotations) else {
            // Not a name the kubelet would make: it has no cgroup to find.
            return Err(self.mount.join("unknown-pod-uid"));
        };
        if let Some(dir) = self.listed.get(&uid) {
            return Ok(self.mount.join(&dir.path));
        }
        let qos = pod
            .status
            .as_ref()
            .and_then(|s| s.qos_class.as_deref())
            .and_then(|q| QosClass::from_str(q).ok())
            .unwrap_or(QosClass::BestEffort);
        let expected = self.finder.expected_paths(&uid, qos);
        Err(self.mount.join(&expected[0]))
    }
}

impl Source for KubeSource {
    fn wake_on_change(&mut self, wake: Arc<crate::source::wake::Wakeup>) {
        let mut p = lock(&self.progress);
        p.wake = Some(wake);
        // Whatever happened before counts too.
        p.wake();
    }

    fn revision(&self) -> Option<Revision> {
        let p = lock(&self.progress);
        (p.synced.len() == Watched::ALL.len()).then_some(Revision::Events(p.revision))
    }

    fn changed_at(&self, now: &Revision, previous: Option<&Revision>) -> Option<SystemTime> {
        lock(&self.progress).changed_at(now, previous)
    }

    fn load(&mut self) -> Result<Snapshot, Box<dyn std::error::Error + Send + Sync>> {
        // Taken before any store is read: a change that lands later is
        // marked again, and its event wakes the next load.
        let (dirty, named_pods) = lock(&self.progress).take_marks();
        let mut problems = Vec::new();
        if let Err(e) = self.cgroups.list() {
            problems.push(format!(
                "listing pod cgroups: {}",
                crate::source::file::error_chain(&e)
            ));
        }
        let walk = self.cgroups.last().map(|_| self.cgroups.walks());
        let kept = self.kept.take();
        let pods_read_alike = || {
            let Some(named) = &named_pods else {
                return false;
            };
            let pods = &self.stores.pods;
            self.translations.read_alike(
                named.iter().map(|(ns, name)| (ns.as_str(), name.as_str())),
                |ns, name| pods.get(&reflector::ObjectRef::new(name).within(ns)),
            )
        };
        let reread = Reread::after(
            &dirty,
            kept.as_ref(),
            walk,
            named_pods.is_some(),
            pods_read_alike,
        );
        let view = match (reread, kept, &named_pods) {
            (Reread::Nothing, Some(kept), _) => Ok(kept),
            (Reread::NamedPods, Some(kept), Some(named)) => match self.patch_view(&kept, named) {
                Some(patched) => patched,
                None => self.read_view(Reread::Everything, Some(kept), walk),
            },
            (reread, kept, _) => self.read_view(reread, kept, walk),
        };
        // A policy object changes its store before its event marks it, so
        // with no policy marked the stores serve what the last track read.
        let policy_kinds = [
            Watched::NetworkPolicies,
            Watched::L4Policies,
            Watched::ClusterL4Policies,
        ];
        let repeated = match policy_kinds.iter().any(|w| dirty.contains(w)) {
            true => None,
            false => self.tracker.repeat(),
        };
        let tracked = match repeated {
            Some(tracked) => tracked,
            None => {
                let s = &self.stores;
                let network_policies = s.network_policies.state();
                let l4 = s.l4_policies.state();
                let cl4 = s.cluster_l4_policies.state();
                let objects = network_policies
                    .iter()
                    .map(|o| ApiPolicy::Network(o))
                    .chain(l4.iter().map(|o| ApiPolicy::L4(o)))
                    .chain(cl4.iter().map(|o| ApiPolicy::ClusterL4(o)));
                self.tracker.track(objects)
            }
        };
        problems.extend(tracked.problems);
        let view = match view {
            Ok(view) => view,
            Err(e) => {
                self.publish_reports(tracked.reports);
                return Err(Box::new(e));
            }
        };
        problems.extend(view.service_problems.iter().cloned());
        let inventory = view.inventory.clone();
        // Read by the walk that listed them: no pass need look them up.
        let cgroup_ids = match self.cgroups.last() {
            Some(listing) => Arc::clone(&listing.ids),
            None => Arc::default(),
        };
        let unenforced = view.local.host_network.clone();
        self.kept = Some(view);
        self.pending_reports = Some(tracked.reports);
        let pending_roots = if self.options.deny_unprogrammed {
            self.cgroups.finder().kubepods_dirs()
        } else {
            Vec::new()
        };
        if self.options.deny_unprogrammed && pending_roots.is_empty() {
            // Silently guarding nothing would leave the window open.
            problems.push(format!(
                "--deny-unprogrammed: no kubepods cgroup below {}; new pods are not \
                 guarded (pass the kubelet's --cgroup-root as --kubelet-cgroup-root)",
                self.cgroups.finder().base_dir().display()
            ));
        }
        Ok(Snapshot {
            inventory,
            cgroup_ids,
            policies: tracked.policies,
            previous: tracked.previous,
            problems,
            guards: Guards {
                pending_roots,
                unenforced,
            },
        })
    }

    fn settle(
        &mut self,
        outcome: Option<&BTreeMap<crate::policy::PolicyRef, String>>,
    ) -> Vec<String> {
        if let Some(mut reports) = self.pending_reports.take() {
            // Most passes reject nothing: no report changes then.
            if let Some(rejected) = outcome.filter(|rejected| !rejected.is_empty()) {
                for r in Arc::make_mut(&mut reports) {
                    let key = crate::policy::PolicyRef {
                        kind: r.kind,
                        namespace: r.namespace.as_str().into(),
                        name: r.name.as_str().into(),
                    };
                    if let Some(why) = rejected.get(&key) {
                        r.problem = Some(why.clone());
                    }
                }
            }
            self.publish_reports(reports);
        }
        self.tracker.settle(outcome)
    }

    fn is_report_leader(&self) -> bool {
        self.leadership.as_ref().is_some_and(|l| *l.borrow())
    }

    fn degraded(&self) -> Option<String> {
        let p = lock(&self.progress);
        let waiting: Vec<String> = Watched::ALL
            .iter()
            .filter(|w| !p.synced.contains(w))
            .map(|w| w.to_string())
            .collect();
        // A watch resumed after an outage delivers nothing until something
        // changes: a transient error counts only until the server answers.
        let failing: Vec<String> = p
            .failing
            .iter()
            .filter(|(_, (f, at))| !f.transient || p.last_probe_ok.is_none_or(|ok| *at > ok))
            .map(|(w, (f, _))| format!("{w}: {}", f.message))
            .collect();
        let mut reasons = Vec::new();
        if let Some(e) = &p.probe_error {
            reasons.push(format!("API server unreachable: {e}"));
        }
        if !failing.is_empty() {
            reasons.push(format!("watch failing ({})", failing.join("; ")));
        }
        if !waiting.is_empty() {
            reasons.push(format!(
                "waiting for the initial list of {}",
                waiting.join(", ")
            ));
        }
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    fn missing_cgroup_retry(&self) -> Duration {
        // A pod whose cgroup is missing is usually starting: the kubelet
        // creates it any moment, and until then the pod is not enforced
        // (or, with deny-unprogrammed, gets no traffic).
        Duration::from_millis(200)
    }

    /// Where it was expected, or anywhere: the kubelet may have put it
    /// under another QoS class than the pod's status says, and a walk
    /// (milliseconds) is far cheaper than a pass at thousands of pods.
    fn cgroups_appeared(&self, awaited: &[PathBuf]) -> bool {
        awaited.iter().any(|path| path.exists())
            || (self.cgroups.may_have_changed()
                && self
                    .cgroups
                    .finder()
                    .list_with_ids()
                    .is_ok_and(|now| self.cgroups.last().is_none_or(|last| now != last.pods)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn kept(walk: Option<u64>) -> KeptView {
        KeptView {
            inventory: CheckedInventory::default(),
            walk,
            local: Default::default(),
            service_problems: Vec::new(),
        }
    }

    /// Each resource is read again when it changed, and whatever the view
    /// was read with changes too; a skipped read would leave a change
    /// unenforced until some other change came.
    #[test]
    fn a_load_reads_again_what_changed_and_what_depends_on_it() {
        let after = |dirty: &[Watched], kept: Option<&KeptView>, walk| {
            Reread::after(&dirty.iter().copied().collect(), kept, walk, false, || {
                false
            })
        };
        let listed = kept(Some(7));
        for what in Watched::ALL {
            let expected = match what {
                Watched::Pods | Watched::Namespaces | Watched::Node => Reread::Everything,
                Watched::Services | Watched::EndpointSlices => Reread::Services,
                Watched::NetworkPolicies | Watched::L4Policies | Watched::ClusterL4Policies => {
                    Reread::Nothing
                }
            };
            assert_eq!(after(&[what], Some(&listed), Some(7)), expected, "{what}");
            // Pods with anything else: everything.
            assert_eq!(
                after(&[what, Watched::Pods], Some(&listed), Some(7)),
                Reread::Everything
            );
        }
        assert_eq!(after(&[], Some(&listed), Some(7)), Reread::Nothing);
        // The cgroups were walked again: the workloads' cgroups may differ.
        assert_eq!(after(&[], Some(&listed), Some(8)), Reread::Everything);
        // Not listed now, or then: nothing to compare.
        assert_eq!(after(&[], Some(&listed), None), Reread::Everything);
        assert_eq!(after(&[], Some(&kept(None)), None), Reread::Everything);
        // Nothing kept (the first load, or the last one failed its check).
        assert_eq!(after(&[], None, Some(7)), Reread::Everything);

        // Pods whose events change nothing the view reads: not read again,
        // unless something else says so.
        let alike = |dirty: &[Watched], walk| {
            Reread::after(
                &dirty.iter().copied().collect(),
                Some(&listed),
                walk,
                false,
                || true,
            )
        };
        assert_eq!(alike(&[Watched::Pods], Some(7)), Reread::Nothing);
        assert_eq!(
            alike(&[Watched::Pods, Watched::EndpointSlices], Some(7)),
            Reread::Services
        );
        assert_eq!(
            alike(&[Watched::Pods, Watched::Namespaces], Some(7)),
            Reread::Everything
        );
        assert_eq!(alike(&[Watched::Pods], Some(8)), Reread::Everything);
        // Asked only when pods changed.
        let asked = std::cell::Cell::new(false);
        let policies = [Watched::NetworkPolicies].into_iter().collect();
        Reread::after(&policies, Some(&listed), Some(7), true, || {
            asked.set(true);
            true
        });
        assert!(!asked.get());

        // Pods that change the view, all named by their events: only
        // those, while nothing else the view reads changed and no Service
        // was dropped for a clash (it may come back with a pod gone).
        let named = |dirty: &[Watched], kept: &KeptView, walk| {
            Reread::after(
                &dirty.iter().copied().collect(),
                Some(kept),
                walk,
                true,
                || false,
            )
        };
        assert_eq!(named(&[Watched::Pods], &listed, Some(7)), Reread::NamedPods);
        assert_eq!(
            named(&[Watched::Pods, Watched::NetworkPolicies], &listed, Some(7)),
            Reread::NamedPods
        );
        for other in [
            Watched::Services,
            Watched::EndpointSlices,
            Watched::Namespaces,
            Watched::Node,
        ] {
            assert_eq!(
                named(&[Watched::Pods, other], &listed, Some(7)),
                Reread::Everything,
                "{other}"
            );
        }
        assert_eq!(
            named(&[Watched::Pods], &listed, Some(8)),
            Reread::Everything
        );
        let clashed = KeptView {
            service_problems: vec!["Service x/s: cluster IP clash".into()],
            ..kept(Some(7))
        };
        assert_eq!(
            named(&[Watched::Pods], &clashed, Some(7)),
            Reread::Everything
        );
    }

    /// A load learns which pods the events named, until they are too many
    /// or a relist names none; then it reads every pod.
    #[test]
    fn the_pods_events_name_are_kept_for_the_next_load() {
        let meta = |name: &str| ObjectMeta {
            name: Some(name.into()),
            namespace: Some("x".into()),
            ..Default::default()
        };
        let mut p = Progress::default();
        // Before the first load nothing is known: every pod.
        p.changed_object(Watched::Pods, &meta("a"));
        assert_eq!(p.take_marks().1, None);
        p.changed_object(Watched::Pods, &meta("a"));
        p.changed_object(Watched::Services, &meta("s"));
        p.changed_object(Watched::Pods, &meta("b"));
        let (dirty, named) = p.take_marks();
        assert_eq!(dirty.len(), 2);
        let pair = |name: &str| ("x".to_string(), name.to_string());
        assert_eq!(named, Some([pair("a"), pair("b")].into()));
        assert_eq!(p.take_marks(), (BTreeSet::new(), Some(BTreeSet::new())));
        p.changed_object(Watched::Pods, &meta("a"));
        p.relisted(Watched::Pods);
        assert_eq!(p.take_marks().1, None, "a relist names no pod");
        for i in 0..=NAMED_PODS_MAX {
            p.changed_object(Watched::Pods, &meta(&format!("p{i}")));
        }
        assert_eq!(p.take_marks().1, None, "too many to check one by one");
    }

    /// Every watch event marks its resource for the next load, and a load
    /// takes the marks: none is lost between two loads.
    #[test]
    fn every_change_is_marked_until_a_load_takes_it() {
        let mut p = Progress::default();
        p.changed(Watched::Services);
        p.changed(Watched::Pods);
        let taken = std::mem::take(&mut p.dirty);
        assert_eq!(
            taken.into_iter().collect::<Vec<_>>(),
            [Watched::Pods, Watched::Services]
        );
        assert!(p.dirty.is_empty());
        p.changed(Watched::L4Policies);
        assert!(p.dirty.contains(&Watched::L4Policies));
    }

    /// The histogram's start for a burst is its first change: before the
    /// fix it was the last one, understating the wait of the rest.
    #[test]
    fn a_pass_is_timed_from_the_oldest_change_it_takes() {
        let mut p = Progress::default();
        p.changed(Watched::Pods);
        std::thread::sleep(Duration::from_millis(20));
        // Every later change of the burst is seen after this.
        let second_seen = SystemTime::now();
        p.changed(Watched::Pods);
        p.changed(Watched::Services);
        let first = p.changed_at(&Revision::Events(3), None).unwrap();
        assert!(first < second_seen, "timed from a later change");
        // Once that pass applied revision 3, a new change starts afresh.
        std::thread::sleep(Duration::from_millis(20));
        let later = SystemTime::now();
        p.changed(Watched::Pods);
        let next = p
            .changed_at(&Revision::Events(4), Some(&Revision::Events(3)))
            .unwrap();
        assert!(next >= later);
        assert_eq!(
            p.changed_at(&Revision::Events(4), Some(&Revision::Events(4))),
            None
        );
    }
}
