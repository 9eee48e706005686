//! Pack files: where chunk bytes live on disk.
//!
//! A pack is an append-only file of self-describing entries. It starts with a
//! 12-byte header (`PACK_MAGIC`, format version), then entries, then, once it
//! is full, a seal (trailer) after which nothing is ever appended. Each entry:
//!
//! | field | bytes |
//! | --- | --- |
//! | entry magic `FCk1` | 4 |
//! | chunk id (BLAKE3 of the plain bytes) | 32 |
//! | codec (0 raw, 1 zstd) | 1 |
//! | raw (plain) length, u32 LE | 4 |
//! | stored length, u32 LE | 4 |
//! | checksum: first 16 bytes of BLAKE3 over the 45 bytes above and the stored bytes | 16 |
//! | stored bytes | stored length |
//!
//! so the index can be rebuilt from the packs alone ([`scan_pack`]) and a torn
//! tail (a crash in the middle of an append) is recognised and cut off.
//!
//! This module owns the byte format, encoding (compression) and decoding of one
//! entry and of a [`StoredChunk`] (an entry's codec and bytes, as they
//! travel), appending and sealing ([`PackWriter`]) and scanning. It must never
//! overwrite a byte already written, and knows nothing of the index, trees or
//! snapshots.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, IoSlice, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use rayon::prelude::*;

use crate::chunker::Chunk;
use crate::id::ChunkId;

/// First bytes of every pack file.
pub const PACK_MAGIC: [u8; 8] = *b"FABRICPK";
/// The pack format this code writes and reads.
pub const PACK_VERSION: u32 = 1;
/// Bytes of the pack header.
pub const PACK_HEADER_LEN: u64 = 12;
/// First bytes of every entry.
pub const ENTRY_MAGIC: [u8; 4] = *b"FCk1";
/// Bytes of an entry header (before the stored bytes).
pub const ENTRY_HEADER_LEN: usize = 4 + 32 + 1 + 4 + 4 + 16;
/// Largest plain length a [`StoredChunk`] may announce: decoding allocates
/// it. Above every chunk the fabric makes (data chunks are at most the
/// store's maximum chunk size, trees at most 16 MiB on the wire).
pub const MAX_DECODED_LEN: u32 = 64 << 20;
/// First bytes of the seal (trailer) of a full pack.
pub const SEAL_MAGIC: [u8; 8] = *b"FABRSEAL";
/// Bytes of the seal: magic, entry count (u64 LE).
pub const SEAL_LEN: u64 = 16;

/// How an entry's bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codec {
    /// The plain bytes (compression did not shrink them).
    Raw,
    /// A zstd frame.
    Zstd,
}

impl Codec {
    /// The byte written in an entry header.
    pub fn to_byte(self) -> u8 {
        match self {
            Codec::Raw => 0,
            Codec::Zstd => 1,
        }
    }

    /// The codec of an entry header byte, if known.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// The parsed header of one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryHeader {
    /// The chunk the entry holds.
    pub id: ChunkId,
    /// How the bytes are stored.
    pub codec: Codec,
    /// Plain length.
    pub raw_len: u32,
    /// Stored (possibly compressed) length.
    pub stored_len: u32,
    /// First 16 bytes of BLAKE3 over the header fields and the stored bytes.
    pub checksum: [u8; 16],
}

impl EntryHeader {
    /// Bytes the entry takes in the pack, header included.
    pub fn entry_len(&self) -> u64 {
        ENTRY_HEADER_LEN as u64 + u64::from(self.stored_len)
    }
}

/// Why an entry could not be read back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntryError {
    /// The bytes do not start with the entry magic.
    #[error("no entry magic")]
    BadMagic,
    /// Unknown codec byte.
    #[error("unknown codec {0}")]
    BadCodec(u8),
    /// Fewer bytes than the header announces.
    #[error("entry cut short: {have} of {need} bytes")]
    Short {
        /// Bytes present.
        have: u64,
        /// Bytes the header announces.
        need: u64,
    },
    /// The checksum over header and stored bytes does not match.
    #[error("checksum mismatch")]
    Checksum,
    /// The entry is for another chunk than the one asked for.
    #[error("entry holds chunk {found}, not the one asked for")]
    WrongId {
        /// The id in the entry.
        found: ChunkId,
    },
    /// zstd could not decode the stored bytes, or they decode to another length.
    #[error("cannot decompress: {0}")]
    Decompress(String),
    /// The plain bytes do not hash to the entry's id.
    #[error("plain bytes do not hash to the chunk id")]
    HashMismatch,
}

/// One chunk ready to be appended: the entry's header and its stored bytes,
/// borrowed where they already exist (a raw chunk, bytes received from a
/// peer): they are written as they are, not copied behind the header first.
#[derive(Clone, Debug)]
pub struct EncodedEntry<'a> {
    /// The header, as encoded in `head`.
    pub header: EntryHeader,
    /// The encoded header.
    pub head: [u8; ENTRY_HEADER_LEN],
    /// The stored bytes.
    pub stored: Cow<'a, [u8]>,
}

impl EncodedEntry<'_> {
    /// Bytes the entry takes in a pack.
    pub fn len(&self) -> usize {
        ENTRY_HEADER_LEN + self.stored.len()
    }

    /// Never true: an entry has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The whole entry in one buffer, as a pack holds it.
    pub fn to_bytes(&self) -> Vec<u8> {
        [&self.head[..], &self.stored].concat()
    }
}

fn checksum(fields: &[u8], stored: &[u8]) -> [u8; 16] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(fields);
    hasher.update(stored);
    let mut out = [0u8; 16];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    out
}

/// Per-thread zstd state, reused from chunk to chunk: a new context for
/// every chunk costs allocations that show in profiles. The decoder's buffer
/// serves decompression in full (plain bytes are written in full, so a
/// reused buffer saves their page faults); the checker decodes piece by
/// piece; compression writes into the output it returns.
///
/// Every thread that compresses or decompresses keeps its own, so parallel
/// work runs on rayon's pool ([`on_pool`]), a thread per core, not on the
/// many blocking threads of an async caller.
struct ZstdScratch {
    compressor: Option<(i32, zstd::bulk::Compressor<'static>)>,
    decoder: ChunkDecoder,
    checker: Option<StreamChecker>,
}

thread_local! {
    static ZSTD_SCRATCH: std::cell::RefCell<ZstdScratch> = const {
        std::cell::RefCell::new(ZstdScratch {
            compressor: None,
            decoder: ChunkDecoder::new(),
            checker: None,
        })
    };
}

/// Give back the decompression buffers rayon's threads keep between chunks
/// (a full decode's as large as the largest chunk it decoded, a check's
/// window as large as the largest frame's): for a process that received a
/// transfer and may now idle or serve something else. Returns at once; each
/// thread lets go of its buffers when it next takes work.
pub fn release_thread_buffers() {
    rayon::spawn_broadcast(|_| {
        ZSTD_SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.decoder = ChunkDecoder::new();
            scratch.checker = None;
        });
    });
}

/// Decodes chunks in full into one buffer it keeps from chunk to chunk (as
/// large as the largest chunk it decoded): a caller that writes chunk after
/// chunk (a restore) holds one chunk's plain bytes at a time, not a new
/// allocation per chunk.
#[derive(Default)]
pub struct ChunkDecoder {
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    buffer: Vec<u8>,
}

impl ChunkDecoder {
    /// A decoder that has allocated nothing yet.
    pub const fn new() -> Self {
        Self {
            decompressor: None,
            buffer: Vec::new(),
        }
    }

    /// The plain bytes of `chunk`, checked against its length and id: its
    /// own bytes when raw, else decoded into this decoder's buffer (until the
    /// next call). Decoding allocates up to `raw_len` bytes, at most
    /// [`MAX_DECODED_LEN`].
    pub fn plain<'a>(&'a mut self, chunk: &'a StoredChunk) -> Result<&'a [u8], EntryError> {
        chunk.check_raw_len()?;
        self.plain_of(&chunk.id, chunk.codec, chunk.raw_len, &chunk.stored)
    }

    /// The plain bytes `stored` encodes as `codec`, checked against
    /// `raw_len` and `id` (see [`ChunkDecoder::plain`]).
    fn plain_of<'a>(
        &'a mut self,
        id: &ChunkId,
        codec: Codec,
        raw_len: u32,
        stored: &'a [u8],
    ) -> Result<&'a [u8], EntryError> {
        let plain: &[u8] = match codec {
            Codec::Raw => stored,
            Codec::Zstd => self.decompress(stored, raw_len)?,
        };
        check_plain(id, raw_len, plain)?;
        Ok(plain)
    }

    /// Decompress `stored` (zstd frames of `raw_len` plain bytes) into the
    /// buffer; not checked.
    fn decompress(&mut self, stored: &[u8], raw_len: u32) -> Result<&[u8], EntryError> {
        let decompressor = match &mut self.decompressor {
            Some(decompressor) => decompressor,
            slot => slot.insert(
                zstd::bulk::Decompressor::new()
                    .map_err(|err| EntryError::Decompress(err.to_string()))?,
            ),
        };
        self.buffer.clear();
        self.buffer.reserve(raw_len as usize);
        decompressor
            .decompress_to_buffer(stored, &mut self.buffer)
            .map_err(|err| EntryError::Decompress(err.to_string()))?;
        Ok(&self.buffer)
    }
}

/// Plain bytes [`StreamChecker`] decodes at a time (zstd's own streaming
/// output size).
const CHECK_PIECE_BYTES: usize = 128 * 1024;

/// The largest zstd window a check accepts, as a power of two: that of a
/// frame of [`MAX_DECODED_LEN`] bytes. Without it zstd accepts windows up to
/// 128 MiB, which a frame that does not declare its size could make a check
/// allocate.
const CHECK_WINDOW_LOG_MAX: u32 = MAX_DECODED_LEN.ilog2();

/// Checks zstd-encoded chunks piece by piece, hashing the plain bytes as
/// they come: it holds the frame's window (at most the chunk's size; 2 MiB
/// for a 4 MiB chunk at level 3) and one piece, not the whole chunk. A node
/// checks every chunk it receives, on every core at once.
struct StreamChecker {
    context: zstd::stream::raw::Decoder<'static>,
    piece: Vec<u8>,
}

impl StreamChecker {
    fn new() -> Result<Self, EntryError> {
        let failed = |err: std::io::Error| EntryError::Decompress(err.to_string());
        let mut context = zstd::stream::raw::Decoder::new().map_err(failed)?;
        context
            .set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
                CHECK_WINDOW_LOG_MAX,
            ))
            .map_err(failed)?;
        Ok(Self {
            context,
            piece: vec![0; CHECK_PIECE_BYTES],
        })
    }

    /// Check that `stored` (zstd frames) decodes to `raw_len` bytes that
    /// hash to `id`, stopping as soon as it decodes more.
    fn check(&mut self, id: &ChunkId, raw_len: u32, stored: &[u8]) -> Result<(), EntryError> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let failed = |err: std::io::Error| EntryError::Decompress(err.to_string());
        self.context.reinit().map_err(failed)?;
        let mut hasher = blake3::Hasher::new();
        let mut input = InBuffer::around(stored);
        let mut decoded = 0u64;
        loop {
            let taken = input.pos();
            let mut output = OutBuffer::around(&mut self.piece[..]);
            let frame_left = self.context.run(&mut input, &mut output).map_err(failed)?;
            let produced = output.pos();
            decoded += produced as u64;
            if decoded > u64::from(raw_len) {
                return Err(EntryError::Decompress(format!(
                    "more than the {raw_len} bytes announced"
                )));
            }
            hasher.update(&self.piece[..produced]);
            let input_left = input.pos() < stored.len();
            if frame_left == 0 && !input_left {
                break;
            }
            // Output room left means zstd took all it could: with no input
            // left (or none taken) the frame is cut short.
            if produced < self.piece.len() && (!input_left || input.pos() == taken) {
                return Err(EntryError::Decompress(
                    "the zstd frame ends early".to_owned(),
                ));
            }
        }
        if decoded != u64::from(raw_len) {
            return Err(EntryError::Decompress(format!(
                "{decoded} bytes instead of {raw_len}"
            )));
        }
        if ChunkId(*hasher.finalize().as_bytes()) != *id {
            return Err(EntryError::HashMismatch);
        }
        Ok(())
    }
}

/// Check that `stored` (encoded as `codec`) decodes to `raw_len` plain bytes
/// that hash to `id`, without holding the plain bytes whole: raw bytes are
/// hashed where they are, zstd frames piece by piece on this thread's
/// [`StreamChecker`].
fn check_encoded(
    id: &ChunkId,
    codec: Codec,
    raw_len: u32,
    stored: &[u8],
) -> Result<(), EntryError> {
    match codec {
        Codec::Raw => check_plain(id, raw_len, stored),
        Codec::Zstd => ZSTD_SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let checker = match &mut scratch.checker {
                Some(checker) => checker,
                slot => slot.insert(StreamChecker::new()?),
            };
            checker.check(id, raw_len, stored)
        }),
    }
}

/// `data` compressed with zstd at `zstd_level`, if that shrinks it.
fn compress_if_smaller(data: &[u8], zstd_level: i32) -> Option<Vec<u8>> {
    ZSTD_SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let ZstdScratch { compressor, .. } = &mut *scratch;
        let compressor = match compressor {
            Some((level, compressor)) if *level == zstd_level => compressor,
            slot => {
                let created = zstd::bulk::Compressor::new(zstd_level).ok()?;
                &mut slot.insert((zstd_level, created)).1
            }
        };
        // Room for the input's length: every frame that shrinks the chunk
        // fits, and zstd gives up early on one that would not. Only the
        // pages written are touched; the rest is given back when it shrinks.
        let mut compressed = Vec::with_capacity(data.len());
        compressor.compress_to_buffer(data, &mut compressed).ok()?;
        (compressed.len() < data.len()).then(|| {
            compressed.shrink_to_fit();
            compressed
        })
    })
}

/// Run `op`, which works in parallel, on rayon's global pool when the caller
/// is on no rayon pool (an async runtime's blocking thread): the per-thread
/// zstd state (a context, and a buffer for decompression) then lives on the
/// pool's threads, one per core, instead of on each of the runtime's up to
/// 512 blocking threads.
pub fn on_pool<R: Send>(op: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        op()
    } else {
        rayon::scope(|_| op())
    }
}

/// Encode chunk `id` with plain bytes `data`: zstd at `zstd_level`, or raw when
/// compression does not shrink the bytes.
pub fn encode_entry(id: ChunkId, data: &[u8], zstd_level: i32) -> EncodedEntry<'_> {
    match compress_if_smaller(data, zstd_level) {
        Some(compressed) => encode_stored(id, Codec::Zstd, data.len() as u32, compressed),
        None => encode_stored(id, Codec::Raw, data.len() as u32, data),
    }
}

/// A chunk in the form a pack entry holds it (raw or a zstd frame), without
/// the entry's header. This is what travels between agent and node: a chunk
/// is compressed once, by whoever reads it, the receiver checks it by
/// decoding and re-hashing, and a copy between nodes moves entries as they
/// are, without decompressing and compressing again.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredChunk {
    /// BLAKE3 of the plain bytes.
    pub id: ChunkId,
    /// How `stored` encodes the plain bytes.
    pub codec: Codec,
    /// Length of the plain bytes.
    pub raw_len: u32,
    /// The encoded bytes: `Bytes` so that a chunk received in a larger
    /// message can stay a slice of it until it is written.
    pub stored: Bytes,
}

impl std::fmt::Debug for StoredChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredChunk")
            .field("id", &self.id)
            .field("codec", &self.codec)
            .field("raw_len", &self.raw_len)
            .field("stored_len", &self.stored.len())
            .finish()
    }
}

impl StoredChunk {
    /// Encode `chunk`: zstd at `zstd_level`, or raw (its bytes moved, not
    /// copied) when compression does not shrink it.
    pub fn encode(chunk: Chunk, zstd_level: i32) -> Self {
        let raw_len = chunk.data.len() as u32;
        match compress_if_smaller(&chunk.data, zstd_level) {
            Some(compressed) => Self {
                id: chunk.id,
                codec: Codec::Zstd,
                raw_len,
                stored: compressed.into(),
            },
            None => Self {
                id: chunk.id,
                codec: Codec::Raw,
                raw_len,
                stored: chunk.data.into(),
            },
        }
    }

    /// Check that the stored bytes decode to `raw_len` plain bytes that hash
    /// to the id. A zstd frame is decoded piece by piece: the check holds its
    /// window, at most `raw_len` bytes, which a caller taking chunks from a
    /// peer bounds to its own limit first; here it is only held under
    /// [`MAX_DECODED_LEN`].
    pub fn check(&self) -> Result<(), EntryError> {
        self.check_raw_len()?;
        check_encoded(&self.id, self.codec, self.raw_len, &self.stored)
    }

    fn check_raw_len(&self) -> Result<(), EntryError> {
        check_announced_len(self.raw_len)
    }

    /// Tests: `stored` with byte `index` XORed by `mask` (its `Bytes` may be
    /// shared, so the bytes are copied).
    #[cfg(test)]
    pub(crate) fn flip_stored_byte(&mut self, index: usize, mask: u8) {
        let mut bytes = self.stored.to_vec();
        bytes[index] ^= mask;
        self.stored = bytes.into();
    }

    /// The plain bytes, checked against the id (raw bytes are moved, not
    /// copied, when nothing else shares their buffer). Decoding allocates
    /// `raw_len` bytes: see [`StoredChunk::check`].
    pub fn into_plain(self) -> Result<Vec<u8>, EntryError> {
        self.check_raw_len()?;
        match self.codec {
            Codec::Raw => {
                check_plain(&self.id, self.raw_len, &self.stored)?;
                Ok(self.stored.into())
            }
            Codec::Zstd => decode(&self.id, self.codec, self.raw_len, &self.stored),
        }
    }
}

/// Encode every chunk of `chunks` in parallel (see [`StoredChunk::encode`]).
pub fn encode_chunks(chunks: Vec<Chunk>, zstd_level: i32) -> Vec<StoredChunk> {
    on_pool(|| {
        chunks
            .into_par_iter()
            .map(|chunk| StoredChunk::encode(chunk, zstd_level))
            .collect()
    })
}

/// An entry of already-stored bytes (GC moves entries without recompressing;
/// a receiver keeps the encoding a sender chose).
pub fn encode_stored<'a>(
    id: ChunkId,
    codec: Codec,
    raw_len: u32,
    stored: impl Into<Cow<'a, [u8]>>,
) -> EncodedEntry<'a> {
    let stored = stored.into();
    let mut head = [0u8; ENTRY_HEADER_LEN];
    head[..4].copy_from_slice(&ENTRY_MAGIC);
    head[4..36].copy_from_slice(id.as_bytes());
    head[36] = codec.to_byte();
    head[37..41].copy_from_slice(&raw_len.to_le_bytes());
    head[41..45].copy_from_slice(&(stored.len() as u32).to_le_bytes());
    let sum = checksum(&head[..45], &stored);
    head[45..].copy_from_slice(&sum);
    EncodedEntry {
        header: EntryHeader {
            id,
            codec,
            raw_len,
            stored_len: stored.len() as u32,
            checksum: sum,
        },
        head,
        stored,
    }
}

/// Parse an entry header (no checksum check: that needs the stored bytes).
pub fn parse_header(bytes: &[u8]) -> Result<EntryHeader, EntryError> {
    if bytes.len() < ENTRY_HEADER_LEN {
        return Err(EntryError::Short {
            have: bytes.len() as u64,
            need: ENTRY_HEADER_LEN as u64,
        });
    }
    if bytes[..4] != ENTRY_MAGIC {
        return Err(EntryError::BadMagic);
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(&bytes[4..36]);
    let codec = Codec::from_byte(bytes[36]).ok_or(EntryError::BadCodec(bytes[36]))?;
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[37..41]);
    let raw_len = u32::from_le_bytes(word);
    word.copy_from_slice(&bytes[41..45]);
    let stored_len = u32::from_le_bytes(word);
    let mut sum = [0u8; 16];
    sum.copy_from_slice(&bytes[45..61]);
    Ok(EntryHeader {
        id: ChunkId(id),
        codec,
        raw_len,
        stored_len,
        checksum: sum,
    })
}

/// Check a whole entry (header and stored bytes) and return its header and stored bytes.
pub fn check_entry(bytes: &[u8]) -> Result<(EntryHeader, &[u8]), EntryError> {
    let header = parse_header(bytes)?;
    let need = header.entry_len();
    if (bytes.len() as u64) < need {
        return Err(EntryError::Short {
            have: bytes.len() as u64,
            need,
        });
    }
    let stored = &bytes[ENTRY_HEADER_LEN..need as usize];
    if checksum(&bytes[..45], stored) != header.checksum {
        return Err(EntryError::Checksum);
    }
    Ok((header, stored))
}

/// Check that a checked entry's stored bytes decode to plain bytes that
/// hash to its id, without holding them whole (see [`StoredChunk::check`]).
pub fn check_stored(header: &EntryHeader, stored: &[u8]) -> Result<(), EntryError> {
    check_announced_len(header.raw_len)?;
    check_encoded(&header.id, header.codec, header.raw_len, stored)
}

/// The plain bytes of a checked entry, re-hashed against its id.
pub fn decode_stored(header: &EntryHeader, stored: &[u8]) -> Result<Vec<u8>, EntryError> {
    decode(&header.id, header.codec, header.raw_len, stored)
}

/// Decode `stored` into `raw_len` plain bytes and check that they hash to `id`.
fn decode(id: &ChunkId, codec: Codec, raw_len: u32, stored: &[u8]) -> Result<Vec<u8>, EntryError> {
    ZSTD_SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let plain = scratch.decoder.plain_of(id, codec, raw_len, stored)?;
        Ok(plain.to_vec())
    })
}

/// Refuse a plain length above [`MAX_DECODED_LEN`] before decoding anything.
fn check_announced_len(raw_len: u32) -> Result<(), EntryError> {
    if raw_len > MAX_DECODED_LEN {
        return Err(EntryError::Decompress(format!(
            "{raw_len} plain bytes announced, more than any chunk ({MAX_DECODED_LEN})"
        )));
    }
    Ok(())
}

/// Check that `plain` is `raw_len` bytes hashing to `id`.
fn check_plain(id: &ChunkId, raw_len: u32, plain: &[u8]) -> Result<(), EntryError> {
    if plain.len() != raw_len as usize {
        return Err(EntryError::Decompress(format!(
            "{} bytes instead of {raw_len}",
            plain.len()
        )));
    }
    if !id.matches(plain) {
        return Err(EntryError::HashMismatch);
    }
    Ok(())
}

/// Read the entry of chunk `id` at `offset` (`entry_len` bytes) from `file`
/// and return its plain bytes, every check done.
pub fn read_entry(
    file: &File,
    offset: u64,
    entry_len: u64,
    id: &ChunkId,
) -> Result<Result<Vec<u8>, EntryError>, std::io::Error> {
    let bytes = read_up_to(file, offset, entry_len)?;
    Ok(check_entry_of(&bytes, id).and_then(|(header, stored)| decode_stored(&header, stored)))
}

/// The stored bytes of the entry at `offset`, checked against its checksum
/// and id but not decompressed (for GC, which moves entries as they are).
pub fn read_stored(
    file: &File,
    offset: u64,
    entry_len: u64,
    id: &ChunkId,
) -> Result<Result<(EntryHeader, Vec<u8>), EntryError>, std::io::Error> {
    let bytes = read_up_to(file, offset, entry_len)?;
    Ok(check_entry_of(&bytes, id).map(|(header, stored)| (header, stored.to_vec())))
}

/// Up to `len` bytes at `offset`: fewer at the end of the file, so a torn
/// entry is reported by its checksum rather than as an I/O error.
fn read_up_to(file: &File, offset: u64, len: u64) -> Result<Vec<u8>, std::io::Error> {
    let mut bytes = vec![0u8; len as usize];
    let mut have = 0usize;
    while have < bytes.len() {
        match file.read_at(&mut bytes[have..], offset + have as u64) {
            Ok(0) => break,
            Ok(n) => have += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    bytes.truncate(have);
    Ok(bytes)
}

/// The entry in `bytes`, checked, and only if it is chunk `id`'s.
fn check_entry_of<'a>(
    bytes: &'a [u8],
    id: &ChunkId,
) -> Result<(EntryHeader, &'a [u8]), EntryError> {
    let (header, stored) = check_entry(bytes)?;
    if header.id != *id {
        return Err(EntryError::WrongId { found: header.id });
    }
    Ok((header, stored))
}

/// The file name of pack `id` inside the packs directory.
pub fn pack_file_name(id: u32) -> String {
    format!("{id:08x}.pack")
}

/// The pack id of a file name written by [`pack_file_name`], if it is one.
pub fn parse_pack_file_name(name: &str) -> Option<u32> {
    let hex = name.strip_suffix(".pack")?;
    if hex.len() != 8 {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

/// Fsync a directory so a file created or removed in it stays so after a crash.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Write `head` then `body` with as few system calls as the file takes
/// (`std`'s `write_all_vectored` is not stable yet).
fn write_all_vectored(file: &File, head: &[u8], body: &[u8]) -> std::io::Result<()> {
    let mut slices = [IoSlice::new(head), IoSlice::new(body)];
    let mut remaining: &mut [IoSlice<'_>] = &mut slices;
    while !remaining.is_empty() {
        match (&*file).write_vectored(remaining) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "failed to write a whole entry",
                ));
            }
            Ok(written) => IoSlice::advance_slices(&mut remaining, written),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// The pack being filled: appends entries, syncs, seals.
#[derive(Debug)]
pub struct PackWriter {
    id: u32,
    path: PathBuf,
    file: Arc<File>,
    len: u64,
    entries: u64,
}

impl PackWriter {
    /// Create pack `id` in `dir` (which must not hold it yet) and write its header.
    pub fn create(dir: &Path, id: u32) -> std::io::Result<Self> {
        let path = dir.join(pack_file_name(id));
        let mut file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)?;
        let mut header = Vec::with_capacity(PACK_HEADER_LEN as usize);
        header.extend_from_slice(&PACK_MAGIC);
        header.extend_from_slice(&PACK_VERSION.to_le_bytes());
        file.write_all(&header)?;
        // The pack's name must survive a crash before anything points into it.
        sync_dir(dir)?;
        Ok(Self {
            id,
            path,
            file: Arc::new(file),
            len: PACK_HEADER_LEN,
            entries: 0,
        })
    }

    /// The pack's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The pack's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no entry has been appended.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// A handle that can sync the file after the writer lock is released.
    pub fn file(&self) -> Arc<File> {
        Arc::clone(&self.file)
    }

    /// Append `entry`; returns the offset it starts at.
    pub fn append(&mut self, entry: &EncodedEntry<'_>) -> std::io::Result<u64> {
        let offset = self.len;
        write_all_vectored(&self.file, &entry.head, &entry.stored)?;
        self.len += entry.len() as u64;
        self.entries += 1;
        Ok(offset)
    }

    /// Make everything appended durable (tests: a store fsyncs its packs
    /// through `Store::sync_pack`, which stops writes when one fails).
    #[cfg(test)]
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Write the seal and make the whole pack durable (tests, as `sync`).
    /// Nothing is appended after.
    #[cfg(test)]
    pub fn seal(self) -> std::io::Result<()> {
        self.write_seal()?.sync_all()
    }

    /// Write the seal but leave the fsync to the caller, who can run it
    /// without holding what serialises appends. Nothing is appended after.
    pub fn write_seal(self) -> std::io::Result<Arc<File>> {
        let mut seal = Vec::with_capacity(SEAL_LEN as usize);
        seal.extend_from_slice(&SEAL_MAGIC);
        seal.extend_from_slice(&self.entries.to_le_bytes());
        (&*self.file).write_all(&seal)?;
        Ok(self.file)
    }
}

/// Seal an existing pack that holds `entries` valid entries and ends right
/// after the last of them (the repair of a pack left open by a crash).
pub fn seal_existing(path: &Path, entries: u64) -> std::io::Result<()> {
    let mut file = OpenOptions::new().append(true).open(path)?;
    let mut seal = Vec::with_capacity(SEAL_LEN as usize);
    seal.extend_from_slice(&SEAL_MAGIC);
    seal.extend_from_slice(&entries.to_le_bytes());
    file.write_all(&seal)?;
    file.sync_all()
}

/// Whether the file at `path` ends in a seal (checked from its last bytes only).
pub fn looks_sealed(path: &Path) -> std::io::Result<bool> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len < PACK_HEADER_LEN + SEAL_LEN {
        return Ok(false);
    }
    let mut tail = [0u8; SEAL_LEN as usize];
    file.read_exact_at(&mut tail, len - SEAL_LEN)?;
    Ok(tail[..8] == SEAL_MAGIC)
}

/// How a scan of a pack ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// A valid seal after `entries` entries.
    Sealed {
        /// Entries the seal counts.
        entries: u64,
    },
    /// The file ends right after the last valid entry, without a seal (an open pack).
    Open,
    /// Bytes at `offset` are not a valid entry (a torn tail, or damage).
    Torn {
        /// Where the valid part ends.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
}

/// The result of [`scan_pack`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackScan {
    /// Valid entries seen.
    pub entries: u64,
    /// Offset after the last valid entry.
    pub valid_len: u64,
    /// The file's length.
    pub file_len: u64,
    /// How the scan ended.
    pub end: ScanEnd,
}

/// Why a pack could not be scanned at all.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The file could not be read.
    #[error("cannot read pack {path}: {source}")]
    Io {
        /// The pack.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file does not start with a pack header.
    #[error("{path} is not a fabric pack (bad header)")]
    NotAPack {
        /// The file.
        path: PathBuf,
    },
}

/// Read pack `path` entry by entry, passing each valid entry's offset, header
/// and stored bytes to `visit`; stop cleanly at the seal, the end of the file,
/// or the first bytes that are not a valid entry (a torn tail).
pub fn scan_pack(
    path: &Path,
    mut visit: impl FnMut(u64, &EntryHeader, &[u8]),
) -> Result<PackScan, ScanError> {
    let io_err = |source| ScanError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let file_len = file.metadata().map_err(io_err)?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut header = [0u8; PACK_HEADER_LEN as usize];
    if read_full(&mut reader, &mut header).map_err(io_err)? < header.len()
        || header[..8] != PACK_MAGIC
        || header[8..12] != PACK_VERSION.to_le_bytes()
    {
        return Err(ScanError::NotAPack {
            path: path.to_owned(),
        });
    }
    let mut offset = PACK_HEADER_LEN;
    let mut entries = 0u64;
    let mut buffer = Vec::new();
    let torn = |offset: u64, entries: u64, reason: String| PackScan {
        entries,
        valid_len: offset,
        file_len,
        end: ScanEnd::Torn { offset, reason },
    };
    loop {
        let remaining = file_len - offset;
        if remaining == 0 {
            return Ok(PackScan {
                entries,
                valid_len: offset,
                file_len,
                end: ScanEnd::Open,
            });
        }
        let mut head = [0u8; ENTRY_HEADER_LEN];
        let got = read_full(&mut reader, &mut head).map_err(io_err)?;
        if got >= SEAL_LEN as usize && head[..8] == SEAL_MAGIC {
            let mut count = [0u8; 8];
            count.copy_from_slice(&head[8..16]);
            let sealed = u64::from_le_bytes(count);
            if remaining == SEAL_LEN && sealed == entries {
                return Ok(PackScan {
                    entries,
                    valid_len: offset,
                    file_len,
                    end: ScanEnd::Sealed { entries },
                });
            }
            return Ok(torn(offset, entries, "misplaced or wrong seal".into()));
        }
        let parsed = match parse_header(&head[..got]) {
            Ok(parsed) => parsed,
            Err(err) => return Ok(torn(offset, entries, err.to_string())),
        };
        if parsed.entry_len() > remaining {
            let err = EntryError::Short {
                have: remaining,
                need: parsed.entry_len(),
            };
            return Ok(torn(offset, entries, err.to_string()));
        }
        buffer.clear();
        buffer.extend_from_slice(&head);
        buffer.resize(parsed.entry_len() as usize, 0);
        read_full(&mut reader, &mut buffer[ENTRY_HEADER_LEN..]).map_err(io_err)?;
        match check_entry(&buffer) {
            Ok((header, stored)) => visit(offset, &header, stored),
            Err(err) => return Ok(torn(offset, entries, err.to_string())),
        }
        offset += parsed.entry_len();
        entries += 1;
    }
}

/// Read into `buf` until it is full or the reader ends; the bytes read.
pub(crate) fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut have = 0;
    while have < buf.len() {
        match reader.read(&mut buf[have..]) {
            Ok(0) => break,
            Ok(n) => have += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(have)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text(len: usize) -> Vec<u8> {
        b"the quick brown fox jumps over the lazy dog. "
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    }

    fn write_pack(
        dir: &Path,
        chunks: &[Vec<u8>],
        seal: bool,
    ) -> (PathBuf, Vec<(u64, EntryHeader)>) {
        let mut writer = PackWriter::create(dir, 7).unwrap();
        let mut placed = Vec::new();
        for data in chunks {
            let entry = encode_entry(ChunkId::of(data), data, 3);
            let offset = writer.append(&entry).unwrap();
            placed.push((offset, entry.header));
        }
        let path = writer.path().to_owned();
        if seal {
            writer.seal().unwrap();
        } else {
            writer.sync().unwrap();
        }
        (path, placed)
    }

    #[test]
    fn compressible_data_is_zstd_and_random_is_raw() {
        let text = text(10_000);
        let entry = encode_entry(ChunkId::of(&text), &text, 3);
        assert_eq!(entry.header.codec, Codec::Zstd);
        assert!(entry.header.stored_len < 1000);
        let random: Vec<u8> = (0..10_000u32)
            .map(|i| blake3::hash(&i.to_le_bytes()).as_bytes()[0])
            .collect();
        let entry = encode_entry(ChunkId::of(&random), &random, 3);
        assert_eq!(entry.header.codec, Codec::Raw);
        assert_eq!(entry.header.stored_len, 10_000);
        let bytes = entry.to_bytes();
        let (header, stored) = check_entry(&bytes).unwrap();
        assert_eq!(decode_stored(&header, stored).unwrap(), random);
    }

    #[test]
    fn scan_sees_every_entry_and_the_seal() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<Vec<u8>> = (0..5).map(|i| text(1000 + i * 100)).collect();
        let (path, placed) = write_pack(dir.path(), &chunks, true);
        let mut seen = Vec::new();
        let scan = scan_pack(&path, |offset, header, _| seen.push((offset, *header))).unwrap();
        assert_eq!(scan.end, ScanEnd::Sealed { entries: 5 });
        assert_eq!(seen, placed);
        let file = File::open(&path).unwrap();
        for ((offset, header), data) in placed.iter().zip(&chunks) {
            let got = read_entry(&file, *offset, header.entry_len(), &header.id)
                .unwrap()
                .unwrap();
            assert_eq!(&got, data);
        }
    }

    #[test]
    fn a_torn_tail_stops_the_scan_at_the_last_whole_entry() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<Vec<u8>> = (0..4).map(|i| text(3000 + i)).collect();
        let (path, placed) = write_pack(dir.path(), &chunks, false);
        let full = std::fs::metadata(&path).unwrap().len();
        let cut = placed[3].0 + 10;
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let scan = scan_pack(&path, |_, _, _| {}).unwrap();
        assert_eq!(scan.entries, 3);
        assert_eq!(scan.valid_len, placed[3].0);
        assert!(matches!(scan.end, ScanEnd::Torn { offset, .. } if offset == placed[3].0));
        assert!(full > cut);
    }

    #[test]
    fn a_flipped_bit_is_caught_by_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<Vec<u8>> = (0..3).map(|i| text(3000 + i)).collect();
        let (path, placed) = write_pack(dir.path(), &chunks, true);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = placed[1].0 as usize + ENTRY_HEADER_LEN + 5;
        bytes[at] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        let (offset, header) = placed[1];
        let err = read_entry(&file, offset, header.entry_len(), &header.id)
            .unwrap()
            .unwrap_err();
        assert_eq!(err, EntryError::Checksum);
        let scan = scan_pack(&path, |_, _, _| {}).unwrap();
        assert_eq!(scan.entries, 1);
    }

    #[test]
    fn a_stored_chunk_that_does_not_decode_to_its_id_is_refused() {
        let text = text(20_000);
        let encoded = StoredChunk::encode(Chunk::new(text.clone()), 3);
        assert_eq!(encoded.codec, Codec::Zstd);
        assert_eq!(encoded.clone().into_plain().unwrap(), text);

        let mut flipped = encoded.clone();
        flipped.flip_stored_byte(flipped.stored.len() - 1, 0x40);
        assert!(flipped.check().is_err());

        let mut longer = encoded.clone();
        longer.raw_len += 1;
        assert!(matches!(longer.check(), Err(EntryError::Decompress(_))));

        let mut other = encoded.clone();
        other.id = ChunkId::of(b"something else");
        assert_eq!(other.check(), Err(EntryError::HashMismatch));

        let mut bomb = encoded;
        bomb.raw_len = MAX_DECODED_LEN + 1;
        assert!(matches!(bomb.check(), Err(EntryError::Decompress(_))));
        assert!(matches!(bomb.into_plain(), Err(EntryError::Decompress(_))));

        let random: Vec<u8> = (0..5000u32)
            .map(|i| blake3::hash(&i.to_le_bytes()).as_bytes()[0])
            .collect();
        let mut raw = StoredChunk::encode(Chunk::new(random), 3);
        assert_eq!(raw.codec, Codec::Raw);
        raw.flip_stored_byte(0, 1);
        assert_eq!(raw.check(), Err(EntryError::HashMismatch));
        raw.stored.truncate(raw.stored.len() - 1);
        assert!(matches!(raw.into_plain(), Err(EntryError::Decompress(_))));
    }

    /// Whether the full decoder takes `chunk` (the reference the piece by
    /// piece check must agree with).
    fn decodes_in_full(chunk: &StoredChunk) -> bool {
        ChunkDecoder::new().plain(chunk).is_ok()
    }

    #[test]
    fn a_check_decodes_piece_by_piece_and_agrees_with_a_full_decode() {
        // Many pieces of output, a window smaller than the chunk.
        let big = text(3 * 1024 * 1024 + 12_345);
        let chunk = StoredChunk::encode(Chunk::new(big.clone()), 3);
        assert_eq!(chunk.codec, Codec::Zstd);
        assert_eq!(chunk.check(), Ok(()));
        let mut decoder = ChunkDecoder::new();
        assert_eq!(decoder.plain(&chunk).unwrap(), &big[..]);

        // Cut short, at a piece boundary of the input or inside a block.
        for keep in [0, 1, chunk.stored.len() / 2, chunk.stored.len() - 1] {
            let mut cut = chunk.clone();
            cut.stored.truncate(keep);
            assert!(
                matches!(cut.check(), Err(EntryError::Decompress(_))),
                "cut to {keep} bytes"
            );
            assert!(!decodes_in_full(&cut));
        }

        // Two frames one after the other decode as their bytes joined.
        let (first, second) = big.split_at(1_000_000);
        let mut joined = zstd::bulk::compress(first, 3).unwrap();
        joined.extend(zstd::bulk::compress(second, 3).unwrap());
        let two_frames = StoredChunk {
            id: chunk.id,
            codec: Codec::Zstd,
            raw_len: chunk.raw_len,
            stored: joined.clone().into(),
        };
        assert_eq!(two_frames.check(), Ok(()));
        assert!(decodes_in_full(&two_frames));

        // Bytes after the last frame are refused by both.
        joined.extend_from_slice(b"trailing");
        let trailing = StoredChunk {
            stored: joined.into(),
            ..two_frames.clone()
        };
        assert!(trailing.check().is_err());
        assert!(!decodes_in_full(&trailing));

        // More plain bytes than announced stop the check early.
        let mut shorter = chunk.clone();
        shorter.raw_len -= 1;
        assert!(matches!(shorter.check(), Err(EntryError::Decompress(_))));

        // The same bytes check the same way as an entry of a pack.
        let header = EntryHeader {
            id: chunk.id,
            codec: chunk.codec,
            raw_len: chunk.raw_len,
            stored_len: chunk.stored.len() as u32,
            checksum: [0; 16],
        };
        assert_eq!(check_stored(&header, &chunk.stored), Ok(()));
    }

    #[test]
    fn a_check_refuses_a_frame_whose_window_is_larger_than_any_chunk() {
        use zstd::stream::raw::{Encoder, InBuffer, Operation, OutBuffer};
        use zstd::zstd_safe::CParameter;
        // A frame that does not declare its size and asks for a 128 MiB
        // window: a check would have to allocate it.
        let data = text(100_000);
        let mut encoder = Encoder::new(3).unwrap();
        encoder
            .set_parameter(CParameter::WindowLog(CHECK_WINDOW_LOG_MAX + 1))
            .unwrap();
        encoder
            .set_parameter(CParameter::ContentSizeFlag(false))
            .unwrap();
        let mut frame = vec![0; data.len() + 1024];
        let mut output = OutBuffer::around(&mut frame[..]);
        encoder
            .run(&mut InBuffer::around(&data), &mut output)
            .unwrap();
        assert_eq!(encoder.finish(&mut output, true).unwrap(), 0);
        let written = output.pos();
        frame.truncate(written);
        let chunk = StoredChunk {
            id: ChunkId::of(&data),
            codec: Codec::Zstd,
            raw_len: data.len() as u32,
            stored: frame.into(),
        };
        // A full decode needs no window: it takes the frame.
        assert!(decodes_in_full(&chunk));
        assert!(matches!(chunk.check(), Err(EntryError::Decompress(_))));
    }

    #[test]
    fn a_decoder_reuses_its_buffer_and_hands_raw_chunks_back_as_they_are() {
        let mut decoder = ChunkDecoder::new();
        let large = StoredChunk::encode(Chunk::new(text(200_000)), 3);
        let small = StoredChunk::encode(Chunk::new(text(1_000)), 3);
        assert_eq!(decoder.plain(&large).unwrap().len(), 200_000);
        let capacity = decoder.buffer.capacity();
        assert_eq!(decoder.plain(&small).unwrap().len(), 1_000);
        assert_eq!(decoder.buffer.capacity(), capacity);

        let random: Vec<u8> = (0..5000u32)
            .map(|i| blake3::hash(&i.to_le_bytes()).as_bytes()[0])
            .collect();
        let raw = StoredChunk::encode(Chunk::new(random.clone()), 3);
        assert_eq!(raw.codec, Codec::Raw);
        let plain = decoder.plain(&raw).unwrap();
        assert_eq!(plain, &random[..]);
        assert_eq!(plain.as_ptr(), raw.stored.as_ptr());

        let mut other = small.clone();
        other.id = ChunkId::of(b"something else");
        assert_eq!(decoder.plain(&other), Err(EntryError::HashMismatch));
    }

    #[test]
    fn pack_names_round_trip() {
        assert_eq!(parse_pack_file_name(&pack_file_name(0xabc)), Some(0xabc));
        assert_eq!(parse_pack_file_name("config.toml"), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Any bytes survive encode, check and decode.
        #[test]
        fn entries_round_trip(data in proptest::collection::vec(any::<u8>(), 0..5000), repeat in 1usize..4) {
            let data: Vec<u8> = data.iter().copied().cycle().take(data.len() * repeat).collect();
            let entry = encode_entry(ChunkId::of(&data), &data, 1);
            let bytes = entry.to_bytes();
            let (header, stored) = check_entry(&bytes).unwrap();
            prop_assert_eq!(decode_stored(&header, stored).unwrap(), data);
        }

        /// Whatever is done to a stored chunk's bytes, the piece by piece
        /// check takes it exactly when a full decode does.
        #[test]
        fn a_check_agrees_with_a_full_decode_on_damaged_bytes(
            data in proptest::collection::vec(any::<u8>(), 0..3000),
            repeat in 1usize..200,
            damage in 0usize..4,
            at in any::<proptest::sample::Index>(),
            mask in 1u8..=255,
        ) {
            let data: Vec<u8> = data.iter().copied().cycle().take(data.len() * repeat).collect();
            let mut chunk = StoredChunk::encode(Chunk::new(data), 3);
            let mut stored = chunk.stored.to_vec();
            match damage {
                0 => {}
                1 if !stored.is_empty() => {
                    let index = at.index(stored.len());
                    stored[index] ^= mask;
                }
                2 => stored.truncate(at.index(stored.len() + 1)),
                _ => stored.push(mask),
            }
            chunk.stored = stored.into();
            prop_assert_eq!(chunk.check().is_ok(), decodes_in_full(&chunk));
        }

        /// Any bytes survive the stored form chunks travel in, and its entry.
        #[test]
        fn stored_chunks_round_trip(data in proptest::collection::vec(any::<u8>(), 0..5000), repeat in 1usize..4) {
            let data: Vec<u8> = data.iter().copied().cycle().take(data.len() * repeat).collect();
            let chunk = StoredChunk::encode(Chunk::new(data.clone()), 1);
            prop_assert!(chunk.check().is_ok());
            let entry = encode_stored(chunk.id, chunk.codec, chunk.raw_len, &chunk.stored[..]);
            let bytes = entry.to_bytes();
            let (header, stored) = check_entry(&bytes).unwrap();
            prop_assert_eq!(decode_stored(&header, stored).unwrap(), data.clone());
            prop_assert_eq!(chunk.into_plain().unwrap(), data);
        }
    }
}
