//! Job freshness by backy's rule, and its Nagios rendering.
//!
//! backy: "A backup job is considered in time if it is no more late than 1.5
//! times its regular interval [...] If any defined job is stale, backy check
//! will return a CRITICAL state." Here, per job:
//!
//! - **with an `interval`**: the newest *good* snapshot (complete or verified)
//!   of the job is found; older than 1.5 x interval is CRITICAL, otherwise OK.
//!   A job that has no good snapshot yet is OK while it was submitted less
//!   than 1.5 x interval ago (backy too treats a job without history as in
//!   time), and CRITICAL after that (backy would stay silent; a job that never
//!   produced a snapshot is the failure a monitor exists for). A job with a
//!   static list of instances is judged per instance, and takes the worst.
//!   In time, but the last run failed: WARNING. A cancelled run is an
//!   operator's decision, not a failure: it changes nothing.
//! - **without an interval**: by its last run. Failed is CRITICAL, done or
//!   cancelled is OK, still in progress or none is UNKNOWN.
//! - **a passive job** only makes its data ready; the pull jobs naming it as
//!   their `pull_source` fetch it. It is judged as they are (the worst of
//!   them), and UNKNOWN when no pull job names it.
//!
//! The overall status is the worst one, ordered OK < UNKNOWN < WARNING <
//! CRITICAL, and is also the exit code (0, 3, 1, 2 as Nagios wants).
//!
//! This module is pure: it never reads a clock or the database; callers pass
//! the jobs, the catalogue's snapshots and `now`.

use fabric_proto::v1::{CheckStatus, Direction, Job, JobCheck, RunState, Snapshot, SnapshotState};

/// backy's staleness factor: 1.5 x the interval, as a ratio.
const STALE_NUMERATOR: i64 = 3;
const STALE_DENOMINATOR: i64 = 2;

/// The age (in ms) past which a job with this interval is stale.
pub fn stale_after_ms(interval_s: u64) -> i64 {
    (interval_s as i64).saturating_mul(1000 * STALE_NUMERATOR) / STALE_DENOMINATOR
}

/// Judges every job (in the order given).
pub fn check_jobs(jobs: &[Job], snapshots: &[Snapshot], now_ms: i64) -> Vec<JobCheck> {
    let mut checks = judge_each(jobs, snapshots, now_ms);
    judge_passive_by_pulls(jobs, &mut checks);
    checks
}

/// A passive job takes the verdict of the pull jobs that fetch it.
fn judge_passive_by_pulls(jobs: &[Job], checks: &mut [JobCheck]) {
    let specs: Vec<&fabric_proto::v1::JobSpec> =
        jobs.iter().filter_map(|job| job.spec.as_ref()).collect();
    let verdicts: Vec<JobCheck> = checks.to_vec();
    for check in checks.iter_mut() {
        let passive = specs
            .iter()
            .any(|spec| spec.name == check.job && spec.direction() == Direction::Passive);
        if !passive {
            continue;
        }
        let pulls: Vec<&JobCheck> = specs
            .iter()
            .filter(|spec| spec.direction() == Direction::Pull && spec.pull_source == check.job)
            .filter_map(|spec| verdicts.iter().find(|verdict| verdict.job == spec.name))
            .collect();
        let worst = pulls
            .iter()
            .max_by_key(|verdict| severity(verdict.status()))
            .copied();
        match worst {
            Some(pull) => {
                check.status = pull.status;
                check.message = format!("judged by its pull job {}: {}", pull.job, pull.message);
                check.newest_good_ms = pull.newest_good_ms;
            }
            None => {
                check.status = CheckStatus::Unknown as i32;
                check.message = "passive, and no pull job names it as its pull_source".into();
            }
        }
    }
}

fn judge_each(jobs: &[Job], snapshots: &[Snapshot], now_ms: i64) -> Vec<JobCheck> {
    jobs.iter()
        .filter_map(|job| job.spec.as_ref().map(|spec| (job, spec)))
        .map(|(job, spec)| {
            let judged_by_age = spec.interval_s > 0 && spec.direction() != Direction::Passive;
            let (mut status, mut message, newest_good_ms) = if judged_by_age {
                judge_by_age(job, snapshots, now_ms)
            } else {
                let (status, message) = judge_by_last_run(job);
                let newest = newest_good(snapshots, &spec.name, None).unwrap_or(0);
                (status, message, newest)
            };
            // A node flagged the newest snapshot (byteback's growth guard):
            // kept, but someone should look.
            if status == CheckStatus::Ok
                && let Some(flagged) = snapshots
                    .iter()
                    .filter(|snapshot| snapshot.job == spec.name)
                    .max_by_key(|snapshot| snapshot.end_time_ms)
                    .filter(|snapshot| snapshot.unusual_growth)
            {
                status = CheckStatus::Warning;
                message = format!(
                    "newest snapshot {} grew unusually ({message})",
                    flagged.name
                );
            }
            JobCheck {
                job: spec.name.clone(),
                status: status as i32,
                message,
                newest_good_ms,
                interval_s: spec.interval_s,
            }
        })
        .collect()
}

/// End time of the newest good snapshot of `job` (and `instance`, if given).
fn newest_good(snapshots: &[Snapshot], job: &str, instance: Option<&str>) -> Option<i64> {
    snapshots
        .iter()
        .filter(|snapshot| snapshot.job == job)
        .filter(|snapshot| instance.is_none_or(|instance| snapshot.instance == instance))
        .filter(|snapshot| {
            matches!(
                snapshot.state(),
                SnapshotState::Complete | SnapshotState::Verified
            )
        })
        .map(|snapshot| snapshot.end_time_ms)
        .max()
}

fn judge_by_age(job: &Job, snapshots: &[Snapshot], now_ms: i64) -> (CheckStatus, String, i64) {
    let Some(spec) = job.spec.as_ref() else {
        return (CheckStatus::Unknown, "no job spec".into(), 0);
    };
    let limit = stale_after_ms(spec.interval_s);
    let interval = fabric_proto::duration_word(spec.interval_s);
    let instances: Vec<Option<&str>> = if spec.instances.is_empty() {
        vec![None]
    } else {
        spec.instances
            .iter()
            .map(|instance| Some(instance.as_str()))
            .collect()
    };
    let mut worst: Option<(CheckStatus, String)> = None;
    for instance in instances {
        let label = match instance {
            Some(instance) => format!("instance {instance}: "),
            None => String::new(),
        };
        let verdict = match newest_good(snapshots, &spec.name, instance) {
            Some(end) if now_ms - end > limit => (
                CheckStatus::Critical,
                format!(
                    "{label}newest {} ago, interval {interval}",
                    short_duration_ms(now_ms - end)
                ),
            ),
            Some(_) => (CheckStatus::Ok, String::new()),
            None if now_ms - job.submitted_ms > limit => (
                CheckStatus::Critical,
                format!(
                    "{label}no good snapshot in the {} since it was submitted, interval {interval}",
                    short_duration_ms(now_ms - job.submitted_ms)
                ),
            ),
            None => (CheckStatus::Ok, String::new()),
        };
        if worst
            .as_ref()
            .is_none_or(|(status, _)| severity(verdict.0) > severity(*status))
        {
            worst = Some(verdict);
        }
    }
    let newest = newest_good(snapshots, &spec.name, None).unwrap_or(0);
    match worst {
        Some((CheckStatus::Ok, _)) | None => {
            let last_run_problem = job.last_run.as_ref().and_then(|run| match run.state() {
                RunState::Failed => {
                    Some(format!("in time, but the last run failed: {}", run.reason))
                }
                _ => None,
            });
            if let Some(problem) = last_run_problem {
                return (CheckStatus::Warning, problem, newest);
            }
            let message = if newest == 0 {
                format!(
                    "no snapshot yet, first one due within {}",
                    short_duration_ms(limit)
                )
            } else {
                format!(
                    "newest {} ago, interval {interval}",
                    short_duration_ms(now_ms - newest)
                )
            };
            (CheckStatus::Ok, message, newest)
        }
        Some((status, message)) => (status, message, newest),
    }
}

fn judge_by_last_run(job: &Job) -> (CheckStatus, String) {
    let Some(run) = job.last_run.as_ref() else {
        return (CheckStatus::Unknown, "no run yet".into());
    };
    match run.state() {
        RunState::Done => (CheckStatus::Ok, format!("last run {} done", run.id)),
        RunState::Failed => (
            CheckStatus::Critical,
            format!("last run {} failed: {}", run.id, run.reason),
        ),
        RunState::Cancelled => (
            CheckStatus::Ok,
            format!("last run {} was cancelled", run.id),
        ),
        _ => (
            CheckStatus::Unknown,
            format!("run {} is in progress, no finished run to judge", run.id),
        ),
    }
}

/// Replicas on top of freshness: a job with snapshots short of their
/// replica target is a WARNING ("2 snapshots short of their replica
/// target"), and one with a snapshot no copy of which counts any more is
/// CRITICAL. `short` is (job, copies that count, target) per snapshot.
pub fn add_replica_shortfalls(checks: &mut [JobCheck], short: &[(String, usize, usize)]) {
    for check in checks {
        let mine: Vec<&(String, usize, usize)> = short
            .iter()
            .filter(|(job, _, _)| *job == check.job)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let without_copy = mine.iter().filter(|(_, counted, _)| *counted == 0).count();
        let (status, note) = if without_copy > 0 {
            (
                CheckStatus::Critical,
                format!("{without_copy} snapshot(s) without a good copy on a live node"),
            )
        } else {
            (
                CheckStatus::Warning,
                format!("{} snapshot(s) short of their replica target", mine.len()),
            )
        };
        if severity(status) > severity(check.status()) {
            check.set_status(status);
        }
        check.message = if check.message.is_empty() {
            note
        } else {
            format!("{note}; {}", check.message)
        };
    }
}

/// Rank for "worst": OK < UNKNOWN < WARNING < CRITICAL.
fn severity(status: CheckStatus) -> u8 {
    match status {
        CheckStatus::Ok => 0,
        CheckStatus::Unknown => 1,
        CheckStatus::Warning => 2,
        CheckStatus::Critical => 3,
    }
}

/// The overall status of several checks (OK when there are none).
pub fn overall_status(checks: &[JobCheck]) -> CheckStatus {
    checks
        .iter()
        .map(JobCheck::status)
        .max_by_key(|status| severity(*status))
        .unwrap_or(CheckStatus::Ok)
}

/// Nagios' process exit code of a status.
pub fn exit_code(status: CheckStatus) -> i32 {
    status as i32
}

pub fn status_word(status: CheckStatus) -> &'static str {
    match status {
        CheckStatus::Ok => "OK",
        CheckStatus::Warning => "WARNING",
        CheckStatus::Critical => "CRITICAL",
        CheckStatus::Unknown => "UNKNOWN",
    }
}

/// The Nagios line with perfdata, and the exit code. Perfdata per job with a
/// good snapshot: `JOB_age=SECONDSs;;CRITICAL_AFTER;0` (the threshold only
/// for jobs with an interval).
pub fn render_nagios(checks: &[JobCheck], now_ms: i64) -> (String, i32) {
    let overall = overall_status(checks);
    let total = checks.len();
    let mut line = format!("BACKUP {} - ", status_word(overall));
    if total == 0 {
        line.push_str("no jobs to check");
    } else if overall == CheckStatus::Ok {
        line.push_str(&format!("{total} of {total} jobs OK"));
    } else {
        let mut counts = Vec::new();
        for status in [
            CheckStatus::Critical,
            CheckStatus::Warning,
            CheckStatus::Unknown,
        ] {
            let count = checks
                .iter()
                .filter(|check| check.status() == status)
                .count();
            if count > 0 {
                counts.push(format!("{count} {}", status_word(status)));
            }
        }
        let details: Vec<String> = checks
            .iter()
            .filter(|check| check.status() != CheckStatus::Ok)
            .map(|check| format!("{} ({})", check.job, check.message))
            .collect();
        let not_ok = details.len();
        let kinds = if counts.len() == 1 {
            status_word(overall).to_owned()
        } else {
            format!("not OK ({})", counts.join(", "))
        };
        line.push_str(&format!(
            "{not_ok} of {total} jobs {kinds}: {}",
            details.join("; ")
        ));
    }
    let perfdata: Vec<String> = checks
        .iter()
        .filter(|check| check.newest_good_ms > 0)
        .map(|check| {
            let age_s = (now_ms - check.newest_good_ms).max(0) / 1000;
            let critical = if check.interval_s > 0 {
                (stale_after_ms(check.interval_s) / 1000).to_string()
            } else {
                String::new()
            };
            format!("{}_age={age_s}s;;{critical};0", perfdata_label(&check.job))
        })
        .collect();
    if !perfdata.is_empty() {
        line.push_str(" | ");
        line.push_str(&perfdata.join(" "));
    }
    (line, exit_code(overall))
}

/// A perfdata label must not contain `=`, `'` or spaces.
fn perfdata_label(job: &str) -> String {
    job.chars()
        .map(|c| {
            if c == '=' || c == '\'' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// A short human duration, floored: `45s`, `90m`, `40h`, `12d`.
pub fn short_duration_ms(ms: i64) -> String {
    let seconds = ms.max(0) / 1000;
    if seconds < 120 {
        format!("{seconds}s")
    } else if seconds < 120 * 60 {
        format!("{}m", seconds / 60)
    } else if seconds < 72 * 3600 {
        format!("{}h", seconds / 3600)
    } else {
        format!("{}d", seconds / 86_400)
    }
}

#[cfg(test)]
mod tests {
    use fabric_proto::v1::{JobSpec, Run};

    use super::*;

    const HOUR_MS: i64 = 3_600_000;
    const NOW: i64 = 1_795_405_022_000;

    fn job(name: &str, interval_h: u64, submitted_ago_h: i64) -> Job {
        Job {
            spec: Some(JobSpec {
                name: name.into(),
                direction: Direction::Push as i32,
                interval_s: interval_h * 3600,
                ..JobSpec::default()
            }),
            submitted_ms: NOW - submitted_ago_h * HOUR_MS,
            ..Job::default()
        }
    }

    fn snapshot(job: &str, instance: &str, ended_ago_h: i64, state: SnapshotState) -> Snapshot {
        Snapshot {
            job: job.into(),
            instance: instance.into(),
            end_time_ms: NOW - ended_ago_h * HOUR_MS,
            state: state as i32,
            ..Snapshot::default()
        }
    }

    fn run(id: &str, state: RunState, reason: &str) -> Run {
        Run {
            id: id.into(),
            state: state as i32,
            reason: reason.into(),
            ..Run::default()
        }
    }

    #[test]
    fn a_passive_job_is_judged_by_the_pull_that_fetches_it() {
        let mut passive = job("vm", 0, 100);
        if let Some(spec) = passive.spec.as_mut() {
            spec.direction = Direction::Passive as i32;
        }
        let mut pull = job("vm-pull", 24, 100);
        if let Some(spec) = pull.spec.as_mut() {
            spec.direction = Direction::Pull as i32;
            spec.pull_source = "vm".into();
        }
        let jobs = [passive.clone(), pull];
        let fresh = [snapshot("vm-pull", "", 2, SnapshotState::Complete)];
        let checks = check_jobs(&jobs, &fresh, NOW);
        assert_eq!(checks[0].status(), CheckStatus::Ok, "{checks:?}");
        assert!(
            checks[0]
                .message
                .starts_with("judged by its pull job vm-pull: newest 2h ago"),
            "{checks:?}"
        );
        assert_eq!(checks[0].newest_good_ms, fresh[0].end_time_ms);
        let stale = [snapshot("vm-pull", "", 48, SnapshotState::Complete)];
        let checks = check_jobs(&jobs, &stale, NOW);
        assert_eq!(checks[0].status(), CheckStatus::Critical, "{checks:?}");
        // Alone, nothing judges it.
        let checks = check_jobs(&[passive], &fresh, NOW);
        assert_eq!(checks[0].status(), CheckStatus::Unknown, "{checks:?}");
    }

    #[test]
    fn a_cancelled_run_is_not_a_warning() {
        let mut timed = job("db", 24, 100);
        timed.last_run = Some(run("r1", RunState::Cancelled, ""));
        let mut untimed = job("adhoc", 0, 100);
        untimed.last_run = Some(run("r2", RunState::Cancelled, ""));
        let checks = check_jobs(
            &[timed, untimed],
            &[snapshot("db", "", 2, SnapshotState::Complete)],
            NOW,
        );
        assert_eq!(checks[0].status(), CheckStatus::Ok, "{checks:?}");
        assert_eq!(checks[1].status(), CheckStatus::Ok, "{checks:?}");
        assert!(checks[1].message.contains("cancelled"), "{checks:?}");
    }

    #[test]
    fn a_newest_snapshot_flagged_for_growth_makes_an_ok_job_a_warning() {
        let job = job("db", 24, 100);
        let mut flagged = snapshot("db", "", 1, SnapshotState::Complete);
        flagged.unusual_growth = true;
        flagged.name = "db/x".into();
        let checks = check_jobs(
            std::slice::from_ref(&job),
            &[
                snapshot("db", "", 20, SnapshotState::Complete),
                flagged.clone(),
            ],
            NOW,
        );
        assert_eq!(checks[0].status(), CheckStatus::Warning, "{checks:?}");
        assert!(
            checks[0].message.contains("db/x grew unusually"),
            "{checks:?}"
        );
        // An older flagged one does not count once a newer one is fine.
        flagged.end_time_ms = NOW - 30 * HOUR_MS;
        let checks = check_jobs(
            std::slice::from_ref(&job),
            &[snapshot("db", "", 2, SnapshotState::Complete), flagged],
            NOW,
        );
        assert_eq!(checks[0].status(), CheckStatus::Ok, "{checks:?}");
    }

    #[test]
    fn snapshots_short_of_their_target_warn_and_one_without_a_copy_is_critical() {
        let jobs = vec![job("db", 24, 48), job("web", 24, 48)];
        let snapshots = vec![
            snapshot("db", "", 1, SnapshotState::Complete),
            snapshot("web", "", 1, SnapshotState::Complete),
        ];
        let mut checks = check_jobs(&jobs, &snapshots, NOW);
        add_replica_shortfalls(
            &mut checks,
            &[
                ("db".into(), 1, 2),
                ("db".into(), 1, 2),
                ("web".into(), 0, 2),
            ],
        );
        assert_eq!(checks[0].status(), CheckStatus::Warning);
        assert!(
            checks[0]
                .message
                .starts_with("2 snapshot(s) short of their replica target"),
            "{}",
            checks[0].message
        );
        assert_eq!(checks[1].status(), CheckStatus::Critical);
        assert!(checks[1].message.contains("without a good copy"));
    }

    #[test]
    fn stale_jobs_are_critical_with_perfdata() {
        let jobs = [job("db", 24, 100), job("etc", 24, 100), job("logs", 1, 100)];
        let snapshots = [
            snapshot("db", "", 40, SnapshotState::Complete),
            snapshot("db", "", 2, SnapshotState::Incomplete),
            snapshot("etc", "", 35, SnapshotState::Verified),
            snapshot("logs", "", 1, SnapshotState::Complete),
        ];
        let checks = check_jobs(&jobs, &snapshots, NOW);
        let statuses: Vec<CheckStatus> = checks.iter().map(JobCheck::status).collect();
        assert_eq!(
            statuses,
            vec![CheckStatus::Critical, CheckStatus::Ok, CheckStatus::Ok]
        );
        assert_eq!(checks[0].newest_good_ms, NOW - 40 * HOUR_MS);
        let (line, exit) = render_nagios(&checks, NOW);
        assert_eq!(
            line,
            "BACKUP CRITICAL - 1 of 3 jobs CRITICAL: db (newest 40h ago, interval 1d) \
             | db_age=144000s;;129600;0 etc_age=126000s;;129600;0 logs_age=3600s;;5400;0"
        );
        assert_eq!(exit, 2);
    }

    #[test]
    fn all_fresh_is_ok() {
        let jobs = [job("db", 24, 100), job("new", 24, 1)];
        let snapshots = [snapshot("db", "", 3, SnapshotState::Complete)];
        let checks = check_jobs(&jobs, &snapshots, NOW);
        assert_eq!(
            checks[1].message,
            "no snapshot yet, first one due within 36h"
        );
        let (line, exit) = render_nagios(&checks, NOW);
        assert_eq!(line, "BACKUP OK - 2 of 2 jobs OK | db_age=10800s;;129600;0");
        assert_eq!(exit, 0);
        assert_eq!(
            render_nagios(&[], NOW),
            ("BACKUP OK - no jobs to check".to_owned(), 0)
        );
    }

    #[test]
    fn a_job_that_never_produced_a_snapshot_turns_critical() {
        let checks = check_jobs(&[job("never", 24, 37)], &[], NOW);
        assert_eq!(checks[0].status(), CheckStatus::Critical);
        assert_eq!(
            checks[0].message,
            "no good snapshot in the 37h since it was submitted, interval 1d"
        );
    }

    #[test]
    fn failed_last_run_of_a_fresh_job_warns() {
        let mut fresh = job("db", 24, 100);
        fresh.last_run = Some(run("r7", RunState::Failed, "pre exited with status 1"));
        let checks = check_jobs(
            &[fresh],
            &[snapshot("db", "", 3, SnapshotState::Complete)],
            NOW,
        );
        assert_eq!(checks[0].status(), CheckStatus::Warning);
        let (line, exit) = render_nagios(&checks, NOW);
        assert_eq!(
            line,
            "BACKUP WARNING - 1 of 1 jobs WARNING: db (in time, but the last run failed: \
             pre exited with status 1) | db_age=10800s;;129600;0"
        );
        assert_eq!(exit, 1);
    }

    #[test]
    fn static_instances_are_judged_each() {
        let mut db = job("db", 24, 100);
        if let Some(spec) = db.spec.as_mut() {
            spec.instances = vec!["3306".into(), "3307".into()];
        }
        let snapshots = [
            snapshot("db", "3306", 1, SnapshotState::Complete),
            snapshot("db", "3307", 50, SnapshotState::Complete),
        ];
        let checks = check_jobs(&[db], &snapshots, NOW);
        assert_eq!(checks[0].status(), CheckStatus::Critical);
        assert_eq!(
            checks[0].message,
            "instance 3307: newest 50h ago, interval 1d"
        );
        assert_eq!(checks[0].newest_good_ms, NOW - HOUR_MS);
    }

    #[test]
    fn jobs_without_interval_are_judged_by_their_last_run() {
        let mut failed = job("a", 0, 1);
        failed.last_run = Some(run("r1", RunState::Failed, "copy to n2 failed: node lost"));
        let mut done = job("b", 0, 1);
        done.last_run = Some(run("r2", RunState::Done, ""));
        let none = job("c", 0, 1);
        let mut running = job("d", 0, 1);
        running.last_run = Some(run("r3", RunState::Copying, ""));
        let checks = check_jobs(&[failed, done, none, running], &[], NOW);
        let statuses: Vec<CheckStatus> = checks.iter().map(JobCheck::status).collect();
        assert_eq!(
            statuses,
            vec![
                CheckStatus::Critical,
                CheckStatus::Ok,
                CheckStatus::Unknown,
                CheckStatus::Unknown
            ]
        );
        let (line, exit) = render_nagios(&checks, NOW);
        assert_eq!(
            line,
            "BACKUP CRITICAL - 3 of 4 jobs not OK (1 CRITICAL, 2 UNKNOWN): a (last run r1 failed: copy to \
             n2 failed: node lost); c (no run yet); d (run r3 is in progress, no finished run to judge)"
        );
        assert_eq!(exit, 2);
    }

    #[test]
    fn unknown_alone_exits_3() {
        let checks = check_jobs(&[job("c", 0, 1)], &[], NOW);
        let (line, exit) = render_nagios(&checks, NOW);
        assert_eq!(line, "BACKUP UNKNOWN - 1 of 1 jobs UNKNOWN: c (no run yet)");
        assert_eq!(exit, 3);
    }

    #[test]
    fn short_durations() {
        assert_eq!(short_duration_ms(45_000), "45s");
        assert_eq!(short_duration_ms(90 * 60_000), "90m");
        assert_eq!(short_duration_ms(40 * HOUR_MS), "40h");
        assert_eq!(short_duration_ms(300 * HOUR_MS), "12d");
        assert_eq!(short_duration_ms(-5), "0s");
    }
}
