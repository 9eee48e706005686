//! Restoring from a node: the `Storage.Restore` stream drives a
//! [`RestoreTarget`] (a directory or a tar stream) on a blocking thread.
//!
//! The node is not trusted more than the disk: every path is checked again
//! (no `..`, `/` inside a name, NUL, empty), every chunk must be the next id
//! of its file's entry and must decode to bytes that hash to it, and a file
//! must add up to its recorded size, before anything reaches the target.
//! Chunks are decoded into one buffer kept from chunk to chunk (a restore
//! holds one chunk's plain bytes, not one per chunk), and a chunk of zeros
//! goes to the target as a run of zeros it may leave as a hole; the same
//! chunk of zeros sent again byte for byte (the thousands of a sparse file's
//! holes) is written as zeros without being decoded again. A file
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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fabric_chunkstore::pack::ChunkDecoder;
use fabric_chunkstore::restore::{
    HardLinks, RestoreError, RestoreStats, RestoreTarget, check_relative_path,
};
use fabric_proto::v1::{
    ChunkData, EntryKind, GetChunksRequest, RestoreEntry, RestoreItem, RestoreRequest, TreeEntry,
    restore_item,
};
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::agent::AgentError;
use crate::convert::received_chunk;

/// Checks a restore stream item by item and writes it into a target.
pub struct RestoreStreamWriter<'a> {
    target: &'a mut dyn RestoreTarget,
    current: Option<OpenFile>,
    stats: RestoreStats,
    /// Files other entries may be hard links to: the node sends those
    /// links without chunks, by the same rule.
    hard_links: HardLinks,
    /// The last chunk of zeros written, as it came (its bytes copied out of
    /// the stream's buffer), and its length: the node sends a sparse file's
    /// holes as the same chunk thousands of times.
    zero_chunk: Option<(ChunkData, u64)>,
    /// Decodes each chunk into one buffer, reused from chunk to chunk.
    decoder: ChunkDecoder,
    /// A file entry whose chunk ids are still coming in `more_chunk_ids`
    /// items, and how many it has in all.
    incomplete: Option<(RestoreEntry, usize)>,
    /// Where a chunk the node could not read, or sent damaged, is fetched
    /// from instead (another copy), if anywhere.
    fallback: Option<ChunkFetcher<'a>>,
    /// Chunks taken from the fallback.
    chunks_from_other_copies: u64,
}

/// Fetches one chunk by id from somewhere else than the stream (checked
/// again by the writer).
pub type ChunkFetcher<'a> = Box<dyn FnMut(&[u8]) -> Result<ChunkData, String> + Send + 'a>;

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
            zero_chunk: None,
            decoder: ChunkDecoder::new(),
            incomplete: None,
            fallback: None,
            chunks_from_other_copies: 0,
        }
    }

    /// Fetch a chunk the node could not read, or sent damaged, with
    /// `fetch` (from another copy) instead of failing.
    pub fn with_fallback(mut self, fetch: ChunkFetcher<'a>) -> Self {
        self.fallback = Some(fetch);
        self
    }

    /// Chunks taken from the fallback so far.
    pub fn chunks_from_other_copies(&self) -> u64 {
        self.chunks_from_other_copies
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
            Some(restore_item::Kind::Chunk(chunk)) => {
                let id = chunk.id.clone();
                self.next_chunk(&id, Ok(chunk))
            }
            Some(restore_item::Kind::UnreadableChunk(unreadable)) => {
                let reason = format!("the node cannot read it: {}", unreadable.reason);
                self.next_chunk(&unreadable.id, Err(reason))
            }
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

    /// The next chunk of the open file, `id` as the node sent it or could
    /// not read it (`Err`): checked, or fetched from the fallback when it
    /// does not check.
    fn next_chunk(
        &mut self,
        id: &[u8],
        got: Result<ChunkData, String>,
    ) -> Result<(), RestoreError> {
        let file = self
            .current
            .as_mut()
            .ok_or_else(|| bad("", "chunk data outside of a file"))?;
        let expected = file
            .entry
            .chunk_ids
            .get(file.next_chunk)
            .ok_or_else(|| bad(&file.path, "more chunks than the entry lists"))?;
        if expected != id {
            return Err(bad(&file.path, "a chunk out of order"));
        }
        // The same id, encoding and bytes as a chunk checked before decode
        // to the same plain bytes.
        if let (Some((zeros, len)), Ok(chunk)) = (&self.zero_chunk, &got)
            && zeros == chunk
        {
            file.next_chunk += 1;
            file.written += len;
            self.target.file_zeros(*len)?;
            return Ok(());
        }
        let why = match got
            .and_then(|chunk| received_chunk(chunk.clone()).map(|stored| (chunk, stored)))
        {
            Ok((chunk, stored)) => match self.decoder.plain(&stored) {
                Ok(plain) => {
                    let zero = write_plain(&mut *self.target, file, plain)?;
                    self.zero_chunk = zero.then(|| (owned(chunk), plain.len() as u64));
                    return Ok(());
                }
                Err(err) => format!(
                    "the bytes of chunk {} do not match its id: {err}",
                    stored.id
                ),
            },
            Err(why) => why,
        };
        let Some(fetch) = self.fallback.as_mut() else {
            return Err(bad(&file.path, why));
        };
        let hex = fabric_chunkstore::ChunkId::from_slice(id)
            .map_or_else(|_| "?".to_owned(), |id| id.to_string());
        tracing::warn!(chunk = %hex, path = %file.path, %why, "reading the chunk from another copy");
        let chunk = fetch(id).map_err(|err| {
            bad(
                &file.path,
                format!("chunk {hex}: {why}, and no other copy has it: {err}"),
            )
        })?;
        let from_other =
            |err: String| bad(&file.path, format!("chunk {hex} from another copy: {err}"));
        let stored = received_chunk(chunk.clone()).map_err(from_other)?;
        let plain = self
            .decoder
            .plain(&stored)
            .map_err(|err| from_other(format!("the bytes do not match its id: {err}")))?;
        let zero = write_plain(&mut *self.target, file, plain)?;
        self.zero_chunk = zero.then(|| (owned(chunk), plain.len() as u64));
        self.chunks_from_other_copies += 1;
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
        self.stats.existing_kept = self.target.existing_kept();
        Ok(self.stats)
    }
}

/// `chunk` with its bytes in an allocation of their own, so that keeping it
/// does not keep the whole message buffer it was decoded from.
fn owned(chunk: ChunkData) -> ChunkData {
    ChunkData {
        data: bytes::Bytes::copy_from_slice(&chunk.data),
        ..chunk
    }
}

/// Write a checked chunk's plain bytes as the open file's next chunk; a
/// chunk of zeros goes as a run of zeros the target may leave as a hole.
/// Returns whether it was zeros.
fn write_plain(
    target: &mut dyn RestoreTarget,
    file: &mut OpenFile,
    plain: &[u8],
) -> Result<bool, RestoreError> {
    let zero = fabric_chunkstore::chunker::all_zero(plain);
    file.next_chunk += 1;
    file.written += plain.len() as u64;
    if zero {
        target.file_zeros(plain.len() as u64)?;
    } else {
        target.file_data(plain)?;
    }
    Ok(zero)
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
    let restored = restore_from_any(&copy, transport, path, target, false).await?;
    Ok(restored.stats)
}

/// What [`restore_from_any`] did.
#[derive(Debug)]
pub struct Restored {
    /// Index into the copies of the one it restored from.
    pub from: usize,
    /// Why each copy before it could not serve the restore, in order.
    pub skipped: Vec<String>,
    /// What it wrote.
    pub stats: RestoreStats,
    /// Chunks the copy it restored from could not read, or sent damaged,
    /// that were read from another copy.
    pub chunks_from_other_copies: u64,
}

/// Reads single chunks from the copies other than the one restoring, in
/// order, each checked against its id; on a blocking thread (the writer's).
struct OtherCopies {
    copies: Vec<crate::client::Peer>,
    transport: fabric_trust::Transport,
    runtime: tokio::runtime::Handle,
    clients:
        Vec<Option<fabric_proto::v1::storage_client::StorageClient<tonic::transport::Channel>>>,
}

impl OtherCopies {
    fn new(copies: Vec<crate::client::Peer>, transport: fabric_trust::Transport) -> Self {
        let clients = copies.iter().map(|_| None).collect();
        Self {
            copies,
            transport,
            runtime: tokio::runtime::Handle::current(),
            clients,
        }
    }

    fn fetch(&mut self, id: &[u8]) -> Result<ChunkData, String> {
        let runtime = self.runtime.clone();
        runtime.block_on(async {
            let mut reasons = Vec::new();
            for (peer, client) in self.copies.iter().zip(self.clients.iter_mut()) {
                let node = &peer.address;
                let connected = match client {
                    Some(client) => client,
                    None => match crate::client::storage(peer, &self.transport).await {
                        Ok(new) => client.insert(new),
                        Err(err) => {
                            reasons.push(format!("{node}: {err}"));
                            continue;
                        }
                    },
                };
                let answer = connected
                    .get_chunks(GetChunksRequest {
                        ids: vec![id.to_vec()],
                    })
                    .await;
                let mut stream = match answer {
                    Ok(stream) => stream.into_inner(),
                    Err(status) => {
                        reasons.push(format!("{node}: {}", status.message()));
                        continue;
                    }
                };
                match stream.next().await {
                    Some(Ok(chunk)) if chunk.id == id => {
                        match received_chunk(chunk.clone()).and_then(|stored| {
                            stored
                                .check()
                                .map_err(|err| format!("the bytes do not match its id: {err}"))
                        }) {
                            Ok(()) => return Ok(chunk),
                            Err(err) => reasons.push(format!("{node}: {err}")),
                        }
                    }
                    Some(Ok(_)) => reasons.push(format!("{node}: sent another chunk")),
                    Some(Err(status)) => reasons.push(format!("{node}: {}", status.message())),
                    None => reasons.push(format!("{node}: sent nothing")),
                }
            }
            if reasons.is_empty() {
                reasons.push("there is no other copy".to_owned());
            }
            Err(reasons.join("; "))
        })
    }
}

/// Restore `path` from the first of `copies` (a node, and the snapshot's id
/// there) that can serve it:
///
/// - a node that cannot be reached, or that refuses (no such snapshot any
///   more, not serving), is passed over for the next before anything is
///   written;
/// - a chunk the serving node cannot read, or sends damaged, is read from
///   the other copies instead, and checked like every other;
/// - when the serving node fails mid-stream (it stopped, it sent a bad
///   entry), what was written is taken back and, if the target can be
///   written again (a directory; not a tar stream already sent), the
///   restore starts over from the next copy. With `keep_partial`, what was
///   written stays and the restore ends there.
pub async fn restore_from_any(
    copies: &[(crate::client::Peer, String)],
    transport: &fabric_trust::Transport,
    path: &str,
    mut target: Box<dyn RestoreTarget + Send>,
    keep_partial: bool,
) -> Result<Restored, AgentError> {
    let mut skipped = Vec::new();
    for (index, (node, snapshot)) in copies.iter().enumerate() {
        let last = index + 1 == copies.len();
        let address = node.address.as_str();
        let opened = async {
            let mut client = crate::client::storage(node, transport).await?;
            client
                .restore(RestoreRequest {
                    snapshot: snapshot.clone(),
                    path: path.to_owned(),
                    report_unreadable_chunks: copies.len() > 1,
                })
                .await
                .map_err(|status| AgentError::Remote {
                    context: format!("restoring {snapshot} from {address}"),
                    status,
                })
        };
        let mut stream = match opened.await {
            Ok(response) => response.into_inner(),
            Err(err) if !last => {
                tracing::warn!(node = %address, error = %err, "this copy cannot be read; trying the next");
                skipped.push(err.to_string());
                continue;
            }
            Err(err) => return Err(err),
        };
        let others: Vec<crate::client::Peer> = copies
            .iter()
            .enumerate()
            .filter(|(other, _)| *other != index)
            .map(|(_, (peer, _))| peer.clone())
            .collect();
        let mut fallback = OtherCopies::new(others, transport.clone());
        let (items_tx, mut items_rx) = mpsc::channel::<RestoreItem>(4);
        // Set when the node ended the stream itself: only then is the
        // target finished (a restore cut off is not given its directories'
        // modes, which could keep `abort` from removing what it wrote).
        let complete = Arc::new(AtomicBool::new(false));
        let writer_complete = complete.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let written = {
                let mut writer = RestoreStreamWriter::new(target.as_mut())
                    .with_fallback(Box::new(move |id| fallback.fetch(id)));
                let mut result = Ok(());
                while let Some(item) = items_rx.blocking_recv() {
                    result = writer.item(item);
                    if result.is_err() {
                        break;
                    }
                }
                let from_others = writer.chunks_from_other_copies();
                result
                    .and_then(|()| {
                        if writer_complete.load(Ordering::SeqCst) {
                            writer.finish()
                        } else {
                            Err(bad(
                                "",
                                "the stream broke off before the restore was complete",
                            ))
                        }
                    })
                    .map(|stats| (stats, from_others))
            };
            (target, written)
        });
        let mut remote_error = None;
        loop {
            match stream.next().await {
                Some(Ok(item)) => {
                    if items_tx.send(item).await.is_err() {
                        break;
                    }
                }
                Some(Err(status)) => {
                    remote_error = Some(status);
                    break;
                }
                None => {
                    complete.store(true, Ordering::SeqCst);
                    break;
                }
            }
        }
        drop(items_tx);
        let (returned, written) = writer
            .await
            .map_err(|err| AgentError::Local(format!("restore writer failed: {err}")))?;
        target = returned;
        let (failure, node_at_fault) = match (remote_error, written) {
            (None, Ok((stats, chunks_from_other_copies))) => {
                return Ok(Restored {
                    from: index,
                    skipped,
                    stats,
                    chunks_from_other_copies,
                });
            }
            (Some(status), _) => (
                AgentError::Remote {
                    context: format!("restoring {snapshot} from {address}"),
                    status,
                },
                true,
            ),
            (None, Err(err)) => {
                // What the node sent did not check; a write that failed
                // here, or an entry already in the target that it was
                // asked to leave alone, would fail from any copy.
                let node_at_fault =
                    !matches!(err, RestoreError::Io { .. } | RestoreError::Exists { .. });
                (
                    AgentError::Local(format!("restore of {snapshot} failed: {err}")),
                    node_at_fault,
                )
            }
        };
        if keep_partial {
            return Err(failure);
        }
        let removed = tokio::task::spawn_blocking(move || {
            let removed = target.abort();
            (target, removed)
        })
        .await
        .map_err(|err| AgentError::Local(format!("taking back a failed restore: {err}")))?;
        target = removed.0;
        let removed = removed.1.map_err(|err| {
            AgentError::Local(format!(
                "{failure}; and what it wrote could not all be removed: {err}"
            ))
        })?;
        if last || !node_at_fault || !target.restartable() {
            if removed == 0 {
                return Err(failure);
            }
            return Err(AgentError::Local(format!(
                "{failure}; the {removed} entries the restore had written were removed \
                 (--keep-partial keeps them)"
            )));
        }
        tracing::warn!(node = %address, error = %failure, removed, "the copy failed mid-restore; starting over from the next");
        skipped.push(format!(
            "{failure} (the {removed} entries written from it were removed)"
        ));
    }
    Err(AgentError::Local(
        "no copy of the snapshot to restore from".to_owned(),
    ))
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

    #[test]
    fn a_chunk_the_node_cannot_read_or_sends_damaged_comes_from_the_fallback_checked() {
        let temp = tempfile::tempdir().unwrap();
        let first = Chunk::new(b"first chunk of the file".repeat(50));
        let second = Chunk::new(b"second chunk of the file".repeat(50));
        let third = Chunk::new(b"third chunk of the file".repeat(50));
        let mut target = DirectoryTarget::new(temp.path(), RestorePolicy::default()).unwrap();
        let good = [first.clone(), second.clone(), third.clone()];
        let fetch: ChunkFetcher<'_> = Box::new(|id: &[u8]| {
            good.iter()
                .find(|chunk| chunk.id.as_bytes() == id)
                .map(compressed)
                .ok_or_else(|| "not here either".to_owned())
        });
        let mut writer = RestoreStreamWriter::new(&mut target).with_fallback(fetch);
        writer
            .item(file_entry("file", &[&first, &second, &third]))
            .unwrap();
        writer.item(chunk_item(compressed(&first))).unwrap();
        // Damaged on the way: the id is right, the bytes are not.
        let mut damaged = compressed(&second);
        damaged.data = compressed(&third).data;
        writer.item(chunk_item(damaged)).unwrap();
        writer
            .item(RestoreItem {
                kind: Some(restore_item::Kind::UnreadableChunk(
                    fabric_proto::v1::UnreadableChunk {
                        id: third.id.to_vec(),
                        reason: "checksum mismatch".into(),
                    },
                )),
            })
            .unwrap();
        assert_eq!(writer.chunks_from_other_copies(), 2);
        writer.finish().unwrap();
        let expected: Vec<u8> = good.iter().flat_map(|chunk| chunk.data.clone()).collect();
        assert!(std::fs::read(temp.path().join("file")).unwrap() == expected);

        // Without a fallback, or when it fails too, the error names the
        // file and the chunk.
        let temp = tempfile::tempdir().unwrap();
        let mut target = DirectoryTarget::new(temp.path(), RestorePolicy::default()).unwrap();
        let nowhere: ChunkFetcher<'_> = Box::new(|_| Err("no other copy".to_owned()));
        let mut writer = RestoreStreamWriter::new(&mut target).with_fallback(nowhere);
        writer.item(file_entry("lost", &[&first])).unwrap();
        let err = writer
            .item(RestoreItem {
                kind: Some(restore_item::Kind::UnreadableChunk(
                    fabric_proto::v1::UnreadableChunk {
                        id: first.id.to_vec(),
                        reason: "missing".into(),
                    },
                )),
            })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lost") && err.contains(&first.id.to_string()) && err.contains("missing"),
            "{err}"
        );
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
