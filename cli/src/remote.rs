//! Reaching the coordinator and the nodes, with errors that say what to do,
//! and finding where a snapshot lives. [`Remote`] holds how this
//! `fabricctl` talks: the coordinators' addresses, its TLS material (or
//! `--insecure-plaintext`) and its bearer token.
//!
//! Given several coordinators (`--coordinator https://c1:7400,https://c2:7400`),
//! every coordinator call goes to the one that leads: a call refused by a
//! coordinator that does not lead, or whose connection cannot be made, is
//! sent again to the leader the refusal names, else to the next address,
//! for up to [`FAILOVER_PATIENCE`] (see
//! [`fabric_node::coordinator_channel`]).

use std::sync::OnceLock;

use anyhow::{Context, anyhow, bail};
use fabric_node::client::Peer;
use fabric_node::coordinator_channel::{
    Attempt, CoordinatorChannel, FAILOVER_PATIENCE, describe_attempts,
};
use fabric_proto::coordinator_addresses::CoordinatorAddresses;
use fabric_proto::v1::coordinator_client::CoordinatorClient;
use fabric_proto::v1::storage_client::StorageClient;
use fabric_proto::v1::{CatalogEntry, ListCatalogRequest, ListNodesRequest, Node, NodeState};
use fabric_trust::transport::TransportSettings;
use fabric_trust::{BearerToken, Transport};
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::revision;

/// A coordinator client whose calls go to the leading coordinator and
/// carry the token, if any.
pub type Coordinator = CoordinatorClient<InterceptedService<CoordinatorChannel, BearerToken>>;

/// How this process reaches the fabric.
#[derive(Debug)]
pub struct Remote {
    /// The coordinators' addresses, comma-separated, as given.
    pub coordinator: String,
    settings: TransportSettings,
    token: Option<String>,
    transport: OnceLock<Transport>,
    /// The channel to the leader, once a first coordinator took a
    /// connection; shared by every client this process makes.
    leader: tokio::sync::OnceCell<CoordinatorChannel>,
}

impl Remote {
    /// From the command line: the coordinator's address, the TLS files (or
    /// plaintext) and a token; nothing is read until a command dials.
    pub fn new(coordinator: String, settings: TransportSettings, token: Option<String>) -> Self {
        Self {
            coordinator,
            settings,
            token: token.filter(|token| !token.trim().is_empty()),
            transport: OnceLock::new(),
            leader: tokio::sync::OnceCell::new(),
        }
    }

    /// The embedded fabric's: its address and an already loaded transport.
    pub fn with_transport(coordinator: String, transport: Transport) -> Self {
        let remote = Self::new(coordinator, TransportSettings::default(), None);
        let _ = remote.transport.set(transport);
        remote
    }

    /// The transport, loaded at first use.
    pub fn transport(&self) -> anyhow::Result<&Transport> {
        if let Some(transport) = self.transport.get() {
            return Ok(transport);
        }
        let loaded = self.settings.client().map_err(|err| {
            anyhow!(
                "{err} (fabricctl takes --tls-ca, --tls-cert, --tls-key and --token, or FABRIC_TLS_CA, FABRIC_TLS_CERT, FABRIC_TLS_KEY and FABRIC_TOKEN)"
            )
        })?;
        if self.token.is_none() && loaded.identity().is_none() && loaded.is_tls() {
            tracing::debug!("no client certificate and no token: only health checks will pass");
        }
        Ok(self.transport.get_or_init(|| loaded))
    }

    /// A coordinator client whose calls follow the leader, or an error
    /// naming every address and why it could not be reached, with a hint.
    pub async fn coordinator(&self) -> anyhow::Result<Coordinator> {
        let addresses = CoordinatorAddresses::parse(&self.coordinator)
            .map_err(|err| anyhow!("--coordinator / FABRIC_COORDINATOR: {err}"))?;
        let transport = self.transport()?;
        let token = BearerToken::new(self.token.as_deref())
            .map_err(|err| anyhow!("--token / FABRIC_TOKEN: {err}"))?;
        let channel = self
            .leader
            .get_or_try_init(|| async move {
                CoordinatorChannel::connect(addresses, transport.clone(), FAILOVER_PATIENCE)
                    .await
                    .map_err(|attempts| unreachable_error(&attempts))
            })
            .await?
            .clone();
        Ok(CoordinatorClient::with_interceptor(channel, token)
            .max_decoding_message_size(fabric_node::transfer::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(fabric_node::transfer::MAX_MESSAGE_BYTES))
    }

    /// A storage client for `node`.
    pub async fn storage(&self, node: &Peer) -> anyhow::Result<StorageClient<Channel>> {
        Ok(fabric_node::client::storage(node, self.transport()?).await?)
    }
}

/// No coordinator took a connection: each address and why, and what to do.
fn unreachable_error(attempts: &[Attempt]) -> anyhow::Error {
    let tried = describe_attempts(attempts);
    let hint = if tried.contains("certificate is for node/") {
        "that is a node's address: give the coordinator's, see --coordinator"
    } else if attempts.len() > 1 {
        "is one running? see --coordinator"
    } else {
        "is it running? see --coordinator"
    };
    if attempts.len() > 1 {
        anyhow!("cannot reach any coordinator: {tried} ({hint})")
    } else {
        anyhow!("cannot reach the coordinator at {tried} ({hint})")
    }
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
pub async fn node_address(client: &mut Coordinator, id: &str) -> anyhow::Result<String> {
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
pub async fn nodes(client: &mut Coordinator) -> anyhow::Result<Vec<Node>> {
    Ok(client
        .list_nodes(ListNodesRequest {})
        .await
        .map_err(|status| status_error("listing nodes", status))?
        .into_inner()
        .nodes)
}

/// The catalogue, filtered.
pub async fn catalog(
    client: &mut Coordinator,
    job: Option<String>,
    host: Option<String>,
) -> anyhow::Result<Vec<CatalogEntry>> {
    Ok(catalog_with_quotas(client, job, host).await?.entries)
}

/// The catalogue entries and the quotas of their jobs.
pub async fn catalog_with_quotas(
    client: &mut Coordinator,
    job: Option<String>,
    host: Option<String>,
) -> anyhow::Result<fabric_proto::v1::ListCatalogResponse> {
    Ok(client
        .list_catalog(ListCatalogRequest {
            job: job.unwrap_or_default(),
            host: host.unwrap_or_default(),
        })
        .await
        .map_err(|status| status_error("listing snapshots", status))?
        .into_inner())
}

/// Where to read a snapshot from: (node address, the snapshot's id there).
pub struct Located {
    /// The node, with the identity it must prove.
    pub peer: Peer,
    /// The snapshot's id on that node.
    pub snapshot_id: String,
    /// The node's id, for messages.
    pub node: String,
}

/// Find the one snapshot `spec` names (a revision spec) and an online node
/// holding it (`node` if given).
pub async fn locate(
    remote: &Remote,
    spec: &str,
    node: Option<String>,
    job: Option<String>,
) -> anyhow::Result<Located> {
    let mut all = locate_all(remote, spec, node, job).await?;
    Ok(all.remove(0))
}

/// Every copy of the one snapshot `spec` names (a revision spec), the
/// online holders first, then those the coordinator does not see online
/// (they may still answer); only `node`'s when given. Never empty: with
/// no online holder it is an error naming the holders.
pub async fn locate_all(
    remote: &Remote,
    spec: &str,
    node: Option<String>,
    job: Option<String>,
) -> anyhow::Result<Vec<Located>> {
    if let Some(address) = node.as_deref().filter(|n| is_address(n)) {
        let mut storage = remote.storage(&Peer::any_node(address)).await?;
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
        return Ok(vec![Located {
            peer: Peer::any_node(address),
            snapshot_id: snapshot.id.clone(),
            node: address.to_owned(),
        }]);
    }
    let mut client = remote.coordinator().await?;
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
    let known = |id: &str| {
        nodes
            .iter()
            .find(|n| n.info.as_ref().is_some_and(|i| i.id == id))
    };
    let mut online = Vec::new();
    let mut others = Vec::new();
    for copy in copies {
        if node.as_deref().is_some_and(|wanted| wanted != copy.node) {
            continue;
        }
        let Some(found) = known(&copy.node) else {
            continue;
        };
        let address = found
            .info
            .as_ref()
            .map(|i| i.address.clone())
            .unwrap_or_default();
        let located = Located {
            peer: Peer::node(&copy.node, &address),
            snapshot_id: copy.snapshot_id.clone(),
            node: copy.node.clone(),
        };
        if found.state() == NodeState::Online {
            online.push(located);
        } else {
            others.push(located);
        }
    }
    // Copies on online nodes first, then on nodes the coordinator lost
    // (they may still answer). With no online holder at all, the caller
    // hears that plainly instead of waiting on nodes that are likely down.
    if !online.is_empty() {
        online.extend(others);
        return Ok(online);
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

/// What a jobs file is called in messages when it comes from stdin.
pub const STDIN_NAME: &str = "<stdin>";

/// Read a jobs file, or stdin for `-`: its text and the name messages
/// give it (`<stdin>` for stdin).
pub fn read_jobs_file(path: &std::path::Path) -> anyhow::Result<(String, String)> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .with_context(|| format!("cannot read the jobs file from {STDIN_NAME}"))?;
        return Ok((text, STDIN_NAME.to_owned()));
    }
    Ok((read_file(path)?, path.display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::{Attempt, unreachable_error};

    fn refused(address: &str) -> Attempt {
        Attempt {
            address: address.into(),
            reason: "transport error: tcp connect error: Connection refused (os error 111)".into(),
            answered: false,
        }
    }

    #[test]
    fn an_unreachable_coordinator_is_named_with_what_to_do() {
        assert_eq!(
            unreachable_error(&[refused("http://127.0.0.1:1")]).to_string(),
            "cannot reach the coordinator at http://127.0.0.1:1: connection refused (is it running? see --coordinator)"
        );
        assert_eq!(
            unreachable_error(&[refused("https://c1:7400"), refused("https://c2:7400")])
                .to_string(),
            "cannot reach any coordinator: https://c1:7400: connection refused; https://c2:7400: connection refused (is one running? see --coordinator)"
        );
        let node = Attempt {
            address: "https://127.0.0.1:7401".into(),
            reason: "transport error: invalid peer certificate: Other(OtherError(Reason(\"the server's certificate is for node/n1, but a coordinator was expected\")))".into(),
            answered: false,
        };
        assert_eq!(
            unreachable_error(&[node]).to_string(),
            "cannot reach the coordinator at https://127.0.0.1:7401: the server's certificate is for node/n1, but a coordinator was expected (that is a node's address: give the coordinator's, see --coordinator)"
        );
    }
}
