//! Content-defined chunking: FastCDC v2020, push-based.
//!
//! [`Chunker`] takes bytes in pieces of any size and hands back finished
//! chunks; it does no I/O, so a file, a gRPC stream or a pipe can feed it
//! alike. [`ChunkReader`] is the thin adapter over `std::io::Read`.
//! Memory is bounded by twice the maximum chunk size whatever the input.

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::id::ChunkId;

/// FastCDC size parameters. A property of the store (recorded in its config):
/// every node of a fabric uses the same ones so dedup works across them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkParams {
    /// No chunk is shorter, except a file's last.
    pub min_size: u32,
    /// The size FastCDC aims at.
    pub avg_size: u32,
    /// No chunk is longer.
    pub max_size: u32,
}

impl Default for ChunkParams {
    /// 512 KiB / 1 MiB / 4 MiB: the average restic and borg use.
    fn default() -> Self {
        Self {
            min_size: 512 * 1024,
            avg_size: 1024 * 1024,
            max_size: 4 * 1024 * 1024,
        }
    }
}

/// Chunk size parameters FastCDC cannot use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid chunk size parameters min={min_size} avg={avg_size} max={max_size}: need {min_lo} <= min <= avg <= max <= {max_hi}"
)]
pub struct BadChunkParams {
    /// Given minimum.
    pub min_size: u32,
    /// Given average.
    pub avg_size: u32,
    /// Given maximum.
    pub max_size: u32,
    /// Smallest allowed minimum.
    pub min_lo: u32,
    /// Largest allowed maximum.
    pub max_hi: u32,
}

impl ChunkParams {
    /// Check the parameters are within FastCDC v2020's bounds and ordered.
    pub fn validate(&self) -> Result<(), BadChunkParams> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&self.min_size)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&self.avg_size)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&self.max_size)
            && self.min_size <= self.avg_size
            && self.avg_size <= self.max_size;
        if ok {
            Ok(())
        } else {
            Err(BadChunkParams {
                min_size: self.min_size,
                avg_size: self.avg_size,
                max_size: self.max_size,
                min_lo: MINIMUM_MIN,
                max_hi: MAXIMUM_MAX,
            })
        }
    }
}

/// A finished chunk: its id and its plain bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Chunk {
    /// BLAKE3 of `data`.
    pub id: ChunkId,
    /// The plain bytes.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunk")
            .field("id", &self.id)
            .field("len", &self.data.len())
            .finish()
    }
}

impl Chunk {
    /// A chunk of `data`, hashed.
    pub fn new(data: Vec<u8>) -> Self {
        Self {
            id: ChunkId::of(&data),
            data,
        }
    }
}

/// Push-based FastCDC: `feed` bytes, collect finished chunks, `finish` at the end.
#[derive(Debug)]
pub struct Chunker {
    params: ChunkParams,
    pending: Vec<u8>,
}

impl Chunker {
    /// A chunker with validated `params`.
    pub fn new(params: ChunkParams) -> Result<Self, BadChunkParams> {
        params.validate()?;
        Ok(Self {
            params,
            pending: Vec::with_capacity(params.max_size as usize * 2),
        })
    }

    /// Add `bytes`; every chunk whose end is now known is passed to `emit`.
    ///
    /// A cut FastCDC finds before the end of the pending bytes is final (it
    /// depends only on the bytes before it), so only the last, open chunk is
    /// kept back. Cutting waits until at least `max_size` bytes are pending,
    /// which bounds memory and keeps the work per byte constant.
    pub fn feed(&mut self, mut bytes: &[u8], mut emit: impl FnMut(Chunk)) {
        let max = self.params.max_size as usize;
        while !bytes.is_empty() {
            let room = (2 * max).saturating_sub(self.pending.len()).max(1);
            let take = room.min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() >= 2 * max {
                self.cut(false, &mut emit);
            }
        }
    }

    /// The remaining bytes as the last chunks (none for empty input).
    pub fn finish(&mut self, mut emit: impl FnMut(Chunk)) {
        self.cut(true, &mut emit);
    }

    fn cut(&mut self, last: bool, emit: &mut impl FnMut(Chunk)) {
        let ChunkParams {
            min_size,
            avg_size,
            max_size,
        } = self.params;
        let mut consumed = 0;
        let cuts: Vec<fastcdc::v2020::Chunk> =
            fastcdc::v2020::FastCDC::new(&self.pending, min_size, avg_size, max_size).collect();
        let keep_last = usize::from(!last);
        for cut in &cuts[..cuts.len().saturating_sub(keep_last)] {
            let data = self.pending[cut.offset..cut.offset + cut.length].to_vec();
            emit(Chunk::new(data));
            consumed = cut.offset + cut.length;
        }
        self.pending.drain(..consumed);
    }
}

/// Chunks of everything `reader` yields, one at a time.
#[derive(Debug)]
pub struct ChunkReader<R> {
    reader: R,
    chunker: Chunker,
    ready: std::collections::VecDeque<Chunk>,
    buffer: Vec<u8>,
    done: bool,
}

impl<R: Read> ChunkReader<R> {
    /// Chunk `reader` with `params`.
    pub fn new(reader: R, params: ChunkParams) -> Result<Self, BadChunkParams> {
        Ok(Self {
            reader,
            chunker: Chunker::new(params)?,
            ready: Default::default(),
            buffer: vec![0; 256 * 1024],
            done: false,
        })
    }
}

impl<R: Read> Iterator for ChunkReader<R> {
    type Item = std::io::Result<Chunk>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(chunk) = self.ready.pop_front() {
                return Some(Ok(chunk));
            }
            if self.done {
                return None;
            }
            match self.reader.read(&mut self.buffer) {
                Ok(0) => {
                    self.done = true;
                    let ready = &mut self.ready;
                    self.chunker.finish(|chunk| ready.push_back(chunk));
                }
                Ok(n) => {
                    let ready = &mut self.ready;
                    self.chunker
                        .feed(&self.buffer[..n], |chunk| ready.push_back(chunk));
                }
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => {
                    self.done = true;
                    return Some(Err(err));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::pseudo_random;
    use proptest::prelude::*;

    fn small() -> ChunkParams {
        ChunkParams {
            min_size: 1024,
            avg_size: 4096,
            max_size: 16384,
        }
    }

    fn one_shot(data: &[u8], params: ChunkParams) -> Vec<Vec<u8>> {
        fastcdc::v2020::FastCDC::new(data, params.min_size, params.avg_size, params.max_size)
            .map(|c| data[c.offset..c.offset + c.length].to_vec())
            .collect()
    }

    #[test]
    fn empty_input_gives_no_chunks() {
        let mut chunker = Chunker::new(small()).unwrap();
        let mut out = Vec::new();
        chunker.feed(&[], |c| out.push(c));
        chunker.finish(|c| out.push(c));
        assert!(out.is_empty());
    }

    #[test]
    fn bad_params_are_refused_with_their_values() {
        let err = Chunker::new(ChunkParams {
            min_size: 10,
            avg_size: 5,
            max_size: 1,
        })
        .unwrap_err();
        assert!(err.to_string().contains("min=10 avg=5 max=1"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Feeding in pieces of any size gives the chunks of one pass over
        /// the whole input, and the ids are the BLAKE3 of the bytes.
        #[test]
        fn streaming_equals_one_shot(len in 0usize..200_000, seed: u64, piece in 1usize..40_000) {
            let data = pseudo_random(len, seed);
            let mut chunker = Chunker::new(small()).unwrap();
            let mut out = Vec::new();
            for part in data.chunks(piece) {
                chunker.feed(part, |c| out.push(c));
            }
            chunker.finish(|c| out.push(c));
            let expected = one_shot(&data, small());
            prop_assert_eq!(out.len(), expected.len());
            for (chunk, bytes) in out.iter().zip(&expected) {
                prop_assert_eq!(&chunk.data, bytes);
                prop_assert_eq!(chunk.id, ChunkId(*blake3::hash(bytes).as_bytes()));
            }
        }

        /// Every chunk but the last is within [min, max]; the last is within (0, max].
        #[test]
        fn sizes_stay_within_bounds(len in 1usize..300_000, seed: u64) {
            let data = pseudo_random(len, seed);
            let chunks: Vec<Chunk> = ChunkReader::new(&data[..], small()).unwrap().map(|c| c.unwrap()).collect();
            let total: usize = chunks.iter().map(|c| c.data.len()).sum();
            prop_assert_eq!(total, len);
            for (i, chunk) in chunks.iter().enumerate() {
                prop_assert!(chunk.data.len() <= small().max_size as usize);
                if i + 1 < chunks.len() {
                    prop_assert!(chunk.data.len() >= small().min_size as usize);
                }
            }
        }

        /// An insertion in the middle of a large input changes only a few chunks.
        #[test]
        fn insertion_changes_few_chunks(seed: u64, at in 0.2f64..0.8, insert in 1usize..5000) {
            let data = pseudo_random(400_000, seed);
            let pos = (data.len() as f64 * at) as usize;
            let mut edited = data[..pos].to_vec();
            edited.extend(pseudo_random(insert, seed ^ 0xdead));
            edited.extend_from_slice(&data[pos..]);
            let ids = |d: &[u8]| -> std::collections::HashSet<ChunkId> {
                ChunkReader::new(d, small()).unwrap().map(|c| c.unwrap().id).collect()
            };
            let before = ids(&data);
            let after = ids(&edited);
            let new = after.difference(&before).count();
            prop_assert!(new <= 8, "{} new chunks out of {}", new, after.len());
        }
    }
}
