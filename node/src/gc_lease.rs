//! Garbage collection under the coordinator's lease: what a storage node
//! does with a `GcLease`. It owns the choice of grace (how young a pack GC
//! must leave alone) and the one-at-a-time rule for leased collections; it
//! never decides when to collect (the coordinator does, so that no two
//! nodes holding one snapshot collect at once) and never runs a GC after
//! its lease ended.
//!
//! Uploads go on while a GC runs: the store protects the chunks of commits
//! in flight, and packs younger than the grace are left alone so that an
//! upload that has not committed yet keeps its chunks. The node's own
//! `gc_grace_s` (an hour by default) must cover the slowest upload, because
//! a node alone does not know which are in flight. Under a lease the
//! coordinator says since when the oldest run it knows of has been going,
//! less its `gc_clock_margin` for the two machines' clocks
//! (`writes_since_ms`, 0 for none), and the grace reaches back just that
//! far, whatever the node's own; with no run in flight it is the node's
//! own, at most [`IDLE_GRACE`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fabric_chunkstore::{GcOptions, Store};
use fabric_proto::v1::{GcDone, GcLease};

/// The longest grace of a leased GC with no run in flight: what it spares
/// is an upload that no coordinator run covers and that has been quiet
/// for less than this.
pub const IDLE_GRACE: Duration = Duration::from_secs(5 * 60);

/// The grace a leased GC uses. With runs in flight, back to
/// `writes_since_ms` (which the coordinator set before the oldest one's
/// start by its `gc_clock_margin`), whatever the node's own: every pack
/// written since is left alone. With none (`writes_since_ms` 0), the
/// node's own, at most [`IDLE_GRACE`].
pub fn lease_grace(own_grace: Duration, writes_since_ms: i64, now_ms: i64) -> Duration {
    if writes_since_ms <= 0 {
        return own_grace.min(IDLE_GRACE);
    }
    Duration::from_millis(u64::try_from(now_ms.saturating_sub(writes_since_ms)).unwrap_or(0))
}

/// Runs the GC `lease` allows on `store`, unless one is running already
/// (`running` holds its lease id) or the lease is over. Blocking: call it
/// from a blocking task. Returns the answer for the coordinator.
pub fn collect_under_lease(
    store: &Store,
    lease: &GcLease,
    own_grace: Duration,
    running: &Arc<AtomicU64>,
    now_ms: i64,
) -> GcDone {
    let refuse = |error: String| GcDone {
        lease_id: lease.lease_id,
        report: None,
        error,
    };
    let left_ms = lease.expires_ms.saturating_sub(now_ms);
    if left_ms <= 0 {
        return refuse(format!(
            "GC lease {} had ended when it arrived; no GC was run",
            lease.lease_id
        ));
    }
    if !(0.0..1.0).contains(&lease.repack_threshold) || lease.repack_threshold.is_nan() {
        return refuse(format!(
            "GC lease {}: repack_threshold must be a fraction in [0, 1), got {}",
            lease.lease_id, lease.repack_threshold
        ));
    }
    if let Err(other) =
        running.compare_exchange(0, lease.lease_id.max(1), Ordering::SeqCst, Ordering::SeqCst)
    {
        return refuse(format!(
            "GC lease {}: the GC of lease {other} is still running here",
            lease.lease_id
        ));
    }
    let grace = lease_grace(own_grace, lease.writes_since_ms, now_ms);
    let options = GcOptions {
        grace,
        repack_threshold: (lease.repack_threshold > 0.0).then_some(lease.repack_threshold),
        deadline: Some(Instant::now() + Duration::from_millis(left_ms.unsigned_abs())),
        ..GcOptions::default()
    };
    tracing::info!(lease = lease.lease_id, grace = ?grace, "GC under a lease started");
    let result = store.gc(&options);
    running.store(0, Ordering::SeqCst);
    match result {
        Ok(report) => {
            tracing::info!(
                lease = lease.lease_id,
                freed_bytes = report.bytes_freed,
                swept_chunks = report.swept_chunks,
                packs_left = report.packs_left_at_deadline,
                "GC under a lease done"
            );
            let mut report = crate::convert::gc_report(&report);
            report.grace_s = grace.as_secs();
            GcDone {
                lease_id: lease.lease_id,
                report: Some(report),
                error: String::new(),
            }
        }
        Err(err) => {
            tracing::warn!(lease = lease.lease_id, error = %err, "GC under a lease failed");
            refuse(format!("GC lease {}: {err}", lease.lease_id))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_chunkstore::StoreConfig;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn the_grace_reaches_back_to_what_the_lease_says_or_the_own_at_most_idle() {
        let now = 10 * 3_600_000;
        // No run in flight: the node's own, at most IDLE_GRACE.
        assert_eq!(lease_grace(HOUR, 0, now), IDLE_GRACE);
        assert_eq!(lease_grace(Duration::ZERO, 0, now), Duration::ZERO);
        // Runs in flight: back to `writes_since_ms`, also on a node with
        // no grace of its own, and past its own hour.
        let minute = Duration::from_secs(60);
        assert_eq!(lease_grace(HOUR, now - 60_000, now), minute);
        assert_eq!(lease_grace(Duration::ZERO, now - 60_000, now), minute);
        assert_eq!(lease_grace(HOUR, now - 2 * 3_600_000, now), 2 * HOUR);
        // A coordinator clock ahead of the node's: no negative age.
        assert_eq!(lease_grace(HOUR, now + 60_000, now), Duration::ZERO);
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = Store::open_or_create(dir.path(), StoreConfig::default()).expect("store opens");
        (dir, store)
    }

    #[test]
    fn a_lease_runs_one_gc_and_reports_its_grace() {
        let (_dir, store) = store();
        let running = Arc::new(AtomicU64::new(0));
        let now = 1_000_000_000;
        let lease = GcLease {
            lease_id: 7,
            expires_ms: now + 3_600_000,
            writes_since_ms: now,
            repack_threshold: 0.0,
        };
        let done = collect_under_lease(&store, &lease, HOUR, &running, now);
        assert_eq!(done.lease_id, 7);
        assert!(done.error.is_empty(), "{}", done.error);
        let report = done.report.expect("a report");
        assert_eq!(report.grace_s, 0, "back to `writes_since_ms`, which is now");
        assert_eq!(running.load(Ordering::SeqCst), 0, "the lease is released");
    }

    #[test]
    fn an_ended_lease_a_bad_threshold_or_a_gc_already_running_are_refused() {
        let (_dir, store) = store();
        let running = Arc::new(AtomicU64::new(0));
        let now = 1_000_000_000;
        let ended = GcLease {
            lease_id: 1,
            expires_ms: now,
            writes_since_ms: now,
            repack_threshold: 0.0,
        };
        let done = collect_under_lease(&store, &ended, HOUR, &running, now);
        assert!(done.report.is_none());
        assert!(done.error.contains("had ended"), "{}", done.error);

        let bad = GcLease {
            lease_id: 2,
            expires_ms: now + 1000,
            repack_threshold: 1.5,
            ..ended
        };
        let done = collect_under_lease(&store, &bad, HOUR, &running, now);
        assert!(done.error.contains("repack_threshold"), "{}", done.error);

        running.store(9, Ordering::SeqCst);
        let busy = GcLease {
            lease_id: 3,
            expires_ms: now + 1000,
            ..ended
        };
        let done = collect_under_lease(&store, &busy, HOUR, &running, now);
        assert!(
            done.error.contains("lease 9 is still running"),
            "{}",
            done.error
        );
        assert_eq!(
            running.load(Ordering::SeqCst),
            9,
            "the running one's claim stays"
        );
    }
}
