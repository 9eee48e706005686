//! Hostile input against the real `fabric-node` binary, as an attacker with
//! a valid credential would send it: malformed trees and records, lying
//! sizes and statistics, ids that impersonate or shadow, DAGs that expand
//! without bound, oversized and repeated requests.
//!
//! Every case is one call that must fail with the status code a client
//! mistake gets (never INTERNAL), with a message that quotes at most about
//! 100 bytes of its input, while the node stays SERVING and its snapshots
//! and store counters stay exactly as they were. Every chunk the cases
//! need is staged first, as the content of one valid snapshot, so that a
//! refused commit cannot be told apart from nothing at all.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use fabric_integration_tests::{Server, health, pki, storage_client, upload};
use fabric_proto::v1::storage_client::StorageClient;
use fabric_proto::v1::{
    ChunkBatch, ChunkData, Commit, DeleteSnapshotRequest, EntryKind, ExtendedAttribute,
    GetChunksRequest, GetSnapshotRequest, GetTreeRequest, ListSnapshotsRequest, Offer,
    RestoreRequest, SenderMessage, Snapshot, SnapshotStats, SnapshotType, StatsRequest, StoreStats,
    Tree, TreeEntry, VerifyRequest, receiver_message, sender_message,
};
use prost::Message;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

/// Chunks and trees built for the cases, all staged before the first case.
#[derive(Default)]
struct Builder {
    staged: Vec<Vec<u8>>,
}

impl Builder {
    /// A content chunk holding `data`; its id.
    fn chunk(&mut self, data: &[u8]) -> Vec<u8> {
        self.staged.push(data.to_vec());
        id_of(data)
    }

    /// A tree chunk of `entries` exactly as given (unsorted, repeated...); its id.
    fn tree(&mut self, entries: Vec<TreeEntry>) -> Vec<u8> {
        self.chunk(
            &Tree {
                entries,
                parts: Vec::new(),
            }
            .encode_to_vec(),
        )
    }
}

fn id_of(data: &[u8]) -> Vec<u8> {
    blake3::hash(data).as_bytes().to_vec()
}

fn file(name: &[u8], chunk: &[u8], size: u64) -> TreeEntry {
    TreeEntry {
        name: name.to_vec(),
        kind: EntryKind::File as i32,
        mode: 0o100644,
        size,
        mtime_ns: 1_700_000_000_000_000_000,
        chunk_ids: vec![chunk.to_vec()],
        ..TreeEntry::default()
    }
}

fn dir(name: &[u8], subtree: &[u8]) -> TreeEntry {
    TreeEntry {
        name: name.to_vec(),
        kind: EntryKind::Dir as i32,
        mode: 0o040755,
        subtree_id: subtree.to_vec(),
        ..TreeEntry::default()
    }
}

fn record(root: &[u8]) -> Snapshot {
    Snapshot {
        job: "hostile".into(),
        host: "h1".into(),
        r#type: SnapshotType::Full as i32,
        root_tree_id: root.to_vec(),
        ..Snapshot::default()
    }
}

fn send(kind: sender_message::Kind) -> SenderMessage {
    SenderMessage { kind: Some(kind) }
}

fn commit(snapshot: Snapshot) -> Vec<SenderMessage> {
    vec![send(sender_message::Kind::Commit(Commit {
        snapshot: Some(snapshot),
    }))]
}

/// One call of a case.
enum Call {
    Upload(Vec<SenderMessage>),
    GetChunks(Vec<Vec<u8>>),
    GetTree(Vec<u8>),
    GetSnapshot(String),
    Restore(String, String),
    Delete(String),
    Verify(String),
    /// A `GetTreeRequest` whose `id` is not UTF-8, sent where a
    /// `GetSnapshotRequest` (field 1: a string) is expected: a message
    /// that does not decode.
    Undecodable(Channel),
}

struct Case {
    what: &'static str,
    call: Call,
    expect: Code,
}

fn case(what: &'static str, expect: Code, call: Call) -> Case {
    Case { what, call, expect }
}

/// A commit of `snapshot` (all its chunks staged) that must be refused.
fn refused(what: &'static str, expect: Code, snapshot: Snapshot) -> Case {
    case(what, expect, Call::Upload(commit(snapshot)))
}

/// Drain a server stream: the items, or the first error.
async fn drain<T>(
    stream: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>,
) -> Result<Vec<T>, tonic::Status> {
    let mut stream = stream?.into_inner();
    let mut items = Vec::new();
    while let Some(item) = stream.next().await {
        items.push(item?);
    }
    Ok(items)
}

async fn run(client: &mut StorageClient<Channel>, call: Call) -> Result<(), tonic::Status> {
    match call {
        Call::Upload(messages) => upload(client, messages).await.map(drop),
        Call::GetChunks(ids) => drain(client.get_chunks(GetChunksRequest { ids }).await)
            .await
            .map(drop),
        Call::GetTree(id) => client
            .get_tree(GetTreeRequest {
                id,
                ..GetTreeRequest::default()
            })
            .await
            .map(drop),
        Call::GetSnapshot(snapshot) => client
            .get_snapshot(GetSnapshotRequest { snapshot })
            .await
            .map(drop),
        Call::Restore(snapshot, path) => drain(
            client
                .restore(RestoreRequest {
                    snapshot,
                    path,
                    ..Default::default()
                })
                .await,
        )
        .await
        .map(drop),
        Call::Delete(snapshot) => client
            .delete_snapshot(DeleteSnapshotRequest { snapshot })
            .await
            .map(drop),
        Call::Undecodable(channel) => {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready()
                .await
                .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
            let codec = tonic_prost::ProstCodec::<GetTreeRequest, Snapshot>::default();
            grpc.unary(
                tonic::Request::new(GetTreeRequest {
                    id: vec![0xff, 0xfe, 0xfd],
                    ..GetTreeRequest::default()
                }),
                "/fabric.v1.Storage/GetSnapshot".parse().unwrap(),
                codec,
            )
            .await
            .map(drop)
        }
        Call::Verify(snapshot) => client
            .verify(VerifyRequest {
                sample: 0.0,
                snapshot,
            })
            .await
            .map(drop),
    }
}

/// What must not change: the snapshots and the store's counters (free
/// space aside, which other processes move).
async fn observe(client: &mut StorageClient<Channel>) -> (Vec<Snapshot>, StoreStats) {
    let snapshots = client
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    let stats = client.stats(StatsRequest {}).await.unwrap().into_inner();
    (
        snapshots,
        StoreStats {
            free_bytes: 0,
            capacity_bytes: 0,
            ..stats
        },
    )
}

async fn serving(node: &Server) -> bool {
    health(&node.address).await == tonic_health::pb::health_check_response::ServingStatus::Serving
}

/// Commit a valid snapshot whose one file holds every staged chunk, in
/// batches; returns it.
async fn stage(client: &mut StorageClient<Channel>, staged: &[Vec<u8>], name: &[u8]) -> Snapshot {
    let mut entry = TreeEntry {
        name: name.to_vec(),
        kind: EntryKind::File as i32,
        mode: 0o100644,
        ..TreeEntry::default()
    };
    let mut messages = Vec::new();
    for (batch, group) in staged.chunks(64).enumerate() {
        let chunks = group
            .iter()
            .map(|data| ChunkData {
                id: id_of(data),
                data: data.clone().into(),
                ..ChunkData::default()
            })
            .collect();
        messages.push(send(sender_message::Kind::Chunks(ChunkBatch {
            batch: batch as u64,
            chunks,
        })));
    }
    for data in staged {
        entry.size += data.len() as u64;
        entry.chunk_ids.push(id_of(data));
    }
    let root = Tree {
        entries: vec![entry],
        parts: Vec::new(),
    }
    .encode_to_vec();
    messages.push(send(sender_message::Kind::Chunks(ChunkBatch {
        batch: 1_000_000,
        chunks: vec![ChunkData {
            id: id_of(&root),
            data: root.clone().into(),
            ..ChunkData::default()
        }],
    })));
    messages.extend(commit(record(&id_of(&root))));
    let replies = upload(client, messages).await.unwrap();
    match replies.last().and_then(|reply| reply.kind.clone()) {
        Some(receiver_message::Kind::Committed(committed)) => committed.snapshot.unwrap(),
        other => panic!("staging was not committed: {other:?}"),
    }
}

#[tokio::test]
async fn hostile_input_is_refused_with_a_clear_code_and_changes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let node = Server::node(&work.path().join("store"), &[]);
    let mut client = storage_client(&node.address).await;

    let mut b = Builder::default();
    let content = b.chunk(b"the content of a file");
    let size = 21u64;
    let good = b.tree(vec![file(b"a", &content, size)]);
    let long_name = vec![b'n'; 10_000];
    let with = |b: &mut Builder, entry: TreeEntry| b.tree(vec![entry]);

    // Trees, one rule broken in each.
    let bad_name = |b: &mut Builder, name: &[u8]| with(b, file(name, &content, size));
    let empty_name = bad_name(&mut b, b"");
    let dot = bad_name(&mut b, b".");
    let dot_dot = bad_name(&mut b, b"..");
    let absolute = bad_name(&mut b, b"/abs");
    let slash = bad_name(&mut b, b"a/b");
    let nul = bad_name(&mut b, b"a\0b");
    let name_256 = bad_name(&mut b, &[b'x'; 256]);
    let name_10k = bad_name(&mut b, &long_name);
    let duplicate = b.tree(vec![file(b"a", &content, size), file(b"a", &content, size)]);
    let unsorted = b.tree(vec![file(b"b", &content, size), file(b"a", &content, size)]);
    let kind = |b: &mut Builder, kind: i32| {
        with(
            b,
            TreeEntry {
                kind,
                ..file(b"f", &content, size)
            },
        )
    };
    let kind_0 = kind(&mut b, 0);
    let kind_99 = kind(&mut b, 99);
    let sized = |b: &mut Builder, size: u64| with(b, file(b"f", &content, size));
    let size_max = sized(&mut b, u64::MAX);
    let size_0 = sized(&mut b, 0);
    let size_plus_1 = sized(&mut b, size + 1);
    let dir_no_subtree = with(&mut b, dir(b"d", b""));
    let dir_short_subtree = with(&mut b, dir(b"d", b"abc"));
    let file_with_subtree = with(
        &mut b,
        TreeEntry {
            subtree_id: good.clone(),
            ..file(b"f", &content, size)
        },
    );
    let symlink = |target: &[u8]| TreeEntry {
        name: b"l".to_vec(),
        kind: EntryKind::Symlink as i32,
        mode: 0o120777,
        symlink_target: target.to_vec(),
        ..TreeEntry::default()
    };
    let symlink_empty = with(&mut b, symlink(b""));
    let symlink_nul = with(&mut b, symlink(b"a\0b"));
    let symlink_with_chunks = with(
        &mut b,
        TreeEntry {
            chunk_ids: vec![content.clone()],
            size,
            ..symlink(b"t")
        },
    );
    let moded = |b: &mut Builder, mode: u32| {
        with(
            b,
            TreeEntry {
                mode,
                ..file(b"f", &content, size)
            },
        )
    };
    let mode_huge = moded(&mut b, 0o7_777_777);
    let mode_of_dir = moded(&mut b, 0o040755);
    let mtime_min = with(
        &mut b,
        TreeEntry {
            mtime_ns: i64::MIN,
            ..file(b"f", &content, size)
        },
    );
    let ctime_min = with(
        &mut b,
        TreeEntry {
            ctime_ns: i64::MIN,
            ..file(b"f", &content, size)
        },
    );
    let xattr = |name: &[u8], len: usize| ExtendedAttribute {
        name: name.to_vec(),
        value: vec![7; len],
    };
    let xattrs_unsorted = with(
        &mut b,
        TreeEntry {
            xattrs: vec![xattr(b"user.b", 1), xattr(b"user.a", 1)],
            ..file(b"f", &content, size)
        },
    );
    let xattr_huge = with(
        &mut b,
        TreeEntry {
            xattrs: vec![xattr(b"user.a", 70_000)],
            ..file(b"f", &content, size)
        },
    );
    let short_chunk_id = with(&mut b, file(b"f", b"abc", size));
    // 300 directories deep.
    let mut deep = good.clone();
    for _ in 0..300 {
        deep = with(&mut b, dir(b"d", &deep));
    }
    // 40 levels of two directories that are the level below: 2^40 paths
    // to a file of 1,000 references to one chunk.
    let many = b.tree(vec![TreeEntry {
        chunk_ids: vec![content.clone(); 1000],
        ..file(b"f", &content, size * 1000)
    }]);
    let mut bomb = many;
    for _ in 0..40 {
        bomb = b.tree(vec![dir(b"a", &bomb), dir(b"b", &bomb)]);
    }
    let bad_deep_inside = {
        let inner = bad_name(&mut b, b"x/y");
        let middle = b.tree(vec![dir(b"inner", &inner)]);
        b.tree(vec![file(b"a", &content, size), dir(b"middle", &middle)])
    };
    let subtree_not_a_tree = with(&mut b, dir(b"d", &content));
    let absent = id_of(b"never stored anywhere");
    let missing_chunk = with(&mut b, file(b"f", &absent, size));
    let missing_subtree = with(&mut b, dir(b"d", &absent));

    stage(&mut client, &b.staged, b"staged").await;
    let real = {
        let mut b = Builder::default();
        b.chunk(b"real data");
        stage(&mut client, &b.staged, b"real").await
    };
    let other_host = {
        let mut b = Builder::default();
        b.chunk(b"another host's data");
        let root_entry = file(b"other", &id_of(b"another host's data"), 19);
        b.tree(vec![root_entry]);
        let mut staged = stage(&mut client, &b.staged, b"other").await;
        // Its own commit, as host h2.
        let root = id_of(
            &Tree {
                entries: vec![file(b"other", &id_of(b"another host's data"), 19)],
                parts: Vec::new(),
            }
            .encode_to_vec(),
        );
        let replies = upload(
            &mut client,
            commit(Snapshot {
                host: "h2".into(),
                ..record(&root)
            }),
        )
        .await
        .unwrap();
        if let Some(receiver_message::Kind::Committed(committed)) =
            replies.last().and_then(|reply| reply.kind.clone())
        {
            staged = committed.snapshot.unwrap();
        }
        staged
    };
    assert_eq!(other_host.host, "h2");
    // A snapshot in its WORM window (until 2100).
    let retained = {
        let replies = upload(
            &mut client,
            commit(Snapshot {
                job: "worm".into(),
                retain_until_ms: 4_102_444_800_000,
                ..record(&good)
            }),
        )
        .await
        .unwrap();
        match replies.last().and_then(|reply| reply.kind.clone()) {
            Some(receiver_message::Kind::Committed(committed)) => committed.snapshot.unwrap(),
            other => panic!("the retained snapshot was not committed: {other:?}"),
        }
    };

    let with_root = |root: &[u8]| record(root);
    let rec = |change: &dyn Fn(&mut Snapshot)| {
        let mut snapshot = record(&good);
        change(&mut snapshot);
        snapshot
    };
    use Code::{
        AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, NotFound, OutOfRange,
        PermissionDenied,
    };
    let cases = vec![
        // 1. Commit validation: trees.
        refused("an empty name", InvalidArgument, with_root(&empty_name)),
        refused("the name .", InvalidArgument, with_root(&dot)),
        refused("the name ..", InvalidArgument, with_root(&dot_dot)),
        refused("an absolute name", InvalidArgument, with_root(&absolute)),
        refused("a name with /", InvalidArgument, with_root(&slash)),
        refused("a name with NUL", InvalidArgument, with_root(&nul)),
        refused("a name of 256 bytes", InvalidArgument, with_root(&name_256)),
        refused(
            "a name of 10,000 bytes",
            InvalidArgument,
            with_root(&name_10k),
        ),
        refused("duplicate names", InvalidArgument, with_root(&duplicate)),
        refused("unsorted names", InvalidArgument, with_root(&unsorted)),
        refused("kind 0", InvalidArgument, with_root(&kind_0)),
        refused("kind 99", InvalidArgument, with_root(&kind_99)),
        refused("a size of 2^64-1", InvalidArgument, with_root(&size_max)),
        refused(
            "a size of 0 with a chunk",
            InvalidArgument,
            with_root(&size_0),
        ),
        refused(
            "a size one too large",
            InvalidArgument,
            with_root(&size_plus_1),
        ),
        refused(
            "a directory without subtree",
            InvalidArgument,
            with_root(&dir_no_subtree),
        ),
        refused(
            "a 3-byte subtree id",
            InvalidArgument,
            with_root(&dir_short_subtree),
        ),
        refused(
            "a file with a subtree",
            InvalidArgument,
            with_root(&file_with_subtree),
        ),
        refused(
            "an empty symlink target",
            InvalidArgument,
            with_root(&symlink_empty),
        ),
        refused(
            "a symlink target with NUL",
            InvalidArgument,
            with_root(&symlink_nul),
        ),
        refused(
            "a symlink with content",
            InvalidArgument,
            with_root(&symlink_with_chunks),
        ),
        refused(
            "a mode beyond 16 bits",
            InvalidArgument,
            with_root(&mode_huge),
        ),
        refused(
            "a file with a directory's mode",
            InvalidArgument,
            with_root(&mode_of_dir),
        ),
        refused(
            "an mtime of i64::MIN",
            InvalidArgument,
            with_root(&mtime_min),
        ),
        refused(
            "a ctime of i64::MIN",
            InvalidArgument,
            with_root(&ctime_min),
        ),
        refused(
            "unsorted extended attributes",
            InvalidArgument,
            with_root(&xattrs_unsorted),
        ),
        refused(
            "a 70 kB extended attribute",
            InvalidArgument,
            with_root(&xattr_huge),
        ),
        refused(
            "a 3-byte chunk id",
            InvalidArgument,
            with_root(&short_chunk_id),
        ),
        refused("300 levels deep", InvalidArgument, with_root(&deep)),
        refused(
            "a DAG that expands to 2^50 bytes",
            InvalidArgument,
            with_root(&bomb),
        ),
        refused(
            "a bad name two levels down",
            InvalidArgument,
            with_root(&bad_deep_inside),
        ),
        refused(
            "a subtree that is not a tree",
            InvalidArgument,
            with_root(&subtree_not_a_tree),
        ),
        refused(
            "a root that is not a tree",
            InvalidArgument,
            with_root(&content),
        ),
        refused(
            "a missing chunk",
            FailedPrecondition,
            with_root(&missing_chunk),
        ),
        refused(
            "a missing subtree",
            FailedPrecondition,
            with_root(&missing_subtree),
        ),
        refused("a missing root", FailedPrecondition, with_root(&absent)),
        // 2. The record: ids, names, labels, times.
        refused("a 3-byte root id", InvalidArgument, with_root(b"abc")),
        refused("no root id", InvalidArgument, with_root(b"")),
        refused(
            "the id latest",
            InvalidArgument,
            rec(&|s| s.id = "latest".into()),
        ),
        refused(
            "an uppercase id",
            InvalidArgument,
            rec(&|s| s.id = real.id.to_uppercase()),
        ),
        refused(
            "a 6-digit prefix of a real id as id",
            InvalidArgument,
            rec(&|s| s.id = real.id[..6].into()),
        ),
        refused(
            "an id of 100 kB",
            InvalidArgument,
            rec(&|s| s.id = "a".repeat(100_000)),
        ),
        refused(
            "an existing id with other content",
            AlreadyExists,
            rec(&|s| s.id = real.id.clone()),
        ),
        refused(
            "another snapshot's id as name",
            InvalidArgument,
            rec(&|s| s.name = real.id.clone()),
        ),
        refused(
            "another host's snapshot's name",
            AlreadyExists,
            rec(&|s| s.name = other_host.name.clone()),
        ),
        refused(
            "a name with ..",
            InvalidArgument,
            rec(&|s| s.name = "a/../b".into()),
        ),
        refused(
            "a name with a newline",
            InvalidArgument,
            rec(&|s| s.name = "a\nb".into()),
        ),
        refused(
            "a job with ../",
            InvalidArgument,
            rec(&|s| s.job = "../x".into()),
        ),
        refused(
            "a job with /",
            InvalidArgument,
            rec(&|s| s.job = "a/b".into()),
        ),
        refused(
            "a host with NUL",
            InvalidArgument,
            rec(&|s| s.host = "h\0x".into()),
        ),
        refused(
            "a host of ..",
            InvalidArgument,
            rec(&|s| s.host = "..".into()),
        ),
        refused(
            "an instance with a newline",
            InvalidArgument,
            rec(&|s| s.instance = "i\n".into()),
        ),
        refused(
            "a master host of 200 bytes",
            InvalidArgument,
            rec(&|s| s.master_host = "m".repeat(200)),
        ),
        refused(
            "a tag with /",
            InvalidArgument,
            rec(&|s| s.tags = vec!["a/b".into()]),
        ),
        refused(
            "65 tags",
            InvalidArgument,
            rec(&|s| s.tags = vec!["t".into(); 65]),
        ),
        refused(
            "an empty tag",
            InvalidArgument,
            rec(&|s| s.tags = vec![String::new()]),
        ),
        refused("snapshot type 7", InvalidArgument, rec(&|s| s.r#type = 7)),
        refused(
            "a start time in the year 2500",
            InvalidArgument,
            rec(&|s| s.start_time_ms = 16_725_225_600_000),
        ),
        refused(
            "a start time before 1970",
            InvalidArgument,
            rec(&|s| s.start_time_ms = -5),
        ),
        refused(
            "a WORM window of 300 years",
            InvalidArgument,
            rec(&|s| s.retain_until_ms = 11_000_000_000_000),
        ),
        refused(
            "a parent id with ../",
            InvalidArgument,
            rec(&|s| s.parent_id = "../../x".into()),
        ),
        // The transfer protocol.
        case(
            "a commit without a snapshot",
            InvalidArgument,
            Call::Upload(vec![send(sender_message::Kind::Commit(Commit {
                snapshot: None,
            }))]),
        ),
        case(
            "an empty message",
            InvalidArgument,
            Call::Upload(vec![SenderMessage { kind: None }]),
        ),
        case(
            "an offer of a 3-byte id",
            InvalidArgument,
            Call::Upload(vec![send(sender_message::Kind::Offer(Offer {
                batch: 1,
                ids: vec![b"abc".to_vec()],
            }))]),
        ),
        case(
            "an offer of 5,000 ids",
            InvalidArgument,
            Call::Upload(vec![send(sender_message::Kind::Offer(Offer {
                batch: 1,
                ids: vec![content.clone(); 5000],
            }))]),
        ),
        case(
            "a chunk that does not match its id",
            DataLoss,
            Call::Upload(vec![send(sender_message::Kind::Chunks(ChunkBatch {
                batch: 1,
                chunks: vec![ChunkData {
                    id: content.clone(),
                    data: b"something else".to_vec().into(),
                    ..ChunkData::default()
                }],
            }))]),
        ),
        case(
            "a chunk of an unknown encoding",
            InvalidArgument,
            Call::Upload(vec![send(sender_message::Kind::Chunks(ChunkBatch {
                batch: 1,
                chunks: vec![ChunkData {
                    id: id_of(b"x"),
                    data: b"x".to_vec().into(),
                    encoding: 9,
                    ..ChunkData::default()
                }],
            }))]),
        ),
        case(
            "a chunk of 20 MiB",
            OutOfRange,
            Call::Upload(vec![send(sender_message::Kind::Chunks(ChunkBatch {
                batch: 1,
                chunks: vec![ChunkData {
                    id: id_of(b"x"),
                    data: vec![0u8; 20 << 20].into(),
                    encoding: 0,
                    plain_size: 0,
                }],
            }))]),
        ),
        // 8. Reads.
        case(
            "4,097 ids in one GetChunks",
            InvalidArgument,
            Call::GetChunks(vec![content.clone(); 4097]),
        ),
        case(
            "a 3-byte id in GetChunks",
            InvalidArgument,
            Call::GetChunks(vec![b"abc".to_vec()]),
        ),
        case(
            "an unknown chunk",
            NotFound,
            Call::GetChunks(vec![absent.clone()]),
        ),
        case("an unknown tree", NotFound, Call::GetTree(absent.clone())),
        case(
            "a chunk that is not a tree",
            InvalidArgument,
            Call::GetTree(content.clone()),
        ),
        case(
            "a 3-byte tree id",
            InvalidArgument,
            Call::GetTree(b"abc".to_vec()),
        ),
        case(
            "the snapshot latest",
            NotFound,
            Call::GetSnapshot("latest".into()),
        ),
        case(
            "a snapshot spec of 100 kB",
            NotFound,
            Call::GetSnapshot("b".repeat(100_000)),
        ),
        case(
            "a 6-digit id prefix",
            NotFound,
            Call::GetSnapshot(real.id[..6].into()),
        ),
        case(
            "a restore of an unknown snapshot",
            NotFound,
            Call::Restore("0".repeat(32), String::new()),
        ),
        case(
            "a restore of a path not in the snapshot",
            NotFound,
            Call::Restore(real.id.clone(), "no/such/path".into()),
        ),
        case(
            "a restore of ../etc",
            InvalidArgument,
            Call::Restore(real.id.clone(), "../etc".into()),
        ),
        case(
            "a delete of an unknown snapshot",
            NotFound,
            Call::Delete("f".repeat(32)),
        ),
        case(
            "a delete without a snapshot",
            NotFound,
            Call::Delete(String::new()),
        ),
        case(
            "a verify of an unknown snapshot",
            NotFound,
            Call::Verify("nothing".into()),
        ),
        case(
            "a delete inside the WORM window",
            PermissionDenied,
            Call::Delete(retained.id.clone()),
        ),
        case(
            "a message that does not decode",
            InvalidArgument,
            Call::Undecodable(
                fabric_node::client::channel(
                    &fabric_node::client::Peer::any_node(&node.address),
                    &pki().operator_transport(),
                )
                .await
                .unwrap(),
            ),
        ),
    ];
    assert!(cases.len() >= 60, "{} cases", cases.len());

    let before = observe(&mut client).await;
    assert_eq!(
        before.0.len(),
        5,
        "staged, real, the other host's (staged as h1, then h2), retained"
    );
    for Case { what, call, expect } in cases {
        let status = match run(&mut client, call).await {
            Ok(()) => panic!("{what}: accepted, expected {expect:?}"),
            Err(status) => status,
        };
        assert_eq!(status.code(), expect, "{what}: {}", status.message());
        assert!(
            status.message().len() <= 600,
            "{what}: a message of {} bytes: {}...",
            status.message().len(),
            &status.message()[..200]
        );
        assert!(serving(&node).await, "{what}: the node stopped serving");
        assert_eq!(
            observe(&mut client).await,
            before,
            "{what}: the store changed"
        );
    }
}

/// What the node counts, never what the sender claims; and a retried
/// commit of the same run is answered with the snapshot already there.
#[tokio::test]
async fn the_node_computes_a_snapshots_statistics_and_a_retried_commit_is_a_no_op() {
    let work = tempfile::tempdir().unwrap();
    let node = Server::node(&work.path().join("store"), &[]);
    let mut client = storage_client(&node.address).await;
    let content = b"twenty-one bytes here".to_vec();
    let chunk = id_of(&content);
    let inner = Tree {
        entries: vec![file(b"f", &chunk, 21)],
        parts: Vec::new(),
    }
    .encode_to_vec();
    let root = Tree {
        entries: vec![dir(b"a", &id_of(&inner)), dir(b"b", &id_of(&inner))],
        parts: Vec::new(),
    }
    .encode_to_vec();
    let lying = Snapshot {
        id: "00112233445566778899aabbccddeeff".into(),
        start_time_ms: 1_700_000_000_000,
        stats: Some(SnapshotStats {
            files: 1_000_000,
            dirs: 7,
            total_bytes: 3_827_016_000_000,
            bytes_read: u64::MAX,
            new_bytes: 1,
            stored_bytes: 1,
            chunks: 1,
            new_chunks: 0,
            files_unchanged: 999,
        }),
        ..record(&id_of(&root))
    };
    let plain_bytes = (content.len() + inner.len() + root.len()) as u64;
    let mut messages = vec![send(sender_message::Kind::Chunks(ChunkBatch {
        batch: 1,
        chunks: [content, inner, root]
            .into_iter()
            .map(|data| ChunkData {
                id: id_of(&data),
                data: data.into(),
                ..ChunkData::default()
            })
            .collect(),
    }))];
    messages.extend(commit(lying.clone()));
    let replies = upload(&mut client, messages).await.unwrap();
    let Some(receiver_message::Kind::Committed(committed)) =
        replies.last().and_then(|reply| reply.kind.clone())
    else {
        panic!("not committed: {replies:?}");
    };
    let committed = committed.snapshot.unwrap();
    let stats = committed.stats.unwrap();
    assert_eq!(
        (stats.files, stats.dirs, stats.total_bytes, stats.chunks),
        (2, 3, 42, 2),
        "counted through both paths to the shared directory: {stats:?}"
    );
    assert_eq!(stats.bytes_read, 42, "capped by the size");
    assert_eq!(stats.files_unchanged, 2, "capped by the files");
    assert_eq!(stats.new_chunks, 3, "the receiver's own count");
    assert_eq!(stats.new_bytes, plain_bytes, "{stats:?}");
    assert!(stats.stored_bytes > 1);

    // The same run again (a retried copy): answered with the record there.
    let again = upload(&mut client, commit(lying.clone())).await.unwrap();
    let Some(receiver_message::Kind::Committed(again)) =
        again.last().and_then(|reply| reply.kind.clone())
    else {
        panic!("a retried commit was refused");
    };
    assert_eq!(again.snapshot.unwrap(), committed);
    // The same id with other content is not.
    let other = upload(
        &mut client,
        commit(Snapshot {
            start_time_ms: 1_700_000_000_001,
            ..lying
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists, "{other:?}");
    let listed = client
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(listed.len(), 1);
}

/// One GetChunks that repeats one id 4,096 times reads it once.
#[tokio::test]
async fn a_repeated_id_is_served_once() {
    let work = tempfile::tempdir().unwrap();
    let node = Server::node(&work.path().join("store"), &[]);
    let mut client = storage_client(&node.address).await;
    let mut b = Builder::default();
    let chunk = b.chunk(&vec![42u8; 100_000]);
    stage(&mut client, &b.staged, b"big").await;
    let items = drain(
        client
            .get_chunks(GetChunksRequest {
                ids: vec![chunk.clone(); 4096],
            })
            .await,
    )
    .await
    .unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].id, chunk);
}

/// A storage client of `node` holding `client/NAME`'s certificate.
async fn client_of(node: &Server, name: &str, dir: &Path) -> StorageClient<Channel> {
    let transport = pki().transport(Some((fabric_trust::Role::Client, name)), dir);
    fabric_node::client::storage(
        &fabric_node::client::Peer::any_node(&node.address),
        &transport,
    )
    .await
    .unwrap()
}

/// Upload one file of `content` as `host`'s snapshot of `job`.
async fn client_backup(
    client: &mut StorageClient<Channel>,
    job: &str,
    host: &str,
    content: &[u8],
) -> Result<Snapshot, tonic::Status> {
    let root = Tree {
        entries: vec![file(b"f", &id_of(content), content.len() as u64)],
        parts: Vec::new(),
    }
    .encode_to_vec();
    let mut messages = vec![send(sender_message::Kind::Chunks(ChunkBatch {
        batch: 1,
        chunks: [content.to_vec(), root.clone()]
            .into_iter()
            .map(|data| ChunkData {
                id: id_of(&data),
                data: data.into(),
                ..ChunkData::default()
            })
            .collect(),
    }))];
    messages.extend(commit(Snapshot {
        job: job.into(),
        host: host.into(),
        ..record(&id_of(&root))
    }));
    let replies = upload(client, messages).await?;
    match replies.last().and_then(|reply| reply.kind.clone()) {
        Some(receiver_message::Kind::Committed(committed)) => Ok(committed.snapshot.unwrap()),
        other => panic!("no commit: {other:?}"),
    }
}

/// byteback's guards, on a node that sets them, against a client: a second
/// snapshot of one job within `min_interval_s` is refused naming when the
/// next is allowed (another job is not held back, nor an operator); a
/// snapshot far larger than the usual is kept and flagged.
#[tokio::test]
async fn a_node_refuses_snapshots_too_often_and_flags_sudden_growth() {
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("node.toml");
    std::fs::write(
        &config,
        "min_interval_s = 3600\nmax_growth = 4.0\ningest_limit_bytes_per_s = 50000000\n",
    )
    .unwrap();
    let node = Server::node(
        &work.path().join("store"),
        &["--config", config.to_str().unwrap()],
    );
    let mut web1 = client_of(&node, "web1", work.path()).await;
    client_backup(&mut web1, "daily", "web1", b"first")
        .await
        .unwrap();
    let refused = client_backup(&mut web1, "daily", "web1", b"second")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("allowed from 20"), "{refused:?}");
    assert!(serving(&node).await);
    // Other jobs are their own sources.
    for job in ["a", "b", "c"] {
        client_backup(&mut web1, job, "web1", job.repeat(1000).as_bytes())
            .await
            .unwrap();
    }
    // Operators and storage nodes' copies are not held to the guards.
    let mut operator = storage_client(&node.address).await;
    let by_operator = client_backup(&mut operator, "daily", "web1", b"by the operator")
        .await
        .unwrap();
    assert!(!by_operator.unusual_growth);

    // Growth: usual new data is about 1 kB for job g; then 100 kB.
    let growth = {
        let dir = work.path().join("growth");
        let config = work.path().join("growth.toml");
        std::fs::write(&config, "max_growth = 4.0\n").unwrap();
        let node = Server::node(&dir, &["--config", config.to_str().unwrap()]);
        let mut web2 = client_of(&node, "web2", work.path()).await;
        for round in 0..3u8 {
            let usual = client_backup(&mut web2, "g", "web2", &vec![round; 1000])
                .await
                .unwrap();
            assert!(!usual.unusual_growth, "{usual:?}");
        }
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        client_backup(&mut web2, "g", "web2", &big).await.unwrap()
    };
    assert!(growth.unusual_growth, "{growth:?}");
    assert!(
        growth.warnings.iter().any(|w| w.contains("unusual growth")),
        "{:?}",
        growth.warnings
    );
}

/// A per-host quota on a node: a client's upload that would go over it
/// fails with RESOURCE_EXHAUSTED before its batch is written, and commits
/// nothing; another host has its own room; an operator's upload of that
/// host's snapshot is held to the same quota at its commit.
#[tokio::test]
async fn a_hosts_quota_stops_an_upload_that_would_go_over_it() {
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("node.toml");
    std::fs::write(
        &config,
        "host_quota_bytes = 40000\n[host_quotas]\nbig = 10000000\n",
    )
    .unwrap();
    let node = Server::node(
        &work.path().join("store"),
        &["--config", config.to_str().unwrap()],
    );
    let incompressible = |seed: u32, len: u32| -> Vec<u8> {
        (0..len)
            .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
            .collect()
    };
    let mut web1 = client_of(&node, "web1", work.path()).await;
    let first = client_backup(&mut web1, "a", "web1", &incompressible(1, 20_000))
        .await
        .unwrap();
    let used = first.stats.unwrap().stored_bytes;
    assert!(used > 20_000, "{used}");
    let mut operator = storage_client(&node.address).await;
    let before = observe(&mut operator).await;

    let refused = client_backup(&mut web1, "b", "web1", &incompressible(2, 30_000))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("quota of 40000"), "{refused:?}");
    assert!(serving(&node).await);
    // The operator's upload of web1's data is held to web1's quota too.
    let by_operator = client_backup(&mut operator, "c", "web1", &incompressible(3, 30_000))
        .await
        .unwrap_err();
    assert_eq!(
        by_operator.code(),
        Code::ResourceExhausted,
        "{by_operator:?}"
    );
    let after = observe(&mut operator).await;
    assert_eq!(after.0, before.0, "no snapshot was committed");

    // Another host has its own room, and "big" a quota of its own.
    let mut big = client_of(&node, "big", work.path()).await;
    client_backup(&mut big, "a", "big", &incompressible(4, 60_000))
        .await
        .unwrap();
}

/// A caller that opens a restore (or a chunk answer) and reads nothing
/// holds the node's sending thread only for the idle timeout: the node
/// then gives up, and when the caller reads on, the answer ends in
/// DEADLINE_EXCEEDED, never as if it were complete.
#[tokio::test]
async fn a_restore_nobody_reads_is_dropped_after_the_idle_timeout_and_never_looks_complete() {
    let work = tempfile::tempdir().unwrap();
    let node = Server::node(
        &work.path().join("store"),
        &["--transfer-idle-timeout-s", "1"],
    );
    let mut client = storage_client(&node.address).await;
    // 48 files of 512 KiB each: far more than the stream's buffers hold.
    let contents: Vec<Vec<u8>> = (0..48u32)
        .map(|seed| {
            (0..512 * 1024u32)
                .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 7919) >> 11) as u8)
                .collect()
        })
        .collect();
    let root = Tree {
        entries: contents
            .iter()
            .enumerate()
            .map(|(index, content)| {
                file(
                    format!("f{index:03}").as_bytes(),
                    &id_of(content),
                    content.len() as u64,
                )
            })
            .collect(),
        parts: Vec::new(),
    }
    .encode_to_vec();
    let mut messages = Vec::new();
    for (batch, group) in contents.chunks(8).enumerate() {
        messages.push(send(sender_message::Kind::Chunks(ChunkBatch {
            batch: batch as u64 + 1,
            chunks: group
                .iter()
                .map(|data| ChunkData {
                    id: id_of(data),
                    data: data.clone().into(),
                    ..ChunkData::default()
                })
                .collect(),
        })));
    }
    messages.push(send(sender_message::Kind::Chunks(ChunkBatch {
        batch: 100,
        chunks: vec![ChunkData {
            id: id_of(&root),
            data: root.clone().into(),
            ..ChunkData::default()
        }],
    })));
    messages.extend(commit(record(&id_of(&root))));
    upload(&mut client, messages).await.unwrap();
    let snapshot = client
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots
        .remove(0);

    // Read in full, the restore ends cleanly.
    let whole = drain(
        client
            .restore(RestoreRequest {
                snapshot: snapshot.id.clone(),
                path: String::new(),
                ..Default::default()
            })
            .await,
    )
    .await
    .unwrap();
    assert_eq!(whole.len(), 96, "48 entries and 48 chunks");

    // Opened and left unread past the idle timeout (1 s here), it is cut.
    let mut stalled = client
        .restore(RestoreRequest {
            snapshot: snapshot.id.clone(),
            path: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut chunks = client
        .get_chunks(GetChunksRequest {
            ids: contents.iter().map(|content| id_of(content)).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    for (what, ended) in [
        ("restore", last_status(&mut stalled).await),
        ("chunks", last_status(&mut chunks).await),
    ] {
        let status = ended.unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{what}: {status:?}");
        assert!(status.message().contains("took nothing"), "{status:?}");
    }
    assert!(serving(&node).await);
}

/// Read a stream to its end: how it ended and how many items came.
async fn last_status<T>(stream: &mut tonic::Streaming<T>) -> Result<usize, tonic::Status> {
    let mut count = 0;
    while let Some(item) = stream.next().await {
        item?;
        count += 1;
    }
    Ok(count)
}
