//! fabric-coordinator: the fabric's brain. This crate root gathers the pure
//! job logic (destination grammar, jobs files, snapshot naming, freshness
//! checks); the server parts build on it.

pub mod check;
pub mod dest;
pub mod jobfile;
pub mod naming;
