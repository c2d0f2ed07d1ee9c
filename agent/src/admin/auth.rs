//! Who may read `/metrics` in secure mode: the caller's bearer token is
//! authenticated by the API server (TokenReview) and the user it names is
//! authorized for `get` on the non-resource URL `/metrics`
//! (SubjectAccessReview), as controller-runtime's secure metrics filter
//! does. Bind the `portcullis-metrics-reader` ClusterRole to the scraper.
//!
//! Fails closed: when the API server cannot answer, the caller gets 503,
//! never the metrics. Definite answers (allowed, unauthenticated,
//! forbidden) are cached briefly by token digest, so a scrape storm costs
//! the API server at most one pair of reviews per token and TTL.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use hyper::header::HeaderValue;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, UserInfo},
    authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{api::PostParams, Api, Client};
// tokio's clock, so tests can let the TTL pass without waiting.
use tokio::time::Instant;

/// The only protected path, and the verb a GET or HEAD of it is checked as.
pub const METRICS_PATH: &str = "/metrics";
const VERB: &str = "get";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("creating a {review} at the API server")]
    Api {
        review: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("the API server did not answer the {review} within {timeout:?}")]
    Timeout {
        review: &'static str,
        timeout: Duration,
    },
    #[error("the API server answered the {review} without a status")]
    NoStatus { review: &'static str },
}

/// What a request to `/metrics` gets.
#[derive(Debug)]
pub enum Decision {
    /// 200 with the metrics.
    Allowed { user: String },
    /// 401: no bearer token, or one the API server does not accept.
    Unauthenticated { why: String },
    /// 403: a real user without `get` on `/metrics`.
    Forbidden { user: String, why: String },
    /// 503: the API server could not decide (not cached).
    Unavailable(AuthError),
}

impl Decision {
    fn cacheable(&self) -> Option<Decision> {
        Some(match self {
            Decision::Allowed { user } => Decision::Allowed { user: user.clone() },
            Decision::Unauthenticated { why } => Decision::Unauthenticated { why: why.clone() },
            Decision::Forbidden { user, why } => Decision::Forbidden {
                user: user.clone(),
                why: why.clone(),
            },
            Decision::Unavailable(_) => return None,
        })
    }
}

#[derive(Clone, Copy, Debug)]
pub struct AuthOptions {
    /// How long an answer is reused, positive or negative.
    pub ttl: Duration,
    /// At most this many tokens are remembered.
    pub capacity: usize,
    /// How long one review may take before the caller gets 503.
    pub timeout: Duration,
}

impl Default for AuthOptions {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            capacity: 1024,
            timeout: Duration::from_secs(5),
        }
    }
}

type TokenDigest = [u8; 32];

/// Authenticates and authorizes `/metrics` callers against the API server.
pub struct MetricsAuth {
    client: Client,
    options: AuthOptions,
    /// Token digest → (decision, when it was made). Raw tokens are not kept.
    cache: Mutex<HashMap<TokenDigest, (Decision, Instant)>>,
}

impl MetricsAuth {
    pub fn new(client: Client, options: AuthOptions) -> Self {
        Self {
            client,
            options,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Decides on a request's `Authorization` header.
    pub async fn authorize(&self, authorization: Option<&HeaderValue>) -> Decision {
        let Some(token) = bearer_token(authorization) else {
            return Decision::Unauthenticated {
                why: "no bearer token (Authorization: Bearer <token>)".into(),
            };
        };
        let digest = digest(token);
        if let Some(hit) = self.cached(&digest) {
            return hit;
        }
        let decision = self.review(token).await;
        if let Some(copy) = decision.cacheable() {
            self.remember(digest, copy);
        }
        decision
    }

    fn cached(&self, digest: &TokenDigest) -> Option<Decision> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let (decision, at) = cache.get(digest)?;
        (at.elapsed() < self.options.ttl)
            .then(|| decision.cacheable())
            .flatten()
    }

    fn remember(&self, digest: TokenDigest, decision: Decision) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.options.capacity && !cache.contains_key(&digest) {
            let ttl = self.options.ttl;
            cache.retain(|_, (_, at)| at.elapsed() < ttl);
            // Still full of live answers (many distinct tokens within one
            // TTL): the oldest goes, so the cache stays bounded.
            if cache.len() >= self.options.capacity {
                if let Some(oldest) = cache.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| *k) {
                    cache.remove(&oldest);
                }
            }
        }
        cache.insert(digest, (decision, Instant::now()));
    }

    async fn review(&self, token: &str) -> Decision {
        let user = match self.authenticate(token).await {
            Ok(Ok(user)) => user,
            Ok(Err(why)) => return Decision::Unauthenticated { why },
            Err(e) => return Decision::Unavailable(e),
        };
        let name = user.username.clone().unwrap_or_default();
        match self.access(user).await {
            Ok(None) => Decision::Allowed { user: name },
            Ok(Some(why)) => Decision::Forbidden { user: name, why },
            Err(e) => Decision::Unavailable(e),
        }
    }

    /// The user the token belongs to, or why the API server rejected it.
    async fn authenticate(&self, token: &str) -> Result<Result<UserInfo, String>, AuthError> {
        const REVIEW: &str = "TokenReview";
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: None,
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = self
            .bounded(REVIEW, api.create(&PostParams::default(), &review))
            .await?;
        let status = answer
            .status
            .ok_or(AuthError::NoStatus { review: REVIEW })?;
        match (status.authenticated, status.user) {
            (Some(true), Some(user)) if user.username.as_deref().is_some_and(|u| !u.is_empty()) => {
                Ok(Ok(user))
            }
            _ => Ok(Err(status.error.filter(|e| !e.is_empty()).unwrap_or_else(
                || "the API server did not authenticate the token".into(),
            ))),
        }
    }

    /// `None` when the user may get `/metrics`; otherwise why not.
    async fn access(&self, user: UserInfo) -> Result<Option<String>, AuthError> {
        const REVIEW: &str = "SubjectAccessReview";
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(METRICS_PATH.into()),
                    verb: Some(VERB.into()),
                }),
                resource_attributes: None,
            },
            ..Default::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let answer = self
            .bounded(REVIEW, api.create(&PostParams::default(), &review))
            .await?;
        let status = answer
            .status
            .ok_or(AuthError::NoStatus { review: REVIEW })?;
        if status.allowed && status.denied != Some(true) {
            return Ok(None);
        }
        let mut why = format!("not allowed to {VERB} {METRICS_PATH}");
        if let Some(reason) = status.reason.filter(|r| !r.is_empty()) {
            why = format!("{why}: {reason}");
        }
        Ok(Some(why))
    }

    async fn bounded<T>(
        &self,
        review: &'static str,
        call: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, AuthError> {
        match tokio::time::timeout(self.options.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(AuthError::Api { review, source }),
            Err(_) => Err(AuthError::Timeout {
                review,
                timeout: self.options.timeout,
            }),
        }
    }
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive).
fn bearer_token(header: Option<&HeaderValue>) -> Option<&str> {
    let value = header?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn digest(token: &str) -> TokenDigest {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
pub(crate) mod tests;
