//! The Kubernetes source against a real kube-apiserver and etcd (built by
//! `cargo xtask kube build`): objects created through the API, map
//! contents out. Checks that the initial lists program local endpoints
//! and every peer, that added/modified/deleted objects change what would
//! be enforced, that a real `410 Gone` and a real outage never drop
//! enforcement, that invalid objects are reported (to the API too) while
//! the rest apply, and that a missing CRD keeps the agent not ready.
//!
//! Each test has its own control plane (about 3 s to start): the source
//! watches the whole cluster, so tests sharing one would see each other's
//! pods and policies. What only a mock API server can show (the exact
//! requests, injected bookmarks and 503s) stays in
//! agent/tests/kube_source.rs.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::{
    api::{coordination::v1::Lease, events::v1::Event, networking::v1::NetworkPolicy},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::api::{
    Api, DeleteParams, DynamicObject, ObjectMeta, PostParams, WatchEvent, WatchParams,
};
use portcullis_agent::{
    bpf::writer::MapUsage,
    kube_report::{ReporterOptions, DEFAULT_LEASE_NAME, DEFAULT_NAMESPACE},
    reconcile::Reconciler,
    source::{kube::KubeSource, Source},
};
use portcullis_common::{
    ipv4_mapped, DIRECTION_EGRESS, DIRECTION_INGRESS, VERDICT_ALLOW, VERDICT_DENY,
};
use portcullis_tests::{
    kube_api::{self, resource_of},
    kube_source_harness::*,
    relay::Relay,
};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_lists_program_local_endpoints_and_every_peer() {
    let h = Harness::start().await;
    let d = &h.maps.desired;
    assert_eq!(d.endpoints.len(), 2, "x/a and x/b run on this node");
    assert_eq!(d.endpoints[&h.cg_a].ipv4_mapped, ipv4_mapped([10, 0, 0, 2]));
    assert_eq!(d.endpoints[&h.cg_b].ipv4_mapped, ipv4_mapped([10, 0, 0, 3]));
    assert!(
        d.identities.contains_key(&identity_key([10, 0, 1, 2])),
        "the remote pod y/c is a known peer"
    );
    assert!(h.source.degraded().is_none(), "{:?}", h.source.degraded());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_modified_and_deleted_objects_change_the_maps() {
    let mut h = Harness::start().await;
    let (admin, cg_a) = (h.admin.clone(), h.cg_a);
    assert_eq!(
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.1.2", 80),
        VERDICT_ALLOW
    );

    // Added: x/a accepts only app=b on 80.
    kube_api::create(&admin, allow_ingress_from("only-b", "a", "b", 80)).await;
    h.apply_until("the policy to isolate x/a", |h| {
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.1.2", 80) == VERDICT_DENY
    })
    .await;
    assert_eq!(
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.0.3", 80),
        VERDICT_ALLOW
    );
    assert_eq!(
        h.verdict(cg_a, DIRECTION_EGRESS, "10.0.1.2", 80),
        VERDICT_ALLOW
    );

    // Modified: the port moves to 8080.
    kube_api::update(&admin, allow_ingress_from("only-b", "a", "b", 8080)).await;
    h.apply_until("the port to move", |h| {
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.0.3", 8080) == VERDICT_ALLOW
    })
    .await;
    assert_eq!(
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.0.3", 80),
        VERDICT_DENY
    );

    // A pod's labels change: x/b loses app=b and with it the allow.
    kube_api::update(
        &admin,
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "b", "namespace": "x", "labels": {"app": "other"}}}),
    )
    .await;
    h.apply_until("x/b to lose the allow", |h| {
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.0.3", 8080) == VERDICT_DENY
    })
    .await;
    // A new pod with the label is allowed at once.
    kube_api::create(&admin, pod("x", "e", OTHER_NODE, "10.0.1.5", "b")).await;
    h.apply_until("the new pod x/e to be allowed", |h| {
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.1.5", 8080) == VERDICT_ALLOW
    })
    .await;

    // Deleted pod: a graceful delete leaves x/b terminating, its
    // containers possibly still running: still enforced, still a peer.
    let before = h.source.revision();
    delete_pod(&admin, "x", "b").await;
    until("the terminating pod's event", EVENT_BOUND, || {
        (h.source.revision() != before).then_some(())
    })
    .await;
    h.reconcile();
    assert_eq!(h.maps.desired.endpoints.len(), 2, "x/b is still enforced");
    assert!(h
        .maps
        .desired
        .identities
        .contains_key(&identity_key([10, 0, 0, 3])));
    // Once the kubelet removes it, x/b is gone from this node's endpoints
    // and as a peer.
    kubelet_removes_pod(&admin, "x", "b").await;
    h.apply_until("x/b to be gone", |h| h.maps.desired.endpoints.len() == 1)
        .await;
    assert!(
        !h.maps
            .desired
            .identities
            .contains_key(&identity_key([10, 0, 0, 3])),
        "a deleted pod's address is no longer known"
    );
    assert!(h.maps.desired.endpoints.contains_key(&cg_a));

    // Deleted policy: x/a is no longer isolated.
    kube_api::delete(&admin, allow_ingress_from("only-b", "a", "b", 8080)).await;
    h.apply_until("x/a to be open again", |h| {
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.0.9", 22) == VERDICT_ALLOW
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_pod_is_enforced_once_the_kubelet_creates_its_cgroup() {
    let mut h = Harness::start().await;
    let d = kube_api::create(&h.admin, pod("x", "d", NODE, "10.0.0.4", "d")).await;
    // Pods are created without an address; the status with it follows.
    let applied = until("x/d and its address to be known", EVENT_BOUND, || {
        let applied = h.reconcile();
        let addressed = h
            .maps
            .desired
            .identities
            .contains_key(&identity_key([10, 0, 0, 4]));
        (addressed && !applied.missing_cgroups.is_empty()).then_some(applied)
    })
    .await;
    assert_eq!(
        applied.missing_cgroups.len(),
        1,
        "not programmed before its cgroup exists: {:?}",
        applied.missing_cgroups
    );
    assert!(applied.missing_cgroups[0].contains("x/d"));
    assert_eq!(
        h.source.missing_cgroup_retry(),
        Duration::from_millis(200),
        "a starting pod is retried quickly"
    );
    // The sync loop passes again only once a look says the cgroup may be
    // there: at the path the pass expected, or anywhere the walk finds it.
    let awaited = &applied.missing_cgroup_paths;
    assert_eq!(awaited.len(), 1, "{awaited:?}");
    assert!(!h.source.cgroups_appeared(awaited), "nothing there yet");
    // The kubelet put it under another QoS class than the pod says.
    let elsewhere = h.cgroups.mount().join(format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
        uid_of(&d).replace('-', "_")
    ));
    std::fs::create_dir_all(&elsewhere).unwrap();
    assert!(
        h.source.cgroups_appeared(awaited),
        "the walk finds it where the pass did not look"
    );
    let applied = h.reconcile();
    assert!(applied.missing_cgroups.is_empty());
    let cg_elsewhere = portcullis_agent::cgroup::cgroup_id(&elsewhere).unwrap();
    assert_eq!(
        h.maps.desired.endpoints[&cg_elsewhere].ipv4_mapped,
        ipv4_mapped([10, 0, 0, 4])
    );
    assert!(
        !h.source.cgroups_appeared(&applied.missing_cgroup_paths),
        "nothing awaited, nothing new"
    );

    // Gone and back at the expected path: the stat sees it.
    std::fs::remove_dir(&elsewhere).unwrap();
    let applied = h.reconcile();
    assert_eq!(
        applied.missing_cgroups.len(),
        1,
        "{:?}",
        applied.missing_cgroups
    );
    assert!(!h.source.cgroups_appeared(&applied.missing_cgroup_paths));
    let cg_d = h.cgroups.create_pod_cgroup(&uid_of(&d));
    assert!(h.source.cgroups_appeared(&applied.missing_cgroup_paths));
    let applied = h.reconcile();
    assert!(applied.missing_cgroups.is_empty());
    assert_eq!(
        h.maps.desired.endpoints[&cg_d].ipv4_mapped,
        ipv4_mapped([10, 0, 0, 4])
    );
}

/// The first event a watch of NetworkPolicies from `version` gets: the
/// server's answer to a watcher resuming there.
async fn watch_answer(client: &kube::Client, version: &str) -> Result<String, u16> {
    let api: Api<NetworkPolicy> = Api::all(client.clone());
    let stream = match api.watch(&WatchParams::default(), version).await {
        Ok(stream) => stream,
        Err(kube::Error::Api(status)) => return Err(status.code),
        Err(e) => panic!("watching from {version}: {e}"),
    };
    futures::pin_mut!(stream);
    match stream.next().await {
        Some(Ok(WatchEvent::Error(status))) => Err(status.code),
        other => Ok(format!("{other:?}")),
    }
}

/// A node cut off from the API server while a policy changes, and the
/// history it would resume from gone: its watches get a real `410 Gone`,
/// the watchers relist, and the change lands, with the old rule enforced
/// until then and never a gap.
///
/// The agent alone is cut off (a relay it talks through), so the change
/// can be made meanwhile; then etcd is compacted and the API server
/// restarted, whose watch cache starts over at the current version. The
/// requests cannot be seen here, but none is needed: the server answers
/// 410 to a watch from the agent's version, so the change can only have
/// come by a relist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_410_gone_relists_without_dropping_enforcement() {
    let plane = start_plane().await;
    let relay = Relay::to_apiserver(&plane).await;
    let agent_client = relay.client(&plane).await;
    let mut h = Harness::start_on(plane, agent_client, |_| {}).await;
    let (admin, cg_a) = (h.admin.clone(), h.cg_a);
    let created = kube_api::create(&admin, allow_ingress_from("only-b", "a", "b", 80)).await;
    h.apply_until("the policy to isolate x/a", |h| {
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.1.2", 80) == VERDICT_DENY
    })
    .await;
    let enforced = h.maps.desired.clone();
    // The agent's watch is at this version (or a bookmark a little later,
    // still before the change below).
    let seen = created.metadata.resource_version.clone().unwrap();

    relay.cut();
    until("the partition to be noticed", EVENT_BOUND, || {
        h.source
            .degraded()
            .filter(|d| d.contains("API server unreachable"))
    })
    .await;
    kube_api::update(&admin, allow_ingress_from("only-b", "a", "b", 443)).await;
    h.plane.stop_apiserver();
    h.plane.compact();
    h.plane
        .start_apiserver()
        .await
        .expect("the API server restarts");
    assert_eq!(
        watch_answer(&admin, &seen).await,
        Err(410),
        "a watch resuming from the agent's version gets 410 Gone"
    );
    relay.heal();

    // Throughout the relist the source keeps offering a complete view.
    let deadline = std::time::Instant::now() + RECOVERY_BOUND;
    loop {
        assert!(
            h.source.revision().is_some(),
            "a relist never empties the view"
        );
        let snapshot = h.load();
        assert_eq!(snapshot.policies.len(), 1, "the policy is never dropped");
        h.reconcile();
        if h.verdict(cg_a, DIRECTION_INGRESS, "10.0.0.3", 443) == VERDICT_ALLOW {
            break;
        }
        // Until the relist, the old rule stays in force.
        assert_eq!(h.maps.desired, enforced);
        assert!(
            std::time::Instant::now() < deadline,
            "the change made during the partition was not applied; the source says {:?}",
            h.source.degraded()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.0.3", 80),
        VERDICT_DENY,
        "the new version replaced the old"
    );
    until("the source to be ready again", RECOVERY_BOUND, || {
        h.source.degraded().is_none().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_outage_keeps_the_last_state_and_reports_not_ready() {
    let mut h = Harness::start().await;
    let (admin, cg_a) = (h.admin.clone(), h.cg_a);
    kube_api::create(&admin, allow_ingress_from("only-b", "a", "b", 80)).await;
    h.apply_until("the policy to isolate x/a", |h| {
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.1.2", 80) == VERDICT_DENY
    })
    .await;
    let enforced = h.maps.desired.clone();
    let revision = h.source.revision();

    h.plane.stop_apiserver();
    // Connections open at the kill are reset; every later one is refused,
    // and that is what the reason says while the server is down.
    until(
        "the outage to be reported with its cause",
        EVENT_BOUND,
        || {
            h.source.degraded().filter(|d| {
                d.starts_with("API server unreachable") && d.contains("Connection refused")
            })
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.source.revision(), revision, "nothing new to apply");
    h.reconcile();
    assert_eq!(h.maps.desired, enforced, "the last state stays enforced");
    assert_eq!(
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.1.2", 80),
        VERDICT_DENY
    );

    // Back: changes flow, and the source is ready again. (The restarted
    // server's watch cache starts at the current version, so the watchers
    // resume with a 410 and relist first.)
    h.plane
        .start_apiserver()
        .await
        .expect("the API server restarts");
    kube_api::delete(&admin, allow_ingress_from("only-b", "a", "b", 80)).await;
    h.apply_until_within("the delete made after the outage", RECOVERY_BOUND, |h| {
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.1.2", 80) == VERDICT_ALLOW
    })
    .await;
    until("the source to be ready again", RECOVERY_BOUND, || {
        h.source.degraded().is_none().then_some(())
    })
    .await;
}

/// An L4Policy only the agent rejects: the CRD schema checks ports but not
/// CIDRs (that needs CEL's CIDR library, Kubernetes 1.31+; see
/// tests/crds.rs, which lists what only the agent catches), so the API
/// server stores a /33 and the agent's validation is what refuses it.
fn bad_cidr_policy() -> Value {
    l4_policy(
        "x",
        "bad-cidr",
        json!({"podSelector": {}, "ingressDeny": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_objects_are_reported_while_the_rest_apply() {
    let mut h = Harness::start().await;
    let (admin, cg_a) = (h.admin.clone(), h.cg_a);
    let reports = h.source.reports();
    kube_api::create(&admin, allow_ingress_from("only-b", "a", "b", 80)).await;
    kube_api::create(&admin, bad_cidr_policy()).await;
    let snapshot = until("both objects", EVENT_BOUND, || {
        let s = h.source.load().ok()?;
        // Reports are published once the pass's outcome is known.
        h.source.settle(None);
        (s.problems.len() == 1 && !s.policies.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(
        snapshot.policies.len(),
        1,
        "the valid NetworkPolicy applies"
    );
    let problem = &snapshot.problems[0];
    assert!(
        problem.contains("L4Policy x/bad-cidr") && problem.contains("10.0.0.0/33"),
        "names the object and the value: {problem}"
    );
    let reports = reports.borrow().clone();
    let bad = reports.iter().find(|r| r.name == "bad-cidr").unwrap();
    assert!(bad.problem.as_deref().unwrap().contains("10.0.0.0/33"));
    let good = reports.iter().find(|r| r.name == "only-b").unwrap();
    assert_eq!(good.problem, None);
    h.apply_until("the valid policy to apply", |h| {
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.1.2", 80) == VERDICT_DENY
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_crd_keeps_the_agent_not_ready_until_it_is_installed() {
    let plane = start_plane().await;
    let admin = plane.client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let name = "l4policies.portcullis.dev";
    let installed = crds.get(name).await.expect("the CRD is installed");
    crds.delete(name, &DeleteParams::default())
        .await
        .expect("deleting the CRD");
    eventually("the CRD to be gone", || {
        let crds = crds.clone();
        async move { crds.get_opt(name).await.ok()?.is_none().then_some(()) }
    })
    .await;
    kube_api::create(&admin, node(NODE, None)).await;
    let cgroups = NodeCgroups::default();
    let source = KubeSource::start(test_options(admin.clone()), cgroups.mount()).unwrap();
    let why = until("the failing watch", EVENT_BOUND, || {
        source.degraded().filter(|d| d.contains("watch failing"))
    })
    .await;
    assert!(
        why.contains("l4policies.portcullis.dev: 404") && why.contains("CRD installed"),
        "{why}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        source.revision(),
        None,
        "nothing is applied without every list"
    );

    // Installing the CRD is enough: no restart.
    let crd = CustomResourceDefinition {
        metadata: ObjectMeta {
            name: installed.metadata.name.clone(),
            ..ObjectMeta::default()
        },
        spec: installed.spec.clone(),
        status: None,
    };
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("installing the CRD again");
    // The failing watch retries on its backoff.
    until("the initial lists", RECOVERY_BOUND, || source.revision()).await;
    assert_eq!(source.degraded(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_lead_to_their_ready_backends() {
    let mut h = Harness::start().await;
    let service = kube_api::create(
        &h.admin,
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "namespace": "y"},
               "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
    )
    .await;
    let cluster_ip = ip(service.data["spec"]["clusterIP"]
        .as_str()
        .expect("the API server allocates a ClusterIP"));
    kube_api::create(
        &h.admin,
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "web-1", "namespace": "y",
                            "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4",
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
               "endpoints": [{"addresses": ["10.0.1.2"], "conditions": {"ready": true}},
                             {"addresses": ["10.0.1.3"], "conditions": {"ready": false}}]}),
    )
    .await;
    let service = until("the service", EVENT_BOUND, || {
        let s = h.source.load().ok()?;
        // A real cluster has more: default/kubernetes, for one.
        s.inventory
            .services
            .iter()
            .find(|s| (s.namespace.as_str(), s.name.as_str()) == ("y", "web"))
            .filter(|s| !s.ports[0].backends.is_empty())
            .cloned()
    })
    .await;
    assert_eq!(service.cluster_ips, vec![cluster_ip]);
    let backends: Vec<String> = service.ports[0]
        .backends
        .iter()
        .map(|b| format!("{}:{}", b.ip, b.port))
        .collect();
    assert_eq!(backends, ["10.0.1.2:8080"], "only ready endpoints");
}

/// The value of the `Accepted` condition the API server holds for an
/// L4Policy in x: (status, observedGeneration, the object's generation).
async fn accepted(client: &kube::Client, name: &str) -> Option<(String, Value, Value)> {
    let resource = resource_of(&l4_policy("x", name, json!({})));
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "x", &resource);
    let object = api.get(name).await.ok()?;
    let conditions = object.data["status"]["conditions"].as_array()?.clone();
    let condition = conditions.iter().find(|c| c["type"] == "Accepted")?;
    Some((
        condition["status"].as_str()?.to_string(),
        condition["observedGeneration"].clone(),
        json!(object.metadata.generation),
    ))
}

/// The whole loop for invalid objects: the source finds the problem, the
/// status writer (holding the Lease) writes a Warning Event and an
/// `Accepted=False` condition for the invalid L4Policy and `Accepted=True`
/// for the valid one, and the valid NetworkPolicy is enforced meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_objects_get_an_event_and_a_condition_from_the_lease_holder() {
    let plane = start_plane().await;
    let admin = plane.client().await;
    kube_api::create(&admin, namespace(DEFAULT_NAMESPACE)).await;
    let mut h = Harness::start_on(plane, admin.clone(), |options| {
        options.reporter = Some(ReporterOptions::new(NODE));
    })
    .await;
    let cg_a = h.cg_a;
    kube_api::create(&admin, allow_ingress_from("only-b", "a", "b", 80)).await;
    kube_api::create(&admin, bad_cidr_policy()).await;
    kube_api::create(
        &admin,
        l4_policy(
            "x",
            "no-telnet",
            json!({"podSelector": {}, "ingressDeny": [{"ports": [{"port": 23}]}]}),
        ),
    )
    .await;
    h.apply_until("the NetworkPolicy and the valid L4Policy", |h| {
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.1.2", 80) == VERDICT_DENY
            && h.verdict(h.cg_b, DIRECTION_INGRESS, "10.0.1.2", 23) == VERDICT_DENY
    })
    .await;
    assert_eq!(h.load().policies.len(), 2, "the bad-cidr policy is not");

    let events: Api<Event> = Api::namespaced(admin.clone(), "x");
    let event = eventually("the Event", || {
        let events = events.clone();
        async move { events.list(&Default::default()).await.ok()?.items.pop() }
    })
    .await;
    assert_eq!(event.reason.as_deref(), Some("InvalidPolicy"));
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let regarding = event.regarding.clone().unwrap_or_default();
    assert_eq!(regarding.kind.as_deref(), Some("L4Policy"));
    assert_eq!(regarding.name.as_deref(), Some("bad-cidr"));
    assert!(
        event
            .note
            .as_deref()
            .unwrap_or_default()
            .contains("10.0.0.0/33"),
        "{event:?}"
    );

    let bad = eventually("the bad-cidr condition", || accepted(&admin, "bad-cidr")).await;
    assert_eq!(bad.0, "False");
    assert_eq!(bad.1, bad.2, "observedGeneration is the object's");
    let good = eventually("the no-telnet condition", || accepted(&admin, "no-telnet")).await;
    assert_eq!(good.0, "True");
    assert_eq!(
        events.list(&Default::default()).await.unwrap().items.len(),
        1,
        "valid objects get no Event"
    );
    let lease = Api::<Lease>::namespaced(admin.clone(), DEFAULT_NAMESPACE)
        .get(DEFAULT_LEASE_NAME)
        .await
        .expect("the writer took the Lease");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some(NODE)
    );
    until("the source to know it leads", EVENT_BOUND, || {
        h.source.is_report_leader().then_some(())
    })
    .await;
}

/// Deny-until-programmed guards the kubelet's pod parent cgroup, and says
/// so loudly when there is none to guard (a kubelet with another cgroup
/// root), rather than leave new pods unguarded in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_unprogrammed_guards_kubepods_or_says_it_cannot() {
    let plane = start_plane().await;
    let admin = plane.client().await;
    kube_api::create(&admin, node(NODE, None)).await;
    let cgroups = NodeCgroups::default();
    let mut options = test_options(admin);
    options.deny_unprogrammed = true;
    let mut source = KubeSource::start(options, cgroups.mount()).unwrap();
    until("the initial lists", EVENT_BOUND, || source.revision()).await;
    let snapshot = source.load().unwrap();
    assert!(snapshot.guards.pending_roots.is_empty());
    assert!(
        snapshot
            .problems
            .iter()
            .any(|p| p.contains("--deny-unprogrammed") && p.contains("--kubelet-cgroup-root")),
        "{:?}",
        snapshot.problems
    );
    cgroups.create_pod_cgroup("00000000-0000-4000-8000-000000000009");
    let snapshot = source.load().unwrap();
    assert_eq!(
        snapshot.guards.pending_roots,
        vec![cgroups.mount().join("kubepods.slice")]
    );
    assert!(snapshot.problems.is_empty(), "{:?}", snapshot.problems);
}

/// An object that does not fit the maps is held back alone and reported
/// like an invalid one (what the status writer turns into an Event and
/// `Accepted=False`), while the NetworkPolicy that arrived with it applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_that_does_not_fit_is_reported_while_the_rest_apply() {
    let mut h = Harness::start().await;
    let (admin, cg_a) = (h.admin.clone(), h.cg_a);
    // Room for the pods' addresses and a few CIDRs, not for 40 more.
    h.reconciler = Reconciler::new(h.cgroups.mount().to_path_buf()).with_capacity(MapUsage {
        identities: 30,
        ..portcullis_agent::bpf::writer::generation_capacity()
    });
    let reports = h.source.reports();
    let from: Vec<Value> = (0..40)
        .map(|i| json!({"ipBlock": {"cidr": format!("10.99.0.{i}/32")}}))
        .collect();
    kube_api::create(
        &admin,
        l4_policy(
            "y",
            "huge",
            json!({"podSelector": {}, "ingress": [{"from": from, "ports": [{"port": 80}]}]}),
        ),
    )
    .await;
    kube_api::create(&admin, allow_ingress_from("only-b", "a", "b", 80)).await;
    let applied = until("both objects in one pass", EVENT_BOUND, || {
        let snapshot = h.source.load().ok()?;
        (snapshot.policies.len() == 2).then_some(())?;
        let applied = h.reconciler.reconcile(&snapshot, &mut h.maps).ok()?;
        h.source.settle(Some(&applied.rejected));
        Some(applied)
    })
    .await;
    let why = applied.rejected.values().next().expect("one held back");
    assert_eq!(applied.rejected.len(), 1, "{:?}", applied.rejected);
    assert!(
        why.contains("L4Policy y/huge")
            && why.contains("does not fit")
            && why.contains("NOT enforced"),
        "{why}"
    );
    assert_eq!(
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.1.2", 80),
        VERDICT_DENY,
        "the NetworkPolicy applies"
    );
    let reports = reports.borrow().clone();
    let huge = reports.iter().find(|r| r.name == "huge").unwrap();
    assert_eq!(huge.problem.as_deref(), Some(why.as_str()));
    let fine = reports.iter().find(|r| r.name == "only-b").unwrap();
    assert_eq!(fine.problem, None);
}
