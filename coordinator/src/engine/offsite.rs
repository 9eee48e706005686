//! Off-site sync (btw-backup's sync state): part of [`super::Inner`]. A
//! job with `sync_to = LABEL` has each of its snapshots, once committed,
//! copied to one storage node carrying that label. The catalogue keeps a
//! per-snapshot [`OffsiteSync`]: pending, syncing, synced or failed, with
//! the node, the attempts and the last error. On every replication check,
//! pending snapshots (and failed ones after [`RETRY_AFTER_MS`], and
//! syncing ones whose copy is no longer in flight: a node or this
//! coordinator restarted) are sent as a [`Replicate`] to the chosen node,
//! which asks a holder for a `CopySnapshot` to itself: only the chunks it
//! lacks travel, so an interrupted sync picks up where it stopped.
//! `fabricctl sync reset` sets states back to pending.
//!
//! The copy made is an ordinary copy in the catalogue (it counts toward
//! the replica target like any other). This module never deletes a copy.

use std::collections::HashSet;

use fabric_proto::v1::{CopyTarget, OffsiteSync, Replicate, Replicated, SyncState};

use super::replication::{InFlight, RETRY_AFTER_MS};
use super::*;
use crate::replicas::ReplicaNode;

impl Inner {
    /// A run committed `snapshot_id`: when its job syncs off-site, record
    /// the sync as pending (once).
    pub(super) fn offsite_pending(
        &mut self,
        spec: &JobSpec,
        snapshot_id: &str,
        now: i64,
    ) -> Result<(), StateError> {
        if spec.sync_to.is_empty() || snapshot_id.is_empty() {
            return Ok(());
        }
        let label = spec.sync_to.clone();
        self.store.update_catalog_entry(snapshot_id, |entry| {
            if entry.offsite.is_some() {
                return false;
            }
            entry.offsite = Some(OffsiteSync {
                label,
                state: SyncState::Pending as i32,
                updated_ms: now,
                ..Default::default()
            });
            true
        })?;
        Ok(())
    }

    /// Start the syncs that are due.
    pub(super) fn offsite_upkeep(
        &mut self,
        entries: &[CatalogEntry],
        nodes: &HashMap<String, ReplicaNode>,
        now: i64,
    ) -> Result<(), StateError> {
        let in_flight: HashSet<String> = self
            .replicas
            .in_flight
            .values()
            .map(|copy| copy.snapshot_id.clone())
            .collect();
        let mut busy: HashMap<String, usize> = HashMap::new();
        for copy in self.replicas.in_flight.values() {
            *busy.entry(copy.target.clone()).or_default() += 1;
        }
        let per_node = (self.settings.replication.per_node as usize).max(1);
        for entry in entries {
            let (Some(snapshot), Some(sync)) = (entry.snapshot.as_ref(), entry.offsite.as_ref())
            else {
                continue;
            };
            let due = match sync.state() {
                SyncState::Pending | SyncState::Unspecified => true,
                SyncState::Failed => now.saturating_sub(sync.updated_ms) >= RETRY_AFTER_MS,
                SyncState::Syncing => !in_flight.contains(&snapshot.id),
                SyncState::Synced => false,
            };
            if !due {
                continue;
            }
            // On a node of the label that is not lost.
            let labelled = |node: &str| {
                nodes.get(node).is_some_and(|node| {
                    node.lost_since_ms.is_none() && node.labels.contains(&sync.label)
                })
            };
            // A node of the label holds it already (re-replication, a
            // sync whose answer was lost): synced.
            if let Some(copy) = entry
                .copies
                .iter()
                .find(|copy| copy.damage.is_empty() && labelled(&copy.node))
            {
                let node = copy.node.clone();
                self.set_offsite(&snapshot.id, now, |sync| {
                    sync.set_state(SyncState::Synced);
                    sync.node = node;
                    sync.error.clear();
                })?;
                continue;
            }
            let holders: Vec<String> = entry
                .copies
                .iter()
                .filter(|copy| copy.damage.is_empty())
                .filter(|copy| nodes.get(&copy.node).is_some_and(|node| node.connected))
                .map(|copy| copy.node.clone())
                .collect();
            let mut candidates: Vec<(&String, &ReplicaNode)> = nodes
                .iter()
                .filter(|(id, node)| {
                    // Not a node holding a (damaged) copy: it would keep
                    // its damaged chunks rather than take good ones.
                    !entry.copies.iter().any(|copy| copy.node == **id)
                        && node.accepts_copies
                        && node.labels.contains(&sync.label)
                        && busy.get(*id).copied().unwrap_or(0) < per_node
                        && !self
                            .replicas
                            .held_back
                            .contains_key(&(snapshot.id.clone(), (*id).clone()))
                })
                .collect();
            candidates.sort_by(|a, b| b.1.free_bytes.cmp(&a.1.free_bytes).then(a.0.cmp(b.0)));
            let why_not = if holders.is_empty() {
                Some("no copy of it is on a connected node".to_owned())
            } else if candidates.is_empty() {
                Some(format!(
                    "no storage node labelled {:?} takes copies now",
                    sync.label
                ))
            } else {
                None
            };
            if let Some(why) = why_not {
                if sync.error != why {
                    self.set_offsite(&snapshot.id, now, |sync| {
                        sync.set_state(SyncState::Pending);
                        sync.error = why;
                    })?;
                }
                continue;
            }
            let target = candidates[0].0.clone();
            let id = self.replicas.next_id;
            self.replicas.next_id += 1;
            let message = CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Replicate(Replicate {
                    replication_id: id,
                    snapshot_id: snapshot.id.clone(),
                    holders: holders
                        .iter()
                        .map(|node| CopyTarget {
                            node: node.clone(),
                            address: self.address_of(node),
                            background: false,
                        })
                        .collect(),
                    bandwidth_limit_bytes_per_s: self
                        .settings
                        .replication
                        .bandwidth_limit_bytes_per_s,
                })),
            };
            if !self.send(&target, message) {
                continue;
            }
            tracing::info!(snapshot = %snapshot.id, %target, label = %sync.label, "off-site sync started");
            *busy.entry(target.clone()).or_default() += 1;
            self.replicas.in_flight.insert(
                id,
                InFlight {
                    snapshot_id: snapshot.id.clone(),
                    target: target.clone(),
                    source: holders[0].clone(),
                    replica_target: 0,
                    started_ms: now,
                    offsite: true,
                },
            );
            self.set_offsite(&snapshot.id, now, |sync| {
                sync.set_state(SyncState::Syncing);
                sync.node = target;
                sync.attempts += 1;
                sync.error.clear();
            })?;
        }
        Ok(())
    }

    /// The answer to an off-site sync's copy.
    pub(super) fn offsite_answered(
        &mut self,
        node_id: &str,
        answer: &Replicated,
        now: i64,
    ) -> Result<(), StateError> {
        let node = node_id.to_owned();
        let committed = answer
            .committed
            .as_ref()
            .is_some_and(|committed| committed.id == answer.snapshot_id);
        if committed && answer.error.is_empty() {
            tracing::info!(snapshot = %answer.snapshot_id, node = %node_id, "off-site sync done");
            self.set_offsite(&answer.snapshot_id, now, |sync| {
                sync.set_state(SyncState::Synced);
                sync.node = node;
                sync.error.clear();
            })
        } else {
            let error = if answer.error.is_empty() {
                "the node committed something else".to_owned()
            } else {
                answer.error.clone()
            };
            tracing::warn!(snapshot = %answer.snapshot_id, node = %node_id, %error, "off-site sync failed");
            self.set_offsite(&answer.snapshot_id, now, |sync| {
                sync.set_state(SyncState::Failed);
                sync.node = node;
                sync.error = error;
            })
        }
    }

    fn set_offsite(
        &mut self,
        snapshot_id: &str,
        now: i64,
        change: impl FnOnce(&mut OffsiteSync),
    ) -> Result<(), StateError> {
        self.store.update_catalog_entry(snapshot_id, |entry| {
            let Some(sync) = entry.offsite.as_mut() else {
                return false;
            };
            change(sync);
            sync.updated_ms = now;
            true
        })?;
        Ok(())
    }

    /// `fabricctl sync reset`: the syncs of `job`'s snapshots (only `ids`,
    /// if any are given) back to pending.
    pub(super) fn reset_sync(
        &mut self,
        job: &str,
        ids: &[String],
        now: i64,
    ) -> Result<u32, EngineError> {
        if job.is_empty() && ids.is_empty() {
            return Err(EngineError::InvalidArgument(
                "name a job, or snapshots, whose sync state to reset".to_owned(),
            ));
        }
        // Every snapshot named must have a sync, or nothing is reset.
        for id in ids {
            if self
                .store
                .catalog_entry(id)?
                .is_none_or(|entry| entry.offsite.is_none())
            {
                return Err(EngineError::NotFound(format!(
                    "snapshot {id} is not in the catalogue with an off-site sync"
                )));
            }
        }
        let mut reset = 0u32;
        for entry in self.store.catalog()? {
            let Some(snapshot) = entry.snapshot.as_ref() else {
                continue;
            };
            let selected = (job.is_empty() || snapshot.job == job)
                && (ids.is_empty() || ids.contains(&snapshot.id));
            if !selected || entry.offsite.is_none() {
                continue;
            }
            let id = snapshot.id.clone();
            self.replicas.held_back.retain(|(held, _), _| *held != id);
            self.set_offsite(&id, now, |sync| {
                sync.set_state(SyncState::Pending);
                sync.attempts = 0;
                sync.error.clear();
            })?;
            reset += 1;
        }
        // The next tick looks at them at once.
        self.replicas.last_check_ms = 0;
        Ok(reset)
    }
}
