//! A real Kubernetes control plane for the tests (the agent's
//! [`portcullis_agent::kube_plane`], which the churn bench uses too), with
//! what only tests need: failing instead of returning errors, kubectl, and
//! creating, updating and deleting objects from JSON.
//!
//! A test that changes cluster-wide state, stops the API server or compacts
//! etcd starts its own ([`ControlPlane::start`], about 3 s); tests that only
//! validate objects share one per test binary ([`shared`]).

use std::{
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use portcullis_agent::kube_plane;
pub use portcullis_agent::kube_plane::{bin_dir, PlaneError, SA_ISSUER, SERVICE_CIDR};

/// The path of one of the control plane's programs; fails the test (never
/// skips it) when they have not been built.
pub fn program(name: &str) -> PathBuf {
    kube_plane::program(name).unwrap_or_else(|e| panic!("{e}"))
}

/// A running etcd and kube-apiserver.
pub struct ControlPlane(kube_plane::ControlPlane);

impl Deref for ControlPlane {
    type Target = kube_plane::ControlPlane;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for ControlPlane {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl ControlPlane {
    /// Starts etcd and the API server and waits until the server is ready
    /// and our CRDs are established.
    pub async fn start() -> Result<Self, PlaneError> {
        kube_plane::ControlPlane::start("portcullis-kube-")
            .await
            .map(Self)
    }

    /// A client with the admin token.
    pub async fn client(&self) -> kube::Client {
        self.0.client().await.expect("an admin client")
    }

    /// A client for another kubeconfig (see [`ControlPlane::kubeconfig_for`]).
    pub async fn client_with(&self, kubeconfig: &Path) -> kube::Client {
        self.0
            .client_with(kubeconfig)
            .await
            .expect("a client for the kubeconfig")
    }

    /// Writes a kubeconfig that authenticates with `token` (a
    /// service account's, say) and returns its path.
    pub fn kubeconfig_for(&self, name: &str, token: &str) -> PathBuf {
        self.0
            .kubeconfig_for(name, token)
            .expect("writing a kubeconfig")
    }

    /// The PEM (PKCS#8) key the API server signs service-account tokens
    /// with: for tokens the API server would not mint, e.g. expired ones.
    pub fn service_account_key_pem(&self) -> String {
        std::fs::read_to_string(self.dir().join("sa.key")).expect("reading sa.key")
    }

    /// Compacts etcd to its current revision (see
    /// [`kube_plane::ControlPlane::compact`]).
    pub fn compact(&self) {
        self.0.compact().expect("compacting etcd");
    }

    /// kubectl with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new(program("kubectl"));
        command.arg("--kubeconfig").arg(self.kubeconfig());
        command
    }

    /// Runs kubectl (admin) with `stdin` as its standard input.
    pub fn kubectl_with_input(&self, args: &[&str], stdin: &str) -> std::process::Output {
        use std::io::Write as _;
        let mut child = self
            .kubectl()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running kubectl");
        child
            .stdin
            .take()
            .expect("kubectl's stdin")
            .write_all(stdin.as_bytes())
            .expect("writing to kubectl");
        child.wait_with_output().expect("waiting for kubectl")
    }

    /// Like [`ControlPlane::kubectl_with_input`], for commands that must
    /// succeed: returns stdout, or fails the test with kubectl's error.
    pub fn kubectl_ok(&self, args: &[&str], stdin: &str) -> String {
        let out = self.kubectl_with_input(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("kubectl prints UTF-8")
    }
}

/// The test binary's shared control plane, started on first use. It is
/// never dropped: at exit its processes are killed and its directory
/// removed (an `atexit` handler; libtest ends with `exit`).
pub async fn shared() -> &'static ControlPlane {
    static SHARED: tokio::sync::OnceCell<&'static ControlPlane> =
        tokio::sync::OnceCell::const_new();
    SHARED
        .get_or_init(|| async {
            let plane = ControlPlane::start().await.unwrap_or_else(|e| {
                panic!("starting the test control plane: {e}");
            });
            let plane: &'static ControlPlane = Box::leak(Box::new(plane));
            let _ = SHARED_AT_EXIT.set(plane);
            extern "C" fn remove_shared() {
                if let Some(plane) = SHARED_AT_EXIT.get() {
                    plane.remove_at_exit();
                }
            }
            // SAFETY: registers a plain function; it runs once, at exit.
            unsafe { libc::atexit(remove_shared) };
            plane
        })
        .await
}

static SHARED_AT_EXIT: std::sync::OnceLock<&'static ControlPlane> = std::sync::OnceLock::new();

/// The API resource of a JSON object, from its apiVersion and kind.
pub fn resource_of(object: &serde_json::Value) -> kube::api::ApiResource {
    let api_version = object["apiVersion"].as_str().expect("an apiVersion");
    let kind = object["kind"].as_str().expect("a kind");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
    kube::api::ApiResource::from_gvk(&gvk)
}

/// The API of an object's kind: namespaced when its metadata names a
/// namespace.
fn api_for(
    client: &kube::Client,
    object: &serde_json::Value,
) -> (
    kube::api::Api<kube::api::DynamicObject>,
    kube::api::ApiResource,
) {
    use kube::api::Api;
    let resource = resource_of(object);
    let api = match object["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    (api, resource)
}

/// Creates an object (namespaced when its metadata names a namespace) and,
/// when it carries a status, writes that through the status subresource:
/// with no kubelet or controllers, this is how a pod gets its IP and phase.
/// Returns the object as stored (with its uid and resourceVersion).
pub async fn create(client: &kube::Client, object: serde_json::Value) -> kube::api::DynamicObject {
    use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
    let (api, resource) = api_for(client, &object);
    let name = object["metadata"]["name"]
        .as_str()
        .expect("a name")
        .to_string();
    let typed: DynamicObject = serde_json::from_value(object.clone()).expect("an object");
    let created = api
        .create(&PostParams::default(), &typed)
        .await
        .unwrap_or_else(|e| panic!("creating {} {name}: {e}", resource.kind));
    match object.get("status") {
        Some(status) if !status.is_null() => api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "status": status })),
            )
            .await
            .unwrap_or_else(|e| panic!("setting the status of {} {name}: {e}", resource.kind)),
        _ => created,
    }
}

/// Replaces an object's spec, labels and data with `object`'s (a merge
/// patch), and its status too when given.
pub async fn update(client: &kube::Client, object: serde_json::Value) -> kube::api::DynamicObject {
    use kube::api::{Patch, PatchParams};
    let (api, resource) = api_for(client, &object);
    let name = object["metadata"]["name"]
        .as_str()
        .expect("a name")
        .to_string();
    let mut body = object.clone();
    let status = body.as_object_mut().and_then(|o| o.remove("status"));
    let patched = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(body))
        .await
        .unwrap_or_else(|e| panic!("updating {} {name}: {e}", resource.kind));
    match status {
        Some(status) if !status.is_null() => api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "status": status })),
            )
            .await
            .unwrap_or_else(|e| panic!("setting the status of {} {name}: {e}", resource.kind)),
        _ => patched,
    }
}

/// Deletes an object by its apiVersion, kind, namespace and name.
pub async fn delete(client: &kube::Client, object: serde_json::Value) {
    use kube::api::DeleteParams;
    let (api, resource) = api_for(client, &object);
    let name = object["metadata"]["name"].as_str().expect("a name");
    api.delete(name, &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("deleting {} {name}: {e}", resource.kind));
}
