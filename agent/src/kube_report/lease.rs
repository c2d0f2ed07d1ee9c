//! Leader election over one coordination.k8s.io/v1 Lease: whoever holds it
//! writes status for every node. Optimistic concurrency does the arbitration:
//! every write carries the resourceVersion we last saw, so of several agents
//! racing for an expired Lease exactly one PUT succeeds and the others get a
//! 409 and follow.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{api::PostParams, Api};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LeaseError {
    #[error("{action} Lease {namespace}/{name}")]
    Api {
        action: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// The outcome of one election round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// We hold the Lease until at least `lease_duration` from now.
    Leading,
    /// Someone else holds it (or won a race): look again after this long.
    Following { retry_in: Duration },
}

pub struct LeaseLock {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    duration: Duration,
    retry: Duration,
    /// The Lease as our last successful write returned it: renewals PUT over
    /// it directly, without a GET first.
    held: Option<Lease>,
}

impl LeaseLock {
    /// `retry` is how soon to look again after losing a race or an error.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
        retry: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
            retry,
            held: None,
        }
    }

    /// One round: renew our Lease, or take it if it is absent, released or
    /// expired. An error means we do not lead (a renewal that failed may have
    /// let someone else take over).
    pub async fn round(&mut self) -> Result<Round, LeaseError> {
        let now = Timestamp::now();
        if let Some(held) = self.held.take() {
            match self
                .api
                .replace(&self.name, &PostParams::default(), &self.renewed(held, now))
                .await
            {
                Ok(lease) => {
                    self.held = Some(lease);
                    return Ok(Round::Leading);
                }
                // Changed behind our back (taken over, or edited): look.
                Err(e) if is_conflict(&e) => {}
                Err(source) => return Err(self.error("updating", source)),
            }
        }
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| self.error("reading", source))?;
        let Some(current) = current else {
            let created = self
                .api
                .create(&PostParams::default(), &self.fresh(now))
                .await;
            return self.written("creating", created);
        };
        let spec = current.spec.clone().unwrap_or_default();
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let expires = expiry(&spec, self.duration);
        let lease = match expires {
            // Our own (an earlier run on this node): keep it.
            Some(_) if ours => self.renewed(current, now),
            Some(at) if at > now => {
                return Ok(Round::Following {
                    retry_in: self.wait_until(at, now),
                })
            }
            _ => self.taken_over(current, now),
        };
        let replaced = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await;
        self.written("updating", replaced)
    }

    /// Gives the Lease up so another agent need not wait for it to expire.
    /// Best effort: on failure it simply expires.
    pub async fn release(&mut self) -> Result<(), LeaseError> {
        let Some(mut lease) = self.held.take() else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map_err(|source| self.error("updating", source))?;
        Ok(())
    }

    fn fresh(&self, now: Timestamp) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(self.duration_seconds()),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        }
    }

    /// `lease` with a new renewTime; its resourceVersion makes the PUT fail
    /// if anyone wrote in between.
    fn renewed(&self, mut lease: Lease, now: Timestamp) -> Lease {
        let spec = lease.spec.get_or_insert_with(Default::default);
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(self.duration_seconds());
        lease
    }

    fn taken_over(&self, mut lease: Lease, now: Timestamp) -> Lease {
        let spec = lease.spec.get_or_insert_with(Default::default);
        spec.holder_identity = Some(self.identity.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        self.renewed(lease, now)
    }

    /// After creating or taking over the Lease: leading if the write held,
    /// following if another agent wrote first.
    // The error `round` returns anyway, once per round of seconds.
    #[allow(clippy::result_large_err)]
    fn written(
        &mut self,
        action: &'static str,
        result: Result<Lease, kube::Error>,
    ) -> Result<Round, LeaseError> {
        match result {
            Ok(lease) => {
                self.held = Some(lease);
                Ok(Round::Leading)
            }
            Err(e) if is_conflict(&e) => Ok(self.lost_race()),
            Err(source) => Err(self.error(action, source)),
        }
    }

    fn lost_race(&self) -> Round {
        Round::Following {
            retry_in: self.retry,
        }
    }

    /// Until the holder's Lease could expire, within [retry, duration]: a
    /// skewed clock must neither spin nor sleep for ages.
    fn wait_until(&self, at: Timestamp, now: Timestamp) -> Duration {
        let left = Duration::try_from(at.duration_since(now)).unwrap_or_default();
        left.clamp(self.retry, self.duration.max(self.retry))
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    fn error(&self, action: &'static str, source: kube::Error) -> LeaseError {
        LeaseError::Api {
            action,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }
}

/// When a held Lease expires (renewTime + leaseDurationSeconds); `None` when
/// nobody holds it. A holder without a renewTime never renewed: expired.
pub fn expiry(spec: &LeaseSpec, default_duration: Duration) -> Option<Timestamp> {
    if spec.holder_identity.as_deref().is_none_or(str::is_empty) {
        return None;
    }
    let Some(MicroTime(renewed)) = spec.renew_time else {
        return Some(Timestamp::MIN);
    };
    let seconds = spec
        .lease_duration_seconds
        .map_or(default_duration.as_secs() as i64, i64::from);
    Some(
        renewed
            .saturating_add(SignedDuration::from_secs(seconds))
            .unwrap_or(Timestamp::MAX),
    )
}

/// A 409: someone wrote the Lease since we read it (or created it first).
pub fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}
