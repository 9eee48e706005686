//! The run state machine as pure functions: how a node's [`RunUpdate`]
//! changes a [`RunRecord`], when a run ends and with which state, which pull
//! copies may start, what a retry resets. No I/O, no clock, no randomness:
//! the engine passes the time in and does whatever the outcome asks for
//! (store, broadcast, send, catalogue).

use fabric_proto::v1::{
    CopyState, RunCopy, RunEvent, RunState, RunUpdate, Snapshot, TransferProgress,
};

use crate::record::{PullRetry, RunKind, RunRecord, is_final};

/// What applying an update asks the engine to do.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// The event to store (none for progress-only updates).
    pub event: Option<RunEvent>,
    /// A progress-only update: broadcast to watchers, not stored.
    pub progress: Option<RunEvent>,
    /// Snapshots committed on a node: add them to the catalogue.
    pub committed: Vec<(Snapshot, String)>,
    /// Expand runs: the instances to start one run each for.
    pub instances: Vec<String>,
    /// Pull runs: the orchestration may move (ready, a pull ended).
    pub pulls_changed: bool,
    /// The run ended with this update.
    pub finished: bool,
}

/// The copy for `node`, appended (pending) when the plan did not have it:
/// a spare the client took in place of a failed target.
fn copy_for<'r>(record: &'r mut RunRecord, node: &str) -> &'r mut RunCopy {
    let copies = &mut record.run_mut().copies;
    let index = match copies.iter().position(|copy| copy.node == node) {
        Some(index) => index,
        None => {
            copies.push(RunCopy {
                node: node.to_owned(),
                state: CopyState::Pending as i32,
                ..Default::default()
            });
            copies.len() - 1
        }
    };
    &mut copies[index]
}

/// Ends the run.
pub fn finish(record: &mut RunRecord, state: RunState, reason: &str, now_ms: i64) {
    let run = record.run_mut();
    run.set_state(state);
    run.reason = reason.to_owned();
    run.ended_ms = now_ms;
}

/// The copies that did not complete, as `node: reason` for a failure message.
pub fn failed_copies_summary(record: &RunRecord) -> Vec<String> {
    record
        .run()
        .copies
        .iter()
        .filter(|copy| copy.state() != CopyState::Done)
        .map(|copy| {
            if copy.reason.is_empty() {
                format!("{}: {}", copy.node, copy_state_word(copy.state()))
            } else {
                format!("{}: {}", copy.node, copy.reason)
            }
        })
        .collect()
}

fn copy_state_word(state: CopyState) -> &'static str {
    match state {
        CopyState::Unspecified | CopyState::Pending => "never started",
        CopyState::Running => "did not finish",
        CopyState::Done => "done",
        CopyState::Failed => "failed",
        CopyState::Retrying => "was still retrying",
    }
}

/// The state a run ends in once its client reported `client_state`: a run
/// is done only if the client says so and every copy committed, or, for a
/// job of `replicas = N`, N copies committed (spares stood in for failed
/// targets: the failures stay in the reason).
pub fn final_state(
    record: &RunRecord,
    client_state: RunState,
    client_reason: &str,
) -> (RunState, String) {
    match client_state {
        RunState::Done => {
            let failed = failed_copies_summary(record);
            let replicas = record.spec().replicas as usize;
            let done = record
                .run()
                .copies
                .iter()
                .filter(|copy| copy.state() == CopyState::Done)
                .count();
            if failed.is_empty() {
                (RunState::Done, String::new())
            } else if replicas > 0 && done >= replicas {
                (
                    RunState::Done,
                    format!(
                        "{done} copies as asked; spares stood in for failed copies: {}",
                        failed.join("; ")
                    ),
                )
            } else {
                (
                    RunState::Failed,
                    format!("copies failed: {}", failed.join("; ")),
                )
            }
        }
        RunState::Cancelled => (RunState::Cancelled, client_reason.to_owned()),
        _ => {
            let reason = if client_reason.is_empty() {
                "the client reported a failure without a reason".to_owned()
            } else {
                client_reason.to_owned()
            };
            (RunState::Failed, reason)
        }
    }
}

/// An event of the run as it is now.
pub fn event(record: &RunRecord, node: &str, now_ms: i64) -> RunEvent {
    RunEvent {
        run_id: record.id().to_owned(),
        seq: 0,
        time_ms: now_ms,
        node: node.to_owned(),
        state: record.run().state,
        ..Default::default()
    }
}

/// Applies a node's update to the run.
pub fn apply_update(
    record: &mut RunRecord,
    node: &str,
    update: &RunUpdate,
    now_ms: i64,
) -> Outcome {
    let mut outcome = Outcome::default();
    let dest_state = update.dest_state();
    let state = update.state();
    let has_dest_change = !update.dest.is_empty() && dest_state != CopyState::Unspecified;

    if let Some(snapshot) = update.snapshot.as_ref()
        && dest_state == CopyState::Done
        && !update.dest.is_empty()
    {
        outcome
            .committed
            .push((snapshot.clone(), update.dest.clone()));
    }

    if record.is_finished() {
        // A late word (a cancelled node confirming, a copy that committed
        // anyway): kept in the history, the run's outcome stays.
        if has_dest_change || state != RunState::Unspecified || !update.message.is_empty() {
            let mut late = event(record, node, now_ms);
            late.dest = update.dest.clone();
            late.dest_state = update.dest_state;
            late.message = late_message(update);
            outcome.event = Some(late);
        }
        return outcome;
    }

    let is_client = node == record.run().client;
    let kind = record.run_kind();

    if !update.dest.is_empty() {
        let copy = copy_for(record, &update.dest);
        // A progress report overtaken by the copy's end (it was on its
        // way) must not replace the final figures.
        let copy_ended = matches!(copy.state(), CopyState::Done | CopyState::Failed);
        if let Some(progress) = update.progress.as_ref()
            && !(copy_ended && dest_state == CopyState::Unspecified)
        {
            copy.progress = Some(progress.clone());
        }
        match dest_state {
            CopyState::Running => {
                if copy.state() != CopyState::Running && copy.state() != CopyState::Retrying {
                    copy.attempts += 1;
                }
                if copy.started_ms == 0 {
                    copy.started_ms = now_ms;
                }
                copy.set_state(CopyState::Running);
                copy.reason.clear();
            }
            CopyState::Retrying => {
                copy.attempts += 1;
                copy.set_state(CopyState::Retrying);
                copy.reason = update.message.clone();
            }
            CopyState::Done => {
                copy.set_state(CopyState::Done);
                copy.ended_ms = now_ms;
                copy.reason.clear();
                if let Some(snapshot) = update.snapshot.as_ref() {
                    copy.snapshot_id = snapshot.id.clone();
                    // The last live report is up to a second old: the
                    // snapshot's own figures are the copy's final ones.
                    if update.progress.is_none()
                        && let Some(stats) = snapshot.stats.as_ref()
                    {
                        let last = copy.progress.take().unwrap_or_default();
                        copy.progress = Some(TransferProgress {
                            files: stats.files,
                            bytes_read: stats.bytes_read.max(last.bytes_read),
                            bytes_sent: stats.stored_bytes.max(last.bytes_sent),
                            current_path: String::new(),
                        });
                    }
                }
                if kind == RunKind::Pull {
                    record
                        .pulls_outstanding
                        .retain(|pending| pending != &update.dest);
                    outcome.pulls_changed = true;
                }
            }
            CopyState::Failed => {
                copy.set_state(CopyState::Failed);
                copy.ended_ms = now_ms;
                copy.reason = if update.message.is_empty() {
                    "the copy failed without a reason".into()
                } else {
                    update.message.clone()
                };
                if kind == RunKind::Pull {
                    record
                        .pulls_outstanding
                        .retain(|pending| pending != &update.dest);
                    outcome.pulls_changed = true;
                }
            }
            CopyState::Pending | CopyState::Unspecified => {}
        }
    }

    if is_client {
        match state {
            RunState::Pre | RunState::Copying | RunState::Post => {
                record.run_mut().set_state(state);
            }
            RunState::Done | RunState::Failed | RunState::Cancelled => {
                record.client_final = state as i32;
                record.client_reason = update.message.clone();
                if kind == RunKind::Expand && state == RunState::Done {
                    outcome.instances = update.instances.clone();
                }
                if kind == RunKind::Pull {
                    finish_pull_run(record, now_ms);
                } else {
                    let (end, reason) = final_state(record, state, &update.message);
                    finish(record, end, &reason, now_ms);
                }
                outcome.finished = true;
            }
            RunState::Queued | RunState::Unspecified => {}
        }
        if update.ready && kind == RunKind::Pull {
            record.ready = true;
            outcome.pulls_changed = true;
        }
    }

    let only_progress = !has_dest_change
        && state == RunState::Unspecified
        && update.message.is_empty()
        && !update.ready
        && update.instances.is_empty();
    if only_progress {
        let copy_ended = record.run().copies.iter().any(|copy| {
            copy.node == update.dest && matches!(copy.state(), CopyState::Done | CopyState::Failed)
        });
        if let Some(progress) = update.progress.as_ref()
            && !update.dest.is_empty()
            && !copy_ended
        {
            outcome.progress = Some(progress_event(record, node, &update.dest, progress, now_ms));
        }
    } else {
        let mut stored = event(record, node, now_ms);
        stored.dest = update.dest.clone();
        stored.dest_state = update.dest_state;
        stored.message = update.message.clone();
        if update.ready && stored.message.is_empty() {
            stored.message = "ready to be pulled".into();
        }
        if !update.instances.is_empty() {
            stored.message = format!("instances: {}", update.instances.join(", "));
        }
        stored.progress = update.progress.clone();
        if stored.progress.is_none() && dest_state == CopyState::Done {
            stored.progress = record
                .run()
                .copies
                .iter()
                .find(|copy| copy.node == update.dest)
                .and_then(|copy| copy.progress.clone());
        }
        outcome.event = Some(stored);
    }
    outcome
}

/// A live progress report of one copy, for watchers only: never stored
/// (seq 0), so a run's history stays a list of things that happened.
pub fn progress_event(
    record: &RunRecord,
    node: &str,
    dest: &str,
    progress: &TransferProgress,
    now_ms: i64,
) -> RunEvent {
    let mut live = event(record, node, now_ms);
    live.dest = dest.to_owned();
    live.dest_state = record
        .run()
        .copies
        .iter()
        .find(|copy| copy.node == dest)
        .map_or(CopyState::Running as i32, |copy| copy.state);
    live.progress = Some(progress.clone());
    live
}

/// The live progress of every copy that has some, as watchers joining a
/// run late first see it.
pub fn current_progress(record: &RunRecord, now_ms: i64) -> Vec<RunEvent> {
    record
        .run()
        .copies
        .iter()
        .filter_map(|copy| {
            let progress = copy.progress.as_ref()?;
            Some(progress_event(record, "", &copy.node, progress, now_ms))
        })
        .collect()
}

fn late_message(update: &RunUpdate) -> String {
    let state = update.state();
    let prefix = if state == RunState::Unspecified {
        "after the run ended".to_owned()
    } else {
        format!(
            "after the run ended, the node reported {}",
            fabric_proto::enum_word(state.as_str_name())
        )
    };
    if update.message.is_empty() {
        prefix
    } else {
        format!("{prefix}: {}", update.message)
    }
}

/// A pull run ends once its passive client has ended: done only if the
/// client and every pull succeeded. Pulls still going are failed (the
/// client no longer serves them).
pub fn finish_pull_run(record: &mut RunRecord, now_ms: i64) {
    let client_state = RunState::try_from(record.client_final).unwrap_or(RunState::Failed);
    for copy in &mut record.run_mut().copies {
        if !matches!(copy.state(), CopyState::Done | CopyState::Failed) {
            copy.set_state(CopyState::Failed);
            copy.reason = "the passive client ended before this pull finished".into();
            copy.ended_ms = now_ms;
        }
    }
    let client_reason = record.client_reason.clone();
    let (end, reason) = final_state(record, client_state, &client_reason);
    finish(record, end, &reason, now_ms);
}

/// What the pull orchestration should do next.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PullStep {
    /// Storage nodes to send a pull assignment to now, in order.
    pub start: Vec<String>,
    /// Every pull ended: tell the client (`ok`, the failures).
    pub done: Option<(bool, String)>,
}

/// The next step of a pull run: once the client is ready, the copies in
/// plan order, a foreground copy waiting for the ones before it to end,
/// a background one starting without waiting; retries wait their sleep.
pub fn next_pull_step(record: &RunRecord) -> PullStep {
    let mut step = PullStep::default();
    if record.run_kind() != RunKind::Pull || !record.ready || record.is_finished() {
        return step;
    }
    // The source is read by one pull at a time until a copy is done; every
    // later copy is made node to node from one that holds the snapshot, so
    // that all copies of a snapshot are the same.
    let any_done = record
        .run()
        .copies
        .iter()
        .any(|copy| copy.state() == CopyState::Done);
    let reading = !any_done && !record.pulls_outstanding.is_empty();
    for copy in &record.run().copies {
        let waiting_retry = record
            .pull_retries
            .iter()
            .any(|retry| retry.node == copy.node);
        let outstanding = record.pulls_outstanding.contains(&copy.node);
        // A running copy nobody holds was lost with its node's session.
        let startable = matches!(
            copy.state(),
            CopyState::Pending | CopyState::Retrying | CopyState::Running
        ) && !waiting_retry
            && !outstanding;
        if startable && (any_done || (!reading && step.start.is_empty())) {
            step.start.push(copy.node.clone());
        }
        let ended = matches!(copy.state(), CopyState::Done | CopyState::Failed);
        if !ended && !copy.background {
            return step;
        }
    }
    let all_ended = record
        .run()
        .copies
        .iter()
        .all(|copy| matches!(copy.state(), CopyState::Done | CopyState::Failed));
    if all_ended && !record.pull_done_sent {
        let failed = failed_copies_summary(record);
        step.done = Some((failed.is_empty(), failed.join("; ")));
    }
    step
}

/// A pull copy failed: retry it after the minimum sleep while retries are
/// left. Returns the event message when a retry was scheduled.
pub fn schedule_pull_retry(
    record: &mut RunRecord,
    node: &str,
    copy_retries: u32,
    min_sleep_ms: u64,
    now_ms: i64,
) -> Option<String> {
    let copy = record
        .run_mut()
        .copies
        .iter_mut()
        .find(|copy| copy.node == node)?;
    if copy.state() != CopyState::Failed || copy.attempts > copy_retries {
        return None;
    }
    let reason = copy.reason.clone();
    copy.set_state(CopyState::Retrying);
    copy.attempts += 1;
    copy.ended_ms = 0;
    let attempt = copy.attempts;
    record.pull_retries.push(PullRetry {
        node: node.to_owned(),
        at_ms: now_ms.saturating_add(i64::try_from(min_sleep_ms).unwrap_or(i64::MAX)),
    });
    Some(format!(
        "pull by {node} failed ({reason}); attempt {attempt} of {} in {}",
        copy_retries + 1,
        humantime::format_duration(std::time::Duration::from_millis(min_sleep_ms))
    ))
}

/// Why an operator retry is refused, if it is.
pub fn retry_refusal(record: &RunRecord) -> Option<String> {
    let run = record.run();
    if !is_final(run.state()) {
        return Some(format!(
            "run {} is {}; only a finished run can be retried",
            run.id,
            fabric_proto::enum_word(run.state().as_str_name())
        ));
    }
    if run.state() == RunState::Done {
        return Some(format!(
            "run {} is done; it has no failed copy to retry",
            run.id
        ));
    }
    None
}

/// Resets a finished run for an operator retry: a new attempt whose copies
/// are only those that did not complete (the completed ones stay done).
pub fn reset_for_retry(record: &mut RunRecord) -> Vec<String> {
    record.client_final = RunState::Unspecified as i32;
    record.client_reason.clear();
    record.client_assigned = false;
    record.ready = false;
    record.pull_done_sent = false;
    record.pulls_outstanding.clear();
    record.pull_retries.clear();
    record.waiting_for.clear();
    let run = record.run_mut();
    run.attempt += 1;
    run.set_state(RunState::Queued);
    run.reason.clear();
    run.ended_ms = 0;
    let mut again = Vec::new();
    for copy in &mut run.copies {
        if copy.state() != CopyState::Done {
            copy.set_state(CopyState::Pending);
            copy.reason.clear();
            copy.progress = None;
            copy.started_ms = 0;
            copy.ended_ms = 0;
            again.push(copy.node.clone());
        }
    }
    again
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_proto::v1::{Run, TransferProgress};

    fn push_run(copies: &[(&str, bool)]) -> RunRecord {
        RunRecord {
            run: Some(Run {
                id: "r1".into(),
                job: "db".into(),
                client: "c1".into(),
                state: RunState::Queued as i32,
                attempt: 1,
                copies: copies
                    .iter()
                    .map(|(node, background)| RunCopy {
                        node: (*node).into(),
                        state: CopyState::Pending as i32,
                        background: *background,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            kind: RunKind::Push as i32,
            ..Default::default()
        }
    }

    fn state(state: RunState) -> RunUpdate {
        RunUpdate {
            run_id: "r1".into(),
            state: state as i32,
            ..Default::default()
        }
    }

    fn dest(node: &str, dest_state: CopyState) -> RunUpdate {
        RunUpdate {
            run_id: "r1".into(),
            dest: node.into(),
            dest_state: dest_state as i32,
            ..Default::default()
        }
    }

    fn committed(node: &str, id: &str) -> RunUpdate {
        RunUpdate {
            snapshot: Some(Snapshot {
                id: id.into(),
                ..Default::default()
            }),
            ..dest(node, CopyState::Done)
        }
    }

    /// [`committed`], the snapshot with these figures.
    fn committed_with_stats(
        node: &str,
        id: &str,
        files: u64,
        bytes_read: u64,
        stored_bytes: u64,
    ) -> RunUpdate {
        let mut done = committed(node, id);
        if let Some(snapshot) = done.snapshot.as_mut() {
            snapshot.stats = Some(fabric_proto::v1::SnapshotStats {
                files,
                bytes_read,
                stored_bytes,
                ..Default::default()
            });
        }
        done
    }

    #[test]
    fn a_push_run_goes_through_its_states_and_ends_done() {
        let mut record = push_run(&[("n1", true), ("n2", false)]);
        apply_update(&mut record, "c1", &state(RunState::Pre), 1);
        assert_eq!(record.run().state(), RunState::Pre);
        apply_update(&mut record, "c1", &state(RunState::Copying), 2);
        apply_update(&mut record, "c1", &dest("n1", CopyState::Running), 3);
        apply_update(&mut record, "c1", &dest("n2", CopyState::Running), 3);
        let outcome = apply_update(&mut record, "c1", &committed("n1", "s1"), 4);
        assert_eq!(outcome.committed.len(), 1);
        assert_eq!(outcome.committed[0].1, "n1");
        apply_update(&mut record, "c1", &committed("n2", "s1"), 5);
        let outcome = apply_update(&mut record, "c1", &state(RunState::Done), 6);
        assert!(outcome.finished);
        assert_eq!(record.run().state(), RunState::Done);
        assert_eq!(record.run().ended_ms, 6);
        assert!(
            record
                .run()
                .copies
                .iter()
                .all(|copy| copy.snapshot_id == "s1")
        );
        assert_eq!(record.run().copies[0].attempts, 1);
        assert_eq!(record.run().copies[0].started_ms, 3);
    }

    #[test]
    fn a_failed_copy_fails_the_run_even_if_the_client_says_done() {
        let mut record = push_run(&[("n1", false), ("n2", false)]);
        apply_update(&mut record, "c1", &committed("n1", "s1"), 1);
        let failure = RunUpdate {
            message: "disk full".into(),
            ..dest("n2", CopyState::Failed)
        };
        apply_update(&mut record, "c1", &failure, 2);
        apply_update(&mut record, "c1", &state(RunState::Done), 3);
        assert_eq!(record.run().state(), RunState::Failed);
        assert!(
            record.run().reason.contains("n2: disk full"),
            "{}",
            record.run().reason
        );
    }

    #[test]
    fn a_pre_failure_fails_the_run_with_the_clients_reason() {
        let mut record = push_run(&[("n1", false)]);
        apply_update(&mut record, "c1", &state(RunState::Pre), 1);
        let failure = RunUpdate {
            message: "pre exited with status 3".into(),
            ..state(RunState::Failed)
        };
        let outcome = apply_update(&mut record, "c1", &failure, 2);
        assert!(outcome.finished);
        assert_eq!(record.run().state(), RunState::Failed);
        assert_eq!(record.run().reason, "pre exited with status 3");
        assert_eq!(record.run().copies[0].state(), CopyState::Pending);
    }

    #[test]
    fn progress_alone_is_not_stored_but_goes_live_to_watchers_and_updates_the_copy() {
        let mut record = push_run(&[("n1", false)]);
        apply_update(&mut record, "c1", &dest("n1", CopyState::Running), 1);
        let progress = RunUpdate {
            run_id: "r1".into(),
            dest: "n1".into(),
            progress: Some(TransferProgress {
                bytes_read: 42,
                ..Default::default()
            }),
            ..Default::default()
        };
        let outcome = apply_update(&mut record, "c1", &progress, 1);
        assert!(outcome.event.is_none());
        let live = outcome.progress.expect("a live progress event");
        assert_eq!(live.seq, 0, "live progress is never stored");
        assert_eq!(live.dest, "n1");
        assert_eq!(live.dest_state(), CopyState::Running);
        assert_eq!(live.progress.unwrap().bytes_read, 42);
        assert_eq!(
            record.run().copies[0].progress.as_ref().unwrap().bytes_read,
            42
        );
        let joining = current_progress(&record, 2);
        assert_eq!(joining.len(), 1);
        assert_eq!(joining[0].progress.as_ref().unwrap().bytes_read, 42);
        let output_line = RunUpdate {
            run_id: "r1".into(),
            message: "dumping".into(),
            ..Default::default()
        };
        let outcome = apply_update(&mut record, "c1", &output_line, 2);
        assert_eq!(outcome.event.unwrap().message, "dumping");
    }

    #[test]
    fn a_copys_done_event_carries_its_final_figures_from_the_snapshot() {
        let mut record = push_run(&[("n1", false)]);
        apply_update(&mut record, "c1", &dest("n1", CopyState::Running), 1);
        let done = committed_with_stats("n1", "s1", 7, 4096, 1000);
        let outcome = apply_update(&mut record, "c1", &done, 2);
        let progress = outcome.event.unwrap().progress.unwrap();
        assert_eq!(
            (progress.files, progress.bytes_read, progress.bytes_sent),
            (7, 4096, 1000)
        );
    }

    #[test]
    fn progress_overtaken_by_the_copys_end_changes_nothing() {
        let mut record = push_run(&[("n1", false)]);
        apply_update(&mut record, "c1", &dest("n1", CopyState::Running), 1);
        let done = committed_with_stats("n1", "s1", 7, 4096, 0);
        apply_update(&mut record, "c1", &done, 2);
        let late = RunUpdate {
            run_id: "r1".into(),
            dest: "n1".into(),
            progress: Some(TransferProgress {
                files: 3,
                bytes_read: 100,
                ..Default::default()
            }),
            ..Default::default()
        };
        let outcome = apply_update(&mut record, "c1", &late, 3);
        assert!(outcome.progress.is_none() && outcome.event.is_none());
        assert_eq!(record.run().copies[0].progress.as_ref().unwrap().files, 7);
    }

    #[test]
    fn a_spare_joins_the_copies_and_retrying_counts_attempts() {
        let mut record = push_run(&[("n1", false)]);
        apply_update(&mut record, "c1", &dest("n1", CopyState::Running), 1);
        apply_update(&mut record, "c1", &dest("n1", CopyState::Retrying), 2);
        apply_update(&mut record, "c1", &dest("n1", CopyState::Running), 3);
        apply_update(&mut record, "c1", &dest("n1", CopyState::Failed), 4);
        assert_eq!(record.run().copies[0].attempts, 2);
        apply_update(&mut record, "c1", &dest("n9", CopyState::Running), 5);
        assert_eq!(record.run().copies.len(), 2);
        assert_eq!(record.run().copies[1].node, "n9");
    }

    #[test]
    fn a_replicas_run_whose_spare_made_the_copies_is_done_and_says_what_failed() {
        let mut record = push_run(&[("n1", false), ("n2", false)]);
        record.spec = Some(fabric_proto::v1::JobSpec {
            replicas: 2,
            ..Default::default()
        });
        apply_update(&mut record, "c1", &dest("n1", CopyState::Done), 1);
        let mut failed = dest("n2", CopyState::Failed);
        failed.message = "copy to n2 failed: no space".into();
        apply_update(&mut record, "c1", &failed, 2);
        apply_update(&mut record, "c1", &dest("n3", CopyState::Done), 3);
        let (state, reason) = final_state(&record, RunState::Done, "");
        assert_eq!(state, RunState::Done);
        assert!(
            reason.contains("n2") && reason.contains("no space"),
            "{reason}"
        );

        // One copy short of the count fails, whatever the client says.
        let mut short = push_run(&[("n1", false), ("n2", false)]);
        short.spec = record.spec.clone();
        apply_update(&mut short, "c1", &dest("n1", CopyState::Done), 1);
        apply_update(&mut short, "c1", &failed, 2);
        let (state, reason) = final_state(&short, RunState::Done, "");
        assert_eq!(state, RunState::Failed);
        assert!(reason.contains("no space"), "{reason}");
    }

    #[test]
    fn updates_after_the_end_are_kept_but_change_nothing() {
        let mut record = push_run(&[("n1", false)]);
        finish(&mut record, RunState::Cancelled, "cancelled", 1);
        let outcome = apply_update(&mut record, "c1", &state(RunState::Cancelled), 2);
        assert_eq!(record.run().state(), RunState::Cancelled);
        assert!(
            outcome
                .event
                .unwrap()
                .message
                .contains("after the run ended")
        );
    }

    fn pull_run(copies: &[(&str, bool)]) -> RunRecord {
        RunRecord {
            kind: RunKind::Pull as i32,
            ..push_run(copies)
        }
    }

    #[test]
    fn pulls_start_after_ready_one_reading_the_source_then_the_rest_in_plan_order() {
        let mut record = pull_run(&[("n1", true), ("n2", true), ("n3", false), ("n4", false)]);
        assert_eq!(next_pull_step(&record), PullStep::default());
        let ready = RunUpdate {
            ready: true,
            ..state(RunState::Copying)
        };
        let outcome = apply_update(&mut record, "c1", &ready, 1);
        assert!(outcome.pulls_changed);
        // One pull reads the source, background or not: two reads of live
        // files could differ.
        assert_eq!(next_pull_step(&record).start, ["n1"]);
        record.pulls_outstanding = vec!["n1".into()];
        assert!(next_pull_step(&record).start.is_empty());
        apply_update(&mut record, "n1", &committed("n1", "s1"), 2);
        record.pulls_outstanding.clear();
        // Then copies from n1, in plan order, background ones overlapping.
        assert_eq!(next_pull_step(&record).start, ["n2", "n3"]);
        record.pulls_outstanding = vec!["n2".into(), "n3".into()];
        assert!(next_pull_step(&record).start.is_empty());
        apply_update(&mut record, "n3", &committed("n3", "s1"), 3);
        record.pulls_outstanding.retain(|node| node != "n3");
        assert_eq!(next_pull_step(&record).start, ["n4"]);
        record.pulls_outstanding.push("n4".into());
        apply_update(&mut record, "n4", &committed("n4", "s1"), 4);
        assert_eq!(next_pull_step(&record), PullStep::default());
        apply_update(&mut record, "n2", &committed("n2", "s1"), 5);
        assert_eq!(next_pull_step(&record).done, Some((true, String::new())));
    }

    #[test]
    fn a_failed_pull_is_retried_after_its_sleep_then_given_up() {
        let mut record = pull_run(&[("n1", false)]);
        record.ready = true;
        record.pulls_outstanding = vec!["n1".into()];
        apply_update(&mut record, "n1", &dest("n1", CopyState::Running), 1);
        apply_update(&mut record, "n1", &dest("n1", CopyState::Failed), 2);
        let message = schedule_pull_retry(&mut record, "n1", 1, 500, 2).unwrap();
        assert!(message.contains("attempt 2 of 2"), "{message}");
        assert_eq!(record.pull_retries[0].at_ms, 502);
        assert!(next_pull_step(&record).start.is_empty());
        record.pull_retries.clear();
        assert_eq!(next_pull_step(&record).start, ["n1"]);
        record.pulls_outstanding = vec!["n1".into()];
        apply_update(&mut record, "n1", &dest("n1", CopyState::Running), 3);
        apply_update(&mut record, "n1", &dest("n1", CopyState::Failed), 4);
        assert!(schedule_pull_retry(&mut record, "n1", 1, 500, 4).is_none());
        let step = next_pull_step(&record);
        assert_eq!(step.done.as_ref().map(|done| done.0), Some(false));
        // The client's post ran and it reported done: the run still failed.
        apply_update(&mut record, "c1", &state(RunState::Done), 5);
        assert_eq!(record.run().state(), RunState::Failed);
    }

    #[test]
    fn a_retry_redoes_only_the_copies_that_did_not_complete() {
        let mut record = push_run(&[("n1", false), ("n2", false)]);
        apply_update(&mut record, "c1", &committed("n1", "s1"), 1);
        apply_update(&mut record, "c1", &dest("n2", CopyState::Failed), 2);
        assert!(retry_refusal(&record).is_some());
        apply_update(&mut record, "c1", &state(RunState::Failed), 3);
        assert!(retry_refusal(&record).is_none());
        assert_eq!(reset_for_retry(&mut record), ["n2"]);
        assert_eq!(record.run().attempt, 2);
        assert_eq!(record.run().state(), RunState::Queued);
        assert_eq!(record.run().copies[0].state(), CopyState::Done);
        assert_eq!(record.run().copies[1].state(), CopyState::Pending);
    }
}
