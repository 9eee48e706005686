//! The engine's node registry: who may claim a node id, registrations,
//! heartbeats, and the views the planner and the sessions use. Part of
//! [`super::Inner`]; it never plans or changes a run.

use fabric_proto::v1::{HealthReason, HealthReasonKind, NodeHealth};

use super::*;

impl Inner {
    /// Whether the (certified) node `info.id` may register or open a
    /// session as `info` says: not while another process holds a live
    /// session for that id (it would take over its address and its runs),
    /// and not as a storage node if it first registered without storage (a
    /// compromised agent must not attract other hosts' replicas).
    pub(super) fn check_claim(
        &self,
        info: &NodeInfo,
        now: i64,
        lost_after: Duration,
    ) -> Result<(), EngineError> {
        let storage = NodeRole::Storage as i32;
        if let Some(known) = self.nodes.get(&info.id).and_then(|node| node.info.as_ref())
            && !known.roles.contains(&storage)
            && info.roles.contains(&storage)
        {
            tracing::warn!(node = %info.id, "a node that registered without storage claimed it");
            return Err(EngineError::PermissionDenied(format!(
                "node {} registered without the storage role and cannot take it on later (a compromised agent must not receive replicas): give the storage node an id and a certificate of its own",
                info.id
            )));
        }
        if !info.roles.contains(&storage) {
            // An agent's host name decides whose snapshots it may read on
            // the storage nodes: it may neither change nor be another's.
            let claimed = effective_hostname(info);
            if let Some(known) = self.nodes.get(&info.id).and_then(|node| node.info.as_ref())
                && effective_hostname(known) != claimed
            {
                return Err(EngineError::PermissionDenied(format!(
                    "node {} registered with host name {:?} and cannot change it to {claimed:?} (its snapshots and what it may read follow it): give it a new node id",
                    info.id,
                    effective_hostname(known)
                )));
            }
            if let Some(holder) = self.nodes.iter().find_map(|(id, node)| {
                let other = node.info.as_ref()?;
                (id != &info.id && effective_hostname(other) == claimed).then_some(id)
            }) {
                tracing::warn!(node = %info.id, holder = %holder, "a node claimed another node's host name");
                return Err(EngineError::PermissionDenied(format!(
                    "node {} claims host name {claimed:?}, which node {holder} has: an agent may read only its own host's snapshots, so host names are not shared",
                    info.id
                )));
            }
        }
        if let Some(session) = self.sessions.get(&info.id)
            && !session.sender.is_closed()
        {
            let last_seen = self.last_seen.get(&info.id).copied().unwrap_or(0);
            let silent = now.saturating_sub(last_seen);
            if silent < millis(lost_after) {
                tracing::warn!(node = %info.id, "a second process for a node id with a live session was refused");
                return Err(EngineError::PermissionDenied(format!(
                    "node {} already has a live session (last heard {silent} ms ago): a second process with this id is refused; it can take over once that session ends or the node is lost",
                    info.id
                )));
            }
        }
        Ok(())
    }

    pub(super) fn upsert_node(&mut self, mut info: NodeInfo, now: i64) -> Result<(), StateError> {
        info.active_runs.clear();
        let id = info.id.clone();
        let node = self.nodes.entry(id.clone()).or_default();
        node.info = Some(info);
        node.state = NodeState::Online as i32;
        node.last_heartbeat_ms = now;
        let node = node.clone();
        self.last_seen.insert(id, now);
        self.store.put_node(&node)
    }

    pub(super) fn heartbeat(
        &mut self,
        node_id: &str,
        heartbeat: &fabric_proto::v1::Heartbeat,
        now: i64,
    ) -> Result<(), StateError> {
        self.last_seen.insert(node_id.to_owned(), now);
        self.gc.heartbeat(node_id, heartbeat.gc_lease_id);
        let Some(node) = self.nodes.get_mut(node_id) else {
            return Ok(());
        };
        if node.state() == NodeState::Lost {
            tracing::info!(node = %node_id, "node is back");
        }
        node.state = NodeState::Online as i32;
        node.last_heartbeat_ms = now;
        node.chunks = heartbeat.chunks;
        node.stored_bytes = heartbeat.stored_bytes;
        node.quota_usage.clone_from(&heartbeat.quota_usage);
        node.job_usage.clone_from(&heartbeat.job_usage);
        // Logged when the reasons change, not their figures (free space
        // moves with every heartbeat).
        if node.refuses_writes.is_empty() != heartbeat.refuses_writes.is_empty()
            || reason_kinds(node.health.as_ref()) != reason_kinds(heartbeat.health.as_ref())
        {
            if heartbeat.refuses_writes.is_empty() {
                tracing::info!(node = %node_id, "node accepts writes again");
            } else {
                tracing::warn!(node = %node_id, why = %heartbeat.refuses_writes, "node refuses writes: no copy is planned to it");
            }
        }
        node.refuses_writes.clone_from(&heartbeat.refuses_writes);
        node.health.clone_from(&heartbeat.health);
        if let Some(info) = node.info.as_mut() {
            info.free_bytes = heartbeat.free_bytes;
        }
        let damaged: Vec<Vec<u8>> = heartbeat
            .scrub
            .as_ref()
            .map(|scrub| scrub.damaged_ids.clone())
            .unwrap_or_default();
        node.scrub = heartbeat.scrub.clone().map(|mut scrub| {
            scrub.damaged_ids.clear();
            scrub
        });
        let node = node.clone();
        self.store.put_node(&node)?;
        if !damaged.is_empty() {
            self.ask_repair(node_id, damaged, now);
        }
        Ok(())
    }

    /// What job `job`'s snapshots take on all storage nodes, as each last
    /// counted.
    pub(super) fn job_used_bytes(&self, job: &str) -> u64 {
        self.nodes
            .values()
            .flat_map(|node| &node.job_usage)
            .filter(|usage| usage.job == job)
            .map(|usage| usage.stored_bytes)
            .fold(0, u64::saturating_add)
    }

    /// The bytes a run of `spec` may still store, when it has a quota.
    pub(super) fn quota_left(&self, spec: &JobSpec) -> Option<u64> {
        (spec.quota_bytes > 0).then(|| {
            spec.quota_bytes
                .saturating_sub(self.job_used_bytes(&spec.name))
        })
    }

    /// Why a job's `replicas` cannot be met by the storage nodes this
    /// fabric has (each replica on a node, or with `spread_by` in a failure
    /// domain, of its own; drained nodes do not count), if it cannot.
    pub(super) fn replicas_problem(&self, spec: &JobSpec) -> Option<String> {
        let wanted = spec.replicas as usize;
        if wanted == 0 {
            return None;
        }
        let storage: Vec<(&String, &Node)> = self
            .nodes
            .iter()
            .filter(|(_, node)| is_storage(node) && node.draining_since_ms == 0)
            .collect();
        if spec.spread_by.is_empty() {
            return (storage.len() < wanted).then(|| {
                format!(
                    "replicas = {wanted} needs {wanted} storage nodes, the fabric has {}{}",
                    storage.len(),
                    listed(storage.iter().map(|(id, _)| id.as_str()))
                )
            });
        }
        let domains: std::collections::BTreeSet<&str> = storage
            .iter()
            .filter_map(|(_, node)| {
                let labels = node.info.as_ref().map(|info| info.labels.as_slice())?;
                crate::dest::domain_of(labels, &spec.spread_by)
            })
            .collect();
        (domains.len() < wanted).then(|| {
            format!(
                "replicas = {wanted} with spread_by = {:?} needs storage nodes in {wanted} {} domains, the fabric has {}{}",
                spec.spread_by,
                spec.spread_by,
                domains.len(),
                listed(domains.iter().copied())
            )
        })
    }

    pub(super) fn known_nodes(&self) -> KnownNodes {
        let mut known = KnownNodes::default();
        for (id, node) in &self.nodes {
            known.ids.insert(id.clone());
            if let Some(info) = node.info.as_ref() {
                known.labels.extend(info.labels.iter().cloned());
            }
        }
        known
    }

    pub(super) fn node_views(&self) -> Vec<NodeView> {
        self.nodes
            .iter()
            .map(|(id, node)| NodeView {
                id: id.clone(),
                labels: node
                    .info
                    .as_ref()
                    .map(|info| info.labels.clone())
                    .unwrap_or_default(),
                // A node that refuses writes, or is being drained, is no
                // destination meanwhile.
                healthy: node.state() == NodeState::Online
                    && self.sessions.contains_key(id)
                    && node.refuses_writes.is_empty()
                    && node.draining_since_ms == 0,
                storage: is_storage(node),
            })
            .collect()
    }

    pub(super) fn address_of(&self, node_id: &str) -> String {
        self.nodes
            .get(node_id)
            .and_then(|node| node.info.as_ref())
            .map(|info| info.address.clone())
            .unwrap_or_default()
    }

    /// Queues `message` for `node_id`'s session; whether it has one. The
    /// message leaves at the next [`Inner::commit`], after the state that
    /// made it is durable.
    pub(super) fn send(&mut self, node_id: &str, message: CoordinatorMessage) -> bool {
        let Some(session) = self.sessions.get(node_id) else {
            return false;
        };
        if session.sender.is_closed() {
            self.sessions.remove(node_id);
            return false;
        }
        self.outbox.push(OutgoingMessage {
            node_id: node_id.to_owned(),
            generation: session.generation,
            message,
        });
        true
    }

    /// Makes every change so far durable, then hands the queued messages to
    /// their sessions. A failed flush keeps them queued: they leave with the
    /// next commit that succeeds, since the writes stay queued too.
    /// `changed`: whether anything was written; with nothing written and
    /// nothing queued there is nothing to do.
    pub(super) async fn commit(&mut self, changed: bool) -> Result<(), StateError> {
        if !changed && self.outbox.is_empty() {
            return Ok(());
        }
        self.store.flush().await?;
        for outgoing in std::mem::take(&mut self.outbox) {
            let Some(session) = self.sessions.get(&outgoing.node_id) else {
                continue;
            };
            // A message for an ended session: the node's next session
            // starts from what it reports, not from this.
            if session.generation != outgoing.generation {
                continue;
            }
            if session.sender.send(outgoing.message).is_err() {
                self.sessions.remove(&outgoing.node_id);
            }
        }
        Ok(())
    }
}

/// The host name a node's snapshots carry: its own, or its id.
fn effective_hostname(info: &NodeInfo) -> &str {
    if info.hostname.is_empty() {
        &info.id
    } else {
        &info.hostname
    }
}

/// ` (a, b, c)`, or nothing for none.
fn listed<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let items: Vec<&str> = items.collect();
    if items.is_empty() {
        String::new()
    } else {
        format!(" ({})", items.join(", "))
    }
}

/// The kinds of `health`'s reasons, in order (none without a health).
fn reason_kinds(health: Option<&NodeHealth>) -> Vec<i32> {
    health
        .map(|health| health.reasons.iter().map(|reason| reason.kind).collect())
        .unwrap_or_default()
}

/// `node` as `ListNodes` shows it: `health` is its own, as of its last
/// heartbeat, with a DRAINING reason (how far the drain got) while it is
/// drained. A node that predates reasons but refuses writes gets its
/// `refuses_writes` sentence as one reason of no kind.
pub(super) fn with_listed_health(mut node: Node) -> Node {
    let mut health = node.health.take().unwrap_or_else(|| NodeHealth {
        refusing_writes: false,
        reasons: if node.refuses_writes.is_empty() {
            Vec::new()
        } else {
            vec![HealthReason {
                kind: HealthReasonKind::Unspecified as i32,
                detail: node.refuses_writes.clone(),
                ..HealthReason::default()
            }]
        },
    });
    if node.draining_since_ms != 0 {
        health.reasons.push(HealthReason {
            kind: HealthReasonKind::Draining as i32,
            detail: node.drain.clone(),
            ..HealthReason::default()
        });
    }
    health.refusing_writes = !health.reasons.is_empty();
    // An agent without reasons says nothing of writes it never takes.
    node.health = (is_storage(&node) || health.refusing_writes).then_some(health);
    node
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage_node() -> Node {
        Node {
            info: Some(NodeInfo {
                id: "n1".into(),
                roles: vec![NodeRole::Storage as i32],
                ..NodeInfo::default()
            }),
            ..Node::default()
        }
    }

    #[test]
    fn a_storage_node_taking_writes_is_listed_with_no_reason() {
        let listed = with_listed_health(storage_node());
        assert_eq!(
            listed.health,
            Some(NodeHealth {
                refusing_writes: false,
                reasons: Vec::new()
            })
        );
    }

    #[test]
    fn a_drained_node_is_listed_refusing_writes_with_the_drain_after_its_own_reasons() {
        let low = HealthReason {
            kind: HealthReasonKind::LowFreeSpace as i32,
            free_bytes: 1,
            min_free_bytes: 2,
            ..HealthReason::default()
        };
        let listed = with_listed_health(Node {
            health: Some(NodeHealth {
                refusing_writes: true,
                reasons: vec![low.clone()],
            }),
            refuses_writes: "1 bytes free, under its min_free_bytes of 2".into(),
            draining_since_ms: 5,
            drain: "3 snapshot(s) left".into(),
            ..storage_node()
        });
        let health = listed.health.unwrap();
        assert!(health.refusing_writes);
        assert_eq!(
            health.reasons,
            [
                low,
                HealthReason {
                    kind: HealthReasonKind::Draining as i32,
                    detail: "3 snapshot(s) left".into(),
                    ..HealthReason::default()
                }
            ]
        );
        // Draining alone refuses writes too: no copy is planned there.
        let drained = with_listed_health(Node {
            draining_since_ms: 5,
            drain: "removable".into(),
            ..storage_node()
        });
        assert!(drained.health.unwrap().refusing_writes);
    }

    #[test]
    fn a_node_that_predates_reasons_has_its_sentence_as_a_reason() {
        let listed = with_listed_health(Node {
            refuses_writes: "the store failed a write: cannot fsync".into(),
            ..storage_node()
        });
        let health = listed.health.unwrap();
        assert!(health.refusing_writes);
        assert_eq!(health.reasons.len(), 1);
        assert_eq!(health.reasons[0].kind(), HealthReasonKind::Unspecified);
        assert_eq!(
            health.reasons[0].detail,
            "the store failed a write: cannot fsync"
        );
    }

    #[test]
    fn an_agent_is_listed_without_health() {
        let agent = Node {
            info: Some(NodeInfo {
                roles: vec![NodeRole::Agent as i32],
                ..NodeInfo::default()
            }),
            ..Node::default()
        };
        assert_eq!(with_listed_health(agent).health, None);
    }
}
