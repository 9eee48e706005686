//! Scrub and repair: reading the store back one pack at a time to find
//! damage before a restore does ([`Store::scrub_pack`]), and writing again
//! chunks found damaged, from bytes another copy supplied
//! ([`Store::repair_chunks`]).
//!
//! Scrub never changes anything; it checks every entry of a pack that the
//! index points at: its checksum, its decoding and its hash. In the pack
//! still open for appends, whatever does not parse at its end is taken as
//! an append in progress. Pacing, the cursor across restarts
//! and where the good bytes come from are the caller's (the storage node).
//!
//! Repair takes the maintenance lock (no GC or verify meanwhile), writes
//! the good chunks to a new pack, points the index at them, then rewrites
//! each pack that held a damaged copy with its other live entries and
//! deletes it; a pack with damage nothing repaired is kept as it is.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::chunker::Chunk;
use crate::error::StoreError;
use crate::id::ChunkId;
use crate::index::Location;
use crate::pack::{self, PACK_HEADER_LEN, PackWriter, SEAL_LEN, SEAL_MAGIC};
use crate::store::{Store, WalkItem, lock};

/// A chunk whose only copy in this store cannot be read back intact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DamagedChunk {
    /// The chunk.
    pub id: ChunkId,
    /// The pack holding the damaged copy.
    pub pack: u32,
    /// What is wrong.
    pub detail: String,
}

/// What [`Store::scrub_pack`] found in one pack.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubPackReport {
    /// Bytes of the pack read.
    pub bytes_read: u64,
    /// Live entries checked.
    pub chunks_checked: u64,
    /// Live entries that failed a check.
    pub damaged: Vec<DamagedChunk>,
    /// The pack was not scrubbed: gone (a GC removed it).
    pub skipped: bool,
}

/// What [`Store::repair_chunks`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Chunks written again.
    pub repaired: Vec<ChunkId>,
    /// Chunks offered that were found intact where the index points (a
    /// GC or an earlier repair moved them meanwhile).
    pub already_intact: Vec<ChunkId>,
    /// Packs rewritten without their damaged entries, then deleted.
    pub packs_rewritten: u64,
    /// Packs kept because they hold damage no offered chunk repairs.
    pub packs_kept_damaged: u64,
}

impl Store {
    /// The first pack at or after `from`, in id order (`None`: past the
    /// last one).
    pub fn next_pack_from(&self, from: u32) -> Result<Option<u32>, StoreError> {
        Ok(self.pack_ids()?.into_iter().find(|id| *id >= from))
    }

    /// Check every live entry of pack `pack`.
    pub fn scrub_pack(&self, pack: u32) -> Result<ScrubPackReport, StoreError> {
        let path = self.pack_path(pack);
        let mut report = ScrubPackReport::default();
        let sealed = match pack::looks_sealed(&path) {
            Ok(sealed) => sealed,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                report.skipped = true;
                return Ok(report);
            }
            Err(err) => return Err(StoreError::io("cannot read pack", &path)(err)),
        };
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                report.skipped = true;
                return Ok(report);
            }
            Err(err) => return Err(StoreError::io("cannot read pack", &path)(err)),
        };
        report.bytes_read = bytes.len() as u64;
        let live_here = |id: &ChunkId, offset: u64| -> Result<bool, StoreError> {
            Ok(self
                .locate(id)?
                .is_some_and(|location| location.pack == pack && location.offset == offset))
        };
        let mut offset = PACK_HEADER_LEN as usize;
        let end = bytes.len();
        let mut broken_at = None;
        while offset < end {
            let rest = &bytes[offset..];
            if rest.len() as u64 == SEAL_LEN && rest[..8] == SEAL_MAGIC {
                break;
            }
            let header = match pack::parse_header(&rest[..rest.len().min(pack::ENTRY_HEADER_LEN)]) {
                Ok(header) if header.entry_len() <= rest.len() as u64 => header,
                Ok(_) => {
                    broken_at = Some((offset, "an entry runs past the end of the pack".to_owned()));
                    break;
                }
                Err(err) => {
                    broken_at = Some((offset, err.to_string()));
                    break;
                }
            };
            let entry_len = header.entry_len() as usize;
            let entry = &rest[..entry_len];
            if live_here(&header.id, offset as u64)? {
                report.chunks_checked += 1;
                let checked = pack::check_entry(entry)
                    .and_then(|(header, stored)| pack::check_stored(&header, stored));
                if let Err(err) = checked {
                    report.damaged.push(DamagedChunk {
                        id: header.id,
                        pack,
                        detail: format!("{} at offset {offset}: {err}", path.display()),
                    });
                }
            }
            offset += entry_len;
        }
        // In the open pack, bytes that do not parse at the end are an
        // append in progress, not damage.
        if let Some((at, why)) = broken_at.filter(|_| sealed) {
            // Past a broken header the entries cannot be told apart: every
            // live chunk the index places there is damaged.
            let mut lost = Vec::new();
            self.index
                .for_each(&mut |id, location| {
                    if location.pack == pack && location.offset >= at as u64 {
                        lost.push(id);
                    }
                    Ok(())
                })
                .map_err(self.index_error())?;
            for id in lost {
                report.chunks_checked += 1;
                report.damaged.push(DamagedChunk {
                    id,
                    pack,
                    detail: format!("{} unreadable from offset {at}: {why}", path.display()),
                });
            }
        }
        Ok(report)
    }

    /// Whether the index still places chunk `id` in pack `pack` (a repair
    /// or a GC may have moved it since a scrub found it damaged there).
    pub fn chunk_is_in_pack(&self, id: &ChunkId, pack: u32) -> Result<bool, StoreError> {
        Ok(self
            .locate(id)?
            .is_some_and(|location| location.pack == pack))
    }

    /// The snapshots (ids) whose DAG reaches any of `chunks`: what damage
    /// that cannot be repaired costs.
    pub fn snapshots_using(&self, chunks: &HashSet<ChunkId>) -> Result<Vec<String>, StoreError> {
        let mut using = Vec::new();
        for snapshot in self.list_snapshots()? {
            let root = self.root_of(&snapshot)?;
            let mut hit = false;
            self.walk_dag(root, &snapshot.id, &mut HashSet::new(), &mut |item| {
                let id = match item {
                    WalkItem::Tree { id, .. }
                    | WalkItem::Chunk { id, .. }
                    | WalkItem::BadTree { id, .. } => id,
                };
                hit |= chunks.contains(&id);
                Ok(())
            })?;
            if hit {
                using.push(snapshot.id);
            }
        }
        Ok(using)
    }

    /// Write `chunks` (good copies of chunks found damaged, each re-hashed
    /// here) again, and rewrite the packs that held their damaged copies.
    pub fn repair_chunks(&self, chunks: Vec<Chunk>) -> Result<RepairReport, StoreError> {
        for chunk in &chunks {
            if ChunkId::of(&chunk.data) != chunk.id {
                return Err(StoreError::Corrupt {
                    id: chunk.id,
                    pack: self.dir.clone(),
                    detail: "the bytes offered to repair it do not hash to its id".to_owned(),
                });
            }
        }
        let _maintenance = lock(&self.maintenance_lock);
        // The open pack is sealed first: a pack this rewrites and deletes
        // must never be appended to again.
        self.flush_and_seal()?;
        let mut report = RepairReport::default();
        let mut damaged_packs: BTreeSet<u32> = BTreeSet::new();
        let mut to_write = Vec::new();
        for chunk in chunks {
            match self.locate(&chunk.id)? {
                Some(location) if self.read_at(&chunk.id, &location).is_ok() => {
                    report.already_intact.push(chunk.id);
                }
                Some(location) => {
                    damaged_packs.insert(location.pack);
                    to_write.push(chunk);
                }
                None => to_write.push(chunk),
            }
        }
        if to_write.is_empty() {
            return Ok(report);
        }
        // The good copies first, durable, then the index.
        let new_id = self.allocate_pack_id();
        let mut writer = PackWriter::create(&self.packs_dir, new_id)
            .map_err(StoreError::io("cannot create pack", self.pack_path(new_id)))?;
        let mut moved: Vec<(ChunkId, Location)> = Vec::new();
        let zstd_level = self.config.zstd_level;
        let mut append = |writer: &mut PackWriter, entry: pack::EncodedEntry<'_>| {
            let offset = writer.append(&entry).map_err(StoreError::io(
                "cannot append to pack",
                writer.path().to_owned(),
            ))?;
            moved.push((
                entry.header.id,
                Location {
                    pack: writer.id(),
                    offset,
                    stored_len: entry.header.stored_len,
                    raw_len: entry.header.raw_len,
                    codec: entry.header.codec,
                },
            ));
            Ok::<(), StoreError>(())
        };
        for chunk in &to_write {
            append(
                &mut writer,
                pack::encode_entry(chunk.id, &chunk.data, zstd_level),
            )?;
            report.repaired.push(chunk.id);
        }
        // Then the rest of each damaged pack, when all of it reads back.
        let repaired: HashSet<ChunkId> = report.repaired.iter().copied().collect();
        let mut live_by_pack: BTreeMap<u32, Vec<(ChunkId, Location)>> = BTreeMap::new();
        self.index
            .for_each(&mut |id, location| {
                if damaged_packs.contains(&location.pack) && !repaired.contains(&id) {
                    live_by_pack
                        .entry(location.pack)
                        .or_default()
                        .push((id, location));
                }
                Ok(())
            })
            .map_err(self.index_error())?;
        let mut to_delete = Vec::new();
        for pack_id in &damaged_packs {
            let live = live_by_pack.get(pack_id).map_or(&[][..], Vec::as_slice);
            let Some(entries) = self.live_entries_of(*pack_id, live)? else {
                report.packs_kept_damaged += 1;
                continue;
            };
            for entry in entries {
                append(&mut writer, entry)?;
            }
            to_delete.push(*pack_id);
        }
        self.seal_and_sync(writer)?;
        self.index
            .insert_batch(&moved)
            .map_err(self.index_error())?;
        self.index.flush().map_err(self.index_error())?;
        for pack_id in to_delete {
            let path = self.pack_path(pack_id);
            self.forget_pack_file(pack_id);
            match std::fs::remove_file(&path) {
                Ok(()) => report.packs_rewritten += 1,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(StoreError::io("cannot remove", path)(err)),
            }
        }
        pack::sync_dir(&self.packs_dir).map_err(StoreError::io("cannot fsync", &self.packs_dir))?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::store::tests::{pseudo_random, small_config};

    fn damage(store: &Store, id: &ChunkId) {
        let location = store.locate(id).unwrap().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(store.pack_path(location.pack))
            .unwrap();
        let at =
            location.offset + pack::ENTRY_HEADER_LEN as u64 + u64::from(location.stored_len / 2);
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 0xff], at).unwrap();
    }

    #[test]
    fn scrub_finds_a_flipped_byte_and_repair_rewrites_its_pack() {
        let temp = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(temp.path(), small_config()).unwrap();
        let chunks: Vec<Chunk> = (0..20u64)
            .map(|n| Chunk::new(pseudo_random(10_000, n)))
            .collect();
        store.put_chunks(chunks.clone()).unwrap();
        let packs = store.pack_ids().unwrap();
        let clean: u64 = packs
            .iter()
            .map(|pack| {
                let report = store.scrub_pack(*pack).unwrap();
                assert!(report.damaged.is_empty(), "{report:?}");
                report.chunks_checked
            })
            .sum();
        assert_eq!(clean, 20);

        damage(&store, &chunks[7].id);
        let pack = store.locate(&chunks[7].id).unwrap().unwrap().pack;
        let report = store.scrub_pack(pack).unwrap();
        assert_eq!(report.damaged.len(), 1, "{report:?}");
        assert_eq!(report.damaged[0].id, chunks[7].id);
        assert!(report.damaged[0].detail.contains("offset"), "{report:?}");

        // The last chunk sits in the pack still open for appends.
        damage(&store, &chunks[19].id);
        let open_pack = store.locate(&chunks[19].id).unwrap().unwrap().pack;
        let report = store.scrub_pack(open_pack).unwrap();
        assert_eq!(report.damaged.len(), 1, "{report:?}");
        assert_eq!(report.damaged[0].id, chunks[19].id);
        let repaired = store.repair_chunks(vec![chunks[19].clone()]).unwrap();
        assert_eq!(repaired.packs_rewritten, 1);
        assert!(!store.pack_path(open_pack).exists());
        // New writes go to a new pack, never the deleted one.
        let late = Chunk::new(pseudo_random(10_000, 99));
        store.put_chunks(vec![late.clone()]).unwrap();
        assert_eq!(store.get_chunk(&late.id).unwrap(), late.data);

        // A forged repair is refused; a good one rewrites the pack.
        let mut forged = chunks[8].clone();
        forged.id = chunks[7].id;
        assert!(store.repair_chunks(vec![forged]).is_err());
        let repaired = store.repair_chunks(vec![chunks[7].clone()]).unwrap();
        assert_eq!(repaired.repaired, vec![chunks[7].id]);
        assert_eq!(repaired.packs_rewritten, 1);
        assert!(!store.pack_path(pack).exists());
        for chunk in &chunks {
            assert_eq!(store.get_chunk(&chunk.id).unwrap(), chunk.data);
        }
        for pack in store.pack_ids().unwrap() {
            assert!(store.scrub_pack(pack).unwrap().damaged.is_empty());
        }
        // Offered again, it is found intact.
        let again = store.repair_chunks(vec![chunks[7].clone()]).unwrap();
        assert_eq!(again.already_intact, vec![chunks[7].id]);
    }
}
