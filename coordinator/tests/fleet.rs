//! The fleet simulator (`benches/fleet/simulator.rs`) in quick mode: 20
//! simulated nodes and 200 scheduled jobs against the real coordinator
//! binary, so the bench keeps working. Asserts what must happen (every due
//! assignment arrives, every finished run is in the catalogue at its
//! replica target, re-replication completes), never how fast.

#![allow(clippy::unwrap_used)]

#[path = "../benches/fleet/simulator.rs"]
mod simulator;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_simulated_fleet_gets_every_run_and_replicates_again_after_losing_nodes() {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_fabric-coordinator"));
    let report = simulator::run(binary, simulator::FleetConfig::quick()).await;
    assert!(report.due_slots > 0, "slots fell due: {report:?}");
    assert_eq!(report.due_missing, Vec::<String>::new(), "{report:?}");
    assert!(report.reported > 0, "runs finished: {report:?}");
    assert_eq!(report.reported_missing, Vec::<String>::new(), "{report:?}");
    assert_eq!(report.session_breaks, 0, "{report:?}");
    assert_eq!(report.unexpected, 0, "{report:?}");
    assert!(
        report.rereplicate_s.is_some(),
        "re-replication finished: {report:?}"
    );
    assert!(report.replicated > 0, "copies were made again: {report:?}");
}
