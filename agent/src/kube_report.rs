//! Reports the validity of policy objects back to Kubernetes: an Event per
//! newly invalid object and an `Accepted` status condition on Portcullis'
//! own kinds. Only the agent holding the Lease writes, so nodes do not race.
//!
//! Every agent sees the same objects and finds the same problems; if each
//! wrote, a cluster of N nodes would make N Events per problem and N status
//! writes fighting over one field. The Lease makes it one writer, and a
//! crashed writer is replaced once its Lease expires. Writing is best
//! effort and off the enforcement path: failures are logged and retried.

mod condition;
mod event;
mod lease;
mod writer;

use std::time::Duration;

use tokio::{sync::watch, time::Instant};
use tracing::{info, warn};

pub use lease::LeaseError;

use crate::{policy::model::ObjectKind, source::file::error_chain};

/// What the kube source concluded about one policy object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectReport {
    pub kind: ObjectKind,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `metadata.generation`, for the condition's `observedGeneration`.
    pub generation: Option<i64>,
    /// Why the object is not applied (its last valid version, if any, stays
    /// enforced); `None` when it is valid and applied.
    pub problem: Option<String>,
}

pub const DEFAULT_NAMESPACE: &str = "portcullis-system";
pub const DEFAULT_LEASE_NAME: &str = "portcullis-status-writer";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReporterOptions {
    /// Where the Lease lives (the Role grants Leases only there).
    pub namespace: String,
    pub lease_name: String,
    /// This agent's name in the Lease and in Events: the node name.
    pub identity: String,
    /// How long a silent holder keeps the Lease.
    pub lease_duration: Duration,
    /// How often the holder renews it, and retries failed writes. Must be
    /// well below `lease_duration`.
    pub renew_every: Duration,
}

impl ReporterOptions {
    /// The defaults of client-go's leader election, roughly: 15 s Lease,
    /// renewed every 5 s.
    pub fn new(identity: impl Into<String>) -> Self {
        Self {
            namespace: DEFAULT_NAMESPACE.to_string(),
            lease_name: DEFAULT_LEASE_NAME.to_string(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }
}

pub struct Reporter {
    client: kube::Client,
    options: ReporterOptions,
    leading: watch::Sender<bool>,
}

impl Reporter {
    pub fn new(client: kube::Client, options: ReporterOptions) -> Self {
        Self {
            client,
            options,
            leading: watch::Sender::new(false),
        }
    }

    /// Whether this agent holds the Lease (and so writes), for a metric or
    /// /debug; stays readable after [`Reporter::run`] returns (false then).
    pub fn leadership(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }

    /// Elects, renews and writes until `reports`' sender is dropped, then
    /// releases the Lease so another agent need not wait for it to expire.
    /// Never fails: API errors are logged and retried.
    pub async fn run(self, mut reports: watch::Receiver<Vec<ObjectReport>>) {
        let options = &self.options;
        let mut lock = lease::LeaseLock::new(
            self.client.clone(),
            &options.namespace,
            &options.lease_name,
            &options.identity,
            options.lease_duration,
            options.renew_every,
        );
        let mut writer = writer::Writer::new(self.client.clone(), &options.identity);
        loop {
            let (leading, wait) = match lock.round().await {
                Ok(lease::Round::Leading) => (true, options.renew_every),
                Ok(lease::Round::Following { retry_in }) => (false, retry_in),
                Err(e) => {
                    warn!(error = %error_chain(&e), "status Lease; not writing status until it is held");
                    (false, options.renew_every)
                }
            };
            self.set_leading(leading);
            if !leading {
                writer.forget();
            }
            let next_round = Instant::now() + wait;
            // Each round's pass also retries what failed before.
            let mut pass = leading;
            loop {
                if pass {
                    let current = reports.borrow_and_update().clone();
                    writer.sync(&current, next_round).await;
                }
                tokio::select! {
                    () = tokio::time::sleep_until(next_round) => break,
                    result = reports.changed() => {
                        if result.is_err() {
                            self.shut_down(&mut lock).await;
                            return;
                        }
                        pass = leading;
                    }
                }
            }
        }
    }

    async fn shut_down(&self, lock: &mut lease::LeaseLock) {
        if let Err(e) = lock.release().await {
            warn!(error = %error_chain(&e), "releasing the status Lease; it will expire");
        }
        self.set_leading(false);
    }

    fn set_leading(&self, leading: bool) {
        let changed = self.leading.send_if_modified(|was| {
            let changed = *was != leading;
            *was = leading;
            changed
        });
        if changed {
            let lease = format!("{}/{}", self.options.namespace, self.options.lease_name);
            if leading {
                info!(%lease, "holding the status Lease: this agent writes policy status");
            } else {
                info!(%lease, "not holding the status Lease");
            }
        }
    }
}

#[cfg(test)]
mod tests;
