//! What changed between two submissions of a job, for the job's history
//! (who changed which keys, when). Pure: compares two specs, stores nothing.

use fabric_proto::v1::JobSpec;

/// The jobs-file keys whose values differ between `old` and `new`, in the
/// order the README lists them.
pub fn changed_keys(old: &JobSpec, new: &JobSpec) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut differs = |key: &'static str, changed: bool| {
        if changed {
            keys.push(key);
        }
    };
    differs("direction", old.direction != new.direction);
    differs("type", old.r#type != new.r#type);
    differs("client", old.client != new.client);
    differs("include", old.include != new.include);
    differs("exclude", old.exclude != new.exclude);
    differs("pre", old.pre != new.pre);
    differs("post", old.post != new.post);
    differs(
        "instances",
        old.instances != new.instances || old.instances_command != new.instances_command,
    );
    differs("dest", old.dest != new.dest);
    differs("replicas", old.replicas != new.replicas);
    differs("copy_retries", old.copy_retries != new.copy_retries);
    differs(
        "copy_retry_min_sleep",
        old.copy_retry_min_sleep_ms != new.copy_retry_min_sleep_ms,
    );
    differs("interval", old.interval_s != new.interval_s);
    differs("master_host", old.master_host != new.master_host);
    differs(
        "master_instance",
        old.master_instance != new.master_instance,
    );
    differs("data_age", old.data_age != new.data_age);
    differs("tags", old.tags != new.tags);
    differs(
        "one_file_system",
        old.one_file_system != new.one_file_system,
    );
    differs("pull_source", old.pull_source != new.pull_source);
    differs("pull_timeout", old.pull_timeout_s != new.pull_timeout_s);
    differs("min_retention", old.min_retention_s != new.min_retention_s);
    differs(
        "bandwidth_limit",
        old.bandwidth_limit_bytes_per_s != new.bandwidth_limit_bytes_per_s,
    );
    differs("quota", old.quota_bytes != new.quota_bytes);
    differs("schedule", old.schedule != new.schedule);
    differs("window", old.window != new.window);
    differs("time_zone", old.time_zone != new.time_zone);
    differs("keep_last", old.keep_last != new.keep_last);
    differs("keep_hourly", old.keep_hourly != new.keep_hourly);
    differs("keep_daily", old.keep_daily != new.keep_daily);
    differs("keep_weekly", old.keep_weekly != new.keep_weekly);
    differs("keep_monthly", old.keep_monthly != new.keep_monthly);
    differs("keep_yearly", old.keep_yearly != new.keep_yearly);
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_keys_that_differ_are_named() {
        let old = JobSpec {
            name: "db".into(),
            include: vec!["/srv".into()],
            ..Default::default()
        };
        assert!(changed_keys(&old, &old).is_empty());
        let new = JobSpec {
            pre: "/usr/local/bin/freeze".into(),
            include: vec!["/srv".into(), "/etc".into()],
            ..old.clone()
        };
        assert_eq!(changed_keys(&old, &new), vec!["include", "pre"]);
    }
}
