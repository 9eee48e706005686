//! The progress line of a restore: a [`RestoreTarget`] that passes
//! everything on to the real target and counts files and bytes as they are
//! written, shown on stderr while stderr is a terminal. It never changes
//! what is written.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fabric_chunkstore::restore::{RestoreError, RestoreTarget};
use fabric_proto::v1::TreeEntry;

use crate::output::{bytes, count};

/// Files and bytes written so far.
#[derive(Debug, Default)]
pub struct Written {
    files: AtomicU64,
    bytes: AtomicU64,
}

impl Written {
    /// `(files, bytes)` so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.files.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    fn reset(&self) {
        self.files.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
    }
}

/// A target that counts what passes through it.
pub struct CountingTarget {
    inner: Box<dyn RestoreTarget + Send>,
    written: Arc<Written>,
}

impl CountingTarget {
    /// Wrap `inner`; the counts are read from `written`.
    pub fn new(inner: Box<dyn RestoreTarget + Send>, written: Arc<Written>) -> Self {
        Self { inner, written }
    }
}

impl RestoreTarget for CountingTarget {
    fn directory(&mut self, path: &[u8], entry: &TreeEntry) -> Result<(), RestoreError> {
        self.inner.directory(path, entry)
    }
    fn file_start(&mut self, path: &[u8], entry: &TreeEntry) -> Result<(), RestoreError> {
        self.written.files.fetch_add(1, Ordering::Relaxed);
        self.inner.file_start(path, entry)
    }
    fn file_data(&mut self, data: &[u8]) -> Result<(), RestoreError> {
        self.written
            .bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.inner.file_data(data)
    }
    fn file_zeros(&mut self, len: u64) -> Result<(), RestoreError> {
        self.written.bytes.fetch_add(len, Ordering::Relaxed);
        self.inner.file_zeros(len)
    }
    fn file_end(&mut self) -> Result<(), RestoreError> {
        self.inner.file_end()
    }
    fn hard_link(
        &mut self,
        path: &[u8],
        existing: &[u8],
        entry: &TreeEntry,
    ) -> Result<(), RestoreError> {
        self.inner.hard_link(path, existing, entry)
    }
    fn symlink(&mut self, path: &[u8], entry: &TreeEntry) -> Result<(), RestoreError> {
        self.inner.symlink(path, entry)
    }
    fn other(&mut self, path: &[u8], entry: &TreeEntry) -> Result<(), RestoreError> {
        self.inner.other(path, entry)
    }
    fn finish(&mut self) -> Result<(), RestoreError> {
        self.inner.finish()
    }
    fn abort(&mut self) -> Result<u64, RestoreError> {
        // A restore that starts over from another copy counts again.
        self.written.reset();
        self.inner.abort()
    }
    fn restartable(&self) -> bool {
        self.inner.restartable()
    }
    fn attributes_not_restored(&self) -> u64 {
        self.inner.attributes_not_restored()
    }
    fn owners_not_restored(&self) -> u64 {
        self.inner.owners_not_restored()
    }
    fn existing_kept(&self) -> u64 {
        self.inner.existing_kept()
    }
}

/// The progress line on stderr, redrawn from `written` until dropped; none
/// when stderr is not a terminal.
pub struct ProgressLine {
    bar: Option<indicatif::ProgressBar>,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl ProgressLine {
    /// Start showing `written` (only on a terminal).
    pub fn start(written: Arc<Written>, terminal: bool) -> Self {
        if !terminal {
            return Self {
                bar: None,
                ticker: None,
            };
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} restoring: {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        let shown = bar.clone();
        let started = std::time::Instant::now();
        let ticker = tokio::spawn(async move {
            loop {
                let (files, written_bytes) = written.get();
                let rate = written_bytes as f64 / started.elapsed().as_secs_f64().max(0.001);
                shown.set_message(format!(
                    "{}, {} written, {}/s",
                    count(files, "file"),
                    bytes(written_bytes),
                    bytes(rate as u64)
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Self {
            bar: Some(bar),
            ticker: Some(ticker),
        }
    }
}

impl Drop for ProgressLine {
    fn drop(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
        }
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target that only remembers how many bytes reached it.
    #[derive(Default)]
    struct Sink(Arc<AtomicU64>);

    impl RestoreTarget for Sink {
        fn directory(&mut self, _: &[u8], _: &TreeEntry) -> Result<(), RestoreError> {
            Ok(())
        }
        fn file_start(&mut self, _: &[u8], _: &TreeEntry) -> Result<(), RestoreError> {
            Ok(())
        }
        fn file_data(&mut self, data: &[u8]) -> Result<(), RestoreError> {
            self.0.fetch_add(data.len() as u64, Ordering::Relaxed);
            Ok(())
        }
        fn file_end(&mut self) -> Result<(), RestoreError> {
            Ok(())
        }
        fn hard_link(&mut self, _: &[u8], _: &[u8], _: &TreeEntry) -> Result<(), RestoreError> {
            Ok(())
        }
        fn symlink(&mut self, _: &[u8], _: &TreeEntry) -> Result<(), RestoreError> {
            Ok(())
        }
        fn other(&mut self, _: &[u8], _: &TreeEntry) -> Result<(), RestoreError> {
            Ok(())
        }
        fn finish(&mut self) -> Result<(), RestoreError> {
            Ok(())
        }
    }

    #[test]
    fn the_counts_follow_what_is_written_and_start_over_with_a_restart() {
        let reached = Arc::new(AtomicU64::new(0));
        let written = Arc::new(Written::default());
        let mut target = CountingTarget::new(Box::new(Sink(reached.clone())), written.clone());
        let entry = TreeEntry::default();
        target.file_start(b"a", &entry).unwrap();
        target.file_data(&[1; 100]).unwrap();
        target.file_zeros(28).unwrap();
        target.file_end().unwrap();
        target.file_start(b"b", &entry).unwrap();
        assert_eq!(written.get(), (2, 128));
        assert_eq!(reached.load(Ordering::Relaxed), 128, "everything passed on");
        target.abort().unwrap();
        assert_eq!(written.get(), (0, 0));
    }
}
