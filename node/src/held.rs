//! What this storage node tells the coordinator it holds
//! (`SnapshotsHeld`): its whole snapshot list at the start of each session,
//! then what changed whenever the store's snapshots moved. This is how the
//! catalogue learns of snapshots no run reported (`fabricctl backup
//! --node`) and of snapshots gone behind its back. It only reads the store.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use fabric_chunkstore::Store;
use fabric_proto::v1::{Snapshot, SnapshotsHeld};

/// What was last said in this session.
#[derive(Debug, Default)]
pub struct HeldReport {
    /// The store's change counter and the ids listed then; none before the
    /// session's first (complete) list.
    said: Option<(u64, HashSet<String>)>,
}

impl HeldReport {
    /// A new session: the next report is a complete list.
    pub fn new_session(&mut self) {
        self.said = None;
    }

    /// The message to send now, if the store's snapshots changed since the
    /// last one (or none was sent in this session). Reading the list fails
    /// quietly: the next call tries again.
    pub async fn next(&mut self, store: &Arc<Store>) -> Option<SnapshotsHeld> {
        let changes = store.catalog_changes();
        if self.said.as_ref().is_some_and(|(seen, _)| *seen == changes) {
            return None;
        }
        let listing = store.clone();
        let listed_at_ms = now_ms();
        let snapshots = match tokio::task::spawn_blocking(move || listing.list_snapshots()).await {
            Ok(Ok(snapshots)) => snapshots,
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot list the store's snapshots for the coordinator");
                return None;
            }
            Err(_) => return None,
        };
        let (message, ids) = report(self.said.as_ref().map(|(_, ids)| ids), snapshots);
        self.said = Some((changes, ids));
        message.map(|mut message| {
            message.listed_at_ms = listed_at_ms;
            message
        })
    }
}

/// The message for `snapshots` after `said` (none: a complete list), and
/// the ids it leaves said; none when nothing changed.
fn report(
    said: Option<&HashSet<String>>,
    snapshots: Vec<Snapshot>,
) -> (Option<SnapshotsHeld>, HashSet<String>) {
    let ids: HashSet<String> = snapshots.iter().map(|s| s.id.clone()).collect();
    let Some(said) = said else {
        return (
            Some(SnapshotsHeld {
                complete: true,
                snapshots,
                ..Default::default()
            }),
            ids,
        );
    };
    let mut by_id: HashMap<String, Snapshot> =
        snapshots.into_iter().map(|s| (s.id.clone(), s)).collect();
    let mut added: Vec<Snapshot> = ids
        .difference(said)
        .filter_map(|id| by_id.remove(id))
        .collect();
    added.sort_by(|a, b| a.id.cmp(&b.id));
    let mut removed: Vec<String> = said.difference(&ids).cloned().collect();
    removed.sort();
    let message = (!added.is_empty() || !removed.is_empty()).then_some(SnapshotsHeld {
        complete: false,
        snapshots: added,
        removed,
        listed_at_ms: 0,
    });
    (message, ids)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(id: &str) -> Snapshot {
        Snapshot {
            id: id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_session_starts_with_the_whole_list_then_says_only_what_changed() {
        let (first, said) = report(None, vec![snapshot("a"), snapshot("b")]);
        let first = first.unwrap();
        assert!(first.complete);
        assert_eq!(first.snapshots.len(), 2);

        let (same, said) = report(Some(&said), vec![snapshot("a"), snapshot("b")]);
        assert!(same.is_none(), "nothing changed, nothing said");

        let (change, _) = report(Some(&said), vec![snapshot("b"), snapshot("c")]);
        let change = change.unwrap();
        assert!(!change.complete);
        assert_eq!(change.snapshots, vec![snapshot("c")]);
        assert_eq!(change.removed, vec!["a".to_owned()]);
    }
}
