//! The metrics ports of the real binaries: who may scrape, what they serve,
//! and that the counters move by exactly what a real backup did (the
//! snapshot's own figures, as the node committed it).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use fabric_integration_tests::{
    Fabric, parse_openmetrics, pki, pseudo_random, scrape, snapshots_on,
};
use fabric_trust::{Expect, Role};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const ON_A_FREE_PORT: [&str; 2] = ["--metrics-listen", "127.0.0.1:0"];

/// The samples of the metrics port at `address`, scraped as `operator/test`.
fn samples(address: &str, expect: Expect) -> BTreeMap<String, f64> {
    let scraped = scrape(
        address,
        &pki().operator_transport(),
        expect,
        None,
        "/metrics",
    );
    assert_eq!(scraped.status, 200, "{scraped:?}");
    assert_eq!(scraped.content_type, OPENMETRICS);
    parse_openmetrics(&scraped.body)
}

/// The value of `series`, 0 when the text does not have it (a family
/// with no sample yet).
fn value(samples: &BTreeMap<String, f64>, series: &str) -> u64 {
    samples.get(series).copied().unwrap_or(0.0) as u64
}

fn push_job(source: &std::path::Path) -> String {
    format!(
        "[job.web]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1\"\ninterval = \"24h\"\n",
        source.display()
    )
}

#[test]
fn counters_move_by_what_a_backup_did() {
    let fabric = Fabric::start_with_agent(1, &ON_A_FREE_PORT, &ON_A_FREE_PORT, &ON_A_FREE_PORT);
    let node = fabric.nodes[0].metrics_address.clone().unwrap();
    let agent = fabric.agent.metrics_address.clone().unwrap();
    let coordinator = fabric.coordinator.metrics_address.clone().unwrap();

    // Before any backup: nothing received, stored or sent.
    let before = samples(&node, Expect::AnyNode);
    assert_eq!(value(&before, "fabric_node_received_bytes_total"), 0);
    assert_eq!(value(&before, "fabric_node_stored_chunks_total"), 0);
    assert_eq!(value(&before, "fabric_node_active_uploads"), 0);
    assert!(before.contains_key("fabric_node_free_bytes"), "{before:?}");
    assert!(
        !before
            .keys()
            .any(|series| series.starts_with("fabric_agent_"))
    );

    // A file twice: the second copy is deduplicated within the snapshot.
    let source = fabric.dir.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    let data = pseudo_random(3 * 1024 * 1024, 7);
    std::fs::write(source.join("a.bin"), &data).unwrap();
    std::fs::write(source.join("b.bin"), &data).unwrap();
    std::fs::write(source.join("small.txt"), b"hello metrics\n").unwrap();

    let runs = fabric.submit(&push_job(&source), &[]);
    assert_eq!(fabric.wait_run(&runs[0])["state"], "done");
    let first = snapshots_on(&fabric.nodes[0].address);
    assert_eq!(first.len(), 1);
    let stats = first[0].stats.unwrap();
    assert_eq!(stats.files, 3);
    assert_eq!(stats.total_bytes, 2 * data.len() as u64 + 14);

    let node_after = samples(&node, Expect::AnyNode);
    let agent_after = samples(&agent, Expect::AnyNode);
    // The node: what it stored is what the snapshot says its upload added.
    assert_eq!(
        value(&node_after, "fabric_node_stored_chunks_total"),
        stats.new_chunks
    );
    assert_eq!(
        value(&node_after, "fabric_node_stored_bytes_total"),
        stats.stored_bytes
    );
    assert_eq!(
        value(&node_after, "fabric_node_deduplicated_bytes_total"),
        stats.total_bytes - stats.new_bytes
    );
    // b.bin is a.bin again: all of it deduplicated, less the directory
    // listings the upload stored as new chunks.
    assert!(
        value(&node_after, "fabric_node_deduplicated_bytes_total") >= data.len() as u64 - 4096,
        "{stats:?}"
    );
    assert_eq!(
        value(&node_after, "fabric_node_committed_snapshots_total"),
        1
    );
    assert_eq!(
        value(
            &node_after,
            "fabric_node_upload_duration_seconds_count{result=\"ok\"}"
        ),
        1
    );
    assert_eq!(value(&node_after, "fabric_node_active_uploads"), 0);
    assert!(value(&node_after, "fabric_node_store_packs") >= 1);
    assert!(value(&node_after, "fabric_node_store_bytes") >= stats.stored_bytes);
    // The agent sent exactly what the node received, and read what the
    // snapshot says it read.
    let received = value(&node_after, "fabric_node_received_bytes_total");
    assert!(received > 0);
    assert_eq!(
        value(&agent_after, "fabric_agent_sent_bytes_total"),
        received
    );
    assert_eq!(value(&agent_after, "fabric_agent_files_total"), stats.files);
    assert_eq!(
        value(&agent_after, "fabric_agent_read_bytes_total"),
        stats.bytes_read
    );
    assert_eq!(
        value(
            &agent_after,
            "fabric_agent_active_backups{fabric_job=\"web\"}"
        ),
        0
    );
    assert!(
        !agent_after
            .keys()
            .any(|series| series.starts_with("fabric_node_"))
    );

    // Again, unchanged: nothing new is stored, all of it deduplicated.
    let runs = fabric.submit(&push_job(&source), &[]);
    assert_eq!(fabric.wait_run(&runs[0])["state"], "done");
    let mut both = snapshots_on(&fabric.nodes[0].address);
    both.retain(|snapshot| snapshot.id != first[0].id);
    let second = both[0].stats.unwrap();
    let node_again = samples(&node, Expect::AnyNode);
    assert_eq!(
        value(&node_again, "fabric_node_stored_chunks_total"),
        stats.new_chunks + second.new_chunks
    );
    assert_eq!(
        value(&node_again, "fabric_node_deduplicated_bytes_total"),
        (stats.total_bytes - stats.new_bytes) + (second.total_bytes - second.new_bytes)
    );
    assert_eq!(
        value(&node_again, "fabric_node_committed_snapshots_total"),
        2
    );
    assert_eq!(
        value(
            &node_again,
            "fabric_node_upload_duration_seconds_count{result=\"ok\"}"
        ),
        2
    );

    // The coordinator: two runs of web done, both nodes online, nothing
    // queued, the job's verdict as `check` gives it, its newest good
    // snapshot known.
    let coordinator_samples = samples(&coordinator, Expect::Coordinator);
    assert_eq!(
        value(
            &coordinator_samples,
            "fabric_coordinator_runs_finished_total{fabric_job=\"web\",state=\"done\"}"
        ),
        2
    );
    assert_eq!(
        value(
            &coordinator_samples,
            "fabric_coordinator_run_duration_seconds_count{fabric_job=\"web\"}"
        ),
        2
    );
    assert_eq!(
        value(
            &coordinator_samples,
            "fabric_coordinator_nodes{state=\"online\"}"
        ),
        2
    );
    assert_eq!(
        value(
            &coordinator_samples,
            "fabric_coordinator_nodes{state=\"lost\"}"
        ),
        0
    );
    assert_eq!(
        value(&coordinator_samples, "fabric_coordinator_queue_depth"),
        0
    );
    let check = fabric.json(&["check"]);
    let verdict = check["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|job| job["job"] == "web")
        .unwrap()["status"]
        .as_str()
        .unwrap()
        .to_owned();
    let code = ["OK", "WARNING", "CRITICAL", "UNKNOWN"]
        .iter()
        .position(|word| *word == verdict)
        .unwrap() as u64;
    assert_eq!(
        value(
            &coordinator_samples,
            "fabric_coordinator_job_check_status{fabric_job=\"web\"}"
        ),
        code
    );
    assert!(
        coordinator_samples
            .contains_key("fabric_coordinator_job_seconds_since_good_snapshot{fabric_job=\"web\"}"),
        "{coordinator_samples:?}"
    );
    assert_eq!(
        value(
            &coordinator_samples,
            "fabric_coordinator_under_replicated_copies{fabric_job=\"web\"}"
        ),
        0
    );
    // No label names a run or a snapshot.
    for series in coordinator_samples.keys().chain(node_again.keys()) {
        assert!(
            !series.contains(&first[0].id) && !series.contains(&runs[0]),
            "{series}"
        );
    }
}

#[test]
fn only_operators_and_monitors_may_scrape() {
    let fabric = Fabric::start_with(1, &ON_A_FREE_PORT, &ON_A_FREE_PORT);
    let node = fabric.nodes[0].metrics_address.clone().unwrap();
    let coordinator = fabric.coordinator.metrics_address.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let anonymous = pki().transport(None, dir.path());
    let monitor = pki().transport(Some((Role::Monitor, "prometheus")), dir.path());
    let client = pki().transport(Some((Role::Client, "web1")), dir.path());
    let node_identity = pki().transport(Some((Role::Node, "n9")), dir.path());

    // No credentials: 401, naming the roles.
    let refused = scrape(&node, &anonymous, Expect::AnyNode, None, "/metrics");
    assert_eq!(refused.status, 401, "{refused:?}");
    assert_eq!(
        refused.body,
        "no client certificate or token: /metrics needs role operator or monitor\n"
    );
    // Another role: 403.
    let refused = scrape(&node, &node_identity, Expect::AnyNode, None, "/metrics");
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(
        refused.body,
        "node/n9 may not read /metrics: it needs role operator or monitor\n"
    );
    let refused = scrape(&coordinator, &client, Expect::Coordinator, None, "/metrics");
    assert_eq!(refused.status, 403, "{refused:?}");
    // A monitor's certificate: served.
    let served = scrape(&node, &monitor, Expect::AnyNode, None, "/metrics");
    assert_eq!(served.status, 200, "{served:?}");
    assert_eq!(served.content_type, OPENMETRICS);
    // Any other path: 404.
    let missing = scrape(&node, &monitor, Expect::AnyNode, None, "/other");
    assert_eq!(missing.status, 404, "{missing:?}");

    // Tokens: the coordinator takes a monitor's, refuses a client's with
    // 403 and a wrong one with 401; a node takes none.
    let made = fabric.json(&["token", "create", "--role", "monitor", "--name", "grafana"]);
    let token = made["token"].as_str().unwrap().to_owned();
    let served = scrape(
        &coordinator,
        &anonymous,
        Expect::Coordinator,
        Some(&token),
        "/metrics",
    );
    assert_eq!(served.status, 200, "{served:?}");
    assert!(
        served.body.contains("fabric_coordinator_nodes"),
        "{served:?}"
    );
    let client_token =
        fabric.json(&["token", "create", "--role", "client", "--name", "web1"])["token"]
            .as_str()
            .unwrap()
            .to_owned();
    let refused = scrape(
        &coordinator,
        &anonymous,
        Expect::Coordinator,
        Some(&client_token),
        "/metrics",
    );
    assert_eq!(refused.status, 403, "{refused:?}");
    let refused = scrape(
        &coordinator,
        &anonymous,
        Expect::Coordinator,
        Some(
            "fabric_0123456789abcdef_0000000000000000000000000000000000000000000000000000000000000000",
        ),
        "/metrics",
    );
    assert_eq!(refused.status, 401, "{refused:?}");
    let refused = scrape(&node, &anonymous, Expect::AnyNode, Some(&token), "/metrics");
    assert_eq!(refused.status, 401, "{refused:?}");
    assert!(refused.body.contains("not tokens"), "{refused:?}");
}
