//! Schedules (backy's): when a job's runs are due and which tags each carries.
//!
//! A schedule has one or more tags, each with an interval and a keep count
//! (`daily = { interval = "24h", keep = 7 }`). Each tag's runs fall on slots
//! `offset + k * interval` of absolute time, where the offset derives from
//! the job's name: jobs of one interval spread over it instead of all
//! starting at midnight, and a job keeps its slot across coordinator
//! restarts. A run carries every tag that is due. After downtime a job
//! whose slots passed runs once, carrying each overdue tag, never once per
//! missed slot. An optional window (`"01:00-05:00"` in a named time zone)
//! holds due runs until it opens; within it each job starts at its own
//! spread point, so a window does not bunch jobs at its opening.
//!
//! This module owns those rules and nothing else: it is pure (the time is
//! always a parameter, so tests run in virtual time, across DST changes and
//! leap days), never starts a run and never reads a clock; the engine asks
//! it and acts.

use std::collections::BTreeMap;

use jiff::civil::Time;
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};

/// One tag of a schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagSchedule {
    /// How often a run carries the tag, milliseconds (at least one second).
    pub interval_ms: i64,
    /// How many snapshots carrying the tag retention keeps.
    pub keep: u32,
}

/// Hours of the day in which runs may start, in the schedule's time zone;
/// `end` before `start` spans midnight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// When it opens.
    pub start: Time,
    /// When it closes.
    pub end: Time,
}

impl Window {
    /// `"HH:MM-HH:MM"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (start, end) = text
            .split_once('-')
            .ok_or_else(|| format!("{text:?} is not a window: use \"HH:MM-HH:MM\""))?;
        let time = |part: &str| {
            part.trim()
                .parse::<Time>()
                .map_err(|_| format!("{part:?} in {text:?} is not a time of day (HH:MM)"))
        };
        let window = Self {
            start: time(start)?,
            end: time(end)?,
        };
        if window.start == window.end {
            return Err(format!("the window {text:?} is empty"));
        }
        Ok(window)
    }

    /// Whether instant `t` (ms since the Unix epoch) falls inside the
    /// window in `time_zone` (no spread: for things that are not jobs,
    /// such as the coordinator's GC window).
    pub fn contains(&self, time_zone: &TimeZone, t: i64) -> bool {
        let Ok(at) = Timestamp::from_millisecond(t) else {
            return false;
        };
        let time = at.to_zoned(time_zone.clone()).time();
        if self.start < self.end {
            self.start <= time && time < self.end
        } else {
            time >= self.start || time < self.end
        }
    }
}

/// A job's schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Tags by name.
    pub tags: BTreeMap<String, TagSchedule>,
    /// When runs may start, if not at any time.
    pub window: Option<Window>,
    /// The window's time zone.
    pub time_zone: TimeZone,
}

/// The next run of a job: when, and the tags it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextRun {
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The tags due then.
    pub tags: Vec<String>,
}

/// A job's `time_zone` (its schedule's window and its retention's
/// calendar): UTC when empty, `None` when it names no zone.
pub fn time_zone_of(spec: &fabric_proto::v1::JobSpec) -> Option<TimeZone> {
    if spec.time_zone.is_empty() {
        Some(TimeZone::UTC)
    } else {
        TimeZone::get(&spec.time_zone).ok()
    }
}

/// Where `job`'s slots of `interval_ms` fall within the interval: a stable
/// hash of the name (FNV-1a), so the spread survives restarts and versions.
pub fn offset_ms(job: &str, interval_ms: i64) -> i64 {
    let hash = spread_hash(job);
    if interval_ms <= 0 {
        return 0;
    }
    (hash % interval_ms as u64) as i64
}

fn spread_hash(job: &str) -> u64 {
    job.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The latest slot of (`interval_ms`, `offset`) at or before `t`.
fn slot_at_or_before(t: i64, interval_ms: i64, offset: i64) -> i64 {
    let interval = interval_ms.max(1);
    t - (t - offset).rem_euclid(interval)
}

impl Schedule {
    /// The schedule a stored job asks for: `None` without tags, or when its
    /// window or time zone do not parse (the jobs file check refuses both,
    /// so only a hand-edited state gets there).
    pub fn of(spec: &fabric_proto::v1::JobSpec) -> Option<Schedule> {
        if spec.schedule.is_empty() {
            return None;
        }
        let window = if spec.window.is_empty() {
            None
        } else {
            Some(Window::parse(&spec.window).ok()?)
        };
        let time_zone = time_zone_of(spec)?;
        let tags = spec
            .schedule
            .iter()
            .map(|tag| {
                let interval_ms = i64::try_from(tag.interval_s)
                    .unwrap_or(i64::MAX / 1000)
                    .saturating_mul(1000)
                    .max(1000);
                (
                    tag.tag.clone(),
                    TagSchedule {
                        interval_ms,
                        keep: tag.keep,
                    },
                )
            })
            .collect();
        Some(Schedule {
            tags,
            window,
            time_zone,
        })
    }

    /// The tags due at `now_ms`: those with a slot after their last run
    /// (`last_runs`, by tag) and at or before now. A tag that never ran
    /// counts from `since_ms` (when the job was created), so a new job runs
    /// at its first slot, not at once. Empty outside the window.
    pub fn due_tags(
        &self,
        job: &str,
        last_runs: &BTreeMap<String, i64>,
        since_ms: i64,
        now_ms: i64,
    ) -> Vec<String> {
        if !self.in_window(job, now_ms) {
            return Vec::new();
        }
        self.overdue(job, last_runs, since_ms, now_ms)
    }

    /// Tags with a slot in (last run, `now_ms`], whatever the window.
    fn overdue(
        &self,
        job: &str,
        last_runs: &BTreeMap<String, i64>,
        since_ms: i64,
        now_ms: i64,
    ) -> Vec<String> {
        self.tags
            .iter()
            .filter(|(tag, schedule)| {
                let last = last_runs.get(*tag).copied().unwrap_or(since_ms);
                let slot = slot_at_or_before(
                    now_ms,
                    schedule.interval_ms,
                    offset_ms(job, schedule.interval_ms),
                );
                slot > last
            })
            .map(|(tag, _)| tag.clone())
            .collect()
    }

    /// When the job runs next at or after `now_ms`, and with which tags:
    /// the earliest instant at which a tag is due and the window is open.
    /// `None` for a schedule without tags.
    pub fn next_run(
        &self,
        job: &str,
        last_runs: &BTreeMap<String, i64>,
        since_ms: i64,
        now_ms: i64,
    ) -> Option<NextRun> {
        // The first slot after each tag's last run; the earliest of them is
        // when something becomes due.
        let first_due = self
            .tags
            .iter()
            .map(|(tag, schedule)| {
                let last = last_runs.get(tag).copied().unwrap_or(since_ms);
                let offset = offset_ms(job, schedule.interval_ms);
                let next_slot =
                    slot_at_or_before(last, schedule.interval_ms, offset) + schedule.interval_ms;
                next_slot.max(now_ms)
            })
            .min()?;
        let at_ms = self.window_open_at_or_after(job, first_due);
        let tags = self.overdue(job, last_runs, since_ms, at_ms);
        Some(NextRun { at_ms, tags })
    }

    /// Whether a run of `job` may start at `t`.
    pub fn in_window(&self, job: &str, t: i64) -> bool {
        self.window_open_at_or_after(job, t) == t
    }

    /// The first instant at or after `t` at which `job` may start: `t`
    /// without a window; else within the window from the job's spread
    /// point on (the window's start plus a share of its length from the
    /// job's name).
    fn window_open_at_or_after(&self, job: &str, t: i64) -> i64 {
        let Some(window) = &self.window else {
            return t;
        };
        let Ok(at) = Timestamp::from_millisecond(t) else {
            return t;
        };
        let local = at.to_zoned(self.time_zone.clone());
        let mut best: Option<i64> = None;
        // Yesterday's window may still be open (one that spans midnight);
        // one of the next days' opens it otherwise.
        let mut day = local.date().yesterday().unwrap_or(local.date());
        for _ in 0..4 {
            if let Some((open, close)) = self.opening(job, window, day)
                && t < close
            {
                let start = t.max(open);
                best = Some(best.map_or(start, |best: i64| best.min(start)));
            }
            match day.tomorrow() {
                Ok(next) => day = next,
                Err(_) => break,
            }
        }
        best.unwrap_or(t)
    }

    /// The window of local date `day` for `job`: (its spread point, its
    /// close), as milliseconds.
    fn opening(&self, job: &str, window: &Window, day: jiff::civil::Date) -> Option<(i64, i64)> {
        let open = self.instant(day, window.start)?;
        let close_day = if window.end <= window.start {
            day.tomorrow().ok()?
        } else {
            day
        };
        let close = self.instant(close_day, window.end)?;
        if close <= open {
            // A window that a DST change swallowed whole that day.
            return None;
        }
        let spread = (spread_hash(job) % (close - open) as u64) as i64;
        Some((open + spread, close))
    }

    /// Local `time` on `day` as milliseconds; a time that a DST change
    /// skips is taken as the instant after the gap.
    fn instant(&self, day: jiff::civil::Date, time: Time) -> Option<i64> {
        let zoned: Zoned = day
            .to_datetime(time)
            .to_zoned(self.time_zone.clone())
            .ok()?;
        Some(zoned.timestamp().as_millisecond())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_contains_its_hours_in_its_zone_also_across_midnight() {
        let at = |text: &str| text.parse::<Timestamp>().unwrap().as_millisecond();
        let night = Window::parse("22:00-02:00").unwrap();
        let utc = TimeZone::UTC;
        assert!(night.contains(&utc, at("2026-03-01T23:30:00Z")));
        assert!(night.contains(&utc, at("2026-03-02T01:59:00Z")));
        assert!(!night.contains(&utc, at("2026-03-02T02:00:00Z")));
        assert!(!night.contains(&utc, at("2026-03-02T12:00:00Z")));
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        let early = Window::parse("01:00-05:00").unwrap();
        // 00:30 UTC is 01:30 in Berlin in winter.
        assert!(early.contains(&berlin, at("2026-01-10T00:30:00Z")));
        assert!(!early.contains(&utc, at("2026-01-10T00:30:00Z")));
    }

    const MINUTE: i64 = 60_000;
    const HOUR: i64 = 60 * MINUTE;
    const DAY: i64 = 24 * HOUR;

    fn at(text: &str) -> i64 {
        text.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn schedule(tags: &[(&str, i64, u32)], window: Option<&str>, zone: &str) -> Schedule {
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
            window: window.map(|text| Window::parse(text).unwrap()),
            time_zone: TimeZone::get(zone).unwrap(),
        }
    }

    /// Run `job` through virtual time from `start` to `end`, starting each
    /// run at the moment `next_run` names: the runs (time, tags).
    fn simulate(
        schedule: &Schedule,
        job: &str,
        start: i64,
        end: i64,
        down: Option<(i64, i64)>,
    ) -> Vec<(i64, Vec<String>)> {
        let mut last_runs = BTreeMap::new();
        let mut runs = Vec::new();
        let mut now = start;
        while now < end {
            let next = schedule.next_run(job, &last_runs, start, now).unwrap();
            let mut when = next.at_ms;
            if let Some((from, until)) = down
                && when >= from
                && when < until
            {
                // The coordinator was down: it looks again when it is back.
                now = until;
                continue;
            }
            if when >= end {
                break;
            }
            let tags = schedule.due_tags(job, &last_runs, start, when);
            assert!(!tags.is_empty(), "next_run named a time with nothing due");
            assert_eq!(tags, next.tags);
            for tag in &tags {
                last_runs.insert(tag.clone(), when);
            }
            runs.push((when, tags));
            when += 1;
            now = when;
        }
        runs
    }

    /// The local date of each run, in `zone`.
    fn local_dates(runs: &[(i64, Vec<String>)], zone: &TimeZone) -> Vec<String> {
        runs.iter()
            .map(|(time, _)| {
                Timestamp::from_millisecond(*time)
                    .unwrap()
                    .to_zoned(zone.clone())
                    .date()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn the_spread_is_stable_and_differs_between_jobs() {
        assert_eq!(offset_ms("web", DAY), offset_ms("web", DAY));
        let offsets: std::collections::BTreeSet<i64> = (0..50)
            .map(|index| offset_ms(&format!("job-{index}"), DAY) / HOUR)
            .collect();
        assert!(
            offsets.len() > 12,
            "50 jobs spread over most hours: {offsets:?}"
        );
        assert!((0..DAY).contains(&offset_ms("web", DAY)));
    }

    #[test]
    fn a_month_of_daily_and_weekly_tags_runs_once_a_day_with_weekly_every_seventh() {
        let schedule = schedule(&[("daily", DAY, 7), ("weekly", 7 * DAY, 4)], None, "UTC");
        let start = at("2026-01-01T00:00:00Z");
        let runs = simulate(&schedule, "web", start, start + 31 * DAY, None);
        assert!((30..=31).contains(&runs.len()), "{}", runs.len());
        let weekly = runs
            .iter()
            .filter(|(_, tags)| tags.contains(&"weekly".to_owned()))
            .count();
        assert!((4..=5).contains(&weekly), "{weekly}");
        // Every run is at the job's own time of day, a day apart.
        for pair in runs.windows(2) {
            assert_eq!(pair[1].0 - pair[0].0, DAY);
        }
        assert_eq!(runs[0].0.rem_euclid(DAY), offset_ms("web", DAY));
        // A weekly run carries daily too: one run, both tags.
        assert!(
            runs.iter()
                .all(|(_, tags)| tags.contains(&"daily".to_owned()))
        );
    }

    #[test]
    fn after_downtime_one_run_carries_every_overdue_tag() {
        let schedule = schedule(&[("hourly", HOUR, 24), ("daily", DAY, 7)], None, "UTC");
        let start = at("2026-03-01T00:00:00Z");
        let down = (start + 2 * DAY + 3 * HOUR, start + 4 * DAY + 5 * HOUR);
        let runs = simulate(&schedule, "db", start, start + 5 * DAY, Some(down));
        let after: Vec<&(i64, Vec<String>)> =
            runs.iter().filter(|(time, _)| *time >= down.1).collect();
        // The first run after the downtime is at once, with both tags; then
        // the hourly slots go on.
        assert_eq!(after[0].0, down.1);
        assert_eq!(after[0].1, ["daily", "hourly"]);
        assert!(after[1].0 - after[0].0 <= HOUR);
        assert!(
            runs.iter()
                .all(|(time, _)| *time < down.0 || *time >= down.1)
        );
        // Never two runs for one missed slot: the gap holds no runs at all.
        let during = runs
            .iter()
            .filter(|(time, _)| *time >= down.0 && *time < down.1)
            .count();
        assert_eq!(during, 0);
    }

    #[test]
    fn a_new_job_waits_for_its_first_slot() {
        let schedule = schedule(&[("daily", DAY, 7)], None, "UTC");
        let created = at("2026-05-05T12:00:00Z");
        assert!(
            schedule
                .due_tags("web", &BTreeMap::new(), created, created)
                .is_empty()
        );
        let next = schedule
            .next_run("web", &BTreeMap::new(), created, created)
            .unwrap();
        assert!(next.at_ms > created && next.at_ms <= created + DAY);
        assert_eq!(next.tags, ["daily"]);
    }

    #[test]
    fn a_window_holds_runs_until_it_opens_and_spreads_jobs_within_it() {
        let schedule = schedule(&[("daily", DAY, 7)], Some("01:00-05:00"), "Europe/Berlin");
        let start = at("2026-06-01T00:00:00Z");
        let mut starts = std::collections::BTreeSet::new();
        for index in 0..20 {
            let job = format!("job-{index}");
            let runs = simulate(&schedule, &job, start, start + 10 * DAY, None);
            assert!((9..=10).contains(&runs.len()), "{job}: {}", runs.len());
            for (time, _) in &runs {
                let local = Timestamp::from_millisecond(*time)
                    .unwrap()
                    .to_zoned(schedule.time_zone.clone());
                let hour = local.hour();
                assert!((1..5).contains(&hour), "{job} started at {local}");
                starts.insert(local.time().to_string());
            }
        }
        assert!(
            starts.len() > 10,
            "jobs start at their own times: {starts:?}"
        );
    }

    #[test]
    fn a_window_across_midnight_is_open_on_both_sides() {
        let schedule = schedule(&[("hourly", HOUR, 24)], Some("22:00-02:00"), "UTC");
        let start = at("2026-02-01T12:00:00Z");
        let runs = simulate(&schedule, "late", start, start + 3 * DAY, None);
        for (time, _) in &runs {
            let hour = Timestamp::from_millisecond(*time)
                .unwrap()
                .to_zoned(TimeZone::UTC)
                .hour();
            assert!(!(2..22).contains(&hour), "ran at hour {hour}");
        }
        assert!(runs.len() >= 6, "{}", runs.len());
    }

    /// Europe/Berlin skips 02:00-03:00 on 2026-03-29 and repeats
    /// 02:00-03:00 on 2026-10-25: a window of 02:00-03:00 is gone on the
    /// first day (the run waits a day) and the job runs once on the
    /// second, not twice.
    #[test]
    fn daylight_saving_changes_neither_skip_nor_double_a_daily_run() {
        let schedule = schedule(&[("daily", DAY, 7)], Some("02:00-03:30"), "Europe/Berlin");
        for (from, to) in [
            ("2026-03-26T00:00:00Z", "2026-04-02T00:00:00Z"),
            ("2026-10-22T00:00:00Z", "2026-10-29T00:00:00Z"),
        ] {
            let runs = simulate(&schedule, "web", at(from), at(to), None);
            let mut days = local_dates(&runs, &schedule.time_zone);
            let count = days.len();
            days.dedup();
            assert_eq!(days.len(), count, "one run a day at most: {days:?}");
            assert!((6..=7).contains(&count), "{from}: {days:?}");
        }
    }

    #[test]
    fn a_leap_day_is_a_day_like_any_other() {
        let schedule = schedule(
            &[("daily", DAY, 7)],
            Some("01:00-05:00"),
            "America/New_York",
        );
        let runs = simulate(
            &schedule,
            "web",
            at("2028-02-27T00:00:00Z"),
            at("2028-03-03T00:00:00Z"),
            None,
        );
        let days = local_dates(&runs, &schedule.time_zone);
        assert!(days.contains(&"2028-02-29".to_owned()), "{days:?}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Over any stretch of virtual time: runs come one after another,
        /// one per slot of the shortest interval (give or take the first and
        /// last), each inside the window when there is one.
        #[test]
        fn runs_follow_the_slots_and_stay_in_the_window(
            job in "[a-z][a-z0-9-]{0,12}",
            hours in 1i64..72,
            start_day in 0i64..3000,
            windowed in proptest::bool::ANY,
            window_start in 0i8..24,
            window_hours in 1i8..12,
        ) {
            let interval = hours * HOUR;
            let window = format!(
                "{:02}:00-{:02}:00",
                window_start,
                (window_start + window_hours) % 24
            );
            let schedule = schedule(
                &[("tag", interval, 3)],
                windowed.then_some(window.as_str()),
                "Europe/Berlin",
            );
            let start = at("2020-01-01T00:00:00Z") + start_day * DAY;
            let span = 20 * DAY;
            let runs = simulate(&schedule, &job, start, start + span, None);
            for pair in runs.windows(2) {
                proptest::prop_assert!(pair[0].0 < pair[1].0);
            }
            if windowed {
                for (time, _) in &runs {
                    proptest::prop_assert!(schedule.in_window(&job, *time));
                }
                // At most one run per slot, and at least one per day the
                // window opens when slots are at most a day apart.
                proptest::prop_assert!(runs.len() as i64 <= span / interval + 1);
                if interval <= DAY {
                    proptest::prop_assert!(runs.len() >= 18, "{} runs", runs.len());
                }
            } else {
                let slots = span / interval;
                proptest::prop_assert!(
                    (slots - 1..=slots + 1).contains(&(runs.len() as i64)),
                    "{} runs for {} slots", runs.len(), slots
                );
            }
        }
    }

    #[test]
    fn windows_parse_and_refuse_nonsense() {
        assert!(Window::parse("01:00-05:00").is_ok());
        assert!(Window::parse("22:30-02:00").is_ok());
        for bad in ["", "01:00", "1-5", "25:00-01:00", "03:00-03:00"] {
            assert!(Window::parse(bad).is_err(), "{bad:?}");
        }
    }
}
