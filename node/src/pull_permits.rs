//! Which storage node may pull what from this agent, as the coordinator
//! said on the agent's session (`pull_permit`), until the passive run ends.
//!
//! `Source.Pull` serves a pull only with a permit for its run naming the
//! caller's certified node id, and only the permit's paths (the pull job's
//! include, exclude and one_file_system): a pull is a read of the client's
//! files, so it must never be open to whoever can reach the port. This
//! module keeps the permits; it never serves or refuses a pull itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fabric_proto::v1::PullPermit;
use tokio::sync::Notify;

/// The paths one permit lets its puller read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PermittedPaths {
    /// Paths to back up.
    pub include: Vec<String>,
    /// Patterns to leave out.
    pub exclude: Vec<String>,
    /// Stay on the include paths' file systems.
    pub one_file_system: bool,
}

/// The permits of this agent.
#[derive(Clone, Debug, Default)]
pub struct PullPermits {
    /// Run id -> puller node id -> paths.
    permits: Arc<Mutex<HashMap<String, HashMap<String, PermittedPaths>>>>,
    granted: Arc<Notify>,
}

/// How long a pull waits for its permit: the coordinator sends the permit
/// to the agent just before it sends the assignment to the puller, on
/// another stream, so the puller may dial first.
pub const PERMIT_WAIT: Duration = Duration::from_secs(5);

impl PullPermits {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, HashMap<String, PermittedPaths>>> {
        // Only inserts and removals: consistent after a panic elsewhere.
        self.permits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Record a permit from the coordinator.
    pub fn grant(&self, permit: PullPermit) {
        tracing::info!(run = %permit.run_id, puller = %permit.puller, "pull permitted");
        self.lock().entry(permit.run_id).or_default().insert(
            permit.puller,
            PermittedPaths {
                include: permit.include,
                exclude: permit.exclude,
                one_file_system: permit.one_file_system,
            },
        );
        self.granted.notify_waiters();
    }

    /// Forget the permits of a run that ended.
    pub fn forget(&self, run_id: &str) {
        self.lock().remove(run_id);
    }

    fn get(&self, run_id: &str, puller: &str) -> Option<PermittedPaths> {
        self.lock().get(run_id)?.get(puller).cloned()
    }

    /// The paths `puller` may pull for `run_id`, waiting up to `wait` for
    /// the permit to arrive.
    pub async fn wait_for(
        &self,
        run_id: &str,
        puller: &str,
        wait: Duration,
    ) -> Option<PermittedPaths> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let granted = self.granted.notified();
            if let Some(paths) = self.get(run_id, puller) {
                return Some(paths);
            }
            if tokio::time::timeout_at(deadline, granted).await.is_err() {
                return self.get(run_id, puller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permit(run: &str, puller: &str) -> PullPermit {
        PullPermit {
            run_id: run.into(),
            puller: puller.into(),
            include: vec!["/srv/export".into()],
            exclude: vec![],
            one_file_system: false,
        }
    }

    #[tokio::test]
    async fn a_permit_names_one_run_and_one_puller_and_ends_with_the_run() {
        let permits = PullPermits::default();
        permits.grant(permit("r1", "n1"));
        let wait = Duration::from_millis(20);
        assert!(permits.wait_for("r1", "n1", wait).await.is_some());
        assert!(permits.wait_for("r1", "n2", wait).await.is_none());
        assert!(permits.wait_for("r2", "n1", wait).await.is_none());
        permits.forget("r1");
        assert!(permits.wait_for("r1", "n1", wait).await.is_none());
    }

    #[tokio::test]
    async fn a_pull_that_dials_before_its_permit_arrives_waits_for_it() {
        let permits = PullPermits::default();
        let waiting = {
            let permits = permits.clone();
            tokio::spawn(async move { permits.wait_for("r1", "n1", PERMIT_WAIT).await })
        };
        tokio::task::yield_now().await;
        permits.grant(permit("r1", "n1"));
        assert!(waiting.await.unwrap().is_some());
    }
}
