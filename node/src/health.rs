//! Whether this node takes writes now and, when it does not, why.
//!
//! Owns [`NodeHealth`], the node's serving state with its reasons (a pure
//! value: [`NodeHealth::assess`] turns what was measured into it, keeping a
//! failed write once seen), and [`SharedHealth`], the current value that
//! the free-space watcher (`server::watch_health`) sets and the storage
//! service (uploads refused, `Stats`) and the session (heartbeats) read.
//! It never measures, flips readiness or refuses a call itself.

use std::sync::{Arc, Mutex};

use fabric_proto::v1;

/// One reason the node refuses writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthReason {
    /// The store is still being opened at start.
    StoreOpening,
    /// The store's file system has less free space than `min_free_bytes`.
    LowFreeSpace {
        /// Free bytes when measured.
        free_bytes: u64,
        /// The node's `min_free_bytes`.
        min_free_bytes: u64,
    },
    /// The free space of the store's file system cannot be read.
    FreeSpaceUnknown {
        /// Why.
        error: String,
    },
    /// A pack fsync failed: the store refuses writes until it is reopened.
    WriteFailed {
        /// The store's error.
        error: String,
    },
}

impl HealthReason {
    /// The reason as the API carries it.
    pub fn to_proto(&self) -> v1::HealthReason {
        let (kind, detail, free_bytes, min_free_bytes) = match self {
            Self::StoreOpening => (v1::HealthReasonKind::StoreOpening, String::new(), 0, 0),
            Self::LowFreeSpace {
                free_bytes,
                min_free_bytes,
            } => (
                v1::HealthReasonKind::LowFreeSpace,
                String::new(),
                *free_bytes,
                *min_free_bytes,
            ),
            Self::FreeSpaceUnknown { error } => {
                (v1::HealthReasonKind::FreeSpaceUnknown, error.clone(), 0, 0)
            }
            Self::WriteFailed { error } => (v1::HealthReasonKind::WriteFailed, error.clone(), 0, 0),
        };
        v1::HealthReason {
            kind: kind as i32,
            detail,
            free_bytes,
            min_free_bytes,
        }
    }
}

impl std::fmt::Display for HealthReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::StoreOpening => write!(f, "the store is still being opened"),
            Self::LowFreeSpace {
                free_bytes,
                min_free_bytes,
            } => write!(
                f,
                "{free_bytes} bytes free, under its min_free_bytes of {min_free_bytes}"
            ),
            Self::FreeSpaceUnknown { error } => {
                write!(f, "its free space cannot be read: {error}")
            }
            Self::WriteFailed { error } => write!(f, "the store failed a write: {error}"),
        }
    }
}

/// What the free-space watcher measured: the input of
/// [`NodeHealth::assess`].
#[derive(Clone, Debug)]
pub struct Measured {
    /// The free bytes of the store's file system, or why they cannot be
    /// read.
    pub free_bytes: Result<u64, String>,
    /// The node's `min_free_bytes`.
    pub min_free_bytes: u64,
    /// The store's failed-fsync latch (`Store::write_failure`).
    pub write_failure: Option<String>,
}

/// Whether the node takes writes, and every reason it does not.
/// `refuses_writes()` is true exactly when there is a reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeHealth {
    reasons: Vec<HealthReason>,
}

impl NodeHealth {
    /// Taking writes: no reason not to.
    pub fn accepting() -> Self {
        Self {
            reasons: Vec::new(),
        }
    }

    /// At start, before the store is open.
    pub fn opening() -> Self {
        Self {
            reasons: vec![HealthReason::StoreOpening],
        }
    }

    /// The health `measured` gives, after `self`: a failed write seen
    /// before is kept (only a restart clears it), free space counts as
    /// measured now, and the store is open.
    pub fn assess(&self, measured: &Measured) -> Self {
        let mut reasons = Vec::new();
        let latched = self.reasons.iter().find_map(|reason| match reason {
            HealthReason::WriteFailed { error } => Some(error.clone()),
            _ => None,
        });
        if let Some(error) = measured.write_failure.clone().or(latched) {
            reasons.push(HealthReason::WriteFailed { error });
        }
        match &measured.free_bytes {
            Ok(free_bytes) if *free_bytes < measured.min_free_bytes => {
                reasons.push(HealthReason::LowFreeSpace {
                    free_bytes: *free_bytes,
                    min_free_bytes: measured.min_free_bytes,
                });
            }
            Ok(_) => {}
            Err(error) => reasons.push(HealthReason::FreeSpaceUnknown {
                error: error.clone(),
            }),
        }
        Self { reasons }
    }

    /// Whether writes are refused (and health is NOT_SERVING).
    pub fn refuses_writes(&self) -> bool {
        !self.reasons.is_empty()
    }

    /// Why, the one that lasts longest first.
    pub fn reasons(&self) -> &[HealthReason] {
        &self.reasons
    }

    /// Whether `other` has the same kinds of reason, whatever their
    /// figures (free space moves every time it is measured): what is
    /// worth a log line.
    pub fn same_kinds_as(&self, other: &Self) -> bool {
        self.reasons.len() == other.reasons.len()
            && self
                .reasons
                .iter()
                .zip(&other.reasons)
                .all(|(a, b)| std::mem::discriminant(a) == std::mem::discriminant(b))
    }

    /// The reasons in one sentence ("; " between them), empty while the
    /// node takes writes: `Heartbeat.refuses_writes`, and what a refused
    /// upload says.
    pub fn summary(&self) -> String {
        self.reasons
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The health as the API carries it.
    pub fn to_proto(&self) -> v1::NodeHealth {
        v1::NodeHealth {
            refusing_writes: self.refuses_writes(),
            reasons: self.reasons.iter().map(HealthReason::to_proto).collect(),
        }
    }
}

/// The node's current [`NodeHealth`], shared by whoever sets and reads it.
#[derive(Clone, Debug)]
pub struct SharedHealth(Arc<Mutex<NodeHealth>>);

impl SharedHealth {
    /// Starting from `health`.
    pub fn new(health: NodeHealth) -> Self {
        Self(Arc::new(Mutex::new(health)))
    }

    /// The health now.
    pub fn get(&self) -> NodeHealth {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replace it with `assess`'s answer for the health now; returns the
    /// health before and after.
    pub fn update(
        &self,
        assess: impl FnOnce(&NodeHealth) -> NodeHealth,
    ) -> (NodeHealth, NodeHealth) {
        let mut current = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let next = assess(&current);
        let before = std::mem::replace(&mut *current, next.clone());
        (before, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(free_bytes: Result<u64, String>, failure: Option<&str>) -> Measured {
        Measured {
            free_bytes,
            min_free_bytes: 1000,
            write_failure: failure.map(str::to_owned),
        }
    }

    #[test]
    fn a_node_with_room_and_no_failure_takes_writes() {
        let health = NodeHealth::opening().assess(&measured(Ok(1000), None));
        assert!(!health.refuses_writes());
        assert_eq!(health, NodeHealth::accepting());
        assert_eq!(health.summary(), "");
        assert_eq!(
            health.to_proto(),
            v1::NodeHealth {
                refusing_writes: false,
                reasons: Vec::new()
            }
        );
    }

    #[test]
    fn an_opening_store_refuses_writes_until_assessed() {
        let health = NodeHealth::opening();
        assert!(health.refuses_writes());
        assert_eq!(health.reasons(), [HealthReason::StoreOpening]);
        assert_eq!(health.summary(), "the store is still being opened");
        assert_eq!(
            health.to_proto().reasons[0].kind(),
            v1::HealthReasonKind::StoreOpening
        );
    }

    #[test]
    fn low_free_space_refuses_writes_with_the_figures_and_passes_when_space_returns() {
        let low = NodeHealth::accepting().assess(&measured(Ok(999), None));
        assert!(low.refuses_writes());
        assert_eq!(
            low.reasons(),
            [HealthReason::LowFreeSpace {
                free_bytes: 999,
                min_free_bytes: 1000
            }]
        );
        assert_eq!(
            low.summary(),
            "999 bytes free, under its min_free_bytes of 1000"
        );
        let proto = low.to_proto();
        assert!(proto.refusing_writes);
        assert_eq!(proto.reasons[0].kind(), v1::HealthReasonKind::LowFreeSpace);
        assert_eq!(proto.reasons[0].free_bytes, 999);
        assert_eq!(proto.reasons[0].min_free_bytes, 1000);
        let lower = low.assess(&measured(Ok(500), None));
        assert!(lower.same_kinds_as(&low) && lower != low);
        assert!(!low.same_kinds_as(&NodeHealth::opening()));
        assert!(!low.assess(&measured(Ok(1000), None)).refuses_writes());
    }

    #[test]
    fn a_failed_write_is_latched_and_listed_first() {
        let failed = NodeHealth::accepting().assess(&measured(
            Ok(10),
            Some("cannot fsync pack p1: Input/output error"),
        ));
        assert_eq!(
            failed.reasons(),
            [
                HealthReason::WriteFailed {
                    error: "cannot fsync pack p1: Input/output error".into()
                },
                HealthReason::LowFreeSpace {
                    free_bytes: 10,
                    min_free_bytes: 1000
                },
            ]
        );
        // Space freed, and a measurement that no longer carries the
        // failure: the failure stays.
        let later = failed.assess(&measured(Ok(5000), None));
        assert!(later.refuses_writes());
        assert_eq!(
            later.reasons(),
            [HealthReason::WriteFailed {
                error: "cannot fsync pack p1: Input/output error".into()
            }]
        );
        assert_eq!(
            later.summary(),
            "the store failed a write: cannot fsync pack p1: Input/output error"
        );
        let proto = later.to_proto();
        assert_eq!(proto.reasons[0].kind(), v1::HealthReasonKind::WriteFailed);
        assert_eq!(
            proto.reasons[0].detail,
            "cannot fsync pack p1: Input/output error"
        );
    }

    #[test]
    fn unreadable_free_space_refuses_writes_saying_why() {
        let health = NodeHealth::accepting()
            .assess(&measured(Err("No such file or directory".into()), None));
        assert!(health.refuses_writes());
        assert_eq!(
            health.summary(),
            "its free space cannot be read: No such file or directory"
        );
        assert_eq!(
            health.to_proto().reasons[0].kind(),
            v1::HealthReasonKind::FreeSpaceUnknown
        );
    }

    #[test]
    fn shared_health_reports_the_change() {
        let shared = SharedHealth::new(NodeHealth::opening());
        let (before, after) = shared.update(|now| now.assess(&measured(Ok(1), None)));
        assert_eq!(before, NodeHealth::opening());
        assert_eq!(after, shared.get());
        assert!(after.refuses_writes());
    }
}
