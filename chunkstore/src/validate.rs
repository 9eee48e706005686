//! What a store accepts as a snapshot: the rules of commit validation.
//!
//! Owns the checks every commit applies before a snapshot record is
//! written, whether its chunks came from a push, a pull, a node-to-node copy
//! or a local backup (they all end in [`crate::Store::commit_snapshot`]): the
//! record's labels and times ([`record_problem`]), each tree entry on its own
//! ([`entry_problem`]), a listing's order ([`listing_problem`]), and the
//! per-tree counts ([`TreeSummary`]) from which the store computes a
//! snapshot's size, depth and statistics itself, never taking a sender's
//! word for them.
//!
//! Pure functions of the records: this module must never read the store or
//! the clock (callers pass `now_ms`), so every rule is testable on its own.
//! Its messages quote at most [`QUOTE_BYTES`] of any input.

use fabric_proto::v1::{EntryKind, Snapshot, SnapshotType, Tree, TreeEntry};

/// Longest entry name, in bytes (Linux's NAME_MAX).
pub const MAX_NAME_BYTES: usize = 255;
/// Longest symlink target, in bytes (Linux's PATH_MAX).
pub const MAX_SYMLINK_TARGET_BYTES: usize = 4096;
/// Most extended attributes on one entry.
pub const MAX_XATTRS_PER_ENTRY: usize = 1024;
/// Longest extended attribute name (Linux's XATTR_NAME_MAX).
pub const MAX_XATTR_NAME_BYTES: usize = 255;
/// Largest extended attribute value (Linux's XATTR_SIZE_MAX).
pub const MAX_XATTR_VALUE_BYTES: usize = 64 * 1024;
/// Deepest directory nesting below the root, in trees. Deeper than any
/// real file system needs; bounds a walk's stack and a restore's path.
pub const MAX_DEPTH: u32 = 256;
/// Most entries a snapshot may expand to, counting every path through
/// shared subtrees (a tree referenced twice counts twice): what a restore
/// would create. Far above the largest real file systems, far below what a
/// few crafted trees that share each other can claim.
pub const MAX_SNAPSHOT_ENTRIES: u64 = 1 << 32;
/// Largest logical size a snapshot may expand to: 1 PiB.
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 50;
/// Earliest accepted entry time: 1900-01-01T00:00:00Z, in nanoseconds.
pub const MIN_TIME_NS: i64 = -2_208_988_800 * 1_000_000_000;
/// Longest job, host, instance, master host or instance, or tag, in bytes.
pub const MAX_LABEL_BYTES: usize = 128;
/// Most tags on one snapshot.
pub const MAX_TAGS: usize = 64;
/// How far in the future a start time may lie (clock skew): one day.
pub const MAX_START_SKEW_MS: i64 = 24 * 3600 * 1000;
/// The longest WORM window a record may ask for: 100 years.
pub const MAX_RETENTION_MS: i64 = 100 * 366 * 24 * 3600 * 1000;
/// Most warnings a snapshot keeps, and the longest kept warning, in bytes.
pub const MAX_WARNINGS: usize = 1000;
/// The longest warning kept, in bytes.
pub const MAX_WARNING_BYTES: usize = 1024;
/// The most bytes of any input a message quotes.
pub const QUOTE_BYTES: usize = 100;
/// Characters in a snapshot id: lowercase hex.
pub const SNAPSHOT_ID_LEN: usize = 32;

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;
const SPECIAL_TYPES: [u32; 4] = [0o010000, 0o020000, 0o060000, 0o140000];

/// `bytes` as lossy UTF-8, cut to [`QUOTE_BYTES`] (with `...` when cut):
/// what a message may show of an input.
pub fn quote(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(QUOTE_BYTES)];
    let mut text = String::from_utf8_lossy(cut).into_owned();
    if cut.len() < bytes.len() {
        text.push_str("...");
    }
    text
}

/// Whether `id` has the one snapshot id format: 32 lowercase hex digits.
pub fn is_snapshot_id(id: &str) -> bool {
    id.len() == SNAPSHOT_ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Why `name` is not a valid entry name, if it is not.
pub fn name_problem(name: &[u8]) -> Option<String> {
    if name.is_empty() {
        Some("empty name".into())
    } else if name == b"." || name == b".." {
        Some("name is . or ..".into())
    } else if name.contains(&b'/') {
        Some("name contains '/'".into())
    } else if name.contains(&0) {
        Some("name contains NUL".into())
    } else if name.len() > MAX_NAME_BYTES {
        Some(format!(
            "name of {} bytes (at most {MAX_NAME_BYTES})",
            name.len()
        ))
    } else {
        None
    }
}

/// Why `entry` is not a valid tree entry on its own, if it is not: its name,
/// kind, the fields its kind uses and leaves empty, its mode, times and
/// extended attributes. A file's size against its chunks needs the store and
/// is checked there.
pub fn entry_problem(entry: &TreeEntry) -> Option<String> {
    if let Some(problem) = name_problem(&entry.name) {
        return Some(problem);
    }
    let kind = match EntryKind::try_from(entry.kind) {
        Ok(EntryKind::Unspecified) | Err(_) => {
            return Some(format!("unknown entry kind {}", entry.kind));
        }
        Ok(kind) => kind,
    };
    if entry.mode > 0o177777 {
        return Some(format!("mode {:o} is not a file mode", entry.mode));
    }
    let file_type = entry.mode & S_IFMT;
    let type_fits = match kind {
        EntryKind::File => file_type == S_IFREG,
        EntryKind::Dir => file_type == S_IFDIR,
        EntryKind::Symlink => file_type == S_IFLNK,
        _ => SPECIAL_TYPES.contains(&file_type),
    };
    // A mode without type bits is accepted (records made by hand carry only
    // the permission bits); one with type bits must agree with the kind.
    if file_type != 0 && !type_fits {
        return Some(format!(
            "mode {:o} is not the mode of a {}",
            entry.mode,
            kind.as_str_name()
        ));
    }
    for (field, time) in [("mtime", entry.mtime_ns), ("ctime", entry.ctime_ns)] {
        if time < MIN_TIME_NS {
            return Some(format!("{field} {time} ns is before 1900"));
        }
    }
    if kind != EntryKind::File && (!entry.chunk_ids.is_empty() || entry.size != 0) {
        return Some(format!(
            "a {} with content (size {}, {} chunks)",
            kind.as_str_name(),
            entry.size,
            entry.chunk_ids.len()
        ));
    }
    if let Some(bad) = entry.chunk_ids.iter().find(|id| id.len() != 32) {
        return Some(format!("a chunk id of {} bytes, not 32", bad.len()));
    }
    match kind {
        EntryKind::Dir if entry.subtree_id.len() != 32 => {
            return Some(format!(
                "a directory whose subtree id has {} bytes, not 32",
                entry.subtree_id.len()
            ));
        }
        EntryKind::Dir => {}
        _ if !entry.subtree_id.is_empty() => {
            return Some(format!("a {} with a subtree", kind.as_str_name()));
        }
        _ => {}
    }
    if kind == EntryKind::Symlink {
        let target = &entry.symlink_target;
        if target.is_empty() || target.len() > MAX_SYMLINK_TARGET_BYTES || target.contains(&0) {
            return Some(format!(
                "symlink target of {} bytes (1 to {MAX_SYMLINK_TARGET_BYTES}, no NUL)",
                target.len()
            ));
        }
    } else if !entry.symlink_target.is_empty() {
        return Some(format!("a {} with a symlink target", kind.as_str_name()));
    }
    if entry.xattrs.len() > MAX_XATTRS_PER_ENTRY {
        return Some(format!(
            "{} extended attributes (at most {MAX_XATTRS_PER_ENTRY})",
            entry.xattrs.len()
        ));
    }
    for (index, xattr) in entry.xattrs.iter().enumerate() {
        if xattr.name.is_empty()
            || xattr.name.len() > MAX_XATTR_NAME_BYTES
            || xattr.name.contains(&0)
        {
            return Some(format!(
                "extended attribute name {:?} (1 to {MAX_XATTR_NAME_BYTES} bytes, no NUL)",
                quote(&xattr.name)
            ));
        }
        if xattr.value.len() > MAX_XATTR_VALUE_BYTES {
            return Some(format!(
                "extended attribute {:?} of {} bytes (at most {MAX_XATTR_VALUE_BYTES})",
                quote(&xattr.name),
                xattr.value.len()
            ));
        }
        if index > 0 && entry.xattrs[index - 1].name >= xattr.name {
            return Some(format!(
                "extended attribute {:?} is out of order or repeated",
                quote(&xattr.name)
            ));
        }
    }
    None
}

/// The first entry of `tree` that is out of order or repeats its
/// predecessor's name (entries are sorted by name, bytewise, and unique),
/// as its index.
pub fn listing_problem(tree: &Tree) -> Option<usize> {
    (1..tree.entries.len()).find(|&index| tree.entries[index - 1].name >= tree.entries[index].name)
}

/// Why `value` is not a valid job, host, instance or tag, if it is not:
/// it becomes part of a snapshot's name and of paths, so no path
/// separators, no control characters, no "." or "..", bounded.
pub fn label_problem(value: &str) -> Option<String> {
    if value.len() > MAX_LABEL_BYTES {
        Some(format!("{} bytes (at most {MAX_LABEL_BYTES})", value.len()))
    } else if value.contains(['/', '\\']) {
        Some("contains a path separator".into())
    } else if value.chars().any(char::is_control) {
        Some("contains a control character".into())
    } else if value == "." || value == ".." {
        Some("is . or ..".into())
    } else {
        None
    }
}

/// Longest snapshot name, in bytes.
pub const MAX_SNAPSHOT_NAME_BYTES: usize = 512;

/// Why `name` is not acceptable as a snapshot's name, if it is not: it is
/// a path of labels (B1000's `job/date/host-...`), bounded, and cannot pass
/// for an id or an id's prefix (a lookup takes a full id, then a name, then
/// a prefix: a name of hex digits would shadow ids).
pub fn snapshot_name_problem(name: &str) -> Option<String> {
    let quoted = || quote(name.as_bytes());
    if name.len() > MAX_SNAPSHOT_NAME_BYTES {
        return Some(format!(
            "name of {} bytes (at most {MAX_SNAPSHOT_NAME_BYTES})",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) || name.contains('\\') {
        return Some(format!(
            "name {:?} contains a control character or a backslash",
            quoted()
        ));
    }
    if name
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Some(format!("name {:?} has an empty, . or .. part", quoted()));
    }
    if name.len() >= 8 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Some(format!(
            "name {:?} could be taken for a snapshot id",
            quoted()
        ));
    }
    None
}

/// Why `snapshot`'s record is not acceptable for a commit at `now_ms`, if
/// it is not: its id (empty, for the store to choose, or
/// [`is_snapshot_id`]), labels, tags, type and start time.
pub fn record_problem(snapshot: &Snapshot, now_ms: i64) -> Option<String> {
    if !snapshot.id.is_empty() && !is_snapshot_id(&snapshot.id) {
        return Some(format!(
            "id {:?} is not {SNAPSHOT_ID_LEN} lowercase hex digits",
            quote(snapshot.id.as_bytes())
        ));
    }
    let labels = [
        ("job", &snapshot.job),
        ("host", &snapshot.host),
        ("instance", &snapshot.instance),
        ("master host", &snapshot.master_host),
        ("master instance", &snapshot.master_instance),
    ];
    for (field, value) in labels {
        if let Some(problem) = label_problem(value) {
            return Some(format!("{field} {:?} {problem}", quote(value.as_bytes())));
        }
    }
    if snapshot.tags.len() > MAX_TAGS {
        return Some(format!("{} tags (at most {MAX_TAGS})", snapshot.tags.len()));
    }
    for tag in &snapshot.tags {
        if tag.is_empty() {
            return Some("an empty tag".into());
        }
        if let Some(problem) = label_problem(tag) {
            return Some(format!("tag {:?} {problem}", quote(tag.as_bytes())));
        }
    }
    if !snapshot.parent_id.is_empty()
        && (snapshot.parent_id.len() > 64
            || !snapshot
                .parent_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    {
        return Some(format!(
            "parent id {:?} is not a snapshot id",
            quote(snapshot.parent_id.as_bytes())
        ));
    }
    if SnapshotType::try_from(snapshot.r#type).is_err() {
        return Some(format!("unknown snapshot type {}", snapshot.r#type));
    }
    if snapshot.retain_until_ms < 0
        || snapshot.retain_until_ms > now_ms.saturating_add(MAX_RETENTION_MS)
    {
        return Some(format!(
            "retain until {} ms is before 1970 or more than 100 years ahead",
            snapshot.retain_until_ms
        ));
    }
    if snapshot.start_time_ms < 0 || snapshot.start_time_ms > now_ms + MAX_START_SKEW_MS {
        return Some(format!(
            "start time {} ms is before 1970 or more than a day ahead",
            snapshot.start_time_ms
        ));
    }
    None
}

/// `warnings` cut to what a record keeps: at most [`MAX_WARNINGS`] of at
/// most [`MAX_WARNING_BYTES`] each, and a last line saying how many were
/// left out.
pub fn bounded_warnings(warnings: Vec<String>) -> Vec<String> {
    let total = warnings.len();
    let mut kept: Vec<String> = warnings
        .into_iter()
        .take(MAX_WARNINGS)
        .map(|mut warning| {
            if warning.len() > MAX_WARNING_BYTES {
                let mut cut = MAX_WARNING_BYTES;
                while !warning.is_char_boundary(cut) {
                    cut -= 1;
                }
                warning.truncate(cut);
                warning.push_str("...");
            }
            warning
        })
        .collect();
    if total > MAX_WARNINGS {
        kept.push(format!("... and {} more warnings", total - MAX_WARNINGS));
    }
    kept
}

/// What a tree expands to, counting every path through shared subtrees:
/// the store computes it bottom-up, once per distinct tree, and from the
/// root's summary a snapshot's statistics and bounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeSummary {
    /// Regular files.
    pub files: u64,
    /// Directories below this one.
    pub dirs: u64,
    /// Entries of every kind.
    pub entries: u64,
    /// Sum of the files' sizes.
    pub bytes: u64,
    /// Chunk references of the files.
    pub chunks: u64,
    /// Levels of trees, this one included (a tree without subdirectories
    /// has height 1).
    pub height: u32,
}

impl TreeSummary {
    /// Count one entry of this tree that is not a directory.
    pub fn add_entry(&mut self, entry: &TreeEntry) {
        self.entries = self.entries.saturating_add(1);
        if entry.kind == EntryKind::File as i32 {
            self.files = self.files.saturating_add(1);
            self.bytes = self.bytes.saturating_add(entry.size);
            self.chunks = self.chunks.saturating_add(entry.chunk_ids.len() as u64);
        }
    }

    /// Count a subdirectory whose own tree expands to `child`.
    pub fn add_subdirectory(&mut self, child: &TreeSummary) {
        self.entries = self.entries.saturating_add(1).saturating_add(child.entries);
        self.dirs = self.dirs.saturating_add(1).saturating_add(child.dirs);
        self.files = self.files.saturating_add(child.files);
        self.bytes = self.bytes.saturating_add(child.bytes);
        self.chunks = self.chunks.saturating_add(child.chunks);
        self.height = self.height.max(child.height.saturating_add(1));
    }

    /// Why a snapshot whose root tree expands to this is too large or too
    /// deep, if it is.
    pub fn bound_problem(&self) -> Option<String> {
        if self.height > MAX_DEPTH {
            Some(format!(
                "directories nested {} deep (at most {MAX_DEPTH})",
                self.height
            ))
        } else if self.entries > MAX_SNAPSHOT_ENTRIES {
            Some(format!(
                "expands to {} entries (at most {MAX_SNAPSHOT_ENTRIES})",
                self.entries
            ))
        } else if self.bytes > MAX_SNAPSHOT_BYTES {
            Some(format!(
                "expands to {} bytes (at most {MAX_SNAPSHOT_BYTES})",
                self.bytes
            ))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_proto::v1::ExtendedAttribute;

    fn file(name: &[u8]) -> TreeEntry {
        TreeEntry {
            name: name.to_vec(),
            kind: EntryKind::File as i32,
            mode: 0o100644,
            size: 0,
            mtime_ns: 1_700_000_000_000_000_000,
            ..TreeEntry::default()
        }
    }

    fn record() -> Snapshot {
        Snapshot {
            id: "0123456789abcdef0123456789abcdef".into(),
            job: "web".into(),
            host: "web1.example.com".into(),
            r#type: SnapshotType::Full as i32,
            start_time_ms: 1_700_000_000_000,
            ..Snapshot::default()
        }
    }

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn a_plain_file_passes() {
        assert_eq!(entry_problem(&file(b"a.txt")), None);
    }

    #[test]
    fn bad_names_are_refused() {
        let long = vec![b'x'; 256];
        for name in [&b""[..], b".", b"..", b"/abs", b"a/b", b"a\0b", &long] {
            assert!(
                entry_problem(&file(name)).is_some(),
                "{name:?} should be refused"
            );
        }
        assert_eq!(entry_problem(&file(&[b'x'; 255])), None);
        // Names need not be UTF-8.
        assert_eq!(entry_problem(&file(b"\xff\xfe")), None);
    }

    #[test]
    fn kinds_and_their_fields_must_agree() {
        let mut unknown = file(b"a");
        unknown.kind = 9;
        assert!(
            entry_problem(&unknown)
                .unwrap()
                .contains("unknown entry kind")
        );
        unknown.kind = 0;
        assert!(entry_problem(&unknown).is_some());

        let mut dir = file(b"d");
        dir.kind = EntryKind::Dir as i32;
        dir.mode = 0o040755;
        assert!(entry_problem(&dir).unwrap().contains("subtree id"));
        dir.subtree_id = vec![1; 32];
        assert_eq!(entry_problem(&dir), None);
        dir.size = 5;
        assert!(entry_problem(&dir).unwrap().contains("with content"));

        let mut link = file(b"l");
        link.kind = EntryKind::Symlink as i32;
        link.mode = 0o120777;
        assert!(entry_problem(&link).unwrap().contains("symlink target"));
        link.symlink_target = b"../x".to_vec();
        assert_eq!(entry_problem(&link), None);
        link.symlink_target = b"a\0b".to_vec();
        assert!(entry_problem(&link).is_some());

        let mut with_subtree = file(b"f");
        with_subtree.subtree_id = vec![1; 32];
        assert!(entry_problem(&with_subtree).unwrap().contains("subtree"));

        let mut short_chunk = file(b"f");
        short_chunk.chunk_ids = vec![vec![1; 3]];
        assert!(entry_problem(&short_chunk).unwrap().contains("3 bytes"));
    }

    #[test]
    fn modes_and_times_are_in_range() {
        let mut entry = file(b"f");
        entry.mode = 0o040755; // a directory's type bits on a file
        assert!(entry_problem(&entry).is_some());
        entry.mode = 0o644; // no type bits: accepted
        assert_eq!(entry_problem(&entry), None);
        entry.mode = 0o1_000_000;
        assert!(entry_problem(&entry).is_some());
        let mut entry = file(b"f");
        entry.mtime_ns = i64::MIN;
        assert!(entry_problem(&entry).unwrap().contains("before 1900"));
        entry.mtime_ns = -1; // 1969 is a real time
        assert_eq!(entry_problem(&entry), None);
    }

    #[test]
    fn extended_attributes_are_bounded_and_sorted() {
        let xattr = |name: &[u8], size: usize| ExtendedAttribute {
            name: name.to_vec(),
            value: vec![0; size],
        };
        let mut entry = file(b"f");
        entry.xattrs = vec![xattr(b"user.a", 3), xattr(b"user.b", 3)];
        assert_eq!(entry_problem(&entry), None);
        entry.xattrs = vec![xattr(b"user.b", 3), xattr(b"user.a", 3)];
        assert!(entry_problem(&entry).unwrap().contains("out of order"));
        entry.xattrs = vec![xattr(b"user.a", MAX_XATTR_VALUE_BYTES + 1)];
        assert!(entry_problem(&entry).is_some());
        entry.xattrs = vec![xattr(b"", 1)];
        assert!(entry_problem(&entry).is_some());
    }

    #[test]
    fn listings_are_sorted_and_unique() {
        let tree = |names: &[&[u8]]| Tree {
            entries: names.iter().map(|name| file(name)).collect(),
            parts: vec![],
        };
        assert_eq!(listing_problem(&tree(&[b"a", b"b", b"c"])), None);
        assert_eq!(listing_problem(&tree(&[b"a", b"c", b"b"])), Some(2));
        assert_eq!(listing_problem(&tree(&[b"a", b"a"])), Some(1));
        assert_eq!(listing_problem(&tree(&[])), None);
    }

    #[test]
    fn records_are_checked() {
        assert_eq!(record_problem(&record(), NOW), None);
        let empty_id = Snapshot {
            id: String::new(),
            ..record()
        };
        assert_eq!(record_problem(&empty_id, NOW), None);
        for id in [
            "latest",
            "0123456789ABCDEF0123456789ABCDEF",
            "012345",
            "../x",
        ] {
            let snapshot = Snapshot {
                id: id.into(),
                ..record()
            };
            assert!(record_problem(&snapshot, NOW).is_some(), "{id}");
        }
        let huge = Snapshot {
            id: "x".repeat(100_000),
            ..record()
        };
        assert!(record_problem(&huge, NOW).unwrap().len() < 300);
        for host in ["../etc", "a\0b", "a\\b", "..", &"h".repeat(200)] {
            let snapshot = Snapshot {
                host: host.into(),
                ..record()
            };
            assert!(record_problem(&snapshot, NOW).is_some(), "{host:?}");
        }
        let job = Snapshot {
            job: "db\n".into(),
            ..record()
        };
        assert!(record_problem(&job, NOW).is_some());
        let tags = Snapshot {
            tags: vec!["a/b".into()],
            ..record()
        };
        assert!(record_problem(&tags, NOW).unwrap().contains("tag"));
        let future = Snapshot {
            start_time_ms: NOW + MAX_START_SKEW_MS + 1,
            ..record()
        };
        assert!(record_problem(&future, NOW).is_some());
        let kind = Snapshot {
            r#type: 7,
            ..record()
        };
        assert!(record_problem(&kind, NOW).is_some());
    }

    #[test]
    fn snapshot_names_are_paths_of_labels_that_cannot_pass_for_ids() {
        assert_eq!(
            snapshot_name_problem("web/2026-12-06-Sun/web1-2026-12-06-Sun-03:12:48"),
            None
        );
        assert_eq!(snapshot_name_problem("nightly"), None);
        for bad in [
            "",
            "/abs",
            "a//b",
            "a/../b",
            "a\nb",
            "0123abcd",
            &"n".repeat(600),
        ] {
            assert!(snapshot_name_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn summaries_count_every_path_and_bound_the_total() {
        let mut leaf = TreeSummary {
            height: 1,
            ..TreeSummary::default()
        };
        let mut big = file(b"f");
        big.size = 1 << 40;
        big.chunk_ids = vec![vec![0; 32]; 2];
        leaf.add_entry(&big);
        // Each level holds the level below twice: 2^n paths.
        let mut level = leaf;
        for _ in 0..20 {
            let mut next = TreeSummary {
                height: 1,
                ..TreeSummary::default()
            };
            next.add_subdirectory(&level);
            next.add_subdirectory(&level);
            level = next;
        }
        assert_eq!(level.files, 1 << 20);
        assert_eq!(level.chunks, 2 << 20);
        assert_eq!(level.height, 21);
        assert!(level.bound_problem().unwrap().contains("bytes"));
        assert_eq!(leaf.bound_problem(), None);
    }

    #[test]
    fn warnings_are_bounded() {
        let many = vec!["x".repeat(5000); MAX_WARNINGS + 5];
        let kept = bounded_warnings(many);
        assert_eq!(kept.len(), MAX_WARNINGS + 1);
        assert!(kept[0].len() <= MAX_WARNING_BYTES + 3);
        assert!(kept.last().unwrap().contains("5 more"));
    }

    #[test]
    fn quotes_are_short() {
        assert_eq!(quote(b"abc"), "abc");
        assert_eq!(quote(&[b'a'; 1000]).len(), QUOTE_BYTES + 3);
    }
}
