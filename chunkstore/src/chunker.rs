//! Content-defined chunking: FastCDC v2020, push-based.
//!
//! [`Chunker`] takes bytes in pieces of any size and hands back finished
//! chunks; it does no I/O, so a file, a gRPC stream or a pipe can feed it
//! alike. [`ChunkReader`] is the thin adapter over `std::io::Read`.
//! Memory is bounded by [`pending_limit`] (the maximum chunk size and a
//! quarter more) whatever the input.
//! [`Chunker::feed_zeros`] takes a run of zero bytes (a hole of a sparse
//! file) without copying or hashing the whole chunks it holds, and must cut
//! exactly where feeding those zeros would.
//! The `_unhashed` variants cut the same chunks but hand back their bytes
//! without hashing them, for a caller that hashes several chunks at once on
//! other threads (the backup walk); boundaries never depend on hashes.

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

/// A piece of what [`Chunker::feed_zeros`] hands back: `T` is a [`Chunk`],
/// or the bytes of a chunk not yet hashed for
/// [`Chunker::feed_zeros_unhashed`].
#[derive(Debug, PartialEq, Eq)]
pub enum Cut<T = Chunk> {
    /// A finished chunk, as [`Chunker::feed`] gives them.
    Chunk(T),
    /// `count` chunks in a row, each of `len` zero bytes and so all with the
    /// id `id`, neither built nor hashed: a caller that needs the bytes
    /// makes them once.
    Zeros {
        /// BLAKE3 of `len` zero bytes.
        id: ChunkId,
        /// Bytes of each chunk.
        len: u32,
        /// How many chunks.
        count: u64,
    },
}

/// Zero bytes fed from here when a run of zeros is too short to skip.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// `len` zero bytes, as slices of one static buffer of zeros.
pub(crate) fn zero_pieces(len: u64) -> impl Iterator<Item = &'static [u8]> {
    let piece = ZEROS.len() as u64;
    (0..len.div_ceil(piece)).map(move |index| &ZEROS[..(len - index * piece).min(piece) as usize])
}

/// Whether every byte of `bytes` is zero (compared with a static buffer of
/// zeros piece by piece, which runs as fast as `memcmp`; it stops at the
/// first piece that differs).
pub fn all_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(ZEROS.len())
        .all(|piece| piece == &ZEROS[..piece.len()])
}

/// The most bytes a [`Chunker`] with chunks of up to `max_chunk` bytes holds
/// uncut: it cuts once that many are pending. More than `max_chunk`, so
/// every cut finds at least one chunk that ends before the pending bytes do
/// (final, see [`Chunker::feed`]); the quarter more is what a pass takes at
/// the least, so passes are few and the open chunk FastCDC scans again at
/// each is a small part of them.
pub fn pending_limit(max_chunk: usize) -> usize {
    max_chunk + max_chunk / 4
}

/// Push-based FastCDC: `feed` bytes, collect finished chunks, `finish` at the end.
#[derive(Debug)]
pub struct Chunker {
    params: ChunkParams,
    pending: Vec<u8>,
    /// How many of the last pending bytes are zeros, kept up to date as
    /// bytes come and go, so that "the open chunk is all zeros" is known
    /// without a scan.
    trailing_zeros: usize,
    /// The length and id of the chunk FastCDC cuts from a long run of zeros,
    /// once needed.
    zero_chunk: Option<(u32, ChunkId)>,
}

impl Chunker {
    /// A chunker with validated `params`.
    pub fn new(params: ChunkParams) -> Result<Self, BadChunkParams> {
        params.validate()?;
        Ok(Self {
            params,
            pending: Vec::with_capacity(pending_limit(params.max_size as usize)),
            trailing_zeros: 0,
            zero_chunk: None,
        })
    }

    /// Add `bytes`; every chunk whose end is now known is passed to `emit`.
    ///
    /// A cut FastCDC finds before the end of the pending bytes is final (it
    /// depends only on the bytes before it), so only the last, open chunk is
    /// kept back. Cutting waits until [`pending_limit`] bytes are pending,
    /// which bounds memory and keeps the work per byte constant.
    pub fn feed(&mut self, bytes: &[u8], mut emit: impl FnMut(Chunk)) {
        self.feed_known(bytes, false, &mut |data| emit(Chunk::new(data)));
    }

    /// [`Chunker::feed`], but each chunk's bytes are handed to `emit`
    /// without being hashed: the caller hashes them (the same chunks, cut at
    /// the same places).
    pub fn feed_unhashed(&mut self, bytes: &[u8], mut emit: impl FnMut(Vec<u8>)) {
        self.feed_known(bytes, false, &mut emit);
    }

    /// `feed`, told whether `bytes` are all zeros (else their trailing zeros
    /// are counted, which for most bytes stops at the last one).
    fn feed_known(&mut self, mut bytes: &[u8], all_zeros: bool, emit: &mut impl FnMut(Vec<u8>)) {
        let limit = pending_limit(self.params.max_size as usize);
        while !bytes.is_empty() {
            let room = limit.saturating_sub(self.pending.len()).max(1);
            let take = room.min(bytes.len());
            let added = &bytes[..take];
            let zeros_at_end = if all_zeros {
                take
            } else {
                added.iter().rev().take_while(|&&byte| byte == 0).count()
            };
            self.trailing_zeros = if zeros_at_end == take {
                self.trailing_zeros + take
            } else {
                zeros_at_end
            };
            self.pending.extend_from_slice(added);
            bytes = &bytes[take..];
            if self.pending.len() >= limit {
                self.cut(false, emit);
            }
        }
    }

    /// Add `len` zero bytes: the same chunks as [`Chunker::feed`] of that
    /// many zeros, handed to `emit`, but the whole chunks that lie in the run
    /// come as one [`Cut::Zeros`] instead of being built and hashed.
    ///
    /// FastCDC decides a cut from at most `max_size` bytes after a chunk's
    /// start, so every chunk that starts in the run with `max_size` zeros
    /// still ahead of it is the same: the first chunk FastCDC cuts from a
    /// long run of zeros. The zeros before the first such start (the chunk
    /// that reaches back into earlier bytes) and those too close to the
    /// run's end go through `feed` as they are.
    pub fn feed_zeros(&mut self, len: u64, mut emit: impl FnMut(Cut)) {
        self.feed_zeros_unhashed(len, |cut| {
            emit(match cut {
                Cut::Chunk(data) => Cut::Chunk(Chunk::new(data)),
                Cut::Zeros { id, len, count } => Cut::Zeros { id, len, count },
            })
        });
    }

    /// [`Chunker::feed_zeros`], but the chunks that are not skipped come as
    /// their bytes, not hashed (see [`Chunker::feed_unhashed`]).
    pub fn feed_zeros_unhashed(&mut self, mut len: u64, mut emit: impl FnMut(Cut<Vec<u8>>)) {
        let max = u64::from(self.params.max_size);
        // A chunk of zeros is at least `min_size` long: a shorter run cannot
        // hold one to skip, nor pay for working out which it is.
        if (self.pending.len() as u64).saturating_add(len) < max + u64::from(self.params.min_size) {
            self.feed_zero_bytes(len, &mut emit);
            return;
        }
        let (zero_len, zero_id) = self.zero_chunk();
        let zero_len = u64::from(zero_len);
        while len > 0 {
            let pending = self.pending.len() as u64;
            // The open chunk is all zeros and `max_size` zeros follow the
            // start of at least one whole zero chunk.
            if self.trailing_zeros == self.pending.len() && pending + len >= max + zero_len {
                let count = (pending + len - max) / zero_len;
                let skipped = count * zero_len;
                emit(Cut::Zeros {
                    id: zero_id,
                    len: zero_len as u32,
                    count,
                });
                if skipped <= pending {
                    self.pending.drain(..skipped as usize);
                } else {
                    len -= skipped - pending;
                    self.pending.clear();
                }
                self.trailing_zeros = self.pending.len();
                // Fewer zeros are left than a skip needs: feed them below.
                self.feed_zero_bytes(len, &mut emit);
                return;
            }
            let piece = len.min(ZEROS.len() as u64);
            self.feed_zero_bytes(piece, &mut emit);
            len -= piece;
        }
    }

    /// `feed` of `len` zeros.
    fn feed_zero_bytes(&mut self, len: u64, emit: &mut impl FnMut(Cut<Vec<u8>>)) {
        for piece in zero_pieces(len) {
            self.feed_known(piece, true, &mut |data| emit(Cut::Chunk(data)));
        }
    }

    /// The length and id of the chunk FastCDC cuts at the start of a run of
    /// zeros longer than `max_size`.
    fn zero_chunk(&mut self) -> (u32, ChunkId) {
        *self.zero_chunk.get_or_insert_with(|| {
            let ChunkParams {
                min_size,
                avg_size,
                max_size,
            } = self.params;
            // FastCDC looks no further than `max_size` bytes for a cut.
            let zeros = vec![0u8; max_size as usize];
            let len = fastcdc::v2020::FastCDC::new(&zeros, min_size, avg_size, max_size)
                .next()
                .map_or(max_size as usize, |cut| cut.length);
            (len as u32, ChunkId::of(&zeros[..len]))
        })
    }

    /// The remaining bytes as the last chunks (none for empty input).
    pub fn finish(&mut self, mut emit: impl FnMut(Chunk)) {
        self.cut(true, &mut |data| emit(Chunk::new(data)));
    }

    /// [`Chunker::finish`], the chunks not hashed (see
    /// [`Chunker::feed_unhashed`]).
    pub fn finish_unhashed(&mut self, mut emit: impl FnMut(Vec<u8>)) {
        self.cut(true, &mut emit);
    }

    fn cut(&mut self, last: bool, emit: &mut impl FnMut(Vec<u8>)) {
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
            emit(self.pending[cut.offset..cut.offset + cut.length].to_vec());
            consumed = cut.offset + cut.length;
        }
        self.pending.drain(..consumed);
        // Cuts take bytes from the front: the end is what it was.
        self.trailing_zeros = self.trailing_zeros.min(self.pending.len());
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
    fn zero_pieces_add_up_to_the_length_asked_for() {
        for len in [0u64, 1, 65_535, 65_536, 65_537, 200_000] {
            let pieces: Vec<&[u8]> = zero_pieces(len).collect();
            assert_eq!(
                pieces.iter().map(|piece| piece.len() as u64).sum::<u64>(),
                len
            );
            assert!(
                pieces
                    .iter()
                    .all(|piece| !piece.is_empty() && all_zero(piece))
            );
        }
    }

    /// A long run of zeros is skipped, not fed: all but the chunks at its
    /// edges come as one `Cut::Zeros`.
    #[test]
    fn a_long_run_of_zeros_is_one_cut() {
        let mut chunker = Chunker::new(small()).unwrap();
        let mut chunks = 0;
        let mut skipped = 0;
        chunker.feed(&pseudo_random(5000, 1), |_| chunks += 1);
        chunker.feed_zeros(1 << 30, |cut| match cut {
            Cut::Chunk(_) => chunks += 1,
            Cut::Zeros { len, count, .. } => skipped += u64::from(len) * count,
        });
        // At most two chunks' worth of zeros on either side of the skip.
        let max = u64::from(small().max_size);
        assert!(chunks <= 8, "{chunks} chunks fed one by one");
        assert!(skipped >= (1 << 30) - 4 * max, "{skipped} bytes skipped");
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

        /// Runs of zeros fed with `feed_zeros` cut exactly as the same
        /// zeros fed with `feed` do, whatever comes before and after them;
        /// long runs come as `Cut::Zeros` of the right id.
        #[test]
        fn fed_zeros_cut_as_the_zeros_themselves(
            pieces in proptest::collection::vec(
                (0usize..30_000, 0usize..40_000, 0u64..120_000, any::<u64>()),
                1..6,
            ),
        ) {
            let mut data = Vec::new();
            let mut chunker = Chunker::new(small()).unwrap();
            let mut out = Vec::new();
            for (data_len, zeros_fed, zeros, seed) in pieces {
                // Some zeros come through `feed` too, in the same call as
                // the bytes before them.
                let mut bytes = pseudo_random(data_len, seed);
                bytes.resize(data_len + zeros_fed, 0);
                data.extend_from_slice(&bytes);
                chunker.feed(&bytes, |c| out.push(c));
                data.resize(data.len() + zeros as usize, 0);
                chunker.feed_zeros(zeros, |cut| match cut {
                    Cut::Chunk(chunk) => out.push(chunk),
                    Cut::Zeros { id, len, count } => {
                        let zeros = vec![0; len as usize];
                        assert_eq!(id, ChunkId::of(&zeros));
                        for _ in 0..count {
                            out.push(Chunk { id, data: zeros.clone() });
                        }
                    }
                });
            }
            chunker.finish(|c| out.push(c));
            let expected = one_shot(&data, small());
            prop_assert_eq!(out.len(), expected.len());
            for (chunk, bytes) in out.iter().zip(&expected) {
                prop_assert_eq!(&chunk.data, bytes);
                prop_assert_eq!(chunk.id, ChunkId::of(bytes));
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
