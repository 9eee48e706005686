//! What every [`StateEngine`] must do, as functions that panic on the first
//! difference: the sled engine's unit tests and the etcd engine's
//! integration test (against a real etcd) run all of [`run_all`] on an empty
//! store. An engine added later runs it too. It writes only through the
//! [`Store`] and the engine given; it never opens anything itself.

// A test suite shipped for the tests of every engine: a failure is a panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use fabric_proto::v1::{
    CatalogEntry, Job, JobSpec, Node, NodeInfo, Run, RunEvent, Snapshot, SnapshotState,
};

use super::{KeyRange, Order, StateEngine, Store, Tree};
use crate::record::RunRecord;

fn record(id: &str) -> RunRecord {
    RunRecord {
        run: Some(Run {
            id: id.into(),
            job: "db".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Every check, in turn, on one empty store and its engine.
pub async fn run_all(store: &Store, engine: &dyn StateEngine) {
    raw_keys_scan_in_order_within_their_range(engine);
    flush(store).await;
    records_read_back_as_written(store);
    runs_are_found_by_their_shortest_unique_prefix(store);
    events_are_numbered_per_run(store);
    catalog_is_ordered_by_start_time_even_before_the_epoch(store);
    damage_on_every_copy_makes_a_snapshot_damaged_and_a_repair_undoes_it(store);
    the_last_copy_takes_its_catalog_entry_with_it(store);
    flush(store).await;
}

async fn flush(store: &Store) {
    if let Err(error) = store.flush().await {
        panic!("flush failed: {error}");
    }
}

/// Scans see binary keys in byte order, both ways, within their bounds and
/// their tree only; removals return the old value.
pub fn raw_keys_scan_in_order_within_their_range(engine: &dyn StateEngine) {
    let keys: [&[u8]; 5] = [b"a", b"a/\x00", b"a/\xff", b"b", b"\xff\x00"];
    for key in keys.iter().rev() {
        engine.insert(Tree::Tokens, key, key.to_vec()).unwrap();
    }
    engine
        .insert(Tree::Jobs, b"a/x", b"other".to_vec())
        .unwrap();
    let collect = |range: &KeyRange, order: Order, limit: usize| {
        let mut seen: Vec<Vec<u8>> = Vec::new();
        engine
            .scan(Tree::Tokens, range, order, &mut |key, value| {
                assert_eq!(key, value, "a key's value is itself in this check");
                seen.push(key.to_vec());
                seen.len() < limit
            })
            .unwrap();
        seen
    };
    assert_eq!(collect(&KeyRange::all(), Order::Ascending, 99), keys);
    let mut reversed = keys.to_vec();
    reversed.reverse();
    assert_eq!(collect(&KeyRange::all(), Order::Descending, 99), reversed);
    assert_eq!(
        collect(&KeyRange::prefix(b"a/"), Order::Ascending, 99),
        [b"a/\x00".as_slice(), b"a/\xff"]
    );
    assert_eq!(
        collect(&KeyRange::prefix(b"a/"), Order::Descending, 1),
        [b"a/\xff".as_slice()]
    );
    assert_eq!(
        collect(&KeyRange::before(b"b"), Order::Descending, 1),
        [b"a/\xff".as_slice()]
    );
    assert_eq!(
        collect(&KeyRange::from(b"a/\x01"), Order::Ascending, 2),
        [b"a/\xff".as_slice(), b"b"]
    );
    assert_eq!(
        collect(&KeyRange::prefix(b"\xff"), Order::Ascending, 99),
        [b"\xff\x00".as_slice()]
    );
    let empty = KeyRange {
        start: Some(b"b".to_vec()),
        end: Some(b"a".to_vec()),
    };
    assert!(collect(&empty, Order::Ascending, 99).is_empty());
    assert_eq!(
        engine.remove(Tree::Tokens, b"b").unwrap(),
        Some(b"b".to_vec())
    );
    assert_eq!(engine.remove(Tree::Tokens, b"b").unwrap(), None);
    assert_eq!(engine.get(Tree::Tokens, b"b").unwrap(), None);
    assert_eq!(
        engine.get(Tree::Jobs, b"a/x").unwrap(),
        Some(b"other".to_vec())
    );
    for key in keys {
        engine.remove(Tree::Tokens, key).unwrap();
    }
    engine.remove(Tree::Jobs, b"a/x").unwrap();
    assert!(collect(&KeyRange::all(), Order::Ascending, 99).is_empty());
}

/// Nodes, jobs and runs read back as written; a deleted job is gone.
pub fn records_read_back_as_written(store: &Store) {
    let node = Node {
        info: Some(NodeInfo {
            id: "n1".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    store.put_node(&node).unwrap();
    assert_eq!(store.nodes().unwrap(), [node]);
    let job = Job {
        spec: Some(JobSpec {
            name: "db".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    store.put_job(&job).unwrap();
    assert_eq!(store.job("db").unwrap().as_ref(), Some(&job));
    assert_eq!(store.jobs().unwrap().len(), 1);
    assert_eq!(store.delete_job("db").unwrap(), Some(job));
    assert!(store.job("db").unwrap().is_none());
    assert!(store.delete_job("db").unwrap().is_none());
}

/// A run's short id is the shortest prefix no other run shares, and a
/// prefix finds its run, or says it is ambiguous.
pub fn runs_are_found_by_their_shortest_unique_prefix(store: &Store) {
    // Two runs of the same millisecond share the 12 characters of time.
    for id in [
        "019af3c2b7e1aaaa0001",
        "019af3c2b7e1bbbb0002",
        "019b000000000000cccc",
    ] {
        store.put_run(&record(id)).unwrap();
    }
    let unique = |id, minimum| store.run_unique_prefix_len(id, minimum).unwrap();
    assert_eq!(unique("019af3c2b7e1aaaa0001", 8), 13);
    assert_eq!(unique("019af3c2b7e1bbbb0002", 8), 13);
    assert_eq!(unique("019b000000000000cccc", 4), 4);
    assert_eq!(unique("019b000000000000cccc", 8), 8);
    for id in ["019af3c2b7e1aaaa0001", "019af3c2b7e1bbbb0002"] {
        let found = store.run_by_prefix(&id[..13]).unwrap().unwrap().unwrap();
        assert_eq!(found.id(), id);
    }
    assert!(store.run_by_prefix("019a").unwrap().is_err());
    assert!(store.run_by_prefix("9").unwrap().unwrap().is_none());
    let mut ids = Vec::new();
    store
        .visit_runs_newest_first(|record| {
            ids.push(record.id().to_owned());
            true
        })
        .unwrap();
    assert_eq!(
        ids,
        [
            "019b000000000000cccc",
            "019af3c2b7e1bbbb0002",
            "019af3c2b7e1aaaa0001"
        ]
    );
}

/// Events get sequence numbers from 1 per run, and read back from a point.
pub fn events_are_numbered_per_run(store: &Store) {
    for message in ["one", "two", "three"] {
        store
            .append_event(RunEvent {
                run_id: "0001aa".into(),
                message: message.into(),
                ..Default::default()
            })
            .unwrap();
    }
    // A run whose id extends the other's must not share its sequence.
    let other = store
        .append_event(RunEvent {
            run_id: "0001aa0".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(other.seq, 1);
    let events = store.events("0001aa", 0).unwrap();
    assert_eq!(
        events.iter().map(|event| event.seq).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(store.events("0001aa", 2).unwrap()[0].message, "three");
    assert!(store.events("0002bb", 0).unwrap().is_empty());
}

fn snapshot(id: &str, start_time_ms: i64) -> Snapshot {
    Snapshot {
        id: id.into(),
        start_time_ms,
        state: SnapshotState::Complete as i32,
        ..Default::default()
    }
}

fn ids(catalog: Vec<CatalogEntry>) -> Vec<String> {
    catalog
        .into_iter()
        .filter_map(|entry| entry.snapshot.map(|snapshot| snapshot.id))
        .collect()
}

/// The catalogue lists snapshots by start time, negative times first.
pub fn catalog_is_ordered_by_start_time_even_before_the_epoch(store: &Store) {
    for (id, time) in [("t-b", 10), ("t-a", -10), ("t-c", 0)] {
        assert!(
            store
                .add_catalog_copy(&snapshot(id, time), "n1", 0)
                .unwrap()
        );
    }
    assert!(
        !store
            .add_catalog_copy(&snapshot("t-c", 0), "n1", 0)
            .unwrap()
    );
    assert_eq!(ids(store.catalog().unwrap()), ["t-a", "t-c", "t-b"]);
}

/// Damage on every copy makes the snapshot DAMAGED; the repair of a node
/// clears its copies' marks.
pub fn damage_on_every_copy_makes_a_snapshot_damaged_and_a_repair_undoes_it(store: &Store) {
    let s1 = snapshot("d-1", 100);
    store.add_catalog_copy(&s1, "n1", 2).unwrap();
    store.add_catalog_copy(&s1, "n2", 0).unwrap();
    let entry = |store: &Store| store.catalog_entry("d-1").unwrap().unwrap();
    assert_eq!(entry(store).replica_target, 2);
    assert!(store.mark_catalog_copy_damaged("d-1", "n1", "bad").unwrap());
    assert!(!store.mark_catalog_copy_damaged("d-1", "n1", "bad").unwrap());
    let state = |store: &Store| entry(store).snapshot.unwrap().state();
    assert_eq!(state(store), SnapshotState::Complete);
    assert!(store.mark_catalog_copy_damaged("d-1", "n2", "bad").unwrap());
    assert_eq!(state(store), SnapshotState::Damaged);
    assert!(
        !store
            .set_catalog_state("d-1", SnapshotState::Verified)
            .unwrap()
    );
    assert_eq!(store.clear_catalog_damage("n2").unwrap(), 1);
    assert_eq!(state(store), SnapshotState::Complete);
    assert_eq!(entry(store).copies[0].damage, "bad");
    assert!(entry(store).copies[1].damage.is_empty());
    assert!(
        store
            .set_catalog_state("d-1", SnapshotState::Verified)
            .unwrap()
    );
    assert_eq!(state(store), SnapshotState::Verified);
}

/// Removing copies one by one removes the entry with the last.
pub fn the_last_copy_takes_its_catalog_entry_with_it(store: &Store) {
    let s = snapshot("r-1", 200);
    store.add_catalog_copy(&s, "n1", 0).unwrap();
    store.add_catalog_copy(&s, "n2", 0).unwrap();
    assert!(store.remove_catalog_copy("r-1", "n1").unwrap());
    assert!(!store.remove_catalog_copy("r-1", "n1").unwrap());
    assert_eq!(store.catalog_entry("r-1").unwrap().unwrap().copies.len(), 1);
    assert!(store.remove_catalog_copy("r-1", "n2").unwrap());
    assert!(store.catalog_entry("r-1").unwrap().is_none());
    assert!(!store.remove_catalog_copy("r-1", "n3").unwrap());
}
