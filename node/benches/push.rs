//! Push backup over loopback against local chunk store ingest, in one run.
//!
//! `cargo bench -p fabric-node --bench push` (release build). Starts the real
//! `fabric-node` binary (target/release, built first) on 127.0.0.1:0 and, in
//! this process, the agent. Prints, for the same data: local ingest (walk
//! into a store in this process), the first push, an unchanged re-push and a
//! restore, each in MB/s; a tree of 10,000 small files (first push and
//! unchanged re-push); and the peak RSS of the node and of this process.
//!
//! Local ingest and the first push run in alternating rounds, each into an
//! empty store (a fresh node for each push), and the medians are reported,
//! with the CPU seconds each process used: on a shared machine whose speed
//! drifts, one pair of runs can be off by a third. Each round's node then
//! takes the small-file tree: a first push and the median of
//! [`SMALL_REPEATS`] unchanged re-pushes (single runs of tens of
//! milliseconds vary too much to compare).
//!
//! Then the same pairs of local ingest and first push run with the cores
//! split in two halves: this process (the agent, and local ingest) on one,
//! the node on the other, as when the node is another machine. On a machine
//! of few cores the first part measures mostly that agent and node share
//! them (the node decodes and re-hashes every chunk it receives); the second
//! measures what the gRPC path costs the client: the agent's CPU against
//! local ingest's, and whether a push keeps up with local ingest on the
//! same cores (the node's writes then happen on the other half). Each part
//! starts with one local ingest that is not counted.
//!
//! After each local ingest its store is verified (every chunk read back,
//! decoded and BLAKE3-checked): the work a node does for every chunk it
//! receives, besides writing it, and which a push on shared cores pays on
//! top of all of local ingest's. From the two CPU figures the run prints the
//! ceiling a push on shared cores could reach if its transport cost nothing.
//!
//! `FABRIC_BENCH_MB` sets the size of the large data (default 1024: half
//! random, half text-like); `FABRIC_BENCH_SMALL_FILES` the small-file count;
//! `FABRIC_BENCH_ROUNDS` the rounds (default 3); `FABRIC_BENCH_MEMORY` the
//! pushes' memory budget in bytes (default: the agent's).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use fabric_chunkstore::restore::{DirectoryTarget, RestorePolicy};
use fabric_chunkstore::walk::{BackupOptions, backup};
use fabric_chunkstore::{ChunkParams, Store, StoreConfig, VerifyOptions};
use fabric_proto::v1::Snapshot;
use rustix::process::Pid;
use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn peak_rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| line.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}

/// Start a new peak RSS for a process (Linux 4.0+: "5" to `clear_refs`
/// resets VmHWM to the current RSS).
fn reset_peak_rss(pid: &str) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: &str) -> f64 {
    let ticks_per_second = 100.0; // USER_HZ: 100 on every Linux ABI in use
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command name, which may hold spaces.
            let rest = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .collect::<Vec<_>>();
            let user: f64 = rest.get(11)?.parse().ok()?;
            let system: f64 = rest.get(12)?.parse().ok()?;
            Some((user + system) / ticks_per_second)
        })
        .unwrap_or(0.0)
}

/// CPU seconds the agent (this process) and the node used during `phase`.
struct CpuUse {
    agent: f64,
    node: f64,
}

impl CpuUse {
    fn measure<T>(node_pid: &str, phase: impl FnOnce() -> T) -> (T, Self) {
        let (agent_before, node_before) = (cpu_seconds("self"), cpu_seconds(node_pid));
        let result = phase();
        let usage = Self {
            agent: cpu_seconds("self") - agent_before,
            node: cpu_seconds(node_pid) - node_before,
        };
        (result, usage)
    }

    fn describe(&self, seconds: f64) -> String {
        format!(
            "CPU: agent {:.2} s, node {:.2} s, {:.2} cores busy",
            self.agent,
            self.node,
            (self.agent + self.node) / seconds
        )
    }
}

/// The CPUs of a machine split in two halves: one for this process (the
/// agent and local ingest), one for the node.
struct CoreSplit {
    agent: Vec<usize>,
    node: Vec<usize>,
    all: CpuSet,
}

fn cpu_set(cpus: &[usize]) -> CpuSet {
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu);
    }
    set
}

impl CoreSplit {
    /// The CPUs this process may use, halved; `None` with fewer than two.
    fn of_this_process() -> Option<Self> {
        let all = sched_getaffinity(None).ok()?;
        let cpus: Vec<usize> = (0..CpuSet::MAX_CPU)
            .filter(|&cpu| all.is_set(cpu))
            .collect();
        if cpus.len() < 2 {
            return None;
        }
        let (agent, node) = cpus.split_at(cpus.len() / 2);
        Some(Self {
            agent: agent.to_vec(),
            node: node.to_vec(),
            all,
        })
    }
}

/// Move every thread of this process to `cpus`. A thread started later
/// inherits the CPUs of the thread that starts it, and so does a child
/// process.
fn pin_this_process(cpus: &CpuSet) {
    let tasks = std::fs::read_dir("/proc/self/task").expect("this process's threads");
    for task in tasks {
        let tid = task
            .expect("a thread")
            .file_name()
            .to_string_lossy()
            .parse()
            .ok()
            .and_then(Pid::from_raw);
        if let Some(tid) = tid {
            // A thread that ended meanwhile cannot be moved, and need not be.
            let _ = sched_setaffinity(Some(tid), cpus);
        }
    }
}

fn write_data(dir: &Path, megabytes: usize) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let random_mb = megabytes / 2;
    for file in 0..random_mb.div_ceil(64) {
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(dir.join(format!("random-{file}.bin"))).expect("create"),
        );
        for _ in
            0..(64 * 1024 * 1024 / 8).min(random_mb.saturating_sub(file * 64) * 1024 * 1024 / 8)
        {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.write_all(&state.to_le_bytes()).expect("write");
        }
    }
    let words = [
        "fn", "let", "mut", "struct", "impl", "store", "chunk", "pack", "index", "tree",
        "snapshot", "node", "{", "}", "(", ")", ";", "=>", "match", "Ok", "Err", "self",
    ];
    let text_mb = megabytes - random_mb;
    for file in 0..text_mb.div_ceil(64) {
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(dir.join(format!("text-{file}.rs"))).expect("create"),
        );
        let target = (64usize * 1024 * 1024).min(text_mb.saturating_sub(file * 64) * 1024 * 1024);
        let mut written = 0;
        let mut line = 0u64;
        while written < target {
            line += 1;
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let text = format!(
                "    {} {} {} {}; // line {line}\n",
                words[(state % 22) as usize],
                words[((state >> 8) % 22) as usize],
                words[((state >> 16) % 22) as usize],
                state % 1000
            );
            out.write_all(text.as_bytes()).expect("write");
            written += text.len();
        }
    }
}

fn write_small_files(dir: &Path, count: usize) {
    for index in 0..count {
        let sub = dir.join(format!("d{}", index / 500));
        std::fs::create_dir_all(&sub).expect("mkdir");
        std::fs::write(
            sub.join(format!("f{index}.txt")),
            format!("small file {index}\n").repeat(index % 50 + 1),
        )
        .expect("write");
    }
}

fn mb_per_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / 1e6 / seconds
}

/// The bench's CA: the node's certificate and the agent's transport (a
/// push is measured as deployed: TLS 1.3 both ways).
struct BenchTls {
    ca: PathBuf,
    node: (PathBuf, PathBuf),
    agent: fabric_trust::Transport,
    /// A restore is an operator's (or a client's) call, not an agent's.
    operator: fabric_trust::Transport,
}

impl BenchTls {
    fn new(dir: &Path) -> Self {
        use fabric_trust::Role;
        let pki =
            fabric_trust::pki::PkiDir::open_or_init(&dir.join("ca"), "bench CA").expect("a CA");
        let node = pki
            .issue_into(Role::Node, "bench-node", dir)
            .expect("a node certificate");
        let transport = |role, name| {
            let (cert, key) = pki.issue_into(role, name, dir).expect("a certificate");
            fabric_trust::transport::TransportSettings {
                ca: Some(pki.ca_certificate()),
                cert: Some(cert),
                key: Some(key),
                insecure_plaintext: false,
            }
            .client()
            .expect("credentials")
        };
        Self {
            ca: pki.ca_certificate(),
            node,
            agent: transport(Role::Node, "bench-agent"),
            operator: transport(Role::Operator, "bench"),
        }
    }
}

/// A `fabric-node serve` child on 127.0.0.1, stopped (SIGTERM, then waited
/// for) when dropped.
struct NodeProcess {
    child: std::process::Child,
    address: String,
    pid: String,
}

impl NodeProcess {
    /// Start a node; on `cpus` (and its threads with it) when given. The
    /// child inherits the CPUs of the thread that starts it, so this thread
    /// moves there for the start and back to `back_to` afterwards.
    fn start(
        binary: &Path,
        data_dir: &Path,
        cpus: Option<(&CpuSet, &CpuSet)>,
        tls: &BenchTls,
    ) -> Self {
        if let Some((node, _)) = cpus {
            sched_setaffinity(None, node).expect("move to the node's CPUs");
        }
        let spawned = Command::new(binary)
            .args(["serve", "--listen", "127.0.0.1:0", "--health-listen", ""])
            .args(["--node-id", "bench-node", "--data-dir"])
            .arg(data_dir)
            .arg("--tls-ca")
            .arg(&tls.ca)
            .arg("--tls-cert")
            .arg(&tls.node.0)
            .arg("--tls-key")
            .arg(&tls.node.1)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn();
        if let Some((_, back_to)) = cpus {
            sched_setaffinity(None, back_to).expect("move back to the agent's CPUs");
        }
        let mut child = spawned.expect("fabric-node starts");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = lines.next().expect("a line").expect("readable");
        let address = format!("https://{}", first.rsplit(' ').next().expect("an address"));
        std::thread::spawn(move || for _ in lines.by_ref() {});
        let pid = child.id().to_string();
        Self {
            child,
            address,
            pid,
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(&self.pid).status();
        let _ = self.child.wait();
    }
}

/// What one round of local ingest and a first push measured.
struct RoundPair {
    local_seconds: f64,
    local_cpu: CpuUse,
    /// Peak RSS of this process during local ingest, MiB.
    local_rss: u64,
    /// CPU seconds of reading back, decoding and re-hashing every chunk of
    /// the local store: the node's share of a push that no transport saves.
    recheck_cpu: f64,
    push_seconds: f64,
    push_cpu: CpuUse,
    /// Peak RSS of the agent (this process) during the push, MiB.
    agent_rss: u64,
    /// Peak RSS of the node during the push, MiB.
    node_rss: u64,
    outcome: fabric_node::agent::PushOutcome,
    /// The node pushed to, still running.
    node: NodeProcess,
    node_dir: PathBuf,
}

impl RoundPair {
    /// The push's speed as a share of local ingest's.
    fn speed_share(&self) -> f64 {
        self.local_seconds / self.push_seconds
    }

    /// The agent's CPU during the push as a share of local ingest's.
    fn agent_cpu_share(&self) -> f64 {
        self.push_cpu.agent / self.local_cpu.agent
    }

    /// The best share of local ingest's speed a push could reach with both
    /// on the same cores, kept as busy, if its transport cost nothing: it
    /// does all local ingest's work plus the node's re-check.
    fn shared_core_ceiling(&self) -> f64 {
        self.local_cpu.agent / (self.local_cpu.agent + self.recheck_cpu)
    }
}

/// Unchanged re-backups of the small-file tree per round.
const SMALL_REPEATS: usize = 5;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let megabytes = env_usize("FABRIC_BENCH_MB", 1024);
    let small_files = env_usize("FABRIC_BENCH_SMALL_FILES", 10_000);
    let rounds = env_usize("FABRIC_BENCH_ROUNDS", 3).max(1);
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_owned();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&workspace)
        .args(["build", "--release", "--quiet", "--bin", "fabric-node"])
        .status()
        .expect("cargo runs");
    assert!(status.success());
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let node_binary = target_dir.join("release/fabric-node");

    let work = tempfile::tempdir().expect("tempdir");
    let data = work.path().join("data");
    let small = work.path().join("small");
    write_data(&data, megabytes);
    write_small_files(&small, small_files);
    let total: u64 = std::fs::read_dir(&data)
        .expect("ls")
        .map(|e| e.expect("entry").metadata().expect("stat").len())
        .sum();
    println!(
        "data: {} MB ({} MB random, {} MB text-like), {small_files} small files; {} cores; {rounds} rounds of local ingest then first push, each into an empty store",
        total / 1_000_000,
        megabytes / 2,
        megabytes - megabytes / 2,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    let options = |path: &Path| BackupOptions {
        includes: vec![path.to_owned()],
        excludes: Vec::new(),
        one_file_system: false,
        chunk_params: ChunkParams::default(),
        threads: 0,
        hash_ahead_bytes: fabric_chunkstore::walk::DEFAULT_HASH_AHEAD_BYTES,
    };
    let backup_memory = env_usize(
        "FABRIC_BENCH_MEMORY",
        fabric_node::memory_budget::DEFAULT_BACKUP_MEMORY as usize,
    ) as u64;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let tls = BenchTls::new(&work.path().join("tls"));
    let push = |address: &str, path: &Path, job: &str| {
        let started = Instant::now();
        let outcome = runtime
            .block_on(fabric_node::agent::push_backup(
                &fabric_node::client::Peer::node("bench-node", address),
                &tls.agent,
                options(path),
                fabric_node::memory_budget::SendPlan::for_this_machine(backup_memory)
                    .expect("FABRIC_BENCH_MEMORY: a budget to back up in"),
                Snapshot {
                    job: job.into(),
                    host: "bench-agent".into(),
                    ..Default::default()
                },
                None,
                fabric_node::rate_limit::TransferLimits::none(),
            ))
            .expect("push");
        (started.elapsed().as_secs_f64(), outcome)
    };

    // Local ingest of the data into an empty store: seconds, CPU, peak RSS.
    let local_ingest = |dir_name: &str| {
        let local_dir = work.path().join(format!("local-store-{dir_name}"));
        let local_store = Store::open_or_create(&local_dir, StoreConfig::default()).expect("store");
        // Neither phase writes back what came before it (the data, the
        // last round's stores).
        rustix::fs::sync();
        reset_peak_rss("self");
        let started = Instant::now();
        let ((), local_cpu) = CpuUse::measure("self", || {
            backup(&options(&data), &local_store, None, &|_| {}).expect("local backup");
        });
        let local_seconds = started.elapsed().as_secs_f64();
        let local_rss = peak_rss_kib("self") / 1024;
        // What a node does for every chunk it receives besides writing it:
        // read (here from the page cache, there from the socket), decode and
        // BLAKE3 it. The issue requires it of every node, so a push on shared
        // cores pays it on top of everything local ingest does.
        let (report, recheck_cpu) = CpuUse::measure("self", || {
            local_store
                .verify(&VerifyOptions::default())
                .expect("verify the local store")
        });
        assert!(report.is_ok(), "the local store verifies");
        drop(local_store);
        std::fs::remove_dir_all(&local_dir).expect("remove the local store");
        (local_seconds, local_cpu, local_rss, recheck_cpu.agent)
    };
    // The first local ingest of a run, or of a part, has taken up to half
    // again the CPU of the next ones on a shared VM (this process's heap is
    // still growing), which would flatter the first push: one uncounted run
    // goes first.
    let warm_up = |part: &str| {
        let (seconds, cpu, _, _) = local_ingest(&format!("warm-up-{part}"));
        println!(
            "warm-up ({part}, not counted): local ingest {:6.1} MB/s ({seconds:.2} s, CPU {:.2} s)",
            mb_per_s(total, seconds),
            cpu.agent
        );
    };
    // One round's pair: local ingest into an empty store, then a first push
    // of the same data into a fresh node (on `node_cpus` when given).
    let pair = |name: &str, node_cpus: Option<(&CpuSet, &CpuSet)>| {
        let dir_name = name.replace(' ', "-");
        let (local_seconds, local_cpu, local_rss, recheck_cpu) = local_ingest(&dir_name);

        let node_dir = work.path().join(format!("node-store-{dir_name}"));
        let node = NodeProcess::start(&node_binary, &node_dir, node_cpus, &tls);
        rustix::fs::sync();
        reset_peak_rss("self");
        let ((push_seconds, outcome), push_cpu) =
            CpuUse::measure(&node.pid, || push(&node.address, &data, "large"));
        let measured = RoundPair {
            local_seconds,
            local_cpu,
            local_rss,
            recheck_cpu,
            push_seconds,
            push_cpu,
            agent_rss: peak_rss_kib("self") / 1024,
            node_rss: peak_rss_kib(&node.pid) / 1024,
            outcome,
            node,
            node_dir,
        };
        println!(
            "{name}: local ingest {:6.1} MB/s ({local_seconds:.2} s, CPU {:.2} s; re-check of its chunks CPU {:.2} s); push {:6.1} MB/s ({push_seconds:.2} s, {}; {} MB sent), {:.1}% of local",
            mb_per_s(total, local_seconds),
            measured.local_cpu.agent,
            measured.recheck_cpu,
            mb_per_s(total, push_seconds),
            measured.push_cpu.describe(push_seconds),
            measured.outcome.bytes_sent / 1_000_000,
            100.0 * measured.speed_share()
        );
        measured
    };

    // Local ingest and the first push alternate, so a machine whose speed
    // drifts (a shared VM) weighs on both alike; medians are reported.
    let mut local_times = Vec::new();
    let mut push_times = Vec::new();
    let mut ratios = Vec::new();
    let mut agent_cpu_shares = Vec::new();
    let mut ceilings = Vec::new();
    // Peak RSS in MiB of each phase, per round.
    let (mut local_rss, mut agent_rss, mut node_rss) = (Vec::new(), Vec::new(), Vec::new());
    let (mut small_first_times, mut small_again_medians, mut small_ratios) =
        (Vec::new(), Vec::new(), Vec::new());
    let mut node = None;
    let mut first = None;
    warm_up("shared cores");
    for round in 0..rounds {
        // The last round's node stays for the other measurements.
        drop(node.take());
        let measured = pair(&format!("round {}", round + 1), None);
        local_rss.push(measured.local_rss);
        agent_rss.push(measured.agent_rss);
        node_rss.push(measured.node_rss);
        local_times.push(measured.local_seconds);
        push_times.push(measured.push_seconds);
        ratios.push(measured.speed_share());
        agent_cpu_shares.push(measured.agent_cpu_share());
        ceilings.push(measured.shared_core_ceiling());
        first = Some(measured.outcome);
        let started_node = measured.node;
        let node_dir = measured.node_dir;

        // The small-file tree into this round's node: a first backup, then
        // unchanged re-backups (the median of a few: each takes tens of ms).
        let (small_first_seconds, _) = push(&started_node.address, &small, "small");
        let mut again_times = Vec::new();
        for _ in 0..SMALL_REPEATS {
            let (seconds, again) = push(&started_node.address, &small, "small");
            assert_eq!(again.bytes_sent, 0, "an unchanged re-backup sends nothing");
            again_times.push(seconds);
        }
        let small_again_seconds = median(&mut again_times);
        println!(
            "round {}: {small_files} small files, first backup {small_first_seconds:.3} s, unchanged re-backup {:.1} ms (median of {SMALL_REPEATS}), {:.1}x",
            round + 1,
            small_again_seconds * 1000.0,
            small_first_seconds / small_again_seconds
        );
        small_first_times.push(small_first_seconds);
        small_again_medians.push(small_again_seconds);
        small_ratios.push(small_first_seconds / small_again_seconds);

        if round + 1 < rounds {
            drop(started_node);
            std::fs::remove_dir_all(&node_dir).expect("remove the node store");
        } else {
            node = Some(started_node);
        }
    }
    let node = node.expect("the last round's node");
    let first = first.expect("a first push");
    let local_seconds = median(&mut local_times);
    let first_seconds = median(&mut push_times);
    let ratio = median(&mut ratios);

    let (again_seconds, again) = push(&node.address, &data, "large");
    let restore_dir = work.path().join("restored");
    std::fs::create_dir_all(&restore_dir).expect("mkdir");
    let started = Instant::now();
    let inside = data.to_string_lossy().trim_start_matches('/').to_owned();
    let ((), restore_cpu) = CpuUse::measure(&node.pid, || {
        runtime
            .block_on(fabric_node::restore_client::restore_from(
                &fabric_node::client::Peer::node("bench-node", &node.address),
                &tls.operator,
                &first.snapshot.id,
                &inside,
                Box::new(
                    DirectoryTarget::new(restore_dir.clone(), RestorePolicy::default())
                        .expect("target"),
                ),
            ))
            .expect("restore");
    });
    let restore_seconds = started.elapsed().as_secs_f64();

    println!(
        "local ingest (walk into a store, same process): {:8.1} MB/s  (median {local_seconds:.2} s)",
        mb_per_s(total, local_seconds),
    );
    println!(
        "push, first backup over loopback:               {:8.1} MB/s  (median {first_seconds:.2} s, {} chunks, {} MB sent; median {:.1}% of local; the agent's CPU: median {:.1}% of local ingest's)",
        mb_per_s(total, first_seconds),
        first.chunks_sent,
        first.bytes_sent / 1_000_000,
        100.0 * ratio,
        100.0 * median(&mut agent_cpu_shares),
    );
    let ceiling = median(&mut ceilings);
    println!(
        "push on shared cores, ceiling with a free transport: {:.1}% of local ingest's speed (median; local ingest's CPU plus the node's re-check of every chunk, which alone takes {:.1}% of local ingest's CPU)",
        100.0 * ceiling,
        100.0 * (1.0 / ceiling - 1.0),
    );
    println!(
        "push, unchanged re-backup:                      {:8.1} MB/s  ({again_seconds:.2} s, {} bytes sent, {} of {} files unchanged)",
        mb_per_s(total, again_seconds),
        again.bytes_sent,
        again
            .snapshot
            .stats
            .as_ref()
            .map(|s| s.files_unchanged)
            .unwrap_or(0),
        again.snapshot.stats.as_ref().map(|s| s.files).unwrap_or(0)
    );
    println!(
        "restore over loopback:                          {:8.1} MB/s  ({restore_seconds:.2} s; {})",
        mb_per_s(total, restore_seconds),
        restore_cpu.describe(restore_seconds)
    );
    println!(
        "{small_files} small files, first backup:             {:8.3} s  (median of {rounds} rounds)",
        median(&mut small_first_times)
    );
    println!(
        "{small_files} small files, unchanged re-backup:      {:8.1} ms (median of the rounds' medians; median {:.1}x faster, 0 bytes sent)",
        median(&mut small_again_medians) * 1000.0,
        median(&mut small_ratios)
    );
    println!(
        "peak RSS during the first push, by round: agent {agent_rss:?} MiB, node {node_rss:?} MiB; during local ingest {local_rss:?} MiB"
    );
    println!(
        "peak RSS over the whole run: node {} MiB (last round), this process {} MiB",
        peak_rss_kib(&node.pid) / 1024,
        peak_rss_kib("self") / 1024
    );
    drop(node);

    // The same pairs with the node on cores of its own, as when it is
    // another machine: what the gRPC path costs the client.
    let Some(split) = CoreSplit::of_this_process() else {
        println!("node on cores of its own: skipped, this process may use one CPU only");
        return;
    };
    let (agent_cpus, node_cpus) = (cpu_set(&split.agent), cpu_set(&split.node));
    println!(
        "node on cores of its own: this process (agent, local ingest) on CPUs {:?}, the node on {:?}",
        split.agent, split.node
    );
    pin_this_process(&agent_cpus);
    warm_up("split cores");
    let (mut split_ratios, mut split_cpu_shares) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let measured = pair(
            &format!("split round {}", round + 1),
            Some((&node_cpus, &agent_cpus)),
        );
        split_ratios.push(measured.speed_share());
        split_cpu_shares.push(measured.agent_cpu_share());
        drop(measured.node);
        std::fs::remove_dir_all(&measured.node_dir).expect("remove the node store");
    }
    pin_this_process(&split.all);
    println!(
        "push with the node on cores of its own: median {:.1}% of local ingest's speed; the agent's CPU: median {:.1}% of local ingest's",
        100.0 * median(&mut split_ratios),
        100.0 * median(&mut split_cpu_shares)
    );
}
