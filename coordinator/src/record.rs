//! The coordinator's own persisted record of a run: the public [`Run`] plus
//! the bookkeeping the engine needs to resume it after a restart (what kind
//! of run it is, the job as it was when the run started, the snapshot record
//! every copy commits, the pull orchestration). A prost message like the API's
//! messages, so the sled tree holds one encoding throughout. This module only
//! declares data; the engine owns every change to it.

use fabric_proto::v1::{JobSpec, Run, RunState, Snapshot};

/// What the run asks of its client node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum RunKind {
    /// Never written.
    Unspecified = 0,
    /// The client pushes to the destinations.
    Push = 1,
    /// The client runs the job's instances command; one run per instance follows.
    Expand = 2,
    /// The passive client is pulled by the destinations.
    Pull = 3,
}

/// A retry of a pull copy due at a time.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PullRetry {
    /// The storage node.
    #[prost(string, tag = "1")]
    pub node: String,
    /// When to start it again, ms since the Unix epoch.
    #[prost(int64, tag = "2")]
    pub at_ms: i64,
}

/// A run with the engine's bookkeeping.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RunRecord {
    /// The public view.
    #[prost(message, optional, tag = "1")]
    pub run: Option<Run>,
    /// Push, expand or pull.
    #[prost(enumeration = "RunKind", tag = "2")]
    pub kind: i32,
    /// The job as submitted (for a pull run: the pull job).
    #[prost(message, optional, tag = "3")]
    pub spec: Option<JobSpec>,
    /// Pull runs: the passive twin the client runs.
    #[prost(message, optional, tag = "4")]
    pub passive: Option<JobSpec>,
    /// The record every copy commits; chosen when the run is first assigned.
    #[prost(message, optional, tag = "5")]
    pub snapshot: Option<Snapshot>,
    /// While queued: why it is not assigned yet.
    #[prost(string, tag = "6")]
    pub waiting_for: String,
    /// How many times the client part was sent (the assignment's attempt).
    #[prost(uint32, tag = "7")]
    pub assignments_sent: u32,
    /// The final state the client reported (done, failed, cancelled), if any.
    #[prost(enumeration = "RunState", tag = "8")]
    pub client_final: i32,
    /// Pull runs: the passive client reported ready.
    #[prost(bool, tag = "9")]
    pub ready: bool,
    /// Pull runs: `pull_done` was sent to the client.
    #[prost(bool, tag = "10")]
    pub pull_done_sent: bool,
    /// Pull runs: storage nodes holding an unfinished pull assignment.
    #[prost(string, repeated, tag = "11")]
    pub pulls_outstanding: Vec<String>,
    /// Pull runs: retries waiting for their minimum sleep.
    #[prost(message, repeated, tag = "12")]
    pub pull_retries: Vec<PullRetry>,
    /// The client part's reason of failure, kept until the run ends.
    #[prost(string, tag = "13")]
    pub client_reason: String,
    /// The client part of the current attempt was sent to the client node.
    #[prost(bool, tag = "14")]
    pub client_assigned: bool,
    /// Since when the run waits for its client or destinations (for
    /// `queue_timeout`), ms since the Unix epoch.
    #[prost(int64, tag = "15")]
    pub waiting_since_ms: i64,
}

impl RunRecord {
    /// The public run (always present in a stored record).
    pub fn run(&self) -> &Run {
        static EMPTY: std::sync::OnceLock<Run> = std::sync::OnceLock::new();
        self.run
            .as_ref()
            .unwrap_or_else(|| EMPTY.get_or_init(Run::default))
    }

    /// The public run, to change it.
    pub fn run_mut(&mut self) -> &mut Run {
        self.run.get_or_insert_with(Run::default)
    }

    /// The run's id.
    pub fn id(&self) -> &str {
        &self.run().id
    }

    /// The job as submitted.
    pub fn spec(&self) -> JobSpec {
        self.spec.clone().unwrap_or_default()
    }

    /// The kind, with unknown values read as push.
    pub fn run_kind(&self) -> RunKind {
        RunKind::try_from(self.kind).unwrap_or(RunKind::Push)
    }

    /// Whether the run reached done, failed or cancelled.
    pub fn is_finished(&self) -> bool {
        is_final(self.run().state())
    }
}

/// Done, failed or cancelled.
pub fn is_final(state: RunState) -> bool {
    matches!(
        state,
        RunState::Done | RunState::Failed | RunState::Cancelled
    )
}

/// A bearer token as the coordinator keeps it: its public description and a
/// hash of its secret, never the secret.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredToken {
    /// What `ListTokens` shows.
    #[prost(message, optional, tag = "1")]
    pub info: Option<fabric_proto::v1::TokenInfo>,
    /// `fabric_trust::token::Token::secret_hash` of the secret.
    #[prost(bytes = "vec", tag = "2")]
    pub secret_hash: Vec<u8>,
}
