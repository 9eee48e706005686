//! fabric-node: a storage node and a client agent.
//!
//! - [`server::serve`] runs the node: the storage service over a chunk store
//!   ([`storage_service`]), the pull endpoint of an agent ([`source_service`]),
//!   health and reflection, and the session with a coordinator ([`session`]).
//! - [`agent`] is what runs on a client: push backups and restores; the CLI
//!   uses it too.
//! - [`transfer`] is the transfer protocol, both ends.
//!
//! The chunk store is synchronous; this crate owns every async and gRPC part
//! of a node and must never put storage logic of its own beside the store's.

pub mod agent;
pub mod client;
pub mod config;
pub mod convert;
pub mod restore_client;
pub mod server;
pub mod session;
pub mod source_service;
pub mod status;
pub mod storage_service;
pub mod transfer;

pub use config::NodeConfig;
pub use server::serve;
