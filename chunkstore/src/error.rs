//! The store's error type. Every variant a user can meet names what caused it:
//! the chunk id, the pack or file path, the snapshot spec or the store directory.
//!
//! Policy: a store operation returns [`StoreError`]; lower layers (pack,
//! index) have their own small errors that the store wraps with the path or
//! id it was working on.

use std::path::PathBuf;

use crate::chunker::{BadChunkParams, ChunkParams};
use crate::id::ChunkId;
use crate::index::IndexError;

/// Anything a [`crate::Store`] operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or directory of the store could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("cannot read", "cannot fsync", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The index or catalogue (sled) failed.
    #[error("index of the store in {dir}: {source}")]
    Index {
        /// The store directory.
        dir: PathBuf,
        /// The cause.
        source: IndexError,
    },
    /// A chunk's bytes do not hash to the id it was offered under.
    #[error("chunk {id}: the bytes do not hash to this id; nothing of the batch was stored")]
    ChunkMismatch {
        /// The id the chunk was offered under.
        id: ChunkId,
    },
    /// A chunk's encoded bytes (as sent by a peer) cannot be decoded, or
    /// decode to another length than announced.
    #[error("chunk {id}: {detail}; nothing of the batch was stored")]
    BadEncoding {
        /// The id the chunk was offered under.
        id: ChunkId,
        /// What is wrong.
        detail: String,
    },
    /// The store does not hold chunk `id`.
    #[error("chunk {id} is not in the store in {dir}")]
    ChunkNotFound {
        /// The chunk.
        id: ChunkId,
        /// The store directory.
        dir: PathBuf,
    },
    /// A stored chunk cannot be read back intact.
    #[error("chunk {id} in pack {pack} is corrupt: {detail}")]
    Corrupt {
        /// The chunk.
        id: ChunkId,
        /// The pack file.
        pack: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A snapshot's DAG references a chunk the store does not hold.
    #[error("snapshot {snapshot} references chunk {id} (at {path}), which is not in the store")]
    MissingChunk {
        /// The missing chunk.
        id: ChunkId,
        /// The snapshot (name or id) being committed or checked.
        snapshot: String,
        /// Where in the tree it is referenced ("/" for the root tree).
        path: String,
    },
    /// A tree chunk does not decode as a `Tree`.
    #[error("chunk {id} is not a tree: {source}")]
    BadTree {
        /// The chunk.
        id: ChunkId,
        /// The decode error.
        source: prost::DecodeError,
    },
    /// A tree chunk stored in parts whose parts cannot be joined.
    #[error("tree {id}: {source}")]
    BadTreeParts {
        /// The tree chunk.
        id: ChunkId,
        /// What is wrong with its parts.
        source: crate::tree_parts::TreePartsError,
    },
    /// A snapshot record is not usable.
    #[error("snapshot {snapshot}: {detail}")]
    BadSnapshot {
        /// Its id or name.
        snapshot: String,
        /// What is wrong.
        detail: String,
    },
    /// A snapshot offered for a commit breaks a rule of commit validation
    /// (`crate::validate`): the sender's mistake, nothing is committed.
    #[error("snapshot {snapshot} is refused: {path}: {reason}")]
    InvalidSnapshot {
        /// Its id or name, cut to a quotable length.
        snapshot: String,
        /// Where in the snapshot ("record" for the record itself, "/" for
        /// the root tree), cut to a quotable length.
        path: String,
        /// The rule it breaks.
        reason: String,
    },
    /// A commit sooner after the last snapshot of its job, host and
    /// instance than the node's `min_interval` allows.
    #[error(
        "job {job:?} of host {host:?} had a snapshot too recently: the next is allowed from {next} on (the node's min_interval)"
    )]
    TooSoon {
        /// The job.
        job: String,
        /// The host.
        host: String,
        /// When the next is allowed, UTC (ISO 8601).
        next: String,
    },
    /// A commit that would take its host over its quota on this store.
    #[error(
        "host {host:?} has {used} bytes stored here and this upload would add {adding} more: over its quota of {limit} bytes on this node (nothing was committed)"
    )]
    OverQuota {
        /// The host, cut to a quotable length.
        host: String,
        /// What its snapshots already take.
        used: u64,
        /// What this one adds.
        adding: u64,
        /// Its quota.
        limit: u64,
    },
    /// A snapshot inside its WORM window cannot be deleted.
    #[error("snapshot {id} is retained (a WORM window): it can be deleted from {until} on")]
    Retained {
        /// The snapshot's id.
        id: String,
        /// When its window ends, UTC (ISO 8601).
        until: String,
    },
    /// No snapshot matches a spec.
    #[error(
        "no snapshot matches {spec:?} (give a full id, a unique id prefix of 8+ characters, or an exact name)"
    )]
    SnapshotNotFound {
        /// The spec.
        spec: String,
    },
    /// Several snapshots match a spec.
    #[error("{spec:?} matches several snapshots: {}", candidates.join(", "))]
    Ambiguous {
        /// The spec.
        spec: String,
        /// The ids of the matches.
        candidates: Vec<String>,
    },
    /// A snapshot with this id exists already.
    #[error("a snapshot with id {id} exists already")]
    SnapshotExists {
        /// The id.
        id: String,
    },
    /// The store was created with other chunk parameters.
    #[error(
        "the store in {dir} was created with chunk parameters min={} avg={} max={}, not min={} avg={} max={}: chunk parameters cannot change after creation",
        recorded.min_size, recorded.avg_size, recorded.max_size,
        requested.min_size, requested.avg_size, requested.max_size
    )]
    ParamsMismatch {
        /// The store directory.
        dir: PathBuf,
        /// What its config.toml records.
        recorded: ChunkParams,
        /// What the caller asked for.
        requested: ChunkParams,
    },
    /// Invalid chunk parameters.
    #[error("store in {dir}: {source}")]
    BadParams {
        /// The store directory.
        dir: PathBuf,
        /// What is wrong.
        source: BadChunkParams,
    },
    /// The config file is missing or unreadable.
    #[error("{path}: {detail}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A pack file cannot be used.
    #[error("pack {path}: {detail}")]
    BadPack {
        /// The pack.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// An fsync of a pack failed earlier: the store takes no more writes
    /// until it is opened again.
    #[error("the store in {dir} refuses writes until it is reopened: {reason}")]
    WritesRefused {
        /// The store.
        dir: PathBuf,
        /// The failure that stopped writes.
        reason: String,
    },
}

impl StoreError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| StoreError::Io {
            action,
            path,
            source,
        }
    }
}
