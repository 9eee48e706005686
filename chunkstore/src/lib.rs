//! The fabric storage engine.
//!
//! Owns chunking ([`chunker`]), ids ([`id`]), pack files ([`pack`]), the
//! index and snapshot catalogue behind narrow traits ([`index`]: the chunk
//! index in memory and a log in [`index_table`], the catalogue in sled in
//! [`index_sled`]), the [`Store`] that ties them together with trees and
//! snapshots ([`store`]), garbage collection ([`gc`]) and verify, reindex and
//! stats ([`verify`]), listings too large for one chunk ([`tree_parts`]),
//! what a commit accepts ([`validate`]), the backup walk that turns directories into chunks and trees ([`walk`])
//! and the restore writers ([`restore`]). A plain synchronous
//! library: it must never depend on tokio or tonic; async callers run it on
//! blocking threads, through the [`sink`] traits.

pub mod chunker;
pub mod error;
pub mod gc;
pub mod id;
pub mod index;
pub mod index_sled;
pub mod index_table;
pub mod pack;
pub mod restore;
pub mod scrub;
pub mod sink;
pub mod store;
#[cfg(test)]
mod test_data;
pub mod tree_parts;
pub mod validate;
pub mod verify;
pub mod walk;

pub use chunker::{Chunk, ChunkParams, ChunkReader, Chunker, Cut};
pub use error::StoreError;
pub use gc::{DEFAULT_GC_GRACE, GcOptions, GcReport};
pub use id::ChunkId;
pub use index::{Catalog, ChunkIndex, IndexError, Location, SnapshotSource, newest_among};
pub use sink::{ChunkSink, ChunkSource, SinkError};
pub use store::{CommitGuards, PutStats, Store, StoreConfig, stored_by_host};
pub use verify::{
    IndexCounts, ProblemKind, ReindexReport, StoreStats, VerifyOptions, VerifyProblem, VerifyReport,
};
