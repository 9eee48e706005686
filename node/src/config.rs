//! The node's configuration: one documented struct, read from a TOML file,
//! with every key but `hooks` overridable by a flag and most by an
//! environment variable (the binary merges those; this module only knows
//! the file and the defaults).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a node does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Keeps a chunk store and serves the storage service.
    Storage,
    /// Runs jobs on a client: pushes its files, serves pulls.
    Agent,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `node.toml`. Every key is documented in the README and the Helm chart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Address to listen on (`FABRIC_NODE_LISTEN`, `--listen`).
    pub listen: SocketAddr,
    /// The chunk store's directory (`FABRIC_NODE_DATA_DIR`, `--data-dir`).
    pub data_dir: PathBuf,
    /// Unique node id (`FABRIC_NODE_ID`, `--node-id`); defaults to the host name.
    pub node_id: String,
    /// Address other nodes and the coordinator dial (`FABRIC_NODE_ADVERTISE`,
    /// `--advertise`); defaults to `https://<listen>` (`http://` with `insecure_plaintext`).
    pub advertise: String,
    /// Labels a job's `dest` may name (`FABRIC_NODE_LABELS`, comma-separated).
    pub labels: Vec<String>,
    /// `storage`, `agent` or both (`FABRIC_NODE_ROLES`, comma-separated).
    pub roles: Vec<Role>,
    /// Every coordinator's address, comma-separated, e.g.
    /// `https://c1:7400,https://c2:7400` (`FABRIC_NODE_COORDINATOR`,
    /// `--coordinator`; the file may also give a TOML array): the node
    /// follows whichever leads. One address for a single coordinator;
    /// empty: standalone. Checked at start ([`Self::coordinators`]).
    #[serde(deserialize_with = "comma_list_or_array")]
    pub coordinator: String,
    /// Host name recorded in the snapshots this node's agent makes
    /// (`FABRIC_NODE_HOSTNAME`); defaults to the system's.
    pub hostname: String,
    /// Report NOT_SERVING (and refuse uploads) when the store's file system
    /// has less free space than this, in bytes.
    pub min_free_bytes: u64,
    /// Bytes of chunk data all uploads together may hold in memory at once;
    /// at least one largest message (`transfer::MAX_MESSAGE_BYTES`), to
    /// which a smaller value is raised.
    pub upload_memory_bytes: u64,
    /// Bytes of chunk data one upload may hold in memory at once (its
    /// batches queued for the writer); a batch larger than this is taken
    /// alone. Default 16 MiB.
    pub memory_per_upload_bytes: u64,
    /// The agent's memory budget for each backup it sends, push or pull
    /// (`fabricctl backup --memory` for a backup by hand): the walk's
    /// buffers and the chunks in flight, see `memory_budget`. Default
    /// 21 MiB; a budget too small for the store's largest chunk is refused
    /// at start.
    pub backup_memory_bytes: u64,
    /// Seconds an upload may send nothing before this node drops it (what
    /// it sent stays uncommitted); senders say they are alive every
    /// minute. Default 300.
    pub transfer_idle_timeout_s: u64,
    /// Seconds a pack must be old before GC may sweep its unreferenced
    /// chunks: an upload that has not committed for this long is taken as
    /// abandoned. Keep it well above `transfer_idle_timeout_s`. Default 3600.
    pub gc_grace_s: u64,
    /// byteback's pruning: the free space, in bytes, this storage node asks
    /// to keep. Below it the coordinator removes the least important
    /// snapshots (never a job's last ones) and collects garbage until it
    /// is reached, or says why it cannot be. 0 (the default): no pruning
    /// for space.
    pub target_free_bytes: u64,
    /// How fast this storage node reads its whole store back to find
    /// damage (scrub), bytes a second; the pass starts again when it ends
    /// and resumes where it stopped after a restart. Default 4 MiB/s; 0
    /// turns the scrub off.
    pub scrub_bytes_per_s: u64,
    /// byteback's guard: the least seconds between two snapshots of one
    /// job, host and instance that a client or agent may upload here; a
    /// sooner one is refused with RESOURCE_EXHAUSTED naming when the next
    /// is allowed. 0 (the default): no limit.
    pub min_interval_s: u64,
    /// byteback's other guard: a client's or agent's snapshot whose new
    /// bytes exceed this many times the usual (the median of that source's
    /// last 10) is kept but flagged (`unusual_growth`: `status` shows it,
    /// `check` warns). 0 (the default): off.
    pub max_growth: f64,
    /// Bytes per second this agent's sends may use, all together: its
    /// pushes and the pulls it serves (0, the default: no limit).
    pub upload_limit_bytes_per_s: u64,
    /// Bytes per second this storage node takes in, all uploads and pulls
    /// together (0, the default: no limit).
    pub ingest_limit_bytes_per_s: u64,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// This node's certificate, role node, for its `node_id`
    /// (`FABRIC_NODE_TLS_CERT`, `--tls-cert`).
    pub tls_cert: Option<PathBuf>,
    /// Its key, mode 0600 (`FABRIC_NODE_TLS_KEY`, `--tls-key`).
    pub tls_key: Option<PathBuf>,
    /// The fabric's CA certificate (`FABRIC_NODE_TLS_CA`, `--tls-ca`).
    pub tls_ca: Option<PathBuf>,
    /// No TLS and no authentication (`--insecure-plaintext`): only for a
    /// throwaway fabric on a trusted network; logged, and shown by
    /// `fabricctl node list`.
    pub insecure_plaintext: bool,
    /// The plaintext port serving only grpc.health.v1, for probes
    /// (`FABRIC_NODE_HEALTH_LISTEN`; `""`: none).
    pub health_listen: String,
    /// The metrics port: `GET /metrics` in the OpenMetrics text format, with
    /// the node's TLS, for roles operator and monitor (`metrics_listen`,
    /// default `0.0.0.0:7411`; `""`: none).
    pub metrics_listen: String,
    /// Commands this agent runs for jobs (`pre`, `post`, `!command` values):
    /// each entry is a whole command line that a job's command must equal,
    /// or a prefix ending in ` *` whose command is run with the job's
    /// remaining words as arguments, without a shell. Default: none. The
    /// coordinator can ask, only the host decides.
    pub allow_commands: Vec<String>,
    /// Named hooks: a job's `pre = "@freeze"` runs this host's `freeze`
    /// command, whatever the job file says it does.
    pub hooks: BTreeMap<String, String>,
    /// Bytes each host's snapshots may add to this node's store (the sum
    /// of their `stored_bytes`); an upload that would go over fails with
    /// RESOURCE_EXHAUSTED and commits nothing. 0 (the default): none.
    pub host_quota_bytes: u64,
    /// Hosts with a quota of their own (0: none for that host).
    pub host_quotas: BTreeMap<String, u64>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7401)),
            data_dir: PathBuf::from("fabric-node-data"),
            node_id: String::new(),
            advertise: String::new(),
            labels: Vec::new(),
            roles: vec![Role::Storage, Role::Agent],
            coordinator: String::new(),
            hostname: String::new(),
            min_free_bytes: 256 * 1024 * 1024,
            upload_memory_bytes: 256 * 1024 * 1024,
            memory_per_upload_bytes: 16 * 1024 * 1024,
            backup_memory_bytes: crate::memory_budget::DEFAULT_BACKUP_MEMORY,
            transfer_idle_timeout_s: crate::transfer::IDLE_TIMEOUT.as_secs(),
            gc_grace_s: fabric_chunkstore::DEFAULT_GC_GRACE.as_secs(),
            target_free_bytes: 0,
            scrub_bytes_per_s: 4 * 1024 * 1024,
            min_interval_s: 0,
            max_growth: 0.0,
            upload_limit_bytes_per_s: 0,
            ingest_limit_bytes_per_s: 0,
            log_format: LogFormat::Text,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            insecure_plaintext: false,
            health_listen: "0.0.0.0:7421".to_owned(),
            metrics_listen: "0.0.0.0:7411".to_owned(),
            allow_commands: Vec::new(),
            hooks: BTreeMap::new(),
            host_quota_bytes: 0,
            host_quotas: BTreeMap::new(),
        }
    }
}

/// A config file that cannot be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid for this struct.
    #[error("bad config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and key.
        source: Box<toml::de::Error>,
    },
}

/// A string, or an array of strings joined by commas (`coordinator`).
fn comma_list_or_array<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum CommaListOrArray {
        CommaList(String),
        Array(Vec<String>),
    }
    match CommaListOrArray::deserialize(deserializer) {
        Ok(CommaListOrArray::CommaList(list)) => Ok(list),
        Ok(CommaListOrArray::Array(elements)) => Ok(elements.join(",")),
        Err(_) => Err(serde::de::Error::custom(
            "expected a string of comma-separated addresses or an array of addresses",
        )),
    }
}

impl NodeConfig {
    /// The coordinators `coordinator` lists; `None` when it is empty (a
    /// standalone node); an error naming the list and the element that is
    /// not an address.
    pub fn coordinators(
        &self,
    ) -> Result<
        Option<fabric_proto::coordinator_addresses::CoordinatorAddresses>,
        fabric_proto::coordinator_addresses::AddressListError,
    > {
        if self.coordinator.trim().is_empty() {
            return Ok(None);
        }
        fabric_proto::coordinator_addresses::CoordinatorAddresses::parse(&self.coordinator)
            .map(Some)
    }

    /// The quotas `host_quota_bytes` and `[host_quotas]` set.
    pub fn host_quotas(&self) -> crate::quota::HostQuotas {
        crate::quota::HostQuotas {
            default_bytes: self.host_quota_bytes,
            per_host: self.host_quotas.clone(),
        }
    }

    /// The guards `min_interval_s` and `max_growth` set (0: off); the host
    /// quota, which depends on the snapshot's host, is the receiver's to add.
    pub fn commit_guards(&self) -> fabric_chunkstore::CommitGuards {
        fabric_chunkstore::CommitGuards {
            min_interval_ms: (self.min_interval_s > 0).then(|| {
                i64::try_from(self.min_interval_s)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1000)
            }),
            max_growth: (self.max_growth > 0.0).then_some(self.max_growth),
            host_quota_bytes: None,
        }
    }

    /// Read `path`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Fill the keys whose defaults depend on others or on the system.
    pub fn complete(mut self, local_addr: SocketAddr) -> Self {
        if self.hostname.is_empty() {
            self.hostname = system_hostname();
        }
        if self.node_id.is_empty() {
            self.node_id = self.hostname.clone();
        }
        if self.advertise.is_empty() {
            let scheme = if self.insecure_plaintext {
                "http"
            } else {
                "https"
            };
            self.advertise = format!("{scheme}://{local_addr}");
        }
        self
    }

    /// The TLS files and the plaintext switch.
    pub fn transport_settings(&self) -> fabric_trust::transport::TransportSettings {
        fabric_trust::transport::TransportSettings::new(
            self.tls_ca.as_deref(),
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.insecure_plaintext,
        )
    }

    /// Whether this node has `role`.
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

/// The machine's host name, or "localhost" when it cannot be read.
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let config: NodeConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:9000"
            data_dir = "/var/lib/fabric"
            node_id = "n1"
            labels = ["ssd", "eu"]
            roles = ["storage"]
            coordinator = "https://c:7400"
            allow_commands = ["/usr/local/bin/db-freeze", "/usr/local/bin/dump *"]
            [hooks]
            thaw = "/usr/local/bin/db-thaw --all"
            "#,
        )
        .unwrap();
        assert_eq!(config.node_id, "n1");
        assert_eq!(config.roles, vec![Role::Storage]);
        assert_eq!(config.labels, vec!["ssd", "eu"]);
        assert_eq!(config.allow_commands.len(), 2);
        assert_eq!(config.hooks["thaw"], "/usr/local/bin/db-thaw --all");
    }

    #[test]
    fn coordinators_are_a_comma_list_or_an_array() {
        let list: NodeConfig =
            toml::from_str("coordinator = \"https://c1:7400, https://c2:7400\"").unwrap();
        let array: NodeConfig =
            toml::from_str("coordinator = [\"https://c1:7400\", \"https://c2:7400\"]").unwrap();
        for config in [list, array] {
            let coordinators = config.coordinators().unwrap().unwrap();
            assert_eq!(coordinators.to_string(), "https://c1:7400,https://c2:7400");
        }
        let standalone: NodeConfig = toml::from_str("").unwrap();
        assert_eq!(standalone.coordinators().unwrap(), None);
        let empty_array: NodeConfig = toml::from_str("coordinator = []").unwrap();
        assert_eq!(empty_array.coordinators().unwrap(), None);
        let bad: NodeConfig = toml::from_str("coordinator = [\"https://c1:7400\", \"\"]").unwrap();
        assert_eq!(
            bad.coordinators().unwrap_err().to_string(),
            "coordinator addresses \"https://c1:7400,\": element 2 is empty (give addresses separated by single commas)"
        );
        let err = toml::from_str::<NodeConfig>("coordinator = 7400").unwrap_err();
        assert!(
            err.to_string()
                .contains("expected a string of comma-separated addresses or an array"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_key_is_named() {
        let err = toml::from_str::<NodeConfig>("listn = \"x\"").unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");
    }
}
