//! Per-host quotas of stored bytes on a storage node: what each host's
//! snapshots have added to this node's store, against the limit node.toml
//! sets (`host_quota_bytes`, `[host_quotas]`).
//!
//! A host's usage is the sum of its committed snapshots' `stored_bytes`
//! (the compressed bytes each added when it was committed), so it is
//! counted the same way whoever uploaded the snapshot
//! (`fabric_chunkstore::stored_by_host`). This module owns the limits; the
//! receiver (`transfer::run_receiver`) enforces them during an upload, and
//! the store again at the commit (`CommitGuards::host_quota_bytes`). It must never
//! refuse a transfer by itself: it only answers how much room is left.

use std::collections::BTreeMap;

use fabric_chunkstore::{Store, StoreError, stored_by_host};

/// The quotas of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostQuotas {
    /// The quota of a host without its own (0: none).
    pub default_bytes: u64,
    /// Hosts with their own quota (0: none for that host).
    pub per_host: BTreeMap<String, u64>,
}

impl HostQuotas {
    /// The quota of `host`, if it has one.
    pub fn limit_of(&self, host: &str) -> Option<u64> {
        let limit = self
            .per_host
            .get(host)
            .copied()
            .unwrap_or(self.default_bytes);
        (limit > 0).then_some(limit)
    }

    /// Whether any host has a quota.
    pub fn is_empty(&self) -> bool {
        self.default_bytes == 0 && self.per_host.values().all(|&limit| limit == 0)
    }
}

/// Bytes the snapshots of `host` have added to `store`.
pub fn usage_of(store: &Store, host: &str) -> Result<u64, StoreError> {
    Ok(stored_by_host(&store.list_snapshots()?, host))
}

/// Every host's usage in `store`, with its quota: (host, used, limit).
pub fn usage(
    store: &Store,
    quotas: &HostQuotas,
) -> Result<Vec<(String, u64, Option<u64>)>, StoreError> {
    let mut used: BTreeMap<String, u64> = BTreeMap::new();
    for snapshot in store.list_snapshots()? {
        let bytes = snapshot
            .stats
            .as_ref()
            .map_or(0, |stats| stats.stored_bytes);
        let entry = used.entry(snapshot.host).or_default();
        *entry = entry.saturating_add(bytes);
    }
    Ok(used
        .into_iter()
        .map(|(host, bytes)| {
            let limit = quotas.limit_of(&host);
            (host, bytes, limit)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hosts_own_quota_wins_over_the_default_and_zero_means_none() {
        let quotas = HostQuotas {
            default_bytes: 1000,
            per_host: [("big".to_owned(), 5000), ("free".to_owned(), 0)]
                .into_iter()
                .collect(),
        };
        assert_eq!(quotas.limit_of("web1"), Some(1000));
        assert_eq!(quotas.limit_of("big"), Some(5000));
        assert_eq!(quotas.limit_of("free"), None);
        assert!(!quotas.is_empty());
        assert!(HostQuotas::default().is_empty());
        assert_eq!(HostQuotas::default().limit_of("web1"), None);
    }
}
