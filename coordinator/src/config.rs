//! The coordinator's configuration: one documented struct, read from a TOML
//! file, with every field defaulted. Flags and environment variables are
//! applied on top by the binary. This module never opens sockets or the
//! state directory; it only describes them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a bad key or value.
    #[error("bad config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, as the TOML parser says it (with the key).
        message: String,
    },
    /// A value that parses but makes no sense.
    #[error("bad config value for {key}: {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the coordinator keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StateKind {
    /// sled in `data_dir`: one coordinator.
    #[default]
    Sled,
    /// etcd at `etcd_endpoints`: several coordinators, one leading.
    Etcd,
}

/// Everything the coordinator needs to run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// Address to listen on (`listen`, default `0.0.0.0:7400`).
    pub listen: SocketAddr,
    /// Directory of the sled database (`data_dir`, default `fabric-coordinator-data`).
    pub data_dir: PathBuf,
    /// How often nodes send a heartbeat (`heartbeat_interval`, e.g. `"5s"`).
    #[serde(with = "humantime_serde_duration")]
    pub heartbeat_interval: Duration,
    /// A node missing this many heartbeats in a row is marked lost
    /// (`lost_after_missed_heartbeats`, default 3).
    pub lost_after_missed_heartbeats: u32,
    /// How long a run waits for its client node or for a destination that
    /// can serve it before it fails with the reason (`queue_timeout`,
    /// default `"10m"`).
    #[serde(with = "humantime_serde_duration")]
    pub queue_timeout: Duration,
    /// Runs in progress at once in the whole fabric (`worker_limit`,
    /// default 0: no limit); more wait their turn in the queue.
    pub worker_limit: u32,
    /// Runs in progress at once on one client node (`node_worker_limit`,
    /// default 0: no limit).
    pub node_worker_limit: u32,
    /// `text` or `json` (`log_format`).
    pub log_format: LogFormat,
    /// The coordinator's certificate, role coordinator (`tls_cert`).
    pub tls_cert: Option<PathBuf>,
    /// Its key (`tls_key`, mode 0600).
    pub tls_key: Option<PathBuf>,
    /// The fabric's CA certificate (`tls_ca`).
    pub tls_ca: Option<PathBuf>,
    /// No TLS and no authentication (`insecure_plaintext`): only for a
    /// throwaway fabric on a trusted network; logged as a warning.
    pub insecure_plaintext: bool,
    /// The plaintext port that serves only grpc.health.v1, for probes
    /// (`health_listen`, default `0.0.0.0:7420`; `""`: none).
    pub health_listen: String,
    /// The metrics port: `GET /metrics` in the OpenMetrics text format, with
    /// the coordinator's TLS, for roles operator and monitor by certificate
    /// or bearer token (`metrics_listen`, default `0.0.0.0:7410`; `""`:
    /// none).
    pub metrics_listen: String,
    /// Each storage node collects garbage at least this often (`gc_every`,
    /// default `"24h"`; `"0s"`: only after deletions and on demand).
    #[serde(with = "humantime_serde_duration")]
    pub gc_every: Duration,
    /// How long a GC lease lasts (`gc_lease`, default `"1h"`): a node
    /// stops rewriting packs at its end and leaves the rest to its next.
    #[serde(with = "humantime_serde_duration")]
    pub gc_lease: Duration,
    /// Hours in which routine and retention-driven GC may start
    /// (`gc_window`, e.g. `"01:00-05:00"`; default: any time). GC for
    /// space and on demand do not wait for it.
    pub gc_window: Option<String>,
    /// The window's time zone (`gc_time_zone`, an IANA name, default `UTC`).
    pub gc_time_zone: String,
    /// A leased GC spares packs written since this long before the oldest
    /// run in flight began (`gc_clock_margin`, default `"5m"`): more than
    /// the clocks of the coordinator and a node may differ.
    #[serde(with = "humantime_serde_duration")]
    pub gc_clock_margin: Duration,
    /// How long a storage node may be lost before the snapshots it held
    /// are copied again to other nodes, to keep their replica targets
    /// (`replace_after`, default `"30m"`; `"0s"`: never).
    #[serde(with = "humantime_serde_duration")]
    pub replace_after: Duration,
    /// How often re-replication looks at the catalogue, and how long a
    /// snapshot must be short of its target before a copy starts
    /// (`replication_check_every`, default `"30s"`).
    #[serde(with = "humantime_serde_duration")]
    pub replication_check_every: Duration,
    /// The most re-replication copies one node sends or receives at once
    /// (`replication_per_node`, default 1).
    pub replication_per_node: u32,
    /// The most bytes a second each re-replication copy sends
    /// (`replication_bandwidth_bytes_per_s`, default 0: no limit beyond
    /// the nodes' own).
    pub replication_bandwidth_bytes_per_s: u64,
    /// Where the state is kept (`state`, `sled` by default, or `etcd`).
    pub state: StateKind,
    /// etcd's client URLs (`etcd_endpoints`, e.g.
    /// `["http://etcd-0.etcd:2379"]`; `https://` with `etcd_tls_ca`).
    pub etcd_endpoints: Vec<String>,
    /// The key prefix of this fabric in etcd (`etcd_prefix`, default
    /// `fabric`): the state under `PREFIX/state/`, the election at
    /// `PREFIX/leader`.
    pub etcd_prefix: String,
    /// The CA of etcd's certificates (`etcd_tls_ca`).
    pub etcd_tls_ca: Option<PathBuf>,
    /// This coordinator's client certificate for etcd (`etcd_tls_cert`).
    pub etcd_tls_cert: Option<PathBuf>,
    /// Its key (`etcd_tls_key`).
    pub etcd_tls_key: Option<PathBuf>,
    /// The leader's etcd lease (`leader_lease`, default `"5s"`, whole
    /// seconds, at least 2s): a dead leader is replaced about this long
    /// after it stopped, and a leader that cannot renew it for this long
    /// stops.
    #[serde(with = "humantime_serde_duration")]
    pub leader_lease: Duration,
    /// The URL other processes reach this coordinator at
    /// (`advertise_address`, e.g. `https://10.1.2.3:7400`): followers send
    /// callers to the leader's. Required with `state = "etcd"` when
    /// `listen` is a wildcard address; otherwise it defaults to the bound
    /// address.
    pub advertise_address: String,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7400)),
            data_dir: PathBuf::from("fabric-coordinator-data"),
            heartbeat_interval: Duration::from_secs(5),
            lost_after_missed_heartbeats: 3,
            queue_timeout: Duration::from_secs(600),
            worker_limit: 0,
            node_worker_limit: 0,
            log_format: LogFormat::Text,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            insecure_plaintext: false,
            health_listen: "0.0.0.0:7420".to_owned(),
            metrics_listen: "0.0.0.0:7410".to_owned(),
            gc_every: Duration::from_secs(24 * 60 * 60),
            gc_lease: Duration::from_secs(60 * 60),
            gc_window: None,
            gc_time_zone: "UTC".to_owned(),
            gc_clock_margin: Duration::from_secs(5 * 60),
            replace_after: Duration::from_secs(30 * 60),
            replication_check_every: Duration::from_secs(30),
            replication_per_node: 1,
            replication_bandwidth_bytes_per_s: 0,
            state: StateKind::Sled,
            etcd_endpoints: Vec::new(),
            etcd_prefix: "fabric".to_owned(),
            etcd_tls_ca: None,
            etcd_tls_cert: None,
            etcd_tls_key: None,
            leader_lease: Duration::from_secs(5),
            advertise_address: String::new(),
        }
    }
}

impl CoordinatorConfig {
    /// Reads a TOML config file; absent keys keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(path, &text)
    }

    /// Parses a config from TOML text; `path` only names it in errors.
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: error.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_interval.is_zero() {
            return Err(ConfigError::Invalid {
                key: "heartbeat_interval",
                message: "must be more than zero".into(),
            });
        }
        if self.gc_lease < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                key: "gc_lease",
                message: "must be at least 1s".into(),
            });
        }
        self.gc_settings()?;
        if self.replication_per_node == 0 {
            return Err(ConfigError::Invalid {
                key: "replication_per_node",
                message: "must be at least 1".into(),
            });
        }
        if self.replication_check_every < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                key: "replication_check_every",
                message: "must be at least 1s".into(),
            });
        }
        if self.lost_after_missed_heartbeats == 0 {
            return Err(ConfigError::Invalid {
                key: "lost_after_missed_heartbeats",
                message: "must be at least 1".into(),
            });
        }
        if self.state == StateKind::Etcd {
            self.validate_etcd()?;
        }
        Ok(())
    }

    fn validate_etcd(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        if self.etcd_endpoints.is_empty() {
            return invalid(
                "etcd_endpoints",
                "state = \"etcd\" needs at least one etcd endpoint".into(),
            );
        }
        for endpoint in &self.etcd_endpoints {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return invalid(
                    "etcd_endpoints",
                    format!("{endpoint:?} is not an http:// or https:// URL"),
                );
            }
        }
        let address = self.advertise_address.trim();
        if address.is_empty() {
            // A listening address a caller can dial is the advertised one
            // (`advertised_address`); a wildcard is not.
            if self.listen.ip().is_unspecified() {
                return invalid(
                    "advertise_address",
                    format!(
                        "state = \"etcd\" with listen = {} needs the URL other processes reach this coordinator at, e.g. https://10.1.2.3:7400",
                        self.listen
                    ),
                );
            }
        } else if !(address.starts_with("http://") || address.starts_with("https://"))
            || address.contains(',')
            || address.contains(char::is_whitespace)
        {
            return invalid(
                "advertise_address",
                format!("{address:?} is not one http:// or https:// URL"),
            );
        }
        if self.leader_lease < Duration::from_secs(2) {
            return invalid("leader_lease", "must be at least 2s".into());
        }
        let prefix = self.etcd_prefix.trim_matches('/');
        if prefix.is_empty() {
            return invalid("etcd_prefix", "must not be empty".into());
        }
        if self.etcd_tls_cert.is_some() != self.etcd_tls_key.is_some() {
            return invalid(
                "etcd_tls_cert",
                "etcd_tls_cert and etcd_tls_key go together".into(),
            );
        }
        if self.etcd_tls_cert.is_some() && self.etcd_tls_ca.is_none() {
            return invalid(
                "etcd_tls_ca",
                "a client certificate for etcd needs etcd's CA too".into(),
            );
        }
        Ok(())
    }

    /// The URL that followers give callers for this coordinator:
    /// `advertise_address`, or the address it is bound to (`bound`) with the
    /// scheme its transport speaks when none is set.
    pub fn advertised_address(&self, bound: SocketAddr) -> String {
        let address = self.advertise_address.trim();
        if !address.is_empty() {
            return address.to_owned();
        }
        let scheme = if self.insecure_plaintext {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{bound}")
    }

    /// The TLS files for etcd, read, if any are set.
    pub fn etcd_tls(&self) -> Result<Option<crate::etcd::EtcdTls>, ConfigError> {
        let Some(ca) = &self.etcd_tls_ca else {
            return Ok(None);
        };
        let read = |key: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| ConfigError::Invalid {
                key,
                message: format!("cannot read {}: {source}", path.display()),
            })
        };
        let identity = match (&self.etcd_tls_cert, &self.etcd_tls_key) {
            (Some(cert), Some(key)) => {
                Some((read("etcd_tls_cert", cert)?, read("etcd_tls_key", key)?))
            }
            _ => None,
        };
        Ok(Some(crate::etcd::EtcdTls {
            ca_pem: read("etcd_tls_ca", ca)?,
            identity,
        }))
    }

    /// When storage nodes collect garbage, as the engine takes it.
    pub fn gc_settings(&self) -> Result<crate::engine::GcSettings, ConfigError> {
        let window = self
            .gc_window
            .as_deref()
            .map(crate::schedule::Window::parse)
            .transpose()
            .map_err(|message| ConfigError::Invalid {
                key: "gc_window",
                message,
            })?;
        let time_zone =
            jiff::tz::TimeZone::get(&self.gc_time_zone).map_err(|_| ConfigError::Invalid {
                key: "gc_time_zone",
                message: format!("{:?} is not a known time zone", self.gc_time_zone),
            })?;
        Ok(crate::engine::GcSettings {
            every: self.gc_every,
            lease: self.gc_lease,
            window,
            time_zone,
            clock_margin: self.gc_clock_margin,
        })
    }

    /// How snapshots are kept at their replica targets, as the engine
    /// takes it.
    pub fn replication_settings(&self) -> crate::engine::ReplicationSettings {
        crate::engine::ReplicationSettings {
            replace_after: self.replace_after,
            check_every: self.replication_check_every,
            per_node: self.replication_per_node,
            bandwidth_limit_bytes_per_s: self.replication_bandwidth_bytes_per_s,
        }
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

    /// How long without a heartbeat before a node is lost.
    pub fn lost_after(&self) -> Duration {
        self.heartbeat_interval
            .saturating_mul(self.lost_after_missed_heartbeats)
    }
}

/// Durations as humantime strings (`"5s"`, `"10m"`), or plain seconds.
mod humantime_serde_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Seconds(u64),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(deserializer)? {
            Raw::Seconds(seconds) => Ok(Duration::from_secs(seconds)),
            Raw::Text(text) => humantime::parse_duration(&text).map_err(|error| {
                serde::de::Error::custom(format!("{text:?} is not a duration like \"5s\": {error}"))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_to_absent_keys() {
        let config =
            CoordinatorConfig::from_toml(Path::new("c.toml"), "queue_timeout = \"2m\"\n").unwrap();
        assert_eq!(config.queue_timeout, Duration::from_secs(120));
        assert_eq!(config.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(config.lost_after(), Duration::from_secs(15));
        assert_eq!(config.listen, SocketAddr::from(([0, 0, 0, 0], 7400)));
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        let error = CoordinatorConfig::from_toml(Path::new("c.toml"), "heartbeat = \"5s\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("c.toml") && error.contains("heartbeat"),
            "{error}"
        );
        let error =
            CoordinatorConfig::from_toml(Path::new("c.toml"), "heartbeat_interval = \"soon\"\n")
                .unwrap_err()
                .to_string();
        assert!(error.contains("soon"), "{error}");
        let error =
            CoordinatorConfig::from_toml(Path::new("c.toml"), "lost_after_missed_heartbeats = 0\n")
                .unwrap_err()
                .to_string();
        assert!(error.contains("lost_after_missed_heartbeats"), "{error}");
    }

    #[test]
    fn etcd_needs_endpoints_and_an_advertised_address() {
        let parse = |text: &str| {
            CoordinatorConfig::from_toml(Path::new("c.toml"), text).map_err(|e| e.to_string())
        };
        let error = parse("state = \"etcd\"\n").unwrap_err();
        assert!(error.contains("etcd_endpoints"), "{error}");
        let error =
            parse("state = \"etcd\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]\n").unwrap_err();
        assert!(error.contains("advertise_address"), "{error}");
        let bound = parse(
            "state = \"etcd\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]\nlisten = \"127.0.0.1:0\"\n",
        )
        .unwrap();
        assert_eq!(
            bound.advertised_address("127.0.0.1:7400".parse().unwrap()),
            "https://127.0.0.1:7400"
        );
        let error = parse(
            "state = \"etcd\"\netcd_endpoints = [\"127.0.0.1:2379\"]\nadvertise_address = \"https://a:7400\"\n",
        )
        .unwrap_err();
        assert!(error.contains("127.0.0.1:2379"), "{error}");
        let error = parse(
            "state = \"etcd\"\netcd_endpoints = [\"http://e:2379\"]\nadvertise_address = \"https://a:7400,https://b:7400\"\n",
        )
        .unwrap_err();
        assert!(error.contains("advertise_address"), "{error}");
        let error = parse(
            "state = \"etcd\"\netcd_endpoints = [\"http://e:2379\"]\nadvertise_address = \"https://a:7400\"\nleader_lease = \"1s\"\n",
        )
        .unwrap_err();
        assert!(error.contains("leader_lease"), "{error}");
        let config = parse(
            "state = \"etcd\"\netcd_endpoints = [\"http://e:2379\"]\nadvertise_address = \"https://a:7400\"\n",
        )
        .unwrap();
        assert_eq!(config.state, StateKind::Etcd);
        assert_eq!(config.leader_lease, Duration::from_secs(5));
        assert_eq!(config.etcd_prefix, "fabric");
    }
}
