//! The fabric left alone, with real processes on loopback: scheduled runs,
//! retention, GC under leases while backups upload, and pruning toward a
//! node's free-space target, all started by the coordinator, none by the
//! test; then every snapshot kept restores identical.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use fabric_integration_tests::{Fabric, pseudo_random, snapshots_on};

/// The changing file's size: each version is new data, so each removed
/// snapshot leaves garbage behind.
const VERSION_BYTES: usize = 200_000;

/// Version `k` of the changing file: its number, then bytes derived from it,
/// so any restored copy can be checked without knowing which it is.
fn version(k: u64) -> Vec<u8> {
    let mut bytes = format!("{k:016}").into_bytes();
    bytes.extend(pseudo_random(VERSION_BYTES, 7_000 + k));
    bytes
}

/// Replace `dir/current` with version `k`, atomically (a backup reads the
/// old version or the new one, whole).
fn write_version(dir: &Path, k: u64) {
    let temporary = dir.join(".current.tmp");
    std::fs::write(&temporary, version(k)).unwrap();
    std::fs::rename(&temporary, dir.join("current")).unwrap();
}

/// A restored `current` is one whole version.
fn assert_a_version(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let k: u64 = std::str::from_utf8(&bytes[..16]).unwrap().parse().unwrap();
    assert!(
        bytes == version(k),
        "{} is not version {k} whole",
        path.display()
    );
}

fn held_ids(address: &str, job: &str) -> Vec<String> {
    let mut ids: Vec<String> = snapshots_on(address)
        .into_iter()
        .filter(|snapshot| snapshot.job == job)
        .map(|snapshot| snapshot.id)
        .collect();
    ids.sort();
    ids
}

/// Restores snapshot `id` under `fabric.dir/restored-<id>` and checks it:
/// the steady file as the source has it, the changing one a whole version.
fn restore_and_check(fabric: &Fabric, id: &str, source: &Path) {
    let target = fabric.dir.path().join(format!("restored-{id}"));
    let inside = source.to_str().unwrap().trim_start_matches('/').to_owned();
    let restored = fabric.ctl(&["restore", id, &inside, "--to", target.to_str().unwrap()]);
    assert!(restored.status.success(), "{restored:?}");
    assert_eq!(
        std::fs::read(target.join("steady")).unwrap(),
        std::fs::read(source.join("steady")).unwrap()
    );
    assert_a_version(&target.join("current"));
}

/// Starts a thread that replaces `source/current` with a new version
/// every 300 ms until `stop`, as a live system changes its files.
fn keep_changing(source: &Path, stop: &Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let versions = AtomicU64::new(1);
    let stop = stop.clone();
    let source = source.to_owned();
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            write_version(&source, versions.fetch_add(1, Ordering::SeqCst));
            std::thread::sleep(Duration::from_millis(300));
        }
    })
}

fn ended(fabric: &Fabric, job: &str) -> Vec<serde_json::Value> {
    fabric
        .runs_of(job)
        .into_iter()
        .filter(|run| matches!(run["state"].as_str(), Some("done" | "failed" | "cancelled")))
        .collect()
}

/// Waits (bounded) until `job` has no run in progress, its catalogue
/// holds `kept` snapshots and no node waits for a GC after deletions.
fn settle(fabric: &Fabric, job: &str, kept: usize) {
    for _ in 0..600 {
        let active = fabric.runs_of(job).len() != ended(fabric, job).len();
        let catalogue = fabric.json(&["status", "--job", job]);
        let wanted = fabric
            .json(&["node", "list"])
            .as_array()
            .unwrap()
            .iter()
            .any(|node| node["gc_wanted"] == true);
        if !active && !wanted && catalogue.as_array().unwrap().len() == kept {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("job {job}: retention and GC did not settle on {kept} snapshots");
}

/// The newest `count` good snapshots of `job` are exactly what the
/// catalogue and every node hold, each node collected by itself and
/// verifies clean, and each snapshot restores identical.
fn assert_kept_newest(fabric: &Fabric, job: &str, count: usize, source: &Path) {
    let mut newest: Vec<String> = fabric
        .runs_of(job)
        .iter()
        .filter(|run| run["state"] == "done")
        .take(count)
        .map(|run| run["copies"][0]["snapshot_id"].as_str().unwrap().to_owned())
        .collect();
    newest.sort();
    let mut listed: Vec<String> = fabric
        .json(&["status", "--job", job])
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["id"].as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    assert_eq!(listed, newest, "the catalogue keeps the {count} newest");
    for node in &fabric.nodes {
        assert_eq!(held_ids(&node.address, job), newest, "{}", node.address);
    }
    for node in ["n1", "n2"] {
        let row = fabric.node_row(node);
        assert!(!row["last_gc"].as_str().unwrap().is_empty(), "{row:#}");
        assert_eq!(row["last_gc_error"], "", "{row:#}");
        let verified = fabric.ctl(&["verify", "--node", node]);
        assert!(verified.status.success(), "{verified:?}");
    }
    for id in &newest {
        restore_and_check(fabric, id, source);
    }
}

fn changing_source(fabric: &Fabric) -> std::path::PathBuf {
    let source = fabric.dir.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("steady"), pseudo_random(300_000, 1)).unwrap();
    write_version(&source, 0);
    source
}

/// A GC window (UTC) that opens two hours from now: the coordinator
/// collects by itself only then, so the test's own collections are the ones
/// that find the garbage.
fn window_not_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let minute_of_day = (now / 60) % (24 * 60);
    let at = |minutes: u64| {
        let minutes = (minute_of_day + minutes) % (24 * 60);
        format!("{:02}:{:02}", minutes / 60, minutes % 60)
    };
    format!("{}-{}", at(120), at(180))
}

/// Waits (bounded) until a copy of `run` is running; returns its node, or
/// None when the run ended first.
fn wait_copy_sending(fabric: &Fabric, run: &str) -> Option<String> {
    for _ in 0..600 {
        let shown = fabric.json(&["run", "show", run]);
        if matches!(
            shown["state"].as_str(),
            Some("done" | "failed" | "cancelled")
        ) {
            return None;
        }
        let sending = shown["copies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|copy| copy["state"] == "running");
        if let Some(copy) = sending {
            return Some(copy["node"].as_str().unwrap().to_owned());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no copy of run {run} started sending");
}

#[test]
fn backups_upload_while_gc_leases_collect_and_every_kept_snapshot_restores_identical() {
    // Nodes without a grace of their own; a lease spares exactly the runs
    // in flight (no clock margin on one machine); the coordinator's own
    // collections wait for a window hours away.
    let window = window_not_now();
    let fabric = Fabric::start_with(
        2,
        &["--gc-window", &window, "--gc-clock-margin", "0s"],
        &["--gc-grace-s", "0"],
    );
    let source = changing_source(&fabric);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = keep_changing(&source, &stop);
    // Slow uploads (about three seconds each), so that a GC fits in one.
    let jobs = format!(
        "[job.busy]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\n\
         dest = \"n1 n2\"\nkeep_last = 2\nbandwidth_limit = \"64KiB\"\n",
        source.display()
    );
    // (runs that a GC overlapped, of those the GCs that swept garbage)
    let mut overlapped = 0;
    let mut swept_during_upload = 0;
    for _ in 0..6 {
        let runs = fabric.submit(&jobs, &[]);
        if let Some(node) = wait_copy_sending(&fabric, &runs[0]) {
            // Retention removed older snapshots after earlier runs: their
            // chunks are garbage, swept now while this run uploads.
            let collected = fabric.json(&["gc", "--node", &node]);
            assert_eq!(collected[0]["node"], node.as_str(), "{collected}");
            let shown = fabric.json(&["run", "show", &runs[0]]);
            if !matches!(
                shown["state"].as_str(),
                Some("done" | "failed" | "cancelled")
            ) {
                overlapped += 1;
                if collected[0]["swept_chunks"].as_u64().unwrap() > 0 {
                    swept_during_upload += 1;
                }
            }
        }
        let run = fabric.wait_run(&runs[0]);
        assert_eq!(
            run["state"], "done",
            "a run succeeds while GC runs: {run:#}"
        );
    }
    eprintln!(
        "GC during an upload: {overlapped} of 6 runs, sweeping garbage in {swept_during_upload}"
    );
    assert!(overlapped > 0, "no GC ran during an upload");
    assert!(
        swept_during_upload > 0,
        "no GC during an upload swept anything"
    );
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    // What the last deletions left: collected on demand, no run in flight
    // (the node's own grace, 0, applies).
    for node in ["n1", "n2"] {
        let collected = fabric.json(&["gc", "--node", node]);
        assert_eq!(collected[0]["grace_s"], 0, "{collected}");
    }
    settle(&fabric, "busy", 2);
    assert_kept_newest(&fabric, "busy", 2, &source);
}

#[test]
fn a_fabric_left_alone_runs_forgets_and_collects_by_itself() {
    let fabric = Fabric::start_with(2, &["--gc-every", "1s"], &["--gc-grace-s", "0"]);
    let source = changing_source(&fabric);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = keep_changing(&source, &stop);
    // The shortest interval a schedule takes: three runs within about
    // three minutes.
    let jobs = format!(
        "[job.alone]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\n\
         dest = \"n1 n2\"\nschedule = {{ often = {{ interval = \"1m\", keep = 2 }} }}\n",
        source.display()
    );
    let file = fabric.dir.path().join("jobs.toml");
    std::fs::write(&file, jobs).unwrap();
    // Stored, not run: the scheduler starts every run from here on.
    let submitted = fabric.ctl(&["job", "submit", "-f", file.to_str().unwrap(), "--no-run"]);
    assert!(submitted.status.success(), "{submitted:?}");
    let mut runs = Vec::new();
    for _ in 0..2400 {
        runs = ended(&fabric, "alone");
        if runs.len() >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(runs.len() >= 3, "only {} scheduled runs ended", runs.len());
    for run in &runs {
        assert_eq!(run["state"], "done", "{run:#}");
    }
    let check = fabric.ctl(&["check", "alone"]);
    assert_eq!(check.status.code(), Some(0), "{check:?}");
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let paused = fabric.ctl(&["job", "pause", "alone"]);
    assert!(paused.status.success(), "{paused:?}");
    settle(&fabric, "alone", 2);
    assert_kept_newest(&fabric, "alone", 2, &source);
}

#[test]
fn a_node_under_its_free_space_target_is_pruned_down_to_each_jobs_newest() {
    // n1 asks for more free space than any disk has: pruning goes as far
    // as it may, and says why it stops.
    let mut fabric = Fabric::start(0);
    fabric.nodes.push(Fabric::start_node_with(
        &fabric.dir,
        &fabric.coordinator.address,
        1,
        &[
            "--gc-grace-s",
            "0",
            "--target-free-bytes",
            "1000000000000000000",
        ],
    ));
    fabric.wait_online(2);
    let source = fabric.dir.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("steady"), pseudo_random(300_000, 2)).unwrap();
    let jobs = format!(
        "[job.full]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1\"\n",
        source.display()
    );
    let mut ids = Vec::new();
    for round in 0..3u64 {
        write_version(&source, round);
        let runs = fabric.submit(&jobs, &[]);
        let run = fabric.wait_run(&runs[0]);
        assert_eq!(run["state"], "done", "{run:#}");
        ids.push(run["copies"][0]["snapshot_id"].as_str().unwrap().to_owned());
    }
    let newest = ids.last().unwrap().clone();
    let mut row = serde_json::Value::Null;
    for _ in 0..600 {
        row = fabric.node_row("n1");
        let held = held_ids(&fabric.nodes[0].address, "full");
        if held == [newest.clone()] && row["prune_blocked"].as_str().unwrap().contains("newest") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        held_ids(&fabric.nodes[0].address, "full"),
        std::slice::from_ref(&newest)
    );
    let blocked = row["prune_blocked"].as_str().unwrap();
    assert!(
        blocked.contains("target_free") && blocked.contains("newest"),
        "{row:#}"
    );
    // Each prune was followed by a collection.
    assert!(!row["last_gc"].as_str().unwrap().is_empty(), "{row:#}");
    restore_and_check(&fabric, &newest, &source);
}
