//! How long pruning's plan takes for one node over a catalogue of N
//! snapshots (the engine plans once per pruning round, one snapshot per
//! round). Run: `cargo bench -p fabric-coordinator --bench prune`.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use fabric_coordinator::prune::{self, PruneRules};
use fabric_coordinator::retention::SnapshotInfo;

const DAY: i64 = 24 * 60 * 60 * 1000;

fn main() {
    let now = 1_800_000_000_000;
    for (jobs, per_job) in [(100, 100), (1_000, 100), (1_000, 365)] {
        let mut snapshots = Vec::new();
        for job in 0..jobs {
            for age in 0..per_job {
                snapshots.push(SnapshotInfo {
                    id: format!("{job:04}-{age:04}"),
                    job: format!("job-{job}"),
                    host: format!("host-{}", job % 50),
                    instance: String::new(),
                    end_time_ms: now - age * DAY,
                    tags: vec!["daily".to_owned()],
                    retain_until_ms: 0,
                });
            }
        }
        let on_node: HashSet<String> = snapshots.iter().map(|s| s.id.clone()).collect();
        let rules: BTreeMap<String, PruneRules> = (0..jobs)
            .map(|job| (format!("job-{job}"), PruneRules::default()))
            .collect();
        let failing = HashSet::new();
        let rounds = 5;
        let started = Instant::now();
        let mut order = 0;
        for _ in 0..rounds {
            order = prune::plan(&snapshots, &on_node, &rules, &failing, now)
                .order
                .len();
        }
        let each = started.elapsed() / rounds;
        println!(
            "prune::plan: {:>7} snapshots ({jobs} jobs x {per_job}): {:>8.1} ms a plan, {order} removable",
            snapshots.len(),
            each.as_secs_f64() * 1000.0
        );
    }
}
