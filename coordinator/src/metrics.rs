//! The coordinator's metrics: what the engine counts as runs end, the
//! scheduler's lag, and the state read at each scrape (runs by state, nodes
//! by state, each job's freshness and check verdict, under-replicated
//! copies, damaged snapshots), rendered for the metrics port.
//!
//! Names start with `fabric_coordinator_`. Labels are bounded: a job's name,
//! a run's or node's state; never a run or snapshot id, a host or a node id.
//!
//! This module owns the metric definitions and [`EngineFigures`], a pure
//! summary the engine fills under its lock. It never changes the engine's
//! state and decides nothing from a metric.

use std::collections::BTreeMap;
use std::sync::Arc;

use fabric_proto::v1::{CheckStatus, RunState};
use fabric_trust::metrics_port::MetricsSource;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::Engine;

/// The `fabric_job` label: a fabric job's name. Not `job`, which
/// Prometheus sets on every series to its own scrape job.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabel {
    /// The job's name.
    pub fabric_job: String,
}

/// The `state` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// A state word: `queued`, `online`...
    pub state: &'static str,
}

/// The `fabric_job` and `state` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobStateLabels {
    /// The job's name.
    pub fabric_job: String,
    /// `done`, `failed` or `cancelled`.
    pub state: &'static str,
}

type DurationFamily = Family<JobLabel, Histogram, fn() -> Histogram>;

fn run_duration_histogram() -> Histogram {
    // 1 s to about 3 days.
    Histogram::new(exponential_buckets(1.0, 4.0, 10))
}

/// The word of a run state for labels (`queued`, `done`...).
pub fn run_state_word(state: RunState) -> &'static str {
    match state {
        RunState::Unspecified => "unspecified",
        RunState::Queued => "queued",
        RunState::Pre => "pre",
        RunState::Copying => "copying",
        RunState::Post => "post",
        RunState::Done => "done",
        RunState::Failed => "failed",
        RunState::Cancelled => "cancelled",
    }
}

/// What the engine reports at each scrape, read under its lock.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineFigures {
    /// Runs not ended, by state.
    pub active_runs: BTreeMap<&'static str, i64>,
    /// Nodes by state (`online`, `lost`).
    pub nodes: BTreeMap<&'static str, i64>,
    /// Nodes being drained.
    pub draining_nodes: i64,
    /// Per job: its check verdict and, when it has one, seconds since the
    /// end of its newest good snapshot.
    pub jobs: BTreeMap<String, JobFigures>,
}

/// One job's figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobFigures {
    /// The check's verdict.
    pub status: CheckStatus,
    /// Seconds since its newest good snapshot ended (`None`: none yet).
    pub seconds_since_good: Option<f64>,
    /// Copies its snapshots lack to reach their replica targets.
    pub missing_copies: i64,
    /// Its snapshots whose every copy is damaged.
    pub damaged_snapshots: i64,
}

/// The coordinator's event metrics (the scrape-time ones are registered
/// by [`CoordinatorMetricsSource`]). Cheap to clone; a default value is
/// registered nowhere.
#[derive(Clone)]
pub struct CoordinatorMetrics {
    /// Runs ended, by job and final state.
    pub runs_finished: Family<JobStateLabels, Counter>,
    /// How long runs took from creation to end, by job.
    pub run_duration: DurationFamily,
    /// How late the engine's last periodic tick ran after it was due, plus
    /// how long it took: the delay a due schedule may see.
    pub scheduler_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        Self {
            runs_finished: Family::default(),
            run_duration: Family::new_with_constructor(run_duration_histogram),
            scheduler_lag_seconds: Gauge::default(),
        }
    }
}

impl std::fmt::Debug for CoordinatorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorMetrics").finish_non_exhaustive()
    }
}

impl CoordinatorMetrics {
    /// A run of `job` ended in `state` after `duration_ms`.
    pub fn run_finished(&self, job: &str, state: RunState, duration_ms: i64) {
        self.runs_finished
            .get_or_create(&JobStateLabels {
                fabric_job: job.to_owned(),
                state: run_state_word(state),
            })
            .inc();
        self.run_duration
            .get_or_create(&JobLabel {
                fabric_job: job.to_owned(),
            })
            .observe(duration_ms.max(0) as f64 / 1000.0);
    }
}

/// The scrape-time gauges.
#[derive(Default)]
struct StateGauges {
    runs: Family<StateLabel, Gauge>,
    queue_depth: Gauge,
    nodes: Family<StateLabel, Gauge>,
    draining_nodes: Gauge,
    seconds_since_good: Family<JobLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    check_status: Family<JobLabel, Gauge>,
    under_replicated: Family<JobLabel, Gauge>,
    damaged_snapshots: Family<JobLabel, Gauge>,
}

/// What the coordinator's metrics port renders: the engine's figures read
/// at each scrape, and the event metrics.
pub struct CoordinatorMetricsSource {
    engine: Arc<Engine>,
    registry: Registry,
    gauges: StateGauges,
    /// One scrape at a time: the gauges are set, then encoded.
    rendering: tokio::sync::Mutex<()>,
}

impl CoordinatorMetricsSource {
    /// The metrics of `engine`, with its event metrics `metrics`.
    pub fn new(engine: Arc<Engine>, metrics: &CoordinatorMetrics) -> Self {
        let gauges = StateGauges::default();
        let mut registry = Registry::with_prefix("fabric_coordinator");
        registry.register("runs", "Runs not ended, by state", gauges.runs.clone());
        registry.register(
            "queue_depth",
            "Runs queued, waiting for their nodes or a worker",
            gauges.queue_depth.clone(),
        );
        registry.register(
            "runs_finished",
            "Runs ended, by job and final state",
            metrics.runs_finished.clone(),
        );
        registry.register(
            "run_duration_seconds",
            "How long runs took from creation to end, by job",
            metrics.run_duration.clone(),
        );
        registry.register(
            "scheduler_lag_seconds",
            "How late the last periodic tick ran after it was due, plus how long it took",
            metrics.scheduler_lag_seconds.clone(),
        );
        registry.register(
            "nodes",
            "Nodes by state (online, lost)",
            gauges.nodes.clone(),
        );
        registry.register(
            "draining_nodes",
            "Nodes being drained",
            gauges.draining_nodes.clone(),
        );
        registry.register(
            "job_seconds_since_good_snapshot",
            "Seconds since the newest good snapshot of a job ended (absent: none yet)",
            gauges.seconds_since_good.clone(),
        );
        registry.register(
            "job_check_status",
            "The check's verdict on a job: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN",
            gauges.check_status.clone(),
        );
        registry.register(
            "under_replicated_copies",
            "Copies a job's snapshots lack to reach their replica targets",
            gauges.under_replicated.clone(),
        );
        registry.register(
            "damaged_snapshots",
            "Snapshots of a job whose every copy is damaged",
            gauges.damaged_snapshots.clone(),
        );
        Self {
            engine,
            registry,
            gauges,
            rendering: tokio::sync::Mutex::new(()),
        }
    }

    /// Set the gauges to `figures`, dropping series of jobs and states
    /// that are gone.
    fn apply(&self, figures: &EngineFigures) {
        let gauges = &self.gauges;
        gauges.runs.clear();
        for state in [
            RunState::Queued,
            RunState::Pre,
            RunState::Copying,
            RunState::Post,
        ] {
            let word = run_state_word(state);
            let count = figures.active_runs.get(word).copied().unwrap_or(0);
            gauges
                .runs
                .get_or_create(&StateLabel { state: word })
                .set(count);
        }
        gauges
            .queue_depth
            .set(figures.active_runs.get("queued").copied().unwrap_or(0));
        gauges.nodes.clear();
        for word in ["online", "lost"] {
            let count = figures.nodes.get(word).copied().unwrap_or(0);
            gauges
                .nodes
                .get_or_create(&StateLabel { state: word })
                .set(count);
        }
        gauges.draining_nodes.set(figures.draining_nodes);
        gauges.seconds_since_good.clear();
        gauges.check_status.clear();
        gauges.under_replicated.clear();
        gauges.damaged_snapshots.clear();
        for (job, job_figures) in &figures.jobs {
            let label = JobLabel {
                fabric_job: job.clone(),
            };
            if let Some(seconds) = job_figures.seconds_since_good {
                gauges.seconds_since_good.get_or_create(&label).set(seconds);
            }
            gauges
                .check_status
                .get_or_create(&label)
                .set(job_figures.status as i64);
            gauges
                .under_replicated
                .get_or_create(&label)
                .set(job_figures.missing_copies);
            gauges
                .damaged_snapshots
                .get_or_create(&label)
                .set(job_figures.damaged_snapshots);
        }
    }
}

impl MetricsSource for CoordinatorMetricsSource {
    fn render(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + '_>>
    {
        Box::pin(async move {
            let _one_at_a_time = self.rendering.lock().await;
            let figures = self
                .engine
                .metrics_figures()
                .await
                .map_err(|err| err.to_string())?;
            self.apply(&figures);
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &self.registry)
                .map_err(|err| err.to_string())?;
            Ok(text)
        })
    }
}
