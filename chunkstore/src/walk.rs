//! The backup walk: from include paths on the local file system to a root
//! tree id, every data and tree chunk handed to a [`ChunkSink`].
//!
//! Owns the reading side of a backup: path selection (includes, exclude
//! globs, file system boundaries, virtual and network file systems), the
//! parent-snapshot cache (a file whose size, mtime, ctime and inode are
//! unchanged is not read; a directory whose entries are all unchanged keeps
//! the parent's tree id, so an unchanged re-backup stores nothing), parallel
//! read/chunk/hash of files (a sparse file's holes are chunked as zeros
//! without being read, and runs of zeros without being hashed: see
//! [`Chunker::feed_zeros`]), the metadata
//! recorded with each entry (link counts, extended attributes), and tree
//! encoding. The local store, the push agent and the pull source all call
//! [`backup`]; what happens to chunks is the sink's business.
//!
//! It must never hold a whole file in memory (each file in flight streams
//! through a [`Chunker`], at most one per thread), never follow a symlink
//! (they are recorded as symlinks), and never write to the file system.
//!
//! Threads and memory: `threads` walk threads each list directories and
//! read one file at a time. A file's boundaries are found on its thread; the
//! hashes of its chunks are computed there too, or, with hash-ahead on
//! ([`BackupOptions::hash_ahead_bytes`]), by a second pool of as many
//! hashing threads while the file's thread reads on (`hash_ahead.rs`), so
//! one large file keeps every core busy. Either way each file hands its
//! chunks to the sink in the order they were cut, from its own thread. The
//! bytes a walk thread holds for the file it reads are at most
//! [`BackupOptions::bytes_per_thread`]: the read buffer
//! ([`READ_BUFFER_SIZE`]), the chunker's buffer (the maximum chunk size
//! and a quarter more, [`crate::chunker::pending_limit`]) and the chunks
//! cut and not yet handed to the sink (one chunk, or `hash_ahead_bytes`
//! with hash-ahead on). A thread waiting for hashes
//! blocks; it never starts another file meanwhile.
//!
//! Layout: like restic, the root tree mirrors the absolute paths from `/`.
//! Backing up `/a/b/src` gives root -> `a` -> `b` -> `src` -> contents, the
//! intermediate directories with their name, mode and owner (no times, so an
//! unchanged include keeps the same root) and only the included children.
//!
//! Policy for problems while reading (each becomes a line of
//! [`BackupOutcome::warnings`] naming the path, never a failure):
//! - a file or directory that vanishes before it is read is left out;
//! - a file whose size or mtime changed while it was read is kept as read
//!   (its size is the bytes read, its metadata the one seen when opened, so
//!   the next backup reads it again);
//! - a file that cannot be opened (or an entry that cannot be examined) for
//!   lack of permission is left out (a backup of `/` as a normal user should
//!   not fail on one unreadable file);
//! - a directory that cannot be listed for lack of permission is kept with
//!   its metadata and no contents;
//! - a directory replaced by a file or a symlink between being examined and
//!   being listed is left out (a symlink is never followed);
//! - an unreadable parent-snapshot tree means its files are read again.
//!
//! Any other I/O error (e.g. EIO in the middle of a file), a sink error or an
//! include path that does not exist fails the backup, naming the path; so
//! does an include glob pattern (expanded here, at walk time, in sorted
//! order) that matches nothing, naming the pattern.

mod examine;
mod hash_ahead;
mod holes;
mod mounts;
mod xattrs;

pub use mounts::{MountInfo, is_skipped_fs_type, parse_mountinfo, skipped_mount_points};

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use fabric_proto::v1::{EntryKind, ExtendedAttribute, SnapshotStats, Tree, TreeEntry};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use rayon::prelude::*;

use crate::chunker::{BadChunkParams, Chunk, ChunkParams, Chunker, Cut};
use crate::id::ChunkId;
use crate::sink::{ChunkSink, ChunkSource, SinkError};
use examine::{EntryStat, EntryType, OpenDirectory, nanos};
use hash_ahead::{Ahead, HashPool};
use holes::Holes;
use xattrs::XattrSource;

/// Bytes asked of the file system per read of a large file.
pub const READ_BUFFER_SIZE: usize = 256 * 1024;

/// The default of [`BackupOptions::hash_ahead_bytes`]: 16 MiB, four
/// maximum-size chunks of the default parameters (two windows of two, so a
/// window of average chunks is hashed on several threads). On two busy
/// cores 8, 16 and 32 MiB measured alike (`chunkstore-bench walk`); more
/// cores want larger windows, which cost memory per walk thread.
pub const DEFAULT_HASH_AHEAD_BYTES: usize = 16 << 20;

/// Zeros read in a row are fed to the chunker (and the progress reported)
/// at least this often.
const ZERO_RUN_REPORTED: u64 = 64 * 1024 * 1024;

/// The extended attributes of `path` (not following a symlink), sorted by
/// name, as a walk records them: none on a file system without them.
pub fn extended_attributes(path: &Path) -> io::Result<Vec<ExtendedAttribute>> {
    xattrs::read(XattrSource::Path(path))
}

/// What to back up and how.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    /// Paths to back up; relative ones are made absolute against the
    /// current directory (lexically: `..` is resolved without following symlinks).
    /// One that does not exist as written and holds `*`, `?` or `[` is a
    /// glob pattern (the `glob` crate's syntax, as a shell expands it: a
    /// wildcard stays within a path component and matches a leading `.`
    /// only when written, `**` spans directories), expanded at walk time;
    /// a pattern matching nothing fails the backup.
    pub includes: Vec<PathBuf>,
    /// Glob patterns (globset syntax; `*` stays within a path component,
    /// `**` crosses them) matched against each entry's absolute path and
    /// against its file name, so `*.tmp` and `/home/*/.cache` both work. An
    /// excluded directory is not descended. Include paths themselves are
    /// never excluded.
    pub excludes: Vec<String>,
    /// Do not descend into directories on another device than their
    /// include path (the mount point itself is kept, empty).
    pub one_file_system: bool,
    /// FastCDC parameters: the store's.
    pub chunk_params: ChunkParams,
    /// Threads reading and chunking files; 0 means one per core. With
    /// hash-ahead on, as many threads again hash chunks.
    pub threads: usize,
    /// Bytes of one file's chunks that may be cut and not yet handed to the
    /// sink while they are hashed on other threads ("hash-ahead"), per
    /// file being read; the chunk being cut counts. Half of it is one
    /// window of chunks hashed in parallel while the file's thread cuts the
    /// next window. Below twice `chunk_params.max_size` (two windows of one
    /// chunk), 0 included, hash-ahead is off: each chunk is hashed on the
    /// file's thread as it is cut, and one chunk is held. Chunks, ids and
    /// their order are the same either way.
    ///
    /// What a walk holds per thread, at most, is
    /// [`BackupOptions::bytes_per_thread`]; bytes handed to the sink are the
    /// sink's. Default: [`DEFAULT_HASH_AHEAD_BYTES`].
    pub hash_ahead_bytes: usize,
}

impl Default for BackupOptions {
    fn default() -> Self {
        Self {
            includes: Vec::new(),
            excludes: Vec::new(),
            one_file_system: false,
            chunk_params: ChunkParams::default(),
            threads: 0,
            hash_ahead_bytes: DEFAULT_HASH_AHEAD_BYTES,
        }
    }
}

impl BackupOptions {
    /// Whether chunks are hashed ahead on other threads (see
    /// [`BackupOptions::hash_ahead_bytes`]).
    pub fn hashes_ahead(&self) -> bool {
        hash_ahead_fits(self.chunk_params.max_size as usize, self.hash_ahead_bytes)
    }

    /// The most bytes of file content one walk thread holds while reading a
    /// file: [`thread_bytes`] for these options. A walk holds this times
    /// `threads` (the hashing threads hold only the windows counted here),
    /// plus metadata (trees, names) and whatever the sink keeps.
    pub fn bytes_per_thread(&self) -> usize {
        thread_bytes(self.chunk_params.max_size as usize, self.hash_ahead_bytes)
    }
}

/// The most bytes of file content one walk thread holds while it reads a
/// file, with chunks of at most `max_chunk` bytes and `hash_ahead_bytes` of
/// hash-ahead (on from two largest chunks, see
/// [`BackupOptions::hash_ahead_bytes`]): its read buffer
/// ([`READ_BUFFER_SIZE`]), the chunker's pending bytes (it cuts once
/// [`crate::chunker::pending_limit`] are pending, so they fill that much),
/// and the chunks cut and not yet handed to the sink (one chunk, or the
/// hash-ahead windows). A backup's memory budget counts its walk threads with this.
pub fn thread_bytes(max_chunk: usize, hash_ahead_bytes: usize) -> usize {
    let cut = if hash_ahead_fits(max_chunk, hash_ahead_bytes) {
        hash_ahead_bytes
    } else {
        max_chunk
    };
    READ_BUFFER_SIZE + crate::chunker::pending_limit(max_chunk) + cut
}

/// Whether `hash_ahead_bytes` holds the two windows of chunks hashing
/// ahead needs (each up to twice the largest chunk's worth, cut at once):
/// below that the walk hashes on the file's own thread.
fn hash_ahead_fits(max_chunk: usize, hash_ahead_bytes: usize) -> bool {
    hash_ahead_bytes >= 2 * max_chunk
}

/// The previous snapshot of the same source: files whose size, mtime, ctime
/// and inode are unchanged reuse its chunk lists without being read.
#[derive(Clone, Copy)]
pub struct ParentSnapshot<'a> {
    /// Where the parent's trees are read.
    pub source: &'a dyn ChunkSource,
    /// The parent's root tree.
    pub root: ChunkId,
}

/// The result of a backup.
#[derive(Clone, Debug)]
pub struct BackupOutcome {
    /// The root tree: the snapshot's content.
    pub root: ChunkId,
    /// Counters; `new_*` and `stored_bytes` are left 0 for the sink to fill.
    pub stats: SnapshotStats,
    /// Problems met while reading, one line each, naming the path.
    pub warnings: Vec<String>,
    /// Bytes of zeros (sparse files' holes, not read, and zeros read) that
    /// went into whole chunks of zeros without being hashed; they count in
    /// `stats.bytes_read`.
    pub zero_bytes_skipped: u64,
}

/// Progress of a running backup, reported after every chunk, every file read
/// and every directory.
#[derive(Clone, Copy, Debug)]
pub struct Progress<'a> {
    /// Regular files done so far (read or reused).
    pub files: u64,
    /// Files reused from the parent snapshot without being read.
    pub files_unchanged: u64,
    /// Directories listed so far.
    pub dirs: u64,
    /// Bytes of file content read so far.
    pub bytes_read: u64,
    /// The file or directory this report is about.
    pub current_path: &'a Path,
}

/// What makes a backup fail. Each variant names the path or input.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    /// Nothing to back up.
    #[error("no include paths given")]
    NoIncludes,
    /// The chunk parameters are unusable.
    #[error(transparent)]
    ChunkParams(#[from] BadChunkParams),
    /// An exclude pattern is not a valid glob.
    #[error("bad exclude pattern {pattern:?}: {source}")]
    BadExclude {
        /// The pattern as given.
        pattern: String,
        /// Why globset refused it.
        source: globset::Error,
    },
    /// The worker threads could not be started.
    #[error("starting {threads} backup threads: {source}")]
    ThreadPool {
        /// Threads asked for.
        threads: usize,
        /// Rayon's error.
        source: rayon::ThreadPoolBuildError,
    },
    /// An include glob pattern is not valid.
    #[error("bad include pattern {pattern:?}: {source}")]
    BadIncludePattern {
        /// The pattern, made absolute.
        pattern: String,
        /// Why the glob crate refused it.
        source: glob::PatternError,
    },
    /// An include glob pattern matches no path.
    #[error("include pattern {pattern:?} matches nothing")]
    NoMatch {
        /// The pattern, made absolute.
        pattern: String,
    },
    /// An include path, or a directory on the way to it, is missing or not a directory.
    #[error("include path {path}: {reason}")]
    BadInclude {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Reading the file system failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The path being read.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The sink refused a chunk.
    #[error("storing a chunk of {path}: {source}")]
    Sink {
        /// The file or directory the chunk belongs to.
        path: PathBuf,
        /// The sink's error.
        source: SinkError,
    },
    /// The sink could not make the chunks durable.
    #[error("flushing the chunk sink: {0}")]
    Flush(SinkError),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> WalkError + '_ {
    move |source| WalkError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `path` made absolute and normalised lexically (`.` dropped, `..` pops).
fn absolute(path: &Path) -> Result<PathBuf, WalkError> {
    let joined = std::path::absolute(path).map_err(io_error(path))?;
    let mut out = PathBuf::from("/");
    for component in joined.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(out)
}

/// Whether `text` holds a character the glob crate treats as a wildcard.
fn has_glob_meta(text: &str) -> bool {
    text.contains(['*', '?', '['])
}

/// `includes` made absolute, with glob patterns replaced by the paths they
/// match (sorted). A path that exists as written is taken literally even
/// if it holds glob characters (a directory named `logs[1]`); a missing
/// path without them is kept, for the walk to fail naming it.
fn expand_includes(includes: &[PathBuf]) -> Result<Vec<PathBuf>, WalkError> {
    // Shell expansion, as B1000's rsync command line got it.
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: true,
    };
    let mut expanded = Vec::with_capacity(includes.len());
    for include in includes {
        let path = absolute(include)?;
        let pattern = match path.to_str() {
            Some(text) if has_glob_meta(text) && std::fs::symlink_metadata(&path).is_err() => {
                text.to_owned()
            }
            _ => {
                expanded.push(path);
                continue;
            }
        };
        let paths =
            glob::glob_with(&pattern, options).map_err(|source| WalkError::BadIncludePattern {
                pattern: pattern.clone(),
                source,
            })?;
        let mut matched = Vec::new();
        for found in paths {
            // A directory on the way that cannot be listed: the pattern
            // cannot be expanded faithfully.
            let path = found.map_err(|err| WalkError::Io {
                path: err.path().to_owned(),
                source: io::Error::from(err),
            })?;
            matched.push(path);
        }
        if matched.is_empty() {
            return Err(WalkError::NoMatch { pattern });
        }
        matched.sort();
        expanded.extend(matched);
    }
    Ok(expanded)
}

/// The include paths as a tree of path components from `/`.
#[derive(Default)]
struct IncludeNode {
    /// This path is included whole (everything below is backed up).
    whole: bool,
    children: BTreeMap<Vec<u8>, IncludeNode>,
}

impl IncludeNode {
    fn insert(&mut self, path: &Path) {
        let mut node = self;
        for component in path.components() {
            if node.whole {
                return;
            }
            if let Component::Normal(part) = component {
                node = node.children.entry(part.as_bytes().to_vec()).or_default();
            }
        }
        node.whole = true;
        node.children.clear();
    }
}

/// A tree entry with the metadata of `stat` (no content fields yet).
fn entry_from(name: Vec<u8>, kind: EntryKind, stat: &EntryStat) -> TreeEntry {
    TreeEntry {
        name,
        kind: kind as i32,
        mode: stat.mode,
        uid: stat.uid,
        gid: stat.gid,
        mtime_ns: stat.mtime_ns,
        ctime_ns: stat.ctime_ns,
        inode: stat.inode,
        device: stat.device,
        ..TreeEntry::default()
    }
}

/// `path/name`, allocated once.
fn child_path(path: &Path, name: &[u8]) -> PathBuf {
    let mut child = PathBuf::with_capacity(path.as_os_str().len() + 1 + name.len());
    child.push(path);
    child.push(OsStr::from_bytes(name));
    child
}

/// The entry named `name` in `tree`, if any (entries are sorted by name).
fn find<'t>(tree: Option<&'t Tree>, name: &[u8]) -> Option<&'t TreeEntry> {
    let entries = &tree?.entries;
    entries
        .binary_search_by(|entry| entry.name.as_slice().cmp(name))
        .ok()
        .map(|index| &entries[index])
}

/// The subtree id of a parent snapshot's entry, if it is a directory with one.
fn parent_subtree(entry: Option<&TreeEntry>) -> Option<ChunkId> {
    let entry = entry.filter(|entry| entry.kind == EntryKind::Dir as i32)?;
    ChunkId::from_slice(&entry.subtree_id).ok()
}

/// What decides whether a new entry is the same as the parent snapshot's
/// entry of that name, kept before the walk moves that entry's chunk ids
/// into the new one.
///
/// Chunk ids and extended attributes are not compared: the walk reuses the
/// parent's exactly when kind, size, mtime, ctime and inode are unchanged
/// (attributes: kind, inode and ctime), which this compares. A symlink's
/// target cannot change without a new ctime either, but it is compared all
/// the same (symlinks are few).
struct SameEntry {
    kind: i32,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    inode: u64,
    device: u64,
    links: u64,
    /// Empty but for directories and symlinks: copying them allocates
    /// nothing for files.
    subtree_id: Vec<u8>,
    symlink_target: Vec<u8>,
}

impl SameEntry {
    fn of(entry: &TreeEntry) -> Self {
        Self {
            kind: entry.kind,
            mode: entry.mode,
            uid: entry.uid,
            gid: entry.gid,
            size: entry.size,
            mtime_ns: entry.mtime_ns,
            ctime_ns: entry.ctime_ns,
            inode: entry.inode,
            device: entry.device,
            links: entry.links,
            subtree_id: entry.subtree_id.clone(),
            symlink_target: entry.symlink_target.clone(),
        }
    }

    fn matches(&self, entry: &TreeEntry) -> bool {
        self.kind == entry.kind
            && self.mode == entry.mode
            && self.uid == entry.uid
            && self.gid == entry.gid
            && self.size == entry.size
            && self.mtime_ns == entry.mtime_ns
            && self.ctime_ns == entry.ctime_ns
            && self.inode == entry.inode
            && self.device == entry.device
            && self.links == entry.links
            && same_bytes(&self.subtree_id, &entry.subtree_id)
            && same_bytes(&self.symlink_target, &entry.symlink_target)
    }
}

/// `a == b`, but two empty byte strings compare without calling `memcmp`.
/// An empty `Vec`'s pointer is dangling, and glibc's AVX-512 `memcmp` reads
/// it with a masked load whose fault suppression costs a microcode assist:
/// about 100 ns per call measured here, against under 1 ns for the length
/// check. An unchanged re-backup makes two such comparisons per file.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && (a.is_empty() || a == b)
}

/// Pair each of `items` (sorted by name) with the entry of the same name in
/// the parent snapshot's `tree` (sorted by name too), moved out of it.
fn with_parent_entries<T>(
    items: impl IntoIterator<Item = (Vec<u8>, T)>,
    tree: Option<Tree>,
) -> Vec<(Vec<u8>, T, Option<TreeEntry>)> {
    let mut previous = tree
        .map(|tree| tree.entries)
        .unwrap_or_default()
        .into_iter()
        .peekable();
    items
        .into_iter()
        .map(|(name, item)| {
            while previous
                .next_if(|entry| entry.name.as_slice() < name.as_slice())
                .is_some()
            {}
            let parent_entry = previous.next_if(|entry| entry.name == name);
            (name, item, parent_entry)
        })
        .collect()
}

#[derive(Default)]
struct Counters {
    files: AtomicU64,
    files_unchanged: AtomicU64,
    dirs: AtomicU64,
    total_bytes: AtomicU64,
    bytes_read: AtomicU64,
    zero_bytes_skipped: AtomicU64,
    chunks: AtomicU64,
}

/// One backup in progress; shared by the worker threads.
struct Walk<'a> {
    chunk_params: ChunkParams,
    /// Hashes the chunks of files when hash-ahead is on.
    hash_pool: Option<HashPool>,
    one_file_system: bool,
    excludes: GlobSet,
    /// Mount points of skipped file system types, when they are skipped.
    skipped_mounts: HashMap<PathBuf, String>,
    sink: &'a dyn ChunkSink,
    parent: Option<&'a dyn ChunkSource>,
    progress: &'a (dyn Fn(&Progress<'_>) + Sync),
    counters: Counters,
    warnings: Mutex<Vec<String>>,
}

/// Where a directory sits relative to its include path.
#[derive(Clone, Copy)]
struct Below {
    /// The device of the include path.
    device: u64,
}

impl Walk<'_> {
    fn warn(&self, warning: String) {
        tracing::warn!("{warning}");
        match self.warnings.lock() {
            Ok(mut warnings) => warnings.push(warning),
            Err(poisoned) => poisoned.into_inner().push(warning),
        }
    }

    /// The extended attributes of `path` (whose new entry is `entry`): the
    /// parent snapshot's when it is the same inode with the same ctime
    /// (setting an attribute changes the ctime), else read from `source`.
    fn xattrs(
        &self,
        path: &Path,
        entry: &TreeEntry,
        parent: Option<&TreeEntry>,
        source: XattrSource<'_>,
    ) -> Vec<ExtendedAttribute> {
        if let Some(previous) = parent
            && previous.kind == entry.kind
            && previous.inode == entry.inode
            && previous.ctime_ns == entry.ctime_ns
        {
            return previous.xattrs.clone();
        }
        self.read_xattrs(path, source)
    }

    fn read_xattrs(&self, path: &Path, source: XattrSource<'_>) -> Vec<ExtendedAttribute> {
        xattrs::read(source).unwrap_or_else(|err| {
            self.warn(format!(
                "{}: extended attributes unreadable ({err}); recorded without them",
                path.display()
            ));
            Vec::new()
        })
    }

    fn report(&self, path: &Path) {
        (self.progress)(&Progress {
            files: self.counters.files.load(Ordering::Relaxed),
            files_unchanged: self.counters.files_unchanged.load(Ordering::Relaxed),
            dirs: self.counters.dirs.load(Ordering::Relaxed),
            bytes_read: self.counters.bytes_read.load(Ordering::Relaxed),
            current_path: path,
        });
    }

    /// Whether the entry `name` of the directory `directory` is excluded.
    fn excluded(&self, directory: &Path, name: &[u8]) -> bool {
        !self.excludes.is_empty()
            && (self.excludes.is_match(child_path(directory, name))
                || self.excludes.is_match(Path::new(OsStr::from_bytes(name))))
    }

    /// Hand `chunk`, a chunk of `path`, to the sink.
    fn put(&self, path: &Path, chunk: Chunk) -> Result<(), WalkError> {
        self.sink
            .put_chunk(chunk)
            .map_err(|source| WalkError::Sink {
                path: path.to_owned(),
                source,
            })
    }

    fn store_tree(&self, path: &Path, tree: &Tree) -> Result<ChunkId, WalkError> {
        self.counters.dirs.fetch_add(1, Ordering::Relaxed);
        // A listing too large for one chunk goes in parts, before the tree
        // chunk that lists them.
        let (listing, parts) = crate::tree_parts::tree_chunks(tree);
        for part in parts {
            self.put(path, part)?;
        }
        let id = listing.id;
        self.put(path, listing)?;
        Ok(id)
    }

    /// The id of the parent snapshot's tree `parent`, without encoding,
    /// hashing or storing anything: the directory is the same as then, so
    /// its tree would be the same bytes, already in the store the parent
    /// came from (the commit checks that).
    fn same_tree(&self, parent: ChunkId) -> ChunkId {
        self.counters.dirs.fetch_add(1, Ordering::Relaxed);
        parent
    }

    /// The parent snapshot's tree for `path` (below the entry `entry`) and
    /// its id, if it can be read.
    fn parent_tree(&self, path: &Path, entry: Option<&TreeEntry>) -> Option<(ChunkId, Tree)> {
        let source = self.parent?;
        let id = parent_subtree(entry)?;
        Some((id, self.parent_tree_by_id(path, id, source)?))
    }

    fn parent_tree_by_id(
        &self,
        path: &Path,
        id: ChunkId,
        source: &dyn ChunkSource,
    ) -> Option<Tree> {
        match source.get_tree(&id) {
            Ok(tree) => {
                // The subdirectories are next: let a remote source fetch
                // their trees while this directory is listed.
                let subtrees: Vec<ChunkId> = tree
                    .entries
                    .iter()
                    .filter(|entry| entry.kind == EntryKind::Dir as i32)
                    .filter_map(|entry| ChunkId::from_slice(&entry.subtree_id).ok())
                    .collect();
                if !subtrees.is_empty() {
                    source.prefetch_trees(&subtrees);
                }
                Some(tree)
            }
            Err(err) => {
                self.warn(format!(
                    "{}: parent snapshot tree {id} unreadable ({err}); reading its files again",
                    path.display()
                ));
                None
            }
        }
    }

    /// The tree of the intermediate directories and include paths below `node`.
    fn include_tree(
        &self,
        node: &IncludeNode,
        path: &Path,
        parent: Option<(ChunkId, Tree)>,
    ) -> Result<ChunkId, WalkError> {
        let (parent_id, parent) = parent.unzip();
        let entries: Vec<Option<TreeEntry>> = node
            .children
            .par_iter()
            .map(|(name, child)| {
                let child_path = path.join(OsStr::from_bytes(name));
                let parent_entry = find(parent.as_ref(), name);
                if child.whole {
                    let meta = std::fs::symlink_metadata(&child_path).map_err(|err| {
                        WalkError::BadInclude {
                            path: child_path.clone(),
                            reason: err.to_string(),
                        }
                    })?;
                    let below = Below { device: meta.dev() };
                    let parent_entry = parent_entry.cloned();
                    let stat = EntryStat::from(&meta);
                    self.entry(&child_path, name.clone(), &stat, parent_entry, below, false)
                } else {
                    // A directory on the way to an include path; following a
                    // symlink here (e.g. /lib -> usr/lib) is what the user meant.
                    let meta =
                        std::fs::metadata(&child_path).map_err(|err| WalkError::BadInclude {
                            path: child_path.clone(),
                            reason: err.to_string(),
                        })?;
                    if !meta.is_dir() {
                        return Err(WalkError::BadInclude {
                            path: child_path,
                            reason: "not a directory, but an include path lies below it".to_owned(),
                        });
                    }
                    let parent_tree = self.parent_tree(&child_path, parent_entry);
                    // Recorded by name, mode and owner only: its times and
                    // inode change with activity outside the backup (a new
                    // file in /tmp), which would change the root of every
                    // snapshot and send new trees for unchanged data.
                    let mut entry = TreeEntry {
                        name: name.clone(),
                        kind: EntryKind::Dir as i32,
                        mode: meta.mode(),
                        uid: meta.uid(),
                        gid: meta.gid(),
                        ..Default::default()
                    };
                    entry.subtree_id = self.include_tree(child, &child_path, parent_tree)?.to_vec();
                    Ok(Some(entry))
                }
            })
            .collect::<Result<_, _>>()?;
        let tree = Tree {
            entries: entries.into_iter().flatten().collect(),
            parts: Vec::new(),
        };
        match parent_id {
            Some(id) if parent.as_ref() == Some(&tree) => Ok(self.same_tree(id)),
            _ => self.store_tree(path, &tree),
        }
    }

    /// The entry for `path` (already `lstat`ed as `meta`), or None when it is
    /// left out (vanished, unreadable). `is_below_include` is false for an
    /// include path itself, which is never excluded nor skipped.
    fn entry(
        &self,
        path: &Path,
        name: Vec<u8>,
        stat: &EntryStat,
        parent: Option<TreeEntry>,
        below: Below,
        is_below_include: bool,
    ) -> Result<Option<TreeEntry>, WalkError> {
        match stat.kind {
            EntryType::File => self.file(path, name, stat, parent),
            EntryType::Dir => {
                let mut entry = entry_from(name, EntryKind::Dir, stat);
                entry.xattrs = self.xattrs(path, &entry, parent.as_ref(), XattrSource::Path(path));
                let descend = !is_below_include || self.may_descend(path, stat, below);
                let parent_tree = if descend {
                    parent_subtree(parent.as_ref())
                } else {
                    None
                };
                match self.directory(path, descend, parent_tree, below)? {
                    Some(id) => {
                        entry.subtree_id = id.to_vec();
                        Ok(Some(entry))
                    }
                    None => Ok(None),
                }
            }
            EntryType::Symlink => match std::fs::read_link(path) {
                Ok(target) => {
                    let mut entry = entry_from(name, EntryKind::Symlink, stat);
                    entry.symlink_target = target.into_os_string().into_vec();
                    entry.xattrs =
                        self.xattrs(path, &entry, parent.as_ref(), XattrSource::Path(path));
                    Ok(Some(entry))
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    self.warn(format!("{}: vanished before it was read", path.display()));
                    Ok(None)
                }
                Err(err) => Err(io_error(path)(err)),
            },
            EntryType::Other => {
                let mut entry = entry_from(name, EntryKind::Other, stat);
                entry.xattrs = self.xattrs(path, &entry, parent.as_ref(), XattrSource::Path(path));
                Ok(Some(entry))
            }
        }
    }

    /// Whether to list the directory `path` below an include path.
    fn may_descend(&self, path: &Path, stat: &EntryStat, below: Below) -> bool {
        if self.one_file_system && stat.device != below.device {
            tracing::debug!(path = %path.display(), "another file system: kept empty");
            return false;
        }
        if let Some(fs_type) = self.skipped_mounts.get(path) {
            tracing::debug!(path = %path.display(), fs_type, "skipped file system type: kept empty");
            return false;
        }
        true
    }

    /// Store the listing of directory `path` (empty when `descend` is false
    /// or it cannot be listed), its files compared with the parent
    /// snapshot's tree `parent`; None when it vanished.
    fn directory(
        &self,
        path: &Path,
        descend: bool,
        parent: Option<ChunkId>,
        below: Below,
    ) -> Result<Option<ChunkId>, WalkError> {
        let listing = if descend {
            match OpenDirectory::open(path).and_then(|dir| Ok((dir.names()?, dir))) {
                Ok(listing) => Some(listing),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    self.warn(format!("{}: vanished before it was read", path.display()));
                    return Ok(None);
                }
                Err(err) if matches!(err.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) => {
                    self.warn(format!(
                        "{}: no longer a directory when listed; left out",
                        path.display()
                    ));
                    return Ok(None);
                }
                Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
                    self.warn(format!(
                        "{}: cannot list ({err}); kept as an empty directory",
                        path.display()
                    ));
                    None
                }
                Err(err) => return Err(io_error(path)(err)),
            }
        } else {
            None
        };
        // Examined relative to the open directory (no path lookup from `/`
        // for every entry), all before any subdirectory is entered, so a
        // deep tree does not hold a directory open per level.
        // Excluded entries are None: a map, unlike a filter, lets rayon
        // write the results in place instead of gathering them in pieces.
        let examined: Vec<Option<(Vec<u8>, io::Result<EntryStat>)>> = match listing {
            None => Vec::new(),
            Some((mut names, dir)) => {
                names.sort_unstable();
                names
                    .into_par_iter()
                    .map(|name| {
                        if self.excluded(path, &name) {
                            return None;
                        }
                        let stat = dir.examine(&name);
                        Some((name, stat))
                    })
                    .collect()
            }
        };
        // Asked for only now, so that a remote source's round trip (or its
        // prefetch) overlaps the listing above.
        let parent_id = parent;
        let parent = parent.and_then(|id| self.parent_tree_by_id(path, id, self.parent?));
        let parent_entries = parent.as_ref().map(|tree| tree.entries.len());
        let paired = with_parent_entries(examined.into_iter().flatten(), parent);
        // Each entry, and whether it is the parent's entry of that name
        // unchanged.
        let entries: Vec<Option<(TreeEntry, bool)>> = paired
            .into_par_iter()
            .map(|(name, stat, parent_entry)| {
                let stat = match stat {
                    Ok(stat) => stat,
                    Err(err) => return self.unexaminable(&child_path(path, &name), err),
                };
                let was = parent_entry.as_ref().map(SameEntry::of);
                let entry = match parent_entry {
                    // Most files of a re-backup: no path to make, nothing to read.
                    Some(previous)
                        if stat.kind == EntryType::File && file_unchanged(&stat, &previous) =>
                    {
                        Some(self.reuse_file(name, &stat, previous))
                    }
                    parent_entry => {
                        let child_path = child_path(path, &name);
                        self.entry(&child_path, name, &stat, parent_entry, below, true)?
                    }
                };
                Ok(entry.map(|entry| {
                    let same = was.is_some_and(|was| was.matches(&entry));
                    (entry, same)
                }))
            })
            .collect::<Result<_, _>>()?;
        // Unchanged files are not reported one by one.
        self.report(path);
        // Every entry of the parent's tree, each unchanged, and nothing else.
        let unchanged = parent_entries == Some(entries.len())
            && entries.iter().all(|entry| matches!(entry, Some((_, true))));
        if let Some(id) = parent_id.filter(|_| unchanged) {
            return Ok(Some(self.same_tree(id)));
        }
        let tree = Tree {
            entries: entries
                .into_iter()
                .flatten()
                .map(|(entry, _)| entry)
                .collect(),
            parts: Vec::new(),
        };
        self.store_tree(path, &tree).map(Some)
    }

    /// The entry of the regular file `path`: reused from the parent when
    /// unchanged, else read, chunked and sent to the sink.
    fn file(
        &self,
        path: &Path,
        name: Vec<u8>,
        stat: &EntryStat,
        parent: Option<TreeEntry>,
    ) -> Result<Option<TreeEntry>, WalkError> {
        if let Some(previous) = parent
            && file_unchanged(stat, &previous)
        {
            return Ok(Some(self.reuse_file(name, stat, previous)));
        }
        let mut entry = entry_from(name, EntryKind::File, stat);

        // O_NOFOLLOW: the path was a regular file when listed; if it has
        // been replaced by a symlink since, do not read through it.
        // O_NONBLOCK: nor block forever if it has become a FIFO.
        let opened = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path);
        let file = match opened {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                self.warn(format!("{}: vanished before it was read", path.display()));
                return Ok(None);
            }
            Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
                self.warn(format!(
                    "{}: cannot be read ({err}); left out",
                    path.display()
                ));
                return Ok(None);
            }
            Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
                self.warn(format!(
                    "{}: replaced by a symlink while the backup ran; left out",
                    path.display()
                ));
                return Ok(None);
            }
            Err(err) => return Err(io_error(path)(err)),
        };
        let opened_meta = file.metadata().map_err(io_error(path))?;
        if !opened_meta.is_file() {
            self.warn(format!(
                "{}: no longer a regular file when opened; left out",
                path.display()
            ));
            return Ok(None);
        }
        // Record what was opened, not what was listed, in case it was replaced in between.
        let mut entry = entry_from(
            std::mem::take(&mut entry.name),
            EntryKind::File,
            &EntryStat::from(&opened_meta),
        );
        entry.links = opened_meta.nlink();
        entry.xattrs = self.read_xattrs(path, XattrSource::File(&file));
        // Fewer blocks than the size needs: there are holes to skip (or the
        // file system compresses, and seeking for holes finds none).
        let may_have_holes = opened_meta.blocks().saturating_mul(512) < opened_meta.len();
        let read = self.read_file(path, &file, opened_meta.len(), may_have_holes, &mut entry)?;
        entry.size = read;
        let after = file.metadata().map_err(io_error(path))?;
        if after.len() != opened_meta.len()
            || read != opened_meta.len()
            || nanos(after.mtime(), after.mtime_nsec()) != entry.mtime_ns
        {
            self.warn(format!(
                "{}: changed while it was read; kept as read ({read} bytes)",
                path.display()
            ));
        }
        Ok(Some(self.file_done(path, entry)))
    }

    /// Chunk the content of `file`, send the chunks, record their ids in
    /// `entry`; returns the bytes read (holes included). `size_hint` is the
    /// size when opened. When `may_have_holes`, the holes the file system
    /// reports are fed to the chunker as zeros without being read, which
    /// cuts the same chunks as reading them would.
    fn read_file(
        &self,
        path: &Path,
        file: &File,
        size_hint: u64,
        may_have_holes: bool,
        entry: &mut TreeEntry,
    ) -> Result<u64, WalkError> {
        let mut read: u64 = 0;
        let min_size = u64::from(self.chunk_params.min_size);
        let mut out = FileChunks {
            walk: self,
            path,
            entry,
            ahead: Ahead::new(self.hash_pool.as_ref(), self.chunk_params.max_size as usize),
            failed: None,
        };
        let mut chunker = None;
        if size_hint < min_size {
            // A file shorter than the minimum chunk size is one chunk
            // whatever FastCDC does, so small files skip the chunker and its
            // buffers (most files of a typical tree).
            let mut data = Vec::with_capacity(size_hint as usize + 1);
            file.take(min_size)
                .read_to_end(&mut data)
                .map_err(io_error(path))?;
            if (data.len() as u64) < min_size {
                if !data.is_empty() {
                    read = data.len() as u64;
                    self.send(path, Chunk::new(data), out.entry)?;
                }
                return Ok(read);
            }
            // It grew past the minimum while being read: chunk it after all.
            let mut grown = Chunker::new(self.chunk_params)?;
            grown.feed_unhashed(&data, |chunk| out.cut(chunk));
            out.result()?;
            read = data.len() as u64;
            chunker = Some(grown);
        }
        let mut chunker = match chunker {
            Some(chunker) => chunker,
            None => Chunker::new(self.chunk_params)?,
        };
        let mut holes = may_have_holes.then(|| Holes::new(file));
        // Zeros read or in holes, not yet fed: a run is fed at once.
        let mut zeros: u64 = 0;
        let mut zero_chunk_sent = false;
        let mut buffer = vec![0u8; READ_BUFFER_SIZE];
        loop {
            let hole = match &mut holes {
                Some(holes) => holes.next_at(read).map_err(io_error(path))?,
                None => None,
            };
            // Read up to the hole, or to the end of the file.
            let data_end = hole.map_or(u64::MAX, |hole| hole.start);
            let mut at_end = false;
            while read < data_end {
                let wanted = (data_end - read).min(READ_BUFFER_SIZE as u64) as usize;
                let length = match file.read_at(&mut buffer[..wanted], read) {
                    Ok(0) => {
                        at_end = true;
                        break;
                    }
                    Ok(length) => length,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(err) => return Err(io_error(path)(err)),
                };
                read += length as u64;
                let bytes = &buffer[..length];
                // Zeros read (a preallocated or zeroed file) skip hashing
                // as a hole's do; other bytes end the check at once.
                if crate::chunker::all_zero(bytes) {
                    zeros += length as u64;
                    if zeros >= ZERO_RUN_REPORTED {
                        let run = std::mem::take(&mut zeros);
                        out.feed_zeros(&mut chunker, run, &mut zero_chunk_sent)?;
                    }
                    continue;
                }
                if zeros > 0 {
                    let run = std::mem::take(&mut zeros);
                    out.feed_zeros(&mut chunker, run, &mut zero_chunk_sent)?;
                }
                chunker.feed_unhashed(bytes, |chunk| out.cut(chunk));
                out.result()?;
            }
            let Some(hole) = hole.filter(|_| !at_end) else {
                break;
            };
            zeros += hole.end - hole.start;
            read = hole.end;
        }
        if zeros > 0 {
            out.feed_zeros(&mut chunker, zeros, &mut zero_chunk_sent)?;
        }
        chunker.finish_unhashed(|chunk| out.cut(chunk));
        out.result()?;
        out.drain()?;
        Ok(read)
    }

    /// Hand one chunk of the file `path` to the sink and record it.
    fn send(&self, path: &Path, chunk: Chunk, entry: &mut TreeEntry) -> Result<(), WalkError> {
        let length = chunk.data.len() as u64;
        entry.chunk_ids.push(chunk.id.to_vec());
        self.put(path, chunk)?;
        self.counters
            .bytes_read
            .fetch_add(length, Ordering::Relaxed);
        self.report(path);
        Ok(())
    }

    /// The entry of an unchanged file (see [`file_unchanged`]): the
    /// parent's chunks and attributes with today's metadata.
    fn reuse_file(&self, name: Vec<u8>, stat: &EntryStat, previous: TreeEntry) -> TreeEntry {
        let mut entry = entry_from(name, EntryKind::File, stat);
        entry.size = stat.size;
        entry.links = stat.links;
        entry.chunk_ids = previous.chunk_ids;
        // Unchanged ctime: unchanged attributes too.
        entry.xattrs = previous.xattrs;
        self.counters
            .files_unchanged
            .fetch_add(1, Ordering::Relaxed);
        self.count_file(&entry);
        entry
    }

    fn count_file(&self, entry: &TreeEntry) {
        self.counters.files.fetch_add(1, Ordering::Relaxed);
        self.counters
            .total_bytes
            .fetch_add(entry.size, Ordering::Relaxed);
        self.counters
            .chunks
            .fetch_add(entry.chunk_ids.len() as u64, Ordering::Relaxed);
    }

    /// A file read (not reused) is done: counted and reported.
    fn file_done(&self, path: &Path, entry: TreeEntry) -> TreeEntry {
        self.count_file(&entry);
        self.report(path);
        entry
    }

    /// An entry whose examination failed with `err`: left out with a
    /// warning when it vanished or may not be examined, else the backup
    /// fails.
    fn unexaminable(
        &self,
        path: &Path,
        err: io::Error,
    ) -> Result<Option<(TreeEntry, bool)>, WalkError> {
        match err.kind() {
            io::ErrorKind::NotFound => {
                self.warn(format!("{}: vanished before it was read", path.display()));
                Ok(None)
            }
            io::ErrorKind::PermissionDenied => {
                // A directory readable but not searchable (r without x).
                self.warn(format!(
                    "{}: cannot be examined ({err}); left out",
                    path.display()
                ));
                Ok(None)
            }
            _ => Err(io_error(path)(err)),
        }
    }
}

/// The chunks of one file on their way from the chunker to the sink: hashed
/// (on this thread, or ahead on the hash pool), recorded in the file's
/// entry and sent, in the order they were cut.
struct FileChunks<'w, 'a> {
    walk: &'w Walk<'a>,
    path: &'w Path,
    entry: &'w mut TreeEntry,
    ahead: Ahead<'w>,
    /// The first error met in a chunker's callback, which cannot return it.
    failed: Option<WalkError>,
}

impl FileChunks<'_, '_> {
    /// Take the bytes of the next chunk the chunker cut.
    fn cut(&mut self, data: Vec<u8>) {
        if self.failed.is_some() {
            return;
        }
        let (walk, path, entry) = (self.walk, self.path, &mut *self.entry);
        let mut send = |chunk: Chunk| walk.send(path, chunk, entry);
        if let Err(err) = self.ahead.push(data, &mut send) {
            self.failed = Some(err);
        }
    }

    /// The error met since the last call, if any.
    fn result(&mut self) -> Result<(), WalkError> {
        self.failed.take().map_or(Ok(()), Err)
    }

    /// Send every chunk cut so far.
    fn drain(&mut self) -> Result<(), WalkError> {
        let (walk, path, entry) = (self.walk, self.path, &mut *self.entry);
        self.ahead
            .drain(&mut |chunk: Chunk| walk.send(path, chunk, entry))
    }

    /// Feed `len` zeros of the file to `chunker` and record the chunks;
    /// whole chunks of zeros are neither built nor hashed, and the sink is
    /// handed the chunk of zeros once per file (`zero_chunk_sent`). The
    /// chunks cut before a run of zero chunks are sent before it is recorded.
    fn feed_zeros(
        &mut self,
        chunker: &mut Chunker,
        len: u64,
        zero_chunk_sent: &mut bool,
    ) -> Result<(), WalkError> {
        chunker.feed_zeros_unhashed(len, |cut| match cut {
            Cut::Chunk(data) => self.cut(data),
            Cut::Zeros { id, len, count } => {
                if self.failed.is_none()
                    && let Err(err) = self.zeros(id, len, count, zero_chunk_sent)
                {
                    self.failed = Some(err);
                }
            }
        });
        self.result()
    }

    /// Record `count` chunks of `len` zeros, whose id is `id`.
    fn zeros(
        &mut self,
        id: ChunkId,
        len: u32,
        count: u64,
        zero_chunk_sent: &mut bool,
    ) -> Result<(), WalkError> {
        self.drain()?;
        let (walk, path) = (self.walk, self.path);
        if !*zero_chunk_sent {
            let zeros = Chunk {
                id,
                data: vec![0; len as usize],
            };
            walk.put(path, zeros)?;
            *zero_chunk_sent = true;
        }
        self.entry
            .chunk_ids
            .extend(std::iter::repeat_n(id.to_vec(), count as usize));
        let skipped = u64::from(len) * count;
        walk.counters
            .bytes_read
            .fetch_add(skipped, Ordering::Relaxed);
        walk.counters
            .zero_bytes_skipped
            .fetch_add(skipped, Ordering::Relaxed);
        walk.report(path);
        Ok(())
    }
}

/// Whether the regular file whose metadata is `stat` is unchanged since
/// the parent snapshot's `previous` entry: same size, mtime, ctime and
/// inode. Its content is then not read again.
fn file_unchanged(stat: &EntryStat, previous: &TreeEntry) -> bool {
    previous.kind == EntryKind::File as i32
        && previous.size == stat.size
        && previous.mtime_ns == stat.mtime_ns
        && previous.ctime_ns == stat.ctime_ns
        && previous.inode == stat.inode
}

fn build_excludes(patterns: &[String]) -> Result<GlobSet, WalkError> {
    let mut builder = GlobSetBuilder::new();
    for pattern in patterns {
        let glob = GlobBuilder::new(pattern)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|source| WalkError::BadExclude {
                pattern: pattern.clone(),
                source,
            })?;
        builder.add(glob);
    }
    builder.build().map_err(|source| WalkError::BadExclude {
        pattern: patterns.join(" "),
        source,
    })
}

/// Back up `options.includes` into `sink`, reusing unchanged files of
/// `parent`, and return the root tree id once `sink.flush()` has returned.
///
/// Files are read, chunked and hashed in parallel on `options.threads`
/// threads; `progress` is called from those threads after every chunk and
/// every file. See the module documentation for what is a warning and what
/// is an error.
pub fn backup(
    options: &BackupOptions,
    sink: &dyn ChunkSink,
    parent: Option<ParentSnapshot<'_>>,
    progress: &(dyn Fn(&Progress<'_>) + Sync),
) -> Result<BackupOutcome, WalkError> {
    options.chunk_params.validate()?;
    if options.includes.is_empty() {
        return Err(WalkError::NoIncludes);
    }
    let mut includes = IncludeNode::default();
    for include in expand_includes(&options.includes)? {
        includes.insert(&include);
    }
    let hash_pool = if options.hashes_ahead() {
        let pool =
            HashPool::new(options.threads, options.hash_ahead_bytes / 2).map_err(|source| {
                WalkError::ThreadPool {
                    threads: options.threads,
                    source,
                }
            })?;
        Some(pool)
    } else {
        None
    };
    let mut walk = Walk {
        chunk_params: options.chunk_params,
        hash_pool,
        one_file_system: options.one_file_system,
        excludes: build_excludes(&options.excludes)?,
        skipped_mounts: HashMap::new(),
        sink,
        parent: parent.map(|parent| parent.source),
        progress,
        counters: Counters::default(),
        warnings: Mutex::new(Vec::new()),
    };
    if options.one_file_system || includes.whole {
        match mounts::read_mount_table() {
            Ok(table) => walk.skipped_mounts = table,
            Err(err) => walk.warn(format!(
                "/proc/self/mountinfo: unreadable ({err}); virtual and network file systems are not skipped"
            )),
        }
    }

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(options.threads)
        .thread_name(|index| format!("backup-{index}"))
        // Directory recursion runs on these threads; deep trees need room.
        .stack_size(16 * 1024 * 1024)
        .build()
        .map_err(|source| WalkError::ThreadPool {
            threads: options.threads,
            source,
        })?;
    let root = pool.install(|| -> Result<ChunkId, WalkError> {
        let root_path = Path::new("/");
        if includes.whole {
            let meta = std::fs::symlink_metadata(root_path).map_err(io_error(root_path))?;
            let below = Below { device: meta.dev() };
            let parent_root = parent.map(|parent| parent.root);
            walk.directory(root_path, true, parent_root, below)?
                .ok_or_else(|| WalkError::BadInclude {
                    path: root_path.to_owned(),
                    reason: "vanished".to_owned(),
                })
        } else {
            let parent_root = parent.and_then(|parent| {
                let tree = walk.parent_tree_by_id(root_path, parent.root, parent.source)?;
                Some((parent.root, tree))
            });
            walk.include_tree(&includes, root_path, parent_root)
        }
    })?;
    sink.flush().map_err(WalkError::Flush)?;

    let counters = &walk.counters;
    let stats = SnapshotStats {
        files: counters.files.load(Ordering::Relaxed),
        dirs: counters.dirs.load(Ordering::Relaxed),
        total_bytes: counters.total_bytes.load(Ordering::Relaxed),
        bytes_read: counters.bytes_read.load(Ordering::Relaxed),
        chunks: counters.chunks.load(Ordering::Relaxed),
        files_unchanged: counters.files_unchanged.load(Ordering::Relaxed),
        ..SnapshotStats::default()
    };
    let warnings = match walk.warnings.into_inner() {
        Ok(warnings) => warnings,
        Err(poisoned) => poisoned.into_inner(),
    };
    Ok(BackupOutcome {
        root,
        stats,
        warnings,
        zero_bytes_skipped: counters.zero_bytes_skipped.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
pub(crate) mod memory;

#[cfg(test)]
pub(crate) mod tests;
