//! Garbage collection under leases, and pruning toward a node's free-space
//! target: part of [`super::Inner`], run on every tick.
//!
//! **Leases.** A storage node collects garbage when the coordinator grants
//! it a [`GcLease`]: after deletions (retention's or pruning's), every
//! `gc_every`, or on demand (`fabricctl gc --node`). Routine and
//! retention-driven collections wait for the `gc_window`; pruning's and the
//! operator's do not. At most one lease per node, and never two at once to
//! nodes that hold a copy of the same snapshot, so a collection that went
//! wrong could never touch every copy of one backup. A lease ends after
//! `gc_lease`: the node stops rewriting packs then, and a lease whose node
//! said nothing by then (plus a minute) is taken as over. The node's
//! heartbeat names the lease it is running, so a coordinator that restarted
//! mid-collection still keeps the node's neighbours waiting.
//!
//! **Pruning** (byteback): a storage node whose free space is under its
//! `target_free_bytes` loses its least important snapshot ([`crate::prune`]
//! says which, and which never), then collects garbage, then, with the free
//! space its next heartbeat reports, goes again, one snapshot per round,
//! until it is above its target or nothing more may go; then
//! `Node.prune_blocked` says why. Pruning removes the node's copy only:
//! copies on other nodes stay, and a snapshot's last copy goes only as the
//! order allows. This module never deletes anything itself: it asks nodes,
//! which refuse what their WORM window protects.

use std::collections::HashSet;

use fabric_proto::v1::{GcDone, GcLease, GcReport};
use jiff::tz::TimeZone;
use tokio::sync::oneshot;

use super::*;
use crate::prune;
use crate::schedule::Window;

/// When and how long storage nodes collect garbage.
#[derive(Debug, Clone, PartialEq)]
pub struct GcSettings {
    /// A node collects at least this often (zero: only after deletions and
    /// on demand).
    pub every: Duration,
    /// How long a lease lasts.
    pub lease: Duration,
    /// Hours in which routine and retention-driven collections may start
    /// (none: any time).
    pub window: Option<Window>,
    /// The window's time zone.
    pub time_zone: TimeZone,
    /// How far before the oldest run in flight a leased GC spares packs:
    /// more than the clocks of the coordinator and a node may differ.
    pub clock_margin: Duration,
}

impl Default for GcSettings {
    fn default() -> Self {
        Self {
            every: Duration::from_secs(24 * 60 * 60),
            lease: Duration::from_secs(60 * 60),
            window: None,
            time_zone: TimeZone::UTC,
            clock_margin: Duration::from_secs(5 * 60),
        }
    }
}

/// How long past its end a lease whose node said nothing still counts.
const LEASE_SLACK_MS: i64 = 60_000;

/// How long a prune's deletion may go unanswered before pruning asks again.
const PRUNE_ANSWER_WAIT_MS: i64 = 60_000;

/// How long after a failed collection the next one is granted by itself
/// (an operator's ask is not held back): a store that fails every GC is
/// not asked again on every tick.
const GC_RETRY_AFTER_MS: i64 = 60_000;

/// How often a node that pruning cannot bring to its target is looked at
/// again while what it stores stays the same (the plan reads the whole
/// catalogue).
const PRUNE_BLOCKED_RECHECK_MS: i64 = 60_000;

/// What an on-demand collection's caller is told.
pub type GcAnswer = Result<GcReport, String>;

/// A lease granted and not yet answered.
struct Granted {
    lease_id: u64,
    granted_ms: i64,
    expires_ms: i64,
    waiters: Vec<oneshot::Sender<GcAnswer>>,
}

/// An operator's collection waiting for its lease.
#[derive(Default)]
struct Asked {
    repack_threshold: f64,
    waiters: Vec<oneshot::Sender<GcAnswer>>,
}

/// The engine's book of collections and prunes (in memory: a restarted
/// coordinator learns running collections from heartbeats).
#[derive(Default)]
pub(super) struct GcBook {
    granted: HashMap<String, Granted>,
    asked: HashMap<String, Asked>,
    /// The lease each node's last heartbeat says it is running (0: none).
    running: HashMap<String, u64>,
    /// Nodes whose wanted collection is for space: no window.
    urgent: HashSet<String>,
    /// When each node last reported a deletion (a collection granted
    /// before it leaves the node wanting another; a restarted coordinator
    /// goes by `Node.gc_wanted_since_ms` alone).
    last_deletion: HashMap<String, i64>,
    /// Nodes that ended a collection and have not sent a heartbeat since:
    /// their free space is not measured yet.
    unmeasured: HashSet<String>,
    /// Nodes a prune's deletion was sent to, and when.
    prune_sent: HashMap<String, i64>,
    /// When pruning last found it could not reach a node's target, and
    /// what the node stored then (a change, such as a new snapshot, has it
    /// look again at once).
    prune_blocked_at: HashMap<String, (i64, u64)>,
    /// When this coordinator first saw each node: the routine interval of
    /// a node that never collected under it counts from then, so a new
    /// fabric does not start by collecting everywhere.
    first_seen: HashMap<String, i64>,
    next_lease_id: u64,
}

impl GcBook {
    pub(super) fn new(now: i64) -> Self {
        Self {
            // Ids unique across restarts, so a late answer to an old
            // coordinator's lease is not taken for a new one.
            next_lease_id: u64::try_from(now).unwrap_or(1).max(1),
            ..Self::default()
        }
    }

    /// What the node's heartbeat says it is running.
    pub(super) fn heartbeat(&mut self, node_id: &str, lease_id: u64) {
        self.unmeasured.remove(node_id);
        if lease_id == 0 {
            self.running.remove(node_id);
        } else {
            self.running.insert(node_id.to_owned(), lease_id);
        }
    }

    /// Whether `node_id` collects garbage now, as far as the coordinator knows.
    fn busy(&self, node_id: &str) -> bool {
        self.granted.contains_key(node_id) || self.running.contains_key(node_id)
    }

    /// Tells every caller waiting on `node_id` that no collection comes.
    pub(super) fn node_gone(&mut self, node_id: &str) {
        let why = format!("node {node_id} disconnected before its GC ended");
        if let Some(granted) = self.granted.remove(node_id) {
            answer(granted.waiters, &Err(why.clone()));
        }
        if let Some(asked) = self.asked.remove(node_id) {
            answer(asked.waiters, &Err(why));
        }
        self.running.remove(node_id);
        self.prune_sent.remove(node_id);
    }
}

fn answer(waiters: Vec<oneshot::Sender<GcAnswer>>, result: &GcAnswer) {
    for waiter in waiters {
        // A caller that gave up is no longer listening; nothing to do.
        let _ = waiter.send(result.clone());
    }
}

impl Inner {
    /// An operator asks for a collection on `node_id` now: checked, then
    /// queued for the next grant (which this call tries at once).
    pub(super) fn ask_gc(
        &mut self,
        node_id: &str,
        repack_threshold: f64,
        now: i64,
    ) -> Result<oneshot::Receiver<GcAnswer>, EngineError> {
        if !(0.0..1.0).contains(&repack_threshold) {
            return Err(EngineError::InvalidArgument(format!(
                "repack_threshold must be a fraction in [0, 1) (0 for the store's default), \
                 got {repack_threshold}"
            )));
        }
        let Some(node) = self.nodes.get(node_id) else {
            return Err(EngineError::NotFound(format!("no node {node_id:?}")));
        };
        if !is_storage(node) {
            return Err(EngineError::FailedPrecondition(format!(
                "node {node_id} is not a storage node: it has no store to collect"
            )));
        }
        if !self.sessions.contains_key(node_id) {
            return Err(EngineError::FailedPrecondition(format!(
                "node {node_id} is not connected to the coordinator"
            )));
        }
        let (sender, receiver) = oneshot::channel();
        let asked = self.gc.asked.entry(node_id.to_owned()).or_default();
        asked.repack_threshold = repack_threshold;
        asked.waiters.push(sender);
        self.grant_gc_leases(now)?;
        Ok(receiver)
    }

    /// A node's answer to a lease: recorded on the node, told to waiters.
    pub(super) fn gc_done(
        &mut self,
        node_id: &str,
        done: &GcDone,
        now: i64,
    ) -> Result<(), StateError> {
        // An answer to an older lease (or one a restarted coordinator never
        // granted) leaves the current one in place.
        let answers_current = self
            .gc
            .granted
            .get(node_id)
            .is_some_and(|granted| granted.lease_id == done.lease_id);
        let granted = if answers_current {
            self.gc.granted.remove(node_id)
        } else {
            None
        };
        if self.gc.running.get(node_id) == Some(&done.lease_id) {
            self.gc.running.remove(node_id);
        }
        let result: GcAnswer = match (&done.report, done.error.is_empty()) {
            (Some(report), true) => Ok(*report),
            _ if !done.error.is_empty() => Err(done.error.clone()),
            _ => Err(format!(
                "node {node_id} answered GC lease {} without a report",
                done.lease_id
            )),
        };
        self.gc.unmeasured.insert(node_id.to_owned());
        let Some(node) = self.nodes.get_mut(node_id) else {
            return Ok(());
        };
        node.last_gc_ms = now;
        match &result {
            Ok(report) => {
                tracing::info!(
                    node = %node_id,
                    lease = done.lease_id,
                    freed_bytes = report.freed_bytes,
                    swept_chunks = report.swept_chunks,
                    packs_left = report.packs_left_at_lease_end,
                    "GC done"
                );
                node.last_gc = Some(*report);
                node.last_gc_error.clear();
                // Deletions after the grant want another collection.
                let granted_ms = granted.as_ref().map_or(0, |granted| granted.granted_ms);
                let last_deletion = self
                    .gc
                    .last_deletion
                    .get(node_id)
                    .copied()
                    .unwrap_or(node.gc_wanted_since_ms)
                    .max(node.gc_wanted_since_ms);
                if node.gc_wanted_since_ms != 0 && last_deletion < granted_ms {
                    node.gc_wanted_since_ms = 0;
                    self.gc.urgent.remove(node_id);
                }
            }
            Err(error) => {
                tracing::warn!(node = %node_id, lease = done.lease_id, %error, "GC failed");
                node.last_gc_error.clone_from(error);
                // Still to do: again after GC_RETRY_AFTER_MS, not a whole
                // gc_every later.
                if node.gc_wanted_since_ms == 0 {
                    node.gc_wanted_since_ms = now;
                }
            }
        }
        let node = node.clone();
        self.store.put_node(&node)?;
        if let Some(granted) = granted {
            answer(granted.waiters, &result);
        }
        Ok(())
    }

    /// A node deleted snapshots: its store wants a collection.
    pub(super) fn gc_wanted(&mut self, node_id: &str, now: i64) -> Result<(), StateError> {
        self.gc.prune_sent.remove(node_id);
        self.gc.last_deletion.insert(node_id.to_owned(), now);
        let Some(node) = self.nodes.get_mut(node_id) else {
            return Ok(());
        };
        if node.gc_wanted_since_ms == 0 {
            node.gc_wanted_since_ms = now;
            let node = node.clone();
            self.store.put_node(&node)?;
        }
        Ok(())
    }

    /// The tick's part: leases that ran out, prunes, then new grants.
    /// Returns whether anything stored changed.
    pub(super) fn gc_upkeep(&mut self, now: i64) -> Result<bool, StateError> {
        let expired: Vec<String> = self
            .gc
            .granted
            .iter()
            .filter(|(_, granted)| now > granted.expires_ms + LEASE_SLACK_MS)
            .map(|(node, _)| node.clone())
            .collect();
        for node in expired {
            if let Some(granted) = self.gc.granted.remove(&node) {
                tracing::warn!(%node, lease = granted.lease_id, "GC lease ended without an answer");
                answer(
                    granted.waiters,
                    &Err(format!(
                        "node {node} did not answer GC lease {} before it ended",
                        granted.lease_id
                    )),
                );
            }
        }
        let pruned = self.prune_for_space(now)?;
        self.grant_gc_leases(now)?;
        Ok(pruned)
    }

    /// Grants leases to the nodes that are due, most urgent first, skipping
    /// any that shares a snapshot with a node collecting now.
    fn grant_gc_leases(&mut self, now: i64) -> Result<(), StateError> {
        let settings = self.settings.gc.clone();
        let in_window = settings
            .window
            .as_ref()
            .is_none_or(|window| window.contains(&settings.time_zone, now));
        let every = millis(settings.every);
        // (priority, since, node): operator's, then for space, then
        // deletions, then routine, each oldest first.
        let mut due: Vec<(u8, i64, String)> = Vec::new();
        for (id, node) in &self.nodes {
            if !is_storage(node) || !self.sessions.contains_key(id) || self.gc.busy(id) {
                continue;
            }
            let failed_recently = !node.last_gc_error.is_empty()
                && now.saturating_sub(node.last_gc_ms) < GC_RETRY_AFTER_MS;
            let routine_since = node
                .last_gc_ms
                .max(*self.gc.first_seen.entry(id.clone()).or_insert(now));
            if self.gc.asked.contains_key(id) {
                due.push((0, 0, id.clone()));
            } else if failed_recently {
                continue;
            } else if node.gc_wanted_since_ms != 0 && self.gc.urgent.contains(id) {
                due.push((1, node.gc_wanted_since_ms, id.clone()));
            } else if in_window && node.gc_wanted_since_ms != 0 {
                due.push((2, node.gc_wanted_since_ms, id.clone()));
            } else if in_window && every > 0 && now.saturating_sub(routine_since) >= every {
                due.push((3, routine_since, id.clone()));
            }
        }
        if due.is_empty() {
            return Ok(());
        }
        due.sort();
        let mut holders: HashMap<String, HashSet<String>> = HashMap::new();
        for entry in self.store.catalog()? {
            let Some(snapshot) = entry.snapshot else {
                continue;
            };
            for copy in entry.copies {
                holders
                    .entry(copy.node)
                    .or_default()
                    .insert(snapshot.id.clone());
            }
        }
        let empty = HashSet::new();
        let mut collecting: Vec<String> = self
            .gc
            .granted
            .keys()
            .chain(self.gc.running.keys())
            .cloned()
            .collect();
        // 0: no run in flight. A run never assigned (queued for a worker,
        // its node or a destination) writes nothing yet, however old it
        // is; one assigned before, whose client reconnects, may still be
        // uploading.
        let margin = millis(settings.clock_margin);
        let writes_since_ms = self
            .active
            .values()
            .filter(|record| record.client_assigned || record.assignments_sent > 0)
            .map(|record| {
                record
                    .run()
                    .created_ms
                    .min(now)
                    .saturating_sub(margin)
                    .max(1)
            })
            .chain(
                // A copy re-replication started uploads like a run.
                self.replicas
                    .oldest_started_ms()
                    .map(|started| started.min(now).saturating_sub(margin).max(1)),
            )
            .min()
            .unwrap_or(0);
        for (_, _, node) in due {
            let held = holders.get(&node).unwrap_or(&empty);
            let conflict = collecting.iter().find(|other| {
                holders
                    .get(*other)
                    .is_some_and(|theirs| !theirs.is_disjoint(held))
            });
            if let Some(other) = conflict {
                tracing::debug!(%node, %other, "GC waits: the nodes share a snapshot");
                continue;
            }
            let asked = self.gc.asked.remove(&node).unwrap_or_default();
            let lease_id = self.gc.next_lease_id;
            self.gc.next_lease_id += 1;
            let expires_ms = now.saturating_add(millis(settings.lease));
            let message = CoordinatorMessage {
                kind: Some(coordinator_message::Kind::GcLease(GcLease {
                    lease_id,
                    expires_ms,
                    writes_since_ms,
                    repack_threshold: asked.repack_threshold,
                })),
            };
            if !self.send(&node, message) {
                answer(
                    asked.waiters,
                    &Err(format!("node {node} disconnected before its GC started")),
                );
                continue;
            }
            tracing::info!(%node, lease = lease_id, "GC lease granted");
            self.gc.granted.insert(
                node.clone(),
                Granted {
                    lease_id,
                    granted_ms: now,
                    expires_ms,
                    waiters: asked.waiters,
                },
            );
            collecting.push(node);
        }
        Ok(())
    }

    /// One round of pruning on each storage node under its target whose
    /// last round is swept and measured. Returns whether a node's stored
    /// state changed.
    fn prune_for_space(&mut self, now: i64) -> Result<bool, StateError> {
        let short: Vec<String> = self
            .nodes
            .iter()
            .filter(|(id, node)| {
                let Some(info) = node.info.as_ref() else {
                    return false;
                };
                let waiting_answer = self
                    .gc
                    .prune_sent
                    .get(*id)
                    .is_some_and(|sent| now.saturating_sub(*sent) < PRUNE_ANSWER_WAIT_MS);
                let blocked_lately =
                    self.gc
                        .prune_blocked_at
                        .get(*id)
                        .is_some_and(|(at, stored)| {
                            *stored == node.stored_bytes
                                && now.saturating_sub(*at) < PRUNE_BLOCKED_RECHECK_MS
                        });
                is_storage(node)
                    && self.sessions.contains_key(*id)
                    && !waiting_answer
                    && !blocked_lately
                    && !self.gc.busy(id)
                    // Deletions not swept yet, or no heartbeat since the
                    // last collection: the free space is not what it will be.
                    && node.gc_wanted_since_ms == 0
                    && !self.gc.unmeasured.contains(*id)
                    // Under its target, or above it again with an old
                    // "blocked" message to clear.
                    && ((info.target_free_bytes > 0 && info.free_bytes < info.target_free_bytes)
                        || !node.prune_blocked.is_empty())
            })
            .map(|(id, _)| id.clone())
            .collect();
        if short.is_empty() {
            return Ok(false);
        }
        let mut changed = false;
        // Read once, and only when a node needs a plan: the catalogue and
        // each job's rules are the same for every node.
        let mut loaded: Option<PruneInputs> = None;
        for id in short {
            let Some(node) = self.nodes.get(&id) else {
                continue;
            };
            let (target, free) = node
                .info
                .as_ref()
                .map_or((0, 0), |info| (info.target_free_bytes, info.free_bytes));
            if target == 0 || free >= target {
                if !node.prune_blocked.is_empty() {
                    let mut node = node.clone();
                    node.prune_blocked.clear();
                    self.store.put_node(&node)?;
                    self.nodes.insert(id.clone(), node);
                    changed = true;
                }
                continue;
            }
            let inputs = match loaded {
                Some(ref inputs) => inputs,
                None => loaded.insert(self.prune_inputs()?),
            };
            let on_node: HashSet<String> = inputs
                .catalog
                .iter()
                .filter(|entry| entry.copies.iter().any(|copy| copy.node == id))
                .filter_map(|entry| entry.snapshot.as_ref().map(|s| s.id.clone()))
                .collect();
            let plan = prune::plan(
                &inputs.snapshots,
                &on_node,
                &inputs.rules,
                &inputs.failing,
                now,
            );
            let Some(first) = plan.order.first() else {
                self.gc
                    .prune_blocked_at
                    .insert(id.clone(), (now, node.stored_bytes));
                let why = format!(
                    "node {id} has {} free, under its target_free {}, and nothing more may be \
                     pruned: {}",
                    bytes(free),
                    bytes(target),
                    plan.unremovable
                );
                if node.prune_blocked != why {
                    tracing::warn!(node = %id, "{why}");
                    let mut node = node.clone();
                    node.prune_blocked = why;
                    self.store.put_node(&node)?;
                    self.nodes.insert(id.clone(), node);
                    changed = true;
                }
                continue;
            };
            tracing::info!(
                node = %id,
                snapshot = %first.id,
                job = %first.job,
                free_bytes = free,
                target_free_bytes = target,
                why = %first.why,
                "pruning for space"
            );
            let message = CoordinatorMessage {
                kind: Some(coordinator_message::Kind::DeleteSnapshots(
                    DeleteSnapshots {
                        ids: vec![first.id.clone()],
                    },
                )),
            };
            if self.send(&id, message) {
                self.gc.prune_sent.insert(id.clone(), now);
                self.gc.urgent.insert(id.clone());
            }
        }
        Ok(changed)
    }

    /// What every node's pruning plan reads: the catalogue, its snapshots,
    /// each of their jobs' pruning rules (target ages from its schedule, at
    /// least one snapshot kept per group, more with `keep_last`) and the
    /// jobs whose last run failed.
    fn prune_inputs(&self) -> Result<PruneInputs, StateError> {
        let catalog = self.store.catalog()?;
        let snapshots: Vec<retention::SnapshotInfo> = catalog
            .iter()
            .filter_map(|entry| entry.snapshot.as_ref().map(retention::SnapshotInfo::from))
            .collect();
        let jobs: HashSet<&str> = snapshots.iter().map(|s| s.job.as_str()).collect();
        let mut rules = BTreeMap::new();
        let mut failing = HashSet::new();
        for job in jobs {
            let spec = self
                .store
                .job(job)?
                .and_then(|job| job.spec)
                .unwrap_or_default();
            rules.insert(
                job.to_owned(),
                prune::PruneRules {
                    target_ages_ms: prune::target_ages(Schedule::of(&spec).as_ref()),
                    min_keep: spec.keep_last.max(1),
                },
            );
            if self.last_finished_run_failed(job)? {
                failing.insert(job.to_owned());
            }
        }
        Ok(PruneInputs {
            catalog,
            snapshots,
            rules,
            failing,
        })
    }
}

/// What [`prune::plan`] reads besides the node, the same for every node.
struct PruneInputs {
    catalog: Vec<CatalogEntry>,
    snapshots: Vec<retention::SnapshotInfo>,
    rules: BTreeMap<String, prune::PruneRules>,
    failing: HashSet<String>,
}

/// `bytes` for people: "1.5 GiB".
fn bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
