//! The sled implementation of [`ChunkIndex`] and [`Catalog`]: the only module
//! that knows sled.
//!
//! One sled database per store (`<store>/index`), three trees: `chunks`
//! (32-byte id -> 21-byte [`Location`]; the store's chunk index lived there
//! until it moved to [`crate::index_table`], and [`open_chunk_index`] moves
//! what a store still has in it), `snapshots` (id -> protobuf
//! `Snapshot`) and `snapshots_by_source` (job, host, instance, end and start
//! time, id -> nothing: an index that finds a source's newest snapshot
//! without reading the others, kept in step with `snapshots` by
//! transactions and rebuilt at open when their counts differ).
//! sled is configured on purpose: a bounded page cache, and writes applied in
//! batches of at most [`MAX_BATCH`] keys, because sled's memory grows with the
//! size of one batch (measured: batches of 10,000 keys reached GiBs of RSS,
//! 1,000 or fewer stayed flat). Durability is explicit: callers flush.

use std::path::Path;
use std::time::{Duration, Instant};

use fabric_proto::v1::Snapshot;
use prost::Message;

use crate::id::ChunkId;
use crate::index::{Catalog, ChunkIndex, IndexError, Location, SnapshotSource, is_committed};
use crate::index_table::{LOG_FILE, TableChunkIndex};

/// Largest number of keys sled is given in one `apply_batch`.
pub const MAX_BATCH: usize = 1000;

fn engine(err: sled::Error) -> IndexError {
    IndexError::Engine(Box::new(err))
}

/// How long [`open_db`] waits for a database lock that is held.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Open (or create) the sled database at `path` with a page cache of at most
/// `cache_bytes`. A lock held by another process fails after [`LOCK_WAIT`]
/// with [`IndexError::Locked`].
pub fn open_db(path: &Path, cache_bytes: u64) -> Result<sled::Db, IndexError> {
    open_db_waiting(path, cache_bytes, LOCK_WAIT)
}

fn open_db_waiting(path: &Path, cache_bytes: u64, wait: Duration) -> Result<sled::Db, IndexError> {
    let config = sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes)
        // The store flushes at every commit point itself. No background
        // flusher: its thread would hold the database (and its file lock)
        // for up to a period after the store is dropped.
        .flush_every_ms(None)
        .mode(sled::Mode::LowSpace);
    let started = Instant::now();
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            // sled writes its log buffers on its own thread pool, whose
            // tasks hold the database file (and its lock) for a moment
            // after the last handle is dropped: reopening right away (a
            // restart in the same process, a reindex) may find it held.
            Err(err) if is_lock_held(&err) => {
                if started.elapsed() >= wait {
                    return Err(IndexError::Locked {
                        path: path.to_owned(),
                        waited_ms: started.elapsed().as_millis() as u64,
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(err) => return Err(engine(err)),
        }
    }
}

/// Whether sled failed to open because the database's file lock is held.
/// sled reports it only as an `Other` I/O error with this text.
fn is_lock_held(err: &sled::Error) -> bool {
    matches!(err, sled::Error::Io(io) if io.to_string().starts_with("could not acquire lock"))
}

/// The chunk index in the `chunks` tree of a sled database.
#[derive(Clone, Debug)]
pub struct SledChunkIndex {
    db: sled::Db,
    tree: sled::Tree,
}

impl SledChunkIndex {
    /// The index in `db`.
    pub fn new(db: &sled::Db) -> Result<Self, IndexError> {
        Ok(Self {
            db: db.clone(),
            tree: db.open_tree("chunks").map_err(engine)?,
        })
    }
}

fn decode_location(key: &[u8], value: &[u8]) -> Result<Location, IndexError> {
    Location::decode(value).ok_or_else(|| IndexError::BadRecord {
        what: "chunk location",
        key: hex::encode(key),
    })
}

impl ChunkIndex for SledChunkIndex {
    fn get(&self, id: &ChunkId) -> Result<Option<Location>, IndexError> {
        match self.tree.get(id.as_bytes()).map_err(engine)? {
            Some(value) => Ok(Some(decode_location(id.as_bytes(), &value)?)),
            None => Ok(None),
        }
    }

    fn contains(&self, id: &ChunkId) -> Result<bool, IndexError> {
        self.tree.contains_key(id.as_bytes()).map_err(engine)
    }

    fn insert_batch(&self, entries: &[(ChunkId, Location)]) -> Result<(), IndexError> {
        for part in entries.chunks(MAX_BATCH) {
            let mut batch = sled::Batch::default();
            for (id, location) in part {
                batch.insert(&id.as_bytes()[..], &location.encode()[..]);
            }
            self.tree.apply_batch(batch).map_err(engine)?;
        }
        Ok(())
    }

    fn remove_batch(&self, ids: &[ChunkId]) -> Result<(), IndexError> {
        for part in ids.chunks(MAX_BATCH) {
            let mut batch = sled::Batch::default();
            for id in part {
                batch.remove(&id.as_bytes()[..]);
            }
            self.tree.apply_batch(batch).map_err(engine)?;
        }
        Ok(())
    }

    fn for_each(
        &self,
        visit: &mut dyn FnMut(ChunkId, Location) -> Result<(), IndexError>,
    ) -> Result<(), IndexError> {
        for item in self.tree.iter() {
            let (key, value) = item.map_err(engine)?;
            let id = ChunkId::from_slice(&key).map_err(|_| IndexError::BadRecord {
                what: "chunk id",
                key: hex::encode(&key),
            })?;
            visit(id, decode_location(&key, &value)?)?;
        }
        Ok(())
    }

    fn len(&self) -> Result<u64, IndexError> {
        Ok(self.tree.len() as u64)
    }

    fn clear(&self) -> Result<(), IndexError> {
        self.tree.clear().map_err(engine)
    }

    fn flush(&self) -> Result<(), IndexError> {
        self.db.flush().map(|_| ()).map_err(engine)
    }
}

/// Entries moved from the tree into the log per batch.
const MOVE_BATCH: usize = 10_000;

/// Open the chunk index in `index_dir`, moving it out of sled's `chunks`
/// tree first if it is still there (a store written before the log).
///
/// A store without the log gets one holding the tree's entries, written to
/// a temporary name, fsynced and renamed; only then is the tree cleared. A
/// crash before the rename moves it again at the next open. Entries found in
/// the tree while the log exists (a crash after the rename, before the clear
/// was flushed: the same entries; or an older build that wrote there since)
/// are inserted into the log and flushed before the tree is cleared, so
/// nothing indexed is dropped.
pub fn open_chunk_index(index_dir: &Path, db: &sled::Db) -> Result<TableChunkIndex, IndexError> {
    let path = index_dir.join(LOG_FILE);
    let old = SledChunkIndex::new(db)?;
    let exists = path.try_exists().map_err(|source| IndexError::Io {
        action: "cannot look for",
        path: path.clone(),
        source,
    })?;
    let index = if exists {
        let index = TableChunkIndex::open(&path)?;
        if !old.is_empty()? {
            let mut batch = Vec::with_capacity(MOVE_BATCH);
            old.for_each(&mut |id, location| {
                batch.push((id, location));
                if batch.len() == MOVE_BATCH {
                    index.insert_batch(&batch)?;
                    batch.clear();
                }
                Ok(())
            })?;
            index.insert_batch(&batch)?;
            index.flush()?;
        }
        index
    } else {
        TableChunkIndex::create_from(&path, &old)?
    };
    let moved = old.len()?;
    if moved > 0 {
        old.clear()?;
        old.flush()?;
        tracing::info!(
            path = %path.display(),
            "moved {moved} chunk index entries out of sled into the log"
        );
    }
    Ok(index)
}

/// The snapshot catalogue in the `snapshots` tree of the same sled database,
/// with its index by source in `snapshots_by_source`.
#[derive(Clone, Debug)]
pub struct SledCatalog {
    db: sled::Db,
    tree: sled::Tree,
    by_source: sled::Tree,
}

impl SledCatalog {
    /// The catalogue in `db`; its index by source is rebuilt first if it
    /// does not hold one key per record (a store written before the index
    /// existed, or a rebuild cut short). Counting both costs a scan of each
    /// at open: 10,000 records take milliseconds.
    pub fn new(db: &sled::Db) -> Result<Self, IndexError> {
        let catalog = Self {
            db: db.clone(),
            tree: db.open_tree("snapshots").map_err(engine)?,
            by_source: db.open_tree("snapshots_by_source").map_err(engine)?,
        };
        if catalog.by_source.len() != catalog.tree.len() {
            catalog.rebuild_source_index()?;
        }
        Ok(catalog)
    }

    fn rebuild_source_index(&self) -> Result<(), IndexError> {
        self.by_source.clear().map_err(engine)?;
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for item in self.tree.iter() {
            let (key, value) = item.map_err(engine)?;
            // A record that does not decode is no parent: left out (and
            // reported as a bad record by whatever reads it), not a reason
            // to refuse to open the store.
            let Ok(snapshot) = Snapshot::decode(value.as_ref()) else {
                tracing::warn!(
                    key = %String::from_utf8_lossy(&key),
                    "a snapshot record does not decode; left out of the index by source"
                );
                continue;
            };
            batch.insert(source_key(&snapshot), &[] as &[u8]);
            in_batch += 1;
            if in_batch == MAX_BATCH {
                self.by_source
                    .apply_batch(std::mem::take(&mut batch))
                    .map_err(engine)?;
                in_batch = 0;
            }
        }
        self.by_source.apply_batch(batch).map_err(engine)?;
        self.db.flush().map_err(engine)?;
        Ok(())
    }
}

/// Bytes of the two times in a source key.
const TIMES_LEN: usize = 16;

/// The first part of every source key of `source`: job, host and instance,
/// each as a 4-byte big-endian length and its bytes, so that no source's
/// keys are a prefix of another's.
fn source_prefix(source: &SnapshotSource<'_>) -> Vec<u8> {
    let mut key = Vec::with_capacity(
        12 + source.job.len() + source.host.len() + source.instance.len() + TIMES_LEN + 32,
    );
    for part in [source.job, source.host, source.instance] {
        key.extend_from_slice(&(part.len() as u32).to_be_bytes());
        key.extend_from_slice(part.as_bytes());
    }
    key
}

/// `snapshot`'s key in `snapshots_by_source`: its source prefix, then end
/// and start time (sign bit flipped, big-endian, so they sort as numbers),
/// then its id: a source's keys sort as [`crate::index::listing_order`].
fn source_key(snapshot: &Snapshot) -> Vec<u8> {
    let mut key = source_prefix(&SnapshotSource::of(snapshot));
    for time in [snapshot.end_time_ms, snapshot.start_time_ms] {
        key.extend_from_slice(&((time as u64) ^ (1 << 63)).to_be_bytes());
    }
    key.extend_from_slice(snapshot.id.as_bytes());
    key
}

fn decode_snapshot(key: &[u8], value: &[u8]) -> Result<Snapshot, IndexError> {
    Snapshot::decode(value).map_err(|_| IndexError::BadRecord {
        what: "snapshot",
        key: String::from_utf8_lossy(key).into_owned(),
    })
}

fn transaction_error(err: sled::transaction::TransactionError<IndexError>) -> IndexError {
    match err {
        sled::transaction::TransactionError::Abort(err) => err,
        sled::transaction::TransactionError::Storage(err) => engine(err),
    }
}

/// In a transaction: the source key of the record `old` (a record being
/// replaced or removed) is removed with it. A record that does not decode
/// has no key to remove; should one be left, [`Catalog::newest_of`] skips
/// it and the next open rebuilds the index (the counts differ).
fn remove_source_key(
    by_source: &sled::transaction::TransactionalTree,
    old: &sled::IVec,
) -> sled::transaction::ConflictableTransactionResult<(), IndexError> {
    if let Ok(old) = Snapshot::decode(old.as_ref()) {
        by_source.remove(source_key(&old))?;
    }
    Ok(())
}

impl Catalog for SledCatalog {
    fn put(&self, snapshot: &Snapshot) -> Result<(), IndexError> {
        use sled::Transactional;
        let id = snapshot.id.as_bytes();
        let value = snapshot.encode_to_vec();
        let key = source_key(snapshot);
        (&self.tree, &self.by_source)
            .transaction(|(records, by_source)| {
                if let Some(old) = records.insert(id, value.as_slice())? {
                    remove_source_key(by_source, &old)?;
                }
                by_source.insert(key.as_slice(), &[] as &[u8])?;
                Ok(())
            })
            .map_err(transaction_error)?;
        // The record is the commit point, durable on return. The chunk
        // index is not in this database: the store flushes it before.
        self.db.flush().map_err(engine)?;
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Option<Snapshot>, IndexError> {
        match self.tree.get(id.as_bytes()).map_err(engine)? {
            Some(value) => Ok(Some(decode_snapshot(id.as_bytes(), &value)?)),
            None => Ok(None),
        }
    }

    fn remove(&self, id: &str) -> Result<Option<Snapshot>, IndexError> {
        use sled::Transactional;
        let key = id.as_bytes();
        let removed = (&self.tree, &self.by_source)
            .transaction(|(records, by_source)| {
                let removed = records.remove(key)?;
                if let Some(old) = &removed {
                    remove_source_key(by_source, old)?;
                }
                Ok(removed)
            })
            .map_err(transaction_error)?;
        self.db.flush().map_err(engine)?;
        match removed {
            Some(value) => Ok(Some(decode_snapshot(key, &value)?)),
            None => Ok(None),
        }
    }

    fn list(&self) -> Result<Vec<Snapshot>, IndexError> {
        self.tree
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(engine)?;
                decode_snapshot(&key, &value)
            })
            .collect()
    }

    fn newest_of(&self, source: &SnapshotSource<'_>) -> Result<Option<Snapshot>, IndexError> {
        let prefix = source_prefix(source);
        // Newest first; usually the first key is the answer.
        for item in self.by_source.scan_prefix(&prefix).rev() {
            let (key, _) = item.map_err(engine)?;
            let Some(id) = key.get(prefix.len() + TIMES_LEN..) else {
                continue;
            };
            if let Some(snapshot) = self.get(&String::from_utf8_lossy(id))?
                && is_committed(&snapshot)
                && source.is_source_of(&snapshot)
            {
                return Ok(Some(snapshot));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::conformance;

    #[test]
    fn a_database_reopened_right_after_it_is_dropped_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        for round in 0..50u8 {
            let db = open_db(&path, 1 << 20).unwrap();
            // Enough to fill log buffers, which sled writes on its own threads.
            for key in 0..200u32 {
                db.insert(
                    [&[round][..], &key.to_be_bytes()].concat(),
                    vec![round; 512],
                )
                .unwrap();
            }
            db.flush().unwrap();
        }
        let db = open_db(&path, 1 << 20).unwrap();
        assert_eq!(db.len(), 50 * 200);
    }

    #[test]
    fn a_database_held_by_another_handle_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let _held = open_db(&path, 1 << 20).unwrap();
        let err = open_db_waiting(&path, 1 << 20, Duration::from_millis(20)).unwrap_err();
        assert!(matches!(&err, IndexError::Locked { path: locked, .. } if *locked == path));
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
    }

    #[test]
    fn sled_chunk_index_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir.path().join("db"), 8 << 20).unwrap();
        conformance::chunk_index(&SledChunkIndex::new(&db).unwrap());
    }

    #[test]
    fn sled_catalog_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir.path().join("db"), 8 << 20).unwrap();
        let catalog = SledCatalog::new(&db).unwrap();
        conformance::catalog(&catalog);
        conformance::newest_of_a_source(&catalog);
    }

    #[test]
    fn a_missing_or_stale_source_index_is_rebuilt_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir.path().join("db"), 8 << 20).unwrap();
        let catalog = SledCatalog::new(&db).unwrap();
        for (id, end) in [("a", 10), ("b", 30), ("c", 20)] {
            catalog
                .put(&Snapshot {
                    id: id.into(),
                    job: "job".into(),
                    host: "host".into(),
                    end_time_ms: end,
                    state: fabric_proto::v1::SnapshotState::Complete as i32,
                    ..Default::default()
                })
                .unwrap();
        }
        let source = SnapshotSource {
            job: "job",
            host: "host",
            instance: "",
        };
        let newest = |catalog: &SledCatalog| catalog.newest_of(&source).unwrap().map(|s| s.id);
        assert_eq!(newest(&catalog).as_deref(), Some("b"));
        // A store from before the index: the tree is empty.
        catalog.by_source.clear().unwrap();
        assert_eq!(newest(&catalog), None);
        let reopened = SledCatalog::new(&db).unwrap();
        assert_eq!(newest(&reopened).as_deref(), Some("b"));
        // A key left without its record (a rebuild cut short, say).
        reopened.by_source.insert(b"stale", &[] as &[u8]).unwrap();
        let reopened = SledCatalog::new(&db).unwrap();
        assert_eq!(reopened.by_source.len(), reopened.tree.len());
        assert_eq!(newest(&reopened).as_deref(), Some("b"));
        // A record that does not decode is left out; the store still opens.
        reopened.tree.insert(b"bad", &[0xff, 0xff, 0xff]).unwrap();
        reopened.by_source.clear().unwrap();
        let reopened = SledCatalog::new(&db).unwrap();
        assert_eq!(reopened.by_source.len(), 3);
        assert_eq!(newest(&reopened).as_deref(), Some("b"));
    }

    #[test]
    fn entries_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = ChunkId::of(b"x");
        let location = Location {
            pack: 3,
            offset: 12,
            stored_len: 5,
            raw_len: 1,
            codec: crate::pack::Codec::Raw,
        };
        {
            let db = open_db(&dir.path().join("db"), 8 << 20).unwrap();
            let index = SledChunkIndex::new(&db).unwrap();
            index.insert_batch(&[(id, location)]).unwrap();
            index.flush().unwrap();
        }
        let db = open_db(&dir.path().join("db"), 8 << 20).unwrap();
        assert_eq!(
            SledChunkIndex::new(&db).unwrap().get(&id).unwrap(),
            Some(location)
        );
    }
}
