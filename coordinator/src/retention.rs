//! Retention: which of a job's snapshots its rules keep, and why.
//!
//! This module owns the decision and nothing else. It is pure: it never
//! deletes, never reads a clock or the catalogue, and cannot fail; the engine
//! passes the catalogue's committed snapshots, the job's rules and `now_ms`,
//! then acts on the [`RetentionPlan`] (or prints it as a dry run). A mistake
//! here destroys backups, so every doubt resolves toward keeping.
//!
//! Rules apply to each (job, host, instance) group on its own, with the
//! group's snapshots ordered newest first (by end time, ties by id):
//!
//! - **tags** (backy's schedules): a tag with count N keeps the N newest
//!   snapshots carrying it. A tag without a rule keeps nothing; backy 2 left
//!   such revisions alone, but then a calendar-only job whose runs carry
//!   schedule tags could never prune, so a snapshot to keep for good gets a
//!   WORM date instead. backy's second condition (also keep what is younger
//!   than keep x interval) needs the tag's interval, which is the
//!   scheduler's; not modelled here.
//! - **last N** (restic's keep-last): the N newest.
//! - **hourly, daily, weekly, monthly, yearly N** (restic's keep-*): the
//!   newest snapshot of each of the N most recent clock hours, days, ISO
//!   weeks, months or years that have a snapshot, in the rules' time zone.
//!   A bucket is counted once even where the local clock revisits it (the
//!   repeated hour of a DST fall-back, a zone's history moving its date
//!   back), which is why seen buckets are a set, not restic's "differs from
//!   the previous one". restic's later addition (also keep the oldest
//!   snapshot while a count is left) is not adopted.
//!
//! A snapshot kept for several reasons lists them all. Guards stand above
//! the rules:
//!
//! - the newest snapshot of a group is always kept, so a misconfigured rule
//!   (a tag no run carries) cannot leave a job with nothing to restore;
//! - a snapshot whose `retain_until_ms` is after `now_ms` is kept: the store
//!   refuses to delete it anyway, and planning it would only fail later;
//! - without any rule (every count zero) everything is kept: an unconfigured
//!   retention must not read as "delete all but the newest";
//! - while the job's recent runs fail nothing is removed: the old snapshots
//!   may be the only good ones left while new ones do not arrive.
//!
//! The same id in one group more than once is one snapshot with copies on
//! several nodes: it is counted once (newest end time, union of tags, latest
//! WORM date) and every copy gets the same decision, so no rule keeps one
//! copy of a snapshot and drops another.
//!
//! Planning again on the kept snapshots removes nothing: each rule's keepers
//! are still the newest of their tag, group or bucket among the survivors,
//! and no bucket can overtake them, since removal only makes the others
//! older. The tests check this for random rule combinations.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use fabric_proto::v1::Snapshot;
use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;

/// What retention needs to know about one committed snapshot (complete or
/// verified; incomplete ones never reach a store's catalogue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The snapshot's id; equal ids in one group are copies of one snapshot.
    pub id: String,
    /// The job that made it.
    pub job: String,
    /// The host whose data it holds.
    pub host: String,
    /// The job's instance (empty when the job has none).
    pub instance: String,
    /// When it was committed, milliseconds since the Unix epoch.
    pub end_time_ms: i64,
    /// Its tags (the schedule's, e.g. `daily`, `weekly`).
    pub tags: Vec<String>,
    /// The end of its WORM window (milliseconds since the Unix epoch): never
    /// removed before it. 0 for none.
    pub retain_until_ms: i64,
}

impl From<&Snapshot> for SnapshotInfo {
    fn from(snapshot: &Snapshot) -> Self {
        Self {
            id: snapshot.id.clone(),
            job: snapshot.job.clone(),
            host: snapshot.host.clone(),
            instance: snapshot.instance.clone(),
            end_time_ms: snapshot.end_time_ms,
            tags: snapshot.tags.clone(),
            retain_until_ms: snapshot.retain_until_ms,
        }
    }
}

/// A job's retention rules. Every count is "how many"; 0 switches a rule off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionRules {
    /// backy: per schedule tag, keep the N newest snapshots carrying it.
    pub tag_keep: BTreeMap<String, u32>,
    /// Keep the N newest snapshots.
    pub keep_last: u32,
    /// Keep the newest snapshot of each of the N most recent clock hours.
    pub keep_hourly: u32,
    /// ... of the N most recent days.
    pub keep_daily: u32,
    /// ... of the N most recent ISO weeks (Monday to Sunday).
    pub keep_weekly: u32,
    /// ... of the N most recent calendar months.
    pub keep_monthly: u32,
    /// ... of the N most recent calendar years.
    pub keep_yearly: u32,
    /// The calendar the hourly to yearly buckets follow.
    pub time_zone: TimeZone,
}

impl Default for RetentionRules {
    /// No rules (keep everything), buckets in UTC.
    fn default() -> Self {
        Self {
            tag_keep: BTreeMap::new(),
            keep_last: 0,
            keep_hourly: 0,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
            keep_yearly: 0,
            time_zone: TimeZone::UTC,
        }
    }
}

impl RetentionRules {
    /// Whether no rule keeps anything (every count, tags' included, is 0).
    /// Such rules keep everything: `keep = 0` everywhere is far more likely
    /// a configuration slip than a wish to delete all but the newest.
    pub fn is_empty(&self) -> bool {
        self.keep_last == 0
            && self.calendar_counts().iter().all(|(_, count)| *count == 0)
            && self.tag_keep.values().all(|count| *count == 0)
    }

    fn calendar_counts(&self) -> [(Period, u32); 5] {
        [
            (Period::Hourly, self.keep_hourly),
            (Period::Daily, self.keep_daily),
            (Period::Weekly, self.keep_weekly),
            (Period::Monthly, self.keep_monthly),
            (Period::Yearly, self.keep_yearly),
        ]
    }
}

/// What the engine knows about the job beyond its snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Guards {
    /// The job's recent runs failed: remove nothing.
    pub recent_runs_failed: bool,
}

/// A calendar period of restic's keep-hourly to keep-yearly rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Period {
    /// A clock hour of a local day.
    Hourly,
    /// A local calendar day.
    Daily,
    /// An ISO 8601 week.
    Weekly,
    /// A calendar month.
    Monthly,
    /// A calendar year.
    Yearly,
}

impl fmt::Display for Period {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Self::Hourly => "hourly",
            Self::Daily => "daily",
            Self::Weekly => "weekly",
            Self::Monthly => "monthly",
            Self::Yearly => "yearly",
        })
    }
}

/// Why a snapshot is kept. Ranks count from 1 (the newest) up to `of`, the
/// rule's count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeepReason {
    /// The newest snapshot of its group.
    NewestGood,
    /// Its WORM window has not ended.
    Worm {
        /// When it ends, milliseconds since the Unix epoch.
        until_ms: i64,
    },
    /// Among the newest `of` carrying `tag`.
    Tag {
        /// The tag.
        tag: String,
        /// Its place among the snapshots carrying the tag.
        rank: u32,
        /// The tag's keep count.
        of: u32,
    },
    /// Among the newest `of` of its group.
    Last {
        /// Its place in the group.
        rank: u32,
        /// The keep-last count.
        of: u32,
    },
    /// The newest of its hour, day, week, month or year.
    Calendar {
        /// Which rule.
        period: Period,
        /// Its bucket's place among the buckets that have a snapshot.
        rank: u32,
        /// The rule's count.
        of: u32,
    },
    /// The job has no retention rules.
    NoRules,
    /// The rules would remove it, but the job's recent runs failed.
    RunsFailing,
}

impl fmt::Display for KeepReason {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NewestGood => formatter.write_str("newest good snapshot"),
            Self::Worm { until_ms } => match Timestamp::from_millisecond(*until_ms) {
                Ok(until) => write!(
                    formatter,
                    "WORM until {}",
                    TimeZone::UTC.to_datetime(until).date()
                ),
                Err(_) => write!(formatter, "WORM until {until_ms} ms after the epoch"),
            },
            Self::Tag { tag, rank, of } => write!(formatter, "tag {tag} {rank} of {of}"),
            Self::Last { rank, of } => write!(formatter, "last {rank} of {of}"),
            Self::Calendar { period, rank, of } => write!(formatter, "{period} {rank} of {of}"),
            Self::NoRules => formatter.write_str("no retention rules"),
            Self::RunsFailing => formatter.write_str("recent runs failed"),
        }
    }
}

/// The verdict on one snapshot (one copy of it, for a snapshot with copies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The snapshot, as passed in.
    pub snapshot: SnapshotInfo,
    /// Why it is kept; empty: remove it.
    pub reasons: Vec<KeepReason>,
}

impl Decision {
    /// Whether anything keeps it.
    pub fn is_kept(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// One decision per snapshot passed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPlan {
    /// Groups in (job, host, instance) order, each newest first (ties by
    /// id; copies of one snapshot next to each other, newest first).
    pub decisions: Vec<Decision>,
}

impl RetentionPlan {
    /// The snapshots to keep, with their reasons.
    pub fn kept(&self) -> impl Iterator<Item = &Decision> {
        self.decisions.iter().filter(|decision| decision.is_kept())
    }

    /// The snapshots to remove.
    pub fn removed(&self) -> impl Iterator<Item = &Decision> {
        self.decisions.iter().filter(|decision| !decision.is_kept())
    }
}

/// Decides, for every snapshot, whether `rules` and `guards` keep it at
/// `now_ms` (which only the WORM guard reads).
pub fn plan(
    snapshots: &[SnapshotInfo],
    rules: &RetentionRules,
    guards: &Guards,
    now_ms: i64,
) -> RetentionPlan {
    let mut groups: BTreeMap<(&str, &str, &str), Vec<&SnapshotInfo>> = BTreeMap::new();
    for snapshot in snapshots {
        groups
            .entry((&snapshot.job, &snapshot.host, &snapshot.instance))
            .or_default()
            .push(snapshot);
    }
    let mut decisions = Vec::with_capacity(snapshots.len());
    for members in groups.into_values() {
        let candidates = merge_copies(members);
        let verdicts = judge_group(&candidates, rules, guards, now_ms);
        for (candidate, reasons) in candidates.into_iter().zip(verdicts) {
            decisions.extend(candidate.copies.into_iter().map(|snapshot| Decision {
                snapshot: snapshot.clone(),
                reasons: reasons.clone(),
            }));
        }
    }
    RetentionPlan { decisions }
}

/// One snapshot of a group, with all its copies.
struct Candidate<'a> {
    id: &'a str,
    end_time_ms: i64,
    retain_until_ms: i64,
    tags: BTreeSet<&'a str>,
    copies: Vec<&'a SnapshotInfo>,
}

/// The group's snapshots, copies merged, newest first (ties by id).
fn merge_copies(members: Vec<&SnapshotInfo>) -> Vec<Candidate<'_>> {
    let mut by_id: BTreeMap<&str, Candidate<'_>> = BTreeMap::new();
    for snapshot in members {
        let candidate = by_id.entry(&snapshot.id).or_insert_with(|| Candidate {
            id: &snapshot.id,
            end_time_ms: snapshot.end_time_ms,
            retain_until_ms: snapshot.retain_until_ms,
            tags: BTreeSet::new(),
            copies: Vec::new(),
        });
        candidate.end_time_ms = candidate.end_time_ms.max(snapshot.end_time_ms);
        candidate.retain_until_ms = candidate.retain_until_ms.max(snapshot.retain_until_ms);
        candidate
            .tags
            .extend(snapshot.tags.iter().map(String::as_str));
        candidate.copies.push(snapshot);
    }
    let mut candidates: Vec<Candidate<'_>> = by_id.into_values().collect();
    for candidate in &mut candidates {
        // Stable: equal copies stay in input order.
        candidate
            .copies
            .sort_by_key(|copy| std::cmp::Reverse(copy.end_time_ms));
    }
    candidates.sort_by(|a, b| {
        b.end_time_ms
            .cmp(&a.end_time_ms)
            .then_with(|| a.id.cmp(b.id))
    });
    candidates
}

/// The reasons that keep each of a group's candidates (same order).
fn judge_group(
    candidates: &[Candidate<'_>],
    rules: &RetentionRules,
    guards: &Guards,
    now_ms: i64,
) -> Vec<Vec<KeepReason>> {
    let mut reasons = vec![Vec::new(); candidates.len()];
    if let Some(newest) = reasons.first_mut() {
        newest.push(KeepReason::NewestGood);
    }
    for (candidate, kept_by) in candidates.iter().zip(&mut reasons) {
        if candidate.retain_until_ms > now_ms {
            kept_by.push(KeepReason::Worm {
                until_ms: candidate.retain_until_ms,
            });
        }
    }
    for (tag, &of) in &rules.tag_keep {
        let carrying = candidates
            .iter()
            .zip(&mut reasons)
            .filter(|(candidate, _)| candidate.tags.contains(tag.as_str()));
        for ((_, kept_by), rank) in carrying.zip(1..=of) {
            kept_by.push(KeepReason::Tag {
                tag: tag.clone(),
                rank,
                of,
            });
        }
    }
    let of = rules.keep_last;
    for (kept_by, rank) in reasons.iter_mut().zip(1..=of) {
        kept_by.push(KeepReason::Last { rank, of });
    }
    for (period, of) in rules.calendar_counts() {
        let mut seen = HashSet::new();
        let mut rank = 0;
        for (candidate, kept_by) in candidates.iter().zip(&mut reasons) {
            if rank == of {
                break;
            }
            // The first (newest) snapshot met in a bucket is its newest.
            if seen.insert(bucket(period, candidate.end_time_ms, &rules.time_zone)) {
                rank += 1;
                kept_by.push(KeepReason::Calendar { period, rank, of });
            }
        }
    }
    let fallback = if rules.is_empty() {
        Some(KeepReason::NoRules)
    } else if guards.recent_runs_failed {
        Some(KeepReason::RunsFailing)
    } else {
        None
    };
    if let Some(fallback) = fallback {
        for kept_by in reasons.iter_mut().filter(|kept_by| kept_by.is_empty()) {
            kept_by.push(fallback.clone());
        }
    }
    reasons
}

/// A calendar bucket, in the rules' time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Bucket {
    Hour(Date, i8),
    Day(Date),
    Week {
        year: i16,
        week: i8,
    },
    Month {
        year: i16,
        month: i8,
    },
    Year(i16),
    /// Beyond jiff's range (about ±9999 years): no calendar has it, so it
    /// shares a bucket with nothing rather than being refused.
    Unrepresentable(i64),
}

fn bucket(period: Period, time_ms: i64, time_zone: &TimeZone) -> Bucket {
    let Ok(timestamp) = Timestamp::from_millisecond(time_ms) else {
        return Bucket::Unrepresentable(time_ms);
    };
    let local = time_zone.to_datetime(timestamp);
    match period {
        Period::Hourly => Bucket::Hour(local.date(), local.hour()),
        Period::Daily => Bucket::Day(local.date()),
        Period::Weekly => {
            let week = local.date().iso_week_date();
            Bucket::Week {
                year: week.year(),
                week: week.week(),
            }
        }
        Period::Monthly => Bucket::Month {
            year: local.year(),
            month: local.month(),
        },
        Period::Yearly => Bucket::Year(local.year()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet, HashSet};

    use jiff::Timestamp;
    use jiff::tz::TimeZone;
    use proptest::prelude::*;

    use super::*;

    const HOUR_MS: i64 = 3_600_000;
    const DAY_MS: i64 = 24 * HOUR_MS;

    /// Milliseconds of an RFC 3339 instant.
    fn at(instant: &str) -> i64 {
        instant.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn snapshot(id: &str, end_time_ms: i64, tags: &[&str]) -> SnapshotInfo {
        SnapshotInfo {
            id: id.to_owned(),
            job: "web".to_owned(),
            host: "web1".to_owned(),
            instance: String::new(),
            end_time_ms,
            tags: tags.iter().map(|tag| (*tag).to_owned()).collect(),
            retain_until_ms: 0,
        }
    }

    fn berlin() -> TimeZone {
        TimeZone::get("Europe/Berlin").unwrap()
    }

    fn kept_ids(plan: &RetentionPlan) -> BTreeSet<String> {
        plan.kept()
            .map(|decision| decision.snapshot.id.clone())
            .collect()
    }

    fn ids(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|id| (*id).to_owned()).collect()
    }

    fn reasons_of(plan: &RetentionPlan, id: &str) -> Vec<String> {
        plan.decisions
            .iter()
            .find(|decision| decision.snapshot.id == id)
            .unwrap()
            .reasons
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// January 2025, one snapshot a day at 02:00 UTC, ids `d01`..`d31`.
    fn january() -> Vec<SnapshotInfo> {
        (1..=31)
            .map(|day| {
                snapshot(
                    &format!("d{day:02}"),
                    at(&format!("2025-01-{day:02}T02:00:00Z")),
                    &["daily"],
                )
            })
            .collect()
    }

    #[test]
    fn a_month_of_dailies_keeps_seven_days_and_four_iso_weeks() {
        let rules = RetentionRules {
            keep_daily: 7,
            keep_weekly: 4,
            ..RetentionRules::default()
        };
        let plan = plan(
            &january(),
            &rules,
            &Guards::default(),
            at("2025-02-01T00:00:00Z"),
        );
        // Days 25..31; ISO weeks 5 (from Mon 27th), 4 (20th-26th), 3 (13th-19th)
        // and 2 (6th-12th) end on Friday 31st and Sundays 26th, 19th, 12th.
        assert_eq!(
            kept_ids(&plan),
            ids(&[
                "d12", "d19", "d25", "d26", "d27", "d28", "d29", "d30", "d31"
            ])
        );
        assert_eq!(
            reasons_of(&plan, "d31"),
            ["newest good snapshot", "daily 1 of 7", "weekly 1 of 4"]
        );
        assert_eq!(reasons_of(&plan, "d26"), ["daily 6 of 7", "weekly 2 of 4"]);
        assert_eq!(reasons_of(&plan, "d12"), ["weekly 4 of 4"]);
        assert_eq!(plan.removed().count(), 22);
        let order: Vec<&str> = plan
            .decisions
            .iter()
            .map(|decision| decision.snapshot.id.as_str())
            .collect();
        assert_eq!(order.first(), Some(&"d31"));
        assert_eq!(order.last(), Some(&"d01"));
    }

    #[test]
    fn monthly_and_yearly_take_the_newest_of_each_calendar_period() {
        let snapshots = [
            snapshot("dec-early", at("2024-12-02T10:00:00Z"), &[]),
            snapshot("dec-late", at("2024-12-31T10:00:00Z"), &[]),
            snapshot("jan", at("2025-01-15T10:00:00Z"), &[]),
            snapshot("feb", at("2025-02-15T10:00:00Z"), &[]),
        ];
        let rules = RetentionRules {
            keep_monthly: 2,
            keep_yearly: 2,
            ..RetentionRules::default()
        };
        let plan = plan(&snapshots, &rules, &Guards::default(), 0);
        assert_eq!(kept_ids(&plan), ids(&["feb", "jan", "dec-late"]));
        assert_eq!(
            reasons_of(&plan, "feb"),
            ["newest good snapshot", "monthly 1 of 2", "yearly 1 of 2"]
        );
        assert_eq!(reasons_of(&plan, "dec-late"), ["yearly 2 of 2"]);
    }

    #[test]
    fn berlin_days_follow_the_local_date_across_the_spring_change() {
        // 2025-03-30 in Berlin: CET until 01:00 UTC, then CEST; a 23-hour day.
        let snapshots = [
            snapshot("sat-late", at("2025-03-29T22:30:00Z"), &[]), // 23:30 CET, 29th
            snapshot("sun-first", at("2025-03-29T23:30:00Z"), &[]), // 00:30 CET, 30th
            snapshot("sun-last", at("2025-03-30T21:30:00Z"), &[]), // 23:30 CEST, 30th
            snapshot("mon-first", at("2025-03-30T22:30:00Z"), &[]), // 00:30 CEST, 31st
        ];
        let mut rules = RetentionRules {
            keep_daily: 3,
            time_zone: berlin(),
            ..RetentionRules::default()
        };
        let in_berlin = plan(&snapshots, &rules, &Guards::default(), 0);
        assert_eq!(
            kept_ids(&in_berlin),
            ids(&["mon-first", "sun-last", "sat-late"])
        );
        assert_eq!(reasons_of(&in_berlin, "sat-late"), ["daily 3 of 3"]);
        // The same instants in UTC fall on two days only.
        rules.time_zone = TimeZone::UTC;
        let in_utc = plan(&snapshots, &rules, &Guards::default(), 0);
        assert_eq!(kept_ids(&in_utc), ids(&["mon-first", "sun-first"]));
        assert_eq!(reasons_of(&in_utc, "sun-first"), ["daily 2 of 3"]);
    }

    #[test]
    fn berlin_repeated_fall_back_hour_is_one_clock_hour() {
        // 2025-10-26 in Berlin: 02:00-02:59 happens twice (00:xx and 01:xx UTC).
        let snapshots = [
            snapshot("cest-0215", at("2025-10-26T00:15:00Z"), &[]),
            snapshot("cest-0245", at("2025-10-26T00:45:00Z"), &[]),
            snapshot("cet-0215", at("2025-10-26T01:15:00Z"), &[]),
            snapshot("cet-0245", at("2025-10-26T01:45:00Z"), &[]),
            snapshot("cet-0315", at("2025-10-26T02:15:00Z"), &[]),
        ];
        let rules = RetentionRules {
            keep_hourly: 3,
            time_zone: berlin(),
            ..RetentionRules::default()
        };
        let plan = plan(&snapshots, &rules, &Guards::default(), 0);
        // Only two clock hours have snapshots, so "3" keeps just two.
        assert_eq!(kept_ids(&plan), ids(&["cet-0315", "cet-0245"]));
        assert_eq!(reasons_of(&plan, "cet-0245"), ["hourly 2 of 3"]);
    }

    #[test]
    fn backy_tags_keep_the_newest_of_each_tag_and_untagged_rules_keep_nothing() {
        // 1-15 January 2025 daily; Sundays (5th, 12th) also weekly; a manual
        // snapshot on the 3rd carries a tag without a rule.
        let mut snapshots: Vec<SnapshotInfo> = (1..=15)
            .map(|day| {
                let tags: &[&str] = if day % 7 == 5 {
                    &["daily", "weekly"]
                } else {
                    &["daily"]
                };
                snapshot(
                    &format!("d{day:02}"),
                    at(&format!("2025-01-{day:02}T03:00:00Z")),
                    tags,
                )
            })
            .collect();
        snapshots.push(snapshot("manual", at("2025-01-03T12:00:00Z"), &["manual"]));
        let rules = RetentionRules {
            tag_keep: BTreeMap::from([("daily".to_owned(), 3), ("weekly".to_owned(), 2)]),
            ..RetentionRules::default()
        };
        let plan = plan(&snapshots, &rules, &Guards::default(), 0);
        assert_eq!(kept_ids(&plan), ids(&["d05", "d12", "d13", "d14", "d15"]));
        assert_eq!(
            reasons_of(&plan, "d15"),
            ["newest good snapshot", "tag daily 1 of 3"]
        );
        assert_eq!(reasons_of(&plan, "d12"), ["tag weekly 1 of 2"]);
        assert_eq!(reasons_of(&plan, "d05"), ["tag weekly 2 of 2"]);
        assert!(reasons_of(&plan, "manual").is_empty());
    }

    #[test]
    fn guards_keep_the_newest_the_worm_protected_and_all_while_runs_fail() {
        let now = at("2026-01-05T00:00:00Z");
        let mut worm = snapshot("worm", at("2025-12-01T00:00:00Z"), &["daily"]);
        worm.retain_until_ms = at("2027-01-05T08:00:00Z");
        let mut worm_ended = snapshot("worm-ended", at("2025-12-02T00:00:00Z"), &["daily"]);
        worm_ended.retain_until_ms = now;
        let snapshots = [
            worm,
            worm_ended,
            snapshot("old", at("2025-12-03T00:00:00Z"), &["weekly"]),
            snapshot("newest", at("2026-01-04T00:00:00Z"), &["daily"]),
        ];
        // A rule that keeps only "old": the newest survives regardless.
        let rules = RetentionRules {
            tag_keep: BTreeMap::from([("weekly".to_owned(), 1)]),
            ..RetentionRules::default()
        };
        let healthy = plan(&snapshots, &rules, &Guards::default(), now);
        assert_eq!(kept_ids(&healthy), ids(&["newest", "old", "worm"]));
        assert_eq!(reasons_of(&healthy, "newest"), ["newest good snapshot"]);
        assert_eq!(reasons_of(&healthy, "worm"), ["WORM until 2027-01-05"]);
        assert_eq!(
            healthy
                .removed()
                .map(|decision| decision.snapshot.id.as_str())
                .collect::<Vec<_>>(),
            ["worm-ended"]
        );

        let failing = Guards {
            recent_runs_failed: true,
        };
        let failing = plan(&snapshots, &rules, &failing, now);
        assert_eq!(failing.removed().count(), 0);
        assert_eq!(reasons_of(&failing, "worm-ended"), ["recent runs failed"]);
        assert_eq!(reasons_of(&failing, "old"), ["tag weekly 1 of 1"]);
    }

    #[test]
    fn no_rules_keep_everything() {
        let zeroed = RetentionRules {
            tag_keep: BTreeMap::from([("daily".to_owned(), 0)]),
            ..RetentionRules::default()
        };
        assert!(RetentionRules::default().is_empty());
        assert!(zeroed.is_empty());
        assert!(
            !RetentionRules {
                keep_yearly: 1,
                ..RetentionRules::default()
            }
            .is_empty()
        );
        let plan = plan(&january(), &zeroed, &Guards::default(), 0);
        assert_eq!(plan.removed().count(), 0);
        assert_eq!(reasons_of(&plan, "d31"), ["newest good snapshot"]);
        assert_eq!(reasons_of(&plan, "d01"), ["no retention rules"]);
    }

    #[test]
    fn each_job_host_and_instance_is_judged_on_its_own() {
        let mut other_host = snapshot("h2-old", 1_000, &[]);
        other_host.host = "web2".to_owned();
        let mut other_instance = snapshot("i2-old", 2_000, &[]);
        other_instance.instance = "db2".to_owned();
        let mut other_job = snapshot("j2-old", 3_000, &[]);
        other_job.job = "mail".to_owned();
        let snapshots = [
            snapshot("h1-old", 5_000, &[]),
            snapshot("h1-new", 9_000, &[]),
            other_host,
            other_instance,
            other_job,
        ];
        let rules = RetentionRules {
            keep_last: 1,
            ..RetentionRules::default()
        };
        let plan = plan(&snapshots, &rules, &Guards::default(), 0);
        assert_eq!(
            kept_ids(&plan),
            ids(&["h1-new", "h2-old", "i2-old", "j2-old"])
        );
    }

    #[test]
    fn equal_end_times_break_ties_by_id_whatever_the_input_order() {
        let rules = RetentionRules {
            keep_last: 1,
            keep_daily: 1,
            ..RetentionRules::default()
        };
        let forward = [snapshot("a", 7_000, &[]), snapshot("b", 7_000, &[])];
        let backward = [snapshot("b", 7_000, &[]), snapshot("a", 7_000, &[])];
        let first = plan(&forward, &rules, &Guards::default(), 0);
        let second = plan(&backward, &rules, &Guards::default(), 0);
        assert_eq!(first, second);
        assert_eq!(kept_ids(&first), ids(&["a"]));
        assert_eq!(first.decisions[1].snapshot.id, "b");
    }

    #[test]
    fn copies_of_one_snapshot_count_once_and_share_their_decision() {
        let mut copy_on_node_two = snapshot("run-2", at("2025-01-02T10:00:05Z"), &[]);
        copy_on_node_two.retain_until_ms = at("2030-01-01T00:00:00Z");
        let snapshots = [
            snapshot("run-1", at("2025-01-01T10:00:00Z"), &[]),
            snapshot("run-2", at("2025-01-02T10:00:00Z"), &[]),
            copy_on_node_two,
            snapshot("run-3", at("2025-01-03T10:00:00Z"), &[]),
            snapshot("run-0", at("2024-12-31T10:00:00Z"), &[]),
        ];
        let rules = RetentionRules {
            keep_last: 3,
            ..RetentionRules::default()
        };
        let plan = plan(
            &snapshots,
            &rules,
            &Guards::default(),
            at("2025-02-01T00:00:00Z"),
        );
        assert_eq!(plan.decisions.len(), 5);
        assert_eq!(plan.removed().count(), 1);
        let copies: Vec<&Decision> = plan
            .decisions
            .iter()
            .filter(|decision| decision.snapshot.id == "run-2")
            .collect();
        assert_eq!(copies.len(), 2);
        assert_eq!(copies[0].reasons, copies[1].reasons);
        assert_eq!(copies[0].snapshot.end_time_ms, at("2025-01-02T10:00:05Z"));
        assert_eq!(
            reasons_of(&plan, "run-2"),
            ["WORM until 2030-01-01", "last 2 of 3"]
        );
    }

    #[test]
    fn absurd_and_pre_epoch_times_never_panic() {
        let snapshots = [
            snapshot("max", i64::MAX, &[]),
            snapshot("almost-max", i64::MAX - 1, &[]),
            snapshot("min", i64::MIN, &[]),
            snapshot("1969-a", at("1969-12-31T10:00:00Z"), &[]),
            snapshot("1969-b", at("1969-12-31T20:00:00Z"), &[]),
            snapshot("epoch", 0, &[]),
        ];
        let rules = RetentionRules {
            keep_hourly: 10,
            keep_daily: 4,
            keep_weekly: 10,
            keep_monthly: 10,
            keep_yearly: 10,
            time_zone: berlin(),
            ..RetentionRules::default()
        };
        let plan = plan(&snapshots, &rules, &Guards::default(), 0);
        assert_eq!(plan.decisions.len(), snapshots.len());
        // Out of range, each is its own bucket; the two 1969 ones share
        // Berlin's 31 December (the later is 21:00 CET), so "1969-a" is no
        // day's newest.
        assert_eq!(
            reasons_of(&plan, "almost-max"),
            [
                "hourly 2 of 10",
                "daily 2 of 4",
                "weekly 2 of 10",
                "monthly 2 of 10",
                "yearly 2 of 10"
            ]
        );
        // Wednesday 31 December 1969 is in ISO week 1970-W01, the epoch's.
        assert_eq!(
            reasons_of(&plan, "1969-b"),
            [
                "hourly 4 of 10",
                "daily 4 of 4",
                "monthly 4 of 10",
                "yearly 4 of 10"
            ]
        );
        assert_eq!(reasons_of(&plan, "1969-a"), ["hourly 5 of 10"]);
        assert_eq!(reasons_of(&plan, "min")[0], "hourly 6 of 10");
        let far = KeepReason::Worm { until_ms: i64::MAX }.to_string();
        assert_eq!(far, format!("WORM until {} ms after the epoch", i64::MAX));
    }

    #[test]
    fn reasons_read_as_short_text() {
        let cases = [
            (KeepReason::NewestGood, "newest good snapshot"),
            (
                KeepReason::Worm {
                    until_ms: at("2027-01-05T23:59:59Z"),
                },
                "WORM until 2027-01-05",
            ),
            (
                KeepReason::Tag {
                    tag: "weekly".to_owned(),
                    rank: 2,
                    of: 4,
                },
                "tag weekly 2 of 4",
            ),
            (KeepReason::Last { rank: 1, of: 3 }, "last 1 of 3"),
            (
                KeepReason::Calendar {
                    period: Period::Daily,
                    rank: 2,
                    of: 7,
                },
                "daily 2 of 7",
            ),
            (KeepReason::NoRules, "no retention rules"),
            (KeepReason::RunsFailing, "recent runs failed"),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text);
        }
    }

    // Property tests. Ids are unique (`s000`...) so decisions map back to
    // inputs one to one; copies have their own unit test above.

    const TAGS: [&str; 4] = ["hourly", "daily", "weekly", "manual"];
    const ZONES: [&str; 6] = [
        "UTC",
        "Europe/Berlin",
        "America/Santiago",
        "Australia/Lord_Howe",
        "Pacific/Apia",
        "Asia/Kathmandu",
    ];
    const GROUPS: [(&str, &str, &str); 3] = [
        ("web", "web1", ""),
        ("web", "web2", ""),
        ("db", "db1", "main"),
    ];
    /// 2025-01-01T00:00:00Z.
    const BASE_MS: i64 = 1_735_689_600_000;

    fn time_ms() -> impl Strategy<Value = i64> {
        prop_oneof![
            // Whole hours over two days: many equal times and shared buckets.
            3 => (0..48_i64).prop_map(|hour| BASE_MS + hour * HOUR_MS),
            6 => (0..90 * DAY_MS).prop_map(|offset| BASE_MS + offset),
            2 => (0..3 * 366 * DAY_MS).prop_map(|offset| BASE_MS + offset),
            1 => -20 * 366 * DAY_MS..0,
            1 => any::<i64>(),
        ]
    }

    fn retain_until_ms() -> impl Strategy<Value = i64> {
        prop_oneof![
            4 => Just(0_i64),
            2 => (0..200 * DAY_MS).prop_map(|offset| BASE_MS + offset),
            1 => any::<i64>(),
        ]
    }

    fn snapshots() -> impl Strategy<Value = Vec<SnapshotInfo>> {
        let one = (
            0..GROUPS.len(),
            time_ms(),
            proptest::sample::subsequence(TAGS.to_vec(), 0..=TAGS.len()),
            retain_until_ms(),
        );
        proptest::collection::vec(one, 0..40).prop_map(|drawn| {
            drawn
                .into_iter()
                .enumerate()
                .map(|(index, (group, end_time_ms, tags, retain_until_ms))| {
                    let (job, host, instance) = GROUPS[group];
                    SnapshotInfo {
                        id: format!("s{index:03}"),
                        job: job.to_owned(),
                        host: host.to_owned(),
                        instance: instance.to_owned(),
                        end_time_ms,
                        tags: tags.into_iter().map(str::to_owned).collect(),
                        retain_until_ms,
                    }
                })
                .collect()
        })
    }

    fn count() -> impl Strategy<Value = u32> {
        prop_oneof![3 => Just(0_u32), 2 => 1..6_u32]
    }

    fn rules() -> impl Strategy<Value = RetentionRules> {
        let tag_keep = proptest::collection::btree_map(
            proptest::sample::select(TAGS.to_vec()).prop_map(str::to_owned),
            0..4_u32,
            0..3,
        );
        (
            tag_keep,
            count(),
            count(),
            count(),
            count(),
            count(),
            count(),
            proptest::sample::select(ZONES.to_vec()),
        )
            .prop_map(
                |(tag_keep, last, hourly, daily, weekly, monthly, yearly, zone)| RetentionRules {
                    tag_keep,
                    keep_last: last,
                    keep_hourly: hourly,
                    keep_daily: daily,
                    keep_weekly: weekly,
                    keep_monthly: monthly,
                    keep_yearly: yearly,
                    time_zone: TimeZone::get(zone).unwrap(),
                },
            )
    }

    fn now_ms() -> impl Strategy<Value = i64> {
        (0..120 * DAY_MS).prop_map(|offset| BASE_MS + offset)
    }

    fn group_of(snapshot: &SnapshotInfo) -> (String, String, String) {
        (
            snapshot.job.clone(),
            snapshot.host.clone(),
            snapshot.instance.clone(),
        )
    }

    /// Each group's ids, newest first (ties by id).
    fn newest_first(snapshots: &[SnapshotInfo]) -> BTreeMap<(String, String, String), Vec<String>> {
        let mut groups: BTreeMap<_, Vec<&SnapshotInfo>> = BTreeMap::new();
        for snapshot in snapshots {
            groups.entry(group_of(snapshot)).or_default().push(snapshot);
        }
        groups
            .into_iter()
            .map(|(group, mut members)| {
                members.sort_by(|a, b| {
                    (std::cmp::Reverse(a.end_time_ms), &a.id)
                        .cmp(&(std::cmp::Reverse(b.end_time_ms), &b.id))
                });
                let ids = members.iter().map(|member| member.id.clone()).collect();
                (group, ids)
            })
            .collect()
    }

    /// The guards' keepers: each group's newest and the WORM-protected.
    fn guarded(snapshots: &[SnapshotInfo], now_ms: i64) -> BTreeSet<String> {
        let newest = newest_first(snapshots)
            .into_values()
            .filter_map(|ids| ids.into_iter().next());
        let worm = snapshots
            .iter()
            .filter(|snapshot| snapshot.retain_until_ms > now_ms)
            .map(|snapshot| snapshot.id.clone());
        newest.chain(worm).collect()
    }

    /// A naive bucket label, through jiff's strftime rather than the
    /// module's getters.
    fn naive_label(period: Period, time_ms: i64, time_zone: &TimeZone) -> String {
        let Ok(timestamp) = Timestamp::from_millisecond(time_ms) else {
            return format!("out of range {time_ms}");
        };
        let format = match period {
            Period::Hourly => "%Y-%m-%d %H",
            Period::Daily => "%Y-%m-%d",
            Period::Weekly => "%G-W%V",
            Period::Monthly => "%Y-%m",
            Period::Yearly => "%Y",
        };
        timestamp
            .to_zoned(time_zone.clone())
            .strftime(format)
            .to_string()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn every_snapshot_gets_one_decision_in_group_order(
            snapshots in snapshots(),
            rules in rules(),
            failing in any::<bool>(),
            now in now_ms(),
        ) {
            let guards = Guards { recent_runs_failed: failing };
            let plan = plan(&snapshots, &rules, &guards, now);
            let mut decided: Vec<&str> =
                plan.decisions.iter().map(|decision| decision.snapshot.id.as_str()).collect();
            let expected_order: Vec<String> =
                newest_first(&snapshots).into_values().flatten().collect();
            prop_assert_eq!(&decided, &expected_order);
            decided.sort_unstable();
            let mut inputs: Vec<&str> = snapshots.iter().map(|snapshot| snapshot.id.as_str()).collect();
            inputs.sort_unstable();
            prop_assert_eq!(decided, inputs);
            for decision in &plan.decisions {
                let input = snapshots.iter().find(|snapshot| snapshot.id == decision.snapshot.id);
                prop_assert_eq!(Some(&decision.snapshot), input);
            }
            prop_assert_eq!(plan.kept().count() + plan.removed().count(), snapshots.len());
        }

        #[test]
        fn the_newest_of_each_group_and_worm_protected_are_kept(
            snapshots in snapshots(),
            rules in rules(),
            now in now_ms(),
        ) {
            let plan = plan(&snapshots, &rules, &Guards::default(), now);
            let kept = kept_ids(&plan);
            prop_assert!(guarded(&snapshots, now).is_subset(&kept));
            if rules.is_empty() {
                prop_assert_eq!(plan.removed().count(), 0);
            }
        }

        #[test]
        fn failing_runs_remove_nothing(
            snapshots in snapshots(),
            rules in rules(),
            now in now_ms(),
        ) {
            let guards = Guards { recent_runs_failed: true };
            let plan = plan(&snapshots, &rules, &guards, now);
            prop_assert_eq!(plan.removed().count(), 0);
            // RunsFailing marks exactly what a healthy job would remove.
            let healthy = super::plan(&snapshots, &rules, &Guards::default(), now);
            let would_go: BTreeSet<&str> =
                healthy.removed().map(|decision| decision.snapshot.id.as_str()).collect();
            let marked: BTreeSet<&str> = plan
                .decisions
                .iter()
                .filter(|decision| decision.reasons == [KeepReason::RunsFailing])
                .map(|decision| decision.snapshot.id.as_str())
                .collect();
            prop_assert_eq!(marked, would_go);
        }

        #[test]
        fn keep_last_alone_keeps_the_newest_n_of_each_group(
            snapshots in snapshots(),
            last in 1..8_u32,
            now in now_ms(),
        ) {
            let rules = RetentionRules { keep_last: last, ..RetentionRules::default() };
            let plan = plan(&snapshots, &rules, &Guards::default(), now);
            let mut expected = guarded(&snapshots, now);
            for ids in newest_first(&snapshots).into_values() {
                let take = ids.len().min(usize::try_from(last).unwrap());
                expected.extend(ids.into_iter().take(take));
            }
            prop_assert_eq!(kept_ids(&plan), expected);
        }

        #[test]
        fn calendar_rules_match_a_naive_model(
            snapshots in snapshots(),
            period in proptest::sample::select(vec![
                Period::Hourly, Period::Daily, Period::Weekly, Period::Monthly, Period::Yearly,
            ]),
            count in 1..6_u32,
            zone in proptest::sample::select(ZONES.to_vec()),
        ) {
            let time_zone = TimeZone::get(zone).unwrap();
            let mut rules = RetentionRules { time_zone: time_zone.clone(), ..RetentionRules::default() };
            match period {
                Period::Hourly => rules.keep_hourly = count,
                Period::Daily => rules.keep_daily = count,
                Period::Weekly => rules.keep_weekly = count,
                Period::Monthly => rules.keep_monthly = count,
                Period::Yearly => rules.keep_yearly = count,
            }
            let plan = plan(&snapshots, &rules, &Guards::default(), i64::MAX);
            let by_rule: BTreeSet<String> = plan
                .decisions
                .iter()
                .filter(|decision| {
                    decision.reasons.iter().any(|reason| matches!(reason, KeepReason::Calendar { .. }))
                })
                .map(|decision| decision.snapshot.id.clone())
                .collect();
            let times: BTreeMap<&str, i64> = snapshots
                .iter()
                .map(|snapshot| (snapshot.id.as_str(), snapshot.end_time_ms))
                .collect();
            let mut model = BTreeSet::new();
            for ids in newest_first(&snapshots).into_values() {
                let mut labels = HashSet::new();
                for id in ids {
                    if labels.len() == usize::try_from(count).unwrap() {
                        break;
                    }
                    if labels.insert(naive_label(period, times[id.as_str()], &time_zone)) {
                        model.insert(id);
                    }
                }
            }
            prop_assert_eq!(by_rule, model);
        }

        // Idempotence holds for every rule combination (see the module
        // documentation), so it is asserted for all of them.
        #[test]
        fn planning_again_on_the_kept_removes_nothing(
            snapshots in snapshots(),
            rules in rules(),
            now in now_ms(),
        ) {
            let first = plan(&snapshots, &rules, &Guards::default(), now);
            let survivors: Vec<SnapshotInfo> =
                first.kept().map(|decision| decision.snapshot.clone()).collect();
            let second = plan(&survivors, &rules, &Guards::default(), now);
            prop_assert_eq!(second.removed().count(), 0);
            // Every survivor keeps its rule reasons too, not just a guard.
            for (before, after) in first.kept().zip(&second.decisions) {
                prop_assert_eq!(&before.snapshot.id, &after.snapshot.id);
                prop_assert_eq!(&before.reasons, &after.reasons);
            }
        }

        #[test]
        fn a_higher_count_never_keeps_less(
            snapshots in snapshots(),
            rules in rules(),
            which in 0..7_usize,
            now in now_ms(),
        ) {
            prop_assume!(!rules.is_empty());
            let mut generous = rules.clone();
            match which {
                0 => generous.keep_last += 1,
                1 => generous.keep_hourly += 1,
                2 => generous.keep_daily += 1,
                3 => generous.keep_weekly += 1,
                4 => generous.keep_monthly += 1,
                5 => generous.keep_yearly += 1,
                _ => *generous.tag_keep.entry("daily".to_owned()).or_insert(0) += 1,
            }
            let narrow = kept_ids(&plan(&snapshots, &rules, &Guards::default(), now));
            let wide = kept_ids(&plan(&snapshots, &generous, &Guards::default(), now));
            prop_assert!(narrow.is_subset(&wide));
        }

        #[test]
        fn input_order_does_not_matter(
            (snapshots, shuffled) in snapshots()
                .prop_flat_map(|list| (Just(list.clone()), Just(list).prop_shuffle())),
            rules in rules(),
            now in now_ms(),
        ) {
            prop_assert_eq!(
                plan(&snapshots, &rules, &Guards::default(), now),
                plan(&shuffled, &rules, &Guards::default(), now)
            );
        }
    }
}
