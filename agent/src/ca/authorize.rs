//! Who is asking, and may they have this identity?
//!
//! 1. The bearer token is reviewed by the API server (TokenReview) for our
//!    audience only, so a token minted for anything else (the API server,
//!    another service) is useless here; an expired token, or one whose pod
//!    is gone, is not authenticated either.
//! 2. It must be a Portcullis agent's (one configured service account).
//! 3. It must be bound to a pod: the pod is how we learn the caller's node.
//!    We read that pod back and check its UID, so a token of a deleted and
//!    recreated pod of the same name cannot claim the new pod's node.
//! 4. Node authorization: the requested identity is granted only if a pod
//!    of that service account is scheduled on the caller's node and not
//!    finished. A compromised node can thus obtain the identities of the
//!    pods it runs, and no other.

use std::{collections::BTreeMap, future::Future, time::Duration};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{
    api::{ListParams, PostParams},
    Api, Client,
};

use crate::identity::{spiffe::DEFAULT_SERVICE_ACCOUNT, wire::RefusalReason};

/// The TokenReview `extra` keys the API server sets for pod-bound tokens.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    #[error("no bearer token (Authorization: Bearer <token with audience {audience}>)")]
    NoToken { audience: String },
    #[error("the API server does not accept the token for audience {audience}: {why}")]
    Unauthenticated { audience: String, why: String },
    #[error("{user} is not the Portcullis agent's service account ({expected})")]
    NotAnAgent { user: String, expected: String },
    #[error(
        "the token of {user} is not bound to a pod, so its node is unknown \
         (mint it as a projected volume, or with --bound-object-kind Pod)"
    )]
    NotBoundToPod { user: String },
    #[error("the token's pod {namespace}/{name} (uid {uid}) no longer exists")]
    PodGone {
        namespace: String,
        name: String,
        uid: String,
    },
    #[error("the agent pod {namespace}/{name} is not scheduled on a node")]
    PodNotScheduled { namespace: String, name: String },
    #[error(
        "the token names node {token_node} but the agent pod {namespace}/{name} \
         is on node {pod_node}"
    )]
    NodeMismatch {
        namespace: String,
        name: String,
        token_node: String,
        pod_node: String,
    },
    #[error(
        "no pod with service account {namespace}/{service_account} is scheduled on node {node}"
    )]
    NoPodOnNode {
        namespace: String,
        service_account: String,
        node: String,
    },
    #[error("{what} at the API server")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("the API server did not answer ({what}) within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("the API server answered the TokenReview without a status")]
    NoStatus,
}

impl AuthorizeError {
    /// The refusal an agent sees and counts.
    pub fn reason(&self) -> RefusalReason {
        match self {
            Self::NoToken { .. } | Self::Unauthenticated { .. } | Self::PodGone { .. } => {
                RefusalReason::Unauthenticated
            }
            Self::NotAnAgent { .. } => RefusalReason::NotAnAgent,
            Self::NotBoundToPod { .. }
            | Self::PodNotScheduled { .. }
            | Self::NodeMismatch { .. } => RefusalReason::NotBoundToPod,
            Self::NoPodOnNode { .. } => RefusalReason::NoPodOnNode,
            Self::Api { .. } | Self::Timeout { .. } | Self::NoStatus => RefusalReason::Unavailable,
        }
    }
}

/// The agent that asked: its pod and its node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub user: String,
    pub pod: String,
    pub node: String,
}

/// A `namespace/name` service account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountRef {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccountRef {
    /// The username the API server gives its tokens.
    pub fn username(&self) -> String {
        format!("{SERVICE_ACCOUNT_PREFIX}{}:{}", self.namespace, self.name)
    }
}

impl std::fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Checks callers and their node against the API server.
#[derive(Clone)]
pub struct Authorizer {
    pub client: Client,
    pub agent: ServiceAccountRef,
    pub audience: String,
    /// Bound on each API call: a slow API server yields `unavailable`.
    pub timeout: Duration,
}

impl Authorizer {
    /// Who the token belongs to (an agent's pod on a node), or why not.
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Caller, AuthorizeError> {
        let token = token.ok_or_else(|| AuthorizeError::NoToken {
            audience: self.audience.clone(),
        })?;
        let (user, extra) = self.review(token).await?;
        let expected = self.agent.username();
        if user != expected {
            return Err(AuthorizeError::NotAnAgent {
                user,
                expected: self.agent.to_string(),
            });
        }
        let one = |key: &str| {
            extra
                .get(key)
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let (Some(pod_name), Some(pod_uid)) = (one(EXTRA_POD_NAME), one(EXTRA_POD_UID)) else {
            return Err(AuthorizeError::NotBoundToPod { user });
        };
        let namespace = self.agent.namespace.clone();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let what = format!("reading the agent pod {namespace}/{pod_name}");
        let pod = self.bounded(&what, pods.get_opt(&pod_name)).await?;
        let gone = || AuthorizeError::PodGone {
            namespace: namespace.clone(),
            name: pod_name.clone(),
            uid: pod_uid.clone(),
        };
        let pod = pod.ok_or_else(gone)?;
        if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
            return Err(gone());
        }
        let node = pod
            .spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| AuthorizeError::PodNotScheduled {
                namespace: namespace.clone(),
                name: pod_name.clone(),
            })?;
        // Recent API servers put the node in the token too; pods never move,
        // so a disagreement means something is wrong: refuse.
        if let Some(token_node) = one(EXTRA_NODE_NAME) {
            if token_node != node {
                return Err(AuthorizeError::NodeMismatch {
                    namespace,
                    name: pod_name,
                    token_node,
                    pod_node: node,
                });
            }
        }
        Ok(Caller {
            user,
            pod: format!("{namespace}/{pod_name}"),
            node,
        })
    }

    /// Node authorization: is a pod of `namespace/service_account`
    /// scheduled on `node`, and not finished?
    pub async fn pod_on_node(
        &self,
        namespace: &str,
        service_account: &str,
        node: &str,
    ) -> Result<(), AuthorizeError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let params = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let what = format!("listing the pods of namespace {namespace} on node {node}");
        let list = self.bounded(&what, pods.list(&params)).await?;
        let found = list.items.iter().any(|pod| {
            let spec = pod.spec.as_ref();
            let account = spec
                .and_then(|s| s.service_account_name.as_deref())
                .filter(|a| !a.is_empty())
                .unwrap_or(DEFAULT_SERVICE_ACCOUNT);
            let on_node = spec.and_then(|s| s.node_name.as_deref()) == Some(node);
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            let finished = matches!(phase, Some("Succeeded" | "Failed"));
            on_node && account == service_account && !finished
        });
        if found {
            Ok(())
        } else {
            Err(AuthorizeError::NoPodOnNode {
                namespace: namespace.into(),
                service_account: service_account.into(),
                node: node.into(),
            })
        }
    }

    /// The user and `extra` of an authenticated token, for our audience.
    async fn review(
        &self,
        token: &str,
    ) -> Result<(String, BTreeMap<String, Vec<String>>), AuthorizeError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = self
            .bounded(
                "creating a TokenReview",
                api.create(&PostParams::default(), &review),
            )
            .await?;
        let status = answer.status.ok_or(AuthorizeError::NoStatus)?;
        let unauthenticated = |why: String| AuthorizeError::Unauthenticated {
            audience: self.audience.clone(),
            why,
        };
        if status.authenticated != Some(true) {
            return Err(unauthenticated(
                status
                    .error
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        // The API server intersects audiences; check it did for ours, as
        // the TokenReview API asks reviewers to.
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.iter().any(|a| a == &self.audience))
        {
            return Err(unauthenticated(format!(
                "the review's audiences {:?} do not include {}",
                status.audiences.unwrap_or_default(),
                self.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        let name = user
            .username
            .filter(|u| !u.is_empty())
            .ok_or_else(|| unauthenticated("the API server named no user for the token".into()))?;
        Ok((name, user.extra.unwrap_or_default()))
    }

    async fn bounded<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, AuthorizeError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(AuthorizeError::Api {
                what: what.into(),
                source,
            }),
            Err(_) => Err(AuthorizeError::Timeout {
                what: what.into(),
                timeout: self.timeout,
            }),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer_token(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_from_the_header() {
        assert_eq!(bearer_token(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer_token(Some("Basic abc")), None);
        assert_eq!(bearer_token(Some("Bearer ")), None);
        assert_eq!(bearer_token(None), None);
    }

    #[test]
    fn refusals_map_to_the_wire_reasons() {
        let e = AuthorizeError::NoPodOnNode {
            namespace: "shop".into(),
            service_account: "web".into(),
            node: "node-a".into(),
        };
        assert_eq!(e.reason(), RefusalReason::NoPodOnNode);
        assert_eq!(
            e.to_string(),
            "no pod with service account shop/web is scheduled on node node-a"
        );
        let e = AuthorizeError::PodGone {
            namespace: "portcullis-system".into(),
            name: "agent-x".into(),
            uid: "u".into(),
        };
        assert_eq!(e.reason(), RefusalReason::Unauthenticated);
    }

    #[test]
    fn the_agent_username_is_the_service_accounts() {
        let sa = ServiceAccountRef {
            namespace: "portcullis-system".into(),
            name: "portcullis-agent".into(),
        };
        assert_eq!(
            sa.username(),
            "system:serviceaccount:portcullis-system:portcullis-agent"
        );
    }
}
