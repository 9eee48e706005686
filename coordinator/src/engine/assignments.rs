//! What the engine sends nodes: a run's snapshot record (chosen once), the
//! client's assignment, a pull's assignment and the pull permit that goes
//! to the passive client before it, and the spare nodes of a push. Part of
//! [`super::Inner`]; it decides nothing about a run's state.

use super::*;

/// Tells a passive client that the node of `pull` (a pull assignment) may
/// pull that run, and which paths.
pub(super) fn pull_permit(pull: &CoordinatorMessage) -> Option<CoordinatorMessage> {
    let Some(coordinator_message::Kind::Assignment(assignment)) = &pull.kind else {
        return None;
    };
    if !assignment.holders.is_empty() {
        // Copied node to node: the client serves nothing.
        return None;
    }
    let job = assignment.job.clone().unwrap_or_default();
    Some(CoordinatorMessage {
        kind: Some(coordinator_message::Kind::PullPermit(PullPermit {
            run_id: assignment.run_id.clone(),
            puller: assignment.dest.clone(),
            include: job.include,
            exclude: job.exclude,
            one_file_system: job.one_file_system,
        })),
    })
}

impl Inner {
    pub(super) fn ensure_snapshot(&mut self, record: &mut RunRecord, now: i64) -> Snapshot {
        if let Some(snapshot) = record.snapshot.as_ref() {
            return snapshot.clone();
        }
        let spec = record.spec();
        let run = record.run();
        let host = self
            .nodes
            .get(&run.client)
            .and_then(|node| node.info.as_ref())
            .map(|info| info.hostname.clone())
            .filter(|hostname| !hostname.is_empty())
            .unwrap_or_else(|| run.client.clone());
        let mut snapshot = Snapshot {
            id: random_snapshot_id(&mut self.rng),
            job: spec.name.clone(),
            host,
            instance: run.instance.clone(),
            master_host: static_value(&spec.master_host),
            master_instance: static_value(&spec.master_instance),
            data_age: static_value(&spec.data_age).trim().parse().unwrap_or(0),
            r#type: if spec.r#type == SnapshotType::Unspecified as i32 {
                SnapshotType::Full as i32
            } else {
                spec.r#type
            },
            tags: spec.tags.clone(),
            start_time_ms: now,
            retain_until_ms: if spec.min_retention_s > 0 {
                now.saturating_add(
                    i64::try_from(spec.min_retention_s)
                        .unwrap_or(i64::MAX)
                        .saturating_mul(1000),
                )
            } else {
                0
            },
            ..Default::default()
        };
        snapshot.name = fabric_proto::naming::snapshot_name(&snapshot);
        record.snapshot = Some(snapshot.clone());
        snapshot
    }

    pub(super) fn target(&self, copy: &RunCopy) -> CopyTarget {
        CopyTarget {
            node: copy.node.clone(),
            address: self.address_of(&copy.node),
            background: copy.background,
        }
    }

    /// The nodes holding a run's committed snapshot, and its id there (an
    /// agent or puller that had to read the source again committed under a
    /// new id); `None` while no copy is done.
    pub(super) fn holders(&self, run: &Run) -> Option<(String, Vec<CopyTarget>)> {
        let id = run
            .copies
            .iter()
            .find(|copy| copy.state() == CopyState::Done && !copy.snapshot_id.is_empty())?
            .snapshot_id
            .clone();
        let holders = run
            .copies
            .iter()
            .filter(|copy| copy.state() == CopyState::Done && copy.snapshot_id == id)
            .map(|copy| CopyTarget {
                background: false,
                ..self.target(copy)
            })
            .collect();
        Some((id, holders))
    }

    /// Before a pull reads the source when no copy is done: a new snapshot
    /// id unless no copy of the run was ever started (in this attempt or an
    /// earlier one), since a pull that failed may still have committed under
    /// the planned one.
    pub(super) fn renew_snapshot_id_for_reread(&mut self, record: &mut RunRecord) {
        let run = record.run();
        // A retried run (attempt 2 on) may have read the source before.
        let started = run.attempt > 1
            || run
                .copies
                .iter()
                .any(|copy| copy.state() != CopyState::Pending || copy.attempts > 1);
        if !started || self.holders(run).is_some() {
            return;
        }
        let id = random_snapshot_id(&mut self.rng);
        let run_id = record.id().to_owned();
        if let Some(snapshot) = record.snapshot.as_mut() {
            tracing::info!(run = %run_id, old = %snapshot.id, new = %id, "reading the source again under a new snapshot id");
            snapshot.id = id;
        }
    }

    pub(super) fn client_assignment(
        &mut self,
        record: &mut RunRecord,
        now: i64,
    ) -> CoordinatorMessage {
        let snapshot = self.ensure_snapshot(record, now);
        let run = record.run().clone();
        let instance = (!run.instance.is_empty()).then_some(run.instance.as_str());
        let expand = |spec: &JobSpec| {
            jobfile::expand_runtime(spec, instance, &snapshot.host, snapshot.start_time_ms)
        };
        let attempt = record.assignments_sent + 1;
        let assignment = match record.run_kind() {
            RunKind::Expand => Assignment {
                run_id: run.id.clone(),
                role: AssignmentRole::Expand as i32,
                job: Some(expand(&record.spec())),
                attempt,
                ..Default::default()
            },
            RunKind::Pull => Assignment {
                run_id: run.id.clone(),
                role: AssignmentRole::Passive as i32,
                job: Some(expand(&record.passive.clone().unwrap_or_default())),
                instance: run.instance.clone(),
                snapshot: Some(snapshot.clone()),
                attempt,
                ..Default::default()
            },
            RunKind::Push | RunKind::Unspecified => {
                let spec = record.spec();
                let targets: Vec<CopyTarget> = run
                    .copies
                    .iter()
                    .filter(|copy| copy.state() != CopyState::Done)
                    .map(|copy| self.target(copy))
                    .collect();
                // A retry copies from the nodes that hold the committed
                // snapshot, under their id.
                let mut snapshot = snapshot.clone();
                let holders = match self.holders(&run) {
                    Some((id, holders)) => {
                        snapshot.id = id;
                        holders
                    }
                    None => Vec::new(),
                };
                let spares = if spec.replicas > 0 {
                    let spread_by = (!spec.spread_by.is_empty()).then_some(spec.spread_by.as_str());
                    self.spares(&run.copies, spread_by)
                } else {
                    Vec::new()
                };
                Assignment {
                    run_id: run.id.clone(),
                    role: AssignmentRole::Push as i32,
                    job: Some(expand(&spec)),
                    instance: run.instance.clone(),
                    targets,
                    snapshot: Some(snapshot),
                    attempt,
                    spares,
                    holders,
                    quota_left_bytes: self.quota_left(&spec).unwrap_or(0),
                    ..Default::default()
                }
            }
        };
        CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Assignment(assignment)),
        }
    }

    /// Healthy storage nodes outside the plan, in a random order; with
    /// `spread_by`, only nodes in failure domains the plan does not use.
    pub(super) fn spares(
        &mut self,
        copies: &[RunCopy],
        spread_by: Option<&str>,
    ) -> Vec<CopyTarget> {
        let views = self.node_views();
        let planned_domains: Vec<&str> = match spread_by {
            Some(key) => views
                .iter()
                .filter(|view| copies.iter().any(|copy| copy.node == view.id))
                .filter_map(|view| dest::domain_of(&view.labels, key))
                .collect(),
            None => Vec::new(),
        };
        let mut spares: Vec<CopyTarget> = views
            .iter()
            .filter(|view| view.healthy && view.storage)
            .filter(|view| !copies.iter().any(|copy| copy.node == view.id))
            .filter(|view| match spread_by {
                Some(key) => dest::domain_of(&view.labels, key)
                    .is_some_and(|domain| !planned_domains.contains(&domain)),
                None => true,
            })
            .cloned()
            .map(|view| CopyTarget {
                address: self.address_of(&view.id),
                node: view.id,
                background: true,
            })
            .collect();
        spares.shuffle(&mut self.rng);
        if let Some(key) = spread_by {
            // One spare per domain: two failed targets never both end up
            // in one.
            let mut seen: Vec<String> = Vec::new();
            spares.retain(|spare| {
                let domain = views
                    .iter()
                    .find(|view| view.id == spare.node)
                    .and_then(|view| dest::domain_of(&view.labels, key))
                    .unwrap_or_default()
                    .to_owned();
                if seen.contains(&domain) {
                    false
                } else {
                    seen.push(domain);
                    true
                }
            });
        }
        spares
    }

    pub(super) fn pull_assignment(
        &mut self,
        record: &mut RunRecord,
        node: &str,
        now: i64,
    ) -> CoordinatorMessage {
        let mut snapshot = self.ensure_snapshot(record, now);
        let run = record.run();
        let holders = match self.holders(run) {
            Some((id, holders)) => {
                snapshot.id = id;
                holders
            }
            None => Vec::new(),
        };
        let instance = (!run.instance.is_empty()).then_some(run.instance.as_str());
        let job = jobfile::expand_runtime(
            &record.spec(),
            instance,
            &snapshot.host,
            snapshot.start_time_ms,
        );
        let attempt = run
            .copies
            .iter()
            .find(|copy| copy.node == node)
            .map(|copy| copy.attempts.max(1))
            .unwrap_or(1);
        CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Assignment(Assignment {
                run_id: run.id.clone(),
                role: AssignmentRole::Pull as i32,
                job: Some(job),
                instance: run.instance.clone(),
                source_address: self.address_of(&run.client),
                source_node: run.client.clone(),
                snapshot: Some(snapshot),
                dest: node.to_owned(),
                attempt,
                holders,
                quota_left_bytes: self.quota_left(&record.spec()).unwrap_or(0),
                ..Default::default()
            })),
        }
    }
}
