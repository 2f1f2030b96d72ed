// SPDX-License-Identifier: MPL-2.0
//! Trickle client over HTTPS (`docs/trickle.md`, publisher rule P10, subscriber rule S10): against
//! a self-signed server, the client works with certificate verification off and refuses the server
//! with it on.

mod protocol_common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gsttrickle::protocol::client::{
    ClientError, Publisher, PublisherConfig, SegmentOutcome, Subscriber, SubscriberConfig,
};
use gsttrickle::protocol::server::{ServerConfig, TrickleServer};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use protocol_common::bounded;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

// A self-signed test certificate (CN=localhost, SAN IP:127.0.0.1, valid for 100 years), made
// with:
//   openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
//     -keyout key.pem -out cert.pem -days 36500 -subj /CN=localhost \
//     -addext "subjectAltName=IP:127.0.0.1,DNS:localhost"
const CERT_PEM: &str = "-----BEGIN CERTIFICATE-----\n\
MIIBnDCCAUGgAwIBAgIURfVwhFfrGPQH47BFDaVUAajuXewwCgYIKoZIzj0EAwIw\n\
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyMjE5MzcxN1oYDzIxMjYxMDI5\n\
MTkzNzE3WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO\n\
PQMBBwNCAATZHaHfFmqmIW3fOt2yjCdSqlrjqNxlpFWRVMs33gdYDjOhQnSYiBNQ\n\
HWASXIYdU0Tgw/0EOZS2RiYQZPySeCRoo28wbTAdBgNVHQ4EFgQUWD0x1rbzadDL\n\
qRUCBY4MYIxuHe0wHwYDVR0jBBgwFoAUWD0x1rbzadDLqRUCBY4MYIxuHe0wDwYD\n\
VR0TAQH/BAUwAwEB/zAaBgNVHREEEzARhwR/AAABgglsb2NhbGhvc3QwCgYIKoZI\n\
zj0EAwIDSQAwRgIhAJxlbyrrgmKy8BZpcs6rl8Ws2NbzbbKnboDQZID3I4cqAiEA\n\
wY5IRpA1qus/PFN4CyUpa7QLX/4gp1e8TAhrG4VJ0Uk=\n\
-----END CERTIFICATE-----";
const KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgP2MVvRb+Cbs/4t5d\n\
sd+87NkiAUWK9R/F1btu5R3q5TahRANCAATZHaHfFmqmIW3fOt2yjCdSqlrjqNxl\n\
pFWRVMs33gdYDjOhQnSYiBNQHWASXIYdU0Tgw/0EOZS2RiYQZPySeCRo\n\
-----END PRIVATE KEY-----";

/// The trickle router behind rustls on 127.0.0.1:0.
async fn start_https(server: &TrickleServer) -> SocketAddr {
    let cert = CertificateDer::from_pem_slice(CERT_PEM.as_bytes()).expect("test cert");
    let key = PrivateKeyDer::from_pem_slice(KEY_PEM.as_bytes()).expect("test key");
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("TLS config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = server.router();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let service = TowerToHyperService::new(router.clone());
            tokio::spawn(async move {
                // A client refusing the certificate aborts the handshake: nothing to serve.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn verification_off_accepts_a_self_signed_server() {
    let server = TrickleServer::new(ServerConfig::default());
    server.create_channel("secure", "application/json").unwrap();
    let addr = start_https(&server).await;
    let url = format!("https://{addr}/secure");
    let mut publisher = Publisher::new(
        &url,
        PublisherConfig {
            tls_verify: false,
            mime: "application/json".to_owned(),
            ..PublisherConfig::default()
        },
    )
    .unwrap();
    assert_eq!(
        bounded(
            "send",
            publisher.send_message(Bytes::from_static(b"{\"a\":1}"))
        )
        .await
        .unwrap(),
        SegmentOutcome::Done
    );
    let mut sub = Subscriber::new(
        &url,
        SubscriberConfig {
            start_seq: 0,
            tls_verify: false,
            ..SubscriberConfig::default()
        },
    )
    .unwrap();
    let seg = bounded("segment", sub.next_segment())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seg.content_type(), Some("application/json"));
    assert_eq!(&seg.read_all(1024).await.unwrap()[..], b"{\"a\":1}");
    bounded("close", publisher.close()).await.unwrap();
    assert!(server.channel_names().is_empty());
}

#[tokio::test]
async fn verification_on_refuses_a_self_signed_server() {
    let server = TrickleServer::new(ServerConfig::default());
    server.create_channel("secure", "video/MP2T").unwrap();
    let addr = start_https(&server).await;
    let url = format!("https://{addr}/secure");
    let mut sub = Subscriber::new(
        &url,
        SubscriberConfig {
            start_seq: 0,
            max_retries: 2,
            retry_pause: Duration::from_millis(10),
            ..SubscriberConfig::default()
        },
    )
    .unwrap();
    match bounded("refusal", sub.next_segment()).await {
        Err(ClientError::RetriesExhausted { url: u, last, .. }) => {
            assert_eq!(u, format!("{url}/0"));
            assert!(last.to_lowercase().contains("certificate"), "{last}");
        }
        other => panic!("expected a certificate failure, got {other:?}"),
    }
    let mut publisher = Publisher::new(
        &url,
        PublisherConfig {
            retry_pause: Duration::from_millis(10),
            ..PublisherConfig::default()
        },
    )
    .unwrap();
    let r = bounded("publish", publisher.send_message(Bytes::from_static(b"x"))).await;
    match r {
        Err(ClientError::RetriesExhausted { last, .. }) => {
            assert!(last.to_lowercase().contains("certificate"), "{last}")
        }
        other => panic!("expected a certificate failure, got {other:?}"),
    }
    // Nothing reached the channel.
    assert_eq!(server.channel_info("secure").unwrap().next_write, 0);
}
