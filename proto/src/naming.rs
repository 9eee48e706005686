//! B1000's consistent snapshot names, and the civil (UTC) calendar they need.
//!
//! - full: `job/Y-M-D-DoW/host-instance-master_host-master_instance-Y-M-D-DoW-HH:MM:SS`
//! - sync: `job/host-instance-master_host-master_instance`
//!
//! Absent parts (empty strings) are dropped together with their dash. Dates
//! are UTC, days of week are English three-letter abbreviations (`Mon`), as
//! Python's `%a` printed them for B1000. A `/` inside a part would add a
//! level to the name's path, so it is written as `_`.
//!
//! A snapshot without a job is named under `snapshot/`.
//!
//! This module only formats; it never reads a clock (callers pass times).
//! It lives beside the records it names because both the chunk store (naming
//! a record committed without a name) and the coordinator (naming a run's
//! snapshot up front, so every copy carries the same name) use it, and the
//! coordinator must not depend on the storage engine.

use crate::v1::{Snapshot, SnapshotType};

const DAY_NAMES: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];

/// A UTC calendar date and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CivilTime {
    /// Year, e.g. 2026.
    pub year: i64,
    /// Month, 1 to 12.
    pub month: u32,
    /// Day of month, 1 to 31.
    pub day: u32,
    /// Day of week, 0 = Sunday.
    pub weekday: u32,
    /// Hour, 0 to 23.
    pub hour: u32,
    /// Minute, 0 to 59.
    pub minute: u32,
    /// Second, 0 to 59.
    pub second: u32,
}

impl CivilTime {
    /// The UTC date and time of `ms` milliseconds since the Unix epoch
    /// (earlier times are negative).
    pub fn from_unix_ms(ms: i64) -> CivilTime {
        let seconds = ms.div_euclid(1000);
        let days = seconds.div_euclid(86_400);
        let of_day = seconds.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        CivilTime {
            year,
            month,
            day,
            // 1970-01-01 was a Thursday.
            weekday: (days + 4).rem_euclid(7) as u32,
            hour: (of_day / 3600) as u32,
            minute: (of_day / 60 % 60) as u32,
            second: (of_day % 60) as u32,
        }
    }

    /// `Y-M-D-DoW`, e.g. `2026-11-23-Mon`.
    pub fn date_with_weekday(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}-{}",
            self.year, self.month, self.day, DAY_NAMES[self.weekday as usize]
        )
    }

    /// `HH:MM:SS`.
    pub fn time_of_day(&self) -> String {
        format!("{:02}:{:02}:{:02}", self.hour, self.minute, self.second)
    }

    /// ISO 8601 in UTC, to the second: `2026-11-23T04:05:06Z`.
    pub fn iso8601(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }

    /// B1000's `$start_time`: `%Y-%m-%d-%H-%M-%S`.
    pub fn start_time_stamp(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}-{:02}-{:02}-{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

/// Year, month, day of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, exact for the proleptic Gregorian calendar).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The snapshot's name per B1000's scheme (see the module docs).
pub fn snapshot_name(snapshot: &Snapshot) -> String {
    let identity = [
        snapshot.host.as_str(),
        snapshot.instance.as_str(),
        snapshot.master_host.as_str(),
        snapshot.master_instance.as_str(),
    ];
    let mut parts: Vec<String> = identity
        .iter()
        .filter(|part| !part.is_empty())
        .map(|part| part.replace('/', "_"))
        .collect();
    let job = if snapshot.job.is_empty() {
        "snapshot".to_owned()
    } else {
        snapshot.job.replace('/', "_")
    };
    match snapshot.r#type() {
        SnapshotType::Sync => format!("{job}/{}", parts.join("-")),
        SnapshotType::Full | SnapshotType::Unspecified => {
            let start = CivilTime::from_unix_ms(snapshot.start_time_ms);
            let date = start.date_with_weekday();
            parts.push(format!("{date}-{}", start.time_of_day()));
            format!("{job}/{date}/{}", parts.join("-"))
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn snapshot(
        kind: SnapshotType,
        instance: &str,
        master_host: &str,
        master_instance: &str,
    ) -> Snapshot {
        Snapshot {
            job: "mysqldb".into(),
            host: "slave3".into(),
            instance: instance.into(),
            master_host: master_host.into(),
            master_instance: master_instance.into(),
            r#type: kind as i32,
            // 2026-11-23 03:37:02.5 UTC, a Monday.
            start_time_ms: 1_795_405_022_500,
            ..Snapshot::default()
        }
    }

    #[test]
    fn full_names_carry_date_weekday_and_time() {
        assert_eq!(
            snapshot_name(&snapshot(SnapshotType::Full, "3307", "db1", "payments")),
            "mysqldb/2026-11-23-Mon/slave3-3307-db1-payments-2026-11-23-Mon-03:37:02"
        );
        assert_eq!(
            snapshot_name(&snapshot(SnapshotType::Full, "", "", "")),
            "mysqldb/2026-11-23-Mon/slave3-2026-11-23-Mon-03:37:02"
        );
        assert_eq!(
            snapshot_name(&snapshot(SnapshotType::Full, "", "db1", "")),
            "mysqldb/2026-11-23-Mon/slave3-db1-2026-11-23-Mon-03:37:02"
        );
    }

    #[test]
    fn sync_names_have_no_time() {
        assert_eq!(
            snapshot_name(&snapshot(SnapshotType::Sync, "3307", "db1", "payments")),
            "mysqldb/slave3-3307-db1-payments"
        );
        assert_eq!(
            snapshot_name(&snapshot(SnapshotType::Sync, "", "", "payments")),
            "mysqldb/slave3-payments"
        );
        let mut odd = snapshot(SnapshotType::Sync, "a/b", "", "");
        odd.job = "x/y".into();
        assert_eq!(snapshot_name(&odd), "x_y/slave3-a_b");
    }

    #[test]
    fn civil_times_of_known_instants() {
        let epoch = CivilTime::from_unix_ms(0);
        assert_eq!(epoch.date_with_weekday(), "1970-01-01-Thu");
        assert_eq!(epoch.iso8601(), "1970-01-01T00:00:00Z");
        assert_eq!(
            CivilTime::from_unix_ms(1_795_405_022_500).iso8601(),
            "2026-11-23T03:37:02Z"
        );
        assert_eq!(epoch.time_of_day(), "00:00:00");
        // 2000-02-29 is a leap day (divisible by 400), a Tuesday.
        let leap = CivilTime::from_unix_ms(951_782_400_000 + 23 * 3_600_000 + 59 * 60_000 + 59_999);
        assert_eq!(leap.date_with_weekday(), "2000-02-29-Tue");
        assert_eq!(leap.time_of_day(), "23:59:59");
        assert_eq!(leap.start_time_stamp(), "2000-02-29-23-59-59");
        // One millisecond before the epoch.
        let before = CivilTime::from_unix_ms(-1);
        assert_eq!(before.date_with_weekday(), "1969-12-31-Wed");
        assert_eq!(before.time_of_day(), "23:59:59");
        // 2100 is not a leap year: 2100-02-28 is followed by 2100-03-01.
        let end_of_february = CivilTime::from_unix_ms(4_107_456_000_000);
        assert_eq!(end_of_february.date_with_weekday(), "2100-02-28-Sun");
        assert_eq!(
            CivilTime::from_unix_ms(4_107_456_000_000 + 86_400_000).date_with_weekday(),
            "2100-03-01-Mon"
        );
    }

    /// Days since the epoch of a civil date, by counting (slow, obviously
    /// right): the oracle for the closed formula.
    fn days_by_counting(year: i64, month: u32, day: u32) -> i64 {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let month_days = |y: i64, m: u32| match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let mut days = 0;
        for y in 1970..year {
            days += if leap(y) { 366 } else { 365 };
        }
        for m in 1..month {
            days += month_days(year, m);
        }
        days + i64::from(day) - 1
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn calendar_agrees_with_counting(ms in 0i64..4_102_444_800_000) {
            let civil = CivilTime::from_unix_ms(ms);
            prop_assert_eq!(
                days_by_counting(civil.year, civil.month, civil.day),
                ms.div_euclid(86_400_000)
            );
            prop_assert_eq!(
                i64::from(civil.hour * 3600 + civil.minute * 60 + civil.second),
                ms.div_euclid(1000).rem_euclid(86_400)
            );
        }
    }
}
