//! A real Kubernetes control plane for the tests: an etcd and a
//! kube-apiserver built from Go modules by `cargo xtask kube build`
//! (xtask/kube), started on loopback with their own CA, a service-account
//! signing key and an admin token, and stopped when dropped.
//!
//! A test that changes cluster-wide state, stops the API server or compacts
//! etcd starts its own ([`ControlPlane::start`], about 3 s); tests that only
//! validate objects share one per test binary ([`shared`]).

use std::{
    io,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Mutex},
    time::{Duration, Instant},
};

use kube::config::{KubeConfigOptions, Kubeconfig};

/// Where `cargo xtask kube build` leaves etcd, kube-apiserver and kubectl
/// unless `PORTCULLIS_KUBE_BIN` says otherwise.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PORTCULLIS_KUBE_BIN") {
        return dir.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| "/root/.cache".into());
    cache.join("portcullis/kube/bin")
}

/// The path of one of the control plane's programs; fails the test (never
/// skips it) when they have not been built.
pub fn program(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not found: build the test control plane with `cargo xtask kube build` \
         (`cargo xtask test` does it first)",
        path.display()
    );
    path
}

/// The admin user's bearer token (group system:masters).
const ADMIN_TOKEN: &str = "portcullis-test-admin";
/// The issuer and audience of service-account tokens.
pub const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// ClusterIPs are allocated from here.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// A running etcd and kube-apiserver.
pub struct ControlPlane {
    dir: tempfile::TempDir,
    etcd: Child,
    apiserver: Option<Child>,
    etcd_url: String,
    port: u16,
    kubeconfig: PathBuf,
}

#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Children are started from one thread that lives as long as the process:
/// they get SIGKILL when it exits (PR_SET_PDEATHSIG follows the thread
/// that forked), so a test binary that ends or panics leaves no etcd or
/// API server behind, shared ones included.
fn spawn(mut command: Command) -> io::Result<Child> {
    type Job = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: Mutex<Option<mpsc::Sender<Job>>> = Mutex::new(None);
    let jobs = SPAWNER
        .lock()
        .unwrap()
        .get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
                // The sender lives in a static: never reached, the thread
                // stays until the process exits.
                loop {
                    std::thread::park();
                }
            });
            tx
        })
        .clone();
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs before exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    jobs.send((command, tx)).expect("the spawner thread lives");
    rx.recv().expect("the spawner replies")
}

fn log_file(dir: &Path, name: &str) -> io::Result<Stdio> {
    Ok(std::fs::File::create(dir.join(format!("{name}.log")))?.into())
}

impl ControlPlane {
    /// Starts etcd and the API server and waits until the server is ready
    /// and our CRDs are established.
    pub async fn start() -> Result<Self, StartError> {
        let dir = tempfile::Builder::new()
            .prefix("portcullis-kube-")
            .tempdir()
            .map_err(|e| StartError(format!("creating a directory: {e}")))?;
        write_credentials(dir.path())?;
        let etcd_url = format!("http://127.0.0.1:{}", free_port());
        let etcd = start_etcd(dir.path(), &etcd_url)?;
        let port = free_port();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(dir.path(), port, ADMIN_TOKEN))
            .map_err(|e| StartError(format!("writing {}: {e}", kubeconfig.display())))?;
        let mut plane = Self {
            dir,
            etcd,
            apiserver: None,
            etcd_url,
            port,
            kubeconfig,
        };
        plane.start_apiserver().await?;
        install_crds(&plane.client().await).await?;
        Ok(plane)
    }

    /// The API server's URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A kubeconfig for the admin user (what kubectl gets).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The CA that signed the API server's certificate (PEM file).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A client with the admin token.
    pub async fn client(&self) -> kube::Client {
        self.client_with(&self.kubeconfig).await
    }

    /// A client for another kubeconfig (see [`ControlPlane::kubeconfig_for`]).
    pub async fn client_with(&self, kubeconfig: &Path) -> kube::Client {
        let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("a readable kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("a valid kubeconfig");
        kube::Client::try_from(config).expect("a client")
    }

    /// Writes a kubeconfig that authenticates with `token` (a
    /// service account's, say) and returns its path.
    pub fn kubeconfig_for(&self, name: &str, token: &str) -> PathBuf {
        let path = self.dir.path().join(format!("kubeconfig-{name}"));
        std::fs::write(&path, kubeconfig_yaml(self.dir.path(), self.port, token))
            .expect("writing a kubeconfig");
        path
    }

    /// The PEM (PKCS#8) key the API server signs service-account tokens
    /// with: for tokens the API server would not mint, e.g. expired ones.
    pub fn service_account_key_pem(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sa.key")).expect("reading sa.key")
    }

    /// kubectl with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new(program("kubectl"));
        command.arg("--kubeconfig").arg(&self.kubeconfig);
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

    /// Stops the API server (etcd keeps running): an outage.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the API server (again) on the same port and waits until it
    /// is ready.
    pub async fn start_apiserver(&mut self) -> Result<(), StartError> {
        assert!(self.apiserver.is_none(), "the API server already runs");
        self.apiserver = Some(start_apiserver(self.dir.path(), &self.etcd_url, self.port)?);
        self.wait_ready().await
    }

    /// Compacts etcd to its current revision: every older resourceVersion
    /// is gone, so a watch resuming from one gets `410 Gone` (once the API
    /// server's watch cache no longer holds it either).
    pub fn compact(&self) {
        let out = Command::new(program("etcd"))
            .args(["compact", "--client-url", &self.etcd_url])
            .output()
            .expect("running etcd compact");
        assert!(
            out.status.success(),
            "etcd compact: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    async fn wait_ready(&mut self) -> Result<(), StartError> {
        let deadline = Instant::now() + Duration::from_secs(90);
        let client = self.client().await;
        loop {
            let request = http::Request::get("/readyz").body(Vec::new()).unwrap();
            let answer = client.request_text(request).await;
            if matches!(&answer, Ok(text) if text.trim() == "ok") {
                return Ok(());
            }
            if let Some(child) = &mut self.apiserver {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(StartError(format!(
                        "kube-apiserver exited ({status}) before it was ready:\n{}",
                        tail(&self.dir.path().join("kube-apiserver.log"))
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(StartError(format!(
                    "kube-apiserver not ready after 90 s ({answer:?}):\n{}",
                    tail(&self.dir.path().join("kube-apiserver.log"))
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_apiserver();
        // SIGTERM first: etcd closes its database cleanly.
        // SAFETY: the pid is our child's, not yet reaped.
        unsafe { libc::kill(self.etcd.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.etcd.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
    }
}

/// The last lines of a log, for an error message.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A CA, the API server's certificate for 127.0.0.1 and localhost, the
/// service-account signing key and the static admin token.
fn write_credentials(dir: &Path) -> Result<(), StartError> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let err = |e: rcgen::Error| StartError(format!("generating credentials: {e}"));
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca_params = CertificateParams::new(Vec::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "portcullis-test-ca");
    let ca = ca_params.self_signed(&ca_key).map_err(err)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().map_err(err)?;
    let params =
        CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).map_err(err)?;
    let cert = params.signed_by(&key, &issuer).map_err(err)?;
    let sa_key = KeyPair::generate().map_err(err)?;
    let files = [
        ("ca.crt", ca.pem()),
        ("apiserver.crt", cert.pem()),
        ("apiserver.key", key.serialize_pem()),
        ("sa.key", sa_key.serialize_pem()),
        ("sa.pub", sa_key.public_key_pem()),
        (
            "tokens.csv",
            format!("{ADMIN_TOKEN},admin,admin,system:masters\n"),
        ),
    ];
    for (name, content) in files {
        std::fs::write(dir.join(name), content)
            .map_err(|e| StartError(format!("writing {name}: {e}")))?;
    }
    Ok(())
}

fn kubeconfig_yaml(dir: &Path, port: u16, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: \
         https://127.0.0.1:{port}\n    certificate-authority: {ca}\nusers:\n- name: user\n  \
         user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    \
         user: user\ncurrent-context: test\n",
        ca = dir.join("ca.crt").display()
    )
}

fn start_etcd(dir: &Path, url: &str) -> Result<Child, StartError> {
    let mut command = Command::new(program("etcd"));
    command
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.join("etcd"))
        .args(["--client-url", url])
        .args(["--peer-url", &format!("http://127.0.0.1:{}", free_port())])
        .stdin(Stdio::null())
        .stdout(log_file(dir, "etcd").map_err(|e| StartError(format!("etcd log: {e}")))?)
        .stderr(log_file(dir, "etcd.err").map_err(|e| StartError(format!("etcd log: {e}")))?);
    spawn(command).map_err(|e| StartError(format!("starting etcd: {e}")))
}

fn start_apiserver(dir: &Path, etcd_url: &str, port: u16) -> Result<Child, StartError> {
    let file = |name: &str| dir.join(name).display().to_string();
    let mut command = Command::new(program("kube-apiserver"));
    command
        .arg(format!("--etcd-servers={etcd_url}"))
        .arg(format!("--secure-port={port}"))
        .arg("--bind-address=127.0.0.1")
        .arg("--advertise-address=127.0.0.1")
        .arg(format!("--tls-cert-file={}", file("apiserver.crt")))
        .arg(format!("--tls-private-key-file={}", file("apiserver.key")))
        .arg(format!("--cert-dir={}", file("certs")))
        .arg(format!("--token-auth-file={}", file("tokens.csv")))
        .arg("--authorization-mode=RBAC")
        .arg(format!("--service-account-issuer={SA_ISSUER}"))
        .arg(format!("--service-account-key-file={}", file("sa.pub")))
        .arg(format!(
            "--service-account-signing-key-file={}",
            file("sa.key")
        ))
        .arg(format!("--api-audiences={SA_ISSUER}"))
        .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
        // No kubelet, scheduler or controller manager: pods are bound by
        // the tests, service accounts created by them, and the API
        // server's own endpoints (127.0.0.1, which Endpoints refuse) left
        // alone.
        .arg("--disable-admission-plugins=ServiceAccount")
        .arg("--endpoint-reconciler-type=none")
        .arg("--allow-privileged=true")
        .stdin(Stdio::null())
        .stdout(log_file(dir, "kube-apiserver.out").map_err(|e| StartError(e.to_string()))?)
        .stderr(log_file(dir, "kube-apiserver").map_err(|e| StartError(e.to_string()))?);
    spawn(command).map_err(|e| StartError(format!("starting kube-apiserver: {e}")))
}

/// Installs the CRDs of deploy/crds and waits until they are served.
async fn install_crds(client: &kube::Client) -> Result<(), StartError> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, PostParams};
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    let mut names = Vec::new();
    for entry in
        std::fs::read_dir(&dir).map_err(|e| StartError(format!("{}: {e}", dir.display())))?
    {
        let path = entry.map_err(|e| StartError(e.to_string()))?.path();
        let text = std::fs::read_to_string(&path).map_err(|e| StartError(e.to_string()))?;
        let crd: CustomResourceDefinition = serde_saphyr::from_str(&text)
            .map_err(|e| StartError(format!("{}: {e}", path.display())))?;
        names.push(crd.metadata.name.clone().unwrap_or_default());
        crds.create(&PostParams::default(), &crd)
            .await
            .map_err(|e| StartError(format!("installing {}: {e}", path.display())))?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in names {
        loop {
            let crd = crds
                .get(&name)
                .await
                .map_err(|e| StartError(e.to_string()))?;
            let established = crd.status.and_then(|s| s.conditions).is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                break;
            }
            if Instant::now() > deadline {
                return Err(StartError(format!("CRD {name} not established after 30 s")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
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

impl ControlPlane {
    /// What `Drop` does, for a plane that is never dropped: kill both
    /// processes, reap them and remove the directory.
    fn remove_at_exit(&self) {
        let pids = [Some(self.etcd.id()), self.apiserver.as_ref().map(Child::id)];
        for pid in pids.into_iter().flatten() {
            // SAFETY: our own children, not yet reaped.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
                libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
            }
        }
        let _ = std::fs::remove_dir_all(self.dir.path());
    }
}

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
