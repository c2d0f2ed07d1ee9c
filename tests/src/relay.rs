//! A TCP relay between one client and the API server that a test can cut
//! and heal: a network partition between a node and the control plane,
//! while the API server stays up and writable for everyone else.
//!
//! Stopping the API server cannot give that: nobody can change anything
//! while it is down, so "a change made while the agent was not looking"
//! needs the agent cut off alone.

use std::net::SocketAddr;

use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

use crate::kube_api::ControlPlane;

pub struct Relay {
    addr: SocketAddr,
    open: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Relays connections on a fresh loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port for the relay");
        let addr = listener.local_addr().expect("the relay's address");
        let (open, is_open) = watch::channel(true);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let mut is_open = is_open.clone();
                if !*is_open.borrow() {
                    // Cut: the connection closes before a byte is relayed.
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        // A cut ends open connections too (watches included).
                        _ = is_open.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Self { addr, open, task }
    }

    /// Relays to the control plane's API server.
    pub async fn to_apiserver(plane: &ControlPlane) -> Self {
        let url: http::Uri = plane.url().parse().expect("the API server's URL");
        let target = format!(
            "{}:{}",
            url.host().expect("a host"),
            url.port_u16().expect("a port")
        );
        Self::start(target.parse().expect("a socket address")).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every relayed connection and closes new ones at once.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    pub fn heal(&self) {
        self.open.send_replace(true);
    }

    /// An admin client of `plane` whose every request goes through this
    /// relay (the API server's certificate names 127.0.0.1, as the relay
    /// is).
    pub async fn client(&self, plane: &ControlPlane) -> kube::Client {
        let mut kubeconfig = Kubeconfig::read_from(plane.kubeconfig()).expect("the kubeconfig");
        for named in &mut kubeconfig.clusters {
            if let Some(cluster) = &mut named.cluster {
                cluster.server = Some(format!("https://{}", self.addr));
            }
        }
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("a valid kubeconfig");
        kube::Client::try_from(config).expect("a client")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
