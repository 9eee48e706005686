//! The storage service: `fabric.v1.Storage` over one chunk store.
//!
//! Every store call runs on a blocking thread (the store is synchronous).
//! This module translates between the API and the store; the transfer
//! protocol itself lives in [`crate::transfer`], restore's tree walk in the
//! chunk store. It must never hold chunk data beyond one batch per stream.
//!
//! Who may call which RPC is the authorization table's business; this
//! service narrows what a client, or an agent (a node the coordinator did
//! not register as storage), touches to its own host's snapshots (listing,
//! reading, restoring, committing), and sends a copy only to a node id the
//! coordinator resolves, over TLS to a server that proves that id.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use fabric_chunkstore::restore::{HardLinks, RestoreError};
use fabric_chunkstore::validate;
use fabric_chunkstore::{ChunkId, SinkError, SnapshotSource};
use fabric_chunkstore::{CommitGuards, GcOptions, Store, StoreError, VerifyOptions};
use fabric_proto::v1::storage_server::Storage;
use fabric_proto::v1::{
    ChunkData, ChunkIds, CopyProgress, CopySnapshotRequest, DeleteSnapshotRequest,
    DeleteSnapshotResponse, GcReport, GcRequest, GetChunksRequest, GetNewestSnapshotRequest,
    GetNewestSnapshotResponse, GetSnapshotRequest, GetTreeRequest, ListSnapshotsRequest,
    ListSnapshotsResponse, ReceiverMessage, RestoreEntry, RestoreItem, RestoreRequest,
    SenderMessage, Snapshot, StatsRequest, StoreStats, Tree, TreeEntry, UnreadableChunk,
    VerifyReport, VerifyRequest, restore_item,
};
use fabric_trust::{Caller, Role, Transport};
use futures::Stream;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::convert;
use crate::health::SharedHealth;
use crate::node_directory::NodeDirectory;
use crate::quota::HostQuotas;
use crate::rate_limit::{RateLimit, TransferLimits};
use crate::server_stream::{self, ItemStream};
use crate::status::{join_error, status_from_store_error};
use crate::transfer::{
    self, OutgoingChunk, REPLY_CHANNEL, ReceiveRules, SENDER_CHANNEL, TransferCounters,
    offer_snapshot_dag, run_receiver, run_sender,
};

/// The shared state of a node's storage service.
#[derive(Clone)]
pub struct StorageService {
    store: Arc<Store>,
    /// Chunk bytes all uploads together may hold (one permit per KiB).
    upload_memory: Arc<Semaphore>,
    /// Chunk bytes one upload may hold.
    memory_per_upload: usize,
    /// Whether the node takes writes now, and why not (uploads are
    /// refused meanwhile; `Stats` reports it).
    health: SharedHealth,
    /// How this node dials other servers (copies).
    transport: Transport,
    /// The fabric's nodes: copy targets, and which callers are agents.
    directory: NodeDirectory,
    /// How long an upload may send nothing before it is dropped.
    idle_timeout: Duration,
    /// byteback's guards for uploads of clients and agents.
    guards: CommitGuards,
    /// The node-wide ingest limit every upload waits for.
    ingest_limit: Option<Arc<RateLimit>>,
    /// Per-host quotas of stored bytes.
    quotas: Arc<HostQuotas>,
    gc_grace: Duration,
    metrics: crate::metrics::NodeMetrics,
}

/// How a node takes uploads.
#[derive(Clone, Debug)]
pub struct StorageSettings {
    /// Chunk bytes all uploads together may hold in memory.
    pub memory_bytes: u64,
    /// Chunk bytes one upload may hold in memory.
    pub memory_per_upload_bytes: u64,
    /// How long an upload may send nothing before it is dropped.
    pub idle_timeout: Duration,
    /// byteback's guards for uploads of clients and agents.
    pub guards: CommitGuards,
    /// The node-wide ingest limit (bytes/s), if any.
    pub ingest_limit: Option<Arc<RateLimit>>,
    /// Per-host quotas of stored bytes.
    pub quotas: Arc<HostQuotas>,
    /// How old a pack must be before GC may sweep it: younger ones may
    /// hold an upload still in progress.
    pub gc_grace: Duration,
}

impl std::fmt::Debug for StorageService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageService")
            .field("store", &self.store.dir())
            .finish_non_exhaustive()
    }
}

impl StorageService {
    /// Serve `store`, holding at most `upload_memory_bytes` of upload data.
    /// Copies dial with `transport`, to nodes the leader of the
    /// `coordinators` (if any) resolves.
    pub fn new(
        store: Arc<Store>,
        settings: StorageSettings,
        health: SharedHealth,
        transport: Transport,
        coordinators: Option<fabric_proto::coordinator_addresses::CoordinatorAddresses>,
    ) -> Self {
        let StorageSettings {
            memory_bytes: upload_memory_bytes,
            memory_per_upload_bytes,
            idle_timeout,
            guards,
            ingest_limit,
            quotas,
            gc_grace,
        } = settings;
        let permits = usize::try_from(upload_memory_bytes / 1024)
            .unwrap_or(usize::MAX)
            .clamp(transfer::MAX_MESSAGE_BYTES / 1024, Semaphore::MAX_PERMITS);
        Self {
            store,
            upload_memory: Arc::new(Semaphore::new(permits)),
            memory_per_upload: usize::try_from(memory_per_upload_bytes).unwrap_or(usize::MAX),
            idle_timeout,
            guards,
            ingest_limit,
            quotas,
            gc_grace,
            health,
            directory: NodeDirectory::new(coordinators, transport.clone()),
            transport,
            metrics: crate::metrics::NodeMetrics::default(),
        }
    }

    /// Count uploads, restores, refusals and GC in `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::NodeMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The address of registered node `id`, from the coordinator: a copy
    /// goes only to a node the fabric knows, never to an address a caller
    /// names.
    async fn resolve_node(&self, id: &str, again: bool) -> Result<String, Status> {
        fabric_trust::identity::validate_name(id).map_err(|err| {
            Status::invalid_argument(format!("target_node must be a node id: {err}"))
        })?;
        let found = if again {
            self.directory.lookup_again(id).await?
        } else {
            self.directory.lookup(id).await?
        };
        let node = found
            .filter(|node| !node.address.is_empty())
            .ok_or_else(|| Status::not_found(format!("no registered node {id}")))?;
        if !node.storage {
            return Err(Status::failed_precondition(format!(
                "node {id} keeps no store: a copy goes only to a storage node"
            )));
        }
        Ok(node.address)
    }

    /// Who may ask for a copy of `snapshot` to `target`: an operator, any;
    /// an agent, only of its own host's snapshots (a push run's later
    /// copies, made node to node so that every copy is the one committed);
    /// a storage node, only to itself (a pull run's later copies). The
    /// authorization table admits only operators and nodes.
    fn check_copy(
        caller: &Caller,
        scope: Option<&str>,
        snapshot: &Snapshot,
        target: &str,
    ) -> Result<(), Status> {
        let Some(identity) = caller.identity() else {
            return Ok(());
        };
        match (identity.role, scope) {
            (Role::Node, Some(_)) => Self::check_owner(caller, scope, snapshot),
            (Role::Node, None) if identity.name != target => {
                Err(Status::permission_denied(format!(
                    "{} may ask for copies only to itself, not to {}",
                    caller.describe(),
                    validate::quote(target.as_bytes())
                )))
            }
            _ => Ok(()),
        }
    }

    /// The one host whose snapshots `caller` may see and commit, or `None`
    /// for all: a client's own name; an agent's host name as the
    /// coordinator registered it; a node the directory does not know as a
    /// storage node, its own id; everyone else (operators, monitors,
    /// storage nodes copying) unscoped.
    async fn scope(&self, caller: &Caller) -> Result<Option<String>, Status> {
        let Caller::Authenticated(identity) = caller else {
            return Ok(None);
        };
        match identity.role {
            Role::Client => Ok(Some(identity.name.clone())),
            Role::Node => {
                if self.directory.is_standalone() {
                    return Ok(Some(identity.name.clone()));
                }
                Ok(match self.directory.lookup(&identity.name).await? {
                    Some(node) if node.storage => None,
                    Some(node) => Some(node.hostname),
                    None => Some(identity.name.clone()),
                })
            }
            Role::Operator | Role::Monitor | Role::Coordinator => Ok(None),
        }
    }

    /// Refused unless `snapshot` is of the caller's host, when it has one.
    fn check_owner(
        caller: &Caller,
        scope: Option<&str>,
        snapshot: &Snapshot,
    ) -> Result<(), Status> {
        match scope {
            Some(host) if snapshot.host != host => Err(Status::permission_denied(format!(
                "{} may read only host {host}'s snapshots; {} is not",
                caller.describe(),
                snapshot.id
            ))),
            _ => Ok(()),
        }
    }

    /// The store served.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    async fn blocking<T, F>(&self, work: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, fabric_chunkstore::StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(join_error)?
            .map_err(status_from_store_error)
    }
}

/// Receive one upload on `incoming` into `store`, replying on a stream; an
/// upload quiet for `idle_timeout` is dropped.
pub fn receive_upload(
    store: Arc<Store>,
    incoming: impl Stream<Item = Result<SenderMessage, Status>> + Unpin + Send + 'static,
    memory: Arc<Semaphore>,
    rules: ReceiveRules,
) -> ReceiverStream<Result<ReceiverMessage, Status>> {
    let (reply_tx, mut reply_rx) = mpsc::channel(REPLY_CHANNEL);
    let (out_tx, out_rx) = mpsc::channel(REPLY_CHANNEL + 1);
    let metrics = rules.metrics.clone();
    tokio::spawn(async move {
        let mut active = metrics.upload_started();
        let forward_tx = out_tx.clone();
        let forward = async move {
            while let Some(message) = reply_rx.recv().await {
                if forward_tx.send(Ok(message)).await.is_err() {
                    break;
                }
            }
        };
        let (result, ()) = tokio::join!(
            run_receiver(store, incoming, reply_tx, memory, rules),
            forward
        );
        // The checks' decompression buffers are as large as the largest
        // chunk received; an idle node (or one serving a restore next)
        // need not keep them.
        fabric_chunkstore::pack::release_thread_buffers();
        match result {
            Ok(snapshot) => {
                active.succeeded();
                tracing::info!(snapshot = %snapshot.id, name = %snapshot.name, "upload committed")
            }
            Err(status) => {
                if let Some(reason) = crate::metrics::RefusalReason::of_status(&status) {
                    metrics.refused(reason);
                }
                tracing::warn!(code = ?status.code(), message = status.message(), "upload ended without a commit");
                let _ = out_tx.send(Err(status)).await;
            }
        }
    });
    ReceiverStream::new(out_rx)
}

/// The page of (joined) listing `tree` that `request` asks for: the entries
/// after `start_after`, at most `max_entries`, without chunk ids if asked;
/// refused with `OutOfRange` if it does not fit in one message.
fn tree_page(id: &ChunkId, tree: Tree, request: &GetTreeRequest) -> Result<Tree, Status> {
    // Entries are sorted by name (see `Tree`), so a page starts where the
    // names pass `start_after`.
    let start = if request.start_after.is_empty() {
        0
    } else {
        tree.entries
            .partition_point(|entry| entry.name <= request.start_after)
    };
    let total = tree.entries.len();
    let wanted = match request.max_entries {
        0 => usize::MAX,
        max => max as usize,
    };
    let entries: Vec<TreeEntry> = tree
        .entries
        .into_iter()
        .skip(start)
        .take(wanted)
        .map(|mut entry| {
            if request.without_chunk_ids {
                entry.chunk_ids = Vec::new();
            }
            entry
        })
        .collect();
    let page = Tree {
        entries,
        parts: Vec::new(),
    };
    let bytes = prost::Message::encoded_len(&page);
    if bytes > transfer::MAX_MESSAGE_BYTES {
        let count = page.entries.len();
        // Half of what would fit on average, as entries differ in size.
        let fitting =
            (count as u128 * transfer::MAX_MESSAGE_BYTES as u128 / bytes as u128 / 2).max(1);
        return Err(Status::out_of_range(format!(
            "tree {id}: {count} of its {total} entries from entry {start} take {bytes} bytes, more than one message holds ({}); ask for a page of about {fitting} with max_entries{}",
            transfer::MAX_MESSAGE_BYTES,
            if request.without_chunk_ids {
                ""
            } else {
                ", or leave out chunk ids with without_chunk_ids"
            }
        )));
    }
    Ok(page)
}

/// Longest path a restore request may name, in bytes (Linux's PATH_MAX).
const MAX_RESTORE_PATH_BYTES: usize = 4096;

/// Why a restore request's `path` cannot name anything in a snapshot, if it
/// cannot: each of its components must be a valid entry name.
fn restore_path_problem(path: &str) -> Option<String> {
    if path.len() > MAX_RESTORE_PATH_BYTES {
        return Some(format!(
            "{} bytes (at most {MAX_RESTORE_PATH_BYTES})",
            path.len()
        ));
    }
    path.split('/')
        .filter(|part| !part.is_empty())
        .find_map(|part| validate::name_problem(part.as_bytes()))
}

/// The status of a restore that failed part way: the caller's mistake
/// (`NOT_FOUND` for a path not in the snapshot, `INVALID_ARGUMENT`), or
/// stored data that cannot be read as it should (`DATA_LOSS`).
fn restore_status(snapshot: &str, path: &str, err: SinkError) -> Status {
    let message = format!(
        "restore of snapshot {:?} path {:?} failed: {err}",
        validate::quote(snapshot.as_bytes()),
        validate::quote(path.as_bytes())
    );
    match err.downcast_ref::<RestoreError>() {
        Some(RestoreError::NotFound { .. }) => Status::not_found(message),
        Some(RestoreError::BadName { .. }) => Status::invalid_argument(message),
        Some(RestoreError::ChunkMismatch { .. } | RestoreError::Source { .. }) => {
            Status::data_loss(message)
        }
        _ => Status::failed_precondition(message),
    }
}

fn parse_id(bytes: &[u8]) -> Result<ChunkId, Status> {
    ChunkId::from_slice(bytes).map_err(|err| Status::invalid_argument(err.to_string()))
}

#[tonic::async_trait]
impl Storage for StorageService {
    type UploadStream = ReceiverStream<Result<ReceiverMessage, Status>>;

    async fn upload(
        &self,
        request: Request<Streaming<SenderMessage>>,
    ) -> Result<Response<Self::UploadStream>, Status> {
        let health = self.health.get();
        if health.refuses_writes() {
            self.metrics.refused(crate::metrics::RefusalReason::NoSpace);
            return Err(Status::unavailable(format!(
                "the store at {} cannot accept writes now: {}",
                self.store.dir().display(),
                health.summary()
            )));
        }
        let commit_host = self.scope(&Caller::of(&request)).await?;
        Ok(Response::new(receive_upload(
            self.store.clone(),
            request.into_inner(),
            self.upload_memory.clone(),
            ReceiveRules {
                // The guards hold the hosts that back themselves up (clients
                // and agents), not storage nodes' copies or operators.
                guards: if commit_host.is_some() {
                    self.guards
                } else {
                    CommitGuards::default()
                },
                commit_host,
                idle_timeout: self.idle_timeout,
                limits: TransferLimits::none().with(self.ingest_limit.clone()),
                quotas: self.quotas.clone(),
                metrics: self.metrics.clone(),
                memory_bytes: self.memory_per_upload,
            },
        )))
    }

    type RestoreStream = ItemStream<RestoreItem>;

    async fn restore(
        &self,
        request: Request<RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let caller = Caller::of(&request);
        let scope = self.scope(&caller).await?;
        let RestoreRequest {
            snapshot,
            path,
            report_unreadable_chunks,
        } = request.into_inner();
        if let Some(problem) = restore_path_problem(&path) {
            return Err(Status::invalid_argument(format!(
                "restore path {:?}: {problem}",
                validate::quote(path.as_bytes())
            )));
        }
        let found = self
            .blocking({
                let snapshot = snapshot.clone();
                move |store| store.find_snapshot(&snapshot)
            })
            .await?;
        if let Err(status) = Self::check_owner(&caller, scope.as_deref(), &found) {
            self.metrics
                .refused(crate::metrics::RefusalReason::NotPermitted);
            return Err(status);
        }
        let root = parse_id(&found.root_tree_id)?;
        let mut active = self.metrics.restore_started();
        let (producer, stream) =
            server_stream::channel::<RestoreItem>("the restore", self.idle_timeout);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut hard_links = HardLinks::default();
            let send = |item: restore_item::Kind| -> Result<(), SinkError> {
                producer
                    .send(Ok(RestoreItem { kind: Some(item) }))
                    .map_err(|stopped| stopped.to_string().into())
            };
            let result = fabric_chunkstore::restore::walk_tree(
                store.as_ref(),
                root,
                &path,
                |entry_path: &[u8], entry: &TreeEntry| -> Result<(), SinkError> {
                    send_entry(&send, entry_path, entry)?;
                    if hard_links.link_target(entry_path, entry).is_some() {
                        // The client links it to the file it already has.
                        return Ok(());
                    }
                    // Chunks go as stored: the client decodes and checks them.
                    for id in &entry.chunk_ids {
                        let chunk_id = ChunkId::from_slice(id)?;
                        match store.get_stored(&chunk_id) {
                            Ok(stored) => {
                                send(restore_item::Kind::Chunk(convert::chunk_data(stored)))?
                            }
                            Err(err) if report_unreadable_chunks => {
                                tracing::warn!(chunk = %chunk_id, path = %String::from_utf8_lossy(entry_path), error = %err, "a chunk this node cannot read: the client fetches it from another copy");
                                send(restore_item::Kind::UnreadableChunk(UnreadableChunk {
                                    id: id.clone(),
                                    reason: err.to_string(),
                                }))?
                            }
                            Err(err) => return Err(err.into()),
                        }
                    }
                    Ok(())
                },
            );
            match result {
                Ok(()) => {
                    active.succeeded();
                    producer.finish()
                }
                Err(err) => producer.fail(restore_status(&snapshot, &path, err)),
            }
        });
        Ok(Response::new(stream))
    }

    async fn get_tree(&self, request: Request<GetTreeRequest>) -> Result<Response<Tree>, Status> {
        let request = request.into_inner();
        let id = parse_id(&request.id)?;
        let store = self.store.clone();
        let tree = tokio::task::spawn_blocking(move || store.get_tree(&id))
            .await
            .map_err(join_error)?
            .map_err(|err| match err {
                // A stored chunk matches its id (reads check it), so one that
                // does not decode as a tree was never one: the caller's
                // mistake, not damage.
                StoreError::BadTree { .. } | StoreError::BadTreeParts { .. } => {
                    Status::invalid_argument(err.to_string())
                }
                err => status_from_store_error(err),
            })?;
        tree_page(&id, tree, &request).map(Response::new)
    }

    type GetChunksStream = ItemStream<ChunkData>;

    async fn get_chunks(
        &self,
        request: Request<GetChunksRequest>,
    ) -> Result<Response<Self::GetChunksStream>, Status> {
        let ids = request
            .into_inner()
            .ids
            .iter()
            .map(|id| parse_id(id))
            .collect::<Result<Vec<_>, _>>()?;
        if ids.len() > transfer::MAX_OFFER_IDS {
            return Err(Status::invalid_argument(format!(
                "{} ids asked, at most {} at once",
                ids.len(),
                transfer::MAX_OFFER_IDS
            )));
        }
        // Each id is served once, in the order first asked: a request that
        // repeats one id 4,096 times must not cost 4,096 reads.
        let mut seen = HashSet::with_capacity(ids.len());
        let ids: Vec<ChunkId> = ids.into_iter().filter(|id| seen.insert(*id)).collect();
        let (producer, stream) = server_stream::channel("the chunks", self.idle_timeout);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut sent = 0u64;
            for (index, id) in ids.iter().enumerate() {
                if sent >= MAX_GET_CHUNKS_BYTES {
                    producer.fail(Status::out_of_range(format!(
                        "GetChunks answers at most {MAX_GET_CHUNKS_BYTES} bytes per call: \
                         {index} of {} chunks sent, ask again for the rest",
                        ids.len()
                    )));
                    return;
                }
                match store.get_stored(id).map(convert::chunk_data) {
                    Ok(chunk) => {
                        sent += chunk.data.len() as u64;
                        if producer.send(Ok(chunk)).is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        producer.fail(status_from_store_error(err));
                        return;
                    }
                }
            }
            producer.finish();
        });
        Ok(Response::new(stream))
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let caller = Caller::of(&request);
        let scope = self.scope(&caller).await?;
        let ListSnapshotsRequest { job, mut host } = request.into_inner();
        if let Some(own) = scope {
            if !host.is_empty() && host != own {
                return Err(Status::permission_denied(format!(
                    "{} may list only host {own}'s snapshots",
                    caller.describe()
                )));
            }
            host = own;
        }
        let snapshots = self
            .blocking(move |store| {
                Ok(store
                    .list_snapshots()?
                    .into_iter()
                    .filter(|s| {
                        (job.is_empty() || s.job == job) && (host.is_empty() || s.host == host)
                    })
                    .collect())
            })
            .await?;
        Ok(Response::new(ListSnapshotsResponse { snapshots }))
    }

    async fn get_newest_snapshot(
        &self,
        request: Request<GetNewestSnapshotRequest>,
    ) -> Result<Response<GetNewestSnapshotResponse>, Status> {
        let caller = Caller::of(&request);
        let GetNewestSnapshotRequest {
            job,
            host,
            instance,
        } = request.into_inner();
        if let Some(own) = self.scope(&caller).await?
            && host != own
        {
            return Err(Status::permission_denied(format!(
                "{} may read only host {own}'s snapshots",
                caller.describe()
            )));
        }
        let snapshot = self
            .blocking(move |store| {
                store.newest_snapshot(&SnapshotSource {
                    job: &job,
                    host: &host,
                    instance: &instance,
                })
            })
            .await?;
        Ok(Response::new(GetNewestSnapshotResponse { snapshot }))
    }

    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Result<Response<Snapshot>, Status> {
        let caller = Caller::of(&request);
        let scope = self.scope(&caller).await?;
        let spec = request.into_inner().snapshot;
        let snapshot = self
            .blocking(move |store| store.find_snapshot(&spec))
            .await?;
        Self::check_owner(&caller, scope.as_deref(), &snapshot)?;
        Ok(Response::new(snapshot))
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let spec = request.into_inner().snapshot;
        let snapshot = self
            .blocking(move |store| store.delete_snapshot(&spec))
            .await?;
        Ok(Response::new(DeleteSnapshotResponse {
            snapshot: Some(snapshot),
        }))
    }

    async fn stats(&self, _request: Request<StatsRequest>) -> Result<Response<StoreStats>, Status> {
        let stats = self.blocking(|store| store.stats()).await?;
        Ok(Response::new(StoreStats {
            health: Some(self.health.get().to_proto()),
            ..convert::store_stats(&stats)
        }))
    }

    async fn verify(
        &self,
        request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyReport>, Status> {
        let VerifyRequest { sample, snapshot } = request.into_inner();
        if !(0.0..=1.0).contains(&sample) {
            return Err(Status::invalid_argument(format!(
                "sample must be a fraction in (0, 1] (0 for all), got {sample}"
            )));
        }
        let options = VerifyOptions {
            sample: (sample > 0.0 && sample < 1.0).then_some(sample),
            snapshot: (!snapshot.is_empty()).then_some(snapshot),
        };
        let report = self.blocking(move |store| store.verify(&options)).await?;
        Ok(Response::new(convert::verify_report(&report)))
    }

    async fn collect_garbage(
        &self,
        request: Request<GcRequest>,
    ) -> Result<Response<GcReport>, Status> {
        let threshold = request.into_inner().repack_threshold;
        let gc_grace = self.gc_grace;
        let gc = self.metrics.gc_started();
        let report = self
            .blocking(move |store| {
                let mut options = GcOptions {
                    grace: gc_grace,
                    ..GcOptions::default()
                };
                if threshold > 0.0 {
                    options.repack_threshold = Some(threshold);
                }
                store.gc(&options)
            })
            .await?;
        gc.finished(true, report.bytes_freed);
        let mut report = convert::gc_report(&report);
        report.grace_s = gc_grace.as_secs();
        Ok(Response::new(report))
    }

    type CopySnapshotStream = ItemStream<CopyProgress>;

    async fn copy_snapshot(
        &self,
        request: Request<CopySnapshotRequest>,
    ) -> Result<Response<Self::CopySnapshotStream>, Status> {
        let caller = Caller::of(&request);
        let scope = self.scope(&caller).await?;
        let CopySnapshotRequest {
            snapshot,
            target_node,
            bandwidth_limit_bytes_per_s,
        } = request.into_inner();
        let address = self.resolve_node(&target_node, false).await?;
        let target = target_node;
        let record = self
            .blocking({
                let snapshot = snapshot.clone();
                move |store| store.find_snapshot(&snapshot)
            })
            .await?;
        Self::check_copy(&caller, scope.as_deref(), &record, &target)?;
        let mut client = match crate::client::storage(
            &crate::client::Peer::node(&target, &address),
            &self.transport,
        )
        .await
        {
            Ok(client) => client,
            Err(first) => {
                // A node that restarted registers a new address: ask once more.
                let again = self.resolve_node(&target, true).await?;
                if again == address {
                    return Err(Status::unavailable(first.to_string()));
                }
                crate::client::storage(&crate::client::Peer::node(&target, &again), &self.transport)
                    .await
                    .map_err(|err| Status::unavailable(err.to_string()))?
            }
        };
        let counters = Arc::new(TransferCounters::default());
        let (progress_tx, progress_rx) = mpsc::channel(4);
        let store = self.store.clone();
        let copy_counters = counters.clone();
        let copy = async move {
            let (out_tx, out_rx) = mpsc::channel::<SenderMessage>(SENDER_CHANNEL);
            let incoming = client
                .upload(ReceiverStream::new(out_rx))
                .await?
                .into_inner();
            let (chunks_tx, chunks_rx) = mpsc::channel::<OutgoingChunk>(1024);
            let root = parse_id(&record.root_tree_id)?;
            let dag_store = store.clone();
            let producer = tokio::task::spawn_blocking(move || {
                offer_snapshot_dag(&dag_store, root, &chunks_tx)
            });
            let commit = async move {
                producer.await.map_err(join_error)??;
                Ok(record)
            };
            // A copy sends chunks as stored: nothing is compressed again.
            let zstd_level = store.config().zstd_level;
            run_sender(
                chunks_rx,
                Some(store),
                zstd_level,
                out_tx,
                incoming,
                commit,
                copy_counters,
                // The target's ingest limit paces a copy, and the caller
                // may ask for a lower rate (re-replication does).
                TransferLimits::none().with(RateLimit::new(bandwidth_limit_bytes_per_s)),
                // A copy holds no chunk bytes before an offer's reply: it
                // reads them from its store then.
                crate::transfer::SendSizes::default(),
            )
            .await
        };
        let idle = self.idle_timeout;
        tokio::spawn(async move {
            tokio::pin!(copy);
            let mut ticker = tokio::time::interval(Duration::from_millis(500));
            let progress = |committed: Option<Snapshot>| CopyProgress {
                chunks_offered: TransferCounters::get(&counters.chunks_offered),
                chunks_sent: TransferCounters::get(&counters.chunks_sent),
                bytes_sent: TransferCounters::get(&counters.bytes_sent),
                committed,
            };
            loop {
                tokio::select! {
                    result = &mut copy => {
                        let last = result.map(|snapshot| progress(Some(snapshot))).map_err(|status| {
                            Status::new(status.code(), format!("copy of {snapshot} to {target} failed: {}", status.message()))
                        });
                        // A caller that reads nothing holds this task for
                        // the idle timeout at most.
                        let _ = tokio::time::timeout(idle, progress_tx.send(last)).await;
                        break;
                    }
                    _ = ticker.tick() => {
                        // Progress is dropped while the caller does not read:
                        // the copy itself never waits for it.
                        if let Err(mpsc::error::TrySendError::Closed(_)) =
                            progress_tx.try_send(Ok(progress(None)))
                        {
                            break;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            ReceiverStream::new(progress_rx).map(|item| item),
        )))
    }
}

/// Chunk ids in one restore stream message: 65,536 ids are 2.2 MB, well
/// under the message limit.
pub const RESTORE_IDS_PER_MESSAGE: usize = 65_536;

/// Chunk bytes (as stored) one `GetChunks` call answers at most; past them
/// the stream ends with `OUT_OF_RANGE` and the caller asks again for the
/// rest. A parent tree prefetch asks for far less.
pub const MAX_GET_CHUNKS_BYTES: u64 = 512 * 1024 * 1024;

/// Send the header of `entry` (at `path`): whole, or, for a file of more
/// chunks than [`RESTORE_IDS_PER_MESSAGE`], with its first ids and the rest
/// in `more_chunk_ids` items right after it.
fn send_entry(
    send: &impl Fn(restore_item::Kind) -> Result<(), SinkError>,
    path: &[u8],
    entry: &TreeEntry,
) -> Result<(), SinkError> {
    let mut header = entry.clone();
    let count = header.chunk_ids.len();
    let rest = if count > RESTORE_IDS_PER_MESSAGE {
        header.chunk_ids.split_off(RESTORE_IDS_PER_MESSAGE)
    } else {
        Vec::new()
    };
    send(restore_item::Kind::Entry(RestoreEntry {
        path: path.to_vec(),
        entry: Some(header),
        chunk_id_count: if rest.is_empty() { 0 } else { count as u64 },
    }))?;
    for piece in rest.chunks(RESTORE_IDS_PER_MESSAGE) {
        send(restore_item::Kind::MoreChunkIds(ChunkIds {
            ids: piece.to_vec(),
        }))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, chunks: usize) -> TreeEntry {
        TreeEntry {
            name: name.as_bytes().to_vec(),
            size: chunks as u64,
            chunk_ids: vec![vec![7; 32]; chunks],
            ..Default::default()
        }
    }

    fn names(tree: &Tree) -> Vec<String> {
        tree.entries
            .iter()
            .map(|entry| String::from_utf8_lossy(&entry.name).into_owned())
            .collect()
    }

    fn request(start_after: &str, max_entries: u32, without_chunk_ids: bool) -> GetTreeRequest {
        GetTreeRequest {
            id: Vec::new(),
            start_after: start_after.as_bytes().to_vec(),
            max_entries,
            without_chunk_ids,
        }
    }

    #[test]
    fn pages_follow_the_names_and_the_last_is_short() {
        let tree = Tree {
            entries: ["a", "b", "c", "d", "e"].map(|name| file(name, 2)).to_vec(),
            parts: Vec::new(),
        };
        let id = ChunkId::of(b"tree");
        let page =
            |start_after, max| tree_page(&id, tree.clone(), &request(start_after, max, false));
        assert_eq!(names(&page("", 0).expect("all")), ["a", "b", "c", "d", "e"]);
        assert_eq!(names(&page("", 2).expect("first")), ["a", "b"]);
        assert_eq!(names(&page("b", 2).expect("second")), ["c", "d"]);
        assert_eq!(names(&page("d", 2).expect("last")), ["e"]);
        assert!(page("e", 2).expect("past the end").entries.is_empty());
        // A name between entries (one deleted since the last page) still
        // continues after it.
        assert_eq!(names(&page("bb", 0).expect("from bb")), ["c", "d", "e"]);
        assert_eq!(page("", 0).expect("all").entries[0].chunk_ids.len(), 2);
        let bare = tree_page(&id, tree.clone(), &request("", 0, true)).expect("bare");
        assert!(bare.entries.iter().all(|entry| entry.chunk_ids.is_empty()));
        assert_eq!(bare.entries[4].size, 2, "metadata stays");
    }

    #[test]
    fn a_page_larger_than_a_message_is_out_of_range_and_says_what_fits() {
        // Each entry carries about 1.1 MB of chunk ids: 30 are over the limit.
        let tree = Tree {
            entries: (0..30).map(|n| file(&format!("f{n:02}"), 32_000)).collect(),
            parts: Vec::new(),
        };
        let id = ChunkId::of(b"tree");
        let refused = tree_page(&id, tree.clone(), &request("", 0, false)).expect_err("too big");
        assert_eq!(refused.code(), tonic::Code::OutOfRange);
        let message = refused.message();
        assert!(message.contains(&id.to_string()), "{message}");
        assert!(message.contains("30 of its 30 entries"), "{message}");
        assert!(message.contains("max_entries"), "{message}");
        assert!(message.contains("without_chunk_ids"), "{message}");
        let suggested: u32 = message
            .split("a page of about ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|count| count.parse().ok())
            .expect("a suggested page size");
        let page = tree_page(&id, tree.clone(), &request("", suggested, false)).expect("fits");
        assert_eq!(page.entries.len(), suggested as usize);
        let bare = tree_page(&id, tree, &request("", 0, true)).expect("fits without ids");
        assert_eq!(bare.entries.len(), 30);
    }
}
