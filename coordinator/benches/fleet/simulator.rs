//! A simulated fabric against a real coordinator: the `fabric-coordinator`
//! binary started as a child process on 127.0.0.1 (TLS, a CA made in
//! process, a temporary data directory), and N nodes played by tasks of
//! this process, each with its own `node/<id>` certificate and its own
//! connection, speaking the protocol `node/src/session.rs` speaks:
//! `RegisterNode`, one `Session` with heartbeats at the interval the
//! coordinator asks, a storage node's `SnapshotsHeld` (the whole list at the
//! start of the session, then what changed), an agent's push runs (copying,
//! each copy running, its progress and its committed snapshot, spares for a
//! copy that failed, the run's end), and every answer the coordinator waits
//! for (`Replicated`, `SnapshotsDeleted`, `GcDone`, `SnapshotVerified`,
//! `RepairDone`). Stores are virtual: a storage node holds snapshot records
//! in memory, no chunk moves.
//!
//! It measures the coordinator process (CPU from `/proc/PID/stat`, memory
//! from `/proc/PID/status`), how late assignments arrive after their
//! schedule's slot, the round trip of a cheap call through the engine, and
//! how long the catalogue takes to get every snapshot back to its replica
//! target after a tenth of the nodes vanish. It also checks the run went
//! right (every due assignment arrived, every committed snapshot is in the
//! catalogue at its target), so that a test can run it small.
//!
//! Used by the `fleet` bench (`benches/fleet.rs`) and by `tests/fleet.rs`.
//! It never asserts on timing, sends traffic only to 127.0.0.1 and stops the
//! process it starts (by its pid, when dropped).

// A bench and a test: a failed setup step panics with its error.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fabric_proto::v1::coordinator_client::CoordinatorClient;
use fabric_proto::v1::{
    Assignment, AssignmentRole, CopyState, GcDone, GcReport, GetJobRequest, Heartbeat, JobUsage,
    ListCatalogRequest, ListJobsRequest, NodeInfo, NodeMessage, NodeRole, RepairDone, Replicate,
    Replicated, RunState, RunUpdate, Snapshot, SnapshotState, SnapshotStats, SnapshotVerified,
    SnapshotsDeleted, SnapshotsHeld, SubmitJobsRequest, TransferProgress, coordinator_message,
    node_message,
};
use fabric_trust::pki::{CertificateAuthority, IssueOptions};
use fabric_trust::{Expect, Identity, Role, TlsCredentials, Transport};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// One node in this many is a storage node; the others are agents (the
/// clients of the jobs).
pub const STORAGE_ONE_IN: usize = 4;

/// Free space every simulated storage node reports (8 TiB of 10).
const FREE_BYTES: u64 = 8 << 40;
const CAPACITY_BYTES: u64 = 10 << 40;

/// Jobs per `SubmitJobs` call.
const JOBS_PER_SUBMISSION: usize = 1_000;

/// Largest message the simulator's clients accept (a listing of 10,000
/// jobs, a large catalogue).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// Nodes in all (one in [`STORAGE_ONE_IN`] a storage node).
    pub nodes: usize,
    /// Scheduled push jobs, `replicas = 2`, spread over the agents.
    pub jobs: usize,
    /// Each job's schedule: one tag of this interval (slots spread over it
    /// by the job's name, so runs are due all the time).
    pub interval: Duration,
    /// The coordinator's heartbeat interval.
    pub heartbeat: Duration,
    /// How long after the sessions opened and the jobs were submitted the
    /// steady window starts.
    pub warmup: Duration,
    /// The steady window: CPU, memory and latencies are measured over it.
    pub steady: Duration,
    /// How long a simulated copy (of a run or of re-replication) takes.
    pub copy_time: Duration,
    /// The coordinator's `replace_after` and `replication_check_every`.
    pub replace_after: Duration,
    pub replication_check_every: Duration,
    /// Nodes dropped to measure re-replication (of storage nodes and of
    /// agents alike).
    pub drop_fraction: f64,
    /// How long re-replication may take before the simulator gives up.
    pub replicate_timeout: Duration,
    /// Print what happens on stderr.
    pub verbose: bool,
}

impl FleetConfig {
    /// The bench's settings for `nodes` and `jobs`.
    pub fn bench(nodes: usize, jobs: usize) -> Self {
        Self {
            nodes,
            jobs,
            interval: Duration::from_secs(3600),
            heartbeat: Duration::from_secs(5),
            warmup: Duration::from_secs(15),
            steady: Duration::from_secs(60),
            copy_time: Duration::from_millis(200),
            replace_after: Duration::from_secs(5),
            replication_check_every: Duration::from_secs(5),
            drop_fraction: 0.10,
            replicate_timeout: Duration::from_secs(300),
            verbose: true,
        }
    }

    /// A small, fast fabric for a test.
    pub fn quick() -> Self {
        Self {
            nodes: 20,
            jobs: 200,
            interval: Duration::from_secs(60),
            heartbeat: Duration::from_secs(1),
            warmup: Duration::from_secs(3),
            steady: Duration::from_secs(20),
            copy_time: Duration::from_millis(50),
            replace_after: Duration::from_secs(1),
            replication_check_every: Duration::from_secs(1),
            drop_fraction: 0.10,
            replicate_timeout: Duration::from_secs(60),
            verbose: false,
        }
    }
}

/// Percentiles of a set of durations, milliseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spread {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_by(f64::total_cmp);
        let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        Self {
            count: values.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: values[values.len() - 1],
        }
    }
}

/// What a simulation measured and checked.
#[derive(Clone, Debug, Default)]
pub struct FleetReport {
    pub nodes: usize,
    pub storage_nodes: usize,
    pub jobs: usize,
    /// From the first `RegisterNode` to every session open.
    pub sessions_open_s: f64,
    /// Submitting the jobs (`SubmitJobs`, 1,000 a call).
    pub submit_s: f64,
    /// Coordinator CPU over the steady window, % of one core.
    pub steady_cpu_percent: f64,
    /// Coordinator CPU while the nodes registered and the jobs were
    /// submitted, % of one core.
    pub startup_cpu_percent: f64,
    /// This process's CPU over the steady window (the simulated nodes).
    pub simulator_cpu_percent: f64,
    /// Coordinator RSS at the end of the steady window, and its peak
    /// (VmHWM) at the end of the whole simulation, MiB.
    pub steady_rss_mib: f64,
    pub peak_rss_mib: f64,
    /// Heartbeats sent and runs finished in the steady window.
    pub steady_heartbeats: u64,
    pub steady_runs: u64,
    /// Round trip of `GetJob` (through the engine lock a heartbeat takes),
    /// 4 a second over the steady window.
    pub engine_round_trip: Spread,
    /// Assignment arrival less its schedule slot, over the steady window.
    pub scheduling_latency: Spread,
    /// Nodes dropped, of them storage nodes.
    pub dropped: usize,
    pub dropped_storage: usize,
    /// From the drop until every snapshot that kept a copy is at its
    /// replica target again (`None`: not within the timeout).
    pub rereplicate_s: Option<f64>,
    /// Snapshots with a copy on a dropped node, and the most of them short
    /// of their target (on the nodes left) at once after the drop.
    pub had_copy_dropped: usize,
    pub most_short: usize,
    /// Snapshots every copy of which was on dropped nodes.
    pub lost_snapshots: usize,
    /// Copies made by re-replication (`Replicated` answers sent).
    pub replicated: u64,
    /// Checks: slots due in the steady window's end and their
    /// assignments that never came.
    pub due_slots: usize,
    pub due_missing: Vec<String>,
    /// Runs the agents reported done before the check, and those whose
    /// snapshot is not in the catalogue at its target.
    pub reported: usize,
    pub reported_missing: Vec<String>,
    /// Sessions the coordinator ended or broke (dropped nodes aside).
    pub session_breaks: u64,
    /// Coordinator messages the simulator does not expect (pull permits,
    /// a second assignment of a run in progress...).
    pub unexpected: u64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn log(config: &FleetConfig, text: impl AsRef<str>) {
    if config.verbose {
        eprintln!("fleet[{}]: {}", config.nodes, text.as_ref());
    }
}

// ---------------------------------------------------------------- process

/// The coordinator as a child process; killed (by its pid) when dropped.
pub struct CoordinatorProcess {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub address: String,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl CoordinatorProcess {
    fn start(binary: &Path, dir: &Path, ca: &CertificateAuthority, args: &[String]) -> Self {
        let issued = ca
            .issue(
                &Identity::new(Role::Coordinator, "fleet").unwrap(),
                &IssueOptions::valid_for(Duration::from_secs(86_400)),
            )
            .unwrap();
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).unwrap();
        std::fs::write(pki.join("ca.pem"), ca.certificate_pem()).unwrap();
        std::fs::write(pki.join("coordinator.pem"), &issued.certificate_pem).unwrap();
        fabric_trust::pki::write_file(&pki.join("coordinator.key"), &issued.key_pem, 0o600, false)
            .unwrap();
        let log = dir.join("coordinator.log");
        let mut child = Command::new(binary)
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir.join("state"))
            .arg("--tls-ca")
            .arg(pki.join("ca.pem"))
            .arg("--tls-cert")
            .arg(pki.join("coordinator.pem"))
            .arg("--tls-key")
            .arg(pki.join("coordinator.key"))
            .args(["--health-listen", "", "--metrics-listen", ""])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let address = line
            .trim()
            .strip_prefix("fabric-coordinator listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}; see {}", log.display()))
            .to_owned();
        Self {
            child,
            address,
            log,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One reading of a process's counters.
#[derive(Clone, Copy, Debug)]
struct ProcSample {
    at: Instant,
    cpu_ticks: u64,
    rss_kib: u64,
    hwm_kib: u64,
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

fn sample(pid: &str) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: state is the
    // first, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcSample {
        at: Instant::now(),
        cpu_ticks: utime + stime,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

fn cpu_percent(from: &ProcSample, to: &ProcSample, ticks_per_second: f64) -> f64 {
    let seconds = to.at.duration_since(from.at).as_secs_f64();
    if seconds <= 0.0 {
        return 0.0;
    }
    (to.cpu_ticks.saturating_sub(from.cpu_ticks)) as f64 / ticks_per_second / seconds * 100.0
}

// ---------------------------------------------------------------- shared

/// A storage node's snapshots, in memory.
#[derive(Default)]
struct VirtualStore {
    snapshots: HashMap<String, Snapshot>,
    /// Bumped on every commit and deletion (what `SnapshotsHeld` follows).
    changes: u64,
}

/// One assignment as it arrived.
#[derive(Clone, Debug)]
struct Arrival {
    job: String,
    arrived_ms: i64,
    due_ms: i64,
}

/// What the simulated nodes share and count.
#[derive(Default)]
struct Shared {
    stores: Mutex<HashMap<String, VirtualStore>>,
    /// Nodes dropped: a copy to one of them fails.
    down: Mutex<HashSet<String>>,
    arrivals: Mutex<Vec<Arrival>>,
    /// (reported at, snapshot id) of every run an agent reported done.
    done: Mutex<Vec<(i64, String)>>,
    runs_failed: AtomicU64,
    runs_active: AtomicI64,
    heartbeats: AtomicU64,
    replicated: AtomicU64,
    session_breaks: AtomicU64,
    unexpected: AtomicU64,
    /// Set once the drop starts: broken sessions are then expected.
    dropping: AtomicBool,
}

impl Shared {
    fn is_down(&self, node: &str) -> bool {
        self.down.lock().unwrap().contains(node)
    }

    fn commit(&self, node: &str, snapshot: Snapshot) {
        let mut stores = self.stores.lock().unwrap();
        let store = stores.entry(node.to_owned()).or_default();
        store.snapshots.insert(snapshot.id.clone(), snapshot);
        store.changes += 1;
    }

    fn find(&self, node: &str, id: &str) -> Option<Snapshot> {
        self.stores
            .lock()
            .unwrap()
            .get(node)
            .and_then(|store| store.snapshots.get(id).cloned())
    }
}

// ---------------------------------------------------------------- a node

/// One simulated node.
#[derive(Clone)]
struct SimNode {
    id: String,
    storage: bool,
    transport: Transport,
}

impl SimNode {
    fn info(&self) -> NodeInfo {
        NodeInfo {
            id: self.id.clone(),
            address: format!("https://{}.fleet.invalid:7401", self.id),
            labels: Vec::new(),
            capacity_bytes: if self.storage { CAPACITY_BYTES } else { 0 },
            free_bytes: if self.storage { FREE_BYTES } else { 0 },
            roles: vec![if self.storage {
                NodeRole::Storage as i32
            } else {
                NodeRole::Agent as i32
            }],
            hostname: self.id.clone(),
            ..Default::default()
        }
    }
}

async fn channel(address: &str, transport: &Transport) -> Channel {
    let endpoint = Endpoint::from_shared(format!("https://{address}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(30));
    fabric_trust::transport::connect(endpoint, transport, Expect::Coordinator)
        .await
        .unwrap()
}

fn client(channel: Channel) -> CoordinatorClient<Channel> {
    CoordinatorClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn message(kind: node_message::Kind) -> NodeMessage {
    NodeMessage { kind: Some(kind) }
}

fn update(update: RunUpdate) -> NodeMessage {
    message(node_message::Kind::Update(update))
}

/// A session open: the node's outgoing messages and the coordinator's.
struct OpenSession {
    out: mpsc::Sender<NodeMessage>,
    incoming: tonic::Streaming<fabric_proto::v1::CoordinatorMessage>,
    heartbeat: Duration,
}

/// `RegisterNode`, then the session's hello.
async fn open_session(node: &SimNode, address: &str) -> OpenSession {
    let mut coordinator = client(channel(address, &node.transport).await);
    let registered = coordinator
        .register_node(node.info())
        .await
        .unwrap()
        .into_inner();
    let (out, out_rx) = mpsc::channel::<NodeMessage>(1024);
    out.send(message(node_message::Kind::Hello(node.info())))
        .await
        .unwrap();
    let incoming = coordinator
        .session(ReceiverStream::new(out_rx))
        .await
        .unwrap()
        .into_inner();
    OpenSession {
        out,
        incoming,
        heartbeat: Duration::from_millis(registered.heartbeat_interval_ms.clamp(50, 60_000)),
    }
}

/// The node's session until `stop`: heartbeats, `SnapshotsHeld`, and the
/// coordinator's messages handled.
async fn run_node(
    node: SimNode,
    session: OpenSession,
    shared: Arc<Shared>,
    config: Arc<FleetConfig>,
    mut stop: watch::Receiver<bool>,
) {
    let OpenSession {
        out,
        mut incoming,
        heartbeat,
    } = session;
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // What this session said the store holds: (changes, ids).
    let mut said: Option<(u64, HashSet<String>)> = None;
    let runs: Arc<Mutex<HashMap<String, tokio::task::AbortHandle>>> = Arc::default();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = ticker.tick() => {
                let beat = if node.storage { storage_heartbeat(&shared, &node.id) } else { Heartbeat::default() };
                if out.send(message(node_message::Kind::Heartbeat(beat))).await.is_err() {
                    return;
                }
                shared.heartbeats.fetch_add(1, Ordering::Relaxed);
                if node.storage && let Some(held) = held_report(&shared, &node.id, &mut said) {
                    let _ = out.send(message(node_message::Kind::Held(held))).await;
                }
            }
            received = incoming.message() => match received {
                Ok(Some(received)) => handle(&node, received.kind, &out, &shared, &config, &runs),
                Ok(None) | Err(_) => {
                    if !shared.dropping.load(Ordering::Relaxed) {
                        shared.session_breaks.fetch_add(1, Ordering::Relaxed);
                        log(&config, format!("{}: the session ended", node.id));
                    }
                    return;
                }
            },
        }
    }
}

/// A storage node's heartbeat: its counters and every job's usage.
fn storage_heartbeat(shared: &Shared, id: &str) -> Heartbeat {
    let stores = shared.stores.lock().unwrap();
    let mut by_job: BTreeMap<&str, u64> = BTreeMap::new();
    let mut stored_bytes = 0;
    if let Some(store) = stores.get(id) {
        for snapshot in store.snapshots.values() {
            let bytes = snapshot.stats.as_ref().map_or(0, |s| s.stored_bytes);
            *by_job.entry(snapshot.job.as_str()).or_default() += bytes;
            stored_bytes += bytes;
        }
    }
    Heartbeat {
        free_bytes: FREE_BYTES - stored_bytes,
        chunks: stored_bytes / (1 << 20),
        stored_bytes,
        job_usage: by_job
            .into_iter()
            .map(|(job, stored_bytes)| JobUsage {
                job: job.to_owned(),
                stored_bytes,
            })
            .collect(),
        ..Default::default()
    }
}

/// What `node/src/held.rs` sends: the whole list at the session's start,
/// then what changed, when something did.
fn held_report(
    shared: &Shared,
    id: &str,
    said: &mut Option<(u64, HashSet<String>)>,
) -> Option<SnapshotsHeld> {
    let stores = shared.stores.lock().unwrap();
    let (changes, snapshots) = stores
        .get(id)
        .map(|store| (store.changes, store.snapshots.clone()))
        .unwrap_or_default();
    drop(stores);
    if said.as_ref().is_some_and(|(seen, _)| *seen == changes) {
        return None;
    }
    let ids: HashSet<String> = snapshots.keys().cloned().collect();
    let listed_at_ms = now_ms();
    let report = match said.take() {
        None => Some(SnapshotsHeld {
            complete: true,
            snapshots: snapshots.into_values().collect(),
            listed_at_ms,
            ..Default::default()
        }),
        Some((_, before)) => {
            let mut added: Vec<Snapshot> = snapshots
                .into_iter()
                .filter(|(id, _)| !before.contains(id))
                .map(|(_, snapshot)| snapshot)
                .collect();
            added.sort_by(|a, b| a.id.cmp(&b.id));
            let mut removed: Vec<String> = before.difference(&ids).cloned().collect();
            removed.sort();
            (!added.is_empty() || !removed.is_empty()).then_some(SnapshotsHeld {
                complete: false,
                snapshots: added,
                removed,
                listed_at_ms,
            })
        }
    };
    *said = Some((changes, ids));
    report
}

fn handle(
    node: &SimNode,
    kind: Option<coordinator_message::Kind>,
    out: &mpsc::Sender<NodeMessage>,
    shared: &Arc<Shared>,
    config: &Arc<FleetConfig>,
    runs: &Arc<Mutex<HashMap<String, tokio::task::AbortHandle>>>,
) {
    use coordinator_message::Kind;
    match kind {
        Some(Kind::Assignment(assignment)) if assignment.role() == AssignmentRole::Push => {
            let run_id = assignment.run_id.clone();
            if runs.lock().unwrap().contains_key(&run_id) {
                shared.unexpected.fetch_add(1, Ordering::Relaxed);
                return;
            }
            record_arrival(shared, &assignment);
            let task = tokio::spawn(push(
                node.id.clone(),
                assignment,
                out.clone(),
                shared.clone(),
                config.clone(),
                runs.clone(),
            ));
            runs.lock().unwrap().insert(run_id, task.abort_handle());
        }
        Some(Kind::Cancel(cancel)) => {
            if let Some(task) = runs.lock().unwrap().remove(&cancel.run_id) {
                task.abort();
                shared.runs_active.fetch_sub(1, Ordering::Relaxed);
                let out = out.clone();
                tokio::spawn(async move {
                    let _ = out
                        .send(update(RunUpdate {
                            run_id: cancel.run_id,
                            state: RunState::Cancelled as i32,
                            message: "cancelled by the operator".into(),
                            ..Default::default()
                        }))
                        .await;
                });
            }
        }
        Some(Kind::Replicate(replicate)) => {
            tokio::spawn(replicate_here(
                node.id.clone(),
                replicate,
                out.clone(),
                shared.clone(),
                config.copy_time,
            ));
        }
        Some(Kind::DeleteSnapshots(delete)) => {
            {
                let mut stores = shared.stores.lock().unwrap();
                let store = stores.entry(node.id.clone()).or_default();
                for id in &delete.ids {
                    store.snapshots.remove(id);
                }
                store.changes += 1;
            }
            let out = out.clone();
            tokio::spawn(async move {
                let answer = SnapshotsDeleted {
                    deleted: delete.ids,
                    refused: Vec::new(),
                };
                let _ = out.send(message(node_message::Kind::Deleted(answer))).await;
            });
        }
        Some(Kind::GcLease(lease)) => {
            let out = out.clone();
            tokio::spawn(async move {
                let done = GcDone {
                    lease_id: lease.lease_id,
                    report: Some(GcReport::default()),
                    error: String::new(),
                };
                let _ = out.send(message(node_message::Kind::GcDone(done))).await;
            });
        }
        Some(Kind::VerifySnapshot(ask)) => {
            let out = out.clone();
            tokio::spawn(async move {
                let answer = SnapshotVerified {
                    run_id: ask.run_id,
                    snapshot_id: ask.snapshot_id,
                    chunks_checked: 1,
                    ..Default::default()
                };
                let _ = out
                    .send(message(node_message::Kind::SnapshotVerified(answer)))
                    .await;
            });
        }
        Some(Kind::RepairChunks(_)) => {
            let out = out.clone();
            tokio::spawn(async move {
                let _ = out
                    .send(message(node_message::Kind::RepairDone(
                        RepairDone::default(),
                    )))
                    .await;
            });
        }
        Some(_) => {
            shared.unexpected.fetch_add(1, Ordering::Relaxed);
        }
        None => {}
    }
}

/// When the assignment's run was due: the latest slot of its job's
/// (first) schedule tag at or before its arrival.
fn record_arrival(shared: &Shared, assignment: &Assignment) {
    let arrived_ms = now_ms();
    let Some(job) = assignment.job.as_ref() else {
        return;
    };
    let Some(tag) = job.schedule.first() else {
        return;
    };
    let interval_ms = i64::try_from(tag.interval_s).unwrap_or(i64::MAX / 1000) * 1000;
    let offset = fabric_coordinator::schedule::offset_ms(&job.name, interval_ms);
    let due_ms = arrived_ms - (arrived_ms - offset).rem_euclid(interval_ms.max(1));
    shared.arrivals.lock().unwrap().push(Arrival {
        job: job.name.clone(),
        arrived_ms,
        due_ms,
    });
}

/// A push run as `session::execute_push` reports it: copying, then each
/// copy (running, progress, done with the committed record; a failed one
/// goes to the next spare), then the run's end.
async fn push(
    node_id: String,
    assignment: Assignment,
    out: mpsc::Sender<NodeMessage>,
    shared: Arc<Shared>,
    config: Arc<FleetConfig>,
    runs: Arc<Mutex<HashMap<String, tokio::task::AbortHandle>>>,
) {
    shared.runs_active.fetch_add(1, Ordering::Relaxed);
    let run_id = assignment.run_id.clone();
    let send = |message: RunUpdate| {
        let out = out.clone();
        async move { out.send(update(message)).await.is_ok() }
    };
    let state = |state: RunState, text: &str| RunUpdate {
        run_id: run_id.clone(),
        state: state as i32,
        message: text.to_owned(),
        ..Default::default()
    };
    let dest = |node: &str, state: CopyState, text: &str| RunUpdate {
        run_id: run_id.clone(),
        dest: node.to_owned(),
        dest_state: state as i32,
        message: text.to_owned(),
        ..Default::default()
    };
    send(state(RunState::Copying, "")).await;
    let mut template = assignment.snapshot.clone().unwrap_or_default();
    if template.host.is_empty() {
        template.host = node_id.clone();
    }
    if template.start_time_ms == 0 {
        template.start_time_ms = now_ms();
    }
    if template.id.is_empty() {
        template.id = hex::encode(rand::random::<[u8; 16]>());
    }
    let root: [u8; 32] = rand::random();
    let mut spares: VecDeque<_> = assignment.spares.clone().into();
    let mut failures = Vec::new();
    for planned in &assignment.targets {
        let mut target = planned.clone();
        loop {
            send(dest(&target.node, CopyState::Running, "")).await;
            tokio::time::sleep(config.copy_time).await;
            if shared.is_down(&target.node) {
                let reason = format!("copy to {} failed: the node does not answer", target.node);
                send(dest(&target.node, CopyState::Failed, &reason)).await;
                match spares.pop_front() {
                    Some(spare) => {
                        target = spare;
                        continue;
                    }
                    None => {
                        failures.push(reason);
                        break;
                    }
                }
            }
            send(RunUpdate {
                progress: Some(TransferProgress {
                    files: 1_000,
                    bytes_read: 1 << 30,
                    bytes_sent: 64 << 20,
                    current_path: "/srv/data".into(),
                }),
                ..dest(&target.node, CopyState::Unspecified, "")
            })
            .await;
            let committed = Snapshot {
                end_time_ms: now_ms(),
                root_tree_id: root.to_vec(),
                state: SnapshotState::Complete as i32,
                stats: Some(SnapshotStats {
                    files: 1_000,
                    dirs: 100,
                    total_bytes: 1 << 30,
                    bytes_read: 1 << 30,
                    new_bytes: 64 << 20,
                    stored_bytes: 64 << 20,
                    chunks: 1_024,
                    new_chunks: 64,
                    files_unchanged: 900,
                }),
                ..template.clone()
            };
            shared.commit(&target.node, committed.clone());
            send(RunUpdate {
                snapshot: Some(committed),
                ..dest(&target.node, CopyState::Done, "")
            })
            .await;
            break;
        }
    }
    runs.lock().unwrap().remove(&run_id);
    shared.runs_active.fetch_sub(1, Ordering::Relaxed);
    if failures.is_empty() {
        if send(state(RunState::Done, "")).await {
            shared.done.lock().unwrap().push((now_ms(), template.id));
        }
    } else {
        shared.runs_failed.fetch_add(1, Ordering::Relaxed);
        send(state(RunState::Failed, &failures.join("; "))).await;
    }
}

/// Re-replication: copy the snapshot from the first holder that has it.
async fn replicate_here(
    node_id: String,
    replicate: Replicate,
    out: mpsc::Sender<NodeMessage>,
    shared: Arc<Shared>,
    copy_time: Duration,
) {
    tokio::time::sleep(copy_time).await;
    let found = replicate
        .holders
        .iter()
        .filter(|holder| !shared.is_down(&holder.node))
        .find_map(|holder| shared.find(&holder.node, &replicate.snapshot_id));
    let answer = match found {
        Some(snapshot) => {
            shared.commit(&node_id, snapshot.clone());
            shared.replicated.fetch_add(1, Ordering::Relaxed);
            Replicated {
                replication_id: replicate.replication_id,
                snapshot_id: replicate.snapshot_id,
                committed: Some(snapshot),
                error: String::new(),
            }
        }
        None => Replicated {
            replication_id: replicate.replication_id,
            snapshot_id: replicate.snapshot_id.clone(),
            committed: None,
            error: format!("no holder has snapshot {}", replicate.snapshot_id),
        },
    };
    let _ = out
        .send(message(node_message::Kind::Replicated(answer)))
        .await;
}

// ---------------------------------------------------------------- the run

fn credentials(ca: &CertificateAuthority, role: Role, name: &str) -> Transport {
    let issued = ca
        .issue(
            &Identity::new(role, name).unwrap(),
            &IssueOptions::valid_for(Duration::from_secs(86_400)),
        )
        .unwrap();
    let credentials = TlsCredentials::from_pem(
        ca.certificate_pem(),
        Some((&issued.certificate_pem, &issued.key_pem)),
    )
    .unwrap();
    Transport::Tls(Arc::new(credentials))
}

/// The jobs file of jobs `from..to`, each on an agent in turn.
fn jobs_file(config: &FleetConfig, agents: &[String], from: usize, to: usize) -> String {
    let mut toml = String::new();
    for index in from..to {
        let client = &agents[index % agents.len()];
        toml.push_str(&format!(
            "[job.fleet-{index:05}]\ndirection = \"push\"\nclient = \"{client}\"\ninclude = [\"/srv/data\"]\nreplicas = 2\n\
             schedule = {{ often = {{ interval = \"{}s\", keep = 24 }} }}\n\n",
            config.interval.as_secs()
        ));
    }
    toml
}

/// The latest slot of `interval_ms` (offset by the job's name) at or
/// before `t`.
fn slot_at_or_before(job: &str, interval_ms: i64, t: i64) -> i64 {
    let offset = fabric_coordinator::schedule::offset_ms(job, interval_ms);
    t - (t - offset).rem_euclid(interval_ms)
}

/// Runs one simulation: starts `binary` (the coordinator) in a temporary
/// directory, the nodes, submits the jobs, measures, drops a tenth of the
/// nodes, waits for re-replication, stops everything.
pub async fn run(binary: &Path, config: FleetConfig) -> FleetReport {
    let config = Arc::new(config);
    let dir = tempfile::Builder::new()
        .prefix("fabric-fleet-")
        .tempdir()
        .unwrap();
    let (ca, _) =
        CertificateAuthority::generate("fleet simulator CA", Duration::from_secs(86_400)).unwrap();
    let secs = |d: Duration| format!("{}ms", d.as_millis());
    let coordinator = CoordinatorProcess::start(
        binary,
        dir.path(),
        &ca,
        &[
            "--heartbeat-interval".into(),
            secs(config.heartbeat),
            "--replace-after".into(),
            secs(config.replace_after),
            "--replication-check-every".into(),
            secs(config.replication_check_every),
        ],
    );
    let pid = coordinator.pid().to_string();
    let own_pid = std::process::id().to_string();
    let ticks = clock_ticks_per_second();
    log(
        &config,
        format!("coordinator pid {pid} on {}", coordinator.address),
    );

    let nodes: Vec<SimNode> = (0..config.nodes)
        .map(|index| {
            let id = format!("sim-{index:04}");
            SimNode {
                transport: credentials(&ca, Role::Node, &id),
                storage: index % STORAGE_ONE_IN == 0,
                id,
            }
        })
        .collect();
    let agents: Vec<String> = nodes
        .iter()
        .filter(|node| !node.storage)
        .map(|node| node.id.clone())
        .collect();
    let operator = client(
        channel(
            &coordinator.address,
            &credentials(&ca, Role::Operator, "fleet"),
        )
        .await,
    );
    let shared = Arc::new(Shared::default());
    let (stop_tx, stop) = watch::channel(false);

    // Registration: 64 nodes at a time dial, register and open a session.
    let startup_from = sample(&pid).unwrap();
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(64));
    let mut opening = Vec::new();
    for node in nodes.clone() {
        let gate = gate.clone();
        let address = coordinator.address.clone();
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let session = open_session(&node, &address).await;
            (node, session)
        }));
    }
    let mut tasks: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    for opened in opening {
        let (node, session) = opened.await.unwrap();
        let id = node.id.clone();
        let task = tokio::spawn(run_node(
            node,
            session,
            shared.clone(),
            config.clone(),
            stop.clone(),
        ));
        tasks.insert(id, task);
    }
    let sessions_open_s = started.elapsed().as_secs_f64();
    log(
        &config,
        format!("{} sessions open in {sessions_open_s:.1} s", nodes.len()),
    );

    let started = Instant::now();
    let mut from = 0;
    while from < config.jobs {
        let to = (from + JOBS_PER_SUBMISSION).min(config.jobs);
        operator
            .clone()
            .submit_jobs(SubmitJobsRequest {
                toml: jobs_file(&config, &agents, from, to),
                file_name: format!("fleet-{from}.toml"),
                no_run: true,
                ..Default::default()
            })
            .await
            .unwrap();
        from = to;
    }
    let submit_s = started.elapsed().as_secs_f64();
    let startup_to = sample(&pid).unwrap();
    log(
        &config,
        format!("{} jobs submitted in {submit_s:.1} s", config.jobs),
    );

    tokio::time::sleep(config.warmup).await;

    // The steady window.
    let window_from = sample(&pid).unwrap();
    let own_from = sample(&own_pid).unwrap();
    let window_from_ms = now_ms();
    let heartbeats_from = shared.heartbeats.load(Ordering::Relaxed);
    let done_from = shared.done.lock().unwrap().len();
    let mut round_trips = Vec::new();
    let probe_job = "fleet-00000".to_owned();
    let window_end = Instant::now() + config.steady;
    let mut probe = tokio::time::interval(Duration::from_millis(250));
    while Instant::now() < window_end {
        probe.tick().await;
        let asked = Instant::now();
        operator
            .clone()
            .get_job(GetJobRequest {
                name: probe_job.clone(),
            })
            .await
            .unwrap();
        round_trips.push(asked.elapsed().as_secs_f64() * 1000.0);
    }
    let window_to = sample(&pid).unwrap();
    let own_to = sample(&own_pid).unwrap();
    let window_to_ms = now_ms();
    let steady_heartbeats = shared.heartbeats.load(Ordering::Relaxed) - heartbeats_from;
    let steady_runs = (shared.done.lock().unwrap().len() - done_from) as u64;
    let scheduling: Vec<f64> = shared
        .arrivals
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a.arrived_ms >= window_from_ms && a.arrived_ms <= window_to_ms)
        .map(|a| (a.arrived_ms - a.due_ms) as f64)
        .collect();
    log(
        &config,
        format!("steady window over: {} assignments", scheduling.len()),
    );

    // Checks: every slot due by the window's end (less a tick) came.
    let interval_ms = i64::try_from(config.interval.as_millis()).unwrap();
    let due_by = window_to_ms - 2_000;
    let jobs = operator
        .clone()
        .list_jobs(ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let arrived: HashSet<(String, i64)> = shared
        .arrivals
        .lock()
        .unwrap()
        .iter()
        .map(|a| (a.job.clone(), a.due_ms))
        .collect();
    let mut due_slots = 0;
    let mut due_missing = Vec::new();
    for job in &jobs {
        let name = job
            .spec
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let since = job.schedule_since_ms;
        if since == 0 {
            continue;
        }
        let mut slot = slot_at_or_before(&name, interval_ms, since) + interval_ms;
        while slot <= due_by {
            due_slots += 1;
            if !arrived.contains(&(name.clone(), slot)) {
                due_missing.push(format!("{name} at {slot}"));
            }
            slot += interval_ms;
        }
    }
    // Every run reported done a while ago is in the catalogue at its target.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reported_by = now_ms() - 1_000;
    let reported: Vec<String> = shared
        .done
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _)| *at <= reported_by)
        .map(|(_, id)| id.clone())
        .collect();
    let catalogue = operator
        .clone()
        .list_catalog(ListCatalogRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    let at_target: HashSet<String> = catalogue
        .iter()
        .filter(|e| e.replica_target == 2 && e.healthy_copies >= e.replica_target)
        .filter_map(|e| e.snapshot.as_ref().map(|s| s.id.clone()))
        .collect();
    let reported_missing: Vec<String> = reported
        .iter()
        .filter(|id| !at_target.contains(*id))
        .cloned()
        .collect();
    log(
        &config,
        format!(
            "checks: {due_slots} slots due, {} missing; {} runs done, {} not in the catalogue at target",
            due_missing.len(),
            reported.len(),
            reported_missing.len()
        ),
    );

    // Drop a tenth of the storage nodes and of the agents.
    let count = |storage: bool| nodes.iter().filter(|n| n.storage == storage).count();
    let drop_of =
        |storage: bool| ((count(storage) as f64 * config.drop_fraction).ceil() as usize).max(1);
    let mut dropped: Vec<&SimNode> = nodes
        .iter()
        .filter(|n| n.storage)
        .rev()
        .take(drop_of(true))
        .collect();
    dropped.extend(
        nodes
            .iter()
            .filter(|n| !n.storage)
            .rev()
            .take(drop_of(false)),
    );
    shared.dropping.store(true, Ordering::Relaxed);
    let dropped_at = Instant::now();
    {
        let mut down = shared.down.lock().unwrap();
        for node in &dropped {
            down.insert(node.id.clone());
        }
    }
    for node in &dropped {
        if let Some(task) = tasks.remove(&node.id) {
            task.abort();
        }
    }
    log(&config, format!("dropped {} nodes", dropped.len()));
    // The snapshots that had a copy on a dropped node: done when each has
    // its target of good copies on the nodes left (one whose every copy
    // was dropped cannot be copied again, and is counted apart).
    let gone: HashSet<String> = dropped.iter().map(|node| node.id.clone()).collect();
    let on_dropped: HashSet<String> = catalogue
        .iter()
        .filter(|e| e.copies.iter().any(|copy| gone.contains(&copy.node)))
        .filter_map(|e| e.snapshot.as_ref().map(|s| s.id.clone()))
        .collect();
    let mut rereplicate_s = None;
    let mut most_short = 0;
    let mut lost_snapshots = 0;
    while dropped_at.elapsed() < config.replicate_timeout {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let entries = operator
            .clone()
            .list_catalog(ListCatalogRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries;
        let mut short = 0;
        lost_snapshots = 0;
        for entry in &entries {
            let Some(snapshot) = entry.snapshot.as_ref() else {
                continue;
            };
            if !on_dropped.contains(&snapshot.id) {
                continue;
            }
            let left = entry
                .copies
                .iter()
                .filter(|copy| !gone.contains(&copy.node) && copy.problem.is_empty())
                .count();
            if left == 0 {
                lost_snapshots += 1;
            } else if left < entry.replica_target as usize {
                short += 1;
            }
        }
        most_short = most_short.max(short);
        if short == 0 {
            rereplicate_s = Some(dropped_at.elapsed().as_secs_f64());
            break;
        }
    }
    log(
        &config,
        format!("re-replication: {rereplicate_s:?} s, at most {most_short} short"),
    );

    let _ = stop_tx.send(true);
    for (_, task) in tasks {
        let _ = task.await;
    }
    let end = sample(&pid).unwrap();
    drop(operator);
    drop(coordinator);

    FleetReport {
        nodes: config.nodes,
        storage_nodes: count(true),
        jobs: config.jobs,
        sessions_open_s,
        submit_s,
        steady_cpu_percent: cpu_percent(&window_from, &window_to, ticks),
        startup_cpu_percent: cpu_percent(&startup_from, &startup_to, ticks),
        simulator_cpu_percent: cpu_percent(&own_from, &own_to, ticks),
        steady_rss_mib: window_to.rss_kib as f64 / 1024.0,
        peak_rss_mib: end.hwm_kib as f64 / 1024.0,
        steady_heartbeats,
        steady_runs,
        engine_round_trip: Spread::of(round_trips),
        scheduling_latency: Spread::of(scheduling),
        dropped: dropped.len(),
        dropped_storage: drop_of(true),
        rereplicate_s,
        had_copy_dropped: on_dropped.len(),
        most_short,
        lost_snapshots,
        replicated: shared.replicated.load(Ordering::Relaxed),
        due_slots,
        due_missing,
        reported: reported.len(),
        reported_missing,
        session_breaks: shared.session_breaks.load(Ordering::Relaxed),
        unexpected: shared.unexpected.load(Ordering::Relaxed),
    }
}
