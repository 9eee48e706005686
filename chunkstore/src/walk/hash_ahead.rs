//! Hashing the chunks of one file on several cores while the file's
//! thread goes on reading and cutting: the walk's "hash ahead".
//!
//! FastCDC must find a file's boundaries in order, on one thread, but the
//! BLAKE3 hashes of chunks already cut are independent. [`Ahead`] gathers
//! the chunks a file's thread cuts into a window; a full window is handed
//! to the [`HashPool`] (its own threads, hashing the window's chunks in
//! parallel) while the file's thread cuts the next window; before handing
//! that one off, it takes the hashed chunks of the previous window back and
//! passes them on, in the order they were cut.
//!
//! It owns the bound on those bytes: a file's chunks cut and not yet passed
//! on never exceed the hash-ahead bytes (two windows of half of it each,
//! the chunk being cut counted), and it never changes a chunk, its id or
//! the order chunks are passed on in.
//!
//! It must never make a walk thread wait by running other work: a walk
//! thread waiting for a window blocks on a channel, and the hash pool runs
//! nothing but hashing, which waits for nothing. (Waiting in rayon's own
//! way, a join or an `install` from another pool, lets the waiting thread
//! steal work, which could be another file: its buffers would pile up on
//! top of this file's, and the bound per thread would no longer hold.)

use crossbeam_channel::Receiver;
use rayon::prelude::*;

use crate::chunker::Chunk;

/// Threads that hash windows of chunks for the walk's threads.
pub(super) struct HashPool {
    pool: rayon::ThreadPool,
    /// Bytes of one window at most: half of the hash-ahead bytes.
    window_bytes: usize,
}

impl HashPool {
    /// A pool of `threads` threads (0: one per core) for windows of
    /// `window_bytes`.
    pub fn new(threads: usize, window_bytes: usize) -> Result<Self, rayon::ThreadPoolBuildError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|index| format!("backup-hash-{index}"))
            .build()?;
        Ok(Self { pool, window_bytes })
    }

    /// Hash `window` on the pool; the chunks, in the same order, arrive on
    /// the returned channel.
    fn spawn(&self, window: Vec<Vec<u8>>) -> Receiver<Vec<Chunk>> {
        let (sender, receiver) = crossbeam_channel::bounded(1);
        self.pool.spawn(move || {
            let chunks: Vec<Chunk> = window.into_par_iter().map(Chunk::new).collect();
            // The file's thread gave up (an error): nobody wants them.
            let _ = sender.send(chunks);
        });
        receiver
    }
}

/// The chunks of one file cut and not yet passed on.
pub(super) struct Ahead<'p> {
    /// None: every chunk is hashed on the file's thread as it is cut.
    pool: Option<&'p HashPool>,
    /// The largest chunk the chunker cuts.
    max_chunk: usize,
    /// Cut, not yet handed to the pool.
    window: Vec<Vec<u8>>,
    window_bytes: usize,
    /// The previous window, being hashed.
    in_flight: Option<Receiver<Vec<Chunk>>>,
}

impl<'p> Ahead<'p> {
    /// A file's chunks hashed on `pool` (on the file's thread when None)
    /// when they are at most `max_chunk` bytes each.
    pub fn new(pool: Option<&'p HashPool>, max_chunk: usize) -> Self {
        Self {
            pool,
            max_chunk,
            window: Vec::new(),
            window_bytes: 0,
            in_flight: None,
        }
    }

    /// Take the bytes of the file's next chunk; chunks whose hash is known
    /// are passed to `send` in the order they were cut.
    pub fn push<E>(
        &mut self,
        data: Vec<u8>,
        send: &mut impl FnMut(Chunk) -> Result<(), E>,
    ) -> Result<(), E> {
        let Some(pool) = self.pool else {
            return send(Chunk::new(data));
        };
        self.window_bytes += data.len();
        self.window.push(data);
        // The next chunk might not fit in this window: hand it off now, so
        // that the bytes held never exceed two windows.
        if self.window_bytes + self.max_chunk > pool.window_bytes {
            self.receive(send)?;
            let window = std::mem::take(&mut self.window);
            self.window_bytes = 0;
            self.in_flight = Some(pool.spawn(window));
        }
        Ok(())
    }

    /// Pass on every chunk cut so far (before a run of zeros is recorded,
    /// and at the end of the file). A last window of one chunk is hashed
    /// here: handing it off would only add a wait.
    pub fn drain<E>(&mut self, send: &mut impl FnMut(Chunk) -> Result<(), E>) -> Result<(), E> {
        self.receive(send)?;
        let window = std::mem::take(&mut self.window);
        self.window_bytes = 0;
        match self.pool {
            Some(pool) if window.len() > 1 => {
                self.in_flight = Some(pool.spawn(window));
                self.receive(send)
            }
            _ => window
                .into_iter()
                .try_for_each(|data| send(Chunk::new(data))),
        }
    }

    /// Wait for the window in flight, if any, and pass its chunks on.
    fn receive<E>(&mut self, send: &mut impl FnMut(Chunk) -> Result<(), E>) -> Result<(), E> {
        let Some(in_flight) = self.in_flight.take() else {
            return Ok(());
        };
        // The pool's job sends unless it panicked, and a panic in a rayon
        // pool without a panic handler aborts the process first.
        let chunks = in_flight
            .recv()
            .expect("a hashing thread ended without its chunks");
        chunks.into_iter().try_for_each(send)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::pseudo_random;

    /// Pieces of `sizes` bytes through an `Ahead`, collected as sent.
    fn through(pool: Option<&HashPool>, max_chunk: usize, sizes: &[usize]) -> Vec<Chunk> {
        let mut ahead = Ahead::new(pool, max_chunk);
        let mut sent = Vec::new();
        let mut send = |chunk: Chunk| -> Result<(), ()> {
            sent.push(chunk);
            Ok(())
        };
        for (index, &size) in sizes.iter().enumerate() {
            ahead
                .push(pseudo_random(size, index as u64), &mut send)
                .expect("no error");
            // The bound: never more than two windows held.
            let held: usize = ahead.window_bytes;
            assert!(held + max_chunk <= pool.map_or(usize::MAX, |pool| pool.window_bytes));
        }
        ahead.drain(&mut send).expect("no error");
        sent
    }

    #[test]
    fn chunks_come_out_hashed_in_the_order_they_went_in() {
        let pool = HashPool::new(2, 5000).expect("pool");
        for count in [0usize, 1, 2, 3, 7, 40] {
            let sizes: Vec<usize> = (0..count).map(|index| 100 + index * 37 % 1000).collect();
            let expected = through(None, 1000, &sizes);
            assert_eq!(expected.len(), count);
            assert_eq!(through(Some(&pool), 1000, &sizes), expected, "{count}");
        }
    }

    #[test]
    fn an_error_from_send_stops_the_file() {
        let pool = HashPool::new(2, 3000).expect("pool");
        let mut ahead = Ahead::new(Some(&pool), 1000);
        let mut sent = 0;
        let mut send = |_: Chunk| -> Result<(), &str> {
            sent += 1;
            if sent == 3 { Err("refused") } else { Ok(()) }
        };
        let mut result = Ok(());
        for index in 0..20 {
            result = ahead.push(pseudo_random(900, index), &mut send);
            if result.is_err() {
                break;
            }
        }
        let result = result.and_then(|()| ahead.drain(&mut send));
        assert_eq!(result, Err("refused"));
    }
}
