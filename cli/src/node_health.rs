//! How `fabricctl node list` shows whether a node takes writes and why
//! not: the state cell of the table (`online, refusing writes: free space
//! 1.2 GiB below min_free 2.0 GiB`) and the `health` object of `-o json`,
//! from `Node.health` (or, from a coordinator that predates it, the
//! `refuses_writes` sentence and the drain). Only formats what the
//! coordinator said.

use fabric_proto::v1::{HealthReason, HealthReasonKind, Node};
use serde::Serialize;

use crate::output::bytes;

/// Whether a node takes writes, for `-o json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HealthCell {
    /// Writes are refused: uploads fail, and no copy is planned there.
    pub refusing_writes: bool,
    /// Why, the one that lasts longest first.
    pub reasons: Vec<ReasonCell>,
}

/// One reason a node refuses writes, for `-o json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReasonCell {
    /// `store_opening`, `low_free_space`, `free_space_unknown`,
    /// `write_failed`, `draining`, or `unspecified` (a reason this
    /// fabricctl does not know: `text` is the node's words).
    pub kind: String,
    /// The reason as the table shows it.
    pub text: String,
    /// `low_free_space`: the free bytes when last measured and the node's
    /// `min_free_bytes` (0 otherwise).
    pub free_bytes: u64,
    pub min_free_bytes: u64,
    /// The error or progress behind it, as the node or coordinator said.
    pub detail: String,
}

impl HealthCell {
    /// `node`'s health as its coordinator lists it.
    pub fn of(node: &Node) -> Self {
        match &node.health {
            Some(health) => Self {
                refusing_writes: health.refusing_writes,
                reasons: health.reasons.iter().map(reason_cell).collect(),
            },
            // A coordinator that predates `health`: what it did say.
            None => {
                let mut reasons = Vec::new();
                if !node.refuses_writes.is_empty() {
                    reasons.push(ReasonCell {
                        kind: "unspecified".to_owned(),
                        text: node.refuses_writes.clone(),
                        free_bytes: 0,
                        min_free_bytes: 0,
                        detail: node.refuses_writes.clone(),
                    });
                }
                if node.draining_since_ms != 0 {
                    reasons.push(reason_cell(&HealthReason {
                        kind: HealthReasonKind::Draining as i32,
                        detail: node.drain.clone(),
                        ..HealthReason::default()
                    }));
                }
                Self {
                    refusing_writes: !reasons.is_empty(),
                    reasons,
                }
            }
        }
    }

    /// The table's state cell: `state` alone, or with `, refusing writes:`
    /// and the reasons.
    pub fn state_cell(&self, state: &str) -> String {
        if !self.refusing_writes {
            return state.to_owned();
        }
        let why: Vec<&str> = self
            .reasons
            .iter()
            .map(|reason| reason.text.as_str())
            .collect();
        if why.is_empty() {
            format!("{state}, refusing writes")
        } else {
            format!("{state}, refusing writes: {}", why.join("; "))
        }
    }
}

fn reason_cell(reason: &HealthReason) -> ReasonCell {
    let kind = reason.kind();
    let detail = &reason.detail;
    let text = match kind {
        HealthReasonKind::StoreOpening => "store still opening".to_owned(),
        HealthReasonKind::LowFreeSpace => format!(
            "free space {} below min_free {}",
            bytes(reason.free_bytes),
            bytes(reason.min_free_bytes)
        ),
        HealthReasonKind::FreeSpaceUnknown => format!("free space unreadable: {detail}"),
        HealthReasonKind::WriteFailed => format!("store write failed: {detail}"),
        HealthReasonKind::Draining if detail.is_empty() => "draining".to_owned(),
        HealthReasonKind::Draining => format!("draining: {detail}"),
        HealthReasonKind::Unspecified if detail.is_empty() => "a reason not given".to_owned(),
        HealthReasonKind::Unspecified => detail.clone(),
    };
    ReasonCell {
        kind: kind
            .as_str_name()
            .strip_prefix("HEALTH_REASON_KIND_")
            .unwrap_or(kind.as_str_name())
            .to_lowercase(),
        text,
        free_bytes: reason.free_bytes,
        min_free_bytes: reason.min_free_bytes,
        detail: detail.clone(),
    }
}

#[cfg(test)]
mod tests {
    use fabric_proto::v1::NodeHealth;

    use super::*;

    fn node_with(reasons: Vec<HealthReason>) -> Node {
        Node {
            health: Some(NodeHealth {
                refusing_writes: !reasons.is_empty(),
                reasons,
            }),
            ..Node::default()
        }
    }

    #[test]
    fn a_node_taking_writes_shows_its_state_alone() {
        let cell = HealthCell::of(&node_with(Vec::new()));
        assert_eq!(cell, HealthCell::default());
        assert_eq!(cell.state_cell("online"), "online");
    }

    #[test]
    fn low_free_space_shows_the_figures() {
        let cell = HealthCell::of(&node_with(vec![HealthReason {
            kind: HealthReasonKind::LowFreeSpace as i32,
            free_bytes: 1_288_490_189,
            min_free_bytes: 2 << 30,
            ..HealthReason::default()
        }]));
        assert!(cell.refusing_writes);
        assert_eq!(cell.reasons[0].kind, "low_free_space");
        assert_eq!(cell.reasons[0].min_free_bytes, 2 << 30);
        assert_eq!(
            cell.state_cell("online"),
            "online, refusing writes: free space 1.2 GiB below min_free 2.0 GiB"
        );
    }

    #[test]
    fn several_reasons_show_in_order() {
        let cell = HealthCell::of(&node_with(vec![
            HealthReason {
                kind: HealthReasonKind::WriteFailed as i32,
                detail: "cannot fsync pack 7: Input/output error".into(),
                ..HealthReason::default()
            },
            HealthReason {
                kind: HealthReasonKind::Draining as i32,
                detail: "removable".into(),
                ..HealthReason::default()
            },
        ]));
        assert_eq!(cell.reasons[0].kind, "write_failed");
        assert_eq!(cell.reasons[1].kind, "draining");
        assert_eq!(
            cell.state_cell("online"),
            "online, refusing writes: store write failed: cannot fsync pack 7: Input/output error; draining: removable"
        );
    }

    #[test]
    fn a_reason_of_a_newer_node_shows_its_words() {
        let cell = HealthCell::of(&node_with(vec![HealthReason {
            kind: 99,
            detail: "something new".into(),
            ..HealthReason::default()
        }]));
        assert_eq!(cell.reasons[0].kind, "unspecified");
        assert_eq!(
            cell.state_cell("lost"),
            "lost, refusing writes: something new"
        );
    }

    #[test]
    fn an_older_coordinator_s_sentence_and_drain_still_show() {
        let cell = HealthCell::of(&Node {
            refuses_writes: "5 bytes free, under its min_free_bytes of 9".into(),
            draining_since_ms: 1,
            drain: "2 snapshot(s) left".into(),
            ..Node::default()
        });
        assert_eq!(
            cell.state_cell("online"),
            "online, refusing writes: 5 bytes free, under its min_free_bytes of 9; draining: 2 snapshot(s) left"
        );
    }
}
