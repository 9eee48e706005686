//! `fabricctl` as an operator uses it: every command's happy path and its
//! main failure, against a real fabric of processes on loopback.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;

use fabric_chunkstore::restore::RestorePolicy;
use fabric_integration_tests::{Fabric, fabricctl, fabricctl_command, generate_tree};

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn an_unreachable_coordinator_is_explained() {
    let output = fabricctl(&["--coordinator", "http://127.0.0.1:1", "node", "list"]);
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(
        text.contains("cannot reach the coordinator at http://127.0.0.1:1: connection refused (is it running? see --coordinator)"),
        "{text}"
    );
    let check = fabricctl(&["--coordinator", "http://127.0.0.1:1", "check"]);
    assert_eq!(
        check.status.code(),
        Some(3),
        "an unreachable coordinator is UNKNOWN"
    );
    assert!(
        stdout(&check).starts_with("FABRIC UNKNOWN"),
        "{}",
        stdout(&check)
    );
}

#[test]
fn help_and_completions_work() {
    let help = fabricctl(&["--help"]);
    assert!(help.status.success());
    assert!(stdout(&help).contains("Examples:"));
    let completions = fabricctl(&["completions", "bash"]);
    assert!(completions.status.success());
    assert!(stdout(&completions).contains("fabricctl"));
    // A reader that goes away early (`| head -2`) ends it quietly.
    let mut child = fabricctl_command(&["completions", "fish"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before anything is written: every write fails with EPIPE.
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!stderr(&output).contains("panicked"), "{}", stderr(&output));
}

#[test]
fn every_command_against_a_real_fabric() {
    let fabric = Fabric::start(2);
    let source = fabric.dir.path().join("source");
    generate_tree(&source, 30, 128 * 1024);
    let jobs = format!(
        "[job.site]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1 n2\"\ninterval = \"24h\"\ntags = [\"daily\"]\n\n[job.stale]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1\"\ninterval = \"1s\"\n",
        source.display(),
        source.display()
    );

    // job submit / list / show
    let runs = fabric.submit(&jobs, &["site"]);
    assert_eq!(runs.len(), 1);
    let listed = fabric.json(&["job", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    let shown = fabric.ctl(&["job", "show", "site"]);
    assert!(shown.status.success());
    assert!(stdout(&shown).contains("n1 n2"), "{}", stdout(&shown));
    let unknown = fabric.ctl(&["job", "show", "nosuch"]);
    assert!(!unknown.status.success());
    assert!(stderr(&unknown).contains("nosuch"), "{}", stderr(&unknown));

    // run watch (plain lines off a terminal), show, list
    let watch = fabric.ctl(&["run", "watch", &runs[0]]);
    assert!(watch.status.success(), "{}", stderr(&watch));
    assert!(stdout(&watch).contains("done"), "{}", stdout(&watch));
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "done");
    let listed = fabric.json(&["run", "list", "--job", "site", "--state", "done"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let bad_state = fabric.ctl(&["run", "list", "--state", "sleeping"]);
    assert!(stderr(&bad_state).contains("sleeping"));

    // node list
    let nodes = fabric.json(&["node", "list"]);
    let ids: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"n1") && ids.contains(&"n2") && ids.contains(&"client"),
        "{ids:?}"
    );
    let n1 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "n1")
        .unwrap();
    assert!(n1["free_bytes"].as_u64().unwrap() > 0);

    // status / snapshot list / find
    let status = fabric.json(&["status"]);
    let rows = status.as_array().unwrap();
    assert_eq!(rows.len(), 1);
    let id = rows[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(rows[0]["tags"][0], "daily");
    let table = fabric.ctl(&["snapshot", "list"]);
    assert!(
        stdout(&table).contains("DATE") && stdout(&table).contains(&id[..12]),
        "{}",
        stdout(&table)
    );
    for spec in ["0", "last", "latest", "daily", &id[..8]] {
        let found = fabric.json(&["find", "-r", spec]);
        assert_eq!(found.as_array().unwrap().len(), 1, "find -r {spec}");
    }
    let none = fabric.ctl(&["find", "-r", "1"]);
    assert!(!none.status.success());
    assert!(
        stderr(&none).contains("no snapshot matches"),
        "{}",
        stderr(&none)
    );
    let bad = fabric.ctl(&["find", "-r", " "]);
    assert!(
        stderr(&bad).contains("empty revision spec"),
        "{}",
        stderr(&bad)
    );

    // restore to a directory, setuid bits kept on request (the tree has a
    // setuid file, nested/odd-mode), and to a tar stream
    let inside = source.to_str().unwrap().trim_start_matches('/').to_owned();
    let target = fabric.dir.path().join("restored");
    let restored = fabric.ctl(&[
        "restore",
        &id[..8],
        &inside,
        "--to",
        target.to_str().unwrap(),
        "--keep-setid",
    ]);
    assert!(restored.status.success(), "{}", stderr(&restored));
    let keep_setid = RestorePolicy {
        setid_bits: true,
        ..RestorePolicy::default()
    };
    fabricctl::compare::compare_trees(&source, &target, true, keep_setid).unwrap();
    assert_eq!(mode_of(&target.join("nested/odd-mode")), 0o4751);
    let with_tar = fabric.ctl(&["restore", "latest", "--to", "-", "--keep-setid"]);
    assert!(!with_tar.status.success());
    assert!(
        stderr(&with_tar).contains("a tar stream (--to -) always carries the recorded owners"),
        "{}",
        stderr(&with_tar)
    );
    let tarred = fabric.ctl(&[
        "restore",
        "latest",
        &format!("{inside}/nested"),
        "--to",
        "-",
        "--node",
        "n2",
    ]);
    assert!(tarred.status.success(), "{}", stderr(&tarred));
    let mut archive = tar::Archive::new(tarred.stdout.as_slice());
    let names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.ends_with("secret")), "{names:?}");
    // The stream carries the recorded mode, setuid bit included.
    let mut archive = tar::Archive::new(tarred.stdout.as_slice());
    let odd = archive
        .entries()
        .unwrap()
        .map(Result::unwrap)
        .find(|e| e.path().unwrap().ends_with("odd-mode"))
        .expect("odd-mode in the stream");
    assert_eq!(odd.header().mode().unwrap(), 0o4751);
    let missing = fabric.ctl(&[
        "restore",
        "nosuchsnapshot",
        "--to",
        target.to_str().unwrap(),
    ]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("no snapshot matches \"nosuchsnapshot\""),
        "{}",
        stderr(&missing)
    );

    // verify a snapshot, a sample of a node's store; a bad sample
    let verified = fabric.json(&["verify", &id]);
    assert!(verified[0]["chunks_checked"].as_u64().unwrap() > 0);
    assert!(verified[0]["problems"].as_array().unwrap().is_empty());
    let sampled = fabric.ctl(&["verify", "--node", "n2", "--sample", "50%"]);
    assert!(sampled.status.success(), "{}", stderr(&sampled));
    let bad_sample = fabric.ctl(&["verify", "--node", "n2", "--sample", "150%"]);
    assert!(stderr(&bad_sample).contains("150%"));

    // check: the fresh job is OK; once the 1s-interval job's snapshot is older
    // than 1.5s, it is CRITICAL.
    let fresh = fabric.ctl(&["check", "site"]);
    assert_eq!(fresh.status.code(), Some(0), "{}", stdout(&fresh));
    assert!(stdout(&fresh).contains("OK"), "{}", stdout(&fresh));
    let stale_runs = fabric.submit(&jobs, &["stale"]);
    fabric.wait_run(&stale_runs[0]);
    let mut code = None;
    for _ in 0..100 {
        let stale = fabric.ctl(&["check", "stale"]);
        code = stale.status.code();
        if code == Some(2) {
            assert!(stdout(&stale).contains("CRITICAL"), "{}", stdout(&stale));
            assert!(stdout(&stale).contains('|'), "perfdata: {}", stdout(&stale));
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(code, Some(2), "the stale job became CRITICAL");

    // cancel a run sitting in its pre script; retry its copies
    let slow = format!(
        "[job.slow]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\npre = \"sleep 30\"\ndest = \"n1\"\n",
        source.display()
    );
    let slow_runs = fabric.submit(&slow, &[]);
    for _ in 0..200 {
        if fabric.json(&["run", "show", &slow_runs[0]])["state"] == "pre" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let cancelled = fabric.ctl(&["run", "cancel", &slow_runs[0]]);
    assert!(cancelled.status.success(), "{}", stderr(&cancelled));
    assert_eq!(fabric.wait_run(&slow_runs[0])["state"], "cancelled");
    let retried = fabric.ctl(&["run", "retry", &slow_runs[0], "--copy"]);
    assert!(retried.status.success(), "{}", stderr(&retried));
    let unknown_run = fabric.ctl(&["run", "show", "ffffffffffff"]);
    assert!(!unknown_run.status.success());

    // a bad job file names file, line and key
    let bad_file = fabric.dir.path().join("bad-jobs.toml");
    std::fs::write(&bad_file, "[job.x]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"/x\"]\ndest = \"n1\"\nretries = 3\n").unwrap();
    let rejected = fabric.ctl(&["job", "submit", "-f", bad_file.to_str().unwrap()]);
    assert!(!rejected.status.success());
    let text = stderr(&rejected);
    assert!(
        text.contains("bad-jobs.toml:6") && text.contains("retries"),
        "{text}"
    );

    // A jobs file from stdin is named "<stdin>" in messages.
    let mut child = fabricctl_command(&[
        "--coordinator",
        &fabric.coordinator.address,
        "job",
        "submit",
        "-f",
        "-",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"[job.x]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"/x\"]\ndest = \"n1\"\nretries = 3\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    assert!(stderr(&output).contains("<stdin>:6"), "{}", stderr(&output));
}

#[test]
fn local_demo_explains_new_and_keeps_its_folder_on_request() {
    let source = tempfile::tempdir().unwrap();
    std::fs::write(source.path().join("keep.txt"), b"the same in both").unwrap();
    let output = fabricctl_command(&["local", "demo", source.path().to_str().unwrap(), "--keep"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("NEW: bytes of the chunks"), "{text}");
    let kept = text
        .lines()
        .find_map(|line| line.strip_prefix("kept: "))
        .and_then(|rest| rest.split(" (").next())
        .unwrap_or_else(|| panic!("no kept path in {text}"));
    let kept = Path::new(kept);
    assert_eq!(
        std::fs::read(kept.join("restored/keep.txt")).unwrap(),
        b"the same in both"
    );
    std::fs::remove_dir_all(kept).unwrap();
}
