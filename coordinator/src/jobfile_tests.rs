//! Tests of the jobs file: the shipped examples, every error a user can meet
//! (exact messages), references, selection and run-time expansion.

use proptest::prelude::*;

use super::*;

fn known() -> KnownNodes {
    KnownNodes {
        ids: ["n1", "n2", "n3", "web1", "ext1", "db1", "db-slave-3"]
            .into_iter()
            .map(String::from)
            .collect(),
        labels: ["hot", "ssd"].into_iter().map(String::from).collect(),
    }
}

fn example(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn load(name: &str) -> Vec<JobSpec> {
    let text = example(name);
    let offline = parse_jobs_file(name, &text, &KnownNodes::default())
        .unwrap_or_else(|error| panic!("{error}"));
    let jobs = parse_jobs_file(name, &text, &known()).unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(offline, jobs, "checking names changes nothing");
    jobs
}

fn job<'j>(jobs: &'j [JobSpec], name: &str) -> &'j JobSpec {
    jobs.iter()
        .find(|spec| spec.name == name)
        .unwrap_or_else(|| panic!("no job {name}"))
}

/// The full message of a bad file, validated against [`known`].
fn error(text: &str) -> String {
    parse_jobs_file("jobs.toml", text, &known())
        .unwrap_err()
        .to_string()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|item| (*item).to_owned()).collect()
}

#[test]
fn push_example() {
    let jobs = load("push.toml");
    let etc = job(&jobs, "etc");
    assert_eq!(etc.direction(), Direction::Push);
    assert_eq!(etc.r#type(), SnapshotType::Full);
    assert_eq!(etc.client, "web1");
    assert_eq!(etc.include, strings(&["/etc"]));
    assert_eq!(etc.exclude, strings(&["*.tmp", "*~"]));
    assert_eq!(etc.dest, "n1& n2/n3");
    assert_eq!(etc.replicas, 0);
    assert_eq!(etc.copy_retries, 3);
    assert_eq!(etc.copy_retry_min_sleep_ms, 30_000);
    assert_eq!(etc.interval_s, 86_400);
    assert_eq!(etc.tags, strings(&["daily"]));
    let home = job(&jobs, "home");
    assert_eq!(home.include, strings(&["/home", "/root"]));
    assert_eq!(home.exclude, strings(&["*.cache"]));
    assert_eq!(home.dest, "");
    assert_eq!(home.replicas, 2);
    assert_eq!(home.interval_s, 6 * 3600);
    assert!(home.one_file_system);
}

#[test]
fn pull_example() {
    let jobs = load("pull.toml");
    let passive = job(&jobs, "ext-client");
    assert_eq!(passive.direction(), Direction::Passive);
    assert_eq!(passive.client, "ext1");
    assert_eq!(passive.pull_timeout_s, 7200);
    assert_eq!(passive.post, "rm -rf /srv/export");
    let pull = job(&jobs, "ext");
    assert_eq!(pull.direction(), Direction::Pull);
    assert_eq!(pull.pull_source, "ext-client");
    assert_eq!(pull.client, "ext1", "a pull job's client is its twin's");
    assert_eq!(pull.dest, "n1");
    // Selecting the passive job runs its pull twin; "all" runs the pull once.
    let run = |job: &str| Selected {
        job: job.into(),
        instance: None,
    };
    assert_eq!(select(&jobs, &[]).unwrap(), vec![run("ext")]);
    assert_eq!(
        select(&jobs, &["ext-client", "ext"]).unwrap(),
        vec![run("ext")]
    );
}

#[test]
fn sync_example_expands_named_destinations() {
    let jobs = load("sync.toml");
    let binlogs = job(&jobs, "binlogs");
    assert_eq!(binlogs.r#type(), SnapshotType::Sync);
    assert_eq!(binlogs.dest, "hot& n2/n3");
    assert_eq!(
        binlogs.pre,
        "/usr/local/lib/fabric/scripts/mysql_rotate_logs.sh"
    );
    assert_eq!(binlogs.interval_s, 3600);
}

#[test]
fn instances_example_keeps_commands_and_runtime_variables() {
    let jobs = load("instances.toml");
    let mysql = job(&jobs, "mysqldb");
    let scripts = "/usr/local/lib/fabric/scripts";
    assert_eq!(
        mysql.instances_command,
        format!("{scripts}/mysql_get_instances.sh")
    );
    assert!(mysql.instances.is_empty());
    assert_eq!(
        mysql.master_host,
        format!("!{scripts}/mysql_get_master_host.sh $instance")
    );
    assert_eq!(
        mysql.data_age,
        format!("!{scripts}/mysql_get_slave_delay.sh $instance")
    );
    assert_eq!(
        mysql.pre,
        format!("{scripts}/mysql_dump_instance.sh $instance /srv/backup/$instance-$start_time")
    );
    assert_eq!(mysql.post, "rm -rf /srv/backup/$instance-$start_time");
    assert_eq!(
        mysql.include,
        strings(&["/srv/backup/$instance-$start_time"])
    );

    // 2026-11-23 03:37:02 UTC.
    let run = expand_runtime(mysql, Some("3307"), "db-slave-3", 1_795_405_022_000);
    assert_eq!(
        run.pre,
        format!("{scripts}/mysql_dump_instance.sh 3307 /srv/backup/3307-2026-11-23-03-37-02")
    );
    assert_eq!(
        run.include,
        strings(&["/srv/backup/3307-2026-11-23-03-37-02"])
    );
    assert_eq!(
        run.master_host,
        format!("!{scripts}/mysql_get_master_host.sh 3307")
    );

    let redis = job(&jobs, "redis");
    assert_eq!(redis.instances, strings(&["6379", "6380"]));
    assert_eq!(redis.replicas, 2);
    let selected = |job: &str, instance: Option<&str>| Selected {
        job: job.into(),
        instance: instance.map(String::from),
    };
    assert_eq!(
        select(&jobs, &[]).unwrap(),
        vec![
            selected("mysqldb", None),
            selected("redis", Some("6379")),
            selected("redis", Some("6380")),
        ]
    );
    assert_eq!(
        select(&jobs, &["redis/6380", "mysqldb/3307", "redis/6380"]).unwrap(),
        vec![
            selected("redis", Some("6380")),
            selected("mysqldb", Some("3307"))
        ]
    );
    let fail = |args: &[&str]| select(&jobs, args).unwrap_err().to_string();
    assert_eq!(
        fail(&["redis/9999"]),
        "job \"redis\" has no instance \"9999\" (it has: 6379, 6380)"
    );
    assert_eq!(
        fail(&["mysqdb"]),
        "no job \"mysqdb\" (did you mean \"mysqldb\"?)"
    );
    assert_eq!(fail(&["postgres"]), "no job \"postgres\"");
    assert_eq!(fail(&["redis/"]), "\"redis/\" is not JOB or JOB/INSTANCE");
}

#[test]
fn selecting_an_instance_of_a_job_without_instances_fails() {
    let jobs = load("push.toml");
    assert_eq!(
        select(&jobs, &["etc/x"]).unwrap_err().to_string(),
        "job \"etc\" has no instances, so \"etc/x\" names nothing (select \"etc\")"
    );
}

const HEADER: &str = "[job.etc]\ndirection = \"push\"\nclient = \"web1\"\ninclude = [\"/etc\"]\n";

#[test]
fn unknown_key_suggests_the_closest() {
    assert_eq!(
        error(&format!("{HEADER}dets = \"n1\"\n")),
        "jobs.toml:5: job \"etc\", key \"dets\": unknown key (did you mean \"dest\"?)"
    );
    assert_eq!(
        error(&format!("{HEADER}dest = \"n1\"\nintervall = \"1h\"\n")),
        "jobs.toml:6: job \"etc\", key \"intervall\": unknown key (did you mean \"interval\"?)"
    );
    assert!(
        error(&format!("{HEADER}dest = \"n1\"\ncolour = \"blue\"\n")).starts_with(
            "jobs.toml:6: job \"etc\", key \"colour\": unknown key (job keys: direction, type, client,"
        )
    );
}

#[test]
fn bad_direction_and_type() {
    assert_eq!(
        error("[job.etc]\ndirection = \"pusj\"\n"),
        "jobs.toml:2: job \"etc\", key \"direction\": \"pusj\" is not a direction (push, pull or passive)"
    );
    assert_eq!(
        error("[job.etc]\nclient = \"web1\"\n"),
        "jobs.toml:1: job \"etc\", key \"direction\": missing: direction = \"push\", \"pull\" or \"passive\""
    );
    assert_eq!(
        error(&format!("{HEADER}dest = \"n1\"\ntype = \"incremental\"\n")),
        "jobs.toml:6: job \"etc\", key \"type\": \"incremental\" is not a type (full or sync)"
    );
    assert_eq!(
        error(&format!("{HEADER}dest = \"n1\"\ntags = 5\n")),
        "jobs.toml:6: job \"etc\", key \"tags\": expected a string or a list of strings, found an integer"
    );
}

#[test]
fn bad_dest_grammar_and_unknown_names() {
    assert_eq!(
        error(&format!("{HEADER}dest = \"n1//n2\"\n")),
        "jobs.toml:5: job \"etc\", key \"dest\": bad dest \"n1//n2\": empty name at column 4"
    );
    assert_eq!(
        error(&format!("{HEADER}dest = \"n1& n9/n2\"\n")),
        "jobs.toml:5: job \"etc\", key \"dest\": \"n9\" is neither a node id, a label nor a \
         [dest.NAME] table (nodes: db-slave-3, db1, ext1, n1, n2, n3, web1; labels: hot, ssd)"
    );
    // Offline (no known nodes), names are not checked.
    let text = format!("{HEADER}dest = \"n1& n9/n2\"\n");
    let jobs = parse_jobs_file("jobs.toml", &text, &KnownNodes::default()).unwrap();
    assert_eq!(jobs[0].dest, "n1& n9/n2");
    assert_eq!(
        error(
            &format!("{HEADER}client = \"web2\"\ndest = \"n1\"\n")
                .replace("client = \"web1\"\n", "")
        ),
        "jobs.toml:4: job \"etc\", key \"client\": \"web2\" is not a known node id \
         (nodes: db-slave-3, db1, ext1, n1, n2, n3, web1; labels: hot, ssd)"
    );
}

#[test]
fn named_destinations() {
    let text = "[dest.pair]\nnodes = \"n2/n3\"\n[dest.chain]\nnodes = \"n1 n2\"\n\
                [job.a]\ndirection = \"push\"\nclient = \"web1\"\ninclude = \"/a\"\ndest = \"ssd/pair\"\n\
                [job.b]\ndirection = \"push\"\nclient = \"web1\"\ninclude = \"/b\"\ndest = \"n3& chain&\"\n";
    let jobs = parse_jobs_file("jobs.toml", text, &known()).unwrap();
    assert_eq!(job(&jobs, "a").dest, "ssd/n2/n3");
    assert_eq!(job(&jobs, "b").dest, "n3& n1& n2&");
    assert_eq!(
        error(&text.replace("ssd/pair", "ssd/chain")),
        "jobs.toml:9: job \"a\", key \"dest\": [dest.chain] is \"n1 n2\", which cannot join the \
         random group \"ssd/chain\": inside a group a named destination must be one group without `&`"
    );
    assert_eq!(
        error("[dest.pair]\nnodes = \"n2/chain\"\n[dest.chain]\nnodes = \"n1\"\n"),
        "jobs.toml:2: [dest.pair], key \"nodes\": names [dest.chain]: named destinations cannot name each other"
    );
    assert_eq!(
        error("[dest.pair]\nnode = \"n2\"\n"),
        "jobs.toml:2: [dest.pair], key \"node\": unknown key (did you mean \"nodes\"?)"
    );
    assert_eq!(
        error("[dest.hot]\nnodes = \"n2\"\n"),
        "jobs.toml:1: [dest.hot]: the name is also a node id or label; rename the [dest] table"
    );
    assert_eq!(
        error("[dest.pair]\n"),
        "jobs.toml:1: [dest.pair], key \"nodes\": missing: the nodes or labels of this destination, e.g. nodes = \"n2/n3\""
    );
}

#[test]
fn dest_and_replicas_are_exclusive_and_one_is_needed() {
    assert_eq!(
        error(&format!("{HEADER}dest = \"n1\"\nreplicas = 2\n")),
        "jobs.toml:5: job \"etc\", key \"dest\": both \"dest\" and \"replicas\" are set: a job takes one of them"
    );
    assert_eq!(
        error(HEADER),
        "jobs.toml:1: job \"etc\": a push job needs \"dest\" or \"replicas\""
    );
    assert_eq!(
        error(&format!("{HEADER}replicas = 0\n")),
        "jobs.toml:5: job \"etc\", key \"replicas\": \"0\" is not a whole number of at least 1"
    );
    // A job's own dest overrides a global replicas.
    let text = format!(
        "[global]\nreplicas = 2\n{HEADER}dest = \"n1\"\n[job.other]\ndirection = \"push\"\nclient = \"web1\"\ninclude = \"/x\"\n"
    );
    let jobs = parse_jobs_file("jobs.toml", &text, &known()).unwrap();
    assert_eq!(
        (job(&jobs, "etc").dest.as_str(), job(&jobs, "etc").replicas),
        ("n1", 0)
    );
    assert_eq!(
        (
            job(&jobs, "other").dest.as_str(),
            job(&jobs, "other").replicas
        ),
        ("", 2)
    );
}

#[test]
fn bad_durations() {
    assert_eq!(
        error(&format!(
            "{HEADER}dest = \"n1\"\ninterval = \"24 parsecs\"\n"
        )),
        "jobs.toml:6: job \"etc\", key \"interval\": \"24 parsecs\" is not a duration \
         (e.g. \"30s\", \"5m\", \"24h\"): unknown time unit \"parsecs\", supported units: \
         ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)"
    );
    assert_eq!(
        error(&format!(
            "{HEADER}dest = \"n1\"\ncopy_retry_min_sleep = true\n"
        )),
        "jobs.toml:6: job \"etc\", key \"copy_retry_min_sleep\": expected a duration (\"30s\", \"5m\", \"24h\") or whole seconds, found a boolean"
    );
    let text = format!("{HEADER}dest = \"n1\"\ncopy_retry_min_sleep = 90\n");
    let jobs = parse_jobs_file("jobs.toml", &text, &known()).unwrap();
    assert_eq!(
        jobs[0].copy_retry_min_sleep_ms, 90_000,
        "integers are seconds, as in B1000"
    );
}

#[test]
fn references_resolve_recursively_in_the_jobs_scope() {
    let text = "[global]\nbase = \"/srv\"\ndumps = \"$base/dumps\"\nretries = 5\nname = \"global\"\n\
                [job.db]\ndirection = \"push\"\nclient = \"db1\"\ndest = \"n1\"\n\
                pre = \"dump ${dumps}x $$HOME $1 $(date) $ cost$\"\ninclude = [\"$dumps/$instance\"]\n\
                copy_retries = \"$retries\"\ntags = \"$base, b\"\n";
    let jobs = parse_jobs_file("jobs.toml", text, &known()).unwrap();
    let db = &jobs[0];
    assert_eq!(db.pre, "dump /srv/dumpsx $$HOME $1 $(date) $ cost$");
    assert_eq!(db.include, strings(&["/srv/dumps/$instance"]));
    assert_eq!(db.copy_retries, 5);
    assert_eq!(db.tags, strings(&["/srv", "b"]));
    let run = expand_runtime(db, None, "db1", 0);
    assert_eq!(run.pre, "dump /srv/dumpsx $HOME $1 $(date) $ cost$");
    assert_eq!(run.include, strings(&["/srv/dumps/"]));
}

#[test]
fn a_jobs_own_key_wins_over_global() {
    let text = "[global]\ninclude = \"/global\"\npre = \"echo $include\"\n\
                [job.db]\ndirection = \"push\"\nclient = \"db1\"\ndest = \"n1\"\ninclude = \"/own\"\n";
    let jobs = parse_jobs_file("jobs.toml", text, &known()).unwrap();
    assert_eq!(jobs[0].include, strings(&["/own"]));
    assert_eq!(
        jobs[0].pre, "echo /own",
        "global defaults resolve in the job's scope"
    );
}

#[test]
fn missing_and_cyclic_references_name_the_chain() {
    let global = "[global]\na = \"$b/x\"\nb = \"$c\"\nc = \"$a\"\nd = \"$nowhere\"\nlist = [\"x\"]\ncmd = \"!hostname\"\n";
    let with = |pre: &str| error(&format!("{global}{HEADER}dest = \"n1\"\npre = \"{pre}\"\n"));
    assert_eq!(
        with("run $HOME/x"),
        "jobs.toml:13: job \"etc\", key \"pre\": pre: $HOME refers to no key of the job nor of \
         [global] (write $$ for a literal $)"
    );
    assert_eq!(
        with("run $d"),
        "jobs.toml:13: job \"etc\", key \"pre\": pre -> $d: $nowhere refers to no key of the job \
         nor of [global] (write $$ for a literal $)"
    );
    assert_eq!(
        with("run $a"),
        "jobs.toml:13: job \"etc\", key \"pre\": cyclic reference: pre -> $a -> $b -> $c -> $a"
    );
    assert_eq!(
        with("run $pre"),
        "jobs.toml:13: job \"etc\", key \"pre\": cyclic reference: pre -> $pre"
    );
    assert_eq!(
        with("run $list"),
        "jobs.toml:13: job \"etc\", key \"pre\": pre: $list is a list; only strings, numbers and \
         booleans can be referenced"
    );
    assert_eq!(
        with("run $cmd"),
        "jobs.toml:13: job \"etc\", key \"pre\": pre: $cmd is a `!command`, whose value is only \
         known at run time"
    );
    assert_eq!(
        error("[global]\ninstance = \"x\"\n"),
        "jobs.toml:2: [global], key \"instance\": is set at run time and cannot be defined"
    );
}

#[test]
fn commands_only_where_b1000_allows_them() {
    assert_eq!(
        error(&format!("{HEADER}dest = \"n1\"\npre = \"!date\"\n")),
        "jobs.toml:6: job \"etc\", key \"pre\": cannot be a `!command` (only instances, \
         master_host, master_instance and data_age of push jobs can)"
    );
    let pull = "[job.c]\ndirection = \"passive\"\nclient = \"ext1\"\n\
                [job.p]\ndirection = \"pull\"\npull_source = \"c\"\ninclude = \"/x\"\ndest = \"n1\"\nmaster_host = \"!hostname\"\n";
    assert_eq!(
        error(pull),
        "jobs.toml:9: job \"p\", key \"master_host\": cannot be a `!command` (only instances, \
         master_host, master_instance and data_age of push jobs can)"
    );
    let text = format!("{HEADER}dest = \"n1\"\ndata_age = \"5m\"\nmaster_instance = 3306\n");
    let jobs = parse_jobs_file("jobs.toml", &text, &known()).unwrap();
    assert_eq!(
        (jobs[0].data_age.as_str(), jobs[0].master_instance.as_str()),
        ("300", "3306")
    );
    assert_eq!(
        error(&format!(
            "{HEADER}dest = \"n1\"\ninstances = \"a, b c\\n-x\"\n"
        )),
        "jobs.toml:6: job \"etc\", key \"instances\": instance \"-x\" is not valid (letters, \
         digits and `-_.`, starting with a letter or digit)"
    );
}

#[test]
fn direction_rules_for_passive_and_pull_jobs() {
    let passive = "[job.c]\ndirection = \"passive\"\nclient = \"ext1\"\ninclude = \"/x\"\n";
    assert_eq!(
        error(passive),
        "jobs.toml:4: job \"c\", key \"include\": does not apply to a passive job (its pull job decides what to copy)"
    );
    assert_eq!(
        error("[job.c]\ndirection = \"passive\"\nclient = \"ext1\"\n"),
        "jobs.toml:1: job \"c\": no pull job names this passive job in its pull_source"
    );
    assert_eq!(
        error(
            "[job.p]\ndirection = \"pull\"\npull_source = \"nope\"\ninclude = \"/x\"\ndest = \"n1\"\n"
        ),
        "jobs.toml:1: job \"p\", key \"pull_source\": \"nope\" is not a job of this file"
    );
    assert_eq!(
        error(&format!(
            "{HEADER}dest = \"n1\"\n[job.p]\ndirection = \"pull\"\npull_source = \"etc\"\ninclude = \"/x\"\ndest = \"n1\"\n"
        )),
        "jobs.toml:6: job \"p\", key \"pull_source\": job \"etc\" is a push job; a pull job's source must be a passive job"
    );
    assert_eq!(
        error("[job.p]\ndirection = \"pull\"\nclient = \"ext1\"\n"),
        "jobs.toml:3: job \"p\", key \"client\": does not apply to a pull job (its client is the client of its pull_source)"
    );
    // Global defaults that do not apply to a direction are ignored.
    let text = "[global]\ninclude = \"/x\"\ndest = \"n1\"\n\
                [job.c]\ndirection = \"passive\"\nclient = \"ext1\"\n\
                [job.p]\ndirection = \"pull\"\npull_source = \"c\"\n";
    let jobs = parse_jobs_file("jobs.toml", text, &known()).unwrap();
    assert_eq!(job(&jobs, "c").include, Vec::<String>::new());
    assert_eq!(job(&jobs, "p").include, strings(&["/x"]));
    assert_eq!(job(&jobs, "c").pull_timeout_s, 3600);
}

#[test]
fn file_level_problems() {
    assert_eq!(
        error("[job.etc\ndirection = \"push\"\n"),
        "jobs.toml:1: not valid TOML: unclosed table, expected `]`"
    );
    assert_eq!(
        error("[jobs.etc]\ndirection = \"push\"\n"),
        "jobs.toml:1: unknown table [jobs] (a jobs file has [global], [job.NAME] and [dest.NAME] tables)"
    );
    assert_eq!(
        error(""),
        "jobs.toml: no [job.NAME] table: the file defines no job"
    );
    assert_eq!(
        error("job = 3\n"),
        "jobs.toml:1: expected a table, found an integer"
    );
    assert_eq!(
        error("[job.\"a/b\"]\ndirection = \"push\"\n"),
        "jobs.toml:1: job \"a/b\": \"a/b\" is not a valid name (letters, digits and `-_.`, starting with a letter or digit)"
    );
}

#[test]
fn every_problem_is_reported_in_line_order() {
    let text = "[job.b]\ndirection = \"push\"\nclient = \"web1\"\ninclude = \"/b\"\ndest = \"n9\"\n\
                [job.a]\ndirection = \"sideways\"\n";
    assert_eq!(
        error(text),
        "jobs.toml:5: job \"b\", key \"dest\": \"n9\" is neither a node id, a label nor a \
         [dest.NAME] table (nodes: db-slave-3, db1, ext1, n1, n2, n3, web1; labels: hot, ssd)\n\
         jobs.toml:7: job \"a\", key \"direction\": \"sideways\" is not a direction (push, pull or passive)"
    );
}

#[test]
fn instances_output_is_split_like_b1000() {
    assert_eq!(
        parse_instances_output("3306\n3307, 3308\n\n3306\n").unwrap(),
        strings(&["3306", "3307", "3308"])
    );
    assert_eq!(
        parse_instances_output("ok\nbad/one\n").unwrap_err(),
        "instance \"bad/one\" is not valid (letters, digits and `-_.`, starting with a letter or digit)"
    );
}

/// A job written as TOML by the test itself, and what it must parse to.
fn job_strategy() -> impl Strategy<Value = JobSpec> {
    let name = "[a-z][a-z0-9_-]{0,8}";
    let path = "/[a-z]{1,6}(/[a-z*.]{1,6}){0,2}";
    let dest = prop::collection::vec(
        (prop::collection::vec("n[1-3]|ssd|hot", 1..3), any::<bool>()),
        1..4,
    )
    .prop_map(|steps| {
        crate::dest::DestPlan {
            steps: steps
                .into_iter()
                .map(|(mut names, background)| {
                    names.dedup();
                    DestStep { names, background }
                })
                .collect(),
        }
        .to_string()
    });
    (
        name,
        any::<bool>(),
        prop::collection::vec(path, 1..4),
        prop::collection::vec(path, 0..3),
        prop_oneof![
            dest.prop_map(|dest| (dest, 0u32)),
            (1u32..4).prop_map(|n| (String::new(), n))
        ],
        0u32..10,
        0u64..100_000,
        prop::collection::vec("[a-z]{1,5}", 0..3),
        prop::collection::vec("[a-z0-9]{1,5}", 0..3),
    )
        .prop_map(
            |(
                name,
                sync,
                include,
                exclude,
                (dest, replicas),
                copy_retries,
                interval_s,
                tags,
                instances,
            )| {
                let mut instances_unique: Vec<String> = Vec::new();
                for instance in instances {
                    if !instances_unique.contains(&instance) {
                        instances_unique.push(instance);
                    }
                }
                JobSpec {
                    name,
                    direction: Direction::Push as i32,
                    r#type: if sync {
                        SnapshotType::Sync
                    } else {
                        SnapshotType::Full
                    } as i32,
                    client: "web1".into(),
                    include,
                    exclude,
                    dest,
                    replicas,
                    copy_retries,
                    copy_retry_min_sleep_ms: 60_000,
                    interval_s,
                    tags,
                    instances: instances_unique,
                    ..JobSpec::default()
                }
            },
        )
}

fn to_toml(spec: &JobSpec) -> String {
    let list = |items: &[String]| {
        let quoted: Vec<String> = items.iter().map(|item| format!("{item:?}")).collect();
        format!("[{}]", quoted.join(", "))
    };
    let mut text = format!(
        "[job.{}]\ndirection = \"push\"\ntype = \"{}\"\nclient = {:?}\ninclude = {}\nexclude = {}\n",
        spec.name,
        if spec.r#type() == SnapshotType::Sync {
            "sync"
        } else {
            "full"
        },
        spec.client,
        list(&spec.include),
        list(&spec.exclude),
    );
    if spec.replicas > 0 {
        text.push_str(&format!("replicas = {}\n", spec.replicas));
    } else {
        text.push_str(&format!("dest = {:?}\n", spec.dest));
    }
    text.push_str(&format!(
        "copy_retries = {}\ninterval = \"{}s\"\ntags = {}\n",
        spec.copy_retries,
        spec.interval_s,
        list(&spec.tags)
    ));
    if !spec.instances.is_empty() {
        text.push_str(&format!("instances = \"{}\"\n", spec.instances.join(", ")));
    }
    text
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn written_jobs_parse_back(spec in job_strategy()) {
        let text = to_toml(&spec);
        let parsed = parse_jobs_file("generated.toml", &text, &known())
            .map_err(|error| TestCaseError::fail(format!("{error}\n{text}")))?;
        prop_assert_eq!(parsed, vec![spec]);
    }

    #[test]
    fn arbitrary_text_never_panics(text in "[a-z\\[\\]=\"$!./ \n]{0,80}") {
        let _ = parse_jobs_file("fuzz.toml", &text, &known());
    }
}

#[test]
fn min_retention_is_a_duration_for_push_and_pull_jobs() {
    let text = "[global]\nmin_retention = \"30d\"\n\
                [job.p]\ndirection = \"push\"\nclient = \"web1\"\ninclude = \"/x\"\ndest = \"n1\"\n\
                [job.q]\ndirection = \"push\"\nclient = \"web1\"\ninclude = \"/x\"\ndest = \"n1\"\nmin_retention = \"1h\"\n";
    let jobs = parse_jobs_file("jobs.toml", text, &known()).unwrap();
    assert_eq!(job(&jobs, "p").min_retention_s, 30 * 86_400);
    assert_eq!(job(&jobs, "q").min_retention_s, 3600);
    let bad = error(
        "[job.p]\ndirection = \"push\"\nclient = \"web1\"\ninclude = \"/x\"\ndest = \"n1\"\nmin_retention = \"forever\"\n",
    );
    assert!(bad.contains("min_retention"), "{bad}");
    let passive =
        error("[job.c]\ndirection = \"passive\"\nclient = \"ext1\"\nmin_retention = \"1d\"\n");
    assert!(passive.contains("min_retention"), "{passive}");
}

#[test]
fn bandwidth_limits_read_units_and_refuse_nonsense() {
    assert_eq!(parse_rate("1000"), Some(1000));
    assert_eq!(parse_rate("20MB/s"), Some(20_000_000));
    assert_eq!(parse_rate("512KiB"), Some(524_288));
    assert_eq!(parse_rate("1.5 G"), Some(1_500_000_000));
    assert_eq!(parse_rate(" 7k/s "), Some(7000));
    for bad in ["", "fast", "10 parsecs", "-5", "1e999", "MB"] {
        assert_eq!(parse_rate(bad), None, "{bad:?}");
    }
    let text = "[job.p]\ndirection = \"push\"\nclient = \"web1\"\ninclude = \"/x\"\ndest = \"n1\"\nbandwidth_limit = \"20MB/s\"\n\
                [job.q]\ndirection = \"push\"\nclient = \"web1\"\ninclude = \"/x\"\ndest = \"n1\"\nbandwidth_limit = 4096\n";
    let jobs = parse_jobs_file("jobs.toml", text, &known()).unwrap();
    assert_eq!(job(&jobs, "p").bandwidth_limit_bytes_per_s, 20_000_000);
    assert_eq!(job(&jobs, "q").bandwidth_limit_bytes_per_s, 4096);
    let bad = error(
        "[job.p]\ndirection = \"push\"\nclient = \"web1\"\ninclude = \"/x\"\ndest = \"n1\"\nbandwidth_limit = \"lots\"\n",
    );
    assert!(
        bad.contains("bandwidth_limit") && bad.contains("lots"),
        "{bad}"
    );
}

#[test]
fn a_quota_is_an_amount_of_bytes_not_a_rate() {
    assert_eq!(parse_bytes("500GiB"), Some(500 * 1024 * 1024 * 1024));
    assert_eq!(parse_bytes("2TB"), Some(2_000_000_000_000));
    assert_eq!(parse_bytes("2TB/s"), None, "a rate is not a quota");
    let text = "[job.p]\ndirection = \"push\"\nclient = \"web1\"\ninclude = \"/x\"\ndest = \"n1\"\nquota = \"1.5 GB\"\n\
                [job.q]\ndirection = \"push\"\nclient = \"web1\"\ninclude = \"/x\"\ndest = \"n1\"\nquota = 4096\n";
    let jobs = parse_jobs_file("jobs.toml", text, &known()).unwrap();
    assert_eq!(job(&jobs, "p").quota_bytes, 1_500_000_000);
    assert_eq!(job(&jobs, "q").quota_bytes, 4096);
    let bad = error(
        "[job.p]\ndirection = \"push\"\nclient = \"web1\"\ninclude = \"/x\"\ndest = \"n1\"\nquota = \"10MB/s\"\n",
    );
    assert!(bad.contains("quota") && bad.contains("10MB/s"), "{bad}");
    let passive = error("[job.c]\ndirection = \"passive\"\nclient = \"ext1\"\nquota = \"1GB\"\n");
    assert!(passive.contains("quota"), "{passive}");
}

#[test]
fn a_schedule_has_tags_with_an_interval_and_a_keep_count() {
    let text = "[job.p]\ndirection = \"push\"\nclient = \"web1\"\ninclude = \"/x\"\ndest = \"n1\"\n\
                schedule = { daily = { interval = \"24h\", keep = 7 }, weekly = { interval = \"7d\", keep = 4 } }\n\
                window = \"22:00-04:00\"\ntime_zone = \"Europe/Berlin\"\n";
    let jobs = parse_jobs_file("jobs.toml", text, &known()).unwrap();
    let p = job(&jobs, "p");
    let tags: Vec<(&str, u64, u32)> = p
        .schedule
        .iter()
        .map(|tag| (tag.tag.as_str(), tag.interval_s, tag.keep))
        .collect();
    assert_eq!(tags, [("daily", 86_400, 7), ("weekly", 604_800, 4)]);
    assert_eq!(p.interval_s, 86_400, "check follows the most frequent tag");
    assert_eq!(p.window, "22:00-04:00");
    assert_eq!(p.time_zone, "Europe/Berlin");
    let base =
        "[job.p]\ndirection = \"push\"\nclient = \"web1\"\ninclude = \"/x\"\ndest = \"n1\"\n";
    for (bad, says) in [
        ("schedule = \"daily\"\n", "schedule"),
        ("schedule = {}\n", "schedule"),
        (
            "schedule = { daily = { interval = \"24h\" } }\n",
            "keep count",
        ),
        (
            "schedule = { daily = { interval = \"10s\", keep = 1 } }\n",
            "at least a minute",
        ),
        (
            "schedule = { daily = { interval = \"24h\", keep = 0 } }\n",
            "keep",
        ),
        (
            "schedule = { daily = { interval = \"24h\", keep = 1, at = 3 } }\n",
            "only interval and keep",
        ),
        (
            "schedule = { \"../x\" = { interval = \"24h\", keep = 1 } }\n",
            "tag name",
        ),
        (
            "schedule = { d = { interval = \"1h\", keep = 1 } }\nwindow = \"25:00-01:00\"\n",
            "window",
        ),
        (
            "schedule = { d = { interval = \"1h\", keep = 1 } }\ntime_zone = \"Mars/Olympus\"\n",
            "Mars/Olympus",
        ),
        ("window = \"01:00-05:00\"\n", "schedule"),
    ] {
        let message = error(&format!("{base}{bad}"));
        assert!(message.contains(says), "{bad}: {message}");
    }
    let passive = error(
        "[job.c]\ndirection = \"passive\"\nclient = \"ext1\"\nschedule = { d = { interval = \"1h\", keep = 1 } }\n",
    );
    assert!(passive.contains("schedule"), "{passive}");
}

#[test]
fn scheduled_example() {
    let jobs = load("scheduled.toml");
    let etc = job(&jobs, "etc");
    assert_eq!(etc.schedule.len(), 2);
    assert_eq!(etc.interval_s, 86_400);
    let db = job(&jobs, "db");
    assert_eq!(db.window, "01:00-05:00");
    assert_eq!(db.time_zone, "Europe/Berlin");
    assert_eq!(db.interval_s, 3_600);
}

#[test]
fn verify_takes_none_full_or_a_sample_percentage() {
    assert_eq!(parse_verify("none"), Some(0.0));
    assert_eq!(parse_verify("full"), Some(1.0));
    assert_eq!(parse_verify("sample:5%"), Some(0.05));
    assert_eq!(parse_verify(" sample: 100 % "), Some(1.0));
    for bad in [
        "sample:0%",
        "sample:101%",
        "sample:5",
        "5%",
        "all",
        "sample:x%",
        "",
    ] {
        assert_eq!(parse_verify(bad), None, "{bad:?}");
    }
    let text = "[job.p]\ndirection = \"push\"\nclient = \"web1\"\ninclude = \"/x\"\ndest = \"n1\"\nverify = \"sample:5%\"\n";
    let jobs = parse_jobs_file("jobs.toml", text, &known()).unwrap();
    assert_eq!(job(&jobs, "p").verify_fraction, 0.05);
    let bad = error(
        "[job.p]\ndirection = \"push\"\nclient = \"web1\"\ninclude = \"/x\"\ndest = \"n1\"\nverify = \"sometimes\"\n",
    );
    assert!(
        bad.contains("verify") && bad.contains("sometimes") && bad.contains("sample:N%"),
        "{bad}"
    );
}

#[test]
fn spread_by_is_a_label_key_that_goes_with_replicas() {
    let head = "[job.p]\ndirection = \"push\"\nclient = \"web1\"\ninclude = \"/x\"\n";
    let jobs = parse_jobs_file(
        "jobs.toml",
        &format!("{head}replicas = 2\nspread_by = \"zone\"\n"),
        &known(),
    )
    .unwrap();
    assert_eq!(job(&jobs, "p").spread_by, "zone");
    let bad = error(&format!("{head}dest = \"n1\"\nspread_by = \"zone\"\n"));
    assert!(
        bad.contains("spread_by") && bad.contains("replicas = N"),
        "{bad}"
    );
    let bad = error(&format!("{head}replicas = 2\nspread_by = \"zone:a\"\n"));
    assert!(bad.contains("a label key"), "{bad}");
}

#[test]
fn a_global_name_one_letter_off_a_key_is_a_typo_not_a_variable() {
    let text = "[global]\nintervall = \"1h\"\nbase = \"/srv\"\n\n[job.db]\ndirection = \"push\"\nclient = \"db1\"\ninclude = [\"$base/db\"]\ndest = \"n1\"\n";
    let message = error(text);
    assert!(
        message.contains("intervall") && message.contains("looks like a typo of the key interval"),
        "{message}"
    );
    // A variable named like no key, or near only a short one, is a variable.
    let fine = "[global]\nbase = \"/srv\"\nhosts = \"x\"\n\n[job.db]\ndirection = \"push\"\nclient = \"db1\"\ninclude = [\"$base/db\"]\ndest = \"n1\"\n";
    let jobs = parse_jobs_file("jobs.toml", fine, &known()).unwrap();
    assert_eq!(jobs[0].include, strings(&["/srv/db"]));
}
