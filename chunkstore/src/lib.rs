//! The fabric storage engine.
//!
//! Owns chunking ([`chunker`]), ids ([`id`]), and (in later modules) pack
//! files, the index, trees, snapshots, GC and verify. A plain synchronous
//! library: it must never depend on tokio or tonic; async callers run it on
//! blocking threads.

pub mod chunker;
pub mod id;
pub mod restore;
pub mod sink;
pub mod walk;

pub use chunker::{Chunk, ChunkParams, ChunkReader, Chunker};
pub use id::ChunkId;
pub use sink::{ChunkSink, ChunkSource, SinkError};
