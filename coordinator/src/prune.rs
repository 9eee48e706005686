//! Pruning: in which order a full node's snapshots would go, and which
//! never may.
//!
//! When a storage node's free space is below its target, the engine removes
//! snapshots from it, least important first, until the node is back above
//! target. This module owns that order and nothing else. It is pure: it
//! never deletes, never reads a clock, the catalogue or a node's free space,
//! and cannot fail; the engine passes every committed snapshot of the
//! catalogue, the ids the node holds, each job's [`PruneRules`], the jobs
//! whose recent runs failed and `now_ms`, then works through
//! [`PrunePlan::order`] only as far as the node needs room. A mistake here
//! destroys backups, so every doubt resolves toward keeping.
//!
//! **Importance** is byteback's method. Each job has target ages (its
//! schedule's slots, see [`target_ages`], or byteback's 0, 1, 2, 3, 7, 14,
//! 21, 28, 56 and 112 days). In rounds, each target in ascending order takes
//! the not yet chosen snapshot whose age is nearest to it (ties: the newer,
//! then the smaller id); the order of taking is the order of importance. So
//! the snapshot nearest "now" goes last, the one nearest "a day ago" second
//! last, and the gaps between targets are thinned before any target loses
//! its snapshot. Importance is ranked once per group over all its snapshots,
//! whichever node holds them. Ranking again after removing the least
//! important one would give the same order for the rest (none of the earlier
//! picks chose it, so none changes), so a single ranking is what byteback's
//! delete-and-look-again loop gives, except where a guard skips a less
//! important snapshot; no guard depends on the ranking.
//!
//! **Groups** are (job, host, instance), as in retention. The same id more
//! than once in a group is one snapshot with copies on several nodes: it is
//! counted once (newest end time, latest WORM date, as retention merges
//! them). The same id in two groups is a catalogue that contradicts itself:
//! such a snapshot counts in each group and is never removed.
//!
//! **Guards** stand above importance; a snapshot is never in the order when
//!
//! - it is its group's newest (by end time, ties by id), so no job is left
//!   with nothing to restore;
//! - its WORM window (`retain_until_ms`) ends after `now_ms`: the store
//!   refuses to delete it anyway;
//! - its job's recent runs failed: a dying client must not age out its last
//!   good backups while no new ones arrive;
//! - its removal would leave its group with fewer than the job's
//!   [`PruneRules::min_keep`] snapshots (at least 1) counted over the whole
//!   catalogue;
//! - the node holds an id the catalogue does not know: nothing is known
//!   about it, so it stays.
//!
//! **Across groups**, the group with the most snapshots left gives up its
//! least important removable one on the node (ties: the one that ended
//! first, then the smaller id), and its count drops by one. A removal counts
//! as a lost snapshot even when another node keeps a copy, so the counts err
//! toward keeping, and taking any prefix of the order keeps every guard.
//! What stays on the node after the whole order is counted by reason in
//! [`Unremovable`], for the operator's "cannot reach the target" message.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::retention::SnapshotInfo;
use crate::schedule::Schedule;

const SECOND_MS: i64 = 1_000;
const MINUTE_MS: i64 = 60 * SECOND_MS;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;

/// byteback's target ages, in days, for a job without a schedule.
pub const BYTEBACK_TARGET_DAYS: [i64; 10] = [0, 1, 2, 3, 7, 14, 21, 28, 56, 112];

/// The most target ages one schedule tag contributes. A year of hourly
/// slots is 8,760; a count far beyond this is a slip, and only sizes the
/// list (the guards do not read it).
pub const MAX_TARGETS_PER_TAG: u32 = 100_000;

/// The target ages (milliseconds, ascending, without repeats) of a job with
/// `schedule`: each tag of interval I and keep K gives 0, I, ..., (K-1) x I
/// (a keep of 0 or 1, or an interval that is not positive, gives just 0).
/// Without a schedule, or with one without tags, byteback's days.
pub fn target_ages(schedule: Option<&Schedule>) -> Vec<i64> {
    let Some(schedule) = schedule.filter(|schedule| !schedule.tags.is_empty()) else {
        return BYTEBACK_TARGET_DAYS
            .iter()
            .map(|days| days * DAY_MS)
            .collect();
    };
    let mut ages = BTreeSet::from([0]);
    for tag in schedule.tags.values() {
        if tag.interval_ms <= 0 {
            continue;
        }
        for step in 1..tag.keep.min(MAX_TARGETS_PER_TAG) {
            match tag.interval_ms.checked_mul(i64::from(step)) {
                Some(age) => {
                    ages.insert(age);
                }
                None => break,
            }
        }
    }
    ages.into_iter().collect()
}

/// A job's pruning rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneRules {
    /// Target ages in ms, ascending (from [`target_ages`]). Unsorted or
    /// repeated ages are sorted and merged; an empty list means age 0 only,
    /// which ranks newest first.
    pub target_ages_ms: Vec<i64>,
    /// Pruning never leaves the group with fewer snapshots than this (at
    /// least 1 is enforced whatever is passed).
    pub min_keep: u32,
}

impl Default for PruneRules {
    /// What a job missing from the rules (a deleted job whose snapshots
    /// stay) gets: byteback's days, and a group keeps at least 1.
    fn default() -> Self {
        Self {
            target_ages_ms: target_ages(None),
            min_keep: 1,
        }
    }
}

/// One snapshot to remove from the node, in its place in the order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneChoice {
    /// The snapshot's id (every copy of it on the node).
    pub id: String,
    /// Its job.
    pub job: String,
    /// Its host.
    pub host: String,
    /// Its instance (empty when the job has none).
    pub instance: String,
    /// Its end time (the newest of its copies'), ms since the Unix epoch.
    pub end_time_ms: i64,
    /// Why it goes now, for logs and dry runs, e.g. "least important
    /// removable of 9 snapshots of web/web1 (nearest target 14d, 3d off)".
    pub why: String,
}

/// The node's snapshots that stay after the whole order, each counted once
/// under the first reason that holds, in the fields' order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unremovable {
    /// Ids on the node that the catalogue does not know.
    pub uncatalogued: usize,
    /// Ids the catalogue has in more than one group.
    pub in_several_groups: usize,
    /// Their group's newest.
    pub newest: usize,
    /// Inside their WORM window.
    pub worm: usize,
    /// The earliest end of those WORM windows, ms since the Unix epoch.
    pub first_worm_end_ms: Option<i64>,
    /// Of a job whose recent runs failed.
    pub failing_job: usize,
    /// Their group is down to its `min_keep`.
    pub min_keep: usize,
}

impl Unremovable {
    /// How many snapshots stay on the node.
    pub fn total(&self) -> usize {
        self.uncatalogued
            + self.in_several_groups
            + self.newest
            + self.worm
            + self.failing_job
            + self.min_keep
    }
}

impl fmt::Display for Unremovable {
    /// For "node n1 cannot reach its free-space target: {this}".
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.total();
        if total == 0 {
            return formatter.write_str("no snapshot is left on the node");
        }
        let worm = match self.first_worm_end_ms {
            Some(until_ms) => format!("WORM-protected (the first window ends {})", date(until_ms)),
            None => "WORM-protected".to_owned(),
        };
        let parts = [
            (self.newest, "their group's newest".to_owned()),
            (self.worm, worm),
            (self.failing_job, "of a job whose runs fail".to_owned()),
            (self.min_keep, "kept by their job's keep_last".to_owned()),
            (self.uncatalogued, "not in the catalogue".to_owned()),
            (
                self.in_several_groups,
                "in several groups of the catalogue".to_owned(),
            ),
        ];
        let parts: Vec<String> = parts
            .into_iter()
            .filter(|(count, _)| *count > 0)
            .map(|(count, what)| format!("{count} {what}"))
            .collect();
        let noun = if total == 1 { "snapshot" } else { "snapshots" };
        write!(
            formatter,
            "the remaining {total} {noun} may not go: {}",
            parts.join(", ")
        )
    }
}

/// The order for one node, and what it leaves there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrunePlan {
    /// Every removable snapshot on the node, first to go first.
    pub order: Vec<PruneChoice>,
    /// What is still on the node once the whole order is applied.
    pub unremovable: Unremovable,
}

/// Indices into `group`, most important first, at `now_ms`, for the target
/// ages `target_ages_ms` (see [`PruneRules::target_ages_ms`]). `group` is
/// taken as one group whatever its members' job, host and instance. Copies
/// (equal ids) are ranked once, as their newest, and all their indices
/// follow each other at that place in input order, so the result is always
/// a permutation of `0..group.len()`.
pub fn importance_order(group: &[SnapshotInfo], target_ages_ms: &[i64], now_ms: i64) -> Vec<usize> {
    let mut by_id: BTreeMap<&str, (i64, Vec<usize>)> = BTreeMap::new();
    for (index, snapshot) in group.iter().enumerate() {
        let (end_time_ms, copies) = by_id
            .entry(&snapshot.id)
            .or_insert((snapshot.end_time_ms, Vec::new()));
        *end_time_ms = (*end_time_ms).max(snapshot.end_time_ms);
        copies.push(index);
    }
    let merged: Vec<(&str, i64, Vec<usize>)> = by_id
        .into_iter()
        .map(|(id, (end_time_ms, copies))| (id, end_time_ms, copies))
        .collect();
    let members: Vec<(&str, i64)> = merged
        .iter()
        .map(|(id, end_time_ms, _)| (*id, *end_time_ms))
        .collect();
    importance(&members, &normalized(target_ages_ms), now_ms)
        .into_iter()
        .filter_map(|member| merged.get(member))
        .flat_map(|(_, _, copies)| copies.iter().copied())
        .collect()
}

/// The removal order for the node holding `on_node`: [`plan`]'s order.
pub fn prune_order(
    snapshots: &[SnapshotInfo],
    on_node: &HashSet<String>,
    rules: &BTreeMap<String, PruneRules>,
    failing_jobs: &HashSet<String>,
    now_ms: i64,
) -> Vec<PruneChoice> {
    plan(snapshots, on_node, rules, failing_jobs, now_ms).order
}

/// The removal order for the node holding the ids `on_node`, given every
/// committed snapshot of the catalogue (all nodes, copies included), each
/// job's `rules` (a job missing there gets [`PruneRules::default`]), the
/// jobs whose recent runs failed, and `now_ms`; with what stays on the node
/// when the whole order is not enough.
pub fn plan(
    snapshots: &[SnapshotInfo],
    on_node: &HashSet<String>,
    rules: &BTreeMap<String, PruneRules>,
    failing_jobs: &HashSet<String>,
    now_ms: i64,
) -> PrunePlan {
    let mut groups: BTreeMap<GroupKey<'_>, BTreeMap<&str, Member<'_>>> = BTreeMap::new();
    let mut group_of: HashMap<&str, (GroupKey<'_>, bool)> = HashMap::new();
    for snapshot in snapshots {
        let key = (
            snapshot.job.as_str(),
            snapshot.host.as_str(),
            snapshot.instance.as_str(),
        );
        let member = groups
            .entry(key)
            .or_default()
            .entry(&snapshot.id)
            .or_insert(Member {
                id: &snapshot.id,
                end_time_ms: snapshot.end_time_ms,
                retain_until_ms: snapshot.retain_until_ms,
            });
        member.end_time_ms = member.end_time_ms.max(snapshot.end_time_ms);
        member.retain_until_ms = member.retain_until_ms.max(snapshot.retain_until_ms);
        let (first, several) = group_of.entry(&snapshot.id).or_insert((key, false));
        *several |= *first != key;
    }
    let mut unremovable = Unremovable::default();
    for id in on_node {
        match group_of.get(id.as_str()) {
            None => unremovable.uncatalogued += 1,
            Some((_, true)) => unremovable.in_several_groups += 1,
            Some((_, false)) => {}
        }
    }

    let default_rules = PruneRules::default();
    let mut states = Vec::with_capacity(groups.len());
    for ((job, host, instance), members) in groups {
        let members: Vec<Member<'_>> = members.into_values().collect();
        let rules = rules.get(job).unwrap_or(&default_rules);
        let targets = normalized(&rules.target_ages_ms);
        let newest = members
            .iter()
            .min_by_key(|member| (Reverse(member.end_time_ms), member.id))
            .map(|member| member.id);
        let failing = failing_jobs.contains(job);
        let ranked: Vec<(&str, i64)> = members
            .iter()
            .map(|member| (member.id, member.end_time_ms))
            .collect();
        let mut removable = Vec::new();
        for index in importance(&ranked, &targets, now_ms).into_iter().rev() {
            let Some(member) = members.get(index) else {
                continue;
            };
            let in_one_group = group_of.get(member.id).is_some_and(|(_, several)| !several);
            if !on_node.contains(member.id) || !in_one_group {
                // Not this node's to free, or counted above.
                continue;
            }
            if newest == Some(member.id) {
                unremovable.newest += 1;
            } else if member.retain_until_ms > now_ms {
                unremovable.worm += 1;
                unremovable.first_worm_end_ms = Some(
                    unremovable
                        .first_worm_end_ms
                        .map_or(member.retain_until_ms, |first| {
                            first.min(member.retain_until_ms)
                        }),
                );
            } else if failing {
                unremovable.failing_job += 1;
            } else {
                removable.push(*member);
            }
        }
        let label = if instance.is_empty() {
            format!("{job}/{host}")
        } else {
            format!("{job}/{host}/{instance}")
        };
        states.push(GroupState {
            job,
            host,
            instance,
            label,
            targets,
            left: members.len(),
            min_keep: usize::try_from(rules.min_keep).unwrap_or(usize::MAX).max(1),
            removable,
            taken: 0,
        });
    }

    // Groups with something to give, the fullest first, then by which of
    // their next candidates ended first; ids are unique across these groups
    // (ids in several groups are never candidates), so the key is too.
    let mut queue: BTreeSet<(Reverse<usize>, i64, &str, usize)> = BTreeSet::new();
    for (index, state) in states.iter().enumerate() {
        if let Some(next) = state.next() {
            queue.insert((Reverse(state.left), next.end_time_ms, next.id, index));
        }
    }
    let mut order = Vec::new();
    while let Some((_, _, _, index)) = queue.pop_first() {
        let Some(state) = states.get_mut(index) else {
            continue;
        };
        let Some(member) = state.next() else {
            continue;
        };
        order.push(state.choice(member, now_ms));
        state.left -= 1;
        state.taken += 1;
        if let Some(next) = state.next() {
            queue.insert((Reverse(state.left), next.end_time_ms, next.id, index));
        }
    }
    for state in &states {
        unremovable.min_keep += state.removable.len() - state.taken;
    }
    PrunePlan { order, unremovable }
}

type GroupKey<'a> = (&'a str, &'a str, &'a str);

/// One snapshot of a group, its copies merged.
#[derive(Debug, Clone, Copy)]
struct Member<'a> {
    id: &'a str,
    end_time_ms: i64,
    retain_until_ms: i64,
}

/// A group while the order is being drawn.
struct GroupState<'a> {
    job: &'a str,
    host: &'a str,
    instance: &'a str,
    label: String,
    targets: Vec<i64>,
    /// Distinct snapshots left in the catalogue, counting removals so far.
    left: usize,
    min_keep: usize,
    /// The guards' survivors on the node, least important first.
    removable: Vec<Member<'a>>,
    /// How many of `removable` are in the order.
    taken: usize,
}

impl<'a> GroupState<'a> {
    /// The next to go, while the group is above its `min_keep`.
    fn next(&self) -> Option<Member<'a>> {
        if self.left > self.min_keep {
            self.removable.get(self.taken).copied()
        } else {
            None
        }
    }

    fn choice(&self, member: Member<'_>, now_ms: i64) -> PruneChoice {
        let age = age_ms(now_ms, member.end_time_ms);
        let nearest = nearest_target(&self.targets, age);
        let off = (age - i128::from(nearest)).abs();
        let target = if off == 0 {
            format!("on target {}", short_duration(i128::from(nearest)))
        } else {
            format!(
                "nearest target {}, {} off",
                short_duration(i128::from(nearest)),
                short_duration(off)
            )
        };
        PruneChoice {
            id: member.id.to_owned(),
            job: self.job.to_owned(),
            host: self.host.to_owned(),
            instance: self.instance.to_owned(),
            end_time_ms: member.end_time_ms,
            why: format!(
                "least important removable of {} snapshots of {} ({target})",
                self.left, self.label
            ),
        }
    }
}

/// Target ages sorted without repeats; age 0 alone for none.
fn normalized(target_ages_ms: &[i64]) -> Vec<i64> {
    let targets: BTreeSet<i64> = target_ages_ms.iter().copied().collect();
    if targets.is_empty() {
        vec![0]
    } else {
        targets.into_iter().collect()
    }
}

/// In i128: any two i64 instants differ by less than its range.
fn age_ms(now_ms: i64, end_time_ms: i64) -> i128 {
    i128::from(now_ms) - i128::from(end_time_ms)
}

/// Indices into `members` (id, end time; distinct ids), most important
/// first, for `targets` (ascending, not empty).
fn importance(members: &[(&str, i64)], targets: &[i64], now_ms: i64) -> Vec<usize> {
    let mut unchosen: BTreeSet<(i128, &str, usize)> = members
        .iter()
        .enumerate()
        .map(|(index, (id, end_time_ms))| (age_ms(now_ms, *end_time_ms), *id, index))
        .collect();
    let mut order = Vec::with_capacity(members.len());
    while !unchosen.is_empty() {
        for target in targets {
            let Some(pick) = nearest(&unchosen, i128::from(*target)) else {
                break;
            };
            unchosen.remove(&pick);
            order.push(pick.2);
        }
    }
    order
}

/// The entry (age, id, index) whose age is nearest `target`: ties go to the
/// younger (newer) one, then to the smaller id.
fn nearest<'a>(
    unchosen: &BTreeSet<(i128, &'a str, usize)>,
    target: i128,
) -> Option<(i128, &'a str, usize)> {
    // "" and 0 are the least id and index, so these bounds split by age alone.
    let at_or_older = unchosen.range((target, "", 0)..).next().copied();
    let younger = unchosen
        .range(..(target, "", 0))
        .next_back()
        .and_then(|(age, _, _)| unchosen.range((*age, "", 0)..).next().copied());
    match (younger, at_or_older) {
        (Some(younger), Some(older)) if older.0 - target < target - younger.0 => Some(older),
        (Some(younger), _) => Some(younger),
        (None, older) => older,
    }
}

/// The target nearest `age` (ties: the smaller); `targets` ascending, not
/// empty.
fn nearest_target(targets: &[i64], age: i128) -> i64 {
    let split = targets.partition_point(|target| i128::from(*target) < age);
    let above = targets.get(split).copied();
    let below = split
        .checked_sub(1)
        .and_then(|index| targets.get(index))
        .copied();
    match (below, above) {
        (Some(below), Some(above)) => {
            if i128::from(above) - age < age - i128::from(below) {
                above
            } else {
                below
            }
        }
        (Some(only), None) | (None, Some(only)) => only,
        (None, None) => 0,
    }
}

/// `3d`, `2.5h`, `40s`, `750ms`: the largest unit that fits, one decimal.
fn short_duration(ms: i128) -> String {
    if ms < 0 {
        return format!("-{}", short_duration(-ms));
    }
    let units = [
        (DAY_MS, "d"),
        (HOUR_MS, "h"),
        (MINUTE_MS, "min"),
        (SECOND_MS, "s"),
    ];
    let Some((unit, name)) = units
        .into_iter()
        .map(|(unit, name)| (i128::from(unit), name))
        .find(|(unit, _)| ms >= *unit)
    else {
        return format!("{ms}ms");
    };
    let tenths = (ms * 10 + unit / 2) / unit;
    if tenths % 10 == 0 {
        format!("{}{name}", tenths / 10)
    } else {
        format!("{}.{}{name}", tenths / 10, tenths % 10)
    }
}

/// A UTC date, as retention prints WORM ends.
fn date(time_ms: i64) -> String {
    match Timestamp::from_millisecond(time_ms) {
        Ok(at) => TimeZone::UTC.to_datetime(at).date().to_string(),
        Err(_) => format!("{time_ms} ms after the epoch"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

    use jiff::tz::TimeZone;
    use proptest::prelude::*;

    use super::*;
    use crate::schedule::TagSchedule;

    /// 2025-01-01T00:00:00Z.
    const BASE_MS: i64 = 1_735_689_600_000;
    const WEB: (&str, &str, &str) = ("web", "web1", "");
    const DB: (&str, &str, &str) = ("db", "db1", "main");

    fn snapshot(id: &str, group: (&str, &str, &str), end_time_ms: i64) -> SnapshotInfo {
        SnapshotInfo {
            id: id.to_owned(),
            job: group.0.to_owned(),
            host: group.1.to_owned(),
            instance: group.2.to_owned(),
            end_time_ms,
            tags: Vec::new(),
            retain_until_ms: 0,
        }
    }

    fn day(days: i64) -> i64 {
        BASE_MS + days * DAY_MS
    }

    fn ids(list: &[&str]) -> HashSet<String> {
        list.iter().map(|id| (*id).to_owned()).collect()
    }

    fn every_id(snapshots: &[SnapshotInfo]) -> HashSet<String> {
        snapshots
            .iter()
            .map(|snapshot| snapshot.id.clone())
            .collect()
    }

    fn order_ids(order: &[PruneChoice]) -> Vec<&str> {
        order.iter().map(|choice| choice.id.as_str()).collect()
    }

    fn min_keep(job: &str, min_keep: u32) -> BTreeMap<String, PruneRules> {
        BTreeMap::from([(
            job.to_owned(),
            PruneRules {
                min_keep,
                ..PruneRules::default()
            },
        )])
    }

    fn schedule(tags: &[(&str, i64, u32)]) -> Schedule {
        Schedule {
            tags: tags
                .iter()
                .map(|(name, interval_ms, keep)| {
                    (
                        (*name).to_owned(),
                        TagSchedule {
                            interval_ms: *interval_ms,
                            keep: *keep,
                        },
                    )
                })
                .collect(),
            window: None,
            time_zone: TimeZone::UTC,
        }
    }

    #[test]
    fn byteback_days_rank_daily_snapshots_by_their_nearest_target() {
        // Index = age in days.
        let now = day(119);
        let group: Vec<SnapshotInfo> = (0..120)
            .map(|age| snapshot(&format!("age{age:03}"), WEB, now - age * DAY_MS))
            .collect();
        let ranked = importance_order(&group, &target_ages(None), now);
        let mut sorted = ranked.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..120).collect::<Vec<_>>());
        // Round 1: each target's own snapshot. Round 2: the nearest left;
        // 13 and 15 days are both a day off 14 days, and the newer wins.
        // Round 3 goes on thinning the gaps from their edges.
        assert_eq!(
            ranked[..30],
            [
                0, 1, 2, 3, 7, 14, 21, 28, 56, 112, //
                4, 5, 6, 8, 9, 13, 20, 27, 55, 111, //
                10, 11, 12, 15, 16, 17, 22, 29, 57, 113,
            ]
        );
        // Past the last target the oldest matters least: every lower target
        // thins its gap from below, and only 112 days reaches beyond.
        assert_eq!(ranked[118..], [118, 119]);

        // Pruning the lone group takes them in reverse, all but the newest.
        let plan = plan(
            &group,
            &every_id(&group),
            &BTreeMap::new(),
            &HashSet::new(),
            now,
        );
        let expected: Vec<String> = ranked[1..]
            .iter()
            .rev()
            .map(|age| format!("age{age:03}"))
            .collect();
        assert_eq!(order_ids(&plan.order), expected);
        assert_eq!(
            plan.unremovable,
            Unremovable {
                newest: 1,
                ..Unremovable::default()
            }
        );
        let last = &plan.order[118];
        assert_eq!(last.id, "age001");
        assert_eq!(
            last.why,
            "least important removable of 2 snapshots of web/web1 (on target 1d)"
        );
        assert_eq!(
            plan.order[0].why,
            "least important removable of 120 snapshots of web/web1 (nearest target 112d, 7d off)"
        );
    }

    #[test]
    fn nearest_ties_go_to_the_newer_then_to_the_smaller_id() {
        let now = day(10);
        let group = [
            snapshot("older", WEB, now - DAY_MS - HOUR_MS),
            snapshot("younger", WEB, now - DAY_MS + HOUR_MS),
        ];
        assert_eq!(importance_order(&group, &[DAY_MS], now), [1, 0]);
        let group = [snapshot("b", WEB, now), snapshot("a", WEB, now)];
        assert_eq!(importance_order(&group, &[0], now), [1, 0]);
        // No targets rank by age alone, newest first; unsorted ones are sorted.
        let group = [
            snapshot("mid", WEB, day(5)),
            snapshot("new", WEB, day(9)),
            snapshot("old", WEB, day(1)),
        ];
        assert_eq!(importance_order(&group, &[], now), [1, 0, 2]);
        assert_eq!(
            importance_order(&group, &[9 * DAY_MS, 0, 9 * DAY_MS], now),
            importance_order(&group, &[0, 9 * DAY_MS], now)
        );
        assert_eq!(importance_order(&[], &[0], now), Vec::<usize>::new());
    }

    #[test]
    fn target_ages_follow_the_schedule_tags() {
        let daily_and_weekly = schedule(&[("daily", DAY_MS, 7), ("weekly", 7 * DAY_MS, 4)]);
        let days: Vec<i64> = target_ages(Some(&daily_and_weekly))
            .into_iter()
            .map(|age| age / DAY_MS)
            .collect();
        assert_eq!(days, [0, 1, 2, 3, 4, 5, 6, 7, 14, 21]);

        let hourly = schedule(&[("hourly", HOUR_MS, 3), ("manual", DAY_MS, 0)]);
        assert_eq!(target_ages(Some(&hourly)), [0, HOUR_MS, 2 * HOUR_MS]);
        assert_eq!(target_ages(Some(&schedule(&[("manual", DAY_MS, 0)]))), [0]);
        assert_eq!(target_ages(Some(&schedule(&[("odd", 0, 5)]))), [0]);

        let byteback: Vec<i64> = target_ages(None)
            .into_iter()
            .map(|age| age / DAY_MS)
            .collect();
        assert_eq!(byteback, BYTEBACK_TARGET_DAYS);
        assert_eq!(target_ages(Some(&schedule(&[]))), target_ages(None));

        // Overflow ends a tag's ages; an absurd keep is capped.
        let half = i64::MAX / 2;
        assert_eq!(
            target_ages(Some(&schedule(&[("huge", half, 5)]))),
            [0, half, 2 * half]
        );
        let capped = target_ages(Some(&schedule(&[("every-second", 1_000, u32::MAX)])));
        assert_eq!(capped.len(), usize::try_from(MAX_TARGETS_PER_TAG).unwrap());
        assert_eq!(PruneRules::default().target_ages_ms, target_ages(None));
        assert_eq!(PruneRules::default().min_keep, 1);
    }

    #[test]
    fn guards_keep_the_newest_the_worm_protected_and_failing_jobs_snapshots() {
        let now = day(20);
        let mut worm = snapshot("worm", WEB, day(1));
        worm.retain_until_ms = "2027-01-05T08:00:00Z"
            .parse::<Timestamp>()
            .unwrap()
            .as_millisecond();
        let mut worm_ended = snapshot("worm-ended", WEB, day(2));
        worm_ended.retain_until_ms = now;
        let snapshots = [
            worm,
            worm_ended,
            snapshot("old", WEB, day(3)),
            snapshot("newest", WEB, day(10)),
            snapshot("db-old", DB, day(1)),
            snapshot("db-new", DB, day(2)),
        ];
        let on_node = every_id(&snapshots);
        let failing = ids(&["db"]);
        let plan = plan(&snapshots, &on_node, &BTreeMap::new(), &failing, now);
        // Importance: newest, old (nearest 1 day), worm-ended, worm.
        assert_eq!(order_ids(&plan.order), ["worm-ended", "old"]);
        assert_eq!(
            plan.unremovable,
            Unremovable {
                newest: 2,
                worm: 1,
                first_worm_end_ms: Some(snapshots[0].retain_until_ms),
                failing_job: 1,
                ..Unremovable::default()
            }
        );
        assert_eq!(
            plan.unremovable.to_string(),
            "the remaining 4 snapshots may not go: 2 their group's newest, \
             1 WORM-protected (the first window ends 2027-01-05), 1 of a job whose runs fail"
        );
        // Once the job recovers, its old snapshot may go.
        let healthy = prune_order(&snapshots, &on_node, &BTreeMap::new(), &HashSet::new(), now);
        assert_eq!(order_ids(&healthy), ["worm-ended", "old", "db-old"]);
    }

    #[test]
    fn min_keep_holds_and_is_at_least_one() {
        let now = day(10);
        let snapshots: Vec<SnapshotInfo> = (1..=5)
            .map(|index| snapshot(&format!("s{index}"), WEB, day(index)))
            .collect();
        let on_node = every_id(&snapshots);
        let three = plan(
            &snapshots,
            &on_node,
            &min_keep("web", 3),
            &HashSet::new(),
            now,
        );
        assert_eq!(three.order.len(), 2);
        assert_eq!(three.unremovable.min_keep, 2);
        assert_eq!(three.unremovable.newest, 1);
        assert!(
            three
                .unremovable
                .to_string()
                .ends_with("1 their group's newest, 2 kept by their job's keep_last")
        );
        for zero_or_one in [0, 1] {
            let order = prune_order(
                &snapshots,
                &on_node,
                &min_keep("web", zero_or_one),
                &HashSet::new(),
                now,
            );
            assert_eq!(order.len(), 4);
        }
        let all = prune_order(
            &snapshots,
            &on_node,
            &min_keep("web", u32::MAX),
            &HashSet::new(),
            now,
        );
        assert!(all.is_empty());
    }

    #[test]
    fn the_fullest_group_gives_first_and_ties_go_to_the_oldest_candidate() {
        let now = day(10);
        let mut snapshots: Vec<SnapshotInfo> = (1..=5)
            .map(|index| snapshot(&format!("a{index}"), WEB, day(index)))
            .collect();
        snapshots.extend((1..=3).map(|index| snapshot(&format!("b{index}"), DB, day(index))));
        let order = prune_order(
            &snapshots,
            &every_id(&snapshots),
            &BTreeMap::new(),
            &HashSet::new(),
            now,
        );
        // 5 vs 3: web gives twice; at 3 vs 3 b1 ended before a3; at 2 vs 2
        // b2 before a4; then db is down to its newest.
        assert_eq!(order_ids(&order), ["a1", "a2", "b1", "a3", "b2", "a4"]);
        assert_eq!(
            order[0].why,
            "least important removable of 5 snapshots of web/web1 (nearest target 7d, 2d off)"
        );
        assert_eq!(
            order[2].why,
            "least important removable of 3 snapshots of db/db1/main (nearest target 7d, 2d off)"
        );
        assert_eq!(
            (order[2].job.as_str(), order[2].host.as_str()),
            ("db", "db1")
        );
        assert_eq!(order[2].instance, "main");
        assert_eq!(order[2].end_time_ms, day(1));
    }

    #[test]
    fn copies_of_one_snapshot_count_once() {
        let now = day(3);
        let snapshots = [
            snapshot("s1", WEB, day(1)),
            snapshot("s2", WEB, day(2)),
            snapshot("s1", WEB, day(1) + 1_000),
            snapshot("s3", WEB, day(3)),
        ];
        // Copies follow each other at their snapshot's place.
        assert_eq!(
            importance_order(&snapshots, &target_ages(None), now),
            [3, 1, 0, 2]
        );
        let plan = plan(
            &snapshots,
            &ids(&["s1", "s2", "s3"]),
            &min_keep("web", 2),
            &HashSet::new(),
            now,
        );
        // Three snapshots, not four: only one may go.
        assert_eq!(order_ids(&plan.order), ["s1"]);
        assert_eq!(plan.order[0].end_time_ms, day(1) + 1_000);
        assert_eq!(plan.unremovable.min_keep, 1);
        assert_eq!(plan.unremovable.total(), 2);
    }

    #[test]
    fn only_the_nodes_snapshots_are_candidates_but_all_count() {
        let now = day(10);
        // Importance: n4, n3 (1 day), n1 (2 days), n2 (5 days, least).
        let snapshots = [
            snapshot("n1", WEB, now - 2 * DAY_MS),
            snapshot("n2", WEB, now - 5 * DAY_MS),
            snapshot("n3", WEB, now - DAY_MS),
            snapshot("n4", WEB, now),
        ];
        let on_node = ids(&["n1", "n4", "ghost"]);
        for keep in [1, 3] {
            let plan = plan(
                &snapshots,
                &on_node,
                &min_keep("web", keep),
                &HashSet::new(),
                now,
            );
            assert_eq!(order_ids(&plan.order), ["n1"]);
            assert_eq!(plan.unremovable.uncatalogued, 1);
        }
        // Four in the catalogue, two of them elsewhere: min_keep 4 holds n1.
        let plan = plan(
            &snapshots,
            &on_node,
            &min_keep("web", 4),
            &HashSet::new(),
            now,
        );
        assert!(plan.order.is_empty());
        assert_eq!(
            plan.unremovable.to_string(),
            "the remaining 3 snapshots may not go: 1 their group's newest, \
             1 kept by their job's keep_last, 1 not in the catalogue"
        );
        assert!(
            prune_order(
                &snapshots,
                &HashSet::new(),
                &BTreeMap::new(),
                &HashSet::new(),
                now
            )
            .is_empty()
        );
    }

    #[test]
    fn a_job_without_rules_gets_the_defaults() {
        let now = day(10);
        let mut snapshots: Vec<SnapshotInfo> = (1..=3)
            .map(|index| snapshot(&format!("web{index}"), WEB, day(index)))
            .collect();
        snapshots.extend((1..=3).map(|index| {
            snapshot(
                &format!("gone{index}"),
                ("gone", "old-host", ""),
                day(index),
            )
        }));
        let order = prune_order(
            &snapshots,
            &every_id(&snapshots),
            &min_keep("web", 3),
            &HashSet::new(),
            now,
        );
        assert_eq!(order_ids(&order), ["gone1", "gone2"]);
    }

    #[test]
    fn an_id_in_two_groups_is_never_removed_and_counted_once() {
        let now = day(10);
        let snapshots = [
            snapshot("x", WEB, day(1)),
            snapshot("x", DB, day(1)),
            snapshot("web-new", WEB, day(5)),
            snapshot("db-new", DB, day(5)),
            snapshot("web-mid", WEB, day(3)),
        ];
        let plan = plan(
            &snapshots,
            &every_id(&snapshots),
            &BTreeMap::new(),
            &HashSet::new(),
            now,
        );
        assert_eq!(order_ids(&plan.order), ["web-mid"]);
        assert_eq!(plan.unremovable.in_several_groups, 1);
        assert_eq!(plan.unremovable.newest, 2);
        assert_eq!(plan.unremovable.total(), 3);
    }

    #[test]
    fn absurd_times_never_panic() {
        let snapshots = [
            snapshot("max", WEB, i64::MAX),
            snapshot("min", WEB, i64::MIN),
            snapshot("zero", WEB, 0),
            snapshot("minus", WEB, -1),
        ];
        let targets = [i64::MIN, -1, 0, i64::MAX];
        for now in [i64::MIN, 0, i64::MAX] {
            let ranked = importance_order(&snapshots, &targets, now);
            assert_eq!(ranked.len(), 4);
            let rules = BTreeMap::from([(
                "web".to_owned(),
                PruneRules {
                    target_ages_ms: targets.to_vec(),
                    min_keep: 0,
                },
            )]);
            let plan = plan(
                &snapshots,
                &every_id(&snapshots),
                &rules,
                &HashSet::new(),
                now,
            );
            assert!(plan.order.iter().all(|choice| choice.id != "max"));
            // A WORM date of 0 is still after the earliest instant.
            let (removable, worm) = if now == i64::MIN { (0, 3) } else { (3, 0) };
            assert_eq!(plan.order.len(), removable);
            assert_eq!(plan.unremovable.worm, worm);
        }
        let mut far = Unremovable {
            worm: 1,
            first_worm_end_ms: Some(i64::MAX),
            ..Unremovable::default()
        };
        assert!(
            far.to_string()
                .contains(&format!("ends {} ms after the epoch", i64::MAX))
        );
        far.worm = 0;
        far.first_worm_end_ms = None;
        assert_eq!(far.to_string(), "no snapshot is left on the node");
        far.failing_job = 1;
        assert_eq!(
            far.to_string(),
            "the remaining 1 snapshot may not go: 1 of a job whose runs fail"
        );
    }

    #[test]
    fn durations_read_short() {
        let cases = [
            (0, "0ms"),
            (750, "750ms"),
            (1_000, "1s"),
            (90 * 60_000, "1.5h"),
            (3 * DAY_MS, "3d"),
            (36 * HOUR_MS, "1.5d"),
            (-2 * MINUTE_MS, "-2min"),
        ];
        for (ms, text) in cases {
            assert_eq!(short_duration(i128::from(ms)), text);
        }
        assert!(short_duration(i128::from(i64::MIN) * 2).starts_with('-'));
    }

    // Property tests. Ids are `s000`...; a drawn snapshot may have a copy
    // (same group, a later end and another WORM date) and, rarely, the same
    // id in a second group.

    const GROUPS: [(&str, &str, &str); 4] = [
        ("web", "web1", ""),
        ("web", "web2", ""),
        ("db", "db1", "main"),
        ("mail", "mx", ""),
    ];
    const JOBS: [&str; 3] = ["web", "db", "mail"];

    type Key = (String, String, String);

    fn time_ms() -> impl Strategy<Value = i64> {
        prop_oneof![
            // Whole days: many equal ages and ties.
            4 => (0..200_i64).prop_map(day),
            4 => (0..200 * DAY_MS).prop_map(|offset| BASE_MS + offset),
            1 => any::<i64>(),
        ]
    }

    fn retain_until_ms() -> impl Strategy<Value = i64> {
        prop_oneof![
            6 => Just(0_i64),
            2 => (0..300 * DAY_MS).prop_map(|offset| BASE_MS + offset),
            1 => any::<i64>(),
        ]
    }

    fn catalogue() -> impl Strategy<Value = (Vec<SnapshotInfo>, HashSet<String>)> {
        let one = (
            0..GROUPS.len(),
            time_ms(),
            retain_until_ms(),
            proptest::option::weighted(0.2, (0..DAY_MS, retain_until_ms())),
            proptest::option::weighted(0.05, 0..GROUPS.len()),
            proptest::bool::weighted(0.7),
        );
        (proptest::collection::vec(one, 0..40), any::<bool>()).prop_map(|(drawn, ghost)| {
            let mut snapshots = Vec::new();
            let mut on_node = HashSet::new();
            for (index, (group, end, retain, copy, also_in, on)) in drawn.into_iter().enumerate() {
                let id = format!("s{index:03}");
                let mut first = snapshot(&id, GROUPS[group], end);
                first.retain_until_ms = retain;
                if let Some((later, retain)) = copy {
                    let mut second = first.clone();
                    second.end_time_ms = end.saturating_add(later);
                    second.retain_until_ms = retain;
                    snapshots.push(second);
                }
                if let Some(other) = also_in {
                    snapshots.push(snapshot(&id, GROUPS[other], end));
                }
                snapshots.push(first);
                if on {
                    on_node.insert(id);
                }
            }
            if ghost {
                on_node.insert("ghost".to_owned());
            }
            (snapshots, on_node)
        })
    }

    fn targets() -> impl Strategy<Value = Vec<i64>> {
        let tags = proptest::collection::vec(
            (
                proptest::sample::select(vec![HOUR_MS, DAY_MS, 7 * DAY_MS]),
                0..10_u32,
            ),
            0..3,
        );
        prop_oneof![
            Just(target_ages(None)),
            tags.prop_map(|tags| {
                let named: Vec<(String, i64, u32)> = tags
                    .into_iter()
                    .enumerate()
                    .map(|(index, (interval, keep))| (format!("t{index}"), interval, keep))
                    .collect();
                let borrowed: Vec<(&str, i64, u32)> = named
                    .iter()
                    .map(|(name, interval, keep)| (name.as_str(), *interval, *keep))
                    .collect();
                target_ages(Some(&schedule(&borrowed)))
            }),
            proptest::collection::vec(-DAY_MS..300 * DAY_MS, 0..8),
        ]
    }

    fn rules() -> impl Strategy<Value = BTreeMap<String, PruneRules>> {
        let one = (targets(), 0..6_u32).prop_map(|(target_ages_ms, min_keep)| PruneRules {
            target_ages_ms,
            min_keep,
        });
        proptest::collection::btree_map(
            proptest::sample::select(JOBS.to_vec()).prop_map(str::to_owned),
            one,
            0..=JOBS.len(),
        )
    }

    fn failing() -> impl Strategy<Value = HashSet<String>> {
        proptest::sample::subsequence(JOBS.to_vec(), 0..=JOBS.len())
            .prop_map(|jobs| jobs.into_iter().map(str::to_owned).collect())
    }

    fn now_ms() -> impl Strategy<Value = i64> {
        prop_oneof![
            8 => (0..300 * DAY_MS).prop_map(|offset| BASE_MS + offset),
            1 => any::<i64>(),
        ]
    }

    fn key_of(snapshot: &SnapshotInfo) -> Key {
        (
            snapshot.job.clone(),
            snapshot.host.clone(),
            snapshot.instance.clone(),
        )
    }

    /// Per group, per id: (newest end time, latest WORM date) of its copies.
    fn model(snapshots: &[SnapshotInfo]) -> BTreeMap<Key, BTreeMap<String, (i64, i64)>> {
        let mut groups: BTreeMap<Key, BTreeMap<String, (i64, i64)>> = BTreeMap::new();
        for snapshot in snapshots {
            let merged = groups
                .entry(key_of(snapshot))
                .or_default()
                .entry(snapshot.id.clone())
                .or_insert((i64::MIN, i64::MIN));
            merged.0 = merged.0.max(snapshot.end_time_ms);
            merged.1 = merged.1.max(snapshot.retain_until_ms);
        }
        groups
    }

    fn groups_of_id(snapshots: &[SnapshotInfo]) -> HashMap<String, BTreeSet<Key>> {
        let mut groups: HashMap<String, BTreeSet<Key>> = HashMap::new();
        for snapshot in snapshots {
            groups
                .entry(snapshot.id.clone())
                .or_default()
                .insert(key_of(snapshot));
        }
        groups
    }

    fn newest_of(members: &BTreeMap<String, (i64, i64)>) -> Option<&str> {
        members
            .iter()
            .min_by_key(|(id, (end, _))| (std::cmp::Reverse(*end), id.as_str()))
            .map(|(id, _)| id.as_str())
    }

    fn effective_min_keep(rules: &BTreeMap<String, PruneRules>, job: &str) -> usize {
        rules
            .get(job)
            .map_or(1, |rules| usize::try_from(rules.min_keep).unwrap().max(1))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn the_order_holds_no_guarded_or_foreign_snapshot(
            (snapshots, on_node) in catalogue(),
            rules in rules(),
            failing in failing(),
            now in now_ms(),
        ) {
            let plan = plan(&snapshots, &on_node, &rules, &failing, now);
            let groups = model(&snapshots);
            let groups_of = groups_of_id(&snapshots);
            for choice in &plan.order {
                prop_assert!(on_node.contains(&choice.id));
                let key = (choice.job.clone(), choice.host.clone(), choice.instance.clone());
                prop_assert_eq!(groups_of.get(&choice.id).map(BTreeSet::len), Some(1));
                let members = &groups[&key];
                prop_assert_ne!(newest_of(members), Some(choice.id.as_str()));
                let (end, retain) = members[&choice.id];
                prop_assert!(retain <= now, "WORM until {} at {}", retain, now);
                prop_assert_eq!(choice.end_time_ms, end);
                prop_assert!(!failing.contains(&choice.job));
            }
            // Every id on the node is in the order or counted once as staying.
            prop_assert_eq!(plan.order.len() + plan.unremovable.total(), on_node.len());
            let distinct: BTreeSet<&str> = order_ids(&plan.order).into_iter().collect();
            prop_assert_eq!(distinct.len(), plan.order.len());
            prop_assert_eq!(
                prune_order(&snapshots, &on_node, &rules, &failing, now),
                plan.order
            );
        }

        #[test]
        fn every_prefix_of_the_order_keeps_each_groups_minimum(
            (snapshots, on_node) in catalogue(),
            rules in rules(),
            failing in failing(),
            now in now_ms(),
        ) {
            let order = prune_order(&snapshots, &on_node, &rules, &failing, now);
            let mut left: BTreeMap<Key, usize> = model(&snapshots)
                .into_iter()
                .map(|(key, members)| (key, members.len()))
                .collect();
            for (taken, choice) in order.iter().enumerate() {
                let key = (choice.job.clone(), choice.host.clone(), choice.instance.clone());
                let count = left.get_mut(&key).unwrap();
                *count -= 1;
                prop_assert!(
                    *count >= effective_min_keep(&rules, &choice.job),
                    "after {} removals {:?} has {} left", taken + 1, key, count
                );
            }
        }

        #[test]
        fn within_a_group_the_less_important_go_first(
            (snapshots, on_node) in catalogue(),
            rules in rules(),
            now in now_ms(),
        ) {
            let order = prune_order(&snapshots, &on_node, &rules, &HashSet::new(), now);
            for key in model(&snapshots).into_keys() {
                let group: Vec<SnapshotInfo> = snapshots
                    .iter()
                    .filter(|snapshot| key_of(snapshot) == key)
                    .cloned()
                    .collect();
                let targets = rules
                    .get(&key.0)
                    .map_or_else(|| target_ages(None), |rules| rules.target_ages_ms.clone());
                let mut rank: HashMap<&str, usize> = HashMap::new();
                for index in importance_order(&group, &targets, now) {
                    let next = rank.len();
                    rank.entry(group[index].id.as_str()).or_insert(next);
                }
                let ranks: Vec<usize> = order
                    .iter()
                    .filter(|choice| {
                        (&choice.job, &choice.host, &choice.instance) == (&key.0, &key.1, &key.2)
                    })
                    .map(|choice| rank[choice.id.as_str()])
                    .collect();
                prop_assert!(ranks.windows(2).all(|pair| pair[0] > pair[1]), "{:?}", ranks);
            }
        }

        #[test]
        fn importance_order_is_a_permutation_with_copies_together(
            (snapshots, _) in catalogue(),
            targets in targets(),
            now in now_ms(),
        ) {
            let ranked = importance_order(&snapshots, &targets, now);
            let mut sorted = ranked.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..snapshots.len()).collect::<Vec<_>>());
            let mut seen = HashSet::new();
            let mut previous: Option<&str> = None;
            for index in ranked {
                let id = snapshots[index].id.as_str();
                if previous != Some(id) {
                    prop_assert!(seen.insert(id), "copies of {} apart", id);
                }
                previous = Some(id);
            }
        }

        #[test]
        fn input_order_does_not_matter(
            ((snapshots, on_node), shuffled) in catalogue()
                .prop_flat_map(|(list, on_node)| {
                    (Just((list.clone(), on_node)), Just(list).prop_shuffle())
                }),
            rules in rules(),
            failing in failing(),
            now in now_ms(),
        ) {
            prop_assert_eq!(
                plan(&snapshots, &on_node, &rules, &failing, now),
                plan(&shuffled, &on_node, &rules, &failing, now)
            );
        }
    }
}
