//! What the identity unit tests share: an identity and an agent's request.

use super::{authority::new_key, spiffe::SpiffeId};

pub fn web() -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", "web").unwrap()
}

/// A PKCS#10 request signed by a fresh P-256 key, as an agent sends, with
/// the key it proves.
pub fn request() -> (String, rcgen::KeyPair) {
    let key = new_key("test").unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (csr, key)
}

pub fn csr() -> String {
    request().0
}
