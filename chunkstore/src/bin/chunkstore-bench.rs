//! `chunkstore-bench`: throughput and memory of the storage engine.
//!
//! Usage: `chunkstore-bench [PART...]` with parts `raw`, `ingest`, `params`,
//! `index`, `gc`, `catalogue`, `sparse`, `walk` (default: all, each measured in this process; run one part
//! per invocation for a clean peak RSS). Sizes come from the environment:
//!
//! - `BENCH_MIB` (1024): bytes ingested per data kind, MiB;
//! - `BENCH_RAW_MIB` (256): bytes for the raw FastCDC/BLAKE3/zstd figures;
//! - `BENCH_INDEX_ENTRIES` (1000000): entries for the index and GC runs;
//! - `BENCH_INDEX_ENGINES` (`table,sled`): the chunk indexes the index part
//!   measures, in turn: `table` (the store's, `index_table`) and `sled` (the
//!   one it replaced). Its per-chunk figures are growths of this process's
//!   resident and peak memory, so run `index` alone, with one engine, for
//!   clean ones (an engine measured second reuses memory the first freed);
//! - `BENCH_INDEX_CACHE_MIB` (the store's default, 64): the sled page cache
//!   of the sled engine;
//! - `BENCH_SNAPSHOTS` (10000): snapshot records for the catalogue part;
//! - `BENCH_SPARSE_GIB` (8): size of the sparse file of the sparse part (it
//!   also writes a file of 1 GiB, most of it zeros);
//! - `BENCH_WALK_GIB` (4): size of the one file of random bytes the walk
//!   part backs up into a sink that discards chunks;
//! - `BENCH_WALK_AHEAD_MIB` (`0,4,8,16,32`): the walk part's
//!   `hash_ahead_bytes` values, MiB (0: hash-ahead off);
//! - `BENCH_WALK_REPEAT` (3): runs of each value, taken in turn (the
//!   median is reported);
//! - `BENCH_DIR` (a temporary directory): where stores are created;
//! - `BENCH_THREADS` (all cores): ingest streams.
//!
//! Data is generated, never shipped: random bytes from a seeded PRNG, and
//! "text-like" bytes made of 4 KiB pieces picked at random from a pool of
//! Rust sources found under `$CARGO_HOME/registry/src` (synthetic words if
//! there are none), so it compresses like source code but does not dedup.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use fabric_chunkstore::index::{ChunkIndex, Location};
use fabric_chunkstore::index_sled::{SledCatalog, SledChunkIndex, open_db};
use fabric_chunkstore::index_table::{LOG_FILE, TableChunkIndex};
use fabric_chunkstore::pack::Codec;
use fabric_chunkstore::{
    Catalog, Chunk, ChunkId, ChunkParams, Chunker, GcOptions, SnapshotSource, Store, StoreConfig,
    newest_among,
};
use fabric_proto::v1::{EntryKind, Snapshot, SnapshotState, Tree, TreeEntry};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const MIB: usize = 1 << 20;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with(field))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_mib() -> f64 {
    status_kib("VmRSS:") as f64 / 1024.0
}

fn peak_rss_mib() -> f64 {
    status_kib("VmHWM:") as f64 / 1024.0
}

/// CPU seconds (user + system) this process has used: /proc/self/stat
/// fields 14 and 15, in USER_HZ ticks (100 per second on Linux).
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|text| {
            let after = text.rsplit_once(')')?.1;
            let fields: Vec<&str> = after.split_whitespace().collect();
            let user: f64 = fields.get(11)?.parse().ok()?;
            let system: f64 = fields.get(12)?.parse().ok()?;
            Some((user + system) / 100.0)
        })
        .unwrap_or(0.0)
}

fn mbps(bytes: usize, seconds: f64) -> f64 {
    bytes as f64 / seconds / 1e6
}

fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(meta) if meta.is_dir() => total += dir_size(&entry.path()),
                Ok(meta) => total += meta.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// A pool of text for text-like data.
fn text_pool(limit: usize) -> Vec<u8> {
    let mut pool = Vec::with_capacity(limit);
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Ok(cargo) = home {
        let mut stack = vec![cargo.join("registry").join("src")];
        while let Some(dir) = stack.pop() {
            if pool.len() >= limit {
                break;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs")
                    && let Ok(bytes) = std::fs::read(&path)
                {
                    pool.extend_from_slice(&bytes);
                }
                if pool.len() >= limit {
                    break;
                }
            }
        }
    }
    if pool.len() < limit / 4 {
        const WORDS: &[&str] = &[
            "fn", "let", "mut", "self", "struct", "impl", "match", "return", "Result", "Vec",
            "String", "store", "chunk", "pack", "index", "error", "path", "snapshot", "tree",
            "the", "a", "of", "and", "to", "in", "is", "for", "that", "with", "as",
        ];
        let mut rng = SmallRng::seed_from_u64(7);
        while pool.len() < limit {
            pool.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
            pool.push(if rng.random_range(0..8) == 0 {
                b'\n'
            } else {
                b' '
            });
        }
    }
    pool.truncate(limit);
    pool
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Random,
    Text,
}

/// Deterministic stream `stream` of `kind`: fills `buffer` with its next bytes.
struct Generator {
    kind: Kind,
    rng: SmallRng,
    pool: Arc<Vec<u8>>,
}

impl Generator {
    fn new(kind: Kind, stream: u64, pool: Arc<Vec<u8>>) -> Self {
        Self {
            kind,
            rng: SmallRng::seed_from_u64(stream * 7919 + 1),
            pool,
        }
    }

    fn fill(&mut self, buffer: &mut [u8]) {
        match self.kind {
            Kind::Random => self.rng.fill_bytes(buffer),
            Kind::Text => {
                const PIECE: usize = 4096;
                for part in buffer.chunks_mut(PIECE) {
                    let start = self.rng.random_range(0..self.pool.len() - PIECE);
                    part.copy_from_slice(&self.pool[start..start + part.len()]);
                }
            }
        }
    }
}

struct RawFigures {
    cdc: f64,
    blake3: f64,
    zstd: f64,
}

fn raw(kind: Kind, bytes: usize, pool: &Arc<Vec<u8>>) -> RawFigures {
    let mut data = vec![0u8; bytes];
    Generator::new(kind, 99, Arc::clone(pool)).fill(&mut data);
    let params = ChunkParams::default();
    let started = Instant::now();
    let mut cut = 0usize;
    for chunk in
        fastcdc::v2020::FastCDC::new(&data, params.min_size, params.avg_size, params.max_size)
    {
        cut += chunk.length;
    }
    let cdc = mbps(cut, started.elapsed().as_secs_f64());
    let started = Instant::now();
    let mut hasher = blake3::Hasher::new();
    hasher.update(&data);
    std::hint::black_box(hasher.finalize());
    let blake3 = mbps(bytes, started.elapsed().as_secs_f64());
    let started = Instant::now();
    let mut stored = 0usize;
    for piece in data.chunks(MIB) {
        stored += zstd::bulk::compress(piece, 3).map_or(piece.len(), |c| c.len());
    }
    let zstd = mbps(bytes, started.elapsed().as_secs_f64());
    println!(
        "raw {kind:?}: {} MiB, FastCDC {cdc:.0} MB/s, BLAKE3 {blake3:.0} MB/s, zstd-3 {zstd:.0} MB/s (ratio {:.2}), one core each",
        bytes / MIB,
        bytes as f64 / stored as f64
    );
    RawFigures { cdc, blake3, zstd }
}

fn bound(figures: &RawFigures, cores: usize) -> f64 {
    cores as f64 / (1.0 / figures.cdc + 1.0 / figures.blake3 + 1.0 / figures.zstd)
}

/// Ingest `bytes` of `kind` in `threads` streams; returns (MB/s, ids in order, stats).
fn ingest(
    store: &Store,
    kind: Kind,
    bytes: usize,
    threads: usize,
    pool: &Arc<Vec<u8>>,
) -> BenchResult<(f64, Vec<Vec<ChunkId>>, fabric_chunkstore::PutStats)> {
    let per_stream = bytes / threads;
    let started = Instant::now();
    let results: Vec<BenchResult<(Vec<ChunkId>, fabric_chunkstore::PutStats)>> =
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|stream| {
                    let pool = Arc::clone(pool);
                    scope.spawn(
                        move || -> BenchResult<(Vec<ChunkId>, fabric_chunkstore::PutStats)> {
                            let mut generator = Generator::new(kind, stream as u64, pool);
                            let mut chunker = Chunker::new(store.config().chunk_params)?;
                            let mut buffer = vec![0u8; MIB];
                            let mut ids = Vec::new();
                            let mut batch: Vec<Chunk> = Vec::new();
                            let mut batch_bytes = 0usize;
                            let mut done = 0usize;
                            // put_chunks runs on its own thread per stream, one
                            // batch in flight: chunking the next batch overlaps
                            // the fsyncs of the last, as concurrent uploads do.
                            let (sender, receiver) = crossbeam_channel::bounded::<Vec<Chunk>>(1);
                            let stats = std::thread::scope(
                                |inner| -> BenchResult<fabric_chunkstore::PutStats> {
                                    let putter = inner.spawn(
                                        move || -> BenchResult<fabric_chunkstore::PutStats> {
                                            let mut stats = fabric_chunkstore::PutStats::default();
                                            for batch in receiver {
                                                stats.add(&store.put_chunks(batch)?);
                                            }
                                            Ok(stats)
                                        },
                                    );
                                    let send = |batch: &mut Vec<Chunk>| -> BenchResult<()> {
                                        if !batch.is_empty() {
                                            sender.send(std::mem::take(batch))?;
                                        }
                                        Ok(())
                                    };
                                    while done < per_stream {
                                        let take = MIB.min(per_stream - done);
                                        generator.fill(&mut buffer[..take]);
                                        done += take;
                                        let mut ready = Vec::new();
                                        chunker.feed(&buffer[..take], |chunk| ready.push(chunk));
                                        for chunk in ready {
                                            ids.push(chunk.id);
                                            batch_bytes += chunk.data.len();
                                            batch.push(chunk);
                                        }
                                        if batch_bytes >= 16 * MIB {
                                            send(&mut batch)?;
                                            batch_bytes = 0;
                                        }
                                    }
                                    let mut ready = Vec::new();
                                    chunker.finish(|chunk| ready.push(chunk));
                                    for chunk in ready {
                                        ids.push(chunk.id);
                                        batch.push(chunk);
                                    }
                                    send(&mut batch)?;
                                    drop(sender);
                                    putter
                                        .join()
                                        .unwrap_or_else(|_| Err("put thread panicked".into()))
                                },
                            )?;
                            Ok((ids, stats))
                        },
                    )
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("ingest thread panicked".into()))
                })
                .collect()
        });
    let seconds = started.elapsed().as_secs_f64();
    let mut all_ids = Vec::new();
    let mut total = fabric_chunkstore::PutStats::default();
    for result in results {
        let (ids, stats) = result?;
        all_ids.push(ids);
        total.add(&stats);
    }
    Ok((mbps(per_stream * threads, seconds), all_ids, total))
}

fn restore(store: &Store, streams: &[Vec<ChunkId>]) -> BenchResult<f64> {
    let started = Instant::now();
    let totals: Vec<BenchResult<usize>> = std::thread::scope(|scope| {
        let handles: Vec<_> = streams
            .iter()
            .map(|ids| {
                scope.spawn(move || -> BenchResult<usize> {
                    let mut total = 0;
                    for id in ids {
                        total += store.get_chunk(id)?.len();
                    }
                    Ok(total)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("restore thread panicked".into()))
            })
            .collect()
    });
    let mut bytes = 0;
    for total in totals {
        bytes += total?;
    }
    Ok(mbps(bytes, started.elapsed().as_secs_f64()))
}

fn part_raw_and_ingest(base: &Path, with_ingest: bool) -> BenchResult<()> {
    let cores = std::thread::available_parallelism()?.get();
    let streams = env_usize("BENCH_THREADS", cores);
    let raw_bytes = env_usize("BENCH_RAW_MIB", 256) * MIB;
    let bytes = env_usize("BENCH_MIB", 1024) * MIB;
    let pool = Arc::new(text_pool(64 * MIB));
    println!(
        "text pool: {} MiB; cores: {cores}; ingest streams: {streams}",
        pool.len() / MIB
    );
    let mut generated = vec![0u8; 64 * MIB];
    for kind in [Kind::Random, Kind::Text] {
        let started = Instant::now();
        Generator::new(kind, 5, Arc::clone(&pool)).fill(&mut generated);
        println!(
            "generator {kind:?}: {:.0} MB/s (included in ingest times)",
            mbps(generated.len(), started.elapsed().as_secs_f64())
        );
    }
    drop(generated);
    for kind in [Kind::Random, Kind::Text] {
        let figures = raw(kind, raw_bytes, &pool);
        let cpu_bound = bound(&figures, cores);
        let with_rehash =
            cores as f64 / (1.0 / figures.cdc + 2.0 / figures.blake3 + 1.0 / figures.zstd);
        println!(
            "bound {kind:?}: cores/(1/cdc+1/blake3+1/zstd) = {cpu_bound:.0} MB/s; with the store's re-hash (2x BLAKE3): {with_rehash:.0} MB/s"
        );
        if !with_ingest {
            continue;
        }
        let dir = base.join(format!("ingest-{kind:?}"));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open_or_create(&dir, StoreConfig::default())?;
        let rss_before = rss_mib();
        let cpu_before = cpu_seconds();
        let wall = Instant::now();
        let (speed, ids, stats) = ingest(&store, kind, bytes, streams, &pool)?;
        let cpu = cpu_seconds() - cpu_before;
        let per_core_bound = cpu_bound / cores as f64;
        println!(
            "ingest {kind:?}: CPU obtained {:.2} cores on average (other load on the machine); {:.0} MB per CPU-second = {:.0}% of the one-core bound {per_core_bound:.0} MB/s",
            cpu / wall.elapsed().as_secs_f64(),
            bytes as f64 / 1e6 / cpu,
            100.0 * bytes as f64 / 1e6 / cpu / per_core_bound
        );
        println!(
            "ingest {kind:?}: {} MiB in {streams} streams: {speed:.0} MB/s = {:.0}% of the bound; {} chunks, stored {} MiB (compression {:.2}); RSS {rss_before:.0} -> {:.0} MiB, peak {:.0} MiB",
            bytes / MIB,
            100.0 * speed / cpu_bound,
            stats.new_chunks,
            stats.stored_bytes as usize / MIB,
            stats.new_bytes as f64 / stats.stored_bytes.max(1) as f64,
            rss_mib(),
            peak_rss_mib()
        );
        let (again, _, stats) = ingest(&store, kind, bytes, streams, &pool)?;
        println!(
            "re-ingest {kind:?} (all duplicates): {again:.0} MB/s = {:.0}% of the bound without zstd, {} new chunks",
            100.0 * again / (cores as f64 / (1.0 / figures.cdc + 2.0 / figures.blake3)),
            stats.new_chunks
        );
        let restored = restore(&store, &ids)?;
        println!("restore {kind:?} (get_chunk, {streams} threads): {restored:.0} MB/s");
        println!("peak RSS so far: {:.0} MiB", peak_rss_mib());
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// Dedup ratio and chunking throughput for chunk size settings around 1 MiB,
/// on two versions of a data set (the second with edits scattered through it).
fn part_params() -> BenchResult<()> {
    let bytes = env_usize("BENCH_PARAMS_MIB", 256) * MIB;
    let pool = Arc::new(text_pool(64 * MIB));
    let mut version1 = vec![0u8; bytes];
    Generator::new(Kind::Random, 1, Arc::clone(&pool)).fill(&mut version1[..bytes / 2]);
    Generator::new(Kind::Text, 2, Arc::clone(&pool)).fill(&mut version1[bytes / 2..]);
    // Version 2: BENCH_EDITS edits (insert, delete or overwrite up to 4 KiB).
    let edits = env_usize("BENCH_EDITS", 20);
    let mut rng = SmallRng::seed_from_u64(3);
    let mut version2 = version1.clone();
    for _ in 0..edits {
        let at = rng.random_range(0..version2.len() - 8192);
        let len = rng.random_range(1..4096);
        match rng.random_range(0..3) {
            0 => {
                let insert: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                version2.splice(at..at, insert);
            }
            1 => {
                version2.drain(at..at + len);
            }
            _ => rng.fill_bytes(&mut version2[at..at + len]),
        }
    }
    println!(
        "params data: v1 {} MiB (half random, half text-like), v2 = v1 with {edits} edits",
        bytes / MIB
    );
    let settings = [
        ("256K/512K/2M", 256 * 1024, 512 * 1024, 2 * MIB),
        ("256K/1M/4M", 256 * 1024, MIB, 4 * MIB),
        ("512K/1M/4M", 512 * 1024, MIB, 4 * MIB),
        ("1M/2M/8M", MIB, 2 * MIB, 8 * MIB),
    ];
    for (label, min, avg, max) in settings {
        let params = ChunkParams {
            min_size: min as u32,
            avg_size: avg as u32,
            max_size: max as u32,
        };
        let mut unique = HashSet::new();
        let mut unique_bytes = 0usize;
        let mut chunks = 0usize;
        let started = Instant::now();
        for version in [&version1, &version2] {
            let mut chunker = Chunker::new(params)?;
            let mut record = |chunk: Chunk| {
                chunks += 1;
                if unique.insert(chunk.id) {
                    unique_bytes += chunk.data.len();
                }
            };
            for piece in version.chunks(MIB) {
                chunker.feed(piece, &mut record);
            }
            chunker.finish(&mut record);
        }
        let seconds = started.elapsed().as_secs_f64();
        let total = version1.len() + version2.len();
        println!(
            "params {label}: {chunks} chunks (avg {:.0} KiB), dedup ratio v1+v2 {:.3} (ideal 2.0), new bytes for v2 {:.1} MiB, chunk+hash {:.0} MB/s one core",
            total as f64 / chunks as f64 / 1024.0,
            total as f64 / unique_bytes as f64,
            (unique_bytes as f64 - version1.len() as f64).max(0.0) / MIB as f64,
            mbps(total, seconds)
        );
    }
    Ok(())
}

fn part_index(base: &Path) -> BenchResult<()> {
    let entries = env_usize("BENCH_INDEX_ENTRIES", 1_000_000);
    let engines = std::env::var("BENCH_INDEX_ENGINES").unwrap_or_else(|_| "table,sled".into());
    let mut cache_bytes = StoreConfig::default().index_cache_bytes;
    if let Ok(mib) = std::env::var("BENCH_INDEX_CACHE_MIB") {
        cache_bytes = mib.parse::<u64>()? << 20;
    }
    for engine in engines.split(',').map(str::trim) {
        match engine {
            "table" => {
                let dir = base.join("index-table-bench");
                let open = |dir: &Path| -> BenchResult<Box<dyn ChunkIndex>> {
                    std::fs::create_dir_all(dir)?;
                    Ok(Box::new(TableChunkIndex::open(&dir.join(LOG_FILE))?))
                };
                measure_index("table index", "the store's", &dir, entries, &open)?;
            }
            "sled" => {
                let dir = base.join("index-bench");
                let open = |dir: &Path| -> BenchResult<Box<dyn ChunkIndex>> {
                    let db = open_db(dir, cache_bytes)?;
                    Ok(Box::new(SledChunkIndex::new(&db)?))
                };
                let label = format!(
                    "sled's (cache {} MiB, split into sled batches of {})",
                    cache_bytes >> 20,
                    fabric_chunkstore::index_sled::MAX_BATCH
                );
                measure_index("sled index", &label, &dir, entries, &open)?;
            }
            other => {
                return Err(
                    format!("BENCH_INDEX_ENGINES: no engine {other:?} (table, sled)").into(),
                );
            }
        }
    }
    Ok(())
}

/// Insert `entries` into the index `open` gives in `dir` (emptied first),
/// then read each back, look some up, reopen it and scan it: time, and the
/// growth of this process's resident and peak memory per entry.
fn measure_index(
    name: &str,
    detail: &str,
    dir: &Path,
    entries: usize,
    open: &dyn Fn(&Path) -> BenchResult<Box<dyn ChunkIndex>>,
) -> BenchResult<()> {
    let _ = std::fs::remove_dir_all(dir);
    let rss_before = status_kib("VmRSS:");
    let peak_before = status_kib("VmHWM:");
    // Growth of resident and peak memory since the start, bytes per entry.
    let per_entry =
        |kib: u64, before: u64| kib.saturating_sub(before) as f64 * 1024.0 / entries as f64;
    let started = Instant::now();
    {
        let index = open(dir)?;
        let mut batch = Vec::with_capacity(10_000);
        for n in 0..entries {
            let id = ChunkId::of(&(n as u64).to_le_bytes());
            batch.push((
                id,
                Location {
                    pack: (n / 30) as u32,
                    offset: (n % 30) as u64 * 1_000_000,
                    stored_len: 700_000,
                    raw_len: 1_000_000,
                    codec: Codec::Zstd,
                },
            ));
            if batch.len() == 10_000 {
                index.insert_batch(&batch)?;
                batch.clear();
            }
        }
        index.insert_batch(&batch)?;
        index.flush()?;
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{name}: {entries} entries (insert_batch of 10,000; {detail}) in {seconds:.1} s = {:.0} entries/s; payload {:.0} MiB; disk {:.0} MiB; RSS {:.0} MiB, peak {:.0} MiB",
            entries as f64 / seconds,
            (entries * (32 + 21)) as f64 / MIB as f64,
            dir_size(dir) as f64 / MIB as f64,
            rss_mib(),
            peak_rss_mib()
        );
        println!(
            "{name}: after inserting {entries}: RSS +{:.0} B/entry, peak +{:.0} B/entry; disk {:.0} B/entry",
            per_entry(status_kib("VmRSS:"), rss_before),
            per_entry(status_kib("VmHWM:"), peak_before),
            dir_size(dir) as f64 / entries as f64,
        );
        let started = Instant::now();
        let mut found = 0;
        for n in 0..entries as u64 {
            found += usize::from(index.get(&ChunkId::of(&n.to_le_bytes()))?.is_some());
        }
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{name}: get of all {entries} ids in {seconds:.1} s = {:.0} gets/s ({found} found); RSS +{:.0} B/entry, peak +{:.0} B/entry since before the inserts",
            entries as f64 / seconds,
            per_entry(status_kib("VmRSS:"), rss_before),
            per_entry(status_kib("VmHWM:"), peak_before),
        );
        let started = Instant::now();
        let mut found = 0;
        let mut rng = SmallRng::seed_from_u64(1);
        for _ in 0..100_000 {
            let n: u64 = rng.random_range(0..entries as u64);
            found += usize::from(index.contains(&ChunkId::of(&n.to_le_bytes()))?);
        }
        println!(
            "{name}: 100,000 random lookups in {:.2} s ({found} found)",
            started.elapsed().as_secs_f64()
        );
    }
    let started = Instant::now();
    let index = open(dir)?;
    let present = index.contains(&ChunkId::of(&0u64.to_le_bytes()))?;
    println!(
        "{name}: reopen {:.2} s (first key found: {present}); RSS {:.0} MiB, peak {:.0} MiB",
        started.elapsed().as_secs_f64(),
        rss_mib(),
        peak_rss_mib()
    );
    let started = Instant::now();
    let mut scanned = 0u64;
    index.for_each(&mut |_, _| {
        scanned += 1;
        Ok(())
    })?;
    println!(
        "{name}: full scan (for_each, in id order) of {scanned} entries {:.2} s; peak {:.0} MiB",
        started.elapsed().as_secs_f64(),
        peak_rss_mib()
    );
    drop(index);
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// GC at `BENCH_INDEX_ENTRIES` chunks: tiny chunks, two snapshots, one deleted.
fn part_gc(base: &Path) -> BenchResult<()> {
    let entries = env_usize("BENCH_INDEX_ENTRIES", 1_000_000);
    let dir = base.join("gc-bench");
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open_or_create(&dir, StoreConfig::default())?;
    let started = Instant::now();
    let mut roots = Vec::new();
    let mut rng = SmallRng::seed_from_u64(11);
    // Chunks alternate between the two snapshots, so deleting one leaves
    // every pack half live: GC has to rewrite them all.
    let mut files: [Vec<TreeEntry>; 2] = [Vec::new(), Vec::new()];
    let mut ids: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
    let mut batch = Vec::new();
    for n in 0..entries {
        let half = n % 2;
        let mut data = vec![0u8; 64];
        rng.fill_bytes(&mut data);
        let chunk = Chunk::new(data);
        ids[half].push(chunk.id.to_vec());
        batch.push(chunk);
        if batch.len() == 10_000 {
            store.put_chunks(std::mem::take(&mut batch))?;
        }
        if ids[half].len() == 1000 || n + 2 >= entries {
            let name = format!("f{:08}", files[half].len()).into_bytes();
            let chunk_ids = std::mem::take(&mut ids[half]);
            files[half].push(TreeEntry {
                name,
                kind: EntryKind::File as i32,
                size: 64 * chunk_ids.len() as u64,
                chunk_ids,
                ..Default::default()
            });
        }
    }
    store.put_chunks(batch)?;
    for (half, entries) in files.into_iter().enumerate() {
        let root = store.put_tree(&Tree {
            entries,
            parts: Vec::new(),
        })?;
        let snapshot = store.commit_snapshot(Snapshot {
            name: format!("half-{half}"),
            root_tree_id: root.to_vec(),
            ..Default::default()
        })?;
        roots.push(snapshot.id);
    }
    println!(
        "gc setup: {entries} chunks of 64 bytes in {:.1} s; RSS {:.0} MiB, peak {:.0} MiB",
        started.elapsed().as_secs_f64(),
        rss_mib(),
        peak_rss_mib()
    );
    store.delete_snapshot(&roots[0])?;
    let rss_before = rss_mib();
    let started = Instant::now();
    let report = store.gc(&GcOptions {
        repack_threshold: Some(0.75),
        ..GcOptions::immediate()
    })?;
    println!(
        "gc at {entries} chunks: {:.1} s; swept {} chunks, rewrote {} packs, deleted {} packs, moved {}; RSS {rss_before:.0} -> {:.0} MiB, peak {:.0} MiB",
        started.elapsed().as_secs_f64(),
        report.swept_chunks,
        report.packs_rewritten,
        report.packs_deleted,
        report.moved_chunks,
        rss_mib(),
        peak_rss_mib()
    );
    let started = Instant::now();
    let stats = store.stats()?;
    println!(
        "after gc: {} chunks, {} packs, garbage {} bytes (stats took {:.1} s)",
        stats.chunks,
        stats.packs,
        stats.garbage_bytes,
        started.elapsed().as_secs_f64()
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Finding a backup's parent among `BENCH_SNAPSHOTS` records (100 hosts,
/// one job): by reading every record (what a node did before its index by
/// source) and through the index; and rebuilding that index at open.
fn part_catalogue(base: &Path) -> BenchResult<()> {
    let snapshots = env_usize("BENCH_SNAPSHOTS", 10_000);
    let dir = base.join("catalogue-bench");
    let _ = std::fs::remove_dir_all(&dir);
    let db = open_db(&dir, StoreConfig::default().index_cache_bytes)?;
    let catalog = SledCatalog::new(&db)?;
    let record = |n: usize| Snapshot {
        id: format!("{n:032x}"),
        job: "daily".into(),
        host: format!("host-{}", n % 100),
        start_time_ms: 1_700_000_000_000 + n as i64 * 1000,
        end_time_ms: 1_700_000_000_000 + n as i64 * 1000 + 500,
        state: SnapshotState::Complete as i32,
        root_tree_id: vec![7; 32],
        name: format!("daily-{n}"),
        ..Default::default()
    };
    let started = Instant::now();
    for n in 0..snapshots {
        catalog.put(&record(n))?;
    }
    println!(
        "catalogue: {snapshots} records put (each flushed) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let source = SnapshotSource {
        job: "daily",
        host: "host-42",
        instance: "",
    };
    let rounds = 100;
    let started = Instant::now();
    let mut by_listing = None;
    for _ in 0..rounds {
        by_listing = newest_among(catalog.list()?, &source);
    }
    let listing_ms = started.elapsed().as_secs_f64() * 1000.0 / rounds as f64;
    let started = Instant::now();
    let mut by_index = None;
    for _ in 0..rounds {
        by_index = catalog.newest_of(&source)?;
    }
    let index_ms = started.elapsed().as_secs_f64() * 1000.0 / rounds as f64;
    assert_eq!(by_listing, by_index, "both find the same parent");
    println!(
        "catalogue: the newest of one host among {snapshots}: reading every record {listing_ms:.3} ms, through the index {index_ms:.3} ms (mean of {rounds})"
    );
    drop(catalog);
    db.open_tree("snapshots_by_source")?.clear()?;
    let started = Instant::now();
    let catalog = SledCatalog::new(&db)?;
    println!(
        "catalogue: rebuilding the index by source of {snapshots} records at open {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(catalog.newest_of(&source)?, by_index);
    drop(catalog);
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Files that are mostly zeros, backed up with the walk into an empty store
/// and restored from it: a sparse image of `BENCH_SPARSE_GIB` GiB with 8 MiB
/// of random data in each GiB (holes between), and a file of 1 GiB whose
/// zeros are all written, with 8 MiB of random data in each 256 MiB.
fn part_sparse(base: &Path) -> BenchResult<()> {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let gib = env_usize("BENCH_SPARSE_GIB", 8) as u64;
    let dir = base.join("sparse");
    let files = dir.join("files");
    std::fs::create_dir_all(&files)?;
    let mut rng = SmallRng::seed_from_u64(7);
    let mut data = vec![0u8; 8 * MIB];
    let sparse = files.join("sparse.img");
    let file = std::fs::File::create(&sparse)?;
    file.set_len(gib << 30)?;
    for index in 0..gib {
        rng.fill_bytes(&mut data);
        file.write_all_at(&data, (index << 30) + 100 * MIB as u64)?;
    }
    file.sync_all()?;
    let zeroed = files.join("zeroed.img");
    let file = std::fs::File::create(&zeroed)?;
    let zeros = vec![0u8; 8 * MIB];
    for index in 0..128 {
        if index % 32 == 0 {
            rng.fill_bytes(&mut data);
            file.write_all_at(&data, index * 8 * MIB as u64)?;
        } else {
            file.write_all_at(&zeros, index * 8 * MIB as u64)?;
        }
    }
    file.sync_all()?;
    drop(file);

    for path in [&sparse, &zeroed] {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let meta = std::fs::metadata(path)?;
        let store =
            Store::open_or_create(&dir.join(format!("store-{name}")), StoreConfig::default())?;
        let options = fabric_chunkstore::walk::BackupOptions {
            includes: vec![path.to_path_buf()],
            excludes: Vec::new(),
            one_file_system: false,
            chunk_params: store.config().chunk_params,
            threads: 0,
            hash_ahead_bytes: fabric_chunkstore::walk::DEFAULT_HASH_AHEAD_BYTES,
        };
        let started = Instant::now();
        let outcome = fabric_chunkstore::walk::backup(&options, &store, None, &|_| {})?;
        let backup_seconds = started.elapsed().as_secs_f64();
        let target = dir.join(format!("restored-{name}"));
        let started = Instant::now();
        fabric_chunkstore::restore::restore(
            &store,
            outcome.root,
            path.to_str().ok_or("a non-UTF-8 bench directory")?,
            &mut fabric_chunkstore::restore::DirectoryTarget::new(
                &target,
                fabric_chunkstore::restore::RestorePolicy::default(),
            )?,
        )?;
        let restore_seconds = started.elapsed().as_secs_f64();
        let restored = std::fs::metadata(target.join(name))?;
        println!(
            "sparse: {name}, {} MiB ({} MiB on disk): backup {backup_seconds:.2} s ({:.0} MB/s of its size; {} MiB of zeros not hashed), restore {restore_seconds:.2} s ({:.0} MB/s; {} MiB on disk)",
            meta.len() >> 20,
            (meta.blocks() * 512) >> 20,
            mbps(meta.len() as usize, backup_seconds),
            outcome.zero_bytes_skipped >> 20,
            mbps(meta.len() as usize, restore_seconds),
            (restored.blocks() * 512) >> 20,
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Discards chunks, counting their bytes: the walk alone is measured.
#[derive(Default)]
struct DiscardSink {
    bytes: std::sync::atomic::AtomicU64,
}

impl fabric_chunkstore::ChunkSink for DiscardSink {
    fn put_chunk(&self, chunk: Chunk) -> Result<(), fabric_chunkstore::SinkError> {
        self.bytes.fetch_add(
            chunk.data.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }

    fn flush(&self) -> Result<(), fabric_chunkstore::SinkError> {
        Ok(())
    }
}

/// One file of random bytes backed up into a sink that discards chunks,
/// with hash-ahead off and at several bounds: how a single large file uses
/// the cores.
fn part_walk(base: &Path) -> BenchResult<()> {
    use std::io::Write;
    let gib = env_usize("BENCH_WALK_GIB", 4);
    let repeat = env_usize("BENCH_WALK_REPEAT", 3).max(1);
    let aheads: Vec<usize> = std::env::var("BENCH_WALK_AHEAD_MIB")
        .unwrap_or_else(|_| "0,4,8,16,32".to_owned())
        .split(',')
        .filter_map(|value| value.trim().parse().ok())
        .collect();
    let dir = base.join("walk-bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("large.bin");
    {
        let mut file = std::io::BufWriter::with_capacity(8 * MIB, std::fs::File::create(&path)?);
        let mut rng = SmallRng::seed_from_u64(4);
        let mut block = vec![0u8; 8 * MIB];
        for _ in 0..gib * 128 {
            rng.fill_bytes(&mut block);
            file.write_all(&block)?;
        }
        file.flush()?;
    }
    let size = std::fs::metadata(&path)?.len() as usize;
    // Read once so that every run finds it in the page cache alike.
    std::io::copy(&mut std::fs::File::open(&path)?, &mut std::io::sink())?;
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); aheads.len()];
    for round in 0..repeat {
        for (index, &ahead) in aheads.iter().enumerate() {
            let options = fabric_chunkstore::walk::BackupOptions {
                includes: vec![path.clone()],
                hash_ahead_bytes: ahead * MIB,
                ..Default::default()
            };
            let sink = DiscardSink::default();
            let started = Instant::now();
            let cpu = cpu_seconds();
            let outcome = fabric_chunkstore::walk::backup(&options, &sink, None, &|_| {})?;
            let seconds = started.elapsed().as_secs_f64();
            let cpu = cpu_seconds() - cpu;
            if outcome.stats.bytes_read as usize != size {
                return Err(format!("read {} of {size} bytes", outcome.stats.bytes_read).into());
            }
            let rate = mbps(size, seconds);
            println!(
                "walk: run {round}, hash_ahead {ahead} MiB ({}): {} MiB in {seconds:.2} s = {rate:.0} MB/s, {:.1} CPU s, {} chunks",
                if options.hashes_ahead() { "on" } else { "off" },
                size / MIB,
                cpu,
                outcome.stats.chunks
            );
            runs[index].push(rate);
        }
    }
    for (runs, ahead) in runs.iter_mut().zip(&aheads) {
        runs.sort_by(f64::total_cmp);
        let median = runs[runs.len() / 2];
        let options = fabric_chunkstore::walk::BackupOptions {
            hash_ahead_bytes: ahead * MIB,
            ..Default::default()
        };
        println!(
            "walk: one file of {} MiB, hash_ahead {ahead} MiB: median {median:.0} MB/s of {} runs {runs:.0?}; at most {:.1} MiB held per walk thread",
            size / MIB,
            runs.len(),
            options.bytes_per_thread() as f64 / MIB as f64
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn main() -> BenchResult<()> {
    let parts: Vec<String> = std::env::args().skip(1).collect();
    let all = parts.is_empty() || parts.iter().any(|p| p == "all");
    let wants = |name: &str| all || parts.iter().any(|p| p == name);
    let temporary;
    let base = match std::env::var("BENCH_DIR") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => {
            temporary =
                std::env::temp_dir().join(format!("chunkstore-bench-{}", std::process::id()));
            temporary
        }
    };
    std::fs::create_dir_all(&base)?;
    if wants("raw") || wants("ingest") {
        part_raw_and_ingest(&base, wants("ingest"))?;
    }
    if wants("params") {
        part_params()?;
    }
    if wants("index") {
        part_index(&base)?;
    }
    if wants("gc") {
        part_gc(&base)?;
    }
    if wants("catalogue") {
        part_catalogue(&base)?;
    }
    if wants("sparse") {
        part_sparse(&base)?;
    }
    if wants("walk") {
        part_walk(&base)?;
    }
    println!("peak RSS: {:.0} MiB", peak_rss_mib());
    if std::env::var("BENCH_DIR").is_err() {
        let _ = std::fs::remove_dir_all(&base);
    }
    Ok(())
}
