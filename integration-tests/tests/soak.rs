//! Random node kills during backups, replayable by seed. The default run
//! uses a fixed seed (the same kills in the same order every time); another
//! sequence is one variable away:
//!
//! ```text
//! FABRIC_SOAK_SEED=1234 cargo test -p fabric-integration-tests --test soak -- --nocapture
//! FABRIC_SOAK_SEED=random cargo test -p fabric-integration-tests --test soak -- --nocapture
//! ```
//!
//! The seed is printed first and named in every failure.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use fabric_integration_tests::{Fabric, generate_tree, snapshots_on};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Node kills (each followed by a restart) in the sequence.
const KILLS: usize = 20;

/// The seed of the default run.
const DEFAULT_SEED: u64 = 20_261_206;

#[test]
fn random_node_kills_and_restarts_during_backups_lose_no_snapshot() {
    let seed: u64 = match std::env::var("FABRIC_SOAK_SEED") {
        Ok(text) if text == "random" => rand::random(),
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("FABRIC_SOAK_SEED={text:?} is not a number or \"random\"")),
        Err(_) => DEFAULT_SEED,
    };
    eprintln!("FABRIC_SOAK_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fabric = Fabric::start_with(
        3,
        &["--replace-after", "2s", "--replication-check-every", "1s"],
        &[],
    );
    let source = fabric.dir.path().join("source");
    generate_tree(&source, 40, 1024 * 1024);
    let jobs = format!(
        "[job.soak]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\nreplicas = 2\ncopy_retries = 1\ncopy_retry_min_sleep = \"1s\"\n",
        source.display()
    );
    let coordinator = fabric.coordinator.address.clone();
    let mut runs = Vec::new();
    for step in 0..KILLS {
        let victim = rng.random_range(0..3);
        fabric_integration_tests::signal(fabric.nodes[victim].pid(), rustix::process::Signal::KILL);
        runs.extend(fabric.submit(&jobs, &[]));
        std::thread::sleep(Duration::from_millis(rng.random_range(0..2000)));
        fabric.nodes[victim] = Fabric::start_node(&fabric.dir, &coordinator, victim + 1);
        let address = fabric.nodes[victim].address.clone();
        fabric.wait_node_at(&format!("n{}", victim + 1), &address);
        eprintln!("step {step}: killed and restarted n{}", victim + 1);
    }
    // Every run that ended done has its snapshot, at two copies, on
    // nodes that hold it.
    let mut kept = Vec::new();
    for id in &runs {
        let run = fabric.wait_run(id);
        if run["state"] == "done" {
            let snapshot = run["copies"]
                .as_array()
                .unwrap()
                .iter()
                .find_map(|copy| copy["snapshot_id"].as_str().filter(|id| !id.is_empty()))
                .unwrap_or_else(|| panic!("seed {seed}: a done run without a snapshot: {run:#}"))
                .to_owned();
            kept.push(snapshot);
        }
    }
    assert!(!kept.is_empty(), "seed {seed}: no run succeeded");
    let mut short = Vec::new();
    for _ in 0..1200 {
        let held: Vec<HashSet<String>> = fabric
            .nodes
            .iter()
            .map(|node| {
                snapshots_on(&node.address)
                    .into_iter()
                    .map(|snapshot| snapshot.id)
                    .collect()
            })
            .collect();
        short = kept
            .iter()
            .filter(|id| held.iter().filter(|node| node.contains(*id)).count() < 2)
            .cloned()
            .collect();
        if short.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        short.is_empty(),
        "seed {seed}: snapshots of done runs on fewer than two nodes: {short:?}"
    );
    eprintln!(
        "seed {seed}: {} of {} runs done, every snapshot on two nodes",
        kept.len(),
        runs.len()
    );
}
