//! Garbage collection: mark from every live snapshot, sweep unreferenced
//! chunks from the index, rewrite packs whose live fraction fell under the
//! threshold, delete packs nothing points into.
//!
//! Safety against a concurrent commit (both mechanisms, each closing one gap):
//!
//! 1. GC starts, under the commit lock, by turning on a *protected set* and
//!    listing the snapshots. A commit holds the same lock from its DAG check
//!    to its record write, so a snapshot is either in GC's list (its chunks
//!    are marked) or committed after protection began.
//! 2. While protection is on, every chunk id offered (`contains`, `missing`),
//!    put, or checked by a commit's DAG check is added to the set, and the
//!    sweep never removes a protected id. The sweep reads the set and removes
//!    index entries while holding its mutex, so an id is either protected
//!    before the sweep (spared), or looked up after it (absent: the uploader
//!    sends it again, a commit refuses with `MissingChunk`).
//!
//! So GC spares every chunk touched after it started, and a commit re-checks
//! the DAG: no snapshot ever references a swept chunk. An upload that put
//! chunks before GC started and commits after it may still find some swept
//! and be refused with `MissingChunk` (it sends them again); to make that
//! rare, packs younger than [`GcOptions::grace`] (default an hour) are not
//! touched at all.
//!
//! Crash safety: packs are only candidates once sealed and fully indexed;
//! moved entries are written to new packs and fsynced, then the index is
//! updated and flushed, and only then are old packs deleted. A crash at any
//! point leaves unreferenced bytes (the next GC reclaims them), never an
//! index entry pointing at a deleted pack.
//!
//! This module must never delete a pack that an index entry points into.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use crate::error::StoreError;
use crate::id::ChunkId;
use crate::index::Location;
use crate::pack::{self, PACK_HEADER_LEN, PackWriter, SEAL_LEN};
use crate::store::{Store, WalkItem, lock};

/// How [`Store::gc`] runs.
#[derive(Clone, Debug, PartialEq)]
pub struct GcOptions {
    /// Report what would be done, change nothing.
    pub dry_run: bool,
    /// Override the store's `repack_threshold` for this run.
    pub repack_threshold: Option<f64>,
    /// Packs written less than this long ago are left alone, chunks and all:
    /// they hold the chunks of uploads still running (not committed yet).
    pub grace: Duration,
    /// Stop rewriting packs at this instant (a GC lease's end): what was
    /// swept stays swept, packs not yet rewritten wait for the next GC.
    pub deadline: Option<Instant>,
}

/// The default grace: an upload that has not committed for this long is abandoned.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(3600);

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            repack_threshold: None,
            grace: DEFAULT_GC_GRACE,
            deadline: None,
        }
    }
}

impl GcOptions {
    /// No grace period: everything unreferenced now is swept (tests, tools,
    /// a store no upload is writing to).
    pub fn immediate() -> Self {
        Self {
            grace: Duration::ZERO,
            ..Self::default()
        }
    }
}

/// What [`Store::gc`] did (or would do, in a dry run).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Live snapshots marked from.
    pub snapshots: u64,
    /// Chunks reachable from them.
    pub live_chunks: u64,
    /// Unreferenced chunks spared because they were offered or put since GC started.
    pub protected_chunks: u64,
    /// Index entries removed.
    pub swept_chunks: u64,
    /// Stored bytes of the removed entries.
    pub swept_bytes: u64,
    /// Packs rewritten (live entries moved to new packs).
    pub packs_rewritten: u64,
    /// Packs deleted (rewritten ones included).
    pub packs_deleted: u64,
    /// Live entries moved.
    pub moved_chunks: u64,
    /// Bytes of pack files deleted minus bytes of new packs written.
    pub bytes_freed: u64,
    /// Packs left as they are although under the threshold, because a live
    /// entry in them could not be read (verify names it).
    pub packs_kept_damaged: u64,
    /// Packs left to a later GC because the deadline came first.
    pub packs_left_at_deadline: u64,
}

struct PackUsage {
    live_bytes: u64,
    live: Vec<(ChunkId, Location)>,
}

impl Store {
    /// Collect garbage (see the module docs for how it stays safe).
    pub fn gc(&self, options: &GcOptions) -> Result<GcReport, StoreError> {
        let started = Instant::now();
        self.refuse_writes_if_failed()?;
        let _maintenance = lock(&self.maintenance_lock);
        let threshold = options
            .repack_threshold
            .unwrap_or(self.config.repack_threshold);
        let snapshots = {
            let _commit = lock(&self.commit_lock);
            *lock(&self.protected) = Some(HashSet::new());
            // What commits found complete may be swept now.
            lock(&self.complete_trees).clear();
            self.list_snapshots()
        };
        // Every pending chunk indexed and the open pack sealed, atomically:
        // the candidates are exactly the packs that exist now, all sealed and
        // fully indexed; later appends go to newer packs.
        let result = snapshots.and_then(|snapshots| {
            let sealed = self.flush_and_seal()?;
            let cutoff = SystemTime::now().checked_sub(options.grace);
            let mut candidates = HashSet::new();
            for id in sealed {
                let path = self.pack_path(id);
                let modified = std::fs::metadata(&path)
                    .and_then(|meta| meta.modified())
                    .map_err(StoreError::io("cannot read", &path))?;
                if options.grace.is_zero() || cutoff.is_some_and(|cutoff| modified <= cutoff) {
                    candidates.insert(id);
                }
            }
            self.collect(options, threshold, &candidates, snapshots)
        });
        *lock(&self.protected) = None;
        let report = result?;
        tracing::info!(
            dir = %self.dir.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            swept = report.swept_chunks,
            packs_deleted = report.packs_deleted,
            "gc done"
        );
        Ok(report)
    }

    fn collect(
        &self,
        options: &GcOptions,
        threshold: f64,
        candidates: &HashSet<u32>,
        snapshots: Vec<fabric_proto::v1::Snapshot>,
    ) -> Result<GcReport, StoreError> {
        let mut report = GcReport {
            snapshots: snapshots.len() as u64,
            ..Default::default()
        };
        // Mark. A tree that cannot be read aborts GC: its chunks are unknown.
        let mut live: HashSet<ChunkId> = HashSet::new();
        let mut seen_trees = HashSet::new();
        for snapshot in &snapshots {
            let root = self.root_of(snapshot)?;
            let label = format!("{} ({})", snapshot.name, snapshot.id);
            self.walk_dag(root, &snapshot.id, &mut seen_trees, &mut |item| {
                match item {
                    WalkItem::Tree { id, .. } | WalkItem::Chunk { id, .. } => {
                        live.insert(id);
                    }
                    WalkItem::BadTree { id, path, error } => {
                        return Err(StoreError::BadSnapshot {
                            snapshot: label.clone(),
                            detail: format!("tree {id} at {path} unreadable, GC stopped before sweeping: {error}"),
                        });
                    }
                }
                Ok(())
            })?;
        }
        report.live_chunks = live.len() as u64;

        // Usage of each candidate pack, and the dead entries.
        let mut usage: HashMap<u32, PackUsage> = candidates
            .iter()
            .map(|&id| {
                (
                    id,
                    PackUsage {
                        live_bytes: 0,
                        live: Vec::new(),
                    },
                )
            })
            .collect();
        let mut dead: Vec<(ChunkId, Location)> = Vec::new();
        self.index
            .for_each(&mut |id, location| {
                if let Some(pack_usage) = usage.get_mut(&location.pack) {
                    if live.contains(&id) {
                        pack_usage.live_bytes += location.entry_len();
                        pack_usage.live.push((id, location));
                    } else {
                        dead.push((id, location));
                    }
                }
                Ok(())
            })
            .map_err(self.index_error())?;
        drop(live);

        // Sweep, holding the protected set so nothing is offered in between.
        {
            let mut protected = lock(&self.protected);
            let spared: Vec<(ChunkId, Location)> = match protected.as_ref() {
                Some(set) => dead
                    .iter()
                    .filter(|(id, _)| set.contains(id))
                    .copied()
                    .collect(),
                None => Vec::new(),
            };
            let set = protected.get_or_insert_with(HashSet::new);
            dead.retain(|(id, _)| !set.contains(id));
            report.protected_chunks = spared.len() as u64;
            for (id, location) in spared {
                if let Some(pack_usage) = usage.get_mut(&location.pack) {
                    pack_usage.live_bytes += location.entry_len();
                    pack_usage.live.push((id, location));
                }
            }
            report.swept_chunks = dead.len() as u64;
            report.swept_bytes = dead.iter().map(|(_, location)| location.entry_len()).sum();
            if !options.dry_run {
                let ids: Vec<ChunkId> = dead.iter().map(|(id, _)| *id).collect();
                self.index.remove_batch(&ids).map_err(self.index_error())?;
                self.index.flush().map_err(self.index_error())?;
            }
        }

        // Decide per pack: keep, rewrite, delete.
        let mut to_rewrite: Vec<u32> = Vec::new();
        let mut to_delete: Vec<u32> = Vec::new();
        let mut sizes = HashMap::new();
        for (&id, pack_usage) in &usage {
            let path = self.pack_path(id);
            let len = std::fs::metadata(&path)
                .map_err(StoreError::io("cannot read", &path))?
                .len();
            sizes.insert(id, len);
            let data = len.saturating_sub(PACK_HEADER_LEN + SEAL_LEN);
            if pack_usage.live.is_empty() {
                to_delete.push(id);
            } else if data > 0 && (pack_usage.live_bytes as f64 / data as f64) < threshold {
                to_rewrite.push(id);
            }
        }
        to_rewrite.sort_unstable();
        to_delete.sort_unstable();
        if options.dry_run {
            report.packs_rewritten = to_rewrite.len() as u64;
            report.packs_deleted = (to_rewrite.len() + to_delete.len()) as u64;
            report.moved_chunks = to_rewrite
                .iter()
                .map(|id| usage[id].live.len() as u64)
                .sum();
            return Ok(report);
        }

        // Rewrite: new packs first, fsynced and sealed, then the index, then deletes.
        let mut writer: Option<PackWriter> = None;
        let mut moved: Vec<(ChunkId, Location)> = Vec::new();
        let mut written = 0u64;
        for (done, &id) in to_rewrite.iter().enumerate() {
            if options
                .deadline
                .is_some_and(|deadline| Instant::now() >= deadline)
            {
                report.packs_left_at_deadline = (to_rewrite.len() - done) as u64;
                break;
            }
            let Some(entries) = self.live_entries_of(id, &usage[&id].live)? else {
                report.packs_kept_damaged += 1;
                continue;
            };
            for entry in entries {
                if writer.is_none() {
                    let new_id = self.allocate_pack_id();
                    writer =
                        Some(PackWriter::create(&self.packs_dir, new_id).map_err(
                            StoreError::io("cannot create pack", self.pack_path(new_id)),
                        )?);
                }
                if let Some(open) = writer.as_mut() {
                    let offset = open.append(&entry).map_err(StoreError::io(
                        "cannot append to pack",
                        open.path().to_owned(),
                    ))?;
                    moved.push((
                        entry.header.id,
                        Location {
                            pack: open.id(),
                            offset,
                            stored_len: entry.header.stored_len,
                            raw_len: entry.header.raw_len,
                            codec: entry.header.codec,
                        },
                    ));
                    if open.len() >= self.config.pack_target_size
                        && let Some(full) = writer.take()
                    {
                        written += full.len() + SEAL_LEN;
                        self.seal_and_sync(full)?;
                    }
                }
            }
            to_delete.push(id);
            report.packs_rewritten += 1;
        }
        if let Some(last) = writer.take() {
            written += last.len() + SEAL_LEN;
            self.seal_and_sync(last)?;
        }
        report.moved_chunks = moved.len() as u64;
        self.index
            .insert_batch(&moved)
            .map_err(self.index_error())?;
        self.index.flush().map_err(self.index_error())?;

        let mut deleted_bytes = 0u64;
        for id in &to_delete {
            let path = self.pack_path(*id);
            self.forget_pack_file(*id);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(StoreError::io("cannot remove", path)(err)),
            }
            deleted_bytes += sizes.get(id).copied().unwrap_or(0);
            report.packs_deleted += 1;
        }
        if !to_delete.is_empty() {
            pack::sync_dir(&self.packs_dir)
                .map_err(StoreError::io("cannot fsync", &self.packs_dir))?;
        }
        report.bytes_freed = deleted_bytes.saturating_sub(written);
        Ok(report)
    }

    /// The `live` entries of pack `pack`, read and encoded again for
    /// another pack (as stored: nothing is recompressed), or `None` when
    /// one of them does not read back intact (the pack is then kept as it
    /// is). GC's repack and repair's rewrite both take a pack apart this
    /// way.
    pub(crate) fn live_entries_of(
        &self,
        pack: u32,
        live: &[(ChunkId, Location)],
    ) -> Result<Option<Vec<pack::EncodedEntry<'static>>>, StoreError> {
        let path = self.pack_path(pack);
        let file = self
            .pack_file(pack)
            .map_err(StoreError::io("cannot open pack", &path))?;
        let mut entries = Vec::with_capacity(live.len());
        for (chunk, location) in live {
            match pack::read_stored(&file, location.offset, location.entry_len(), chunk)
                .map_err(StoreError::io("cannot read pack", &path))?
            {
                Ok((header, stored)) => entries.push(pack::encode_stored(
                    *chunk,
                    header.codec,
                    header.raw_len,
                    stored,
                )),
                Err(err) => {
                    tracing::warn!(pack = %path.display(), chunk = %chunk, "live entry unreadable, pack kept: {err}");
                    return Ok(None);
                }
            }
        }
        Ok(Some(entries))
    }
}
