//! The coordinator's status page: what an operator sees in a browser, on a
//! phone too, without the CLI. Jobs with their check verdict as a colour and
//! their last and next runs; the copies running now with their progress;
//! nodes with their state and free space; the newest snapshots with their
//! copies and whether they are verified; recent failures with their
//! reasons.
//!
//! This module owns gathering that view from the engine
//! ([`StatusView::gather`]), rendering it as HTML ([`render_page`],
//! [`render_body`]) and the two routes that answer with it ([`routes`]). It
//! never changes any state, and it never decides who may see the page: the
//! HTTP server that mounts [`routes`] puts the monitor role's credential
//! check in front of them. The page is server-rendered (maud escapes every
//! value it is given); a few lines of plain JavaScript fetch the body again
//! every few seconds, and without JavaScript the page is whole as served.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use fabric_proto::v1::{
    CheckStatus, CopyState, ListCatalogRequest, ListRunsRequest, NodeRole, NodeState, RunState,
    SnapshotState,
};
use fabric_proto::{bytes_word, enum_word};

use crate::engine::{Engine, EngineError};

/// How many of the newest snapshots the page lists.
pub const SNAPSHOTS_SHOWN: usize = 30;
/// How many recent failed runs the page lists.
pub const FAILURES_SHOWN: usize = 15;
/// How many runs, newest first, are looked at for the ones in flight.
const RUNS_LOOKED_AT: u32 = 500;
/// How often the page fetches its body again, milliseconds.
pub const REFRESH_MS: u64 = 5_000;

/// A job's verdict, as `fabricctl check` gives it: its colour on the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verdict {
    /// Fresh: green.
    Ok,
    /// Yellow.
    Warning,
    /// Red.
    Critical,
    /// Grey: nothing to judge yet.
    #[default]
    Unknown,
}

impl Verdict {
    fn of(status: CheckStatus) -> Self {
        match status {
            CheckStatus::Ok => Self::Ok,
            CheckStatus::Warning => Self::Warning,
            CheckStatus::Critical => Self::Critical,
            CheckStatus::Unknown => Self::Unknown,
        }
    }

    /// The word shown, and the CSS class that colours it.
    pub fn word(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warning => "warning",
            Self::Critical => "critical",
            Self::Unknown => "unknown",
        }
    }
}

/// One job's line.
#[derive(Debug, Clone, PartialEq)]
pub struct JobLine {
    /// Its name.
    pub name: String,
    /// The check's verdict.
    pub verdict: Verdict,
    /// The check's message.
    pub message: String,
    /// Its newest run: short id and state word.
    pub last_run: Option<(String, String)>,
    /// The next scheduled run (ms since the epoch, 0: none) and its tags.
    pub next_run_ms: i64,
    /// The tags the next run carries.
    pub next_run_tags: Vec<String>,
    /// Its schedule is held.
    pub paused: bool,
}

/// A copy in flight, with how far it got.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningCopy {
    /// The run's short id.
    pub run: String,
    /// Its job (and instance, after a slash).
    pub job: String,
    /// The run's state word (pre, copying, post...).
    pub run_state: String,
    /// The client it reads.
    pub client: String,
    /// The node it goes to (empty before the copies are planned).
    pub node: String,
    /// The copy's state word.
    pub copy_state: String,
    /// Files read so far.
    pub files: u64,
    /// Bytes read so far.
    pub bytes_read: u64,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// The path being read.
    pub current_path: String,
}

/// A node's line.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeLine {
    /// Its id.
    pub id: String,
    /// online, lost or stopped.
    pub state: String,
    /// storage, agent or both.
    pub roles: String,
    /// Free and total bytes (0 for an agent).
    pub free_bytes: u64,
    /// Total bytes.
    pub capacity_bytes: u64,
    /// Why it refuses writes (empty: it accepts them).
    pub refuses_writes: String,
    /// How far its drain got (empty: not draining).
    pub drain: String,
    /// Its last heartbeat, ms since the epoch.
    pub last_heartbeat_ms: i64,
}

/// A snapshot's line.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotLine {
    /// Its name.
    pub name: String,
    /// Its job.
    pub job: String,
    /// When it was made, ms since the epoch.
    pub time_ms: i64,
    /// Logical size.
    pub size_bytes: u64,
    /// complete or verified.
    pub state: String,
    /// Copies that count, and the copies kept of it.
    pub healthy: u32,
    /// The replica target.
    pub target: u32,
    /// Its copies: node, and what is wrong with it (empty: nothing).
    pub copies: Vec<(String, String)>,
}

/// A failed run's line.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureLine {
    /// The run's short id.
    pub run: String,
    /// Its job.
    pub job: String,
    /// When it ended, ms since the epoch.
    pub ended_ms: i64,
    /// Why.
    pub reason: String,
}

/// Everything the page shows, as of `generated_ms`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StatusView {
    /// When it was gathered, ms since the epoch.
    pub generated_ms: i64,
    /// Every job, by name.
    pub jobs: Vec<JobLine>,
    /// Copies of runs still going.
    pub running: Vec<RunningCopy>,
    /// Every node, by id.
    pub nodes: Vec<NodeLine>,
    /// The newest snapshots, newest first.
    pub snapshots: Vec<SnapshotLine>,
    /// Snapshots in the catalogue in all.
    pub snapshots_total: usize,
    /// The newest failed runs, newest first.
    pub failures: Vec<FailureLine>,
}

fn run_state_word(state: RunState) -> String {
    enum_word(state.as_str_name())
}

fn job_and_instance(job: &str, instance: &str) -> String {
    if instance.is_empty() {
        job.to_owned()
    } else {
        format!("{job}/{instance}")
    }
}

impl StatusView {
    /// The view of `engine` as it is now.
    pub async fn gather(engine: &Engine, now_ms: i64) -> Result<Self, EngineError> {
        let recent = engine
            .list_runs(&ListRunsRequest {
                limit: RUNS_LOOKED_AT,
                ..Default::default()
            })
            .await?;
        // A job's last run names its id in full; the page prints the short
        // id the run listing has, where the run is among the recent ones.
        let short_ids: std::collections::HashMap<&str, &str> = recent
            .iter()
            .filter(|run| !run.short_id.is_empty())
            .map(|run| (run.id.as_str(), run.short_id.as_str()))
            .collect();
        let checks = engine.check(&[]).await?.jobs;
        let mut jobs: Vec<JobLine> = engine
            .jobs()
            .await?
            .into_iter()
            .filter_map(|job| {
                let spec = job.spec.as_ref()?;
                let check = checks.iter().find(|check| check.job == spec.name);
                Some(JobLine {
                    name: spec.name.clone(),
                    verdict: check.map_or(Verdict::Unknown, |check| Verdict::of(check.status())),
                    message: check.map(|check| check.message.clone()).unwrap_or_default(),
                    last_run: job.last_run.as_ref().map(|run| {
                        let id = short_ids.get(run.id.as_str()).copied().unwrap_or(&run.id);
                        (id.to_owned(), run_state_word(run.state()))
                    }),
                    next_run_ms: job.next_run_ms,
                    next_run_tags: job.next_run_tags.clone(),
                    paused: job.paused,
                })
            })
            .collect();
        jobs.sort_by(|a, b| a.name.cmp(&b.name));

        let mut running = Vec::new();
        let mut failures = Vec::new();
        for run in &recent {
            match run.state() {
                RunState::Done | RunState::Cancelled | RunState::Unspecified => {}
                RunState::Failed => {
                    if failures.len() < FAILURES_SHOWN {
                        failures.push(FailureLine {
                            run: run.short_id.clone(),
                            job: job_and_instance(&run.job, &run.instance),
                            ended_ms: run.ended_ms,
                            reason: run.reason.clone(),
                        });
                    }
                }
                _ => {
                    let line = |node: &str, copy_state: String| RunningCopy {
                        run: run.short_id.clone(),
                        job: job_and_instance(&run.job, &run.instance),
                        run_state: run_state_word(run.state()),
                        client: run.client.clone(),
                        node: node.to_owned(),
                        copy_state,
                        files: 0,
                        bytes_read: 0,
                        bytes_sent: 0,
                        current_path: String::new(),
                    };
                    if run.copies.is_empty() {
                        running.push(line("", String::new()));
                    }
                    for copy in &run.copies {
                        if matches!(copy.state(), CopyState::Done | CopyState::Failed) {
                            continue;
                        }
                        let mut entry = line(&copy.node, enum_word(copy.state().as_str_name()));
                        if let Some(progress) = &copy.progress {
                            entry.files = progress.files;
                            entry.bytes_read = progress.bytes_read;
                            entry.bytes_sent = progress.bytes_sent;
                            entry.current_path = progress.current_path.clone();
                        }
                        running.push(entry);
                    }
                }
            }
        }

        let mut nodes: Vec<NodeLine> = engine
            .nodes()
            .await
            .into_iter()
            .map(|node| {
                let info = node.info.clone().unwrap_or_default();
                let state = if node.state() == NodeState::Lost && node.stopped {
                    "stopped".to_owned()
                } else {
                    enum_word(node.state().as_str_name())
                };
                let roles = info
                    .roles()
                    .map(|role| match role {
                        NodeRole::Storage => "storage",
                        NodeRole::Agent => "agent",
                        NodeRole::Unspecified => "?",
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                NodeLine {
                    id: info.id,
                    state,
                    roles,
                    free_bytes: info.free_bytes,
                    capacity_bytes: info.capacity_bytes,
                    refuses_writes: node.refuses_writes.clone(),
                    drain: node.drain.clone(),
                    last_heartbeat_ms: node.last_heartbeat_ms,
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));

        let catalogue = engine.catalog(&ListCatalogRequest::default()).await?;
        let snapshots_total = catalogue.len();
        let snapshots = catalogue
            .into_iter()
            .rev()
            .take(SNAPSHOTS_SHOWN)
            .filter_map(|entry| {
                let snapshot = entry.snapshot.as_ref()?;
                Some(SnapshotLine {
                    name: snapshot.name.clone(),
                    job: snapshot.job.clone(),
                    time_ms: snapshot.end_time_ms,
                    size_bytes: snapshot.stats.as_ref().map_or(0, |stats| stats.total_bytes),
                    state: match snapshot.state() {
                        SnapshotState::Verified => "verified".to_owned(),
                        other => enum_word(other.as_str_name()),
                    },
                    healthy: entry.healthy_copies,
                    target: entry.replica_target,
                    copies: entry
                        .copies
                        .iter()
                        .map(|copy| {
                            let problem = if copy.damage.is_empty() {
                                copy.problem.clone()
                            } else {
                                copy.damage.clone()
                            };
                            (copy.node.clone(), problem)
                        })
                        .collect(),
                })
            })
            .collect();

        Ok(Self {
            generated_ms: now_ms,
            jobs,
            running,
            nodes,
            snapshots,
            snapshots_total,
            failures,
        })
    }
}

/// A time as the page shows it: UTC, to the second.
fn time_word(ms: i64) -> String {
    if ms <= 0 {
        return "-".to_owned();
    }
    jiff::Timestamp::from_millisecond(ms)
        .map(|at| at.strftime("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|_| "-".to_owned())
}

const STYLE: &str = "
body{font-family:system-ui,sans-serif;margin:0;padding:0 .75rem 2rem;color:#1b1f24;background:#f6f7f9}
h1{font-size:1.25rem;margin:.75rem 0 .25rem}
h2{font-size:1.05rem;margin:1.25rem 0 .4rem}
p.meta{margin:0;color:#57606a;font-size:.85rem}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;width:100%;background:#fff;font-size:.9rem}
th,td{padding:.3rem .5rem;border-bottom:1px solid #e1e4e8;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600;white-space:nowrap}
td.num{text-align:right;white-space:nowrap}
.badge{display:inline-block;padding:0 .45rem;border-radius:.6rem;font-size:.8rem;font-weight:600;color:#fff}
.ok{background:#1f883d}.warning{background:#bf8700}.critical{background:#cf222e}.unknown{background:#6e7781}
.lost{background:#cf222e}.online{background:#1f883d}.stopped{background:#6e7781}.refusing{background:#bf8700}
.why{color:#57606a;font-size:.85rem}
.stale{display:none;background:#fff8c5;padding:.3rem .5rem;margin-top:.5rem}
@media (max-width:600px){th,td{padding:.25rem .3rem;font-size:.82rem}}
";

/// The whole page: head, style, the body of [`render_body`], and the few
/// lines of JavaScript that fetch the body again every [`REFRESH_MS`]
/// (counting the refreshes in `main`'s `data-refreshes`, and showing a
/// banner while the coordinator does not answer).
pub fn render_page(view: &StatusView) -> Markup {
    let script = format!(
        "(function(){{var m=document.getElementById('status'),s=document.getElementById('stale'),n=0,\
         u=new URL('status/body',location.href);u.username='';u.password='';\
         function again(){{fetch(u,{{cache:'no-store',credentials:'same-origin'}})\
         .then(function(r){{if(!r.ok)throw r.status;return r.text();}})\
         .then(function(t){{m.innerHTML=t;s.style.display='none';m.setAttribute('data-refreshes',++n);}})\
         .catch(function(){{s.style.display='block';}});}}\
         setInterval(again,{REFRESH_MS});}})();"
    );
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "fabric status" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { "fabric status" }
                div id="stale" class="stale" {
                    "The coordinator did not answer the last refresh: what you see may be old."
                }
                main id="status" { (render_body(view)) }
                script { (PreEscaped(script)) }
            }
        }
    }
}

/// The page's body: what the refresh replaces.
pub fn render_body(view: &StatusView) -> Markup {
    html! {
        p.meta { "As of " (time_word(view.generated_ms)) "; refreshes every " (REFRESH_MS / 1000) " s." }
        h2 { "Jobs (" (view.jobs.len()) ")" }
        @if view.jobs.is_empty() {
            p { "No jobs yet: fabricctl job submit -f jobs.toml" }
        } @else {
            div.scroll { table {
                thead { tr { th { "job" } th { "check" } th { "last run" } th { "next run" } } }
                tbody {
                    @for job in &view.jobs {
                        tr id={ "job-" (job.name) } {
                            td { (job.name) }
                            td {
                                span class={ "badge " (job.verdict.word()) } { (job.verdict.word()) }
                                " " span.why { (job.message) }
                            }
                            td {
                                @match &job.last_run {
                                    Some((id, state)) => { (id) " " (state) }
                                    None => { "-" }
                                }
                            }
                            td {
                                @if job.paused { "paused" }
                                @else if job.next_run_ms > 0 {
                                    (time_word(job.next_run_ms))
                                    @if !job.next_run_tags.is_empty() { " " span.why { (job.next_run_tags.join(",")) } }
                                } @else { "-" }
                            }
                        }
                    }
                }
            } }
        }
        h2 { "Running (" (view.running.len()) ")" }
        @if view.running.is_empty() {
            p { "Nothing is running." }
        } @else {
            div.scroll { table {
                thead { tr { th { "run" } th { "job" } th { "state" } th { "to" } th { "files" } th { "read" } th { "sent" } th { "now reading" } } }
                tbody {
                    @for copy in &view.running {
                        tr {
                            td { (copy.run) }
                            td { (copy.job) span.why { " on " (copy.client) } }
                            td { (copy.run_state) @if !copy.copy_state.is_empty() { span.why { " (" (copy.copy_state) ")" } } }
                            td { @if copy.node.is_empty() { "-" } @else { (copy.node) } }
                            td.num { (copy.files) }
                            td.num { (bytes_word(copy.bytes_read)) }
                            td.num { (bytes_word(copy.bytes_sent)) }
                            td.why { (copy.current_path) }
                        }
                    }
                }
            } }
        }
        h2 { "Nodes (" (view.nodes.len()) ")" }
        @if view.nodes.is_empty() {
            p { "No node has registered." }
        } @else {
            div.scroll { table {
                thead { tr { th { "node" } th { "state" } th { "roles" } th { "free" } th { "last heartbeat" } } }
                tbody {
                    @for node in &view.nodes {
                        tr id={ "node-" (node.id) } {
                            td { (node.id) }
                            td {
                                span class={ "badge " (node.state) } { (node.state) }
                                @if !node.refuses_writes.is_empty() {
                                    " " span.badge.refusing { "refusing writes" }
                                    " " span.why { (node.refuses_writes) }
                                }
                                @if !node.drain.is_empty() { " " span.why { "draining: " (node.drain) } }
                            }
                            td { (node.roles) }
                            td.num {
                                @if node.capacity_bytes > 0 {
                                    (bytes_word(node.free_bytes)) " of " (bytes_word(node.capacity_bytes))
                                } @else { "-" }
                            }
                            td { (time_word(node.last_heartbeat_ms)) }
                        }
                    }
                }
            } }
        }
        h2 { "Snapshots (newest " (view.snapshots.len()) " of " (view.snapshots_total) ")" }
        @if view.snapshots.is_empty() {
            p { "No snapshots yet." }
        } @else {
            div.scroll { table {
                thead { tr { th { "snapshot" } th { "made" } th { "size" } th { "state" } th { "copies" } } }
                tbody {
                    @for snapshot in &view.snapshots {
                        tr {
                            td { (snapshot.name) }
                            td { (time_word(snapshot.time_ms)) }
                            td.num { (bytes_word(snapshot.size_bytes)) }
                            td { (snapshot.state) }
                            td {
                                @let short = snapshot.healthy < snapshot.target;
                                span class={ "badge " (if short { "critical" } else { "ok" }) } {
                                    (snapshot.healthy) "/" (snapshot.target)
                                }
                                @for (node, problem) in &snapshot.copies {
                                    " " (node)
                                    @if !problem.is_empty() { span.why { " (" (problem) ")" } }
                                }
                            }
                        }
                    }
                }
            } }
        }
        h2 { "Recent failures (" (view.failures.len()) ")" }
        @if view.failures.is_empty() {
            p { "No failed runs." }
        } @else {
            div.scroll { table {
                thead { tr { th { "run" } th { "job" } th { "ended" } th { "why" } } }
                tbody {
                    @for failure in &view.failures {
                        tr {
                            td { (failure.run) }
                            td { (failure.job) }
                            td { (time_word(failure.ended_ms)) }
                            td.why { (failure.reason) }
                        }
                    }
                }
            } }
        }
    }
}

/// `GET /` (the page) and `GET /status/body` (what its refresh fetches),
/// answered from `engine`. Whoever mounts them authenticates the caller
/// first.
pub fn routes(engine: Arc<Engine>) -> axum::Router {
    axum::Router::new()
        .route("/", axum::routing::get(page))
        .route("/status/body", axum::routing::get(body))
        .with_state(engine)
}

async fn gathered(engine: &Engine) -> Result<StatusView, Response> {
    StatusView::gather(engine, crate::engine::now_ms())
        .await
        .map_err(|error| {
            tracing::warn!(%error, "the status page could not be gathered");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the coordinator cannot read its state: {error}"),
            )
                .into_response()
        })
}

fn no_store(markup: Markup) -> Response {
    let mut response = Html(markup.into_string()).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn page(State(engine): State<Arc<Engine>>) -> Response {
    match gathered(&engine).await {
        Ok(view) => no_store(render_page(&view)),
        Err(response) => response,
    }
}

async fn body(State(engine): State<Arc<Engine>>) -> Response {
    match gathered(&engine).await {
        Ok(view) => no_store(render_body(&view)),
        Err(response) => response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> StatusView {
        StatusView {
            generated_ms: 1_780_000_000_000,
            jobs: vec![
                JobLine {
                    name: "etc".into(),
                    verdict: Verdict::Ok,
                    message: "newest good snapshot 2h ago".into(),
                    last_run: Some(("01a24ee6".into(), "done".into())),
                    next_run_ms: 1_780_000_600_000,
                    next_run_tags: vec!["daily".into()],
                    paused: false,
                },
                JobLine {
                    name: "<db>".into(),
                    verdict: Verdict::Critical,
                    message: "no good snapshot for 3d".into(),
                    last_run: None,
                    next_run_ms: 0,
                    next_run_tags: vec![],
                    paused: true,
                },
            ],
            running: vec![RunningCopy {
                run: "01a24ef0".into(),
                job: "home".into(),
                run_state: "copying".into(),
                client: "web1".into(),
                node: "n2".into(),
                copy_state: "running".into(),
                files: 12,
                bytes_read: 3 << 20,
                bytes_sent: 1 << 20,
                current_path: "/home/a".into(),
            }],
            nodes: vec![NodeLine {
                id: "n1".into(),
                state: "online".into(),
                roles: "storage".into(),
                free_bytes: 1 << 30,
                capacity_bytes: 4 << 30,
                refuses_writes: "free space below min_free".into(),
                drain: String::new(),
                last_heartbeat_ms: 1_780_000_000_000,
            }],
            snapshots: vec![SnapshotLine {
                name: "etc/web1/2026-12-07T05:00:00Z".into(),
                job: "etc".into(),
                time_ms: 1_780_000_000_000,
                size_bytes: 2048,
                state: "verified".into(),
                healthy: 1,
                target: 2,
                copies: vec![("n1".into(), String::new()), ("n2".into(), "lost".into())],
            }],
            snapshots_total: 7,
            failures: vec![FailureLine {
                run: "01a24e00".into(),
                job: "db".into(),
                ended_ms: 1_780_000_000_000,
                reason: "the client web1 cannot read what the job includes".into(),
            }],
        }
    }

    #[test]
    fn the_page_shows_each_part_with_its_colours_and_escapes_every_value() {
        let page = render_page(&view()).into_string();
        for expected in [
            "<!DOCTYPE html>",
            "name=\"viewport\"",
            "id=\"job-etc\"",
            "badge ok",
            "badge critical",
            "&lt;db&gt;",
            "paused",
            "daily",
            "01a24ef0",
            "3.0 MiB",
            "/home/a",
            "refusing writes",
            "free space below min_free",
            "1.0 GiB of 4.0 GiB",
            "etc/web1/2026-12-07T05:00:00Z",
            "verified",
            "1/2",
            "n2<span class=\"why\"> (lost)</span>",
            "newest 1 of 7",
            "cannot read what the job includes",
            "status/body",
        ] {
            assert!(page.contains(expected), "{expected:?} missing from\n{page}");
        }
        assert!(!page.contains("<db>"), "a value went out unescaped");
    }

    #[test]
    fn an_empty_fabric_says_what_is_missing_rather_than_showing_empty_tables() {
        let body = render_body(&StatusView::default()).into_string();
        assert!(body.contains("No jobs yet"), "{body}");
        assert!(body.contains("Nothing is running."), "{body}");
        assert!(body.contains("No node has registered."), "{body}");
        assert!(body.contains("No snapshots yet."), "{body}");
        assert!(body.contains("No failed runs."), "{body}");
        assert!(!body.contains("<table"), "{body}");
    }
}
