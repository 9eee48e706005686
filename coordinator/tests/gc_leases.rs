//! GC leases and pruning for space, in the engine (real state on disk,
//! nodes played by the test through their session channels, the clock a
//! parameter): which node may collect when, and what pruning removes.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use fabric_coordinator::engine::{Engine, GcSettings, Settings};
use fabric_coordinator::state::Store;
use fabric_proto::v1::{
    CoordinatorMessage, GcDone, GcReport, Heartbeat, NodeInfo, NodeMessage, NodeRole, Snapshot,
    SnapshotState, SnapshotsDeleted, coordinator_message, node_message,
};
use tokio::sync::mpsc::UnboundedReceiver;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

fn settings() -> Settings {
    Settings {
        // Virtual time jumps hours: nobody is lost meanwhile.
        lost_after: Duration::from_secs(365 * 24 * 3600),
        gc: GcSettings {
            every: Duration::from_secs(3600),
            ..GcSettings::default()
        },
        ..Settings::default()
    }
}

fn storage(id: &str, target_free_bytes: u64, free_bytes: u64) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        address: format!("http://{id}.invalid:7401"),
        roles: vec![NodeRole::Storage as i32],
        capacity_bytes: 1 << 30,
        free_bytes,
        target_free_bytes,
        ..Default::default()
    }
}

fn snapshot(id: &str, job: &str, end_time_ms: i64) -> Snapshot {
    Snapshot {
        id: id.into(),
        job: job.into(),
        host: "web1".into(),
        start_time_ms: end_time_ms - 1000,
        end_time_ms,
        state: SnapshotState::Complete as i32,
        ..Default::default()
    }
}

/// Every message queued for a node now (the engine hands a call's messages
/// to the sessions when the call commits, so nothing is in flight after it
/// returns).
fn drain(receiver: &mut UnboundedReceiver<CoordinatorMessage>) -> Vec<coordinator_message::Kind> {
    let mut out = Vec::new();
    while let Ok(message) = receiver.try_recv() {
        out.extend(message.kind);
    }
    out
}

fn leases(messages: &[coordinator_message::Kind]) -> Vec<u64> {
    messages
        .iter()
        .filter_map(|kind| match kind {
            coordinator_message::Kind::GcLease(lease) => Some(lease.lease_id),
            _ => None,
        })
        .collect()
}

fn deletions(messages: &[coordinator_message::Kind]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|kind| match kind {
            coordinator_message::Kind::DeleteSnapshots(delete) => Some(delete.ids.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

async fn done(engine: &Engine, node: &str, lease_id: u64, freed_bytes: u64) {
    engine
        .session_message(
            node,
            NodeMessage {
                kind: Some(node_message::Kind::GcDone(GcDone {
                    lease_id,
                    report: Some(GcReport {
                        freed_bytes,
                        ..Default::default()
                    }),
                    error: String::new(),
                })),
            },
        )
        .await
        .unwrap();
}

async fn heartbeat(engine: &Engine, node: &str, free_bytes: u64, gc_lease_id: u64) {
    engine
        .session_message(
            node,
            NodeMessage {
                kind: Some(node_message::Kind::Heartbeat(Heartbeat {
                    free_bytes,
                    gc_lease_id,
                    ..Default::default()
                })),
            },
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn nodes_sharing_a_snapshot_never_collect_at_once() {
    let temp = tempfile::tempdir().unwrap();
    let store = Store::open(temp.path()).unwrap();
    // n1 and n2 hold copies of one snapshot; n3 holds its own.
    // A second in the past: a collection's end (stamped with the real clock)
    // comes after the first tick, never in the same millisecond.
    let now = fabric_coordinator::engine::now_ms() - 1000;
    let shared = snapshot("shared", "web", now - DAY);
    store.add_catalog_copy(&shared, "n1", 0).unwrap();
    store.add_catalog_copy(&shared, "n2", 0).unwrap();
    store
        .add_catalog_copy(&snapshot("alone", "web", now - DAY), "n3", 0)
        .unwrap();
    let engine = Engine::open(store, settings()).unwrap();
    let mut sessions = Vec::new();
    for id in ["n1", "n2", "n3"] {
        let (_, receiver) = engine.open_session(storage(id, 0, 1 << 29)).await.unwrap();
        sessions.push(receiver);
    }
    // Not yet due: the routine interval counts from when the coordinator
    // first saw them.
    engine.tick_at(now).await.unwrap();
    assert!(sessions.iter_mut().all(|s| leases(&drain(s)).is_empty()));

    // An hour later all three are due; n1 goes first, n2 shares with it
    // and waits, n3 shares with nobody.
    engine.tick_at(now + 2 * HOUR).await.unwrap();
    let n1 = leases(&drain(&mut sessions[0]));
    let n2 = leases(&drain(&mut sessions[1]));
    let n3 = leases(&drain(&mut sessions[2]));
    assert_eq!(
        (n1.len(), n2.len(), n3.len()),
        (1, 0, 1),
        "{n1:?} {n2:?} {n3:?}"
    );

    // Still collecting: n2 waits however often the engine ticks.
    engine.tick_at(now + 2 * HOUR + 1000).await.unwrap();
    assert!(leases(&drain(&mut sessions[1])).is_empty());

    // n1 is done: now n2 may.
    done(&engine, "n1", n1[0], 4096).await;
    engine.tick_at(now + 2 * HOUR + 2000).await.unwrap();
    let n2 = leases(&drain(&mut sessions[1]));
    assert_eq!(n2.len(), 1);
    assert!(
        leases(&drain(&mut sessions[0])).is_empty(),
        "n1 collected an hour ago at most"
    );

    // A coordinator that restarted learns from heartbeats who is still
    // collecting: n2's heartbeat names its lease, so n1 waits for it.
    drop(engine);
    let store = Store::open(temp.path()).unwrap();
    let engine = Engine::open(store, settings()).unwrap();
    let mut n1_session = engine
        .open_session(storage("n1", 0, 1 << 29))
        .await
        .unwrap()
        .1;
    let mut n2_session = engine
        .open_session(storage("n2", 0, 1 << 29))
        .await
        .unwrap()
        .1;
    // Its first tick starts the routine interval anew.
    engine.tick_at(now + 10 * HOUR).await.unwrap();
    heartbeat(&engine, "n2", 1 << 29, n2[0]).await;
    engine.tick_at(now + 12 * HOUR).await.unwrap();
    assert!(leases(&drain(&mut n1_session)).is_empty());
    assert!(leases(&drain(&mut n2_session)).is_empty());
    // n2's next heartbeat says its collection is over: one of the two may
    // go now, not both.
    heartbeat(&engine, "n2", 1 << 29, 0).await;
    engine.tick_at(now + 12 * HOUR + 1000).await.unwrap();
    let granted = leases(&drain(&mut n1_session)).len() + leases(&drain(&mut n2_session)).len();
    assert_eq!(granted, 1);
}

#[tokio::test]
async fn a_node_under_its_target_loses_its_least_important_snapshots_then_says_why_it_stops() {
    let temp = tempfile::tempdir().unwrap();
    let store = Store::open(temp.path()).unwrap();
    let now = fabric_coordinator::engine::now_ms();
    // Daily snapshots of one job, 0 to 5 days old, and one of another job.
    for age in 0..6 {
        store
            .add_catalog_copy(
                &snapshot(&format!("web-{age}"), "web", now - age * DAY),
                "n1",
                0,
            )
            .unwrap();
    }
    store
        .add_catalog_copy(&snapshot("db-0", "db", now - HOUR), "n1", 0)
        .unwrap();
    let engine = Engine::open(store, settings()).unwrap();
    let (_, mut session) = engine
        .open_session(storage("n1", 1 << 30, 1 << 20))
        .await
        .unwrap();
    heartbeat(&engine, "n1", 1 << 20, 0).await;

    let mut removed = Vec::new();
    let mut t = now;
    for _ in 0..20 {
        t += 1000;
        engine.tick_at(t).await.unwrap();
        let messages = drain(&mut session);
        let ids = deletions(&messages);
        if !ids.is_empty() {
            assert_eq!(ids.len(), 1, "one snapshot per round: {ids:?}");
            removed.extend(ids.clone());
            engine
                .session_message(
                    "n1",
                    NodeMessage {
                        kind: Some(node_message::Kind::Deleted(SnapshotsDeleted {
                            deleted: ids,
                            refused: Vec::new(),
                        })),
                    },
                )
                .await
                .unwrap();
            // A prune's collection does not wait for a window or gc_every.
            t += 1000;
            engine.tick_at(t).await.unwrap();
            let lease = leases(&drain(&mut session));
            assert_eq!(lease.len(), 1, "a GC follows each prune");
            done(&engine, "n1", lease[0], 1 << 10).await;
            heartbeat(&engine, "n1", 1 << 20, 0).await;
        }
    }
    // byteback's order: the gaps between its target ages go first (4 days
    // old is nearest to none of 0, 1, 2, 3 and 7 days), then the rest, but
    // never a job's newest.
    assert_eq!(
        removed.first().map(String::as_str),
        Some("web-4"),
        "{removed:?}"
    );
    assert_eq!(removed.len(), 5, "{removed:?}");
    assert!(!removed.contains(&"web-0".to_owned()), "{removed:?}");
    assert!(!removed.contains(&"db-0".to_owned()), "{removed:?}");
    let node = engine
        .nodes()
        .await
        .into_iter()
        .find(|node| node.info.as_ref().unwrap().id == "n1")
        .unwrap();
    assert!(
        node.prune_blocked.contains("target_free") && node.prune_blocked.contains("newest"),
        "{}",
        node.prune_blocked
    );
    assert!(node.last_gc_ms > 0);

    // Back above the target: the message goes (a blocked node is looked
    // at again a minute later).
    heartbeat(&engine, "n1", 2 << 30, 0).await;
    engine.tick_at(t + 1000).await.unwrap();
    let node = engine.nodes().await.into_iter().next().unwrap();
    assert!(!node.prune_blocked.is_empty());
    engine.tick_at(t + 61_000).await.unwrap();
    let node = engine.nodes().await.into_iter().next().unwrap();
    assert!(node.prune_blocked.is_empty(), "{}", node.prune_blocked);
}

#[tokio::test]
async fn a_failed_collection_is_retried_a_minute_later_and_bad_asks_are_refused() {
    let temp = tempfile::tempdir().unwrap();
    let engine = Engine::open(Store::open(temp.path()).unwrap(), settings()).unwrap();
    let now = fabric_coordinator::engine::now_ms();
    let (_, mut session) = engine
        .open_session(storage("n1", 0, 1 << 29))
        .await
        .unwrap();
    engine.tick_at(now).await.unwrap();
    engine.tick_at(now + 2 * HOUR).await.unwrap();
    let lease = leases(&drain(&mut session));
    assert_eq!(lease.len(), 1);
    engine
        .session_message(
            "n1",
            NodeMessage {
                kind: Some(node_message::Kind::GcDone(GcDone {
                    lease_id: lease[0],
                    report: None,
                    error: "the store refuses writes after a failed flush".into(),
                })),
            },
        )
        .await
        .unwrap();
    let node = engine.nodes().await.into_iter().next().unwrap();
    assert!(node.last_gc_error.contains("failed flush"), "{node:?}");
    // Not again on the next ticks (the failure's time is the real clock's).
    let failed_at = node.last_gc_ms;
    engine.tick_at(failed_at + 1000).await.unwrap();
    assert!(leases(&drain(&mut session)).is_empty());
    engine.tick_at(failed_at + 61_000).await.unwrap();
    assert_eq!(leases(&drain(&mut session)).len(), 1);

    // What an operator may not ask, refused at once, naming the input.
    let agent = NodeInfo {
        roles: vec![NodeRole::Agent as i32],
        ..storage("c1", 0, 0)
    };
    let _agent_session = engine.open_session(agent).await.unwrap();
    for (node, threshold, expected) in [
        ("nobody", 0.0, "no node \"nobody\""),
        ("c1", 0.0, "c1 is not a storage node"),
        ("n1", 1.5, "repack_threshold"),
    ] {
        let error = engine
            .collect_garbage(node, threshold)
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{error}");
    }
}

async fn deleted(engine: &Engine, node: &str, id: &str) {
    engine
        .session_message(
            node,
            NodeMessage {
                kind: Some(node_message::Kind::Deleted(SnapshotsDeleted {
                    deleted: vec![id.into()],
                    refused: Vec::new(),
                })),
            },
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_deletion_after_a_lease_was_granted_wants_another_collection() {
    let temp = tempfile::tempdir().unwrap();
    let engine = Engine::open(Store::open(temp.path()).unwrap(), settings()).unwrap();
    let (_, mut session) = engine
        .open_session(storage("n1", 0, 1 << 29))
        .await
        .unwrap();
    let now = fabric_coordinator::engine::now_ms;
    // Deletions are stamped with the real clock, so the ticks use it too.
    deleted(&engine, "n1", "first").await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    engine.tick_at(now()).await.unwrap();
    let first = leases(&drain(&mut session));
    assert_eq!(first.len(), 1, "a deletion wants a collection");
    // Another deletion while that collection runs: it may have missed it.
    tokio::time::sleep(Duration::from_millis(5)).await;
    deleted(&engine, "n1", "second").await;
    done(&engine, "n1", first[0], 0).await;
    let node = engine.nodes().await.into_iter().next().unwrap();
    assert!(node.gc_wanted_since_ms > 0, "still wanted: {node:?}");
    tokio::time::sleep(Duration::from_millis(5)).await;
    engine.tick_at(now()).await.unwrap();
    let second = leases(&drain(&mut session));
    assert_eq!(second.len(), 1, "and granted again");
    // This one came after both: nothing more is wanted.
    done(&engine, "n1", second[0], 0).await;
    let node = engine.nodes().await.into_iter().next().unwrap();
    assert_eq!(node.gc_wanted_since_ms, 0, "{node:?}");
}
