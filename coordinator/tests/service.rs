//! The coordinator as nodes and operators see it: a real server started with
//! `serve` on 127.0.0.1:0, nodes played by gRPC clients speaking the session
//! protocol (register, hello, heartbeats, assignments, updates), operators
//! by the same client calling the query and control methods.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::path::{Path, PathBuf};
use std::time::Duration;

use fabric_coordinator::{CoordinatorConfig, serve};
use fabric_proto::v1::coordinator_client::CoordinatorClient;
use fabric_proto::v1::{
    Assignment, AssignmentRole, CancelRunRequest, CheckRequest, CoordinatorMessage, CopyState,
    GetJobRequest, GetRunRequest, Heartbeat, HostUsage, ListCatalogRequest, ListJobsRequest,
    ListNodesRequest, ListRunsRequest, NodeInfo, NodeMessage, NodeRole, NodeState, PullDone,
    RetryRunRequest, Run, RunDetail, RunEvent, RunState, RunUpdate, Snapshot, SubmitJobsRequest,
    TransferProgress, WatchRunRequest, coordinator_message, node_message,
};
use fabric_trust::pki::PkiDir;
use fabric_trust::transport::TransportSettings;
use fabric_trust::{Expect, Role};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Upper bound for anything the test waits for; reaching it is a failure.
const PATIENCE: Duration = Duration::from_secs(20);

struct Coordinator {
    address: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), fabric_coordinator::ServeError>>,
    /// The fabric's CA and the certificates issued for the test.
    pki: PkiDir,
    _tls: tempfile::TempDir,
}

impl Coordinator {
    async fn start(data_dir: &Path, heartbeat_interval: Duration) -> Self {
        Self::start_with(data_dir, |config| {
            config.heartbeat_interval = heartbeat_interval
        })
        .await
    }

    /// A coordinator with TLS (a CA of the test's own) and `configure`d.
    async fn start_with(data_dir: &Path, configure: impl FnOnce(&mut CoordinatorConfig)) -> Self {
        let tls = tempfile::tempdir().unwrap();
        let pki = PkiDir::open_or_init(&tls.path().join("ca"), "test CA").unwrap();
        let (cert, key) = pki
            .issue_into(Role::Coordinator, "test", tls.path())
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("https://{}", listener.local_addr().unwrap());
        let mut config = CoordinatorConfig {
            listen: listener.local_addr().unwrap(),
            data_dir: data_dir.to_owned(),
            tls_cert: Some(cert),
            tls_key: Some(key),
            tls_ca: Some(pki.ca_certificate()),
            ..CoordinatorConfig::default()
        };
        configure(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, config, async move {
            let _ = stopped.await;
        }));
        Self {
            address,
            stop: Some(stop),
            task,
            pki,
            _tls: tls,
        }
    }

    /// A client holding a certificate for `role/name`.
    async fn client_as(&self, role: Role, name: &str) -> CoordinatorClient<Channel> {
        let (cert, key) = self
            .pki
            .issue_into(role, name, &self._tls.path().join(format!("{role}-{name}")))
            .unwrap();
        let transport = TransportSettings {
            ca: Some(self.pki.ca_certificate()),
            cert: Some(cert),
            key: Some(key),
            insecure_plaintext: false,
        }
        .client()
        .unwrap();
        let endpoint = tonic::transport::Endpoint::from_shared(self.address.clone()).unwrap();
        let channel = fabric_trust::transport::connect(endpoint, &transport, Expect::Coordinator)
            .await
            .unwrap();
        CoordinatorClient::new(channel)
    }

    /// An operator's client.
    async fn client(&self) -> CoordinatorClient<Channel> {
        self.client_as(Role::Operator, "test").await
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .expect("the coordinator stops")
            .unwrap()
            .unwrap();
    }
}

/// A node played by the test.
struct FakeNode {
    id: String,
    sender: mpsc::Sender<NodeMessage>,
    inbound: tonic::Streaming<CoordinatorMessage>,
}

fn info(id: &str, roles: &[NodeRole], labels: &[&str]) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        address: format!("http://{id}.invalid:7401"),
        labels: labels.iter().map(|label| (*label).to_owned()).collect(),
        capacity_bytes: 1 << 30,
        free_bytes: 1 << 29,
        roles: roles.iter().map(|role| *role as i32).collect(),
        hostname: format!("{id}.example"),
        active_runs: Vec::new(),
        insecure_plaintext: false,
        ..Default::default()
    }
}

impl FakeNode {
    async fn connect(coordinator: &Coordinator, info: NodeInfo) -> Self {
        let mut client = coordinator.client_as(Role::Node, &info.id).await;
        let settings = client
            .register_node(info.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(settings.heartbeat_interval_ms > 0);
        let (sender, receiver) = mpsc::channel(64);
        sender
            .send(NodeMessage {
                kind: Some(node_message::Kind::Hello(info.clone())),
            })
            .await
            .unwrap();
        let inbound = client
            .session(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
            .unwrap()
            .into_inner();
        let node = Self {
            id: info.id,
            sender,
            inbound,
        };
        node.heartbeat().await;
        node
    }

    async fn storage(coordinator: &Coordinator, id: &str) -> Self {
        Self::connect(coordinator, info(id, &[NodeRole::Storage], &["hot"])).await
    }

    async fn agent(coordinator: &Coordinator, id: &str) -> Self {
        Self::connect(coordinator, info(id, &[NodeRole::Agent], &[])).await
    }

    async fn heartbeat(&self) {
        self.sender
            .send(NodeMessage {
                kind: Some(node_message::Kind::Heartbeat(Heartbeat {
                    free_bytes: 1 << 28,
                    chunks: 7,
                    stored_bytes: 700,
                    quota_usage: vec![HostUsage {
                        host: "web1".into(),
                        used_bytes: 300,
                        quota_bytes: 1000,
                    }],
                    job_usage: vec![fabric_proto::v1::JobUsage {
                        job: "web".into(),
                        stored_bytes: 300,
                    }],
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
    }

    async fn update(&self, update: RunUpdate) {
        self.sender
            .send(NodeMessage {
                kind: Some(node_message::Kind::Update(update)),
            })
            .await
            .unwrap();
    }

    async fn next_message(&mut self) -> coordinator_message::Kind {
        let message = tokio::time::timeout(PATIENCE, self.inbound.message())
            .await
            .unwrap_or_else(|_| panic!("{}: no message from the coordinator", self.id))
            .unwrap()
            .unwrap_or_else(|| panic!("{}: the session ended", self.id));
        message.kind.unwrap()
    }

    async fn assignment(&mut self) -> Assignment {
        match self.next_message().await {
            coordinator_message::Kind::Assignment(assignment) => assignment,
            other => panic!("{}: expected an assignment, got {other:?}", self.id),
        }
    }
}

fn state(run_id: &str, state: RunState) -> RunUpdate {
    RunUpdate {
        run_id: run_id.into(),
        state: state as i32,
        ..Default::default()
    }
}

fn dest(run_id: &str, node: &str, dest_state: CopyState) -> RunUpdate {
    RunUpdate {
        run_id: run_id.into(),
        dest: node.into(),
        dest_state: dest_state as i32,
        ..Default::default()
    }
}

fn committed(assignment: &Assignment, node: &str) -> RunUpdate {
    let mut snapshot: Snapshot = assignment.snapshot.clone().unwrap();
    snapshot.end_time_ms = snapshot.start_time_ms + 1000;
    snapshot.state = fabric_proto::v1::SnapshotState::Complete as i32;
    RunUpdate {
        snapshot: Some(snapshot),
        ..dest(&assignment.run_id, node, CopyState::Done)
    }
}

async fn submit(coordinator: &Coordinator, toml: &str, select: &[&str]) -> Vec<Run> {
    coordinator
        .client()
        .await
        .submit_jobs(SubmitJobsRequest {
            toml: toml.into(),
            file_name: "jobs.toml".into(),
            select: select.iter().map(|item| (*item).to_owned()).collect(),
            no_run: false,
        })
        .await
        .unwrap()
        .into_inner()
        .runs
}

/// Every event of the run until it ends (WatchRun ends with the run).
async fn watch_to_end(coordinator: &Coordinator, run_id: &str) -> Vec<RunEvent> {
    let mut stream = coordinator
        .client()
        .await
        .watch_run(WatchRunRequest {
            run_id: run_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    loop {
        match tokio::time::timeout(PATIENCE, stream.message()).await {
            Ok(Ok(Some(event))) => events.push(event),
            Ok(Ok(None)) => return events,
            Ok(Err(status)) => panic!("watch failed: {status}"),
            Err(_) => panic!("run {run_id} did not end; events so far: {events:#?}"),
        }
    }
}

async fn run_detail(coordinator: &Coordinator, run_id: &str) -> RunDetail {
    coordinator
        .client()
        .await
        .get_run(GetRunRequest {
            run_id: run_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

const PUSH_JOB: &str = r#"
[job.db]
direction = "push"
client = "c1"
include = ["/srv/db"]
dest = "n1& n2"
copy_retries = 1
interval = "24h"
"#;

fn data_dir(temp: &tempfile::TempDir) -> PathBuf {
    temp.path().join("state")
}

#[tokio::test]
async fn a_push_run_ends_done_with_both_copies_and_survives_a_restart() {
    let temp = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&data_dir(&temp), Duration::from_secs(5)).await;
    let _n1 = FakeNode::storage(&coordinator, "n1").await;
    let _n2 = FakeNode::storage(&coordinator, "n2").await;
    let mut client = FakeNode::agent(&coordinator, "c1").await;

    let runs = submit(&coordinator, PUSH_JOB, &[]).await;
    assert_eq!(runs.len(), 1);
    let run_id = runs[0].id.clone();

    let assignment = client.assignment().await;
    assert_eq!(assignment.run_id, run_id);
    assert_eq!(assignment.role(), AssignmentRole::Push);
    let targets: Vec<(String, bool)> = assignment
        .targets
        .iter()
        .map(|target| (target.node.clone(), target.background))
        .collect();
    assert_eq!(targets, [("n1".into(), true), ("n2".into(), false)]);
    assert_eq!(assignment.targets[0].address, "http://n1.invalid:7401");
    let snapshot = assignment.snapshot.clone().unwrap();
    assert_eq!(snapshot.id.len(), 32);
    assert!(
        snapshot
            .id
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    assert_eq!(snapshot.host, "c1.example");
    assert_eq!(snapshot.job, "db");
    assert!(snapshot.name.starts_with("db/"), "{}", snapshot.name);
    assert_eq!(assignment.job.as_ref().unwrap().include, ["/srv/db"]);

    client.update(state(&run_id, RunState::Copying)).await;
    client.update(dest(&run_id, "n1", CopyState::Running)).await;
    client
        .update(RunUpdate {
            progress: Some(TransferProgress {
                files: 3,
                bytes_read: 300,
                bytes_sent: 100,
                current_path: "/srv/db/x".into(),
            }),
            ..dest(&run_id, "n1", CopyState::Unspecified)
        })
        .await;
    client.update(dest(&run_id, "n2", CopyState::Running)).await;
    client.update(committed(&assignment, "n2")).await;
    client.update(committed(&assignment, "n1")).await;
    client.update(state(&run_id, RunState::Done)).await;

    let watched = watch_to_end(&coordinator, &run_id).await;
    assert_eq!(watched.last().unwrap().state(), RunState::Done);
    // Live progress goes to watchers as it comes (seq 0), never stored.
    let (live, events): (Vec<RunEvent>, Vec<RunEvent>) =
        watched.into_iter().partition(|event| event.seq == 0);
    assert!(
        live.iter().all(|event| event.dest == "n1"
            && event.progress.as_ref().map(|p| p.bytes_read) == Some(300)),
        "{live:#?}"
    );
    let seqs: Vec<u64> = events.iter().map(|event| event.seq).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    assert!(
        events.iter().any(|event| event.dest == "n1"
            && event.dest_state() == CopyState::Running
            && event.node == "c1"),
        "{events:#?}"
    );
    // Progress alone is not a stored event; a copy's end carries its last.
    assert!(
        events
            .iter()
            .all(|event| event.progress.is_none() || event.dest_state() == CopyState::Done),
        "{events:#?}"
    );

    let detail = run_detail(&coordinator, &run_id[..14]).await;
    let run = detail.run.clone().unwrap();
    assert_eq!(run.state(), RunState::Done);
    assert_eq!(run.copies.len(), 2);
    for copy in &run.copies {
        assert_eq!(copy.state(), CopyState::Done, "{copy:?}");
        assert_eq!(copy.snapshot_id, snapshot.id);
    }
    assert_eq!(
        run.copies[0]
            .progress
            .as_ref()
            .map(|progress| progress.bytes_read),
        Some(300)
    );
    assert_eq!(detail.events, events);

    let mut operator = coordinator.client().await;
    let listed = operator
        .list_runs(ListRunsRequest {
            job: "db".into(),
            state: RunState::Done as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(listed.len(), 1);
    let none = operator
        .list_runs(ListRunsRequest {
            job: "db".into(),
            state: RunState::Failed as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert!(none.is_empty());

    let catalog = operator
        .list_catalog(ListCatalogRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(catalog.len(), 1);
    let mut holders: Vec<String> = catalog[0]
        .copies
        .iter()
        .map(|copy| copy.node.clone())
        .collect();
    holders.sort();
    assert_eq!(holders, ["n1", "n2"]);
    assert_eq!(catalog[0].snapshot.as_ref().unwrap().id, snapshot.id);

    let checks = operator
        .check(CheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0].job, "db");
    assert_eq!(
        checks[0].status(),
        fabric_proto::v1::CheckStatus::Ok,
        "{checks:?}"
    );

    // A restart loses nothing.
    drop(client);
    drop(operator);
    coordinator.stop().await;
    let coordinator = Coordinator::start(&data_dir(&temp), Duration::from_secs(5)).await;
    let mut operator = coordinator.client().await;
    let nodes = operator
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let ids: Vec<String> = nodes
        .iter()
        .map(|node| node.info.as_ref().unwrap().id.clone())
        .collect();
    assert_eq!(ids, ["c1", "n1", "n2"]);
    assert_eq!(nodes[1].chunks, 7);
    assert_eq!(nodes[1].quota_usage[0].host, "web1", "quota usage is kept");
    let job = operator
        .get_job(GetJobRequest { name: "db".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.last_run.unwrap().id, run_id);
    assert_eq!(
        operator
            .list_jobs(ListJobsRequest {})
            .await
            .unwrap()
            .into_inner()
            .jobs
            .len(),
        1
    );
    let after = run_detail(&coordinator, &run_id).await;
    assert_eq!(after, detail);
    let catalog_after = operator
        .list_catalog(ListCatalogRequest {
            job: "db".into(),
            host: "c1.example".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(catalog_after, catalog);
    coordinator.stop().await;
}

async fn listed_nodes(operator: &mut CoordinatorClient<Channel>) -> Vec<fabric_proto::v1::Node> {
    operator
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
}

/// The only node, once the coordinator lists it lost (bounded wait).
async fn lost_node(operator: &mut CoordinatorClient<Channel>) -> fabric_proto::v1::Node {
    for _ in 0..200 {
        let nodes = listed_nodes(operator).await;
        if nodes[0].state() == NodeState::Lost {
            return nodes[0].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the node never became lost");
}

#[tokio::test]
async fn a_node_that_stops_heartbeating_is_lost_and_comes_back_on_reconnect() {
    let temp = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&data_dir(&temp), Duration::from_millis(100)).await;
    let node = FakeNode::storage(&coordinator, "n1").await;
    let mut operator = coordinator.client().await;
    let lost = lost_node(&mut operator).await;
    assert!(!lost.stopped, "it went quiet, it did not stop");
    drop(node);
    let _node = FakeNode::storage(&coordinator, "n1").await;
    assert_eq!(
        listed_nodes(&mut operator).await[0].state(),
        NodeState::Online
    );
    coordinator.stop().await;
}

#[tokio::test]
async fn a_node_that_ends_its_session_is_stopped_not_an_alarm() {
    let temp = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&data_dir(&temp), Duration::from_millis(100)).await;
    let node = FakeNode::storage(&coordinator, "n1").await;
    // The node closes its side: a clean end of its session stream.
    drop(node);
    let mut operator = coordinator.client().await;
    let node = lost_node(&mut operator).await;
    assert!(node.stopped, "{node:?}");
    let _back = FakeNode::storage(&coordinator, "n1").await;
    let nodes = listed_nodes(&mut operator).await;
    assert_eq!(nodes[0].state(), NodeState::Online);
    assert!(!nodes[0].stopped);
    coordinator.stop().await;
}

#[tokio::test]
async fn a_pre_failure_fails_the_run_before_any_copy() {
    let temp = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&data_dir(&temp), Duration::from_secs(5)).await;
    let _n1 = FakeNode::storage(&coordinator, "n1").await;
    let _n2 = FakeNode::storage(&coordinator, "n2").await;
    let mut client = FakeNode::agent(&coordinator, "c1").await;
    let runs = submit(
        &coordinator,
        &format!("{PUSH_JOB}pre = \"false\"\n"),
        &["db"],
    )
    .await;
    let run_id = runs[0].id.clone();
    let assignment = client.assignment().await;
    assert_eq!(assignment.job.as_ref().unwrap().pre, "false");
    client.update(state(&run_id, RunState::Pre)).await;
    client
        .update(RunUpdate {
            run_id: run_id.clone(),
            message: "dump: no such database".into(),
            ..Default::default()
        })
        .await;
    client
        .update(RunUpdate {
            message: "pre exited with status 1".into(),
            ..state(&run_id, RunState::Failed)
        })
        .await;
    let events = watch_to_end(&coordinator, &run_id).await;
    assert!(
        events.iter().any(
            |event| event.message == "dump: no such database" && event.state() == RunState::Pre
        )
    );
    let run = run_detail(&coordinator, &run_id).await.run.unwrap();
    assert_eq!(run.state(), RunState::Failed);
    assert_eq!(run.reason, "pre exited with status 1");
    assert!(
        run.copies
            .iter()
            .all(|copy| copy.state() == CopyState::Pending)
    );
    assert!(run.ended_ms >= run.created_ms);
    coordinator.stop().await;
}

#[tokio::test]
async fn cancel_stops_the_run_on_its_node() {
    let temp = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&data_dir(&temp), Duration::from_secs(5)).await;
    let _n1 = FakeNode::storage(&coordinator, "n1").await;
    let _n2 = FakeNode::storage(&coordinator, "n2").await;
    let mut client = FakeNode::agent(&coordinator, "c1").await;
    let run_id = submit(&coordinator, PUSH_JOB, &[]).await[0].id.clone();
    client.assignment().await;
    client.update(state(&run_id, RunState::Copying)).await;
    let mut operator = coordinator.client().await;
    let run = operator
        .cancel_run(CancelRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.state(), RunState::Cancelled);
    match client.next_message().await {
        coordinator_message::Kind::Cancel(cancel) => assert_eq!(cancel.run_id, run_id),
        other => panic!("expected a cancel, got {other:?}"),
    }
    client.update(state(&run_id, RunState::Cancelled)).await;
    let again = operator
        .cancel_run(CancelRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        run_detail(&coordinator, &run_id).await.run.unwrap().state(),
        RunState::Cancelled
    );
    coordinator.stop().await;
}

#[tokio::test]
async fn retry_sends_only_the_failed_copies_again() {
    let temp = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&data_dir(&temp), Duration::from_secs(5)).await;
    let _n1 = FakeNode::storage(&coordinator, "n1").await;
    let _n2 = FakeNode::storage(&coordinator, "n2").await;
    let mut client = FakeNode::agent(&coordinator, "c1").await;
    let run_id = submit(&coordinator, PUSH_JOB, &[]).await[0].id.clone();
    let assignment = client.assignment().await;
    client.update(state(&run_id, RunState::Copying)).await;
    client.update(committed(&assignment, "n1")).await;
    client
        .update(RunUpdate {
            message: "connection refused".into(),
            ..dest(&run_id, "n2", CopyState::Failed)
        })
        .await;
    client.update(state(&run_id, RunState::Done)).await;
    watch_to_end(&coordinator, &run_id).await;
    let run = run_detail(&coordinator, &run_id).await.run.unwrap();
    assert_eq!(run.state(), RunState::Failed);
    assert!(
        run.reason.contains("n2: connection refused"),
        "{}",
        run.reason
    );

    let mut operator = coordinator.client().await;
    let retried = operator
        .retry_run(RetryRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.attempt, 2);
    let again = client.assignment().await;
    assert_eq!(again.run_id, run_id);
    let targets: Vec<&str> = again
        .targets
        .iter()
        .map(|target| target.node.as_str())
        .collect();
    assert_eq!(targets, ["n2"]);
    assert_eq!(
        again.snapshot.as_ref().unwrap().id,
        assignment.snapshot.as_ref().unwrap().id
    );
    // n1 holds the committed snapshot: n2's copy is to come from there.
    let holders: Vec<&str> = again.holders.iter().map(|h| h.node.as_str()).collect();
    assert_eq!(holders, ["n1"]);
    assert!(!again.holders[0].address.is_empty());
    client.update(committed(&again, "n2")).await;
    client.update(state(&run_id, RunState::Done)).await;
    watch_to_end(&coordinator, &run_id).await;
    let run = run_detail(&coordinator, &run_id).await.run.unwrap();
    assert_eq!(run.state(), RunState::Done);
    assert_eq!(run.attempt, 2);
    let refused = operator
        .retry_run(RetryRunRequest { run_id })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    coordinator.stop().await;
}

const PULL_JOBS: &str = r#"
[job.ext-client]
direction = "passive"
client = "c1"
pre = "dump"
post = "cleanup"

[job.ext]
direction = "pull"
pull_source = "ext-client"
include = ["/srv/export"]
dest = "n1 n2"
copy_retries = 1
copy_retry_min_sleep = 0
"#;

#[tokio::test]
async fn a_pull_run_orchestrates_the_storage_nodes_and_tells_the_client() {
    let temp = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&data_dir(&temp), Duration::from_secs(5)).await;
    let mut n1 = FakeNode::storage(&coordinator, "n1").await;
    let mut n2 = FakeNode::storage(&coordinator, "n2").await;
    let mut client = FakeNode::agent(&coordinator, "c1").await;
    let runs = submit(&coordinator, PULL_JOBS, &[]).await;
    assert_eq!(runs.len(), 1);
    let run_id = runs[0].id.clone();
    assert_eq!(runs[0].client, "c1");

    let passive = client.assignment().await;
    assert_eq!(passive.role(), AssignmentRole::Passive);
    assert_eq!(passive.job.as_ref().unwrap().pre, "dump");
    client.update(state(&run_id, RunState::Pre)).await;
    client
        .update(RunUpdate {
            ready: true,
            ..state(&run_id, RunState::Copying)
        })
        .await;

    let pull = n1.assignment().await;
    assert_eq!(pull.role(), AssignmentRole::Pull);
    assert_eq!(pull.dest, "n1");
    assert_eq!(pull.source_address, "http://c1.invalid:7401");
    assert_eq!(pull.job.as_ref().unwrap().include, ["/srv/export"]);
    // n1 fails once: the coordinator retries it before going on to n2.
    n1.update(dest(&run_id, "n1", CopyState::Running)).await;
    n1.update(RunUpdate {
        message: "source unreachable".into(),
        ..dest(&run_id, "n1", CopyState::Failed)
    })
    .await;
    let retry = n1.assignment().await;
    assert_eq!(retry.dest, "n1");
    assert_eq!(retry.attempt, 2);
    // The failed pull may have committed: the source is read again under a
    // new snapshot id.
    let (planned, reread) = (
        pull.snapshot.unwrap().id,
        retry.snapshot.clone().unwrap().id,
    );
    assert_ne!(planned, reread);
    assert!(retry.holders.is_empty());
    n1.update(dest(&run_id, "n1", CopyState::Running)).await;
    n1.update(committed(&retry, "n1")).await;

    // n2 copies n1's snapshot node to node instead of reading the source.
    let second = n2.assignment().await;
    assert_eq!(second.dest, "n2");
    assert_eq!(second.snapshot.as_ref().unwrap().id, reread);
    let holders: Vec<&str> = second.holders.iter().map(|h| h.node.as_str()).collect();
    assert_eq!(holders, ["n1"]);
    n2.update(dest(&run_id, "n2", CopyState::Running)).await;
    n2.update(committed(&second, "n2")).await;

    // The client was told whom to serve, and which paths, before each pull.
    let mut permitted = Vec::new();
    let done: PullDone = loop {
        match client.next_message().await {
            coordinator_message::Kind::PullPermit(permit) => {
                assert_eq!(permit.run_id, run_id);
                assert_eq!(permit.include, ["/srv/export"]);
                permitted.push(permit.puller);
            }
            coordinator_message::Kind::PullDone(done) => break done,
            other => panic!("expected pull_permit or pull_done, got {other:?}"),
        }
    };
    // The client serves only the pulls that read it, not n2's copy.
    assert_eq!(permitted, ["n1", "n1"]);
    assert!(done.ok, "{done:?}");
    assert_eq!(done.run_id, run_id);
    client.update(state(&run_id, RunState::Post)).await;
    client.update(state(&run_id, RunState::Done)).await;
    watch_to_end(&coordinator, &run_id).await;
    let run = run_detail(&coordinator, &run_id).await.run.unwrap();
    assert_eq!(run.state(), RunState::Done, "{}", run.reason);
    assert_eq!(run.copies[0].attempts, 2);
    let catalog = coordinator
        .client()
        .await
        .list_catalog(ListCatalogRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(catalog.len(), 1);
    assert_eq!(catalog[0].copies.len(), 2);
    coordinator.stop().await;
}

#[tokio::test]
async fn instances_from_a_command_expand_into_one_run_each() {
    let temp = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&data_dir(&temp), Duration::from_secs(5)).await;
    let _n1 = FakeNode::storage(&coordinator, "n1").await;
    let mut client = FakeNode::agent(&coordinator, "c1").await;
    let jobs = r#"
[job.mysql]
direction = "push"
client = "c1"
instances = "!list-instances"
include = ["/srv/dump/$instance"]
dest = "n1"
"#;
    let runs = submit(&coordinator, jobs, &[]).await;
    let expand_id = runs[0].id.clone();
    let expand = client.assignment().await;
    assert_eq!(expand.role(), AssignmentRole::Expand);
    assert_eq!(
        expand.job.as_ref().unwrap().instances_command,
        "list-instances"
    );
    client
        .update(RunUpdate {
            instances: vec!["3306".into(), "3307".into()],
            ..state(&expand_id, RunState::Done)
        })
        .await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let push = client.assignment().await;
        assert_eq!(push.role(), AssignmentRole::Push);
        assert_eq!(
            push.job.as_ref().unwrap().include,
            [format!("/srv/dump/{}", push.instance)]
        );
        assert_eq!(push.snapshot.as_ref().unwrap().instance, push.instance);
        seen.push(push.instance);
    }
    seen.sort();
    assert_eq!(seen, ["3306", "3307"]);
    let run = run_detail(&coordinator, &expand_id).await.run.unwrap();
    assert_eq!(run.state(), RunState::Done);
    let all = coordinator
        .client()
        .await
        .list_runs(ListRunsRequest {
            job: "mysql".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(all.len(), 3);
    assert!(all[0].created_ms >= all[2].created_ms, "newest first");
    coordinator.stop().await;
}

#[tokio::test]
async fn a_queued_run_waits_for_its_client_and_is_reassigned_after_a_reconnect() {
    let temp = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&data_dir(&temp), Duration::from_secs(5)).await;
    let _n1 = FakeNode::storage(&coordinator, "n1").await;
    let _n2 = FakeNode::storage(&coordinator, "n2").await;
    // c1 is known but not connected.
    coordinator
        .client_as(Role::Node, "c1")
        .await
        .register_node(info("c1", &[NodeRole::Agent], &[]))
        .await
        .unwrap();
    let run_id = submit(&coordinator, PUSH_JOB, &[]).await[0].id.clone();
    let detail = run_detail(&coordinator, &run_id).await;
    assert_eq!(detail.run.unwrap().state(), RunState::Queued);
    assert!(
        detail
            .events
            .iter()
            .any(|event| event.message.contains("waiting for client node c1")),
        "{:#?}",
        detail.events
    );

    let mut client = FakeNode::agent(&coordinator, "c1").await;
    let first = client.assignment().await;
    assert_eq!(first.run_id, run_id);
    assert_eq!(first.attempt, 1);
    client.update(state(&run_id, RunState::Copying)).await;
    drop(client);

    // Back without the run among its active runs: it gets it again.
    let mut client = FakeNode::agent(&coordinator, "c1").await;
    let second = client.assignment().await;
    assert_eq!(second.run_id, run_id);
    assert_eq!(second.attempt, 2);
    assert_eq!(second.snapshot, first.snapshot);

    // Back with the run active: nothing is sent again.
    let mut hello = info("c1", &[NodeRole::Agent], &[]);
    hello.active_runs = vec![run_id.clone()];
    drop(client);
    let mut client = FakeNode::connect(&coordinator, hello).await;
    client.update(committed(&second, "n1")).await;
    client.update(committed(&second, "n2")).await;
    client.update(state(&run_id, RunState::Done)).await;
    watch_to_end(&coordinator, &run_id).await;
    let run = run_detail(&coordinator, &run_id).await.run.unwrap();
    assert_eq!(run.state(), RunState::Done);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), client.inbound.message())
            .await
            .is_err(),
        "no further assignment"
    );
    coordinator.stop().await;
}

#[tokio::test]
async fn a_bad_jobs_file_is_refused_naming_the_file_job_and_key() {
    let temp = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&data_dir(&temp), Duration::from_secs(5)).await;
    let _n1 = FakeNode::storage(&coordinator, "n1").await;
    let _c1 = FakeNode::agent(&coordinator, "c1").await;
    let status = coordinator
        .client()
        .await
        .submit_jobs(SubmitJobsRequest {
            toml: format!("{PUSH_JOB}colour = \"blue\"\n"),
            file_name: "bad.toml".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let message = status.message();
    assert!(
        message.contains("bad.toml") && message.contains("db") && message.contains("colour"),
        "{message}"
    );
    let status = coordinator
        .client()
        .await
        .submit_jobs(SubmitJobsRequest {
            toml: PUSH_JOB.replace("n1& n2", "n1 n7"),
            file_name: "bad.toml".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(status.message().contains("n7"), "{}", status.message());
    assert!(
        coordinator
            .client()
            .await
            .list_jobs(ListJobsRequest {})
            .await
            .unwrap()
            .into_inner()
            .jobs
            .is_empty()
    );
    coordinator.stop().await;
}

#[tokio::test]
async fn a_run_survives_a_coordinator_restart_mid_copy() {
    let temp = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&data_dir(&temp), Duration::from_secs(5)).await;
    let n1 = FakeNode::storage(&coordinator, "n1").await;
    let n2 = FakeNode::storage(&coordinator, "n2").await;
    let mut client = FakeNode::agent(&coordinator, "c1").await;
    let run_id = submit(&coordinator, PUSH_JOB, &[]).await[0].id.clone();
    let assignment = client.assignment().await;
    client.update(state(&run_id, RunState::Copying)).await;
    client.update(committed(&assignment, "n1")).await;
    // Wait until the coordinator has the commit, then stop it mid-run.
    let mut stored = false;
    for _ in 0..200 {
        let run = run_detail(&coordinator, &run_id).await.run.unwrap();
        if run.copies[0].state() == CopyState::Done {
            stored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stored, "the n1 commit was never recorded");
    drop((client, n1, n2));
    coordinator.stop().await;

    let coordinator = Coordinator::start(&data_dir(&temp), Duration::from_secs(5)).await;
    let detail = run_detail(&coordinator, &run_id).await;
    assert_eq!(detail.run.as_ref().unwrap().state(), RunState::Copying);
    let _n1 = FakeNode::storage(&coordinator, "n1").await;
    let _n2 = FakeNode::storage(&coordinator, "n2").await;
    // The client still works on the run: it reconnects and goes on.
    let mut hello = info("c1", &[NodeRole::Agent], &[]);
    hello.active_runs = vec![run_id.clone()];
    let client = FakeNode::connect(&coordinator, hello).await;
    client.update(committed(&assignment, "n2")).await;
    client.update(state(&run_id, RunState::Done)).await;
    let events = watch_to_end(&coordinator, &run_id).await;
    assert!(events.len() > detail.events.len());
    assert_eq!(&events[..detail.events.len()], &detail.events[..]);
    let run = run_detail(&coordinator, &run_id).await.run.unwrap();
    assert_eq!(run.state(), RunState::Done);
    coordinator.stop().await;
}

#[tokio::test]
async fn a_run_whose_client_never_connects_fails_after_the_queue_timeout() {
    let temp = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start_with(&data_dir(&temp), |config| {
        config.heartbeat_interval = Duration::from_millis(100);
        config.queue_timeout = Duration::from_millis(300);
    })
    .await;
    let _n1 = FakeNode::storage(&coordinator, "n1").await;
    let _n2 = FakeNode::storage(&coordinator, "n2").await;
    coordinator
        .client_as(Role::Node, "c1")
        .await
        .register_node(info("c1", &[NodeRole::Agent], &[]))
        .await
        .unwrap();
    let run_id = submit(&coordinator, PUSH_JOB, &[]).await[0].id.clone();
    watch_to_end(&coordinator, &run_id).await;
    let run = run_detail(&coordinator, &run_id).await.run.unwrap();
    assert_eq!(run.state(), RunState::Failed);
    assert!(
        run.reason.contains("queued for more than")
            && run.reason.contains("waiting for client node c1"),
        "{}",
        run.reason
    );
    coordinator.stop().await;
}

#[tokio::test]
async fn replicas_pick_distinct_healthy_storage_nodes_and_offer_the_rest_as_spares() {
    let temp = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&data_dir(&temp), Duration::from_secs(5)).await;
    let _n1 = FakeNode::storage(&coordinator, "n1").await;
    let _n2 = FakeNode::storage(&coordinator, "n2").await;
    let _n3 = FakeNode::storage(&coordinator, "n3").await;
    let mut client = FakeNode::agent(&coordinator, "c1").await;
    let jobs = r#"
[job.web]
direction = "push"
client = "c1"
include = ["/srv/www"]
replicas = 2
"#;
    let run_id = submit(&coordinator, jobs, &[]).await[0].id.clone();
    let assignment = client.assignment().await;
    let mut nodes: Vec<&str> = assignment
        .targets
        .iter()
        .map(|target| target.node.as_str())
        .collect();
    assert!(assignment.targets.iter().all(|target| target.background));
    assert_eq!(assignment.spares.len(), 1);
    nodes.push(&assignment.spares[0].node);
    nodes.sort();
    assert_eq!(nodes, ["n1", "n2", "n3"]);
    // The first target fails for good; the client goes on with the spare.
    let failed = assignment.targets[0].node.clone();
    let kept = assignment.targets[1].node.clone();
    let spare = assignment.spares[0].node.clone();
    client
        .update(RunUpdate {
            message: "no space left".into(),
            ..dest(&run_id, &failed, CopyState::Failed)
        })
        .await;
    client
        .update(dest(&run_id, &spare, CopyState::Running))
        .await;
    client.update(committed(&assignment, &spare)).await;
    client.update(committed(&assignment, &kept)).await;
    client
        .update(RunUpdate {
            message: format!("copy to {failed} failed"),
            ..state(&run_id, RunState::Failed)
        })
        .await;
    watch_to_end(&coordinator, &run_id).await;
    let run = run_detail(&coordinator, &run_id).await.run.unwrap();
    assert_eq!(run.state(), RunState::Failed);
    let states: Vec<(String, CopyState)> = run
        .copies
        .iter()
        .map(|copy| (copy.node.clone(), copy.state()))
        .collect();
    assert_eq!(
        states,
        [
            (failed, CopyState::Failed),
            (kept, CopyState::Done),
            (spare, CopyState::Done)
        ]
    );
    coordinator.stop().await;
}

/// With `worker_limit = 1` a second run waits its turn (without timing
/// out) and is assigned when the first ends.
#[tokio::test]
async fn a_worker_limit_makes_runs_wait_their_turn() {
    let temp = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start_with(&data_dir(&temp), |config| {
        config.heartbeat_interval = Duration::from_secs(5);
        config.worker_limit = 1;
    })
    .await;
    let _n1 = FakeNode::storage(&coordinator, "n1").await;
    let mut client = FakeNode::agent(&coordinator, "c1").await;
    let jobs = r#"
[job.first]
direction = "push"
client = "c1"
include = ["/srv/a"]
dest = "n1"

[job.second]
direction = "push"
client = "c1"
include = ["/srv/b"]
dest = "n1"
"#;
    let runs = submit(&coordinator, jobs, &[]).await;
    assert_eq!(runs.len(), 2);
    let first = client.assignment().await;
    let (running, waiting) = if first.run_id == runs[0].id {
        (&runs[0], &runs[1])
    } else {
        (&runs[1], &runs[0])
    };
    let detail = run_detail(&coordinator, &waiting.id).await;
    assert_eq!(detail.run.as_ref().unwrap().state(), RunState::Queued);
    assert!(
        detail
            .events
            .iter()
            .any(|event| event.message.contains("waiting for a worker")
                && event.message.contains("worker_limit 1")),
        "{:?}",
        detail.events
    );
    client.update(state(&running.id, RunState::Copying)).await;
    client.update(committed(&first, "n1")).await;
    client.update(state(&running.id, RunState::Done)).await;
    let second = client.assignment().await;
    assert_eq!(second.run_id, waiting.id);
    coordinator.stop().await;
}

#[tokio::test]
async fn a_sync_snapshot_replaces_the_older_one_on_each_node_as_it_commits_there() {
    let temp = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&data_dir(&temp), Duration::from_secs(5)).await;
    let mut n1 = FakeNode::storage(&coordinator, "n1").await;
    let mut n2 = FakeNode::storage(&coordinator, "n2").await;
    let mut client = FakeNode::agent(&coordinator, "c1").await;
    let jobs = r#"
[job.mirror]
direction = "push"
client = "c1"
include = ["/srv/mirror"]
dest = "n1 n2"
type = "sync"
"#;
    let first_run = submit(&coordinator, jobs, &[]).await[0].id.clone();
    let first = client.assignment().await;
    client.update(state(&first_run, RunState::Copying)).await;
    client.update(committed(&first, "n1")).await;
    client.update(committed(&first, "n2")).await;
    client.update(state(&first_run, RunState::Done)).await;
    watch_to_end(&coordinator, &first_run).await;
    let first_id = first.snapshot.as_ref().unwrap().id.clone();

    let second_run = submit(&coordinator, jobs, &[]).await[0].id.clone();
    let second = client.assignment().await;
    client.update(state(&second_run, RunState::Copying)).await;
    // Committed on n1 only: n1 drops the older one now, before the run
    // ends and before n2 has the new one.
    client.update(committed(&second, "n1")).await;
    match n1.next_message().await {
        coordinator_message::Kind::DeleteSnapshots(delete) => {
            assert_eq!(delete.ids, std::slice::from_ref(&first_id));
        }
        other => panic!("n1: expected DeleteSnapshots, got {other:?}"),
    }
    client.update(committed(&second, "n2")).await;
    match n2.next_message().await {
        coordinator_message::Kind::DeleteSnapshots(delete) => {
            assert_eq!(delete.ids, std::slice::from_ref(&first_id));
        }
        other => panic!("n2: expected DeleteSnapshots, got {other:?}"),
    }
    client.update(state(&second_run, RunState::Done)).await;
    watch_to_end(&coordinator, &second_run).await;
    coordinator.stop().await;
}
