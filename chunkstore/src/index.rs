//! The narrow seams to the key-value engine: [`ChunkIndex`] (chunk id ->
//! where its entry lives) and [`Catalog`] (snapshot records).
//!
//! The store talks to these traits only; the sled implementation lives in
//! `index_sled`, and the conformance suite here (`conformance`, test-only) is what any
//! other engine has to pass. This module must never know about sled, packs
//! on disk or trees.

use fabric_proto::v1::{Snapshot, SnapshotState};

use crate::id::ChunkId;
use crate::pack::{Codec, ENTRY_HEADER_LEN};

/// Where a chunk's entry is: enough to read it with one positioned read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Location {
    /// The pack's id.
    pub pack: u32,
    /// Offset of the entry (its header) in the pack.
    pub offset: u64,
    /// Stored length (after compression), header excluded.
    pub stored_len: u32,
    /// Plain length.
    pub raw_len: u32,
    /// How the bytes are stored.
    pub codec: Codec,
}

/// Bytes of an encoded [`Location`].
pub const LOCATION_LEN: usize = 4 + 8 + 4 + 4 + 1;

impl Location {
    /// Bytes the entry takes in the pack, header included.
    pub fn entry_len(&self) -> u64 {
        ENTRY_HEADER_LEN as u64 + u64::from(self.stored_len)
    }

    /// Offset just past the entry.
    pub fn end(&self) -> u64 {
        self.offset + self.entry_len()
    }

    /// The fixed-size encoding stored as an index value.
    pub fn encode(&self) -> [u8; LOCATION_LEN] {
        let mut out = [0u8; LOCATION_LEN];
        out[0..4].copy_from_slice(&self.pack.to_le_bytes());
        out[4..12].copy_from_slice(&self.offset.to_le_bytes());
        out[12..16].copy_from_slice(&self.stored_len.to_le_bytes());
        out[16..20].copy_from_slice(&self.raw_len.to_le_bytes());
        out[20] = self.codec.to_byte();
        out
    }

    /// Decode an index value; `None` if it is not one.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != LOCATION_LEN {
            return None;
        }
        let word = |range: std::ops::Range<usize>| -> [u8; 4] {
            let mut w = [0u8; 4];
            w.copy_from_slice(&bytes[range]);
            w
        };
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&bytes[4..12]);
        Some(Self {
            pack: u32::from_le_bytes(word(0..4)),
            offset: u64::from_le_bytes(offset),
            stored_len: u32::from_le_bytes(word(12..16)),
            raw_len: u32::from_le_bytes(word(16..20)),
            codec: Codec::from_byte(bytes[20])?,
        })
    }
}

/// An index or catalogue failure.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The engine failed.
    #[error("index engine: {0}")]
    Engine(Box<dyn std::error::Error + Send + Sync + 'static>),
    /// A stored record cannot be decoded.
    #[error("undecodable {what} record for key {key}")]
    BadRecord {
        /// Which kind of record.
        what: &'static str,
        /// Its key, hex or text.
        key: String,
    },
    /// A file of the index could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("cannot read", "cannot fsync", ...).
        action: &'static str,
        /// The file or directory.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An index file holds something its writer never wrote: not a torn
    /// tail (which is cut away) but damage before intact records.
    #[error(
        "the chunk index {path} is corrupt at byte {offset}: {detail} (move the file aside, open the store and reindex it: the chunk index is rebuilt from the packs)"
    )]
    Corrupt {
        /// The file.
        path: std::path::PathBuf,
        /// Where the damage starts.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// A write or fsync of the index failed earlier; what reached the file
    /// since its last flush is unknown, so it takes no more writes.
    #[error(
        "the chunk index {path} takes no more writes until the store is reopened: an earlier write failed: {reason}"
    )]
    WritesRefused {
        /// The file.
        path: std::path::PathBuf,
        /// The failure that stopped writes.
        reason: String,
    },
    /// Another process has the database open.
    #[error(
        "the index {path} is in use by another process (its lock is still held after {waited_ms} ms)"
    )]
    Locked {
        /// The database directory.
        path: std::path::PathBuf,
        /// How long the lock was waited for.
        waited_ms: u64,
    },
}

/// Chunk id -> [`Location`]. Implementations are shared between threads.
pub trait ChunkIndex: Send + Sync {
    /// Where chunk `id` is, if indexed.
    fn get(&self, id: &ChunkId) -> Result<Option<Location>, IndexError>;
    /// Whether chunk `id` is indexed.
    fn contains(&self, id: &ChunkId) -> Result<bool, IndexError>;
    /// Insert or replace many entries in one batch.
    fn insert_batch(&self, entries: &[(ChunkId, Location)]) -> Result<(), IndexError>;
    /// Remove many entries in one batch (absent ids are ignored).
    fn remove_batch(&self, ids: &[ChunkId]) -> Result<(), IndexError>;
    /// Every entry, in id order, passed to `visit`.
    fn for_each(
        &self,
        visit: &mut dyn FnMut(ChunkId, Location) -> Result<(), IndexError>,
    ) -> Result<(), IndexError>;
    /// Entries.
    fn len(&self) -> Result<u64, IndexError>;
    /// Whether the index is empty.
    fn is_empty(&self) -> Result<bool, IndexError> {
        Ok(self.len()? == 0)
    }
    /// Remove every entry (before a reindex).
    fn clear(&self) -> Result<(), IndexError>;
    /// Make every change so far durable.
    fn flush(&self) -> Result<(), IndexError>;
}

/// Snapshot records by id.
pub trait Catalog: Send + Sync {
    /// Insert or replace the record with `snapshot.id`, durable on return.
    fn put(&self, snapshot: &Snapshot) -> Result<(), IndexError>;
    /// The record with id `id`.
    fn get(&self, id: &str) -> Result<Option<Snapshot>, IndexError>;
    /// Remove the record with id `id`, durable on return; the removed record.
    fn remove(&self, id: &str) -> Result<Option<Snapshot>, IndexError>;
    /// Every record, in id order.
    fn list(&self) -> Result<Vec<Snapshot>, IndexError>;
    /// Records whose name is exactly `name`.
    fn find_by_name(&self, name: &str) -> Result<Vec<Snapshot>, IndexError> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|snapshot| snapshot.name == name)
            .collect())
    }
    /// The newest complete or verified record of `source` (newest by end
    /// time, then start time, then id: the order snapshots are listed in),
    /// the parent a backup of that source starts from. This default reads
    /// every record; an implementation with an index by source should not.
    fn newest_of(&self, source: &SnapshotSource<'_>) -> Result<Option<Snapshot>, IndexError> {
        Ok(newest_among(self.list()?, source))
    }
}

/// The newest committed snapshot of `source` among `snapshots`, by reading
/// them all: [`Catalog::newest_of`]'s answer, for whoever holds a listing.
pub fn newest_among(
    snapshots: impl IntoIterator<Item = Snapshot>,
    source: &SnapshotSource<'_>,
) -> Option<Snapshot> {
    snapshots
        .into_iter()
        .filter(|snapshot| source.is_source_of(snapshot) && is_committed(snapshot))
        .max_by(|a, b| listing_order(a).cmp(&listing_order(b)))
}

/// What a snapshot was taken of: job, host and instance, each exact (an
/// empty instance is the job's only one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotSource<'a> {
    /// The job's name.
    pub job: &'a str,
    /// The host backed up.
    pub host: &'a str,
    /// The job's instance, empty for none.
    pub instance: &'a str,
}

impl<'a> SnapshotSource<'a> {
    /// The source of `snapshot`.
    pub fn of(snapshot: &'a Snapshot) -> Self {
        Self {
            job: &snapshot.job,
            host: &snapshot.host,
            instance: &snapshot.instance,
        }
    }

    /// Whether `snapshot` was taken of this source.
    pub fn is_source_of(&self, snapshot: &Snapshot) -> bool {
        snapshot.job == self.job && snapshot.host == self.host && snapshot.instance == self.instance
    }
}

/// Whether a record counts as a parent: committed (complete or verified).
pub fn is_committed(snapshot: &Snapshot) -> bool {
    matches!(
        snapshot.state(),
        SnapshotState::Complete | SnapshotState::Verified
    )
}

/// The key snapshots are listed by, oldest first.
pub fn listing_order(snapshot: &Snapshot) -> (i64, i64, &str) {
    (snapshot.end_time_ms, snapshot.start_time_ms, &snapshot.id)
}

/// The suite every [`ChunkIndex`] and [`Catalog`] implementation must pass.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;
    use std::collections::BTreeMap;

    /// The id of test entry `n`.
    pub(crate) fn id(n: u32) -> ChunkId {
        ChunkId::of(&n.to_le_bytes())
    }

    /// The location of test entry `n`.
    pub(crate) fn location(n: u32) -> Location {
        Location {
            pack: n % 7,
            offset: u64::from(n) * 1000 + 12,
            stored_len: n + 1,
            raw_len: n * 2 + 1,
            codec: if n.is_multiple_of(2) {
                Codec::Zstd
            } else {
                Codec::Raw
            },
        }
    }

    /// Insert, get, contains, replace, remove, iterate, len, clear.
    pub(crate) fn chunk_index(index: &dyn ChunkIndex) {
        assert!(index.is_empty().unwrap());
        assert_eq!(index.get(&id(1)).unwrap(), None);
        let entries: Vec<(ChunkId, Location)> = (0..500).map(|n| (id(n), location(n))).collect();
        index.insert_batch(&entries).unwrap();
        assert_eq!(index.len().unwrap(), 500);
        for (key, value) in &entries {
            assert_eq!(index.get(key).unwrap(), Some(*value));
            assert!(index.contains(key).unwrap());
        }
        assert!(!index.contains(&id(1000)).unwrap());
        // Replacing keeps one entry per id.
        index.insert_batch(&[(id(3), location(900))]).unwrap();
        assert_eq!(index.get(&id(3)).unwrap(), Some(location(900)));
        assert_eq!(index.len().unwrap(), 500);
        // Removing absent ids is not an error.
        let gone: Vec<ChunkId> = (0..100).map(id).chain([id(5000)]).collect();
        index.remove_batch(&gone).unwrap();
        assert_eq!(index.len().unwrap(), 400);
        assert!(!index.contains(&id(50)).unwrap());
        assert!(index.contains(&id(150)).unwrap());
        // Iteration sees every entry once, in id order.
        let mut seen = BTreeMap::new();
        let mut previous = None;
        index
            .for_each(&mut |key, value| {
                assert!(previous < Some(key));
                previous = Some(key);
                assert!(seen.insert(key, value).is_none());
                Ok(())
            })
            .unwrap();
        assert_eq!(seen.len(), 400);
        assert_eq!(seen[&id(150)], location(150));
        index.flush().unwrap();
        index.clear().unwrap();
        assert!(index.is_empty().unwrap());
        assert_eq!(index.get(&id(150)).unwrap(), None);
    }

    fn snapshot(id: &str, name: &str) -> Snapshot {
        Snapshot {
            id: id.into(),
            name: name.into(),
            job: "job".into(),
            tags: vec!["a".into()],
            start_time_ms: 42,
            root_tree_id: vec![7; 32],
            ..Default::default()
        }
    }

    /// Put, get, replace, list, find by name, remove.
    pub(crate) fn catalog(catalog: &dyn Catalog) {
        assert!(catalog.list().unwrap().is_empty());
        assert_eq!(catalog.get("nope").unwrap(), None);
        catalog.put(&snapshot("bb", "daily")).unwrap();
        catalog.put(&snapshot("aa", "weekly")).unwrap();
        catalog.put(&snapshot("cc", "daily")).unwrap();
        assert_eq!(catalog.get("aa").unwrap(), Some(snapshot("aa", "weekly")));
        let ids: Vec<String> = catalog.list().unwrap().into_iter().map(|s| s.id).collect();
        assert_eq!(ids, ["aa", "bb", "cc"]);
        let daily: Vec<String> = catalog
            .find_by_name("daily")
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(daily, ["bb", "cc"]);
        assert!(catalog.find_by_name("dail").unwrap().is_empty());
        catalog.put(&snapshot("aa", "monthly")).unwrap();
        assert_eq!(catalog.get("aa").unwrap().unwrap().name, "monthly");
        assert_eq!(catalog.remove("bb").unwrap(), Some(snapshot("bb", "daily")));
        assert_eq!(catalog.remove("bb").unwrap(), None);
        assert_eq!(catalog.list().unwrap().len(), 2);
    }

    /// A record of `job`/`host`/`instance`, ended at `end`, in `state`.
    fn record(id: &str, source: (&str, &str, &str), end: i64, state: SnapshotState) -> Snapshot {
        Snapshot {
            id: id.into(),
            job: source.0.into(),
            host: source.1.into(),
            instance: source.2.into(),
            start_time_ms: end - 10,
            end_time_ms: end,
            state: state as i32,
            ..Default::default()
        }
    }

    /// The newest committed record of a source: sources that share a
    /// prefix stay apart, uncommitted records are skipped, and replacing or
    /// removing records moves the answer.
    pub(crate) fn newest_of_a_source(catalog: &dyn Catalog) {
        use SnapshotState::{Complete, Incomplete, Verified};
        let web = ("backup", "web", "");
        let sources = [
            web,
            ("backup", "web", "blue"),
            ("backupweb", "", ""),
            ("backup", "webx", ""),
            ("back", "upweb", ""),
        ];
        let newest = |source: (&str, &str, &str)| {
            let source = SnapshotSource {
                job: source.0,
                host: source.1,
                instance: source.2,
            };
            let found = catalog.newest_of(&source).unwrap().map(|s| s.id);
            // What reading every record answers.
            let by_listing = newest_among(catalog.list().unwrap(), &source).map(|s| s.id);
            assert_eq!(found, by_listing, "{source:?}");
            found
        };
        assert_eq!(newest(web), None);
        for (n, source) in sources.iter().enumerate() {
            for day in 0..5i64 {
                let id = format!("s{n}d{day}");
                catalog
                    .put(&record(&id, *source, 1000 + 100 * day, Complete))
                    .unwrap();
            }
        }
        for source in sources {
            assert!(newest(source).is_some());
        }
        assert_eq!(newest(web).as_deref(), Some("s0d4"));
        // Negative times sort as numbers too.
        catalog.put(&record("early", web, -5, Verified)).unwrap();
        assert_eq!(newest(web).as_deref(), Some("s0d4"));
        // A newer record that is not committed is no parent.
        catalog.put(&record("half", web, 9000, Incomplete)).unwrap();
        assert_eq!(newest(web).as_deref(), Some("s0d4"));
        // Replacing a record moves its key: d1 is now the newest, then not.
        catalog.put(&record("s0d1", web, 5000, Verified)).unwrap();
        assert_eq!(newest(web).as_deref(), Some("s0d1"));
        catalog.put(&record("s0d1", web, 1100, Complete)).unwrap();
        assert_eq!(newest(web).as_deref(), Some("s0d4"));
        // Equal times: the id decides, as in listings.
        catalog.put(&record("s0d4b", web, 1400, Complete)).unwrap();
        assert_eq!(newest(web).as_deref(), Some("s0d4b"));
        for id in ["s0d4b", "s0d4", "s0d3"] {
            catalog.remove(id).unwrap();
        }
        assert_eq!(newest(web).as_deref(), Some("s0d2"));
        assert_eq!(newest(("backup", "web", "blue")).as_deref(), Some("s1d4"));
        assert_eq!(newest(("backup", "nowhere", "")), None);
    }
}
