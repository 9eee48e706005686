//! TLS and the authorization layer on a real server on 127.0.0.1: who gets
//! through the handshake, whose identity a client accepts, and what the
//! layer lets each caller call.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fabric_trust::pki::{CertificateAuthority, IssueOptions};
use fabric_trust::transport::{self, Transport};
use fabric_trust::{AuthLayer, Expect, Identity, Role, TlsCredentials};
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

struct Pki {
    ca: CertificateAuthority,
}

impl Pki {
    fn new() -> Self {
        let (ca, _) = CertificateAuthority::generate("test CA", Duration::from_secs(3600)).unwrap();
        Self { ca }
    }

    fn credentials(&self, role: Role, name: &str, options: &IssueOptions) -> TlsCredentials {
        let identity = Identity::new(role, name).unwrap();
        let issued = self.ca.issue(&identity, options).unwrap();
        TlsCredentials::from_pem(
            self.ca.certificate_pem(),
            Some((&issued.certificate_pem, &issued.key_pem)),
        )
        .unwrap()
    }

    fn transport(&self, role: Role, name: &str) -> Transport {
        Transport::Tls(Arc::new(self.credentials(
            role,
            name,
            &IssueOptions::default(),
        )))
    }

    fn anonymous(&self) -> Transport {
        Transport::Tls(Arc::new(
            TlsCredentials::from_pem(self.ca.certificate_pem(), None).unwrap(),
        ))
    }
}

/// A server with health and reflection behind the layer; returns its address.
async fn serve(transport: Transport) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("https://{}", listener.local_addr().unwrap());
    let standard = fabric_proto::standard::StandardServices::new(&[], "a test server")
        .await
        .unwrap();
    standard.readiness.set_serving().await;
    let incoming = transport::incoming(listener, &transport).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let layer = AuthLayer::for_transport(&transport, None);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(layer)
            .add_routes(standard.routes)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (address, stop)
}

async fn health(address: &str, transport: &Transport, expect: Expect) -> Result<(), String> {
    let endpoint = Endpoint::from_shared(address.to_owned()).unwrap();
    let channel = transport::connect(endpoint, transport, expect)
        .await
        .map_err(|err| format!("{err:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|status| format!("{status:?}"))
}

async fn reflection(address: &str, transport: &Transport) -> Result<(), tonic::Status> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    let endpoint = Endpoint::from_shared(address.to_owned()).unwrap();
    let channel = transport::connect(endpoint, transport, Expect::AnyNode)
        .await
        .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    stream.message().await?;
    Ok(())
}

#[tokio::test]
async fn mutual_tls_admits_fabric_certificates_and_checks_the_servers_identity() {
    let pki = Pki::new();
    let (address, _stop) = serve(pki.transport(Role::Node, "n1")).await;

    // A fabric client reaches node n1, and its reflection.
    let operator = pki.transport(Role::Operator, "alice");
    health(&address, &operator, Expect::Node("n1".into()))
        .await
        .unwrap();
    reflection(&address, &operator).await.unwrap();

    // Expecting another identity, the client refuses the server.
    let error = health(&address, &operator, Expect::Node("n2".into()))
        .await
        .unwrap_err();
    assert!(
        error.contains("node/n1") && error.contains("node/n2"),
        "{error}"
    );
    let error = health(&address, &operator, Expect::Coordinator)
        .await
        .unwrap_err();
    assert!(error.contains("a coordinator"), "{error}");

    // Without a certificate: health only.
    let anonymous = pki.anonymous();
    health(&address, &anonymous, Expect::AnyNode).await.unwrap();
    let refused = reflection(&address, &anonymous).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("no client certificate or token"),
        "{refused:?}"
    );

    // Plaintext against a TLS server: no answer at all.
    let error = health(
        &address.replace("https", "http"),
        &Transport::InsecurePlaintext,
        Expect::AnyNode,
    )
    .await
    .unwrap_err();
    assert!(!error.is_empty());
}

#[tokio::test]
async fn a_foreign_ca_or_an_expired_certificate_is_refused() {
    let pki = Pki::new();
    let (address, _stop) = serve(pki.transport(Role::Node, "n1")).await;

    // A client whose certificate comes from another CA (but which trusts
    // ours, so only the server's check can stop it).
    let foreign = Pki::new();
    let identity = Identity::new(Role::Operator, "mallory").unwrap();
    let issued = foreign
        .ca
        .issue(&identity, &IssueOptions::default())
        .unwrap();
    let mixed = Transport::Tls(Arc::new(
        // Refused at load: not issued by this CA.
        TlsCredentials::from_pem(
            pki.ca.certificate_pem(),
            Some((&issued.certificate_pem, &issued.key_pem)),
        )
        .unwrap_or_else(|err| {
            assert!(err.to_string().contains("not issued by this CA"), "{err}");
            // Built the way an attacker would: trust the foreign CA for
            // its own loading, then talk to the real server.
            let mut both = foreign.ca.certificate_pem().to_owned();
            both.push_str(pki.ca.certificate_pem());
            TlsCredentials::from_pem(&both, Some((&issued.certificate_pem, &issued.key_pem)))
                .unwrap()
        }),
    ));
    assert!(health(&address, &mixed, Expect::AnyNode).await.is_err());

    // An expired certificate of the right CA.
    let expired = IssueOptions {
        not_before: SystemTime::now() - Duration::from_secs(7200),
        not_after: SystemTime::now() - Duration::from_secs(3600),
        ..IssueOptions::default()
    };
    let identity = Identity::new(Role::Operator, "late").unwrap();
    let issued = pki.ca.issue(&identity, &expired).unwrap();
    let error = TlsCredentials::from_pem(
        pki.ca.certificate_pem(),
        Some((&issued.certificate_pem, &issued.key_pem)),
    )
    .unwrap_err();
    assert!(error.to_string().contains("expired"), "{error}");
}

#[tokio::test]
async fn a_server_with_a_foreign_certificate_is_refused_by_the_client() {
    let pki = Pki::new();
    let foreign = Pki::new();
    let (address, _stop) = serve(foreign.transport(Role::Node, "n1")).await;
    let operator = pki.transport(Role::Operator, "alice");
    let error = health(&address, &operator, Expect::Node("n1".into()))
        .await
        .unwrap_err();
    assert!(error.contains("UnknownIssuer"), "{error}");
}
