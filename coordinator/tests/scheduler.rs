//! The scheduler in virtual time: a coordinator's engine (real state on
//! disk, no nodes) ticked through a month, its clock a parameter.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use fabric_coordinator::engine::{Engine, Settings};
use fabric_coordinator::state::Store;
use fabric_proto::v1::{ListRunsRequest, Run, SubmitJobsRequest};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

fn engine(dir: &std::path::Path, queue_timeout: Duration) -> Engine {
    engine_with(dir, queue_timeout, 0)
}

fn engine_with(dir: &std::path::Path, queue_timeout: Duration, worker_limit: u32) -> Engine {
    Engine::open(
        Store::open(dir).unwrap(),
        Settings {
            heartbeat_interval: Duration::from_secs(1),
            lost_after: Duration::from_secs(5),
            queue_timeout,
            worker_limit,
            node_worker_limit: 0,
            // The month here has no storage nodes to collect.
            ..Settings::default()
        },
    )
    .unwrap()
}

async fn submit(engine: &Engine, toml: &str) {
    engine
        .submit_jobs(
            SubmitJobsRequest {
                toml: toml.into(),
                no_run: true,
                ..Default::default()
            },
            "operator/test",
        )
        .await
        .unwrap();
}

async fn runs(engine: &Engine, job: &str) -> Vec<Run> {
    let mut runs = engine
        .list_runs(&ListRunsRequest {
            job: job.into(),
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap();
    runs.reverse();
    runs
}

/// Tick every `step` from `from` to `to`, skipping the ticks in `down`.
async fn tick_through(engine: &Engine, from: i64, to: i64, step: i64, down: Option<(i64, i64)>) {
    let mut now = from;
    while now < to {
        if !down.is_some_and(|(start, end)| now >= start && now < end) {
            engine.tick_at(now).await.unwrap();
        }
        now += step;
    }
}

fn with_tag(runs: &[Run], tag: &str) -> usize {
    runs.iter()
        .filter(|run| run.tags.iter().any(|t| t == tag))
        .count()
}

/// A month of a daily and a weekly tag: one run a day, each carrying
/// daily, every seventh weekly too, at the job's own time of day; a job
/// with a window starts only inside it; and after three days down, one run
/// catches up carrying both tags.
#[tokio::test]
async fn a_month_of_schedules_runs_each_tag_when_due_and_catches_up_once() {
    let dir = tempfile::tempdir().unwrap();
    // Runs fail after ten minutes: there is no client to run them.
    let engine = engine(dir.path(), Duration::from_secs(600));
    submit(
        &engine,
        r#"
[job.web]
direction = "push"
client = "c1"
include = ["/srv"]
dest = "n1"
tags = ["prod"]
schedule = { daily = { interval = "24h", keep = 7 }, weekly = { interval = "7d", keep = 4 } }

[job.night]
direction = "push"
client = "c1"
include = ["/srv"]
dest = "n1"
schedule = { daily = { interval = "24h", keep = 7 } }
window = "01:00-05:00"
time_zone = "Europe/Berlin"
"#,
    )
    .await;
    let start = fabric_coordinator::engine::now_ms();
    let down = (start + 12 * DAY, start + 15 * DAY);
    tick_through(&engine, start, start + 31 * DAY, 10 * MINUTE, Some(down)).await;

    let web = runs(&engine, "web").await;
    // 31 days, minus the 2 or 3 daily slots missed while down, plus the
    // catch-up run: 28 to 30.
    assert!((28..=30).contains(&web.len()), "{} runs", web.len());
    assert_eq!(with_tag(&web, "daily"), web.len());
    assert_eq!(with_tag(&web, "prod"), web.len(), "the job's own tags stay");
    assert!((4..=5).contains(&with_tag(&web, "weekly")), "{web:#?}");
    let during = web
        .iter()
        .filter(|run| run.created_ms >= down.0 && run.created_ms < down.1)
        .count();
    assert_eq!(during, 0);
    let catch_up = web.iter().find(|run| run.created_ms >= down.1).unwrap();
    assert_eq!(catch_up.created_ms, down.1, "at once when back");
    // Outside the downtime, one run a day, a day apart (give or take the
    // ten-minute tick).
    let before: Vec<&Run> = web.iter().filter(|run| run.created_ms < down.0).collect();
    for pair in before.windows(2) {
        let gap = pair[1].created_ms - pair[0].created_ms;
        assert!(
            (DAY - 10 * MINUTE..=DAY + 10 * MINUTE).contains(&gap),
            "{gap}"
        );
    }

    let night = runs(&engine, "night").await;
    let zone = jiff::tz::TimeZone::get("Europe/Berlin").unwrap();
    for run in &night {
        let local = jiff::Timestamp::from_millisecond(run.created_ms)
            .unwrap()
            .to_zoned(zone.clone());
        assert!((1..5).contains(&local.hour()), "started at {local}");
    }
    assert!((27..=31).contains(&night.len()), "{}", night.len());

    // `job list` says when each runs next and with which tags.
    let jobs = engine.jobs().await.unwrap();
    let web_job = jobs
        .iter()
        .find(|job| job.spec.as_ref().unwrap().name == "web")
        .unwrap();
    assert!(web_job.next_run_ms > 0);
    assert!(web_job.next_run_tags.contains(&"daily".to_owned()));
}

/// A run still going holds the job's next one back: never two at once; the
/// due tags wait and start one run when it ends, not one per missed slot.
#[tokio::test]
async fn a_job_never_overlaps_itself() {
    let dir = tempfile::tempdir().unwrap();
    // Each run sits queued for two days before it fails.
    let engine = engine(dir.path(), Duration::from_secs(2 * 86_400));
    submit(
        &engine,
        r#"
[job.hourly]
direction = "push"
client = "c1"
include = ["/srv"]
dest = "n1"
schedule = { hourly = { interval = "1h", keep = 24 } }
"#,
    )
    .await;
    let start = fabric_coordinator::engine::now_ms();
    tick_through(&engine, start, start + 10 * DAY, 10 * MINUTE, None).await;
    let runs = runs(&engine, "hourly").await;
    // A run every two days (and a bit), not 240 of them.
    assert!((4..=5).contains(&runs.len()), "{} runs", runs.len());
    for pair in runs.windows(2) {
        assert!(pair[1].created_ms >= pair[0].created_ms + 2 * DAY);
    }
}

/// `job pause` holds the schedule (and `job run` still starts a run),
/// `job resume` lets it go on, `job delete` ends it.
#[tokio::test]
async fn a_paused_job_waits_a_resumed_one_runs_and_a_deleted_one_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), Duration::from_secs(600));
    submit(
        &engine,
        r#"
[job.web]
direction = "push"
client = "c1"
include = ["/srv"]
dest = "n1"
schedule = { daily = { interval = "24h", keep = 7 } }
"#,
    )
    .await;
    let start = fabric_coordinator::engine::now_ms();
    assert!(engine.set_paused("web", true).await.unwrap().paused);
    tick_through(&engine, start, start + 5 * DAY, 10 * MINUTE, None).await;
    assert!(runs(&engine, "web").await.is_empty(), "paused: no runs");
    let by_hand = engine.run_job("web", "").await.unwrap();
    assert_eq!(by_hand.job, "web");
    assert!(engine.run_job("web", "nope").await.is_err());

    assert!(!engine.set_paused("web", false).await.unwrap().paused);
    tick_through(&engine, start + 5 * DAY, start + 8 * DAY, 10 * MINUTE, None).await;
    let after_resume = runs(&engine, "web").await.len();
    // The manual run, one catch-up run for the days paused, then the slots.
    assert!((3..=5).contains(&after_resume), "{after_resume}");

    engine.delete_job("web").await.unwrap();
    assert!(engine.jobs().await.unwrap().is_empty());
    tick_through(
        &engine,
        start + 8 * DAY,
        start + 12 * DAY,
        10 * MINUTE,
        None,
    )
    .await;
    assert_eq!(
        runs(&engine, "web").await.len(),
        after_resume,
        "deleted: no runs"
    );
    assert!(engine.set_paused("web", true).await.is_err());
}
