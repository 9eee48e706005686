//! Pull jobs. The source side (`fabric.v1.Source`, served by a client's
//! agent) walks the client's files and sends them with the transfer protocol
//! on the response stream; the puller side ([`pull_into`], run by a storage
//! node) receives into its own store. The client never dials storage: the
//! puller sends the parent snapshot's tree chunks ahead of the transfer
//! (at most [`MAX_PARENT_TREE_BYTES`]), from which the source's walk knows
//! the files it need not read again.
//!
//! A pull reads the client's files, so the source serves one only to the
//! storage node the coordinator assigned to an active pull of this agent
//! ([`crate::pull_permits`]), and only that pull job's paths.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use fabric_chunkstore::Store;
use fabric_chunkstore::walk::BackupOptions;
use fabric_chunkstore::{ChunkId, ChunkParams, ChunkSource, SinkError, SnapshotSource};
use fabric_proto::v1::source_server::Source;
use fabric_proto::v1::{
    ChunkData, ParentTrees, PullStart, ReceiverMessage, SenderMessage, Snapshot, receiver_message,
};
use fabric_trust::{Caller, Role, Transport};
use futures::{Stream, StreamExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::agent::send_backup;
use crate::client::Peer;
use crate::memory_budget::SendPlan;
use crate::pull_permits::{PERMIT_WAIT, PermittedPaths, PullPermits};
use crate::rate_limit::{RateLimit, TransferLimits};
use crate::status::status_from_store_error;
use crate::transfer::{
    MAX_BATCH_BYTES, REPLY_CHANNEL, SENDER_CHANNEL, TransferCounters, for_each_tree, run_receiver,
};

/// Most bytes (as stored) of a parent snapshot's tree chunks that a pull
/// carries and a source holds in memory: some millions of files. A puller
/// with a larger parent stops and says so, and the source reads every file.
pub const MAX_PARENT_TREE_BYTES: usize = 256 * 1024 * 1024;

/// The parent snapshot's tree chunks (and parts), as stored, as the puller
/// sent them in `parent_trees` messages. Each is decoded and checked
/// against its id when the walk asks for it.
struct ParentTreeChunks(HashMap<ChunkId, ChunkData>);

impl ChunkSource for ParentTreeChunks {
    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, SinkError> {
        let chunk = self
            .0
            .get(id)
            .cloned()
            .ok_or_else(|| format!("chunk {id} of the parent snapshot's trees was not sent"))?;
        // Keyed by the id it carries, which `plain_chunk` checks it against.
        Ok(crate::convert::plain_chunk(chunk)?.data)
    }
}

/// Read the `parent_trees` messages that follow a `pull_start` naming
/// parent `root`, up to the one marked `done`: the parent's tree chunks,
/// or none if the puller could not send them all.
async fn receive_parent_trees(
    incoming: &mut Streaming<ReceiverMessage>,
    root: ChunkId,
) -> Result<Option<ParentTreeChunks>, Status> {
    let mut chunks = HashMap::new();
    let mut bytes = 0usize;
    loop {
        let message = incoming.next().await.ok_or_else(|| {
            Status::invalid_argument("the pull ended before the parent's trees were all sent")
        })??;
        let Some(receiver_message::Kind::ParentTrees(ParentTrees {
            chunks: batch,
            done,
            truncated,
        })) = message.kind
        else {
            return Err(Status::invalid_argument(
                "a pull_start naming a parent must be followed by parent_trees messages up to one marked done",
            ));
        };
        for chunk in batch {
            bytes = bytes.saturating_add(chunk.data.len());
            if bytes > MAX_PARENT_TREE_BYTES {
                return Err(Status::invalid_argument(format!(
                    "the parent's trees are over {MAX_PARENT_TREE_BYTES} bytes, more than a source holds"
                )));
            }
            let id = ChunkId::from_slice(&chunk.id)
                .map_err(|err| Status::invalid_argument(format!("a parent tree chunk: {err}")))?;
            chunks.insert(id, chunk);
        }
        if done {
            let complete = !truncated && chunks.contains_key(&root);
            return Ok(complete.then_some(ParentTreeChunks(chunks)));
        }
    }
}

/// The agent's pull endpoint.
#[derive(Debug, Clone)]
pub struct SourceService {
    hostname: String,
    permits: PullPermits,
    /// The agent's upload limit, which pulls it serves wait for too.
    upload_limit: Option<Arc<RateLimit>>,
    /// How each pull it serves spends the agent's backup memory budget.
    plan: SendPlan,
}

impl SourceService {
    /// Serve pulls of this host's files, as `permits` allow; snapshots
    /// record `hostname`.
    pub fn new(
        hostname: String,
        permits: PullPermits,
        upload_limit: Option<Arc<RateLimit>>,
        plan: SendPlan,
    ) -> Self {
        Self {
            hostname,
            permits,
            upload_limit,
            plan,
        }
    }

    /// The paths the caller may pull for `run_id`: those of the permit the
    /// coordinator sent for that run and the caller's certified node id.
    /// An insecure agent (`--insecure-plaintext`) cannot tell callers apart
    /// and serves what is asked.
    async fn permitted(
        &self,
        caller: &Caller,
        start: &PullStart,
    ) -> Result<PermittedPaths, Status> {
        let asked = PermittedPaths {
            include: start.include.clone(),
            exclude: start.exclude.clone(),
            one_file_system: start.one_file_system,
        };
        let puller = match caller {
            Caller::Insecure => return Ok(asked),
            Caller::Authenticated(identity) if identity.role == Role::Node => &identity.name,
            other => {
                return Err(Status::permission_denied(format!(
                    "only the storage node assigned to a pull may pull, not {}",
                    other.describe()
                )));
            }
        };
        let run = start.run_id.chars().take(64).collect::<String>();
        let permitted = self
            .permits
            .wait_for(&start.run_id, puller, PERMIT_WAIT)
            .await
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "node {puller} holds no permit to pull run {run:?} from this agent: only the storage node the coordinator assigned to an active pull may pull"
                ))
            })?;
        if permitted != asked {
            return Err(Status::permission_denied(format!(
                "node {puller} asks for other paths than the pull job of run {run} permits (include {:?})",
                permitted.include
            )));
        }
        Ok(permitted)
    }
}

type SenderStream = Pin<Box<dyn Stream<Item = Result<SenderMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Source for SourceService {
    type PullStream = SenderStream;

    async fn pull(
        &self,
        request: Request<Streaming<ReceiverMessage>>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let caller = Caller::of(&request);
        let mut incoming = request.into_inner();
        let start = match incoming.next().await {
            Some(Ok(ReceiverMessage {
                kind: Some(receiver_message::Kind::PullStart(start)),
            })) => start,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(Status::invalid_argument(
                    "a pull must start with a pull_start message",
                ));
            }
        };
        let PermittedPaths {
            include,
            exclude,
            one_file_system,
        } = self.permitted(&caller, &start).await?;
        let PullStart {
            snapshot,
            parent_root,
            ..
        } = start;
        if include.is_empty() {
            return Err(Status::invalid_argument(
                "a pull needs at least one include path",
            ));
        }
        let mut template = snapshot.unwrap_or_default();
        if template.host.is_empty() {
            template.host = self.hostname.clone();
        }
        let parent = if parent_root.is_empty() {
            None
        } else {
            let root = ChunkId::from_slice(&parent_root)
                .map_err(|err| Status::invalid_argument(format!("parent_root: {err}")))?;
            receive_parent_trees(&mut incoming, root)
                .await?
                .map(|trees| {
                    let source: Arc<dyn ChunkSource + Send + Sync> = Arc::new(trees);
                    (source, root)
                })
        };
        let options = BackupOptions {
            includes: include.into_iter().map(Into::into).collect(),
            excludes: exclude,
            one_file_system,
            chunk_params: ChunkParams::default(),
            // The backup's memory plan sets both (`send_backup`).
            threads: 0,
            hash_ahead_bytes: 0,
        };
        tracing::info!(job = %template.job, includes = ?options.includes, "serving a pull");

        let counters = Arc::new(TransferCounters::default());
        let (out_tx, out_rx) = mpsc::channel::<SenderMessage>(SENDER_CHANNEL);
        let (result_tx, result_rx) = mpsc::channel::<Result<SenderMessage, Status>>(1);
        let upload_limit = self.upload_limit.clone();
        let plan = self.plan;
        tokio::spawn(async move {
            let sent = send_backup(
                options,
                plan,
                parent,
                template,
                out_tx,
                incoming,
                counters,
                None,
                TransferLimits::none().with(upload_limit),
            );
            match sent.await {
                Ok(snapshot) => tracing::info!(snapshot = %snapshot.id, "pull served"),
                Err(status) => {
                    tracing::warn!(message = status.message(), "pull failed");
                    let _ = result_tx.send(Err(status)).await;
                }
            }
        });
        let messages = ReceiverStream::new(out_rx).map(Ok);
        let stream = futures::stream::select(messages, ReceiverStream::new(result_rx));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Pull run `run_id` from the agent `source` into `store`: the storage
/// node's side of a pull job (the agent serves it only with the
/// coordinator's permit for this node). Sends the newest snapshot of the
/// same job, host and instance as the parent so unchanged files are not
/// read again.
#[allow(clippy::too_many_arguments)]
pub async fn pull_into(
    store: Arc<Store>,
    source: &Peer,
    transport: &Transport,
    run_id: &str,
    include: Vec<String>,
    exclude: Vec<String>,
    one_file_system: bool,
    mut template: Snapshot,
    memory: Arc<Semaphore>,
    rules: crate::transfer::ReceiveRules,
) -> Result<Snapshot, Status> {
    let mut client = crate::client::source(source, transport)
        .await
        .map_err(|err| Status::unavailable(err.to_string()))?;

    let parent_store = store.clone();
    let key = (
        template.job.clone(),
        template.host.clone(),
        template.instance.clone(),
    );
    let parent = tokio::task::spawn_blocking(move || parent_of(&parent_store, &key))
        .await
        .map_err(crate::status::join_error)?;
    let parent_root = parent
        .as_ref()
        .map(|(_, root)| root.to_vec())
        .unwrap_or_default();
    if let Some((id, _)) = &parent {
        template.parent_id.clone_from(id);
    }

    // The pull start and the parent's trees go first, on a channel of their
    // own with room for few batches; the receiver's replies follow on theirs
    // (the source sends nothing to reply to before it has the trees).
    let (start_tx, start_rx) = mpsc::channel::<ReceiverMessage>(2);
    start_tx
        .send(ReceiverMessage {
            kind: Some(receiver_message::Kind::PullStart(PullStart {
                include,
                exclude,
                one_file_system,
                snapshot: Some(template),
                parent_root,
                run_id: run_id.to_owned(),
            })),
        })
        .await
        .map_err(|_| Status::internal("the pull request stream closed at once"))?;
    if let Some((_, root)) = parent {
        let tree_store = store.clone();
        tokio::task::spawn_blocking(move || {
            send_parent_trees(&tree_store, root, MAX_PARENT_TREE_BYTES, &mut |batch| {
                start_tx
                    .blocking_send(ReceiverMessage {
                        kind: Some(receiver_message::Kind::ParentTrees(batch)),
                    })
                    .is_ok()
            });
        });
    } else {
        drop(start_tx);
    }
    let (request_tx, request_rx) = mpsc::channel::<ReceiverMessage>(REPLY_CHANNEL + 1);
    let requests = ReceiverStream::new(start_rx).chain(ReceiverStream::new(request_rx));
    let mut incoming = client.pull(requests).await?.into_inner();
    let committed = run_receiver(store, &mut incoming, request_tx, memory, rules).await?;
    // Dropping the call would reset it and could discard the `committed`
    // answer before it reaches the source: wait (briefly) for the source to
    // end its side, which it does once it has the answer.
    let _ = tokio::time::timeout(SOURCE_END_WAIT, async {
        while incoming.next().await.is_some() {}
    })
    .await;
    Ok(committed)
}

/// How long a puller waits, after its commit, for the source to end the pull.
const SOURCE_END_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The id and root tree of the newest snapshot of `(job, host, instance)`.
fn parent_of(store: &Store, key: &(String, String, String)) -> Option<(String, ChunkId)> {
    let source = SnapshotSource {
        job: &key.0,
        host: &key.1,
        instance: &key.2,
    };
    let parent = store.newest_snapshot(&source).ok()??;
    let root = ChunkId::from_slice(&parent.root_tree_id).ok()?;
    Some((parent.id, root))
}

/// Hand `send` the tree chunks (and parts) of the DAG under `root`, as
/// stored, in batches of at most [`MAX_BATCH_BYTES`], the last marked done;
/// truncated once they pass `limit` bytes or a tree cannot be read. Stops
/// early when `send` says the pull has gone.
fn send_parent_trees(
    store: &Store,
    root: ChunkId,
    limit: usize,
    send: &mut dyn FnMut(ParentTrees) -> bool,
) {
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    let mut total = 0usize;
    let mut gone = false;
    let walked = for_each_tree(store, root, |id, _, parts| {
        let stored = std::iter::once(id)
            .chain(parts)
            .map(|chunk_id| store.get_stored(&chunk_id))
            .collect::<Result<Vec<_>, _>>()
            .map_err(status_from_store_error)?;
        if stored.iter().map(|chunk| chunk.stored.len()).sum::<usize>()
            > limit.saturating_sub(total)
        {
            return Err(Status::out_of_range(format!(
                "the parent's trees are over {limit} bytes"
            )));
        }
        for chunk in stored {
            let len = chunk.stored.len();
            if !batch.is_empty() && batch_bytes + len > MAX_BATCH_BYTES {
                let full = ParentTrees {
                    chunks: std::mem::take(&mut batch),
                    done: false,
                    truncated: false,
                };
                if !send(full) {
                    gone = true;
                    return Err(Status::cancelled("the pull has gone"));
                }
                batch_bytes = 0;
            }
            batch_bytes += len;
            total += len;
            batch.push(crate::convert::chunk_data(chunk));
        }
        Ok(())
    });
    if gone {
        return;
    }
    let truncated = match walked {
        Ok(()) => false,
        Err(status) if status.code() == tonic::Code::OutOfRange => {
            tracing::info!("{}: the source reads every file", status.message());
            true
        }
        Err(status) => {
            tracing::warn!(
                "the parent's trees are not sent, the source reads every file: {}",
                status.message()
            );
            true
        }
    };
    if truncated {
        batch.clear();
    }
    send(ParentTrees {
        chunks: batch,
        done: true,
        truncated,
    });
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use fabric_chunkstore::StoreConfig;
    use fabric_chunkstore::walk::backup;

    use super::*;

    /// A store holding a backup of a few directories; the root tree's id.
    fn store_with_backup(dir: &std::path::Path) -> (Store, ChunkId) {
        let source = dir.join("source");
        for sub in ["a", "b", "a/deeper"] {
            std::fs::create_dir_all(source.join(sub)).expect("mkdir");
            std::fs::write(source.join(sub).join("file"), sub).expect("write");
        }
        // Two identical directories: one tree, sent once.
        std::fs::create_dir_all(source.join("same-1")).expect("mkdir");
        std::fs::create_dir_all(source.join("same-2")).expect("mkdir");
        let store =
            Store::open_or_create(&dir.join("store"), StoreConfig::default()).expect("store");
        let options = BackupOptions {
            includes: vec![source],
            excludes: Vec::new(),
            one_file_system: false,
            chunk_params: ChunkParams::default(),
            threads: 1,
            hash_ahead_bytes: fabric_chunkstore::walk::DEFAULT_HASH_AHEAD_BYTES,
        };
        let outcome = backup(&options, &store, None, &|_| {}).expect("backup");
        (store, outcome.root)
    }

    fn sent(store: &Store, root: ChunkId, limit: usize) -> Vec<ParentTrees> {
        let mut messages = Vec::new();
        send_parent_trees(store, root, limit, &mut |batch| {
            messages.push(batch);
            true
        });
        messages
    }

    #[test]
    fn every_tree_of_the_parent_is_sent_once_and_reads_back_as_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, root) = store_with_backup(dir.path());
        let messages = sent(&store, root, MAX_PARENT_TREE_BYTES);
        let last = messages.last().expect("a message");
        assert!(last.done && !last.truncated);
        assert!(messages[..messages.len() - 1].iter().all(|m| !m.done));
        let chunks: Vec<ChunkData> = messages.into_iter().flat_map(|m| m.chunks).collect();
        let ids: HashSet<Vec<u8>> = chunks.iter().map(|chunk| chunk.id.clone()).collect();
        assert_eq!(ids.len(), chunks.len(), "no tree twice");
        let trees = ParentTreeChunks(
            chunks
                .into_iter()
                .map(|chunk| (ChunkId::from_slice(&chunk.id).expect("an id"), chunk))
                .collect(),
        );
        let mut stack = vec![root];
        let mut visited = 0;
        while let Some(id) = stack.pop() {
            let tree = trees.get_tree(&id).expect("sent");
            assert_eq!(tree, store.get_tree(&id).expect("stored"));
            stack.extend(
                tree.entries
                    .iter()
                    .filter_map(|entry| ChunkId::from_slice(&entry.subtree_id).ok()),
            );
            visited += 1;
        }
        // The path down to the source, then source, a, a/deeper, b and the
        // two identical directories (one tree, visited twice).
        assert!(
            visited > trees.0.len(),
            "{visited} visits of {} trees",
            trees.0.len()
        );
    }

    #[test]
    fn a_parent_over_the_limit_is_sent_as_truncated_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, root) = store_with_backup(dir.path());
        let messages = sent(&store, root, 200);
        let last = messages.last().expect("a message");
        assert!(last.done && last.truncated);
        assert!(last.chunks.is_empty());
    }

    #[test]
    fn a_tree_altered_on_the_way_is_refused_when_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, root) = store_with_backup(dir.path());
        let mut chunks: HashMap<ChunkId, ChunkData> = sent(&store, root, MAX_PARENT_TREE_BYTES)
            .into_iter()
            .flat_map(|m| m.chunks)
            .map(|chunk| (ChunkId::from_slice(&chunk.id).expect("an id"), chunk))
            .collect();
        let chunk = chunks.get_mut(&root).expect("the root");
        let mut data = chunk.data.to_vec();
        data[0] ^= 1;
        chunk.data = data.into();
        let err = ParentTreeChunks(chunks)
            .get_tree(&root)
            .expect_err("altered");
        assert!(err.to_string().contains(&root.to_string()), "{err}");
    }
}
