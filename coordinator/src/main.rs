//! The `fabric-coordinator` binary: parses flags (which override the config
//! file and the environment), sets up logging, binds, and hands over to
//! [`fabric_coordinator::serve`]. It prints exactly one line on stdout,
//! `fabric-coordinator listening on ADDR`, once bound; logs go to stderr.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fabric_coordinator::{CoordinatorConfig, LogFormat, StateKind};

#[derive(Debug, Parser)]
#[command(
    name = "fabric-coordinator",
    version,
    about = "The fabric's coordinator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the coordinator until SIGTERM or Ctrl-C.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML config file (every key optional).
    #[arg(long, env = "FABRIC_COORDINATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0:7400].
    #[arg(long, env = "FABRIC_COORDINATOR_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory of the state database.
    #[arg(long, env = "FABRIC_COORDINATOR_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Heartbeat interval asked of nodes, e.g. "5s".
    #[arg(long, env = "FABRIC_COORDINATOR_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// Missed heartbeats before a node is lost.
    #[arg(long, env = "FABRIC_COORDINATOR_LOST_AFTER_MISSED_HEARTBEATS")]
    lost_after_missed_heartbeats: Option<u32>,
    /// How long a run waits for its nodes before failing, e.g. "10m".
    #[arg(long, env = "FABRIC_COORDINATOR_QUEUE_TIMEOUT", value_parser = humantime::parse_duration)]
    queue_timeout: Option<Duration>,
    /// Runs in progress at once in the fabric (0: no limit).
    #[arg(long, env = "FABRIC_COORDINATOR_WORKER_LIMIT")]
    worker_limit: Option<u32>,
    /// Runs in progress at once on one client node (0: no limit).
    #[arg(long, env = "FABRIC_COORDINATOR_NODE_WORKER_LIMIT")]
    node_worker_limit: Option<u32>,
    /// Each storage node collects garbage at least this often, e.g. "24h"
    /// ("0s": only after deletions and on demand).
    #[arg(long, env = "FABRIC_COORDINATOR_GC_EVERY", value_parser = humantime::parse_duration)]
    gc_every: Option<Duration>,
    /// How long a GC lease lasts, e.g. "1h".
    #[arg(long, env = "FABRIC_COORDINATOR_GC_LEASE", value_parser = humantime::parse_duration)]
    gc_lease: Option<Duration>,
    /// Hours in which routine GC may start, "HH:MM-HH:MM".
    #[arg(long, env = "FABRIC_COORDINATOR_GC_WINDOW")]
    gc_window: Option<String>,
    /// The GC window's time zone (IANA name).
    #[arg(long, env = "FABRIC_COORDINATOR_GC_TIME_ZONE")]
    gc_time_zone: Option<String>,
    /// How far before the oldest run in flight a leased GC spares packs, e.g. "5m".
    #[arg(long, env = "FABRIC_COORDINATOR_GC_CLOCK_MARGIN", value_parser = humantime::parse_duration)]
    gc_clock_margin: Option<Duration>,
    /// How long a storage node may be lost before its snapshots are copied
    /// again elsewhere, e.g. "30m" ("0s": never).
    #[arg(long, env = "FABRIC_COORDINATOR_REPLACE_AFTER", value_parser = humantime::parse_duration)]
    replace_after: Option<Duration>,
    /// How often re-replication looks at the catalogue, e.g. "30s".
    #[arg(long, env = "FABRIC_COORDINATOR_REPLICATION_CHECK_EVERY", value_parser = humantime::parse_duration)]
    replication_check_every: Option<Duration>,
    /// Re-replication copies one node sends or receives at once.
    #[arg(long, env = "FABRIC_COORDINATOR_REPLICATION_PER_NODE")]
    replication_per_node: Option<u32>,
    /// Bytes a second each re-replication copy may send (0: no limit).
    #[arg(long, env = "FABRIC_COORDINATOR_REPLICATION_BANDWIDTH_BYTES_PER_S")]
    replication_bandwidth_bytes_per_s: Option<u64>,
    /// Log format on stderr.
    #[arg(long, env = "FABRIC_COORDINATOR_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// The coordinator's certificate (PEM), from `fabricctl pki issue --coordinator NAME`.
    #[arg(long, env = "FABRIC_COORDINATOR_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "FABRIC_COORDINATOR_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// The fabric's CA certificate (PEM).
    #[arg(long, env = "FABRIC_COORDINATOR_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// No TLS, no authentication: anyone who reaches the port may do anything.
    #[arg(long, env = "FABRIC_COORDINATOR_INSECURE_PLAINTEXT")]
    insecure_plaintext: bool,
    /// Plaintext port serving only grpc.health.v1, for probes ("" for none) [default: 0.0.0.0:7420].
    #[arg(long, env = "FABRIC_COORDINATOR_HEALTH_LISTEN")]
    health_listen: Option<String>,
    /// The metrics port (GET /metrics, OpenMetrics; "" for none) [default: 0.0.0.0:7410].
    #[arg(long, env = "FABRIC_COORDINATOR_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Where the state is kept: sled in --data-dir (one coordinator) or etcd
    /// (several coordinators, one leading) [default: sled].
    #[arg(long, env = "FABRIC_COORDINATOR_STATE", value_enum)]
    state: Option<StateKind>,
    /// etcd's client URLs, comma-separated (http://, or https:// with --etcd-tls-ca).
    #[arg(long, env = "FABRIC_COORDINATOR_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Option<Vec<String>>,
    /// The fabric's key prefix in etcd [default: fabric].
    #[arg(long, env = "FABRIC_COORDINATOR_ETCD_PREFIX")]
    etcd_prefix: Option<String>,
    /// The CA of etcd's certificates (PEM).
    #[arg(long, env = "FABRIC_COORDINATOR_ETCD_TLS_CA")]
    etcd_tls_ca: Option<PathBuf>,
    /// This coordinator's client certificate for etcd (PEM).
    #[arg(long, env = "FABRIC_COORDINATOR_ETCD_TLS_CERT")]
    etcd_tls_cert: Option<PathBuf>,
    /// Its key (PEM).
    #[arg(long, env = "FABRIC_COORDINATOR_ETCD_TLS_KEY")]
    etcd_tls_key: Option<PathBuf>,
    /// The leader's etcd lease, e.g. "5s" (whole seconds, at least 2s).
    #[arg(long, env = "FABRIC_COORDINATOR_LEADER_LEASE", value_parser = humantime::parse_duration)]
    leader_lease: Option<Duration>,
    /// The URL other processes reach this coordinator at, e.g. https://10.1.2.3:7400 (needed with etcd).
    #[arg(long, env = "FABRIC_COORDINATOR_ADVERTISE_ADDRESS")]
    advertise_address: Option<String>,
}

impl ServeArgs {
    fn config(&self) -> anyhow::Result<CoordinatorConfig> {
        let mut config = match &self.config {
            Some(path) => CoordinatorConfig::from_file(path)?,
            None => CoordinatorConfig::default(),
        };
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(data_dir) = &self.data_dir {
            config.data_dir = data_dir.clone();
        }
        if let Some(interval) = self.heartbeat_interval {
            config.heartbeat_interval = interval;
        }
        if let Some(missed) = self.lost_after_missed_heartbeats {
            config.lost_after_missed_heartbeats = missed;
        }
        if let Some(timeout) = self.queue_timeout {
            config.queue_timeout = timeout;
        }
        if let Some(limit) = self.worker_limit {
            config.worker_limit = limit;
        }
        if let Some(limit) = self.node_worker_limit {
            config.node_worker_limit = limit;
        }
        if let Some(every) = self.gc_every {
            config.gc_every = every;
        }
        if let Some(lease) = self.gc_lease {
            config.gc_lease = lease;
        }
        if let Some(window) = &self.gc_window {
            config.gc_window = Some(window.clone());
        }
        if let Some(zone) = &self.gc_time_zone {
            config.gc_time_zone = zone.clone();
        }
        if let Some(margin) = self.gc_clock_margin {
            config.gc_clock_margin = margin;
        }
        if let Some(after) = self.replace_after {
            config.replace_after = after;
        }
        if let Some(every) = self.replication_check_every {
            config.replication_check_every = every;
        }
        if let Some(per_node) = self.replication_per_node {
            config.replication_per_node = per_node;
        }
        if let Some(limit) = self.replication_bandwidth_bytes_per_s {
            config.replication_bandwidth_bytes_per_s = limit;
        }
        if let Some(format) = self.log_format {
            config.log_format = format;
        }
        if let Some(path) = &self.tls_cert {
            config.tls_cert = Some(path.clone());
        }
        if let Some(path) = &self.tls_key {
            config.tls_key = Some(path.clone());
        }
        if let Some(path) = &self.tls_ca {
            config.tls_ca = Some(path.clone());
        }
        if self.insecure_plaintext {
            config.insecure_plaintext = true;
        }
        if let Some(address) = &self.health_listen {
            config.health_listen = address.clone();
        }
        if let Some(address) = &self.metrics_listen {
            config.metrics_listen = address.clone();
        }
        if let Some(state) = self.state {
            config.state = state;
        }
        if let Some(endpoints) = &self.etcd_endpoints {
            config.etcd_endpoints = endpoints.iter().map(|e| e.trim().to_owned()).collect();
        }
        if let Some(prefix) = &self.etcd_prefix {
            config.etcd_prefix = prefix.clone();
        }
        if let Some(path) = &self.etcd_tls_ca {
            config.etcd_tls_ca = Some(path.clone());
        }
        if let Some(path) = &self.etcd_tls_cert {
            config.etcd_tls_cert = Some(path.clone());
        }
        if let Some(path) = &self.etcd_tls_key {
            config.etcd_tls_key = Some(path.clone());
        }
        if let Some(lease) = self.leader_lease {
            config.leader_lease = lease;
        }
        if let Some(address) = &self.advertise_address {
            config.advertise_address = address.clone();
        }
        config.validate()?;
        Ok(config)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = args.config()?;
            fabric_proto::standard::init_logging(config.log_format == LogFormat::Json);
            let shutdown = fabric_proto::standard::shutdown_signal()
                .context("cannot listen for SIGTERM and SIGINT")?;
            // Unusable TLS files fail before the "listening" line.
            if !config.insecure_plaintext {
                config
                    .transport_settings()
                    .server(&fabric_trust::Expect::Coordinator)?;
            }
            let listener =
                fabric_proto::standard::bind_and_announce("fabric-coordinator", config.listen)
                    .await
                    .with_context(|| format!("cannot listen on {}", config.listen))?;
            let health =
                fabric_proto::standard::bind_health("fabric-coordinator", &config.health_listen)
                    .await
                    .with_context(|| format!("cannot listen on {:?}", config.health_listen))?;
            let metrics =
                fabric_proto::standard::bind_metrics("fabric-coordinator", &config.metrics_listen)
                    .await
                    .with_context(|| format!("cannot listen on {:?}", config.metrics_listen))?;
            fabric_coordinator::serve_with_ports(listener, health, metrics, config, shutdown)
                .await?;
            Ok(())
        }
    }
}
