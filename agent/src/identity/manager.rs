//! The agent's identity manager: one certificate per service account with a
//! pod on this node.
//!
//! - **Demand.** The sync loop publishes the local identities after every
//!   pass; an identity's certificate is requested when it first appears and
//!   dropped, key and all, when it leaves.
//! - **Keys.** ECDSA P-256, made in memory for each request; never written,
//!   never sent (the CA gets a CSR).
//! - **Renewal** at half-life ± 10 % of the lifetime ([`schedule`]).
//!   While the CA fails, retries back off (1 s doubling, capped at a minute
//!   and at a quarter of the lifetime) with one last attempt shortly before
//!   expiry; the current certificate is kept until it expires, then dropped
//!   (state `expired`).
//! - **Outputs.** The certificates and keys (for the mTLS data path), the
//!   revocations and the trust bundle on watch channels; the public facts in
//!   the identities file (`portcullis identity`); metrics.
//!
//! It runs on its own thread with its own runtime, like the admin server.

pub mod credential;
pub mod inputs;
pub mod schedule;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    sync::{oneshot, watch},
    task::{AbortHandle, JoinSet},
};
use tracing::{info, warn};

use self::{credential::Credential, schedule::Held};
use super::{
    authority::CaDir,
    bundle::TrustBundle,
    certificate::CertificateInfo,
    issuer::{
        ca_dir::CaDirIssuer,
        remote::{RemoteError, RemoteIssuer},
        Granted, IssueError, Issuer,
    },
    kube_watch,
    local::{unix, IdentityState, LastError, LocalIdentities, LocalIdentity},
    revocation::RevocationView,
    spiffe::SpiffeId,
};
use crate::{metrics::IdentityMetrics, source::file::error_chain, worker::Worker};

/// The manager wakes at least this often, so a jump of the wall clock
/// (certificate times are wall-clock) is noticed.
const MAX_SLEEP: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{what} comes from the Kubernetes API: run the agent with --kubernetes")]
    NeedsKubernetes { what: &'static str },
    #[error("the remote CA")]
    Remote {
        #[source]
        source: RemoteError,
    },
    #[error("starting the identity manager's thread")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
}

/// How the agent gets and keeps its identities.
#[derive(Clone, Debug)]
pub struct IdentityOptions {
    pub trust_domain: String,
    pub issuer: IssuerOptions,
    pub revocations: RevocationSource,
    /// Where `portcullis identity` reads them; not published when `None`.
    pub identities_file: Option<PathBuf>,
    /// Where the mesh publishes its live connections (`portcullis
    /// connections`).
    pub connections_file: Option<PathBuf>,
    /// The longest wait between retries (see [`schedule`]).
    pub max_backoff: Duration,
}

impl IdentityOptions {
    /// Standalone with an in-process CA: revocations from
    /// `<dir>/revocations.yaml`.
    pub fn ca_dir(dir: impl Into<PathBuf>, lifetime: Duration) -> Self {
        let dir = dir.into();
        Self {
            trust_domain: super::spiffe::DEFAULT_TRUST_DOMAIN.into(),
            revocations: RevocationSource::File(dir.join("revocations.yaml")),
            issuer: IssuerOptions::CaDir { dir, lifetime },
            identities_file: None,
            connections_file: None,
            max_backoff: schedule::DEFAULT_MAX_BACKOFF,
        }
    }
}

#[derive(Clone, Debug)]
pub enum IssuerOptions {
    /// Sign in process from a CA directory. `lifetime` is not range-checked
    /// here (the CLI does, with [`super::authority::check_lifetime`]), so
    /// tests can renew in seconds.
    CaDir { dir: PathBuf, lifetime: Duration },
    /// Ask `portcullis ca` over HTTPS.
    Remote {
        url: String,
        /// A projected ServiceAccount token (audience `portcullis-ca`),
        /// read at every request.
        token_file: PathBuf,
        /// The roots the CA's serving certificate must chain to.
        bundle: BundleSource,
        timeout: Duration,
    },
}

#[derive(Clone, Debug)]
pub enum BundleSource {
    /// A PEM file, re-read when it changes.
    File(PathBuf),
    /// A ConfigMap's `roots.pem` ([`kube_watch::watch_bundle`]).
    ConfigMap { namespace: String, name: String },
}

#[derive(Clone, Debug)]
pub enum RevocationSource {
    /// A revocations file, re-read when it changes.
    File(PathBuf),
    /// `PortcullisRevocation` objects ([`kube_watch::watch_revocations`]).
    Kubernetes { staleness: Duration },
}

/// The current certificates with their keys, by identity.
pub type Certificates = Arc<BTreeMap<SpiffeId, Arc<Credential>>>;

/// What the manager publishes, and how to stop it.
pub struct IdentityHandle {
    /// The certificates and keys the mTLS data path presents.
    pub certificates: watch::Receiver<Certificates>,
    /// The public facts, as in the identities file.
    pub identities: watch::Receiver<LocalIdentities>,
    /// What the data path consults before trusting a peer: unknown fails
    /// closed.
    pub revocations: watch::Receiver<RevocationView>,
    /// The roots peers' certificates must chain to; `None` until known.
    pub bundle: watch::Receiver<Option<TrustBundle>>,
    /// The manager's thread, stopped when the handle goes.
    _worker: Worker,
}

impl IdentityHandle {
    /// Stops the manager: the keys are dropped and the identities file is
    /// removed (the identities no longer exist anywhere).
    pub fn stop(self) {}
}

/// The issuers the agent is built with.
enum AnyIssuer {
    CaDir(CaDirIssuer),
    Remote(RemoteIssuer),
}

impl Issuer for AnyIssuer {
    async fn issue(&self, id: &SpiffeId, csr_pem: &str) -> Result<Granted, IssueError> {
        match self {
            Self::CaDir(i) => i.issue(id, csr_pem).await,
            Self::Remote(i) => i.issue(id, csr_pem).await,
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::CaDir(i) => i.describe(),
            Self::Remote(i) => i.describe(),
        }
    }
}

/// Starts the manager on its own thread. `client` is the Kubernetes
/// source's, for sources that come from the API; `demand` is the set of
/// identities with a local pod, fed by the sync loop.
pub fn start(
    options: IdentityOptions,
    client: Option<kube::Client>,
    demand: watch::Receiver<BTreeSet<SpiffeId>>,
    metrics: IdentityMetrics,
) -> Result<IdentityHandle, ManagerError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ManagerError::Runtime { source })?;
    // The watchers are spawned on this runtime and die with it.
    let guard = runtime.enter();
    let (revocations, _) = match &options.revocations {
        RevocationSource::File(path) => {
            inputs::poll_revocations_file(path.clone(), inputs::POLL_INTERVAL)
        }
        RevocationSource::Kubernetes { staleness } => {
            let client = client.clone().ok_or(ManagerError::NeedsKubernetes {
                what: "the PortcullisRevocation list",
            })?;
            kube_watch::watch_revocations(client, *staleness)
        }
    };
    let (issuer, bundle) = match &options.issuer {
        IssuerOptions::CaDir { dir, lifetime } => {
            let ca = CaDir::at(dir);
            let (bundle, _) = inputs::poll_ca_dir_bundle(ca.clone());
            (
                AnyIssuer::CaDir(CaDirIssuer::new(ca, revocations.clone(), *lifetime)),
                bundle,
            )
        }
        IssuerOptions::Remote {
            url,
            token_file,
            bundle,
            timeout,
        } => {
            let (rx, from) = match bundle {
                BundleSource::File(path) => (
                    inputs::poll_bundle_file(path.clone()).0,
                    format!("the trust bundle file {}", path.display()),
                ),
                BundleSource::ConfigMap { namespace, name } => {
                    let client = client.clone().ok_or(ManagerError::NeedsKubernetes {
                        what: "the trust bundle ConfigMap",
                    })?;
                    (
                        kube_watch::watch_bundle(client, namespace, name).0,
                        format!("ConfigMap {namespace}/{name}"),
                    )
                }
            };
            let issuer = RemoteIssuer::new(url, token_file.clone(), rx.clone(), from, *timeout)
                .map_err(|source| ManagerError::Remote { source })?;
            (AnyIssuer::Remote(issuer), rx)
        }
    };
    drop(guard);
    let (certificates_tx, certificates) = watch::channel(Certificates::default());
    let ca = issuer.describe();
    let (identities_tx, identities) = watch::channel(LocalIdentities {
        ca: ca.clone(),
        identities: Vec::new(),
    });
    metrics.enable();
    let manager = Manager::new(
        issuer,
        options.identities_file,
        options.max_backoff,
        metrics,
        certificates_tx,
        identities_tx,
    );
    info!(ca = %ca, trust_domain = %options.trust_domain, "identity manager started");
    let revocations_rx = revocations.clone();
    let worker = Worker::spawn("portcullis-identity", runtime, move |stop| {
        manager.run(demand, revocations_rx, stop)
    })
    .map_err(|source| ManagerError::Runtime { source })?;
    Ok(IdentityHandle {
        certificates,
        identities,
        revocations,
        bundle,
        _worker: worker,
    })
}

/// One identity with a local pod.
struct Entry {
    current: Option<Arc<Credential>>,
    /// The certificate that expired before a renewal succeeded.
    expired: Option<CertificateInfo>,
    /// The lifetime of the last certificate, for the backoff cap.
    lifetime: Option<Duration>,
    /// When to ask next (renewal or retry), while no request is under way.
    next: SystemTime,
    in_flight: Option<(u64, AbortHandle)>,
    failures: u32,
    last_error: Option<LastError>,
}

impl Entry {
    fn new(now: SystemTime) -> Self {
        Self {
            current: None,
            expired: None,
            lifetime: None,
            next: now,
            in_flight: None,
            failures: 0,
            last_error: None,
        }
    }

    fn state(&self, now: SystemTime) -> IdentityState {
        match (&self.current, &self.last_error) {
            (Some(_), Some(_)) => IdentityState::Failing,
            (Some(_), None) if self.in_flight.is_some() || self.next <= now => {
                IdentityState::Renewing
            }
            (Some(_), None) => IdentityState::Valid,
            (None, _) if self.expired.is_some() => IdentityState::Expired,
            (None, Some(_)) => IdentityState::Failing,
            (None, None) => IdentityState::Pending,
        }
    }
}

/// A finished request.
struct Outcome {
    id: SpiffeId,
    attempt: u64,
    result: Result<Credential, IssueError>,
    took: Duration,
}

struct Manager<I> {
    issuer: Arc<I>,
    identities_file: Option<PathBuf>,
    max_backoff: Duration,
    metrics: IdentityMetrics,
    entries: BTreeMap<SpiffeId, Entry>,
    tasks: JoinSet<Outcome>,
    attempts: u64,
    certificates: watch::Sender<Certificates>,
    identities: watch::Sender<LocalIdentities>,
    /// What the identities file holds, to write only changes.
    written: Option<LocalIdentities>,
    write_error: Option<String>,
}

impl<I: Issuer> Manager<I> {
    /// A manager with no identities yet, publishing on these channels.
    fn new(
        issuer: I,
        identities_file: Option<PathBuf>,
        max_backoff: Duration,
        metrics: IdentityMetrics,
        certificates: watch::Sender<Certificates>,
        identities: watch::Sender<LocalIdentities>,
    ) -> Self {
        Self {
            issuer: Arc::new(issuer),
            identities_file,
            max_backoff,
            metrics,
            entries: BTreeMap::new(),
            tasks: JoinSet::new(),
            attempts: 0,
            certificates,
            identities,
            written: None,
            write_error: None,
        }
    }

    async fn run(
        mut self,
        mut demand: watch::Receiver<BTreeSet<SpiffeId>>,
        mut revocations: watch::Receiver<RevocationView>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let initial = demand.borrow_and_update().clone();
        self.set_demand(&initial, SystemTime::now());
        self.revocations_changed(&revocations.borrow_and_update().clone());
        loop {
            let now = SystemTime::now();
            self.expire(now);
            self.start_due(now);
            self.publish(now);
            let sleep = self.next_wake(now);
            tokio::select! {
                _ = &mut stop => break,
                changed = demand.changed() => {
                    // The sync loop has ended: so does the agent.
                    if changed.is_err() {
                        break;
                    }
                    let wanted = demand.borrow_and_update().clone();
                    self.set_demand(&wanted, SystemTime::now());
                }
                changed = revocations.changed() => {
                    if changed.is_ok() {
                        let view = revocations.borrow_and_update().clone();
                        self.revocations_changed(&view);
                    }
                }
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Ok(outcome) = done {
                        self.finish(outcome, SystemTime::now());
                    }
                }
                _ = tokio::time::sleep(sleep) => {}
            }
        }
        self.tasks.abort_all();
        for id in self.entries.keys() {
            self.metrics.remove(id);
        }
        self.entries.clear();
        self.certificates.send_replace(Certificates::default());
        if let Some(path) = &self.identities_file {
            let _ = std::fs::remove_file(path);
        }
        info!("identity manager stopped; its keys are gone");
    }

    fn revocations_changed(&self, view: &RevocationView) {
        self.metrics
            .set_revocations_known(matches!(view, RevocationView::Known(_)));
    }

    fn set_demand(&mut self, wanted: &BTreeSet<SpiffeId>, now: SystemTime) {
        let gone: Vec<SpiffeId> = self
            .entries
            .keys()
            .filter(|id| !wanted.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(entry) = self.entries.remove(&id) {
                if let Some((_, task)) = entry.in_flight {
                    task.abort();
                }
            }
            self.metrics.remove(&id);
            info!(spiffe_id = %id, "no local pod has this identity any more; its certificate and key are dropped");
        }
        for id in wanted {
            if !self.entries.contains_key(id) {
                info!(spiffe_id = %id, "a local pod has this identity; requesting a certificate");
                self.entries.insert(id.clone(), Entry::new(now));
            }
        }
    }

    /// Drops certificates past their expiry.
    fn expire(&mut self, now: SystemTime) {
        for (id, entry) in &mut self.entries {
            let Some(current) = &entry.current else {
                continue;
            };
            if current.info.not_after <= now {
                warn!(
                    spiffe_id = %id,
                    serial = %current.info.serial,
                    last_error = entry.last_error.as_ref().map_or("", |e| e.message.as_str()),
                    "certificate expired before it could be renewed; dropped"
                );
                entry.expired = Some(current.info.clone());
                entry.current = None;
            }
        }
    }

    /// Starts the requests that are due.
    fn start_due(&mut self, now: SystemTime) {
        for (id, entry) in &mut self.entries {
            if entry.in_flight.is_some() || entry.next > now {
                continue;
            }
            self.attempts += 1;
            let attempt = self.attempts;
            let issuer = self.issuer.clone();
            let id = id.clone();
            let task = self.tasks.spawn(async move {
                let started = Instant::now();
                let result = async {
                    let request = credential::request(&id)?;
                    let granted = issuer.issue(&id, &request.csr_pem).await?;
                    credential::accept(&id, request.key, granted, SystemTime::now())
                }
                .await;
                Outcome {
                    id,
                    attempt,
                    result,
                    took: started.elapsed(),
                }
            });
            entry.in_flight = Some((attempt, task));
        }
    }

    fn finish(&mut self, outcome: Outcome, now: SystemTime) {
        let Some(entry) = self.entries.get_mut(&outcome.id) else {
            return;
        };
        if entry.in_flight.as_ref().map(|(a, _)| *a) != Some(outcome.attempt) {
            return;
        }
        entry.in_flight = None;
        self.metrics.observe(outcome.took);
        let id = outcome.id;
        match outcome.result {
            Ok(credential) => {
                let info = &credential.info;
                let renewal = entry.current.is_some() || entry.expired.is_some();
                let lifetime = info
                    .not_after
                    .duration_since(info.not_before)
                    .unwrap_or_default();
                entry.next =
                    schedule::renewal_at(info.not_before, info.not_after, schedule::jitter());
                entry.lifetime = Some(lifetime);
                entry.failures = 0;
                entry.last_error = None;
                entry.expired = None;
                self.metrics.set_expiry(&id, info.not_after);
                if renewal {
                    self.metrics.renewed();
                }
                info!(
                    spiffe_id = %id,
                    serial = %info.serial,
                    not_after = unix(info.not_after),
                    renew_at = unix(entry.next),
                    took_ms = outcome.took.as_millis() as u64,
                    "{}",
                    if renewal { "certificate renewed" } else { "certificate issued" }
                );
                entry.current = Some(Arc::new(credential));
            }
            Err(e) => {
                entry.failures += 1;
                let reason = e.reason();
                self.metrics.failed(reason);
                let message = error_chain(&e);
                let held = Held {
                    not_after: entry.current.as_ref().map(|c| c.info.not_after),
                    lifetime: entry.lifetime,
                };
                entry.next = schedule::retry_at(
                    now,
                    entry.failures,
                    held,
                    self.max_backoff,
                    schedule::jitter(),
                );
                warn!(
                    spiffe_id = %id,
                    reason = reason.as_str(),
                    failures = entry.failures,
                    retry_in_ms = entry.next.duration_since(now).unwrap_or_default().as_millis() as u64,
                    keeping_serial = entry.current.as_ref().map_or("", |c| c.info.serial.as_str()),
                    "certificate request failed: {message}"
                );
                entry.last_error = Some(LastError {
                    reason: reason.as_str().into(),
                    message,
                    at: unix(now),
                    failures: entry.failures,
                });
            }
        }
    }

    /// How long until something is due: a request or an expiry.
    fn next_wake(&self, now: SystemTime) -> Duration {
        self.entries
            .values()
            .flat_map(|e| {
                let next = e.in_flight.is_none().then_some(e.next);
                let expiry = e.current.as_ref().map(|c| c.info.not_after);
                next.into_iter().chain(expiry)
            })
            .min()
            .map_or(MAX_SLEEP, |at| at.duration_since(now).unwrap_or_default())
            .min(MAX_SLEEP)
    }

    fn publish(&mut self, now: SystemTime) {
        let certificates: BTreeMap<SpiffeId, Arc<Credential>> = self
            .entries
            .iter()
            .filter_map(|(id, e)| Some((id.clone(), e.current.clone()?)))
            .collect();
        self.certificates.send_if_modified(|published| {
            let same = published.len() == certificates.len()
                && published
                    .iter()
                    .zip(&certificates)
                    .all(|((a, x), (b, y))| a == b && Arc::ptr_eq(x, y));
            if !same {
                *published = Arc::new(certificates);
            }
            !same
        });
        let mut counts: BTreeMap<IdentityState, usize> =
            IdentityState::ALL.iter().map(|s| (*s, 0)).collect();
        let identities: Vec<LocalIdentity> = self
            .entries
            .iter()
            .map(|(id, e)| {
                let state = e.state(now);
                *counts.entry(state).or_default() += 1;
                let info = e.current.as_ref().map(|c| &c.info).or(e.expired.as_ref());
                LocalIdentity {
                    spiffe_id: id.to_string(),
                    state,
                    serial: info.map(|i| i.serial.clone()),
                    not_before: info.map(|i| unix(i.not_before)),
                    not_after: info.map(|i| unix(i.not_after)),
                    issuer: info.map(|i| i.issuer.clone()),
                    next_attempt: e.in_flight.is_none().then(|| unix(e.next)),
                    last_error: e.last_error.clone(),
                }
            })
            .collect();
        self.metrics
            .set_states(&counts.into_iter().collect::<Vec<_>>());
        let ca = self.identities.borrow().ca.clone();
        let all = LocalIdentities { ca, identities };
        self.identities.send_if_modified(|current| {
            let changed = *current != all;
            if changed {
                *current = all.clone();
            }
            changed
        });
        if let Some(path) = &self.identities_file {
            if self.written.as_ref() != Some(&all) {
                match all.write(path) {
                    Ok(()) => {
                        self.written = Some(all);
                        self.write_error = None;
                    }
                    Err(e) => {
                        let text = error_chain(&e);
                        if self.write_error.as_ref() != Some(&text) {
                            warn!("publishing the local identities: {text}");
                            self.write_error = Some(text);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
