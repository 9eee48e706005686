//! A storage node's scrub: its whole store read back, pack after pack, at
//! `scrub_bytes_per_s`, forever; and the repair of what it finds from the
//! copies other nodes hold.
//!
//! Where it stands (the next pack, when the last full pass ended, the
//! damaged chunks not repaired yet) is kept in `scrub.toml` in the data
//! directory, written after every pack, so a restart resumes where it
//! stopped. The heartbeat carries the progress and the damaged chunks; the
//! coordinator answers with the storage nodes to fetch good copies from
//! (`RepairChunks`), and [`repair`] fetches them (each checked against its
//! id) and has the store rewrite the damaged packs. A chunk no other node
//! can supply is unrepairable: the snapshots that use it are named to the
//! coordinator, which marks this node's copies of them damaged.
//!
//! This module never deletes a snapshot and never trusts a fetched byte
//! before its hash matches.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fabric_chunkstore::{Chunk, ChunkId, Store};
use fabric_proto::v1::{CopyTarget, GetChunksRequest, RepairChunks, RepairDone, ScrubProgress};
use fabric_trust::Transport;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::client::Peer;
use crate::convert::plain_chunk;

/// The file in the data directory that holds [`ScrubState`].
pub const STATE_FILE: &str = "scrub.toml";

/// The least time between the end of one pass and the next.
const PAUSE_BETWEEN_PASSES: Duration = Duration::from_secs(10);

/// Damaged chunks fetched and rewritten together, at most: what a repair
/// holds in memory.
const REPAIR_BATCH: usize = 32;

/// Damaged chunks named in one heartbeat, at most.
pub const MAX_REPORTED_DAMAGED: usize = 1000;

/// Where the scrub stands, as kept on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubState {
    /// The next pack to read.
    pub next_pack: u32,
    /// When the pass in progress started (ms since the Unix epoch).
    pub pass_started_ms: i64,
    /// When the last full pass ended (0: none yet).
    pub last_pass_ms: i64,
    /// Bytes and packs read in the pass in progress.
    pub bytes_this_pass: u64,
    #[serde(default)]
    pub packs_this_pass: u32,
    /// Damaged chunks not repaired yet: hex id → what is wrong.
    pub damaged: BTreeMap<String, String>,
}

/// The scrub's state, shared with the session that reports it.
#[derive(Debug, Clone)]
pub struct Scrub {
    state: Arc<Mutex<ScrubState>>,
    path: PathBuf,
    /// Packs in the store, as of the last pack read.
    packs: Arc<std::sync::atomic::AtomicU32>,
}

impl Scrub {
    /// The scrub of the store in `data_dir`, resuming from its state file.
    pub fn load(data_dir: &Path) -> Self {
        let path = data_dir.join(STATE_FILE);
        let state = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).unwrap_or_else(|err| {
                tracing::warn!(file = %path.display(), error = %err, "scrub state unreadable: starting a new pass");
                ScrubState::default()
            }),
            Err(_) => ScrubState::default(),
        };
        Self {
            state: Arc::new(Mutex::new(state)),
            path,
            packs: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ScrubState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A copy of the state.
    pub fn state(&self) -> ScrubState {
        self.lock().clone()
    }

    fn save(&self) {
        let state = self.state();
        let text = match toml::to_string(&state) {
            Ok(text) => text,
            Err(err) => {
                tracing::warn!(error = %err, "scrub state not saved");
                return;
            }
        };
        let temporary = self.path.with_extension("toml.tmp");
        let written =
            std::fs::write(&temporary, text).and_then(|()| std::fs::rename(&temporary, &self.path));
        if let Err(err) = written {
            tracing::warn!(file = %self.path.display(), error = %err, "scrub state not saved");
        }
    }

    /// The progress for a heartbeat.
    pub fn progress(&self) -> ScrubProgress {
        let state = self.lock();
        ScrubProgress {
            packs_read: state.packs_this_pass,
            packs: self.packs.load(std::sync::atomic::Ordering::Relaxed),
            last_pass_ms: state.last_pass_ms,
            bytes_this_pass: state.bytes_this_pass,
            damaged_chunks: state.damaged.len() as u64,
            damaged_ids: state
                .damaged
                .keys()
                .take(MAX_REPORTED_DAMAGED)
                .filter_map(|hex| ChunkId::from_hex(hex).ok())
                .map(|id| id.to_vec())
                .collect(),
        }
    }

    /// Forget `ids` as damaged (repaired, or found intact).
    fn repaired(&self, ids: &[ChunkId]) {
        let mut state = self.lock();
        for id in ids {
            state.damaged.remove(&id.to_string());
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Read the store back at `bytes_per_s` until `stop`.
pub async fn run(
    store: Arc<Store>,
    scrub: Scrub,
    bytes_per_s: u64,
    mut stop: watch::Receiver<bool>,
) {
    let rate = bytes_per_s.max(1);
    loop {
        if *stop.borrow() {
            return;
        }
        let from = scrub.lock().next_pack;
        let step_store = store.clone();
        let step = tokio::task::spawn_blocking(move || {
            let packs = step_store.pack_ids()?.len();
            let next = step_store.next_pack_from(from)?;
            let report = match next {
                Some(pack) => {
                    let mut report = step_store.scrub_pack(pack)?;
                    // Repaired meanwhile: no longer damaged here.
                    let mut still = Vec::new();
                    for damaged in report.damaged {
                        if step_store.chunk_is_in_pack(&damaged.id, damaged.pack)? {
                            still.push(damaged);
                        }
                    }
                    report.damaged = still;
                    Some((pack, report))
                }
                None => None,
            };
            Ok::<_, fabric_chunkstore::StoreError>((packs, report))
        })
        .await;
        let pause = match step {
            Ok(Ok((packs, Some((pack, report))))) => {
                scrub.packs.store(
                    u32::try_from(packs).unwrap_or(u32::MAX),
                    std::sync::atomic::Ordering::Relaxed,
                );
                {
                    let mut state = scrub.lock();
                    if state.pass_started_ms == 0 {
                        state.pass_started_ms = now_ms();
                    }
                    state.next_pack = pack.saturating_add(1);
                    state.bytes_this_pass += report.bytes_read;
                    state.packs_this_pass = state.packs_this_pass.saturating_add(1);
                    for damaged in &report.damaged {
                        tracing::error!(chunk = %damaged.id, detail = %damaged.detail, "scrub found a damaged chunk");
                        state
                            .damaged
                            .insert(damaged.id.to_string(), damaged.detail.clone());
                    }
                }
                scrub.save();
                Duration::from_secs_f64(report.bytes_read as f64 / rate as f64)
            }
            Ok(Ok((_, None))) => {
                {
                    let mut state = scrub.lock();
                    let read = state.bytes_this_pass;
                    if read > 0 {
                        state.last_pass_ms = now_ms();
                        tracing::info!(
                            bytes = read,
                            damaged = state.damaged.len(),
                            "scrub pass complete"
                        );
                    }
                    state.next_pack = 0;
                    state.bytes_this_pass = 0;
                    state.packs_this_pass = 0;
                    state.pass_started_ms = 0;
                }
                scrub.save();
                // A small store is not read over and over, nor an empty
                // one looked at.
                PAUSE_BETWEEN_PASSES
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "scrub step failed; trying again in a minute");
                Duration::from_secs(60)
            }
            Err(err) => {
                tracing::warn!(error = %err, "scrub step stopped; trying again in a minute");
                Duration::from_secs(60)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Fetch good copies of the asked damaged chunks from `sources`, have the
/// store rewrite them, and say how it went.
pub async fn repair(
    store: Arc<Store>,
    scrub: Scrub,
    transport: Transport,
    ask: RepairChunks,
) -> RepairDone {
    let asked: Vec<ChunkId> = ask
        .ids
        .iter()
        .filter_map(|id| ChunkId::from_slice(id).ok())
        .collect();
    // A damaged chunk no snapshot needs any more (a GC swept it) is no
    // longer damaged here: forget it instead of fetching it.
    let lookup = store.clone();
    let present = tokio::task::spawn_blocking(move || {
        asked
            .into_iter()
            .map(|id| lookup.contains(&id).map(|there| (id, there)))
            .collect::<Result<Vec<_>, _>>()
    })
    .await;
    let wanted: Vec<ChunkId> = match present {
        Ok(Ok(present)) => {
            let gone: Vec<ChunkId> = present
                .iter()
                .filter(|(_, there)| !there)
                .map(|(id, _)| *id)
                .collect();
            if !gone.is_empty() {
                scrub.repaired(&gone);
                scrub.save();
            }
            present
                .into_iter()
                .filter(|(_, there)| *there)
                .map(|(id, _)| id)
                .collect()
        }
        Ok(Err(err)) => {
            return RepairDone {
                error: format!("cannot look the damaged chunks up: {err}"),
                ..Default::default()
            };
        }
        Err(err) => {
            return RepairDone {
                error: format!("cannot look the damaged chunks up: {err}"),
                ..Default::default()
            };
        }
    };
    let mut reasons = Vec::new();
    let mut done = RepairDone::default();
    let mut fixed: Vec<ChunkId> = Vec::new();
    // A batch at a time: at most this many chunks are held in memory.
    for batch in wanted.chunks(REPAIR_BATCH) {
        let mut found: BTreeMap<ChunkId, Chunk> = BTreeMap::new();
        for source in &ask.sources {
            let missing: Vec<Vec<u8>> = batch
                .iter()
                .filter(|id| !found.contains_key(*id))
                .map(|id| id.to_vec())
                .collect();
            if missing.is_empty() {
                break;
            }
            match fetch(source, &transport, missing).await {
                Ok(chunks) => {
                    for chunk in chunks {
                        found.insert(chunk.id, chunk);
                    }
                }
                Err(reason) => reasons.push(format!("{}: {reason}", source.node)),
            }
        }
        if found.is_empty() {
            continue;
        }
        let chunks: Vec<Chunk> = found.into_values().collect();
        let ids: Vec<ChunkId> = chunks.iter().map(|chunk| chunk.id).collect();
        let repair_store = store.clone();
        match tokio::task::spawn_blocking(move || repair_store.repair_chunks(chunks)).await {
            Ok(Ok(report)) => {
                scrub.repaired(&ids);
                scrub.save();
                fixed.extend(ids);
                done.repaired += report.repaired.len() as u64;
                done.packs_rewritten += report.packs_rewritten;
            }
            Ok(Err(err)) => reasons.push(format!("the store could not rewrite them: {err}")),
            Err(err) => reasons.push(format!("the repair stopped: {err}")),
        }
    }
    if done.repaired > 0 {
        tracing::info!(
            chunks = done.repaired,
            packs = done.packs_rewritten,
            "damaged chunks repaired from other nodes"
        );
    }
    let fixed: HashSet<ChunkId> = fixed.into_iter().collect();
    let unrepairable: HashSet<ChunkId> = wanted
        .into_iter()
        .filter(|id| !fixed.contains(id))
        .collect();
    if !unrepairable.is_empty() {
        done.unrepairable = unrepairable.iter().map(|id| id.to_vec()).collect();
        let lookup = unrepairable.clone();
        match tokio::task::spawn_blocking(move || store.snapshots_using(&lookup)).await {
            Ok(Ok(snapshots)) => done.damaged_snapshots = snapshots,
            Ok(Err(err)) => reasons.push(format!("cannot tell which snapshots use them: {err}")),
            Err(err) => reasons.push(format!("cannot tell which snapshots use them: {err}")),
        }
        tracing::error!(chunks = unrepairable.len(), snapshots = ?done.damaged_snapshots, "damaged chunks no other node could supply");
    }
    done.error = reasons.join("; ");
    done
}

/// `ids` from `source`, each checked against its id.
async fn fetch(
    source: &CopyTarget,
    transport: &Transport,
    ids: Vec<Vec<u8>>,
) -> Result<Vec<Chunk>, String> {
    let mut client = crate::client::storage(&Peer::node(&source.node, &source.address), transport)
        .await
        .map_err(|err| err.to_string())?;
    let mut stream = client
        .get_chunks(GetChunksRequest { ids })
        .await
        .map_err(|status| status.message().to_owned())?
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(data) => match plain_chunk(data) {
                Ok(chunk) => chunks.push(chunk),
                // A bad copy there: the next source may have a good one.
                Err(err) => {
                    tracing::warn!(node = %source.node, error = %err, "a chunk fetched for repair does not check")
                }
            },
            // The source lacks one (NOT_FOUND ends the stream): keep what
            // came before it.
            Err(status) => {
                if chunks.is_empty() {
                    return Err(status.message().to_owned());
                }
                break;
            }
        }
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_survives_a_restart_and_reports_its_damage() {
        let temp = tempfile::tempdir().unwrap();
        let scrub = Scrub::load(temp.path());
        let id = ChunkId::of(b"a chunk");
        {
            let mut state = scrub.lock();
            state.next_pack = 7;
            state.bytes_this_pass = 1234;
            state
                .damaged
                .insert(id.to_string(), "checksum mismatch".into());
        }
        scrub.save();
        let again = Scrub::load(temp.path());
        assert_eq!(again.state(), scrub.state());
        let progress = again.progress();
        assert_eq!(progress.bytes_this_pass, 1234);
        assert_eq!(progress.damaged_ids, vec![id.to_vec()]);
        again.repaired(&[id]);
        assert_eq!(again.progress().damaged_chunks, 0);
        // A garbled file starts a new pass rather than stopping the node.
        std::fs::write(temp.path().join(STATE_FILE), "next_pack = \"x\"").unwrap();
        assert_eq!(Scrub::load(temp.path()).state(), ScrubState::default());
    }
}
