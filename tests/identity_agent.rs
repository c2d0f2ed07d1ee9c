//! The agent's identity manager in a real agent (kernel programs attached
//! to a test cgroup, workloads from a file), issuing in process from a
//! temporary CA directory: renewals of 20-second certificates, a CA outage
//! (the directory moved away) with the certificate kept until it expires,
//! a revoked identity refused, and `portcullis identity`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant, SystemTime},
};

use portcullis_agent::{
    app::{self, AgentHandle, AgentOptions, SourceOptions},
    identity::{
        authority::CaDir,
        local::{IdentityState, LocalIdentities},
        manager::{Certificates, IdentityOptions},
        revocation::RevocationStatus,
        spiffe::SpiffeId,
    },
};

const X: &str = "spiffe://cluster.local/ns/x/sa/web";
const Y: &str = "spiffe://cluster.local/ns/y/sa/default";

/// An agent on its own cgroup subtree and pins, with a CA directory; all
/// removed on drop.
struct Agent {
    handle: Option<AgentHandle>,
    dir: tempfile::TempDir,
    cgroup_root: PathBuf,
    pin_dir: PathBuf,
}

impl Agent {
    /// Local workloads x/a, x/b (one identity: service account x/web) and
    /// y/a (y's default service account); z/a runs elsewhere (no identity here).
    fn start(name: &str, lifetime: Duration, before: impl FnOnce(&Path)) -> Self {
        portcullis_tests::require_root();
        let mount = portcullis_agent::cgroup::cgroup2_mount().unwrap();
        let group = format!("portcullis-idtest-{name}");
        let cgroup_root = mount.join(&group);
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/portcullis-idtest-{name}"));
        // Leftovers of a crashed run.
        let _ = portcullis_agent::bpf::loader::uninstall(&pin_dir);
        remove_cgroups(&cgroup_root);
        let dir = tempfile::tempdir().unwrap();
        let mut workloads = String::from(
            "nodeIPs: [192.0.2.1]\nnamespaces: [{name: x}, {name: y}, {name: z}]\nworkloads:\n",
        );
        for (i, (ns, pod, sa, local)) in [
            ("x", "a", "web", true),
            ("x", "b", "web", true),
            ("y", "a", "default", true),
            ("z", "a", "web", false),
        ]
        .into_iter()
        .enumerate()
        {
            let cgroup = if local {
                let rel = format!("{group}/{ns}-{pod}");
                std::fs::create_dir_all(mount.join(&rel)).unwrap();
                format!(", cgroup: {rel}")
            } else {
                String::new()
            };
            workloads.push_str(&format!(
                "  - {{name: {pod}, namespace: {ns}, serviceAccount: {sa}, ips: [192.0.2.{}]{cgroup}}}\n",
                10 + i
            ));
        }
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("workloads.yaml"), workloads).unwrap();
        CaDir::init(dir.path().join("ca"), "r1").unwrap();
        before(dir.path());
        let mut identity = IdentityOptions::ca_dir(dir.path().join("ca"), lifetime);
        identity.identities_file = Some(dir.path().join("identities.json"));
        let handle = app::start(AgentOptions {
            source: SourceOptions::Files {
                policies_dir: dir.path().join("policies"),
                workloads: dir.path().join("workloads.yaml"),
            },
            pin_dir: pin_dir.clone(),
            cgroup_mount: None,
            cgroup_root: Some(cgroup_root.clone()),
            names_file: None,
            admin_addr: None,
            admin_secure: None,
            state_dir: None,
            guard_frames: false,
            map_capacities: Default::default(),
            identity: Some(identity),
        })
        .unwrap_or_else(|e| panic!("starting the agent: {}", portcullis_tests::chain(&e)));
        Self {
            handle: Some(handle),
            dir,
            cgroup_root,
            pin_dir,
        }
    }

    fn handle(&self) -> &AgentHandle {
        self.handle.as_ref().unwrap()
    }

    fn certificates(&self) -> Certificates {
        self.handle()
            .identity
            .as_ref()
            .unwrap()
            .certificates
            .borrow()
            .clone()
    }

    fn identities(&self) -> LocalIdentities {
        self.handle()
            .identity
            .as_ref()
            .unwrap()
            .identities
            .borrow()
            .clone()
    }

    fn identities_file(&self) -> PathBuf {
        self.dir.path().join("identities.json")
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    fn metrics(&self) -> String {
        self.handle().metrics.encode().unwrap()
    }

    /// Polls `f` every 100 ms until it answers, for at most `limit`.
    fn until<T>(&self, what: &str, limit: Duration, mut f: impl FnMut(&Self) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(t) = f(self) {
                return t;
            }
            assert!(
                start.elapsed() < limit,
                "{what}: not within {limit:?}; identities: {:#?}",
                self.identities()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.stop();
        }
        let _ = portcullis_agent::bpf::loader::uninstall(&self.pin_dir);
        remove_cgroups(&self.cgroup_root);
    }
}

fn remove_cgroups(root: &Path) {
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(root);
}

fn id(text: &str) -> SpiffeId {
    text.parse().unwrap()
}

/// The value of the sample `series` (`name{labels}` exactly), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn expiry_series(id: &str) -> String {
    format!("portcullis_identity_certificate_expiry_timestamp_seconds{{spiffe_id=\"{id}\"}}")
}

fn failures(text: &str, reason: &str) -> f64 {
    sample(
        text,
        &format!("portcullis_identity_issuance_failures_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or_else(|| panic!("no failure series for {reason}:\n{text}"))
}

fn state(all: &LocalIdentities, id: &str) -> Option<IdentityState> {
    all.identities
        .iter()
        .find(|i| i.spiffe_id == id)
        .map(|i| i.state)
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as f64
}

/// `portcullis identity` as a user runs it.
fn identity_cli(args: &[&str]) -> String {
    let bin = portcullis_agent::lab::portcullis_exe().unwrap();
    assert!(bin.exists(), "{} not built", bin.display());
    let out = Command::new(bin)
        .arg("identity")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "portcullis identity {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn twenty_second_certificates_are_renewed_at_half_life_without_ever_expiring() {
    let _kernel = portcullis_tests::kernel_lock();
    let agent = Agent::start("renewal", Duration::from_secs(20), |_| {});
    let x = id(X);
    // serial → the expiry the metric showed for it.
    let mut seen: BTreeMap<String, f64> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let start = Instant::now();
    while order.len() < 4 {
        assert!(
            start.elapsed() < Duration::from_secs(70),
            "only {} certificates in {:?}: {:#?}",
            order.len(),
            start.elapsed(),
            agent.identities()
        );
        let certificates = agent.certificates();
        let now = SystemTime::now();
        if let Some(c) = certificates.get(&x) {
            assert!(c.info.not_after > now, "a published certificate expired");
            if !seen.contains_key(&c.info.serial) {
                let metrics = agent.metrics();
                let expiry = agent.until("the expiry metric", Duration::from_secs(2), |a| {
                    let v = sample(&a.metrics(), &expiry_series(X))?;
                    // The metric follows the certificate being published.
                    (v >= unix(c.info.not_after) - 0.5).then_some(v)
                });
                assert_eq!(expiry, unix(c.info.not_after), "{metrics}");
                if let Some(previous) = order.last() {
                    assert!(expiry > seen[previous], "the expiry moved forward");
                }
                seen.insert(c.info.serial.clone(), expiry);
                order.push(c.info.serial.clone());
            }
        } else {
            assert!(
                order.is_empty(),
                "x's certificate disappeared after {order:?}: {:#?}",
                agent.identities()
            );
        }
        let all = agent.identities();
        for i in &all.identities {
            assert!(
                matches!(
                    i.state,
                    IdentityState::Pending | IdentityState::Valid | IdentityState::Renewing
                ),
                "{i:?}"
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    // Four certificates: the first and three renewals, each well before the
    // previous one expired.
    assert_eq!(order.len(), 4, "{order:?}");
    let text = agent.metrics();
    assert!(
        sample(&text, "portcullis_identity_renewals_total").unwrap() >= 3.0,
        "{text}"
    );
    assert_eq!(failures(&text, "unavailable"), 0.0, "{text}");
    assert!(
        sample(&text, "portcullis_identity_issuance_duration_seconds_count").unwrap() >= 4.0,
        "{text}"
    );
    // z/a runs on another node: no identity for z.
    let all = agent.identities();
    let ids: Vec<&str> = all
        .identities
        .iter()
        .map(|i| i.spiffe_id.as_str())
        .collect();
    assert_eq!(ids, [X, Y]);

    // The CLI shows what the agent holds (retried if a renewal lands
    // between the two reads).
    let file = agent.identities_file();
    let file = file.to_str().unwrap();
    agent.until(
        "the CLI agrees with the agent",
        Duration::from_secs(10),
        |a| {
            let before = a.certificates();
            let json: serde_json::Value =
                serde_json::from_str(&identity_cli(&["--identities-file", file, "--json"]))
                    .unwrap();
            let after = a.certificates();
            let serials = |c: &Certificates| -> BTreeMap<String, String> {
                c.iter()
                    .map(|(id, c)| (id.to_string(), c.info.serial.clone()))
                    .collect()
            };
            if serials(&before) != serials(&after) || before.len() != 2 {
                return None;
            }
            let listed: BTreeMap<String, String> = json["identities"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| {
                    (
                        i["spiffeId"].as_str().unwrap().to_string(),
                        i["serial"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect();
            assert_eq!(listed.len(), 2, "{json}");
            (listed == serials(&after)).then_some(())
        },
    );
    let human = identity_cli(&["--identities-file", file]);
    for needle in [X, Y, "valid", "UTC", "expires in", "issuer r1"] {
        assert!(human.contains(needle), "missing {needle:?} in:\n{human}");
    }
}

#[test]
fn a_ca_outage_keeps_the_certificate_until_it_expires_and_issuance_recovers() {
    let _kernel = portcullis_tests::kernel_lock();
    let agent = Agent::start("outage", Duration::from_secs(20), |_| {});
    let x = id(X);
    let first = agent.until("x's first certificate", Duration::from_secs(20), |a| {
        a.certificates().get(&x).cloned()
    });
    let before = failures(&agent.metrics(), "unavailable");
    // The outage: the CA directory is moved away (as if its volume went).
    let away = agent.dir.path().join("ca-away");
    std::fs::rename(agent.ca(), &away).unwrap();
    let outage = Instant::now();

    // Its revocations file went with it: unknown, which fails closed.
    let revocations = agent
        .handle()
        .identity
        .as_ref()
        .unwrap()
        .revocations
        .clone();
    agent.until("the revocations unknown", Duration::from_secs(5), |_| {
        matches!(
            revocations.borrow().check(&x, None),
            RevocationStatus::Unknown { .. }
        )
        .then_some(())
    });

    // Until the certificate expires, it is kept and published while the
    // renewals fail as `unavailable`.
    let mut failing_seen = false;
    while SystemTime::now() + Duration::from_millis(300) < first.info.not_after {
        let c = agent.certificates().get(&x).cloned();
        let c = c.unwrap_or_else(|| panic!("x's certificate was dropped before it expired"));
        assert_eq!(
            c.info.serial, first.info.serial,
            "no certificate while the CA is away"
        );
        if state(&agent.identities(), X) == Some(IdentityState::Failing) {
            failing_seen = true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        failing_seen,
        "the renewal failed while the certificate was held"
    );
    let text = agent.metrics();
    assert!(failures(&text, "unavailable") >= before + 2.0, "{text}");
    let all = agent.identities();
    let x_now = all.identities.iter().find(|i| i.spiffe_id == X).unwrap();
    let error = x_now.last_error.as_ref().expect("the last error is shown");
    assert_eq!(error.reason, "unavailable");
    assert!(error.message.contains("ca"), "{error:?}");

    // Past its expiry, the certificate is dropped and the state says so.
    agent.until("x expired", Duration::from_secs(5), |a| {
        (state(&a.identities(), X) == Some(IdentityState::Expired)
            && !a.certificates().contains_key(&x))
        .then_some(())
    });
    let expired = agent.identities();
    let x_now = expired
        .identities
        .iter()
        .find(|i| i.spiffe_id == X)
        .unwrap();
    assert_eq!(x_now.serial.as_deref(), Some(first.info.serial.as_str()));

    // The CA comes back: issuance recovers within the capped backoff (a
    // quarter of the 20 s lifetime).
    std::fs::rename(&away, agent.ca()).unwrap();
    let back = Instant::now();
    let renewed = agent.until("x valid again", Duration::from_secs(15), |a| {
        let c = a.certificates().get(&x).cloned()?;
        (state(&a.identities(), X) == Some(IdentityState::Valid)).then_some(c)
    });
    assert_ne!(renewed.info.serial, first.info.serial);
    eprintln!(
        "outage {:?}, recovered {:?} after the CA came back",
        back - outage,
        back.elapsed()
    );
    // y's certificate went through the same outage.
    agent.until("every identity valid", Duration::from_secs(15), |a| {
        let all = a.identities();
        all.identities
            .iter()
            .all(|i| i.state == IdentityState::Valid && i.last_error.is_none())
            .then_some(())
    });
}

#[test]
fn a_revoked_identity_is_refused_and_counted_until_the_revocation_goes() {
    let _kernel = portcullis_tests::kernel_lock();
    let revocations = |dir: &Path| dir.join("ca").join("revocations.yaml");
    let agent = Agent::start("revoked", Duration::from_secs(600), |dir| {
        std::fs::write(
            revocations(dir),
            format!("revocations:\n- spiffeId: {Y}\n  reason: compromised node test\n"),
        )
        .unwrap();
    });
    let (x, y) = (id(X), id(Y));
    agent.until("y refused as revoked", Duration::from_secs(20), |a| {
        let all = a.identities();
        let y_now = all.identities.iter().find(|i| i.spiffe_id == Y)?;
        let e = y_now.last_error.as_ref()?;
        (e.reason == "revoked").then_some(())
    });
    let all = agent.identities();
    assert_eq!(state(&all, Y), Some(IdentityState::Failing), "{all:#?}");
    let y_now = all.identities.iter().find(|i| i.spiffe_id == Y).unwrap();
    assert!(
        y_now
            .last_error
            .as_ref()
            .unwrap()
            .message
            .contains("compromised node test"),
        "{y_now:?}"
    );
    assert!(
        y_now.serial.is_none(),
        "no certificate for a revoked identity"
    );
    agent.until("x valid", Duration::from_secs(20), |a| {
        a.certificates().contains_key(&x).then_some(())
    });
    assert!(!agent.certificates().contains_key(&y));
    let text = agent.metrics();
    assert!(failures(&text, "revoked") >= 1.0, "{text}");
    assert_eq!(failures(&text, "unavailable"), 0.0, "{text}");
    assert!(sample(&text, &expiry_series(Y)).is_none(), "{text}");
    // The data path's view says so too.
    let view = agent
        .handle()
        .identity
        .as_ref()
        .unwrap()
        .revocations
        .clone();
    assert!(matches!(
        view.borrow().check(&y, None),
        RevocationStatus::Revoked { .. }
    ));

    std::fs::write(revocations(agent.dir.path()), "revocations: []\n").unwrap();
    agent.until(
        "y granted once no longer revoked",
        Duration::from_secs(20),
        |a| a.certificates().contains_key(&y).then_some(()),
    );
    assert_eq!(view.borrow().check(&y, None), RevocationStatus::Good);
}

/// `portcullis lab` makes a throwaway CA: every lab pod gets the identity of
/// its service account (one per pod in the standard topology), the chains
/// verify against the lab CA's bundle, and `portcullis identity --lab`
/// lists them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_gives_every_pod_its_identity_from_a_throwaway_ca() {
    let lab = portcullis_tests::start_lab("id-lab").await;
    let mut certificates = lab
        .agent_certificates()
        .expect("the lab's agent has identity on");
    let all = tokio::time::timeout(
        Duration::from_secs(30),
        certificates.wait_for(|c| c.len() == 9),
    )
    .await
    .expect("9 identities within 30 s")
    .unwrap()
    .clone();
    let bundle = portcullis_agent::identity::authority::CaDir::at(lab.ca_dir())
        .bundle()
        .unwrap();
    let mut seen = Vec::new();
    for (id, credential) in all.iter() {
        let info = bundle
            .verify(&credential.chain, "cluster.local", SystemTime::now())
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(info.spiffe_id.as_ref(), Some(id));
        seen.push(id.to_string());
    }
    for ns in ["x", "y", "z"] {
        for pod in ["a", "b", "c"] {
            let want = format!("spiffe://cluster.local/ns/{ns}/sa/{pod}");
            assert!(seen.contains(&want), "{want} missing from {seen:?}");
        }
    }
    let listed: LocalIdentities = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let out = identity_cli(&["--lab", "id-lab", "--json"]);
            let listed: LocalIdentities = serde_json::from_str(&out).unwrap();
            if listed.identities.len() == 9
                && listed
                    .identities
                    .iter()
                    .all(|i| i.state == IdentityState::Valid)
            {
                return listed;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("portcullis identity --lab lists 9 valid identities");
    for identity in &listed.identities {
        let id: SpiffeId = identity.spiffe_id.parse().unwrap();
        let held = &all[&id];
        let info = portcullis_agent::identity::certificate::CertificateInfo::from_der(
            &held.chain[0],
            "held",
        )
        .unwrap();
        assert_eq!(identity.serial.as_deref(), Some(info.serial.as_str()));
    }
}
