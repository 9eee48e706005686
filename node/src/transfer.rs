//! The transfer protocol, both ends (see proto/README.md): the sender offers
//! ids in batches, sends the bytes the receiver lacks, then commits; the
//! receiver answers offers, stores batches after decoding and re-hashing
//! them, and writes the snapshot record.
//!
//! Chunks travel in their stored form ([`StoredChunk`]): a sender compresses
//! a chunk it read only once the receiver asked for it, and sends a chunk it
//! stores as it is; the receiver keeps what it was sent.
//!
//! Both ends are written against plain channels and streams, not against a
//! gRPC call, because the same code runs in three places: a push (agent sends
//! on `Storage.Upload`), a pull (the agent sends on the response stream of
//! `Source.Pull` while the storage node receives) and a node-to-node copy.
//! This module never decides what to back up or where; it only moves chunks.
//!
//! Flow control: a sender keeps at most [`MAX_OFFERS_IN_FLIGHT`] offers and
//! [`MAX_BATCHES_IN_FLIGHT`] chunk batches unanswered, so the receiver's
//! replies always fit its reply channel ([`REPLY_CHANNEL`]): neither end can
//! block the other. The bytes a backup holds are bounded by its memory
//! budget ([`crate::memory_budget`]): a chunk the walk hands to a
//! [`ChannelSink`] takes its share of the pipeline's budget and gives it
//! back only when the receiver has it (it lacked nothing, or acknowledged
//! the batch that carried it as stored), and batches and offers are sized
//! to the budget ([`SendSizes`]).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fabric_chunkstore::pack::{self, StoredChunk};
use fabric_chunkstore::{Chunk, ChunkId, CommitGuards, PutStats, Store};
use fabric_proto::v1::{
    ChunkBatch, ChunkData, ChunksStored, Commit, Committed, Offer, OfferReply, ReceiverMessage,
    SenderMessage, Snapshot, Tree, receiver_message, sender_message,
};
use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::Status;

use crate::convert::{ChunkDataError, chunk_data, stored_chunk};
use crate::quota::HostQuotas;
use crate::rate_limit::TransferLimits;
use crate::status::{join_error, status_from_store_error};

/// Most ids in one offer.
pub const MAX_OFFER_IDS: usize = 4096;
/// Most plain bytes a sender holds for one offer.
pub const MAX_OFFER_BYTES: usize = 16 * 1024 * 1024;
/// Most bytes of chunk data (as sent, compressed or not) in one chunk batch
/// (a single larger chunk goes alone).
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Largest chunk accepted: data chunks are at most the store's maximum chunk
/// size; trees of very large directories may be bigger, up to this.
pub const MAX_CHUNK_BYTES: usize = 16 * 1024 * 1024;
/// gRPC message limit on every fabric channel and server: the largest batch
/// (a lone maximal chunk, or a full batch) plus its envelope fits under it.
pub const MAX_MESSAGE_BYTES: usize = MAX_CHUNK_BYTES + MAX_BATCH_BYTES + 1024 * 1024;
/// Unanswered offers a sender allows itself, counting those whose missing
/// chunks are being compressed.
pub const MAX_OFFERS_IN_FLIGHT: usize = 4;
/// Unacknowledged chunk batches a sender allows itself.
pub const MAX_BATCHES_IN_FLIGHT: usize = 8;
/// Capacity of a receiver's reply channel: more than a sender can have
/// unanswered, so a receiver never waits to reply.
pub const REPLY_CHANNEL: usize = 2 * (MAX_OFFERS_IN_FLIGHT + MAX_BATCHES_IN_FLIGHT) + 4;
/// Capacity of a sender's outgoing channel. Small: a batch is up to 8 MiB
/// and the transport buffers more behind it; a full channel makes the sender
/// wait for the network, which is all the backpressure it needs (the
/// receiver's replies always have room, see [`REPLY_CHANNEL`]).
pub const SENDER_CHANNEL: usize = 2;

/// How large a sender makes its batches and offers: the protocol's largest
/// by default, smaller under a tight memory budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendSizes {
    /// Most chunk bytes (as sent) in one batch.
    pub batch_bytes: usize,
    /// Most plain bytes one offer holds.
    pub offer_bytes: usize,
}

impl Default for SendSizes {
    fn default() -> Self {
        Self {
            batch_bytes: MAX_BATCH_BYTES,
            offer_bytes: MAX_OFFER_BYTES,
        }
    }
}

impl From<&crate::memory_budget::SendPlan> for SendSizes {
    fn from(plan: &crate::memory_budget::SendPlan) -> Self {
        Self {
            batch_bytes: plan.batch_bytes,
            offer_bytes: plan.offer_bytes,
        }
    }
}
/// Chunks that may wait between a walk and its sender: as many as one offer
/// takes, so an offer of small files gathers thousands of ids and a backup
/// of many small files needs few round trips.
pub const READ_AHEAD_CHUNKS: usize = MAX_OFFER_IDS;

/// One chunk a sender has to transfer.
#[derive(Debug)]
pub enum OutgoingChunk {
    /// Bytes at hand (a push: the agent just read them).
    Data(Chunk),
    /// Bytes a walk read, holding their share of the backup's memory budget
    /// until the receiver has them ([`ChannelSink`]).
    Budgeted(Chunk, OwnedSemaphorePermit),
    /// Bytes to fetch from the sender's own store if the receiver lacks them
    /// (a copy: most chunks are usually present already).
    Stored(ChunkId),
}

impl OutgoingChunk {
    fn id(&self) -> ChunkId {
        match self {
            Self::Data(chunk) | Self::Budgeted(chunk, _) => chunk.id,
            Self::Stored(id) => *id,
        }
    }

    fn held_bytes(&self) -> usize {
        match self {
            Self::Data(chunk) | Self::Budgeted(chunk, _) => chunk.data.len(),
            Self::Stored(_) => 0,
        }
    }
}

/// Live counters of a transfer, shared with whoever reports progress.
#[derive(Debug, Default)]
pub struct TransferCounters {
    /// Chunk ids offered.
    pub chunks_offered: AtomicU64,
    /// Chunks the receiver lacked and that were sent.
    pub chunks_sent: AtomicU64,
    /// Chunk bytes sent, as sent (compressed where that shrinks them).
    pub bytes_sent: AtomicU64,
    /// Chunks new to the receiver's store (acknowledged).
    pub new_chunks: AtomicU64,
    /// Plain bytes new to the receiver's store.
    pub new_bytes: AtomicU64,
    /// Bytes those take on the receiver's disk.
    pub stored_bytes: AtomicU64,
}

impl TransferCounters {
    fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    /// A counter's current value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

fn protocol_error(what: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("transfer protocol violation: {what}"))
}

/// Run the sending end: offer every chunk `chunks` yields, send what the
/// receiver lacks, then commit the snapshot `commit` resolves to once
/// `chunks` is closed. Returns the snapshot as the receiver committed it.
///
/// A missing `Data` chunk is compressed with zstd at `zstd_level` (sent plain
/// when that does not shrink it); a missing `Stored` chunk is read from
/// `store` as it is stored. Both happen on blocking threads while the loop
/// goes on offering, sending and taking acknowledgements. Offers and
/// batches are at most as large as `sizes` says.
#[allow(clippy::too_many_arguments)]
pub async fn run_sender<I, C>(
    mut chunks: mpsc::Receiver<OutgoingChunk>,
    store: Option<Arc<Store>>,
    zstd_level: i32,
    outgoing: mpsc::Sender<SenderMessage>,
    mut incoming: I,
    commit: C,
    counters: Arc<TransferCounters>,
    limits: TransferLimits,
    sizes: SendSizes,
) -> Result<Snapshot, Status>
where
    I: Stream<Item = Result<ReceiverMessage, Status>> + Unpin,
    C: Future<Output = Result<Snapshot, Status>>,
{
    let send = |message: sender_message::Kind| {
        let outgoing = outgoing.clone();
        async move {
            outgoing
                .send(SenderMessage {
                    kind: Some(message),
                })
                .await
                .map_err(|_| Status::unavailable("the receiver closed the transfer"))
        }
    };
    let mut offers: HashMap<u64, Vec<OutgoingChunk>> = HashMap::new();
    // The missing chunks of answered offers, being compressed or read.
    let mut encoding: FuturesUnordered<EncodedBatches> = FuturesUnordered::new();
    let mut batches_unacked = 0usize;
    // The budget of sent batches' chunks, by batch, until acknowledged.
    let mut unacked_budget: HashMap<u64, OwnedSemaphorePermit> = HashMap::new();
    let mut offered: HashSet<ChunkId> = HashSet::new();
    let mut next_batch = 0u64;
    let mut producer_done = false;
    // A walk over unchanged files may offer nothing for minutes: a progress
    // message now and then tells the receiver the sender is alive (it drops
    // a sender quiet for IDLE_TIMEOUT).
    let mut alive = tokio::time::interval_at(
        tokio::time::Instant::now() + SENDER_ALIVE_EVERY,
        SENDER_ALIVE_EVERY,
    );
    alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    while !(producer_done && offers.is_empty() && encoding.is_empty() && batches_unacked == 0) {
        let may_offer = !producer_done
            && offers.len() + encoding.len() < MAX_OFFERS_IN_FLIGHT
            && batches_unacked < MAX_BATCHES_IN_FLIGHT;
        tokio::select! {
            item = chunks.recv(), if may_offer => {
                let Some(first) = item else {
                    producer_done = true;
                    continue;
                };
                let mut held = first.held_bytes();
                let mut batch = vec![first];
                while batch.len() < MAX_OFFER_IDS && held < sizes.offer_bytes {
                    match chunks.try_recv() {
                        Ok(item) => {
                            held += item.held_bytes();
                            batch.push(item);
                        }
                        Err(_) => break,
                    }
                }
                // The same chunk twice in one backup (identical files) is
                // offered once.
                batch.retain(|item| offered.insert(item.id()));
                if batch.is_empty() {
                    continue;
                }
                next_batch += 1;
                let ids = batch.iter().map(|item| item.id().to_vec()).collect();
                TransferCounters::add(&counters.chunks_offered, batch.len() as u64);
                offers.insert(next_batch, batch);
                send(sender_message::Kind::Offer(Offer { batch: next_batch, ids })).await?;
            }
            _ = alive.tick() => {
                send(sender_message::Kind::Progress(fabric_proto::v1::TransferProgress::default())).await?;
            }
            Some(encoded) = encoding.next(), if !encoding.is_empty() => {
                for EncodedBatch { chunks: batch, budget } in encoded? {
                    next_batch += 1;
                    let bytes: usize = batch.iter().map(|c| c.data.len()).sum();
                    TransferCounters::add(&counters.chunks_sent, batch.len() as u64);
                    TransferCounters::add(&counters.bytes_sent, bytes as u64);
                    batches_unacked += 1;
                    // The budget comes back with the acknowledgement: until
                    // then the bytes are in the transport's buffers.
                    if let Some(budget) = budget {
                        unacked_budget.insert(next_batch, budget);
                    }
                    limits.take(bytes as u64).await?;
                    send(sender_message::Kind::Chunks(ChunkBatch { batch: next_batch, chunks: batch })).await?;
                }
            }
            message = incoming.next() => {
                let message = match message {
                    None => return Err(Status::unavailable("the receiver ended the transfer before the commit")),
                    Some(message) => message?,
                };
                match message.kind {
                    Some(receiver_message::Kind::OfferReply(OfferReply { batch, missing })) => {
                        let items = offers
                            .remove(&batch)
                            .ok_or_else(|| protocol_error(format!("reply to unknown offer {batch}")))?;
                        let missing: HashSet<Vec<u8>> = missing.into_iter().collect();
                        let wanted: Vec<OutgoingChunk> = items
                            .into_iter()
                            .filter(|item| missing.contains(item.id().as_bytes().as_slice()))
                            .collect();
                        if !wanted.is_empty() {
                            encoding.push(Box::pin(encode_batches(
                                wanted,
                                store.clone(),
                                zstd_level,
                                sizes.batch_bytes,
                            )));
                        }
                    }
                    Some(receiver_message::Kind::Stored(stored)) => {
                        batches_unacked = batches_unacked
                            .checked_sub(1)
                            .ok_or_else(|| protocol_error("acknowledgement of no batch"))?;
                        unacked_budget.remove(&stored.batch);
                        TransferCounters::add(&counters.new_chunks, stored.new_chunks);
                        TransferCounters::add(&counters.new_bytes, stored.new_bytes);
                        TransferCounters::add(&counters.stored_bytes, stored.stored_bytes);
                    }
                    other => return Err(protocol_error(format!("unexpected message before the commit: {other:?}"))),
                }
            }
        }
    }

    let snapshot = commit.await?;
    send(sender_message::Kind::Commit(Commit {
        snapshot: Some(snapshot),
    }))
    .await?;
    match incoming.next().await {
        Some(message) => match message?.kind {
            Some(receiver_message::Kind::Committed(Committed {
                snapshot: Some(snapshot),
            })) => Ok(snapshot),
            other => Err(protocol_error(format!(
                "expected the commit's answer, got {other:?}"
            ))),
        },
        None => Err(Status::unavailable(
            "the receiver ended the transfer without answering the commit",
        )),
    }
}

/// One batch ready to send, with the share of the memory budget its chunks
/// hold until the receiver acknowledges it.
struct EncodedBatch {
    chunks: Vec<ChunkData>,
    budget: Option<OwnedSemaphorePermit>,
}

/// The batches [`encode_batches`] makes of one offer's missing chunks.
type EncodedBatches =
    std::pin::Pin<Box<dyn Future<Output = Result<Vec<EncodedBatch>, Status>> + Send>>;

/// Encode chunks for sending, on a blocking thread: `Data` chunks are
/// compressed in parallel, `Stored` chunks read from `store` as stored; then
/// grouped into batches of at most `batch_bytes` as sent, each carrying the
/// budget of the chunks in it.
async fn encode_batches(
    items: Vec<OutgoingChunk>,
    store: Option<Arc<Store>>,
    zstd_level: i32,
    batch_bytes: usize,
) -> Result<Vec<EncodedBatch>, Status> {
    tokio::task::spawn_blocking(move || {
        let mut plain = Vec::with_capacity(items.len());
        let mut budgets = Vec::with_capacity(items.len());
        let mut to_fetch = Vec::new();
        for item in items {
            match item {
                OutgoingChunk::Data(chunk) => {
                    plain.push(chunk);
                    budgets.push(None);
                }
                OutgoingChunk::Budgeted(chunk, budget) => {
                    plain.push(chunk);
                    budgets.push(Some(budget));
                }
                OutgoingChunk::Stored(id) => to_fetch.push(id),
            }
        }
        // Encoding keeps the order, so each chunk meets its budget again.
        let mut encoded: Vec<(StoredChunk, Option<OwnedSemaphorePermit>)> =
            pack::encode_chunks(plain, zstd_level)
                .into_iter()
                .zip(budgets)
                .collect();
        if !to_fetch.is_empty() {
            let store = store.as_ref().ok_or_else(|| {
                Status::internal("a stored chunk to send but no store to read it")
            })?;
            for id in to_fetch {
                encoded.push((
                    store.get_stored(&id).map_err(status_from_store_error)?,
                    None,
                ));
            }
        }
        let mut batches = Vec::new();
        let mut current = EncodedBatch {
            chunks: Vec::new(),
            budget: None,
        };
        let mut current_bytes = 0;
        for (chunk, budget) in encoded {
            if !current.chunks.is_empty() && current_bytes + chunk.stored.len() > batch_bytes {
                batches.push(std::mem::replace(
                    &mut current,
                    EncodedBatch {
                        chunks: Vec::new(),
                        budget: None,
                    },
                ));
                current_bytes = 0;
            }
            current_bytes += chunk.stored.len();
            current.chunks.push(chunk_data(chunk));
            match (&mut current.budget, budget) {
                (Some(held), Some(more)) => held.merge(more),
                (held @ None, more) => *held = more,
                (Some(_), None) => {}
            }
        }
        if !current.chunks.is_empty() {
            batches.push(current);
        }
        Ok(batches)
    })
    .await
    .map_err(join_error)?
}

fn parse_id(bytes: &[u8], context: &str) -> Result<ChunkId, Status> {
    ChunkId::from_slice(bytes).map_err(|err| protocol_error(format!("{context}: {err}")))
}

/// New chunk bytes a receiver takes before it makes them durable (fsync the
/// pack, write the index): the chunks of an interrupted upload beyond this
/// are sent again on resume, and no fsync is paid per batch.
pub const FLUSH_EVERY_BYTES: u64 = 256 * 1024 * 1024;

/// How long a receiver waits for the sender's next message before it drops
/// the transfer: a sender that stalls holds memory permits and a writer.
/// A live sender is never this quiet (it sends progress while it reads).
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// What a receiver holds an upload to, beyond the protocol.
#[derive(Clone, Debug)]
pub struct ReceiveRules {
    /// A client's or agent's upload: only a snapshot of this host is
    /// committed (`PERMISSION_DENIED` otherwise).
    pub commit_host: Option<String>,
    /// How long the sender may send nothing before the transfer is dropped.
    pub idle_timeout: std::time::Duration,
    /// byteback's guards, applied to the commit.
    pub guards: CommitGuards,
    /// Bandwidth limits the chunk batches received wait for (the node's
    /// ingest limit; a pull's job limit).
    pub limits: TransferLimits,
    /// The node's per-host quotas of stored bytes.
    pub quotas: Arc<HostQuotas>,
    /// Where what is received, stored and committed is counted.
    pub metrics: crate::metrics::NodeMetrics,
    /// Chunk bytes (as sent) this transfer may hold at once, on top of the
    /// node-wide bound all of them share.
    pub memory_bytes: usize,
}

/// What one upload may hold when nothing else is said: two batches of the
/// largest size.
pub const DEFAULT_MEMORY_PER_UPLOAD: usize = 16 * 1024 * 1024;

impl ReceiveRules {
    /// A transfer from a trusted sender (a storage node's copy, a pull this
    /// node runs): no host to hold it to, no guards.
    pub fn trusted() -> Self {
        Self {
            commit_host: None,
            idle_timeout: IDLE_TIMEOUT,
            guards: CommitGuards::default(),
            limits: TransferLimits::none(),
            quotas: Arc::new(HostQuotas::default()),
            metrics: crate::metrics::NodeMetrics::default(),
            memory_bytes: DEFAULT_MEMORY_PER_UPLOAD,
        }
    }
}

/// Bytes `host`'s snapshots have added to `store` (see [`crate::quota`]).
async fn host_usage(store: &Arc<Store>, host: &str) -> Result<u64, Status> {
    let store = store.clone();
    let host = host.to_owned();
    tokio::task::spawn_blocking(move || crate::quota::usage_of(&store, &host))
        .await
        .map_err(join_error)?
        .map_err(status_from_store_error)
}

/// The refusal of an upload that would take `host` over its quota: the
/// store's own, as a commit over it gets.
fn over_quota(host: &str, used: u64, adding: u64, limit: u64) -> Status {
    status_from_store_error(fabric_chunkstore::StoreError::OverQuota {
        host: fabric_chunkstore::validate::quote(host.as_bytes()),
        used,
        adding,
        limit,
    })
}

/// How often a sender says it is alive when it has nothing else to send.
pub const SENDER_ALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Batches queued for a receiver's writer while it writes another: one
/// being written, one waiting, and the next one being received.
const WRITER_QUEUE: usize = 1;

/// Run the receiving end into `store`: answer offers, store batches (each
/// chunk decoded and re-hashed: a mismatch is `DATA_LOSS` and nothing of its
/// batch is stored; chunks are kept in the encoding they came in), and
/// commit the snapshot (`FAILED_PRECONDITION` naming a missing chunk).
/// Batches are checked and written by a second task, so offers are answered
/// meanwhile; they become durable every [`FLUSH_EVERY_BYTES`] and at the
/// commit. `memory` bounds the chunk bytes (as sent) all receivers hold at
/// once (one permit per KiB). With `commit_host` (a client's upload), only
/// a snapshot of that host is committed (`PERMISSION_DENIED` otherwise).
/// Returns the committed snapshot; a stream that ends before its commit
/// leaves no snapshot.
pub async fn run_receiver<I>(
    store: Arc<Store>,
    mut incoming: I,
    outgoing: mpsc::Sender<ReceiverMessage>,
    memory: Arc<Semaphore>,
    rules: ReceiveRules,
) -> Result<Snapshot, Status>
where
    I: Stream<Item = Result<SenderMessage, Status>> + Unpin,
{
    let reply = |kind: receiver_message::Kind| {
        let outgoing = outgoing.clone();
        async move {
            outgoing
                .send(ReceiverMessage { kind: Some(kind) })
                .await
                .map_err(|_| Status::cancelled("the sender went away"))
        }
    };
    let max_chunk = (store.config().chunk_params.max_size as usize).max(MAX_CHUNK_BYTES);
    // A client's or agent's upload knows its host from the start: its
    // quota is enforced batch by batch, before anything over it is written.
    let quota_of_caller = rules
        .commit_host
        .as_deref()
        .and_then(|host| rules.quotas.limit_of(host));
    let room = match (&rules.commit_host, quota_of_caller) {
        (Some(host), Some(limit)) => {
            let used = host_usage(&store, host).await?;
            if used >= limit {
                return Err(over_quota(host, used, 0, limit));
            }
            Some((host.clone(), used, limit))
        }
        _ => None,
    };
    let mut received = 0u64;
    // This transfer's own bound: batches queued for the writer and the one
    // it writes hold their bytes' permits until written.
    let own_kib = (rules.memory_bytes / 1024).clamp(1, Semaphore::MAX_PERMITS);
    let own_memory = Arc::new(Semaphore::new(own_kib));
    let (batches, mut writer) =
        spawn_writer(store.clone(), outgoing.clone(), rules.metrics.clone());
    let mut batches = Some(batches);
    loop {
        let message = tokio::select! {
            message = tokio::time::timeout(rules.idle_timeout, incoming.next()) => match message {
                Ok(message) => message,
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "the sender sent nothing for {} s: the transfer is dropped, nothing was committed",
                        rules.idle_timeout.as_secs()
                    )));
                }
            },
            written = &mut writer => {
                // The writer ends early only when a batch failed.
                written.map_err(join_error)??;
                return Err(Status::internal("the chunk writer stopped"));
            }
        };
        let Some(message) = message else {
            // A batch that failed (say, a chunk that does not match its id)
            // is the better answer than the stream's end.
            drop(batches.take());
            writer.await.map_err(join_error)??;
            return Err(Status::cancelled(
                "the sender ended the transfer before its commit: nothing was committed",
            ));
        };
        match message?.kind {
            Some(sender_message::Kind::Offer(Offer { batch, ids })) => {
                if ids.len() > MAX_OFFER_IDS {
                    return Err(protocol_error(format!(
                        "offer {batch} has {} ids, at most {MAX_OFFER_IDS} are allowed",
                        ids.len()
                    )));
                }
                let ids = ids
                    .iter()
                    .map(|id| parse_id(id, &format!("offer {batch}")))
                    .collect::<Result<Vec<_>, _>>()?;
                let store = store.clone();
                let missing = tokio::task::spawn_blocking(move || store.missing(&ids))
                    .await
                    .map_err(join_error)?
                    .map_err(status_from_store_error)?;
                reply(receiver_message::Kind::OfferReply(OfferReply {
                    batch,
                    missing: missing.iter().map(ChunkId::to_vec).collect(),
                }))
                .await?;
            }
            Some(sender_message::Kind::Chunks(ChunkBatch { batch, chunks })) => {
                let mut bytes = 0usize;
                let mut parsed = Vec::with_capacity(chunks.len());
                for chunk in chunks {
                    bytes += chunk.data.len();
                    let chunk = stored_chunk(chunk, max_chunk).map_err(|err| {
                        let message = format!("chunk batch {batch}: {err}");
                        match err {
                            ChunkDataError::TooLarge { .. } => Status::out_of_range(message),
                            _ => protocol_error(message),
                        }
                    })?;
                    parsed.push(chunk);
                }
                received += bytes as u64;
                rules.metrics.received_bytes.inc_by(bytes as u64);
                if let Some((host, used, limit)) = &room
                    && used.saturating_add(received) > *limit
                {
                    return Err(over_quota(host, *used, received, *limit));
                }
                let permits = u32::try_from(bytes.div_ceil(1024).max(1)).map_err(|_| {
                    Status::out_of_range(format!("chunk batch {batch} is too large"))
                })?;
                rules.limits.take(bytes as u64).await?;
                // A batch larger than this transfer's bound goes alone.
                let own = u32::try_from(own_kib).unwrap_or(u32::MAX).min(permits);
                let held_here = own_memory
                    .clone()
                    .acquire_many_owned(own)
                    .await
                    .map_err(|_| Status::unavailable("the node is shutting down"))?;
                let held_by_node = memory
                    .clone()
                    .acquire_many_owned(permits)
                    .await
                    .map_err(|_| Status::unavailable("the node is shutting down"))?;
                let held = (held_here, held_by_node);
                let queued = match &batches {
                    Some(batches) => batches.send((batch, parsed, held)).await.is_ok(),
                    None => false,
                };
                if !queued {
                    writer.await.map_err(join_error)??;
                    return Err(Status::internal("the chunk writer stopped"));
                }
            }
            Some(sender_message::Kind::Commit(Commit { snapshot })) => {
                let snapshot =
                    snapshot.ok_or_else(|| protocol_error("a commit without a snapshot"))?;
                if let Some(host) = &rules.commit_host
                    && snapshot.host != *host
                {
                    return Err(Status::permission_denied(format!(
                        "client {host} may commit snapshots of its own host only, not of host {:?}",
                        snapshot.host.chars().take(64).collect::<String>()
                    )));
                }
                // Every batch is written (and acknowledged) before the commit,
                // which makes them durable and checks the whole DAG.
                drop(batches.take());
                let written = writer.await.map_err(join_error)??;
                // What this upload added is the receiver's count, never the
                // sender's; the store computes the rest of the statistics.
                let mut snapshot = snapshot;
                let stats = snapshot.stats.get_or_insert_with(Default::default);
                stats.new_chunks = written.new_chunks;
                stats.new_bytes = written.new_bytes;
                stats.stored_bytes = written.stored_bytes;
                let store = store.clone();
                // Whoever uploaded it, a snapshot counts against its host's
                // quota: checked by the store under its commit lock, with
                // what this upload stored.
                let guards = CommitGuards {
                    host_quota_bytes: rules.quotas.limit_of(&snapshot.host),
                    ..rules.guards
                };
                let committed = tokio::task::spawn_blocking(move || {
                    store.commit_snapshot_guarded(snapshot, &guards)
                })
                .await
                .map_err(join_error)?
                .map_err(status_from_store_error)?;
                let stats = committed.stats.unwrap_or_default();
                rules
                    .metrics
                    .committed(stats.total_bytes, written.new_bytes);
                reply(receiver_message::Kind::Committed(Committed {
                    snapshot: Some(committed.clone()),
                }))
                .await?;
                return Ok(committed);
            }
            Some(sender_message::Kind::Progress(_)) => {}
            None => return Err(protocol_error("an empty message")),
        }
    }
}

/// A batch for the writer, with the memory it holds (this transfer's share
/// and the node's) until written.
type QueuedBatch = (
    u64,
    Vec<StoredChunk>,
    (OwnedSemaphorePermit, OwnedSemaphorePermit),
);

/// The receiver's writer: stores queued batches in order, acknowledges each,
/// and flushes every [`FLUSH_EVERY_BYTES`] of new bytes. Ends when the queue
/// is closed, or at the first failure.
fn spawn_writer(
    store: Arc<Store>,
    outgoing: mpsc::Sender<ReceiverMessage>,
    metrics: crate::metrics::NodeMetrics,
) -> (
    mpsc::Sender<QueuedBatch>,
    tokio::task::JoinHandle<Result<PutStats, Status>>,
) {
    let (batches, mut queue) = mpsc::channel::<QueuedBatch>(WRITER_QUEUE);
    let writer = tokio::spawn(async move {
        let mut unflushed = 0u64;
        let mut written = PutStats::default();
        while let Some((batch, chunks, held)) = queue.recv().await {
            let writing = store.clone();
            let stats = tokio::task::spawn_blocking(move || writing.put_stored_pending(chunks))
                .await
                .map_err(join_error)?
                .map_err(status_from_store_error)?;
            drop(held);
            written.add(&stats);
            metrics.stored_chunks.inc_by(stats.new_chunks);
            metrics.stored_bytes.inc_by(stats.stored_bytes);
            unflushed += stats.new_bytes;
            if unflushed >= FLUSH_EVERY_BYTES {
                unflushed = 0;
                let flushing = store.clone();
                tokio::task::spawn_blocking(move || flushing.flush_pending())
                    .await
                    .map_err(join_error)?
                    .map_err(status_from_store_error)?;
            }
            outgoing
                .send(ReceiverMessage {
                    kind: Some(receiver_message::Kind::Stored(ChunksStored {
                        batch,
                        new_chunks: stats.new_chunks,
                        new_bytes: stats.new_bytes,
                        stored_bytes: stats.stored_bytes,
                    })),
                })
                .await
                .map_err(|_| Status::cancelled("the sender went away"))?;
        }
        Ok(written)
    });
    (batches, writer)
}

/// Visit every distinct tree of the DAG under `root` once, depth first: its
/// id, its (joined) listing and the ids of the parts it was joined from.
/// Stops at the first error: reading a tree, a malformed subtree id, or
/// `visit`'s own. Runs on a blocking thread.
pub fn for_each_tree(
    store: &Store,
    root: ChunkId,
    mut visit: impl FnMut(ChunkId, &Tree, Vec<ChunkId>) -> Result<(), Status>,
) -> Result<(), Status> {
    let mut stack = vec![root];
    let mut seen_trees = HashSet::new();
    while let Some(tree_id) = stack.pop() {
        if !seen_trees.insert(tree_id) {
            continue;
        }
        let (tree, parts) = store
            .get_tree_with_parts(&tree_id)
            .map_err(status_from_store_error)?;
        visit(tree_id, &tree, parts)?;
        for entry in &tree.entries {
            if !entry.subtree_id.is_empty() {
                stack.push(parse_id(&entry.subtree_id, "tree entry")?);
            }
        }
    }
    Ok(())
}

/// Send every chunk of the DAG under `root` into `chunks`, for a copy: each
/// tree's parts and data chunks, then the tree itself, depth first (the
/// order does not matter to the receiver: its commit checks the whole DAG).
/// Runs on a blocking thread.
pub fn offer_snapshot_dag(
    store: &Store,
    root: ChunkId,
    chunks: &mpsc::Sender<OutgoingChunk>,
) -> Result<(), Status> {
    let offer = |id| {
        chunks
            .blocking_send(OutgoingChunk::Stored(id))
            .map_err(|_| Status::cancelled("the copy was abandoned"))
    };
    for_each_tree(store, root, |tree_id, tree, parts| {
        for id in parts {
            offer(id)?;
        }
        for entry in &tree.entries {
            for id in &entry.chunk_ids {
                offer(parse_id(id, "tree entry")?)?;
            }
        }
        offer(tree_id)
    })
}

/// A sink for the backup walk that feeds a sender: every chunk goes into the
/// channel with its share of the backup's memory budget, blocking the walk
/// (backpressure) while the chunks in flight hold all of it; the sender
/// gives a chunk's share back once the receiver has the chunk. Called on the
/// walk's threads, never on the async runtime's.
#[derive(Debug)]
pub struct ChannelSink {
    sender: mpsc::Sender<OutgoingChunk>,
    /// One permit per KiB of chunk bytes between the walk and the receiver.
    budget: Arc<Semaphore>,
    /// All of the budget: a larger chunk takes all of it.
    budget_kib: usize,
}

impl ChannelSink {
    /// A sink that sends into `sender`, with `pipeline_bytes` of chunks in
    /// flight at most (a single larger chunk goes alone).
    pub fn new(sender: mpsc::Sender<OutgoingChunk>, pipeline_bytes: usize) -> Self {
        let budget_kib = (pipeline_bytes / 1024).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            sender,
            budget: Arc::new(Semaphore::new(budget_kib)),
            budget_kib,
        }
    }
}

impl fabric_chunkstore::ChunkSink for ChannelSink {
    fn put_chunk(&self, chunk: Chunk) -> Result<(), fabric_chunkstore::SinkError> {
        let kib = chunk.data.len().div_ceil(1024).clamp(1, self.budget_kib);
        let kib = u32::try_from(kib).map_err(|_| "a chunk too large to send")?;
        // The permits come back as the receiver has the chunk, or all at
        // once when the sender drops it (the transfer ended).
        let budget = futures::executor::block_on(self.budget.clone().acquire_many_owned(kib))
            .map_err(|_| "the transfer ended")?;
        self.sender
            .blocking_send(OutgoingChunk::Budgeted(chunk, budget))
            .map_err(|_| "the transfer ended".into())
    }

    fn flush(&self) -> Result<(), fabric_chunkstore::SinkError> {
        // Durability is the receiver's: a snapshot is committed only once
        // every batch was acknowledged as stored.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_chunkstore::ChunkSink;
    use std::time::Duration;
    use tokio_stream::wrappers::ReceiverStream;

    const KIB: usize = 1024;

    /// Distinct incompressible-enough bytes for chunk `index`.
    fn chunk(index: usize, len: usize) -> Chunk {
        let mut state = (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let data = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        Chunk::new(data)
    }

    /// The next message the sender sends, or `None` once it has been quiet
    /// for a while (it waits for something).
    async fn next_sent(sent: &mut mpsc::Receiver<SenderMessage>) -> Option<sender_message::Kind> {
        match tokio::time::timeout(Duration::from_millis(500), sent.recv()).await {
            Ok(Some(message)) => message.kind,
            _ => None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sender_holds_no_more_than_its_budget_until_the_receiver_acknowledges() {
        const BUDGET: usize = 1024 * KIB;
        const CHUNK: usize = 64 * KIB;
        const CHUNKS: usize = 64;
        let (chunks_tx, chunks_rx) = mpsc::channel(READ_AHEAD_CHUNKS);
        let sink = ChannelSink::new(chunks_tx, BUDGET);
        let handed_on = Arc::new(AtomicU64::new(0));
        let walk = {
            let handed_on = handed_on.clone();
            std::thread::spawn(move || {
                for index in 0..CHUNKS {
                    sink.put_chunk(chunk(index, CHUNK))
                        .expect("the sender takes it");
                    handed_on.fetch_add(CHUNK as u64, Ordering::SeqCst);
                }
            })
        };
        let (out_tx, mut sent) = mpsc::channel(SENDER_CHANNEL);
        let (replies, incoming) = mpsc::channel(REPLY_CHANNEL);
        let sender = tokio::spawn(run_sender(
            chunks_rx,
            None,
            3,
            out_tx,
            ReceiverStream::new(incoming),
            async { Ok(Snapshot::default()) },
            Arc::new(TransferCounters::default()),
            TransferLimits::none(),
            SendSizes {
                batch_bytes: 256 * KIB,
                offer_bytes: 512 * KIB,
            },
        ));
        let reply = |kind| ReceiverMessage { kind: Some(kind) };

        // A receiver that lacks every chunk and acknowledges nothing: the
        // walk stops once the chunks in flight hold the whole budget.
        let mut unacknowledged = Vec::new();
        while let Some(kind) = next_sent(&mut sent).await {
            match kind {
                sender_message::Kind::Offer(Offer { batch, ids }) => replies
                    .send(Ok(reply(receiver_message::Kind::OfferReply(OfferReply {
                        batch,
                        missing: ids,
                    }))))
                    .await
                    .expect("the sender listens"),
                sender_message::Kind::Chunks(ChunkBatch { batch, .. }) => {
                    unacknowledged.push(batch)
                }
                other => panic!("unexpected before any acknowledgement: {other:?}"),
            }
        }
        let held = handed_on.load(Ordering::SeqCst) as usize;
        assert!(held > 0, "the walk handed nothing on");
        assert!(
            held <= BUDGET,
            "{held} bytes handed on with nothing acknowledged, over the budget of {BUDGET}"
        );
        assert!(!walk.is_finished(), "the walk went on past its budget");

        // Acknowledged, the budget comes back and the backup finishes.
        let mut batches = 0;
        let mut committed = false;
        let mut pending = unacknowledged
            .into_iter()
            .collect::<std::collections::VecDeque<_>>();
        loop {
            while let Some(batch) = pending.pop_front() {
                batches += 1;
                replies
                    .send(Ok(reply(receiver_message::Kind::Stored(ChunksStored {
                        batch,
                        ..Default::default()
                    }))))
                    .await
                    .expect("the sender listens");
            }
            match sent.recv().await.and_then(|message| message.kind) {
                Some(sender_message::Kind::Offer(Offer { batch, ids })) => replies
                    .send(Ok(reply(receiver_message::Kind::OfferReply(OfferReply {
                        batch,
                        missing: ids,
                    }))))
                    .await
                    .expect("the sender listens"),
                Some(sender_message::Kind::Chunks(ChunkBatch { batch, chunks })) => {
                    let bytes: usize = chunks.iter().map(|chunk| chunk.data.len()).sum();
                    assert!(
                        chunks.len() == 1 || bytes <= 256 * KIB,
                        "a batch of {bytes} bytes"
                    );
                    pending.push_back(batch);
                }
                Some(sender_message::Kind::Commit(Commit { snapshot })) => {
                    committed = true;
                    replies
                        .send(Ok(reply(receiver_message::Kind::Committed(Committed {
                            snapshot,
                        }))))
                        .await
                        .expect("the sender listens");
                    break;
                }
                Some(sender_message::Kind::Progress(_)) => {}
                None => break,
            }
        }
        assert!(committed, "the sender never committed");
        walk.join().expect("the walk ends");
        sender
            .await
            .expect("the sender ran")
            .expect("the backup succeeded");
        assert_eq!(handed_on.load(Ordering::SeqCst) as usize, CHUNKS * CHUNK);
        assert!(batches >= CHUNKS * CHUNK / (256 * KIB), "{batches} batches");
    }
}
