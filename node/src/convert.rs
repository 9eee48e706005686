//! The chunk store's reports as API messages.

use fabric_proto::v1;

/// Store counters as `StoreStats`.
pub fn store_stats(stats: &fabric_chunkstore::StoreStats) -> v1::StoreStats {
    v1::StoreStats {
        chunks: stats.chunks,
        logical_bytes: stats.logical_bytes,
        stored_bytes: stats.stored_bytes,
        referenced_bytes: stats.referenced_bytes,
        dedup_ratio: stats.dedup_ratio,
        compression_ratio: stats.compression_ratio,
        packs: stats.packs,
        garbage_bytes: stats.garbage_bytes,
        snapshots: stats.snapshots,
        free_bytes: stats.fs_free_bytes,
        capacity_bytes: stats.fs_capacity_bytes,
    }
}

/// A verify report as `VerifyReport`.
pub fn verify_report(report: &fabric_chunkstore::VerifyReport) -> v1::VerifyReport {
    v1::VerifyReport {
        chunks_checked: report.chunks_checked,
        bytes_checked: report.bytes_checked,
        problems: report
            .problems
            .iter()
            .map(|problem| v1::VerifyProblem {
                chunk_id: problem.chunk.to_hex(),
                message: format!("{:?}: {}", problem.kind, problem.detail),
                snapshots: problem.snapshots.clone(),
                paths: problem.paths.clone(),
            })
            .collect(),
    }
}

/// A GC report as `GcReport`.
pub fn gc_report(report: &fabric_chunkstore::GcReport) -> v1::GcReport {
    v1::GcReport {
        unreferenced_chunks: report.swept_chunks + report.protected_chunks,
        swept_chunks: report.swept_chunks,
        freed_bytes: report.bytes_freed,
        packs_rewritten: report.packs_rewritten,
        packs_deleted: report.packs_deleted,
    }
}
