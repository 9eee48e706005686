//! A real in-memory chunk store for tests: both seams over one map.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::chunker::Chunk;
use crate::id::ChunkId;
use crate::sink::{ChunkSink, ChunkSource, SinkError};

/// Chunks in a map; counts what it was offered and how often it was flushed.
#[derive(Default)]
pub(crate) struct MemoryStore {
    chunks: Mutex<HashMap<ChunkId, Vec<u8>>>,
    pub(crate) puts: AtomicU64,
    pub(crate) flushes: AtomicU64,
}

impl MemoryStore {
    pub(crate) fn len(&self) -> usize {
        self.chunks.lock().expect("store lock").len()
    }

    /// Insert bytes under an id of the caller's choosing (to damage a store on purpose).
    pub(crate) fn insert_raw(&self, id: ChunkId, data: Vec<u8>) {
        self.chunks.lock().expect("store lock").insert(id, data);
    }

    /// Store a hand-made tree and return its id.
    pub(crate) fn put_tree(&self, tree: &fabric_proto::v1::Tree) -> ChunkId {
        let chunk = Chunk::new(prost::Message::encode_to_vec(tree));
        let id = chunk.id;
        self.insert_raw(id, chunk.data);
        id
    }
}

impl ChunkSink for MemoryStore {
    fn put_chunk(&self, chunk: Chunk) -> Result<(), SinkError> {
        if !chunk.id.matches(&chunk.data) {
            return Err(format!("chunk {} does not match its bytes", chunk.id).into());
        }
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.chunks
            .lock()
            .map_err(|_| "store lock poisoned")?
            .entry(chunk.id)
            .or_insert(chunk.data);
        Ok(())
    }

    fn flush(&self) -> Result<(), SinkError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl ChunkSource for MemoryStore {
    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, SinkError> {
        self.chunks
            .lock()
            .map_err(|_| "store lock poisoned")?
            .get(id)
            .cloned()
            .ok_or_else(|| format!("no chunk {id}").into())
    }
}
