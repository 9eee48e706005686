//! The stored jobs, kept in memory as well: part of [`super::Inner`]. The
//! tick looks at every job each second (schedules, daily retention), and
//! decoding 10,000 jobs from the state that often was most of an idle
//! coordinator's CPU. Every write of a job in the engine goes through
//! [`Inner::put_job`] and [`Inner::delete_stored_job`], which write the
//! state first and the copy here after, so the copy never holds what the
//! state does not. It is filled on first use, from the state.
//!
//! It never decides anything about a job; readers that need one job's
//! record still read it from the state.

use std::sync::Arc;

use super::*;

impl Inner {
    /// Every stored job, by name (read from the state on first use).
    pub(super) fn stored_jobs(&mut self) -> Result<Vec<Arc<Job>>, StateError> {
        if self.job_cache.is_none() {
            let jobs = self
                .store
                .jobs()?
                .into_iter()
                .map(|job| (job_name(&job), Arc::new(job)))
                .collect();
            self.job_cache = Some(jobs);
        }
        Ok(self
            .job_cache
            .as_ref()
            .map(|jobs| jobs.values().cloned().collect())
            .unwrap_or_default())
    }

    /// Stores `job` (and keeps the copy in memory in step).
    pub(super) fn put_job(&mut self, job: &Job) -> Result<(), StateError> {
        self.store.put_job(job)?;
        if let Some(jobs) = self.job_cache.as_mut() {
            jobs.insert(job_name(job), Arc::new(job.clone()));
        }
        Ok(())
    }

    /// Deletes job `name` from the state; returns it if it was there.
    pub(super) fn delete_stored_job(&mut self, name: &str) -> Result<Option<Job>, StateError> {
        let deleted = self.store.delete_job(name)?;
        if let Some(jobs) = self.job_cache.as_mut() {
            jobs.remove(name);
        }
        Ok(deleted)
    }
}

fn job_name(job: &Job) -> String {
    job.spec
        .as_ref()
        .map(|spec| spec.name.clone())
        .unwrap_or_default()
}
