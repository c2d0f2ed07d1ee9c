//! Whether a watch failure that does not end by itself when the API
//! server answers (403, 404) is over.
//!
//! A watch that resumes after such a failure delivers nothing until an
//! object of its kind changes, so without a check its failure would keep
//! the agent not ready indefinitely. Seen against a real API server: right
//! after a restart it answers 403 until its authorizer caches fill, and
//! the endpointslices watch then stayed "failing" for as long as no
//! EndpointSlice changed. The same happens when an administrator fixes a
//! ClusterRole or installs a missing CRD.

use ::kube::{
    api::{ApiResource, DynamicObject, ListParams, PostParams},
    Api, Client,
};
use k8s_openapi::api::{
    authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};

use super::Watched;
use crate::crd;

fn resource(what: Watched) -> ApiResource {
    match what {
        Watched::Pods => ApiResource::erase::<Pod>(&()),
        Watched::Namespaces => ApiResource::erase::<Namespace>(&()),
        Watched::Node => ApiResource::erase::<Node>(&()),
        Watched::NetworkPolicies => ApiResource::erase::<NetworkPolicy>(&()),
        Watched::L4Policies => ApiResource::erase::<crd::L4Policy>(&()),
        Watched::ClusterL4Policies => ApiResource::erase::<crd::ClusterL4Policy>(&()),
        Watched::Services => ApiResource::erase::<Service>(&()),
        Watched::EndpointSlices => ApiResource::erase::<EndpointSlice>(&()),
    }
}

/// Whether this agent may `verb` the resource, by a SelfSubjectAccessReview.
async fn may(client: &Client, resource: &ApiResource, verb: &str) -> bool {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(resource.group.clone()),
                resource: Some(resource.plural.clone()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .ok()
        .and_then(|r| r.status)
        .is_some_and(|s| s.allowed)
}

/// Asks the API server whether what failed with `code` would work now:
/// for 403, whether this agent may list and watch the resource (a
/// SelfSubjectAccessReview, which every authenticated user may create);
/// for 404, whether the resource is served. Other codes, and a check that
/// itself fails, count as still failing.
pub async fn is_over(client: &Client, what: Watched, code: u16) -> bool {
    let resource = resource(what);
    match code {
        403 => {
            // The watcher lists, then watches: both must be allowed.
            for verb in ["list", "watch"] {
                if !may(client, &resource, verb).await {
                    return false;
                }
            }
            true
        }
        404 => Api::<DynamicObject>::all_with(client.clone(), &resource)
            .list_metadata(&ListParams::default().limit(1))
            .await
            .is_ok(),
        _ => false,
    }
}
