//! The identity state both the CA and the agents read from the API server:
//! `PortcullisRevocation` objects and the trust bundle ConfigMap, each kept
//! current by a watch and published on a `tokio::sync::watch` channel.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    runtime::{
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Api, Client, ResourceExt as _,
};
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tracing::warn;

use super::{
    bundle::TrustBundle,
    revocation::{RevocationSet, RevocationView},
};
use crate::crd::PortcullisRevocation;

/// The key of the trust bundle ConfigMap that holds the roots (PEM).
pub const BUNDLE_KEY: &str = "roots.pem";
/// The trust bundle ConfigMap's name, in the CA's namespace.
pub const BUNDLE_CONFIGMAP: &str = "portcullis-trust-bundle";

/// How long a synced revocation list stays trusted while its watch fails.
/// Past this its status is unknown, and unknown fails closed.
pub const DEFAULT_REVOCATION_STALENESS: Duration = Duration::from_secs(300);

/// Watches every `PortcullisRevocation`. The view is unknown until the
/// first list completes, and again once the watch has failed for longer
/// than `staleness`.
pub fn watch_revocations(
    client: Client,
    staleness: Duration,
) -> (watch::Receiver<RevocationView>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(RevocationView::default());
    let task = tokio::spawn(async move {
        let api: Api<PortcullisRevocation> = Api::all(client);
        let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
        futures::pin_mut!(stream);
        let mut known: BTreeMap<String, PortcullisRevocation> = BTreeMap::new();
        let mut listing: BTreeMap<String, PortcullisRevocation> = BTreeMap::new();
        let mut synced = false;
        let mut failing_since: Option<Instant> = None;
        loop {
            // Wake up to mark a failing view stale even without events.
            let next = match failing_since {
                Some(since) if synced => {
                    tokio::time::timeout_at(since + staleness, stream.next()).await
                }
                _ => Ok(stream.next().await),
            };
            let event = match next {
                Ok(Some(event)) => event,
                Ok(None) => return,
                Err(_elapsed) => {
                    tx.send_replace(RevocationView::Unknown {
                        why: format!("the revocation watch has failed for more than {staleness:?}"),
                    });
                    failing_since = None;
                    synced = false;
                    continue;
                }
            };
            match event {
                Ok(Event::Init) => listing.clear(),
                Ok(Event::InitApply(o)) => {
                    listing.insert(o.name_any(), o);
                }
                Ok(Event::InitDone) => {
                    known = std::mem::take(&mut listing);
                    synced = true;
                    failing_since = None;
                    tx.send_replace(view_of(&known));
                }
                Ok(Event::Apply(o)) => {
                    failing_since = None;
                    known.insert(o.name_any(), o);
                    if synced {
                        tx.send_replace(view_of(&known));
                    }
                }
                Ok(Event::Delete(o)) => {
                    failing_since = None;
                    known.remove(&o.name_any());
                    if synced {
                        tx.send_replace(view_of(&known));
                    }
                }
                Err(e) => {
                    warn!("watching PortcullisRevocations: {e}");
                    failing_since.get_or_insert_with(Instant::now);
                }
            }
        }
    });
    (rx, task)
}

/// The set the objects name. An object whose target does not parse can
/// match no certificate Portcullis issues, so it is reported and skipped
/// (the API server's schema stops most of these at `kubectl apply`).
fn view_of(objects: &BTreeMap<String, PortcullisRevocation>) -> RevocationView {
    let mut set = RevocationSet::default();
    for (name, object) in objects {
        match object.spec.spec.revoked() {
            Ok(revoked) => set.insert(revoked, object.spec.spec.reason.clone().unwrap_or_default()),
            Err(e) => warn!("PortcullisRevocation {name}: spec.{e}; it revokes nothing"),
        }
    }
    RevocationView::Known(Arc::new(set))
}

/// The versions of one named object, as a watch sees them (retried with
/// backoff): the Secret the CA reads its keys from, the bundle ConfigMap.
pub fn watch_one<K>(
    api: Api<K>,
    name: &str,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher::watcher(api, config)
        .default_backoff()
        .applied_objects()
}

/// Watches the trust bundle ConfigMap `namespace/name`. `None` until a
/// valid bundle is seen; an invalid or emptied one keeps the last valid
/// bundle (with a warning), so a bad edit cannot make every peer untrusted
/// or trust nothing new.
pub fn watch_bundle(
    client: Client,
    namespace: &str,
    name: &str,
) -> (watch::Receiver<Option<TrustBundle>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let what = format!("ConfigMap {namespace}/{name}");
    let stream = watch_one(Api::<ConfigMap>::namespaced(client, namespace), name);
    let task = tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            let map = match event {
                Ok(map) => map,
                Err(e) => {
                    warn!("watching the trust bundle {what}: {e}");
                    continue;
                }
            };
            let pem = map
                .data
                .as_ref()
                .and_then(|d| d.get(BUNDLE_KEY))
                .cloned()
                .unwrap_or_default();
            match TrustBundle::from_pem(&pem, &format!("{what} key {BUNDLE_KEY}")) {
                Ok(bundle) => {
                    tx.send_if_modified(|current| {
                        let changed = current.as_ref() != Some(&bundle);
                        *current = Some(bundle);
                        changed
                    });
                }
                Err(e) => warn!(
                    "{}; keeping the last valid trust bundle",
                    crate::source::file::error_chain(&e)
                ),
            }
        }
    });
    (rx, task)
}
