//! The generated API: messages round-trip, and a server built with the
//! standard services answers health checks and lists the fabric services
//! through reflection (v1 and v1alpha).

#![allow(clippy::unwrap_used)]

use fabric_proto::service_names;
use fabric_proto::standard::StandardServices;
use fabric_proto::v1::{EntryKind, Snapshot, SnapshotStats, Tree, TreeEntry};
use prost::Message;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[test]
fn messages_round_trip_through_encoding() {
    let tree = Tree {
        entries: vec![TreeEntry {
            name: "caf\u{e9} \u{1f600}".as_bytes().to_vec(),
            kind: EntryKind::File as i32,
            mode: 0o100644,
            size: 42,
            chunk_ids: vec![vec![7; 32], vec![9; 32]],
            mtime_ns: -1_500_000_000,
            ..Default::default()
        }],
        parts: Vec::new(),
    };
    let decoded = Tree::decode(tree.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded, tree);

    let snapshot = Snapshot {
        id: "0123456789abcdef0123456789abcdef".into(),
        name: "db/2026-11-23-Mon/h1-2026-11-23-Mon-03:24:57".into(),
        tags: vec!["daily".into()],
        stats: Some(SnapshotStats {
            files: 3,
            ..Default::default()
        }),
        ..Default::default()
    };
    let decoded = Snapshot::decode(snapshot.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded, snapshot);
}

async fn start_server() -> (String, fabric_proto::standard::Readiness) {
    let standard = StandardServices::new(&[service_names::STORAGE], "a test storage node")
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let routes = standard.routes;
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (address, standard.readiness)
}

async fn channel(address: &str) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(address.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn health(address: &str, service: &str) -> ServingStatus {
    let mut client = HealthClient::new(channel(address).await);
    let response = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap();
    response.into_inner().status()
}

#[tokio::test]
async fn health_is_not_serving_until_ready_then_serving() {
    let (address, readiness) = start_server().await;
    assert_eq!(health(&address, "").await, ServingStatus::NotServing);
    assert_eq!(
        health(&address, service_names::STORAGE).await,
        ServingStatus::NotServing
    );
    readiness.set_serving().await;
    assert_eq!(health(&address, "").await, ServingStatus::Serving);
    assert_eq!(
        health(&address, service_names::STORAGE).await,
        ServingStatus::Serving
    );
    readiness.set_not_serving().await;
    assert_eq!(health(&address, "").await, ServingStatus::NotServing);
}

#[tokio::test]
async fn reflection_lists_the_services_the_server_serves_in_v1_and_v1alpha() {
    let (address, _readiness) = start_server().await;
    let expected = [service_names::STORAGE, "grpc.health.v1.Health"];

    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(channel(&address).await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.next().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("unexpected reflection answer: {response:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for name in expected {
            assert!(
                names.iter().any(|n| n == name),
                "{name} missing from {names:?}"
            );
        }
        for name in [service_names::SOURCE, service_names::COORDINATOR] {
            assert!(
                !names.iter().any(|n| n == name),
                "{name} is not served here but listed in {names:?}"
            );
        }
    }
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(channel(&address).await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                service_names::STORAGE.into(),
            )),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.next().await.unwrap().unwrap();
        let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
            panic!("unexpected reflection answer: {response:?}");
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }
}

#[tokio::test]
async fn a_call_of_a_service_the_server_does_not_serve_says_what_the_server_is() {
    let (address, _readiness) = start_server().await;
    let mut client =
        fabric_proto::v1::coordinator_client::CoordinatorClient::new(channel(&address).await);
    let status = client
        .list_nodes(fabric_proto::v1::ListNodesRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert_eq!(
        status.message(),
        "this is a test storage node, which does not serve fabric.v1.Coordinator (it serves fabric.v1.Storage): give the coordinator's address instead"
    );
}
