//! Bandwidth limits: a token bucket of bytes per second, shared by every
//! transfer it governs (an agent's uploads, a job's copies, a node's
//! ingest); a job's byte budget (what its quota leaves a run); and
//! [`TransferLimits`], the set one transfer obeys.
//!
//! A rate limit never refuses and never drops: it only makes the caller
//! wait until the bytes it is about to move fit the rate. It must never
//! hold its lock while waiting, so transfers sharing a limit take turns. A
//! budget refuses the batch that would go over it, and the transfer ends
//! without a commit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fabric_chunkstore::validate;
use tokio::time::Instant;
use tonic::Status;

/// Bytes per second, with a burst of one second's worth.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_s: u64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may go now; negative: owed by transfers already waiting.
    available: f64,
    refilled: Instant,
}

impl RateLimit {
    /// A limit of `bytes_per_s`, or none for 0.
    pub fn new(bytes_per_s: u64) -> Option<Arc<Self>> {
        (bytes_per_s > 0).then(|| {
            Arc::new(Self {
                bytes_per_s,
                bucket: Mutex::new(Bucket {
                    available: bytes_per_s as f64,
                    refilled: Instant::now(),
                }),
            })
        })
    }

    /// The rate.
    pub fn bytes_per_s(&self) -> u64 {
        self.bytes_per_s
    }

    /// How long the caller must wait before moving `bytes` (which it then
    /// owes), at `now`.
    fn reserve(&self, bytes: u64, now: Instant) -> Duration {
        let rate = self.bytes_per_s as f64;
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.available = (bucket.available + elapsed * rate).min(rate);
        bucket.refilled = now;
        bucket.available -= bytes as f64;
        if bucket.available >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.available / rate)
        }
    }

    /// Wait until `bytes` fit the rate.
    pub async fn take(&self, bytes: u64) {
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// What a job's quota leaves one run: the bytes its transfers may move.
#[derive(Debug)]
pub struct JobBudget {
    job: String,
    quota_bytes: u64,
    left_bytes: u64,
    spent: AtomicU64,
}

impl JobBudget {
    /// `left_bytes` for a run of `job`, whose quota is `quota_bytes`; none
    /// when the job has no quota (0).
    pub fn new(job: &str, quota_bytes: u64, left_bytes: u64) -> Option<Arc<Self>> {
        (quota_bytes > 0).then(|| {
            Arc::new(Self {
                job: job.to_owned(),
                quota_bytes,
                left_bytes,
                spent: AtomicU64::new(0),
            })
        })
    }

    /// Spend `bytes`, or refuse when they would go over.
    fn spend(&self, bytes: u64) -> Result<(), Status> {
        let spent = self
            .spent
            .fetch_add(bytes, Ordering::Relaxed)
            .saturating_add(bytes);
        if spent > self.left_bytes {
            return Err(Status::resource_exhausted(format!(
                "job {} would go over its quota of {} bytes: this run may store {} more bytes \
                 and has moved {spent} (nothing was committed)",
                validate::quote(self.job.as_bytes()),
                self.quota_bytes,
                self.left_bytes
            )));
        }
        Ok(())
    }
}

/// The limits one transfer obeys: it waits for each rate, and stops at its
/// budget.
#[derive(Clone, Debug, Default)]
pub struct TransferLimits {
    rates: Vec<Arc<RateLimit>>,
    budget: Option<Arc<JobBudget>>,
}

impl TransferLimits {
    /// No limit.
    pub fn none() -> Self {
        Self::default()
    }

    /// These limits and `limit` (if any).
    pub fn with(mut self, limit: Option<Arc<RateLimit>>) -> Self {
        self.rates.extend(limit);
        self
    }

    /// These limits and the byte budget `budget` (if any).
    pub fn with_budget(mut self, budget: Option<Arc<JobBudget>>) -> Self {
        self.budget = budget;
        self
    }

    /// Count `bytes` against the budget, then wait until they fit every
    /// rate. Refused (RESOURCE_EXHAUSTED) when they would go over the
    /// budget.
    pub async fn take(&self, bytes: u64) -> Result<(), Status> {
        if let Some(budget) = &self.budget {
            budget.spend(bytes)?;
        }
        for limit in &self.rates {
            limit.take(bytes).await;
        }
        Ok(())
    }

    /// Whether there is any limit.
    pub fn is_empty(&self) -> bool {
        self.rates.is_empty() && self.budget.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_no_limit() {
        assert!(RateLimit::new(0).is_none());
        assert!(TransferLimits::none().with(RateLimit::new(0)).is_empty());
    }

    /// On the runtime's paused clock (it advances only when every task
    /// sleeps), so the figure is exact and no wall time passes.
    #[tokio::test(start_paused = true)]
    async fn transfers_sharing_limits_move_at_the_slowest_rate() {
        let agent = RateLimit::new(1_000);
        let job = RateLimit::new(4_000);
        let limits = TransferLimits::none().with(agent).with(job);
        let start = Instant::now();
        // 1,000 bytes of burst, then 9,000 at 1,000 bytes/s.
        for _ in 0..10 {
            limits.take(1_000).await.unwrap();
        }
        assert_eq!(start.elapsed(), Duration::from_secs(9));
    }

    #[tokio::test]
    async fn a_budget_refuses_the_batch_that_would_go_over_it() {
        assert!(JobBudget::new("web", 0, 0).is_none(), "no quota, no budget");
        let limits = TransferLimits::none().with_budget(JobBudget::new("web", 10_000, 2_500));
        limits.take(1_000).await.unwrap();
        limits.take(1_500).await.unwrap();
        let refused = limits.take(1).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("job web would go over its quota of 10000 bytes"),
            "{refused:?}"
        );
        let none_left = TransferLimits::none().with_budget(JobBudget::new("web", 10_000, 0));
        assert!(none_left.take(1).await.is_err());
    }

    #[test]
    fn a_burst_of_one_second_goes_at_once_and_the_rest_waits_its_share() {
        let limit = RateLimit::new(1000).unwrap();
        let start = Instant::now();
        assert_eq!(limit.reserve(1000, start), Duration::ZERO);
        // 500 more bytes at the same instant: half a second.
        assert_eq!(limit.reserve(500, start), Duration::from_millis(500));
        // Another 500 queue behind them.
        assert_eq!(limit.reserve(500, start), Duration::from_secs(1));
        // Two seconds later the debt is paid and the bucket refilled to
        // one second's worth, no more.
        let later = start + Duration::from_secs(3);
        assert_eq!(limit.reserve(1000, later), Duration::ZERO);
        assert_eq!(limit.reserve(1, later), Duration::from_millis(1));
    }
}
