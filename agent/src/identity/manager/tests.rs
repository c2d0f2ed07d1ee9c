//! The manager against a real in-process CA in a temporary directory.

use prometheus_client::registry::Registry;

use super::*;
use crate::identity::revocation::RevocationSet;

struct Running {
    dir: tempfile::TempDir,
    demand: watch::Sender<BTreeSet<SpiffeId>>,
    revocations: watch::Sender<RevocationView>,
    certificates: watch::Receiver<Certificates>,
    identities: watch::Receiver<LocalIdentities>,
    registry: Registry,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn file(&self) -> PathBuf {
        self.dir.path().join("identities.json")
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }

    async fn until(
        &mut self,
        what: &str,
        f: impl FnMut(&LocalIdentities) -> bool,
    ) -> LocalIdentities {
        let found = tokio::time::timeout(Duration::from_secs(10), self.identities.wait_for(f))
            .await
            .map(|r| r.unwrap().clone());
        found.unwrap_or_else(|_| panic!("{what}: {:#?}", *self.identities.borrow()))
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", sa).unwrap()
}

fn start_with(lifetime: Duration) -> Running {
    let dir = tempfile::tempdir().unwrap();
    CaDir::init(dir.path().join("ca"), "r1").unwrap();
    let (revocations, revocations_rx) = watch::channel(inputs::no_revocations());
    let issuer = CaDirIssuer::new(
        CaDir::at(dir.path().join("ca")),
        revocations_rx.clone(),
        lifetime,
    );
    let mut registry = Registry::default();
    let metrics = IdentityMetrics::register(&mut registry);
    metrics.enable();
    let (certificates_tx, certificates) = watch::channel(Certificates::default());
    let (identities_tx, identities) = watch::channel(LocalIdentities::default());
    let manager = Manager::new(
        issuer,
        Some(dir.path().join("identities.json")),
        Duration::from_secs(60),
        metrics,
        certificates_tx,
        identities_tx,
    );
    let (demand, demand_rx) = watch::channel(BTreeSet::new());
    let (stop, stop_rx) = oneshot::channel();
    let task = tokio::spawn(manager.run(demand_rx, revocations_rx, stop_rx));
    Running {
        dir,
        demand,
        revocations,
        certificates,
        identities,
        registry,
        stop: Some(stop),
        task,
    }
}

fn state_of(all: &LocalIdentities, id: &SpiffeId) -> Option<IdentityState> {
    all.identities
        .iter()
        .find(|i| i.spiffe_id == id.to_string())
        .map(|i| i.state)
}

#[tokio::test]
async fn an_identity_gets_a_certificate_when_it_appears_and_loses_it_when_it_goes() {
    let mut m = start_with(Duration::from_secs(600));
    let (web, api) = (id("web"), id("api"));
    m.demand.send_replace([web.clone(), api.clone()].into());
    let all = m
        .until("both valid", |all| {
            all.identities.len() == 2
                && all
                    .identities
                    .iter()
                    .all(|i| i.state == IdentityState::Valid)
        })
        .await;
    let certificates = m.certificates.borrow().clone();
    assert_eq!(certificates.len(), 2);
    let web_credential = Arc::downgrade(&certificates[&web]);
    let published = all
        .identities
        .iter()
        .find(|i| i.spiffe_id == web.to_string())
        .unwrap();
    assert_eq!(
        published.serial.as_deref(),
        Some(certificates[&web].info.serial.as_str())
    );
    // Renewal is due at 40..60 % of the lifetime (605 s, backdated 5 s).
    let (nb, next) = (
        published.not_before.unwrap(),
        published.next_attempt.unwrap(),
    );
    assert!((nb + 242..=nb + 363).contains(&next), "{nb} {next}");
    drop(certificates);
    assert_eq!(LocalIdentities::read(&m.file()).unwrap(), all);
    let text = m.metrics();
    assert!(
        text.contains(&format!(
            "identity_certificate_expiry_timestamp_seconds{{spiffe_id=\"{web}\"}}"
        )),
        "{text}"
    );
    assert!(
        text.contains("identity_identities{state=\"valid\"} 2"),
        "{text}"
    );

    m.demand.send_replace([api.clone()].into());
    m.until("web gone", |all| all.identities.len() == 1).await;
    assert!(!m.certificates.borrow().contains_key(&web));
    assert!(
        web_credential.upgrade().is_none(),
        "the key of an identity without a local pod is dropped"
    );
    let text = m.metrics();
    assert!(!text.contains(&format!("spiffe_id=\"{web}\"")), "{text}");
    assert!(text.contains(&format!("spiffe_id=\"{api}\"")), "{text}");
    assert!(text.contains("identity_renewals_total 0"), "{text}");
    let file = m.file();
    m.stop().await;
    assert!(!file.exists(), "a stopped manager withdraws its identities");
}

#[tokio::test]
async fn a_failing_ca_keeps_the_certificate_and_the_reason_is_counted() {
    let mut m = start_with(Duration::from_secs(600));
    let web = id("web");
    m.demand.send_replace([web.clone()].into());
    m.until("valid", |all| {
        state_of(all, &web) == Some(IdentityState::Valid)
    })
    .await;
    let serial = m.certificates.borrow()[&web].info.serial.clone();

    // A revoked identity is refused and counted; un-revoked, it is granted
    // at the next retry.
    let api = id("api");
    let revoked = RevocationSet::parse(
        "revocations:\n- spiffeId: spiffe://cluster.local/ns/shop/sa/api\n  reason: test\n",
        "t",
    )
    .unwrap();
    m.revocations
        .send_replace(RevocationView::Known(Arc::new(revoked)));
    m.demand.send_replace([web.clone(), api.clone()].into());
    let all = m
        .until("api refused", |all| {
            all.identities.iter().any(|i| {
                i.spiffe_id == api.to_string()
                    && i.last_error.as_ref().is_some_and(|e| e.reason == "revoked")
            })
        })
        .await;
    assert_eq!(state_of(&all, &api), Some(IdentityState::Failing));
    assert_eq!(state_of(&all, &web), Some(IdentityState::Valid));
    assert!(!m.certificates.borrow().contains_key(&api));
    let text = m.metrics();
    assert!(
        text.contains("identity_issuance_failures_total{reason=\"revoked\"} 1"),
        "{text}"
    );
    m.revocations.send_replace(inputs::no_revocations());
    m.until("api valid", |all| {
        state_of(all, &api) == Some(IdentityState::Valid)
    })
    .await;

    // The CA directory goes away: requests fail as unavailable.
    std::fs::rename(m.dir.path().join("ca"), m.dir.path().join("away")).unwrap();
    let other = id("other");
    m.demand
        .send_replace([web.clone(), api.clone(), other.clone()].into());
    let all = m
        .until("other failing twice", |all| {
            all.identities.iter().any(|i| {
                i.spiffe_id == other.to_string()
                    && i.last_error.as_ref().is_some_and(|e| e.failures >= 2)
            })
        })
        .await;
    let failing = all
        .identities
        .iter()
        .find(|i| i.spiffe_id == other.to_string())
        .unwrap();
    assert_eq!(failing.state, IdentityState::Failing);
    assert_eq!(failing.last_error.as_ref().unwrap().reason, "unavailable");
    assert!(
        failing.last_error.as_ref().unwrap().message.contains("ca"),
        "{failing:?}"
    );
    assert_eq!(
        m.certificates.borrow()[&web].info.serial,
        serial,
        "web's certificate is untouched"
    );
    let text = m.metrics();
    assert!(
        text.contains("identity_issuance_failures_total{reason=\"unavailable\"} 2")
            || text.contains("identity_issuance_failures_total{reason=\"unavailable\"} 3"),
        "{text}"
    );

    // Back: the next retry (2 s, then 4 s) succeeds.
    std::fs::rename(m.dir.path().join("away"), m.dir.path().join("ca")).unwrap();
    m.until("other valid", |all| {
        state_of(all, &other) == Some(IdentityState::Valid)
    })
    .await;
    m.stop().await;
}

#[test]
fn states_follow_the_certificate_and_the_last_error() {
    let now = SystemTime::now();
    let mut e = Entry::new(now + Duration::from_secs(1));
    assert_eq!(e.state(now), IdentityState::Pending);
    e.last_error = Some(LastError {
        reason: "unreachable".into(),
        message: "m".into(),
        at: 0,
        failures: 1,
    });
    assert_eq!(e.state(now), IdentityState::Failing);
    e.expired = Some(CertificateInfo {
        spiffe_id: None,
        serial: "01".into(),
        not_before: now,
        not_after: now,
        issuer: String::new(),
        subject: String::new(),
        is_ca: false,
    });
    assert_eq!(e.state(now), IdentityState::Expired);
}
