//! Looking into snapshots without restoring them: `fabricctl ls` (one
//! snapshot's listing), `fabricctl diff` (what changed between two), and the
//! walk over a snapshot's listing that `restore --dry-run` and restore's
//! check for entries already in the target take.
//!
//! Trees are read from a node holding the snapshot with `Storage.GetTree`,
//! page by page, and every listing is checked against its tree id before it
//! is used (the id is the BLAKE3 of the listing's encoding, or of the tree
//! chunk listing its parts: [`fabric_chunkstore::tree_parts::tree_chunks`]
//! computes both), so a node cannot show a listing other than the one the
//! snapshot names. Every name is checked as a restore checks it, since a
//! dry run looks up paths under the target.
//!
//! The diff never reads a subtree whose id is the same in both snapshots:
//! the same id is the same content, metadata and all, so a diff of two
//! nearly identical snapshots reads only the trees along the changed paths.
//!
//! Who may browse is who may restore: `GetTree` is open to operators and
//! clients (and nodes), and a client finds only its own host's snapshots
//! (the coordinator filters the catalogue, the node checks the owner of
//! `GetSnapshot`).

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use fabric_chunkstore::ChunkId;
use fabric_chunkstore::restore::{Action, ExistingEntries, Found, check_entry_name, decide};
use fabric_proto::v1::storage_client::StorageClient;
use fabric_proto::v1::{EntryKind, GetSnapshotRequest, GetTreeRequest, Snapshot, Tree, TreeEntry};
use serde::Serialize;
use tonic::transport::Channel;

use crate::output::{self, OutputFormat, Row, bytes, time_ms};
use crate::remote::{self, Located, Remote};

/// Entries asked for per `GetTree` page; halved while a page does not fit
/// in one message (a directory of files of very many chunks).
const PAGE_ENTRIES: u32 = 4096;

/// Where listings come from: a node, or trees in memory in tests.
pub(crate) trait Trees {
    /// The whole listing of tree `id` (the directory `path`, for
    /// messages), checked against the id.
    async fn listing(&mut self, id: &ChunkId, path: &str) -> anyhow::Result<Vec<TreeEntry>>;
}

/// Whether `entries` is the listing whose tree id is `id`: stored whole or
/// in parts, the tree chunk a store would write for it has that id.
pub(crate) fn listing_matches(id: &ChunkId, entries: Vec<TreeEntry>) -> (bool, Vec<TreeEntry>) {
    let tree = Tree {
        entries,
        parts: Vec::new(),
    };
    let (chunk, _) = fabric_chunkstore::tree_parts::tree_chunks(&tree);
    (chunk.id == *id, tree.entries)
}

/// Listings read from one node with `GetTree`.
pub(crate) struct NodeTrees {
    client: StorageClient<Channel>,
    /// The node, for messages.
    pub node: String,
}

impl Trees for NodeTrees {
    async fn listing(&mut self, id: &ChunkId, path: &str) -> anyhow::Result<Vec<TreeEntry>> {
        let mut entries: Vec<TreeEntry> = Vec::new();
        let mut page = PAGE_ENTRIES;
        loop {
            let start_after = entries.last().map(|e| e.name.clone()).unwrap_or_default();
            let answer = self
                .client
                .get_tree(GetTreeRequest {
                    id: id.to_vec(),
                    start_after,
                    max_entries: page,
                    without_chunk_ids: false,
                })
                .await;
            match answer {
                Ok(tree) => {
                    let got = tree.into_inner().entries;
                    let last = got.len() < page as usize;
                    entries.extend(got);
                    if last {
                        break;
                    }
                }
                Err(status) if status.code() == tonic::Code::OutOfRange && page > 1 => {
                    page /= 2;
                }
                Err(status) => {
                    return Err(remote::status_error(
                        &format!("reading the listing of {} on {}", shown(path), self.node),
                        status,
                    ));
                }
            }
        }
        let (matches, entries) = listing_matches(id, entries);
        if !matches {
            bail!(
                "node {} sent a listing of {} that does not match its tree id {id}: that copy \
                 may be damaged (--node picks another)",
                self.node,
                shown(path)
            );
        }
        Ok(entries)
    }
}

/// A path for messages: "/" for the root.
fn shown(path: &str) -> String {
    if path.is_empty() {
        "/".to_owned()
    } else {
        path.to_owned()
    }
}

/// A snapshot opened for browsing on one of its copies.
pub(crate) struct Opened {
    pub trees: NodeTrees,
    pub snapshot: Snapshot,
    pub root: ChunkId,
}

/// Open the snapshot on the first of `copies` that answers (its record
/// there gives the root tree).
pub(crate) async fn open_copy(remote: &Remote, copies: &[Located]) -> anyhow::Result<Opened> {
    let mut reasons = Vec::new();
    for copy in copies {
        let mut client = match remote.storage(&copy.peer).await {
            Ok(client) => client,
            Err(err) => {
                reasons.push(format!("{}: {err:#}", copy.node));
                continue;
            }
        };
        let snapshot = match client
            .get_snapshot(GetSnapshotRequest {
                snapshot: copy.snapshot_id.clone(),
            })
            .await
        {
            Ok(snapshot) => snapshot.into_inner(),
            Err(status) => {
                reasons.push(format!(
                    "{:#}",
                    remote::status_error(&format!("reading the snapshot on {}", copy.node), status)
                ));
                continue;
            }
        };
        let root = ChunkId::from_slice(&snapshot.root_tree_id).map_err(|err| {
            anyhow!(
                "snapshot {} on {} has a bad root tree id: {err}",
                copy.snapshot_id,
                copy.node
            )
        })?;
        return Ok(Opened {
            trees: NodeTrees {
                client,
                node: copy.node.clone(),
            },
            snapshot,
            root,
        });
    }
    bail!(
        "no copy of the snapshot could be read: {}",
        reasons.join("; ")
    )
}

/// Find the snapshot `spec` names and open it on a copy.
pub(crate) async fn open(
    remote: &Remote,
    spec: &str,
    node: Option<String>,
    job: Option<String>,
) -> anyhow::Result<Opened> {
    let copies = remote::locate_all(remote, spec, node, job).await?;
    open_copy(remote, &copies).await
}

/// What a path inside a snapshot names.
pub(crate) enum Start {
    /// A directory: its tree, and its path (for messages).
    Tree(ChunkId, String),
    /// Anything else: its entry.
    Entry(Box<TreeEntry>),
    /// Nothing.
    Missing,
}

fn subtree_of(path: &str, entry: &TreeEntry) -> anyhow::Result<ChunkId> {
    ChunkId::from_slice(&entry.subtree_id)
        .map_err(|err| anyhow!("directory {} has a bad tree id: {err}", shown(path)))
}

/// Join `name` to `prefix` with `/`, checking the name as a restore does.
fn child_path(prefix: &str, name: &[u8]) -> anyhow::Result<String> {
    check_entry_name(name).map_err(|err| anyhow!("in {}: {err}", shown(prefix)))?;
    let name = String::from_utf8_lossy(name);
    Ok(if prefix.is_empty() {
        name.into_owned()
    } else {
        format!("{prefix}/{name}")
    })
}

/// Find `path` ("" or "/" for the root) below `root`.
pub(crate) async fn resolve(
    trees: &mut impl Trees,
    root: ChunkId,
    path: &str,
) -> anyhow::Result<Start> {
    let mut current = Start::Tree(root, String::new());
    let mut walked = String::new();
    for component in path.split('/').filter(|part| !part.is_empty()) {
        let id = match &current {
            Start::Tree(id, _) => *id,
            _ => return Ok(Start::Missing),
        };
        let listing = trees.listing(&id, &walked).await?;
        let Ok(index) =
            listing.binary_search_by(|entry| entry.name.as_slice().cmp(component.as_bytes()))
        else {
            return Ok(Start::Missing);
        };
        let entry = &listing[index];
        walked = child_path(&walked, &entry.name)?;
        current = if entry.kind() == EntryKind::Dir {
            Start::Tree(subtree_of(&walked, entry)?, walked.clone())
        } else {
            Start::Entry(Box::new(entry.clone()))
        };
    }
    Ok(current)
}

/// The entries below a path of a snapshot, a directory before its
/// contents, names in order; paths relative to the directory (a single
/// entry under its own name), as a restore writes them.
pub(crate) struct Walk {
    stack: Vec<(String, std::vec::IntoIter<TreeEntry>)>,
    recursive: bool,
    single: Option<(String, TreeEntry)>,
}

impl Walk {
    /// Start at `path` of the snapshot `root`; `recursive` enters
    /// directories. An error names a path that is not there.
    pub(crate) async fn start(
        trees: &mut impl Trees,
        root: ChunkId,
        path: &str,
        recursive: bool,
    ) -> anyhow::Result<Self> {
        let mut walk = Self {
            stack: Vec::new(),
            recursive,
            single: None,
        };
        match resolve(trees, root, path).await? {
            Start::Missing => bail!("no such path in the snapshot: {path:?}"),
            Start::Entry(entry) => {
                let name = child_path("", &entry.name)?;
                walk.single = Some((name, *entry));
            }
            Start::Tree(id, at) => {
                let listing = trees.listing(&id, &at).await?;
                walk.stack.push((String::new(), listing.into_iter()));
            }
        }
        Ok(walk)
    }

    /// The next entry and its path, or None at the end.
    pub(crate) async fn next(
        &mut self,
        trees: &mut impl Trees,
    ) -> anyhow::Result<Option<(String, TreeEntry)>> {
        if let Some(single) = self.single.take() {
            return Ok(Some(single));
        }
        while let Some((prefix, entries)) = self.stack.last_mut() {
            let Some(entry) = entries.next() else {
                self.stack.pop();
                continue;
            };
            let path = child_path(prefix, &entry.name)?;
            if self.recursive && entry.kind() == EntryKind::Dir {
                let listing = trees.listing(&subtree_of(&path, &entry)?, &path).await?;
                self.stack.push((path.clone(), listing.into_iter()));
            }
            return Ok(Some((path, entry)));
        }
        Ok(None)
    }
}

/// An entry's kind, as ls and diff name it.
fn kind_name(entry: &TreeEntry) -> &'static str {
    match entry.kind() {
        EntryKind::Dir => "dir",
        EntryKind::File => "file",
        EntryKind::Symlink => "symlink",
        EntryKind::Other => "other",
        EntryKind::Unspecified => "unknown",
    }
}

/// `drwxr-xr-x`, as ls shows a mode (setuid, setgid and sticky included).
pub fn mode_string(mode: u32) -> String {
    let kind = match mode & 0o170000 {
        0o040000 => 'd',
        0o120000 => 'l',
        0o010000 => 'p',
        0o020000 => 'c',
        0o060000 => 'b',
        0o140000 => 's',
        _ => '-',
    };
    let mut text = String::from(kind);
    for (shift, special, set, unset) in [(6, 0o4000, 's', 'S'), (3, 0o2000, 's', 'S')]
        .into_iter()
        .chain([(0, 0o1000, 't', 'T')])
    {
        let bits = (mode >> shift) & 0o7;
        text.push(if bits & 4 != 0 { 'r' } else { '-' });
        text.push(if bits & 2 != 0 { 'w' } else { '-' });
        text.push(match (bits & 1 != 0, mode & special != 0) {
            (true, true) => set,
            (false, true) => unset,
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    text
}

fn mtime(entry: &TreeEntry) -> String {
    time_ms(entry.mtime_ns.div_euclid(1_000_000))
}

/// A row of `fabricctl ls`.
#[derive(Debug, Serialize)]
pub struct LsRow {
    /// The path, relative to the listed directory.
    pub path: String,
    /// dir, file, symlink or other.
    pub kind: &'static str,
    /// Permission bits, setuid, setgid and sticky, in octal.
    pub mode: String,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// A file's size in bytes (0 for other kinds).
    pub size: u64,
    /// Modification time, UTC ("-" when not recorded).
    pub mtime: String,
    /// A symlink's target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl Row for LsRow {
    fn headers() -> &'static [&'static str] {
        &["mode", "owner", "size", "mtime", "name"]
    }
    fn cells(&self) -> Vec<String> {
        let mode = u32::from_str_radix(&self.mode, 8).unwrap_or(0);
        let kind_bits = match self.kind {
            "dir" => 0o040000,
            "symlink" => 0o120000,
            "file" => 0o100000,
            _ => 0,
        };
        let name = match &self.target {
            Some(target) => format!("{} -> {target}", self.path),
            None => self.path.clone(),
        };
        vec![
            mode_string(kind_bits | mode),
            format!("{}:{}", self.uid, self.gid),
            if self.kind == "file" {
                bytes(self.size)
            } else {
                "-".to_owned()
            },
            self.mtime.clone(),
            name,
        ]
    }
}

/// The `ls` row of the entry at `path`.
pub fn ls_row(path: String, entry: &TreeEntry) -> LsRow {
    LsRow {
        path,
        kind: kind_name(entry),
        mode: format!("{:04o}", entry.mode & 0o7777),
        uid: entry.uid,
        gid: entry.gid,
        size: entry.size,
        mtime: mtime(entry),
        target: (entry.kind() == EntryKind::Symlink)
            .then(|| String::from_utf8_lossy(&entry.symlink_target).into_owned()),
    }
}

/// `fabricctl ls SNAPSHOT [PATH]`.
pub async fn ls(
    remote: &Remote,
    spec: &str,
    path: &str,
    recursive: bool,
    node: Option<String>,
    job: Option<String>,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let mut opened = open(remote, spec, node, job).await?;
    let mut walk = Walk::start(&mut opened.trees, opened.root, path, recursive).await?;
    let mut rows = Vec::new();
    while let Some((path, entry)) = walk.next(&mut opened.trees).await? {
        rows.push(ls_row(path, &entry));
    }
    output::print_rows(&rows, format)
}

/// How an entry changed between two snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Only in the second (`+`).
    Added,
    /// Only in the first (`-`).
    Removed,
    /// Content or size changed (`M`): a file's chunks, a symlink's target.
    Modified,
    /// Only mode, owner, mtime or extended attributes changed (`m`).
    Metadata,
}

impl Change {
    fn mark(self) -> &'static str {
        match self {
            Change::Added => "+",
            Change::Removed => "-",
            Change::Modified => "M",
            Change::Metadata => "m",
        }
    }
}

/// One line of a diff.
#[derive(Debug, Serialize)]
pub struct DiffRow {
    /// added, removed, modified or metadata.
    pub change: Change,
    /// The path, relative to the compared directory.
    pub path: String,
    /// dir, file, symlink or other (the second snapshot's, when both).
    pub kind: &'static str,
    /// Size in the first snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_before: Option<u64>,
    /// Size in the second snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_after: Option<u64>,
    /// What changed: content, size, target, kind, mode, owner, mtime, xattrs.
    pub what: Vec<&'static str>,
}

impl Row for DiffRow {
    fn headers() -> &'static [&'static str] {
        &["", "path", "changed"]
    }
    fn cells(&self) -> Vec<String> {
        let sizes = match (self.size_before, self.size_after) {
            (Some(before), Some(after)) if before != after => {
                format!(" ({} -> {})", bytes(before), bytes(after))
            }
            _ => String::new(),
        };
        vec![
            self.change.mark().to_owned(),
            self.path.clone(),
            format!("{}{sizes}", self.what.join(",")),
        ]
    }
}

/// The counts of a diff.
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct DiffSummary {
    /// Entries only in the second snapshot.
    pub added: u64,
    /// Their files' bytes.
    pub added_bytes: u64,
    /// Entries only in the first.
    pub removed: u64,
    /// Their files' bytes.
    pub removed_bytes: u64,
    /// Entries whose content changed.
    pub modified: u64,
    /// Their bytes in the first snapshot.
    pub modified_bytes_before: u64,
    /// Their bytes in the second.
    pub modified_bytes_after: u64,
    /// Entries whose metadata alone changed.
    pub metadata: u64,
}

impl DiffSummary {
    fn add(&mut self, row: &DiffRow) {
        let before = row.size_before.unwrap_or(0);
        let after = row.size_after.unwrap_or(0);
        match row.change {
            Change::Added => {
                self.added += 1;
                self.added_bytes += after;
            }
            Change::Removed => {
                self.removed += 1;
                self.removed_bytes += before;
            }
            Change::Modified => {
                self.modified += 1;
                self.modified_bytes_before += before;
                self.modified_bytes_after += after;
            }
            Change::Metadata => self.metadata += 1,
        }
    }

    /// The summary line.
    pub fn line(&self) -> String {
        format!(
            "{} added ({}), {} removed ({}), {} modified ({} -> {}), {} metadata only",
            self.added,
            bytes(self.added_bytes),
            self.removed,
            bytes(self.removed_bytes),
            self.modified,
            bytes(self.modified_bytes_before),
            bytes(self.modified_bytes_after),
            self.metadata
        )
    }
}

/// What `fabricctl diff` prints as JSON.
#[derive(Debug, Serialize)]
pub struct DiffReport {
    /// Every change, by path.
    pub changes: Vec<DiffRow>,
    /// Their counts.
    pub summary: DiffSummary,
}

/// What of the metadata differs between `a` and `b`.
fn metadata_changes(a: &TreeEntry, b: &TreeEntry) -> Vec<&'static str> {
    let mut what = Vec::new();
    if a.mode & 0o7777 != b.mode & 0o7777 {
        what.push("mode");
    }
    if (a.uid, a.gid) != (b.uid, b.gid) {
        what.push("owner");
    }
    if a.mtime_ns != b.mtime_ns {
        what.push("mtime");
    }
    if a.xattrs != b.xattrs {
        what.push("xattrs");
    }
    what
}

/// What of the content differs between `a` and `b`, of the same kind.
fn content_changes(a: &TreeEntry, b: &TreeEntry) -> Vec<&'static str> {
    let mut what = Vec::new();
    match a.kind() {
        EntryKind::File => {
            if a.chunk_ids != b.chunk_ids {
                what.push("content");
            }
            if a.size != b.size {
                what.push("size");
            }
        }
        EntryKind::Symlink if a.symlink_target != b.symlink_target => what.push("target"),
        // A special file's type lives in its mode.
        EntryKind::Other if a.mode != b.mode => what.push("kind"),
        _ => {}
    }
    what
}

fn file_size(entry: &TreeEntry) -> Option<u64> {
    Some(entry.size)
}

/// One side of a directory being compared: its tree, if it has one.
type Side = Option<ChunkId>;

/// Compare what `a` and `b` hold below the directories whose trees they
/// are (or hold as single entries), with paths under `prefix`. A pair of
/// equal tree ids is never read.
pub(crate) async fn diff_trees(
    trees_a: &mut impl Trees,
    trees_b: &mut impl Trees,
    a: Side,
    b: Side,
    prefix: &str,
) -> anyhow::Result<Vec<DiffRow>> {
    let mut rows = Vec::new();
    let mut pending: Vec<(String, Side, Side)> = vec![(prefix.to_owned(), a, b)];
    while let Some((at, a, b)) = pending.pop() {
        if a.is_some() && a == b {
            continue;
        }
        let listing_a = match &a {
            Some(id) => trees_a.listing(id, &at).await?,
            None => Vec::new(),
        };
        let listing_b = match &b {
            Some(id) => trees_b.listing(id, &at).await?,
            None => Vec::new(),
        };
        let mut left = listing_a.into_iter().peekable();
        let mut right = listing_b.into_iter().peekable();
        loop {
            let order = match (left.peek(), right.peek()) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(x), Some(y)) => x.name.cmp(&y.name),
            };
            let (old, new) = match order {
                std::cmp::Ordering::Less => (left.next(), None),
                std::cmp::Ordering::Greater => (None, right.next()),
                std::cmp::Ordering::Equal => (left.next(), right.next()),
            };
            compare_entries(old, new, &at, &mut rows, &mut pending)?;
        }
    }
    rows.sort_by(|x, y| x.path.cmp(&y.path));
    Ok(rows)
}

/// Compare one name's entries in the two snapshots (either may be
/// missing): the rows it makes, and the directories still to compare.
fn compare_entries(
    old: Option<TreeEntry>,
    new: Option<TreeEntry>,
    at: &str,
    rows: &mut Vec<DiffRow>,
    pending: &mut Vec<(String, Side, Side)>,
) -> anyhow::Result<()> {
    let name = match (&old, &new) {
        (Some(entry), _) | (None, Some(entry)) => entry.name.clone(),
        (None, None) => return Ok(()),
    };
    let path = child_path(at, &name)?;
    let subtree = |entry: &Option<TreeEntry>| -> anyhow::Result<Side> {
        match entry {
            Some(entry) if entry.kind() == EntryKind::Dir => Ok(Some(subtree_of(&path, entry)?)),
            _ => Ok(None),
        }
    };
    let (sub_old, sub_new) = (subtree(&old)?, subtree(&new)?);
    match (old, new) {
        (Some(old), Some(new)) if old.kind == new.kind => {
            let content = content_changes(&old, &new);
            let metadata = metadata_changes(&old, &new);
            let change = if !content.is_empty() {
                Some(Change::Modified)
            } else if !metadata.is_empty() {
                Some(Change::Metadata)
            } else {
                None
            };
            if let Some(change) = change {
                rows.push(DiffRow {
                    change,
                    path: path.clone(),
                    kind: kind_name(&new),
                    size_before: file_size(&old),
                    size_after: file_size(&new),
                    what: content.into_iter().chain(metadata).collect(),
                });
            }
        }
        (old, new) => {
            // Present on one side only, or a different kind: what went and
            // what came.
            if let Some(old) = old {
                rows.push(DiffRow {
                    change: Change::Removed,
                    path: path.clone(),
                    kind: kind_name(&old),
                    size_before: file_size(&old),
                    size_after: None,
                    what: Vec::new(),
                });
            }
            if let Some(new) = new {
                rows.push(DiffRow {
                    change: Change::Added,
                    path: path.clone(),
                    kind: kind_name(&new),
                    size_before: None,
                    size_after: file_size(&new),
                    what: Vec::new(),
                });
            }
        }
    }
    if sub_old.is_some() || sub_new.is_some() {
        pending.push((path, sub_old, sub_new));
    }
    Ok(())
}

/// What a path names in a snapshot, as one side of a diff: a directory's
/// tree, or a single entry (in a listing of its own).
async fn diff_side(
    trees: &mut impl Trees,
    root: ChunkId,
    path: &str,
) -> anyhow::Result<(Side, Option<TreeEntry>)> {
    Ok(match resolve(trees, root, path).await? {
        Start::Tree(id, _) => (Some(id), None),
        Start::Entry(entry) => (None, Some(*entry)),
        Start::Missing => (None, None),
    })
}

/// `fabricctl diff A B [PATH]`.
pub async fn diff(
    remote: &Remote,
    spec_a: &str,
    spec_b: &str,
    path: &str,
    node: Option<String>,
    job: Option<String>,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let mut a = open(remote, spec_a, node.clone(), job.clone())
        .await
        .with_context(|| format!("the first snapshot, {spec_a:?}"))?;
    let mut b = open(remote, spec_b, node, job)
        .await
        .with_context(|| format!("the second snapshot, {spec_b:?}"))?;
    let (tree_a, entry_a) = diff_side(&mut a.trees, a.root, path).await?;
    let (tree_b, entry_b) = diff_side(&mut b.trees, b.root, path).await?;
    if tree_a.is_none() && tree_b.is_none() && entry_a.is_none() && entry_b.is_none() {
        bail!("no such path in either snapshot: {path:?}");
    }
    let mut changes = Vec::new();
    if entry_a.is_some() || entry_b.is_some() {
        // A single entry on at least one side: compared as a name in a
        // listing of its own, under the parent's path.
        let parent = path
            .trim_end_matches('/')
            .rsplit_once('/')
            .map_or("", |(parent, _)| parent)
            .trim_start_matches('/');
        let as_entry = |tree: Side, entry: Option<TreeEntry>| {
            entry.or_else(|| {
                tree.map(|id| TreeEntry {
                    name: path
                        .trim_end_matches('/')
                        .rsplit('/')
                        .next()
                        .unwrap_or_default()
                        .as_bytes()
                        .to_vec(),
                    kind: EntryKind::Dir as i32,
                    subtree_id: id.to_vec(),
                    ..TreeEntry::default()
                })
            })
        };
        let mut pending = Vec::new();
        compare_entries(
            as_entry(tree_a, entry_a),
            as_entry(tree_b, entry_b),
            parent,
            &mut changes,
            &mut pending,
        )?;
        for (at, x, y) in pending {
            changes.extend(diff_trees(&mut a.trees, &mut b.trees, x, y, &at).await?);
        }
    } else {
        changes = diff_trees(&mut a.trees, &mut b.trees, tree_a, tree_b, "").await?;
    }
    let mut summary = DiffSummary::default();
    for row in &changes {
        summary.add(row);
    }
    match format {
        OutputFormat::Json => {
            output::print_one(&DiffReport { changes, summary }, format, |_| String::new())
        }
        OutputFormat::Table => {
            output::print_rows(&changes, format)?;
            crate::outln!("{}", summary.line())?;
            Ok(())
        }
    }
}

/// What a restore would do at one path of the target, for `--dry-run`.
#[derive(Debug, Serialize)]
pub struct PlanRow {
    /// write, replace, merge, keep, conflict or blocked.
    pub action: &'static str,
    /// The path in the target.
    pub path: String,
    /// dir, file, symlink or other.
    pub kind: &'static str,
    /// A file's size.
    pub size: u64,
    /// Why, for blocked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

impl Row for PlanRow {
    fn headers() -> &'static [&'static str] {
        &["action", "path", "kind", "size"]
    }
    fn cells(&self) -> Vec<String> {
        let path = match self.reason {
            Some(reason) => format!("{} ({reason})", self.path),
            None => self.path.clone(),
        };
        vec![
            self.action.to_owned(),
            path,
            self.kind.to_owned(),
            if self.kind == "file" {
                bytes(self.size)
            } else {
                "-".to_owned()
            },
        ]
    }
}

/// The word a dry run shows for `action`.
fn action_name(action: Action) -> &'static str {
    match action {
        Action::Create => "write",
        Action::Replace => "replace",
        Action::Merge => "merge",
        Action::MergeKeeping => "keep",
        Action::Keep => "keep",
        Action::Conflict => "conflict",
        Action::Blocked(_) => "blocked",
    }
}

/// What is at `at` (never followed).
fn found_at(at: &Path) -> anyhow::Result<Found> {
    match std::fs::symlink_metadata(at) {
        Ok(meta) if meta.is_dir() => Ok(Found::Directory),
        Ok(_) => Ok(Found::Other),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Found::Nothing),
        Err(err) => Err(anyhow!("cannot look at {}: {err}", at.display())),
    }
}

/// Decides, entry by entry of a walk, what a restore into `target` would do.
pub(crate) struct Planner<'a> {
    target: Option<&'a Path>,
    existing: ExistingEntries,
    /// Directories the restore would create: nothing is below them yet.
    new_dirs: HashSet<String>,
}

impl<'a> Planner<'a> {
    /// For a restore into `target` (None: a tar stream, where every entry
    /// is written) under `existing`.
    pub(crate) fn new(target: Option<&'a Path>, existing: ExistingEntries) -> Self {
        Self {
            target,
            existing,
            new_dirs: HashSet::new(),
        }
    }

    /// What the restore would do with `entry` at `path`.
    pub(crate) fn plan(&mut self, path: &str, entry: &TreeEntry) -> anyhow::Result<PlanRow> {
        let directory = entry.kind() == EntryKind::Dir;
        let parent = path.rsplit_once('/').map(|(parent, _)| parent);
        let action = match self.target {
            None => Action::Create,
            // A FIFO, socket or device is never created, so never in the way.
            Some(_) if entry.kind() == EntryKind::Other => Action::Create,
            Some(_) if parent.is_some_and(|parent| self.new_dirs.contains(parent)) => {
                Action::Create
            }
            Some(target) => decide(self.existing, found_at(&target.join(path))?, directory),
        };
        if directory && action == Action::Create {
            self.new_dirs.insert(path.to_owned());
        }
        let action_word = if entry.kind() == EntryKind::Other && self.target.is_some() {
            "skip"
        } else {
            action_name(action)
        };
        Ok(PlanRow {
            action: action_word,
            path: path.to_owned(),
            kind: kind_name(entry),
            size: entry.size,
            reason: match action {
                Action::Blocked(reason) => Some(reason),
                Action::MergeKeeping => Some("a directory already there, its metadata kept"),
                _ => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Trees in memory, counting reads.
    #[derive(Default)]
    struct Memory {
        trees: HashMap<ChunkId, Vec<TreeEntry>>,
        reads: HashMap<ChunkId, usize>,
    }

    impl Memory {
        fn put(&mut self, mut entries: Vec<TreeEntry>) -> ChunkId {
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            let tree = Tree {
                entries,
                parts: Vec::new(),
            };
            let id = fabric_chunkstore::tree_parts::tree_chunks(&tree).0.id;
            self.trees.insert(id, tree.entries);
            id
        }
    }

    impl Trees for Memory {
        async fn listing(&mut self, id: &ChunkId, path: &str) -> anyhow::Result<Vec<TreeEntry>> {
            *self.reads.entry(*id).or_default() += 1;
            self.trees
                .get(id)
                .cloned()
                .ok_or_else(|| anyhow!("no tree {id} for {path}"))
        }
    }

    fn file(name: &str, content: &[u8], mtime_ns: i64) -> TreeEntry {
        TreeEntry {
            name: name.as_bytes().to_vec(),
            kind: EntryKind::File as i32,
            mode: 0o100644,
            size: content.len() as u64,
            mtime_ns,
            chunk_ids: vec![fabric_chunkstore::Chunk::new(content.to_vec()).id.to_vec()],
            ..TreeEntry::default()
        }
    }

    fn dir(name: &str, subtree: ChunkId) -> TreeEntry {
        TreeEntry {
            name: name.as_bytes().to_vec(),
            kind: EntryKind::Dir as i32,
            mode: 0o40755,
            subtree_id: subtree.to_vec(),
            ..TreeEntry::default()
        }
    }

    fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(future)
    }

    #[test]
    fn a_diff_names_each_change_and_never_reads_an_unchanged_subtree() {
        let mut memory = Memory::default();
        let same = memory.put(vec![file("big", b"unchanged", 1)]);
        let gone = memory.put(vec![file("inside", b"1234", 1)]);
        let a = memory.put(vec![
            dir("same", same),
            dir("gone", gone),
            file("edited", b"old", 1),
            file("touched", b"same", 1),
            file("kind", b"x", 1),
        ]);
        let mut symlink = file("kind", b"", 1);
        symlink.kind = EntryKind::Symlink as i32;
        symlink.symlink_target = b"elsewhere".to_vec();
        symlink.chunk_ids.clear();
        let a_root = a;
        let b_root = memory.put(vec![
            dir("same", same),
            file("edited", b"newer", 1),
            file("touched", b"same", 2),
            file("added", b"12345", 1),
            symlink,
        ]);
        let mut other = Memory {
            trees: memory.trees.clone(),
            ..Memory::default()
        };
        let rows = block_on(diff_trees(
            &mut memory,
            &mut other,
            Some(a_root),
            Some(b_root),
            "",
        ))
        .expect("diff");
        let got: Vec<(Change, &str, Vec<&str>)> = rows
            .iter()
            .map(|row| (row.change, row.path.as_str(), row.what.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Change::Added, "added", vec![]),
                (Change::Modified, "edited", vec!["content", "size"]),
                (Change::Removed, "gone", vec![]),
                (Change::Removed, "gone/inside", vec![]),
                (Change::Removed, "kind", vec![]),
                (Change::Added, "kind", vec![]),
                (Change::Metadata, "touched", vec!["mtime"]),
            ]
        );
        assert_eq!(
            memory.reads.get(&same),
            None,
            "the same subtree is not read"
        );
        assert_eq!(other.reads.get(&same), None, "the same subtree is not read");
        let mut summary = DiffSummary::default();
        for row in &rows {
            summary.add(row);
        }
        assert_eq!(
            summary,
            DiffSummary {
                added: 2,
                added_bytes: 5,
                removed: 3,
                removed_bytes: 5,
                modified: 1,
                modified_bytes_before: 3,
                modified_bytes_after: 5,
                metadata: 1,
            }
        );
        assert_eq!(
            summary.line(),
            "2 added (5 B), 3 removed (5 B), 1 modified (3 B -> 5 B), 1 metadata only"
        );
    }

    #[test]
    fn a_walk_goes_depth_first_and_refuses_a_hostile_name() {
        let mut memory = Memory::default();
        let inner = memory.put(vec![file("b", b"b", 1)]);
        let root = memory.put(vec![dir("a", inner), file("c", b"c", 1)]);
        let paths = block_on(async {
            let mut walk = Walk::start(&mut memory, root, "", true).await?;
            let mut paths = Vec::new();
            while let Some((path, _)) = walk.next(&mut memory).await? {
                paths.push(path);
            }
            anyhow::Ok(paths)
        })
        .expect("walk");
        assert_eq!(paths, ["a", "a/b", "c"]);
        let single = block_on(async {
            let mut walk = Walk::start(&mut memory, root, "/a/b", false).await?;
            walk.next(&mut memory).await
        })
        .expect("walk");
        assert_eq!(single.map(|(path, _)| path).as_deref(), Some("b"));
        let missing = block_on(Walk::start(&mut memory, root, "nope", false));
        assert!(
            missing
                .err()
                .is_some_and(|err| err.to_string().contains("\"nope\"")),
            "a missing path is named"
        );
        let hostile = memory.put(vec![file("..", b"x", 1)]);
        let err = block_on(async {
            let mut walk = Walk::start(&mut memory, hostile, "", true).await?;
            walk.next(&mut memory).await
        })
        .expect_err("refused");
        assert!(err.to_string().contains(".."), "{err}");
    }

    #[test]
    fn a_listing_is_checked_against_its_tree_id() {
        let entries = vec![file("a", b"a", 1)];
        let id = Memory::default().put(entries.clone());
        assert!(listing_matches(&id, entries.clone()).0);
        let mut forged = entries;
        forged[0].size = 99;
        assert!(!listing_matches(&id, forged).0);
    }

    #[test]
    fn modes_read_as_ls_shows_them() {
        assert_eq!(mode_string(0o40755), "drwxr-xr-x");
        assert_eq!(mode_string(0o100644), "-rw-r--r--");
        assert_eq!(mode_string(0o104751), "-rwsr-x--x");
        assert_eq!(mode_string(0o41777), "drwxrwxrwt");
        assert_eq!(mode_string(0o120777), "lrwxrwxrwx");
    }

    #[test]
    fn a_dry_run_plans_as_the_target_would_act() {
        let temp = tempfile::tempdir().expect("tempdir");
        std::fs::write(temp.path().join("there"), b"x").expect("write");
        std::fs::create_dir(temp.path().join("dir")).expect("mkdir");
        let mut memory = Memory::default();
        let empty = memory.put(vec![]);
        let plan = |existing| {
            let mut planner = Planner::new(Some(temp.path()), existing);
            ["there", "missing", "dir", "new", "new/below"]
                .iter()
                .map(|path| {
                    let entry = if ["dir", "new"].contains(path) {
                        dir(path, empty)
                    } else {
                        file(path, b"x", 1)
                    };
                    planner.plan(path, &entry).expect("plan").action
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            plan(ExistingEntries::Refuse),
            ["conflict", "write", "conflict", "write", "write"]
        );
        assert_eq!(
            plan(ExistingEntries::Overwrite),
            ["replace", "write", "merge", "write", "write"]
        );
        assert_eq!(
            plan(ExistingEntries::Skip),
            ["keep", "write", "keep", "write", "write"]
        );
        let mut tar = Planner::new(None, ExistingEntries::Refuse);
        assert_eq!(
            tar.plan("there", &file("there", b"x", 1))
                .expect("plan")
                .action,
            "write"
        );
    }
}
