//! `fabricctl check`: the coordinator judges each job's freshness (backy's
//! rule), this prints one Nagios status line with perfdata (or, with
//! `-o json`, an object with one entry per job) and exits with the Nagios
//! code. A coordinator that cannot be asked is UNKNOWN (exit 3).

use fabric_coordinator::check::{overall_status, render_nagios, status_word};
use fabric_proto::v1::{CheckRequest, JobCheck};
use serde::Serialize;

use crate::commands::now_ms;
use crate::output::{OutputFormat, rfc3339_ms};
use crate::remote::Remote;

/// The check as `-o json` prints it.
#[derive(Serialize)]
struct CheckReport {
    /// OK, WARNING, CRITICAL or UNKNOWN: the worst of the jobs'.
    status: String,
    /// The Nagios exit code of `status`.
    exit_code: i32,
    /// The Nagios line.
    summary: String,
    jobs: Vec<JobReport>,
}

#[derive(Serialize)]
struct JobReport {
    job: String,
    status: String,
    message: String,
    /// End of the newest good snapshot (RFC 3339), absent when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    newest_good: Option<String>,
    /// Its age in seconds, absent when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    newest_good_age_s: Option<i64>,
    /// The job's interval in seconds (0: none).
    interval_s: u64,
}

fn report(checks: &[JobCheck], now_ms: i64) -> CheckReport {
    let (summary, exit_code) = render_nagios(checks, now_ms);
    CheckReport {
        status: status_word(overall_status(checks)).to_owned(),
        exit_code,
        summary,
        jobs: checks
            .iter()
            .map(|check| JobReport {
                job: check.job.clone(),
                status: status_word(check.status()).to_owned(),
                message: check.message.clone(),
                newest_good: (check.newest_good_ms > 0).then(|| rfc3339_ms(check.newest_good_ms)),
                newest_good_age_s: (check.newest_good_ms > 0)
                    .then(|| (now_ms - check.newest_good_ms) / 1000),
                interval_s: check.interval_s,
            })
            .collect(),
    }
}

/// Run the check; returns the process exit code.
pub async fn run(remote: &Remote, jobs: Vec<String>, format: OutputFormat) -> i32 {
    let checks = async {
        let mut client = remote.coordinator().await?;
        let response = client
            .check(CheckRequest { jobs })
            .await
            .map_err(|status| anyhow::anyhow!("{}", status.message()))?;
        anyhow::Ok(response.into_inner().jobs)
    }
    .await;
    match (checks, format) {
        (Ok(checks), OutputFormat::Table) => {
            let (line, code) = render_nagios(&checks, now_ms());
            // A reader gone before the line is printed changes nothing of the result.
            let _ = crate::outln!("{line}");
            code
        }
        (Ok(checks), OutputFormat::Json) => {
            let report = report(&checks, now_ms());
            let _ = match serde_json::to_string_pretty(&report) {
                Ok(text) => crate::outln!("{text}"),
                Err(err) => crate::outln!(
                    "{{\"status\": \"UNKNOWN\", \"error\": {:?}}}",
                    err.to_string()
                ),
            };
            report.exit_code
        }
        (Err(err), OutputFormat::Table) => {
            let _ = crate::outln!("FABRIC UNKNOWN - {err:#}");
            3
        }
        (Err(err), OutputFormat::Json) => {
            let report = serde_json::json!({
                "status": "UNKNOWN",
                "exit_code": 3,
                "summary": format!("FABRIC UNKNOWN - {err:#}"),
                "jobs": [],
            });
            let _ = crate::outln!("{report:#}");
            3
        }
    }
}

#[cfg(test)]
mod tests {
    use fabric_proto::v1::CheckStatus;

    use super::*;

    #[test]
    fn the_json_report_has_a_field_per_fact() {
        let now = 1_800_000_000_000;
        let checks = [
            JobCheck {
                job: "db".into(),
                status: CheckStatus::Ok as i32,
                message: "newest 1h ago".into(),
                newest_good_ms: now - 3_600_000,
                interval_s: 86_400,
            },
            JobCheck {
                job: "web".into(),
                status: CheckStatus::Critical as i32,
                message: "no good snapshot".into(),
                newest_good_ms: 0,
                interval_s: 3600,
            },
        ];
        let value = serde_json::to_value(report(&checks, now)).unwrap();
        assert_eq!(value["status"], "CRITICAL");
        assert_eq!(value["exit_code"], 2);
        assert_eq!(value["jobs"][0]["newest_good_age_s"], 3600);
        assert_eq!(value["jobs"][0]["newest_good"], "2027-01-15T07:00:00Z");
        assert!(value["jobs"][1].get("newest_good").is_none());
        assert_eq!(value["jobs"][1]["status"], "CRITICAL");
    }
}
