//! Restore: reading a snapshot's trees depth-first and re-creating them.
//!
//! Owns the path-safety rules every restore applies ([`check_entry_name`],
//! [`check_relative_path`]), the depth-first walk over a snapshot
//! ([`walk_tree`]), the [`RestoreTarget`] seam a walk (or a remote stream of
//! entries) drives, which files become hard links ([`HardLinks`]), and two
//! targets: a directory ([`DirectoryTarget`]) and a tar stream
//! ([`TarTarget`]). What a directory restore gives back of recorded
//! privileges is its [`RestorePolicy`] (in `restore/policy.rs`); what it
//! does with an entry already in the target is its [`ExistingEntries`]
//! (in `restore/existing.rs`).
//!
//! It must never write outside the target: names are checked both where a
//! snapshot is read and again in each target (a target can be driven from the
//! network), and [`DirectoryTarget`] walks the target with `openat` and
//! `O_NOFOLLOW` from directory handles it opened itself, so neither a hostile
//! snapshot nor a symlink already present in the target can redirect a write.
//! It must never write bytes that do not hash to their chunk id. It must
//! never give an entry its recorded owner or its setuid and setgid bits
//! unless the [`RestorePolicy`] asks for them (a snapshot holds whatever
//! its uploader recorded), and never creates a device node, FIFO or socket.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use fabric_proto::v1::{EntryKind, Tree, TreeEntry};
use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};

use crate::id::ChunkId;
use crate::sink::{ChunkSource, SinkError};

mod existing;
mod policy;

pub use existing::{Action, ExistingEntries, Found, decide};
pub use policy::RestorePolicy;

/// What can go wrong in a restore. Each variant names the entry or path.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A name that could escape the target or is not a name at all.
    #[error("refusing snapshot entry {path:?}: {reason}")]
    BadName {
        /// The entry's full path inside the snapshot (lossy UTF-8).
        path: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The requested path is not in the snapshot.
    #[error("no such path in the snapshot: {path:?}")]
    NotFound {
        /// The path as asked.
        path: String,
    },
    /// The chunk source failed.
    #[error("reading {what} from the chunk source: {source}")]
    Source {
        /// The chunk or tree, and the path it belongs to.
        what: String,
        /// The source's own error.
        source: SinkError,
    },
    /// A chunk's bytes do not hash to its id.
    #[error("chunk {id} of {path:?} does not match its id: refusing to write it")]
    ChunkMismatch {
        /// The chunk's id.
        id: ChunkId,
        /// The entry it belongs to.
        path: String,
    },
    /// A snapshot entry that cannot be restored as recorded.
    #[error("bad snapshot entry {path:?}: {reason}")]
    BadEntry {
        /// The entry's full path inside the snapshot (lossy UTF-8).
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The target refused to go through or replace something already there.
    #[error("refusing to restore {path}: {reason}")]
    Unsafe {
        /// The path inside the target.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// An entry is already at a path the restore writes, and the target
    /// was asked to leave such entries alone ([`ExistingEntries::Refuse`]).
    #[error("{path} already exists")]
    Exists {
        /// The path in the target.
        path: PathBuf,
    },
    /// Writing the target failed.
    #[error("restoring {path}: {source}")]
    Io {
        /// The path inside the target (or the target itself).
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A target was driven out of order (e.g. data without a file).
    #[error("restore target driven out of order: {0}")]
    OutOfOrder(String),
}

/// Lossy UTF-8 of raw path bytes, for messages.
fn lossy(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

fn path_of(bytes: &[u8]) -> &Path {
    Path::new(std::ffi::OsStr::from_bytes(bytes))
}

/// `prefix/name`, or `name` when `prefix` is empty.
fn join(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut path = Vec::with_capacity(prefix.len() + name.len() + 1);
    if !prefix.is_empty() {
        path.extend_from_slice(prefix);
        path.push(b'/');
    }
    path.extend_from_slice(name);
    path
}

/// Why `name` is not a safe single path component, if it is not.
fn name_problem(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty name")
    } else if name == b"." || name == b".." {
        Some("name is . or ..")
    } else if name.contains(&b'/') {
        Some("name contains '/'")
    } else if name.contains(&0) {
        Some("name contains NUL")
    } else {
        None
    }
}

/// Refuse a tree entry name that is empty, `.`, `..`, or contains `/` or NUL.
pub fn check_entry_name(name: &[u8]) -> Result<(), RestoreError> {
    check_name_at(b"", name)
}

/// [`check_entry_name`] for the entry `name` inside the directory `prefix`,
/// naming the full path in the error.
fn check_name_at(prefix: &[u8], name: &[u8]) -> Result<(), RestoreError> {
    match name_problem(name) {
        None => Ok(()),
        Some(reason) => Err(RestoreError::BadName {
            path: lossy(&join(prefix, name)),
            reason,
        }),
    }
}

/// Refuse a relative path (components separated by `/`) unless every
/// component passes [`check_entry_name`]: no absolute path, no empty
/// component, no `.` or `..`, no NUL. Used on every path a target receives.
pub fn check_relative_path(path: &[u8]) -> Result<(), RestoreError> {
    if path.is_empty() {
        return Err(RestoreError::BadName {
            path: String::new(),
            reason: "empty path",
        });
    }
    for component in path.split(|&byte| byte == b'/') {
        if let Some(reason) = name_problem(component) {
            return Err(RestoreError::BadName {
                path: lossy(path),
                reason,
            });
        }
    }
    Ok(())
}

/// The kind of `entry`, refusing unknown values.
fn kind_of(path: &[u8], entry: &TreeEntry) -> Result<EntryKind, RestoreError> {
    match EntryKind::try_from(entry.kind) {
        Ok(EntryKind::Unspecified) | Err(_) => Err(RestoreError::BadEntry {
            path: lossy(path),
            reason: format!("unknown entry kind {}", entry.kind),
        }),
        Ok(kind) => Ok(kind),
    }
}

/// The plain bytes of chunk `id`, re-checked against the id.
fn fetch_checked(
    source: &dyn ChunkSource,
    id: &ChunkId,
    path: &[u8],
) -> Result<Vec<u8>, RestoreError> {
    let bytes = source
        .get_chunk(id)
        .map_err(|source| RestoreError::Source {
            what: format!("chunk {id} of {:?}", lossy(path)),
            source,
        })?;
    if !id.matches(&bytes) {
        return Err(RestoreError::ChunkMismatch {
            id: *id,
            path: lossy(path),
        });
    }
    Ok(bytes)
}

/// The tree `id` (the listing of `path`), its bytes checked against the id.
fn fetch_tree(source: &dyn ChunkSource, id: &ChunkId, path: &[u8]) -> Result<Tree, RestoreError> {
    let bytes = fetch_checked(source, id, path)?;
    let tree = <Tree as prost::Message>::decode(bytes.as_slice()).map_err(|err| {
        RestoreError::BadEntry {
            path: lossy(path),
            reason: format!("tree {id} does not decode: {err}"),
        }
    })?;
    crate::tree_parts::join_parts(
        tree,
        |part| fetch_checked(source, part, path),
        |err| RestoreError::BadEntry {
            path: lossy(path),
            reason: format!("tree {id}: {err}"),
        },
    )
}

fn subtree_id(path: &[u8], entry: &TreeEntry) -> Result<ChunkId, RestoreError> {
    ChunkId::from_slice(&entry.subtree_id).map_err(|err| RestoreError::BadEntry {
        path: lossy(path),
        reason: err.to_string(),
    })
}

/// Where a walk starts: a directory's listing or a single entry.
enum Start {
    Tree(ChunkId),
    Entry(Box<TreeEntry>),
}

/// Find `path` ("" or "/" for the root) in the snapshot whose root tree is `root`.
fn resolve(source: &dyn ChunkSource, root: ChunkId, path: &str) -> Result<Start, RestoreError> {
    let mut current = Start::Tree(root);
    let mut walked: Vec<u8> = Vec::new();
    for component in path.split('/').filter(|part| !part.is_empty()) {
        let not_found = || RestoreError::NotFound {
            path: path.to_owned(),
        };
        let tree_id = match &current {
            Start::Tree(id) => *id,
            Start::Entry(_) => return Err(not_found()),
        };
        let tree = fetch_tree(source, &tree_id, &walked)?;
        let position = tree
            .entries
            .binary_search_by(|entry| entry.name.as_slice().cmp(component.as_bytes()))
            .map_err(|_| not_found())?;
        let entry = &tree.entries[position];
        check_name_at(&walked, &entry.name)?;
        walked = join(&walked, &entry.name);
        current = match kind_of(&walked, entry)? {
            EntryKind::Dir => Start::Tree(subtree_id(&walked, entry)?),
            _ => Start::Entry(Box::new(entry.clone())),
        };
    }
    Ok(current)
}

/// Visit every entry under `path` of the snapshot `root` depth-first, a
/// directory before its contents, entries of a directory in name order.
///
/// `path` "" or "/" is the whole snapshot; a directory's entries are visited
/// with paths relative to it; a file, symlink or other entry is visited alone
/// under its own name. Paths given to `visit` are relative, `/`-separated and
/// already checked: an unsafe name, an unsorted or duplicated name, an
/// unknown kind or a tree that does not hash to its id stops the walk with an
/// error naming the entry. Iterative, so a deep snapshot cannot exhaust the stack.
pub fn walk_tree<E: From<RestoreError>>(
    source: &dyn ChunkSource,
    root: ChunkId,
    path: &str,
    mut visit: impl FnMut(&[u8], &TreeEntry) -> Result<(), E>,
) -> Result<(), E> {
    let tree_id = match resolve(source, root, path)? {
        Start::Entry(entry) => {
            check_name_at(b"", &entry.name)?;
            return visit(&entry.name, &entry);
        }
        Start::Tree(id) => id,
    };
    struct Frame {
        prefix: Vec<u8>,
        entries: std::vec::IntoIter<TreeEntry>,
        previous: Option<Vec<u8>>,
    }
    let first = fetch_tree(source, &tree_id, path.as_bytes())?;
    let mut stack = vec![Frame {
        prefix: Vec::new(),
        entries: first.entries.into_iter(),
        previous: None,
    }];
    while let Some(frame) = stack.last_mut() {
        let Some(entry) = frame.entries.next() else {
            stack.pop();
            continue;
        };
        check_name_at(&frame.prefix, &entry.name)?;
        let entry_path = join(&frame.prefix, &entry.name);
        if let Some(previous) = &frame.previous
            && previous.as_slice() >= entry.name.as_slice()
        {
            return Err(RestoreError::BadEntry {
                path: lossy(&entry_path),
                reason: "entries not sorted by name or a name repeated".to_owned(),
            }
            .into());
        }
        frame.previous = Some(entry.name.clone());
        let kind = kind_of(&entry_path, &entry)?;
        visit(&entry_path, &entry)?;
        if kind == EntryKind::Dir {
            let tree = fetch_tree(source, &subtree_id(&entry_path, &entry)?, &entry_path)?;
            stack.push(Frame {
                prefix: entry_path,
                entries: tree.entries.into_iter(),
                previous: None,
            });
        }
    }
    Ok(())
}

/// Counters of one restore.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Regular files written.
    pub files: u64,
    /// Directories created (the target root excluded).
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// FIFOs, sockets and devices: recorded as metadata only. No target
    /// creates them; each is logged with its path.
    pub others_skipped: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Files restored as hard links to a file written before (also counted in `files`).
    pub hard_links: u64,
    /// Extended attributes that could not be set (a file system without
    /// them, a namespace only root may write): each is logged with its path.
    pub attributes_not_restored: u64,
    /// Entries whose recorded owner was asked for ([`RestorePolicy::same_owner`])
    /// and could not be given (only root may give a file away): each is
    /// logged with its path and keeps the restoring user as its owner.
    pub owners_not_restored: u64,
    /// Files, symlinks and hard links already in the target that were left
    /// as they were ([`ExistingEntries::Skip`]); they are also counted in
    /// `files` or `symlinks` (and a file's size in `bytes`), as the
    /// snapshot holds them.
    pub existing_kept: u64,
}

/// The files of a restore that later entries may be hard links to.
///
/// A regular file recorded with more than one link is written once; a
/// later entry with the same device and inode becomes a hard link to it,
/// provided it also has the same size and chunks (a file changed between
/// the reads of its links is written as a file of its own). Both ends of a
/// remote restore keep one, so the sender leaves a link's chunks out and
/// the receiver expects none.
#[derive(Default)]
pub struct HardLinks {
    /// (device, inode) -> the path written first, and a digest of its size and chunk ids.
    written: HashMap<(u64, u64), (Vec<u8>, [u8; 32])>,
}

impl HardLinks {
    /// The path of the file `entry` (at `path`) is to be a hard link to, or
    /// None when its content is to be written (remembering it when other
    /// links to it may follow).
    pub fn link_target(&mut self, path: &[u8], entry: &TreeEntry) -> Option<Vec<u8>> {
        if entry.kind != EntryKind::File as i32 || entry.links < 2 {
            return None;
        }
        let mut digest = blake3::Hasher::new();
        digest.update(&entry.size.to_le_bytes());
        for id in &entry.chunk_ids {
            digest.update(id);
        }
        let digest: [u8; 32] = digest.finalize().into();
        match self.written.entry((entry.device, entry.inode)) {
            std::collections::hash_map::Entry::Occupied(first) => {
                let (first_path, first_digest) = first.get();
                (*first_digest == digest).then(|| first_path.clone())
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert((path.to_vec(), digest));
                None
            }
        }
    }
}

/// What a restore writes into, driven entry by entry in depth-first order
/// (a directory before its contents). A file's content arrives in pieces
/// between [`RestoreTarget::file_start`] and [`RestoreTarget::file_end`], so
/// a remote stream can drive a target without holding a file in memory.
/// Paths are relative and `/`-separated; every target must check them with
/// [`check_relative_path`] since the driver may be a network stream.
pub trait RestoreTarget {
    /// Create the directory `path` (its metadata may be applied later, after its contents).
    fn directory(&mut self, path: &[u8], entry: &TreeEntry) -> Result<(), RestoreError>;
    /// Start the regular file `path` of `entry.size` bytes.
    fn file_start(&mut self, path: &[u8], entry: &TreeEntry) -> Result<(), RestoreError>;
    /// The next piece of the current file's content.
    fn file_data(&mut self, bytes: &[u8]) -> Result<(), RestoreError>;
    /// The next piece of the current file's content is `len` zero bytes (a
    /// chunk the driver knows to be all zeros: a sparse file's holes come
    /// as thousands of one such chunk). A target may leave them as a hole
    /// without looking at them; by default they are written.
    fn file_zeros(&mut self, len: u64) -> Result<(), RestoreError> {
        crate::chunker::zero_pieces(len).try_for_each(|piece| self.file_data(piece))
    }
    /// The current file is complete.
    fn file_end(&mut self) -> Result<(), RestoreError>;
    /// Make `path` a hard link to `existing`, a file this restore has
    /// already written (see [`HardLinks`]); `entry` is `path`'s own entry.
    fn hard_link(
        &mut self,
        path: &[u8],
        existing: &[u8],
        entry: &TreeEntry,
    ) -> Result<(), RestoreError>;
    /// Create the symlink `path` pointing at `entry.symlink_target`.
    fn symlink(&mut self, path: &[u8], entry: &TreeEntry) -> Result<(), RestoreError>;
    /// A FIFO, socket or device: metadata only. A target never creates
    /// one (a device node from an untrusted snapshot would open the
    /// restoring host's hardware to whoever may read it).
    fn other(&mut self, path: &[u8], entry: &TreeEntry) -> Result<(), RestoreError>;
    /// Everything has been sent: apply pending metadata, flush.
    fn finish(&mut self) -> Result<(), RestoreError>;
    /// The restore failed: take back what this target wrote, as far as it
    /// can, and say how many entries it removed. A target that cannot
    /// (a tar stream already sent) removes nothing.
    fn abort(&mut self) -> Result<u64, RestoreError> {
        Ok(0)
    }
    /// Whether, after [`RestoreTarget::abort`], the whole restore may be
    /// written again from the start (from another copy).
    fn restartable(&self) -> bool {
        false
    }
    /// Extended attributes this target could not set so far.
    fn attributes_not_restored(&self) -> u64 {
        0
    }
    /// Entries this target could not give the recorded owner it was asked
    /// to give so far.
    fn owners_not_restored(&self) -> u64 {
        0
    }
    /// Entries already there that this target left as they were so far
    /// ([`ExistingEntries::Skip`]).
    fn existing_kept(&self) -> u64 {
        0
    }
}

/// Restore `path` of the snapshot whose root tree is `root` into `target`.
///
/// `path` "" or "/" restores the whole snapshot into the target root; a
/// directory's contents go into the target root; a single file, symlink or
/// other entry goes to `<target>/<its name>`. Every chunk is re-hashed and
/// compared with its id before its bytes reach the target (a chunk that
/// comes again right after itself is written from that checked copy); a
/// file whose chunks do not add up to its recorded size is an error.
pub fn restore(
    source: &dyn ChunkSource,
    root: ChunkId,
    path: &str,
    target: &mut dyn RestoreTarget,
) -> Result<RestoreStats, RestoreError> {
    let mut stats = RestoreStats::default();
    let mut hard_links = HardLinks::default();
    // The chunk read last, checked, and whether it is all zeros: the same
    // id again (a run of zeros comes as thousands of one chunk) is written
    // without reading or scanning it again.
    let mut last_chunk: Option<(ChunkId, Vec<u8>, bool)> = None;
    walk_tree(
        source,
        root,
        path,
        |entry_path, entry| -> Result<(), RestoreError> {
            match kind_of(entry_path, entry)? {
                EntryKind::Dir => {
                    target.directory(entry_path, entry)?;
                    stats.dirs += 1;
                }
                EntryKind::File => {
                    if let Some(existing) = hard_links.link_target(entry_path, entry) {
                        target.hard_link(entry_path, &existing, entry)?;
                        stats.files += 1;
                        stats.hard_links += 1;
                        return Ok(());
                    }
                    target.file_start(entry_path, entry)?;
                    let mut written: u64 = 0;
                    for raw_id in &entry.chunk_ids {
                        let id =
                            ChunkId::from_slice(raw_id).map_err(|err| RestoreError::BadEntry {
                                path: lossy(entry_path),
                                reason: err.to_string(),
                            })?;
                        let (bytes, zero) = match &mut last_chunk {
                            Some((last, bytes, zero)) if *last == id => (bytes, *zero),
                            last => {
                                let bytes = fetch_checked(source, &id, entry_path)?;
                                let zero = crate::chunker::all_zero(&bytes);
                                let (_, bytes, _) = last.insert((id, bytes, zero));
                                (bytes, zero)
                            }
                        };
                        written += bytes.len() as u64;
                        if written > entry.size {
                            break;
                        }
                        if zero {
                            target.file_zeros(bytes.len() as u64)?;
                        } else {
                            target.file_data(bytes)?;
                        }
                    }
                    if written != entry.size {
                        return Err(RestoreError::BadEntry {
                            path: lossy(entry_path),
                            reason: format!(
                                "chunks hold {written} bytes, the entry says {}",
                                entry.size
                            ),
                        });
                    }
                    target.file_end()?;
                    stats.files += 1;
                    stats.bytes += written;
                }
                EntryKind::Symlink => {
                    target.symlink(entry_path, entry)?;
                    stats.symlinks += 1;
                }
                EntryKind::Other => {
                    target.other(entry_path, entry)?;
                    stats.others_skipped += 1;
                }
                EntryKind::Unspecified => unreachable_kind(entry_path)?,
            }
            Ok(())
        },
    )?;
    target.finish()?;
    stats.attributes_not_restored = target.attributes_not_restored();
    stats.owners_not_restored = target.owners_not_restored();
    stats.existing_kept = target.existing_kept();
    Ok(stats)
}

/// `kind_of` already refuses this kind; kept as an error, not a panic.
fn unreachable_kind(path: &[u8]) -> Result<(), RestoreError> {
    Err(RestoreError::BadEntry {
        path: lossy(path),
        reason: "unspecified entry kind".to_owned(),
    })
}

fn timespec_of(nanos: i64) -> Timespec {
    Timespec {
        tv_sec: nanos.div_euclid(1_000_000_000),
        tv_nsec: nanos.rem_euclid(1_000_000_000),
    }
}

/// The times to set for `entry`. An mtime of 0 means "not recorded" (the
/// walk records directories above an include path by name, mode and owner
/// only), and leaves the time as the restore made it.
fn timestamps_of(entry: &TreeEntry) -> Timestamps {
    let mtime = if entry.mtime_ns == 0 {
        Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        }
    } else {
        timespec_of(entry.mtime_ns)
    };
    Timestamps {
        last_access: mtime,
        last_modification: mtime,
    }
}

/// What kind of special file a mode's file type says, for messages.
fn special_kind(mode: u32) -> &'static str {
    match mode & 0o170000 {
        0o010000 => "FIFO",
        0o020000 => "character device",
        0o060000 => "block device",
        0o140000 => "socket",
        _ => "special file",
    }
}

/// Log that the special file at `path` (a device, FIFO or socket) was not
/// created, as every other entry a restore leaves out is logged.
fn warn_special_skipped(at: &Path, entry: &TreeEntry) {
    tracing::warn!(
        path = %at.display(),
        "{} not restored: a restore never creates devices, FIFOs or sockets",
        special_kind(entry.mode)
    );
}

/// A directory of the target held open while its contents are written.
struct OpenDirectory {
    /// Its name in its parent.
    name: Vec<u8>,
    /// Its path relative to the target root, for messages.
    path: PathBuf,
    fd: OwnedFd,
    /// Its snapshot entry, applied when it is closed (None: created only
    /// because a path below it arrived first).
    entry: Option<TreeEntry>,
}

/// The file being written.
struct OpenFile {
    path: PathBuf,
    file: File,
    entry: TreeEntry,
    written: u64,
    /// Zero pieces were skipped as holes: the length is set at the end.
    holes: bool,
}

/// Pieces of file content at least this long and all zero are left as
/// holes (seeked over, not written), so a sparse file (a VM image, a
/// database file) restores sparse.
const MIN_HOLE: usize = 4096;

impl OpenFile {
    /// Write `bytes` at the file's position, or seek over them when they
    /// are `zero` (a hole).
    fn put(&mut self, bytes: &[u8], zero: bool) -> Result<(), RestoreError> {
        if zero {
            return self.skip(bytes.len() as u64);
        }
        self.file
            .write_all(bytes)
            .map_err(|source| RestoreError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Seek over `len` zero bytes, leaving a hole (the length is set at
    /// the end).
    fn skip(&mut self, len: u64) -> Result<(), RestoreError> {
        if len == 0 {
            return Ok(());
        }
        self.holes = true;
        let seeked = i64::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a hole too long"))
            .and_then(|len| self.file.seek(io::SeekFrom::Current(len)));
        seeked.map(|_| ()).map_err(|source| RestoreError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// Restores into a directory on the local file system, under a
/// [`RestorePolicy`].
///
/// Content, permission bits, mtimes (nanoseconds) and the extended
/// attributes of files and directories are restored. What the snapshot's
/// uploader could use to gain privileges on the restoring host comes back
/// only on request: recorded owners only with
/// [`RestorePolicy::same_owner`] (otherwise everything belongs to the
/// restoring user, even root), setuid and setgid bits only with
/// [`RestorePolicy::setid_bits`]. An attribute that cannot be set (say
/// `security.*` when not root) or an owner that cannot be given (any other
/// than one's own when not root) is logged and counted, and the restore
/// goes on. A directory's metadata is applied when the walk leaves it,
/// after its contents, so a read-only directory can still be filled and
/// its mtime survives. What is already at a path it writes is its
/// [`ExistingEntries`]' business: by default ([`ExistingEntries::Overwrite`])
/// files and symlinks in the way are replaced and an existing directory is
/// reused; with [`ExistingEntries::Refuse`] the first one stops the restore,
/// with [`ExistingEntries::Skip`] it is left as it is. A symlink is never
/// followed (`O_NOFOLLOW` from handles of the target's own directories). Zero
/// pieces of content of at least 4 KiB are left as holes. A hard link is
/// made with `linkat` to a file this restore wrote, found from the target
/// root the same way. Other entries (FIFOs, sockets, devices) are never
/// created: each is logged and counted as skipped.
pub struct DirectoryTarget {
    root_path: PathBuf,
    root: OwnedFd,
    stack: Vec<OpenDirectory>,
    file: Option<OpenFile>,
    policy: RestorePolicy,
    attributes_not_restored: u64,
    owners_not_restored: u64,
    /// Everything this restore created, in order (and whether it is a
    /// directory): what [`RestoreTarget::abort`] removes, last first. An
    /// entry left as it was never gets here, so an abort cannot remove it.
    created: Vec<(Vec<u8>, bool)>,
    /// What to do with an entry already at a path.
    existing: ExistingEntries,
    /// Entries already there and left as they were.
    existing_kept: u64,
    /// The paths of files left as they were: a later hard link to one of
    /// them is not made (its content is not the snapshot's).
    kept_files: std::collections::HashSet<Vec<u8>>,
    /// The current file is one left as it was: its content is passed over.
    skipping_file: bool,
}

/// Set each of `entry`'s extended attributes with `set`; returns how many
/// could not be. One that cannot be set (a file system without them, a
/// namespace only root may write) is logged and left out: the content and
/// the rest of the restore matter more.
fn set_each_xattr(
    at: &Path,
    entry: &TreeEntry,
    policy: RestorePolicy,
    set: impl Fn(&std::ffi::OsStr, &[u8]) -> Result<(), rustix::io::Errno>,
) -> u64 {
    let mut failed = 0;
    for attribute in &entry.xattrs {
        if !policy.keeps_attribute(&attribute.name) {
            tracing::warn!(
                path = %at.display(),
                attribute = %String::from_utf8_lossy(&attribute.name),
                "file capabilities not restored (they are privileges, like setuid: --keep-setid)"
            );
            failed += 1;
            continue;
        }
        if let Err(errno) = set(
            std::ffi::OsStr::from_bytes(&attribute.name),
            &attribute.value,
        ) {
            tracing::warn!(
                path = %at.display(),
                attribute = %String::from_utf8_lossy(&attribute.name),
                "extended attribute not restored: {}",
                io::Error::from(errno)
            );
            failed += 1;
        }
    }
    failed
}

/// Set `entry`'s extended attributes on `fd` (see [`set_each_xattr`]).
fn set_xattrs(fd: impl AsFd, at: &Path, entry: &TreeEntry, policy: RestorePolicy) -> u64 {
    set_each_xattr(at, entry, policy, |name, value| {
        rustix::fs::fsetxattr(&fd, name, value, rustix::fs::XattrFlags::empty())
    })
}

/// Set the extended attributes of the symlink `name` in the directory
/// `dir`. No call sets one through a handle on a symlink itself;
/// `lsetxattr` on a path through the directory's handle
/// (`/proc/self/fd/N/name`) reaches the symlink without following it and
/// without looking up the directory again.
fn set_symlink_xattrs(
    dir: BorrowedFd<'_>,
    name: &[u8],
    at: &Path,
    entry: &TreeEntry,
    policy: RestorePolicy,
) -> u64 {
    if entry.xattrs.is_empty() {
        return 0;
    }
    let mut through_dir = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    through_dir.push(std::ffi::OsStr::from_bytes(name));
    set_each_xattr(at, entry, policy, |attribute, value| {
        rustix::fs::lsetxattr(
            &through_dir,
            attribute,
            value,
            rustix::fs::XattrFlags::empty(),
        )
    })
}

fn errno_at(path: &Path) -> impl Fn(rustix::io::Errno) -> RestoreError + '_ {
    move |errno| RestoreError::Io {
        path: path.to_owned(),
        source: errno.into(),
    }
}

/// Give the entry at `at` its recorded owner and group with `chown`, when
/// `policy` asks for it. Returns whether the owner was asked for and
/// refused; a refusal is logged with the path and the restore goes on (as
/// tar does: the content matters more, and the entry simply stays the
/// restoring user's).
fn chown_as_recorded(
    policy: RestorePolicy,
    at: &Path,
    entry: &TreeEntry,
    chown: impl FnOnce(rustix::fs::Uid, rustix::fs::Gid) -> Result<(), rustix::io::Errno>,
) -> bool {
    if !policy.same_owner {
        return false;
    }
    match chown(
        rustix::fs::Uid::from_raw(entry.uid),
        rustix::fs::Gid::from_raw(entry.gid),
    ) {
        Ok(()) => false,
        Err(errno) => {
            tracing::warn!(
                path = %at.display(),
                uid = entry.uid,
                gid = entry.gid,
                "owner not restored: {}",
                io::Error::from(errno)
            );
            true
        }
    }
}

impl DirectoryTarget {
    /// A target writing under `root`, which is created if missing, giving
    /// back recorded owners and setuid and setgid bits as `policy` says.
    pub fn new(root: impl Into<PathBuf>, policy: RestorePolicy) -> Result<Self, RestoreError> {
        let root_path = root.into();
        std::fs::create_dir_all(&root_path).map_err(|source| RestoreError::Io {
            path: root_path.clone(),
            source,
        })?;
        let root = rustix::fs::open(
            &root_path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno_at(&root_path))?;
        Ok(Self {
            root_path,
            root,
            stack: Vec::new(),
            file: None,
            policy,
            attributes_not_restored: 0,
            owners_not_restored: 0,
            created: Vec::new(),
            existing: ExistingEntries::default(),
            existing_kept: 0,
            kept_files: std::collections::HashSet::new(),
            skipping_file: false,
        })
    }

    /// Do with entries already at a path as `existing` says (by default
    /// they are replaced: [`ExistingEntries::Overwrite`]).
    pub fn with_existing(mut self, existing: ExistingEntries) -> Self {
        self.existing = existing;
        self
    }

    /// What is at `name` in the current directory (never followed).
    fn found_at(&self, name: &[u8], path: &[u8]) -> Result<Found, RestoreError> {
        match rustix::fs::statat(self.current_fd(), name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(rustix::io::Errno::NOENT) => Ok(Found::Nothing),
            Err(errno) => Err(errno_at(&self.display_path(path))(errno)),
            Ok(stat)
                if rustix::fs::FileType::from_raw_mode(stat.st_mode)
                    == rustix::fs::FileType::Directory =>
            {
                Ok(Found::Directory)
            }
            Ok(_) => Ok(Found::Other),
        }
    }

    /// Make way for a file, link or symlink at `name` (`path`) in the
    /// current directory as [`ExistingEntries`] says: Ok(true) to write it,
    /// Ok(false) when what is there stays and the entry is not restored.
    fn make_way(&mut self, name: &[u8], path: &[u8]) -> Result<bool, RestoreError> {
        let found = self.found_at(name, path)?;
        match decide(self.existing, found, false) {
            Action::Create => Ok(true),
            Action::Replace => {
                self.clear_for(name, path)?;
                Ok(true)
            }
            Action::Keep => {
                self.existing_kept += 1;
                Ok(false)
            }
            Action::Conflict => Err(RestoreError::Exists {
                path: self.display_path(path),
            }),
            Action::Blocked(reason) => Err(RestoreError::Unsafe {
                path: self.display_path(path),
                reason,
            }),
            // `decide` gives these only for a directory.
            Action::Merge | Action::MergeKeeping => Err(RestoreError::OutOfOrder(format!(
                "{} handled as a directory",
                lossy(path)
            ))),
        }
    }

    /// Remove `path` (relative to the root; a directory only when empty),
    /// reaching it one component at a time, never through a symlink.
    fn remove_created(&self, path: &[u8], directory: bool) -> Result<bool, RestoreError> {
        let at = self.display_path(path);
        let components: Vec<&[u8]> = path.split(|&byte| byte == b'/').collect();
        let Some((name, parents)) = components.split_last() else {
            return Ok(false);
        };
        let mut opened: Option<OwnedFd> = None;
        for component in parents {
            let parent = opened.as_ref().unwrap_or(&self.root);
            match rustix::fs::openat(
                parent,
                *component,
                OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => opened = Some(fd),
                // Gone already, or replaced by something this restore
                // did not make: nothing of ours to remove there.
                Err(_) => return Ok(false),
            }
        }
        let parent = opened.as_ref().unwrap_or(&self.root);
        let flags = if directory {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        match rustix::fs::unlinkat(parent, *name, flags) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTEMPTY) => Ok(false),
            Err(errno) => Err(errno_at(&at)(errno)),
        }
    }

    fn display_path(&self, relative: &[u8]) -> PathBuf {
        self.root_path.join(path_of(relative))
    }

    /// The open handle of the deepest directory on the stack (or the root).
    fn current_fd(&self) -> &OwnedFd {
        self.stack.last().map_or(&self.root, |dir| &dir.fd)
    }

    /// Close the deepest open directory, applying its metadata.
    fn close_directory(&mut self) -> Result<(), RestoreError> {
        let Some(dir) = self.stack.pop() else {
            return Ok(());
        };
        if let Some(entry) = &dir.entry {
            let at = self.root_path.join(&dir.path);
            // The owner before the mode: a chown may clear setid bits.
            let refused = chown_as_recorded(self.policy, &at, entry, |uid, gid| {
                rustix::fs::fchown(&dir.fd, Some(uid), Some(gid))
            });
            self.owners_not_restored += u64::from(refused);
            let bits = self.policy.permission_bits(entry.mode, refused);
            rustix::fs::fchmod(&dir.fd, Mode::from_bits_truncate(bits)).map_err(errno_at(&at))?;
            self.attributes_not_restored += set_xattrs(&dir.fd, &at, entry, self.policy);
            rustix::fs::futimens(&dir.fd, &timestamps_of(entry)).map_err(errno_at(&at))?;
        }
        Ok(())
    }

    /// Open (creating if needed) directory `name` below the current one,
    /// refusing anything that is not a real directory.
    fn open_child_directory(&mut self, name: &[u8], path: &[u8]) -> Result<OwnedFd, RestoreError> {
        let at = self.display_path(path);
        let parent = self.current_fd();
        let made = match rustix::fs::mkdirat(parent, name, Mode::RWXU) {
            Ok(()) => true,
            Err(rustix::io::Errno::EXIST) => false,
            Err(errno) => return Err(errno_at(&at)(errno)),
        };
        if made {
            self.created.push((path.to_vec(), true));
        }
        let parent = self.current_fd();
        match rustix::fs::openat(
            parent,
            name,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(fd),
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => Err(RestoreError::Unsafe {
                path: at,
                reason: "something other than a directory is already there (a symlink is never followed)",
            }),
            Err(errno) => Err(errno_at(&at)(errno)),
        }
    }

    /// Make the directory stack hold exactly the parents of `path`, closing
    /// directories the walk has left and opening the ones it enters.
    /// Returns the last component of `path`.
    fn enter_parent<'p>(&mut self, path: &'p [u8]) -> Result<&'p [u8], RestoreError> {
        check_relative_path(path)?;
        if let Some(file) = &self.file {
            return Err(RestoreError::OutOfOrder(format!(
                "{} arrived before {} was ended",
                lossy(path),
                file.path.display()
            )));
        }
        if self.skipping_file {
            return Err(RestoreError::OutOfOrder(format!(
                "{} arrived before the file left as it was ended",
                lossy(path)
            )));
        }
        let components: Vec<&[u8]> = path.split(|&byte| byte == b'/').collect();
        let (name, parents) = match components.split_last() {
            Some(split) => split,
            None => {
                return Err(RestoreError::BadName {
                    path: lossy(path),
                    reason: "empty path",
                });
            }
        };
        let common = self
            .stack
            .iter()
            .zip(parents.iter())
            .take_while(|(open, wanted)| open.name.as_slice() == **wanted)
            .count();
        while self.stack.len() > common {
            self.close_directory()?;
        }
        for depth in common..parents.len() {
            let sub_path = parents[..=depth].join(&b'/');
            let fd = self.open_child_directory(parents[depth], &sub_path)?;
            self.stack.push(OpenDirectory {
                name: parents[depth].to_vec(),
                path: path_of(&sub_path).to_owned(),
                fd,
                entry: None,
            });
        }
        Ok(name)
    }

    /// Remove a non-directory at `name` in the current directory so a new
    /// entry can be created there; refuse to replace a directory.
    fn clear_for(&self, name: &[u8], path: &[u8]) -> Result<(), RestoreError> {
        let at = self.display_path(path);
        let parent = self.current_fd();
        match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(errno) => Err(errno_at(&at)(errno)),
            Ok(stat)
                if rustix::fs::FileType::from_raw_mode(stat.st_mode)
                    == rustix::fs::FileType::Directory =>
            {
                Err(RestoreError::Unsafe {
                    path: at,
                    reason: "a directory is already there",
                })
            }
            Ok(_) => rustix::fs::unlinkat(parent, name, AtFlags::empty()).map_err(errno_at(&at)),
        }
    }
}

impl RestoreTarget for DirectoryTarget {
    fn directory(&mut self, path: &[u8], entry: &TreeEntry) -> Result<(), RestoreError> {
        let name = self.enter_parent(path)?;
        let found = self.found_at(name, path)?;
        let keep_metadata = match decide(self.existing, found, true) {
            Action::Create | Action::Merge => false,
            Action::MergeKeeping => true,
            Action::Conflict => {
                return Err(RestoreError::Exists {
                    path: self.display_path(path),
                });
            }
            Action::Blocked(reason) => {
                return Err(RestoreError::Unsafe {
                    path: self.display_path(path),
                    reason,
                });
            }
            // `decide` gives these only for what is not a directory.
            Action::Replace | Action::Keep => {
                return Err(RestoreError::OutOfOrder(format!(
                    "{} handled as a file",
                    lossy(path)
                )));
            }
        };
        let fd = self.open_child_directory(name, path)?;
        self.stack.push(OpenDirectory {
            name: name.to_vec(),
            path: path_of(path).to_owned(),
            fd,
            // A directory that was there keeps its own mode and times when
            // asked to leave existing entries as they are.
            entry: (!keep_metadata).then(|| entry.clone()),
        });
        Ok(())
    }

    fn file_start(&mut self, path: &[u8], entry: &TreeEntry) -> Result<(), RestoreError> {
        let name = self.enter_parent(path)?;
        if !self.make_way(name, path)? {
            self.kept_files.insert(path.to_vec());
            self.skipping_file = true;
            return Ok(());
        }
        let at = self.display_path(path);
        let fd = rustix::fs::openat(
            self.current_fd(),
            name,
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::RUSR | Mode::WUSR,
        )
        .map_err(errno_at(&at))?;
        self.created.push((path.to_vec(), false));
        self.file = Some(OpenFile {
            path: at,
            file: File::from(fd),
            entry: entry.clone(),
            written: 0,
            holes: false,
        });
        Ok(())
    }

    fn file_data(&mut self, bytes: &[u8]) -> Result<(), RestoreError> {
        if self.skipping_file {
            return Ok(());
        }
        let Some(open) = &mut self.file else {
            return Err(RestoreError::OutOfOrder(
                "file data without a file".to_owned(),
            ));
        };
        // Runs of whole zero pieces of MIN_HOLE bytes are seeked over, the
        // rest written as runs: a chunk that is half data, half zeros (where
        // a sparse file's data ends) leaves its zeros as a hole too.
        let mut run_start = 0;
        let mut run_zero = false;
        for (index, piece) in bytes.chunks(MIN_HOLE).enumerate() {
            let zero = piece.len() == MIN_HOLE && crate::chunker::all_zero(piece);
            let at = index * MIN_HOLE;
            if zero != run_zero && at > run_start {
                open.put(&bytes[run_start..at], run_zero)?;
                run_start = at;
            }
            run_zero = zero;
        }
        open.put(&bytes[run_start..], run_zero)?;
        open.written += bytes.len() as u64;
        Ok(())
    }

    fn file_zeros(&mut self, len: u64) -> Result<(), RestoreError> {
        if self.skipping_file {
            return Ok(());
        }
        let Some(open) = &mut self.file else {
            return Err(RestoreError::OutOfOrder(
                "file data without a file".to_owned(),
            ));
        };
        open.skip(len)?;
        open.written += len;
        Ok(())
    }

    fn file_end(&mut self) -> Result<(), RestoreError> {
        if std::mem::take(&mut self.skipping_file) {
            return Ok(());
        }
        let Some(open) = self.file.take() else {
            return Err(RestoreError::OutOfOrder(
                "file end without a file".to_owned(),
            ));
        };
        if open.written != open.entry.size {
            return Err(RestoreError::BadEntry {
                path: open.path.display().to_string(),
                reason: format!(
                    "{} bytes arrived, the entry says {}",
                    open.written, open.entry.size
                ),
            });
        }
        let at = &open.path;
        if open.holes {
            // A hole at the end is not there until the length says so.
            open.file
                .set_len(open.written)
                .map_err(|source| RestoreError::Io {
                    path: at.clone(),
                    source,
                })?;
        }
        // The owner before the mode (a chown clears setid bits) and the
        // attributes (a chown clears file capabilities).
        let refused = chown_as_recorded(self.policy, at, &open.entry, |uid, gid| {
            rustix::fs::fchown(&open.file, Some(uid), Some(gid))
        });
        self.owners_not_restored += u64::from(refused);
        let bits = self.policy.permission_bits(open.entry.mode, refused);
        rustix::fs::fchmod(&open.file, Mode::from_bits_truncate(bits)).map_err(errno_at(at))?;
        self.attributes_not_restored += set_xattrs(&open.file, at, &open.entry, self.policy);
        rustix::fs::futimens(&open.file, &timestamps_of(&open.entry)).map_err(errno_at(at))?;
        Ok(())
    }

    fn hard_link(
        &mut self,
        path: &[u8],
        existing: &[u8],
        _entry: &TreeEntry,
    ) -> Result<(), RestoreError> {
        check_relative_path(existing)?;
        let name = self.enter_parent(path)?;
        if !self.make_way(name, path)? {
            return Ok(());
        }
        let at = self.display_path(path);
        if self.kept_files.contains(existing) {
            // Its first path was already there and left as it was: a link
            // to that file would not have the snapshot's content.
            tracing::warn!(
                path = %at.display(),
                "hard link not restored: the file it links to was already there and was left as it was"
            );
            self.existing_kept += 1;
            return Ok(());
        }
        let existing_at = self.display_path(existing);
        let components: Vec<&[u8]> = existing.split(|&byte| byte == b'/').collect();
        let Some((existing_name, existing_dirs)) = components.split_last() else {
            return Err(RestoreError::BadName {
                path: lossy(existing),
                reason: "empty path",
            });
        };
        // The first link's directory, opened from the target root one
        // component at a time, never through a symlink.
        let mut opened: Option<OwnedFd> = None;
        for component in existing_dirs {
            let parent = opened.as_ref().unwrap_or(&self.root);
            let fd = rustix::fs::openat(
                parent,
                *component,
                OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno_at(&existing_at))?;
            opened = Some(fd);
        }
        let existing_dir = opened.as_ref().unwrap_or(&self.root);
        let stat = rustix::fs::statat(existing_dir, *existing_name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(errno_at(&existing_at))?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(RestoreError::Unsafe {
                path: existing_at,
                reason: "a hard link's first path is no longer a regular file",
            });
        }
        // The metadata is the first link's, applied when it was written.
        rustix::fs::linkat(
            existing_dir,
            *existing_name,
            self.current_fd(),
            name,
            AtFlags::empty(),
        )
        .map_err(errno_at(&at))?;
        self.created.push((path.to_vec(), false));
        Ok(())
    }

    fn symlink(&mut self, path: &[u8], entry: &TreeEntry) -> Result<(), RestoreError> {
        let name = self.enter_parent(path)?;
        if !self.make_way(name, path)? {
            return Ok(());
        }
        let at = self.display_path(path);
        if entry.symlink_target.is_empty() || entry.symlink_target.contains(&0) {
            return Err(RestoreError::BadEntry {
                path: lossy(path),
                reason: "symlink target empty or containing NUL".to_owned(),
            });
        }
        let parent = self.current_fd();
        rustix::fs::symlinkat(entry.symlink_target.as_slice(), parent, name)
            .map_err(errno_at(&at))?;
        self.created.push((path.to_vec(), false));
        let parent = self.current_fd();
        // A symlink has no mode of its own to restore, only an owner.
        let refused = chown_as_recorded(self.policy, &at, entry, |uid, gid| {
            rustix::fs::chownat(
                parent,
                name,
                Some(uid),
                Some(gid),
                AtFlags::SYMLINK_NOFOLLOW,
            )
        });
        // After the chown, which clears security attributes.
        let not_restored = set_symlink_xattrs(parent.as_fd(), name, &at, entry, self.policy);
        rustix::fs::utimensat(
            parent,
            name,
            &timestamps_of(entry),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(errno_at(&at))?;
        self.attributes_not_restored += not_restored;
        self.owners_not_restored += u64::from(refused);
        Ok(())
    }

    fn other(&mut self, path: &[u8], entry: &TreeEntry) -> Result<(), RestoreError> {
        // Metadata only: still checked and still moves the directory stack,
        // so the directories around it get their metadata in order.
        self.enter_parent(path)?;
        warn_special_skipped(&self.display_path(path), entry);
        Ok(())
    }

    fn finish(&mut self) -> Result<(), RestoreError> {
        if let Some(file) = &self.file {
            return Err(RestoreError::OutOfOrder(format!(
                "finished while {} was open",
                file.path.display()
            )));
        }
        while !self.stack.is_empty() {
            self.close_directory()?;
        }
        Ok(())
    }

    /// Removes every file, link and directory this restore created, last
    /// first (a directory only once empty: what was there before stays,
    /// and so does every entry [`ExistingEntries::Skip`] left as it was).
    /// A file the restore replaced ([`ExistingEntries::Overwrite`]) is not
    /// brought back: it was removed when its new version was started, and
    /// the new version is removed like everything else the restore wrote.
    fn abort(&mut self) -> Result<u64, RestoreError> {
        self.file = None;
        self.skipping_file = false;
        // Directories are closed without their recorded metadata.
        self.stack.clear();
        let mut removed = 0;
        for (path, directory) in std::mem::take(&mut self.created).into_iter().rev() {
            if self.remove_created(&path, directory)? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn restartable(&self) -> bool {
        true
    }

    fn attributes_not_restored(&self) -> u64 {
        self.attributes_not_restored
    }

    fn owners_not_restored(&self) -> u64 {
        self.owners_not_restored
    }

    fn existing_kept(&self) -> u64 {
        self.existing_kept
    }
}

/// One PAX record: `<length> <key>=<value>\n`, the length counting itself.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    pax_record_bytes(key.as_bytes(), value.as_bytes())
}

/// [`pax_record`] with raw bytes (xattr names and values need not be UTF-8).
fn pax_record_bytes(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body_len = 1 + key.len() + 1 + value.len() + 1;
    let mut length = body_len + 1;
    while length.to_string().len() + body_len != length {
        length = length.to_string().len() + body_len;
    }
    let mut record = length.to_string().into_bytes();
    record.push(b' ');
    record.extend_from_slice(key);
    record.push(b'=');
    record.extend_from_slice(value);
    record.push(b'\n');
    record
}

/// Writes a restore as a tar stream (GNU format, long names as GNU
/// extensions): directories, files, hard links and symlinks with mode, uid, gid and
/// mtime (whole seconds in the header, the exact value in a PAX `mtime`
/// record when it has a fraction), and extended attributes in PAX
/// `SCHILY.xattr.*` records. Other entries (devices, FIFOs, sockets) are
/// skipped and logged.
///
/// A tar stream is data, not an extraction, so it takes no
/// [`RestorePolicy`]: it carries the recorded modes, setuid and setgid bits
/// included, and the recorded owners, as an archive of the files would.
/// Whoever extracts it applies their tar's policy, and tar run as root
/// gives back owners and setid bits by default: extract a stream of an
/// untrusted snapshot as root only with that in mind.
pub struct TarTarget<W: Write> {
    builder: tar::Builder<W>,
    file: Option<(PathBuf, u64, u64)>,
}

impl<W: Write> TarTarget<W> {
    /// A tar stream written to `writer`.
    pub fn new(writer: W) -> Self {
        Self {
            builder: tar::Builder::new(writer),
            file: None,
        }
    }

    /// The writer, after [`RestoreTarget::finish`].
    pub fn into_inner(self) -> Result<W, RestoreError> {
        self.builder
            .into_inner()
            .map_err(|source| RestoreError::Io {
                path: PathBuf::from("<tar stream>"),
                source,
            })
    }

    fn header(entry: &TreeEntry, kind: tar::EntryType, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(entry.mode & 0o7777);
        header.set_uid(u64::from(entry.uid));
        header.set_gid(u64::from(entry.gid));
        header.set_mtime(u64::try_from(entry.mtime_ns.div_euclid(1_000_000_000)).unwrap_or(0));
        header.set_size(size);
        header
    }

    /// A PAX extended header before an entry, when it needs one: the exact
    /// mtime when it is not a whole number of seconds (or is before 1970),
    /// and the extended attributes as `SCHILY.xattr.<name>` records (as GNU
    /// tar and bsdtar write them).
    fn pax_header(&mut self, path: &[u8], entry: &TreeEntry) -> Result<(), RestoreError> {
        let mut records = Vec::new();
        let nanos = entry.mtime_ns;
        if nanos < 0 || nanos % 1_000_000_000 != 0 {
            let sign = if nanos < 0 { "-" } else { "" };
            let magnitude = nanos.unsigned_abs();
            let value = format!(
                "{sign}{}.{:09}",
                magnitude / 1_000_000_000,
                magnitude % 1_000_000_000
            );
            records.extend(pax_record("mtime", &value));
        }
        for attribute in &entry.xattrs {
            let key = [&b"SCHILY.xattr."[..], &attribute.name].concat();
            records.extend(pax_record_bytes(&key, &attribute.value));
        }
        if records.is_empty() {
            return Ok(());
        }
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::XHeader);
        header.set_mode(0o644);
        header.set_size(records.len() as u64);
        header.set_path("PaxHeader").map_err(Self::io_error(path))?;
        header.set_cksum();
        self.builder
            .append(&header, records.as_slice())
            .map_err(Self::io_error(path))
    }

    fn io_error(path: &[u8]) -> impl Fn(io::Error) -> RestoreError + '_ {
        move |source| RestoreError::Io {
            path: path_of(path).to_owned(),
            source,
        }
    }

    fn check(&self, path: &[u8]) -> Result<(), RestoreError> {
        check_relative_path(path)?;
        match &self.file {
            Some((open, _, _)) => Err(RestoreError::OutOfOrder(format!(
                "{} arrived before {} was ended",
                lossy(path),
                open.display()
            ))),
            None => Ok(()),
        }
    }
}

impl<W: Write> RestoreTarget for TarTarget<W> {
    fn directory(&mut self, path: &[u8], entry: &TreeEntry) -> Result<(), RestoreError> {
        self.check(path)?;
        self.pax_header(path, entry)?;
        let mut header = Self::header(entry, tar::EntryType::Directory, 0);
        let mut name = path.to_vec();
        name.push(b'/');
        self.builder
            .append_data(&mut header, path_of(&name), io::empty())
            .map_err(Self::io_error(path))
    }

    fn file_start(&mut self, path: &[u8], entry: &TreeEntry) -> Result<(), RestoreError> {
        self.check(path)?;
        self.pax_header(path, entry)?;
        // The header carries the size up front; the content follows it
        // piece by piece and `file_end` pads it to the 512-byte block.
        let mut header = Self::header(entry, tar::EntryType::Regular, entry.size);
        self.builder
            .append_data(&mut header, path_of(path), io::empty())
            .map_err(Self::io_error(path))?;
        self.file = Some((path_of(path).to_owned(), entry.size, 0));
        Ok(())
    }

    fn file_data(&mut self, bytes: &[u8]) -> Result<(), RestoreError> {
        let Some((path, size, written)) = &mut self.file else {
            return Err(RestoreError::OutOfOrder(
                "file data without a file".to_owned(),
            ));
        };
        if *written + bytes.len() as u64 > *size {
            return Err(RestoreError::BadEntry {
                path: path.display().to_string(),
                reason: format!("more than the {size} bytes the entry says"),
            });
        }
        self.builder
            .get_mut()
            .write_all(bytes)
            .map_err(|source| RestoreError::Io {
                path: path.clone(),
                source,
            })?;
        *written += bytes.len() as u64;
        Ok(())
    }

    fn file_end(&mut self) -> Result<(), RestoreError> {
        let Some((path, size, written)) = self.file.take() else {
            return Err(RestoreError::OutOfOrder(
                "file end without a file".to_owned(),
            ));
        };
        if written != size {
            return Err(RestoreError::BadEntry {
                path: path.display().to_string(),
                reason: format!("{written} bytes arrived, the entry says {size}"),
            });
        }
        let padding = (512 - size % 512) % 512;
        self.builder
            .get_mut()
            .write_all(&[0u8; 512][..padding as usize])
            .map_err(|source| RestoreError::Io { path, source })
    }

    fn hard_link(
        &mut self,
        path: &[u8],
        existing: &[u8],
        entry: &TreeEntry,
    ) -> Result<(), RestoreError> {
        self.check(path)?;
        check_relative_path(existing)?;
        let mut header = Self::header(entry, tar::EntryType::Link, 0);
        self.builder
            .append_link(&mut header, path_of(path), path_of(existing))
            .map_err(Self::io_error(path))
    }

    fn symlink(&mut self, path: &[u8], entry: &TreeEntry) -> Result<(), RestoreError> {
        self.check(path)?;
        self.pax_header(path, entry)?;
        let mut header = Self::header(entry, tar::EntryType::Symlink, 0);
        self.builder
            .append_link(&mut header, path_of(path), path_of(&entry.symlink_target))
            .map_err(Self::io_error(path))
    }

    fn other(&mut self, path: &[u8], entry: &TreeEntry) -> Result<(), RestoreError> {
        self.check(path)?;
        warn_special_skipped(path_of(path), entry);
        Ok(())
    }

    fn finish(&mut self) -> Result<(), RestoreError> {
        if let Some((path, _, _)) = &self.file {
            return Err(RestoreError::OutOfOrder(format!(
                "finished while {} was open",
                path.display()
            )));
        }
        self.builder.finish().map_err(|source| RestoreError::Io {
            path: PathBuf::from("<tar stream>"),
            source,
        })?;
        self.builder
            .get_mut()
            .flush()
            .map_err(|source| RestoreError::Io {
                path: PathBuf::from("<tar stream>"),
                source,
            })
    }
}

#[cfg(test)]
mod tests;
