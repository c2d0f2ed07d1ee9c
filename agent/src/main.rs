//! `portcullis`: the node agent and its command-line tools.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use portcullis_agent::{
    app::{self, AgentOptions},
    bpf, explain, flows,
    identity::{self, manager::IdentityOptions},
    lab::{self, pod::Protocol, report::ProbeSpec},
    source::kube::KubeOptions,
};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Kernel-speed L4 policy for pod sockets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/portcullis";
const DEFAULT_NAMES_FILE: &str = "/run/portcullis/names.json";
const DEFAULT_STATE_DIR: &str = "/var/lib/portcullis";

/// Workload identity: where certificates come from (off without either CA
/// flag).
#[derive(clap::Args)]
struct IdentityArgs {
    /// The SPIFFE trust domain: identities are
    /// spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
    #[arg(long, default_value = identity::spiffe::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Issue certificates in process from this CA directory (`portcullis ca
    /// init --dir D`), read at every issuance.
    #[arg(long, conflicts_with = "ca_url")]
    ca_dir: Option<PathBuf>,
    /// Lifetime of the certificates --ca-dir issues, 10m to 24h (e.g. 1h,
    /// 30m, 3600s).
    #[arg(long, default_value = "1h", value_parser = parse_lifetime, requires = "ca_dir")]
    leaf_lifetime: std::time::Duration,
    /// Ask `portcullis ca` at this https:// URL.
    #[arg(long, requires = "ca_token_file")]
    ca_url: Option<String>,
    /// The token the agent authenticates to the CA with (a projected
    /// ServiceAccount token, audience portcullis-ca), read at every request.
    #[arg(long, requires = "ca_url")]
    ca_token_file: Option<PathBuf>,
    /// The roots (PEM) the CA's certificate must chain to, with --ca-url
    /// without --kubernetes (in Kubernetes mode: the ConfigMap
    /// portcullis-trust-bundle in the agent's namespace). Re-read when it
    /// changes.
    #[arg(long, requires = "ca_url")]
    trust_bundle_file: Option<PathBuf>,
    /// Revoked identities and serials (YAML), re-read when it changes.
    /// Default with --ca-dir: <ca-dir>/revocations.yaml; in Kubernetes
    /// mode: the PortcullisRevocation objects.
    #[arg(long)]
    revocations_file: Option<PathBuf>,
    /// Where to publish the local identities for `portcullis identity`.
    #[arg(long, default_value = identity::local::DEFAULT_FILE)]
    identities_file: PathBuf,
    /// Where the mesh publishes its live connections for `portcullis
    /// connections`.
    #[arg(long, default_value = portcullis_agent::mesh::connections::DEFAULT_FILE)]
    connections_file: PathBuf,
}

impl IdentityArgs {
    fn options(self, kubernetes: bool, namespace: &str) -> anyhow::Result<Option<IdentityOptions>> {
        use identity::manager::{BundleSource, IssuerOptions, RevocationSource};
        let issuer = match (self.ca_dir, self.ca_url) {
            (None, None) => return Ok(None),
            (Some(dir), _) => IssuerOptions::CaDir {
                dir,
                lifetime: self.leaf_lifetime,
            },
            (None, Some(url)) => IssuerOptions::Remote {
                url,
                token_file: self.ca_token_file.unwrap_or_default(),
                bundle: match (self.trust_bundle_file, kubernetes) {
                    (Some(file), _) => BundleSource::File(file),
                    (None, true) => BundleSource::ConfigMap {
                        namespace: namespace.into(),
                        name: identity::kube_watch::BUNDLE_CONFIGMAP.into(),
                    },
                    (None, false) => anyhow::bail!(
                        "--ca-url without --kubernetes needs --trust-bundle-file: the roots \
                         the CA's certificate must chain to"
                    ),
                },
                timeout: identity::issuer::remote::DEFAULT_TIMEOUT,
            },
        };
        let revocations = match (self.revocations_file, &issuer, kubernetes) {
            (Some(file), _, _) => RevocationSource::File(file),
            (None, IssuerOptions::CaDir { dir, .. }, false) => {
                RevocationSource::File(dir.join("revocations.yaml"))
            }
            (None, _, true) => RevocationSource::Kubernetes {
                staleness: identity::kube_watch::DEFAULT_REVOCATION_STALENESS,
            },
            (None, IssuerOptions::Remote { .. }, false) => anyhow::bail!(
                "--ca-url without --kubernetes needs --revocations-file (a file that does \
                 not exist revokes nothing; without one, revocation status would be unknown \
                 and every identity refused)"
            ),
        };
        Ok(Some(IdentityOptions {
            trust_domain: self.trust_domain,
            issuer,
            revocations,
            identities_file: Some(self.identities_file),
            connections_file: Some(self.connections_file),
            max_backoff: identity::manager::schedule::DEFAULT_MAX_BACKOFF,
        }))
    }
}

/// `1h`, `30m`, `3600s` or `3600`, within the allowed leaf lifetimes.
fn parse_lifetime(text: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: use a whole number with s, m or h (e.g. 1h)"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(format!("{text:?}: the unit is s, m or h")),
    };
    identity::authority::check_lifetime(std::time::Duration::from_secs(seconds))
        .map_err(|e| e.to_string())
}
#[derive(Subcommand)]
enum Command {
    /// Run the agent standalone: policies from a directory, workloads from a file.
    Agent {
        /// Directory of policy files (*.yaml, *.yml), watched for changes.
        #[arg(long, required_unless_present = "kubernetes")]
        policies: Option<PathBuf>,
        /// Workloads file: namespaces, pods, their cgroups, IPs and ports.
        #[arg(long, required_unless_present = "kubernetes")]
        workloads: Option<PathBuf>,
        /// Take policies, pods and services from the Kubernetes API (in-cluster
        /// config, or KUBECONFIG) instead of files.
        #[arg(long, conflicts_with_all = ["policies", "workloads"])]
        kubernetes: bool,
        /// This node's name: its pods are enforced here.
        #[arg(long, env = "NODE_NAME", required_if_eq("kubernetes", "true"))]
        node_name: Option<String>,
        /// The host's cgroup v2 mount as this process sees it (in a
        /// container, where it is mounted in); default: detected.
        #[arg(long)]
        host_cgroup: Option<PathBuf>,
        /// The kubelet's --cgroup-root, relative to the cgroup v2 mount.
        #[arg(long, default_value = "/")]
        kubelet_cgroup_root: PathBuf,
        /// Deny a local pod's traffic until its endpoint is programmed, so
        /// a new pod never runs unenforced (see docs/kubernetes.md).
        #[arg(long, requires = "kubernetes")]
        deny_unprogrammed: bool,
        /// The agent's own pod UID, to exempt its cgroup (downward API).
        #[arg(long, env = "POD_UID")]
        pod_uid: Option<String>,
        /// Namespace of the Lease that elects the agent reporting invalid
        /// policies to the API (the agent's own namespace).
        #[arg(long, env = "POD_NAMESPACE", default_value = "portcullis-system")]
        lease_namespace: String,
        /// bpffs directory for pinned maps and links.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// cgroup v2 directory to attach to (default: the cgroup v2 root).
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// Where to publish what endpoint ids and rule cookies mean.
        #[arg(long, default_value = DEFAULT_NAMES_FILE)]
        names_file: PathBuf,
        /// Where to serve /metrics, /healthz and /readyz (host:port), or
        /// `none`.
        #[arg(long, default_value = portcullis_agent::admin::DEFAULT_ADDR)]
        admin_addr: portcullis_agent::admin::ListenAddr,
        /// Serve the admin endpoint over TLS, with /metrics only for a
        /// bearer token the API server authenticates (TokenReview) and
        /// authorizes for `get` on /metrics (SubjectAccessReview). /healthz
        /// and /readyz stay open for the kubelet's HTTPS probes.
        /// (Kubernetes mode only: a flag's `requires` is always met by the
        /// `--kubernetes` flag's default, so file mode is refused instead.)
        #[arg(long, conflicts_with_all = ["policies", "workloads"])]
        admin_secure: bool,
        /// PEM certificate chain for the secure admin endpoint (default: a
        /// self-signed certificate made in memory at start).
        #[arg(long, requires_all = ["admin_secure", "admin_tls_key"])]
        admin_tls_cert: Option<PathBuf>,
        /// PEM private key for --admin-tls-cert.
        #[arg(long, requires = "admin_tls_cert")]
        admin_tls_key: Option<PathBuf>,
        /// Where the last valid and applied version of every policy object
        /// (and the workloads file) is kept, so an invalid edit stays
        /// harmless across restarts. Must outlive the agent (a hostPath in
        /// the DaemonSet); one directory per agent.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Attach a tc program to every enforced pod's interfaces so frames
        /// written with packet (AF_PACKET) sockets are judged too. It enters
        /// each pod's network namespace, which in a container needs hostPID
        /// and CAP_SYS_ADMIN (see docs/kubernetes.md).
        #[arg(long, action = clap::ArgAction::Set, default_value_t = true)]
        guard_packet_sockets: bool,
        /// Entries of a kernel map, MAP=ENTRIES (repeatable): endpoints,
        /// identities, policy, services, backends (both generations: one
        /// policy state may use half) and counters. A map pinned by an
        /// earlier agent keeps its size.
        #[arg(long = "map-capacity", value_name = "MAP=ENTRIES")]
        map_capacity: Vec<portcullis_agent::bpf::capacity::CapacitySetting>,
        #[command(flatten)]
        identity: Box<IdentityArgs>,
    },
    /// List this node's workload identities: SPIFFE ID, serial, validity,
    /// issuer and state, as the agent publishes them.
    Identity {
        /// The file the agent publishes to (its --identities-file).
        #[arg(long, default_value = identity::local::DEFAULT_FILE, conflicts_with = "lab")]
        identities_file: PathBuf,
        /// The identities of a lab started with `portcullis lab --keep --name NAME`.
        #[arg(long)]
        lab: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The mesh's live connections: encrypted or not, to which SPIFFE ID,
    /// with which certificate and until when.
    Connections {
        /// The file the agent publishes to (its --connections-file).
        #[arg(
            long,
            default_value = portcullis_agent::mesh::connections::DEFAULT_FILE,
            conflicts_with = "lab"
        )]
        connections_file: PathBuf,
        /// The connections of a lab started with `portcullis lab --keep --name NAME`.
        #[arg(long)]
        lab: Option<String>,
        /// Only connections of this pod (`namespace/name`).
        #[arg(long)]
        pod: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Why would a flow pass or not? The deciding policy and rule, per
    /// direction, checked against what the kernel maps hold.
    Explain {
        /// Source workload, namespace/name.
        #[arg(long)]
        from: String,
        /// Destination workload, namespace/name; or a service (its
        /// namespace/name or a cluster IP): each backend is explained.
        #[arg(long)]
        to: String,
        /// Destination port/protocol, e.g. 80/tcp.
        #[arg(long)]
        port: ProbeSpec,
        #[arg(long, value_enum, default_value_t = lab::Family::Ipv4)]
        family: lab::Family,
        /// Explain against a lab started with `portcullis lab --keep --name NAME`.
        #[arg(long, conflicts_with_all = ["policies", "workloads"])]
        lab: Option<String>,
        #[arg(long, required_unless_present = "lab")]
        policies: Option<PathBuf>,
        #[arg(long, required_unless_present = "lab")]
        workloads: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, default_value = DEFAULT_NAMES_FILE)]
        names_file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Build a throwaway pod topology, enforce policies on it and print the
    /// measured reachability matrix.
    Lab(lab::cli::LabArgs),
    /// Measure the TCP connection rate with no agent, with Portcullis and
    /// with iptables, each holding the same rules; writes BENCHMARKS.md.
    Bench(portcullis_agent::bench::BenchArgs),
    /// Tail the kernel's flow events: drops, audit verdicts and new allowed
    /// flows, with the policy and rule that decided.
    Flows {
        /// Read the events of a lab started with `portcullis lab --keep --name NAME`.
        #[arg(long, conflicts_with = "workloads")]
        lab: Option<String>,
        /// The agent's workloads file (to name peers).
        #[arg(long, required_unless_present = "lab")]
        workloads: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, default_value = DEFAULT_NAMES_FILE)]
        names_file: PathBuf,
        /// Only flows with a side in this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Only flows with this workload (namespace/name) on a side.
        #[arg(long)]
        pod: Option<String>,
        /// Only this verdict.
        #[arg(long, value_parser = ["allow", "deny", "audit"])]
        verdict: Option<String>,
        #[arg(long)]
        json: bool,
        /// Stop after this many flows.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Print the kernel's decision counters.
    Counters {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Detach the programs and remove all pinned state: enforcement stops.
    Uninstall {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// The Portcullis CA: its directory (init, rotation steps, status) and
    /// the service that signs agents' identity certificates.
    Ca(portcullis_agent::ca::CaArgs),
    /// Internal: write the CRD manifests (`cargo xtask crdgen`).
    #[command(hide = true)]
    Crdgen {
        #[arg(long, default_value = "deploy/crds")]
        out: PathBuf,
    },
    /// Internal: the process inside a lab pod.
    #[command(hide = true)]
    LabPod {
        #[arg(long = "serve")]
        serve: Vec<ProbeSpec>,
    },
}

fn main() -> anyhow::Result<()> {
    // Before the runtime starts its threads (see the function).
    portcullis_agent::memory::limit_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The agent reports what it does; the other commands print their own
    // results and only log problems.
    let default_level = match cli.command {
        Command::Agent { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Agent {
            policies,
            workloads,
            kubernetes,
            node_name,
            host_cgroup,
            kubelet_cgroup_root,
            deny_unprogrammed,
            pod_uid,
            lease_namespace,
            pin_dir,
            cgroup_root,
            names_file,
            admin_addr,
            admin_secure,
            admin_tls_cert,
            admin_tls_key,
            state_dir,
            guard_packet_sockets,
            map_capacity,
            identity,
        } => {
            let identity = (*identity).options(kubernetes, &lease_namespace)?;
            use portcullis_agent::admin::{tls::CertSource, SecureOptions};
            let admin_secure = admin_secure.then(|| SecureOptions {
                cert: match (admin_tls_cert, admin_tls_key) {
                    (Some(cert), Some(key)) => CertSource::Files { cert, key },
                    _ => CertSource::SelfSigned {
                        names: portcullis_agent::admin::tls::default_names(),
                    },
                },
            });
            let source = if kubernetes {
                let client = ::kube::Client::try_default().await.context(
                    "connecting to the Kubernetes API (in-cluster config or KUBECONFIG)",
                )?;
                let mut k = KubeOptions::new(client, node_name.unwrap_or_default());
                k.kubelet_cgroup_root = kubelet_cgroup_root;
                k.deny_unprogrammed = deny_unprogrammed;
                k.own_pod_uid = pod_uid;
                if let Some(r) = k.reporter.as_mut() {
                    r.namespace = lease_namespace;
                }
                app::SourceOptions::Kubernetes(Box::new(k))
            } else {
                let policies_dir = policies.unwrap_or_default();
                if !policies_dir.is_dir() {
                    anyhow::bail!("--policies {}: not a directory", policies_dir.display());
                }
                app::SourceOptions::Files {
                    policies_dir,
                    workloads: workloads.unwrap_or_default(),
                }
            };
            let cgroup_mount = host_cgroup
                .map(|p| portcullis_agent::cgroup::cgroup2_at(&p))
                .transpose()
                .context("--host-cgroup")?;
            run_agent(AgentOptions {
                source,
                cgroup_mount,
                pin_dir,
                cgroup_root,
                names_file: Some(names_file),
                admin_addr: admin_addr.0,
                admin_secure,
                state_dir: Some(state_dir),
                guard_frames: guard_packet_sockets,
                map_capacities: portcullis_agent::bpf::capacity::MapCapacities::with(&map_capacity),
                identity,
            })
            .await
        }
        Command::Explain {
            from,
            to,
            port,
            family,
            lab,
            policies,
            workloads,
            pin_dir,
            names_file,
            json,
        } => {
            let paths = match lab {
                Some(name) => explain::lab_paths(&name),
                None => explain::AgentPaths {
                    policies_dir: policies.unwrap_or_default(),
                    workloads: workloads.unwrap_or_default(),
                    pin_dir,
                    names_file,
                },
            };
            let e = explain::explain_target(&paths, &from, &to, port, family)
                .map_err(|e| anyhow::anyhow!(explain::render_error(&e)))?;
            if json {
                println!("{}", serde_json::to_string(&e)?);
            } else {
                print!("{}", e.render());
            }
            if !e.kernel_agrees() {
                eprintln!(
                    "error: the kernel does not enforce what the policies say (see MISMATCH)"
                );
                std::process::exit(3);
            }
            Ok(())
        }
        Command::Lab(args) => lab::cli::run(args).await,
        Command::Bench(args) => portcullis_agent::bench::run(args).await,
        Command::Flows {
            lab,
            workloads,
            pin_dir,
            names_file,
            namespace,
            pod,
            verdict,
            json,
            count,
        } => {
            let source = match lab {
                Some(name) => {
                    let p = explain::lab_paths(&name);
                    flows::FlowSource {
                        pin_dir: p.pin_dir,
                        names_file: p.names_file,
                        workloads: p.workloads,
                    }
                }
                None => flows::FlowSource {
                    pin_dir,
                    names_file,
                    workloads: workloads.unwrap_or_default(),
                },
            };
            let filter = flows::FlowFilter {
                namespace,
                pod,
                verdict,
            };
            tokio::task::spawn_blocking(move || flows::tail(&source, &filter, json, count))
                .await?
                .map_err(|e| anyhow::anyhow!(portcullis_agent::source::file::error_chain(&e)))
        }
        Command::Connections {
            connections_file,
            lab,
            pod,
            json,
        } => {
            use portcullis_agent::mesh::connections;
            let path = match lab {
                Some(name) => connections::lab_file(&name),
                None => connections_file,
            };
            let mut all = connections::read(&path)
                .map_err(|e| anyhow::anyhow!(portcullis_agent::source::file::error_chain(&e)))?;
            all.retain(|c| pod.as_deref().is_none_or(|p| c.pod == p));
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print!(
                    "{}",
                    connections::render(&all, std::time::SystemTime::now())
                );
            }
            Ok(())
        }
        Command::Identity {
            identities_file,
            lab,
            json,
        } => {
            let path = match lab {
                Some(name) => identity::local::lab_file(&name),
                None => identities_file,
            };
            let all = identity::local::LocalIdentities::read(&path)
                .map_err(|e| anyhow::anyhow!(portcullis_agent::source::file::error_chain(&e)))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print!("{}", all.render(std::time::SystemTime::now()));
            }
            Ok(())
        }
        Command::Counters { pin_dir, json } => print_counters(&pin_dir, json),
        Command::Uninstall { pin_dir } => {
            bpf::loader::uninstall(&pin_dir)?;
            eprintln!(
                "removed {}; Portcullis no longer enforces",
                pin_dir.display()
            );
            Ok(())
        }
        Command::Ca(args) => portcullis_agent::ca::run(args).await,
        Command::Crdgen { out } => Ok(portcullis_agent::crd::crdgen(&out)?),
        Command::LabPod { serve } => {
            let serve: Vec<(u16, Protocol)> = serve.iter().map(|s| (s.port, s.protocol)).collect();
            Ok(lab::pod::run_helper(&serve).await?)
        }
    }
}

async fn run_agent(opts: AgentOptions) -> anyhow::Result<()> {
    let handle = app::start(opts).context("starting the agent")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    handle.stop();
    eprintln!("agent stopped; enforcement stays in the kernel (portcullis uninstall removes it)");
    Ok(())
}

fn print_counters(pin_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let (mut samples, lost) = bpf::read_counters(pin_dir)?;
    samples.sort_by_key(|s| {
        (
            s.key.endpoint_id,
            s.key.direction,
            s.key.reason,
            s.key.rule_cookie,
        )
    });
    use portcullis_agent::flows::{direction_name as direction, protocol_name as protocol};
    use portcullis_agent::flows::{reason_name as reason, verdict_name as verdict};
    if json {
        let rows: Vec<_> = samples
            .iter()
            .map(|s| {
                serde_json::json!({
                    "endpoint": s.key.endpoint_id, "direction": direction(s.key.direction),
                    "verdict": verdict(s.key.verdict), "reason": reason(s.key.reason),
                    "protocol": protocol(s.key.protocol), "rule_cookie": s.key.rule_cookie,
                    "count": s.count,
                })
            })
            .collect();
        println!("{}", serde_json::json!({"counters": rows, "lost": lost}));
    } else {
        println!(
            "{:>8} {:>8} {:>6} {:>13} {:>5} {:>8} {:>10}",
            "endpoint", "dir", "verdict", "reason", "proto", "cookie", "count"
        );
        for s in &samples {
            println!(
                "{:>8} {:>8} {:>6} {:>13} {:>5} {:>8} {:>10}",
                s.key.endpoint_id,
                direction(s.key.direction),
                verdict(s.key.verdict),
                reason(s.key.reason),
                protocol(s.key.protocol),
                s.key.rule_cookie,
                s.count
            );
        }
        if lost > 0 {
            println!("{lost} decisions were not counted: the counter map is full");
        }
    }
    Ok(())
}
