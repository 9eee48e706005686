//! `fabricctl`: the operator's command line. Parses flags, dispatches to the
//! command modules, and turns errors into messages a person understands.
//! Exit codes: 0 success, 1 error, and for `check` the Nagios codes.

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use fabricctl::output::OutputFormat;
use fabricctl::remote::Remote;
use fabricctl::{browse, check, commands, local, security};

const EXAMPLES: &str = "\
Examples:
  fabricctl local demo ./my-folder             # run a whole fabric in-process: back up, list, restore, compare
  fabricctl local up --dir ./fabric-state      # a coordinator and 3 storage nodes on loopback, until Ctrl-C
  fabricctl job submit -f jobs.toml            # submit every job of the file and run them
  fabricctl job submit -f jobs.toml db/main    # run only job db, instance main
  generate-jobs | fabricctl job submit -f -    # the jobs file from stdin
  fabricctl run watch 3f2a                     # live progress of a run, per destination
  fabricctl run retry 3f2a --copy              # retry only the failed copies
  fabricctl status                             # the snapshot table
  fabricctl find -r 0 --job db                 # the newest snapshot of job db
  fabricctl restore 3f2a9c /etc --to ./restored
  fabricctl restore 3f2a9c / --to /mnt/sysroot --same-owner --keep-setid   # a trusted system, as root
  fabricctl restore latest --job db --to - > db.tar
  fabricctl restore 3f2a9c --to ./restored --skip-existing --dry-run   # what would be written, what is in the way
  fabricctl ls latest --job db /var/lib -r     # browse a snapshot without restoring it
  fabricctl diff 1 0 --job db                  # what changed between the two newest snapshots of job db
  fabricctl check                              # Nagios: exit 2 when a job's newest snapshot is stale
  fabricctl backup --node https://127.0.0.1:7401 /home  # push straight to a node, no coordinator
  fabricctl pki init --dir ./pki                        # the fabric's own CA
  fabricctl pki issue --dir ./pki --node n1             # a certificate for node n1
  fabricctl token create --role monitor --name grafana  # a bearer token for a dashboard

Credentials: --tls-ca, --tls-cert, --tls-key (FABRIC_TLS_CA, FABRIC_TLS_CERT,
FABRIC_TLS_KEY), or --tls-ca with --token (FABRIC_TOKEN).";

#[derive(Parser)]
#[command(name = "fabricctl", version, about = "Operate a fabric: jobs, runs, nodes, snapshots, restores", after_help = EXAMPLES)]
struct Cli {
    /// The coordinator's address, or every coordinator's, comma-separated (calls go to the leader).
    #[arg(
        long,
        global = true,
        env = "FABRIC_COORDINATOR",
        default_value = "https://127.0.0.1:7400"
    )]
    coordinator: String,
    /// The fabric's CA certificate (PEM).
    #[arg(long, global = true, env = "FABRIC_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Your certificate (PEM), from `fabricctl pki issue`.
    #[arg(long, global = true, env = "FABRIC_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Your certificate's private key (PEM).
    #[arg(long, global = true, env = "FABRIC_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// A bearer token instead of a certificate (coordinator calls only).
    #[arg(long, global = true, env = "FABRIC_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Talk plaintext to servers started with --insecure-plaintext.
    #[arg(long, global = true, env = "FABRIC_INSECURE_PLAINTEXT")]
    insecure_plaintext: bool,
    /// Output of listings: table or json.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Jobs: submit a jobs file, list and show jobs.
    #[command(subcommand)]
    Job(JobCommand),
    /// Runs: list, show, watch live, retry failed copies, cancel.
    #[command(subcommand)]
    Run(RunCommand),
    /// Nodes the coordinator knows.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Snapshots across the fabric (or on one node with --node).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Off-site sync of the jobs with a `sync_to` label.
    #[command(subcommand)]
    Sync(SyncCommand),
    #[command(
        after_help = "Examples:\n  fabricctl status\n  fabricctl status --job db -o json\n  fabricctl status --node https://10.0.0.5:7401   # one node's own list"
    )]
    /// The snapshot table (same as `snapshot list`).
    Status(SnapshotListArgs),
    #[command(
        after_help = "Examples:\n  fabricctl find -r 0 --job db        # the newest of job db\n  fabricctl find -r 3f2a9c\n  fabricctl find -r daily -o json\n  fabricctl find -r binlogs/vm          # a sync snapshot's name: the current one"
    )]
    /// Find snapshots by a revision spec (backy's `find -r`).
    Find(FindArgs),
    /// Restore a snapshot, a subtree or one file into a directory or as a tar stream.
    #[command(after_help = RESTORE_EXAMPLES)]
    Restore(RestoreArgs),
    /// List a snapshot's entries (mode, owner, size, mtime, name) without restoring it.
    #[command(after_help = LS_EXAMPLES)]
    Ls(LsArgs),
    /// What changed between two snapshots: + added, - removed, M content, m metadata only.
    #[command(after_help = DIFF_EXAMPLES)]
    Diff(DiffArgs),
    #[command(
        after_help = "Examples:\n  fabricctl verify 3f2a9c\n  fabricctl verify latest --sample 5%\n  fabricctl verify --node n1            # the node's whole store"
    )]
    /// Read a snapshot's chunks back (or a whole node's store) and check them.
    Verify(VerifyArgs),
    /// Collect a node's garbage now: sweep the chunks no snapshot references
    /// (retention's deletions free space only then) and report what it
    /// reclaimed.
    Gc {
        /// The node: an id (through the coordinator, under a GC lease), or
        /// an address (straight to the node, with its own grace).
        #[arg(long)]
        node: String,
        /// Rewrite a pack when its live fraction falls under this (default:
        /// the store's).
        #[arg(long)]
        repack_threshold: Option<f64>,
    },
    #[command(
        after_help = "Examples:\n  fabricctl check\n  fabricctl check db web\n  fabricctl -o json check               # one entry per job"
    )]
    /// Nagios check of every job's freshness (exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN).
    Check(CheckArgs),
    /// Apply a job's retention (its schedule's keep counts and keep_*
    /// keys): remove from every node the snapshots no rule keeps.
    Forget {
        /// The job.
        #[arg(long)]
        job: String,
        /// Only print what would be removed, and why the rest is kept.
        #[arg(long)]
        dry_run: bool,
    },
    #[command(
        after_help = "Examples:\n  fabricctl backup --node https://127.0.0.1:7401 /home\n  fabricctl backup --node https://10.0.0.5:7401 --job etc --tag daily --exclude '*.tmp' /etc"
    )]
    /// Push a backup straight to a node, without a coordinator.
    Backup(BackupArgs),
    /// A whole fabric in this process, on loopback.
    #[command(subcommand)]
    Local(LocalCommand),
    /// The fabric's CA and its certificates (made here, no server involved).
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Bearer tokens for services that cannot hold a certificate.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print shell completions.
    #[command(
        after_help = "Examples:\n  fabricctl completions bash > /etc/bash_completion.d/fabricctl\n  fabricctl completions fish > ~/.config/fish/completions/fabricctl.fish"
    )]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum JobCommand {
    /// Submit the jobs of a TOML file and start runs (B1000's command line).
    #[command(
        after_help = "Examples:\n  fabricctl job submit -f jobs.toml\n  fabricctl job submit -f jobs.toml db/main --no-run\n  generate-jobs | fabricctl job submit -f -"
    )]
    Submit {
        /// The jobs file, or - to read it from stdin (messages then name "<stdin>").
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Jobs to run, as JOB or JOB/INSTANCE (default: all).
        select: Vec<String>,
        /// Store the jobs without running them.
        #[arg(long)]
        no_run: bool,
    },
    /// List jobs.
    List,
    /// Show one job.
    Show {
        /// The job's name.
        name: String,
    },
    /// Hold a job's scheduled runs (a run in progress goes on).
    Pause {
        /// The job's name.
        name: String,
    },
    /// Let a paused job's schedule run again.
    Resume {
        /// The job's name.
        name: String,
    },
    /// Forget a job: no more runs or retention; its snapshots stay.
    Delete {
        /// The job's name.
        name: String,
    },
    /// Start a run of a stored job now.
    Run {
        /// The job's name.
        name: String,
        /// Only this instance.
        #[arg(long)]
        instance: Option<String>,
    },
}

#[derive(Subcommand)]
enum RunCommand {
    #[command(
        after_help = "Examples:\n  fabricctl run list\n  fabricctl run list --job db --state failed --since 24h"
    )]
    /// List runs, newest first.
    List {
        /// Only this job's runs.
        #[arg(long)]
        job: Option<String>,
        /// Only runs in this state (queued, pre, copying, post, done, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// Only runs created within this long (e.g. 24h).
        #[arg(long)]
        since: Option<humantime::Duration>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    #[command(
        after_help = "Examples:\n  fabricctl run show 3f2a9c1e\n  fabricctl -o json run show 3f2a9c1e"
    )]
    /// Show a run with its destinations and events.
    Show {
        /// Run id or unique prefix.
        run: String,
    },
    #[command(after_help = "Examples:\n  fabricctl run watch 3f2a9c1e")]
    /// Follow a run live until it ends.
    Watch {
        /// Run id or unique prefix.
        run: String,
    },
    /// Retry a finished run's failed copies, or (B1000's -c) every job's
    /// newest run that failed.
    #[command(
        after_help = "Examples:\n  fabricctl run retry 3f2a9c1e\n  fabricctl run retry --all-failed\n  fabricctl run retry --all-failed --job db"
    )]
    Retry {
        /// Run id or unique prefix.
        #[arg(required_unless_present = "all_failed", conflicts_with = "all_failed")]
        run: Option<String>,
        /// Only the failed copies (the only kind of retry there is; accepted for clarity).
        #[arg(long)]
        copy: bool,
        /// Retry the newest run of every job and instance when it failed
        /// (an older failure a later run made good is left alone).
        #[arg(long)]
        all_failed: bool,
        /// With --all-failed: only this job's runs.
        #[arg(long, requires = "all_failed")]
        job: Option<String>,
    },
    /// Cancel a queued or running run.
    Cancel {
        /// Run id or unique prefix.
        run: String,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// List nodes: id, address, labels, state, last heartbeat, free space, chunks, stored bytes.
    List,
    /// Drain a storage node: no new copies go to it, every snapshot it
    /// holds is copied to other nodes until its replica target is met
    /// without it, then deleted on it; it is then removable.
    Drain(DrainArgs),
}

#[derive(clap::Args)]
struct DrainArgs {
    /// The storage node's id.
    node: String,
    /// Stop draining it (what moved stays where it went).
    #[arg(long, conflicts_with = "wait")]
    cancel: bool,
    /// Print the progress until the node is removable.
    #[arg(long)]
    wait: bool,
}

#[derive(Subcommand)]
enum SyncCommand {
    /// The snapshots not synced off-site yet (all of them with --all):
    /// label, state, node, attempts, last error.
    List {
        /// Only this job's snapshots.
        #[arg(long)]
        job: Option<String>,
        /// Synced ones too.
        #[arg(long)]
        all: bool,
    },
    /// Sync a job's snapshots (or the ones named) again: their state goes
    /// back to pending, and only what the off-site node lacks is copied.
    Reset {
        /// The job whose snapshots to reset.
        #[arg(long)]
        job: Option<String>,
        /// Only these snapshots (ids).
        snapshots: Vec<String>,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// The snapshot table: date, id, name, size, duration, tags, nodes.
    List(SnapshotListArgs),
}

#[derive(clap::Args)]
struct SnapshotListArgs {
    /// Only this job's snapshots.
    #[arg(long)]
    job: Option<String>,
    /// Only this host's snapshots.
    #[arg(long)]
    host: Option<String>,
    /// Ask this node (address) directly instead of the coordinator.
    #[arg(long)]
    node: Option<String>,
}

#[derive(clap::Args)]
struct FindArgs {
    /// Revision spec: an id prefix, a count back from the newest (0 = newest), last/latest, or a tag.
    #[arg(short = 'r', long = "revision")]
    revision: String,
    /// Only this job's snapshots.
    #[arg(long)]
    job: Option<String>,
    /// Only this host's snapshots.
    #[arg(long)]
    host: Option<String>,
    /// Ask this node (address) directly instead of the coordinator.
    #[arg(long)]
    node: Option<String>,
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// The snapshot: a revision spec as for `find -r`.
    snapshot: String,
    /// A path inside the snapshot (default: all of it).
    path: Option<String>,
    /// Target directory, or - for a tar stream on stdout.
    #[arg(long)]
    to: String,
    /// Restore from this node (id, or an address to bypass the coordinator).
    #[arg(long)]
    node: Option<String>,
    /// With a revision spec: only this job's snapshots.
    #[arg(long)]
    job: Option<String>,
    /// Give entries their recorded owner and group (like tar --same-owner;
    /// needs root). Without it everything belongs to you, even as root.
    #[arg(long)]
    same_owner: bool,
    /// Keep recorded setuid and setgid bits and file capabilities (dropped
    /// by default: a snapshot may hold whatever its uploader recorded).
    #[arg(long)]
    keep_setid: bool,
    /// When the restore fails, keep what it wrote (by default it is
    /// removed, and a directory restore starts over from another copy of
    /// the snapshot when one is left).
    #[arg(long)]
    keep_partial: bool,
    /// Replace entries already in the target (by default a restore that
    /// would write over one is refused). Should the restore fail, what it
    /// wrote is removed, replacements included: what they replaced is gone.
    #[arg(long, conflicts_with = "skip_existing")]
    overwrite: bool,
    /// Leave entries already in the target as they are and restore only
    /// what is missing (a directory already there keeps its mode and
    /// times). A failed restore never removes them.
    #[arg(long)]
    skip_existing: bool,
    /// List what would be written (path, kind, size) and what is in the
    /// way; write nothing. Reads the snapshot's listings from a node.
    #[arg(long)]
    dry_run: bool,
}

const RESTORE_EXAMPLES: &str = "\
Examples:
  fabricctl restore 3f2a9c /etc --to ./restored               # refused if ./restored holds what /etc has
  fabricctl restore 3f2a9c /etc --to ./restored --dry-run     # what would be written, and conflicts
  fabricctl restore 3f2a9c /etc --to /etc --skip-existing     # bring back only what is missing
  fabricctl restore latest --job db --to - > db.tar           # a tar stream (never onto a terminal)";

#[derive(clap::Args)]
struct LsArgs {
    /// The snapshot: a revision spec as for `find -r`.
    snapshot: String,
    /// A path inside the snapshot (default: its root).
    path: Option<String>,
    /// List directories' contents too, depth first.
    #[arg(short = 'r', long)]
    recursive: bool,
    /// Read from this node (id, or an address to bypass the coordinator).
    #[arg(long)]
    node: Option<String>,
    /// With a revision spec: only this job's snapshots.
    #[arg(long)]
    job: Option<String>,
}

const LS_EXAMPLES: &str = "\
Examples:
  fabricctl ls latest --job db                 # the root of job db's newest snapshot
  fabricctl ls 3f2a9c /etc -r                  # everything below /etc
  fabricctl ls 0 /etc/hosts -o json            # one entry, as an object";

#[derive(clap::Args)]
struct DiffArgs {
    /// The older snapshot: a revision spec as for `find -r`.
    a: String,
    /// The newer snapshot, likewise.
    b: String,
    /// Compare only below this path.
    path: Option<String>,
    /// Read both from this node (id, or an address to bypass the coordinator).
    #[arg(long)]
    node: Option<String>,
    /// With revision specs: only this job's snapshots.
    #[arg(long)]
    job: Option<String>,
}

const DIFF_EXAMPLES: &str = "\
Examples:
  fabricctl diff 1 0 --job db                  # the two newest snapshots of job db
  fabricctl diff 3f2a9c 7b1e04 /etc            # only below /etc
  fabricctl diff 1 0 --job db -o json          # changes and summary as JSON";

#[derive(clap::Args)]
struct VerifyArgs {
    /// The snapshot (a revision spec); omit with --node to verify the node's whole store.
    snapshot: Option<String>,
    /// The node (id, or an address to bypass the coordinator).
    #[arg(long)]
    node: Option<String>,
    /// Read only this share of the chunks, e.g. 5% or 0.05 (default: all).
    #[arg(long)]
    sample: Option<String>,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// Jobs to check (default: all).
    jobs: Vec<String>,
}

#[derive(clap::Args)]
struct BackupArgs {
    /// The node's address, e.g. https://127.0.0.1:7401.
    #[arg(long)]
    node: String,
    /// Paths to back up.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Job name recorded in the snapshot.
    #[arg(long, default_value = "manual")]
    job: String,
    /// Glob patterns to leave out.
    #[arg(long)]
    exclude: Vec<String>,
    /// Stay on the file systems of the paths; skip virtual and network file systems.
    #[arg(long)]
    one_file_system: bool,
    /// Tags of the snapshot.
    #[arg(long)]
    tag: Vec<String>,
    /// Send at most this many bytes per second: "20MB/s", "512KiB", or a
    /// number (the node's ingest limit applies too).
    #[arg(long, value_parser = parse_rate_flag)]
    limit_rate: Option<u64>,
    /// The memory budget of the backup: read buffers, chunks read ahead,
    /// offered, compressed and in flight until the node has them ("48MiB",
    /// "64MB" or bytes; at least 17.25 MiB). The process needs about
    /// 21 MiB more, whatever the budget (its code, TLS, zstd contexts,
    /// allocator slack).
    #[arg(long, value_parser = parse_size_flag, default_value = "21MiB")]
    memory: u64,
}

fn parse_size_flag(text: &str) -> Result<u64, String> {
    fabric_coordinator::jobfile::parse_bytes(text)
        .ok_or_else(|| format!("{text:?} is not a size: use e.g. \"48MiB\", \"64MB\" or 50000000"))
}

fn parse_rate_flag(text: &str) -> Result<u64, String> {
    fabric_coordinator::jobfile::parse_rate(text).ok_or_else(|| {
        format!("{text:?} is not a rate: use e.g. \"20MB/s\", \"512KiB\" or 1000000")
    })
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Make the fabric's CA: DIR/ca.pem and DIR/ca.key (0600).
    Init {
        /// Where the CA lives.
        #[arg(long, default_value = "fabric-pki")]
        dir: PathBuf,
        /// How long it is valid.
        #[arg(long, default_value = "10y")]
        valid_for: humantime::Duration,
    },
    /// Issue a certificate for one identity: ROLE-NAME.pem and ROLE-NAME.key (0600).
    #[command(group(clap::ArgGroup::new("identity").required(true).args(["node", "operator", "monitor", "client", "coordinator"])))]
    Issue {
        /// Where the CA lives.
        #[arg(long, default_value = "fabric-pki")]
        dir: PathBuf,
        /// Where to write the certificate and key (default: the CA's folder).
        #[arg(long)]
        out: Option<PathBuf>,
        /// A storage node or agent: its node id.
        #[arg(long)]
        node: Option<String>,
        /// A person or tool with every right.
        #[arg(long)]
        operator: Option<String>,
        /// Read-only: listings, check, watch.
        #[arg(long)]
        monitor: Option<String>,
        /// A host that backs itself up (`fabricctl backup`): its host name.
        #[arg(long)]
        client: Option<String>,
        /// The coordinator's server certificate.
        #[arg(long)]
        coordinator: Option<String>,
        /// How long it is valid.
        #[arg(long, default_value = "365d")]
        valid_for: humantime::Duration,
        /// A DNS name to add (for tools that check host names, e.g. grpcurl).
        #[arg(long)]
        dns: Vec<String>,
        /// An IP address to add, likewise.
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a token (shown once); the coordinator keeps only its hash.
    Create {
        /// operator, monitor or client.
        #[arg(long)]
        role: String,
        /// Who holds it (a client's host name).
        #[arg(long)]
        name: String,
        /// How long it is valid (at most 2 years).
        #[arg(long, default_value = "90d")]
        valid_for: humantime::Duration,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token: its next call is refused.
    Revoke {
        /// The token's id.
        id: String,
    },
}

#[derive(Subcommand)]
enum LocalCommand {
    /// Run a coordinator, 3 storage nodes and an agent in this process until Ctrl-C.
    Up {
        /// Where their state lives.
        #[arg(long, default_value = "fabric-local")]
        dir: PathBuf,
        /// Storage nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// The main job, end to end: push DIR with 2 replicas, list, restore, compare byte for byte.
    #[command(
        after_help = "Examples:\n  fabricctl local demo ./my-folder\n  fabricctl local demo ./my-folder --keep     # keep the restored copy (and the fabric's state)"
    )]
    Demo {
        /// The directory to back up.
        source: PathBuf,
        /// Where the fabric's state lives (default: a temporary folder, removed after).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the temporary folder (the restored copy and the fabric's
        /// state) and print where it is.
        #[arg(long)]
        keep: bool,
    },
}

/// Whether the command at `path` (`["run", "watch"]`) ignores global flag
/// `id` (`coordinator` or `output`).
fn ignores(path: &[&str], id: &str) -> bool {
    let first = path.first().copied().unwrap_or_default();
    let command = path.join(" ");
    match id {
        // `pki issue --coordinator NAME` is that command's own flag (the
        // name of a coordinator certificate), under the same id.
        "coordinator" => {
            matches!(first, "completions" | "pki" | "local" | "backup") && command != "pki issue"
        }
        "output" => {
            matches!(first, "completions" | "pki" | "local")
                || command == "run watch"
                || command == "node drain"
        }
        _ => false,
    }
}

/// The command line's definition, with the global flags a subcommand
/// ignores left out of that subcommand's help: there it gets a hidden copy
/// of its own, which clap's propagation of the global one then skips, and
/// which [`ignored_flag`] refuses when given.
fn cli_command() -> clap::Command {
    fn hide_ignored(
        mut command: clap::Command,
        path: &[&str],
        globals: &[clap::Arg],
    ) -> clap::Command {
        for global in globals {
            let id = global.get_id().as_str();
            if !path.is_empty()
                && ignores(path, id)
                && !command.get_arguments().any(|arg| arg.get_id() == id)
            {
                command = command.arg(global.clone().global(false).hide(true));
            }
        }
        let names: Vec<String> = command
            .get_subcommands()
            .map(|sub| sub.get_name().to_owned())
            .collect();
        for name in &names {
            let mut below = path.to_vec();
            below.push(name);
            command = command.mut_subcommand(name, |sub| hide_ignored(sub, &below, globals));
        }
        command
    }
    let command = Cli::command();
    let globals: Vec<clap::Arg> = command
        .get_arguments()
        .filter(|arg| matches!(arg.get_id().as_str(), "coordinator" | "output"))
        .cloned()
        .collect();
    hide_ignored(command, &[], &globals)
}

/// The global flags a command would ignore, as an error naming them: a
/// flag that does nothing is refused rather than silently dropped.
fn ignored_flag(matches: &clap::ArgMatches) -> Option<String> {
    let mut path = Vec::new();
    let mut levels = vec![matches];
    let mut current = matches;
    while let Some((name, sub)) = current.subcommand() {
        path.push(name);
        levels.push(sub);
        current = sub;
    }
    let command = path.join(" ");
    // On the command line at any level: the global flag, or a hidden copy
    // of it (see `cli_command`).
    let given = |id: &str| {
        levels.iter().any(|level| {
            level.try_contains_id(id).unwrap_or(false)
                && matches!(
                    level.value_source(id),
                    Some(clap::parser::ValueSource::CommandLine)
                )
        })
    };
    if given("coordinator") && ignores(&path, "coordinator") {
        return Some(format!(
            "--coordinator does not apply to `fabricctl {command}`, which talks to no coordinator"
        ));
    }
    if given("output") && ignores(&path, "output") {
        return Some(format!(
            "-o/--output does not apply to `fabricctl {command}`, which prints no listing"
        ));
    }
    None
}

fn main() {
    // Before any thread starts (see the module).
    fabric_node::allocator::tune();
    let matches = cli_command().get_matches();
    if let Some(problem) = ignored_flag(&matches) {
        eprintln!("fabricctl: {problem}");
        std::process::exit(2);
    }
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("fabricctl: cannot start the async runtime: {err}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(run(cli));
    std::process::exit(code);
}

async fn run(cli: Cli) -> i32 {
    let format = cli.output;
    let coordinator = Remote::new(
        cli.coordinator,
        fabric_trust::transport::TransportSettings {
            ca: cli.tls_ca,
            cert: cli.tls_cert,
            key: cli.tls_key,
            insecure_plaintext: cli.insecure_plaintext,
        },
        cli.token,
    );
    let result = match cli.command {
        Command::Job(JobCommand::Submit {
            file,
            select,
            no_run,
        }) => commands::job_submit(&coordinator, &file, select, no_run, format).await,
        Command::Job(JobCommand::List) => commands::job_list(&coordinator, format).await,
        Command::Job(JobCommand::Show { name }) => {
            commands::job_show(&coordinator, &name, format).await
        }
        Command::Job(JobCommand::Pause { name }) => {
            commands::job_change(&coordinator, &name, commands::JobChangeKind::Pause, format).await
        }
        Command::Job(JobCommand::Resume { name }) => {
            commands::job_change(&coordinator, &name, commands::JobChangeKind::Resume, format).await
        }
        Command::Job(JobCommand::Delete { name }) => {
            commands::job_change(&coordinator, &name, commands::JobChangeKind::Delete, format).await
        }
        Command::Job(JobCommand::Run { name, instance }) => {
            commands::job_run(&coordinator, &name, instance, format).await
        }
        Command::Run(RunCommand::List {
            job,
            state,
            since,
            limit,
        }) => commands::run_list(&coordinator, job, state, since, limit, format).await,
        Command::Run(RunCommand::Show { run }) => {
            commands::run_show(&coordinator, &run, format).await
        }
        Command::Run(RunCommand::Watch { run }) => commands::run_watch(&coordinator, &run).await,
        Command::Run(RunCommand::Retry {
            run,
            copy: _,
            all_failed,
            job,
        }) => match run {
            Some(run) if !all_failed => commands::run_retry(&coordinator, &run, format).await,
            _ => commands::run_retry_all_failed(&coordinator, job, format).await,
        },
        Command::Run(RunCommand::Cancel { run }) => {
            commands::run_cancel(&coordinator, &run, format).await
        }
        Command::Node(NodeCommand::List) => commands::node_list(&coordinator, format).await,
        Command::Sync(SyncCommand::List { job, all }) => {
            commands::sync_list(&coordinator, job, all, format).await
        }
        Command::Sync(SyncCommand::Reset { job, snapshots }) => {
            commands::sync_reset(&coordinator, job, snapshots).await
        }
        Command::Node(NodeCommand::Drain(args)) => {
            commands::node_drain(&coordinator, &args.node, args.cancel, args.wait).await
        }
        Command::Snapshot(SnapshotCommand::List(args)) | Command::Status(args) => {
            commands::snapshot_list(&coordinator, args.job, args.host, args.node, format).await
        }
        Command::Find(args) => {
            commands::find(
                &coordinator,
                &args.revision,
                args.job,
                args.host,
                args.node,
                format,
            )
            .await
        }
        Command::Restore(args) => {
            commands::restore(
                &coordinator,
                &args.snapshot,
                args.path.as_deref().unwrap_or(""),
                &args.to,
                args.node,
                args.job,
                commands::RestoreOptions {
                    policy: fabric_chunkstore::restore::RestorePolicy {
                        same_owner: args.same_owner,
                        setid_bits: args.keep_setid,
                    },
                    keep_partial: args.keep_partial,
                    existing: if args.overwrite {
                        fabric_chunkstore::restore::ExistingEntries::Overwrite
                    } else if args.skip_existing {
                        fabric_chunkstore::restore::ExistingEntries::Skip
                    } else {
                        fabric_chunkstore::restore::ExistingEntries::Refuse
                    },
                    dry_run: args.dry_run,
                    format,
                },
            )
            .await
        }
        Command::Ls(args) => {
            let path = args.path.as_deref().unwrap_or("");
            browse::ls(
                &coordinator,
                &args.snapshot,
                path,
                args.recursive,
                args.node,
                args.job,
                format,
            )
            .await
        }
        Command::Diff(args) => {
            let path = args.path.as_deref().unwrap_or("");
            browse::diff(
                &coordinator,
                &args.a,
                &args.b,
                path,
                args.node,
                args.job,
                format,
            )
            .await
        }
        Command::Verify(args) => {
            commands::verify(&coordinator, args.snapshot, args.node, args.sample, format).await
        }
        Command::Check(args) => return check::run(&coordinator, args.jobs, format).await,
        Command::Gc {
            node,
            repack_threshold,
        } => commands::gc(&coordinator, &node, repack_threshold, format).await,
        Command::Forget { job, dry_run } => {
            commands::forget(&coordinator, &job, dry_run, format).await
        }
        Command::Backup(args) => {
            commands::backup(
                &coordinator,
                commands::ManualBackup {
                    node: args.node,
                    paths: args.paths,
                    job: args.job,
                    exclude: args.exclude,
                    one_file_system: args.one_file_system,
                    tags: args.tag,
                    limit_bytes_per_s: args.limit_rate.unwrap_or(0),
                    memory_bytes: args.memory,
                },
                format,
            )
            .await
        }
        Command::Local(LocalCommand::Up { dir, nodes }) => local::up(&dir, nodes).await,
        Command::Local(LocalCommand::Demo { source, dir, keep }) => {
            local::demo(&source, dir.as_deref(), keep).await
        }
        Command::Pki(PkiCommand::Init { dir, valid_for }) => {
            security::pki_init(&dir, valid_for.into())
        }
        Command::Pki(PkiCommand::Issue {
            dir,
            out,
            node,
            operator,
            monitor,
            client,
            coordinator: coordinator_name,
            valid_for,
            dns,
            ip,
        }) => {
            use fabric_trust::Role;
            let (role, name) = [
                (Role::Node, node),
                (Role::Operator, operator),
                (Role::Monitor, monitor),
                (Role::Client, client),
                (Role::Coordinator, coordinator_name),
            ]
            .into_iter()
            .find_map(|(role, name)| name.map(|name| (role, name)))
            .unwrap_or((Role::Operator, String::new()));
            let out = out.unwrap_or_else(|| dir.clone());
            security::pki_issue(&dir, &out, role, &name, valid_for.into(), dns, ip)
        }
        Command::Token(TokenCommand::Create {
            role,
            name,
            valid_for,
        }) => security::token_create(&coordinator, &role, &name, valid_for.into(), format).await,
        Command::Token(TokenCommand::List) => security::token_list(&coordinator, format).await,
        Command::Token(TokenCommand::Revoke { id }) => {
            security::token_revoke(&coordinator, &id, format).await
        }
        Command::Completions { shell } => {
            // Into a buffer first: generate() panics on a failed write,
            // and `| head` closes stdout early.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cli_command(), "fabricctl", &mut script);
            fabricctl::output::write_all(&script).map_err(anyhow::Error::from)
        }
    };
    match result {
        Ok(()) => 0,
        // The reader went away (`| head`): what it wanted it has.
        Err(err) if fabricctl::output::is_closed_stdout(&err) => 0,
        Err(err) => {
            eprintln!("fabricctl: {err:#}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(args: &[&str]) -> Option<String> {
        let matches = cli_command().try_get_matches_from(args).unwrap();
        ignored_flag(&matches)
    }

    /// The help of `fabricctl PATH...`.
    fn help_of(path: &[&str]) -> String {
        let mut command = cli_command();
        // As parsing does: the global flags copied into the subcommands.
        command.build();
        let mut current = &mut command;
        for name in path {
            current = current.find_subcommand_mut(name).unwrap();
        }
        current.render_long_help().to_string()
    }

    #[test]
    fn a_commands_help_offers_only_the_global_flags_it_takes() {
        let local_up = help_of(&["local", "up"]);
        assert!(!local_up.contains("--coordinator"), "{local_up}");
        assert!(!local_up.contains("--output"), "{local_up}");
        let watch = help_of(&["run", "watch"]);
        assert!(watch.contains("--coordinator"), "{watch}");
        assert!(!watch.contains("--output"), "{watch}");
        let list = help_of(&["job", "list"]);
        assert!(
            list.contains("--coordinator") && list.contains("--output"),
            "{list}"
        );
        let issue = help_of(&["pki", "issue"]);
        assert!(
            issue.contains("--coordinator <COORDINATOR>"),
            "its own flag: {issue}"
        );
        assert!(!issue.contains("--output"), "{issue}");
    }

    #[test]
    fn backups_memory_flag_defaults_to_the_agents_budget() {
        let parsed =
            Cli::try_parse_from(["fabricctl", "backup", "--node", "https://n1:7401", "/etc"])
                .expect("parses");
        let Command::Backup(args) = parsed.command else {
            panic!("not a backup");
        };
        assert_eq!(
            args.memory,
            fabric_node::memory_budget::DEFAULT_BACKUP_MEMORY
        );
        assert!(
            parse_size_flag("lots")
                .unwrap_err()
                .contains("\"lots\" is not a size")
        );
    }

    #[test]
    fn a_global_flag_a_command_ignores_is_refused() {
        assert_eq!(
            problem(&[
                "fabricctl",
                "--coordinator",
                "https://x:1",
                "completions",
                "fish"
            ])
            .as_deref(),
            Some(
                "--coordinator does not apply to `fabricctl completions`, which talks to no coordinator"
            )
        );
        assert!(
            problem(&["fabricctl", "local", "up", "-o", "json"]).is_some_and(
                |p| p.starts_with("-o/--output does not apply to `fabricctl local up`")
            )
        );
        assert!(problem(&["fabricctl", "-o", "json", "run", "watch", "abc"]).is_some());
        assert_eq!(
            problem(&["fabricctl", "--coordinator", "https://x:1", "node", "list"]),
            None
        );
        assert_eq!(problem(&["fabricctl", "-o", "json", "status"]), None);
        // pki issue's own --coordinator (a certificate's name) is not the global one.
        assert_eq!(
            problem(&[
                "fabricctl",
                "pki",
                "issue",
                "--dir",
                "d",
                "--coordinator",
                "c1"
            ]),
            None
        );
        // From the environment or the default: not the user's word here.
        assert_eq!(problem(&["fabricctl", "completions", "bash"]), None);
    }
}
