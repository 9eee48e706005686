//! What the engine does by itself: scheduled runs (`run_schedules`, on
//! every tick), retention (`apply_retention` after each good run, on
//! demand, and daily), and the worker limits a run waits for. Part of
//! [`super::Inner`]; the rules themselves are pure and live in
//! [`crate::schedule`] and [`crate::retention`]: this module only applies
//! them to the stored jobs, the catalogue and the nodes' sessions.

use super::*;

/// How often a job's retention is applied by itself, besides after each of
/// its runs that succeeded.
const RETENTION_EVERY_MS: i64 = 24 * 60 * 60 * 1000;

/// The retention rules of `spec`: its schedule's keep counts per tag and
/// its `keep_*` keys, in its time zone. A sync job keeps exactly its
/// newest snapshot per host and instance (B1000's sync type: one current
/// copy, replaced by each run), whatever else it says.
pub(super) fn retention_rules(spec: &JobSpec) -> retention::RetentionRules {
    if spec.r#type() == SnapshotType::Sync {
        return retention::RetentionRules {
            keep_last: 1,
            ..Default::default()
        };
    }
    retention::RetentionRules {
        tag_keep: spec
            .schedule
            .iter()
            .map(|tag| (tag.tag.clone(), tag.keep))
            .collect(),
        keep_last: spec.keep_last,
        keep_hourly: spec.keep_hourly,
        keep_daily: spec.keep_daily,
        keep_weekly: spec.keep_weekly,
        keep_monthly: spec.keep_monthly,
        keep_yearly: spec.keep_yearly,
        // The jobs file check refuses an unknown zone; a hand-edited state
        // falls back to UTC.
        time_zone: crate::schedule::time_zone_of(spec).unwrap_or(jiff::tz::TimeZone::UTC),
    }
}

impl Inner {
    /// Job `name`'s retention: the plan for its snapshots in the catalogue
    /// and, unless `dry_run`, the removed ones sent to every node holding
    /// them (a node offline now is asked again the next time; the catalogue
    /// keeps a copy until its node says it is gone).
    pub(super) fn apply_retention(
        &mut self,
        name: &str,
        dry_run: bool,
        now: i64,
    ) -> Result<ForgetResponse, EngineError> {
        let Some(mut job) = self.store.job(name)? else {
            return Err(EngineError::NotFound(format!("no job {name:?}")));
        };
        let spec = job.spec.clone().unwrap_or_default();
        let rules = retention_rules(&spec);
        let entries: Vec<CatalogEntry> = self
            .store
            .catalog()?
            .into_iter()
            .filter(|entry| entry.snapshot.as_ref().is_some_and(|s| s.job == name))
            .collect();
        let snapshots: Vec<retention::SnapshotInfo> = entries
            .iter()
            .filter_map(|entry| entry.snapshot.as_ref().map(retention::SnapshotInfo::from))
            .collect();
        let last_failed = self.last_finished_run_failed(name)?;
        let guards = retention::Guards {
            recent_runs_failed: last_failed,
        };
        let plan = retention::plan(&snapshots, &rules, &guards, now);
        let nodes_of: HashMap<&str, Vec<String>> = entries
            .iter()
            .filter_map(|entry| {
                let snapshot = entry.snapshot.as_ref()?;
                let nodes = entry.copies.iter().map(|copy| copy.node.clone()).collect();
                Some((snapshot.id.as_str(), nodes))
            })
            .collect();
        let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let decisions = plan
            .decisions
            .iter()
            .map(|decision| {
                let nodes = nodes_of
                    .get(decision.snapshot.id.as_str())
                    .cloned()
                    .unwrap_or_default();
                if !decision.is_kept() {
                    for node in &nodes {
                        by_node
                            .entry(node.clone())
                            .or_default()
                            .push(decision.snapshot.id.clone());
                    }
                }
                ForgetDecision {
                    snapshot_id: decision.snapshot.id.clone(),
                    host: decision.snapshot.host.clone(),
                    instance: decision.snapshot.instance.clone(),
                    end_time_ms: decision.snapshot.end_time_ms,
                    tags: decision.snapshot.tags.clone(),
                    nodes,
                    kept_because: decision.reasons.iter().map(ToString::to_string).collect(),
                }
            })
            .collect();
        if !dry_run {
            for (node, ids) in by_node {
                let message = CoordinatorMessage {
                    kind: Some(coordinator_message::Kind::DeleteSnapshots(
                        DeleteSnapshots { ids: ids.clone() },
                    )),
                };
                if self.send(&node, message) {
                    tracing::info!(job = %name, %node, snapshots = ids.len(), "retention removes snapshots");
                } else {
                    tracing::info!(job = %name, %node, "node offline: retention asks it again later");
                }
            }
            job.retention_applied_ms = now;
            self.put_job(&job)?;
        }
        Ok(ForgetResponse {
            decisions,
            held_back: if last_failed {
                format!("the last run of job {name} failed: nothing is removed until one succeeds")
            } else {
                String::new()
            },
        })
    }

    /// A sync job's `snapshot` was committed on `node`: the older ones of
    /// its job, host and instance there go now (B1000's sync type: one
    /// current copy per node), not when the whole run ends. A node keeps
    /// one inside its WORM window (it refuses the deletion).
    pub(super) fn replace_sync_snapshots(
        &mut self,
        node: &str,
        snapshot: &Snapshot,
        now: i64,
    ) -> Result<(), StateError> {
        let older: Vec<String> = self
            .store
            .catalog()?
            .into_iter()
            .filter(|entry| entry.copies.iter().any(|copy| copy.node == node))
            .filter_map(|entry| entry.snapshot)
            .filter(|other| {
                other.id != snapshot.id
                    && other.job == snapshot.job
                    && other.host == snapshot.host
                    && other.instance == snapshot.instance
                    && other.end_time_ms <= snapshot.end_time_ms
                    && other.retain_until_ms <= now
            })
            .map(|other| other.id)
            .collect();
        if older.is_empty() {
            return Ok(());
        }
        tracing::info!(job = %snapshot.job, %node, replaced = older.len(), "a sync snapshot replaces the older ones on its node");
        let message = CoordinatorMessage {
            kind: Some(coordinator_message::Kind::DeleteSnapshots(
                DeleteSnapshots { ids: older },
            )),
        };
        // A node offline now keeps them until the job's retention (keep
        // the newest) asks again.
        self.send(node, message);
        Ok(())
    }

    /// Whether job `name`'s most recent finished run failed.
    pub(super) fn last_finished_run_failed(&self, name: &str) -> Result<bool, StateError> {
        let mut failed = false;
        self.store.visit_runs_newest_first(|record| {
            let run = record.run();
            if run.job != name || !record.is_finished() {
                return true;
            }
            failed = run.state() == RunState::Failed;
            false
        })?;
        Ok(failed)
    }

    /// The tick's upkeep: scheduled runs, then daily retention, over one
    /// listing of the stored jobs. Returns whether anything changed.
    pub(super) fn upkeep(&mut self, now: i64) -> Result<bool, StateError> {
        let jobs = self.stored_jobs()?;
        let started = self.run_schedules(&jobs, now)?;
        // `apply_retention` reads each job again, so what `run_schedules`
        // stored meanwhile is not lost.
        let retained = self.apply_retention_daily(&jobs, now)?;
        Ok(started || retained)
    }

    /// Applies the retention of each of `jobs` with rules that has not had
    /// it for a day.
    fn apply_retention_daily(
        &mut self,
        jobs: &[std::sync::Arc<Job>],
        now: i64,
    ) -> Result<bool, StateError> {
        let mut changed = false;
        for job in jobs {
            let Some(spec) = job.spec.as_ref() else {
                continue;
            };
            if retention_rules(spec).is_empty()
                || now.saturating_sub(job.retention_applied_ms) < RETENTION_EVERY_MS
            {
                continue;
            }
            match self.apply_retention(&spec.name, false, now) {
                Ok(_) => changed = true,
                Err(EngineError::State(err)) => return Err(err),
                Err(err) => tracing::warn!(job = %spec.name, error = %err, "retention failed"),
            }
        }
        Ok(changed)
    }

    /// Starts a run of each scheduled job that has a tag due, carrying the
    /// due tags as snapshot tags; a job with a run still active waits (its
    /// tags stay due, so it runs once when that run ends). Returns whether
    /// anything started.
    fn run_schedules(
        &mut self,
        jobs: &[std::sync::Arc<Job>],
        now: i64,
    ) -> Result<bool, StateError> {
        let mut changed = false;
        for job in jobs {
            let Some(spec) = job.spec.as_ref() else {
                continue;
            };
            if spec.direction() == Direction::Passive || job.paused {
                continue;
            }
            let Some(schedule) = Schedule::of(spec) else {
                continue;
            };
            let last_runs = job.scheduled_ms.clone().into_iter().collect();
            let due = schedule.due_tags(&spec.name, &last_runs, job.schedule_since_ms, now);
            if due.is_empty() {
                continue;
            }
            if self
                .active
                .values()
                .any(|record| record.run().job == spec.name)
            {
                continue;
            }
            let mut run_spec = spec.clone();
            for tag in &due {
                if !run_spec.tags.contains(tag) {
                    run_spec.tags.push(tag.clone());
                }
            }
            match self.start_job(&run_spec, &[], None, now) {
                Ok(run) => {
                    tracing::info!(job = %spec.name, run = %run.id, tags = ?due, "scheduled run started");
                }
                // Marked as run anyway: a job that cannot start (a pull
                // job whose passive job is gone) must not be retried on
                // every tick.
                Err(error) => {
                    tracing::warn!(job = %spec.name, %error, "a scheduled run could not start");
                }
            }
            let mut job = Job::clone(job);
            for tag in due {
                job.scheduled_ms.insert(tag, now);
            }
            self.put_job(&job)?;
            changed = true;
        }
        Ok(changed)
    }

    /// Why a run on `client` may not start now, if a worker limit says so.
    pub(super) fn worker_limit_reached(&self, client: &str) -> Option<String> {
        let running: Vec<&RunRecord> = self
            .active
            .values()
            .filter(|record| record.client_assigned && !record.is_finished())
            .collect();
        let limit = self.settings.worker_limit;
        if limit > 0 && running.len() >= limit as usize {
            return Some(format!(
                "waiting for a worker: {} runs in progress (worker_limit {limit})",
                running.len()
            ));
        }
        let limit = self.settings.node_worker_limit;
        let on_client = running
            .iter()
            .filter(|record| record.run().client == client)
            .count();
        if limit > 0 && on_client >= limit as usize {
            return Some(format!(
                "waiting for a worker on {client}: {on_client} runs in progress there \
                 (node_worker_limit {limit})"
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_job_keeps_one_snapshot_and_a_full_job_its_rules() {
        let sync = JobSpec {
            r#type: SnapshotType::Sync as i32,
            keep_daily: 7,
            ..Default::default()
        };
        let rules = retention_rules(&sync);
        assert_eq!((rules.keep_last, rules.keep_daily), (1, 0));
        let full = JobSpec {
            r#type: SnapshotType::Full as i32,
            keep_daily: 7,
            schedule: vec![fabric_proto::v1::ScheduleTag {
                tag: "weekly".into(),
                interval_s: 604_800,
                keep: 4,
            }],
            ..Default::default()
        };
        let rules = retention_rules(&full);
        assert_eq!((rules.keep_last, rules.keep_daily), (0, 7));
        assert_eq!(rules.tag_keep.get("weekly"), Some(&4));
        assert!(retention_rules(&JobSpec::default()).is_empty());
    }
}
