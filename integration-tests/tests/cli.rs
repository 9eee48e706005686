//! `fabricctl` as an operator uses it: every command's happy path and its
//! main failure, against a real fabric of processes on loopback.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;

use fabric_chunkstore::restore::RestorePolicy;
use fabric_integration_tests::{
    Fabric, fabricctl, fabricctl_command, fabricctl_with_closed_stdout, generate_tree,
};

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
    let output = fabricctl_with_closed_stdout(&["completions", "fish"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!stderr(&output).contains("panicked"), "{}", stderr(&output));
}

#[test]
fn a_node_given_as_the_coordinator_says_what_it_is() {
    let fabric = Fabric::start(1);
    let output = fabricctl(&["--coordinator", &fabric.nodes[0].address, "node", "list"]);
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(
        text.contains("the server's certificate is for node/n1, but a coordinator was expected (that is a node's address: give the coordinator's, see --coordinator)"),
        "{text}"
    );
}

#[test]
fn run_retry_all_failed_retries_each_jobs_newest_failed_run() {
    let fabric = Fabric::start(1);
    let source = fabric.dir.path().join("source");
    generate_tree(&source, 5, 1024);
    let missing = fabric.dir.path().join("appears-later");
    let jobs = format!(
        "[job.fine]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1\"\ninterval = \"24h\"\n\n[job.broken]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1\"\ninterval = \"24h\"\n",
        source.display(),
        missing.display()
    );
    // replicas beyond the storage nodes there are: refused at submit.
    let file = fabric.dir.path().join("too-many.toml");
    std::fs::write(
        &file,
        format!("{jobs}\n[job.wide]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\nreplicas = 3\ninterval = \"24h\"\n", source.display()),
    )
    .unwrap();
    let refused = fabric.ctl(&["job", "submit", "-f", file.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused)
            .contains("job wide: replicas = 3 needs 3 storage nodes, the fabric has 1 (n1)"),
        "{}",
        stderr(&refused)
    );

    let runs = fabric.submit(&jobs, &[]);
    assert_eq!(runs.len(), 2);
    // The missing include fails the run at once (3 retries a minute apart
    // by default would not help), blaming the client, not the node.
    let ended: Vec<serde_json::Value> = runs.iter().map(|run| fabric.wait_run(run)).collect();
    let failed = ended.iter().find(|run| run["job"] == "broken").unwrap();
    assert_eq!(failed["state"], "failed", "{failed}");
    let reason = failed["reason"].as_str().unwrap();
    assert!(
        reason.contains("cannot read what the job includes")
            && reason.contains("appears-later")
            && !reason.contains("retrying"),
        "{reason}"
    );
    assert_eq!(failed["copies"][0]["attempts"], 1, "{failed}");
    assert!(
        ended
            .iter()
            .any(|run| run["job"] == "fine" && run["state"] == "done")
    );

    std::fs::create_dir_all(&missing).unwrap();
    std::fs::write(missing.join("file"), b"here now").unwrap();
    let retried = fabric.json(&["run", "retry", "--all-failed"]);
    let retried = retried.as_array().unwrap();
    assert_eq!(retried.len(), 1, "{retried:?}");
    assert_eq!(retried[0]["job"], "broken");
    let again = fabric.wait_run(retried[0]["id"].as_str().unwrap());
    assert_eq!(again["state"], "done", "{again}");

    // check speaks JSON too, one entry per job.
    let check = fabric.ctl(&["-o", "json", "check"]);
    let report: serde_json::Value = serde_json::from_slice(&check.stdout)
        .unwrap_or_else(|err| panic!("check -o json is not JSON ({err}): {}", stdout(&check)));
    assert_eq!(report["status"], "OK", "{report}");
    assert_eq!(check.status.code(), Some(0));
    let jobs = report["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2, "{report}");
    assert!(
        jobs.iter().all(|job| job["newest_good"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))),
        "{report}"
    );

    let nothing = fabric.ctl(&["run", "retry", "--all-failed", "--job", "broken"]);
    assert!(nothing.status.success(), "{}", stderr(&nothing));
    assert!(
        stderr(&nothing).contains("no failed run to retry of job broken"),
        "{}",
        stderr(&nothing)
    );
}

#[test]
fn a_backup_pushed_straight_to_a_node_reaches_the_catalogue() {
    let fabric = Fabric::start(1);
    let source = fabric.dir.path().join("source");
    generate_tree(&source, 5, 1024);
    // Straight to the node: no --coordinator (a backup talks to none).
    let pushed = fabricctl(&[
        "-o",
        "json",
        "backup",
        "--node",
        &fabric.nodes[0].address,
        "--job",
        "by-hand",
        source.to_str().unwrap(),
    ]);
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    let pushed: serde_json::Value = serde_json::from_slice(&pushed.stdout).unwrap();
    let id = pushed["snapshot"].as_str().unwrap().to_owned();
    let mut listed = None;
    for _ in 0..300 {
        let status = fabric.json(&["status", "--job", "by-hand"]);
        if let Some(row) = status
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["id"] == id)
        {
            listed = Some(row.clone());
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let row = listed.unwrap_or_else(|| panic!("snapshot {id} never reached the catalogue"));
    assert_eq!(row["nodes"][0], "n1", "{row}");
}

#[test]
fn a_backup_in_the_smallest_memory_budget_restores_byte_for_byte_and_a_smaller_one_is_refused() {
    let fabric = Fabric::start(1);
    let source = fabric.dir.path().join("source");
    // Large files of many chunks: a budget this small sends them in many
    // small batches, each chunk's share coming back only as it is stored.
    generate_tree(&source, 50, 24 << 20);
    let smallest = fabric_node::memory_budget::SendPlan::minimum(
        fabric_chunkstore::ChunkParams::default().max_size as usize,
    );
    let too_small = fabricctl(&[
        "backup",
        "--node",
        &fabric.nodes[0].address,
        "--memory",
        &(smallest - 1).to_string(),
        source.to_str().unwrap(),
    ]);
    assert!(!too_small.status.success());
    let said = stderr(&too_small);
    assert!(
        said.contains("--memory") && said.contains(&format!("at least {smallest} bytes")),
        "{said}"
    );

    let pushed = fabricctl(&[
        "-o",
        "json",
        "backup",
        "--node",
        &fabric.nodes[0].address,
        "--job",
        "small-budget",
        "--memory",
        &smallest.to_string(),
        source.to_str().unwrap(),
    ]);
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    let pushed: serde_json::Value = serde_json::from_slice(&pushed.stdout).unwrap();
    let id = pushed["snapshot"].as_str().unwrap().to_owned();
    let target = fabric.dir.path().join("restored");
    let inside = source.to_str().unwrap().trim_start_matches('/').to_owned();
    let mut restored = None;
    // The node reports the snapshot to the catalogue on its own time.
    for _ in 0..300 {
        let attempt = fabric.ctl(&["restore", &id, &inside, "--to", target.to_str().unwrap()]);
        if attempt.status.success() {
            restored = Some(attempt);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(restored.is_some(), "snapshot {id} could not be restored");
    fabricctl::compare::compare_trees(
        &source,
        &target,
        true,
        fabric_chunkstore::restore::RestorePolicy::default(),
    )
    .unwrap();
}

#[test]
fn run_watch_shows_the_bytes_as_they_move() {
    let fabric = Fabric::start(1);
    let source = fabric.dir.path().join("source");
    generate_tree(&source, 8, 4 * 1024 * 1024);
    // Slow enough that the copy reports progress many times before it ends.
    let jobs = format!(
        "[job.slow]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1\"\ninterval = \"24h\"\nbandwidth_limit = \"1MiB/s\"\n",
        source.display()
    );
    let runs = fabric.submit(&jobs, &["slow"]);
    let watch = fabric.ctl(&["run", "watch", &runs[0]]);
    assert!(watch.status.success(), "{}", stderr(&watch));
    let text = stdout(&watch);
    let moving: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("  n1  running  ") && !line.contains(" 0 B read"))
        .collect();
    assert!(
        !moving.is_empty(),
        "no line showed bytes moving to n1:\n{text}"
    );
    let done = text
        .lines()
        .find(|line| line.contains("  n1  done  "))
        .unwrap_or_else(|| panic!("no done line for n1:\n{text}"));
    assert!(
        !done.contains(" 0 B read") && !done.contains(" 0 files"),
        "the done line keeps the copy's last figures: {done}"
    );
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
    // Events are objects, times RFC 3339 with their offset.
    let events = run["events"].as_array().unwrap();
    assert!(
        events.iter().all(|event| event["seq"].as_u64().is_some()
            && event["state"].is_string()
            && event["time"]
                .as_str()
                .is_some_and(|time| time.contains('T') && time.ends_with('Z'))),
        "{run}"
    );
    assert!(run["created"].as_str().unwrap().ends_with('Z'), "{run}");
    let shown = fabric.json(&["job", "show", "site"]);
    assert_eq!(shown["include"][0], source.to_str().unwrap(), "{shown}");
    assert_eq!(shown["interval"], "1d", "{shown}");
    assert!(shown["exclude"].is_array() && shown["pre"].is_string() && shown["post"].is_string());
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
    let root = rows[0]["root_tree_id"].as_str().unwrap();
    assert!(
        root.len() == 64 && root.chars().all(|c| c.is_ascii_hexdigit()),
        "{root}"
    );
    assert_eq!(rows[0]["type"], "full");
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
