//! A real Kubernetes control plane for tests and benchmarks: an etcd and a
//! kube-apiserver built from Go modules by `cargo xtask kube build`
//! (xtask/kube), started on loopback with their own CA, a service-account
//! signing key and an admin token, with the CRDs of deploy/crds installed,
//! and stopped when dropped. No kubelet, scheduler or controllers: whoever
//! uses it binds pods and writes their status.

use std::{
    io,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Mutex},
    time::{Duration, Instant},
};

use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    #[error(
        "{} not found: build the test control plane with `cargo xtask kube build` \
         (`cargo xtask test` does it first)",
        path.display()
    )]
    MissingProgram { path: PathBuf },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("generating credentials")]
    Credentials {
        #[source]
        source: rcgen::Error,
    },
    #[error("{what}:\n{log}")]
    NotReady { what: String, log: String },
    #[error("{what}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading the kubeconfig {}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("{}: not a CRD", path.display())]
    Crd {
        path: PathBuf,
        // Boxed: the parser's error is large, every Result here carries it.
        #[source]
        source: Box<serde_saphyr::Error>,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> PlaneError {
    let what = what.into();
    move |source| PlaneError::Io { what, source }
}

fn api_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> PlaneError {
    let what = what.into();
    move |source| PlaneError::Api { what, source }
}

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

/// The path of one of the control plane's programs, if it has been built.
pub fn program(name: &str) -> Result<PathBuf, PlaneError> {
    let path = bin_dir().join(name);
    match path.exists() {
        true => Ok(path),
        false => Err(PlaneError::MissingProgram { path }),
    }
}

/// The admin user's bearer token (group system:masters).
const ADMIN_TOKEN: &str = "portcullis-test-admin";
/// The issuer and audience of service-account tokens.
pub const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// ClusterIPs are allocated from here.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// A running etcd and kube-apiserver.
pub struct ControlPlane {
    dir: PathBuf,
    etcd: Child,
    apiserver: Option<Child>,
    etcd_url: String,
    port: u16,
    kubeconfig: PathBuf,
}

/// A loopback port nobody listens on now and this process has not handed
/// out before. The kernel may give a port it just gave back to another
/// `bind(0)`, and the program that will listen on it binds only later: two
/// planes started at once once shared one etcd (and saw each other's
/// CRDs). Ports taken by other processes can still collide;
/// `start_etcd` and `ControlPlane::start` notice that and try fresh ones.
fn free_port() -> Result<u16, PlaneError> {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(io_error("finding a free loopback port"))?;
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
}

/// How often a program is started on fresh ports when another process
/// took its port first.
const PORT_ATTEMPTS: usize = 5;

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

fn log_file(dir: &Path, name: &str) -> Result<Stdio, PlaneError> {
    let path = dir.join(format!("{name}.log"));
    std::fs::File::create(&path)
        .map(Into::into)
        .map_err(io_error(format!("creating {}", path.display())))
}

impl ControlPlane {
    /// Starts etcd and the API server in a new directory below the
    /// system's temporary one whose name starts with `prefix`, and waits
    /// until the server is ready and our CRDs are established.
    pub async fn start(prefix: &str) -> Result<Self, PlaneError> {
        let dir = std::env::temp_dir().join(format!(
            "{prefix}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
        write_credentials(&dir)?;
        let (etcd, etcd_url) = start_etcd(&dir).await?;
        let kubeconfig = dir.join("kubeconfig");
        let mut plane = Self {
            dir,
            etcd,
            apiserver: None,
            etcd_url,
            port: 0,
            kubeconfig,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            plane.port = free_port()?;
            std::fs::write(
                &plane.kubeconfig,
                kubeconfig_yaml(&plane.dir, plane.port, ADMIN_TOKEN),
            )
            .map_err(io_error(format!("writing {}", plane.kubeconfig.display())))?;
            match plane.start_apiserver().await {
                Err(PlaneError::NotReady { log, .. })
                    if attempt < PORT_ATTEMPTS && port_taken(&log) =>
                {
                    plane.apiserver = None;
                }
                other => break other?,
            }
        }
        install_crds(&plane.client().await?).await?;
        Ok(plane)
    }

    /// The directory holding credentials, data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
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
        self.dir.join("ca.crt")
    }

    /// A client with the admin token.
    pub async fn client(&self) -> Result<kube::Client, PlaneError> {
        self.client_with(&self.kubeconfig).await
    }

    /// A client for another kubeconfig (see [`ControlPlane::kubeconfig_for`]).
    pub async fn client_with(&self, kubeconfig: &Path) -> Result<kube::Client, PlaneError> {
        let kubeconfig_error = |source| PlaneError::Kubeconfig {
            path: kubeconfig.to_path_buf(),
            source,
        };
        let parsed = Kubeconfig::read_from(kubeconfig).map_err(kubeconfig_error)?;
        let config = kube::Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default())
            .await
            .map_err(kubeconfig_error)?;
        kube::Client::try_from(config).map_err(api_error("building a client"))
    }

    /// Writes a kubeconfig that authenticates with `token` (a
    /// service account's, say) and returns its path.
    pub fn kubeconfig_for(&self, name: &str, token: &str) -> Result<PathBuf, PlaneError> {
        let path = self.dir.join(format!("kubeconfig-{name}"));
        std::fs::write(&path, kubeconfig_yaml(&self.dir, self.port, token))
            .map_err(io_error(format!("writing {}", path.display())))?;
        Ok(path)
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
    pub async fn start_apiserver(&mut self) -> Result<(), PlaneError> {
        assert!(self.apiserver.is_none(), "the API server already runs");
        self.apiserver = Some(start_apiserver(&self.dir, &self.etcd_url, self.port)?);
        self.wait_ready().await
    }

    /// Compacts etcd to its current revision: every older resourceVersion
    /// is gone, so a watch resuming from one gets `410 Gone` (once the API
    /// server's watch cache no longer holds it either).
    pub fn compact(&self) -> Result<(), PlaneError> {
        let out = Command::new(program("etcd")?)
            .args(["compact", "--client-url", &self.etcd_url])
            .output()
            .map_err(io_error("running etcd compact"))?;
        match out.status.success() {
            true => Ok(()),
            false => Err(PlaneError::NotReady {
                what: "etcd compact failed".into(),
                log: String::from_utf8_lossy(&out.stderr).into_owned(),
            }),
        }
    }

    async fn wait_ready(&mut self) -> Result<(), PlaneError> {
        let deadline = Instant::now() + Duration::from_secs(90);
        let client = self.client().await?;
        loop {
            let request = http::Request::get("/readyz").body(Vec::new()).unwrap();
            let answer = client.request_text(request).await;
            if matches!(&answer, Ok(text) if text.trim() == "ok") {
                return Ok(());
            }
            let log = || tail(&self.dir.join("kube-apiserver.log"));
            if let Some(child) = &mut self.apiserver {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(PlaneError::NotReady {
                        what: format!("kube-apiserver exited ({status}) before it was ready"),
                        log: log(),
                    });
                }
            }
            if Instant::now() > deadline {
                return Err(PlaneError::NotReady {
                    what: format!("kube-apiserver not ready after 90 s ({answer:?})"),
                    log: log(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What `Drop` does, for a plane that is never dropped (shared by a
    /// whole test binary, removed by an `atexit` handler): kill both
    /// processes, reap them and remove the directory.
    pub fn remove_at_exit(&self) {
        let pids = [Some(self.etcd.id()), self.apiserver.as_ref().map(Child::id)];
        for pid in pids.into_iter().flatten() {
            // SAFETY: our own children, not yet reaped.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
                libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Tells apart the directories of planes started by one process.
static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_apiserver();
        // SIGTERM first: etcd closes its database cleanly.
        // SAFETY: the pid is our child's, not yet reaped.
        unsafe { libc::kill(self.etcd.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.etcd.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
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
fn write_credentials(dir: &Path) -> Result<(), PlaneError> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let err = |source| PlaneError::Credentials { source };
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
        std::fs::write(dir.join(name), content).map_err(io_error(format!("writing {name}")))?;
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

/// Starts etcd on fresh loopback ports and waits until it serves. Its own
/// "serving" line, not a successful connect, says it is ready: a connect
/// could reach another process's etcd on a port ours failed to bind.
async fn start_etcd(dir: &Path) -> Result<(Child, String), PlaneError> {
    let data = dir.join("etcd");
    let log = dir.join("etcd.err.log");
    let mut attempt = 0;
    'attempts: loop {
        attempt += 1;
        let _ = std::fs::remove_dir_all(&data);
        let url = format!("http://127.0.0.1:{}", free_port()?);
        let mut command = Command::new(program("etcd")?);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .args(["--client-url", &url])
            .args(["--peer-url", &format!("http://127.0.0.1:{}", free_port()?)])
            .stdin(Stdio::null())
            .stdout(log_file(dir, "etcd")?)
            .stderr(log_file(dir, "etcd.err")?);
        let mut child = spawn(command).map_err(io_error("starting etcd"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // Whether it exited first, then its log: an exit's last words
            // are in the log by then.
            let exited = child.try_wait().ok().flatten();
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("etcd: serving clients on") {
                return Ok((child, url));
            }
            if let Some(status) = exited {
                if attempt < PORT_ATTEMPTS && port_taken(&text) {
                    continue 'attempts;
                }
                return Err(PlaneError::NotReady {
                    what: format!("etcd exited ({status}) before it served"),
                    log: tail(&log),
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(PlaneError::NotReady {
                    what: "etcd not serving after 60 s".into(),
                    log: tail(&log),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Whether a program's log says it could not listen because its port was
/// taken.
fn port_taken(log: &str) -> bool {
    log.contains("address already in use")
}

fn start_apiserver(dir: &Path, etcd_url: &str, port: u16) -> Result<Child, PlaneError> {
    let file = |name: &str| dir.join(name).display().to_string();
    let mut command = Command::new(program("kube-apiserver")?);
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
        .stdout(log_file(dir, "kube-apiserver.out")?)
        .stderr(log_file(dir, "kube-apiserver")?);
    spawn(command).map_err(io_error("starting kube-apiserver"))
}

/// Installs the CRDs of deploy/crds and waits until they are served.
async fn install_crds(client: &kube::Client) -> Result<(), PlaneError> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, PostParams};
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    let mut names = Vec::new();
    let listing = std::fs::read_dir(&dir).map_err(io_error(format!("{}", dir.display())))?;
    for entry in listing {
        let path = entry
            .map_err(io_error(format!("{}", dir.display())))?
            .path();
        let text =
            std::fs::read_to_string(&path).map_err(io_error(format!("{}", path.display())))?;
        let crd: CustomResourceDefinition =
            serde_saphyr::from_str(&text).map_err(|source| PlaneError::Crd {
                path: path.clone(),
                source: Box::new(source),
            })?;
        names.push(crd.metadata.name.clone().unwrap_or_default());
        crds.create(&PostParams::default(), &crd)
            .await
            .map_err(api_error(format!("installing {}", path.display())))?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in names {
        loop {
            let crd = crds
                .get(&name)
                .await
                .map_err(api_error(format!("reading CRD {name}")))?;
            let established = crd.status.and_then(|s| s.conditions).is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                break;
            }
            if Instant::now() > deadline {
                return Err(PlaneError::NotReady {
                    what: format!("CRD {name} not established after 30 s"),
                    log: String::new(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `bind(0)` gives back recently freed ports often (hundreds of
    /// repeats in a few thousand calls here): two planes starting at once
    /// must still get ports of their own.
    #[test]
    fn no_port_is_handed_out_twice() {
        let mut ports: Vec<u16> = (0..2000).map(|_| free_port().unwrap()).collect();
        ports.sort_unstable();
        let before = ports.len();
        ports.dedup();
        assert_eq!(ports.len(), before, "a port was handed out twice");
    }
}
