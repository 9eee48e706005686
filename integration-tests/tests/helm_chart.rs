//! The Helm chart's offline check, run as part of the test suite.
//!
//! `helm/check-chart.sh` lints and renders the chart with Helm's own library,
//! validates every manifest against Kubernetes' schemas and asserts the
//! chart's invariants (gRPC probes on the plaintext health ports the
//! binaries listen on, TLS files on every server, one certificate identity
//! per pod, the replicas asked for, bad values refused). This test only runs it: it must
//! never skip it, so a machine without python3 fails here with a message
//! saying so.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn helm_chart_lints_renders_validates_and_refuses_bad_values() {
    let repo_root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests sits inside the repository")
        .to_path_buf();
    let script = repo_root.join("helm").join("check-chart.sh");

    let python = Command::new("python3").arg("--version").output();
    assert!(
        python.as_ref().is_ok_and(|output| output.status.success()),
        "the Helm chart check needs python3 (3.11 or newer, with the venv module) on PATH; \
         it was not found or did not run: {python:?}"
    );

    let output = Command::new("bash")
        .arg(&script)
        .current_dir(&repo_root)
        .output()
        .unwrap_or_else(|error| panic!("could not run {}: {error}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} failed with {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        script.display(),
        output.status
    );
    assert!(
        stdout.contains(" passed, 0 failed"),
        "{} succeeded without its summary line:\n{stdout}",
        script.display()
    );
}
