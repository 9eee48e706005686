//! The storage node as a user meets it: the real `fabric-node` binary on
//! 127.0.0.1 with an OS-chosen port, driven by the real `fabricctl` and by
//! raw gRPC clients where a test must misbehave on purpose.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use fabric_chunkstore::pack::StoredChunk;
use fabric_chunkstore::restore::RestorePolicy;
use fabric_integration_tests::{
    Server, fabricctl_json, fabricctl_ok, generate_tree, health, pseudo_random, storage_client,
};
use fabric_proto::v1::{
    ChunkBatch, ChunkData, ChunkEncoding, Commit, EntryKind, GetNewestSnapshotRequest,
    GetTreeRequest, ListSnapshotsRequest, Offer, SenderMessage, Snapshot, StatsRequest, Tree,
    TreeEntry, receiver_message, sender_message,
};
use prost::Message;
use tokio_stream::StreamExt;

fn backup_json(node: &Server, path: &Path, job: &str) -> serde_json::Value {
    fabricctl_json(&[
        "backup",
        "--node",
        &node.address,
        "--job",
        job,
        path.to_str().unwrap(),
    ])
}

fn field(value: &serde_json::Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {value}"))
}

fn restore(node: &Server, snapshot: &str, path: &str, to: &Path) {
    fabricctl_ok(&[
        "restore",
        snapshot,
        path,
        "--to",
        to.to_str().unwrap(),
        "--node",
        &node.address,
    ]);
}

/// Restore what `backup` (a `backup_json` answer) saved of `source` into `to`.
fn restore_source(node: &Server, backup: &serde_json::Value, source: &Path, to: &Path) {
    let inside = source.to_str().unwrap().trim_start_matches('/');
    restore(node, backup["snapshot"].as_str().unwrap(), inside, to);
}

#[test]
fn a_generated_tree_restores_identical_and_an_unchanged_rebackup_sends_nothing() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    generate_tree(&source, 300, 3 * 1024 * 1024);
    let node = Server::node(&work.path().join("store"), &[]);

    let first = backup_json(&node, &source, "tree");
    assert!(field(&first, "bytes_sent") > 0);
    assert!(field(&first, "files") >= 300);

    let restored = work.path().join("restored");
    restore_source(&node, &first, &source, &restored);
    let compared =
        fabricctl::compare::compare_trees(&source, &restored, true, RestorePolicy::default())
            .unwrap();
    assert!(compared.entries > 300, "{compared:?}");
    // Restored without its setuid bit, as a restore without --keep-setid does.
    let mode = |path: &Path| std::fs::symlink_metadata(path).unwrap().mode() & 0o7777;
    assert_eq!(mode(&source.join("nested/odd-mode")), 0o4751);
    assert_eq!(mode(&restored.join("nested/odd-mode")), 0o751);
    // The sparse file comes back sparse (where the file system makes holes).
    let allocated = |path: &Path| {
        let meta = std::fs::metadata(path).unwrap();
        (meta.blocks() * 512, meta.len())
    };
    let (source_blocks, size) = allocated(&source.join("sparse.img"));
    if source_blocks < size {
        let (restored_blocks, _) = allocated(&restored.join("sparse.img"));
        assert!(
            restored_blocks < size / 2,
            "{restored_blocks} of {size} bytes allocated"
        );
    }

    let second = backup_json(&node, &source, "tree");
    assert_eq!(field(&second, "bytes_sent"), 0, "{second}");
    assert_eq!(field(&second, "chunks_sent"), 0, "{second}");
    assert_eq!(field(&second, "bytes_read"), 0, "{second}");
    assert_eq!(field(&second, "files_unchanged"), field(&second, "files"));
}

#[test]
fn a_small_change_in_a_large_file_sends_only_a_few_chunks() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    let size = 256 * 1024 * 1024;
    let mut data = pseudo_random(size, 7);
    std::fs::write(source.join("big.img"), &data).unwrap();
    let node = Server::node(&work.path().join("store"), &[]);
    let first = backup_json(&node, &source, "big");
    let chunks = field(&first, "chunks_offered");
    assert!(chunks > 100, "{first}");

    let middle = size / 2;
    data[middle..middle + 1024 * 1024].copy_from_slice(&pseudo_random(1024 * 1024, 99));
    std::fs::write(source.join("big.img"), &data).unwrap();
    drop(data);
    let second = backup_json(&node, &source, "big");
    let sent = field(&second, "chunks_sent");
    // The changed MiB touches one or two chunks, plus the file's tree and the
    // trees above it.
    assert!(
        sent <= 8,
        "{sent} chunks sent after a 1 MiB change: {second}"
    );
    assert!(field(&second, "bytes_sent") < 12 * 1024 * 1024, "{second}");
}

#[test]
fn a_killed_client_leaves_no_snapshot_and_the_rerun_sends_only_the_rest() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    for index in 0..8 {
        std::fs::write(
            source.join(format!("part-{index}")),
            pseudo_random(24 * 1024 * 1024, index),
        )
        .unwrap();
    }
    let node = Server::node(&work.path().join("store"), &[]);

    let refused = fabric_integration_tests::fabricctl(&[
        "backup",
        "--node",
        &node.address,
        "--limit-rate",
        "lots",
        source.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("\"lots\" is not a rate"),
        "{refused:?}"
    );

    // 192 MiB at 64 MiB/s: at least three seconds, so the kill comes first.
    let mut client = fabric_integration_tests::fabricctl_command(&[
        "-o",
        "json",
        "backup",
        "--node",
        &node.address,
        "--job",
        "killed",
        "--limit-rate",
        "64MiB/s",
        source.to_str().unwrap(),
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    // Kill it once the node has written some chunks but before the end.
    let packs = work.path().join("store/packs");
    let mut written_before_kill = 0;
    for _ in 0..1000 {
        written_before_kill = directory_bytes(&packs);
        if written_before_kill >= 32 * 1024 * 1024 || client.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = client.kill();
    let status = client.wait().unwrap();
    assert!(
        written_before_kill >= 32 * 1024 * 1024 && !status.success(),
        "the client finished before it could be killed"
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut storage = storage_client(&node.address).await;
        let listed = storage
            .list_snapshots(ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(
            listed.snapshots.is_empty(),
            "a snapshot after the kill: {listed:?}"
        );
    });

    let rerun = backup_json(&node, &source, "killed");
    let offered = field(&rerun, "chunks_offered");
    let sent = field(&rerun, "chunks_sent");
    // At least 32 MiB (some 20 chunks of about 1 MiB, less compression:
    // random data is stored raw) was written before the kill.
    assert!(
        offered - sent >= 16,
        "the rerun sent {sent} of {offered} chunks: {rerun}"
    );
}

#[test]
fn concurrent_uploads_within_the_smallest_memory_budget_all_commit_and_share_their_chunks() {
    const UPLOADS: u64 = 6;
    const OWN_BYTES: usize = 12 * 1024 * 1024;
    const SHARED_BYTES: usize = 16 * 1024 * 1024;
    let work = tempfile::tempdir().unwrap();
    // Every source has two files of its own and one all of them share.
    let shared = pseudo_random(SHARED_BYTES, 1000);
    let sources: Vec<_> = (0..UPLOADS)
        .map(|upload| {
            let source = work.path().join(format!("source-{upload}"));
            std::fs::create_dir_all(&source).unwrap();
            for part in 0..2 {
                std::fs::write(
                    source.join(format!("own-{part}")),
                    pseudo_random(OWN_BYTES / 2, upload * 10 + part),
                )
                .unwrap();
            }
            std::fs::write(source.join("shared"), &shared).unwrap();
            source
        })
        .collect();
    // A budget of 1 byte is raised to the smallest the node allows: one
    // largest message, far less than six uploads keep in flight.
    let node = Server::node(&work.path().join("store"), &["--upload-memory-bytes", "1"]);
    let backups: Vec<serde_json::Value> = std::thread::scope(|scope| {
        let running: Vec<_> = sources
            .iter()
            .enumerate()
            .map(|(upload, source)| {
                let node = &node;
                scope.spawn(move || backup_json(node, source, &format!("upload-{upload}")))
            })
            .collect();
        running.into_iter().map(|run| run.join().unwrap()).collect()
    });

    for (upload, (backup, source)) in backups.iter().zip(&sources).enumerate() {
        let restored = work.path().join(format!("restored-{upload}"));
        restore_source(&node, backup, source, &restored);
        for name in ["own-0", "own-1", "shared"] {
            assert!(
                std::fs::read(restored.join(name)).unwrap()
                    == std::fs::read(source.join(name)).unwrap(),
                "upload {upload}: {name} restored different"
            );
        }
    }
    // Each upload's own bytes once, the shared file once or, where two
    // uploads stored it at the same instant, a few times: not six.
    let packs = directory_bytes(&work.path().join("store/packs"));
    let own = UPLOADS * OWN_BYTES as u64;
    assert!(
        packs >= own + SHARED_BYTES as u64 && packs < own + 3 * SHARED_BYTES as u64,
        "{packs} bytes of packs for {own} bytes of own data and {SHARED_BYTES} shared"
    );
}

fn directory_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| entry.metadata().ok())
                .map(|meta| meta.len())
                .sum()
        })
        .unwrap_or(0)
}

async fn upload(
    node: &Server,
    messages: Vec<SenderMessage>,
) -> Result<Vec<receiver_message::Kind>, tonic::Status> {
    let mut client = storage_client(&node.address).await;
    let replies = fabric_integration_tests::upload(&mut client, messages).await?;
    Ok(replies
        .into_iter()
        .map(|reply| reply.kind.unwrap())
        .collect())
}

fn send(kind: sender_message::Kind) -> SenderMessage {
    SenderMessage { kind: Some(kind) }
}

#[tokio::test]
async fn a_chunk_whose_bytes_do_not_match_its_id_is_data_loss_and_stores_nothing() {
    let work = tempfile::tempdir().unwrap();
    let node = Server::node(&work.path().join("store"), &[]);
    let lie = blake3::hash(b"the truth").as_bytes().to_vec();
    let result = upload(
        &node,
        vec![
            send(sender_message::Kind::Offer(Offer {
                batch: 1,
                ids: vec![lie.clone()],
            })),
            send(sender_message::Kind::Chunks(ChunkBatch {
                batch: 2,
                chunks: vec![ChunkData {
                    id: lie,
                    data: b"a lie".to_vec().into(),
                    ..Default::default()
                }],
            })),
        ],
    )
    .await;
    let status = result.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    let mut client = storage_client(&node.address).await;
    let stats = client.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.chunks, 0);
}

#[test]
fn compressible_data_travels_compressed_and_restores_identical() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    let text: String = (0..200_000)
        .map(|line| format!("line {line}: the same few words, over and over\n"))
        .collect();
    std::fs::write(source.join("log.txt"), &text).unwrap();
    let node = Server::node(&work.path().join("store"), &[]);
    let first = backup_json(&node, &source, "text");
    let sent = field(&first, "bytes_sent");
    assert!(
        sent > 0 && sent < text.len() as u64 / 3,
        "{sent} bytes sent for {} bytes of text: {first}",
        text.len()
    );
    let restored = work.path().join("restored");
    restore_source(&node, &first, &source, &restored);
    assert_eq!(
        std::fs::read_to_string(restored.join("log.txt")).unwrap(),
        text
    );
}

#[tokio::test]
async fn a_compressed_chunk_that_decodes_to_other_bytes_or_too_many_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let node = Server::node(&work.path().join("store"), &[]);
    let claimed = b"what the sender claims to send ".repeat(100);
    let claimed_id = blake3::hash(&claimed).as_bytes().to_vec();
    let other = StoredChunk::encode(
        fabric_chunkstore::Chunk::new(b"something else entirely ".repeat(100)),
        3,
    );
    let swapped = ChunkData {
        id: claimed_id.clone(),
        data: other.stored.clone(),
        encoding: ChunkEncoding::Zstd as i32,
        plain_size: other.raw_len,
    };
    // Offer the claimed id, send `chunk` for it: the node's refusal.
    let refusal = |chunk: ChunkData| {
        let messages = vec![
            send(sender_message::Kind::Offer(Offer {
                batch: 1,
                ids: vec![chunk.id.clone()],
            })),
            send(sender_message::Kind::Chunks(ChunkBatch {
                batch: 2,
                chunks: vec![chunk],
            })),
        ];
        let node = &node;
        async move { upload(node, messages).await.unwrap_err() }
    };
    let status = refusal(swapped).await;
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    assert!(status.message().contains(&hex(&claimed_id)), "{status:?}");

    // A frame announcing far more plain bytes than a chunk may have is
    // refused before anything is decompressed.
    let bomb = ChunkData {
        id: claimed_id,
        data: other.stored,
        encoding: ChunkEncoding::Zstd as i32,
        plain_size: 1 << 30,
    };
    let status = refusal(bomb).await;
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");

    let mut client = storage_client(&node.address).await;
    let stats = client.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.chunks, 0);
}

#[tokio::test]
async fn an_oversized_message_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let node = Server::node(&work.path().join("store"), &[]);
    let data = vec![0u8; 40 * 1024 * 1024];
    let id = blake3::hash(&data).as_bytes().to_vec();
    let mut client = storage_client(&node.address)
        .await
        .max_encoding_message_size(64 * 1024 * 1024);
    let messages = vec![send(sender_message::Kind::Chunks(ChunkBatch {
        batch: 1,
        chunks: vec![ChunkData {
            id,
            data: data.into(),
            ..Default::default()
        }],
    }))];
    let result = async {
        let mut replies = client
            .upload(tokio_stream::iter(messages))
            .await?
            .into_inner();
        while let Some(reply) = replies.next().await {
            reply?;
        }
        Ok::<_, tonic::Status>(())
    }
    .await;
    let status = result.unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::InvalidArgument
        ),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_commit_with_a_missing_chunk_is_refused_naming_it() {
    let work = tempfile::tempdir().unwrap();
    let node = Server::node(&work.path().join("store"), &[]);
    let absent = blake3::hash(b"never sent").as_bytes().to_vec();
    let tree = Tree {
        entries: vec![TreeEntry {
            name: b"file".to_vec(),
            kind: EntryKind::File as i32,
            mode: 0o100644,
            size: 10,
            chunk_ids: vec![absent.clone()],
            ..Default::default()
        }],
        parts: Vec::new(),
    };
    let encoded = tree.encode_to_vec();
    let root = blake3::hash(&encoded).as_bytes().to_vec();
    let status = upload(
        &node,
        vec![
            send(sender_message::Kind::Chunks(ChunkBatch {
                batch: 1,
                chunks: vec![ChunkData {
                    id: root.clone(),
                    data: encoded.into(),
                    ..Default::default()
                }],
            })),
            send(sender_message::Kind::Commit(Commit {
                snapshot: Some(Snapshot {
                    job: "broken".into(),
                    root_tree_id: root,
                    ..Default::default()
                }),
            })),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains(&hex(&absent)),
        "{}",
        status.message()
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A traversal name never reaches the catalogue: the commit refuses it
/// (restore refuses such names too, should a store hold one: the restore
/// unit tests plant them below the commit's checks).
#[tokio::test]
async fn a_snapshot_with_a_traversal_name_is_refused_at_commit() {
    let work = tempfile::tempdir().unwrap();
    let node = Server::node(&work.path().join("store"), &[]);
    let content = b"owned".to_vec();
    let content_id = blake3::hash(&content).as_bytes().to_vec();
    let mut chunks = vec![ChunkData {
        id: content_id.clone(),
        data: content.into(),
        ..Default::default()
    }];
    let mut commits = Vec::new();
    for evil in ["../escaped", "/etc/escaped"] {
        let tree = Tree {
            entries: vec![TreeEntry {
                name: evil.as_bytes().to_vec(),
                kind: EntryKind::File as i32,
                mode: 0o100644,
                size: 5,
                chunk_ids: vec![content_id.clone()],
                ..Default::default()
            }],
            parts: Vec::new(),
        };
        let encoded = tree.encode_to_vec();
        let root = blake3::hash(&encoded).as_bytes().to_vec();
        chunks.push(ChunkData {
            id: root.clone(),
            data: encoded.into(),
            ..Default::default()
        });
        commits.push((evil, root));
    }
    for (evil, root) in commits {
        let messages = vec![
            send(sender_message::Kind::Chunks(ChunkBatch {
                batch: 1,
                chunks: chunks.clone(),
            })),
            send(sender_message::Kind::Commit(Commit {
                snapshot: Some(Snapshot {
                    job: "evil".into(),
                    root_tree_id: root,
                    ..Default::default()
                }),
            })),
        ];
        let status = upload(&node, messages).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(evil) && status.message().contains("'/'"),
            "the refusal names the entry and the rule: {}",
            status.message()
        );
    }
    let mut client = storage_client(&node.address).await;
    let listed = client
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.snapshots.is_empty(), "nothing was committed");
}

#[test]
fn a_backup_starts_from_the_newest_snapshot_of_its_own_job_and_host() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    generate_tree(&source, 20, 64 * 1024);
    let node = Server::node(&work.path().join("store"), &[]);
    let id = |backup: serde_json::Value| backup["snapshot"].as_str().unwrap().to_owned();
    let first = id(backup_json(&node, &source, "daily"));
    let other_job = id(backup_json(&node, &source, "weekly"));
    let second = id(backup_json(&node, &source, "daily"));

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = storage_client(&node.address).await;
        let mut get = async |id: &str| {
            client
                .get_snapshot(fabric_proto::v1::GetSnapshotRequest {
                    snapshot: id.to_owned(),
                })
                .await
                .unwrap()
                .into_inner()
        };
        let second = get(&second).await;
        assert_eq!(second.parent_id, first, "the newest of its own job");
        assert_eq!(get(&other_job).await.parent_id, "", "no earlier weekly");

        let mut newest = async |job: &str, host: &str, instance: &str| {
            client
                .get_newest_snapshot(GetNewestSnapshotRequest {
                    job: job.into(),
                    host: host.into(),
                    instance: instance.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .snapshot
                .map(|snapshot| snapshot.id)
        };
        let host = second.host.clone();
        assert_eq!(newest("daily", &host, "").await, Some(second.id.clone()));
        assert_eq!(newest("weekly", &host, "").await, Some(other_job));
        assert_eq!(newest("daily", &host, "blue").await, None);
        assert_eq!(newest("daily", "elsewhere", "").await, None);
        assert_eq!(newest("monthly", &host, "").await, None);
    });
}

/// Two storage nodes, n1 and n2, registered with a coordinator (which
/// resolves a copy's target node id): (coordinator, n1, n2).
fn two_registered_nodes(work: &Path) -> (Server, Server, Server) {
    let coordinator = Server::start(
        "fabric-coordinator",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            work.join("coordinator").to_str().unwrap(),
            "--heartbeat-interval",
            "200ms",
        ],
        &[],
    );
    let node = |id: &str| {
        Server::node(
            &work.join(format!("store-{id}")),
            &[
                "--node-id",
                id,
                "--roles",
                "storage",
                "--coordinator",
                &coordinator.address,
            ],
        )
    };
    let (first, second) = (node("n1"), node("n2"));
    for _ in 0..300 {
        let nodes = fabricctl_json(&["--coordinator", &coordinator.address, "node", "list"]);
        if nodes.as_array().is_some_and(|nodes| nodes.len() == 2) {
            return (coordinator, first, second);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("the nodes did not register");
}

/// Copy snapshot `id` from node `from` to node `to_id` with `CopySnapshot`;
/// the snapshot as `to_id` committed it.
fn copy_snapshot(from: &Server, id: &str, to_id: &str) -> Snapshot {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = storage_client(&from.address).await;
        let mut progress = client
            .copy_snapshot(fabric_proto::v1::CopySnapshotRequest {
                snapshot: id.to_owned(),
                target_node: to_id.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut committed = None;
        while let Some(item) = progress.next().await {
            committed = item.unwrap().committed.or(committed);
        }
        committed.expect("the copy committed")
    })
}

#[test]
fn node_to_node_copy_gives_an_identical_snapshot() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    generate_tree(&source, 50, 2 * 1024 * 1024);
    let (_coordinator, first, second) = two_registered_nodes(work.path());
    let backup = backup_json(&first, &source, "copy");
    let id = backup["snapshot"].as_str().unwrap().to_owned();

    let copied = copy_snapshot(&first, &id, "n2");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let original = runtime.block_on(async {
        let mut client = storage_client(&first.address).await;
        client
            .get_snapshot(fabric_proto::v1::GetSnapshotRequest {
                snapshot: id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(copied.id, original.id);
    assert_eq!(copied.root_tree_id, original.root_tree_id);
    let restored = work.path().join("restored");
    let inside = source.to_str().unwrap().trim_start_matches('/').to_owned();
    restore(&second, &id, &inside, &restored);
    fabricctl::compare::compare_trees(&source, &restored, true, RestorePolicy::default()).unwrap();
}

#[test]
fn a_file_of_150000_chunks_is_backed_up_copied_and_restored_with_its_listing_in_parts() {
    // 600 GiB, nearly all a hole: some 150,000 chunks, whose ids (5 MB)
    // are more than one tree chunk or one restore message may carry.
    const SIZE: u64 = 600 << 30;
    const DATA: usize = 1 << 20;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    let image = std::fs::File::create(source.join("disk.img")).unwrap();
    image.set_len(SIZE).unwrap();
    let offsets = [0, SIZE / 2 + 12_345, SIZE - DATA as u64];
    for (seed, offset) in offsets.iter().enumerate() {
        std::os::unix::fs::FileExt::write_all_at(
            &image,
            &pseudo_random(DATA, seed as u64 + 40),
            *offset,
        )
        .unwrap();
    }
    drop(image);
    let (_coordinator, first, second) = two_registered_nodes(work.path());
    let backup = backup_json(&first, &source, "disk");
    // The zero chunk and the data chunks, each offered once.
    assert_eq!(field(&backup, "bytes_read"), SIZE, "{backup}");
    assert!(field(&backup, "chunks_offered") < 20, "{backup}");
    let id = backup["snapshot"].as_str().unwrap().to_owned();

    let copied = copy_snapshot(&first, &id, "n2");
    assert_eq!(copied.id, id);

    let restored = work.path().join("restored");
    restore_source(&second, &backup, &source, &restored);
    let image = std::fs::File::open(restored.join("disk.img")).unwrap();
    let meta = image.metadata().unwrap();
    assert_eq!(meta.len(), SIZE);
    assert!(
        meta.blocks() * 512 < 64 << 20,
        "{} bytes allocated",
        meta.blocks() * 512
    );
    for (seed, offset) in offsets.iter().enumerate() {
        let mut back = vec![0; DATA];
        std::os::unix::fs::FileExt::read_exact_at(&image, &mut back, *offset).unwrap();
        assert!(
            back == pseudo_random(DATA, seed as u64 + 40),
            "the data at {offset}"
        );
    }
}

#[tokio::test]
async fn a_listing_larger_than_a_message_is_read_in_pages_or_without_chunk_ids() {
    // 40,000 files of 25 chunks each: the listing's encoding (about 35 MB)
    // is stored in parts and is more than one message may carry.
    const FILES: usize = 40_000;
    const CHUNKS_PER_FILE: usize = 25;
    let work = tempfile::tempdir().unwrap();
    let node = Server::node(&work.path().join("store"), &[]);
    let content = b"one chunk that every file repeats".to_vec();
    let content_id = blake3::hash(&content).as_bytes().to_vec();
    let listing = Tree {
        entries: (0..FILES)
            .map(|n| TreeEntry {
                name: format!("file-{n:06}").into_bytes(),
                kind: EntryKind::File as i32,
                mode: 0o100644,
                size: (content.len() * CHUNKS_PER_FILE) as u64,
                chunk_ids: vec![content_id.clone(); CHUNKS_PER_FILE],
                ..Default::default()
            })
            .collect(),
        parts: Vec::new(),
    };
    assert!(listing.encoded_len() > fabric_node::transfer::MAX_MESSAGE_BYTES);
    let (root, parts) = fabric_chunkstore::tree_parts::tree_chunks(&listing);
    assert!(parts.len() > 1, "stored in parts");
    let chunk_data = |id: &[u8], data: Vec<u8>| ChunkData {
        id: id.to_vec(),
        data: data.into(),
        ..Default::default()
    };
    let mut batches = vec![vec![chunk_data(&content_id, content.clone())]];
    batches.extend(
        parts
            .iter()
            .map(|part| vec![chunk_data(&part.id.to_vec(), part.data.clone())]),
    );
    batches.push(vec![chunk_data(&root.id.to_vec(), root.data.clone())]);
    let mut messages: Vec<SenderMessage> = batches
        .into_iter()
        .zip(1..)
        .map(|(chunks, batch)| send(sender_message::Kind::Chunks(ChunkBatch { batch, chunks })))
        .collect();
    messages.push(send(sender_message::Kind::Commit(Commit {
        snapshot: Some(Snapshot {
            job: "wide".into(),
            root_tree_id: root.id.to_vec(),
            ..Default::default()
        }),
    })));
    let replies = upload(&node, messages).await.unwrap();
    assert!(
        matches!(replies.last(), Some(receiver_message::Kind::Committed(_))),
        "committed: {replies:?}"
    );

    let mut client = storage_client(&node.address)
        .await
        .max_decoding_message_size(fabric_node::transfer::MAX_MESSAGE_BYTES);
    let request = |start_after: &[u8], max_entries, without_chunk_ids| GetTreeRequest {
        id: root.id.to_vec(),
        start_after: start_after.to_vec(),
        max_entries,
        without_chunk_ids,
    };
    let whole = client.get_tree(request(b"", 0, false)).await.unwrap_err();
    assert_eq!(whole.code(), tonic::Code::OutOfRange, "{whole:?}");
    assert!(whole.message().contains("max_entries"), "{whole:?}");

    // Pages of 15,000: 15,000, 15,000, then the short last one.
    let mut read = Vec::new();
    let mut sizes = Vec::new();
    loop {
        let start_after = read
            .last()
            .map_or(Vec::new(), |entry: &TreeEntry| entry.name.clone());
        let page = client
            .get_tree(request(&start_after, 15_000, false))
            .await
            .unwrap()
            .into_inner();
        assert!(page.parts.is_empty(), "joined");
        sizes.push(page.entries.len());
        let last = page.entries.len() < 15_000;
        read.extend(page.entries);
        if last {
            break;
        }
    }
    assert_eq!(sizes, [15_000, 15_000, 10_000]);
    assert!(read == listing.entries, "the pages make up the listing");

    let bare = client
        .get_tree(request(b"", 0, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bare.entries.len(), FILES);
    assert!(bare.entries.iter().all(|entry| entry.chunk_ids.is_empty()));
    assert_eq!(
        bare.entries[FILES - 1].name,
        listing.entries[FILES - 1].name
    );
    assert_eq!(
        bare.entries[FILES - 1].size,
        listing.entries[FILES - 1].size
    );
}

/// The tree of `path` (absolute) in the snapshot whose root is `root`.
fn tree_at(store: &fabric_chunkstore::Store, root: &[u8], path: &Path) -> Tree {
    let mut tree = store
        .get_tree(&fabric_chunkstore::ChunkId::from_slice(root).unwrap())
        .unwrap();
    for component in path.strip_prefix("/").unwrap().components() {
        let name = component.as_os_str().as_encoded_bytes();
        let entry = tree
            .entries
            .iter()
            .find(|entry| entry.name == name)
            .unwrap();
        let subtree = fabric_chunkstore::ChunkId::from_slice(&entry.subtree_id).unwrap();
        tree = store.get_tree(&subtree).unwrap();
    }
    tree
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_skips_unchanged_files_even_when_the_parents_trees_are_larger_than_a_message() {
    // A 2 TiB file, nearly all a hole: over 500,000 chunks, whose ids alone
    // (18 MB) are more than a pull could once send of its parent.
    const SIZE: u64 = 2 << 40;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    std::fs::create_dir_all(source.join("notes")).unwrap();
    let image = std::fs::File::create(source.join("disk.img")).unwrap();
    image.set_len(SIZE).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&image, &pseudo_random(1 << 20, 60), 0).unwrap();
    drop(image);
    for name in ["a", "b", "c"] {
        std::fs::write(source.join("notes").join(name), name.repeat(1000)).unwrap();
    }
    // The real binary is the client's agent; this process is the puller.
    // Without a coordinator there is nobody to grant this process a pull
    // permit, so the agent runs without TLS and authentication, which
    // serves any pull (the permits are tested in trust.rs).
    let agent = Server::node(&work.path().join("agent-store"), &["--insecure-plaintext"]);
    let store = std::sync::Arc::new(
        fabric_chunkstore::Store::open_or_create(
            &work.path().join("puller-store"),
            fabric_chunkstore::StoreConfig::default(),
        )
        .unwrap(),
    );
    let memory = std::sync::Arc::new(tokio::sync::Semaphore::new(64 * 1024));
    let peer = fabric_node::client::Peer::any_node(&agent.address);
    let plaintext = fabric_trust::Transport::InsecurePlaintext;
    let pull = || {
        fabric_node::source_service::pull_into(
            store.clone(),
            &peer,
            &plaintext,
            "",
            vec![source.to_str().unwrap().to_owned()],
            Vec::new(),
            false,
            Snapshot {
                job: "pulled".into(),
                host: "client".into(),
                ..Default::default()
            },
            memory.clone(),
            fabric_node::transfer::ReceiveRules::trusted(),
        )
    };
    let first = pull().await.unwrap();
    let listing = tree_at(&store, &first.root_tree_id, &source);
    let disk = listing
        .entries
        .iter()
        .find(|entry| entry.name == b"disk.img")
        .unwrap();
    assert!(disk.chunk_ids.len() > 500_000, "{}", disk.chunk_ids.len());

    let second = pull().await.unwrap();
    assert_eq!(second.parent_id, first.id);
    assert_eq!(second.root_tree_id, first.root_tree_id);
    let stats = second.stats.unwrap();
    assert_eq!(
        (stats.files, stats.files_unchanged, stats.bytes_read),
        (4, 4, 0)
    );

    std::fs::write(source.join("notes/b"), "changed").unwrap();
    let third = pull().await.unwrap();
    assert_eq!(third.parent_id, second.id);
    let stats = third.stats.unwrap();
    assert_eq!(
        (stats.files, stats.files_unchanged, stats.bytes_read),
        (4, 3, 7)
    );
}

#[tokio::test]
async fn the_health_check_answers_serving() {
    let work = tempfile::tempdir().unwrap();
    let node = Server::node(&work.path().join("store"), &[]);
    let status = health(&node.address).await;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[tokio::test]
async fn a_node_without_room_is_not_serving_and_refuses_uploads() {
    let work = tempfile::tempdir().unwrap();
    // No disk has an exbibyte free.
    let node = Server::node(
        &work.path().join("store"),
        &["--min-free-bytes", "1152921504606846976"],
    );
    let status = health(&node.address).await;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing
    );
    let refused = upload(
        &node,
        vec![send(sender_message::Kind::Offer(Offer {
            batch: 1,
            ids: Vec::new(),
        }))],
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("min_free_bytes"),
        "{}",
        refused.message()
    );
}

#[test]
fn sigterm_stops_the_node_cleanly() {
    let work = tempfile::tempdir().unwrap();
    let node = Server::node(&work.path().join("store"), &[]);
    assert!(node.terminate(), "fabric-node exits 0 on SIGTERM");
}
