//! `fabricctl check`: the coordinator judges each job's freshness (backy's
//! rule), this prints one Nagios status line with perfdata and exits with
//! the Nagios code. A coordinator that cannot be asked is UNKNOWN (exit 3).

use fabric_coordinator::check::render_nagios;
use fabric_proto::v1::CheckRequest;

use crate::commands::now_ms;
use crate::remote::Remote;

/// Run the check; returns the process exit code.
pub async fn run(remote: &Remote, jobs: Vec<String>) -> i32 {
    let checks = async {
        let mut client = remote.coordinator().await?;
        let response = client
            .check(CheckRequest { jobs })
            .await
            .map_err(|status| anyhow::anyhow!("{}", status.message()))?;
        anyhow::Ok(response.into_inner().jobs)
    }
    .await;
    match checks {
        Ok(checks) => {
            let (line, code) = render_nagios(&checks, now_ms());
            // A reader gone before the line is printed changes nothing of the result.
            let _ = crate::outln!("{line}");
            code
        }
        Err(err) => {
            let _ = crate::outln!("FABRIC UNKNOWN - {err:#}");
            3
        }
    }
}
