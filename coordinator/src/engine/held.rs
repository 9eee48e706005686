//! What storage nodes say they hold (`SnapshotsHeld`): part of
//! [`super::Inner`]. The catalogue learns of a snapshot committed on a node
//! by its run's report, but a snapshot pushed straight to a node
//! (`fabricctl backup --node`) has no run, and a run's report can be lost
//! (a coordinator stopped between the commit and the report). Each storage
//! node therefore lists its snapshots at the start of every session and
//! then says what changed; this module adds the copies the catalogue lacks
//! and forgets those the node no longer has.
//!
//! A node is believed about its own copies, not about what the fabric's
//! jobs did: a snapshot of a job this coordinator runs is added only as a
//! copy of a catalogue entry its run made (or that another node's run
//! report made), never as a new entry, so a node cannot make a stale job
//! look fresh to `check`. A lost run report is made good by the run's
//! retry, whose commit the store answers with the first one. Snapshots of
//! other jobs (`backup --node`) become entries of their own.
//!
//! It never changes a snapshot's record once the catalogue has one, and it
//! never asks a node to delete anything.

use std::collections::HashSet;

use fabric_proto::v1::SnapshotsHeld;

use super::*;

/// How long before a complete list a commit may have been made that the
/// list does not show yet (see `SnapshotsHeld.listed_at_ms`).
const LIST_RACE_MS: i64 = 60_000;

impl Inner {
    /// Applies what storage node `node_id` holds. Returns whether the
    /// catalogue changed.
    pub(super) fn snapshots_held(
        &mut self,
        node_id: &str,
        held: &SnapshotsHeld,
    ) -> Result<bool, StateError> {
        if !self.nodes.get(node_id).is_some_and(is_storage) {
            tracing::warn!(node = %node_id, "a node that stores nothing listed snapshots; ignored");
            return Ok(false);
        }
        // One read of the catalogue: which snapshots it has, and which of
        // them it has on this node.
        let mut known = HashSet::new();
        let mut here = HashSet::new();
        let mut recent = HashSet::new();
        for entry in self.store.catalog()? {
            let Some(snapshot) = entry.snapshot.as_ref() else {
                continue;
            };
            let id = snapshot.id.clone();
            if snapshot.end_time_ms >= held.listed_at_ms.saturating_sub(LIST_RACE_MS) {
                recent.insert(id.clone());
            }
            if entry.copies.iter().any(|copy| copy.node == node_id) {
                here.insert(id.clone());
            }
            known.insert(id);
        }
        let mut changed = false;
        for snapshot in &held.snapshots {
            if snapshot.id.is_empty() || here.contains(&snapshot.id) {
                continue;
            }
            if !known.contains(&snapshot.id) && self.store.job(&snapshot.job)?.is_some() {
                tracing::debug!(node = %node_id, snapshot = %snapshot.id, job = %snapshot.job, "a snapshot of a managed job no run reported: left to its run");
                continue;
            }
            // 0: the entry's target comes from its run's report, or stays
            // "as many copies as it has" for a snapshot no run made.
            changed |= self.store.add_catalog_copy(snapshot, node_id, 0)?;
        }
        for id in &held.removed {
            changed |= self.store.remove_catalog_copy(id, node_id)?;
        }
        if held.complete {
            let listed: HashSet<&str> = held.snapshots.iter().map(|s| s.id.as_str()).collect();
            let gone = here
                .iter()
                .filter(|id| !listed.contains(id.as_str()) && !recent.contains(*id));
            for id in gone {
                tracing::warn!(node = %node_id, snapshot = %id, "the node no longer holds a snapshot the catalogue had on it");
                changed |= self.store.remove_catalog_copy(id, node_id)?;
            }
        }
        Ok(changed)
    }
}
