//! A node's metrics (storage node and agent): the counters, gauges and
//! histograms the rest of the node updates, and the [`MetricsSource`] the
//! metrics port renders at each scrape.
//!
//! Names start with `fabric_node_` (storage) or `fabric_agent_` (agent).
//! Labels are bounded: a refusal's reason, a result (`ok`, `failed`), a
//! job's name; never a snapshot or run id, a host or a path.
//!
//! This module owns the metric definitions and the gauges read at scrape
//! time (store size and free space, packs, the scrub's progress, damaged
//! chunks). It never decides anything from a metric, and a scrape never
//! reads the chunk index or a tree: only the pack files' sizes, the file
//! system's free space and the scrub's state in memory.

use std::sync::Arc;
use std::time::Instant;

use fabric_chunkstore::Store;
use fabric_trust::metrics_port::MetricsSource;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::scrub::Scrub;

/// Why a storage node refused a request, as the `reason` label of
/// `fabric_node_refused_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// The store cannot take writes (too little free space, a failed fsync).
    NoSpace,
    /// An upload would take its host over the node's host quota.
    HostQuota,
    /// A batch would take a run over its job's quota.
    JobQuota,
    /// A commit sooner after its job's last snapshot than `min_interval`.
    TooSoon,
    /// A caller asked for something its name may not touch (another host's
    /// snapshot, a copy it may not make).
    NotPermitted,
    /// The sender went quiet for longer than the idle timeout.
    IdleTimeout,
    /// A malformed request or a chunk that does not match its id.
    BadRequest,
}

impl RefusalReason {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            RefusalReason::NoSpace => "no_space",
            RefusalReason::HostQuota => "host_quota",
            RefusalReason::JobQuota => "job_quota",
            RefusalReason::TooSoon => "too_soon",
            RefusalReason::NotPermitted => "not_permitted",
            RefusalReason::IdleTimeout => "idle_timeout",
            RefusalReason::BadRequest => "bad_request",
        }
    }

    /// The reason of a transfer that ended with `status`, if it was a
    /// refusal (a cancel or an internal error is not).
    pub fn of_status(status: &tonic::Status) -> Option<Self> {
        use tonic::Code;
        match status.code() {
            // The three refusals RESOURCE_EXHAUSTED carries, told apart by
            // the start of their messages (`StoreError::OverQuota`,
            // `JobBudget`, `StoreError::TooSoon`).
            Code::ResourceExhausted => {
                let message = status.message();
                if message.starts_with("host ") {
                    Some(RefusalReason::HostQuota)
                } else if message.contains("min_interval") {
                    Some(RefusalReason::TooSoon)
                } else {
                    Some(RefusalReason::JobQuota)
                }
            }
            Code::Unavailable if status.message().contains("cannot accept writes") => {
                Some(RefusalReason::NoSpace)
            }
            Code::PermissionDenied => Some(RefusalReason::NotPermitted),
            Code::DeadlineExceeded => Some(RefusalReason::IdleTimeout),
            Code::InvalidArgument | Code::OutOfRange | Code::DataLoss => {
                Some(RefusalReason::BadRequest)
            }
            _ => None,
        }
    }
}

/// The `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// [`RefusalReason::label`].
    pub reason: &'static str,
}

/// The `result` label: `ok` or `failed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or `failed`.
    pub result: &'static str,
}

impl ResultLabel {
    /// `ok` when `ok`, else `failed`.
    pub fn of(ok: bool) -> Self {
        Self {
            result: if ok { "ok" } else { "failed" },
        }
    }
}

/// The `fabric_job` label: a fabric job's name. Not `job`, which
/// Prometheus sets on every series to its own scrape job.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabel {
    /// The job's name.
    pub fabric_job: String,
}

type DurationFamily = Family<ResultLabel, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 0.1 s to about 1.9 days.
    Histogram::new(exponential_buckets(0.1, 4.0, 12))
}

/// Every metric of a node. Cheap to clone: clones update the same values.
/// A default value is registered nowhere (for tests and the embedded
/// fabric, whose servers have no metrics port).
#[derive(Clone)]
pub struct NodeMetrics {
    /// Chunk bytes received by uploads, copies and pulls (as sent).
    pub received_bytes: Counter,
    /// Bytes newly written to the store (compressed).
    pub stored_bytes: Counter,
    /// Chunks newly written to the store.
    pub stored_chunks: Counter,
    /// Logical bytes of committed snapshots the store did not need to
    /// write again: each commit adds its snapshot's `total_bytes` less the
    /// plain bytes its transfer added.
    pub deduplicated_bytes: Counter,
    /// Snapshots committed by transfers into this node.
    pub committed_snapshots: Counter,
    /// How long uploads (and copies into this node) took, by result.
    pub upload_duration: DurationFamily,
    /// How long restore streams took, by result.
    pub restore_duration: DurationFamily,
    /// Uploads in progress.
    pub active_uploads: Gauge,
    /// Restores in progress.
    pub active_restores: Gauge,
    /// Requests refused, by reason.
    pub refused_requests: Family<ReasonLabel, Counter>,
    /// Garbage collections, by result.
    pub gc_runs: Family<ResultLabel, Counter>,
    /// Bytes garbage collection reclaimed (packs deleted or shrunk).
    pub gc_reclaimed_bytes: Counter,
    /// 1 while a garbage collection runs.
    pub gc_running: Gauge,
    /// Bytes of all pack files (read at scrape).
    store_bytes: Gauge,
    /// Pack files (read at scrape).
    store_packs: Gauge,
    /// Free bytes on the store's file system (read at scrape).
    free_bytes: Gauge,
    /// Size of the store's file system (read at scrape).
    capacity_bytes: Gauge,
    /// Packs the scrub read in its pass in progress.
    scrub_packs_read: Gauge,
    /// Packs in the store as the scrub last counted them.
    scrub_packs: Gauge,
    /// Bytes the scrub read in its pass in progress.
    scrub_pass_bytes: Gauge,
    /// When the scrub's last full pass ended (Unix seconds; 0: none yet).
    scrub_last_pass_end: Gauge,
    /// Damaged chunks the scrub found and no repair fixed yet.
    damaged_chunks: Gauge,
    /// Agent: bytes of file content read by backups.
    pub agent_read_bytes: Counter,
    /// Agent: chunk bytes sent by backups (as sent, compressed).
    pub agent_sent_bytes: Counter,
    /// Agent: files backed up (read or reused from the parent).
    pub agent_files: Counter,
    /// Agent: backups in progress, by job.
    pub agent_active_backups: Family<JobLabel, Gauge>,
    /// Agent: files of the backup in progress, by job.
    pub agent_backup_files: Family<JobLabel, Gauge>,
    /// Agent: bytes read by the backup in progress, by job.
    pub agent_backup_read_bytes: Family<JobLabel, Gauge>,
    /// Agent: bytes sent by the backup in progress, by job.
    pub agent_backup_sent_bytes: Family<JobLabel, Gauge>,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self {
            received_bytes: Counter::default(),
            stored_bytes: Counter::default(),
            stored_chunks: Counter::default(),
            deduplicated_bytes: Counter::default(),
            committed_snapshots: Counter::default(),
            upload_duration: Family::new_with_constructor(duration_histogram),
            restore_duration: Family::new_with_constructor(duration_histogram),
            active_uploads: Gauge::default(),
            active_restores: Gauge::default(),
            refused_requests: Family::default(),
            gc_runs: Family::default(),
            gc_reclaimed_bytes: Counter::default(),
            gc_running: Gauge::default(),
            store_bytes: Gauge::default(),
            store_packs: Gauge::default(),
            free_bytes: Gauge::default(),
            capacity_bytes: Gauge::default(),
            scrub_packs_read: Gauge::default(),
            scrub_packs: Gauge::default(),
            scrub_pass_bytes: Gauge::default(),
            scrub_last_pass_end: Gauge::default(),
            damaged_chunks: Gauge::default(),
            agent_read_bytes: Counter::default(),
            agent_sent_bytes: Counter::default(),
            agent_files: Counter::default(),
            agent_active_backups: Family::default(),
            agent_backup_files: Family::default(),
            agent_backup_read_bytes: Family::default(),
            agent_backup_sent_bytes: Family::default(),
        }
    }
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMetrics").finish_non_exhaustive()
    }
}

/// A gauge's value from a count that may not fit in an `i64`.
fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl NodeMetrics {
    /// Record one refusal.
    pub fn refused(&self, reason: RefusalReason) {
        self.refused_requests
            .get_or_create(&ReasonLabel {
                reason: reason.label(),
            })
            .inc();
    }

    /// Record what a committed transfer added: `total_bytes` of the
    /// snapshot's files, of which `new_bytes` were new to the store.
    pub fn committed(&self, total_bytes: u64, new_bytes: u64) {
        self.committed_snapshots.inc();
        self.deduplicated_bytes
            .inc_by(total_bytes.saturating_sub(new_bytes));
    }

    /// A guard counting one upload in progress; dropped, it records the
    /// upload's duration under its result ([`ActiveTransfer::succeeded`]).
    pub fn upload_started(&self) -> ActiveTransfer {
        ActiveTransfer::start(self.active_uploads.clone(), self.upload_duration.clone())
    }

    /// The same for a restore stream.
    pub fn restore_started(&self) -> ActiveTransfer {
        ActiveTransfer::start(self.active_restores.clone(), self.restore_duration.clone())
    }

    /// A guard marking a garbage collection as running; record its end with
    /// [`GcInProgress::finished`] (dropped without it: failed).
    pub fn gc_started(&self) -> GcInProgress {
        self.gc_running.inc();
        GcInProgress {
            metrics: self.clone(),
            recorded: false,
        }
    }

    /// The registry of a node with a store (`storage`) and/or an agent.
    pub fn register(&self, storage: bool, agent: bool) -> Registry {
        let mut registry = Registry::with_prefix("fabric");
        if storage {
            let node = registry.sub_registry_with_prefix("node");
            node.register(
                "received_bytes",
                "Chunk bytes received by uploads, copies and pulls, as sent",
                self.received_bytes.clone(),
            );
            node.register(
                "stored_bytes",
                "Bytes newly written to the store, compressed",
                self.stored_bytes.clone(),
            );
            node.register(
                "stored_chunks",
                "Chunks newly written to the store",
                self.stored_chunks.clone(),
            );
            node.register(
                "deduplicated_bytes",
                "Logical bytes of committed snapshots the store did not write again",
                self.deduplicated_bytes.clone(),
            );
            node.register(
                "committed_snapshots",
                "Snapshots committed by transfers into this node",
                self.committed_snapshots.clone(),
            );
            node.register(
                "upload_duration_seconds",
                "How long uploads and copies into this node took, by result",
                self.upload_duration.clone(),
            );
            node.register(
                "restore_duration_seconds",
                "How long restore streams took, by result",
                self.restore_duration.clone(),
            );
            node.register(
                "active_uploads",
                "Uploads in progress",
                self.active_uploads.clone(),
            );
            node.register(
                "active_restores",
                "Restores in progress",
                self.active_restores.clone(),
            );
            node.register(
                "refused_requests",
                "Requests refused, by reason",
                self.refused_requests.clone(),
            );
            node.register(
                "gc_runs",
                "Garbage collections, by result",
                self.gc_runs.clone(),
            );
            node.register(
                "gc_reclaimed_bytes",
                "Bytes garbage collection reclaimed",
                self.gc_reclaimed_bytes.clone(),
            );
            node.register(
                "gc_running",
                "1 while a garbage collection runs",
                self.gc_running.clone(),
            );
            node.register(
                "store_bytes",
                "Bytes of all pack files",
                self.store_bytes.clone(),
            );
            node.register("store_packs", "Pack files", self.store_packs.clone());
            node.register(
                "free_bytes",
                "Free bytes on the store's file system",
                self.free_bytes.clone(),
            );
            node.register(
                "capacity_bytes",
                "Size of the store's file system",
                self.capacity_bytes.clone(),
            );
            node.register(
                "scrub_packs_read",
                "Packs the scrub read in its pass in progress",
                self.scrub_packs_read.clone(),
            );
            node.register(
                "scrub_packs",
                "Packs in the store as the scrub last counted them",
                self.scrub_packs.clone(),
            );
            node.register(
                "scrub_pass_bytes",
                "Bytes the scrub read in its pass in progress",
                self.scrub_pass_bytes.clone(),
            );
            node.register(
                "scrub_last_pass_end_timestamp_seconds",
                "When the scrub's last full pass ended (0: none yet)",
                self.scrub_last_pass_end.clone(),
            );
            node.register(
                "damaged_chunks",
                "Damaged chunks the scrub found that no repair fixed yet",
                self.damaged_chunks.clone(),
            );
        }
        if agent {
            let agent = registry.sub_registry_with_prefix("agent");
            agent.register(
                "read_bytes",
                "Bytes of file content backups read",
                self.agent_read_bytes.clone(),
            );
            agent.register(
                "sent_bytes",
                "Chunk bytes backups sent, as sent",
                self.agent_sent_bytes.clone(),
            );
            agent.register(
                "files",
                "Files backups covered (read or reused from the parent)",
                self.agent_files.clone(),
            );
            agent.register(
                "active_backups",
                "Backups in progress, by job",
                self.agent_active_backups.clone(),
            );
            agent.register(
                "backup_files",
                "Files of the backup in progress, by job",
                self.agent_backup_files.clone(),
            );
            agent.register(
                "backup_read_bytes",
                "Bytes read by the backup in progress, by job",
                self.agent_backup_read_bytes.clone(),
            );
            agent.register(
                "backup_sent_bytes",
                "Bytes sent by the backup in progress, by job",
                self.agent_backup_sent_bytes.clone(),
            );
        }
        registry
    }

    /// Read the gauges that are state, not events: the store's pack files
    /// and free space, and the scrub's progress. Runs on a blocking thread.
    fn refresh(&self, store: Option<&Store>, scrub: Option<&Scrub>) {
        if let Some(store) = store {
            if let Ok(packs) = store.pack_ids() {
                let bytes: u64 = packs
                    .iter()
                    .filter_map(|id| std::fs::metadata(store.pack_path(*id)).ok())
                    .map(|metadata| metadata.len())
                    .sum();
                self.store_packs.set(clamp(packs.len() as u64));
                self.store_bytes.set(clamp(bytes));
            }
            if let Ok((capacity, free)) = crate::disk::space(store.dir()) {
                self.capacity_bytes.set(clamp(capacity));
                self.free_bytes.set(clamp(free));
            }
        }
        if let Some(scrub) = scrub {
            let progress = scrub.progress();
            self.scrub_packs_read.set(i64::from(progress.packs_read));
            self.scrub_packs.set(i64::from(progress.packs));
            self.scrub_pass_bytes.set(clamp(progress.bytes_this_pass));
            self.scrub_last_pass_end.set(progress.last_pass_ms / 1000);
            self.damaged_chunks.set(clamp(progress.damaged_chunks));
        }
    }
}

/// One upload or restore in progress (see [`NodeMetrics::upload_started`]).
pub struct ActiveTransfer {
    active: Gauge,
    durations: DurationFamily,
    started: Instant,
    ok: bool,
}

impl ActiveTransfer {
    fn start(active: Gauge, durations: DurationFamily) -> Self {
        active.inc();
        Self {
            active,
            durations,
            started: Instant::now(),
            ok: false,
        }
    }

    /// The transfer succeeded (else it is recorded as failed).
    pub fn succeeded(&mut self) {
        self.ok = true;
    }
}

impl Drop for ActiveTransfer {
    fn drop(&mut self) {
        self.active.dec();
        self.durations
            .get_or_create(&ResultLabel::of(self.ok))
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// A garbage collection in progress (see [`NodeMetrics::gc_started`]).
pub struct GcInProgress {
    metrics: NodeMetrics,
    recorded: bool,
}

impl GcInProgress {
    /// It ended, `ok` or not, having freed `bytes_freed`.
    pub fn finished(mut self, ok: bool, bytes_freed: u64) {
        self.recorded = true;
        self.metrics.gc_reclaimed_bytes.inc_by(bytes_freed);
        self.metrics
            .gc_runs
            .get_or_create(&ResultLabel::of(ok))
            .inc();
    }
}

impl Drop for GcInProgress {
    fn drop(&mut self) {
        self.metrics.gc_running.dec();
        if !self.recorded {
            self.metrics
                .gc_runs
                .get_or_create(&ResultLabel::of(false))
                .inc();
        }
    }
}

/// One backup this agent pushes: its job's gauges while it runs, the
/// agent's counters when it ends (when this is dropped, at the end of the
/// push, whatever its outcome).
pub struct AgentBackup {
    shared: Arc<AgentBackupShared>,
    /// Set once the push committed, with its exact figures.
    done: Option<(u64, u64, u64)>,
}

/// What the push's progress function updates.
#[derive(Clone)]
pub struct AgentBackupProgress {
    shared: Arc<AgentBackupShared>,
}

struct AgentBackupShared {
    metrics: NodeMetrics,
    job: JobLabel,
    /// The last progress seen: files, bytes read, bytes sent.
    last: std::sync::Mutex<(u64, u64, u64)>,
}

impl AgentBackup {
    /// A backup of `job` starts.
    pub fn start(metrics: &NodeMetrics, job: &str) -> Self {
        let job = JobLabel {
            fabric_job: job.to_owned(),
        };
        metrics.agent_active_backups.get_or_create(&job).inc();
        Self {
            shared: Arc::new(AgentBackupShared {
                metrics: metrics.clone(),
                job,
                last: std::sync::Mutex::new((0, 0, 0)),
            }),
            done: None,
        }
    }

    /// For the push's progress function.
    pub fn progress(&self) -> AgentBackupProgress {
        AgentBackupProgress {
            shared: self.shared.clone(),
        }
    }

    /// It committed: the counters take the snapshot's own figures (files,
    /// bytes read) and the bytes the push sent.
    pub fn succeeded(&mut self, outcome: &crate::agent::PushOutcome) {
        let stats = outcome.snapshot.stats.unwrap_or_default();
        self.done = Some((stats.files, stats.bytes_read, outcome.bytes_sent));
    }
}

impl AgentBackupProgress {
    /// The backup's progress so far.
    pub fn update(&self, progress: &crate::agent::PushProgress) {
        let shared = &self.shared;
        let figures = (progress.files, progress.bytes_read, progress.bytes_sent);
        *shared.last.lock().unwrap_or_else(|p| p.into_inner()) = figures;
        let metrics = &shared.metrics;
        metrics
            .agent_backup_files
            .get_or_create(&shared.job)
            .set(clamp(figures.0));
        metrics
            .agent_backup_read_bytes
            .get_or_create(&shared.job)
            .set(clamp(figures.1));
        metrics
            .agent_backup_sent_bytes
            .get_or_create(&shared.job)
            .set(clamp(figures.2));
    }
}

impl Drop for AgentBackup {
    fn drop(&mut self) {
        let shared = &self.shared;
        let (files, read, sent) = self
            .done
            .unwrap_or_else(|| *shared.last.lock().unwrap_or_else(|p| p.into_inner()));
        shared.metrics.agent_files.inc_by(files);
        shared.metrics.agent_read_bytes.inc_by(read);
        shared.metrics.agent_sent_bytes.inc_by(sent);
        shared
            .metrics
            .agent_active_backups
            .get_or_create(&shared.job)
            .dec();
    }
}

/// What a node's metrics port renders: its registry, with the state gauges
/// read just before.
pub struct NodeMetricsSource {
    registry: Registry,
    metrics: NodeMetrics,
    store: Option<Arc<Store>>,
    scrub: Option<Scrub>,
}

impl NodeMetricsSource {
    /// The metrics of a node with `store` (a storage node) and `scrub`.
    pub fn new(
        registry: Registry,
        metrics: NodeMetrics,
        store: Option<Arc<Store>>,
        scrub: Option<Scrub>,
    ) -> Self {
        Self {
            registry,
            metrics,
            store,
            scrub,
        }
    }
}

impl MetricsSource for NodeMetricsSource {
    fn render(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + '_>>
    {
        Box::pin(async move {
            let metrics = self.metrics.clone();
            let store = self.store.clone();
            let scrub = self.scrub.clone();
            tokio::task::spawn_blocking(move || metrics.refresh(store.as_deref(), scrub.as_ref()))
                .await
                .map_err(|err| err.to_string())?;
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &self.registry)
                .map_err(|err| err.to_string())?;
            Ok(text)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(status: tonic::Status) -> Option<&'static str> {
        RefusalReason::of_status(&status).map(RefusalReason::label)
    }

    #[test]
    fn refusals_are_told_apart_by_their_status() {
        let over_host =
            crate::status::status_from_store_error(fabric_chunkstore::StoreError::OverQuota {
                host: "web1".into(),
                used: 1,
                adding: 2,
                limit: 2,
            });
        assert_eq!(reason(over_host), Some("host_quota"));
        let over_job = tonic::Status::resource_exhausted(
            "job \"hosts\" would go over its quota of 10 bytes: this run may store 1 more bytes",
        );
        assert_eq!(reason(over_job), Some("job_quota"));
        let too_soon = tonic::Status::resource_exhausted(
            "job \"a\" of host \"b\" had a snapshot too recently: the next is allowed from X on (the node's min_interval)",
        );
        assert_eq!(reason(too_soon), Some("too_soon"));
        assert_eq!(
            reason(tonic::Status::permission_denied("x")),
            Some("not_permitted")
        );
        assert_eq!(
            reason(tonic::Status::cancelled("the sender went away")),
            None
        );
    }

    #[test]
    fn an_upload_counts_while_it_runs_and_records_its_result() {
        let metrics = NodeMetrics::default();
        let mut upload = metrics.upload_started();
        assert_eq!(metrics.active_uploads.get(), 1);
        upload.succeeded();
        drop(upload);
        drop(metrics.upload_started());
        assert_eq!(metrics.active_uploads.get(), 0);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.register(true, false))
            .expect("encodes");
        assert!(
            text.contains("fabric_node_upload_duration_seconds_count{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fabric_node_upload_duration_seconds_count{result=\"failed\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn dedup_is_what_a_commit_did_not_add() {
        let metrics = NodeMetrics::default();
        metrics.committed(1000, 300);
        metrics.committed(100, 400);
        assert_eq!(metrics.deduplicated_bytes.get(), 700);
        assert_eq!(metrics.committed_snapshots.get(), 2);
    }
}
