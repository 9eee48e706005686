//! fabric-node: a storage node and a client agent.
//!
//! - [`server::serve`] runs the node: the storage service over a chunk store
//!   ([`storage_service`]), the pull endpoint of an agent ([`source_service`]),
//!   health and reflection, and the session with a coordinator ([`session`]).
//! - [`agent`] is what runs on a client: push backups and restores; the CLI
//!   uses it too.
//! - [`transfer`] is the transfer protocol, both ends.
//! - [`commands`] is what commands this host lets jobs run ([`scripts`] runs
//!   them, each in a process group of its own), and
//!   [`pull_permits`] which storage node may pull what: the host's and the
//!   coordinator's word, checked here, never taken from a caller.
//! - [`client`] dials other servers over TLS, checking their identity.
//! - [`coordinator_channel`] sends a node's or `fabricctl`'s coordinator calls
//!   to whichever of its coordinators leads.
//! - [`metrics`] is what the metrics port serves (`metrics_listen`).
//!
//! The chunk store is synchronous; this crate owns every async and gRPC part
//! of a node and must never put storage logic of its own beside the store's.

pub mod agent;
pub mod allocator;
pub mod client;
pub mod commands;
pub mod config;
pub mod convert;
pub mod coordinator_channel;
pub mod disk;
pub mod gc_lease;
pub mod health;
pub mod held;
pub mod memory_budget;
pub mod metrics;
pub mod node_directory;
pub mod pull_permits;
pub mod quota;
pub mod rate_limit;
pub mod restore_client;
pub mod run_copies;
pub mod scripts;
pub mod scrub;
pub mod server;
pub mod server_stream;
pub mod session;
pub mod source_service;
pub mod status;
pub mod storage_service;
pub mod transfer;

pub use config::NodeConfig;
pub use server::{SidePorts, serve, serve_until_stopped, serve_with_health};
