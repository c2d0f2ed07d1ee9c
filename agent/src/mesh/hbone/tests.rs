//! HBONE end to end on 127.0.0.1: real TLS 1.3 and HTTP/2, certificates
//! from throwaway CAs.

mod support;

use std::{net::IpAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use self::support::*;
use super::{
    tls::{client_config, Presenter},
    verify::PeerCheck,
    HboneError, HbonePool, Refusal, TunnelRegistry, ALPN_H2,
};
use crate::identity::revocation::{RevocationView, Revoked};

fn pool(trust: &Trust) -> HbonePool {
    HbonePool::new(trust.inputs.clone(), TunnelRegistry::new())
}

/// Reads until the end: `true` if the stream ended (EOF or error).
async fn ended<S: AsyncReadExt + Unpin>(stream: &mut S) -> bool {
    let mut buf = [0; 64];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return true,
            Ok(_) => continue,
        }
    }
}

#[tokio::test]
async fn a_tunnel_carries_bytes_both_ways_between_authenticated_identities() {
    let ca = Ca::new("r1");
    let trust = Trust::new(ca.bundle());
    let (db, web) = (Identity::new(&ca, "db"), Identity::new(&ca, "web"));
    let mut server = Server::start(&db, &trust, None).await;
    let pool = pool(&trust);

    let mut stream = open_tunnel(&pool, &web.local, server.addr, Some(db.id()))
        .await
        .unwrap();
    assert_eq!(stream.peer.id, *db.id());
    assert_eq!(stream.peer.serial, db.serial());
    assert!(!stream.reused);

    let seen = server.request().await;
    assert_eq!(seen.peer.id, *web.id());
    assert_eq!(seen.peer.serial, web.serial());
    assert_eq!(seen.authority, target());
    assert_eq!(seen.forwarded_for, Some(client_ip()));
    assert!(seen.from.ip().is_loopback());

    let mut app = server.app().await;
    round_trip(&mut stream, &mut app, "hello").await;
    // Half-close: the client's end reaches the app, which can still answer.
    stream.shutdown().await.unwrap();
    assert!(within("EOF at the app", ended(&mut app)).await);
    app.write_all(b"last words").await.unwrap();
    drop(app);
    let mut rest = Vec::new();
    within("the rest", stream.read_to_end(&mut rest))
        .await
        .unwrap();
    assert_eq!(rest, b"last words");
}

#[tokio::test]
async fn opens_from_one_source_to_one_peer_share_a_connection() {
    let ca = Ca::new("r1");
    let trust = Trust::new(ca.bundle());
    let (db, web, api) = (
        Identity::new(&ca, "db"),
        Identity::new(&ca, "web"),
        Identity::new(&ca, "api"),
    );
    let mut server = Server::start(&db, &trust, None).await;
    let pool = pool(&trust);
    let v6: IpAddr = "2001:db8::7".parse().unwrap();

    let addr = server.addr;
    let open = |source, forwarded| pool.open(source, addr, target(), forwarded, None, dial(addr));
    let mut first = within("first", open(&web.local, client_ip()))
        .await
        .unwrap();
    let mut second = within("second", open(&web.local, v6)).await.unwrap();
    assert!(!first.reused);
    assert!(second.reused);
    assert_eq!(server.accepted(), 1, "one handshake for both");
    assert_eq!(server.request().await.forwarded_for, Some(client_ip()));
    assert_eq!(server.request().await.forwarded_for, Some(v6));
    let (mut app1, mut app2) = (server.app().await, server.app().await);
    round_trip(&mut first, &mut app1, "one").await;
    round_trip(&mut second, &mut app2, "two").await;
    assert_eq!(server.registry.active(), 2);
    assert_eq!(server.registry.connections(), 1);

    let third = within("another source", open(&api.local, client_ip()))
        .await
        .unwrap();
    assert!(!third.reused);
    assert_eq!(server.accepted(), 2);
    assert_eq!(server.request().await.peer.id, *api.id());
    assert_eq!(pool.connections(), 2);
}

#[tokio::test]
async fn a_peer_from_another_root_is_refused_on_either_side() {
    let ca = Ca::new("r1");
    let stranger = Ca::new("r2");
    let trust = Trust::new(ca.bundle());
    let db = Identity::new(&ca, "db");
    let mut server = Server::start(&db, &trust, None).await;

    // A client certificate from another root, with the same identity form.
    let forged = Identity::new(&stranger, "web");
    let e = open_tunnel(&pool(&trust), &forged.local, server.addr, None)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "refused_by_peer", "{e:?}");
    let refused = server.outcome().await.unwrap_err();
    assert_eq!(refused.reason(), "peer_untrusted", "{refused:?}");
    assert_eq!(
        server
            .app_connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );

    // A server certificate from another root.
    let impostor = Identity::new(&stranger, "db");
    let mut fake = Server::start(&impostor, &trust, None).await;
    let web = Identity::new(&ca, "web");
    let e = open_tunnel(&pool(&trust), &web.local, fake.addr, None)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "peer_untrusted", "{e:?}");
    assert!(matches!(
        e,
        HboneError::Peer {
            source: super::PeerError::Chain { .. },
            ..
        }
    ));
    assert!(fake.outcome().await.is_err());
}

#[tokio::test]
async fn a_revoked_client_or_unknown_revocations_are_refused() {
    let ca = Ca::new("r1");
    let client_trust = Trust::new(ca.bundle());
    let server_trust = Trust::new(ca.bundle());
    let (db, web, api) = (
        Identity::new(&ca, "db"),
        Identity::new(&ca, "web"),
        Identity::new(&ca, "api"),
    );
    let mut server = Server::start(&db, &server_trust, None).await;
    let pool = pool(&client_trust);
    let addr = server.addr;

    server_trust.revoke(Revoked::Identity(web.id().clone()));
    assert!(open_tunnel(&pool, &web.local, addr, None).await.is_err());
    let refused = server.outcome().await.unwrap_err();
    assert_eq!(refused.reason(), "peer_revoked", "{refused:?}");

    // Others still pass.
    open_tunnel(&pool, &api.local, addr, None).await.unwrap();

    server_trust
        .revocations
        .send_replace(RevocationView::Unknown {
            why: "the list is stale".into(),
        });
    let other = Identity::new(&ca, "other");
    assert!(open_tunnel(&pool, &other.local, addr, None).await.is_err());
    let refused = server.outcome().await.unwrap_err();
    assert_eq!(refused.reason(), "revocations_unknown", "{refused:?}");

    // The client refuses a server whose serial is revoked.
    client_trust.revoke(Revoked::Serial(db.serial()));
    let e = open_tunnel(&pool, &Identity::new(&ca, "late").local, addr, None)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "peer_revoked", "{e:?}");
}

#[tokio::test]
async fn a_revocation_closes_the_revoked_peers_tunnels_within_two_seconds() {
    let ca = Ca::new("r1");
    let trust = Trust::new(ca.bundle());
    let (db, web, api) = (
        Identity::new(&ca, "db"),
        Identity::new(&ca, "web"),
        Identity::new(&ca, "api"),
    );
    let mut server = Server::start(&db, &trust, None).await;
    let pool = pool(&trust);
    let addr = server.addr;
    let mut revoked = open_tunnel(&pool, &web.local, addr, None).await.unwrap();
    let mut revoked_app = server.app().await;
    let mut kept = open_tunnel(&pool, &api.local, addr, None).await.unwrap();
    let mut kept_app = server.app().await;
    round_trip(&mut revoked, &mut revoked_app, "before").await;
    round_trip(&mut kept, &mut kept_app, "before").await;
    assert_eq!(server.registry.active(), 2);

    let changed = Instant::now();
    trust.revoke(Revoked::Identity(web.id().clone()));
    let deadline = changed + Duration::from_secs(2);
    let (client_end, app_end) = tokio::join!(
        tokio::time::timeout_at(deadline, ended(&mut revoked)),
        tokio::time::timeout_at(deadline, ended(&mut revoked_app)),
    );
    assert!(client_end.is_ok(), "the client still reads after 2 s");
    assert!(app_end.is_ok(), "the app still reads after 2 s");

    let closed = server.outcome().await.unwrap_err();
    assert_eq!(closed.reason(), "peer_revoked", "{closed:?}");
    round_trip(&mut kept, &mut kept_app, "after").await;
    assert_eq!(server.registry.active(), 1);
}

#[tokio::test]
async fn a_renewal_keeps_live_streams_and_new_opens_handshake_with_the_new_certificate() {
    let ca = Ca::new("r1");
    let trust = Trust::new(ca.bundle());
    let (db, web) = (Identity::new(&ca, "db"), Identity::new(&ca, "web"));
    let mut server = Server::start(&db, &trust, None).await;
    let pool = pool(&trust);
    let addr = server.addr;
    let mut live = open_tunnel(&pool, &web.local, addr, None).await.unwrap();
    let old = server.request().await.peer.serial;
    let mut live_app = server.app().await;
    round_trip(&mut live, &mut live_app, "before").await;

    let renewed = web.renew(&ca);
    let server_renewed = db.renew(&ca);
    assert_ne!(renewed, old);
    round_trip(&mut live, &mut live_app, "during").await;

    let mut fresh = open_tunnel(&pool, &web.local, addr, None).await.unwrap();
    assert!(!fresh.reused, "a new certificate needs a new handshake");
    assert_eq!(fresh.peer.serial, server_renewed);
    assert_eq!(server.request().await.peer.serial, renewed);
    assert_eq!(server.accepted(), 2);
    let mut fresh_app = server.app().await;
    round_trip(&mut fresh, &mut fresh_app, "new").await;
    round_trip(&mut live, &mut live_app, "after").await;
}

#[tokio::test]
async fn a_wrong_peer_or_a_refusal_fails_the_open_and_nothing_reaches_the_app() {
    let ca = Ca::new("r1");
    let trust = Trust::new(ca.bundle());
    let (db, web) = (Identity::new(&ca, "db"), Identity::new(&ca, "web"));
    let mut server = Server::start(&db, &trust, None).await;
    let pool = pool(&trust);
    let other = id("cache");
    let addr = server.addr;

    let e = open_tunnel(&pool, &web.local, addr, Some(&other))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "wrong_peer", "{e:?}");
    assert!(server.outcome().await.is_err());
    // On a pooled connection too, without a new handshake.
    open_tunnel(&pool, &web.local, addr, Some(db.id()))
        .await
        .unwrap();
    let e = open_tunnel(&pool, &web.local, addr, Some(&other))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "wrong_peer", "{e:?}");
    assert_eq!(server.accepted(), 2);

    let mut refusing = Server::start(
        &db,
        &trust,
        Some(Refusal {
            status: hyper::StatusCode::FORBIDDEN,
            reason: "policy_denied",
            message: "no policy allows web".into(),
        }),
    )
    .await;
    let e = open_tunnel(&pool, &web.local, refusing.addr, None)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "refused", "{e:?}");
    assert_eq!(e.status(), Some(hyper::StatusCode::FORBIDDEN));
    assert_eq!(refusing.request().await.peer.id, *web.id());
    assert_eq!(
        refusing
            .app_connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn plain_http_and_clients_without_h2_are_refused() {
    let ca = Ca::new("r1");
    let trust = Trust::new(ca.bundle());
    let (db, web) = (Identity::new(&ca, "db"), Identity::new(&ca, "web"));
    let mut server = Server::start(&db, &trust, None).await;

    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: db\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = within("the server to close", plain.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
    let e = server.outcome().await.unwrap_err();
    assert_eq!(e.reason(), "tls_handshake", "{e:?}");

    for alpn in [vec![b"http/1.1".to_vec()], vec![]] {
        let check = PeerCheck::new(trust.inputs.clone(), None);
        let mut config = client_config(Presenter::new(&web.local), check).unwrap();
        config.alpn_protocols = alpn.clone();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::IpAddress(server.addr.ip().into());
        // Refused in the handshake (no common protocol) or right after.
        if let Ok(mut tls) = within("handshake", connector.connect(name, tcp)).await {
            assert_ne!(tls.get_ref().1.alpn_protocol(), Some(ALPN_H2));
            assert!(within("the server to close", ended(&mut tls)).await);
        }
        let e = server.outcome().await.unwrap_err();
        assert_eq!(e.reason(), "alpn", "{alpn:?}: {e:?}");
    }
}

#[tokio::test]
async fn an_idle_connection_leaves_the_pool() {
    let ca = Ca::new("r1");
    let trust = Trust::new(ca.bundle());
    let (db, web) = (Identity::new(&ca, "db"), Identity::new(&ca, "web"));
    let mut server = Server::start(&db, &trust, None).await;
    let pool = pool(&trust).with_idle_timeout(Duration::from_millis(300));
    let addr = server.addr;
    let mut stream = open_tunnel(&pool, &web.local, addr, None).await.unwrap();
    let mut app = server.app().await;
    round_trip(&mut stream, &mut app, "hi").await;
    drop(stream);
    // The client closes it: the server's side ends.
    let _ = server.outcome().await;
    let again = open_tunnel(&pool, &web.local, addr, None).await.unwrap();
    assert!(!again.reused);
    assert_eq!(server.accepted(), 2);
}

#[tokio::test]
async fn without_a_certificate_or_a_bundle_nothing_is_dialled() {
    let ca = Ca::new("r1");
    let trust = Trust::new(ca.bundle());
    let web = Identity::new(&ca, "web");
    let never =
        || -> futures::future::BoxFuture<'static, std::io::Result<TcpStream>> { panic!("dialled") };
    let addr = "127.0.0.1:15008".parse().unwrap();

    let mut nobody = web.local.clone();
    nobody.id = id("nobody");
    let e = pool(&trust)
        .open(&nobody, addr, target(), client_ip(), None, never)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "no_certificate", "{e:?}");

    trust.bundle.send_replace(None);
    let pool = pool(&trust);
    let opening = pool.open(&web.local, addr, target(), client_ip(), None, never);
    // The agent spawns opens: the future must be Send.
    fn send<T: Send>(t: T) -> T {
        t
    }
    let e = send(opening).await.unwrap_err();
    assert_eq!(e.reason(), "no_trust_bundle", "{e:?}");
}
