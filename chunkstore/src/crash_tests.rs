//! Crash safety, proven by killing a real process: the test binary re-runs
//! itself as a child (the ignored test `crash_child`, selected by an
//! environment variable) that ingests, commits, deletes and collects garbage
//! in a loop, printing a line after each step; the parent SIGKILLs it after
//! a random number of steps, then opens the store and checks every committed
//! snapshot restores byte-identical and a full verify passes.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use rand::Rng;

use crate::chunker::Chunk;
use crate::gc::GcOptions;
use crate::sink::ChunkSink;
use crate::store::tests::{backup, file_content, restore, small_config};
use crate::store::{Store, StoreConfig};
use crate::verify::VerifyOptions;

const DIR_VAR: &str = "FABRIC_CHUNKSTORE_CRASH_DIR";
const MODE_VAR: &str = "FABRIC_CHUNKSTORE_CRASH_MODE";
const FILE_LEN: usize = 20_000;

fn config() -> StoreConfig {
    StoreConfig {
        pack_target_size: 16 * 1024,
        ..small_config()
    }
}

/// The files of the snapshot named `seed-<seed>-<count>`.
fn files_of(seed: u64, count: usize) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|i| {
            (
                format!("f{i}"),
                file_content(FILE_LEN, seed.wrapping_add(i as u64)),
            )
        })
        .collect()
}

fn step(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "step {line}");
    let _ = out.flush();
}

/// The child's loop; runs until killed.
#[test]
#[ignore = "run only as the child process of the crash tests"]
fn crash_child() {
    let (Ok(dir), Ok(mode)) = (std::env::var(DIR_VAR), std::env::var(MODE_VAR)) else {
        return;
    };
    let store = Store::open_or_create(Path::new(&dir), config()).unwrap();
    step("open");
    let mut rng = rand::rng();
    loop {
        let seed: u64 = rng.random();
        let count = rng.random_range(1..4usize);
        // Unreferenced chunks through the sink path too: garbage a crash may tear.
        for i in 0..3 {
            store
                .put_chunk(Chunk::new(file_content(3000, seed ^ (i + 1))))
                .unwrap();
        }
        step("sink");
        let snapshot = backup(
            &store,
            &format!("seed-{seed}-{count}"),
            &files_of(seed, count),
        );
        step(&format!("committed {}", snapshot.id));
        if mode == "gc" {
            let snapshots = store.list_snapshots().unwrap();
            if snapshots.len() > 2 {
                store.delete_snapshot(&snapshots[0].id).unwrap();
                step("deleted");
            }
            store.gc(&GcOptions::immediate()).unwrap();
            step("gc");
        }
    }
}

/// Check the store after a kill; returns (snapshots, packs repaired at open).
fn check_store(dir: &Path) -> (usize, u64) {
    let store = Store::open(dir).unwrap();
    let snapshots = store.list_snapshots().unwrap();
    for snapshot in &snapshots {
        let mut parts = snapshot.name.split('-').skip(1);
        let seed: u64 = parts.next().unwrap().parse().unwrap();
        let count: usize = parts.next().unwrap().parse().unwrap();
        let restored = restore(&store, snapshot)
            .unwrap_or_else(|err| panic!("snapshot {} lost data: {err}", snapshot.name));
        assert!(
            restored == files_of(seed, count),
            "snapshot {} differs",
            snapshot.name
        );
    }
    let report = store.verify(&VerifyOptions::default()).unwrap();
    assert!(report.is_ok(), "{report:?}");
    // Verify read every index entry: none points at missing or torn bytes.
    assert_eq!(report.chunks_checked, store.stats().unwrap().chunks);
    (snapshots.len(), store.repaired_at_open())
}

#[test]
fn killed_at_random_points_during_ingest_and_gc_the_store_stays_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::rng();
    let mut kills = 0;
    let mut max_snapshots = 0;
    let mut repairs = 0;
    for round in 0..24 {
        let mode = if round % 2 == 0 { "ingest" } else { "gc" };
        let mut child = Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "store::crash_tests::crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_VAR, dir.path())
            .env(MODE_VAR, mode)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let steps = rng.random_range(1..20);
        let mut seen = 0;
        let reader = BufReader::new(child.stdout.take().unwrap());
        for line in reader.lines() {
            let line = line.unwrap();
            if line.starts_with("step ") {
                seen += 1;
                if seen >= steps {
                    break;
                }
            }
        }
        // SIGKILL, wherever the child is now.
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "the child stopped on its own (a panic in it?): {status:?}"
        );
        kills += 1;
        let (snapshots, repaired) = check_store(dir.path());
        max_snapshots = max_snapshots.max(snapshots);
        repairs += repaired;
    }
    assert_eq!(kills, 24);
    assert!(
        repairs > 0,
        "no kill ever left an unsealed pack: the test exercised nothing"
    );
    assert!(
        max_snapshots > 0,
        "no snapshot was ever committed before a kill"
    );
}
