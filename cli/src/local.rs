//! The embedded fabric: a coordinator, storage nodes and a client agent in
//! this process, on loopback, with OS-chosen ports and state under one
//! folder. `local up` keeps it running; `local demo` runs the fabric's main
//! job on it end to end and checks the result byte for byte.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use fabric_node::config::{NodeConfig, Role as NodeRole};
use fabric_proto::v1::{ListNodesRequest, NodeState, RunState, SubmitJobsRequest, WatchRunRequest};
use fabric_trust::Role;
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::commands;
use crate::output::{self, OutputFormat, bytes};
use crate::remote::{self, Remote};

/// The id of the embedded client agent.
pub const AGENT_ID: &str = "agent";

/// A running embedded fabric.
pub struct LocalFabric {
    /// The coordinator's address.
    pub coordinator: String,
    /// How to reach it as its operator (TLS with the `operator/local`
    /// certificate of the fabric's own CA).
    pub remote: Remote,
    /// Where its CA and certificates are.
    pub pki: PathBuf,
    /// (id, address) of each storage node.
    pub nodes: Vec<(String, String)>,
    /// The client agent's address.
    pub agent: String,
    stop_nodes: watch::Sender<bool>,
    stop_coordinator: watch::Sender<bool>,
    node_tasks: Vec<tokio::task::JoinHandle<()>>,
    coordinator_task: tokio::task::JoinHandle<()>,
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

async fn bind() -> anyhow::Result<(TcpListener, String)> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen on 127.0.0.1")?;
    let address = format!("https://{}", listener.local_addr()?);
    Ok((listener, address))
}

impl LocalFabric {
    /// Start a coordinator, `storage_nodes` storage nodes (n1, n2, ...) and
    /// an agent, with state under `dir`, all speaking TLS with certificates
    /// of a CA of their own; returns once all are online.
    pub async fn start(dir: &Path, storage_nodes: usize) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let dir = &std::fs::canonicalize(dir)
            .with_context(|| format!("cannot resolve {}", dir.display()))?;
        // Reused when `local up` starts again on the same folder.
        let pki = fabric_trust::pki::PkiDir::open_or_init(&dir.join("pki"), "fabric local CA")?;
        let issue = |role: Role, name: &str| pki.issue_into(role, name, pki.dir());
        let (stop_coordinator, coordinator_stop_rx) = watch::channel(false);
        let (stop_nodes, stop_rx) = watch::channel(false);
        let mut node_tasks = Vec::new();

        let (listener, coordinator) = bind().await?;
        let (cert, key) = issue(Role::Coordinator, "local")?;
        let config = fabric_coordinator::config::CoordinatorConfig {
            data_dir: dir.join("coordinator"),
            heartbeat_interval: Duration::from_millis(500),
            tls_cert: Some(cert),
            tls_key: Some(key),
            tls_ca: Some(pki.ca_certificate()),
            health_listen: String::new(),
            metrics_listen: String::new(),
            ..Default::default()
        };
        let shutdown = stopped(coordinator_stop_rx);
        let coordinator_task = tokio::spawn(async move {
            if let Err(err) = fabric_coordinator::serve(listener, config, shutdown).await {
                eprintln!("fabricctl: the embedded coordinator stopped: {err}");
            }
        });

        let mut nodes = Vec::new();
        let hostname = fabric_node::config::system_hostname();
        for index in 0..=storage_nodes {
            let (listener, address) = bind().await?;
            let (id, roles) = if index == storage_nodes {
                (AGENT_ID.to_owned(), vec![NodeRole::Agent])
            } else {
                (format!("n{}", index + 1), vec![NodeRole::Storage])
            };
            let (cert, key) = issue(Role::Node, &id)?;
            let config = NodeConfig {
                tls_cert: Some(cert),
                tls_key: Some(key),
                tls_ca: Some(pki.ca_certificate()),
                health_listen: String::new(),
                metrics_listen: String::new(),
                data_dir: dir.join(&id),
                node_id: id.clone(),
                advertise: address.clone(),
                labels: vec!["local".into()],
                roles,
                coordinator: coordinator.clone(),
                // The agent backs up this machine under its host name;
                // storage nodes go by their ids, since a host name belongs
                // to one node only.
                hostname: if index == storage_nodes {
                    hostname.clone()
                } else {
                    id.clone()
                },
                ..Default::default()
            };
            let shutdown = stopped(stop_rx.clone());
            node_tasks.push(tokio::spawn(async move {
                if let Err(err) = fabric_node::serve(listener, config, shutdown).await {
                    eprintln!("fabricctl: an embedded node stopped: {err}");
                }
            }));
            nodes.push((id, address));
        }
        let (agent_id, agent) = nodes.pop().unwrap_or_default();
        debug_assert_eq!(agent_id, AGENT_ID);
        let (cert, key) = issue(Role::Operator, "local")?;
        let transport = fabric_trust::transport::TransportSettings {
            ca: Some(pki.ca_certificate()),
            cert: Some(cert),
            key: Some(key),
            insecure_plaintext: false,
        }
        .client()?;
        let fabric = Self {
            remote: Remote::with_transport(coordinator.clone(), transport),
            pki: pki.dir().to_owned(),
            coordinator,
            nodes,
            agent,
            stop_nodes,
            stop_coordinator,
            node_tasks,
            coordinator_task,
        };
        fabric.wait_online(storage_nodes + 1).await?;
        Ok(fabric)
    }

    async fn wait_online(&self, count: usize) -> anyhow::Result<()> {
        for _ in 0..200 {
            if let Ok(mut client) = self.remote.coordinator().await
                && let Ok(response) = client.list_nodes(ListNodesRequest {}).await
            {
                let online = response
                    .into_inner()
                    .nodes
                    .iter()
                    .filter(|n| n.state() == NodeState::Online)
                    .count();
                if online >= count {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the embedded nodes did not all come online within 20s")
    }

    /// Stop the nodes, then the coordinator (so no node sees its
    /// coordinator vanish), and wait for them.
    pub async fn stop(self) {
        let _ = self.stop_nodes.send(true);
        for task in self.node_tasks {
            let _ = task.await;
        }
        let _ = self.stop_coordinator.send(true);
        let _ = self.coordinator_task.await;
    }
}

/// Warnings and errors on stderr (or what `RUST_LOG` asks for).
pub(crate) fn init_quiet_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `local up`: run until Ctrl-C.
pub async fn up(dir: &Path, storage_nodes: usize) -> anyhow::Result<()> {
    if storage_nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    init_quiet_logging();
    let fabric = LocalFabric::start(dir, storage_nodes).await?;
    crate::outln!("coordinator  {}", fabric.coordinator)?;
    for (id, address) in &fabric.nodes {
        crate::outln!("storage      {id:<6} {address}")?;
    }
    crate::outln!("agent        {AGENT_ID:<6} {}", fabric.agent)?;
    crate::outln!("state under  {}", dir.display())?;
    crate::outln!("")?;
    crate::outln!("export FABRIC_COORDINATOR={}", fabric.coordinator)?;
    crate::outln!(
        "export FABRIC_TLS_CA={pki}/ca.pem FABRIC_TLS_CERT={pki}/operator-local.pem FABRIC_TLS_KEY={pki}/operator-local.key",
        pki = fabric.pki.display()
    )?;
    crate::outln!(
        "then e.g.: fabricctl node list; fabricctl job submit -f jobs.toml (client = \"{AGENT_ID}\")"
    )?;
    crate::outln!("Ctrl-C stops the fabric.")?;
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    fabric.stop().await;
    Ok(())
}

/// What the status table's NEW column counts, for the demo's readers: the
/// receiving store's count of the plain bytes of chunks it did not hold
/// (`Store::put_chunks`), which takes in the snapshot's directory listings
/// (tree chunks) as well as file content, while SIZE is file content only.
pub const NEW_LEGEND: &str = "NEW: bytes of the chunks the receiving node did not hold yet, before \
compression, directory listings included; SIZE counts file content only, so NEW can be larger \
(many small files, a first backup).";

/// `local demo SOURCE`: the fabric's main job, end to end. Without `dir`
/// it runs in a temporary folder, removed at the end unless `keep`.
pub async fn demo(source: &Path, dir: Option<&Path>, keep: bool) -> anyhow::Result<()> {
    init_quiet_logging();
    let source = std::fs::canonicalize(source)
        .with_context(|| format!("cannot back up {}: no such directory", source.display()))?;
    if !source.is_dir() {
        bail!("{} is not a directory", source.display());
    }
    let mut scratch = None;
    let dir: PathBuf = match dir {
        Some(dir) => dir.to_owned(),
        None => {
            let temporary = tempfile::tempdir().context("cannot create a temporary folder")?;
            let path = temporary.path().to_owned();
            scratch = Some(temporary);
            path
        }
    };
    let fabric = LocalFabric::start(&dir.join("fabric"), 3).await?;
    let note = match (&scratch, keep) {
        (Some(_), false) => " (a temporary folder, removed when the demo ends: --keep keeps it)",
        _ => "",
    };
    let result = demo_on(&fabric, &source, &dir, note).await;
    fabric.stop().await;
    match scratch {
        Some(temporary) if keep => {
            let kept = temporary.keep();
            crate::outln!(
                "kept: {} (the restored copy is in restored/)",
                kept.display()
            )?;
        }
        Some(_) => crate::outln!("the temporary folder is removed now")?,
        None => {}
    }
    result
}

/// The demo on a running `fabric`; the restored copy goes under `dir`,
/// which `note` describes after its path.
async fn demo_on(
    fabric: &LocalFabric,
    source: &Path,
    dir: &Path,
    note: &str,
) -> anyhow::Result<()> {
    crate::outln!(
        "fabric: coordinator {} and storage nodes {} (TLS, certificates of a CA of its own)",
        fabric.coordinator,
        fabric
            .nodes
            .iter()
            .map(|(id, _)| id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    let source_text = source
        .to_str()
        .with_context(|| format!("{} is not valid UTF-8", source.display()))?;
    let jobs = format!(
        "[job.demo]\ndirection = \"push\"\nclient = \"{AGENT_ID}\"\ninclude = [{source}]\nreplicas = 2\ninterval = \"24h\"\n",
        source = toml::Value::String(source_text.to_owned())
    );
    let mut client = fabric.remote.coordinator().await?;
    let submitted = client
        .submit_jobs(SubmitJobsRequest {
            toml: jobs,
            file_name: "demo.toml".into(),
            select: Vec::new(),
            no_run: false,
        })
        .await
        .map_err(|status| anyhow::anyhow!("{}", status.message()))?
        .into_inner();
    let run = submitted
        .runs
        .first()
        .context("the coordinator started no run")?
        .id
        .clone();
    crate::outln!("backing up {} with 2 replicas: run {run}", source.display())?;
    let mut events = client
        .watch_run(WatchRunRequest {
            run_id: run.clone(),
        })
        .await
        .map_err(|status| remote::status_error("watching the run", status))?
        .into_inner();
    let mut last = RunState::Unspecified;
    let mut reason = String::new();
    let mut shown = (0, String::new(), 0);
    while let Some(event) = events.next().await {
        let event = event.map_err(|status| remote::status_error("watching the run", status))?;
        last = event.state();
        let step = (event.state, event.dest.clone(), event.dest_state);
        if step == shown {
            continue;
        }
        shown = step;
        if !event.message.is_empty() {
            reason = event.message.clone();
        }
        let dest = if event.dest.is_empty() {
            String::new()
        } else {
            format!(
                " {} {}",
                event.dest,
                fabric_proto::enum_word(event.dest_state().as_str_name())
            )
        };
        crate::outln!("  {}{}", fabric_proto::enum_word(last.as_str_name()), dest)?;
    }
    if last != RunState::Done {
        bail!("the backup run {run} did not complete: {reason}");
    }

    crate::outln!("")?;
    let entries =
        commands::snapshot_entries(&fabric.remote, Some("demo".into()), None, None).await?;
    let rows: Vec<_> = entries
        .iter()
        .map(|(snapshot, nodes)| commands::snapshot_row(snapshot, nodes.clone()))
        .collect();
    output::print_rows(&rows, OutputFormat::Table)?;
    crate::outln!("{NEW_LEGEND}")?;
    let (snapshot, holders) = entries
        .last()
        .context("the catalogue lists no snapshot of the demo job")?;
    if holders.len() != 2 {
        bail!(
            "the snapshot is on {} nodes, 2 were asked for",
            holders.len()
        );
    }

    let target = dir.join("restored");
    if target.exists() {
        std::fs::remove_dir_all(&target)
            .with_context(|| format!("cannot clear {}", target.display()))?;
    }
    std::fs::create_dir_all(&target)?;
    let located = remote::locate(&fabric.remote, &snapshot.id, None, None).await?;
    // The default policy, as `fabricctl restore` without flags: no owners
    // given, no setuid or setgid bits; the comparison expects the same.
    let policy = fabric_chunkstore::restore::RestorePolicy::default();
    let restore_target = Box::new(fabric_chunkstore::restore::DirectoryTarget::new(
        target.clone(),
        policy,
    )?);
    let path = source.to_string_lossy().trim_start_matches('/').to_owned();
    let stats = fabric_node::restore_client::restore_from(
        &located.peer,
        fabric.remote.transport()?,
        &located.snapshot_id,
        &path,
        restore_target,
    )
    .await?;
    crate::outln!("")?;
    crate::outln!(
        "restored from {} into {}{note}: {}, {}",
        located.node,
        target.display(),
        crate::output::count(stats.files, "file"),
        bytes(stats.bytes)
    )?;
    for warning in commands::restore_warnings(&stats) {
        eprintln!("warning: {warning}");
    }
    let compared = crate::compare::compare_trees(source, &target, false, policy)?;
    crate::outln!(
        "compared byte for byte with {}: {} entries, {} identical",
        source.display(),
        compared.entries,
        bytes(compared.bytes)
    )?;
    Ok(())
}
