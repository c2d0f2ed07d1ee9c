//! Publishing the trust bundle: every root of the CA directory, as one PEM
//! text in the ConfigMap agents watch (key [`BUNDLE_KEY`]).
//!
//! The ConfigMap ships empty with the manifests, so the CA needs only
//! `update`/`patch` on that one name, never `create`. It is written when
//! the bundle differs from what the ConfigMap holds (read once at start,
//! then remembered), so a restart does not touch it needlessly.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    api::{Patch, PatchParams},
    Api, Client,
};

use crate::identity::{bundle::TrustBundle, kube_watch::BUNDLE_KEY};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(
        "ConfigMap {namespace}/{name} does not exist; the CA only updates it \
         (deploy/ca creates it empty)"
    )]
    Missing { namespace: String, name: String },
    #[error("{action} ConfigMap {namespace}/{name}")]
    Api {
        action: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Writes the bundle into one ConfigMap when it changed.
pub struct BundlePublisher {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
    /// What the ConfigMap holds as far as we know (`None`: not read yet).
    published: Option<String>,
}

impl BundlePublisher {
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.into(),
            name: name.into(),
            published: None,
        }
    }

    /// Makes the ConfigMap hold `bundle`; returns whether it was written.
    pub async fn publish(&mut self, bundle: &TrustBundle) -> Result<bool, PublishError> {
        let pem = bundle.to_pem();
        if self.published.is_none() {
            let current = self
                .api
                .get_opt(&self.name)
                .await
                .map_err(|source| self.api_error("reading", source))?
                .ok_or_else(|| PublishError::Missing {
                    namespace: self.namespace.clone(),
                    name: self.name.clone(),
                })?;
            self.published = Some(
                current
                    .data
                    .and_then(|mut d| d.remove(BUNDLE_KEY))
                    .unwrap_or_default(),
            );
        }
        if self.published.as_deref() == Some(pem.as_str()) {
            return Ok(false);
        }
        let patch = serde_json::json!({ "data": { BUNDLE_KEY: pem } });
        match self
            .api
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.published = Some(pem);
                Ok(true)
            }
            Err(source) => {
                // Someone else may have changed it meanwhile: read it again.
                self.published = None;
                Err(self.api_error("updating", source))
            }
        }
    }

    /// Reads the ConfigMap again before the next write decision, so an
    /// edit by someone else is undone.
    pub fn forget(&mut self) {
        self.published = None;
    }

    fn api_error(&self, action: &'static str, source: kube::Error) -> PublishError {
        PublishError::Api {
            action,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }
}
