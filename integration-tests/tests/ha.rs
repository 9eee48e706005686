//! The highly available coordinator on a real etcd (Debian's
//! `etcd-server`, installed by the test when missing): the etcd engine
//! passes the state's conformance suite and refuses writes once its fence
//! is gone; three real coordinators elect one leader, followers send
//! callers to it, and SIGKILLing the leader during scheduled runs,
//! repeatedly, loses no run and runs none twice; etcd restarted under a
//! running fabric changes nothing; a leader paused past its lease (a
//! partition from etcd, as far as etcd can tell) stops acting when it
//! resumes.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use fabric_coordinator::etcd::Etcd;
use fabric_coordinator::etcd::api::etcdserverpb::{
    LeaseGrantRequest, LeaseRevokeRequest, PutRequest,
};
use fabric_coordinator::state::etcd::{EtcdEngine, Fence};
use fabric_coordinator::state::{StateEngine, StateError, Store, Tree, conformance};
use fabric_integration_tests::etcd::{EtcdServer, free_port};
use fabric_integration_tests::{Fabric, Server, fabricctl, fabricctl_json, signal};
use tonic_health::pb::health_check_response::ServingStatus;

fn etcd_or_skip() -> Option<EtcdServer> {
    let server = EtcdServer::start();
    if server.is_none() {
        eprintln!("SKIPPED: etcd-server is not installed and could not be installed");
    }
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_engine_passes_the_conformance_suite_and_keeps_what_it_flushed() {
    let Some(server) = etcd_or_skip() else {
        return;
    };
    let etcd = Etcd::connect(std::slice::from_ref(&server.client_url), None).unwrap();
    let engine = EtcdEngine::load(etcd.clone(), "conformance", None)
        .await
        .unwrap();
    let store = Store::new(engine.clone());
    conformance::run_all(&store, engine.as_ref()).await;

    // What was flushed is what a new leader loads: every key, byte for byte.
    let reloaded = EtcdEngine::load(etcd.clone(), "conformance", None)
        .await
        .unwrap();
    assert_eq!(reloaded.key_count(), engine.key_count());
    let again = Store::new(reloaded);
    assert_eq!(again.catalog().unwrap(), store.catalog().unwrap());
    assert_eq!(
        again.events("0001aa", 0).unwrap(),
        store.events("0001aa", 0).unwrap()
    );
    assert_eq!(again.nodes().unwrap(), store.nodes().unwrap());
    // Another prefix is another fabric.
    let other = EtcdEngine::load(etcd, "conformance-other", None)
        .await
        .unwrap();
    assert_eq!(other.key_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_fenced_on_a_leader_key_are_refused_once_its_lease_is_gone() {
    let Some(server) = etcd_or_skip() else {
        return;
    };
    let etcd = Etcd::connect(std::slice::from_ref(&server.client_url), None).unwrap();
    let lease = etcd
        .lease
        .clone()
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    let key = b"fenced/leader/1".to_vec();
    let put = etcd
        .kv
        .clone()
        .put(PutRequest {
            key: key.clone(),
            value: b"https://127.0.0.1:1".to_vec(),
            lease,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let fence = Fence {
        key,
        create_revision: put.header.unwrap().revision,
    };
    let engine = EtcdEngine::load(etcd.clone(), "fenced", Some(fence))
        .await
        .unwrap();
    engine.insert(Tree::Jobs, b"before", b"1".to_vec()).unwrap();
    engine.flush().await.unwrap();

    etcd.lease
        .clone()
        .lease_revoke(LeaseRevokeRequest { id: lease })
        .await
        .unwrap();
    engine.insert(Tree::Jobs, b"after", b"2".to_vec()).unwrap();
    let refused = engine.flush().await.unwrap_err();
    assert!(matches!(refused, StateError::Fenced { .. }), "{refused}");
    assert!(
        refused.to_string().contains("no longer the leader"),
        "{refused}"
    );
    assert!(*engine.deposed().borrow());
    // And for good: nothing more is sent.
    assert!(matches!(
        engine.flush().await.unwrap_err(),
        StateError::Fenced { .. }
    ));
    let loaded = EtcdEngine::load(etcd, "fenced", None).await.unwrap();
    assert!(loaded.get(Tree::Jobs, b"before").unwrap().is_some());
    assert!(loaded.get(Tree::Jobs, b"after").unwrap().is_none());
}

/// Three coordinators on etcd, on fixed loopback ports so that a restarted
/// one keeps its address.
struct Coordinators {
    etcd_url: String,
    prefix: String,
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    running: Vec<Option<Server>>,
}

impl Coordinators {
    fn start(etcd_url: &str, prefix: &str) -> Self {
        let mut coordinators = Self {
            etcd_url: etcd_url.to_owned(),
            prefix: prefix.to_owned(),
            dir: tempfile::tempdir().unwrap(),
            ports: (0..3).map(|_| free_port()).collect(),
            running: Vec::new(),
        };
        for index in 0..3 {
            let server = coordinators.spawn(index);
            coordinators.running.push(Some(server));
        }
        coordinators
    }

    fn spawn(&self, index: usize) -> Server {
        let listen = format!("127.0.0.1:{}", self.ports[index]);
        let data = self.dir.path().join(format!("unused-{index}"));
        Server::start(
            "fabric-coordinator",
            &[
                "--listen",
                &listen,
                "--data-dir",
                data.to_str().unwrap(),
                "--state",
                "etcd",
                "--etcd-endpoints",
                &self.etcd_url,
                "--etcd-prefix",
                &self.prefix,
                "--leader-lease",
                "2s",
                "--heartbeat-interval",
                "200ms",
                "--lost-after-missed-heartbeats",
                "5",
                "--health-listen",
                "127.0.0.1:0",
            ],
            &[],
        )
    }

    /// Every coordinator's address, comma-separated, as nodes and fabricctl
    /// are given them.
    fn addresses(&self) -> String {
        self.ports
            .iter()
            .map(|port| format!("https://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the one coordinator whose health says it leads (the
    /// coordinator service SERVING), waiting up to 20 s for exactly one.
    fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let leading: Vec<usize> = (0..self.running.len())
                .filter(|index| {
                    self.running[*index]
                        .as_ref()
                        .and_then(|server| server.health_address.clone())
                        .is_some_and(|health| coordinator_serving(&health))
                })
                .collect();
            if leading.len() == 1 {
                return leading[0];
            }
            assert!(
                Instant::now() < deadline,
                "no single leader within 20 s: {leading:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self, index: usize) {
        if let Some(mut server) = self.running[index].take() {
            server.child.kill().unwrap();
            server.child.wait().unwrap();
        }
    }

    fn restart(&mut self, index: usize) {
        self.kill(index);
        let server = self.spawn(index);
        self.running[index] = Some(server);
    }
}

/// Whether the plaintext health port at `health` says the coordinator's
/// service is SERVING (only the leader's is).
fn coordinator_serving(health: &str) -> bool {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let Ok(channel) = tonic::transport::Channel::from_shared(health.to_owned())
            .unwrap()
            .connect()
            .await
        else {
            return false;
        };
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: "fabric.v1.Coordinator".into(),
            })
            .await
            .is_ok_and(|reply| reply.into_inner().status() == ServingStatus::Serving)
    })
}

fn ctl_json(coordinators: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--coordinator", coordinators];
    all.extend_from_slice(args);
    fabricctl_json(&all)
}

/// Every run of the fabric (newest first).
fn all_runs(coordinators: &str) -> Vec<serde_json::Value> {
    ctl_json(coordinators, &["run", "list", "--limit", "1000"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn wait_for(what: &str, seconds: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {seconds} s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn killing_the_leader_during_scheduled_runs_loses_no_run_and_runs_none_twice() {
    let Some(mut etcd) = etcd_or_skip() else {
        return;
    };
    let mut coordinators = Coordinators::start(&etcd.client_url, "ha");
    let first_leader = coordinators.leader();
    let list = coordinators.addresses();

    // A follower sends a caller to the leader.
    let follower = (first_leader + 1) % 3;
    let follower_address = format!("https://127.0.0.1:{}", coordinators.ports[follower]);
    let refused = fabricctl(&["--coordinator", &follower_address, "node", "list"]);
    let said = String::from_utf8_lossy(&refused.stderr).into_owned()
        + &String::from_utf8_lossy(&refused.stdout);
    let leader_address = format!("https://127.0.0.1:{}", coordinators.ports[first_leader]);
    assert!(
        refused.status.success() || said.contains(&leader_address),
        "a follower names the leader: {said}"
    );

    let dir = tempfile::tempdir().unwrap();
    let _nodes: Vec<Server> = (1..=2)
        .map(|index| Fabric::start_node_with(&dir, &list, index, &[]))
        .collect();
    let _agent = Fabric::start_agent(&dir, &list, &[]);
    wait_for("3 nodes online", 30, || {
        ctl_json(&list, &["node", "list"])
            .as_array()
            .is_some_and(|nodes| nodes.iter().filter(|n| n["state"] == "online").count() == 3)
    });
    let source = dir.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    for index in 0..3 {
        std::fs::write(
            source.join(format!("file-{index}")),
            fabric_integration_tests::pseudo_random(256 * 1024, index),
        )
        .unwrap();
    }
    // 24 jobs on a one-minute schedule: their slots spread over the minute,
    // so a run starts every few seconds.
    let jobs = dir.path().join("jobs.toml");
    let names: Vec<String> = (0..24).map(|index| format!("job{index:02}")).collect();
    let mut text = String::new();
    for job in &names {
        text.push_str(&format!(
            "[job.{job}]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1 n2\"\nschedule = {{ often = {{ interval = \"1m\", keep = 5 }} }}\n\n",
            source.display()
        ));
    }
    std::fs::write(&jobs, text).unwrap();
    ctl_json(
        &list,
        &["job", "submit", "-f", jobs.to_str().unwrap(), "--no-run"],
    );

    // Kill the leader three times while the schedule runs, each time once
    // a new run has started under it, and bring the killed one back as a
    // follower.
    let mut leaders = vec![first_leader];
    for _ in 0..3 {
        let before = all_runs(&list).len();
        wait_for("a new scheduled run", 70, || all_runs(&list).len() > before);
        let leader = coordinators.leader();
        coordinators.kill(leader);
        let next = coordinators.leader();
        assert_ne!(next, leader);
        leaders.push(next);
        coordinators.restart(leader);
    }

    // etcd restarted under the running fabric: it carries on.
    etcd.restart();
    let before = all_runs(&list).len();
    wait_for("runs after etcd restarted", 60, || {
        all_runs(&list).len() > before + 2
    });

    // Stop scheduling and let every run end.
    for job in &names {
        fabricctl(&["--coordinator", &list, "job", "pause", job]);
    }
    wait_for("every run ended", 120, || {
        all_runs(&list)
            .iter()
            .all(|run| matches!(run["state"].as_str(), Some("done" | "failed" | "cancelled")))
    });
    let runs = all_runs(&list);
    assert!(runs.len() >= 6, "{} runs", runs.len());
    let not_done: Vec<_> = runs.iter().filter(|run| run["state"] != "done").collect();
    assert!(not_done.is_empty(), "every run is done: {not_done:#?}");

    // Each run's snapshot is in the catalogue on both nodes, and the
    // catalogue holds nothing else: no run ran twice, none was lost.
    let mut run_snapshots: Vec<String> = runs
        .iter()
        .map(|run| {
            let copies = run["copies"].as_array().unwrap();
            let ids: std::collections::BTreeSet<&str> = copies
                .iter()
                .map(|copy| copy["snapshot_id"].as_str().unwrap_or(""))
                .collect();
            assert_eq!(ids.len(), 1, "one snapshot id per run: {run:#}");
            ids.into_iter().next().unwrap().to_owned()
        })
        .collect();
    run_snapshots.sort();
    let catalog = ctl_json(&list, &["status"]);
    let mut catalogued: Vec<String> = Vec::new();
    for row in catalog.as_array().unwrap() {
        let id = row["id"].as_str().unwrap().to_owned();
        let mut nodes: Vec<&str> = row["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|node| node.as_str().unwrap())
            .collect();
        nodes.sort();
        assert_eq!(nodes, ["n1", "n2"], "{row:#}");
        catalogued.push(id);
    }
    catalogued.sort();
    assert_eq!(catalogued, run_snapshots);
    let ids: std::collections::BTreeSet<&str> =
        runs.iter().map(|run| run["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), runs.len(), "run ids are unique");
    eprintln!(
        "{} runs over leaders {leaders:?}, all done, each snapshot on n1 and n2",
        runs.len()
    );
}

#[test]
fn a_leader_paused_past_its_lease_stops_acting_when_it_resumes() {
    let Some(etcd) = etcd_or_skip() else {
        return;
    };
    let mut coordinators = Coordinators::start(&etcd.client_url, "paused");
    let leader = coordinators.leader();
    let pid = coordinators.running[leader].as_ref().unwrap().pid();
    signal(pid, rustix::process::Signal::STOP);
    // Its lease (2 s) expires in etcd; another coordinator wins.
    let deadline = Instant::now() + Duration::from_secs(20);
    let next = loop {
        let serving: Vec<usize> = (0..3)
            .filter(|index| *index != leader)
            .filter(|index| {
                coordinators.running[*index]
                    .as_ref()
                    .and_then(|server| server.health_address.clone())
                    .is_some_and(|health| coordinator_serving(&health))
            })
            .collect();
        if serving.len() == 1 {
            break serving[0];
        }
        assert!(
            Instant::now() < deadline,
            "no new leader while the old one is paused"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    signal(pid, rustix::process::Signal::CONT);
    // The old leader sees its lease is gone and exits rather than act.
    let server = coordinators.running[leader].as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the deposed leader still runs");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "a deposed leader exits with an error");
    assert_eq!(coordinators.leader(), next);
}
