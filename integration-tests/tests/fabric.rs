//! The fabric end to end with real processes on loopback: one coordinator,
//! three storage nodes and one client agent, driven through `fabricctl`.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;

use fabric_integration_tests::{
    Fabric, generate_tree, port_of, pseudo_random, remote_ports, snapshots_on, storage_client,
};
use fabric_proto::v1::{
    DeleteSnapshotRequest, HealthReasonKind, ListSnapshotsRequest, StatsRequest,
};
use tonic_health::pb::health_check_response::ServingStatus;

fn copies_of(run: &serde_json::Value) -> Vec<(String, String, bool)> {
    run["copies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|copy| {
            (
                copy["node"].as_str().unwrap().to_owned(),
                copy["state"].as_str().unwrap().to_owned(),
                copy["background"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// A run's events as `run show` prints them: `STATE  DEST DEST_STATE
/// [NODE]  MESSAGE`.
fn events_of(run: &serde_json::Value) -> Vec<String> {
    let text = |event: &serde_json::Value, key: &str| event[key].as_str().unwrap_or("").to_owned();
    run["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| {
            let mut line = text(event, "state");
            if !text(event, "dest").is_empty() {
                line.push_str(&format!(
                    "  {} {}",
                    text(event, "dest"),
                    text(event, "dest_state")
                ));
            }
            if !text(event, "node").is_empty() {
                line.push_str(&format!("  [{}]", text(event, "node")));
            }
            if !text(event, "message").is_empty() {
                line.push_str(&format!("  {}", text(event, "message")));
            }
            line
        })
        .collect()
}

fn first_event(events: &[String], needle: &str) -> Option<usize> {
    events.iter().position(|e| e.contains(needle))
}

fn snapshot_nodes(fabric: &Fabric, job: &str) -> Vec<Vec<String>> {
    fabric
        .json(&["status", "--job", job])
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let mut nodes: Vec<String> = row["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap().to_owned())
                .collect();
            nodes.sort();
            nodes
        })
        .collect()
}

/// The snapshots node `address` holds, as its own listing says.
fn source_tree(fabric: &Fabric) -> std::path::PathBuf {
    let source = fabric.dir.path().join("source");
    generate_tree(&source, 40, 256 * 1024);
    source
}

#[test]
fn a_push_job_copies_in_background_then_in_random_order_to_all_three() {
    let fabric = Fabric::start(3);
    let source = source_tree(&fabric);
    let jobs = format!(
        "[job.web]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1& n2/n3\"\ninterval = \"24h\"\n",
        source.display()
    );
    let mut orders = HashSet::new();
    for attempt in 0..20 {
        let runs = fabric.submit(&jobs, &[]);
        assert_eq!(runs.len(), 1);
        let run = fabric.wait_run(&runs[0]);
        assert_eq!(run["state"], "done", "{run:#}");
        let copies = copies_of(&run);
        let n1 = copies.iter().find(|c| c.0 == "n1").unwrap();
        assert!(n1.2, "n1 is copied in the background: {copies:?}");
        assert!(copies.iter().all(|c| c.1 == "done"), "{copies:?}");
        let events = events_of(&run);
        let n2 = first_event(&events, " n2 running").unwrap();
        let n3 = first_event(&events, " n3 running").unwrap();
        orders.insert(n2 < n3);
        if attempt == 0 {
            assert_eq!(snapshot_nodes(&fabric, "web"), vec![vec!["n1", "n2", "n3"]]);
        }
        if orders.len() == 2 {
            break;
        }
    }
    assert_eq!(orders.len(), 2, "both orders of n2/n3 occur over 20 runs");
}

/// Also: the job's `min_retention` makes both copies undeletable (a WORM
/// window), even by an operator, on every node that holds one.
#[test]
fn replicas_put_the_snapshot_on_exactly_two_distinct_nodes() {
    let fabric = Fabric::start(3);
    let source = source_tree(&fabric);
    let jobs = format!(
        "[job.db]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\nreplicas = 2\nmin_retention = \"30d\"\n",
        source.display()
    );
    let runs = fabric.submit(&jobs, &[]);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "done", "{run:#}");
    let nodes = snapshot_nodes(&fabric, "db");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].len(), 2, "{nodes:?}");
    assert_ne!(nodes[0][0], nodes[0][1]);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    for (index, node) in fabric.nodes.iter().enumerate() {
        if !nodes[0].contains(&format!("n{}", index + 1)) {
            continue;
        }
        runtime.block_on(async {
            let mut client = storage_client(&node.address).await;
            let snapshots = client
                .list_snapshots(ListSnapshotsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .snapshots;
            assert_eq!(snapshots.len(), 1);
            let snapshot = &snapshots[0];
            let window = snapshot.retain_until_ms - snapshot.start_time_ms;
            assert_eq!(window, 30 * 86_400 * 1000, "{snapshot:?}");
            let refused = client
                .delete_snapshot(DeleteSnapshotRequest {
                    snapshot: snapshot.id.clone(),
                })
                .await
                .unwrap_err();
            assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
            assert!(refused.message().contains("deleted from 20"), "{refused:?}");
        });
    }
}

#[test]
fn a_passive_and_pull_pair_completes_without_the_client_dialling_storage() {
    let fabric = Fabric::start(3);
    let source = source_tree(&fabric);
    let marker = fabric.dir.path().join("post-ran");
    let jobs = format!(
        "[job.ext-client]\ndirection = \"passive\"\nclient = \"client\"\npre = \"echo preparing\"\npost = \"touch {}\"\npull_timeout = \"5m\"\n\n[job.ext]\ndirection = \"pull\"\npull_source = \"ext-client\"\ninclude = [\"{}\"]\ndest = \"n2& n3\"\n",
        marker.display(),
        source.display()
    );
    let storage_ports: HashSet<u16> = fabric.nodes.iter().map(|n| port_of(&n.address)).collect();
    let agent_pid = fabric.agent.pid();
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(HashSet::new()));
    let sampler = {
        let (watching, seen) = (watching.clone(), seen.clone());
        std::thread::spawn(move || {
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                seen.lock().unwrap().extend(remote_ports(agent_pid));
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    };
    let runs = fabric.submit(&jobs, &[]);
    let run = fabric.wait_run(&runs[0]);
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    assert_eq!(run["state"], "done", "{run:#}");
    // One snapshot, the same on both nodes: n2 pulled it from the client, and
    // n3 (which would otherwise have pulled at the same time) copied it from
    // n2, not from the client's live files.
    assert_eq!(snapshot_nodes(&fabric, "ext"), vec![vec!["n2", "n3"]]);
    let events = events_of(&run);
    assert!(
        first_event(&events, "pull assigned to n2").is_some()
            && first_event(&events, "assigned to n3, node to node from n2").is_some()
            && first_event(&events, "pull assigned to n3").is_none(),
        "{events:#?}"
    );
    assert!(marker.exists(), "the client ran post after the pull");
    let seen = seen.lock().unwrap();
    assert!(
        seen.contains(&port_of(&fabric.coordinator.address)),
        "the sampler sees the agent's connections: {seen:?}"
    );
    let dialled: Vec<&u16> = seen.intersection(&storage_ports).collect();
    assert!(
        dialled.is_empty(),
        "the client dialled storage ports {dialled:?}"
    );
}

#[test]
fn a_storage_node_killed_during_a_copy_fails_that_copy_or_goes_to_a_spare() {
    let mut fabric = Fabric::start(3);
    let source = fabric.dir.path().join("big");
    std::fs::create_dir_all(&source).unwrap();
    for index in 0..6 {
        std::fs::write(
            source.join(format!("part-{index}")),
            pseudo_random(32 * 1024 * 1024, index),
        )
        .unwrap();
    }
    // A single destination: the copy fails after its retries, with the reason.
    let jobs = format!(
        "[job.single]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1\"\ncopy_retries = 1\ncopy_retry_min_sleep = \"100ms\"\n",
        source.display()
    );
    let runs = fabric.submit(&jobs, &[]);
    wait_copy_running(&fabric, &runs[0], "n1");
    let n1 = fabric.nodes.remove(0);
    drop(n1);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "failed", "{run:#}");
    let copy = &run["copies"][0];
    assert_eq!(copy["state"], "failed");
    assert!(copy["reason"].as_str().unwrap().contains("n1"), "{copy}");

    // Replicas: the killed node's copy goes to the spare.
    let jobs = format!(
        "[job.spread]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\nreplicas = 1\ncopy_retries = 1\ncopy_retry_min_sleep = \"100ms\"\n",
        source.display()
    );
    let runs = fabric.submit(&jobs, &[]);
    let first = wait_any_copy_running(&fabric, &runs[0]);
    let index = fabric.nodes.iter().position(|n| {
        fabric
            .json(&["node", "list"])
            .as_array()
            .unwrap()
            .iter()
            .any(|row| row["id"] == first.as_str() && row["address"] == n.address.as_str())
    });
    let killed = fabric.nodes.remove(index.unwrap());
    drop(killed);
    let run = fabric.wait_run(&runs[0]);
    let copies = copies_of(&run);
    assert!(
        copies.iter().any(|c| c.0 == first && c.1 == "failed"),
        "{copies:?}"
    );
    assert!(
        copies.iter().any(|c| c.0 != first && c.1 == "done"),
        "the spare took over: {copies:?}"
    );
}

/// Issue 21: every copy of one snapshot id holds the same content. A run
/// reads the source once; its later copies, and a retried run's, are made
/// node to node from a node that holds the committed snapshot.
#[test]
fn a_retried_copy_is_the_committed_snapshot_not_a_new_read_of_the_source() {
    let mut fabric = Fabric::start(1);
    // n2 cannot take the client's data at first: its quota is too small.
    fabric.nodes.push(Fabric::start_node_with(
        &fabric.dir,
        &fabric.coordinator.address,
        2,
        &["--host-quota-bytes", "1000"],
    ));
    fabric.wait_online(3);
    let source = source_tree(&fabric);
    let jobs = format!(
        "[job.twice]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1 n2\"\ncopy_retries = 0\n",
        source.display()
    );
    let runs = fabric.submit(&jobs, &[]);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "failed", "{run:#}");
    let copies = copies_of(&run);
    assert!(
        copies.contains(&("n1".into(), "done".into(), false)),
        "{copies:?}"
    );
    assert!(
        copies.contains(&("n2".into(), "failed".into(), false)),
        "{copies:?}"
    );
    let events = events_of(&run);
    assert!(
        first_event(&events, "n2 running  [client]  node to node from n1").is_some(),
        "n2's copy came from n1: {events:#?}"
    );
    assert!(
        first_event(&events, "quota").is_some(),
        "n2's quota refused the copy: {events:#?}"
    );

    // The source changes; n2 comes back without a quota; the run is retried.
    std::fs::write(source.join("new-after-the-run"), b"not in the snapshot").unwrap();
    let n2 = fabric.nodes.pop().unwrap();
    drop(n2);
    fabric.nodes.push(Fabric::start_node(
        &fabric.dir,
        &fabric.coordinator.address,
        2,
    ));
    fabric.wait_node_at("n2", &fabric.nodes[1].address);
    let retried = fabric.ctl(&["run", "retry", &runs[0]]);
    assert!(retried.status.success(), "{retried:?}");
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "done", "{run:#}");

    let held: Vec<fabric_proto::v1::Snapshot> = fabric
        .nodes
        .iter()
        .map(|node| {
            let mut snapshots = snapshots_on(&node.address);
            assert_eq!(snapshots.len(), 1, "{snapshots:?}");
            snapshots.remove(0)
        })
        .collect();
    assert_eq!(held[0].id, held[1].id);
    assert_eq!(
        held[0].root_tree_id, held[1].root_tree_id,
        "the same content"
    );
    let (first, second) = (held[0].stats.unwrap(), held[1].stats.unwrap());
    assert_eq!(
        (first.files, first.total_bytes),
        (second.files, second.total_bytes),
        "the file written after the run is in neither"
    );
    assert_eq!(snapshot_nodes(&fabric, "twice"), vec![vec!["n1", "n2"]]);
}

/// Issue 21: a job's `quota` on the coordinator. An upload that would go
/// over what the quota leaves stops without a commit; the job's usage shows
/// in `status`; a job at its quota does not start.
#[test]
fn a_jobs_quota_stops_its_uploads_and_shows_in_status() {
    let fabric = Fabric::start(1);
    let source = source_tree(&fabric);
    let job = |quota: &str| {
        format!(
            "[job.capped]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1\"\ncopy_retries = 0\nquota = {quota}\n",
            source.display()
        )
    };
    let stored = || snapshots_on(&fabric.nodes[0].address);

    // The source stores some 400 kB: a quota of 100 kB stops the upload.
    let runs = fabric.submit(&job("100000"), &[]);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "failed", "{run:#}");
    let reason = run["reason"].as_str().unwrap();
    assert!(
        reason.contains("job capped would go over its quota of 100000 bytes")
            && reason.contains("nothing was committed"),
        "{reason}"
    );
    assert!(stored().is_empty(), "nothing committed");

    // With room, it commits, and `status` shows the job's usage once n1
    // counted it.
    let runs = fabric.submit(&job("\"10MB\""), &[]);
    assert_eq!(fabric.wait_run(&runs[0])["state"], "done");
    let snapshots = stored();
    assert_eq!(snapshots.len(), 1);
    let stored_bytes = snapshots[0].stats.unwrap().stored_bytes;
    let mut quota = serde_json::Value::Null;
    for _ in 0..100 {
        quota = fabric.json(&["status", "--job", "capped"])[0]["job_quota"].clone();
        if quota["used_bytes"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(quota["used_bytes"], stored_bytes, "{quota}");
    assert_eq!(quota["quota_bytes"], 10_000_000, "{quota}");
    let table = fabric.ctl(&["status", "--job", "capped", "-o", "table"]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table.contains("JOB QUOTA") && table.contains("% of "),
        "{table}"
    );

    // At its quota, a run does not start.
    let runs = fabric.submit(&job("1000"), &[]);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "failed", "{run:#}");
    assert!(
        run["reason"]
            .as_str()
            .unwrap()
            .contains("job capped is at its quota"),
        "{run:#}"
    );
    assert_eq!(stored().len(), 1);
}

/// Issue 22: retention applies by itself after each good run: with
/// `keep_last = 2`, four runs leave the two newest snapshots on both nodes
/// and in the catalogue, each still restoring identical; `forget --dry-run`
/// says why each is kept.
#[test]
fn retention_removes_what_no_rule_keeps_from_every_node() {
    let mut fabric = Fabric::start(0);
    // GC here may sweep packs of any age (the default grace is an hour).
    for index in 1..=2 {
        fabric.nodes.push(Fabric::start_node_with(
            &fabric.dir,
            &fabric.coordinator.address,
            index,
            &["--gc-grace-s", "0"],
        ));
    }
    fabric.wait_online(3);
    let source = source_tree(&fabric);
    let jobs = format!(
        "[job.kept]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1 n2\"\nkeep_last = 2\n",
        source.display()
    );
    let mut ids = Vec::new();
    for round in 0..4u64 {
        // Each snapshot has a file of its own, which only it references.
        if round > 0 {
            std::fs::remove_file(source.join(format!("round-{}", round - 1))).unwrap();
        }
        std::fs::write(
            source.join(format!("round-{round}")),
            pseudo_random(300_000, 1000 + round),
        )
        .unwrap();
        let runs = fabric.submit(&jobs, &[]);
        let run = fabric.wait_run(&runs[0]);
        assert_eq!(run["state"], "done", "{run:#}");
        ids.push(run["copies"][0]["snapshot_id"].as_str().unwrap().to_owned());
    }
    let newest: Vec<String> = ids[2..].to_vec();
    let mut listed = Vec::new();
    for _ in 0..100 {
        listed = fabric
            .json(&["status", "--job", "kept"])
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>();
        if listed.len() == 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    listed.sort();
    let mut expected = newest.clone();
    expected.sort();
    assert_eq!(listed, expected, "the catalogue holds the two newest");
    for node in &fabric.nodes {
        let mut held: Vec<String> = snapshots_on(&node.address)
            .into_iter()
            .map(|snapshot| snapshot.id)
            .collect();
        held.sort();
        assert_eq!(held, expected, "{} holds the two newest", node.address);
    }

    let plan = fabric.json(&["forget", "--job", "kept", "--dry-run"]);
    let plan = plan.as_array().unwrap();
    assert_eq!(plan.len(), 2, "{plan:#?}");
    for row in plan {
        assert_eq!(row["decision"], "keep");
        let why = row["kept_because"].to_string();
        assert!(why.contains("last"), "{why}");
    }

    // The deletions have the coordinator collect on each node by itself
    // (no GC window here), sweeping what the removed snapshots alone
    // referenced. (Swept from the index; the packs holding them are
    // rewritten only once enough of each is dead.)
    let mut swept = 0;
    for _ in 0..300 {
        let n1 = fabric.node_row("n1");
        if n1["gc_wanted"] == false && !n1["last_gc"].as_str().unwrap().is_empty() {
            swept = n1["last_gc_swept_chunks"].as_u64().unwrap();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(swept > 0, "the GC after retention swept chunks");
    // One on demand finds nothing more.
    let collected = fabric.json(&["gc", "--node", "n1"]);
    assert_eq!(collected[0]["node"], "n1", "{collected}");
    assert_eq!(collected[0]["swept_chunks"], 0, "{collected}");

    // What is kept still restores identical: the newest is the source as
    // it is now.
    fabric.restore_matching(&newest[1], &source, "restored", &[]);
}

fn wait_copy_running(fabric: &Fabric, run: &str, node: &str) {
    for _ in 0..600 {
        let shown = fabric.json(&["run", "show", run]);
        if copies_of(&shown)
            .iter()
            .any(|c| c.0 == node && c.1 == "running")
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("the copy to {node} never ran");
}

fn wait_any_copy_running(fabric: &Fabric, run: &str) -> String {
    for _ in 0..600 {
        let shown = fabric.json(&["run", "show", run]);
        if let Some(copy) = copies_of(&shown).into_iter().find(|c| c.1 == "running") {
            return copy.0;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("no copy of run {run} ever ran");
}

#[test]
fn a_coordinator_killed_and_restarted_mid_run_loses_nothing() {
    let mut fabric = Fabric::start(2);
    let source = fabric.dir.path().join("big");
    std::fs::create_dir_all(&source).unwrap();
    for index in 0..4 {
        std::fs::write(
            source.join(format!("part-{index}")),
            pseudo_random(32 * 1024 * 1024, index),
        )
        .unwrap();
    }
    let jobs = format!(
        "[job.survive]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1 n2\"\n",
        source.display()
    );
    let runs = fabric.submit(&jobs, &[]);
    wait_copy_running(&fabric, &runs[0], "n1");
    let before = fabric.json(&["run", "show", &runs[0]]);
    let listen = fabric
        .coordinator
        .address
        .trim_start_matches("https://")
        .to_owned();
    let mut old = std::mem::replace(
        &mut fabric.coordinator,
        Fabric::start_coordinator(&fabric.dir.path().join("coordinator-unused"), "127.0.0.1:0"),
    );
    old.child.kill().unwrap();
    old.child.wait().unwrap();
    drop(old);
    fabric.coordinator = Fabric::start_coordinator(&fabric.dir.path().join("coordinator"), &listen);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "done", "{run:#}");
    let events_before = events_of(&before);
    let events_after = events_of(&run);
    assert!(events_after.len() > events_before.len());
    assert_eq!(
        &events_after[..events_before.len()],
        &events_before[..],
        "no report was lost"
    );
    assert_eq!(snapshot_nodes(&fabric, "survive"), vec![vec!["n1", "n2"]]);
    assert_eq!(fabric.json(&["job", "list"]).as_array().unwrap().len(), 1);
}

#[test]
fn a_failing_pre_fails_the_run_before_any_copy_and_instances_come_from_a_command() {
    let fabric = Fabric::start(1);
    let source = source_tree(&fabric);
    let jobs = format!(
        "[job.broken]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\npre = \"echo about to fail; exit 3\"\ndest = \"n1\"\n",
        source.display()
    );
    let runs = fabric.submit(&jobs, &[]);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "failed", "{run:#}");
    assert!(run["reason"].as_str().unwrap().contains("pre"), "{run:#}");
    assert!(
        copies_of(&run).iter().all(|c| c.1 == "pending"),
        "no copy started: {run:#}"
    );
    assert!(
        events_of(&run).iter().any(|e| e.contains("about to fail")),
        "pre's output is in the run's log"
    );

    let out = fabric.dir.path().join("instances");
    std::fs::create_dir_all(&out).unwrap();
    for name in ["alpha", "beta"] {
        std::fs::create_dir_all(out.join(name)).unwrap();
        std::fs::write(out.join(name).join("data"), name).unwrap();
    }
    let jobs = format!(
        "[job.multi]\ndirection = \"push\"\nclient = \"client\"\ninstances = \"!printf 'alpha\\\\nbeta\\\\n'\"\ninclude = [\"{}/$instance\"]\ndest = \"n1\"\n",
        out.display()
    );
    let runs = fabric.submit(&jobs, &[]);
    for run in &runs {
        fabric.wait_run(run);
    }
    let mut done = Vec::new();
    for _ in 0..300 {
        done = fabric
            .runs_of("multi")
            .into_iter()
            .filter(|r| r["state"] == "done" && !r["instance"].as_str().unwrap_or("").is_empty())
            .map(|r| r["instance"].as_str().unwrap().to_owned())
            .collect();
        if done.len() == 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    done.sort();
    assert_eq!(done, ["alpha", "beta"]);
    let names: Vec<String> = fabric
        .json(&["status", "--job", "multi"])
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names.len(), 2);
    assert!(
        names.iter().any(|n| n.contains("alpha")) && names.iter().any(|n| n.contains("beta")),
        "{names:?}"
    );
}

#[test]
fn bad_job_files_are_rejected_naming_the_problem() {
    let fabric = Fabric::start(1);
    let cases = [
        (
            "[job.a]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"/x\"]\ndets = \"n1\"\n",
            "dets",
        ),
        (
            "[job.a]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"/x\"]\ndest = \"n1//n2\"\n",
            "n1//n2",
        ),
        (
            "[job.a]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"/x\"]\ndest = \"nowhere\"\n",
            "nowhere",
        ),
        (
            "[job.a]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"$missing\"]\ndest = \"n1\"\n",
            "missing",
        ),
        (
            "[global]\nx = \"$y\"\ny = \"$x\"\n[job.a]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"$x\"]\ndest = \"n1\"\n",
            "cycl",
        ),
    ];
    for (text, needle) in cases {
        let file = fabric.dir.path().join("bad.toml");
        std::fs::write(&file, text).unwrap();
        let output = fabric.ctl(&["job", "submit", "-f", file.to_str().unwrap()]);
        assert!(!output.status.success(), "{text} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("bad.toml"), "names the file: {stderr}");
        assert!(stderr.contains(needle), "names {needle:?}: {stderr}");
    }
}

#[test]
fn a_restore_reads_another_copy_when_a_holder_is_down_or_lost_it() {
    let fabric = Fabric::start(3);
    let source = source_tree(&fabric);
    let jobs = format!(
        "[job.spread]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1 n2 n3\"\n",
        source.display()
    );
    let runs = fabric.submit(&jobs, &[]);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "done", "{run:#}");
    let id = run["copies"][0]["snapshot_id"].as_str().unwrap().to_owned();
    // The order restore tries the copies in: the catalogue's.
    let status = fabric.json(&["status", "--job", "spread"]);
    let holders: Vec<String> = status[0]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| node.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(holders.len(), 3, "{status:#}");
    let server = |node: &str| {
        let index: usize = node.trim_start_matches('n').parse().unwrap();
        &fabric.nodes[index - 1]
    };
    let restore_into = |name: &str| fabric.restore_matching(&id, &source, name, &[]);

    // The first holder killed: the coordinator still lists it online, the
    // restore cannot reach it and reads the second.
    fabric_integration_tests::signal(server(&holders[0]).pid(), rustix::process::Signal::KILL);
    let said = restore_into("from-second");
    assert!(
        said.contains(&format!("the copy on {} could not be read", holders[0]))
            && said.contains(&format!("{} served the restore", holders[1])),
        "{said}"
    );

    // The second lost its copy (deleted on the node behind the
    // coordinator's back): the third serves.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        storage_client(&server(&holders[1]).address)
            .await
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot: id.clone(),
            })
            .await
            .unwrap();
    });
    // The third serves: either the second is tried and passed over, or
    // the coordinator already knows the second no longer holds it (storage
    // nodes say what they hold within a heartbeat) and never names it.
    let said = restore_into("from-third");
    let passed_over = said.contains(&format!("the copy on {} could not be read", holders[1]))
        && said.contains(&format!("{} served the restore", holders[2]));
    let forgotten = !said.contains(&format!("the copy on {}", holders[1]))
        && said.contains(&format!("from {}", holders[2]));
    assert!(passed_over || forgotten, "{said}");
}

#[test]
fn placement_avoids_a_node_that_refuses_writes() {
    let mut fabric = Fabric::start(0);
    // n1 wants more free space than any disk has: it refuses uploads.
    fabric.nodes.push(Fabric::start_node_with(
        &fabric.dir,
        &fabric.coordinator.address,
        1,
        &["--min-free-bytes", "1000000000000000000"],
    ));
    fabric.nodes.push(Fabric::start_node(
        &fabric.dir,
        &fabric.coordinator.address,
        2,
    ));
    fabric.wait_online(3);
    let mut refusing = String::new();
    for _ in 0..300 {
        refusing = fabric.node_row("n1")["refuses_writes"]
            .as_str()
            .unwrap()
            .to_owned();
        if !refusing.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(refusing.contains("min_free_bytes"), "{refusing:?}");
    let source = source_tree(&fabric);
    let jobs = format!(
        "[job.one]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\nreplicas = 1\n",
        source.display()
    );
    // Picked at random between two storage nodes, were n1 a candidate.
    for _ in 0..4 {
        let runs = fabric.submit(&jobs, &[]);
        let run = fabric.wait_run(&runs[0]);
        assert_eq!(run["state"], "done", "{run:#}");
        let nodes: Vec<String> = copies_of(&run).into_iter().map(|copy| copy.0).collect();
        assert_eq!(nodes, ["n2"], "{run:#}");
    }
}

#[test]
fn a_node_refusing_writes_says_why_in_node_list_stats_uploads_and_health() {
    let mut fabric = Fabric::start(0);
    // n1 wants more free space than any disk has: it refuses writes from
    // the start; its health port is a probe's view.
    fabric.nodes.push(Fabric::start_node_with(
        &fabric.dir,
        &fabric.coordinator.address,
        1,
        &[
            "--min-free-bytes",
            "1000000000000000000",
            "--health-listen",
            "127.0.0.1:0",
        ],
    ));
    fabric.nodes.push(Fabric::start_node(
        &fabric.dir,
        &fabric.coordinator.address,
        2,
    ));
    fabric.wait_online(3);
    // Its first heartbeat carries the reasons.
    let mut row = fabric.node_row("n1");
    for _ in 0..300 {
        if row["health"]["refusing_writes"] == true {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        row = fabric.node_row("n1");
    }
    assert_eq!(row["health"]["refusing_writes"], true, "{row:#}");
    let reasons = row["health"]["reasons"].as_array().unwrap();
    assert_eq!(reasons.len(), 1, "{row:#}");
    assert_eq!(reasons[0]["kind"], "low_free_space", "{row:#}");
    assert_eq!(reasons[0]["min_free_bytes"], 1_000_000_000_000_000_000u64);
    let free = reasons[0]["free_bytes"].as_u64().unwrap();
    assert!(free < 1_000_000_000_000_000_000, "{row:#}");
    assert!(
        reasons[0]["text"]
            .as_str()
            .unwrap()
            .ends_with("below min_free 888.2 PiB"),
        "{row:#}"
    );
    assert_eq!(row["state"], "online", "{row:#}");
    let n2 = fabric.node_row("n2");
    assert_eq!(n2["health"]["refusing_writes"], false, "{n2:#}");
    assert_eq!(n2["health"]["reasons"], serde_json::json!([]), "{n2:#}");

    // The table says it in the state column, and only for n1.
    let table = String::from_utf8(fabric.ctl(&["node", "list"]).stdout).unwrap();
    let line_of = |table: &str, id: &str| {
        table
            .lines()
            .find(|line| line.trim_start().starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("{id} is not in {table}"))
            .to_owned()
    };
    assert!(
        line_of(&table, "n1").contains("online, refusing writes: free space ")
            && line_of(&table, "n1").contains(" below min_free 888.2 PiB"),
        "{table}"
    );
    assert!(!line_of(&table, "n2").contains("refusing"), "{table}");

    let n1 = &fabric.nodes[0];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        // Probes see NOT_SERVING on the plaintext health port; n2 serves.
        let probe = n1.health_address.as_deref().unwrap();
        assert_eq!(
            fabric_integration_tests::plaintext_health(probe).await,
            ServingStatus::NotServing
        );
        assert_eq!(
            fabric_integration_tests::health(&fabric.nodes[1].address).await,
            ServingStatus::Serving
        );
        // The node itself says why in Stats.
        let stats = storage_client(&n1.address)
            .await
            .stats(StatsRequest {})
            .await
            .unwrap()
            .into_inner();
        let health = stats.health.unwrap();
        assert!(health.refusing_writes);
        assert_eq!(health.reasons[0].kind(), HealthReasonKind::LowFreeSpace);
        assert_eq!(health.reasons[0].min_free_bytes, 1_000_000_000_000_000_000);
    });

    // An upload is refused saying why.
    let source = fabric.dir.path().join("small");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("file"), b"data").unwrap();
    let refused = fabric_integration_tests::fabricctl(&[
        "backup",
        "--node",
        &n1.address,
        source.to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        said.contains("cannot accept writes now") && said.contains("under its min_free_bytes"),
        "{said}"
    );

    // A drain, which only the coordinator knows, is a reason too.
    let output = fabric.ctl(&["node", "drain", "n2"]);
    assert!(output.status.success(), "{output:?}");
    let n2 = fabric.node_row("n2");
    assert_eq!(n2["health"]["refusing_writes"], true, "{n2:#}");
    let kinds: Vec<&str> = n2["health"]["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|reason| reason["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["draining"], "{n2:#}");
    let table = String::from_utf8(fabric.ctl(&["node", "list"]).stdout).unwrap();
    assert!(
        line_of(&table, "n2").contains("online, refusing writes: draining"),
        "{table}"
    );
}

#[test]
fn a_node_lost_for_good_has_its_snapshots_copied_back_to_their_replica_target() {
    let fabric = Fabric::start_with(
        3,
        &["--replace-after", "1s", "--replication-check-every", "1s"],
        &[],
    );
    let source = source_tree(&fabric);
    let jobs = format!(
        "[job.kept]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\nreplicas = 2\n",
        source.display()
    );
    let mut ids = Vec::new();
    for _ in 0..2 {
        let runs = fabric.submit(&jobs, &[]);
        let run = fabric.wait_run(&runs[0]);
        assert_eq!(run["state"], "done", "{run:#}");
        ids.push(run["copies"][0]["snapshot_id"].as_str().unwrap().to_owned());
    }
    let listed = fabric.json(&["snapshot", "list", "--job", "kept"]);
    for row in listed.as_array().unwrap() {
        assert_eq!(row["copies"]["healthy"], 2, "{row:#}");
        assert_eq!(row["copies"]["target"], 2, "{row:#}");
    }
    // The node holding the most copies dies for good.
    let holders = |row: &serde_json::Value| -> Vec<String> {
        row["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|node| node.as_str().unwrap().to_owned())
            .collect()
    };
    let mut count: std::collections::BTreeMap<String, usize> = Default::default();
    for row in listed.as_array().unwrap() {
        for node in holders(row) {
            *count.entry(node).or_default() += 1;
        }
    }
    let victim = count
        .iter()
        .max_by_key(|(_, held)| **held)
        .map(|(node, _)| node.clone())
        .unwrap();
    let index: usize = victim.trim_start_matches('n').parse().unwrap();
    fabric_integration_tests::signal(fabric.nodes[index - 1].pid(), rustix::process::Signal::KILL);

    // Every snapshot gets back to two copies that count, on the others.
    let mut rows = Vec::new();
    for _ in 0..600 {
        rows = fabric
            .json(&["snapshot", "list", "--job", "kept"])
            .as_array()
            .cloned()
            .unwrap();
        let back = rows.iter().all(|row| {
            row["copies"]["healthy"] == 2
                && holders(row).iter().filter(|node| **node != victim).count() == 2
        });
        if back {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for row in &rows {
        assert_eq!(row["copies"]["healthy"], 2, "{rows:#?}");
        let problems = row["copies"]["problems"].to_string();
        if holders(row).contains(&victim) {
            assert!(
                problems.contains(&format!("{victim}: node lost"))
                    && problems.contains("not counted"),
                "{row:#}"
            );
        }
        let flags = row["flags"].to_string();
        assert!(!flags.contains("under-replicated"), "{row:#}");
    }
    // The new copies are really there, and restore from them.
    for id in &ids {
        let on_live_nodes = fabric
            .nodes
            .iter()
            .enumerate()
            .filter(|(at, _)| *at != index - 1)
            .filter(|(_, node)| {
                snapshots_on(&node.address)
                    .iter()
                    .any(|snapshot| &snapshot.id == id)
            })
            .count();
        assert_eq!(on_live_nodes, 2, "snapshot {id}");
    }
    fabric.restore_matching(&ids[0], &source, "restored", &[]);
    let check = fabric.ctl(&["check", "kept"]);
    assert!(check.status.success(), "{check:?}");
}

/// Flip one byte in the middle of the largest chunk of every pack under
/// `data_dir` (a file's content in these tests, never a tree).
fn damage_largest_chunks(data_dir: &std::path::Path) -> usize {
    use std::os::unix::fs::FileExt;
    let mut packs = Vec::new();
    let mut dirs = vec![data_dir.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path
                .parent()
                .is_some_and(|parent| parent.ends_with("packs"))
            {
                packs.push(path);
            }
        }
    }
    let mut damaged = 0;
    for pack in packs {
        let mut largest: Option<(u64, u32)> = None;
        let scanned = fabric_chunkstore::pack::scan_pack(&pack, |offset, header, _| {
            if largest.is_none_or(|(_, len)| header.stored_len > len) {
                largest = Some((offset, header.stored_len));
            }
        });
        let (Ok(_), Some((offset, len))) = (scanned, largest) else {
            continue;
        };
        let at = offset + fabric_chunkstore::pack::ENTRY_HEADER_LEN as u64 + u64::from(len / 2);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pack)
            .unwrap();
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, at).unwrap();
        byte[0] ^= 0x5a;
        file.write_all_at(&byte, at).unwrap();
        damaged += 1;
    }
    damaged
}

#[test]
fn a_damaged_chunk_is_read_from_another_copy_and_a_failed_restore_leaves_nothing_behind() {
    let fabric = Fabric::start(2);
    let source = source_tree(&fabric);
    let jobs = format!(
        "[job.pair]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1 n2\"\n",
        source.display()
    );
    let runs = fabric.submit(&jobs, &[]);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "done", "{run:#}");
    let id = run["copies"][0]["snapshot_id"].as_str().unwrap().to_owned();
    let status = fabric.json(&["status", "--job", "pair"]);
    let first = status[0]["nodes"][0].as_str().unwrap().to_owned();
    let second = status[0]["nodes"][1].as_str().unwrap().to_owned();
    let inside = source.to_str().unwrap().trim_start_matches('/').to_owned();
    let restore = |name: &str, extra: &[&str]| {
        let target = fabric.dir.path().join(name);
        let mut args = vec![
            "restore",
            id.as_str(),
            inside.as_str(),
            "--to",
            target.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        (fabric.ctl(&args), target)
    };

    // The copy restore reads first is damaged: the damaged chunk comes from
    // the other copy, and the result is identical.
    assert!(damage_largest_chunks(&fabric.dir.path().join(&first)) > 0);
    let (output, target) = restore("healed", &[]);
    assert!(output.status.success(), "{output:?}");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains(&format!(
            "the copy on {first} could not read were read from other copies"
        )),
        "{said}"
    );
    fabricctl::compare::compare_trees(
        &source,
        &target,
        false,
        fabric_chunkstore::restore::RestorePolicy::default(),
    )
    .unwrap();

    // Both copies damaged in the same chunk: the restore fails and takes
    // back everything it wrote...
    assert!(damage_largest_chunks(&fabric.dir.path().join(&second)) > 0);
    let (output, target) = restore("failed", &[]);
    assert!(!output.status.success(), "{output:?}");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("no other copy has it"), "{said}");
    assert!(said.contains("--keep-partial"), "{said}");
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0, "{said}");
    // ...unless asked to keep it.
    let (output, target) = restore("kept", &["--keep-partial"]);
    assert!(!output.status.success(), "{output:?}");
    assert!(std::fs::read_dir(&target).unwrap().count() > 0);
}

#[test]
fn scrub_finds_a_flipped_byte_repair_fixes_it_and_damage_on_every_copy_is_critical() {
    let fabric = Fabric::start_with(2, &[], &["--scrub-bytes-per-s", "100000000"]);
    let source = source_tree(&fabric);
    let jobs = format!(
        "[job.scrubbed]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1 n2\"\n",
        source.display()
    );
    let runs = fabric.submit(&jobs, &[]);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "done", "{run:#}");
    let id = run["copies"][0]["snapshot_id"].as_str().unwrap().to_owned();
    let wait_for = |node: &str, what: &str, done: &dyn Fn(&serde_json::Value) -> bool| {
        for _ in 0..600 {
            let row = fabric.node_row(node);
            if done(&row) {
                return row;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("{what}: {:#}", fabric.node_row(node));
    };

    // One byte flipped on n1: its scrub finds it, n2 supplies the chunk.
    assert!(damage_largest_chunks(&fabric.dir.path().join("n1")) > 0);
    wait_for("n1", "n1 repaired", &|row| {
        row["last_repair"]
            .as_str()
            .is_some_and(|said| said.starts_with("1 chunk(s) repaired"))
            && row["scrub"]["damaged_chunks"] == 0
    });
    let said = fabric.restore_matching(&id, &source, "after-repair", &["--node", "n1"]);
    assert!(!said.contains("other copies"), "{said}");

    // The same chunk damaged on both: nobody can repair it, both copies are
    // marked damaged, the snapshot is DAMAGED and check is CRITICAL.
    assert!(damage_largest_chunks(&fabric.dir.path().join("n1")) > 0);
    assert!(damage_largest_chunks(&fabric.dir.path().join("n2")) > 0);
    for node in ["n1", "n2"] {
        wait_for(node, "unrepairable damage reported", &|row| {
            row["last_repair"]
                .as_str()
                .is_some_and(|said| said.contains("1 unrepairable (1 snapshot(s) damaged here)"))
        });
    }
    let listed = fabric.json(&["snapshot", "list", "--job", "scrubbed"]);
    let row = &listed[0];
    assert_eq!(row["state"], "damaged", "{row:#}");
    assert_eq!(row["copies"]["healthy"], 0, "{row:#}");
    assert!(
        row["flags"].to_string().contains("under-replicated"),
        "{row:#}"
    );
    let check = fabric.ctl(&["check", "scrubbed"]);
    assert_eq!(check.status.code(), Some(2), "{check:?}");
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("without a good copy"),
        "{check:?}"
    );
}

#[test]
fn a_drained_node_gives_its_snapshots_to_the_others_and_becomes_removable() {
    let fabric = Fabric::start_with(3, &["--replication-check-every", "1s"], &[]);
    let source = source_tree(&fabric);
    let jobs = format!(
        "[job.moved]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\nreplicas = 2\n",
        source.display()
    );
    let mut ids = Vec::new();
    for _ in 0..3 {
        let runs = fabric.submit(&jobs, &[]);
        let run = fabric.wait_run(&runs[0]);
        assert_eq!(run["state"], "done", "{run:#}");
        ids.push(run["copies"][0]["snapshot_id"].as_str().unwrap().to_owned());
    }
    let held = |index: usize| {
        snapshots_on(&fabric.nodes[index].address)
            .into_iter()
            .map(|snapshot| snapshot.id)
            .collect::<HashSet<String>>()
    };
    let victim = (0..3).max_by_key(|index| held(*index).len()).unwrap();
    let name = format!("n{}", victim + 1);
    assert!(!held(victim).is_empty());

    let output = fabric.ctl(&["node", "drain", &name]);
    assert!(output.status.success(), "{output:?}");
    let mut row = serde_json::Value::Null;
    for _ in 0..600 {
        row = fabric.node_row(&name);
        if row["drain"] == "removable" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(row["drain"], "removable", "{row:#}");
    assert!(held(victim).is_empty(), "{:?}", held(victim));
    for id in &ids {
        let elsewhere = (0..3)
            .filter(|index| *index != victim && held(*index).contains(id))
            .count();
        assert_eq!(elsewhere, 2, "snapshot {id}");
    }
    for row in fabric
        .json(&["snapshot", "list", "--job", "moved"])
        .as_array()
        .unwrap()
    {
        assert_eq!(row["copies"]["healthy"], 2, "{row:#}");
    }
    // Waiting on a removable node returns at once; a new run avoids it.
    let output = fabric.ctl(&["node", "drain", &name, "--wait"]);
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("removable"));
    let runs = fabric.submit(&jobs, &[]);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "done", "{run:#}");
    assert!(
        copies_of(&run).iter().all(|(node, _, _)| *node != name),
        "{run:#}"
    );
    // Cancelled, it takes copies again.
    let output = fabric.ctl(&["node", "drain", &name, "--cancel"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(fabric.node_row(&name)["drain"], "");
}

#[test]
fn a_job_with_verify_gets_its_snapshot_read_back_and_verified() {
    let fabric = Fabric::start(2);
    let source = source_tree(&fabric);
    let jobs = format!(
        "[job.checked]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1 n2\"\nverify = \"full\"\n",
        source.display()
    );
    let runs = fabric.submit(&jobs, &[]);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "done", "{run:#}");
    let mut events = Vec::new();
    for _ in 0..300 {
        events = events_of(&fabric.json(&["run", "show", &runs[0]]));
        if ["n1", "n2"].iter().all(|node| {
            events
                .iter()
                .any(|e| e.contains(&format!("verified on {node}")))
        }) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for node in ["n1", "n2"] {
        assert!(
            events
                .iter()
                .any(|e| e.contains(&format!("verified on {node}: "))
                    && e.contains("chunk(s) read back intact")),
            "{events:#?}"
        );
    }
    let listed = fabric.json(&["snapshot", "list", "--job", "checked"]);
    assert_eq!(listed[0]["state"], "verified", "{listed:#}");
}

#[test]
fn a_node_killed_during_a_run_and_lost_for_good_leaves_every_snapshot_at_two_copies() {
    let fabric = Fabric::start_with(
        3,
        &["--replace-after", "1s", "--replication-check-every", "1s"],
        &[],
    );
    let source = source_tree(&fabric);
    // No retries: a copy to the dead node goes to a spare at once.
    let jobs = format!(
        "[job.hard]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\nreplicas = 2\ncopy_retries = 0\n",
        source.display()
    );
    let mut ids = Vec::new();
    for _ in 0..2 {
        let runs = fabric.submit(&jobs, &[]);
        let run = fabric.wait_run(&runs[0]);
        assert_eq!(run["state"], "done", "{run:#}");
        ids.push(run["copies"][0]["snapshot_id"].as_str().unwrap().to_owned());
    }
    // n1 dies; the coordinator still lists it online when the next run is
    // planned, so that run likely counts on it.
    fabric_integration_tests::signal(fabric.nodes[0].pid(), rustix::process::Signal::KILL);
    let runs = fabric.submit(&jobs, &[]);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "done", "a spare stands in for n1: {run:#}");
    let committed: Vec<String> = run["copies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|copy| copy["state"] == "done")
        .map(|copy| copy["node"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(committed.len(), 2, "{run:#}");
    assert!(!committed.contains(&"n1".to_owned()), "{run:#}");
    ids.push(
        run["copies"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|copy| {
                (copy["state"] == "done").then(|| copy["snapshot_id"].as_str().unwrap().to_owned())
            })
            .unwrap(),
    );

    // Every snapshot, old or new, gets back to two copies on n2 and n3.
    let on = |index: usize| -> HashSet<String> {
        snapshots_on(&fabric.nodes[index].address)
            .into_iter()
            .map(|snapshot| snapshot.id)
            .collect()
    };
    let mut missing = Vec::new();
    for _ in 0..600 {
        let (n2, n3) = (on(1), on(2));
        missing = ids
            .iter()
            .filter(|id| !(n2.contains(*id) && n3.contains(*id)))
            .cloned()
            .collect();
        if missing.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(missing.is_empty(), "not back on n2 and n3: {missing:?}");
    for row in fabric
        .json(&["snapshot", "list", "--job", "hard"])
        .as_array()
        .unwrap()
    {
        assert_eq!(row["copies"]["healthy"], 2, "{row:#}");
    }
}

#[test]
fn off_site_sync_copies_each_snapshot_to_the_labelled_node_and_catches_up_after_an_outage() {
    let mut fabric = Fabric::start_with(2, &["--replication-check-every", "1s"], &[]);
    let coordinator = fabric.coordinator.address.clone();
    fabric.nodes.push(Fabric::start_node_with(
        &fabric.dir,
        &coordinator,
        3,
        &["--labels", "offsite"],
    ));
    fabric.wait_online(4);
    let source = source_tree(&fabric);
    let jobs = format!(
        "[job.away]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1 n2\"\nsync_to = \"offsite\"\n",
        source.display()
    );
    let backup = |fabric: &Fabric| {
        let runs = fabric.submit(&jobs, &[]);
        let run = fabric.wait_run(&runs[0]);
        assert_eq!(run["state"], "done", "{run:#}");
        run["copies"][0]["snapshot_id"].as_str().unwrap().to_owned()
    };
    let state_of = |fabric: &Fabric, id: &str| -> serde_json::Value {
        fabric
            .json(&["sync", "list", "--job", "away", "--all"])
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["id"] == id)
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    };
    let wait_synced = |fabric: &Fabric, id: &str| {
        let mut row = serde_json::Value::Null;
        for _ in 0..300 {
            row = state_of(fabric, id);
            if row["state"] == "synced" {
                return row;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("{id} not synced: {row:#}");
    };
    let first = backup(&fabric);
    let row = wait_synced(&fabric, &first);
    assert_eq!(row["node"], "n3", "{row:#}");
    assert!(
        snapshots_on(&fabric.nodes[2].address)
            .iter()
            .any(|s| s.id == first)
    );
    // Synced ones are listed only with --all.
    let unsynced = fabric.json(&["sync", "list", "--job", "away"]);
    assert!(unsynced.as_array().unwrap().is_empty(), "{unsynced:#}");

    // The off-site node is down when the next snapshot is made: it waits,
    // saying why, and goes once the node is back.
    fabric_integration_tests::signal(fabric.nodes[2].pid(), rustix::process::Signal::KILL);
    for _ in 0..300 {
        if fabric.node_row("n3")["state"] == "lost" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let second = backup(&fabric);
    let mut waiting = serde_json::Value::Null;
    for _ in 0..300 {
        waiting = state_of(&fabric, &second);
        if waiting["error"]
            .as_str()
            .is_some_and(|error| error.contains("offsite"))
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_ne!(waiting["state"], "synced", "{waiting:#}");
    assert!(
        waiting["error"]
            .as_str()
            .unwrap()
            .contains("no storage node labelled"),
        "{waiting:#}"
    );
    fabric.nodes[2] =
        Fabric::start_node_with(&fabric.dir, &coordinator, 3, &["--labels", "offsite"]);
    wait_synced(&fabric, &second);

    // Reset: synced again (n3 still holds it; nothing needs to travel).
    let output = fabric.ctl(&["sync", "reset", "--job", "away"]);
    assert!(output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout)
            .contains("2 snapshot(s) will be synced off-site again"),
        "{output:?}"
    );
    wait_synced(&fabric, &first);
    wait_synced(&fabric, &second);
}

#[test]
fn spread_by_keeps_replicas_in_distinct_zones_through_a_loss() {
    let mut fabric = Fabric::start_with(
        0,
        &["--replace-after", "1s", "--replication-check-every", "1s"],
        &[],
    );
    let coordinator = fabric.coordinator.address.clone();
    // n1 and n2 in zone a, n3 in zone b, n4 in none.
    for (index, zone) in [(1, Some("a")), (2, Some("a")), (3, Some("b")), (4, None)] {
        let label = zone.map(|zone| format!("zone:{zone}"));
        let extra: Vec<&str> = match &label {
            Some(label) => vec!["--labels", label.as_str()],
            None => Vec::new(),
        };
        fabric.nodes.push(Fabric::start_node_with(
            &fabric.dir,
            &coordinator,
            index,
            &extra,
        ));
    }
    fabric.wait_online(5);
    let source = source_tree(&fabric);
    let jobs = format!(
        "[job.zoned]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\nreplicas = 2\nspread_by = \"zone\"\n",
        source.display()
    );
    let mut ids = Vec::new();
    for _ in 0..5 {
        let runs = fabric.submit(&jobs, &[]);
        let run = fabric.wait_run(&runs[0]);
        assert_eq!(run["state"], "done", "{run:#}");
        let nodes: HashSet<String> = copies_of(&run)
            .into_iter()
            .map(|(node, _, _)| node)
            .collect();
        assert!(nodes.contains("n3"), "one copy in zone b: {run:#}");
        assert!(
            nodes.contains("n1") != nodes.contains("n2"),
            "one copy in zone a: {run:#}"
        );
        assert!(
            !nodes.contains("n4"),
            "no copy on a node without a zone: {run:#}"
        );
        ids.push(run["copies"][0]["snapshot_id"].as_str().unwrap().to_owned());
    }

    // Zone b is lost; a node of zone c comes: the copies go there, never
    // to the zone a node that has none, nor to n4.
    fabric_integration_tests::signal(fabric.nodes[2].pid(), rustix::process::Signal::KILL);
    fabric.nodes.push(Fabric::start_node_with(
        &fabric.dir,
        &coordinator,
        5,
        &["--labels", "zone:c"],
    ));
    let on = |index: usize| -> HashSet<String> {
        snapshots_on(&fabric.nodes[index].address)
            .into_iter()
            .map(|snapshot| snapshot.id)
            .collect()
    };
    let mut missing = ids.clone();
    for _ in 0..600 {
        let in_c = on(4);
        missing = ids
            .iter()
            .filter(|id| !in_c.contains(*id))
            .cloned()
            .collect();
        if missing.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(missing.is_empty(), "not copied to zone c: {missing:?}");
    let (n1, n2, n4) = (on(0), on(1), on(3));
    for id in &ids {
        assert!(
            n1.contains(id) != n2.contains(id),
            "{id}: exactly one copy in zone a"
        );
        assert!(!n4.contains(id), "{id}: nothing on the node without a zone");
    }
}
