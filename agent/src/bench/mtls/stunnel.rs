//! The sidecar-style comparison: a pair of stunnel processes, one in each
//! pod, speaking TLS 1.3 only with certificates on both sides (a throwaway
//! CA made at bench start, ECDSA P-256 like Portcullis's identities). The
//! client pod's stunnel accepts plaintext on loopback; the server pod's
//! verifies the client's certificate and forwards to the application. The
//! server side logs each connection (notice level), which is how the bench
//! proves that the measured traffic arrived as TLS.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    PKCS_ECDSA_P256_SHA256,
};

use super::{
    inpod::InPod,
    servers::{self, Running, ServerError},
};

/// In the client pod, on loopback: plaintext in.
pub const HTTP_LOCAL: u16 = 18080;
pub const IPERF_LOCAL: u16 = 15201;
/// In the server pod, on its address: TLS in.
const HTTP_TLS: u16 = 18443;
const IPERF_TLS: u16 = 15443;
const SERVER_NAME: &str = "bench-server";
const CLIENT_NAME: &str = "bench-client";

#[derive(Debug, thiserror::Error)]
pub enum StunnelError {
    #[error("making the stunnel certificates")]
    Certificates {
        #[source]
        source: rcgen::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Start(#[from] ServerError),
}

/// What the server side's log says it saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsSeen {
    /// Connections accepted on the TLS ports.
    pub accepted: u64,
    /// Full handshakes that verified the client's certificate (resumed
    /// sessions were verified when first made).
    pub verified_clients: u64,
    /// Bytes decrypted and sent to the application, of ended connections.
    pub to_app: u64,
}

impl TlsSeen {
    pub fn since(&self, earlier: &TlsSeen) -> TlsSeen {
        TlsSeen {
            accepted: self.accepted - earlier.accepted.min(self.accepted),
            verified_clients: self.verified_clients
                - earlier.verified_clients.min(self.verified_clients),
            to_app: self.to_app - earlier.to_app.min(self.to_app),
        }
    }
}

pub struct StunnelPair {
    client: Running,
    server: Running,
    server_log: PathBuf,
}

impl StunnelPair {
    /// Makes the certificates and configurations under `dir` and starts
    /// both sides; returns once each listens.
    pub async fn start(
        client: &InPod,
        server: &InPod,
        server_ip: Ipv4Addr,
        dir: &Path,
    ) -> Result<Self, StunnelError> {
        let files = Files::write(dir)?;
        let server_log = dir.join("stunnel-server.log");
        let server_conf = dir.join("stunnel-server.conf");
        write(
            &server_conf,
            &server_conf_text(&files, server_ip, &server_log),
        )?;
        let client_conf = dir.join("stunnel-client.conf");
        let client_log = dir.join("stunnel-client.log");
        write(
            &client_conf,
            &client_conf_text(&files, server_ip, &client_log),
        )?;
        let server = Running::start(
            server,
            "stunnel",
            &[&server_conf.display().to_string()],
            &[HTTP_TLS, IPERF_TLS],
            Some(&server_log),
        )
        .await?;
        let client = Running::start(
            client,
            "stunnel",
            &[&client_conf.display().to_string()],
            &[HTTP_LOCAL, IPERF_LOCAL],
            Some(&client_log),
        )
        .await?;
        Ok(Self {
            client,
            server,
            server_log,
        })
    }

    pub fn pids(&self) -> [u32; 2] {
        [self.client.pid(), self.server.pid()]
    }

    /// What the server side has logged so far.
    pub fn seen(&self) -> TlsSeen {
        parse_server_log(&std::fs::read_to_string(&self.server_log).unwrap_or_default())
    }
}

fn write(path: &Path, text: &str) -> Result<(), StunnelError> {
    std::fs::write(path, text).map_err(|source| StunnelError::Write {
        path: path.into(),
        source,
    })
}

/// The PEM files both sides read.
struct Files {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Files {
    fn write(dir: &Path) -> Result<Self, StunnelError> {
        let rc = |source| StunnelError::Certificates { source };
        let key = || KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rc);
        let ca_key = key()?;
        let mut ca = CertificateParams::new(Vec::new()).map_err(rc)?;
        ca.distinguished_name.push(DnType::CommonName, "bench-ca");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let ca_cert = ca.clone().self_signed(&ca_key).map_err(rc)?;
        let issuer = Issuer::new(ca, &ca_key);
        let leaf = |name: &str, usage| -> Result<(String, String), StunnelError> {
            let key = key()?;
            let mut p = CertificateParams::new(vec![name.to_string()]).map_err(rc)?;
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![usage];
            let cert = p.signed_by(&key, &issuer).map_err(rc)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf(SERVER_NAME, ExtendedKeyUsagePurpose::ServerAuth)?;
        let (client_cert, client_key) = leaf(CLIENT_NAME, ExtendedKeyUsagePurpose::ClientAuth)?;
        let files = Files {
            ca: dir.join("stunnel-ca.pem"),
            server_cert: dir.join("stunnel-server.pem"),
            server_key: dir.join("stunnel-server.key"),
            client_cert: dir.join("stunnel-client.pem"),
            client_key: dir.join("stunnel-client.key"),
        };
        write(&files.ca, &ca_cert.pem())?;
        write(&files.server_cert, &server_cert)?;
        write(&files.server_key, &server_key)?;
        write(&files.client_cert, &client_cert)?;
        write(&files.client_key, &client_key)?;
        Ok(files)
    }
}

/// Settings both sides share: TLS 1.3 only, the chain verified against
/// the bench CA, no Nagle delay on either socket (as tuned sidecars run).
fn common(cert: &Path, key: &Path, ca: &Path) -> String {
    format!(
        "cert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\nsslVersionMin = TLSv1.3\n\
         socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n",
        cert.display(),
        key.display(),
        ca.display()
    )
}

fn server_conf_text(f: &Files, ip: Ipv4Addr, log: &Path) -> String {
    let common = common(&f.server_cert, &f.server_key, &f.ca);
    let service = |name: &str, tls: u16, app: u16| {
        format!(
            "[{name}]\naccept = {ip}:{tls}\nconnect = 127.0.0.1:{app}\nrequireCert = yes\n{common}"
        )
    };
    format!(
        "foreground = quiet\npid =\ndebug = notice\noutput = {}\n{}{}",
        log.display(),
        service("http", HTTP_TLS, servers::HTTP_PORT),
        service("iperf", IPERF_TLS, servers::IPERF_PORT)
    )
}

fn client_conf_text(f: &Files, ip: Ipv4Addr, log: &Path) -> String {
    let common = common(&f.client_cert, &f.client_key, &f.ca);
    let service = |name: &str, local: u16, tls: u16| {
        format!(
            "[{name}]\nclient = yes\naccept = 127.0.0.1:{local}\nconnect = {ip}:{tls}\n\
             checkHost = {SERVER_NAME}\n{common}"
        )
    };
    format!(
        "foreground = quiet\npid =\ndebug = warning\noutput = {}\n{}{}",
        log.display(),
        service("http", HTTP_LOCAL, HTTP_TLS),
        service("iperf", IPERF_LOCAL, IPERF_TLS)
    )
}

fn parse_server_log(text: &str) -> TlsSeen {
    let mut seen = TlsSeen::default();
    let verified = format!("Certificate accepted at depth=0: CN={CLIENT_NAME}");
    for line in text.lines() {
        if line.contains("accepted connection from") {
            seen.accepted += 1;
        } else if line.contains(&verified) {
            seen.verified_clients += 1;
        } else if let Some(rest) = line.split("byte(s) sent to TLS, ").nth(1) {
            // "Connection closed: 867 byte(s) sent to TLS, 79 byte(s) sent to socket"
            seen.to_app += rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_log_tells_connections_verifications_and_bytes() {
        let log = "2026.12.02 16:50:32 LOG5[0]: Service [http] accepted connection from 198.18.1.10:58566\n\
            2026.12.02 16:50:32 LOG5[0]: Certificate accepted at depth=0: CN=bench-client\n\
            2026.12.02 16:50:32 LOG5[0]: Connection closed: 867 byte(s) sent to TLS, 79 byte(s) sent to socket\n\
            2026.12.02 16:50:32 LOG5[1]: Service [http] accepted connection from 198.18.1.10:58582\n\
            2026.12.02 16:50:32 LOG5[1]: Connection closed: 867 byte(s) sent to TLS, 21 byte(s) sent to socket\n";
        let seen = parse_server_log(log);
        assert_eq!(
            seen,
            TlsSeen {
                accepted: 2,
                verified_clients: 1,
                to_app: 100
            }
        );
        assert_eq!(seen.since(&seen), TlsSeen::default());
    }

    #[test]
    fn only_tls_1_3_with_a_verified_client() {
        let f = Files {
            ca: "/d/ca.pem".into(),
            server_cert: "/d/s.pem".into(),
            server_key: "/d/s.key".into(),
            client_cert: "/d/c.pem".into(),
            client_key: "/d/c.key".into(),
        };
        let ip = Ipv4Addr::new(198, 18, 1, 11);
        let s = server_conf_text(&f, ip, Path::new("/d/s.log"));
        assert_eq!(s.matches("requireCert = yes").count(), 2, "{s}");
        assert_eq!(s.matches("sslVersionMin = TLSv1.3").count(), 2, "{s}");
        assert!(
            s.contains("accept = 198.18.1.11:18443\nconnect = 127.0.0.1:8080"),
            "{s}"
        );
        let c = client_conf_text(&f, ip, Path::new("/d/c.log"));
        assert!(
            c.contains("accept = 127.0.0.1:15201\nconnect = 198.18.1.11:15443"),
            "{c}"
        );
        assert_eq!(c.matches("checkHost = bench-server").count(), 2, "{c}");
    }
}
