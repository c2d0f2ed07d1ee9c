//! SPIFFE IDs of Kubernetes service accounts:
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, the form
//! Istio and Linkerd use, so identities read the same across meshes.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::policy::model::names::{self, NameError};

/// The trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// The service account of a pod that names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

const SCHEME: &str = "spiffe://";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpiffeIdError {
    #[error("{id:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme { id: String },
    #[error(
        "{id:?}: the path must be /ns/<namespace>/sa/<service account>, \
         the only form Portcullis issues"
    )]
    Path { id: String },
    #[error(
        "trust domain {value:?}: {why} (lowercase letters, digits, '.', '-' and '_', \
         at most 255 characters)"
    )]
    TrustDomain { value: String, why: &'static str },
    #[error("namespace {value:?}")]
    Namespace {
        value: String,
        #[source]
        why: NameError,
    },
    #[error("service account {value:?}")]
    ServiceAccount {
        value: String,
        #[source]
        why: NameError,
    },
}

/// A service account's identity in one trust domain.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Checks each part as the API server checks the names (a namespace is
    /// a DNS label, a service account a DNS subdomain) and as the SPIFFE
    /// standard checks trust domains.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        check_trust_domain(trust_domain)?;
        names::dns1123_label(namespace).map_err(|why| SpiffeIdError::Namespace {
            value: abbreviate(namespace),
            why,
        })?;
        names::dns1123_subdomain(service_account).map_err(|why| SpiffeIdError::ServiceAccount {
            value: abbreviate(service_account),
            why,
        })?;
        Ok(Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The URI a certificate carries as its subject alternative name.
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        let rest = id
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::Scheme { id: id.into() })?;
        let (domain, path) = rest
            .split_once('/')
            .ok_or_else(|| SpiffeIdError::Path { id: id.into() })?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", namespace, "sa", account] => Self::new(domain, namespace, account),
            _ => Err(SpiffeIdError::Path { id: id.into() }),
        }
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks a trust domain name (SPIFFE ID standard, section 2.1).
pub fn check_trust_domain(domain: &str) -> Result<(), SpiffeIdError> {
    let why = if domain.is_empty() {
        Some("empty")
    } else if domain.len() > 255 {
        Some("too long")
    } else if !domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
    {
        Some("invalid character")
    } else {
        None
    };
    match why {
        Some(why) => Err(SpiffeIdError::TrustDomain {
            value: domain.into(),
            why,
        }),
        None => Ok(()),
    }
}

/// Names in errors stay short, however long the input.
fn abbreviate(value: &str) -> String {
    match value.char_indices().nth(80) {
        Some((end, _)) => format!("{}…", &value[..end]),
        None => value.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_account_identity_round_trips_through_its_uri() {
        let id = SpiffeId::new("cluster.local", "shop", "web").unwrap();
        assert_eq!(id.uri(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(id.uri().parse::<SpiffeId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://cluster.local/ns/shop/sa/web\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    }

    #[test]
    fn malformed_identities_are_refused_naming_the_part() {
        let refused = [
            ("https://cluster.local/ns/a/sa/b", "spiffe://"),
            ("spiffe://cluster.local", "path"),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "path"),
            ("spiffe://cluster.local/ns/a/b", "path"),
            ("spiffe://Cluster.local/ns/a/sa/b", "trust domain"),
            ("spiffe:///ns/a/sa/b", "trust domain"),
            ("spiffe://cluster.local/ns/A/sa/b", "namespace"),
            ("spiffe://cluster.local/ns//sa/b", "namespace"),
            ("spiffe://cluster.local/ns/a/sa/-b", "service account"),
            ("spiffe://cluster.local/ns/a/sa/b..c", "service account"),
        ];
        for (id, part) in refused {
            let e = crate::source::file::error_chain(&id.parse::<SpiffeId>().unwrap_err());
            assert!(e.contains(part), "{id}: {e}");
        }
        let long = "a".repeat(64);
        assert!(SpiffeId::new("cluster.local", &long, "b").is_err());
        assert!(SpiffeId::new("cluster.local", "a", "b.c-d").is_ok());
    }
}
