//! The filter against a scripted API server (tower-test): which reviews it
//! creates, what it makes of the answers, and what it remembers.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc, Mutex,
};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};

use super::*;

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const ACCESS_REVIEWS: &str = "/apis/authorization.k8s.io/v1/subjectaccessreviews";

/// How the scripted API server answers, and what it was asked.
#[derive(Clone)]
pub struct Script {
    /// Tokens the API server authenticates, and as whom.
    pub users: Vec<(&'static str, &'static str)>,
    /// Users allowed to get /metrics.
    pub readers: Vec<&'static str>,
    /// Answer every request with this status instead (an API fault).
    pub fail_with: Option<StatusCode>,
    pub calls: Arc<AtomicUsize>,
    /// The SubjectAccessReview bodies received.
    pub access_reviews: Arc<Mutex<Vec<Value>>>,
}

impl Script {
    pub fn new() -> Self {
        Self {
            users: vec![
                ("prom-token", "system:serviceaccount:monitoring:prometheus"),
                ("other-token", "system:serviceaccount:shop:web"),
            ],
            readers: vec!["system:serviceaccount:monitoring:prometheus"],
            fail_with: None,
            calls: Arc::default(),
            access_reviews: Arc::default(),
        }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn answer(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(code) = self.fail_with {
            return (
                code,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "message": "etcdserver: request timed out", "code": code.as_u16()}),
            );
        }
        let mut review = body;
        match path {
            TOKEN_REVIEWS => {
                let token = review["spec"]["token"].as_str().unwrap_or_default();
                review["status"] = match self.users.iter().find(|(t, _)| *t == token) {
                    Some((_, user)) => json!({"authenticated": true, "user": {
                        "username": user, "uid": "uid-1",
                        "groups": ["system:serviceaccounts", "system:authenticated"]}}),
                    None => json!({"authenticated": false, "error": "invalid bearer token"}),
                };
            }
            ACCESS_REVIEWS => {
                self.access_reviews.lock().unwrap().push(review.clone());
                let user = review["spec"]["user"].as_str().unwrap_or_default();
                let allowed = self.readers.contains(&user)
                    && review["spec"]["nonResourceAttributes"]
                        == json!({"path": "/metrics", "verb": "get"});
                review["status"] = if allowed {
                    json!({"allowed": true, "reason": "RBAC: allowed by ClusterRoleBinding"})
                } else {
                    json!({"allowed": false})
                };
            }
            other => panic!("unexpected request to {other}"),
        }
        (StatusCode::CREATED, review)
    }

    /// A client whose API server follows this script.
    pub fn client(&self) -> Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let script = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                assert_eq!(parts.method, http::Method::POST);
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let (code, answer) = script.answer(parts.uri.path(), body);
                send.send_response(
                    Response::builder()
                        .status(code)
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
            }
        });
        Client::new(service, "default")
    }
}

fn bearer(token: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("Bearer {token}")).unwrap()
}

fn auth(script: &Script) -> MetricsAuth {
    MetricsAuth::new(script.client(), AuthOptions::default())
}

#[tokio::test]
async fn an_authorized_token_is_allowed_after_both_reviews() {
    let script = Script::new();
    let auth = auth(&script);
    match auth.authorize(Some(&bearer("prom-token"))).await {
        Decision::Allowed { user } => {
            assert_eq!(user, "system:serviceaccount:monitoring:prometheus")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        script.calls(),
        2,
        "one TokenReview, one SubjectAccessReview"
    );
    // The review asks about the user the token belongs to, with its groups.
    let sar = script.access_reviews.lock().unwrap()[0].clone();
    assert_eq!(sar["spec"]["uid"], "uid-1");
    assert_eq!(
        sar["spec"]["groups"],
        json!(["system:serviceaccounts", "system:authenticated"])
    );
}

#[tokio::test]
async fn no_or_malformed_token_is_unauthenticated_without_asking_the_api() {
    let script = Script::new();
    let auth = auth(&script);
    for header in [
        None,
        Some(HeaderValue::from_static("Basic cHJvbTpwcm9t")),
        Some(HeaderValue::from_static("Bearer ")),
        Some(HeaderValue::from_static("prom-token")),
    ] {
        assert!(
            matches!(
                auth.authorize(header.as_ref()).await,
                Decision::Unauthenticated { .. }
            ),
            "{header:?}"
        );
    }
    assert_eq!(script.calls(), 0);
    // The scheme is case-insensitive, as RFC 9110 has it.
    assert!(matches!(
        auth.authorize(Some(&HeaderValue::from_static("bearer prom-token")))
            .await,
        Decision::Allowed { .. }
    ));
}

#[tokio::test]
async fn a_token_the_api_server_rejects_is_unauthenticated() {
    let script = Script::new();
    let auth = auth(&script);
    match auth.authorize(Some(&bearer("stolen-or-expired"))).await {
        Decision::Unauthenticated { why } => assert!(why.contains("invalid bearer token"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(script.calls(), 1, "no access review for an unknown user");
}

#[tokio::test]
async fn an_authenticated_user_without_the_role_is_forbidden() {
    let script = Script::new();
    let auth = auth(&script);
    match auth.authorize(Some(&bearer("other-token"))).await {
        Decision::Forbidden { user, why } => {
            assert_eq!(user, "system:serviceaccount:shop:web");
            assert!(why.contains("get /metrics"), "{why}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_api_fault_is_unavailable_and_not_remembered() {
    let mut script = Script::new();
    script.fail_with = Some(StatusCode::INTERNAL_SERVER_ERROR);
    let auth = auth(&script);
    for expected_calls in [1, 2] {
        match auth.authorize(Some(&bearer("prom-token"))).await {
            Decision::Unavailable(AuthError::Api { review, .. }) => {
                assert_eq!(review, "TokenReview")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(script.calls(), expected_calls, "an outage is asked again");
    }
}

#[tokio::test(start_paused = true)]
async fn an_api_server_that_does_not_answer_is_unavailable_after_the_timeout() {
    // A client whose requests are never answered: the handle is kept, not served.
    let (service, _handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let auth = MetricsAuth::new(Client::new(service, "default"), AuthOptions::default());
    match auth.authorize(Some(&bearer("prom-token"))).await {
        Decision::Unavailable(AuthError::Timeout { timeout, .. }) => {
            assert_eq!(timeout, Duration::from_secs(5))
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn answers_are_reused_for_the_ttl_then_asked_again() {
    let script = Script::new();
    let auth = auth(&script);
    assert!(matches!(
        auth.authorize(Some(&bearer("prom-token"))).await,
        Decision::Allowed { .. }
    ));
    assert!(matches!(
        auth.authorize(Some(&bearer("other-token"))).await,
        Decision::Forbidden { .. }
    ));
    assert!(matches!(
        auth.authorize(Some(&bearer("nobody"))).await,
        Decision::Unauthenticated { .. }
    ));
    assert_eq!(script.calls(), 5);
    for _ in 0..100 {
        assert!(matches!(
            auth.authorize(Some(&bearer("prom-token"))).await,
            Decision::Allowed { .. }
        ));
        assert!(matches!(
            auth.authorize(Some(&bearer("other-token"))).await,
            Decision::Forbidden { .. }
        ));
        assert!(matches!(
            auth.authorize(Some(&bearer("nobody"))).await,
            Decision::Unauthenticated { .. }
        ));
    }
    assert_eq!(
        script.calls(),
        5,
        "positive and negative answers are cached"
    );
    tokio::time::advance(Duration::from_secs(11)).await;
    assert!(matches!(
        auth.authorize(Some(&bearer("prom-token"))).await,
        Decision::Allowed { .. }
    ));
    assert_eq!(script.calls(), 7, "an expired answer is asked again");
}

#[tokio::test]
async fn the_cache_stays_within_its_capacity() {
    let script = Script::new();
    let auth = MetricsAuth::new(
        script.client(),
        AuthOptions {
            capacity: 2,
            ..AuthOptions::default()
        },
    );
    for token in ["a", "b", "c", "d", "prom-token"] {
        auth.authorize(Some(&bearer(token))).await;
        assert!(auth.cache.lock().unwrap().len() <= 2);
    }
    // The newest answer is kept.
    let calls = script.calls();
    auth.authorize(Some(&bearer("prom-token"))).await;
    assert_eq!(script.calls(), calls);
}
