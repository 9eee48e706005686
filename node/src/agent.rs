//! The agent: what runs on a client. Push backups (read files, chunk, hash,
//! and send only what the node lacks), restores from a node into a directory
//! or a tar stream, and the source side of a pull.
//!
//! The walk and the restore writers are the chunk store's synchronous code,
//! run on blocking threads; this module bridges them to gRPC streams with
//! bounded channels, so memory stays bounded whatever the file sizes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use fabric_chunkstore::walk::{BackupOptions, BackupOutcome, ParentSnapshot, Progress};
use fabric_chunkstore::{ChunkId, ChunkSource, SinkError, SnapshotSource, newest_among};
use fabric_proto::v1::storage_client::StorageClient;
use fabric_proto::v1::{
    ChunkData, GetChunksRequest, GetNewestSnapshotRequest, ListSnapshotsRequest, ReceiverMessage,
    SenderMessage, Snapshot, Tree,
};
use futures::StreamExt;
use prost::Message;
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::transport::Channel;

use crate::memory_budget::SendPlan;
use crate::rate_limit::TransferLimits;
use crate::transfer::{
    ChannelSink, OutgoingChunk, READ_AHEAD_CHUNKS, SENDER_CHANNEL, SendSizes, TransferCounters,
    run_sender,
};

/// Why an agent operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The node could not be reached.
    #[error(transparent)]
    Connect(#[from] crate::client::ConnectError),
    /// The node refused or failed.
    #[error("{context}: {status}", status = describe_status(.status))]
    Remote {
        /// What was being done, naming the node and snapshot.
        context: String,
        /// The node's answer.
        status: Status,
    },
    /// The local walk or restore failed.
    #[error("{0}")]
    Local(String),
    /// What the backup was asked to read cannot be read on this client (an
    /// include path missing, a bad pattern): no node and no retry can help
    /// until someone changes the client or the job.
    #[error("{0}")]
    Source(String),
}

/// The metadata key a walk's error carries when the source is at fault
/// (see [`AgentError::Source`]); it never leaves this process.
const SOURCE_FAULT: &str = "x-fabric-source-fault";

/// The status for a walk that failed: marked as the source's fault when
/// retrying cannot help.
fn walk_status(error: fabric_chunkstore::walk::WalkError) -> Status {
    use fabric_chunkstore::walk::WalkError;
    let source_fault = matches!(
        error,
        WalkError::NoIncludes
            | WalkError::BadInclude { .. }
            | WalkError::NoMatch { .. }
            | WalkError::BadIncludePattern { .. }
            | WalkError::BadExclude { .. }
            | WalkError::ChunkParams(_)
    );
    let mut status = Status::failed_precondition(error.to_string());
    if source_fault {
        status.metadata_mut().insert(
            SOURCE_FAULT,
            tonic::metadata::MetadataValue::from_static("1"),
        );
    }
    status
}

/// Whether `status` is a walk's error with the source at fault.
fn is_source_fault(status: &Status) -> bool {
    status.metadata().contains_key(SOURCE_FAULT)
}

/// A status as a person reads it: the code's meaning and the message.
pub fn describe_status(status: &Status) -> String {
    format!("{} ({:?})", status.message(), status.code())
}

/// Progress of a push, for the CLI and the coordinator's reports: at most
/// one every [`PROGRESS_INTERVAL_MS`].
#[derive(Clone, Debug, Default)]
pub struct PushProgress {
    /// Files seen.
    pub files: u64,
    /// Bytes of file content read.
    pub bytes_read: u64,
    /// Chunk bytes sent to the node, as sent (compressed).
    pub bytes_sent: u64,
    /// Bytes new to the node's store.
    pub new_bytes: u64,
    /// The path being read.
    pub current_path: String,
}

/// What a push did.
#[derive(Clone, Debug)]
pub struct PushOutcome {
    /// The snapshot as committed on the node.
    pub snapshot: Snapshot,
    /// Chunks offered to the node.
    pub chunks_offered: u64,
    /// Chunks the node lacked and that were sent.
    pub chunks_sent: u64,
    /// Chunk bytes sent, as sent (compressed where that shrinks them).
    pub bytes_sent: u64,
}

/// zstd level an agent compresses the chunks it sends with: the chunk
/// store's default, so a pushed chunk is stored as a local backup would
/// store it.
pub const TRANSFER_ZSTD_LEVEL: i32 = 3;

/// Milliseconds between two progress reports of a push. The walk reports
/// every chunk, every file it reads and every directory; turning each into
/// a `PushProgress` (with the path as a `String`) and a line of the CLI's
/// progress bar would cost a backup of many small files more than the
/// reports are worth.
pub const PROGRESS_INTERVAL_MS: u64 = 100;

/// A callback receiving progress; called from worker threads.
pub type ProgressFn = Arc<dyn Fn(&PushProgress) + Send + Sync>;

/// Trees and chunks read from a node, for the walk's unchanged-file cache
/// (called from the walk's blocking threads).
struct RemoteSource {
    client: StorageClient<Channel>,
    runtime: Handle,
    /// Trees asked for ahead of the walk ([`ChunkSource::prefetch_trees`]),
    /// in flight or arrived as the node stores them, until the walk takes
    /// them.
    prefetched: Mutex<HashMap<ChunkId, oneshot::Receiver<Result<ChunkData, Status>>>>,
    /// Bounds the prefetching `GetChunks` calls in flight.
    prefetching: Arc<Semaphore>,
}

/// Prefetching `GetChunks` calls in flight at once.
const PREFETCH_CALLS: usize = 4;
/// Trees asked for in one prefetching call. The node streams them in the
/// order asked, which is the order the walk enters the directories, so the
/// first arrives after one round trip whatever the group's size.
const PREFETCH_GROUP: usize = 64;
/// Prefetched trees held at most; beyond this the walk fetches on demand (a
/// directory with a huge number of subdirectories must not fill memory).
const PREFETCH_HELD: usize = 1024;

impl RemoteSource {
    fn new(client: StorageClient<Channel>, runtime: Handle) -> Self {
        Self {
            client,
            runtime,
            prefetched: Mutex::new(HashMap::new()),
            prefetching: Arc::new(Semaphore::new(PREFETCH_CALLS)),
        }
    }

    fn prefetched(
        &self,
    ) -> MutexGuard<'_, HashMap<ChunkId, oneshot::Receiver<Result<ChunkData, Status>>>> {
        // Only ever inserted into and removed from: usable after a panic.
        self.prefetched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Ask the node for the chunks `wanted` in one `GetChunks` call and hand
/// each to its waiting walk thread as it arrives. A chunk not answered (the
/// call failed or ended early) drops its sender, and the walk fetches that
/// tree itself.
async fn prefetch_chunks(
    mut client: StorageClient<Channel>,
    wanted: Vec<(ChunkId, oneshot::Sender<Result<ChunkData, Status>>)>,
) {
    let ids = wanted.iter().map(|(id, _)| id.to_vec()).collect();
    let mut stream = match client.get_chunks(GetChunksRequest { ids }).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            tracing::debug!("prefetching parent trees: {}", describe_status(&status));
            return;
        }
    };
    for (id, answer) in wanted {
        match stream.next().await {
            Some(Ok(chunk)) if chunk.id == id.as_bytes() => {
                let _ = answer.send(Ok(chunk));
            }
            Some(Ok(chunk)) => {
                let _ = answer.send(Err(Status::data_loss(format!(
                    "asked for chunk {id}, the node sent {}",
                    hex::encode(&chunk.id)
                ))));
                return;
            }
            Some(Err(status)) => {
                let _ = answer.send(Err(status));
                return;
            }
            None => return,
        }
    }
}

impl ChunkSource for RemoteSource {
    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, SinkError> {
        let mut client = self.client.clone();
        let id = *id;
        self.runtime.block_on(async move {
            let mut stream = client
                .get_chunks(GetChunksRequest {
                    ids: vec![id.to_vec()],
                })
                .await?
                .into_inner();
            let chunk = stream
                .next()
                .await
                .ok_or_else(|| format!("the node sent no data for chunk {id}"))??;
            let chunk = crate::convert::plain_chunk(chunk)?;
            if chunk.id != id {
                return Err(format!("the node sent chunk {} for chunk {id}", chunk.id).into());
            }
            Ok(chunk.data)
        })
    }

    fn get_tree(&self, id: &ChunkId) -> Result<Tree, SinkError> {
        let waiting = self.prefetched().remove(id);
        let prefetched = match waiting {
            // A prefetch dropped unanswered is fetched again below.
            Some(waiting) => self.runtime.block_on(waiting).ok(),
            None => None,
        };
        // Decoded and checked against its id here, on the walk's thread,
        // not on the runtime's.
        let bytes = match prefetched {
            Some(answer) => {
                let chunk = crate::convert::plain_chunk(answer?)?;
                if chunk.id != *id {
                    return Err(format!("the node sent chunk {} for tree {id}", chunk.id).into());
                }
                chunk.data
            }
            // As a chunk, not with GetTree: the tree chunk of a large
            // listing is small, its parts are fetched one by one below.
            None => self.get_chunk(id)?,
        };
        let tree = Tree::decode(bytes.as_slice())
            .map_err(|err| format!("tree {id} does not decode: {err}"))?;
        fabric_chunkstore::tree_parts::join_parts(
            tree,
            |part| self.get_chunk(part),
            |err| format!("tree {id}: {err}").into(),
        )
    }

    fn prefetch_trees(&self, ids: &[ChunkId]) {
        let mut wanted = Vec::new();
        {
            let mut prefetched = self.prefetched();
            for id in ids {
                if prefetched.len() >= PREFETCH_HELD {
                    break;
                }
                if prefetched.contains_key(id) {
                    continue;
                }
                let (answer, waiting) = oneshot::channel();
                prefetched.insert(*id, waiting);
                wanted.push((*id, answer));
            }
        }
        while !wanted.is_empty() {
            let rest = wanted.split_off(wanted.len().min(PREFETCH_GROUP));
            let group = std::mem::replace(&mut wanted, rest);
            let client = self.client.clone();
            let calls = self.prefetching.clone();
            self.runtime.spawn(async move {
                let Ok(_call) = calls.acquire_owned().await else {
                    return;
                };
                prefetch_chunks(client, group).await;
            });
        }
    }
}

/// The newest complete snapshot of the same job, host and instance on the
/// node, to use as the parent (its unchanged files are not read again).
async fn find_parent(
    client: &mut StorageClient<Channel>,
    template: &Snapshot,
) -> Result<Option<Snapshot>, Status> {
    let newest = client
        .get_newest_snapshot(GetNewestSnapshotRequest {
            job: template.job.clone(),
            host: template.host.clone(),
            instance: template.instance.clone(),
        })
        .await;
    match newest {
        Ok(response) => return Ok(response.into_inner().snapshot),
        // A node from before GetNewestSnapshot: list and pick.
        Err(status) if status.code() == tonic::Code::Unimplemented => {}
        Err(status) => return Err(status),
    }
    let snapshots = client
        .list_snapshots(ListSnapshotsRequest {
            job: template.job.clone(),
            host: template.host.clone(),
        })
        .await?
        .into_inner()
        .snapshots;
    Ok(newest_among(snapshots, &SnapshotSource::of(template)))
}

/// Fill a snapshot record from a walk's outcome and the transfer's counters.
fn finish_record(
    mut template: Snapshot,
    outcome: BackupOutcome,
    counters: &TransferCounters,
) -> Snapshot {
    let mut stats = outcome.stats;
    stats.new_chunks = TransferCounters::get(&counters.new_chunks);
    stats.new_bytes = TransferCounters::get(&counters.new_bytes);
    stats.stored_bytes = TransferCounters::get(&counters.stored_bytes);
    template.root_tree_id = outcome.root.to_vec();
    template.stats = Some(stats);
    template.warnings = outcome.warnings;
    template
}

/// Lets one progress report through per [`PROGRESS_INTERVAL_MS`], whichever
/// of the walk's threads asks first.
#[derive(Default)]
struct ReportGate {
    /// Milliseconds (on the caller's clock) before which nothing passes.
    next_ms: AtomicU64,
}

impl ReportGate {
    /// Whether a report at `now_ms` goes out.
    fn claim(&self, now_ms: u64) -> bool {
        let due = self.next_ms.load(Ordering::Relaxed);
        now_ms >= due
            && self
                .next_ms
                .compare_exchange(
                    due,
                    now_ms.saturating_add(PROGRESS_INTERVAL_MS),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

/// Run the backup walk on a blocking thread into `chunks`, reporting
/// progress; returns the walk's outcome.
fn spawn_walk(
    options: BackupOptions,
    chunks: mpsc::Sender<OutgoingChunk>,
    pipeline_bytes: usize,
    parent: Option<(Arc<dyn ChunkSource + Send + Sync>, ChunkId)>,
    counters: Arc<TransferCounters>,
    progress: Option<ProgressFn>,
) -> tokio::task::JoinHandle<Result<BackupOutcome, Status>> {
    tokio::task::spawn_blocking(move || {
        let sink = ChannelSink::new(chunks, pipeline_bytes);
        let started = Instant::now();
        let gate = ReportGate::default();
        let report = |walk: &Progress<'_>| {
            let Some(progress) = &progress else {
                return;
            };
            let now_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            if gate.claim(now_ms) {
                progress(&PushProgress {
                    files: walk.files,
                    bytes_read: walk.bytes_read,
                    bytes_sent: TransferCounters::get(&counters.bytes_sent),
                    new_bytes: TransferCounters::get(&counters.new_bytes),
                    current_path: walk.current_path.display().to_string(),
                });
            }
        };
        let parent = parent.as_ref().map(|(source, root)| ParentSnapshot {
            source: source.as_ref(),
            root: *root,
        });
        fabric_chunkstore::walk::backup(&options, &sink, parent, &report).map_err(walk_status)
    })
}

/// The sending end of a backup, for a push (on `Storage.Upload`) and a pull
/// (on `Source.Pull`) alike: walk `options` (skipping files unchanged since
/// `parent`), send what the receiver lacks on `outgoing`, taking its replies
/// from `incoming`, and commit the snapshot made from `template`. Returns the
/// snapshot as the receiver committed it. `plan` shares the backup's memory
/// budget: it sets the walk's threads and what the sender holds.
#[allow(clippy::too_many_arguments)]
pub async fn send_backup<I>(
    mut options: BackupOptions,
    plan: SendPlan,
    parent: Option<(Arc<dyn ChunkSource + Send + Sync>, ChunkId)>,
    template: Snapshot,
    outgoing: mpsc::Sender<SenderMessage>,
    incoming: I,
    counters: Arc<TransferCounters>,
    progress: Option<ProgressFn>,
    limits: TransferLimits,
) -> Result<Snapshot, Status>
where
    I: futures::Stream<Item = Result<ReceiverMessage, Status>> + Unpin,
{
    // Bounded in bytes by the sink's share of the budget as well.
    let (chunks_tx, chunks_rx) = mpsc::channel::<OutgoingChunk>(READ_AHEAD_CHUNKS);
    options.threads = plan.walk_threads;
    options.hash_ahead_bytes = plan.hash_ahead_bytes;
    let (progress, sending_progress) = match progress {
        Some(progress) => {
            let (walk_progress, ticker) = SendingProgress::start(progress, counters.clone());
            (Some(walk_progress), Some(ticker))
        }
        None => (None, None),
    };
    let walk = spawn_walk(
        options,
        chunks_tx,
        plan.pipeline_bytes,
        parent,
        counters.clone(),
        progress,
    );
    let commit_counters = counters.clone();
    let commit = async move {
        let outcome = walk.await.map_err(crate::status::join_error)??;
        Ok(finish_record(template, outcome, &commit_counters))
    };
    let sent = run_sender(
        chunks_rx,
        None,
        TRANSFER_ZSTD_LEVEL,
        outgoing,
        incoming,
        commit,
        counters,
        limits,
        SendSizes::from(&plan),
    )
    .await;
    if let Some(ticker) = sending_progress {
        ticker.abort();
    }
    sent
}

/// Progress while chunks are still being sent: the walk reports only while
/// it reads, and it can finish reading long before a slow link has carried
/// what it read (read-ahead, a bandwidth limit). A ticker repeats the walk's
/// last figures with the bytes sent so far, until the send ends.
struct SendingProgress;

impl SendingProgress {
    /// The progress function for the walk, and the ticker to abort once the
    /// send has ended.
    fn start(
        progress: ProgressFn,
        counters: Arc<TransferCounters>,
    ) -> (ProgressFn, tokio::task::JoinHandle<()>) {
        let latest = Arc::new(Mutex::new(PushProgress::default()));
        let walk_progress: ProgressFn = {
            let latest = latest.clone();
            let progress = progress.clone();
            Arc::new(move |report: &PushProgress| {
                *latest.lock().unwrap_or_else(|p| p.into_inner()) = report.clone();
                progress(report);
            })
        };
        let ticker = tokio::spawn(async move {
            let mut interval =
                tokio::time::interval(Duration::from_millis(PROGRESS_INTERVAL_MS * 5));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.tick().await;
            loop {
                interval.tick().await;
                let mut report = latest.lock().unwrap_or_else(|p| p.into_inner()).clone();
                report.bytes_sent = TransferCounters::get(&counters.bytes_sent);
                report.new_bytes = TransferCounters::get(&counters.new_bytes);
                progress(&report);
            }
        });
        (walk_progress, ticker)
    }
}

/// Back up `options.includes` to `node` as a snapshot made
/// from `template` (job, host, instance, type, tags... and, if set, the id
/// every replica shares), within the memory `plan` shares out.
#[allow(clippy::too_many_arguments)]
pub async fn push_backup(
    node: &crate::client::Peer,
    transport: &fabric_trust::Transport,
    options: BackupOptions,
    plan: SendPlan,
    template: Snapshot,
    progress: Option<ProgressFn>,
    limits: TransferLimits,
) -> Result<PushOutcome, AgentError> {
    let client = crate::client::storage(node, transport).await?;
    let address = node.address.as_str();
    let remote = |context: &str| {
        let context = format!("{context} on {address}");
        move |status: Status| AgentError::Remote { context, status }
    };
    let mut template = template;
    let counters = Arc::new(TransferCounters::default());
    let (out_tx, out_rx) = mpsc::channel::<SenderMessage>(SENDER_CHANNEL);
    // The upload does not need the parent (only the commit names it), so it
    // opens during the parent's round trip.
    let mut listing = client.clone();
    let mut uploading = client.clone();
    let (parent, incoming) = tokio::join!(
        find_parent(&mut listing, &template),
        uploading.upload(ReceiverStream::new(out_rx))
    );
    let parent = parent.map_err(remote("finding the parent snapshot"))?;
    let incoming = incoming
        .map_err(remote("starting the upload"))?
        .into_inner();
    let parent_source = match &parent {
        Some(parent) => {
            template.parent_id = parent.id.clone();
            let root = ChunkId::from_slice(&parent.root_tree_id)
                .map_err(|err| AgentError::Local(err.to_string()))?;
            let source: Arc<dyn ChunkSource + Send + Sync> =
                Arc::new(RemoteSource::new(client.clone(), Handle::current()));
            // The walk starts from the root tree: on its way while the
            // walk's threads start.
            source.prefetch_trees(&[root]);
            Some((source, root))
        }
        None => None,
    };
    let snapshot = send_backup(
        options,
        plan,
        parent_source,
        template,
        out_tx,
        incoming,
        counters.clone(),
        progress,
        limits,
    )
    .await
    .map_err(|status| {
        if is_source_fault(&status) {
            AgentError::Source(status.message().to_owned())
        } else {
            remote("backing up")(status)
        }
    })?;
    Ok(PushOutcome {
        snapshot,
        chunks_offered: TransferCounters::get(&counters.chunks_offered),
        chunks_sent: TransferCounters::get(&counters.chunks_sent),
        bytes_sent: TransferCounters::get(&counters.bytes_sent),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_gate_lets_one_report_through_per_interval() {
        let gate = ReportGate::default();
        let interval = PROGRESS_INTERVAL_MS;
        assert!(gate.claim(0), "the first report goes out");
        assert!(!gate.claim(0));
        assert!(!gate.claim(interval - 1));
        assert!(gate.claim(interval));
        assert!(!gate.claim(interval + 1));
        // A quiet spell: the next report goes out at once, and the interval
        // counts from it.
        assert!(gate.claim(10 * interval + 7));
        assert!(!gate.claim(11 * interval));
        assert!(gate.claim(11 * interval + 7));
    }
}
