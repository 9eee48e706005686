//! An agent talking to a node from before `Storage.GetNewestSnapshot`: the
//! node's real storage service on 127.0.0.1, with that one method answered
//! UNIMPLEMENTED as an older node answers it. The agent must still find its
//! parent (by listing) and send nothing for an unchanged tree.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use fabric_chunkstore::walk::BackupOptions;
use fabric_chunkstore::{ChunkParams, Store, StoreConfig};
use fabric_node::agent::push_backup;
use fabric_node::client::Peer;
use fabric_node::rate_limit::TransferLimits;
use fabric_node::storage_service::StorageService;
use fabric_proto::v1::storage_server::StorageServer;
use fabric_proto::v1::{GetNewestSnapshotRequest, Snapshot};
use fabric_trust::pki::PkiDir;
use fabric_trust::transport::TransportSettings;
use fabric_trust::{AuthLayer, Expect, Role};
use tonic::codegen::{BoxFuture, Service, http};

/// The storage service without `GetNewestSnapshot`.
#[derive(Clone)]
struct WithoutNewestSnapshot(StorageServer<StorageService>);

impl tonic::server::NamedService for WithoutNewestSnapshot {
    const NAME: &'static str = fabric_proto::service_names::STORAGE;
}

impl Service<http::Request<tonic::body::Body>> for WithoutNewestSnapshot {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() == "/fabric.v1.Storage/GetNewestSnapshot" {
            return Box::pin(async {
                Ok(tonic::Status::unimplemented("not on this node").into_http())
            });
        }
        self.0.call(request)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_finds_its_parent_on_a_node_without_get_newest_snapshot() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    std::fs::create_dir_all(source.join("sub")).unwrap();
    for index in 0..20 {
        std::fs::write(
            source.join("sub").join(format!("file{index}")),
            format!("file {index}\n").repeat(100 * index + 1),
        )
        .unwrap();
    }
    let store = Arc::new(
        Store::open_or_create(&work.path().join("store"), StoreConfig::default()).unwrap(),
    );
    // TLS and the authorization layer, as on every node.
    let pki = PkiDir::open_or_init(&work.path().join("ca"), "test CA").unwrap();
    let credentials = |role, name| {
        let (cert, key) = pki.issue_into(role, name, work.path()).unwrap();
        TransportSettings {
            ca: Some(pki.ca_certificate()),
            cert: Some(cert),
            key: Some(key),
            insecure_plaintext: false,
        }
    };
    let server_transport = credentials(Role::Node, "old")
        .server(&Expect::Node("old".into()))
        .unwrap();
    // A node without a coordinator scopes a node caller to its id: the
    // agent backs up host "client" as node "client".
    let agent = credentials(Role::Node, "client").client().unwrap();
    let service = StorageService::new(
        store,
        fabric_node::storage_service::StorageSettings {
            memory_bytes: 64 << 20,
            memory_per_upload_bytes: 16 << 20,
            idle_timeout: fabric_node::transfer::IDLE_TIMEOUT,
            guards: fabric_chunkstore::CommitGuards::default(),
            ingest_limit: None,
            quotas: Default::default(),
            gc_grace: fabric_chunkstore::DEFAULT_GC_GRACE,
        },
        fabric_node::health::SharedHealth::new(fabric_node::health::NodeHealth::accepting()),
        server_transport.clone(),
        None,
    );
    let storage = StorageServer::new(service)
        .max_decoding_message_size(fabric_node::transfer::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(fabric_node::transfer::MAX_MESSAGE_BYTES);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("https://{}", listener.local_addr().unwrap());
    let incoming = fabric_trust::transport::incoming(listener, &server_transport).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(AuthLayer::for_transport(&server_transport, None))
            .add_service(WithoutNewestSnapshot(storage))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stopped.await;
            }),
    );
    let node = Peer::node("old", &address);

    let options = BackupOptions {
        includes: vec![source.clone()],
        chunk_params: ChunkParams::default(),
        ..Default::default()
    };
    let template = Snapshot {
        job: "daily".into(),
        host: "client".into(),
        ..Default::default()
    };
    let plan = fabric_node::memory_budget::SendPlan::for_this_machine(
        fabric_node::memory_budget::DEFAULT_BACKUP_MEMORY,
    )
    .unwrap();
    let first = push_backup(
        &node,
        &agent,
        options.clone(),
        plan,
        template.clone(),
        None,
        TransferLimits::none(),
    )
    .await
    .unwrap();
    assert!(first.bytes_sent > 0);
    let second = push_backup(
        &node,
        &agent,
        options,
        plan,
        template,
        None,
        TransferLimits::none(),
    )
    .await
    .unwrap();
    assert_eq!(second.snapshot.parent_id, first.snapshot.id);
    assert_eq!(second.bytes_sent, 0);

    // The method really is missing on this node.
    let mut client = fabric_node::client::storage(&node, &agent).await.unwrap();
    let refused = client
        .get_newest_snapshot(GetNewestSnapshotRequest {
            job: "daily".into(),
            host: "client".into(),
            instance: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented);

    stop.send(()).unwrap();
    serving.await.unwrap().unwrap();
}
