//! The coordinator's durable state: six trees of keys, every value a
//! prost-encoded message, kept by a [`StateEngine`]: sled in the data
//! directory ([`sled_engine`], the embedded default) or etcd
//! ([`etcd`], for several coordinators with one leader). The rest of the
//! crate sees [`Store`]'s small typed API and never an engine. This module
//! never decides anything about runs or nodes: it stores and reads what it
//! is given. Both engines pass one conformance suite ([`conformance`]).
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `nodes` | node id | [`Node`] |
//! | `jobs` | job name | [`Job`] (without `last_run`) |
//! | `runs` | run id (time-ordered hex, see [`crate::engine::new_run_id`]) | [`RunRecord`] |
//! | `events` | run id, `/`, sequence (u64 big-endian) | [`RunEvent`] |
//! | `catalog` | start time (order-preserving i64), snapshot id | [`CatalogEntry`] |
//! | `tokens` | token id | [`StoredToken`] (a hash of the secret, never the secret) |

pub mod conformance;
pub mod etcd;
pub mod sled_engine;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fabric_proto::v1::{CatalogCopy, CatalogEntry, Job, Node, RunEvent, Snapshot};
use futures::future::BoxFuture;
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
    /// etcd could not be read or written.
    #[error("state in etcd: {0}")]
    Etcd(#[from] crate::etcd::EtcdError),
    /// etcd refused a write because this coordinator no longer leads (its
    /// lease expired and another may lead): nothing more may be written.
    #[error(
        "state in etcd: this coordinator is no longer the leader, so it may not write (its leader key {key} is gone)"
    )]
    Fenced {
        /// The leader key the writes were fenced on.
        key: String,
    },
    /// A key in etcd is not one of the state's.
    #[error("state in etcd: the key {key:?} is not in a known tree")]
    UnknownKey {
        /// The key, printable.
        key: String,
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

/// One namespace of keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tree {
    /// Nodes by id.
    Nodes,
    /// Jobs by name.
    Jobs,
    /// Runs by id.
    Runs,
    /// Run events by run id and sequence.
    Events,
    /// The snapshot catalogue by start time and id.
    Catalog,
    /// Bearer tokens by id.
    Tokens,
}

impl Tree {
    /// Every tree.
    pub const ALL: [Tree; 6] = [
        Tree::Nodes,
        Tree::Jobs,
        Tree::Runs,
        Tree::Events,
        Tree::Catalog,
        Tree::Tokens,
    ];

    /// The tree's name (sled's tree, the etcd key's second part).
    pub fn name(self) -> &'static str {
        match self {
            Tree::Nodes => "nodes",
            Tree::Jobs => "jobs",
            Tree::Runs => "runs",
            Tree::Events => "events",
            Tree::Catalog => "catalog",
            Tree::Tokens => "tokens",
        }
    }

    /// The tree named `name`.
    pub fn named(name: &str) -> Option<Tree> {
        Tree::ALL.into_iter().find(|tree| tree.name() == name)
    }
}

/// Keys from `start` (inclusive) to `end` (exclusive); `None` is unbounded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyRange {
    /// The first key, if bounded.
    pub start: Option<Vec<u8>>,
    /// The key after the last, if bounded.
    pub end: Option<Vec<u8>>,
}

impl KeyRange {
    /// Every key.
    pub fn all() -> Self {
        Self::default()
    }

    /// Every key starting with `prefix`.
    pub fn prefix(prefix: &[u8]) -> Self {
        let end = crate::etcd::prefix_end(prefix);
        Self {
            start: Some(prefix.to_vec()),
            // prefix_end's "\0" means "no end".
            end: (end != [0]).then_some(end),
        }
    }

    /// Keys before `end`.
    pub fn before(end: &[u8]) -> Self {
        Self {
            start: None,
            end: Some(end.to_vec()),
        }
    }

    /// Keys from `start` on.
    pub fn from(start: &[u8]) -> Self {
        Self {
            start: Some(start.to_vec()),
            end: None,
        }
    }

    /// The range as bounds for a `BTreeMap` or sled range, or `None` when it
    /// is empty (a start at or past the end, which both would refuse).
    pub fn bounds(&self) -> Option<KeyBounds<'_>> {
        use std::ops::Bound;
        if let (Some(start), Some(end)) = (&self.start, &self.end)
            && start >= end
        {
            return None;
        }
        let start = self
            .start
            .as_deref()
            .map_or(Bound::Unbounded, Bound::Included);
        let end = self
            .end
            .as_deref()
            .map_or(Bound::Unbounded, Bound::Excluded);
        Some((start, end))
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.start.as_deref().is_none_or(|start| key >= start)
            && self.end.as_deref().is_none_or(|end| key < end)
    }
}

/// A [`KeyRange`]'s start and end bounds.
pub type KeyBounds<'a> = (std::ops::Bound<&'a [u8]>, std::ops::Bound<&'a [u8]>);

/// Which way a scan goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Smallest key first.
    Ascending,
    /// Largest key first.
    Descending,
}

/// What keeps the state: ordered keys per [`Tree`], single-key writes, and
/// a flush that makes every write so far durable. Reads see every write
/// made before them through the same engine, flushed or not. An engine is
/// synchronous but for `flush`, so the engine's callers may use it under
/// their lock.
pub trait StateEngine: Send + Sync + 'static {
    /// The value of `key`.
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StateError>;
    /// Sets `key` to `value`.
    fn insert(&self, tree: Tree, key: &[u8], value: Vec<u8>) -> Result<(), StateError>;
    /// Removes `key`; returns its value, if it was there.
    fn remove(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StateError>;
    /// Calls `visit` with each key and value in `range`, in `order`, until
    /// it returns false.
    fn scan(
        &self,
        tree: Tree,
        range: &KeyRange,
        order: Order,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StateError>;
    /// Makes every write so far durable.
    fn flush(&self) -> BoxFuture<'_, Result<(), StateError>>;
}

/// A key and its value, as a scan found them.
type KeyValue = (Vec<u8>, Vec<u8>);

/// The typed state over an engine.
#[derive(Clone)]
pub struct Store {
    engine: Arc<dyn StateEngine>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
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
    /// Opens (or creates) the sled database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        Ok(Self::new(Arc::new(sled_engine::SledEngine::open(dir)?)))
    }

    /// The state kept by `engine`.
    pub fn new(engine: Arc<dyn StateEngine>) -> Self {
        Self { engine }
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<(), StateError> {
        self.engine.flush().await
    }

    /// Every value of `tree`, decoded, in key order.
    fn all<M: Message + Default>(&self, tree: Tree) -> Result<Vec<M>, StateError> {
        let mut values = Vec::new();
        let mut failure = None;
        self.engine.scan(
            tree,
            &KeyRange::all(),
            Order::Ascending,
            &mut |key, value| match decode(tree.name(), key, value) {
                Ok(message) => {
                    values.push(message);
                    true
                }
                Err(error) => {
                    failure = Some(error);
                    false
                }
            },
        )?;
        match failure {
            Some(error) => Err(error),
            None => Ok(values),
        }
    }

    /// The value of `key` in `tree`, decoded.
    fn one<M: Message + Default>(&self, tree: Tree, key: &[u8]) -> Result<Option<M>, StateError> {
        match self.engine.get(tree, key)? {
            Some(value) => Ok(Some(decode(tree.name(), key, &value)?)),
            None => Ok(None),
        }
    }

    /// The first `count` keys and values of `tree` in `range`, in `order`.
    fn first(
        &self,
        tree: Tree,
        range: &KeyRange,
        order: Order,
        count: usize,
    ) -> Result<Vec<KeyValue>, StateError> {
        let mut found = Vec::with_capacity(count);
        self.engine.scan(tree, range, order, &mut |key, value| {
            found.push((key.to_vec(), value.to_vec()));
            found.len() < count
        })?;
        Ok(found)
    }

    /// Stores a node.
    pub fn put_node(&self, node: &Node) -> Result<(), StateError> {
        let id = node
            .info
            .as_ref()
            .map(|info| info.id.as_str())
            .unwrap_or("");
        self.engine
            .insert(Tree::Nodes, id.as_bytes(), node.encode_to_vec())
    }

    /// Every node, by id.
    pub fn nodes(&self) -> Result<Vec<Node>, StateError> {
        self.all(Tree::Nodes)
    }

    /// Stores a token.
    pub fn put_token(&self, token: &StoredToken) -> Result<(), StateError> {
        let id = token
            .info
            .as_ref()
            .map(|info| info.id.as_str())
            .unwrap_or("");
        self.engine
            .insert(Tree::Tokens, id.as_bytes(), token.encode_to_vec())
    }

    /// One token by id.
    pub fn token(&self, id: &str) -> Result<Option<StoredToken>, StateError> {
        self.one(Tree::Tokens, id.as_bytes())
    }

    /// Every token, by id.
    pub fn tokens(&self) -> Result<Vec<StoredToken>, StateError> {
        self.all(Tree::Tokens)
    }

    /// Stores a job.
    pub fn put_job(&self, job: &Job) -> Result<(), StateError> {
        let name = job
            .spec
            .as_ref()
            .map(|spec| spec.name.as_str())
            .unwrap_or("");
        self.engine
            .insert(Tree::Jobs, name.as_bytes(), job.encode_to_vec())
    }

    /// Removes job `name`; returns it, if it was there.
    pub fn delete_job(&self, name: &str) -> Result<Option<Job>, StateError> {
        match self.engine.remove(Tree::Jobs, name.as_bytes())? {
            Some(value) => Ok(Some(decode("jobs", name.as_bytes(), &value)?)),
            None => Ok(None),
        }
    }

    /// One job by name.
    pub fn job(&self, name: &str) -> Result<Option<Job>, StateError> {
        self.one(Tree::Jobs, name.as_bytes())
    }

    /// Every job, by name.
    pub fn jobs(&self) -> Result<Vec<Job>, StateError> {
        self.all(Tree::Jobs)
    }

    /// Stores a run.
    pub fn put_run(&self, record: &RunRecord) -> Result<(), StateError> {
        self.engine
            .insert(Tree::Runs, record.id().as_bytes(), record.encode_to_vec())
    }

    /// One run by exact id.
    pub fn run(&self, id: &str) -> Result<Option<RunRecord>, StateError> {
        self.one(Tree::Runs, id.as_bytes())
    }

    /// The run whose id is `prefix` or starts with it.
    pub fn run_by_prefix(
        &self,
        prefix: &str,
    ) -> Result<Result<Option<RunRecord>, AmbiguousPrefix>, StateError> {
        if let Some(record) = self.run(prefix)? {
            return Ok(Ok(Some(record)));
        }
        let matches = self.first(
            Tree::Runs,
            &KeyRange::prefix(prefix.as_bytes()),
            Order::Ascending,
            2,
        )?;
        match matches.as_slice() {
            [] => Ok(Ok(None)),
            [(key, value)] => Ok(Ok(Some(decode("runs", key, value)?))),
            [(first, _), (second, _), ..] => Ok(Err(AmbiguousPrefix {
                prefix: prefix.to_owned(),
                first: String::from_utf8_lossy(first).into_owned(),
                second: String::from_utf8_lossy(second).into_owned(),
            })),
        }
    }

    /// The length of the shortest prefix of run `id` that no other run
    /// starts with, at least `minimum`: one more than the longest prefix
    /// it shares with its neighbours in id order.
    pub fn run_unique_prefix_len(&self, id: &str, minimum: usize) -> Result<usize, StateError> {
        let shared = |neighbour: Option<&KeyValue>| {
            neighbour.map_or(0, |(key, _)| {
                key.iter()
                    .zip(id.as_bytes())
                    .take_while(|(a, b)| a == b)
                    .count()
            })
        };
        let before = self.first(
            Tree::Runs,
            &KeyRange::before(id.as_bytes()),
            Order::Descending,
            1,
        )?;
        let mut after_key = id.as_bytes().to_vec();
        after_key.push(0);
        let after = self.first(Tree::Runs, &KeyRange::from(&after_key), Order::Ascending, 1)?;
        Ok((shared(before.first()).max(shared(after.first())) + 1)
            .max(minimum)
            .min(id.len()))
    }

    /// Visits runs newest first until `visit` returns false.
    pub fn visit_runs_newest_first(
        &self,
        mut visit: impl FnMut(RunRecord) -> bool,
    ) -> Result<(), StateError> {
        let mut failure = None;
        self.engine.scan(
            Tree::Runs,
            &KeyRange::all(),
            Order::Descending,
            &mut |key, value| match decode("runs", key, value) {
                Ok(record) => visit(record),
                Err(error) => {
                    failure = Some(error);
                    false
                }
            },
        )?;
        failure.map_or(Ok(()), Err)
    }

    /// Appends an event to its run's history, giving it the next sequence
    /// number (from 1); returns it as stored.
    pub fn append_event(&self, mut event: RunEvent) -> Result<RunEvent, StateError> {
        let last = self.first(
            Tree::Events,
            &KeyRange::prefix(&event_prefix(&event.run_id)),
            Order::Descending,
            1,
        )?;
        let last_seq = match last.first() {
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
        self.engine.insert(
            Tree::Events,
            &event_key(&event.run_id, event.seq),
            event.encode_to_vec(),
        )?;
        Ok(event)
    }

    /// A run's events, oldest first, from sequence `after + 1` on.
    pub fn events(&self, run_id: &str, after: u64) -> Result<Vec<RunEvent>, StateError> {
        let range = KeyRange {
            start: Some(event_key(run_id, after.saturating_add(1))),
            end: KeyRange::prefix(&event_prefix(run_id)).end,
        };
        let mut events = Vec::new();
        let mut failure = None;
        self.engine.scan(
            Tree::Events,
            &range,
            Order::Ascending,
            &mut |key, value| match decode("events", key, value) {
                Ok(event) => {
                    events.push(event);
                    true
                }
                Err(error) => {
                    failure = Some(error);
                    false
                }
            },
        )?;
        failure.map_or(Ok(events), Err)
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
        let mut entry: CatalogEntry = match self.engine.get(Tree::Catalog, &key)? {
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
        self.engine
            .insert(Tree::Catalog, &key, entry.encode_to_vec())?;
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
        self.engine
            .insert(Tree::Catalog, &key, entry.encode_to_vec())?;
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
        let mut changed = Vec::new();
        let mut failure = None;
        self.engine.scan(
            Tree::Catalog,
            &KeyRange::all(),
            Order::Ascending,
            &mut |key, value| {
                let mut entry: CatalogEntry = match decode("catalog", key, value) {
                    Ok(entry) => entry,
                    Err(error) => {
                        failure = Some(error);
                        return false;
                    }
                };
                let Some(copy) = entry
                    .copies
                    .iter_mut()
                    .find(|copy| copy.node == node && !copy.damage.is_empty())
                else {
                    return true;
                };
                copy.damage.clear();
                if let Some(snapshot) = entry.snapshot.as_mut()
                    && snapshot.state() == fabric_proto::v1::SnapshotState::Damaged
                {
                    snapshot.set_state(fabric_proto::v1::SnapshotState::Complete);
                }
                changed.push((key.to_vec(), entry));
                true
            },
        )?;
        if let Some(error) = failure {
            return Err(error);
        }
        let cleared = changed.len() as u64;
        for (key, entry) in changed {
            self.engine
                .insert(Tree::Catalog, &key, entry.encode_to_vec())?;
        }
        Ok(cleared)
    }

    /// The catalogue entry of snapshot `id`, if any (a scan: the catalogue
    /// is keyed by start time).
    pub fn catalog_entry(&self, id: &str) -> Result<Option<CatalogEntry>, StateError> {
        Ok(self.find_catalog_entry(id)?.map(|(_, entry)| entry))
    }

    /// The key and entry of snapshot `id` in the catalogue (a scan).
    fn find_catalog_entry(&self, id: &str) -> Result<Option<(Vec<u8>, CatalogEntry)>, StateError> {
        let mut found = None;
        let mut failure = None;
        self.engine.scan(
            Tree::Catalog,
            &KeyRange::all(),
            Order::Ascending,
            &mut |key, value| match decode::<CatalogEntry>("catalog", key, value) {
                Ok(entry) if entry.snapshot.as_ref().is_some_and(|s| s.id == id) => {
                    found = Some((key.to_vec(), entry));
                    false
                }
                Ok(_) => true,
                Err(error) => {
                    failure = Some(error);
                    false
                }
            },
        )?;
        failure.map_or(Ok(found), Err)
    }

    /// Records that `node` no longer holds snapshot `id`; the entry goes
    /// with its last copy. Returns whether anything changed.
    pub fn remove_catalog_copy(&self, id: &str, node: &str) -> Result<bool, StateError> {
        let Some((key, mut entry)) = self.find_catalog_entry(id)? else {
            return Ok(false);
        };
        let before = entry.copies.len();
        entry.copies.retain(|copy| copy.node != node);
        if entry.copies.len() == before {
            return Ok(false);
        }
        if entry.copies.is_empty() {
            self.engine.remove(Tree::Catalog, &key)?;
        } else {
            self.engine
                .insert(Tree::Catalog, &key, entry.encode_to_vec())?;
        }
        Ok(true)
    }

    /// The catalogue, oldest first.
    pub fn catalog(&self) -> Result<Vec<CatalogEntry>, StateError> {
        self.all(Tree::Catalog)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_proto::v1::NodeInfo;

    #[tokio::test]
    async fn the_sled_engine_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(sled_engine::SledEngine::open(dir.path()).unwrap());
        let store = Store::new(engine.clone());
        conformance::run_all(&store, engine.as_ref()).await;
    }

    #[tokio::test]
    async fn everything_survives_a_reopen() {
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
            conformance::events_are_numbered_per_run(&store);
            conformance::catalog_is_ordered_by_start_time_even_before_the_epoch(&store);
            store.flush().await.unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.nodes().unwrap().len(), 1);
        assert_eq!(store.events("0001aa", 0).unwrap().len(), 3);
        assert_eq!(store.catalog().unwrap().len(), 3);
    }
}
