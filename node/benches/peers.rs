//! Fabric beside its peers, restic and borg, on the same data in one run.
//!
//! `bash node/benches/peers.sh` installs restic and borg from Debian when
//! they are missing, builds the release binaries and runs
//! `cargo bench -p fabric-node --bench peers`, which does the rest.
//!
//! # The data
//!
//! Generated from a seed (`rand`'s `StdRng`; nothing is downloaded) into a
//! temporary folder, in three data sets, each in versions:
//!
//! - `tree`: a source tree of 2,000 text-like files (5% random bytes, as
//!   images in a repository) in nested folders, 150 MB, in 10 versions;
//!   each version edits, appends to, adds or deletes 3% of the files.
//! - `dump`: one SQL dump (`INSERT` lines of three tables) of 200 MB in 6
//!   versions; each rewrites the whole file with rows appended to every
//!   table (so what follows the first table moves), 0.5% of the rows
//!   changed among the newest, a few old rows changed or deleted anywhere
//!   and the oldest events pruned: deduplication across shifted data
//!   matters.
//! - `image`: a sparse VM image of 4 GiB apparent size with 320 MB written
//!   at scattered offsets (half random, half text-like), in 4 revisions;
//!   each rewrites 5% of what is written in small regions and writes 2%
//!   more in new ones.
//!
//! # What is measured
//!
//! For each data set, each tool in turn (fabric, restic, borg, in that
//! order, never two at once) gets the data written anew from the seed, then
//! backs up every version in turn, the last version once more unchanged,
//! and restores the last version into an empty folder. Before each backup
//! the data is synced to disk and read once, untimed, so every tool starts
//! from a warm page cache (page caches are never dropped: no root needed).
//!
//! - first backup: wall seconds of the backup of version 1 into an empty
//!   repository (or an empty node);
//! - all versions: wall seconds of the backups of every version, summed
//!   (the first included);
//! - unchanged re-backup: wall seconds of backing up the last version again;
//! - restore: wall seconds of restoring the last version into an empty
//!   folder. The restored tree is then compared with the source: the same
//!   paths, kinds and sizes, and each file's BLAKE3; a difference fails the
//!   bench;
//! - peak memory, MiB: for fabric the node's peak RSS (`VmHWM` of its
//!   `/proc/PID/status`, read just before it is stopped; one node serves a
//!   whole data set, so this is its peak over the data set) plus the largest
//!   peak RSS of a `fabricctl` run; for restic and borg the largest peak RSS
//!   of a client run. A client's peak RSS and CPU are the kernel's rusage of
//!   the process (`ru_maxrss`, `ru_utime + ru_stime`), read by a small
//!   wrapper (this binary again) that starts it, waits for it and kills it
//!   past `FABRIC_PEERS_TIMEOUT_S` (default 1800 s), which fails the bench;
//! - CPU seconds (user + system) of every process involved, over every
//!   backup and the restore: the client runs, plus for fabric the node's
//!   whole life (`utime + stime` of its `/proc/PID/stat` just before it is
//!   stopped);
//! - stored bytes: disk blocks (`st_blocks * 512`) of everything in the
//!   repository (restic, borg) or the node's data directory (fabric: packs,
//!   index, catalogue) after all versions, before the unchanged re-backup.
//!
//! Each data set prints a table: rows the metrics, columns the tools and
//! `fabric / best peer`, fabric's figure over the better of restic's and
//! borg's (every metric is lower-is-better: below 1 fabric does better).
//! A summary of those ratios follows, and everything goes as JSON to
//! `target/peers.json`.
//!
//! # The tools' settings
//!
//! - fabric: one `fabric-node serve` per data set on 127.0.0.1 with TLS from
//!   a CA made for the run (as the push bench does), its scrub off (a
//!   background check the peers do not run) and the health and metrics ports
//!   off; `fabricctl backup --node` and `fabricctl restore --node` with a
//!   client certificate. Chunks are zstd level 3, the chunk store's default,
//!   and not encrypted at rest (the node's disk is trusted; transport is
//!   TLS 1.3). `FABRIC_PEERS_CLIENT_ARGS` is appended to `fabricctl
//!   backup`'s arguments (split as a shell would).
//! - restic: a local repository, format version 2 (`init
//!   --repository-version 2`) with its default `--compression auto` (zstd),
//!   the password in `RESTIC_PASSWORD`. restic always encrypts, which costs
//!   it CPU that fabric and borg do not spend here. Its cache is in the
//!   temporary folder (`--cache-dir`), not counted in stored bytes: it is a
//!   client-side copy of the repository's metadata.
//! - borg: `borg init --encryption=none`, so like fabric it keeps plain data
//!   at rest (with `repokey` it would also encrypt and MAC every chunk),
//!   `--compression zstd,3` as fabric's default level,
//!   `BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK` and
//!   `BORG_RELOCATED_REPO_ACCESS_IS_OK`; its cache and files cache in the
//!   temporary folder (`BORG_BASE_DIR`), not counted in stored bytes.
//! - Every tool uses its default chunker. Restores of the image: fabric
//!   writes runs of zeros as holes, borg with `extract --sparse`; restic
//!   0.14 (Debian 12) has no sparse restore and writes the zeros.
//!
//! # Settings
//!
//! `FABRIC_PEERS_SCALE` scales every size and the file count (default 1: a
//! run of about 6 minutes on 2 cores; 0.02 for a quick check);
//! `FABRIC_PEERS_IMAGE_GIB` the image's apparent size (default 4);
//! `FABRIC_PEERS_SEED` the seed (default 26); `FABRIC_PEERS_SETS` and
//! `FABRIC_PEERS_TOOLS` run only some (comma-separated: `tree,dump,image`,
//! `fabric,restic,borg`); `FABRIC_PEERS_DIR` where the temporary folder
//! goes (default: the system's).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rustix::process::{Pid, Signal, kill_process};

/// Set in the environment of this binary started as the measuring wrapper:
/// the file it writes its child's figures into.
const MEASURE_INTO: &str = "FABRIC_PEERS_MEASURE_INTO";
/// The wrapper's limit on its child's run, seconds.
const MEASURE_TIMEOUT: &str = "FABRIC_PEERS_MEASURE_TIMEOUT_S";

const MIB: u64 = 1024 * 1024;

fn main() {
    if let Some(into) = std::env::var_os(MEASURE_INTO) {
        measure_one_child(Path::new(&into));
    }
    let settings = Settings::from_env();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace folder")
        .to_owned();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    if settings.tools.contains(&ToolKind::Fabric) {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&workspace)
            .args(["build", "--release", "--quiet"])
            .args(["--bin", "fabric-node", "--bin", "fabricctl"])
            .status()
            .expect("cargo runs");
        assert!(
            status.success(),
            "building fabric-node and fabricctl failed"
        );
    }

    let parent = std::env::var_os("FABRIC_PEERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("fabric-peers-")
        .tempdir_in(&parent)
        .unwrap_or_else(|error| panic!("a temporary folder in {}: {error}", parent.display()));
    // Restic and borg record (and restore under) the absolute path.
    let work_path = work
        .path()
        .canonicalize()
        .expect("the temporary folder's absolute path");
    let runner = Runner {
        wrapper: std::env::current_exe().expect("this binary's path"),
        timeout: settings.child_timeout,
    };

    let versions = tool_versions(&settings, &target_dir);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "scale {}, image {} GiB apparent, seed {}, {cores} cores; {}",
        settings.scale,
        settings.image_bytes / 1024 / MIB,
        settings.seed,
        versions
            .iter()
            .map(|(tool, version)| format!("{tool}: {version}"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let mut reports = Vec::new();
    for &set in &settings.data_sets {
        let mut results = Vec::new();
        let mut source = SourceSummary::default();
        for &tool_kind in &settings.tools {
            let folder = work_path.join(format!("{}-{}", set.name(), tool_kind.name()));
            std::fs::create_dir_all(&folder)
                .unwrap_or_else(|error| panic!("mkdir {}: {error}", folder.display()));
            let mut tool = tool_kind.make(&target_dir, &work_path, &settings);
            let (result, summary) = run_data_set(
                &runner,
                &settings,
                set,
                tool_kind.name(),
                tool.as_mut(),
                &folder,
            );
            std::fs::remove_dir_all(&folder)
                .unwrap_or_else(|error| panic!("removing {}: {error}", folder.display()));
            source = summary;
            results.push((tool_kind, result));
        }
        let report = DataSetReport {
            set,
            source,
            results,
        };
        println!();
        print!("{}", report.table());
        println!();
        reports.push(report);
    }

    print!("{}", summary_table(&reports));
    let json = serde_json::json!({
        "scale": settings.scale,
        "image_apparent_bytes": settings.image_bytes,
        "seed": settings.seed,
        "cores": cores,
        "tool_versions": versions.iter().cloned().collect::<BTreeMap<_, _>>(),
        "client_args": settings.client_args,
        "data_sets": reports.iter().map(DataSetReport::json).collect::<Vec<_>>(),
    });
    let out = target_dir.join("peers.json");
    std::fs::create_dir_all(&target_dir)
        .unwrap_or_else(|error| panic!("mkdir {}: {error}", target_dir.display()));
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&json).expect("the figures as JSON") + "\n",
    )
    .unwrap_or_else(|error| panic!("writing {}: {error}", out.display()));
    println!("figures written to {}", out.display());
}

fn env_parse<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) if !text.trim().is_empty() => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a valid value")),
        _ => default,
    }
}

/// Names from a comma-separated list in `name`, or every one of `all`.
fn env_choice<T: Copy>(name: &str, all: &[T], name_of: impl Fn(T) -> &'static str) -> Vec<T> {
    let Ok(text) = std::env::var(name) else {
        return all.to_vec();
    };
    text.split(',')
        .map(str::trim)
        .filter(|word| !word.is_empty())
        .map(|word| {
            all.iter()
                .copied()
                .find(|&item| name_of(item) == word)
                .unwrap_or_else(|| {
                    let known: Vec<_> = all.iter().map(|&item| name_of(item)).collect();
                    panic!("{name}: {word:?} is not one of {known:?}")
                })
        })
        .collect()
}

struct Settings {
    scale: f64,
    image_bytes: u64,
    seed: u64,
    child_timeout: Duration,
    /// Appended to `fabricctl backup`'s arguments.
    client_args: Vec<String>,
    data_sets: Vec<DataSetKind>,
    tools: Vec<ToolKind>,
}

impl Settings {
    fn from_env() -> Self {
        let scale: f64 = env_parse("FABRIC_PEERS_SCALE", 1.0);
        assert!(
            scale > 0.0 && scale.is_finite(),
            "FABRIC_PEERS_SCALE must be above 0"
        );
        let image_gib: f64 = env_parse("FABRIC_PEERS_IMAGE_GIB", 4.0);
        assert!(image_gib > 0.0, "FABRIC_PEERS_IMAGE_GIB must be above 0");
        let client_args = std::env::var("FABRIC_PEERS_CLIENT_ARGS").unwrap_or_default();
        Self {
            scale,
            image_bytes: (image_gib * 1024.0 * MIB as f64) as u64 / MIB * MIB,
            seed: env_parse("FABRIC_PEERS_SEED", 26),
            child_timeout: Duration::from_secs(env_parse("FABRIC_PEERS_TIMEOUT_S", 1800)),
            client_args: shlex::split(&client_args).unwrap_or_else(|| {
                panic!("FABRIC_PEERS_CLIENT_ARGS={client_args:?} does not split into arguments")
            }),
            data_sets: env_choice("FABRIC_PEERS_SETS", &DataSetKind::ALL, DataSetKind::name),
            tools: env_choice("FABRIC_PEERS_TOOLS", &ToolKind::ALL, ToolKind::name),
        }
    }

    fn scaled(&self, amount: f64) -> u64 {
        (amount * self.scale).round() as u64
    }
}

/// The version each tool reports of itself.
fn tool_versions(settings: &Settings, target_dir: &Path) -> Vec<(String, String)> {
    settings
        .tools
        .iter()
        .map(|tool| {
            let mut command = match tool {
                ToolKind::Fabric => Command::new(target_dir.join("release/fabricctl")),
                ToolKind::Restic => Command::new("restic"),
                ToolKind::Borg => Command::new("borg"),
            };
            command.arg(if *tool == ToolKind::Restic {
                "version"
            } else {
                "--version"
            });
            let output = command
                .output()
                .unwrap_or_else(|error| panic!("{} cannot be run: {error}", tool.name()));
            let text = String::from_utf8_lossy(&output.stdout);
            (
                tool.name().to_owned(),
                text.lines().next().unwrap_or("").trim().to_owned(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Measuring a child process

/// The measuring wrapper: runs the command in its arguments, waits for it
/// (killing it past the timeout) and writes its wall seconds, CPU seconds,
/// peak RSS and whether it was killed into `into`: the kernel's rusage of
/// this process's children, which is that command alone (and whatever it
/// started and waited for). Exits as the command did.
fn measure_one_child(into: &Path) -> ! {
    let mut args = std::env::args_os().skip(1);
    let program = args
        .next()
        .expect("the measuring wrapper is given a command");
    let timeout = Duration::from_secs(env_parse(MEASURE_TIMEOUT, 1800));
    let started = Instant::now();
    let mut child = Command::new(&program)
        .args(args)
        .env_remove(MEASURE_INTO)
        .env_remove(MEASURE_TIMEOUT)
        .spawn()
        .unwrap_or_else(|error| panic!("{} cannot be started: {error}", program.display()));
    let pid = Pid::from_child(&child);
    let finished = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    {
        let (finished, timed_out) = (finished.clone(), timed_out.clone());
        std::thread::spawn(move || {
            while !finished.load(Ordering::SeqCst) {
                if started.elapsed() > timeout {
                    timed_out.store(true, Ordering::SeqCst);
                    let _ = kill_process(pid, Signal::KILL);
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
    }
    let status = child
        .wait()
        .unwrap_or_else(|error| panic!("waiting for {}: {error}", program.display()));
    let wall_seconds = started.elapsed().as_secs_f64();
    finished.store(true, Ordering::SeqCst);
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .expect("the rusage of the measured command");
    let seconds =
        |time: nix::sys::time::TimeVal| time.tv_sec() as f64 + time.tv_usec() as f64 / 1e6;
    let record = format!(
        "{wall_seconds} {} {} {}\n",
        seconds(usage.user_time()) + seconds(usage.system_time()),
        usage.max_rss(),
        u8::from(timed_out.load(Ordering::SeqCst)),
    );
    std::fs::write(into, record)
        .unwrap_or_else(|error| panic!("writing {}: {error}", into.display()));
    std::process::exit(status.code().unwrap_or(128));
}

/// What one measured client run took.
struct ChildRun {
    wall_seconds: f64,
    cpu_seconds: f64,
    peak_rss_kib: u64,
    stdout: String,
}

/// Runs tools' commands through the measuring wrapper.
struct Runner {
    wrapper: PathBuf,
    timeout: Duration,
}

impl Runner {
    /// Run `command` to its end, measured; a failure or a run past the
    /// timeout fails the bench, naming `what`.
    fn run(&self, what: &str, command: &Command) -> ChildRun {
        let figures = tempfile::NamedTempFile::new().expect("a file for the wrapper's figures");
        let mut wrapped = Command::new(&self.wrapper);
        wrapped
            .arg(command.get_program())
            .args(command.get_args())
            .env(MEASURE_INTO, figures.path())
            .env(MEASURE_TIMEOUT, self.timeout.as_secs().to_string())
            .stdin(Stdio::null());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        if let Some(dir) = command.get_current_dir() {
            wrapped.current_dir(dir);
        }
        let output = wrapped
            .output()
            .unwrap_or_else(|error| panic!("{what}: the measuring wrapper cannot run: {error}"));
        let record = std::fs::read_to_string(figures.path()).unwrap_or_default();
        let fields: Vec<&str> = record.split_whitespace().collect();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            fields.len() == 4,
            "{what}: the measuring wrapper wrote no figures ({}):\n{stderr}",
            output.status
        );
        assert!(
            fields[3] == "0",
            "{what}: ran over {} s and was killed",
            self.timeout.as_secs()
        );
        assert!(
            output.status.success(),
            "{what} failed ({}):\n{stderr}",
            output.status
        );
        let number = |text: &str| -> f64 {
            text.parse()
                .unwrap_or_else(|_| panic!("{what}: the wrapper's figure {text:?}"))
        };
        ChildRun {
            wall_seconds: number(fields[0]),
            cpu_seconds: number(fields[1]),
            peak_rss_kib: number(fields[2]) as u64,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        }
    }
}

// ---------------------------------------------------------------------------
// Generated data

/// Text-like bytes: lines of words from a vocabulary, a few words common and
/// most rare, as source code or prose (zstd takes it to about a third).
struct Words {
    vocabulary: Vec<String>,
}

impl Words {
    fn new(rng: &mut StdRng) -> Self {
        const SYLLABLES: [&str; 24] = [
            "ka", "lo", "mi", "ne", "ru", "ta", "vi", "zo", "pe", "shi", "dra", "gon", "ber", "ex",
            "al", "in", "or", "un", "st", "qu", "ion", "et", "ar", "y",
        ];
        const TOKENS: [&str; 32] = [
            "fn", "let", "mut", "if", "else", "return", "struct", "impl", "for", "while", "match",
            "self", "pub", "use", "=", ";", "{", "}", "(", ")", "->", "&", "0", "1", "None",
            "Some", "Ok", "Err", "//", "\"", ",", ".",
        ];
        let mut vocabulary: Vec<String> = TOKENS.iter().map(|token| (*token).to_owned()).collect();
        while vocabulary.len() < 4000 {
            let syllables = rng.random_range(1..=4);
            let word: String = (0..syllables)
                .map(|_| SYLLABLES[rng.random_range(0..SYLLABLES.len())])
                .collect();
            vocabulary.push(word);
        }
        Self { vocabulary }
    }

    /// A word: the first ones much more often than the last.
    fn pick(&self, rng: &mut StdRng) -> &str {
        let skew: f64 = rng.random();
        let index = (skew * skew * skew * self.vocabulary.len() as f64) as usize;
        &self.vocabulary[index.min(self.vocabulary.len() - 1)]
    }

    /// A word of letters only (a name).
    fn name(&self, rng: &mut StdRng) -> &str {
        loop {
            let word = self.pick(rng);
            if word.len() > 2 && word.bytes().all(|byte| byte.is_ascii_lowercase()) {
                return word;
            }
        }
    }

    /// Append `bytes` bytes of lines to `out`.
    fn fill(&self, rng: &mut StdRng, out: &mut Vec<u8>, bytes: usize) {
        let target = out.len() + bytes;
        while out.len() < target {
            let indent = 4 * rng.random_range(0..4);
            out.resize(out.len() + indent, b' ');
            for word in 0..rng.random_range(2..12) {
                if word > 0 {
                    out.push(b' ');
                }
                out.extend_from_slice(self.pick(rng).as_bytes());
            }
            out.push(b'\n');
        }
        out.truncate(target);
    }

    fn text(&self, rng: &mut StdRng, bytes: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes);
        self.fill(rng, &mut out, bytes);
        out
    }
}

fn random_bytes(rng: &mut StdRng, bytes: usize) -> Vec<u8> {
    let mut out = vec![0; bytes];
    rng.fill_bytes(&mut out);
    out
}

fn write_file(path: &Path, contents: &[u8]) {
    std::fs::write(path, contents)
        .unwrap_or_else(|error| panic!("writing {}: {error}", path.display()));
}

fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|error| panic!("reading {}: {error}", path.display()))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum DataSetKind {
    Tree,
    Dump,
    Image,
}

impl DataSetKind {
    const ALL: [Self; 3] = [Self::Tree, Self::Dump, Self::Image];

    fn name(self) -> &'static str {
        match self {
            Self::Tree => "tree",
            Self::Dump => "dump",
            Self::Image => "image",
        }
    }

    fn versions(self) -> usize {
        match self {
            Self::Tree => 10,
            Self::Dump => 6,
            Self::Image => 4,
        }
    }

    /// A generator writing this data set into `root` (a folder it makes).
    fn generator(self, root: &Path, settings: &Settings) -> Box<dyn VersionedData> {
        let seed = settings.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ self as u64;
        match self {
            Self::Tree => Box::new(SourceTree::new(root, seed, settings)),
            Self::Dump => Box::new(Dump::new(root, seed, settings)),
            Self::Image => Box::new(Image::new(root, seed, settings)),
        }
    }
}

/// Data that is written in versions, each from the one before: the same
/// seed gives the same bytes in every version.
trait VersionedData {
    /// Write version 1, or change version `version - 1` into `version`.
    fn write_version(&mut self, version: usize);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Text,
    Binary,
}

/// A source tree: text-like files and a few binary ones in nested folders.
struct SourceTree {
    root: PathBuf,
    rng: StdRng,
    words: Words,
    folders: Vec<String>,
    files: BTreeMap<String, FileKind>,
    file_count: usize,
    total_bytes: u64,
    /// Names new files apart.
    next_file: usize,
}

impl SourceTree {
    fn new(root: &Path, seed: u64, settings: &Settings) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let words = Words::new(&mut rng);
        Self {
            root: root.to_owned(),
            rng,
            words,
            folders: Vec::new(),
            files: BTreeMap::new(),
            file_count: settings.scaled(2000.0).max(20) as usize,
            total_bytes: settings.scaled(150e6).max(1_000_000),
            next_file: 0,
        }
    }

    /// A file size's weight: log-uniform from 1 to 2000, as most files are
    /// small and a few large.
    fn size_weight(&mut self) -> f64 {
        (self.rng.random::<f64>() * 2000f64.ln()).exp()
    }

    /// The mean of `size_weight`.
    fn mean_weight() -> f64 {
        1999.0 / 2000f64.ln()
    }

    fn new_file(&mut self, bytes: usize) {
        let folder = self.folders[self.rng.random_range(0..self.folders.len())].clone();
        let kind = if self.rng.random_bool(0.05) {
            FileKind::Binary
        } else {
            FileKind::Text
        };
        let extension = match kind {
            FileKind::Binary => "png",
            FileKind::Text => {
                ["rs", "py", "md", "json", "txt", "c", "h"][self.rng.random_range(0..7)]
            }
        };
        let name = format!(
            "{folder}{}_{}.{extension}",
            self.words.name(&mut self.rng),
            self.next_file
        );
        self.next_file += 1;
        let contents = match kind {
            FileKind::Binary => random_bytes(&mut self.rng, bytes),
            FileKind::Text => self.words.text(&mut self.rng, bytes),
        };
        write_file(&self.root.join(&name), &contents);
        self.files.insert(name, kind);
    }

    fn any_file(&mut self) -> (String, FileKind) {
        let index = self.rng.random_range(0..self.files.len());
        let (name, kind) = self.files.iter().nth(index).expect("a file");
        (name.clone(), *kind)
    }

    fn create(&mut self) {
        std::fs::create_dir_all(&self.root)
            .unwrap_or_else(|error| panic!("mkdir {}: {error}", self.root.display()));
        self.folders.push(String::new());
        let folder_count = (self.file_count / 15).max(2);
        for index in 1..folder_count {
            let parent = self.folders[self.rng.random_range(0..self.folders.len())].clone();
            let parent = if parent.matches('/').count() >= 4 {
                String::new()
            } else {
                parent
            };
            let folder = format!("{parent}{}{index}/", self.words.name(&mut self.rng));
            let path = self.root.join(&folder);
            std::fs::create_dir_all(&path)
                .unwrap_or_else(|error| panic!("mkdir {}: {error}", path.display()));
            self.folders.push(folder);
        }
        let weights: Vec<f64> = (0..self.file_count).map(|_| self.size_weight()).collect();
        let weight_sum: f64 = weights.iter().sum();
        for weight in weights {
            let bytes = (self.total_bytes as f64 * weight / weight_sum) as usize;
            self.new_file(bytes.max(64));
        }
    }

    /// Edit, append to, add or delete 3% of the files.
    fn change(&mut self) {
        let changes = (self.files.len() * 3 / 100).max(1);
        let mean_bytes = self.total_bytes as f64 / self.file_count as f64;
        for _ in 0..changes {
            let choice: f64 = self.rng.random();
            if choice < 0.45 {
                // An edit: a region rewritten, a bit longer or shorter.
                let (name, kind) = self.any_file();
                let path = self.root.join(&name);
                let mut contents = read_file(&path);
                let start = self.rng.random_range(0..contents.len().max(1));
                let length = (contents.len() * self.rng.random_range(1..10) / 100).max(1);
                let end = (start + length).min(contents.len());
                match kind {
                    FileKind::Binary => {
                        let fresh = random_bytes(&mut self.rng, end - start);
                        contents[start..end].copy_from_slice(&fresh);
                    }
                    FileKind::Text => {
                        let new_length = length * self.rng.random_range(80..120) / 100;
                        let fresh = self.words.text(&mut self.rng, new_length.max(1));
                        contents.splice(start..end, fresh);
                    }
                }
                write_file(&path, &contents);
            } else if choice < 0.70 {
                let (name, kind) = self.any_file();
                let path = self.root.join(&name);
                let size = std::fs::metadata(&path)
                    .unwrap_or_else(|error| panic!("stat {}: {error}", path.display()))
                    .len() as usize;
                let bytes = size * self.rng.random_range(1..20) / 100 + 100;
                let appended = match kind {
                    FileKind::Binary => random_bytes(&mut self.rng, bytes),
                    FileKind::Text => self.words.text(&mut self.rng, bytes),
                };
                OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .and_then(|mut file| file.write_all(&appended))
                    .unwrap_or_else(|error| panic!("appending to {}: {error}", path.display()));
            } else if choice < 0.85 {
                let weight = self.size_weight();
                self.new_file((mean_bytes * weight / Self::mean_weight()).max(64.0) as usize);
            } else if self.files.len() > 1 {
                let (name, _) = self.any_file();
                let path = self.root.join(&name);
                std::fs::remove_file(&path)
                    .unwrap_or_else(|error| panic!("removing {}: {error}", path.display()));
                self.files.remove(&name);
            }
        }
    }
}

impl VersionedData for SourceTree {
    fn write_version(&mut self, version: usize) {
        if version == 1 {
            self.create();
        } else {
            self.change();
        }
    }
}

/// One table of the dump: its rows in order, each with its revision
/// (`DELETED` once deleted); a row's text follows from its id and revision.
struct Table {
    name: &'static str,
    rows: Vec<(u64, u32)>,
    next_id: u64,
    /// Rows appended per version, as a share of the rows.
    growth: f64,
}

const DELETED: u32 = u32::MAX;

/// A database dump: `INSERT` lines of three tables, rewritten whole in each
/// version.
struct Dump {
    path: PathBuf,
    seed: u64,
    rng: StdRng,
    words: Words,
    tables: Vec<Table>,
    target_bytes: u64,
}

impl Dump {
    fn new(root: &Path, seed: u64, settings: &Settings) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let words = Words::new(&mut rng);
        let table = |name, growth| Table {
            name,
            rows: Vec::new(),
            next_id: 1,
            growth,
        };
        std::fs::create_dir_all(root)
            .unwrap_or_else(|error| panic!("mkdir {}: {error}", root.display()));
        Self {
            path: root.join("shop.sql"),
            seed,
            rng,
            words,
            tables: vec![
                table("customers", 0.01),
                table("orders", 0.02),
                table("events", 0.04),
            ],
            target_bytes: settings.scaled(200e6).max(1_000_000),
        }
    }

    /// The `INSERT` line of row `id` of table `table` at `revision`.
    fn row(&self, table: usize, id: u64, revision: u32, out: &mut Vec<u8>) {
        let mut rng = StdRng::seed_from_u64(
            self.seed
                ^ ((table as u64) << 58)
                ^ id.wrapping_mul(0xD6E8_FEB8_6659_FD93)
                ^ (u64::from(revision) << 40),
        );
        let words = &self.words;
        let mut line = String::with_capacity(256);
        let date = |rng: &mut StdRng| {
            format!(
                "2025-{:02}-{:02} {:02}:{:02}:{:02}",
                rng.random_range(1..=12),
                rng.random_range(1..=28),
                rng.random_range(0..24),
                rng.random_range(0..60),
                rng.random_range(0..60)
            )
        };
        let sentence = |rng: &mut StdRng, count: usize| {
            (0..count)
                .map(|_| words.name(rng).to_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = match table {
            0 => {
                let (first, last) = (words.name(&mut rng), words.name(&mut rng));
                let city = words.name(&mut rng);
                let created = date(&mut rng);
                let count = rng.random_range(3..16);
                let note = sentence(&mut rng, count);
                writeln!(
                    line,
                    "INSERT INTO customers VALUES ({id}, '{first} {last}', '{first}.{last}{}@example.org', '{city}', '{created}', '{note}');",
                    id % 97
                )
            }
            1 => {
                let status =
                    ["new", "paid", "shipped", "delivered", "returned"][rng.random_range(0..5)];
                let customer = rng.random_range(1..=id / 2 + 1);
                let amount = rng.random_range(100..1_000_000);
                let placed = date(&mut rng);
                let count = rng.random_range(0..8);
                let note = sentence(&mut rng, count);
                writeln!(
                    line,
                    "INSERT INTO orders VALUES ({id}, {customer}, '{status}', {}.{:02}, 'EUR', '{placed}', '{note}');",
                    amount / 100,
                    amount % 100
                )
            }
            _ => {
                let kind = ["created", "paid", "packed", "sent", "seen", "clicked"]
                    [rng.random_range(0..6)];
                let order = rng.random_range(1..=id / 2 + 1);
                let source = words.name(&mut rng);
                let attempt = rng.random_range(1..4);
                let count = rng.random_range(2..10);
                let detail = sentence(&mut rng, count);
                writeln!(
                    line,
                    "INSERT INTO events VALUES ({id}, {order}, '{kind}', '{{\"source\": \"{source}\", \"attempt\": {attempt}, \"detail\": \"{detail}\"}}');"
                )
            }
        };
        out.extend_from_slice(line.as_bytes());
    }

    fn write(&self, version: usize) {
        let file = File::create(&self.path)
            .unwrap_or_else(|error| panic!("creating {}: {error}", self.path.display()));
        let mut out = BufWriter::with_capacity(MIB as usize, file);
        let mut line = Vec::with_capacity(512);
        let header = format!(
            "-- shop database dump, version {version}\n-- taken 2026-01-{:02} 02:00:00\nSET client_encoding = 'UTF8';\nBEGIN;\n",
            version.min(28)
        );
        let mut written = out.write_all(header.as_bytes());
        for (index, table) in self.tables.iter().enumerate() {
            if written.is_err() {
                break;
            }
            let create = format!(
                "\nDROP TABLE IF EXISTS {0};\nCREATE TABLE {0} (id bigint PRIMARY KEY, data text);\n",
                table.name
            );
            written = out.write_all(create.as_bytes());
            for &(id, revision) in &table.rows {
                if revision == DELETED {
                    continue;
                }
                line.clear();
                self.row(index, id, revision, &mut line);
                written = written.and_then(|()| out.write_all(&line));
            }
        }
        written
            .and_then(|()| out.write_all(b"COMMIT;\n"))
            .and_then(|()| out.flush())
            .unwrap_or_else(|error| panic!("writing {}: {error}", self.path.display()));
    }

    /// Version 1: each table's rows up to its share of the size.
    fn create(&mut self) {
        let shares = [0.25, 0.35, 0.40];
        let mut line = Vec::with_capacity(512);
        for (index, share) in shares.into_iter().enumerate() {
            let target = (self.target_bytes as f64 * share) as u64;
            let mut bytes = 0;
            while bytes < target {
                let id = self.tables[index].next_id;
                line.clear();
                self.row(index, id, 0, &mut line);
                bytes += line.len() as u64;
                self.tables[index].rows.push((id, 0));
                self.tables[index].next_id += 1;
            }
        }
    }

    /// As a shop's database changes between two nightly dumps: rows
    /// appended to every table, 0.5% changed among the newest 3% (recent
    /// orders change status), a few old rows changed or deleted anywhere,
    /// and the oldest 1% of the events pruned.
    fn change(&mut self) {
        for (index, table) in self.tables.iter_mut().enumerate() {
            let count = table.rows.len();
            let recent = (count * 3 / 100).max(1);
            let revise = |row: &mut (u64, u32)| {
                if row.1 != DELETED {
                    row.1 += 1;
                }
            };
            for _ in 0..count / 200 {
                let position = count - 1 - self.rng.random_range(0..recent);
                revise(&mut table.rows[position]);
            }
            for _ in 0..count / 30_000 {
                let position = self.rng.random_range(0..count);
                revise(&mut table.rows[position]);
            }
            for _ in 0..count / 50_000 {
                let position = self.rng.random_range(0..count);
                table.rows[position].1 = DELETED;
            }
            if index == 2 {
                table.rows.drain(..count / 100);
            }
            for _ in 0..(count as f64 * table.growth) as usize {
                table.rows.push((table.next_id, 0));
                table.next_id += 1;
            }
        }
    }
}

impl VersionedData for Dump {
    fn write_version(&mut self, version: usize) {
        if version == 1 {
            self.create();
        } else {
            self.change();
        }
        self.write(version);
    }
}

/// A sparse VM image: data written at scattered offsets, the rest holes.
struct Image {
    path: PathBuf,
    rng: StdRng,
    words: Words,
    apparent_bytes: u64,
    written_bytes: u64,
    /// (offset, length) of each region written.
    regions: Vec<(u64, u64)>,
}

const BLOCK: u64 = 4096;

impl Image {
    fn new(root: &Path, seed: u64, settings: &Settings) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let words = Words::new(&mut rng);
        std::fs::create_dir_all(root)
            .unwrap_or_else(|error| panic!("mkdir {}: {error}", root.display()));
        let written_bytes = settings.scaled(320e6).max(4 * MIB);
        Self {
            path: root.join("disk.img"),
            rng,
            words,
            apparent_bytes: settings.image_bytes.max(4 * written_bytes),
            written_bytes,
            regions: Vec::new(),
        }
    }

    /// Half random (compressed files, binaries), half text-like (logs,
    /// configuration).
    fn contents(&mut self, bytes: u64) -> Vec<u8> {
        if self.rng.random_bool(0.5) {
            random_bytes(&mut self.rng, bytes as usize)
        } else {
            self.words.text(&mut self.rng, bytes as usize)
        }
    }

    fn write_at(&mut self, file: &File, offset: u64, bytes: u64) {
        let contents = self.contents(bytes);
        file.write_all_at(&contents, offset)
            .unwrap_or_else(|error| panic!("writing {}: {error}", self.path.display()));
    }

    /// New regions of 64 KiB to 16 MiB at random block-aligned offsets,
    /// `bytes` in all.
    fn add_regions(&mut self, file: &File, bytes: u64) {
        let largest = (16 * MIB).min(self.written_bytes / 4).max(64 * 1024);
        let mut written = 0;
        while written < bytes {
            let length = (self.rng.random_range(64 * 1024..=largest) / BLOCK * BLOCK)
                .min((bytes - written).div_ceil(BLOCK) * BLOCK);
            let offset = self
                .rng
                .random_range(0..(self.apparent_bytes - length) / BLOCK)
                * BLOCK;
            self.write_at(file, offset, length);
            self.regions.push((offset, length));
            written += length;
        }
    }
}

impl VersionedData for Image {
    fn write_version(&mut self, version: usize) {
        let file = if version == 1 {
            let file = File::create(&self.path)
                .unwrap_or_else(|error| panic!("creating {}: {error}", self.path.display()));
            file.set_len(self.apparent_bytes)
                .unwrap_or_else(|error| panic!("sizing {}: {error}", self.path.display()));
            file
        } else {
            OpenOptions::new()
                .write(true)
                .open(&self.path)
                .unwrap_or_else(|error| panic!("opening {}: {error}", self.path.display()))
        };
        if version == 1 {
            self.add_regions(&file, self.written_bytes);
            return;
        }
        // 5% rewritten in pieces of 4 KiB to 1 MiB inside written regions,
        // 2% more written in new regions.
        let mut rewritten = 0;
        while rewritten < self.written_bytes / 20 {
            let (offset, length) = self.regions[self.rng.random_range(0..self.regions.len())];
            let piece = (self.rng.random_range(BLOCK..=MIB) / BLOCK * BLOCK).min(length);
            let start = offset + self.rng.random_range(0..=(length - piece) / BLOCK) * BLOCK;
            self.write_at(&file, start, piece);
            rewritten += piece;
        }
        self.add_regions(&file, self.written_bytes / 50);
    }
}

/// What a data set's last version holds.
#[derive(Clone, Copy, Default)]
struct SourceSummary {
    files: u64,
    apparent_bytes: u64,
    allocated_bytes: u64,
}

/// Read every file under `path` once, discarding it, so the backups that
/// follow find the page cache warm.
fn read_through(path: &Path) {
    let meta = std::fs::symlink_metadata(path)
        .unwrap_or_else(|error| panic!("stat {}: {error}", path.display()));
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)
            .unwrap_or_else(|error| panic!("listing {}: {error}", path.display()))
        {
            let entry = entry.unwrap_or_else(|error| panic!("listing {}: {error}", path.display()));
            read_through(&entry.path());
        }
    } else if meta.is_file() {
        File::open(path)
            .and_then(|mut file| std::io::copy(&mut file, &mut std::io::sink()))
            .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    }
}

/// Disk blocks of everything under `path`, in bytes (as `du` counts them).
fn disk_usage(path: &Path) -> u64 {
    let meta = std::fs::symlink_metadata(path)
        .unwrap_or_else(|error| panic!("stat {}: {error}", path.display()));
    let mut bytes = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)
            .unwrap_or_else(|error| panic!("listing {}: {error}", path.display()))
        {
            let entry = entry.unwrap_or_else(|error| panic!("listing {}: {error}", path.display()));
            bytes += disk_usage(&entry.path());
        }
    }
    bytes
}

/// An entry of a tree as the comparison sees it.
#[derive(PartialEq, Eq, Debug)]
enum Entry {
    Folder,
    File { size: u64, blake3: String },
    Symlink(PathBuf),
    Other,
}

/// Every entry below `root`, by its path relative to `root`.
fn digest_tree(root: &Path) -> BTreeMap<PathBuf, Entry> {
    fn walk(root: &Path, relative: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
        let path = root.join(relative);
        let listing = std::fs::read_dir(&path)
            .unwrap_or_else(|error| panic!("listing {}: {error}", path.display()));
        for entry in listing {
            let entry = entry.unwrap_or_else(|error| panic!("listing {}: {error}", path.display()));
            let relative = relative.join(entry.file_name());
            let full = entry.path();
            let meta = std::fs::symlink_metadata(&full)
                .unwrap_or_else(|error| panic!("stat {}: {error}", full.display()));
            if meta.is_dir() {
                out.insert(relative.clone(), Entry::Folder);
                walk(root, &relative, out);
            } else if meta.is_file() {
                let mut hasher = blake3::Hasher::new();
                let mut file = File::open(&full)
                    .unwrap_or_else(|error| panic!("opening {}: {error}", full.display()));
                let mut buffer = vec![0; MIB as usize];
                loop {
                    let read = file
                        .read(&mut buffer)
                        .unwrap_or_else(|error| panic!("reading {}: {error}", full.display()));
                    if read == 0 {
                        break;
                    }
                    hasher.update(&buffer[..read]);
                }
                out.insert(
                    relative,
                    Entry::File {
                        size: meta.len(),
                        blake3: hasher.finalize().to_hex().to_string(),
                    },
                );
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&full)
                    .unwrap_or_else(|error| panic!("reading link {}: {error}", full.display()));
                out.insert(relative, Entry::Symlink(target));
            } else {
                out.insert(relative, Entry::Other);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out);
    out
}

/// Fail loudly unless `restored` holds what `source` does.
fn assert_same_tree(what: &str, source: &BTreeMap<PathBuf, Entry>, restored: &Path) {
    assert!(
        restored.is_dir(),
        "{what}: the restore made no {}",
        restored.display()
    );
    let restored_entries = digest_tree(restored);
    let mut differences = Vec::new();
    for (path, entry) in source {
        match restored_entries.get(path) {
            None => differences.push(format!("missing: {}", path.display())),
            Some(other) if other != entry => differences.push(format!(
                "differs: {} (source {entry:?}, restored {other:?})",
                path.display()
            )),
            Some(_) => {}
        }
    }
    for path in restored_entries.keys() {
        if !source.contains_key(path) {
            differences.push(format!("not in the source: {}", path.display()));
        }
    }
    assert!(
        differences.is_empty(),
        "{what}: the restore differs from the source in {} entries:\n{}",
        differences.len(),
        differences
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---------------------------------------------------------------------------
// The tools

#[derive(Clone, Copy, PartialEq, Eq)]
enum ToolKind {
    Fabric,
    Restic,
    Borg,
}

impl ToolKind {
    const ALL: [Self; 3] = [Self::Fabric, Self::Restic, Self::Borg];

    fn name(self) -> &'static str {
        match self {
            Self::Fabric => "fabric",
            Self::Restic => "restic",
            Self::Borg => "borg",
        }
    }

    fn make(self, target_dir: &Path, work: &Path, settings: &Settings) -> Box<dyn Tool> {
        match self {
            Self::Fabric => Box::new(Fabric::new(target_dir, work, settings)),
            Self::Restic => Box::new(Restic::default()),
            Self::Borg => Box::new(Borg::default()),
        }
    }
}

/// The CPU seconds and peak RSS of a long-running server (fabric's node).
#[derive(Clone, Copy)]
struct ServerUse {
    cpu_seconds: f64,
    peak_rss_kib: u64,
}

/// A backup tool as the bench drives it.
trait Tool {
    /// Make an empty repository (or start an empty node) in `folder`,
    /// untimed.
    fn begin(&mut self, runner: &Runner, set: &str, folder: &Path);
    /// Back up `source`; `label` names the version.
    fn backup(&mut self, runner: &Runner, source: &Path, label: &str) -> ChildRun;
    /// Restore the newest backup of `source` into the empty folder `into`;
    /// returns where the restored copy of `source` is.
    fn restore(&mut self, runner: &Runner, source: &Path, into: &Path) -> (ChildRun, PathBuf);
    /// Where the backups are stored.
    fn repository(&self) -> PathBuf;
    /// Stop what `begin` started; the server's CPU and peak RSS, if any.
    fn end(&mut self) -> Option<ServerUse>;
}

/// The path of `source` inside a folder a tool restores its absolute path
/// into.
fn under(into: &Path, source: &Path) -> PathBuf {
    into.join(source.strip_prefix("/").unwrap_or(source))
}

/// The CPU seconds (user + system) a process has used so far.
fn process_cpu_seconds(pid: Pid) -> f64 {
    let ticks_per_second = 100.0; // USER_HZ: 100 on every Linux ABI in use
    let path = format!("/proc/{}/stat", pid.as_raw_nonzero());
    let stat =
        std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("reading {path}: {error}"));
    // The fields after the command name, which may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |index: usize| -> f64 {
        fields
            .get(index)
            .and_then(|text| text.parse().ok())
            .unwrap_or_else(|| panic!("{path}: no field {index}: {stat}"))
    };
    (field(11) + field(12)) / ticks_per_second
}

/// A process's peak RSS (`VmHWM`), KiB.
fn process_peak_rss_kib(pid: Pid) -> u64 {
    let path = format!("/proc/{}/status", pid.as_raw_nonzero());
    let status =
        std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("reading {path}: {error}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or_else(|| panic!("{path} has no VmHWM"))
}

/// A `fabric-node serve` child on 127.0.0.1, stopped (SIGTERM, then waited
/// for) when dropped.
struct NodeProcess {
    child: Child,
    address: String,
    pid: Pid,
}

impl NodeProcess {
    fn start(binary: &Path, data_dir: &Path, tls: &BenchTls) -> Self {
        let mut child = Command::new(binary)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(["--health-listen", "", "--metrics-listen", ""])
            .args(["--scrub-bytes-per-s", "0"])
            .args(["--node-id", "bench-node", "--data-dir"])
            .arg(data_dir)
            .arg("--tls-ca")
            .arg(&tls.ca)
            .arg("--tls-cert")
            .arg(&tls.node.0)
            .arg("--tls-key")
            .arg(&tls.node.1)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("{} cannot be started: {error}", binary.display()));
        let pid = Pid::from_child(&child);
        let mut lines = BufReader::new(child.stdout.take().expect("the node's stdout")).lines();
        let first = lines
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("fabric-node printed no address on {}", data_dir.display()));
        let address = format!("https://{}", first.rsplit(' ').next().expect("an address"));
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Self {
            child,
            address,
            pid,
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = kill_process(self.pid, Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("fabric-node did not stop within 60 s of SIGTERM: killed");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The run's CA and the certificates of the node and the client.
struct BenchTls {
    ca: PathBuf,
    node: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

impl BenchTls {
    fn new(dir: &Path) -> Self {
        use fabric_trust::Role;
        let pki = fabric_trust::pki::PkiDir::open_or_init(&dir.join("ca"), "peers bench CA")
            .expect("a CA for the bench");
        Self {
            ca: pki.ca_certificate(),
            node: pki
                .issue_into(Role::Node, "bench-node", dir)
                .expect("a node certificate"),
            client: pki
                .issue_into(Role::Client, "bench-client", dir)
                .expect("a client certificate"),
        }
    }
}

struct Fabric {
    node_binary: PathBuf,
    fabricctl: PathBuf,
    tls: BenchTls,
    client_args: Vec<String>,
    node: Option<NodeProcess>,
    data_dir: PathBuf,
    job: String,
    last_snapshot: Option<String>,
}

impl Fabric {
    fn new(target_dir: &Path, work: &Path, settings: &Settings) -> Self {
        Self {
            node_binary: target_dir.join("release/fabric-node"),
            fabricctl: target_dir.join("release/fabricctl"),
            tls: BenchTls::new(&work.join("tls")),
            client_args: settings.client_args.clone(),
            node: None,
            data_dir: PathBuf::new(),
            job: String::new(),
            last_snapshot: None,
        }
    }

    fn fabricctl(&self) -> Command {
        let mut command = Command::new(&self.fabricctl);
        command
            .arg("--tls-ca")
            .arg(&self.tls.ca)
            .arg("--tls-cert")
            .arg(&self.tls.client.0)
            .arg("--tls-key")
            .arg(&self.tls.client.1)
            .args(["-o", "json"]);
        command
    }

    fn address(&self) -> &str {
        &self.node.as_ref().expect("the node is running").address
    }
}

impl Tool for Fabric {
    fn begin(&mut self, _runner: &Runner, set: &str, folder: &Path) {
        self.data_dir = folder.join("node");
        self.job = set.to_owned();
        self.node = Some(NodeProcess::start(
            &self.node_binary,
            &self.data_dir,
            &self.tls,
        ));
    }

    fn backup(&mut self, runner: &Runner, source: &Path, label: &str) -> ChildRun {
        let mut command = self.fabricctl();
        command
            .args(["backup", "--node", self.address(), "--job", &self.job])
            .arg(source)
            .args(&self.client_args);
        let run = runner.run(&format!("fabricctl backup ({label})"), &command);
        let answer: serde_json::Value = serde_json::from_str(&run.stdout)
            .unwrap_or_else(|error| panic!("fabricctl backup's JSON: {error}: {}", run.stdout));
        let snapshot = answer["snapshot"]
            .as_str()
            .unwrap_or_else(|| panic!("no snapshot in fabricctl backup's answer: {answer}"));
        self.last_snapshot = Some(snapshot.to_owned());
        run
    }

    fn restore(&mut self, runner: &Runner, source: &Path, into: &Path) -> (ChildRun, PathBuf) {
        let snapshot = self.last_snapshot.clone().expect("a backup to restore");
        let inside = source.to_string_lossy().trim_start_matches('/').to_owned();
        let mut command = self.fabricctl();
        command
            .args([
                "restore",
                &snapshot,
                &inside,
                "--node",
                self.address(),
                "--to",
            ])
            .arg(into);
        (runner.run("fabricctl restore", &command), into.to_owned())
    }

    fn repository(&self) -> PathBuf {
        self.data_dir.clone()
    }

    fn end(&mut self) -> Option<ServerUse> {
        let node = self.node.take()?;
        let used = ServerUse {
            cpu_seconds: process_cpu_seconds(node.pid),
            peak_rss_kib: process_peak_rss_kib(node.pid),
        };
        drop(node);
        Some(used)
    }
}

#[derive(Default)]
struct Restic {
    repository: PathBuf,
    cache: PathBuf,
}

impl Restic {
    fn restic(&self) -> Command {
        let mut command = Command::new("restic");
        command
            .arg("--repo")
            .arg(&self.repository)
            .arg("--cache-dir")
            .arg(&self.cache)
            .arg("--quiet")
            .env("RESTIC_PASSWORD", "peers-bench")
            .env_remove("RESTIC_REPOSITORY");
        command
    }
}

impl Tool for Restic {
    fn begin(&mut self, runner: &Runner, _set: &str, folder: &Path) {
        self.repository = folder.join("repository");
        self.cache = folder.join("cache");
        let mut command = self.restic();
        command.args(["init", "--repository-version", "2"]);
        runner.run("restic init", &command);
    }

    fn backup(&mut self, runner: &Runner, source: &Path, label: &str) -> ChildRun {
        let mut command = self.restic();
        command.args(["backup", "--host", "bench"]).arg(source);
        runner.run(&format!("restic backup ({label})"), &command)
    }

    fn restore(&mut self, runner: &Runner, source: &Path, into: &Path) -> (ChildRun, PathBuf) {
        let mut command = self.restic();
        command
            .args(["restore", "latest", "--host", "bench", "--target"])
            .arg(into);
        (runner.run("restic restore", &command), under(into, source))
    }

    fn repository(&self) -> PathBuf {
        self.repository.clone()
    }

    fn end(&mut self) -> Option<ServerUse> {
        None
    }
}

#[derive(Default)]
struct Borg {
    repository: PathBuf,
    base: PathBuf,
    archives: usize,
}

impl Borg {
    fn borg(&self) -> Command {
        let mut command = Command::new("borg");
        command
            .env("BORG_BASE_DIR", &self.base)
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
            .env_remove("BORG_REPO")
            .env_remove("BORG_PASSPHRASE");
        command
    }

    fn archive(&self) -> OsString {
        let mut archive = self.repository.clone().into_os_string();
        archive.push(format!("::v{}", self.archives));
        archive
    }
}

impl Tool for Borg {
    fn begin(&mut self, runner: &Runner, _set: &str, folder: &Path) {
        self.repository = folder.join("repository");
        self.base = folder.join("borg-base");
        self.archives = 0;
        let mut command = self.borg();
        command
            .args(["init", "--encryption=none"])
            .arg(&self.repository);
        runner.run("borg init", &command);
    }

    fn backup(&mut self, runner: &Runner, source: &Path, label: &str) -> ChildRun {
        self.archives += 1;
        let mut command = self.borg();
        command
            .args(["create", "--compression", "zstd,3"])
            .arg(self.archive())
            .arg(source);
        runner.run(&format!("borg create ({label})"), &command)
    }

    fn restore(&mut self, runner: &Runner, source: &Path, into: &Path) -> (ChildRun, PathBuf) {
        let mut command = self.borg();
        command
            .args(["extract", "--sparse"])
            .arg(self.archive())
            .current_dir(into);
        (runner.run("borg extract", &command), under(into, source))
    }

    fn repository(&self) -> PathBuf {
        self.repository.clone()
    }

    fn end(&mut self) -> Option<ServerUse> {
        None
    }
}

// ---------------------------------------------------------------------------
// One data set with one tool

/// What one tool did with one data set.
struct ToolResult {
    /// Wall seconds of each version's backup.
    version_seconds: Vec<f64>,
    unchanged_seconds: f64,
    restore_seconds: f64,
    /// The largest peak RSS of a client run, KiB.
    client_peak_kib: u64,
    /// CPU seconds of every client run.
    client_cpu_seconds: f64,
    /// fabric's node.
    server: Option<ServerUse>,
    stored_bytes: u64,
}

impl ToolResult {
    fn peak_mib(&self) -> f64 {
        (self.client_peak_kib + self.server.map_or(0, |server| server.peak_rss_kib)) as f64 / 1024.0
    }

    fn cpu_seconds(&self) -> f64 {
        self.client_cpu_seconds + self.server.map_or(0.0, |server| server.cpu_seconds)
    }
}

/// The metrics of the tables: name, how it is printed, the value.
struct Metric {
    name: &'static str,
    key: &'static str,
    decimals: usize,
    value: fn(&ToolResult) -> f64,
}

const METRICS: [Metric; 7] = [
    Metric {
        name: "first backup, s",
        key: "first_backup_s",
        decimals: 2,
        value: |result| result.version_seconds[0],
    },
    Metric {
        name: "all versions, s",
        key: "all_versions_s",
        decimals: 2,
        value: |result| result.version_seconds.iter().sum(),
    },
    Metric {
        name: "unchanged re-backup, s",
        key: "unchanged_rebackup_s",
        decimals: 2,
        value: |result| result.unchanged_seconds,
    },
    Metric {
        name: "restore, s",
        key: "restore_s",
        decimals: 2,
        value: |result| result.restore_seconds,
    },
    Metric {
        name: "peak memory, MiB",
        key: "peak_memory_mib",
        decimals: 0,
        value: ToolResult::peak_mib,
    },
    Metric {
        name: "CPU, s",
        key: "cpu_s",
        decimals: 1,
        value: ToolResult::cpu_seconds,
    },
    Metric {
        name: "stored, MiB",
        key: "stored_mib",
        decimals: 1,
        value: |result| result.stored_bytes as f64 / MIB as f64,
    },
];

/// Every version of `set` through `tool`, then an unchanged re-backup and a
/// checked restore, in `folder` (the data, the repository, the restore).
fn run_data_set(
    runner: &Runner,
    settings: &Settings,
    set: DataSetKind,
    tool_name: &str,
    tool: &mut dyn Tool,
    folder: &Path,
) -> (ToolResult, SourceSummary) {
    let source = folder.join("data");
    let mut data = set.generator(&source, settings);
    tool.begin(runner, set.name(), folder);
    let mut result = ToolResult {
        version_seconds: Vec::new(),
        unchanged_seconds: 0.0,
        restore_seconds: 0.0,
        client_peak_kib: 0,
        client_cpu_seconds: 0.0,
        server: None,
        stored_bytes: 0,
    };
    let count = |run: &ChildRun, result: &mut ToolResult| {
        result.client_peak_kib = result.client_peak_kib.max(run.peak_rss_kib);
        result.client_cpu_seconds += run.cpu_seconds;
    };
    for version in 1..=set.versions() {
        data.write_version(version);
        rustix::fs::sync();
        read_through(&source);
        let run = tool.backup(runner, &source, &format!("{} v{version}", set.name()));
        println!(
            "{} {}: version {version} backed up in {:.2} s (CPU {:.1} s, peak RSS {} MiB)",
            set.name(),
            tool_name,
            run.wall_seconds,
            run.cpu_seconds,
            run.peak_rss_kib / 1024
        );
        result.version_seconds.push(run.wall_seconds);
        count(&run, &mut result);
    }
    result.stored_bytes = disk_usage(&tool.repository());
    drop(data);

    read_through(&source);
    let again = tool.backup(runner, &source, &format!("{} unchanged", set.name()));
    result.unchanged_seconds = again.wall_seconds;
    count(&again, &mut result);

    let expected = digest_tree(&source);
    let summary = SourceSummary {
        files: expected
            .values()
            .filter(|entry| matches!(entry, Entry::File { .. }))
            .count() as u64,
        apparent_bytes: expected
            .values()
            .map(|entry| match entry {
                Entry::File { size, .. } => *size,
                _ => 0,
            })
            .sum(),
        allocated_bytes: disk_usage(&source),
    };
    // The source goes first: the restore may need the room (restic writes
    // an image's holes).
    std::fs::remove_dir_all(&source)
        .unwrap_or_else(|error| panic!("removing {}: {error}", source.display()));
    let into = folder.join("restored");
    std::fs::create_dir_all(&into)
        .unwrap_or_else(|error| panic!("mkdir {}: {error}", into.display()));
    let (restore, restored) = tool.restore(runner, &source, &into);
    result.restore_seconds = restore.wall_seconds;
    count(&restore, &mut result);
    assert_same_tree(
        &format!("{} {}", set.name(), tool_name),
        &expected,
        &restored,
    );
    std::fs::remove_dir_all(&into)
        .unwrap_or_else(|error| panic!("removing {}: {error}", into.display()));
    result.server = tool.end();
    println!(
        "{} {}: unchanged re-backup {:.2} s, restore {:.2} s (identical to the source), stored {:.1} MiB",
        set.name(),
        tool_name,
        result.unchanged_seconds,
        result.restore_seconds,
        result.stored_bytes as f64 / MIB as f64
    );
    (result, summary)
}

// ---------------------------------------------------------------------------
// Reports

struct DataSetReport {
    set: DataSetKind,
    source: SourceSummary,
    results: Vec<(ToolKind, ToolResult)>,
}

impl DataSetReport {
    fn value(&self, tool: ToolKind, metric: &Metric) -> Option<f64> {
        self.results
            .iter()
            .find(|(kind, _)| *kind == tool)
            .map(|(_, result)| (metric.value)(result))
    }

    /// fabric's figure over the best peer's, when both ran.
    fn ratio(&self, metric: &Metric) -> Option<f64> {
        let fabric = self.value(ToolKind::Fabric, metric)?;
        let best_peer = [ToolKind::Restic, ToolKind::Borg]
            .into_iter()
            .filter_map(|tool| self.value(tool, metric))
            .min_by(f64::total_cmp)?;
        (best_peer > 0.0).then(|| fabric / best_peer)
    }

    fn describe(&self) -> String {
        format!(
            "{} ({} versions; the last: {} files, {:.1} MB apparent, {:.1} MB on disk)",
            self.set.name(),
            self.set.versions(),
            self.source.files,
            self.source.apparent_bytes as f64 / 1e6,
            self.source.allocated_bytes as f64 / 1e6
        )
    }

    /// A Markdown table: rows the metrics, columns the tools and the ratio.
    fn table(&self) -> String {
        let mut out = format!("{}\n\n| metric |", self.describe());
        for (tool, _) in &self.results {
            let _ = write!(out, " {} |", tool.name());
        }
        out.push_str(" fabric / best peer |\n| --- |");
        for _ in &self.results {
            out.push_str(" ---: |");
        }
        out.push_str(" ---: |\n");
        for metric in &METRICS {
            let _ = write!(out, "| {} |", metric.name);
            for (_, result) in &self.results {
                let _ = write!(out, " {:.*} |", metric.decimals, (metric.value)(result));
            }
            match self.ratio(metric) {
                Some(ratio) => {
                    let _ = writeln!(out, " {ratio:.2} |");
                }
                None => out.push_str(" - |\n"),
            }
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        let tools: serde_json::Map<String, serde_json::Value> = self
            .results
            .iter()
            .map(|(tool, result)| {
                let mut figures = serde_json::Map::new();
                for metric in &METRICS {
                    figures.insert(metric.key.into(), (metric.value)(result).into());
                }
                figures.insert("version_s".into(), result.version_seconds.clone().into());
                figures.insert("stored_bytes".into(), result.stored_bytes.into());
                figures.insert(
                    "client_peak_memory_mib".into(),
                    (result.client_peak_kib as f64 / 1024.0).into(),
                );
                figures.insert("client_cpu_s".into(), result.client_cpu_seconds.into());
                if let Some(server) = result.server {
                    figures.insert(
                        "node_peak_memory_mib".into(),
                        (server.peak_rss_kib as f64 / 1024.0).into(),
                    );
                    figures.insert("node_cpu_s".into(), server.cpu_seconds.into());
                }
                (tool.name().to_owned(), figures.into())
            })
            .collect();
        let ratios: serde_json::Map<String, serde_json::Value> = METRICS
            .iter()
            .filter_map(|metric| Some((metric.key.to_owned(), self.ratio(metric)?.into())))
            .collect();
        serde_json::json!({
            "name": self.set.name(),
            "versions": self.set.versions(),
            "last_version": {
                "files": self.source.files,
                "apparent_bytes": self.source.apparent_bytes,
                "allocated_bytes": self.source.allocated_bytes,
            },
            "tools": tools,
            "fabric_over_best_peer": ratios,
        })
    }
}

/// A Markdown table of every data set's `fabric / best peer` ratios.
fn summary_table(reports: &[DataSetReport]) -> String {
    let mut out =
        String::from("summary: fabric / best peer (below 1: fabric does better)\n\n| metric |");
    for report in reports {
        let _ = write!(out, " {} |", report.set.name());
    }
    out.push_str("\n| --- |");
    for _ in reports {
        out.push_str(" ---: |");
    }
    out.push('\n');
    for metric in &METRICS {
        let _ = write!(out, "| {} |", metric.name);
        for report in reports {
            match report.ratio(metric) {
                Some(ratio) => {
                    let _ = write!(out, " {ratio:.2} |");
                }
                None => out.push_str(" - |"),
            }
        }
        out.push('\n');
    }
    out
}
