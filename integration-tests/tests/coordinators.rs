//! Nodes and `fabricctl` given several coordinator addresses: they work
//! through whichever answers. Here the list starts with an address where
//! nothing runs (a port bound, then closed) and ends with the one real
//! coordinator. A coordinator that does not lead and names the leader needs
//! several coordinators electing one through etcd; that is tested with
//! them, not here.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};

use fabric_integration_tests::{Fabric, binary, fabricctl, fabricctl_json, generate_tree};

/// `https://127.0.0.1:PORT` of a port the OS gave and that is closed again:
/// a coordinator that is down refuses connections there.
fn dead_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("https://127.0.0.1:{port}")
}

fn ctl_json(coordinators: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--coordinator", coordinators];
    all.extend_from_slice(args);
    fabricctl_json(&all)
}

#[test]
fn nodes_and_fabricctl_reach_the_coordinator_past_a_dead_address() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Fabric::start_coordinator(&dir.path().join("coordinator"), "127.0.0.1:0");
    let coordinators = format!("{},{}", dead_address(), coordinator.address);
    let n1 = Fabric::start_node(&dir, &coordinators, 1);
    let n2 = Fabric::start_node(&dir, &coordinators, 2);
    let agent = Fabric::start_agent(&dir, &coordinators, &[]);

    // Every node registered and keeps its session through the live address.
    let mut online = 0;
    for _ in 0..300 {
        let nodes = ctl_json(&coordinators, &["node", "list"]);
        online = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|node| node["state"] == "online")
            .count();
        if online == 3 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(online, 3, "n1, n2 and the agent come online");

    // A push to n1, then n1's copy to n2: n1 asks the coordinator (past the
    // dead address) where n2 is.
    let source = dir.path().join("source");
    generate_tree(&source, 20, 128 * 1024);
    let jobs = dir.path().join("jobs.toml");
    std::fs::write(
        &jobs,
        format!(
            "[job.listed]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1 n2\"\ncopy_retries = 0\n",
            source.display()
        ),
    )
    .unwrap();
    let runs = ctl_json(
        &coordinators,
        &["job", "submit", "-f", jobs.to_str().unwrap()],
    );
    let run_id = runs[0]["id"].as_str().unwrap().to_owned();
    // `run watch` streams from the coordinator until the run ends.
    let watch = fabricctl(&["--coordinator", &coordinators, "run", "watch", &run_id]);
    assert!(
        watch.status.success(),
        "{}",
        String::from_utf8_lossy(&watch.stderr)
    );
    let run = ctl_json(&coordinators, &["run", "show", &run_id]);
    assert_eq!(run["state"], "done", "{run:#}");
    let status = ctl_json(&coordinators, &["status", "--job", "listed"]);
    let mut nodes: Vec<&str> = status[0]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| node.as_str().unwrap())
        .collect();
    nodes.sort_unstable();
    assert_eq!(nodes, ["n1", "n2"], "{status:#}");

    // The other order works alike, and so does a TOML-style spacing.
    let reversed = format!("{} , {}", coordinator.address, dead_address());
    let jobs_listed = ctl_json(&reversed, &["job", "list"]);
    assert_eq!(jobs_listed[0]["name"], "listed", "{jobs_listed:#}");

    drop((n1, n2, agent, coordinator));
}

#[test]
fn when_no_coordinator_answers_fabricctl_names_every_address() {
    let first = dead_address();
    let second = dead_address();
    let list = format!("{first},{second}");
    let output = fabricctl(&["--coordinator", &list, "node", "list"]);
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains(&format!(
            "cannot reach any coordinator: {first}: connection refused; {second}: connection refused (is one running? see --coordinator)"
        )),
        "{text}"
    );
}

#[test]
fn a_bad_coordinator_list_is_refused_naming_it() {
    let output = fabricctl(&[
        "--coordinator",
        "https://127.0.0.1:7400,,https://127.0.0.1:7401",
        "node",
        "list",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains("--coordinator / FABRIC_COORDINATOR: coordinator addresses \"https://127.0.0.1:7400,,https://127.0.0.1:7401\": element 2 is empty"),
        "{text}"
    );

    // A node stops before it listens, naming the element.
    let dir = tempfile::tempdir().unwrap();
    let node = Command::new(binary("fabric-node"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.path().join("n1").to_str().unwrap(),
            "--node-id",
            "n1",
            "--insecure-plaintext",
            "--health-listen",
            "",
            "--metrics-listen",
            "",
            "--coordinator",
            "http://127.0.0.1:7400,ftp://127.0.0.1:21",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!node.status.success());
    let stdout = String::from_utf8_lossy(&node.stdout);
    assert!(!stdout.contains("listening on"), "{stdout}");
    let text = String::from_utf8_lossy(&node.stderr);
    assert!(
        text.contains("element 2 (\"ftp://127.0.0.1:21\") is not an address: scheme \"ftp\" is neither https nor http"),
        "{text}"
    );
}
