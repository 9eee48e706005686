//! The engine: the coordinator's live state and every change to it. It owns
//! the node registry (persisted nodes, live sessions, lost detection), the
//! unfinished runs (planning, assignment, re-assignment, pull orchestration,
//! queue timeouts, cancel and retry) and the event feed. All changes happen
//! under one lock and are written through to the [`Store`] before the lock
//! is released, so a restart resumes from what was last reported. What the
//! engine sends nodes waits in an outbox until that write is durable
//! (`Inner::commit`): a successor coordinator (a restart, or another one
//! taking the lead) knows of every run, lease and deletion a node was told
//! of, so it never starts a scheduled run again that a node already ran.
//!
//! Its parts: the node registry and who may claim a node id
//! (`engine/nodes.rs`), the assignments and pull permits sent to nodes
//! (`engine/assignments.rs`), and here the runs' lifecycle.
//!
//! The state machine itself lives in [`crate::runs`] (pure); destination
//! grammar, job files, naming and checks in their own modules. The engine
//! never speaks gRPC: the service turns requests into calls here and the
//! engine hands it channels of messages for each node.
//!
//! Progress-only updates (a copy's `TransferProgress`, about one a second
//! per copy) change the stored run's copy progress but are not stored as
//! events and are not flushed on their own, so the history does not grow
//! with the length of a transfer; every other update is an event, flushed
//! before the engine answers.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fabric_proto::v1::{
    Assignment, AssignmentRole, CancelAssignment, CatalogEntry, CheckResponse, CoordinatorMessage,
    CopyState, CopyTarget, DeleteSnapshots, Direction, ForgetDecision, ForgetResponse, Job,
    JobChange, JobSpec, ListCatalogRequest, ListRunsRequest, Node, NodeInfo, NodeMessage, NodeRole,
    NodeState, PullDone, PullPermit, Run, RunCopy, RunDetail, RunEvent, RunState, RunUpdate,
    Snapshot, SnapshotType, SubmitJobsRequest, SubmitJobsResponse, coordinator_message,
    node_message,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::sync::{Mutex, broadcast, mpsc};

mod assignments;
mod gc;
mod held;
mod job_cache;
mod nodes;
mod offsite;
mod replication;
mod upkeep;
mod verify_after_backup;

pub use gc::{GcAnswer, GcSettings};
pub use replication::ReplicationSettings;

use upkeep::retention_rules;

use assignments::pull_permit;

use crate::dest::{self, DestPlan, NodeView};
use crate::jobfile::{self, KnownNodes};
use crate::record::{RunKind, RunRecord};
use crate::retention;
use crate::runs;
use crate::schedule::Schedule;
use crate::state::{AmbiguousPrefix, StateError, Store};

/// Why a request to the engine failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The state database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A job, run or node that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A bad request (a bad jobs file, a bad selection).
    #[error("{0}")]
    InvalidArgument(String),
    /// A request that does not fit the current state (retrying a running run).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A run id prefix matching several runs.
    #[error(transparent)]
    Ambiguous(#[from] AmbiguousPrefix),
    /// The caller may not do this (a node id held by a live session).
    #[error("{0}")]
    PermissionDenied(String),
}

/// The timing the engine follows.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// How often nodes send a heartbeat.
    pub heartbeat_interval: Duration,
    /// Silence after which a node is lost.
    pub lost_after: Duration,
    /// How long a run waits for its nodes before failing.
    pub queue_timeout: Duration,
    /// Runs in progress at once in the whole fabric (0: no limit); more
    /// wait their turn, without timing out.
    pub worker_limit: u32,
    /// Runs in progress at once on one client node (0: no limit).
    pub node_worker_limit: u32,
    /// When storage nodes collect garbage.
    pub gc: GcSettings,
    /// How snapshots are kept at their replica targets.
    pub replication: ReplicationSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            lost_after: Duration::from_secs(15),
            queue_timeout: Duration::from_secs(600),
            worker_limit: 0,
            node_worker_limit: 0,
            gc: GcSettings::default(),
            replication: ReplicationSettings::default(),
        }
    }
}

/// The shortest sleep before a pull is assigned again. A node reports a
/// pull's failure just before it forgets the run; an assignment of the same
/// run arriving in between would be taken for a duplicate and dropped.
const PULL_RETRY_FLOOR_MS: u64 = 1000;

/// Messages to one node's session.
pub type NodeSender = mpsc::UnboundedSender<CoordinatorMessage>;

struct SessionHandle {
    generation: u64,
    sender: NodeSender,
}

/// A message [`Inner::send`] queued for a session of one generation.
struct OutgoingMessage {
    node_id: String,
    generation: u64,
    message: CoordinatorMessage,
}

struct Inner {
    store: Store,
    settings: Settings,
    events: broadcast::Sender<RunEvent>,
    nodes: BTreeMap<String, Node>,
    sessions: HashMap<String, SessionHandle>,
    /// Messages for sessions, held until the state that made them is
    /// durable (`Inner::commit`): a node must never act on a run, lease or
    /// deletion that a successor coordinator would not find in the state.
    outbox: Vec<OutgoingMessage>,
    /// When each node was last heard of (heartbeat, hello, or this
    /// coordinator's start, which gives known nodes time to reconnect).
    last_seen: HashMap<String, i64>,
    /// Since when a node has had no session.
    disconnected_since: HashMap<String, i64>,
    active: BTreeMap<String, RunRecord>,
    last_run: HashMap<String, String>,
    next_generation: u64,
    rng: StdRng,
    gc: gc::GcBook,
    replicas: replication::ReplicaBook,
    metrics: crate::metrics::CoordinatorMetrics,
    /// The stored jobs by name, as last read or written (`engine/job_cache.rs`;
    /// `None` until first used).
    job_cache: Option<BTreeMap<String, std::sync::Arc<Job>>>,
}

/// The coordinator's live state.
pub struct Engine {
    inner: Mutex<Inner>,
    events: broadcast::Sender<RunEvent>,
    settings: Settings,
    state: Store,
    metrics: crate::metrics::CoordinatorMetrics,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// The fewest characters a run's short id has (see `Run.short_id`).
const SHORT_RUN_ID_MIN: usize = 8;

/// A run id: the creation time in hex (so ids sort by creation, which the
/// `runs` tree relies on for newest-first listing), then random hex.
pub fn new_run_id(now_ms: i64, rng: &mut impl Rng) -> String {
    format!("{:012x}{:08x}", now_ms.max(0), rng.random::<u32>())
}

fn random_snapshot_id(rng: &mut impl Rng) -> String {
    let bytes: [u8; 16] = rng.random();
    hex::encode(bytes)
}

fn is_storage(node: &Node) -> bool {
    node.info
        .as_ref()
        .is_some_and(|info| info.roles.contains(&(NodeRole::Storage as i32)))
}

/// A job value as the planned record may carry it: a `!command` only the
/// client may run, so it is blank here; the agent runs it from the job,
/// names the snapshot again, and the catalogue stores the record it commits.
fn static_value(value: &str) -> String {
    if value.starts_with('!') {
        String::new()
    } else {
        value.to_owned()
    }
}

impl Engine {
    /// Loads the state and gets ready to serve.
    pub fn open(store: Store, settings: Settings) -> Result<Self, StateError> {
        let state = store.clone();
        let metrics = crate::metrics::CoordinatorMetrics::default();
        let (events, _) = broadcast::channel(1024);
        let now = now_ms();
        let mut nodes = BTreeMap::new();
        let mut last_seen = HashMap::new();
        let mut disconnected_since = HashMap::new();
        for node in store.nodes()? {
            let id = node
                .info
                .as_ref()
                .map(|info| info.id.clone())
                .unwrap_or_default();
            last_seen.insert(id.clone(), now);
            disconnected_since.insert(id.clone(), now);
            nodes.insert(id, node);
        }
        let mut active = BTreeMap::new();
        let mut last_run = HashMap::new();
        store.visit_runs_newest_first(|record| {
            last_run
                .entry(record.run().job.clone())
                .or_insert_with(|| record.id().to_owned());
            if !record.is_finished() {
                active.insert(record.id().to_owned(), record);
            }
            true
        })?;
        // Runs waiting when the coordinator stopped wait anew from now on.
        for record in active.values_mut() {
            if !record.client_assigned {
                record.waiting_since_ms = now;
            }
        }
        Ok(Self {
            inner: Mutex::new(Inner {
                store,
                settings: settings.clone(),
                events: events.clone(),
                nodes,
                sessions: HashMap::new(),
                outbox: Vec::new(),
                last_seen,
                disconnected_since,
                active,
                last_run,
                next_generation: 1,
                rng: StdRng::from_os_rng(),
                gc: gc::GcBook::new(now),
                replicas: replication::ReplicaBook::new(now),
                metrics: metrics.clone(),
                job_cache: None,
            }),
            events,
            settings,
            state,
            metrics,
        })
    }

    /// The engine's event metrics (runs ended, their durations, the
    /// scheduler's lag), shared with whoever renders them.
    pub fn metrics(&self) -> crate::metrics::CoordinatorMetrics {
        self.metrics.clone()
    }

    /// What the metrics port reports at a scrape: runs and nodes by state,
    /// and each job's check, freshness, missing copies and damaged
    /// snapshots. Reads the jobs and the catalogue once, as `check` does.
    pub async fn metrics_figures(&self) -> Result<crate::metrics::EngineFigures, EngineError> {
        let check = self.check(&[]).await?;
        let inner = self.inner.lock().await;
        let now = now_ms();
        let mut figures = crate::metrics::EngineFigures::default();
        for record in inner.active.values() {
            *figures
                .active_runs
                .entry(crate::metrics::run_state_word(record.run().state()))
                .or_default() += 1;
        }
        for node in inner.nodes.values() {
            let word = match node.state() {
                fabric_proto::v1::NodeState::Lost => "lost",
                _ => "online",
            };
            *figures.nodes.entry(word).or_default() += 1;
            if node.draining_since_ms != 0 {
                figures.draining_nodes += 1;
            }
        }
        for job in check.jobs {
            let entry = figures.jobs.entry(job.job.clone()).or_default();
            entry.status = job.status();
            entry.seconds_since_good = (job.newest_good_ms > 0)
                .then(|| now.saturating_sub(job.newest_good_ms).max(0) as f64 / 1000.0);
        }
        let entries = inner.store.catalog()?;
        for (job, counted, target) in inner.replica_shortfalls(&entries, now) {
            let missing = i64::try_from(target.saturating_sub(counted)).unwrap_or(i64::MAX);
            figures.jobs.entry(job).or_default().missing_copies += missing;
        }
        for entry in &entries {
            if let Some(snapshot) = &entry.snapshot
                && snapshot.state() == fabric_proto::v1::SnapshotState::Damaged
            {
                figures
                    .jobs
                    .entry(snapshot.job.clone())
                    .or_default()
                    .damaged_snapshots += 1;
            }
        }
        Ok(figures)
    }

    /// The state database (for the token store, which shares it).
    pub fn state(&self) -> Store {
        self.state.clone()
    }

    /// Collects garbage on storage node `node_id` now, under a lease (after
    /// any node sharing a snapshot with it ends its own), and returns what
    /// the collection did; an error names the node and why.
    pub async fn collect_garbage(
        &self,
        node_id: &str,
        repack_threshold: f64,
    ) -> Result<fabric_proto::v1::GcReport, EngineError> {
        let receiver = {
            let mut inner = self.inner.lock().await;
            let receiver = inner.ask_gc(node_id, repack_threshold, now_ms())?;
            inner.commit(true).await?;
            receiver
        };
        match receiver.await {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(why)) => Err(EngineError::FailedPrecondition(why)),
            Err(_) => Err(EngineError::FailedPrecondition(format!(
                "the coordinator stopped before node {node_id}'s GC ended"
            ))),
        }
    }

    /// The timing settings.
    pub fn settings(&self) -> Settings {
        self.settings.clone()
    }

    /// Live events of every run (subscribe before reading stored ones).
    pub fn subscribe(&self) -> broadcast::Receiver<RunEvent> {
        self.events.subscribe()
    }

    /// Registers or updates a node.
    pub async fn register_node(&self, info: NodeInfo) -> Result<(), EngineError> {
        validate_node_info(&info)?;
        let now = now_ms();
        let mut inner = self.inner.lock().await;
        inner.check_claim(&info, now, self.settings.lost_after)?;
        inner.upsert_node(info, now)?;
        inner.commit(true).await?;
        Ok(())
    }

    /// A node said hello on a new session: returns the session's generation
    /// and the channel of messages to send it.
    pub async fn open_session(
        &self,
        hello: NodeInfo,
    ) -> Result<(u64, mpsc::UnboundedReceiver<CoordinatorMessage>), EngineError> {
        validate_node_info(&hello)?;
        let now = now_ms();
        let mut inner = self.inner.lock().await;
        inner.check_claim(&hello, now, self.settings.lost_after)?;
        let (sender, receiver) = mpsc::unbounded_channel();
        let generation = inner.next_generation;
        inner.next_generation += 1;
        let node_id = hello.id.clone();
        let active_runs = hello.active_runs.clone();
        inner.upsert_node(hello, now)?;
        inner
            .sessions
            .insert(node_id.clone(), SessionHandle { generation, sender });
        inner.disconnected_since.remove(&node_id);
        if let Some(node) = inner.nodes.get_mut(&node_id) {
            node.stopped = false;
        }
        tracing::info!(node = %node_id, active_runs = active_runs.len(), "node connected");
        inner.node_connected(&node_id, &active_runs, now)?;
        inner.commit(true).await?;
        Ok((generation, receiver))
    }

    /// A message on a node's session.
    pub async fn session_message(
        &self,
        node_id: &str,
        message: NodeMessage,
    ) -> Result<(), EngineError> {
        let now = now_ms();
        let mut inner = self.inner.lock().await;
        match message.kind {
            Some(node_message::Kind::Heartbeat(heartbeat)) => {
                inner.heartbeat(node_id, &heartbeat, now)?;
                inner.commit(false).await?;
            }
            Some(node_message::Kind::Update(update)) => {
                let durable = inner.run_update(node_id, &update, now)?;
                inner.commit(durable).await?;
            }
            Some(node_message::Kind::Deleted(deleted)) => {
                for id in &deleted.deleted {
                    inner.store.remove_catalog_copy(id, node_id)?;
                }
                if !deleted.deleted.is_empty() {
                    inner.gc_wanted(node_id, now)?;
                }
                for refusal in &deleted.refused {
                    tracing::warn!(node = %node_id, %refusal, "a snapshot retention removed was not deleted");
                }
                inner.commit(true).await?;
            }
            Some(node_message::Kind::GcDone(done)) => {
                inner.gc_done(node_id, &done, now)?;
                inner.commit(true).await?;
            }
            Some(node_message::Kind::Replicated(answer)) => {
                inner.replicated(node_id, &answer, now)?;
                inner.commit(true).await?;
            }
            Some(node_message::Kind::SnapshotVerified(answer)) => {
                inner.snapshot_verified(node_id, &answer, now)?;
                inner.commit(true).await?;
            }
            Some(node_message::Kind::RepairDone(done)) => {
                inner.repair_done(node_id, &done, now)?;
                inner.commit(true).await?;
            }
            Some(node_message::Kind::Held(held)) => {
                let changed = inner.snapshots_held(node_id, &held)?;
                inner.commit(changed).await?;
            }
            Some(node_message::Kind::Hello(_)) => {
                return Err(EngineError::InvalidArgument(format!(
                    "node {node_id}: hello is only the first message of a session"
                )));
            }
            None => {}
        }
        Ok(())
    }

    /// A node's session ended.
    /// `ended_by_node`: the node closed its side (it is stopping), rather
    /// than the stream breaking.
    pub async fn session_closed(&self, node_id: &str, generation: u64, ended_by_node: bool) {
        let mut inner = self.inner.lock().await;
        if inner
            .sessions
            .get(node_id)
            .is_some_and(|session| session.generation == generation)
        {
            inner.sessions.remove(node_id);
            inner.gc.node_gone(node_id);
            inner
                .disconnected_since
                .insert(node_id.to_owned(), now_ms());
            if let Some(node) = inner.nodes.get_mut(node_id) {
                node.stopped = ended_by_node;
            }
            tracing::info!(node = %node_id, ended_by_node, "node disconnected");
        }
    }

    /// Periodic work: lost nodes, due pull retries, queue timeouts, runs
    /// waiting for a destination.
    pub async fn tick(&self) -> Result<(), EngineError> {
        self.tick_at(now_ms()).await
    }

    /// [`Engine::tick`] at `now` (ms since the Unix epoch): the clock is
    /// a parameter, so schedules can be run in virtual time.
    pub async fn tick_at(&self, now: i64) -> Result<(), EngineError> {
        let mut inner = self.inner.lock().await;
        let changed = inner.tick(now)?;
        inner.commit(changed).await?;
        Ok(())
    }

    /// Stores the jobs of a file and starts the selected runs.
    /// `by` is who submitted them (`operator/alice`), recorded with every
    /// job it creates or changes.
    pub async fn submit_jobs(
        &self,
        request: SubmitJobsRequest,
        by: &str,
    ) -> Result<SubmitJobsResponse, EngineError> {
        let now = now_ms();
        let mut inner = self.inner.lock().await;
        let known = inner.known_nodes();
        let file_name = if request.file_name.is_empty() {
            "jobs.toml"
        } else {
            request.file_name.as_str()
        };
        let specs = jobfile::parse_jobs_file(file_name, &request.toml, &known)
            .map_err(|error| EngineError::InvalidArgument(error.to_string()))?;
        for spec in &specs {
            if let Some(problem) = inner.replicas_problem(spec) {
                return Err(EngineError::InvalidArgument(format!(
                    "{file_name}: job {}: {problem}",
                    spec.name
                )));
            }
        }
        let selected = if request.no_run {
            Vec::new()
        } else {
            let args: Vec<&str> = request.select.iter().map(String::as_str).collect();
            jobfile::select(&specs, &args)
                .map_err(|error| EngineError::InvalidArgument(format!("{file_name}: {error}")))?
        };
        for spec in &specs {
            let earlier = inner.store.job(&spec.name)?;
            let mut history = earlier
                .as_ref()
                .map(|job| job.history.clone())
                .unwrap_or_default();
            let change = match earlier.as_ref().and_then(|job| job.spec.as_ref()) {
                None => Some("created".to_owned()),
                Some(old) => {
                    let keys = crate::job_history::changed_keys(old, spec);
                    (!keys.is_empty()).then(|| format!("changed: {}", keys.join(", ")))
                }
            };
            if let Some(change) = change {
                tracing::info!(job = %spec.name, by, %change, "job stored");
                history.push(JobChange {
                    time_ms: now,
                    by: by.to_owned(),
                    change,
                });
                let excess = history.len().saturating_sub(MAX_JOB_HISTORY);
                history.drain(..excess);
            }
            // A resubmitted job keeps its place in its schedule.
            let (scheduled_ms, schedule_since_ms) = earlier
                .map(|job| (job.scheduled_ms, job.schedule_since_ms))
                .filter(|(_, since)| *since > 0)
                .unwrap_or_else(|| (Default::default(), now));
            inner.put_job(&Job {
                spec: Some(spec.clone()),
                submitted_ms: now,
                last_run: None,
                submitted_by: by.to_owned(),
                history,
                scheduled_ms,
                schedule_since_ms,
                ..Default::default()
            })?;
        }
        let mut started = Vec::new();
        for choice in selected {
            let Some(spec) = specs.iter().find(|spec| spec.name == choice.job) else {
                continue;
            };
            let run = inner.start_job(spec, &specs, choice.instance.as_deref(), now)?;
            started.push(run);
        }
        inner.commit(true).await?;
        tracing::info!(file = %file_name, jobs = specs.len(), runs = started.len(), "jobs submitted");
        Ok(SubmitJobsResponse {
            jobs: specs.iter().map(|spec| spec.name.clone()).collect(),
            runs: started,
        })
    }

    /// One job.
    pub async fn job(&self, name: &str) -> Result<Job, EngineError> {
        let inner = self.inner.lock().await;
        let job = inner
            .store
            .job(name)?
            .ok_or_else(|| EngineError::NotFound(format!("no job {name:?}")))?;
        inner.with_last_run(job)
    }

    /// Every job, by name.
    pub async fn jobs(&self) -> Result<Vec<Job>, EngineError> {
        let inner = self.inner.lock().await;
        inner.jobs_with_last_runs()
    }

    /// Runs matching the filters, newest first.
    pub async fn list_runs(&self, filter: &ListRunsRequest) -> Result<Vec<Run>, EngineError> {
        let inner = self.inner.lock().await;
        let limit = if filter.limit == 0 {
            100
        } else {
            filter.limit as usize
        };
        let mut runs = Vec::new();
        inner.store.visit_runs_newest_first(|record| {
            let run = record.run();
            let matches = (filter.job.is_empty() || run.job == filter.job)
                && (filter.state == RunState::Unspecified as i32 || run.state == filter.state)
                && run.created_ms >= filter.since_ms
                && (filter.until_ms == 0 || run.created_ms < filter.until_ms);
            if matches {
                runs.push(run.clone());
            }
            runs.len() < limit
        })?;
        for run in &mut runs {
            inner.fill_short_id(run)?;
        }
        Ok(runs)
    }

    /// A run and its events.
    pub async fn run_detail(&self, id_or_prefix: &str) -> Result<RunDetail, EngineError> {
        let inner = self.inner.lock().await;
        let record = inner.find_run(id_or_prefix)?;
        let mut events = inner.store.events(record.id(), 0)?;
        if !record.is_finished() {
            events.extend(runs::current_progress(&record, now_ms()));
        }
        let mut run = record.run;
        if let Some(run) = run.as_mut() {
            inner.fill_short_id(run)?;
        }
        Ok(RunDetail { run, events })
    }

    /// A run's events after `after`, and whether the run has ended.
    pub async fn events_after(
        &self,
        run_id: &str,
        after: u64,
    ) -> Result<(Vec<RunEvent>, bool), EngineError> {
        let inner = self.inner.lock().await;
        let record = inner.find_run(run_id)?;
        Ok((
            inner.store.events(record.id(), after)?,
            record.is_finished(),
        ))
    }

    /// Cancels a queued or running run.
    pub async fn cancel_run(&self, id_or_prefix: &str) -> Result<Run, EngineError> {
        let now = now_ms();
        let mut inner = self.inner.lock().await;
        let record = inner.find_run(id_or_prefix)?;
        let id = record.id().to_owned();
        let Some(mut record) = inner.active.remove(&id) else {
            return Err(EngineError::FailedPrecondition(format!(
                "run {id} has already ended ({})",
                fabric_proto::enum_word(record.run().state().as_str_name())
            )));
        };
        let cancel = CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Cancel(CancelAssignment {
                run_id: id.clone(),
            })),
        };
        if record.client_assigned {
            let client = record.run().client.clone();
            inner.send(&client, cancel.clone());
        }
        for node in record.pulls_outstanding.clone() {
            inner.send(&node, cancel.clone());
        }
        record.pulls_outstanding.clear();
        runs::finish(
            &mut record,
            RunState::Cancelled,
            "cancelled by an operator",
            now,
        );
        // `save` counts only runs it takes out of the active set.
        inner.count_finished(&record);
        inner.coordinator_event(&record, "cancelled by an operator", now)?;
        let run = record.run().clone();
        inner.save(record)?;
        inner.commit(true).await?;
        Ok(run)
    }

    /// Starts the copies of a finished run that did not complete again.
    pub async fn retry_run(&self, id_or_prefix: &str) -> Result<Run, EngineError> {
        let now = now_ms();
        let mut inner = self.inner.lock().await;
        let mut record = inner.find_run(id_or_prefix)?;
        if let Some(refusal) = runs::retry_refusal(&record) {
            return Err(EngineError::FailedPrecondition(refusal));
        }
        let again = runs::reset_for_retry(&mut record);
        record.waiting_since_ms = now;
        let message = if again.is_empty() {
            format!("retried by an operator: attempt {}", record.run().attempt)
        } else {
            format!(
                "retried by an operator: attempt {}, copies to {}",
                record.run().attempt,
                again.join(", ")
            )
        };
        inner.coordinator_event(&record, &message, now)?;
        inner.start(&mut record, now)?;
        let run = record.run().clone();
        inner.save(record)?;
        inner.commit(true).await?;
        Ok(run)
    }

    /// Sets the off-site sync state of `job`'s snapshots (or of `ids`)
    /// back to pending; how many changed.
    pub async fn reset_sync(&self, job: &str, ids: &[String]) -> Result<u32, EngineError> {
        let mut inner = self.inner.lock().await;
        let reset = inner.reset_sync(job, ids, now_ms())?;
        inner.commit(true).await?;
        Ok(reset)
    }

    /// Starts or stops draining a storage node.
    pub async fn drain_node(&self, node_id: &str, cancel: bool) -> Result<Node, EngineError> {
        let mut inner = self.inner.lock().await;
        let node = inner.drain_node(node_id, cancel, now_ms())?;
        inner.commit(true).await?;
        Ok(node)
    }

    /// Every node, by id.
    pub async fn nodes(&self) -> Vec<Node> {
        self.inner
            .lock()
            .await
            .nodes
            .values()
            .cloned()
            .map(nodes::with_listed_health)
            .collect()
    }

    /// The catalogue, oldest first.
    pub async fn catalog(
        &self,
        filter: &ListCatalogRequest,
    ) -> Result<Vec<CatalogEntry>, EngineError> {
        let inner = self.inner.lock().await;
        let mut entries: Vec<CatalogEntry> = inner
            .store
            .catalog()?
            .into_iter()
            .filter(|entry| {
                entry.snapshot.as_ref().is_some_and(|snapshot| {
                    (filter.job.is_empty() || snapshot.job == filter.job)
                        && (filter.host.is_empty() || snapshot.host == filter.host)
                })
            })
            .collect();
        inner.annotate_replicas(&mut entries, now_ms());
        Ok(entries)
    }

    /// Pauses (`true`) or resumes job `name`'s schedule.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<Job, EngineError> {
        let mut inner = self.inner.lock().await;
        let Some(mut job) = inner.store.job(name)? else {
            return Err(EngineError::NotFound(format!("no job {name:?}")));
        };
        job.paused = paused;
        inner.put_job(&job)?;
        inner.commit(true).await?;
        tracing::info!(job = %name, paused, "job schedule changed");
        inner.with_last_run(job)
    }

    /// Deletes job `name` (its runs and snapshots stay).
    pub async fn delete_job(&self, name: &str) -> Result<Job, EngineError> {
        let mut inner = self.inner.lock().await;
        let Some(job) = inner.delete_stored_job(name)? else {
            return Err(EngineError::NotFound(format!("no job {name:?}")));
        };
        inner.commit(true).await?;
        tracing::info!(job = %name, "job deleted");
        Ok(job)
    }

    /// Starts a run of stored job `name` now.
    pub async fn run_job(&self, name: &str, instance: &str) -> Result<Run, EngineError> {
        let now = now_ms();
        let mut inner = self.inner.lock().await;
        let Some(spec) = inner.store.job(name)?.and_then(|job| job.spec) else {
            return Err(EngineError::NotFound(format!("no job {name:?}")));
        };
        if !instance.is_empty() && !spec.instances.iter().any(|known| known == instance) {
            return Err(EngineError::InvalidArgument(format!(
                "job {name} has no instance {:?}",
                instance.chars().take(100).collect::<String>()
            )));
        }
        let instance = (!instance.is_empty()).then_some(instance);
        let run = inner.start_job(&spec, &[], instance, now)?;
        inner.commit(true).await?;
        Ok(run)
    }

    /// Applies job `name`'s retention rules, or with `dry_run` only says
    /// what they would remove.
    pub async fn forget(&self, name: &str, dry_run: bool) -> Result<ForgetResponse, EngineError> {
        let mut inner = self.inner.lock().await;
        let response = inner.apply_retention(name, dry_run, now_ms())?;
        inner.commit(true).await?;
        Ok(response)
    }

    /// The quotas of `jobs` that have one, with their usage.
    pub async fn job_quotas(
        &self,
        jobs: &[String],
    ) -> Result<Vec<fabric_proto::v1::JobQuotaUsage>, EngineError> {
        let inner = self.inner.lock().await;
        let mut quotas = Vec::new();
        for name in jobs {
            if let Some(job) = inner.store.job(name)?
                && let Some(spec) = job.spec
                && spec.quota_bytes > 0
            {
                quotas.push(fabric_proto::v1::JobQuotaUsage {
                    job: name.clone(),
                    used_bytes: inner.job_used_bytes(name),
                    quota_bytes: spec.quota_bytes,
                });
            }
        }
        Ok(quotas)
    }

    /// Freshness of the named jobs (all when empty).
    pub async fn check(&self, names: &[String]) -> Result<CheckResponse, EngineError> {
        let inner = self.inner.lock().await;
        let mut jobs = inner.jobs_with_last_runs()?;
        if !names.is_empty() {
            for name in names {
                if !jobs
                    .iter()
                    .any(|job| job.spec.as_ref().is_some_and(|spec| &spec.name == name))
                {
                    return Err(EngineError::NotFound(format!("no job {name:?}")));
                }
            }
            jobs.retain(|job| {
                job.spec
                    .as_ref()
                    .is_some_and(|spec| names.contains(&spec.name))
            });
        }
        let now = now_ms();
        let entries = inner.store.catalog()?;
        let short = inner.replica_shortfalls(&entries, now);
        let snapshots: Vec<Snapshot> = entries
            .into_iter()
            .filter_map(|entry| entry.snapshot)
            .collect();
        let mut checks = crate::check::check_jobs(&jobs, &snapshots, now);
        crate::check::add_replica_shortfalls(&mut checks, &short);
        Ok(CheckResponse { jobs: checks })
    }

    /// Writes everything out (at shutdown).
    pub async fn flush(&self) -> Result<(), EngineError> {
        let mut inner = self.inner.lock().await;
        inner.commit(true).await?;
        Ok(())
    }
}

/// Changes kept in a job's history.
const MAX_JOB_HISTORY: usize = 100;

fn validate_node_info(info: &NodeInfo) -> Result<(), EngineError> {
    if info.id.is_empty() {
        return Err(EngineError::InvalidArgument(
            "a node needs a non-empty id".into(),
        ));
    }
    Ok(())
}

impl Inner {
    fn store_event(&mut self, event: RunEvent) -> Result<(), StateError> {
        let stored = self.store.append_event(event)?;
        // Nobody watching is fine.
        let _ = self.events.send(stored);
        Ok(())
    }

    fn coordinator_event(
        &mut self,
        record: &RunRecord,
        message: &str,
        now: i64,
    ) -> Result<(), StateError> {
        let mut event = runs::event(record, "", now);
        event.message = message.to_owned();
        self.store_event(event)
    }

    fn copy_event(
        &mut self,
        record: &RunRecord,
        node: &str,
        message: &str,
        now: i64,
    ) -> Result<(), StateError> {
        let mut event = runs::event(record, "", now);
        event.dest = node.to_owned();
        event.dest_state = record
            .run()
            .copies
            .iter()
            .find(|copy| copy.node == node)
            .map(|copy| copy.state)
            .unwrap_or_default();
        event.message = message.to_owned();
        self.store_event(event)
    }

    /// Persists a record; keeps it in the active set while unfinished.
    fn save(&mut self, record: RunRecord) -> Result<(), StateError> {
        self.store.put_run(&record)?;
        let id = record.id().to_owned();
        if record.is_finished() {
            if self.active.remove(&id).is_some() {
                self.count_finished(&record);
            }
        } else {
            self.active.insert(id, record);
        }
        Ok(())
    }

    /// Count a run that just ended in the metrics.
    fn count_finished(&self, record: &RunRecord) {
        let run = record.run();
        self.metrics.run_finished(
            &run.job,
            run.state(),
            run.ended_ms.saturating_sub(run.created_ms),
        );
    }

    /// Sets `run.short_id` (see the proto) for a reply.
    fn fill_short_id(&self, run: &mut Run) -> Result<(), StateError> {
        let length = self
            .store
            .run_unique_prefix_len(&run.id, SHORT_RUN_ID_MIN)?;
        run.short_id = run.id.get(..length).unwrap_or(&run.id).to_owned();
        Ok(())
    }

    fn find_run(&self, id_or_prefix: &str) -> Result<RunRecord, EngineError> {
        if id_or_prefix.is_empty() {
            return Err(EngineError::InvalidArgument("a run id is needed".into()));
        }
        if let Some(record) = self.active.get(id_or_prefix) {
            return Ok(record.clone());
        }
        self.store
            .run_by_prefix(id_or_prefix)??
            .ok_or_else(|| EngineError::NotFound(format!("no run {id_or_prefix:?}")))
    }

    fn with_last_run(&self, mut job: Job) -> Result<Job, EngineError> {
        let name = job
            .spec
            .as_ref()
            .map(|spec| spec.name.clone())
            .unwrap_or_default();
        if let Some(id) = self.last_run.get(&name) {
            job.last_run = match self.active.get(id) {
                Some(record) => record.run.clone(),
                None => self.store.run(id)?.and_then(|record| record.run),
            };
        }
        Ok(job)
    }

    fn jobs_with_last_runs(&self) -> Result<Vec<Job>, EngineError> {
        let now = now_ms();
        self.store
            .jobs()?
            .into_iter()
            .map(|mut job| {
                if let Some(spec) = job.spec.as_ref()
                    && let Some(schedule) = Schedule::of(spec)
                    && let Some(next) = schedule.next_run(
                        &spec.name,
                        &job.scheduled_ms.clone().into_iter().collect(),
                        job.schedule_since_ms,
                        now,
                    )
                {
                    job.next_run_ms = next.at_ms;
                    job.next_run_tags = next.tags;
                }
                self.with_last_run(job)
            })
            .collect()
    }

    /// Creates the run(s) for a selected job and instance.
    fn start_job(
        &mut self,
        spec: &JobSpec,
        submitted: &[JobSpec],
        instance: Option<&str>,
        now: i64,
    ) -> Result<Run, EngineError> {
        match spec.direction() {
            Direction::Pull => {
                let passive = match submitted
                    .iter()
                    .find(|other| other.name == spec.pull_source)
                {
                    Some(passive) => Some(passive.clone()),
                    None => self.store.job(&spec.pull_source)?.and_then(|job| job.spec),
                };
                let Some(passive) = passive else {
                    return Err(EngineError::InvalidArgument(format!(
                        "job {}: its pull_source {:?} is not a known passive job",
                        spec.name, spec.pull_source
                    )));
                };
                Ok(self.new_run(spec, Some(passive), instance, RunKind::Pull, now)?)
            }
            Direction::Passive => Err(EngineError::InvalidArgument(format!(
                "job {}: a passive job runs through its pull job",
                spec.name
            ))),
            Direction::Push | Direction::Unspecified => {
                let kind = if instance.is_none() && !spec.instances_command.is_empty() {
                    RunKind::Expand
                } else {
                    RunKind::Push
                };
                Ok(self.new_run(spec, None, instance, kind, now)?)
            }
        }
    }

    fn new_run(
        &mut self,
        spec: &JobSpec,
        passive: Option<JobSpec>,
        instance: Option<&str>,
        kind: RunKind,
        now: i64,
    ) -> Result<Run, StateError> {
        let id = new_run_id(now, &mut self.rng);
        let mut record = RunRecord {
            run: Some(Run {
                id: id.clone(),
                job: spec.name.clone(),
                instance: instance.unwrap_or_default().to_owned(),
                client: spec.client.clone(),
                state: RunState::Queued as i32,
                created_ms: now,
                attempt: 1,
                tags: spec.tags.clone(),
                ..Default::default()
            }),
            kind: kind as i32,
            spec: Some(spec.clone()),
            passive,
            waiting_since_ms: now,
            ..Default::default()
        };
        let what = match kind {
            RunKind::Expand => "queued: expand the instances",
            RunKind::Pull => "queued: pull",
            _ => "queued: push",
        };
        self.coordinator_event(&record, what, now)?;
        self.last_run.insert(spec.name.clone(), id);
        self.start(&mut record, now)?;
        let run = record.run().clone();
        self.save(record)?;
        tracing::info!(run = %run.id, job = %run.job, instance = %run.instance, "run created");
        Ok(run)
    }

    /// Plans and sends the client part of a queued run, if it can be; else
    /// records what it waits for.
    fn start(&mut self, record: &mut RunRecord, now: i64) -> Result<(), StateError> {
        if record.client_assigned || record.is_finished() {
            return Ok(());
        }
        if record.run_kind() != RunKind::Expand && record.run().copies.is_empty() {
            match self.plan_copies(&record.spec()) {
                Ok(copies) => {
                    let order: Vec<String> = copies
                        .iter()
                        .map(|copy| {
                            if copy.background {
                                format!("{}&", copy.node)
                            } else {
                                copy.node.clone()
                            }
                        })
                        .collect();
                    record.run_mut().copies = copies;
                    self.coordinator_event(record, &format!("plan: {}", order.join(" ")), now)?;
                }
                Err(reason) => return self.wait(record, reason, now),
            }
        }
        if record.run_kind() != RunKind::Expand
            && let Some(0) = self.quota_left(&record.spec())
        {
            let spec = record.spec();
            let reason = format!(
                "job {} is at its quota: its snapshots take {} bytes of {} on the storage nodes \
                 (as they last counted); delete snapshots or raise the job's quota",
                spec.name,
                self.job_used_bytes(&spec.name),
                spec.quota_bytes
            );
            runs::finish(record, RunState::Failed, &reason, now);
            return self.coordinator_event(record, &reason, now);
        }
        let client = record.run().client.clone();
        if let Some(reason) = self.worker_limit_reached(&client) {
            self.wait(record, reason, now)?;
            // Waiting for a worker is waiting in line, not for a node that
            // may never come: the queue timeout does not run meanwhile.
            record.waiting_since_ms = now;
            return Ok(());
        }
        if !self.sessions.contains_key(&client) {
            return self.wait(
                record,
                format!("waiting for client node {client} to connect"),
                now,
            );
        }
        let assignment = self.client_assignment(record, now);
        if self.send(&client, assignment) {
            record.client_assigned = true;
            record.assignments_sent += 1;
            record.waiting_for.clear();
            let message = format!("assigned to {client} (attempt {})", record.assignments_sent);
            self.coordinator_event(record, &message, now)?;
            self.advance_pulls(record, now)?;
        } else {
            self.wait(
                record,
                format!("waiting for client node {client} to connect"),
                now,
            )?;
        }
        Ok(())
    }

    fn wait(&mut self, record: &mut RunRecord, reason: String, now: i64) -> Result<(), StateError> {
        if record.waiting_for != reason {
            record.waiting_for = reason.clone();
            self.coordinator_event(record, &reason, now)?;
        }
        Ok(())
    }

    /// The copies of a run: its dest plan or its replicas, against the
    /// nodes that can take a copy now.
    fn plan_copies(&mut self, spec: &JobSpec) -> Result<Vec<RunCopy>, String> {
        let views = self.node_views();
        let planned = if spec.replicas > 0 {
            let spread_by = (!spec.spread_by.is_empty()).then_some(spec.spread_by.as_str());
            dest::pick_replicas(spec.replicas as usize, spread_by, &views, &mut self.rng)
                .map_err(|error| error.to_string())?
        } else {
            let plan = DestPlan::parse(&spec.dest)
                .map_err(|error| format!("job {}: {error}", spec.name))?;
            dest::resolve(&plan, &views, &mut self.rng).map_err(|error| error.to_string())?
        };
        if planned.is_empty() {
            return Err(format!("job {}: its dest names no node", spec.name));
        }
        Ok(planned
            .into_iter()
            .map(|copy| RunCopy {
                node: copy.node,
                state: CopyState::Pending as i32,
                background: copy.background,
                ..Default::default()
            })
            .collect())
    }

    /// Moves a pull run's orchestration as far as it can go now.
    fn advance_pulls(&mut self, record: &mut RunRecord, now: i64) -> Result<(), StateError> {
        let step = runs::next_pull_step(record);
        for node in step.start {
            self.renew_snapshot_id_for_reread(record);
            let assignment = self.pull_assignment(record, &node, now);
            // The client's agent serves a pull only to a node it was told of.
            let client = record.run().client.clone();
            if let Some(permit) = pull_permit(&assignment) {
                self.send(&client, permit);
            }
            let text = match self.holders(record.run()) {
                Some((id, holders)) => format!(
                    "copy of {id} assigned to {node}, node to node from {}",
                    holders
                        .iter()
                        .map(|holder| holder.node.as_str())
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
                None => format!("pull assigned to {node}"),
            };
            if self.send(&node, assignment) {
                record.pulls_outstanding.push(node.clone());
                self.copy_event(record, &node, &text, now)?;
            }
        }
        if let Some((ok, message)) = step.done {
            let client = record.run().client.clone();
            let done = CoordinatorMessage {
                kind: Some(coordinator_message::Kind::PullDone(PullDone {
                    run_id: record.id().to_owned(),
                    ok,
                    message: message.clone(),
                })),
            };
            if self.send(&client, done) {
                record.pull_done_sent = true;
                let text = if ok {
                    "every pull committed; told the client".to_owned()
                } else {
                    format!("pulls ended with failures ({message}); told the client")
                };
                self.coordinator_event(record, &text, now)?;
            }
        }
        Ok(())
    }

    /// A node (re)connected: send it what it should be doing and is not.
    fn node_connected(
        &mut self,
        node_id: &str,
        active_runs: &[String],
        now: i64,
    ) -> Result<(), StateError> {
        let ids: Vec<String> = self.active.keys().cloned().collect();
        for id in ids {
            let Some(mut record) = self.active.get(&id).cloned() else {
                continue;
            };
            let has_it = active_runs.contains(&id);
            let is_client = record.run().client == node_id;
            if is_client && record.client_assigned && !has_it && record.client_final == 0 {
                record.client_assigned = false;
                if record.run_kind() == RunKind::Pull {
                    record.ready = false;
                    record.pull_done_sent = false;
                }
                record.waiting_since_ms = now;
                self.coordinator_event(
                    &record,
                    &format!("{node_id} reconnected without this run; assigning it again"),
                    now,
                )?;
            } else if is_client && has_it && record.pull_done_sent {
                // It may not have heard before its session broke.
                record.pull_done_sent = false;
            }
            if is_client && has_it && record.run_kind() == RunKind::Pull {
                // The permits of pulls in flight, in case it lost them.
                for puller in record.pulls_outstanding.clone() {
                    let assignment = self.pull_assignment(&mut record, &puller, now);
                    if let Some(permit) = pull_permit(&assignment) {
                        self.send(node_id, permit);
                    }
                }
            }
            if record.run_kind() == RunKind::Pull
                && record.pulls_outstanding.iter().any(|node| node == node_id)
                && !has_it
            {
                record.pulls_outstanding.retain(|node| node != node_id);
                self.copy_event(
                    &record,
                    node_id,
                    &format!("{node_id} reconnected without this pull; assigning it again"),
                    now,
                )?;
            }
            self.start(&mut record, now)?;
            self.advance_pulls(&mut record, now)?;
            self.save(record)?;
        }
        Ok(())
    }

    /// Applies an update; returns whether it must be flushed (anything but
    /// progress).
    fn run_update(
        &mut self,
        node_id: &str,
        update: &RunUpdate,
        now: i64,
    ) -> Result<bool, StateError> {
        let record = match self.active.get(&update.run_id) {
            Some(record) => Some(record.clone()),
            None => self.store.run(&update.run_id)?,
        };
        let Some(mut record) = record else {
            tracing::warn!(node = %node_id, run = %update.run_id, "update for an unknown run ignored");
            return Ok(false);
        };
        let outcome = runs::apply_update(&mut record, node_id, update, now);
        let durable = outcome.event.is_some() || !outcome.committed.is_empty();
        if let Some(event) = outcome.event {
            self.store_event(event)?;
        }
        if let Some(live) = outcome.progress {
            // Nobody watching is fine.
            let _ = self.events.send(live);
        }
        let is_sync = record.spec().r#type() == SnapshotType::Sync;
        // The copies the coordinator keeps of the run's snapshot: the job's
        // `replicas`, or as many as its plan names.
        let replica_target = match record.spec().replicas {
            0 => u32::try_from(record.run().copies.len()).unwrap_or(u32::MAX),
            replicas => replicas,
        };
        for (snapshot, node) in &outcome.committed {
            let mut entry = snapshot.clone();
            if entry.id.is_empty()
                && let Some(planned) = record.snapshot.as_ref()
            {
                entry.id = planned.id.clone();
            }
            self.store.add_catalog_copy(&entry, node, replica_target)?;
            self.verify_new_copy(&record, &entry.id, node);
            self.offsite_pending(&record.spec(), &entry.id, now)?;
            if is_sync {
                self.replace_sync_snapshots(node, &entry, now)?;
            }
        }
        if record.run_kind() == RunKind::Pull && update.dest_state() == CopyState::Failed {
            let spec = record.spec();
            if let Some(message) = runs::schedule_pull_retry(
                &mut record,
                &update.dest,
                spec.copy_retries,
                spec.copy_retry_min_sleep_ms.max(PULL_RETRY_FLOOR_MS),
                now,
            ) {
                self.copy_event(&record, &update.dest, &message, now)?;
            }
        }
        if outcome.pulls_changed {
            self.advance_pulls(&mut record, now)?;
        }
        // A new good snapshot: what it makes redundant goes once the run is
        // saved (retention looks at the job's last finished run).
        let retention_after = (outcome.finished
            && record.run().state() == RunState::Done
            && !retention_rules(&record.spec()).is_empty())
        .then(|| record.run().job.clone());
        if outcome.finished {
            if record.run_kind() == RunKind::Pull {
                let cancel = CoordinatorMessage {
                    kind: Some(coordinator_message::Kind::Cancel(CancelAssignment {
                        run_id: record.id().to_owned(),
                    })),
                };
                for node in std::mem::take(&mut record.pulls_outstanding) {
                    self.send(&node, cancel.clone());
                }
            }
            let run = record.run();
            tracing::info!(run = %run.id, job = %run.job, state = run.state().as_str_name(), reason = %run.reason, "run ended");
        }
        let spec = record.spec();
        let instances = outcome.instances;
        self.save(record)?;
        if let Some(job) = retention_after {
            match self.apply_retention(&job, false, now) {
                Ok(_) => {}
                Err(EngineError::State(err)) => return Err(err),
                Err(err) => tracing::warn!(%job, error = %err, "retention after a run failed"),
            }
        }
        if !instances.is_empty() {
            for instance in instances {
                self.new_run(&spec, None, Some(&instance), RunKind::Push, now)?;
            }
        }
        Ok(durable)
    }

    /// Returns whether anything changed.
    fn tick(&mut self, now: i64) -> Result<bool, StateError> {
        let mut changed = self.upkeep(now)?;
        changed |= self.gc_upkeep(now)?;
        changed |= self.replication_upkeep(now)?;
        let lost_after = millis(self.settings.lost_after);
        let queue_timeout = millis(self.settings.queue_timeout);
        let mut lost = Vec::new();
        for (id, node) in &mut self.nodes {
            let seen = self.last_seen.get(id).copied().unwrap_or(now);
            if node.state() == NodeState::Online && now.saturating_sub(seen) > lost_after {
                node.state = NodeState::Lost as i32;
                lost.push(node.clone());
            }
        }
        for node in lost {
            let id = node
                .info
                .as_ref()
                .map(|info| info.id.clone())
                .unwrap_or_default();
            if node.stopped {
                tracing::info!(node = %id, "node offline: it ended its session (stopped)");
            } else {
                tracing::warn!(node = %id, "node lost: no heartbeat");
            }
            self.store.put_node(&node)?;
            changed = true;
        }

        let ids: Vec<String> = self.active.keys().cloned().collect();
        for id in ids {
            let Some(mut record) = self.active.get(&id).cloned() else {
                continue;
            };
            let before = record.clone();
            let client = record.run().client.clone();
            let client_connected = self.sessions.contains_key(&client);

            // Pull copies held by a lost or vanished node.
            for node in record.pulls_outstanding.clone() {
                let gone = self
                    .nodes
                    .get(&node)
                    .is_none_or(|known| known.state() == NodeState::Lost);
                if gone {
                    record.pulls_outstanding.retain(|held| held != &node);
                    if let Some(copy) = record
                        .run_mut()
                        .copies
                        .iter_mut()
                        .find(|copy| copy.node == node)
                    {
                        copy.set_state(CopyState::Failed);
                        copy.reason = format!("node {node} was lost during the pull");
                        copy.ended_ms = now;
                    }
                    self.copy_event(
                        &record,
                        &node,
                        &format!("node {node} was lost during the pull"),
                        now,
                    )?;
                    let spec = record.spec();
                    if let Some(message) = runs::schedule_pull_retry(
                        &mut record,
                        &node,
                        spec.copy_retries,
                        spec.copy_retry_min_sleep_ms.max(PULL_RETRY_FLOOR_MS),
                        now,
                    ) {
                        self.copy_event(&record, &node, &message, now)?;
                    }
                }
            }
            // Pull retries whose sleep is over.
            record.pull_retries.retain(|retry| retry.at_ms > now);
            // Pull copies whose node has been away too long.
            if record.run_kind() == RunKind::Pull && record.ready {
                let waiting: Vec<String> = runs::next_pull_step(&record).start;
                for node in waiting {
                    if self.sessions.contains_key(&node) {
                        continue;
                    }
                    let since = self
                        .disconnected_since
                        .get(&node)
                        .copied()
                        .unwrap_or(record.waiting_since_ms)
                        .max(record.waiting_since_ms);
                    if now.saturating_sub(since) > queue_timeout {
                        let reason = format!(
                            "node {node} has not been connected for {}",
                            humantime::format_duration(self.settings.queue_timeout)
                        );
                        if let Some(copy) = record
                            .run_mut()
                            .copies
                            .iter_mut()
                            .find(|copy| copy.node == node)
                        {
                            copy.set_state(CopyState::Failed);
                            copy.reason = reason.clone();
                            copy.ended_ms = now;
                        }
                        self.copy_event(&record, &node, &reason, now)?;
                    }
                }
            }

            if !record.client_assigned {
                if now.saturating_sub(record.waiting_since_ms) > queue_timeout {
                    let why = if record.waiting_for.is_empty() {
                        "waiting for its nodes".to_owned()
                    } else {
                        record.waiting_for.clone()
                    };
                    let reason = format!(
                        "queued for more than {}: {why}",
                        humantime::format_duration(self.settings.queue_timeout)
                    );
                    runs::finish(&mut record, RunState::Failed, &reason, now);
                    self.coordinator_event(&record, &reason, now)?;
                } else {
                    self.start(&mut record, now)?;
                }
            } else if !client_connected && record.client_final == 0 {
                let since = self.disconnected_since.get(&client).copied().unwrap_or(now);
                if now.saturating_sub(since) > queue_timeout {
                    let reason = format!(
                        "client node {client} has been disconnected for more than {}",
                        humantime::format_duration(self.settings.queue_timeout)
                    );
                    runs::finish(&mut record, RunState::Failed, &reason, now);
                    self.coordinator_event(&record, &reason, now)?;
                }
            }
            self.advance_pulls(&mut record, now)?;
            if record != before {
                changed = true;
                self.save(record)?;
            }
        }
        Ok(changed)
    }
}
