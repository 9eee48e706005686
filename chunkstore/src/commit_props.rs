//! Property: whatever a sender does to a valid snapshot's trees, the commit
//! either refuses it (as the sender's mistake, changing nothing) or the
//! snapshot verifies and restores to exactly what its trees describe. No
//! committed snapshot fails to restore for a reason the commit could have
//! checked.

use std::collections::HashMap;
use std::io::Read;

use fabric_proto::v1::{EntryKind, ExtendedAttribute, Snapshot, Tree, TreeEntry};
use proptest::prelude::*;

use super::Store;
use super::tests::small_config;
use crate::chunker::Chunk;
use crate::error::StoreError;
use crate::id::ChunkId;
use crate::restore::{TarTarget, restore};
use crate::verify::VerifyOptions;

/// One way to damage an entry of a tree.
#[derive(Clone, Debug)]
enum Mutation {
    Name(Vec<u8>),
    Kind(i32),
    Size(u64),
    SizeDelta(i8),
    Mode(u32),
    Mtime(i64),
    Ctime(i64),
    DropChunk,
    OtherChunk(usize),
    SubtreeIsAChunk(usize),
    SymlinkTarget(Vec<u8>),
    Xattr(Vec<u8>, usize),
    Swap,
    Duplicate,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let name_byte = prop_oneof![Just(b'/'), Just(0u8), Just(b'.'), Just(b'a'), any::<u8>()];
    prop_oneof![
        prop::collection::vec(name_byte.clone(), 0..300).prop_map(Mutation::Name),
        (-2i32..8).prop_map(Mutation::Kind),
        prop_oneof![Just(u64::MAX), Just(0u64), any::<u64>()].prop_map(Mutation::Size),
        any::<i8>().prop_map(Mutation::SizeDelta),
        prop_oneof![
            Just(0o104755u32),
            Just(0o040755),
            Just(0o120777),
            any::<u32>()
        ]
        .prop_map(Mutation::Mode),
        prop_oneof![Just(i64::MIN), Just(-1i64), Just(i64::MAX), any::<i64>()]
            .prop_map(Mutation::Mtime),
        prop_oneof![Just(i64::MIN), any::<i64>()].prop_map(Mutation::Ctime),
        Just(Mutation::DropChunk),
        (0usize..8).prop_map(Mutation::OtherChunk),
        (0usize..8).prop_map(Mutation::SubtreeIsAChunk),
        prop::collection::vec(name_byte, 0..40).prop_map(Mutation::SymlinkTarget),
        (prop::collection::vec(any::<u8>(), 0..8), 0usize..70_000)
            .prop_map(|(name, len)| Mutation::Xattr(name, len)),
        Just(Mutation::Swap),
        Just(Mutation::Duplicate),
    ]
}

/// A valid snapshot to damage: files, a symlink and a directory.
struct Fixture {
    chunks: Vec<ChunkId>,
    sizes: HashMap<ChunkId, u64>,
    root: Vec<TreeEntry>,
    sub: Vec<TreeEntry>,
}

fn fixture(store: &Store) -> Fixture {
    let contents: Vec<Vec<u8>> = (0..8u8)
        .map(|seed| vec![seed; 1000 + usize::from(seed) * 517])
        .collect();
    let chunks: Vec<Chunk> = contents.into_iter().map(Chunk::new).collect();
    let ids: Vec<ChunkId> = chunks.iter().map(|chunk| chunk.id).collect();
    let sizes = chunks
        .iter()
        .map(|chunk| (chunk.id, chunk.data.len() as u64))
        .collect();
    store.put_chunks(chunks).expect("put");
    let file = |name: &[u8], parts: &[usize], sizes: &HashMap<ChunkId, u64>| TreeEntry {
        name: name.to_vec(),
        kind: EntryKind::File as i32,
        mode: 0o100644,
        mtime_ns: 1_600_000_000_000_000_000,
        size: parts.iter().map(|&part| sizes[&ids[part]]).sum(),
        chunk_ids: parts.iter().map(|&part| ids[part].to_vec()).collect(),
        ..TreeEntry::default()
    };
    let sub = vec![
        file(b"c", &[3], &sizes),
        TreeEntry {
            name: b"l".to_vec(),
            kind: EntryKind::Symlink as i32,
            mode: 0o120777,
            symlink_target: b"../a".to_vec(),
            ..TreeEntry::default()
        },
    ];
    let root = vec![
        file(b"a", &[0, 1], &sizes),
        file(b"b", &[2], &sizes),
        TreeEntry {
            name: b"d".to_vec(),
            kind: EntryKind::Dir as i32,
            mode: 0o040755,
            ..TreeEntry::default()
        },
        file(b"e", &[], &sizes),
    ];
    Fixture {
        chunks: ids,
        sizes,
        root,
        sub,
    }
}

fn apply(entries: &mut Vec<TreeEntry>, index: usize, mutation: &Mutation, fixture: &Fixture) {
    let index = index % entries.len();
    let size_of = |id: &ChunkId| fixture.sizes[id];
    let entry = &mut entries[index];
    match mutation {
        Mutation::Name(name) => entry.name.clone_from(name),
        Mutation::Kind(kind) => entry.kind = *kind,
        Mutation::Size(size) => entry.size = *size,
        Mutation::SizeDelta(delta) => {
            entry.size = entry.size.wrapping_add_signed(i64::from(*delta));
        }
        Mutation::Mode(mode) => entry.mode = *mode,
        Mutation::Mtime(time) => entry.mtime_ns = *time,
        Mutation::Ctime(time) => entry.ctime_ns = *time,
        Mutation::DropChunk => {
            entry.chunk_ids.pop();
        }
        Mutation::OtherChunk(other) => {
            let id = fixture.chunks[*other];
            entry.chunk_ids.push(id.to_vec());
            // Half the time the size follows, which is a valid change
            // (wrapping: an earlier mutation may have set any size).
            if other % 2 == 0 {
                entry.size = entry.size.wrapping_add(size_of(&id));
            }
        }
        Mutation::SubtreeIsAChunk(other) => {
            entry.subtree_id = fixture.chunks[*other].to_vec();
        }
        Mutation::SymlinkTarget(target) => entry.symlink_target.clone_from(target),
        Mutation::Xattr(name, len) => entry.xattrs.push(ExtendedAttribute {
            name: name.clone(),
            value: vec![1; *len],
        }),
        Mutation::Swap => {
            let other = (index + 1) % entries.len();
            entries.swap(index, other);
        }
        Mutation::Duplicate => {
            let copy = entries[index].clone();
            entries.insert(index, copy);
        }
    }
}

/// Every file of `tar`: path -> content.
fn tar_files(tar: &[u8]) -> HashMap<String, Vec<u8>> {
    let mut archive = tar::Archive::new(tar);
    let mut files = HashMap::new();
    for entry in archive.entries().expect("a tar") {
        let mut entry = entry.expect("an entry");
        if entry.header().entry_type().is_file() {
            let path = entry.path().expect("a path").to_string_lossy().into_owned();
            let mut content = Vec::new();
            entry.read_to_end(&mut content).expect("content");
            files.insert(path, content);
        }
    }
    files
}

/// What the trees say each regular file holds: path -> content.
fn described_files(store: &Store, root: ChunkId) -> HashMap<String, Vec<u8>> {
    let mut files = HashMap::new();
    let mut stack = vec![(root, String::new())];
    while let Some((id, prefix)) = stack.pop() {
        let tree = store.get_tree(&id).expect("a committed tree reads");
        for entry in tree.entries {
            let path = format!("{prefix}{}", String::from_utf8_lossy(&entry.name));
            match EntryKind::try_from(entry.kind) {
                Ok(EntryKind::File) => {
                    let mut content = Vec::new();
                    for raw in &entry.chunk_ids {
                        let chunk = ChunkId::from_slice(raw).expect("an id");
                        content.extend(store.get_chunk(&chunk).expect("a chunk"));
                    }
                    assert_eq!(content.len() as u64, entry.size, "{path}");
                    files.insert(path, content);
                }
                Ok(EntryKind::Dir) => stack.push((
                    ChunkId::from_slice(&entry.subtree_id).expect("an id"),
                    format!("{path}/"),
                )),
                _ => {}
            }
        }
    }
    files
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn a_mutated_snapshot_is_refused_or_restores_as_described(
        mutations in prop::collection::vec((any::<bool>(), any::<usize>(), mutation()), 1..4)
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_or_create(dir.path(), small_config()).expect("store");
        let fixture = fixture(&store);
        let mut root = fixture.root.clone();
        let mut sub = fixture.sub.clone();
        for (in_sub, index, mutation) in &mutations {
            let entries = if *in_sub { &mut sub } else { &mut root };
            apply(entries, *index, mutation, &fixture);
        }
        let sub_id = store
            .put_tree(&Tree { entries: sub, parts: Vec::new() })
            .expect("put");
        for entry in &mut root {
            if entry.kind == EntryKind::Dir as i32 && entry.subtree_id.is_empty() {
                entry.subtree_id = sub_id.to_vec();
            }
        }
        let root_id = store
            .put_tree(&Tree { entries: root, parts: Vec::new() })
            .expect("put");
        let committed = store.commit_snapshot(Snapshot {
            job: "props".into(),
            host: "h".into(),
            root_tree_id: root_id.to_vec(),
            ..Snapshot::default()
        });
        match committed {
            Err(StoreError::InvalidSnapshot { .. } | StoreError::MissingChunk { .. }) => {
                prop_assert!(store.list_snapshots().expect("list").is_empty());
            }
            Err(other) => prop_assert!(false, "not a refusal of the sender's input: {other}"),
            Ok(snapshot) => {
                let report = store.verify(&VerifyOptions::default()).expect("verify runs");
                prop_assert!(report.is_ok(), "{report:?}");
                let mut tar = TarTarget::new(Vec::new());
                let restored = restore(&store, root_id, "", &mut tar);
                prop_assert!(restored.is_ok(), "{:?} of {snapshot:?}", restored.err());
                let tar = tar.into_inner().expect("tar");
                prop_assert_eq!(tar_files(&tar), described_files(&store, root_id));
            }
        }
    }
}
