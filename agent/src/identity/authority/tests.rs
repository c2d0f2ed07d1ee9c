use std::os::unix::fs::PermissionsExt as _;

use rcgen::{CertificateParams, KeyPair, PKCS_ED25519};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::*;
use crate::identity::bundle::VerifyError;

use crate::identity::test_support::{request, web};

fn chain(issued: &Issued) -> Vec<CertificateDer<'static>> {
    chain_from_pem(&issued.chain_pem.concat()).unwrap()
}

fn issue(ca: &CaDir, lifetime: Duration) -> Issued {
    ca.authority()
        .unwrap()
        .issue(&web(), &request().0, lifetime, SystemTime::now())
        .unwrap()
}

#[test]
fn init_makes_a_root_and_an_active_issuer_with_private_keys() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CaDir::init(dir.path(), "r1").unwrap();
    let status = ca.status().unwrap();
    assert_eq!(status.active_issuer.as_deref(), Some("r1"));
    assert_eq!(status.roots.len(), 1);
    assert!(status.roots[0].has_key && status.roots[0].has_issuer);
    assert!(status.roots[0].certificate.is_ca);
    for key in ["root-r1.key", "issuer-r1.key"] {
        let mode = fs::metadata(dir.path().join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let again = CaDir::init(dir.path(), "r2").unwrap_err().to_string();
    assert!(again.contains("already holds a CA"), "{again}");
    let bad = CaDir::init(tempfile::tempdir().unwrap().path(), "R/1").unwrap_err();
    assert!(bad.to_string().contains("CA name"), "{bad}");
}

#[test]
fn a_leaf_carries_the_identity_for_mutual_tls_and_chains_to_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CaDir::init(dir.path(), "r1").unwrap();
    let lifetime = Duration::from_secs(3600);
    let before = SystemTime::now();
    let issued = issue(&ca, lifetime);
    let leaf_der = chain(&issued)[0].clone();
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();

    // Exactly one SAN, the SPIFFE URI, and no subject.
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1);
    assert_eq!(
        format!("{:?}", san.value.general_names[0]),
        "URI(\"spiffe://cluster.local/ns/shop/sa/web\")"
    );
    assert!(san.critical, "an empty subject makes the SAN critical");
    assert_eq!(issued.info.spiffe_id, Some(web()));
    // Lifetime as asked (backdated a little for clock skew).
    let life = issued.info.lifetime();
    assert!(
        life >= lifetime && life <= lifetime + Duration::from_secs(10),
        "{life:?}"
    );
    assert!(issued.info.not_after >= before + lifetime - Duration::from_secs(1));
    // Signing only, for both ends of mutual TLS; not a CA.
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature());
    assert!(!ku.key_cert_sign() && !ku.crl_sign() && !ku.key_encipherment());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any);
    assert!(!leaf.is_ca());
    assert_eq!(issued.chain_pem.len(), 2, "leaf and issuer");

    let bundle = ca.bundle().unwrap();
    let verified = bundle
        .verify(&chain(&issued), "cluster.local", SystemTime::now())
        .unwrap();
    assert_eq!(verified.spiffe_id, Some(web()));
    assert_eq!(verified.serial, issued.info.serial);
    // Not in another trust domain, not once expired.
    assert!(matches!(
        bundle.verify(&chain(&issued), "example.org", SystemTime::now()),
        Err(VerifyError::ForeignTrustDomain { .. })
    ));
    assert!(matches!(
        bundle.verify(
            &chain(&issued),
            "cluster.local",
            before + lifetime + Duration::from_secs(60)
        ),
        Err(VerifyError::Chain(_))
    ));
    // Without its issuer the leaf does not chain.
    assert!(bundle
        .verify(&chain(&issued)[..1], "cluster.local", SystemTime::now())
        .is_err());
}

#[test]
fn a_verifier_holding_another_root_rejects_the_leaf() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let ca = CaDir::init(ours.path(), "r1").unwrap();
    let other = CaDir::init(theirs.path(), "r1").unwrap();
    let issued = issue(&ca, Duration::from_secs(600));
    let e = other
        .bundle()
        .unwrap()
        .verify(&chain(&issued), "cluster.local", SystemTime::now())
        .unwrap_err();
    assert!(matches!(e, VerifyError::Chain(_)), "{e}");
}

#[test]
fn the_ca_signs_only_p256_requests_that_prove_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CaDir::init(dir.path(), "r1").unwrap();
    let authority = ca.authority().unwrap();
    let ed = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let ed_csr = CertificateParams::default()
        .serialize_request(&ed)
        .unwrap()
        .pem()
        .unwrap();
    let now = SystemTime::now();
    let e = authority
        .issue(&web(), &ed_csr, DEFAULT_LEAF_LIFETIME, now)
        .unwrap_err();
    assert!(matches!(e, AuthorityError::KeyAlgorithm), "{e}");
    // A request whose signature does not match its key.
    let (csr, _) = request();
    let mut tampered = csr.clone();
    let mid = tampered.len() / 2;
    let c = if &tampered[mid..mid + 1] == "A" {
        "B"
    } else {
        "A"
    };
    tampered.replace_range(mid..mid + 1, c);
    let e = authority
        .issue(&web(), &tampered, DEFAULT_LEAF_LIFETIME, now)
        .unwrap_err();
    assert!(matches!(e, AuthorityError::Request(_)), "{e}");
    assert!(authority
        .issue(&web(), "not a request", DEFAULT_LEAF_LIFETIME, now)
        .is_err());
}

#[test]
fn configured_lifetimes_stay_between_ten_minutes_and_a_day() {
    assert!(check_lifetime(Duration::from_secs(600)).is_ok());
    assert!(check_lifetime(Duration::from_secs(86_400)).is_ok());
    assert!(check_lifetime(Duration::from_secs(599)).is_err());
    assert!(check_lifetime(Duration::from_secs(86_401)).is_err());
}

/// The documented rotation: at every step, every live leaf verifies against
/// the bundle an agent holds, whether it has seen the step yet or not.
#[test]
fn a_root_rotation_never_fails_a_verification() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CaDir::init(dir.path(), "old").unwrap();
    let now = SystemTime::now;
    let bundle_0 = ca.bundle().unwrap();
    let leaf_old = issue(&ca, Duration::from_secs(600));

    // Step 1: the new root joins the bundle; issuing is unchanged.
    ca.add_root("new").unwrap();
    let bundle_1 = ca.bundle().unwrap();
    assert_eq!(bundle_1.roots().len(), 2);
    let leaf_1 = issue(&ca, Duration::from_secs(600));
    for bundle in [&bundle_0, &bundle_1] {
        for leaf in [&leaf_old, &leaf_1] {
            bundle.verify(&chain(leaf), "cluster.local", now()).unwrap();
        }
    }

    // Step 2 (once every agent holds bundle 1): new leaves chain to the new root.
    ca.activate("new").unwrap();
    let leaf_new = issue(&ca, Duration::from_secs(600));
    assert_ne!(leaf_new.info.issuer, leaf_old.info.issuer);
    let bundle_2 = ca.bundle().unwrap();
    for leaf in [&leaf_old, &leaf_1, &leaf_new] {
        bundle_1
            .verify(&chain(leaf), "cluster.local", now())
            .unwrap();
        bundle_2
            .verify(&chain(leaf), "cluster.local", now())
            .unwrap();
    }
    // An agent that skipped step 1 would fail here: why the order matters.
    assert!(bundle_0
        .verify(&chain(&leaf_new), "cluster.local", now())
        .is_err());

    // Step 3 (once every old leaf has expired): the old root leaves.
    let e = ca.retire_root("new").unwrap_err();
    assert!(matches!(e, AuthorityError::RetiringActive { .. }), "{e}");
    ca.retire_root("old").unwrap();
    let bundle_3 = ca.bundle().unwrap();
    assert_eq!(bundle_3.roots().len(), 1);
    let leaf_3 = issue(&ca, Duration::from_secs(600));
    for leaf in [&leaf_new, &leaf_3] {
        bundle_2
            .verify(&chain(leaf), "cluster.local", now())
            .unwrap();
        bundle_3
            .verify(&chain(leaf), "cluster.local", now())
            .unwrap();
    }
    assert!(bundle_3
        .verify(&chain(&leaf_old), "cluster.local", now())
        .is_err());
    let status = ca.status().unwrap();
    assert_eq!(status.active_issuer.as_deref(), Some("new"));
    assert_eq!(
        status
            .roots
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["new"]
    );
}

#[test]
fn the_serving_certificate_verifies_as_a_server_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CaDir::init(dir.path(), "r1").unwrap();
    let authority = ca.authority().unwrap();
    let (issued, _key) = authority
        .serving_certificate(
            &[
                "portcullis-ca.portcullis-system.svc".into(),
                "127.0.0.1".into(),
            ],
            Duration::from_secs(3600),
        )
        .unwrap();
    let chain = chain(&issued);
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(ca.bundle().unwrap().root_store()),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    use rustls::client::danger::ServerCertVerifier as _;
    let name =
        rustls_pki_types::ServerName::try_from("portcullis-ca.portcullis-system.svc").unwrap();
    verifier
        .verify_server_cert(
            &chain[0],
            &chain[1..],
            &name,
            &[],
            rustls_pki_types::UnixTime::now(),
        )
        .unwrap();
}
