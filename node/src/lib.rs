//! fabric-node (work in progress).
