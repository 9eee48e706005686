//! The client's agent with real processes on loopback: what it evaluates on
//! the client (`!command` values), how it expands include patterns, the
//! shipped examples run as written but for their paths, and what a stopped
//! agent does with the scripts it runs.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use fabric_integration_tests::{Fabric, pki, signal, snapshots_on, workspace_root};
use fabric_proto::v1::coordinator_client::CoordinatorClient;
use fabric_proto::v1::{ListCatalogRequest, Snapshot};

/// The snapshots of `job` in the coordinator's catalogue, as records.
fn catalogue(fabric: &Fabric, job: &str) -> Vec<Snapshot> {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let channel = fabric_node::client::channel(
            &fabric_node::client::Peer::coordinator(&fabric.coordinator.address),
            &pki().operator_transport(),
        )
        .await
        .unwrap();
        CoordinatorClient::new(channel)
            .list_catalog(ListCatalogRequest {
                job: job.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries
            .into_iter()
            .filter_map(|entry| entry.snapshot)
            .collect()
    })
}

/// The names `fabricctl snapshot list -o json` shows for `job`.
fn listed_names(fabric: &Fabric, job: &str) -> Vec<String> {
    fabric
        .json(&["snapshot", "list", "--job", job])
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The paths below `inside` (relative to it) that snapshot `id` holds, as
/// a restore of it writes them.
fn restored_files(fabric: &Fabric, id: &str, inside: &Path, name: &str) -> Vec<String> {
    let target = fabric.dir.path().join(name);
    let inside = inside.to_str().unwrap().trim_start_matches('/').to_owned();
    let output = fabric.ctl(&["restore", id, &inside, "--to", target.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    let mut names: Vec<String> = std::fs::read_dir(&target)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Wait (bounded) for `path` to hold a pid.
fn pid_in(path: &Path) -> i32 {
    for _ in 0..600 {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} never held a pid", path.display());
}

/// Whether process `pid` is gone: no /proc entry, or a zombie only (its
/// parent may be gone too, and whoever adopted it reaps it in its time).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

fn wait_gone(pid: i32, what: &str) {
    for _ in 0..600 {
        if gone(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} (pid {pid}) is still running");
}

#[test]
fn a_master_host_command_runs_on_the_agent_and_its_output_names_the_snapshot() {
    let fabric = Fabric::start(1);
    let source = fabric.dir.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("data"), b"replicated rows").unwrap();
    let jobs = format!(
        "[job.replica]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\nmaster_host = \"!echo db-master-1\"\nmaster_instance = \"3306\"\ndest = \"n1\"\n",
        source.display()
    );
    let runs = fabric.submit(&jobs, &[]);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "done", "{run:#}");

    // As the node holding it lists it.
    let on_node = snapshots_on(&fabric.nodes[0].address);
    assert_eq!(on_node.len(), 1, "{on_node:?}");
    let snapshot = &on_node[0];
    assert_eq!(snapshot.master_host, "db-master-1");
    assert_eq!(snapshot.master_instance, "3306");
    assert_eq!(
        snapshot.name,
        fabric_proto::naming::snapshot_name(snapshot),
        "named with the evaluated values"
    );
    assert!(
        snapshot.name.contains("/client-host-db-master-1-3306-"),
        "{}",
        snapshot.name
    );

    // As the coordinator lists it: the same record, evaluated values included.
    let catalogued = catalogue(&fabric, "replica");
    assert_eq!(catalogued.len(), 1, "{catalogued:?}");
    assert_eq!(catalogued[0].id, snapshot.id);
    assert_eq!(catalogued[0].master_host, "db-master-1");
    assert_eq!(catalogued[0].master_instance, "3306");
    assert_eq!(catalogued[0].name, snapshot.name);
    assert_eq!(listed_names(&fabric, "replica"), [snapshot.name.as_str()]);
}

/// `coordinator/examples/sync.toml` as shipped, its machine-specific values
/// (client, scripts directory, MySQL's directory) pointed at this test's.
#[test]
fn the_shipped_sync_example_backs_up_the_binlogs_its_include_pattern_matches() {
    let scratch = tempfile::tempdir().unwrap();
    let scripts = scratch.path().join("scripts");
    let mysql = scratch.path().join("mysql");
    std::fs::create_dir_all(&scripts).unwrap();
    std::fs::create_dir_all(&mysql).unwrap();
    // The example's pre rotates the binlogs: here it writes a new one.
    let rotate = scripts.join("mysql_rotate_logs.sh");
    script(
        &rotate,
        &format!(
            "#!/bin/sh\nprintf rotated > {}/mysql-bin.000003\n",
            mysql.display()
        ),
    );
    for (name, text) in [
        ("mysql-bin.000001", "first"),
        ("mysql-bin.000002", "second"),
        ("mysql-bin.index", "index"),
        ("ibdata1", "not a binlog"),
    ] {
        std::fs::write(mysql.join(name), text).unwrap();
    }

    let example =
        std::fs::read_to_string(workspace_root().join("coordinator/examples/sync.toml")).unwrap();
    let jobs = example
        .replace("client = \"db1\"", "client = \"client\"")
        .replace("/usr/local/lib/fabric/scripts", scripts.to_str().unwrap())
        .replace("/var/lib/mysql", mysql.to_str().unwrap());
    assert_ne!(
        jobs, example,
        "the example still has the values rewritten here"
    );

    let fabric =
        Fabric::start_with_agent(3, &[], &[], &["--allow-command", rotate.to_str().unwrap()]);
    // The example's "hot" nodes: one more storage node, n4.
    let _n4 = Fabric::start_node_with(
        &fabric.dir,
        &fabric.coordinator.address,
        4,
        &["--labels", "hot"],
    );
    fabric.wait_online(5);

    let runs = fabric.submit(&jobs, &[]);
    assert_eq!(runs.len(), 1);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "done", "{run:#}");
    let id = run["copies"][0]["snapshot_id"].as_str().unwrap().to_owned();
    assert_eq!(
        restored_files(&fabric, &id, &mysql, "restored"),
        [
            "mysql-bin.000001",
            "mysql-bin.000002",
            "mysql-bin.000003",
            "mysql-bin.index"
        ],
        "the binlogs, the one the pre script wrote included, and nothing else"
    );
    let names = listed_names(&fabric, "binlogs");
    assert_eq!(names, ["binlogs/client-host"], "one sync snapshot per host");
}

#[test]
fn the_shipped_push_example_runs_both_jobs_as_written_but_for_their_paths() {
    let scratch = tempfile::tempdir().unwrap();
    let (etc, home, root) = (
        scratch.path().join("etc"),
        scratch.path().join("home"),
        scratch.path().join("root"),
    );
    for dir in [&etc, &home, &root] {
        std::fs::create_dir_all(dir).unwrap();
    }
    for (name, text) in [
        ("hosts", "127.0.0.1 localhost"),
        ("fstab", "# nothing"),
        ("draft.tmp", "left out"),
        ("hosts~", "left out"),
    ] {
        std::fs::write(etc.join(name), text).unwrap();
    }
    std::fs::write(home.join("notes"), "home").unwrap();
    std::fs::write(root.join(".profile"), "root").unwrap();

    let example =
        std::fs::read_to_string(workspace_root().join("coordinator/examples/push.toml")).unwrap();
    let jobs = example
        .replace("client = \"web1\"", "client = \"client\"")
        .replace("\"/etc\"", &format!("{:?}", etc.to_str().unwrap()))
        .replace(
            "\"/home /root\"",
            &format!("\"{} {}\"", home.display(), root.display()),
        );
    assert_ne!(jobs, example);

    let fabric = Fabric::start(3);
    let runs = fabric.submit(&jobs, &[]);
    assert_eq!(runs.len(), 2, "one run per job");
    for id in &runs {
        let run = fabric.wait_run(id);
        assert_eq!(run["state"], "done", "{run:#}");
    }
    let etc_run = runs
        .iter()
        .map(|id| fabric.wait_run(id))
        .find(|run| run["job"] == "etc")
        .unwrap();
    // dest = "n1& n2/n3": all three hold it.
    assert_eq!(
        etc_run["copies"].as_array().unwrap().len(),
        3,
        "{etc_run:#}"
    );
    let id = etc_run["copies"][0]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        restored_files(&fabric, &id, &etc, "restored-etc"),
        ["fstab", "hosts"],
        "the excludes (*.tmp, *~) left out"
    );
    // replicas = 2: two distinct nodes.
    let home_rows = fabric.json(&["status", "--job", "home"]);
    let nodes = home_rows[0]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{home_rows:#}");
    assert_ne!(nodes[0], nodes[1]);
}

#[test]
fn the_shipped_pull_example_pulls_what_the_passive_clients_pre_script_made_ready() {
    let scratch = tempfile::tempdir().unwrap();
    let export = scratch.path().join("export");
    // The example's pre dumps into the export folder; its post removes it.
    let dump = scratch.path().join("ext_dump.sh");
    script(
        &dump,
        "#!/bin/sh
mkdir -p \"$1\" && printf data > \"$1/table.csv\" && printf x > \"$1/scratch.tmp\" && printf y > \"$1/dump.log\"\n",
    );
    let example =
        std::fs::read_to_string(workspace_root().join("coordinator/examples/pull.toml")).unwrap();
    let jobs = example
        .replace("client = \"ext1\"", "client = \"client\"")
        .replace("/usr/local/lib/fabric", scratch.path().to_str().unwrap())
        .replace("/srv/export", export.to_str().unwrap());
    assert_ne!(jobs, example);
    let pre = format!("{} {}", dump.display(), export.display());
    let post = format!("rm -rf {}", export.display());

    let fabric = Fabric::start_with_agent(
        1,
        &[],
        &[],
        &["--allow-command", &pre, "--allow-command", &post],
    );
    let runs = fabric.submit(&jobs, &[]);
    let ext = runs
        .iter()
        .map(|id| fabric.wait_run(id))
        .find(|run| run["job"] == "ext")
        .unwrap_or_else(|| panic!("no run of the pull job among {runs:?}"));
    assert_eq!(ext["state"], "done", "{ext:#}");
    let id = ext["copies"][0]["snapshot_id"].as_str().unwrap().to_owned();
    assert_eq!(
        restored_files(&fabric, &id, &export, "restored-export"),
        ["table.csv"],
        "the dump, without the excluded *.tmp and *.log"
    );
    for _ in 0..100 {
        if !export.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !export.exists(),
        "the passive job's post removed the export"
    );
}

#[test]
fn the_shipped_instances_example_runs_each_instance_with_its_master_recorded() {
    let scratch = tempfile::tempdir().unwrap();
    let scripts = scratch.path().join("scripts");
    let backup = scratch.path().join("backup");
    std::fs::create_dir_all(&scripts).unwrap();
    for (name, body) in [
        ("mysql_get_instances.sh", "echo 3306; echo 3307"),
        ("mysql_get_slave_delay.sh", "echo 42"),
        ("mysql_get_master_host.sh", "echo \"db-master-$1\""),
        ("mysql_get_master_instance.sh", "echo \"m$1\""),
        (
            "mysql_dump_instance.sh",
            "mkdir -p \"$2\" && printf \"dump of $1\" > \"$2/dump.sql\"",
        ),
    ] {
        script(&scripts.join(name), &format!("#!/bin/sh\n{body}\n"));
    }
    // A redis-cli that does what `redis-cli -p PORT save` does to the
    // instance's dump.rdb.
    let redis = scratch.path().join("redis");
    let redis_cli = scripts.join("redis-cli");
    script(
        &redis_cli,
        &format!(
            "#!/bin/sh\n[ \"$1 $3\" = \"-p save\" ] || exit 2\nmkdir -p {0}/$2 && printf \"rdb of $2\" > {0}/$2/dump.rdb\n",
            redis.display()
        ),
    );
    let example =
        std::fs::read_to_string(workspace_root().join("coordinator/examples/instances.toml"))
            .unwrap();
    let jobs = example
        .replace("client = \"db-slave-3\"", "client = \"client\"")
        .replace("/usr/local/lib/fabric/scripts", scripts.to_str().unwrap())
        .replace("/srv/backup", backup.to_str().unwrap())
        .replace("\"redis-cli ", &format!("\"{} ", redis_cli.display()))
        .replace("/var/lib/redis", redis.to_str().unwrap());
    assert_ne!(jobs, example);
    let script_of = |name: &str| scripts.join(name).to_str().unwrap().to_owned();
    let allowed = [
        script_of("mysql_get_instances.sh"),
        format!("{} *", script_of("mysql_get_slave_delay.sh")),
        format!("{} *", script_of("mysql_get_master_host.sh")),
        format!("{} *", script_of("mysql_get_master_instance.sh")),
        format!("{} *", script_of("mysql_dump_instance.sh")),
        "rm -rf *".to_owned(),
        format!("{} *", redis_cli.display()),
    ];
    let mut agent_flags = Vec::new();
    for entry in &allowed {
        agent_flags.extend(["--allow-command", entry.as_str()]);
    }
    let fabric = Fabric::start_with_agent(3, &[], &[], &agent_flags);
    let runs = fabric.submit(&jobs, &[]);
    let runs: Vec<serde_json::Value> = runs.iter().map(|id| fabric.wait_run(id)).collect();
    let mut jobs_run: Vec<(&str, &str)> = runs
        .iter()
        .map(|run| {
            (
                run["job"].as_str().unwrap(),
                run["instance"].as_str().unwrap_or(""),
            )
        })
        .collect();
    jobs_run.sort();
    assert_eq!(
        jobs_run,
        [("mysqldb", ""), ("redis", "6379"), ("redis", "6380")],
        "mysqldb: the run that asks the client for its instances; redis: one run per listed instance"
    );
    for run in &runs {
        assert_eq!(run["state"], "done", "{run:#}");
    }
    let mut instances = Vec::new();
    for _ in 0..600 {
        let listed = fabric.json(&["run", "list", "--job", "mysqldb"]);
        let ended: Vec<serde_json::Value> = listed
            .as_array()
            .unwrap()
            .iter()
            .filter(|run| !run["instance"].as_str().unwrap_or("").is_empty())
            .cloned()
            .collect();
        if ended.len() == 2
            && ended
                .iter()
                .all(|run| run["state"] == "done" || run["state"] == "failed")
        {
            instances = ended;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(instances.len(), 2, "one run per instance");
    assert!(
        instances.iter().all(|run| run["state"] == "done"),
        "{instances:#?}"
    );
    let mut recorded: Vec<(String, String, String, i64)> = catalogue(&fabric, "mysqldb")
        .into_iter()
        .map(|s| (s.instance, s.master_host, s.master_instance, s.data_age))
        .collect();
    recorded.sort();
    assert_eq!(
        recorded,
        [
            ("3306".into(), "db-master-3306".into(), "m3306".into(), 42),
            ("3307".into(), "db-master-3307".into(), "m3307".into(), 42),
        ]
    );
    // The post removed each dump.
    let left: Vec<_> = std::fs::read_dir(&backup)
        .map(|entries| entries.filter_map(Result::ok).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");

    // redis: each instance's dump.rdb, saved by its pre, on two distinct
    // nodes (replicas = 2).
    let mut saved = Vec::new();
    for run in runs.iter().filter(|run| run["job"] == "redis") {
        let instance = run["instance"].as_str().unwrap();
        let copies = run["copies"].as_array().unwrap();
        let nodes: std::collections::BTreeSet<&str> = copies
            .iter()
            .map(|copy| copy["node"].as_str().unwrap())
            .collect();
        assert_eq!((copies.len(), nodes.len()), (2, 2), "{run:#}");
        let id = copies[0]["snapshot_id"].as_str().unwrap();
        let files = restored_files(
            &fabric,
            id,
            &redis.join(instance),
            &format!("restored-{instance}"),
        );
        assert_eq!(files, ["dump.rdb"], "{run:#}");
        let restored = fabric
            .dir
            .path()
            .join(format!("restored-{instance}"))
            .join("dump.rdb");
        saved.push(std::fs::read_to_string(restored).unwrap());
    }
    saved.sort();
    assert_eq!(saved, ["rdb of 6379", "rdb of 6380"]);
}

/// `coordinator/examples/scheduled.toml` as shipped but for its clients and
/// paths: the coordinator plans each job by its schedule (db inside its
/// window, in its own time zone, with tags of its schedule), and each job
/// started by hand runs as written.
#[test]
fn the_shipped_scheduled_example_plans_each_job_by_its_schedule_and_runs_as_written() {
    let scratch = tempfile::tempdir().unwrap();
    let (etc, dumps) = (scratch.path().join("etc"), scratch.path().join("db"));
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("hosts"), "127.0.0.1 localhost").unwrap();
    let dump_db = scratch.path().join("dump-db");
    script(
        &dump_db,
        &format!(
            "#!/bin/sh\nmkdir -p {0} && printf rows > {0}/db.sql\n",
            dumps.display()
        ),
    );
    let example =
        std::fs::read_to_string(workspace_root().join("coordinator/examples/scheduled.toml"))
            .unwrap();
    let jobs = example
        .replace("client = \"web1\"", "client = \"client\"")
        .replace("client = \"db1\"", "client = \"client\"")
        .replace("\"/etc\"", &format!("{:?}", etc.to_str().unwrap()))
        .replace("/var/backups/db", dumps.to_str().unwrap())
        .replace("/usr/local/bin/dump-db", dump_db.to_str().unwrap());
    assert_ne!(jobs, example);

    let fabric =
        Fabric::start_with_agent(3, &[], &[], &["--allow-command", dump_db.to_str().unwrap()]);
    let file = fabric.dir.path().join("scheduled.toml");
    std::fs::write(&file, &jobs).unwrap();
    let submitted = fabric.ctl(&["job", "submit", "-f", file.to_str().unwrap(), "--no-run"]);
    assert!(submitted.status.success(), "{submitted:?}");

    // Planned: each job's next run with tags of its own schedule; db's in
    // its window of Berlin time.
    let listed = fabric.json(&["job", "list"]);
    let planned = |name: &str| -> (jiff::Timestamp, Vec<String>) {
        let row = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["name"] == name)
            .unwrap_or_else(|| panic!("job {name} listed: {listed:#}"));
        let at: jiff::Timestamp = row["next_run"].as_str().unwrap().parse().unwrap();
        let tags = row["next_run_tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|tag| tag.as_str().unwrap().to_owned())
            .collect();
        (at, tags)
    };
    let now = jiff::Timestamp::now();
    let (etc_at, etc_tags) = planned("etc");
    assert!(
        !etc_tags.is_empty() && etc_tags.iter().all(|t| t == "daily" || t == "weekly"),
        "{etc_tags:?}"
    );
    assert!(
        etc_at <= now + jiff::SignedDuration::from_hours(7 * 24 + 1),
        "{etc_at}"
    );
    let (db_at, db_tags) = planned("db");
    assert!(
        !db_tags.is_empty() && db_tags.iter().all(|t| t == "hourly" || t == "daily"),
        "{db_tags:?}"
    );
    let berlin = db_at.in_tz("Europe/Berlin").unwrap().time();
    assert!(
        berlin >= jiff::civil::time(1, 0, 0, 0) && berlin < jiff::civil::time(5, 0, 0, 0),
        "db's next run {db_at} is {berlin} in Berlin, outside 01:00-05:00"
    );

    // Started by hand: etc on two distinct nodes; db's pre dumps, and n1
    // and n2 hold the dump.
    let etc_run = fabric.json(&["job", "run", "etc"]);
    let etc_run = fabric.wait_run(etc_run[0]["id"].as_str().unwrap());
    assert_eq!(etc_run["state"], "done", "{etc_run:#}");
    let mut nodes: Vec<&str> = etc_run["copies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|copy| copy["node"].as_str().unwrap())
        .collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), 2, "{etc_run:#}");
    let db_run = fabric.json(&["job", "run", "db"]);
    let db_run = fabric.wait_run(db_run[0]["id"].as_str().unwrap());
    assert_eq!(db_run["state"], "done", "{db_run:#}");
    let mut nodes: Vec<&str> = db_run["copies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|copy| copy["node"].as_str().unwrap())
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["n1", "n2"], "{db_run:#}");
    let id = db_run["copies"][0]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        restored_files(&fabric, &id, &dumps, "restored-db"),
        ["db.sql"]
    );
}

/// A pattern that matches nothing fails the run, naming the pattern.
#[test]
fn an_include_pattern_matching_nothing_fails_the_run_naming_it() {
    let fabric = Fabric::start(1);
    let pattern = fabric.dir.path().join("nothing-here-*.log");
    let jobs = format!(
        "[job.empty]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1\"\ncopy_retries = 0\n",
        pattern.display()
    );
    let runs = fabric.submit(&jobs, &[]);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "failed", "{run:#}");
    let reason = run["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!(
            "include pattern {:?} matches nothing",
            pattern.to_str().unwrap()
        )),
        "{run:#}"
    );
}

#[test]
fn a_stopped_agent_ends_its_pre_script_and_reports_the_run_failed_at_once() {
    let scratch = tempfile::tempdir().unwrap();
    let pre = scratch.path().join("pre.sh");
    let shell_pid = scratch.path().join("pre.pid");
    let sleep_pid = scratch.path().join("sleep.pid");
    // The script and a child of its own, both waiting.
    script(
        &pre,
        &format!(
            "#!/bin/sh\necho $$ > {}\nsleep 300 &\necho $! > {}\nwait\n",
            shell_pid.display(),
            sleep_pid.display()
        ),
    );
    let mut fabric =
        Fabric::start_with_agent(1, &[], &[], &["--allow-command", pre.to_str().unwrap()]);
    // A process the agent did not start, which it must leave alone.
    let mut bystander = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    let source = fabric.dir.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("data"), b"x").unwrap();
    let jobs = format!(
        "[job.stopped]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\npre = \"{}\"\ndest = \"n1\"\n",
        source.display(),
        pre.display()
    );
    let runs = fabric.submit(&jobs, &[]);
    let shell = pid_in(&shell_pid);
    let sleeper = pid_in(&sleep_pid);
    assert!(!gone(shell) && !gone(sleeper));

    signal(fabric.agent.pid(), rustix::process::Signal::TERM);
    wait_gone(shell, "the pre script");
    wait_gone(sleeper, "the pre script's child");
    let mut exited = None;
    for _ in 0..600 {
        exited = fabric.agent.child.try_wait().unwrap();
        if exited.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(exited.is_some(), "the agent exits after SIGTERM");

    // The coordinator has the reason from the agent, not from its
    // lost-node check (which would say nothing of SIGTERM).
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "failed", "{run:#}");
    assert_eq!(
        run["reason"], "the agent on client-host was stopped (SIGTERM) during pre",
        "{run:#}"
    );

    assert!(
        bystander.try_wait().unwrap().is_none(),
        "a process the agent did not start is left alone"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
}

/// A SIGKILLed agent cannot end its scripts: they outlive it. Its next
/// start on the same data directory ends them (its ledger of running
/// script groups), and leaves every other process alone.
#[test]
fn a_killed_agents_scripts_are_ended_when_it_starts_again() {
    let scratch = tempfile::tempdir().unwrap();
    let pre = scratch.path().join("pre.sh");
    let pids = scratch.path().join("pids");
    // The script and a child of its own, both waiting; each start of it
    // appends "SHELL SLEEP" to the file.
    script(
        &pre,
        &format!(
            "#!/bin/sh\nsleep 300 &\necho \"$$ $!\" >> {}\nwait\n",
            pids.display()
        ),
    );
    let allow = ["--allow-command", pre.to_str().unwrap()];
    let mut fabric = Fabric::start_with_agent(1, &[], &[], &allow);
    let mut bystander = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    let source = fabric.dir.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("data"), b"x").unwrap();
    let jobs = format!(
        "[job.killed]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\npre = \"{}\"\ndest = \"n1\"\n",
        source.display(),
        pre.display()
    );
    fabric.submit(&jobs, &[]);
    let first_line = |text: &str| -> Option<(i32, i32)> {
        let (shell, sleeper) = text.lines().next()?.split_once(' ')?;
        Some((shell.parse().ok()?, sleeper.parse().ok()?))
    };
    let mut started = None;
    for _ in 0..600 {
        started = std::fs::read_to_string(&pids)
            .ok()
            .and_then(|text| first_line(&text));
        if started.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (shell, sleeper) = started.expect("the pre script started");

    fabric.agent.child.kill().unwrap();
    fabric.agent.child.wait().unwrap();
    assert!(
        !gone(shell) && !gone(sleeper),
        "a SIGKILLed agent's scripts outlive it"
    );

    fabric.agent = Fabric::start_agent(&fabric.dir, &fabric.coordinator.address, &allow);
    wait_gone(shell, "the killed agent's pre script");
    wait_gone(sleeper, "the killed agent's pre script's child");
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "a process the agent did not start is left alone"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();

    // The new agent may be running the retried run's pre: a stop ends it.
    signal(fabric.agent.pid(), rustix::process::Signal::TERM);
    for _ in 0..600 {
        if fabric.agent.child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&pids).unwrap();
    for line in text.lines().skip(1) {
        let (shell, sleeper) = first_line(line).unwrap();
        wait_gone(shell, "the retried run's pre script");
        wait_gone(sleeper, "the retried run's pre script's child");
    }
}
