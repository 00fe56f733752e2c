//! The flow API on TCP requires mutual TLS: a client with a certificate from the configured CA gets
//! in; one without a certificate, or with a certificate from another CA, does not.

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use ztrust_agent::observer::client::{ClientTls, connect_tls};
use ztrust_agent::observer::proto::ServerStatusRequest;
use ztrust_agent::observer::proto::observer_client::ObserverClient;
use ztrust_agent::observer::{Hub, HubOptions, TlsFiles, server};

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { params, key, pem }
}

/// A leaf certificate and key (PEM) signed by `ca`.
fn leaf(ca: &Ca, server: bool) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    (
        params.signed_by(&key, &issuer).unwrap().pem(),
        key.serialize_pem(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test]
async fn client_certificates_are_required() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let (server_cert, server_key) = leaf(&ca, true);
    let (client_cert, client_key) = leaf(&ca, false);
    let other = self::ca();
    let (rogue_cert, rogue_key) = leaf(&other, false);
    let files = TlsFiles {
        cert: write(dir.path(), "server.pem", &server_cert),
        key: write(dir.path(), "server-key.pem", &server_key),
        client_ca: write(dir.path(), "ca.pem", &ca.pem),
    };
    let hub = Arc::new(Hub::new(HubOptions {
        node: "tls".into(),
        ..Default::default()
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        server::serve_tcp(
            server::ObserverService::new(hub),
            listener,
            &files,
            std::future::pending(),
        )
        .await
    });

    let tls = |cert: &str, key: &str| ClientTls {
        ca: dir.path().join("ca.pem"),
        cert: write(dir.path(), &format!("{}.pem", cert.len()), cert),
        key: write(dir.path(), &format!("{}-key.pem", key.len()), key),
        domain: Some("localhost".into()),
    };

    let mut good = connect_tls(&addr.to_string(), &tls(&client_cert, &client_key))
        .await
        .unwrap();
    let st = good
        .server_status(ServerStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.node_name, "tls");

    // A certificate from another CA: the handshake (or the first call) fails.
    let rogue = match connect_tls(&addr.to_string(), &tls(&rogue_cert, &rogue_key)).await {
        Ok(mut c) => c.server_status(ServerStatusRequest {}).await.is_err(),
        Err(_) => true,
    };
    assert!(rogue, "a client certificate from another CA is refused");

    // No client certificate at all.
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    let anonymous = match Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(config)
        .unwrap()
        .connect()
        .await
    {
        Ok(ch) => ObserverClient::new(ch)
            .server_status(ServerStatusRequest {})
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(anonymous, "a client without a certificate is refused");
}
