//! fabric-coordinator (work in progress).
