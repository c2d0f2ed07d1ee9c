//! A throwaway cluster for the HBONE tests: CAs in temporary directories,
//! identities whose certificates can be renewed, trust inputs whose
//! revocations can change, and a server on 127.0.0.1 with an app behind it.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use futures::future::BoxFuture;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

use super::super::{
    serve, HboneError, HbonePool, HboneStream, InboundHandler, InboundRequest, LocalIdentity,
    Opened, Refusal, TrustInputs, TunnelRegistry,
};
use crate::identity::{
    authority::CaDir,
    bundle::TrustBundle,
    issuer::Granted,
    manager::{credential, credential::Credential, Certificates},
    revocation::{RevocationSet, RevocationView, Revoked},
    spiffe::SpiffeId,
};

/// Generous: only the revocation test asserts a tight bound.
pub const WAIT: Duration = Duration::from_secs(10);

pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing after {WAIT:?}"))
}

pub fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", sa).unwrap()
}

/// The original destination the tests ask for (the handler ignores it).
/// The client address the tests' tunnels forward.
pub fn client_ip() -> IpAddr {
    "10.0.0.7".parse().unwrap()
}

pub fn target() -> SocketAddr {
    "10.1.2.3:5432".parse().unwrap()
}

/// A tunnel from `source` to the server at `addr` for [`target`] and
/// [`client_ip`], within the tests' patience.
pub async fn open_tunnel(
    pool: &HbonePool,
    source: &LocalIdentity,
    addr: SocketAddr,
    expected: Option<&SpiffeId>,
) -> Result<HboneStream, HboneError> {
    within(
        "open",
        pool.open(source, addr, target(), client_ip(), expected, dial(addr)),
    )
    .await
}

pub fn dial(addr: SocketAddr) -> impl FnOnce() -> BoxFuture<'static, io::Result<TcpStream>> {
    move || Box::pin(TcpStream::connect(addr))
}

pub struct Ca {
    ca: CaDir,
    _dir: tempfile::TempDir,
}

impl Ca {
    pub fn new(root: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaDir::init(dir.path().join("ca"), root).unwrap();
        Self { ca, _dir: dir }
    }

    pub fn bundle(&self) -> TrustBundle {
        self.ca.bundle().unwrap()
    }

    /// A fresh key and an hour's certificate for `id`, as the manager
    /// would hold it.
    pub fn credential(&self, id: &SpiffeId) -> Arc<Credential> {
        let request = credential::request(id).unwrap();
        let authority = self.ca.authority().unwrap();
        let issued = authority
            .issue(
                id,
                &request.csr_pem,
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .unwrap();
        let granted = Granted {
            chain_pem: issued.chain_pem,
            bundle: authority.bundle().clone(),
        };
        Arc::new(credential::accept(id, request.key, granted, SystemTime::now()).unwrap())
    }
}

/// A local identity and the watch its certificate is published on.
pub struct Identity {
    pub local: LocalIdentity,
    certificates: watch::Sender<Certificates>,
}

impl Identity {
    pub fn new(ca: &Ca, sa: &str) -> Self {
        let id = id(sa);
        let (certificates, rx) = watch::channel(Certificates::default());
        let identity = Self {
            local: LocalIdentity {
                id: id.clone(),
                certificates: rx,
            },
            certificates,
        };
        identity.renew(ca);
        identity
    }

    pub fn id(&self) -> &SpiffeId {
        &self.local.id
    }

    /// Publishes a new certificate, as a renewal does; returns its serial.
    pub fn renew(&self, ca: &Ca) -> String {
        let credential = ca.credential(&self.local.id);
        let serial = credential.info.serial.clone();
        let map = BTreeMap::from([(self.local.id.clone(), credential)]);
        self.certificates.send_replace(Arc::new(map));
        serial
    }

    pub fn serial(&self) -> String {
        self.local.certificates.borrow()[&self.local.id]
            .info
            .serial
            .clone()
    }
}

/// Trust inputs whose bundle and revocations the test changes.
pub struct Trust {
    pub inputs: TrustInputs,
    pub bundle: watch::Sender<Option<TrustBundle>>,
    pub revocations: watch::Sender<RevocationView>,
}

impl Trust {
    pub fn new(bundle: TrustBundle) -> Self {
        let (bundle, bundle_rx) = watch::channel(Some(bundle));
        let (revocations, revocations_rx) = watch::channel(RevocationView::Known(Arc::default()));
        Self {
            inputs: TrustInputs {
                trust_domain: "cluster.local".into(),
                bundle: bundle_rx,
                revocations: revocations_rx,
            },
            bundle,
            revocations,
        }
    }

    pub fn revoke(&self, what: Revoked) {
        let mut set = RevocationSet::default();
        set.insert(what, "test".into());
        self.revocations
            .send_replace(RevocationView::Known(Arc::new(set)));
    }
}

/// Records each request, then connects to the app or refuses.
struct Handler {
    app: SocketAddr,
    seen: mpsc::UnboundedSender<InboundRequest>,
    refuse: Option<Refusal>,
}

impl InboundHandler for Handler {
    fn open(&self, req: InboundRequest) -> BoxFuture<'static, Result<Opened, Refusal>> {
        let _ = self.seen.send(req);
        let (app, refuse) = (self.app, self.refuse.clone());
        Box::pin(async move {
            match refuse {
                Some(refusal) => Err(refusal),
                None => Ok(Opened {
                    app: TcpStream::connect(app).await.unwrap(),
                    keep: None,
                }),
            }
        })
    }
}

/// An HBONE server on 127.0.0.1 and the app its handler connects to.
pub struct Server {
    pub addr: SocketAddr,
    /// TCP connections accepted on the HBONE port (one per handshake).
    pub accepted: Arc<AtomicUsize>,
    /// Connections that reached the app.
    pub app_connections: Arc<AtomicUsize>,
    pub registry: TunnelRegistry,
    requests: mpsc::UnboundedReceiver<InboundRequest>,
    outcomes: mpsc::UnboundedReceiver<Result<(), HboneError>>,
    apps: mpsc::UnboundedReceiver<TcpStream>,
}

impl Server {
    pub async fn start(identity: &Identity, trust: &Trust, refuse: Option<Refusal>) -> Self {
        let app_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = app_listener.local_addr().unwrap();
        let app_connections = Arc::new(AtomicUsize::new(0));
        let (apps_tx, apps) = mpsc::unbounded_channel();
        let counted = app_connections.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = app_listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let _ = apps_tx.send(socket);
            }
        });

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen, requests) = mpsc::unbounded_channel();
        let handler: Arc<dyn InboundHandler> = Arc::new(Handler { app, seen, refuse });
        let registry = TunnelRegistry::new();
        registry.watch(trust.inputs.revocations.clone());
        let accepted = Arc::new(AtomicUsize::new(0));
        let (outcomes_tx, outcomes) = mpsc::unbounded_channel();
        let (local, inputs, reg, count) = (
            identity.local.clone(),
            trust.inputs.clone(),
            registry.clone(),
            accepted.clone(),
        );
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let served = serve(
                    tcp,
                    local.clone(),
                    inputs.clone(),
                    handler.clone(),
                    reg.clone(),
                );
                let outcomes = outcomes_tx.clone();
                tokio::spawn(async move {
                    let _ = outcomes.send(served.await);
                });
            }
        });
        Self {
            addr,
            accepted,
            app_connections,
            registry,
            requests,
            outcomes,
            apps,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// How the next connection to end ended.
    pub async fn outcome(&mut self) -> Result<(), HboneError> {
        within("a served connection to end", self.outcomes.recv())
            .await
            .unwrap()
    }

    /// The next request the handler saw.
    pub async fn request(&mut self) -> InboundRequest {
        within("a request at the handler", self.requests.recv())
            .await
            .unwrap()
    }

    /// The app's side of the next tunnel.
    pub async fn app(&mut self) -> TcpStream {
        within("a connection at the app", self.apps.recv())
            .await
            .unwrap()
    }
}

/// Bytes from the client reach the app, and back.
pub async fn round_trip(stream: &mut HboneStream, app: &mut TcpStream, what: &str) {
    let mut buf = vec![0; what.len()];
    stream.write_all(what.as_bytes()).await.unwrap();
    within("the app to read", app.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(buf, what.as_bytes());
    let answer = format!("re: {what}");
    app.write_all(answer.as_bytes()).await.unwrap();
    let mut buf = vec![0; answer.len()];
    within("the client to read", stream.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(buf, answer.as_bytes());
}
