//! The coordinator's durable state: one sled database with six trees, every
//! value a prost-encoded message. This is the only module that knows sled;
//! the rest of the crate sees [`Store`]'s small API. It never decides
//! anything about runs or nodes: it stores and reads what it is given.
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `nodes` | node id | [`Node`] |
//! | `jobs` | job name | [`Job`] (without `last_run`) |
//! | `runs` | run id (time-ordered hex, see [`crate::engine::new_run_id`]) | [`RunRecord`] |
//! | `events` | run id, `/`, sequence (u64 big-endian) | [`RunEvent`] |
//! | `catalog` | start time (order-preserving i64), snapshot id | [`CatalogEntry`] |
//! | `tokens` | token id | [`StoredToken`] (a hash of the secret, never the secret) |

use std::path::{Path, PathBuf};

use fabric_proto::v1::{CatalogCopy, CatalogEntry, Job, Node, RunEvent, Snapshot};
use prost::Message;

use crate::record::{RunRecord, StoredToken};

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The database could not be opened (another process holds it, or the
    /// directory is not writable).
    #[error("cannot open the state database in {path}: {source}")]
    Open {
        /// The data directory.
        path: PathBuf,
        /// sled's error.
        source: sled::Error,
    },
    /// A read or write failed.
    #[error("state database: cannot {action}: {source}")]
    Sled {
        /// What was being done, naming the key.
        action: String,
        /// sled's error.
        source: sled::Error,
    },
    /// A stored value does not decode.
    #[error("state database: the value of {tree}/{key} is corrupt: {source}")]
    Decode {
        /// The tree.
        tree: &'static str,
        /// The key, printable.
        key: String,
        /// prost's error.
        source: prost::DecodeError,
    },
}

/// A run id prefix matching more than one run.
#[derive(Debug, thiserror::Error)]
#[error("run id prefix {prefix:?} matches several runs ({first}, {second}, ...)")]
pub struct AmbiguousPrefix {
    /// The prefix.
    pub prefix: String,
    /// A first match.
    pub first: String,
    /// A second match.
    pub second: String,
}

/// The sled database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    nodes: sled::Tree,
    jobs: sled::Tree,
    runs: sled::Tree,
    events: sled::Tree,
    catalog: sled::Tree,
    tokens: sled::Tree,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn sled_error(action: impl Into<String>) -> impl FnOnce(sled::Error) -> StateError {
    let action = action.into();
    move |source| StateError::Sled { action, source }
}

fn decode<M: Message + Default>(
    tree: &'static str,
    key: &[u8],
    value: &[u8],
) -> Result<M, StateError> {
    M::decode(value).map_err(|source| StateError::Decode {
        tree,
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn event_key(run_id: &str, seq: u64) -> Vec<u8> {
    let mut key = event_prefix(run_id);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn event_prefix(run_id: &str) -> Vec<u8> {
    let mut key = run_id.as_bytes().to_vec();
    key.push(b'/');
    key
}

/// Order-preserving encoding of a signed time, then the id.
fn catalog_key(snapshot: &Snapshot) -> Vec<u8> {
    let ordered = (snapshot.start_time_ms as u64) ^ (1 << 63);
    let mut key = ordered.to_be_bytes().to_vec();
    key.extend_from_slice(snapshot.id.as_bytes());
    key
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let open_error = |source| StateError::Open {
            path: dir.to_owned(),
            source,
        };
        let db = sled::Config::new().path(dir).open().map_err(open_error)?;
        let tree = |name: &str| db.open_tree(name).map_err(open_error);
        Ok(Self {
            nodes: tree("nodes")?,
            jobs: tree("jobs")?,
            runs: tree("runs")?,
            events: tree("events")?,
            catalog: tree("catalog")?,
            tokens: tree("tokens")?,
            db,
        })
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<(), StateError> {
        self.db
            .flush_async()
            .await
            .map(|_| ())
            .map_err(sled_error("flush"))
    }

    /// Stores a node.
    pub fn put_node(&self, node: &Node) -> Result<(), StateError> {
        let id = node
            .info
            .as_ref()
            .map(|info| info.id.as_str())
            .unwrap_or("");
        self.nodes
            .insert(id.as_bytes(), node.encode_to_vec())
            .map(|_| ())
            .map_err(sled_error(format!("store node {id:?}")))
    }

    /// Every node, by id.
    pub fn nodes(&self) -> Result<Vec<Node>, StateError> {
        self.nodes
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(sled_error("read nodes"))?;
                decode("nodes", &key, &value)
            })
            .collect()
    }

    /// Stores a token.
    pub fn put_token(&self, token: &StoredToken) -> Result<(), StateError> {
        let id = token
            .info
            .as_ref()
            .map(|info| info.id.as_str())
            .unwrap_or("");
        self.tokens
            .insert(id.as_bytes(), token.encode_to_vec())
            .map(|_| ())
            .map_err(sled_error(format!("store token {id:?}")))
    }

    /// One token by id.
    pub fn token(&self, id: &str) -> Result<Option<StoredToken>, StateError> {
        match self
            .tokens
            .get(id.as_bytes())
            .map_err(sled_error(format!("read token {id:?}")))?
        {
            Some(value) => Ok(Some(decode("tokens", id.as_bytes(), &value)?)),
            None => Ok(None),
        }
    }

    /// Every token, by id.
    pub fn tokens(&self) -> Result<Vec<StoredToken>, StateError> {
        self.tokens
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(sled_error("read tokens"))?;
                decode("tokens", &key, &value)
            })
            .collect()
    }

    /// Stores a job.
    pub fn put_job(&self, job: &Job) -> Result<(), StateError> {
        let name = job
            .spec
            .as_ref()
            .map(|spec| spec.name.as_str())
            .unwrap_or("");
        self.jobs
            .insert(name.as_bytes(), job.encode_to_vec())
            .map(|_| ())
            .map_err(sled_error(format!("store job {name:?}")))
    }

    /// Removes job `name`; returns it, if it was there.
    pub fn delete_job(&self, name: &str) -> Result<Option<Job>, StateError> {
        match self
            .jobs
            .remove(name.as_bytes())
            .map_err(sled_error(format!("remove job {name:?}")))?
        {
            Some(value) => Ok(Some(decode("job", name.as_bytes(), &value)?)),
            None => Ok(None),
        }
    }

    /// One job by name.
    pub fn job(&self, name: &str) -> Result<Option<Job>, StateError> {
        match self
            .jobs
            .get(name.as_bytes())
            .map_err(sled_error(format!("read job {name:?}")))?
        {
            Some(value) => Ok(Some(decode("jobs", name.as_bytes(), &value)?)),
            None => Ok(None),
        }
    }

    /// Every job, by name.
    pub fn jobs(&self) -> Result<Vec<Job>, StateError> {
        self.jobs
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(sled_error("read jobs"))?;
                decode("jobs", &key, &value)
            })
            .collect()
    }

    /// Stores a run.
    pub fn put_run(&self, record: &RunRecord) -> Result<(), StateError> {
        let id = record.id();
        self.runs
            .insert(id.as_bytes(), record.encode_to_vec())
            .map(|_| ())
            .map_err(sled_error(format!("store run {id}")))
    }

    /// One run by exact id.
    pub fn run(&self, id: &str) -> Result<Option<RunRecord>, StateError> {
        match self
            .runs
            .get(id.as_bytes())
            .map_err(sled_error(format!("read run {id}")))?
        {
            Some(value) => Ok(Some(decode("runs", id.as_bytes(), &value)?)),
            None => Ok(None),
        }
    }

    /// The run whose id is `prefix` or starts with it.
    pub fn run_by_prefix(
        &self,
        prefix: &str,
    ) -> Result<Result<Option<RunRecord>, AmbiguousPrefix>, StateError> {
        if let Some(record) = self.run(prefix)? {
            return Ok(Ok(Some(record)));
        }
        let mut matches = self.runs.scan_prefix(prefix.as_bytes());
        let Some(first) = matches.next() else {
            return Ok(Ok(None));
        };
        let (key, value) = first.map_err(sled_error(format!("read runs {prefix}*")))?;
        if let Some(second) = matches.next() {
            let (second_key, _) = second.map_err(sled_error(format!("read runs {prefix}*")))?;
            return Ok(Err(AmbiguousPrefix {
                prefix: prefix.to_owned(),
                first: String::from_utf8_lossy(&key).into_owned(),
                second: String::from_utf8_lossy(&second_key).into_owned(),
            }));
        }
        Ok(Ok(Some(decode("runs", &key, &value)?)))
    }

    /// The length of the shortest prefix of run `id` that no other run
    /// starts with, at least `minimum`: one more than the longest prefix
    /// it shares with its neighbours in id order.
    pub fn run_unique_prefix_len(&self, id: &str, minimum: usize) -> Result<usize, StateError> {
        let shared = |other: Option<Result<(sled::IVec, sled::IVec), sled::Error>>| {
            other
                .transpose()
                .map_err(sled_error(format!("read runs around {id}")))
                .map(|other| {
                    other.map_or(0, |(key, _)| {
                        key.iter()
                            .zip(id.as_bytes())
                            .take_while(|(a, b)| a == b)
                            .count()
                    })
                })
        };
        let before = shared(self.runs.range(..id.as_bytes()).next_back())?;
        let mut after_key = id.as_bytes().to_vec();
        after_key.push(0);
        let after = shared(self.runs.range(after_key.as_slice()..).next())?;
        Ok((before.max(after) + 1).max(minimum).min(id.len()))
    }

    /// Visits runs newest first until `visit` returns false.
    pub fn visit_runs_newest_first(
        &self,
        mut visit: impl FnMut(RunRecord) -> bool,
    ) -> Result<(), StateError> {
        for item in self.runs.iter().rev() {
            let (key, value) = item.map_err(sled_error("read runs"))?;
            if !visit(decode("runs", &key, &value)?) {
                break;
            }
        }
        Ok(())
    }

    /// Appends an event to its run's history, giving it the next sequence
    /// number (from 1); returns it as stored.
    pub fn append_event(&self, mut event: RunEvent) -> Result<RunEvent, StateError> {
        let last = self
            .events
            .scan_prefix(event_prefix(&event.run_id))
            .next_back()
            .transpose()
            .map_err(sled_error(format!("read events of run {}", event.run_id)))?;
        let last_seq = match last {
            Some((key, _)) => key
                .len()
                .checked_sub(8)
                .and_then(|start| key.get(start..))
                .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0),
            None => 0,
        };
        event.seq = last_seq + 1;
        self.events
            .insert(event_key(&event.run_id, event.seq), event.encode_to_vec())
            .map_err(sled_error(format!(
                "store an event of run {}",
                event.run_id
            )))?;
        Ok(event)
    }

    /// A run's events, oldest first, from sequence `after + 1` on.
    pub fn events(&self, run_id: &str, after: u64) -> Result<Vec<RunEvent>, StateError> {
        let start = event_key(run_id, after.saturating_add(1));
        let mut end = event_prefix(run_id);
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        self.events
            .range(start..end)
            .map(|item| {
                let (key, value) =
                    item.map_err(sled_error(format!("read events of run {run_id}")))?;
                decode("events", &key, &value)
            })
            .collect()
    }

    /// Records that `node` holds `snapshot` (under the id it reported),
    /// and `replica_target` as the entry's target when it has none yet (0:
    /// leave it). Returns whether the entry changed.
    pub fn add_catalog_copy(
        &self,
        snapshot: &Snapshot,
        node: &str,
        replica_target: u32,
    ) -> Result<bool, StateError> {
        let key = catalog_key(snapshot);
        let mut entry: CatalogEntry = match self
            .catalog
            .get(&key)
            .map_err(sled_error(format!("read catalog entry {}", snapshot.id)))?
        {
            Some(value) => decode("catalog", snapshot.id.as_bytes(), &value)?,
            None => CatalogEntry {
                snapshot: Some(snapshot.clone()),
                ..Default::default()
            },
        };
        let mut changed = false;
        if entry.replica_target == 0 && replica_target > 0 {
            entry.replica_target = replica_target;
            changed = true;
        }
        if !entry.copies.iter().any(|copy| copy.node == node) {
            entry.copies.push(CatalogCopy {
                node: node.to_owned(),
                snapshot_id: snapshot.id.clone(),
                ..Default::default()
            });
            changed = true;
        }
        if !changed {
            return Ok(false);
        }
        self.catalog
            .insert(key, entry.encode_to_vec())
            .map_err(sled_error(format!("store catalog entry {}", snapshot.id)))?;
        Ok(true)
    }

    /// Marks `node`'s copy of snapshot `id` damaged (`reason`); the entry's
    /// snapshot becomes DAMAGED when no copy is left undamaged. Returns
    /// whether anything changed.
    pub fn mark_catalog_copy_damaged(
        &self,
        id: &str,
        node: &str,
        reason: &str,
    ) -> Result<bool, StateError> {
        self.update_catalog_entry(id, |entry| {
            let Some(copy) = entry.copies.iter_mut().find(|copy| copy.node == node) else {
                return false;
            };
            if copy.damage == reason {
                return false;
            }
            copy.damage = reason.to_owned();
            if entry.copies.iter().all(|copy| !copy.damage.is_empty())
                && let Some(snapshot) = entry.snapshot.as_mut()
            {
                snapshot.set_state(fabric_proto::v1::SnapshotState::Damaged);
            }
            true
        })
    }

    /// Applies `change` to the catalogue entry of snapshot `id` and stores
    /// it when `change` says it changed. Returns whether it did (false
    /// too when there is no such entry).
    pub fn update_catalog_entry(
        &self,
        id: &str,
        change: impl FnOnce(&mut CatalogEntry) -> bool,
    ) -> Result<bool, StateError> {
        let Some((key, mut entry)) = self.find_catalog_entry(id)? else {
            return Ok(false);
        };
        if !change(&mut entry) {
            return Ok(false);
        }
        self.catalog
            .insert(key, entry.encode_to_vec())
            .map_err(sled_error(format!("store catalog entry {id}")))?;
        Ok(true)
    }

    /// Sets snapshot `id`'s state in the catalogue to `state` (a DAMAGED
    /// one stays so). Returns whether it changed.
    pub fn set_catalog_state(
        &self,
        id: &str,
        state: fabric_proto::v1::SnapshotState,
    ) -> Result<bool, StateError> {
        self.update_catalog_entry(id, |entry| {
            let Some(snapshot) = entry.snapshot.as_mut() else {
                return false;
            };
            if snapshot.state() == state
                || snapshot.state() == fabric_proto::v1::SnapshotState::Damaged
            {
                return false;
            }
            snapshot.set_state(state);
            true
        })
    }

    /// Clears the damage marks of `node`'s copies (its repair succeeded,
    /// so every chunk it holds reads back); a DAMAGED snapshot with a copy
    /// there is COMPLETE again. Returns how many copies changed.
    pub fn clear_catalog_damage(&self, node: &str) -> Result<u64, StateError> {
        let mut cleared = 0;
        for item in self.catalog.iter() {
            let (key, value) = item.map_err(sled_error("read the catalog"))?;
            let mut entry: CatalogEntry = decode("catalog", &key, &value)?;
            let Some(copy) = entry
                .copies
                .iter_mut()
                .find(|copy| copy.node == node && !copy.damage.is_empty())
            else {
                continue;
            };
            copy.damage.clear();
            if let Some(snapshot) = entry.snapshot.as_mut()
                && snapshot.state() == fabric_proto::v1::SnapshotState::Damaged
            {
                snapshot.set_state(fabric_proto::v1::SnapshotState::Complete);
            }
            self.catalog
                .insert(key, entry.encode_to_vec())
                .map_err(sled_error("store a catalog entry"))?;
            cleared += 1;
        }
        Ok(cleared)
    }

    /// The catalogue entry of snapshot `id`, if any (a scan: the catalogue
    /// is keyed by start time).
    pub fn catalog_entry(&self, id: &str) -> Result<Option<CatalogEntry>, StateError> {
        Ok(self.find_catalog_entry(id)?.map(|(_, entry)| entry))
    }

    /// The key and entry of snapshot `id` in the catalogue (a scan).
    fn find_catalog_entry(
        &self,
        id: &str,
    ) -> Result<Option<(sled::IVec, CatalogEntry)>, StateError> {
        for item in self.catalog.iter() {
            let (key, value) = item.map_err(sled_error("read the catalog"))?;
            let entry: CatalogEntry = decode("catalog", &key, &value)?;
            if entry.snapshot.as_ref().is_some_and(|s| s.id == id) {
                return Ok(Some((key, entry)));
            }
        }
        Ok(None)
    }

    /// Records that `node` no longer holds snapshot `id`; the entry goes
    /// with its last copy. Returns whether anything changed.
    pub fn remove_catalog_copy(&self, id: &str, node: &str) -> Result<bool, StateError> {
        for item in self.catalog.iter() {
            let (key, value) = item.map_err(sled_error("read the catalog"))?;
            let mut entry: CatalogEntry = decode("catalog", &key, &value)?;
            if entry
                .snapshot
                .as_ref()
                .is_none_or(|snapshot| snapshot.id != id)
            {
                continue;
            }
            let before = entry.copies.len();
            entry.copies.retain(|copy| copy.node != node);
            if entry.copies.len() == before {
                return Ok(false);
            }
            if entry.copies.is_empty() {
                self.catalog
                    .remove(&key)
                    .map_err(sled_error(format!("remove catalog entry {id}")))?;
            } else {
                self.catalog
                    .insert(key, entry.encode_to_vec())
                    .map_err(sled_error(format!("store catalog entry {id}")))?;
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// The catalogue, oldest first.
    pub fn catalog(&self) -> Result<Vec<CatalogEntry>, StateError> {
        self.catalog
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(sled_error("read the catalog"))?;
                decode("catalog", &key, &value)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_proto::v1::{JobSpec, NodeInfo, Run};

    fn record(id: &str) -> RunRecord {
        RunRecord {
            run: Some(Run {
                id: id.into(),
                job: "db".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_runs_short_id_is_the_shortest_prefix_no_other_run_shares() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // Two runs of the same millisecond share the 12 characters of time.
        for id in [
            "019af3c2b7e1aaaa0001",
            "019af3c2b7e1bbbb0002",
            "019b000000000000cccc",
        ] {
            store.put_run(&record(id)).unwrap();
        }
        assert_eq!(
            store
                .run_unique_prefix_len("019af3c2b7e1aaaa0001", 8)
                .unwrap(),
            13
        );
        assert_eq!(
            store
                .run_unique_prefix_len("019af3c2b7e1bbbb0002", 8)
                .unwrap(),
            13
        );
        assert_eq!(
            store
                .run_unique_prefix_len("019b000000000000cccc", 4)
                .unwrap(),
            4
        );
        assert_eq!(
            store
                .run_unique_prefix_len("019b000000000000cccc", 8)
                .unwrap(),
            8
        );
        for id in ["019af3c2b7e1aaaa0001", "019af3c2b7e1bbbb0002"] {
            let prefix = &id[..13];
            assert_eq!(
                store.run_by_prefix(prefix).unwrap().unwrap().unwrap().id(),
                id
            );
        }
    }

    #[test]
    fn everything_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .put_node(&Node {
                    info: Some(NodeInfo {
                        id: "n1".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .unwrap();
            store
                .put_job(&Job {
                    spec: Some(JobSpec {
                        name: "db".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .unwrap();
            store.put_run(&record("0001aa")).unwrap();
            store.put_run(&record("0002bb")).unwrap();
            for message in ["one", "two", "three"] {
                store
                    .append_event(RunEvent {
                        run_id: "0001aa".into(),
                        message: message.into(),
                        ..Default::default()
                    })
                    .unwrap();
            }
            let snapshot = Snapshot {
                id: "s1".into(),
                start_time_ms: 5,
                ..Default::default()
            };
            assert!(store.add_catalog_copy(&snapshot, "n1", 0).unwrap());
            assert!(store.add_catalog_copy(&snapshot, "n2", 0).unwrap());
            assert!(!store.add_catalog_copy(&snapshot, "n2", 0).unwrap());
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.nodes().unwrap().len(), 1);
        assert!(store.job("db").unwrap().is_some());
        let events = store.events("0001aa", 0).unwrap();
        assert_eq!(
            events.iter().map(|event| event.seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(store.events("0001aa", 2).unwrap()[0].message, "three");
        assert!(store.events("0002bb", 0).unwrap().is_empty());
        let mut ids = Vec::new();
        store
            .visit_runs_newest_first(|record| {
                ids.push(record.id().to_owned());
                true
            })
            .unwrap();
        assert_eq!(ids, ["0002bb", "0001aa"]);
        assert!(store.run_by_prefix("0001").unwrap().unwrap().is_some());
        assert!(store.run_by_prefix("000").unwrap().is_err());
        assert!(store.run_by_prefix("9").unwrap().unwrap().is_none());
        let catalog = store.catalog().unwrap();
        assert_eq!(catalog.len(), 1);
        assert_eq!(catalog[0].copies.len(), 2);
    }

    #[test]
    fn damage_on_every_copy_makes_a_snapshot_damaged_and_a_repair_undoes_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let snapshot = Snapshot {
            id: "s1".into(),
            state: fabric_proto::v1::SnapshotState::Complete as i32,
            ..Default::default()
        };
        store.add_catalog_copy(&snapshot, "n1", 2).unwrap();
        store.add_catalog_copy(&snapshot, "n2", 0).unwrap();
        assert_eq!(store.catalog().unwrap()[0].replica_target, 2);
        assert!(store.mark_catalog_copy_damaged("s1", "n1", "bad").unwrap());
        assert!(!store.mark_catalog_copy_damaged("s1", "n1", "bad").unwrap());
        let state = |store: &Store| {
            store.catalog().unwrap()[0]
                .snapshot
                .clone()
                .unwrap()
                .state()
        };
        assert_eq!(state(&store), fabric_proto::v1::SnapshotState::Complete);
        assert!(store.mark_catalog_copy_damaged("s1", "n2", "bad").unwrap());
        assert_eq!(state(&store), fabric_proto::v1::SnapshotState::Damaged);
        assert_eq!(store.clear_catalog_damage("n2").unwrap(), 1);
        assert_eq!(state(&store), fabric_proto::v1::SnapshotState::Complete);
        let entry = store.catalog_entry("s1").unwrap().unwrap();
        assert_eq!(entry.copies[0].damage, "bad");
        assert!(entry.copies[1].damage.is_empty());
    }

    #[test]
    fn catalog_is_ordered_by_start_time_even_before_the_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for (id, time) in [("b", 10), ("a", -10), ("c", 0)] {
            let snapshot = Snapshot {
                id: id.into(),
                start_time_ms: time,
                ..Default::default()
            };
            store.add_catalog_copy(&snapshot, "n1", 0).unwrap();
        }
        let ids: Vec<String> = store
            .catalog()
            .unwrap()
            .into_iter()
            .map(|entry| entry.snapshot.unwrap().id)
            .collect();
        assert_eq!(ids, ["a", "c", "b"]);
    }
}
