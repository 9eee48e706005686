//! The chunk store's types and reports as API messages, and back.

use fabric_chunkstore::pack::{Codec, StoredChunk};
use fabric_chunkstore::{Chunk, ChunkId};
use fabric_proto::v1;

/// A chunk in its stored form as the API's `ChunkData` (sent as it is).
pub fn chunk_data(chunk: StoredChunk) -> v1::ChunkData {
    let encoding = match chunk.codec {
        Codec::Raw => v1::ChunkEncoding::Plain,
        Codec::Zstd => v1::ChunkEncoding::Zstd,
    };
    v1::ChunkData {
        id: chunk.id.to_vec(),
        data: chunk.stored,
        encoding: encoding as i32,
        plain_size: chunk.raw_len,
    }
}

/// Why a received `ChunkData` cannot be taken (before its bytes are decoded).
#[derive(Debug, thiserror::Error)]
pub enum ChunkDataError {
    /// The id is not 32 bytes.
    #[error("a chunk id of {0} bytes (ids are 32 bytes)")]
    BadId(usize),
    /// An encoding this node does not know.
    #[error("chunk {id}: unknown encoding {encoding}")]
    UnknownEncoding {
        /// The chunk.
        id: ChunkId,
        /// The encoding number sent.
        encoding: i32,
    },
    /// The plain bytes would exceed the limit.
    #[error("chunk {id} is {size} bytes, the limit is {limit}")]
    TooLarge {
        /// The chunk.
        id: ChunkId,
        /// Its announced plain size.
        size: u64,
        /// The largest chunk accepted.
        limit: usize,
    },
    /// Plain bytes whose length is not the announced one.
    #[error("chunk {id}: {sent} plain bytes sent, {announced} announced")]
    SizeMismatch {
        /// The chunk.
        id: ChunkId,
        /// Bytes sent.
        sent: usize,
        /// `plain_size`.
        announced: u32,
    },
}

/// The plain bytes of a received `ChunkData` (a restore, a read for the
/// unchanged-file cache), decoded and checked against its id; the error says
/// what is wrong, naming the chunk.
pub fn plain_chunk(chunk: v1::ChunkData) -> Result<Chunk, String> {
    let stored = received_chunk(chunk)?;
    let id = stored.id;
    let data = stored
        .into_plain()
        .map_err(|err| format!("the bytes of chunk {id} do not match its id: {err}"))?;
    Ok(Chunk { id, data })
}

/// A received `ChunkData` as a [`StoredChunk`] (its bytes shared, not
/// copied), its sizes checked against the largest chunk a transfer carries;
/// the error names the chunk.
pub fn received_chunk(chunk: v1::ChunkData) -> Result<StoredChunk, String> {
    stored_chunk(chunk, crate::transfer::MAX_CHUNK_BYTES).map_err(|err| err.to_string())
}

/// A received `ChunkData` as a [`StoredChunk`], its sizes checked against
/// `max_plain` (decoding allocates the announced size). The bytes are not
/// decoded or hashed here: [`StoredChunk::check`] and
/// [`StoredChunk::into_plain`] do that.
pub fn stored_chunk(chunk: v1::ChunkData, max_plain: usize) -> Result<StoredChunk, ChunkDataError> {
    let id = ChunkId::from_slice(&chunk.id).map_err(|_| ChunkDataError::BadId(chunk.id.len()))?;
    let codec = match v1::ChunkEncoding::try_from(chunk.encoding) {
        Ok(v1::ChunkEncoding::Plain) => Codec::Raw,
        Ok(v1::ChunkEncoding::Zstd) => Codec::Zstd,
        Err(_) => {
            return Err(ChunkDataError::UnknownEncoding {
                id,
                encoding: chunk.encoding,
            });
        }
    };
    let raw_len = match codec {
        Codec::Raw if chunk.plain_size == 0 => chunk.data.len(),
        Codec::Raw if chunk.plain_size as usize != chunk.data.len() => {
            return Err(ChunkDataError::SizeMismatch {
                id,
                sent: chunk.data.len(),
                announced: chunk.plain_size,
            });
        }
        _ => chunk.plain_size as usize,
    };
    if raw_len > max_plain {
        return Err(ChunkDataError::TooLarge {
            id,
            size: raw_len as u64,
            limit: max_plain,
        });
    }
    Ok(StoredChunk {
        id,
        codec,
        raw_len: raw_len as u32,
        stored: chunk.data,
    })
}

/// Store counters as `StoreStats` (without the node's health).
pub fn store_stats(stats: &fabric_chunkstore::StoreStats) -> v1::StoreStats {
    v1::StoreStats {
        chunks: stats.chunks,
        logical_bytes: stats.logical_bytes,
        stored_bytes: stats.stored_bytes,
        referenced_bytes: stats.referenced_bytes,
        dedup_ratio: stats.dedup_ratio,
        compression_ratio: stats.compression_ratio,
        packs: stats.packs,
        garbage_bytes: stats.garbage_bytes,
        snapshots: stats.snapshots,
        free_bytes: stats.fs_free_bytes,
        capacity_bytes: stats.fs_capacity_bytes,
        // The node's, not the store's: the storage service adds it.
        health: None,
    }
}

/// A verify report as `VerifyReport`.
pub fn verify_report(report: &fabric_chunkstore::VerifyReport) -> v1::VerifyReport {
    v1::VerifyReport {
        chunks_checked: report.chunks_checked,
        bytes_checked: report.bytes_checked,
        problems: report
            .problems
            .iter()
            .map(|problem| v1::VerifyProblem {
                chunk_id: problem.chunk.to_hex(),
                message: format!("{:?}: {}", problem.kind, problem.detail),
                snapshots: problem.snapshots.clone(),
                paths: problem.paths.clone(),
            })
            .collect(),
    }
}

/// A GC report as `GcReport`.
pub fn gc_report(report: &fabric_chunkstore::GcReport) -> v1::GcReport {
    v1::GcReport {
        unreferenced_chunks: report.swept_chunks + report.protected_chunks,
        swept_chunks: report.swept_chunks,
        freed_bytes: report.bytes_freed,
        packs_rewritten: report.packs_rewritten,
        packs_deleted: report.packs_deleted,
        packs_left_at_lease_end: report.packs_left_at_deadline,
        grace_s: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_chunks_survive_the_api_form() {
        let text = b"a line of text, again and again; ".repeat(100);
        for chunk in [Chunk::new(text), Chunk::new(vec![7, 1, 9])] {
            let stored = StoredChunk::encode(chunk, 3);
            let back = stored_chunk(chunk_data(stored.clone()), 1 << 20).unwrap();
            assert_eq!(back, stored);
        }
    }

    /// A node takes every byte of every upload: a received chunk's bytes
    /// must stay where the message was decoded, not be copied out of it.
    #[test]
    fn received_chunks_are_slices_of_their_message() {
        use prost::Message;
        let text = b"a line of text, again and again; ".repeat(1000);
        let chunks = [Chunk::new(text), Chunk::new(vec![7; 3000])]
            .map(|chunk| chunk_data(StoredChunk::encode(chunk, 3)));
        let message = prost::bytes::Bytes::from(
            v1::ChunkBatch {
                batch: 1,
                chunks: chunks.to_vec(),
            }
            .encode_to_vec(),
        );
        let decoded = v1::ChunkBatch::decode(message.clone()).unwrap();
        let buffer = message.as_ptr_range();
        for (chunk, sent) in decoded.chunks.into_iter().zip(&chunks) {
            let stored = stored_chunk(chunk, 1 << 20).unwrap();
            assert_eq!(stored.stored, sent.data);
            assert!(buffer.contains(&stored.stored.as_ptr()));
            stored.check().unwrap();
        }
    }

    #[test]
    fn bad_chunk_data_is_refused_naming_the_chunk() {
        let id = ChunkId::of(b"abc");
        let plain = |data: &[u8], plain_size| v1::ChunkData {
            id: id.to_vec(),
            data: data.to_vec().into(),
            encoding: v1::ChunkEncoding::Plain as i32,
            plain_size,
        };
        assert_eq!(stored_chunk(plain(b"abc", 0), 10).unwrap().raw_len, 3);
        let err = stored_chunk(plain(b"abc", 4), 10).unwrap_err();
        assert!(matches!(err, ChunkDataError::SizeMismatch { .. }));
        assert!(err.to_string().contains(&id.to_hex()));
        assert!(matches!(
            stored_chunk(plain(b"abc", 0), 2),
            Err(ChunkDataError::TooLarge {
                size: 3,
                limit: 2,
                ..
            })
        ));
        let zstd_bomb = v1::ChunkData {
            encoding: v1::ChunkEncoding::Zstd as i32,
            plain_size: u32::MAX,
            ..plain(b"abc", 0)
        };
        assert!(matches!(
            stored_chunk(zstd_bomb, 1 << 20),
            Err(ChunkDataError::TooLarge { .. })
        ));
        let unknown = v1::ChunkData {
            encoding: 9,
            ..plain(b"abc", 0)
        };
        assert!(matches!(
            stored_chunk(unknown, 10),
            Err(ChunkDataError::UnknownEncoding { encoding: 9, .. })
        ));
        let short_id = v1::ChunkData {
            id: vec![1, 2],
            ..plain(b"abc", 0)
        };
        assert!(matches!(
            stored_chunk(short_id, 10),
            Err(ChunkDataError::BadId(2))
        ));
    }
}
