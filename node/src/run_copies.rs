//! One push run's copies of its snapshot: which nodes hold it, and whether
//! the next copy reads the source or is copied node to node.
//!
//! Every copy of one snapshot id must hold the same content. So the source
//! is read once per snapshot id: the first copy of a run walks the source
//! (`push_backup`), and every later one (the next target, a background
//! target, a retry, a spare, a retried run) is copied by a node that holds
//! the committed snapshot (`Storage.CopySnapshot`, which this agent may ask
//! for its own host's snapshots). Only when no node is known to hold it does
//! the agent read the source again, and then under a new snapshot id: a walk
//! that failed may still have committed somewhere (a reply lost after the
//! commit), and a second, different content must never share its id.
//!
//! This module owns that decision and the node-to-node copy; it never reads
//! the source itself (the caller's walk does) and never retries (the
//! caller's `copy_with_retries` does).

use std::sync::Mutex;

use fabric_proto::v1::{CopySnapshotRequest, CopyTarget, GetSnapshotRequest, Snapshot};
use fabric_trust::Transport;
use futures::StreamExt;
use tonic::Code;

use crate::agent::describe_status;
use crate::client::Peer;

/// How the next copy is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextCopy {
    /// Copy node to node from these holders, in order.
    FromHolders(Vec<CopyTarget>),
    /// Read the source, committing under this record's id.
    Walk(Box<Snapshot>),
}

/// The copies of one run's snapshot so far.
#[derive(Debug)]
pub struct SnapshotCopies {
    state: Mutex<CopiesState>,
    /// Held by the one copy that reads the source, so that two targets
    /// running at once never both walk it.
    walk_gate: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct CopiesState {
    /// The record to commit; its id is the one every copy shares.
    template: Snapshot,
    /// Nodes known to hold the committed snapshot `template.id`.
    holders: Vec<CopyTarget>,
    /// Nodes a walk under `template.id` was sent to and failed: each may
    /// hold it (a commit whose reply was lost).
    walked: Vec<CopyTarget>,
    /// Whether `template.id` may still be used for a walk: false once a
    /// walk under it was attempted, here or by an earlier attempt of the run.
    id_unused: bool,
}

impl SnapshotCopies {
    /// The copies of a run about to be made: `holders` from earlier
    /// attempts (their snapshot id is `template.id`); `first_attempt`
    /// tells whether the planned id may have been walked before.
    pub fn new(template: Snapshot, holders: Vec<CopyTarget>, first_attempt: bool) -> Self {
        Self {
            state: Mutex::new(CopiesState {
                template,
                holders,
                walked: Vec::new(),
                id_unused: first_attempt,
            }),
            walk_gate: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CopiesState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The nodes known to hold the snapshot, if any.
    pub fn holders(&self) -> Vec<CopyTarget> {
        self.state().holders.clone()
    }

    /// The gate a walk holds; see `plan_walk`.
    pub async fn lock_walk(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.walk_gate.lock().await
    }

    /// Under the walk gate: how to make the next copy, after asking each
    /// node an earlier walk failed on whether it committed after all.
    pub async fn plan_walk(&self, transport: &Transport) -> NextCopy {
        let (id, walked) = {
            let state = self.state();
            if !state.holders.is_empty() {
                return NextCopy::FromHolders(state.holders.clone());
            }
            (state.template.id.clone(), state.walked.clone())
        };
        let mut found = Vec::new();
        for node in walked {
            if holds(&node, &id, transport).await == Some(true) {
                found.push(node);
            }
        }
        let mut state = self.state();
        if !found.is_empty() {
            tracing::info!(snapshot = %id, holders = found.len(), "a failed copy had committed; copying from it");
            state.holders.extend(found);
            return NextCopy::FromHolders(state.holders.clone());
        }
        if !state.id_unused {
            let old = std::mem::replace(&mut state.template.id, new_snapshot_id());
            tracing::info!(old = %old, new = %state.template.id, "reading the source again under a new snapshot id");
            state.walked.clear();
        }
        state.id_unused = false;
        NextCopy::Walk(Box::new(state.template.clone()))
    }

    /// A walk to `target` committed `snapshot`.
    pub fn walked_to(&self, target: &CopyTarget, snapshot: &Snapshot) {
        let mut state = self.state();
        state.template.id = snapshot.id.clone();
        state.holders.push(holder(target));
    }

    /// A walk to `target` failed; it may have committed anyway.
    pub fn walk_failed(&self, target: &CopyTarget) {
        self.state().walked.push(holder(target));
    }

    /// A node-to-node copy to `target` committed.
    pub fn copied_to(&self, target: &CopyTarget) {
        let mut state = self.state();
        if !state.holders.iter().any(|known| known.node == target.node) {
            state.holders.push(holder(target));
        }
    }

    /// The snapshot id every copy shares (for messages).
    pub fn snapshot_id(&self) -> String {
        self.state().template.id.clone()
    }
}

fn holder(target: &CopyTarget) -> CopyTarget {
    CopyTarget {
        background: false,
        ..target.clone()
    }
}

/// A snapshot id as a storage node makes them (16 random bytes, hex).
fn new_snapshot_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Whether `node` holds snapshot `id`: `None` when it cannot tell.
async fn holds(node: &CopyTarget, id: &str, transport: &Transport) -> Option<bool> {
    let mut client = crate::client::storage(&Peer::node(&node.node, &node.address), transport)
        .await
        .ok()?;
    match client
        .get_snapshot(GetSnapshotRequest {
            snapshot: id.to_owned(),
        })
        .await
    {
        Ok(found) => Some(found.into_inner().id == id),
        Err(status) if status.code() == Code::NotFound => Some(false),
        Err(_) => None,
    }
}

/// Copy snapshot `id` to `target` from the first of `holders` that can,
/// calling `progress` with the bytes sent so far; the committed record.
/// The holder sends at most `bandwidth_limit_bytes_per_s` (0: no limit of
/// its own).
pub async fn copy_from_holders(
    holders: &[CopyTarget],
    id: &str,
    target: &CopyTarget,
    transport: &Transport,
    bandwidth_limit_bytes_per_s: u64,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<Snapshot, String> {
    let mut reasons = Vec::new();
    for holder in holders {
        if holder.node == target.node {
            // A walk that failed here had committed after all.
            match crate::client::storage(&Peer::node(&holder.node, &holder.address), transport)
                .await
            {
                Ok(mut client) => match client
                    .get_snapshot(GetSnapshotRequest {
                        snapshot: id.to_owned(),
                    })
                    .await
                {
                    Ok(found) => return Ok(found.into_inner()),
                    Err(status) => {
                        reasons.push(format!("{}: {}", holder.node, describe_status(&status)))
                    }
                },
                Err(err) => reasons.push(format!("{}: {err}", holder.node)),
            }
            continue;
        }
        match copy_from(
            holder,
            id,
            target,
            transport,
            bandwidth_limit_bytes_per_s,
            progress,
        )
        .await
        {
            Ok(snapshot) => return Ok(snapshot),
            Err(reason) => {
                tracing::warn!(holder = %holder.node, target = %target.node, %reason, "node-to-node copy failed");
                reasons.push(format!("from {}: {reason}", holder.node));
            }
        }
    }
    Err(format!(
        "no node holding snapshot {id} could copy it to {}: {}",
        target.node,
        reasons.join("; ")
    ))
}

async fn copy_from(
    holder: &CopyTarget,
    id: &str,
    target: &CopyTarget,
    transport: &Transport,
    bandwidth_limit_bytes_per_s: u64,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<Snapshot, String> {
    let mut client = crate::client::storage(&Peer::node(&holder.node, &holder.address), transport)
        .await
        .map_err(|err| err.to_string())?;
    let mut stream = client
        .copy_snapshot(CopySnapshotRequest {
            snapshot: id.to_owned(),
            target_node: target.node.clone(),
            bandwidth_limit_bytes_per_s,
        })
        .await
        .map_err(|status| describe_status(&status))?
        .into_inner();
    while let Some(message) = stream.next().await {
        let message = message.map_err(|status| describe_status(&status))?;
        if let Some(committed) = message.committed {
            return Ok(committed);
        }
        progress(message.bytes_sent);
    }
    Err("the copy ended without a committed snapshot".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(node: &str) -> CopyTarget {
        CopyTarget {
            node: node.into(),
            address: "http://127.0.0.1:1".into(),
            background: true,
        }
    }

    fn template() -> Snapshot {
        Snapshot {
            id: "aa".repeat(16),
            job: "web".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_first_walk_of_a_first_attempt_keeps_the_planned_id() {
        let copies = SnapshotCopies::new(template(), Vec::new(), true);
        let _gate = copies.lock_walk().await;
        let NextCopy::Walk(record) = copies.plan_walk(&Transport::InsecurePlaintext).await else {
            panic!("expected a walk");
        };
        assert_eq!(record.id, "aa".repeat(16));
    }

    #[tokio::test]
    async fn a_retried_run_without_holders_walks_under_a_new_id() {
        let copies = SnapshotCopies::new(template(), Vec::new(), false);
        let NextCopy::Walk(record) = copies.plan_walk(&Transport::InsecurePlaintext).await else {
            panic!("expected a walk");
        };
        assert_ne!(record.id, "aa".repeat(16));
        assert_eq!(record.id.len(), 32);
        assert_eq!(record.job, "web");
    }

    #[tokio::test]
    async fn a_second_walk_after_an_unanswered_failure_takes_a_new_id() {
        let copies = SnapshotCopies::new(template(), Vec::new(), true);
        let NextCopy::Walk(first) = copies.plan_walk(&Transport::InsecurePlaintext).await else {
            panic!("expected a walk");
        };
        // Nothing listens on port 1: the node cannot say whether it holds it.
        copies.walk_failed(&target("n1"));
        let NextCopy::Walk(second) = copies.plan_walk(&Transport::InsecurePlaintext).await else {
            panic!("expected a walk");
        };
        assert_ne!(first.id, second.id);
    }

    #[tokio::test]
    async fn once_a_copy_committed_every_other_copy_comes_from_a_holder() {
        let copies = SnapshotCopies::new(template(), Vec::new(), true);
        let NextCopy::Walk(record) = copies.plan_walk(&Transport::InsecurePlaintext).await else {
            panic!("expected a walk");
        };
        copies.walked_to(&target("n1"), &record);
        assert_eq!(
            copies.plan_walk(&Transport::InsecurePlaintext).await,
            NextCopy::FromHolders(vec![CopyTarget {
                background: false,
                ..target("n1")
            }])
        );
        copies.copied_to(&target("n2"));
        copies.copied_to(&target("n2"));
        assert_eq!(copies.holders().len(), 2);
        assert_eq!(copies.snapshot_id(), "aa".repeat(16));
    }

    #[tokio::test]
    async fn holders_of_a_retried_run_are_used_before_any_walk() {
        let copies = SnapshotCopies::new(template(), vec![target("n1")], false);
        assert!(matches!(
            copies.plan_walk(&Transport::InsecurePlaintext).await,
            NextCopy::FromHolders(holders) if holders.len() == 1
        ));
    }
}
