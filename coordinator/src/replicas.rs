//! Replica targets, as pure rules: which copies of a snapshot count toward
//! its target now, which snapshots are short of it, and which node-to-node
//! copies to start next to get them back. No I/O and no clock: the engine
//! passes the catalogue, the nodes as it sees them and the time in, and
//! sends what [`plan`] returns (`engine/replication.rs`).
//!
//! A copy counts while its node is online, or lost for less than
//! `replace_after` (a node that reboots is not copied around). A copy on a
//! node lost for longer does not count, and its snapshot is copied again
//! from a copy that does, to a storage node that accepts writes and holds
//! none. Only the newest sync snapshot of a job, host and instance is kept
//! at its target: an older one is on its way out.
//!
//! This module never decides that a copy is gone for good: a lost node that
//! comes back brings its copies back with it (the snapshot then has one
//! more than its target, which retention removes with the rest in time).

use std::collections::{BTreeMap, HashMap, HashSet};

use fabric_proto::v1::{CatalogCopy, CatalogEntry, SnapshotType};

/// A node as the replica rules see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaNode {
    /// Connected now: may send a copy.
    pub connected: bool,
    /// May receive a copy: a storage node, connected, accepting writes.
    pub accepts_copies: bool,
    /// When it was last heard of, if it is lost (ms since the Unix epoch).
    pub lost_since_ms: Option<i64>,
    /// Free bytes, as of its last heartbeat.
    pub free_bytes: u64,
    /// Being drained: its copies do not count (they are copied elsewhere,
    /// then deleted there), though it still sends them.
    pub draining: bool,
    /// Its labels (failure domains are `KEY:VALUE` labels).
    pub labels: Vec<String>,
}

/// Why a copy does not count, or may soon stop to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyProblem {
    /// Its node has been lost for less than `replace_after`: it still
    /// counts.
    LostRecently { since_ms: i64 },
    /// Its node has been lost for longer: it is replaced.
    Lost { since_ms: i64 },
    /// The coordinator does not know its node any more.
    UnknownNode,
    /// Its node's scrub found damage in it that no other node could
    /// repair.
    Damaged { reason: String },
    /// Its node is being drained.
    Draining,
}

impl CopyProblem {
    /// Whether the copy still counts toward the target.
    pub fn counts(&self) -> bool {
        matches!(self, CopyProblem::LostRecently { .. })
    }

    /// The problem in words, at `now_ms`.
    pub fn describe(&self, now_ms: i64) -> String {
        let ago = |since: i64| {
            let seconds = u64::try_from(now_ms.saturating_sub(since) / 1000).unwrap_or(0);
            humantime::format_duration(std::time::Duration::from_secs(seconds)).to_string()
        };
        match self {
            CopyProblem::LostRecently { since_ms } => {
                format!(
                    "node lost {} ago; replaced if it stays away",
                    ago(*since_ms)
                )
            }
            CopyProblem::Lost { since_ms } => {
                format!("node lost {} ago; not counted", ago(*since_ms))
            }
            CopyProblem::UnknownNode => "unknown node; not counted".to_owned(),
            CopyProblem::Damaged { reason } => format!("damaged: {reason}; not counted"),
            CopyProblem::Draining => "node draining; not counted".to_owned(),
        }
    }
}

/// The one rule of this module that takes a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaRules {
    /// How long a node may be lost before its copies stop counting (ms).
    pub replace_after_ms: i64,
}

/// What is wrong with `copy`, on `node`, if anything.
pub fn copy_problem(
    copy: &CatalogCopy,
    node: Option<&ReplicaNode>,
    rules: &ReplicaRules,
    now_ms: i64,
) -> Option<CopyProblem> {
    if !copy.damage.is_empty() {
        return Some(CopyProblem::Damaged {
            reason: copy.damage.clone(),
        });
    }
    let Some(node) = node else {
        return Some(CopyProblem::UnknownNode);
    };
    if node.draining {
        return Some(CopyProblem::Draining);
    }
    let since_ms = node.lost_since_ms?;
    if now_ms.saturating_sub(since_ms) >= rules.replace_after_ms {
        Some(CopyProblem::Lost { since_ms })
    } else {
        Some(CopyProblem::LostRecently { since_ms })
    }
}

/// How many copies `entry` should have: its recorded target, or, in an
/// entry recorded before targets existed, the copies it has.
pub fn target_of(entry: &CatalogEntry) -> usize {
    if entry.replica_target > 0 {
        entry.replica_target as usize
    } else {
        entry.copies.len()
    }
}

/// The copies of `entry` that count now.
pub fn counted_copies(
    entry: &CatalogEntry,
    nodes: &HashMap<String, ReplicaNode>,
    rules: &ReplicaRules,
    now_ms: i64,
) -> usize {
    entry
        .copies
        .iter()
        .filter(|copy| {
            copy_problem(copy, nodes.get(&copy.node), rules, now_ms)
                .is_none_or(|problem| problem.counts())
        })
        .count()
}

/// One copy to make: `snapshot_id` to `target`, from the first of
/// `holders` that can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedCopy {
    /// The snapshot.
    pub snapshot_id: String,
    /// The node to copy it to.
    pub target: String,
    /// Connected nodes holding it, least busy first.
    pub holders: Vec<String>,
}

/// What [`plan`] looks at besides the catalogue and the nodes.
#[derive(Debug, Default)]
pub struct PlanLimits<'a> {
    /// Copies each node sends or receives now.
    pub busy: HashMap<String, usize>,
    /// The most copies one node sends or receives at once.
    pub per_node: usize,
    /// Snapshots with a copy in flight already.
    pub in_flight: HashSet<&'a str>,
    /// (snapshot, target) pairs not to try now (a copy that failed lately).
    pub held_back: HashSet<(&'a str, &'a str)>,
    /// Jobs with a `spread_by`, and its label key: a new copy of their
    /// snapshots goes only to a node in a domain no good copy is in.
    pub spread_by: HashMap<String, String>,
}

/// The snapshots short of their target, as (snapshot id, counted, target),
/// most at risk first (fewest counted copies, then newest). Superseded sync
/// snapshots are left out.
pub fn short_of_target(
    entries: &[CatalogEntry],
    nodes: &HashMap<String, ReplicaNode>,
    rules: &ReplicaRules,
    now_ms: i64,
) -> Vec<(String, usize, usize)> {
    // The newest sync snapshot per job, host and instance (the catalogue
    // is oldest first).
    let mut newest_sync: BTreeMap<(&str, &str, &str), &str> = BTreeMap::new();
    for snapshot in entries.iter().filter_map(|entry| entry.snapshot.as_ref()) {
        if snapshot.r#type() == SnapshotType::Sync {
            newest_sync.insert(
                (&snapshot.job, &snapshot.host, &snapshot.instance),
                &snapshot.id,
            );
        }
    }
    let mut short: Vec<(String, usize, usize, i64)> = entries
        .iter()
        .filter_map(|entry| {
            let snapshot = entry.snapshot.as_ref()?;
            if snapshot.r#type() == SnapshotType::Sync
                && newest_sync.get(&(
                    snapshot.job.as_str(),
                    snapshot.host.as_str(),
                    snapshot.instance.as_str(),
                )) != Some(&snapshot.id.as_str())
            {
                return None;
            }
            let target = target_of(entry);
            let counted = counted_copies(entry, nodes, rules, now_ms);
            (counted < target)
                .then(|| (snapshot.id.clone(), counted, target, snapshot.start_time_ms))
        })
        .collect();
    short.sort_by(|a, b| a.1.cmp(&b.1).then(b.3.cmp(&a.3)));
    short
        .into_iter()
        .map(|(id, counted, target, _)| (id, counted, target))
        .collect()
}

/// The copies to start now for the snapshots `short` names (from
/// [`short_of_target`]), at most one per snapshot at a time, and within
/// `limits`. A snapshot none of whose copies is on a connected node waits.
pub fn plan(
    entries: &[CatalogEntry],
    short: &[(String, usize, usize)],
    nodes: &HashMap<String, ReplicaNode>,
    limits: &PlanLimits<'_>,
) -> Vec<PlannedCopy> {
    let by_id: HashMap<&str, &CatalogEntry> = entries
        .iter()
        .filter_map(|entry| Some((entry.snapshot.as_ref()?.id.as_str(), entry)))
        .collect();
    let mut busy = limits.busy.clone();
    let per_node = limits.per_node.max(1);
    let load = |busy: &HashMap<String, usize>, node: &str| busy.get(node).copied().unwrap_or(0);
    // Receivers in a stable order: most free space first, then by id.
    let mut receivers: Vec<(&String, &ReplicaNode)> = nodes
        .iter()
        .filter(|(_, node)| node.accepts_copies)
        .collect();
    receivers.sort_by(|a, b| b.1.free_bytes.cmp(&a.1.free_bytes).then(a.0.cmp(b.0)));
    let mut planned = Vec::new();
    for (id, _, _) in short {
        if limits.in_flight.contains(id.as_str()) {
            continue;
        }
        let Some(entry) = by_id.get(id.as_str()) else {
            continue;
        };
        let mut holders: Vec<&str> = entry
            .copies
            .iter()
            .filter(|copy| copy.damage.is_empty())
            .map(|copy| copy.node.as_str())
            .filter(|node| nodes.get(*node).is_some_and(|node| node.connected))
            .collect();
        holders.sort_by_key(|node| (load(&busy, node), *node));
        let Some(&first) = holders.first() else {
            continue;
        };
        if load(&busy, first) >= per_node {
            continue;
        }
        let holding: HashSet<&str> = entry.copies.iter().map(|copy| copy.node.as_str()).collect();
        let spread_by = entry
            .snapshot
            .as_ref()
            .and_then(|snapshot| limits.spread_by.get(&snapshot.job));
        // The domains of the copies that are good and on nodes in service.
        let used_domains: HashSet<&str> = match spread_by {
            Some(key) => entry
                .copies
                .iter()
                .filter(|copy| copy.damage.is_empty())
                .filter_map(|copy| nodes.get(&copy.node))
                .filter(|node| node.lost_since_ms.is_none() && !node.draining)
                .filter_map(|node| crate::dest::domain_of(&node.labels, key))
                .collect(),
            None => HashSet::new(),
        };
        let target = receivers
            .iter()
            .filter(|(_, node)| match spread_by {
                Some(key) => crate::dest::domain_of(&node.labels, key)
                    .is_some_and(|domain| !used_domains.contains(domain)),
                None => true,
            })
            .map(|(node, _)| node.as_str())
            .filter(|node| {
                !holding.contains(node)
                    && !limits.held_back.contains(&(id.as_str(), *node))
                    && load(&busy, node) < per_node
            })
            .min_by_key(|node| load(&busy, node));
        let Some(target) = target else {
            continue;
        };
        *busy.entry(first.to_owned()).or_default() += 1;
        *busy.entry(target.to_owned()).or_default() += 1;
        planned.push(PlannedCopy {
            snapshot_id: id.clone(),
            target: target.to_owned(),
            holders: holders.into_iter().map(str::to_owned).collect(),
        });
    }
    planned
}

#[cfg(test)]
mod tests {
    use fabric_proto::v1::Snapshot;

    use super::*;

    const HOUR: i64 = 3_600_000;

    fn entry(id: &str, start: i64, target: u32, holders: &[&str]) -> CatalogEntry {
        CatalogEntry {
            snapshot: Some(Snapshot {
                id: id.into(),
                job: "db".into(),
                host: "h".into(),
                start_time_ms: start,
                ..Default::default()
            }),
            copies: holders
                .iter()
                .map(|node| CatalogCopy {
                    node: (*node).into(),
                    snapshot_id: id.into(),
                    ..Default::default()
                })
                .collect(),
            replica_target: target,
            ..Default::default()
        }
    }

    fn online(free: u64) -> ReplicaNode {
        ReplicaNode {
            connected: true,
            accepts_copies: true,
            lost_since_ms: None,
            free_bytes: free,
            draining: false,
            labels: Vec::new(),
        }
    }

    fn lost(since: i64) -> ReplicaNode {
        ReplicaNode {
            lost_since_ms: Some(since),
            ..Default::default()
        }
    }

    fn rules() -> ReplicaRules {
        ReplicaRules {
            replace_after_ms: HOUR,
        }
    }

    fn limits<'a>() -> PlanLimits<'a> {
        PlanLimits {
            per_node: 1,
            ..Default::default()
        }
    }

    #[test]
    fn a_copy_on_a_node_lost_past_replace_after_stops_counting_and_is_made_again() {
        let nodes: HashMap<String, ReplicaNode> = [
            ("n1".to_owned(), online(100)),
            ("n2".to_owned(), lost(0)),
            ("n3".to_owned(), online(50)),
        ]
        .into();
        let entries = vec![entry("s1", 1, 2, &["n1", "n2"])];
        // Lost for less than replace_after: still counted, nothing to do.
        assert!(short_of_target(&entries, &nodes, &rules(), HOUR - 1).is_empty());
        let short = short_of_target(&entries, &nodes, &rules(), HOUR);
        assert_eq!(short, vec![("s1".to_owned(), 1, 2)]);
        let planned = plan(&entries, &short, &nodes, &limits());
        assert_eq!(
            planned,
            vec![PlannedCopy {
                snapshot_id: "s1".into(),
                target: "n3".into(),
                holders: vec!["n1".into()],
            }]
        );
        assert_eq!(
            copy_problem(&entries[0].copies[1], nodes.get("n2"), &rules(), 2 * HOUR)
                .unwrap()
                .describe(2 * HOUR),
            "node lost 2h ago; not counted"
        );
    }

    #[test]
    fn a_damaged_copy_does_not_count_is_no_source_and_gets_no_new_copy() {
        let nodes: HashMap<String, ReplicaNode> = [
            ("n1".to_owned(), online(100)),
            ("n2".to_owned(), online(100)),
            ("n3".to_owned(), online(1)),
        ]
        .into();
        let mut entries = vec![entry("s", 1, 2, &["n1", "n2"])];
        entries[0].copies[0].damage = "3 chunks unrepairable".into();
        let short = short_of_target(&entries, &nodes, &rules(), 0);
        assert_eq!(short, vec![("s".to_owned(), 1, 2)]);
        let planned = plan(&entries, &short, &nodes, &limits());
        assert_eq!(
            planned,
            vec![PlannedCopy {
                snapshot_id: "s".into(),
                target: "n3".into(),
                holders: vec!["n2".into()],
            }]
        );
        // Every copy damaged: nothing to copy from.
        entries[0].copies[1].damage = "1 chunk unrepairable".into();
        let short = short_of_target(&entries, &nodes, &rules(), 0);
        assert_eq!(short, vec![("s".to_owned(), 0, 2)]);
        assert!(plan(&entries, &short, &nodes, &limits()).is_empty());
    }

    #[test]
    fn copies_go_to_nodes_that_accept_them_within_the_per_node_limit() {
        let mut refusing = online(1000);
        refusing.accepts_copies = false;
        let nodes: HashMap<String, ReplicaNode> = [
            ("n1".to_owned(), online(100)),
            ("n2".to_owned(), lost(0)),
            ("n3".to_owned(), online(50)),
            ("n4".to_owned(), refusing),
            ("n5".to_owned(), online(10)),
        ]
        .into();
        let entries = vec![
            entry("old", 1, 2, &["n1", "n2"]),
            entry("new", 2, 2, &["n1", "n2"]),
            entry("other", 3, 2, &["n3", "n2"]),
        ];
        let short = short_of_target(&entries, &nodes, &rules(), 2 * HOUR);
        // Newest first among equals.
        assert_eq!(short[0].0, "other");
        let planned = plan(&entries, &short, &nodes, &limits());
        // "other" is sent by n3 to n1; "new" then finds n1 busy and waits.
        assert_eq!(planned.len(), 1, "{planned:?}");
        assert_eq!(planned[0].snapshot_id, "other");
        assert_eq!(planned[0].target, "n1");

        let wider = PlanLimits {
            per_node: 2,
            ..Default::default()
        };
        let planned = plan(&entries, &short, &nodes, &wider);
        // n1 then sends "new" too (to n5, the least busy), and is full for
        // "old".
        assert_eq!(planned.len(), 2, "{planned:?}");
        assert_eq!(planned[1].snapshot_id, "new");
        assert_eq!(planned[1].target, "n5");
        assert!(planned.iter().all(|copy| copy.target != "n4"));
        for copy in &planned {
            let entry = entries
                .iter()
                .find(|e| e.snapshot.as_ref().unwrap().id == copy.snapshot_id)
                .unwrap();
            assert!(entry.copies.iter().all(|c| c.node != copy.target));
        }
    }

    #[test]
    fn in_flight_held_back_and_sourceless_snapshots_wait() {
        let nodes: HashMap<String, ReplicaNode> = [
            ("n1".to_owned(), online(100)),
            ("n2".to_owned(), lost(0)),
            ("n3".to_owned(), online(50)),
        ]
        .into();
        let entries = vec![entry("a", 1, 2, &["n1", "n2"]), entry("b", 2, 1, &["n2"])];
        let short = short_of_target(&entries, &nodes, &rules(), 2 * HOUR);
        assert_eq!(short.len(), 2);
        // "b" has no copy on a connected node: nothing can be done.
        let mut limits = limits();
        limits.in_flight.insert("a");
        assert!(plan(&entries, &short, &nodes, &limits).is_empty());
        let mut limits = self::limits();
        limits.held_back.insert(("a", "n3"));
        assert!(plan(&entries, &short, &nodes, &limits).is_empty());
    }

    #[test]
    fn a_draining_node_sends_its_copies_but_they_do_not_count() {
        let mut draining = online(1000);
        draining.draining = true;
        draining.accepts_copies = false;
        let nodes: HashMap<String, ReplicaNode> = [
            ("n1".to_owned(), draining),
            ("n2".to_owned(), online(100)),
            ("n3".to_owned(), online(50)),
        ]
        .into();
        let entries = vec![entry("s", 1, 2, &["n1", "n2"])];
        let short = short_of_target(&entries, &nodes, &rules(), 0);
        assert_eq!(short, vec![("s".to_owned(), 1, 2)]);
        let planned = plan(&entries, &short, &nodes, &limits());
        assert_eq!(planned.len(), 1);
        assert_eq!(planned[0].target, "n3");
        assert!(planned[0].holders.contains(&"n1".to_owned()));
    }

    #[test]
    fn with_spread_by_a_new_copy_goes_to_a_zone_no_good_copy_is_in() {
        let zoned = |zone: &str, free: u64| ReplicaNode {
            labels: vec![format!("zone:{zone}")],
            ..online(free)
        };
        let nodes: HashMap<String, ReplicaNode> = [
            ("a1".to_owned(), zoned("a", 10)),
            ("a2".to_owned(), zoned("a", 1000)),
            (
                "b1".to_owned(),
                ReplicaNode {
                    lost_since_ms: Some(0),
                    ..zoned("b", 10)
                },
            ),
            ("b2".to_owned(), zoned("b", 10)),
            ("x1".to_owned(), online(5000)),
        ]
        .into();
        let entries = vec![entry("s", 1, 2, &["a1", "b1"])];
        let short = short_of_target(&entries, &nodes, &rules(), 2 * HOUR);
        let mut limits = limits();
        // Without spread_by the most free space wins: x1.
        assert_eq!(plan(&entries, &short, &nodes, &limits)[0].target, "x1");
        // With it, zone a is taken by a1's copy, x1 has no zone: b2.
        limits.spread_by.insert("db".into(), "zone".into());
        assert_eq!(plan(&entries, &short, &nodes, &limits)[0].target, "b2");
    }

    #[test]
    fn only_the_newest_sync_snapshot_is_kept_at_its_target() {
        let nodes: HashMap<String, ReplicaNode> =
            [("n1".to_owned(), online(1)), ("n2".to_owned(), online(1))].into();
        let mut older = entry("old", 1, 2, &["n1"]);
        let mut newer = entry("new", 2, 2, &["n1"]);
        for entry in [&mut older, &mut newer] {
            entry
                .snapshot
                .as_mut()
                .unwrap()
                .set_type(SnapshotType::Sync);
        }
        let short = short_of_target(&[older, newer], &nodes, &rules(), 0);
        assert_eq!(short, vec![("new".to_owned(), 1, 2)]);
    }

    #[test]
    fn an_entry_without_a_target_keeps_the_copies_it_has() {
        let nodes: HashMap<String, ReplicaNode> = [
            ("n1".to_owned(), online(1)),
            ("n2".to_owned(), lost(0)),
            ("n3".to_owned(), online(1)),
        ]
        .into();
        let entries = vec![entry("s", 1, 0, &["n1", "n2"])];
        assert_eq!(target_of(&entries[0]), 2);
        let short = short_of_target(&entries, &nodes, &rules(), 2 * HOUR);
        assert_eq!(short, vec![("s".to_owned(), 1, 2)]);
    }
}
