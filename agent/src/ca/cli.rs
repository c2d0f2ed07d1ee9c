//! `portcullis ca …`: the CA directory's commands (the rotation steps) and
//! `serve`.
//!
//! Root rotation, with no failed verification at any point:
//! 1. `ca add-root --dir D --name new`: the new root joins the bundle;
//!    nothing is signed by it yet. Wait until every agent has the new
//!    bundle (the ConfigMap is updated within seconds; agents watch it).
//! 2. `ca activate --dir D --name new`: new leaves (and the CA's serving
//!    certificate) chain to the new root. Wait one maximum leaf lifetime
//!    (`--leaf-lifetime`, default 1 h), so every leaf of the old root has
//!    expired or been renewed.
//! 3. `ca retire-root --dir D --name old`: the old root leaves the bundle.
//!
//! With the CA in Kubernetes, run each step on a copy of the Secret's files
//! and replace the Secret (docs/identity.md shows how); `ca serve` picks it
//! up within seconds.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use clap::{Args, Subcommand};

use super::{
    authorize::ServiceAccountRef,
    keys::KeySource,
    server::{default_serving_names, CaServer, ObjectName, ServeOptions},
};
use crate::identity::{
    authority::{check_lifetime, CaDir, CaStatus},
    spiffe::DEFAULT_TRUST_DOMAIN,
    wire::DEFAULT_AUDIENCE,
};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{value:?}: expected namespace/name")]
    ObjectName { value: String },
    #[error("{value:?}: expected a duration such as 90s, 10m, 1h or 1h30m")]
    Duration { value: String },
}

#[derive(Args, Debug)]
pub struct CaArgs {
    #[command(subcommand)]
    pub command: CaCommand,
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create a CA directory: a root, its issuing intermediate, active.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The root's name (default: today's date, YYYYMMDD).
        #[arg(long)]
        name: Option<String>,
    },
    /// Rotation step 1: add a root (and its issuer) to the bundle, not yet
    /// signing. Then wait until every agent has the new bundle.
    AddRoot {
        #[arg(long)]
        dir: PathBuf,
        /// The new root's name (default: today's date, YYYYMMDD).
        #[arg(long)]
        name: Option<String>,
    },
    /// Rotation step 2: sign new leaves with this root's issuer. Then wait
    /// one maximum leaf lifetime before retiring the old root.
    Activate {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Rotation step 3: remove a root that no longer signs from the bundle.
    RetireRoot {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Show the roots (the bundle), their keys and the active issuer.
    Status {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Serve certificates to agents over HTTPS (see docs/identity.md).
    Serve(Box<ServeArgs>),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to serve HTTPS on.
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Read the CA files from this Secret (namespace/name) through the API,
    /// following its updates.
    #[arg(long, value_parser = parse_object_name, required_unless_present = "dir")]
    pub secret: Option<ObjectName>,
    /// Read the CA files from this directory instead (no Secret).
    #[arg(long, conflicts_with = "secret")]
    pub dir: Option<PathBuf>,
    /// Private copies of the Secret's files go here (an in-memory volume).
    #[arg(long, default_value = "/run/portcullis-ca")]
    pub work_dir: PathBuf,
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Lifetime of the certificates issued, 10m to 24h.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    pub leaf_lifetime: Duration,
    /// The agents' service account: only its tokens are served.
    #[arg(long, value_parser = parse_object_name, default_value = "portcullis-system/portcullis-agent")]
    pub agent_service_account: ObjectName,
    /// The audience agents' tokens must be minted for.
    #[arg(long, default_value = DEFAULT_AUDIENCE)]
    pub audience: String,
    /// DNS names (or IPs) of the serving certificate, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = default_serving_names())]
    pub serving_names: Vec<String>,
    /// Where to publish the trust bundle (namespace/name), or `none`.
    #[arg(long, default_value = "portcullis-system/portcullis-trust-bundle")]
    pub bundle_configmap: String,
    /// How long revocations stay trusted while their watch fails; then
    /// every request is refused (revocation_unknown).
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub revocation_staleness: Duration,
}

/// Runs one `portcullis ca` command.
pub async fn run(args: CaArgs) -> anyhow::Result<()> {
    match args.command {
        CaCommand::Init { dir, name } => {
            let name = name.unwrap_or_else(today);
            CaDir::init(&dir, &name)?;
            println!(
                "created CA {} with root {name} (active)\n\
                 keep root-{name}.key offline: it is needed only to add issuers, \
                 not to sign leaves",
                dir.display()
            );
            Ok(())
        }
        CaCommand::AddRoot { dir, name } => {
            let name = name.unwrap_or_else(today);
            CaDir::at(&dir).add_root(&name)?;
            println!(
                "added root {name} to {} (in the bundle, not signing)\n\
                 next: once every agent has the new bundle, \
                 `portcullis ca activate --dir {} --name {name}`",
                dir.display(),
                dir.display()
            );
            Ok(())
        }
        CaCommand::Activate { dir, name } => {
            CaDir::at(&dir).activate(&name)?;
            println!(
                "issuer {name} now signs new certificates\n\
                 next: after one maximum leaf lifetime, retire the old root with \
                 `portcullis ca retire-root --dir {} --name <old>`",
                dir.display()
            );
            Ok(())
        }
        CaCommand::RetireRoot { dir, name } => {
            CaDir::at(&dir).retire_root(&name)?;
            println!("root {name} removed from {} and its bundle", dir.display());
            Ok(())
        }
        CaCommand::Status { dir, json } => {
            let status = CaDir::at(&dir).status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", render_status(&status, SystemTime::now()));
            }
            Ok(())
        }
        CaCommand::Serve(args) => serve(*args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    check_lifetime(args.leaf_lifetime).context("--leaf-lifetime")?;
    let keys = match (args.dir, args.secret) {
        (Some(dir), _) => KeySource::Dir(dir),
        (None, Some(secret)) => KeySource::Secret {
            namespace: secret.namespace,
            name: secret.name,
            work_dir: args.work_dir,
        },
        (None, None) => anyhow::bail!("give --secret namespace/name or --dir D"),
    };
    let bundle_configmap = if args.bundle_configmap.eq_ignore_ascii_case("none") {
        None
    } else {
        Some(parse_object_name(&args.bundle_configmap).context("--bundle-configmap")?)
    };
    let mut options = ServeOptions::new(keys);
    options.listen = args.listen;
    options.trust_domain = args.trust_domain;
    options.leaf_lifetime = args.leaf_lifetime;
    options.agent_service_account = ServiceAccountRef {
        namespace: args.agent_service_account.namespace,
        name: args.agent_service_account.name,
    };
    options.audience = args.audience;
    options.serving_names = args.serving_names;
    options.bundle_configmap = bundle_configmap;
    options.revocation_staleness = args.revocation_staleness;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let server = CaServer::start(options, client).await?;
    tracing::info!(addr = %server.addr(), "CA serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(server);
    Ok(())
}

/// `namespace/name`.
pub fn parse_object_name(value: &str) -> Result<ObjectName, CliError> {
    match value.split_once('/') {
        Some((namespace, name))
            if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
        {
            Ok(ObjectName {
                namespace: namespace.into(),
                name: name.into(),
            })
        }
        _ => Err(CliError::ObjectName {
            value: value.into(),
        }),
    }
}

/// `90s`, `10m`, `1h`, `1h30m`: whole numbers with units s, m, h.
pub fn parse_duration(value: &str) -> Result<Duration, CliError> {
    let err = || CliError::Duration {
        value: value.into(),
    };
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in value.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return Err(err()),
        };
        let n: u64 = digits.parse().map_err(|_| err())?;
        total = n
            .checked_mul(unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(err)?;
        digits.clear();
    }
    if !digits.is_empty() || total == 0 {
        return Err(err());
    }
    Ok(Duration::from_secs(total))
}

fn today() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}",
        now.year(),
        u8::from(now.month()),
        now.day()
    )
}

/// `2035-01-31 12:00:00 UTC`.
fn utc(t: SystemTime) -> String {
    crate::clock::utc(crate::identity::local::unix(t))
}

/// The table `ca status` prints, and where a rotation stands.
pub fn render_status(status: &CaStatus, now: SystemTime) -> String {
    let mut out = format!("CA directory {}\n", status.dir.display());
    let active = status.active_issuer.as_deref();
    out.push_str(&format!(
        "active issuer: {}\n\n",
        active.unwrap_or("none (not initialized)")
    ));
    out.push_str(&format!(
        "{:<24} {:<24} {:<9} {:<8} {}\n",
        "ROOT", "NOT AFTER", "ROOT KEY", "ISSUER", "SERIAL"
    ));
    for root in &status.roots {
        let issuer = if active == Some(root.name.as_str()) {
            "active"
        } else if root.has_issuer {
            "ready"
        } else {
            "none"
        };
        let expired = if root.certificate.expired_at(now) {
            " (expired)"
        } else {
            ""
        };
        out.push_str(&format!(
            "{:<24} {:<24} {:<9} {:<8} {}{expired}\n",
            root.name,
            utc(root.certificate.not_after),
            if root.has_key { "present" } else { "offline" },
            issuer,
            root.certificate.serial,
        ));
    }
    let Some(active_root) = status
        .roots
        .iter()
        .find(|r| Some(r.name.as_str()) == active)
    else {
        return out;
    };
    for other in status.roots.iter().filter(|r| r.name != active_root.name) {
        let dir = status.dir.display();
        let (other_start, active_start) = (
            other.certificate.not_before,
            active_root.certificate.not_before,
        );
        let hint = if other_start > active_start {
            format!(
                "root {} is in the bundle but not signing (rotation step 1 done): once every \
                 agent has the new bundle, `portcullis ca activate --dir {dir} --name {}`",
                other.name, other.name
            )
        } else if other_start < active_start {
            format!(
                "root {} no longer signs (rotation step 2 done): one maximum leaf lifetime \
                 after the activation, `portcullis ca retire-root --dir {dir} --name {}`",
                other.name, other.name
            )
        } else {
            // Made in the same second: which came first is unknown.
            format!(
                "root {} is in the bundle but not signing: if it is new, activate it once \
                 every agent has the bundle; if it signed before, retire it one maximum leaf \
                 lifetime after the activation",
                other.name
            )
        };
        out.push_str(&format!("\n{hint}\n"));
    }
    if active_root.has_key {
        out.push_str(&format!(
            "\nroot-{}.key is here: keep root keys offline, out of the CA's Secret\n",
            active_root.name
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{
        authority::DEFAULT_LEAF_LIFETIME, kube_watch::DEFAULT_REVOCATION_STALENESS,
    };

    #[test]
    fn durations_and_names_parse() {
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("20s").unwrap(), Duration::from_secs(20));
        for bad in ["", "10", "1d", "h", "0s", "-1h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        let o = parse_object_name("portcullis-system/portcullis-ca").unwrap();
        assert_eq!(
            (o.namespace.as_str(), o.name.as_str()),
            ("portcullis-system", "portcullis-ca")
        );
        for bad in ["x", "/x", "x/", "a/b/c"] {
            assert!(parse_object_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(DEFAULT_LEAF_LIFETIME, parse_duration("1h").unwrap());
        assert_eq!(DEFAULT_REVOCATION_STALENESS, parse_duration("5m").unwrap());
    }

    #[test]
    fn status_shows_each_root_and_where_a_rotation_stands() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaDir::init(dir.path(), "one").unwrap();
        let text = render_status(&ca.status().unwrap(), SystemTime::now());
        assert!(text.contains("active issuer: one"), "{text}");
        assert!(text.contains("present"), "{text}");
        std::thread::sleep(Duration::from_millis(1100));
        ca.add_root("two").unwrap();
        let text = render_status(&ca.status().unwrap(), SystemTime::now());
        assert!(
            text.contains("root two is in the bundle but not signing"),
            "{text}"
        );
        ca.activate("two").unwrap();
        let text = render_status(&ca.status().unwrap(), SystemTime::now());
        assert!(text.contains("root one no longer signs"), "{text}");
        assert!(text.contains("retire-root"), "{text}");
    }
}
