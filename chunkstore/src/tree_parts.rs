//! Listings too large for one chunk: cut into parts on the way in, joined
//! on the way out (see `Tree.parts` in store.proto).
//!
//! Owns the threshold, the cutting and the joining. It never reads or
//! stores a chunk itself: the writer stores the chunks [`tree_chunks`]
//! returns, and a reader hands [`join_parts`] a fetch that checks each
//! part's bytes against its id. Anything that walks a snapshot's chunks
//! (a commit's check, GC, verify, a copy) counts the parts as chunks of the
//! tree that lists them ([`part_ids`]).

use fabric_proto::v1::Tree;
use prost::Message;

use crate::chunker::{Chunk, ChunkParams, Chunker};
use crate::id::{BadChunkId, ChunkId};

/// A listing whose encoding is larger than this is stored in parts.
pub const TREE_PART_THRESHOLD: usize = 4 * 1024 * 1024;

/// How the parts are cut: the default data chunk sizes (at most 4 MiB),
/// whatever a store's data chunks are, so a listing is cut the same way
/// everywhere.
fn part_params() -> ChunkParams {
    ChunkParams::default()
}

/// A tree chunk whose parts cannot be joined.
#[derive(Debug, thiserror::Error)]
pub enum TreePartsError {
    /// A part id is not 32 bytes.
    #[error("part {index} of the tree: {source}")]
    BadPartId {
        /// Its position in `parts`.
        index: usize,
        /// What is wrong with it.
        source: BadChunkId,
    },
    /// A tree chunk lists both entries and parts.
    #[error("the tree lists {entries} entries and {parts} parts; a tree in parts lists no entries")]
    EntriesAndParts {
        /// How many entries.
        entries: usize,
        /// How many parts.
        parts: usize,
    },
    /// The parts' bytes do not decode as a listing.
    #[error("its {parts} parts do not decode as a tree: {source}")]
    Decode {
        /// How many parts.
        parts: usize,
        /// The decode error.
        source: prost::DecodeError,
    },
    /// The listing the parts make up lists parts itself.
    #[error("its parts make up a tree that is in parts again")]
    Nested,
}

/// The chunks that store `tree`: the tree chunk (its id is the tree's id),
/// and the parts it lists, in order (none when the listing is stored whole).
pub fn tree_chunks(tree: &Tree) -> (Chunk, Vec<Chunk>) {
    let encoded = tree.encode_to_vec();
    if encoded.len() <= TREE_PART_THRESHOLD {
        return (Chunk::new(encoded), Vec::new());
    }
    let mut parts = Vec::new();
    // The default parameters are valid; should they ever not be, the
    // listing is stored whole (a larger chunk, not a lost one).
    let Ok(mut chunker) = Chunker::new(part_params()) else {
        return (Chunk::new(encoded), Vec::new());
    };
    chunker.feed(&encoded, |part| parts.push(part));
    chunker.finish(|part| parts.push(part));
    let listing = Tree {
        entries: Vec::new(),
        parts: parts.iter().map(|part| part.id.to_vec()).collect(),
    };
    (Chunk::new(listing.encode_to_vec()), parts)
}

/// The ids of the parts `tree` (a tree chunk as decoded) lists.
pub fn part_ids(tree: &Tree) -> Result<Vec<ChunkId>, TreePartsError> {
    if !tree.parts.is_empty() && !tree.entries.is_empty() {
        return Err(TreePartsError::EntriesAndParts {
            entries: tree.entries.len(),
            parts: tree.parts.len(),
        });
    }
    tree.parts
        .iter()
        .enumerate()
        .map(|(index, raw)| {
            ChunkId::from_slice(raw).map_err(|source| TreePartsError::BadPartId { index, source })
        })
        .collect()
}

/// The listing `tree` (a tree chunk as decoded) stands for: itself when it
/// is stored whole, else the decoding of its parts' bytes, each got with
/// `fetch` (which must check the bytes against the id). `bad` turns a
/// problem with the parts into the caller's error.
pub fn join_parts<E>(
    tree: Tree,
    mut fetch: impl FnMut(&ChunkId) -> Result<Vec<u8>, E>,
    bad: impl Fn(TreePartsError) -> E,
) -> Result<Tree, E> {
    if tree.parts.is_empty() {
        return Ok(tree);
    }
    let ids = part_ids(&tree).map_err(&bad)?;
    let mut encoded = Vec::new();
    for id in &ids {
        encoded.extend_from_slice(&fetch(id)?);
    }
    let joined = Tree::decode(encoded.as_slice()).map_err(|source| {
        bad(TreePartsError::Decode {
            parts: ids.len(),
            source,
        })
    })?;
    if !joined.parts.is_empty() {
        return Err(bad(TreePartsError::Nested));
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use fabric_proto::v1::{EntryKind, TreeEntry};

    use super::*;

    fn listing(files: usize, chunks_each: usize) -> Tree {
        Tree {
            entries: (0..files)
                .map(|index| TreeEntry {
                    name: format!("file-{index:08}").into_bytes(),
                    kind: EntryKind::File as i32,
                    mode: 0o100644,
                    size: index as u64,
                    chunk_ids: (0..chunks_each)
                        .map(|chunk| {
                            blake3::hash(format!("{index}/{chunk}").as_bytes())
                                .as_bytes()
                                .to_vec()
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            parts: Vec::new(),
        }
    }

    /// Store the chunks in a map and join them back with a fetch from it.
    fn round_trip(tree: &Tree) -> (Tree, usize) {
        let (root, parts) = tree_chunks(tree);
        let count = parts.len();
        let stored: HashMap<ChunkId, Vec<u8>> =
            parts.into_iter().map(|part| (part.id, part.data)).collect();
        let decoded = Tree::decode(root.data.as_slice()).unwrap();
        let joined = join_parts(
            decoded,
            |id| {
                stored
                    .get(id)
                    .cloned()
                    .ok_or_else(|| format!("no part {id}"))
            },
            |err| err.to_string(),
        )
        .unwrap();
        (joined, count)
    }

    #[test]
    fn a_small_listing_is_stored_whole() {
        let tree = listing(100, 1);
        let (root, parts) = tree_chunks(&tree);
        assert!(parts.is_empty());
        assert_eq!(root.data, tree.encode_to_vec());
        assert!(round_trip(&tree) == (tree, 0));
    }

    #[test]
    fn a_large_directory_and_a_file_of_many_chunks_are_stored_in_parts_of_at_most_4_mib() {
        // 100,000 entries (about 6 MB), then one file of 300,000 chunks
        // (about 10 MB in its entry alone).
        for tree in [listing(100_000, 1), listing(1, 300_000)] {
            let (root, parts) = tree_chunks(&tree);
            assert!(parts.len() > 1, "{} parts", parts.len());
            assert!(parts.iter().all(|part| part.data.len() <= 4 * 1024 * 1024));
            assert!(root.data.len() < 64 * 1024);
            let (joined, _) = round_trip(&tree);
            assert!(joined == tree, "the joined listing differs");
        }
    }

    #[test]
    fn a_change_in_a_large_listing_changes_few_parts() {
        let tree = listing(150_000, 1);
        let mut changed = tree.clone();
        changed.entries[40_000].size += 1;
        let ids = |tree: &Tree| -> Vec<ChunkId> {
            tree_chunks(tree).1.iter().map(|part| part.id).collect()
        };
        let (before, after) = (ids(&tree), ids(&changed));
        let new = after.iter().filter(|id| !before.contains(id)).count();
        assert!(new <= 2, "{new} of {} parts changed", after.len());
    }

    #[test]
    fn parts_that_are_missing_bad_or_nested_are_refused() {
        // The error of a join, without printing a listing that joined.
        fn refusal(joined: Result<Tree, String>) -> String {
            match joined {
                Ok(_) => panic!("the parts were joined"),
                Err(err) => err,
            }
        }
        let tree = listing(100_000, 1);
        let (root, parts) = tree_chunks(&tree);
        let decoded = Tree::decode(root.data.as_slice()).unwrap();
        let missing = join_parts(
            decoded.clone(),
            |id| Err(format!("no part {id}")),
            |err| err.to_string(),
        );
        assert!(refusal(missing).starts_with("no part "));

        // The parts in the wrong order do not decode as the listing.
        let mut reversed = parts.clone();
        reversed.reverse();
        let mut swapped = reversed.into_iter();
        let joined = join_parts(
            decoded.clone(),
            |_| Ok::<_, String>(swapped.next().unwrap().data),
            |err| err.to_string(),
        );
        assert!(
            joined.ok() != Some(tree.clone()),
            "joined in the wrong order"
        );

        let short_id = Tree {
            entries: Vec::new(),
            parts: vec![vec![1, 2, 3]],
        };
        let refused = join_parts(short_id, |_| Ok(Vec::new()), |err| err.to_string());
        assert!(refusal(refused).contains("part 0"));

        let both = Tree {
            entries: tree.entries[..1].to_vec(),
            parts: decoded.parts.clone(),
        };
        let refused = join_parts(both, |_| Ok(Vec::new()), |err| err.to_string());
        assert!(refusal(refused).contains("lists no entries"));

        let inner = Tree {
            entries: Vec::new(),
            parts: vec![vec![7; 32]],
        };
        let refused = join_parts(
            decoded,
            |_| Ok(inner.encode_to_vec()),
            |err| err.to_string(),
        );
        assert!(refusal(refused).contains("in parts again"));
    }
}
