//! The sled implementation of [`ChunkIndex`] and [`Catalog`]: the only module
//! that knows sled.
//!
//! One sled database per store (`<store>/index`), two trees: `chunks` (32-byte
//! id -> 21-byte [`Location`]) and `snapshots` (id -> protobuf `Snapshot`).
//! sled is configured on purpose: a bounded page cache, and writes applied in
//! batches of at most [`MAX_BATCH`] keys, because sled's memory grows with the
//! size of one batch (measured: batches of 10,000 keys reached GiBs of RSS,
//! 1,000 or fewer stayed flat). Durability is explicit: callers flush.

use std::path::Path;
use std::time::{Duration, Instant};

use fabric_proto::v1::Snapshot;
use prost::Message;

use crate::id::ChunkId;
use crate::index::{Catalog, ChunkIndex, IndexError, Location};

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

/// The snapshot catalogue in the `snapshots` tree of the same sled database.
#[derive(Clone, Debug)]
pub struct SledCatalog {
    db: sled::Db,
    tree: sled::Tree,
}

impl SledCatalog {
    /// The catalogue in `db`.
    pub fn new(db: &sled::Db) -> Result<Self, IndexError> {
        Ok(Self {
            db: db.clone(),
            tree: db.open_tree("snapshots").map_err(engine)?,
        })
    }
}

fn decode_snapshot(key: &[u8], value: &[u8]) -> Result<Snapshot, IndexError> {
    Snapshot::decode(value).map_err(|_| IndexError::BadRecord {
        what: "snapshot",
        key: String::from_utf8_lossy(key).into_owned(),
    })
}

impl Catalog for SledCatalog {
    fn put(&self, snapshot: &Snapshot) -> Result<(), IndexError> {
        self.tree
            .insert(snapshot.id.as_bytes(), snapshot.encode_to_vec())
            .map_err(engine)?;
        // The record is the commit point: sled writes in order, so one flush
        // also makes every index entry inserted before it durable.
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
        let removed = self.tree.remove(id.as_bytes()).map_err(engine)?;
        self.db.flush().map_err(engine)?;
        match removed {
            Some(value) => Ok(Some(decode_snapshot(id.as_bytes(), &value)?)),
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
        conformance::catalog(&SledCatalog::new(&db).unwrap());
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
