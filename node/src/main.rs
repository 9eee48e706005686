//! The `fabric-node` binary: parses flags, sets up logging, binds, and calls
//! [`fabric_node::serve`]. Everything else lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fabric_node::config::{LogFormat, NodeConfig, Role};

#[derive(Parser)]
#[command(
    name = "fabric-node",
    version,
    about = "A fabric storage node and client agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the storage service (and the agent's pull endpoint) until SIGTERM.
    ///
    /// Every key of the config file but `hooks` can be set by a flag, and
    /// all but `hooks` and `allow_commands` by an environment variable;
    /// those win over the file (`--allow-command` adds to the file's list).
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The TOML config file (optional: flags and environment suffice).
    #[arg(long, env = "FABRIC_NODE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:7401 (port 0: any free port).
    #[arg(long, env = "FABRIC_NODE_LISTEN")]
    listen: Option<SocketAddr>,
    /// The chunk store's directory.
    #[arg(long, env = "FABRIC_NODE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Unique node id (default: the host name).
    #[arg(long, env = "FABRIC_NODE_ID")]
    node_id: Option<String>,
    /// Address other nodes and the coordinator dial (default: https://<listen>, http:// with --insecure-plaintext).
    #[arg(long, env = "FABRIC_NODE_ADVERTISE")]
    advertise: Option<String>,
    /// Labels a job's dest may name, comma-separated.
    #[arg(long, env = "FABRIC_NODE_LABELS", value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// storage, agent, or both, comma-separated.
    #[arg(long, env = "FABRIC_NODE_ROLES", value_delimiter = ',')]
    roles: Option<Vec<String>>,
    /// Every coordinator's address, comma-separated, e.g. https://c1:7400,https://c2:7400 (the node follows the leader).
    #[arg(long, env = "FABRIC_NODE_COORDINATOR")]
    coordinator: Option<String>,
    /// Host name recorded in this agent's snapshots.
    #[arg(long, env = "FABRIC_NODE_HOSTNAME")]
    hostname: Option<String>,
    /// Below this many free bytes the node reports NOT_SERVING and refuses uploads.
    #[arg(long, env = "FABRIC_NODE_MIN_FREE_BYTES")]
    min_free_bytes: Option<u64>,
    /// Chunk bytes all uploads together may hold in memory.
    #[arg(long, env = "FABRIC_NODE_UPLOAD_MEMORY_BYTES")]
    upload_memory_bytes: Option<u64>,
    /// Chunk bytes one upload may hold in memory.
    #[arg(long, env = "FABRIC_NODE_MEMORY_PER_UPLOAD_BYTES")]
    memory_per_upload_bytes: Option<u64>,
    /// The agent's memory budget for each backup it sends (bytes).
    #[arg(long, env = "FABRIC_NODE_BACKUP_MEMORY_BYTES")]
    backup_memory_bytes: Option<u64>,
    /// Seconds an upload may send nothing before it is dropped.
    #[arg(long, env = "FABRIC_NODE_TRANSFER_IDLE_TIMEOUT_S")]
    transfer_idle_timeout_s: Option<u64>,
    /// Seconds a pack must be old before GC may sweep it.
    #[arg(long, env = "FABRIC_NODE_GC_GRACE_S")]
    gc_grace_s: Option<u64>,
    /// Free bytes this storage node asks the coordinator to keep by pruning
    /// (0: no pruning for space).
    #[arg(long, env = "FABRIC_NODE_TARGET_FREE_BYTES")]
    target_free_bytes: Option<u64>,
    /// How fast the scrub reads the store back, bytes a second (0: no scrub).
    #[arg(long, env = "FABRIC_NODE_SCRUB_BYTES_PER_S")]
    scrub_bytes_per_s: Option<u64>,
    /// Least seconds between two snapshots of one job, host and instance
    /// that a client or agent may upload (0: no limit).
    #[arg(long, env = "FABRIC_NODE_MIN_INTERVAL_S")]
    min_interval_s: Option<u64>,
    /// Flag a client's or agent's snapshot whose new bytes exceed this many
    /// times the usual (0: off).
    #[arg(long, env = "FABRIC_NODE_MAX_GROWTH")]
    max_growth: Option<f64>,
    /// Bytes per second this agent's sends may use (0: no limit).
    #[arg(long, env = "FABRIC_NODE_UPLOAD_LIMIT_BYTES_PER_S")]
    upload_limit_bytes_per_s: Option<u64>,
    /// Bytes per second this storage node takes in (0: no limit).
    #[arg(long, env = "FABRIC_NODE_INGEST_LIMIT_BYTES_PER_S")]
    ingest_limit_bytes_per_s: Option<u64>,
    /// Bytes each host's snapshots may add to this node's store (0: none).
    #[arg(long, env = "FABRIC_NODE_HOST_QUOTA_BYTES")]
    host_quota_bytes: Option<u64>,
    /// text or json.
    #[arg(long, env = "FABRIC_NODE_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// This node's certificate (PEM), from `fabricctl pki issue --node ID`.
    #[arg(long, env = "FABRIC_NODE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "FABRIC_NODE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// The fabric's CA certificate (PEM).
    #[arg(long, env = "FABRIC_NODE_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// No TLS, no authentication: anyone who reaches the port may do anything.
    #[arg(long, env = "FABRIC_NODE_INSECURE_PLAINTEXT")]
    insecure_plaintext: bool,
    /// Plaintext port serving only grpc.health.v1, for probes ("" for none) [default: 0.0.0.0:7421].
    #[arg(long, env = "FABRIC_NODE_HEALTH_LISTEN")]
    health_listen: Option<String>,
    /// The metrics port (GET /metrics, OpenMetrics; "" for none) [default: 0.0.0.0:7411].
    #[arg(long, env = "FABRIC_NODE_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// A command jobs may run here (repeatable; a prefix ends in " *"); adds to allow_commands.
    #[arg(long = "allow-command")]
    allow_commands: Vec<String>,
}

fn parse_role(text: &str) -> anyhow::Result<Role> {
    match text.trim() {
        "storage" => Ok(Role::Storage),
        "agent" => Ok(Role::Agent),
        other => anyhow::bail!("unknown role {other:?}: expected storage or agent"),
    }
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<NodeConfig> {
        let mut config = match &self.config {
            Some(path) => NodeConfig::from_file(path)?,
            None => NodeConfig::default(),
        };
        if let Some(value) = self.listen {
            config.listen = value;
        }
        if let Some(value) = self.data_dir {
            config.data_dir = value;
        }
        if let Some(value) = self.node_id {
            config.node_id = value;
        }
        if let Some(value) = self.advertise {
            config.advertise = value;
        }
        if let Some(value) = self.labels {
            config.labels = value.into_iter().filter(|l| !l.is_empty()).collect();
        }
        if let Some(value) = self.roles {
            config.roles = value
                .iter()
                .map(|role| parse_role(role))
                .collect::<anyhow::Result<_>>()?;
        }
        if let Some(value) = self.coordinator {
            config.coordinator = value;
        }
        if let Some(value) = self.hostname {
            config.hostname = value;
        }
        if let Some(value) = self.min_free_bytes {
            config.min_free_bytes = value;
        }
        if let Some(value) = self.upload_memory_bytes {
            config.upload_memory_bytes = value;
        }
        if let Some(value) = self.memory_per_upload_bytes {
            config.memory_per_upload_bytes = value;
        }
        if let Some(value) = self.backup_memory_bytes {
            config.backup_memory_bytes = value;
        }
        if let Some(value) = self.transfer_idle_timeout_s {
            config.transfer_idle_timeout_s = value;
        }
        if let Some(value) = self.gc_grace_s {
            config.gc_grace_s = value;
        }
        if let Some(value) = self.target_free_bytes {
            config.target_free_bytes = value;
        }
        if let Some(value) = self.scrub_bytes_per_s {
            config.scrub_bytes_per_s = value;
        }
        if let Some(value) = self.min_interval_s {
            config.min_interval_s = value;
        }
        if let Some(value) = self.max_growth {
            config.max_growth = value;
        }
        if let Some(value) = self.upload_limit_bytes_per_s {
            config.upload_limit_bytes_per_s = value;
        }
        if let Some(value) = self.ingest_limit_bytes_per_s {
            config.ingest_limit_bytes_per_s = value;
        }
        if let Some(value) = self.host_quota_bytes {
            config.host_quota_bytes = value;
        }
        if let Some(value) = self.log_format {
            config.log_format = value;
        }
        if let Some(value) = self.tls_cert {
            config.tls_cert = Some(value);
        }
        if let Some(value) = self.tls_key {
            config.tls_key = Some(value);
        }
        if let Some(value) = self.tls_ca {
            config.tls_ca = Some(value);
        }
        if self.insecure_plaintext {
            config.insecure_plaintext = true;
        }
        if let Some(value) = self.health_listen {
            config.health_listen = value;
        }
        if let Some(value) = self.metrics_listen {
            config.metrics_listen = value;
        }
        config.allow_commands.extend(self.allow_commands);
        Ok(config)
    }
}

fn main() -> anyhow::Result<()> {
    // Before the runtime starts its threads (see the module).
    fabric_node::allocator::tune();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = args.into_config()?;
            fabric_proto::standard::init_logging(config.log_format == LogFormat::Json);
            let shutdown = fabric_proto::standard::shutdown_signal_named()
                .context("cannot listen for SIGTERM and SIGINT")?;
            // Unusable TLS files and coordinator addresses fail before the
            // "listening" line, so a script never waits on an address that
            // will not serve.
            config
                .coordinators()
                .context("bad coordinator (config key `coordinator`, --coordinator, FABRIC_NODE_COORDINATOR)")?;
            if !config.insecure_plaintext {
                let completed = config.clone().complete(config.listen);
                completed
                    .transport_settings()
                    .server(&fabric_trust::Expect::Node(completed.node_id.clone()))?;
            }
            let listener = fabric_proto::standard::bind_and_announce("fabric-node", config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            let health = fabric_proto::standard::bind_health("fabric-node", &config.health_listen)
                .await
                .with_context(|| format!("cannot listen on {:?}", config.health_listen))?;
            let metrics =
                fabric_proto::standard::bind_metrics("fabric-node", &config.metrics_listen)
                    .await
                    .with_context(|| format!("cannot listen on {:?}", config.metrics_listen))?;
            // The signal's name goes into the reason of the runs it ends.
            let shutdown = async move { shutdown.await.to_owned() };
            let ports = fabric_node::SidePorts { health, metrics };
            fabric_node::serve_until_stopped(listener, ports, config, shutdown).await?;
        }
    }
    Ok(())
}
