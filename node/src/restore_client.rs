//! Restoring from a node: the `Storage.Restore` stream drives a
//! [`RestoreTarget`] (a directory or a tar stream) on a blocking thread.
//!
//! The node is not trusted more than the disk: every path is checked again
//! (no `..`, `/` inside a name, NUL, empty), every chunk must be the next id
//! of its file's entry and must decode to bytes that hash to it, and a file must add up to its
//! recorded size, before anything reaches the target. A chunk the node sends
//! again byte for byte right after it was checked (the thousands of zero
//! chunks of a sparse file) is written from the checked copy, and a chunk of
//! zeros goes to the target as a run of zeros it may leave as a hole. A file
//! of more chunk ids than one message carries has the rest of them in
//! `more_chunk_ids` items; they are joined to its entry before the file is
//! started.
//!
//! The stream carries entries as they were recorded, owners and setuid and
//! setgid bits included: what of them reaches the disk is the target's
//! business (a [`DirectoryTarget`](fabric_chunkstore::restore::DirectoryTarget)
//! gives them back only as its
//! [`RestorePolicy`](fabric_chunkstore::restore::RestorePolicy) asks), and
//! this module never widens it. Special files are passed to the target,
//! which never creates them, and counted as skipped.

use fabric_chunkstore::restore::{
    HardLinks, RestoreError, RestoreStats, RestoreTarget, check_relative_path,
};
use fabric_proto::v1::{
    ChunkData, EntryKind, RestoreEntry, RestoreItem, RestoreRequest, TreeEntry, restore_item,
};
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::agent::AgentError;
use crate::convert::plain_chunk;

/// Checks a restore stream item by item and writes it into a target.
pub struct RestoreStreamWriter<'a> {
    target: &'a mut dyn RestoreTarget,
    current: Option<OpenFile>,
    stats: RestoreStats,
    /// Files other entries may be hard links to: the node sends those
    /// links without chunks, by the same rule.
    hard_links: HardLinks,
    /// The last chunk written, as it came, as its checked plain bytes, and
    /// whether those are all zeros.
    last_chunk: Option<(ChunkData, Vec<u8>, bool)>,
    /// A file entry whose chunk ids are still coming in `more_chunk_ids`
    /// items, and how many it has in all.
    incomplete: Option<(RestoreEntry, usize)>,
}

struct OpenFile {
    path: String,
    entry: TreeEntry,
    next_chunk: usize,
    written: u64,
}

fn bad(path: &str, reason: impl Into<String>) -> RestoreError {
    RestoreError::BadEntry {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

impl<'a> RestoreStreamWriter<'a> {
    /// Write into `target`.
    pub fn new(target: &'a mut dyn RestoreTarget) -> Self {
        Self {
            target,
            current: None,
            stats: RestoreStats::default(),
            hard_links: HardLinks::default(),
            last_chunk: None,
            incomplete: None,
        }
    }

    fn close_file(&mut self) -> Result<(), RestoreError> {
        if let Some(file) = self.current.take() {
            if file.next_chunk != file.entry.chunk_ids.len() || file.written != file.entry.size {
                return Err(bad(
                    &file.path,
                    format!(
                        "the node sent {} of {} chunks ({} of {} bytes)",
                        file.next_chunk,
                        file.entry.chunk_ids.len(),
                        file.written,
                        file.entry.size
                    ),
                ));
            }
            self.target.file_end()?;
            self.stats.files += 1;
            self.stats.bytes += file.written;
        }
        Ok(())
    }

    /// Take the next item of the stream.
    pub fn item(&mut self, item: RestoreItem) -> Result<(), RestoreError> {
        if let Some((header, count)) = &mut self.incomplete {
            let path = String::from_utf8_lossy(&header.path).into_owned();
            let Some(restore_item::Kind::MoreChunkIds(more)) = item.kind else {
                return Err(bad(&path, "the entry's chunk ids ended early"));
            };
            let ids = &mut header.entry.get_or_insert_default().chunk_ids;
            if ids.len() + more.ids.len() > *count {
                return Err(bad(&path, "more chunk ids than the entry announced"));
            }
            ids.extend(more.ids);
            if ids.len() == *count
                && let Some((header, _)) = self.incomplete.take()
            {
                return self.entry(header);
            }
            return Ok(());
        }
        match item.kind {
            Some(restore_item::Kind::Entry(header)) => {
                self.close_file()?;
                let count = usize::try_from(header.chunk_id_count).unwrap_or(usize::MAX);
                let listed = header
                    .entry
                    .as_ref()
                    .map_or(0, |entry| entry.chunk_ids.len());
                if count > listed {
                    self.incomplete = Some((header, count));
                    return Ok(());
                }
                self.entry(header)
            }
            Some(restore_item::Kind::MoreChunkIds(_)) => {
                Err(bad("", "chunk ids outside of a file entry"))
            }
            Some(restore_item::Kind::Chunk(chunk)) => self.chunk(chunk),
            None => Err(bad("", "an empty restore item")),
        }
    }

    /// An entry, complete with its chunk ids.
    fn entry(&mut self, header: RestoreEntry) -> Result<(), RestoreError> {
        let entry = header.entry.unwrap_or_default();
        let path = String::from_utf8_lossy(&header.path).into_owned();
        check_relative_path(&header.path)?;
        match entry.kind() {
            EntryKind::Dir => {
                self.target.directory(&header.path, &entry)?;
                self.stats.dirs += 1;
            }
            EntryKind::File => {
                if let Some(existing) = self.hard_links.link_target(&header.path, &entry) {
                    self.target.hard_link(&header.path, &existing, &entry)?;
                    self.stats.files += 1;
                    self.stats.hard_links += 1;
                    return Ok(());
                }
                self.target.file_start(&header.path, &entry)?;
                self.current = Some(OpenFile {
                    path,
                    entry,
                    next_chunk: 0,
                    written: 0,
                });
            }
            EntryKind::Symlink => {
                self.target.symlink(&header.path, &entry)?;
                self.stats.symlinks += 1;
            }
            EntryKind::Other => {
                self.target.other(&header.path, &entry)?;
                self.stats.others_skipped += 1;
            }
            EntryKind::Unspecified => return Err(bad(&path, "an entry of no kind")),
        }
        Ok(())
    }

    /// The next chunk of the open file.
    fn chunk(&mut self, chunk: ChunkData) -> Result<(), RestoreError> {
        let file = self
            .current
            .as_mut()
            .ok_or_else(|| bad("", "chunk data outside of a file"))?;
        let expected = file
            .entry
            .chunk_ids
            .get(file.next_chunk)
            .ok_or_else(|| bad(&file.path, "more chunks than the entry lists"))?;
        if *expected != chunk.id {
            return Err(bad(&file.path, "a chunk out of order"));
        }
        // The same id, encoding and bytes as the chunk checked last decode
        // to the same plain bytes.
        let (plain, zero) = match &mut self.last_chunk {
            Some((last, plain, zero)) if *last == chunk => (plain, *zero),
            last => {
                let plain = plain_chunk(chunk.clone())
                    .map_err(|err| bad(&file.path, err))?
                    .data;
                let zero = fabric_chunkstore::chunker::all_zero(&plain);
                let (_, plain, _) = last.insert((chunk, plain, zero));
                (plain, zero)
            }
        };
        file.next_chunk += 1;
        file.written += plain.len() as u64;
        if zero {
            self.target.file_zeros(plain.len() as u64)?;
        } else {
            self.target.file_data(plain)?;
        }
        Ok(())
    }

    /// The stream ended: close the last file and finish the target.
    pub fn finish(mut self) -> Result<RestoreStats, RestoreError> {
        if let Some((header, _)) = &self.incomplete {
            return Err(bad(
                &String::from_utf8_lossy(&header.path),
                "the stream ended before the entry's chunk ids",
            ));
        }
        self.close_file()?;
        self.target.finish()?;
        self.stats.attributes_not_restored = self.target.attributes_not_restored();
        self.stats.owners_not_restored = self.target.owners_not_restored();
        Ok(self.stats)
    }
}

/// Restore `path` of `snapshot` from `node` into `target`, which applies
/// its own policy for owners and setuid and setgid bits.
pub async fn restore_from(
    node: &crate::client::Peer,
    transport: &fabric_trust::Transport,
    snapshot: &str,
    path: &str,
    target: Box<dyn RestoreTarget + Send>,
) -> Result<RestoreStats, AgentError> {
    let copy = [(node.clone(), snapshot.to_owned())];
    let restored = restore_from_any(&copy, transport, path, target).await?;
    Ok(restored.stats)
}

/// What [`restore_from_any`] did.
#[derive(Debug)]
pub struct Restored {
    /// Index into the copies of the one it restored from.
    pub from: usize,
    /// Why each copy before it could not start, in order.
    pub skipped: Vec<String>,
    /// What it wrote.
    pub stats: RestoreStats,
}

/// Restore `path` from the first of `copies` (a node, and the snapshot's id
/// there) that starts the restore: a node that cannot be reached, or that
/// refuses (no such snapshot any more, not serving), is passed over for the
/// next before anything is written. Once a copy has started sending, its
/// errors end the restore (nothing written can be taken back from a tar
/// stream).
pub async fn restore_from_any(
    copies: &[(crate::client::Peer, String)],
    transport: &fabric_trust::Transport,
    path: &str,
    mut target: Box<dyn RestoreTarget + Send>,
) -> Result<Restored, AgentError> {
    let mut skipped = Vec::new();
    let mut opened = None;
    for (index, (node, snapshot)) in copies.iter().enumerate() {
        let address = node.address.as_str();
        let attempt = async {
            let mut client = crate::client::storage(node, transport).await?;
            client
                .restore(RestoreRequest {
                    snapshot: snapshot.clone(),
                    path: path.to_owned(),
                })
                .await
                .map_err(|status| AgentError::Remote {
                    context: format!("restoring {snapshot} from {address}"),
                    status,
                })
        };
        match attempt.await {
            Ok(response) => {
                opened = Some((index, response.into_inner()));
                break;
            }
            Err(err) if index + 1 < copies.len() => {
                tracing::warn!(node = %address, error = %err, "this copy cannot be read; trying the next");
                skipped.push(err.to_string());
            }
            Err(err) => return Err(err),
        }
    }
    let Some((from, mut stream)) = opened else {
        return Err(AgentError::Local(
            "no copy of the snapshot to restore from".to_owned(),
        ));
    };
    let (node, snapshot) = &copies[from];
    let snapshot = snapshot.as_str();
    let address = node.address.as_str();
    let (items_tx, mut items_rx) = mpsc::channel::<RestoreItem>(8);
    let writer = tokio::task::spawn_blocking(move || {
        let mut writer = RestoreStreamWriter::new(target.as_mut());
        while let Some(item) = items_rx.blocking_recv() {
            writer.item(item)?;
        }
        writer.finish()
    });
    let mut remote_error = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(item) => {
                if items_tx.send(item).await.is_err() {
                    break;
                }
            }
            Err(status) => {
                remote_error = Some(status);
                break;
            }
        }
    }
    drop(items_tx);
    let written = writer
        .await
        .map_err(|err| AgentError::Local(format!("restore writer failed: {err}")))?;
    if let Some(status) = remote_error {
        return Err(AgentError::Remote {
            context: format!("restoring {snapshot} from {address}"),
            status,
        });
    }
    let stats =
        written.map_err(|err| AgentError::Local(format!("restore of {snapshot} failed: {err}")))?;
    Ok(Restored {
        from,
        skipped,
        stats,
    })
}

#[cfg(test)]
mod tests {
    use fabric_chunkstore::Chunk;
    use fabric_chunkstore::pack::StoredChunk;
    use fabric_chunkstore::restore::{DirectoryTarget, RestorePolicy};

    use super::*;
    use crate::convert::chunk_data;

    fn file_entry(name: &str, chunks: &[&Chunk]) -> RestoreItem {
        RestoreItem {
            kind: Some(restore_item::Kind::Entry(RestoreEntry {
                path: name.as_bytes().to_vec(),
                entry: Some(TreeEntry {
                    name: name.as_bytes().to_vec(),
                    kind: EntryKind::File as i32,
                    mode: 0o644,
                    size: chunks.iter().map(|chunk| chunk.data.len() as u64).sum(),
                    chunk_ids: chunks.iter().map(|chunk| chunk.id.to_vec()).collect(),
                    ..Default::default()
                }),
                chunk_id_count: 0,
            })),
        }
    }

    fn chunk_item(data: ChunkData) -> RestoreItem {
        RestoreItem {
            kind: Some(restore_item::Kind::Chunk(data)),
        }
    }

    fn compressed(chunk: &Chunk) -> ChunkData {
        chunk_data(StoredChunk::encode(chunk.clone(), 3))
    }

    #[test]
    fn a_chunk_sent_again_is_written_again_and_a_changed_copy_is_checked() {
        let temp = tempfile::tempdir().unwrap();
        let zeros = Chunk::new(vec![0; 100_000]);
        let text = Chunk::new(b"some text between the zeros".repeat(100));
        let mut target = DirectoryTarget::new(temp.path(), RestorePolicy::default()).unwrap();
        let mut writer = RestoreStreamWriter::new(&mut target);
        writer
            .item(file_entry("image", &[&zeros, &zeros, &text, &zeros]))
            .unwrap();
        for chunk in [&zeros, &zeros, &text, &zeros] {
            writer.item(chunk_item(compressed(chunk))).unwrap();
        }
        // A copy of the last chunk with the same id and other bytes is
        // checked, not taken for the one before it.
        writer
            .item(file_entry("second", &[&zeros, &zeros]))
            .unwrap();
        writer.item(chunk_item(compressed(&zeros))).unwrap();
        let mut forged = compressed(&text);
        forged.id = zeros.id.to_vec();
        let err = writer.item(chunk_item(forged)).unwrap_err();
        assert!(err.to_string().contains(&zeros.id.to_string()), "{err}");
        drop(writer);

        let mut expected = Vec::new();
        for chunk in [&zeros, &zeros, &text, &zeros] {
            expected.extend_from_slice(&chunk.data);
        }
        assert!(std::fs::read(temp.path().join("image")).unwrap() == expected);
    }

    /// `file_entry` with only the first `listed` ids in the entry, and the
    /// rest as `more_chunk_ids` items of at most `per_item` ids.
    fn entry_in_pieces(
        name: &str,
        chunks: &[&Chunk],
        listed: usize,
        per_item: usize,
    ) -> Vec<RestoreItem> {
        let mut whole = file_entry(name, chunks);
        let Some(restore_item::Kind::Entry(header)) = &mut whole.kind else {
            unreachable!()
        };
        let entry = header.entry.as_mut().unwrap();
        let rest = entry.chunk_ids.split_off(listed);
        header.chunk_id_count = chunks.len() as u64;
        let mut items = vec![whole];
        for piece in rest.chunks(per_item) {
            items.push(RestoreItem {
                kind: Some(restore_item::Kind::MoreChunkIds(
                    fabric_proto::v1::ChunkIds {
                        ids: piece.to_vec(),
                    },
                )),
            });
        }
        items
    }

    #[test]
    fn chunk_ids_sent_after_their_entry_are_joined_to_it_before_any_chunk() {
        let temp = tempfile::tempdir().unwrap();
        let chunks: Vec<Chunk> = (0..7u8)
            .map(|index| Chunk::new(vec![index + 1; 1000 + usize::from(index)]))
            .collect();
        let all: Vec<&Chunk> = chunks.iter().collect();
        let mut target = DirectoryTarget::new(temp.path(), RestorePolicy::default()).unwrap();
        let mut writer = RestoreStreamWriter::new(&mut target);
        for item in entry_in_pieces("large", &all, 2, 3) {
            writer.item(item).unwrap();
        }
        for chunk in &all {
            writer.item(chunk_item(compressed(chunk))).unwrap();
        }
        writer.finish().unwrap();
        let expected: Vec<u8> = all.iter().flat_map(|chunk| chunk.data.clone()).collect();
        assert!(std::fs::read(temp.path().join("large")).unwrap() == expected);

        // A chunk before the ids are complete, or more ids than announced,
        // is refused naming the file.
        let temp = tempfile::tempdir().unwrap();
        let mut target = DirectoryTarget::new(temp.path(), RestorePolicy::default()).unwrap();
        let mut writer = RestoreStreamWriter::new(&mut target);
        let mut items = entry_in_pieces("early", &all, 2, 3).into_iter();
        writer.item(items.next().unwrap()).unwrap();
        let err = writer.item(chunk_item(compressed(all[0]))).unwrap_err();
        assert!(
            err.to_string().contains("early") && err.to_string().contains("ended early"),
            "{err}"
        );

        let temp = tempfile::tempdir().unwrap();
        let mut target = DirectoryTarget::new(temp.path(), RestorePolicy::default()).unwrap();
        let mut writer = RestoreStreamWriter::new(&mut target);
        let mut items = entry_in_pieces("long", &all, 2, 5);
        let Some(restore_item::Kind::MoreChunkIds(more)) = &mut items[1].kind else {
            unreachable!()
        };
        more.ids.push(all[0].id.to_vec());
        writer.item(items[0].clone()).unwrap();
        let err = writer.item(items[1].clone()).unwrap_err();
        assert!(
            err.to_string()
                .contains("more chunk ids than the entry announced"),
            "{err}"
        );

        let mut target = DirectoryTarget::new(temp.path(), RestorePolicy::default()).unwrap();
        let mut writer = RestoreStreamWriter::new(&mut target);
        let stray = entry_in_pieces("stray", &all, 2, 5).pop().unwrap();
        let err = writer.item(stray).unwrap_err();
        assert!(err.to_string().contains("outside of a file entry"), "{err}");
    }
}
