//! The reporter against a scripted API server (tower-test): every request
//! it makes is checked, in order. Time is paused: the reporter's sleeps
//! advance virtual time instantly, and "no request for 10 s" is a timeout.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp};
use kube::client::Body;
use serde_json::{json, Value};
use tokio::{sync::watch, task::JoinHandle};
use tower_test::mock::{self, Handle, SendResponse};

use super::*;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/portcullis-system/leases";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/portcullis-system/leases/portcullis-status-writer";

fn events(namespace: &str) -> String {
    format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events")
}

fn l4_status(namespace: &str, name: &str) -> String {
    format!("/apis/portcullis.dev/v1alpha1/namespaces/{namespace}/l4policies/{name}/status")
}

fn report(
    kind: ObjectKind,
    namespace: &str,
    name: &str,
    generation: i64,
    problem: Option<&str>,
) -> ObjectReport {
    ObjectReport {
        kind,
        namespace: namespace.to_string(),
        name: name.to_string(),
        uid: format!("uid-{name}"),
        generation: Some(generation),
        problem: problem.map(str::to_string),
    }
}

fn bad(generation: i64, problem: &str) -> ObjectReport {
    report(
        ObjectKind::L4Policy,
        "team",
        "bad",
        generation,
        Some(problem),
    )
}

fn good() -> ObjectReport {
    report(ObjectKind::L4Policy, "team", "good", 4, None)
}

/// One request the reporter made, and the way to answer it.
struct Call {
    method: Method,
    path: String,
    query: String,
    content_type: String,
    body: Value,
    respond: SendResponse<Response<Body>>,
}

impl Call {
    fn reply(self, status: StatusCode, body: &Value) {
        let response = Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap();
        self.respond.send_response(response);
    }

    /// Answers with the object sent, as the API server stores it.
    fn echo(self) {
        let body = self.body.clone();
        self.reply(StatusCode::OK, &body);
    }

    /// Answers a Lease write, giving it `version`.
    fn stored_as(self, version: &str) {
        let mut body = self.body.clone();
        body["metadata"]["resourceVersion"] = json!(version);
        self.reply(StatusCode::OK, &body);
    }

    fn fail(self, code: u16, reason: &str) {
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "code": code, "reason": reason, "message": format!("scripted {reason}"),
        });
        self.reply(StatusCode::from_u16(code).unwrap(), &status);
    }
}

struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
}

impl ApiServer {
    async fn next(&mut self) -> Call {
        // Virtual time: fails at once if the reporter went quiet for good.
        let (request, respond) =
            tokio::time::timeout(Duration::from_secs(60), self.handle.next_request())
                .await
                .expect("no request within 60 s")
                .expect("the client is gone");
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        Call {
            method: parts.method,
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or_default().to_string(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default(),
            body: if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            },
            respond,
        }
    }

    async fn expect(&mut self, method: Method, path: &str) -> Call {
        let call = self.next().await;
        assert_eq!(
            (&call.method, call.path.as_str()),
            (&method, path),
            "unexpected request, body {}",
            call.body
        );
        call
    }

    /// Nothing is requested for `period` (virtual time).
    async fn quiet_for(&mut self, period: Duration) {
        if let Ok(Some((request, _))) =
            tokio::time::timeout(period, self.handle.next_request()).await
        {
            panic!("unexpected {} {}", request.method(), request.uri());
        }
    }

    /// The reporter finished and made no further request.
    async fn done(mut self, task: JoinHandle<()>) {
        task.await.unwrap();
        if let Some((request, _)) = self.handle.next_request().await {
            panic!("unexpected {} {}", request.method(), request.uri());
        }
    }

    /// GET 404, then POST: the Lease is ours with resourceVersion "1".
    async fn acquire_absent_lease(&mut self) {
        self.expect(Method::GET, LEASE).await.fail(404, "NotFound");
        let create = self.expect(Method::POST, LEASES).await;
        let spec = &create.body["spec"];
        assert_eq!(create.body["metadata"]["name"], "portcullis-status-writer");
        assert_eq!(spec["holderIdentity"], "node-a");
        assert_eq!(spec["leaseDurationSeconds"], 15);
        assert_eq!(spec["leaseTransitions"], 0);
        assert!(spec["renewTime"].is_string() && spec["acquireTime"].is_string());
        create.stored_as("1");
    }

    /// The Event POST for `bad(_, problem)`; returns its name.
    async fn expect_bad_event(&mut self, problem: &str) -> String {
        let call = self.expect(Method::POST, &events("team")).await;
        let body = &call.body;
        assert_eq!(body["type"], "Warning");
        assert_eq!(body["reason"], "InvalidPolicy");
        assert_eq!(body["note"], problem);
        assert_eq!(body["action"], "Validate");
        assert_eq!(body["reportingController"], "portcullis.dev/agent");
        assert_eq!(body["reportingInstance"], "node-a");
        assert!(body["eventTime"].is_string());
        assert_eq!(
            body["regarding"],
            json!({
                "apiVersion": "portcullis.dev/v1alpha1", "kind": "L4Policy",
                "namespace": "team", "name": "bad", "uid": "uid-bad",
            })
        );
        let name = body["metadata"]["name"].as_str().unwrap().to_string();
        assert!(name.starts_with("bad."), "{name}");
        assert_eq!(body["metadata"]["namespace"], "team");
        call.echo();
        name
    }

    /// The status apply for an L4Policy; returns its only condition.
    async fn expect_condition(&mut self, path: &str) -> Value {
        let call = self.expect(Method::PATCH, path).await;
        assert_eq!(call.content_type, "application/apply-patch+yaml");
        let query: Vec<&str> = call.query.split('&').collect();
        assert!(
            query.contains(&"fieldManager=portcullis-agent"),
            "{query:?}"
        );
        assert!(query.contains(&"force=true"), "{query:?}");
        assert_eq!(call.body["apiVersion"], "portcullis.dev/v1alpha1");
        let conditions = call.body["status"]["conditions"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(conditions.len(), 1, "{conditions:?}");
        assert_eq!(conditions[0]["type"], "Accepted");
        assert!(conditions[0]["lastTransitionTime"].is_string());
        let body = call.body.clone();
        call.echo();
        let mut condition = conditions[0].clone();
        condition["metadata"] = body["metadata"].clone();
        condition["kind"] = body["kind"].clone();
        condition
    }
}

fn start(
    reports: Vec<ObjectReport>,
) -> (
    ApiServer,
    watch::Sender<Vec<ObjectReport>>,
    watch::Receiver<bool>,
    JoinHandle<()>,
) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (tx, rx) = watch::channel(reports);
    let reporter = Reporter::new(client, ReporterOptions::new("node-a"));
    let leading = reporter.leadership();
    let task = tokio::spawn(reporter.run(rx));
    (ApiServer { handle }, tx, leading, task)
}

fn lease(holder: &str, renewed: Timestamp, version: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {
            "name": "portcullis-status-writer", "namespace": "portcullis-system",
            "resourceVersion": version,
        },
        "spec": {
            "holderIdentity": holder, "leaseDurationSeconds": 15, "leaseTransitions": 2,
            "acquireTime": MicroTime(renewed), "renewTime": MicroTime(renewed),
        },
    })
}

fn long_ago() -> Timestamp {
    "2020-01-01T00:00:00Z".parse().unwrap()
}

#[tokio::test(start_paused = true)]
async fn acquires_an_absent_lease_and_reports_invalid_and_valid_policies() {
    let (mut api, tx, leading, task) = start(vec![bad(2, "spec.egress[0]: bad port"), good()]);
    api.acquire_absent_lease().await;

    api.expect_bad_event("spec.egress[0]: bad port").await;
    let invalid = api.expect_condition(&l4_status("team", "bad")).await;
    assert_eq!(invalid["status"], "False");
    assert_eq!(invalid["reason"], "Invalid");
    assert_eq!(invalid["message"], "spec.egress[0]: bad port");
    assert_eq!(invalid["observedGeneration"], 2);
    assert_eq!(
        invalid["metadata"],
        json!({"name": "bad", "namespace": "team"})
    );
    assert_eq!(invalid["kind"], "L4Policy");

    let valid = api.expect_condition(&l4_status("team", "good")).await;
    assert_eq!(valid["status"], "True");
    assert_eq!(valid["reason"], "Valid");
    assert_eq!(valid["observedGeneration"], 4);
    assert!(*leading.borrow());

    // Shutdown hands the Lease back rather than letting it expire.
    drop(tx);
    let release = api.expect(Method::PUT, LEASE).await;
    assert_eq!(release.body["metadata"]["resourceVersion"], "1");
    assert!(release.body["spec"].get("holderIdentity").is_none());
    release.stored_as("2");
    api.done(task).await;
    assert!(!*leading.borrow());
}

#[tokio::test(start_paused = true)]
async fn a_lease_held_by_another_live_agent_means_no_writes() {
    let (mut api, tx, leading, task) = start(vec![bad(1, "broken")]);
    api.expect(Method::GET, LEASE)
        .await
        .reply(StatusCode::OK, &lease("node-b", Timestamp::now(), "5"));
    // It looks again only when node-b's Lease could have expired.
    api.quiet_for(Duration::from_secs(10)).await;
    api.expect(Method::GET, LEASE)
        .await
        .reply(StatusCode::OK, &lease("node-b", Timestamp::now(), "6"));
    assert!(!*leading.borrow());
    drop(tx);
    api.done(task).await;
}

#[tokio::test(start_paused = true)]
async fn an_expired_lease_is_taken_over_with_its_resource_version() {
    let (mut api, tx, leading, task) = start(vec![bad(1, "broken")]);
    api.expect(Method::GET, LEASE)
        .await
        .reply(StatusCode::OK, &lease("node-b", long_ago(), "7"));
    let take = api.expect(Method::PUT, LEASE).await;
    assert_eq!(take.body["metadata"]["resourceVersion"], "7");
    assert_eq!(take.body["spec"]["holderIdentity"], "node-a");
    assert_eq!(take.body["spec"]["leaseTransitions"], 3);
    assert_ne!(take.body["spec"]["renewTime"], json!(MicroTime(long_ago())));
    take.stored_as("8");

    api.expect_bad_event("broken").await;
    api.expect_condition(&l4_status("team", "bad")).await;
    assert!(*leading.borrow());

    // Renewal PUTs over what we wrote, without reading first.
    let renew = api.expect(Method::PUT, LEASE).await;
    assert_eq!(renew.body["metadata"]["resourceVersion"], "8");
    assert_eq!(renew.body["spec"]["holderIdentity"], "node-a");
    renew.stored_as("9");
    drop(tx);
    api.expect(Method::PUT, LEASE).await.stored_as("10");
    api.done(task).await;
}

#[tokio::test(start_paused = true)]
async fn losing_the_takeover_race_means_no_writes() {
    let (mut api, tx, leading, task) = start(vec![bad(1, "broken")]);
    api.expect(Method::GET, LEASE)
        .await
        .reply(StatusCode::OK, &lease("node-b", long_ago(), "7"));
    api.expect(Method::PUT, LEASE).await.fail(409, "Conflict");
    // No Event, no status: the next request is a calm look at the Lease.
    api.quiet_for(Duration::from_secs(4)).await;
    api.expect(Method::GET, LEASE)
        .await
        .reply(StatusCode::OK, &lease("node-c", Timestamp::now(), "8"));
    assert!(!*leading.borrow());
    drop(tx);
    api.done(task).await;
}

#[tokio::test(start_paused = true)]
async fn unchanged_reports_are_written_once_and_a_new_generation_again() {
    let (mut api, tx, _leading, task) = start(vec![bad(1, "port 0")]);
    api.acquire_absent_lease().await;
    let first = api.expect_bad_event("port 0").await;
    api.expect_condition(&l4_status("team", "bad")).await;

    // The same list again: nothing to write; the next call is the renewal.
    tx.send(vec![bad(1, "port 0")]).unwrap();
    api.expect(Method::PUT, LEASE).await.stored_as("2");

    tx.send(vec![bad(2, "port 70000")]).unwrap();
    let second = api.expect_bad_event("port 70000").await;
    assert_ne!(first, second);
    let condition = api.expect_condition(&l4_status("team", "bad")).await;
    assert_eq!(condition["observedGeneration"], 2);
    assert_eq!(condition["message"], "port 70000");

    // Fixed: Accepted=True, and no Event.
    tx.send(vec![report(ObjectKind::L4Policy, "team", "bad", 3, None)])
        .unwrap();
    let condition = api.expect_condition(&l4_status("team", "bad")).await;
    assert_eq!(
        (&condition["status"], &condition["observedGeneration"]),
        (&json!("True"), &json!(3))
    );
    api.expect(Method::PUT, LEASE).await.stored_as("3");
    drop(tx);
    api.expect(Method::PUT, LEASE).await.stored_as("4");
    api.done(task).await;
}

#[tokio::test(start_paused = true)]
async fn cluster_policy_events_go_to_default_and_network_policies_get_no_status() {
    let (mut api, tx, _leading, task) = start(vec![
        report(
            ObjectKind::ClusterL4Policy,
            "",
            "wide",
            1,
            Some("tier Baseline: Pass"),
        ),
        report(
            ObjectKind::NetworkPolicy,
            "team",
            "np",
            5,
            Some("named port missing"),
        ),
    ]);
    api.acquire_absent_lease().await;

    let event = api.expect(Method::POST, &events("default")).await;
    assert_eq!(
        event.body["regarding"],
        json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "ClusterL4Policy",
            "name": "wide", "uid": "uid-wide",
        })
    );
    assert_eq!(event.body["note"], "tier Baseline: Pass");
    event.echo();
    let condition = api
        .expect_condition("/apis/portcullis.dev/v1alpha1/clusterl4policies/wide/status")
        .await;
    assert_eq!(condition["metadata"], json!({"name": "wide"}));
    assert_eq!(condition["kind"], "ClusterL4Policy");
    assert_eq!(condition["status"], "False");

    let event = api.expect(Method::POST, &events("team")).await;
    assert_eq!(
        event.body["regarding"],
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "namespace": "team", "name": "np", "uid": "uid-np",
        })
    );
    event.echo();
    // NetworkPolicy has no status: next is the renewal.
    api.expect(Method::PUT, LEASE).await.stored_as("2");
    drop(tx);
    api.expect(Method::PUT, LEASE).await.stored_as("3");
    api.done(task).await;
}

#[tokio::test(start_paused = true)]
async fn failed_writes_are_retried_and_existing_events_count_as_reported() {
    let (mut api, tx, _leading, task) = start(vec![bad(1, "broken")]);
    api.acquire_absent_lease().await;
    // A previous leader created this Event already.
    api.expect(Method::POST, &events("team"))
        .await
        .fail(409, "AlreadyExists");
    api.expect(Method::PATCH, &l4_status("team", "bad"))
        .await
        .fail(500, "InternalError");
    // Retried after the renewal; the Event is not.
    api.expect(Method::PUT, LEASE).await.stored_as("2");
    api.expect_condition(&l4_status("team", "bad")).await;
    api.expect(Method::PUT, LEASE).await.stored_as("3");
    drop(tx);
    api.expect(Method::PUT, LEASE).await.stored_as("4");
    api.done(task).await;
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_stops_writes_and_a_new_term_writes_everything_again() {
    let (mut api, tx, leading, task) = start(vec![bad(1, "broken")]);
    api.acquire_absent_lease().await;
    let name = api.expect_bad_event("broken").await;
    api.expect_condition(&l4_status("team", "bad")).await;

    // Someone else renewed over us (we stalled): follow.
    api.expect(Method::PUT, LEASE).await.fail(409, "Conflict");
    api.expect(Method::GET, LEASE)
        .await
        .reply(StatusCode::OK, &lease("node-b", Timestamp::now(), "9"));
    api.quiet_for(Duration::from_secs(10)).await;
    assert!(!*leading.borrow());

    // node-b died; we take over and write what is needed once more.
    api.expect(Method::GET, LEASE)
        .await
        .reply(StatusCode::OK, &lease("node-b", long_ago(), "10"));
    api.expect(Method::PUT, LEASE).await.stored_as("11");
    let again = api.expect(Method::POST, &events("team")).await;
    assert_eq!(again.body["metadata"]["name"], name.as_str());
    again.fail(409, "AlreadyExists");
    api.expect_condition(&l4_status("team", "bad")).await;
    assert!(*leading.borrow());
    drop(tx);
    api.expect(Method::PUT, LEASE).await.stored_as("12");
    api.done(task).await;
}

#[test]
fn event_names_are_stable_valid_and_per_problem() {
    let a = bad(1, "x");
    let name = event::name(&a, "x");
    assert_eq!(name, event::name(&a.clone(), "x"), "same on every node");
    assert_ne!(name, event::name(&bad(2, "x"), "x"));
    assert_ne!(name, event::name(&a, "y"));
    let long = report(
        ObjectKind::L4Policy,
        "t",
        &format!("{}-b", "a".repeat(237)),
        1,
        None,
    );
    let name = event::name(&long, "x");
    assert!(name.len() <= 253, "{}", name.len());
    assert!(!name.contains("-."), "{name}");
}

#[test]
fn notes_are_cut_on_a_char_boundary() {
    let text = "é".repeat(600);
    let cut = event::truncate(&text, 1024);
    assert_eq!(cut.len(), 1024);
    let cut = event::truncate(&text, 1023);
    assert_eq!(cut.len(), 1022);
    assert_eq!(event::truncate("short", 1024), "short");
}

#[test]
fn lease_expiry_follows_renew_time_and_duration() {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    let default = Duration::from_secs(15);
    let renewed: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
    let held = LeaseSpec {
        holder_identity: Some("node-b".into()),
        renew_time: Some(MicroTime(renewed)),
        lease_duration_seconds: Some(30),
        ..Default::default()
    };
    assert_eq!(
        lease::expiry(&held, default),
        Some("2026-01-01T00:00:30Z".parse().unwrap())
    );
    let released = LeaseSpec {
        holder_identity: None,
        ..held.clone()
    };
    assert_eq!(lease::expiry(&released, default), None);
    let never_renewed = LeaseSpec {
        renew_time: None,
        ..held
    };
    assert_eq!(lease::expiry(&never_renewed, default), Some(Timestamp::MIN));
}
