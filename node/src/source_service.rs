//! Pull jobs. The source side (`fabric.v1.Source`, served by a client's
//! agent) walks the client's files and sends them with the transfer protocol
//! on the response stream; the puller side ([`pull_into`], run by a storage
//! node) receives into its own store. The client never dials storage.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use fabric_chunkstore::Store;
use fabric_chunkstore::walk::BackupOptions;
use fabric_chunkstore::{ChunkId, ChunkParams, ChunkSource, SinkError, SnapshotSource};
use fabric_proto::v1::source_server::Source;
use fabric_proto::v1::{
    ParentTree, PullStart, ReceiverMessage, SenderMessage, Snapshot, Tree, receiver_message,
};
use futures::{Stream, StreamExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::agent::send_backup;
use crate::transfer::{
    MAX_MESSAGE_BYTES, REPLY_CHANNEL, SENDER_CHANNEL, TransferCounters, run_receiver,
};

/// The parent snapshot's trees, sent by the puller in `PullStart`.
struct ParentTrees(HashMap<ChunkId, Tree>);

impl ChunkSource for ParentTrees {
    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, SinkError> {
        Err(format!("chunk {id} is not available during a pull").into())
    }

    fn get_tree(&self, id: &ChunkId) -> Result<Tree, SinkError> {
        self.0
            .get(id)
            .cloned()
            .ok_or_else(|| format!("tree {id} of the parent snapshot was not sent").into())
    }
}

/// The agent's pull endpoint.
#[derive(Debug, Clone)]
pub struct SourceService {
    hostname: String,
}

impl SourceService {
    /// Serve pulls of this host's files; snapshots record `hostname`.
    pub fn new(hostname: String) -> Self {
        Self { hostname }
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
        let PullStart {
            include,
            exclude,
            one_file_system,
            snapshot,
            parent_trees,
            parent_root,
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
        let mut trees = HashMap::new();
        for ParentTree { id, tree } in parent_trees {
            let id = ChunkId::from_slice(&id)
                .map_err(|err| Status::invalid_argument(err.to_string()))?;
            trees.insert(id, tree.unwrap_or_default());
        }
        let parent = ChunkId::from_slice(&parent_root)
            .ok()
            .filter(|root| trees.contains_key(root))
            .map(|root| {
                let source: Arc<dyn ChunkSource + Send + Sync> = Arc::new(ParentTrees(trees));
                (source, root)
            });
        let options = BackupOptions {
            includes: include.into_iter().map(Into::into).collect(),
            excludes: exclude,
            one_file_system,
            chunk_params: ChunkParams::default(),
            threads: 0,
        };
        tracing::info!(job = %template.job, includes = ?options.includes, "serving a pull");

        let counters = Arc::new(TransferCounters::default());
        let (out_tx, out_rx) = mpsc::channel::<SenderMessage>(SENDER_CHANNEL);
        let (result_tx, result_rx) = mpsc::channel::<Result<SenderMessage, Status>>(1);
        tokio::spawn(async move {
            let sent = send_backup(options, parent, template, out_tx, incoming, counters, None);
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

/// Most bytes of parent trees a puller sends along (a larger parent means a
/// full re-read on the client rather than an oversized message).
const MAX_PARENT_TREE_BYTES: usize = MAX_MESSAGE_BYTES / 2;

/// Pull from the agent at `source_address` into `store`: the storage node's
/// side of a pull job. Sends the newest snapshot of the same job, host and
/// instance as the parent so unchanged files are not read again.
pub async fn pull_into(
    store: Arc<Store>,
    source_address: &str,
    include: Vec<String>,
    exclude: Vec<String>,
    one_file_system: bool,
    mut template: Snapshot,
    memory: Arc<Semaphore>,
) -> Result<Snapshot, Status> {
    let mut client = crate::client::source(source_address)
        .await
        .map_err(|err| Status::unavailable(err.to_string()))?;

    let parent_store = store.clone();
    let key = (
        template.job.clone(),
        template.host.clone(),
        template.instance.clone(),
    );
    let (parent_id, parent_trees) =
        tokio::task::spawn_blocking(move || parent_trees(&parent_store, &key))
            .await
            .map_err(crate::status::join_error)?;
    let parent_root = parent_trees
        .first()
        .map(|tree| tree.id.clone())
        .unwrap_or_default();
    template.parent_id = parent_id;

    let (request_tx, request_rx) = mpsc::channel::<ReceiverMessage>(REPLY_CHANNEL + 1);
    request_tx
        .send(ReceiverMessage {
            kind: Some(receiver_message::Kind::PullStart(PullStart {
                include,
                exclude,
                one_file_system,
                snapshot: Some(template),
                parent_trees,
                parent_root,
            })),
        })
        .await
        .map_err(|_| Status::internal("the pull request stream closed at once"))?;
    let incoming = client
        .pull(ReceiverStream::new(request_rx))
        .await?
        .into_inner();
    run_receiver(store, incoming, request_tx, memory).await
}

/// The id and trees (root first) of the newest snapshot of `(job, host,
/// instance)`, within [`MAX_PARENT_TREE_BYTES`]; none when there is no such
/// snapshot or its trees are too large to send.
fn parent_trees(store: &Store, key: &(String, String, String)) -> (String, Vec<ParentTree>) {
    let none = (String::new(), Vec::new());
    let source = SnapshotSource {
        job: &key.0,
        host: &key.1,
        instance: &key.2,
    };
    let Ok(Some(parent)) = store.newest_snapshot(&source) else {
        return none;
    };
    let Ok(root) = ChunkId::from_slice(&parent.root_tree_id) else {
        return none;
    };
    let mut trees = Vec::new();
    let mut bytes = 0;
    let mut stack = vec![root];
    while let Some(id) = stack.pop() {
        let Ok(tree) = store.get_tree(&id) else {
            return none;
        };
        bytes += prost::Message::encoded_len(&tree);
        if bytes > MAX_PARENT_TREE_BYTES {
            return none;
        }
        stack.extend(
            tree.entries
                .iter()
                .filter_map(|entry| ChunkId::from_slice(&entry.subtree_id).ok()),
        );
        trees.push(ParentTree {
            id: id.to_vec(),
            tree: Some(tree),
        });
    }
    (parent.id, trees)
}
