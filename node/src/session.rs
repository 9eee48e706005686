//! The node's session with the coordinator, and the work it is assigned.
//!
//! The node dials out (so it works behind NAT and in a pod): `RegisterNode`,
//! then one `Session` stream carrying a hello, heartbeats and run updates up,
//! assignments down. When the stream breaks the node reconnects with backoff;
//! updates it could not deliver are kept and sent after the reconnect, and the
//! hello lists the runs still in progress so the coordinator can re-assign
//! any the node no longer has.
//!
//! Given several coordinators (`coordinator = "https://c1:7400,https://c2:7400"`),
//! the node keeps its session with the one that leads: after a connection
//! that fails, an UNAVAILABLE (a coordinator that does not lead answers so,
//! naming the leader when it knows it) or a stream that breaks, it dials
//! the leader named at once, else the next listed address, and waits the
//! backoff only once a round through the list found no leader
//! ([`fabric_proto::coordinator_addresses::LeaderSearch`]).
//!
//! Each assignment runs in its own task (`execute`): push (pre, copies in
//! plan order with background copies overlapping, retries, spares, post),
//! passive (pre, ready, wait for the pulls, post), pull (receive from a
//! client's source endpoint into the own store) and expand (run the job's
//! instances command). This module reports what happens; the coordinator
//! decides what it means for the run.
//!
//! When the node is stopped (SIGTERM, SIGINT: [`Stopping`]), the runs in
//! progress are ended here rather than left to the coordinator's lost-node
//! timeout: their scripts' process groups are ended ([`crate::scripts`]),
//! each run is reported failed ("the agent on HOST was stopped (SIGTERM)
//! during pre"), and the session is closed once the coordinator has applied
//! those updates.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fabric_chunkstore::ChunkParams;
use fabric_chunkstore::Store;
use fabric_chunkstore::walk::BackupOptions;
use fabric_proto::coordinator_addresses::{
    Backoff, CoordinatorAddress, CoordinatorAddresses, LeaderSearch,
};
use fabric_proto::v1::coordinator_client::CoordinatorClient;
use fabric_proto::v1::{
    Assignment, AssignmentRole, CopyState, CopyTarget, GcDone, GcLease, Heartbeat, HostUsage,
    JobUsage, NodeInfo, NodeMessage, NodeRole, Replicate, Replicated, RunState, RunUpdate,
    Snapshot, SnapshotVerified, SnapshotsDeleted, TransferProgress, VerifySnapshot,
    coordinator_message, node_message,
};
use fabric_trust::Transport;
use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::agent::{AgentError, PushProgress, describe_status, push_backup};
use crate::commands::{Approved, CommandPolicy};
use crate::config::{NodeConfig, Role};
use crate::coordinator_channel::{CONNECT_TIMEOUT, leader_hint};
use crate::health::SharedHealth;
use crate::memory_budget::SendPlan;
use crate::pull_permits::PullPermits;
use crate::rate_limit::{JobBudget, RateLimit, TransferLimits};
use crate::run_copies::{self, NextCopy, SnapshotCopies};
use crate::scripts::Scripts;

/// Updates waiting to be sent, kept across reconnects (bounded: the oldest
/// progress-only updates are dropped first when it overflows).
const MAX_PENDING_UPDATES: usize = 10_000;

/// How long a stopping node gives its scripts between SIGTERM and SIGKILL.
const SCRIPT_GRACE: Duration = Duration::from_secs(5);

/// How long a stopping node waits for the coordinator to take the last
/// updates and close the session.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Runs in progress on this node.
#[derive(Default)]
struct ActiveRuns {
    runs: HashMap<String, ActiveRun>,
    /// Set when the node stops: the runs here are then reported by
    /// [`end_runs`], and a task ending after that reports nothing itself.
    stopping: bool,
}

struct ActiveRun {
    task: tokio::task::AbortHandle,
    pull_done: Option<oneshot::Sender<(bool, String)>>,
    role: AssignmentRole,
}

/// Asks a node's session, when the node is being stopped (SIGTERM), to end
/// the runs in progress: their scripts' process groups are ended, each run
/// is reported failed with the reason, and the session is closed once the
/// coordinator has every update.
#[derive(Clone, Debug)]
pub struct Stopping {
    asked: Arc<watch::Sender<Option<String>>>,
    done: Arc<watch::Sender<bool>>,
}

impl Default for Stopping {
    fn default() -> Self {
        Self {
            asked: Arc::new(watch::channel(None).0),
            done: Arc::new(watch::channel(false).0),
        }
    }
}

impl Stopping {
    /// Ask the session to end the runs, saying the node was stopped by
    /// `cause` (`SIGTERM`; empty when unsaid), and wait until it has (at
    /// most `wait`: the session may be cut off from the coordinator).
    pub async fn stop(&self, cause: &str, wait: Duration) {
        self.asked.send_replace(Some(cause.to_owned()));
        let mut done = self.done.subscribe();
        if tokio::time::timeout(wait, done.wait_for(|done| *done))
            .await
            .is_err()
        {
            tracing::warn!(
                ?wait,
                "the runs in progress could not all be reported before stopping"
            );
        }
    }

    fn finished(&self) {
        self.done.send_replace(true);
    }
}

/// What an assignment's task needs from the node.
#[derive(Clone)]
struct Context {
    config: NodeConfig,
    store: Option<Arc<Store>>,
    updates: mpsc::UnboundedSender<RunUpdate>,
    pull_memory: Arc<Semaphore>,
    transport: Transport,
    commands: Arc<CommandPolicy>,
    permits: PullPermits,
    upload_limit: Option<Arc<RateLimit>>,
    ingest_limit: Option<Arc<RateLimit>>,
    /// Answers to `DeleteSnapshots` and `GcLease`, sent like run updates.
    replies: mpsc::UnboundedSender<node_message::Kind>,
    /// The lease of the GC running now (0: none).
    gc_running: Arc<AtomicU64>,
    /// This storage node's scrub, when it runs one.
    scrub: Option<crate::scrub::Scrub>,
    /// The scripts the runs are running.
    scripts: Arc<Scripts>,
    metrics: crate::metrics::NodeMetrics,
    /// How each push this agent runs spends `backup_memory_bytes`.
    backup_plan: SendPlan,
    /// What each run was last reported doing (`pre`, `copying`, ...), for
    /// the reason given when the node stops during it.
    stages: Arc<Mutex<HashMap<String, &'static str>>>,
}

/// Removes a run's entry from [`Context::stages`] when dropped.
struct ForgetStage {
    stages: Arc<Mutex<HashMap<String, &'static str>>>,
    run_id: String,
}

impl Drop for ForgetStage {
    fn drop(&mut self) {
        self.stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.run_id);
    }
}

impl Context {
    fn send(&self, update: RunUpdate) {
        if update.dest.is_empty()
            && let Some(stage) = stage_name(update.state())
        {
            self.stages
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(update.run_id.clone(), stage);
        }
        // The receiver lives as long as the session loop; if it is gone the
        // node is shutting down and there is nobody left to tell.
        let _ = self.updates.send(update);
    }

    fn state(&self, run_id: &str, state: RunState, message: impl Into<String>) {
        self.send(RunUpdate {
            run_id: run_id.to_owned(),
            state: state as i32,
            message: message.into(),
            ..Default::default()
        });
    }

    fn dest(&self, run_id: &str, dest: &str, state: CopyState, message: impl Into<String>) {
        self.send(RunUpdate {
            run_id: run_id.to_owned(),
            dest: dest.to_owned(),
            dest_state: state as i32,
            message: message.into(),
            ..Default::default()
        });
    }
}

fn node_info(
    config: &NodeConfig,
    store: Option<&Store>,
    active_runs: Vec<String>,
    insecure_plaintext: bool,
) -> NodeInfo {
    let (capacity_bytes, free_bytes) = store
        .and_then(|store| crate::disk::space(store.dir()).ok())
        .unwrap_or((0, 0));
    NodeInfo {
        id: config.node_id.clone(),
        address: config.advertise.clone(),
        labels: config.labels.clone(),
        capacity_bytes,
        free_bytes,
        roles: config
            .roles
            .iter()
            .map(|role| match role {
                Role::Storage => NodeRole::Storage as i32,
                Role::Agent => NodeRole::Agent as i32,
            })
            .collect(),
        hostname: config.hostname.clone(),
        active_runs,
        insecure_plaintext,
        target_free_bytes: if config.roles.contains(&Role::Storage) {
            config.target_free_bytes
        } else {
            0
        },
    }
}

/// How often the store's counters (chunks, stored bytes) are recomputed for
/// heartbeats: counting scans the index (not the trees, which `stats` also
/// walks), too slow to do every few seconds on a large store. A commit or a
/// deletion has them recomputed within [`COUNTERS_CHANGED_CHECK`], so that
/// quotas see it.
const COUNTERS_REFRESH: Duration = Duration::from_secs(60);

/// How often the store is asked whether a snapshot was committed or deleted.
const COUNTERS_CHANGED_CHECK: Duration = Duration::from_secs(1);

/// The most jobs a heartbeat reports the usage of (the largest first).
const MAX_JOB_USAGE: usize = 10_000;

/// What heartbeats say of the store, refreshed in the background.
#[derive(Clone, Debug, Default)]
struct Counted {
    chunks: u64,
    stored_bytes: u64,
    /// Hosts with a quota here.
    quota_usage: Vec<HostUsage>,
    /// Every job (the coordinator holds jobs to their quotas with it).
    job_usage: Vec<JobUsage>,
}

type StoreCounters = Arc<Mutex<Counted>>;

/// What each job's snapshots in `store` take: the sum of their
/// `stored_bytes`, the largest first, at most [`MAX_JOB_USAGE`].
fn job_usage(store: &Store) -> Result<Vec<JobUsage>, fabric_chunkstore::StoreError> {
    let mut by_job: HashMap<String, u64> = HashMap::new();
    for snapshot in store.list_snapshots()? {
        let stored = snapshot
            .stats
            .as_ref()
            .map_or(0, |stats| stats.stored_bytes);
        let sum = by_job.entry(snapshot.job).or_default();
        *sum = sum.saturating_add(stored);
    }
    let mut usage: Vec<JobUsage> = by_job
        .into_iter()
        .map(|(job, stored_bytes)| JobUsage { job, stored_bytes })
        .collect();
    usage.sort_by(|a, b| b.stored_bytes.cmp(&a.stored_bytes).then(a.job.cmp(&b.job)));
    usage.truncate(MAX_JOB_USAGE);
    Ok(usage)
}

/// Keep `counters` up to date until `stop` turns true.
async fn refresh_counters(
    store: Arc<Store>,
    quotas: Arc<crate::quota::HostQuotas>,
    counters: StoreCounters,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(COUNTERS_CHANGED_CHECK);
    let mut counted_at: Option<(Instant, u64)> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let changes = store.catalog_changes();
        let fresh =
            counted_at.is_some_and(|(at, seen)| seen == changes && at.elapsed() < COUNTERS_REFRESH);
        if fresh {
            continue;
        }
        counted_at = Some((Instant::now(), changes));
        let counting = store.clone();
        let quotas = quotas.clone();
        let counted = tokio::task::spawn_blocking(move || {
            let counts = counting.index_counts()?;
            let usage = if quotas.is_empty() {
                Vec::new()
            } else {
                crate::quota::usage(&counting, &quotas)?
                    .into_iter()
                    .filter_map(|(host, used_bytes, limit)| {
                        limit.map(|quota_bytes| HostUsage {
                            host,
                            used_bytes,
                            quota_bytes,
                        })
                    })
                    .collect()
            };
            Ok::<_, fabric_chunkstore::StoreError>(Counted {
                chunks: counts.chunks,
                stored_bytes: counts.stored_bytes,
                quota_usage: usage,
                job_usage: job_usage(&counting)?,
            })
        })
        .await;
        if let Ok(Ok(counts)) = counted {
            *counters.lock().unwrap_or_else(|p| p.into_inner()) = counts;
        }
    }
}

/// A heartbeat: free space now, counters as last refreshed, the node's
/// health as the free-space watcher last set it.
async fn heartbeat(
    store: Option<Arc<Store>>,
    counters: &StoreCounters,
    gc_running: &AtomicU64,
    health: &SharedHealth,
) -> Heartbeat {
    let Some(store) = store else {
        return Heartbeat::default();
    };
    let Counted {
        chunks,
        stored_bytes,
        quota_usage,
        job_usage,
    } = counters.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let free_bytes = tokio::task::spawn_blocking(move || crate::disk::space(store.dir()))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|(_, free)| free);
    // What the storage service refuses uploads for (see
    // `server::watch_health`), so that nothing is planned here.
    let health = health.get();
    Heartbeat {
        free_bytes: free_bytes.unwrap_or(0),
        chunks,
        stored_bytes,
        quota_usage,
        job_usage,
        gc_lease_id: gc_running.load(Ordering::SeqCst),
        refuses_writes: health.summary(),
        scrub: None,
        health: Some(health.to_proto()),
    }
}

/// What a session needs besides the config and the store.
#[derive(Clone, Debug)]
pub struct SessionParts {
    /// The coordinators (`coordinator`), of which the session follows the
    /// leader.
    pub coordinators: CoordinatorAddresses,
    /// How to dial the coordinator and other nodes.
    pub transport: Transport,
    /// What commands this host lets jobs run.
    pub commands: Arc<CommandPolicy>,
    /// The pull permits the coordinator grants, shared with the source
    /// service that checks them.
    pub permits: PullPermits,
    /// This agent's upload limit (node.toml `upload_limit_bytes_per_s`).
    pub upload_limit: Option<Arc<RateLimit>>,
    /// This node's ingest limit (node.toml `ingest_limit_bytes_per_s`).
    pub ingest_limit: Option<Arc<RateLimit>>,
    /// This storage node's scrub, when it runs one.
    pub scrub: Option<crate::scrub::Scrub>,
    /// How the node asks the session to end its runs when it stops.
    pub stopping: Stopping,
    /// The node's metrics.
    pub metrics: crate::metrics::NodeMetrics,
    /// Whether the node takes writes and why not, for heartbeats.
    pub health: SharedHealth,
    /// How each push spends the agent's backup memory budget (planned, and
    /// a budget too small refused, when the node started).
    pub backup_plan: SendPlan,
}

/// Keep a session with the coordinator until `stop` turns true.
pub async fn run_session(
    config: NodeConfig,
    store: Option<Arc<Store>>,
    parts: SessionParts,
    mut stop: watch::Receiver<bool>,
) {
    let (updates_tx, mut updates_rx) = mpsc::unbounded_channel::<RunUpdate>();
    let (replies_tx, mut replies_rx) = mpsc::unbounded_channel::<node_message::Kind>();
    let active = Arc::new(Mutex::new(ActiveRuns::default()));
    let insecure = !parts.transport.is_tls();
    // Only agents run scripts; their ledger also ends what a killed
    // predecessor left running.
    let scripts = if config.has_role(crate::config::Role::Agent) {
        Scripts::for_node(&config.data_dir).await
    } else {
        Scripts::default()
    };
    let context = Context {
        config: config.clone(),
        store: store.clone(),
        updates: updates_tx,
        pull_memory: Arc::new(Semaphore::new(64 * 1024)),
        transport: parts.transport,
        commands: parts.commands,
        permits: parts.permits,
        upload_limit: parts.upload_limit,
        ingest_limit: parts.ingest_limit,
        replies: replies_tx,
        gc_running: Arc::new(AtomicU64::new(0)),
        scrub: parts.scrub,
        scripts: Arc::new(scripts),
        stages: Arc::default(),
        metrics: parts.metrics,
        backup_plan: parts.backup_plan,
    };
    let stopping = parts.stopping;
    let health = parts.health;
    let mut asked = stopping.asked.subscribe();
    let mut pending: VecDeque<NodeMessage> = VecDeque::new();
    let mut held = crate::held::HeldReport::default();
    // Between rounds through the coordinators: 200 ms doubling to 5 s.
    let mut search = LeaderSearch::new(
        parts.coordinators,
        Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
    );
    let counters = StoreCounters::default();
    if let Some(store) = store.clone() {
        tokio::spawn(refresh_counters(
            store,
            Arc::new(config.host_quotas()),
            counters.clone(),
            stop.clone(),
        ));
    }

    loop {
        if *stop.borrow() {
            return;
        }
        let coordinator = search.current().clone();
        // Why this coordinator is left, and the leader it named, if any.
        let mut failure: Option<String> = None;
        let mut hint: Option<String> = None;
        match connect(&context, &coordinator, store.as_deref(), &active).await {
            Err(refusal) => {
                failure = Some(refusal.reason);
                hint = refusal.leader;
            }
            Ok((mut client, interval)) => {
                search.succeeded();
                let active_runs = lock(&active).runs.keys().cloned().collect();
                let (out_tx, out_rx) = mpsc::channel::<NodeMessage>(64);
                let hello = NodeMessage {
                    kind: Some(node_message::Kind::Hello(node_info(
                        &config,
                        store.as_deref(),
                        active_runs,
                        insecure,
                    ))),
                };
                if out_tx.send(hello).await.is_ok() {
                    match client.session(ReceiverStream::new(out_rx)).await {
                        Err(status) => {
                            tracing::warn!(%coordinator, error = %describe_status(&status), "the coordinator refused the session");
                            hint = leader_hint(&status);
                        }
                        Ok(response) => {
                            tracing::info!(%coordinator, "session with the coordinator open");
                            let mut incoming = response.into_inner();
                            let mut ticker = tokio::time::interval(interval);
                            held.new_session();
                            'session: loop {
                                while let Some(message) = pending.pop_front() {
                                    if out_tx.send(message.clone()).await.is_err() {
                                        pending.push_front(message);
                                        break 'session;
                                    }
                                }
                                tokio::select! {
                                    _ = stop.changed() => return,
                                    _ = asked.changed() => {
                                        let cause = asked.borrow().clone().unwrap_or_default();
                                        let last = end_runs(&context, &active, &cause).await;
                                        // What the runs said before they were ended goes first.
                                        while let Ok(update) = updates_rx.try_recv() {
                                            pending.push_back(NodeMessage { kind: Some(node_message::Kind::Update(update)) });
                                        }
                                        pending.extend(last.into_iter().map(|update| NodeMessage { kind: Some(node_message::Kind::Update(update)) }));
                                        close_session(out_tx, incoming, pending).await;
                                        stopping.finished();
                                        return;
                                    }
                                    _ = ticker.tick() => {
                                        let mut beat = heartbeat(store.clone(), &counters, &context.gc_running, &health).await;
                                        beat.scrub = context.scrub.as_ref().map(crate::scrub::Scrub::progress);
                                        pending.push_back(NodeMessage { kind: Some(node_message::Kind::Heartbeat(beat)) });
                                        if let Some(store) = store.as_ref()
                                            && let Some(list) = held.next(store).await
                                        {
                                            pending.push_back(NodeMessage { kind: Some(node_message::Kind::Held(list)) });
                                        }
                                    }
                                    update = updates_rx.recv() => {
                                        let Some(update) = update else { return };
                                        pending.push_back(NodeMessage { kind: Some(node_message::Kind::Update(update)) });
                                        trim(&mut pending);
                                    }
                                    reply = replies_rx.recv() => {
                                        let Some(reply) = reply else { return };
                                        pending.push_back(NodeMessage { kind: Some(reply) });
                                    }
                                    message = incoming.next() => match message {
                                        Some(Ok(message)) => handle(&context, &active, message.kind),
                                        Some(Err(status)) => {
                                            tracing::warn!(%coordinator, error = %describe_status(&status), "session with the coordinator broke");
                                            hint = leader_hint(&status);
                                            break 'session;
                                        }
                                        None => {
                                            tracing::warn!(%coordinator, "the coordinator closed the session");
                                            break 'session;
                                        }
                                    },
                                }
                            }
                        }
                    }
                }
            }
        }
        // Heartbeats of a broken session are stale; updates are kept.
        pending.retain(|m| {
            matches!(
                m.kind,
                Some(
                    node_message::Kind::Update(_)
                        | node_message::Kind::Deleted(_)
                        | node_message::Kind::GcDone(_)
                )
            )
        });
        let step = search.failed(hint.as_deref());
        if let Some(failure) = failure {
            tracing::warn!(%coordinator, error = %failure, next = %search.current(), retry_in = ?step.wait, "cannot register with the coordinator");
        }
        if step.followed_hint {
            tracing::info!(%coordinator, leader = %search.current(), "the coordinator does not lead: following it to the leader it names");
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = asked.changed() => {
                // No session to tell: the runs are ended all the same.
                let cause = asked.borrow().clone().unwrap_or_default();
                let last = end_runs(&context, &active, &cause).await;
                if !last.is_empty() {
                    tracing::warn!(runs = last.len(), "stopping without a session: the coordinator is not told that the runs in progress ended");
                }
                stopping.finished();
                return;
            }
            _ = tokio::time::sleep(step.wait) => {}
        }
    }
}

/// Send `pending`, then end the session from this side and wait (at most
/// [`CLOSE_WAIT`]) for the coordinator to end its side: it ends it only
/// after it has applied every message this side sent.
async fn close_session(
    out: mpsc::Sender<NodeMessage>,
    mut incoming: tonic::Streaming<fabric_proto::v1::CoordinatorMessage>,
    pending: VecDeque<NodeMessage>,
) {
    let closed = async move {
        for message in pending {
            if out.send(message).await.is_err() {
                return;
            }
        }
        drop(out);
        // Whatever the coordinator still sends (a new assignment) is not
        // taken up by a node that is stopping.
        while let Some(Ok(_)) = incoming.next().await {}
    };
    if tokio::time::timeout(CLOSE_WAIT, closed).await.is_err() {
        tracing::warn!(wait = ?CLOSE_WAIT, "the coordinator did not close the session in time");
    }
}

/// The node is stopping (`cause`: the signal, or empty): end every run in
/// progress and return what to report of each. Scripts get SIGTERM, then
/// SIGKILL after [`SCRIPT_GRACE`]; then the runs' tasks are stopped.
async fn end_runs(context: &Context, active: &Mutex<ActiveRuns>, cause: &str) -> Vec<RunUpdate> {
    let runs: Vec<(String, ActiveRun)> = {
        let mut active = lock(active);
        active.stopping = true;
        active.runs.drain().collect()
    };
    // What each run is doing, read before its script is ended.
    let doing: Vec<String> = runs
        .iter()
        .map(|(run_id, _)| {
            context.scripts.doing(run_id).unwrap_or_else(|| {
                context
                    .stages
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(run_id)
                    .copied()
                    .unwrap_or("the run")
                    .to_owned()
            })
        })
        .collect();
    let stopped = context.scripts.stop(SCRIPT_GRACE).await;
    if stopped.terminated > 0 {
        tracing::info!(
            scripts = stopped.terminated,
            killed_after_grace = stopped.killed,
            "scripts ended: the node is stopping"
        );
    }
    let by = if cause.is_empty() {
        String::new()
    } else {
        format!(" ({cause})")
    };
    runs.into_iter()
        .zip(doing)
        .map(|((run_id, run), doing)| {
            run.task.abort();
            context.permits.forget(&run_id);
            tracing::warn!(run = %run_id, during = %doing, "run ended: the node is stopping");
            if run.role == AssignmentRole::Pull {
                RunUpdate {
                    run_id,
                    dest: context.config.node_id.clone(),
                    dest_state: CopyState::Failed as i32,
                    message: format!(
                        "node {} was stopped{by} during the pull",
                        context.config.node_id
                    ),
                    ..Default::default()
                }
            } else {
                RunUpdate {
                    run_id,
                    state: RunState::Failed as i32,
                    message: format!(
                        "the agent on {} was stopped{by} during {doing}",
                        context.config.hostname
                    ),
                    ..Default::default()
                }
            }
        })
        .collect()
}

/// How a run's state reads in the reason a stopping node gives.
fn stage_name(state: RunState) -> Option<&'static str> {
    match state {
        RunState::Pre => Some("pre"),
        RunState::Copying => Some("copying"),
        RunState::Post => Some("post"),
        _ => None,
    }
}

fn trim(pending: &mut VecDeque<NodeMessage>) {
    while pending.len() > MAX_PENDING_UPDATES {
        let progress_only = pending.iter().position(|m| {
            matches!(&m.kind, Some(node_message::Kind::Update(u)) if u.progress.is_some() && u.dest_state == 0 && u.state == 0)
        });
        match progress_only {
            Some(index) => {
                pending.remove(index);
            }
            None => {
                pending.pop_front();
            }
        }
    }
}

fn lock(active: &Mutex<ActiveRuns>) -> std::sync::MutexGuard<'_, ActiveRuns> {
    // A panic while holding this lock leaves only a map of handles behind,
    // which stays consistent; keep going with it.
    active
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Why a coordinator did not take the node's registration, and the leader
/// it named (a coordinator that does not lead).
struct Refusal {
    reason: String,
    leader: Option<String>,
}

/// Dial `coordinator` and register there.
async fn connect(
    context: &Context,
    coordinator: &CoordinatorAddress,
    store: Option<&Store>,
    active: &Mutex<ActiveRuns>,
) -> Result<(CoordinatorClient<tonic::transport::Channel>, Duration), Refusal> {
    let config = &context.config;
    let peer = crate::client::Peer::coordinator(coordinator.as_str());
    let channel = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        crate::client::channel(&peer, &context.transport),
    )
    .await
    {
        Ok(Ok(channel)) => channel,
        Ok(Err(err)) => {
            return Err(Refusal {
                reason: err.to_string(),
                leader: None,
            });
        }
        Err(_) => {
            return Err(Refusal {
                reason: format!(
                    "cannot reach {coordinator}: no connection within {}s",
                    CONNECT_TIMEOUT.as_secs()
                ),
                leader: None,
            });
        }
    };
    let mut client = CoordinatorClient::new(channel);
    let active_runs = lock(active).runs.keys().cloned().collect();
    let insecure = !context.transport.is_tls();
    let response = client
        .register_node(node_info(config, store, active_runs, insecure))
        .await
        .map_err(|status| Refusal {
            reason: describe_status(&status),
            leader: leader_hint(&status),
        })?
        .into_inner();
    let interval = Duration::from_millis(response.heartbeat_interval_ms.clamp(50, 60_000));
    Ok((client, interval))
}

fn handle(
    context: &Context,
    active: &Arc<Mutex<ActiveRuns>>,
    message: Option<coordinator_message::Kind>,
) {
    match message {
        Some(coordinator_message::Kind::Assignment(assignment)) => {
            let run_id = assignment.run_id.clone();
            if lock(active).runs.contains_key(&run_id) {
                tracing::info!(run = %run_id, "assignment already in progress");
                return;
            }
            let (pull_done_tx, pull_done_rx) = oneshot::channel();
            let task_context = context.clone();
            let task_active = active.clone();
            let task_run = run_id.clone();
            let span = tracing::info_span!(
                "run",
                run = %run_id,
                job = %assignment.job.as_ref().map(|job| job.name.as_str()).unwrap_or_default(),
                node = %context.config.node_id,
            );
            let role = assignment.role();
            let task = tokio::spawn(
                async move {
                    // Dropped when the run ends or its task is aborted (a
                    // cancel): either way its stage is forgotten.
                    let _stage = ForgetStage {
                        stages: task_context.stages.clone(),
                        run_id: task_run.clone(),
                    };
                    let last = execute(&task_context, assignment, pull_done_rx).await;
                    {
                        let mut active = lock(&task_active);
                        if active.stopping {
                            // `end_runs` reports this run.
                            return;
                        }
                        active.runs.remove(&task_run);
                    }
                    task_context.send(last);
                }
                .instrument(span),
            );
            let mut active = lock(active);
            if active.stopping {
                // Taken after the node began to stop: not run.
                task.abort();
                return;
            }
            active.runs.insert(
                run_id,
                ActiveRun {
                    task: task.abort_handle(),
                    pull_done: Some(pull_done_tx),
                    role,
                },
            );
        }
        Some(coordinator_message::Kind::Cancel(cancel)) => {
            context.permits.forget(&cancel.run_id);
            if let Some(run) = lock(active).runs.remove(&cancel.run_id) {
                run.task.abort();
                tracing::info!(run = %cancel.run_id, "run cancelled");
                context.state(
                    &cancel.run_id,
                    RunState::Cancelled,
                    "cancelled by the operator",
                );
            }
        }
        Some(coordinator_message::Kind::PullPermit(permit)) => {
            context.permits.grant(permit);
        }
        Some(coordinator_message::Kind::DeleteSnapshots(delete)) => {
            tokio::spawn(delete_snapshots(context.clone(), delete.ids));
        }
        Some(coordinator_message::Kind::GcLease(lease)) => {
            tokio::spawn(collect_garbage(context.clone(), lease));
        }
        Some(coordinator_message::Kind::Replicate(replicate)) => {
            tokio::spawn(replicate_here(context.clone(), replicate));
        }
        Some(coordinator_message::Kind::VerifySnapshot(ask)) => {
            tokio::spawn(verify_snapshot(context.clone(), ask));
        }
        Some(coordinator_message::Kind::RepairChunks(ask)) => {
            if let (Some(store), Some(scrub)) = (context.store.clone(), context.scrub.clone()) {
                let context = context.clone();
                tokio::spawn(async move {
                    let done =
                        crate::scrub::repair(store, scrub, context.transport.clone(), ask).await;
                    let _ = context.replies.send(node_message::Kind::RepairDone(done));
                });
            }
        }
        Some(coordinator_message::Kind::PullDone(done)) => {
            let waiter = lock(active)
                .runs
                .get_mut(&done.run_id)
                .and_then(|run| run.pull_done.take());
            if let Some(waiter) = waiter {
                let _ = waiter.send((done.ok, done.message));
            }
        }
        None => {}
    }
}

/// Retention or pruning removed `ids`: delete each from the store (one inside its WORM
/// window is refused, as it is to anyone) and say what happened.
async fn delete_snapshots(context: Context, ids: Vec<String>) {
    let Some(store) = context.store.clone() else {
        return;
    };
    let deleted = tokio::task::spawn_blocking(move || {
        let mut answer = SnapshotsDeleted::default();
        // At most this many per message: a bounded amount of work per ask.
        for id in ids.into_iter().take(10_000) {
            match store.delete_snapshot(&id) {
                Ok(_) | Err(fabric_chunkstore::StoreError::SnapshotNotFound { .. }) => {
                    tracing::info!(snapshot = %id, "deleted at the coordinator's request (retention or pruning)");
                    answer.deleted.push(id);
                }
                Err(err) => {
                    tracing::warn!(snapshot = %id, error = %err, "not deleted at the coordinator's request");
                    answer.refused.push(format!("{id}: {err}"));
                }
            }
        }
        answer
    })
    .await;
    if let Ok(answer) = deleted {
        let _ = context.replies.send(node_message::Kind::Deleted(answer));
    }
}

/// The coordinator granted a GC lease: collect (see [`crate::gc_lease`])
/// and say how it went.
async fn collect_garbage(context: Context, lease: GcLease) {
    let lease_id = lease.lease_id;
    let done = match context.store.clone() {
        None => GcDone {
            lease_id,
            report: None,
            error: format!("GC lease {lease_id}: this node has no store"),
        },
        Some(store) => {
            let own_grace = Duration::from_secs(context.config.gc_grace_s);
            let running = context.gc_running.clone();
            let gc = context.metrics.gc_started();
            let done = tokio::task::spawn_blocking(move || {
                crate::gc_lease::collect_under_lease(&store, &lease, own_grace, &running, now_ms())
            })
            .await
            .unwrap_or_else(|err| GcDone {
                lease_id,
                report: None,
                error: format!("GC lease {lease_id}: the collection stopped: {err}"),
            });
            gc.finished(
                done.error.is_empty(),
                done.report.as_ref().map_or(0, |report| report.freed_bytes),
            );
            done
        }
    };
    let _ = context.replies.send(node_message::Kind::GcDone(done));
}

/// The coordinator asks for a copy of a snapshot here (re-replication):
/// ask the holders, in order, to copy it to this node, and say how it went.
/// A node without a store refuses.
async fn replicate_here(context: Context, replicate: Replicate) {
    let Replicate {
        replication_id,
        snapshot_id,
        holders,
        bandwidth_limit_bytes_per_s,
    } = replicate;
    let own = CopyTarget {
        node: context.config.node_id.clone(),
        ..Default::default()
    };
    let result = if context.store.is_none() {
        Err(format!(
            "node {} has no store to copy snapshot {snapshot_id} into",
            own.node
        ))
    } else if holders.is_empty() {
        Err(format!("no node holding snapshot {snapshot_id} was named"))
    } else {
        tracing::info!(snapshot = %snapshot_id, holders = %holder_names(&holders), "re-replication: copying a snapshot here");
        run_copies::copy_from_holders(
            &holders,
            &snapshot_id,
            &own,
            &context.transport,
            bandwidth_limit_bytes_per_s,
            &|_| {},
        )
        .await
    };
    let answer = match result {
        Ok(committed) => Replicated {
            replication_id,
            snapshot_id,
            committed: Some(committed),
            error: String::new(),
        },
        Err(error) => {
            tracing::warn!(snapshot = %snapshot_id, %error, "re-replication failed");
            Replicated {
                replication_id,
                snapshot_id,
                committed: None,
                error,
            }
        }
    };
    let _ = context.replies.send(node_message::Kind::Replicated(answer));
}

/// Verify after backup: read the chunks of a snapshot just committed here
/// back (all, or the asked fraction at random) and say what was found.
async fn verify_snapshot(context: Context, ask: VerifySnapshot) {
    let VerifySnapshot {
        run_id,
        snapshot_id,
        fraction,
    } = ask;
    let mut answer = SnapshotVerified {
        run_id,
        snapshot_id: snapshot_id.clone(),
        ..Default::default()
    };
    match context.store.clone() {
        None => answer.error = "this node has no store".to_owned(),
        Some(_) if !(fraction > 0.0 && fraction <= 1.0) => {
            answer.error = format!("{fraction} is not a fraction of chunks to read");
        }
        Some(store) => {
            let options = fabric_chunkstore::VerifyOptions {
                sample: (fraction < 1.0).then_some(fraction),
                snapshot: Some(snapshot_id.clone()),
            };
            match tokio::task::spawn_blocking(move || store.verify(&options)).await {
                Ok(Ok(report)) => {
                    answer.chunks_checked = report.chunks_checked;
                    answer.problems = report
                        .problems
                        .iter()
                        .take(20)
                        .map(|problem| format!("chunk {}: {}", problem.chunk, problem.detail))
                        .collect();
                }
                Ok(Err(err)) => answer.error = err.to_string(),
                Err(err) => answer.error = format!("the check stopped: {err}"),
            }
        }
    }
    if answer.problems.is_empty() && answer.error.is_empty() {
        tracing::info!(snapshot = %snapshot_id, chunks = answer.chunks_checked, "verified after backup");
    } else {
        tracing::warn!(snapshot = %snapshot_id, problems = answer.problems.len(), error = %answer.error, "verify after backup found problems");
    }
    let _ = context
        .replies
        .send(node_message::Kind::SnapshotVerified(answer));
}

/// Run one assignment to its end, reporting every step but the last, which
/// it returns: the caller forgets the run before sending it, so a
/// coordinator that answers the end with a new attempt finds the node free.
async fn execute(
    context: &Context,
    assignment: Assignment,
    pull_done: oneshot::Receiver<(bool, String)>,
) -> RunUpdate {
    let run_id = assignment.run_id.clone();
    let ended = |state: RunState, message: String| RunUpdate {
        run_id: run_id.clone(),
        state: state as i32,
        message,
        ..Default::default()
    };
    let result = match assignment.role() {
        AssignmentRole::Push => execute_push(context, assignment).await,
        AssignmentRole::Passive => execute_passive(context, assignment, pull_done).await,
        AssignmentRole::Pull => return execute_pull(context, assignment).await,
        AssignmentRole::Expand => match execute_expand(context, &assignment).await {
            Ok(instances) => {
                return RunUpdate {
                    instances,
                    ..ended(RunState::Done, String::new())
                };
            }
            Err(reason) => Err(reason),
        },
        AssignmentRole::Unspecified => Err("an assignment without a role".to_owned()),
    };
    match result {
        Ok(()) => ended(RunState::Done, String::new()),
        Err(reason) => {
            tracing::warn!(%reason, "run failed");
            ended(RunState::Failed, reason)
        }
    }
}

/// Run `command`, the job's `what`, if this host's `allow_commands` or
/// hooks allow it (refused with the reason otherwise), sending each output
/// line as a run message.
async fn run_script(
    context: &Context,
    run_id: &str,
    what: &str,
    command: &str,
) -> Result<String, String> {
    let approved = context.commands.approve(what, command)?;
    let process = match &approved {
        Approved::Shell(line) => {
            let mut process = tokio::process::Command::new("sh");
            process.arg("-c").arg(line);
            process
        }
        Approved::Program(words) => {
            let (program, arguments) = words
                .split_first()
                .ok_or_else(|| format!("the {what} command is empty"))?;
            let mut process = tokio::process::Command::new(program);
            process.args(arguments);
            process
        }
    };
    let command = approved.describe();
    let output = context
        .scripts
        .output(process, &command, run_id, what)
        .await
        .map_err(|err| err.to_string())?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    for line in stdout
        .lines()
        .chain(String::from_utf8_lossy(&output.stderr).lines())
    {
        context.send(RunUpdate {
            run_id: run_id.to_owned(),
            message: format!("{what}: {line}"),
            ..Default::default()
        });
    }
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "the {what} command {command:?} failed ({})",
            output.status
        ))
    }
}

/// Evaluate a `!command` value on this client; other values are as given.
async fn evaluate(
    context: &Context,
    run_id: &str,
    key: &str,
    value: &str,
) -> Result<String, String> {
    match value.strip_prefix('!') {
        Some(command) => Ok(run_script(context, run_id, key, command)
            .await?
            .trim()
            .to_owned()),
        None => Ok(value.to_owned()),
    }
}

/// What `value` prints when it is a `!command`; `None` when it is not.
async fn evaluate_command(
    context: &Context,
    run_id: &str,
    key: &str,
    value: &str,
) -> Result<Option<String>, String> {
    if value.starts_with('!') {
        evaluate(context, run_id, key, value).await.map(Some)
    } else {
        Ok(None)
    }
}

/// The snapshot record of an assignment, with `!command` values evaluated.
async fn snapshot_template(context: &Context, assignment: &Assignment) -> Result<Snapshot, String> {
    let job = assignment.job.clone().unwrap_or_default();
    let run_id = &assignment.run_id;
    let evaluated = Evaluated {
        // Only `!command` values: the coordinator put static ones in the record.
        master_host: evaluate_command(context, run_id, "master_host", &job.master_host).await?,
        master_instance: evaluate_command(context, run_id, "master_instance", &job.master_instance)
            .await?,
        data_age: if job.data_age.is_empty() {
            None
        } else {
            Some(evaluate(context, run_id, "data_age", &job.data_age).await?)
        },
    };
    complete_template(
        &job.name,
        assignment.snapshot.clone().unwrap_or_default(),
        &context.config.hostname,
        evaluated,
    )
}

/// A job's dynamic values as evaluated on the client (`None`: not a
/// command, or not set).
#[derive(Debug, Default)]
struct Evaluated {
    master_host: Option<String>,
    master_instance: Option<String>,
    data_age: Option<String>,
}

/// `planned` (the coordinator's record) completed on the client with the
/// `evaluated` values of job `job_name`, and the host and start time when
/// the coordinator left them out.
///
/// The coordinator blanks `!command` values in the record it plans, since
/// only the client may run them; the name, which includes `master_host`
/// and `master_instance`, is made again once they are known.
fn complete_template(
    job_name: &str,
    mut snapshot: Snapshot,
    hostname: &str,
    evaluated: Evaluated,
) -> Result<Snapshot, String> {
    let mut renamed = false;
    if let Some(master_host) = evaluated.master_host {
        snapshot.master_host = master_host;
        renamed = true;
    }
    if let Some(master_instance) = evaluated.master_instance {
        snapshot.master_instance = master_instance;
        renamed = true;
    }
    if let Some(age) = evaluated.data_age {
        snapshot.data_age = age.parse().map_err(|_| {
            format!("data_age of job {job_name} is not a number of seconds: {age:?}")
        })?;
    }
    if snapshot.host.is_empty() {
        snapshot.host = hostname.to_owned();
        renamed = true;
    }
    if snapshot.start_time_ms == 0 {
        snapshot.start_time_ms = now_ms();
        renamed = true;
    }
    // A name planned without these values is not the one B1000's scheme
    // gives the snapshot; an empty one is the store's to make at commit.
    if renamed && !snapshot.name.is_empty() {
        snapshot.name = fabric_proto::naming::snapshot_name(&snapshot);
    }
    Ok(snapshot)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn backup_options(job: &fabric_proto::v1::JobSpec) -> BackupOptions {
    BackupOptions {
        includes: job.include.iter().map(Into::into).collect(),
        excludes: job.exclude.clone(),
        one_file_system: job.one_file_system,
        chunk_params: ChunkParams::default(),
        // The backup's memory plan sets both (`send_backup`).
        threads: 0,
        hash_ahead_bytes: 0,
    }
}

async fn execute_push(context: &Context, assignment: Assignment) -> Result<(), String> {
    let job = assignment.job.clone().unwrap_or_default();
    let run_id = assignment.run_id.clone();
    if !job.pre.is_empty() {
        context.state(&run_id, RunState::Pre, "");
        run_script(context, &run_id, "pre", &job.pre).await?;
    }
    context.state(&run_id, RunState::Copying, "");
    let template = snapshot_template(context, &assignment).await?;
    let copies = Arc::new(SnapshotCopies::new(
        template,
        assignment.holders.clone(),
        assignment.attempt <= 1,
    ));
    let spares = Arc::new(Mutex::new(VecDeque::from(assignment.spares.clone())));
    let mut background = Vec::new();
    let mut failures = Vec::new();
    for target in assignment.targets.clone() {
        let copy = copy_with_retries(
            context.clone(),
            run_id.clone(),
            job.clone(),
            copies.clone(),
            target.clone(),
            spares.clone(),
            assignment.quota_left_bytes,
        );
        if target.background {
            background.push(tokio::spawn(copy));
        } else if let Err(reason) = copy.await {
            failures.push(reason);
        }
    }
    for copy in background {
        match copy.await {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => failures.push(reason),
            Err(err) => failures.push(format!("a background copy failed: {err}")),
        }
    }
    if !job.post.is_empty() {
        context.state(&run_id, RunState::Post, "");
        run_script(context, &run_id, "post", &job.post).await?;
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

/// Copy to `target`, retrying per the job; when it fails for good, go on
/// with the next spare node, if any.
async fn copy_with_retries(
    context: Context,
    run_id: String,
    job: fabric_proto::v1::JobSpec,
    copies: Arc<SnapshotCopies>,
    mut target: CopyTarget,
    spares: Arc<Mutex<VecDeque<CopyTarget>>>,
    quota_left: u64,
) -> Result<(), String> {
    let min_sleep = Duration::from_millis(job.copy_retry_min_sleep_ms);
    loop {
        let mut attempt = 0;
        let reason = loop {
            attempt += 1;
            context.dest(&run_id, &target.node, CopyState::Running, "");
            match copy_once(&context, &run_id, &job, &copies, &target, quota_left).await {
                Ok(snapshot) => {
                    context.send(RunUpdate {
                        run_id: run_id.clone(),
                        dest: target.node.clone(),
                        dest_state: CopyState::Done as i32,
                        snapshot: Some(snapshot),
                        ..Default::default()
                    });
                    return Ok(());
                }
                Err(failure) if failure.source_fault => {
                    // Not the node's fault, and the same on every node.
                    context.dest(
                        &run_id,
                        &target.node,
                        CopyState::Failed,
                        failure.reason.clone(),
                    );
                    return Err(failure.reason);
                }
                Err(failure) if attempt <= job.copy_retries => {
                    context.dest(
                        &run_id,
                        &target.node,
                        CopyState::Retrying,
                        format!(
                            "attempt {attempt} failed, retrying in {}: {}",
                            humantime::format_duration(min_sleep),
                            failure.reason
                        ),
                    );
                    tokio::time::sleep(min_sleep).await;
                }
                Err(failure) => break failure.reason,
            }
        };
        let reason = format!("copy to {} failed: {reason}", target.node);
        context.dest(&run_id, &target.node, CopyState::Failed, reason.clone());
        let spare = spares
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop_front();
        match spare {
            Some(spare) => {
                tracing::info!(failed = %target.node, spare = %spare.node, "trying a spare node");
                target = spare;
            }
            None => return Err(reason),
        }
    }
}

/// One attempt at the copy to `target`: node to node from a node that holds
/// the run's snapshot, or, when none does, by reading the source (one copy
/// at a time; see `run_copies`).
async fn copy_once(
    context: &Context,
    run_id: &str,
    job: &fabric_proto::v1::JobSpec,
    copies: &SnapshotCopies,
    target: &CopyTarget,
    quota_left: u64,
) -> Result<Snapshot, CopyFailure> {
    let mut holders = copies.holders();
    if holders.is_empty() {
        let _walk = copies.lock_walk().await;
        match copies.plan_walk(&context.transport).await {
            NextCopy::FromHolders(known) => holders = known,
            NextCopy::Walk(template) => {
                return match walk_once(context, run_id, job, *template, target, quota_left).await {
                    Ok(snapshot) => {
                        copies.walked_to(target, &snapshot);
                        Ok(snapshot)
                    }
                    Err(reason) => {
                        copies.walk_failed(target);
                        Err(reason)
                    }
                };
            }
        }
    }
    context.dest(
        run_id,
        &target.node,
        CopyState::Running,
        format!("node to node from {}", holder_names(&holders)),
    );
    let reporter = ProgressReporter::new(context, run_id, &target.node);
    let progress = move |bytes_sent: u64| {
        reporter.report(|| TransferProgress {
            bytes_sent,
            ..Default::default()
        });
    };
    let snapshot = run_copies::copy_from_holders(
        &holders,
        &copies.snapshot_id(),
        target,
        &context.transport,
        0,
        &progress,
    )
    .await?;
    copies.copied_to(target);
    Ok(snapshot)
}

/// A copy's progress, sent to the coordinator at most once a second.
struct ProgressReporter {
    updates: mpsc::UnboundedSender<RunUpdate>,
    run_id: String,
    dest: String,
    last: Mutex<Instant>,
}

impl ProgressReporter {
    fn new(context: &Context, run_id: &str, dest: &str) -> Self {
        Self {
            updates: context.updates.clone(),
            run_id: run_id.to_owned(),
            dest: dest.to_owned(),
            last: Mutex::new(Instant::now()),
        }
    }

    /// Sends `progress()` unless one went less than a second ago (the
    /// progress is only made when it goes: this runs for every file).
    fn report(&self, progress: impl FnOnce() -> TransferProgress) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() < Duration::from_secs(1) {
            return;
        }
        *last = Instant::now();
        let _ = self.updates.send(RunUpdate {
            run_id: self.run_id.clone(),
            dest: self.dest.clone(),
            progress: Some(progress()),
            ..Default::default()
        });
    }
}

fn holder_names(holders: &[CopyTarget]) -> String {
    holders
        .iter()
        .map(|holder| holder.node.as_str())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Read the source and push it to `target`, committing `template`; with a
/// job quota, sending at most `quota_left` bytes.
async fn walk_once(
    context: &Context,
    run_id: &str,
    job: &fabric_proto::v1::JobSpec,
    template: Snapshot,
    target: &CopyTarget,
    quota_left: u64,
) -> Result<Snapshot, CopyFailure> {
    let reporter = ProgressReporter::new(context, run_id, &target.node);
    let mut backup = crate::metrics::AgentBackup::start(&context.metrics, &job.name);
    let watched = backup.progress();
    let progress = Arc::new(move |progress: &PushProgress| {
        watched.update(progress);
        reporter.report(|| TransferProgress {
            files: progress.files,
            bytes_read: progress.bytes_read,
            bytes_sent: progress.bytes_sent,
            current_path: progress.current_path.clone(),
        });
    });
    push_backup(
        &crate::client::Peer::node(&target.node, &target.address),
        &context.transport,
        backup_options(job),
        context.backup_plan,
        template,
        Some(progress),
        TransferLimits::none()
            .with(context.upload_limit.clone())
            .with(RateLimit::new(job.bandwidth_limit_bytes_per_s))
            .with_budget(JobBudget::new(&job.name, job.quota_bytes, quota_left)),
    )
    .await
    .map(|outcome| {
        backup.succeeded(&outcome);
        outcome.snapshot
    })
    .map_err(|err| match err {
        AgentError::Source(reason) => CopyFailure {
            reason: format!(
                "the client {} cannot read what the job includes: {reason}",
                context.config.hostname
            ),
            source_fault: true,
        },
        other => CopyFailure::from(other.to_string()),
    })
}

/// Why one attempt at a copy failed.
#[derive(Debug)]
struct CopyFailure {
    reason: String,
    /// The client's own source is at fault (an include path missing): no
    /// retry and no other node can help.
    source_fault: bool,
}

impl From<String> for CopyFailure {
    fn from(reason: String) -> Self {
        Self {
            reason,
            source_fault: false,
        }
    }
}

async fn execute_passive(
    context: &Context,
    assignment: Assignment,
    pull_done: oneshot::Receiver<(bool, String)>,
) -> Result<(), String> {
    let job = assignment.job.clone().unwrap_or_default();
    let run_id = assignment.run_id.clone();
    if !job.pre.is_empty() {
        context.state(&run_id, RunState::Pre, "");
        run_script(context, &run_id, "pre", &job.pre).await?;
    }
    context.send(RunUpdate {
        run_id: run_id.clone(),
        state: RunState::Copying as i32,
        ready: true,
        message: "ready to be pulled".into(),
        ..Default::default()
    });
    let timeout = Duration::from_secs(if job.pull_timeout_s == 0 {
        3600
    } else {
        job.pull_timeout_s
    });
    let pulled = match tokio::time::timeout(timeout, pull_done).await {
        Ok(Ok((true, _))) => Ok(()),
        Ok(Ok((false, message))) => Err(format!("the pull failed: {message}")),
        Ok(Err(_)) => Err("the pull's end was never signalled".to_owned()),
        Err(_) => Err(format!("no pull ended within {timeout:?}")),
    };
    // Nobody may pull this run any more.
    context.permits.forget(&run_id);
    if !job.post.is_empty() {
        context.state(&run_id, RunState::Post, "");
        run_script(context, &run_id, "post", &job.post).await?;
    }
    pulled
}

async fn execute_pull(context: &Context, assignment: Assignment) -> RunUpdate {
    let run_id = assignment.run_id.clone();
    let dest = if assignment.dest.is_empty() {
        context.config.node_id.clone()
    } else {
        assignment.dest.clone()
    };
    context.dest(&run_id, &dest, CopyState::Running, "");
    let result = async {
        let store = context
            .store
            .clone()
            .ok_or_else(|| format!("node {dest} has no store to pull into"))?;
        let job = assignment.job.clone().unwrap_or_default();
        let template = assignment.snapshot.clone().unwrap_or_default();
        if !assignment.holders.is_empty() {
            // Another node committed this run's snapshot: copy it from
            // there, so that every copy is that one.
            let own = CopyTarget {
                node: context.config.node_id.clone(),
                ..Default::default()
            };
            return run_copies::copy_from_holders(
                &assignment.holders,
                &template.id,
                &own,
                &context.transport,
                0,
                &|_| {},
            )
            .await;
        }
        crate::source_service::pull_into(
            store,
            &crate::client::Peer::node(&assignment.source_node, &assignment.source_address),
            &context.transport,
            &assignment.run_id,
            job.include.clone(),
            job.exclude.clone(),
            job.one_file_system,
            template,
            context.pull_memory.clone(),
            // A pull is this node's own doing: no host to hold it to and no
            // guards, but the pulled host's quota here and the limits apply.
            crate::transfer::ReceiveRules {
                limits: TransferLimits::none()
                    .with(context.ingest_limit.clone())
                    .with(RateLimit::new(job.bandwidth_limit_bytes_per_s))
                    .with_budget(JobBudget::new(
                        &job.name,
                        job.quota_bytes,
                        assignment.quota_left_bytes,
                    )),
                quotas: Arc::new(context.config.host_quotas()),
                metrics: context.metrics.clone(),
                ..crate::transfer::ReceiveRules::trusted()
            },
        )
        .await
        .map_err(|status| {
            format!(
                "pull from {} failed: {}",
                assignment.source_address,
                describe_status(&status)
            )
        })
    }
    .await;
    match result {
        Ok(snapshot) => RunUpdate {
            run_id,
            dest,
            dest_state: CopyState::Done as i32,
            snapshot: Some(snapshot),
            ..Default::default()
        },
        Err(reason) => RunUpdate {
            run_id,
            dest,
            dest_state: CopyState::Failed as i32,
            message: reason,
            ..Default::default()
        },
    }
}

/// Run the job's instances command; one instance per non-empty line.
async fn execute_expand(context: &Context, assignment: &Assignment) -> Result<Vec<String>, String> {
    let job = assignment.job.clone().unwrap_or_default();
    let command = job
        .instances_command
        .strip_prefix('!')
        .unwrap_or(&job.instances_command);
    if command.trim().is_empty() {
        return Err(format!("job {} has no instances command", job.name));
    }
    let output = run_script(context, &assignment.run_id, "instances", command).await?;
    Ok(output
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect())
}

#[cfg(test)]
mod tests {
    use fabric_proto::v1::SnapshotType;

    use super::*;

    /// What the coordinator plans for a job whose master values are
    /// commands: blanks in their place, and a name made without them.
    fn planned() -> Snapshot {
        let mut snapshot = Snapshot {
            id: "ab".repeat(16),
            job: "mysqldb".into(),
            host: "db-slave-3".into(),
            instance: "3306".into(),
            r#type: SnapshotType::Full as i32,
            start_time_ms: 1_764_000_000_000,
            ..Default::default()
        };
        snapshot.name = fabric_proto::naming::snapshot_name(&snapshot);
        snapshot
    }

    #[test]
    fn evaluated_master_values_go_into_the_record_and_its_name() {
        let evaluated = Evaluated {
            master_host: Some("db-master-1".into()),
            master_instance: Some("3307".into()),
            data_age: Some("42".into()),
        };
        let snapshot =
            complete_template("mysqldb", planned(), "ignored", evaluated).expect("completes");
        assert_eq!(snapshot.master_host, "db-master-1");
        assert_eq!(snapshot.master_instance, "3307");
        assert_eq!(snapshot.data_age, 42);
        assert_eq!(
            snapshot.name,
            "mysqldb/2025-11-24-Mon/db-slave-3-3306-db-master-1-3307-2025-11-24-Mon-16:00:00"
        );
        assert_eq!(snapshot.id, planned().id, "the run's id stays");
    }

    #[test]
    fn without_commands_the_planned_record_and_name_stay() {
        let mut planned = planned();
        planned.master_host = "db-master-2".into();
        planned.name = fabric_proto::naming::snapshot_name(&planned);
        let snapshot =
            complete_template("mysqldb", planned.clone(), "ignored", Evaluated::default())
                .expect("completes");
        assert_eq!(snapshot, planned);
    }

    #[test]
    fn a_data_age_that_is_not_seconds_is_refused_naming_the_job() {
        let evaluated = Evaluated {
            data_age: Some("soon".into()),
            ..Default::default()
        };
        let error = complete_template("mysqldb", planned(), "ignored", evaluated)
            .expect_err("not a number");
        assert_eq!(
            error,
            "data_age of job mysqldb is not a number of seconds: \"soon\""
        );
    }
}
