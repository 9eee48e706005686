//! What the engine tells nodes leaves only after the state that made it is
//! durable. A coordinator killed between the two would otherwise have told
//! a client to run a backup its successor does not know of: the successor's
//! scheduler starts the same slot again, and the fabric holds two snapshots
//! of one run. Here the state's flush fails on demand (as etcd does while it
//! is unreachable), the nodes are played by the test through their session
//! channels, and the clock is a parameter.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fabric_coordinator::engine::{Engine, Settings};
use fabric_coordinator::state::sled_engine::SledEngine;
use fabric_coordinator::state::{KeyRange, Order, StateEngine, StateError, Store, Tree};
use fabric_proto::v1::{
    CoordinatorMessage, ListRunsRequest, NodeInfo, NodeRole, SubmitJobsRequest, coordinator_message,
};
use futures::future::BoxFuture;
use tokio::sync::mpsc::UnboundedReceiver;

/// sled whose flush fails while `unreachable` is set.
struct FlakyState {
    sled: SledEngine,
    unreachable: AtomicBool,
}

impl StateEngine for FlakyState {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        self.sled.get(tree, key)
    }

    fn insert(&self, tree: Tree, key: &[u8], value: Vec<u8>) -> Result<(), StateError> {
        self.sled.insert(tree, key, value)
    }

    fn remove(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        self.sled.remove(tree, key)
    }

    fn scan(
        &self,
        tree: Tree,
        range: &KeyRange,
        order: Order,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StateError> {
        self.sled.scan(tree, range, order, visit)
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StateError>> {
        if self.unreachable.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(StateError::Sled {
                    action: "flush (the test made the state unreachable)".into(),
                    source: sled::Error::Io(std::io::Error::other("unreachable")),
                })
            });
        }
        self.sled.flush()
    }
}

fn node(id: &str, role: NodeRole) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        address: format!("http://{id}.invalid:7401"),
        roles: vec![role as i32],
        capacity_bytes: 1 << 30,
        free_bytes: 1 << 29,
        ..Default::default()
    }
}

fn assignments(receiver: &mut UnboundedReceiver<CoordinatorMessage>) -> Vec<String> {
    let mut runs = Vec::new();
    while let Ok(message) = receiver.try_recv() {
        if let Some(coordinator_message::Kind::Assignment(assignment)) = message.kind {
            runs.push(assignment.run_id);
        }
    }
    runs
}

#[tokio::test]
async fn a_scheduled_assignment_waits_until_its_run_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let state = Arc::new(FlakyState {
        sled: SledEngine::open(dir.path()).unwrap(),
        unreachable: AtomicBool::new(false),
    });
    let engine = Engine::open(
        Store::new(state.clone()),
        Settings {
            // Virtual time jumps minutes: nobody is lost meanwhile.
            lost_after: Duration::from_secs(24 * 3600),
            ..Settings::default()
        },
    )
    .unwrap();
    let (_, mut client) = engine
        .open_session(node("c1", NodeRole::Agent))
        .await
        .unwrap();
    let (_, _storage) = engine
        .open_session(node("n1", NodeRole::Storage))
        .await
        .unwrap();
    engine
        .submit_jobs(
            SubmitJobsRequest {
                toml: r#"
[job.web]
direction = "push"
client = "c1"
include = ["/srv"]
dest = "n1"
schedule = { often = { interval = "1h", keep = 3 } }
"#
                .into(),
                no_run: true,
                ..Default::default()
            },
            "operator/test",
        )
        .await
        .unwrap();
    assert!(assignments(&mut client).is_empty());

    // The state cannot be written when the slot falls due: the run is
    // started in memory, but its client hears nothing of it.
    state.unreachable.store(true, Ordering::SeqCst);
    let start = fabric_coordinator::engine::now_ms();
    let mut now = start;
    let mut failed_ticks = 0;
    while now < start + 2 * 3_600_000 {
        if engine.tick_at(now).await.is_err() {
            failed_ticks += 1;
        }
        now += 60_000;
    }
    assert!(failed_ticks > 0, "a run fell due while the state was down");
    assert_eq!(assignments(&mut client), Vec::<String>::new());

    // Once a write goes through, the assignment leaves, once.
    state.unreachable.store(false, Ordering::SeqCst);
    engine.tick_at(now).await.unwrap();
    let runs = engine
        .list_runs(&ListRunsRequest {
            job: "web".into(),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(assignments(&mut client), vec![runs[0].id.clone()]);
    engine.tick_at(now + 1000).await.unwrap();
    assert_eq!(assignments(&mut client), Vec::<String>::new());
}
