//! The Portcullis CA against a real API server: real ServiceAccount
//! tokens (`kubectl create token`, bound to real pods), real TokenReviews,
//! pods bound to nodes, PortcullisRevocations, the key Secret and the trust
//! bundle ConfigMap, with the CA running as its own ServiceAccount under
//! the RBAC deploy/ca ships. Each answer is checked as an agent sees it:
//! HTTP status, refusal reason, and a chain that verifies against the
//! published bundle.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use base64::Engine as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use portcullis_agent::{
    ca::{
        authorize::ServiceAccountRef,
        keys::KeySource,
        server::{CaServer, ObjectName, ServeOptions},
    },
    identity::{
        authority::{chain_from_pem, CaDir},
        bundle::TrustBundle,
        certificate::CertificateInfo,
        kube_watch::BUNDLE_KEY,
        wire::{IssueRequest, ISSUE_PATH},
    },
};
use portcullis_tests::kube_api::{self, ControlPlane};
use serde_json::{json, Value};

const SYSTEM: &str = "portcullis-system";
const AGENT_SA: &str = "portcullis-agent";
const AUDIENCE: &str = "portcullis-ca";
const SERVING_NAME: &str = "portcullis-ca.portcullis-system.svc";
const LEAF_LIFETIME: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- setup

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The install with identity: deploy/ plus the deploy/identity component,
/// composed from outside deploy/ as docs/identity.md tells users to.
fn render_identity_install(plane: &ControlPlane) -> String {
    let dir = tempfile::tempdir().unwrap();
    let deploy = deploy().canonicalize().unwrap();
    let up = dir
        .path()
        .canonicalize()
        .unwrap()
        .components()
        .skip(1)
        .map(|_| "..")
        .collect::<Vec<_>>()
        .join("/");
    let base = format!("{up}{}", deploy.display());
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             resources: [{base}]\ncomponents: [{base}/identity]\n"
        ),
    )
    .unwrap();
    kubectl_ok(plane, &["kustomize", dir.path().to_str().unwrap()])
}

fn kubectl_ok(plane: &ControlPlane, args: &[&str]) -> String {
    plane.kubectl_ok(args, "")
}

/// Applies the identity install (CA and agent RBAC, the empty bundle
/// ConfigMap, ServiceAccounts) and the nodes the tests use.
async fn install(plane: &ControlPlane) {
    plane.kubectl_ok(&["apply", "-f", "-"], &render_identity_install(plane));
    for node in ["node-a", "node-b"] {
        plane.kubectl_ok(
            &["apply", "-f", "-"],
            &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}).to_string(),
        );
    }
}

/// The shared control plane, installed once.
async fn shared() -> &'static ControlPlane {
    static INSTALLED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let plane = kube_api::shared().await;
    INSTALLED.get_or_init(|| install(plane)).await;
    plane
}

/// A client authenticated as a ServiceAccount (a plain token, as a pod's).
async fn client_as(plane: &ControlPlane, namespace: &str, name: &str) -> kube::Client {
    let token = kubectl_ok(plane, &["create", "token", name, "-n", namespace]);
    plane
        .client_with(&plane.kubeconfig_for(&format!("{namespace}-{name}"), token.trim()))
        .await
}

async fn namespace(plane: &ControlPlane, name: &str) {
    kube_api::create(
        &plane.client().await,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
    )
    .await;
}

/// A pod of `service_account`, scheduled on `node`, in `phase`.
async fn pod(
    plane: &ControlPlane,
    namespace: &str,
    name: &str,
    service_account: Option<&str>,
    node: &str,
    phase: &str,
) -> Value {
    let mut spec = json!({
        "nodeName": node,
        "containers": [{"name": "app", "image": "registry.example/app:1"}],
    });
    if let Some(sa) = service_account {
        spec["serviceAccountName"] = json!(sa);
    }
    let created = kube_api::create(
        &plane.client().await,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
            "status": {"phase": phase},
        }),
    )
    .await;
    serde_json::to_value(created).unwrap()
}

/// An agent pod on `node` and a token for it as a projected volume gives
/// it: audience portcullis-ca, bound to the pod.
async fn agent_on(plane: &ControlPlane, pod_name: &str, node: &str) -> String {
    pod(plane, SYSTEM, pod_name, Some(AGENT_SA), node, "Running").await;
    bound_token(plane, AGENT_SA, pod_name, AUDIENCE)
}

fn bound_token(plane: &ControlPlane, sa: &str, pod_name: &str, audience: &str) -> String {
    kubectl_ok(
        plane,
        &[
            "create",
            "token",
            sa,
            "-n",
            SYSTEM,
            "--audience",
            audience,
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            pod_name,
        ],
    )
    .trim()
    .to_string()
}

fn options(keys: KeySource) -> ServeOptions {
    let mut o = ServeOptions::new(keys);
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.leaf_lifetime = LEAF_LIFETIME;
    o.bundle_configmap = None;
    o.refresh_interval = Duration::from_millis(300);
    o
}

/// Starts a CA and waits until it serves and knows the revocations.
async fn start_ca(options: ServeOptions, client: kube::Client) -> CaServer {
    let ca = CaServer::start(options, client).await.unwrap();
    wait_for("the CA to serve", Duration::from_secs(20), || {
        ca.serving_certificate().is_some() && ca.revocations_known()
    })
    .await;
    ca
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A CA directory in a temporary directory, in `--dir` mode.
fn ca_dir() -> (tempfile::TempDir, CaDir) {
    let dir = tempfile::tempdir().unwrap();
    let ca = CaDir::init(dir.path().join("ca"), "one").unwrap();
    (dir, ca)
}

// ------------------------------------------------------- talking to the CA

/// A P-256 key and a certificate request signed by it, as an agent makes.
fn csr() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

fn request(namespace: &str, service_account: &str) -> Vec<u8> {
    serde_json::to_vec(&IssueRequest {
        namespace: namespace.into(),
        service_account: service_account.into(),
        csr: csr(),
    })
    .unwrap()
}

#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
}

impl Answer {
    fn reason(&self) -> &str {
        self.body["reason"].as_str().unwrap_or("")
    }

    fn message(&self) -> &str {
        self.body["message"].as_str().unwrap_or("")
    }

    #[track_caller]
    fn assert_refused(&self, status: u16, reason: &str) {
        assert_eq!(
            (self.status, self.reason()),
            (status, reason),
            "answer: {}",
            self.body
        );
    }

    fn chain(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        assert_eq!(self.status, 200, "answer: {}", self.body);
        let pem: Vec<String> =
            serde_json::from_value(self.body["certificateChain"].clone()).unwrap();
        chain_from_pem(&pem.concat()).unwrap()
    }
}

/// Sends a request as an agent: HTTPS to the CA, verifying its serving
/// certificate for the Service name against `roots`.
async fn call(
    ca: &CaServer,
    roots: &TrustBundle,
    method: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Answer {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.root_store())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(ca.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(SERVING_NAME).unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .expect("the CA's serving certificate verifies against the bundle");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(ISSUE_PATH)
        .header("host", SERVING_NAME)
        .header("content-type", "application/json");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let response = sender
        .send_request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    Answer { status, body }
}

async fn issue(ca: &CaServer, roots: &TrustBundle, token: &str, ns: &str, sa: &str) -> Answer {
    call(ca, roots, "POST", Some(token), request(ns, sa)).await
}

/// The bundle in the ConfigMap, once it holds `roots` roots.
async fn published_bundle(client: &kube::Client, name: &str, roots: usize) -> TrustBundle {
    let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(client.clone(), SYSTEM);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let map = api.get(name).await.unwrap();
        let pem = map
            .data
            .and_then(|mut d| d.remove(BUNDLE_KEY))
            .unwrap_or_default();
        if let Ok(bundle) = TrustBundle::from_pem(&pem, "the ConfigMap") {
            if bundle.roots().len() == roots {
                return bundle;
            }
        }
        assert!(
            Instant::now() < deadline,
            "ConfigMap {SYSTEM}/{name} never held {roots} roots; it holds {pem:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn verify(
    bundle: &TrustBundle,
    chain: &[rustls::pki_types::CertificateDer<'_>],
) -> CertificateInfo {
    bundle
        .verify(chain, "cluster.local", SystemTime::now())
        .expect("the chain verifies against the bundle")
}

// ---------------------------------------------------------------- granted

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_of_the_service_account_on_the_agents_node_gets_a_verifying_certificate() {
    let plane = shared().await;
    // The only test that publishes to the shared plane's bundle ConfigMap.
    namespace(plane, "shop-granted").await;
    pod(
        plane,
        "shop-granted",
        "web-1",
        Some("web"),
        "node-a",
        "Running",
    )
    .await;
    pod(plane, "shop-granted", "legacy-1", None, "node-a", "Running").await;
    let token = agent_on(plane, "agent-granted", "node-a").await;
    let (_tmp, dir) = ca_dir();
    let mut o = options(KeySource::Dir(dir.path().into()));
    o.bundle_configmap = Some(ObjectName {
        namespace: SYSTEM.into(),
        name: "portcullis-trust-bundle".into(),
    });
    let ca = start_ca(o, client_as(plane, SYSTEM, "portcullis-ca").await).await;
    let admin = plane.client().await;
    let published = published_bundle(&admin, "portcullis-trust-bundle", 1).await;
    assert_eq!(published, dir.bundle().unwrap());

    let answer = issue(&ca, &published, &token, "shop-granted", "web").await;
    let info = verify(&published, &answer.chain());
    assert_eq!(
        info.spiffe_id.unwrap().to_string(),
        "spiffe://cluster.local/ns/shop-granted/sa/web"
    );
    let left = info
        .not_after
        .duration_since(SystemTime::now())
        .unwrap()
        .as_secs_f64();
    assert!(
        (LEAF_LIFETIME.as_secs_f64() - 3.0..=LEAF_LIFETIME.as_secs_f64()).contains(&left),
        "the leaf has {left} s left, configured {LEAF_LIFETIME:?}"
    );
    let bundle: Vec<String> = serde_json::from_value(answer.body["trustBundle"].clone()).unwrap();
    assert_eq!(bundle.concat(), published.to_pem());

    // A pod naming no service account runs as `default`.
    let answer = issue(&ca, &published, &token, "shop-granted", "default").await;
    verify(&published, &answer.chain());

    // A verifier holding another root rejects the chain.
    let (_other_tmp, other) = ca_dir();
    assert!(other
        .bundle()
        .unwrap()
        .verify(&answer.chain(), "cluster.local", SystemTime::now())
        .is_err());

    let metrics = ca.metrics().encode().unwrap();
    assert!(
        metrics.contains("portcullis_ca_certificates_issued_total 2"),
        "{metrics}"
    );
}

// ---------------------------------------------------------------- refused

/// A CA in `--dir` mode, running as portcullis-ca, publishing nothing; and
/// the bundle that verifies it.
async fn refusing_ca(plane: &ControlPlane) -> (CaServer, TrustBundle, tempfile::TempDir) {
    let (tmp, dir) = ca_dir();
    let ca = start_ca(
        options(KeySource::Dir(dir.path().into())),
        client_as(plane, SYSTEM, "portcullis-ca").await,
    )
    .await;
    (ca, dir.bundle().unwrap(), tmp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_authorization_refuses_identities_without_a_pod_on_the_agents_node() {
    let plane = shared().await;
    namespace(plane, "shop-nodes").await;
    pod(
        plane,
        "shop-nodes",
        "api-1",
        Some("api"),
        "node-b",
        "Running",
    )
    .await;
    pod(
        plane,
        "shop-nodes",
        "batch-1",
        Some("batch"),
        "node-a",
        "Succeeded",
    )
    .await;
    pod(
        plane,
        "shop-nodes",
        "cron-1",
        Some("cron"),
        "node-a",
        "Failed",
    )
    .await;
    let token = agent_on(plane, "agent-nodes", "node-a").await;
    let (ca, roots, _tmp) = refusing_ca(plane).await;

    // A pod of shop-nodes/api exists, on another node.
    let answer = issue(&ca, &roots, &token, "shop-nodes", "api").await;
    answer.assert_refused(403, "no_pod_on_node");
    assert_eq!(
        answer.message(),
        "no pod with service account shop-nodes/api is scheduled on node node-a"
    );
    // No pod of that service account anywhere.
    issue(&ca, &roots, &token, "shop-nodes", "ghost")
        .await
        .assert_refused(403, "no_pod_on_node");
    // Finished pods need no identity.
    for sa in ["batch", "cron"] {
        issue(&ca, &roots, &token, "shop-nodes", sa)
            .await
            .assert_refused(403, "no_pod_on_node");
    }
    // The agent on node-b gets api.
    let token_b = agent_on(plane, "agent-nodes-b", "node-b").await;
    let answer = issue(&ca, &roots, &token_b, "shop-nodes", "api").await;
    verify(&roots, &answer.chain());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_that_are_not_an_agents_pod_bound_token_for_our_audience_are_refused() {
    let plane = shared().await;
    namespace(plane, "shop-tokens").await;
    pod(
        plane,
        "shop-tokens",
        "web-1",
        Some("web"),
        "node-a",
        "Running",
    )
    .await;
    let good = agent_on(plane, "agent-tokens", "node-a").await;
    let (ca, roots, _tmp) = refusing_ca(plane).await;
    let ask = |token: Option<String>| {
        let (ca, roots) = (&ca, &roots);
        async move {
            call(
                ca,
                roots,
                "POST",
                token.as_deref(),
                request("shop-tokens", "web"),
            )
            .await
        }
    };
    verify(&roots, &ask(Some(good.clone())).await.chain());

    // No token at all.
    ask(None).await.assert_refused(401, "unauthenticated");
    // A token for the API server's audience, not ours.
    let wrong_audience = bound_token(plane, AGENT_SA, "agent-tokens", kube_api::SA_ISSUER);
    ask(Some(wrong_audience))
        .await
        .assert_refused(401, "unauthenticated");
    // Expired: the API server mints nothing shorter than 10 minutes, so a
    // real token of this agent is re-signed with the control plane's
    // service-account key, its expiry an hour in the past.
    let expired = expire(plane, &good);
    let answer = ask(Some(expired)).await;
    answer.assert_refused(401, "unauthenticated");
    assert!(answer.message().contains("expired"), "{}", answer.body);
    // Not bound to a pod: the CA cannot tell the agent's node.
    let unbound = kubectl_ok(
        plane,
        &[
            "create",
            "token",
            AGENT_SA,
            "-n",
            SYSTEM,
            "--audience",
            AUDIENCE,
        ],
    );
    ask(Some(unbound.trim().into()))
        .await
        .assert_refused(403, "not_bound_to_pod");
    // Another service account's pod-bound token, even on the same node.
    kubectl_ok(
        plane,
        &["create", "serviceaccount", "intruder", "-n", SYSTEM],
    );
    pod(
        plane,
        SYSTEM,
        "intruder-1",
        Some("intruder"),
        "node-a",
        "Running",
    )
    .await;
    let intruder = bound_token(plane, "intruder", "intruder-1", AUDIENCE);
    let answer = ask(Some(intruder)).await;
    answer.assert_refused(403, "not_an_agent");
    assert!(
        answer
            .message()
            .contains("system:serviceaccount:portcullis-system:intruder"),
        "{}",
        answer.body
    );
    // The agent's pod is gone: its token no longer authenticates.
    let doomed = agent_on(plane, "agent-doomed", "node-a").await;
    verify(&roots, &ask(Some(doomed.clone())).await.chain());
    kubectl_ok(
        plane,
        &[
            "delete",
            "pod",
            "agent-doomed",
            "-n",
            SYSTEM,
            // No kubelet confirms a graceful deletion here.
            "--grace-period=0",
            "--force",
        ],
    );
    ask(Some(doomed))
        .await
        .assert_refused(401, "unauthenticated");

    let metrics = ca.metrics().encode().unwrap();
    assert!(
        metrics.contains("portcullis_ca_refusals_total{reason=\"unauthenticated\"} 4"),
        "{metrics}"
    );
}

/// `token` with its expiry (and issue time) moved an hour into the past,
/// signed again with the API server's service-account key (ES256).
fn expire(plane: &ControlPlane, token: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT");
    let header: Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(
        header["alg"], "ES256",
        "the test control plane signs with P-256"
    );
    let mut claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    claims["iat"] = json!(now - 7200);
    claims["nbf"] = json!(now - 7200);
    claims["exp"] = json!(now - 3600);
    let signed = format!(
        "{}.{}",
        parts[0],
        b64.encode(serde_json::to_vec(&claims).unwrap())
    );
    let key = rcgen::KeyPair::from_pem(&plane.service_account_key_pem()).unwrap();
    let rng = ring::rand::SystemRandom::new();
    let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &key.serialize_der(),
        &rng,
    )
    .unwrap();
    let signature = signer.sign(&rng, signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64.encode(signature.as_ref()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_bad_requests() {
    let plane = shared().await;
    namespace(plane, "shop-bad").await;
    pod(plane, "shop-bad", "web-1", Some("web"), "node-a", "Running").await;
    let token = agent_on(plane, "agent-bad", "node-a").await;
    let (ca, roots, _tmp) = refusing_ca(plane).await;
    let post = |body: Vec<u8>| call(&ca, &roots, "POST", Some(&token), body);

    post(b"{not json".to_vec())
        .await
        .assert_refused(400, "bad_request");
    post(br#"{"namespace":"shop-bad","serviceAccount":"web"}"#.to_vec())
        .await
        .assert_refused(400, "bad_request");
    post(request("Shop_Bad", "web"))
        .await
        .assert_refused(400, "bad_request");
    let not_a_csr = serde_json::to_vec(&json!({
        "namespace": "shop-bad", "serviceAccount": "web",
        "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    }))
    .unwrap();
    let answer = post(not_a_csr).await;
    answer.assert_refused(400, "bad_request");
    assert!(
        answer.message().contains("certificate request"),
        "{}",
        answer.body
    );
    // A request for an RSA or P-384 key: only P-256 is signed.
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&p384)
        .unwrap()
        .pem()
        .unwrap();
    let answer = post(
        serde_json::to_vec(&json!({"namespace": "shop-bad", "serviceAccount": "web", "csr": csr}))
            .unwrap(),
    )
    .await;
    answer.assert_refused(400, "bad_request");
    assert!(answer.message().contains("P-256"), "{}", answer.body);
    post(vec![b' '; 65 * 1024])
        .await
        .assert_refused(400, "bad_request");
    let answer = call(&ca, &roots, "GET", Some(&token), Vec::new()).await;
    assert_eq!(answer.status, 405);
}

// ------------------------------------------------------------ revocations

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_identity_is_refused_until_its_revocation_is_deleted() {
    let plane = shared().await;
    namespace(plane, "shop-revoked").await;
    pod(
        plane,
        "shop-revoked",
        "web-1",
        Some("web"),
        "node-a",
        "Running",
    )
    .await;
    let token = agent_on(plane, "agent-revoked", "node-a").await;
    let (ca, roots, _tmp) = refusing_ca(plane).await;
    verify(
        &roots,
        &issue(&ca, &roots, &token, "shop-revoked", "web")
            .await
            .chain(),
    );

    let revocation = json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "PortcullisRevocation",
        "metadata": {"name": "shop-revoked-web"},
        "spec": {
            "spiffeId": "spiffe://cluster.local/ns/shop-revoked/sa/web",
            "reason": "key leaked in incident 42",
        },
    });
    let admin = plane.client().await;
    kube_api::create(&admin, revocation.clone()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        let answer = issue(&ca, &roots, &token, "shop-revoked", "web").await;
        if answer.status != 200 || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    answer.assert_refused(403, "revoked");
    assert!(answer.message().contains("incident 42"), "{}", answer.body);

    kube_api::delete(&admin, revocation).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = issue(&ca, &roots, &token, "shop-revoked", "web").await;
        if answer.status == 200 {
            verify(&roots, &answer.chain());
            break;
        }
        answer.assert_refused(403, "revoked");
        assert!(
            Instant::now() < deadline,
            "still revoked after the deletion"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A CA whose account may not read revocations never learns them: it
/// refuses everything, naming why, rather than issue to someone revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_cannot_read_revocations_fails_closed() {
    let plane = shared().await;
    namespace(plane, "shop-unknown").await;
    pod(
        plane,
        "shop-unknown",
        "web-1",
        Some("web"),
        "node-a",
        "Running",
    )
    .await;
    let token = agent_on(plane, "agent-unknown", "node-a").await;
    // deploy/ca's ClusterRole without the revocations rule.
    plane.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": "ca-no-revocations", "namespace": SYSTEM}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": "ca-no-revocations"},
             "rules": [
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": "ca-no-revocations"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ca-no-revocations"},
             "subjects": [{"kind": "ServiceAccount", "name": "ca-no-revocations", "namespace": SYSTEM}]},
        ]})
        .to_string(),
    );
    let (_tmp, dir) = ca_dir();
    let roots = dir.bundle().unwrap();
    let ca = CaServer::start(
        options(KeySource::Dir(dir.path().into())),
        client_as(plane, SYSTEM, "ca-no-revocations").await,
    )
    .await
    .unwrap();
    wait_for("the CA to serve", Duration::from_secs(20), || {
        ca.serving_certificate().is_some()
    })
    .await;
    // Long enough for a first list to have failed and been retried.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!ca.revocations_known());
    let answer = issue(&ca, &roots, &token, "shop-unknown", "web").await;
    answer.assert_refused(503, "revocation_unknown");
}

// ------------------------------------------------- the Secret and rotation

/// The Secret as docs/identity.md creates it: the CA directory's files
/// without the root keys (kept offline).
fn apply_secret(plane: &ControlPlane, dir: &CaDir) {
    let staging = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if !(name.starts_with("root-") && name.ends_with(".key")) {
            std::fs::copy(entry.path(), staging.path().join(&name)).unwrap();
        }
    }
    let from = format!("--from-file={}", staging.path().display());
    let yaml = kubectl_ok(
        plane,
        &[
            "create",
            "secret",
            "generic",
            "portcullis-ca",
            "-n",
            SYSTEM,
            &from,
            "--dry-run=client",
            "-o",
            "yaml",
        ],
    );
    plane.kubectl_ok(&["apply", "-f", "-"], &yaml);
}

fn issuer_of(chain: &[rustls::pki_types::CertificateDer<'_>]) -> String {
    CertificateInfo::from_der(&chain[0], "leaf").unwrap().issuer
}

/// `ca serve --secret` on a cluster of its own: each rotation step applied
/// to the Secret reaches the bundle ConfigMap, the serving certificate and
/// new leaves within seconds, with no restart, and every live leaf keeps
/// verifying against the published bundle until its root is retired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_secret_is_followed_through_a_root_rotation() {
    let plane = ControlPlane::start().await.unwrap();
    install(&plane).await;
    let admin = plane.client().await;
    namespace(&plane, "shop").await;
    pod(&plane, "shop", "web-1", Some("web"), "node-a", "Running").await;
    let token = agent_on(&plane, "agent-a", "node-a").await;

    let operator = tempfile::tempdir().unwrap();
    let dir = CaDir::init(operator.path().join("ca"), "one").unwrap();
    apply_secret(&plane, &dir);
    let work = tempfile::tempdir().unwrap();
    let mut o = options(KeySource::Secret {
        namespace: SYSTEM.into(),
        name: "portcullis-ca".into(),
        work_dir: work.path().join("keys"),
    });
    o.agent_service_account = ServiceAccountRef {
        namespace: SYSTEM.into(),
        name: AGENT_SA.into(),
    };
    o.bundle_configmap = Some(ObjectName {
        namespace: SYSTEM.into(),
        name: "portcullis-trust-bundle".into(),
    });
    let ca = start_ca(o, client_as(&plane, SYSTEM, "portcullis-ca").await).await;
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(work.path().join("keys"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o700, "the key copies are private");

    let bundle = published_bundle(&admin, "portcullis-trust-bundle", 1).await;
    let old_leaf = issue(&ca, &bundle, &token, "shop", "web").await.chain();
    verify(&bundle, &old_leaf);
    assert!(issuer_of(&old_leaf).contains("issuer one"));

    // Step 1: the new root joins the bundle; leaves still chain to one.
    dir.add_root("two").unwrap();
    apply_secret(&plane, &dir);
    let bundle = published_bundle(&admin, "portcullis-trust-bundle", 2).await;
    verify(&bundle, &old_leaf);
    let leaf = issue(&ca, &bundle, &token, "shop", "web").await.chain();
    assert!(issuer_of(&leaf).contains("issuer one"));

    // Step 2: new leaves and the serving certificate chain to two; leaves
    // of one still verify.
    dir.activate("two").unwrap();
    apply_secret(&plane, &dir);
    let deadline = Instant::now() + Duration::from_secs(15);
    let new_leaf = loop {
        let leaf = issue(&ca, &bundle, &token, "shop", "web").await.chain();
        if issuer_of(&leaf).contains("issuer two") {
            break leaf;
        }
        assert!(Instant::now() < deadline, "issuer two never signed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    verify(&bundle, &new_leaf);
    verify(&bundle, &old_leaf);
    let serving = CertificateInfo::from_der(&ca.serving_certificate().unwrap(), "serving").unwrap();
    assert!(serving.issuer.contains("issuer two"), "{}", serving.issuer);

    // Step 3 (after one leaf lifetime in real life): one leaves the bundle.
    dir.retire_root("one").unwrap();
    apply_secret(&plane, &dir);
    let bundle = published_bundle(&admin, "portcullis-trust-bundle", 1).await;
    verify(&bundle, &new_leaf);
    assert!(
        bundle
            .verify(&old_leaf, "cluster.local", SystemTime::now())
            .is_err(),
        "a leaf of the retired root no longer verifies"
    );
    verify(
        &bundle,
        &issue(&ca, &bundle, &token, "shop", "web").await.chain(),
    );
}

// -------------------------------------------------------------- manifests

fn can_i(plane: &ControlPlane, sa: &str, args: &[&str]) -> bool {
    let user = format!("--as=system:serviceaccount:{SYSTEM}:{sa}");
    let out = plane
        .kubectl()
        .args(["auth", "can-i"])
        .args(args)
        .arg(&user)
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        answer == "yes" || answer == "no",
        "kubectl auth can-i {args:?}: {answer} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    answer == "yes"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifests_render_and_grant_least_privilege() {
    let plane = shared().await;
    let ca = kubectl_ok(plane, &["kustomize", deploy().join("ca").to_str().unwrap()]);
    let objects: Vec<Value> = serde_saphyr::from_multiple(&ca).unwrap();
    let kinds: Vec<String> = objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    for expected in [
        "ServiceAccount/portcullis-ca",
        "Deployment/portcullis-ca",
        "Service/portcullis-ca",
        "ConfigMap/portcullis-trust-bundle",
        "ClusterRole/portcullis-ca",
        "Role/portcullis-ca",
    ] {
        assert!(
            kinds.iter().any(|k| k == expected),
            "{expected} in {kinds:?}"
        );
    }
    let deployment = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(pod["volumes"][0]["emptyDir"]["medium"], "Memory");
    let map = objects.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
    assert!(map["data"].is_null(), "the bundle ConfigMap ships empty");

    let identity: Vec<Value> =
        serde_saphyr::from_multiple(&render_identity_install(plane)).unwrap();
    let daemonset = identity.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    let spec = &daemonset["spec"]["template"]["spec"];
    let args: Vec<&str> = spec["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--ca-url=https://portcullis-ca.portcullis-system.svc:8443"));
    assert!(args.contains(&"--ca-token-file=/var/run/secrets/portcullis-ca/token"));
    let volume = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "portcullis-ca-token")
        .unwrap();
    let token = &volume["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(
        (
            token["audience"].as_str(),
            token["expirationSeconds"].as_i64()
        ),
        (Some(AUDIENCE), Some(3600))
    );

    // Applied by `shared()`: least privilege as the API server decides it.
    assert!(can_i(
        plane,
        "portcullis-ca",
        &["get", "secret/portcullis-ca", "-n", SYSTEM]
    ));
    assert!(can_i(
        plane,
        "portcullis-ca",
        &["watch", "secret/portcullis-ca", "-n", SYSTEM]
    ));
    assert!(!can_i(
        plane,
        "portcullis-ca",
        &["get", "secret/other", "-n", SYSTEM]
    ));
    assert!(!can_i(
        plane,
        "portcullis-ca",
        &["update", "secret/portcullis-ca", "-n", SYSTEM]
    ));
    assert!(!can_i(
        plane,
        "portcullis-ca",
        &["list", "secrets", "-n", "default"]
    ));
    for verb in ["get", "list", "watch", "update", "patch", "delete"] {
        assert!(
            !can_i(
                plane,
                AGENT_SA,
                &[verb, "secret/portcullis-ca", "-n", SYSTEM]
            ),
            "the agent may {verb} the CA's key Secret"
        );
    }
    assert!(!can_i(
        plane,
        AGENT_SA,
        &["create", "secrets", "-n", SYSTEM]
    ));
    let bundle = "configmap/portcullis-trust-bundle";
    assert!(can_i(plane, AGENT_SA, &["watch", bundle, "-n", SYSTEM]));
    assert!(can_i(plane, AGENT_SA, &["get", bundle, "-n", SYSTEM]));
    for verb in ["update", "patch", "delete"] {
        assert!(
            !can_i(plane, AGENT_SA, &[verb, bundle, "-n", SYSTEM]),
            "agent may {verb}"
        );
    }
    assert!(can_i(
        plane,
        AGENT_SA,
        &["watch", "portcullisrevocations.portcullis.dev"]
    ));
    assert!(!can_i(
        plane,
        AGENT_SA,
        &["create", "portcullisrevocations.portcullis.dev"]
    ));
    assert!(can_i(
        plane,
        "portcullis-ca",
        &["patch", bundle, "-n", SYSTEM]
    ));
    assert!(!can_i(
        plane,
        "portcullis-ca",
        &["create", "configmaps", "-n", SYSTEM]
    ));
    assert!(!can_i(
        plane,
        "portcullis-ca",
        &["patch", "configmap/other", "-n", SYSTEM]
    ));
    assert!(can_i(
        plane,
        "portcullis-ca",
        &["create", "tokenreviews.authentication.k8s.io"]
    ));
    assert!(!can_i(
        plane,
        "portcullis-ca",
        &["create", "portcullisrevocations.portcullis.dev"]
    ));
}

// ------------------------------------------- the agent's manager end to end

/// The agent side against the real CA: the identity manager (as the agent
/// runs it with `--ca-url`, a projected token file and the bundle from the
/// ConfigMap) gets its pod's identity through TokenReview and node
/// authorization, is refused for a service account with no pod on its
/// node, keeps its certificate through a CA outage while the failure
/// counter moves, and gets a new one when the CA is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_manager_gets_identities_from_the_ca_and_rides_out_an_outage() {
    use std::collections::BTreeSet;

    use portcullis_agent::{
        identity::{
            manager::{self, BundleSource, IdentityOptions, IssuerOptions, RevocationSource},
            spiffe::SpiffeId,
        },
        metrics::Metrics,
    };

    let plane = shared().await;
    let admin = plane.client().await;
    namespace(plane, "e2e-shop").await;
    pod(plane, "e2e-shop", "web-1", Some("web"), "node-a", "Running").await;
    let token = agent_on(plane, "agent-e2e", "node-a").await;
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, &token).unwrap();
    // A bundle ConfigMap of this test's own (others publish theirs).
    kube_api::create(
        &admin,
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "e2e-bundle", "namespace": SYSTEM}}),
    )
    .await;

    let (_dir, ca_dir) = ca_dir();
    let ca_options = || {
        let mut o = options(KeySource::Dir(ca_dir.path().to_path_buf()));
        o.serving_names = vec!["127.0.0.1".into()];
        o.bundle_configmap = Some(ObjectName {
            namespace: SYSTEM.into(),
            name: "e2e-bundle".into(),
        });
        o
    };
    let ca = start_ca(ca_options(), admin.clone()).await;
    let addr = ca.addr();

    let web = SpiffeId::new("cluster.local", "e2e-shop", "web").unwrap();
    let ghost = SpiffeId::new("cluster.local", "e2e-shop", "ghost").unwrap();
    let (demand_tx, demand) = tokio::sync::watch::channel(BTreeSet::from([web.clone()]));
    let metrics = Metrics::new();
    let mut identity = IdentityOptions::ca_dir(ca_dir.path(), LEAF_LIFETIME);
    identity.issuer = IssuerOptions::Remote {
        url: format!("https://{addr}"),
        token_file: token_file.clone(),
        bundle: BundleSource::ConfigMap {
            namespace: SYSTEM.into(),
            name: "e2e-bundle".into(),
        },
        timeout: Duration::from_secs(5),
    };
    identity.revocations = RevocationSource::Kubernetes {
        staleness: Duration::from_secs(300),
    };
    identity.max_backoff = Duration::from_secs(2);
    let handle = manager::start(
        identity,
        Some(admin.clone()),
        demand,
        metrics.identity.clone(),
    )
    .expect("the identity manager starts");
    let mut certificates = handle.certificates.clone();

    // Granted: the chain verifies against the published bundle.
    let first = tokio::time::timeout(
        Duration::from_secs(20),
        certificates.wait_for(|c| c.contains_key(&web)),
    )
    .await
    .expect("web's certificate from the CA within 20 s")
    .unwrap()[&web]
        .clone();
    let bundle = published_bundle(&admin, "e2e-bundle", 1).await;
    let info = bundle
        .verify(&first.chain, "cluster.local", SystemTime::now())
        .unwrap();
    assert_eq!(info.spiffe_id.as_ref(), Some(&web));

    // Refused: no pod of `ghost` on node-a; counted by reason.
    demand_tx.send_replace(BTreeSet::from([web.clone(), ghost.clone()]));
    let refused = |text: &str, reason: &str| {
        let series = format!("portcullis_identity_issuance_failures_total{{reason=\"{reason}\"}}");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    wait_for("a no_pod_on_node refusal", Duration::from_secs(20), || {
        refused(&metrics.encode().unwrap(), "no_pod_on_node") >= 1.0
    })
    .await;
    assert!(!certificates.borrow().contains_key(&ghost));
    demand_tx.send_replace(BTreeSet::from([web.clone()]));

    // Outage: the CA goes away; the certificate is kept and failures move.
    drop(ca);
    let serial_at_outage = info.serial.clone();
    let unreachable_before = refused(&metrics.encode().unwrap(), "unreachable");
    wait_for(
        "a failed renewal while the CA is down",
        Duration::from_secs(25),
        || refused(&metrics.encode().unwrap(), "unreachable") > unreachable_before,
    )
    .await;
    let held = certificates.borrow().get(&web).cloned();
    if let Some(held) = held {
        let now = CertificateInfo::from_der(&held.chain[0], "held").unwrap();
        assert_eq!(
            now.serial, serial_at_outage,
            "nothing new while the CA is down"
        );
        assert!(
            SystemTime::now() < now.not_after,
            "only unexpired certificates are held"
        );
    }

    // Recovery: the CA is back on the same address; a new certificate comes.
    let mut back = ca_options();
    back.listen = addr;
    let _ca = start_ca(back, admin.clone()).await;
    tokio::time::timeout(
        Duration::from_secs(30),
        certificates.wait_for(|c| {
            c.get(&web).is_some_and(|held| {
                CertificateInfo::from_der(&held.chain[0], "held")
                    .is_ok_and(|i| i.serial != serial_at_outage)
            })
        }),
    )
    .await
    .expect("a new certificate within 30 s of the CA's return")
    .unwrap();
    handle.stop();
}
