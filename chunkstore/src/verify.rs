//! Checking and rebuilding a store: the repair of unsealed packs at open,
//! `verify` (full or sampled), `reindex` (rebuild the index from the packs
//! alone) and `stats`.
//!
//! Verify only reads and reports; it must never change a pack or the index.
//! Reindex and the open-time repair are the only code that rewrites the index
//! wholesale or truncates a pack, and they only cut bytes that no index entry
//! points at (a torn tail).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;

use rayon::prelude::*;

use crate::error::StoreError;
use crate::id::ChunkId;
use crate::index::Location;
use crate::pack::{self, PACK_HEADER_LEN, SEAL_LEN, ScanEnd, ScanError};
use crate::store::{Store, WalkItem, lock};

/// What [`Store::verify`] checks.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VerifyOptions {
    /// Read only this fraction (0..=1) of the chunks, chosen at random; all when `None`.
    pub sample: Option<f64>,
    /// Check only the chunks of this snapshot (a spec as for `find_snapshot`).
    pub snapshot: Option<String>,
}

/// What is wrong with a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProblemKind {
    /// Referenced by a snapshot but not in the index.
    Missing,
    /// In the index, but its bytes cannot be read back intact.
    Corrupt,
}

/// One damaged or missing chunk and what it affects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyProblem {
    /// The chunk.
    pub chunk: ChunkId,
    /// Missing or corrupt.
    pub kind: ProblemKind,
    /// What was found (pack, offset, error).
    pub detail: String,
    /// The snapshots whose DAG reaches the chunk, as `name (id)`.
    pub snapshots: Vec<String>,
    /// Paths of the files or directories that use it (at most
    /// [`MAX_PATHS_PER_PROBLEM`]), prefixed by the snapshot id.
    pub paths: Vec<String>,
}

/// Paths listed per problem, at most.
pub const MAX_PATHS_PER_PROBLEM: usize = 20;

/// The outcome of [`Store::verify`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Chunks read, decompressed and re-hashed.
    pub chunks_checked: u64,
    /// Plain bytes of those chunks.
    pub bytes_checked: u64,
    /// Snapshots whose DAG was walked.
    pub snapshots_checked: u64,
    /// Everything found wrong, by chunk id.
    pub problems: Vec<VerifyProblem>,
}

impl VerifyReport {
    /// Whether nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The outcome of [`Store::reindex`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReindexReport {
    /// Pack files scanned.
    pub packs: u64,
    /// Entries indexed.
    pub chunks: u64,
    /// Entries of a chunk already seen in an earlier pack (left as garbage).
    pub duplicates: u64,
    /// Snapshot records restored to the catalogue from `snapshots/`.
    pub snapshots_restored: u64,
    /// Packs whose scan stopped early: path, offset of the first bad byte, reason.
    pub damaged: Vec<(PathBuf, u64, String)>,
    /// Files in the packs directory that are not packs.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// The counters of [`Store::stats`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoreStats {
    /// Chunks indexed.
    pub chunks: u64,
    /// Plain bytes of the indexed chunks (each once).
    pub logical_bytes: u64,
    /// Bytes the indexed chunks take in packs (compressed, entry headers included).
    pub stored_bytes: u64,
    /// Bytes of file content all snapshots reference (counting every reference).
    pub referenced_bytes: u64,
    /// referenced_bytes / logical_bytes (1 when empty).
    pub dedup_ratio: f64,
    /// logical_bytes / stored_bytes (1 when empty).
    pub compression_ratio: f64,
    /// Pack files.
    pub packs: u64,
    /// Bytes of all pack files.
    pub pack_bytes: u64,
    /// Bytes in packs that no index entry points at (GC reclaims them).
    pub garbage_bytes: u64,
    /// Snapshot records.
    pub snapshots: u64,
    /// Free bytes available on the store's file system.
    pub fs_free_bytes: u64,
    /// Size of the store's file system.
    pub fs_capacity_bytes: u64,
}

/// What the index alone says about the chunks stored (part of [`StoreStats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexCounts {
    /// Chunks indexed.
    pub chunks: u64,
    /// Plain bytes of the indexed chunks (each once).
    pub logical_bytes: u64,
    /// Bytes the indexed chunks take in packs (compressed, entry headers included).
    pub stored_bytes: u64,
}

/// At open: find packs without a seal (the one being filled when the process
/// stopped), cut a torn tail no index entry points into, seal them, and index
/// their valid entries the index lacks. A pack with an index entry past its
/// first bad byte is damaged, not torn: it is left alone for `verify`.
pub(crate) fn repair_unsealed(store: &Store, packs: &[u32]) -> Result<u64, StoreError> {
    let mut unsealed = HashSet::new();
    for &id in packs {
        let path = store.pack_path(id);
        if !pack::looks_sealed(&path).map_err(StoreError::io("cannot read", &path))? {
            unsealed.insert(id);
        }
    }
    if unsealed.is_empty() {
        return Ok(0);
    }
    let mut repaired = 0;
    let mut indexed_end: HashMap<u32, u64> = HashMap::new();
    store
        .index
        .for_each(&mut |_, location| {
            if unsealed.contains(&location.pack) {
                let end = indexed_end.entry(location.pack).or_default();
                *end = (*end).max(location.end());
            }
            Ok(())
        })
        .map_err(store.index_error())?;
    let mut ids: Vec<u32> = unsealed.into_iter().collect();
    ids.sort_unstable();
    for id in ids {
        let path = store.pack_path(id);
        let mut found = Vec::new();
        let scan = pack::scan_pack(&path, |offset, header, _| {
            found.push((
                header.id,
                Location {
                    pack: id,
                    offset,
                    stored_len: header.stored_len,
                    raw_len: header.raw_len,
                    codec: header.codec,
                },
            ));
        });
        let scan = match scan {
            Ok(scan) => scan,
            Err(ScanError::NotAPack { .. }) => {
                let len = std::fs::metadata(&path)
                    .map_err(StoreError::io("cannot read", &path))?
                    .len();
                if len < PACK_HEADER_LEN && !indexed_end.contains_key(&id) {
                    // Created, never written: the crash came before its header.
                    std::fs::remove_file(&path).map_err(StoreError::io("cannot remove", &path))?;
                    pack::sync_dir(&store.packs_dir)
                        .map_err(StoreError::io("cannot fsync", &store.packs_dir))?;
                } else {
                    tracing::warn!(pack = %path.display(), "not a pack: left for verify");
                }
                continue;
            }
            Err(ScanError::Io { path, source }) => {
                return Err(StoreError::Io {
                    action: "cannot read",
                    path,
                    source,
                });
            }
        };
        if let ScanEnd::Torn { offset, reason } = &scan.end {
            if indexed_end.get(&id).is_some_and(|end| end > offset) {
                tracing::warn!(pack = %path.display(), offset, %reason, "damaged pack (index points past the damage): left for verify");
                continue;
            }
            tracing::warn!(pack = %path.display(), offset, %reason, "cutting a torn pack tail");
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(StoreError::io("cannot open", &path))?;
            file.set_len(*offset)
                .map_err(StoreError::io("cannot truncate", &path))?;
            file.sync_all()
                .map_err(StoreError::io("cannot fsync", &path))?;
        }
        repaired += 1;
        if !matches!(scan.end, ScanEnd::Sealed { .. }) {
            pack::seal_existing(&path, scan.entries)
                .map_err(StoreError::io("cannot seal", &path))?;
        }
        let mut lacking = Vec::new();
        for (chunk, location) in found {
            if !store.index.contains(&chunk).map_err(store.index_error())? {
                lacking.push((chunk, location));
            }
        }
        store
            .index
            .insert_batch(&lacking)
            .map_err(store.index_error())?;
    }
    store.index.flush().map_err(store.index_error())?;
    Ok(repaired)
}

#[derive(Default)]
struct Problems {
    by_chunk: BTreeMap<ChunkId, (ProblemKind, String, BTreeSet<String>, Vec<String>)>,
}

impl Problems {
    fn add(&mut self, chunk: ChunkId, kind: ProblemKind, detail: String) {
        self.by_chunk
            .entry(chunk)
            .or_insert_with(|| (kind, detail, BTreeSet::new(), Vec::new()));
    }

    fn attribute(&mut self, chunk: &ChunkId, snapshot: &str, id: &str, path: &str) {
        if let Some((_, _, snapshots, paths)) = self.by_chunk.get_mut(chunk) {
            snapshots.insert(snapshot.to_owned());
            if paths.len() < MAX_PATHS_PER_PROBLEM {
                paths.push(format!("{id}:{path}"));
            }
        }
    }

    fn into_vec(self) -> Vec<VerifyProblem> {
        self.by_chunk
            .into_iter()
            .map(|(chunk, (kind, detail, snapshots, paths))| VerifyProblem {
                chunk,
                kind,
                detail,
                snapshots: snapshots.into_iter().collect(),
                paths,
            })
            .collect()
    }
}

impl Store {
    /// Read back chunks (all, a random sample, or one snapshot's), decompress
    /// and re-hash them, and check every snapshot's DAG is complete. Each
    /// problem names the chunk, the snapshots and the paths it affects.
    pub fn verify(&self, options: &VerifyOptions) -> Result<VerifyReport, StoreError> {
        if let Some(fraction) = options.sample
            && !(0.0..=1.0).contains(&fraction)
        {
            return Err(StoreError::Config {
                path: self.dir.clone(),
                detail: format!("verify sample {fraction} is not a fraction between 0 and 1"),
            });
        }
        let _maintenance = lock(&self.maintenance_lock);
        self.flush_pending()?;
        let snapshots = match &options.snapshot {
            Some(spec) => vec![self.find_snapshot(spec)?],
            None => self.list_snapshots()?,
        };
        let mut problems = Problems::default();
        // Which chunks to read.
        let mut targets: Vec<(ChunkId, Option<Location>)> = Vec::new();
        if options.snapshot.is_some() {
            let mut ids = HashSet::new();
            for snapshot in &snapshots {
                let root = self.root_of(snapshot)?;
                self.walk_dag(root, &snapshot.id, &mut HashSet::new(), &mut |item| {
                    match item {
                        WalkItem::Tree { id, .. } | WalkItem::Chunk { id, .. } => {
                            ids.insert(id);
                        }
                        WalkItem::BadTree { .. } => {}
                    }
                    Ok(())
                })?;
            }
            for id in ids {
                targets.push((id, self.locate(&id)?));
            }
        } else {
            self.index
                .for_each(&mut |id, location| {
                    targets.push((id, Some(location)));
                    Ok(())
                })
                .map_err(self.index_error())?;
        }
        if let Some(fraction) = options.sample {
            targets.retain(|_| rand::random::<f64>() < fraction);
        }
        type Outcome = Result<u64, (ProblemKind, String)>;
        let results: Vec<(ChunkId, Outcome)> = targets
            .par_iter()
            .map(|(id, location)| {
                let outcome = match location {
                    None => Err((ProblemKind::Missing, "not in the index".to_owned())),
                    Some(location) => self
                        .read_at(id, location)
                        .map(|plain| plain.len() as u64)
                        .map_err(|err| (ProblemKind::Corrupt, err.to_string())),
                };
                (*id, outcome)
            })
            .collect();
        let mut report = VerifyReport::default();
        for (id, outcome) in results {
            match outcome {
                Ok(bytes) => {
                    report.chunks_checked += 1;
                    report.bytes_checked += bytes;
                }
                Err((kind, detail)) => problems.add(id, kind, detail),
            }
        }
        // Every snapshot's DAG: complete, and who uses the bad chunks.
        for snapshot in &snapshots {
            report.snapshots_checked += 1;
            let root = self.root_of(snapshot)?;
            let label = format!("{} ({})", snapshot.name, snapshot.id);
            self.walk_dag(root, &snapshot.id, &mut HashSet::new(), &mut |item| {
                match item {
                    WalkItem::Tree { id, path } => {
                        problems.attribute(&id, &label, &snapshot.id, path)
                    }
                    WalkItem::BadTree { id, path, error } => {
                        let kind = match error {
                            StoreError::ChunkNotFound { .. } => ProblemKind::Missing,
                            _ => ProblemKind::Corrupt,
                        };
                        problems.add(id, kind, format!("tree: {error}"));
                        problems.attribute(&id, &label, &snapshot.id, path);
                    }
                    WalkItem::Chunk { id, path } => {
                        if !problems.by_chunk.contains_key(&id) && self.locate(&id)?.is_none() {
                            problems.add(id, ProblemKind::Missing, "not in the index".into());
                        }
                        problems.attribute(&id, &label, &snapshot.id, path);
                    }
                }
                Ok(())
            })?;
        }
        report.problems = problems.into_vec();
        Ok(report)
    }

    pub(crate) fn root_of(
        &self,
        snapshot: &fabric_proto::v1::Snapshot,
    ) -> Result<ChunkId, StoreError> {
        ChunkId::from_slice(&snapshot.root_tree_id).map_err(|err| StoreError::BadSnapshot {
            snapshot: format!("{} ({})", snapshot.name, snapshot.id),
            detail: format!("root_tree_id: {err}"),
        })
    }

    /// Rebuild the index from the packs alone: clear it, scan every pack in
    /// order and index each valid entry (the first copy of a chunk wins).
    pub fn reindex(&self) -> Result<ReindexReport, StoreError> {
        self.refuse_writes_if_failed()?;
        let _maintenance = lock(&self.maintenance_lock);
        self.flush_pending()?;
        self.with_writer_locked(|| {
            let mut report = ReindexReport::default();
            self.index.clear().map_err(self.index_error())?;
            lock(&self.complete_trees).clear();
            let mut seen = HashSet::new();
            for id in self.pack_ids()? {
                let path = self.pack_path(id);
                let mut batch = Vec::new();
                let mut duplicates = 0;
                let scan = pack::scan_pack(&path, |offset, header, _| {
                    if seen.insert(header.id) {
                        batch.push((
                            header.id,
                            Location {
                                pack: id,
                                offset,
                                stored_len: header.stored_len,
                                raw_len: header.raw_len,
                                codec: header.codec,
                            },
                        ));
                    } else {
                        duplicates += 1;
                    }
                });
                match scan {
                    Ok(scan) => {
                        report.packs += 1;
                        if let ScanEnd::Torn { offset, reason } = scan.end {
                            report.damaged.push((path.clone(), offset, reason));
                        }
                    }
                    Err(err) => {
                        report.unreadable.push((path.clone(), err.to_string()));
                        continue;
                    }
                }
                report.chunks += batch.len() as u64;
                report.duplicates += duplicates;
                self.index
                    .insert_batch(&batch)
                    .map_err(self.index_error())?;
            }
            // Before any record: a restored snapshot must find its chunks
            // indexed durably (the catalogue's flush does not cover them).
            self.index.flush().map_err(self.index_error())?;
            report.snapshots_restored = self.restore_catalog()?;
            Ok(report)
        })
    }

    /// Put back into the catalogue every snapshot whose file in `snapshots/`
    /// has no record; the number restored.
    fn restore_catalog(&self) -> Result<u64, StoreError> {
        let dir = self.dir.join("snapshots");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(err) => return Err(StoreError::io("cannot list", &dir)(err)),
        };
        let mut restored = 0;
        for entry in entries {
            let path = entry.map_err(StoreError::io("cannot list", &dir))?.path();
            if path.extension().is_none_or(|ext| ext != "snapshot") {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(StoreError::io("cannot read", &path))?;
            let snapshot = <fabric_proto::v1::Snapshot as prost::Message>::decode(bytes.as_slice())
                .map_err(|err| StoreError::BadSnapshot {
                    snapshot: path.display().to_string(),
                    detail: err.to_string(),
                })?;
            if self
                .catalog
                .get(&snapshot.id)
                .map_err(self.index_error())?
                .is_none()
            {
                self.catalog.put(&snapshot).map_err(self.index_error())?;
                restored += 1;
            }
        }
        Ok(restored)
    }

    /// The chunk counters of [`Store::stats`] from one scan of the index,
    /// without its walk over every snapshot's trees: cheap enough for a
    /// node's periodic report to its coordinator.
    pub fn index_counts(&self) -> Result<IndexCounts, StoreError> {
        self.count_index(|_| {})
    }

    /// Scan the index, counting, and show each location to `each`.
    fn count_index(&self, mut each: impl FnMut(&Location)) -> Result<IndexCounts, StoreError> {
        let mut counts = IndexCounts::default();
        self.index
            .for_each(&mut |_, location| {
                counts.chunks += 1;
                counts.logical_bytes += u64::from(location.raw_len);
                counts.stored_bytes += location.entry_len();
                each(&location);
                Ok(())
            })
            .map_err(self.index_error())?;
        Ok(counts)
    }

    /// Counters of the store (reads the whole index and every tree).
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut indexed_per_pack: HashMap<u32, u64> = HashMap::new();
        let counts = self.count_index(|location| {
            *indexed_per_pack.entry(location.pack).or_default() += location.entry_len();
        })?;
        let mut stats = StoreStats {
            chunks: counts.chunks,
            logical_bytes: counts.logical_bytes,
            stored_bytes: counts.stored_bytes,
            ..Default::default()
        };
        for id in self.pack_ids()? {
            let path = self.pack_path(id);
            let len = std::fs::metadata(&path)
                .map_err(StoreError::io("cannot read", &path))?
                .len();
            stats.packs += 1;
            stats.pack_bytes += len;
            let overhead = PACK_HEADER_LEN + SEAL_LEN;
            let indexed = indexed_per_pack.get(&id).copied().unwrap_or(0);
            stats.garbage_bytes += len.saturating_sub(overhead).saturating_sub(indexed);
        }
        let snapshots = self.list_snapshots()?;
        stats.snapshots = snapshots.len() as u64;
        let mut totals = HashMap::new();
        for snapshot in &snapshots {
            let root = self.root_of(snapshot)?;
            stats.referenced_bytes += self.tree_total(root, &mut totals)?;
        }
        let ratio = |numerator: u64, denominator: u64| {
            if denominator == 0 {
                1.0
            } else {
                numerator as f64 / denominator as f64
            }
        };
        stats.dedup_ratio = ratio(stats.referenced_bytes, stats.logical_bytes);
        stats.compression_ratio = ratio(stats.logical_bytes, stats.stored_bytes);
        let fs = rustix::fs::statvfs(&self.dir).map_err(|errno| StoreError::Io {
            action: "cannot statvfs",
            path: self.dir.clone(),
            source: errno.into(),
        })?;
        stats.fs_free_bytes = fs.f_bavail.saturating_mul(fs.f_frsize);
        stats.fs_capacity_bytes = fs.f_blocks.saturating_mul(fs.f_frsize);
        Ok(stats)
    }

    /// Sum of the file sizes under tree `id`, memoised per tree.
    fn tree_total(
        &self,
        id: ChunkId,
        totals: &mut HashMap<ChunkId, u64>,
    ) -> Result<u64, StoreError> {
        if let Some(total) = totals.get(&id) {
            return Ok(*total);
        }
        let tree = self.get_tree(&id)?;
        let mut total = 0u64;
        for entry in &tree.entries {
            if entry.kind == fabric_proto::v1::EntryKind::File as i32 {
                total += entry.size;
            }
            if !entry.subtree_id.is_empty() {
                let child = self.entry_id(&entry.subtree_id, &id.to_hex(), "subtree")?;
                total += self.tree_total(child, totals)?;
            }
        }
        totals.insert(id, total);
        Ok(total)
    }
}
