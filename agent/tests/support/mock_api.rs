//! A Kubernetes API server stand-in for tests, behind kube-rs' `Client`
//! through tower-test (as kube-rs tests itself). It keeps collections of
//! objects with resource versions, answers lists and streaming watches
//! (with history and bookmarks), can go down (open watches drop, every
//! request gets 503), and records every request so tests can check what
//! the client asked for. Writes (Leases, Events, status patches) are kept
//! per object path, with resource-version conflicts as the API server has
//! them. Compaction (`410 Gone`) and missing CRDs are tested against the
//! real API server instead (tests/api_source.rs).

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use futures::channel::mpsc;
use http::{Method, Request, Response, StatusCode};
use http_body_util::StreamBody;
use hyper::body::Frame;
use serde_json::{json, Value};

pub type Chunk = Result<Frame<Bytes>, Infallible>;
pub type MockBody = StreamBody<mpsc::UnboundedReceiver<Chunk>>;

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: BTreeMap<String, String>,
    /// The JSON body of a write.
    pub body: Option<Value>,
}

impl Recorded {
    pub fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }
}

struct Collection {
    kind: &'static str,
    api_version: &'static str,
    objects: BTreeMap<String, Value>,
    /// (resource version, event type, object) in order.
    history: Vec<(u64, &'static str, Value)>,
}

struct OpenWatch {
    path: String,
    name_filter: Option<String>,
    tx: mpsc::UnboundedSender<Chunk>,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    collections: BTreeMap<String, Collection>,
    watches: Vec<OpenWatch>,
    requests: Vec<Recorded>,
    down: bool,
    /// Objects written by the client, by object path.
    written: BTreeMap<String, Value>,
}

/// The collection paths the Portcullis agent watches, with their kinds.
pub const PODS: &str = "/api/v1/pods";
pub const NAMESPACES: &str = "/api/v1/namespaces";
pub const NODES: &str = "/api/v1/nodes";
pub const SERVICES: &str = "/api/v1/services";
pub const ENDPOINT_SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const NETWORK_POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";
pub const L4_POLICIES: &str = "/apis/portcullis.dev/v1alpha1/l4policies";
pub const CLUSTER_L4_POLICIES: &str = "/apis/portcullis.dev/v1alpha1/clusterl4policies";

const KINDS: [(&str, &str, &str); 8] = [
    (PODS, "Pod", "v1"),
    (NAMESPACES, "Namespace", "v1"),
    (NODES, "Node", "v1"),
    (SERVICES, "Service", "v1"),
    (ENDPOINT_SLICES, "EndpointSlice", "discovery.k8s.io/v1"),
    (NETWORK_POLICIES, "NetworkPolicy", "networking.k8s.io/v1"),
    (L4_POLICIES, "L4Policy", "portcullis.dev/v1alpha1"),
    (
        CLUSTER_L4_POLICIES,
        "ClusterL4Policy",
        "portcullis.dev/v1alpha1",
    ),
];

#[derive(Clone)]
pub struct MockApi {
    state: Arc<Mutex<State>>,
}

fn key(object: &Value) -> String {
    let meta = &object["metadata"];
    format!(
        "{}/{}",
        meta["namespace"].as_str().unwrap_or(""),
        meta["name"].as_str().expect("objects need metadata.name")
    )
}

fn line(event: &str, object: &Value) -> Chunk {
    let mut text = serde_json::to_vec(&json!({"type": event, "object": object})).unwrap();
    text.push(b'\n');
    Ok(Frame::data(Bytes::from(text)))
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn once(code: StatusCode, body: &Value) -> Response<MockBody> {
    let (tx, rx) = mpsc::unbounded();
    tx.unbounded_send(Ok(Frame::data(Bytes::from(
        serde_json::to_vec(body).unwrap(),
    ))))
    .unwrap();
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(StreamBody::new(rx))
        .unwrap()
}

impl MockApi {
    /// A client talking to a new, empty API server (every collection the
    /// agent watches exists, as if the CRDs were installed).
    pub fn start() -> (kube::Client, MockApi) {
        let (service, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<MockBody>>();
        let mut state = State::default();
        for (path, kind, api_version) in KINDS {
            state.collections.insert(
                path.to_string(),
                Collection {
                    kind,
                    api_version,
                    objects: BTreeMap::new(),
                    history: Vec::new(),
                },
            );
        }
        let api = MockApi {
            state: Arc::new(Mutex::new(state)),
        };
        let server = api.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let body = serde_json::from_slice(&bytes).ok();
                send.send_response(server.respond(&parts.method, &parts.uri, body));
            }
        });
        (kube::Client::new(service, "default"), api)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Creates or replaces an object (ADDED or MODIFIED to watchers).
    pub fn apply(&self, path: &str, mut object: Value) {
        let mut s = self.lock();
        s.resource_version += 1;
        let rv = s.resource_version;
        let c = s.collections.get_mut(path).expect("known collection");
        object["apiVersion"] = json!(c.api_version);
        object["kind"] = json!(c.kind);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{rv:012}"));
        }
        let k = key(&object);
        let event = if c.objects.contains_key(&k) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        c.objects.insert(k, object.clone());
        c.history.push((rv, event, object.clone()));
        Self::fan_out(&mut s, path, event, &object);
    }

    pub fn delete(&self, path: &str, namespace: &str, name: &str) {
        let mut s = self.lock();
        s.resource_version += 1;
        let rv = s.resource_version;
        let c = s.collections.get_mut(path).expect("known collection");
        let mut object = c
            .objects
            .remove(&format!("{namespace}/{name}"))
            .expect("deleting an object that exists");
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        c.history.push((rv, "DELETED", object.clone()));
        Self::fan_out(&mut s, path, "DELETED", &object);
    }

    fn fan_out(s: &mut State, path: &str, event: &'static str, object: &Value) {
        s.watches.retain(|w| {
            if w.path != path {
                return true;
            }
            if w.name_filter
                .as_deref()
                .is_some_and(|n| object["metadata"]["name"] != n)
            {
                return true;
            }
            w.tx.unbounded_send(line(event, object)).is_ok()
        });
    }

    /// The newest resource version.
    pub fn current_version(&self) -> u64 {
        self.lock().resource_version
    }

    /// Sends a BOOKMARK at the current version on every open watch.
    pub fn bookmark(&self) {
        let mut s = self.lock();
        let rv = s.resource_version.to_string();
        let kinds: BTreeMap<String, (&str, &str)> = s
            .collections
            .iter()
            .map(|(p, c)| (p.clone(), (c.kind, c.api_version)))
            .collect();
        s.watches.retain(|w| {
            let (kind, api_version) = kinds[&w.path];
            let object = json!({"kind": kind, "apiVersion": api_version,
                                "metadata": {"resourceVersion": rv}});
            w.tx.unbounded_send(line("BOOKMARK", &object)).is_ok()
        });
    }

    /// Drops every open watch connection (clients re-watch).
    pub fn drop_watches(&self) {
        self.lock().watches.clear();
    }

    /// An outage: open watches drop and every request gets 503 until
    /// `set_down(false)`.
    pub fn set_down(&self, down: bool) {
        let mut s = self.lock();
        s.down = down;
        if down {
            s.watches.clear();
        }
    }

    /// A write, or a read of a written object, on an object path.
    fn write(s: &mut State, r: &Recorded) -> Response<MockBody> {
        s.resource_version += 1;
        let rv = s.resource_version.to_string();
        let mut body = r.body.clone().unwrap_or(Value::Null);
        let current = s.written.get(&r.path).cloned();
        match r.method.clone() {
            Method::GET => match current {
                Some(o) => once(StatusCode::OK, &o),
                None => once(StatusCode::NOT_FOUND, &status(404, "NotFound", "not found")),
            },
            Method::POST => {
                let name = body["metadata"]["name"].as_str().unwrap_or("").to_string();
                let path = format!("{}/{name}", r.path);
                if s.written.contains_key(&path) {
                    return once(
                        StatusCode::CONFLICT,
                        &status(409, "AlreadyExists", "already exists"),
                    );
                }
                body["metadata"]["resourceVersion"] = json!(rv);
                s.written.insert(path, body.clone());
                once(StatusCode::CREATED, &body)
            }
            Method::PUT => {
                let stale = current.as_ref().is_some_and(|c| {
                    c["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"]
                });
                if stale {
                    return once(StatusCode::CONFLICT, &status(409, "Conflict", "stale"));
                }
                body["metadata"]["resourceVersion"] = json!(rv);
                s.written.insert(r.path.clone(), body.clone());
                once(StatusCode::OK, &body)
            }
            _ => {
                // A patch: answered with the patch itself as the object.
                body["metadata"]["resourceVersion"] = json!(rv);
                s.written.insert(r.path.clone(), body.clone());
                once(StatusCode::OK, &body)
            }
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    pub fn open_watches(&self) -> usize {
        let mut s = self.lock();
        s.watches.retain(|w| !w.tx.is_closed());
        s.watches.len()
    }

    fn respond(&self, method: &Method, uri: &http::Uri, body: Option<Value>) -> Response<MockBody> {
        let query: BTreeMap<String, String> = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                Some((k.to_string(), v.replace("%3D", "=").replace("%2F", "/")))
            })
            .collect();
        let recorded = Recorded {
            method: method.clone(),
            path: uri.path().to_string(),
            query,
            body,
        };
        let mut s = self.lock();
        s.requests.push(recorded.clone());
        if s.down {
            return once(
                StatusCode::SERVICE_UNAVAILABLE,
                &status(
                    503,
                    "ServiceUnavailable",
                    "the API server is down (test outage)",
                ),
            );
        }
        if recorded.path == "/version" {
            return once(
                StatusCode::OK,
                &json!({"major": "1", "minor": "35", "gitVersion": "v1.35.0",
                        "gitCommit": "", "gitTreeState": "clean", "buildDate": "",
                        "goVersion": "", "compiler": "gc", "platform": "linux/amd64"}),
            );
        }
        if recorded.method != Method::GET || !s.collections.contains_key(&recorded.path) {
            return Self::write(&mut s, &recorded);
        }
        let name_filter = recorded
            .query
            .get("fieldSelector")
            .and_then(|f| f.strip_prefix("metadata.name="))
            .map(str::to_string);
        let current = s.resource_version;
        let Some(c) = s.collections.get(&recorded.path) else {
            return once(
                StatusCode::NOT_FOUND,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            );
        };
        let wanted = |o: &Value| {
            name_filter
                .as_deref()
                .is_none_or(|n| o["metadata"]["name"] == n)
        };
        if !recorded.is_watch() {
            let items: Vec<Value> = c.objects.values().filter(|o| wanted(o)).cloned().collect();
            return once(
                StatusCode::OK,
                &json!({"apiVersion": c.api_version, "kind": format!("{}List", c.kind),
                        "metadata": {"resourceVersion": current.to_string()},
                        "items": items}),
            );
        }
        let from: u64 = recorded
            .query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = mpsc::unbounded();
        for (rv, event, object) in &c.history {
            if *rv > from && wanted(object) {
                tx.unbounded_send(line(event, object)).unwrap();
            }
        }
        s.watches.push(OpenWatch {
            path: recorded.path.clone(),
            name_filter,
            tx,
        });
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(StreamBody::new(rx))
            .unwrap()
    }
}
