//! The trust model against the real binaries, tried as an attacker would:
//! every attack the trust issue lists is refused with UNAUTHENTICATED or
//! PERMISSION_DENIED and nothing is executed, read, stored or deleted, while
//! the same calls with proper credentials work.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use fabric_integration_tests::{
    Fabric, Server, fabricctl_command, fabricctl_json, pki, pseudo_random,
};
use fabric_node::client::Peer;
use fabric_proto::v1::coordinator_client::CoordinatorClient;
use fabric_proto::v1::source_client::SourceClient;
use fabric_proto::v1::storage_client::StorageClient;
use fabric_proto::v1::{
    CopySnapshotRequest, DeleteSnapshotRequest, GcRequest, ListJobsRequest, ListSnapshotsRequest,
    NodeInfo, NodeMessage, PullStart, ReceiverMessage, RestoreRequest, SubmitJobsRequest,
    node_message, receiver_message,
};
use fabric_trust::{Expect, Role, Transport};
use tonic::Code;
use tonic::transport::Channel;

/// A channel to `address` as `identity` (none: only the CA, no certificate).
async fn channel_as(
    address: &str,
    identity: Option<(Role, &str)>,
    expect: Expect,
    dir: &Path,
) -> Channel {
    let transport = pki().transport(identity, dir);
    channel_with(address, &transport, expect).await
}

async fn channel_with(address: &str, transport: &Transport, expect: Expect) -> Channel {
    fabric_node::client::channel(
        &Peer {
            address: address.to_owned(),
            expect,
        },
        transport,
    )
    .await
    .unwrap()
}

fn assert_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    what: &str,
) -> String {
    let status = result.expect_err(what);
    assert_eq!(status.code(), code, "{what}: {status:?}");
    status.message().to_owned()
}

fn run_with(args: &[&str], fix: impl FnOnce(&mut std::process::Command)) -> std::process::Output {
    let mut command = fabricctl_command(args);
    fix(&mut command);
    command.stdin(std::process::Stdio::null()).output().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_anonymous_caller_gets_the_health_check_and_nothing_else() {
    let fabric = Fabric::start(1);
    let dir = fabric.dir.path();
    let coordinator = channel_as(&fabric.coordinator.address, None, Expect::Coordinator, dir).await;
    let node = channel_as(
        &fabric.nodes[0].address,
        None,
        Expect::Node("n1".into()),
        dir,
    )
    .await;
    let agent = channel_as(
        &fabric.agent.address,
        None,
        Expect::Node("client".into()),
        dir,
    )
    .await;

    let health = tonic_health::pb::health_client::HealthClient::new(coordinator.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    let marker = dir.join("anonymous-was-here");
    let submitted = CoordinatorClient::new(coordinator.clone())
        .submit_jobs(SubmitJobsRequest {
            toml: format!(
                "[job.evil]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"/etc\"]\npre = \"touch {}\"\ndest = \"n1\"\n",
                marker.display()
            ),
            ..Default::default()
        })
        .await;
    let message = assert_code(submitted, Code::Unauthenticated, "anonymous SubmitJobs");
    assert!(
        message.contains("no client certificate or token") && message.contains("role operator"),
        "{message}"
    );
    assert_code(
        CoordinatorClient::new(coordinator.clone())
            .list_jobs(ListJobsRequest {})
            .await,
        Code::Unauthenticated,
        "anonymous ListJobs",
    );
    assert_code(
        CoordinatorClient::new(coordinator)
            .register_node(NodeInfo {
                id: "n1".into(),
                address: "https://127.0.0.1:1".into(),
                roles: vec![fabric_proto::v1::NodeRole::Storage as i32],
                ..Default::default()
            })
            .await,
        Code::Unauthenticated,
        "anonymous RegisterNode",
    );
    let mut storage = StorageClient::new(node);
    assert_code(
        storage
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot: "latest".into(),
            })
            .await,
        Code::Unauthenticated,
        "anonymous DeleteSnapshot",
    );
    assert_code(
        storage.collect_garbage(GcRequest::default()).await,
        Code::Unauthenticated,
        "anonymous CollectGarbage",
    );
    assert_code(
        storage
            .list_snapshots(ListSnapshotsRequest::default())
            .await,
        Code::Unauthenticated,
        "anonymous ListSnapshots",
    );
    let pull = SourceClient::new(agent)
        .pull(tokio_stream::iter([pull_start("/etc/passwd", "")]))
        .await;
    assert_code(pull, Code::Unauthenticated, "anonymous Pull");

    assert!(!marker.exists(), "nothing ran");
    let jobs = fabric.json(&["job", "list"]);
    assert_eq!(jobs.as_array().unwrap().len(), 0, "{jobs}");
    let nodes = fabric.json(&["node", "list"]);
    let n1 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "n1")
        .unwrap();
    assert_eq!(
        n1["address"],
        fabric.nodes[0].address.as_str(),
        "n1 kept its address"
    );
}

fn pull_start(include: &str, run_id: &str) -> ReceiverMessage {
    ReceiverMessage {
        kind: Some(receiver_message::Kind::PullStart(PullStart {
            include: vec![include.into()],
            run_id: run_id.into(),
            snapshot: Some(fabric_proto::v1::Snapshot {
                job: "steal".into(),
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_a_foreign_ca_and_an_expired_certificate_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let node = Server::node(&work.path().join("store"), &["--node-id", "n1"]);

    // Plaintext against the TLS port.
    let plaintext = fabric_node::client::channel(
        &Peer::any_node(&node.address.replace("https://", "http://")),
        &Transport::InsecurePlaintext,
    )
    .await;
    if let Ok(channel) = plaintext {
        assert!(
            StorageClient::new(channel)
                .list_snapshots(ListSnapshotsRequest::default())
                .await
                .is_err()
        );
    }

    // A certificate of another CA, by a client that trusts ours too.
    let foreign =
        fabric_trust::pki::PkiDir::open_or_init(&work.path().join("foreign"), "evil CA").unwrap();
    let (cert, key) = foreign
        .issue_into(Role::Operator, "mallory", work.path())
        .unwrap();
    let both = work.path().join("both-cas.pem");
    std::fs::write(
        &both,
        [
            std::fs::read(foreign.ca_certificate()).unwrap(),
            std::fs::read(pki().ca()).unwrap(),
        ]
        .concat(),
    )
    .unwrap();
    let mallory = fabric_trust::transport::TransportSettings {
        ca: Some(both),
        cert: Some(cert),
        key: Some(key),
        insecure_plaintext: false,
    }
    .client()
    .unwrap();
    let refused = match fabric_node::client::channel(&Peer::any_node(&node.address), &mallory).await
    {
        Err(_) => true,
        Ok(channel) => StorageClient::new(channel)
            .list_snapshots(ListSnapshotsRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "a certificate of a foreign CA was accepted");

    // A certificate that expires while it is held.
    let identity = fabric_trust::Identity::new(Role::Operator, "late").unwrap();
    let issued = pki()
        .pki()
        .authority()
        .issue(
            &identity,
            &fabric_trust::pki::IssueOptions {
                not_after: SystemTime::now() + Duration::from_secs(2),
                ..fabric_trust::pki::IssueOptions::default()
            },
        )
        .unwrap();
    let (cert, key) = fabric_trust::pki::write_issued(work.path(), &identity, &issued).unwrap();
    let late = fabric_trust::transport::TransportSettings {
        ca: Some(pki().ca()),
        cert: Some(cert),
        key: Some(key),
        insecure_plaintext: false,
    }
    .client()
    .unwrap();
    // Waiting for time to pass, not for another process.
    std::thread::sleep(Duration::from_secs(3));
    let refused = match fabric_node::client::channel(&Peer::any_node(&node.address), &late).await {
        Err(_) => true,
        Ok(channel) => StorageClient::new(channel)
            .list_snapshots(ListSnapshotsRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "an expired certificate was accepted");
}

/// `fabricctl backup` of `source` to `node` as client `host`.
fn backup_as_client(node: &Server, host: &str, source: &Path, dir: &Path) -> serde_json::Value {
    let flags = pki().flags(Role::Client, host, &dir.join(host));
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend([
        "-o",
        "json",
        "backup",
        "--node",
        &node.address,
        "--job",
        "files",
        source.to_str().unwrap(),
    ]);
    let output = run_with(&args, |_| {});
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_puts_and_reads_its_own_host_only() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let source = dir.join("source");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("data"), pseudo_random(200_000, 1)).unwrap();
    let node = Server::node(&dir.join("store"), &["--node-id", "n1"]);

    let web = backup_as_client(&node, "web1", &source, dir);
    let db = backup_as_client(&node, "db1", &source, dir);
    let web_id = web["snapshot"].as_str().unwrap().to_owned();
    let db_id = db["snapshot"].as_str().unwrap().to_owned();

    let web1 = channel_as(
        &node.address,
        Some((Role::Client, "web1")),
        Expect::AnyNode,
        &dir.join("w"),
    )
    .await;
    let mut storage = StorageClient::new(web1);
    let listed = storage
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(
        listed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        [web_id.as_str()],
        "web1 sees its own snapshot only"
    );
    assert_code(
        storage
            .list_snapshots(ListSnapshotsRequest {
                host: "db1".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "web1 listing db1",
    );
    let restore = storage
        .restore(RestoreRequest {
            snapshot: db_id.clone(),
            path: String::new(),
            ..Default::default()
        })
        .await;
    assert_code(
        restore,
        Code::PermissionDenied,
        "web1 restoring db1's snapshot",
    );
    let own = storage
        .restore(RestoreRequest {
            snapshot: web_id.clone(),
            path: String::new(),
            ..Default::default()
        })
        .await;
    assert!(own.is_ok(), "web1 restores its own: {own:?}");
    for (what, result) in [
        (
            "DeleteSnapshot",
            storage
                .delete_snapshot(DeleteSnapshotRequest {
                    snapshot: web_id.clone(),
                })
                .await
                .map(|_| ()),
        ),
        (
            "CollectGarbage",
            storage
                .collect_garbage(GcRequest::default())
                .await
                .map(|_| ()),
        ),
        (
            "Verify",
            storage
                .verify(fabric_proto::v1::VerifyRequest::default())
                .await
                .map(|_| ()),
        ),
        (
            "CopySnapshot",
            storage
                .copy_snapshot(CopySnapshotRequest {
                    snapshot: web_id.clone(),
                    target_node: "n2".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
    ] {
        let message = assert_code(result, Code::PermissionDenied, what);
        assert!(
            message.contains("client/web1") && message.contains("role"),
            "{message}"
        );
    }

    // A commit under another host's name is refused, and nothing is stored
    // under it.
    let forged = upload_commit(&mut storage, "db1").await;
    let message = assert_code(forged, Code::PermissionDenied, "web1 committing as db1");
    assert!(message.contains("own host"), "{message}");

    // Through fabricctl as the client: its own snapshot only.
    let flags = pki().flags(Role::Client, "web1", &dir.join("ctl"));
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend(["-o", "json", "snapshot", "list", "--node", &node.address]);
    let output = run_with(&args, |_| {});
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");

    // Everything is still there for the operator.
    let all = fabricctl_json(&["snapshot", "list", "--node", &node.address]);
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");
}

/// Upload an empty tree and commit it as host `host`.
async fn upload_commit(
    storage: &mut StorageClient<Channel>,
    host: &str,
) -> Result<(), tonic::Status> {
    use fabric_proto::v1::{
        ChunkBatch, ChunkData, ChunkEncoding, Commit, Offer, SenderMessage, Tree, sender_message,
    };
    use prost::Message;
    let tree = Tree::default().encode_to_vec();
    let id = blake3::hash(&tree).as_bytes().to_vec();
    let send = |kind| SenderMessage { kind: Some(kind) };
    let (sender, receiver) = tokio::sync::mpsc::channel(8);
    let mut replies = storage
        .upload(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await?
        .into_inner();
    sender
        .send(send(sender_message::Kind::Offer(Offer {
            batch: 1,
            ids: vec![id.clone()],
        })))
        .await
        .unwrap();
    replies.message().await?;
    sender
        .send(send(sender_message::Kind::Chunks(ChunkBatch {
            batch: 1,
            chunks: vec![ChunkData {
                id: id.clone(),
                data: tree.clone().into(),
                encoding: ChunkEncoding::Plain as i32,
                plain_size: tree.len() as u32,
            }],
        })))
        .await
        .unwrap();
    replies.message().await?;
    sender
        .send(send(sender_message::Kind::Commit(Commit {
            snapshot: Some(fabric_proto::v1::Snapshot {
                job: "forged".into(),
                host: host.into(),
                root_tree_id: id,
                ..Default::default()
            }),
        })))
        .await
        .unwrap();
    while replies.message().await?.is_some() {}
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_is_its_certificate_and_cannot_take_another_nodes_place() {
    let fabric = Fabric::start(1);
    let dir = fabric.dir.path();
    let coordinator = &fabric.coordinator.address;
    let claim = |id: &str| NodeInfo {
        id: id.into(),
        address: "https://127.0.0.1:9".into(),
        roles: vec![fabric_proto::v1::NodeRole::Storage as i32],
        ..Default::default()
    };

    // An impostor with a real node certificate of its own, claiming n1.
    let n9 = channel_as(
        coordinator,
        Some((Role::Node, "n9")),
        Expect::Coordinator,
        &dir.join("n9"),
    )
    .await;
    let message = assert_code(
        CoordinatorClient::new(n9.clone())
            .register_node(claim("n1"))
            .await,
        Code::PermissionDenied,
        "n9 registering as n1",
    );
    assert!(message.contains("node id mismatch"), "{message}");
    let hello = NodeMessage {
        kind: Some(node_message::Kind::Hello(claim("n1"))),
    };
    let session = CoordinatorClient::new(n9)
        .session(tokio_stream::iter([hello.clone()]))
        .await;
    assert_code(session, Code::PermissionDenied, "n9's session as n1");

    // An operator is no node either.
    let operator = channel_as(
        coordinator,
        Some((Role::Operator, "alice")),
        Expect::Coordinator,
        &dir.join("op"),
    )
    .await;
    assert_code(
        CoordinatorClient::new(operator)
            .register_node(claim("n1"))
            .await,
        Code::PermissionDenied,
        "an operator registering a node",
    );

    // n1's own key in a second process, while n1 is live.
    let twin = channel_as(
        coordinator,
        Some((Role::Node, "n1")),
        Expect::Coordinator,
        &dir.join("twin"),
    )
    .await;
    let message = assert_code(
        CoordinatorClient::new(twin)
            .session(tokio_stream::iter([hello]))
            .await,
        Code::PermissionDenied,
        "a second live session for n1",
    );
    assert!(message.contains("live session"), "{message}");

    // The client's agent, with its own genuine certificate, posing as a
    // storage node to attract other hosts' replicas.
    let agent = channel_as(
        coordinator,
        Some((Role::Node, "client")),
        Expect::Coordinator,
        &dir.join("agent"),
    )
    .await;
    let message = assert_code(
        CoordinatorClient::new(agent)
            .register_node(claim("client"))
            .await,
        Code::PermissionDenied,
        "an agent registering as storage",
    );
    assert!(message.contains("storage role"), "{message}");

    // The node list still has the genuine n1, at its address, and no n9.
    let nodes = fabric.json(&["node", "list"]);
    let nodes = nodes.as_array().unwrap();
    assert!(nodes.iter().all(|n| n["id"] != "n9"), "{nodes:?}");
    let n1 = nodes.iter().find(|n| n["id"] == "n1").unwrap();
    assert_eq!(n1["address"], fabric.nodes[0].address.as_str());
    assert_eq!(n1["state"], "online");
    assert_eq!(n1["transport"], "tls");

    // And a backup still goes to the genuine n1.
    let source = dir.join("source");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("f"), b"genuine").unwrap();
    let runs = fabric.submit(
        &format!(
            "[job.real]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1\"\n",
            source.display()
        ),
        &[],
    );
    assert_eq!(fabric.wait_run(&runs[0])["state"], "done");
    let listed = fabricctl_json(&["snapshot", "list", "--node", &fabric.nodes[0].address]);
    assert_eq!(listed.as_array().unwrap().len(), 1);

    // An agent's certificate reads and commits only its own host's
    // snapshots on a storage node (the host name the coordinator
    // registered for it), though agents and storage nodes share the role.
    let other = fabricctl_json(&[
        "backup",
        "--node",
        &fabric.nodes[0].address,
        "--job",
        "operators",
        source.to_str().unwrap(),
    ]);
    let other_id = other["snapshot"].as_str().unwrap().to_owned();
    let agent_on_n1 = channel_as(
        &fabric.nodes[0].address,
        Some((Role::Node, "client")),
        Expect::Node("n1".into()),
        &dir.join("agent-n1"),
    )
    .await;
    let mut storage = StorageClient::new(agent_on_n1);
    let seen = storage
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].host, "client-host");
    assert_code(
        storage
            .restore(RestoreRequest {
                snapshot: other_id.clone(),
                path: String::new(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "an agent restoring another host's snapshot",
    );
    // It may ask for node-to-node copies of its own host's snapshots (a
    // run's later copies), never of another host's, and only to a storage
    // node.
    assert_code(
        storage
            .copy_snapshot(CopySnapshotRequest {
                snapshot: other_id,
                target_node: "n1".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "an agent copying another host's snapshot",
    );
    let message = assert_code(
        storage
            .copy_snapshot(CopySnapshotRequest {
                snapshot: seen[0].id.clone(),
                target_node: "client".into(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "a copy to a node without a store",
    );
    assert!(message.contains("keeps no store"), "{message}");
    assert_code(
        upload_commit(&mut storage, "someone-else").await,
        Code::PermissionDenied,
        "an agent committing as another host",
    );

    // A new agent cannot take over that host name either.
    let web9 = channel_as(
        coordinator,
        Some((Role::Node, "web9")),
        Expect::Coordinator,
        &dir.join("web9"),
    )
    .await;
    let message = assert_code(
        CoordinatorClient::new(web9)
            .register_node(NodeInfo {
                id: "web9".into(),
                address: "https://127.0.0.1:9".into(),
                roles: vec![fabric_proto::v1::NodeRole::Agent as i32],
                hostname: "client-host".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "an agent claiming another's host name",
    );
    assert!(message.contains("host name"), "{message}");
}

#[test]
fn commands_run_only_where_the_host_allows_them_and_only_operators_submit_jobs() {
    let fabric = Fabric::start(1);
    let dir = fabric.dir.path();
    let source = dir.join("source");
    std::fs::create_dir_all(&source).unwrap();
    let marker = dir.join("pwned");
    // The agent allows `touch *`, but not this.
    let jobs = format!(
        "[job.backdoor]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\npre = \"cp /etc/hostname {}\"\ndest = \"n1\"\n",
        source.display(),
        marker.display()
    );
    let runs = fabric.submit(&jobs, &[]);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "failed", "{run:#}");
    let reason = run["reason"].as_str().unwrap();
    assert!(
        reason.contains("not allowed on agent client") && reason.contains("allow_commands"),
        "{reason}"
    );
    assert!(!marker.exists(), "the command did not run");

    // `!command` instances likewise.
    let expand = format!(
        "[job.expand]\ndirection = \"push\"\nclient = \"client\"\ninstances = \"!cp /etc/hostname {}\"\ninclude = [\"{}/$instance\"]\ndest = \"n1\"\n",
        marker.display(),
        source.display()
    );
    let runs = fabric.submit(&expand, &[]);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "failed", "{run:#}");
    assert!(!marker.exists(), "the instances command did not run");

    // Only operators submit, and the job records who did.
    let file = dir.join("jobs.toml");
    for (role, name) in [
        (Role::Monitor, "grafana"),
        (Role::Node, "client"),
        (Role::Client, "client-host"),
    ] {
        let flags = pki().flags(role, name, &dir.join(format!("{role}")));
        let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
        args.extend([
            "--coordinator",
            &fabric.coordinator.address,
            "job",
            "submit",
            "-f",
            file.to_str().unwrap(),
        ]);
        let output = run_with(&args, |_| {});
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("may not call fabric.v1.Coordinator/SubmitJobs")
                && stderr.contains("needs role operator"),
            "{role}: {stderr}"
        );
    }
    let job = fabric.json(&["job", "show", "expand"]);
    assert_eq!(job["submitted_by"], "operator/test", "{job}");
    let history = job["history"].as_array().unwrap();
    assert!(
        history[0]
            .as_str()
            .unwrap()
            .ends_with("operator/test created"),
        "{job}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_is_served_only_to_the_assigned_node_and_a_copy_only_to_a_registered_one() {
    let fabric = Fabric::start(2);
    let dir = fabric.dir.path();
    let agent = &fabric.agent.address;

    // n1 is a genuine storage node, but the coordinator assigned it no pull.
    let n1 = channel_as(
        agent,
        Some((Role::Node, "n1")),
        Expect::Node("client".into()),
        &dir.join("n1"),
    )
    .await;
    let mut pulled = SourceClient::new(n1)
        .pull(tokio_stream::iter([pull_start("/etc", "0123456789abcdef")]))
        .await;
    if let Ok(stream) = pulled.as_mut() {
        // The refusal may come as the stream's first item.
        let first = stream.get_mut().message().await;
        pulled = first.map(|_| unreachable_response());
    }
    let message = assert_code(pulled, Code::PermissionDenied, "an unassigned pull");
    assert!(message.contains("no permit"), "{message}");

    // An operator is no puller.
    let operator = channel_as(
        agent,
        Some((Role::Operator, "alice")),
        Expect::Node("client".into()),
        &dir.join("op"),
    )
    .await;
    let refused = SourceClient::new(operator)
        .pull(tokio_stream::iter([pull_start("/etc", "")]))
        .await;
    assert_code(refused, Code::PermissionDenied, "an operator's pull");

    // A copy names a registered node id, never an address.
    let node = channel_as(
        &fabric.nodes[0].address,
        Some((Role::Operator, "alice")),
        Expect::Node("n1".into()),
        &dir.join("op2"),
    )
    .await;
    let mut storage = StorageClient::new(node);
    for (target, code) in [
        ("http://127.0.0.1:1", Code::InvalidArgument),
        ("n9", Code::NotFound),
    ] {
        let copy = storage
            .copy_snapshot(CopySnapshotRequest {
                snapshot: "whatever".into(),
                target_node: target.into(),
                ..Default::default()
            })
            .await;
        assert_code(copy, code, target);
    }
}

fn unreachable_response() -> tonic::Response<tonic::Streaming<fabric_proto::v1::SenderMessage>> {
    panic!("the pull was answered")
}

#[test]
fn a_token_works_for_its_role_until_it_is_revoked() {
    let fabric = Fabric::start(1);
    let made = fabric.json(&["token", "create", "--role", "monitor", "--name", "grafana"]);
    let token = made["token"].as_str().unwrap().to_owned();
    let id = made["id"].as_str().unwrap().to_owned();
    let as_token = |args: &[&str]| {
        let mut all = vec!["--coordinator", fabric.coordinator.address.as_str()];
        all.extend_from_slice(args);
        run_with(&all, |command| {
            command
                .env_remove("FABRIC_TLS_CERT")
                .env_remove("FABRIC_TLS_KEY")
                .env("FABRIC_TOKEN", &token);
        })
    };
    let listed = as_token(&["run", "list"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let denied = as_token(&["token", "list"]);
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(
        !denied.status.success() && stderr.contains("monitor/grafana may not call"),
        "{stderr}"
    );
    assert!(!stderr.contains(&token));
    // A monitor may ask what retention would remove, not remove anything.
    let refused = as_token(&["forget", "--job", "nothing"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("may only ask what retention would remove"),
        "{stderr}"
    );
    let dry = as_token(&["forget", "--job", "nothing", "--dry-run"]);
    let stderr = String::from_utf8_lossy(&dry.stderr);
    assert!(stderr.contains("no job \"nothing\""), "{stderr}");

    let tokens = fabric.json(&["token", "list"]);
    assert!(
        !tokens.to_string().contains(&token[token.len() - 64..]),
        "no secret is listed"
    );
    fabric.json(&["token", "revoke", &id]);
    let revoked = as_token(&["run", "list"]);
    let stderr = String::from_utf8_lossy(&revoked.stderr);
    assert!(
        !revoked.status.success()
            && stderr.contains("revoked")
            && stderr.contains("Unauthenticated"),
        "{stderr}"
    );
    assert!(!stderr.contains(&token));
}
