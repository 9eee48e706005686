//! The seams between a backup walk, a restore and where chunks live.
//!
//! A backup walk reads files, chunks and hashes them, encodes trees, and hands
//! every chunk (data and tree alike) to a [`ChunkSink`]: the local store, or
//! the agent's uploader that offers ids to a remote node. A restore reads
//! trees and chunks from a [`ChunkSource`]: the local store or a remote node.
//! These traits are synchronous; an async caller bridges them with a channel.

use fabric_proto::v1::Tree;

use crate::chunker::Chunk;
use crate::id::ChunkId;

/// An error of a sink or a source, boxed so any transport can report its own.
pub type SinkError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Where a backup walk sends chunks. Called from several threads at once.
pub trait ChunkSink: Sync {
    /// Accept one chunk. The sink may drop it as a duplicate. It need not be
    /// durable on return, only by the end of [`ChunkSink::flush`].
    fn put_chunk(&self, chunk: Chunk) -> Result<(), SinkError>;

    /// Make every chunk accepted so far durable (before a snapshot commit).
    fn flush(&self) -> Result<(), SinkError>;
}

/// Where a restore, a copy or a walk's parent-snapshot cache reads from.
pub trait ChunkSource: Sync {
    /// The plain bytes of chunk `id`, checked against the id.
    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, SinkError>;

    /// The tree whose id is `id`, joined from its parts if it has any.
    fn get_tree(&self, id: &ChunkId) -> Result<Tree, SinkError> {
        let bytes = self.get_chunk(id)?;
        let tree = <Tree as prost::Message>::decode(bytes.as_slice())?;
        crate::tree_parts::join_parts(
            tree,
            |part| self.get_chunk(part),
            |err| format!("tree {id}: {err}").into(),
        )
    }

    /// A hint that the trees `ids` will be asked for soon (a backup walk
    /// passes the subdirectories of the directory it enters): a remote source
    /// fetches them concurrently, so a walk does not wait a round trip for
    /// every directory. The default does nothing.
    fn prefetch_trees(&self, ids: &[ChunkId]) {
        let _ = ids;
    }
}
