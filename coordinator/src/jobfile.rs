//! Jobs files: B1000's job configuration in TOML, validated into
//! [`JobSpec`]s, and B1000's command-line selection of what to run.
//!
//! # The file
//!
//! ```toml
//! [global]                      # defaults for every job, and free variables
//! scripts_dir = "/usr/local/lib/fabric"
//! copy_retries = 3
//!
//! [dest.offsite]                # a named destination (see below)
//! nodes = "n2/n3"
//!
//! [job.mysqldb]
//! direction = "push"            # push | pull | passive
//! type = "full"                 # full (default) | sync
//! client = "db-slave-3"         # node id of the agent that runs it
//! instances = "!$scripts_dir/instances.sh"
//! master_host = "!$scripts_dir/master_host.sh $instance"
//! pre = "$scripts_dir/dump.sh $instance /srv/dump/$instance"
//! include = ["/srv/dump/$instance"]
//! dest = "n1& offsite"
//! interval = "24h"
//! ```
//!
//! Job keys, and the directions they apply to (push / pull / passive):
//!
//! | key | applies to | value |
//! | --- | --- | --- |
//! | `direction` | all | `push`, `pull` or `passive` (required) |
//! | `type` | push, pull | `full` (default) or `sync` |
//! | `client` | push, passive | node id of the client's agent (required) |
//! | `include` | push, pull | paths: a list, or one string split at whitespace (required) |
//! | `exclude` | push, pull | globs: a list, or one string split at whitespace |
//! | `pre`, `post` | push, passive | shell commands run on the client |
//! | `instances` | push | a list, a string split at spaces, commas and newlines, or `!command` printing one per line |
//! | `dest` | push, pull | B1000's destination grammar (see [`crate::dest`]) |
//! | `replicas` | push, pull | instead of `dest`: this many distinct healthy storage nodes |
//! | `copy_retries` | push, pull | retries of a failed copy (default 3) |
//! | `copy_retry_min_sleep` | push, pull | minimum sleep between retries: `"30s"`, `"5m"`, or seconds (default 60s) |
//! | `interval` | all | how often the job should run: `"24h"` (used by `check`) |
//! | `master_host`, `master_instance` | push, pull | static, or `!command` (push only) |
//! | `data_age` | push, pull | seconds, a duration, or `!command` (push only) |
//! | `tags` | push, pull | a list, or one string split at spaces and commas |
//! | `one_file_system` | push, pull | `true` to stay on the file systems of the included paths |
//! | `pull_source` | pull | the passive job this pull job fetches from (its twin; required) |
//! | `pull_timeout` | passive | how long the client waits to be pulled before its post script (default 1h) |
//! | `schedule` | push, pull | backy's schedule: `{ daily = { interval = "24h", keep = 7 }, weekly = { interval = "7d", keep = 4 } }`; the coordinator starts the job's runs by itself, each carrying (as snapshot tags) every tag that is due; slots are spread over the interval by the job's name |
//! | `window` | push, pull | hours in which scheduled runs may start, `"01:00-05:00"` (may span midnight), in `time_zone` |
//! | `time_zone` | push, pull | the window's time zone, an IANA name (default UTC) |
//! | `keep_last`, `keep_hourly`, `keep_daily`, `keep_weekly`, `keep_monthly`, `keep_yearly` | push, pull | restic-style retention per host and instance (`keep_daily = 7`: the newest snapshot of each of the 7 most recent days that have one, in `time_zone`); with a `schedule`'s `keep` counts, `fabricctl forget` and the coordinator (after each run and daily) remove every snapshot no rule keeps, from every node |
//! | `quota` | push, pull | the most the job's snapshots may take on the storage nodes together: `"500GiB"`, `"2TB"`, or a number of bytes; a run does not start while the job is at or over it, and a transfer that would go over stops without committing (as the storage nodes last counted, every minute) |
//! | `bandwidth_limit` | push, pull | bytes per second for the job's transfers: `"20MB/s"`, `"512KiB"`, or a number of bytes (the agent's sends of a push, the puller's receives of a pull) |
//! | `min_retention` | push, pull | a WORM window: `"30d"`; no one can delete a snapshot of the job before this long after its run started |
//! | `spread_by` | push, pull | with `replicas`: a label key such as `"zone"`; each replica goes to a node in a failure domain of its own (nodes labelled `zone:a`, `zone:b`...; a node without the label is not chosen), and re-replication keeps it so |
//! | `sync_to` | push, pull | off-site sync (btw-backup): a label, e.g. `"offsite"`; each snapshot of the job, once committed, is copied to one storage node carrying it, and the catalogue keeps its sync state (`fabricctl sync list`, `sync reset`); an interrupted sync is taken up again |
//! | `verify` | push, pull | backy's verify after backup: `"none"` (default), `"full"`, or `"sample:5%"`; each storage node reads its new copy's chunks (all, or that share at random) back once it is committed: a copy that checks makes the snapshot VERIFIED, one that does not is marked damaged (and copied again elsewhere) |
//!
//! A key that does not apply to the job's direction is an error when the job
//! sets it, and ignored when it comes from `[global]`. `dest` and `replicas`
//! are one setting: a job that sets either takes neither from `[global]`.
//! A pull job's `client` is its passive twin's; every passive job must be
//! the `pull_source` of exactly one pull job.
//!
//! # Named destinations
//!
//! `[dest.NAME]` has one key, `nodes`: a destination in the same grammar,
//! naming node ids and labels. A job's `dest` may use `NAME` where it would
//! use a node id or label. Alone in its step it is replaced by its steps (a
//! trailing `&` then starts all of them in the background); inside a random
//! group (`a/NAME`) it must be a single step without `&`, whose names join
//! the group. Named destinations do not name each other. The job's stored
//! `dest` is the expanded plan, so runs only ever see node ids and labels.
//!
//! # Values
//!
//! - `$key` (or `${key}`) in a string refers to the job's own key, or else to
//!   `[global]`'s; references are resolved recursively, each in the job's
//!   scope. `$instance`, `$host` and `$start_time` are kept for run time
//!   ([`expand_runtime`]). `$$` is a literal `$` (kept as `$$` until run
//!   time). A `$` before anything else than a name (`$1`, `$(`) is literal.
//! - A string starting with `!` is a command evaluated on the client at run
//!   time, kept as written after `$key` resolution. Only `instances`,
//!   `master_host`, `master_instance` and `data_age` of push jobs may be
//!   commands (B1000's dynamic options).
//!
//! This module only parses and validates; it never runs a command, reads a
//! clock or looks at the live state of nodes (callers pass the known node ids
//! and labels).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use fabric_proto::v1::{Direction, JobSpec, ScheduleTag, SnapshotType};
use toml::de::{DeTable, DeValue};

use crate::dest::{DestParseError, DestPlan, DestStep};
use fabric_proto::naming::CivilTime;

/// Run-time variables, substituted by [`expand_runtime`].
pub const RUNTIME_VARIABLES: [&str; 3] = ["instance", "host", "start_time"];

/// Default `copy_retries` (B1000's).
pub const DEFAULT_COPY_RETRIES: u32 = 3;
/// Default `copy_retry_min_sleep` (B1000's).
pub const DEFAULT_COPY_RETRY_MIN_SLEEP: Duration = Duration::from_secs(60);
/// Default `pull_timeout`.
pub const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(3600);

/// Which directions a key applies to.
#[derive(Clone, Copy)]
struct KeyRule {
    name: &'static str,
    push: bool,
    pull: bool,
    passive: bool,
}

const fn rule(name: &'static str, push: bool, pull: bool, passive: bool) -> KeyRule {
    KeyRule {
        name,
        push,
        pull,
        passive,
    }
}

const JOB_KEYS: &[KeyRule] = &[
    rule("direction", true, true, true),
    rule("type", true, true, false),
    rule("client", true, false, true),
    rule("include", true, true, false),
    rule("exclude", true, true, false),
    rule("pre", true, false, true),
    rule("post", true, false, true),
    rule("instances", true, false, false),
    rule("dest", true, true, false),
    rule("replicas", true, true, false),
    rule("copy_retries", true, true, false),
    rule("copy_retry_min_sleep", true, true, false),
    rule("interval", true, true, true),
    rule("master_host", true, true, false),
    rule("master_instance", true, true, false),
    rule("data_age", true, true, false),
    rule("tags", true, true, false),
    rule("one_file_system", true, true, false),
    rule("pull_source", false, true, false),
    rule("pull_timeout", false, false, true),
    rule("min_retention", true, true, false),
    rule("bandwidth_limit", true, true, false),
    rule("quota", true, true, false),
    rule("schedule", true, true, false),
    rule("window", true, true, false),
    rule("time_zone", true, true, false),
    rule("keep_last", true, true, false),
    rule("keep_hourly", true, true, false),
    rule("keep_daily", true, true, false),
    rule("keep_weekly", true, true, false),
    rule("keep_monthly", true, true, false),
    rule("keep_yearly", true, true, false),
    rule("verify", true, true, false),
    rule("spread_by", true, true, false),
    rule("sync_to", true, true, false),
];

/// What a byte-valued key holds.
#[derive(Clone, Copy)]
enum BytesKind {
    /// A rate (`bandwidth_limit`).
    PerSecond,
    /// An amount (`quota`).
    Total,
}

/// Keys whose value may be a `!command` (in push jobs).
const DYNAMIC_KEYS: [&str; 4] = ["instances", "master_host", "master_instance", "data_age"];

/// The node ids and labels a job's `dest` and `client` may name. When both
/// sets are empty, names are not checked (a file validated offline).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownNodes {
    /// Node ids.
    pub ids: BTreeSet<String>,
    /// Labels carried by at least one node.
    pub labels: BTreeSet<String>,
}

impl KnownNodes {
    fn checks(&self) -> bool {
        !(self.ids.is_empty() && self.labels.is_empty())
    }

    fn knows(&self, name: &str) -> bool {
        self.ids.contains(name) || self.labels.contains(name)
    }

    fn describe(&self) -> String {
        let list = |set: &BTreeSet<String>| {
            if set.is_empty() {
                "none".to_owned()
            } else {
                set.iter().cloned().collect::<Vec<_>>().join(", ")
            }
        };
        format!("nodes: {}; labels: {}", list(&self.ids), list(&self.labels))
    }
}

/// Where in the file a problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Section {
    /// The file as a whole.
    File,
    /// `[global]`.
    Global,
    /// `[job.NAME]`.
    Job(String),
    /// `[dest.NAME]`.
    Dest(String),
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Section::File => Ok(()),
            Section::Global => f.write_str("[global]"),
            Section::Job(name) => write!(f, "job {name:?}"),
            Section::Dest(name) => write!(f, "[dest.{name}]"),
        }
    }
}

/// One problem of a jobs file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The table.
    pub section: Section,
    /// The key, when the problem is about one.
    pub key: Option<String>,
    /// What is wrong.
    pub kind: ProblemKind,
}

/// What is wrong in a jobs file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProblemKind {
    /// Not valid TOML.
    #[error("not valid TOML: {0}")]
    Syntax(String),
    /// A top-level table other than `global`, `job` and `dest`.
    #[error("unknown table [{0}] (a jobs file has [global], [job.NAME] and [dest.NAME] tables)")]
    UnknownTable(String),
    /// A value where a table was expected.
    #[error("expected a table, found {0}")]
    NotATable(&'static str),
    /// No jobs at all.
    #[error("no [job.NAME] table: the file defines no job")]
    NoJobs,
    /// A job or destination name that cannot be used.
    #[error(
        "{0:?} is not a valid name (letters, digits and `-_.`, starting with a letter or digit)"
    )]
    BadName(String),
    /// A key no job has.
    #[error("unknown key{}", suggestion_text(.0))]
    UnknownKey(Option<String>),
    /// A key of another direction.
    #[error("does not apply to a {direction} job{why}")]
    NotForDirection {
        /// push, pull or passive.
        direction: &'static str,
        /// Why, when it helps.
        why: &'static str,
    },
    /// A required key is absent.
    #[error("missing: {0}")]
    Missing(&'static str),
    /// A value of the wrong TOML type.
    #[error("expected {expected}, found {found}")]
    WrongType {
        /// What the key takes.
        expected: &'static str,
        /// What the file has.
        found: &'static str,
    },
    /// A value out of the key's set or range.
    #[error("{value:?} is not {expected}")]
    BadValue {
        /// The value as resolved.
        value: String,
        /// What the key takes.
        expected: &'static str,
    },
    /// A duration humantime cannot read.
    #[error("{value:?} is not a duration (e.g. \"30s\", \"5m\", \"24h\"): {reason}")]
    BadDuration {
        /// The value as resolved.
        value: String,
        /// humantime's reason.
        reason: String,
    },
    /// A `!command` where only static values are allowed.
    #[error(
        "cannot be a `!command` (only instances, master_host, master_instance and data_age of push jobs can)"
    )]
    CommandNotAllowed,
    /// The destination grammar is broken.
    #[error("{0}")]
    DestGrammar(DestParseError),
    /// A destination name nobody knows.
    #[error("{name:?} is neither a node id, a label nor a [dest.NAME] table ({known})")]
    UnknownDestName {
        /// The name.
        name: String,
        /// What is known.
        known: String,
    },
    /// A named destination used inside a random group while it is not a
    /// single plain group.
    #[error(
        "[dest.{name}] is {plan:?}, which cannot join the random group {group:?}: inside a group a named destination must be one group without `&`"
    )]
    NamedDestInGroup {
        /// The named destination.
        name: String,
        /// Its plan.
        plan: String,
        /// The group it appears in.
        group: String,
    },
    /// A named destination naming another.
    #[error("names [dest.{0}]: named destinations cannot name each other")]
    NestedNamedDest(String),
    /// A named destination shadowing a node or label.
    #[error("the name is also a node id or label; rename the [dest] table")]
    NamedDestShadows,
    /// Both placement settings.
    #[error("both \"dest\" and \"replicas\" are set: a job takes one of them")]
    DestAndReplicas,
    /// No placement.
    #[error("a {0} job needs \"dest\" or \"replicas\"")]
    NoPlacement(&'static str),
    /// A client nobody knows.
    #[error("{name:?} is not a known node id ({known})")]
    UnknownClient {
        /// The id.
        name: String,
        /// What is known.
        known: String,
    },
    /// `$name` refers to nothing.
    #[error(
        "{chain}: ${name} refers to no key of the job nor of [global] (write $$ for a literal $)"
    )]
    MissingReference {
        /// `key -> $a -> $b`, ending before `name`.
        chain: String,
        /// The missing name.
        name: String,
    },
    /// `$a` -> `$b` -> `$a`.
    #[error("cyclic reference: {0}")]
    CyclicReference(String),
    /// `$name` refers to a list.
    #[error("{chain}: ${name} is a list; only strings, numbers and booleans can be referenced")]
    ReferenceToList {
        /// The chain up to the reference.
        chain: String,
        /// The name.
        name: String,
    },
    /// `$name` refers to a `!command`.
    #[error("{chain}: ${name} is a `!command`, whose value is only known at run time")]
    ReferenceToCommand {
        /// The chain up to the reference.
        chain: String,
        /// The name.
        name: String,
    },
    /// A run-time name defined in `[global]`.
    #[error("is set at run time and cannot be defined")]
    ReservedName,
    /// A `[global]` variable whose name is one letter or so from a job key:
    /// a typo of that key, which would otherwise silently be a variable.
    #[error(
        "looks like a typo of the key {0}: as written it is a free variable, which sets nothing (fix the key, or name the variable further from any key)"
    )]
    LikelyTypo(String),
    /// A bad instance name.
    #[error(
        "instance {0:?} is not valid (letters, digits and `-_.`, starting with a letter or digit)"
    )]
    BadInstance(String),
    /// A pull job's twin is not in the file.
    #[error("{0:?} is not a job of this file")]
    UnknownPullSource(String),
    /// A pull job's twin is not passive.
    #[error("job {name:?} is a {direction} job; a pull job's source must be a passive job")]
    PullSourceNotPassive {
        /// The twin.
        name: String,
        /// Its direction.
        direction: &'static str,
    },
    /// A passive job nobody pulls.
    #[error("no pull job names this passive job in its pull_source")]
    PassiveWithoutPull,
    /// A passive job several pull jobs name.
    #[error("pull jobs {0} all name this passive job; a passive job has exactly one pull twin")]
    PassivePulledTwice(String),
}

fn suggestion_text(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(key) => format!(" (did you mean \"{key}\"?)"),
        None => {
            let keys: Vec<&str> = JOB_KEYS.iter().map(|rule| rule.name).collect();
            format!(" (job keys: {})", keys.join(", "))
        }
    }
}

/// A jobs file that cannot be used: every problem found, each naming the
/// file, line, table and key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct JobFileError {
    /// The file's name as given.
    pub file: String,
    /// The problems, in file order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for JobFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (position, problem) in self.problems.iter().enumerate() {
            if position > 0 {
                f.write_str("\n")?;
            }
            f.write_str(&self.file)?;
            if let Some(line) = problem.line {
                write!(f, ":{line}")?;
            }
            f.write_str(": ")?;
            match (&problem.section, &problem.key) {
                (Section::File, None) => {}
                (Section::File, Some(key)) => write!(f, "key {key:?}: ")?,
                (section, None) => write!(f, "{section}: ")?,
                (section, Some(key)) => write!(f, "{section}, key {key:?}: ")?,
            }
            write!(f, "{}", problem.kind)?;
        }
        Ok(())
    }
}

/// A TOML value, owned, with the line it is on.
#[derive(Debug, Clone)]
struct Entry {
    value: Value,
    line: usize,
}

#[derive(Debug, Clone)]
enum Value {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
    List(Vec<Value>),
    Table(Vec<(String, Entry)>),
    Datetime(String),
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Value::Text(_) => "a string",
            Value::Integer(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a boolean",
            Value::List(_) => "a list",
            Value::Table(_) => "a table",
            Value::Datetime(_) => "a date",
        }
    }

    /// The text a `$reference` to this value inserts.
    fn as_scalar_text(&self) -> Option<String> {
        match self {
            Value::Text(text) => Some(text.clone()),
            Value::Integer(number) => Some(number.to_string()),
            Value::Float(number) => Some(number.to_string()),
            Value::Bool(flag) => Some(flag.to_string()),
            Value::Datetime(text) => Some(text.clone()),
            Value::List(_) | Value::Table(_) => None,
        }
    }
}

struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(at, _)| at + 1));
        LineIndex { starts }
    }

    fn line(&self, offset: usize) -> usize {
        match self.starts.binary_search(&offset) {
            Ok(index) => index + 1,
            Err(index) => index,
        }
    }
}

fn convert(value: &DeValue<'_>, lines: &LineIndex) -> Value {
    match value {
        DeValue::String(text) => Value::Text(text.to_string()),
        DeValue::Integer(number) => match i64::from_str_radix(number.as_str(), number.radix()) {
            Ok(number) => Value::Integer(number),
            Err(_) => Value::Text(number.as_str().to_owned()),
        },
        DeValue::Float(number) => match number.as_str().parse() {
            Ok(number) => Value::Float(number),
            Err(_) => Value::Text(number.as_str().to_owned()),
        },
        DeValue::Boolean(flag) => Value::Bool(*flag),
        DeValue::Datetime(date) => Value::Datetime(date.to_string()),
        DeValue::Array(items) => Value::List(
            items
                .iter()
                .map(|item| convert(item.get_ref(), lines))
                .collect(),
        ),
        DeValue::Table(table) => Value::Table(convert_table(table, lines)),
    }
}

fn convert_table(table: &DeTable<'_>, lines: &LineIndex) -> Vec<(String, Entry)> {
    table
        .iter()
        .map(|(key, value)| {
            (
                key.get_ref().to_string(),
                Entry {
                    value: convert(value.get_ref(), lines),
                    line: lines.line(key.span().start),
                },
            )
        })
        .collect()
}

/// Whether `name` can name a job, a `[dest]` table or an instance.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) if first.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// One tag of a `schedule` table: `TAG = { interval = "24h", keep = 7 }`,
/// or what is wrong with it (value, what was expected).
fn schedule_tag(
    tag: &str,
    entry: &Entry,
    shape: &'static str,
) -> Result<ScheduleTag, Vec<(String, &'static str)>> {
    if !is_valid_name(tag) {
        return Err(vec![(
            tag.to_owned(),
            "a tag name (letters, digits, '-', '_', '.')",
        )]);
    }
    let Value::Table(fields) = &entry.value else {
        return Err(vec![(
            format!("{tag} = {}", entry.value.type_name()),
            shape,
        )]);
    };
    let (mut interval_s, mut keep) = (None, None);
    let mut problems = Vec::new();
    for (field, value) in fields {
        match (field.as_str(), &value.value) {
            ("interval", Value::Text(text)) => match humantime::parse_duration(text.trim()) {
                Ok(interval) if interval.as_secs() >= 60 => interval_s = Some(interval.as_secs()),
                _ => problems.push((
                    format!("{tag}.interval = {text:?}"),
                    "an interval of at least a minute (\"1h\", \"24h\", \"7d\")",
                )),
            },
            ("interval", Value::Integer(seconds)) if *seconds >= 60 => {
                interval_s = Some(*seconds as u64);
            }
            ("keep", Value::Integer(count)) if (1..=100_000).contains(count) => {
                keep = Some(*count as u32);
            }
            ("interval" | "keep", other) => problems.push((
                format!("{tag}.{field} = {}", other.type_name()),
                "interval: a duration of at least a minute; keep: a count from 1",
            )),
            (other, _) => problems.push((format!("{tag}.{other}"), "only interval and keep")),
        }
    }
    match (interval_s, keep) {
        (Some(interval_s), Some(keep)) if problems.is_empty() => Ok(ScheduleTag {
            tag: tag.to_owned(),
            interval_s,
            keep,
        }),
        _ if !problems.is_empty() => Err(problems),
        _ => Err(vec![(
            tag.to_owned(),
            "both an interval and a keep count: { interval = \"24h\", keep = 7 }",
        )]),
    }
}

/// Bytes per second from `text`: [`parse_bytes`]'s form, then an optional
/// `/s`. `None` for anything else or beyond `u64`.
pub fn parse_rate(text: &str) -> Option<u64> {
    let text = text.trim();
    parse_bytes(text.strip_suffix("/s").unwrap_or(text))
}

/// Bytes from `text`: a number (decimals allowed) and an optional unit
/// (`k`/`K`, `M`, `G`, `T` in powers of 1000, `Ki`, `Mi`, `Gi`, `Ti` in
/// powers of 1024, each with an optional `B`; a lone `B`). `None` for
/// anything else or beyond `u64`.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let unit = unit.trim();
    let unit = unit.strip_suffix('B').unwrap_or(unit);
    let factor: f64 = match unit {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = number * factor;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes.round() as u64)
}

/// Parses and validates a jobs file. `file_name` is only used in messages.
/// Jobs come back sorted by name.
pub fn parse_jobs_file(
    file_name: &str,
    text: &str,
    known: &KnownNodes,
) -> Result<Vec<JobSpec>, JobFileError> {
    let mut problems = Vec::new();
    let jobs = parse_into(text, known, &mut problems);
    if problems.is_empty() {
        Ok(jobs)
    } else {
        problems.sort_by_key(|problem| problem.line.unwrap_or(usize::MAX));
        Err(JobFileError {
            file: file_name.to_owned(),
            problems,
        })
    }
}

/// Collects problems of one table.
struct Reporter<'p> {
    problems: &'p mut Vec<Problem>,
    section: Section,
}

impl Reporter<'_> {
    fn report(&mut self, line: usize, key: Option<&str>, kind: ProblemKind) {
        self.problems.push(Problem {
            line: Some(line),
            section: self.section.clone(),
            key: key.map(str::to_owned),
            kind,
        });
    }
}

fn parse_into(text: &str, known: &KnownNodes, problems: &mut Vec<Problem>) -> Vec<JobSpec> {
    let lines = LineIndex::new(text);
    let document = match DeTable::parse(text) {
        Ok(document) => document,
        Err(error) => {
            problems.push(Problem {
                line: error.span().map(|span| lines.line(span.start)),
                section: Section::File,
                key: None,
                kind: ProblemKind::Syntax(error.message().trim().to_owned()),
            });
            return Vec::new();
        }
    };
    let top = convert_table(document.get_ref(), &lines);

    let mut global: Vec<(String, Entry)> = Vec::new();
    let mut job_tables: Vec<(String, Entry)> = Vec::new();
    let mut dest_tables: Vec<(String, Entry)> = Vec::new();
    for (name, entry) in top {
        let file = |kind| Problem {
            line: Some(entry.line),
            section: Section::File,
            key: None,
            kind,
        };
        let Value::Table(table) = entry.value else {
            let kind = match name.as_str() {
                "global" | "job" | "dest" => ProblemKind::NotATable(entry.value.type_name()),
                _ => ProblemKind::UnknownTable(name.clone()),
            };
            problems.push(file(kind));
            continue;
        };
        match name.as_str() {
            "global" => global = table,
            "job" => job_tables = table,
            "dest" => dest_tables = table,
            _ => problems.push(file(ProblemKind::UnknownTable(name.clone()))),
        }
    }

    let global = check_global(global, problems);
    let named_dests = parse_named_dests(dest_tables, known, problems);

    if job_tables.is_empty() && problems.is_empty() {
        problems.push(Problem {
            line: None,
            section: Section::File,
            key: None,
            kind: ProblemKind::NoJobs,
        });
    }
    let job_names: BTreeSet<String> = job_tables.iter().map(|(name, _)| name.clone()).collect();
    // Passive jobs named by a pull job, even one with problems of its own:
    // such a passive job is not reported as unpaired too.
    let claimed: BTreeSet<String> = job_tables
        .iter()
        .filter_map(|(_, entry)| match &entry.value {
            Value::Table(table) => table.iter().find_map(|(key, value)| match &value.value {
                Value::Text(source) if key == "pull_source" => Some(source.clone()),
                _ => None,
            }),
            _ => None,
        })
        .collect();
    let mut jobs: Vec<(JobSpec, usize)> = Vec::new();
    for (name, entry) in job_tables {
        let mut reporter = Reporter {
            problems,
            section: Section::Job(name.clone()),
        };
        if !is_valid_name(&name) {
            reporter.report(entry.line, None, ProblemKind::BadName(name.clone()));
            continue;
        }
        let Value::Table(table) = entry.value else {
            reporter.report(
                entry.line,
                None,
                ProblemKind::NotATable(entry.value.type_name()),
            );
            continue;
        };
        let context = JobContext {
            name: &name,
            header_line: entry.line,
            own: table.into_iter().collect(),
            global: &global,
            named_dests: &named_dests,
            known,
        };
        if let Some(spec) = context.build(&mut reporter) {
            jobs.push((spec, entry.line));
        }
    }
    pair_pull_jobs(&mut jobs, &job_names, &claimed, problems);
    jobs.into_iter().map(|(spec, _)| spec).collect()
}

fn check_global(
    global: Vec<(String, Entry)>,
    problems: &mut Vec<Problem>,
) -> BTreeMap<String, Entry> {
    let mut reporter = Reporter {
        problems,
        section: Section::Global,
    };
    let mut kept = BTreeMap::new();
    for (key, entry) in global {
        if RUNTIME_VARIABLES.contains(&key.as_str()) {
            reporter.report(entry.line, Some(&key), ProblemKind::ReservedName);
        } else if let Some(meant) = typo_of_a_key(&key) {
            reporter.report(entry.line, Some(&key), ProblemKind::LikelyTypo(meant));
        } else if let Value::Table(_) = entry.value {
            reporter.report(
                entry.line,
                Some(&key),
                ProblemKind::WrongType {
                    expected: "a string, number, boolean or list",
                    found: "a table",
                },
            );
        } else {
            kept.insert(key, entry);
        }
    }
    kept
}

/// A `[dest.NAME]` table: its plan and line.
struct NamedDest {
    plan: DestPlan,
}

fn parse_named_dests(
    tables: Vec<(String, Entry)>,
    known: &KnownNodes,
    problems: &mut Vec<Problem>,
) -> BTreeMap<String, NamedDest> {
    let names: BTreeSet<String> = tables.iter().map(|(name, _)| name.clone()).collect();
    let mut dests = BTreeMap::new();
    for (name, entry) in tables {
        let mut reporter = Reporter {
            problems,
            section: Section::Dest(name.clone()),
        };
        if !is_valid_name(&name) {
            reporter.report(entry.line, None, ProblemKind::BadName(name.clone()));
            continue;
        }
        if known.checks() && known.knows(&name) {
            reporter.report(entry.line, None, ProblemKind::NamedDestShadows);
            continue;
        }
        let Value::Table(table) = entry.value else {
            reporter.report(
                entry.line,
                None,
                ProblemKind::NotATable(entry.value.type_name()),
            );
            continue;
        };
        let mut nodes: Option<(String, usize)> = None;
        for (key, value) in table {
            if key != "nodes" {
                let suggestion = (edit_distance(&key, "nodes") <= 2).then(|| "nodes".to_owned());
                reporter.report(
                    value.line,
                    Some(&key),
                    match suggestion {
                        Some(_) => ProblemKind::UnknownKey(suggestion),
                        None => ProblemKind::BadValue {
                            value: key.clone(),
                            expected: "a key of a [dest] table (it has one key: nodes)",
                        },
                    },
                );
                continue;
            }
            match value.value {
                Value::Text(text) => nodes = Some((text, value.line)),
                other => reporter.report(
                    value.line,
                    Some("nodes"),
                    ProblemKind::WrongType {
                        expected: "a string",
                        found: other.type_name(),
                    },
                ),
            }
        }
        let Some((text, line)) = nodes else {
            if !reporter
                .problems
                .iter()
                .any(|p| p.section == reporter.section)
            {
                reporter.report(
                    entry.line,
                    Some("nodes"),
                    ProblemKind::Missing(
                        "the nodes or labels of this destination, e.g. nodes = \"n2/n3\"",
                    ),
                );
            }
            continue;
        };
        let plan = match DestPlan::parse(&text) {
            Ok(plan) => plan,
            Err(error) => {
                reporter.report(line, Some("nodes"), ProblemKind::DestGrammar(error));
                continue;
            }
        };
        let mut fine = true;
        for used in plan.names() {
            if names.contains(used) {
                reporter.report(
                    line,
                    Some("nodes"),
                    ProblemKind::NestedNamedDest(used.to_owned()),
                );
                fine = false;
            } else if known.checks() && !known.knows(used) {
                reporter.report(
                    line,
                    Some("nodes"),
                    ProblemKind::UnknownDestName {
                        name: used.to_owned(),
                        known: known.describe(),
                    },
                );
                fine = false;
            }
        }
        if fine {
            dests.insert(name, NamedDest { plan });
        }
    }
    dests
}

/// A job's table, with what it may refer to.
struct JobContext<'a> {
    name: &'a str,
    header_line: usize,
    own: BTreeMap<String, Entry>,
    global: &'a BTreeMap<String, Entry>,
    named_dests: &'a BTreeMap<String, NamedDest>,
    known: &'a KnownNodes,
}

/// A key's raw value and where it came from.
struct Setting<'a> {
    entry: &'a Entry,
    from_job: bool,
}

/// Returns `None` after reporting, so `?` reads as "give up on this key".
type Checked<T> = Option<T>;

impl JobContext<'_> {
    fn build(&self, reporter: &mut Reporter<'_>) -> Option<JobSpec> {
        let before = reporter.problems.len();
        // Unknown keys first: they are the commonest typo.
        for (key, entry) in &self.own {
            if !JOB_KEYS.iter().any(|rule| rule.name == key) {
                reporter.report(
                    entry.line,
                    Some(key),
                    ProblemKind::UnknownKey(closest_key(key)),
                );
            }
        }
        let direction = self.direction(reporter)?;
        let direction_word = direction_word(direction);
        for (key, entry) in &self.own {
            if let Some(rule) = JOB_KEYS.iter().find(|rule| rule.name == key) {
                let applies = match direction {
                    Direction::Push => rule.push,
                    Direction::Pull => rule.pull,
                    _ => rule.passive,
                };
                if !applies {
                    reporter.report(
                        entry.line,
                        Some(key),
                        ProblemKind::NotForDirection {
                            direction: direction_word,
                            why: why_not(key, direction),
                        },
                    );
                }
            }
        }
        if reporter.problems.len() > before {
            return None;
        }

        let mut spec = JobSpec {
            name: self.name.to_owned(),
            direction: direction as i32,
            copy_retries: DEFAULT_COPY_RETRIES,
            copy_retry_min_sleep_ms: DEFAULT_COPY_RETRY_MIN_SLEEP.as_millis() as u64,
            ..JobSpec::default()
        };
        let is = |key: &str| {
            JOB_KEYS.iter().any(|rule| {
                rule.name == key
                    && match direction {
                        Direction::Push => rule.push,
                        Direction::Pull => rule.pull,
                        _ => rule.passive,
                    }
            })
        };
        if is("type") {
            spec.r#type = SnapshotType::Full as i32;
            if let Some(text) = self.text(reporter, "type", false) {
                match text.as_str() {
                    "full" => spec.r#type = SnapshotType::Full as i32,
                    "sync" => spec.r#type = SnapshotType::Sync as i32,
                    _ => self.bad(reporter, "type", text, "a type (full or sync)"),
                }
            }
        }
        if is("client") {
            match self.text(reporter, "client", false) {
                None if self.setting("client").is_some() => {}
                Some(client) => {
                    if self.known.checks() && !self.known.ids.contains(&client) {
                        let line = self.line_of("client");
                        reporter.report(
                            line,
                            Some("client"),
                            ProblemKind::UnknownClient {
                                name: client.clone(),
                                known: self.known.describe(),
                            },
                        );
                    }
                    spec.client = client;
                }
                None => self.missing(
                    reporter,
                    "client",
                    "the node id of the client's agent (client = \"NODE\")",
                ),
            }
        }
        if is("include") {
            match self.list(reporter, "include", ListStyle::Whitespace) {
                Some(include) if !include.is_empty() => spec.include = include,
                Some(_) => self.bad(
                    reporter,
                    "include",
                    String::new(),
                    "a list of paths (it is empty)",
                ),
                None if self.setting("include").is_some() => {}
                None => self.missing(
                    reporter,
                    "include",
                    "the paths to back up (include = [\"/etc\"])",
                ),
            }
        }
        if is("exclude") {
            spec.exclude = self
                .list(reporter, "exclude", ListStyle::Whitespace)
                .unwrap_or_default();
        }
        if is("pre") {
            spec.pre = self.text(reporter, "pre", false).unwrap_or_default();
        }
        if is("post") {
            spec.post = self.text(reporter, "post", false).unwrap_or_default();
        }
        if is("instances") {
            self.instances(reporter, &mut spec);
        }
        if is("dest") {
            self.placement(reporter, &mut spec, direction_word);
        }
        if is("copy_retries")
            && let Some(retries) = self.integer(reporter, "copy_retries", 0)
        {
            spec.copy_retries = u32::try_from(retries).unwrap_or(u32::MAX);
        }
        if is("copy_retry_min_sleep")
            && let Some(sleep) = self.duration(reporter, "copy_retry_min_sleep")
        {
            spec.copy_retry_min_sleep_ms = sleep.as_millis() as u64;
        }
        if let Some(interval) = self.duration(reporter, "interval") {
            spec.interval_s = interval.as_secs();
        }
        if is("schedule")
            && let Some(schedule) = self.schedule(reporter)
        {
            // `check` holds a scheduled job to its most frequent tag unless
            // `interval` says otherwise.
            if self.setting("interval").is_none() {
                spec.interval_s = schedule.iter().map(|tag| tag.interval_s).min().unwrap_or(0);
            }
            spec.schedule = schedule;
        }
        if is("window")
            && let Some(window) = self.text(reporter, "window", false)
        {
            match crate::schedule::Window::parse(&window) {
                Ok(_) => spec.window = window,
                Err(_) => self.bad(
                    reporter,
                    "window",
                    window,
                    "hours of the day, \"01:00-05:00\"",
                ),
            }
        }
        if is("time_zone")
            && let Some(zone) = self.text(reporter, "time_zone", false)
        {
            match jiff::tz::TimeZone::get(&zone) {
                Ok(_) => spec.time_zone = zone,
                Err(_) => self.bad(
                    reporter,
                    "time_zone",
                    zone,
                    "a time zone name, e.g. \"Europe/Berlin\" or \"UTC\"",
                ),
            }
        }
        for (key, field) in [
            ("keep_last", &mut spec.keep_last),
            ("keep_hourly", &mut spec.keep_hourly),
            ("keep_daily", &mut spec.keep_daily),
            ("keep_weekly", &mut spec.keep_weekly),
            ("keep_monthly", &mut spec.keep_monthly),
            ("keep_yearly", &mut spec.keep_yearly),
        ] {
            if is(key)
                && let Some(count) = self.integer(reporter, key, 0)
            {
                *field = u32::try_from(count.min(100_000)).unwrap_or(100_000);
            }
        }
        let keeps_by_calendar = spec.keep_hourly
            + spec.keep_daily
            + spec.keep_weekly
            + spec.keep_monthly
            + spec.keep_yearly
            > 0;
        if !spec.time_zone.is_empty() && spec.schedule.is_empty() && !keeps_by_calendar {
            self.bad(
                reporter,
                "time_zone",
                String::new(),
                "a `schedule` or a calendar `keep_*` to go with it",
            );
        }
        if !spec.window.is_empty() && spec.schedule.is_empty() {
            self.bad(
                reporter,
                "window",
                String::new(),
                "a `schedule` to go with it (a window holds scheduled runs)",
            );
        }
        let dynamic = direction == Direction::Push;
        if is("master_host") {
            spec.master_host = self
                .text(reporter, "master_host", dynamic)
                .unwrap_or_default();
        }
        if is("master_instance") {
            spec.master_instance = self
                .text(reporter, "master_instance", dynamic)
                .unwrap_or_default();
        }
        if is("data_age")
            && let Some(age) = self.text(reporter, "data_age", dynamic)
        {
            spec.data_age = if age.starts_with('!') {
                age
            } else if let Ok(seconds) = age.parse::<u64>() {
                seconds.to_string()
            } else {
                match humantime::parse_duration(&age) {
                    Ok(duration) => duration.as_secs().to_string(),
                    Err(_) => {
                        self.bad(
                            reporter,
                            "data_age",
                            age,
                            "a data age (seconds, a duration like \"5m\", or a !command)",
                        );
                        String::new()
                    }
                }
            };
        }
        if is("tags") {
            spec.tags = self
                .list(reporter, "tags", ListStyle::SpacesAndCommas)
                .unwrap_or_default();
        }
        if is("one_file_system") {
            spec.one_file_system = self.boolean(reporter, "one_file_system").unwrap_or(false);
        }
        if is("pull_source") {
            match self.text(reporter, "pull_source", false) {
                Some(source) => spec.pull_source = source,
                None if self.setting("pull_source").is_some() => {}
                None => self.missing(
                    reporter,
                    "pull_source",
                    "the passive job this pull job fetches (pull_source = \"JOB\")",
                ),
            }
        }
        if is("bandwidth_limit")
            && let Some(rate) = self.bytes(reporter, "bandwidth_limit", BytesKind::PerSecond)
        {
            spec.bandwidth_limit_bytes_per_s = rate;
        }
        if is("quota")
            && let Some(quota) = self.bytes(reporter, "quota", BytesKind::Total)
        {
            spec.quota_bytes = quota;
        }
        if is("sync_to")
            && let Some(label) = self.text(reporter, "sync_to", false)
        {
            if crate::dest::is_valid_name(&label) {
                spec.sync_to = label;
            } else {
                self.bad(
                    reporter,
                    "sync_to",
                    label,
                    "a label: letters, digits, '-', '_', '.' and ':'",
                );
            }
        }
        if is("verify")
            && let Some(text) = self.text(reporter, "verify", false)
        {
            match parse_verify(&text) {
                Some(fraction) => spec.verify_fraction = fraction,
                None => self.bad(
                    reporter,
                    "verify",
                    text,
                    "\"none\", \"full\" or \"sample:N%\" with 0 < N <= 100",
                ),
            }
        }
        if is("min_retention")
            && let Some(window) = self.duration(reporter, "min_retention")
        {
            spec.min_retention_s = window.as_secs();
        }
        if is("pull_timeout") {
            spec.pull_timeout_s = self
                .duration(reporter, "pull_timeout")
                .unwrap_or(DEFAULT_PULL_TIMEOUT)
                .as_secs();
        }
        (reporter.problems.len() == before).then_some(spec)
    }

    fn setting(&self, key: &str) -> Option<Setting<'_>> {
        if let Some(entry) = self.own.get(key) {
            return Some(Setting {
                entry,
                from_job: true,
            });
        }
        // `dest` and `replicas` are one setting: a job that sets one of them
        // takes neither from [global].
        let placement = ["dest", "replicas"];
        if placement.contains(&key) && placement.iter().any(|other| self.own.contains_key(*other)) {
            return None;
        }
        self.global.get(key).map(|entry| Setting {
            entry,
            from_job: false,
        })
    }

    fn line_of(&self, key: &str) -> usize {
        self.setting(key)
            .map_or(self.header_line, |setting| setting.entry.line)
    }

    fn missing(&self, reporter: &mut Reporter<'_>, key: &str, what: &'static str) {
        reporter.report(self.header_line, Some(key), ProblemKind::Missing(what));
    }

    fn bad(&self, reporter: &mut Reporter<'_>, key: &str, value: String, expected: &'static str) {
        let line = self.line_of(key);
        reporter.report(line, Some(key), ProblemKind::BadValue { value, expected });
    }

    fn direction(&self, reporter: &mut Reporter<'_>) -> Checked<Direction> {
        let Some(text) = self.text(reporter, "direction", false) else {
            if self.setting("direction").is_none() {
                self.missing(
                    reporter,
                    "direction",
                    "direction = \"push\", \"pull\" or \"passive\"",
                );
            }
            return None;
        };
        match text.as_str() {
            "push" => Some(Direction::Push),
            "pull" => Some(Direction::Pull),
            "passive" => Some(Direction::Passive),
            _ => {
                self.bad(
                    reporter,
                    "direction",
                    text,
                    "a direction (push, pull or passive)",
                );
                None
            }
        }
    }

    /// A key's value as resolved text; `None` when absent or reported.
    fn text(
        &self,
        reporter: &mut Reporter<'_>,
        key: &str,
        command_allowed: bool,
    ) -> Checked<String> {
        let setting = self.setting(key)?;
        let line = setting.entry.line;
        let raw = match &setting.entry.value {
            Value::List(_) | Value::Table(_) => {
                reporter.report(
                    line,
                    Some(key),
                    ProblemKind::WrongType {
                        expected: "a string",
                        found: setting.entry.value.type_name(),
                    },
                );
                return None;
            }
            scalar => scalar.as_scalar_text()?,
        };
        let resolved = self.resolve(reporter, key, line, &raw)?;
        if resolved.starts_with('!') && !(command_allowed && DYNAMIC_KEYS.contains(&key)) {
            reporter.report(line, Some(key), ProblemKind::CommandNotAllowed);
            return None;
        }
        Some(resolved)
    }

    /// A list key: a TOML array of strings, or one string split per `style`.
    fn list(
        &self,
        reporter: &mut Reporter<'_>,
        key: &str,
        style: ListStyle,
    ) -> Checked<Vec<String>> {
        let setting = self.setting(key)?;
        let line = setting.entry.line;
        let mut items = Vec::new();
        match &setting.entry.value {
            Value::List(values) => {
                for value in values {
                    let Some(text) = value
                        .as_scalar_text()
                        .filter(|_| !matches!(value, Value::Bool(_)))
                    else {
                        reporter.report(
                            line,
                            Some(key),
                            ProblemKind::WrongType {
                                expected: "a list of strings",
                                found: value.type_name(),
                            },
                        );
                        return None;
                    };
                    items.push(self.resolve(reporter, key, line, &text)?);
                }
            }
            Value::Text(text) => {
                let resolved = self.resolve(reporter, key, line, text)?;
                items.extend(style.split(&resolved).map(str::to_owned));
            }
            other => {
                reporter.report(
                    line,
                    Some(key),
                    ProblemKind::WrongType {
                        expected: "a string or a list of strings",
                        found: other.type_name(),
                    },
                );
                return None;
            }
        }
        if items.iter().any(|item| item.starts_with('!')) {
            reporter.report(line, Some(key), ProblemKind::CommandNotAllowed);
            return None;
        }
        Some(items)
    }

    fn integer(&self, reporter: &mut Reporter<'_>, key: &str, minimum: i64) -> Checked<i64> {
        let setting = self.setting(key)?;
        let line = setting.entry.line;
        let number = match &setting.entry.value {
            Value::Integer(number) => *number,
            Value::Text(text) => {
                let resolved = self.resolve(reporter, key, line, text)?;
                match resolved.trim().parse::<i64>() {
                    Ok(number) => number,
                    Err(_) => {
                        reporter.report(
                            line,
                            Some(key),
                            ProblemKind::BadValue {
                                value: resolved,
                                expected: "a whole number",
                            },
                        );
                        return None;
                    }
                }
            }
            other => {
                reporter.report(
                    line,
                    Some(key),
                    ProblemKind::WrongType {
                        expected: "an integer",
                        found: other.type_name(),
                    },
                );
                return None;
            }
        };
        if number < minimum || number > i64::from(u32::MAX) {
            let expected = if minimum > 0 {
                "a whole number of at least 1"
            } else {
                "a whole number of at least 0"
            };
            reporter.report(
                line,
                Some(key),
                ProblemKind::BadValue {
                    value: number.to_string(),
                    expected,
                },
            );
            return None;
        }
        Some(number)
    }

    /// Bytes per second: a whole number, or a number and a unit (`k`, `M`,
    /// `G` and `T` in powers of 1000, `KiB`... in powers of 1024, an
    /// optional `B` and `/s`).
    fn bytes(&self, reporter: &mut Reporter<'_>, key: &str, kind: BytesKind) -> Checked<u64> {
        let setting = self.setting(key)?;
        let (expected, example, parse): (_, _, fn(&str) -> Option<u64>) = match kind {
            BytesKind::PerSecond => (
                "bytes per second (\"20MB/s\", \"512KiB\") or a whole number",
                "bytes per second, e.g. \"20MB/s\", \"512KiB\" or 1000000",
                parse_rate,
            ),
            BytesKind::Total => (
                "bytes (\"500GiB\", \"2TB\") or a whole number",
                "bytes, e.g. \"500GiB\", \"2TB\" or 1000000",
                parse_bytes,
            ),
        };
        let text = match &setting.entry.value {
            Value::Integer(bytes) if *bytes >= 0 => return Some(*bytes as u64),
            Value::Text(text) => self.resolve(reporter, key, setting.entry.line, text)?,
            other => {
                reporter.report(
                    setting.entry.line,
                    Some(key),
                    ProblemKind::WrongType {
                        expected,
                        found: other.type_name(),
                    },
                );
                return None;
            }
        };
        match parse(&text) {
            Some(bytes) => Some(bytes),
            None => {
                self.bad(reporter, key, text, example);
                None
            }
        }
    }

    /// `schedule = { TAG = { interval = "24h", keep = 7 }, ... }`.
    fn schedule(&self, reporter: &mut Reporter<'_>) -> Checked<Vec<ScheduleTag>> {
        const SHAPE: &str =
            "a table of tags: schedule = { daily = { interval = \"24h\", keep = 7 } }";
        let setting = self.setting("schedule")?;
        let line = setting.entry.line;
        let Value::Table(tags) = &setting.entry.value else {
            reporter.report(
                line,
                Some("schedule"),
                ProblemKind::WrongType {
                    expected: SHAPE,
                    found: setting.entry.value.type_name(),
                },
            );
            return None;
        };
        let mut schedule = Vec::new();
        let mut good = true;
        for (tag, entry) in tags {
            match schedule_tag(tag, entry, SHAPE) {
                Ok(tag) => schedule.push(tag),
                Err(problems) => {
                    good = false;
                    for (value, expected) in problems {
                        reporter.report(
                            entry.line,
                            Some("schedule"),
                            ProblemKind::BadValue { value, expected },
                        );
                    }
                }
            }
        }
        if schedule.is_empty() && good {
            reporter.report(
                line,
                Some("schedule"),
                ProblemKind::BadValue {
                    value: "{}".to_owned(),
                    expected: SHAPE,
                },
            );
        }
        (good && !schedule.is_empty()).then_some(schedule)
    }

    fn duration(&self, reporter: &mut Reporter<'_>, key: &str) -> Checked<Duration> {
        let setting = self.setting(key)?;
        let line = setting.entry.line;
        match &setting.entry.value {
            Value::Integer(seconds) if *seconds >= 0 => Some(Duration::from_secs(*seconds as u64)),
            Value::Text(text) => {
                let resolved = self.resolve(reporter, key, line, text)?;
                match humantime::parse_duration(resolved.trim()) {
                    Ok(duration) => Some(duration),
                    Err(error) => {
                        reporter.report(
                            line,
                            Some(key),
                            ProblemKind::BadDuration {
                                value: resolved,
                                reason: error.to_string(),
                            },
                        );
                        None
                    }
                }
            }
            other => {
                reporter.report(
                    line,
                    Some(key),
                    ProblemKind::WrongType {
                        expected: "a duration (\"30s\", \"5m\", \"24h\") or whole seconds",
                        found: other.type_name(),
                    },
                );
                None
            }
        }
    }

    fn boolean(&self, reporter: &mut Reporter<'_>, key: &str) -> Checked<bool> {
        let setting = self.setting(key)?;
        let line = setting.entry.line;
        match &setting.entry.value {
            Value::Bool(flag) => Some(*flag),
            Value::Text(text) => {
                let resolved = self.resolve(reporter, key, line, text)?;
                match resolved.as_str() {
                    "true" => Some(true),
                    "false" => Some(false),
                    _ => {
                        reporter.report(
                            line,
                            Some(key),
                            ProblemKind::BadValue {
                                value: resolved,
                                expected: "true or false",
                            },
                        );
                        None
                    }
                }
            }
            other => {
                reporter.report(
                    line,
                    Some(key),
                    ProblemKind::WrongType {
                        expected: "a boolean",
                        found: other.type_name(),
                    },
                );
                None
            }
        }
    }

    fn instances(&self, reporter: &mut Reporter<'_>, spec: &mut JobSpec) {
        let Some(setting) = self.setting("instances") else {
            return;
        };
        let line = setting.entry.line;
        if let Value::Text(text) = &setting.entry.value {
            let Some(resolved) = self.resolve(reporter, "instances", line, text) else {
                return;
            };
            if let Some(command) = resolved.strip_prefix('!') {
                spec.instances_command = command.trim().to_owned();
                return;
            }
        }
        let Some(instances) = self.list(reporter, "instances", ListStyle::Instances) else {
            return;
        };
        let mut unique = Vec::new();
        for instance in instances {
            if !is_valid_name(&instance) {
                reporter.report(line, Some("instances"), ProblemKind::BadInstance(instance));
                return;
            }
            if !unique.contains(&instance) {
                unique.push(instance);
            }
        }
        spec.instances = unique;
    }

    fn placement(&self, reporter: &mut Reporter<'_>, spec: &mut JobSpec, direction: &'static str) {
        let dest = self.setting("dest");
        let replicas = self.setting("replicas");
        match (&dest, &replicas) {
            (Some(dest), Some(replicas)) => {
                let line = if dest.from_job {
                    dest.entry.line
                } else {
                    replicas.entry.line
                };
                reporter.report(line, Some("dest"), ProblemKind::DestAndReplicas);
                return;
            }
            (None, None) => {
                reporter.report(self.header_line, None, ProblemKind::NoPlacement(direction));
                return;
            }
            _ => {}
        }
        let spread_by = self.text(reporter, "spread_by", false);
        if let Some(key) = &spread_by
            && (!crate::dest::is_valid_name(key) || key.contains(':'))
        {
            self.bad(
                reporter,
                "spread_by",
                key.clone(),
                "a label key: letters, digits, '-', '_' and '.' (nodes carry it as KEY:VALUE)",
            );
        }
        if replicas.is_some() {
            if let Some(count) = self.integer(reporter, "replicas", 1) {
                spec.replicas = u32::try_from(count).unwrap_or(u32::MAX);
            }
            spec.spread_by = spread_by.unwrap_or_default();
            return;
        }
        if let Some(key) = spread_by {
            self.bad(
                reporter,
                "spread_by",
                key,
                "to go with replicas = N (a dest names its nodes itself)",
            );
        }
        let line = self.line_of("dest");
        let Some(text) = self.text(reporter, "dest", false) else {
            return;
        };
        let plan = match DestPlan::parse(&text) {
            Ok(plan) => plan,
            Err(error) => {
                reporter.report(line, Some("dest"), ProblemKind::DestGrammar(error));
                return;
            }
        };
        let mut steps = Vec::new();
        for step in plan.steps {
            if let [name] = step.names.as_slice()
                && let Some(named) = self.named_dests.get(name)
            {
                steps.extend(named.plan.steps.iter().map(|inner| DestStep {
                    names: inner.names.clone(),
                    background: inner.background || step.background,
                }));
                continue;
            }
            let group = step.names.join("/");
            let mut names: Vec<String> = Vec::new();
            for name in &step.names {
                let expansion: Vec<String> = match self.named_dests.get(name) {
                    Some(named) => match named.plan.steps.as_slice() {
                        [single] if !single.background => single.names.clone(),
                        _ => {
                            reporter.report(
                                line,
                                Some("dest"),
                                ProblemKind::NamedDestInGroup {
                                    name: name.clone(),
                                    plan: named.plan.to_string(),
                                    group: group.clone(),
                                },
                            );
                            return;
                        }
                    },
                    None => {
                        if self.known.checks() && !self.known.knows(name) {
                            reporter.report(
                                line,
                                Some("dest"),
                                ProblemKind::UnknownDestName {
                                    name: name.clone(),
                                    known: self.known.describe(),
                                },
                            );
                            return;
                        }
                        vec![name.clone()]
                    }
                };
                for expanded in expansion {
                    if !names.contains(&expanded) {
                        names.push(expanded);
                    }
                }
            }
            steps.push(DestStep {
                names,
                background: step.background,
            });
        }
        spec.dest = DestPlan { steps }.to_string();
    }

    /// Resolves `$key` references in `raw` (the value of `key`).
    fn resolve(
        &self,
        reporter: &mut Reporter<'_>,
        key: &str,
        line: usize,
        raw: &str,
    ) -> Checked<String> {
        let mut chain = vec![key.to_owned()];
        match self.resolve_in(raw, &mut chain) {
            Ok(text) => Some(text),
            Err(kind) => {
                reporter.report(line, Some(key), kind);
                None
            }
        }
    }

    fn resolve_in(&self, raw: &str, chain: &mut Vec<String>) -> Result<String, ProblemKind> {
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                out.push_str("$$");
                rest = tail;
                continue;
            }
            let Some((name, written_len)) = reference_at(after) else {
                out.push('$');
                rest = after;
                continue;
            };
            let written = &rest[at..at + 1 + written_len];
            rest = &after[written_len..];
            if RUNTIME_VARIABLES.contains(&name) {
                out.push_str(written);
                continue;
            }
            let show_chain = |chain: &Vec<String>| chain.join(" -> ");
            if chain
                .iter()
                .skip(1)
                .any(|link| link.trim_start_matches('$') == name)
                || chain[0] == name
            {
                let mut cycle = show_chain(chain);
                cycle.push_str(&format!(" -> ${name}"));
                return Err(ProblemKind::CyclicReference(cycle));
            }
            let value = self
                .own
                .get(name)
                .or_else(|| self.global.get(name))
                .map(|entry| &entry.value);
            let Some(value) = value else {
                return Err(ProblemKind::MissingReference {
                    chain: show_chain(chain),
                    name: name.to_owned(),
                });
            };
            let Some(text) = value.as_scalar_text() else {
                return Err(ProblemKind::ReferenceToList {
                    chain: show_chain(chain),
                    name: name.to_owned(),
                });
            };
            if text.starts_with('!') {
                return Err(ProblemKind::ReferenceToCommand {
                    chain: show_chain(chain),
                    name: name.to_owned(),
                });
            }
            chain.push(format!("${name}"));
            let resolved = self.resolve_in(&text, chain)?;
            chain.pop();
            out.push_str(&resolved);
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// The name of a `$name` or `${name}` reference starting right after a `$`,
/// and the length of what was written after the `$`.
fn reference_at(after: &str) -> Option<(&str, usize)> {
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_';
    let is_part = |c: char| c.is_ascii_alphanumeric() || c == '_';
    if let Some(braced) = after.strip_prefix('{') {
        let end = braced.find('}')?;
        let name = &braced[..end];
        let mut chars = name.chars();
        return (chars.next().is_some_and(is_start) && chars.all(is_part))
            .then_some((name, end + 2));
    }
    if !after.chars().next().is_some_and(is_start) {
        return None;
    }
    let end = after.find(|c: char| !is_part(c)).unwrap_or(after.len());
    Some((&after[..end], end))
}

#[derive(Clone, Copy)]
enum ListStyle {
    /// Paths and globs: split at whitespace.
    Whitespace,
    /// Tags: split at spaces and commas.
    SpacesAndCommas,
    /// B1000's instance lists: spaces, commas and newlines.
    Instances,
}

impl ListStyle {
    fn split(self, text: &str) -> impl Iterator<Item = &str> {
        text.split(move |c: char| match self {
            ListStyle::Whitespace => c.is_whitespace(),
            ListStyle::SpacesAndCommas | ListStyle::Instances => c.is_whitespace() || c == ',',
        })
        .filter(|item| !item.is_empty())
    }
}

/// Splits the output of an `instances` command into instances (one per line;
/// spaces and commas separate too, as in B1000), checking each name.
pub fn parse_instances_output(output: &str) -> Result<Vec<String>, String> {
    let mut instances: Vec<String> = Vec::new();
    for instance in ListStyle::Instances.split(output) {
        if !is_valid_name(instance) {
            return Err(format!(
                "instance {instance:?} is not valid (letters, digits and `-_.`, starting with a letter or digit)"
            ));
        }
        if !instances.iter().any(|known| known == instance) {
            instances.push(instance.to_owned());
        }
    }
    Ok(instances)
}

fn direction_word(direction: Direction) -> &'static str {
    match direction {
        Direction::Push => "push",
        Direction::Pull => "pull",
        Direction::Passive => "passive",
        Direction::Unspecified => "unspecified",
    }
}

/// A job's `verify` as the fraction of chunks to read back: `none` 0,
/// `full` 1, `sample:N%` N/100 (0 < N <= 100); `None` for anything else.
pub fn parse_verify(text: &str) -> Option<f64> {
    match text.trim() {
        "none" => Some(0.0),
        "full" => Some(1.0),
        other => {
            let percent: f64 = other
                .strip_prefix("sample:")?
                .trim()
                .strip_suffix('%')?
                .trim()
                .parse()
                .ok()?;
            (percent > 0.0 && percent <= 100.0).then_some(percent / 100.0)
        }
    }
}

fn why_not(key: &str, direction: Direction) -> &'static str {
    match (direction, key) {
        (Direction::Passive, "include" | "exclude" | "type" | "tags" | "one_file_system") => {
            " (its pull job decides what to copy)"
        }
        (
            Direction::Passive,
            "dest"
            | "replicas"
            | "spread_by"
            | "sync_to"
            | "verify"
            | "copy_retries"
            | "copy_retry_min_sleep",
        ) => " (its pull job decides where the copies go)",
        (Direction::Pull, "client") => " (its client is the client of its pull_source)",
        (Direction::Pull, "pre" | "post") => " (the passive job on the client runs pre and post)",
        (Direction::Pull, "instances") => " (pull jobs have no instances)",
        (Direction::Push, "pull_source") => " (only pull jobs have a pull_source)",
        _ => "",
    }
}

fn closest_key(key: &str) -> Option<String> {
    JOB_KEYS
        .iter()
        .map(|rule| (edit_distance(key, rule.name), rule.name))
        .filter(|(distance, name)| *distance <= (name.len() / 3).max(2))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, name)| name.to_owned())
}

/// The job key a `[global]` name is a likely typo of. Stricter than
/// [`closest_key`]: a free variable may well be named like a key (`base`
/// is two letters from `dest`), so only one letter off a key of five or
/// more, or two off one of nine or more, counts.
fn typo_of_a_key(name: &str) -> Option<String> {
    if JOB_KEYS.iter().any(|rule| rule.name == name) {
        return None;
    }
    JOB_KEYS
        .iter()
        .map(|rule| (edit_distance(name, rule.name), rule.name))
        .filter(|(distance, key)| {
            (*distance == 1 && key.len() >= 5) || (*distance == 2 && key.len() >= 9)
        })
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, key)| key.to_owned())
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// Links pull jobs to their passive twins: the pull job takes the twin's
/// client; every passive job has exactly one pull job.
fn pair_pull_jobs(
    jobs: &mut [(JobSpec, usize)],
    all_names: &BTreeSet<String>,
    claimed: &BTreeSet<String>,
    problems: &mut Vec<Problem>,
) {
    let directions: BTreeMap<String, (Direction, String, usize)> = jobs
        .iter()
        .map(|(spec, line)| {
            (
                spec.name.clone(),
                (spec.direction(), spec.client.clone(), *line),
            )
        })
        .collect();
    let mut pulled_by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (spec, line) in jobs.iter_mut() {
        if spec.direction() != Direction::Pull {
            continue;
        }
        let problem = |kind| Problem {
            line: Some(*line),
            section: Section::Job(spec.name.clone()),
            key: Some("pull_source".into()),
            kind,
        };
        match directions.get(&spec.pull_source) {
            // A twin that is in the file but broken has its own problems.
            None if all_names.contains(&spec.pull_source) => {}
            None => problems.push(problem(ProblemKind::UnknownPullSource(
                spec.pull_source.clone(),
            ))),
            Some((Direction::Passive, client, _)) => {
                spec.client = client.clone();
                pulled_by
                    .entry(spec.pull_source.clone())
                    .or_default()
                    .push(spec.name.clone());
            }
            Some((other, _, _)) => problems.push(problem(ProblemKind::PullSourceNotPassive {
                name: spec.pull_source.clone(),
                direction: direction_word(*other),
            })),
        }
    }
    for (name, (direction, _, line)) in &directions {
        if *direction != Direction::Passive {
            continue;
        }
        let kind = match pulled_by.get(name).map(Vec::as_slice) {
            None | Some([]) if claimed.contains(name) => continue,
            None | Some([]) => ProblemKind::PassiveWithoutPull,
            Some([_]) => continue,
            Some(several) => ProblemKind::PassivePulledTwice(several.join(", ")),
        };
        problems.push(Problem {
            line: Some(*line),
            section: Section::Job(name.clone()),
            key: None,
            kind,
        });
    }
}

/// One thing to run: a job, and the instance when it is known now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    /// The job's name.
    pub job: String,
    /// The instance; `None` for a job without instances, or for every
    /// instance its `instances` command will print at run time.
    pub instance: Option<String>,
}

/// A command-line selection that names nothing runnable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// No such job.
    #[error("no job {name:?}{}", .suggestion.as_ref().map(|s| format!(" (did you mean {s:?}?)")).unwrap_or_default())]
    UnknownJob {
        /// The name given.
        name: String,
        /// The closest job name.
        suggestion: Option<String>,
    },
    /// The job has no instances.
    #[error("job {job:?} has no instances, so {given:?} names nothing (select {job:?})")]
    NoInstances {
        /// The job.
        job: String,
        /// The argument.
        given: String,
    },
    /// The job's instance list lacks it.
    #[error("job {job:?} has no instance {instance:?} (it has: {known})")]
    UnknownInstance {
        /// The job.
        job: String,
        /// The instance given.
        instance: String,
        /// The job's instances.
        known: String,
    },
    /// `JOB/` or `/x`.
    #[error("{0:?} is not JOB or JOB/INSTANCE")]
    Malformed(String),
}

/// B1000's command line: no argument runs every job (each of its instances);
/// `JOB` runs that job (each instance); `JOB/INSTANCE` runs one instance.
/// Passive jobs run with their pull twin: selecting one selects its pull job,
/// and "all" skips them. Duplicates are dropped, first mention first.
pub fn select(jobs: &[JobSpec], args: &[&str]) -> Result<Vec<Selected>, SelectError> {
    let mut chosen: Vec<Selected> = Vec::new();
    let mut add = |selected: Selected| {
        if !chosen.contains(&selected) {
            chosen.push(selected);
        }
    };
    let every_instance = |spec: &JobSpec| -> Vec<Selected> {
        if spec.instances.is_empty() {
            vec![Selected {
                job: spec.name.clone(),
                instance: None,
            }]
        } else {
            spec.instances
                .iter()
                .map(|instance| Selected {
                    job: spec.name.clone(),
                    instance: Some(instance.clone()),
                })
                .collect()
        }
    };
    if args.is_empty() {
        for spec in jobs
            .iter()
            .filter(|spec| spec.direction() != Direction::Passive)
        {
            every_instance(spec).into_iter().for_each(&mut add);
        }
        return Ok(chosen);
    }
    for arg in args {
        let (name, instance) = match arg.split_once('/') {
            Some((name, instance)) if !name.is_empty() && !instance.is_empty() => {
                (name, Some(instance))
            }
            Some(_) => return Err(SelectError::Malformed((*arg).to_owned())),
            None if arg.is_empty() => return Err(SelectError::Malformed(String::new())),
            None => (*arg, None),
        };
        let Some(spec) = jobs.iter().find(|spec| spec.name == name) else {
            let suggestion = jobs
                .iter()
                .map(|spec| (edit_distance(name, &spec.name), &spec.name))
                .filter(|(distance, job)| *distance <= (job.len() / 3).max(2))
                .min_by_key(|(distance, _)| *distance)
                .map(|(_, job)| job.clone());
            return Err(SelectError::UnknownJob {
                name: name.to_owned(),
                suggestion,
            });
        };
        let Some(spec) = runnable(jobs, spec) else {
            // Validated files always pair passive jobs; an unpaired one has
            // nothing that could run it.
            return Err(SelectError::UnknownJob {
                name: name.to_owned(),
                suggestion: None,
            });
        };
        match instance {
            None => every_instance(spec).into_iter().for_each(&mut add),
            Some(instance) => {
                if spec.instances.is_empty() && spec.instances_command.is_empty() {
                    return Err(SelectError::NoInstances {
                        job: spec.name.clone(),
                        given: (*arg).to_owned(),
                    });
                }
                if !spec.instances.is_empty()
                    && !spec.instances.iter().any(|known| known == instance)
                {
                    return Err(SelectError::UnknownInstance {
                        job: spec.name.clone(),
                        instance: instance.to_owned(),
                        known: spec.instances.join(", "),
                    });
                }
                add(Selected {
                    job: spec.name.clone(),
                    instance: Some(instance.to_owned()),
                });
            }
        }
    }
    Ok(chosen)
}

/// The job that runs when `spec` is selected: itself, or a passive job's
/// pull twin.
fn runnable<'j>(jobs: &'j [JobSpec], spec: &'j JobSpec) -> Option<&'j JobSpec> {
    if spec.direction() == Direction::Passive {
        jobs.iter()
            .find(|other| other.direction() == Direction::Pull && other.pull_source == spec.name)
    } else {
        Some(spec)
    }
}

/// The job as one run sees it: `$instance`, `$host` and `$start_time`
/// (`%Y-%m-%d-%H-%M-%S`, UTC) substituted, and `$$` turned into `$`, in every
/// command and path. `$instance` is empty for a run without one.
pub fn expand_runtime(
    spec: &JobSpec,
    instance: Option<&str>,
    host: &str,
    start_time_ms: i64,
) -> JobSpec {
    let start_time = CivilTime::from_unix_ms(start_time_ms).start_time_stamp();
    let values = [
        ("instance", instance.unwrap_or("")),
        ("host", host),
        ("start_time", start_time.as_str()),
    ];
    let expand = |text: &str| -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                out.push('$');
                rest = tail;
                continue;
            }
            match reference_at(after) {
                Some((name, length)) => match values.iter().find(|(known, _)| *known == name) {
                    Some((_, value)) => {
                        out.push_str(value);
                        rest = &after[length..];
                    }
                    None => {
                        out.push('$');
                        rest = after;
                    }
                },
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    };
    let all = |items: &[String]| items.iter().map(|item| expand(item)).collect::<Vec<_>>();
    JobSpec {
        include: all(&spec.include),
        exclude: all(&spec.exclude),
        pre: expand(&spec.pre),
        post: expand(&spec.post),
        instances_command: expand(&spec.instances_command),
        master_host: expand(&spec.master_host),
        master_instance: expand(&spec.master_instance),
        data_age: expand(&spec.data_age),
        tags: all(&spec.tags),
        ..spec.clone()
    }
}

#[cfg(test)]
#[path = "jobfile_tests.rs"]
mod tests;
