//! Writes Events and `Accepted` conditions for a report list, remembering
//! what it wrote so an unchanged list costs no API call. Only the Lease
//! holder calls it; on losing the Lease the memory is dropped, so the next
//! term starts by writing everything needed.

use std::collections::{HashMap, HashSet};

use k8s_openapi::{api::events::v1::Event, jiff::Timestamp};
use kube::{
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
    Api,
};
use thiserror::Error;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{condition, event, ObjectReport};
use crate::{
    crd::{ClusterL4Policy, L4Policy},
    policy::model::ObjectKind,
    source::file::error_chain,
};

#[derive(Debug, Error)]
pub enum WriteError {
    #[error("creating an Event about {object}")]
    Event {
        object: String,
        #[source]
        source: kube::Error,
    },
    #[error("applying the Accepted condition of {object}")]
    Status {
        object: String,
        #[source]
        source: kube::Error,
    },
}

impl WriteError {
    /// The API server was not reached or did not answer: the rest of a pass
    /// would fail alike, so it stops early.
    fn is_unreachable(&self) -> bool {
        let (Self::Event { source, .. } | Self::Status { source, .. }) = self;
        !matches!(source, kube::Error::Api(_))
    }
}

/// An Event already reported for this problem of this generation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EventKey {
    uid: String,
    generation: Option<i64>,
    problem: String,
}

struct Written {
    accepted: condition::Accepted,
    last_transition: Timestamp,
}

pub struct Writer {
    client: kube::Client,
    identity: String,
    events: HashSet<EventKey>,
    /// The Accepted condition we last applied, by object uid.
    conditions: HashMap<String, Written>,
}

impl Writer {
    pub fn new(client: kube::Client, identity: &str) -> Self {
        Self {
            client,
            identity: identity.to_string(),
            events: HashSet::new(),
            conditions: HashMap::new(),
        }
    }

    /// Another agent may write while we do not lead: what we wrote before
    /// says nothing about what is there now.
    pub fn forget(&mut self) {
        self.events.clear();
        self.conditions.clear();
    }

    /// Writes whatever `reports` needs that we have not written. Stops at
    /// `deadline` (the Lease must be renewed on time) or when the API server
    /// is unreachable; what is left is written on the next pass. Failures
    /// are logged, never returned: status never holds enforcement up.
    pub async fn sync(&mut self, reports: &[ObjectReport], deadline: Instant) {
        self.prune(reports);
        for report in reports {
            if Instant::now() >= deadline {
                debug!("status pass cut short to renew the Lease");
                return;
            }
            let result = match self.event(report).await {
                Ok(()) => self.condition(report).await,
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                warn!(error = %error_chain(&e), "writing policy status; retrying later");
                if e.is_unreachable() {
                    return;
                }
            }
        }
    }

    /// Forgets objects that are gone, and problems that are fixed.
    fn prune(&mut self, reports: &[ObjectReport]) {
        let current: HashSet<EventKey> = reports.iter().filter_map(event_key).collect();
        self.events.retain(|k| current.contains(k));
        let uids: HashSet<&str> = reports.iter().map(|r| r.uid.as_str()).collect();
        self.conditions.retain(|uid, _| uids.contains(uid.as_str()));
    }

    async fn event(&mut self, report: &ObjectReport) -> Result<(), WriteError> {
        let Some(key) = event_key(report) else {
            return Ok(());
        };
        if self.events.contains(&key) {
            return Ok(());
        }
        let Some(ev) = event::invalid_policy(report, &self.identity, Timestamp::now()) else {
            return Ok(());
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), event::namespace(report));
        match api.create(&PostParams::default(), &ev).await {
            Ok(_) => {}
            // Same name, same problem: an earlier leader reported it.
            Err(kube::Error::Api(s)) if s.is_already_exists() => {}
            Err(source) => {
                return Err(WriteError::Event {
                    object: describe(report),
                    source,
                })
            }
        }
        self.events.insert(key);
        Ok(())
    }

    async fn condition(&mut self, report: &ObjectReport) -> Result<(), WriteError> {
        let Some(accepted) = condition::Accepted::of(report) else {
            return Ok(());
        };
        let previous = self.conditions.get(&report.uid);
        if previous.is_some_and(|w| w.accepted == accepted) {
            return Ok(());
        }
        let last_transition = match previous {
            Some(w) if w.accepted.status == accepted.status => w.last_transition,
            _ => Timestamp::now(),
        };
        let resource = match report.kind {
            ObjectKind::L4Policy => ApiResource::erase::<L4Policy>(&()),
            _ => ApiResource::erase::<ClusterL4Policy>(&()),
        };
        // Dynamic: the reply need not parse as our spec type to count.
        let api: Api<DynamicObject> = if report.namespace.is_empty() {
            Api::all_with(self.client.clone(), &resource)
        } else {
            Api::namespaced_with(self.client.clone(), &report.namespace, &resource)
        };
        let params = PatchParams::apply(condition::FIELD_MANAGER).force();
        let patch = Patch::Apply(accepted.apply_patch(report, last_transition));
        match api.patch_status(&report.name, &params, &patch).await {
            Ok(_) => {
                self.conditions.insert(
                    report.uid.clone(),
                    Written {
                        accepted,
                        last_transition,
                    },
                );
                Ok(())
            }
            Err(source) => Err(WriteError::Status {
                object: describe(report),
                source,
            }),
        }
    }
}

fn event_key(report: &ObjectReport) -> Option<EventKey> {
    Some(EventKey {
        uid: report.uid.clone(),
        generation: report.generation,
        problem: report.problem.clone()?,
    })
}

/// `L4Policy team/web`, `ClusterL4Policy wide`.
fn describe(report: &ObjectReport) -> String {
    if report.namespace.is_empty() {
        format!("{} {}", report.kind, report.name)
    } else {
        format!("{} {}/{}", report.kind, report.namespace, report.name)
    }
}
