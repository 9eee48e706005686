//! backy's verify after backup: part of [`super::Inner`]. When a run of a
//! job with `verify` commits a copy, the copy's storage node is asked to
//! read it back ([`VerifySnapshot`] on its session, all chunks or a random
//! share); its [`SnapshotVerified`] answer makes the snapshot VERIFIED in
//! the catalogue, or marks that copy damaged (it stops counting, and
//! re-replication copies the snapshot again from a good holder). Either
//! way the run's history says what was found.
//!
//! An answer counts only from the node that was asked, for the snapshot it
//! was asked about (the asks live in memory: an answer arriving after a
//! coordinator restart is dropped, and the snapshot stays complete). This
//! module never reads a chunk itself and never deletes anything.

use fabric_proto::v1::{SnapshotState, SnapshotVerified, VerifySnapshot};

use super::*;

impl Inner {
    /// Ask `node` to check the copy of `snapshot_id` that `run_id` just
    /// committed there, if the run's job wants it.
    pub(super) fn verify_new_copy(&mut self, record: &RunRecord, snapshot_id: &str, node: &str) {
        let fraction = record.spec().verify_fraction;
        // NaN and negative values read as none.
        if fraction.is_nan() || fraction <= 0.0 || snapshot_id.is_empty() {
            return;
        }
        let message = CoordinatorMessage {
            kind: Some(coordinator_message::Kind::VerifySnapshot(VerifySnapshot {
                run_id: record.id().to_owned(),
                snapshot_id: snapshot_id.to_owned(),
                fraction: fraction.min(1.0),
            })),
        };
        if self.send(node, message) {
            self.replicas.verifies_asked.insert(
                (snapshot_id.to_owned(), node.to_owned()),
                record.id().to_owned(),
            );
            tracing::info!(%node, snapshot = %snapshot_id, fraction, "verify after backup asked");
        } else {
            tracing::warn!(%node, snapshot = %snapshot_id, "verify after backup not asked: the node is not connected");
        }
    }

    /// A node's answer to [`VerifySnapshot`].
    pub(super) fn snapshot_verified(
        &mut self,
        node_id: &str,
        answer: &SnapshotVerified,
        now: i64,
    ) -> Result<(), StateError> {
        // Believed only from the node asked, for the snapshot asked (and
        // once).
        let Some(run_id) = self
            .replicas
            .verifies_asked
            .remove(&(answer.snapshot_id.clone(), node_id.to_owned()))
        else {
            tracing::warn!(node = %node_id, snapshot = %answer.snapshot_id, "a verify answer nobody asked this node for ignored");
            return Ok(());
        };
        let message = if !answer.error.is_empty() {
            format!(
                "verify after backup on {node_id} could not run: {}",
                answer.error
            )
        } else if answer.problems.is_empty() {
            if self
                .store
                .set_catalog_state(&answer.snapshot_id, SnapshotState::Verified)?
            {
                tracing::info!(node = %node_id, snapshot = %answer.snapshot_id, chunks = answer.chunks_checked, "snapshot verified");
            }
            format!(
                "verified on {node_id}: {} chunk(s) read back intact",
                answer.chunks_checked
            )
        } else {
            let reason = format!(
                "verify after backup found {} problem(s): {}",
                answer.problems.len(),
                answer.problems.join("; ")
            );
            self.store
                .mark_catalog_copy_damaged(&answer.snapshot_id, node_id, &reason)?;
            tracing::error!(node = %node_id, snapshot = %answer.snapshot_id, %reason, "a new copy failed its verify: marked damaged");
            format!("{reason} on {node_id}: that copy no longer counts")
        };
        // The run asked about, whatever the answer names.
        let record = match self.active.get(&run_id) {
            Some(record) => Some(record.clone()),
            None => self.store.run(&run_id)?,
        };
        if let Some(record) = record {
            self.copy_event(&record, node_id, &message, now)?;
        }
        Ok(())
    }
}
