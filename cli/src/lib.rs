//! fabricctl as a library: the command implementations, the embedded fabric
//! and the restore comparison, so the binary stays a thin parser and the
//! integration tests can reuse the comparison.

pub mod browse;
pub mod check;
pub mod commands;
pub mod compare;
pub mod local;
pub mod node_health;
pub mod output;
pub mod remote;
pub mod restore_progress;
pub mod revision;
pub mod security;
