//! [`Store`]: one chunk store in one directory, shared between threads.
//!
//! Layout of a store directory:
//!
//! - `config.toml`: the [`StoreConfig`] recorded at creation (chunk parameters
//!   are fixed from then on);
//! - `packs/`: pack files (see [`crate::pack`]), never overwritten in place;
//! - `index/`: the chunk index's log `chunks.log` (see
//!   [`crate::index_table`]) beside the sled database holding the snapshot
//!   catalogue (see [`crate::index_sled`]); sled's lock on it keeps a second
//!   process out of both;
//! - `snapshots/`: one file per snapshot record (protobuf), written before the
//!   catalogue entry, so `reindex` can rebuild everything if `index/` is lost.
//!
//! Write order (the crash-safety contract): chunk bytes appended to a pack and
//! fsynced, then index entries (flushed), then tree chunks (the same way),
//! then the snapshot record, the single commit point. So a crash leaves at
//! worst unreferenced chunks (garbage for GC), never a snapshot that
//! references a missing chunk, and the index never points at bytes that were
//! not fsynced. Opening a store repairs the unsealed tail of a pack.
//!
//! This module owns the write and read paths, trees and the snapshot
//! catalogue's rules; GC lives in [`crate::gc`], verify, reindex and stats in
//! [`crate::verify`]. It must never hold a lock while compressing, nor the
//! writer lock while an fsync runs on the ingest path: a full pack's seal is
//! written under the lock and fsynced after it, and a flush waits for that
//! fsync before it indexes the pack's chunks.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};

use fabric_proto::v1::{EntryKind, Snapshot, SnapshotState, Tree};
use prost::Message;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::chunker::{Chunk, ChunkParams};
use crate::error::StoreError;
use crate::id::ChunkId;
use crate::index::{Catalog, ChunkIndex, IndexError, Location, SnapshotSource, listing_order};
use crate::index_sled::{SledCatalog, open_chunk_index, open_db};
use crate::pack::{self, EncodedEntry, PackWriter, StoredChunk};
use crate::sink::{ChunkSink, ChunkSource, SinkError};
use crate::tree_parts;
use crate::validate::{self, TreeSummary};

/// The tunables of a store, recorded in `<dir>/config.toml` at creation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StoreConfig {
    /// FastCDC parameters: fixed at creation, a store refuses others.
    pub chunk_params: ChunkParams,
    /// zstd level for new chunks (1-22).
    pub zstd_level: i32,
    /// A pack is sealed once it reaches this many bytes.
    pub pack_target_size: u64,
    /// GC rewrites a pack whose live fraction (live bytes / data bytes) is under this.
    pub repack_threshold: f64,
    /// The page cache bound of sled (the snapshot catalogue), bytes.
    pub index_cache_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            chunk_params: ChunkParams::default(),
            zstd_level: 3,
            pack_target_size: 32 << 20,
            repack_threshold: 0.5,
            index_cache_bytes: 64 << 20,
        }
    }
}

/// What one `put_chunks` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PutStats {
    /// Chunks offered.
    pub chunks: u64,
    /// Chunks the store did not have, now stored.
    pub new_chunks: u64,
    /// Plain bytes of the new chunks.
    pub new_bytes: u64,
    /// Bytes the new chunks take in packs (compressed, headers included).
    pub stored_bytes: u64,
}

impl PutStats {
    /// Add `other` to these counters.
    pub fn add(&mut self, other: &PutStats) {
        self.chunks += other.chunks;
        self.new_chunks += other.new_chunks;
        self.new_bytes += other.new_bytes;
        self.stored_bytes += other.stored_bytes;
    }
}

/// A chunk store in one directory. `Send + Sync`: share it with an `Arc`.
pub struct Store {
    pub(crate) dir: PathBuf,
    pub(crate) packs_dir: PathBuf,
    pub(crate) config: StoreConfig,
    pub(crate) index: Arc<dyn ChunkIndex>,
    pub(crate) catalog: Arc<dyn Catalog>,
    /// The pack being filled, if any.
    writer: Mutex<Option<PackWriter>>,
    pub(crate) next_pack: AtomicU32,
    /// Chunks appended to a pack but not yet in the index (not yet fsynced,
    /// or fsynced and about to be indexed): found by reads, never indexed early.
    pending: RwLock<HashMap<ChunkId, Location>>,
    /// Counts the times pending chunks moved into the index, bumped under the
    /// `pending` write lock. A writer that found a chunk in neither (and then
    /// spent a while encoding it) looks in the index again before appending
    /// when this moved meanwhile: another writer may have stored and
    /// flushed the same chunk, and a second copy would only waste space.
    index_moves: AtomicU64,
    /// Held while pending chunks move into the index
    /// ([`Store::index_placed`]), so that a list of placed chunks read
    /// before another mover (GC's [`Store::flush_and_seal`]) ran is checked
    /// against what is still pending and never indexed a second time.
    indexing: Mutex<()>,
    /// Counts snapshot commits and deletions, for whoever keeps figures
    /// derived from the snapshot list (a node's usage counters) fresh.
    catalog_changes: AtomicU64,
    /// Packs sealed (no more appends) whose fsync is still running: the
    /// sealer runs it after releasing the writer lock, so other writers go on
    /// meanwhile. Whoever indexes pending chunks first waits for the packs
    /// that hold them to leave this set ([`Store::seal_synced`] wakes them).
    syncing_seals: Mutex<HashSet<u32>>,
    seal_synced: Condvar,
    /// Set by the first pack fsync that fails; from then on every write is
    /// refused. Linux may drop the dirty pages of a failed fsync and let the
    /// next one succeed, so no later fsync can vouch for those bytes.
    write_failure: OnceLock<String>,
    /// Held across each pack fsync and the check of `write_failure` before
    /// it, so an fsync that returns after another one failed never counts.
    sync_gate: Mutex<()>,
    /// Tests: make the next pack fsync fail.
    #[cfg(test)]
    fail_next_sync: std::sync::atomic::AtomicBool,
    /// Open read handles of packs.
    files: Mutex<HashMap<u32, Arc<File>>>,
    /// Held by a commit from its DAG check to its record write, and by GC
    /// while it starts protecting and lists the live snapshots.
    pub(crate) commit_lock: Mutex<()>,
    /// One GC or reindex at a time.
    pub(crate) maintenance_lock: Mutex<()>,
    /// While a GC runs: every chunk id offered, put, or checked by a commit
    /// since it started. GC never sweeps these.
    pub(crate) protected: Mutex<Option<HashSet<ChunkId>>>,
    /// Unsealed packs the last open found and repaired (sealed, tail cut).
    repaired_at_open: u64,
    /// Trees whose whole DAG a commit found valid and indexed, with what
    /// each expands to, since the last GC or reindex began (only those
    /// remove index entries): a later commit of the same subtrees (an
    /// unchanged re-backup) takes their summaries without reading them. Not
    /// used or filled while a GC runs, emptied when one starts; at most
    /// [`COMPLETE_TREES_HELD`] trees.
    pub(crate) complete_trees: Mutex<HashMap<ChunkId, TreeSummary>>,
}

/// Trees [`Store::commit_snapshot`] remembers as complete, at most (about
/// 100 bytes each, id and summary); beyond, it forgets them all and starts
/// again.
const COMPLETE_TREES_HELD: usize = 1 << 20;

/// Snapshots whose new bytes make "the usual" for the growth guard.
pub const USUAL_OF_LAST: usize = 10;

/// byteback's guards against a hostile client, applied at a commit (see
/// [`Store::commit_snapshot_guarded`]). `None` turns one off.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommitGuards {
    /// The least time between two snapshots of one job, host and instance.
    pub min_interval_ms: Option<i64>,
    /// How many times the usual new bytes a snapshot may add unflagged.
    pub max_growth: Option<f64>,
    /// The quota of the snapshot's host on this store: the most bytes its
    /// snapshots' `stored_bytes` may add up to, this one included.
    pub host_quota_bytes: Option<u64>,
}

/// Bytes the snapshots of `host` among `snapshots` added to their store:
/// the sum of their `stored_bytes`, what a host quota counts.
pub fn stored_by_host<'a>(snapshots: impl IntoIterator<Item = &'a Snapshot>, host: &str) -> u64 {
    snapshots
        .into_iter()
        .filter(|snapshot| snapshot.host == host)
        .map(|snapshot| {
            snapshot
                .stats
                .as_ref()
                .map_or(0, |stats| stats.stored_bytes)
        })
        .fold(0u64, u64::saturating_add)
}

/// The median new bytes of the newest [`USUAL_OF_LAST`] of `snapshots`
/// (by commit time), or `None` when there are none or the median is 0.
fn usual_new_bytes(snapshots: &[&Snapshot]) -> Option<u64> {
    let mut recent: Vec<&Snapshot> = snapshots.to_vec();
    recent.sort_by_key(|snapshot| std::cmp::Reverse(snapshot.end_time_ms));
    let mut sizes: Vec<u64> = recent
        .iter()
        .take(USUAL_OF_LAST)
        .map(|snapshot| snapshot.stats.as_ref().map_or(0, |stats| stats.new_bytes))
        .collect();
    if sizes.is_empty() {
        return None;
    }
    sizes.sort_unstable();
    Some(sizes[sizes.len() / 2]).filter(|&median| median > 0)
}

/// The shortest id prefix [`Store::find_snapshot`] takes for an id.
pub const MIN_ID_PREFIX: usize = 8;

// Shared between upload threads behind an `Arc`: must stay Send + Sync.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Store>();
};

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

/// Lock a mutex, taking over the data if a panicking thread poisoned it:
/// every critical section here leaves the data consistent at each step.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn read_lock<T>(rw: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    rw.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn write_lock<T>(rw: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    rw.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

const CONFIG_FILE: &str = "config.toml";

fn read_config(dir: &Path) -> Result<Option<StoreConfig>, StoreError> {
    let path = dir.join(CONFIG_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(StoreError::io("cannot read", &path)(err)),
    };
    toml::from_str(&text)
        .map(Some)
        .map_err(|err| StoreError::Config {
            path,
            detail: err.to_string(),
        })
}

fn write_config(dir: &Path, config: &StoreConfig) -> Result<(), StoreError> {
    let path = dir.join(CONFIG_FILE);
    let text = toml::to_string(config).map_err(|err| StoreError::Config {
        path: path.clone(),
        detail: err.to_string(),
    })?;
    let temporary = dir.join("config.toml.new");
    let header = "# fabric chunk store. chunk_params cannot change once chunks are stored.\n";
    std::fs::write(&temporary, format!("{header}{text}"))
        .map_err(StoreError::io("cannot write", &temporary))?;
    File::open(&temporary)
        .and_then(|file| file.sync_all())
        .map_err(StoreError::io("cannot fsync", &temporary))?;
    std::fs::rename(&temporary, &path).map_err(StoreError::io("cannot rename", &path))?;
    pack::sync_dir(dir).map_err(StoreError::io("cannot fsync", dir))
}

impl Store {
    /// Open the store in `dir`, creating it with `config` if there is none.
    /// An existing store keeps its chunk parameters: asking for others is an
    /// error naming both; the other tunables are taken from `config`.
    pub fn open_or_create(dir: &Path, config: StoreConfig) -> Result<Store, StoreError> {
        config
            .chunk_params
            .validate()
            .map_err(|source| StoreError::BadParams {
                dir: dir.to_owned(),
                source,
            })?;
        match read_config(dir)? {
            Some(recorded) if recorded.chunk_params != config.chunk_params => {
                Err(StoreError::ParamsMismatch {
                    dir: dir.to_owned(),
                    recorded: recorded.chunk_params,
                    requested: config.chunk_params,
                })
            }
            Some(_) => Self::open_with(dir, config),
            None => {
                std::fs::create_dir_all(dir.join("packs"))
                    .map_err(StoreError::io("cannot create", dir.join("packs")))?;
                write_config(dir, &config)?;
                Self::open_with(dir, config)
            }
        }
    }

    /// Open the existing store in `dir` with its recorded config.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let config = read_config(dir)?.ok_or_else(|| StoreError::Config {
            path: dir.join(CONFIG_FILE),
            detail: "missing: not a chunk store (create one first)".into(),
        })?;
        Self::open_with(dir, config)
    }

    fn open_with(dir: &Path, config: StoreConfig) -> Result<Store, StoreError> {
        let packs_dir = dir.join("packs");
        std::fs::create_dir_all(&packs_dir).map_err(StoreError::io("cannot create", &packs_dir))?;
        let index_error = |source| StoreError::Index {
            dir: dir.to_owned(),
            source,
        };
        let index_dir = dir.join("index");
        let db = open_db(&index_dir, config.index_cache_bytes).map_err(index_error)?;
        let index = open_chunk_index(&index_dir, &db).map_err(index_error)?;
        let catalog = SledCatalog::new(&db).map_err(index_error)?;
        let store = Store {
            dir: dir.to_owned(),
            packs_dir,
            config,
            index: Arc::new(index),
            catalog: Arc::new(catalog),
            writer: Mutex::new(None),
            next_pack: AtomicU32::new(0),
            pending: RwLock::new(HashMap::new()),
            index_moves: AtomicU64::new(0),
            indexing: Mutex::new(()),
            catalog_changes: AtomicU64::new(0),
            syncing_seals: Mutex::new(HashSet::new()),
            seal_synced: Condvar::new(),
            write_failure: OnceLock::new(),
            sync_gate: Mutex::new(()),
            #[cfg(test)]
            fail_next_sync: std::sync::atomic::AtomicBool::new(false),
            files: Mutex::new(HashMap::new()),
            commit_lock: Mutex::new(()),
            maintenance_lock: Mutex::new(()),
            protected: Mutex::new(None),
            repaired_at_open: 0,
            complete_trees: Mutex::new(HashMap::new()),
        };
        let packs = store.pack_ids()?;
        let next = packs.iter().max().map_or(1, |max| max + 1);
        store.next_pack.store(next, Ordering::SeqCst);
        let mut store = store;
        store.repaired_at_open = crate::verify::repair_unsealed(&store, &packs)?;
        Ok(store)
    }

    /// How many unsealed packs (left by a crash) opening this store repaired.
    pub fn repaired_at_open(&self) -> u64 {
        self.repaired_at_open
    }

    /// The config in effect.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn index_error(&self) -> impl Fn(IndexError) -> StoreError + '_ {
        |source| StoreError::Index {
            dir: self.dir.clone(),
            source,
        }
    }

    /// The path of pack `id`.
    pub fn pack_path(&self, id: u32) -> PathBuf {
        self.packs_dir.join(pack::pack_file_name(id))
    }

    /// Ids of every pack file, ascending.
    pub fn pack_ids(&self) -> Result<Vec<u32>, StoreError> {
        let mut ids = Vec::new();
        let entries = std::fs::read_dir(&self.packs_dir)
            .map_err(StoreError::io("cannot list", &self.packs_dir))?;
        for entry in entries {
            let entry = entry.map_err(StoreError::io("cannot list", &self.packs_dir))?;
            if let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(pack::parse_pack_file_name)
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    pub(crate) fn allocate_pack_id(&self) -> u32 {
        self.next_pack.fetch_add(1, Ordering::SeqCst)
    }

    /// Record `ids` as protected if a GC is running (see [`crate::gc`]).
    pub(crate) fn protect<'a>(&self, ids: impl IntoIterator<Item = &'a ChunkId>) {
        if let Some(set) = lock(&self.protected).as_mut() {
            set.extend(ids);
        }
    }

    /// Whether chunk `id` is in the store (durable or pending).
    pub fn contains(&self, id: &ChunkId) -> Result<bool, StoreError> {
        self.protect([id]);
        if read_lock(&self.pending).contains_key(id) {
            return Ok(true);
        }
        self.index.contains(id).map_err(self.index_error())
    }

    /// The ids of `ids` the store lacks, in offered order (each once).
    pub fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        self.protect(ids);
        let mut seen = HashSet::with_capacity(ids.len());
        let mut out = Vec::new();
        for id in ids {
            if seen.insert(*id)
                && !read_lock(&self.pending).contains_key(id)
                && !self.index.contains(id).map_err(self.index_error())?
            {
                out.push(*id);
            }
        }
        Ok(out)
    }

    /// Store `chunks`: every chunk is re-hashed first and a mismatch refuses
    /// the whole batch; chunks present already are skipped; the rest are
    /// compressed in parallel, appended, fsynced and indexed. Durable on return.
    pub fn put_chunks(&self, chunks: Vec<Chunk>) -> Result<PutStats, StoreError> {
        self.put_chunks_with(chunks, true)
    }

    /// Like [`Store::put_chunks`] (every chunk re-hashed first, nothing of the
    /// batch stored on a mismatch, compression in parallel), but the new
    /// chunks are only appended to the open pack: found by reads at once,
    /// durable at the next [`Store::flush_pending`] or commit. A receiver
    /// uses this to take a stream of batches without an fsync per batch; a
    /// crash before the flush loses them, and a resumed upload sends them
    /// again.
    pub fn put_chunks_pending(&self, chunks: Vec<Chunk>) -> Result<PutStats, StoreError> {
        self.put_chunks_with(chunks, false)
    }

    fn put_chunks_with(&self, chunks: Vec<Chunk>, durable: bool) -> Result<PutStats, StoreError> {
        check_hashes(&chunks)?;
        let ids: Vec<ChunkId> = chunks.iter().map(|chunk| chunk.id).collect();
        let level = self.config.zstd_level;
        self.put_fresh(&ids, durable, |index| {
            let chunk = &chunks[index];
            pack::encode_entry(chunk.id, &chunk.data, level)
        })
    }

    /// Store chunks in the encoded form a sender chose (see
    /// [`pack::StoredChunk`]): every chunk is decoded and re-hashed first, and
    /// one that does not decode to its length and id refuses the whole batch;
    /// chunks present already are skipped; the rest are appended as they are,
    /// without compressing again. Durable at the next
    /// [`Store::flush_pending`] or commit, like [`Store::put_chunks_pending`].
    pub fn put_stored_pending(&self, chunks: Vec<StoredChunk>) -> Result<PutStats, StoreError> {
        if let Some((id, err)) = pack::on_pool(|| {
            chunks
                .par_iter()
                .find_map_first(|chunk| chunk.check().err().map(|err| (chunk.id, err)))
        }) {
            return Err(match err {
                pack::EntryError::HashMismatch => StoreError::ChunkMismatch { id },
                other => StoreError::BadEncoding {
                    id,
                    detail: other.to_string(),
                },
            });
        }
        let ids: Vec<ChunkId> = chunks.iter().map(|chunk| chunk.id).collect();
        self.put_fresh(&ids, false, |index| {
            let chunk = &chunks[index];
            pack::encode_stored(chunk.id, chunk.codec, chunk.raw_len, &chunk.stored[..])
        })
    }

    /// Append the chunks of `ids` the store lacks (first occurrence only),
    /// each encoded by `encode(position)` in parallel, and count them; with
    /// `durable`, fsync and index them before returning.
    fn put_fresh<'a>(
        &self,
        ids: &[ChunkId],
        durable: bool,
        encode: impl Fn(usize) -> EncodedEntry<'a> + Sync,
    ) -> Result<PutStats, StoreError> {
        self.refuse_writes_if_failed()?;
        let (fresh, checked) = self.fresh_positions(ids)?;
        let mut stats = PutStats {
            chunks: ids.len() as u64,
            ..Default::default()
        };
        if !fresh.is_empty() {
            let encoded: Vec<EncodedEntry> =
                pack::on_pool(|| fresh.par_iter().map(|&index| encode(index)).collect());
            let Appended {
                placed,
                open_file,
                sealed,
            } = self.append(encoded, checked)?;
            for seal in sealed {
                seal.sync()?;
            }
            if durable {
                if let Some((file, path)) = open_file {
                    self.sync_pack(&file, &path, false)?;
                }
                self.index_placed(&placed)?;
            }
            for (_, location) in &placed {
                stats.new_chunks += 1;
                stats.new_bytes += u64::from(location.raw_len);
                stats.stored_bytes += location.entry_len();
            }
        }
        if !durable {
            return Ok(stats);
        }
        // A chunk skipped because another writer had it pending (a sink put
        // not flushed yet) is not durable yet: make it so before returning.
        let still_pending = {
            let pending = read_lock(&self.pending);
            ids.iter().any(|id| pending.contains_key(id))
        };
        if still_pending {
            self.flush_pending()?;
        }
        Ok(stats)
    }

    /// Protect `ids` from a running GC and return the positions of those the
    /// store lacks, first occurrence only, with the [`FreshCheck`] to hand
    /// to [`Self::append`].
    fn fresh_positions(&self, ids: &[ChunkId]) -> Result<(Vec<usize>, FreshCheck), StoreError> {
        self.protect(ids);
        // Read before looking: a move into the index after this is seen.
        let checked = FreshCheck {
            index_moves: self.index_moves.load(Ordering::Acquire),
        };
        let mut seen = HashSet::with_capacity(ids.len());
        let mut fresh = Vec::new();
        for (position, id) in ids.iter().enumerate() {
            if seen.insert(*id)
                && !read_lock(&self.pending).contains_key(id)
                && !self.index.contains(id).map_err(self.index_error())?
            {
                fresh.push(position);
            }
        }
        Ok((fresh, checked))
    }

    /// Append entries to the open pack (rolling to a new one at the target
    /// size) and record them as pending. Returns where each went, the open
    /// pack's handle and the packs sealed on the way, all of which the caller
    /// fsyncs after the writer lock is released (the sealed ones first: a
    /// flush waits for them). An entry another writer appended since
    /// `checked` (pending, or already moved into the index) is left out.
    fn append(
        &self,
        entries: Vec<EncodedEntry>,
        checked: FreshCheck,
    ) -> Result<Appended<'_>, StoreError> {
        let mut placed = Vec::with_capacity(entries.len());
        let mut sealed = Vec::new();
        let mut writer = lock(&self.writer);
        for entry in entries {
            let id = entry.header.id;
            if read_lock(&self.pending).contains_key(&id) {
                continue;
            }
            // After the look at pending: a chunk that left it for the index
            // bumped the count before that lock was released.
            if self.index_moves.load(Ordering::Acquire) != checked.index_moves
                && self.index.contains(&id).map_err(self.index_error())?
            {
                continue;
            }
            if writer.is_none() {
                let pack_id = self.allocate_pack_id();
                let created = PackWriter::create(&self.packs_dir, pack_id).map_err(
                    StoreError::io("cannot create pack", self.pack_path(pack_id)),
                )?;
                *writer = Some(created);
            }
            let Some(open) = writer.as_mut() else {
                continue;
            };
            let offset = match open.append(&entry) {
                Ok(offset) => offset,
                Err(err) => {
                    // The pack may now end in a partial entry: never append
                    // after it. Sync what went before (it is pending), leave
                    // the tail for the repair at the next open.
                    let path = open.path().to_owned();
                    if self.sync_pack(&open.file(), &path, false).is_err() {
                        self.forget_pending_in(open.id());
                    }
                    *writer = None;
                    return Err(StoreError::io("cannot append to pack", path)(err));
                }
            };
            let location = Location {
                pack: open.id(),
                offset,
                stored_len: entry.header.stored_len,
                raw_len: entry.header.raw_len,
                codec: entry.header.codec,
            };
            write_lock(&self.pending).insert(id, location);
            placed.push((id, location));
            if open.len() >= self.config.pack_target_size
                && let Some(full) = writer.take()
            {
                let seal = UnsyncedSeal::begin(self, &full);
                full.write_seal()
                    .map_err(StoreError::io("cannot seal pack", seal.path.clone()))?;
                sealed.push(seal);
            }
        }
        let open_file = writer
            .as_ref()
            .map(|open| (open.file(), open.path().to_owned()));
        Ok(Appended {
            placed,
            open_file,
            sealed,
        })
    }

    /// Drop the pending chunks that lie in `pack`, whose fsync failed: they
    /// must never be indexed, and a later put stores them again.
    fn forget_pending_in(&self, pack: u32) {
        write_lock(&self.pending).retain(|_, location| location.pack != pack);
    }

    /// Why the store refuses writes, if it does: a pack fsync failed since
    /// it was opened (the node reports NOT_SERVING).
    pub fn write_failure(&self) -> Option<&str> {
        self.write_failure.get().map(String::as_str)
    }

    /// Refuse a write once a pack fsync has failed.
    pub(crate) fn refuse_writes_if_failed(&self) -> Result<(), StoreError> {
        match self.write_failure.get() {
            Some(reason) => Err(StoreError::WritesRefused {
                dir: self.dir.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Fsync pack `file` (data only, or with its metadata when `whole`),
    /// unless an earlier pack fsync failed; a failure stops all writes.
    pub(crate) fn sync_pack(
        &self,
        file: &File,
        path: &Path,
        whole: bool,
    ) -> Result<(), StoreError> {
        let _gate = lock(&self.sync_gate);
        self.refuse_writes_if_failed()?;
        #[cfg(test)]
        let injected = self.fail_next_sync.swap(false, Ordering::SeqCst);
        #[cfg(not(test))]
        let injected = false;
        let synced = if injected {
            Err(std::io::Error::other("injected fsync failure"))
        } else if whole {
            file.sync_all()
        } else {
            file.sync_data()
        };
        synced.map_err(|source| {
            let err = StoreError::io("cannot fsync pack", path)(source);
            let _ = self.write_failure.set(err.to_string());
            tracing::error!(dir = %self.dir.display(), "{err}; the store refuses writes until it is reopened");
            err
        })
    }

    /// Write `full`'s seal and fsync the whole pack.
    pub(crate) fn seal_and_sync(&self, full: PackWriter) -> Result<(), StoreError> {
        let path = full.path().to_owned();
        let file = full
            .write_seal()
            .map_err(StoreError::io("cannot seal pack", path.clone()))?;
        self.sync_pack(&file, &path, true)
    }

    /// Wait until none of `packs` is still being synced by its sealer.
    fn wait_for_seals(&self, packs: &HashSet<u32>) {
        if packs.is_empty() {
            return;
        }
        let mut syncing = lock(&self.syncing_seals);
        while syncing.iter().any(|pack| packs.contains(pack)) {
            syncing = self
                .seal_synced
                .wait(syncing)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Wait for every seal in progress; with the writer lock held, that is
    /// every seal there will be until it is released.
    fn wait_for_all_seals(&self) {
        let syncing = lock(&self.syncing_seals).clone();
        self.wait_for_seals(&syncing);
    }

    /// Index fsynced entries, flush the index, then forget them as pending.
    /// Only entries still pending where they were placed are indexed: one
    /// another mover indexed first may have been swept by GC since, its pack
    /// deleted, and indexing it again would point at a pack that is gone.
    fn index_placed(&self, placed: &[(ChunkId, Location)]) -> Result<(), StoreError> {
        if placed.is_empty() {
            return Ok(());
        }
        self.refuse_writes_if_failed()?;
        let _indexing = lock(&self.indexing);
        let still_pending: Vec<(ChunkId, Location)> = {
            let pending = read_lock(&self.pending);
            placed
                .iter()
                .filter(|(id, location)| pending.get(id) == Some(location))
                .copied()
                .collect()
        };
        if still_pending.is_empty() {
            return Ok(());
        }
        self.index
            .insert_batch(&still_pending)
            .map_err(self.index_error())?;
        self.index.flush().map_err(self.index_error())?;
        let mut pending = write_lock(&self.pending);
        for (id, location) in &still_pending {
            if pending.get(id) == Some(location) {
                pending.remove(id);
            }
        }
        self.index_moves.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Make every pending chunk durable: fsync the open pack, wait for the
    /// sealers of full packs to fsync theirs, then index.
    pub fn flush_pending(&self) -> Result<(), StoreError> {
        let (mut placed, open_file, syncing) = {
            let writer = lock(&self.writer);
            let placed: Vec<(ChunkId, Location)> = read_lock(&self.pending)
                .iter()
                .map(|(id, location)| (*id, *location))
                .collect();
            let open_file = writer
                .as_ref()
                .map(|open| (open.file(), open.path().to_owned()));
            (placed, open_file, lock(&self.syncing_seals).clone())
        };
        if placed.is_empty() {
            return Ok(());
        }
        if let Some((file, path)) = open_file {
            self.sync_pack(&file, &path, false)?;
        }
        if !syncing.is_empty() {
            self.wait_for_seals(&syncing);
            // A sealer whose fsync failed took its pack's chunks out of pending.
            let pending = read_lock(&self.pending);
            placed.retain(|(id, location)| pending.get(id) == Some(location));
        }
        self.index_placed(&placed)
    }

    /// Seal the open pack, if any (shutdown: no more appends to it).
    pub(crate) fn seal_open_pack(&self) -> Result<Option<u32>, StoreError> {
        let mut writer = lock(&self.writer);
        match writer.take() {
            Some(open) => {
                let id = open.id();
                self.seal_and_sync(open)?;
                Ok(Some(id))
            }
            None => Ok(None),
        }
    }

    /// Under the writer lock: seal the open pack, index every pending chunk,
    /// and list the pack ids, none of which will be appended to again.
    pub(crate) fn flush_and_seal(&self) -> Result<Vec<u32>, StoreError> {
        let mut writer = lock(&self.writer);
        if let Some(open) = writer.take() {
            let pack = open.id();
            if let Err(err) = self.seal_and_sync(open) {
                self.forget_pending_in(pack);
                return Err(err);
            }
        }
        self.wait_for_all_seals();
        let placed: Vec<(ChunkId, Location)> = read_lock(&self.pending)
            .iter()
            .map(|(id, location)| (*id, *location))
            .collect();
        self.index_placed(&placed)?;
        self.pack_ids()
    }

    /// Run `body` with the writer locked and every sealed pack synced:
    /// nothing is appended or sealed meanwhile.
    pub(crate) fn with_writer_locked<T>(&self, body: impl FnOnce() -> T) -> T {
        let _writer = lock(&self.writer);
        self.wait_for_all_seals();
        body()
    }

    /// Where chunk `id` is, pending or indexed.
    pub(crate) fn locate(&self, id: &ChunkId) -> Result<Option<Location>, StoreError> {
        if let Some(location) = read_lock(&self.pending).get(id) {
            return Ok(Some(*location));
        }
        self.index.get(id).map_err(self.index_error())
    }

    pub(crate) fn pack_file(&self, pack_id: u32) -> Result<Arc<File>, std::io::Error> {
        let mut files = lock(&self.files);
        if let Some(file) = files.get(&pack_id) {
            return Ok(Arc::clone(file));
        }
        let file = Arc::new(File::open(self.pack_path(pack_id))?);
        if files.len() >= 256 {
            files.clear();
        }
        files.insert(pack_id, Arc::clone(&file));
        Ok(file)
    }

    pub(crate) fn forget_pack_file(&self, pack_id: u32) {
        lock(&self.files).remove(&pack_id);
    }

    /// Read the chunk at `location`: plain bytes, checked against `id`.
    pub(crate) fn read_at(&self, id: &ChunkId, location: &Location) -> Result<Vec<u8>, StoreError> {
        self.read_entry_with(id, location, pack::read_entry)
    }

    /// Read chunk `id`'s entry at `location` with `read` (one of the pack
    /// module's readers), naming the pack in any error.
    fn read_entry_with<T>(
        &self,
        id: &ChunkId,
        location: &Location,
        read: EntryReader<T>,
    ) -> Result<T, StoreError> {
        let path = self.pack_path(location.pack);
        let file = self
            .pack_file(location.pack)
            .map_err(StoreError::io("cannot open pack", &path))?;
        match read(&file, location.offset, location.entry_len(), id) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(StoreError::Corrupt {
                id: *id,
                pack: path,
                detail: format!("entry at offset {}: {err}", location.offset),
            }),
            Err(err) => Err(StoreError::io("cannot read pack", path)(err)),
        }
    }

    /// Find chunk `id` and read its entry with `read`.
    fn read_chunk_with<T>(&self, id: &ChunkId, read: EntryReader<T>) -> Result<T, StoreError> {
        let not_found = || StoreError::ChunkNotFound {
            id: *id,
            dir: self.dir.clone(),
        };
        let location = self.locate(id)?.ok_or_else(not_found)?;
        match self.read_entry_with(id, &location, read) {
            // GC may have moved the chunk to a new pack and deleted the old
            // one between the lookup and the read: look again once.
            Err(StoreError::Io { .. }) if !self.pack_path(location.pack).exists() => {
                let moved = self.locate(id)?.ok_or_else(not_found)?;
                self.read_entry_with(id, &moved, read)
            }
            other => other,
        }
    }

    /// The plain bytes of chunk `id`, checked against the id.
    pub fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        self.read_chunk_with(id, pack::read_entry)
    }

    /// Chunk `id` as its entry stores it, checked against the entry's
    /// checksum but not decoded: what a copy to another node sends (the
    /// receiver decodes and re-hashes it).
    pub fn get_stored(&self, id: &ChunkId) -> Result<StoredChunk, StoreError> {
        let (header, stored) = self.read_chunk_with(id, pack::read_stored)?;
        Ok(StoredChunk {
            id: header.id,
            codec: header.codec,
            raw_len: header.raw_len,
            stored: stored.into(),
        })
    }

    /// Store `tree` as a chunk, in parts if it is large (see
    /// [`crate::tree_parts`]); durable on return. Its id.
    pub fn put_tree(&self, tree: &Tree) -> Result<ChunkId, StoreError> {
        let (listing, mut chunks) = tree_parts::tree_chunks(tree);
        let id = listing.id;
        chunks.push(listing);
        self.put_chunks(chunks)?;
        Ok(id)
    }

    /// The tree stored as chunk `id`, joined from its parts if it has any.
    pub fn get_tree(&self, id: &ChunkId) -> Result<Tree, StoreError> {
        self.get_tree_with_parts(id).map(|(tree, _)| tree)
    }

    /// The tree stored as chunk `id`, and the ids of the parts it was
    /// joined from (none for a tree stored whole): a walk over a snapshot's
    /// chunks counts those too.
    pub fn get_tree_with_parts(&self, id: &ChunkId) -> Result<(Tree, Vec<ChunkId>), StoreError> {
        let (tree, parts) = self.tree_chunk(id)?;
        Ok((self.join_tree(id, tree)?, parts))
    }

    /// Tree chunk `id` as stored (entries, or the ids of its parts), and
    /// the ids of its parts.
    fn tree_chunk(&self, id: &ChunkId) -> Result<(Tree, Vec<ChunkId>), StoreError> {
        let bytes = self.get_chunk(id)?;
        let tree = Tree::decode(bytes.as_slice())
            .map_err(|source| StoreError::BadTree { id: *id, source })?;
        let parts = tree_parts::part_ids(&tree)
            .map_err(|source| StoreError::BadTreeParts { id: *id, source })?;
        Ok((tree, parts))
    }

    /// The listing tree chunk `id` (decoded as `tree`) stands for.
    fn join_tree(&self, id: &ChunkId, tree: Tree) -> Result<Tree, StoreError> {
        tree_parts::join_parts(
            tree,
            |part| self.get_chunk(part),
            |source| StoreError::BadTreeParts { id: *id, source },
        )
    }

    /// Validate the DAG under `root` for a commit and summarize it: every
    /// tree is read and decoded, every entry passes
    /// [`validate::entry_problem`], listings are sorted and unique, every
    /// chunk is indexed (durable), a file's size is the sum of its chunks'
    /// plain sizes, and the whole stays within [`validate::MAX_DEPTH`] and
    /// the expansion bounds. Protects every id it checks from a running GC.
    ///
    /// Bottom-up, once per distinct tree: a tree's summary is remembered
    /// (here, and across commits in `complete_trees`), so a DAG whose
    /// subtrees share each other costs its distinct trees, not its paths.
    fn validate_dag(&self, root: ChunkId, snapshot: &str) -> Result<TreeSummary, StoreError> {
        /// A tree to read, or a tree whose subtrees are all summarized.
        enum Step {
            Enter {
                id: ChunkId,
                path: String,
                depth: u32,
            },
            Leave {
                id: ChunkId,
                path: String,
                own: TreeSummary,
                subtrees: Vec<ChunkId>,
            },
        }
        let invalid = |path: &str, reason: String| StoreError::InvalidSnapshot {
            snapshot: validate::quote(snapshot.as_bytes()),
            path: validate::quote(path.as_bytes()),
            reason,
        };
        let missing = |id: ChunkId, path: &str| StoreError::MissingChunk {
            id,
            snapshot: validate::quote(snapshot.as_bytes()),
            path: validate::quote(path.as_bytes()),
        };
        // Under the commit lock, which a GC takes to start protecting: while
        // it runs, every id must be protected, so nothing is skipped.
        let gc_running = lock(&self.protected).is_some();
        let mut complete = lock(&self.complete_trees);
        let mut summaries: HashMap<ChunkId, TreeSummary> = HashMap::new();
        let mut entered: HashSet<ChunkId> = HashSet::new();
        let mut steps = vec![Step::Enter {
            id: root,
            path: String::from("/"),
            depth: 1,
        }];
        while let Some(step) = steps.pop() {
            match step {
                Step::Enter { id, path, depth } => {
                    if summaries.contains_key(&id) {
                        continue;
                    }
                    if !gc_running && let Some(known) = complete.get(&id) {
                        summaries.insert(id, *known);
                        continue;
                    }
                    if depth > validate::MAX_DEPTH {
                        return Err(invalid(
                            &path,
                            format!("directories nested deeper than {}", validate::MAX_DEPTH),
                        ));
                    }
                    if !entered.insert(id) {
                        // Reached again before its summary exists: either a
                        // sibling path is still on the stack (fine, it will
                        // be summarized before its parent leaves) or a cycle,
                        // which content addressing rules out.
                        continue;
                    }
                    self.protect([&id]);
                    if !self.index.contains(&id).map_err(self.index_error())? {
                        return Err(missing(id, &path));
                    }
                    // The parts are chunks of the tree: present before it is read.
                    let (tree, parts) = self.tree_chunk(&id).map_err(|err| {
                        invalid(&path, format!("tree {id} cannot be read: {err}"))
                    })?;
                    for part in parts {
                        self.protect([&part]);
                        if !self.index.contains(&part).map_err(self.index_error())? {
                            return Err(missing(part, &path));
                        }
                    }
                    let tree = self.join_tree(&id, tree).map_err(|err| {
                        invalid(&path, format!("tree {id} cannot be joined: {err}"))
                    })?;
                    if let Some(index) = validate::listing_problem(&tree) {
                        return Err(invalid(
                            &join_path(&path, &tree.entries[index].name),
                            "entries out of order or repeated (a listing is sorted by name, each name once)"
                                .into(),
                        ));
                    }
                    let mut own = TreeSummary {
                        height: 1,
                        ..TreeSummary::default()
                    };
                    let mut subtrees = Vec::new();
                    for entry in &tree.entries {
                        let entry_path = join_path(&path, &entry.name);
                        if let Some(problem) = validate::entry_problem(entry) {
                            return Err(invalid(&entry_path, problem));
                        }
                        let mut size = 0u64;
                        for raw in &entry.chunk_ids {
                            let chunk = self.entry_id(raw, snapshot, &entry_path)?;
                            self.protect([&chunk]);
                            match self.index.get(&chunk).map_err(self.index_error())? {
                                Some(location) => size += u64::from(location.raw_len),
                                None => return Err(missing(chunk, &entry_path)),
                            }
                        }
                        if size != entry.size {
                            return Err(invalid(
                                &entry_path,
                                format!(
                                    "size {} is not the {size} bytes of its {} chunks",
                                    entry.size,
                                    entry.chunk_ids.len()
                                ),
                            ));
                        }
                        if entry.kind == EntryKind::Dir as i32 {
                            let subtree =
                                self.entry_id(&entry.subtree_id, snapshot, &entry_path)?;
                            subtrees.push(subtree);
                            steps.push(Step::Enter {
                                id: subtree,
                                path: entry_path,
                                depth: depth + 1,
                            });
                        } else {
                            own.add_entry(entry);
                        }
                    }
                    // Leave runs after every Enter pushed above.
                    let at = steps.len() - subtrees.len();
                    steps.insert(
                        at,
                        Step::Leave {
                            id,
                            path,
                            own,
                            subtrees,
                        },
                    );
                }
                Step::Leave {
                    id,
                    path,
                    mut own,
                    subtrees,
                } => {
                    for subtree in &subtrees {
                        let Some(child) = summaries.get(subtree) else {
                            return Err(invalid(&path, format!("tree {id} contains itself")));
                        };
                        own.add_subdirectory(child);
                    }
                    if let Some(problem) = own.bound_problem() {
                        return Err(invalid(&path, problem));
                    }
                    summaries.insert(id, own);
                }
            }
        }
        let Some(summary) = summaries.get(&root).copied() else {
            return Err(invalid("/", "the root tree was not summarized".into()));
        };
        if !gc_running {
            if complete.len() + summaries.len() > COMPLETE_TREES_HELD {
                complete.clear();
            }
            complete.extend(summaries);
        }
        Ok(summary)
    }

    pub(crate) fn entry_id(
        &self,
        raw: &[u8],
        snapshot: &str,
        path: &str,
    ) -> Result<ChunkId, StoreError> {
        ChunkId::from_slice(raw).map_err(|err| StoreError::BadSnapshot {
            snapshot: snapshot.to_owned(),
            detail: format!("{path}: {err}"),
        })
    }

    /// Commit `snapshot`: the single commit point. Checks the record
    /// ([`validate::record_problem`]), makes pending chunks durable,
    /// validates the whole DAG under `root_tree_id` (see
    /// `validate_dag`: every rule of [`validate`], every chunk in
    /// the store), computes the snapshot's files, directories, size and
    /// chunk references itself (a sender's figures are never taken; bytes
    /// read and unchanged files are capped by them), fills in id (if empty),
    /// name, end time and state, and writes the record. Durable on return.
    ///
    /// A snapshot without a name gets
    /// [`fabric_proto::naming::snapshot_name`]'s; a given name passes
    /// [`validate::snapshot_name_problem`] and is neither another
    /// snapshot's id nor the name of a snapshot of another job, host or
    /// instance. An id that exists is
    /// [`StoreError::SnapshotExists`], unless the existing snapshot is the
    /// same run (job, host, instance and start time): a retried copy,
    /// answered with the existing record, whatever root the retry read.
    pub fn commit_snapshot(&self, snapshot: Snapshot) -> Result<Snapshot, StoreError> {
        self.commit_snapshot_guarded(snapshot, &CommitGuards::default())
    }

    /// [`Store::commit_snapshot`], applying `guards` (byteback's) against
    /// the snapshots of the same job, host and instance already here: a
    /// commit sooner than `min_interval_ms` after the last is
    /// [`StoreError::TooSoon`]; one whose new bytes exceed `max_growth`
    /// times the usual (the median of the last [`USUAL_OF_LAST`]) is kept,
    /// with `unusual_growth` set and a warning saying so.
    pub fn commit_snapshot_guarded(
        &self,
        mut snapshot: Snapshot,
        guards: &CommitGuards,
    ) -> Result<Snapshot, StoreError> {
        let label = if !snapshot.name.is_empty() {
            validate::quote(snapshot.name.as_bytes())
        } else if !snapshot.id.is_empty() {
            validate::quote(snapshot.id.as_bytes())
        } else {
            format!(
                "(new) of job {:?}, host {:?}",
                validate::quote(snapshot.job.as_bytes()),
                validate::quote(snapshot.host.as_bytes())
            )
        };
        let now = now_ms();
        if let Some(reason) = validate::record_problem(&snapshot, now) {
            return Err(StoreError::InvalidSnapshot {
                snapshot: label,
                path: "record".into(),
                reason,
            });
        }
        let root = ChunkId::from_slice(&snapshot.root_tree_id).map_err(|err| {
            StoreError::InvalidSnapshot {
                snapshot: label.clone(),
                path: "record".into(),
                reason: format!("root_tree_id: {err}"),
            }
        })?;
        self.refuse_writes_if_failed()?;
        self.flush_pending()?;
        let _commit = lock(&self.commit_lock);
        let summary = self.validate_dag(root, &label)?;
        if snapshot.id.is_empty() {
            snapshot.id = hex::encode(rand::random::<[u8; 16]>());
        } else if let Some(existing) = self.catalog.get(&snapshot.id).map_err(self.index_error())? {
            // The id is the run's: a copy retried after its commit went
            // through (a crash before the answer arrived) may have read
            // changed files, so the content is not compared. The first
            // commit stands; the retry's chunks are left to GC.
            let same_run = existing.job == snapshot.job
                && existing.host == snapshot.host
                && existing.instance == snapshot.instance
                && existing.start_time_ms == snapshot.start_time_ms;
            if same_run {
                return Ok(existing);
            }
            return Err(StoreError::SnapshotExists { id: snapshot.id });
        }
        snapshot.end_time_ms = now;
        if snapshot.start_time_ms == 0 {
            snapshot.start_time_ms = now;
        }
        snapshot.state = SnapshotState::Complete as i32;
        if snapshot.name.is_empty() {
            snapshot.name = fabric_proto::naming::snapshot_name(&snapshot);
        }
        if let Some(reason) = validate::snapshot_name_problem(&snapshot.name) {
            return Err(StoreError::InvalidSnapshot {
                snapshot: label,
                path: "record".into(),
                reason,
            });
        }
        // Names are for people. Every run of a sync snapshot shares one (a
        // lookup by it finds the newest, the current one). Two full
        // snapshots of one job, host and instance in the same second would
        // too: the later gets `-2`, `-3`... A name that another job's,
        // host's or instance's snapshot has, or another's id, would pass
        // for that snapshot: refused.
        let existing = self.list_snapshots()?;
        if snapshot.r#type() != fabric_proto::v1::SnapshotType::Sync {
            snapshot.name = unique_name(&snapshot.name, |name| {
                existing.iter().any(|other| {
                    other.name == name
                        && other.job == snapshot.job
                        && other.host == snapshot.host
                        && other.instance == snapshot.instance
                })
            });
        }
        if let Some(other) = existing.iter().find(|other| {
            other.id == snapshot.name
                || (other.name == snapshot.name
                    && (other.job != snapshot.job
                        || other.host != snapshot.host
                        || other.instance != snapshot.instance))
        }) {
            return Err(StoreError::SnapshotExists {
                id: format!(
                    "{} (named {:?}, of another job, host or instance)",
                    other.id,
                    validate::quote(snapshot.name.as_bytes())
                ),
            });
        }
        let stats = snapshot.stats.get_or_insert_with(Default::default);
        stats.files = summary.files;
        stats.dirs = summary.dirs + 1;
        stats.total_bytes = summary.bytes;
        stats.chunks = summary.chunks;
        stats.bytes_read = stats.bytes_read.min(summary.bytes);
        stats.files_unchanged = stats.files_unchanged.min(summary.files);
        let new_bytes = stats.new_bytes;
        let stored_bytes = stats.stored_bytes;
        let same_source: Vec<&Snapshot> = existing
            .iter()
            .filter(|other| {
                other.job == snapshot.job
                    && other.host == snapshot.host
                    && other.instance == snapshot.instance
            })
            .collect();
        if let Some(min_interval_ms) = guards.min_interval_ms
            && let Some(last) = same_source.iter().map(|other| other.end_time_ms).max()
            && now < last.saturating_add(min_interval_ms)
        {
            return Err(StoreError::TooSoon {
                job: validate::quote(snapshot.job.as_bytes()),
                host: validate::quote(snapshot.host.as_bytes()),
                next: fabric_proto::naming::CivilTime::from_unix_ms(
                    last.saturating_add(min_interval_ms),
                )
                .iso8601(),
            });
        }
        if let Some(limit) = guards.host_quota_bytes {
            let used = stored_by_host(&existing, &snapshot.host);
            if used.saturating_add(stored_bytes) > limit {
                return Err(StoreError::OverQuota {
                    host: validate::quote(snapshot.host.as_bytes()),
                    used,
                    adding: stored_bytes,
                    limit,
                });
            }
        }
        if let Some(max_growth) = guards.max_growth
            && let Some(usual) = usual_new_bytes(&same_source)
            && new_bytes as f64 > max_growth * usual as f64
        {
            snapshot.unusual_growth = true;
            snapshot.warnings.push(format!(
                "unusual growth: {new_bytes} new bytes, more than {max_growth} times the usual {usual} of job {:?} on host {:?}",
                validate::quote(snapshot.job.as_bytes()),
                validate::quote(snapshot.host.as_bytes()),
            ));
        }
        snapshot.warnings = validate::bounded_warnings(std::mem::take(&mut snapshot.warnings));
        self.write_snapshot_file(&snapshot)?;
        self.catalog.put(&snapshot).map_err(self.index_error())?;
        self.catalog_changes.fetch_add(1, Ordering::Relaxed);
        Ok(snapshot)
    }

    /// The copy of snapshot `id`'s record kept beside the index, so that
    /// `reindex` can rebuild the catalogue if the index is lost.
    pub(crate) fn snapshot_file(&self, id: &str) -> PathBuf {
        self.dir.join("snapshots").join(format!("{id}.snapshot"))
    }

    fn write_snapshot_file(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let dir = self.dir.join("snapshots");
        std::fs::create_dir_all(&dir).map_err(StoreError::io("cannot create", &dir))?;
        if snapshot.id.is_empty()
            || !snapshot
                .id
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
        {
            return Err(StoreError::BadSnapshot {
                snapshot: snapshot.id.clone(),
                detail: "a snapshot id is letters, digits, '-' and '_' only".into(),
            });
        }
        let path = self.snapshot_file(&snapshot.id);
        let temporary = path.with_extension("new");
        std::fs::write(&temporary, snapshot.encode_to_vec())
            .map_err(StoreError::io("cannot write", &temporary))?;
        File::open(&temporary)
            .and_then(|file| file.sync_all())
            .map_err(StoreError::io("cannot fsync", &temporary))?;
        std::fs::rename(&temporary, &path).map_err(StoreError::io("cannot rename", &path))?;
        pack::sync_dir(&dir).map_err(StoreError::io("cannot fsync", &dir))
    }

    /// Every snapshot, oldest first.
    pub fn list_snapshots(&self) -> Result<Vec<Snapshot>, StoreError> {
        let mut snapshots = self.catalog.list().map_err(self.index_error())?;
        snapshots.sort_by(|a, b| listing_order(a).cmp(&listing_order(b)));
        Ok(snapshots)
    }

    /// The newest complete or verified snapshot of `source`: the parent a
    /// backup of that source starts from. Found through the catalogue's index
    /// by source, so it costs the same however many snapshots the store keeps.
    pub fn newest_snapshot(
        &self,
        source: &SnapshotSource<'_>,
    ) -> Result<Option<Snapshot>, StoreError> {
        self.catalog.newest_of(source).map_err(self.index_error())
    }

    /// The snapshot `spec` names: a full id, else an exact name, else a
    /// unique id prefix of at least [`MIN_ID_PREFIX`] characters. A full id
    /// always wins over a name or a prefix.
    pub fn find_snapshot(&self, spec: &str) -> Result<Snapshot, StoreError> {
        if let Some(snapshot) = self.catalog.get(spec).map_err(self.index_error())? {
            return Ok(snapshot);
        }
        let snapshots = self.list_snapshots()?;
        let mut matches: Vec<Snapshot> = snapshots
            .iter()
            .filter(|s| s.name == spec)
            .cloned()
            .collect();
        // A sync snapshot's name is every run's: the newest is the current.
        if matches.len() > 1
            && matches
                .iter()
                .all(|s| s.r#type() == fabric_proto::v1::SnapshotType::Sync)
        {
            matches.sort_by_key(|s| s.end_time_ms);
            matches.drain(..matches.len() - 1);
        }
        if matches.is_empty() && spec.len() >= MIN_ID_PREFIX {
            matches = snapshots
                .into_iter()
                .filter(|s| s.id.starts_with(spec))
                .collect();
        }
        match matches.len() {
            0 => Err(StoreError::SnapshotNotFound {
                spec: validate::quote(spec.as_bytes()),
            }),
            1 => Ok(matches.remove(0)),
            _ => Err(StoreError::Ambiguous {
                spec: validate::quote(spec.as_bytes()),
                candidates: matches.into_iter().take(10).map(|s| s.id).collect(),
            }),
        }
    }

    /// Remove the record of the snapshot `spec` names (its chunks stay until
    /// GC). A snapshot inside its WORM window (`retain_until_ms` not yet
    /// reached) is [`StoreError::Retained`]: no caller, operator or not, can
    /// delete it before then.
    pub fn delete_snapshot(&self, spec: &str) -> Result<Snapshot, StoreError> {
        let snapshot = self.find_snapshot(spec)?;
        if snapshot.retain_until_ms > now_ms() {
            return Err(StoreError::Retained {
                id: snapshot.id,
                until: fabric_proto::naming::CivilTime::from_unix_ms(snapshot.retain_until_ms)
                    .iso8601(),
            });
        }
        // The file first: a crash in between leaves the record, and deleting
        // again finishes the job; never a file that would resurrect it.
        let path = self.snapshot_file(&snapshot.id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(StoreError::io("cannot remove", path)(err)),
        }
        self.catalog
            .remove(&snapshot.id)
            .map_err(self.index_error())?;
        self.catalog_changes.fetch_add(1, Ordering::Relaxed);
        Ok(snapshot)
    }

    /// How many snapshots were committed or deleted since the store opened:
    /// figures derived from the snapshot list are stale once it moved.
    pub fn catalog_changes(&self) -> u64 {
        self.catalog_changes.load(Ordering::Relaxed)
    }

    /// Walk the DAG under `root`: `visit_tree(id, path)` for each tree, then
    /// `visit_entry(path, entry)` for each entry. Shared subtrees are visited
    /// once per walk when `once` is set.
    pub(crate) fn walk_dag(
        &self,
        root: ChunkId,
        snapshot: &str,
        seen_trees: &mut HashSet<ChunkId>,
        visit: &mut dyn FnMut(WalkItem<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut stack = vec![(root, String::from("/"))];
        while let Some((tree_id, path)) = stack.pop() {
            if !seen_trees.insert(tree_id) {
                continue;
            }
            let (tree, parts) = match self.get_tree_with_parts(&tree_id) {
                Ok(read) => read,
                Err(err) => {
                    visit(WalkItem::BadTree {
                        id: tree_id,
                        path: &path,
                        error: err,
                    })?;
                    continue;
                }
            };
            visit(WalkItem::Tree {
                id: tree_id,
                path: &path,
            })?;
            for id in parts {
                visit(WalkItem::Chunk { id, path: &path })?;
            }
            for entry in &tree.entries {
                let entry_path = join_path(&path, &entry.name);
                for raw in &entry.chunk_ids {
                    let id = self.entry_id(raw, snapshot, &entry_path)?;
                    visit(WalkItem::Chunk {
                        id,
                        path: &entry_path,
                    })?;
                }
                if !entry.subtree_id.is_empty() {
                    stack.push((
                        self.entry_id(&entry.subtree_id, snapshot, &entry_path)?,
                        entry_path,
                    ));
                }
            }
        }
        Ok(())
    }
}

/// One step of [`Store::walk_dag`].
#[derive(Debug)]
pub(crate) enum WalkItem<'a> {
    /// A tree that was read and decoded.
    Tree { id: ChunkId, path: &'a str },
    /// A tree that could not be read.
    BadTree {
        id: ChunkId,
        path: &'a str,
        error: StoreError,
    },
    /// A file's data chunk.
    Chunk { id: ChunkId, path: &'a str },
}

pub(crate) fn join_path(parent: &str, name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    if parent.ends_with('/') {
        format!("{parent}{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// One of the pack module's entry readers: file, offset, entry length, id.
type EntryReader<T> =
    fn(&File, u64, u64, &ChunkId) -> Result<Result<T, pack::EntryError>, std::io::Error>;

/// Check every chunk's hash, in parallel, before anything is stored.
fn check_hashes(chunks: &[Chunk]) -> Result<(), StoreError> {
    match chunks
        .par_iter()
        .find_first(|chunk| !chunk.id.matches(&chunk.data))
    {
        Some(bad) => Err(StoreError::ChunkMismatch { id: bad.id }),
        None => Ok(()),
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// When a writer looked for its chunks in the pending set and the index
/// ([`Store::fresh_positions`]).
#[derive(Clone, Copy, Debug)]
struct FreshCheck {
    index_moves: u64,
}

/// What [`Store::append`] did: the caller syncs `sealed`, then (for a
/// durable put) `open_file`, before it indexes `placed`.
struct Appended<'store> {
    /// Where each appended chunk went.
    placed: Vec<(ChunkId, Location)>,
    /// The pack still open for appends, if any.
    open_file: Option<(Arc<File>, PathBuf)>,
    /// Packs this append filled and sealed.
    sealed: Vec<UnsyncedSeal<'store>>,
}

/// A full pack whose seal is written (or being written) and whose fsync is
/// still to run. Listed in the store's `syncing_seals` from [`Self::begin`]
/// until [`Self::sync`] ends; dropped without a successful sync, its pending
/// chunks are forgotten rather than ever indexed.
struct UnsyncedSeal<'store> {
    store: &'store Store,
    pack: u32,
    file: Arc<File>,
    path: PathBuf,
    finished: bool,
}

impl<'store> UnsyncedSeal<'store> {
    /// Called under the writer lock, before the seal is written.
    fn begin(store: &'store Store, full: &PackWriter) -> Self {
        lock(&store.syncing_seals).insert(full.id());
        Self {
            store,
            pack: full.id(),
            file: full.file(),
            path: full.path().to_owned(),
            finished: false,
        }
    }

    /// Make the sealed pack durable (outside the writer lock).
    fn sync(mut self) -> Result<(), StoreError> {
        let synced = self.store.sync_pack(&self.file, &self.path, true);
        self.finish(synced.is_ok());
        synced
    }

    fn finish(&mut self, synced: bool) {
        self.finished = true;
        if !synced {
            self.store.forget_pending_in(self.pack);
        }
        lock(&self.store.syncing_seals).remove(&self.pack);
        self.store.seal_synced.notify_all();
    }
}

impl Drop for UnsyncedSeal<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(false);
        }
    }
}

impl ChunkSink for Store {
    /// Appends the chunk to the open pack (compressing on the calling
    /// thread); it is found by reads at once and durable after `flush`.
    fn put_chunk(&self, chunk: Chunk) -> Result<(), SinkError> {
        check_hashes(std::slice::from_ref(&chunk))?;
        self.refuse_writes_if_failed()?;
        let (fresh, checked) = self.fresh_positions(std::slice::from_ref(&chunk.id))?;
        if fresh.is_empty() {
            return Ok(());
        }
        let entry = pack::encode_entry(chunk.id, &chunk.data, self.config.zstd_level);
        for seal in self.append(vec![entry], checked)?.sealed {
            seal.sync()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), SinkError> {
        Ok(self.flush_pending()?)
    }
}

impl ChunkSource for Store {
    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, SinkError> {
        Ok(Store::get_chunk(self, id)?)
    }

    fn get_tree(&self, id: &ChunkId) -> Result<Tree, SinkError> {
        Ok(Store::get_tree(self, id)?)
    }
}

impl Drop for Store {
    /// Best effort: make pending chunks durable and seal the open pack, so the
    /// next open needs no repair. A crash skips this, and that is fine.
    fn drop(&mut self) {
        if let Err(err) = self.flush_pending() {
            tracing::warn!(dir = %self.dir.display(), "cannot flush pending chunks on close: {err}");
        }
        if let Err(err) = self.seal_open_pack() {
            tracing::warn!(dir = %self.dir.display(), "cannot seal the open pack on close: {err}");
        }
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
pub(crate) mod tests;

#[cfg(test)]
#[path = "crash_tests.rs"]
mod crash_tests;

#[cfg(test)]
#[path = "commit_props.rs"]
mod commit_props;

/// `name`, or the first of `name-2`, `name-3`... that `taken` does not
/// refuse.
fn unique_name(name: &str, taken: impl Fn(&str) -> bool) -> String {
    if !taken(name) {
        return name.to_owned();
    }
    (2u64..)
        .map(|n| format!("{name}-{n}"))
        .find(|candidate| !taken(candidate))
        .unwrap_or_else(|| name.to_owned())
}
