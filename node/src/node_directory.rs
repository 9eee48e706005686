//! What a storage node knows of the other nodes of its fabric, from the
//! coordinator's `ListNodes`: their addresses (a copy's target is a node
//! id, never an address) and which callers are storage nodes and which are
//! agents, for [`crate::storage_service`]'s scoping.
//!
//! Storage nodes and agents share the certificate role `node`. A storage
//! node calling another (a copy) may touch any snapshot; an agent may touch
//! only its own host's, as the coordinator registered it (the coordinator
//! pins a node's host name and storage role at first registration). A node
//! caller the directory cannot place is scoped to its node id: the
//! directory fails closed. Listings are cached for [`FRESH_FOR`] and asked
//! for again at most once per [`MIN_REFRESH`], so callers cannot make a
//! node hammer its coordinator. This module never decides alone: it
//! describes, the storage service refuses.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric_proto::coordinator_addresses::CoordinatorAddresses;
use fabric_proto::v1::{ListNodesRequest, NodeInfo, NodeRole};
use fabric_trust::Transport;
use tokio::sync::Mutex;
use tonic::Status;

use crate::coordinator_channel::{CoordinatorChannel, FAILOVER_PATIENCE};

/// How long a listing is used without asking again.
pub const FRESH_FOR: Duration = Duration::from_secs(10);
/// The least time between two listings (a miss does not ask again sooner).
pub const MIN_REFRESH: Duration = Duration::from_secs(1);

/// One node as the coordinator registered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownNode {
    /// The address others dial.
    pub address: String,
    /// Whether it keeps a store.
    pub storage: bool,
    /// Its host name (snapshots of its agent carry it).
    pub hostname: String,
}

#[derive(Default)]
struct Cache {
    nodes: HashMap<String, KnownNode>,
    fetched: Option<Instant>,
}

/// The directory of a node's fabric.
#[derive(Clone)]
pub struct NodeDirectory {
    /// The coordinators, reached through whichever leads.
    coordinator: Option<CoordinatorChannel>,
    cache: Arc<Mutex<Cache>>,
}

impl std::fmt::Debug for NodeDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeDirectory")
            .field("coordinator", &self.coordinator)
            .finish_non_exhaustive()
    }
}

fn known(info: NodeInfo) -> (String, KnownNode) {
    let storage = info.roles.contains(&(NodeRole::Storage as i32));
    let hostname = if info.hostname.is_empty() {
        info.id.clone()
    } else {
        info.hostname
    };
    (
        info.id,
        KnownNode {
            address: info.address,
            storage,
            hostname,
        },
    )
}

impl NodeDirectory {
    /// The directory the leader of the `coordinators` (if any) keeps,
    /// asked over `transport`.
    pub fn new(coordinators: Option<CoordinatorAddresses>, transport: Transport) -> Self {
        Self {
            coordinator: coordinators
                .map(|addresses| CoordinatorChannel::new(addresses, transport, FAILOVER_PATIENCE)),
            cache: Arc::default(),
        }
    }

    /// Whether there is no coordinator to ask.
    pub fn is_standalone(&self) -> bool {
        self.coordinator.is_none()
    }

    async fn fetch(&self) -> Result<HashMap<String, KnownNode>, Status> {
        let channel = self.coordinator.clone().ok_or_else(|| {
            Status::failed_precondition("this node has no coordinator to ask about other nodes")
        })?;
        let nodes = fabric_proto::v1::coordinator_client::CoordinatorClient::new(channel)
            .list_nodes(ListNodesRequest {})
            .await
            .map_err(|status| {
                Status::unavailable(format!(
                    "asking the coordinator for its nodes: {}",
                    crate::agent::describe_status(&status)
                ))
            })?
            .into_inner()
            .nodes;
        Ok(nodes
            .into_iter()
            .filter_map(|node| node.info)
            .map(known)
            .collect())
    }

    /// Node `id`, from a listing at most [`FRESH_FOR`] old (asked for
    /// again on a miss, at most once per [`MIN_REFRESH`]).
    pub async fn lookup(&self, id: &str) -> Result<Option<KnownNode>, Status> {
        self.lookup_with(id, false).await
    }

    /// Node `id` from a new listing (waiting until the last one is
    /// [`MIN_REFRESH`] old): for an address that did not answer, as the
    /// node may have restarted on another port.
    pub async fn lookup_again(&self, id: &str) -> Result<Option<KnownNode>, Status> {
        let fetched = self.cache.lock().await.fetched;
        if let Some(wait) = fetched.and_then(|at| MIN_REFRESH.checked_sub(at.elapsed())) {
            tokio::time::sleep(wait).await;
        }
        self.lookup_with(id, true).await
    }

    async fn lookup_with(&self, id: &str, again: bool) -> Result<Option<KnownNode>, Status> {
        let mut cache = self.cache.lock().await;
        let age = cache.fetched.map(|at| at.elapsed());
        let stale = age.is_none_or(|age| age >= FRESH_FOR);
        let may_refresh = age.is_none_or(|age| age >= MIN_REFRESH);
        if stale || ((again || !cache.nodes.contains_key(id)) && may_refresh) {
            match self.fetch().await {
                Ok(nodes) => {
                    cache.nodes = nodes;
                    cache.fetched = Some(Instant::now());
                }
                Err(status) if cache.fetched.is_none() => return Err(status),
                Err(status) => {
                    tracing::warn!(error = %status.message(), "using the last node listing");
                }
            }
        }
        Ok(cache.nodes.get(id).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_is_known_by_its_host_name_and_a_storage_node_as_storage() {
        let (id, node) = known(NodeInfo {
            id: "web1".into(),
            address: "https://web1:7401".into(),
            roles: vec![NodeRole::Agent as i32],
            hostname: "web1.example".into(),
            ..Default::default()
        });
        assert_eq!(id, "web1");
        assert!(!node.storage);
        assert_eq!(node.hostname, "web1.example");
        let (_, storage) = known(NodeInfo {
            id: "n1".into(),
            roles: vec![NodeRole::Storage as i32, NodeRole::Agent as i32],
            ..Default::default()
        });
        assert!(storage.storage);
        assert_eq!(storage.hostname, "n1", "no host name: the id");
    }
}
