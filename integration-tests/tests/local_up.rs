//! `fabricctl local up` as an operator runs it: started, given a job,
//! stopped with Ctrl-C in the middle of a copy, and started again on the
//! same folder. The run the stop interrupted is failed with the reason,
//! a retry finishes it, its snapshot is in the coordinator's catalogue and
//! restores byte for byte, and a normal stop logs no node as lost.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fabric_integration_tests::{binary, pseudo_random, signal};

/// A running `fabricctl local up`, and the environment its banner tells
/// the operator to export.
struct LocalUp {
    child: Child,
    environment: Vec<(String, String)>,
}

impl LocalUp {
    /// Start it on `dir`, its log going to `log`; returns once its banner
    /// (printed when every server is online) is complete.
    fn start(dir: &Path, log: &Path) -> LocalUp {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = Command::new(binary("fabricctl"))
            .args([
                "local",
                "up",
                "--nodes",
                "2",
                "--dir",
                dir.to_str().unwrap(),
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut environment = Vec::new();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(exports) = line.strip_prefix("export ") {
                for pair in exports.split_whitespace() {
                    let (name, value) = pair.split_once('=').unwrap();
                    environment.push((name.to_owned(), value.to_owned()));
                }
            }
            if line.starts_with("Ctrl-C stops") {
                break;
            }
        }
        assert_eq!(environment.len(), 4, "{environment:?}");
        // Whatever else it prints goes nowhere, so it never blocks on a
        // full pipe.
        std::thread::spawn(move || for _ in lines {});
        LocalUp { child, environment }
    }

    /// `fabricctl ARGS -o json` against it, as the banner says to.
    fn json(&self, args: &[&str]) -> serde_json::Value {
        let output = Command::new(binary("fabricctl"))
            .args(args)
            .args(["-o", "json"])
            .env_remove("FABRIC_TOKEN")
            .env_remove("FABRIC_INSECURE_PLAINTEXT")
            .envs(self.environment.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(output.status.success(), "fabricctl {args:?}: {output:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// Ctrl-C, and wait (bounded) for it to end.
    fn interrupt(mut self) -> std::process::ExitStatus {
        signal(self.child.id(), rustix::process::Signal::INT);
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("local up did not end after Ctrl-C");
    }
}

impl Drop for LocalUp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_run_interrupted_by_ctrl_c_of_local_up_ends_once_it_is_started_again() {
    let scratch = tempfile::tempdir().unwrap();
    let (dir, log, source) = (
        scratch.path().join("fabric-local"),
        scratch.path().join("local-up.log"),
        scratch.path().join("source"),
    );
    std::fs::create_dir_all(&source).unwrap();
    let content = pseudo_random(16 << 20, 24);
    std::fs::write(source.join("big"), &content).unwrap();
    let jobs = scratch.path().join("jobs.toml");
    // Slow enough for the stop to fall in the middle of the copy.
    std::fs::write(
        &jobs,
        format!(
            "[job.slow]\ndirection = \"push\"\nclient = \"agent\"\ninclude = [\"{}\"]\ndest = \"n1\"\n\
             bandwidth_limit = \"1MiB/s\"\n",
            source.display()
        ),
    )
    .unwrap();

    let fabric = LocalUp::start(&dir, &log);
    let submitted = fabric.json(&["job", "submit", "-f", jobs.to_str().unwrap()]);
    let run = submitted[0]["id"].as_str().unwrap().to_owned();
    let mut moving = false;
    for _ in 0..600 {
        let shown = fabric.json(&["run", "show", &run]);
        if shown["copies"][0]["bytes_sent"].as_u64().unwrap_or(0) > 0 {
            moving = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(moving, "the copy never started sending");
    let stopped = fabric.interrupt();
    assert!(stopped.success(), "{stopped:?}");

    // Started again on the same folder: the run is failed, saying why, and
    // one retry of every failed run (B1000's -c) finishes it.
    let fabric = LocalUp::start(&dir, &log);
    let failed = fabric.json(&["run", "show", &run]);
    assert_eq!(failed["state"], "failed", "{failed:#}");
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .ends_with("was stopped during copying"),
        "{failed:#}"
    );
    let retried = fabric.json(&["run", "retry", "--all-failed"]);
    assert_eq!(retried[0]["id"].as_str(), Some(run.as_str()), "{retried:#}");
    let mut ended = serde_json::Value::Null;
    for _ in 0..1200 {
        ended = fabric.json(&["run", "show", &run]);
        if matches!(
            ended["state"].as_str(),
            Some("done" | "failed" | "cancelled")
        ) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ended["state"], "done", "{ended:#}");
    let listed = fabric.json(&["status", "--job", "slow"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed:#}");
    assert_eq!(listed[0]["nodes"], serde_json::json!(["n1"]), "{listed:#}");

    let snapshot = ended["copies"][0]["snapshot_id"].as_str().unwrap();
    let target = scratch.path().join("restored");
    let restore = Command::new(binary("fabricctl"))
        .args(["restore", snapshot, "--to", target.to_str().unwrap()])
        .envs(fabric.environment.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(restore.status.success(), "{restore:?}");
    let restored = target.join(source.strip_prefix("/").unwrap()).join("big");
    assert!(
        std::fs::read(&restored).unwrap() == content,
        "restored bytes differ"
    );
    let stopped = fabric.interrupt();
    assert!(stopped.success(), "{stopped:?}");

    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        !logged.contains("lost"),
        "a normal stop logs no node as lost:\n{logged}"
    );
}
