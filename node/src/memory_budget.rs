//! One memory budget for the sending side of a backup (`fabricctl backup
//! --memory`, an agent's `backup_memory_bytes`): how it is shared between
//! the walk's threads and the chunks in flight to the receiver.
//!
//! Pure arithmetic, no I/O: [`SendPlan::for_budget`] turns a budget into the
//! walk's thread count and hash window and the sender's limits, and says
//! why a budget is too small to run in. The budget counts what the pipeline
//! holds, which is what grows with the data:
//! - each walk thread: its read buffer (256 KiB), the bytes its chunker
//!   has not cut yet (up to the largest chunk and a quarter more), and the
//!   cut chunk it waits to hand on, or the windows of cut chunks it hashes
//!   in parallel ([`SendPlan::hash_ahead_bytes`]): the walk's own
//!   [`fabric_chunkstore::walk::thread_bytes`];
//! - the chunk bytes from the moment the walk hands them on until the
//!   receiver acknowledges them as stored: read ahead, offered, being
//!   compressed, sent and unacknowledged ([`SendPlan::pipeline_bytes`]);
//! - one batch's copy while the transport encodes it
//!   ([`SendPlan::batch_bytes`]).
//!
//! What it does not count is fixed, whatever the data: the program, its
//! runtime, TLS and the connection (about 16 MiB resident for `fabricctl`),
//! one zstd context per compressing thread (about 1.5 MiB each at the
//! transfer's level), and the allocator's slack. README's Benchmarks
//! section gives the peaks measured against budgets.

use crate::transfer::{MAX_BATCH_BYTES, MAX_OFFER_BYTES};

/// The budget when none is given: the knee of speed against budget on the
/// peer benchmark's data (README's Benchmarks). It gives the plan measured
/// there as 24 MiB while a chunker held up to two largest chunks uncut;
/// holding a quarter more than one, the same plan needs 3 MiB less.
pub const DEFAULT_BACKUP_MEMORY: u64 = 21 * 1024 * 1024;

/// Smallest batch a plan sends: below it a batch is mostly envelope and
/// acknowledgement round trips.
const MIN_BATCH_BYTES: usize = 256 * 1024;

/// How a budget is spent, see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendPlan {
    /// Threads reading, chunking and hashing files.
    pub walk_threads: usize,
    /// Cut chunks each walk thread hashes in parallel (bytes).
    pub hash_ahead_bytes: usize,
    /// Chunk bytes between the walk and the receiver's acknowledgement.
    pub pipeline_bytes: usize,
    /// Most chunk bytes (as sent) in one batch.
    pub batch_bytes: usize,
    /// Most plain bytes one offer holds.
    pub offer_bytes: usize,
}

/// A budget too small to back up in.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "a backup memory budget of {budget} bytes is too small: with chunks of up to {max_chunk} bytes a backup needs at least {needed} bytes (one walk thread and two chunks in flight)"
)]
pub struct BudgetTooSmall {
    /// The budget asked for.
    pub budget: u64,
    /// The store's largest chunk.
    pub max_chunk: usize,
    /// The smallest budget that works.
    pub needed: u64,
}

impl SendPlan {
    /// The smallest budget a backup runs in with chunks of up to
    /// `max_chunk` bytes: one walk thread cutting a chunk, and room in the
    /// pipeline for one such chunk and its encoding copy.
    pub fn minimum(max_chunk: usize) -> u64 {
        (walk_thread_bytes(max_chunk, 0) + 2 * max_chunk) as u64
    }

    /// Share `budget` bytes on a machine of `cores` cores, for a store
    /// whose chunks are at most `max_chunk` bytes.
    ///
    /// The walk gets at most half of the budget (one thread at the least),
    /// each thread its cutting room, and hash-ahead windows of two largest
    /// chunks when every core's thread can have them; the rest carries
    /// chunks to the receiver, less one batch kept for its encoding copy. Batches are a quarter of that rest
    /// (at most [`MAX_BATCH_BYTES`]), offers half of it (at most
    /// [`MAX_OFFER_BYTES`]).
    pub fn for_budget(budget: u64, cores: usize, max_chunk: usize) -> Result<Self, BudgetTooSmall> {
        let needed = Self::minimum(max_chunk);
        if budget < needed {
            return Err(BudgetTooSmall {
                budget,
                max_chunk,
                needed,
            });
        }
        let cores = cores.max(1);
        let budget = usize::try_from(budget).unwrap_or(usize::MAX);
        let walk_half = budget / 2;
        let plain_thread = walk_thread_bytes(max_chunk, 0);
        // Hash-ahead only when every core's walk thread can have its two
        // windows: it measured alike with it off on two cores, and threads
        // reading files side by side never hurt.
        let window = 2 * max_chunk;
        let (per_thread, hash_ahead_bytes) =
            if walk_half / walk_thread_bytes(max_chunk, window) >= cores {
                (walk_thread_bytes(max_chunk, window), window)
            } else {
                (plain_thread, 0)
            };
        let walk_threads = (walk_half / per_thread).clamp(1, cores);
        let rest = budget - walk_threads * per_thread;
        let batch_bytes = (rest / 4).clamp(MIN_BATCH_BYTES, MAX_BATCH_BYTES);
        let pipeline_bytes = rest.saturating_sub(batch_bytes).max(max_chunk);
        let offer_bytes = (pipeline_bytes / 2).clamp(1, MAX_OFFER_BYTES);
        Ok(Self {
            walk_threads,
            hash_ahead_bytes,
            pipeline_bytes,
            batch_bytes,
            offer_bytes,
        })
    }
}

impl SendPlan {
    /// [`SendPlan::for_budget`] on this machine's cores, for the chunk
    /// size every fabric store uses.
    pub fn for_this_machine(budget: u64) -> Result<Self, BudgetTooSmall> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let max_chunk = fabric_chunkstore::ChunkParams::default().max_size as usize;
        Self::for_budget(budget, cores, max_chunk)
    }
}

/// What one walk thread holds, as the walk itself counts it
/// ([`fabric_chunkstore::walk::thread_bytes`]): the budget and the walk
/// cannot disagree about it.
fn walk_thread_bytes(max_chunk: usize, hash_ahead: usize) -> usize {
    fabric_chunkstore::walk::thread_bytes(max_chunk, hash_ahead)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    #[test]
    fn the_default_budget_spends_all_of_itself_between_the_walk_and_chunks_in_flight() {
        let plan = SendPlan::for_budget(DEFAULT_BACKUP_MEMORY, 2, 4 * MIB).expect("a plan");
        assert_eq!(plan.hash_ahead_bytes, 0);
        // The plan measured as the knee: one walk thread, and 11.75 MiB
        // for the chunks in flight and a batch's encoding copy.
        assert_eq!(plan.walk_threads, 1);
        assert_eq!(
            plan.pipeline_bytes + plan.batch_bytes,
            11 * MIB + 3 * MIB / 4
        );
        let walk = plan.walk_threads * walk_thread_bytes(4 * MIB, plan.hash_ahead_bytes);
        assert_eq!(
            walk + plan.pipeline_bytes + plan.batch_bytes,
            DEFAULT_BACKUP_MEMORY as usize
        );
        assert!(plan.batch_bytes <= MAX_BATCH_BYTES);
        assert!(plan.offer_bytes <= plan.pipeline_bytes);
    }

    #[test]
    fn a_budget_never_plans_more_than_it_has_nor_more_threads_than_cores() {
        for budget_mib in [21u64, 24, 32, 48, 64, 128, 1024] {
            for cores in [1, 2, 8, 64] {
                let budget = budget_mib * MIB as u64;
                let plan = SendPlan::for_budget(budget, cores, 4 * MIB).expect("a plan");
                let walk = plan.walk_threads * walk_thread_bytes(4 * MIB, plan.hash_ahead_bytes);
                assert!(
                    (walk + plan.pipeline_bytes + plan.batch_bytes) as u64 <= budget,
                    "{budget_mib} MiB on {cores} cores: {plan:?}"
                );
                assert!((1..=cores).contains(&plan.walk_threads));
                assert!(plan.pipeline_bytes >= 4 * MIB);
                assert!(plan.batch_bytes <= MAX_BATCH_BYTES && plan.offer_bytes <= MAX_OFFER_BYTES);
            }
        }
    }

    #[test]
    fn a_large_budget_uses_every_core_and_the_protocols_largest_batches() {
        let plan = SendPlan::for_budget(1 << 30, 8, 4 * MIB).expect("a plan");
        assert_eq!(plan.walk_threads, 8);
        assert_eq!(plan.hash_ahead_bytes, 8 * MIB, "hash-ahead on every core");
        assert_eq!(plan.batch_bytes, MAX_BATCH_BYTES);
        assert_eq!(plan.offer_bytes, MAX_OFFER_BYTES);
    }

    #[test]
    fn a_budget_below_the_minimum_is_refused_naming_what_is_needed() {
        let err = SendPlan::for_budget(8 * MIB as u64, 2, 4 * MIB).expect_err("too small");
        assert_eq!(err.needed, SendPlan::minimum(4 * MIB));
        assert!(err.to_string().contains("at least"), "{err}");
        assert!(SendPlan::for_budget(SendPlan::minimum(4 * MIB), 2, 4 * MIB).is_ok());
    }
}
