//! Re-replication: keeping every snapshot at its replica target. Part of
//! [`super::Inner`], looked at on every tick and acted on every
//! `check_every`: the rules of [`crate::replicas`] say which snapshots are
//! short of their target and which copies to make; this module sends each
//! copy to its target node as a [`Replicate`] (the target asks a holder for
//! it over `Storage.CopySnapshot`) and records the copy in the catalogue
//! when the target answers that it committed it.
//!
//! A snapshot must be short for `check_every` before a copy starts, so
//! that the moment between retention deleting one copy and the next is
//! not taken for a loss. One copy per snapshot at a time, at most
//! `per_node` copies sent or received by one node at once, each paced to
//! `bandwidth_limit_bytes_per_s`; a copy that failed is not tried again to
//! the same node for [`RETRY_AFTER_MS`]. A copy's answer is believed only
//! from the node it was asked of, and only for the snapshot asked for.
//! Nothing here deletes a copy.

use std::collections::HashSet;

use fabric_proto::v1::{CopyTarget, RepairChunks, RepairDone, Replicate, Replicated};

use super::*;
use crate::replicas::{self, PlanLimits, ReplicaNode, ReplicaRules};

/// How the coordinator keeps snapshots at their replica targets.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicationSettings {
    /// How long a node may be lost before its copies are made again
    /// elsewhere (zero: no re-replication at all).
    pub replace_after: Duration,
    /// How often the catalogue is looked at, and how long a snapshot must
    /// be short of its target before a copy starts.
    pub check_every: Duration,
    /// The most copies one node sends or receives at once.
    pub per_node: u32,
    /// The most bytes a second each copy sends (0: no limit beyond the
    /// nodes' own).
    pub bandwidth_limit_bytes_per_s: u64,
}

impl Default for ReplicationSettings {
    fn default() -> Self {
        Self {
            replace_after: Duration::from_secs(30 * 60),
            check_every: Duration::from_secs(30),
            per_node: 1,
            bandwidth_limit_bytes_per_s: 0,
        }
    }
}

/// How long after a failed copy to a node the same copy is tried again.
pub(super) const RETRY_AFTER_MS: i64 = 5 * 60 * 1000;

/// How long a copy may go unanswered before it is taken as lost (its node
/// restarted, say) and may be planned again.
const UNANSWERED_AFTER_MS: i64 = 24 * 60 * 60 * 1000;

/// How long a repair may go unanswered before the node is asked again.
const REPAIR_ASK_AGAIN_MS: i64 = 5 * 60 * 1000;

/// A copy asked for and not answered yet.
#[derive(Debug, Clone)]
pub(super) struct InFlight {
    pub snapshot_id: String,
    pub target: String,
    /// The holder asked first (it counts as busy).
    pub source: String,
    /// The entry's target when it was planned, recorded with the copy in
    /// an entry that had none.
    pub replica_target: u32,
    pub started_ms: i64,
    /// An off-site sync's copy (`engine/offsite.rs`), not re-replication.
    pub offsite: bool,
}

/// What re-replication remembers between ticks (not persisted: a
/// coordinator that restarts plans again, and still records the answers
/// of copies it asked for before).
#[derive(Debug, Default)]
pub(super) struct ReplicaBook {
    pub next_id: u64,
    pub in_flight: BTreeMap<u64, InFlight>,
    pub last_check_ms: i64,
    /// Since when each snapshot has been short of its target.
    short_since: HashMap<String, i64>,
    /// (snapshot, target) → when a copy there may be tried again.
    pub held_back: HashMap<(String, String), i64>,
    /// Nodes asked to repair damaged chunks, and when.
    repairs_asked: HashMap<String, i64>,
    /// (snapshot, node) pairs asked to verify a new copy, and the run
    /// that made it: only their answers are believed
    /// (`engine/verify_after_backup.rs`).
    pub verifies_asked: HashMap<(String, String), String>,
}

impl ReplicaBook {
    pub(super) fn new(now: i64) -> Self {
        Self {
            // Ids from the clock: an answer meant for an earlier
            // coordinator never matches a copy asked by this one.
            next_id: u64::try_from(now).unwrap_or(1).max(1),
            last_check_ms: now,
            ..Default::default()
        }
    }

    /// When the oldest copy in flight started, if any: a GC on its target
    /// must spare what it has uploaded so far.
    pub(super) fn oldest_started_ms(&self) -> Option<i64> {
        self.in_flight.values().map(|copy| copy.started_ms).min()
    }
}

impl Inner {
    fn replica_rules(&self) -> ReplicaRules {
        let replace_after = self.settings.replication.replace_after;
        ReplicaRules {
            // `0s`: a lost node's copies are never replaced (they keep
            // counting); drained and damaged ones still are.
            replace_after_ms: if replace_after.is_zero() {
                i64::MAX
            } else {
                millis(replace_after)
            },
        }
    }

    /// The nodes as the replica rules see them.
    pub(super) fn replica_nodes(&self) -> HashMap<String, ReplicaNode> {
        let views: HashMap<String, NodeView> = self
            .node_views()
            .into_iter()
            .map(|view| (view.id.clone(), view))
            .collect();
        self.nodes
            .iter()
            .map(|(id, node)| {
                let connected = self.sessions.contains_key(id);
                let lost_since_ms = (node.state() == NodeState::Lost).then(|| {
                    self.last_seen
                        .get(id)
                        .copied()
                        .unwrap_or(node.last_heartbeat_ms)
                });
                let accepts_copies = views
                    .get(id)
                    .is_some_and(|view| view.storage && view.healthy);
                let free_bytes = node.info.as_ref().map_or(0, |info| info.free_bytes);
                (
                    id.clone(),
                    ReplicaNode {
                        connected,
                        accepts_copies,
                        lost_since_ms,
                        free_bytes,
                        draining: node.draining_since_ms != 0,
                        labels: node
                            .info
                            .as_ref()
                            .map(|info| info.labels.clone())
                            .unwrap_or_default(),
                    },
                )
            })
            .collect()
    }

    /// The catalogue entries with each copy's problem and the count of
    /// copies that count, for listings.
    pub(super) fn annotate_replicas(&self, entries: &mut [CatalogEntry], now: i64) {
        let nodes = self.replica_nodes();
        let rules = self.replica_rules();
        for entry in entries {
            entry.healthy_copies =
                u32::try_from(replicas::counted_copies(entry, &nodes, &rules, now))
                    .unwrap_or(u32::MAX);
            for copy in &mut entry.copies {
                copy.problem = replicas::copy_problem(copy, nodes.get(&copy.node), &rules, now)
                    .map(|problem| problem.describe(now))
                    .unwrap_or_default();
            }
        }
    }

    /// A storage node's scrub reported damaged chunks: ask it to repair
    /// them from the other connected storage nodes (once per
    /// [`REPAIR_ASK_AGAIN_MS`] while it does not answer).
    pub(super) fn ask_repair(&mut self, node_id: &str, ids: Vec<Vec<u8>>, now: i64) {
        if self
            .replicas
            .repairs_asked
            .get(node_id)
            .is_some_and(|asked| now.saturating_sub(*asked) < REPAIR_ASK_AGAIN_MS)
        {
            return;
        }
        let sources: Vec<CopyTarget> = self
            .node_views()
            .into_iter()
            .filter(|view| {
                view.storage && view.id != node_id && self.sessions.contains_key(&view.id)
            })
            .map(|view| CopyTarget {
                address: self.address_of(&view.id),
                node: view.id,
                background: false,
            })
            .collect();
        if sources.is_empty() {
            tracing::warn!(node = %node_id, chunks = ids.len(), "damaged chunks, and no other storage node to repair them from");
            return;
        }
        tracing::info!(node = %node_id, chunks = ids.len(), sources = sources.len(), "asking for a repair of damaged chunks");
        let message = CoordinatorMessage {
            kind: Some(coordinator_message::Kind::RepairChunks(RepairChunks {
                ids,
                sources,
            })),
        };
        if self.send(node_id, message) {
            self.replicas.repairs_asked.insert(node_id.to_owned(), now);
        }
    }

    /// A node's repair ended: what no one could repair marks its copies of
    /// the snapshots using it damaged (they stop counting, so other copies
    /// are made), and a snapshot left with no undamaged copy DAMAGED.
    pub(super) fn repair_done(
        &mut self,
        node_id: &str,
        done: &RepairDone,
        now: i64,
    ) -> Result<(), StateError> {
        if done.unrepairable.is_empty() && done.error.is_empty() {
            self.replicas.repairs_asked.remove(node_id);
            if done.repaired > 0 {
                let cleared = self.store.clear_catalog_damage(node_id)?;
                if cleared > 0 {
                    tracing::info!(node = %node_id, copies = cleared, "repaired: copies marked damaged count again");
                }
            }
        } else {
            // What could not be repaired now is asked about again only
            // after a while (another copy may turn up), not on every
            // heartbeat that still names it.
            self.replicas.repairs_asked.insert(node_id.to_owned(), now);
        }
        let summary = if done.unrepairable.is_empty() && done.error.is_empty() {
            format!(
                "{} chunk(s) repaired, {} pack(s) rewritten",
                done.repaired, done.packs_rewritten
            )
        } else {
            format!(
                "{} chunk(s) repaired, {} unrepairable ({} snapshot(s) damaged here){}{}",
                done.repaired,
                done.unrepairable.len(),
                done.damaged_snapshots.len(),
                if done.error.is_empty() { "" } else { ": " },
                done.error
            )
        };
        let nothing_to_do =
            done.repaired == 0 && done.unrepairable.is_empty() && done.error.is_empty();
        if nothing_to_do {
            // Found intact already (a repair that overlapped a scrub).
            return Ok(());
        }
        if let Some(node) = self.nodes.get_mut(node_id) {
            node.last_repair = summary.clone();
            let node = node.clone();
            self.store.put_node(&node)?;
        }
        tracing::info!(node = %node_id, %summary, "repair ended");
        for snapshot in &done.damaged_snapshots {
            let reason = format!(
                "{} chunk(s) damaged and found on no other node",
                done.unrepairable.len()
            );
            if self
                .store
                .mark_catalog_copy_damaged(snapshot, node_id, &reason)?
            {
                tracing::error!(node = %node_id, %snapshot, "a copy with damage no other node could repair: it no longer counts");
            }
        }
        Ok(())
    }

    /// The snapshots of `entries` short of their targets now, as (job,
    /// copies that count, target), for `check`.
    pub(super) fn replica_shortfalls(
        &self,
        entries: &[CatalogEntry],
        now: i64,
    ) -> Vec<(String, usize, usize)> {
        let jobs: HashMap<&str, &str> = entries
            .iter()
            .filter_map(|entry| {
                let snapshot = entry.snapshot.as_ref()?;
                Some((snapshot.id.as_str(), snapshot.job.as_str()))
            })
            .collect();
        replicas::short_of_target(entries, &self.replica_nodes(), &self.replica_rules(), now)
            .into_iter()
            .filter_map(|(id, counted, target)| {
                Some((jobs.get(id.as_str())?.to_string(), counted, target))
            })
            .collect()
    }

    /// On every tick: every `check_every`, start the copies that bring
    /// snapshots back to their targets.
    pub(super) fn replication_upkeep(&mut self, now: i64) -> Result<bool, StateError> {
        let settings = self.settings.replication.clone();
        let check_every = millis(settings.check_every).max(1);
        if now.saturating_sub(self.replicas.last_check_ms) < check_every {
            return Ok(false);
        }
        self.replicas.last_check_ms = now;
        // A copy whose target went away is taken as lost (its answer, if
        // it comes after a reconnect, is still recorded).
        let connected: HashSet<String> = self.sessions.keys().cloned().collect();
        self.replicas.in_flight.retain(|_, copy| {
            now.saturating_sub(copy.started_ms) < UNANSWERED_AFTER_MS
                && connected.contains(&copy.target)
        });
        self.replicas.held_back.retain(|_, until| *until > now);

        let entries = self.store.catalog()?;
        let nodes = self.replica_nodes();
        let rules = self.replica_rules();
        let short = replicas::short_of_target(&entries, &nodes, &rules, now);
        let short_now: HashSet<&str> = short.iter().map(|(id, _, _)| id.as_str()).collect();
        self.replicas
            .short_since
            .retain(|id, _| short_now.contains(id.as_str()));
        for (id, counted, target) in &short {
            if !self.replicas.short_since.contains_key(id) {
                tracing::info!(snapshot = %id, copies = counted, target, "snapshot short of its replica target");
                self.replicas.short_since.insert(id.clone(), now);
            }
        }
        // Short for a whole check: a deletion in progress is not a loss.
        let settled: Vec<(String, usize, usize)> = short
            .into_iter()
            .filter(|(id, _, _)| {
                self.replicas
                    .short_since
                    .get(id)
                    .is_some_and(|since| now.saturating_sub(*since) >= check_every)
            })
            .collect();
        self.drain_upkeep(&entries, &nodes, now)?;
        self.offsite_upkeep(&entries, &nodes, now)?;
        if settled.is_empty() {
            return Ok(false);
        }
        let mut busy: HashMap<String, usize> = HashMap::new();
        for copy in self.replicas.in_flight.values() {
            *busy.entry(copy.source.clone()).or_default() += 1;
            *busy.entry(copy.target.clone()).or_default() += 1;
        }
        let in_flight: Vec<String> = self
            .replicas
            .in_flight
            .values()
            .map(|copy| copy.snapshot_id.clone())
            .collect();
        let held_back: Vec<(String, String)> = self.replicas.held_back.keys().cloned().collect();
        let spread_by: HashMap<String, String> = self
            .stored_jobs()?
            .into_iter()
            .filter_map(|job| job.spec.clone())
            .filter(|spec| !spec.spread_by.is_empty())
            .map(|spec| (spec.name, spec.spread_by))
            .collect();
        let limits = PlanLimits {
            spread_by,
            busy,
            per_node: settings.per_node as usize,
            in_flight: in_flight.iter().map(String::as_str).collect(),
            held_back: held_back
                .iter()
                .map(|(snapshot, node)| (snapshot.as_str(), node.as_str()))
                .collect(),
        };
        let planned = replicas::plan(&entries, &settled, &nodes, &limits);
        let targets: HashMap<&str, usize> = settled
            .iter()
            .map(|(id, _, target)| (id.as_str(), *target))
            .collect();
        for copy in planned {
            let id = self.replicas.next_id;
            self.replicas.next_id += 1;
            let holders = copy
                .holders
                .iter()
                .map(|node| CopyTarget {
                    node: node.clone(),
                    address: self.address_of(node),
                    background: false,
                })
                .collect();
            let message = CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Replicate(Replicate {
                    replication_id: id,
                    snapshot_id: copy.snapshot_id.clone(),
                    holders,
                    bandwidth_limit_bytes_per_s: settings.bandwidth_limit_bytes_per_s,
                })),
            };
            if !self.send(&copy.target, message) {
                continue;
            }
            tracing::info!(snapshot = %copy.snapshot_id, target = %copy.target, from = %copy.holders.join(","), "re-replication: copy started");
            let replica_target = targets
                .get(copy.snapshot_id.as_str())
                .map_or(0, |target| u32::try_from(*target).unwrap_or(u32::MAX));
            self.replicas.in_flight.insert(
                id,
                InFlight {
                    snapshot_id: copy.snapshot_id,
                    target: copy.target,
                    source: copy.holders.first().cloned().unwrap_or_default(),
                    replica_target,
                    started_ms: now,
                    offsite: false,
                },
            );
        }
        Ok(false)
    }

    /// Draining nodes: delete there what is at its target without them,
    /// and say how far each got (`Node.drain`).
    fn drain_upkeep(
        &mut self,
        entries: &[CatalogEntry],
        nodes: &HashMap<String, ReplicaNode>,
        now: i64,
    ) -> Result<(), StateError> {
        let rules = self.replica_rules();
        let draining: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, node)| node.draining_since_ms != 0)
            .map(|(id, _)| id.clone())
            .collect();
        for node_id in draining {
            let mut left = 0usize;
            let mut moved = Vec::new();
            for entry in entries {
                let Some(copy) = entry.copies.iter().find(|copy| copy.node == node_id) else {
                    continue;
                };
                left += 1;
                // Deleted here only once its target is met on nodes in
                // session (a copy on a node lost a moment ago counts for
                // re-replication, but is no place to move to).
                let elsewhere = entry
                    .copies
                    .iter()
                    .filter(|other| other.node != node_id && other.damage.is_empty())
                    .filter(|other| {
                        nodes.get(&other.node).is_some_and(|node| {
                            node.connected && !node.draining && node.lost_since_ms.is_none()
                        })
                    })
                    .count();
                if elsewhere >= replicas::target_of(entry)
                    && replicas::counted_copies(entry, nodes, &rules, now)
                        >= replicas::target_of(entry)
                {
                    moved.push(copy.snapshot_id.clone());
                }
            }
            if !moved.is_empty() {
                moved.truncate(1000);
                let delete = CoordinatorMessage {
                    kind: Some(coordinator_message::Kind::DeleteSnapshots(
                        DeleteSnapshots { ids: moved.clone() },
                    )),
                };
                if self.send(&node_id, delete) {
                    tracing::info!(node = %node_id, snapshots = moved.len(), "drain: copied elsewhere, deleting here");
                }
            }
            let progress = if left == 0 {
                "removable".to_owned()
            } else {
                format!(
                    "{left} snapshot(s) left, {} at their target elsewhere and being deleted here",
                    moved.len()
                )
            };
            if let Some(node) = self.nodes.get_mut(&node_id)
                && node.drain != progress
            {
                if left == 0 {
                    tracing::info!(node = %node_id, "drain complete: the node is removable");
                }
                node.drain = progress;
                let node = node.clone();
                self.store.put_node(&node)?;
            }
        }
        Ok(())
    }

    /// Starts (or, with `cancel`, stops) draining storage node `node_id`.
    pub(super) fn drain_node(
        &mut self,
        node_id: &str,
        cancel: bool,
        now: i64,
    ) -> Result<Node, EngineError> {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return Err(EngineError::NotFound(format!("no node {node_id:?}")));
        };
        if !is_storage(node) {
            return Err(EngineError::InvalidArgument(format!(
                "node {node_id} keeps no store: there is nothing to drain"
            )));
        }
        if cancel {
            node.draining_since_ms = 0;
            node.drain.clear();
            tracing::info!(node = %node_id, "drain cancelled");
        } else if node.draining_since_ms == 0 {
            node.draining_since_ms = now;
            node.drain = "starting".to_owned();
            tracing::info!(node = %node_id, "drain started");
        }
        let node = node.clone();
        self.store.put_node(&node)?;
        // The next tick looks at it at once.
        self.replicas.last_check_ms = 0;
        Ok(node)
    }

    /// A node's answer to a [`Replicate`]: record its copy, or hold the
    /// copy to it back for a while.
    pub(super) fn replicated(
        &mut self,
        node_id: &str,
        answer: &Replicated,
        now: i64,
    ) -> Result<(), StateError> {
        let asked = self.replicas.in_flight.get(&answer.replication_id).cloned();
        if let Some(asked) = &asked {
            if asked.target != node_id || asked.snapshot_id != answer.snapshot_id {
                tracing::warn!(node = %node_id, replication = answer.replication_id, "an answer to a copy this node was not asked for ignored");
                return Ok(());
            }
            self.replicas.in_flight.remove(&answer.replication_id);
        }
        if asked.as_ref().is_some_and(|asked| asked.offsite) {
            self.offsite_answered(node_id, answer, now)?;
        }
        let Some(committed) = answer.committed.as_ref() else {
            tracing::warn!(node = %node_id, snapshot = %answer.snapshot_id, error = %answer.error, "re-replication failed");
            self.replicas.held_back.insert(
                (answer.snapshot_id.clone(), node_id.to_owned()),
                now.saturating_add(RETRY_AFTER_MS),
            );
            return Ok(());
        };
        if committed.id != answer.snapshot_id {
            tracing::warn!(node = %node_id, snapshot = %answer.snapshot_id, committed = %committed.id, "a copy committed under another id ignored");
            return Ok(());
        }
        // The catalogue's record, not the node's: the node only says that
        // it now holds this snapshot.
        let Some(entry) = self.store.catalog_entry(&answer.snapshot_id)? else {
            // Retention removed it meanwhile: so goes this copy.
            tracing::info!(node = %node_id, snapshot = %answer.snapshot_id, "a copy of a snapshot no longer in the catalogue: deleting it");
            let delete = CoordinatorMessage {
                kind: Some(coordinator_message::Kind::DeleteSnapshots(
                    DeleteSnapshots {
                        ids: vec![answer.snapshot_id.clone()],
                    },
                )),
            };
            self.send(node_id, delete);
            return Ok(());
        };
        let Some(snapshot) = entry.snapshot.as_ref() else {
            return Ok(());
        };
        let replica_target = asked.map_or(0, |asked| asked.replica_target);
        self.store
            .add_catalog_copy(snapshot, node_id, replica_target)?;
        tracing::info!(node = %node_id, snapshot = %answer.snapshot_id, "re-replication: copy committed");
        Ok(())
    }
}
