//! Free space under a path, for health (refuse writes when the disk is
//! nearly full) and for what a node reports to the coordinator.

use std::path::Path;

/// (capacity, free) bytes of the file system holding `path`.
pub fn space(path: &Path) -> std::io::Result<(u64, u64)> {
    let stats = rustix::fs::statvfs(path)?;
    Ok((
        stats.f_blocks.saturating_mul(stats.f_frsize),
        stats.f_bavail.saturating_mul(stats.f_frsize),
    ))
}
