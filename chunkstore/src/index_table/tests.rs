use std::collections::BTreeMap;
use std::io::Write;

use proptest::prelude::*;

use super::*;
use crate::index::conformance::{self, id, location};

fn entries(range: std::ops::Range<u32>) -> Vec<(ChunkId, Location)> {
    range.map(|n| (id(n), location(n))).collect()
}

fn contents(index: &TableChunkIndex) -> BTreeMap<ChunkId, Location> {
    let mut out = BTreeMap::new();
    index
        .for_each(&mut |id, location| {
            out.insert(id, location);
            Ok(())
        })
        .unwrap();
    out
}

fn append(path: &Path, bytes: &[u8]) {
    let mut file = OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(bytes).unwrap();
}

#[test]
fn table_chunk_index_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance::chunk_index(&TableChunkIndex::open(&dir.path().join(LOG_FILE)).unwrap());
}

#[test]
fn insert_get_remove_len_and_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(LOG_FILE);
    let index = TableChunkIndex::open(&path).unwrap();
    index.insert_batch(&entries(0..100)).unwrap();
    index.remove_batch(&[id(5), id(6), id(1000)]).unwrap();
    index.insert_batch(&[(id(7), location(700))]).unwrap();
    assert_eq!(index.len().unwrap(), 98);
    assert_eq!(index.get(&id(5)).unwrap(), None);
    assert_eq!(index.get(&id(7)).unwrap(), Some(location(700)));
    assert!(index.contains(&id(99)).unwrap());
    // An absent id costs no record.
    assert_eq!(index.log_records(), 103);
    index.flush().unwrap();
    let before = contents(&index);
    drop(index);
    let reopened = TableChunkIndex::open(&path).unwrap();
    assert_eq!(contents(&reopened), before);
    assert_eq!(reopened.len().unwrap(), 98);
}

#[test]
fn ids_of_one_table_and_a_visit_that_uses_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let index = TableChunkIndex::open(&dir.path().join(LOG_FILE)).unwrap();
    // All in one table (same first byte), some differing only past byte 8.
    let mut batch: Vec<(ChunkId, Location)> = (0..2000u32)
        .map(|n| {
            let mut bytes = *id(n).as_bytes();
            bytes[0] = 7;
            if n % 2 == 0 {
                bytes[1..9].copy_from_slice(&[0; 8]);
            }
            (ChunkId(bytes), location(n))
        })
        .collect();
    batch.extend(entries(0..300));
    index.insert_batch(&batch).unwrap();
    for (key, value) in &batch {
        assert_eq!(index.get(key).unwrap(), Some(*value));
    }
    let mut previous = None;
    let mut seen = 0;
    index
        .for_each(&mut |key, value| {
            assert!(previous < Some(key));
            previous = Some(key);
            // The visit may read and change the index: no lock is held.
            assert_eq!(index.get(&key)?, Some(value));
            index.remove_batch(&[key])?;
            seen += 1;
            Ok(())
        })
        .unwrap();
    let distinct: BTreeMap<ChunkId, Location> = batch.into_iter().collect();
    assert_eq!(seen, distinct.len());
    assert!(index.is_empty().unwrap());
}

#[test]
fn a_torn_tail_is_cut_away_and_what_was_flushed_stays() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(LOG_FILE);
    let index = TableChunkIndex::open(&path).unwrap();
    index.insert_batch(&entries(0..50)).unwrap();
    index.flush().unwrap();
    let flushed = contents(&index);
    index.insert_batch(&entries(50..60)).unwrap();
    index.flush().unwrap();
    drop(index);
    let whole = std::fs::metadata(&path).unwrap().len();
    // A crash mid-append: the last record half written.
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(whole - 10 * RECORD_LEN as u64 + 20).unwrap();
    drop(file);
    let reopened = TableChunkIndex::open(&path).unwrap();
    assert_eq!(contents(&reopened), flushed);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        whole - 10 * RECORD_LEN as u64
    );
    // Appends go on after the cut, and survive another reopen.
    reopened.insert_batch(&entries(70..72)).unwrap();
    reopened.flush().unwrap();
    drop(reopened);
    let again = TableChunkIndex::open(&path).unwrap();
    assert_eq!(again.len().unwrap(), 52);
    assert_eq!(again.get(&id(71)).unwrap(), Some(location(71)));
    drop(again);
    // Garbage past the end: a whole record's worth and more.
    append(&path, &[0xa5; RECORD_LEN * 2 + 13]);
    let reopened = TableChunkIndex::open(&path).unwrap();
    assert_eq!(reopened.len().unwrap(), 52);
    // Zeros, as a file system may leave after a crash.
    drop(reopened);
    append(&path, &[0; RECORD_LEN * 3]);
    let reopened = TableChunkIndex::open(&path).unwrap();
    assert_eq!(reopened.len().unwrap(), 52);
}

#[test]
fn a_bad_record_before_intact_ones_is_skipped_and_the_log_rewritten_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(LOG_FILE);
    let index = TableChunkIndex::open(&path).unwrap();
    let written = entries(0..20);
    index.insert_batch(&written).unwrap();
    index.flush().unwrap();
    drop(index);
    let mut bytes = std::fs::read(&path).unwrap();
    let damaged = HEADER_LEN + 5 * RECORD_LEN + 9;
    bytes[damaged] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let reopened = TableChunkIndex::open(&path).unwrap();
    assert_eq!(reopened.len().unwrap(), 19);
    for (position, (id, location)) in written.iter().enumerate() {
        let found = reopened.get(id).unwrap();
        if position == 5 {
            assert_eq!(found, None);
        } else {
            assert_eq!(found, Some(*location));
        }
    }
    // Rewritten: the damaged record is gone from the file.
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        (HEADER_LEN + 19 * RECORD_LEN) as u64
    );
    drop(reopened);
    assert_eq!(TableChunkIndex::open(&path).unwrap().len().unwrap(), 19);
}

#[test]
fn a_file_that_is_no_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(LOG_FILE);
    std::fs::write(&path, b"something else entirely").unwrap();
    let err = TableChunkIndex::open(&path).unwrap_err();
    assert!(
        matches!(err, IndexError::Corrupt { offset: 0, .. }),
        "{err}"
    );
    let mut other_version = header();
    other_version[MAGIC.len()] = 9;
    std::fs::write(&path, other_version).unwrap();
    let err = TableChunkIndex::open(&path).unwrap_err();
    assert!(err.to_string().contains("version 9"), "{err}");
}

#[test]
fn an_intact_record_of_an_unknown_kind_is_skipped_and_rewritten_away() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(LOG_FILE);
    drop(TableChunkIndex::open(&path).unwrap());
    append(&path, &record(7, &[1; 32], &location(1).encode()));
    let reopened = TableChunkIndex::open(&path).unwrap();
    assert_eq!(reopened.len().unwrap(), 0);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        HEADER_LEN as u64,
        "rewritten without it"
    );
}

#[test]
fn compaction_keeps_the_contents_and_shrinks_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(LOG_FILE);
    let index = TableChunkIndex::open_compacting_from(&path, 100).unwrap();
    index.insert_batch(&entries(0..200)).unwrap();
    assert_eq!(index.log_records(), 200);
    // Replacing entries adds records without entries.
    index.insert_batch(&entries(0..150)).unwrap();
    assert_eq!(index.log_records(), 350);
    let removed: Vec<ChunkId> = (0..150).map(id).collect();
    index.remove_batch(&removed).unwrap();
    // 500 records for 50 entries: rewritten.
    assert_eq!(index.len().unwrap(), 50);
    assert_eq!(index.log_records(), 50);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        (HEADER_LEN + 50 * RECORD_LEN) as u64
    );
    assert!(!temp_path(&path).exists());
    let expected = contents(&index);
    // Appends after a rewrite go to the new file.
    index.insert_batch(&entries(1000..1010)).unwrap();
    index.flush().unwrap();
    drop(index);
    let reopened = TableChunkIndex::open_compacting_from(&path, 100).unwrap();
    assert_eq!(reopened.len().unwrap(), 60);
    let mut expected = expected;
    expected.extend(entries(1000..1010));
    assert_eq!(contents(&reopened), expected);
}

#[test]
fn a_log_due_for_compaction_is_rewritten_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(LOG_FILE);
    let index = TableChunkIndex::open(&path).unwrap();
    for _ in 0..3 {
        index.insert_batch(&entries(0..100)).unwrap();
    }
    index.flush().unwrap();
    drop(index);
    // Below the default minimum: kept as it is.
    assert_eq!(TableChunkIndex::open(&path).unwrap().log_records(), 300);
    // A leftover of a rewrite cut short is removed.
    std::fs::write(temp_path(&path), b"half a rewrite").unwrap();
    let reopened = TableChunkIndex::open_compacting_from(&path, 10).unwrap();
    assert_eq!(reopened.log_records(), 100);
    assert_eq!(contents(&reopened), entries(0..100).into_iter().collect());
    assert!(!temp_path(&path).exists());
}

#[test]
fn clear_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(LOG_FILE);
    let index = TableChunkIndex::open(&path).unwrap();
    index.insert_batch(&entries(0..100)).unwrap();
    index.flush().unwrap();
    index.clear().unwrap();
    assert!(index.is_empty().unwrap());
    assert_eq!(index.log_records(), 0);
    index.insert_batch(&entries(5..7)).unwrap();
    index.flush().unwrap();
    drop(index);
    let reopened = TableChunkIndex::open(&path).unwrap();
    assert_eq!(contents(&reopened), entries(5..7).into_iter().collect());
}

#[test]
fn create_from_copies_another_index() {
    let dir = tempfile::tempdir().unwrap();
    let source = TableChunkIndex::open(&dir.path().join("source.log")).unwrap();
    source.insert_batch(&entries(0..300)).unwrap();
    let path = dir.path().join(LOG_FILE);
    let copy = TableChunkIndex::create_from(&path, &source).unwrap();
    assert_eq!(contents(&copy), contents(&source));
    drop(copy);
    assert_eq!(
        contents(&TableChunkIndex::open(&path).unwrap()),
        contents(&source)
    );
}

#[test]
fn writes_after_a_failed_write_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(LOG_FILE);
    let index = TableChunkIndex::open(&path).unwrap();
    {
        let mut log = lock(&index.log);
        let err = io_error("cannot write", &path)(std::io::Error::other("disk on fire"));
        index.fail(&mut log, err);
    }
    let err = index.insert_batch(&entries(0..1)).unwrap_err();
    assert!(matches!(err, IndexError::WritesRefused { .. }), "{err}");
    assert!(err.to_string().contains("disk on fire"), "{err}");
    assert!(index.flush().is_err());
    assert!(index.is_empty().unwrap());
}

#[derive(Clone, Debug)]
enum Op {
    Insert(Vec<(u8, u32)>),
    Remove(Vec<u8>),
    Flush,
    /// Flush, drop, open again.
    Reopen,
    /// Flush, drop, leave a torn record at the end, open again.
    TornReopen(usize),
    Clear,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => prop::collection::vec((0u8..48, any::<u32>()), 0..40).prop_map(Op::Insert),
        4 => prop::collection::vec(0u8..48, 0..30).prop_map(Op::Remove),
        2 => Just(Op::Flush),
        2 => Just(Op::Reopen),
        1 => (1usize..RECORD_LEN).prop_map(Op::TornReopen),
        1 => Just(Op::Clear),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the batches, flushes and reopens (some with a torn tail),
    /// the index holds what a map given the same changes holds. A low
    /// compaction minimum makes rewrites happen along the way.
    #[test]
    fn the_index_matches_a_map(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        let open = || TableChunkIndex::open_compacting_from(&path, 16).unwrap();
        let mut index = open();
        let mut model: BTreeMap<ChunkId, Location> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Insert(batch) => {
                    let batch: Vec<(ChunkId, Location)> = batch
                        .into_iter()
                        .map(|(n, l)| (id(u32::from(n)), location(l % 1_000_000)))
                        .collect();
                    index.insert_batch(&batch).unwrap();
                    model.extend(batch);
                }
                Op::Remove(ids) => {
                    let ids: Vec<ChunkId> = ids.into_iter().map(|n| id(u32::from(n))).collect();
                    index.remove_batch(&ids).unwrap();
                    for id in &ids {
                        model.remove(id);
                    }
                }
                Op::Flush => index.flush().unwrap(),
                Op::Reopen => {
                    index.flush().unwrap();
                    drop(index);
                    index = open();
                }
                Op::TornReopen(len) => {
                    index.flush().unwrap();
                    drop(index);
                    let torn = record(KIND_INSERT, &[9; 32], &location(9).encode());
                    append(&path, &torn[..len]);
                    index = open();
                }
                Op::Clear => {
                    index.clear().unwrap();
                    model.clear();
                }
            }
            prop_assert_eq!(index.len().unwrap(), model.len() as u64);
            prop_assert!(index.log_records() <= (2 * model.len() as u64).max(16));
        }
        prop_assert_eq!(&contents(&index), &model);
        index.flush().unwrap();
        drop(index);
        prop_assert_eq!(&contents(&open()), &model);
    }
}
