//! The commands that talk to a coordinator or a node: each builds its
//! request, calls, and prints rows. No business logic lives here: the
//! coordinator validates jobs, the node checks restores.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use fabric_chunkstore::restore::{ExistingEntries, RestorePolicy, RestoreStats};
use fabric_proto::v1::{
    CancelRunRequest, CopyState, GetJobRequest, GetRunRequest, Job, ListJobsRequest,
    ListRunsRequest, Node, NodeState, RetryRunRequest, Run, RunEvent, RunState, Snapshot,
    SubmitJobsRequest, TransferProgress, VerifyReport, VerifyRequest, WatchRunRequest,
};
use futures::StreamExt;
use serde::Serialize;

use crate::output::{self, OutputFormat, Row, bytes, duration_ms, time_ms};
use crate::remote::{self, Remote, status_error};
use crate::{browse, revision};

/// The lower-case name of a proto enum value, without its prefix
/// (`RUN_STATE_COPYING` -> `copying`).
fn enum_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix).unwrap_or(full).to_lowercase()
}

fn run_state(state: RunState) -> String {
    enum_name(state.as_str_name(), "RUN_STATE_")
}

fn copy_state(state: CopyState) -> String {
    enum_name(state.as_str_name(), "COPY_STATE_")
}

fn parse_run_state(text: &str) -> anyhow::Result<RunState> {
    RunState::from_str_name(&format!("RUN_STATE_{}", text.to_uppercase()))
        .filter(|state| *state != RunState::Unspecified)
        .ok_or_else(|| {
            anyhow!("unknown run state {text:?}: use queued, pre, copying, post, done, failed or cancelled")
        })
}

#[derive(Serialize)]
struct JobRow {
    name: String,
    direction: String,
    client: String,
    dest: String,
    replicas: u32,
    interval_s: u64,
    last_run: String,
    last_state: String,
    /// Scheduled jobs: the next run's time and the tags it carries.
    next_run: String,
    next_run_tags: Vec<String>,
    /// Its schedule is held.
    paused: bool,
    submitted_by: String,
    /// `TIME BY CHANGE`, oldest first.
    history: Vec<String>,
}

impl Row for JobRow {
    fn headers() -> &'static [&'static str] {
        &[
            "name",
            "direction",
            "client",
            "dest",
            "interval",
            "last run",
            "state",
            "next run",
        ]
    }
    fn cells(&self) -> Vec<String> {
        let dest = if self.replicas > 0 {
            format!("replicas={}", self.replicas)
        } else {
            self.dest.clone()
        };
        let interval = if self.interval_s == 0 {
            "-".to_owned()
        } else {
            fabric_proto::duration_word(self.interval_s)
        };
        vec![
            self.name.clone(),
            self.direction.clone(),
            self.client.clone(),
            dest,
            interval,
            self.last_run.clone(),
            self.last_state.clone(),
            if self.paused {
                "paused".to_owned()
            } else if self.next_run.is_empty() {
                "-".to_owned()
            } else {
                format!("{} {}", self.next_run, self.next_run_tags.join(","))
            },
        ]
    }
}

fn job_row(job: &Job) -> JobRow {
    let spec = job.spec.clone().unwrap_or_default();
    JobRow {
        direction: enum_name(spec.direction().as_str_name(), "DIRECTION_"),
        name: spec.name,
        client: spec.client,
        dest: spec.dest,
        replicas: spec.replicas,
        interval_s: spec.interval_s,
        last_run: job
            .last_run
            .as_ref()
            .map(|r| r.id.clone())
            .unwrap_or_default(),
        last_state: job
            .last_run
            .as_ref()
            .map(|r| run_state(r.state()))
            .unwrap_or_else(|| "-".into()),
        next_run: if job.next_run_ms > 0 {
            time_ms(job.next_run_ms)
        } else {
            String::new()
        },
        next_run_tags: job.next_run_tags.clone(),
        paused: job.paused,
        submitted_by: job.submitted_by.clone(),
        history: job
            .history
            .iter()
            .map(|change| {
                format!(
                    "{} {} {}",
                    time_ms(change.time_ms),
                    change.by,
                    change.change
                )
            })
            .collect(),
    }
}

#[derive(Serialize)]
struct RunRow {
    id: String,
    /// The shortest prefix of the id no other run shares.
    short_id: String,
    job: String,
    instance: String,
    client: String,
    state: String,
    copies: Vec<CopyRow>,
    created: String,
    ended: String,
    reason: String,
}

#[derive(Serialize)]
struct CopyRow {
    node: String,
    state: String,
    attempts: u32,
    background: bool,
    snapshot_id: String,
    bytes_sent: u64,
    reason: String,
}

impl Row for RunRow {
    fn headers() -> &'static [&'static str] {
        &[
            "id", "job", "instance", "state", "copies", "created", "reason",
        ]
    }
    fn cells(&self) -> Vec<String> {
        let copies = self
            .copies
            .iter()
            .map(|c| format!("{}:{}", c.node, c.state))
            .collect::<Vec<_>>()
            .join(" ");
        vec![
            self.short_id.clone(),
            self.job.clone(),
            self.instance.clone(),
            self.state.clone(),
            copies,
            self.created.clone(),
            self.reason.clone(),
        ]
    }
}

fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

fn run_row(run: &Run) -> RunRow {
    RunRow {
        id: run.id.clone(),
        short_id: if run.short_id.is_empty() {
            run.id.clone()
        } else {
            run.short_id.clone()
        },
        job: run.job.clone(),
        instance: run.instance.clone(),
        client: run.client.clone(),
        state: run_state(run.state()),
        copies: run
            .copies
            .iter()
            .map(|copy| CopyRow {
                node: copy.node.clone(),
                state: copy_state(copy.state()),
                attempts: copy.attempts,
                background: copy.background,
                snapshot_id: copy.snapshot_id.clone(),
                bytes_sent: copy.progress.as_ref().map(|p| p.bytes_sent).unwrap_or(0),
                reason: copy.reason.clone(),
            })
            .collect(),
        created: time_ms(run.created_ms),
        ended: time_ms(run.ended_ms),
        reason: run.reason.clone(),
    }
}

#[derive(Serialize)]
struct NodeRow {
    id: String,
    address: String,
    labels: Vec<String>,
    state: String,
    last_heartbeat: String,
    free_bytes: u64,
    chunks: u64,
    stored_bytes: u64,
    transport: String,
    /// Hosts with a quota on this node: used and quota bytes.
    quotas: Vec<QuotaUse>,
    /// The free space the node asks to keep by pruning (0: none).
    target_free_bytes: u64,
    /// When its last GC under this coordinator ended (empty: none).
    last_gc: String,
    /// What that GC freed and swept, or why it failed.
    last_gc_freed_bytes: u64,
    last_gc_swept_chunks: u64,
    last_gc_error: String,
    /// Snapshots were deleted here that no GC has swept yet.
    gc_wanted: bool,
    /// Why pruning cannot reach `target_free_bytes` (empty: it can, or
    /// there is none).
    prune_blocked: String,
    /// Why the node refuses writes, in one sentence (empty: it accepts
    /// them); no copy is planned to it meanwhile.
    refuses_writes: String,
    /// Whether it takes writes, and each reason it does not (a drain
    /// among them).
    health: crate::node_health::HealthCell,
    /// Its scrub (none when it runs none, or is not a storage node).
    scrub: Option<ScrubCell>,
    /// While it is drained: how far it got, or "removable".
    drain: String,
    /// What its last repair of damaged chunks did (empty: none).
    last_repair: String,
}

/// Where a storage node's scrub stands.
#[derive(Serialize)]
struct ScrubCell {
    /// Packs read in the pass in progress, of how many.
    packs_read: u32,
    packs: u32,
    /// When its last full pass ended (empty: none yet).
    last_pass: String,
    /// Damaged chunks found and not repaired yet.
    damaged_chunks: u64,
}

impl std::fmt::Display for ScrubCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let done = if self.packs == 0 {
            100
        } else {
            u64::from(self.packs_read.min(self.packs)) * 100 / u64::from(self.packs)
        };
        write!(f, "{done}%")?;
        if !self.last_pass.is_empty() {
            write!(f, ", last pass {}", self.last_pass)?;
        }
        if self.damaged_chunks > 0 {
            write!(f, ", {} DAMAGED chunk(s)", self.damaged_chunks)?;
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct QuotaUse {
    host: String,
    used_bytes: u64,
    quota_bytes: u64,
}

impl Row for NodeRow {
    fn headers() -> &'static [&'static str] {
        &[
            "id",
            "address",
            "labels",
            "state",
            "last heartbeat",
            "free",
            "chunks",
            "stored",
            "transport",
            "fullest quota",
            "last gc",
            "pruning",
            "scrub",
        ]
    }
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.address.clone(),
            self.labels.join(","),
            self.health.state_cell(&self.state),
            self.last_heartbeat.clone(),
            bytes(self.free_bytes),
            self.chunks.to_string(),
            bytes(self.stored_bytes),
            self.transport.clone(),
            fullest_quota(&self.quotas),
            if self.last_gc.is_empty() {
                "-".to_owned()
            } else if !self.last_gc_error.is_empty() {
                format!("{} FAILED: {}", self.last_gc, self.last_gc_error)
            } else {
                format!("{} freed {}", self.last_gc, bytes(self.last_gc_freed_bytes))
            },
            if !self.prune_blocked.is_empty() {
                format!("BLOCKED: {}", self.prune_blocked)
            } else if self.target_free_bytes > 0 {
                format!("to keep {} free", bytes(self.target_free_bytes))
            } else {
                "-".to_owned()
            },
            self.scrub
                .as_ref()
                .map_or_else(|| "-".to_owned(), ToString::to_string),
        ]
    }
}

/// The host closest to its quota: `web1 80% of 10.0 GiB`, or `-`.
fn fullest_quota(quotas: &[QuotaUse]) -> String {
    let share = |quota: &QuotaUse| quota.used_bytes as f64 / quota.quota_bytes.max(1) as f64;
    quotas
        .iter()
        .max_by(|a, b| share(a).total_cmp(&share(b)))
        .map_or_else(
            || "-".to_owned(),
            |quota| {
                format!(
                    "{} {:.0}% of {}",
                    quota.host,
                    share(quota) * 100.0,
                    bytes(quota.quota_bytes)
                )
            },
        )
}

fn node_row(node: &Node) -> NodeRow {
    let info = node.info.clone().unwrap_or_default();
    NodeRow {
        id: info.id,
        address: info.address,
        labels: info.labels,
        // A node that ended its session itself was stopped: not an alarm.
        state: if node.state() == NodeState::Lost && node.stopped {
            "stopped".to_owned()
        } else {
            enum_name(node.state().as_str_name(), "NODE_STATE_")
        },
        last_heartbeat: time_ms(node.last_heartbeat_ms),
        free_bytes: info.free_bytes,
        chunks: node.chunks,
        stored_bytes: node.stored_bytes,
        transport: if info.insecure_plaintext {
            "INSECURE PLAINTEXT".to_owned()
        } else {
            "tls".to_owned()
        },
        quotas: node
            .quota_usage
            .iter()
            .map(|usage| QuotaUse {
                host: usage.host.clone(),
                used_bytes: usage.used_bytes,
                quota_bytes: usage.quota_bytes,
            })
            .collect(),
        target_free_bytes: info.target_free_bytes,
        last_gc: if node.last_gc_ms > 0 {
            time_ms(node.last_gc_ms)
        } else {
            String::new()
        },
        last_gc_freed_bytes: node.last_gc.map_or(0, |report| report.freed_bytes),
        last_gc_swept_chunks: node.last_gc.map_or(0, |report| report.swept_chunks),
        last_gc_error: node.last_gc_error.clone(),
        gc_wanted: node.gc_wanted_since_ms != 0,
        prune_blocked: node.prune_blocked.clone(),
        refuses_writes: node.refuses_writes.clone(),
        health: crate::node_health::HealthCell::of(node),
        scrub: node.scrub.as_ref().map(|scrub| ScrubCell {
            packs_read: scrub.packs_read,
            packs: scrub.packs,
            last_pass: if scrub.last_pass_ms > 0 {
                time_ms(scrub.last_pass_ms)
            } else {
                String::new()
            },
            damaged_chunks: scrub.damaged_chunks,
        }),
        last_repair: node.last_repair.clone(),
        drain: node.drain.clone(),
    }
}

/// A row of backy's status table.
#[derive(Serialize)]
pub struct SnapshotRow {
    /// When it was committed.
    pub date: String,
    /// Its id.
    pub id: String,
    /// B1000's name.
    pub name: String,
    /// The job, host and instance it is of, and its master, if any.
    pub job: String,
    pub host: String,
    pub instance: String,
    pub master_host: String,
    pub master_instance: String,
    /// full or sync.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its root tree's id, hex like every id.
    pub root_tree_id: String,
    /// Logical size (sum of file sizes).
    pub size_bytes: u64,
    /// Bytes new to the store when it was made.
    pub new_bytes: u64,
    /// How long the backup took, ms.
    pub duration_ms: i64,
    /// Its tags.
    pub tags: Vec<String>,
    /// The nodes that hold it.
    pub nodes: Vec<String>,
    /// complete or verified.
    pub state: String,
    /// Flags a node set at the commit: `growth` (new data beyond its
    /// `max_growth` times the usual), `worm` (inside its WORM window).
    pub flags: Vec<String>,
    /// Its job's use of the job's quota, when it has one.
    pub job_quota: Option<JobQuotaCell>,
    /// Its copies that count against its replica target (from the
    /// coordinator's catalogue only).
    pub copies: Option<CopiesCell>,
}

/// A snapshot's copies that count, against its replica target.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CopiesCell {
    /// Copies that count now.
    pub healthy: u32,
    /// The copies the coordinator keeps of it.
    pub target: u32,
    /// Why a copy does not count, or may soon stop to, as "node: why".
    pub problems: Vec<String>,
}

impl std::fmt::Display for CopiesCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.healthy, self.target)
    }
}

/// A job's use of its quota, as the storage nodes last counted.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct JobQuotaCell {
    /// Bytes the job's snapshots take on the storage nodes together.
    pub used_bytes: u64,
    /// The job's quota.
    pub quota_bytes: u64,
}

impl std::fmt::Display for JobQuotaCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let share = self.used_bytes as f64 / self.quota_bytes.max(1) as f64;
        write!(f, "{:.0}% of {}", share * 100.0, bytes(self.quota_bytes))
    }
}

impl Row for SnapshotRow {
    fn headers() -> &'static [&'static str] {
        &[
            "date",
            "id",
            "name",
            "size",
            "new",
            "duration",
            "tags",
            "nodes",
            "copies",
            "flags",
            "job quota",
        ]
    }
    fn cells(&self) -> Vec<String> {
        vec![
            self.date.clone(),
            short(&self.id),
            self.name.clone(),
            bytes(self.size_bytes),
            bytes(self.new_bytes),
            duration_ms(self.duration_ms),
            self.tags.join(","),
            self.nodes.join(","),
            self.copies
                .as_ref()
                .map_or_else(|| "-".to_owned(), ToString::to_string),
            self.flags.join(","),
            self.job_quota
                .map_or_else(|| "-".to_owned(), |quota| quota.to_string()),
        ]
    }
}

/// The status-table row of `snapshot` held by `nodes`.
pub fn snapshot_row(snapshot: &Snapshot, nodes: Vec<String>) -> SnapshotRow {
    let stats = snapshot.stats.unwrap_or_default();
    SnapshotRow {
        date: time_ms(snapshot.end_time_ms),
        id: snapshot.id.clone(),
        name: snapshot.name.clone(),
        job: snapshot.job.clone(),
        host: snapshot.host.clone(),
        instance: snapshot.instance.clone(),
        master_host: snapshot.master_host.clone(),
        master_instance: snapshot.master_instance.clone(),
        kind: if snapshot.r#type() == fabric_proto::v1::SnapshotType::Sync {
            "sync".to_owned()
        } else {
            "full".to_owned()
        },
        root_tree_id: hex::encode(&snapshot.root_tree_id),
        size_bytes: stats.total_bytes,
        new_bytes: stats.new_bytes,
        duration_ms: snapshot.end_time_ms - snapshot.start_time_ms,
        tags: snapshot.tags.clone(),
        nodes,
        state: enum_name(snapshot.state().as_str_name(), "SNAPSHOT_STATE_"),
        flags: snapshot_flags(snapshot, now_ms()),
        job_quota: None,
        copies: None,
    }
}

/// What `status` flags about `snapshot` at `now_ms`.
fn snapshot_flags(snapshot: &Snapshot, now_ms: i64) -> Vec<String> {
    let mut flags = Vec::new();
    if snapshot.unusual_growth {
        flags.push("growth".to_owned());
    }
    if snapshot.retain_until_ms > now_ms {
        flags.push("worm".to_owned());
    }
    flags
}

pub async fn job_submit(
    remote: &Remote,
    file: &std::path::Path,
    select: Vec<String>,
    no_run: bool,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let (toml, file_name) = remote::read_jobs_file(file)?;
    let mut client = remote.coordinator().await?;
    let response = client
        .submit_jobs(SubmitJobsRequest {
            toml,
            file_name,
            select,
            no_run,
        })
        .await
        .map_err(|status| anyhow!("{}", status.message()))?
        .into_inner();
    if format == OutputFormat::Table {
        crate::outln!("jobs stored: {}", response.jobs.join(", "))?;
    }
    let rows: Vec<RunRow> = response.runs.iter().map(run_row).collect();
    output::print_rows(&rows, format)
}

pub async fn job_list(remote: &Remote, format: OutputFormat) -> anyhow::Result<()> {
    let mut client = remote.coordinator().await?;
    let jobs = client
        .list_jobs(ListJobsRequest {})
        .await
        .map_err(|status| status_error("listing jobs", status))?
        .into_inner()
        .jobs;
    output::print_rows(&jobs.iter().map(job_row).collect::<Vec<_>>(), format)
}

/// What `job_change` does to a job.
#[derive(Debug, Clone, Copy)]
pub enum JobChangeKind {
    /// Hold its schedule.
    Pause,
    /// Let its schedule run again.
    Resume,
    /// Forget it.
    Delete,
}

pub async fn job_change(
    remote: &Remote,
    name: &str,
    change: JobChangeKind,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let mut client = remote.coordinator().await?;
    let request = GetJobRequest { name: name.into() };
    let (what, answer) = match change {
        JobChangeKind::Pause => ("pausing", client.pause_job(request).await),
        JobChangeKind::Resume => ("resuming", client.resume_job(request).await),
        JobChangeKind::Delete => ("deleting", client.delete_job(request).await),
    };
    let job = answer
        .map_err(|status| status_error(&format!("{what} job {name}"), status))?
        .into_inner();
    output::print_rows(&[job_row(&job)], format)
}

pub async fn job_run(
    remote: &Remote,
    name: &str,
    instance: Option<String>,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let mut client = remote.coordinator().await?;
    let run = client
        .run_job(fabric_proto::v1::RunJobRequest {
            name: name.into(),
            instance: instance.unwrap_or_default(),
        })
        .await
        .map_err(|status| status_error(&format!("running job {name}"), status))?
        .into_inner();
    output::print_rows(&[run_row(&run)], format)
}

pub async fn job_show(remote: &Remote, name: &str, format: OutputFormat) -> anyhow::Result<()> {
    let mut client = remote.coordinator().await?;
    let job = client
        .get_job(GetJobRequest { name: name.into() })
        .await
        .map_err(|status| status_error(&format!("job {name}"), status))?
        .into_inner();
    let spec = job.spec.clone().unwrap_or_default();
    /// `job show -o json`: the listing's row and what the job reads and
    /// runs.
    #[derive(Serialize)]
    struct JobShown {
        #[serde(flatten)]
        row: JobRow,
        include: Vec<String>,
        exclude: Vec<String>,
        pre: String,
        post: String,
        instances: Vec<String>,
        instances_command: String,
        tags: Vec<String>,
        interval: String,
    }
    let shown = JobShown {
        row: job_row(&job),
        include: spec.include.clone(),
        exclude: spec.exclude.clone(),
        pre: spec.pre.clone(),
        post: spec.post.clone(),
        instances: spec.instances.clone(),
        instances_command: spec.instances_command.clone(),
        tags: spec.tags.clone(),
        interval: if spec.interval_s == 0 {
            String::new()
        } else {
            fabric_proto::duration_word(spec.interval_s)
        },
    };
    output::print_one(&shown, format, |shown| {
        let row = &shown.row;
        format!(
            "job:        {}\ndirection:  {}\nclient:     {}\ninclude:    {}\nexclude:    {}\ndest:       {}\nreplicas:   {}\npre:        {}\npost:       {}\ninstances:  {}{}\ninterval:   {}\nlast run:   {} ({})\nchanges:\n{}",
            row.name,
            row.direction,
            row.client,
            spec.include.join(" "),
            spec.exclude.join(" "),
            spec.dest,
            spec.replicas,
            spec.pre,
            spec.post,
            spec.instances.join(" "),
            spec.instances_command,
            if spec.interval_s == 0 {
                "-".to_owned()
            } else {
                fabric_proto::duration_word(spec.interval_s)
            },
            row.last_run,
            row.last_state,
            row.history
                .iter()
                .map(|change| format!("  {change}\n"))
                .collect::<String>(),
        )
    })
}

pub async fn run_list(
    remote: &Remote,
    job: Option<String>,
    state: Option<String>,
    since: Option<humantime::Duration>,
    limit: u32,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let state = state.as_deref().map(parse_run_state).transpose()?;
    let since_ms = since
        .map(|since| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            now.saturating_sub(*since).as_millis() as i64
        })
        .unwrap_or(0);
    let mut client = remote.coordinator().await?;
    let runs = client
        .list_runs(ListRunsRequest {
            job: job.unwrap_or_default(),
            state: state.map(|s| s as i32).unwrap_or(0),
            since_ms,
            until_ms: 0,
            limit,
        })
        .await
        .map_err(|status| status_error("listing runs", status))?
        .into_inner()
        .runs;
    output::print_rows(&runs.iter().map(run_row).collect::<Vec<_>>(), format)
}

/// A run event as `run show -o json` gives it.
#[derive(Serialize)]
struct EventRow {
    /// Its place in the run's history (0: live progress, not stored).
    seq: u64,
    time: String,
    /// The node that reported it (empty: the coordinator).
    node: String,
    /// The run's state after it.
    state: String,
    /// The destination concerned, and its state after it.
    #[serde(skip_serializing_if = "String::is_empty")]
    dest: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    dest_state: String,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<ProgressRow>,
}

#[derive(Serialize)]
struct ProgressRow {
    files: u64,
    bytes_read: u64,
    bytes_sent: u64,
    current_path: String,
}

impl EventRow {
    fn of(event: &RunEvent) -> Self {
        Self {
            seq: event.seq,
            time: output::rfc3339_ms(event.time_ms),
            node: event.node.clone(),
            state: run_state(event.state()),
            dest: event.dest.clone(),
            dest_state: if event.dest.is_empty() {
                String::new()
            } else {
                copy_state(event.dest_state())
            },
            message: event.message.clone(),
            progress: event.progress.as_ref().map(|progress| ProgressRow {
                files: progress.files,
                bytes_read: progress.bytes_read,
                bytes_sent: progress.bytes_sent,
                current_path: progress.current_path.clone(),
            }),
        }
    }
}

fn event_line(event: &RunEvent) -> String {
    let mut line = format!("{}  {}", time_ms(event.time_ms), run_state(event.state()));
    if !event.dest.is_empty() {
        line.push_str(&format!(
            "  {} {}",
            event.dest,
            copy_state(event.dest_state())
        ));
    }
    if !event.node.is_empty() {
        line.push_str(&format!("  [{}]", event.node));
    }
    if !event.message.is_empty() {
        line.push_str(&format!("  {}", event.message));
    }
    line
}

pub async fn run_show(remote: &Remote, run: &str, format: OutputFormat) -> anyhow::Result<()> {
    let mut client = remote.coordinator().await?;
    let detail = client
        .get_run(GetRunRequest { run_id: run.into() })
        .await
        .map_err(|status| status_error(&format!("run {run}"), status))?
        .into_inner();
    let row = run_row(&detail.run.clone().unwrap_or_default());
    #[derive(Serialize)]
    struct Shown {
        #[serde(flatten)]
        run: RunRow,
        events: Vec<EventRow>,
    }
    let shown = Shown {
        run: row,
        events: detail.events.iter().map(EventRow::of).collect(),
    };
    output::print_one(&shown, format, |shown| {
        let mut text = format!(
            "run:      {}\njob:      {} {}\nclient:   {}\nstate:    {}\ncreated:  {}\nended:    {}\n",
            shown.run.id,
            shown.run.job,
            shown.run.instance,
            shown.run.client,
            shown.run.state,
            shown.run.created,
            shown.run.ended
        );
        if !shown.run.reason.is_empty() {
            text.push_str(&format!("reason:   {}\n", shown.run.reason));
        }
        text.push_str("copies:\n");
        for copy in &shown.run.copies {
            text.push_str(&format!(
                "  {:<16} {:<9} attempts={} {}{} {}\n",
                copy.node,
                copy.state,
                copy.attempts,
                if copy.background { "background " } else { "" },
                short(&copy.snapshot_id),
                copy.reason
            ));
        }
        text.push_str("events:\n");
        for event in &detail.events {
            text.push_str(&format!("  {}\n", event_line(event)));
        }
        text
    })
}

/// How often `run watch` watches again, without a new event in between,
/// when the stream breaks (or ends) before the run ended.
const WATCH_AGAIN_LIMIT: u32 = 3;

/// Whether a watch that ended with `status` is worth starting again: the
/// connection broke or the coordinator went away (a failover), rather than
/// the coordinator refusing the watch.
fn watch_broke(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Cancelled
    )
}

pub async fn run_watch(remote: &Remote, run: &str) -> anyhow::Result<()> {
    let mut client = remote.coordinator().await?;
    let request = WatchRunRequest { run_id: run.into() };
    let mut events = client
        .watch_run(request.clone())
        .await
        .map_err(|status| status_error(&format!("run {run}"), status))?
        .into_inner();
    // The size of the job's newest snapshot is the estimate the ETA is
    // measured against (a first backup has none: no ETA).
    let estimate = match client.get_run(GetRunRequest { run_id: run.into() }).await {
        Ok(detail) => {
            let job = detail.into_inner().run.map(|r| r.job).unwrap_or_default();
            remote::catalog(&mut client, Some(job), None)
                .await
                .ok()
                .and_then(|entries| {
                    entries
                        .iter()
                        .filter_map(|e| e.snapshot.as_ref())
                        .max_by_key(|s| s.end_time_ms)
                        .and_then(|s| s.stats.as_ref().map(|stats| stats.total_bytes))
                })
                .unwrap_or(0)
        }
        Err(_) => 0,
    };
    let terminal = std::io::stdout().is_terminal();
    let bars = indicatif::MultiProgress::new();
    let mut copies: std::collections::HashMap<String, WatchedCopy> = Default::default();
    let mut last_state = RunState::Unspecified;
    // Stored events already shown (a watch started again replays them).
    let mut last_seq = 0;
    let mut watched_again = 0;
    loop {
        let event = match events.next().await {
            Some(Ok(event)) => event,
            ended => {
                let run_ended = matches!(
                    last_state,
                    RunState::Done | RunState::Failed | RunState::Cancelled
                );
                let broke = match &ended {
                    Some(Err(status)) => watch_broke(status),
                    _ => !run_ended,
                };
                if !broke || watched_again >= WATCH_AGAIN_LIMIT {
                    match ended {
                        Some(Err(status)) => return Err(status_error("watching the run", status)),
                        _ => break,
                    }
                }
                // The coordinator went away before the run ended (a
                // failover): watch again, from the leader.
                watched_again += 1;
                tracing::info!(run, "the watch broke: watching again");
                events = client
                    .watch_run(request.clone())
                    .await
                    .map_err(|status| status_error(&format!("watching run {run} again"), status))?
                    .into_inner();
                continue;
            }
        };
        if event.seq != 0 {
            if event.seq <= last_seq {
                continue;
            }
            last_seq = event.seq;
        }
        watched_again = 0;
        last_state = event.state();
        if event.dest.is_empty() {
            if terminal {
                bars.println(event_line(&event))?;
            } else {
                crate::outln!("{}", event_line(&event))?;
            }
            continue;
        }
        let copy = copies
            .entry(event.dest.clone())
            .or_insert_with(|| WatchedCopy::new(&bars, &event.dest, terminal));
        // Stored events of a copy carry no progress: its bytes are the last
        // live report's.
        if let Some(progress) = event.progress.as_ref() {
            copy.progress = progress.clone();
        }
        let ended = matches!(event.dest_state(), CopyState::Done | CopyState::Failed);
        let line = copy.line(&event, estimate);
        match copy.bar.as_ref() {
            Some(bar) => {
                bar.set_message(line);
                if ended {
                    bar.finish();
                }
            }
            // Without a terminal: every stored event, and live progress at
            // most once a second per copy.
            None if event.seq != 0 || copy.printed.elapsed() >= Duration::from_secs(1) => {
                copy.printed = std::time::Instant::now();
                crate::outln!("{}  {line}", time_ms(event.time_ms))?;
            }
            None => {}
        }
    }
    for copy in copies.values() {
        if let Some(bar) = copy.bar.as_ref() {
            bar.finish();
        }
    }
    match last_state {
        RunState::Done => Ok(()),
        RunState::Failed | RunState::Cancelled => {
            bail!("run {run} ended {}", run_state(last_state))
        }
        _ => Ok(()),
    }
}

/// One copy as `run watch` follows it.
struct WatchedCopy {
    dest: String,
    /// On a terminal: its line, redrawn in place.
    bar: Option<indicatif::ProgressBar>,
    started: std::time::Instant,
    printed: std::time::Instant,
    progress: TransferProgress,
}

impl WatchedCopy {
    fn new(bars: &indicatif::MultiProgress, dest: &str, terminal: bool) -> Self {
        let bar = terminal.then(|| {
            let bar = bars.add(indicatif::ProgressBar::new_spinner());
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {prefix:<14} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.set_prefix(dest.to_owned());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let now = std::time::Instant::now();
        Self {
            dest: dest.to_owned(),
            bar,
            started: now,
            printed: now - Duration::from_secs(60),
            progress: TransferProgress::default(),
        }
    }

    fn line(&self, event: &RunEvent, estimate: u64) -> String {
        let progress = &self.progress;
        let seconds = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = progress.bytes_read as f64 / seconds;
        let mut line = format!(
            "{}  {}, {} read, {} sent, {}/s, ETA {}",
            copy_state(event.dest_state()),
            output::count(progress.files, "file"),
            bytes(progress.bytes_read),
            bytes(progress.bytes_sent),
            bytes(rate as u64),
            eta(estimate, progress.bytes_read, rate),
        );
        if self.bar.is_none() {
            line = format!("{}  {line}", self.dest);
        }
        if !event.message.is_empty() {
            line.push_str(&format!("  {}", event.message));
        }
        line
    }
}

/// Time left to read `estimate` bytes at `rate` bytes/s, or "-" when unknown.
fn eta(estimate: u64, done: u64, rate: f64) -> String {
    if estimate <= done || rate < 1.0 {
        return "-".to_owned();
    }
    let seconds = ((estimate - done) as f64 / rate).ceil() as u64;
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}

pub async fn run_retry(remote: &Remote, run: &str, format: OutputFormat) -> anyhow::Result<()> {
    let mut client = remote.coordinator().await?;
    let retried = client
        .retry_run(RetryRunRequest { run_id: run.into() })
        .await
        .map_err(|status| status_error(&format!("retrying run {run}"), status))?
        .into_inner();
    output::print_rows(&[run_row(&retried)], format)
}

/// How many runs `run retry --all-failed` looks back through.
const RETRY_LOOK_BACK: u32 = 10_000;

/// The runs `run retry --all-failed` retries: of `runs` (newest first), the
/// newest of each job and instance, when it failed.
pub fn newest_failed(runs: &[Run]) -> Vec<&Run> {
    let mut seen = std::collections::HashSet::new();
    runs.iter()
        .filter(|run| seen.insert((run.job.as_str(), run.instance.as_str())))
        .filter(|run| run.state() == RunState::Failed)
        .collect()
}

pub async fn run_retry_all_failed(
    remote: &Remote,
    job: Option<String>,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let mut client = remote.coordinator().await?;
    let runs = client
        .list_runs(ListRunsRequest {
            job: job.clone().unwrap_or_default(),
            state: RunState::Unspecified as i32,
            since_ms: 0,
            until_ms: 0,
            limit: RETRY_LOOK_BACK,
        })
        .await
        .map_err(|status| status_error("listing runs", status))?
        .into_inner()
        .runs;
    let failed = newest_failed(&runs);
    if failed.is_empty() {
        eprintln!(
            "no failed run to retry{}",
            job.map(|job| format!(" of job {job}")).unwrap_or_default()
        );
        return Ok(());
    }
    let mut retried = Vec::new();
    let mut refused = Vec::new();
    for run in failed {
        match client
            .retry_run(RetryRunRequest {
                run_id: run.id.clone(),
            })
            .await
        {
            Ok(reply) => retried.push(run_row(&reply.into_inner())),
            Err(status) => refused.push(status_error(&format!("retrying run {}", run.id), status)),
        }
    }
    output::print_rows(&retried, format)?;
    for error in &refused {
        eprintln!("{error:#}");
    }
    if refused.is_empty() {
        Ok(())
    } else {
        bail!(
            "{} of {} retried, {} refused",
            retried.len(),
            retried.len() + refused.len(),
            refused.len()
        )
    }
}

pub async fn run_cancel(remote: &Remote, run: &str, format: OutputFormat) -> anyhow::Result<()> {
    let mut client = remote.coordinator().await?;
    let cancelled = client
        .cancel_run(CancelRunRequest { run_id: run.into() })
        .await
        .map_err(|status| status_error(&format!("cancelling run {run}"), status))?
        .into_inner();
    output::print_rows(&[run_row(&cancelled)], format)
}

/// One snapshot in `forget`'s answer.
#[derive(serde::Serialize)]
struct ForgetRow {
    date: String,
    id: String,
    host: String,
    instance: String,
    tags: Vec<String>,
    nodes: Vec<String>,
    /// `keep` or `remove` (`would remove` in a dry run).
    decision: String,
    kept_because: Vec<String>,
}

impl Row for ForgetRow {
    fn headers() -> &'static [&'static str] {
        &["date", "id", "host", "tags", "nodes", "decision", "why"]
    }
    fn cells(&self) -> Vec<String> {
        vec![
            self.date.clone(),
            short(&self.id),
            if self.instance.is_empty() {
                self.host.clone()
            } else {
                format!("{}/{}", self.host, self.instance)
            },
            self.tags.join(","),
            self.nodes.join(","),
            self.decision.clone(),
            self.kept_because.join("; "),
        ]
    }
}

pub async fn forget(
    remote: &Remote,
    job: &str,
    dry_run: bool,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let mut client = remote.coordinator().await?;
    let answer = client
        .forget(fabric_proto::v1::ForgetRequest {
            job: job.into(),
            dry_run,
        })
        .await
        .map_err(|status| status_error(&format!("retention of job {job}"), status))?
        .into_inner();
    let rows: Vec<ForgetRow> = answer
        .decisions
        .into_iter()
        .map(|decision| ForgetRow {
            date: time_ms(decision.end_time_ms),
            id: decision.snapshot_id,
            host: decision.host,
            instance: decision.instance,
            tags: decision.tags,
            nodes: decision.nodes,
            decision: match (decision.kept_because.is_empty(), dry_run) {
                (false, _) => "keep".to_owned(),
                (true, true) => "would remove".to_owned(),
                (true, false) => "remove".to_owned(),
            },
            kept_because: decision.kept_because,
        })
        .collect();
    if !answer.held_back.is_empty() {
        eprintln!("{}", answer.held_back);
    }
    output::print_rows(&rows, format)
}

pub async fn node_list(remote: &Remote, format: OutputFormat) -> anyhow::Result<()> {
    let mut client = remote.coordinator().await?;
    let nodes = remote::nodes(&mut client).await?;
    output::print_rows(&nodes.iter().map(node_row).collect::<Vec<_>>(), format)
}

/// A row of `fabricctl sync list`.
#[derive(Serialize)]
struct SyncRow {
    date: String,
    id: String,
    name: String,
    /// The label of the nodes it goes to.
    label: String,
    /// pending, syncing, synced or failed.
    state: String,
    /// The node it went (or goes) to.
    node: String,
    attempts: u32,
    /// Why the last attempt failed, or why it waits.
    error: String,
    /// When the state last changed.
    updated: String,
}

impl Row for SyncRow {
    fn headers() -> &'static [&'static str] {
        &[
            "date", "id", "name", "label", "state", "node", "attempts", "updated", "error",
        ]
    }
    fn cells(&self) -> Vec<String> {
        vec![
            self.date.clone(),
            short(&self.id),
            self.name.clone(),
            self.label.clone(),
            self.state.clone(),
            if self.node.is_empty() {
                "-".to_owned()
            } else {
                self.node.clone()
            },
            self.attempts.to_string(),
            self.updated.clone(),
            self.error.clone(),
        ]
    }
}

/// `fabricctl sync list`: the snapshots of jobs with a `sync_to` and where
/// their off-site sync stands; only those not synced unless `all`.
pub async fn sync_list(
    remote: &Remote,
    job: Option<String>,
    all: bool,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let mut client = remote.coordinator().await?;
    let entries = remote::catalog(&mut client, job, None).await?;
    let rows: Vec<SyncRow> = entries
        .iter()
        .filter_map(|entry| {
            let snapshot = entry.snapshot.as_ref()?;
            let sync = entry.offsite.as_ref()?;
            if !all && sync.state() == fabric_proto::v1::SyncState::Synced {
                return None;
            }
            Some(SyncRow {
                date: time_ms(snapshot.end_time_ms),
                id: snapshot.id.clone(),
                name: snapshot.name.clone(),
                label: sync.label.clone(),
                state: enum_name(sync.state().as_str_name(), "SYNC_STATE_"),
                node: sync.node.clone(),
                attempts: sync.attempts,
                error: sync.error.clone(),
                updated: time_ms(sync.updated_ms),
            })
        })
        .collect();
    output::print_rows(&rows, format)
}

/// `fabricctl sync reset`: sync a job's snapshots (or the ones named) again.
pub async fn sync_reset(
    remote: &Remote,
    job: Option<String>,
    snapshots: Vec<String>,
) -> anyhow::Result<()> {
    if job.is_none() && snapshots.is_empty() {
        bail!("name a job (--job) or snapshot ids whose off-site sync to reset");
    }
    let mut client = remote.coordinator().await?;
    let answer = client
        .reset_sync(fabric_proto::v1::ResetSyncRequest {
            job: job.clone().unwrap_or_default(),
            snapshot_ids: snapshots,
        })
        .await
        .map_err(|status| status_error("resetting the off-site sync", status))?
        .into_inner();
    crate::outln!("{} snapshot(s) will be synced off-site again", answer.reset)?;
    Ok(())
}

/// `fabricctl node drain`: start (or cancel) draining `node`; with `wait`,
/// print its progress as it changes until it is removable.
pub async fn node_drain(
    remote: &Remote,
    node: &str,
    cancel: bool,
    wait: bool,
) -> anyhow::Result<()> {
    let mut client = remote.coordinator().await?;
    let drained = client
        .drain_node(fabric_proto::v1::DrainNodeRequest {
            node: node.to_owned(),
            cancel,
        })
        .await
        .map_err(|status| status_error(&format!("draining {node}"), status))?
        .into_inner();
    if cancel {
        crate::outln!("{node}: no longer draining")?;
        return Ok(());
    }
    let mut said = drained.drain.clone();
    crate::outln!("{node}: draining: {said}")?;
    while wait && said != "removable" {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let nodes = remote::nodes(&mut client).await?;
        let Some(now) = nodes
            .iter()
            .find(|n| n.info.as_ref().is_some_and(|info| info.id == node))
        else {
            bail!("node {node} is no longer known to the coordinator");
        };
        if now.draining_since_ms == 0 {
            bail!("the drain of {node} was cancelled");
        }
        if now.drain != said {
            said = now.drain.clone();
            crate::outln!("{node}: draining: {said}")?;
        }
    }
    Ok(())
}

/// Snapshots with the nodes that hold them, and the quotas of their jobs
/// (job -> (used, quota) bytes; none when listed from one node).
pub struct SnapshotListing {
    /// Each snapshot and its nodes.
    pub entries: Vec<(Snapshot, Vec<String>)>,
    /// Jobs with a quota.
    pub job_quotas: std::collections::HashMap<String, (u64, u64)>,
    /// Each snapshot's copies against its replica target, by snapshot id
    /// (none when listed from one node).
    pub copies: std::collections::HashMap<String, CopiesCell>,
}

/// Snapshots with the nodes holding them, oldest first: from the coordinator's
/// catalogue, or straight from a node when `node` is an address.
pub async fn snapshot_entries(
    remote: &Remote,
    job: Option<String>,
    host: Option<String>,
    node: Option<String>,
) -> anyhow::Result<Vec<(Snapshot, Vec<String>)>> {
    Ok(snapshot_listing(remote, job, host, node).await?.entries)
}

/// [`snapshot_entries`] with the quotas of their jobs.
pub async fn snapshot_listing(
    remote: &Remote,
    job: Option<String>,
    host: Option<String>,
    node: Option<String>,
) -> anyhow::Result<SnapshotListing> {
    if let Some(node) = node.filter(|n| remote::is_address(n)) {
        let mut storage = remote
            .storage(&fabric_node::client::Peer::any_node(&node))
            .await?;
        let snapshots = storage
            .list_snapshots(fabric_proto::v1::ListSnapshotsRequest {
                job: job.unwrap_or_default(),
                host: host.unwrap_or_default(),
            })
            .await
            .map_err(|status| status_error(&format!("listing snapshots on {node}"), status))?
            .into_inner()
            .snapshots;
        return Ok(SnapshotListing {
            entries: snapshots
                .into_iter()
                .map(|s| (s, vec![node.clone()]))
                .collect(),
            job_quotas: Default::default(),
            copies: Default::default(),
        });
    }
    let mut client = remote.coordinator().await?;
    let listed = remote::catalog_with_quotas(&mut client, job, host).await?;
    let copies = listed
        .entries
        .iter()
        .filter_map(|entry| {
            let id = entry.snapshot.as_ref()?.id.clone();
            let target = match entry.replica_target {
                0 => u32::try_from(entry.copies.len()).unwrap_or(u32::MAX),
                target => target,
            };
            let problems = entry
                .copies
                .iter()
                .filter(|copy| !copy.problem.is_empty())
                .map(|copy| format!("{}: {}", copy.node, copy.problem))
                .collect();
            Some((
                id,
                CopiesCell {
                    healthy: entry.healthy_copies,
                    target,
                    problems,
                },
            ))
        })
        .collect();
    Ok(SnapshotListing {
        copies,
        entries: listed
            .entries
            .into_iter()
            .map(|entry| {
                (
                    entry.snapshot.unwrap_or_default(),
                    entry.copies.into_iter().map(|c| c.node).collect(),
                )
            })
            .collect(),
        job_quotas: listed
            .job_quotas
            .into_iter()
            .map(|quota| (quota.job, (quota.used_bytes, quota.quota_bytes)))
            .collect(),
    })
}

fn rows_of<'a>(
    entries: impl IntoIterator<Item = &'a (Snapshot, Vec<String>)>,
    listing: &SnapshotListing,
) -> Vec<SnapshotRow> {
    entries
        .into_iter()
        .map(|(snapshot, nodes)| {
            let mut row = snapshot_row(snapshot, nodes.clone());
            row.job_quota =
                listing
                    .job_quotas
                    .get(&snapshot.job)
                    .map(|&(used_bytes, quota_bytes)| JobQuotaCell {
                        used_bytes,
                        quota_bytes,
                    });
            row.copies = listing.copies.get(&snapshot.id).cloned();
            if row
                .copies
                .as_ref()
                .is_some_and(|copies| copies.healthy < copies.target)
            {
                row.flags.push("under-replicated".to_owned());
            }
            row
        })
        .collect()
}

pub async fn snapshot_list(
    remote: &Remote,
    job: Option<String>,
    host: Option<String>,
    node: Option<String>,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let listing = snapshot_listing(remote, job, host, node).await?;
    output::print_rows(&rows_of(&listing.entries, &listing), format)
}

pub async fn find(
    remote: &Remote,
    spec: &str,
    job: Option<String>,
    host: Option<String>,
    node: Option<String>,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let listing = snapshot_listing(remote, job, host, node).await?;
    let found = revision::find(&listing.entries, spec, |(snapshot, _)| snapshot)?;
    if found.is_empty() {
        bail!("no snapshot matches {spec:?}");
    }
    output::print_rows(&rows_of(found, &listing), format)
}

/// How `fabricctl restore` writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// What of the recorded owners and setuid and setgid bits comes back.
    pub policy: RestorePolicy,
    /// Keep what a failed restore wrote.
    pub keep_partial: bool,
    /// What to do with entries already in the target directory.
    pub existing: ExistingEntries,
    /// Only list what would be written, and what is in the way.
    pub dry_run: bool,
    /// How a dry run lists.
    pub format: OutputFormat,
}

/// The flags that say what to do with what is already in the target.
const EXISTING_FLAGS: &str = "--overwrite replaces existing entries, --skip-existing keeps them \
     and restores only what is missing; --dry-run lists what would be written and every conflict";

/// Refuse a tar stream on a terminal: it is binary, and a restore of any
/// size would flood the screen with it.
pub fn check_tar_destination(stdout_is_terminal: bool) -> anyhow::Result<()> {
    if stdout_is_terminal {
        bail!(
            "refusing to write a tar stream (--to -) to a terminal: redirect it to a file \
             (> restore.tar) or pipe it (| tar -x -C DIR), or give --to DIR"
        );
    }
    Ok(())
}

/// The first entry of a restore of `path` into `target` that is already
/// there, reading the snapshot's trees from `opened`; None when nothing is
/// in the way (and at once when the target is empty or missing).
async fn first_conflict(
    opened: &mut browse::Opened,
    path: &str,
    target: &std::path::Path,
) -> anyhow::Result<Option<String>> {
    let empty = match std::fs::read_dir(target) {
        Ok(mut entries) => entries.next().is_none(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => true,
        Err(err) => bail!("cannot read {}: {err}", target.display()),
    };
    if empty {
        return Ok(None);
    }
    let mut planner = browse::Planner::new(Some(target), ExistingEntries::Refuse);
    let mut walk = browse::Walk::start(&mut opened.trees, opened.root, path, true).await?;
    while let Some((at, entry)) = walk.next(&mut opened.trees).await? {
        if planner.plan(&at, &entry)?.action == "conflict" {
            return Ok(Some(at));
        }
    }
    Ok(None)
}

/// `restore --dry-run`: every entry the restore would write (or leave, or
/// find in its way), from the snapshot's trees; nothing is written.
async fn restore_plan(
    remote: &Remote,
    copies: &[remote::Located],
    path: &str,
    to: &str,
    existing: ExistingEntries,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let mut opened = browse::open_copy(remote, copies).await?;
    let target = (to != "-").then(|| std::path::Path::new(to));
    let mut planner = browse::Planner::new(target, existing);
    let mut walk = browse::Walk::start(&mut opened.trees, opened.root, path, true).await?;
    let mut rows = Vec::new();
    while let Some((at, entry)) = walk.next(&mut opened.trees).await? {
        rows.push(planner.plan(&at, &entry)?);
    }
    output::print_rows(&rows, format)?;
    let count = |action: &str| rows.iter().filter(|row| row.action == action).count();
    let written: u64 = rows
        .iter()
        .filter(|row| matches!(row.action, "write" | "replace"))
        .map(|row| row.size)
        .sum();
    eprintln!(
        "dry run of snapshot {} from {}: {} to write, {} to replace, {} left as they are, \
         {} conflicts, {} blocked; {} of file content; nothing was written",
        short(&opened.snapshot.id),
        opened.trees.node,
        count("write"),
        count("replace"),
        count("keep"),
        count("conflict"),
        count("blocked"),
        bytes(written)
    );
    if count("conflict") > 0 {
        eprintln!("conflicts: {EXISTING_FLAGS}");
    }
    Ok(())
}

/// Restore `path` of the snapshot `spec` names into the directory `to`
/// under `policy` (what of the recorded owners and setuid and setgid bits
/// comes back), or as a tar stream on stdout when `to` is `-`, which
/// carries everything as recorded and so takes no policy.
///
/// Into a directory that already holds an entry the restore would write,
/// it refuses before writing anything unless `existing` says to overwrite
/// or skip such entries; the target refuses too, should one appear
/// meanwhile. With `dry_run` it lists what it would do instead.
pub async fn restore(
    remote: &Remote,
    spec: &str,
    path: &str,
    to: &str,
    node: Option<String>,
    job: Option<String>,
    options: RestoreOptions,
) -> anyhow::Result<()> {
    let RestoreOptions {
        policy,
        keep_partial,
        existing,
        dry_run,
        format,
    } = options;
    if to == "-" && policy != RestorePolicy::default() {
        // Refused rather than ignored: the flags would suggest a tar stream
        // leaves something out without them.
        bail!(
            "--same-owner and --keep-setid apply to a restore into a directory; a tar stream \
             (--to -) always carries the recorded owners and modes, and the tar that extracts \
             it decides what to apply"
        );
    }
    if to == "-" && existing != ExistingEntries::Refuse {
        bail!(
            "--overwrite and --skip-existing apply to a restore into a directory, not to a tar stream (--to -)"
        );
    }
    if to == "-" && !dry_run {
        check_tar_destination(std::io::stdout().is_terminal())?;
    }
    // A restore logs what it could not bring back (e.g. an attribute only
    // root may set) with its path.
    crate::local::init_quiet_logging();
    let copies = remote::locate_all(remote, spec, node, job).await?;
    if dry_run {
        return restore_plan(remote, &copies, path, to, existing, format).await;
    }
    if to != "-" && existing == ExistingEntries::Refuse {
        // Checked before anything is written, from the snapshot's trees:
        // a refusal leaves the target as it was.
        let mut opened = browse::open_copy(remote, &copies).await?;
        if let Some(conflict) = first_conflict(&mut opened, path, std::path::Path::new(to)).await? {
            bail!(
                "refusing to restore into {to}: {conflict} is already there, and the snapshot \
                 has it too ({EXISTING_FLAGS})"
            );
        }
    }
    let target: Box<dyn fabric_chunkstore::restore::RestoreTarget + Send> = if to == "-" {
        Box::new(fabric_chunkstore::restore::TarTarget::new(std::io::stdout()))
    } else {
        std::fs::create_dir_all(to).with_context(|| format!("cannot create {to}"))?;
        Box::new(
            fabric_chunkstore::restore::DirectoryTarget::new(PathBuf::from(to), policy)?
                .with_existing(existing),
        )
    };
    let candidates: Vec<(fabric_node::client::Peer, String)> = copies
        .iter()
        .map(|copy| (copy.peer.clone(), copy.snapshot_id.clone()))
        .collect();
    let written = std::sync::Arc::new(crate::restore_progress::Written::default());
    let target: Box<dyn fabric_chunkstore::restore::RestoreTarget + Send> = Box::new(
        crate::restore_progress::CountingTarget::new(target, written.clone()),
    );
    let progress =
        crate::restore_progress::ProgressLine::start(written, std::io::stderr().is_terminal());
    let restored = fabric_node::restore_client::restore_from_any(
        &candidates,
        remote.transport()?,
        path,
        target,
        keep_partial,
    )
    .await
    .map_err(|err| {
        // An entry that appeared after the check above.
        if to != "-"
            && existing == ExistingEntries::Refuse
            && err.to_string().contains(" already exists")
        {
            anyhow!("{err} ({EXISTING_FLAGS})")
        } else {
            anyhow::Error::from(err)
        }
    })?;
    drop(progress);
    let located = &copies[restored.from];
    for (copy, why) in copies.iter().zip(&restored.skipped) {
        eprintln!(
            "warning: the copy on {} could not be read, so {} served the restore: {why}",
            copy.node, located.node
        );
    }
    if restored.chunks_from_other_copies > 0 {
        eprintln!(
            "warning: {} chunk(s) the copy on {} could not read were read from other copies \
             (every one checked against its id): that copy needs repair",
            restored.chunks_from_other_copies, located.node
        );
    }
    let stats = restored.stats;
    if to != "-" {
        eprintln!(
            "restored snapshot {} from {}: {} files, {} directories, {} symlinks, {} into {to}",
            short(&located.snapshot_id),
            located.node,
            stats.files,
            stats.dirs,
            stats.symlinks,
            bytes(stats.bytes)
        );
        if existing == ExistingEntries::Skip {
            eprintln!(
                "skipped {} entries already in {to}, left as they were (--skip-existing); \
                 the counts above include them",
                stats.existing_kept
            );
        }
    }
    for warning in restore_warnings(&stats) {
        eprintln!("warning: {warning}");
    }
    Ok(())
}

/// What a restore left out, one sentence per kind, for the summary after
/// the per-path log lines.
pub fn restore_warnings(stats: &RestoreStats) -> Vec<String> {
    let mut warnings = Vec::new();
    if stats.attributes_not_restored > 0 {
        warnings.push(format!(
            "{} extended attributes could not be set (each is logged above with its path)",
            stats.attributes_not_restored
        ));
    }
    if stats.owners_not_restored > 0 {
        warnings.push(format!(
            "{} entries could not be given their recorded owner and belong to you (--same-owner \
             needs root; each is logged above with its path)",
            stats.owners_not_restored
        ));
    }
    if stats.others_skipped > 0 {
        warnings.push(format!(
            "{} special files (devices, FIFOs, sockets) were not restored: a restore never \
             creates them (each is logged above with its path)",
            stats.others_skipped
        ));
    }
    warnings
}

fn parse_sample(text: &str) -> anyhow::Result<f64> {
    let fraction = match text.strip_suffix('%') {
        Some(percent) => percent.trim().parse::<f64>().map(|p| p / 100.0),
        None => text.trim().parse::<f64>(),
    }
    .map_err(|_| {
        anyhow!("bad --sample {text:?}: use a percentage like 5% or a fraction like 0.05")
    })?;
    if !(fraction > 0.0 && fraction <= 1.0) {
        bail!("bad --sample {text:?}: it must be more than 0% and at most 100%");
    }
    Ok(fraction)
}

#[derive(Serialize)]
struct VerifyRow {
    node: String,
    chunks_checked: u64,
    bytes_checked: u64,
    problems: Vec<String>,
}

impl Row for VerifyRow {
    fn headers() -> &'static [&'static str] {
        &["node", "chunks", "bytes", "problems"]
    }
    fn cells(&self) -> Vec<String> {
        vec![
            self.node.clone(),
            self.chunks_checked.to_string(),
            bytes(self.bytes_checked),
            if self.problems.is_empty() {
                "none".into()
            } else {
                self.problems.join("; ")
            },
        ]
    }
}

/// What `gc` reclaimed on one node.
#[derive(serde::Serialize)]
struct GcRow {
    node: String,
    unreferenced_chunks: u64,
    swept_chunks: u64,
    freed_bytes: u64,
    packs_rewritten: u64,
    packs_deleted: u64,
    /// Packs left for a later GC because the lease ended first.
    packs_left_at_lease_end: u64,
    /// How young a pack the GC left alone, seconds.
    grace_s: u64,
}

impl Row for GcRow {
    fn headers() -> &'static [&'static str] {
        &[
            "node",
            "unreferenced",
            "swept",
            "freed",
            "packs rewritten",
            "packs deleted",
            "packs left",
            "grace",
        ]
    }
    fn cells(&self) -> Vec<String> {
        vec![
            self.node.clone(),
            self.unreferenced_chunks.to_string(),
            self.swept_chunks.to_string(),
            bytes(self.freed_bytes),
            self.packs_rewritten.to_string(),
            self.packs_deleted.to_string(),
            self.packs_left_at_lease_end.to_string(),
            humantime::format_duration(std::time::Duration::from_secs(self.grace_s)).to_string(),
        ]
    }
}

/// `gc --node`: by id, through the coordinator under a GC lease (it waits
/// while a node sharing a snapshot collects, and shortens the grace for
/// young packs to the uploads in flight); by address, straight to the
/// node with its own grace (for a node without a coordinator).
pub async fn gc(
    remote: &Remote,
    node: &str,
    repack_threshold: Option<f64>,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let repack_threshold = repack_threshold.unwrap_or(0.0);
    if !(0.0..1.0).contains(&repack_threshold) {
        anyhow::bail!("--repack-threshold must be a fraction in [0, 1), got {repack_threshold}");
    }
    let report = if remote::is_address(node) {
        let peer = fabric_node::client::Peer::any_node(node);
        let mut storage = remote.storage(&peer).await?;
        storage
            .collect_garbage(fabric_proto::v1::GcRequest { repack_threshold })
            .await
            .map_err(|status| status_error(&format!("collecting garbage on {node}"), status))?
            .into_inner()
    } else {
        let mut client = remote.coordinator().await?;
        client
            .collect_garbage(fabric_proto::v1::CollectGarbageRequest {
                node: node.to_owned(),
                repack_threshold,
            })
            .await
            .map_err(|status| status_error(&format!("collecting garbage on {node}"), status))?
            .into_inner()
            .report
            .unwrap_or_default()
    };
    output::print_rows(
        &[GcRow {
            node: node.to_owned(),
            unreferenced_chunks: report.unreferenced_chunks,
            swept_chunks: report.swept_chunks,
            freed_bytes: report.freed_bytes,
            packs_rewritten: report.packs_rewritten,
            packs_deleted: report.packs_deleted,
            packs_left_at_lease_end: report.packs_left_at_lease_end,
            grace_s: report.grace_s,
        }],
        format,
    )
}

pub async fn verify(
    remote: &Remote,
    snapshot: Option<String>,
    node: Option<String>,
    sample: Option<String>,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let sample = sample
        .as_deref()
        .map(parse_sample)
        .transpose()?
        .unwrap_or(0.0);
    let (peer, node_name, snapshot_id) = match (&snapshot, &node) {
        (Some(spec), _) => {
            let located = remote::locate(remote, spec, node.clone(), None).await?;
            (located.peer, located.node, located.snapshot_id)
        }
        (None, Some(node)) if remote::is_address(node) => (
            fabric_node::client::Peer::any_node(node),
            node.clone(),
            String::new(),
        ),
        (None, Some(node)) => {
            let mut client = remote.coordinator().await?;
            let address = remote::node_address(&mut client, node).await?;
            (
                fabric_node::client::Peer::node(node, &address),
                node.clone(),
                String::new(),
            )
        }
        (None, None) => bail!("say what to verify: a SNAPSHOT, or --node N for a whole store"),
    };
    let mut storage = remote.storage(&peer).await?;
    let report: VerifyReport = storage
        .verify(VerifyRequest {
            sample,
            snapshot: snapshot_id,
        })
        .await
        .map_err(|status| status_error(&format!("verifying on {node_name}"), status))?
        .into_inner();
    let problems: Vec<String> = report
        .problems
        .iter()
        .map(|p| {
            let mut text = format!("{} {}", short(&p.chunk_id), p.message);
            if !p.snapshots.is_empty() {
                text.push_str(&format!(" (snapshots {})", p.snapshots.join(",")));
            }
            if !p.paths.is_empty() {
                text.push_str(&format!(" (paths {})", p.paths.join(",")));
            }
            text
        })
        .collect();
    let failed = !problems.is_empty();
    output::print_rows(
        &[VerifyRow {
            node: node_name.clone(),
            chunks_checked: report.chunks_checked,
            bytes_checked: report.bytes_checked,
            problems,
        }],
        format,
    )?;
    if failed {
        bail!("verify found problems on {node_name}");
    }
    Ok(())
}

/// What `fabricctl backup` backs up, to where.
#[derive(Debug, Clone)]
pub struct ManualBackup {
    /// The node's address.
    pub node: String,
    /// Paths to back up.
    pub paths: Vec<PathBuf>,
    /// The job recorded in the snapshot.
    pub job: String,
    /// Glob patterns to leave out.
    pub exclude: Vec<String>,
    /// Stay on the paths' file systems.
    pub one_file_system: bool,
    /// The snapshot's tags.
    pub tags: Vec<String>,
    /// Bytes per second to send at most (0: no limit).
    pub limit_bytes_per_s: u64,
    /// The memory budget of the whole sending pipeline, in bytes.
    pub memory_bytes: u64,
}

pub async fn backup(
    remote: &Remote,
    request: ManualBackup,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let ManualBackup {
        node,
        paths,
        job,
        exclude,
        one_file_system,
        tags,
        limit_bytes_per_s,
        memory_bytes,
    } = request;
    let plan =
        fabric_node::memory_budget::SendPlan::for_this_machine(memory_bytes).context("--memory")?;
    let node = node.as_str();
    let mut includes = Vec::new();
    for path in paths {
        includes.push(
            std::fs::canonicalize(&path)
                .with_context(|| format!("cannot back up {}", path.display()))?,
        );
    }
    let options = fabric_chunkstore::walk::BackupOptions {
        includes,
        excludes: exclude,
        one_file_system,
        chunk_params: fabric_chunkstore::ChunkParams::default(),
        // The backup's memory plan sets both (`send_backup`).
        threads: 0,
        hash_ahead_bytes: 0,
    };
    // A client certificate may commit only its own host's snapshots: its
    // name is the host.
    let transport = remote.transport()?;
    let host = match transport.identity() {
        Some(identity) if identity.role == fabric_trust::Role::Client => identity.name.clone(),
        _ => fabric_node::config::system_hostname(),
    };
    let template = Snapshot {
        job,
        host,
        tags,
        r#type: fabric_proto::v1::SnapshotType::Full as i32,
        start_time_ms: now_ms(),
        ..Default::default()
    };
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(200));
        Some(bar)
    } else {
        None
    };
    let progress_bar = bar.clone();
    let progress: fabric_node::agent::ProgressFn = std::sync::Arc::new(move |p| {
        if let Some(bar) = &progress_bar {
            bar.set_message(format!(
                "{}, {} read, {} sent  {}",
                output::count(p.files, "file"),
                bytes(p.bytes_read),
                bytes(p.bytes_sent),
                p.current_path
            ));
        }
    });
    let outcome = fabric_node::agent::push_backup(
        &fabric_node::client::Peer::any_node(node),
        transport,
        options,
        plan,
        template,
        Some(progress),
        // The node's ingest limit applies too.
        fabric_node::rate_limit::TransferLimits::none()
            .with(fabric_node::rate_limit::RateLimit::new(limit_bytes_per_s)),
    )
    .await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let stats = outcome.snapshot.stats.unwrap_or_default();
    #[derive(Serialize)]
    struct BackupRow {
        snapshot: String,
        name: String,
        files: u64,
        files_unchanged: u64,
        bytes_read: u64,
        chunks_offered: u64,
        chunks_sent: u64,
        bytes_sent: u64,
        warnings: Vec<String>,
    }
    let row = BackupRow {
        snapshot: outcome.snapshot.id.clone(),
        name: outcome.snapshot.name.clone(),
        files: stats.files,
        files_unchanged: stats.files_unchanged,
        bytes_read: stats.bytes_read,
        chunks_offered: outcome.chunks_offered,
        chunks_sent: outcome.chunks_sent,
        bytes_sent: outcome.bytes_sent,
        warnings: outcome.snapshot.warnings.clone(),
    };
    output::print_one(&row, format, |row| {
        let mut text = format!(
            "snapshot {} ({})\n  {} ({} unchanged), {} read, {} of {} chunks sent ({})\n",
            row.snapshot,
            row.name,
            output::count(row.files, "file"),
            row.files_unchanged,
            bytes(row.bytes_read),
            row.chunks_sent,
            row.chunks_offered,
            bytes(row.bytes_sent)
        );
        for warning in &row.warnings {
            text.push_str(&format!("  warning: {warning}\n"));
        }
        text
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Whether a node is online.
pub fn online(node: &Node) -> bool {
    node.state() == NodeState::Online
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_as_percent_or_fraction() {
        assert_eq!(parse_sample("5%").unwrap(), 0.05);
        assert_eq!(parse_sample("0.25").unwrap(), 0.25);
        assert!(
            parse_sample("0%")
                .unwrap_err()
                .to_string()
                .contains("more than 0%")
        );
        assert!(
            parse_sample("abc")
                .unwrap_err()
                .to_string()
                .contains("\"abc\"")
        );
    }

    #[test]
    fn all_failed_retries_only_the_newest_run_of_each_job_and_instance() {
        let run = |id: &str, job: &str, instance: &str, state: RunState| Run {
            id: id.into(),
            job: job.into(),
            instance: instance.into(),
            state: state as i32,
            ..Default::default()
        };
        // Newest first, as ListRuns answers.
        let runs = [
            run("r6", "db", "main", RunState::Failed),
            run("r5", "web", "", RunState::Done),
            run("r4", "db", "replica", RunState::Copying),
            run("r3", "web", "", RunState::Failed),
            run("r2", "db", "main", RunState::Failed),
            run("r1", "db", "replica", RunState::Failed),
        ];
        let ids: Vec<&str> = newest_failed(&runs)
            .iter()
            .map(|run| run.id.as_str())
            .collect();
        assert_eq!(ids, ["r6"]);
    }

    #[test]
    fn a_tar_stream_is_refused_only_onto_a_terminal() {
        let err = check_tar_destination(true).unwrap_err().to_string();
        assert!(
            err.contains("to a terminal") && err.contains("redirect it to a file"),
            "{err}"
        );
        assert!(check_tar_destination(false).is_ok());
    }

    #[test]
    fn eta_is_the_rest_over_the_rate() {
        assert_eq!(eta(1000, 400, 100.0), "6s");
        assert_eq!(eta(0, 400, 100.0), "-");
        assert_eq!(eta(1000, 1200, 100.0), "-");
        assert_eq!(eta(1000, 0, 0.0), "-");
    }

    #[test]
    fn run_states_parse_by_their_short_name() {
        assert_eq!(parse_run_state("copying").unwrap(), RunState::Copying);
        assert!(
            parse_run_state("nope")
                .unwrap_err()
                .to_string()
                .contains("nope")
        );
        assert_eq!(run_state(RunState::Done), "done");
    }

    #[test]
    fn the_fullest_quota_is_the_one_shown() {
        assert_eq!(fullest_quota(&[]), "-");
        let quotas = [
            QuotaUse {
                host: "web1".into(),
                used_bytes: 100,
                quota_bytes: 1000,
            },
            QuotaUse {
                host: "db1".into(),
                used_bytes: 800,
                quota_bytes: 1000,
            },
        ];
        assert!(
            fullest_quota(&quotas).starts_with("db1 80% of "),
            "{}",
            fullest_quota(&quotas)
        );
    }
}
