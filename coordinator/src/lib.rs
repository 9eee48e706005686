//! fabric-coordinator: the fabric's brain and its central monitoring
//! database. [`serve`] runs the `fabric.v1.Coordinator` service over a sled
//! state directory: the node registry and sessions, jobs from TOML files,
//! runs (push, pull with a passive client, instance expansion) with their
//! per-destination states, every transition as a stored event, and the
//! snapshot catalogue.
//!
//! Pure logic: [`dest`] (destination grammar), [`jobfile`] (jobs files; snapshot
//! names come from `fabric_proto::naming`),
//! [`check`] (freshness), [`runs`] (the run
//! state machine), [`job_history`] (what a resubmission changed). Who may
//! call what is `fabric_trust`'s table; [`tokens`] keeps bearer tokens. Stateful parts: [`state`] (sled), [`engine`] (live state),
//! [`service`] (gRPC), [`server`] (the server function), [`metrics`] (what
//! the metrics port serves).

pub mod check;
pub mod config;
pub mod dest;
pub mod engine;
pub mod etcd;
pub mod job_history;
pub mod jobfile;
pub mod leader_gate;
pub mod leadership;
pub mod metrics;
pub mod prune;
pub mod record;
pub mod replicas;
pub mod retention;
pub mod runs;
pub mod schedule;
pub mod server;
pub mod service;
pub mod state;
pub mod status_page;
pub mod tokens;

pub use config::{ConfigError, CoordinatorConfig, LogFormat, StateKind};
pub use server::{ServeError, serve, serve_with_health, serve_with_ports};
