//! Reaching the coordinator and the nodes, with errors that say what to do,
//! and finding where a snapshot lives.

use anyhow::{Context, anyhow, bail};
use fabric_proto::v1::coordinator_client::CoordinatorClient;
use fabric_proto::v1::{CatalogEntry, ListCatalogRequest, ListNodesRequest, Node, NodeState};
use tonic::Status;
use tonic::transport::Channel;

use crate::revision;

/// A coordinator client, or an error naming the address and a hint.
pub async fn coordinator(address: &str) -> anyhow::Result<CoordinatorClient<Channel>> {
    let channel = fabric_node::client::channel(address).await.map_err(|err| {
        anyhow!(
            "cannot reach the coordinator at {address}: {} (is it running? see --coordinator)",
            short_reason(&err.reason)
        )
    })?;
    Ok(CoordinatorClient::new(channel)
        .max_decoding_message_size(fabric_node::transfer::MAX_MESSAGE_BYTES))
}

/// The last, most specific part of a transport error chain
/// ("connection refused" rather than "transport error: ...").
fn short_reason(reason: &str) -> String {
    let last = reason.rsplit(": ").next().unwrap_or(reason);
    let last = last.split(" (os error").next().unwrap_or(last);
    last.to_lowercase()
}

/// A status as a sentence naming what was asked.
pub fn status_error(what: &str, status: Status) -> anyhow::Error {
    anyhow!("{what}: {}", fabric_node::agent::describe_status(&status))
}

/// Whether `node` looks like an address rather than a node id.
pub fn is_address(node: &str) -> bool {
    node.contains("://") || node.contains(':')
}

/// The address of node `id` (online), from the coordinator.
pub async fn node_address(
    client: &mut CoordinatorClient<Channel>,
    id: &str,
) -> anyhow::Result<String> {
    let nodes = nodes(client).await?;
    let node = nodes
        .iter()
        .find(|node| node.info.as_ref().is_some_and(|info| info.id == id))
        .ok_or_else(|| {
            anyhow!(
                "unknown node {id:?}: known nodes are {}",
                nodes
                    .iter()
                    .filter_map(|n| n.info.as_ref().map(|i| i.id.clone()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    Ok(node
        .info
        .as_ref()
        .map(|i| i.address.clone())
        .unwrap_or_default())
}

/// Every node the coordinator knows.
pub async fn nodes(client: &mut CoordinatorClient<Channel>) -> anyhow::Result<Vec<Node>> {
    Ok(client
        .list_nodes(ListNodesRequest {})
        .await
        .map_err(|status| status_error("listing nodes", status))?
        .into_inner()
        .nodes)
}

/// The catalogue, filtered.
pub async fn catalog(
    client: &mut CoordinatorClient<Channel>,
    job: Option<String>,
    host: Option<String>,
) -> anyhow::Result<Vec<CatalogEntry>> {
    Ok(client
        .list_catalog(ListCatalogRequest {
            job: job.unwrap_or_default(),
            host: host.unwrap_or_default(),
        })
        .await
        .map_err(|status| status_error("listing snapshots", status))?
        .into_inner()
        .entries)
}

/// Where to read a snapshot from: (node address, the snapshot's id there).
pub struct Located {
    /// The node's address.
    pub address: String,
    /// The snapshot's id on that node.
    pub snapshot_id: String,
    /// The node's id, for messages.
    pub node: String,
}

/// Find the one snapshot `spec` names (a revision spec) and an online node
/// holding it (`node` if given).
pub async fn locate(
    coordinator_address: &str,
    spec: &str,
    node: Option<String>,
    job: Option<String>,
) -> anyhow::Result<Located> {
    if let Some(address) = node.as_deref().filter(|n| is_address(n)) {
        let mut storage = fabric_node::client::storage(address).await?;
        let snapshots = storage
            .list_snapshots(fabric_proto::v1::ListSnapshotsRequest {
                job: job.unwrap_or_default(),
                host: String::new(),
            })
            .await
            .map_err(|status| status_error(&format!("listing snapshots on {address}"), status))?
            .into_inner()
            .snapshots;
        let found = revision::find(&snapshots, spec, |s| s)?;
        let snapshot = single(found, spec)?;
        return Ok(Located {
            address: address.to_owned(),
            snapshot_id: snapshot.id.clone(),
            node: address.to_owned(),
        });
    }
    let mut client = coordinator(coordinator_address).await?;
    let entries: Vec<(
        fabric_proto::v1::Snapshot,
        Vec<fabric_proto::v1::CatalogCopy>,
    )> = catalog(&mut client, job, None)
        .await?
        .into_iter()
        .filter_map(|entry| entry.snapshot.map(|snapshot| (snapshot, entry.copies)))
        .collect();
    let found = revision::find(&entries, spec, |(snapshot, _)| snapshot)?;
    let (_, copies) = single(found, spec)?;
    let nodes = nodes(&mut client).await?;
    let online = |id: &str| {
        nodes
            .iter()
            .find(|n| n.info.as_ref().is_some_and(|i| i.id == id) && n.state() == NodeState::Online)
    };
    for copy in copies {
        if node.as_deref().is_some_and(|wanted| wanted != copy.node) {
            continue;
        }
        if let Some(found) = online(&copy.node) {
            return Ok(Located {
                address: found
                    .info
                    .as_ref()
                    .map(|i| i.address.clone())
                    .unwrap_or_default(),
                snapshot_id: copy.snapshot_id.clone(),
                node: copy.node.clone(),
            });
        }
    }
    let holders: Vec<&str> = copies.iter().map(|c| c.node.as_str()).collect();
    match node {
        Some(node) => bail!(
            "snapshot {spec} is not on an online node {node:?} (it is on: {})",
            holders.join(", ")
        ),
        None => bail!(
            "no online node holds snapshot {spec} (it is on: {})",
            holders.join(", ")
        ),
    }
}

fn single<'a, T>(mut found: Vec<&'a T>, spec: &str) -> anyhow::Result<&'a T> {
    match found.len() {
        0 => bail!("no snapshot matches {spec:?}"),
        1 => Ok(found.remove(0)),
        n => bail!("{n} snapshots match {spec:?}: give a longer id prefix"),
    }
}

/// Read a jobs file, naming it in the error.
pub fn read_file(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}
