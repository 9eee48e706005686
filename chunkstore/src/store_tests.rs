//! Tests of the whole store: round trips, dedup, commits, GC, damage and repair.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use fabric_proto::v1::{EntryKind, Snapshot, SnapshotState, SnapshotType, Tree, TreeEntry};
use proptest::prelude::*;

use crate::chunker::{Chunk, ChunkParams, ChunkReader};
use crate::error::StoreError;
use crate::gc::GcOptions;
use crate::id::ChunkId;
use crate::sink::{ChunkSink, ChunkSource};
use crate::store::{Store, StoreConfig};
use crate::verify::{ProblemKind, VerifyOptions};

pub(crate) fn small_config() -> StoreConfig {
    StoreConfig {
        chunk_params: ChunkParams {
            min_size: 1024,
            avg_size: 4096,
            max_size: 16384,
        },
        zstd_level: 1,
        pack_target_size: 64 * 1024,
        repack_threshold: 0.5,
        index_cache_bytes: 4 << 20,
    }
}

/// [`crate::test_data::pseudo_random`] with the seed spread over all 64
/// bits, so that the small seeds these tests use give unrelated streams.
pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    crate::test_data::pseudo_random(len, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// `count` incompressible chunks of `len` bytes, from seeds `first_seed`...
fn random_chunks(count: u64, len: usize, first_seed: u64) -> Vec<Chunk> {
    (first_seed..first_seed + count)
        .map(|seed| Chunk::new(pseudo_random(len, seed)))
        .collect()
}

/// Every one of `chunks` reads back from `store` as its own bytes.
fn assert_reads_back<'c>(store: &Store, chunks: impl IntoIterator<Item = &'c Chunk>) {
    for chunk in chunks {
        assert_eq!(store.get_chunk(&chunk.id).unwrap(), chunk.data);
    }
}

/// Make the next pack fsync of `store` fail, as a disk error would.
fn fail_next_pack_sync(store: &Store) {
    store
        .fail_next_sync
        .store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Half random, half repetitive: some chunks compress, some do not.
pub(crate) fn file_content(len: usize, seed: u64) -> Vec<u8> {
    let mut data = pseudo_random(len / 2, seed);
    data.extend(
        format!("line {seed} of some text that repeats; ")
            .bytes()
            .cycle()
            .take(len - len / 2),
    );
    data
}

/// Store `files` (name, content) as one directory and commit a snapshot named `name`.
pub(crate) fn backup(store: &Store, name: &str, files: &[(String, Vec<u8>)]) -> Snapshot {
    try_backup(store, name, files).unwrap()
}

/// [`backup`], returning the store's error.
pub(crate) fn try_backup(
    store: &Store,
    name: &str,
    files: &[(String, Vec<u8>)],
) -> Result<Snapshot, StoreError> {
    let mut entries = Vec::new();
    for (file_name, content) in files {
        let chunks: Vec<Chunk> = ChunkReader::new(&content[..], store.config().chunk_params)
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let ids = chunks.iter().map(|c| c.id.to_vec()).collect();
        store.put_chunks(chunks)?;
        entries.push(TreeEntry {
            name: file_name.as_bytes().to_vec(),
            kind: EntryKind::File as i32,
            size: content.len() as u64,
            chunk_ids: ids,
            ..Default::default()
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let sub = store.put_tree(&Tree {
        entries,
        parts: Vec::new(),
    })?;
    let root = store.put_tree(&Tree {
        entries: vec![TreeEntry {
            name: b"dir".to_vec(),
            kind: EntryKind::Dir as i32,
            subtree_id: sub.to_vec(),
            ..Default::default()
        }],
        parts: Vec::new(),
    })?;
    store.commit_snapshot(Snapshot {
        name: name.to_owned(),
        job: "job".into(),
        root_tree_id: root.to_vec(),
        ..Default::default()
    })
}

/// [`backup`], again from the start while a concurrent GC swept chunks it
/// had put before the commit (the commit refuses with `MissingChunk`).
pub(crate) fn backup_retrying(store: &Store, name: &str, files: &[(String, Vec<u8>)]) -> Snapshot {
    for _ in 0..20 {
        match try_backup(store, name, files) {
            Ok(snapshot) => return snapshot,
            Err(StoreError::MissingChunk { .. }) => continue,
            Err(err) => panic!("backup {name}: {err}"),
        }
    }
    panic!("backup {name} refused 20 times");
}

/// Read back every file of `snapshot` (made by [`backup`]): (name, content).
pub(crate) fn restore(
    store: &Store,
    snapshot: &Snapshot,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let root = store.get_tree(&ChunkId::from_slice(&snapshot.root_tree_id).unwrap())?;
    let sub = store.get_tree(&ChunkId::from_slice(&root.entries[0].subtree_id).unwrap())?;
    let mut files = Vec::new();
    for entry in sub.entries {
        let mut content = Vec::new();
        for raw in &entry.chunk_ids {
            content.extend(store.get_chunk(&ChunkId::from_slice(raw).unwrap())?);
        }
        files.push((String::from_utf8(entry.name).unwrap(), content));
    }
    Ok(files)
}

fn files(count: usize, len: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|i| (format!("f{i}"), file_content(len, seed * 100 + i as u64)))
        .collect()
}

#[test]
fn chunks_round_trip_and_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    let data = file_content(100_000, 1);
    let chunks: Vec<Chunk> = ChunkReader::new(&data[..], store.config().chunk_params)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
    assert_eq!(store.missing(&ids).unwrap(), ids);
    let first = store.put_chunks(chunks.clone()).unwrap();
    assert_eq!(first.new_chunks, ids.len() as u64);
    assert_eq!(first.new_bytes, 100_000);
    let again = store.put_chunks(chunks).unwrap();
    assert_eq!(again.new_chunks, 0);
    assert!(store.missing(&ids).unwrap().is_empty());
    let mut back = Vec::new();
    for id in &ids {
        assert!(store.contains(id).unwrap());
        back.extend(store.get_chunk(id).unwrap());
    }
    assert_eq!(back, data);
    let stats = store.stats().unwrap();
    assert_eq!(stats.chunks, ids.len() as u64);
    assert_eq!(stats.logical_bytes, 100_000);
    assert!(stats.compression_ratio > 1.2, "{stats:?}");
    assert!(stats.fs_capacity_bytes > 0);
    let counts = store.index_counts().unwrap();
    assert_eq!(
        (counts.chunks, counts.logical_bytes, counts.stored_bytes),
        (stats.chunks, stats.logical_bytes, stats.stored_bytes)
    );
}

#[test]
fn a_chunk_another_writer_stored_and_indexed_since_the_check_is_not_appended_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    let taken = Chunk::new(pseudo_random(8000, 1));
    let other = Chunk::new(pseudo_random(8000, 2));
    // This writer finds both chunks fresh and starts encoding them...
    let (fresh, checked) = store.fresh_positions(&[taken.id, other.id]).unwrap();
    assert_eq!(fresh, vec![0, 1]);
    let entries = [&taken, &other]
        .map(|chunk| crate::pack::encode_entry(chunk.id, &chunk.data, 1))
        .into();
    // ...meanwhile another stores one of them durably: in the index, no
    // longer pending...
    assert_eq!(store.put_chunks(vec![taken.clone()]).unwrap().new_chunks, 1);
    // ...so only the other is appended.
    let appended = store.append(entries, checked).unwrap();
    let placed: Vec<ChunkId> = appended.placed.iter().map(|(id, _)| *id).collect();
    assert_eq!(placed, vec![other.id]);
    assert!(appended.sealed.is_empty());
    drop(appended);
    store.flush_pending().unwrap();
    assert_eq!(store.stats().unwrap().chunks, 2);
    assert_reads_back(&store, [&taken, &other]);
}

#[test]
fn pending_batches_are_readable_at_once_and_durable_after_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = random_chunks(5, 4000, 0);
    let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
    {
        let store = Store::open_or_create(dir.path(), small_config()).unwrap();
        let mut bad = chunks[0].clone();
        bad.data[0] ^= 1;
        assert!(matches!(
            store.put_chunks_pending(vec![chunks[1].clone(), bad]),
            Err(StoreError::ChunkMismatch { .. })
        ));
        assert!(
            !store.contains(&ids[1]).unwrap(),
            "nothing of a bad batch is stored"
        );
        let stats = store.put_chunks_pending(chunks.clone()).unwrap();
        assert_eq!(stats.new_chunks, 5);
        assert_eq!(stats.new_bytes, 20_000);
        assert!(store.missing(&ids).unwrap().is_empty());
        assert_eq!(store.get_chunk(&ids[3]).unwrap(), chunks[3].data);
        store.flush_pending().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_reads_back(&store, &chunks);
}

#[test]
fn stored_chunks_are_checked_kept_as_sent_and_read_back_as_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    let chunks: Vec<Chunk> = (0..6).map(|i| Chunk::new(file_content(4000, i))).collect();
    let encoded = crate::pack::encode_chunks(chunks.clone(), 3);

    let mut bad = encoded[0].clone();
    bad.flip_stored_byte(bad.stored.len() - 1, 0x20);
    let err = store
        .put_stored_pending(vec![encoded[1].clone(), bad])
        .unwrap_err();
    assert!(
        matches!(err, StoreError::ChunkMismatch { id } | StoreError::BadEncoding { id, .. } if id == chunks[0].id),
        "{err}"
    );
    assert!(err.to_string().contains(&chunks[0].id.to_hex()));
    assert!(
        !store.contains(&chunks[1].id).unwrap(),
        "nothing of a bad batch is stored"
    );

    let mut twice = encoded.clone();
    twice.push(encoded[2].clone());
    let stats = store.put_stored_pending(twice).unwrap();
    assert_eq!(stats.chunks, 7);
    assert_eq!(stats.new_chunks, 6);
    assert_eq!(stats.new_bytes, 24_000);
    let stored_total: u64 = encoded
        .iter()
        .map(|c| (crate::pack::ENTRY_HEADER_LEN + c.stored.len()) as u64)
        .sum();
    assert_eq!(
        stats.stored_bytes, stored_total,
        "kept as sent, not recompressed"
    );
    assert_eq!(
        store
            .put_stored_pending(encoded.clone())
            .unwrap()
            .new_chunks,
        0
    );
    store.flush_pending().unwrap();
    drop(store);

    let store = Store::open(dir.path()).unwrap();
    for (chunk, sent) in chunks.iter().zip(&encoded) {
        assert_eq!(store.get_chunk(&chunk.id).unwrap(), chunk.data);
        assert_eq!(&store.get_stored(&chunk.id).unwrap(), sent);
    }
    let absent = ChunkId::of(b"absent");
    assert!(matches!(
        store.get_stored(&absent),
        Err(StoreError::ChunkNotFound { id, .. }) if id == absent
    ));
}

#[test]
fn missing_keeps_the_offered_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    let chunks = random_chunks(6, 2000, 0);
    store
        .put_chunks(vec![chunks[1].clone(), chunks[4].clone()])
        .unwrap();
    let offered = [5, 1, 0, 3, 4, 2, 0].map(|i| chunks[i].id);
    let expected = [5, 0, 3, 2].map(|i| chunks[i].id);
    assert_eq!(store.missing(&offered).unwrap(), expected);
}

#[test]
fn a_batch_with_one_wrong_hash_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    let good = Chunk::new(pseudo_random(3000, 1));
    let mut bad = Chunk::new(pseudo_random(3000, 2));
    bad.data[10] ^= 1;
    let err = store
        .put_chunks(vec![good.clone(), bad.clone()])
        .unwrap_err();
    assert!(matches!(err, StoreError::ChunkMismatch { id } if id == bad.id));
    assert!(err.to_string().contains(&bad.id.to_hex()));
    assert!(!store.contains(&good.id).unwrap());
    assert!(ChunkSink::put_chunk(&store, bad).is_err());
}

#[test]
fn other_chunk_params_are_refused_naming_both_and_the_dir() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open_or_create(dir.path(), small_config()).unwrap());
    let err = Store::open_or_create(dir.path(), StoreConfig::default()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("min=1024 avg=4096 max=16384"), "{text}");
    assert!(
        text.contains("min=524288 avg=1048576 max=4194304"),
        "{text}"
    );
    assert!(text.contains(&dir.path().display().to_string()), "{text}");
    let reopened = Store::open(dir.path()).unwrap();
    assert_eq!(reopened.config(), &small_config());
    let recorded = std::fs::read_to_string(dir.path().join("config.toml")).unwrap();
    assert!(recorded.contains("avg_size = 4096"), "{recorded}");
}

#[test]
fn open_without_a_store_names_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("config.toml"), "{err}");
}

#[test]
fn commit_fills_in_the_record_and_find_understands_ids_prefixes_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    let first = backup(&store, "", &files(2, 20_000, 1));
    assert_eq!(first.id.len(), 32);
    assert!(first.id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(first.state, SnapshotState::Complete as i32);
    assert!(first.end_time_ms > 0);
    assert!(first.name.starts_with("job/"), "{}", first.name);
    let second = backup(&store, "nightly", &files(2, 20_000, 2));
    let listed: Vec<String> = store
        .list_snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(listed, [first.id.clone(), second.id.clone()]);
    assert_eq!(store.find_snapshot(&first.id).unwrap(), first);
    assert_eq!(store.find_snapshot(&second.id[..8]).unwrap(), second);
    assert_eq!(store.find_snapshot("nightly").unwrap(), second);
    let err = store.find_snapshot("nope").unwrap_err();
    assert!(matches!(err, StoreError::SnapshotNotFound { .. }));
    assert!(err.to_string().contains("nope"));
    // Another full snapshot under a taken name gets a name of its own.
    let third = backup(&store, "nightly", &files(1, 5_000, 3));
    assert_eq!(third.name, "nightly-2");
    assert_eq!(store.find_snapshot("nightly").unwrap(), second);
    assert_eq!(store.find_snapshot("nightly-2").unwrap(), third);
    assert_eq!(store.delete_snapshot(&third.id).unwrap(), third);
    assert_eq!(store.find_snapshot("nightly").unwrap(), second);
    assert!(restore(&store, &first).unwrap() == files(2, 20_000, 1));
}

#[test]
fn a_runs_second_commit_is_answered_with_its_first_and_another_runs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    let first_read = backup(&store, "", &files(2, 20_000, 1));
    let retry_read = backup(&store, "", &files(2, 20_000, 2));
    let run = |root: &[u8], job: &str| Snapshot {
        id: "0123456789abcdef0123456789abcdef".into(),
        job: job.into(),
        host: "db1".into(),
        start_time_ms: 1_700_000_000_000,
        root_tree_id: root.to_vec(),
        ..Default::default()
    };
    let committed = store
        .commit_snapshot(run(&first_read.root_tree_id, "db"))
        .unwrap();
    // The retry read changed files: its root differs, the run is the same.
    let again = store
        .commit_snapshot(run(&retry_read.root_tree_id, "db"))
        .unwrap();
    assert_eq!(again, committed);
    let other = store
        .commit_snapshot(run(&first_read.root_tree_id, "web"))
        .unwrap_err();
    assert!(
        matches!(other, StoreError::SnapshotExists { .. }),
        "{other}"
    );
}

#[test]
fn full_snapshots_of_one_second_get_distinct_names_and_a_sync_name_finds_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    let content = backup(&store, "", &files(1, 1000, 1));
    let record = |kind: SnapshotType, start: i64| Snapshot {
        job: "binlogs".into(),
        host: "vm".into(),
        r#type: kind as i32,
        start_time_ms: start,
        root_tree_id: content.root_tree_id.clone(),
        ..Default::default()
    };
    let second = 1_700_000_000_000;
    let first = store
        .commit_snapshot(record(SnapshotType::Full, second))
        .unwrap();
    let again = store
        .commit_snapshot(record(SnapshotType::Full, second + 400))
        .unwrap();
    let third = store
        .commit_snapshot(record(SnapshotType::Full, second + 800))
        .unwrap();
    assert_eq!(again.name, format!("{}-2", first.name));
    assert_eq!(third.name, format!("{}-3", first.name));
    assert_eq!(store.find_snapshot(&again.name).unwrap(), again);

    let mut syncs = Vec::new();
    for start in [second, second + 1000, second + 2000] {
        syncs.push(
            store
                .commit_snapshot(record(SnapshotType::Sync, start))
                .unwrap(),
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(syncs.iter().all(|s| s.name == "binlogs/vm"), "{syncs:?}");
    assert_eq!(store.find_snapshot("binlogs/vm").unwrap(), syncs[2]);
}

#[test]
fn a_commit_referencing_a_missing_chunk_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    let absent = ChunkId::of(b"never stored");
    let tree = store
        .put_tree(&Tree {
            entries: vec![TreeEntry {
                name: b"file".to_vec(),
                kind: EntryKind::File as i32,
                chunk_ids: vec![absent.to_vec()],
                ..Default::default()
            }],
            parts: Vec::new(),
        })
        .unwrap();
    let err = store
        .commit_snapshot(Snapshot {
            name: "broken".into(),
            root_tree_id: tree.to_vec(),
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::MissingChunk { id, path, .. } if *id == absent && path == "/file"),
        "{err}"
    );
    assert!(err.to_string().contains("broken"));
    assert!(store.list_snapshots().unwrap().is_empty());
    let err = store
        .commit_snapshot(Snapshot {
            name: "no root".into(),
            root_tree_id: ChunkId::of(b"no tree").to_vec(),
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::MissingChunk { .. }), "{err}");
}

#[test]
fn sink_chunks_are_readable_before_flush_and_durable_after() {
    let dir = tempfile::tempdir().unwrap();
    let chunks: Vec<Chunk> = (0..40).map(|i| Chunk::new(file_content(5000, i))).collect();
    {
        let store = Store::open_or_create(dir.path(), small_config()).unwrap();
        for chunk in &chunks {
            store.put_chunk(chunk.clone()).unwrap();
            assert!(store.contains(&chunk.id).unwrap());
            assert_eq!(Store::get_chunk(&store, &chunk.id).unwrap(), chunk.data);
        }
        ChunkSink::flush(&store).unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    for chunk in &chunks {
        assert_eq!(
            ChunkSource::get_chunk(&store, &chunk.id).unwrap(),
            chunk.data
        );
    }
    assert!(store.verify(&VerifyOptions::default()).unwrap().is_ok());
}

#[test]
fn put_chunks_of_a_chunk_pending_in_the_sink_makes_it_durable() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = Chunk::new(file_content(5000, 3));
    {
        let store = Store::open_or_create(dir.path(), small_config()).unwrap();
        store.put_chunk(chunk.clone()).unwrap();
        let stats = store.put_chunks(vec![chunk.clone()]).unwrap();
        assert_eq!(stats.new_chunks, 0);
        // Durable now: in the index, not only pending.
        assert!(store.index.contains(&chunk.id).unwrap());
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.get_chunk(&chunk.id).unwrap(), chunk.data);
}

#[test]
fn concurrent_puts_and_flushes_index_every_chunk_once_its_pack_is_synced() {
    let dir = tempfile::tempdir().unwrap();
    // 64 KiB packs: each writer fills and seals several while the others
    // append and the flusher indexes.
    let writers: Vec<Vec<Chunk>> = (0..4u64)
        .map(|writer| {
            (0..30)
                .map(|i| Chunk::new(file_content(5000, writer * 1000 + i)))
                .collect()
        })
        .collect();
    let sunk = random_chunks(30, 5000, 9000);
    {
        let store = Store::open_or_create(dir.path(), small_config()).unwrap();
        std::thread::scope(|scope| {
            for chunks in &writers {
                let store = &store;
                scope.spawn(move || {
                    for batch in chunks.chunks(3) {
                        store.put_chunks_pending(batch.to_vec()).unwrap();
                    }
                });
            }
            scope.spawn(|| {
                for chunk in &sunk {
                    store.put_chunk(chunk.clone()).unwrap();
                }
            });
            scope.spawn(|| {
                for _ in 0..20 {
                    store.flush_pending().unwrap();
                }
            });
        });
        store.flush_pending().unwrap();
        assert!(crate::store::read_lock(&store.pending).is_empty());
        assert!(crate::store::lock(&store.syncing_seals).is_empty());
        for chunk in writers.iter().flatten().chain(&sunk) {
            assert!(store.index.contains(&chunk.id).unwrap());
        }
        assert!(store.pack_ids().unwrap().len() >= 5, "packs were sealed");
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.repaired_at_open(), 0);
    assert_reads_back(&store, writers.iter().flatten().chain(&sunk));
    assert!(store.verify(&VerifyOptions::default()).unwrap().is_ok());
}

#[test]
fn chunks_of_a_sealed_pack_left_unsynced_are_never_indexed_and_stored_again() {
    let dir = tempfile::tempdir().unwrap();
    // Incompressible, about 5 KB each: the 64 KiB pack fills after about 13.
    let chunks = random_chunks(20, 5000, 500);
    {
        let store = Store::open_or_create(dir.path(), small_config()).unwrap();
        let entries = chunks
            .iter()
            .map(|chunk| crate::pack::encode_entry(chunk.id, &chunk.data, 1))
            .collect();
        let ids: Vec<ChunkId> = chunks.iter().map(|chunk| chunk.id).collect();
        let (_, checked) = store.fresh_positions(&ids).unwrap();
        let appended = store.append(entries, checked).unwrap();
        assert_eq!(appended.sealed.len(), 1);
        let sealed_pack = appended.sealed[0].pack;
        let placed = appended.placed.clone();
        // What a sealer does when the pack's fsync fails.
        drop(appended);
        store.flush_pending().unwrap();
        let (unsynced, synced): (Vec<_>, Vec<_>) = placed
            .iter()
            .partition(|(_, location)| location.pack == sealed_pack);
        assert!(!unsynced.is_empty() && !synced.is_empty());
        for (id, _) in &synced {
            assert!(store.index.contains(id).unwrap());
        }
        let lost: Vec<ChunkId> = unsynced.iter().map(|(id, _)| *id).collect();
        assert_eq!(store.missing(&lost).unwrap(), lost);
        let again: Vec<Chunk> = chunks
            .iter()
            .filter(|chunk| lost.contains(&chunk.id))
            .cloned()
            .collect();
        assert_eq!(
            store.put_chunks(again).unwrap().new_chunks,
            lost.len() as u64
        );
    }
    let store = Store::open(dir.path()).unwrap();
    assert_reads_back(&store, &chunks);
}

#[test]
fn a_failed_flush_fsync_indexes_nothing_and_stops_writes_until_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = random_chunks(3, 4000, 700);
    {
        let store = Store::open_or_create(dir.path(), small_config()).unwrap();
        store.put_chunks_pending(chunks.clone()).unwrap();
        fail_next_pack_sync(&store);
        let err = store.flush_pending().unwrap_err();
        assert!(err.to_string().contains("cannot fsync pack"), "{err}");
        for chunk in &chunks {
            assert!(!store.index.contains(&chunk.id).unwrap());
        }
        let reason = store.write_failure().unwrap().to_owned();
        assert!(reason.contains("injected fsync failure"), "{reason}");

        // Every later write is refused, naming the store and the failure,
        // and nothing the failed fsync covered is ever indexed.
        let refused = store
            .put_chunks(vec![Chunk::new(pseudo_random(4000, 799))])
            .unwrap_err();
        assert!(
            matches!(refused, StoreError::WritesRefused { .. }),
            "{refused}"
        );
        let message = refused.to_string();
        assert!(message.contains(&dir.path().display().to_string()) && message.contains(&reason));
        assert!(matches!(
            store.flush_pending(),
            Err(StoreError::WritesRefused { .. })
        ));
        assert!(
            store
                .put_chunk(Chunk::new(pseudo_random(4000, 798)))
                .is_err()
        );
        assert!(matches!(
            try_backup(&store, "refused", &files(2, 3000, 5)),
            Err(StoreError::WritesRefused { .. })
        ));
        assert!(matches!(
            store.gc(&GcOptions::default()),
            Err(StoreError::WritesRefused { .. })
        ));
        for chunk in &chunks {
            assert!(!store.index.contains(&chunk.id).unwrap());
        }
    }
    // Opened again, the store takes writes: its repair re-read the pack.
    let store = Store::open(dir.path()).unwrap();
    assert!(store.write_failure().is_none());
    let snapshot = backup(&store, "after", &files(2, 3000, 5));
    assert!(store.find_snapshot(&snapshot.id).is_ok());
}

#[test]
fn a_failed_seal_fsync_fails_the_put_and_forgets_the_sealed_pack() {
    let dir = tempfile::tempdir().unwrap();
    // Incompressible, about 5 KB each: the 64 KiB pack fills after about 13.
    let chunks = random_chunks(20, 5000, 600);
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    fail_next_pack_sync(&store);
    let err = store.put_chunks_pending(chunks.clone()).unwrap_err();
    assert!(err.to_string().contains("cannot fsync pack"), "{err}");
    assert!(crate::store::lock(&store.syncing_seals).is_empty());
    let ids: Vec<ChunkId> = chunks.iter().map(|chunk| chunk.id).collect();
    let missing = store.missing(&ids).unwrap();
    assert!(
        missing.len() >= 10,
        "the sealed pack's chunks are forgotten"
    );
    assert!(store.write_failure().is_some());
}

#[test]
fn a_commit_of_subtrees_found_complete_before_a_gc_checks_them_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    let first = backup(&store, "first", &files(2, 30_000, 3));
    let root = first.root_tree_id.clone();
    let again = |name: &str| {
        store.commit_snapshot(Snapshot {
            name: name.to_owned(),
            job: "job".into(),
            root_tree_id: root.clone(),
            ..Default::default()
        })
    };
    // The same DAG again (an unchanged re-backup): found complete before.
    again("second").unwrap();
    assert!(store.complete_trees.lock().unwrap().len() >= 2);

    store.delete_snapshot("first").unwrap();
    store.delete_snapshot("second").unwrap();
    let report = store.gc(&GcOptions::immediate()).unwrap();
    assert!(report.swept_chunks > 0, "{report:?}");
    // Its chunks are gone: remembering the trees as complete would commit
    // a snapshot whose data is lost.
    let err = again("third").unwrap_err();
    assert!(matches!(err, StoreError::MissingChunk { .. }), "{err}");
    assert!(store.list_snapshots().unwrap().is_empty());
}

#[test]
fn a_listing_in_parts_is_committed_kept_by_gc_verified_and_read_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    let content = Chunk::new(pseudo_random(3000, 9));
    store.put_chunks(vec![content.clone()]).unwrap();
    // 100,000 files of the same content: a listing of about 6 MB.
    let listing = Tree {
        entries: (0..100_000)
            .map(|index| TreeEntry {
                name: format!("file-{index:06}").into_bytes(),
                kind: EntryKind::File as i32,
                mode: 0o100644,
                size: 3000,
                chunk_ids: vec![content.id.to_vec()],
                ..Default::default()
            })
            .collect(),
        parts: Vec::new(),
    };
    let (_, parts) = crate::tree_parts::tree_chunks(&listing);
    assert!(parts.len() > 1, "{} parts", parts.len());
    let root = store.put_tree(&listing).unwrap();
    assert!(store.get_tree(&root).unwrap() == listing);
    store
        .commit_snapshot(Snapshot {
            name: "large".into(),
            job: "job".into(),
            root_tree_id: root.to_vec(),
            ..Default::default()
        })
        .unwrap();
    // GC keeps the parts (reachable through the tree chunk), verify reads them.
    let report = store.gc(&GcOptions::immediate()).unwrap();
    assert_eq!(report.swept_chunks, 0, "{report:?}");
    assert_reads_back(&store, &parts);
    let verified = store.verify(&VerifyOptions::default()).unwrap();
    assert!(verified.is_ok(), "{verified:?}");
    assert!(
        verified.chunks_checked >= parts.len() as u64 + 2,
        "{verified:?}"
    );

    // A listing one of whose parts the store lacks is refused at commit,
    // naming that part.
    let other = Tree {
        entries: listing.entries[..90_000].to_vec(),
        parts: Vec::new(),
    };
    let (tree_chunk, other_parts) = crate::tree_parts::tree_chunks(&other);
    let lacking = other_parts
        .iter()
        .find(|part| !store.contains(&part.id).unwrap())
        .expect("a part of its own")
        .id;
    let stored: Vec<Chunk> = other_parts
        .into_iter()
        .filter(|part| part.id != lacking)
        .chain([tree_chunk.clone()])
        .collect();
    store.put_chunks(stored).unwrap();
    let refused = store.commit_snapshot(Snapshot {
        name: "lacking".into(),
        job: "job".into(),
        root_tree_id: tree_chunk.id.to_vec(),
        ..Default::default()
    });
    match refused {
        Err(StoreError::MissingChunk { id, .. }) => assert_eq!(id, lacking),
        other => panic!("{:?}", other.map(|snapshot| snapshot.name)),
    }
}

#[test]
fn gc_reclaims_deleted_snapshots_and_keeps_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    let keep = backup(&store, "keep", &files(3, 60_000, 1));
    let drop_ = backup(&store, "drop", &files(3, 60_000, 2));
    let before = store.stats().unwrap();
    assert!(before.packs > 2, "{before:?}");
    store.delete_snapshot("drop").unwrap();
    let dry = store
        .gc(&GcOptions {
            dry_run: true,
            ..GcOptions::immediate()
        })
        .unwrap();
    assert!(dry.swept_chunks > 0);
    assert_eq!(store.stats().unwrap().chunks, before.chunks);
    let report = store.gc(&GcOptions::immediate()).unwrap();
    assert_eq!(report.swept_chunks, dry.swept_chunks);
    assert!(report.packs_deleted > 0, "{report:?}");
    let after = store.stats().unwrap();
    assert!(after.pack_bytes < before.pack_bytes, "{before:?} {after:?}");
    assert_eq!(after.chunks, before.chunks - report.swept_chunks);
    assert!(restore(&store, &keep).unwrap() == files(3, 60_000, 1));
    assert!(matches!(
        restore(&store, &drop_),
        Err(StoreError::ChunkNotFound { .. })
    ));
    assert!(store.verify(&VerifyOptions::default()).unwrap().is_ok());
    // A second GC with nothing to do changes nothing.
    let idle = store.gc(&GcOptions::immediate()).unwrap();
    assert_eq!(idle.swept_chunks, 0);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert!(restore(&store, &keep).unwrap() == files(3, 60_000, 1));
}

#[test]
fn gc_past_its_deadline_sweeps_but_leaves_rewrites_to_the_next_gc() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    let kept = files(3, 60_000, 1);
    let mut mixed = kept.clone();
    mixed.extend(
        files(3, 60_000, 2)
            .into_iter()
            .map(|(name, data)| (format!("other-{name}"), data)),
    );
    // One snapshot writes both sets into shared packs; deleting it leaves
    // those packs part live (the kept set's chunks), part dead.
    backup(&store, "mixed", &mixed);
    let keep = backup(&store, "keep", &kept);
    store.delete_snapshot("mixed").unwrap();
    let options = GcOptions {
        repack_threshold: Some(1.0),
        deadline: Some(Instant::now()),
        ..GcOptions::immediate()
    };
    let late = store.gc(&options).unwrap();
    assert!(late.swept_chunks > 0, "{late:?}");
    assert_eq!(late.packs_rewritten, 0, "{late:?}");
    assert!(late.packs_left_at_deadline > 0, "{late:?}");
    assert!(store.verify(&VerifyOptions::default()).unwrap().is_ok());
    assert!(restore(&store, &keep).unwrap() == kept);
    let next = store
        .gc(&GcOptions {
            repack_threshold: Some(1.0),
            ..GcOptions::immediate()
        })
        .unwrap();
    assert_eq!(
        next.packs_rewritten, late.packs_left_at_deadline,
        "{next:?}"
    );
    assert_eq!(next.packs_left_at_deadline, 0);
    assert!(restore(&store, &keep).unwrap() == kept);
}

#[test]
fn gc_grace_spares_chunks_of_an_upload_not_committed_yet() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    let content = file_content(30_000, 5);
    let chunks: Vec<Chunk> = ChunkReader::new(&content[..], store.config().chunk_params)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
    store.put_chunks(chunks).unwrap();
    let report = store.gc(&GcOptions::default()).unwrap();
    assert_eq!(report.swept_chunks, 0);
    assert!(store.missing(&ids).unwrap().is_empty());
    let report = store.gc(&GcOptions::immediate()).unwrap();
    assert_eq!(report.swept_chunks, ids.len() as u64);
    assert_eq!(store.missing(&ids).unwrap(), ids);
}

/// What happens to an upload abandoned before its commit, as on a node: its
/// chunks sit pending, the next upload's flush indexes them with its own
/// (a commit makes every pending chunk durable), no snapshot references
/// them, and the first GC past the grace reclaims them; the committed
/// snapshot keeps every chunk.
#[test]
fn an_abandoned_uploads_chunks_are_indexed_by_the_next_commit_and_reclaimed_by_gc() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    let abandoned: Vec<Chunk> = random_chunks(5, 20_000, 900);
    let ids: Vec<ChunkId> = abandoned.iter().map(|c| c.id).collect();
    store.put_chunks_pending(abandoned).unwrap();
    let before = store.stats().unwrap().chunks;
    let kept = backup(&store, "later", &files(2, 30_000, 901));
    assert!(
        store.missing(&ids).unwrap().is_empty(),
        "indexed by the commit's flush"
    );
    assert!(store.stats().unwrap().chunks >= before + ids.len() as u64);
    let spared = store.gc(&GcOptions::default()).unwrap();
    assert_eq!(
        spared.swept_chunks, 0,
        "within the grace, an upload may still commit"
    );
    let report = store.gc(&GcOptions::immediate()).unwrap();
    assert_eq!(report.swept_chunks, ids.len() as u64, "{report:?}");
    assert_eq!(store.missing(&ids).unwrap(), ids);
    assert!(restore(&store, &kept).unwrap() == files(2, 30_000, 901));
    assert!(store.verify(&VerifyOptions::default()).unwrap().is_ok());
}

#[test]
fn a_snapshot_in_its_worm_window_cannot_be_deleted_and_can_after() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    let template = backup(&store, "template", &files(1, 10_000, 950));
    let retained = store
        .commit_snapshot(Snapshot {
            id: String::new(),
            name: String::new(),
            end_time_ms: 0,
            state: 0,
            // 2100-01-01.
            retain_until_ms: 4_102_444_800_000,
            job: "worm".into(),
            ..template.clone()
        })
        .unwrap();
    let err = store.delete_snapshot(&retained.id).unwrap_err();
    assert!(matches!(err, StoreError::Retained { .. }), "{err}");
    assert!(err.to_string().contains("2100-01-01T00:00:00Z"), "{err}");
    assert!(store.find_snapshot(&retained.id).is_ok(), "still there");
    // A window that has passed is no window.
    let passed = store
        .commit_snapshot(Snapshot {
            id: String::new(),
            name: String::new(),
            end_time_ms: 0,
            state: 0,
            retain_until_ms: 1_000,
            job: "worm-passed".into(),
            ..template
        })
        .unwrap();
    store.delete_snapshot(&passed.id).unwrap();
}

#[test]
fn identical_content_in_many_snapshots_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    let content = files(2, 50_000, 9);
    for i in 0..4 {
        backup(&store, &format!("s{i}"), &content);
    }
    let stats = store.stats().unwrap();
    assert_eq!(stats.referenced_bytes, 4 * 100_000);
    // Two data files plus two trees, once.
    assert!(stats.logical_bytes < 100_000 + 2_000, "{stats:?}");
    assert!(stats.dedup_ratio > 3.9, "{stats:?}");
    assert_eq!(stats.snapshots, 4);
}

/// A flush reads the pending chunks, then fsyncs and indexes them; GC may
/// index them first (sealing the pack), sweep them as unreferenced and
/// delete their pack in between. The flush must then leave them out, not
/// index them again pointing at the deleted pack.
#[test]
fn a_flush_that_gc_overtook_does_not_index_swept_chunks_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), small_config()).unwrap();
    let chunk = Chunk::new(file_content(5_000, 3));
    store.put_chunks_pending(vec![chunk.clone()]).unwrap();
    let read_by_the_flush: Vec<_> = super::read_lock(&store.pending)
        .iter()
        .map(|(id, location)| (*id, *location))
        .collect();
    assert_eq!(read_by_the_flush.len(), 1);
    let pack = read_by_the_flush[0].1.pack;

    let report = store.gc(&GcOptions::immediate()).unwrap();
    assert_eq!(report.swept_chunks, 1);
    assert!(
        !dir.path()
            .join("packs")
            .join(crate::pack::pack_file_name(pack))
            .exists()
    );

    store.index_placed(&read_by_the_flush).unwrap();
    assert!(!store.contains(&chunk.id).unwrap());
    assert!(store.verify(&VerifyOptions::default()).unwrap().is_ok());
    // Stored again, it reads back.
    store.put_chunks(vec![chunk.clone()]).unwrap();
    assert_eq!(store.get_chunk(&chunk.id).unwrap(), chunk.data);
}

#[test]
fn gc_running_with_concurrent_commits_never_breaks_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open_or_create(dir.path(), small_config()).unwrap());
    let shared = vec![("shared".to_owned(), file_content(30_000, 77))];
    std::thread::scope(|scope| {
        let writer = {
            let store = Arc::clone(&store);
            let shared = shared.clone();
            scope.spawn(move || {
                for round in 0..12u64 {
                    let mut content = files(2, 20_000, round + 1000);
                    content.extend(shared.clone());
                    let snapshot = backup_retrying(&store, &format!("r{round}"), &content);
                    if round.is_multiple_of(2) {
                        store.delete_snapshot(&snapshot.id).unwrap();
                    }
                }
            })
        };
        for _ in 0..6 {
            store.gc(&GcOptions::immediate()).unwrap();
        }
        writer.join().unwrap();
    });
    store.gc(&GcOptions::immediate()).unwrap();
    for snapshot in store.list_snapshots().unwrap() {
        let round: u64 = snapshot.name[1..].parse().unwrap();
        let mut expected = files(2, 20_000, round + 1000);
        expected.extend(shared.clone());
        assert!(restore(&store, &snapshot).unwrap() == expected);
    }
    let report = store.verify(&VerifyOptions::default()).unwrap();
    assert!(report.is_ok(), "{report:?}");
}

fn pack_paths(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut paths: Vec<_> = std::fs::read_dir(dir.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
}

/// A store with two snapshots, closed; returns their ids.
fn damaged_store_fixture(dir: &Path) -> (Snapshot, Snapshot) {
    let config = StoreConfig {
        pack_target_size: 20_000,
        ..small_config()
    };
    let store = Store::open_or_create(dir, config).unwrap();
    let a = backup(&store, "a", &files(3, 40_000, 1));
    let b = backup(&store, "b", &files(3, 40_000, 2));
    assert!(store.verify(&VerifyOptions::default()).unwrap().is_ok());
    (a, b)
}

#[test]
fn verify_reports_flipped_bits_with_chunk_snapshot_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = damaged_store_fixture(dir.path());
    let first_chunk = {
        let store = Store::open(dir.path()).unwrap();
        let root = store
            .get_tree(&ChunkId::from_slice(&a.root_tree_id).unwrap())
            .unwrap();
        let sub = store
            .get_tree(&ChunkId::from_slice(&root.entries[0].subtree_id).unwrap())
            .unwrap();
        let id = ChunkId::from_slice(&sub.entries[0].chunk_ids[0]).unwrap();
        (id, store.locate(&id).unwrap().unwrap())
    };
    let (id, location) = first_chunk;
    let path = dir
        .path()
        .join("packs")
        .join(crate::pack::pack_file_name(location.pack));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[location.offset as usize + crate::pack::ENTRY_HEADER_LEN + 3] ^= 0x04;
    std::fs::write(&path, bytes).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let err = store.get_chunk(&id).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { id: bad, .. } if *bad == id),
        "{err}"
    );
    assert!(err.to_string().contains(&path.display().to_string()));
    let report = store.verify(&VerifyOptions::default()).unwrap();
    assert_eq!(report.problems.len(), 1, "{report:?}");
    let problem = &report.problems[0];
    assert_eq!(problem.chunk, id);
    assert_eq!(problem.kind, ProblemKind::Corrupt);
    assert_eq!(problem.snapshots, [format!("a ({})", a.id)]);
    assert_eq!(problem.paths, [format!("{}:/dir/f0", a.id)]);
    // Verifying only the other snapshot finds nothing wrong.
    let other = store
        .verify(&VerifyOptions {
            snapshot: Some("b".into()),
            ..Default::default()
        })
        .unwrap();
    assert!(other.is_ok(), "{other:?}");
}

#[test]
fn verify_reports_a_truncated_and_a_deleted_pack() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = damaged_store_fixture(dir.path());
    let packs = pack_paths(dir.path());
    assert!(packs.len() >= 3, "{packs:?}");
    let truncated = &packs[0];
    let len = std::fs::metadata(truncated).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(truncated)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    std::fs::remove_file(&packs[1]).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let report = store.verify(&VerifyOptions::default()).unwrap();
    assert!(!report.is_ok());
    assert!(
        report
            .problems
            .iter()
            .all(|p| p.kind == ProblemKind::Corrupt),
        "{report:?}"
    );
    let named: HashSet<String> = report
        .problems
        .iter()
        .flat_map(|p| p.snapshots.clone())
        .collect();
    assert!(!named.is_empty());
    assert!(named.iter().all(|s| s.contains(&a.id) || s.contains(&b.id)));
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.detail.contains(&packs[1].display().to_string()))
    );
    // A sampled verify checks fewer chunks.
    let sampled = store
        .verify(&VerifyOptions {
            sample: Some(0.3),
            ..Default::default()
        })
        .unwrap();
    assert!(sampled.chunks_checked < report.chunks_checked + report.problems.len() as u64);
}

#[test]
fn a_deleted_index_is_rebuilt_by_reindex() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = damaged_store_fixture(dir.path());
    let snapshots_before = {
        let store = Store::open(dir.path()).unwrap();
        let stats = store.stats().unwrap();
        (store.list_snapshots().unwrap(), stats.chunks)
    };
    // Lose the chunk index only: its log, not the catalogue's database beside it.
    std::fs::remove_file(dir.path().join("index").join(crate::index_table::LOG_FILE)).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let broken = store.verify(&VerifyOptions::default()).unwrap();
    assert!(!broken.is_ok());
    assert!(
        broken
            .problems
            .iter()
            .all(|p| p.kind == ProblemKind::Missing)
    );
    let report = store.reindex().unwrap();
    assert_eq!(report.chunks, snapshots_before.1);
    assert!(report.damaged.is_empty());
    assert!(store.verify(&VerifyOptions::default()).unwrap().is_ok());
    assert_eq!(store.list_snapshots().unwrap(), snapshots_before.0);
    assert!(restore(&store, &a).unwrap() == files(3, 40_000, 1));
    assert!(restore(&store, &b).unwrap() == files(3, 40_000, 2));
}

#[test]
fn a_store_with_its_chunk_index_in_sled_moves_it_to_the_log_at_open() {
    use crate::index::ChunkIndex;
    use crate::index_sled::{SledChunkIndex, open_db};
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = damaged_store_fixture(dir.path());
    let index_dir = dir.path().join("index");
    let log = index_dir.join(crate::index_table::LOG_FILE);
    // The layout of a store written before the log: every entry in sled's
    // `chunks` tree, no log.
    let entries = {
        let store = Store::open(dir.path()).unwrap();
        let mut entries = Vec::new();
        store
            .index
            .for_each(&mut |id, location| {
                entries.push((id, location));
                Ok(())
            })
            .unwrap();
        entries
    };
    assert!(entries.len() > 10);
    std::fs::remove_file(&log).unwrap();
    {
        let db = open_db(&index_dir, 1 << 20).unwrap();
        let old = SledChunkIndex::new(&db).unwrap();
        old.insert_batch(&entries).unwrap();
        old.flush().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert!(log.exists());
    assert_eq!(store.index.len().unwrap(), entries.len() as u64);
    for (id, location) in &entries {
        assert_eq!(store.index.get(id).unwrap(), Some(*location));
    }
    assert!(store.verify(&VerifyOptions::default()).unwrap().is_ok());
    assert!(restore(&store, &a).unwrap() == files(3, 40_000, 1));
    assert!(restore(&store, &b).unwrap() == files(3, 40_000, 2));
    drop(store);
    // Moved, not copied: sled's tree is empty now.
    let db = open_db(&index_dir, 1 << 20).unwrap();
    assert!(SledChunkIndex::new(&db).unwrap().is_empty().unwrap());
    drop(db);

    // A move cut short after the log was renamed into place, before the
    // tree was cleared: the same entries in both, and the store still opens
    // with each once; so does one where the tree holds entries the log lacks.
    {
        let db = open_db(&index_dir, 1 << 20).unwrap();
        let old = SledChunkIndex::new(&db).unwrap();
        old.insert_batch(&entries).unwrap();
        old.flush().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.index.len().unwrap(), entries.len() as u64);
    let (dropped, location) = entries[0];
    store.index.remove_batch(&[dropped]).unwrap();
    store.index.flush().unwrap();
    drop(store);
    {
        let db = open_db(&index_dir, 1 << 20).unwrap();
        let old = SledChunkIndex::new(&db).unwrap();
        old.insert_batch(&[(dropped, location)]).unwrap();
        old.flush().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.index.get(&dropped).unwrap(), Some(location));
    assert_eq!(store.index.len().unwrap(), entries.len() as u64);
    assert!(store.verify(&VerifyOptions::default()).unwrap().is_ok());
}

#[test]
fn a_deleted_index_directory_is_rebuilt_with_its_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = damaged_store_fixture(dir.path());
    let deleted = {
        let store = Store::open(dir.path()).unwrap();
        let c = backup(&store, "c", &files(1, 10_000, 3));
        store.delete_snapshot(&c.id).unwrap()
    };
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert!(store.list_snapshots().unwrap().is_empty());
    let report = store.reindex().unwrap();
    assert_eq!(report.snapshots_restored, 2);
    let ids: Vec<String> = store
        .list_snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, [a.id.clone(), b.id.clone()]);
    assert!(!ids.contains(&deleted.id));
    assert!(store.verify(&VerifyOptions::default()).unwrap().is_ok());
    assert!(restore(&store, &a).unwrap() == files(3, 40_000, 1));
    assert!(restore(&store, &b).unwrap() == files(3, 40_000, 2));
}

#[test]
fn a_torn_tail_of_the_open_pack_is_cut_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = damaged_store_fixture(dir.path());
    // Simulate a crash mid-append: a new, unsealed pack ending in half an entry.
    let next = pack_paths(dir.path()).len() as u32 + 100;
    let path = dir
        .path()
        .join("packs")
        .join(crate::pack::pack_file_name(next));
    {
        let mut writer = crate::pack::PackWriter::create(&dir.path().join("packs"), next).unwrap();
        let data = pseudo_random(5000, 42);
        let whole = crate::pack::encode_entry(ChunkId::of(&data), &data, 1);
        writer.append(&whole).unwrap();
        let other = pseudo_random(5000, 43);
        let mut torn = crate::pack::encode_entry(ChunkId::of(&other), &other, 1);
        torn.stored
            .to_mut()
            .truncate(2000 - crate::pack::ENTRY_HEADER_LEN);
        writer.append(&torn).unwrap();
        writer.sync().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let scan = crate::pack::scan_pack(&path, |_, _, _| {}).unwrap();
    assert_eq!(scan.end, crate::pack::ScanEnd::Sealed { entries: 1 });
    // The whole entry was indexed by the repair.
    assert!(
        store
            .contains(&ChunkId::of(&pseudo_random(5000, 42)))
            .unwrap()
    );
    assert!(
        !store
            .contains(&ChunkId::of(&pseudo_random(5000, 43)))
            .unwrap()
    );
    assert!(store.verify(&VerifyOptions::default()).unwrap().is_ok());
    assert!(restore(&store, &a).unwrap() == files(3, 40_000, 1));
}

#[derive(Clone, Debug)]
enum Op {
    Backup { files: usize, seed: u64 },
    Delete { pick: usize },
    Gc { threshold: f64 },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..4, 0u64..12).prop_map(|(files, seed)| Op::Backup { files, seed }),
        2 => (0usize..8).prop_map(|pick| Op::Delete { pick }),
        2 => (0.1f64..1.0).prop_map(|threshold| Op::Gc { threshold }),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Any sequence of backups, deletes, GCs and reopens keeps every live
    /// snapshot's content readable and byte-identical.
    #[test]
    fn live_snapshots_survive_any_sequence(ops in proptest::collection::vec(op(), 1..14)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_or_create(dir.path(), small_config()).unwrap();
        let mut live: Vec<(Snapshot, u64, usize)> = Vec::new();
        for op in ops {
            match op {
                Op::Backup { files: count, seed } => {
                    let snapshot = backup(&store, "", &files(count, 12_000, seed));
                    live.push((snapshot, seed, count));
                }
                Op::Delete { pick } => {
                    if !live.is_empty() {
                        let (snapshot, _, _) = live.remove(pick % live.len());
                        store.delete_snapshot(&snapshot.id).unwrap();
                    }
                }
                Op::Gc { threshold } => {
                    store.gc(&GcOptions { repack_threshold: Some(threshold), ..GcOptions::immediate() }).unwrap();
                }
                Op::Reopen => {
                    drop(store);
                    store = Store::open(dir.path()).unwrap();
                }
            }
            for (snapshot, seed, count) in &live {
                prop_assert!(restore(&store, snapshot).unwrap() == files(*count, 12_000, *seed));
            }
        }
        let report = store.verify(&VerifyOptions::default()).unwrap();
        prop_assert!(report.is_ok(), "{:?}", report);
        prop_assert_eq!(store.list_snapshots().unwrap().len(), live.len());
    }
}
