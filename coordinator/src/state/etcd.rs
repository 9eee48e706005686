//! The etcd engine: the state under `PREFIX/state/TREE/KEY` in etcd, for
//! several coordinators of which one leads ([`crate::leadership`]).
//!
//! Only the leader opens it, and only the leader writes, so the leader's
//! copy is the truth: [`EtcdEngine::load`] reads every key once (at one
//! revision), reads are then served from memory, and writes change memory
//! and are queued. [`StateEngine::flush`] sends the queue as transactions,
//! each guarded by the leader's key (its create revision must be the one the
//! election gave): once the lease is gone, etcd refuses the write, the
//! engine answers [`StateError::Fenced`] from then on and says so on
//! [`EtcdEngine::deposed`]. A deposed leader therefore cannot write, even
//! one that was paused past its lease and resumed. The engine never decides
//! who leads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{KeyRange, Order, StateEngine, StateError, Tree};
use crate::etcd::api::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, compare,
    request_op,
};
use crate::etcd::{Etcd, EtcdError, prefix_end};

/// Operations per transaction: etcd refuses more than `--max-txn-ops`
/// (128 by default).
const OPS_PER_TXN: usize = 100;
/// Bytes of keys and values per transaction: etcd refuses requests over
/// `--max-request-bytes` (1.5 MiB by default).
const BYTES_PER_TXN: usize = 1024 * 1024;
/// Keys per page when loading.
const LOAD_PAGE: i64 = 2000;

/// The leader's key and the revision that created it: every write is
/// guarded by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The election's key for this leader (`PREFIX/leader/LEASE`).
    pub key: Vec<u8>,
    /// Its create revision.
    pub create_revision: i64,
}

#[derive(Debug, Default)]
struct Memory {
    trees: BTreeMap<Tree, BTreeMap<Vec<u8>, Vec<u8>>>,
    /// Writes not yet sent: etcd key -> value (`None`: delete).
    queued: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

/// The state in etcd, as the leader holds it.
pub struct EtcdEngine {
    etcd: Etcd,
    /// `PREFIX/state/`.
    state_prefix: Vec<u8>,
    fence: Option<Fence>,
    memory: Mutex<Memory>,
    /// Serializes flushes, so that writes reach etcd in the order they
    /// were queued.
    flushing: tokio::sync::Mutex<()>,
    deposed: watch::Sender<bool>,
}

impl std::fmt::Debug for EtcdEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdEngine")
            .field("prefix", &String::from_utf8_lossy(&self.state_prefix))
            .finish_non_exhaustive()
    }
}

impl EtcdEngine {
    /// Reads the whole state under `prefix` and returns an engine whose
    /// writes are guarded by `fence` (`None`: unguarded, for tools and
    /// tests that own the prefix alone).
    pub async fn load(
        etcd: Etcd,
        prefix: &str,
        fence: Option<Fence>,
    ) -> Result<Arc<Self>, StateError> {
        let state_prefix = format!("{}/state/", prefix.trim_end_matches('/')).into_bytes();
        let mut memory = Memory::default();
        let end = prefix_end(&state_prefix);
        let mut start = state_prefix.clone();
        let mut revision = 0;
        let mut kv = etcd.kv.clone();
        loop {
            let reply = kv
                .range(RangeRequest {
                    key: start.clone(),
                    range_end: end.clone(),
                    limit: LOAD_PAGE,
                    revision,
                    ..Default::default()
                })
                .await
                .map_err(EtcdError::call(format!(
                    "read the state under {}",
                    String::from_utf8_lossy(&state_prefix)
                )))?
                .into_inner();
            if revision == 0 {
                revision = reply.header.map_or(0, |header| header.revision);
            }
            let Some(last) = reply.kvs.last().map(|pair| pair.key.clone()) else {
                break;
            };
            for pair in reply.kvs {
                let (tree, key) = split_key(&state_prefix, &pair.key)?;
                memory
                    .trees
                    .entry(tree)
                    .or_default()
                    .insert(key.to_vec(), pair.value);
            }
            if !reply.more {
                break;
            }
            start = last;
            start.push(0);
        }
        Ok(Arc::new(Self {
            etcd,
            state_prefix,
            fence,
            memory: Mutex::new(memory),
            flushing: tokio::sync::Mutex::new(()),
            deposed: watch::channel(false).0,
        }))
    }

    /// Becomes true once etcd refused a write because the fence is gone.
    pub fn deposed(&self) -> watch::Receiver<bool> {
        self.deposed.subscribe()
    }

    /// Keys held in memory, all trees.
    pub fn key_count(&self) -> usize {
        self.memory().trees.values().map(BTreeMap::len).sum()
    }

    fn memory(&self) -> MutexGuard<'_, Memory> {
        // A panic while holding the lock leaves plain maps: still usable.
        self.memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn etcd_key(&self, tree: Tree, key: &[u8]) -> Vec<u8> {
        let mut full = self.state_prefix.clone();
        full.extend_from_slice(tree.name().as_bytes());
        full.push(b'/');
        full.extend_from_slice(key);
        full
    }

    fn fenced(&self) -> StateError {
        StateError::Fenced {
            key: self
                .fence
                .as_ref()
                .map(|fence| String::from_utf8_lossy(&fence.key).into_owned())
                .unwrap_or_default(),
        }
    }

    async fn send(&self, batch: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), StateError> {
        let compare = self
            .fence
            .iter()
            .map(|fence| Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Create as i32,
                key: fence.key.clone(),
                target_union: Some(compare::TargetUnion::CreateRevision(fence.create_revision)),
                ..Default::default()
            })
            .collect();
        let success = batch
            .iter()
            .map(|(key, value)| RequestOp {
                request: Some(match value {
                    Some(value) => request_op::Request::RequestPut(PutRequest {
                        key: key.clone(),
                        value: value.clone(),
                        ..Default::default()
                    }),
                    None => request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    }),
                }),
            })
            .collect();
        let reply = self
            .etcd
            .kv
            .clone()
            .txn(TxnRequest {
                compare,
                success,
                failure: Vec::new(),
            })
            .await
            .map_err(EtcdError::call(format!(
                "write {} keys of the state",
                batch.len()
            )))?
            .into_inner();
        if !reply.succeeded {
            self.deposed.send_replace(true);
            return Err(self.fenced());
        }
        Ok(())
    }

    async fn flush_queued(&self) -> Result<(), StateError> {
        let _order = self.flushing.lock().await;
        if *self.deposed.borrow() {
            return Err(self.fenced());
        }
        let queued = std::mem::take(&mut self.memory().queued);
        let queued: Vec<(Vec<u8>, Option<Vec<u8>>)> = queued.into_iter().collect();
        let mut sent = 0;
        while sent < queued.len() {
            let mut end = sent;
            let mut bytes = 0;
            while end < queued.len() && end - sent < OPS_PER_TXN {
                let (key, value) = &queued[end];
                let size = key.len() + value.as_ref().map_or(0, Vec::len);
                if end > sent && bytes + size > BYTES_PER_TXN {
                    break;
                }
                bytes += size;
                end += 1;
            }
            if let Err(error) = self.send(&queued[sent..end]).await {
                // Keep what was not sent for the next flush, unless a later
                // write of the same key is queued already.
                let mut memory = self.memory();
                for (key, value) in queued.into_iter().skip(sent) {
                    memory.queued.entry(key).or_insert(value);
                }
                return Err(error);
            }
            sent = end;
        }
        Ok(())
    }
}

/// The tree and key of an etcd key under `state_prefix`.
fn split_key<'a>(state_prefix: &[u8], full: &'a [u8]) -> Result<(Tree, &'a [u8]), StateError> {
    let unknown = || StateError::UnknownKey {
        key: String::from_utf8_lossy(full).into_owned(),
    };
    let rest = full.strip_prefix(state_prefix).ok_or_else(unknown)?;
    let slash = rest
        .iter()
        .position(|byte| *byte == b'/')
        .ok_or_else(unknown)?;
    let name = std::str::from_utf8(&rest[..slash]).map_err(|_| unknown())?;
    let tree = Tree::named(name).ok_or_else(unknown)?;
    Ok((tree, &rest[slash + 1..]))
}

impl StateEngine for EtcdEngine {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self
            .memory()
            .trees
            .get(&tree)
            .and_then(|entries| entries.get(key))
            .cloned())
    }

    fn insert(&self, tree: Tree, key: &[u8], value: Vec<u8>) -> Result<(), StateError> {
        let full = self.etcd_key(tree, key);
        let mut memory = self.memory();
        memory.queued.insert(full, Some(value.clone()));
        memory
            .trees
            .entry(tree)
            .or_default()
            .insert(key.to_vec(), value);
        Ok(())
    }

    fn remove(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let full = self.etcd_key(tree, key);
        let mut memory = self.memory();
        let removed = memory
            .trees
            .get_mut(&tree)
            .and_then(|entries| entries.remove(key));
        if removed.is_some() {
            memory.queued.insert(full, None);
        }
        Ok(removed)
    }

    fn scan(
        &self,
        tree: Tree,
        range: &KeyRange,
        order: Order,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StateError> {
        let Some(bounds) = range.bounds() else {
            return Ok(());
        };
        let memory = self.memory();
        let Some(entries) = memory.trees.get(&tree) else {
            return Ok(());
        };
        let entries = entries.range::<[u8], _>(bounds);
        let mut entries: Box<dyn Iterator<Item = (&Vec<u8>, &Vec<u8>)>> = match order {
            Order::Ascending => Box::new(entries),
            Order::Descending => Box::new(entries.rev()),
        };
        for (key, value) in &mut entries {
            if !visit(key, value) {
                break;
            }
        }
        Ok(())
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StateError>> {
        Box::pin(self.flush_queued())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_their_tree_and_key() {
        let (tree, key) = split_key(b"fabric/state/", b"fabric/state/events/r1/\0\x01").unwrap();
        assert_eq!(tree, Tree::Events);
        assert_eq!(key, b"r1/\0\x01");
        assert!(split_key(b"fabric/state/", b"fabric/state/nope/x").is_err());
        assert!(split_key(b"fabric/state/", b"other/state/jobs/x").is_err());
    }
}
