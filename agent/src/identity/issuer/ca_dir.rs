//! The in-process CA of a standalone agent (`--ca-dir`): the directory is
//! read at every issuance, so a rotation in it (or the directory going and
//! coming back) needs no restart.

use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::{Granted, IssueError, Issuer};
use crate::identity::{
    authority::CaDir,
    revocation::{RevocationStatus, RevocationView},
    spiffe::SpiffeId,
    wire::RefusalReason,
};

pub struct CaDirIssuer {
    ca: CaDir,
    revocations: watch::Receiver<RevocationView>,
    lifetime: Duration,
}

impl CaDirIssuer {
    /// `lifetime` is taken as given: the CLI checks it against
    /// [`crate::identity::authority::check_lifetime`]; tests use seconds.
    pub fn new(
        ca: CaDir,
        revocations: watch::Receiver<RevocationView>,
        lifetime: Duration,
    ) -> Self {
        Self {
            ca,
            revocations,
            lifetime,
        }
    }
}

impl Issuer for CaDirIssuer {
    async fn issue(&self, id: &SpiffeId, csr_pem: &str) -> Result<Granted, IssueError> {
        let ca = self.ca.clone();
        let view = self.revocations.borrow().clone();
        let (id, csr, lifetime) = (id.clone(), csr_pem.to_string(), self.lifetime);
        // File reads and signing: off the runtime's thread.
        tokio::task::spawn_blocking(move || {
            // The directory first: when it is gone, the CA is unavailable,
            // whatever the revocations (kept in it by default) say.
            let authority = ca.authority().map_err(|source| IssueError::Authority {
                dir: ca.path().to_path_buf(),
                source: Box::new(source),
            })?;
            match view.check(&id, None) {
                RevocationStatus::Good => {}
                RevocationStatus::Revoked { what, reason } => {
                    return Err(IssueError::Refused {
                        reason: RefusalReason::Revoked,
                        message: format!("{what} is revoked: {reason}"),
                    })
                }
                RevocationStatus::Unknown { why } => {
                    return Err(IssueError::Refused {
                        reason: RefusalReason::RevocationUnknown,
                        message: format!(
                            "the revocations are unknown, so nothing is issued: {why}"
                        ),
                    })
                }
            }
            let issued = authority
                .issue(&id, &csr, lifetime, SystemTime::now())
                .map_err(|source| IssueError::Authority {
                    dir: ca.path().to_path_buf(),
                    source: Box::new(source),
                })?;
            Ok(Granted {
                chain_pem: issued.chain_pem,
                bundle: authority.bundle().clone(),
            })
        })
        .await
        .map_err(|e| IssueError::Internal {
            what: "the in-process CA's signing task".into(),
            source: Box::new(e),
        })?
    }

    fn describe(&self) -> String {
        format!("CA directory {}", self.ca.path().display())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::identity::{certificate::CertificateInfo, revocation::RevocationSet};

    use crate::identity::test_support::{csr, web};

    #[tokio::test]
    async fn signs_for_a_good_identity_and_refuses_revoked_unknown_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaDir::init(dir.path().join("ca"), "r1").unwrap();
        let (tx, rx) = watch::channel(RevocationView::Known(Arc::default()));
        let issuer = CaDirIssuer::new(ca, rx, Duration::from_secs(30));
        let granted = issuer.issue(&web(), &csr()).await.unwrap();
        let info = CertificateInfo::from_pem(&granted.chain_pem[0], "leaf").unwrap();
        assert_eq!(info.spiffe_id, Some(web()));
        let lifetime = info.not_after.duration_since(info.not_before).unwrap();
        assert!(lifetime <= Duration::from_secs(36), "{lifetime:?}");

        let revoked = RevocationSet::parse(
            "revocations:\n- spiffeId: spiffe://cluster.local/ns/shop/sa/web\n  reason: test\n",
            "t",
        )
        .unwrap();
        tx.send_replace(RevocationView::Known(Arc::new(revoked)));
        let e = issuer.issue(&web(), &csr()).await.unwrap_err();
        assert_eq!(e.reason().as_str(), "revoked", "{e}");

        tx.send_replace(RevocationView::Unknown { why: "test".into() });
        let e = issuer.issue(&web(), &csr()).await.unwrap_err();
        assert_eq!(e.reason().as_str(), "revocation_unknown", "{e}");

        std::fs::rename(dir.path().join("ca"), dir.path().join("away")).unwrap();
        let e = issuer.issue(&web(), &csr()).await.unwrap_err();
        assert_eq!(e.reason().as_str(), "unavailable", "{e}");
        assert!(e.to_string().contains("ca"), "{e}");
    }
}
